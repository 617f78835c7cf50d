//! What a changed gpucache key means for the L1: the module's key scheme
//! (`gpucache:{<region>}:<entity>:<id>`, README "Keys") mapped to the tags whose cached entries
//! must go.

use crate::tags::Tag;

/// A gpucache key, split into its region, entity and id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyParts<'a> {
    pub region: &'a str,
    pub entity: &'a str,
    /// Empty for entities without an id (`stats:market`, `events`, ...: the entity is then the
    /// whole rest, e.g. `stats:market`).
    pub id: &'a str,
}

/// Splits `gpucache:{R}:entity:id`. `None` for keys outside the scheme.
pub fn parse_key(key: &str) -> Option<KeyParts<'_>> {
    let rest = key.strip_prefix("gpucache:{")?;
    let (region, rest) = rest.split_once("}:")?;
    if region.is_empty() || rest.is_empty() {
        return None;
    }
    let (entity, id) = match rest.split_once(':') {
        Some((entity, id)) if ID_ENTITIES.contains(&entity) => (entity, id),
        _ => (rest, ""),
    };
    Some(KeyParts { region, entity, id })
}

/// Entities whose keys end in an id (README "Keys").
const ID_ENTITIES: &[&str] = &[
    "gpu",
    "booking",
    "price",
    "provider",
    "provider-gpus",
    "avail-own",
    "avail-type",
    "avail-draining",
    "avail-score",
    "orderbook",
];

/// The tags a change of `key` invalidates. Keys of the scheme that no L1 entry depends on
/// (registries, the event stream) invalidate nothing; a key of the scheme this
/// version does not know drops the whole region, so a newer module can never leave a stale
/// entry behind.
pub fn tags_for_key(key: &str) -> Vec<Tag> {
    let Some(parts) = parse_key(key) else {
        return Vec::new();
    };
    let region = parts.region;
    match parts.entity {
        "gpu" => vec![Tag::gpu(region, parts.id)],
        // A type price (or demand multiplier) moves every GPU of the type, the type's ladder,
        // search results and price statistics.
        "price" => vec![
            Tag::type_price(region, parts.id),
            Tag::gpu_inputs(region),
            Tag::market(region),
            Tag::order_book(region, parts.id),
        ],
        "provider" => vec![Tag::provider(region, parts.id), Tag::gpu_inputs(region)],
        "avail-own" | "avail-type" | "avail-draining" | "avail-score" => {
            vec![Tag::market(region), Tag::order_book(region, parts.id)]
        }
        "orderbook" => vec![Tag::order_book(region, parts.id)],
        "stats:market" | "stats:24h" => vec![Tag::market(region)],
        "booking" => vec![Tag::booking(region, parts.id), Tag::gpu_inputs(region)],
        "provider-gpus"
        | "events"
        | "index:gpus"
        | "index:types"
        | "index:providers"
        | "index:bookings"
        | "index:provider-moves" => Vec::new(),
        _ => vec![Tag::region(region)],
    }
}

/// The event stream of a region.
pub fn events_key(region: &str) -> String {
    format!("gpucache:{{{region}}}:events")
}

/// The key of one GPU record.
pub fn gpu_key(region: &str, gpu_id: &str) -> String {
    format!("gpucache:{{{region}}}:gpu:{gpu_id}")
}

/// The keyspace-notification pattern of every gpucache key in database `db`. One pattern for
/// all regions: an ACL channel rule (`&__keyspace@0__:gpucache:*`) admits a `PSUBSCRIBE` only
/// of that exact pattern, so per-region patterns would need a rule each.
pub fn notification_pattern(db: i64) -> String {
    format!("__keyspace@{db}__:gpucache:*")
}

/// The keyspace-notification pattern of one region's keys (for tools run without ACLs).
pub fn region_notification_pattern(db: i64, region: &str) -> String {
    format!("__keyspace@{db}__:gpucache:{{{region}}}:*")
}

/// The key a keyspace-notification channel names.
pub fn key_of_channel(channel: &str) -> Option<&str> {
    let rest = channel.strip_prefix("__keyspace@")?;
    let (_, key) = rest.split_once("__:")?;
    Some(key)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_key_scheme() {
        let p = parse_key("gpucache:{eu-west}:gpu:a100:1").unwrap();
        assert_eq!((p.region, p.entity, p.id), ("eu-west", "gpu", "a100:1"));
        let p = parse_key("gpucache:{eu}:stats:market").unwrap();
        assert_eq!((p.entity, p.id), ("stats:market", ""));
        let p = parse_key("gpucache:{eu}:index:gpus").unwrap();
        assert_eq!((p.entity, p.id), ("index:gpus", ""));
        assert_eq!(parse_key("other:{eu}:gpu:g1"), None);
        assert_eq!(parse_key("gpucache:{}:gpu:g1"), None);
        assert_eq!(parse_key("gpucache:{eu}:"), None);
    }

    #[test]
    fn maps_keys_to_the_tags_they_invalidate() {
        assert_eq!(
            tags_for_key("gpucache:{eu}:gpu:g1"),
            vec![Tag::gpu("eu", "g1")]
        );
        assert_eq!(
            tags_for_key("gpucache:{eu}:price:A100"),
            vec![
                Tag::type_price("eu", "A100"),
                Tag::gpu_inputs("eu"),
                Tag::market("eu"),
                Tag::order_book("eu", "A100")
            ]
        );
        assert_eq!(
            tags_for_key("gpucache:{eu}:avail-own:A100"),
            vec![Tag::market("eu"), Tag::order_book("eu", "A100")]
        );
        assert_eq!(
            tags_for_key("gpucache:{eu}:avail-draining:A100"),
            vec![Tag::market("eu"), Tag::order_book("eu", "A100")]
        );
        assert_eq!(
            tags_for_key("gpucache:{eu}:stats:24h"),
            vec![Tag::market("eu")]
        );
        assert_eq!(
            tags_for_key("gpucache:{eu}:booking:b1"),
            vec![Tag::booking("eu", "b1"), Tag::gpu_inputs("eu")]
        );
        assert!(tags_for_key("gpucache:{eu}:index:bookings").is_empty());
        assert!(tags_for_key("gpucache:{eu}:events").is_empty());
        assert!(tags_for_key("unrelated").is_empty());
        assert_eq!(
            tags_for_key("gpucache:{eu}:new-entity:x"),
            vec![Tag::region("eu")]
        );
    }

    #[test]
    fn reads_keys_from_notification_channels() {
        assert_eq!(
            key_of_channel("__keyspace@0__:gpucache:{eu}:gpu:g1"),
            Some("gpucache:{eu}:gpu:g1")
        );
        assert_eq!(key_of_channel("__keyevent@0__:hset"), None);
        assert_eq!(notification_pattern(3), "__keyspace@3__:gpucache:*");
        assert_eq!(
            region_notification_pattern(3, "eu"),
            "__keyspace@3__:gpucache:{eu}:*"
        );
    }
}
