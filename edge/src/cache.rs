//! The in-process L1: a bounded S3-FIFO cache (quick_cache) of marketplace reads, validated
//! against link state, deadlines, tag epochs and record versions on every hit and every fill.

use crate::clock::{millis, Clock};
use crate::error::EdgeError;
use crate::flight::{Flights, Joined};
use crate::keyspace;
use crate::query::Query;
use crate::stats::{add, Counters, Stats};
use crate::tags::{Epochs, Stamp, Stamps, Tag};
use moka::policy::EvictionPolicy;
use serde_json::Value;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

/// Where an invalidation came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// A keyspace notification (the fast path).
    Notification,
    /// An entry of a region's event stream, read live or replayed after a reconnect.
    Stream,
    /// The region was dropped whole: events may have been lost.
    RegionDrop,
}

/// Called for every key invalidated, with where it came from (metrics, the propagation
/// benchmark). Runs on a listener thread: keep it short.
pub type InvalidationHook = Arc<dyn Fn(&str, Source) + Send + Sync>;

/// How the L1's S3-FIFO splits its room between entries read once so far (a small probation
/// queue) and entries read again (the main queue).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Eviction {
    /// 3% probation, 97% main: keeps what is read often (popular GPUs) through bursts of
    /// one-off reads — the best hit ratio on skewed traffic.
    #[default]
    Frequency,
    /// 30% probation, 70% main: new keys stay longer before they must prove themselves —
    /// better when the hot set moves (a new region or type in demand).
    Recency,
}

impl Eviction {
    /// quick_cache's share of the room kept for entries read more than once.
    fn main_share(self) -> f64 {
        match self {
            Eviction::Frequency => 0.97,
            Eviction::Recency => 0.7,
        }
    }
}

/// Size and lifetime limits of the L1.
#[derive(Debug, Clone)]
pub struct L1Config {
    pub max_entries: u64,
    /// Upper bound on an entry's life, whatever the events say (a safety net).
    pub time_to_live: Duration,
    /// Drop entries not read for this long (`None`: only `time_to_live`).
    pub time_to_idle: Option<Duration>,
    pub eviction: Eviction,
    /// Serve cached entries while the invalidation link is down (they may be stale until it
    /// is back). Off by default: reads then go to Redis.
    pub serve_while_disconnected: bool,
}

impl Default for L1Config {
    fn default() -> Self {
        L1Config {
            max_entries: 100_000,
            time_to_live: Duration::from_secs(60),
            time_to_idle: None,
            eviction: Eviction::Frequency,
            serve_while_disconnected: false,
        }
    }
}

enum Lookup {
    Hit(Arc<Value>),
    Absent,
    /// Cached but no longer servable (invalidated or expired).
    Stale,
}

/// Stored by value: a hit copies it out of the cache (one reference-count increment, for the
/// value it returns) instead of following a pointer to it.
#[derive(Clone)]
struct Entry {
    value: Arc<Value>,
    version: Option<i64>,
    stamps: Stamps,
    /// Index of its region's link flag, resolved when filled (`None`: the region has no
    /// flag of its own).
    link: Option<usize>,
    /// On the L1's clock: the earlier of the L1 TTL and the record's TTL in Redis, both
    /// counted from the load's start, so the copy never outlives the record.
    expires_at_ms: u64,
    /// On the L1's clock; only with a time-to-idle.
    read_at_ms: Option<Arc<AtomicU64>>,
}

/// A finished load, shared by the callers that waited for it.
#[derive(Clone)]
struct Filled {
    value: Arc<Value>,
    /// The epochs the load began from (dependencies and guards).
    started: Arc<[Stamp]>,
    /// What it put in the cache, if it was cacheable.
    entry: Option<Entry>,
}

type LoadOutcome = Arc<Result<Filled, EdgeError>>;

/// Per followed region, whether the stream link that reads it is up.
struct RegionLinks {
    index: HashMap<String, usize>,
    up: Box<[AtomicBool]>,
}

pub struct L1 {
    entries: quick_cache::sync::Cache<Query, Entry>,
    loads: Flights<Query, LoadOutcome>,
    /// Newest version seen per GPU key (from events and fills), with the region's epoch when
    /// it was seen.
    versions: moka::sync::Cache<String, (Stamp, i64)>,
    epochs: Epochs,
    clock: Clock,
    time_to_live_ms: u64,
    time_to_idle_ms: Option<u64>,
    pub(crate) counters: Counters,
    serve_while_disconnected: bool,
    hook: Option<InvalidationHook>,
    /// Set once by the edge; without it, `set_link` decides for every region.
    region_links: OnceLock<RegionLinks>,
}

impl L1 {
    pub fn new(config: &L1Config, hook: Option<InvalidationHook>) -> L1 {
        let capacity = usize::try_from(config.max_entries).unwrap_or(usize::MAX);
        let entries = quick_cache::OptionsBuilder::new()
            .estimated_items_capacity(capacity)
            .weight_capacity(config.max_entries)
            .hot_allocation(config.eviction.main_share())
            .build()
            .map(|options| {
                quick_cache::sync::Cache::with_options(
                    options,
                    Default::default(),
                    Default::default(),
                    Default::default(),
                )
            })
            .unwrap_or_else(|_| quick_cache::sync::Cache::new(capacity));
        L1 {
            entries,
            loads: Flights::default(),
            // LRU: every version recorded is admitted (TinyLFU may turn new keys away).
            versions: moka::sync::Cache::builder()
                .max_capacity(config.max_entries.saturating_mul(4))
                .eviction_policy(EvictionPolicy::lru())
                .build(),
            epochs: Epochs::default(),
            clock: Clock::new(),
            time_to_live_ms: millis(config.time_to_live),
            time_to_idle_ms: config.time_to_idle.map(millis),
            counters: Counters::default(),
            serve_while_disconnected: config.serve_while_disconnected,
            hook,
            region_links: OnceLock::new(),
        }
    }

    /// Whether the stream link that follows `region` is up.
    fn link_up(&self, region: &str) -> bool {
        let links = self.region_links.get();
        match links.and_then(|l| l.index.get(region).and_then(|&i| l.up.get(i))) {
            Some(up) => up.load(Ordering::Acquire),
            None => self.counters.stream_up.load(Ordering::Acquire),
        }
    }

    fn link_index(&self, region: &str) -> Option<usize> {
        self.region_links.get()?.index.get(region).copied()
    }

    fn serving(&self, region: &str) -> bool {
        self.serve_while_disconnected || self.link_up(region)
    }

    /// `serving` for a cached entry, without looking its region up by name.
    fn serving_entry(&self, entry: &Entry, query: &Query) -> bool {
        if self.serve_while_disconnected {
            return true;
        }
        let links = self.region_links.get();
        match (entry.link, links) {
            (Some(i), Some(links)) => links.up.get(i).is_some_and(|up| up.load(Ordering::Acquire)),
            _ => self.link_up(query.region()),
        }
    }

    fn valid(&self, entry: &Entry) -> bool {
        self.epochs.all_unchanged(entry.stamps.as_slice())
    }

    /// Neither expired nor invalidated; a hit (`touch`) also counts as a read for the
    /// time-to-idle.
    fn fresh(&self, entry: &Entry, touch: bool) -> bool {
        let now = self.clock.now_ms();
        // The latest real time it may be: an entry leaves up to one clock lag early.
        let latest = now.saturating_add(self.clock.lag_ms());
        if latest > entry.expires_at_ms {
            return false;
        }
        if let (Some(idle), Some(read_at)) = (self.time_to_idle_ms, &entry.read_at_ms) {
            let last = read_at.load(Ordering::Relaxed);
            if latest > last.saturating_add(idle) {
                return false;
            }
            // One store per entry and millisecond at most: readers of a hot entry do not
            // take its cache line from each other on every hit.
            if touch && last < now {
                read_at.store(now, Ordering::Relaxed);
            }
        }
        self.valid(entry)
    }

    /// The cached value, if it is still valid (counts a hit or a miss).
    pub fn get(&self, query: &Query) -> Option<Arc<Value>> {
        match self.lookup(query) {
            Lookup::Hit(value) => Some(value),
            Lookup::Absent | Lookup::Stale => None,
        }
    }

    fn lookup(&self, query: &Query) -> Lookup {
        let found = match self.entries.get(query) {
            Some(entry) if self.serving_entry(&entry, query) => {
                if self.fresh(&entry, true) {
                    self.counters.hits.incr();
                    return Lookup::Hit(entry.value);
                }
                Lookup::Stale
            }
            _ => Lookup::Absent,
        };
        self.counters.misses.incr();
        found
    }

    /// Removes the entry of `query` if it is (still) stale: a concurrent reader may already
    /// have replaced it with a fresh one, which must stay.
    fn remove_if_stale(&self, query: &Query) {
        // The common case (nothing cached, or a fresh copy) without the shard's write lock.
        if self
            .entries
            .peek(query)
            .is_none_or(|e| self.fresh(&e, false))
        {
            return;
        }
        self.entries.remove_if(query, |e| !self.fresh(e, false));
    }

    /// The cached value or, on a miss, the loader's. Concurrent misses of one query share one
    /// loader call (single flight), its value or its error. The result is cached only if
    /// nothing invalidated it while it loaded and it is not older than a version already seen.
    pub fn get_or_load<F>(&self, query: &Query, loader: F) -> Result<Arc<Value>, EdgeError>
    where
        F: FnOnce(&Query) -> Result<Value, EdgeError>,
    {
        if !self.serving(query.region()) {
            self.counters.misses.incr();
            return self.load_uncached(query, loader);
        }
        // Taken before the lookup: a shared load is good for this caller only if nothing was
        // invalidated between that load's start and this call's.
        let mine = self.start_stamps(query);
        match self.lookup(query) {
            Lookup::Hit(value) => return Ok(value),
            Lookup::Stale => self.remove_if_stale(query),
            Lookup::Absent => {}
        }
        let mut loader = Some(loader);
        let shared = match self.loads.join(query, || {
            Arc::new(match loader.take() {
                Some(load) => self.fill(query, &mine, load),
                None => Err(EdgeError::Reply("loader reused".into())),
            })
        }) {
            // Began from `mine`: good for this caller whatever happened since.
            Joined::Led(outcome) => {
                return outcome
                    .as_ref()
                    .as_ref()
                    .map(|f| f.value.clone())
                    .map_err(Clone::clone)
            }
            Joined::Shared(outcome) => outcome,
            // Its loader panicked; this caller's own may not.
            Joined::Abandoned => {
                return match loader.take() {
                    Some(load) => self.load_uncached(query, load),
                    None => Err(EdgeError::Reply("load abandoned".into())),
                }
            }
        };
        let filled = match &*shared {
            Ok(filled) => filled,
            Err(e) => return Err(e.clone()),
        };
        let still_valid = filled.entry.as_ref().is_some_and(|e| self.valid(e));
        // Read after this call began, or before it with nothing invalidated in between.
        if still_valid || *filled.started == *mine {
            return Ok(filled.value.clone());
        }
        if filled.entry.is_some() {
            self.remove_if_stale(query);
        }
        // Another caller's load began before an invalidation this call must see.
        match loader.take() {
            Some(load) => self.load_uncached(query, load),
            None => Ok(filled.value.clone()),
        }
    }

    fn load_uncached<F>(&self, query: &Query, loader: F) -> Result<Arc<Value>, EdgeError>
    where
        F: FnOnce(&Query) -> Result<Value, EdgeError>,
    {
        add(&self.counters.loads, 1);
        loader(query).map(Arc::new).inspect_err(|_| {
            add(&self.counters.load_errors, 1);
        })
    }

    /// The epochs a load of `query` starts from: the tags it depends on, then its guards.
    fn start_stamps(&self, query: &Query) -> Vec<Stamp> {
        query
            .tags_before_load()
            .into_iter()
            .chain(query.load_guards())
            .map(|t| self.epochs.stamp(t))
            .collect()
    }

    /// Loads `query` and caches the value unless the link is down, an invalidation arrived
    /// since `started`, or a newer version was already seen.
    fn fill<F>(&self, query: &Query, started: &[Stamp], loader: F) -> Result<Filled, EdgeError>
    where
        F: FnOnce(&Query) -> Result<Value, EdgeError>,
    {
        let cacheable = self.link_up(query.region());
        // Deadlines count from before the load: the record's `ttl_ms` is read after this.
        let began_ms = self.clock.now_ms();
        add(&self.counters.loads, 1);
        let value = loader(query).inspect_err(|_| {
            add(&self.counters.load_errors, 1);
        })?;
        let value = Arc::new(value);
        // The tags the value names are stamped before the check below: a change to them
        // after this point leaves the entry invalid; one before it is caught by the guards.
        let named: Vec<Stamp> = query
            .tags_of_value(&value)
            .into_iter()
            .map(|t| self.epochs.stamp(t))
            .collect();
        let version = query.version_of(&value);
        let too_old = match (version, query.versioned_key()) {
            (Some(version), Some(key)) => !self.note_version(&key, version),
            _ => false,
        };
        let overtaken = !self.epochs.all_unchanged(started);
        let guards = query.load_guards().len();
        let depends = started.len().saturating_sub(guards);
        let stamps = Stamps::collect(started.iter().take(depends).copied().chain(named));
        let started: Arc<[Stamp]> = started.into();
        // A value naming more tags than an entry holds (none does today) is not cached either.
        let Some(stamps) = stamps.filter(|_| cacheable && !too_old && !overtaken) else {
            add(&self.counters.fills_refused, 1);
            return Ok(Filled {
                value,
                started,
                entry: None,
            });
        };
        let lifetime_ms = query
            .remaining_ttl(&value)
            .map_or(self.time_to_live_ms, |ttl| {
                millis(ttl).min(self.time_to_live_ms)
            });
        let entry = Entry {
            value: value.clone(),
            version,
            stamps,
            link: self.link_index(query.region()),
            expires_at_ms: began_ms.saturating_add(lifetime_ms),
            read_at_ms: self
                .time_to_idle_ms
                .map(|_| Arc::new(AtomicU64::new(began_ms))),
        };
        self.entries.insert(query.clone(), entry.clone());
        Ok(Filled {
            value,
            started,
            entry: Some(entry),
        })
    }

    /// Records `version` for a GPU key; false when a newer one was already seen. Versions
    /// seen before the region was last dropped do not count: a server that lost writes
    /// reissues them.
    pub(crate) fn note_version(&self, key: &str, version: i64) -> bool {
        let Some(parts) = keyspace::parse_key(key) else {
            return true;
        };
        let generation = self.epochs.stamp(Tag::region(parts.region));
        let newest = self.versions.entry_by_ref(key).and_upsert_with(|old| {
            match old.map(|e| e.into_value()) {
                Some((seen_in, seen)) if seen_in == generation => (generation, seen.max(version)),
                _ => (generation, version),
            }
        });
        newest.value().1 <= version
    }

    /// Drops what a change of `key` makes stale.
    pub fn invalidate_key(&self, key: &str, source: Source) {
        add(&self.counters.invalidations, 1);
        for tag in keyspace::tags_for_key(key) {
            self.epochs.bump(tag);
        }
        if let Some(parts) = keyspace::parse_key(key) {
            if parts.entity == "gpu" {
                // Frees the memory now; a copy loaded after the bump stays.
                self.remove_if_stale(&Query::gpu(parts.region, parts.id));
            }
        }
        self.call_hook(key, source);
    }

    /// Applies a stream event's GPU version, then invalidates its keys — except the GPU's own
    /// key when the cached record is already at least that new (it was loaded after the
    /// change, e.g. right after the notification dropped it).
    pub(crate) fn apply_event(&self, gpu_key: Option<(&str, i64)>, keys: &[String]) {
        if let Some((key, version)) = gpu_key {
            self.note_version(key, version);
        }
        for key in keys {
            if let Some((gpu_key, version)) = gpu_key {
                if key == gpu_key && self.cached_version_at_least(key, version) {
                    continue;
                }
            }
            self.invalidate_key(key, Source::Stream);
        }
    }

    fn cached_version_at_least(&self, gpu_key: &str, version: i64) -> bool {
        let Some(parts) = keyspace::parse_key(gpu_key) else {
            return false;
        };
        self.entries
            .peek(&Query::gpu(parts.region, parts.id))
            .is_some_and(|e| self.fresh(&e, false) && e.version.is_some_and(|v| v >= version))
    }

    /// Drops everything cached for `region`.
    pub fn drop_region(&self, region: &str) {
        self.epochs.bump(Tag::region(region));
        add(&self.counters.region_drops, 1);
        self.call_hook(&format!("gpucache:{{{region}}}:*"), Source::RegionDrop);
    }

    /// A panicking hook must not take the listener down with it (its link would stay marked
    /// up with nobody applying events).
    fn call_hook(&self, key: &str, source: Source) {
        if let Some(hook) = &self.hook {
            let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| hook(key, source)));
        }
    }

    pub fn stats(&self) -> Stats {
        let stream_up = match self.region_links.get() {
            Some(links) if !links.up.is_empty() => {
                links.up.iter().all(|up| up.load(Ordering::Acquire))
            }
            _ => self.counters.stream_up.load(Ordering::Acquire),
        };
        let entries = u64::try_from(self.entries.len()).unwrap_or(u64::MAX);
        self.counters.snapshot(entries, stream_up)
    }

    /// Marks the invalidation link of every region up or down (tests and benchmarks of the
    /// cache alone set it by hand).
    pub fn set_link(&self, stream_up: bool) {
        self.counters.stream_up.store(stream_up, Ordering::Release);
        for up in self
            .region_links
            .get()
            .into_iter()
            .flat_map(|l| l.up.iter())
        {
            up.store(stream_up, Ordering::Release);
        }
    }

    /// Gives each of `regions` a link state of its own, down until its link marks it up
    /// (once; later calls change nothing).
    pub(crate) fn follow_regions(&self, regions: &[String]) {
        let mut index = HashMap::new();
        for region in regions {
            let next = index.len();
            index.entry(region.clone()).or_insert(next);
        }
        let up = (0..index.len()).map(|_| AtomicBool::new(false)).collect();
        let _ = self.region_links.set(RegionLinks { index, up });
    }

    /// Marks the stream link of `region` up or down (the listener's job).
    pub(crate) fn set_region_link(&self, region: &str, up: bool) {
        let links = self.region_links.get();
        if let Some(flag) = links.and_then(|l| l.index.get(region).and_then(|&i| l.up.get(i))) {
            flag.store(up, Ordering::Release);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use std::sync::atomic::AtomicUsize;

    fn l1() -> L1 {
        let l1 = L1::new(&L1Config::default(), None);
        l1.set_link(true);
        l1
    }

    fn gpu(version: i64) -> Value {
        json!({"gpu_id": "g1", "type": "A100", "provider": "p1", "version": version})
    }

    #[test]
    fn caches_and_invalidates_by_key() {
        let l1 = l1();
        let q = Query::gpu("eu", "g1");
        let v = l1.get_or_load(&q, |_| Ok(gpu(1))).unwrap();
        assert_eq!(v["version"], 1);
        assert!(l1.get(&q).is_some());
        l1.invalidate_key("gpucache:{eu}:gpu:g1", Source::Notification);
        assert!(l1.get(&q).is_none());
        let v = l1.get_or_load(&q, |_| Ok(gpu(2))).unwrap();
        assert_eq!(v["version"], 2);
    }

    #[test]
    fn a_type_price_change_drops_gpus_of_that_type_only() {
        let l1 = l1();
        let a100 = Query::gpu("eu", "g1");
        let h100 = Query::gpu("eu", "g2");
        l1.get_or_load(&a100, |_| Ok(gpu(1))).unwrap();
        l1.get_or_load(&h100, |_| {
            Ok(json!({"type": "H100", "provider": "p1", "version": 1}))
        })
        .unwrap();
        l1.invalidate_key("gpucache:{eu}:price:A100", Source::Notification);
        assert!(l1.get(&a100).is_none());
        assert!(l1.get(&h100).is_some());
        l1.invalidate_key("gpucache:{eu}:provider:p1", Source::Notification);
        assert!(l1.get(&h100).is_none());
    }

    #[test]
    fn market_changes_drop_searches_and_stats_not_records() {
        let l1 = l1();
        let search = Query::available("eu", &["LIMIT", "10"]);
        let stats = Query::stats("eu");
        let record = Query::gpu("eu", "g1");
        l1.get_or_load(&search, |_| Ok(json!([]))).unwrap();
        l1.get_or_load(&stats, |_| Ok(json!({}))).unwrap();
        l1.get_or_load(&record, |_| Ok(gpu(1))).unwrap();
        l1.invalidate_key("gpucache:{eu}:avail-own:A100", Source::Stream);
        assert!(l1.get(&search).is_none());
        assert!(l1.get(&stats).is_none());
        assert!(l1.get(&record).is_some());
        l1.drop_region("eu");
        assert!(l1.get(&record).is_none());
    }

    #[test]
    fn a_load_overtaken_by_an_invalidation_is_returned_but_not_cached() {
        let l1 = l1();
        let q = Query::gpu("eu", "g1");
        let v = l1
            .get_or_load(&q, |_| {
                // The write lands while the (slow) read is in flight.
                l1.invalidate_key("gpucache:{eu}:gpu:g1", Source::Notification);
                Ok(gpu(1))
            })
            .unwrap();
        assert_eq!(v["version"], 1);
        assert!(l1.get(&q).is_none());
        assert_eq!(l1.stats().fills_refused, 1);
    }

    #[test]
    fn a_fill_older_than_a_seen_version_is_refused() {
        let l1 = l1();
        let q = Query::gpu("eu", "g1");
        l1.apply_event(Some(("gpucache:{eu}:gpu:g1", 5)), &[]);
        l1.get_or_load(&q, |_| Ok(gpu(4))).unwrap();
        assert!(l1.get(&q).is_none(), "version 4 < 5 must not be cached");
        l1.get_or_load(&q, |_| Ok(gpu(5))).unwrap();
        assert!(l1.get(&q).is_some());
        // A replayed event for a version the cache already holds keeps the entry.
        l1.apply_event(
            Some(("gpucache:{eu}:gpu:g1", 5)),
            &["gpucache:{eu}:gpu:g1".to_string()],
        );
        assert!(l1.get(&q).is_some());
        l1.apply_event(
            Some(("gpucache:{eu}:gpu:g1", 6)),
            &["gpucache:{eu}:gpu:g1".to_string()],
        );
        assert!(l1.get(&q).is_none());
    }

    #[test]
    fn nothing_is_cached_or_served_while_the_link_is_down() {
        let l1 = l1();
        let q = Query::stats("eu");
        l1.get_or_load(&q, |_| Ok(json!({"n": 1}))).unwrap();
        l1.set_link(false);
        assert!(l1.get(&q).is_none());
        let calls = AtomicUsize::new(0);
        let load = |_: &Query| {
            calls.fetch_add(1, Ordering::SeqCst);
            Ok(json!({"n": 2}))
        };
        assert_eq!(l1.get_or_load(&q, load).unwrap()["n"], 2);
        assert_eq!(l1.get_or_load(&q, load).unwrap()["n"], 2);
        assert_eq!(calls.load(Ordering::SeqCst), 2);
    }

    #[test]
    fn a_region_whose_link_is_down_is_bypassed_while_the_others_are_served() {
        let l1 = L1::new(&L1Config::default(), None);
        l1.follow_regions(&["eu".to_string(), "us".to_string()]);
        let (eu, us) = (Query::stats("eu"), Query::stats("us"));
        l1.set_region_link("eu", true);
        l1.set_region_link("us", true);
        l1.get_or_load(&eu, |_| Ok(json!({"n": 1}))).unwrap();
        l1.get_or_load(&us, |_| Ok(json!({"n": 1}))).unwrap();
        assert_eq!(
            l1.stats().connection,
            "degraded",
            "streams up, no notifications"
        );
        // us's server fails over: its link is down until its stream is caught up elsewhere.
        l1.set_region_link("us", false);
        assert_eq!(l1.stats().connection, "disconnected");
        assert!(l1.get(&eu).is_some());
        assert!(l1.get(&us).is_none());
        assert_eq!(
            l1.get_or_load(&us, |_| Ok(json!({"n": 2}))).unwrap()["n"],
            2
        );
        assert!(
            l1.get(&us).is_none(),
            "nothing cached for a region without its link"
        );
        l1.set_region_link("us", true);
        assert_eq!(
            l1.get(&us).unwrap()["n"],
            1,
            "its entries survive a caught-up move"
        );
    }

    #[test]
    fn a_record_leaves_the_l1_when_it_would_expire_in_redis() {
        let l1 = l1();
        let short = Query::gpu("eu", "g1");
        let long = Query::gpu("eu", "g2");
        l1.get_or_load(&short, |_| Ok(json!({"version": 1, "ttl_ms": 30})))
            .unwrap();
        l1.get_or_load(&long, |_| Ok(json!({"version": 1, "ttl_ms": 600_000})))
            .unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while l1.get(&short).is_some() {
            assert!(
                std::time::Instant::now() < deadline,
                "g1 outlived its ttl_ms"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        assert!(l1.get(&long).is_some());
    }

    #[test]
    fn a_record_is_not_served_once_its_redis_ttl_has_run_out() {
        let l1 = l1();
        let q = Query::gpu("eu", "g1");
        let start = std::time::Instant::now();
        l1.get_or_load(&q, |_| Ok(json!({"version": 1, "ttl_ms": 1_000})))
            .unwrap();
        assert!(l1.get(&q).is_some());
        // Counted from before the load: Redis may drop the key any time after this.
        std::thread::sleep(Duration::from_millis(1_000).saturating_sub(start.elapsed()));
        assert!(
            l1.get(&q).is_none(),
            "served past the record's TTL in Redis"
        );
    }

    #[test]
    fn every_entry_leaves_after_the_l1_time_to_live() {
        let config = L1Config {
            time_to_live: Duration::from_millis(50),
            ..Default::default()
        };
        let l1 = L1::new(&config, None);
        l1.set_link(true);
        let q = Query::stats("eu");
        l1.get_or_load(&q, |_| Ok(json!({"n": 1}))).unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while l1.get(&q).is_some() {
            assert!(
                std::time::Instant::now() < deadline,
                "outlived time_to_live"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    #[test]
    fn an_entry_left_unread_for_its_time_to_idle_leaves_while_a_read_one_stays() {
        let config = L1Config {
            time_to_idle: Some(Duration::from_millis(500)),
            ..Default::default()
        };
        let l1 = L1::new(&config, None);
        l1.set_link(true);
        let (idle, busy) = (Query::stats("eu"), Query::stats("us"));
        l1.get_or_load(&idle, |_| Ok(json!({"n": 1}))).unwrap();
        l1.get_or_load(&busy, |_| Ok(json!({"n": 1}))).unwrap();
        let start = std::time::Instant::now();
        let mut idle_gone = false;
        while !idle_gone {
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "outlived time_to_idle"
            );
            assert!(l1.get(&busy).is_some(), "a read entry left");
            // Peeking does not count as a read.
            idle_gone = l1.entries.peek(&idle).is_none_or(|e| !l1.fresh(&e, false));
            std::thread::sleep(Duration::from_millis(20));
        }
        assert!(
            start.elapsed() >= Duration::from_millis(400),
            "left long before its idle time"
        );
        assert!(l1.get(&idle).is_none());
    }

    #[test]
    fn concurrent_misses_share_one_load_and_its_error() {
        let l1 = l1();
        let q = Query::gpu("eu", "g1");
        let calls = AtomicUsize::new(0);
        let readers = 4;
        let results: Vec<_> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..readers)
                .map(|_| {
                    s.spawn(|| {
                        l1.get_or_load(&q, |_| {
                            calls.fetch_add(1, Ordering::SeqCst);
                            let deadline = std::time::Instant::now() + Duration::from_secs(5);
                            while l1.loads.joined(&q) < readers
                                && std::time::Instant::now() < deadline
                            {
                                std::thread::yield_now();
                            }
                            Err(EdgeError::Server("NOGPU no such GPU".into()))
                        })
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().ok()).collect()
        });
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        for result in results {
            assert_eq!(
                result.map(|r| r.unwrap_err()),
                Some(EdgeError::Server("NOGPU no such GPU".into()))
            );
        }
        assert_eq!(l1.stats().load_errors, 1);
    }

    #[test]
    fn load_errors_are_returned_and_not_cached() {
        let l1 = l1();
        let q = Query::gpu("eu", "nope");
        let err = l1
            .get_or_load(&q, |_| Err(EdgeError::Server("NOGPU no such GPU".into())))
            .unwrap_err();
        assert_eq!(err, EdgeError::Server("NOGPU no such GPU".into()));
        assert!(l1.get(&q).is_none());
        assert_eq!(l1.stats().load_errors, 1);
    }
}
