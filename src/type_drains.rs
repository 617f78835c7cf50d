//! Moving the GPUs a large `GPUCACHE.PRICE` re-priced from `avail-draining` into `avail-type`.
//!
//! `PRICE` on a type with 100,000 own-priced GPUs used to move them all into the type-price
//! index inside the command (~400 ms). Every GPU that showed its own price before a `PRICE`
//! shows the type price after it, so the command instead renames the own-price index to the
//! type's `avail-draining` key (O(1)), which every reader counts as type-priced, and the GPUs
//! reach `avail-type` here, a slice at a time on the module's ticker. Nothing any reader sees
//! changes with a slice (shown prices, counts and the order book are the same before and
//! after), so slices append no stream event; their `ZADD`/`ZREM` are replicated and fire
//! Redis's own keyspace events as usual.
//!
//! The draining key itself records the work left, so a promoted replica or a restarted server
//! resumes it (`resume_region`, from the sweep after a load or promotion). While the type
//! price is gone (expired), draining stops: the GPUs go back to their own prices with the
//! type-price heal (`heal.rs`), which empties the draining key too.

use crate::core::error::MarketResult;
use crate::market::Region;
use crate::slice_queue::{self, Access, Job, SliceQueue};
use crate::store::{selected_db, Store};
use redis_module::logging::RedisLogLevel;
use redis_module::{Context, KeyType};
use std::time::Instant;

/// A type with at most this many own-priced GPUs is moved inside `PRICE` itself.
pub const INLINE_GPUS: i64 = 128;
/// GPUs moved per slice: one slice stays well inside the ticker's budget.
const SLICE_GPUS: usize = 64;

#[derive(Debug, Clone)]
struct Drain {
    db: i32,
    region: String,
    gpu_type: String,
    not_before_ms: i64,
}

impl Drain {
    fn is(&self, db: i32, region: &str, gpu_type: &str) -> bool {
        self.db == db && self.region == region && self.gpu_type == gpu_type
    }
}

impl Job for Drain {
    fn db(&self) -> i32 {
        self.db
    }
    fn db_mut(&mut self) -> &mut i32 {
        &mut self.db
    }
    fn not_before_ms_mut(&mut self) -> &mut i64 {
        &mut self.not_before_ms
    }
}

static DRAINS: SliceQueue<Drain> = SliceQueue::new();

/// Drains queued and not finished (`INFO gpucache`).
pub fn pending() -> usize {
    DRAINS.pending()
}

/// Queues the drain of a type's `avail-draining` key in the selected database (once) and wakes
/// the ticker.
pub fn queue(ctx: &Context, region: &str, gpu_type: &str) {
    let db = selected_db(ctx);
    {
        let mut drains = DRAINS.lock();
        if !drains.iter().any(|d| d.is(db, region, gpu_type)) {
            drains.push_back(Drain {
                db,
                region: region.to_owned(),
                gpu_type: gpu_type.to_owned(),
                not_before_ms: 0,
            });
        }
    }
    crate::ticker::wake(ctx);
}

/// Forgets the drains of a database (`FLUSHDB`, `SWAPDB`) or of all (`None`).
pub fn forget_db(db: Option<i32>) {
    DRAINS.forget_db(db);
}

/// `SWAPDB a b`: each db's drains now run in the other.
pub fn swap_dbs(a: i32, b: i32) {
    DRAINS.swap_dbs(a, b);
}

/// Queues the drain of every type of the region that has a draining key (after a load, a
/// promotion or the region's arrival), in the selected database.
pub fn resume_region(ctx: &Context, region_name: &str) -> MarketResult<usize> {
    let store = Store::new(ctx);
    let region = Region::new(&store, region_name.to_owned());
    let mut resumed = 0;
    for gpu_type in store.set_members(&region.keys.types())? {
        if store.key_type(&region.keys.available_draining(&gpu_type)) == KeyType::ZSet {
            queue(ctx, region_name, &gpu_type);
            resumed += 1;
        }
    }
    Ok(resumed)
}

/// Runs slices of queued drains until `deadline`. Returns whether a drain is left that could
/// run now (the ticker then comes back at once).
pub fn on_tick(ctx: &Context, now_ms: i64, deadline: Instant) -> bool {
    DRAINS.on_tick(ctx, now_ms, deadline, run_slice)
}

/// One slice of a drain. Returns the drain to go on with, if any.
fn run_slice(ctx: &Context, mut job: Drain, now_ms: i64) -> Option<Drain> {
    let store = Store::new(ctx);
    let region = Region::new(&store, job.region.clone());
    match slice_queue::access(&store, region.keys.prefix(), &mut job, now_ms) {
        Access::Now => {}
        Access::Later => return Some(job),
        // The node that serves the region resumes the drain when the region arrives there.
        Access::Elsewhere => return None,
    }
    match slice(&region, &job.gpu_type) {
        Ok(true) => Some(job),
        Ok(false) => None,
        Err(e) => {
            crate::log(
                ctx,
                RedisLogLevel::Warning,
                &format!(
                    "gpucache: region {}: moving re-priced GPUs of type {} into its type-price \
                     index failed: {e}; a repair of the region is queued",
                    job.region,
                    crate::core::input::shown(job.gpu_type.as_bytes(), 64)
                ),
            );
            crate::heal::queue_region_repair(ctx, &job.region);
            None
        }
    }
}

/// Moves up to `SLICE_GPUS` GPUs from the type's draining key into `avail-type`. Returns
/// whether some are left.
fn slice(region: &Region, gpu_type: &str) -> MarketResult<bool> {
    let store = region.store;
    let draining = region.keys.available_draining(gpu_type);
    let typed = region.keys.available_typed(gpu_type);
    let price = region.keys.type_price(gpu_type);
    region.check_key_types(&[
        (draining.as_str(), KeyType::ZSet),
        (typed.as_str(), KeyType::ZSet),
        (price.as_str(), KeyType::Hash),
    ])?;
    if store.key_type(&price) == KeyType::Empty {
        return Ok(false); // the type-price heal takes them back to their own prices
    }
    let ids = store.members_up_to(&draining, f64::INFINITY, SLICE_GPUS)?;
    if ids.is_empty() {
        return Ok(false);
    }
    let mut add: Vec<&[u8]> = Vec::with_capacity(1 + 2 * ids.len());
    add.push(typed.as_bytes());
    let mut remove: Vec<&[u8]> = Vec::with_capacity(1 + ids.len());
    remove.push(draining.as_bytes());
    for id in &ids {
        add.push(b"0");
        add.push(id);
        remove.push(id);
    }
    store.write("ZADD", &add);
    store.write("ZREM", &remove);
    Ok(store.zcard(&draining)? > 0)
}
