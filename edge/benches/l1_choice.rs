//! Why the L1 is built on quick_cache: hit ratio and hit speed of moka (TinyLFU and LRU),
//! quick_cache and the L1 itself on marketplace-like traces, measured side by side.
//!
//! `cargo bench -p gpucache-edge --bench l1_choice`
//!
//! Traces (keys are `Query::gpu` values, as in the L1): `zipf` — 100,000 GPUs, a few popular
//! (Zipf s = 0.9), the usual browse pattern; `shifting` — a hot set of 5,000 GPUs that moves
//! every 200,000 reads (a new region or type in demand). Cache capacity: 10,000 entries. The
//! last rows are this crate's L1 (quick_cache plus its link, deadline and epoch checks and
//! counters), with each `Eviction` setting.
//!
//! Hit speed: 5,000 cached keys read at random, per candidate on 1 thread then 2, in
//! `ROUNDS` rounds that alternate between candidates (the machine is shared: medians of the
//! rounds are printed), with the ratio of the L1's hit time to bare quick_cache's and the
//! 2-thread / 1-thread speed-up of each.

use gpucache_edge::{Eviction, Query};
use std::sync::Arc;
use std::time::Instant;

const KEYS: usize = 100_000;
const CAPACITY: usize = 10_000;
const READS: usize = 2_000_000;
const HIT_READS: usize = 1_000_000;
const ROUNDS: usize = 5;

trait Candidate: Send + Sync {
    fn name(&self) -> &'static str;
    fn get(&self, key: &Query) -> Option<u64>;
    fn insert(&self, key: Query, value: u64);
    /// One read as an application makes it: true on a hit, else the value is loaded and kept.
    fn read(&self, key: &Query, value: u64) -> bool {
        if self.get(key).is_some() {
            return true;
        }
        self.insert(key.clone(), value);
        false
    }
}

struct Moka(moka::sync::Cache<Query, u64>, &'static str);
impl Candidate for Moka {
    fn name(&self) -> &'static str {
        self.1
    }
    fn get(&self, key: &Query) -> Option<u64> {
        self.0.get(key)
    }
    fn insert(&self, key: Query, value: u64) {
        self.0.insert(key, value)
    }
}

struct Quick(quick_cache::sync::Cache<Query, u64>);
impl Candidate for Quick {
    fn name(&self) -> &'static str {
        "quick_cache (S3-FIFO)"
    }
    fn get(&self, key: &Query) -> Option<u64> {
        self.0.get(key)
    }
    fn insert(&self, key: Query, value: u64) {
        self.0.insert(key, value)
    }
}

/// The L1 itself: quick_cache plus validation and statistics on every read.
struct EdgeL1(gpucache_edge::L1, &'static str);
impl Candidate for EdgeL1 {
    fn name(&self) -> &'static str {
        self.1
    }
    fn get(&self, key: &Query) -> Option<u64> {
        self.0.get(key).and_then(|v| v.as_u64())
    }
    fn insert(&self, key: Query, value: u64) {
        let _ = self
            .0
            .get_or_load(&key, |_| Ok(serde_json::Value::from(value)));
    }
}

fn candidates() -> Vec<Box<dyn Candidate>> {
    let moka = |policy, name| -> Box<dyn Candidate> {
        Box::new(Moka(
            moka::sync::Cache::builder()
                .max_capacity(CAPACITY as u64)
                .eviction_policy(policy)
                .build(),
            name,
        ))
    };
    vec![
        moka(moka::policy::EvictionPolicy::tiny_lfu(), "moka TinyLFU"),
        moka(moka::policy::EvictionPolicy::lru(), "moka LRU"),
        Box::new(Quick(quick_cache::sync::Cache::new(CAPACITY))),
        edge_l1(Eviction::Frequency, "gpucache-edge L1"),
        edge_l1(Eviction::Recency, "L1, Eviction::Recency"),
    ]
}

fn edge_l1(eviction: Eviction, name: &'static str) -> Box<dyn Candidate> {
    let config = gpucache_edge::L1Config {
        max_entries: CAPACITY as u64,
        eviction,
        ..Default::default()
    };
    let l1 = gpucache_edge::L1::new(&config, None);
    l1.set_link(true);
    Box::new(EdgeL1(l1, name))
}

fn zipf_trace(rng: &mut fastrand::Rng) -> Vec<usize> {
    let weights: Vec<f64> = (1..=KEYS)
        .map(|rank| 1.0 / (rank as f64).powf(0.9))
        .collect();
    let total: f64 = weights.iter().sum();
    let mut cdf = Vec::with_capacity(KEYS);
    let mut acc = 0.0;
    for w in weights {
        acc += w / total;
        cdf.push(acc);
    }
    // Ranks are scattered over the key space so popularity is not key order.
    let mut ids: Vec<usize> = (0..KEYS).collect();
    rng.shuffle(&mut ids);
    (0..READS)
        .map(|_| {
            let rank = cdf.partition_point(|&c| c < rng.f64()).min(KEYS - 1);
            ids[rank]
        })
        .collect()
}

fn shifting_trace(rng: &mut fastrand::Rng) -> Vec<usize> {
    (0..READS)
        .map(|i| {
            let base = (i / 200_000) * 7_919 % KEYS;
            if rng.u8(..10) < 9 {
                (base + rng.usize(..5_000)) % KEYS
            } else {
                rng.usize(..KEYS)
            }
        })
        .collect()
}

fn hit_ratio(cache: &dyn Candidate, keys: &[Query], trace: &[usize]) -> f64 {
    let mut hits = 0usize;
    for &i in trace {
        hits += usize::from(cache.read(&keys[i], i as u64));
    }
    hits as f64 / trace.len() as f64
}

/// Million hits/s over `threads` threads reading the first `CAPACITY / 2` keys (cached
/// beforehand) at random.
fn hit_rate(cache: &Arc<dyn Candidate>, keys: &Arc<Vec<Query>>, threads: usize) -> f64 {
    let hot = CAPACITY / 2;
    let start = Instant::now();
    let workers: Vec<_> = (0..threads)
        .map(|t| {
            let (cache, keys) = (cache.clone(), keys.clone());
            std::thread::spawn(move || {
                let mut rng = fastrand::Rng::with_seed(t as u64 + 7);
                let mut found = 0u64;
                for _ in 0..HIT_READS {
                    found += u64::from(cache.get(&keys[rng.usize(..hot)]).is_some());
                }
                found
            })
        })
        .collect();
    let found: u64 = workers.into_iter().map(|w| w.join().unwrap()).sum();
    let elapsed = start.elapsed().as_secs_f64();
    let total = (HIT_READS * threads) as u64;
    assert_eq!(found, total, "{} missed a cached key", cache.name());
    total as f64 / elapsed / 1e6
}

fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(f64::total_cmp);
    xs[xs.len() / 2]
}

/// ns per read of each clock the L1 could use for deadlines.
fn clock_costs() -> (f64, f64) {
    const N: u32 = 2_000_000;
    let start = Instant::now();
    for _ in 0..N {
        std::hint::black_box(Instant::now());
    }
    let precise = start.elapsed().as_nanos() as f64 / f64::from(N);
    let start = Instant::now();
    for _ in 0..N {
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: `ts` is a valid, writable timespec.
        unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC_COARSE, &mut ts) };
        std::hint::black_box(ts.tv_nsec);
    }
    let coarse = start.elapsed().as_nanos() as f64 / f64::from(N);
    (precise, coarse)
}

fn main() {
    // `cargo bench` passes --bench; `cargo test --all-targets` runs benches as tests with no
    // argument: keep that quick.
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }
    let keys: Arc<Vec<Query>> = Arc::new(
        (0..KEYS)
            .map(|i| Query::gpu("eu-west", &format!("gpu-{i}")))
            .collect(),
    );
    let mut rng = fastrand::Rng::with_seed(42);
    let zipf = zipf_trace(&mut rng);
    let shifting = shifting_trace(&mut rng);
    let caches: Vec<Arc<dyn Candidate>> = candidates().into_iter().map(Arc::from).collect();
    for cache in &caches {
        for k in keys.iter().take(CAPACITY / 2) {
            cache.insert(k.clone(), 1);
        }
    }
    let mut one = vec![Vec::new(); caches.len()];
    let mut two = vec![Vec::new(); caches.len()];
    for _ in 0..ROUNDS {
        for (i, cache) in caches.iter().enumerate() {
            one[i].push(hit_rate(cache, &keys, 1));
            two[i].push(hit_rate(cache, &keys, 2));
        }
    }
    let quick = caches
        .iter()
        .position(|c| c.name().starts_with("quick_cache"))
        .map(|i| 1e3 / median(one[i].clone()))
        .unwrap_or(f64::NAN);
    println!(
        "{:<24} {:>10} {:>10} {:>10} {:>9} {:>12} {:>12} {:>7}",
        "cache",
        "zipf hit%",
        "shift hit%",
        "ns/hit 1t",
        "vs quick",
        "M hits/s 1t",
        "M hits/s 2t",
        "2t/1t"
    );
    for (i, cache) in caches.iter().enumerate() {
        let fresh = || -> Box<dyn Candidate> { candidates().swap_remove(i) };
        let zipf_ratio = hit_ratio(fresh().as_ref(), &keys, &zipf);
        let shift_ratio = hit_ratio(fresh().as_ref(), &keys, &shifting);
        let (one, two) = (median(one[i].clone()), median(two[i].clone()));
        let ns = 1e3 / one;
        println!(
            "{:<24} {:>9.1}% {:>9.1}% {ns:>10.0} {:>8.2}x {one:>12.2} {two:>12.2} {:>6.2}x",
            cache.name(),
            zipf_ratio * 100.0,
            shift_ratio * 100.0,
            ns / quick,
            two / one
        );
    }
    let (precise, coarse) = clock_costs();
    println!(
        "(medians of {ROUNDS} alternating rounds of {HIT_READS} hits per thread; a clock read: \
         Instant::now {precise:.0} ns, CLOCK_MONOTONIC_COARSE {coarse:.0} ns)"
    );
}
