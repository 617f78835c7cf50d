//! `GPUCACHE.AVAILABLE region [TYPE t] [MAXPRICE x] [LIMIT n]`
//!
//! Served from the per-type availability sorted sets: for each type the cheapest `LIMIT`
//! own-priced GPUs (a `ZRANGE ... BYSCORE` with a limit) and, if the type price is within
//! `MAXPRICE`, up to `LIMIT` type-priced ones, merged cheapest first. Cost
//! O(types x (log n + LIMIT)); no scan of the region.

use super::{option_is, unknown_option, Args, Reply};
use crate::core::error::{MarketError, MarketResult};
use crate::core::gpu::{effective_price, GpuRecord};
use crate::core::input;
use crate::core::price::{Price, MAX_PRICE_UNITS};
use crate::core::status::is_listed;
use crate::market::Region;
use crate::store::Store;
use redis_module::{RedisString, RedisValue};
use std::collections::HashMap;

pub const DEFAULT_LIMIT: i64 = 100;
pub const MAX_LIMIT: i64 = 10_000;

struct Query {
    gpu_type: Option<String>,
    max_price: Option<Price>,
    limit: usize,
}

fn parse(args: &mut Args) -> MarketResult<Query> {
    let mut query = Query {
        gpu_type: None,
        max_price: None,
        limit: DEFAULT_LIMIT as usize,
    };
    let options = args.remaining();
    let mut pairs = options.chunks_exact(2);
    for pair in pairs.by_ref() {
        let (name, value) = (pair[0], pair[1]);
        if option_is(name, "TYPE") {
            query.gpu_type = Some(input::id("GPU type", value)?);
        } else if option_is(name, "MAXPRICE") {
            query.max_price = Some(Price::parse(value)?);
        } else if option_is(name, "LIMIT") {
            query.limit = input::integer("LIMIT", value, 1, MAX_LIMIT)? as usize;
        } else {
            return Err(unknown_option(name));
        }
    }
    if let Some(dangling) = pairs.remainder().first() {
        return Err(match dangling {
            d if option_is(d, "TYPE") || option_is(d, "MAXPRICE") || option_is(d, "LIMIT") => {
                MarketError::syntax(format!(
                    "option {} needs a value",
                    String::from_utf8_lossy(d).to_uppercase()
                ))
            }
            d => unknown_option(d),
        });
    }
    Ok(query)
}

struct Offer {
    gpu_id: String,
    price: Price,
    gpu: GpuRecord,
}

/// Walks one sorted set cheapest first, in pages, keeping GPUs that still exist and are listed
/// (a record that expired a moment ago is skipped even before its index entry is healed).
fn collect(
    region: &Region,
    key: &str,
    max_score: &str,
    limit: usize,
    price_of: impl Fn(&GpuRecord) -> Price,
    offers: &mut Vec<Offer>,
) -> MarketResult<()> {
    let mut found = 0;
    let mut offset = 0;
    let page = limit.max(16);
    loop {
        let batch = region
            .store
            .zrange_by_score_page(key, "0", max_score, offset, page)?;
        let exhausted = batch.len() < page;
        offset += batch.len();
        for gpu_id in batch {
            let Some(gpu) = region.load_gpu(&gpu_id).ok().flatten() else {
                continue;
            };
            let provider = region.provider_status(&gpu.provider)?;
            if !is_listed(gpu.status, provider) {
                continue;
            }
            offers.push(Offer {
                price: price_of(&gpu),
                gpu_id,
                gpu,
            });
            found += 1;
            if found == limit {
                return Ok(());
            }
        }
        if exhausted {
            return Ok(());
        }
    }
}

pub fn command(store: &Store, all: &[RedisString]) -> MarketResult<RedisValue> {
    let mut args = Args::new(all, 1, 7)?;
    let region = Region::new(store, args.region()?);
    let query = parse(&mut args)?;
    let max_price = query
        .max_price
        .unwrap_or(Price::from_micros(MAX_PRICE_UNITS * 1_000_000));
    let max_score = max_price.as_score().to_string();

    let types = match &query.gpu_type {
        Some(t) => vec![t.clone()],
        None => store.members("SMEMBERS", &region.keys.types())?,
    };
    let mut offers = Vec::new();
    let mut type_prices = HashMap::new();
    for gpu_type in &types {
        let type_price = region.load_type_price(gpu_type)?;
        type_prices.insert(gpu_type.clone(), type_price);
        collect(
            &region,
            &region.keys.available_own(gpu_type),
            &max_score,
            query.limit,
            |gpu| gpu.own_price,
            &mut offers,
        )?;
        if let Some(tp) = type_price.filter(|tp| tp.price <= max_price) {
            collect(
                &region,
                &region.keys.available_typed(gpu_type),
                "0",
                query.limit,
                |gpu| effective_price(gpu, Some(&tp)).0,
                &mut offers,
            )?;
        }
    }
    offers.retain(|o| o.price <= max_price);
    offers.sort_by(|a, b| a.price.cmp(&b.price).then_with(|| a.gpu_id.cmp(&b.gpu_id)));
    offers.truncate(query.limit);

    let rows = offers
        .into_iter()
        .map(|offer| {
            let mut row = Reply::new()
                .text("gpu_id", offer.gpu_id)
                .text("type", offer.gpu.gpu_type.as_str())
                .text("provider", offer.gpu.provider.as_str())
                .text("price", offer.price.to_string())
                .int("version", offer.gpu.version);
            if let Some(m) = offer.gpu.memory_gb {
                row = row.int("memory_gb", m);
            }
            if let Some(c) = offer.gpu.cores {
                row = row.int("cores", c);
            }
            if let Some(s) = offer.gpu.score {
                row = row.text("score", s.to_string());
            }
            row.build()
        })
        .collect();
    Ok(RedisValue::Array(rows))
}
