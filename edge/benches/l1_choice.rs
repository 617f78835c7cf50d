//! Why the L1 is built on moka: hit ratio and hit latency of moka (TinyLFU and LRU) and
//! quick_cache on marketplace-like traces, measured side by side.
//!
//! `cargo bench -p gpucache-edge --bench l1_choice`
//!
//! Traces (keys are `Query::gpu` values, as in the L1): `zipf` — 100,000 GPUs, a few popular
//! (Zipf s = 0.9), the usual browse pattern; `shifting` — a hot set of 5,000 GPUs that moves
//! every 200,000 reads (a new region or type in demand). Cache capacity: 10,000 entries. The
//! last row is this crate's L1 (moka TinyLFU plus its epoch checks and counters).

use gpucache_edge::Query;
use std::sync::Arc;
use std::time::Instant;

const KEYS: usize = 100_000;
const CAPACITY: usize = 10_000;
const READS: usize = 2_000_000;

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

/// The L1 itself: moka TinyLFU plus epoch validation and statistics on every read.
struct EdgeL1(gpucache_edge::L1);
impl Candidate for EdgeL1 {
    fn name(&self) -> &'static str {
        "gpucache-edge L1"
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
        {
            let config = gpucache_edge::L1Config {
                max_entries: CAPACITY as u64,
                ..Default::default()
            };
            let l1 = gpucache_edge::L1::new(&config, None);
            l1.set_link(true);
            Box::new(EdgeL1(l1))
        },
    ]
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

/// ns per hit on one thread, and million hits/s on `threads`.
fn hit_speed(cache: Arc<dyn Candidate>, keys: Arc<Vec<Query>>, threads: usize) -> (f64, f64) {
    for k in keys.iter().take(CAPACITY / 2) {
        cache.insert(k.clone(), 1);
    }
    let hot = CAPACITY / 2;
    let start = Instant::now();
    let workers: Vec<_> = (0..threads)
        .map(|t| {
            let (cache, keys) = (cache.clone(), keys.clone());
            std::thread::spawn(move || {
                let mut rng = fastrand::Rng::with_seed(t as u64 + 7);
                let mut found = 0u64;
                for _ in 0..READS {
                    found += cache.get(&keys[rng.usize(..hot)]).unwrap_or(0);
                }
                found
            })
        })
        .collect();
    let found: u64 = workers.into_iter().map(|w| w.join().unwrap()).sum();
    let elapsed = start.elapsed().as_secs_f64();
    assert!(found > 0);
    let total = (READS * threads) as f64;
    (
        elapsed * 1e9 * threads as f64 / total,
        total / elapsed / 1e6,
    )
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
    println!(
        "{:<24} {:>10} {:>10} {:>10} {:>14} {:>14}",
        "cache", "zipf hit%", "shift hit%", "ns/hit 1t", "M hits/s 1t", "M hits/s 2t"
    );
    for i in 0..candidates().len() {
        let fresh = || -> Box<dyn Candidate> { candidates().swap_remove(i) };
        let name = fresh().name();
        let zipf_ratio = hit_ratio(fresh().as_ref(), &keys, &zipf);
        let shift_ratio = hit_ratio(fresh().as_ref(), &keys, &shifting);
        let (ns, one) = hit_speed(Arc::from(fresh()), keys.clone(), 1);
        let (_, two) = hit_speed(Arc::from(fresh()), keys.clone(), 2);
        println!(
            "{name:<24} {:>9.1}% {:>9.1}% {ns:>10.0} {one:>14.2} {two:>14.2}",
            zipf_ratio * 100.0,
            shift_ratio * 100.0
        );
    }
}
