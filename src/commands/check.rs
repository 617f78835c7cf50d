//! `GPUCACHE.CHECK region` — recounts a region from its records and reports every place where
//! an index, counter, copy or booking link disagrees with them (the findings of
//! `crate::survey`, which `GPUCACHE.REPAIR` fixes). Read-only; O(GPUs + bookings), in a forked
//! child for a large region (`crate::survey_fork`): the server answers others meanwhile.
//!
//! Invariants (README "Invariants"):
//! 1. The availability indexes hold exactly the GPUs that are available and whose provider is
//!    online: own-priced ones in `avail-own` scored by their own price, type-priced ones in
//!    `avail-type`, and all of them in `avail-score` scored by their performance score.
//! 2. Every active booking has its record, its entry in the booking registry and on the booking
//!    clock, and holds a busy GPU whose record points back at it and keeps a copy of its terms.
//! 3. The registry, provider sets and counters (GPUs per status and per type, own-price sums)
//!    equal a recount of the records; the sequence stands above every version in use.
//! 4. Market state carries no TTL; idle GPU records do.

use super::{Args, Out, Reply};
use crate::core::error::MarketResult;
use crate::store::Store;
use crate::survey::Survey;
use redis_module::RedisString;

/// Reports are capped so a badly broken region still answers quickly and readably.
pub const MAX_REPORTED: usize = 100;

pub fn command(store: &Store, all: &[RedisString]) -> MarketResult<Out> {
    let mut args = Args::new(all, 1, 1)?;
    let region = args.region()?;
    if crate::survey_fork::should_fork(store, &region) {
        crate::survey_fork::check(store.ctx(), &region)?;
        return Ok(Out::Deferred);
    }
    let found = crate::survey::survey(store, &region)?;
    let total = found.findings.len();
    Ok(reply(&region, &found, total))
}

/// The reply to `CHECK`, from a survey whose findings may have been cut to the first
/// [`MAX_REPORTED`] (`total` counts them all).
pub fn reply(region: &str, found: &Survey, total: usize) -> Out {
    let violations = found
        .findings
        .iter()
        .take(MAX_REPORTED)
        .map(|f| Out::Text(f.message.clone()))
        .collect();
    let warnings = crate::eviction::warning()
        .into_iter()
        .map(Out::Text)
        .collect();
    Reply::new()
        .text("region", region.to_owned())
        .int("ok", i64::from(total == 0))
        .int("gpus_checked", found.gpus_checked as i64)
        .int("bookings_checked", found.bookings_checked as i64)
        .int("violations_total", total as i64)
        .value("violations", Out::Array(violations))
        .value("warnings", Out::Array(warnings))
        .build()
}
