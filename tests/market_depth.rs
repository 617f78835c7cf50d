//! Dynamic pricing, the order book, search and 24-hour statistics.

mod common;

use common::*;
use redis::Value;
use serde_json::Value as Json;

fn ten_a100s(con: &mut redis::Connection) {
    for i in 0..10 {
        let id = format!("a{i}");
        let memory = if i % 2 == 0 { "80" } else { "40" };
        let score = format!("{}", 10 - i);
        run(
            con,
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
                memory,
                "CORES",
                &format!("{}", 1000 * (i + 1)),
                "SCORE",
                &score,
            ],
        )
        .unwrap();
    }
}

fn demand_events(con: &mut redis::Connection) -> Vec<Json> {
    let entries: Vec<(String, Vec<(String, String)>)> = redis::cmd("XRANGE")
        .arg("gpucache:{eu}:events")
        .arg("-")
        .arg("+")
        .query(con)
        .unwrap();
    entries
        .into_iter()
        .filter_map(|(_, fields)| fields.into_iter().find(|(k, _)| k == "payload"))
        .map(|(_, p)| serde_json::from_str::<Json>(&p).unwrap())
        .filter(|e| e["reason"] == "demand")
        .collect()
}

#[test]
fn the_demand_multiplier_crosses_thresholds_in_both_directions() {
    let server = Server::start(&[], &[]);
    let mut con = server.connect();
    ten_a100s(&mut con);
    for i in 0..5 {
        let booked = fields(
            &mut con,
            &[
                "GPUCACHE.BOOK",
                "eu",
                &format!("a{i}"),
                &format!("b{i}"),
                "u",
                "3600",
            ],
        );
        assert_eq!(booked["price"], "1", "50% or more available: x1");
    }
    assert!(demand_events(&mut con).is_empty(), "no crossing yet");
    assert_eq!(
        fields(&mut con, &["GPUCACHE.GET", "eu", "a9"])["price"],
        "1"
    );

    // The sixth booking takes availability to 40%: below 50% -> x1.2, in the same command.
    let sixth = fields(&mut con, &["GPUCACHE.BOOK", "eu", "a5", "b5", "u", "3600"]);
    assert_eq!(
        sixth["price"], "1",
        "charged the price shown before it booked"
    );
    let gpu = fields(&mut con, &["GPUCACHE.GET", "eu", "a9"]);
    assert_eq!(
        (gpu["price"].as_str(), gpu["base_price"].as_str()),
        ("1.2", "1")
    );
    assert_eq!(gpu["demand_multiplier"], "1.2");
    let events = demand_events(&mut con);
    assert_eq!(events.len(), 1);
    assert_eq!(events[0]["type"], "pricing_updated");
    assert_eq!(events[0]["gpu_type"], "A100");
    assert_eq!(events[0]["old"]["multiplier"], "1");
    assert_eq!(events[0]["new"]["multiplier"], "1.2");
    let rows = run(&mut con, &["GPUCACHE.AVAILABLE", "eu", "LIMIT", "1"]).unwrap();
    let Value::Array(rows) = rows else { panic!() };
    assert_eq!(text(&as_map(&rows[0])["price"]), "1.2");

    // Cancelling one goes back to 50%: x1 again, one more event.
    run(&mut con, &["GPUCACHE.CANCEL", "eu", "b5"]).unwrap();
    assert_eq!(
        fields(&mut con, &["GPUCACHE.GET", "eu", "a9"])["price"],
        "1"
    );
    let events = demand_events(&mut con);
    assert_eq!(events.len(), 2);
    assert_eq!(events[1]["old"]["multiplier"], "1.2");
    assert_eq!(events[1]["new"]["multiplier"], "1");

    // Deeper: 2 of 10 listed (20%) -> x1.5; 0 listed -> x2.
    for i in 5..8 {
        run(
            &mut con,
            &[
                "GPUCACHE.BOOK",
                "eu",
                &format!("a{i}"),
                &format!("c{i}"),
                "u",
                "60",
            ],
        )
        .unwrap();
    }
    assert_eq!(
        fields(&mut con, &["GPUCACHE.ORDERBOOK", "eu", "A100"])["demand_multiplier"],
        "1.5"
    );
    run(&mut con, &["GPUCACHE.PROVIDER", "eu", "p1", "offline"]).unwrap();
    assert_eq!(
        fields(&mut con, &["GPUCACHE.GET", "eu", "a9"])["price"],
        "2"
    );
    assert_consistent(&mut con, "eu");
}

#[test]
fn demand_tiers_are_configurable_at_run_time() {
    let server = Server::start(&["DEMAND_TIERS", "20:3"], &[]);
    let mut con = server.connect();
    ten_a100s(&mut con);
    for i in 0..8 {
        run(
            &mut con,
            &[
                "GPUCACHE.BOOK",
                "eu",
                &format!("a{i}"),
                &format!("b{i}"),
                "u",
                "60",
            ],
        )
        .unwrap();
    }
    assert_eq!(
        fields(&mut con, &["GPUCACHE.GET", "eu", "a9"])["price"],
        "1",
        "20% is not below 20%"
    );
    run(&mut con, &["GPUCACHE.BOOK", "eu", "a8", "b8", "u", "60"]).unwrap();
    assert_eq!(
        fields(&mut con, &["GPUCACHE.GET", "eu", "a9"])["price"],
        "3"
    );
    redis::cmd("CONFIG")
        .arg("SET")
        .arg("gpucache.demand-tiers")
        .arg("")
        .query::<()>(&mut con)
        .unwrap();
    assert_eq!(
        fields(&mut con, &["GPUCACHE.GET", "eu", "a9"])["price"],
        "1",
        "no tiers, no surge"
    );
    let bad = redis::cmd("CONFIG")
        .arg("SET")
        .arg("gpucache.demand-tiers")
        .arg("10:lots")
        .query::<()>(&mut con);
    assert!(bad.is_err());
    let current: Vec<String> = redis::cmd("CONFIG")
        .arg("GET")
        .arg("gpucache.demand-tiers")
        .query(&mut con)
        .unwrap();
    assert_eq!(
        current[1], "",
        "a rejected value leaves the tiers as they were"
    );
}

fn asks(reply: &Value) -> Vec<(String, String)> {
    let book = as_map(reply);
    let Value::Array(levels) = &book["asks"] else {
        panic!("{book:?}")
    };
    levels
        .iter()
        .map(|l| {
            let l = as_map(l);
            (text(&l["price"]), text(&l["gpus"]))
        })
        .collect()
}

#[test]
fn the_order_book_lists_price_levels_from_the_index() {
    let server = Server::start(&[], &[]);
    let mut con = server.connect();
    for (id, price) in [
        ("g1", "2"),
        ("g2", "1.5"),
        ("g3", "2"),
        ("g4", "3"),
        ("g5", "1.5"),
        ("g6", "2"),
    ] {
        register(&mut con, "eu", id, "p", "A100", price);
    }
    let book = run(&mut con, &["GPUCACHE.ORDERBOOK", "eu", "A100"]).unwrap();
    assert_eq!(
        asks(&book),
        [
            ("1.5".into(), "2".into()),
            ("2".into(), "3".into()),
            ("3".into(), "1".into())
        ]
    );
    let top = run(
        &mut con,
        &["GPUCACHE.ORDERBOOK", "eu", "A100", "DEPTH", "1"],
    )
    .unwrap();
    assert_eq!(asks(&top), [("1.5".to_string(), "2".to_string())]);

    // Booking takes one GPU off its level and emits order_book_updated.
    run(&mut con, &["GPUCACHE.BOOK", "eu", "g2", "b1", "u", "60"]).unwrap();
    let book = run(&mut con, &["GPUCACHE.ORDERBOOK", "eu", "A100"]).unwrap();
    assert_eq!(asks(&book)[0], ("1.5".to_string(), "1".to_string()));
    let last: Vec<(String, Vec<(String, String)>)> = redis::cmd("XREVRANGE")
        .arg("gpucache:{eu}:events")
        .arg("+")
        .arg("-")
        .arg("COUNT")
        .arg("1")
        .query(&mut con)
        .unwrap();
    assert_eq!(
        last[0].1[0],
        ("type".to_string(), "order_book_updated".to_string())
    );

    // A type price gathers the type-priced GPUs on one level; a newer own price stays apart.
    run(&mut con, &["GPUCACHE.PRICE", "eu", "A100", "2.5"]).unwrap();
    register(&mut con, "eu", "g4", "p", "A100", "2.5");
    let book = run(&mut con, &["GPUCACHE.ORDERBOOK", "eu", "A100"]).unwrap();
    assert_eq!(asks(&book), [("2.5".to_string(), "5".to_string())]);
    let empty = run(&mut con, &["GPUCACHE.ORDERBOOK", "eu", "Z9"]).unwrap();
    assert!(asks(&empty).is_empty());
    assert!(error(
        &mut con,
        &["GPUCACHE.ORDERBOOK", "eu", "A100", "DEPTH", "0"]
    )
    .starts_with("ERR"));
    assert!(error(
        &mut con,
        &["GPUCACHE.ORDERBOOK", "eu", "A100", "WIDTH", "2"]
    )
    .starts_with("ERR"));
    assert_consistent(&mut con, "eu");
}

#[test]
fn search_filters_and_sorts_by_score() {
    let server = Server::start(&[], &[]);
    let mut con = server.connect();
    ten_a100s(&mut con);
    run(
        &mut con,
        &[
            "GPUCACHE.REGISTER",
            "eu",
            "h1",
            "PROVIDER",
            "p2",
            "TYPE",
            "H100",
            "PRICE",
            "0.5",
            "MEMORY",
            "80",
            "CORES",
            "20000",
            "SCORE",
            "50",
        ],
    )
    .unwrap();
    assert_eq!(
        available_ids(&mut con, &["eu", "SORT", "SCORE", "LIMIT", "3"]),
        ["h1", "a0", "a1"]
    );
    assert_eq!(
        available_ids(
            &mut con,
            &[
                "eu",
                "TYPE",
                "A100",
                "SORT",
                "SCORE",
                "MINMEMORY",
                "80",
                "LIMIT",
                "2"
            ]
        ),
        ["a0", "a2"]
    );
    assert_eq!(
        available_ids(&mut con, &["eu", "MINCORES", "9000"]),
        ["h1", "a8", "a9"],
        "cheapest first by default"
    );
    assert_eq!(
        available_ids(&mut con, &["eu", "SORT", "SCORE", "MAXPRICE", "0.9"]),
        ["h1"]
    );
    assert_eq!(
        available_ids(
            &mut con,
            &[
                "eu",
                "SORT",
                "PRICE",
                "MINMEMORY",
                "80",
                "MINCORES",
                "5000",
                "LIMIT",
                "10"
            ]
        ),
        ["h1", "a4", "a6", "a8"]
    );
    // Booked GPUs leave the score index too.
    run(&mut con, &["GPUCACHE.BOOK", "eu", "h1", "b", "u", "60"]).unwrap();
    assert_eq!(
        available_ids(&mut con, &["eu", "SORT", "SCORE", "LIMIT", "1"]),
        ["a0"]
    );
    assert_consistent(&mut con, "eu");
}

#[test]
fn stats_count_the_last_24_hours_and_sum_all_regions() {
    let server = Server::start(&[], &[]);
    let mut con = server.connect();
    ten_a100s(&mut con);
    register(&mut con, "us", "u1", "p", "H100", "4");
    run(&mut con, &["GPUCACHE.BOOK", "eu", "a0", "b0", "u", "7200"]).unwrap();
    run(&mut con, &["GPUCACHE.BOOK", "eu", "a1", "b1", "u", "1800"]).unwrap();
    run(&mut con, &["GPUCACHE.CANCEL", "eu", "b1"]).unwrap();
    run(&mut con, &["GPUCACHE.BOOK", "us", "u1", "b9", "u", "3600"]).unwrap();

    let eu = run(&mut con, &["GPUCACHE.STATS", "eu"]).unwrap();
    let eu = as_map(&eu);
    assert_eq!(
        text(&eu["bookings_24h"]),
        "2",
        "a cancelled booking was still created"
    );
    assert_eq!(text(&eu["volume_24h"]), "2.5", "1 x 2h + 1 x 0.5h");
    let a100 = as_map(&as_map(&eu["types"])["A100"]);
    assert_eq!(text(&a100["listed"]), "9");
    assert_eq!(text(&a100["total"]), "10");
    assert_eq!(text(&a100["demand_multiplier"]), "1");
    assert_eq!(text(&a100["avg_price"]), "1");

    {
        let all = run(&mut con, &["GPUCACHE.STATS"]).unwrap();
        let all = as_map(&all);
        assert_eq!(text(&all["region"]), "*");
        assert_eq!(text(&all["regions"]), "2");
        assert_eq!(text(&all["gpus_total"]), "11");
        assert_eq!(text(&all["gpus_busy"]), "2");
        assert_eq!(text(&all["bookings_24h"]), "3");
        assert_eq!(text(&all["volume_24h"]), "6.5");
        let types = as_map(&all["types"]);
        assert_eq!(text(&as_map(&types["H100"])["listed"]), "0");
        assert_eq!(text(&as_map(&types["A100"])["total"]), "10");
    }
    // `*` is no region (and a cluster would route it to the slot of `*`): refused, pointing to
    // the form without an argument.
    assert_eq!(
        error(&mut con, &["GPUCACHE.STATS", "*"]),
        "ERR '*' is not a region: send GPUCACHE.STATS with no argument for every region on this server"
    );
    assert_consistent(&mut con, "eu");
}

#[test]
fn the_24_hour_window_is_market_state_without_a_ttl() {
    let server = Server::start(&[], &[]);
    let mut con = server.connect();
    ten_a100s(&mut con);
    let window = "gpucache:{eu}:stats:24h";
    let expire_time = |con: &mut redis::Connection| -> i64 {
        redis::cmd("PEXPIRETIME").arg(window).query(con).unwrap()
    };
    run(&mut con, &["GPUCACHE.BOOK", "eu", "a0", "b0", "u", "60"]).unwrap();
    assert_eq!(
        expire_time(&mut con),
        -1,
        "no volatile-* policy may evict the window"
    );
    // A window written by an earlier version, with a TTL, loses it at the next booking.
    redis::cmd("PEXPIRE")
        .arg(window)
        .arg(3_600_000)
        .query::<i64>(&mut con)
        .unwrap();
    run(&mut con, &["GPUCACHE.BOOK", "eu", "a1", "b1", "u", "60"]).unwrap();
    assert_eq!(expire_time(&mut con), -1);
    assert_eq!(
        fields(&mut con, &["GPUCACHE.STATS", "eu"])["bookings_24h"],
        "2"
    );
    assert_consistent(&mut con, "eu");
}

#[test]
fn stats_of_all_regions_survive_a_restart() {
    let server = Server::start(&[], &["--appendonly", "yes", "--appendfsync", "always"]);
    let mut con = server.connect();
    register(&mut con, "eu", "g", "p", "T", "1");
    register(&mut con, "us", "g", "p", "T", "1");
    drop(con);
    let dir = server.stop();
    let restarted = Server::start_in(dir, free_port(), &[], &["--appendonly", "yes"]);
    let mut con = restarted.connect();
    let all = fields(&mut con, &["GPUCACHE.STATS"]);
    assert_eq!(
        (all["regions"].as_str(), all["gpus_total"].as_str()),
        ("2", "2")
    );
}

#[test]
fn stats_of_all_regions_survive_an_rdb_restart() {
    let server = Server::start(&[], &[]);
    let mut con = server.connect();
    register(&mut con, "eu", "g", "p", "T", "1");
    register(&mut con, "ap", "g", "p", "T", "1");
    redis::cmd("SAVE").query::<()>(&mut con).unwrap();
    drop(con);
    let dir = server.stop();
    let restarted = Server::start_in(dir, free_port(), &[], &[]);
    let mut con = restarted.connect();
    let keys: i64 = redis::cmd("DBSIZE").query(&mut con).unwrap();
    assert!(keys > 0, "loaded from the RDB file");
    let all = fields(&mut con, &["GPUCACHE.STATS"]);
    assert_eq!(
        (all["regions"].as_str(), all["gpus_total"].as_str()),
        ("2", "2")
    );
}

#[test]
fn crowded_price_levels_are_counted_whole() {
    // Levels larger than the walk's limit are counted with ZCOUNT and the walk resumes after
    // them; small levels in between are walked.
    let server = Server::start(&[], &[]);
    let mut con = server.connect();
    let layout = [("1.25", 9), ("1.5", 1), ("2", 70), ("2.5", 5), ("3", 2)];
    let mut n = 0;
    for (price, count) in layout {
        for _ in 0..count {
            n += 1;
            let id = format!("g{n}");
            register(&mut con, "eu", &id, "p", "A100", price);
        }
    }
    // Every GPU is listed, so the demand multiplier is 1 and shown prices are base prices.
    let book = run(
        &mut con,
        &["GPUCACHE.ORDERBOOK", "eu", "A100", "DEPTH", "4"],
    )
    .unwrap();
    let expected: Vec<(String, String)> = [("1.25", 9), ("1.5", 1), ("2", 70), ("2.5", 5)]
        .iter()
        .map(|(p, c)| (p.to_string(), c.to_string()))
        .collect();
    assert_eq!(asks(&book), expected);
    let book = run(&mut con, &["GPUCACHE.ORDERBOOK", "eu", "A100"]).unwrap();
    assert_eq!(asks(&book).len(), 5);
    assert_eq!(asks(&book)[4], ("3".to_string(), "2".to_string()));
}

/// A filter few GPUs pass stops after `gpucache.search-max-skips` GPUs passed over, answering
/// with what it found, rather than reading every record of the type while others wait.
#[test]
fn a_selective_search_stops_after_the_configured_skips() {
    let server = Server::start(&[], &[]);
    let mut con = server.connect();
    for i in 0..50 {
        let id = format!("small{i:02}");
        let args = register_args("eu", &id, "p", "A100", "1", &["MEMORY", "16"]);
        run(&mut con, &args).expect("register");
    }
    for id in ["big1", "big2"] {
        let args = register_args("eu", id, "p", "A100", "9", &["MEMORY", "80"]);
        run(&mut con, &args).expect("register");
    }
    let search = ["eu", "MINMEMORY", "80"];
    assert_eq!(available_ids(&mut con, &search), ["big1", "big2"]);
    assert_eq!(info_field(&mut con, "gpucache_searches_cut_short"), 0);

    run(
        &mut con,
        &["CONFIG", "SET", "gpucache.search-max-skips", "10"],
    )
    .expect("CONFIG SET");
    assert_eq!(available_ids(&mut con, &search), Vec::<String>::new());
    assert_eq!(info_field(&mut con, "gpucache_searches_cut_short"), 1);
    // GPUs that pass do not count against the bound.
    assert_eq!(
        available_ids(&mut con, &["eu", "LIMIT", "30"]).len(),
        30,
        "an unfiltered search is never cut short"
    );
    assert_eq!(info_field(&mut con, "gpucache_searches_cut_short"), 1);
}
