//! The regions this server holds, for `GPUCACHE.STATS` without a region.
//!
//! Kept in memory from keyspace events instead of a shared key: a key naming every region
//! would live in one cluster slot while regions live in theirs. Every region has a counters
//! hash (`gpucache:{R}:stats:market`); any write to it (a command, replication, AOF replay) or
//! its load from an RDB file (`loaded` event) registers the region, so primaries and replicas
//! both know their regions after a restart.

use crate::keys::RegionKeys;
use crate::store::selected_db;
use redis_module::{Context, NotifyEvent};
use std::cell::RefCell;
use std::collections::BTreeSet;

thread_local! {
    // Keyspace events and commands both run on Redis's main thread.
    static KNOWN: RefCell<BTreeSet<(i32, String)>> = const { RefCell::new(BTreeSet::new()) };
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
        let entry = (selected_db(ctx), region.to_owned());
        KNOWN.with(|known| {
            if !known.borrow().contains(&entry) {
                known.borrow_mut().insert(entry);
            }
        });
    }
}

/// The regions held in the db `ctx` works in.
pub fn known(ctx: &Context) -> Vec<String> {
    let db = selected_db(ctx);
    KNOWN.with(|known| {
        known
            .borrow()
            .iter()
            .filter(|(d, _)| *d == db)
            .map(|(_, region)| region.clone())
            .collect()
    })
}

/// Every (db, region) this server holds.
pub fn known_everywhere() -> Vec<(i32, String)> {
    KNOWN.with(|known| known.borrow().iter().cloned().collect())
}
