//! `GPUCACHE.CHECK region` — recounts a region from its records and reports every place where
//! an index, counter or booking link disagrees with them. Read-only; O(GPUs + bookings).
//!
//! Invariants (README "Invariants"):
//! 1. The availability indexes hold exactly the GPUs that are available and whose provider is
//!    online: own-priced ones in `avail-own` scored by their own price, type-priced ones in
//!    `avail-type`, and all of them in `avail-score` scored by their performance score.
//! 2. Every active booking points at a busy GPU that points back at it, and vice versa.
//! 3. The registry, provider sets and counters (GPUs per status and per type, own-price sums)
//!    equal a recount of the records.

use super::{Args, Out, Reply};
use crate::core::error::MarketResult;
use crate::core::gpu::{price_source, GpuRecord, PriceSource, RegistryEntry, TypePrice};
use crate::core::price::Price;
use crate::core::status::{is_listed, GpuStatus};
use crate::market::{stat, Region};
use crate::store::Store;
use redis_module::RedisString;
use std::collections::{BTreeMap, BTreeSet};

/// Reports are capped so a badly broken region still answers quickly and readably.
const MAX_REPORTED: usize = 100;

struct Findings {
    violations: Vec<String>,
    total: usize,
}

impl Findings {
    fn add(&mut self, message: String) {
        self.total += 1;
        if self.violations.len() < MAX_REPORTED {
            self.violations.push(message);
        }
    }
}

fn int_field(fields: &BTreeMap<String, String>, name: &str) -> i64 {
    fields.get(name).and_then(|v| v.parse().ok()).unwrap_or(0)
}

fn zset_members(region: &Region, key: &str) -> MarketResult<BTreeMap<String, f64>> {
    let reply = region.store.members_of_range_with_scores(key)?;
    Ok(reply.into_iter().collect())
}

pub fn command(store: &Store, all: &[RedisString]) -> MarketResult<Out> {
    let mut args = Args::new(all, 1, 1)?;
    let region = Region::new(store, args.region()?);
    let keys = &region.keys;
    let mut findings = Findings {
        violations: Vec::new(),
        total: 0,
    };

    let registry: BTreeMap<String, String> = text_pairs(store.hgetall(&keys.gpu_registry())?);
    let stats: BTreeMap<String, String> = text_pairs(store.hgetall(&keys.stats())?);
    let booking_registry: BTreeMap<String, String> =
        text_pairs(store.hgetall(&keys.booking_registry())?);
    let types: BTreeSet<String> = store
        .members("SMEMBERS", &keys.types())?
        .into_iter()
        .collect();

    let mut gpus: BTreeMap<String, GpuRecord> = BTreeMap::new();
    for (gpu_id, entry) in &registry {
        match region.load_gpu(gpu_id) {
            Ok(Some(gpu)) => {
                let expected = RegistryEntry::of(&gpu).to_string();
                if *entry != expected {
                    findings.add(format!(
                        "registry entry of {gpu_id} is '{entry}', record says '{expected}'"
                    ));
                }
                gpus.insert(gpu_id.clone(), gpu);
            }
            Ok(None) => findings.add(format!(
                "registry lists {gpu_id} but its record is gone (expiry not healed yet?)"
            )),
            Err(e) => findings.add(format!("record of {gpu_id}: {e}")),
        }
    }

    let mut type_prices: BTreeMap<String, Option<TypePrice>> = BTreeMap::new();
    let mut provider_status = BTreeMap::new();
    let mut status_counts: BTreeMap<GpuStatus, i64> = BTreeMap::new();
    let mut type_totals: BTreeMap<String, i64> = BTreeMap::new();
    let mut expected_own: BTreeMap<String, BTreeMap<String, Price>> = BTreeMap::new();
    let mut expected_typed: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let mut expected_score: BTreeMap<String, BTreeMap<String, f64>> = BTreeMap::new();
    let mut provider_members: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (gpu_id, gpu) in &gpus {
        *status_counts.entry(gpu.status).or_default() += 1;
        *type_totals.entry(gpu.gpu_type.clone()).or_default() += 1;
        if !types.contains(&gpu.gpu_type) {
            findings.add(format!(
                "type {} of {gpu_id} is missing from the type set",
                gpu.gpu_type
            ));
        }
        provider_members
            .entry(gpu.provider.clone())
            .or_default()
            .insert(gpu_id.clone());
        if !type_prices.contains_key(&gpu.gpu_type) {
            type_prices.insert(gpu.gpu_type.clone(), region.load_type_price(&gpu.gpu_type)?);
        }
        if !provider_status.contains_key(&gpu.provider) {
            provider_status.insert(gpu.provider.clone(), region.provider_status(&gpu.provider)?);
        }
        let provider = provider_status
            .get(&gpu.provider)
            .copied()
            .unwrap_or_default();
        if is_listed(gpu.status, provider) {
            let type_price = type_prices.get(&gpu.gpu_type).copied().flatten();
            match price_source(gpu.price_seq, type_price.as_ref()) {
                PriceSource::Own => {
                    expected_own
                        .entry(gpu.gpu_type.clone())
                        .or_default()
                        .insert(gpu_id.clone(), gpu.own_price);
                }
                PriceSource::Type => {
                    expected_typed
                        .entry(gpu.gpu_type.clone())
                        .or_default()
                        .insert(gpu_id.clone());
                }
            }
            expected_score
                .entry(gpu.gpu_type.clone())
                .or_default()
                .insert(gpu_id.clone(), gpu.score.unwrap_or(0.0));
        }
        match &gpu.booking {
            Some(booking_id) => {
                if gpu.status != GpuStatus::Busy {
                    findings.add(format!(
                        "{gpu_id} holds booking {booking_id} but is {}",
                        gpu.status.as_str()
                    ));
                }
                match region.load_booking(booking_id)? {
                    Some(b) if b.gpu_id == *gpu_id => {}
                    Some(b) => findings.add(format!(
                        "{gpu_id} holds booking {booking_id}, which is for {}",
                        b.gpu_id
                    )),
                    None => findings.add(format!(
                        "{gpu_id} holds booking {booking_id}, which does not exist"
                    )),
                }
            }
            None if gpu.status == GpuStatus::Busy => {
                findings.add(format!("{gpu_id} is busy without a booking"))
            }
            None => {}
        }
    }

    // Every active booking points at a GPU that points back.
    for (booking_id, gpu_id) in &booking_registry {
        match region.load_booking(booking_id)? {
            None => findings.add(format!(
                "booking registry lists {booking_id} but its record is gone"
            )),
            Some(b) if b.gpu_id != *gpu_id => findings.add(format!(
                "booking {booking_id} is for {} but the registry says {gpu_id}",
                b.gpu_id
            )),
            Some(_) => {}
        }
        match gpus.get(gpu_id) {
            Some(gpu) if gpu.booking.as_deref() == Some(booking_id.as_str()) => {}
            Some(_) => findings.add(format!(
                "booking {booking_id} is for {gpu_id}, which does not hold it"
            )),
            None => findings.add(format!(
                "booking {booking_id} is for {gpu_id}, which is not registered"
            )),
        }
    }
    for (gpu_id, gpu) in &gpus {
        if let Some(booking_id) = &gpu.booking {
            if !booking_registry.contains_key(booking_id) {
                findings.add(format!(
                    "booking {booking_id} of {gpu_id} is missing from the booking registry"
                ));
            }
        }
    }

    // Indexes against the recount.
    for gpu_type in &types {
        let own = zset_members(&region, &keys.available_own(gpu_type))?;
        let wanted_own = expected_own.remove(gpu_type).unwrap_or_default();
        compare_scored(
            &mut findings,
            &format!("avail-own:{gpu_type}"),
            &own,
            &wanted_own
                .iter()
                .map(|(k, p)| (k.clone(), p.as_score()))
                .collect(),
        );
        let typed: BTreeMap<String, f64> = zset_members(&region, &keys.available_typed(gpu_type))?;
        let wanted_typed: BTreeMap<String, f64> = expected_typed
            .remove(gpu_type)
            .unwrap_or_default()
            .into_iter()
            .map(|k| (k, 0.0))
            .collect();
        compare_scored(
            &mut findings,
            &format!("avail-type:{gpu_type}"),
            &typed,
            &wanted_typed,
        );
        let by_score = zset_members(&region, &keys.available_by_score(gpu_type))?;
        let wanted_score = expected_score.remove(gpu_type).unwrap_or_default();
        compare_scored(
            &mut findings,
            &format!("avail-score:{gpu_type}"),
            &by_score,
            &wanted_score,
        );

        let own_sum: i64 = wanted_own.values().map(|p| p.micros()).sum();
        let counted_sum = int_field(&stats, &stat::own_price_sum(gpu_type));
        if own_sum != counted_sum {
            findings.add(format!(
                "own-price sum of {gpu_type} is {counted_sum}, recount gives {own_sum}"
            ));
        }
        let total = type_totals.get(gpu_type).copied().unwrap_or(0);
        let counted_total = int_field(&stats, &stat::type_total(gpu_type));
        if total != counted_total {
            findings.add(format!(
                "GPU count of type {gpu_type} is {counted_total}, recount gives {total}"
            ));
        }
    }
    for status in GpuStatus::ALL {
        let recount = status_counts.get(&status).copied().unwrap_or(0);
        let counted = int_field(&stats, &stat::gpus_with_status(status));
        if recount != counted {
            findings.add(format!(
                "{} GPU count is {counted}, recount gives {recount}",
                status.as_str()
            ));
        }
    }
    // Providers known to the region, with or without GPUs now: a stale member of a provider
    // whose GPUs all moved away is found too.
    let known_providers: BTreeSet<String> = store
        .members("SMEMBERS", &keys.providers())?
        .into_iter()
        .collect();
    for provider in provider_members.keys() {
        if !known_providers.contains(provider) {
            findings.add(format!(
                "provider {provider} is missing from the provider set"
            ));
        }
    }
    for provider in &known_providers {
        provider_members.entry(provider.clone()).or_default();
    }
    for (provider, members) in &provider_members {
        let stored: BTreeSet<String> = store
            .members("SMEMBERS", &keys.provider_gpus(provider))?
            .into_iter()
            .collect();
        for missing in members.difference(&stored) {
            findings.add(format!(
                "{missing} is missing from the GPU set of provider {provider}"
            ));
        }
        for extra in stored.difference(members) {
            findings.add(format!(
                "provider {provider}'s GPU set holds {extra}, which is not its GPU"
            ));
        }
    }

    let violations = findings.violations.into_iter().map(Out::Text).collect();
    Ok(Reply::new()
        .text("region", region.name.as_str())
        .int("ok", i64::from(findings.total == 0))
        .int("gpus_checked", gpus.len() as i64)
        .int("bookings_checked", booking_registry.len() as i64)
        .int("violations_total", findings.total as i64)
        .value("violations", Out::Array(violations))
        .build())
}

fn text_pairs(pairs: Vec<(Vec<u8>, Vec<u8>)>) -> BTreeMap<String, String> {
    pairs
        .into_iter()
        .map(|(k, v)| {
            (
                String::from_utf8_lossy(&k).into_owned(),
                String::from_utf8_lossy(&v).into_owned(),
            )
        })
        .collect()
}

fn compare_scored(
    findings: &mut Findings,
    index: &str,
    stored: &BTreeMap<String, f64>,
    wanted: &BTreeMap<String, f64>,
) {
    for (gpu_id, score) in wanted {
        match stored.get(gpu_id) {
            None => findings.add(format!("{gpu_id} should be in {index} but is not")),
            Some(s) if (s - score).abs() > 1e-9 => findings.add(format!(
                "{gpu_id} has score {s} in {index}, expected {score}"
            )),
            Some(_) => {}
        }
    }
    for gpu_id in stored.keys().filter(|k| !wanted.contains_key(*k)) {
        findings.add(format!("{gpu_id} is in {index} but should not be"));
    }
}
