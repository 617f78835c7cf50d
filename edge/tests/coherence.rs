//! Edge L1s against a real redis-server with gpucache: writes on one connection must stop
//! every L1 from serving the old value, across disconnects, trimming and racing loads.

#[path = "../../tests/common/mod.rs"]
mod common;

use common::{eventually, register, run, Server};
use gpucache_edge::{Edge, EdgeConfig, EdgeError, LinkConfig, Query};
use redis::Connection;
use serde_json::Value;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Barrier};
use std::time::Duration;

const DEADLINE: Duration = Duration::from_secs(5);

fn server() -> Server {
    Server::start(&[], &["--notify-keyspace-events", "Kd"])
}

fn edge(server: &Server, link: LinkConfig) -> Edge {
    let mut config = EdgeConfig::new(&server.url(), &["eu"]);
    config.link = link;
    let edge = Edge::start(config).expect("edge starts");
    assert!(edge.wait_connected(DEADLINE), "edge links come up");
    edge
}

/// True once `edge` no longer serves `query` from L1 as `old` (it is gone, or was reloaded
/// with something else).
fn stops_serving(edge: &Edge, query: &Query, old: &Value) -> bool {
    cached(edge, query).is_none_or(|v| v != *old)
}

/// A read's answer without `ttl_ms`, the one field that changes by itself (a cached record's
/// `ttl_ms` is as of its load).
fn comparable(mut value: Value) -> Value {
    if let Some(record) = value.as_object_mut() {
        record.remove("ttl_ms");
    }
    value
}

fn loaded(edge: &Edge, query: &Query) -> Value {
    comparable((*edge.get(query).expect("load")).clone())
}

fn cached(edge: &Edge, query: &Query) -> Option<Value> {
    edge.cached(query).map(|v| comparable((*v).clone()))
}

/// Loads every query until all of them stay cached; their values.
fn settled(edge: &Edge, queries: &[Query]) -> Vec<Value> {
    let mut values = Vec::new();
    eventually("every query stays cached", DEADLINE, || {
        values = queries.iter().map(|q| loaded(edge, q)).collect();
        queries
            .iter()
            .zip(&values)
            .all(|(q, v)| cached(edge, q).as_ref() == Some(v))
    });
    values
}

fn in_redis(con: &mut Connection, query: &Query) -> Value {
    comparable(gpucache_edge::reply::to_json(
        query.command().query(con).unwrap(),
    ))
}

#[test]
fn every_write_stops_both_l1s_serving_the_old_value() {
    let server = server();
    let mut writer = server.connect();
    for i in 0..4 {
        register(
            &mut writer,
            "eu",
            &format!("g{i}"),
            "p1",
            "A100",
            &format!("{}.5", i + 1),
        );
    }
    register(&mut writer, "eu", "h1", "p1", "H100", "4");
    // Two ordinary L1s, and one that follows the event stream alone (so the stream path —
    // versions, the skip of records already as new — is checked without notifications).
    let edges = [
        edge(&server, LinkConfig::default()),
        edge(&server, LinkConfig::default()),
        edge(&server, stream_only()),
    ];
    let queries = [
        Query::gpu("eu", "g0"),
        Query::gpu("eu", "g1"),
        Query::gpu("eu", "h1"),
        Query::available("eu", &["LIMIT", "10"]),
        Query::order_book("eu", "A100", 10),
        Query::stats("eu"),
    ];
    let writes: &[&[&str]] = &[
        &["GPUCACHE.STATUS", "eu", "g0", "offline"],
        &["GPUCACHE.BOOK", "eu", "g1", "b1", "alice", "3600"],
        &["GPUCACHE.PRICE", "eu", "A100", "9.75"],
        &["GPUCACHE.CANCEL", "eu", "b1"],
        &["GPUCACHE.PROVIDER", "eu", "p1", "maintenance"],
        &["GPUCACHE.PROVIDER", "eu", "p1", "online"],
        &[
            "GPUCACHE.REGISTER",
            "eu",
            "g0",
            "PROVIDER",
            "p1",
            "TYPE",
            "A100",
            "PRICE",
            "1",
        ],
        &["GPUCACHE.INVALIDATE", "eu", "gpu:h1"],
    ];
    for write in writes {
        // Every L1 holds every query, as Redis has it now (the previous write's last events
        // may still drop a copy loaded in between: poll until all stay).
        let before: Vec<Vec<Value>> = edges.iter().map(|e| settled(e, &queries)).collect();
        run(&mut writer, write).expect("write");
        if write[0] == "GPUCACHE.INVALIDATE" {
            // Nothing changed in Redis, but every copy of h1 must go.
            for e in &edges {
                eventually("INVALIDATE gpu:h1 drops h1", DEADLINE, || {
                    e.cached(&queries[2]).is_none()
                });
            }
        }
        // Each query whose answer changed must stop being served by both L1s.
        let mut fresh = server.connect_resp3();
        for q in &queries {
            let now = in_redis(&mut fresh, q);
            for (e, values) in edges.iter().zip(&before) {
                let old = &values[queries.iter().position(|x| x == q).unwrap()];
                if *old != now {
                    eventually(
                        &format!("{q:?} invalidated after {write:?}"),
                        DEADLINE,
                        || stops_serving(e, q, old),
                    );
                }
            }
        }
        for e in &edges {
            for q in &queries {
                let now = in_redis(&mut fresh, q);
                assert_eq!(loaded(e, q), now, "{q:?} reloads fresh after {write:?}");
            }
        }
    }
    for e in &edges[..2] {
        assert!(e.stats().notifications > 0 && e.stats().stream_events > 0);
    }
    assert_eq!(edges[2].stats().notifications, 0);
}

#[test]
fn manual_invalidation_drops_an_unchanged_entry() {
    let server = server();
    let mut writer = server.connect();
    register(&mut writer, "eu", "g1", "p1", "A100", "2");
    let edge = edge(&server, LinkConfig::default());
    let q = Query::gpu("eu", "g1");
    loaded(&edge, &q);
    assert!(edge.cached(&q).is_some());
    run(&mut writer, &["GPUCACHE.INVALIDATE", "eu", "gpu:g1"]).unwrap();
    eventually("INVALIDATE drops g1", DEADLINE, || {
        edge.cached(&q).is_none()
    });
}

fn client_ids(con: &mut Connection, name: &str) -> Vec<String> {
    let list: String = redis::cmd("CLIENT").arg("LIST").query(con).unwrap();
    list.lines()
        .filter(|l| l.contains(&format!(" name={name} ")))
        .filter_map(|l| l.split(' ').find_map(|f| f.strip_prefix("id=")))
        .map(str::to_string)
        .collect()
}

fn kill_links(con: &mut Connection) {
    for name in ["gpucache-edge-notify", "gpucache-edge-stream"] {
        let ids = client_ids(con, name);
        assert!(!ids.is_empty(), "{name} connected");
        for id in ids {
            let _: i64 = redis::cmd("CLIENT")
                .arg("KILL")
                .arg("ID")
                .arg(&id)
                .query(con)
                .unwrap();
        }
    }
}

fn stream_only() -> LinkConfig {
    LinkConfig {
        notifications: false,
        ..LinkConfig::default()
    }
}

/// Links that stay down long enough for the test to write while they are.
fn slow_reconnect() -> LinkConfig {
    LinkConfig {
        backoff_min: Duration::from_millis(800),
        backoff_max: Duration::from_millis(800),
        ..LinkConfig::default()
    }
}

#[test]
fn after_a_killed_connection_changed_entries_are_gone_and_unchanged_ones_kept() {
    let server = server();
    let mut writer = server.connect();
    for i in 0..20 {
        register(&mut writer, "eu", &format!("g{i}"), "p1", "A100", "2");
    }
    let edge = edge(&server, slow_reconnect());
    let queries: Vec<Query> = (0..20)
        .map(|i| Query::gpu("eu", &format!("g{i}")))
        .collect();
    let old: Vec<Value> = queries.iter().map(|q| loaded(&edge, q)).collect();

    kill_links(&mut writer);
    eventually("edge notices the disconnect", DEADLINE, || {
        edge.stats().connection == "disconnected"
    });
    // While it cannot hear invalidations the L1 serves nothing: reads go to Redis.
    assert!(edge.cached(&queries[0]).is_none());
    for i in 0..10 {
        run(
            &mut writer,
            &["GPUCACHE.STATUS", "eu", &format!("g{i}"), "offline"],
        )
        .unwrap();
    }
    assert_eq!(
        loaded(&edge, &queries[0])["status"],
        "offline",
        "a read during the outage goes to Redis"
    );
    assert!(edge.wait_connected(DEADLINE), "edge reconnects");

    for (i, q) in queries.iter().enumerate() {
        if i < 10 {
            assert!(
                stops_serving(&edge, q, &old[i]),
                "g{i} changed while disconnected"
            );
            assert_eq!(loaded(&edge, q)["status"], "offline");
        } else {
            assert_eq!(
                cached(&edge, q).as_ref(),
                Some(&old[i]),
                "g{i} unchanged and kept"
            );
        }
    }
    let stats = edge.stats();
    assert!(
        stats.events_replayed >= 10,
        "replayed the missed events: {stats:?}"
    );
    assert_eq!(stats.region_drops, 0, "{stats:?}");
    assert!(stats.reconnects >= 2, "{stats:?}");
}

#[test]
fn a_stream_trimmed_past_the_last_applied_event_drops_the_region() {
    let server = Server::start(
        &["STREAM_MAXLEN", "10"],
        &["--notify-keyspace-events", "Kd"],
    );
    let mut writer = server.connect();
    for i in 0..5 {
        register(&mut writer, "eu", &format!("g{i}"), "p1", "A100", "2");
    }
    let edge = edge(&server, slow_reconnect());
    let queries: Vec<Query> = (0..5).map(|i| Query::gpu("eu", &format!("g{i}"))).collect();
    for q in &queries {
        loaded(&edge, q);
    }
    kill_links(&mut writer);
    eventually("edge notices the disconnect", DEADLINE, || {
        edge.stats().connection == "disconnected"
    });
    // Far more events than MAXLEN ~ 10 keeps, none touching g1..g4.
    register(&mut writer, "eu", "x", "p9", "T4", "1");
    for i in 0..150 {
        let status = if i % 2 == 0 { "offline" } else { "available" };
        run(&mut writer, &["GPUCACHE.STATUS", "eu", "x", status]).unwrap();
    }
    assert!(edge.wait_connected(DEADLINE));
    for q in &queries {
        assert!(edge.cached(q).is_none(), "{q:?} dropped with its region");
    }
    assert_eq!(edge.stats().region_drops, 1);
    assert_eq!(loaded(&edge, &queries[1])["gpu_id"], "g1");
    assert!(
        edge.cached(&queries[1]).is_some(),
        "the region caches again"
    );
}

fn calls_of(con: &mut Connection, command: &str) -> u64 {
    let info: String = redis::cmd("INFO").arg("commandstats").query(con).unwrap();
    info.lines()
        .find_map(|l| l.strip_prefix(&format!("cmdstat_{command}:calls=")))
        .and_then(|rest| rest.split(',').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

#[test]
fn a_hundred_concurrent_misses_make_one_load() {
    let server = server();
    let mut writer = server.connect();
    register(&mut writer, "eu", "g1", "p1", "A100", "2");
    let edge = Arc::new(edge(&server, LinkConfig::default()));
    let _: () = redis::cmd("CONFIG")
        .arg("RESETSTAT")
        .query(&mut writer)
        .unwrap();
    let loads = Arc::new(AtomicUsize::new(0));
    let start = Arc::new(Barrier::new(100));
    let readers: Vec<_> = (0..100)
        .map(|_| {
            let (edge, loads, start) = (edge.clone(), loads.clone(), start.clone());
            std::thread::spawn(move || {
                start.wait();
                edge.get_or_load(&Query::gpu("eu", "g1"), |q| {
                    loads.fetch_add(1, Ordering::SeqCst);
                    // A slow backend keeps the other 99 misses waiting on this load.
                    std::thread::sleep(Duration::from_millis(200));
                    edge.load(q)
                })
                .map(|v| v["gpu_id"].clone())
            })
        })
        .collect();
    for r in readers {
        assert_eq!(r.join().unwrap(), Ok(Value::from("g1")));
    }
    assert_eq!(loads.load(Ordering::SeqCst), 1);
    assert_eq!(calls_of(&mut writer, "gpucache.get"), 1);
    assert_eq!(edge.stats().loads, 1);
}

/// A load through the L1 whose loader reads Redis, then stalls until `finish`: a slow backend
/// racing a write.
struct SlowLoad {
    go_on: mpsc::Sender<()>,
    thread: std::thread::JoinHandle<Result<Arc<Value>, EdgeError>>,
}

impl SlowLoad {
    /// Returns once the loader has read.
    fn start(edge: &Arc<Edge>, q: &Query) -> SlowLoad {
        let (read_done, wait_read) = mpsc::channel();
        let (go_on, wait_go) = mpsc::channel::<()>();
        let (edge, q) = (edge.clone(), q.clone());
        let thread = std::thread::spawn(move || {
            edge.get_or_load(&q, |q| {
                let old = edge.load(q);
                read_done.send(()).unwrap();
                wait_go.recv().unwrap();
                old
            })
        });
        wait_read.recv().unwrap();
        SlowLoad { go_on, thread }
    }

    fn finish(self) -> Result<Arc<Value>, EdgeError> {
        self.go_on.send(()).unwrap();
        self.thread.join().unwrap()
    }
}

/// Runs a write and waits until its stream event has been applied to the L1.
fn write_and_wait_applied(edge: &Edge, writer: &mut Connection, write: &[&str]) {
    let seen = edge.stats().stream_events;
    run(writer, write).unwrap();
    eventually("the write's event reaches the L1", DEADLINE, || {
        edge.stats().stream_events > seen
    });
}

#[test]
fn a_load_that_started_before_a_write_never_puts_the_old_value_back() {
    let server = server();
    let mut writer = server.connect();
    register(&mut writer, "eu", "g1", "p1", "A100", "2");
    let edge = Arc::new(edge(&server, LinkConfig::default()));
    let q = Query::gpu("eu", "g1");

    // The loader reads, then stalls until the write has been applied to the L1.
    let reader = SlowLoad::start(&edge, &q);
    write_and_wait_applied(
        &edge,
        &mut writer,
        &["GPUCACHE.STATUS", "eu", "g1", "offline"],
    );
    let returned = reader.finish().unwrap();
    assert_eq!(
        returned["status"], "available",
        "the slow read saw the old record"
    );
    assert!(
        edge.cached(&q).is_none(),
        "the old record must not be cached"
    );
    assert_eq!(edge.stats().fills_refused, 1);
    assert_eq!(settled(&edge, &[q])[0]["status"], "offline");
}

#[test]
fn load_errors_reach_the_caller() {
    let server = server();
    let edge = edge(&server, LinkConfig::default());
    match edge.get(&Query::gpu("eu", "missing")) {
        Err(EdgeError::Server(message)) => assert!(message.starts_with("NOGPU"), "{message}"),
        other => panic!("expected NOGPU, got {other:?}"),
    }
}

#[test]
fn the_example_configs_read_only_edge_user_runs_an_edge() {
    let server = Server::start_with_config(include_str!("../../redis.conf.example"), &[]);
    let mut writer = server.connect();
    register(&mut writer, "eu", "g1", "p1", "A100", "2");
    let url = format!("redis://edge:CHANGE-ME-edge@127.0.0.1:{}/", server.port);
    let edge = Edge::start(EdgeConfig::new(&url, &["eu"])).expect("edge starts");
    assert!(
        edge.wait_connected(DEADLINE),
        "links come up under the edge user's ACL"
    );
    let q = Query::gpu("eu", "g1");
    assert_eq!(loaded(&edge, &q)["status"], "available");
    run(&mut writer, &["GPUCACHE.STATUS", "eu", "g1", "offline"]).unwrap();
    eventually("the edge user's L1 hears the write", DEADLINE, || {
        edge.cached(&q).is_none()
    });
    assert_eq!(loaded(&edge, &q)["status"], "offline");
}

/// `psub=` of every connection named `name` (`CLIENT LIST`).
fn pattern_counts(con: &mut Connection, name: &str) -> Vec<u32> {
    let list: String = redis::cmd("CLIENT").arg("LIST").query(con).unwrap();
    list.lines()
        .filter(|l| l.contains(&format!(" name={name} ")))
        .filter_map(|l| l.split(' ').find_map(|f| f.strip_prefix("psub=")))
        .map(|n| n.parse().unwrap())
        .collect()
}

/// Every distinct pattern costs the server a match on every message it publishes (README
/// "Scale": 25 patterns halve HSET throughput), so however many regions an edge follows, its
/// notification link holds one pattern.
#[test]
fn the_notification_link_holds_one_pattern_whatever_it_follows() {
    let server = server();
    let mut writer = server.connect();
    let regions = ["eu", "us", "ap", "sa"];
    let edge = Edge::start(EdgeConfig::new(&server.url(), &regions)).expect("edge starts");
    assert!(edge.wait_connected(DEADLINE));
    assert_eq!(pattern_counts(&mut writer, "gpucache-edge-notify"), vec![1]);
    let numpat: i64 = redis::cmd("PUBSUB")
        .arg("NUMPAT")
        .query(&mut writer)
        .unwrap();
    assert_eq!(numpat, 1);
}

#[test]
fn reads_of_a_region_the_edge_does_not_follow_are_never_cached() {
    let server = server();
    let mut writer = server.connect();
    register(&mut writer, "us", "g1", "p", "A100", "1");
    let edge = edge(&server, LinkConfig::default());
    let q = Query::gpu("us", "g1");
    assert_eq!(loaded(&edge, &q)["gpu_id"], "g1");
    assert!(edge.cached(&q).is_none(), "no link follows region us");
    let stats = edge.stats();
    assert_eq!(stats.last_event_ids.keys().collect::<Vec<_>>(), ["eu"]);
}

#[test]
fn a_reader_arriving_after_a_write_never_gets_a_value_loaded_before_it() {
    let server = server();
    let mut writer = server.connect();
    register(&mut writer, "eu", "g1", "p1", "A100", "2");
    let edge = Arc::new(edge(&server, LinkConfig::default()));
    let q = Query::gpu("eu", "g1");
    let slow = SlowLoad::start(&edge, &q);
    write_and_wait_applied(
        &edge,
        &mut writer,
        &["GPUCACHE.STATUS", "eu", "g1", "offline"],
    );
    // This read begins after the write: it may wait for the slow load in flight, but must not
    // be handed its (older) result.
    let late = {
        let (edge, q) = (edge.clone(), q.clone());
        std::thread::spawn(move || edge.get(&q).map(|v| v["status"].clone()))
    };
    eventually(
        "the late reader waits on the load in flight",
        DEADLINE,
        || edge.stats().misses >= 2,
    );
    assert_eq!(slow.finish().unwrap()["status"], "available");
    assert_eq!(late.join().unwrap(), Ok(Value::from("offline")));
}

#[test]
fn a_stream_trimmed_under_a_live_but_slow_reader_drops_the_region() {
    let server = Server::start(
        &["STREAM_MAXLEN", "10"],
        &["--notify-keyspace-events", "Kd"],
    );
    let mut writer = server.connect();
    register(&mut writer, "eu", "g0", "p1", "A100", "2");
    register(&mut writer, "eu", "x", "p1", "T4", "1");
    // The hook stalls the stream thread on its next invalidation while `stall` is set: a
    // consumer that falls behind.
    let stall = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (stalled, wait_stalled) = mpsc::channel::<()>();
    let (release, wait_release) = mpsc::channel::<()>();
    let wait_release = std::sync::Mutex::new(wait_release);
    let stalled = std::sync::Mutex::new(stalled);
    let hook: gpucache_edge::InvalidationHook = {
        let stall = stall.clone();
        Arc::new(move |_key: &str, source: gpucache_edge::Source| {
            if source == gpucache_edge::Source::Stream && stall.swap(false, Ordering::SeqCst) {
                let _ = stalled.lock().unwrap().send(());
                let _ = wait_release.lock().unwrap().recv();
            }
        })
    };
    let mut config = EdgeConfig::new(&server.url(), &["eu"]);
    config.link = stream_only();
    let edge = Edge::start_with_hook(config, Some(hook)).unwrap();
    assert!(edge.wait_connected(DEADLINE));
    let g0 = Query::gpu("eu", "g0");
    let old = loaded(&edge, &g0);
    assert_eq!(old["status"], "available");

    stall.store(true, Ordering::SeqCst);
    run(&mut writer, &["GPUCACHE.STATUS", "eu", "x", "offline"]).unwrap();
    wait_stalled.recv_timeout(DEADLINE).unwrap();
    // While the reader is stuck, g0 changes and the stream is trimmed far past that change.
    run(&mut writer, &["GPUCACHE.STATUS", "eu", "g0", "offline"]).unwrap();
    for i in 0..300 {
        let status = if i % 2 == 0 { "available" } else { "offline" };
        run(&mut writer, &["GPUCACHE.STATUS", "eu", "x", status]).unwrap();
    }
    release.send(()).unwrap();
    eventually("the trimmed change is not served", DEADLINE, || {
        stops_serving(&edge, &g0, &old)
    });
    assert!(edge.stats().region_drops >= 1, "{:?}", edge.stats());
    assert_eq!(loaded(&edge, &g0)["status"], "offline");
}

#[test]
fn a_restart_that_lost_writes_drops_the_region() {
    let server = server();
    let port = server.port;
    let mut writer = server.connect();
    register(&mut writer, "eu", "g0", "p1", "A100", "2");
    register(&mut writer, "eu", "g1", "p1", "A100", "2");
    let edge = edge(&server, LinkConfig::default());
    let _: () = redis::cmd("SAVE").query(&mut writer).unwrap();
    for gpu in ["g0", "g1"] {
        run(&mut writer, &["GPUCACHE.STATUS", "eu", gpu, "offline"]).unwrap();
    }
    let (g0, g1) = (Query::gpu("eu", "g0"), Query::gpu("eu", "g1"));
    // (Each write's events may still drop a copy loaded in between: poll until both stay.)
    eventually("the L1 holds both writes", DEADLINE, || {
        let offline = [&g0, &g1]
            .iter()
            .all(|q| loaded(&edge, q)["status"] == "offline");
        offline && edge.cached(&g0).is_some() && edge.cached(&g1).is_some()
    });

    // The server dies without persisting those writes and comes back from the snapshot; a new
    // write reuses the lost one's sequence numbers (and so its version).
    let dir = server.stop();
    let server = Server::start_in(dir, port, &[], &["--notify-keyspace-events", "Kd"]);
    let mut writer = server.connect();
    run(&mut writer, &["GPUCACHE.STATUS", "eu", "g1", "maintenance"]).unwrap();
    assert!(
        edge.wait_connected(DEADLINE),
        "edge reconnects to the restarted server"
    );
    eventually("the lost history is dropped", DEADLINE, || {
        edge.stats().region_drops >= 1
    });
    assert_eq!(loaded(&edge, &g0)["status"], "available");
    assert_eq!(loaded(&edge, &g1)["status"], "maintenance");
}

#[test]
fn a_panicking_hook_does_not_stop_invalidation() {
    let server = server();
    let mut writer = server.connect();
    register(&mut writer, "eu", "g1", "p1", "A100", "2");
    let hook: gpucache_edge::InvalidationHook = Arc::new(|_: &str, _| panic!("hook bug"));
    let edge = Edge::start_with_hook(EdgeConfig::new(&server.url(), &["eu"]), Some(hook)).unwrap();
    assert!(edge.wait_connected(DEADLINE));
    let q = Query::gpu("eu", "g1");
    for status in ["offline", "available", "maintenance"] {
        loaded(&edge, &q);
        run(&mut writer, &["GPUCACHE.STATUS", "eu", "g1", status]).unwrap();
        eventually("invalidated despite the hook", DEADLINE, || {
            edge.cached(&q).is_none()
        });
        assert_eq!(loaded(&edge, &q)["status"], status);
    }
    assert_eq!(edge.stats().connection, "connected");
}

#[test]
fn a_load_that_times_out_fails_and_its_late_reply_is_never_read_as_another_answer() {
    let server = server();
    let mut writer = server.connect();
    register(&mut writer, "eu", "g1", "p1", "A100", "2");
    let mut config = EdgeConfig::new(&server.url(), &["eu"]);
    config.loader_connections = 1; // every load reuses the one connection
    config.loader_timeout = Duration::from_millis(300);
    let edge = Edge::start(config).unwrap();
    assert!(edge.wait_connected(DEADLINE));
    assert_eq!(edge.load(&Query::stats("eu")).unwrap()["gpus_total"], 1);

    // A stuck server: the read times out and the caller gets an error, not a hang.
    let _: () = redis::cmd("CLIENT")
        .arg("PAUSE")
        .arg(1000)
        .arg("ALL")
        .query(&mut writer)
        .unwrap();
    match edge.load(&Query::gpu("eu", "g1")) {
        Err(EdgeError::Connection(_)) => {}
        other => panic!("expected a timeout, got {other:?}"),
    }
    // Once the server answers again (a new client's PING waits out the pause), GET's late
    // reply must not be taken for STATS.
    let _: String = redis::cmd("PING").query(&mut server.connect()).unwrap();
    assert_eq!(edge.load(&Query::stats("eu")).unwrap()["gpus_total"], 1);
    assert_eq!(edge.load(&Query::gpu("eu", "g1")).unwrap()["gpu_id"], "g1");
}
