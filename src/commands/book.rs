//! `GPUCACHE.BOOK region gpu_id booking_id user_id duration_s` and
//! `GPUCACHE.CANCEL region booking_id`.

use super::{Args, Out, Reply};
use crate::core::booking::{check_repeated_booking, Booking};
use crate::core::error::{MarketError, MarketResult};
use crate::core::events::{notify, Event, EventKind};
use crate::core::input;
use crate::core::status::{check_bookable, GpuStatus};
use crate::market::{stat, BookingEnd, GpuWrite, Region, ShownPrice};
use crate::store::Store;
use redis_module::{KeyType, RedisString};

fn booking_reply(booking_id: &str, booking: &Booking, result: &str, gpu_version: i64) -> Out {
    Reply::new()
        .text("booking_id", booking_id)
        .text("result", result)
        .text("gpu_id", booking.gpu_id.as_str())
        .text("user_id", booking.user_id.as_str())
        .text("price", booking.price.to_string())
        .int("duration_s", booking.duration_s)
        .int("start_ms", booking.start_ms)
        .int("end_ms", booking.end_ms)
        .text(
            "cost",
            crate::core::price::Price::from_micros(booking.cost_micros()).to_string(),
        )
        .int("gpu_version", gpu_version)
        .build()
}

pub fn book(store: &Store, all: &[RedisString]) -> MarketResult<Out> {
    let mut args = Args::new(all, 5, 5)?;
    let region = Region::new(store, args.region()?);
    let gpu_id = args.id("gpu id")?;
    let booking_id = args.id("booking id")?;
    let user_id = args.id("user id")?;
    let duration_s = input::integer(
        "duration_s",
        args.required("duration_s")?,
        1,
        input::MAX_BOOKING_SECONDS,
    )?;

    let booking_key = region.keys.booking(&booking_id);
    store.expect_types(&[(booking_key.as_str(), KeyType::Hash)])?;
    let now = store.now_ms();
    let mut existing = region.load_booking(&booking_id)?;
    if existing.is_none() {
        // Its record may have vanished (a hand `DEL`, an `allkeys-*` eviction) with the booking
        // still active: the repair rebuilds it from its GPU's copy of its terms (or ends it, if
        // its time is up). What it leaves is what this id names.
        if crate::heal::settle_vanished(store.ctx(), &booking_key) {
            existing = region.load_booking(&booking_id)?;
        }
    }
    if let Some(existing) = existing.as_ref().filter(|b| !b.has_ended(now)) {
        check_repeated_booking(&booking_id, existing, &gpu_id, &user_id, duration_s)?;
        let version = region.load_gpu(&gpu_id)?.map_or(0, |g| g.version);
        // A retry must be able to `WAIT` for the original booking (README "Acknowledged means
        // durable").
        store.replicate_noop();
        return Ok(booking_reply(&booking_id, existing, "existing", version));
    }
    crate::eviction::check_bookings_are_safe()?;
    // A booking whose time is up but which the booking clock has not ended yet (it runs `hz`
    // times a second): end it first, so the id can be reused and the GPU it held is free.
    if existing.is_some() {
        crate::booking_clock::settle_ended(store.ctx(), &region.name, &booking_id, now)?;
    }
    let mut old = region.require_gpu(&gpu_id)?;
    if let Some(holder) = old.booking.clone() {
        if crate::booking_clock::settle_ended(store.ctx(), &region.name, &holder, now)? {
            old = region.require_gpu(&gpu_id)?;
        }
    }
    let provider_status = region.provider_status(&old.provider)?;
    check_bookable(&gpu_id, old.status, provider_status)?;
    // After the settling above, which may change the counters: what is read here stays valid
    // for the rest of the command.
    region.prefetch_status_change(
        &old.gpu_type,
        old.status,
        GpuStatus::Busy,
        &[stat::BOOKINGS_CREATED],
    )?;
    region.check_gpu_key_types(&gpu_id, &old.gpu_type, &old.provider)?;
    let type_price = region.load_type_price(&old.gpu_type)?;
    // The booking is charged what the GPU shows at this moment, demand multiplier included
    // (read once: the same figure tells `publish` whether the booking moved the multiplier).
    let multiplier = region.touch_type(&old.gpu_type, false)?;
    let price = ShownPrice::of(&old, type_price.as_ref(), multiplier).price;

    let version = region.next_seq()?;
    let booking = Booking::new(&gpu_id, &user_id, price, duration_s, now)
        .holding(&old.gpu_type, &old.provider);
    // Market state: no TTL. The booking clock ends it at `end_ms`.
    store.hset(&booking_key, &booking.to_fields());
    store.write(
        "HSET",
        &[
            region.keys.booking_registry().as_bytes(),
            booking_id.as_bytes(),
            gpu_id.as_bytes(),
        ],
    );
    let end = booking.end_ms.to_string();
    store.write(
        "ZADD",
        &[
            region.keys.booking_ends().as_bytes(),
            end.as_bytes(),
            booking_id.as_bytes(),
        ],
    );
    let mut new = old.clone();
    new.status = GpuStatus::Busy;
    new.booking = Some(booking_id.clone());
    new.booking_terms = Some(booking.terms());
    new.version = version;
    new.updated_ms = now;
    region.store_gpu(GpuWrite {
        gpu_id: &gpu_id,
        old: Some(&old),
        new: &new,
        old_provider_status: provider_status,
        new_provider_status: provider_status,
        type_price: type_price.as_ref(),
        expire_at_ms: region.gpu_expiry(now, true),
    })?;
    region.add_to_counter(stat::BOOKINGS_CREATED, 1);
    region.record_booking(now, booking.cost_micros())?;

    let mut event = Event::new(EventKind::BookingCreated, &region.name, now);
    event.gpu_id = Some(gpu_id.clone());
    event.gpu_type = Some(new.gpu_type.clone());
    event.provider_id = Some(new.provider.clone());
    event.booking_id = Some(booking_id.clone());
    event.user_id = Some(user_id);
    event.version = Some(new.version);
    event.changed("status", old.status.as_str(), new.status.as_str());
    event.changed("listed", true, false);
    event.new.insert("price".into(), price.to_string().into());
    event.new.insert("end_ms".into(), booking.end_ms.into());
    region.publish(notify::BOOKED, event)?;
    crate::booking_clock::booked(store.ctx(), &region.name, booking.end_ms);

    Ok(booking_reply(&booking_id, &booking, "created", new.version))
}

pub fn cancel(store: &Store, all: &[RedisString]) -> MarketResult<Out> {
    let mut args = Args::new(all, 2, 2)?;
    let region = Region::new(store, args.region()?);
    let booking_id = args.id("booking id")?;

    let booking_key = region.keys.booking(&booking_id);
    store.expect_types(&[(booking_key.as_str(), KeyType::Hash)])?;
    // A booking whose time is up is over, even in the moment before the booking clock ends it.
    let booking = region
        .load_booking(&booking_id)?
        .filter(|b| !b.has_ended(store.now_ms()))
        .ok_or_else(|| MarketError::NoBooking(booking_id.clone()))?;
    let released = region.close_booking(&booking_id, &booking, BookingEnd::Cancelled)?;
    let reply = Reply::new()
        .text("booking_id", booking_id.as_str())
        .text("gpu_id", booking.gpu_id.as_str());
    Ok(match released {
        Some(gpu) => reply
            .text("gpu_status", gpu.status.as_str())
            .int("gpu_version", gpu.version),
        None => reply.value("gpu_status", Out::Null),
    }
    .build())
}
