//! Keyspace notifications and the per-region event stream.

mod common;

use common::*;
use serde_json::Value as Json;
use std::time::{Duration, Instant};

/// Subscribes to gpucache keyspace notifications and collects (channel, event) pairs.
fn subscriber(server: &Server) -> std::sync::mpsc::Receiver<(String, String)> {
    let (tx, rx) = std::sync::mpsc::channel();
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let mut con = server.connect();
    std::thread::spawn(move || {
        let mut pubsub = con.as_pubsub();
        pubsub.psubscribe("__keyspace@0__:gpucache:*").unwrap();
        pubsub
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        ready_tx.send(()).unwrap();
        while let Ok(msg) = pubsub.get_message() {
            let payload: String = msg.get_payload().unwrap_or_default();
            if tx
                .send((msg.get_channel_name().to_owned(), payload))
                .is_err()
            {
                break;
            }
        }
    });
    ready_rx.recv_timeout(Duration::from_secs(5)).unwrap();
    rx
}

fn collect_until(
    rx: &std::sync::mpsc::Receiver<(String, String)>,
    mut done: impl FnMut(&[(String, String)]) -> bool,
) -> Vec<(String, String)> {
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut seen = Vec::new();
    while Instant::now() < deadline && !done(&seen) {
        if let Ok(m) = rx.recv_timeout(Duration::from_millis(50)) {
            seen.push(m);
        }
    }
    seen
}

fn has(seen: &[(String, String)], key: &str, event: &str) -> bool {
    let channel = format!("__keyspace@0__:{key}");
    seen.iter().any(|(c, e)| *c == channel && e == event)
}

#[test]
fn a_booking_notifies_every_key_it_changed() {
    let server = Server::start(&[], &["--notify-keyspace-events", "Kd"]);
    let mut con = server.connect();
    seed(&mut con);
    let rx = subscriber(&server);
    run(
        &mut con,
        &["GPUCACHE.BOOK", "eu", "g2", "b1", "alice", "600"],
    )
    .unwrap();
    let expected = [
        ("gpucache:{eu}:gpu:g2", "gpucache.booked"),
        ("gpucache:{eu}:booking:b1", "gpucache.booked"),
        ("gpucache:{eu}:avail-own:A100", "gpucache.booked"),
        ("gpucache:{eu}:stats:market", "gpucache.stats"),
    ];
    let seen = collect_until(&rx, |s| expected.iter().all(|(k, e)| has(s, k, e)));
    for (key, event) in expected {
        assert!(has(&seen, key, event), "missing {event} on {key}: {seen:?}");
    }

    run(&mut con, &["GPUCACHE.PRICE", "eu", "H100", "5"]).unwrap();
    run(&mut con, &["GPUCACHE.PROVIDER", "eu", "p2", "offline"]).unwrap();
    run(&mut con, &["GPUCACHE.CANCEL", "eu", "b1"]).unwrap();
    run(&mut con, &["GPUCACHE.STATUS", "eu", "g1", "maintenance"]).unwrap();
    run(&mut con, &["GPUCACHE.INVALIDATE", "eu", "gpu:g3"]).unwrap();
    let expected = [
        ("gpucache:{eu}:price:H100", "gpucache.price"),
        ("gpucache:{eu}:provider:p2", "gpucache.provider"),
        ("gpucache:{eu}:gpu:g4", "gpucache.provider"),
        ("gpucache:{eu}:gpu:g2", "gpucache.cancelled"),
        ("gpucache:{eu}:booking:b1", "gpucache.cancelled"),
        ("gpucache:{eu}:gpu:g1", "gpucache.status"),
        ("gpucache:{eu}:gpu:g3", "gpucache.invalidate"),
    ];
    let seen = collect_until(&rx, |s| expected.iter().all(|(k, e)| has(s, k, e)));
    for (key, event) in expected {
        assert!(has(&seen, key, event), "missing {event} on {key}: {seen:?}");
    }
}

#[test]
fn a_refused_command_notifies_nothing() {
    let server = Server::start(&[], &["--notify-keyspace-events", "KA"]);
    let mut con = server.connect();
    seed(&mut con);
    run(
        &mut con,
        &["GPUCACHE.BOOK", "eu", "g1", "b1", "alice", "600"],
    )
    .unwrap();
    let rx = subscriber(&server);
    error(&mut con, &["GPUCACHE.BOOK", "eu", "g1", "b2", "bob", "600"]);
    // A marker write proves the subscriber was listening the whole time.
    run(&mut con, &["GPUCACHE.INVALIDATE", "eu", "stats"]).unwrap();
    let seen = collect_until(&rx, |s| {
        has(s, "gpucache:{eu}:stats:market", "gpucache.invalidate")
    });
    assert!(has(
        &seen,
        "gpucache:{eu}:stats:market",
        "gpucache.invalidate"
    ));
    let before_marker: Vec<_> = seen
        .iter()
        .take_while(|(_, e)| e != "gpucache.invalidate")
        .filter(|(_, e)| e != "xadd")
        .collect();
    assert!(
        before_marker.is_empty(),
        "the refused booking notified: {before_marker:?}"
    );
}

/// Events derived from a command's changes (order book moved, demand multiplier moved) follow
/// its primary event; `primary_events` leaves them out.
fn is_derived(event: &Json) -> bool {
    event["type"] == "order_book_updated" || event["reason"] == "demand"
}

fn primary_events(con: &mut redis::Connection) -> Vec<(String, Json)> {
    stream_events(con)
        .into_iter()
        .filter(|(_, e)| !is_derived(e))
        .collect()
}

fn stream_events(con: &mut redis::Connection) -> Vec<(String, Json)> {
    let entries: Vec<(String, Vec<(String, String)>)> = redis::cmd("XRANGE")
        .arg("gpucache:{eu}:events")
        .arg("-")
        .arg("+")
        .query(con)
        .unwrap();
    entries
        .into_iter()
        .map(|(id, fields)| {
            let get = |name: &str| {
                fields
                    .iter()
                    .find(|(k, _)| k == name)
                    .map(|(_, v)| v.clone())
            };
            let payload: Json = serde_json::from_str(&get("payload").unwrap()).unwrap();
            assert_eq!(get("type").unwrap(), payload["type"].as_str().unwrap());
            (id, payload)
        })
        .collect()
}

#[test]
fn every_command_appends_one_structured_event() {
    let server = Server::start(&[], &[]);
    let mut con = server.connect();
    seed(&mut con);
    run(
        &mut con,
        &["GPUCACHE.BOOK", "eu", "g2", "b1", "alice", "600"],
    )
    .unwrap();
    run(&mut con, &["GPUCACHE.PRICE", "eu", "A100", "3"]).unwrap();
    run(&mut con, &["GPUCACHE.CANCEL", "eu", "b1"]).unwrap();
    run(&mut con, &["GPUCACHE.PROVIDER", "eu", "p2", "maintenance"]).unwrap();
    run(&mut con, &["GPUCACHE.STATUS", "eu", "g1", "offline"]).unwrap();
    run(&mut con, &["GPUCACHE.INVALIDATE", "eu", "gpu:g1"]).unwrap();
    error(&mut con, &["GPUCACHE.CANCEL", "eu", "b1"]);

    let all = stream_events(&mut con);
    let events: Vec<(String, Json)> = all
        .iter()
        .filter(|(_, e)| !is_derived(e))
        .cloned()
        .collect();
    let kinds: Vec<&str> = events
        .iter()
        .map(|(_, e)| e["type"].as_str().unwrap())
        .collect();
    assert_eq!(
        kinds,
        [
            "gpu_availability_changed",
            "gpu_availability_changed",
            "gpu_availability_changed",
            "gpu_availability_changed",
            "booking_created",
            "pricing_updated",
            "booking_cancelled",
            "provider_status_changed",
            "gpu_availability_changed",
            "manual_invalidation",
        ]
    );
    let booked = &events[4].1;
    assert_eq!(booked["gpu_id"], "g2");
    assert_eq!(booked["booking_id"], "b1");
    assert_eq!(booked["user_id"], "alice");
    assert_eq!(booked["version"], 5);
    assert_eq!(booked["old"]["status"], "available");
    assert_eq!(booked["new"]["status"], "busy");
    let keys: Vec<&str> = booked["keys"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k.as_str().unwrap())
        .collect();
    assert!(keys.contains(&"gpucache:{eu}:gpu:g2") && keys.contains(&"gpucache:{eu}:booking:b1"));
    assert!(!keys.iter().any(|k| k.ends_with(":events")), "{keys:?}");

    let priced = &events[5].1;
    assert_eq!(priced["gpu_type"], "A100");
    assert_eq!(priced["new"]["price"], "3");
    let cancelled = &events[6].1;
    assert_eq!(
        cancelled["version"], 7,
        "versions come from the region sequence: seed 1-4, book 5, price 6, cancel 7"
    );
    assert_eq!(events[7].1["old"]["status"], "online");
    assert_eq!(events[7].1["new"]["status"], "maintenance");
    assert_eq!(events[9].1["keys"][0], "gpucache:{eu}:gpu:g1");

    // Every command that moved the availability index also reported its order book.
    let books: Vec<&str> = all
        .iter()
        .filter(|(_, e)| e["type"] == "order_book_updated")
        .map(|(_, e)| e["gpu_type"].as_str().unwrap())
        .collect();
    // 4 registrations, book, price, cancel, provider (A100 and H100), status.
    assert_eq!(
        books,
        ["A100", "A100", "A100", "H100", "A100", "A100", "A100", "A100", "H100", "A100"]
    );

    // Stream ids grow, so a consumer can resume after the last one it saw.
    let ids: Vec<&String> = all.iter().map(|(id, _)| id).collect();
    let mut sorted = ids.clone();
    sorted.sort_by_key(|id| {
        let (ms, seq) = id.split_once('-').unwrap();
        (ms.parse::<u64>().unwrap(), seq.parse::<u64>().unwrap())
    });
    assert_eq!(ids, sorted);
}

#[test]
fn the_stream_is_trimmed_to_about_stream_maxlen() {
    let server = Server::start(&["STREAM_MAXLEN", "100"], &[]);
    let mut con = server.connect();
    seed(&mut con);
    for i in 0..600 {
        let status = if i % 2 == 0 { "offline" } else { "available" };
        run(&mut con, &["GPUCACHE.STATUS", "eu", "g1", status]).unwrap();
    }
    let len: i64 = redis::cmd("XLEN")
        .arg("gpucache:{eu}:events")
        .query(&mut con)
        .unwrap();
    assert!(
        (100..300).contains(&len),
        "approximate trimming keeps about 100, got {len}"
    );
}

#[test]
fn updates_name_only_the_keys_they_changed() {
    let server = Server::start(&[], &[]);
    let mut con = server.connect();
    seed(&mut con);
    let seq_before: String = redis::cmd("HGET")
        .arg("gpucache:{eu}:stats:market")
        .arg("seq")
        .query(&mut con)
        .unwrap();
    // Same price, provider and type; only MEMORY is new. The own price is re-asserted, so the
    // GPU re-lists (a newer own price wins over a type price): its key set names the index.
    run(
        &mut con,
        &[
            "GPUCACHE.REGISTER",
            "eu",
            "g1",
            "PROVIDER",
            "p1",
            "TYPE",
            "A100",
            "PRICE",
            "2.5",
            "MEMORY",
            "80",
        ],
    )
    .unwrap();
    let events = primary_events(&mut con);
    let last = &events.last().unwrap().1;
    assert_eq!(last["reason"], "updated");
    assert_eq!(last["version"], 5);
    let keys: Vec<&str> = last["keys"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k.as_str().unwrap())
        .collect();
    assert!(keys.contains(&"gpucache:{eu}:gpu:g1"));
    assert!(
        !keys.contains(&"gpucache:{eu}:provider-gpus:p1"),
        "provider unchanged: {keys:?}"
    );
    let seq_after: String = redis::cmd("HGET")
        .arg("gpucache:{eu}:stats:market")
        .arg("seq")
        .query(&mut con)
        .unwrap();
    assert_ne!(seq_before, seq_after);

    // A status change of an unlisted GPU to another unlisted status does not touch the index.
    run(&mut con, &["GPUCACHE.STATUS", "eu", "g1", "offline"]).unwrap();
    run(&mut con, &["GPUCACHE.STATUS", "eu", "g1", "maintenance"]).unwrap();
    let events = stream_events(&mut con);
    assert_eq!(
        events.last().unwrap().1["type"],
        "gpu_availability_changed",
        "no order book event"
    );
    let keys: Vec<&str> = events.last().unwrap().1["keys"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k.as_str().unwrap())
        .collect();
    assert!(!keys.iter().any(|k| k.contains(":avail-")), "{keys:?}");
}
