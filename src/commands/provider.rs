//! `GPUCACHE.PROVIDER region provider_id online|offline|maintenance`
//!
//! The provider's status changes at once: `GET` shows it on each of the provider's GPUs,
//! `AVAILABLE` and `BOOK` refuse GPUs of a provider that is not online. Its GPUs then leave (or
//! rejoin) the availability index — what `ORDERBOOK` and `STATS` count: inside this command
//! for a provider with at most `provider_moves::INLINE_GPUS` GPUs in the region, else a slice
//! at a time right after it (`provider_moves.rs`), so the command costs O(1) however many GPUs
//! the provider has. GPU records are not rewritten (their versions stay), but each GPU key gets
//! a `gpucache.provider` notification as it is moved, since what `GET` shows for it changed.

use super::{Args, Out, Reply};
use crate::core::error::MarketResult;
use crate::core::events::{notify, Event, EventKind};
use crate::core::status::ProviderStatus;
use crate::market::{provider_field, Region};
use crate::provider_moves::{self, Moved, INLINE_GPUS};
use crate::store::Store;
use redis_module::{KeyType, RedisString};

pub fn command(store: &Store, all: &[RedisString]) -> MarketResult<Out> {
    let mut args = Args::new(all, 3, 3)?;
    let region = Region::new(store, args.region()?);
    let provider_id = args.id("provider id")?;
    let target = ProviderStatus::parse(args.required("provider status")?)?;

    let provider_key = region.keys.provider(&provider_id);
    let members_key = region.keys.provider_gpus(&provider_id);
    let moves_key = region.keys.provider_moves();
    region.check_key_types(&[
        (provider_key.as_str(), KeyType::Hash),
        (members_key.as_str(), KeyType::Set),
        (moves_key.as_str(), KeyType::Set),
    ])?;
    let old_status = region.provider_status(&provider_id)?;
    let gpus = store.length(&members_key);
    // A small provider is read and checked whole before the first write, as before.
    let inline = if gpus <= INLINE_GPUS {
        let members = store.members("SMEMBERS", &members_key)?;
        Some(provider_moves::prepare(&region, &provider_id, &members)?)
    } else {
        None
    };

    let now = store.now_ms();
    let version = region.next_seq()?;
    store.hset(
        &provider_key,
        &[
            (provider_field::STATUS, target.as_str().to_owned()),
            (provider_field::VERSION, version.to_string()),
            (provider_field::UPDATED_MS, now.to_string()),
        ],
    );
    store.write(
        "SADD",
        &[region.keys.providers().as_bytes(), provider_id.as_bytes()],
    );
    let (moved, pending) = match &inline {
        Some(prepared) => {
            let moved = provider_moves::apply(&region, prepared, target)?;
            if store.length(&moves_key) > 0 {
                store.write("SREM", &[moves_key.as_bytes(), provider_id.as_bytes()]);
            }
            provider_moves::cancel(store.ctx(), &region.name, &provider_id);
            (moved, 0)
        }
        None => {
            store.write("SADD", &[moves_key.as_bytes(), provider_id.as_bytes()]);
            provider_moves::queue(store.ctx(), &region.name, &provider_id);
            (Moved::default(), gpus)
        }
    };

    let mut event = Event::new(EventKind::ProviderStatusChanged, &region.name, now);
    event.provider_id = Some(provider_id.clone());
    event.version = Some(version);
    event.changed("status", old_status.as_str(), target.as_str());
    event.new.insert("gpus_listed".into(), moved.listed.into());
    event
        .new
        .insert("gpus_unlisted".into(), moved.unlisted.into());
    event.new.insert("gpus_pending".into(), pending.into());
    region.publish(notify::PROVIDER, event)?;

    Ok(Reply::new()
        .text("provider_id", provider_id)
        .text("status", target.as_str())
        .int("version", version)
        .int(
            "gpus",
            if inline.is_some() {
                moved.gpus
            } else {
                gpus as i64
            },
        )
        .int("gpus_listed", moved.listed)
        .int("gpus_unlisted", moved.unlisted)
        .int("gpus_pending", pending as i64)
        .build())
}
