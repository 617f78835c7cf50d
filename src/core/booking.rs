//! Bookings: the record kept for each, and what a repeated booking id means.

use super::error::{MarketError, MarketResult};
use super::price::Price;

pub mod field {
    pub const GPU: &str = "gpu";
    pub const USER: &str = "user";
    pub const PRICE: &str = "price";
    pub const DURATION_S: &str = "duration_s";
    pub const START_MS: &str = "start_ms";
    pub const END_MS: &str = "end_ms";
    pub const GPU_TYPE: &str = "gpu_type";
    pub const PROVIDER: &str = "provider";

    /// Every field, for reading a whole record.
    pub const ALL: [&str; 8] = [
        GPU, USER, PRICE, DURATION_S, START_MS, END_MS, GPU_TYPE, PROVIDER,
    ];
}

/// A booking record. Bookings are market state: stored without a TTL, ended by the module's
/// booking clock, and kept twice — in the booking's own hash and, as [`BookingTerms`], on the
/// GPU record it holds — so either can be rebuilt from the other after a hand edit.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Booking {
    pub gpu_id: String,
    pub user_id: String,
    /// Hourly price the GPU showed when it was booked.
    pub price: Price,
    pub duration_s: i64,
    pub start_ms: i64,
    pub end_ms: i64,
    /// Type and provider of the GPU when it was booked (absent in bookings written before they
    /// were recorded): enough to rebuild a booked GPU's record if it is lost.
    pub gpu_type: Option<String>,
    pub provider: Option<String>,
}

/// What a booked GPU's record keeps of the booking that holds it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct BookingTerms {
    pub user_id: String,
    pub price: Price,
    pub duration_s: i64,
    pub start_ms: i64,
    pub end_ms: i64,
}

impl Booking {
    pub fn new(gpu_id: &str, user_id: &str, price: Price, duration_s: i64, now_ms: i64) -> Booking {
        Booking {
            gpu_id: gpu_id.to_owned(),
            user_id: user_id.to_owned(),
            price,
            duration_s,
            start_ms: now_ms,
            end_ms: now_ms.saturating_add(duration_s.saturating_mul(1000)),
            gpu_type: None,
            provider: None,
        }
    }

    /// The booking with the type and provider of the GPU it holds recorded.
    pub fn holding(mut self, gpu_type: &str, provider: &str) -> Booking {
        self.gpu_type = Some(gpu_type.to_owned());
        self.provider = Some(provider.to_owned());
        self
    }

    pub fn terms(&self) -> BookingTerms {
        BookingTerms {
            user_id: self.user_id.clone(),
            price: self.price,
            duration_s: self.duration_s,
            start_ms: self.start_ms,
            end_ms: self.end_ms,
        }
    }

    /// The booking a GPU record's copy of its terms describes.
    pub fn from_terms(gpu_id: &str, terms: &BookingTerms) -> Booking {
        Booking {
            gpu_id: gpu_id.to_owned(),
            user_id: terms.user_id.clone(),
            price: terms.price,
            duration_s: terms.duration_s,
            start_ms: terms.start_ms,
            end_ms: terms.end_ms,
            gpu_type: None,
            provider: None,
        }
    }

    /// Whether the booking's time is over at `now_ms` (its end is enforced by the booking clock,
    /// and by any command that meets it first).
    pub fn has_ended(&self, now_ms: i64) -> bool {
        self.end_ms <= now_ms
    }

    /// Total cost in micro-units: hourly price times booked hours.
    pub fn cost_micros(&self) -> i64 {
        let micros = i128::from(self.price.micros()) * i128::from(self.duration_s) / 3600;
        i64::try_from(micros).unwrap_or(i64::MAX)
    }

    pub fn to_fields(&self) -> Vec<(&'static str, String)> {
        let mut fields = vec![
            (field::GPU, self.gpu_id.clone()),
            (field::USER, self.user_id.clone()),
            (field::PRICE, self.price.to_string()),
            (field::DURATION_S, self.duration_s.to_string()),
            (field::START_MS, self.start_ms.to_string()),
            (field::END_MS, self.end_ms.to_string()),
        ];
        if let Some(gpu_type) = &self.gpu_type {
            fields.push((field::GPU_TYPE, gpu_type.clone()));
        }
        if let Some(provider) = &self.provider {
            fields.push((field::PROVIDER, provider.clone()));
        }
        fields
    }

    pub fn from_fields<'a>(fields: impl IntoIterator<Item = (&'a [u8], &'a [u8])>) -> Option<Self> {
        let (mut gpu, mut user, mut price) = (None, None, None);
        let (mut duration, mut start, mut end) = (None, None, None);
        let (mut gpu_type, mut provider) = (None, None);
        // Names become parts of keys: only names gpucache accepts (a booking naming another is
        // not gpucache's, and reads as garbled).
        let text = |v: &[u8]| super::input::id("name", v).ok();
        let int = |v: &[u8]| {
            std::str::from_utf8(v)
                .ok()
                .and_then(|s| s.parse::<i64>().ok())
        };
        for (name, value) in fields {
            match std::str::from_utf8(name).unwrap_or_default() {
                field::GPU => gpu = text(value),
                field::USER => user = text(value),
                field::PRICE => price = Price::parse_stored(value),
                field::DURATION_S => duration = int(value),
                field::START_MS => start = int(value),
                field::END_MS => end = int(value),
                field::GPU_TYPE => gpu_type = text(value).filter(|t| !t.is_empty()),
                field::PROVIDER => provider = text(value).filter(|p| !p.is_empty()),
                _ => {}
            }
        }
        Some(Booking {
            gpu_id: gpu?,
            user_id: user?,
            price: price?,
            duration_s: duration?,
            start_ms: start?,
            end_ms: end?,
            gpu_type,
            provider,
        })
    }
}

/// What a `BOOK` with an already-used booking id means.
///
/// Retrying the same request (same GPU, user and duration) is idempotent: the client gets the
/// existing booking back and nothing changes, so a client may safely retry after a timeout.
/// Reusing the id for anything else is refused.
pub fn check_repeated_booking(
    booking_id: &str,
    existing: &Booking,
    gpu_id: &str,
    user_id: &str,
    duration_s: i64,
) -> MarketResult<()> {
    if existing.gpu_id == gpu_id && existing.user_id == user_id && existing.duration_s == duration_s
    {
        Ok(())
    } else {
        Err(MarketError::BookingExists(format!(
            "booking id '{booking_id}' is already used for GPU '{}' by user '{}'",
            existing.gpu_id, existing.user_id
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ends_after_its_duration() {
        let b = Booking::new("g", "u", Price::from_micros(3_600_000), 7200, 1_000);
        assert_eq!(b.end_ms, 1_000 + 7_200_000);
        assert_eq!(b.cost_micros(), 7_200_000);
    }

    #[test]
    fn terms_rebuild_the_booking() {
        let b = Booking::new("g", "u", Price::from_micros(1_500_000), 60, 5);
        assert_eq!(Booking::from_terms("g", &b.terms()), b);
        assert!(!b.has_ended(60_004) && b.has_ended(60_005));
    }

    #[test]
    fn fields_round_trip() {
        let b = Booking::new("g", "u", Price::from_micros(1_500_000), 60, 5).holding("A100", "p1");
        let fields: Vec<(String, String)> = b
            .to_fields()
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v))
            .collect();
        let back = Booking::from_fields(fields.iter().map(|(k, v)| (k.as_bytes(), v.as_bytes())));
        assert_eq!(back, Some(b));
    }

    #[test]
    fn a_retry_is_idempotent_and_a_clash_is_refused() {
        let b = Booking::new("g", "u", Price::ZERO, 60, 5);
        assert!(check_repeated_booking("b1", &b, "g", "u", 60).is_ok());
        for (gpu, user, dur) in [("g2", "u", 60), ("g", "u2", 60), ("g", "u", 61)] {
            assert!(matches!(
                check_repeated_booking("b1", &b, gpu, user, dur),
                Err(MarketError::BookingExists(_))
            ));
        }
    }
}
