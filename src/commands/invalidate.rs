//! `GPUCACHE.INVALIDATE region key-or-entity [key-or-entity ...]`
//!
//! Changes no data: fires `gpucache.invalidate` on each named key and appends one
//! `manual_invalidation` event listing them, so consumers drop those cached entries exactly as
//! they would after a change. Arguments are full keys of the region
//! (`gpucache:{eu}:gpu:g1`), `<entity>:<id>` shorthands (`gpu:g1`, `price:A100`), or `stats`,
//! `available` (every availability index of the region) and `region` (everything above).

use super::{Args, Out};
use crate::core::error::{MarketError, MarketResult};
use crate::core::events::{notify, Event, EventKind};
use crate::core::input;
use crate::keys::RegionKeys;
use crate::market::Region;
use crate::store::Store;
use redis_module::RedisString;

pub const MAX_TARGETS: usize = 1000;
const ENTITIES: [&str; 7] = [
    "gpu",
    "booking",
    "provider",
    "provider-gpus",
    "price",
    "avail-own",
    "avail-type",
];

fn expand(region: &Region, target: &[u8], types: &[String]) -> MarketResult<Vec<String>> {
    let text = std::str::from_utf8(target).map_err(|_| bad_target(target))?;
    let keys = &region.keys;
    let availability = || {
        types
            .iter()
            .flat_map(|t| [keys.available_own(t), keys.available_typed(t)])
            .collect::<Vec<_>>()
    };
    if text.eq_ignore_ascii_case("stats") {
        return Ok(vec![keys.stats()]);
    }
    if text.eq_ignore_ascii_case("available") {
        return Ok(availability());
    }
    if text.eq_ignore_ascii_case("region") {
        let mut all = availability();
        all.push(keys.stats());
        return Ok(all);
    }
    let (entity, id) = if text.starts_with("gpucache:") {
        match RegionKeys::parse(text) {
            Some((r, entity, id)) if r == region.name => (entity, id),
            Some(_) => {
                return Err(MarketError::syntax(format!(
                    "key '{text}' belongs to another region"
                )))
            }
            None => return Err(bad_target(target)),
        }
    } else {
        text.split_once(':').ok_or_else(|| bad_target(target))?
    };
    if !ENTITIES.contains(&entity) {
        return Err(bad_target(target));
    }
    input::id("entity id", id.as_bytes())?;
    Ok(vec![format!("{}{entity}:{id}", keys.prefix())])
}

fn bad_target(target: &[u8]) -> MarketError {
    MarketError::syntax(format!(
        "cannot invalidate '{}': expected a key of the region, <entity>:<id> ({}), stats, available or region",
        input::shown(target, 128),
        ENTITIES.join(", ")
    ))
}

pub fn command(store: &Store, all: &[RedisString]) -> MarketResult<Out> {
    let mut args = Args::new(all, 2, MAX_TARGETS + 1)?;
    let region = Region::new(store, args.region()?);
    region.check_key_types(&[])?;
    let types = store.members("SMEMBERS", &region.keys.types())?;
    let mut keys: Vec<String> = Vec::new();
    for target in args.remaining() {
        for key in expand(&region, target, &types)? {
            if !keys.contains(&key) {
                keys.push(key);
            }
        }
    }
    let count = keys.len() as i64;
    // Not `Region::publish`: that would name the stats key `gpucache.stats`, while a manual
    // invalidation sends `gpucache.invalidate` on every key alike.
    let mut event = Event::new(EventKind::ManualInvalidation, &region.name, store.now_ms());
    event.keys = keys.clone();
    region.append_event(&event);
    for key in &keys {
        store.notify(notify::INVALIDATE, key);
    }
    Ok(Out::Int(count))
}
