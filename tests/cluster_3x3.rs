//! gpucache in a real Redis Cluster of three masters with a replica each, the module loaded on
//! every node, driven like production: through a cluster client that follows `MOVED`, `ASK`
//! and `TRYAGAIN`.
//!
//! One cluster serves the three checks in turn (starting one takes seconds; the checks leave
//! each other's regions alone, and the last one reshapes the cluster):
//! 1. every command on nine regions spread over the three masters;
//! 2. a region's slot resharded by hand while a writer keeps booking, cancelling and pricing in
//!    it;
//! 3. bookings in flight through a manual `CLUSTER FAILOVER` and through `kill -9` of a master
//!    that the cluster fails over by itself.

mod common;

use common::cluster::{
    begin_slot_move, cluster_args, end_slot_move, key_slot, keys_in_slot, migrate, Cluster,
    ClusterNode,
};
use common::*;
use redis::cluster::{ClusterClient, ClusterConnection};
use redis::{Connection, ConnectionLike, RedisResult, Value};
use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Regions per master in the first check: 3 × 3 = 9 regions.
const REGIONS_PER_MASTER: usize = 3;

/// How long a writer, or the test waiting for one, may take to get past a move or a failover
/// (a failure is detected after `cluster-node-timeout`, 5 s, then a replica is elected).
const PATIENCE: Duration = Duration::from_secs(60);

#[test]
fn a_three_master_cluster_serves_every_command_and_survives_reshards_and_failovers() {
    let started = Instant::now();
    let mut cluster = Cluster::start(3, 1, &[]);
    let regions = regions_on_every_master(&cluster);
    eprintln!("cluster up after {:?}", started.elapsed());
    every_command_on_every_region(&cluster, &regions);
    eprintln!("every command checked after {:?}", started.elapsed());
    let left_booked = reshard_under_a_steady_writer(&cluster, &regions);
    eprintln!("reshard checked after {:?}", started.elapsed());
    failover_with_bookings_in_flight(&mut cluster, &regions, left_booked);
    eprintln!("failovers checked after {:?}", started.elapsed());
}

// ---------------------------------------------------------------------------------------------
// Helpers

/// A reply map as field -> text.
fn map_of(reply: &Value) -> HashMap<String, String> {
    as_map(reply)
        .iter()
        .map(|(k, v)| (k.clone(), text(v)))
        .collect()
}

/// Runs a command that must succeed and returns its reply map as text.
fn ok(con: &mut impl ConnectionLike, args: &[&str]) -> HashMap<String, String> {
    let reply = run(con, args).unwrap_or_else(|e| panic!("{args:?} failed: {e}"));
    map_of(&reply)
}

/// A numeric field of a reply that a writer thread reads: a reply that is not a map or lacks
/// the field is reported, not panicked on.
fn field_of(reply: &Value, field: &str) -> Result<(HashMap<String, String>, i64), String> {
    let map = match reply {
        Value::Array(_) | Value::Map(_) => map_of(reply),
        other => return Err(format!("not a map: {other:?}")),
    };
    let number = map
        .get(field)
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| format!("no numeric {field} in {map:?}"))?;
    Ok((map, number))
}

fn number(reply: &HashMap<String, String>, field: &str) -> i64 {
    reply[field]
        .parse()
        .unwrap_or_else(|_| panic!("{field} is not a number: {reply:?}"))
}

/// A cluster client (redis-rs) that knows every master, retrying redirections and `TRYAGAIN`
/// quickly: 30 tries, each wait 5–100 ms.
fn cluster_client(cluster: &Cluster) -> ClusterConnection {
    let urls: Vec<String> = cluster.masters.iter().map(|m| m.server.url()).collect();
    ClusterClient::builder(urls)
        .retries(30)
        .min_retry_wait(5)
        .max_retry_wait(100)
        .retry_wait_formula(10, 2)
        .build()
        .and_then(|client| client.get_connection())
        .expect("cluster client")
}

/// The port of the master serving `slot`, as the node behind `con` sees the cluster.
fn slot_owner_port(con: &mut Connection, slot: u16) -> Option<u16> {
    let ranges: Value = redis::cmd("CLUSTER").arg("SLOTS").query(con).ok()?;
    let Value::Array(ranges) = ranges else {
        return None;
    };
    ranges.iter().find_map(|range| {
        let Value::Array(range) = range else {
            return None;
        };
        let (Value::Int(first), Value::Int(last), Value::Array(master)) =
            (range.first()?, range.get(1)?, range.get(2)?)
        else {
            return None;
        };
        if (*first..=*last).contains(&i64::from(slot)) {
            match master.get(1)? {
                Value::Int(port) => u16::try_from(*port).ok(),
                _ => None,
            }
        } else {
            None
        }
    })
}

/// The index in `cluster.masters` of the master serving `slot` (once the first master's view
/// of the cluster caught up with a failover).
fn owner_index(cluster: &Cluster, slot: u16) -> usize {
    let mut con = cluster.masters[0].connect();
    let mut owner = None;
    eventually(
        &format!("a master serves slot {slot}"),
        Duration::from_secs(10),
        || {
            let port = slot_owner_port(&mut con, slot);
            owner = cluster
                .masters
                .iter()
                .position(|m| Some(m.server.port) == port);
            owner.is_some()
        },
    );
    owner.expect("checked above")
}

/// `count=` of an `errorstat_<code>` line of `INFO errorstats` (0 when the error never
/// happened).
fn error_count(con: &mut Connection, code: &str) -> u64 {
    let info: String = redis::cmd("INFO").arg("errorstats").query(con).unwrap();
    info.lines()
        .find_map(|l| {
            l.trim_end()
                .strip_prefix(&format!("errorstat_{code}:count="))
        })
        .and_then(|n| n.split(',').next()?.parse().ok())
        .unwrap_or(0)
}

/// Milliseconds since the Unix epoch, the clock bookings end by.
fn now_ms() -> i64 {
    let since = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap();
    i64::try_from(since.as_millis()).unwrap()
}

/// A region with its slot.
#[derive(Clone, Debug)]
struct Region {
    name: String,
    slot: u16,
}

/// Nine regions, three on each master (asserted through `CLUSTER SLOTS`).
fn regions_on_every_master(cluster: &Cluster) -> Vec<Region> {
    let mut con = cluster.masters[0].connect();
    let count = cluster.masters.len();
    let mut per_master: Vec<Vec<Region>> = vec![Vec::new(); count];
    for i in 0.. {
        let name = format!("r{i}");
        let slot = key_slot(&mut con, &name);
        let owner = owner_index(cluster, slot);
        if per_master[owner].len() < REGIONS_PER_MASTER {
            per_master[owner].push(Region { name, slot });
        }
        if per_master.iter().all(|r| r.len() == REGIONS_PER_MASTER) {
            break;
        }
    }
    per_master.into_iter().flatten().collect()
}

// ---------------------------------------------------------------------------------------------
// 1. Every command on every region

/// Every command on each of nine regions through a cluster client (which routes each command
/// by its region, the declared key), every reply checked; then every region is clean on its
/// master and its replica, and `STATS` without a region on each master sums exactly its
/// three regions.
fn every_command_on_every_region(cluster: &Cluster, regions: &[Region]) {
    let mut cc = cluster_client(cluster);
    for region in regions {
        let r = region.name.as_str();
        let what = format!("region {r}");
        let g1 = ok(
            &mut cc,
            &register_args(r, "g1", "p1", "A100", "2.5", &["MEMORY", "80"]),
        );
        assert_eq!(
            (g1["result"].as_str(), g1["status"].as_str()),
            ("created", "available"),
            "{what}"
        );
        let g2 = ok(
            &mut cc,
            &register_args(r, "g2", "p1", "A100", "1.5", &["CORES", "6912"]),
        );
        let g3 = ok(
            &mut cc,
            &register_args(r, "g3", "p2", "H100", "4", &["SCORE", "100"]),
        );
        assert_eq!(g3["result"], "created", "{what}");
        assert!(number(&g1, "version") < number(&g2, "version"), "{what}");
        assert!(number(&g2, "version") < number(&g3, "version"), "{what}");

        let got = ok(&mut cc, &["GPUCACHE.GET", r, "g1"]);
        assert_eq!(got["region"], r);
        assert_eq!(got["provider"], "p1", "{what}");
        assert_eq!(got["type"], "A100", "{what}");
        assert_eq!(got["status"], "available", "{what}");
        assert_eq!(got["listed"], "1", "{what}");
        assert_eq!(got["price"], "2.5", "{what}");
        assert_eq!(got["price_source"], "own", "{what}");
        assert_eq!(got["memory_gb"], "80", "{what}");
        assert_eq!(got["booking_id"], "(nil)", "{what}");
        assert_eq!(got["version"], g1["version"], "{what}");
        let missing = run(&mut cc, &["GPUCACHE.GET", r, "nope"]).unwrap_err();
        assert_eq!(missing.code(), Some("NOGPU"), "{what}: {missing}");

        let status = ok(&mut cc, &["GPUCACHE.STATUS", r, "g3", "maintenance"]);
        assert_eq!(
            (status["result"].as_str(), status["status"].as_str()),
            ("changed", "maintenance"),
            "{what}"
        );
        assert!(number(&status, "version") > number(&g3, "version"));

        let price = ok(&mut cc, &["GPUCACHE.PRICE", r, "A100", "2"]);
        assert_eq!(price["type"], "A100", "{what}");
        assert_eq!(price["price"], "2", "{what}");
        assert_eq!(price["listed_gpus"], "2", "{what}: g1 and g2");

        let booked = ok(&mut cc, &["GPUCACHE.BOOK", r, "g1", "b1", "alice", "600"]);
        assert_eq!(booked["result"], "created", "{what}");
        assert_eq!(booked["gpu_id"], "g1", "{what}");
        assert_eq!(booked["user_id"], "alice", "{what}");
        assert_eq!(booked["price"], "2", "{what}: the type price, set last");
        assert_eq!(booked["duration_s"], "600", "{what}");
        assert!(number(&booked, "gpu_version") > number(&g1, "version"));

        let available = run(&mut cc, &["GPUCACHE.AVAILABLE", r]).unwrap();
        let Value::Array(rows) = available else {
            panic!("{what}: AVAILABLE returned {available:?}")
        };
        let rows: Vec<HashMap<String, String>> = rows.iter().map(map_of).collect();
        assert_eq!(rows.len(), 1, "{what}: only g2 is bookable: {rows:?}");
        assert_eq!(rows[0]["gpu_id"], "g2", "{what}");
        assert_eq!(rows[0]["price"], "2", "{what}");
        assert_eq!(rows[0]["cores"], "6912", "{what}");

        let book = run(&mut cc, &["GPUCACHE.ORDERBOOK", r, "A100"]).unwrap();
        let book = as_map(&book);
        assert_eq!(text(&book["gpus_listed"]), "1", "{what}");
        assert_eq!(text(&book["gpus_total"]), "2", "{what}");
        let Value::Array(asks) = &book["asks"] else {
            panic!("{what}: asks {:?}", book["asks"])
        };
        let asks: Vec<HashMap<String, String>> = asks.iter().map(map_of).collect();
        assert_eq!(asks.len(), 1, "{what}: {asks:?}");
        assert_eq!(
            (asks[0]["price"].as_str(), asks[0]["gpus"].as_str()),
            ("2", "1"),
            "{what}"
        );

        let provider = ok(&mut cc, &["GPUCACHE.PROVIDER", r, "p2", "offline"]);
        assert_eq!(provider["status"], "offline", "{what}");
        assert_eq!(provider["gpus"], "1", "{what}: g3");
        let provider = ok(&mut cc, &["GPUCACHE.PROVIDER", r, "p2", "online"]);
        assert_eq!(provider["status"], "online", "{what}");

        let cancelled = ok(&mut cc, &["GPUCACHE.CANCEL", r, "b1"]);
        assert_eq!(cancelled["gpu_id"], "g1", "{what}");
        assert_eq!(cancelled["gpu_status"], "available", "{what}");
        assert!(number(&cancelled, "gpu_version") > number(&booked, "gpu_version"));
        let gone = run(&mut cc, &["GPUCACHE.CANCEL", r, "b1"]).unwrap_err();
        assert_eq!(gone.code(), Some("NOBOOKING"), "{what}: {gone}");

        // One booking stays, so each region counts one active booking below.
        let kept = ok(&mut cc, &["GPUCACHE.BOOK", r, "g2", "b2", "bob", "3600"]);
        assert_eq!(kept["result"], "created", "{what}");

        let stats = ok(&mut cc, &["GPUCACHE.STATS", r]);
        assert_eq!(stats["region"], r);
        for (field, expected) in [
            ("gpus_total", "3"),
            ("gpus_available", "1"),
            ("gpus_busy", "1"),
            ("gpus_maintenance", "1"),
            ("gpus_listed", "1"),
            ("bookings_active", "1"),
            ("bookings_created", "2"),
            ("bookings_cancelled", "1"),
        ] {
            assert_eq!(stats[field], expected, "{what}: {field} in {stats:?}");
        }

        let named: i64 = redis::cmd("GPUCACHE.INVALIDATE")
            .arg(r)
            .arg("gpu:g1")
            .arg("stats")
            .query(&mut cc)
            .unwrap();
        assert_eq!(named, 2, "{what}");

        let check = ok(&mut cc, &["GPUCACHE.CHECK", r]);
        assert_eq!(check["ok"], "1", "{what}: {check:?}");
        assert_eq!(check["gpus_checked"], "3", "{what}");
        assert_eq!(check["bookings_checked"], "1", "{what}");
        let repair = ok(&mut cc, &["GPUCACHE.REPAIR", r]);
        assert_eq!(repair["region"], r);
        assert_eq!(
            (repair["fixed"].as_str(), repair["unrecoverable"].as_str()),
            ("0", "0"),
            "{what}: {repair:?}"
        );
    }

    // Each region is where the cluster says, whole: clean on its master, and on its replica.
    for (i, master) in cluster.masters.iter().enumerate() {
        cluster.wait_replicated(i);
        let mut on_master = master.connect();
        let mut on_replica = cluster.replicas[i][0].connect();
        redis::cmd("READONLY").query::<()>(&mut on_replica).unwrap();
        let mine: Vec<&Region> = regions
            .iter()
            .filter(|r| owner_index(cluster, r.slot) == i)
            .collect();
        assert_eq!(mine.len(), REGIONS_PER_MASTER, "master {i}");
        for region in &mine {
            assert_consistent(&mut on_master, &region.name);
            assert_consistent(&mut on_replica, &region.name);
        }
        // A region of another master is redirected, not served from an empty region here.
        let other = regions
            .iter()
            .find(|r| owner_index(cluster, r.slot) != i)
            .unwrap();
        let moved = error(&mut on_master, &["GPUCACHE.GET", &other.name, "g1"]);
        assert!(moved.starts_with("MOVED"), "master {i}: {moved}");

        let all = ok(&mut on_master, &["GPUCACHE.STATS"]);
        assert_eq!(all["regions"], "3", "master {i}: {all:?}");
        assert_eq!(all["gpus_total"], "9", "master {i}: {all:?}");
        assert_eq!(all["bookings_active"], "3", "master {i}: {all:?}");
        assert_eq!(all["bookings_created"], "6", "master {i}: {all:?}");
    }
}

// ---------------------------------------------------------------------------------------------
// 2. A reshard under a steady writer

/// What the reshard writer saw.
#[derive(Default)]
struct WriterLog {
    /// GPU -> the booking it holds, by the writer's acknowledged BOOKs and CANCELs.
    holds: BTreeMap<String, Option<String>>,
    /// Every version the writer saw per GPU, in the order it saw them.
    versions: BTreeMap<String, Vec<(String, i64)>>,
    /// Commands the cluster client gave up on with `ASK` or `TRYAGAIN` (the move outlasted its
    /// retries): retried by the writer, as an application would.
    gave_up: usize,
    /// Anything else that went wrong.
    failures: Vec<String>,
}

/// Moves one region's slot from its master to another by hand — `SETSLOT IMPORTING` and
/// `MIGRATING`, `MIGRATE` of its keys in batches (never `REPLACE`), `SETSLOT NODE` on every
/// master — while a writer books, cancels and prices in that region through a cluster client.
/// The writer is turned away (`ASK`, then `TRYAGAIN`) for as long as the region is split, and
/// nothing it was told succeeded is lost; a booking whose time passes mid-move is ended by the
/// new owner. Returns how many of the writer's bookings it left in the region.
fn reshard_under_a_steady_writer(cluster: &Cluster, regions: &[Region]) -> usize {
    let region = regions[0].clone();
    let from = owner_index(cluster, region.slot);
    let to = (from + 1) % cluster.masters.len();
    let (source, target) = (&cluster.masters[from], &cluster.masters[to]);
    let bystander = &cluster.masters[3 - from - to];
    let gpus: Vec<String> = (0..4).map(|i| format!("w{i}")).collect();
    let mut cc = cluster_client(cluster);
    for gpu in gpus.iter().map(String::as_str).chain(["short"]) {
        ok(
            &mut cc,
            &register_args(&region.name, gpu, "p1", "A100", "3", &[]),
        );
    }

    let stop = Arc::new(AtomicBool::new(false));
    let acknowledged = Arc::new(AtomicUsize::new(0));
    let writer = {
        let mut cc = cluster_client(cluster);
        let (stop, acknowledged) = (stop.clone(), acknowledged.clone());
        let (region, gpus) = (region.name.clone(), gpus.clone());
        std::thread::spawn(move || steady_writer(&mut cc, &region, &gpus, &stop, &acknowledged))
    };
    let progress = |past: usize, what: &str| {
        eventually(what, PATIENCE, || {
            acknowledged.load(Ordering::SeqCst) >= past + 20
        })
    };
    progress(0, "the writer works before the move");

    let mut on_source = source.connect();
    let mut on_target = target.connect();
    let tryagain_before = error_count(&mut on_target, "TRYAGAIN");
    // A booking that ends while the region is split: neither master may end it then (each
    // holds only part of the region); the new owner ends it once the region is its own.
    let short = ok(
        &mut cc,
        &["GPUCACHE.BOOK", &region.name, "short", "s1", "dave", "1"],
    );
    let short_end = number(&short, "end_ms");
    let ended_before = number(
        &ok(&mut cc, &["GPUCACHE.STATS", &region.name]),
        "bookings_ended",
    );
    begin_slot_move(region.slot, source, target);
    let mut batches = 0;
    loop {
        let keys = keys_in_slot(&mut on_source, region.slot, 5);
        if keys.is_empty() {
            break;
        }
        if let Err(e) = migrate(&mut on_source, target, &keys) {
            panic!("MIGRATE of {keys:?} (batch {batches}) failed: {e}");
        }
        batches += 1;
        // With the region split between the two masters, the writer is turned away by the
        // new owner: the point of the test, so each stage of the move waits for it.
        let turned_away = error_count(&mut on_target, "TRYAGAIN");
        eventually(
            &format!("the writer meets the region split after batch {batches}"),
            PATIENCE,
            || error_count(&mut on_target, "TRYAGAIN") > turned_away,
        );
        if batches == 1 {
            // The point of the test, not synchronisation: the short booking's time passes.
            eventually("the short booking's end passes mid-move", PATIENCE, || {
                now_ms() > short_end + 100
            });
        }
    }
    assert!(error_count(&mut on_target, "TRYAGAIN") > tryagain_before);
    assert!(batches > 2, "the region moved in {batches} batches");
    let during = acknowledged.load(Ordering::SeqCst);
    end_slot_move(region.slot, source, target, &[bystander]);
    // The new owner serves the whole region at once, consistent: no record expired meanwhile,
    // so nothing waits for healing (the booking whose time is up waits for the clock, as it
    // may for a moment anywhere: a bounded lag that CHECK does not count).
    assert_consistent(&mut on_target, &region.name);
    assert_eq!(error_count(&mut on_target, "BUSYKEY"), 0);
    assert_eq!(owner_index(cluster, region.slot), to);
    eventually(
        "the new owner ends the booking whose time passed mid-move",
        PATIENCE,
        || {
            let record = ok(&mut on_target, &["GPUCACHE.GET", &region.name, "short"]);
            record["booking_id"] == "(nil)" && record["status"] == "available"
        },
    );
    let stats = ok(&mut on_target, &["GPUCACHE.STATS", &region.name]);
    assert_eq!(
        number(&stats, "bookings_ended"),
        ended_before + 1,
        "{stats:?}"
    );
    progress(during, "the writer works after the move");
    stop.store(true, Ordering::SeqCst);
    let log = writer.join().expect("the writer panicked");

    assert!(log.failures.is_empty(), "writer: {:#?}", log.failures);
    for (gpu, seen) in &log.versions {
        for pair in seen.windows(2) {
            let ((_, earlier), (what, later)) = (&pair[0], &pair[1]);
            let strictly = what != "GET";
            assert!(
                later > earlier || (!strictly && later == earlier),
                "{gpu}: version went from {earlier} to {later} ({what}): {seen:?}"
            );
        }
    }
    // Every acknowledged booking (and cancellation) is what the new owner holds.
    let mut on_target = target.connect();
    for (gpu, holds) in &log.holds {
        let record = ok(&mut on_target, &["GPUCACHE.GET", &region.name, gpu]);
        let expected = holds.as_deref().unwrap_or("(nil)");
        assert_eq!(record["booking_id"], expected, "{gpu}: {record:?}");
        let last = log.versions[gpu].last().map_or(0, |(_, v)| *v);
        assert!(number(&record, "version") >= last, "{gpu}");
    }
    assert_consistent(&mut on_target, &region.name);
    // The old owner holds nothing of the region, and each master counts what it now serves.
    let left = keys_in_slot(&mut on_source, region.slot, 10);
    assert!(left.is_empty(), "{left:?}");
    eventually(
        "STATS without a region follows the move",
        Duration::from_secs(10),
        || {
            ok(&mut on_target, &["GPUCACHE.STATS"])["regions"] == "4"
                && ok(&mut on_source, &["GPUCACHE.STATS"])["regions"] == "2"
        },
    );
    eprintln!(
        "reshard: {} commands acknowledged, {} during the move, {} given up by the cluster client and retried",
        acknowledged.load(Ordering::SeqCst),
        during,
        log.gave_up
    );
    log.holds.values().filter(|h| h.is_some()).count()
}

/// The errors a cluster client returns when a region's move outlasts its retries.
fn moving(e: &redis::RedisError) -> bool {
    matches!(
        e.kind(),
        redis::ErrorKind::TryAgain | redis::ErrorKind::Ask | redis::ErrorKind::Moved
    )
}

/// Books, cancels, prices and reads GPUs of `region` until `stop`, through a cluster client;
/// counts acknowledged commands in `acknowledged`.
fn steady_writer(
    cc: &mut ClusterConnection,
    region: &str,
    gpus: &[String],
    stop: &AtomicBool,
    acknowledged: &AtomicUsize,
) -> WriterLog {
    let mut log = WriterLog::default();
    for gpu in gpus {
        log.holds.insert(gpu.clone(), None);
        log.versions.insert(gpu.clone(), Vec::new());
    }
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut n = 0usize;
    while !stop.load(Ordering::SeqCst) && Instant::now() < deadline {
        n += 1;
        let gpu = &gpus[n % gpus.len()];
        let held = log.holds[gpu].clone();
        let booking = format!("rs{n}");
        let price = format!("2.{}", n % 10);
        let (args, seen): (Vec<&str>, Option<&str>) = match n % 3 {
            0 => (vec!["GPUCACHE.PRICE", region, "A100", &price], None),
            _ => match &held {
                Some(id) => (vec!["GPUCACHE.CANCEL", region, id], Some("gpu_version")),
                None => (
                    vec!["GPUCACHE.BOOK", region, gpu, &booking, "alice", "3600"],
                    Some("gpu_version"),
                ),
            },
        };
        // A command is retried until it is answered: a cluster client gives up on `ASK` and
        // `TRYAGAIN` after its retries, and the move may last longer.
        let reply = loop {
            match run(cc, &args) {
                Err(e) if moving(&e) && Instant::now() < deadline => log.gave_up += 1,
                other => break other,
            }
        };
        match reply {
            Ok(reply) => {
                acknowledged.fetch_add(1, Ordering::SeqCst);
                if let Some(field) = seen {
                    match field_of(&reply, field) {
                        Ok((_, version)) => {
                            let seen = log.versions.entry(gpu.clone()).or_default();
                            seen.push((args[0].to_owned(), version));
                        }
                        Err(e) => log.failures.push(format!("{args:?}: {e}")),
                    }
                    let now_holds = match args[0] {
                        "GPUCACHE.BOOK" => Some(booking.clone()),
                        _ => None,
                    };
                    log.holds.insert(gpu.clone(), now_holds);
                }
            }
            Err(e) => log.failures.push(format!("{args:?}: {e}")),
        }
        match run(cc, &["GPUCACHE.GET", region, gpu]) {
            Ok(record) => match field_of(&record, "version") {
                Ok((record, version)) => {
                    let expected = log.holds[gpu].as_deref().unwrap_or("(nil)");
                    if record.get("booking_id").map(String::as_str) != Some(expected) {
                        log.failures
                            .push(format!("{gpu} holds {record:?}, acknowledged {expected}"));
                    }
                    let seen = log.versions.entry(gpu.clone()).or_default();
                    seen.push(("GET".to_owned(), version));
                }
                Err(e) => log.failures.push(format!("GET {gpu}: {e}")),
            },
            Err(e) if moving(&e) => log.gave_up += 1,
            Err(e) => log.failures.push(format!("GET {gpu}: {e}")),
        }
    }
    log
}

// ---------------------------------------------------------------------------------------------
// 3. Failovers with bookings in flight

/// A minimal cluster router for writers that must `WAIT` on the connection that made the write
/// (a cluster client routes `WAIT` to every master): slot owners from `CLUSTER SLOTS` of any
/// node that answers, one connection per node, `MOVED` followed.
struct Router {
    ports: Vec<u16>,
    owners: HashMap<u16, u16>,
    connections: HashMap<u16, Connection>,
}

impl Router {
    fn new(ports: Vec<u16>) -> Router {
        Router {
            ports,
            owners: HashMap::new(),
            connections: HashMap::new(),
        }
    }

    fn connection(&mut self, port: u16) -> RedisResult<&mut Connection> {
        match self.connections.entry(port) {
            std::collections::hash_map::Entry::Occupied(known) => Ok(known.into_mut()),
            std::collections::hash_map::Entry::Vacant(new) => {
                let client = redis::Client::open(format!("redis://127.0.0.1:{port}/"))?;
                let con = client.get_connection_with_timeout(Duration::from_secs(2))?;
                con.set_read_timeout(Some(Duration::from_secs(5)))?;
                Ok(new.insert(con))
            }
        }
    }

    /// Forgets what it knows: the next command asks the cluster again.
    fn reset(&mut self, port: u16) {
        self.connections.remove(&port);
        self.owners.clear();
    }

    fn owner(&mut self, slot: u16) -> Option<u16> {
        if let Some(port) = self.owners.get(&slot) {
            return Some(*port);
        }
        for port in self.ports.clone() {
            let Ok(con) = self.connection(port) else {
                continue;
            };
            if let Some(owner) = slot_owner_port(con, slot) {
                self.owners.insert(slot, owner);
                return Some(owner);
            }
            self.connections.remove(&port);
        }
        None
    }
}

#[derive(Clone, Copy, PartialEq, Debug)]
enum Attempt {
    /// Refused before it ran (`MOVED`, `CLUSTERDOWN`, `TRYAGAIN`, no connection).
    NotRun,
    /// May have run (answered, or the connection broke after sending it).
    MaybeRan,
}

/// One GPU a failover writer books and cancels in turn; every step is confirmed (`WAIT 1`)
/// before the next.
#[derive(Debug)]
struct Lane {
    region: String,
    slot: u16,
    gpu: String,
    /// How long its bookings last.
    duration_s: &'static str,
    /// The booking it holds, confirmed.
    holds: Option<String>,
    /// Bookings made and confirmed.
    booked: usize,
    /// The GPU's version in the last confirmed reply.
    version: i64,
    /// Tries that did not end in an acknowledged step (redirected, refused, lost, not
    /// acknowledged by a replica in time), and of those the ones that may have run.
    retries: usize,
    uncertain: usize,
}

/// Books and cancels each lane's GPU in turn until `stop`, each `BOOK` and `CANCEL` followed by
/// `WAIT 1 1000` on the same connection and retried (same booking id: `BOOK` is idempotent)
/// until a replica acknowledged it. Only that makes it "acknowledged" here: plain replication
/// is asynchronous, and a write a master answered but had not yet sent to its replica dies with
/// it on `kill -9` (README "Acknowledged means durable"). Returns the lanes and what went wrong.
fn failover_writer(
    mut router: Router,
    mut lanes: Vec<Lane>,
    stop: &AtomicBool,
    confirmed: &[AtomicUsize],
    lane_ids: &[usize],
) -> (Vec<Lane>, Vec<String>) {
    let mut failures = Vec::new();
    let mut n = 0usize;
    'work: while !stop.load(Ordering::SeqCst) {
        for (lane, &id) in lanes.iter_mut().zip(lane_ids) {
            n += 1;
            match settle(&mut router, lane, n) {
                Ok(()) => {
                    confirmed[id].fetch_add(1, Ordering::SeqCst);
                }
                Err(failure) => {
                    failures.push(failure);
                    break 'work;
                }
            }
            if stop.load(Ordering::SeqCst) {
                break 'work;
            }
        }
    }
    (lanes, failures)
}

/// Takes one lane one step (book if free, cancel if booked) and retries until a replica
/// acknowledged it. Err: something a correct cluster never answers.
fn settle(router: &mut Router, lane: &mut Lane, n: usize) -> Result<(), String> {
    let (region, gpu, held) = (lane.region.clone(), lane.gpu.clone(), lane.holds.clone());
    let booking = format!("{gpu}-{n}");
    let args: Vec<&str> = match &held {
        Some(id) => vec!["GPUCACHE.CANCEL", &region, id],
        None => vec![
            "GPUCACHE.BOOK",
            &region,
            &gpu,
            &booking,
            "carol",
            lane.duration_s,
        ],
    };
    let cancelling = held.is_some();
    let mut attempt = Attempt::NotRun;
    let deadline = Instant::now() + PATIENCE;
    let what =
        |attempt: Attempt, e: &dyn std::fmt::Display| format!("{args:?} ({attempt:?} before): {e}");
    let mut tries = 0;
    loop {
        if Instant::now() > deadline {
            return Err(what(attempt, &"never acknowledged by a replica"));
        }
        if tries > 0 {
            lane.retries += 1;
            if attempt == Attempt::MaybeRan {
                lane.uncertain += 1;
            }
        }
        tries += 1;
        let Some(port) = router.owner(lane.slot) else {
            std::thread::sleep(Duration::from_millis(50));
            continue;
        };
        let con = match router.connection(port) {
            Ok(con) => con,
            Err(_) => {
                router.reset(port);
                std::thread::sleep(Duration::from_millis(50));
                continue;
            }
        };
        let version = match run(con, &args) {
            Ok(reply) => {
                let before = attempt;
                attempt = Attempt::MaybeRan;
                let (reply, version) =
                    field_of(&reply, "gpu_version").map_err(|e| what(before, &e))?;
                let fresh = cancelling || reply["result"] == "created";
                if !fresh && reply["result"] != "existing" {
                    return Err(what(before, &format!("{reply:?}")));
                }
                // A retry may meet its own first attempt (`existing`); a first attempt never.
                if !fresh && before == Attempt::NotRun {
                    return Err(what(before, &"an unused booking id exists"));
                }
                let went_back = if fresh {
                    version <= lane.version
                } else {
                    version < lane.version
                };
                if went_back {
                    return Err(what(
                        before,
                        &format!("version {version} after confirmed {}", lane.version),
                    ));
                }
                Some(version)
            }
            // The cancellation ran before (its reply was lost, or its WAIT was not acknowledged):
            // the booking is gone either way, and the WAIT below confirms that.
            Err(e) if e.code() == Some("NOBOOKING") && attempt == Attempt::MaybeRan => None,
            Err(e) => match e.code() {
                Some("MOVED") => {
                    let moved_to = e
                        .redirect_node()
                        .and_then(|(addr, _)| addr.rsplit(':').next()?.parse().ok());
                    match moved_to {
                        Some(to) => {
                            router.owners.insert(lane.slot, to);
                        }
                        None => router.reset(port),
                    }
                    continue;
                }
                Some("CLUSTERDOWN" | "TRYAGAIN" | "MASTERDOWN" | "LOADING") => {
                    router.reset(port);
                    std::thread::sleep(Duration::from_millis(50));
                    continue;
                }
                _ if e.is_io_error() || e.is_connection_dropped() || e.is_timeout() => {
                    attempt = Attempt::MaybeRan;
                    router.reset(port);
                    std::thread::sleep(Duration::from_millis(50));
                    continue;
                }
                // NOBOOKING on a first attempt: a confirmed booking is gone. GPUBUSY: a
                // confirmed cancellation is.
                _ => return Err(what(attempt, &e)),
            },
        };
        let acks: RedisResult<i64> = redis::cmd("WAIT").arg(1).arg(1000).query(con);
        match acks {
            Ok(acks) if acks >= 1 => {
                if let Some(version) = version {
                    lane.version = version;
                }
                if cancelling {
                    lane.holds = None;
                } else {
                    lane.holds = Some(booking);
                    lane.booked += 1;
                }
                return Ok(());
            }
            // No replica acknowledged it in time (this master has none right now), or the node
            // is a replica now: the same command again, wherever the slot is served.
            _ => router.reset(port),
        }
    }
}

/// Writers book and cancel (each step acknowledged by a replica: `WAIT 1`) on every region
/// while (a) a replica takes over from its master by `CLUSTER FAILOVER`, and (b) a master is
/// killed with SIGKILL and the cluster promotes its replica by itself. No acknowledged booking
/// is lost, no version goes backwards, every region is clean on its master and its replica, a
/// long booking made before both failovers is still there after them, and a short one whose end
/// passed during the second is ended by whichever master serves its region. `left_booked`:
/// bookings the reshard check left in the first region.
fn failover_with_bookings_in_flight(cluster: &mut Cluster, regions: &[Region], left_booked: usize) {
    let ports: Vec<u16> = cluster.nodes().map(|n| n.server.port).collect();
    // A booking per region acknowledged by a replica before anything fails.
    let mut router = Router::new(ports.clone());
    let mut anchors: Vec<Lane> = Vec::new();
    let mut shorts: Vec<Lane> = Vec::new();
    let mut lanes: Vec<Lane> = Vec::new();
    {
        let mut cc = cluster_client(cluster);
        for region in regions {
            for gpu in ["f0", "f1", "anchor", "short"] {
                ok(
                    &mut cc,
                    &register_args(&region.name, gpu, "p3", "L4", "0.5", &[]),
                );
            }
            for gpu in ["f0", "f1", "anchor", "short"] {
                let lane = Lane {
                    region: region.name.clone(),
                    slot: region.slot,
                    gpu: gpu.to_owned(),
                    duration_s: if gpu == "short" { "3" } else { "3600" },
                    holds: None,
                    booked: 0,
                    version: 0,
                    retries: 0,
                    uncertain: 0,
                };
                match gpu {
                    "anchor" => anchors.push(lane),
                    "short" => shorts.push(lane),
                    _ => lanes.push(lane),
                }
            }
        }
    }
    for anchor in &mut anchors {
        settle(&mut router, anchor, 0).unwrap_or_else(|e| panic!("anchor booking: {e}"));
        assert!(anchor.holds.is_some());
    }

    // Three writers, each with a lane on every third region; progress is counted per region.
    let region_of = |lane: &Lane| regions.iter().position(|r| r.name == lane.region).unwrap();
    let confirmed: Arc<Vec<AtomicUsize>> =
        Arc::new(regions.iter().map(|_| AtomicUsize::new(0)).collect());
    let stop = Arc::new(AtomicBool::new(false));
    let mut shares: Vec<Vec<Lane>> = (0..3).map(|_| Vec::new()).collect();
    for (i, lane) in lanes.into_iter().enumerate() {
        shares[i % 3].push(lane);
    }
    let writers: Vec<_> = shares
        .into_iter()
        .map(|share| {
            let ids: Vec<usize> = share.iter().map(region_of).collect();
            let (stop, confirmed) = (stop.clone(), confirmed.clone());
            let router = Router::new(ports.clone());
            std::thread::spawn(move || failover_writer(router, share, &stop, &confirmed, &ids))
        })
        .collect();
    let progress_everywhere = |what: &str| {
        let before: Vec<usize> = confirmed.iter().map(|c| c.load(Ordering::SeqCst)).collect();
        eventually(what, PATIENCE, || {
            confirmed
                .iter()
                .zip(&before)
                .all(|(c, b)| c.load(Ordering::SeqCst) >= b + 4)
        });
    };
    progress_everywhere("every region takes bookings before any failover");

    // (a) A manual failover: the replica of master 0 takes over, the master steps down.
    let mut promoted = cluster.replicas[0][0].connect();
    redis::cmd("CLUSTER")
        .arg("FAILOVER")
        .query::<()>(&mut promoted)
        .expect("CLUSTER FAILOVER");
    eventually(
        "the replica took over by CLUSTER FAILOVER",
        PATIENCE,
        || cluster.replicas[0][0].replication_info("role").as_deref() == Some("master"),
    );
    let (left, right) = (&mut cluster.masters[0], &mut cluster.replicas[0][0]);
    std::mem::swap(left, right);
    cluster.wait_converged();
    progress_everywhere("every region takes bookings after CLUSTER FAILOVER");

    // (b) kill -9 of a master: the cluster notices (cluster-node-timeout) and promotes its
    // replica. Until the killed node is back as the new master's replica, nothing written there
    // is acknowledged by a replica. Just before, each region gets a 3-second booking: it ends
    // while the cluster fails over (the killed master's on its heir, which ended no booking
    // while it was a replica), or while the cluster is down and refuses the booking clock's
    // writes, which are retried.
    for short in &mut shorts {
        settle(&mut router, short, 0).unwrap_or_else(|e| panic!("short booking: {e}"));
        assert!(short.holds.is_some());
    }
    let victim = cluster.masters.remove(1);
    let ClusterNode {
        server,
        bus_port,
        id,
    } = victim;
    let port = server.port;
    let dir = server.stop(); // SIGKILL
    eventually("the killed master's replica took over", PATIENCE, || {
        cluster.replicas[1][0].replication_info("role").as_deref() == Some("master")
    });
    let heir = cluster.replicas[1].remove(0);
    cluster.masters.insert(1, heir);
    let bus = bus_port.to_string();
    let restarted = Server::start_in(dir, port, &[], &cluster_args(&bus));
    cluster.replicas[1].push(ClusterNode {
        server: restarted,
        bus_port,
        id,
    });
    cluster.wait_converged();
    progress_everywhere("every region takes bookings after kill -9 of a master");

    stop.store(true, Ordering::SeqCst);
    let mut failures = Vec::new();
    let mut lanes = Vec::new();
    for writer in writers {
        let (done, failed) = writer.join().expect("a writer panicked");
        lanes.extend(done);
        failures.extend(failed);
    }
    assert!(failures.is_empty(), "writers: {failures:#?}");

    // The short bookings ended, wherever their region is now served.
    for short in &shorts {
        let owner = owner_index(cluster, short.slot);
        let mut con = cluster.masters[owner].connect();
        eventually(
            &format!("{} {}'s booking ended", short.region, short.gpu),
            PATIENCE,
            || {
                let record = ok(&mut con, &["GPUCACHE.GET", &short.region, &short.gpu]);
                record["booking_id"] == "(nil)" && record["status"] == "available"
            },
        );
        let stats = ok(&mut con, &["GPUCACHE.STATS", &short.region]);
        assert_ne!(stats["bookings_ended"], "0", "{}: {stats:?}", short.region);
    }

    // Every acknowledged booking and cancellation is what the masters now hold; versions only
    // went forward; every region is clean on its master.
    for lane in lanes.iter().chain(&anchors) {
        let owner = owner_index(cluster, lane.slot);
        let mut con = cluster.masters[owner].connect();
        let record = ok(&mut con, &["GPUCACHE.GET", &lane.region, &lane.gpu]);
        let expected = lane.holds.as_deref().unwrap_or("(nil)");
        assert_eq!(
            record["booking_id"], expected,
            "{} {}: {record:?}",
            lane.region, lane.gpu
        );
        assert!(number(&record, "version") >= lane.version, "{lane:?}");
    }
    assert!(
        lanes.iter().all(|l| l.booked > 0),
        "every lane booked: {lanes:?}"
    );
    for region in regions {
        let owner = owner_index(cluster, region.slot);
        let mut con = cluster.masters[owner].connect();
        assert_consistent(&mut con, &region.name);
        let stats = ok(&mut con, &["GPUCACHE.STATS", &region.name]);
        let holding = lanes
            .iter()
            .chain(&anchors)
            .filter(|l| l.region == region.name && l.holds.is_some())
            .count();
        // The first check's booking b2 on g2 (and the reshard writer's in the first region),
        // plus the writers' and the anchor's.
        let earlier = 1 + if region.name == regions[0].name {
            left_booked
        } else {
            0
        };
        assert_eq!(
            stats["bookings_active"],
            (holding + earlier).to_string(),
            "{}: {stats:?}",
            region.name
        );
    }
    // Each master counts the regions it now serves; each replica, the stepped-down master and
    // the killed one (which restarted empty) included, holds its master's regions whole.
    for (i, master) in cluster.masters.iter().enumerate() {
        let mine: Vec<&Region> = regions
            .iter()
            .filter(|r| owner_index(cluster, r.slot) == i)
            .collect();
        let all = ok(&mut master.connect(), &["GPUCACHE.STATS"]);
        assert_eq!(
            all["regions"],
            mine.len().to_string(),
            "master {i}: {all:?}"
        );
        cluster.wait_replicated(i);
        let mut on_replica = cluster.replicas[i][0].connect();
        redis::cmd("READONLY").query::<()>(&mut on_replica).unwrap();
        for region in mine {
            assert_consistent(&mut on_replica, &region.name);
        }
    }
    let retries: usize = lanes.iter().map(|l| l.retries).sum();
    assert!(
        retries > 0,
        "the writers were in flight through the failovers"
    );
    eprintln!(
        "failover: {} bookings acknowledged; {retries} tries not acknowledged and redone, {} of them possibly run",
        lanes.iter().map(|l| l.booked).sum::<usize>(),
        lanes.iter().map(|l| l.uncertain).sum::<usize>(),
    );
}
