//! Jittered time-to-live: `base ± jitter%`, so records written together do not all expire in
//! the same instant and send every edge node back to Redis at once (a thundering herd).
//!
//! The random draw is an argument: the command layer draws it once on the primary and
//! replicates the resulting absolute expiry, so replicas and AOF replays never draw again.

/// Jittered TTL in milliseconds for `base_seconds` with `jitter_percent` spread.
/// `unit_draw` is a uniform draw from `[0, 1)`. The result is at least one second.
pub fn jittered_ttl_ms(base_seconds: i64, jitter_percent: i64, unit_draw: f64) -> i64 {
    let base_ms = base_seconds.max(1).saturating_mul(1000);
    let percent = jitter_percent.clamp(0, 100);
    let spread_ms = base_ms.saturating_mul(percent) / 100;
    let draw = if unit_draw.is_finite() {
        unit_draw.clamp(0.0, 1.0)
    } else {
        0.5
    };
    // Map [0, 1) onto [-spread, +spread].
    let offset = ((draw * 2.0 - 1.0) * spread_ms as f64).round() as i64;
    base_ms.saturating_add(offset).max(1000)
}

/// The window every jittered TTL falls in, for documentation and tests.
pub fn jitter_window_ms(base_seconds: i64, jitter_percent: i64) -> (i64, i64) {
    (
        jittered_ttl_ms(base_seconds, jitter_percent, 0.0),
        jittered_ttl_ms(base_seconds, jitter_percent, 1.0),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stays_within_base_plus_minus_jitter() {
        assert_eq!(jitter_window_ms(300, 10), (270_000, 330_000));
        for i in 0..1000 {
            let ttl = jittered_ttl_ms(300, 10, f64::from(i) / 1000.0);
            assert!((270_000..=330_000).contains(&ttl), "{ttl}");
        }
    }

    #[test]
    fn zero_jitter_is_exact() {
        assert_eq!(jittered_ttl_ms(60, 0, 0.123), 60_000);
    }

    #[test]
    fn draws_spread_across_the_window() {
        let low = jittered_ttl_ms(100, 20, 0.01);
        let high = jittered_ttl_ms(100, 20, 0.99);
        assert!(high - low > 30_000, "{low} {high}");
    }

    #[test]
    fn hostile_inputs_do_not_overflow_or_go_below_a_second() {
        assert_eq!(jittered_ttl_ms(1, 100, 0.0), 1000);
        assert!(jittered_ttl_ms(i64::MAX, 100, 1.0) > 0);
        assert_eq!(jittered_ttl_ms(10, 10, f64::NAN), 10_000);
        assert_eq!(jittered_ttl_ms(-5, -5, 0.5), 1000);
    }
}
