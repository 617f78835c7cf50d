//! A rolling 24-hour window of booking counts and volume, kept as time buckets so the totals
//! cost a fixed number of field reads instead of a scan of every booking.
//!
//! Each booking adds to the bucket of its creation time; the totals add up the buckets that
//! overlap the last 24 hours. With 15-minute buckets the window's oldest edge is exact to within
//! one bucket.

pub const BUCKET_MS: i64 = 15 * 60 * 1000;
pub const WINDOW_MS: i64 = 24 * 3600 * 1000;
/// Buckets that make up one window (the current, partly filled one included).
pub const BUCKETS: i64 = WINDOW_MS / BUCKET_MS;

pub fn bucket_of(now_ms: i64) -> i64 {
    now_ms.div_euclid(BUCKET_MS)
}

/// The buckets whose sum is "the last 24 hours" at `now_ms`, oldest first.
pub fn live_buckets(now_ms: i64) -> std::ops::RangeInclusive<i64> {
    let current = bucket_of(now_ms);
    (current - BUCKETS + 1)..=current
}

pub fn is_live(bucket: i64, now_ms: i64) -> bool {
    live_buckets(now_ms).contains(&bucket)
}

pub fn count_field(bucket: i64) -> String {
    format!("count:{bucket}")
}

pub fn volume_field(bucket: i64) -> String {
    format!("volume:{bucket}")
}

/// The bucket a stored field belongs to, if it is one of ours.
pub fn bucket_of_field(field: &str) -> Option<i64> {
    let (_, bucket) = field.split_once(':')?;
    bucket.parse().ok()
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WindowTotals {
    pub bookings: i64,
    pub volume_micros: i64,
}

/// Adds up the live buckets among `(bucket, count, volume_micros)` entries.
pub fn totals(entries: impl IntoIterator<Item = (i64, i64, i64)>, now_ms: i64) -> WindowTotals {
    entries
        .into_iter()
        .filter(|(bucket, _, _)| is_live(*bucket, now_ms))
        .fold(WindowTotals::default(), |acc, (_, count, volume)| {
            WindowTotals {
                bookings: acc.bookings.saturating_add(count),
                volume_micros: acc.volume_micros.saturating_add(volume),
            }
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An in-memory bucket store driven by an injected clock, as the module's hash is.
    #[derive(Default)]
    struct Buckets(std::collections::BTreeMap<i64, (i64, i64)>);

    impl Buckets {
        fn record(&mut self, now_ms: i64, volume: i64) {
            let entry = self.0.entry(bucket_of(now_ms)).or_default();
            entry.0 += 1;
            entry.1 += volume;
        }
        fn totals(&self, now_ms: i64) -> WindowTotals {
            totals(self.0.iter().map(|(b, (c, v))| (*b, *c, *v)), now_ms)
        }
    }

    const HOUR: i64 = 3600 * 1000;
    const T0: i64 = 1_800_000_000_000;

    #[test]
    fn a_day_has_96_buckets() {
        assert_eq!(BUCKETS, 96);
        assert_eq!(live_buckets(T0).count(), 96);
    }

    #[test]
    fn bookings_count_for_24_hours_then_roll_out() {
        let mut window = Buckets::default();
        window.record(T0, 5_000_000);
        window.record(T0 + HOUR, 7_000_000);
        assert_eq!(
            window.totals(T0 + HOUR),
            WindowTotals {
                bookings: 2,
                volume_micros: 12_000_000
            }
        );
        // 23 hours after the first booking both still count.
        assert_eq!(window.totals(T0 + 23 * HOUR).bookings, 2);
        // A day and a bucket later the first has rolled out, the second not yet.
        let later = T0 + WINDOW_MS + BUCKET_MS;
        assert_eq!(
            window.totals(later),
            WindowTotals {
                bookings: 1,
                volume_micros: 7_000_000
            }
        );
        // And then the second too.
        assert_eq!(
            window.totals(T0 + HOUR + WINDOW_MS + BUCKET_MS),
            WindowTotals::default()
        );
    }

    #[test]
    fn the_oldest_edge_is_exact_to_one_bucket() {
        let mut window = Buckets::default();
        window.record(T0, 1);
        let start_of_bucket = bucket_of(T0) * BUCKET_MS;
        assert_eq!(window.totals(start_of_bucket + WINDOW_MS - 1).bookings, 1);
        assert_eq!(window.totals(start_of_bucket + WINDOW_MS).bookings, 0);
    }

    #[test]
    fn field_names_round_trip() {
        assert_eq!(bucket_of_field(&count_field(123)), Some(123));
        assert_eq!(bucket_of_field(&volume_field(-4)), Some(-4));
        assert_eq!(bucket_of_field("seq"), None);
    }
}
