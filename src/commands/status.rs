//! `GPUCACHE.STATUS region gpu_id available|busy|offline|maintenance`

use super::{Args, Out, Reply};
use crate::core::error::MarketResult;
use crate::core::events::{notify, Event, EventKind};
use crate::core::status::{check_manual_transition, is_listed, GpuStatus};
use crate::market::{GpuWrite, Region};
use crate::store::Store;
use redis_module::RedisString;

pub fn command(store: &Store, all: &[RedisString]) -> MarketResult<Out> {
    let mut args = Args::new(all, 3, 3)?;
    let region = Region::new(store, args.region()?);
    let gpu_id = args.id("gpu id")?;
    let target = GpuStatus::parse(args.required("status")?)?;

    let old = region.require_gpu(&gpu_id)?;
    check_manual_transition(old.status, old.booking.as_deref(), target)?;
    if old.status == target {
        return Ok(Reply::new()
            .text("gpu_id", gpu_id)
            .text("result", "unchanged")
            .int("version", old.version)
            .text("status", target.as_str())
            .build());
    }
    region.check_gpu_key_types(&gpu_id, &old.gpu_type, &old.provider)?;
    region.prefetch_status_change(&old.gpu_type, old.status, target, &[])?;
    let provider_status = region.provider_status(&old.provider)?;
    let type_price = region.load_type_price(&old.gpu_type)?;

    let now = store.now_ms();
    let version = region.next_seq()?;
    let mut new = old.clone();
    new.status = target;
    new.version = version;
    new.updated_ms = now;
    region.store_gpu(GpuWrite {
        gpu_id: &gpu_id,
        old: Some(&old),
        new: &new,
        old_provider_status: provider_status,
        new_provider_status: provider_status,
        type_price: type_price.as_ref(),
        expire_at_ms: region.gpu_expiry(now, new.booking.is_some()),
    })?;

    let mut event = Event::new(EventKind::GpuAvailabilityChanged, &region.name, now);
    event.reason = Some("status");
    event.gpu_id = Some(gpu_id.clone());
    event.gpu_type = Some(new.gpu_type.clone());
    event.provider_id = Some(new.provider.clone());
    event.version = Some(new.version);
    event.changed("status", old.status.as_str(), new.status.as_str());
    event.changed(
        "listed",
        is_listed(old.status, provider_status),
        is_listed(new.status, provider_status),
    );
    region.publish(notify::STATUS, event)?;

    Ok(Reply::new()
        .text("gpu_id", gpu_id)
        .text("result", "changed")
        .int("version", new.version)
        .text("status", target.as_str())
        .build())
}
