//! The regions this server holds, for `GPUCACHE.STATS` without a region and for the work that
//! visits every region (the booking clock, the sweep after a load).
//!
//! Kept in memory from keyspace events instead of a shared key: a key naming every region
//! would live in one cluster slot while regions live in theirs. Every region has a counters
//! hash (`gpucache:{R}:stats:market`); any write to it (a command, replication, AOF replay), its
//! load from an RDB file (`loaded`) or its arrival by `RESTORE`/`MIGRATE` registers the region,
//! so primaries and replicas both know their regions after a restart.
//!
//! A region is forgotten once none of its anchor keys (counters, GPU and booking registries,
//! booking ends) is left: looked at when one of them is deleted, expires, is evicted, renamed
//! or moved away; `FLUSHDB`/`FLUSHALL` forget a db's regions at once and `SWAPDB` swaps them;
//! and a slow round over every known region (a few per cron tick) catches whatever left
//! without an event (a slot's keys dropped by cluster resharding, say). A region that lost only
//! its counters keeps its other keys, so it stays known until it is repaired.
//!
//! Names another client wrote under the prefix that gpucache would never give a region are
//! never registered.

use crate::keys::RegionKeys;
use crate::store::{select_db, selected_db, Store};
use redis_module::{raw, Context, KeyType};
use std::collections::BTreeSet;
use std::ops::Bound;
use std::sync::{Mutex, MutexGuard};

#[derive(Default)]
struct Known {
    /// (db, region) pairs.
    regions: BTreeSet<(i32, String)>,
    /// Where the slow round over every region goes on from.
    round_after: Option<(i32, String)>,
    /// Known regions one of whose anchor keys went away: looked at on the next cron tick, never
    /// from the keyspace event itself (on 7.0 a key opened there may be lazily expired while
    /// Redis's active expiry walks the bucket that holds it: a use-after-free).
    suspects: BTreeSet<(i32, String)>,
}

/// A `Mutex`, not a thread-local: a keyspace event may be raised on any thread that holds the
/// GIL (another module writing from a thread-safe context).
static KNOWN: Mutex<Known> = Mutex::new(Known {
    regions: BTreeSet::new(),
    round_after: None,
    suspects: BTreeSet::new(),
});

fn known_set() -> MutexGuard<'static, Known> {
    KNOWN
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Regions looked at per cron tick by the slow round (`hz` ticks a second, 10 by default).
const ROUND_PER_TICK: usize = 32;
/// Regions whose anchor keys went away looked at per cron tick (the rest wait for the next).
const SUSPECTS_PER_TICK: usize = 1024;

/// The region a key of gpucache's belongs to, when the key is one of `entities` and the region
/// name is one gpucache would give.
fn region_of<'k>(key: &'k [u8], entities: &[(&str, &str)]) -> Option<&'k str> {
    let key = std::str::from_utf8(key).ok()?;
    let (region, entity, id) = RegionKeys::parse(key)?;
    if !entities.contains(&(entity, id)) {
        return None;
    }
    crate::core::input::region(region.as_bytes()).ok()?;
    Some(region)
}

const COUNTERS: (&str, &str) = ("stats", "market");
/// Keys a region with any state left has at least one of.
const ANCHORS: [(&str, &str); 4] = [
    COUNTERS,
    ("index", "gpus"),
    ("index", "bookings"),
    ("index", "booking-ends"),
];

/// Keyspace-event handler for hash writes and keys loaded from RDB.
pub fn on_counters_written(ctx: &Context, key: &[u8]) {
    if !key.ends_with(b":stats:market") {
        return;
    }
    if let Some(region) = region_of(key, &[COUNTERS]) {
        remember(selected_db(ctx), region);
    }
}

fn remember(db: i32, region: &str) {
    let added = {
        let mut known = known_set();
        known.regions.insert((db, region.to_owned()))
    };
    if added {
        crate::stats_cache::region_added(db, region);
    }
}

const GONE_EVENTS: [&[u8]; 5] = [b"del", b"expired", b"evicted", b"rename_from", b"move_from"];
const ARRIVED_EVENTS: [&[u8]; 4] = [b"restore", b"rename_to", b"move_to", b"copy_to"];

/// Whether `on_key_moved` does anything for this event.
pub fn follows_event(event: &[u8]) -> bool {
    GONE_EVENTS.contains(&event) || ARRIVED_EVENTS.contains(&event)
}

/// Keyspace-event handler for generic events (`del`, `rename_*`, `move_*`, `restore`, ...),
/// expiries and evictions.
pub fn on_key_moved(ctx: &Context, event: &[u8], key: &[u8]) {
    if GONE_EVENTS.contains(&event) {
        if let Some(region) = region_of(key, &ANCHORS) {
            // No key is opened here (see `Known::suspects`).
            let entry = (selected_db(ctx), region.to_owned());
            let mut known = known_set();
            if known.regions.contains(&entry) {
                known.suspects.insert(entry);
            }
        }
    } else if ARRIVED_EVENTS.contains(&event) {
        // A region's counters arriving by migration, `RESTORE`, `RENAME`, `MOVE` or `COPY`:
        // this node takes charge of the region (no key is opened here: the sweep and the
        // booking clock look at it from their timers).
        if let Some(region) = region_of(key, &[COUNTERS]) {
            remember(selected_db(ctx), region);
            crate::heal::queue_sweep_of_arrived(ctx, region);
            crate::booking_clock::look_again_at(ctx, region);
        }
    }
}

/// Whether any anchor key of the region exists in the db `ctx` has selected.
fn has_state(ctx: &Context, region: &str) -> bool {
    let store = Store::new(ctx);
    let keys = RegionKeys::new(region);
    let mut key = String::new();
    ANCHORS.iter().any(|(entity, id)| {
        keys.key_into(&mut key, entity, id);
        store.key_type(&key) != KeyType::Empty
    })
}

/// Forgets the region when none of its anchor keys is left in `db` (the db `ctx` has selected).
fn forget_if_gone(ctx: &Context, db: i32, region: &str) {
    let known = known_set().regions.contains(&(db, region.to_owned()));
    if !known || has_state(ctx, region) {
        return;
    }
    forget(db, region);
}

fn forget(db: i32, region: &str) {
    {
        let mut known = known_set();
        let entry = (db, region.to_owned());
        known.regions.remove(&entry);
        known.suspects.remove(&entry);
    }
    crate::stats_cache::region_removed(db, region);
    crate::booking_clock::forget(db, region);
}

/// `FLUSHDB`/`FLUSHALL` (and a replica's or a reload's emptying of the dataset) ended: the
/// flushed db's regions are gone (`None`: every db's).
fn forget_db(db: Option<i32>) {
    {
        let mut known = known_set();
        match db {
            None => {
                known.regions = BTreeSet::new();
                known.suspects = BTreeSet::new();
                known.round_after = None;
            }
            Some(db) => {
                known.regions.retain(|(d, _)| *d != db);
                known.suspects.retain(|(d, _)| *d != db);
            }
        }
    }
    crate::stats_cache::db_emptied(db);
    crate::booking_clock::forget_db(db);
    crate::provider_moves::forget_db(db);
    crate::type_drains::forget_db(db);
}

/// `SWAPDB a b`: each db's regions now live in the other.
fn swap_dbs(a: i32, b: i32) {
    {
        let mut known = known_set();
        let regions = std::mem::take(&mut known.regions);
        known.regions = regions
            .into_iter()
            .map(|(db, region)| (swap(db, a, b), region))
            .collect();
        let suspects = std::mem::take(&mut known.suspects);
        known.suspects = suspects
            .into_iter()
            .map(|(db, region)| (swap(db, a, b), region))
            .collect();
        known.round_after = None;
    }
    crate::stats_cache::dbs_swapped(a, b);
    crate::booking_clock::forget_all_ends();
    crate::provider_moves::swap_dbs(a, b);
    crate::type_drains::swap_dbs(a, b);
}

pub(crate) fn swap(db: i32, a: i32, b: i32) -> i32 {
    if db == a {
        b
    } else if db == b {
        a
    } else {
        db
    }
}

/// One step of the slow round: looks at a few known regions and forgets those without state.
/// Called from the cron tick, on primaries and replicas alike.
pub fn round_step(ctx: &Context) {
    crate::logging::guarded(|| round(ctx));
}

fn round(ctx: &Context) {
    let batch: Vec<(i32, String)> = {
        let mut known = known_set();
        let mut batch: Vec<(i32, String)> = Vec::new();
        while batch.len() < SUSPECTS_PER_TICK {
            let Some(suspect) = known.suspects.pop_first() else {
                break;
            };
            batch.push(suspect);
        }
        let start = match known.round_after.take() {
            Some(after) => Bound::Excluded(after),
            None => Bound::Unbounded,
        };
        let round: Vec<(i32, String)> = known
            .regions
            .range((start, Bound::Unbounded))
            .take(ROUND_PER_TICK)
            .cloned()
            .collect();
        // Wraps around to the start after the last region.
        known.round_after = if round.len() == ROUND_PER_TICK {
            round.last().cloned()
        } else {
            None
        };
        batch.extend(round);
        batch
    };
    let original = selected_db(ctx);
    for (db, region) in batch {
        if select_db(ctx, db) {
            forget_if_gone(ctx, db, &region);
        }
    }
    select_db(ctx, original);
}

/// Every (db, region) this server holds.
pub fn known_everywhere() -> Vec<(i32, String)> {
    known_set().regions.iter().cloned().collect()
}

/// The (db, region) pairs `wanted` picks, read under one lock without copying the others.
pub fn known_where(mut wanted: impl FnMut(&(i32, String)) -> bool) -> Vec<(i32, String)> {
    known_set()
        .regions
        .iter()
        .filter(|entry| wanted(entry))
        .cloned()
        .collect()
}

/// Whether this server holds the region in `db` (some of its keys are here).
pub fn is_known(db: i32, region: &str) -> bool {
    known_set().regions.contains(&(db, region.to_owned()))
}

/// How many regions this server holds (all dbs).
pub fn count() -> usize {
    known_set().regions.len()
}

/// Subscribes to the server events that empty or swap whole dbs (not wrapped by the crate on
/// every event this needs, and the crate's flush callback does not say which db).
pub fn subscribe(ctx: &Context) {
    // SAFETY: reading a function pointer Redis filled at load.
    let Some(subscribe) = (unsafe { raw::RedisModule_SubscribeToServerEvent }) else {
        return;
    };
    for (id, callback) in [
        (
            raw::REDISMODULE_EVENT_FLUSHDB,
            on_flush as unsafe extern "C" fn(_, _, _, _),
        ),
        (raw::REDISMODULE_EVENT_SWAPDB, on_swapdb),
    ] {
        // SAFETY: called from the module's load; the callbacks match the API's signature.
        unsafe {
            subscribe(
                ctx.ctx,
                raw::RedisModuleEvent { id, dataver: 1 },
                Some(callback),
            );
        }
    }
}

unsafe extern "C" fn on_flush(
    _ctx: *mut raw::RedisModuleCtx,
    _event: raw::RedisModuleEvent,
    subevent: u64,
    data: *mut std::ffi::c_void,
) {
    if subevent != raw::REDISMODULE_SUBEVENT_FLUSHDB_END || data.is_null() {
        return;
    }
    // SAFETY: for this event Redis passes a `RedisModuleFlushInfo` (version 1).
    let info = &*data.cast::<raw::RedisModuleFlushInfo>();
    forget_db((info.dbnum >= 0).then_some(info.dbnum));
}

unsafe extern "C" fn on_swapdb(
    _ctx: *mut raw::RedisModuleCtx,
    _event: raw::RedisModuleEvent,
    _subevent: u64,
    data: *mut std::ffi::c_void,
) {
    if data.is_null() {
        return;
    }
    // SAFETY: for this event Redis passes a `RedisModuleSwapDbInfo` (version 1).
    let info = &*data.cast::<raw::RedisModuleSwapDbInfo>();
    swap_dbs(info.dbnum_first, info.dbnum_second);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_names_gpucache_would_give_are_regions() {
        assert_eq!(
            region_of(b"gpucache:{eu}:stats:market", &[COUNTERS]),
            Some("eu")
        );
        for foreign in [
            &b"gpucache:{a\x00b}:stats:market"[..],
            b"gpucache:{\xff}:stats:market",
            b"gpucache:{a:b}:stats:market",
            b"gpucache:{}:stats:market",
            b"gpucache:{eu}:stats:market:x",
            b"gpucache:{eu}:gpu:g1",
        ] {
            assert_eq!(region_of(foreign, &[COUNTERS]), None, "{foreign:?}");
        }
        assert_eq!(
            region_of(b"gpucache:{eu}:index:booking-ends", &ANCHORS),
            Some("eu")
        );
    }

    #[test]
    fn swapping_dbs_swaps_only_those_two() {
        assert_eq!(swap(0, 0, 1), 1);
        assert_eq!(swap(1, 0, 1), 0);
        assert_eq!(swap(2, 0, 1), 2);
    }
}
