//! Model-based test: random sequences of every command, valid and invalid, interleaved with real
//! evictions, run against the module and against an in-memory reference marketplace. After each
//! step the replies agree and `GPUCACHE.CHECK` finds every invariant intact.
//!
//! An eviction lowers `maxmemory` just below the memory in use under a `volatile-*` policy, so
//! Redis itself evicts cached records (idle GPU records, type prices). Once healing has run, the
//! model forgets what was evicted; no booking, and no GPU holding one, may ever be evicted.
//!
//! Cases: `PROPTEST_CASES` (default 48); each case is up to 60 steps.

mod common;

use common::*;
use proptest::prelude::*;
use redis::{Connection, Value};
use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

const GPUS: [&str; 6] = ["g0", "g1", "g2", "g3", "g4", "g5"];
const PROVIDERS: [&str; 3] = ["p0", "p1", "p2"];
const TYPES: [&str; 2] = ["A100", "H100"];
const BOOKINGS: [&str; 5] = ["b0", "b1", "b2", "b3", "b4"];
const USERS: [&str; 2] = ["u0", "u1"];
const GPU_STATUSES: [&str; 4] = ["available", "busy", "offline", "maintenance"];
const PROVIDER_STATUSES: [&str; 3] = ["online", "offline", "maintenance"];
/// Prices in micro-units, all exactly representable as decimals.
const PRICES: [i64; 5] = [500_000, 1_000_000, 1_250_000, 2_000_000, 3_999_999];
/// Policies that may evict only keys with a TTL.
const POLICIES: [&str; 4] = [
    "volatile-lru",
    "volatile-random",
    "volatile-lfu",
    "volatile-ttl",
];

#[derive(Debug, Clone)]
enum Op {
    Register {
        gpu: usize,
        provider: usize,
        gpu_type: usize,
        price: usize,
        memory: Option<i64>,
    },
    Status {
        gpu: usize,
        status: usize,
    },
    Price {
        gpu_type: usize,
        price: usize,
    },
    Book {
        gpu: usize,
        booking: usize,
        user: usize,
        hours: i64,
    },
    Cancel {
        booking: usize,
    },
    Provider {
        provider: usize,
        status: usize,
    },
    Get {
        gpu: usize,
    },
    Available {
        gpu_type: Option<usize>,
        max_price: Option<usize>,
        limit: i64,
    },
    /// Malformed input of many kinds: must be refused and change nothing.
    Invalid {
        which: usize,
    },
    /// Redis evicts under `POLICIES[policy]`, with `maxmemory` set `below` bytes under the
    /// memory in use.
    Evict {
        policy: usize,
        below: i64,
    },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => (0..6usize, 0..3usize, 0..2usize, 0..5usize, prop::option::of(1..200i64)).prop_map(
            |(gpu, provider, gpu_type, price, memory)| Op::Register { gpu, provider, gpu_type, price, memory }
        ),
        2 => (0..6usize, 0..4usize).prop_map(|(gpu, status)| Op::Status { gpu, status }),
        1 => (0..2usize, 0..5usize).prop_map(|(gpu_type, price)| Op::Price { gpu_type, price }),
        3 => (0..6usize, 0..5usize, 0..2usize, 1..3i64)
            .prop_map(|(gpu, booking, user, hours)| Op::Book { gpu, booking, user, hours }),
        2 => (0..5usize).prop_map(|booking| Op::Cancel { booking }),
        1 => (0..3usize, 0..3usize).prop_map(|(provider, status)| Op::Provider { provider, status }),
        2 => (0..6usize).prop_map(|gpu| Op::Get { gpu }),
        2 => (prop::option::of(0..2usize), prop::option::of(0..5usize), 1..8i64)
            .prop_map(|(gpu_type, max_price, limit)| Op::Available { gpu_type, max_price, limit }),
        1 => (0..INVALID.len()).prop_map(|which| Op::Invalid { which }),
        // About 3 evictions in a case of 30 steps.
        2 => (0..POLICIES.len(), 200..4096i64).prop_map(|(policy, below)| Op::Evict { policy, below }),
    ]
}

const INVALID: [&[&str]; 10] = [
    &[
        "GPUCACHE.REGISTER",
        "m",
        "g0",
        "PROVIDER",
        "p0",
        "TYPE",
        "A100",
        "PRICE",
        "NaN",
    ],
    &[
        "GPUCACHE.REGISTER",
        "m",
        "g0",
        "PROVIDER",
        "p0",
        "TYPE",
        "A100",
        "PRICE",
        "-1",
    ],
    &[
        "GPUCACHE.REGISTER",
        "m",
        "g0",
        "PROVIDER",
        "p0",
        "TYPE",
        "A100",
    ],
    &["GPUCACHE.BOOK", "m", "g0", "b0", "u0", "-5"],
    &["GPUCACHE.BOOK", "m", "g0", "", "u0", "5"],
    &["GPUCACHE.STATUS", "m", "g0", "asleep"],
    &["GPUCACHE.PRICE", "m", "A100", "inf"],
    &["GPUCACHE.PROVIDER", "m", "p0", "busy"],
    &["GPUCACHE.AVAILABLE", "m", "LIMIT", "0"],
    &["GPUCACHE.CANCEL", "m"],
];

#[derive(Debug, Clone)]
struct Gpu {
    provider: usize,
    gpu_type: usize,
    own_price: i64,
    price_seq: i64,
    status: usize,
    booking: Option<usize>,
    version: i64,
}

#[derive(Debug, Clone)]
struct Booking {
    gpu: usize,
    user: usize,
    hours: i64,
}

/// The marketplace as the README specifies it.
#[derive(Debug, Default)]
struct Model {
    gpus: BTreeMap<usize, Gpu>,
    provider_status: BTreeMap<usize, usize>,
    type_prices: BTreeMap<usize, (i64, i64)>,
    bookings: BTreeMap<usize, Booking>,
    seq: i64,
}

const AVAILABLE: usize = 0;
const BUSY: usize = 1;
const ONLINE: usize = 0;

fn price_text(micros: i64) -> String {
    let (whole, fraction) = (micros / 1_000_000, micros % 1_000_000);
    if fraction == 0 {
        whole.to_string()
    } else {
        format!("{whole}.{}", format!("{fraction:06}").trim_end_matches('0'))
    }
}

impl Model {
    fn provider(&self, p: usize) -> usize {
        self.provider_status.get(&p).copied().unwrap_or(ONLINE)
    }

    fn listed(&self, gpu: &Gpu) -> bool {
        gpu.status == AVAILABLE && self.provider(gpu.provider) == ONLINE
    }

    fn multiplier(&self, gpu_type: usize) -> i64 {
        let of_type: Vec<&Gpu> = self
            .gpus
            .values()
            .filter(|g| g.gpu_type == gpu_type)
            .collect();
        let total = of_type.len() as i64;
        let listed = of_type.iter().filter(|g| self.listed(g)).count() as i64;
        if total == 0 {
            return 100;
        }
        for (below, m) in [(10, 200), (30, 150), (50, 120)] {
            if listed * 100 < total * below {
                return m;
            }
        }
        100
    }

    fn shown_price(&self, gpu: &Gpu) -> i64 {
        let base = match self.type_prices.get(&gpu.gpu_type) {
            Some((price, seq)) if *seq > gpu.price_seq => *price,
            _ => gpu.own_price,
        };
        (base * self.multiplier(gpu.gpu_type) + 50) / 100
    }

    /// Applies one operation; returns the expected outcome: `Ok(detail)` or `Err(error code)`.
    fn apply(&mut self, op: &Op) -> Result<Expected, &'static str> {
        match *op {
            Op::Register {
                gpu,
                provider,
                gpu_type,
                price,
                ..
            } => {
                self.seq += 1;
                let (status, booking) = match self.gpus.get(&gpu) {
                    Some(g) => (g.status, g.booking),
                    None => (AVAILABLE, None),
                };
                // Versions come from the region's sequence, shared with price ordering.
                let version = self.seq;
                self.gpus.insert(
                    gpu,
                    Gpu {
                        provider,
                        gpu_type,
                        own_price: PRICES[price],
                        price_seq: self.seq,
                        status,
                        booking,
                        version,
                    },
                );
                Ok(Expected::Nothing)
            }
            Op::Status { gpu, status } => {
                let g = self.gpus.get_mut(&gpu).ok_or("NOGPU")?;
                if g.booking.is_some() && status != g.status {
                    return Err("BADSTATE");
                }
                // busy is never set by hand, not even on a busy GPU.
                if status == BUSY {
                    return Err("BADSTATE");
                }
                if status != g.status {
                    self.seq += 1;
                    g.status = status;
                    g.version = self.seq;
                }
                Ok(Expected::Nothing)
            }
            Op::Price { gpu_type, price } => {
                self.seq += 1;
                self.type_prices.insert(gpu_type, (PRICES[price], self.seq));
                Ok(Expected::Nothing)
            }
            Op::Book {
                gpu,
                booking,
                user,
                hours,
            } => {
                if let Some(existing) = self.bookings.get(&booking) {
                    return if existing.gpu == gpu
                        && existing.user == user
                        && existing.hours == hours
                    {
                        Ok(Expected::Nothing)
                    } else {
                        Err("BOOKINGEXISTS")
                    };
                }
                let g = self.gpus.get(&gpu).ok_or("NOGPU")?;
                if g.status == BUSY {
                    return Err("GPUBUSY");
                }
                if !self.listed(g) {
                    return Err("GPUUNAVAILABLE");
                }
                let price = self.shown_price(g);
                self.seq += 1;
                let g = self.gpus.get_mut(&gpu).ok_or("NOGPU")?;
                g.status = BUSY;
                g.booking = Some(booking);
                g.version = self.seq;
                self.bookings.insert(booking, Booking { gpu, user, hours });
                Ok(Expected::BookedAt(price_text(price)))
            }
            Op::Cancel { booking } => {
                let b = self.bookings.remove(&booking).ok_or("NOBOOKING")?;
                if let Some(g) = self.gpus.get_mut(&b.gpu) {
                    if g.booking == Some(booking) {
                        self.seq += 1;
                        g.status = AVAILABLE;
                        g.booking = None;
                        g.version = self.seq;
                    }
                }
                Ok(Expected::Nothing)
            }
            Op::Provider { provider, status } => {
                self.seq += 1;
                self.provider_status.insert(provider, status);
                Ok(Expected::Nothing)
            }
            Op::Get { gpu } => {
                let g = self.gpus.get(&gpu).ok_or("NOGPU")?;
                Ok(Expected::Record {
                    status: GPU_STATUSES[g.status].to_string(),
                    price: price_text(self.shown_price(g)),
                    version: g.version.to_string(),
                    booking: g
                        .booking
                        .map_or("(nil)".into(), |b| BOOKINGS[b].to_string()),
                })
            }
            Op::Available {
                gpu_type,
                max_price,
                limit,
            } => {
                let mut rows: Vec<(i64, &str)> = self
                    .gpus
                    .iter()
                    .filter(|(_, g)| self.listed(g))
                    .filter(|(_, g)| gpu_type.is_none_or(|t| g.gpu_type == t))
                    .map(|(id, g)| (self.shown_price(g), GPUS[*id]))
                    .filter(|(price, _)| max_price.is_none_or(|m| *price <= PRICES[m]))
                    .collect();
                rows.sort();
                rows.truncate(limit as usize);
                Ok(Expected::Ids(
                    rows.into_iter().map(|(_, id)| id.to_string()).collect(),
                ))
            }
            Op::Invalid { .. } => Err("ERR"),
            Op::Evict { .. } => Ok(Expected::Nothing),
        }
    }

    /// The keys that must carry a TTL (and that a `volatile-*` policy may evict): the records of
    /// GPUs no booking holds, and the type prices. Nothing else may carry one.
    fn cached_keys(&self) -> BTreeSet<String> {
        let gpus = self
            .gpus
            .iter()
            .filter(|(_, g)| g.booking.is_none())
            .map(|(id, _)| gpu_key(*id));
        let prices = self.type_prices.keys().map(|t| price_key(*t));
        gpus.chain(prices).collect()
    }
}

fn gpu_key(gpu: usize) -> String {
    format!("gpucache:{{m}}:gpu:{}", GPUS[gpu])
}

fn price_key(gpu_type: usize) -> String {
    format!("gpucache:{{m}}:price:{}", TYPES[gpu_type])
}

#[derive(Debug, PartialEq)]
enum Expected {
    Nothing,
    BookedAt(String),
    Record {
        status: String,
        price: String,
        version: String,
        booking: String,
    },
    Ids(Vec<String>),
}

fn command(op: &Op) -> Vec<String> {
    let s = |v: &str| v.to_string();
    match *op {
        Op::Register {
            gpu,
            provider,
            gpu_type,
            price,
            memory,
        } => {
            let mut c = vec![
                s("GPUCACHE.REGISTER"),
                s("m"),
                s(GPUS[gpu]),
                s("PROVIDER"),
                s(PROVIDERS[provider]),
                s("TYPE"),
                s(TYPES[gpu_type]),
                s("PRICE"),
                price_text(PRICES[price]),
            ];
            if let Some(m) = memory {
                c.extend([s("MEMORY"), m.to_string()]);
            }
            c
        }
        Op::Status { gpu, status } => vec![
            s("GPUCACHE.STATUS"),
            s("m"),
            s(GPUS[gpu]),
            s(GPU_STATUSES[status]),
        ],
        Op::Price { gpu_type, price } => vec![
            s("GPUCACHE.PRICE"),
            s("m"),
            s(TYPES[gpu_type]),
            price_text(PRICES[price]),
        ],
        Op::Book {
            gpu,
            booking,
            user,
            hours,
        } => vec![
            s("GPUCACHE.BOOK"),
            s("m"),
            s(GPUS[gpu]),
            s(BOOKINGS[booking]),
            s(USERS[user]),
            (hours * 3600).to_string(),
        ],
        Op::Cancel { booking } => vec![s("GPUCACHE.CANCEL"), s("m"), s(BOOKINGS[booking])],
        Op::Provider { provider, status } => vec![
            s("GPUCACHE.PROVIDER"),
            s("m"),
            s(PROVIDERS[provider]),
            s(PROVIDER_STATUSES[status]),
        ],
        Op::Get { gpu } => vec![s("GPUCACHE.GET"), s("m"), s(GPUS[gpu])],
        Op::Available {
            gpu_type,
            max_price,
            limit,
        } => {
            let mut c = vec![
                s("GPUCACHE.AVAILABLE"),
                s("m"),
                s("LIMIT"),
                limit.to_string(),
            ];
            if let Some(t) = gpu_type {
                c.extend([s("TYPE"), s(TYPES[t])]);
            }
            if let Some(m) = max_price {
                c.extend([s("MAXPRICE"), price_text(PRICES[m])]);
            }
            c
        }
        Op::Invalid { which } => INVALID[which].iter().map(|a| a.to_string()).collect(),
        Op::Evict { .. } => unreachable!("an eviction is not a command"),
    }
}

fn observed(op: &Op, reply: &Value) -> Expected {
    match op {
        Op::Book { .. } => {
            let m = as_map(reply);
            if text(&m["result"]) == "existing" {
                Expected::Nothing
            } else {
                Expected::BookedAt(text(&m["price"]))
            }
        }
        Op::Get { .. } => {
            let m = as_map(reply);
            Expected::Record {
                status: text(&m["status"]),
                price: text(&m["price"]),
                version: text(&m["version"]),
                booking: text(&m["booking_id"]),
            }
        }
        Op::Available { .. } => match reply {
            Value::Array(rows) => {
                Expected::Ids(rows.iter().map(|r| text(&as_map(r)["gpu_id"])).collect())
            }
            other => panic!("AVAILABLE returned {other:?}"),
        },
        _ => Expected::Nothing,
    }
}

/// What the test talks to: the module's server, and a second connection that receives
/// `evicted` keyspace events.
struct Harness {
    con: Connection,
    events: Connection,
    tally: Tally,
}

/// What the evictions did over the whole run (printed at the end).
#[derive(Debug, Default)]
struct Tally {
    evictions: u64,
    with_cached_records: u64,
    evicting: u64,
    gpu_records: u64,
    type_prices: u64,
    max_keys: usize,
    retried: u64,
}

fn run_case(h: &mut Harness, ops: &[Op]) -> Result<(), TestCaseError> {
    let con = &mut h.con;
    redis::cmd("FLUSHALL").query::<()>(con).unwrap();
    let mut model = Model::default();
    for (step, op) in ops.iter().enumerate() {
        if let Op::Evict { policy, below } = *op {
            evict_step(h, &mut model, step, POLICIES[policy], below)?;
            continue;
        }
        let con = &mut h.con;
        let args = command(op);
        let argv: Vec<&str> = args.iter().map(String::as_str).collect();
        let before = matches!(op, Op::Invalid { .. }).then(|| snapshot(con));
        let expected = model.apply(op);
        let actual = run(con, &argv);
        match (&expected, &actual) {
            (Ok(want), Ok(reply)) => {
                prop_assert_eq!(want, &observed(op, reply), "step {} {:?}", step, argv)
            }
            (Err(code), Err(e)) => prop_assert_eq!(
                *code,
                e.code().unwrap_or(""),
                "step {} {:?}: {}",
                step,
                argv,
                e
            ),
            _ => prop_assert!(
                false,
                "step {} {:?}: model {:?}, module {:?}",
                step,
                argv,
                expected,
                actual
            ),
        }
        if let Some(before) = before {
            prop_assert_eq!(before, snapshot(con), "invalid input changed state");
        }
        let report = run(con, &["GPUCACHE.CHECK", "m"]).unwrap();
        let report = as_map(&report);
        prop_assert_eq!(
            text(&report["ok"]),
            "1",
            "step {} {:?}: {:?}",
            step,
            argv,
            report["violations"]
        );
    }
    Ok(())
}

/// One eviction: only cached records carry TTLs; Redis evicts at least one of them (when there
/// is one) and nothing else; healing leaves the region consistent; the model forgets exactly
/// what was evicted; every booking and the GPU it holds are intact; and every read agrees with
/// the model again.
fn evict_step(
    h: &mut Harness,
    model: &mut Model,
    step: usize,
    policy: &str,
    below: i64,
) -> Result<(), TestCaseError> {
    let con = &mut h.con;
    // The premise of volatile-* safety: exactly the cached records carry a TTL.
    let cached = model.cached_keys();
    prop_assert_eq!(
        &keys_with_ttl(con),
        &cached,
        "step {}: keys with a TTL before evicting",
        step
    );

    let evicted = evict(
        con,
        &mut h.events,
        policy,
        below,
        !cached.is_empty(),
        &mut h.tally,
    );
    let evicted = evicted.map_err(|e| TestCaseError::fail(format!("step {step}: {e}")))?;
    prop_assert!(
        cached.is_empty() || !evicted.is_empty(),
        "step {}: {} below used_memory under {} evicted nothing of {:?}",
        step,
        below,
        policy,
        cached
    );
    for key in &evicted {
        prop_assert!(
            cached.contains(key),
            "step {}: {} evicted {}, which is not a cached record",
            step,
            policy,
            key
        );
    }
    wait_healed(con).map_err(|e| TestCaseError::fail(format!("step {step}: {e}")))?;

    // What is gone is exactly what was evicted: healing removes no record.
    let mut gone = BTreeSet::new();
    let gone_gpus: Vec<usize> = (0..GPUS.len())
        .filter(|g| model.gpus.contains_key(g) && !exists(con, &gpu_key(*g)))
        .collect();
    let gone_prices: Vec<usize> = (0..TYPES.len())
        .filter(|t| model.type_prices.contains_key(t) && !exists(con, &price_key(*t)))
        .collect();
    gone.extend(gone_gpus.iter().map(|g| gpu_key(*g)));
    gone.extend(gone_prices.iter().map(|t| price_key(*t)));
    prop_assert_eq!(&gone, &evicted, "step {}: records gone after healing", step);

    for g in &gone_gpus {
        let gpu = model.gpus.remove(g);
        prop_assert!(
            gpu.as_ref().is_some_and(|g| g.booking.is_none()),
            "step {}: a booked GPU was evicted: {:?}",
            step,
            gpu
        );
        h.tally.gpu_records += 1;
    }
    for t in &gone_prices {
        model.type_prices.remove(t);
        h.tally.type_prices += 1;
    }

    // The key assertion: every booking, and the GPU it holds, survived.
    for (b, booking) in &model.bookings {
        prop_assert!(
            model.gpus.contains_key(&booking.gpu),
            "step {}: the model lost the GPU of {}",
            step,
            BOOKINGS[*b]
        );
        prop_assert!(
            exists(con, &format!("gpucache:{{m}}:booking:{}", BOOKINGS[*b])),
            "step {}: booking {} is gone",
            step,
            BOOKINGS[*b]
        );
        let record = run(con, &["GPUCACHE.GET", "m", GPUS[booking.gpu]]);
        let record = record.map_err(|e| {
            TestCaseError::fail(format!(
                "step {step}: GET {} held by {}: {e}",
                GPUS[booking.gpu], BOOKINGS[*b]
            ))
        })?;
        let record = as_map(&record);
        prop_assert_eq!(
            (text(&record["status"]), text(&record["booking_id"])),
            ("busy".to_string(), BOOKINGS[*b].to_string()),
            "step {}: GPU {} after eviction",
            step,
            GPUS[booking.gpu]
        );
        prop_assert_eq!(
            text(&record["booking_user"]),
            USERS[booking.user],
            "step {}: the user of {}",
            step,
            BOOKINGS[*b]
        );
    }

    // Every record and the search agree with the model again.
    let reads = (0..GPUS.len())
        .map(|gpu| Op::Get { gpu })
        .chain([Op::Available {
            gpu_type: None,
            max_price: None,
            limit: 10,
        }]);
    for read in reads {
        let args = command(&read);
        let argv: Vec<&str> = args.iter().map(String::as_str).collect();
        let want = model.apply(&read);
        let actual = run(con, &argv);
        match (&want, &actual) {
            (Ok(want), Ok(reply)) => prop_assert_eq!(
                want,
                &observed(&read, reply),
                "step {} after eviction: {:?}",
                step,
                argv
            ),
            (Err(code), Err(e)) => prop_assert_eq!(*code, e.code().unwrap_or("")),
            _ => prop_assert!(
                false,
                "step {} after eviction {:?}: model {:?}, module {:?}",
                step,
                argv,
                want,
                actual
            ),
        }
    }
    Ok(())
}

/// Every key that carries a TTL.
fn keys_with_ttl(con: &mut Connection) -> BTreeSet<String> {
    let keys: Vec<String> = redis::cmd("KEYS").arg("*").query(con).unwrap();
    keys.into_iter()
        .filter(|k| redis::cmd("PTTL").arg(k).query::<i64>(con).unwrap() >= 0)
        .collect()
}

fn exists(con: &mut Connection, key: &str) -> bool {
    redis::cmd("EXISTS").arg(key).query::<i64>(con).unwrap() == 1
}

/// A numeric field of one `INFO` section (0 when absent).
fn info_number(con: &mut Connection, section: &str, name: &str) -> i64 {
    let info: String = redis::cmd("INFO").arg(section).query(con).unwrap();
    info.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
        .map_or(0, |v| v.trim().parse().unwrap())
}

fn config_set(con: &mut Connection, name: &str, value: &str) {
    redis::cmd("CONFIG")
        .arg("SET")
        .arg(name)
        .arg(value)
        .query::<()>(con)
        .unwrap_or_else(|e| panic!("CONFIG SET {name} {value}: {e}"));
}

/// Makes Redis evict: `maxmemory` goes `below` bytes under `used_memory`, a command lets Redis
/// evict down to it (Redis 7.0 already evicts on the `CONFIG SET`), and `maxmemory` goes back to
/// 0 (no limit) before anything else runs, so no later write is refused with `OOM`. Memory
/// moves a little between reading it and setting the limit (reply buffers), so when `expect`
/// (there is a cached record) and nothing was evicted, the limit goes twice as far below and
/// Redis tries again. Returns the evicted keys, as the `evicted` keyspace events name them.
fn evict(
    con: &mut Connection,
    events: &mut Connection,
    policy: &str,
    below: i64,
    expect: bool,
    tally: &mut Tally,
) -> Result<BTreeSet<String>, String> {
    config_set(con, "maxmemory-policy", policy);
    let mut pubsub = events.as_pubsub();
    pubsub
        .subscribe("__keyevent@0__:evicted")
        .map_err(|e| e.to_string())?;
    pubsub
        .set_read_timeout(Some(Duration::from_secs(5)))
        .map_err(|e| e.to_string())?;
    let before = info_number(con, "stats", "evicted_keys");
    let mut lowered = below;
    let mut attempts = 0;
    let count = loop {
        attempts += 1;
        let used = info_number(con, "memory", "used_memory");
        config_set(con, "maxmemory", &(used - lowered).max(1).to_string());
        redis::cmd("PING").query::<String>(con).unwrap();
        config_set(con, "maxmemory", "0");
        let count = info_number(con, "stats", "evicted_keys") - before;
        if count > 0 || !expect || attempts == 20 {
            break count;
        }
        lowered = lowered.saturating_mul(2);
    };
    let mut keys = BTreeSet::new();
    for _ in 0..count {
        let message = pubsub
            .get_message()
            .map_err(|e| format!("{count} keys evicted, but not all events arrived: {e}"))?;
        keys.insert(message.get_payload::<String>().map_err(|e| e.to_string())?);
    }
    drop(pubsub);
    if usize::try_from(count).ok() != Some(keys.len()) {
        return Err(format!(
            "evicted_keys grew by {count}, events named {keys:?}"
        ));
    }
    tally.evictions += 1;
    tally.with_cached_records += u64::from(expect);
    tally.evicting += u64::from(count > 0);
    tally.max_keys = tally.max_keys.max(keys.len());
    tally.retried += u64::from(attempts > 1);
    Ok(keys)
}

/// Waits until healing has run: no repair queued and `GPUCACHE.CHECK` clean.
fn wait_healed(con: &mut Connection) -> Result<(), String> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let queued = info_number(con, "gpucache", "gpucache_heal_queue");
        let report = as_map(&run(con, &["GPUCACHE.CHECK", "m"]).unwrap());
        if queued == 0 && text(&report["ok"]) == "1" {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(format!(
                "healing never finished: heal_queue {queued}, CHECK {:?}",
                report["violations"]
            ));
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

#[test]
fn the_module_behaves_like_the_reference_model() {
    let server = Server::start(
        &["AVAILABILITY_TTL", "100000", "PRICING_TTL", "100000"],
        &[
            "--maxmemory-policy",
            "volatile-lru",
            "--notify-keyspace-events",
            "Ee",
        ],
    );
    let harness = std::cell::RefCell::new(Harness {
        con: server.connect(),
        events: server.connect(),
        tally: Tally::default(),
    });
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(48);
    let mut runner = proptest::test_runner::TestRunner::new(ProptestConfig {
        cases,
        ..ProptestConfig::default()
    });
    let result = runner.run(&prop::collection::vec(op(), 1..60), |ops| {
        run_case(&mut harness.borrow_mut(), &ops)
    });
    println!("evictions: {:?}", harness.borrow().tally);
    if let Err(e) = result {
        panic!("{e}");
    }
}
