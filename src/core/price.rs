//! Prices as exact fixed-point amounts (millionths of a currency unit per hour).
//!
//! Floats would make sums drift as GPUs join and leave the availability index and would print
//! `2.4999999`; integers in micro-units keep statistics exact and replies readable.

use super::error::{MarketError, MarketResult};
use std::fmt;

const MICROS_PER_UNIT: i64 = 1_000_000;
/// Highest accepted hourly price. Keeps every per-type sum far inside `i64`.
pub const MAX_PRICE_UNITS: i64 = 1_000_000;

#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Hash,
    Default,
    serde::Serialize,
    serde::Deserialize,
)]
pub struct Price(i64);

impl Price {
    pub const ZERO: Price = Price(0);

    pub fn from_micros(micros: i64) -> Price {
        Price(micros)
    }

    pub fn micros(self) -> i64 {
        self.0
    }

    /// Parses a plain decimal such as `2`, `2.5` or `0.000125`: no sign, exponent, NaN or inf,
    /// at most six decimal places, at most [`MAX_PRICE_UNITS`].
    pub fn parse(text: &[u8]) -> MarketResult<Price> {
        let invalid = || {
            MarketError::syntax(format!(
                "invalid price '{}': expected a decimal from 0 to {MAX_PRICE_UNITS} with at most 6 decimal places",
                super::input::shown(text, 64)
            ))
        };
        let (whole, fraction) = match text.iter().position(|&b| b == b'.') {
            Some(dot) => (&text[..dot], &text[dot + 1..]),
            None => (text, &[][..]),
        };
        let all_digits = |part: &[u8]| part.iter().all(u8::is_ascii_digit);
        if whole.is_empty() || whole.len() > 7 || fraction.len() > 6 {
            return Err(invalid());
        }
        if !all_digits(whole) || !all_digits(fraction) || (text.ends_with(b".")) {
            return Err(invalid());
        }
        let mut micros: i64 = 0;
        for &digit in whole {
            micros = micros * 10 + i64::from(digit - b'0');
        }
        micros *= MICROS_PER_UNIT;
        let mut scale = MICROS_PER_UNIT / 10;
        for &digit in fraction {
            micros += i64::from(digit - b'0') * scale;
            scale /= 10;
        }
        if micros > MAX_PRICE_UNITS * MICROS_PER_UNIT {
            return Err(invalid());
        }
        Ok(Price(micros))
    }

    /// Parses the canonical form this module writes into hashes; anything else reads as `None`
    /// so a hand-edited field is reported rather than trusted.
    pub fn parse_stored(text: &[u8]) -> Option<Price> {
        Price::parse(text).ok()
    }

    /// Score used in sorted-set indexes (exact: every price is below 2^53 micros).
    pub fn as_score(self) -> f64 {
        self.0 as f64 / MICROS_PER_UNIT as f64
    }

    pub fn from_score(score: f64) -> Option<Price> {
        if !score.is_finite() || score < 0.0 || score > MAX_PRICE_UNITS as f64 {
            return None;
        }
        Some(Price((score * MICROS_PER_UNIT as f64).round() as i64))
    }
}

impl fmt::Display for Price {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let whole = self.0 / MICROS_PER_UNIT;
        let fraction = self.0 % MICROS_PER_UNIT;
        if fraction == 0 {
            return write!(f, "{whole}");
        }
        if fraction > 0 {
            // The six fraction digits without trailing zeros, without a temporary String.
            let mut digits = [b'0'; 6];
            let mut rest = fraction;
            for digit in digits.iter_mut().rev() {
                *digit = b'0' + (rest % 10) as u8;
                rest /= 10;
            }
            let len = digits.iter().rposition(|d| *d != b'0').map_or(0, |i| i + 1);
            let text = digits
                .get(..len)
                .and_then(|d| std::str::from_utf8(d).ok())
                .unwrap_or_default();
            return write!(f, "{whole}.{text}");
        }
        let digits = format!("{fraction:06}");
        write!(f, "{whole}.{}", digits.trim_end_matches('0'))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> MarketResult<Price> {
        Price::parse(s.as_bytes())
    }

    #[test]
    fn parses_plain_decimals_exactly() {
        assert_eq!(p("2").unwrap().micros(), 2_000_000);
        assert_eq!(p("2.5").unwrap().micros(), 2_500_000);
        assert_eq!(p("0.000125").unwrap().micros(), 125);
        assert_eq!(p("0").unwrap(), Price::ZERO);
        assert_eq!(p("1000000").unwrap().micros(), 1_000_000_000_000);
    }

    #[test]
    fn rejects_everything_that_is_not_a_plain_non_negative_decimal() {
        for bad in [
            "",
            "-1",
            "+1",
            "nan",
            "NaN",
            "inf",
            "-inf",
            "1e3",
            "2.",
            ".5",
            "1.2.3",
            "0.0000001",
            "1000000.01",
            "99999999",
            " 1",
            "1 ",
            "0x10",
            "١",
        ] {
            assert!(p(bad).is_err(), "{bad:?} should be rejected");
        }
    }

    #[test]
    fn display_matches_the_zero_padded_format() {
        let extremes = [0, 1, 10, 999_999, 1_000_000, 1_000_001, i64::MAX, i64::MIN];
        for micros in (-3_000_123..3_000_123).step_by(997).chain(extremes) {
            let (whole, fraction) = (micros / 1_000_000, micros % 1_000_000);
            let expected = if fraction == 0 {
                format!("{whole}")
            } else {
                format!("{whole}.{}", format!("{fraction:06}").trim_end_matches('0'))
            };
            assert_eq!(Price::from_micros(micros).to_string(), expected, "{micros}");
        }
    }

    #[test]
    fn displays_without_trailing_zeros() {
        assert_eq!(Price::from_micros(2_500_000).to_string(), "2.5");
        assert_eq!(Price::from_micros(3_000_000).to_string(), "3");
        assert_eq!(Price::from_micros(125).to_string(), "0.000125");
        for s in ["0", "1.5", "0.01", "999999.999999"] {
            assert_eq!(p(s).unwrap().to_string(), s);
        }
    }

    #[test]
    fn score_round_trips() {
        for s in ["0", "1.5", "0.000001", "999999.999999"] {
            let price = p(s).unwrap();
            assert_eq!(Price::from_score(price.as_score()), Some(price));
        }
        assert_eq!(Price::from_score(f64::NAN), None);
        assert_eq!(Price::from_score(-1.0), None);
    }
}
