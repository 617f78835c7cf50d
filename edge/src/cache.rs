//! The in-process L1: a bounded moka cache of marketplace reads, validated against tag epochs
//! and record versions on every hit and every fill.

use crate::error::EdgeError;
use crate::keyspace;
use crate::query::Query;
use crate::stats::{add, Counters, Stats};
use crate::tags::{Epochs, Stamp, Tag};
use moka::ops::compute::Op;
use moka::policy::EvictionPolicy;
use serde_json::Value;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

/// Where an invalidation came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// A keyspace notification (the fast path).
    Notification,
    /// An entry of a region's event stream, read live or replayed after a reconnect.
    Stream,
    /// The region was dropped whole: events may have been lost.
    RegionDrop,
}

/// Called for every key invalidated, with where it came from (metrics, the propagation
/// benchmark). Runs on a listener thread: keep it short.
pub type InvalidationHook = Arc<dyn Fn(&str, Source) + Send + Sync>;

/// Eviction policies moka offers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Eviction {
    /// Admission by frequency (TinyLFU), eviction by recency: the best hit ratio on skewed
    /// (popular-GPU) traffic.
    #[default]
    TinyLfu,
    /// Plain least-recently-used: better when recent keys are the hot ones (scans, bursts).
    Lru,
}

/// Size and lifetime limits of the L1.
#[derive(Debug, Clone)]
pub struct L1Config {
    pub max_entries: u64,
    /// Upper bound on an entry's life, whatever the events say (a safety net).
    pub time_to_live: Duration,
    /// Drop entries not read for this long (`None`: only `time_to_live`).
    pub time_to_idle: Option<Duration>,
    pub eviction: Eviction,
    /// Serve cached entries while the invalidation link is down (they may be stale until it
    /// is back). Off by default: reads then go to Redis.
    pub serve_while_disconnected: bool,
}

impl Default for L1Config {
    fn default() -> Self {
        L1Config {
            max_entries: 100_000,
            time_to_live: Duration::from_secs(60),
            time_to_idle: None,
            eviction: Eviction::TinyLfu,
            serve_while_disconnected: false,
        }
    }
}

enum Lookup {
    Hit(Arc<Value>),
    Absent,
    Invalidated,
}

struct Entry {
    value: Arc<Value>,
    version: Option<i64>,
    stamps: Vec<Stamp>,
    /// The epochs its load began from (dependencies and guards), to tell which concurrent
    /// callers may share it.
    started: Vec<Stamp>,
    /// The record's own remaining TTL in Redis when loaded: the L1 copy must not outlive it.
    expires_in: Option<Duration>,
}

/// Per-entry expiry: a GPU record leaves the L1 when it would expire in Redis (the module's
/// healing event may come a little later, when Redis actually deletes the key).
struct RecordLifetime;

impl moka::Expiry<Query, Arc<Entry>> for RecordLifetime {
    fn expire_after_create(
        &self,
        _query: &Query,
        entry: &Arc<Entry>,
        _created_at: std::time::Instant,
    ) -> Option<Duration> {
        entry.expires_in
    }
}

/// moka panics on lifetimes above 1,000 years; nobody needs more than this.
const LONGEST_LIFETIME: Duration = Duration::from_secs(365 * 24 * 3600);

/// What a load produced that must not be cached, or its failure; shared by single-flight
/// waiters.
enum LoadOutcome {
    /// Not cached; `started` are the epochs the load began from.
    Uncached {
        value: Arc<Value>,
        started: Vec<Stamp>,
    },
    Failed(EdgeError),
}

pub struct L1 {
    entries: moka::sync::Cache<Query, Arc<Entry>>,
    /// Newest version seen per GPU key (from events and fills), with the region's epoch when
    /// it was seen.
    versions: moka::sync::Cache<String, (Stamp, i64)>,
    epochs: Epochs,
    pub(crate) counters: Counters,
    serve_while_disconnected: bool,
    hook: Option<InvalidationHook>,
    /// Per followed region, whether the stream link that reads it is up (its own link, on the
    /// server that holds it now). Set once by the edge; without it, `set_link` decides.
    region_links: OnceLock<HashMap<String, AtomicBool>>,
}

impl L1 {
    pub fn new(config: &L1Config, hook: Option<InvalidationHook>) -> L1 {
        let policy = match config.eviction {
            Eviction::TinyLfu => EvictionPolicy::tiny_lfu(),
            Eviction::Lru => EvictionPolicy::lru(),
        };
        let mut builder = moka::sync::Cache::builder()
            .max_capacity(config.max_entries)
            .time_to_live(config.time_to_live.min(LONGEST_LIFETIME))
            .expire_after(RecordLifetime)
            .eviction_policy(policy);
        if let Some(idle) = config.time_to_idle {
            builder = builder.time_to_idle(idle.min(LONGEST_LIFETIME));
        }
        L1 {
            entries: builder.build(),
            // LRU: every version recorded is admitted (TinyLFU may turn new keys away).
            versions: moka::sync::Cache::builder()
                .max_capacity(config.max_entries.saturating_mul(4))
                .eviction_policy(EvictionPolicy::lru())
                .build(),
            epochs: Epochs::default(),
            counters: Counters::default(),
            serve_while_disconnected: config.serve_while_disconnected,
            hook,
            region_links: OnceLock::new(),
        }
    }

    /// Whether the stream link that follows `region` is up.
    fn link_up(&self, region: &str) -> bool {
        match self.region_links.get().and_then(|links| links.get(region)) {
            Some(up) => up.load(Ordering::Acquire),
            None => self.counters.stream_up.load(Ordering::Acquire),
        }
    }

    fn serving(&self, region: &str) -> bool {
        self.serve_while_disconnected || self.link_up(region)
    }

    fn valid(&self, entry: &Entry) -> bool {
        self.epochs.all_unchanged(&entry.stamps)
    }

    /// The cached value, if it is still valid (counts a hit or a miss).
    pub fn get(&self, query: &Query) -> Option<Arc<Value>> {
        match self.lookup(query) {
            Lookup::Hit(value) => Some(value),
            Lookup::Absent | Lookup::Invalidated => None,
        }
    }

    fn lookup(&self, query: &Query) -> Lookup {
        let found = if self.serving(query.region()) {
            self.entries.get(query)
        } else {
            None
        };
        match found {
            Some(entry) if self.valid(&entry) => {
                self.counters.hits.incr();
                Lookup::Hit(entry.value.clone())
            }
            Some(_) => {
                self.counters.misses.incr();
                Lookup::Invalidated
            }
            None => {
                self.counters.misses.incr();
                Lookup::Absent
            }
        }
    }

    /// Removes the entry of `query` if it is (still) invalid: a concurrent reader may already
    /// have replaced it with a fresh one, which must stay.
    fn remove_if_invalid(&self, query: &Query) {
        // The common case (nothing cached, or a fresh copy) without moka's per-key lock.
        if self.entries.get(query).is_none_or(|e| self.valid(&e)) {
            return;
        }
        self.entries
            .entry_by_ref(query)
            .and_compute_with(|current| match current {
                Some(entry) if !self.valid(entry.value()) => Op::Remove,
                _ => Op::Nop,
            });
    }

    /// The cached value or, on a miss, the loader's. Concurrent misses of one query share one
    /// loader call (moka's single flight). The result is cached only if nothing invalidated
    /// it while it loaded and it is not older than a version already seen.
    pub fn get_or_load<F>(&self, query: &Query, loader: F) -> Result<Arc<Value>, EdgeError>
    where
        F: FnOnce(&Query) -> Result<Value, EdgeError>,
    {
        if !self.serving(query.region()) {
            self.counters.misses.incr();
            return self.load_uncached(query, loader);
        }
        // Taken before the lookup: a shared load is good for this caller only if nothing was
        // invalidated between that load's start and this call's.
        let mine = self.start_stamps(query);
        match self.lookup(query) {
            Lookup::Hit(value) => return Ok(value),
            // try_get_with would return the invalidated entry as is.
            Lookup::Invalidated => self.remove_if_invalid(query),
            Lookup::Absent => {}
        }
        let mut loader = Some(loader);
        let outcome = self
            .entries
            .try_get_with(query.clone(), || match loader.take() {
                Some(load) => self.load(query, &mine, load),
                None => Err(LoadOutcome::Failed(EdgeError::Reply(
                    "loader reused".into(),
                ))),
            });
        let (value, started) = match &outcome {
            Ok(entry) if self.valid(entry) => return Ok(entry.value.clone()),
            Ok(entry) => {
                self.remove_if_invalid(query);
                (&entry.value, &entry.started)
            }
            Err(shared) => match &**shared {
                LoadOutcome::Uncached { value, started } => (value, started),
                LoadOutcome::Failed(e) => return Err(e.clone()),
            },
        };
        if *started == mine {
            // Read after this call began, or before it with nothing invalidated in between.
            return Ok(value.clone());
        }
        // Another caller's load began before an invalidation this call must see.
        match loader.take() {
            Some(load) => self.load_uncached(query, load),
            None => Ok(value.clone()),
        }
    }

    fn load_uncached<F>(&self, query: &Query, loader: F) -> Result<Arc<Value>, EdgeError>
    where
        F: FnOnce(&Query) -> Result<Value, EdgeError>,
    {
        add(&self.counters.loads, 1);
        loader(query).map(Arc::new).inspect_err(|_| {
            add(&self.counters.load_errors, 1);
        })
    }

    /// The epochs a load of `query` starts from: the tags it depends on, then its guards.
    fn start_stamps(&self, query: &Query) -> Vec<Stamp> {
        query
            .tags_before_load()
            .into_iter()
            .chain(query.load_guards())
            .map(|t| self.epochs.stamp(t))
            .collect()
    }

    fn load<F>(
        &self,
        query: &Query,
        started: &[Stamp],
        loader: F,
    ) -> Result<Arc<Entry>, LoadOutcome>
    where
        F: FnOnce(&Query) -> Result<Value, EdgeError>,
    {
        let cacheable = self.link_up(query.region());
        add(&self.counters.loads, 1);
        let value = loader(query).map_err(|e| {
            add(&self.counters.load_errors, 1);
            LoadOutcome::Failed(e)
        })?;
        let value = Arc::new(value);
        // The tags the value names are stamped before the check below: a change to them
        // after this point leaves the entry invalid; one before it is caught by the guards.
        let named: Vec<Stamp> = query
            .tags_of_value(&value)
            .into_iter()
            .map(|t| self.epochs.stamp(t))
            .collect();
        let version = query.version_of(&value);
        let too_old = match (version, query.versioned_key()) {
            (Some(version), Some(key)) => !self.note_version(&key, version),
            _ => false,
        };
        let overtaken = !self.epochs.all_unchanged(started);
        if !cacheable || too_old || overtaken {
            add(&self.counters.fills_refused, 1);
            return Err(LoadOutcome::Uncached {
                value,
                started: started.to_vec(),
            });
        }
        let guards = query.load_guards().len();
        let depends = started.len().saturating_sub(guards);
        let stamps = started.iter().take(depends).copied().chain(named).collect();
        Ok(Arc::new(Entry {
            expires_in: query
                .remaining_ttl(&value)
                .map(|ttl| ttl.min(LONGEST_LIFETIME)),
            value,
            version,
            stamps,
            started: started.to_vec(),
        }))
    }

    /// Records `version` for a GPU key; false when a newer one was already seen. Versions
    /// seen before the region was last dropped do not count: a server that lost writes
    /// reissues them.
    pub(crate) fn note_version(&self, key: &str, version: i64) -> bool {
        let Some(parts) = keyspace::parse_key(key) else {
            return true;
        };
        let generation = self.epochs.stamp(Tag::region(parts.region));
        let newest = self.versions.entry_by_ref(key).and_upsert_with(|old| {
            match old.map(|e| e.into_value()) {
                Some((seen_in, seen)) if seen_in == generation => (generation, seen.max(version)),
                _ => (generation, version),
            }
        });
        newest.value().1 <= version
    }

    /// Drops what a change of `key` makes stale.
    pub fn invalidate_key(&self, key: &str, source: Source) {
        add(&self.counters.invalidations, 1);
        for tag in keyspace::tags_for_key(key) {
            self.epochs.bump(tag);
        }
        if let Some(parts) = keyspace::parse_key(key) {
            if parts.entity == "gpu" {
                // Frees the memory now; a copy loaded after the bump stays.
                self.remove_if_invalid(&Query::gpu(parts.region, parts.id));
            }
        }
        self.call_hook(key, source);
    }

    /// Applies a stream event's GPU version, then invalidates its keys — except the GPU's own
    /// key when the cached record is already at least that new (it was loaded after the
    /// change, e.g. right after the notification dropped it).
    pub(crate) fn apply_event(&self, gpu_key: Option<(&str, i64)>, keys: &[String]) {
        if let Some((key, version)) = gpu_key {
            self.note_version(key, version);
        }
        for key in keys {
            if let Some((gpu_key, version)) = gpu_key {
                if key == gpu_key && self.cached_version_at_least(key, version) {
                    continue;
                }
            }
            self.invalidate_key(key, Source::Stream);
        }
    }

    fn cached_version_at_least(&self, gpu_key: &str, version: i64) -> bool {
        let Some(parts) = keyspace::parse_key(gpu_key) else {
            return false;
        };
        self.entries
            .get(&Query::gpu(parts.region, parts.id))
            .is_some_and(|e| self.valid(&e) && e.version.is_some_and(|v| v >= version))
    }

    /// Drops everything cached for `region`.
    pub fn drop_region(&self, region: &str) {
        self.epochs.bump(Tag::region(region));
        add(&self.counters.region_drops, 1);
        self.call_hook(&format!("gpucache:{{{region}}}:*"), Source::RegionDrop);
    }

    /// A panicking hook must not take the listener down with it (its link would stay marked
    /// up with nobody applying events).
    fn call_hook(&self, key: &str, source: Source) {
        if let Some(hook) = &self.hook {
            let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| hook(key, source)));
        }
    }

    pub fn stats(&self) -> Stats {
        let stream_up = match self.region_links.get() {
            Some(links) if !links.is_empty() => links.values().all(|up| up.load(Ordering::Acquire)),
            _ => self.counters.stream_up.load(Ordering::Acquire),
        };
        self.counters
            .snapshot(self.entries.entry_count(), stream_up)
    }

    /// Marks the invalidation link of every region up or down (tests and benchmarks of the
    /// cache alone set it by hand).
    pub fn set_link(&self, stream_up: bool) {
        self.counters.stream_up.store(stream_up, Ordering::Release);
        for up in self.region_links.get().into_iter().flat_map(|l| l.values()) {
            up.store(stream_up, Ordering::Release);
        }
    }

    /// Gives each of `regions` a link state of its own, down until its link marks it up
    /// (once; later calls change nothing).
    pub(crate) fn follow_regions(&self, regions: &[String]) {
        let _ = self.region_links.set(
            regions
                .iter()
                .map(|r| (r.clone(), AtomicBool::new(false)))
                .collect(),
        );
    }

    /// Marks the stream link of `region` up or down (the listener's job).
    pub(crate) fn set_region_link(&self, region: &str, up: bool) {
        if let Some(flag) = self.region_links.get().and_then(|l| l.get(region)) {
            flag.store(up, Ordering::Release);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use std::sync::atomic::AtomicUsize;

    fn l1() -> L1 {
        let l1 = L1::new(&L1Config::default(), None);
        l1.set_link(true);
        l1
    }

    fn gpu(version: i64) -> Value {
        json!({"gpu_id": "g1", "type": "A100", "provider": "p1", "version": version})
    }

    #[test]
    fn caches_and_invalidates_by_key() {
        let l1 = l1();
        let q = Query::gpu("eu", "g1");
        let v = l1.get_or_load(&q, |_| Ok(gpu(1))).unwrap();
        assert_eq!(v["version"], 1);
        assert!(l1.get(&q).is_some());
        l1.invalidate_key("gpucache:{eu}:gpu:g1", Source::Notification);
        assert!(l1.get(&q).is_none());
        let v = l1.get_or_load(&q, |_| Ok(gpu(2))).unwrap();
        assert_eq!(v["version"], 2);
    }

    #[test]
    fn a_type_price_change_drops_gpus_of_that_type_only() {
        let l1 = l1();
        let a100 = Query::gpu("eu", "g1");
        let h100 = Query::gpu("eu", "g2");
        l1.get_or_load(&a100, |_| Ok(gpu(1))).unwrap();
        l1.get_or_load(&h100, |_| {
            Ok(json!({"type": "H100", "provider": "p1", "version": 1}))
        })
        .unwrap();
        l1.invalidate_key("gpucache:{eu}:price:A100", Source::Notification);
        assert!(l1.get(&a100).is_none());
        assert!(l1.get(&h100).is_some());
        l1.invalidate_key("gpucache:{eu}:provider:p1", Source::Notification);
        assert!(l1.get(&h100).is_none());
    }

    #[test]
    fn market_changes_drop_searches_and_stats_not_records() {
        let l1 = l1();
        let search = Query::available("eu", &["LIMIT", "10"]);
        let stats = Query::stats("eu");
        let record = Query::gpu("eu", "g1");
        l1.get_or_load(&search, |_| Ok(json!([]))).unwrap();
        l1.get_or_load(&stats, |_| Ok(json!({}))).unwrap();
        l1.get_or_load(&record, |_| Ok(gpu(1))).unwrap();
        l1.invalidate_key("gpucache:{eu}:avail-own:A100", Source::Stream);
        assert!(l1.get(&search).is_none());
        assert!(l1.get(&stats).is_none());
        assert!(l1.get(&record).is_some());
        l1.drop_region("eu");
        assert!(l1.get(&record).is_none());
    }

    #[test]
    fn a_load_overtaken_by_an_invalidation_is_returned_but_not_cached() {
        let l1 = l1();
        let q = Query::gpu("eu", "g1");
        let v = l1
            .get_or_load(&q, |_| {
                // The write lands while the (slow) read is in flight.
                l1.invalidate_key("gpucache:{eu}:gpu:g1", Source::Notification);
                Ok(gpu(1))
            })
            .unwrap();
        assert_eq!(v["version"], 1);
        assert!(l1.get(&q).is_none());
        assert_eq!(l1.stats().fills_refused, 1);
    }

    #[test]
    fn a_fill_older_than_a_seen_version_is_refused() {
        let l1 = l1();
        let q = Query::gpu("eu", "g1");
        l1.apply_event(Some(("gpucache:{eu}:gpu:g1", 5)), &[]);
        l1.get_or_load(&q, |_| Ok(gpu(4))).unwrap();
        assert!(l1.get(&q).is_none(), "version 4 < 5 must not be cached");
        l1.get_or_load(&q, |_| Ok(gpu(5))).unwrap();
        assert!(l1.get(&q).is_some());
        // A replayed event for a version the cache already holds keeps the entry.
        l1.apply_event(
            Some(("gpucache:{eu}:gpu:g1", 5)),
            &["gpucache:{eu}:gpu:g1".to_string()],
        );
        assert!(l1.get(&q).is_some());
        l1.apply_event(
            Some(("gpucache:{eu}:gpu:g1", 6)),
            &["gpucache:{eu}:gpu:g1".to_string()],
        );
        assert!(l1.get(&q).is_none());
    }

    #[test]
    fn nothing_is_cached_or_served_while_the_link_is_down() {
        let l1 = l1();
        let q = Query::stats("eu");
        l1.get_or_load(&q, |_| Ok(json!({"n": 1}))).unwrap();
        l1.set_link(false);
        assert!(l1.get(&q).is_none());
        let calls = AtomicUsize::new(0);
        let load = |_: &Query| {
            calls.fetch_add(1, Ordering::SeqCst);
            Ok(json!({"n": 2}))
        };
        assert_eq!(l1.get_or_load(&q, load).unwrap()["n"], 2);
        assert_eq!(l1.get_or_load(&q, load).unwrap()["n"], 2);
        assert_eq!(calls.load(Ordering::SeqCst), 2);
    }

    #[test]
    fn a_region_whose_link_is_down_is_bypassed_while_the_others_are_served() {
        let l1 = L1::new(&L1Config::default(), None);
        l1.follow_regions(&["eu".to_string(), "us".to_string()]);
        let (eu, us) = (Query::stats("eu"), Query::stats("us"));
        l1.set_region_link("eu", true);
        l1.set_region_link("us", true);
        l1.get_or_load(&eu, |_| Ok(json!({"n": 1}))).unwrap();
        l1.get_or_load(&us, |_| Ok(json!({"n": 1}))).unwrap();
        assert_eq!(
            l1.stats().connection,
            "degraded",
            "streams up, no notifications"
        );
        // us's server fails over: its link is down until its stream is caught up elsewhere.
        l1.set_region_link("us", false);
        assert_eq!(l1.stats().connection, "disconnected");
        assert!(l1.get(&eu).is_some());
        assert!(l1.get(&us).is_none());
        assert_eq!(
            l1.get_or_load(&us, |_| Ok(json!({"n": 2}))).unwrap()["n"],
            2
        );
        assert!(
            l1.get(&us).is_none(),
            "nothing cached for a region without its link"
        );
        l1.set_region_link("us", true);
        assert_eq!(
            l1.get(&us).unwrap()["n"],
            1,
            "its entries survive a caught-up move"
        );
    }

    #[test]
    fn a_record_leaves_the_l1_when_it_would_expire_in_redis() {
        let l1 = l1();
        let short = Query::gpu("eu", "g1");
        let long = Query::gpu("eu", "g2");
        l1.get_or_load(&short, |_| Ok(json!({"version": 1, "ttl_ms": 30})))
            .unwrap();
        l1.get_or_load(&long, |_| Ok(json!({"version": 1, "ttl_ms": 600_000})))
            .unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while l1.get(&short).is_some() {
            assert!(
                std::time::Instant::now() < deadline,
                "g1 outlived its ttl_ms"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        assert!(l1.get(&long).is_some());
    }

    #[test]
    fn load_errors_are_returned_and_not_cached() {
        let l1 = l1();
        let q = Query::gpu("eu", "nope");
        let err = l1
            .get_or_load(&q, |_| Err(EdgeError::Server("NOGPU no such GPU".into())))
            .unwrap_err();
        assert_eq!(err, EdgeError::Server("NOGPU no such GPU".into()));
        assert!(l1.get(&q).is_none());
        assert_eq!(l1.stats().load_errors, 1);
    }
}
