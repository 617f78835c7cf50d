//! Jitter and timestamps are decided once on the primary: replicas and the AOF get the same
//! keys, values and absolute expiries.

mod common;

use common::*;
use std::time::Duration;

fn workload(con: &mut redis::Connection) {
    seed(con);
    for args in [
        vec!["GPUCACHE.BOOK", "eu", "g2", "b1", "alice", "600"],
        vec!["GPUCACHE.PRICE", "eu", "A100", "3"],
        vec!["GPUCACHE.STATUS", "eu", "g4", "maintenance"],
        vec!["GPUCACHE.PROVIDER", "eu", "p2", "offline"],
        vec![
            "GPUCACHE.REGISTER",
            "eu",
            "g5",
            "PROVIDER",
            "p1",
            "TYPE",
            "A100",
            "PRICE",
            "1.25",
        ],
        vec!["GPUCACHE.BOOK", "eu", "g5", "b2", "bob", "3600"],
        vec!["GPUCACHE.CANCEL", "eu", "b1"],
        vec!["GPUCACHE.PROVIDER", "eu", "p2", "online"],
        vec!["GPUCACHE.INVALIDATE", "eu", "stats"],
    ] {
        run(con, &args).unwrap();
    }
}

fn start_replica(primary: &Server, module_args: &[&str]) -> Server {
    start_replica_with(primary, module_args, &[])
}

/// A replica of `primary` with extra `--name value` settings, once its link is up.
fn start_replica_with(primary: &Server, module_args: &[&str], server_args: &[&str]) -> Server {
    let port = primary.port.to_string();
    let mut args = vec!["--replicaof", "127.0.0.1", &port];
    args.extend_from_slice(server_args);
    let replica = Server::start(module_args, &args);
    let mut con = replica.connect();
    eventually("replica link up", Duration::from_secs(10), || {
        let info: String = redis::cmd("INFO")
            .arg("replication")
            .query(&mut con)
            .unwrap();
        info.contains("master_link_status:up")
    });
    replica
}

fn wait_for_replica(primary: &mut redis::Connection) {
    let acked: i64 = redis::cmd("WAIT").arg(1).arg(5000).query(primary).unwrap();
    assert_eq!(acked, 1, "replica acknowledged the writes");
}

#[test]
fn a_replica_holds_the_same_keys_values_and_absolute_expiries() {
    let primary = Server::start(&["JITTER", "20"], &[]);
    let replica = start_replica(&primary, &["JITTER", "20"]);
    let mut pcon = primary.connect();
    let mut rcon = replica.connect();
    workload(&mut pcon);
    wait_for_replica(&mut pcon);
    let on_primary = snapshot(&mut pcon);
    assert!(on_primary.len() > 10);
    assert!(on_primary.values().any(|(_, expiry)| *expiry > 0));
    assert_same_state(&snapshot(&mut rcon), &on_primary, "replica");
    assert_consistent(&mut pcon, "eu");
    assert_consistent(&mut rcon, "eu");

    // Reads work on the replica; writes are refused there.
    assert_eq!(
        fields(&mut rcon, &["GPUCACHE.GET", "eu", "g5"])["status"],
        "busy"
    );
    assert!(error(&mut rcon, &["GPUCACHE.STATUS", "eu", "g1", "offline"]).starts_with("READONLY"));
}

#[test]
fn healing_after_expiry_reaches_the_replica() {
    let primary = Server::start(&["AVAILABILITY_TTL", "1", "JITTER", "0"], &[]);
    let replica = start_replica(&primary, &["AVAILABILITY_TTL", "1", "JITTER", "0"]);
    let mut pcon = primary.connect();
    let mut rcon = replica.connect();
    seed(&mut pcon);
    eventually("primary healed", Duration::from_secs(10), || {
        let n: i64 = redis::cmd("HLEN")
            .arg("gpucache:{eu}:index:gpus")
            .query(&mut pcon)
            .unwrap();
        n == 0
    });
    wait_for_replica(&mut pcon);
    assert_same_state(
        &snapshot(&mut rcon),
        &snapshot(&mut pcon),
        "replica after healing",
    );
    assert_eq!(
        fields(&mut rcon, &["GPUCACHE.STATS", "eu"])["gpus_total"],
        "0"
    );
}

fn restart_from_aof(extra: &[&str]) {
    let mut args = vec!["--appendonly", "yes", "--appendfsync", "always"];
    args.extend_from_slice(extra);
    let server = Server::start(&["JITTER", "20"], &args);
    let mut con = server.connect();
    workload(&mut con);
    let before = snapshot(&mut con);
    let last_id: Vec<(String, Vec<(String, String)>)> = redis::cmd("XREVRANGE")
        .arg("gpucache:{eu}:events")
        .arg("+")
        .arg("-")
        .arg("COUNT")
        .arg("1")
        .query(&mut con)
        .unwrap();
    drop(con);
    let dir = server.stop();
    let restarted = Server::start_in(dir, free_port(), &["JITTER", "20"], &args);
    let mut con = restarted.connect();
    assert_same_state(&snapshot(&mut con), &before, "AOF replay");
    assert_consistent(&mut con, "eu");
    // New events continue after the replayed ones.
    run(&mut con, &["GPUCACHE.STATUS", "eu", "g1", "offline"]).unwrap();
    let newest: Vec<(String, Vec<(String, String)>)> = redis::cmd("XREVRANGE")
        .arg("gpucache:{eu}:events")
        .arg("+")
        .arg("-")
        .arg("COUNT")
        .arg("1")
        .query(&mut con)
        .unwrap();
    let id = |s: &str| {
        let (ms, seq) = s.split_once('-').unwrap();
        (ms.parse::<u64>().unwrap(), seq.parse::<u64>().unwrap())
    };
    assert!(id(&newest[0].0) > id(&last_id[0].0));
}

#[test]
fn an_aof_restart_replays_the_same_state() {
    restart_from_aof(&[]);
}

#[test]
fn an_aof_restart_without_rdb_preamble_replays_the_same_state() {
    restart_from_aof(&["--aof-use-rdb-preamble", "no"]);
}

fn digest(con: &mut redis::Connection) -> String {
    redis::cmd("DEBUG").arg("DIGEST").query(con).unwrap()
}

/// Bookings end by the module's clock on the primary, and a repair rebuilds a lost booking there;
/// the replica receives both as the primary decided them (same digest, same absolute expiries).
#[test]
fn booking_ends_and_repairs_reach_the_replica_as_decided() {
    let debug = ["--enable-debug-command", "yes"];
    let primary = Server::start(&["JITTER", "20"], &debug);
    let replica = start_replica_with(&primary, &["JITTER", "20"], &debug);
    let mut rcon = replica.connect();
    let mut pcon = primary.connect();
    seed(&mut pcon);
    for (gpu, booking, seconds) in [("g1", "b1", "1"), ("g2", "b2", "3600"), ("g3", "b3", "2")] {
        run(
            &mut pcon,
            &["GPUCACHE.BOOK", "eu", gpu, booking, "u", seconds],
        )
        .unwrap();
    }
    redis::cmd("DEL")
        .arg("gpucache:{eu}:booking:b2")
        .query::<()>(&mut pcon)
        .unwrap();
    let repaired = fields(&mut pcon, &["GPUCACHE.REPAIR", "eu"]);
    assert_eq!(repaired["booking_records"], "1");
    eventually("the clock ended b1 and b3", Duration::from_secs(10), || {
        fields(&mut pcon, &["GPUCACHE.STATS", "eu"])["bookings_ended"] == "2"
    });
    wait_for_replica(&mut pcon);
    assert_same_state(&snapshot(&mut rcon), &snapshot(&mut pcon), "replica");
    assert_eq!(digest(&mut rcon), digest(&mut pcon));
    assert_consistent(&mut rcon, "eu");
    // The replica ends nothing by itself: its state is the primary's, booking for booking.
    assert_eq!(
        fields(&mut rcon, &["GPUCACHE.GET", "eu", "g2"])["booking_user"],
        "u"
    );
}

/// A replica promoted after its primary died takes over the booking clock.
#[test]
fn a_promoted_replica_ends_the_bookings_its_primary_left() {
    let primary = Server::start(&[], &[]);
    let replica = start_replica(&primary, &[]);
    let mut pcon = primary.connect();
    seed(&mut pcon);
    run(&mut pcon, &["GPUCACHE.BOOK", "eu", "g1", "b1", "u", "2"]).unwrap();
    wait_for_replica(&mut pcon);
    drop(pcon);
    drop(primary.stop());
    let mut rcon = replica.connect();
    redis::cmd("REPLICAOF")
        .arg("NO")
        .arg("ONE")
        .query::<()>(&mut rcon)
        .unwrap();
    eventually(
        "the promoted replica ended b1",
        Duration::from_secs(10),
        || fields(&mut rcon, &["GPUCACHE.GET", "eu", "g1"])["status"] == "available",
    );
    let stats = fields(&mut rcon, &["GPUCACHE.STATS", "eu"]);
    assert_eq!(
        (
            stats["bookings_active"].as_str(),
            stats["bookings_ended"].as_str()
        ),
        ("0", "1")
    );
    assert_consistent(&mut rcon, "eu");
}

/// The AOF holds the booking clock's ends as concrete writes: replaying it gives the same state.
#[test]
fn an_aof_restart_after_booking_ends_replays_the_same_state() {
    let args = ["--appendonly", "yes", "--appendfsync", "always"];
    let server = Server::start(&["JITTER", "20"], &args);
    let mut con = server.connect();
    seed(&mut con);
    run(&mut con, &["GPUCACHE.BOOK", "eu", "g1", "b1", "u", "1"]).unwrap();
    run(&mut con, &["GPUCACHE.BOOK", "eu", "g2", "b2", "u", "3600"]).unwrap();
    eventually("the clock ended b1", Duration::from_secs(10), || {
        fields(&mut con, &["GPUCACHE.STATS", "eu"])["bookings_ended"] == "1"
    });
    let before = snapshot(&mut con);
    drop(con);
    let dir = server.stop();
    let restarted = Server::start_in(dir, free_port(), &["JITTER", "20"], &args);
    let mut con = restarted.connect();
    assert_same_state(&snapshot(&mut con), &before, "AOF replay");
    assert_consistent(&mut con, "eu");
}
