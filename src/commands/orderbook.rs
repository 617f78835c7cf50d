//! `GPUCACHE.ORDERBOOK region gpu_type [DEPTH n]`
//!
//! The ask ladder of one GPU type: distinct shown prices ascending, with the number of
//! bookable GPUs at each. Read from the availability index level by level (one `ZRANGE ...
//! LIMIT 0 1` and one `ZCOUNT` per level), so the cost is O(DEPTH x log n) whatever the number
//! of GPUs. All levels carry the type's demand multiplier.

use super::{option_is, unknown_option, Args, Reply};
use crate::core::demand::{self, format_hundredths};
use crate::core::error::{MarketError, MarketResult};
use crate::core::input;
use crate::core::price::Price;
use crate::market::{demand_multiplier_of, Region};
use crate::store::Store;
use redis_module::{RedisString, RedisValue};

pub const DEFAULT_DEPTH: i64 = 10;
pub const MAX_DEPTH: i64 = 1000;

/// Distinct own-price levels of a type, cheapest first: (base price, GPUs at it).
fn own_levels(region: &Region, gpu_type: &str, depth: usize) -> MarketResult<Vec<(Price, i64)>> {
    let key = region.keys.available_own(gpu_type);
    let mut levels = Vec::new();
    let mut lower = String::from("0");
    while levels.len() < depth {
        let Some((_, score)) = region.store.zfirst_from(&key, &lower)? else {
            break;
        };
        let count = region.store.integer(
            "ZCOUNT",
            &[key.as_bytes(), score.as_bytes(), score.as_bytes()],
        )?;
        let Some(price) = score.parse::<f64>().ok().and_then(Price::from_score) else {
            break;
        };
        levels.push((price, count));
        lower = format!("({score}");
    }
    Ok(levels)
}

pub fn command(store: &Store, all: &[RedisString]) -> MarketResult<RedisValue> {
    let mut args = Args::new(all, 2, 4)?;
    let region = Region::new(store, args.region()?);
    let gpu_type = args.id("GPU type")?;
    let mut depth = DEFAULT_DEPTH as usize;
    let options = args.remaining();
    let mut pairs = options.chunks_exact(2);
    for pair in pairs.by_ref() {
        if option_is(pair[0], "DEPTH") {
            depth = input::integer("DEPTH", pair[1], 1, MAX_DEPTH)? as usize;
        } else {
            return Err(unknown_option(pair[0]));
        }
    }
    if let Some(dangling) = pairs.remainder().first() {
        return Err(if option_is(dangling, "DEPTH") {
            MarketError::syntax("option DEPTH needs a value")
        } else {
            unknown_option(dangling)
        });
    }

    let (listed, total) = region.type_counts(&gpu_type)?;
    let multiplier = demand_multiplier_of(listed, total);
    let mut levels = own_levels(&region, &gpu_type, depth)?;
    if let Some(tp) = region.load_type_price(&gpu_type)? {
        let typed = store.zcard(&region.keys.available_typed(&gpu_type))?;
        if typed > 0 {
            match levels.iter_mut().find(|(price, _)| *price == tp.price) {
                Some(level) => level.1 = level.1.saturating_add(typed),
                None => levels.push((tp.price, typed)),
            }
        }
    }
    levels.sort_by_key(|(price, _)| *price);
    levels.truncate(depth);
    let asks = levels
        .into_iter()
        .map(|(base, count)| {
            Reply::new()
                .text("price", demand::apply(base, multiplier).to_string())
                .int("gpus", count)
                .build()
        })
        .collect();
    Ok(Reply::new()
        .text("type", gpu_type)
        .text("demand_multiplier", format_hundredths(multiplier))
        .int("gpus_listed", listed)
        .int("gpus_total", total)
        .value("asks", RedisValue::Array(asks))
        .build())
}
