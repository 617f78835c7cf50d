//! `PRICE` on a type of many own-priced GPUs costs O(1): they show the type price at once
//! (AVAILABLE, ORDERBOOK, STATS, CHECK read the draining set as type-priced) and reach the
//! type-price index a slice at a time after the command. An expired type price sends its GPUs
//! back to their own prices in slices too.

mod common;

use common::*;
use redis::{Connection, Value};
use std::collections::HashMap;
use std::time::Duration;

/// More than `type_drains::INLINE_GPUS`, so the move runs after the command.
const LARGE: usize = 300;
const OWN: &str = "gpucache:{eu}:avail-own:A100";
const TYPED: &str = "gpucache:{eu}:avail-type:A100";
const DRAINING: &str = "gpucache:{eu}:avail-draining:A100";
const PRICE_KEY: &str = "gpucache:{eu}:price:A100";

fn gpu_id(i: usize) -> String {
    format!("g{i:04}")
}

/// Own prices 5.5 to 11.5, all above the type prices the tests set.
fn register_large_type(con: &mut Connection) {
    let mut pipe = redis::pipe();
    for i in 0..LARGE {
        let price = format!("{}.5", 5 + i % 7);
        pipe.cmd("GPUCACHE.REGISTER")
            .arg(&register_args("eu", &gpu_id(i), "p1", "A100", &price, &[])[1..])
            .ignore();
    }
    pipe.query::<()>(con).expect("register");
}

fn zcard(con: &mut Connection, key: &str) -> i64 {
    redis::cmd("ZCARD").arg(key).query(con).expect("ZCARD")
}

fn exists(con: &mut Connection, key: &str) -> i64 {
    redis::cmd("EXISTS").arg(key).query(con).expect("EXISTS")
}

fn drained(con: &mut Connection) {
    eventually("type drains done", Duration::from_secs(30), || {
        info_field(con, "gpucache_type_drains_pending") == 0
    });
    assert_eq!(exists(con, DRAINING), 0, "a finished drain leaves no key");
}

fn rows(reply: &Value) -> Vec<HashMap<String, String>> {
    match reply {
        Value::Array(rows) => rows
            .iter()
            .map(|row| {
                as_map(row)
                    .into_iter()
                    .map(|(k, v)| (k, text(&v)))
                    .collect()
            })
            .collect(),
        other => panic!("expected rows, got {other:?}"),
    }
}

fn ids(rows: &[HashMap<String, String>]) -> Vec<String> {
    rows.iter().map(|r| r["gpu_id"].clone()).collect()
}

#[test]
fn a_large_price_answers_at_once_and_every_reader_sees_the_type_price() {
    let server = Server::start(&[], &[]);
    let mut con = server.connect();
    register_large_type(&mut con);

    // MULTI: no timer runs between the commands, so the readers see the state the command left.
    let (price, draining, typed, available, book, stats, check): (
        Value,
        i64,
        i64,
        Value,
        Value,
        Value,
        Value,
    ) = redis::pipe()
        .atomic()
        .cmd("GPUCACHE.PRICE")
        .arg(&["eu", "A100", "3"])
        .cmd("ZCARD")
        .arg(DRAINING)
        .cmd("ZCARD")
        .arg(TYPED)
        .cmd("GPUCACHE.AVAILABLE")
        .arg(&["eu", "TYPE", "A100", "LIMIT", "5"])
        .cmd("GPUCACHE.ORDERBOOK")
        .arg(&["eu", "A100"])
        .cmd("GPUCACHE.STATS")
        .arg("eu")
        .cmd("GPUCACHE.CHECK")
        .arg("eu")
        .query(&mut con)
        .expect("MULTI");
    assert_eq!(text(&as_map(&price)["listed_gpus"]), LARGE.to_string());
    assert_eq!(
        draining, LARGE as i64,
        "the own-price set was renamed whole"
    );
    assert_eq!(typed, 0, "nothing moved inside the command");

    let book = as_map(&book);
    let asks = rows(&book["asks"]);
    assert_eq!(asks.len(), 1, "one level, the type price: {asks:?}");
    assert_eq!(asks[0]["gpus"], LARGE.to_string());
    let shown = asks[0]["price"].clone();
    assert_eq!(text(&book["gpus_listed"]), LARGE.to_string());

    let offers = rows(&available);
    assert!(offers.iter().all(|o| o["price"] == shown), "{offers:?}");
    // While draining, GPUs at the type price come in their former own-price order (5.5 first:
    // every seventh id), not in id order.
    assert_eq!(ids(&offers), ["g0000", "g0007", "g0014", "g0021", "g0028"]);

    let stats = as_map(&stats);
    assert_eq!(text(&stats["gpus_listed"]), LARGE.to_string());
    let a100 = as_map(&as_map(&stats["types"])["A100"]);
    assert_eq!(text(&a100["listed"]), LARGE.to_string());
    assert_eq!(text(&a100["min_price"]), shown);
    assert_eq!(text(&a100["avg_price"]), shown);
    assert_eq!(
        text(&as_map(&check)["ok"]),
        "1",
        "CHECK counts draining GPUs as type-priced: {:?}",
        as_map(&check)["violations"]
    );

    // A GPU priced after the PRICE shows its own, cheaper price and comes first; MAXPRICE at
    // its price leaves out every GPU at the type price.
    register(&mut con, "eu", "cheap1", "p2", "A100", "2");
    let first = rows(&run(&mut con, &["GPUCACHE.AVAILABLE", "eu", "LIMIT", "3"]).expect("AV"));
    assert_eq!(first[0]["gpu_id"], "cheap1");
    assert!(first[1..].iter().all(|o| o["price"] != first[0]["price"]));
    let cheap_price = first[0]["price"].clone();
    assert_eq!(
        available_ids(&mut con, &["eu", "MAXPRICE", &cheap_price]),
        ["cheap1"]
    );

    drained(&mut con);
    assert_eq!(zcard(&mut con, TYPED), LARGE as i64);
    assert_eq!(zcard(&mut con, OWN), 1);
    // Drained: GPUs at the type price in id order again.
    assert_eq!(
        available_ids(&mut con, &["eu", "LIMIT", "4"]),
        ["cheap1", "g0000", "g0001", "g0002"]
    );
    assert_consistent(&mut con, "eu");
}

#[test]
fn a_second_large_price_during_a_drain_and_unlisting_keep_the_index_exact() {
    let server = Server::start(&[], &[]);
    let mut con = server.connect();
    register_large_type(&mut con);
    let mut pipe = redis::pipe();
    pipe.atomic()
        .cmd("GPUCACHE.PRICE")
        .arg(&["eu", "A100", "3"])
        .ignore();
    // 200 GPUs re-priced after it (own-priced again, out of the draining set) ...
    for i in 0..200 {
        pipe.cmd("GPUCACHE.REGISTER")
            .arg(&register_args("eu", &gpu_id(i), "p1", "A100", "1.25", &[])[1..])
            .ignore();
    }
    // ... one still draining unlisted, then a second PRICE over both sets.
    pipe.cmd("GPUCACHE.STATUS")
        .arg(&["eu", "g0250", "maintenance"])
        .ignore()
        .cmd("ZCARD")
        .arg(OWN)
        .cmd("GPUCACHE.PRICE")
        .arg(&["eu", "A100", "4"])
        .ignore()
        .cmd("ZCARD")
        .arg(OWN)
        .cmd("ZCARD")
        .arg(DRAINING)
        .cmd("ZSCORE")
        .arg(&[DRAINING, "g0250"]);
    let (own_between, own_after, draining, busy): (i64, i64, i64, Option<f64>) =
        pipe.query(&mut con).expect("MULTI");
    assert_eq!(own_between, 200);
    assert_eq!(own_after, 0);
    assert_eq!(draining, LARGE as i64 - 1);
    assert_eq!(busy, None, "an unlisted GPU leaves the draining set");
    let book = fields(&mut con, &["GPUCACHE.ORDERBOOK", "eu", "A100"]);
    assert_eq!(book["gpus_listed"], (LARGE - 1).to_string());
    assert_consistent(&mut con, "eu");

    drained(&mut con);
    assert_eq!(zcard(&mut con, TYPED), LARGE as i64 - 1);
    assert_consistent(&mut con, "eu");
}

#[test]
fn a_replica_gets_the_drain_as_the_primary_made_it() {
    let debug = ["--enable-debug-command", "yes"];
    let primary = Server::start(&[], &debug);
    let port = primary.port.to_string();
    let replica = Server::start(
        &[],
        &[&debug[..], &["--replicaof", "127.0.0.1", &port]].concat(),
    );
    let mut con = primary.connect();
    let mut replica_con = replica.connect();
    register_large_type(&mut con);
    run(&mut con, &["GPUCACHE.PRICE", "eu", "A100", "3"]).expect("PRICE");
    drained(&mut con);
    let acked: i64 = redis::cmd("WAIT")
        .arg(1)
        .arg(10_000)
        .query(&mut con)
        .expect("WAIT");
    assert_eq!(acked, 1);
    let digest = |c: &mut Connection| -> String {
        redis::cmd("DEBUG").arg("DIGEST").query(c).expect("DIGEST")
    };
    assert_eq!(digest(&mut con), digest(&mut replica_con));
    assert_same_state(&snapshot(&mut con), &snapshot(&mut replica_con), "replica");
}

#[test]
fn a_drain_left_unfinished_resumes_after_a_reload() {
    let server = Server::start(&[], &["--enable-debug-command", "yes"]);
    let mut con = server.connect();
    register_large_type(&mut con);
    run(&mut con, &["GPUCACHE.PRICE", "eu", "A100", "3"]).expect("PRICE");
    drained(&mut con);
    // What a primary that stopped mid-drain leaves behind: the type price and GPUs still in
    // the draining set, with no drain queued.
    run(&mut con, &["RENAME", TYPED, DRAINING]).expect("hand edit");
    assert_eq!(info_field(&mut con, "gpucache_type_drains_pending"), 0);
    run(&mut con, &["DEBUG", "RELOAD"]).expect("DEBUG RELOAD");
    eventually("the drain resumed", Duration::from_secs(30), || {
        zcard(&mut con, TYPED) == LARGE as i64
    });
    drained(&mut con);
    assert_consistent(&mut con, "eu");
}

#[test]
fn an_expired_type_price_sends_its_gpus_back_to_their_own_prices_in_slices() {
    let server = Server::start(&[], &[]);
    let mut con = server.connect();
    register_large_type(&mut con);
    run(&mut con, &["GPUCACHE.PRICE", "eu", "A100", "3"]).expect("PRICE");
    drained(&mut con);
    // A third of them still draining when the price goes.
    let moving: Vec<String> = redis::cmd("ZRANGE")
        .arg(&[TYPED, "0", "99"])
        .query(&mut con)
        .expect("ZRANGE");
    let mut pipe = redis::pipe();
    pipe.atomic();
    for id in &moving {
        pipe.cmd("ZADD").arg(&[DRAINING, "0", id]).ignore();
        pipe.cmd("ZREM").arg(&[TYPED, id]).ignore();
    }
    pipe.query::<()>(&mut con).expect("hand edit");
    let slices_before = info_field(&mut con, "gpucache_type_price_heal_slices");

    run(&mut con, &["PEXPIRE", PRICE_KEY, "1"]).expect("PEXPIRE");
    eventually(
        "every GPU back at its own price",
        Duration::from_secs(30),
        || zcard(&mut con, OWN) == LARGE as i64,
    );
    assert_eq!(zcard(&mut con, TYPED), 0);
    assert_eq!(exists(&mut con, DRAINING), 0);
    let slices = info_field(&mut con, "gpucache_type_price_heal_slices") - slices_before;
    assert!(
        slices >= (LARGE as i64 + 63) / 64,
        "{LARGE} GPUs healed in {slices} slices"
    );
    let offers = rows(&run(&mut con, &["GPUCACHE.AVAILABLE", "eu", "LIMIT", "2"]).expect("AV"));
    assert_eq!(ids(&offers), ["g0000", "g0007"], "own prices again");
    assert_consistent(&mut con, "eu");
}

#[test]
fn a_small_type_is_still_moved_inside_the_command() {
    let server = Server::start(&[], &[]);
    let mut con = server.connect();
    seed(&mut con);
    run(&mut con, &["GPUCACHE.PRICE", "eu", "A100", "3"]).expect("PRICE");
    assert_eq!(zcard(&mut con, TYPED), 3);
    assert_eq!(exists(&mut con, DRAINING), 0);
    assert_eq!(info_field(&mut con, "gpucache_type_drains_pending"), 0);
    assert_consistent(&mut con, "eu");
}
