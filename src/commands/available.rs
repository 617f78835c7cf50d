//! `GPUCACHE.AVAILABLE region [TYPE t] [MAXPRICE x] [MINMEMORY gb] [MINCORES n]
//!  [SORT PRICE|SCORE] [LIMIT n]`
//!
//! Served from the per-type availability sorted sets, never by scanning the region. For
//! `SORT PRICE` (the default) each type contributes its cheapest `LIMIT` own-priced GPUs
//! (`ZRANGE ... BYSCORE LIMIT`, bounded by `MAXPRICE`) and up to `LIMIT` type-priced ones; for
//! `SORT SCORE` its `LIMIT` best-scoring GPUs from the score index. The per-type lists are merged.
//! Cost: O(types x (log n + LIMIT)) when only `TYPE`, `MAXPRICE` and `LIMIT` filter;
//! `MINMEMORY`/`MINCORES` (and `MAXPRICE` under `SORT SCORE`) are checked while walking the
//! index, so a selective filter walks further, up to every listed GPU of the type.

use super::{option_is, unknown_option, Args, Reply};
use crate::core::demand;
use crate::core::error::{MarketError, MarketResult};
use crate::core::gpu::{effective_price, GpuRecord, TypePrice};
use crate::core::input;
use crate::core::price::{Price, MAX_PRICE_UNITS};
use crate::core::status::is_listed;
use crate::market::Region;
use crate::store::Store;
use redis_module::{RedisString, RedisValue};

pub const DEFAULT_LIMIT: i64 = 100;
pub const MAX_LIMIT: i64 = 10_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SortBy {
    /// Cheapest first.
    Price,
    /// Highest performance score first ("top performing").
    Score,
}

struct Query {
    gpu_type: Option<String>,
    max_price: Price,
    min_memory: Option<i64>,
    min_cores: Option<i64>,
    sort: SortBy,
    limit: usize,
}

fn parse(args: &mut Args) -> MarketResult<Query> {
    let mut query = Query {
        gpu_type: None,
        max_price: Price::from_micros(MAX_PRICE_UNITS * 1_000_000 * 100),
        min_memory: None,
        min_cores: None,
        sort: SortBy::Price,
        limit: DEFAULT_LIMIT as usize,
    };
    let options = args.remaining();
    let mut pairs = options.chunks_exact(2);
    for pair in pairs.by_ref() {
        let (name, value) = (pair[0], pair[1]);
        if option_is(name, "TYPE") {
            query.gpu_type = Some(input::id("GPU type", value)?);
        } else if option_is(name, "MAXPRICE") {
            query.max_price = Price::parse(value)?;
        } else if option_is(name, "MINMEMORY") {
            query.min_memory = Some(input::integer("MINMEMORY", value, 0, 1_000_000)?);
        } else if option_is(name, "MINCORES") {
            query.min_cores = Some(input::integer("MINCORES", value, 0, 10_000_000)?);
        } else if option_is(name, "SORT") {
            query.sort = if option_is(value, "PRICE") {
                SortBy::Price
            } else if option_is(value, "SCORE") {
                SortBy::Score
            } else {
                return Err(MarketError::syntax("SORT must be PRICE or SCORE"));
            };
        } else if option_is(name, "LIMIT") {
            query.limit = input::integer("LIMIT", value, 1, MAX_LIMIT)? as usize;
        } else {
            return Err(unknown_option(name));
        }
    }
    if let Some(dangling) = pairs.remainder().first() {
        let known = ["TYPE", "MAXPRICE", "MINMEMORY", "MINCORES", "SORT", "LIMIT"];
        return Err(if known.iter().any(|k| option_is(dangling, k)) {
            MarketError::syntax(format!(
                "option {} needs a value",
                input::shown(dangling, 64).to_uppercase()
            ))
        } else {
            unknown_option(dangling)
        });
    }
    Ok(query)
}

struct Offer {
    gpu_id: String,
    price: Price,
    gpu: GpuRecord,
}

impl Offer {
    fn performance(&self) -> f64 {
        self.gpu.score.unwrap_or(0.0)
    }
}

/// One sorted-set walk: which key, which score range, which direction.
struct Walk<'a> {
    key: String,
    range: (&'a str, &'a str),
    descending: bool,
}

/// Walks one index in pages, keeping up to `limit` GPUs that still exist, are listed and pass
/// `price_if_wanted` (which prices the GPU or rejects it). A record that expired a moment ago is
/// skipped even before its index entry is healed.
fn collect(
    region: &Region,
    walk: Walk,
    limit: usize,
    price_if_wanted: impl Fn(&GpuRecord) -> Option<Price>,
    offers: &mut Vec<Offer>,
) -> MarketResult<()> {
    let (mut found, mut offset) = (0, 0);
    let page = limit.clamp(16, 1000);
    loop {
        let batch = region.store.zrange_by_score_page(
            &walk.key,
            walk.range,
            walk.descending,
            offset,
            page,
        )?;
        let exhausted = batch.len() < page;
        offset += batch.len();
        for gpu_id in batch {
            let Some(gpu) = region.load_gpu(&gpu_id).ok().flatten() else {
                continue;
            };
            if !is_listed(gpu.status, region.provider_status(&gpu.provider)?) {
                continue;
            }
            let Some(price) = price_if_wanted(&gpu) else {
                continue;
            };
            offers.push(Offer { gpu_id, price, gpu });
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

fn offers_of_type(
    region: &Region,
    query: &Query,
    gpu_type: &str,
    offers: &mut Vec<Offer>,
) -> MarketResult<()> {
    let multiplier = region.demand_multiplier(gpu_type)?;
    let type_price: Option<TypePrice> = region.load_type_price(gpu_type)?;
    let attributes_match = |gpu: &GpuRecord| {
        query
            .min_memory
            .is_none_or(|m| gpu.memory_gb.unwrap_or(0) >= m)
            && query.min_cores.is_none_or(|c| gpu.cores.unwrap_or(0) >= c)
    };
    let shown = |gpu: &GpuRecord| {
        let (base, _) = effective_price(gpu, type_price.as_ref());
        demand::apply(base, multiplier)
    };
    let wanted = |gpu: &GpuRecord| {
        let price = shown(gpu);
        (attributes_match(gpu) && price <= query.max_price).then_some(price)
    };
    match query.sort {
        SortBy::Price => {
            // Highest base price that can still show at most MAXPRICE (the exact check is
            // `wanted`); the bound only keeps the walk short.
            let max_base =
                i128::from(query.max_price.micros()) * 100 / i128::from(multiplier.max(1)) + 1;
            let max_base = Price::from_micros(i64::try_from(max_base).unwrap_or(i64::MAX));
            let bound = max_base.as_score().to_string();
            let own = Walk {
                key: region.keys.available_own(gpu_type),
                range: ("0", &bound),
                descending: false,
            };
            collect(region, own, query.limit, wanted, offers)?;
            if let Some(tp) = type_price {
                if demand::apply(tp.price, multiplier) <= query.max_price {
                    let typed = Walk {
                        key: region.keys.available_typed(gpu_type),
                        range: ("0", "0"),
                        descending: false,
                    };
                    collect(region, typed, query.limit, wanted, offers)?;
                }
            }
        }
        SortBy::Score => {
            let by_score = Walk {
                key: region.keys.available_by_score(gpu_type),
                range: ("-inf", "+inf"),
                descending: true,
            };
            collect(region, by_score, query.limit, wanted, offers)?;
        }
    }
    Ok(())
}

pub fn command(store: &Store, all: &[RedisString]) -> MarketResult<RedisValue> {
    let mut args = Args::new(all, 1, 13)?;
    let region = Region::new(store, args.region()?);
    let query = parse(&mut args)?;
    let types = match &query.gpu_type {
        Some(t) => vec![t.clone()],
        None => store.members("SMEMBERS", &region.keys.types())?,
    };
    let mut offers = Vec::new();
    for gpu_type in &types {
        offers_of_type(&region, &query, gpu_type, &mut offers)?;
    }
    match query.sort {
        SortBy::Price => {
            offers.sort_by(|a, b| a.price.cmp(&b.price).then_with(|| a.gpu_id.cmp(&b.gpu_id)))
        }
        SortBy::Score => offers.sort_by(|a, b| {
            b.performance()
                .total_cmp(&a.performance())
                .then_with(|| a.price.cmp(&b.price))
                .then_with(|| a.gpu_id.cmp(&b.gpu_id))
        }),
    }
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
