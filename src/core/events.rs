//! Invalidation events: the keyspace-notification names and the JSON appended to each region's
//! event stream, one entry per command.

use serde::Serialize;
use serde_json::{Map, Value};

/// The structured event type written to the stream (`type` field and JSON `type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum EventKind {
    GpuAvailabilityChanged,
    PricingUpdated,
    BookingCreated,
    BookingCancelled,
    ProviderStatusChanged,
    MarketStatsUpdated,
    ManualInvalidation,
    OrderBookUpdated,
}

impl EventKind {
    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::GpuAvailabilityChanged => "gpu_availability_changed",
            EventKind::PricingUpdated => "pricing_updated",
            EventKind::BookingCreated => "booking_created",
            EventKind::BookingCancelled => "booking_cancelled",
            EventKind::ProviderStatusChanged => "provider_status_changed",
            EventKind::MarketStatsUpdated => "market_stats_updated",
            EventKind::ManualInvalidation => "manual_invalidation",
            EventKind::OrderBookUpdated => "order_book_updated",
        }
    }
}

/// Keyspace-notification event names (the message on `__keyspace@<db>__:<key>`).
pub mod notify {
    pub const REGISTERED: &str = "gpucache.registered";
    pub const STATUS: &str = "gpucache.status";
    pub const PRICE: &str = "gpucache.price";
    pub const BOOKED: &str = "gpucache.booked";
    pub const CANCELLED: &str = "gpucache.cancelled";
    pub const PROVIDER: &str = "gpucache.provider";
    pub const STATS: &str = "gpucache.stats";
    pub const INVALIDATE: &str = "gpucache.invalidate";
    pub const EXPIRED: &str = "gpucache.expired";
    pub const ORDER_BOOK: &str = "gpucache.orderbook";
    /// A record or index entry put back by a repair (`GPUCACHE.REPAIR`, or healing that rebuilt
    /// market state lost by hand or to an `allkeys-*` eviction).
    pub const REPAIRED: &str = "gpucache.repaired";
}

/// One stream event. Optional ids are omitted from the JSON when they do not apply.
#[derive(Debug, Clone, Serialize)]
pub struct Event {
    #[serde(rename = "type")]
    pub kind: EventKind,
    pub region: String,
    pub ts_ms: i64,
    /// Why it happened where the type alone does not say (`registered`, `expired`, ...).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gpu_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gpu_type: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub provider_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub booking_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub user_id: Option<String>,
    /// New version of the record the event is about (GPU, type price or provider).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub version: Option<i64>,
    #[serde(skip_serializing_if = "Map::is_empty")]
    pub old: Map<String, Value>,
    #[serde(skip_serializing_if = "Map::is_empty")]
    pub new: Map<String, Value>,
    /// Keys whose cached copies a consumer must drop.
    pub keys: Vec<String>,
}

impl Event {
    pub fn new(kind: EventKind, region: &str, ts_ms: i64) -> Event {
        Event {
            kind,
            region: region.to_owned(),
            ts_ms,
            reason: None,
            gpu_id: None,
            gpu_type: None,
            provider_id: None,
            booking_id: None,
            user_id: None,
            version: None,
            old: Map::new(),
            new: Map::new(),
            keys: Vec::new(),
        }
    }

    /// Records a value that changed; unchanged values are left out.
    pub fn changed(&mut self, name: &str, old: impl Into<Value>, new: impl Into<Value>) {
        let (old, new) = (old.into(), new.into());
        if old != new {
            self.old.insert(name.to_owned(), old);
            self.new.insert(name.to_owned(), new);
        }
    }

    pub fn to_json(&self) -> String {
        // Sized for a typical event with its key list, so the buffer is not grown while writing.
        let keys: usize = self.keys.iter().map(|k| k.len() + 3).sum();
        let mut out = Vec::with_capacity(256 + keys);
        // Serialising plain strings, numbers and maps cannot fail; serde_json writes UTF-8.
        match serde_json::to_writer(&mut out, self) {
            Ok(()) => String::from_utf8(out).unwrap_or_else(|_| String::from("{}")),
            Err(_) => String::from("{}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_carries_type_ids_changes_and_keys() {
        let mut e = Event::new(EventKind::BookingCreated, "eu", 42);
        e.gpu_id = Some("g1".into());
        e.booking_id = Some("b1".into());
        e.version = Some(3);
        e.changed("status", "available", "busy");
        e.changed("price", "2.5", "2.5");
        e.keys.push("gpucache:{eu}:gpu:g1".into());
        let v: Value = serde_json::from_str(&e.to_json()).unwrap();
        assert_eq!(v["type"], "booking_created");
        assert_eq!(v["region"], "eu");
        assert_eq!(v["gpu_id"], "g1");
        assert_eq!(v["version"], 3);
        assert_eq!(v["old"]["status"], "available");
        assert_eq!(v["new"]["status"], "busy");
        assert!(
            v["old"].get("price").is_none(),
            "unchanged values are left out"
        );
        assert!(v.get("user_id").is_none());
        assert_eq!(v["keys"][0], "gpucache:{eu}:gpu:g1");
    }

    #[test]
    fn kind_names_match_serde_names() {
        for kind in [
            EventKind::GpuAvailabilityChanged,
            EventKind::PricingUpdated,
            EventKind::BookingCreated,
            EventKind::BookingCancelled,
            EventKind::ProviderStatusChanged,
            EventKind::MarketStatsUpdated,
            EventKind::ManualInvalidation,
            EventKind::OrderBookUpdated,
        ] {
            assert_eq!(serde_json::to_value(kind).unwrap(), kind.as_str());
        }
    }
}
