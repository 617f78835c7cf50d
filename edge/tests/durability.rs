//! Acknowledged means durable: a primary and a replica, the replica made to lag with `DEBUG
//! SLEEP`, the primary killed with SIGKILL while the replica sleeps, the replica promoted.
//! Plain acknowledged `BOOK`s are lost; bookings `book_durably` reported durable never are.

#[path = "../../tests/common/mod.rs"]
mod common;

use common::{assert_consistent, eventually, Server};
use gpucache_edge::durable::{
    book_durably, BookOutcome, BookRequest, BookingResult, Durability, Shortfall,
};
use gpucache_edge::EdgeError;
use redis::Connection;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

const REGION: &str = "eu";
const LINK: Duration = Duration::from_secs(20);
/// How long the replica sleeps: everything from the first lagging booking to the kill of the
/// primary happens within it (2–3 s here; the burst is cut short at `BURST_BUDGET`).
const SLEEP_S: u64 = 5;
/// Plain BOOKs sent while the replica sleeps, at most: their replication stream (about 4 KB
/// each, with the long ids below) must overflow the loopback socket buffers, so that its tail
/// is still in the primary's memory when the primary is killed.
const BURST: usize = 3_000;
/// The burst stops early after this long into the sleep, so that the primary is surely killed
/// before the replica wakes, however slow the machine.
const BURST_BUDGET: Duration = Duration::from_millis(3_000);
/// A booking `book_durably` waits this long for the sleeping replica before giving up.
const LAGGING_WAIT: Duration = Duration::from_millis(150);
/// Ids near the 128-byte limit: every BOOK then replicates more bytes, and fewer BOOKs (less
/// time) fill the socket buffers.
const PAD: &str = "0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789abcdefghijklmnopqrstuvwxyz";

fn gpu_id(i: usize) -> String {
    format!("gpu-{i:05}-{PAD}")
}

fn booking_id(i: usize) -> String {
    format!("booking-{i:05}-{PAD}")
}

fn request(i: usize) -> BookRequest {
    BookRequest::new(
        REGION,
        &gpu_id(i),
        &booking_id(i),
        &format!("user-{PAD}"),
        3600,
    )
}

fn info(con: &mut Connection, section: &str) -> String {
    redis::cmd("INFO").arg(section).query(con).unwrap()
}

fn repl_offset(con: &mut Connection) -> i64 {
    info(con, "replication")
        .lines()
        .find_map(|l| l.strip_prefix("master_repl_offset:"))
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

fn link_status(replica: &Server) -> Option<String> {
    let mut con = replica.connect();
    let info = info(&mut con, "replication");
    info.lines()
        .find_map(|l| l.strip_prefix("master_link_status:"))
        .map(|s| s.trim().to_string())
}

/// A primary and a replica with the link up and an initial `WAIT 1` done.
fn primary_and_replica() -> (Server, Server) {
    let primary = Server::start(&[], &["--enable-debug-command", "yes"]);
    let replica = Server::start(
        &[],
        &[
            "--enable-debug-command",
            "yes",
            "--replicaof",
            "127.0.0.1",
            &primary.port.to_string(),
        ],
    );
    eventually("replica link up", LINK, || {
        link_status(&replica).as_deref() == Some("up")
    });
    replica_has_all(&mut primary.connect());
    (primary, replica)
}

/// Registers GPUs 0..n (pipelined).
fn register_gpus(con: &mut Connection, n: usize) {
    for chunk in (0..n).collect::<Vec<_>>().chunks(500) {
        let mut pipe = redis::pipe();
        for i in chunk {
            pipe.cmd("GPUCACHE.REGISTER")
                .arg(REGION)
                .arg(gpu_id(*i))
                .arg("PROVIDER")
                .arg("p1")
                .arg("TYPE")
                .arg("A100")
                .arg("PRICE")
                .arg("1.5")
                .ignore();
        }
        pipe.query::<()>(con).unwrap();
    }
}

/// Waits until the replica has everything `con` wrote.
fn replica_has_all(con: &mut Connection) {
    let acked: i64 = redis::cmd("WAIT").arg(1).arg(20_000).query(con).unwrap();
    assert_eq!(acked, 1, "the replica acknowledges");
}

/// Puts the replica to sleep for `seconds` (the returned thread ends when it wakes) and
/// returns once it no longer answers.
fn put_to_sleep(replica: &Server, seconds: u64) -> JoinHandle<()> {
    // Both connections are made beforehand: connecting waits for replies too. A probe PING
    // that times out leaves its reply pending, but by then the probe is done.
    let mut con = replica.connect();
    let mut probe = replica.connect();
    probe
        .set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    let sleeper = std::thread::spawn(move || {
        let _: () = redis::cmd("DEBUG")
            .arg("SLEEP")
            .arg(seconds)
            .query(&mut con)
            .unwrap();
    });
    eventually("the replica is asleep", LINK, || {
        redis::cmd("PING").query::<String>(&mut probe).is_err()
    });
    sleeper
}

/// Kills the primary (SIGKILL) and promotes the replica once it has woken and read what
/// reached its socket.
fn fail_over(primary: Server, replica: &Server, sleeper: JoinHandle<()>) -> Connection {
    assert!(
        !sleeper.is_finished(),
        "the replica woke before the primary was killed: the machine is too slow for \
         SLEEP_S = {SLEEP_S}"
    );
    primary.stop();
    sleeper.join().unwrap();
    eventually("the replica sees its primary gone", LINK, || {
        link_status(replica).as_deref() == Some("down")
    });
    let mut con = replica.connect();
    let _: () = redis::cmd("REPLICAOF")
        .arg("NO")
        .arg("ONE")
        .query(&mut con)
        .unwrap();
    con
}

/// Which of `ids` have a booking record on `con`.
fn present(con: &mut Connection, ids: &[String]) -> Vec<bool> {
    let mut found = Vec::with_capacity(ids.len());
    for chunk in ids.chunks(1000) {
        let mut pipe = redis::pipe();
        for id in chunk {
            pipe.cmd("EXISTS")
                .arg(format!("gpucache:{{{REGION}}}:booking:{id}"));
        }
        let replies: Vec<bool> = pipe.query(con).unwrap();
        found.extend(replies);
    }
    found
}

#[test]
fn acknowledged_bookings_are_lost_in_a_failover_but_durable_ones_never_are() {
    let (primary, replica) = primary_and_replica();
    let mut con = primary.connect();
    let helper_before = 20;
    let helper_lagging = 4;
    let gpus = helper_before + helper_lagging + BURST;
    register_gpus(&mut con, gpus);
    replica_has_all(&mut con);
    let durable = Durability::replicas(1, Duration::from_secs(10));
    let lagging = Durability::replicas(1, LAGGING_WAIT);

    // Before the lag: every booking is acknowledged by the replica.
    let mut confirmed = Vec::new();
    for i in 0..helper_before {
        match book_durably(&mut con, &request(i), &durable).unwrap() {
            BookOutcome::Durable { booking, acks } => {
                assert_eq!(booking.result, BookingResult::Created);
                assert_eq!(booking.gpu_id, gpu_id(i));
                assert_eq!(acks.replicas, 1);
                confirmed.push(booking.booking_id);
            }
            other => panic!("booking {i} before the lag: {other:?}"),
        }
    }

    let sleeper = put_to_sleep(&replica, SLEEP_S);
    let slept_at = Instant::now();
    let mut not_durable = Vec::new();
    let book_lagging = |con: &mut Connection, i: usize, not_durable: &mut Vec<String>| {
        let outcome = book_durably(con, &request(i), &lagging).unwrap();
        match outcome {
            BookOutcome::NotDurable {
                booking,
                acks,
                reason,
            } => {
                assert_eq!(acks.replicas, 0);
                assert_eq!(
                    reason,
                    Shortfall::Replicas {
                        acknowledged: 0,
                        required: 1
                    }
                );
                not_durable.push(booking.booking_id);
            }
            other => panic!("booking {i} while the replica sleeps: {other:?}"),
        }
    };
    // Lagging helper bookings, then the plain burst, then lagging helper bookings again.
    let first = helper_before;
    for i in first..first + helper_lagging / 2 {
        book_lagging(&mut con, i, &mut not_durable);
    }
    let burst_start = helper_before + helper_lagging;
    let burst: Vec<usize> = (burst_start..burst_start + BURST).collect();
    let offset_before = repl_offset(&mut con);
    let mut acknowledged = Vec::new();
    for chunk in burst.chunks(250) {
        if slept_at.elapsed() > BURST_BUDGET {
            break;
        }
        let mut pipe = redis::pipe();
        for &i in chunk {
            let r = request(i);
            pipe.cmd("GPUCACHE.BOOK")
                .arg(&r.region)
                .arg(&r.gpu_id)
                .arg(&r.booking_id)
                .arg(&r.user_id)
                .arg(r.duration_s);
        }
        // Every reply is a booking: each of these BOOKs is acknowledged.
        let replies: Vec<redis::Value> = pipe.query(&mut con).unwrap();
        assert_eq!(replies.len(), chunk.len());
        acknowledged.extend(chunk.iter().map(|&i| booking_id(i)));
    }
    let burst_time = slept_at.elapsed();
    let burst_bytes = repl_offset(&mut con) - offset_before;
    for i in first + helper_lagging / 2..first + helper_lagging {
        book_lagging(&mut con, i, &mut not_durable);
    }
    let kill_after = slept_at.elapsed();

    let mut promoted = fail_over(primary, &replica, sleeper);

    let burst_present = present(&mut promoted, &acknowledged);
    let lost = burst_present.iter().filter(|p| !**p).count();
    let confirmed_present = present(&mut promoted, &confirmed);
    let not_durable_present = present(&mut promoted, &not_durable);
    eprintln!(
        "plain BOOKs acknowledged: {} ({} bytes of replication stream each), lost in the \
         failover: {lost}; burst sent in {:?}, \
         primary killed {:?} into a {SLEEP_S} s replica sleep; durable-reported: {}, lost: {}; \
         not-durable-reported: {}, lost: {}",
        acknowledged.len(),
        burst_bytes / i64::try_from(acknowledged.len().max(1)).unwrap(),
        burst_time,
        kill_after,
        confirmed.len(),
        confirmed_present.iter().filter(|p| !**p).count(),
        not_durable.len(),
        not_durable_present.iter().filter(|p| !**p).count(),
    );

    // (a) Acknowledged is not durable: the failover lost plain bookings ...
    assert!(
        lost > 0,
        "no acknowledged booking was lost: the burst did not outrun the replica"
    );
    // ... and what survived is a prefix of the replication stream.
    let survivors = burst_present.iter().take_while(|p| **p).count();
    assert!(
        burst_present[survivors..].iter().all(|p| !*p),
        "the promoted replica holds a prefix of the bookings"
    );
    // (b) Every booking reported durable survived.
    assert!(
        confirmed_present.iter().all(|p| *p),
        "a durable booking was lost"
    );
    assert_eq!(not_durable.len(), helper_lagging);
    // The not-durable bookings made after the burst queued behind its lost tail: they are
    // gone, which is why they must not be confirmed.
    assert!(
        not_durable_present[helper_lagging / 2..]
            .iter()
            .all(|p| !*p),
        "bookings made after lost ones survived"
    );
    // The promoted replica's state is consistent (each booking replicated whole or not at all).
    assert_consistent(&mut promoted, REGION);

    // Retrying a lost booking on the new primary books it again and is durable (no replica
    // is required any more: the new primary has none).
    let retry = request(first + helper_lagging - 1);
    let outcome = book_durably(
        &mut promoted,
        &retry,
        &Durability::replicas(0, LAGGING_WAIT),
    )
    .unwrap();
    assert!(outcome.is_durable(), "{outcome:?}");
    assert_eq!(outcome.booking().result, BookingResult::Created);
}

/// A retry answered `existing` wrote nothing. On Redis 7.2+ a connection's `WAIT` covers only
/// its own commands that propagated something, so on a new connection it would return at once;
/// the helper sends a replicated no-op first. Either way, the retry must wait for the original
/// booking to reach the replica.
#[test]
fn a_retry_answered_existing_waits_for_the_original_booking() {
    let (primary, replica) = primary_and_replica();
    let mut first = primary.connect();
    register_gpus(&mut first, 2);
    replica_has_all(&mut first);
    let sleeper = put_to_sleep(&replica, 2);
    let lagging = Durability::replicas(1, LAGGING_WAIT);

    let outcome = book_durably(&mut first, &request(0), &lagging).unwrap();
    assert!(!outcome.is_durable(), "{outcome:?}");
    assert_eq!(outcome.booking().result, BookingResult::Created);

    // A retry on a new connection is not confirmed while the replica lags ...
    let mut retry_con = primary.connect();
    let outcome = book_durably(&mut retry_con, &request(0), &lagging).unwrap();
    assert_eq!(outcome.booking().result, BookingResult::Existing);
    assert!(
        matches!(outcome, BookOutcome::NotDurable { .. }),
        "{outcome:?}"
    );
    // ... and the module replicated a no-op for the retry, which its WAIT covers.
    let offset = |con: &mut redis::Connection| -> i64 {
        let info: String = redis::cmd("INFO").arg("replication").query(con).unwrap();
        info.lines()
            .find_map(|l| l.trim_end().strip_prefix("master_repl_offset:"))
            .and_then(|v| v.parse().ok())
            .expect("master_repl_offset")
    };
    let before = offset(&mut retry_con);
    let again: redis::Value = redis::cmd("GPUCACHE.BOOK")
        .arg(REGION)
        .arg(&request(0).gpu_id)
        .arg(booking_id(0))
        .arg(&request(0).user_id)
        .arg(request(0).duration_s)
        .query(&mut retry_con)
        .unwrap();
    assert!(format!("{again:?}").contains("existing"), "{again:?}");
    assert!(
        offset(&mut retry_con) > before,
        "an `existing` reply moves the replication offset"
    );

    // Once the replica is awake, the same retry is durable.
    sleeper.join().unwrap();
    let outcome = book_durably(
        &mut retry_con,
        &request(0),
        &Durability::replicas(1, Duration::from_secs(10)),
    )
    .unwrap();
    assert!(outcome.is_durable(), "{outcome:?}");
    assert_eq!(outcome.booking().result, BookingResult::Existing);
    let mut rcon = replica.connect();
    assert_eq!(present(&mut rcon, &[booking_id(0)]), vec![true]);
}

/// Refused bookings are errors; too few replicas is `NotDurable`; asking for AOF fsyncs on a
/// server without `WAITAOF` books nothing.
#[test]
fn errors_pass_through_and_missing_acknowledgements_are_not_durable() {
    let server = Server::start(&[], &[]);
    let mut con = server.connect();
    register_gpus(&mut con, 2);
    let one = Durability::replicas(1, Duration::from_millis(50));

    // No replica at all: booked, but not durable.
    let outcome = book_durably(&mut con, &request(0), &one).unwrap();
    let BookOutcome::NotDurable {
        booking, reason, ..
    } = outcome
    else {
        panic!("durable without a replica: {outcome:?}")
    };
    assert_eq!(booking.booking_id, booking_id(0));
    assert_eq!(
        reason,
        Shortfall::Replicas {
            acknowledged: 0,
            required: 1
        }
    );
    // Zero replicas asked: durable by the caller's standard.
    let retry = book_durably(
        &mut con,
        &request(0),
        &Durability::replicas(0, LAGGING_WAIT),
    )
    .unwrap();
    assert!(retry.is_durable());
    assert_eq!(retry.booking().result, BookingResult::Existing);

    // GPUBUSY, NOGPU, BOOKINGEXISTS come back as the server's errors.
    let taken = BookRequest::new(REGION, &gpu_id(0), "other", "bob", 60);
    let busy = book_durably(&mut con, &taken, &one).unwrap_err();
    assert!(
        matches!(&busy, EdgeError::Server(m) if m.starts_with("GPUBUSY")),
        "{busy:?}"
    );
    let ghost = BookRequest::new(REGION, "nope", "b9", "bob", 60);
    let missing = book_durably(&mut con, &ghost, &one).unwrap_err();
    assert!(
        matches!(&missing, EdgeError::Server(m) if m.starts_with("NOGPU")),
        "{missing:?}"
    );
    let clash = BookRequest::new(REGION, &gpu_id(1), &booking_id(0), "bob", 3600);
    let exists = book_durably(&mut con, &clash, &one).unwrap_err();
    assert!(
        matches!(&exists, EdgeError::Server(m) if m.starts_with("BOOKINGEXISTS")),
        "{exists:?}"
    );

    // AOF durability on a server without WAITAOF (7.0): refused before booking anything.
    let version = server_version(&mut con);
    let aof = Durability::replicas(0, LAGGING_WAIT).with_local_aof();
    let result = book_durably(&mut con, &request(1), &aof);
    if version < (7, 2) {
        assert!(
            matches!(&result, Err(EdgeError::Unsupported(_))),
            "{result:?}"
        );
        assert_eq!(present(&mut con, &[booking_id(1)]), vec![false]);
        assert_eq!(
            common::fields(&mut con, &["GPUCACHE.GET", REGION, &gpu_id(1)])["status"],
            "available"
        );
    } else {
        // `appendonly no` (the harness): WAITAOF refuses, so the booking is not durable.
        let outcome = result.unwrap();
        assert!(
            matches!(
                &outcome,
                BookOutcome::NotDurable {
                    reason: Shortfall::WaitFailed(_),
                    ..
                }
            ),
            "{outcome:?}"
        );
    }
}

fn server_version(con: &mut Connection) -> (u64, u64) {
    let info = info(con, "server");
    let version = info
        .lines()
        .find_map(|l| l.strip_prefix("redis_version:"))
        .unwrap()
        .trim()
        .to_string();
    let mut parts = version.split('.').map(|p| p.parse::<u64>().unwrap());
    (parts.next().unwrap(), parts.next().unwrap())
}

/// The example configuration's `booking` user may run the whole recipe: `BOOK`, `WAIT`, the
/// `INVALIDATE` of a retry and the `HELLO` version probe.
#[test]
fn the_example_booking_user_can_book_durably() {
    let server = Server::start_with_config(include_str!("../../redis.conf.example"), &[]);
    let url = format!(
        "redis://booking:CHANGE-ME-booking@127.0.0.1:{}/",
        server.port
    );
    let mut con = redis::Client::open(url)
        .and_then(|c| c.get_connection())
        .expect("login");
    register_gpus(&mut con, 1);
    let alone = Durability::replicas(0, LAGGING_WAIT);
    for expected in [BookingResult::Created, BookingResult::Existing] {
        let outcome = book_durably(&mut con, &request(0), &alone).unwrap();
        assert!(outcome.is_durable(), "{outcome:?}");
        assert_eq!(outcome.booking().result, expected);
    }
    let aof = book_durably(&mut con, &request(0), &alone.with_local_aof());
    if server_version(&mut server.connect()) < (7, 2) {
        assert!(matches!(aof, Err(EdgeError::Unsupported(_))), "{aof:?}");
    }
}
