//! Jittered TTLs, and index healing once records expire.

mod common;

use common::*;
use std::time::Duration;

#[test]
fn ttls_fall_inside_the_jitter_window_and_are_spread() {
    let server = Server::start(&["AVAILABILITY_TTL", "300", "JITTER", "10"], &[]);
    let mut con = server.connect();
    let mut ttls = Vec::new();
    for i in 0..50 {
        let id = format!("g{i}");
        register(&mut con, "eu", &id, "p", "T", "1");
        let ttl: i64 = redis::cmd("PTTL")
            .arg(format!("gpucache:{{eu}}:gpu:{id}"))
            .query(&mut con)
            .unwrap();
        assert!(
            (269_000..=330_000).contains(&ttl),
            "{ttl} outside 300s ± 10%"
        );
        ttls.push(ttl);
    }
    let spread = ttls.iter().max().unwrap() - ttls.iter().min().unwrap();
    assert!(
        spread > 10_000,
        "50 draws should spread over the window, spread {spread} ms"
    );

    run(&mut con, &["GPUCACHE.PRICE", "eu", "T", "2"]).unwrap();
    let ttl: i64 = redis::cmd("PTTL")
        .arg("gpucache:{eu}:price:T")
        .query(&mut con)
        .unwrap();
    assert!(
        (539_000..=660_000).contains(&ttl),
        "pricing TTL {ttl} outside 600s ± 10%"
    );
}

#[test]
fn every_change_re_draws_the_gpu_ttl() {
    let server = Server::start(&["AVAILABILITY_TTL", "1000", "JITTER", "50"], &[]);
    let mut con = server.connect();
    seed(&mut con);
    let mut expiries = std::collections::BTreeSet::new();
    for status in ["offline", "available", "maintenance", "available"] {
        run(&mut con, &["GPUCACHE.STATUS", "eu", "g1", status]).unwrap();
        let at: i64 = redis::cmd("PEXPIRETIME")
            .arg("gpucache:{eu}:gpu:g1")
            .query(&mut con)
            .unwrap();
        expiries.insert(at);
    }
    assert!(
        expiries.len() >= 3,
        "the expiry moves on each change: {expiries:?}"
    );
}

#[test]
fn an_expired_gpu_disappears_from_reads_and_indexes() {
    let server = Server::start(&["AVAILABILITY_TTL", "1", "JITTER", "0"], &[]);
    let mut con = server.connect();
    seed(&mut con);
    assert_eq!(
        fields(&mut con, &["GPUCACHE.STATS", "eu"])["gpus_total"],
        "4"
    );
    eventually(
        "registry emptied by healing",
        Duration::from_secs(10),
        || {
            let n: i64 = redis::cmd("HLEN")
                .arg("gpucache:{eu}:index:gpus")
                .query(&mut con)
                .unwrap();
            n == 0
        },
    );
    assert!(available_ids(&mut con, &["eu"]).is_empty());
    assert!(error(&mut con, &["GPUCACHE.GET", "eu", "g1"]).starts_with("NOGPU"));
    let stats = fields(&mut con, &["GPUCACHE.STATS", "eu"]);
    assert_eq!(stats["gpus_total"], "0");
    assert_eq!(stats["gpus_available"], "0");
    assert_eq!(stats["gpus_listed"], "0");
    let leftovers: Vec<String> = redis::cmd("KEYS")
        .arg("gpucache:{eu}:avail-*")
        .query(&mut con)
        .unwrap();
    assert!(leftovers.is_empty(), "{leftovers:?}");
    let provider_gpus: i64 = redis::cmd("SCARD")
        .arg("gpucache:{eu}:provider-gpus:p1")
        .query(&mut con)
        .unwrap();
    assert_eq!(provider_gpus, 0);
    let entries: Vec<(String, Vec<(String, String)>)> = redis::cmd("XRANGE")
        .arg("gpucache:{eu}:events")
        .arg("-")
        .arg("+")
        .query(&mut con)
        .unwrap();
    let expired = entries
        .iter()
        .flat_map(|(_, fields)| fields.iter().filter(|(k, _)| k == "payload"))
        .filter(|(_, payload)| payload.contains("\"reason\":\"expired\""))
        .count();
    assert_eq!(expired, 4, "one gpu_availability_changed per expired GPU");
    assert_consistent(&mut con, "eu");
}

#[test]
fn a_booking_that_ends_releases_its_gpu() {
    let server = Server::start(&["AVAILABILITY_TTL", "60", "JITTER", "0"], &[]);
    let mut con = server.connect();
    seed(&mut con);
    run(
        &mut con,
        &["GPUCACHE.BOOK", "eu", "g1", "short", "alice", "1"],
    )
    .unwrap();
    assert_eq!(
        fields(&mut con, &["GPUCACHE.GET", "eu", "g1"])["status"],
        "busy"
    );
    eventually(
        "booking end releases the GPU",
        Duration::from_secs(10),
        || fields(&mut con, &["GPUCACHE.GET", "eu", "g1"])["status"] == "available",
    );
    let gpu = fields(&mut con, &["GPUCACHE.GET", "eu", "g1"]);
    assert_eq!(gpu["booking_id"], "(nil)");
    assert_eq!(gpu["version"], "6");
    assert!(available_ids(&mut con, &["eu"]).contains(&"g1".to_string()));
    let stats = fields(&mut con, &["GPUCACHE.STATS", "eu"]);
    assert_eq!(stats["bookings_active"], "0");
    assert_eq!(stats["bookings_ended"], "1");
    assert_eq!(stats["gpus_busy"], "0");
    assert_consistent(&mut con, "eu");
}

#[test]
fn an_expired_type_price_hands_gpus_back_their_own_prices() {
    let server = Server::start(&["PRICING_TTL", "1", "JITTER", "0"], &[]);
    let mut con = server.connect();
    seed(&mut con);
    run(&mut con, &["GPUCACHE.PRICE", "eu", "A100", "9"]).unwrap();
    assert_eq!(
        fields(&mut con, &["GPUCACHE.GET", "eu", "g2"])["price"],
        "9"
    );
    eventually("type price expiry healed", Duration::from_secs(10), || {
        let n: i64 = redis::cmd("EXISTS")
            .arg("gpucache:{eu}:avail-type:A100")
            .query(&mut con)
            .unwrap();
        n == 0
    });
    assert_eq!(
        fields(&mut con, &["GPUCACHE.GET", "eu", "g2"])["price"],
        "1.5"
    );
    assert_eq!(available_ids(&mut con, &["eu"]), ["g2", "g3", "g1", "g4"]);
    let stats = run(&mut con, &["GPUCACHE.STATS", "eu"]).unwrap();
    let a100 = as_map(&as_map(&as_map(&stats)["types"])["A100"]);
    assert_eq!(text(&a100["avg_price"]), "2");
    assert_consistent(&mut con, "eu");
}

#[test]
fn a_booked_gpu_whose_record_vanishes_is_rebuilt_and_keeps_its_booking() {
    let server = Server::start(&[], &[]);
    let mut con = server.connect();
    seed(&mut con);
    let booked = fields(
        &mut con,
        &["GPUCACHE.BOOK", "eu", "g1", "b1", "alice", "3600"],
    );
    // As if evicted under an allkeys-* policy: the record goes before its booking ends.
    redis::cmd("PEXPIRE")
        .arg("gpucache:{eu}:gpu:g1")
        .arg(1)
        .query::<()>(&mut con)
        .unwrap();
    eventually(
        "the booked GPU's record rebuilt from its booking",
        Duration::from_secs(10),
        || {
            run(&mut con, &["GPUCACHE.GET", "eu", "g1"])
                .is_ok_and(|r| text(&as_map(&r)["version"]) != booked["gpu_version"])
        },
    );
    let gpu = fields(&mut con, &["GPUCACHE.GET", "eu", "g1"]);
    assert_eq!(
        (
            gpu["status"].as_str(),
            gpu["booking_id"].as_str(),
            gpu["booking_user"].as_str(),
            gpu["booking_end_ms"].as_str()
        ),
        ("busy", "b1", "alice", booked["end_ms"].as_str())
    );
    assert!(
        !gpu.contains_key("ttl_ms"),
        "a booked GPU's record keeps no TTL"
    );
    assert!(
        error(&mut con, &["GPUCACHE.BOOK", "eu", "g1", "b2", "bob", "60"]).starts_with("GPUBUSY"),
        "nobody else can book it"
    );
    assert_consistent(&mut con, "eu");
    let stats = fields(&mut con, &["GPUCACHE.STATS", "eu"]);
    assert_eq!(
        (
            stats["bookings_active"].as_str(),
            stats["gpus_busy"].as_str()
        ),
        ("1", "1")
    );
    let cancelled = fields(&mut con, &["GPUCACHE.CANCEL", "eu", "b1"]);
    assert_eq!(cancelled["gpu_status"], "available");
    assert_consistent(&mut con, "eu");
}

/// Lets wall-clock time pass without touching any key: with active expiry off, a key that
/// expired meanwhile is deleted only by the next command that reads it, which is the point of
/// these tests (a poll would read it first).
fn let_time_pass(ms: u64) {
    std::thread::sleep(Duration::from_millis(ms));
}

#[test]
fn re_registering_a_gpu_whose_record_just_expired_starts_clean() {
    let server = Server::start(
        &["AVAILABILITY_TTL", "1", "JITTER", "0"],
        &["--enable-debug-command", "yes"],
    );
    let mut con = server.connect();
    redis::cmd("DEBUG")
        .arg("SET-ACTIVE-EXPIRE")
        .arg(0)
        .query::<()>(&mut con)
        .unwrap();
    register(&mut con, "eu", "g1", "p1", "A100", "2");
    let_time_pass(1200);
    let again = fields(
        &mut con,
        &[
            "GPUCACHE.REGISTER",
            "eu",
            "g1",
            "PROVIDER",
            "p2",
            "TYPE",
            "H100",
            "PRICE",
            "3",
        ],
    );
    assert_eq!(again["result"], "created");
    let first_version: i64 = 1;
    assert!(
        again["version"].parse::<i64>().unwrap() > first_version,
        "versions keep growing across expiry, so consumers never mistake the new record for a late event"
    );
    assert_consistent(&mut con, "eu");
    let p1: Vec<String> = redis::cmd("SMEMBERS")
        .arg("gpucache:{eu}:provider-gpus:p1")
        .query(&mut con)
        .unwrap();
    assert!(p1.is_empty(), "{p1:?}");
    let stats = fields(&mut con, &["GPUCACHE.STATS", "eu"]);
    assert_eq!(
        (
            stats["gpus_total"].as_str(),
            stats["gpus_available"].as_str()
        ),
        ("1", "1")
    );
    run(&mut con, &["GPUCACHE.PROVIDER", "eu", "p1", "offline"]).unwrap();
    assert_eq!(
        available_ids(&mut con, &["eu"]),
        ["g1"],
        "p1 going offline leaves p2's GPU alone"
    );
}

#[test]
fn an_ended_booking_id_can_be_reused_at_once() {
    let server = Server::start(
        &["AVAILABILITY_TTL", "60", "JITTER", "0"],
        &["--enable-debug-command", "yes"],
    );
    let mut con = server.connect();
    redis::cmd("DEBUG")
        .arg("SET-ACTIVE-EXPIRE")
        .arg(0)
        .query::<()>(&mut con)
        .unwrap();
    seed(&mut con);
    run(&mut con, &["GPUCACHE.BOOK", "eu", "g1", "b1", "alice", "1"]).unwrap();
    let_time_pass(1200);
    let reused = fields(&mut con, &["GPUCACHE.BOOK", "eu", "g2", "b1", "alice", "1"]);
    assert_eq!(reused["result"], "created");
    let g1 = fields(&mut con, &["GPUCACHE.GET", "eu", "g1"]);
    assert_eq!(
        (g1["status"].as_str(), g1["booking_id"].as_str()),
        ("available", "(nil)")
    );
    assert_consistent(&mut con, "eu");
    assert_eq!(
        fields(&mut con, &["GPUCACHE.STATS", "eu"])["bookings_ended"],
        "1"
    );
}

#[test]
fn a_booked_gpu_is_released_even_with_a_short_availability_ttl() {
    let server = Server::start(&["AVAILABILITY_TTL", "1", "JITTER", "0"], &[]);
    let mut con = server.connect();
    seed(&mut con);
    run(&mut con, &["GPUCACHE.BOOK", "eu", "g1", "b1", "alice", "2"]).unwrap();
    let mut released = false;
    eventually(
        "booking end released the GPU (or it has expired since)",
        Duration::from_secs(10),
        || match run(&mut con, &["GPUCACHE.GET", "eu", "g1"]) {
            Ok(reply) => {
                released |= text(&as_map(&reply)["status"]) == "available";
                released
            }
            Err(_) => true,
        },
    );
    assert!(
        released,
        "the GPU must come back as available before its own record expires"
    );
}

#[test]
fn healing_happens_in_the_db_the_record_expired_in() {
    let server = Server::start(&["AVAILABILITY_TTL", "1", "JITTER", "0"], &[]);
    let mut db1 = redis::Client::open(format!("redis://127.0.0.1:{}/1", server.port))
        .and_then(|c| c.get_connection())
        .unwrap();
    seed(&mut db1);
    eventually("db 1 healed", Duration::from_secs(10), || {
        let n: i64 = redis::cmd("HLEN")
            .arg("gpucache:{eu}:index:gpus")
            .query(&mut db1)
            .unwrap();
        n == 0
    });
    assert_consistent(&mut db1, "eu");
    let mut db0 = server.connect();
    let keys: Vec<String> = redis::cmd("KEYS").arg("*").query(&mut db0).unwrap();
    assert!(keys.is_empty(), "nothing was written to db 0: {keys:?}");
}
