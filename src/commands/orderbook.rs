//! `GPUCACHE.ORDERBOOK region gpu_type [DEPTH n]`
//!
//! The ask ladder of one GPU type: distinct shown prices ascending, with the number of
//! bookable GPUs at each. Read from the availability index in one walk with the key API's range
//! iterator (a level of more than `LEVEL_WALK_LIMIT` GPUs is counted with `ZCOUNT`), so the cost
//! is O(DEPTH x log n) whatever the number of GPUs. All levels carry the type's demand
//! multiplier.

use super::{option_is, repeated_option, unknown_option, Args, Out, Reply};
use crate::core::demand::{self, format_hundredths};
use crate::core::error::{MarketError, MarketResult};
use crate::core::input;
use crate::core::price::Price;
use crate::market::{demand_multiplier_of, Region};
use crate::store::Store;
use redis_module::RedisString;

pub const DEFAULT_DEPTH: i64 = 10;
pub const MAX_DEPTH: i64 = 1000;

/// GPUs counted one by one at a level before `ZCOUNT` takes over: keeps a level of thousands
/// of GPUs at one price at O(log n) while small levels cost no command at all. Reading a member
/// costs about a twentieth of a `ZCOUNT` call. Server time per ORDERBOOK (DEPTH 10): levels of
/// ~13 GPUs (10,000 GPUs) 36 µs at 16 vs 61 µs at 4; levels of ~300 (250,000 GPUs) 95 µs at 16,
/// 62 µs at 4, 189 µs at 64.
const LEVEL_WALK_LIMIT: i64 = 16;

/// Distinct own-price levels of a type, cheapest first: (base price, GPUs at it).
///
/// One walk over the own-price index, grouping equal scores; a level larger than
/// `LEVEL_WALK_LIMIT` is counted with `ZCOUNT` and the walk resumes after it, so the cost stays
/// O(DEPTH x log n).
fn own_levels(region: &Region, gpu_type: &str, depth: usize) -> MarketResult<Vec<(Price, i64)>> {
    let key = region.keys.available_own(gpu_type);
    let mut scores: Vec<(f64, i64)> = Vec::new();
    let mut lower = (0.0, false);
    loop {
        let mut crowded = None;
        region
            .store
            .zwalk(&key, lower, f64::INFINITY, false, |_, score| {
                match scores.last_mut() {
                    Some((level, count)) if *level == score => {
                        *count += 1;
                        if *count > LEVEL_WALK_LIMIT {
                            crowded = Some(score);
                            return false;
                        }
                    }
                    _ => {
                        if scores.len() == depth {
                            return false;
                        }
                        scores.push((score, 1));
                    }
                }
                true
            })?;
        let Some(score) = crowded else {
            break;
        };
        // Shortest text that reads back as the same double.
        let text = score.to_string();
        let count = region.store.integer(
            "ZCOUNT",
            &[key.as_bytes(), text.as_bytes(), text.as_bytes()],
        )?;
        if let Some(level) = scores.last_mut() {
            level.1 = count;
        }
        if scores.len() == depth {
            break;
        }
        lower = (score, true);
    }
    // A score no price can have (written by hand) ends the ladder there.
    Ok(scores
        .into_iter()
        .map_while(|(score, count)| Some((Price::from_score(score)?, count)))
        .collect())
}

pub fn command(store: &Store, all: &[RedisString]) -> MarketResult<Out> {
    // DEPTH once, plus one more pair: a repeated DEPTH is reported as such.
    let mut args = Args::new(all, 2, 6)?;
    let region = Region::new(store, args.region()?);
    let gpu_type = args.id("GPU type")?;
    let mut depth = None;
    let options = args.remaining();
    let mut pairs = options.chunks_exact(2);
    for pair in pairs.by_ref() {
        if !option_is(pair[0], "DEPTH") {
            return Err(unknown_option(pair[0]));
        }
        let value = input::integer("DEPTH", pair[1], 1, MAX_DEPTH)? as usize;
        if depth.replace(value).is_some() {
            return Err(repeated_option("DEPTH"));
        }
    }
    let depth = depth.unwrap_or(DEFAULT_DEPTH as usize);
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
        let typed = region.typed_count(&gpu_type)?;
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
        .value("asks", Out::Array(asks))
        .build())
}
