//! Moving a provider's GPUs into or out of the availability index after `GPUCACHE.PROVIDER`.
//!
//! A provider may hold 100,000 GPUs in a region; moving them all inside the command would hold
//! the server for seconds. `PROVIDER` therefore changes the provider's status at once (which is
//! what `GET`, `AVAILABLE` and `BOOK` read, so none of them ever offers or books a GPU of an
//! offline provider) and moves the GPUs of a large provider here, a slice at a time on the
//! module's ticker, each slice its own replicated unit with its own stream event. A small
//! provider is moved inside the command, as before.
//!
//! Every slice applies the one listing rule (`is_listed`) with the provider's status *as it
//! is when the slice runs*, so a second `PROVIDER` during a move simply restarts the walk, and
//! a GPU written by another command meanwhile (which applies the same rule) is left as it is.
//! The providers with a move under way are kept in the region's `index:provider-moves` set,
//! replicated like any write, so a promoted replica or a restarted server picks the moves up
//! again (`resume_region`, from the sweep after a load or promotion).

use crate::core::error::MarketResult;
use crate::core::events::{notify, Event, EventKind};
use crate::core::gpu::{GpuRecord, TypePrice};
use crate::core::status::{is_listed, ProviderStatus};
use crate::market::Region;
use crate::slice_queue::{self, Access, Job, SliceQueue};
use crate::store::{selected_db, Store};
use redis_module::logging::RedisLogLevel;
use redis_module::Context;
use std::collections::{HashMap, VecDeque};
use std::sync::MutexGuard;
use std::time::Instant;

/// A provider with at most this many GPUs in the region is moved inside `PROVIDER` itself:
/// ~25 µs a GPU keeps the command within a few milliseconds.
pub const INLINE_GPUS: usize = 128;
/// GPUs asked of `SSCAN` per slice: one slice stays well inside the ticker's budget.
const SLICE_GPUS: usize = 32;

#[derive(Debug, Clone)]
struct Move {
    db: i32,
    region: String,
    provider: String,
    cursor: u64,
    not_before_ms: i64,
}

impl Move {
    fn is(&self, db: i32, region: &str, provider: &str) -> bool {
        self.db == db && self.region == region && self.provider == provider
    }
}

impl Job for Move {
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

static MOVES: SliceQueue<Move> = SliceQueue::new();

fn moves() -> MutexGuard<'static, VecDeque<Move>> {
    MOVES.lock()
}

/// Moves queued and not finished (`INFO gpucache`).
pub fn pending() -> usize {
    MOVES.pending()
}

/// What one slice (or an inline move) did.
#[derive(Debug, Default, Clone, Copy)]
pub struct Moved {
    pub listed: i64,
    pub unlisted: i64,
    /// GPUs of the provider visited (members of another provider or without a record are not).
    pub gpus: i64,
}

/// The provider's GPUs among `gpu_ids`, read and checked before anything is written.
pub struct Prepared {
    gpus: Vec<(String, GpuRecord)>,
    type_prices: HashMap<String, Option<TypePrice>>,
}

pub fn prepare(region: &Region, provider_id: &str, gpu_ids: &[String]) -> MarketResult<Prepared> {
    let mut prepared = Prepared {
        gpus: Vec::with_capacity(gpu_ids.len()),
        type_prices: HashMap::new(),
    };
    for gpu_id in gpu_ids {
        let Some(gpu) = region.load_gpu(gpu_id)? else {
            continue; // expired: the expiry handler removes it from the set
        };
        if gpu.provider != provider_id {
            continue; // a stale member (REPAIR removes it): the GPU belongs to another provider
        }
        region.check_gpu_key_types(gpu_id, &gpu.gpu_type, provider_id)?;
        if !prepared.type_prices.contains_key(&gpu.gpu_type) {
            let price = region.load_type_price(&gpu.gpu_type)?;
            prepared.type_prices.insert(gpu.gpu_type.clone(), price);
        }
        prepared.gpus.push((gpu_id.clone(), gpu));
    }
    Ok(prepared)
}

/// Lists or unlists each prepared GPU as the rule says for the provider's `status`, and marks
/// every GPU key written: what `GET` shows for each (its provider's status) changed.
pub fn apply(region: &Region, prepared: &Prepared, status: ProviderStatus) -> MarketResult<Moved> {
    let mut moved = Moved::default();
    let mut key = String::new();
    for (gpu_id, gpu) in &prepared.gpus {
        region.keys.key_into(&mut key, "gpu", gpu_id);
        region.store.mark_written(&key);
        moved.gpus += 1;
        let listed = region
            .store
            .zscore(&region.keys.available_by_score(&gpu.gpu_type), gpu_id)?
            .is_some();
        let should = is_listed(gpu.status, status);
        if listed && !should {
            region.unlist(gpu_id, &gpu.gpu_type)?;
            moved.unlisted += 1;
        } else if !listed && should {
            let type_price = prepared.type_prices.get(&gpu.gpu_type).copied().flatten();
            region.list(gpu_id, gpu, type_price.as_ref())?;
            moved.listed += 1;
        }
    }
    Ok(moved)
}

/// Queues the move of a provider's GPUs in the selected database (restarting a move of the
/// same provider already under way) and wakes the ticker. The caller has written the
/// provider's entry in `index:provider-moves`.
pub fn queue(ctx: &Context, region: &str, provider: &str) {
    let db = selected_db(ctx);
    {
        let mut moves = moves();
        moves.retain(|m| !m.is(db, region, provider));
        moves.push_back(Move {
            db,
            region: region.to_owned(),
            provider: provider.to_owned(),
            cursor: 0,
            not_before_ms: 0,
        });
    }
    crate::ticker::wake(ctx);
}

/// Drops a queued move of the provider: `PROVIDER` moved its GPUs inline.
pub fn cancel(ctx: &Context, region: &str, provider: &str) {
    let db = selected_db(ctx);
    moves().retain(|m| !m.is(db, region, provider));
}

/// Forgets the moves of a database (`FLUSHDB`, `SWAPDB`) or of all (`None`: `FLUSHALL`, a load).
pub fn forget_db(db: Option<i32>) {
    MOVES.forget_db(db);
}

/// `SWAPDB a b`: each db's moves now run in the other.
pub fn swap_dbs(a: i32, b: i32) {
    MOVES.swap_dbs(a, b);
}

/// Queues again every move the region records as under way (after a load, a promotion or the
/// region's arrival from another node), in the selected database.
pub fn resume_region(ctx: &Context, region: &str) -> MarketResult<usize> {
    let store = Store::new(ctx);
    let key = crate::keys::RegionKeys::new(region).provider_moves();
    let providers = store.set_members(&key)?;
    for provider in &providers {
        let db = selected_db(ctx);
        let mut moves = moves();
        if !moves.iter().any(|m| m.is(db, region, provider)) {
            moves.push_back(Move {
                db,
                region: region.to_owned(),
                provider: provider.clone(),
                cursor: 0,
                not_before_ms: 0,
            });
        }
    }
    if !providers.is_empty() {
        crate::ticker::wake(ctx);
    }
    Ok(providers.len())
}

/// Runs slices of queued moves until `deadline`. Returns whether a move is left that could run
/// now (the ticker then comes back at once).
pub fn on_tick(ctx: &Context, now_ms: i64, deadline: Instant) -> bool {
    MOVES.on_tick(ctx, now_ms, deadline, run_slice)
}

/// One slice of a move. Returns the move to go on with, if any.
fn run_slice(ctx: &Context, mut job: Move, now_ms: i64) -> Option<Move> {
    let store = Store::new(ctx);
    let region = Region::new(&store, job.region.clone());
    match slice_queue::access(&store, region.keys.prefix(), &mut job, now_ms) {
        Access::Now => {}
        Access::Later => return Some(job),
        // The region's slot is another node's: that node resumes the move from the region's
        // `index:provider-moves` when the region arrives there.
        Access::Elsewhere => return None,
    }
    match slice(&region, &job) {
        Ok(0) => None,
        Ok(cursor) => {
            job.cursor = cursor;
            Some(job)
        }
        Err(e) => {
            crate::log(
                ctx,
                RedisLogLevel::Warning,
                &format!(
                    "gpucache: region {}: moving the GPUs of provider {} failed: {e}; a repair \
                     of the region is queued",
                    job.region,
                    crate::core::input::shown(job.provider.as_bytes(), 64)
                ),
            );
            crate::heal::queue_region_repair(ctx, &job.region);
            None
        }
    }
}

/// Moves one `SSCAN` step of the provider's GPUs and publishes what it did. Returns the next
/// cursor (0: the move is over, and the provider leaves `index:provider-moves`).
fn slice(region: &Region, job: &Move) -> MarketResult<u64> {
    let store = region.store;
    let status = region.provider_status(&job.provider)?;
    let members = region.keys.provider_gpus(&job.provider);
    let (cursor, gpu_ids) = store.sscan(&members, job.cursor, SLICE_GPUS)?;
    let prepared = prepare(region, &job.provider, &gpu_ids)?;
    let moved = apply(region, &prepared, status)?;
    if cursor == 0 {
        store.write(
            "SREM",
            &[
                region.keys.provider_moves().as_bytes(),
                job.provider.as_bytes(),
            ],
        );
    }
    if moved.gpus > 0 || cursor == 0 {
        let mut event = Event::new(
            EventKind::ProviderStatusChanged,
            &region.name,
            store.now_ms(),
        );
        event.reason = Some("gpus_moved");
        event.provider_id = Some(job.provider.clone());
        event.new.insert("status".into(), status.as_str().into());
        event.new.insert("gpus_listed".into(), moved.listed.into());
        event
            .new
            .insert("gpus_unlisted".into(), moved.unlisted.into());
        event.new.insert("done".into(), (cursor == 0).into());
        region.publish(notify::PROVIDER, event)?;
    }
    Ok(cursor)
}
