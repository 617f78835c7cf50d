//! The two kinds of background link that keep the L1 coherent.
//!
//! - **Notifications** (fast path): `PSUBSCRIBE __keyspace@<db>__:gpucache:*` on a server that
//!   holds followed regions; each message names a changed key, which is invalidated at once if
//!   its region is followed.
//! - **Event stream** (the ordered, replayable record): `XREAD BLOCK` on each region's
//!   `gpucache:{R}:events` from the last applied id. It carries record versions, closes every
//!   gap a lost notification would leave, and after a reconnect replays what was missed — or,
//!   if the stream was trimmed past the last applied id, drops the region. The L1 serves a
//!   region's entries only while the link that reads its stream is up.
//!
//! Where they run (one server, or each region's master in a cluster) is `links`'s business.
//! Each link reconnects with jittered exponential backoff on its own thread, to the server
//! that holds its regions then; readers never wait for them.

use crate::cache::{Source, L1};
use crate::keyspace;
use crate::stats::add;
use crate::topology::{Group, Node, Topology};
use redis::{Connection, ErrorKind, RedisError, RedisResult, Value};
use serde::Deserialize;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// Reconnect, polling and discovery settings.
#[derive(Debug, Clone)]
pub struct LinkConfig {
    pub backoff_min: Duration,
    pub backoff_max: Duration,
    /// How long one `XREAD BLOCK` (and one notification read) waits before checking for
    /// shutdown and trimmed streams.
    pub poll: Duration,
    /// Entries read per `XREAD`/`XRANGE` call.
    pub batch: usize,
    /// Follow keyspace notifications (the fast path). Off: invalidations come from the event
    /// stream alone (for servers without `notify-keyspace-events`), a little later.
    pub notifications: bool,
    /// How often a cluster's slots or Sentinel's primary are asked again although no link
    /// failed (a failed link, or a `MOVED`, asks at once).
    pub refresh: Duration,
    /// How long a link (or discovery) waits to connect, and for a reply beyond its block time.
    pub timeout: Duration,
}

impl LinkConfig {
    /// The settings with out-of-range values brought into range (a zero poll would block
    /// forever, a huge one overflow the clock).
    pub(crate) fn sanitized(&self) -> LinkConfig {
        let clamp = |d: Duration, lo: u64, hi: u64| {
            d.clamp(Duration::from_millis(lo), Duration::from_millis(hi))
        };
        let backoff_min = clamp(self.backoff_min, 1, 60_000);
        LinkConfig {
            backoff_min,
            backoff_max: clamp(self.backoff_max, 1, 300_000).max(backoff_min),
            poll: clamp(self.poll, 10, 60_000),
            batch: self.batch.clamp(1, 100_000),
            notifications: self.notifications,
            refresh: clamp(self.refresh, 100, 3_600_000),
            timeout: clamp(self.timeout, 10, 600_000),
        }
    }
}

impl Default for LinkConfig {
    fn default() -> Self {
        LinkConfig {
            backoff_min: Duration::from_millis(50),
            backoff_max: Duration::from_secs(2),
            poll: Duration::from_millis(250),
            batch: 1000,
            notifications: true,
            refresh: Duration::from_secs(5),
            timeout: Duration::from_secs(1),
        }
    }
}

/// Exponential backoff with full jitter; reset after a successful connect.
struct Backoff {
    next: Duration,
    min: Duration,
    max: Duration,
}

impl Backoff {
    fn new(config: &LinkConfig) -> Backoff {
        Backoff {
            next: config.backoff_min,
            min: config.backoff_min,
            max: config.backoff_max,
        }
    }

    fn reset(&mut self) {
        self.next = self.min;
    }

    /// Sleeps (in slices, so shutdown stays prompt); false if asked to stop.
    fn wait(&mut self, stopped: &dyn Fn() -> bool) -> bool {
        let millis = u64::try_from(self.next.as_millis())
            .unwrap_or(u64::MAX)
            .max(1);
        let deadline = Instant::now() + Duration::from_millis(fastrand::u64(millis / 2..=millis));
        self.next = self.next.saturating_mul(2).min(self.max);
        while Instant::now() < deadline {
            if stopped() {
                return false;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        !stopped()
    }
}

/// Runs `session` on a connection from `connect` until it returns `Ok` (asked to stop),
/// reconnecting with backoff after each failure; `ended` runs after every session with its
/// error, if any (mark the link down, learn where its regions went). A panic in a session (a
/// bug, or a caller's hook) ends it like a connection error would, so the link is marked down
/// and reconnects instead of dying marked up.
fn run_link(
    l1: &L1,
    config: &LinkConfig,
    stopped: &dyn Fn() -> bool,
    mut connect: impl FnMut() -> Option<(Connection, Node)>,
    mut session: impl FnMut(&mut Connection, &Node, &mut Backoff) -> RedisResult<()>,
    mut ended: impl FnMut(Option<&RedisError>),
) {
    let mut backoff = Backoff::new(config);
    while !stopped() {
        if let Some((mut con, node)) = connect() {
            let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                session(&mut con, &node, &mut backoff)
            }));
            match &outcome {
                Ok(Ok(())) => {
                    ended(None);
                    return; // stopped
                }
                Ok(Err(e)) => ended(Some(e)),
                Err(_) => ended(None),
            }
        }
        add(&l1.counters.reconnects, 1);
        if !backoff.wait(stopped) {
            return;
        }
    }
}

/// A connection to the server that holds `group` now (discovering it if unknown).
fn connect_to(topology: &Topology, group: Group) -> Option<(Connection, Node)> {
    let node = match topology.node_for(group) {
        Some(node) => node,
        None => {
            let _ = topology.refresh();
            topology.node_for(group)?
        }
    };
    match topology.connect(&node) {
        Ok(con) => Some((con, node)),
        Err(_) => {
            // Gone (failed over, moved): ask where its regions are now.
            let _ = topology.refresh();
            None
        }
    }
}

/// What a link works for: where its regions are served, which regions, the L1 it keeps
/// coherent, its settings, and whether it should stop.
pub(crate) struct Scope<'a> {
    pub topology: &'a Topology,
    pub regions: &'a [String],
    pub l1: &'a L1,
    pub config: &'a LinkConfig,
    pub stopped: &'a dyn Fn() -> bool,
}

/// One notification link: PSUBSCRIBE on `node` until stopped (the edge stops, or `node` no
/// longer holds a followed region). `up` is its own state; `changed` runs after it flips.
pub(crate) fn run_notifications(scope: &Scope, node: Node, up: &AtomicBool, changed: &dyn Fn()) {
    run_link(
        scope.l1,
        scope.config,
        scope.stopped,
        || {
            let con = scope.topology.connect(&node).ok()?;
            Some((con, node.clone()))
        },
        |con, _node, backoff| listen(con, scope, up, changed, backoff),
        |_| {
            up.store(false, Ordering::Release);
            changed();
        },
    );
}

fn listen(
    con: &mut Connection,
    scope: &Scope,
    up: &AtomicBool,
    changed: &dyn Fn(),
    backoff: &mut Backoff,
) -> RedisResult<()> {
    let Scope {
        topology,
        regions,
        l1,
        config,
        stopped,
    } = scope;
    name_connection(con, "gpucache-edge-notify")?;
    topology.confirm_primary(con)?;
    let mut pubsub = con.as_pubsub();
    pubsub.set_read_timeout(Some(config.poll))?;
    pubsub.psubscribe(keyspace::notification_pattern(topology.db()))?;
    up.store(true, Ordering::Release);
    changed();
    backoff.reset();
    loop {
        if stopped() {
            return Ok(());
        }
        match pubsub.get_message() {
            Ok(message) => {
                add(&l1.counters.notifications, 1);
                let key = keyspace::key_of_channel(message.get_channel_name());
                let followed = key
                    .and_then(keyspace::parse_key)
                    .is_some_and(|k| regions.iter().any(|r| r == k.region));
                if let (Some(key), true) = (key, followed) {
                    l1.invalidate_key(key, Source::Notification);
                }
            }
            Err(e) if e.is_timeout() => {}
            Err(e) => return Err(e),
        }
    }
}

/// Names the link in `CLIENT LIST`, so operators (and tests) can tell edge links apart.
fn name_connection(con: &mut Connection, name: &str) -> RedisResult<()> {
    redis::cmd("CLIENT").arg("SETNAME").arg(name).query(con)
}

/// A stream entry id (`<ms>-<seq>`), ordered as Redis orders them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
pub struct EntryId(u64, u64);

impl EntryId {
    pub fn parse(text: &str) -> Option<EntryId> {
        let (ms, seq) = text.split_once('-')?;
        Some(EntryId(ms.parse().ok()?, seq.parse().ok()?))
    }
}

impl std::fmt::Display for EntryId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}-{}", self.0, self.1)
    }
}

/// The part of an event's JSON payload the L1 needs (README "Event stream").
#[derive(Debug, Deserialize)]
pub struct EventPayload {
    #[serde(default)]
    pub ts_ms: Option<i64>,
    #[serde(default)]
    pub gpu_id: Option<String>,
    #[serde(default)]
    pub version: Option<i64>,
    pub keys: Vec<String>,
}

/// One stream entry as `XRANGE`/`XREAD` return it: id and fields.
type StreamEntry = (String, HashMap<String, Value>);

struct Cursor {
    region: String,
    stream: String,
    /// Last applied entry; `None` until the first connect.
    last: Option<EntryId>,
}

/// What `XINFO STREAM` says about trimming.
struct StreamInfo {
    length: u64,
    last_generated: EntryId,
    /// The oldest entry still in the stream.
    first: EntryId,
    /// Highest id removed by `XDEL` (Redis 7.0 does not count trimming here).
    max_deleted: EntryId,
}

impl StreamInfo {
    /// Whether entries after `last` may be gone. Trimming removes from the head, so when the
    /// oldest remaining entry is newer than `last`, entries between them may have existed:
    /// counted as lost (a reader that is merely near the head drops its region needlessly,
    /// never keeps a stale entry).
    fn lost_after(&self, last: EntryId) -> bool {
        let trimmed_past = if self.length == 0 {
            self.last_generated > last
        } else {
            self.first > last
        };
        trimmed_past || self.max_deleted > last || self.last_generated < last
    }
}

/// One stream link: the regions of `group`, read on the server that holds them now, until
/// `stopped`. Their cursors outlive every reconnect, so a region that moved to another server
/// (a failover, a reshard: the stream moves with the slot, so its ids continue) is replayed
/// there from its last applied id — or dropped, where the gap rules say entries may be lost.
pub(crate) fn run_stream(scope: &Scope, group: Group) {
    let Scope {
        topology,
        regions,
        l1,
        config,
        stopped,
    } = scope;
    let mut cursors: Vec<Cursor> = regions
        .iter()
        .map(|region| Cursor {
            region: region.clone(),
            stream: keyspace::events_key(region),
            last: None,
        })
        .collect();
    let mut followed_on: Option<String> = None;
    run_link(
        l1,
        config,
        stopped,
        || connect_to(topology, group),
        |con, node, backoff| {
            follow(
                con,
                node,
                scope,
                group,
                &mut cursors,
                &mut followed_on,
                backoff,
            )
        },
        |error| {
            for region in regions.iter() {
                l1.set_region_link(region, false);
            }
            if let Ok(mut nodes) = l1.counters.followed_on.lock() {
                for region in regions.iter() {
                    nodes.remove(region);
                }
            }
            if let Some(error) = error {
                topology.after_error(group, error);
            }
        },
    );
}

fn follow(
    con: &mut Connection,
    node: &Node,
    scope: &Scope,
    group: Group,
    cursors: &mut [Cursor],
    followed_on: &mut Option<String>,
    backoff: &mut Backoff,
) -> RedisResult<()> {
    let Scope {
        topology,
        l1,
        config,
        stopped,
        ..
    } = scope;
    name_connection(con, "gpucache-edge-stream")?;
    topology.confirm_primary(con)?;
    // The socket timeout must outlast the server-side block.
    con.set_read_timeout(Some(config.poll * 4 + config.timeout))?;
    let mut generation = topology.generation();
    for cursor in cursors.iter_mut() {
        catch_up(con, cursor, l1, config)?;
    }
    publish_positions(cursors, l1);
    if followed_on
        .as_ref()
        .is_some_and(|before| *before != node.name)
    {
        add(&l1.counters.region_moves, cursors.len() as u64);
    }
    *followed_on = Some(node.name.clone());
    if let Ok(mut nodes) = l1.counters.followed_on.lock() {
        for cursor in cursors.iter() {
            nodes.insert(cursor.region.clone(), node.name.clone());
        }
    }
    for cursor in cursors.iter() {
        l1.set_region_link(&cursor.region, true);
    }
    backoff.reset();
    let mut last_trim_check = Instant::now();
    loop {
        if stopped() {
            return Ok(());
        }
        // Discovery (periodic, or another link's) may have found these regions elsewhere.
        if topology.generation() != generation {
            generation = topology.generation();
            if topology.node_for(group).is_some_and(|now| now != *node) {
                return Err(RedisError::from((
                    ErrorKind::ClientError,
                    "the regions are held by another server now",
                )));
            }
        }
        let before: Vec<Option<EntryId>> = cursors.iter().map(|c| c.last).collect();
        let applied = read_new(con, cursors, l1, config)?;
        // XREAD skips entries trimmed before it read them: after each batch, compare where
        // the cursor was with the stream's oldest entry (which only grows). Idle cursors are
        // checked now and then, for a stream deleted or recreated under them.
        let idle_check = last_trim_check.elapsed() > Duration::from_secs(1);
        for (cursor, before) in cursors.iter_mut().zip(before) {
            if cursor.last != before || idle_check {
                check_lost(con, cursor, before, l1)?;
            }
        }
        if idle_check {
            last_trim_check = Instant::now();
        }
        if applied > 0 || idle_check {
            publish_positions(cursors, l1);
        }
    }
}

/// Shows each region's last applied id in `Stats::last_event_ids`.
fn publish_positions(cursors: &[Cursor], l1: &L1) {
    if let Ok(mut ids) = l1.counters.last_event_ids.lock() {
        for cursor in cursors {
            if let Some(last) = cursor.last {
                ids.insert(cursor.region.clone(), last.to_string());
            }
        }
    }
}

/// After a (re)connect: replay what this cursor missed, or drop the region when that cannot
/// be known.
fn catch_up(
    con: &mut Connection,
    cursor: &mut Cursor,
    l1: &L1,
    config: &LinkConfig,
) -> RedisResult<()> {
    let Some(last) = cursor.last else {
        // First connect: nothing is cached yet, start from the stream's end.
        let info = stream_info(con, &cursor.stream)?;
        cursor.last = Some(info.map_or(EntryId::default(), |i| i.last_generated));
        return Ok(());
    };
    // The last applied entry must still be there: if it is not, the stream was trimmed past
    // it, or the server restarted or failed over without it — writes after it are lost to
    // this cursor and possibly reissued with the same versions.
    if last > EntryId::default() {
        let at_last: Vec<StreamEntry> = redis::cmd("XRANGE")
            .arg(&cursor.stream)
            .arg(last.to_string())
            .arg(last.to_string())
            .query(con)?;
        if at_last.is_empty() {
            let info = stream_info(con, &cursor.stream)?;
            l1.drop_region(&cursor.region);
            cursor.last = Some(info.map_or(EntryId::default(), |i| i.last_generated));
            return Ok(());
        }
    }
    let mut from = last;
    loop {
        let entries: Vec<StreamEntry> = redis::cmd("XRANGE")
            .arg(&cursor.stream)
            .arg(format!("({from}"))
            .arg("+")
            .arg("COUNT")
            .arg(config.batch)
            .query(con)?;
        if entries.is_empty() {
            break;
        }
        for (id, fields) in entries {
            apply(l1, cursor, &id, &fields);
            add(&l1.counters.events_replayed, 1);
        }
        from = cursor.last.unwrap_or(from);
    }
    // Trimming may have raced the replay.
    check_lost(con, cursor, Some(last), l1)?;
    Ok(())
}

/// Drops the cursor's region when entries after `since` (where it stood before its last
/// read) may be gone: trimmed, deleted, or the stream restarted. True if it did.
fn check_lost(
    con: &mut Connection,
    cursor: &mut Cursor,
    since: Option<EntryId>,
    l1: &L1,
) -> RedisResult<bool> {
    let Some(since) = since else {
        return Ok(false);
    };
    let info = stream_info(con, &cursor.stream)?;
    let newest = cursor.last.unwrap_or(since).max(since);
    let lost = match &info {
        None => newest > EntryId::default(),
        Some(info) => info.lost_after(since) || info.last_generated < newest,
    };
    if lost {
        l1.drop_region(&cursor.region);
        cursor.last = Some(info.map_or(EntryId::default(), |i| i.last_generated));
    }
    Ok(lost)
}

fn stream_info(con: &mut Connection, stream: &str) -> RedisResult<Option<StreamInfo>> {
    let reply: Value = match redis::cmd("XINFO").arg("STREAM").arg(stream).query(con) {
        Ok(reply) => reply,
        Err(e) if e.to_string().contains("no such key") => return Ok(None),
        Err(e) => return Err(e),
    };
    let fields: HashMap<String, Value> = redis::from_redis_value(&reply)?;
    let id = |name: &str| -> EntryId {
        fields
            .get(name)
            .and_then(|v| redis::from_redis_value::<String>(v).ok())
            .and_then(|s| EntryId::parse(&s))
            .unwrap_or_default()
    };
    let first = match fields.get("first-entry") {
        Some(Value::Array(entry)) => entry
            .first()
            .and_then(|v| redis::from_redis_value::<String>(v).ok())
            .and_then(|s| EntryId::parse(&s))
            .unwrap_or_default(),
        _ => EntryId::default(),
    };
    Ok(Some(StreamInfo {
        length: fields
            .get("length")
            .and_then(|v| redis::from_redis_value(v).ok())
            .unwrap_or(0),
        last_generated: id("last-generated-id"),
        first,
        max_deleted: id("max-deleted-entry-id"),
    }))
}

/// One `XREAD BLOCK` over every region; returns the number of entries applied.
fn read_new(
    con: &mut Connection,
    cursors: &mut [Cursor],
    l1: &L1,
    config: &LinkConfig,
) -> RedisResult<usize> {
    let mut cmd = redis::cmd("XREAD");
    cmd.arg("COUNT")
        .arg(config.batch)
        .arg("BLOCK")
        .arg(u64::try_from(config.poll.as_millis()).unwrap_or(1000))
        .arg("STREAMS");
    for cursor in cursors.iter() {
        cmd.arg(&cursor.stream);
    }
    for cursor in cursors.iter() {
        cmd.arg(cursor.last.unwrap_or_default().to_string());
    }
    let reply: Option<Vec<(String, Vec<StreamEntry>)>> = cmd.query(con)?;
    let mut applied = 0;
    for (stream, entries) in reply.unwrap_or_default() {
        let Some(cursor) = cursors.iter_mut().find(|c| c.stream == stream) else {
            continue;
        };
        for (id, fields) in entries {
            apply(l1, cursor, &id, &fields);
            applied += 1;
        }
    }
    Ok(applied)
}

fn apply(l1: &L1, cursor: &mut Cursor, id: &str, fields: &HashMap<String, Value>) {
    add(&l1.counters.stream_events, 1);
    let payload = fields
        .get("payload")
        .and_then(|v| redis::from_redis_value::<String>(v).ok())
        .and_then(|json| serde_json::from_str::<EventPayload>(&json).ok());
    match payload {
        Some(event) => {
            let gpu_key = event
                .gpu_id
                .as_deref()
                .map(|gpu_id| keyspace::gpu_key(&cursor.region, gpu_id));
            let versioned = gpu_key.as_deref().zip(event.version);
            l1.apply_event(versioned, &event.keys);
            if let Some(ts) = event.ts_ms {
                l1.counters.newest_event_ms.fetch_max(ts, Ordering::Relaxed);
            }
        }
        // An entry this version cannot read may have changed anything in the region.
        None => l1.drop_region(&cursor.region),
    }
    if let Some(id) = EntryId::parse(id) {
        cursor.last = Some(id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entry_ids_order_numerically() {
        let a = EntryId::parse("1700000000000-9").unwrap();
        let b = EntryId::parse("1700000000000-10").unwrap();
        let c = EntryId::parse("1700000000001-0").unwrap();
        assert!(a < b && b < c);
        assert_eq!(b.to_string(), "1700000000000-10");
        assert_eq!(EntryId::parse("nope"), None);
        assert_eq!(EntryId::parse("1-x"), None);
    }

    #[test]
    fn a_gap_is_assumed_when_the_oldest_entry_is_newer_than_the_last_applied() {
        let id = |ms| EntryId(ms, 0);
        let info = StreamInfo {
            length: 10,
            last_generated: id(100),
            first: id(50),
            max_deleted: EntryId::default(),
        };
        assert!(!info.lost_after(id(60)), "still holds everything after 60");
        assert!(!info.lost_after(id(100)), "up to date");
        assert!(info.lost_after(id(40)), "41..49 may have been trimmed");
        assert!(
            info.lost_after(id(200)),
            "the stream restarted below what was applied"
        );
        let deleted = StreamInfo {
            max_deleted: id(70),
            ..info
        };
        assert!(deleted.lost_after(id(60)), "an XDEL after 60");
        let empty = StreamInfo {
            length: 0,
            first: EntryId::default(),
            ..info
        };
        assert!(empty.lost_after(id(60)) && !empty.lost_after(id(100)));
    }

    #[test]
    fn event_payloads_parse_the_fields_the_l1_uses() {
        let event: EventPayload = serde_json::from_str(
            r#"{"type":"booking_created","region":"eu","ts_ms":5,"gpu_id":"g1","version":3,
                "keys":["gpucache:{eu}:gpu:g1"],"new":{"status":"busy"}}"#,
        )
        .unwrap();
        assert_eq!(
            (event.gpu_id.as_deref(), event.version),
            (Some("g1"), Some(3))
        );
        assert_eq!(event.keys, vec!["gpucache:{eu}:gpu:g1"]);
    }
}
