//! `INFO gpucache`: what an operator needs to see from outside.

use redis_module::{InfoContext, RedisResult};
use redis_module_macros::info_command_handler;

#[info_command_handler]
fn gpucache_info(ctx: &InfoContext, for_crash_report: bool) -> RedisResult<()> {
    if for_crash_report {
        // The server is dying, maybe while one of the module's locks is held: only figures
        // read without a lock.
        ctx.builder()
            .add_section("")
            .field(
                "eviction_policy_safe",
                i64::from(!crate::eviction::is_unsafe()),
            )?
            .field(
                "panics_caught",
                i64::try_from(crate::logging::panics_caught()).unwrap_or(i64::MAX),
            )?
            .build_section()?
            .build_info()?;
        return Ok(());
    }
    let heal = crate::heal::figures();
    let count = |n: usize| i64::try_from(n).unwrap_or(i64::MAX);
    let big = |n: u64| i64::try_from(n).unwrap_or(i64::MAX);
    ctx.builder()
        .add_section("")
        .field("eviction_policy", crate::eviction::policy())?
        .field(
            "eviction_policy_safe",
            i64::from(!crate::eviction::is_unsafe()),
        )?
        .field(
            "accept_eviction_risk",
            i64::from(
                crate::config::ACCEPT_EVICTION_RISK.load(std::sync::atomic::Ordering::Relaxed),
            ),
        )?
        .field("regions", count(crate::regions::count()))?
        .field("heal_queue", count(heal.queued))?
        .field("heal_retrying", count(heal.retrying))?
        .field("heal_retries", big(heal.retries))?
        .field("healed", big(heal.healed))?
        .field("region_repairs", big(heal.region_repairs))?
        .field(
            "provider_moves_pending",
            count(crate::provider_moves::pending()),
        )?
        .field("type_drains_pending", count(crate::type_drains::pending()))?
        .field("type_price_heal_slices", big(heal.type_price_slices))?
        .field("ticker_longest_us", big(crate::ticker::longest_run_us()))?
        .field("surveys_forked", big(crate::survey_fork::forked()))?
        .field("surveys_pending", big(crate::survey_fork::pending()))?
        .field("repair_steps", big(crate::survey_fork::repair_steps()))?
        .field(
            "searches_cut_short",
            big(crate::commands::available::searches_cut_short()),
        )?
        .field("sweep_slices", big(heal.sweep_slices))?
        .field("panics_caught", big(crate::logging::panics_caught()))?
        .field(
            "bookings_ended_by_clock",
            big(crate::booking_clock::ended_count()),
        )?
        .build_section()?
        .build_info()?;
    Ok(())
}
