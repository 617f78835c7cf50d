//! `GPUCACHE.GET region gpu_id`

use super::{Args, Out, Reply};
use crate::core::booking::Booking;
use crate::core::demand::format_hundredths;
use crate::core::error::{MarketError, MarketResult};
use crate::core::gpu::GpuRecord;
use crate::core::status::is_listed;
use crate::market::Region;
use crate::store::Store;
use redis_module::RedisString;

/// The full record of one GPU as clients see it: effective price, provider status, booking.
/// `ttl` is the record's remaining time to live, read with it.
pub fn gpu_reply(
    region: &Region,
    gpu_id: &str,
    gpu: &GpuRecord,
    ttl: Option<i64>,
) -> MarketResult<Out> {
    let provider_status = region.provider_status(&gpu.provider)?;
    let shown = region.shown_price(gpu)?;
    // The record carries its booking's terms; one written before it did reads the booking.
    let booking = match (&gpu.booking, &gpu.booking_terms) {
        (Some(_), Some(terms)) => Some(Booking::from_terms(gpu_id, terms)),
        (Some(id), None) => region.load_booking(id)?,
        (None, _) => None,
    };
    // Fields are added in name order: `Reply::build` sorts them anyway, and sorted input costs
    // it one comparison per field.
    let mut reply = Reply::new().text("base_price", shown.base.to_string());
    if let Some(booking) = &booking {
        reply = reply.int("booking_end_ms", booking.end_ms);
    }
    reply = reply.opt_text("booking_id", gpu.booking.clone());
    if let Some(booking) = booking {
        reply = reply
            .text("booking_price", booking.price.to_string())
            .text("booking_user", booking.user_id);
    }
    if let Some(c) = gpu.cores {
        reply = reply.int("cores", c);
    }
    reply = reply
        .text("demand_multiplier", format_hundredths(shown.multiplier))
        .text("gpu_id", gpu_id)
        .int("listed", i64::from(is_listed(gpu.status, provider_status)));
    if let Some(m) = gpu.memory_gb {
        reply = reply.int("memory_gb", m);
    }
    reply = reply
        .text("own_price", gpu.own_price.to_string())
        .text("price", shown.price.to_string())
        .text("price_source", shown.source.as_str())
        .text("provider", gpu.provider.as_str())
        .text("provider_status", provider_status.as_str())
        .text("region", region.name.as_str());
    if let Some(s) = gpu.score {
        reply = reply.text("score", s.to_string());
    }
    reply = reply.text("status", gpu.status.as_str());
    if let Some(ttl) = ttl {
        reply = reply.int("ttl_ms", ttl);
    }
    Ok(reply
        .text("type", gpu.gpu_type.as_str())
        .int("updated_ms", gpu.updated_ms)
        .int("version", gpu.version)
        .build())
}

pub fn command(store: &Store, all: &[RedisString]) -> MarketResult<Out> {
    let mut args = Args::new(all, 2, 2)?;
    let region = Region::new(store, args.region()?);
    let gpu_id = args.id("gpu id")?;
    let (gpu, ttl) = region
        .load_gpu_with_ttl(&gpu_id)?
        .ok_or_else(|| MarketError::NoGpu(gpu_id.clone()))?;
    gpu_reply(&region, &gpu_id, &gpu, ttl)
}
