//! The key scheme, in one place: `gpucache:{<region>}:<entity>:<id>`.
//!
//! The `{region}` hash tag puts every key of a region in one cluster slot, so a command that
//! touches a GPU, its booking, the indexes and the event stream stays a single-slot, atomic
//! operation. The README's "Keys" table documents each key's type and fields.

/// Key builder for one region.
#[derive(Debug, Clone)]
pub struct RegionKeys {
    prefix: String,
}

impl RegionKeys {
    pub fn new(region: &str) -> RegionKeys {
        RegionKeys {
            prefix: format!("gpucache:{{{region}}}:"),
        }
    }

    fn key(&self, entity: &str, id: &str) -> String {
        // Built by hand: `format!` costs several times more on every command's hot path.
        let mut key = String::with_capacity(self.prefix.len() + entity.len() + 1 + id.len());
        key.push_str(&self.prefix);
        key.push_str(entity);
        key.push(':');
        key.push_str(id);
        key
    }

    /// Writes the key of `entity` `id` into `buffer` (replacing its content), so a loop over
    /// many keys reuses one allocation.
    pub fn key_into(&self, buffer: &mut String, entity: &str, id: &str) {
        buffer.clear();
        buffer.push_str(&self.prefix);
        buffer.push_str(entity);
        buffer.push(':');
        buffer.push_str(id);
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// Hash: one GPU record (`GpuRecord` fields). TTL: availability class.
    pub fn gpu(&self, gpu_id: &str) -> String {
        self.key("gpu", gpu_id)
    }

    /// Hash: one booking (`Booking` fields). Expires when the booking ends.
    pub fn booking(&self, booking_id: &str) -> String {
        self.key("booking", booking_id)
    }

    /// Hash: a provider's status and version.
    pub fn provider(&self, provider_id: &str) -> String {
        self.key("provider", provider_id)
    }

    /// Set: ids of a provider's GPUs in this region.
    pub fn provider_gpus(&self, provider_id: &str) -> String {
        self.key("provider-gpus", provider_id)
    }

    /// Hash: a GPU type's price set with `GPUCACHE.PRICE`. TTL: pricing class.
    pub fn type_price(&self, gpu_type: &str) -> String {
        self.key("price", gpu_type)
    }

    /// Sorted set: listed GPUs of a type that show their own price, scored by that price.
    pub fn available_own(&self, gpu_type: &str) -> String {
        self.key("avail-own", gpu_type)
    }

    /// Sorted set: listed GPUs of a type that show the type price (all score 0).
    pub fn available_typed(&self, gpu_type: &str) -> String {
        self.key("avail-type", gpu_type)
    }

    /// Sorted set: listed GPUs of a type that showed their own price before the last large
    /// `PRICE` and show the type price since, waiting to join `avail-type` a slice at a time
    /// (`type_drains.rs`). Scores are the own prices they had; they mean nothing any more.
    pub fn available_draining(&self, gpu_type: &str) -> String {
        self.key("avail-draining", gpu_type)
    }

    /// Sorted set: listed GPUs of a type scored by performance score (for `SORT SCORE`).
    pub fn available_by_score(&self, gpu_type: &str) -> String {
        self.key("avail-score", gpu_type)
    }

    /// Not stored: the channel key on which a type's order book changes are notified.
    pub fn order_book(&self, gpu_type: &str) -> String {
        self.key("orderbook", gpu_type)
    }

    /// Hash: booking counts and volume in 15-minute buckets for the rolling 24-hour window.
    pub fn window_24h(&self) -> String {
        self.key("stats", "24h")
    }

    /// Hash: every registered GPU id -> `"<status> <type> <provider>"`, so indexes can be
    /// healed after the GPU's own record has expired.
    pub fn gpu_registry(&self) -> String {
        self.key("index", "gpus")
    }

    /// Set: GPU types seen in this region.
    pub fn types(&self) -> String {
        self.key("index", "types")
    }

    /// Set: providers that have (or had) GPUs or a status in this region.
    pub fn providers(&self) -> String {
        self.key("index", "providers")
    }

    /// Hash: active booking id -> GPU id.
    pub fn booking_registry(&self) -> String {
        self.key("index", "bookings")
    }

    /// Sorted set: active booking ids scored by their end (ms): what the booking clock ends.
    pub fn booking_ends(&self) -> String {
        self.key("index", "booking-ends")
    }

    /// Set: providers whose GPUs are being moved into or out of the availability index after
    /// a `PROVIDER` (`provider_moves.rs`).
    pub fn provider_moves(&self) -> String {
        self.key("index", "provider-moves")
    }

    /// Hash: market counters (GPUs per status, bookings, price sums, sequence number).
    pub fn stats(&self) -> String {
        self.key("stats", "market")
    }

    /// Stream: one JSON event per command, for consumers that must not miss any.
    pub fn events(&self) -> String {
        [self.prefix.as_str(), "events"].concat()
    }

    /// Parses one of this module's key names into (region, entity, id).
    pub fn parse(key: &str) -> Option<(&str, &str, &str)> {
        let rest = key.strip_prefix("gpucache:{")?;
        let (region, rest) = rest.split_once("}:")?;
        match rest.split_once(':') {
            Some((entity, id)) => Some((region, entity, id)),
            None => Some((region, rest, "")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_share_the_region_hash_tag() {
        let k = RegionKeys::new("eu-west");
        assert_eq!(k.gpu("g1"), "gpucache:{eu-west}:gpu:g1");
        assert_eq!(k.events(), "gpucache:{eu-west}:events");
        for key in [
            k.gpu("a"),
            k.booking("b"),
            k.stats(),
            k.available_own("A100"),
            k.events(),
        ] {
            assert!(key.starts_with("gpucache:{eu-west}:"), "{key}");
        }
    }

    #[test]
    fn key_into_builds_the_same_keys() {
        let k = RegionKeys::new("eu");
        let mut buffer = String::from("leftover");
        k.key_into(&mut buffer, "gpu", "g1");
        assert_eq!(buffer, k.gpu("g1"));
        k.key_into(&mut buffer, "index", "bookings");
        assert_eq!(buffer, k.booking_registry());
    }

    #[test]
    fn parses_its_own_keys() {
        let k = RegionKeys::new("us");
        assert_eq!(RegionKeys::parse(&k.gpu("g:1")), Some(("us", "gpu", "g:1")));
        assert_eq!(RegionKeys::parse(&k.events()), Some(("us", "events", "")));
        assert_eq!(RegionKeys::parse("other:{us}:gpu:1"), None);
    }
}
