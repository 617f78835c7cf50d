//! gpucache-edge: the in-process L1 cache an edge node keeps in front of gpucache, kept
//! coherent by the module's keyspace notifications and event stream.
//!
//! ```no_run
//! use gpucache_edge::{Edge, EdgeConfig, Query};
//! let edge = Edge::start(EdgeConfig::new("redis://127.0.0.1:6379", &["eu-west"])).unwrap();
//! let gpu = edge.get(&Query::gpu("eu-west", "a100-1")).unwrap();
//! println!("{} at {}", gpu["status"], gpu["price"]);
//! ```
//!
//! - [`cache`]: the L1 (quick_cache's S3-FIFO) with epoch- and version-guarded fills.
//! - [`listener`]: the notification and stream links, reconnect and replay.
//! - [`topology`]: where each region is served — one primary, each region's master in a
//!   Redis Cluster, or the primary Sentinel names — and re-discovery after a failover or a
//!   reshard.
//! - [`keyspace`]: which cached reads a changed key affects.
//! - [`connect`]: the clients every connection is made from (`rediss://`: TLS, with a CA file).
//! - [`durable`]: bookings confirmed only once replicas / AOFs acknowledged them
//!   (`GPUCACHE.BOOK` then `WAIT`, and `WAITAOF` on Redis 7.2+).

pub mod cache;
mod clock;
pub mod connect;
pub mod durable;
pub mod edge;
pub mod error;
mod flight;
pub mod keyspace;
mod links;
pub mod listener;
pub mod query;
pub mod reply;
pub mod stats;
pub mod tags;
pub mod topology;

pub use cache::{Eviction, InvalidationHook, L1Config, Source, L1};
pub use connect::TlsConfig;
pub use durable::{book_durably, BookOutcome, BookRequest, Booking, Durability, Shortfall};
pub use edge::{Edge, EdgeConfig};
pub use error::EdgeError;
pub use listener::LinkConfig;
pub use query::Query;
pub use stats::Stats;
pub use topology::Servers;
