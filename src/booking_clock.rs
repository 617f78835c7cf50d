//! The booking clock: ends bookings when their time is up.
//!
//! Bookings are market state and carry no TTL, so that no `volatile-*` eviction policy can ever
//! choose one; their end is enforced here instead of by Redis expiry. Each region keeps its
//! active bookings in a sorted set scored by end time (`index:booking-ends`). On the primary,
//! the module's tick (`ticker.rs`, on Redis's cron: `hz` times a second, 10 by default) ends
//! those whose time has come — exactly as
//! `GPUCACHE.CANCEL` would, with reason `ended` — through replicated writes, so replicas and the
//! AOF receive the ends the primary decided and never end a booking on their own. A command
//! that meets a booking whose time is up before the clock does (a `BOOK` of its GPU or reusing
//! its id) ends it first (`settle_ended`).
//!
//! The clock remembers each region's earliest end, so a tick costs nothing for regions without
//! a due booking. It looks at every region again after a load, a promotion, and every few
//! seconds (bookings that reached the region some other way, e.g. a migrated slot).

use crate::core::booking::Booking;
use crate::core::error::MarketResult;
use crate::market::{BookingEnd, Region};
use crate::store::{select_db, selected_db, Store, WriteAccess};
use redis_module::logging::RedisLogLevel;
use redis_module::Context;
use std::collections::{HashMap, HashSet};
use std::sync::{LazyLock, Mutex, MutexGuard};
use std::time::Instant;

struct Clock {
    /// Earliest booking end (ms) known per (db, region). A region without an entry is looked at
    /// on the next tick.
    next_end: HashMap<(i32, String), i64>,
    /// When every region was last looked at again from scratch.
    last_full_look_ms: i64,
    /// Bookings ended by the clock since the module loaded.
    ended: u64,
    /// Failures in a row per (db, region), for the retry back-off.
    failures: HashMap<(i32, String), u32>,
}

static CLOCK: LazyLock<Mutex<Clock>> = LazyLock::new(|| {
    Mutex::new(Clock {
        next_end: HashMap::new(),
        last_full_look_ms: 0,
        ended: 0,
        failures: HashMap::new(),
    })
});

fn clock() -> MutexGuard<'static, Clock> {
    CLOCK
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Bookings read and ended per round of one region.
const BATCH: usize = 64;
/// Every region is looked at again this often.
const FULL_LOOK_EVERY_MS: i64 = 10_000;
/// Regions whose earliest end is unknown looked at per tick, so a server holding many regions
/// spreads the first look over several ticks.
const MAX_LOOKS_PER_TICK: usize = 256;
/// A region whose bookings cannot be ended now (cluster down, damaged keys) is tried again
/// after this long.
const RETRY_MS: i64 = 1_000;

/// A booking was made: its region's clock must go off no later than its end.
pub fn booked(ctx: &Context, region: &str, end_ms: i64) {
    let mut clock = clock();
    if let Some(next) = clock
        .next_end
        .get_mut(&(selected_db(ctx), region.to_owned()))
    {
        *next = (*next).min(end_ms);
    }
}

/// Forgets every region's earliest end, so the next ticks look at all of them (after a load, a
/// promotion, or any other reason the bookings may have changed under the clock).
pub fn look_again() {
    clock().next_end.clear();
}

/// Forgets one region's earliest end (a repair may have put bookings back on its clock), so
/// the next tick looks at it.
pub fn look_again_at(ctx: &Context, region: &str) {
    clock()
        .next_end
        .remove(&(selected_db(ctx), region.to_owned()));
}

/// Forgets a region that is gone (`regions.rs`).
pub fn forget(db: i32, region: &str) {
    let key = (db, region.to_owned());
    let mut clock = clock();
    clock.next_end.remove(&key);
    clock.failures.remove(&key);
    shrink(&mut clock);
}

/// Forgets a flushed db's regions (`None`: every db's).
pub fn forget_db(db: Option<i32>) {
    let mut clock = clock();
    clock
        .next_end
        .retain(|(d, _), _| db.is_some_and(|db| *d != db));
    clock
        .failures
        .retain(|(d, _), _| db.is_some_and(|db| *d != db));
    shrink(&mut clock);
}

/// `SWAPDB`: what the clock knew of each db's regions now describes the other db; it looks at
/// every region again (rare enough not to track the swap).
pub fn forget_all_ends() {
    let mut clock = clock();
    clock.next_end.clear();
    clock.failures.clear();
}

/// Gives memory back after many regions were forgotten (a map keeps its largest size).
fn shrink(clock: &mut Clock) {
    if clock.next_end.capacity() > 64 && clock.next_end.len() * 4 < clock.next_end.capacity() {
        clock.next_end.shrink_to_fit();
    }
    if clock.failures.capacity() > 64 && clock.failures.len() * 4 < clock.failures.capacity() {
        clock.failures.shrink_to_fit();
    }
}

/// Bookings the clock has ended since the module loaded.
pub fn ended_count() -> u64 {
    clock().ended
}

/// Ends due bookings until `deadline`. Runs on the primary only (the caller checks). Returns
/// true when time ran out with bookings still due.
pub fn on_tick(ctx: &Context, now_ms: i64, deadline: Instant) -> bool {
    let due: Vec<(i32, String)> = {
        let mut clock = clock();
        if now_ms.saturating_sub(clock.last_full_look_ms) >= FULL_LOOK_EVERY_MS {
            clock.next_end.clear();
            clock.last_full_look_ms = now_ms;
        }
        crate::regions::known_where(|region| {
            clock.next_end.get(region).is_none_or(|end| *end <= now_ms)
        })
    };
    let original = selected_db(ctx);
    let mut unfinished = false;
    for (looked, (db, region)) in due.into_iter().enumerate() {
        if looked >= MAX_LOOKS_PER_TICK || Instant::now() >= deadline {
            unfinished = true;
            break;
        }
        if !select_db(ctx, db) {
            continue;
        }
        let next = end_due_bookings(ctx, &region, now_ms, deadline);
        unfinished |= next <= now_ms;
        clock().next_end.insert((db, region), next);
    }
    select_db(ctx, original);
    unfinished
}

/// Ends the region's bookings whose time is up, until `deadline`. Returns when the clock must
/// look at the region next: its earliest remaining end (`i64::MAX` without bookings), a time
/// already past when due bookings are left, or a retry time when they cannot be ended now.
fn end_due_bookings(ctx: &Context, region: &str, now_ms: i64, deadline: Instant) -> i64 {
    let store = Store::new(ctx);
    let keys = crate::keys::RegionKeys::new(region);
    let ends_key = keys.booking_ends();
    match store.write_access(keys.prefix()) {
        WriteAccess::Now => {}
        WriteAccess::Later => return now_ms.saturating_add(RETRY_MS),
        // The region's keys are here but its slot is not this node's: almost always a move in
        // progress (a region that left is forgotten once its keys are gone). Looked at again
        // like a refused write, so a booking whose end passed mid-move ends about a second
        // after the slot becomes this node's, not at the next full look.
        WriteAccess::Elsewhere => return now_ms.saturating_add(RETRY_MS),
    }
    let db = selected_db(ctx);
    let mut attempted: HashSet<Vec<u8>> = HashSet::new();
    loop {
        let due = match store.members_up_to(&ends_key, now_ms as f64, BATCH) {
            Ok(due) => due,
            Err(e) => {
                crate::log(
                    ctx,
                    RedisLogLevel::Warning,
                    &format!("gpucache: region {region}: cannot read its booking ends: {e}"),
                );
                crate::heal::queue_region_repair(ctx, region);
                return retry_later(db, region, now_ms);
            }
        };
        if due.is_empty() {
            break;
        }
        for member in due {
            if Instant::now() >= deadline {
                return now_ms;
            }
            // An entry that survives its own ending would loop: leave it to a repair.
            if !attempted.insert(member.clone()) {
                crate::heal::queue_region_repair(ctx, region);
                return retry_later(db, region, now_ms);
            }
            // Not a booking id gpucache would write (another client's hand): removed as is.
            let Some(booking_id) = std::str::from_utf8(&member)
                .ok()
                .filter(|id| crate::core::input::id("booking id", id.as_bytes()).is_ok())
            else {
                store.write("ZREM", &[ends_key.as_bytes(), &member]);
                continue;
            };
            match end_on_clock(ctx, region, booking_id, now_ms) {
                Ok(true) => clock().ended += 1,
                Ok(false) => {}
                Err(e) => {
                    crate::log(
                        ctx,
                        RedisLogLevel::Warning,
                        &format!(
                            "gpucache: region {region}: ending booking {booking_id} failed: {e}; \
                             a repair of the region is queued"
                        ),
                    );
                    crate::heal::queue_region_repair(ctx, region);
                    return retry_later(db, region, now_ms);
                }
            }
        }
    }
    clock().failures.remove(&(db, region.to_owned()));
    match store.first_score(&ends_key) {
        Ok(Some(end)) if end.is_finite() => end as i64,
        Ok(_) => i64::MAX,
        Err(_) => retry_later(db, region, now_ms),
    }
}

/// When to look at a region again after its bookings could not be ended: a second, doubling
/// with each failure in a row up to a minute (a region a repair cannot fix is not retried, and
/// repaired, every second forever).
fn retry_later(db: i32, region: &str, now_ms: i64) -> i64 {
    let mut clock = clock();
    let failures = clock.failures.entry((db, region.to_owned())).or_insert(0);
    *failures = failures.saturating_add(1);
    let delay = RETRY_MS
        .saturating_mul(1i64 << (*failures).min(7).saturating_sub(1))
        .min(60_000);
    now_ms.saturating_add(delay)
}

/// Ends one booking the clock found due. Returns whether a booking was ended.
fn end_on_clock(
    ctx: &Context,
    region_name: &str,
    booking_id: &str,
    now_ms: i64,
) -> MarketResult<bool> {
    let store = Store::new(ctx);
    let region = Region::new(&store, region_name.to_owned());
    let ends_key = region.keys.booking_ends();
    let Some(booking) = booking_or_copy(&region, booking_id)? else {
        // Nothing holds it: a stale entry. What the registry still lists is released by the
        // repair of a vanished booking.
        crate::heal::settle_vanished(ctx, &region.keys.booking(booking_id));
        store.write("ZREM", &[ends_key.as_bytes(), booking_id.as_bytes()]);
        return Ok(false);
    };
    if !booking.has_ended(now_ms) {
        // The entry's score disagrees with the booking: put it where the booking ends.
        let end = booking.end_ms.to_string();
        store.write(
            "ZADD",
            &[ends_key.as_bytes(), end.as_bytes(), booking_id.as_bytes()],
        );
        return Ok(false);
    }
    region.close_booking(booking_id, &booking, BookingEnd::Ended)?;
    if store.failed_writes() > 0 {
        crate::heal::queue_region_repair(ctx, region_name);
    }
    Ok(true)
}

/// A booking from its own record, or — when that is gone (a hand `DEL`) — from the copy of its
/// terms on the GPU that holds it.
fn booking_or_copy(region: &Region, booking_id: &str) -> MarketResult<Option<Booking>> {
    match region.load_booking(booking_id)? {
        Some(booking) => Ok(Some(booking)),
        None => terms_on_holder(region, booking_id),
    }
}

/// The booking as the GPU holding it records it, when its own record is gone.
fn terms_on_holder(region: &Region, booking_id: &str) -> MarketResult<Option<Booking>> {
    let Some(gpu_id) = region
        .store
        .hget(&region.keys.booking_registry(), booking_id)?
    else {
        return Ok(None);
    };
    let gpu_id = String::from_utf8_lossy(&gpu_id).into_owned();
    let Some(gpu) = region.load_gpu(&gpu_id)? else {
        return Ok(None);
    };
    Ok(match (&gpu.booking, &gpu.booking_terms) {
        (Some(holder), Some(terms)) if holder == booking_id => {
            Some(Booking::from_terms(&gpu_id, terms).holding(&gpu.gpu_type, &gpu.provider))
        }
        _ => None,
    })
}

/// Ends `booking_id` if its time is up and the clock has not ended it yet, so a command can
/// reuse its id or book its GPU. Returns whether it was ended.
pub fn settle_ended(
    ctx: &Context,
    region_name: &str,
    booking_id: &str,
    now_ms: i64,
) -> MarketResult<bool> {
    let store = Store::new(ctx);
    let region = Region::new(&store, region_name.to_owned());
    let Some(booking) = booking_or_copy(&region, booking_id)?.filter(|b| b.has_ended(now_ms))
    else {
        return Ok(false);
    };
    region.close_booking(booking_id, &booking, BookingEnd::Ended)?;
    clock().ended += 1;
    Ok(true)
}
