//! The module's periodic work, on one timer: the booking clock, and a fallback re-read of the
//! eviction policy (a config change is also caught at once by its server event).

use redis_module::{Context, ContextFlags};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// How often the tick runs while nothing is pending.
const TICK: Duration = Duration::from_millis(100);
/// How soon it runs again when it ran out of time with work left.
const AGAIN: Duration = Duration::from_millis(1);
/// Time one tick may spend before it yields to clients.
const BUDGET: Duration = Duration::from_millis(2);
/// The eviction policy is re-read every this many ticks.
const POLICY_EVERY: u64 = 10;

static TICKS: AtomicU64 = AtomicU64::new(0);

/// Starts the tick (from the module's load).
pub fn start(ctx: &Context) {
    ctx.create_timer(TICK, tick, ());
}

fn tick(ctx: &Context, _: ()) {
    let deadline = Instant::now() + BUDGET;
    let ticks = TICKS.fetch_add(1, Ordering::Relaxed);
    if ticks.is_multiple_of(POLICY_EVERY) {
        crate::eviction::refresh(ctx);
    }
    let flags = ctx.get_flags();
    let primary = !flags.contains(ContextFlags::SLAVE) && !flags.contains(ContextFlags::LOADING);
    let mut unfinished = false;
    if primary {
        let now = crate::store::Store::new(ctx).now_ms();
        unfinished = crate::booking_clock::on_tick(ctx, now, deadline);
    }
    ctx.create_timer(if unfinished { AGAIN } else { TICK }, tick, ());
}
