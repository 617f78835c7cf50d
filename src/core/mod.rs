//! The marketplace's rules, free of any Redis type so they are unit-tested directly.
//!
//! The command layer (`crate::commands`) reads keys, asks these modules what to do, and writes
//! the result.

pub mod booking;
pub mod demand;
pub mod error;
pub mod events;
pub mod gpu;
pub mod input;
pub mod price;
pub mod status;
pub mod ttl;
pub mod window;
