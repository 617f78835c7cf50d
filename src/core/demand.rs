//! Demand pricing: a GPU type's shown price is its base price times a multiplier chosen by how
//! much of that type is still available in the region.

use super::price::Price;
use std::fmt;

/// One tier: while the available share is below `below_percent`, prices are multiplied by
/// `multiplier_hundredths / 100`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tier {
    pub below_percent: u32,
    pub multiplier_hundredths: u32,
}

/// Tiers sorted by threshold; the first whose threshold the ratio is below applies.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DemandTiers(Vec<Tier>);

/// ×1.00 expressed in hundredths.
pub const NO_SURGE: u32 = 100;
const MAX_TIERS: usize = 16;
const MAX_MULTIPLIER_HUNDREDTHS: u32 = 10_000;

impl Default for DemandTiers {
    /// ×2.0 below 10% available, ×1.5 below 30%, ×1.2 below 50%, ×1.0 otherwise.
    fn default() -> Self {
        DemandTiers(vec![
            Tier {
                below_percent: 10,
                multiplier_hundredths: 200,
            },
            Tier {
                below_percent: 30,
                multiplier_hundredths: 150,
            },
            Tier {
                below_percent: 50,
                multiplier_hundredths: 120,
            },
        ])
    }
}

impl DemandTiers {
    /// Parses `"10:2.0 30:1.5 50:1.2"` (percent below which the multiplier applies, then the
    /// multiplier with at most two decimals). Commas work as separators too; an empty string
    /// turns demand pricing off.
    pub fn parse(text: &str) -> Result<DemandTiers, String> {
        let mut tiers = Vec::new();
        for item in text.split([' ', ',']).filter(|s| !s.is_empty()) {
            // Quoted in errors as printable ASCII: the text may hold any byte.
            let shown = super::input::shown(item.as_bytes(), 64);
            let (below, multiplier) = item.split_once(':').ok_or_else(|| {
                format!("tier '{shown}' must look like 10:2.0 (percent:multiplier)")
            })?;
            let below_percent: u32 = below
                .parse()
                .ok()
                .filter(|p| (1..=100).contains(p))
                .ok_or_else(|| {
                    format!("tier '{shown}': percent must be an integer from 1 to 100")
                })?;
            let multiplier_hundredths = parse_hundredths(multiplier)
                .filter(|m| (1..=MAX_MULTIPLIER_HUNDREDTHS).contains(m))
                .ok_or_else(|| {
                    format!("tier '{shown}': multiplier must be a decimal from 0.01 to 100 with at most 2 decimals")
                })?;
            tiers.push(Tier {
                below_percent,
                multiplier_hundredths,
            });
        }
        if tiers.len() > MAX_TIERS {
            return Err(format!("at most {MAX_TIERS} tiers"));
        }
        tiers.sort_by_key(|t| t.below_percent);
        if tiers
            .windows(2)
            .any(|w| w[0].below_percent == w[1].below_percent)
        {
            return Err("two tiers share a threshold".into());
        }
        Ok(DemandTiers(tiers))
    }

    /// The multiplier (hundredths) for `listed` available GPUs out of `total` of a type.
    /// A type with no GPUs has nothing to price and gets ×1.
    pub fn multiplier(&self, listed: i64, total: i64) -> u32 {
        if total <= 0 {
            return NO_SURGE;
        }
        let listed = listed.clamp(0, total);
        self.0
            .iter()
            // listed / total < below / 100, in integers.
            .find(|t| i128::from(listed) * 100 < i128::from(total) * i128::from(t.below_percent))
            .map_or(NO_SURGE, |t| t.multiplier_hundredths)
    }
}

impl fmt::Display for DemandTiers {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let parts: Vec<String> = self
            .0
            .iter()
            .map(|t| {
                format!(
                    "{}:{}",
                    t.below_percent,
                    format_hundredths(t.multiplier_hundredths)
                )
            })
            .collect();
        write!(f, "{}", parts.join(" "))
    }
}

fn parse_hundredths(text: &str) -> Option<u32> {
    let (whole, fraction) = text.split_once('.').unwrap_or((text, ""));
    if whole.is_empty() || whole.len() > 4 || fraction.len() > 2 {
        return None;
    }
    if !whole.bytes().all(|b| b.is_ascii_digit()) || !fraction.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let whole: u32 = whole.parse().ok()?;
    let fraction: u32 = match fraction.len() {
        0 => 0,
        1 => fraction.parse::<u32>().ok()? * 10,
        _ => fraction.parse().ok()?,
    };
    whole.checked_mul(100)?.checked_add(fraction)
}

pub fn format_hundredths(value: u32) -> String {
    Price::from_micros(i64::from(value) * 10_000).to_string()
}

/// Applies a multiplier (hundredths) to a price, rounding to the nearest micro-unit.
pub fn apply(price: Price, multiplier_hundredths: u32) -> Price {
    let micros = (i128::from(price.micros()) * i128::from(multiplier_hundredths) + 50) / 100;
    Price::from_micros(i64::try_from(micros).unwrap_or(i64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_tiers_follow_the_documented_thresholds() {
        let tiers = DemandTiers::default();
        assert_eq!(tiers.multiplier(0, 10), 200);
        assert_eq!(tiers.multiplier(9, 100), 200);
        assert_eq!(tiers.multiplier(10, 100), 150, "10% is not below 10%");
        assert_eq!(tiers.multiplier(29, 100), 150);
        assert_eq!(tiers.multiplier(30, 100), 120);
        assert_eq!(tiers.multiplier(49, 100), 120);
        assert_eq!(tiers.multiplier(50, 100), 100);
        assert_eq!(tiers.multiplier(100, 100), 100);
        assert_eq!(tiers.multiplier(0, 0), 100, "no GPUs, no surge");
    }

    #[test]
    fn parses_and_prints_tiers() {
        let tiers = DemandTiers::parse("50:1.2, 10:2 30:1.50").unwrap();
        assert_eq!(tiers, DemandTiers::default());
        assert_eq!(tiers.to_string(), "10:2 30:1.5 50:1.2");
        assert_eq!(DemandTiers::parse("").unwrap().multiplier(0, 10), 100);
    }

    #[test]
    fn rejects_malformed_tiers() {
        for bad in [
            "10",
            "0:2",
            "101:2",
            "10:0",
            "10:1.234",
            "10:-1",
            "x:1",
            "10:1,10:2",
            "10:1e2",
        ] {
            assert!(DemandTiers::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn applies_multipliers_exactly() {
        assert_eq!(
            apply(Price::from_micros(2_500_000), 150),
            Price::from_micros(3_750_000)
        );
        assert_eq!(apply(Price::from_micros(1), 150), Price::from_micros(2));
        assert_eq!(
            apply(Price::from_micros(1_990_000), 120).to_string(),
            "2.388"
        );
    }
}
