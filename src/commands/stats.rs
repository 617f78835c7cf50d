//! `GPUCACHE.STATS region` and `GPUCACHE.STATS` (every region on this server the caller may
//! read).
//!
//! With a region the figures are read from its keys (`figures_read.rs`). Without one they come
//! from this node's cache of every region's figures (`stats_cache.rs`): the call re-reads the
//! regions that changed within `CALL_BUDGET`, then answers from the running sum (or, for a
//! caller restricted to some regions or with a region on the move, from a sum of the cached
//! figures it may count), so it never reads every region.

use super::{Args, Out, Reply};
use crate::acl::Caller;
use crate::core::demand::format_hundredths;
use crate::core::error::{MarketError, MarketResult};
use crate::core::figures::{Summary, TypeFigures};
use crate::core::figures_cache::CachedSum;
use crate::core::input;
use crate::core::price::Price;
use crate::core::slots::WholeSlots;
use crate::keys::RegionKeys;
use crate::market::Region;
use crate::store::{selected_db, Store};
use redis_module::{ContextFlags, RedisString, RedisValue};
use std::time::Instant;

fn type_reply(figures: &TypeFigures) -> Out {
    let average = (figures.listed > 0).then(|| {
        let avg = figures.shown_sum / i128::from(figures.listed);
        Price::from_micros(i64::try_from(avg).unwrap_or(i64::MAX))
    });
    let mut reply = Reply::new()
        .int("listed", figures.listed)
        .int("total", figures.total)
        .opt_text("min_price", figures.min_price.map(|p| p.to_string()))
        .opt_text("avg_price", average.map(|p| p.to_string()));
    if let Some(m) = figures.multiplier {
        reply = reply
            .text("demand_multiplier", format_hundredths(m))
            .opt_text("type_price", figures.type_price.map(|p| p.to_string()));
    }
    reply.build()
}

/// The reply's fields; `sum` (regions summed and their freshness) only without a region.
fn reply(summary: &Summary, region_label: &str, sum: Option<&CachedSum>) -> Out {
    let mut reply = Reply::new()
        .text("region", region_label)
        .int("gpus_total", summary.total);
    if let Some(sum) = sum {
        reply = reply
            .int("regions", sum.regions)
            .int("stale_regions", sum.stale_regions)
            .int("stale_ms", sum.stale_ms);
    }
    for (status, count) in &summary.by_status {
        reply = reply.int(format!("gpus_{status}"), *count);
    }
    let busy = summary.by_status.get("busy").copied().unwrap_or(0);
    let utilisation = if summary.total > 0 {
        busy as f64 / summary.total as f64
    } else {
        0.0
    };
    let mut types = Reply::new();
    for (gpu_type, figures) in &summary.types {
        types = types.value(gpu_type.clone(), type_reply(figures));
    }
    reply
        .int(
            "gpus_listed",
            summary
                .types
                .values()
                .fold(0i64, |sum, t| sum.saturating_add(t.listed)),
        )
        .text("utilisation", format!("{utilisation:.4}"))
        .int("bookings_active", summary.bookings_active)
        .int("bookings_created", summary.bookings_created)
        .int("bookings_cancelled", summary.bookings_cancelled)
        .int("bookings_ended", summary.bookings_ended)
        .int("bookings_24h", summary.last_24h.bookings)
        .text(
            "volume_24h",
            Price::from_micros(summary.last_24h.volume_micros).to_string(),
        )
        .value("types", types.build())
        .build()
}

/// On a cluster master, the slots this node holds whole (`None`: not in a cluster, or a
/// replica, which holds its master's slots whole). A master that cannot tell holds none.
fn whole_slots(store: &Store) -> Option<WholeSlots> {
    let flags = store.ctx().get_flags();
    if !flags.contains(ContextFlags::CLUSTER) || flags.contains(ContextFlags::SLAVE) {
        return None;
    }
    let nodes = match store.ctx().call("CLUSTER", &["NODES"]) {
        Ok(RedisValue::SimpleString(text) | RedisValue::BulkString(text)) => text,
        Ok(RedisValue::StringBuffer(bytes)) => String::from_utf8_lossy(&bytes).into_owned(),
        Ok(RedisValue::BulkRedisString(text)) => text.to_string_lossy(),
        _ => String::new(),
    };
    Some(WholeSlots::of_myself(&nodes).unwrap_or_default())
}

/// Every region of the caller's db the caller may read, from the cache.
fn every_region(store: &Store) -> CachedSum {
    let ctx = store.ctx();
    let db = selected_db(ctx);
    crate::stats_cache::refresh_db(ctx, db, Instant::now() + crate::stats_cache::CALL_BUDGET);
    let now = store.now_ms();
    // Only the regions the caller may read: Redis checked no key of this command.
    let caller = Caller::of(ctx);
    // A master also holds part of a region whose slot is moving to or from it: that region is
    // counted where it is whole, never here in part.
    let whole = whole_slots(store);
    let everything = caller.reads_every_key(ctx);
    let mut cache = crate::stats_cache::lock();
    let all_whole = whole
        .as_ref()
        .is_none_or(|w| cache.all_slots(db, |slot| w.holds_whole(slot)));
    if everything && all_whole {
        return cache.sum(db, now);
    }
    cache.sum_of(db, now, |region, slot| {
        whole.as_ref().is_none_or(|w| w.holds_whole(slot))
            && (caller.may_read(region) || caller.may_read(&RegionKeys::new(region).stats()))
    })
}

pub fn command(store: &Store, all: &[RedisString]) -> MarketResult<Out> {
    let mut args = Args::new(all, 0, 1)?;
    match args.next_arg() {
        // `*` is no region name. Sent as an argument it is also routed as a key (to the slot
        // of `*`) by cluster clients, so it cannot mean "every region on this node".
        Some(b"*") => Err(MarketError::syntax(
            "'*' is not a region: send GPUCACHE.STATS with no argument for every region on this server",
        )),
        Some(region) => {
            let now = store.now_ms();
            let region = Region::new(store, input::region(region)?);
            let read = crate::figures_read::read(&region, now)?;
            Ok(reply(&read.figures.summary(now), &region.name, None))
        }
        None => {
            let sum = every_region(store);
            Ok(reply(&sum.summary, "*", Some(&sum)))
        }
    }
}
