//! `GPUCACHE.PRICE region gpu_type price`
//!
//! Sets the hourly price of every GPU of a type in the region without touching the GPUs: the
//! type price carries a region sequence number and wins over any own price set before it
//! (`core::gpu::price_source`). Only the availability index moves: listed GPUs that showed an
//! own price join the type's "type price" set. Each GPU moves there at most once per
//! `REGISTER`, so the work is amortised O(1) per GPU rather than O(GPUs of the type) per call.
//!
//! At most `type_drains::INLINE_GPUS` own-priced GPUs move inside the command. More are
//! renamed at once to the type's `avail-draining` key, which readers count as type-priced,
//! and reach `avail-type` a slice at a time on the ticker (`type_drains.rs`). When a draining
//! key is still there from an earlier `PRICE`, the smaller of the two sets is copied into the
//! larger: O(min) — the own-price set then holds only GPUs re-priced since that `PRICE`.

use super::{Args, Out, Reply};
use crate::core::error::MarketResult;
use crate::core::events::{notify, Event, EventKind};
use crate::core::price::Price;
use crate::market::{price_field, stat, Region};
use crate::store::Store;
use crate::type_drains::{self, INLINE_GPUS};
use redis_module::{KeyType, RedisString};

pub fn command(store: &Store, all: &[RedisString]) -> MarketResult<Out> {
    let mut args = Args::new(all, 3, 3)?;
    let region = Region::new(store, args.region()?);
    let gpu_type = args.id("GPU type")?;
    let price = Price::parse(args.required("price")?)?;

    let price_key = region.keys.type_price(&gpu_type);
    let own = region.keys.available_own(&gpu_type);
    let typed = region.keys.available_typed(&gpu_type);
    let draining = region.keys.available_draining(&gpu_type);
    region.check_key_types(&[
        (price_key.as_str(), KeyType::Hash),
        (own.as_str(), KeyType::ZSet),
        (typed.as_str(), KeyType::ZSet),
        (draining.as_str(), KeyType::ZSet),
    ])?;
    let old = region.load_type_price(&gpu_type)?;
    let moved = store.zcard(&own)?;
    let already_typed = region.typed_count(&gpu_type)?;
    let still_draining = store.zcard(&draining)?;

    // Listed GPUs of the type move within its order book (their shown price changes).
    if moved + already_typed > 0 {
        region.touch_type(&gpu_type, true)?;
    }
    let now = store.now_ms();
    let seq = region.next_seq()?;
    let version = seq;
    store.hset(
        &price_key,
        &[
            (price_field::PRICE, price.to_string()),
            (price_field::SEQ, seq.to_string()),
            (price_field::VERSION, version.to_string()),
            (price_field::UPDATED_MS, now.to_string()),
        ],
    );
    store.pexpire_at(&price_key, region.pricing_expire_at(now));
    store.write(
        "SADD",
        &[region.keys.types().as_bytes(), gpu_type.as_bytes()],
    );
    if moved > 0 {
        if moved <= INLINE_GPUS {
            // `ZADD` of the few rather than `ZUNIONSTORE`, which rebuilds the whole type-price
            // set: O(|own| log n), not O(|avail-type|) (10 GPUs next to 100,000 type-priced
            // ones: 0.4 ms instead of 255-465 ms, scripts/stall-price.sh).
            let members = store.members_of_range(&own)?;
            let mut args: Vec<&[u8]> = Vec::with_capacity(1 + 2 * members.len());
            args.push(typed.as_bytes());
            for member in &members {
                args.push(b"0");
                args.push(member.as_bytes());
            }
            if !members.is_empty() {
                store.write("ZADD", &args);
            }
            store.write("DEL", &[own.as_bytes()]);
        } else {
            start_drain(store, &own, &draining, moved, still_draining)?;
            store.mark_written(&draining);
            type_drains::queue(store.ctx(), &region.name, &gpu_type);
        }
        // The sum goes with the index; counters changed so far are written first, so the
        // deferred `HSET` cannot bring the field back.
        region.flush_counters();
        let own_sum = stat::own_price_sum(&gpu_type);
        store.write(
            "HDEL",
            &[region.keys.stats().as_bytes(), own_sum.as_bytes()],
        );
        region.forget_counter(&own_sum);
    }

    let mut event = Event::new(EventKind::PricingUpdated, &region.name, now);
    event.gpu_type = Some(gpu_type.clone());
    event.version = Some(version);
    event.changed(
        "price",
        old.map_or(serde_json::Value::Null, |o| o.price.to_string().into()),
        price.to_string(),
    );
    region.publish(notify::PRICE, event)?;

    Ok(Reply::new()
        .text("type", gpu_type)
        .text("price", price.to_string())
        .int("version", version)
        .int("listed_gpus", moved + already_typed)
        .build())
}

/// Moves every member of the own-price set `own` (more than `INLINE_GPUS`) into `draining`:
/// a `RENAME` when nothing drains yet, else the smaller set copied into the larger.
fn start_drain(
    store: &Store,
    own: &str,
    draining: &str,
    own_count: i64,
    draining_count: i64,
) -> MarketResult<()> {
    if draining_count == 0 {
        store.write("RENAME", &[own.as_bytes(), draining.as_bytes()]);
        return Ok(());
    }
    let (from, into) = if own_count <= draining_count {
        (own, draining)
    } else {
        (draining, own)
    };
    let members = store.members_of_range_with_scores(from)?;
    for chunk in members.chunks(COPY_CHUNK) {
        let scores: Vec<String> = chunk.iter().map(|(_, s)| s.to_string()).collect();
        let mut args: Vec<&[u8]> = Vec::with_capacity(1 + 2 * chunk.len());
        args.push(into.as_bytes());
        for ((member, _), score) in chunk.iter().zip(&scores) {
            args.push(score.as_bytes());
            args.push(member.as_bytes());
        }
        store.write("ZADD", &args);
    }
    store.write("DEL", &[from.as_bytes()]);
    if into == own {
        store.write("RENAME", &[own.as_bytes(), draining.as_bytes()]);
    }
    Ok(())
}

/// Members per `ZADD` when one set is copied into another.
const COPY_CHUNK: usize = 1_000;
