//! What the L1 caches: one entry per marketplace read, keyed by the read itself.

use crate::tags::Tag;
use serde_json::Value;

/// A marketplace read; the L1 key. Each maps to one `GPUCACHE.*` command.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Query {
    /// `GPUCACHE.GET region gpu_id`: one GPU record.
    Gpu { region: String, gpu_id: String },
    /// `GPUCACHE.AVAILABLE region [options...]`: a search (options as given, e.g.
    /// `["TYPE", "A100", "LIMIT", "10"]`).
    Available {
        region: String,
        options: Vec<String>,
    },
    /// `GPUCACHE.ORDERBOOK region gpu_type DEPTH depth`: a type's prices.
    OrderBook {
        region: String,
        gpu_type: String,
        depth: u32,
    },
    /// `GPUCACHE.STATS region`: market statistics.
    Stats { region: String },
}

impl Query {
    pub fn gpu(region: &str, gpu_id: &str) -> Query {
        Query::Gpu {
            region: region.to_string(),
            gpu_id: gpu_id.to_string(),
        }
    }

    pub fn available(region: &str, options: &[&str]) -> Query {
        Query::Available {
            region: region.to_string(),
            options: options.iter().map(|o| o.to_string()).collect(),
        }
    }

    pub fn order_book(region: &str, gpu_type: &str, depth: u32) -> Query {
        Query::OrderBook {
            region: region.to_string(),
            gpu_type: gpu_type.to_string(),
            depth,
        }
    }

    pub fn stats(region: &str) -> Query {
        Query::Stats {
            region: region.to_string(),
        }
    }

    pub fn region(&self) -> &str {
        match self {
            Query::Gpu { region, .. }
            | Query::Available { region, .. }
            | Query::OrderBook { region, .. }
            | Query::Stats { region } => region,
        }
    }

    /// The `GPUCACHE.*` command that answers this read.
    pub fn command(&self) -> redis::Cmd {
        match self {
            Query::Gpu { region, gpu_id } => {
                let mut cmd = redis::cmd("GPUCACHE.GET");
                cmd.arg(region).arg(gpu_id);
                cmd
            }
            Query::Available { region, options } => {
                let mut cmd = redis::cmd("GPUCACHE.AVAILABLE");
                cmd.arg(region).arg(options);
                cmd
            }
            Query::OrderBook {
                region,
                gpu_type,
                depth,
            } => {
                let mut cmd = redis::cmd("GPUCACHE.ORDERBOOK");
                cmd.arg(region).arg(gpu_type).arg("DEPTH").arg(depth);
                cmd
            }
            Query::Stats { region } => {
                let mut cmd = redis::cmd("GPUCACHE.STATS");
                cmd.arg(region);
                cmd
            }
        }
    }

    /// Tags known before loading: the entry depends on them, and a change to any of them
    /// while the load runs makes its result uncacheable.
    pub(crate) fn tags_before_load(&self) -> Vec<Tag> {
        let region = self.region();
        match self {
            Query::Gpu { gpu_id, .. } => vec![Tag::region(region), Tag::gpu(region, gpu_id)],
            Query::Available { .. } | Query::Stats { .. } => {
                vec![Tag::region(region), Tag::market(region)]
            }
            // The ladder's `gpus_total` moves with the type's total, which only the counters
            // hash (market) records when an unlisted GPU is registered.
            Query::OrderBook { gpu_type, .. } => vec![
                Tag::region(region),
                Tag::market(region),
                Tag::order_book(region, gpu_type),
            ],
        }
    }

    /// Tags that only guard the load: a change while it runs makes its result uncacheable, but
    /// the entry does not depend on them once filled. A GPU's type, provider and booking are
    /// known only from the loaded record, so the load is guarded by any type-price, provider
    /// or booking change in the region.
    pub(crate) fn load_guards(&self) -> Vec<Tag> {
        match self {
            Query::Gpu { region, .. } => vec![Tag::gpu_inputs(region)],
            _ => Vec::new(),
        }
    }

    /// Tags the loaded value names (a GPU's type, provider and booking).
    pub(crate) fn tags_of_value(&self, value: &Value) -> Vec<Tag> {
        let Query::Gpu { region, .. } = self else {
            return Vec::new();
        };
        let mut tags = Vec::with_capacity(2);
        if let Some(gpu_type) = value.get("type").and_then(Value::as_str) {
            tags.push(Tag::type_price(region, gpu_type));
        }
        if let Some(provider) = value.get("provider").and_then(Value::as_str) {
            tags.push(Tag::provider(region, provider));
        }
        if let Some(booking) = value.get("booking_id").and_then(Value::as_str) {
            tags.push(Tag::booking(region, booking));
        }
        tags
    }

    /// The record version of a loaded GPU (`version` of `GPUCACHE.GET`).
    pub(crate) fn version_of(&self, value: &Value) -> Option<i64> {
        match self {
            Query::Gpu { .. } => value.get("version").and_then(Value::as_i64),
            _ => None,
        }
    }

    /// How long a loaded GPU record still lives in Redis (`ttl_ms` of `GPUCACHE.GET`; -1 or
    /// absent: no TTL).
    pub(crate) fn remaining_ttl(&self, value: &Value) -> Option<std::time::Duration> {
        match self {
            Query::Gpu { .. } => value
                .get("ttl_ms")
                .and_then(Value::as_i64)
                .and_then(|ms| u64::try_from(ms).ok())
                .map(std::time::Duration::from_millis),
            _ => None,
        }
    }

    /// The Redis key whose version guards this entry's fills.
    pub(crate) fn versioned_key(&self) -> Option<String> {
        match self {
            Query::Gpu { region, gpu_id } => Some(crate::keyspace::gpu_key(region, gpu_id)),
            _ => None,
        }
    }
}
