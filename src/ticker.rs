//! The module's periodic work: the booking clock, the moves of large providers' GPUs
//! (`provider_moves.rs`) and of large types' re-priced GPUs (`type_drains.rs`), and a fallback re-read of the eviction policy
//! (a config change is also caught at once by its server event).
//!
//! Driven by Redis's own cron (`serverCron`, `hz` times a second, 10 by default) rather than a
//! timer of the module's: a module holding a timer cannot be unloaded. The cron callback only
//! arms a one-shot timer; the timer does the writing (like every other module write outside a
//! command, its effects are replicated as one unit), and arms itself again at once while it ran
//! out of time with bookings still due.

use redis_module::{Context, ContextFlags};
use redis_module_macros::cron_event_handler;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// How soon the timer runs again when it ran out of time with work left.
const AGAIN: Duration = Duration::from_millis(1);
/// Time one run may spend before it yields to clients.
const BUDGET: Duration = Duration::from_millis(2);
/// The eviction policy is re-read this often.
const POLICY_EVERY_MS: i64 = 1_000;

static ARMED: AtomicBool = AtomicBool::new(false);
static POLICY_READ_MS: AtomicI64 = AtomicI64::new(0);
/// The longest one run of the timer held the main thread, in µs (`INFO gpucache`).
static LONGEST_RUN_US: AtomicU64 = AtomicU64::new(0);

pub fn longest_run_us() -> u64 {
    LONGEST_RUN_US.load(Ordering::Relaxed)
}

fn now_ms(ctx: &Context) -> i64 {
    crate::store::Store::new(ctx).now_ms()
}

#[cron_event_handler]
fn on_cron(ctx: &Context, _hz: u64) {
    crate::logging::guarded(|| tick(ctx));
}

fn tick(ctx: &Context) {
    crate::survey_fork::tick(ctx);
    let now = now_ms(ctx);
    if now.saturating_sub(POLICY_READ_MS.load(Ordering::Relaxed)) >= POLICY_EVERY_MS {
        POLICY_READ_MS.store(now, Ordering::Relaxed);
        crate::eviction::refresh(ctx);
    }
    crate::regions::round_step(ctx);
    if !ctx.get_flags().contains(ContextFlags::LOADING) {
        crate::stats_cache::tick(ctx);
    }
    if is_primary(ctx) && !ARMED.swap(true, Ordering::Relaxed) {
        ctx.create_timer(AGAIN, run, ());
    }
}

/// Runs the timer soon, for work queued outside it (a provider's GPUs to move).
pub fn wake(ctx: &Context) {
    if is_primary(ctx) && !ARMED.swap(true, Ordering::Relaxed) {
        ctx.create_timer(AGAIN, run, ());
    }
}

fn is_primary(ctx: &Context) -> bool {
    let flags = ctx.get_flags();
    !flags.contains(ContextFlags::SLAVE) && !flags.contains(ContextFlags::LOADING)
}

fn run(ctx: &Context, _: ()) {
    let started = Instant::now();
    let deadline = started + BUDGET;
    // After a panic (a bug; the log has it) the next cron tick arms the clock again.
    let unfinished = crate::logging::guarded(|| {
        if !is_primary(ctx) {
            return false;
        }
        let now = now_ms(ctx);
        let clock_unfinished = crate::booking_clock::on_tick(ctx, now, deadline);
        let moves_unfinished = crate::provider_moves::on_tick(ctx, now, deadline);
        crate::type_drains::on_tick(ctx, now, deadline) || moves_unfinished || clock_unfinished
    })
    .unwrap_or(false);
    let took = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX);
    LONGEST_RUN_US.fetch_max(took, Ordering::Relaxed);
    if unfinished {
        ctx.create_timer(AGAIN, run, ());
    } else {
        ARMED.store(false, Ordering::Relaxed);
    }
}
