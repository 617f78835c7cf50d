//! The marketplace's rules, free of any Redis type so they are unit-tested directly.
//!
//! The command layer (`crate::commands`) reads keys, asks these modules what to do, and writes
//! the result.

pub mod acl_keys;
pub mod booking;
pub mod demand;
pub mod error;
pub mod events;
pub mod figures;
pub mod figures_cache;
pub mod gpu;
pub mod input;
pub mod price;
pub mod slots;
pub mod status;
pub mod ttl;
pub mod walk;
pub mod window;

/// No sequence or version gpucache issues reaches this (2^53: a million writes a second for
/// 285 years). A larger one was written by another hand; taken as is, it would push the
/// sequence to where it cannot grow, so it is refused as not gpucache's.
pub const MAX_VERSION: i64 = 1 << 53;

/// A sequence or version as gpucache issues them: a non-negative integer below `MAX_VERSION`.
pub fn version(text: &[u8]) -> Option<i64> {
    std::str::from_utf8(text)
        .ok()
        .and_then(|s| s.parse::<i64>().ok())
        .filter(|v| (0..MAX_VERSION).contains(v))
}
