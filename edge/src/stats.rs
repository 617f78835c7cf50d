//! Health and statistics counters, shared by readers and the listener threads.

use serde::Serialize;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

#[derive(Default)]
pub(crate) struct Counters {
    pub hits: Striped,
    pub misses: Striped,
    pub loads: AtomicU64,
    pub load_errors: AtomicU64,
    pub fills_refused: AtomicU64,
    pub notifications: AtomicU64,
    pub stream_events: AtomicU64,
    pub events_replayed: AtomicU64,
    pub region_drops: AtomicU64,
    pub invalidations: AtomicU64,
    pub reconnects: AtomicU64,
    pub newest_event_ms: AtomicI64,
    pub notifications_up: AtomicBool,
    /// Notifications are not followed (`LinkConfig::notifications` off).
    pub notifications_off: AtomicBool,
    pub stream_up: AtomicBool,
    /// Last applied stream entry id per followed region.
    pub last_event_ids: Mutex<BTreeMap<String, String>>,
    /// The server each region's stream link reads from, while it is up.
    pub followed_on: Mutex<BTreeMap<String, String>>,
    pub region_moves: AtomicU64,
}

/// A counter bumped on every read: one cache line per stripe, so reader threads do not contend
/// on a shared line.
#[derive(Default)]
pub(crate) struct Striped([Padded; STRIPES]);

#[derive(Default)]
#[repr(align(64))]
struct Padded(AtomicU64);

const STRIPES: usize = 16;

thread_local! {
    static STRIPE: usize = {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        (NEXT.fetch_add(1, Ordering::Relaxed) as usize) % STRIPES
    };
}

impl Striped {
    pub fn incr(&self) {
        let stripe = STRIPE.with(|s| *s);
        if let Some(slot) = self.0.get(stripe) {
            slot.0.fetch_add(1, Ordering::Relaxed);
        }
    }

    pub fn sum(&self) -> u64 {
        self.0.iter().map(|s| s.0.load(Ordering::Relaxed)).sum()
    }
}

pub(crate) fn add(counter: &AtomicU64, n: u64) {
    counter.fetch_add(n, Ordering::Relaxed);
}

pub(crate) fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// A snapshot of the L1's health (`Edge::stats`).
#[derive(Debug, Clone, Serialize)]
pub struct Stats {
    pub hits: u64,
    pub misses: u64,
    /// hits / (hits + misses); 0 before the first read.
    pub hit_ratio: f64,
    /// Loader calls (a single-flight load serves all its waiters with one call).
    pub loads: u64,
    pub load_errors: u64,
    /// Loaded values not cached because an invalidation or a newer version arrived while
    /// they were loading (they were still returned to the caller).
    pub fills_refused: u64,
    /// Keyspace notifications received.
    pub notifications: u64,
    /// Event-stream entries applied (live and replayed).
    pub stream_events: u64,
    /// Of those, entries read back after a (re)connect.
    pub events_replayed: u64,
    /// Times a region's whole L1 was dropped because events may have been lost.
    pub region_drops: u64,
    /// Keys invalidated (from notifications and stream entries; one entry names several).
    pub invalidations: u64,
    pub reconnects: u64,
    /// Times a region's stream link came up on another server than before (a failover, a
    /// reshard, a new primary named by Sentinel), its events replayed there from its last id.
    pub region_moves: u64,
    /// Now minus the timestamp of the newest applied event (ms); `None` before the first.
    pub lag_ms: Option<i64>,
    /// `connected` when every enabled link is up (notifications and stream),
    /// `degraded` when only the stream is (invalidations still arrive, a little later),
    /// `disconnected` otherwise (the L1 is bypassed).
    pub connection: &'static str,
    pub entries: u64,
    /// Last applied event-stream id per region (where a replay resumes).
    pub last_event_ids: BTreeMap<String, String>,
    /// `host:port` of the server each region is followed on, for regions whose stream link is
    /// up (in a cluster, the master that owns the region's slot).
    pub followed_on: BTreeMap<String, String>,
}

impl Counters {
    /// `stream_up`: whether every region's stream link is up.
    pub fn snapshot(&self, entries: u64, stream_up: bool) -> Stats {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let (hits, misses) = (self.hits.sum(), self.misses.sum());
        let newest = self.newest_event_ms.load(Ordering::Relaxed);
        let notifications_up = self.notifications_up.load(Ordering::Acquire)
            || self.notifications_off.load(Ordering::Acquire);
        Stats {
            hits,
            misses,
            hit_ratio: if hits + misses == 0 {
                0.0
            } else {
                hits as f64 / (hits + misses) as f64
            },
            loads: get(&self.loads),
            load_errors: get(&self.load_errors),
            fills_refused: get(&self.fills_refused),
            notifications: get(&self.notifications),
            stream_events: get(&self.stream_events),
            events_replayed: get(&self.events_replayed),
            region_drops: get(&self.region_drops),
            invalidations: get(&self.invalidations),
            reconnects: get(&self.reconnects),
            region_moves: get(&self.region_moves),
            lag_ms: (newest > 0).then(|| now_ms().saturating_sub(newest)),
            connection: match (stream_up, notifications_up) {
                (true, true) => "connected",
                (true, false) => "degraded",
                _ => "disconnected",
            },
            entries,
            last_event_ids: self
                .last_event_ids
                .lock()
                .map(|ids| ids.clone())
                .unwrap_or_default(),
            followed_on: self
                .followed_on
                .lock()
                .map(|nodes| nodes.clone())
                .unwrap_or_default(),
        }
    }
}
