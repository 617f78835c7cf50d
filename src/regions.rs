//! The regions this server holds, for `GPUCACHE.STATS` without a region and for the work that
//! visits every region (the booking clock, the sweep after a load).
//!
//! Kept in memory from keyspace events instead of a shared key: a key naming every region
//! would live in one cluster slot while regions live in theirs. Every region has a counters
//! hash (`gpucache:{R}:stats:market`); any write to it (a command, replication, AOF replay) or
//! its load from an RDB file (`loaded` event) registers the region, so primaries and replicas
//! both know their regions after a restart.

use crate::keys::RegionKeys;
use crate::store::selected_db;
use redis_module::{Context, NotifyEvent};
use std::collections::BTreeSet;
use std::sync::Mutex;

/// (db, region) pairs. A `Mutex`, not a thread-local: a keyspace event may be raised on any
/// thread that holds the GIL (another module writing from a thread-safe context).
static KNOWN: Mutex<BTreeSet<(i32, String)>> = Mutex::new(BTreeSet::new());

fn known_set() -> std::sync::MutexGuard<'static, BTreeSet<(i32, String)>> {
    KNOWN
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Keyspace-event handler for hash writes and keys loaded from RDB.
pub fn on_counters_written(ctx: &Context, _event_type: NotifyEvent, _event: &str, key: &[u8]) {
    if !key.ends_with(b":stats:market") {
        return;
    }
    let Ok(key) = std::str::from_utf8(key) else {
        return;
    };
    if let Some((region, "stats", "market")) = RegionKeys::parse(key) {
        if crate::core::input::region(region.as_bytes()).is_err() {
            return; // not a name gpucache would give a region
        }
        let entry = (selected_db(ctx), region.to_owned());
        let mut known = known_set();
        if !known.contains(&entry) {
            known.insert(entry);
        }
    }
}

/// The regions held in the db `ctx` works in.
pub fn known(ctx: &Context) -> Vec<String> {
    let db = selected_db(ctx);
    known_set()
        .iter()
        .filter(|(d, _)| *d == db)
        .map(|(_, region)| region.clone())
        .collect()
}

/// Every (db, region) this server holds.
pub fn known_everywhere() -> Vec<(i32, String)> {
    known_set().iter().cloned().collect()
}

/// How many regions this server holds (all dbs).
pub fn count() -> usize {
    known_set().len()
}
