//! `GPUCACHE.REPAIR` and the repairs the module queues itself: put a region back in order.
//!
//! (First step: the sweep of records that vanished silently; the full rebuild follows.)

use crate::core::error::MarketResult;
use crate::core::gpu::RegistryEntry;
use crate::keys::RegionKeys;
use crate::market::Region;
use crate::store::Store;
use redis_module::{Context, KeyType};

/// What a repair did.
#[derive(Debug, Default, Clone, Copy)]
pub struct RepairReport {
    pub gpus: i64,
    pub bookings: i64,
    pub type_prices: i64,
    pub provider_members: i64,
    /// Writes Redis refused: the repair must run again.
    pub failed_writes: u32,
}

pub fn repair_region(ctx: &Context, region_name: &str) -> MarketResult<RepairReport> {
    let store = Store::new(ctx);
    let region = Region::new(&store, region_name.to_owned());
    region.check_key_types(&[])?;
    let keys: &RegionKeys = &region.keys;
    let mut report = RepairReport::default();
    for gpu_id in store.members("HKEYS", &keys.gpu_registry())? {
        if store.key_type(&keys.gpu(&gpu_id)) == KeyType::Empty {
            let inner = Store::new(ctx);
            let r = Region::new(&inner, region_name.to_owned());
            if crate::heal::heal_gpu(&r, &gpu_id)? {
                report.gpus += 1;
            }
            report.failed_writes += inner.failed_writes();
        }
    }
    for provider in store.members("SMEMBERS", &keys.providers())? {
        let members_key = keys.provider_gpus(&provider);
        for gpu_id in store.members("SMEMBERS", &members_key)? {
            let owner = store
                .hget(&keys.gpu_registry(), &gpu_id)?
                .and_then(|e| RegistryEntry::parse(&String::from_utf8_lossy(&e)))
                .map(|e| e.provider);
            if owner.as_deref() != Some(provider.as_str()) {
                store.write("SREM", &[members_key.as_bytes(), gpu_id.as_bytes()]);
                report.provider_members += 1;
            }
        }
    }
    report.failed_writes += store.failed_writes();
    Ok(report)
}
