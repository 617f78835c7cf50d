//! `GPUCACHE.INVALIDATE region key-or-entity [key-or-entity ...]`
//!
//! Changes no data: fires `gpucache.invalidate` on each named key and appends one
//! `manual_invalidation` event listing them, so consumers drop those cached entries exactly as
//! they would after a change. Arguments are full keys of the region (any key family of the README
//! "Keys" table, or an `orderbook:<type>` channel key: `gpucache:{eu}:gpu:g1`,
//! `gpucache:{eu}:stats:24h`), `<entity>:<id>` shorthands (`gpu:g1`, `price:A100`,
//! `avail-score:A100`, `orderbook:A100`), or `stats`, `available` (every availability index of the
//! region: own-price, type-price and score sets) and `region` (everything above).

use super::{Args, Out};
use crate::core::error::{MarketError, MarketResult};
use crate::core::events::{notify, Event, EventKind};
use crate::core::input;
use crate::keys::RegionKeys;
use crate::market::Region;
use crate::store::Store;
use redis_module::RedisString;

pub const MAX_TARGETS: usize = 1000;
/// Key families named `<entity>:<id>`, as full keys and as shorthands: the README "Keys" table's
/// records and per-type indexes, and the `orderbook:<type>` notification channel.
const ENTITIES: [&str; 10] = [
    "gpu",
    "booking",
    "provider",
    "provider-gpus",
    "price",
    "avail-own",
    "avail-type",
    "avail-draining",
    "avail-score",
    "orderbook",
];
/// The region's keys with a fixed name (`<entity>:<name>`, or `events` alone), accepted as full
/// keys; `stats` names the counters hash.
const FIXED: [(&str, &str); 9] = [
    ("stats", "market"),
    ("stats", "24h"),
    ("index", "gpus"),
    ("index", "types"),
    ("index", "providers"),
    ("index", "bookings"),
    ("index", "booking-ends"),
    ("index", "provider-moves"),
    ("events", ""),
];

fn expand(region: &Region, target: &[u8], types: &[String]) -> MarketResult<Vec<String>> {
    let text = std::str::from_utf8(target).map_err(|_| bad_target(target))?;
    let keys = &region.keys;
    let availability = || {
        types
            .iter()
            .flat_map(|t| {
                [
                    keys.available_own(t),
                    keys.available_typed(t),
                    keys.available_draining(t),
                    keys.available_by_score(t),
                ]
            })
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
            Some((r, entity, id)) if r == region.name => {
                if FIXED.contains(&(entity, id)) {
                    // `text` is exactly that key: prefix, then `entity[:id]`.
                    return Ok(vec![text.to_owned()]);
                }
                (entity, id)
            }
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
