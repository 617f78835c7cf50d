//! Edge L1s following a real loopback Redis Cluster (three masters, a replica each, gpucache
//! loaded everywhere): each region is followed on the master that owns its slot, and followed
//! there again after a failover and after a reshard — its stream replayed from its last applied
//! id, never dropped when the ids continue — while a value older than the last write the edge
//! has heard of is never served.

#[path = "../../tests/common/mod.rs"]
mod common;
mod support;

use common::cluster::{
    begin_slot_move, end_slot_move, key_slot, keys_in_slot, migrate, set_user_from, Cluster,
    ClusterNode,
};
use common::{eventually, register, run};
use gpucache_edge::listener::EntryId;
use gpucache_edge::{Edge, EdgeConfig, Query, Source};
use redis::cluster::{ClusterClient, ClusterConnection};
use serde_json::Value;
use std::io::BufRead;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};
use support::{heard, last_event_id};

const DEADLINE: Duration = Duration::from_secs(10);

/// A 3-master, 1-replica-each cluster whose nodes all send keyspace notifications.
fn cluster() -> Cluster {
    let cluster = Cluster::start(3, 1, &[]);
    for node in cluster.nodes() {
        redis::cmd("CONFIG")
            .arg("SET")
            .arg("notify-keyspace-events")
            .arg("Kd")
            .query::<()>(&mut node.connect())
            .unwrap();
    }
    cluster
}

fn address(node: &ClusterNode) -> String {
    format!("127.0.0.1:{}", node.server.port)
}

/// A region whose slot master `i` of a fresh cluster owns.
fn region_on(cluster: &Cluster, i: usize, prefix: &str) -> String {
    let count = cluster.masters.len();
    let (first, last) = (16384 * i / count, 16384 * (i + 1) / count - 1);
    let mut con = cluster.masters[0].connect();
    (0..10_000)
        .map(|n| format!("{prefix}{n}"))
        .find(|r| (first..=last).contains(&(key_slot(&mut con, r) as usize)))
        .unwrap()
}

/// A writer that follows the cluster as an application would (MOVED, ASK, TRYAGAIN).
fn writer(cluster: &Cluster) -> ClusterConnection {
    let seeds: Vec<String> = cluster.masters.iter().map(|m| m.server.url()).collect();
    ClusterClient::builder(seeds)
        .retries(30)
        .min_retry_wait(20)
        .max_retry_wait(200)
        .build()
        .unwrap()
        .get_connection()
        .unwrap()
}

fn edge(cluster: &Cluster, regions: &[&str]) -> Edge {
    // One seed is enough; the others are found.
    edge_from(&cluster.masters[1].server.url(), regions, None)
}

fn edge_from(seed: &str, regions: &[&str], hook: Option<gpucache_edge::InvalidationHook>) -> Edge {
    let edge = Edge::start_with_hook(EdgeConfig::cluster(&[seed], regions), hook).unwrap();
    assert!(
        edge.wait_connected(DEADLINE),
        "edge links come up: {:?}",
        edge.stats()
    );
    edge
}

/// The example config's read-only `edge` user on every node; a URL of `node` as that user.
fn as_edge_user(cluster: &Cluster, node: &ClusterNode) -> String {
    for n in cluster.nodes() {
        set_user_from(EXAMPLE_CONFIG, "edge", &mut n.connect());
    }
    format!(
        "redis://edge:CHANGE-ME-edge@127.0.0.1:{}/",
        node.server.port
    )
}

const EXAMPLE_CONFIG: &str = include_str!("../../redis.conf.example");

/// A write acknowledged by the cluster, and its region's last event id then.
fn write(con: &mut ClusterConnection, args: &[&str]) -> EntryId {
    run(con, args).unwrap_or_else(|e| panic!("{args:?}: {e}"));
    last_event_id(con, args[1])
}

fn wait_heard(edge: &Edge, region: &str, id: EntryId) {
    eventually(
        &format!("the edge hears {region} up to {id}"),
        DEADLINE,
        || heard(edge, region).is_some_and(|h| h >= id),
    );
}

fn field(value: &Value, name: &str) -> String {
    match &value[name] {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// Loads `query` until the edge keeps it cached; its value.
fn settled(edge: &Edge, query: &Query) -> Value {
    let mut value = Value::Null;
    eventually(&format!("{query:?} stays cached"), DEADLINE, || {
        value = match edge.get(query) {
            Ok(v) => (*v).clone(),
            Err(_) => return false,
        };
        edge.cached(query).is_some_and(|c| *c == value)
    });
    value
}

#[test]
fn reads_on_every_master_are_cached_and_invalidated_there() {
    let cluster = cluster();
    let regions: Vec<String> = (0..3).map(|i| region_on(&cluster, i, "cl")).collect();
    let names: Vec<&str> = regions.iter().map(String::as_str).collect();
    let mut writer = writer(&cluster);
    for (i, region) in regions.iter().enumerate() {
        let mut owner = cluster.masters[i].connect();
        register(&mut owner, region, "g1", "p1", "A100", "2");
        register(&mut owner, region, "g2", "p2", "H100", "3");
    }
    // Which link told the edge of each key first.
    let sources: Arc<Mutex<Vec<(String, Source)>>> = Arc::default();
    let hook: gpucache_edge::InvalidationHook = {
        let sources = sources.clone();
        Arc::new(move |key: &str, source| sources.lock().unwrap().push((key.into(), source)))
    };
    // As the example config's read-only edge user, from one seed.
    let seed = as_edge_user(&cluster, &cluster.masters[1]);
    let edge = edge_from(&seed, &names, Some(hook));
    // The CLI follows the cluster the same way.
    let mut watch = Watch::start(&seed, &regions[2]);
    watch.expect(&format!(
        "follow {} {}",
        regions[2],
        address(&cluster.masters[2])
    ));

    let stats = edge.stats();
    for (i, region) in regions.iter().enumerate() {
        assert_eq!(
            stats.followed_on.get(region),
            Some(&address(&cluster.masters[i])),
            "{region} is followed on its master: {stats:?}"
        );
    }
    for region in &regions {
        let record = Query::gpu(region, "g1");
        let search = Query::available(region, &["LIMIT", "10"]);
        let other = Query::gpu(region, "g2");
        assert_eq!(field(&settled(&edge, &record), "status"), "available");
        settled(&edge, &search);
        settled(&edge, &other);
        let id = write(&mut writer, &["GPUCACHE.STATUS", region, "g1", "offline"]);
        eventually(
            "the record and the search are invalidated",
            DEADLINE,
            || edge.cached(&record).is_none() && edge.cached(&search).is_none(),
        );
        wait_heard(&edge, region, id);
        assert_eq!(field(&settled(&edge, &record), "status"), "offline");
        assert!(edge.cached(&other).is_some(), "g2 did not change");
        // Notifications come from the region's own master.
        let key = gpucache_edge::keyspace::gpu_key(region, "g1");
        eventually("the record's notification arrives", DEADLINE, || {
            sources
                .lock()
                .unwrap()
                .iter()
                .any(|(k, s)| *k == key && *s == Source::Notification)
        });
    }
    watch.expect(&format!(
        "event  {}",
        gpucache_edge::keyspace::gpu_key(&regions[2], "g1")
    ));
    let stats = edge.stats();
    assert_eq!(stats.region_drops, 0, "{stats:?}");
    assert_eq!(stats.connection, "connected");
    assert!(stats.hits > 0 && stats.stream_events >= 3, "{stats:?}");
}

/// `gpucache-edge watch --cluster`, its output read line by line.
struct Watch {
    child: std::process::Child,
    lines: mpsc::Receiver<String>,
}

impl Watch {
    fn start(seed: &str, region: &str) -> Watch {
        let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_gpucache-edge"))
            .args(["watch", "--region", region, "--cluster", seed])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (send, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stdout)
                .lines()
                .map_while(Result::ok)
            {
                if send.send(line).is_err() {
                    break;
                }
            }
        });
        Watch { child, lines }
    }

    fn expect(&mut self, wanted: &str) {
        let deadline = Instant::now() + DEADLINE;
        let mut seen = Vec::new();
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            match self.lines.recv_timeout(left) {
                Ok(line) if line == wanted => return,
                Ok(line) => seen.push(line),
                Err(_) => break,
            }
        }
        panic!("watch never printed {wanted:?}; printed {seen:?}");
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Readers hammering the edge: each checks every answer against the newest version the edge
/// was known to have heard of *before* the read began.
struct Readers {
    stop: Arc<AtomicBool>,
    reads: Arc<AtomicU64>,
    threads: Vec<std::thread::JoinHandle<Vec<String>>>,
}

impl Readers {
    fn start(edge: &Arc<Edge>, query: &Query, heard_version: &Arc<AtomicI64>) -> Readers {
        let stop = Arc::new(AtomicBool::new(false));
        let reads = Arc::new(AtomicU64::new(0));
        let threads = (0..2)
            .map(|_| {
                let (edge, query, heard_version, stop, reads) = (
                    edge.clone(),
                    query.clone(),
                    heard_version.clone(),
                    stop.clone(),
                    reads.clone(),
                );
                std::thread::spawn(move || {
                    let mut violations = Vec::new();
                    while !stop.load(Ordering::Acquire) {
                        let floor = heard_version.load(Ordering::Acquire);
                        // Errors are allowed while the cluster moves (TRYAGAIN, a closed
                        // connection); an old value never is.
                        if let Ok(value) = edge.get(&query) {
                            reads.fetch_add(1, Ordering::Relaxed);
                            let version = value["version"].as_i64().unwrap_or(-1);
                            if version < floor {
                                violations.push(format!(
                                    "served version {version} after hearing of {floor}: {value}"
                                ));
                            }
                        }
                    }
                    violations
                })
            })
            .collect();
        Readers {
            stop,
            reads,
            threads,
        }
    }

    fn finish(self) -> u64 {
        self.stop.store(true, Ordering::Release);
        let violations: Vec<String> = self
            .threads
            .into_iter()
            .flat_map(|t| t.join().unwrap())
            .collect();
        assert!(violations.is_empty(), "{violations:#?}");
        self.reads.load(Ordering::Relaxed)
    }
}

/// Flips `gpu`'s status once; waits until the edge has heard of it and publishes its version
/// to the readers.
fn flip(
    edge: &Edge,
    writer: &mut ClusterConnection,
    region: &str,
    gpu: &str,
    round: usize,
    heard_version: &AtomicI64,
) {
    let status = if round.is_multiple_of(2) {
        "offline"
    } else {
        "available"
    };
    let reply = run(writer, &["GPUCACHE.STATUS", region, gpu, status])
        .unwrap_or_else(|e| panic!("round {round}: {e}"));
    let version: i64 = common::text(&common::as_map(&reply)["version"])
        .parse()
        .unwrap();
    let id = last_event_id(writer, region);
    wait_heard(edge, region, id);
    heard_version.store(version, Ordering::Release);
    // Heard, so never older: whether from the L1 or loaded.
    let now = edge.get(&Query::gpu(region, gpu)).unwrap();
    assert_eq!(now["status"], status, "round {round}");
    assert!(now["version"].as_i64().unwrap() >= version, "round {round}");
}

#[test]
fn a_failover_moves_the_region_to_the_new_master_without_serving_old_values() {
    let cluster = cluster();
    let region = region_on(&cluster, 0, "fo");
    let other = region_on(&cluster, 1, "fo");
    let mut writer = writer(&cluster);
    for r in [&region, &other] {
        register(&mut writer, r, "g1", "p1", "A100", "2");
        // Of another type: g1's flips move the A100 demand price, not its.
        register(&mut writer, r, "g2", "p2", "H100", "4");
    }
    let edge = Arc::new(edge(&cluster, &[&region, &other]));
    let q = Query::gpu(&region, "g1");
    let untouched = Query::gpu(&region, "g2");
    let elsewhere = Query::gpu(&other, "g1");
    settled(&edge, &untouched);
    let heard_version = Arc::new(AtomicI64::new(0));
    let readers = Readers::start(&edge, &q, &heard_version);
    let mut round = 0;
    for _ in 0..3 {
        flip(&edge, &mut writer, &region, "g1", round, &heard_version);
        round += 1;
    }
    settled(&edge, &elsewhere);

    // The replica takes over (a manual failover loses nothing); writes go on meanwhile.
    let (old, new) = (&cluster.masters[0], &cluster.replicas[0][0]);
    redis::cmd("CLUSTER")
        .arg("FAILOVER")
        .query::<()>(&mut new.connect())
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while new.replication_info("role").as_deref() != Some("master") {
        assert!(Instant::now() < deadline, "the replica never took over");
        flip(&edge, &mut writer, &region, "g1", round, &heard_version);
        round += 1;
    }
    eventually(
        "the edge follows the region on its new master",
        DEADLINE,
        || edge.stats().followed_on.get(&region) == Some(&address(new)),
    );
    for _ in 0..3 {
        flip(&edge, &mut writer, &region, "g1", round, &heard_version);
        round += 1;
    }
    assert_eq!(
        field(&settled(&edge, &q), "version"),
        field(&edge.load(&q).unwrap(), "version")
    );
    let reads = readers.finish();
    assert!(reads > 0);

    let stats = edge.stats();
    assert!(stats.region_moves >= 1, "{stats:?}");
    assert_eq!(
        stats.region_drops, 0,
        "the new master holds every event: replayed, not dropped: {stats:?}"
    );
    assert!(
        edge.cached(&untouched).is_some(),
        "an unchanged record survives the failover"
    );
    assert!(
        edge.cached(&elsewhere).is_some(),
        "a region on another master is not disturbed"
    );
    assert_eq!(
        stats.followed_on.get(&other),
        Some(&address(&cluster.masters[1]))
    );
    assert_ne!(stats.followed_on.get(&region), Some(&address(old)));
    eventually("notifications follow the new master", DEADLINE, || {
        edge.stats().connection == "connected"
    });
}

/// Moves `slot` from `source` to `target` as `redis-cli --cluster reshard` does: `IMPORTING`,
/// `MIGRATING`, `MIGRATE` of every key, then `SETSLOT ... NODE` on every master.
fn move_slot(cluster: &Cluster, slot: u16, source: &ClusterNode, target: &ClusterNode) {
    begin_slot_move(slot, source, target);
    let mut from = source.connect();
    let keys = keys_in_slot(&mut from, slot, 1000);
    assert!(!keys.is_empty());
    migrate(&mut from, target, &keys).unwrap();
    let others: Vec<&ClusterNode> = cluster
        .masters
        .iter()
        .filter(|m| m.id != source.id && m.id != target.id)
        .collect();
    end_slot_move(slot, source, target, &others);
}

#[test]
fn a_resharded_region_is_followed_to_its_new_owner_and_replayed_not_dropped() {
    let cluster = cluster();
    let region = region_on(&cluster, 0, "rs");
    let (source, target) = (&cluster.masters[0], &cluster.masters[1]);
    let mut writer = writer(&cluster);
    {
        let mut owner = source.connect();
        register(&mut owner, &region, "g1", "p1", "A100", "2");
        register(&mut owner, &region, "g2", "p1", "A100", "2");
        // Of another type: the others' writes move the A100 demand price, not its.
        register(&mut owner, &region, "g3", "p2", "T4", "1");
    }
    let edge = edge(&cluster, &[&region]);
    let [g1, g2, g3] = ["g1", "g2", "g3"].map(|g| Query::gpu(&region, g));
    for q in [&g1, &g2, &g3] {
        settled(&edge, q);
    }
    let before = write(&mut writer, &["GPUCACHE.STATUS", &region, "g1", "offline"]);
    wait_heard(&edge, &region, before);
    let old_g2 = settled(&edge, &g2);
    settled(&edge, &g3);

    let slot = key_slot(&mut source.connect(), &region);
    move_slot(&cluster, slot, source, target);
    // Written on the new owner, possibly before the edge got there: replayed from the last id.
    let after = write(
        &mut writer,
        &["GPUCACHE.STATUS", &region, "g2", "maintenance"],
    );
    assert!(
        after > before,
        "the stream moved with the slot: its ids continue"
    );
    eventually(
        "the edge follows the region to its new owner",
        DEADLINE,
        || edge.stats().followed_on.get(&region) == Some(&address(target)),
    );
    wait_heard(&edge, &region, after);
    assert!(
        edge.cached(&g2).is_none_or(|v| *v != old_g2),
        "g2's change on the new owner is not missed"
    );
    assert_eq!(field(&settled(&edge, &g2), "status"), "maintenance");
    let stats = edge.stats();
    assert_eq!(
        stats.region_drops, 0,
        "ids continued, nothing dropped: {stats:?}"
    );
    assert!(stats.region_moves >= 1, "{stats:?}");
    assert!(
        edge.cached(&g3).is_some(),
        "g3, unchanged, stays cached across the move"
    );
    assert_eq!(field(&settled(&edge, &g1), "status"), "offline");
    // And the region lives on there.
    let later = write(&mut writer, &["GPUCACHE.STATUS", &region, "g3", "offline"]);
    wait_heard(&edge, &region, later);
    assert_eq!(field(&edge.get(&g3).unwrap(), "status"), "offline");
}

#[test]
fn a_failover_that_lost_the_last_applied_event_drops_the_region() {
    let mut cluster = cluster();
    let region = region_on(&cluster, 0, "lo");
    {
        let mut owner = cluster.masters[0].connect();
        register(&mut owner, &region, "g1", "p1", "A100", "2");
        register(&mut owner, &region, "g2", "p2", "H100", "4");
    }
    let mut writer = writer(&cluster);
    let edge = edge(&cluster, &[&region]);
    let (g1, g2) = (Query::gpu(&region, "g1"), Query::gpu(&region, "g2"));
    let kept = write(&mut writer, &["GPUCACHE.STATUS", &region, "g1", "offline"]);
    cluster.wait_replicated(0);
    wait_heard(&edge, &region, kept);
    settled(&edge, &g2);

    // The replica loses its link (it cannot authenticate any more); the master acknowledges a
    // write only it holds, the edge hears of it, and the master dies with it.
    let replica = cluster.replicas[0].remove(0);
    let mut on_replica = replica.connect();
    for command in [
        vec!["CONFIG", "SET", "masterauth", "not-the-password"],
        vec!["CLIENT", "KILL", "TYPE", "master"],
    ] {
        redis::cmd(command[0])
            .arg(&command[1..])
            .query::<redis::Value>(&mut on_replica)
            .unwrap();
    }
    eventually("the replica's link is down", DEADLINE, || {
        replica.replication_info("master_link_status").as_deref() == Some("down")
    });
    let lost = write(
        &mut writer,
        &["GPUCACHE.STATUS", &region, "g1", "maintenance"],
    );
    wait_heard(&edge, &region, lost);
    assert_eq!(field(&settled(&edge, &g1), "status"), "maintenance");
    drop(cluster.masters.remove(0));
    redis::cmd("CLUSTER")
        .arg("FAILOVER")
        .arg("TAKEOVER")
        .query::<()>(&mut replica.connect())
        .unwrap();

    // The new master's stream lacks the last event the edge applied: entries after it may
    // have been reissued, so the region is dropped and read afresh from the new master.
    eventually(
        "the edge follows the region on the new master",
        DEADLINE,
        || edge.stats().followed_on.get(&region) == Some(&address(&replica)),
    );
    let stats = edge.stats();
    assert_eq!(stats.region_drops, 1, "{stats:?}");
    assert!(edge.cached(&g2).is_none(), "dropped with its region");
    assert_eq!(field(&settled(&edge, &g1), "status"), "offline");
}
