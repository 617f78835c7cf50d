//! `GPUCACHE.STATS` without a region answers from this node's cache of every region's figures:
//! exact and fresh after every kind of write while the regions are few, and converging to the
//! exact sum, with the freshness fields saying how far it lags, when they are many.

mod common;

use common::*;
use std::collections::HashMap;
use std::time::Duration;

const SUMMED: [&str; 9] = [
    "gpus_total",
    "gpus_available",
    "gpus_busy",
    "gpus_maintenance",
    "gpus_offline",
    "bookings_active",
    "bookings_created",
    "bookings_cancelled",
    "bookings_24h",
];

fn number(figures: &HashMap<String, String>, field: &str) -> i64 {
    figures
        .get(field)
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("{field} missing or not a number in {figures:?}"))
}

/// The no-argument STATS compared with the sum of each region's own STATS.
fn assert_sum_is_exact(con: &mut redis::Connection, regions: &[&str], after: &str) {
    let all = fields(con, &["GPUCACHE.STATS"]);
    assert_eq!(all["stale_regions"], "0", "after {after}: {all:?}");
    assert_eq!(all["stale_ms"], "0", "after {after}: {all:?}");
    assert_eq!(
        number(&all, "regions"),
        regions.len() as i64,
        "after {after}"
    );
    for field in SUMMED {
        let expected: i64 = regions
            .iter()
            .map(|r| number(&fields(con, &["GPUCACHE.STATS", r]), field))
            .sum();
        assert_eq!(
            number(&all, field),
            expected,
            "{field} after {after}: {all:?}"
        );
    }
}

#[test]
fn with_few_regions_every_call_is_exact_after_any_write() {
    let server = Server::start(&[], &[]);
    let mut con = server.connect();
    let regions = ["eu", "us", "ap"];
    for (i, region) in regions.iter().enumerate() {
        for g in 0..=i {
            register(&mut con, region, &format!("g{g}"), "p1", "A100", "2");
        }
    }
    assert_sum_is_exact(&mut con, &regions, "registers");
    run(
        &mut con,
        &["GPUCACHE.BOOK", "us", "g0", "b0", "alice", "3600"],
    )
    .unwrap();
    assert_sum_is_exact(&mut con, &regions, "a booking");
    run(&mut con, &["GPUCACHE.STATUS", "ap", "g2", "maintenance"]).unwrap();
    assert_sum_is_exact(&mut con, &regions, "a status change");
    run(&mut con, &["GPUCACHE.CANCEL", "us", "b0"]).unwrap();
    assert_sum_is_exact(&mut con, &regions, "a cancellation");
    // A type price moves the type's GPUs to the type-price index: the shown minimum follows.
    run(&mut con, &["GPUCACHE.PRICE", "eu", "A100", "0.5"]).unwrap();
    let all = fields(&mut con, &["GPUCACHE.STATS"]);
    let types = run(&mut con, &["GPUCACHE.STATS"]).unwrap();
    let a100 = as_map(&as_map(&types)["types"]);
    let a100 = as_map(&a100["A100"]);
    assert_eq!(text(&a100["min_price"]), "0.5", "{all:?}");
    // A hand edit of a counter is an event like any write.
    run(
        &mut con,
        &[
            "HSET",
            "gpucache:{eu}:stats:market",
            "bookings:created",
            "40",
        ],
    )
    .unwrap();
    assert_sum_is_exact(&mut con, &regions, "a hand edit");
    // A region that goes away leaves the sum.
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg("gpucache:{ap}:*")
        .query(&mut con)
        .unwrap();
    redis::cmd("DEL").arg(&keys).query::<()>(&mut con).unwrap();
    eventually("ap leaves the sum", Duration::from_secs(10), || {
        fields(&mut con, &["GPUCACHE.STATS"])["regions"] == "2"
    });
    assert_sum_is_exact(&mut con, &["eu", "us"], "a region's deletion");
}

#[test]
fn with_many_regions_the_sum_converges_and_says_how_stale_it_is() {
    let server = Server::start(&[], &[]);
    let mut con = server.connect();
    const REGIONS: usize = 600;
    let mut pipe = redis::pipe();
    for r in 0..REGIONS {
        for g in 0..2 {
            pipe.cmd("GPUCACHE.REGISTER")
                .arg(format!("r{r}"))
                .arg(format!("g{g}"))
                .arg("PROVIDER")
                .arg("p1")
                .arg("TYPE")
                .arg(if g == 0 { "A100" } else { "H100" })
                .arg("PRICE")
                .arg("1.5")
                .ignore();
        }
    }
    pipe.query::<()>(&mut con).unwrap();
    // Whatever the first calls find still stale, the figures they show are within what was
    // written, and the freshness fields agree with each other.
    let mut calls = 0;
    eventually("every region read", Duration::from_secs(60), || {
        calls += 1;
        let all = fields(&mut con, &["GPUCACHE.STATS"]);
        let (regions, stale) = (number(&all, "regions"), number(&all, "stale_regions"));
        assert!(regions <= REGIONS as i64, "{all:?}");
        assert!(number(&all, "gpus_total") <= 2 * REGIONS as i64, "{all:?}");
        assert_eq!(stale == 0, number(&all, "stale_ms") == 0, "{all:?}");
        assert!(
            regions + stale >= REGIONS as i64,
            "unread regions are stale: {all:?}"
        );
        stale == 0
    });
    let all = fields(&mut con, &["GPUCACHE.STATS"]);
    assert_eq!(number(&all, "regions"), REGIONS as i64);
    assert_eq!(number(&all, "gpus_total"), 2 * REGIONS as i64);
    assert_eq!(number(&all, "gpus_available"), 2 * REGIONS as i64);
    // A change in one region: counted by the next call (a few stale regions fit its budget).
    run(&mut con, &["GPUCACHE.STATUS", "r7", "g1", "offline"]).unwrap();
    let all = fields(&mut con, &["GPUCACHE.STATS"]);
    assert_eq!(
        (all["gpus_offline"].as_str(), all["stale_regions"].as_str()),
        ("1", "0")
    );
}
