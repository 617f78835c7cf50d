//! `CHECK` and `REPAIR` of a region larger than `gpucache.survey-inline-max` survey it in a
//! forked child: the caller is blocked while everyone else is answered, the findings are the
//! region's as it was at the call, and a repair's fixes land only on the region the child saw.

mod common;

use common::*;
use std::time::{Duration, Instant};

const GPUS: usize = 3000;
/// Small enough that the test region is surveyed in a child.
const FORKED: [&str; 2] = ["SURVEY_INLINE_MAX", "100"];

fn register_many(con: &mut redis::Connection, count: usize) {
    let mut pipe = redis::pipe();
    for i in 0..count {
        pipe.cmd("GPUCACHE.REGISTER")
            .arg("eu")
            .arg(format!("n{i}"))
            .arg("PROVIDER")
            .arg(format!("p{}", i % 10))
            .arg("TYPE")
            .arg(format!("T{}", i % 3))
            .arg("PRICE")
            .arg("1.5")
            .ignore();
    }
    pipe.query::<()>(con).expect("pipelined REGISTER");
}

/// Whether a client is blocked in `command` (CLIENT LIST's `b` flag): answered at all while
/// that client waits, this connection proves the server is not held by it.
fn blocked_in(con: &mut redis::Connection, command: &str) -> bool {
    let list: String = redis::cmd("CLIENT").arg("LIST").query(con).unwrap();
    list.lines().any(|line| {
        line.contains(&format!("cmd={command} "))
            && line.split(' ').any(|f| {
                f.strip_prefix("flags=")
                    .is_some_and(|flags| flags.contains('b'))
            })
    })
}

fn wait_blocked(con: &mut redis::Connection, command: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !blocked_in(con, command) {
        assert!(
            Instant::now() < deadline,
            "no client was ever seen blocked in {command}: the survey ran inside the command"
        );
    }
}

/// Runs `args` on a connection of its own, in a thread.
fn in_background(
    server: &Server,
    args: &[&str],
) -> std::thread::JoinHandle<redis::RedisResult<redis::Value>> {
    let mut con = server.connect();
    let args: Vec<String> = args.iter().map(|a| (*a).to_owned()).collect();
    std::thread::spawn(move || {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        run(&mut con, &args)
    })
}

fn damage(con: &mut redis::Connection) {
    // Another client's hand: an available GPU gone from the score index, a provider set member
    // gone, a counter off.
    run(con, &["ZREM", "gpucache:{eu}:avail-score:T0", "n0"]).unwrap();
    run(con, &["SREM", "gpucache:{eu}:provider-gpus:p1", "n1"]).unwrap();
    run(
        con,
        &["HSET", "gpucache:{eu}:stats:market", "gpus:available", "7"],
    )
    .unwrap();
}

#[test]
fn check_of_a_big_region_blocks_only_its_caller_and_reports_what_an_inline_check_does() {
    let server = Server::start(&FORKED, &[]);
    let mut con = server.connect();
    register_many(&mut con, GPUS);

    let check = in_background(&server, &["GPUCACHE.CHECK", "eu"]);
    wait_blocked(&mut con, "gpucache.check");
    let report = as_map(&check.join().unwrap().expect("CHECK"));
    assert_eq!(text(&report["ok"]), "1", "{:?}", report["violations"]);
    assert_eq!(text(&report["gpus_checked"]), GPUS.to_string());
    assert!(info_field(&mut con, "gpucache_surveys_forked") >= 1);

    damage(&mut con);
    let forked = as_map(&run(&mut con, &["GPUCACHE.CHECK", "eu"]).unwrap());
    run(
        &mut con,
        &["CONFIG", "SET", "gpucache.survey-inline-max", "100000"],
    )
    .unwrap();
    let before = info_field(&mut con, "gpucache_surveys_forked");
    let inline = as_map(&run(&mut con, &["GPUCACHE.CHECK", "eu"]).unwrap());
    assert_eq!(
        info_field(&mut con, "gpucache_surveys_forked"),
        before,
        "below the limit, CHECK runs inline"
    );
    assert_eq!(text(&forked["ok"]), "0");
    assert_eq!(forked, inline, "a child's findings are an inline survey's");
}

#[test]
fn repair_of_a_big_region_refuses_writes_until_it_is_done_and_the_replica_follows() {
    let server = Server::start(&FORKED, &["--enable-debug-command", "yes"]);
    let mut con = server.connect();
    register_many(&mut con, GPUS);
    let port = server.port.to_string();
    let replica = Server::start(
        &FORKED,
        &[
            "--replicaof",
            "127.0.0.1",
            &port,
            "--enable-debug-command",
            "yes",
        ],
    );
    let mut rcon = replica.connect();
    eventually("replica in sync", Duration::from_secs(20), || {
        let info: String = redis::cmd("INFO")
            .arg("replication")
            .query(&mut rcon)
            .unwrap();
        info.contains("master_link_status:up")
    });
    damage(&mut con);

    let repair = in_background(&server, &["GPUCACHE.REPAIR", "eu"]);
    wait_blocked(&mut con, "gpucache.repair");
    // While the caller waits: reads are answered, the region's writes are turned away.
    assert_eq!(
        fields(&mut con, &["GPUCACHE.GET", "eu", "n5"])["status"],
        "available"
    );
    let refused = error(&mut con, &["GPUCACHE.BOOK", "eu", "n5", "b5", "u", "3600"]);
    assert!(
        refused.starts_with("TRYAGAIN"),
        "BOOK during REPAIR: {refused}"
    );
    let report = as_map(&repair.join().unwrap().expect("REPAIR"));
    assert!(
        text(&report["fixed"]).parse::<i64>().unwrap() >= 3,
        "{report:?}"
    );

    run(&mut con, &["GPUCACHE.BOOK", "eu", "n5", "b5", "u", "3600"]).expect("BOOK after REPAIR");
    assert_consistent(&mut con, "eu");
    let acked: i64 = redis::cmd("WAIT").arg(1).arg(5000).query(&mut con).unwrap();
    assert_eq!(acked, 1);
    let digest = |c: &mut redis::Connection| -> String {
        redis::cmd("DEBUG").arg("DIGEST").query(c).unwrap()
    };
    assert_eq!(
        digest(&mut rcon),
        digest(&mut con),
        "replica equals primary"
    );
    assert_consistent(&mut rcon, "eu");
}

#[test]
fn a_write_to_the_region_during_its_survey_makes_the_repair_survey_again() {
    let server = Server::start(&FORKED, &[]);
    let mut con = server.connect();
    register_many(&mut con, GPUS);
    damage(&mut con);
    let before = info_field(&mut con, "gpucache_surveys_forked");

    let repair = in_background(&server, &["GPUCACHE.REPAIR", "eu"]);
    wait_blocked(&mut con, "gpucache.repair");
    // A write gpucache's commands cannot be refused: another client's, by hand. The child's
    // snapshot does not hold it, so its fixes would be for a region that no longer exists.
    run(&mut con, &["SREM", "gpucache:{eu}:provider-gpus:p2", "n2"]).unwrap();
    let report = as_map(&repair.join().unwrap().expect("REPAIR"));
    assert!(
        info_field(&mut con, "gpucache_surveys_forked") >= before + 2,
        "surveyed again after the write"
    );
    let repairs = format!("{:?}", report["repairs"]);
    assert!(
        repairs.contains("n2 is missing from the GPU set of provider p2"),
        "the second survey saw the hand edit: {repairs}"
    );
    assert_consistent(&mut con, "eu");
}

#[test]
fn a_repair_the_module_queues_itself_on_a_big_region_is_surveyed_in_a_child() {
    let server = Server::start(&FORKED, &[]);
    let mut con = server.connect();
    register_many(&mut con, GPUS);
    // Lost counters: the next write answers CORRUPT and queues a repair of the region.
    run(&mut con, &["DEL", "gpucache:{eu}:stats:market"]).unwrap();
    let refused = error(&mut con, &["GPUCACHE.BOOK", "eu", "n5", "b5", "u", "3600"]);
    assert!(refused.starts_with("CORRUPT"), "{refused}");
    eventually(
        "the queued repair was surveyed in a child and applied",
        Duration::from_secs(30),
        || {
            info_field(&mut con, "gpucache_surveys_forked") >= 1
                && info_field(&mut con, "gpucache_surveys_pending") == 0
                && info_field(&mut con, "gpucache_heal_queue") == 0
        },
    );
    assert_eq!(
        fields(&mut con, &["GPUCACHE.STATS", "eu"])["gpus_total"],
        GPUS.to_string(),
        "counters recounted"
    );
    assert_consistent(&mut con, "eu");
}

#[test]
fn many_fixes_are_written_over_several_timer_calls_and_the_replica_follows() {
    let server = Server::start(&FORKED, &["--enable-debug-command", "yes"]);
    let mut con = server.connect();
    register_many(&mut con, GPUS);
    let port = server.port.to_string();
    let replica = Server::start(
        &FORKED,
        &[
            "--replicaof",
            "127.0.0.1",
            &port,
            "--enable-debug-command",
            "yes",
        ],
    );
    let mut rcon = replica.connect();
    eventually("replica in sync", Duration::from_secs(20), || {
        let info: String = redis::cmd("INFO")
            .arg("replication")
            .query(&mut rcon)
            .unwrap();
        info.contains("master_link_status:up")
    });
    // Every GPU of a type to put back into its score index, every GPU of a provider into its set.
    run(
        &mut con,
        &[
            "DEL",
            "gpucache:{eu}:avail-score:T0",
            "gpucache:{eu}:provider-gpus:p0",
        ],
    )
    .unwrap();
    let report = as_map(&run(&mut con, &["GPUCACHE.REPAIR", "eu"]).expect("REPAIR"));
    assert!(
        text(&report["fixed"]).parse::<usize>().unwrap() >= GPUS / 3 + GPUS / 10,
        "{report:?}"
    );
    let steps = info_field(&mut con, "gpucache_repair_steps");
    assert!(steps > 1, "1,300 fixes written in {steps} timer call(s)");
    assert_consistent(&mut con, "eu");
    let acked: i64 = redis::cmd("WAIT").arg(1).arg(5000).query(&mut con).unwrap();
    assert_eq!(acked, 1);
    let digest = |c: &mut redis::Connection| -> String {
        redis::cmd("DEBUG").arg("DIGEST").query(c).unwrap()
    };
    assert_eq!(
        digest(&mut rcon),
        digest(&mut con),
        "replica equals primary"
    );
}
