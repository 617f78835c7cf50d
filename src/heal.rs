//! Index healing after a record disappears on its own (TTL expiry or eviction).
//!
//! Redis reports the deletion through a keyspace event, but writing from inside that callback
//! is unsafe on Redis 7.0, so the callback only queues the key and arms a 1 ms timer; the
//! timer runs on the main thread like a command, repairs the indexes with replicated writes and
//! publishes the usual events. Only the primary heals: a replica receives the primary's repairs
//! through replication. Until the repair runs, reads already skip index entries whose record is
//! gone, so no read ever returns an expired GPU.

use crate::core::error::MarketResult;
use crate::core::events::{notify, Event, EventKind};
use crate::core::gpu::RegistryEntry;
use crate::core::price::Price;
use crate::keys::RegionKeys;
use crate::market::{stat, Region};
use crate::store::{select_db, selected_db, Store};
use redis_module::logging::RedisLogLevel;
use redis_module::server_events::{LoadingSubevent, ServerRole};
use redis_module::{Context, ContextFlags, NotifyEvent};
use redis_module_macros::{loading_event_handler, role_changed_event_handler};
use std::cell::RefCell;
use std::time::Duration;

thread_local! {
    // Keyspace events and timers both run on Redis's main thread.
    static PENDING: RefCell<Vec<(i32, String)>> = const { RefCell::new(Vec::new()) };
    static TIMER_ARMED: RefCell<bool> = const { RefCell::new(false) };
}

/// Upper bound on queued keys; beyond it further expiries are left to `GPUCACHE.REPAIR` (and
/// logged), so a mass expiry cannot grow the queue without bound.
const MAX_PENDING: usize = 1_000_000;

/// Keyspace-event handler for `expired` and `evicted`.
pub fn on_key_gone(ctx: &Context, _event_type: NotifyEvent, _event: &str, key: &[u8]) {
    let Ok(key) = std::str::from_utf8(key) else {
        return;
    };
    let Some((_, entity, _)) = RegionKeys::parse(key) else {
        return;
    };
    if !matches!(entity, "gpu" | "booking" | "price") {
        return;
    }
    PENDING.with(|pending| {
        let mut pending = pending.borrow_mut();
        if pending.len() < MAX_PENDING {
            pending.push((selected_db(ctx), key.to_owned()));
        } else {
            crate::log(
                ctx,
                RedisLogLevel::Warning,
                &format!("gpucache: heal queue full, {key} left for GPUCACHE.REPAIR"),
            );
        }
    });
    let must_arm = TIMER_ARMED.with(|armed| !armed.replace(true));
    if must_arm {
        ctx.create_timer(Duration::from_millis(1), drain, ());
    }
}

fn drain(ctx: &Context, _: ()) {
    TIMER_ARMED.with(|armed| armed.replace(false));
    let keys = PENDING.with(|pending| std::mem::take(&mut *pending.borrow_mut()));
    let flags = ctx.get_flags();
    if flags.contains(ContextFlags::SLAVE) || flags.contains(ContextFlags::LOADING) {
        return;
    }
    let original = selected_db(ctx);
    for (db, key) in keys {
        // The key expired in the db its event came from; heal there.
        if select_db(ctx, db) {
            heal_key(ctx, &key);
        }
    }
    select_db(ctx, original);
}

/// Completes a pending repair inside a write command that is about to create `key` anew.
///
/// Redis deletes an expired key when a command reads it, and announces it, but the repair runs
/// in a timer just after the command: a `REGISTER` of the same GPU id (or a `BOOK` reusing an
/// ended booking id) would otherwise build on the old record's index entries and counters.
/// Called once the command found the record gone; does nothing when no repair is pending.
pub fn settle_vanished(ctx: &Context, key: &str) {
    let Some((region, entity, id)) = RegionKeys::parse(key) else {
        return;
    };
    let keys = RegionKeys::new(region);
    let registry = match entity {
        "gpu" => keys.gpu_registry(),
        "booking" => keys.booking_registry(),
        _ => return,
    };
    // Cheap test first: a repair is pending only while the registry still lists the id.
    let store = Store::new(ctx);
    if let Ok(Some(_)) = store.hget(&registry, id) {
        heal_key(ctx, key);
    }
}

/// Repairs what one vanished record left behind. Returns whether anything was repaired.
fn heal_key(ctx: &Context, key: &str) -> bool {
    let Some((region, entity, id)) = RegionKeys::parse(key) else {
        return false;
    };
    let store = Store::new(ctx);
    let region = Region::new(&store, region.to_owned());
    if store.key_type(key) != redis_module::KeyType::Empty {
        return false; // written again since it expired
    }
    if region.check_key_types(&[]).is_err() {
        crate::log(
            ctx,
            RedisLogLevel::Warning,
            &format!("gpucache: cannot heal after {key}: foreign key types"),
        );
        return false;
    }
    let outcome = match entity {
        "gpu" => heal_gpu(&region, id),
        "booking" => heal_booking(&region, id),
        "price" => heal_type_price(&region, id),
        _ => Ok(false),
    };
    outcome.unwrap_or_else(|e| {
        crate::log(
            ctx,
            RedisLogLevel::Warning,
            &format!("gpucache: healing after {key} failed: {e}"),
        );
        false
    })
}

/// What a sweep repaired.
#[derive(Debug, Default, Clone, Copy)]
pub struct Swept {
    pub gpus: i64,
    pub bookings: i64,
    pub type_prices: i64,
    pub provider_members: i64,
}

/// Finds and repairs what records that vanished without an `expired`/`evicted` event left
/// behind: keys whose time passed while the server was down are not loaded from RDB/AOF, and
/// no event announces them. Runs after loading and on `GPUCACHE.REPAIR`. O(GPUs + bookings).
pub fn sweep_region(ctx: &Context, region_name: &str) -> MarketResult<Swept> {
    let store = Store::new(ctx);
    let region = Region::new(&store, region_name.to_owned());
    region.check_key_types(&[])?;
    let keys = &region.keys;
    let mut swept = Swept::default();
    for gpu_id in store.members("HKEYS", &keys.gpu_registry())? {
        let key = keys.gpu(&gpu_id);
        if store.key_type(&key) == redis_module::KeyType::Empty && heal_key(ctx, &key) {
            swept.gpus += 1;
        }
    }
    for booking_id in store.members("HKEYS", &keys.booking_registry())? {
        let key = keys.booking(&booking_id);
        if store.key_type(&key) == redis_module::KeyType::Empty && heal_key(ctx, &key) {
            swept.bookings += 1;
        }
    }
    // Provider sets may keep a GPU that moved to another provider while its old record had
    // vanished; drop members the registry does not give to that provider.
    for provider in store.members("SMEMBERS", &keys.providers())? {
        let members_key = keys.provider_gpus(&provider);
        for gpu_id in store.members("SMEMBERS", &members_key)? {
            let owner = store
                .hget(&keys.gpu_registry(), &gpu_id)?
                .and_then(|e| RegistryEntry::parse(&String::from_utf8_lossy(&e)))
                .map(|e| e.provider);
            if owner.as_deref() != Some(provider.as_str()) {
                store.write("SREM", &[members_key.as_bytes(), gpu_id.as_bytes()]);
                swept.provider_members += 1;
            }
        }
    }
    for gpu_type in store.members("SMEMBERS", &keys.types())? {
        let key = keys.type_price(&gpu_type);
        let typed = store.zcard(&keys.available_typed(&gpu_type))?;
        if typed > 0 && store.key_type(&key) == redis_module::KeyType::Empty && heal_key(ctx, &key)
        {
            swept.type_prices += 1;
        }
    }
    Ok(swept)
}

/// After an RDB/AOF load, sweep every region this server holds (on the primary; a replica gets
/// the primary's repairs through replication).
#[loading_event_handler]
fn after_loading(ctx: &Context, event: LoadingSubevent) {
    if event == LoadingSubevent::Ended {
        ctx.create_timer(Duration::from_millis(1), sweep_all, ());
    }
}

/// A replica promoted to primary takes over healing: sweep for repairs the old primary had
/// queued but not yet run when it failed.
#[role_changed_event_handler]
fn after_promotion(ctx: &Context, role: ServerRole) {
    if role == ServerRole::Primary {
        ctx.create_timer(Duration::from_millis(1), sweep_all, ());
    }
}

fn sweep_all(ctx: &Context, _: ()) {
    if ctx.get_flags().contains(ContextFlags::SLAVE) {
        return;
    }
    let original = selected_db(ctx);
    for (db, region) in crate::regions::known_everywhere() {
        if !select_db(ctx, db) {
            continue;
        }
        match sweep_region(ctx, &region) {
            Ok(s) if s.gpus + s.bookings + s.type_prices + s.provider_members > 0 => crate::log(
                ctx,
                RedisLogLevel::Notice,
                &format!(
                    "gpucache: region {region}: repaired {} GPUs, {} bookings, {} type prices, {} provider set members",
                    s.gpus, s.bookings, s.type_prices, s.provider_members
                ),
            ),
            Ok(_) => {}
            Err(e) => crate::log(
                ctx,
                RedisLogLevel::Warning,
                &format!("gpucache: sweeping region {region} failed: {e}"),
            ),
        }
    }
    select_db(ctx, original);
}

/// A GPU record expired: drop it from every index using the registry entry kept for it.
fn heal_gpu(region: &Region, gpu_id: &str) -> MarketResult<bool> {
    let store = region.store;
    let registry = region.keys.gpu_registry();
    let Some(entry) = store.hget(&registry, gpu_id)? else {
        return Ok(false);
    };
    let Some(entry) = RegistryEntry::parse(&String::from_utf8_lossy(&entry)) else {
        store.write("HDEL", &[registry.as_bytes(), gpu_id.as_bytes()]);
        return Ok(true);
    };
    let (gpu_type, provider) = (entry.gpu_type.as_str(), entry.provider.as_str());
    region.check_gpu_key_types(gpu_id, gpu_type, provider)?;
    // A booking the vanished GPU held cannot be served any more: it goes with it.
    let booking_registry = region.keys.booking_registry();
    let orphan = match &entry.booking {
        Some(booking_id) => store
            .hget(&booking_registry, booking_id)?
            .filter(|holder| holder.as_slice() == gpu_id.as_bytes())
            .map(|_| booking_id.clone()),
        None => None,
    };

    region.touch_type(gpu_type, false)?;
    region.unlist(gpu_id, gpu_type)?;
    region.add_to_counter(&stat::type_total(gpu_type), -1);
    store.write(
        "SREM",
        &[
            region.keys.provider_gpus(provider).as_bytes(),
            gpu_id.as_bytes(),
        ],
    );
    store.write("HDEL", &[registry.as_bytes(), gpu_id.as_bytes()]);
    region.add_to_counter(&stat::gpus_with_status(entry.status), -1);
    store.mark_written(&region.keys.gpu(gpu_id));
    if let Some(booking_id) = &orphan {
        store.write("DEL", &[region.keys.booking(booking_id).as_bytes()]);
        store.write(
            "HDEL",
            &[booking_registry.as_bytes(), booking_id.as_bytes()],
        );
        region.add_to_counter(stat::BOOKINGS_ENDED, 1);
    }

    let mut event = Event::new(
        EventKind::GpuAvailabilityChanged,
        &region.name,
        store.now_ms(),
    );
    event.reason = Some("expired");
    event.gpu_id = Some(gpu_id.to_owned());
    event.gpu_type = Some(gpu_type.to_owned());
    event.provider_id = Some(provider.to_owned());
    event.booking_id = orphan;
    event.changed("status", entry.status.as_str(), serde_json::Value::Null);
    region.publish(notify::EXPIRED, event)?;
    Ok(true)
}

/// A booking reached its end: the GPU it held becomes available again.
fn heal_booking(region: &Region, booking_id: &str) -> MarketResult<bool> {
    let store = region.store;
    let registry = region.keys.booking_registry();
    let Some(gpu_id) = store.hget(&registry, booking_id)? else {
        return Ok(false);
    };
    let gpu_id = String::from_utf8_lossy(&gpu_id).into_owned();
    let held = region.held_gpu(&gpu_id, booking_id)?;

    let now = store.now_ms();
    let version = match held {
        Some(_) => Some(region.next_seq()?),
        None => None,
    };
    store.write("HDEL", &[registry.as_bytes(), booking_id.as_bytes()]);
    store.mark_written(&region.keys.booking(booking_id));
    region.add_to_counter(stat::BOOKINGS_ENDED, 1);
    let mut event = Event::new(EventKind::BookingCancelled, &region.name, now);
    event.reason = Some("ended");
    event.booking_id = Some(booking_id.to_owned());
    event.gpu_id = Some(gpu_id.clone());
    if let (Some(held), Some(version)) = (&held, version) {
        region.release(&gpu_id, held, version, now, &mut event)?;
    }
    region.publish(notify::CANCELLED, event)?;
    Ok(true)
}

/// A type price expired: its GPUs show their own prices again, so they move back to the
/// own-price index with those prices.
fn heal_type_price(region: &Region, gpu_type: &str) -> MarketResult<bool> {
    let store = region.store;
    let typed = region.keys.available_typed(gpu_type);
    let own = region.keys.available_own(gpu_type);
    let members = store.members_of_range(&typed)?;
    region.touch_type(gpu_type, !members.is_empty())?;
    let mut moves: Vec<(String, Price)> = Vec::new();
    for gpu_id in members {
        if let Some(gpu) = region.load_gpu(&gpu_id)? {
            moves.push((gpu_id, gpu.own_price));
        }
    }
    store.write("DEL", &[typed.as_bytes()]);
    for (gpu_id, price) in &moves {
        let score = price.as_score().to_string();
        store.write(
            "ZADD",
            &[own.as_bytes(), score.as_bytes(), gpu_id.as_bytes()],
        );
        region.add_to_counter(&stat::own_price_sum(gpu_type), price.micros());
    }
    store.mark_written(&region.keys.type_price(gpu_type));
    let mut event = Event::new(EventKind::PricingUpdated, &region.name, store.now_ms());
    event.reason = Some("expired");
    event.gpu_type = Some(gpu_type.to_owned());
    event.new.insert("gpus_repriced".into(), moves.len().into());
    region.publish(notify::EXPIRED, event)?;
    Ok(true)
}
