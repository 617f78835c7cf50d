//! This node's cache of every region's STATS figures (`core::figures_cache`), kept fresh so that
//! `GPUCACHE.STATS` without a region answers from memory instead of reading every region.
//!
//! Which regions it holds follows the known-regions registry (`regions.rs`). A region turns
//! stale on any keyspace event on a key its figures are read from (the counters hash, the
//! 24-hour window, the GPU and booking registries, the types set, the availability indexes, the
//! type prices): every write gpucache makes goes through `RedisModule_Call`, so Redis raises
//! these events for it, and for replicated writes on replicas, AOF replays and other clients'
//! hand edits alike. What raises no event is covered otherwise: a key that expires later (a
//! type price, on a replica before the primary's `DEL`) sets a deadline when read; new demand
//! tiers and the end of a load make every region stale; and a slow round re-reads one region per
//! cron tick, whatever happened.
//!
//! Stale regions are re-read oldest change first, by each STATS call (within `CALL_BUDGET`) and
//! by the cron tick (within `TICK_BUDGET`). Reads never write, so they work on replicas too.
//! The cache's lock is never held while a key is read: reading an expired key deletes it on a
//! primary, and the event that raises comes back here.

use crate::core::figures_cache::FiguresCache;
use crate::keys::RegionKeys;
use crate::market::Region;
use crate::store::{select_db, selected_db, Store};
use redis_module::Context;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// Time a STATS call may spend re-reading stale regions before it answers.
pub const CALL_BUDGET: Duration = Duration::from_millis(2);
/// Stale regions a STATS call re-reads whatever the time (~0.1-0.4 ms each): with a few regions
/// the sum is exact even when the machine is slow and one read alone outlasts `CALL_BUDGET`.
const CALL_MIN_READS: usize = 8;
/// Time a cron tick (`hz` a second) may spend re-reading stale regions.
const TICK_BUDGET: Duration = Duration::from_millis(1);

/// A `Mutex`, not a thread-local: keyspace events may come from any thread holding the GIL.
static CACHE: Mutex<FiguresCache> = Mutex::new(FiguresCache::new());

fn cache() -> MutexGuard<'static, FiguresCache> {
    CACHE
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn now_ms() -> i64 {
    // SAFETY: RedisModule_Milliseconds takes no arguments and only reads the clock.
    unsafe {
        redis_module::raw::RedisModule_Milliseconds
            .map(|f| f())
            .unwrap_or(0)
    }
}

/// The keys STATS figures are read from, as (entity, id); `None` for any id.
const INPUTS: [(&str, Option<&str>); 9] = [
    ("stats", Some("market")),
    ("stats", Some("24h")),
    ("index", Some("gpus")),
    ("index", Some("bookings")),
    ("index", Some("types")),
    ("avail-own", None),
    ("avail-type", None),
    ("avail-draining", None),
    ("price", None),
];

/// The region whose figures `key` is read for, if it is one of those keys.
pub fn region_of_input(key: &[u8]) -> Option<&str> {
    let (region, entity, id) = RegionKeys::parse(std::str::from_utf8(key).ok()?)?;
    INPUTS
        .iter()
        .any(|(e, i)| *e == entity && i.is_none_or(|i| i == id))
        .then_some(region)
}

/// Keyspace-event handler: any event on a key the figures of `region` are read from
/// (`region_of_input`). Opens no key.
pub fn on_input_changed(ctx: &Context, region: &str) {
    cache().changed(selected_db(ctx), region, now_ms());
}

pub fn region_added(db: i32, region: &str) {
    cache().add(db, region, now_ms());
}

pub fn region_removed(db: i32, region: &str) {
    cache().remove(db, region);
}

/// A db emptied (`None`: all of them).
pub fn db_emptied(db: Option<i32>) {
    match db {
        Some(db) => cache().clear_db(db),
        None => cache().clear(),
    }
}

pub fn dbs_swapped(a: i32, b: i32) {
    cache().swap(a, b);
}

/// After a load every region is read again (whatever its keys' events said meanwhile).
pub fn all_changed() {
    cache().all_changed(now_ms());
}

/// Shown prices depend on the demand tiers: new ones make every region stale.
fn check_tiers(now: i64) {
    let tiers = crate::config::DEMAND_TIERS.current().to_string();
    cache().tiers_in_force(&tiers, now);
}

/// Reads one region into the cache (in the db `ctx` has selected).
fn read_into_cache(ctx: &Context, db: i32, region: &str) {
    let store = Store::new(ctx);
    let now = store.now_ms();
    let outcome = crate::figures_read::read(&Region::new(&store, region.to_owned()), now);
    let mut cache = cache();
    match outcome {
        Ok(read) => cache.read(
            db,
            region,
            read.has_counters.then_some(read.figures),
            read.deadline,
        ),
        Err(_) => cache.read_failed(db, region, now),
    }
}

/// Re-reads stale regions of `db` until none is due or, after `CALL_MIN_READS` of them,
/// `deadline` passes. A STATS call's part.
pub fn refresh_db(ctx: &Context, db: i32, deadline: Instant) {
    check_tiers(now_ms());
    let mut reads = 0;
    while reads < CALL_MIN_READS || Instant::now() < deadline {
        reads += 1;
        let Some(region) = cache().next_due(db, now_ms()) else {
            return;
        };
        read_into_cache(ctx, db, &region);
    }
}

/// The cron tick's part: stale regions of every db within `TICK_BUDGET`, then one region of
/// the slow round.
pub fn tick(ctx: &Context) {
    crate::logging::guarded(|| {
        let deadline = Instant::now() + TICK_BUDGET;
        check_tiers(now_ms());
        let original = selected_db(ctx);
        while Instant::now() < deadline {
            let Some((db, region)) = cache().next_due_anywhere(now_ms()) else {
                break;
            };
            if !select_db(ctx, db) {
                cache().read_failed(db, &region, now_ms());
                continue;
            }
            read_into_cache(ctx, db, &region);
        }
        let next = cache().next_in_round();
        if let Some((db, region)) = next {
            if select_db(ctx, db) {
                read_into_cache(ctx, db, &region);
            }
        }
        select_db(ctx, original);
    });
}

/// The cache, for the STATS command to sum from (not held while a key is read).
pub fn lock() -> MutexGuard<'static, FiguresCache> {
    cache()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_keys_figures_come_from_are_followed() {
        for input in [
            "gpucache:{eu}:stats:market",
            "gpucache:{eu}:stats:24h",
            "gpucache:{eu}:index:gpus",
            "gpucache:{eu}:index:bookings",
            "gpucache:{eu}:index:types",
            "gpucache:{eu}:avail-own:A100",
            "gpucache:{eu}:avail-type:A100",
            "gpucache:{eu}:price:A100",
        ] {
            assert_eq!(region_of_input(input.as_bytes()), Some("eu"), "{input}");
        }
        for other in [
            "gpucache:{eu}:gpu:g1",
            "gpucache:{eu}:booking:b1",
            "gpucache:{eu}:avail-score:A100",
            "gpucache:{eu}:events",
            "gpucache:{eu}:index:providers",
            "other:{eu}:stats:market",
        ] {
            assert_eq!(region_of_input(other.as_bytes()), None, "{other}");
        }
    }
}
