//! `GPUCACHE.STATS region`
//!
//! Every figure comes from a counter or an index cardinality kept by the write commands, so the
//! reply costs O(types), not O(GPUs).

use super::{Args, Reply};
use crate::core::error::MarketResult;
use crate::core::gpu::TypePrice;
use crate::core::price::Price;
use crate::core::status::GpuStatus;
use crate::market::{stat, Region};
use crate::store::Store;
use redis_module::{RedisString, RedisValue};

/// Listed-GPU count, minimum and average shown price of one type.
fn type_figures(
    region: &Region,
    gpu_type: &str,
    type_price: Option<TypePrice>,
) -> MarketResult<RedisValue> {
    let store = region.store;
    let own_key = region.keys.available_own(gpu_type);
    let typed_key = region.keys.available_typed(gpu_type);
    let own_count = store.integer("ZCARD", &[own_key.as_bytes()])?;
    // Type-priced entries show the type price; while an expired type price awaits healing they
    // are not counted (AVAILABLE skips them too).
    let typed_count = match type_price {
        Some(_) => store.integer("ZCARD", &[typed_key.as_bytes()])?,
        None => 0,
    };
    let own_sum = store
        .hget(&region.keys.stats(), &stat::own_price_sum(gpu_type))?
        .and_then(|v| String::from_utf8(v).ok())
        .and_then(|v| v.parse::<i64>().ok())
        .unwrap_or(0);
    let own_min = store
        .zfirst(&own_key)?
        .and_then(|(_, score)| Price::from_score(score));
    let typed_price = type_price.filter(|_| typed_count > 0).map(|tp| tp.price);
    let min = match (own_min, typed_price) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    };
    let listed = own_count + typed_count;
    let total_micros = i128::from(own_sum)
        + i128::from(typed_price.map_or(0, Price::micros)) * i128::from(typed_count);
    let average = (listed > 0).then(|| {
        Price::from_micros(i64::try_from(total_micros / i128::from(listed)).unwrap_or(i64::MAX))
    });
    Ok(Reply::new()
        .int("listed", listed)
        .opt_text("min_price", min.map(|p| p.to_string()))
        .opt_text("avg_price", average.map(|p| p.to_string()))
        .opt_text("type_price", type_price.map(|tp| tp.price.to_string()))
        .build())
}

pub fn command(store: &Store, all: &[RedisString]) -> MarketResult<RedisValue> {
    let mut args = Args::new(all, 1, 1)?;
    let region = Region::new(store, args.region()?);
    let total = store.hlen(&region.keys.gpu_registry())?;
    let counter = |field: &str| -> MarketResult<i64> {
        Ok(store
            .hget(&region.keys.stats(), field)?
            .and_then(|v| String::from_utf8(v).ok())
            .and_then(|v| v.parse::<i64>().ok())
            .unwrap_or(0))
    };
    let mut reply = Reply::new()
        .text("region", region.name.as_str())
        .int("gpus_total", total);
    let mut busy = 0;
    for status in GpuStatus::ALL {
        let count = region.status_count(status)?;
        if status == GpuStatus::Busy {
            busy = count;
        }
        reply = reply.int(&format!("gpus_{}", status.as_str()), count);
    }
    let mut types = Reply::new();
    let mut listed = 0;
    for gpu_type in store.members("SMEMBERS", &region.keys.types())? {
        let type_price = region.load_type_price(&gpu_type)?;
        let figures = type_figures(&region, &gpu_type, type_price)?;
        if let RedisValue::OrderedMap(map) = &figures {
            if let Some(RedisValue::Integer(n)) = map.get(&"listed".into()) {
                listed += n;
            }
        }
        types = types.value(&gpu_type, figures);
    }
    let utilisation = if total > 0 {
        busy as f64 / total as f64
    } else {
        0.0
    };
    Ok(reply
        .int("gpus_listed", listed)
        .text("utilisation", format!("{utilisation:.4}"))
        .int(
            "bookings_active",
            store.hlen(&region.keys.booking_registry())?,
        )
        .int("bookings_created", counter(stat::BOOKINGS_CREATED)?)
        .int("bookings_cancelled", counter(stat::BOOKINGS_CANCELLED)?)
        .int("bookings_ended", counter(stat::BOOKINGS_ENDED)?)
        .value("types", types.build())
        .build())
}
