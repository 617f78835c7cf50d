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
