//! An edge following a primary behind a real Redis Sentinel (`redis-server --sentinel` on
//! loopback): it finds the primary by name, and after `SENTINEL FAILOVER` follows the promoted
//! replica, replaying the region's stream there from its last applied id.

#[path = "../../tests/common/mod.rs"]
mod common;

use common::cluster::set_user_from;
use common::{eventually, free_port, register, run, Server};
use gpucache_edge::{Edge, EdgeConfig, Query};
use serde_json::Value;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

const DEADLINE: Duration = Duration::from_secs(10);
const MASTER: &str = "gpumaster";

/// A Sentinel process monitoring `primary` as `MASTER` (quorum 1: it may fail over alone).
struct Sentinel {
    port: u16,
    dir: PathBuf,
    child: Child,
}

impl Sentinel {
    fn start(primary: &Server) -> Sentinel {
        let port = free_port();
        let dir =
            std::env::temp_dir().join(format!("gpucache-sentinel-{port}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let config = dir.join("sentinel.conf");
        std::fs::write(
            &config,
            format!(
                "port {port}\nbind 127.0.0.1\ndir {}\n\
                 sentinel monitor {MASTER} 127.0.0.1 {} 1\n\
                 sentinel down-after-milliseconds {MASTER} 5000\n\
                 sentinel failover-timeout {MASTER} 10000\n",
                dir.display(),
                primary.port
            ),
        )
        .unwrap();
        let child = Command::new("redis-server")
            .arg(&config)
            .arg("--sentinel")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server must be installed");
        let sentinel = Sentinel { port, dir, child };
        eventually("the Sentinel answers", DEADLINE, || {
            sentinel.try_query::<String>(&["PING"]).is_ok()
        });
        sentinel
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    fn try_query<T: redis::FromRedisValue>(&self, args: &[&str]) -> redis::RedisResult<T> {
        let mut con = redis::Client::open(self.url())?.get_connection()?;
        let mut cmd = redis::cmd(args[0]);
        for a in &args[1..] {
            cmd.arg(*a);
        }
        cmd.query(&mut con)
    }

    fn primary_port(&self) -> Option<u16> {
        self.try_query::<Option<(String, u16)>>(&["SENTINEL", "GET-MASTER-ADDR-BY-NAME", MASTER])
            .ok()
            .flatten()
            .map(|(_, port)| port)
    }
}

impl Drop for Sentinel {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

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
    let sentinel = Sentinel::start(&primary);
    // The Sentinel knows the replica (from the primary's INFO) before it can promote it.
    eventually(
        "the Sentinel knows the replica",
        Duration::from_secs(20),
        || {
            sentinel
                .try_query::<Vec<redis::Value>>(&["SENTINEL", "REPLICAS", MASTER])
                .is_ok_and(|r| !r.is_empty())
        },
    );

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

    eventually("the Sentinel fails over", Duration::from_secs(20), || {
        sentinel
            .try_query::<String>(&["SENTINEL", "FAILOVER", MASTER])
            .is_ok()
    });
    eventually("the replica is promoted", Duration::from_secs(30), || {
        role(&replica) == "master" && sentinel.primary_port() == Some(replica.port)
    });
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
