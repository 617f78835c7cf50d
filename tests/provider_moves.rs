//! A large provider's status change costs `PROVIDER` O(1): its GPUs are hidden from `AVAILABLE`
//! and `BOOK` at once, and moved out of (or back into) the availability index a slice at a
//! time after the command, as replicated writes a replica and a restart pick up.

mod common;

use common::*;
use redis::Connection;
use std::time::Duration;

/// More than `provider_moves::INLINE_GPUS`, so the move runs after the command.
const LARGE: usize = 300;

fn register_large_provider(con: &mut Connection) {
    let mut pipe = redis::pipe();
    for i in 0..LARGE {
        let id = format!("big{i:04}");
        let price = format!("{}.5", 1 + i % 7);
        pipe.cmd("GPUCACHE.REGISTER")
            .arg(&[
                "eu", &id, "PROVIDER", "big", "TYPE", "A100", "PRICE", &price,
            ])
            .ignore();
    }
    pipe.query::<()>(con).expect("register");
    register(con, "eu", "small1", "small", "A100", "9");
}

fn listed(con: &mut Connection) -> i64 {
    fields(con, &["GPUCACHE.STATS", "eu"])["gpus_listed"]
        .parse()
        .expect("gpus_listed")
}

fn moves_done(con: &mut Connection) {
    eventually("provider moves done", Duration::from_secs(30), || {
        info_field(con, "gpucache_provider_moves_pending") == 0
    });
    let marker: i64 = redis::cmd("EXISTS")
        .arg("gpucache:{eu}:index:provider-moves")
        .query(con)
        .expect("EXISTS");
    assert_eq!(marker, 0, "a finished move leaves no marker");
}

#[test]
fn a_large_provider_is_hidden_at_once_and_moved_after_the_command() {
    let server = Server::start(&[], &[]);
    let mut con = server.connect();
    register_large_provider(&mut con);
    assert_eq!(listed(&mut con), LARGE as i64 + 1);

    let offline = fields(&mut con, &["GPUCACHE.PROVIDER", "eu", "big", "offline"]);
    assert_eq!(offline["gpus"], LARGE.to_string());
    assert_eq!(offline["gpus_pending"], LARGE.to_string());
    assert_eq!(
        offline["gpus_unlisted"], "0",
        "nothing moved inside the command"
    );
    // What users see changed with the command, whatever the index still holds.
    assert_eq!(available_ids(&mut con, &["eu", "LIMIT", "5"]), ["small1"]);
    assert!(error(
        &mut con,
        &["GPUCACHE.BOOK", "eu", "big0007", "b", "u", "60"]
    )
    .starts_with("GPUUNAVAILABLE"));
    assert_eq!(
        fields(&mut con, &["GPUCACHE.GET", "eu", "big0100"])["provider_status"],
        "offline"
    );

    moves_done(&mut con);
    assert_eq!(listed(&mut con), 1);
    assert_consistent(&mut con, "eu");

    // The slices told consumers what they moved, in the stream, and ended with `done`.
    let entries: Vec<(String, Vec<(String, String)>)> = redis::cmd("XRANGE")
        .arg("gpucache:{eu}:events")
        .arg("-")
        .arg("+")
        .query(&mut con)
        .expect("XRANGE");
    let moved: Vec<serde_json::Value> = entries
        .iter()
        .flat_map(|(_, fields)| fields.iter())
        .filter(|(name, _)| name == "payload")
        .filter_map(|(_, json)| serde_json::from_str(json).ok())
        .filter(|e: &serde_json::Value| e["reason"] == "gpus_moved")
        .collect();
    let unlisted: i64 = moved
        .iter()
        .map(|e| e["new"]["gpus_unlisted"].as_i64().unwrap_or(0))
        .sum();
    assert_eq!(unlisted, LARGE as i64);
    assert!(moved.len() > 1, "moved in slices, not at once");
    assert_eq!(
        moved.last().map(|e| e["new"]["done"].clone()),
        Some(true.into())
    );

    let online = fields(&mut con, &["GPUCACHE.PROVIDER", "eu", "big", "online"]);
    assert_eq!(online["gpus_pending"], LARGE.to_string());
    moves_done(&mut con);
    assert_eq!(listed(&mut con), LARGE as i64 + 1);
    assert_eq!(
        available_ids(&mut con, &["eu", "LIMIT", "1"]),
        ["big0000"],
        "the cheapest GPU is back"
    );
    assert_consistent(&mut con, "eu");
}

#[test]
fn a_status_change_during_a_move_restarts_it_with_the_newest_status() {
    let server = Server::start(&[], &[]);
    let mut con = server.connect();
    register_large_provider(&mut con);
    // Both in one transaction: the second starts before the first's first slice.
    let _: () = redis::pipe()
        .atomic()
        .cmd("GPUCACHE.PROVIDER")
        .arg(&["eu", "big", "offline"])
        .ignore()
        .cmd("GPUCACHE.PROVIDER")
        .arg(&["eu", "big", "maintenance"])
        .ignore()
        .query(&mut con)
        .expect("MULTI");
    run(&mut con, &["GPUCACHE.PROVIDER", "eu", "big", "online"]).expect("online");
    moves_done(&mut con);
    assert_eq!(listed(&mut con), LARGE as i64 + 1);
    assert_consistent(&mut con, "eu");
}

#[test]
fn a_replica_gets_the_moves_as_the_primary_made_them() {
    let debug = ["--enable-debug-command", "yes"];
    let primary = Server::start(&[], &debug);
    let port = primary.port.to_string();
    let replica = Server::start(
        &[],
        &[&debug[..], &["--replicaof", "127.0.0.1", &port]].concat(),
    );
    let mut con = primary.connect();
    let mut replica_con = replica.connect();
    register_large_provider(&mut con);
    run(&mut con, &["GPUCACHE.PROVIDER", "eu", "big", "offline"]).expect("offline");
    moves_done(&mut con);
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
fn a_move_left_unfinished_resumes_after_a_reload() {
    let server = Server::start(&[], &["--enable-debug-command", "yes"]);
    let mut con = server.connect();
    register_large_provider(&mut con);
    // What a primary that stopped mid-move leaves behind: the new status, the marker, and
    // GPUs still listed.
    for args in [
        &["HSET", "gpucache:{eu}:provider:big", "status", "offline"][..],
        &["SADD", "gpucache:{eu}:index:provider-moves", "big"],
    ] {
        run(&mut con, args).expect("hand edit");
    }
    assert_eq!(listed(&mut con), LARGE as i64 + 1);
    run(&mut con, &["DEBUG", "RELOAD"]).expect("DEBUG RELOAD");
    eventually("the move resumed", Duration::from_secs(30), || {
        listed(&mut con) == 1
    });
    moves_done(&mut con);
    assert_consistent(&mut con, "eu");
}
