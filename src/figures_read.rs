//! Reads one region's STATS figures from its keys.
//!
//! Every figure comes from a counter, an index cardinality or a time bucket kept by the write
//! commands, so one region costs O(types + 96 buckets), never O(GPUs) or O(bookings). Every
//! read goes through the key API, never `RedisModule_Call`: a cluster replica answers the
//! key-less STATS without `READONLY`, and the cluster would refuse a call's keyed read there.

use crate::core::demand;
use crate::core::error::MarketResult;
use crate::core::figures::{RegionFigures, TypeFigures};
use crate::core::price::Price;
use crate::core::status::GpuStatus;
use crate::core::window;
use crate::market::{demand_multiplier_of, stat, Region};
use std::collections::HashMap;

/// What a read found: the figures, whether the region has its counters hash (without it a sum
/// leaves the region out) and when a key the figures depend on expires.
pub struct RegionRead {
    pub figures: RegionFigures,
    pub has_counters: bool,
    pub deadline: Option<i64>,
}

fn earliest(a: Option<i64>, b: Option<i64>) -> Option<i64> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// The counters hash, in one pass (garbage counts as 0).
fn counters(region: &Region) -> MarketResult<HashMap<Vec<u8>, i64>> {
    let mut counters = HashMap::new();
    region
        .store
        .scan_hash(&region.keys.stats(), |name, value| {
            let number = std::str::from_utf8(value)
                .ok()
                .and_then(|v| v.parse::<i64>().ok())
                .unwrap_or(0);
            counters.insert(name.to_vec(), number);
        })?;
    Ok(counters)
}

fn type_figures(
    region: &Region,
    gpu_type: &str,
    counter: &dyn Fn(&str) -> i64,
    now_ms: i64,
    deadline: &mut Option<i64>,
) -> MarketResult<TypeFigures> {
    let store = region.store;
    let own_key = region.keys.available_own(gpu_type);
    let type_price = region.load_type_price(gpu_type)?;
    if type_price.is_some() {
        // An expired type price reads as missing from then on (on a replica, before any event).
        let expires = store
            .ttl_ms(&region.keys.type_price(gpu_type))
            .map(|ttl| now_ms.saturating_add(ttl));
        *deadline = earliest(*deadline, expires);
    }
    let own_count = store.zcard(&own_key)?;
    // The type-price index and what a PRICE is still draining into it (`type_drains.rs`).
    let typed_entries = region.typed_count(gpu_type)?;
    // Type-priced entries show the type price; while an expired type price awaits healing they
    // are not counted (AVAILABLE skips them too).
    let typed_count = if type_price.is_some() {
        typed_entries
    } else {
        0
    };
    let total = counter(&stat::type_total(gpu_type));
    let own_sum = counter(&stat::own_price_sum(gpu_type));
    let own_min = store
        .zset_first(&own_key)?
        .and_then(|(_, score)| Price::from_score(score));
    let typed_price = type_price.filter(|_| typed_count > 0).map(|tp| tp.price);
    let base_min = match (own_min, typed_price) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    };
    // As `Region::demand_multiplier` counts: both indexes, whatever the type price.
    let multiplier = demand_multiplier_of(own_count.saturating_add(typed_entries), total);
    let base_sum = i128::from(own_sum)
        + i128::from(typed_price.map_or(0, Price::micros)) * i128::from(typed_count);
    Ok(TypeFigures {
        listed: own_count.saturating_add(typed_count),
        total,
        multiplier: Some(multiplier),
        min_price: base_min.map(|p| demand::apply(p, multiplier)),
        shown_sum: base_sum * i128::from(multiplier) / 100,
        type_price: type_price.map(|tp| tp.price),
    })
}

/// (bucket, bookings, volume in micro-units).
type Bucket = (i64, i64, i64);

/// The live buckets of the 24-hour window, and the window key's expiry (a window written by an
/// earlier version has one).
fn window_buckets(region: &Region, now_ms: i64) -> MarketResult<(Vec<Bucket>, Option<i64>)> {
    let mut buckets: HashMap<i64, (i64, i64)> = HashMap::new();
    let ttl = region
        .store
        .scan_hash_ttl(&region.keys.window_24h(), |name, value| {
            let Ok(name) = std::str::from_utf8(name) else {
                return;
            };
            let Some(bucket) =
                window::bucket_of_field(name).filter(|b| window::is_live(*b, now_ms))
            else {
                return;
            };
            let number = std::str::from_utf8(value)
                .ok()
                .and_then(|v| v.parse::<i64>().ok())
                .unwrap_or(0);
            let entry = buckets.entry(bucket).or_default();
            if name.starts_with("count:") {
                entry.0 = number;
            } else if name.starts_with("volume:") {
                entry.1 = number;
            }
        })?;
    let mut live: Vec<Bucket> = buckets
        .into_iter()
        .map(|(bucket, (count, volume))| (bucket, count, volume))
        .collect();
    live.sort_unstable();
    Ok((live, ttl.map(|ttl| now_ms.saturating_add(ttl))))
}

/// Reads the region's figures as they stand at `now_ms`.
pub fn read(region: &Region, now_ms: i64) -> MarketResult<RegionRead> {
    let store = region.store;
    let has_counters = store.key_type(&region.keys.stats()) != redis_module::KeyType::Empty;
    let counters = counters(region)?;
    let counter = |field: &str| counters.get(field.as_bytes()).copied().unwrap_or(0);
    let (window, mut deadline) = window_buckets(region, now_ms)?;
    let mut figures = RegionFigures {
        total: store.hlen(&region.keys.gpu_registry())?,
        bookings_active: store.hlen(&region.keys.booking_registry())?,
        bookings_created: counter(stat::BOOKINGS_CREATED),
        bookings_cancelled: counter(stat::BOOKINGS_CANCELLED),
        bookings_ended: counter(stat::BOOKINGS_ENDED),
        window,
        ..RegionFigures::default()
    };
    for status in GpuStatus::ALL {
        figures
            .by_status
            .insert(status.as_str(), counter(&stat::gpus_with_status(status)));
    }
    for gpu_type in store.set_members(&region.keys.types())? {
        let t = type_figures(region, &gpu_type, &counter, now_ms, &mut deadline)?;
        figures.types.insert(gpu_type, t);
    }
    Ok(RegionRead {
        figures,
        has_counters,
        deadline,
    })
}
