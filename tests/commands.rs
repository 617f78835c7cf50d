//! Every command's happy path and error paths against a real redis-server.

mod common;

use common::*;
use redis::Value;

#[test]
fn register_then_get_returns_the_full_record() {
    let server = Server::start(&[], &[]);
    let mut con = server.connect();
    let created = fields(
        &mut con,
        &[
            "GPUCACHE.REGISTER",
            "eu",
            "g1",
            "PROVIDER",
            "p1",
            "TYPE",
            "A100",
            "PRICE",
            "2.5",
            "MEMORY",
            "80",
            "CORES",
            "6912",
            "SCORE",
            "9.5",
        ],
    );
    assert_eq!(created["result"], "created");
    assert_eq!(created["version"], "1");

    let gpu = fields(&mut con, &["GPUCACHE.GET", "eu", "g1"]);
    assert_eq!(gpu["gpu_id"], "g1");
    assert_eq!(gpu["provider"], "p1");
    assert_eq!(gpu["provider_status"], "online");
    assert_eq!(gpu["type"], "A100");
    assert_eq!(gpu["status"], "available");
    assert_eq!(gpu["listed"], "1");
    assert_eq!(gpu["price"], "2.5");
    assert_eq!(gpu["price_source"], "own");
    assert_eq!(gpu["memory_gb"], "80");
    assert_eq!(gpu["cores"], "6912");
    assert_eq!(gpu["score"], "9.5");
    assert_eq!(gpu["booking_id"], "(nil)");
    assert_eq!(gpu["version"], "1");
    assert!(gpu["ttl_ms"].parse::<i64>().unwrap() > 0);
}

#[test]
fn re_registering_updates_in_place_and_bumps_the_version() {
    let server = Server::start(&[], &[]);
    let mut con = server.connect();
    seed(&mut con);
    run(&mut con, &["GPUCACHE.STATUS", "eu", "g1", "maintenance"]).unwrap();
    let updated = fields(
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
    assert_eq!(updated["result"], "updated");
    assert_eq!(updated["version"], "6");
    let gpu = fields(&mut con, &["GPUCACHE.GET", "eu", "g1"]);
    assert_eq!(
        gpu["status"], "maintenance",
        "registration keeps the status"
    );
    assert_eq!(gpu["provider"], "p2");
    assert_eq!(gpu["type"], "H100");
    let members: Vec<String> = redis::cmd("SMEMBERS")
        .arg("gpucache:{eu}:provider-gpus:p1")
        .query(&mut con)
        .unwrap();
    assert_eq!(
        members,
        vec!["g2".to_string()],
        "moved out of the old provider's set"
    );
    assert_consistent(&mut con, "eu");
}

#[test]
fn available_lists_cheapest_first_with_filters() {
    let server = Server::start(&[], &[]);
    let mut con = server.connect();
    seed(&mut con);
    assert_eq!(available_ids(&mut con, &["eu"]), ["g2", "g3", "g1", "g4"]);
    assert_eq!(available_ids(&mut con, &["eu", "TYPE", "H100"]), ["g4"]);
    assert_eq!(
        available_ids(&mut con, &["eu", "MAXPRICE", "2"]),
        ["g2", "g3"]
    );
    assert_eq!(available_ids(&mut con, &["eu", "LIMIT", "2"]), ["g2", "g3"]);
    assert_eq!(
        available_ids(
            &mut con,
            &["eu", "type", "A100", "maxprice", "2.4", "limit", "1"]
        ),
        ["g2"]
    );
    assert!(available_ids(&mut con, &["nowhere"]).is_empty());
    let first = run(&mut con, &["GPUCACHE.AVAILABLE", "eu", "LIMIT", "1"]).unwrap();
    let Value::Array(rows) = first else { panic!() };
    let row = as_map(&rows[0]);
    assert_eq!(text(&row["price"]), "1.5");
    assert_eq!(text(&row["type"]), "A100");
    assert_eq!(text(&row["provider"]), "p1");
}

#[test]
fn book_makes_the_gpu_busy_unlisted_and_records_the_booking() {
    let server = Server::start(&[], &[]);
    let mut con = server.connect();
    seed(&mut con);
    let booking = fields(
        &mut con,
        &["GPUCACHE.BOOK", "eu", "g2", "b1", "alice", "7200"],
    );
    assert_eq!(booking["result"], "created");
    assert_eq!(booking["gpu_id"], "g2");
    assert_eq!(booking["price"], "1.5");
    assert_eq!(booking["cost"], "3");
    let end: i64 = booking["end_ms"].parse().unwrap();
    assert_eq!(end - booking["start_ms"].parse::<i64>().unwrap(), 7_200_000);

    let gpu = fields(&mut con, &["GPUCACHE.GET", "eu", "g2"]);
    assert_eq!(gpu["status"], "busy");
    assert_eq!(gpu["booking_id"], "b1");
    assert_eq!(gpu["booking_user"], "alice");
    assert_eq!(gpu["booking_end_ms"], booking["end_ms"]);
    assert_eq!(gpu["listed"], "0");
    assert_eq!(gpu["version"], "5");
    assert!(!available_ids(&mut con, &["eu"]).contains(&"g2".to_string()));

    // Market state carries no TTL, so no volatile-* eviction policy can choose it: the booking
    // clock ends the booking at `end_ms`.
    for key in ["gpucache:{eu}:booking:b1", "gpucache:{eu}:gpu:g2"] {
        let expiry: i64 = redis::cmd("PEXPIRETIME").arg(key).query(&mut con).unwrap();
        assert_eq!(
            expiry, -1,
            "{key} must not expire while the booking holds it"
        );
    }
    let clock: Option<i64> = redis::cmd("ZSCORE")
        .arg("gpucache:{eu}:index:booking-ends")
        .arg("b1")
        .query(&mut con)
        .unwrap();
    assert_eq!(clock, Some(end), "the booking clock ends it at its end");

    let stats = fields(&mut con, &["GPUCACHE.STATS", "eu"]);
    assert_eq!(stats["gpus_busy"], "1");
    assert_eq!(stats["bookings_active"], "1");
    assert_eq!(stats["bookings_created"], "1");
    assert_consistent(&mut con, "eu");
}

#[test]
fn booking_refusals_change_nothing() {
    let server = Server::start(&[], &[]);
    let mut con = server.connect();
    seed(&mut con);
    run(
        &mut con,
        &["GPUCACHE.BOOK", "eu", "g1", "b1", "alice", "60"],
    )
    .unwrap();
    run(&mut con, &["GPUCACHE.STATUS", "eu", "g3", "offline"]).unwrap();
    run(&mut con, &["GPUCACHE.PROVIDER", "eu", "p2", "maintenance"]).unwrap();
    let before = snapshot(&mut con);
    let cases: [(&[&str], &str); 5] = [
        (&["GPUCACHE.BOOK", "eu", "nope", "b2", "bob", "60"], "NOGPU"),
        (&["GPUCACHE.BOOK", "eu", "g1", "b2", "bob", "60"], "GPUBUSY"),
        (
            &["GPUCACHE.BOOK", "eu", "g3", "b2", "bob", "60"],
            "GPUUNAVAILABLE",
        ),
        (
            &["GPUCACHE.BOOK", "eu", "g4", "b2", "bob", "60"],
            "GPUUNAVAILABLE",
        ),
        (
            &["GPUCACHE.BOOK", "eu", "g2", "b1", "bob", "60"],
            "BOOKINGEXISTS",
        ),
    ];
    for (args, code) in cases {
        let err = error(&mut con, args);
        assert!(err.starts_with(code), "{args:?}: {err}");
    }
    assert_eq!(snapshot(&mut con), before);
    assert_consistent(&mut con, "eu");
}

#[test]
fn a_retried_booking_is_idempotent() {
    let server = Server::start(&[], &[]);
    let mut con = server.connect();
    seed(&mut con);
    let first = fields(
        &mut con,
        &["GPUCACHE.BOOK", "eu", "g1", "b1", "alice", "60"],
    );
    let before = snapshot(&mut con);
    let again = fields(
        &mut con,
        &["GPUCACHE.BOOK", "eu", "g1", "b1", "alice", "60"],
    );
    assert_eq!(again["result"], "existing");
    assert_eq!(again["end_ms"], first["end_ms"]);
    assert_eq!(snapshot(&mut con), before, "a retry writes nothing");
}

#[test]
fn cancel_releases_the_gpu() {
    let server = Server::start(&[], &[]);
    let mut con = server.connect();
    seed(&mut con);
    run(
        &mut con,
        &["GPUCACHE.BOOK", "eu", "g2", "b1", "alice", "600"],
    )
    .unwrap();
    let cancelled = fields(&mut con, &["GPUCACHE.CANCEL", "eu", "b1"]);
    assert_eq!(cancelled["gpu_status"], "available");
    assert_eq!(cancelled["gpu_version"], "6");
    assert_eq!(available_ids(&mut con, &["eu", "LIMIT", "1"]), ["g2"]);
    let exists: i64 = redis::cmd("EXISTS")
        .arg("gpucache:{eu}:booking:b1")
        .query(&mut con)
        .unwrap();
    assert_eq!(exists, 0);
    let stats = fields(&mut con, &["GPUCACHE.STATS", "eu"]);
    assert_eq!(stats["bookings_active"], "0");
    assert_eq!(stats["bookings_cancelled"], "1");
    assert_eq!(stats["gpus_busy"], "0");

    let before = snapshot(&mut con);
    assert!(error(&mut con, &["GPUCACHE.CANCEL", "eu", "b1"]).starts_with("NOBOOKING"));
    assert_eq!(snapshot(&mut con), before);
    assert_consistent(&mut con, "eu");
}

#[test]
fn cancel_while_the_provider_is_offline_leaves_the_gpu_unlisted() {
    let server = Server::start(&[], &[]);
    let mut con = server.connect();
    seed(&mut con);
    run(
        &mut con,
        &["GPUCACHE.BOOK", "eu", "g2", "b1", "alice", "600"],
    )
    .unwrap();
    run(&mut con, &["GPUCACHE.PROVIDER", "eu", "p1", "offline"]).unwrap();
    run(&mut con, &["GPUCACHE.CANCEL", "eu", "b1"]).unwrap();
    let gpu = fields(&mut con, &["GPUCACHE.GET", "eu", "g2"]);
    assert_eq!(gpu["status"], "available");
    assert_eq!(gpu["listed"], "0");
    assert!(!available_ids(&mut con, &["eu"]).contains(&"g2".to_string()));
    run(&mut con, &["GPUCACHE.PROVIDER", "eu", "p1", "online"]).unwrap();
    assert_eq!(available_ids(&mut con, &["eu", "LIMIT", "1"]), ["g2"]);
    assert_consistent(&mut con, "eu");
}

#[test]
fn status_follows_the_state_machine() {
    let server = Server::start(&[], &[]);
    let mut con = server.connect();
    seed(&mut con);
    let changed = fields(&mut con, &["GPUCACHE.STATUS", "eu", "g2", "offline"]);
    assert_eq!(changed["result"], "changed");
    assert_eq!(changed["version"], "5");
    assert!(!available_ids(&mut con, &["eu"]).contains(&"g2".to_string()));
    let same = fields(&mut con, &["GPUCACHE.STATUS", "eu", "g2", "OFFLINE"]);
    assert_eq!(same["result"], "unchanged");
    assert_eq!(same["version"], "5");
    run(&mut con, &["GPUCACHE.STATUS", "eu", "g2", "available"]).unwrap();
    assert_eq!(available_ids(&mut con, &["eu", "LIMIT", "1"]), ["g2"]);

    run(
        &mut con,
        &["GPUCACHE.BOOK", "eu", "g1", "b1", "alice", "60"],
    )
    .unwrap();
    let before = snapshot(&mut con);
    for args in [
        ["GPUCACHE.STATUS", "eu", "g1", "available"],
        ["GPUCACHE.STATUS", "eu", "g1", "offline"],
        ["GPUCACHE.STATUS", "eu", "g3", "busy"],
    ] {
        let err = error(&mut con, &args);
        assert!(err.starts_with("BADSTATE"), "{args:?}: {err}");
    }
    assert!(error(&mut con, &["GPUCACHE.STATUS", "eu", "zz", "offline"]).starts_with("NOGPU"));
    assert_eq!(snapshot(&mut con), before);
    assert_consistent(&mut con, "eu");
}

#[test]
fn a_type_price_applies_until_a_gpu_registers_its_own_price() {
    let server = Server::start(&[], &[]);
    let mut con = server.connect();
    seed(&mut con);
    let priced = fields(&mut con, &["GPUCACHE.PRICE", "eu", "A100", "3.25"]);
    assert_eq!(priced["version"], "5");
    assert_eq!(priced["listed_gpus"], "3");
    for gpu in ["g1", "g2", "g3"] {
        let record = fields(&mut con, &["GPUCACHE.GET", "eu", gpu]);
        assert_eq!(record["price"], "3.25", "{gpu}");
        assert_eq!(record["price_source"], "type");
    }
    assert_eq!(
        fields(&mut con, &["GPUCACHE.GET", "eu", "g4"])["price"],
        "4"
    );
    // A100s (3.25) now come before the H100 (4).
    assert_eq!(available_ids(&mut con, &["eu"]), ["g1", "g2", "g3", "g4"]);
    assert_eq!(
        available_ids(&mut con, &["eu", "MAXPRICE", "3"]),
        Vec::<String>::new()
    );

    register(&mut con, "eu", "g3", "p2", "A100", "1");
    let own = fields(&mut con, &["GPUCACHE.GET", "eu", "g3"]);
    assert_eq!(
        (own["price"].as_str(), own["price_source"].as_str()),
        ("1", "own")
    );
    assert_eq!(available_ids(&mut con, &["eu", "LIMIT", "2"]), ["g3", "g1"]);

    // A booking is charged the price the GPU shows.
    let booking = fields(&mut con, &["GPUCACHE.BOOK", "eu", "g1", "b1", "u", "3600"]);
    assert_eq!(booking["price"], "3.25");

    let stats = fields(&mut con, &["GPUCACHE.STATS", "eu"]);
    assert_eq!(stats["gpus_listed"], "3");
    assert_consistent(&mut con, "eu");
}

#[test]
fn provider_status_moves_all_its_gpus_at_once() {
    let server = Server::start(&[], &[]);
    let mut con = server.connect();
    seed(&mut con);
    let offline = fields(&mut con, &["GPUCACHE.PROVIDER", "eu", "p1", "offline"]);
    assert_eq!(offline["gpus"], "2");
    assert_eq!(offline["gpus_unlisted"], "2");
    assert_eq!(available_ids(&mut con, &["eu"]), ["g3", "g4"]);
    assert!(
        error(&mut con, &["GPUCACHE.BOOK", "eu", "g1", "b", "u", "60"])
            .starts_with("GPUUNAVAILABLE")
    );
    assert_eq!(
        fields(&mut con, &["GPUCACHE.GET", "eu", "g1"])["provider_status"],
        "offline"
    );
    let online = fields(&mut con, &["GPUCACHE.PROVIDER", "eu", "p1", "online"]);
    assert_eq!(online["gpus_listed"], "2");
    assert_eq!(online["version"], "6");
    assert_eq!(available_ids(&mut con, &["eu"]), ["g2", "g3", "g1", "g4"]);
    assert_consistent(&mut con, "eu");
}

#[test]
fn stats_report_counts_utilisation_and_prices_per_type() {
    let server = Server::start(&[], &[]);
    let mut con = server.connect();
    seed(&mut con);
    run(&mut con, &["GPUCACHE.BOOK", "eu", "g1", "b1", "u", "60"]).unwrap();
    run(&mut con, &["GPUCACHE.STATUS", "eu", "g4", "offline"]).unwrap();
    let reply = run(&mut con, &["GPUCACHE.STATS", "eu"]).unwrap();
    let stats = as_map(&reply);
    let get = |k: &str| text(&stats[k]);
    assert_eq!(get("gpus_total"), "4");
    assert_eq!(get("gpus_available"), "2");
    assert_eq!(get("gpus_busy"), "1");
    assert_eq!(get("gpus_offline"), "1");
    assert_eq!(get("gpus_listed"), "2");
    assert_eq!(get("utilisation"), "0.2500");
    assert_eq!(get("bookings_active"), "1");
    let types = as_map(&stats["types"]);
    let a100 = as_map(&types["A100"]);
    assert_eq!(text(&a100["listed"]), "2");
    assert_eq!(text(&a100["min_price"]), "1.5");
    assert_eq!(text(&a100["avg_price"]), "1.75");
    let h100 = as_map(&types["H100"]);
    assert_eq!(text(&h100["listed"]), "0");
    assert_eq!(text(&h100["min_price"]), "(nil)");
    assert_consistent(&mut con, "eu");
}

#[test]
fn bad_input_gets_a_clear_error_and_changes_nothing() {
    let server = Server::start(&[], &[]);
    let mut con = server.connect();
    seed(&mut con);
    let huge = "x".repeat(1 << 20);
    let before = snapshot(&mut con);
    let cases: Vec<Vec<&str>> = vec![
        vec!["GPUCACHE.REGISTER", "eu", "g9"],
        vec![
            "GPUCACHE.REGISTER",
            "eu",
            "g9",
            "PROVIDER",
            "p",
            "TYPE",
            "t",
            "PRICE",
            "nan",
        ],
        vec![
            "GPUCACHE.REGISTER",
            "eu",
            "g9",
            "PROVIDER",
            "p",
            "TYPE",
            "t",
            "PRICE",
            "inf",
        ],
        vec![
            "GPUCACHE.REGISTER",
            "eu",
            "g9",
            "PROVIDER",
            "p",
            "TYPE",
            "t",
            "PRICE",
            "-1",
        ],
        vec![
            "GPUCACHE.REGISTER",
            "eu",
            "g9",
            "PROVIDER",
            "p",
            "TYPE",
            "t",
            "PRICE",
            "1e9",
        ],
        vec![
            "GPUCACHE.REGISTER",
            "eu",
            "g9",
            "PROVIDER",
            "p",
            "TYPE",
            "t",
            "COLOR",
            "red",
        ],
        vec![
            "GPUCACHE.REGISTER",
            "eu",
            "g9",
            "PROVIDER",
            "p",
            "TYPE",
            "t",
            "PRICE",
            "1",
            "MEMORY",
        ],
        vec![
            "GPUCACHE.REGISTER",
            "eu",
            "g9",
            "PROVIDER",
            "p",
            "PROVIDER",
            "q",
            "TYPE",
            "t",
        ],
        vec![
            "GPUCACHE.REGISTER",
            "eu",
            "g9",
            "PROVIDER",
            "p",
            "TYPE",
            "t",
            "PRICE",
            "1",
            "MEMORY",
            "-4",
        ],
        vec![
            "GPUCACHE.REGISTER",
            "eu",
            "g9",
            "PROVIDER",
            "p",
            "TYPE",
            "t",
            "PRICE",
            "1",
            "SCORE",
            "NaN",
        ],
        vec![
            "GPUCACHE.REGISTER",
            "eu",
            "",
            "PROVIDER",
            "p",
            "TYPE",
            "t",
            "PRICE",
            "1",
        ],
        vec![
            "GPUCACHE.REGISTER",
            "",
            "g9",
            "PROVIDER",
            "p",
            "TYPE",
            "t",
            "PRICE",
            "1",
        ],
        vec![
            "GPUCACHE.REGISTER",
            "e{u}",
            "g9",
            "PROVIDER",
            "p",
            "TYPE",
            "t",
            "PRICE",
            "1",
        ],
        vec![
            "GPUCACHE.REGISTER",
            "eu",
            &huge,
            "PROVIDER",
            "p",
            "TYPE",
            "t",
            "PRICE",
            "1",
        ],
        vec!["GPUCACHE.GET", "eu"],
        vec!["GPUCACHE.GET", "eu", "g1", "extra"],
        vec!["GPUCACHE.STATUS", "eu", "g1", "sleeping"],
        vec!["GPUCACHE.PRICE", "eu", "A100", "-0.5"],
        vec!["GPUCACHE.PRICE", "eu", "A100", "NaN"],
        vec!["GPUCACHE.PRICE", "eu", "", "1"],
        vec!["GPUCACHE.BOOK", "eu", "g1", "b1", "u", "-60"],
        vec!["GPUCACHE.BOOK", "eu", "g1", "b1", "u", "0"],
        vec!["GPUCACHE.BOOK", "eu", "g1", "b1", "u", "1.5"],
        vec![
            "GPUCACHE.BOOK",
            "eu",
            "g1",
            "b1",
            "u",
            "99999999999999999999999",
        ],
        vec!["GPUCACHE.BOOK", "eu", "g1", "", "u", "60"],
        vec!["GPUCACHE.BOOK", "eu", "g1", "b1", &huge, "60"],
        vec!["GPUCACHE.CANCEL", "eu"],
        vec!["GPUCACHE.PROVIDER", "eu", "p1", "gone"],
        vec!["GPUCACHE.AVAILABLE", "eu", "LIMIT", "0"],
        vec!["GPUCACHE.AVAILABLE", "eu", "LIMIT"],
        vec!["GPUCACHE.AVAILABLE", "eu", "MAXPRICE", "cheap"],
        vec!["GPUCACHE.AVAILABLE", "eu", "SORT", "CHEAP"],
        vec!["GPUCACHE.AVAILABLE", "eu", "MINMEMORY", "-1"],
        vec!["GPUCACHE.AVAILABLE", "eu", "COLOR", "red"],
        vec!["GPUCACHE.STATS", "eu", "extra"],
        vec!["GPUCACHE.STATS", "e{u}"],
        vec!["GPUCACHE.ORDERBOOK", "eu"],
        vec!["GPUCACHE.INVALIDATE", "eu"],
        vec!["GPUCACHE.INVALIDATE", "eu", "gpucache:{us}:gpu:g1"],
        vec!["GPUCACHE.INVALIDATE", "eu", "widget:1"],
    ];
    for args in &cases {
        let err = error(&mut con, args);
        assert!(
            err.starts_with("ERR ") && err.len() > 8,
            "{:?}: {err}",
            &args[..args.len().min(4)]
        );
        assert!(!err.contains("panic"), "{err}");
    }
    assert_eq!(snapshot(&mut con), before);
    let pong: String = redis::cmd("PING").query(&mut con).unwrap();
    assert_eq!(pong, "PONG", "the server survived every case");
    assert_consistent(&mut con, "eu");
}

#[test]
fn a_foreign_value_in_a_gpucache_key_is_refused_without_writing() {
    let server = Server::start(&[], &[]);
    let mut con = server.connect();
    seed(&mut con);
    redis::cmd("SET")
        .arg("gpucache:{eu}:gpu:g9")
        .arg("oops")
        .query::<()>(&mut con)
        .unwrap();
    redis::cmd("SET")
        .arg("gpucache:{eu}:price:H100")
        .arg("oops")
        .query::<()>(&mut con)
        .unwrap();
    redis::cmd("SET")
        .arg("gpucache:{eu}:booking:b7")
        .arg("oops")
        .query::<()>(&mut con)
        .unwrap();
    let before = snapshot(&mut con);
    for args in [
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
        vec![
            "GPUCACHE.REGISTER",
            "eu",
            "g5",
            "PROVIDER",
            "p1",
            "TYPE",
            "H100",
            "PRICE",
            "1",
        ],
        vec!["GPUCACHE.PRICE", "eu", "H100", "2"],
        vec!["GPUCACHE.BOOK", "eu", "g4", "b1", "u", "60"],
        vec!["GPUCACHE.BOOK", "eu", "g1", "b7", "u", "60"],
        vec!["GPUCACHE.GET", "eu", "g9"],
    ] {
        let err = error(&mut con, &args);
        assert!(err.starts_with("WRONGTYPE"), "{args:?}: {err}");
    }
    assert_eq!(snapshot(&mut con), before);

    // A hash that lacks gpucache's fields is reported, not trusted.
    redis::cmd("HSET")
        .arg("gpucache:{eu}:gpu:g8")
        .arg("status")
        .arg("busy")
        .query::<()>(&mut con)
        .unwrap();
    assert!(error(&mut con, &["GPUCACHE.GET", "eu", "g8"]).starts_with("CORRUPT"));

    // A sequence beyond any gpucache issues (it would stop growing at the largest integer) is
    // refused, and the module repairs the region itself: versions resume where they were.
    let newest: i64 = fields(&mut con, &["GPUCACHE.GET", "eu", "g2"])["version"]
        .parse()
        .unwrap();
    redis::cmd("HSET")
        .arg("gpucache:{eu}:stats:market")
        .arg("seq")
        .arg(i64::MAX)
        .query::<()>(&mut con)
        .unwrap();
    let refused = error(&mut con, &["GPUCACHE.STATUS", "eu", "g2", "offline"]);
    assert!(
        refused.starts_with("CORRUPT") && refused.contains("a repair is queued"),
        "{refused}"
    );
    let mut changed = None;
    eventually(
        "the queued repair restores the sequence",
        std::time::Duration::from_secs(10),
        || {
            changed = run(&mut con, &["GPUCACHE.STATUS", "eu", "g2", "offline"]).ok();
            changed.is_some()
        },
    );
    let version: i64 = text(&as_map(&changed.unwrap())["version"]).parse().unwrap();
    assert!(version > newest && version < 1 << 53, "{version}");

    // A broken event stream stops every write in the region.
    redis::cmd("DEL")
        .arg("gpucache:{eu}:events")
        .query::<()>(&mut con)
        .unwrap();
    redis::cmd("SET")
        .arg("gpucache:{eu}:events")
        .arg("oops")
        .query::<()>(&mut con)
        .unwrap();
    let before = snapshot(&mut con);
    assert!(error(&mut con, &["GPUCACHE.STATUS", "eu", "g1", "offline"]).starts_with("WRONGTYPE"));
    assert!(
        error(&mut con, &["GPUCACHE.PROVIDER", "eu", "p1", "offline"]).starts_with("WRONGTYPE")
    );
    assert_eq!(snapshot(&mut con), before);
}

#[test]
fn replies_are_maps_in_resp3() {
    let server = Server::start(&[], &[]);
    let mut con = server.connect_resp3();
    seed(&mut con);
    let reply = run(&mut con, &["GPUCACHE.GET", "eu", "g1"]).unwrap();
    assert!(matches!(reply, Value::Map(_)), "{reply:?}");
    assert_eq!(text(&as_map(&reply)["price"]), "2.5");
    let stats = run(&mut con, &["GPUCACHE.STATS", "eu"]).unwrap();
    assert!(matches!(as_map(&stats)["types"], Value::Map(_)));
}

#[test]
fn commands_declare_flags_and_the_region_as_their_key() {
    let server = Server::start(&[], &[]);
    let mut con = server.connect();
    let info = run(
        &mut con,
        &["COMMAND", "INFO", "gpucache.book", "gpucache.get"],
    )
    .unwrap();
    let Value::Array(entries) = info else {
        panic!()
    };
    let describe = |entry: &Value| -> (Vec<String>, i64) {
        let Value::Array(parts) = entry else {
            panic!("{entry:?}")
        };
        let Value::Array(flags) = &parts[2] else {
            panic!()
        };
        let Value::Int(first_key) = parts[3] else {
            panic!()
        };
        (flags.iter().map(text).collect(), first_key)
    };
    let (book_flags, book_key) = describe(&entries[0]);
    assert!(book_flags.contains(&"write".into()) && book_flags.contains(&"denyoom".into()));
    assert_eq!(book_key, 1);
    let (get_flags, _) = describe(&entries[1]);
    assert!(get_flags.contains(&"readonly".into()) && get_flags.contains(&"fast".into()));
    let keys = run(
        &mut con,
        &[
            "COMMAND",
            "GETKEYS",
            "GPUCACHE.BOOK",
            "eu",
            "g1",
            "b",
            "u",
            "1",
        ],
    )
    .unwrap();
    assert_eq!(keys, Value::Array(vec![Value::BulkString(b"eu".to_vec())]));
}

#[test]
fn load_arguments_set_the_configuration() {
    let server = Server::start(
        &[
            "AVAILABILITY_TTL",
            "120",
            "JITTER",
            "0",
            "STREAM_MAXLEN",
            "50",
        ],
        &[],
    );
    let mut con = server.connect();
    let jitter: Vec<String> = redis::cmd("CONFIG")
        .arg("GET")
        .arg("gpucache.jitter")
        .query(&mut con)
        .unwrap();
    assert_eq!(jitter, ["gpucache.jitter", "0"]);
    seed(&mut con);
    let ttl: i64 = redis::cmd("PTTL")
        .arg("gpucache:{eu}:gpu:g1")
        .query(&mut con)
        .unwrap();
    assert!((119_000..=120_000).contains(&ttl), "{ttl}");
    redis::cmd("CONFIG")
        .arg("SET")
        .arg("gpucache.availability-ttl")
        .arg("30")
        .query::<()>(&mut con)
        .unwrap();
    run(&mut con, &["GPUCACHE.STATUS", "eu", "g1", "offline"]).unwrap();
    let ttl: i64 = redis::cmd("PTTL")
        .arg("gpucache:{eu}:gpu:g1")
        .query(&mut con)
        .unwrap();
    assert!((29_000..=30_000).contains(&ttl), "{ttl}");
    assert!(redis::cmd("CONFIG")
        .arg("SET")
        .arg("gpucache.jitter")
        .arg("80")
        .query::<()>(&mut con)
        .is_err());
}

#[test]
fn an_unknown_load_argument_refuses_to_load() {
    let port = free_port();
    let status = std::process::Command::new("redis-server")
        .args([
            "--port",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
        ])
        .arg("--loadmodule")
        .arg(module_path())
        .args(["TTL_EVERYTHING", "5"])
        .stdout(std::process::Stdio::null())
        .status()
        .unwrap();
    assert!(
        !status.success(),
        "redis-server must refuse to start with a bad module argument"
    );
}

#[test]
fn invalidate_names_keys_without_changing_data() {
    let server = Server::start(&[], &[]);
    let mut con = server.connect();
    seed(&mut con);
    let before = snapshot(&mut con);
    let count: i64 = redis::cmd("GPUCACHE.INVALIDATE")
        .arg("eu")
        .arg("gpu:g1")
        .arg("gpucache:{eu}:price:A100")
        .arg("stats")
        .arg("gpu:g1")
        .query(&mut con)
        .unwrap();
    assert_eq!(count, 3, "duplicates are named once");
    let mut after = snapshot(&mut con);
    let mut before = before;
    // Only the event stream grew.
    after.remove("gpucache:{eu}:events");
    before.remove("gpucache:{eu}:events");
    assert_eq!(after, before);
}

#[test]
fn check_reports_what_a_hand_edit_broke() {
    let server = Server::start(&[], &[]);
    let mut con = server.connect();
    seed(&mut con);
    run(&mut con, &["GPUCACHE.BOOK", "eu", "g1", "b1", "u", "600"]).unwrap();
    assert_consistent(&mut con, "eu");
    redis::cmd("ZREM")
        .arg("gpucache:{eu}:avail-own:A100")
        .arg("g2")
        .query::<()>(&mut con)
        .unwrap();
    redis::cmd("HINCRBY")
        .arg("gpucache:{eu}:stats:market")
        .arg("gpus:busy")
        .arg(5)
        .query::<()>(&mut con)
        .unwrap();
    redis::cmd("DEL")
        .arg("gpucache:{eu}:booking:b1")
        .query::<()>(&mut con)
        .unwrap();
    let report = run(&mut con, &["GPUCACHE.CHECK", "eu"]).unwrap();
    let report = as_map(&report);
    assert_eq!(text(&report["ok"]), "0");
    let Value::Array(violations) = &report["violations"] else {
        panic!()
    };
    let violations: Vec<String> = violations.iter().map(text).collect();
    let has = |needle: &str| violations.iter().any(|v| v.contains(needle));
    assert!(has("g2 should be in avail-own:A100"), "{violations:?}");
    assert!(
        has("busy GPU count is 6, recount gives 1"),
        "{violations:?}"
    );
    assert!(
        has("g1 holds booking b1, which does not exist"),
        "{violations:?}"
    );
    assert_eq!(text(&report["gpus_checked"]), "4");
}

#[test]
fn overflowing_or_garbage_counters_cannot_break_a_command() {
    let server = Server::start(&[], &[]);
    let mut con = server.connect();
    seed(&mut con);
    register(&mut con, "us", "u1", "p", "T", "1");
    let max = i64::MAX.to_string();
    redis::cmd("HSET")
        .arg("gpucache:{eu}:stats:market")
        .arg("bookings:created")
        .arg(&max)
        .query::<()>(&mut con)
        .unwrap();
    redis::cmd("HSET")
        .arg("gpucache:{us}:stats:market")
        .arg("bookings:created")
        .arg(5)
        .query::<()>(&mut con)
        .unwrap();
    let all = fields(&mut con, &["GPUCACHE.STATS"]);
    assert_eq!(
        all["bookings_created"], max,
        "sums saturate instead of overflowing"
    );

    // A counter overwritten with text is rebuilt by the next change instead of failing it.
    redis::cmd("HSET")
        .arg("gpucache:{eu}:stats:market")
        .arg("gpus:busy")
        .arg("x")
        .query::<()>(&mut con)
        .unwrap();
    run(&mut con, &["GPUCACHE.BOOK", "eu", "g2", "b1", "u", "60"]).unwrap();
    let stats = fields(&mut con, &["GPUCACHE.STATS", "eu"]);
    assert_eq!(
        (
            stats["gpus_busy"].as_str(),
            stats["gpus_available"].as_str()
        ),
        ("1", "3")
    );
    assert_eq!(stats["bookings_created"], max, "saturated, not wrapped");
    assert_consistent(&mut con, "eu");

    // The price sequence orders own against type prices: garbage there is refused, never reset
    // to a guess; the queued repair resumes it above every version still visible.
    let newest: i64 = fields(&mut con, &["GPUCACHE.GET", "eu", "g2"])["version"]
        .parse()
        .unwrap();
    redis::cmd("HSET")
        .arg("gpucache:{eu}:stats:market")
        .arg("seq")
        .arg("x")
        .query::<()>(&mut con)
        .unwrap();
    let err = error(
        &mut con,
        &[
            "GPUCACHE.REGISTER",
            "eu",
            "g9",
            "PROVIDER",
            "p",
            "TYPE",
            "T",
            "PRICE",
            "1",
        ],
    );
    assert!(
        err.starts_with("CORRUPT") && err.contains("a repair is queued"),
        "{err}"
    );
    let mut priced = None;
    eventually(
        "the queued repair restores the sequence",
        std::time::Duration::from_secs(10),
        || {
            priced = run(&mut con, &["GPUCACHE.PRICE", "eu", "A100", "1"]).ok();
            priced.is_some()
        },
    );
    let version: i64 = text(&as_map(&priced.unwrap())["version"]).parse().unwrap();
    assert!(
        version > newest,
        "a version was reissued: {version} <= {newest}"
    );
    assert_consistent(&mut con, "eu");
    let pong: String = redis::cmd("PING").query(&mut con).unwrap();
    assert_eq!(pong, "PONG");
}
