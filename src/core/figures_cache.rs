//! Every region's last-read STATS figures, per db, with their running sum, and which regions
//! changed since they were read: so `GPUCACHE.STATS` without a region answers from memory and
//! re-reads only the regions that changed, a few at a time.
//!
//! A region is *stale* from the moment it may have changed (a write to one of the keys its
//! figures come from, a deadline after which a key it read expires, a change of the demand
//! tiers, or its arrival here before its first read) until it is read again. Its last figures
//! stay in the sum meanwhile (a region never read yet adds nothing) and the reply says how many
//! regions are stale and since when. Regions are re-read oldest change first.

use super::figures::{FiguresSum, RegionFigures, Summary};
use super::slots::region_slot;
use std::collections::{BTreeMap, BTreeSet};

/// How long a region whose read failed (a key of another type, say) waits before the next try:
/// it must not take every refresh budget.
pub const RETRY_MS: i64 = 1_000;

#[derive(Debug, Clone, Default)]
struct Entry {
    slot: u16,
    /// The figures in the sum; `None` before the first read, or when the region had no
    /// counters hash at its last read (it is not counted then).
    figures: Option<RegionFigures>,
    /// When the region may first have changed since its last read.
    stale_since: Option<i64>,
    /// When it is next to be read (set while stale).
    due: Option<i64>,
    /// When a key its figures depend on expires (they are stale from then on).
    deadline: Option<i64>,
}

#[derive(Debug, Clone, Default)]
struct DbFigures {
    entries: BTreeMap<String, Entry>,
    sum: FiguresSum,
    /// (due, region) of the stale regions.
    due: BTreeSet<(i64, String)>,
    /// (stale since, region) of the stale regions.
    stale: BTreeSet<(i64, String)>,
    /// (deadline, region).
    deadlines: BTreeSet<(i64, String)>,
    /// Regions per cluster slot.
    slots: BTreeMap<u16, usize>,
    /// Where the slow re-read of every region goes on from.
    round_after: Option<String>,
}

impl DbFigures {
    fn mark_stale(&mut self, region: &str, now_ms: i64) {
        let Some(entry) = self.entries.get_mut(region) else {
            return;
        };
        if entry.stale_since.is_none() {
            entry.stale_since = Some(now_ms);
            self.stale.insert((now_ms, region.to_owned()));
        }
        // A change may be the fix of what made a read fail: read it again soon, not later.
        if entry.due.is_none_or(|due| due > now_ms) {
            if let Some(due) = entry.due {
                self.due.remove(&(due, region.to_owned()));
            }
            entry.due = Some(now_ms);
            self.due.insert((now_ms, region.to_owned()));
        }
    }

    fn remove(&mut self, region: &str) {
        let Some(entry) = self.entries.remove(region) else {
            return;
        };
        if let Some(figures) = &entry.figures {
            self.sum.remove(figures);
        }
        let name = region.to_owned();
        if let Some(since) = entry.stale_since {
            self.stale.remove(&(since, name.clone()));
        }
        if let Some(due) = entry.due {
            self.due.remove(&(due, name.clone()));
        }
        if let Some(deadline) = entry.deadline {
            self.deadlines.remove(&(deadline, name));
        }
        if let Some(count) = self.slots.get_mut(&entry.slot) {
            *count = count.saturating_sub(1);
            if *count == 0 {
                self.slots.remove(&entry.slot);
            }
        }
    }

    fn pass_deadlines(&mut self, now_ms: i64) {
        while let Some((deadline, region)) = self.deadlines.first().cloned() {
            if deadline > now_ms {
                break;
            }
            self.deadlines.pop_first();
            if let Some(entry) = self.entries.get_mut(&region) {
                entry.deadline = None;
            }
            self.mark_stale(&region, now_ms);
        }
    }
}

/// What the figures of a db's regions add up to, and how fresh that is.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CachedSum {
    pub summary: Summary,
    /// Regions counted (read, with a counters hash).
    pub regions: i64,
    /// Regions whose figures may lag (changed, or not read yet).
    pub stale_regions: i64,
    /// How long ago the oldest change not yet read happened (0 when nothing is stale).
    pub stale_ms: i64,
}

#[derive(Debug, Default)]
pub struct FiguresCache {
    dbs: BTreeMap<i32, DbFigures>,
    /// The demand tiers the figures were read under (shown prices depend on them).
    tiers: Option<String>,
}

impl FiguresCache {
    pub const fn new() -> FiguresCache {
        FiguresCache {
            dbs: BTreeMap::new(),
            tiers: None,
        }
    }

    /// A region this server now holds: stale until its first read.
    pub fn add(&mut self, db: i32, region: &str, now_ms: i64) {
        let figures = self.dbs.entry(db).or_default();
        if figures.entries.contains_key(region) {
            return;
        }
        let slot = region_slot(region);
        figures.entries.insert(
            region.to_owned(),
            Entry {
                slot,
                ..Entry::default()
            },
        );
        *figures.slots.entry(slot).or_default() += 1;
        figures.mark_stale(region, now_ms);
    }

    /// A region this server no longer holds.
    pub fn remove(&mut self, db: i32, region: &str) {
        if let Some(figures) = self.dbs.get_mut(&db) {
            figures.remove(region);
        }
    }

    /// A key the region's figures come from was written, expired, deleted, ...
    pub fn changed(&mut self, db: i32, region: &str, now_ms: i64) {
        if let Some(figures) = self.dbs.get_mut(&db) {
            figures.mark_stale(region, now_ms);
        }
    }

    /// Every region may have changed (after a load, or a change of the demand tiers).
    pub fn all_changed(&mut self, now_ms: i64) {
        for figures in self.dbs.values_mut() {
            let regions: Vec<String> = figures.entries.keys().cloned().collect();
            for region in regions {
                figures.mark_stale(&region, now_ms);
            }
        }
    }

    /// Records the demand tiers in force; a change makes every region stale.
    pub fn tiers_in_force(&mut self, tiers: &str, now_ms: i64) {
        if self.tiers.as_deref() != Some(tiers) {
            if self.tiers.is_some() {
                self.all_changed(now_ms);
            }
            self.tiers = Some(tiers.to_owned());
        }
    }

    pub fn clear_db(&mut self, db: i32) {
        self.dbs.remove(&db);
    }

    pub fn clear(&mut self) {
        self.dbs.clear();
    }

    /// `SWAPDB a b`: the figures move with their db.
    pub fn swap(&mut self, a: i32, b: i32) {
        let first = self.dbs.remove(&a);
        let second = self.dbs.remove(&b);
        if let Some(figures) = first {
            self.dbs.insert(b, figures);
        }
        if let Some(figures) = second {
            self.dbs.insert(a, figures);
        }
    }

    /// The stale region of `db` to read next (the oldest change first), if one is due.
    pub fn next_due(&mut self, db: i32, now_ms: i64) -> Option<String> {
        let figures = self.dbs.get_mut(&db)?;
        figures.pass_deadlines(now_ms);
        figures
            .due
            .first()
            .filter(|(due, _)| *due <= now_ms)
            .map(|(_, region)| region.clone())
    }

    /// The next stale region due in any db.
    pub fn next_due_anywhere(&mut self, now_ms: i64) -> Option<(i32, String)> {
        let dbs: Vec<i32> = self.dbs.keys().copied().collect();
        dbs.into_iter()
            .find_map(|db| self.next_due(db, now_ms).map(|region| (db, region)))
    }

    /// The next region of the slow round that re-reads every region (a change nothing
    /// announced is still caught), wrapping around.
    pub fn next_in_round(&mut self) -> Option<(i32, String)> {
        let dbs: Vec<i32> = self.dbs.keys().copied().collect();
        for db in dbs {
            let figures = self.dbs.get_mut(&db)?;
            let next = match &figures.round_after {
                Some(after) => figures
                    .entries
                    .range::<str, _>((
                        std::ops::Bound::Excluded(after.as_str()),
                        std::ops::Bound::Unbounded,
                    ))
                    .next(),
                None => figures.entries.iter().next(),
            }
            .map(|(region, _)| region.clone());
            figures.round_after = next.clone();
            if let Some(region) = next {
                return Some((db, region));
            }
        }
        None
    }

    /// The figures just read (`None`: the region has no counters hash and is not counted);
    /// `deadline` is when a key they depend on expires.
    pub fn read(
        &mut self,
        db: i32,
        region: &str,
        figures: Option<RegionFigures>,
        deadline: Option<i64>,
    ) {
        let Some(db_figures) = self.dbs.get_mut(&db) else {
            return;
        };
        let Some(entry) = db_figures.entries.get_mut(region) else {
            return;
        };
        let name = region.to_owned();
        if let Some(old) = entry.figures.take() {
            db_figures.sum.remove(&old);
        }
        if let Some(new) = &figures {
            db_figures.sum.add(new);
        }
        entry.figures = figures;
        if let Some(since) = entry.stale_since.take() {
            db_figures.stale.remove(&(since, name.clone()));
        }
        if let Some(due) = entry.due.take() {
            db_figures.due.remove(&(due, name.clone()));
        }
        if let Some(old) = entry.deadline.take() {
            db_figures.deadlines.remove(&(old, name.clone()));
        }
        if let Some(deadline) = deadline {
            entry.deadline = Some(deadline);
            db_figures.deadlines.insert((deadline, name));
        }
    }

    /// The region could not be read: it stays stale and is tried again after `RETRY_MS`.
    pub fn read_failed(&mut self, db: i32, region: &str, now_ms: i64) {
        let Some(figures) = self.dbs.get_mut(&db) else {
            return;
        };
        let Some(entry) = figures.entries.get_mut(region) else {
            return;
        };
        let name = region.to_owned();
        if let Some(due) = entry.due.take() {
            figures.due.remove(&(due, name.clone()));
        }
        let retry = now_ms.saturating_add(RETRY_MS);
        entry.due = Some(retry);
        figures.due.insert((retry, name.clone()));
        if entry.stale_since.is_none() {
            entry.stale_since = Some(now_ms);
            figures.stale.insert((now_ms, name));
        }
    }

    /// Whether every region of `db` lies in a slot `whole` accepts (a cluster node's question:
    /// is any of them moving?).
    pub fn all_slots(&self, db: i32, whole: impl Fn(u16) -> bool) -> bool {
        self.dbs
            .get(&db)
            .is_none_or(|figures| figures.slots.keys().all(|slot| whole(*slot)))
    }

    /// The running sum over every region of `db`: no region is looked at.
    pub fn sum(&mut self, db: i32, now_ms: i64) -> CachedSum {
        let Some(figures) = self.dbs.get_mut(&db) else {
            return CachedSum::default();
        };
        figures.pass_deadlines(now_ms);
        CachedSum {
            summary: figures.sum.summary(now_ms),
            regions: figures.sum.regions(),
            stale_regions: i64::try_from(figures.stale.len()).unwrap_or(i64::MAX),
            stale_ms: figures
                .stale
                .first()
                .map_or(0, |(since, _)| now_ms.saturating_sub(*since).max(0)),
        }
    }

    /// The sum over the regions of `db` that `counted(region, slot)` accepts, made afresh from
    /// the figures in memory (a caller restricted to some regions, a region on the move).
    pub fn sum_of(
        &mut self,
        db: i32,
        now_ms: i64,
        mut counted: impl FnMut(&str, u16) -> bool,
    ) -> CachedSum {
        let Some(figures) = self.dbs.get_mut(&db) else {
            return CachedSum::default();
        };
        figures.pass_deadlines(now_ms);
        let mut sum = FiguresSum::default();
        let (mut stale_regions, mut oldest) = (0i64, None::<i64>);
        for (region, entry) in &figures.entries {
            if !counted(region, entry.slot) {
                continue;
            }
            if let Some(region_figures) = &entry.figures {
                sum.add(region_figures);
            }
            if let Some(since) = entry.stale_since {
                stale_regions = stale_regions.saturating_add(1);
                oldest = Some(oldest.map_or(since, |o| o.min(since)));
            }
        }
        CachedSum {
            summary: sum.summary(now_ms),
            regions: sum.regions(),
            stale_regions,
            stale_ms: oldest.map_or(0, |since| now_ms.saturating_sub(since).max(0)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T0: i64 = 1_800_000_000_000;

    fn figures(total: i64) -> RegionFigures {
        RegionFigures {
            total,
            ..RegionFigures::default()
        }
    }

    /// Reads due regions like a STATS call with room for `budget` reads, from `truth`.
    fn refresh(cache: &mut FiguresCache, truth: &BTreeMap<String, i64>, now: i64, budget: usize) {
        for _ in 0..budget {
            let Some(region) = cache.next_due(0, now) else {
                return;
            };
            cache.read(0, &region, truth.get(&region).map(|t| figures(*t)), None);
        }
    }

    #[test]
    fn a_new_region_is_stale_until_read_then_counted() {
        let mut cache = FiguresCache::new();
        cache.add(0, "eu", T0);
        let before = cache.sum(0, T0 + 5);
        assert_eq!(
            (before.regions, before.stale_regions, before.stale_ms),
            (0, 1, 5)
        );
        assert_eq!(cache.next_due(0, T0 + 5).as_deref(), Some("eu"));
        cache.read(0, "eu", Some(figures(3)), None);
        let after = cache.sum(0, T0 + 6);
        assert_eq!(
            (after.regions, after.stale_regions, after.stale_ms),
            (1, 0, 0)
        );
        assert_eq!(after.summary.total, 3);
        assert_eq!(cache.next_due(0, T0 + 6), None);
    }

    #[test]
    fn repeated_budgeted_refreshes_converge_to_the_exact_sum() {
        let mut cache = FiguresCache::new();
        let mut truth = BTreeMap::new();
        for i in 0..1000 {
            let region = format!("r{i}");
            truth.insert(region.clone(), i);
            cache.add(0, &region, T0);
        }
        let exact: i64 = truth.values().sum();
        let mut now = T0;
        let mut calls = 0;
        loop {
            refresh(&mut cache, &truth, now, 7);
            calls += 1;
            now += 1;
            let sum = cache.sum(0, now);
            if sum.stale_regions == 0 {
                assert_eq!(sum.summary.total, exact);
                assert_eq!(sum.regions, 1000);
                break;
            }
            assert!(
                sum.summary.total < exact,
                "a partial sum lacks the unread regions"
            );
            assert!(sum.stale_ms > 0);
        }
        assert_eq!(calls, 1000_usize.div_ceil(7));
        // A few changes: stale until read again, then exact.
        for region in ["r1", "r500", "r999"] {
            *truth.get_mut(region).unwrap() += 100;
            cache.changed(0, region, now);
        }
        let lagging = cache.sum(0, now + 10);
        assert_eq!((lagging.stale_regions, lagging.stale_ms), (3, 10));
        assert_eq!(lagging.summary.total, exact, "old figures until read");
        refresh(&mut cache, &truth, now + 10, 7);
        let sum = cache.sum(0, now + 11);
        assert_eq!((sum.stale_regions, sum.summary.total), (0, exact + 300));
    }

    #[test]
    fn the_oldest_change_is_read_first() {
        let mut cache = FiguresCache::new();
        for region in ["a", "b", "c"] {
            cache.add(0, region, T0);
            cache.read(0, region, Some(figures(1)), None);
        }
        cache.changed(0, "c", T0 + 1);
        cache.changed(0, "a", T0 + 2);
        cache.changed(0, "c", T0 + 3);
        assert_eq!(cache.next_due(0, T0 + 4).as_deref(), Some("c"));
        cache.read(0, "c", Some(figures(1)), None);
        assert_eq!(cache.next_due(0, T0 + 4).as_deref(), Some("a"));
    }

    #[test]
    fn figures_are_stale_once_a_key_they_read_expires() {
        let mut cache = FiguresCache::new();
        cache.add(0, "eu", T0);
        cache.read(0, "eu", Some(figures(2)), Some(T0 + 100));
        assert_eq!(cache.sum(0, T0 + 99).stale_regions, 0);
        let expired = cache.sum(0, T0 + 100);
        assert_eq!(expired.stale_regions, 1);
        assert_eq!(cache.next_due(0, T0 + 100).as_deref(), Some("eu"));
    }

    #[test]
    fn a_failed_read_waits_unless_the_region_changes() {
        let mut cache = FiguresCache::new();
        cache.add(0, "bad", T0);
        cache.add(0, "good", T0 + 1);
        cache.read_failed(0, "bad", T0 + 2);
        assert_eq!(cache.next_due(0, T0 + 2).as_deref(), Some("good"));
        cache.read(0, "good", Some(figures(1)), None);
        assert_eq!(cache.next_due(0, T0 + 3), None);
        assert_eq!(cache.sum(0, T0 + 3).stale_ms, 3, "stale since it was added");
        assert_eq!(cache.next_due(0, T0 + 2 + RETRY_MS).as_deref(), Some("bad"));
        cache.changed(0, "bad", T0 + 10);
        assert_eq!(cache.next_due(0, T0 + 10).as_deref(), Some("bad"));
    }

    #[test]
    fn removed_regions_leave_the_sum_and_dbs_stay_apart() {
        let mut cache = FiguresCache::new();
        cache.add(0, "a", T0);
        cache.read(0, "a", Some(figures(2)), None);
        cache.add(1, "b", T0);
        cache.read(1, "b", Some(figures(5)), None);
        cache.swap(0, 1);
        assert_eq!(cache.sum(0, T0).summary.total, 5);
        assert_eq!(cache.sum(1, T0).summary.total, 2);
        cache.remove(0, "b");
        assert_eq!(cache.sum(0, T0), CachedSum::default());
        cache.clear_db(1);
        assert_eq!(cache.sum(1, T0).regions, 0);
    }

    #[test]
    fn new_demand_tiers_make_every_region_stale() {
        let mut cache = FiguresCache::new();
        cache.tiers_in_force("10:2", T0);
        cache.add(0, "a", T0);
        cache.read(0, "a", Some(figures(1)), None);
        cache.tiers_in_force("10:2", T0 + 1);
        assert_eq!(cache.sum(0, T0 + 1).stale_regions, 0);
        cache.tiers_in_force("10:3", T0 + 2);
        assert_eq!(cache.sum(0, T0 + 2).stale_regions, 1);
    }

    #[test]
    fn a_filtered_sum_counts_only_the_accepted_regions() {
        let mut cache = FiguresCache::new();
        for (region, total) in [("eu", 1), ("us", 10)] {
            cache.add(0, region, T0);
            cache.read(0, region, Some(figures(total)), None);
        }
        cache.add(0, "ap", T0);
        let eu = cache.sum_of(0, T0, |region, _| region == "eu");
        assert_eq!((eu.regions, eu.summary.total, eu.stale_regions), (1, 1, 0));
        let all = cache.sum_of(0, T0 + 1, |_, _| true);
        assert_eq!(
            (all.regions, all.summary.total, all.stale_regions),
            (2, 11, 1)
        );
        let slot = region_slot("us");
        assert!(!cache.all_slots(0, |s| s != slot));
        assert!(cache.all_slots(0, |_| true));
    }

    #[test]
    fn the_round_visits_every_region_and_wraps() {
        let mut cache = FiguresCache::new();
        cache.add(0, "a", T0);
        cache.add(0, "b", T0);
        cache.add(2, "c", T0);
        let visited: Vec<_> = (0..4).filter_map(|_| cache.next_in_round()).collect();
        assert_eq!(
            visited,
            [
                (0, "a".to_owned()),
                (0, "b".to_owned()),
                (2, "c".to_owned()),
                (0, "a".to_owned())
            ]
        );
    }
}
