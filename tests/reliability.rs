//! Invariants through concurrency, restarts and memory pressure.

mod common;

use common::*;
use std::sync::{Arc, Barrier};
use std::time::Duration;

#[test]
fn a_storm_of_mixed_writes_keeps_every_invariant() {
    let server = Server::start(&[], &[]);
    let mut con = server.connect();
    seed(&mut con);
    const CLIENTS: usize = 12;
    const OPS: usize = 150;
    let barrier = Arc::new(Barrier::new(CLIENTS));
    let handles: Vec<_> = (0..CLIENTS)
        .map(|client| {
            let mut con = server.connect();
            let barrier = Arc::clone(&barrier);
            std::thread::spawn(move || {
                barrier.wait();
                let mut booked = Vec::new();
                for i in 0..OPS {
                    let gpu = format!("g{}", 1 + (client + i) % 4);
                    let booking = format!("c{client}-{i}");
                    let outcome = match (client + i) % 6 {
                        0 | 1 => run(
                            &mut con,
                            &["GPUCACHE.BOOK", "eu", &gpu, &booking, "u", "600"],
                        )
                        .map(|_| booked.push(booking.clone())),
                        2 => match booked.pop() {
                            Some(b) => run(&mut con, &["GPUCACHE.CANCEL", "eu", &b]).map(|_| ()),
                            None => Ok(()),
                        },
                        3 => run(
                            &mut con,
                            &["GPUCACHE.PRICE", "eu", "A100", &format!("{}.5", i % 5)],
                        )
                        .map(|_| ()),
                        4 => {
                            let status = if i % 2 == 0 { "offline" } else { "online" };
                            run(&mut con, &["GPUCACHE.PROVIDER", "eu", "p1", status]).map(|_| ())
                        }
                        _ => run(&mut con, &["GPUCACHE.STATUS", "eu", &gpu, "maintenance"])
                            .and_then(|_| {
                                run(&mut con, &["GPUCACHE.STATUS", "eu", &gpu, "available"])
                            })
                            .map(|_| ()),
                    };
                    if let Err(e) = outcome {
                        let code = e.code().unwrap_or("").to_owned();
                        assert!(
                            ["GPUBUSY", "GPUUNAVAILABLE", "BADSTATE", "NOBOOKING"]
                                .contains(&code.as_str()),
                            "unexpected error {e}"
                        );
                    }
                }
            })
        })
        .collect();
    for handle in handles {
        handle.join().unwrap();
    }
    assert_consistent(&mut con, "eu");
    // No GPU is held by two bookings, and every live booking holds its GPU.
    let bookings: Vec<String> = redis::cmd("HKEYS")
        .arg("gpucache:{eu}:index:bookings")
        .query(&mut con)
        .unwrap();
    let mut holders = std::collections::BTreeMap::new();
    for booking in &bookings {
        let gpu: String = redis::cmd("HGET")
            .arg(format!("gpucache:{{eu}}:booking:{booking}"))
            .arg("gpu")
            .query(&mut con)
            .unwrap();
        assert!(
            holders.insert(gpu.clone(), booking.clone()).is_none(),
            "{gpu} double-booked"
        );
        assert_eq!(
            &fields(&mut con, &["GPUCACHE.GET", "eu", &gpu])["booking_id"],
            booking
        );
    }
}

#[test]
fn debug_reload_keeps_keys_ttls_and_invariants() {
    let server = Server::start(&[], &["--enable-debug-command", "yes"]);
    let mut con = server.connect();
    seed(&mut con);
    run(&mut con, &["GPUCACHE.BOOK", "eu", "g1", "b1", "u", "600"]).unwrap();
    run(&mut con, &["GPUCACHE.PRICE", "eu", "A100", "3"]).unwrap();
    let before = snapshot(&mut con);
    redis::cmd("DEBUG")
        .arg("RELOAD")
        .query::<()>(&mut con)
        .unwrap();
    assert_same_state(&snapshot(&mut con), &before, "DEBUG RELOAD");
    assert_consistent(&mut con, "eu");
}

#[test]
fn an_rdb_restart_keeps_keys_ttls_and_the_stream_going() {
    let server = Server::start(&[], &[]);
    let mut con = server.connect();
    seed(&mut con);
    run(
        &mut con,
        &["GPUCACHE.BOOK", "eu", "g2", "b1", "alice", "3600"],
    )
    .unwrap();
    run(&mut con, &["GPUCACHE.PROVIDER", "eu", "p2", "maintenance"]).unwrap();
    let before = snapshot(&mut con);
    let last_before: Vec<(String, Vec<(String, String)>)> = redis::cmd("XREVRANGE")
        .arg("gpucache:{eu}:events")
        .arg("+")
        .arg("-")
        .arg("COUNT")
        .arg(1)
        .query(&mut con)
        .unwrap();
    redis::cmd("SAVE").query::<()>(&mut con).unwrap();
    drop(con);
    let dir = server.stop();
    let restarted = Server::start_in(dir, free_port(), &[], &[]);
    let mut con = restarted.connect();
    let after = snapshot(&mut con);
    assert_same_state(&after, &before, "RDB restart");
    assert_consistent(&mut con, "eu");
    run(&mut con, &["GPUCACHE.CANCEL", "eu", "b1"]).unwrap();
    let last_after: Vec<(String, Vec<(String, String)>)> = redis::cmd("XREVRANGE")
        .arg("gpucache:{eu}:events")
        .arg("+")
        .arg("-")
        .arg("COUNT")
        .arg(1)
        .query(&mut con)
        .unwrap();
    let id = |s: &str| {
        let (ms, seq) = s.split_once('-').unwrap();
        (ms.parse::<u64>().unwrap(), seq.parse::<u64>().unwrap())
    };
    assert!(
        id(&last_after[0].0) > id(&last_before[0].0),
        "stream ids keep increasing"
    );
    assert_consistent(&mut con, "eu");
}

#[test]
fn past_maxmemory_writes_are_refused_whole() {
    let server = Server::start(&[], &["--maxmemory-policy", "noeviction"]);
    let mut con = server.connect();
    seed(&mut con);
    let used: i64 = info_field(&mut con, "used_memory");
    redis::cmd("CONFIG")
        .arg("SET")
        .arg("maxmemory")
        .arg(used.to_string())
        .query::<()>(&mut con)
        .unwrap();
    // Fill until Redis refuses.
    let mut refused = None;
    for i in 0..100_000 {
        let id = format!("fill{i}");
        if let Err(e) = run(
            &mut con,
            &[
                "GPUCACHE.REGISTER",
                "eu",
                &id,
                "PROVIDER",
                "p9",
                "TYPE",
                "L4",
                "PRICE",
                "1",
            ],
        ) {
            refused = Some(e);
            break;
        }
    }
    let refused = refused.expect("maxmemory must be reached");
    assert_eq!(refused.code(), Some("OOM"), "{refused}");
    let before = snapshot(&mut con);
    for args in [
        vec!["GPUCACHE.BOOK", "eu", "g1", "b1", "u", "60"],
        vec!["GPUCACHE.PRICE", "eu", "A100", "9"],
        vec!["GPUCACHE.PROVIDER", "eu", "p1", "offline"],
        vec![
            "GPUCACHE.REGISTER",
            "eu",
            "g9",
            "PROVIDER",
            "p1",
            "TYPE",
            "A100",
            "PRICE",
            "1",
        ],
    ] {
        assert_eq!(
            run(&mut con, &args).unwrap_err().code(),
            Some("OOM"),
            "{args:?}"
        );
    }
    assert_same_state(&snapshot(&mut con), &before, "refused writes");
    // Reads still work.
    assert_eq!(
        fields(&mut con, &["GPUCACHE.GET", "eu", "g1"])["status"],
        "available"
    );
    assert_consistent(&mut con, "eu");
}

#[test]
fn evicted_records_heal_their_indexes() {
    let server = Server::start(
        &[],
        &[
            "--maxmemory-policy",
            "volatile-lru",
            "--maxmemory-samples",
            "10",
        ],
    );
    let mut con = server.connect();
    for i in 0..2000 {
        let id = format!("g{i}");
        run(
            &mut con,
            &[
                "GPUCACHE.REGISTER",
                "eu",
                &id,
                "PROVIDER",
                "p1",
                "TYPE",
                "A100",
                "PRICE",
                "1",
                "MEMORY",
                "80",
            ],
        )
        .unwrap();
    }
    for i in 0..200 {
        run(
            &mut con,
            &[
                "GPUCACHE.BOOK",
                "eu",
                &format!("g{i}"),
                &format!("b{i}"),
                "u",
                "3600",
            ],
        )
        .unwrap();
    }
    assert_consistent(&mut con, "eu");
    let used: i64 = info_field(&mut con, "used_memory");
    // Squeeze: the next writes make Redis evict volatile keys (GPU and booking records).
    redis::cmd("CONFIG")
        .arg("SET")
        .arg("maxmemory")
        .arg((used * 85 / 100).to_string())
        .query::<()>(&mut con)
        .unwrap();
    for i in 0..50 {
        let _ = run(
            &mut con,
            &[
                "GPUCACHE.STATUS",
                "eu",
                &format!("g{}", 1000 + i),
                "offline",
            ],
        );
    }
    let evicted: i64 = info_field(&mut con, "evicted_keys");
    assert!(evicted > 0, "the squeeze must evict something");
    redis::cmd("CONFIG")
        .arg("SET")
        .arg("maxmemory")
        .arg("0")
        .query::<()>(&mut con)
        .unwrap();
    // 1,800 evictions healed a few milliseconds' worth per tick, while each poll's CHECK walks
    // the region: on a loaded machine running a debug build that takes well over 10 s.
    eventually(
        "indexes healed after eviction",
        Duration::from_secs(60),
        || {
            let report = run(&mut con, &["GPUCACHE.CHECK", "eu"]).unwrap();
            let healed = text(&as_map(&report)["ok"]) == "1";
            if !healed {
                std::thread::sleep(Duration::from_millis(200));
            }
            healed
        },
    );
    let stats = fields(&mut con, &["GPUCACHE.STATS", "eu"]);
    let total: i64 = stats["gpus_total"].parse().unwrap();
    assert!(total < 2000, "evicted GPUs left the registry: {total}");
}

#[test]
fn records_that_expire_while_the_server_is_down_are_repaired_after_loading() {
    let server = Server::start(&["AVAILABILITY_TTL", "2", "JITTER", "0"], &[]);
    let mut con = server.connect();
    seed(&mut con);
    run(&mut con, &["GPUCACHE.BOOK", "eu", "g1", "b1", "u", "1"]).unwrap();
    redis::cmd("SAVE").query::<()>(&mut con).unwrap();
    drop(con);
    let dir = server.stop();
    // Let every record's time pass while no server runs: nothing will announce their expiry.
    std::thread::sleep(Duration::from_millis(3200));
    let restarted = Server::start_in(
        dir,
        free_port(),
        &["AVAILABILITY_TTL", "2", "JITTER", "0"],
        &[],
    );
    let mut con = restarted.connect();
    eventually(
        "the post-load sweep repaired the region",
        Duration::from_secs(10),
        || {
            let report = run(&mut con, &["GPUCACHE.CHECK", "eu"]).unwrap();
            text(&as_map(&report)["ok"]) == "1"
        },
    );
    // The booking's time passed while the server was down: the booking clock ends it and its
    // GPU comes back available (with a fresh TTL); the idle GPUs' records did not survive.
    eventually(
        "the booking clock ended b1",
        Duration::from_secs(10),
        || fields(&mut con, &["GPUCACHE.STATS", "eu"])["bookings_ended"] == "1",
    );
    let stats = fields(&mut con, &["GPUCACHE.STATS", "eu"]);
    assert_eq!(
        (
            stats["gpus_total"].as_str(),
            stats["gpus_available"].as_str(),
            stats["bookings_active"].as_str()
        ),
        ("1", "1", "0")
    );
    assert_eq!(available_ids(&mut con, &["eu"]), ["g1"]);
    assert_consistent(&mut con, "eu");
    let repaired = fields(&mut con, &["GPUCACHE.REPAIR", "eu"]);
    assert_eq!(repaired["gpus"], "0", "nothing left to repair");
}

#[test]
fn repair_fixes_a_registry_entry_whose_record_vanished_silently() {
    let server = Server::start(&[], &[]);
    let mut con = server.connect();
    seed(&mut con);
    // DEL sends no expired/evicted event: only a sweep notices.
    redis::cmd("DEL")
        .arg("gpucache:{eu}:gpu:g2")
        .query::<()>(&mut con)
        .unwrap();
    let report = run(&mut con, &["GPUCACHE.CHECK", "eu"]).unwrap();
    assert_eq!(text(&as_map(&report)["ok"]), "0");
    let repaired = fields(&mut con, &["GPUCACHE.REPAIR", "eu"]);
    assert_eq!(repaired["gpus"], "1");
    assert_consistent(&mut con, "eu");
    assert_eq!(available_ids(&mut con, &["eu"]), ["g3", "g1", "g4"]);
}

#[test]
fn a_type_price_that_expires_while_the_server_is_down_is_healed_after_loading() {
    let args = ["PRICING_TTL", "1", "JITTER", "0"];
    let server = Server::start(&args, &[]);
    let mut con = server.connect();
    seed(&mut con);
    run(&mut con, &["GPUCACHE.PRICE", "eu", "A100", "9"]).unwrap();
    redis::cmd("SAVE").query::<()>(&mut con).unwrap();
    drop(con);
    let dir = server.stop();
    std::thread::sleep(Duration::from_millis(1500));
    let restarted = Server::start_in(dir, free_port(), &args, &[]);
    let mut con = restarted.connect();
    eventually(
        "the sweep after loading handed the A100s back their own prices",
        Duration::from_secs(10),
        || {
            let report = run(&mut con, &["GPUCACHE.CHECK", "eu"]).unwrap();
            text(&as_map(&report)["ok"]) == "1"
        },
    );
    assert_eq!(available_ids(&mut con, &["eu"]), ["g2", "g3", "g1", "g4"]);
    assert_eq!(
        fields(&mut con, &["GPUCACHE.GET", "eu", "g2"])["price"],
        "1.5"
    );
}
