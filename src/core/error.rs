//! Every way a marketplace command can be refused, with the error reply it produces.
//!
//! The first word of each message is the error code clients see (`GPUBUSY ...`), so client
//! libraries can branch on it without parsing prose.

use std::fmt;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MarketError {
    /// Malformed arguments: arity, unknown option, bad number, bad id.
    Syntax(String),
    /// The GPU does not exist (never registered, or its record expired).
    NoGpu(String),
    /// The booking does not exist (never made, cancelled, or ended).
    NoBooking(String),
    /// The GPU is busy with another booking.
    GpuBusy(String),
    /// The GPU cannot be booked: it is offline/in maintenance or its provider is not online.
    GpuUnavailable(String),
    /// A state change that the GPU state machine forbids.
    InvalidTransition(String),
    /// The booking id is already used by a different booking.
    BookingExists(String),
    /// A key the command needs holds another Redis type.
    WrongType(String),
    /// A gpucache hash is missing fields this module always writes (edited by hand).
    Corrupt(String),
    /// Market state the command depends on is lost or damaged (the message says what and how
    /// it is repaired).
    Damaged(String),
    /// The server's eviction policy could evict the booking this command would take.
    EvictionRisk(String),
    /// The region's cluster slot is moving to this node and only part of the region is here
    /// yet: Redis's own answer to a multi-key command split by a migration, which cluster
    /// clients retry.
    TryAgain(String),
    /// Redis refused the module something it needs (to block a client, say): not the caller's
    /// fault, and not a state of the market.
    Internal(String),
}

impl MarketError {
    pub fn syntax(msg: impl Into<String>) -> Self {
        MarketError::Syntax(msg.into())
    }
}

impl fmt::Display for MarketError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MarketError::Syntax(m) => write!(f, "ERR {m}"),
            MarketError::NoGpu(id) => write!(f, "NOGPU no such GPU '{id}'"),
            MarketError::NoBooking(id) => write!(f, "NOBOOKING no such booking '{id}'"),
            MarketError::GpuBusy(m) => write!(f, "GPUBUSY {m}"),
            MarketError::GpuUnavailable(m) => write!(f, "GPUUNAVAILABLE {m}"),
            MarketError::InvalidTransition(m) => write!(f, "BADSTATE {m}"),
            MarketError::BookingExists(m) => write!(f, "BOOKINGEXISTS {m}"),
            MarketError::WrongType(key) => write!(
                f,
                "WRONGTYPE key '{key}' holds a value of the wrong type for gpucache"
            ),
            MarketError::Corrupt(key) => write!(
                f,
                "CORRUPT key '{key}' is not a record gpucache wrote (fields missing or malformed)"
            ),
            MarketError::Damaged(m) => write!(f, "CORRUPT {m}"),
            MarketError::EvictionRisk(m) => write!(f, "EVICTIONRISK {m}"),
            MarketError::TryAgain(m) => write!(f, "TRYAGAIN {m}"),
            MarketError::Internal(m) => write!(f, "ERR {m}"),
        }
    }
}

pub type MarketResult<T> = Result<T, MarketError>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_error_starts_with_an_upper_case_code() {
        let errors = [
            MarketError::syntax("x"),
            MarketError::NoGpu("g".into()),
            MarketError::NoBooking("b".into()),
            MarketError::GpuBusy("x".into()),
            MarketError::GpuUnavailable("x".into()),
            MarketError::InvalidTransition("x".into()),
            MarketError::BookingExists("x".into()),
            MarketError::WrongType("k".into()),
            MarketError::Corrupt("k".into()),
            MarketError::Damaged("x".into()),
            MarketError::EvictionRisk("x".into()),
        ];
        for e in errors {
            let text = e.to_string();
            let code = text.split(' ').next().unwrap_or_default();
            assert!(
                !code.is_empty() && code.chars().all(|c| c.is_ascii_uppercase()),
                "{text}"
            );
        }
    }
}
