//! Nothing paid for is ever lost: bookings and market state survive eviction, unsafe
//! eviction policies are refused, and a lost or garbled market-state key is repaired from what
//! the region still holds.

mod common;

use common::*;
use redis::{Connection, Value};
use std::collections::BTreeMap;
use std::time::Duration;

fn set_config(con: &mut Connection, name: &str, value: &str) {
    redis::cmd("CONFIG")
        .arg("SET")
        .arg(name)
        .arg(value)
        .query::<()>(con)
        .unwrap_or_else(|e| panic!("CONFIG SET {name} {value}: {e}"));
}

/// Registers GPUs `<prefix><i>` for `i` in `from..from + count` (two types, three
/// providers); returns how many were refused (only `OOM` may refuse one).
fn register_many(con: &mut Connection, prefix: &str, from: usize, count: usize) -> usize {
    let mut refused = 0;
    for i in from..from + count {
        let id = format!("{prefix}{i}");
        let provider = format!("p{}", i % 3);
        let price = format!("{}.{}", 1 + i % 4, i % 10);
        let gpu_type = if i % 2 == 0 { "A100" } else { "H100" };
        let args = [
            "GPUCACHE.REGISTER",
            "eu",
            &id,
            "PROVIDER",
            &provider,
            "TYPE",
            gpu_type,
            "PRICE",
            &price,
            "MEMORY",
            "80",
        ];
        if let Err(e) = run(con, &args) {
            assert_eq!(e.code(), Some("OOM"), "only OOM may refuse a write: {e}");
            refused += 1;
        }
    }
    refused
}

/// Every acknowledged booking is still there, holding its GPU, and nobody else can book it
/// (past `maxmemory` a new booking is refused whole with `OOM` anyway).
fn assert_bookings_intact(con: &mut Connection, booked: &BTreeMap<String, String>) {
    for (booking, gpu) in booked {
        let holder: Option<String> = redis::cmd("HGET")
            .arg(format!("gpucache:{{eu}}:booking:{booking}"))
            .arg("gpu")
            .query(con)
            .unwrap();
        assert_eq!(holder.as_deref(), Some(gpu.as_str()), "booking {booking}");
        let record = fields(con, &["GPUCACHE.GET", "eu", gpu]);
        assert_eq!(
            (record["status"].as_str(), record["booking_id"].as_str()),
            ("busy", booking.as_str()),
            "{gpu}"
        );
    }
    for (booking, gpu) in booked.iter().take(50) {
        let err = error(
            con,
            &[
                "GPUCACHE.BOOK",
                "eu",
                gpu,
                &format!("{booking}-x"),
                "mallory",
                "60",
            ],
        );
        assert!(
            err.starts_with("GPUBUSY") || err.starts_with("OOM"),
            "{gpu} booked twice: {err}"
        );
    }
}

/// The eviction scenario of the durability issue, scaled to CI: 3,000 GPUs, 1,000 of them
/// booked for a day; then the server is put 100 KB over `maxmemory` (how many keys does that
/// cost once healing has run?); then a flood of new registrations past the limit. Returns the
/// keys evicted for the 100 KB.
fn eviction_scenario(policy: &str) -> i64 {
    let server = Server::start(
        &["STREAM_MAXLEN", "100000"],
        &["--maxmemory-policy", policy, "--maxmemory-samples", "10"],
    );
    let mut con = server.connect();
    assert_eq!(register_many(&mut con, "g", 0, 3000), 0);
    let mut booked = BTreeMap::new();
    for i in 0..1000 {
        let (gpu, booking) = (format!("g{i}"), format!("b{i}"));
        run(
            &mut con,
            &["GPUCACHE.BOOK", "eu", &gpu, &booking, "u", "86400"],
        )
        .expect("BOOK");
        booked.insert(booking, gpu);
    }

    // 100 KB over the limit: each command evicts until the server is under it again, and the
    // healing of each evicted record must not push it over again.
    let evicted_before = info_field(&mut con, "evicted_keys");
    let used = info_field(&mut con, "used_memory");
    set_config(&mut con, "maxmemory", &(used - 100 * 1024).to_string());
    for round in 0..50 {
        let _ = run(
            &mut con,
            &["GPUCACHE.GET", "eu", &format!("g{}", 1000 + round)],
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    eventually_consistent(&mut con, "eu");
    let evicted = info_field(&mut con, "evicted_keys") - evicted_before;
    let gpus = fields(&mut con, &["GPUCACHE.STATS", "eu"])["gpus_total"].clone();
    println!("{policy}: 100 KB over maxmemory evicted {evicted} keys; {gpus} of 3000 GPUs left");
    // Healing freed more than it wrote (the stream stops growing near the limit): once it has
    // run, the server is under the limit and further commands evict nothing.
    for round in 0..50 {
        let _ = run(
            &mut con,
            &["GPUCACHE.GET", "eu", &format!("g{}", 1000 + round)],
        );
    }
    assert_eq!(
        info_field(&mut con, "evicted_keys") - evicted_before,
        evicted,
        "healing pushed the server over the limit again"
    );
    assert_bookings_intact(&mut con, &booked);

    // A flood of registrations: new idle records push old ones out, market state stays.
    let mut refused = 0;
    for chunk in 0..6 {
        refused += register_many(&mut con, "f", chunk * 500, 500);
    }
    println!("{policy}: {refused} of 3000 more registrations refused (OOM)");
    eventually_consistent(&mut con, "eu");
    assert_bookings_intact(&mut con, &booked);
    set_config(&mut con, "maxmemory", "0");
    for (booking, gpu) in booked.iter().take(20) {
        let err = error(
            &mut con,
            &[
                "GPUCACHE.BOOK",
                "eu",
                gpu,
                &format!("{booking}-y"),
                "eve",
                "60",
            ],
        );
        assert!(err.starts_with("GPUBUSY"), "{gpu} booked twice: {err}");
    }
    let stats = fields(&mut con, &["GPUCACHE.STATS", "eu"]);
    assert_eq!(stats["bookings_active"], "1000");
    assert_eq!(stats["gpus_busy"], "1000");
    assert_eq!(stats["bookings_24h"], "1000", "the 24-hour window survives");
    assert_consistent(&mut con, "eu");
    evicted
}

#[test]
fn volatile_lru_evicts_only_cached_records_and_never_a_booking() {
    let evicted = eviction_scenario("volatile-lru");
    // Redis itself evicts ~650 plain hashes of this size for 100 KB; all 2,000 idle records
    // went before healing stopped cascading.
    assert!(
        evicted <= 1400,
        "100 KB over the limit must not cascade: {evicted} keys evicted"
    );
}

#[test]
fn volatile_ttl_evicts_only_cached_records_and_never_a_booking() {
    let evicted = eviction_scenario("volatile-ttl");
    assert!(evicted <= 1400, "{evicted} keys evicted for 100 KB");
}

#[test]
fn volatile_random_evicts_only_cached_records_and_never_a_booking() {
    let evicted = eviction_scenario("volatile-random");
    assert!(evicted <= 1400, "{evicted} keys evicted for 100 KB");
}

#[test]
fn an_allkeys_policy_is_reported_and_refuses_bookings_unless_the_risk_is_accepted() {
    // The log file lands in the server's --dir.
    let server = Server::start(
        &[],
        &[
            "--maxmemory-policy",
            "allkeys-lru",
            "--logfile",
            "redis.log",
        ],
    );
    let mut con = server.connect();
    seed(&mut con);
    assert_eq!(info_field(&mut con, "gpucache_eviction_policy_safe"), 0);
    let log = || std::fs::read_to_string(server.dir.join("redis.log")).unwrap_or_default();
    assert!(
        log().contains("maxmemory-policy allkeys-lru can evict bookings"),
        "the log says so at load"
    );
    let before = snapshot(&mut con);
    let err = error(
        &mut con,
        &["GPUCACHE.BOOK", "eu", "g1", "b1", "alice", "3600"],
    );
    assert!(err.starts_with("EVICTIONRISK"), "{err}");
    assert!(err.contains("allkeys-lru"), "{err}");
    assert_same_state(&snapshot(&mut con), &before, "a refused booking");
    let check = run(&mut con, &["GPUCACHE.CHECK", "eu"]).unwrap();
    let check = as_map(&check);
    assert_eq!(text(&check["ok"]), "1", "the region itself is consistent");
    let Value::Array(warnings) = &check["warnings"] else {
        panic!("CHECK has no warnings: {check:?}")
    };
    assert!(
        warnings.iter().any(|w| text(w).contains("allkeys-lru")),
        "{warnings:?}"
    );

    // The operator accepts the risk: bookings go through, the warning stays.
    set_config(&mut con, "gpucache.accept-eviction-risk", "yes");
    assert_eq!(info_field(&mut con, "gpucache_accept_eviction_risk"), 1);
    fields(
        &mut con,
        &["GPUCACHE.BOOK", "eu", "g1", "b1", "alice", "3600"],
    );
    set_config(&mut con, "gpucache.accept-eviction-risk", "no");

    // A safe policy, set at run time, is seen at once; so is going back to an unsafe one.
    set_config(&mut con, "maxmemory-policy", "volatile-lru");
    assert_eq!(info_field(&mut con, "gpucache_eviction_policy_safe"), 1);
    fields(
        &mut con,
        &["GPUCACHE.BOOK", "eu", "g2", "b2", "bob", "3600"],
    );
    let check = run(&mut con, &["GPUCACHE.CHECK", "eu"]).unwrap();
    assert_eq!(as_map(&check)["warnings"], Value::Array(vec![]));
    set_config(&mut con, "maxmemory-policy", "allkeys-lfu");
    let err = error(
        &mut con,
        &["GPUCACHE.BOOK", "eu", "g3", "b3", "carol", "3600"],
    );
    assert!(err.starts_with("EVICTIONRISK"), "{err}");
    assert!(
        log().contains("maxmemory-policy allkeys-lfu can evict bookings"),
        "the log says so when the policy changes"
    );
    // Cancelling is never refused: it frees market state.
    fields(&mut con, &["GPUCACHE.CANCEL", "eu", "b2"]);
    assert_consistent(&mut con, "eu");
}

#[test]
fn the_accepted_risk_can_be_a_load_argument() {
    let server = Server::start(
        &["ACCEPT_EVICTION_RISK", "yes"],
        &["--maxmemory-policy", "allkeys-random"],
    );
    let mut con = server.connect();
    seed(&mut con);
    fields(
        &mut con,
        &["GPUCACHE.BOOK", "eu", "g1", "b1", "alice", "3600"],
    );
    assert_eq!(info_field(&mut con, "gpucache_eviction_policy_safe"), 0);
}

#[test]
fn lost_market_counters_refuse_writes_until_a_queued_repair_restores_them() {
    let server = Server::start(&[], &[]);
    let mut con = server.connect();
    seed(&mut con);
    fields(
        &mut con,
        &["GPUCACHE.BOOK", "eu", "g2", "b1", "alice", "3600"],
    );
    let price_before = fields(&mut con, &["GPUCACHE.GET", "eu", "g1"])["price"].clone();
    let version_before: i64 = fields(&mut con, &["GPUCACHE.GET", "eu", "g1"])["version"]
        .parse()
        .unwrap();
    redis::cmd("DEL")
        .arg("gpucache:{eu}:stats:market")
        .query::<()>(&mut con)
        .unwrap();
    // A write on top of lost counters would charge the wrong demand multiplier and restart
    // the sequence: it is refused, and the region repairs itself.
    let err = error(&mut con, &["GPUCACHE.BOOK", "eu", "g1", "b2", "bob", "60"]);
    assert!(err.starts_with("CORRUPT"), "{err}");
    eventually(
        "the queued repair restored the counters",
        Duration::from_secs(10),
        || run(&mut con, &["GPUCACHE.BOOK", "eu", "g1", "b2", "bob", "60"]).is_ok(),
    );
    assert_consistent(&mut con, "eu");
    let g1 = fields(&mut con, &["GPUCACHE.GET", "eu", "g1"]);
    assert!(g1["version"].parse::<i64>().unwrap() > version_before);
    assert_eq!(g1["booking_price"], price_before);
    let stats = fields(&mut con, &["GPUCACHE.STATS", "eu"]);
    assert_eq!(
        (
            stats["gpus_busy"].as_str(),
            stats["bookings_active"].as_str()
        ),
        ("2", "2")
    );
}

/// A region with every kind of market state: own and type prices (set in both orders), two
/// bookings, a provider offline, a GPU in maintenance, a 24-hour window.
fn rich_region(con: &mut Connection) {
    seed(con);
    run(
        con,
        &[
            "GPUCACHE.REGISTER",
            "eu",
            "g5",
            "PROVIDER",
            "p1",
            "TYPE",
            "A100",
            "PRICE",
            "3",
            "SCORE",
            "5",
        ],
    )
    .unwrap();
    register(con, "eu", "g6", "p3", "H100", "6");
    run(con, &["GPUCACHE.PRICE", "eu", "A100", "2"]).unwrap();
    register(con, "eu", "g7", "p1", "A100", "1.75");
    fields(con, &["GPUCACHE.BOOK", "eu", "g1", "b1", "alice", "3600"]);
    fields(con, &["GPUCACHE.BOOK", "eu", "g4", "b2", "bob", "7200"]);
    run(con, &["GPUCACHE.PROVIDER", "eu", "p2", "offline"]).unwrap();
    run(con, &["GPUCACHE.STATUS", "eu", "g6", "maintenance"]).unwrap();
    assert_consistent(con, "eu");
}

/// What the region shows from outside.
#[derive(Debug, PartialEq)]
struct Shown {
    gpus: BTreeMap<String, (String, String, String)>,
    versions: BTreeMap<String, i64>,
    stats: Vec<(String, String)>,
    available: Vec<String>,
}

fn shown(con: &mut Connection) -> Shown {
    let mut gpus = BTreeMap::new();
    let mut versions = BTreeMap::new();
    for id in ["g1", "g2", "g3", "g4", "g5", "g6", "g7"] {
        let gpu = fields(con, &["GPUCACHE.GET", "eu", id]);
        let booking = format!(
            "{}/{}",
            gpu["booking_id"],
            gpu.get("booking_user").cloned().unwrap_or_default()
        );
        // A booked GPU's own price is only known to its record (rebuilt ones show a placeholder
        // until registered again); what it charges is its booking's.
        let price = if gpu["status"] == "busy" {
            gpu["booking_price"].clone()
        } else {
            gpu["price"].clone()
        };
        gpus.insert(id.to_owned(), (gpu["status"].clone(), price, booking));
        versions.insert(id.to_owned(), gpu["version"].parse().unwrap());
    }
    let all = fields(con, &["GPUCACHE.STATS", "eu"]);
    let stats = [
        "gpus_total",
        "gpus_available",
        "gpus_busy",
        "gpus_offline",
        "gpus_maintenance",
        "gpus_listed",
        "bookings_active",
        "bookings_24h",
        "volume_24h",
    ]
    .iter()
    .map(|f| (f.to_string(), all[*f].clone()))
    .collect();
    Shown {
        gpus,
        versions,
        stats,
        available: available_ids(con, &["eu"]),
    }
}

/// After `damage`, REPAIR leaves a region that CHECK finds clean, that shows what it showed
/// before, whose versions did not go backwards, and where the price set last still wins.
fn repaired_after(con: &mut Connection, what: &str, damage: &dyn Fn(&mut Connection)) {
    redis::cmd("FLUSHALL").query::<()>(con).unwrap();
    rich_region(con);
    let before = shown(con);
    damage(con);
    let report =
        run(con, &["GPUCACHE.REPAIR", "eu"]).unwrap_or_else(|e| panic!("{what}: REPAIR: {e}"));
    let check = run(con, &["GPUCACHE.CHECK", "eu"]).unwrap();
    assert_eq!(
        text(&as_map(&check)["ok"]),
        "1",
        "{what}: CHECK after REPAIR: {:?}\nrepairs: {:?}",
        as_map(&check)["violations"],
        as_map(&report)["repairs"]
    );
    let after = shown(con);
    assert_eq!(after.gpus, before.gpus, "{what}: GPUs");
    assert_eq!(after.stats, before.stats, "{what}: statistics");
    assert_eq!(after.available, before.available, "{what}: search");
    for (id, version) in &before.versions {
        assert!(
            after.versions[id] >= *version,
            "{what}: version of {id} went back"
        );
    }
    let newest = *before.versions.values().max().unwrap();
    let fresh = fields(
        con,
        &[
            "GPUCACHE.REGISTER",
            "eu",
            "g8",
            "PROVIDER",
            "p1",
            "TYPE",
            "A100",
            "PRICE",
            "1.5",
        ],
    );
    assert!(
        fresh["version"].parse::<i64>().unwrap() > newest,
        "{what}: a version was reissued"
    );
    // The price set last wins: a type price now beats every own price set before it...
    let priced = fields(con, &["GPUCACHE.PRICE", "eu", "A100", "9"]);
    assert!(priced["version"].parse::<i64>().unwrap() > newest, "{what}");
    for id in ["g2", "g5", "g7", "g8"] {
        assert_eq!(
            fields(con, &["GPUCACHE.GET", "eu", id])["price"],
            "9",
            "{what}: {id}"
        );
    }
    // ...and an own price set after it beats the type price.
    register(con, "eu", "g7", "p1", "A100", "1.1");
    assert_eq!(
        fields(con, &["GPUCACHE.GET", "eu", "g7"])["price"],
        "1.1",
        "{what}"
    );
    // The bookings still work as bookings.
    fields(con, &["GPUCACHE.CANCEL", "eu", "b2"]);
    assert!(
        error(con, &["GPUCACHE.BOOK", "eu", "g1", "bx", "mallory", "60"]).starts_with("GPUBUSY")
    );
    assert_consistent(con, "eu");
}

fn cmd(con: &mut Connection, args: &[&str]) {
    run(con, args).unwrap_or_else(|e| panic!("{args:?}: {e}"));
}

/// Every market-state key family, deleted and overwritten with garbage in turn.
const MARKET_STATE: [&str; 14] = [
    "gpucache:{eu}:index:gpus",
    "gpucache:{eu}:index:types",
    "gpucache:{eu}:index:providers",
    "gpucache:{eu}:index:bookings",
    "gpucache:{eu}:index:booking-ends",
    "gpucache:{eu}:stats:market",
    "gpucache:{eu}:stats:24h",
    "gpucache:{eu}:avail-own:A100",
    "gpucache:{eu}:avail-type:A100",
    "gpucache:{eu}:avail-score:A100",
    "gpucache:{eu}:provider-gpus:p1",
    "gpucache:{eu}:provider:p2",
    "gpucache:{eu}:booking:b1",
    "gpucache:{eu}:gpu:g1",
];

#[test]
fn any_lost_market_state_key_is_repaired_and_nothing_goes_back() {
    let server = Server::start(&[], &[]);
    let mut con = server.connect();
    for key in MARKET_STATE.iter().chain(["gpucache:{eu}:events"].iter()) {
        repaired_after(&mut con, &format!("DEL {key}"), &|con| {
            cmd(con, &["DEL", key])
        });
        repaired_after(&mut con, &format!("SET {key}"), &|con| {
            cmd(con, &["DEL", key]);
            cmd(con, &["SET", key, "garbage"]);
        });
    }
    // Every way to find GPUs lost at once but a booking (which names its GPU's type and
    // provider) and the event stream (which names every type and provider): one REPAIR finds
    // them all, a GPU in maintenance of a provider nothing else names (g6) included.
    repaired_after(&mut con, "DEL of the registries, the sets and g1", &|con| {
        cmd(
            con,
            &[
                "DEL",
                "gpucache:{eu}:index:gpus",
                "gpucache:{eu}:index:types",
                "gpucache:{eu}:index:providers",
                "gpucache:{eu}:gpu:g1",
            ],
        )
    });
}

#[test]
fn garbled_fields_of_market_state_are_repaired() {
    let server = Server::start(&[], &[]);
    let mut con = server.connect();
    for (key, field, value) in [
        ("gpucache:{eu}:stats:market", "gpus:available", "abc"),
        ("gpucache:{eu}:stats:market", "seq", "abc"),
        ("gpucache:{eu}:stats:market", "type-total:A100", "-7"),
        ("gpucache:{eu}:stats:market", "bookings:created", "x"),
        ("gpucache:{eu}:index:gpus", "g5", "nonsense"),
        ("gpucache:{eu}:index:gpus", "g1", "available A100 p1"),
        ("gpucache:{eu}:index:bookings", "b1", "g9"),
        ("gpucache:{eu}:booking:b1", "end_ms", "soon"),
        ("gpucache:{eu}:gpu:g1", "version", "v"),
        ("gpucache:{eu}:gpu:g1", "booking_user", "mallory"),
        ("gpucache:{eu}:gpu:g4", "status", "available"),
        ("gpucache:{eu}:stats:24h", "count:1", "abc"),
        ("gpucache:{eu}:provider:p2", "status", "sleepy"),
        // Sequences and versions beyond any gpucache issues (2^53): taken as they are, the
        // sequence would stop growing at the largest integer. (A type price with one is
        // dropped, as any garbled type price: it is a cached record.)
        ("gpucache:{eu}:stats:market", "seq", "9223372036854775807"),
        ("gpucache:{eu}:gpu:g1", "version", "9223372036854775807"),
        ("gpucache:{eu}:gpu:g1", "price_seq", "9223372036854775807"),
        (
            "gpucache:{eu}:provider:p2",
            "version",
            "9223372036854775807",
        ),
    ] {
        repaired_after(&mut con, &format!("HSET {key} {field} {value}"), &|con| {
            cmd(con, &["HSET", key, field, value]);
        });
    }
    // Every availability index of a type at once: the providers that were never set stay
    // online (their GPUs are listed again), the one that was set offline stays offline.
    repaired_after(&mut con, "every A100 index", &|con| {
        cmd(
            con,
            &[
                "DEL",
                "gpucache:{eu}:avail-own:A100",
                "gpucache:{eu}:avail-type:A100",
                "gpucache:{eu}:avail-score:A100",
            ],
        );
    });
    repaired_after(&mut con, "HDEL seq", &|con| {
        cmd(con, &["HDEL", "gpucache:{eu}:stats:market", "seq"]);
    });
    repaired_after(&mut con, "a TTL on market state", &|con| {
        for key in MARKET_STATE {
            let _ = run(con, &["PEXPIRE", key, "600000"]);
        }
    });
}

/// A region written by the version that gave bookings TTLs (no booking clock, no copies, TTLs
/// on the booking and its GPU) is taken over after a restart: the sweep after loading sees the
/// booking clock does not hold every booking and repairs the region whole.
#[test]
fn bookings_of_an_earlier_version_are_adopted_after_a_restart() {
    let server = Server::start(&[], &[]);
    let mut con = server.connect();
    seed(&mut con);
    let booked = fields(
        &mut con,
        &["GPUCACHE.BOOK", "eu", "g1", "b1", "alice", "3600"],
    );
    // What the earlier version wrote.
    for args in [
        vec!["DEL", "gpucache:{eu}:index:booking-ends"],
        vec![
            "HDEL",
            "gpucache:{eu}:gpu:g1",
            "booking_user",
            "booking_price",
            "booking_duration_s",
            "booking_start_ms",
            "booking_end_ms",
        ],
        vec!["HDEL", "gpucache:{eu}:booking:b1", "gpu_type", "provider"],
        vec!["PEXPIREAT", "gpucache:{eu}:booking:b1", &booked["end_ms"]],
        vec!["PEXPIRE", "gpucache:{eu}:gpu:g1", "7200000"],
        vec!["PEXPIRE", "gpucache:{eu}:stats:24h", "86400000"],
        vec!["SAVE"],
    ] {
        run(&mut con, &args).unwrap();
    }
    drop(con);
    let dir = server.stop();
    let restarted = Server::start_in(dir, free_port(), &[], &[]);
    let mut con = restarted.connect();
    eventually_consistent(&mut con, "eu");
    for key in [
        "gpucache:{eu}:booking:b1",
        "gpucache:{eu}:gpu:g1",
        "gpucache:{eu}:stats:24h",
    ] {
        let ttl: i64 = redis::cmd("PTTL").arg(key).query(&mut con).unwrap();
        assert_eq!(ttl, -1, "{key} is market state: no TTL");
    }
    let end: Option<String> = redis::cmd("ZSCORE")
        .arg("gpucache:{eu}:index:booking-ends")
        .arg("b1")
        .query(&mut con)
        .unwrap();
    assert_eq!(end.as_deref(), Some(booked["end_ms"].as_str()));
    let gpu = fields(&mut con, &["GPUCACHE.GET", "eu", "g1"]);
    assert_eq!(
        (gpu["booking_user"].as_str(), gpu["booking_end_ms"].as_str()),
        ("alice", booked["end_ms"].as_str()),
        "the GPU keeps a copy of its booking again"
    );
    assert!(info_field(&mut con, "gpucache_region_repairs") >= 1);
}

/// A booking whose record was deleted by hand is rebuilt before its id is used again: the same
/// id for another GPU is refused, the same request is answered `existing`, and no GPU is left
/// holding a booking that names another.
#[test]
fn a_booking_id_whose_record_vanished_is_not_taken_over() {
    let server = Server::start(&[], &[]);
    let mut con = server.connect();
    seed(&mut con);
    fields(&mut con, &["GPUCACHE.BOOK", "eu", "g1", "b1", "u", "600"]);
    cmd(&mut con, &["DEL", "gpucache:{eu}:booking:b1"]);
    let err = error(&mut con, &["GPUCACHE.BOOK", "eu", "g2", "b1", "u", "600"]);
    assert!(err.starts_with("BOOKINGEXISTS"), "{err}");
    assert_consistent(&mut con, "eu");
    cmd(&mut con, &["DEL", "gpucache:{eu}:booking:b1"]);
    let again = fields(&mut con, &["GPUCACHE.BOOK", "eu", "g1", "b1", "u", "600"]);
    assert_eq!(again["result"], "existing");
    assert_consistent(&mut con, "eu");
    assert_eq!(
        fields(&mut con, &["GPUCACHE.CANCEL", "eu", "b1"])["gpu_status"],
        "available"
    );
    assert_consistent(&mut con, "eu");
}

/// Two GPU records holding one booking: CHECK sees it, and REPAIR releases the one the booking
/// does not name.
#[test]
fn a_gpu_holding_another_gpus_booking_is_found_and_released() {
    let server = Server::start(&[], &[]);
    let mut con = server.connect();
    seed(&mut con);
    fields(&mut con, &["GPUCACHE.BOOK", "eu", "g1", "b1", "u", "600"]);
    cmd(
        &mut con,
        &[
            "HSET",
            "gpucache:{eu}:gpu:g2",
            "status",
            "busy",
            "booking",
            "b1",
        ],
    );
    let check = run(&mut con, &["GPUCACHE.CHECK", "eu"]).unwrap();
    let check = as_map(&check);
    assert_eq!(text(&check["ok"]), "0");
    assert!(
        format!("{:?}", check["violations"]).contains("g2 holds booking b1, which is for g1"),
        "{:?}",
        check["violations"]
    );
    fields(&mut con, &["GPUCACHE.REPAIR", "eu"]);
    assert_consistent(&mut con, "eu");
    let g2 = fields(&mut con, &["GPUCACHE.GET", "eu", "g2"]);
    assert_eq!(
        (g2["status"].as_str(), g2["booking_id"].as_str()),
        ("available", "(nil)")
    );
    let g1 = fields(&mut con, &["GPUCACHE.GET", "eu", "g1"]);
    assert_eq!(g1["booking_id"], "b1");
}

/// Another client's non-text names in gpucache's indexes: the booking clock drops one from its
/// index (instead of queueing a repair every second), and REPAIR removes the rest as stored.
#[test]
fn names_that_are_not_text_are_removed_not_looped_on() {
    let server = Server::start(&[], &[]);
    let mut con = server.connect();
    seed(&mut con);
    fields(&mut con, &["GPUCACHE.BOOK", "eu", "g1", "b1", "u", "3600"]);
    let garbage: &[u8] = b"\xff\xfe";
    redis::cmd("ZADD")
        .arg("gpucache:{eu}:index:booking-ends")
        .arg(0)
        .arg(garbage)
        .query::<()>(&mut con)
        .unwrap();
    // Another client's ZADD raises no event the clock follows: it sees the member on its full
    // look at every region, every 10 s, so the wait covers two of those on a loaded machine.
    eventually(
        "the clock dropped the member",
        Duration::from_secs(30),
        || {
            let n: i64 = redis::cmd("ZCARD")
                .arg("gpucache:{eu}:index:booking-ends")
                .query(&mut con)
                .unwrap();
            n == 1
        },
    );
    assert_eq!(info_field(&mut con, "gpucache_region_repairs"), 0);
    for (command, key) in [
        ("SADD", "gpucache:{eu}:provider-gpus:p1"),
        ("ZADD", "gpucache:{eu}:avail-own:A100"),
        ("HSET", "gpucache:{eu}:index:gpus"),
    ] {
        let mut cmd = redis::cmd(command);
        cmd.arg(key);
        match command {
            "ZADD" => cmd.arg(1).arg(garbage),
            "HSET" => cmd.arg(garbage).arg("available A100 p1"),
            _ => cmd.arg(garbage),
        };
        cmd.query::<()>(&mut con).unwrap();
    }
    let check = run(&mut con, &["GPUCACHE.CHECK", "eu"]).unwrap();
    assert_eq!(text(&as_map(&check)["ok"]), "0");
    fields(&mut con, &["GPUCACHE.REPAIR", "eu"]);
    assert_consistent(&mut con, "eu");
    assert_eq!(
        fields(&mut con, &["GPUCACHE.GET", "eu", "g1"])["booking_id"],
        "b1"
    );
}

/// A GPU record that claims another GPU's booking does not cost its own booking anything:
/// REPAIR gives each booking back its GPU and drops none.
#[test]
fn a_wrong_claim_on_a_gpu_does_not_end_the_booking_that_holds_it() {
    let server = Server::start(&[], &[]);
    let mut con = server.connect();
    seed(&mut con);
    fields(
        &mut con,
        &["GPUCACHE.BOOK", "eu", "g1", "b1", "alice", "3600"],
    );
    fields(
        &mut con,
        &["GPUCACHE.BOOK", "eu", "g2", "b2", "bob", "3600"],
    );
    // g1's record now claims b2, whose record names g2 (which holds it).
    cmd(
        &mut con,
        &[
            "HSET",
            "gpucache:{eu}:gpu:g1",
            "booking",
            "b2",
            "booking_user",
            "bob",
        ],
    );
    let report = fields(&mut con, &["GPUCACHE.REPAIR", "eu"]);
    assert_eq!(report["bookings"], "0", "no booking dropped");
    assert_consistent(&mut con, "eu");
    for (gpu, booking, user) in [("g1", "b1", "alice"), ("g2", "b2", "bob")] {
        let record = fields(&mut con, &["GPUCACHE.GET", "eu", gpu]);
        assert_eq!(
            (
                record["booking_id"].as_str(),
                record["booking_user"].as_str()
            ),
            (booking, user)
        );
    }
    let stats = fields(&mut con, &["GPUCACHE.STATS", "eu"]);
    assert_eq!(stats["bookings_active"], "2");
}

/// The events of a repair: a booking that loses its GPU to the one holding it is announced as
/// cancelled (`conflict`), and a type whose index the repair changed gets its order-book event.
#[test]
fn a_repair_announces_what_it_changed() {
    let server = Server::start(&[], &[]);
    let mut con = server.connect();
    seed(&mut con);
    let booked = fields(
        &mut con,
        &["GPUCACHE.BOOK", "eu", "g1", "b1", "alice", "3600"],
    );
    // A second booking naming g1, written by hand.
    cmd(
        &mut con,
        &[
            "HSET",
            "gpucache:{eu}:booking:b9",
            "gpu",
            "g1",
            "user",
            "eve",
            "price",
            "1",
            "duration_s",
            "3600",
            "start_ms",
            &booked["start_ms"],
            "end_ms",
            &booked["end_ms"],
        ],
    );
    cmd(
        &mut con,
        &["HSET", "gpucache:{eu}:index:bookings", "b9", "g1"],
    );
    cmd(&mut con, &["DEL", "gpucache:{eu}:avail-own:A100"]);
    let last_id: Vec<(String, Vec<(String, String)>)> = redis::cmd("XREVRANGE")
        .arg("gpucache:{eu}:events")
        .arg("+")
        .arg("-")
        .arg("COUNT")
        .arg(1)
        .query(&mut con)
        .unwrap();
    let report = fields(&mut con, &["GPUCACHE.REPAIR", "eu"]);
    assert_eq!(report["bookings"], "1");
    assert_consistent(&mut con, "eu");
    let events: Vec<(String, Vec<(String, String)>)> = redis::cmd("XRANGE")
        .arg("gpucache:{eu}:events")
        .arg(format!("({}", last_id[0].0))
        .arg("+")
        .query(&mut con)
        .unwrap();
    let payloads: Vec<String> = events
        .iter()
        .filter_map(|(_, f)| {
            f.iter()
                .find(|(k, _)| k == "payload")
                .map(|(_, v)| v.clone())
        })
        .collect();
    assert!(
        payloads.iter().any(|p| p.contains("\"booking_cancelled\"")
            && p.contains("\"reason\":\"conflict\"")
            && p.contains("\"booking_id\":\"b9\"")),
        "{payloads:?}"
    );
    assert!(
        payloads
            .iter()
            .any(|p| p.contains("\"order_book_updated\"") && p.contains("\"gpu_type\":\"A100\"")),
        "{payloads:?}"
    );
    assert!(
        payloads
            .iter()
            .any(|p| p.contains("\"manual_invalidation\"") && p.contains("\"reason\":\"repaired\"")),
        "{payloads:?}"
    );
    assert_eq!(
        fields(&mut con, &["GPUCACHE.STATS", "eu"])["bookings_cancelled"],
        "1"
    );
    assert_eq!(
        fields(&mut con, &["GPUCACHE.GET", "eu", "g1"])["booking_id"],
        "b1"
    );
}

/// A region whose GPUs have all gone, with its counters and stream lost too: REPAIR writes the
/// counters anew, so writes are no longer refused.
#[test]
fn counters_lost_in_an_empty_region_are_written_anew() {
    let server = Server::start(&["AVAILABILITY_TTL", "1", "JITTER", "0"], &[]);
    let mut con = server.connect();
    register(&mut con, "eu", "g1", "p1", "A100", "2");
    eventually("g1 expired and healed", Duration::from_secs(10), || {
        let n: i64 = redis::cmd("HLEN")
            .arg("gpucache:{eu}:index:gpus")
            .query(&mut con)
            .unwrap();
        n == 0
    });
    cmd(
        &mut con,
        &["DEL", "gpucache:{eu}:stats:market", "gpucache:{eu}:events"],
    );
    let register_g2 = [
        "GPUCACHE.REGISTER",
        "eu",
        "g2",
        "PROVIDER",
        "p1",
        "TYPE",
        "A100",
        "PRICE",
        "1",
    ];
    let err = error(&mut con, &register_g2);
    assert!(err.starts_with("CORRUPT"), "{err}");
    eventually(
        "a write goes through again",
        Duration::from_secs(10),
        || run(&mut con, &register_g2).is_ok(),
    );
    assert_consistent(&mut con, "eu");
}

/// Another client's stream entries: a `seq` and a version beyond any gpucache issues are not
/// taken up by a repair, and an id at the very end of the id space (no entry can follow it)
/// is noticed by the first event it refuses: the module repairs the region itself, and events
/// are appended again.
#[test]
fn a_stream_given_ids_and_versions_from_elsewhere_is_set_right() {
    let server = Server::start(&[], &[]);
    let mut con = server.connect();
    rich_region(&mut con);
    let events = "gpucache:{eu}:events";
    cmd(
        &mut con,
        &[
            "XADD",
            events,
            "*",
            "seq",
            "9223372036854775807",
            "payload",
            r#"{"version":9223372036854775807}"#,
        ],
    );
    cmd(&mut con, &["HDEL", "gpucache:{eu}:stats:market", "seq"]);
    run(&mut con, &["GPUCACHE.REPAIR", "eu"]).unwrap();
    assert_consistent(&mut con, "eu");
    let fresh = fields(
        &mut con,
        &[
            "GPUCACHE.REGISTER",
            "eu",
            "g8",
            "PROVIDER",
            "p1",
            "TYPE",
            "A100",
            "PRICE",
            "1.5",
        ],
    );
    let version: i64 = fresh["version"].parse().unwrap();
    assert!(
        version < 1 << 53,
        "the sequence took up a foreign seq: {version}"
    );
    let again = fields(
        &mut con,
        &[
            "GPUCACHE.REGISTER",
            "eu",
            "g8",
            "PROVIDER",
            "p1",
            "TYPE",
            "A100",
            "PRICE",
            "1.6",
        ],
    );
    assert!(
        again["version"].parse::<i64>().unwrap() > version,
        "the sequence still grows"
    );

    cmd(
        &mut con,
        &[
            "XADD",
            events,
            "18446744073709551615-18446744073709551615",
            "a",
            "b",
        ],
    );
    fields(
        &mut con,
        &["GPUCACHE.BOOK", "eu", "g2", "b9", "carol", "60"],
    );
    eventually_consistent(&mut con, "eu");
    let newest: Vec<(String, Vec<(String, String)>)> = redis::cmd("XREVRANGE")
        .arg(events)
        .arg("+")
        .arg("-")
        .arg("COUNT")
        .arg(1)
        .query(&mut con)
        .unwrap();
    let newest_ms: u64 = newest[0].0.split('-').next().unwrap().parse().unwrap();
    assert!(
        newest_ms < 4_000_000_000_000,
        "the id from the end of time is gone"
    );
    let before: i64 = redis::cmd("XLEN").arg(events).query(&mut con).unwrap();
    fields(&mut con, &["GPUCACHE.CANCEL", "eu", "b9"]);
    let after: i64 = redis::cmd("XLEN").arg(events).query(&mut con).unwrap();
    assert!(after > before, "events are appended again");
    assert!(info_field(&mut con, "gpucache_region_repairs") >= 1);
}

/// A negative count in the 24-hour window is another hand's (counts only grow from 0): a
/// repair drops it even when the event stream, replaced by another type, cannot say what the
/// count should be — left alone, the next booking would count 0 (found by the foreign-writes
/// hostile test).
#[test]
fn a_negative_window_count_is_dropped_by_a_repair() {
    let server = Server::start(&[], &[]);
    let mut con = server.connect();
    rich_region(&mut con);
    let window: BTreeMap<String, String> = redis::cmd("HGETALL")
        .arg("gpucache:{eu}:stats:24h")
        .query(&mut con)
        .unwrap();
    let count_field = window
        .keys()
        .find(|f| f.starts_with("count:"))
        .expect("the window counts this bucket's bookings")
        .clone();
    cmd(
        &mut con,
        &["HSET", "gpucache:{eu}:stats:24h", &count_field, "-1"],
    );
    cmd(
        &mut con,
        &["RENAME", "gpucache:{eu}:index:gpus", "gpucache:{eu}:events"],
    );
    run(&mut con, &["GPUCACHE.REPAIR", "eu"]).unwrap();
    assert_consistent(&mut con, "eu");
    fields(
        &mut con,
        &["GPUCACHE.BOOK", "eu", "g2", "b9", "carol", "60"],
    );
    assert_consistent(&mut con, "eu");
}

/// The only GPU of a type gone with the registry, the type set and the event stream: the
/// counters, which count GPUs per type, still lead one REPAIR to that type's indexes (found
/// by the foreign-writes hostile test: its stale index entries outlived the first REPAIR).
#[test]
fn a_type_only_the_counters_still_name_is_repaired_in_one_pass() {
    let server = Server::start(&[], &[]);
    let mut con = server.connect();
    seed(&mut con);
    fields(&mut con, &["GPUCACHE.BOOK", "eu", "g1", "b1", "u1", "600"]);
    cmd(&mut con, &["DEL", "gpucache:{eu}:index:gpus"]);
    cmd(
        &mut con,
        &["RENAME", "gpucache:{eu}:gpu:g4", "gpucache:{eu}:events"],
    );
    cmd(
        &mut con,
        &[
            "RENAME",
            "gpucache:{eu}:index:types",
            "gpucache:{eu}:gpu:g1",
        ],
    );
    run(&mut con, &["GPUCACHE.REPAIR", "eu"]).unwrap();
    assert_consistent(&mut con, "eu");
    assert!(available_ids(&mut con, &["eu", "TYPE", "H100"]).is_empty());
}

/// A record, booking or registry entry naming a type, provider, booking or user with a name
/// gpucache never accepts (a space, say, which would split a registry entry) reads as garbled:
/// one REPAIR leaves the region clean (found by the foreign-writes hostile test: the name was
/// copied into the registry and the provider set, and CHECK then read it as another name).
#[test]
fn names_gpucache_never_accepts_in_records_are_garbage() {
    let server = Server::start(&[], &[]);
    let mut con = server.connect();
    for (key, field, value) in [
        ("gpucache:{eu}:gpu:g2", "provider", "available A100"),
        ("gpucache:{eu}:gpu:g3", "type", "A100 p2"),
        ("gpucache:{eu}:gpu:g1", "provider", "p1 b1"),
        ("gpucache:{eu}:gpu:g1", "booking_user", "alice\u{0}"),
        ("gpucache:{eu}:booking:b1", "gpu_type", "A{100}"),
        ("gpucache:{eu}:booking:b2", "user_id", "bob smith"),
        ("gpucache:{eu}:index:gpus", "g5", "available A100 p1 b 7"),
    ] {
        redis::cmd("FLUSHALL").query::<()>(&mut con).unwrap();
        rich_region(&mut con);
        cmd(&mut con, &["HSET", key, field, value]);
        run(&mut con, &["GPUCACHE.REPAIR", "eu"])
            .unwrap_or_else(|e| panic!("HSET {key} {field}: REPAIR: {e}"));
        let check = run(&mut con, &["GPUCACHE.CHECK", "eu"]).unwrap();
        assert_eq!(
            text(&as_map(&check)["ok"]),
            "1",
            "HSET {key} {field} {value:?}: CHECK after one REPAIR: {:?}",
            as_map(&check)["violations"]
        );
        // Bookings are market state: both survive.
        for booking in ["b1", "b2"] {
            let key = format!("gpucache:{{eu}}:booking:{booking}");
            let exists: i64 = redis::cmd("EXISTS").arg(&key).query(&mut con).unwrap();
            assert_eq!(exists, 1, "HSET {key} {field}: {booking} lost");
        }
    }
}
