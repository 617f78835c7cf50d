//! The sweep of a region after a load, a promotion or a slot's arrival, in slices.
//!
//! Records whose time passed while the server was down (or while the slot moved) are not
//! loaded and no event announces them, so each registry entry whose record is gone, and each
//! type price that is gone while GPUs still show it, is healed exactly as the healing timer
//! would (same events). Bookings whose end passed meanwhile are the booking clock's. The
//! whole-region survey (`repair.rs`, several times slower) runs only when a cheap look finds
//! something else wrong: keys of a foreign type, lost counters, a booking clock that does not
//! hold every active booking (as after an upgrade from a version that gave bookings TTLs).
//!
//! A region may hold 100,000 GPUs and healing one costs tens of microseconds, so the registry
//! is walked with a scan cursor kept in the healing queue between timer calls (`HashWalk`),
//! each call visiting entries only until its budget is spent. Each entry is looked at when its
//! turn comes, and `heal_key` re-reads the record and its registry entry before writing, so
//! a GPU registered again or already healed between two slices is left alone.

use crate::core::error::MarketResult;
use crate::core::walk::HashWalk;
use crate::market::Region;
use crate::store::Store;
use redis_module::logging::RedisLogLevel;
use redis_module::{Context, KeyType};
use std::time::Instant;

/// Registry entries fetched per scan step. A slice stops between entries, not between steps,
/// so this bounds only what a step costs and what a paused sweep keeps in memory.
const BATCH: usize = 64;

/// How far a region's sweep got; kept with its job between timer calls.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SweepProgress {
    /// The cheap look passed and the registry walk began.
    looked: bool,
    registry: HashWalk,
    /// Records healed so far, and slices run so far (for the closing log line).
    healed: u64,
    slices: u64,
    failed_writes: u32,
}

/// What one slice did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Slice {
    pub healed: u64,
    /// The sweep is over (if not, it continues in a later slice).
    pub done: bool,
    /// Over, and the region needs a whole repair: the cheap look found more wrong than vanished
    /// records, or some healing writes were refused.
    pub needs_repair: bool,
}

/// Runs the sweep on until `deadline` (at least one registry entry or step is taken, so a
/// sweep always advances).
pub fn sweep_slice(
    ctx: &Context,
    region_name: &str,
    progress: &mut SweepProgress,
    deadline: Instant,
) -> MarketResult<Slice> {
    let store = Store::new(ctx);
    let region = Region::new(&store, region_name.to_owned());
    let keys = &region.keys;
    let mut slice = Slice::default();
    progress.slices = progress.slices.saturating_add(1);
    if !progress.looked {
        let damaged = region.check_key_types(&[]).is_err()
            || store.length(&keys.booking_registry()) != store.length(&keys.booking_ends());
        // Moves of providers' GPUs the previous primary (or this server before it stopped) had
        // not finished.
        crate::provider_moves::resume_region(ctx, region_name)?;
        // Re-priced GPUs a large `PRICE` left draining into their type-price index.
        crate::type_drains::resume_region(ctx, region_name)?;
        if damaged {
            slice.done = true;
            slice.needs_repair = true;
            return Ok(slice);
        }
        progress.looked = true;
    }
    let registry = keys.gpu_registry();
    let mut key = String::new();
    let mut first = true;
    while !progress.registry.is_done() && (first || Instant::now() < deadline) {
        first = false;
        if let Some(cursor) = progress.registry.wanted_cursor() {
            let (next, ids) = store.hscan_fields(&registry, cursor, BATCH)?;
            progress.registry.take_batch(next, ids);
            continue;
        }
        let Some(gpu_id) = progress.registry.next_field() else {
            continue;
        };
        keys.key_into(&mut key, "gpu", &gpu_id);
        if store.key_type(&key) == KeyType::Empty {
            if crate::heal::heal_key(ctx, &key) {
                progress.failed_writes = progress.failed_writes.saturating_add(1);
            }
            slice.healed += 1;
        }
    }
    if !progress.registry.is_done() {
        progress.healed = progress.healed.saturating_add(slice.healed);
        return Ok(slice);
    }
    // Type prices whose time passed: their GPUs go back to their own prices. (A region has
    // few types; each is one heal, as when its expiry is announced, which goes on in slices.)
    for gpu_type in store.set_members(&keys.types())? {
        keys.key_into(&mut key, "price", &gpu_type);
        if region.typed_count(&gpu_type)? > 0 && store.key_type(&key) == KeyType::Empty {
            if crate::heal::heal_key(ctx, &key) {
                progress.failed_writes = progress.failed_writes.saturating_add(1);
            }
            slice.healed += 1;
        }
    }
    progress.healed = progress.healed.saturating_add(slice.healed);
    slice.done = true;
    slice.needs_repair = progress.failed_writes > 0;
    if progress.healed > 0 {
        crate::log(
            ctx,
            RedisLogLevel::Notice,
            &format!(
                "gpucache: region {region_name}: healed {} records whose time passed while the \
                 server was down ({} slices)",
                progress.healed, progress.slices
            ),
        );
    }
    Ok(slice)
}
