//! `GPUCACHE.STATS` figures as numbers: one region's, and a running sum over regions that a
//! region can be added to and taken out of again when its figures are read anew.
//!
//! The sum is exact under any order of adds and removes: counts are summed as `i128` with
//! wrapping arithmetic (exactly invertible; hand-edited counters near `i64::MAX` in many
//! regions still fit), each type's minimum price is kept as a multiset of the regions'
//! minima, and the 24-hour window as summed buckets, so time roll-off applies when the sum is
//! shown, not when it was made.

use super::price::Price;
use super::window::{self, WindowTotals};
use std::collections::BTreeMap;

/// One type's figures in one region.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TypeFigures {
    pub listed: i64,
    pub total: i64,
    /// Demand multiplier (hundredths); `None` in a sum over regions.
    pub multiplier: Option<u32>,
    /// Lowest shown price of a listed GPU.
    pub min_price: Option<Price>,
    /// Sum of the shown prices of listed GPUs, micro-units.
    pub shown_sum: i128,
    /// `None` in a sum over regions.
    pub type_price: Option<Price>,
}

/// Everything STATS reports for one region, with the 24-hour window as its buckets.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RegionFigures {
    pub total: i64,
    pub by_status: BTreeMap<&'static str, i64>,
    pub bookings_active: i64,
    pub bookings_created: i64,
    pub bookings_cancelled: i64,
    pub bookings_ended: i64,
    /// (bucket, bookings, volume in micro-units) of the buckets live when read.
    pub window: Vec<(i64, i64, i64)>,
    pub types: BTreeMap<String, TypeFigures>,
}

/// What STATS replies: one region's figures or a sum, at one instant.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Summary {
    pub total: i64,
    pub by_status: BTreeMap<&'static str, i64>,
    pub bookings_active: i64,
    pub bookings_created: i64,
    pub bookings_cancelled: i64,
    pub bookings_ended: i64,
    pub last_24h: WindowTotals,
    pub types: BTreeMap<String, TypeFigures>,
}

impl RegionFigures {
    pub fn summary(&self, now_ms: i64) -> Summary {
        Summary {
            total: self.total,
            by_status: self.by_status.clone(),
            bookings_active: self.bookings_active,
            bookings_created: self.bookings_created,
            bookings_cancelled: self.bookings_cancelled,
            bookings_ended: self.bookings_ended,
            last_24h: window::totals(self.window.iter().copied(), now_ms),
            types: self.types.clone(),
        }
    }
}

fn clamp(value: i128) -> i64 {
    i64::try_from(value).unwrap_or(if value < 0 { i64::MIN } else { i64::MAX })
}

/// +1 or -1: whether a region's figures go into the sum or come out of it.
#[derive(Clone, Copy)]
enum Sign {
    Add,
    Remove,
}

impl Sign {
    fn apply(self, sum: &mut i128, value: impl Into<i128>) {
        *sum = match self {
            Sign::Add => sum.wrapping_add(value.into()),
            Sign::Remove => sum.wrapping_sub(value.into()),
        };
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct TypeSum {
    /// Regions summed that have this type (the type leaves the sum with its last region).
    regions: i64,
    listed: i128,
    total: i128,
    shown_sum: i128,
    /// Each region's minimum shown price (micro-units) -> how many regions have it.
    minima: BTreeMap<i64, i64>,
}

/// A sum of region figures that regions can join and leave.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FiguresSum {
    regions: i64,
    total: i128,
    by_status: BTreeMap<&'static str, i128>,
    bookings_active: i128,
    bookings_created: i128,
    bookings_cancelled: i128,
    bookings_ended: i128,
    /// bucket -> (bookings, volume).
    window: BTreeMap<i64, (i128, i128)>,
    types: BTreeMap<String, TypeSum>,
}

impl FiguresSum {
    pub fn add(&mut self, figures: &RegionFigures) {
        self.apply(figures, Sign::Add);
    }

    /// Takes out figures added before (exactly those: the caller keeps them).
    pub fn remove(&mut self, figures: &RegionFigures) {
        self.apply(figures, Sign::Remove);
    }

    /// How many regions are summed.
    pub fn regions(&self) -> i64 {
        self.regions
    }

    fn apply(&mut self, figures: &RegionFigures, sign: Sign) {
        self.regions = match sign {
            Sign::Add => self.regions.saturating_add(1),
            Sign::Remove => self.regions.saturating_sub(1),
        };
        sign.apply(&mut self.total, figures.total);
        for (status, count) in &figures.by_status {
            sign.apply(self.by_status.entry(status).or_default(), *count);
        }
        sign.apply(&mut self.bookings_active, figures.bookings_active);
        sign.apply(&mut self.bookings_created, figures.bookings_created);
        sign.apply(&mut self.bookings_cancelled, figures.bookings_cancelled);
        sign.apply(&mut self.bookings_ended, figures.bookings_ended);
        for (bucket, count, volume) in &figures.window {
            let entry = self.window.entry(*bucket).or_default();
            sign.apply(&mut entry.0, *count);
            sign.apply(&mut entry.1, *volume);
            if *entry == (0, 0) {
                self.window.remove(bucket);
            }
        }
        if self.regions == 0 {
            // Nothing summed shows no status (as a sum that never had a region).
            self.by_status.retain(|_, count| *count != 0);
        }
        for (gpu_type, t) in &figures.types {
            let sum = self.types.entry(gpu_type.clone()).or_default();
            let mut regions = i128::from(sum.regions);
            sign.apply(&mut regions, 1);
            sum.regions = clamp(regions);
            sign.apply(&mut sum.listed, t.listed);
            sign.apply(&mut sum.total, t.total);
            sign.apply(&mut sum.shown_sum, t.shown_sum);
            if let Some(min) = t.min_price {
                let mut count = i128::from(sum.minima.get(&min.micros()).copied().unwrap_or(0));
                sign.apply(&mut count, 1);
                if count <= 0 {
                    sum.minima.remove(&min.micros());
                } else {
                    sum.minima.insert(min.micros(), clamp(count));
                }
            }
            if sum.regions <= 0 {
                self.types.remove(gpu_type);
            }
        }
    }

    /// The sum as STATS shows it at `now_ms` (buckets that left the window no longer count).
    pub fn summary(&self, now_ms: i64) -> Summary {
        let last_24h = self
            .window
            .range(window::live_buckets(now_ms))
            .fold((0i128, 0i128), |(b, v), (_, (count, volume))| {
                (b.wrapping_add(*count), v.wrapping_add(*volume))
            });
        Summary {
            total: clamp(self.total),
            by_status: self
                .by_status
                .iter()
                .map(|(status, count)| (*status, clamp(*count)))
                .collect(),
            bookings_active: clamp(self.bookings_active),
            bookings_created: clamp(self.bookings_created),
            bookings_cancelled: clamp(self.bookings_cancelled),
            bookings_ended: clamp(self.bookings_ended),
            last_24h: WindowTotals {
                bookings: clamp(last_24h.0),
                volume_micros: clamp(last_24h.1),
            },
            types: self
                .types
                .iter()
                .map(|(gpu_type, t)| {
                    let figures = TypeFigures {
                        listed: clamp(t.listed),
                        total: clamp(t.total),
                        multiplier: None,
                        min_price: t.minima.keys().next().map(|m| Price::from_micros(*m)),
                        shown_sum: t.shown_sum,
                        type_price: None,
                    };
                    (gpu_type.clone(), figures)
                })
                .collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: i64 = 1_800_000_000_000;

    fn region(total: i64, prices: &[(&str, i64, i64)], booked: i64) -> RegionFigures {
        let mut figures = RegionFigures {
            total,
            bookings_created: booked,
            bookings_active: booked,
            window: vec![(window::bucket_of(NOW), booked, booked * 1_000_000)],
            ..RegionFigures::default()
        };
        figures.by_status.insert("available", total - booked);
        figures.by_status.insert("busy", booked);
        for (gpu_type, listed, min) in prices {
            figures.types.insert(
                (*gpu_type).to_owned(),
                TypeFigures {
                    listed: *listed,
                    total: *listed + 1,
                    multiplier: Some(120),
                    min_price: Some(Price::from_micros(*min)),
                    shown_sum: i128::from(*listed) * i128::from(*min),
                    type_price: None,
                },
            );
        }
        figures
    }

    #[test]
    fn a_sum_adds_every_figure_and_keeps_the_lowest_price() {
        let mut sum = FiguresSum::default();
        sum.add(&region(4, &[("A100", 3, 2_000_000)], 1));
        sum.add(&region(
            6,
            &[("A100", 2, 1_500_000), ("H100", 5, 9_000_000)],
            2,
        ));
        let shown = sum.summary(NOW);
        assert_eq!(sum.regions(), 2);
        assert_eq!(shown.total, 10);
        assert_eq!(shown.by_status["busy"], 3);
        assert_eq!(shown.bookings_created, 3);
        assert_eq!(shown.last_24h.bookings, 3);
        assert_eq!(shown.last_24h.volume_micros, 3_000_000);
        let a100 = &shown.types["A100"];
        assert_eq!((a100.listed, a100.total), (5, 7));
        assert_eq!(a100.min_price, Some(Price::from_micros(1_500_000)));
        assert_eq!(a100.shown_sum, 9_000_000);
        assert_eq!(a100.multiplier, None, "a sum has no multiplier");
    }

    #[test]
    fn removing_a_region_restores_the_sum_without_it() {
        let a = region(4, &[("A100", 3, 2_000_000)], 1);
        let b = region(6, &[("A100", 2, 1_500_000), ("H100", 5, 9_000_000)], 2);
        let mut only_a = FiguresSum::default();
        only_a.add(&a);
        let mut both = FiguresSum::default();
        both.add(&b);
        both.add(&a);
        both.remove(&b);
        assert_eq!(both, only_a, "the lowest price and H100 left with b");
        both.remove(&a);
        assert_eq!(both, FiguresSum::default());
    }

    #[test]
    fn the_same_minimum_in_two_regions_stays_until_both_leave() {
        let a = region(1, &[("A100", 1, 1_000_000)], 0);
        let mut sum = FiguresSum::default();
        sum.add(&a);
        sum.add(&a);
        sum.remove(&a);
        assert_eq!(
            sum.summary(NOW).types["A100"].min_price,
            Some(Price::from_micros(1_000_000))
        );
    }

    #[test]
    fn counters_at_the_edge_of_i64_sum_exactly_and_show_saturated() {
        let mut huge = region(i64::MAX, &[], 0);
        huge.by_status.clear();
        let mut sum = FiguresSum::default();
        sum.add(&huge);
        sum.add(&huge);
        assert_eq!(sum.summary(NOW).total, i64::MAX);
        sum.remove(&huge);
        assert_eq!(sum.summary(NOW).total, i64::MAX);
        sum.remove(&huge);
        assert_eq!(sum.summary(NOW).total, 0);
    }

    #[test]
    fn bookings_leave_the_window_of_a_sum_as_time_passes() {
        let mut sum = FiguresSum::default();
        sum.add(&region(1, &[], 2));
        assert_eq!(sum.summary(NOW).last_24h.bookings, 2);
        let a_day_later = NOW + window::WINDOW_MS + window::BUCKET_MS;
        assert_eq!(sum.summary(a_day_later).last_24h, WindowTotals::default());
        assert_eq!(
            sum.summary(a_day_later).bookings_created,
            2,
            "all-time counters stay"
        );
    }
}
