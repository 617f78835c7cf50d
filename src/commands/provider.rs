//! `GPUCACHE.PROVIDER region provider_id online|offline|maintenance`
//!
//! All of the provider's GPUs in the region leave (or rejoin) the availability index in this
//! one command. Their records are not rewritten: a GPU's `provider_status` in `GET` is read from
//! the provider record, so the GPUs' versions stay, but each GPU key still gets a
//! `gpucache.provider` notification because what `GET` shows for it changed.

use super::{Args, Out, Reply};
use crate::core::error::MarketResult;
use crate::core::events::{notify, Event, EventKind};
use crate::core::gpu::{GpuRecord, TypePrice};
use crate::core::status::{is_listed, ProviderStatus};
use crate::market::{provider_field, Region};
use crate::store::Store;
use redis_module::{KeyType, RedisString};
use std::collections::HashMap;

pub fn command(store: &Store, all: &[RedisString]) -> MarketResult<Out> {
    let mut args = Args::new(all, 3, 3)?;
    let region = Region::new(store, args.region()?);
    let provider_id = args.id("provider id")?;
    let target = ProviderStatus::parse(args.required("provider status")?)?;

    let provider_key = region.keys.provider(&provider_id);
    let members_key = region.keys.provider_gpus(&provider_id);
    region.check_key_types(&[
        (provider_key.as_str(), KeyType::Hash),
        (members_key.as_str(), KeyType::Set),
    ])?;
    let old_status = region.provider_status(&provider_id)?;

    // Read every GPU and the prices of their types before the first write.
    let mut gpus: Vec<(String, GpuRecord)> = Vec::new();
    let mut type_prices: HashMap<String, Option<TypePrice>> = HashMap::new();
    for gpu_id in store.members("SMEMBERS", &members_key)? {
        let Some(gpu) = region.load_gpu(&gpu_id)? else {
            continue; // expired; the expiry handler removes it from the set
        };
        if gpu.provider != provider_id {
            continue; // a stale member (REPAIR removes it): the GPU belongs to another provider
        }
        region.check_gpu_key_types(&gpu_id, &gpu.gpu_type, &provider_id)?;
        if !type_prices.contains_key(&gpu.gpu_type) {
            let price = region.load_type_price(&gpu.gpu_type)?;
            type_prices.insert(gpu.gpu_type.clone(), price);
        }
        gpus.push((gpu_id, gpu));
    }

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
    let (mut listed, mut unlisted) = (0, 0);
    for (gpu_id, gpu) in &gpus {
        store.mark_written(&region.keys.gpu(gpu_id));
        let was = is_listed(gpu.status, old_status);
        let now_listed = is_listed(gpu.status, target);
        if was && !now_listed {
            region.unlist(gpu_id, &gpu.gpu_type)?;
            unlisted += 1;
        } else if !was && now_listed {
            let type_price = type_prices.get(&gpu.gpu_type).copied().flatten();
            region.list(gpu_id, gpu, type_price.as_ref())?;
            listed += 1;
        }
    }

    let mut event = Event::new(EventKind::ProviderStatusChanged, &region.name, now);
    event.provider_id = Some(provider_id.clone());
    event.version = Some(version);
    event.changed("status", old_status.as_str(), target.as_str());
    event.new.insert("gpus_listed".into(), listed.into());
    event.new.insert("gpus_unlisted".into(), unlisted.into());
    region.publish(notify::PROVIDER, event)?;

    Ok(Reply::new()
        .text("provider_id", provider_id)
        .text("status", target.as_str())
        .int("version", version)
        .int("gpus", gpus.len() as i64)
        .int("gpus_listed", listed)
        .int("gpus_unlisted", unlisted)
        .build())
}
