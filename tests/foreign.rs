//! Other clients' keys under the `gpucache:` prefix. Any client may write any name there: names
//! gpucache would never create (a region part `core::input::region` refuses, an id part
//! `core::input::id` refuses) must be ignored by every event handler (expired/evicted keys ->
//! healing; hash writes and RDB loads of `stats:market` -> the known-regions registry), by the
//! sweep after a load or a promotion, by the booking clock and by the logger, and must never
//! panic: a panic aborts redis-server.
//!
//! Also: the registry of known regions forgets what is thrown away (DEL, FLUSHALL, FLUSHDB,
//! SWAPDB moves it), and nothing the module answers leaks memory.

mod common;

use common::*;
use redis::Connection;
use std::time::Duration;

/// Families whose keys end in an id (`gpucache:{R}:gpu:<id>`); the others are fixed names.
fn has_id(family: &str) -> bool {
    !family.contains(':') && family != "events"
}

/// Byte strings neither a region nor an id may be.
fn hostile_parts() -> Vec<Vec<u8>> {
    vec![
        b"a\x00b".to_vec(),
        b"\r\n\x01".to_vec(),
        b"\xff\xfe".to_vec(),
        b"%s%n%p".to_vec(),
        b"%s%n%p%x%x%x%x%x%x%x%x%s%s\x00\xff".to_vec(),
        b"x}:gpu:y".to_vec(),
        b"{".to_vec(),
        b"".to_vec(),
        b"\x00".to_vec(),
        vec![b'i'; 129],
        // One megabyte of letters: every byte is allowed, only the length is not.
        vec![b'a'; 1 << 20],
    ]
}

/// Byte strings a region may not be but an id may (`:` and 65..=128 bytes are fine in an id).
fn hostile_region_only() -> Vec<Vec<u8>> {
    vec![b"a:b".to_vec(), vec![b'r'; 65]]
}

#[derive(Clone, Copy, Debug)]
enum Kind {
    Hash,
    Set,
    Zset,
    Text,
    Stream,
}

const KINDS: [Kind; 5] = [Kind::Hash, Kind::Set, Kind::Zset, Kind::Text, Kind::Stream];

struct Foreign {
    name: Vec<u8>,
    kind: Kind,
    /// A short hostile piece to put inside the value (members, fields).
    inner: Vec<u8>,
}

fn concat(parts: &[&[u8]]) -> Vec<u8> {
    parts.concat()
}

/// Keys of every family with hostile bytes in the region part (`gpucache:{<bad>}:...`) and in
/// the id part of `real_region` (`gpucache:{eu}:gpu:<bad>`), holding values of every type. A
/// `stats:market` with a hostile region is always a hash: a hash write is what registers a
/// region.
fn foreign_keys(real_region: &str) -> Vec<Foreign> {
    let mut keys = Vec::new();
    let short = |bad: &[u8]| -> Vec<u8> {
        if bad.len() <= 256 {
            bad.to_vec()
        } else {
            b"%s%n\x00\xff".to_vec()
        }
    };
    let region_bads: Vec<Vec<u8>> = hostile_parts()
        .into_iter()
        .chain(hostile_region_only())
        .collect();
    for (f, family) in KEY_FAMILIES.iter().enumerate() {
        let tail: Vec<u8> = if has_id(family) {
            concat(&[family.as_bytes(), b":g1"])
        } else {
            family.as_bytes().to_vec()
        };
        for (b, bad) in region_bads.iter().enumerate() {
            let kind = if *family == "stats:market" {
                Kind::Hash
            } else {
                KINDS[(f + b) % KINDS.len()]
            };
            keys.push(Foreign {
                name: concat(&[b"gpucache:{", bad, b"}:", &tail]),
                kind,
                inner: short(bad),
            });
        }
        for (b, bad) in hostile_parts().iter().enumerate() {
            keys.push(Foreign {
                name: concat(&[
                    b"gpucache:{",
                    real_region.as_bytes(),
                    b"}:",
                    family.as_bytes(),
                    b":",
                    bad,
                ]),
                kind: KINDS[(f + b + 1) % KINDS.len()],
                inner: short(bad),
            });
        }
    }
    keys
}

/// Writes the foreign keys (pipelined, a few per round trip: some names are a megabyte).
fn write_foreign(con: &mut Connection, keys: &[Foreign]) {
    for chunk in keys.chunks(16) {
        let mut pipe = redis::pipe();
        for key in chunk {
            let name = key.name.as_slice();
            let inner = key.inner.as_slice();
            match key.kind {
                Kind::Hash => pipe
                    .cmd("HSET")
                    .arg(name)
                    .arg("status")
                    .arg("available")
                    .arg("type")
                    .arg(inner)
                    .arg("provider")
                    .arg(inner)
                    .arg("booking_id")
                    .arg(inner)
                    .arg(inner)
                    .arg("%s%n")
                    .ignore(),
                Kind::Set => pipe.cmd("SADD").arg(name).arg(inner).arg("g1").ignore(),
                Kind::Zset => pipe
                    .cmd("ZADD")
                    .arg(name)
                    .arg(1)
                    .arg(inner)
                    .arg(0)
                    .arg("g1")
                    .ignore(),
                Kind::Text => pipe.cmd("SET").arg(name).arg(inner).ignore(),
                Kind::Stream => pipe
                    .cmd("XADD")
                    .arg(name)
                    .arg("*")
                    .arg("status")
                    .arg(inner)
                    .ignore(),
            };
        }
        pipe.query::<()>(con).expect("write foreign keys");
    }
}

/// Sets every key's TTL with `command` (`PEXPIRE`/`EXPIRE`) and checks each key was there.
fn expire(con: &mut Connection, keys: &[Foreign], command: &str, amount: i64) {
    for chunk in keys.chunks(16) {
        let mut pipe = redis::pipe();
        for key in chunk {
            pipe.cmd(command).arg(key.name.as_slice()).arg(amount);
        }
        let set: Vec<i64> = pipe.query(con).expect("expire foreign keys");
        assert!(
            set.iter().all(|&s| s == 1),
            "{command}: a foreign key was missing"
        );
    }
}

/// How many of the keys exist (reading them makes expired ones go, as Redis always does).
fn existing(con: &mut Connection, keys: &[Foreign]) -> usize {
    let mut total = 0;
    for chunk in keys.chunks(16) {
        let mut pipe = redis::pipe();
        for key in chunk {
            pipe.cmd("EXISTS").arg(key.name.as_slice());
        }
        let found: Vec<i64> = pipe.query(con).expect("EXISTS");
        total += found.iter().filter(|&&n| n == 1).count();
    }
    total
}

fn dbsize(con: &mut Connection) -> i64 {
    redis::cmd("DBSIZE").query(con).expect("DBSIZE")
}

/// Waits until the foreign keys expired on their own (active expiry: `DBSIZE` does not touch
/// them), then checks none is left.
fn wait_gone(con: &mut Connection, keys: &[Foreign], dbsize_without: i64) {
    eventually("the foreign keys expired", Duration::from_secs(20), || {
        dbsize(con) == dbsize_without
    });
    assert_eq!(existing(con, keys), 0, "foreign keys left after expiry");
}

/// Known regions, as `INFO gpucache` reports them.
fn regions(con: &mut Connection) -> i64 {
    info_field(con, "gpucache_regions")
}

fn used_memory(con: &mut Connection) -> i64 {
    info_field(con, "used_memory")
}

/// Polls until `used_memory` is within 1 MB of `before`, failing with the figures.
fn memory_back(con: &mut Connection, before: i64) {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let used = used_memory(con);
        if used <= before + 1024 * 1024 {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "used_memory {used} stayed {} bytes above {before}",
            used - before
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Log file name (relative: it lands in the server's --dir).
const LOG: &str = "redis.log";

fn log_of(server: &Server) -> String {
    String::from_utf8_lossy(&std::fs::read(server.dir.join(LOG)).unwrap_or_default()).into_owned()
}

/// The server answers, is still the process it was (a crash would end it; the harness never
/// restarts one), and its log shows no crash or panic.
fn assert_alive(server: &Server, pid: i64, phase: &str) {
    let log = log_of(server);
    // The last lines, each cut short: some name a megabyte-long key.
    let lines: Vec<String> = log
        .lines()
        .rev()
        .take(30)
        .map(|l| l.chars().take(240).collect())
        .collect();
    let tail = lines.into_iter().rev().collect::<Vec<_>>().join("\n");
    let mut con = redis::Client::open(server.url())
        .and_then(|c| c.get_connection())
        .unwrap_or_else(|e| panic!("{phase}: the server is gone ({e}); log:\n{tail}"));
    let pong: String = redis::cmd("PING")
        .query(&mut con)
        .unwrap_or_else(|e| panic!("{phase}: PING failed ({e}); log:\n{tail}"));
    assert_eq!(pong, "PONG", "{phase}");
    assert_eq!(
        info_field(&mut con, "process_id"),
        pid,
        "{phase}: another process answers"
    );
    for marker in [
        "crashed by signal",
        "BUG REPORT",
        "ASSERTION FAILED",
        "Guru Meditation",
        "panic",
    ] {
        assert!(
            !log.contains(marker),
            "{phase}: the log says {marker:?}:\n{tail}"
        );
    }
}

/// Region `eu`: four GPUs, a type price and one booking (g2, b1).
fn seed_real(con: &mut Connection) {
    seed(con);
    run(con, &["GPUCACHE.PRICE", "eu", "H100", "5"]).expect("PRICE");
    run(con, &["GPUCACHE.BOOK", "eu", "g2", "b1", "alice", "3600"]).expect("BOOK");
}

/// The real GPUs and the booking read back as seeded.
fn assert_real_intact(con: &mut Connection) {
    for gpu in ["g1", "g3", "g4"] {
        let record = fields(con, &["GPUCACHE.GET", "eu", gpu]);
        assert_eq!(record["status"], "available", "{gpu}");
    }
    let g2 = fields(con, &["GPUCACHE.GET", "eu", "g2"]);
    assert_eq!(
        (g2["status"].as_str(), g2["booking_id"].as_str()),
        ("busy", "b1")
    );
    let stats = fields(con, &["GPUCACHE.STATS", "eu"]);
    assert_eq!(
        (
            stats["gpus_total"].as_str(),
            stats["bookings_active"].as_str()
        ),
        ("4", "1")
    );
}

fn with_log<'a>(extra: &[&'a str]) -> Vec<&'a str> {
    let mut args = vec!["--logfile", LOG];
    args.extend_from_slice(extra);
    args
}

#[test]
fn foreign_names_under_the_prefix_never_crash_the_server() {
    let server = Server::start(&[], &with_log(&[]));
    let mut con = server.connect();
    let pid = info_field(&mut con, "process_id");
    seed_real(&mut con);
    let before = snapshot(&mut con);
    let size_before = dbsize(&mut con);

    let foreign = foreign_keys("eu");
    write_foreign(&mut con, &foreign);
    assert_alive(&server, pid, "writing foreign keys");
    assert_eq!(existing(&mut con, &foreign), foreign.len());
    assert_eq!(
        regions(&mut con),
        1,
        "hashes at gpucache:{{<not a region>}}:stats:market register no region"
    );
    assert_consistent(&mut con, "eu");

    expire(&mut con, &foreign, "PEXPIRE", 5);
    wait_gone(&mut con, &foreign, size_before);
    assert_alive(&server, pid, "the foreign keys expired");
    eventually_consistent(&mut con, "eu");
    assert_real_intact(&mut con);
    assert_eq!(regions(&mut con), 1);
    // Healing touched nothing of the real region for them.
    assert_same_state(
        &snapshot(&mut con),
        &before,
        "after the foreign keys expired",
    );
    assert_alive(&server, pid, "the end");
}

#[test]
fn foreign_names_survive_save_restart_and_debug_reload() {
    let args = with_log(&["--enable-debug-command", "yes"]);
    let server = Server::start(&[], &args);
    let mut con = server.connect();
    let pid = info_field(&mut con, "process_id");
    seed_real(&mut con);
    let before = snapshot(&mut con);
    let size_before = dbsize(&mut con);
    let foreign = foreign_keys("eu");
    write_foreign(&mut con, &foreign);
    assert_alive(&server, pid, "writing foreign keys");
    redis::cmd("SAVE").query::<()>(&mut con).expect("SAVE");
    drop(con);

    // The RDB load announces every foreign key (`loaded`), then the sweep visits the regions.
    let dir = server.stop();
    let server = Server::start_in(dir, free_port(), &[], &args);
    let mut con = server.connect();
    let pid = info_field(&mut con, "process_id");
    assert_alive(&server, pid, "restart from RDB");
    eventually_consistent(&mut con, "eu");
    assert_eq!(existing(&mut con, &foreign), foreign.len(), "all loaded");
    assert_eq!(regions(&mut con), 1, "only eu is a region after loading");
    assert_real_intact(&mut con);
    assert_alive(&server, pid, "after the sweep");

    redis::cmd("DEBUG")
        .arg("RELOAD")
        .query::<()>(&mut con)
        .expect("DEBUG RELOAD");
    assert_alive(&server, pid, "DEBUG RELOAD");
    eventually_consistent(&mut con, "eu");
    assert_eq!(existing(&mut con, &foreign), foreign.len(), "all reloaded");
    assert_eq!(regions(&mut con), 1, "only eu is a region after reloading");
    assert_real_intact(&mut con);

    expire(&mut con, &foreign, "PEXPIRE", 5);
    wait_gone(&mut con, &foreign, size_before);
    assert_alive(&server, pid, "the foreign keys expired");
    eventually_consistent(&mut con, "eu");
    assert_same_state(
        &snapshot(&mut con),
        &before,
        "after restart, reload and expiry",
    );
}

#[test]
fn foreign_names_under_eviction() {
    let server = Server::start(
        &[],
        &with_log(&[
            "--maxmemory-policy",
            "volatile-lru",
            "--maxmemory-samples",
            "10",
        ]),
    );
    let mut con = server.connect();
    let pid = info_field(&mut con, "process_id");
    seed_real(&mut con);
    let foreign = foreign_keys("eu");
    write_foreign(&mut con, &foreign);
    expire(&mut con, &foreign, "EXPIRE", 1000);
    assert_alive(&server, pid, "writing foreign keys");

    let evicted_before = info_field(&mut con, "evicted_keys");
    let used = used_memory(&mut con);
    redis::cmd("CONFIG")
        .arg("SET")
        .arg("maxmemory")
        .arg((used + 4 * 1024 * 1024).to_string())
        .query::<()>(&mut con)
        .expect("CONFIG SET maxmemory");
    // 30 MB of volatile fillers into 4 MB of room: most older volatile keys (the foreign ones
    // first, they are the least recently used) are evicted.
    let filler = vec![b'f'; 10 * 1024];
    for batch in 0..30 {
        let mut pipe = redis::pipe();
        for i in 0..100 {
            pipe.cmd("SET")
                .arg(format!("filler:{batch}:{i}"))
                .arg(filler.as_slice())
                .arg("EX")
                .arg(1000)
                .ignore();
        }
        // A write may be refused (OOM) while eviction cannot keep up; that is Redis's answer.
        let _: redis::RedisResult<()> = pipe.query(&mut con);
        assert_alive(&server, pid, "filling past maxmemory");
    }
    let evicted = info_field(&mut con, "evicted_keys") - evicted_before;
    assert!(evicted > 0, "the fillers must evict something");
    redis::cmd("CONFIG")
        .arg("SET")
        .arg("maxmemory")
        .arg("0")
        .query::<()>(&mut con)
        .expect("CONFIG SET maxmemory 0");
    let left = existing(&mut con, &foreign);
    assert!(
        left < foreign.len(),
        "some foreign keys must have been evicted ({evicted} keys evicted, all {left} foreign left)"
    );
    assert_alive(&server, pid, "after eviction");
    eventually_consistent(&mut con, "eu");
    // Evicted GPU records are healed away or rebuilt; the booking is market state (no TTL).
    assert_eq!(
        fields(&mut con, &["GPUCACHE.STATS", "eu"])["bookings_active"],
        "1"
    );
    assert_eq!(regions(&mut con), 1);
    assert_alive(&server, pid, "the end");
}

fn digest(con: &mut Connection) -> String {
    redis::cmd("DEBUG")
        .arg("DIGEST")
        .query(con)
        .expect("DEBUG DIGEST")
}

fn wait_for_replica(primary: &mut Connection) {
    let acked: i64 = redis::cmd("WAIT")
        .arg(1)
        .arg(5000)
        .query(primary)
        .expect("WAIT");
    assert_eq!(acked, 1, "replica acknowledged the writes");
}

#[test]
fn foreign_names_through_replica_sync_and_failover() {
    let args = with_log(&["--enable-debug-command", "yes"]);
    let primary = Server::start(&[], &args);
    let mut pcon = primary.connect();
    let ppid = info_field(&mut pcon, "process_id");
    seed_real(&mut pcon);
    let size_before = dbsize(&mut pcon);
    // Half reach the replica in the full sync (RDB: `loaded`), half through the stream.
    // Every other key, so each half holds every family.
    let (mut in_sync, mut streamed) = (Vec::new(), Vec::new());
    for (i, key) in foreign_keys("eu").into_iter().enumerate() {
        if i % 2 == 0 {
            in_sync.push(key);
        } else {
            streamed.push(key);
        }
    }
    write_foreign(&mut pcon, &in_sync);

    let port = primary.port.to_string();
    let mut replica_args = args.clone();
    replica_args.extend_from_slice(&["--replicaof", "127.0.0.1", &port]);
    let replica = Server::start(&[], &replica_args);
    let mut rcon = replica.connect();
    let rpid = info_field(&mut rcon, "process_id");
    eventually("replica link up", Duration::from_secs(20), || {
        let info: String = redis::cmd("INFO")
            .arg("replication")
            .query(&mut rcon)
            .expect("INFO replication");
        info.contains("master_link_status:up")
    });
    write_foreign(&mut pcon, &streamed);
    wait_for_replica(&mut pcon);
    assert_alive(&primary, ppid, "primary after sync");
    assert_alive(&replica, rpid, "replica after sync");
    assert_eq!(digest(&mut rcon), digest(&mut pcon), "same data after sync");
    assert_eq!(existing(&mut rcon, &in_sync), in_sync.len());
    assert_eq!(existing(&mut rcon, &streamed), streamed.len());
    assert_eq!(regions(&mut rcon), 1, "the replica knows only eu");

    // The primary expires the streamed half; the replica receives the deletions.
    expire(&mut pcon, &streamed, "PEXPIRE", 5);
    let size_with_sync_half = size_before + i64::try_from(in_sync.len()).unwrap();
    wait_gone(&mut pcon, &streamed, size_with_sync_half);
    wait_for_replica(&mut pcon);
    assert_alive(&primary, ppid, "primary after expiry");
    assert_alive(&replica, rpid, "replica after expiry");
    assert_eq!(
        digest(&mut rcon),
        digest(&mut pcon),
        "same data after expiry"
    );
    eventually_consistent(&mut pcon, "eu");

    // Promotion: the replica sweeps its regions and takes over healing and the booking clock.
    redis::cmd("REPLICAOF")
        .arg("NO")
        .arg("ONE")
        .query::<()>(&mut rcon)
        .expect("REPLICAOF NO ONE");
    assert_alive(&replica, rpid, "promotion");
    assert_alive(&primary, ppid, "old primary after the promotion");
    eventually_consistent(&mut rcon, "eu");
    assert_real_intact(&mut rcon);
    assert_eq!(regions(&mut rcon), 1);

    // The promoted server expires the rest itself.
    expire(&mut rcon, &in_sync, "PEXPIRE", 5);
    wait_gone(&mut rcon, &in_sync, size_before);
    assert_alive(&replica, rpid, "expiry on the promoted server");
    eventually_consistent(&mut rcon, "eu");
    assert_real_intact(&mut rcon);
}

fn db1(server: &Server) -> Connection {
    redis::Client::open(format!("{}1", server.url()))
        .and_then(|c| c.get_connection())
        .expect("connect to db 1")
}

/// `HSET gpucache:{<prefix><i>}:stats:market x 1` for `count` regions, 1,000 per round trip.
fn write_counters(con: &mut Connection, prefix: &str, count: usize) {
    let names: Vec<usize> = (0..count).collect();
    for chunk in names.chunks(1000) {
        let mut pipe = redis::pipe();
        for i in chunk {
            pipe.cmd("HSET")
                .arg(format!("gpucache:{{{prefix}{i}}}:stats:market"))
                .arg("x")
                .arg(1)
                .ignore();
        }
        pipe.query::<()>(con).expect("HSET counters");
    }
}

#[test]
fn a_thrown_away_region_is_forgotten() {
    let server = Server::start(&[], &with_log(&[]));
    let mut con = server.connect();
    let pid = info_field(&mut con, "process_id");
    // Warm up what the first writes allocate once (dict tables, client buffers), and give a
    // fixed build a moment to forget the warm-up regions (not asserted here: see below).
    write_counters(&mut con, "warm", 1000);
    redis::cmd("FLUSHALL")
        .query::<()>(&mut con)
        .expect("FLUSHALL");
    let settle = std::time::Instant::now() + Duration::from_secs(2);
    while regions(&mut con) != 0 && std::time::Instant::now() < settle {
        std::thread::sleep(Duration::from_millis(10));
    }
    let regions_before = regions(&mut con);
    let used_before = used_memory(&mut con);

    write_counters(&mut con, "reg", 100_000);
    assert_eq!(regions(&mut con), regions_before + 100_000);
    redis::cmd("FLUSHALL")
        .query::<()>(&mut con)
        .expect("FLUSHALL");
    assert_alive(&server, pid, "FLUSHALL");
    eventually("the regions are forgotten", Duration::from_secs(10), || {
        regions(&mut con) == regions_before
    });
    // `used_memory` counts allocated bytes, not pages; 1 MB covers allocator and client-buffer
    // noise. 100,000 regions kept would hold several MB.
    memory_back(&mut con, used_before);
    assert_alive(&server, pid, "the end");
}

#[test]
fn flushdb_forgets_only_that_dbs_regions() {
    let server = Server::start(&[], &with_log(&[]));
    let mut con = server.connect();
    let mut other = db1(&server);
    let pid = info_field(&mut con, "process_id");
    register(&mut con, "a", "g1", "p1", "A100", "1");
    // gpucache works in any db.
    register(&mut other, "b", "g1", "p1", "A100", "1");
    register(&mut other, "b", "g2", "p1", "A100", "1");
    run(&mut other, &["HSET", "gpucache:{c}:stats:market", "x", "1"]).expect("HSET");
    assert_eq!(regions(&mut con), 3);
    assert_eq!(fields(&mut other, &["GPUCACHE.STATS"])["gpus_total"], "2");

    redis::cmd("FLUSHDB")
        .query::<()>(&mut other)
        .expect("FLUSHDB");
    assert_alive(&server, pid, "FLUSHDB");
    eventually("db 1's regions forgotten", Duration::from_secs(10), || {
        regions(&mut con) == 1
    });
    let in_db0 = fields(&mut con, &["GPUCACHE.STATS"]);
    assert_eq!(
        (in_db0["regions"].as_str(), in_db0["gpus_total"].as_str()),
        ("1", "1")
    );
    assert_eq!(fields(&mut other, &["GPUCACHE.STATS"])["regions"], "0");
    assert_consistent(&mut con, "a");
    // A region written again is known again.
    register(&mut other, "b", "g1", "p1", "A100", "1");
    assert_eq!(regions(&mut con), 2);
    assert_consistent(&mut other, "b");
}

#[test]
fn swapdb_moves_regions_with_their_db() {
    let server = Server::start(&[], &with_log(&[]));
    let mut con = server.connect();
    let mut other = db1(&server);
    let pid = info_field(&mut con, "process_id");
    register(&mut con, "a", "g1", "p1", "A100", "1");
    register(&mut other, "b", "g1", "p1", "A100", "1");
    register(&mut other, "b", "g2", "p1", "A100", "1");

    redis::cmd("SWAPDB")
        .arg(0)
        .arg(1)
        .query::<()>(&mut con)
        .expect("SWAPDB");
    assert_alive(&server, pid, "SWAPDB");
    // Region a now lives in db 1, b in db 0: STATS without a region sums the db's own.
    eventually(
        "regions moved with their db",
        Duration::from_secs(10),
        || {
            let in_db1 = fields(&mut other, &["GPUCACHE.STATS"]);
            let in_db0 = fields(&mut con, &["GPUCACHE.STATS"]);
            (in_db1["regions"].as_str(), in_db1["gpus_total"].as_str()) == ("1", "1")
                && (in_db0["regions"].as_str(), in_db0["gpus_total"].as_str()) == ("1", "2")
        },
    );
    assert_eq!(regions(&mut con), 2);
    assert_consistent(&mut other, "a");
    assert_consistent(&mut con, "b");
    assert_eq!(
        fields(&mut other, &["GPUCACHE.GET", "a", "g1"])["status"],
        "available"
    );
}

#[test]
fn deleting_a_regions_only_key_forgets_it() {
    let server = Server::start(&[], &with_log(&[]));
    let mut con = server.connect();
    let pid = info_field(&mut con, "process_id");
    register(&mut con, "eu", "g1", "p1", "A100", "1");
    for region in ["solo", "solo2"] {
        run(
            &mut con,
            &[
                "HSET",
                &format!("gpucache:{{{region}}}:stats:market"),
                "x",
                "1",
            ],
        )
        .expect("HSET");
    }
    assert_eq!(regions(&mut con), 3);
    run(&mut con, &["DEL", "gpucache:{solo}:stats:market"]).expect("DEL");
    eventually("DEL forgets the region", Duration::from_secs(10), || {
        regions(&mut con) == 2
    });
    run(&mut con, &["UNLINK", "gpucache:{solo2}:stats:market"]).expect("UNLINK");
    eventually("UNLINK forgets the region", Duration::from_secs(10), || {
        regions(&mut con) == 1
    });
    // Gone by expiry, by RENAME away (and back in by RENAME), by MOVE to another db.
    for region in ["gone1", "gone2", "gone3"] {
        let key = format!("gpucache:{{{region}}}:stats:market");
        run(&mut con, &["HSET", &key, "x", "1"]).expect("HSET");
    }
    assert_eq!(regions(&mut con), 4);
    run(&mut con, &["PEXPIRE", "gpucache:{gone1}:stats:market", "5"]).expect("PEXPIRE");
    run(
        &mut con,
        &["RENAME", "gpucache:{gone2}:stats:market", "elsewhere"],
    )
    .expect("RENAME");
    run(&mut con, &["MOVE", "gpucache:{gone3}:stats:market", "1"]).expect("MOVE");
    eventually(
        "expiry, RENAME and MOVE forget",
        Duration::from_secs(10),
        || {
            // MOVE took gone3 to db 1: still known there.
            regions(&mut con) == 2
        },
    );
    run(
        &mut con,
        &["RENAME", "elsewhere", "gpucache:{back}:stats:market"],
    )
    .expect("RENAME");
    assert_eq!(
        regions(&mut con),
        3,
        "a RENAME onto a counters key makes its region known"
    );
    assert_alive(&server, pid, "the end");
    assert_consistent(&mut con, "eu");
}

#[test]
fn a_damaged_region_is_not_forgotten_and_repairs() {
    let server = Server::start(&[], &with_log(&[]));
    let mut con = server.connect();
    let pid = info_field(&mut con, "process_id");
    register(&mut con, "dmg", "g1", "p1", "A100", "1");
    register(&mut con, "dmg", "g2", "p1", "A100", "2");
    assert_eq!(regions(&mut con), 1);
    run(
        &mut con,
        &["HSET", "gpucache:{sentinel}:stats:market", "x", "1"],
    )
    .expect("HSET");
    assert_eq!(regions(&mut con), 2);

    // dmg still has GPUs: losing its counters hash damages it, it does not throw it away.
    run(&mut con, &["DEL", "gpucache:{dmg}:stats:market"]).expect("DEL");
    // The sentinel, deleted after dmg's counters, being forgotten means dmg's DEL was seen.
    run(&mut con, &["DEL", "gpucache:{sentinel}:stats:market"]).expect("DEL");
    eventually("the sentinel is forgotten", Duration::from_secs(10), || {
        regions(&mut con) == 1
    });
    assert_eq!(regions(&mut con), 1, "dmg is still known");
    assert_alive(&server, pid, "DEL of a counters hash");

    let repaired = fields(&mut con, &["GPUCACHE.REPAIR", "dmg"]);
    assert_eq!(repaired["region"], "dmg");
    assert_consistent(&mut con, "dmg");
    let stats = fields(&mut con, &["GPUCACHE.STATS"]);
    assert_eq!(
        (stats["regions"].as_str(), stats["gpus_total"].as_str()),
        ("1", "2")
    );
    assert_eq!(
        fields(&mut con, &["GPUCACHE.GET", "dmg", "g2"])["status"],
        "available"
    );
}

#[test]
fn config_get_does_not_leak() {
    let server = Server::start(&[], &with_log(&[]));
    let mut con = server.connect();
    let pid = info_field(&mut con, "process_id");
    let get_tiers = |con: &mut Connection, times: usize| {
        for _ in 0..times / 1000 {
            let mut pipe = redis::pipe();
            for _ in 0..1000 {
                pipe.cmd("CONFIG")
                    .arg("GET")
                    .arg("gpucache.demand-tiers")
                    .ignore();
            }
            pipe.query::<()>(con).expect("CONFIG GET");
        }
    };
    // Warm up client buffers first.
    get_tiers(&mut con, 1000);
    let tiers: Vec<String> = redis::cmd("CONFIG")
        .arg("GET")
        .arg("gpucache.demand-tiers")
        .query(&mut con)
        .expect("CONFIG GET");
    assert_eq!(tiers, ["gpucache.demand-tiers", "10:2 30:1.5 50:1.2"]);
    let used_before = used_memory(&mut con);

    get_tiers(&mut con, 100_000);
    assert_alive(&server, pid, "100,000 CONFIG GET");
    // `used_memory` counts allocated bytes; 1 MB covers client-buffer noise. A leak of a few
    // dozen bytes per call is several MB here.
    memory_back(&mut con, used_before);
}
