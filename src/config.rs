//! Module configuration: load arguments (`loadmodule libgpucache.so AVAILABILITY_TTL 300 ...`)
//! and `CONFIG SET/GET gpucache.<name>` both land in these values.

use crate::core::demand::DemandTiers;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Mutex, OnceLock};

pub static AVAILABILITY_TTL: AtomicI64 = AtomicI64::new(300);
pub static PRICING_TTL: AtomicI64 = AtomicI64::new(600);
pub static JITTER_PERCENT: AtomicI64 = AtomicI64::new(10);
pub static STREAM_MAXLEN: AtomicI64 = AtomicI64::new(10_000);
/// GPUs one `AVAILABLE` may pass over (failing its filters) before it answers with what it
/// found: a filter few GPUs pass would otherwise read every record of a type while every other
/// client waits.
pub static SEARCH_MAX_SKIPS: AtomicI64 = AtomicI64::new(1_000);
/// Regions of at most this many GPUs and bookings are checked and repaired inside the command
/// (~19 µs each); larger ones are surveyed in a forked child (`survey_fork.rs`).
pub static SURVEY_INLINE_MAX: AtomicI64 = AtomicI64::new(500);
/// `gpucache.accept-eviction-risk` (load argument `ACCEPT_EVICTION_RISK yes|no`): lets `BOOK`
/// run under an `allkeys-*` eviction policy, which can evict bookings (see `eviction.rs`).
pub static ACCEPT_EVICTION_RISK: AtomicBool = AtomicBool::new(false);

/// One tunable: its `CONFIG` name, load-argument name, default and accepted range.
pub struct Setting {
    pub config_name: &'static str,
    pub load_arg: &'static str,
    pub value: &'static AtomicI64,
    pub default: i64,
    pub min: i64,
    pub max: i64,
}

pub const SETTINGS: [Setting; 6] = [
    Setting {
        config_name: "availability-ttl",
        load_arg: "AVAILABILITY_TTL",
        value: &AVAILABILITY_TTL,
        default: 300,
        min: 1,
        max: 31_536_000,
    },
    Setting {
        config_name: "pricing-ttl",
        load_arg: "PRICING_TTL",
        value: &PRICING_TTL,
        default: 600,
        min: 1,
        max: 31_536_000,
    },
    Setting {
        config_name: "jitter",
        load_arg: "JITTER",
        value: &JITTER_PERCENT,
        default: 10,
        min: 0,
        max: 50,
    },
    Setting {
        config_name: "stream-maxlen",
        load_arg: "STREAM_MAXLEN",
        value: &STREAM_MAXLEN,
        default: 10_000,
        min: 1,
        max: 100_000_000,
    },
    Setting {
        config_name: "search-max-skips",
        load_arg: "SEARCH_MAX_SKIPS",
        value: &SEARCH_MAX_SKIPS,
        default: 1_000,
        min: 1,
        max: 100_000_000,
    },
    Setting {
        config_name: "survey-inline-max",
        load_arg: "SURVEY_INLINE_MAX",
        value: &SURVEY_INLINE_MAX,
        default: 500,
        min: 0,
        max: 100_000_000,
    },
];

/// Demand-pricing tiers (`gpucache.demand-tiers`, load argument `DEMAND_TIERS`): validated when
/// set, so `CONFIG SET` with a malformed value fails and keeps the old tiers. Registered with
/// Redis in `config_registration.rs`.
pub struct DemandTiersSetting(OnceLock<Mutex<DemandTiers>>);

pub static DEMAND_TIERS: DemandTiersSetting = DemandTiersSetting(OnceLock::new());
pub const DEFAULT_DEMAND_TIERS: &str = "10:2 30:1.5 50:1.2";

impl DemandTiersSetting {
    fn cell(&self) -> &Mutex<DemandTiers> {
        self.0.get_or_init(|| Mutex::new(DemandTiers::default()))
    }

    pub fn current(&self) -> DemandTiers {
        self.cell()
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }

    pub fn replace(&self, text: &str) -> Result<(), String> {
        let tiers = DemandTiers::parse(text)?;
        *self
            .cell()
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = tiers;
        Ok(())
    }
}

pub fn get(value: &AtomicI64) -> i64 {
    value.load(Ordering::Relaxed)
}

/// Applies `NAME value` pairs given after the module path. Names match either the load-argument
/// spelling (`AVAILABILITY_TTL`) or the config spelling (`availability-ttl`), in any case.
pub fn apply_load_args(args: &[&[u8]]) -> Result<(), String> {
    if !args.len().is_multiple_of(2) {
        return Err("module arguments must be NAME value pairs".into());
    }
    for pair in args.chunks_exact(2) {
        let (name, raw) = (pair[0], pair[1]);
        let name_text = crate::core::input::shown(name, 64);
        if name.eq_ignore_ascii_case(b"ACCEPT_EVICTION_RISK")
            || name.eq_ignore_ascii_case(b"accept-eviction-risk")
        {
            let accept = if raw.eq_ignore_ascii_case(b"yes") {
                true
            } else if raw.eq_ignore_ascii_case(b"no") {
                false
            } else {
                return Err("module argument ACCEPT_EVICTION_RISK must be yes or no".to_owned());
            };
            ACCEPT_EVICTION_RISK.store(accept, Ordering::Relaxed);
            continue;
        }
        if name.eq_ignore_ascii_case(b"DEMAND_TIERS") || name.eq_ignore_ascii_case(b"demand-tiers")
        {
            let text =
                std::str::from_utf8(raw).map_err(|_| "DEMAND_TIERS must be text".to_owned())?;
            DEMAND_TIERS
                .replace(text)
                .map_err(|e| format!("module argument DEMAND_TIERS: {e}"))?;
            continue;
        }
        let setting = SETTINGS
            .iter()
            .find(|s| {
                name.eq_ignore_ascii_case(s.load_arg.as_bytes())
                    || name.eq_ignore_ascii_case(s.config_name.as_bytes())
            })
            .ok_or_else(|| {
                let mut known: Vec<&str> = SETTINGS.iter().map(|s| s.load_arg).collect();
                known.extend(["DEMAND_TIERS", "ACCEPT_EVICTION_RISK"]);
                format!(
                    "unknown module argument '{name_text}' (known: {})",
                    known.join(", ")
                )
            })?;
        let value = std::str::from_utf8(raw)
            .ok()
            .and_then(|s| s.parse::<i64>().ok())
            .filter(|v| (setting.min..=setting.max).contains(v))
            .ok_or_else(|| {
                format!(
                    "module argument {name_text} must be an integer from {} to {}",
                    setting.min, setting.max
                )
            })?;
        setting.value.store(value, Ordering::Relaxed);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejects_unknown_odd_and_out_of_range_arguments() {
        assert!(apply_load_args(&[b"NOPE", b"1"]).is_err());
        assert!(apply_load_args(&[b"JITTER"]).is_err());
        assert!(apply_load_args(&[b"JITTER", b"99"]).is_err());
        assert!(apply_load_args(&[b"JITTER", b"ten"]).is_err());
    }

    #[test]
    fn demand_tiers_are_validated() {
        assert!(apply_load_args(&[b"DEMAND_TIERS", b"10:3"]).is_ok());
        assert_eq!(DEMAND_TIERS.current().multiplier(0, 10), 300);
        assert!(apply_load_args(&[b"DEMAND_TIERS", b"10:zero"]).is_err());
        assert_eq!(
            DEMAND_TIERS.current().multiplier(0, 10),
            300,
            "a bad value keeps the old"
        );
        DEMAND_TIERS.replace(DEFAULT_DEMAND_TIERS).unwrap();
    }

    #[test]
    fn the_eviction_risk_is_accepted_only_by_yes_or_no() {
        assert!(apply_load_args(&[b"ACCEPT_EVICTION_RISK", b"maybe"]).is_err());
        assert!(apply_load_args(&[b"accept-eviction-risk", b"YES"]).is_ok());
        assert!(ACCEPT_EVICTION_RISK.load(Ordering::Relaxed));
        assert!(apply_load_args(&[b"ACCEPT_EVICTION_RISK", b"no"]).is_ok());
        assert!(!ACCEPT_EVICTION_RISK.load(Ordering::Relaxed));
    }

    #[test]
    fn accepts_both_spellings() {
        assert!(apply_load_args(&[b"stream_maxlen", b"500", b"stream-maxlen", b"600"]).is_ok());
        assert_eq!(get(&STREAM_MAXLEN), 600);
    }
}
