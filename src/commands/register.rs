//! `GPUCACHE.REGISTER region gpu_id PROVIDER p TYPE t PRICE x [MEMORY gb] [CORES n] [SCORE s]`

use super::{option_is, unknown_option, Args, Out, Reply};
use crate::core::error::{MarketError, MarketResult};
use crate::core::events::{notify, Event, EventKind};
use crate::core::gpu::GpuRecord;
use crate::core::input;
use crate::core::price::Price;
use crate::core::status::GpuStatus;
use crate::market::{GpuWrite, Region};
use crate::store::Store;
use redis_module::RedisString;

struct Registration {
    gpu_id: String,
    provider: String,
    gpu_type: String,
    price: Price,
    memory_gb: Option<i64>,
    cores: Option<i64>,
    score: Option<f64>,
}

fn parse(args: &mut Args) -> MarketResult<Registration> {
    let gpu_id = args.id("gpu id")?;
    let (mut provider, mut gpu_type, mut price) = (None, None, None);
    let (mut memory_gb, mut cores, mut score) = (None, None, None);
    let options = args.remaining();
    let mut pairs = options.chunks_exact(2);
    for pair in pairs.by_ref() {
        let (name, value) = (pair[0], pair[1]);
        let slot_taken = if option_is(name, "PROVIDER") {
            provider.replace(input::id("provider id", value)?).is_some()
        } else if option_is(name, "TYPE") {
            gpu_type.replace(input::id("GPU type", value)?).is_some()
        } else if option_is(name, "PRICE") {
            price.replace(Price::parse(value)?).is_some()
        } else if option_is(name, "MEMORY") {
            memory_gb
                .replace(input::integer("MEMORY (GB)", value, 1, 1_000_000)?)
                .is_some()
        } else if option_is(name, "CORES") {
            cores
                .replace(input::integer("CORES", value, 0, 10_000_000)?)
                .is_some()
        } else if option_is(name, "SCORE") {
            score
                .replace(input::non_negative_number("SCORE", value, 1e12)?)
                .is_some()
        } else {
            return Err(unknown_option(name));
        };
        if slot_taken {
            return Err(MarketError::syntax(format!(
                "option {} given twice",
                input::shown(name, 64).to_uppercase()
            )));
        }
    }
    if let Some(dangling) = pairs.remainder().first() {
        return Err(MarketError::syntax(format!(
            "option '{}' needs a value",
            input::shown(dangling, 64)
        )));
    }
    let missing = |what: &str| MarketError::syntax(format!("{what} is required"));
    Ok(Registration {
        gpu_id,
        provider: provider.ok_or_else(|| missing("PROVIDER"))?,
        gpu_type: gpu_type.ok_or_else(|| missing("TYPE"))?,
        price: price.ok_or_else(|| missing("PRICE"))?,
        memory_gb,
        cores,
        score,
    })
}

pub fn command(store: &Store, all: &[RedisString]) -> MarketResult<Out> {
    let mut args = Args::new(all, 8, 14)?;
    let region_name = args.region()?;
    let req = parse(&mut args)?;
    let region = Region::new(store, region_name);

    let mut old = region.load_gpu(&req.gpu_id)?;
    if old.is_none() {
        // An earlier record of this id may have just vanished, its repair still queued (which
        // brings a booked GPU's record back, holding its booking).
        if crate::heal::settle_vanished(store.ctx(), &region.keys.gpu(&req.gpu_id)) {
            old = region.load_gpu(&req.gpu_id)?;
        }
    }
    region.check_gpu_key_types(&req.gpu_id, &req.gpu_type, &req.provider)?;
    if let Some(old) = &old {
        region.check_gpu_key_types(&req.gpu_id, &old.gpu_type, &old.provider)?;
    }
    let old_provider_status = match &old {
        Some(o) => region.provider_status(&o.provider)?,
        None => Default::default(),
    };
    let new_provider_status = region.provider_status(&req.provider)?;
    let type_price = region.load_type_price(&req.gpu_type)?;

    // Validation is over: from here on every step writes.
    let now = store.now_ms();
    let seq = region.next_seq()?;
    let new = GpuRecord {
        provider: req.provider,
        gpu_type: req.gpu_type,
        own_price: req.price,
        price_seq: seq,
        memory_gb: req.memory_gb,
        cores: req.cores,
        score: req.score,
        status: old.as_ref().map_or(GpuStatus::Available, |o| o.status),
        booking: old.as_ref().and_then(|o| o.booking.clone()),
        booking_terms: old.as_ref().and_then(|o| o.booking_terms.clone()),
        version: seq,
        updated_ms: now,
    };
    region.store_gpu(GpuWrite {
        gpu_id: &req.gpu_id,
        old: old.as_ref(),
        new: &new,
        old_provider_status,
        new_provider_status,
        type_price: type_price.as_ref(),
        expire_at_ms: region.gpu_expiry(now, new.booking.is_some()),
    })?;

    let mut event = Event::new(EventKind::GpuAvailabilityChanged, &region.name, now);
    event.reason = Some(if old.is_some() {
        "updated"
    } else {
        "registered"
    });
    event.gpu_id = Some(req.gpu_id.clone());
    event.gpu_type = Some(new.gpu_type.clone());
    event.provider_id = Some(new.provider.clone());
    event.version = Some(new.version);
    if let Some(old) = &old {
        event.changed(
            "price",
            old.own_price.to_string(),
            new.own_price.to_string(),
        );
        event.changed("provider", old.provider.as_str(), new.provider.as_str());
        event.changed("type", old.gpu_type.as_str(), new.gpu_type.as_str());
    } else {
        event.changed("status", serde_json::Value::Null, new.status.as_str());
        event.changed("price", serde_json::Value::Null, new.own_price.to_string());
    }
    region.publish(notify::REGISTERED, event)?;

    Ok(Reply::new()
        .text("gpu_id", req.gpu_id)
        .text("result", if old.is_some() { "updated" } else { "created" })
        .int("version", new.version)
        .text("status", new.status.as_str())
        .build())
}
