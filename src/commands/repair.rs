//! `GPUCACHE.REPAIR region` — puts a region back in order (see `crate::repair`). Runs by itself
//! after every RDB/AOF load and promotion, and whenever a command finds market state damaged;
//! operators run it when `GPUCACHE.CHECK` reports something.

use super::{Args, Out, Reply};
use crate::core::error::MarketResult;
use crate::repair::RepairReport;
use crate::store::Store;
use redis_module::RedisString;

pub fn command(store: &Store, all: &[RedisString]) -> MarketResult<Out> {
    let mut args = Args::new(all, 1, 1)?;
    let region = args.region()?;
    if crate::survey_fork::should_fork(store, &region) {
        crate::survey_fork::repair(store.ctx(), &region)?;
        return Ok(Out::Deferred);
    }
    let report = crate::repair::repair_region(store.ctx(), &region)?;
    Ok(reply(&region, &report))
}

pub fn reply(region: &str, report: &RepairReport) -> Out {
    let repairs = report.repairs.iter().cloned().map(Out::Text).collect();
    Reply::new()
        .text("region", region.to_owned())
        .int("gpus", report.gpus)
        .int("bookings", report.bookings)
        .int("type_prices", report.type_prices)
        .int("provider_members", report.provider_members)
        .int("gpu_records", report.gpu_records)
        .int("booking_records", report.booking_records)
        .int("fixed", report.fixed)
        .int("unrecoverable", report.unrecoverable)
        .int("seq", report.seq)
        .value("repairs", Out::Array(repairs))
        .build()
}
