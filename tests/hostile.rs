//! Hostile input: arbitrary byte strings, huge numbers, NaN/inf, negative durations, 1 MB ids
//! and keys of the wrong type thrown at every command. The server must stay up, every refused
//! command must leave every key as it was, and the region's invariants must hold.
//!
//! Cases: `HOSTILE_CASES` (default 400).

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
    let server = Server::start(&[], &[]);
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
