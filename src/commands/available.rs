//! `GPUCACHE.AVAILABLE region [TYPE t] [MAXPRICE x] [MINMEMORY gb] [MINCORES n]
//!  [SORT PRICE|SCORE] [LIMIT n]`
//!
//! Served from the per-type availability sorted sets, never by scanning the region. Each type
//! opens one walk per index (`SORT PRICE`: its own-price set bounded by `MAXPRICE`, plus its
//! type-price set; `SORT SCORE`: its score set, best first), ranked by the price each entry shows
//! (or its score) straight from the index. The walks are merged lazily, and a GPU record is read
//! only when its entry comes out on top, until `LIMIT` GPUs pass the filters: O(types x log n +
//! LIMIT) record reads when only `TYPE`, `MAXPRICE` and `LIMIT` filter. `MINMEMORY`/`MINCORES`
//! (and `MAXPRICE` under `SORT SCORE`) are checked on the records, so a selective filter walks
//! further, up to every listed GPU of the type.
//!
//! While a large `PRICE` drains (`type_drains.rs`), a type has a third price source, its
//! `avail-draining` set, ranked at the type price like `avail-type`. Its members come in the
//! order of the own prices they had before that `PRICE` (ties by id), not in id order, so
//! among the GPUs at the type price the merge yields the two sets interleaved: at each step
//! the lower id of the two sets' next members. Each set's own order is kept, and every GPU
//! at the type price still comes before every dearer one; once the drain is over the order
//! is ascending id again.

use super::{option_is, repeated_option, unknown_option, Args, Out, Reply};
use crate::core::demand;
use crate::core::error::{MarketError, MarketResult};
use crate::core::gpu::{effective_price, GpuRecord, TypePrice};
use crate::core::input;
use crate::core::price::{Price, MAX_PRICE_UNITS};
use crate::core::status::{GpuStatus, ProviderStatus};
use crate::market::{demand_multiplier_of, Region};
use crate::store::{Store, ZCursor};
use redis_module::RedisString;
use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};

pub const DEFAULT_LIMIT: i64 = 100;

/// Searches that stopped at `gpucache.search-max-skips` (`INFO gpucache`).
static SEARCHES_CUT_SHORT: AtomicU64 = AtomicU64::new(0);

pub fn searches_cut_short() -> u64 {
    SEARCHES_CUT_SHORT.load(Ordering::Relaxed)
}
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
    let mut given: Vec<&'static str> = Vec::with_capacity(6);
    for pair in pairs.by_ref() {
        let (name, value) = (pair[0], pair[1]);
        let option = if option_is(name, "TYPE") {
            query.gpu_type = Some(input::id("GPU type", value)?);
            "TYPE"
        } else if option_is(name, "MAXPRICE") {
            query.max_price = Price::parse(value)?;
            "MAXPRICE"
        } else if option_is(name, "MINMEMORY") {
            query.min_memory = Some(input::integer("MINMEMORY", value, 0, 1_000_000)?);
            "MINMEMORY"
        } else if option_is(name, "MINCORES") {
            query.min_cores = Some(input::integer("MINCORES", value, 0, 10_000_000)?);
            "MINCORES"
        } else if option_is(name, "SORT") {
            query.sort = if option_is(value, "PRICE") {
                SortBy::Price
            } else if option_is(value, "SCORE") {
                SortBy::Score
            } else {
                return Err(MarketError::syntax("SORT must be PRICE or SCORE"));
            };
            "SORT"
        } else if option_is(name, "LIMIT") {
            query.limit = input::integer("LIMIT", value, 1, MAX_LIMIT)? as usize;
            "LIMIT"
        } else {
            return Err(unknown_option(name));
        };
        if given.contains(&option) {
            return Err(repeated_option(option));
        }
        given.push(option);
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

/// Where a source's entries come from and how an entry's index score ranks it.
#[derive(Clone, Copy)]
enum Ranking {
    /// Own-price index: the score is the base price; the type's multiplier applies.
    OwnPrice { multiplier: u32 },
    /// Type-price index: every entry shows the same price.
    TypePrice { shown: Price },
    /// Performance-score index, best first.
    Score,
}

/// Entries of one score read ahead of a descending walk before the walk switches to an ascending
/// walk of that score (see `Source::next_best`): small ties cost no extra iterator, a tie of
/// thousands costs one more O(log n) start instead of a read of the whole tie.
const TIE_LOOKAHEAD: usize = 16;

/// One index walked lazily, one entry at a time, cheapest (or best) entry first; entries of equal
/// rank come out in ascending GPU id order, as the merge across sources orders them.
struct Source<'a> {
    key: String,
    range: (f64, f64),
    descending: bool,
    ranking: Ranking,
    /// Opened at the first `next`; `None` after that only if the walk could not start.
    cursor: Option<ZCursor<'a>>,
    opened: bool,
    /// Descending walks only: the rest of the current tie, in ascending id order.
    ahead: VecDeque<(String, f64)>,
    /// Descending walks only: the entry read after the current tie (the next tie's first).
    peeked: Option<(String, f64)>,
    /// Descending walks only: an ascending walk of one crowded score, and that score.
    tie: Option<(ZCursor<'a>, f64)>,
}

impl<'a> Source<'a> {
    fn new(key: String, range: (f64, f64), ranking: Ranking) -> Source<'a> {
        Source {
            key,
            range,
            descending: matches!(ranking, Ranking::Score),
            ranking,
            cursor: None,
            opened: false,
            ahead: VecDeque::new(),
            peeked: None,
            tie: None,
        }
    }

    /// The next entry and its rank (smaller ranks first), read lazily from the index.
    fn next(&mut self, store: &Store<'a>) -> MarketResult<Option<(i128, String)>> {
        if !self.opened {
            self.opened = true;
            self.cursor = Some(store.zcursor(&self.key, self.range, self.descending)?);
        }
        let entry = if self.descending {
            self.next_best(store)?
        } else {
            // An ascending walk yields equal scores in ascending member order already.
            self.cursor.as_mut().and_then(ZCursor::next_member)
        };
        let Some((gpu_id, score)) = entry else {
            return Ok(None);
        };
        let rank = match self.ranking {
            Ranking::OwnPrice { multiplier } => {
                let base = Price::from_score(score).unwrap_or(Price::ZERO);
                i128::from(demand::apply(base, multiplier).micros())
            }
            Ranking::TypePrice { shown } => i128::from(shown.micros()),
            Ranking::Score => score_rank(score),
        };
        Ok(Some((rank, gpu_id)))
    }

    /// The next entry of a descending walk, ties in ascending member order. The key API's
    /// descending iterator yields equal scores in descending member order, so each score's
    /// entries are read ahead (up to `TIE_LOOKAHEAD`) and handed out reversed; a larger tie is
    /// walked again ascending over that one score, and the descending walk resumes below it.
    fn next_best(&mut self, store: &Store<'a>) -> MarketResult<Option<(String, f64)>> {
        loop {
            if let Some(entry) = self.ahead.pop_front() {
                return Ok(Some(entry));
            }
            if let Some((walk, score)) = self.tie.as_mut() {
                if let Some(entry) = walk.next_member() {
                    return Ok(Some(entry));
                }
                let score = *score;
                self.tie = None;
                // Below the crowded score: `next_down` makes the inclusive bound exclusive.
                // Nothing is below -inf (and a NaN bound would be no range at all).
                if score == f64::NEG_INFINITY || score.is_nan() || score <= self.range.0 {
                    return Ok(None);
                }
                self.cursor =
                    Some(store.zcursor(&self.key, (self.range.0, score.next_down()), true)?);
                continue;
            }
            let Some(cursor) = self.cursor.as_mut() else {
                return Ok(None);
            };
            let Some(first) = self.peeked.take().or_else(|| cursor.next_member()) else {
                return Ok(None);
            };
            let score = first.1;
            let mut tie = vec![first];
            let mut crowded = false;
            while let Some(entry) = cursor.next_member() {
                if entry.1 != score {
                    self.peeked = Some(entry);
                    break;
                }
                tie.push(entry);
                if tie.len() > TIE_LOOKAHEAD {
                    crowded = true;
                    break;
                }
            }
            if crowded {
                // Close the descending walk before the same key is opened again.
                self.cursor = None;
                self.tie = Some((store.zcursor(&self.key, (score, score), false)?, score));
                continue;
            }
            self.ahead.extend(tie.into_iter().rev());
        }
    }
}

/// A performance score's rank, best first: exact (a total order over every double, so two
/// scores rank equal only when they are equal; -0 counts as 0).
fn score_rank(score: f64) -> i128 {
    let score = if score == 0.0 { 0.0 } else { score };
    let bits = score.to_bits() as i64;
    // The order `f64::total_cmp` uses: flip the magnitude bits of negative numbers.
    let ordered = bits ^ (((bits >> 63) as u64) >> 1) as i64;
    -i128::from(ordered)
}

/// What one type contributes: its multiplier and type price, for pricing loaded records.
struct TypeContext {
    multiplier: u32,
    type_price: Option<TypePrice>,
}

fn sources_of_type(
    region: &Region,
    query: &Query,
    gpu_type: &str,
    context: &TypeContext,
    sources: &mut Vec<Source<'_>>,
) {
    match query.sort {
        SortBy::Price => {
            // Highest base price that can still show at most MAXPRICE; the exact check happens
            // on the loaded record, the bound only keeps the walk short.
            let max_base = i128::from(query.max_price.micros()) * 100
                / i128::from(context.multiplier.max(1))
                + 1;
            let max_base = Price::from_micros(i64::try_from(max_base).unwrap_or(i64::MAX));
            sources.push(Source::new(
                region.keys.available_own(gpu_type),
                (0.0, max_base.as_score()),
                Ranking::OwnPrice {
                    multiplier: context.multiplier,
                },
            ));
            if let Some(tp) = context.type_price {
                let shown = demand::apply(tp.price, context.multiplier);
                if shown <= query.max_price {
                    sources.push(Source::new(
                        region.keys.available_typed(gpu_type),
                        (0.0, 0.0),
                        Ranking::TypePrice { shown },
                    ));
                    // Scored by former own prices, which no longer rank anything.
                    sources.push(Source::new(
                        region.keys.available_draining(gpu_type),
                        (f64::NEG_INFINITY, f64::INFINITY),
                        Ranking::TypePrice { shown },
                    ));
                }
            }
        }
        SortBy::Score => sources.push(Source::new(
            region.keys.available_by_score(gpu_type),
            (f64::NEG_INFINITY, f64::INFINITY),
            Ranking::Score,
        )),
    }
}

/// Merges every source in rank order and loads records only for the entries that come out on
/// top, until `LIMIT` offers pass the filters: O(types x log n) to open the walk plus a record
/// read per entry taken, instead of `LIMIT` record reads per type.
fn merged_offers<'c>(
    region: &Region<'_, 'c>,
    query: &Query,
    contexts: &HashMap<String, TypeContext>,
    mut sources: Vec<Source<'c>>,
) -> MarketResult<Vec<Offer>> {
    let store = region.store;
    let mut heap = BinaryHeap::new();
    for (index, source) in sources.iter_mut().enumerate() {
        if let Some((rank, gpu_id)) = source.next(store)? {
            heap.push(Reverse((rank, gpu_id, index)));
        }
    }
    let mut providers: HashMap<String, bool> = HashMap::new();
    let mut offers = Vec::new();
    let mut skips_left = crate::config::get(&crate::config::SEARCH_MAX_SKIPS);
    while let Some(Reverse((_, gpu_id, index))) = heap.pop() {
        if skips_left <= 0 {
            SEARCHES_CUT_SHORT.fetch_add(1, Ordering::Relaxed);
            break;
        }
        // Counted back below for an entry that becomes an offer.
        skips_left -= 1;
        if let Some(source) = sources.get_mut(index) {
            if let Some((rank, next_id)) = source.next(store)? {
                heap.push(Reverse((rank, next_id, index)));
            }
        }
        // A record that expired a moment ago is skipped even before its entry is healed.
        let Some(gpu) = region.load_gpu(&gpu_id).ok().flatten() else {
            continue;
        };
        let online = match providers.get(&gpu.provider) {
            Some(online) => *online,
            None => {
                let online = region.provider_status(&gpu.provider)? == ProviderStatus::Online;
                providers.insert(gpu.provider.clone(), online);
                online
            }
        };
        if !online || gpu.status != GpuStatus::Available {
            continue;
        }
        let attributes_match = query
            .min_memory
            .is_none_or(|m| gpu.memory_gb.unwrap_or(0) >= m)
            && query.min_cores.is_none_or(|c| gpu.cores.unwrap_or(0) >= c);
        let Some(context) = contexts.get(&gpu.gpu_type) else {
            continue;
        };
        let (base, _) = effective_price(&gpu, context.type_price.as_ref());
        let price = demand::apply(base, context.multiplier);
        if !attributes_match || price > query.max_price {
            continue;
        }
        skips_left += 1;
        offers.push(Offer { gpu_id, price, gpu });
        if offers.len() == query.limit {
            break;
        }
    }
    Ok(offers)
}

pub fn command(store: &Store, all: &[RedisString]) -> MarketResult<Out> {
    // Every option once, plus one more pair: a repeated option is reported as such.
    let mut args = Args::new(all, 1, 15)?;
    let region = Region::new(store, args.region()?);
    let query = parse(&mut args)?;
    let types = match &query.gpu_type {
        Some(t) => vec![t.clone()],
        None => store.members("SMEMBERS", &region.keys.types())?,
    };
    // Over several types, their totals come from one pass over the counters hash.
    let totals = if types.len() > 1 {
        Some(region.type_totals(&types)?)
    } else {
        None
    };
    let mut contexts = HashMap::new();
    let mut sources = Vec::new();
    for (i, gpu_type) in types.iter().enumerate() {
        let multiplier = match totals.as_ref().and_then(|t| t.get(i)) {
            Some(total) => demand_multiplier_of(region.listed_count(gpu_type)?, *total),
            None => region.demand_multiplier(gpu_type)?,
        };
        let context = TypeContext {
            multiplier,
            type_price: region.load_type_price(gpu_type)?,
        };
        sources_of_type(&region, &query, gpu_type, &context, &mut sources);
        contexts.insert(gpu_type.clone(), context);
    }
    let offers = merged_offers(&region, &query, &contexts, sources)?;

    let rows = offers
        .into_iter()
        .map(|offer| {
            // In name order (what `Reply::build` sorts to), so the sort has nothing to move.
            let mut row = Reply::new();
            if let Some(c) = offer.gpu.cores {
                row = row.int("cores", c);
            }
            row = row.text("gpu_id", offer.gpu_id);
            if let Some(m) = offer.gpu.memory_gb {
                row = row.int("memory_gb", m);
            }
            row = row
                .text("price", offer.price.to_string())
                .text("provider", offer.gpu.provider.as_str());
            if let Some(s) = offer.gpu.score {
                row = row.text("score", s.to_string());
            }
            row = row
                .text("type", offer.gpu.gpu_type.as_str())
                .int("version", offer.gpu.version);
            row.build()
        })
        .collect();
    Ok(Out::Array(rows))
}
