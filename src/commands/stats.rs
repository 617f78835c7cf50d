//! `GPUCACHE.STATS region` and `GPUCACHE.STATS` (every region on this server the caller may
//! read).
//!
//! Every figure comes from a counter, an index cardinality or a time bucket kept by the write
//! commands, so one region costs O(types + 96 buckets), never O(GPUs) or O(bookings). Every
//! read goes through the key API, never `RedisModule_Call`: a cluster replica answers the
//! key-less form without `READONLY`, and the cluster would refuse a call's keyed read there.

use super::{Args, Out, Reply};
use crate::acl::Caller;
use crate::core::demand::{self, format_hundredths};
use crate::core::error::{MarketError, MarketResult};
use crate::core::input;
use crate::core::price::Price;
use crate::core::status::GpuStatus;
use crate::core::window::{self, WindowTotals};
use crate::keys::RegionKeys;
use crate::market::{stat, Region};
use crate::store::Store;
use redis_module::RedisString;
use std::collections::BTreeMap;

/// One type's figures in one region (or summed over regions).
#[derive(Debug, Clone, Default)]
struct TypeFigures {
    listed: i64,
    total: i64,
    /// Demand multiplier; `None` once figures of several regions are summed.
    multiplier: Option<u32>,
    min_price: Option<Price>,
    /// Sum of the shown prices of listed GPUs, micro-units.
    shown_sum: i128,
    type_price: Option<Price>,
}

impl TypeFigures {
    fn merge(&mut self, other: &TypeFigures) {
        self.listed = self.listed.saturating_add(other.listed);
        self.total = self.total.saturating_add(other.total);
        self.multiplier = None;
        self.min_price = match (self.min_price, other.min_price) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        self.shown_sum = self.shown_sum.saturating_add(other.shown_sum);
        self.type_price = None;
    }

    fn reply(&self) -> Out {
        let average = (self.listed > 0).then(|| {
            let avg = self.shown_sum / i128::from(self.listed);
            Price::from_micros(i64::try_from(avg).unwrap_or(i64::MAX))
        });
        let mut reply = Reply::new()
            .int("listed", self.listed)
            .int("total", self.total)
            .opt_text("min_price", self.min_price.map(|p| p.to_string()))
            .opt_text("avg_price", average.map(|p| p.to_string()));
        if let Some(m) = self.multiplier {
            reply = reply
                .text("demand_multiplier", format_hundredths(m))
                .opt_text("type_price", self.type_price.map(|p| p.to_string()));
        }
        reply.build()
    }
}

fn counter(region: &Region, field: &str) -> MarketResult<i64> {
    Ok(region
        .store
        .hget(&region.keys.stats(), field)?
        .and_then(|v| String::from_utf8(v).ok())
        .and_then(|v| v.parse::<i64>().ok())
        .unwrap_or(0))
}

fn type_figures(region: &Region, gpu_type: &str) -> MarketResult<TypeFigures> {
    let store = region.store;
    let own_key = region.keys.available_own(gpu_type);
    let type_price = region.load_type_price(gpu_type)?;
    let own_count = store.zcard(&own_key)?;
    // Type-priced entries show the type price; while an expired type price awaits healing they
    // are not counted (AVAILABLE skips them too).
    let typed_count = match type_price {
        Some(_) => region.typed_count(gpu_type)?,
        None => 0,
    };
    let own_sum = counter(region, &stat::own_price_sum(gpu_type))?;
    let own_min = store
        .zset_first(&own_key)?
        .and_then(|(_, score)| Price::from_score(score));
    let typed_price = type_price.filter(|_| typed_count > 0).map(|tp| tp.price);
    let base_min = match (own_min, typed_price) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    };
    let multiplier = region.demand_multiplier(gpu_type)?;
    let base_sum = i128::from(own_sum)
        + i128::from(typed_price.map_or(0, Price::micros)) * i128::from(typed_count);
    Ok(TypeFigures {
        listed: own_count.saturating_add(typed_count),
        total: counter(region, &stat::type_total(gpu_type))?,
        multiplier: Some(multiplier),
        min_price: base_min.map(|p| demand::apply(p, multiplier)),
        shown_sum: base_sum * i128::from(multiplier) / 100,
        type_price: type_price.map(|tp| tp.price),
    })
}

fn window_totals(region: &Region, now_ms: i64) -> MarketResult<WindowTotals> {
    let buckets: Vec<i64> = window::live_buckets(now_ms).collect();
    let fields: Vec<String> = buckets
        .iter()
        .flat_map(|b| [window::count_field(*b), window::volume_field(*b)])
        .collect();
    let names: Vec<&str> = fields.iter().map(String::as_str).collect();
    let values = region.store.hmget(&region.keys.window_24h(), &names)?;
    let number = |i: usize| {
        values
            .get(i)
            .and_then(|v| v.as_deref())
            .and_then(|v| std::str::from_utf8(v).ok())
            .and_then(|v| v.parse::<i64>().ok())
            .unwrap_or(0)
    };
    Ok(window::totals(
        buckets
            .iter()
            .enumerate()
            .map(|(i, b)| (*b, number(2 * i), number(2 * i + 1))),
        now_ms,
    ))
}

/// Everything STATS reports for one region, as numbers, so regions can be summed.
#[derive(Debug, Clone, Default)]
struct RegionFigures {
    total: i64,
    by_status: BTreeMap<&'static str, i64>,
    bookings_active: i64,
    bookings_created: i64,
    bookings_cancelled: i64,
    bookings_ended: i64,
    last_24h: WindowTotals,
    types: BTreeMap<String, TypeFigures>,
}

impl RegionFigures {
    fn read(region: &Region, now_ms: i64) -> MarketResult<RegionFigures> {
        let store = region.store;
        let mut figures = RegionFigures {
            total: store.hlen(&region.keys.gpu_registry())?,
            bookings_active: store.hlen(&region.keys.booking_registry())?,
            bookings_created: counter(region, stat::BOOKINGS_CREATED)?,
            bookings_cancelled: counter(region, stat::BOOKINGS_CANCELLED)?,
            bookings_ended: counter(region, stat::BOOKINGS_ENDED)?,
            last_24h: window_totals(region, now_ms)?,
            ..RegionFigures::default()
        };
        for status in GpuStatus::ALL {
            figures
                .by_status
                .insert(status.as_str(), region.status_count(status)?);
        }
        for gpu_type in store.set_members(&region.keys.types())? {
            let t = type_figures(region, &gpu_type)?;
            figures.types.insert(gpu_type, t);
        }
        Ok(figures)
    }

    fn merge(&mut self, other: &RegionFigures) {
        self.total = self.total.saturating_add(other.total);
        for (status, count) in &other.by_status {
            let entry = self.by_status.entry(status).or_default();
            *entry = entry.saturating_add(*count);
        }
        self.bookings_active = self.bookings_active.saturating_add(other.bookings_active);
        self.bookings_created = self.bookings_created.saturating_add(other.bookings_created);
        self.bookings_cancelled = self
            .bookings_cancelled
            .saturating_add(other.bookings_cancelled);
        self.bookings_ended = self.bookings_ended.saturating_add(other.bookings_ended);
        self.last_24h.bookings = self
            .last_24h
            .bookings
            .saturating_add(other.last_24h.bookings);
        self.last_24h.volume_micros = self
            .last_24h
            .volume_micros
            .saturating_add(other.last_24h.volume_micros);
        for (gpu_type, figures) in &other.types {
            self.types
                .entry(gpu_type.clone())
                .and_modify(|t| t.merge(figures))
                .or_insert_with(|| TypeFigures {
                    multiplier: None,
                    type_price: None,
                    ..figures.clone()
                });
        }
    }

    fn reply(&self, region_label: &str, regions: usize) -> Out {
        let mut reply = Reply::new()
            .text("region", region_label)
            .int("gpus_total", self.total);
        if region_label == "*" {
            reply = reply.int("regions", regions as i64);
        }
        for (status, count) in &self.by_status {
            reply = reply.int(format!("gpus_{status}"), *count);
        }
        let busy = self.by_status.get("busy").copied().unwrap_or(0);
        let utilisation = if self.total > 0 {
            busy as f64 / self.total as f64
        } else {
            0.0
        };
        let mut types = Reply::new();
        for (gpu_type, figures) in &self.types {
            types = types.value(gpu_type.clone(), figures.reply());
        }
        reply
            .int(
                "gpus_listed",
                self.types
                    .values()
                    .fold(0i64, |sum, t| sum.saturating_add(t.listed)),
            )
            .text("utilisation", format!("{utilisation:.4}"))
            .int("bookings_active", self.bookings_active)
            .int("bookings_created", self.bookings_created)
            .int("bookings_cancelled", self.bookings_cancelled)
            .int("bookings_ended", self.bookings_ended)
            .int("bookings_24h", self.last_24h.bookings)
            .text(
                "volume_24h",
                Price::from_micros(self.last_24h.volume_micros).to_string(),
            )
            .value("types", types.build())
            .build()
    }
}

pub fn command(store: &Store, all: &[RedisString]) -> MarketResult<Out> {
    let mut args = Args::new(all, 0, 1)?;
    let now = store.now_ms();
    match args.next_arg() {
        // `*` is no region name. Sent as an argument it is also routed as a key (to the slot
        // of `*`) by cluster clients, so it cannot mean "every region on this node".
        Some(b"*") => Err(MarketError::syntax(
            "'*' is not a region: send GPUCACHE.STATS with no argument for every region on this server",
        )),
        Some(region) => {
            let region = Region::new(store, input::region(region)?);
            Ok(RegionFigures::read(&region, now)?.reply(&region.name, 1))
        }
        None => {
            // Only the regions the caller may read: Redis checked no key of this command.
            let caller = Caller::of(store.ctx());
            // A master also holds part of a region whose slot is moving to or from it: that
            // region is counted where it is whole, never here in part. (A replica holds its
            // master's slots whole.)
            let moving_here_or_away = !store
                .ctx()
                .get_flags()
                .contains(redis_module::ContextFlags::SLAVE);
            let mut sum = RegionFigures::default();
            let mut regions = 0;
            for name in crate::regions::known(store.ctx()) {
                let keys = RegionKeys::new(&name);
                if !caller.may_read(&name) && !caller.may_read(&keys.stats()) {
                    continue;
                }
                if store.key_type(&keys.stats()) == redis_module::KeyType::Empty {
                    continue;
                }
                if moving_here_or_away && store.region_is_whole_here(keys.prefix()).is_err() {
                    continue;
                }
                let region = Region::new(store, name);
                sum.merge(&RegionFigures::read(&region, now)?);
                regions += 1;
            }
            Ok(sum.reply("*", regions))
        }
    }
}
