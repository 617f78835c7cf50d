//! An edge following a primary behind a real Redis Sentinel (`redis-server --sentinel` on
//! loopback): it finds the primary by name, and after `SENTINEL FAILOVER` follows the promoted
//! replica, replaying the region's stream there from its last applied id.

#[path = "../../tests/common/mod.rs"]
mod common;

use common::cluster::set_user_from;
use common::sentinel::{Sentinel, MASTER};
use common::{eventually, free_port, register, run, Server};
use gpucache_edge::{Edge, EdgeConfig, Query};
use serde_json::Value;
use std::time::Duration;

const DEADLINE: Duration = Duration::from_secs(10);
/// The server's role; empty while it cannot be asked (Sentinel kills clients as it fails over).
fn role(server: &Server) -> String {
    let info: redis::RedisResult<String> = redis::Client::open(server.url())
        .and_then(|c| c.get_connection_with_timeout(Duration::from_secs(1)))
        .and_then(|mut con| redis::cmd("INFO").arg("replication").query(&mut con));
    info.ok()
        .and_then(|info| common::cluster::info_field(&info, "role"))
        .unwrap_or_default()
}

fn status(edge: &Edge, q: &Query) -> Value {
    edge.get(q)
        .map(|v| v["status"].clone())
        .unwrap_or(Value::Null)
}

#[test]
fn after_a_sentinel_failover_the_edge_follows_the_new_primary() {
    let notify = ["--notify-keyspace-events", "Kd"];
    let primary = Server::start(&[], &notify);
    let port = primary.port.to_string();
    let replica = Server::start(
        &[],
        &[
            "--notify-keyspace-events",
            "Kd",
            "--replicaof",
            "127.0.0.1",
            &port,
        ],
    );
    let mut writer = primary.connect();
    register(&mut writer, "eu", "g1", "p1", "A100", "2");
    register(&mut writer, "eu", "g2", "p1", "A100", "2");
    let sentinel = Sentinel::start(primary.port);
    // The Sentinel knows the replica (from the primary's INFO) before it can promote it.
    sentinel.wait_for_replica();

    // A Sentinel that does not answer comes first: the next one is asked. The edge reads as the
    // example config's read-only edge user.
    let dead = format!("redis://127.0.0.1:{}/", free_port());
    let mut config = EdgeConfig::sentinel(&[&dead, &sentinel.url()], MASTER, &["eu"]);
    for server in [&primary, &replica] {
        set_user_from(
            include_str!("../../redis.conf.example"),
            "edge",
            &mut server.connect(),
        );
    }
    config.url = "redis://edge:CHANGE-ME-edge@localhost/".into();
    let edge = Edge::start(config).unwrap();
    assert!(edge.wait_connected(DEADLINE), "{:?}", edge.stats());
    assert_eq!(
        edge.stats().followed_on.get("eu"),
        Some(&format!("127.0.0.1:{}", primary.port))
    );
    let (g1, g2) = (Query::gpu("eu", "g1"), Query::gpu("eu", "g2"));
    for q in [&g1, &g2] {
        eventually("cached", DEADLINE, || {
            edge.get(q).is_ok() && edge.cached(q).is_some()
        });
    }
    run(&mut writer, &["GPUCACHE.STATUS", "eu", "g1", "offline"]).unwrap();
    eventually("invalidated on the first primary", DEADLINE, || {
        edge.cached(&g1).is_none()
    });
    assert_eq!(status(&edge, &g1), "offline");
    let _: i64 = redis::cmd("WAIT")
        .arg(1)
        .arg(5000)
        .query(&mut writer)
        .unwrap();

    sentinel.fail_over_to(replica.port, || role(&replica) == "master");
    // Written on the new primary: the edge must hear it there.
    eventually("the new primary takes the write", DEADLINE, || {
        redis::Client::open(replica.url())
            .and_then(|c| c.get_connection_with_timeout(Duration::from_secs(1)))
            .and_then(|mut con| run(&mut con, &["GPUCACHE.STATUS", "eu", "g1", "maintenance"]))
            .is_ok()
    });
    eventually("the edge follows the new primary", DEADLINE, || {
        edge.stats().followed_on.get("eu") == Some(&format!("127.0.0.1:{}", replica.port))
    });
    eventually(
        "the write on the new primary reaches the L1",
        DEADLINE,
        || status(&edge, &g1) == "maintenance" && edge.cached(&g1).is_some(),
    );
    let stats = edge.stats();
    assert!(stats.region_moves >= 1, "{stats:?}");
    assert_eq!(
        stats.region_drops, 0,
        "the promoted replica held every event: {stats:?}"
    );
    assert!(
        edge.cached(&g2).is_some(),
        "g2, unchanged, stays cached across the failover"
    );
    eventually("every link is up on the new primary", DEADLINE, || {
        edge.stats().connection == "connected"
    });
}
