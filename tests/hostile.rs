//! Hostile input: arbitrary byte strings, huge numbers, NaN/inf, negative durations, 1 MB ids
//! and keys of the wrong type thrown at every command. The server must stay up, every refused
//! command must leave every key as it was, and the region's invariants must hold.
//!
//! And hostile neighbours: another client writing anything into gpucache's keys (and into keys
//! of regions with hostile names) between gpucache's commands. The server must stay up, healing
//! must finish and `REPAIR` must leave the region clean.
//!
//! Cases: `HOSTILE_CASES` (default 400 commands for the first, 200 sequences for the second);
//! `HOSTILE_TRACE=1` prints what is sent.

mod common;

use common::*;
use proptest::prelude::*;
use redis::Connection;
use std::cell::RefCell;

const COMMANDS: [&str; 13] = [
    "GPUCACHE.REGISTER",
    "GPUCACHE.GET",
    "GPUCACHE.STATUS",
    "GPUCACHE.PRICE",
    "GPUCACHE.BOOK",
    "GPUCACHE.CANCEL",
    "GPUCACHE.PROVIDER",
    "GPUCACHE.AVAILABLE",
    "GPUCACHE.STATS",
    "GPUCACHE.INVALIDATE",
    "GPUCACHE.ORDERBOOK",
    "GPUCACHE.CHECK",
    "GPUCACHE.REPAIR",
];

const TOKENS: [&str; 40] = [
    "eu",
    "g1",
    "g2",
    "g4",
    "gx",
    "b1",
    "bx",
    "u1",
    "p1",
    "p2",
    "A100",
    "H100",
    "PROVIDER",
    "TYPE",
    "PRICE",
    "MEMORY",
    "CORES",
    "SCORE",
    "LIMIT",
    "MAXPRICE",
    "MINMEMORY",
    "MINCORES",
    "SORT",
    "DEPTH",
    "available",
    "busy",
    "offline",
    "online",
    "NaN",
    "inf",
    "-inf",
    "-1",
    "0",
    "1e308",
    "99999999999999999999",
    "1.0000001",
    "",
    "*",
    "{eu}",
    "gpu:g1",
];

fn argument() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        6 => (0..TOKENS.len()).prop_map(|i| TOKENS[i].as_bytes().to_vec()),
        2 => prop::collection::vec(any::<u8>(), 0..24),
        1 => "[0-9]{1,30}(\\.[0-9]{0,12})?".prop_map(String::into_bytes),
        1 => Just(vec![b'x'; 1 << 20]),
    ]
}

fn call() -> impl Strategy<Value = (usize, Vec<Vec<u8>>)> {
    (0..COMMANDS.len(), prop::collection::vec(argument(), 0..12))
}

fn hostile_setup(con: &mut Connection) {
    redis::cmd("FLUSHALL").query::<()>(con).unwrap();
    seed(con);
    run(con, &["GPUCACHE.BOOK", "eu", "g1", "b1", "u1", "600"]).unwrap();
    // Keys gpucache expects to be hashes or sets, holding something else.
    redis::cmd("SET")
        .arg("gpucache:{eu}:gpu:gx")
        .arg("not a hash")
        .query::<()>(con)
        .unwrap();
    redis::cmd("SET")
        .arg("gpucache:{eu}:booking:bx")
        .arg("not a hash")
        .query::<()>(con)
        .unwrap();
    redis::cmd("LPUSH")
        .arg("gpucache:{eu}:provider-gpus:p2x")
        .arg("x")
        .query::<()>(con)
        .unwrap();
}

#[test]
fn no_input_panics_or_half_applies() {
    // One region serves every case: its records must outlive a long run (`HOSTILE_CASES`), or
    // their expiry would change the state between a refused command's two snapshots.
    let server = Server::start(
        &["AVAILABILITY_TTL", "31536000", "PRICING_TTL", "31536000"],
        &[],
    );
    let con = RefCell::new(server.connect());
    hostile_setup(&mut con.borrow_mut());
    let cases: u32 = std::env::var("HOSTILE_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(400);
    let mut runner = proptest::test_runner::TestRunner::new(ProptestConfig {
        cases,
        failure_persistence: None,
        ..ProptestConfig::default()
    });
    let executed = std::cell::Cell::new(0u32);
    let result = runner.run(&call(), |(command, args)| {
        let mut con = con.borrow_mut();
        let before = snapshot(&mut con);
        let mut cmd = redis::cmd(COMMANDS[command]);
        for a in &args {
            cmd.arg(a.as_slice());
        }
        if std::env::var_os("HOSTILE_TRACE").is_some() {
            let shown: Vec<String> = args
                .iter()
                .map(|a| format!("{:?}", String::from_utf8_lossy(&a[..a.len().min(40)])))
                .collect();
            eprintln!("{} {}", COMMANDS[command], shown.join(" "));
        }
        let reply: redis::RedisResult<redis::Value> = cmd.query(&mut *con);
        executed.set(executed.get() + 1);
        let pong: String = redis::cmd("PING")
            .query(&mut *con)
            .map_err(|e| TestCaseError::fail(format!("server down: {e}")))?;
        prop_assert_eq!(pong, "PONG");
        if let Err(e) = &reply {
            prop_assert!(e.code().is_some(), "not a proper error reply: {}", e);
            prop_assert_eq!(
                &before,
                &snapshot(&mut con),
                "{} refused ({}) but changed state",
                COMMANDS[command],
                e
            );
        }
        let report = run(&mut con, &["GPUCACHE.CHECK", "eu"]).unwrap();
        prop_assert_eq!(
            text(&as_map(&report)["ok"]),
            "1",
            "{:?}",
            as_map(&report)["violations"]
        );
        Ok(())
    });
    eprintln!("hostile input: {} commands executed", executed.get());
    if let Err(e) = result {
        panic!("{e}");
    }
    assert!(executed.get() >= cases);
}

/// Index scores the module never writes, edited in by hand: reads must answer (in some order)
/// and the server must stay up.
#[test]
fn hand_edited_index_scores_never_crash_reads() {
    let server = Server::start(&[], &[]);
    let mut con = server.connect();
    seed(&mut con);
    for (key, score) in [
        ("gpucache:{eu}:avail-score:A100", "-inf"),
        ("gpucache:{eu}:avail-score:A100", "+inf"),
        ("gpucache:{eu}:avail-score:H100", "-1e300"),
        ("gpucache:{eu}:avail-own:A100", "-inf"),
        ("gpucache:{eu}:avail-own:H100", "1e300"),
    ] {
        for gpu in ["g1", "g4"] {
            redis::cmd("ZADD")
                .arg(key)
                .arg(score)
                .arg(gpu)
                .query::<()>(&mut con)
                .unwrap();
        }
        for args in [
            &["GPUCACHE.AVAILABLE", "eu", "SORT", "SCORE"][..],
            &["GPUCACHE.AVAILABLE", "eu", "SORT", "PRICE"],
            &["GPUCACHE.AVAILABLE", "eu", "TYPE", "A100", "SORT", "SCORE"],
            &["GPUCACHE.ORDERBOOK", "eu", "A100"],
            &["GPUCACHE.ORDERBOOK", "eu", "H100"],
            &["GPUCACHE.STATS", "eu"],
        ] {
            let _ = run(&mut con, args);
            let pong: String = redis::cmd("PING").query(&mut con).expect("server up");
            assert_eq!(pong, "PONG", "after {args:?} with {key} = {score}");
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Foreign writes: what another client puts in the keyspace.

/// Key families under `gpucache:{<region>}:`; those with `true` take an id after a colon.
const FAMILIES: [(&str, bool); 16] = [
    ("gpu", true),
    ("booking", true),
    ("price", true),
    ("provider", true),
    ("provider-gpus", true),
    ("avail-own", true),
    ("avail-type", true),
    ("avail-score", true),
    ("index:gpus", false),
    ("index:types", false),
    ("index:providers", false),
    ("index:bookings", false),
    ("index:booking-ends", false),
    ("stats:market", false),
    ("stats:24h", false),
    ("events", false),
];

/// Keys the module really uses in region `eu` after `hostile_setup`: where a foreign `RENAME`
/// lands.
const REAL_KEYS: [&str; 19] = [
    "gpucache:{eu}:gpu:g1",
    "gpucache:{eu}:gpu:g2",
    "gpucache:{eu}:gpu:g3",
    "gpucache:{eu}:gpu:g4",
    "gpucache:{eu}:booking:b1",
    "gpucache:{eu}:provider:p1",
    "gpucache:{eu}:provider-gpus:p1",
    "gpucache:{eu}:provider-gpus:p2",
    "gpucache:{eu}:avail-own:A100",
    "gpucache:{eu}:avail-type:A100",
    "gpucache:{eu}:avail-score:H100",
    "gpucache:{eu}:price:A100",
    "gpucache:{eu}:index:gpus",
    "gpucache:{eu}:index:types",
    "gpucache:{eu}:index:providers",
    "gpucache:{eu}:index:bookings",
    "gpucache:{eu}:index:booking-ends",
    "gpucache:{eu}:stats:market",
    "gpucache:{eu}:events",
];

/// Field names the module writes (records, counters, registries, window buckets).
const FIELDS: [&str; 38] = [
    "provider",
    "type",
    "price",
    "price_seq",
    "status",
    "booking",
    "version",
    "updated_ms",
    "memory_gb",
    "cores",
    "score",
    "booking_user",
    "booking_price",
    "booking_duration_s",
    "booking_start_ms",
    "booking_end_ms",
    "gpu",
    "gpu_id",
    "user",
    "duration_s",
    "start_ms",
    "end_ms",
    "gpu_type",
    "seq",
    "gpus:available",
    "gpus:busy",
    "gpus:offline",
    "type-total:A100",
    "own-sum:A100",
    "bookings:created",
    "bookings:cancelled",
    "bookings:ended",
    "g1",
    "g9",
    "b1",
    "b9",
    "count:@bucket",
    "volume:@bucket",
];

/// Values that look like what the module writes, or like its limits. `@now`, `@now+N` and
/// `@now-N` become the current time in ms (plus or minus N) when the write is sent, `@bucket`
/// the current 15-minute bucket.
const VALUES: [&str; 36] = [
    "available",
    "busy",
    "offline",
    "maintenance",
    "online",
    "A100",
    "H100",
    "p1",
    "p2",
    "g1",
    "g2",
    "g9",
    "b1",
    "b9",
    "u1",
    "available A100 p1",
    "busy A100 p1 b1",
    "busy H100 p2 b9",
    "available A100",
    "2.5",
    "0",
    "-1",
    "1",
    "600",
    "9223372036854775807",
    "-9223372036854775808",
    "99999999999999999999",
    "NaN",
    "inf",
    "1e308",
    "",
    "@now",
    "@now+5",
    "@now-5000",
    "@now+600000",
    "@bucket",
];

const SCORES: [&str; 11] = [
    "-inf", "+inf", "0", "1", "2.5", "-1", "1e300", "4000000", "@now", "@now+5", "@now-1",
];

const HOSTILE_IDS: [&[u8]; 12] = [
    b"",
    b"\0",
    b"g1\0",
    b"\r\n",
    b"%s%n%p",
    b"%s%s%s%s%s%n",
    b"\xff\xfe",
    b"\xc3",
    b"g\x01\x1b[2J",
    b"g1}",
    b"{eu}",
    b"g1:x",
];

const HOSTILE_REGIONS: [&[u8]; 10] = [
    b"",
    b"eu\0",
    b"%s%n%p",
    b"e}u",
    b"{eu}",
    b"\xff\xfe",
    b"eu:x",
    b"EU",
    b"\r\n",
    b"*",
];

fn pick(list: &'static [&'static str]) -> impl Strategy<Value = Vec<u8>> {
    (0..list.len()).prop_map(move |i| list[i].as_bytes().to_vec())
}

fn pick_bytes(list: &'static [&'static [u8]]) -> impl Strategy<Value = Vec<u8>> {
    (0..list.len()).prop_map(move |i| list[i].to_vec())
}

fn region_name() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        8 => Just(b"eu".to_vec()),
        2 => pick_bytes(&HOSTILE_REGIONS),
        1 => prop::collection::vec(any::<u8>(), 0..16),
        1 => Just(vec![b'r'; 5000]),
    ]
}

/// Ids the module really holds (or might) in a key family, so foreign writes hit real keys.
fn real_ids(family: &str) -> &'static [&'static str] {
    match family {
        "gpu" => &["g1", "g2", "g3", "g4", "g9", "gx"],
        "booking" => &["b1", "b2", "b9", "bx"],
        "provider" | "provider-gpus" => &["p1", "p2", "p2x"],
        _ => &["A100", "H100", "X1"],
    }
}

fn hostile_id() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        4 => pick_bytes(&HOSTILE_IDS),
        3 => prop::collection::vec(any::<u8>(), 0..24),
        1 => Just(vec![b'i'; 70_000]),
    ]
}

/// A key under the prefix: its family chosen among `families` (names of `FAMILIES`; those
/// holding the type the write makes) three times in four, any family otherwise; in region `eu`
/// mostly; with a real id mostly.
fn key_in(families: &'static [&'static str]) -> impl Strategy<Value = Vec<u8>> {
    let index = |name: &str| {
        FAMILIES
            .iter()
            .position(|(family, _)| *family == name)
            .expect("a family of FAMILIES")
    };
    let family = prop_oneof![
        3 => (0..families.len()).prop_map(move |i| index(families[i])),
        1 => 0..FAMILIES.len(),
    ];
    (
        region_name(),
        family,
        any::<prop::sample::Index>(),
        prop::bool::weighted(0.7),
        hostile_id(),
    )
        .prop_map(|(region, family, pick, real, hostile)| {
            let (name, with_id) = FAMILIES[family];
            let mut key = b"gpucache:{".to_vec();
            key.extend_from_slice(&region);
            key.extend_from_slice(b"}:");
            key.extend_from_slice(name.as_bytes());
            if with_id {
                key.push(b':');
                if real {
                    key.extend_from_slice(pick.get(real_ids(name)).as_bytes());
                } else {
                    key.extend_from_slice(&hostile);
                }
            }
            key
        })
}

const HASH_FAMILIES: [&str; 8] = [
    "gpu",
    "booking",
    "price",
    "provider",
    "index:gpus",
    "index:bookings",
    "stats:market",
    "stats:24h",
];
const SET_FAMILIES: [&str; 3] = ["provider-gpus", "index:types", "index:providers"];
const ZSET_FAMILIES: [&str; 4] = [
    "avail-own",
    "avail-type",
    "avail-score",
    "index:booking-ends",
];
const STREAM_FAMILIES: [&str; 1] = ["events"];

fn member() -> impl Strategy<Value = Vec<u8>> {
    const REAL: [&str; 12] = [
        "g1", "g2", "g3", "g4", "g9", "b1", "b9", "p1", "p2", "A100", "H100", "X1",
    ];
    prop_oneof![
        6 => pick(&REAL),
        2 => hostile_id(),
        1 => value(),
    ]
}

fn field() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        6 => pick(&FIELDS),
        1 => pick_bytes(&HOSTILE_IDS),
        1 => prop::collection::vec(any::<u8>(), 0..16),
    ]
}

fn value() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        6 => pick(&VALUES),
        1 => pick_bytes(&HOSTILE_IDS),
        1 => prop::collection::vec(any::<u8>(), 0..24),
        1 => prop::bool::weighted(0.2).prop_map(|big| if big { vec![b'v'; 1 << 20] } else { b"v".to_vec() }),
    ]
}

/// An event stream entry another client appends: shaped like the module's own (with hostile
/// sequence numbers, versions, times and prices), or anything.
fn stream_fields() -> impl Strategy<Value = Vec<(Vec<u8>, Vec<u8>)>> {
    const KINDS: [&str; 5] = [
        "booking_created",
        "provider_status_changed",
        "gpu_availability_changed",
        "booking_cancelled",
        "x",
    ];
    let shaped = (pick(&KINDS), value(), value(), value(), value(), member(), value()).prop_map(
        |(kind, seq, ts, end, price, provider, status)| {
            let json = |v: &[u8]| {
                let text = String::from_utf8_lossy(&v[..v.len().min(64)]).into_owned();
                match text.parse::<i64>() {
                    Ok(n) => n.to_string(),
                    Err(_) => serde_json::Value::String(text).to_string(),
                }
            };
            let payload = format!(
                "{{\"type\":{k},\"region\":\"eu\",\"ts_ms\":{ts},\"gpu_id\":\"g1\",\"booking_id\":\"b1\",\"provider_id\":{p},\"version\":{seq},\"new\":{{\"end_ms\":{end},\"price\":{price},\"status\":{status}}}}}",
                k = json(&kind),
                ts = json(&ts),
                p = json(&provider),
                seq = json(&seq),
                end = json(&end),
                price = serde_json::Value::String(String::from_utf8_lossy(&price[..price.len().min(64)]).into_owned()),
                status = json(&status),
            );
            vec![
                (b"type".to_vec(), kind),
                (b"seq".to_vec(), seq),
                (b"payload".to_vec(), payload.into_bytes()),
            ]
        },
    );
    prop_oneof![
        3 => shaped,
        1 => prop::collection::vec((field(), value()), 1..4),
    ]
}

#[derive(Debug, Clone)]
enum Foreign {
    Hset(Vec<u8>, Vec<(Vec<u8>, Vec<u8>)>),
    Sadd(Vec<u8>, Vec<Vec<u8>>),
    Zadd(Vec<u8>, Vec<(Vec<u8>, Vec<u8>)>),
    Set(Vec<u8>, Vec<u8>),
    Xadd(Vec<u8>, Vec<u8>, Vec<(Vec<u8>, Vec<u8>)>),
    Del(Vec<u8>),
    Pexpire(Vec<u8>, u64),
    Rename(Vec<u8>, Vec<u8>),
}

fn foreign() -> impl Strategy<Value = Foreign> {
    let stream_id = prop_oneof![
        8 => Just(b"*".to_vec()),
        1 => Just(b"@now+100000-0".to_vec()),
        1 => Just(b"18446744073709551615-18446744073709551615".to_vec()),
    ];
    prop_oneof![
        4 => (key_in(&HASH_FAMILIES), prop::collection::vec((field(), value()), 1..4))
            .prop_map(|(k, p)| Foreign::Hset(k, p)),
        2 => (key_in(&SET_FAMILIES), prop::collection::vec(member(), 1..4))
            .prop_map(|(k, m)| Foreign::Sadd(k, m)),
        2 => (key_in(&ZSET_FAMILIES), prop::collection::vec((pick(&SCORES), member()), 1..4))
            .prop_map(|(k, m)| Foreign::Zadd(k, m)),
        1 => (key_in(&KEY_FAMILIES), value()).prop_map(|(k, v)| Foreign::Set(k, v)),
        2 => (key_in(&STREAM_FAMILIES), stream_id, stream_fields())
            .prop_map(|(k, i, f)| Foreign::Xadd(k, i, f)),
        2 => key_in(&KEY_FAMILIES).prop_map(Foreign::Del),
        2 => (key_in(&KEY_FAMILIES), 1..=20u64).prop_map(|(k, ms)| Foreign::Pexpire(k, ms)),
        2 => (key_in(&KEY_FAMILIES), pick(&REAL_KEYS)).prop_map(|(k, t)| Foreign::Rename(k, t)),
    ]
}

/// gpucache commands on region `eu` shaped like a client's: each template slot lists the
/// tokens it may hold.
const EU_CALLS: [&[&[&str]]; 16] = [
    &[
        &["GPUCACHE.REGISTER"],
        &["eu"],
        &["g1", "g2", "g3", "g4", "g5", "g9"],
        &["PROVIDER"],
        &["p1", "p2"],
        &["TYPE"],
        &["A100", "H100", "X1"],
        &["PRICE"],
        &["1.5", "2.5", "4"],
    ],
    &[
        &["GPUCACHE.REGISTER"],
        &["eu"],
        &["g1", "g5"],
        &["PROVIDER"],
        &["p1", "p2"],
        &["TYPE"],
        &["A100"],
        &["PRICE"],
        &["3"],
        &["SCORE"],
        &["7", "0"],
        &["MEMORY"],
        &["80"],
    ],
    &[
        &["GPUCACHE.BOOK"],
        &["eu"],
        &["g1", "g2", "g3", "g4", "g9"],
        &["b1", "b2", "b3"],
        &["u1", "u2"],
        &["600", "1"],
    ],
    &[&["GPUCACHE.CANCEL"], &["eu"], &["b1", "b2", "b3"]],
    &[
        &["GPUCACHE.STATUS"],
        &["eu"],
        &["g1", "g2", "g3", "g4"],
        &["available", "offline", "maintenance", "busy"],
    ],
    &[
        &["GPUCACHE.PROVIDER"],
        &["eu"],
        &["p1", "p2"],
        &["online", "offline", "maintenance"],
    ],
    &[
        &["GPUCACHE.PRICE"],
        &["eu"],
        &["A100", "H100"],
        &["3", "0.5"],
    ],
    &[&["GPUCACHE.GET"], &["eu"], &["g1", "g2", "g3", "g4", "g9"]],
    &[&["GPUCACHE.AVAILABLE"], &["eu"]],
    &[
        &["GPUCACHE.AVAILABLE"],
        &["eu"],
        &["SORT"],
        &["SCORE", "PRICE"],
        &["TYPE"],
        &["A100", "H100"],
    ],
    &[&["GPUCACHE.ORDERBOOK"], &["eu"], &["A100", "H100"]],
    &[&["GPUCACHE.STATS"], &["eu"]],
    &[&["GPUCACHE.STATS"]],
    &[&["GPUCACHE.CHECK"], &["eu"]],
    &[&["GPUCACHE.REPAIR"], &["eu"]],
    &[
        &["GPUCACHE.INVALIDATE"],
        &["eu"],
        &["region", "gpu:g1", "stats"],
    ],
];

fn eu_call() -> impl Strategy<Value = Vec<Vec<u8>>> {
    (
        0..EU_CALLS.len(),
        prop::collection::vec(any::<prop::sample::Index>(), 13),
    )
        .prop_map(|(template, picks)| {
            EU_CALLS[template]
                .iter()
                .zip(picks)
                .map(|(slot, pick)| pick.get(slot).as_bytes().to_vec())
                .collect()
        })
}

#[derive(Clone)]
enum Step {
    /// A gpucache command: its name, then its arguments.
    Module(Vec<Vec<u8>>),
    Foreign(Foreign),
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        3 => eu_call().prop_map(Step::Module),
        1 => call().prop_map(|(c, args)| {
            let mut full = vec![COMMANDS[c].as_bytes().to_vec()];
            full.extend(args);
            Step::Module(full)
        }),
        4 => foreign().prop_map(Step::Foreign),
    ]
}

/// Shown as the commands it sends (ids as text), so a failure report is readable.
impl std::fmt::Debug for Step {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&describe(self))
    }
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// Replaces the time placeholders (`@now`, `@now+N`, `@now-N`, `@bucket`) with the clock's
/// value, so foreign writes can name times the booking clock and the 24-hour window act on.
fn timed(raw: &[u8]) -> Vec<u8> {
    let Ok(text) = std::str::from_utf8(raw) else {
        return raw.to_vec();
    };
    if !text.contains('@') {
        return raw.to_vec();
    }
    let now = now_ms();
    let mut out = text.replace("@bucket", &(now / 900_000).to_string());
    while let Some(at) = out.find("@now") {
        let rest = &out[at + 4..];
        let digits_from = usize::from(rest.starts_with('+') || rest.starts_with('-'));
        let digits = rest[digits_from..]
            .bytes()
            .take_while(u8::is_ascii_digit)
            .count();
        let offset: i64 = if digits_from == 1 && digits > 0 {
            rest[..1 + digits].parse().unwrap_or(0)
        } else {
            0
        };
        let used = if digits > 0 { digits_from + digits } else { 0 };
        out.replace_range(at..at + 4 + used, &(now + offset).to_string());
    }
    out.into_bytes()
}

fn shown(bytes: &[u8]) -> String {
    let mut text = format!(
        "{:?}",
        String::from_utf8_lossy(&bytes[..bytes.len().min(48)])
    );
    if bytes.len() > 48 {
        text.push_str(&format!("..({} bytes)", bytes.len()));
    }
    text
}

fn describe(step: &Step) -> String {
    match step {
        Step::Module(args) => {
            let args: Vec<String> = args.iter().map(|a| shown(a)).collect();
            args.join(" ")
        }
        Step::Foreign(f) => {
            let pairs = |p: &[(Vec<u8>, Vec<u8>)]| {
                p.iter()
                    .map(|(a, b)| format!("{} {}", shown(a), shown(b)))
                    .collect::<Vec<_>>()
                    .join(" ")
            };
            match f {
                Foreign::Hset(k, p) => format!("HSET {} {}", shown(k), pairs(p)),
                Foreign::Sadd(k, m) => format!(
                    "SADD {} {}",
                    shown(k),
                    m.iter().map(|m| shown(m)).collect::<Vec<_>>().join(" ")
                ),
                Foreign::Zadd(k, p) => format!("ZADD {} {}", shown(k), pairs(p)),
                Foreign::Set(k, v) => format!("SET {} {}", shown(k), shown(v)),
                Foreign::Xadd(k, i, p) => format!("XADD {} {} {}", shown(k), shown(i), pairs(p)),
                Foreign::Del(k) => format!("DEL {}", shown(k)),
                Foreign::Pexpire(k, ms) => format!("PEXPIRE {} {ms}", shown(k)),
                Foreign::Rename(k, t) => format!("RENAME {} {}", shown(k), shown(t)),
            }
        }
    }
}

/// The command a step sends.
fn command_of(step: &Step) -> redis::Cmd {
    match step {
        Step::Module(args) => {
            let mut cmd = redis::Cmd::new();
            for a in args {
                cmd.arg(a.as_slice());
            }
            cmd
        }
        Step::Foreign(f) => {
            let mut cmd;
            match f {
                Foreign::Hset(k, pairs) => {
                    cmd = redis::cmd("HSET");
                    cmd.arg(k.as_slice());
                    for (f, v) in pairs {
                        cmd.arg(timed(f)).arg(timed(v));
                    }
                }
                Foreign::Sadd(k, members) => {
                    cmd = redis::cmd("SADD");
                    cmd.arg(k.as_slice());
                    for m in members {
                        cmd.arg(timed(m));
                    }
                }
                Foreign::Zadd(k, pairs) => {
                    cmd = redis::cmd("ZADD");
                    cmd.arg(k.as_slice());
                    for (s, m) in pairs {
                        cmd.arg(timed(s)).arg(timed(m));
                    }
                }
                Foreign::Set(k, v) => {
                    cmd = redis::cmd("SET");
                    cmd.arg(k.as_slice()).arg(timed(v));
                }
                Foreign::Xadd(k, id, pairs) => {
                    cmd = redis::cmd("XADD");
                    cmd.arg(k.as_slice()).arg(timed(id));
                    for (f, v) in pairs {
                        cmd.arg(timed(f)).arg(timed(v));
                    }
                }
                Foreign::Del(k) => {
                    cmd = redis::cmd("DEL");
                    cmd.arg(k.as_slice());
                }
                Foreign::Pexpire(k, ms) => {
                    cmd = redis::cmd("PEXPIRE");
                    cmd.arg(k.as_slice()).arg(*ms);
                }
                Foreign::Rename(k, t) => {
                    cmd = redis::cmd("RENAME");
                    cmd.arg(k.as_slice()).arg(t.as_slice());
                }
            }
            cmd
        }
    }
}

/// A numeric `INFO gpucache` field, or why it could not be read.
fn gpucache_info(con: &mut Connection, name: &str) -> Result<i64, String> {
    let info: String = redis::cmd("INFO")
        .arg("gpucache")
        .query(con)
        .map_err(|e| format!("INFO: {e}"))?;
    info.lines()
        .find_map(|l| l.trim_end().strip_prefix(&format!("{name}:")))
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| format!("INFO gpucache has no numeric {name}"))
}

fn ping(con: &mut Connection) -> Result<(), String> {
    match redis::cmd("PING").query::<String>(con) {
        Ok(pong) if pong == "PONG" => Ok(()),
        Ok(other) => Err(format!("PING answered {other:?}")),
        Err(e) => Err(format!("server down: {e}")),
    }
}

/// Runs one case: the steps, then the checks. `Err` describes what went wrong.
fn foreign_case(con: &mut Connection, steps: &[Step]) -> Result<(), String> {
    let trace = std::env::var_os("HOSTILE_TRACE").is_some();
    let mut expiry_deadline = std::time::Instant::now();
    let mut regions: Vec<Vec<u8>> = Vec::new();
    for step in steps {
        if trace {
            eprintln!("{}", describe(step));
        }
        if let Step::Foreign(Foreign::Pexpire(_, ms)) = step {
            expiry_deadline = expiry_deadline
                .max(std::time::Instant::now() + std::time::Duration::from_millis(ms + 5));
        }
        if let Step::Foreign(
            Foreign::Hset(k, _)
            | Foreign::Sadd(k, _)
            | Foreign::Zadd(k, _)
            | Foreign::Set(k, _)
            | Foreign::Xadd(k, _, _)
            | Foreign::Pexpire(k, _),
        ) = step
        {
            if let Some(region) = k.strip_prefix(b"gpucache:{").and_then(|rest| {
                rest.windows(2)
                    .position(|w| w == b"}:")
                    .map(|i| rest[..i].to_vec())
            }) {
                if region != b"eu" && !regions.contains(&region) {
                    regions.push(region);
                }
            }
        }
        let reply: redis::RedisResult<redis::Value> = command_of(step).query(con);
        ping(con).map_err(|e| format!("after {}: {e}", describe(step)))?;
        if let (Step::Module(..), Err(e)) = (step, &reply) {
            if e.code().is_none() {
                return Err(format!("{}: not a proper error reply: {e}", describe(step)));
            }
        }
    }
    // Let the foreign TTLs run out, then touch every key so Redis deletes the expired ones now
    // (and announces them) rather than some time during the checks.
    let wait = expiry_deadline.saturating_duration_since(std::time::Instant::now());
    std::thread::sleep(wait);
    let keys: Vec<Vec<u8>> = redis::cmd("KEYS")
        .arg("*")
        .query(con)
        .map_err(|e| format!("KEYS: {e}"))?;
    for chunk in keys.chunks(500) {
        let mut touch = redis::cmd("TOUCH");
        for k in chunk {
            touch.arg(k.as_slice());
        }
        touch.query::<i64>(con).map_err(|e| format!("TOUCH: {e}"))?;
    }
    // Whatever the other client did to other regions, the module answers about them.
    for region in &regions {
        for command in ["GPUCACHE.CHECK", "GPUCACHE.REPAIR", "GPUCACHE.STATS"] {
            let reply: redis::RedisResult<redis::Value> =
                redis::cmd(command).arg(region.as_slice()).query(con);
            ping(con).map_err(|e| format!("after {command} {}: {e}", shown(region)))?;
            if let Err(e) = reply {
                if e.code().is_none() {
                    return Err(format!(
                        "{command} {}: not a proper error: {e}",
                        shown(region)
                    ));
                }
            }
        }
    }
    let reply: redis::RedisResult<redis::Value> = redis::cmd("GPUCACHE.STATS").query(con);
    ping(con).map_err(|e| format!("after GPUCACHE.STATS: {e}"))?;
    if let Err(e) = reply {
        if e.code().is_none() {
            return Err(format!("GPUCACHE.STATS: not a proper error: {e}"));
        }
    }
    // The heal queue drains...
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
    loop {
        let queued = gpucache_info(con, "gpucache_heal_queue")?;
        let retrying = gpucache_info(con, "gpucache_heal_retrying")?;
        if queued == 0 && retrying == 0 {
            break;
        }
        if std::time::Instant::now() > deadline {
            return Err(format!(
                "heal queue never drained: heal_queue {queued}, heal_retrying {retrying}"
            ));
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    // ...and a repair puts the region back in order.
    let repaired = run(con, &["GPUCACHE.REPAIR", "eu"]);
    ping(con).map_err(|e| format!("after GPUCACHE.REPAIR eu: {e}"))?;
    let repaired = repaired.map_err(|e| format!("GPUCACHE.REPAIR eu failed: {e}"))?;
    let report = run(con, &["GPUCACHE.CHECK", "eu"]).map_err(|e| format!("CHECK eu: {e}"))?;
    let report = as_map(&report);
    if text(&report["ok"]) != "1" {
        let fixes = as_map(&repaired)
            .get("repairs")
            .map(|r| format!("{r:?}"))
            .unwrap_or_default();
        return Err(format!(
            "CHECK eu after REPAIR: {:?}\nREPAIR had fixed: {fixes}",
            report["violations"]
        ));
    }
    // The repaired region takes new business.
    for args in [
        &[
            "GPUCACHE.REGISTER",
            "eu",
            "g7",
            "PROVIDER",
            "p7",
            "TYPE",
            "Z7",
            "PRICE",
            "1",
        ][..],
        &["GPUCACHE.BOOK", "eu", "g7", "b7", "u7", "60"],
        &["GPUCACHE.CANCEL", "eu", "b7"],
    ] {
        run(con, args).map_err(|e| format!("{} after REPAIR: {e}", args.join(" ")))?;
    }
    assert_clean(con, "after new business in the repaired region")
}

fn assert_clean(con: &mut Connection, when: &str) -> Result<(), String> {
    let report = run(con, &["GPUCACHE.CHECK", "eu"]).map_err(|e| format!("CHECK eu: {e}"))?;
    let report = as_map(&report);
    if text(&report["ok"]) != "1" {
        return Err(format!("CHECK eu {when}: {:?}", report["violations"]));
    }
    Ok(())
}

/// Another client writes into gpucache's keys (and into keys of regions with hostile names)
/// between gpucache's own hostile commands: any key family, any write. The module may find
/// damage, but the server must stay up, healing must finish, and `REPAIR` must leave the region
/// clean. A server that dies is restarted, so shrinking still finds the smallest killer.
#[test]
fn foreign_writes_never_crash_or_corrupt() {
    let server = RefCell::new(Server::start(&[], &[]));
    let con = RefCell::new(server.borrow().connect());
    let cases: u32 = std::env::var("HOSTILE_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200);
    let mut runner = proptest::test_runner::TestRunner::new(ProptestConfig {
        cases,
        failure_persistence: None,
        // Each case reseeds a server: bound the search for a smaller failing case.
        max_shrink_time: 30_000,
        ..ProptestConfig::default()
    });
    let executed = std::cell::Cell::new(0u32);
    let crashes = std::cell::Cell::new(0u32);
    let result = runner.run(&prop::collection::vec(step(), 1..24), |steps| {
        if ping(&mut con.borrow_mut()).is_err() {
            crashes.set(crashes.get() + 1);
            *server.borrow_mut() = Server::start(&[], &[]);
            *con.borrow_mut() = server.borrow().connect();
        }
        let mut con = con.borrow_mut();
        redis::cmd("FLUSHALL").query::<()>(&mut *con).unwrap();
        hostile_setup(&mut con);
        executed.set(executed.get() + 1);
        foreign_case(&mut con, &steps).map_err(|why| {
            let steps: Vec<String> = steps.iter().map(describe).collect();
            TestCaseError::fail(format!("{why}\nsteps:\n  {}", steps.join("\n  ")))
        })
    });
    eprintln!(
        "foreign writes: {} cases executed, server restarted after {} crashes",
        executed.get(),
        crashes.get()
    );
    if let Err(e) = result {
        panic!("{e}");
    }
    assert!(executed.get() >= cases);
}
