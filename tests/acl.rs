//! The ACL users of redis.conf.example: the edge user reads and follows invalidations but may
//! write nothing; the booking service may write.

mod common;

use common::*;

const CONFIG: &str = include_str!("../redis.conf.example");

fn login(server: &Server, user: &str, password: &str) -> redis::Connection {
    let url = format!("redis://{user}:{password}@127.0.0.1:{}/", server.port);
    redis::Client::open(url)
        .and_then(|c| c.get_connection())
        .expect("login")
}

#[test]
fn the_edge_user_is_refused_every_write_and_the_booking_service_is_not() {
    let server = Server::start_with_config(CONFIG, &[]);
    let mut booking = login(&server, "booking", "CHANGE-ME-booking");
    seed(&mut booking);
    run(
        &mut booking,
        &["GPUCACHE.BOOK", "eu", "g1", "b1", "alice", "600"],
    )
    .unwrap();

    let mut edge = login(&server, "edge", "CHANGE-ME-edge");
    assert_eq!(
        fields(&mut edge, &["GPUCACHE.GET", "eu", "g1"])["status"],
        "busy"
    );
    assert_eq!(available_ids(&mut edge, &["eu", "LIMIT", "1"]), ["g2"]);
    run(&mut edge, &["GPUCACHE.STATS", "eu"]).unwrap();
    run(&mut edge, &["GPUCACHE.ORDERBOOK", "eu", "A100"]).unwrap();
    run(
        &mut edge,
        &["XRANGE", "gpucache:{eu}:events", "-", "+", "COUNT", "1"],
    )
    .unwrap();

    // The default user (open in the example for the loopback demo) takes the snapshots.
    let mut admin = server.connect();
    let before = snapshot(&mut admin);
    let writes: [&[&str]; 11] = [
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
        &["GPUCACHE.STATUS", "eu", "g2", "offline"],
        &["GPUCACHE.PRICE", "eu", "A100", "9"],
        &["GPUCACHE.BOOK", "eu", "g2", "b2", "mallory", "600"],
        &["GPUCACHE.CANCEL", "eu", "b1"],
        &["GPUCACHE.PROVIDER", "eu", "p1", "offline"],
        &["GPUCACHE.INVALIDATE", "eu", "stats"],
        &["HSET", "gpucache:{eu}:gpu:g2", "status", "busy"],
        &["DEL", "gpucache:{eu}:gpu:g2"],
        &["XADD", "gpucache:{eu}:events", "*", "type", "fake"],
        &["FLUSHALL"],
    ];
    for args in writes {
        let err = run(&mut edge, args).expect_err("edge must not write");
        assert_eq!(err.code(), Some("NOPERM"), "{args:?}: {err}");
    }
    assert_same_state(
        &snapshot(&mut admin),
        &before,
        "after the edge user's attempts",
    );

    // The edge user may follow invalidations on the keyspace channel.
    let mut pubsub_con = login(&server, "edge", "CHANGE-ME-edge");
    let mut pubsub = pubsub_con.as_pubsub();
    pubsub
        .psubscribe("__keyspace@0__:gpucache:*")
        .expect("edge may subscribe");
    // ...but not to other channels.
    let mut other = login(&server, "edge", "CHANGE-ME-edge");
    let refused = redis::cmd("SUBSCRIBE")
        .arg("payments")
        .query::<redis::Value>(&mut other);
    assert!(refused.is_err());
}

/// The commands of the README's command table (`| `GPUCACHE.X ...` | flags | ... |`).
fn readme_commands() -> Vec<String> {
    let readme = include_str!("../README.md");
    let start = readme
        .find("\n## Commands\n")
        .expect("README has a Commands section");
    let section = &readme[start + 1..];
    let section = &section[..section[1..].find("\n## ").map_or(section.len(), |i| i + 1)];
    let commands: Vec<String> = section
        .lines()
        .filter_map(|line| line.strip_prefix("| `GPUCACHE."))
        .map(|rest| {
            let name: String = rest
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric())
                .collect();
            format!("GPUCACHE.{name}")
        })
        .collect();
    assert!(
        commands.len() >= 13,
        "README command table not found: {commands:?}"
    );
    commands
}

#[test]
fn the_booking_service_may_run_every_command_of_the_readme_table() {
    let server = Server::start_with_config(CONFIG, &[]);
    let mut admin = server.connect();
    seed(&mut admin);
    let mut booking = login(&server, "booking", "CHANGE-ME-booking");
    for command in readme_commands() {
        // Redis checks permissions before the module sees the arguments: with the region alone
        // a command may fail its own argument checks, never with NOPERM.
        if let Err(err) = run(&mut booking, &[&command, "eu"]) {
            assert_ne!(err.code(), Some("NOPERM"), "{command}: {err}");
        }
        let dry: String = redis::cmd("ACL")
            .arg("DRYRUN")
            .arg("booking")
            .arg(&command)
            .arg("eu")
            .query(&mut admin)
            .unwrap_or_else(|e| panic!("ACL DRYRUN {command}: {e}"));
        assert_eq!(dry, "OK", "{command}");
    }
}
