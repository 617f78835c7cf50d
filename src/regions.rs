//! The regions this server holds, for `GPUCACHE.STATS` without a region.
//!
//! Kept in memory from keyspace events instead of a shared key: a key naming every region
//! would live in one cluster slot while regions live in theirs. Every region has a counters
//! hash (`gpucache:{R}:stats:market`); any write to it (a command, replication, AOF replay) or
//! its load from an RDB file (`loaded` event) registers the region, so primaries and replicas
//! both know their regions after a restart.

use crate::keys::RegionKeys;
use redis_module::{Context, NotifyEvent};
use std::cell::RefCell;
use std::collections::BTreeSet;

thread_local! {
    // Keyspace events and commands both run on Redis's main thread.
    static KNOWN: RefCell<BTreeSet<String>> = const { RefCell::new(BTreeSet::new()) };
}

/// Keyspace-event handler for hash writes and keys loaded from RDB.
pub fn on_counters_written(_ctx: &Context, _event_type: NotifyEvent, _event: &str, key: &[u8]) {
    if !key.ends_with(b":stats:market") {
        return;
    }
    let Ok(key) = std::str::from_utf8(key) else {
        return;
    };
    if let Some((region, "stats", "market")) = RegionKeys::parse(key) {
        KNOWN.with(|known| {
            if !known.borrow().contains(region) {
                known.borrow_mut().insert(region.to_owned());
            }
        });
    }
}

pub fn known() -> Vec<String> {
    KNOWN.with(|known| known.borrow().iter().cloned().collect())
}
