//! Thin access to Redis from inside a command: typed reads, replicated writes, notifications.
//!
//! Writes go through `RM_Call` with the `!` flag, so Redis itself propagates each concrete
//! effect (`HSET`, `ZADD`, `PEXPIREAT` with an absolute time, `XADD` with the id it chose) to
//! replicas and the AOF, wrapped with the rest of the command in one `MULTI/EXEC`. Nothing a
//! replica or an AOF replay executes draws a random number or reads the clock.
//!
//! Reads go through the key API (`RedisModule_OpenKey` read-only, `HashGet`, `ScanKey`,
//! `ValueLength`, `ZsetScore`, `GetExpire`, the sorted-set range iterator): the same lookups a
//! read command makes, without a command round trip or a reply to parse.

use crate::core::error::{MarketError, MarketResult};
use redis_module::{
    raw, CallOptions, CallOptionsBuilder, CallResult, Context, KeyType, NotifyEvent, RedisValue,
};
use std::cell::{OnceCell, RefCell};
use std::marker::PhantomData;
use std::os::raw::{c_char, c_int};

/// Whether Redis accepts a module's writes to a region (`Store::write_access`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriteAccess {
    Now,
    /// Not now: the cluster is down (a node's first seconds, a failed master).
    Later,
    /// The region's slot is served by another node (or is moving).
    Elsewhere,
}

/// A stream entry as read: its id and its (field, value) pairs.
pub type StreamEntry = (String, Vec<(String, String)>);

pub struct Store<'a> {
    ctx: &'a Context,
    replicated: OnceCell<CallOptions>,
    read_options: OnceCell<CallOptions>,
    /// Keys written so far, in first-write order: they receive this command's notification.
    written: RefCell<Vec<String>>,
    /// The same keys as a set, once there are more than a scan should cover.
    written_index: RefCell<Option<std::collections::HashSet<String>>>,
    /// Writes Redis refused (cluster down, slot moved, loading): the caller retries the whole
    /// repair they belong to.
    failed_writes: std::cell::Cell<u32>,
}

fn bytes(value: &RedisValue) -> Option<Vec<u8>> {
    match value {
        RedisValue::SimpleString(s) | RedisValue::BulkString(s) => Some(s.clone().into_bytes()),
        RedisValue::SimpleStringStatic(s) => Some(s.as_bytes().to_vec()),
        RedisValue::StringBuffer(b) => Some(b.clone()),
        RedisValue::BulkRedisString(s) => Some(s.as_slice().to_vec()),
        RedisValue::Integer(i) => Some(i.to_string().into_bytes()),
        _ => None,
    }
}

fn text(value: &RedisValue) -> Option<String> {
    bytes(value).and_then(|b| String::from_utf8(b).ok())
}

impl<'a> Store<'a> {
    pub fn new(ctx: &'a Context) -> Store<'a> {
        Store {
            ctx,
            replicated: OnceCell::new(),
            read_options: OnceCell::new(),
            written: RefCell::new(Vec::new()),
            written_index: RefCell::new(None),
            failed_writes: std::cell::Cell::new(0),
        }
    }

    /// How many writes Redis refused so far.
    pub fn failed_writes(&self) -> u32 {
        self.failed_writes.get()
    }

    /// Whether this server runs in a Redis Cluster.
    fn in_cluster(&self) -> bool {
        self.ctx
            .get_flags()
            .contains(redis_module::ContextFlags::CLUSTER)
    }

    /// Whether Redis would accept writes to the region whose keys start with `prefix` now.
    /// Always so on a plain server; in a cluster a module's write is refused while the cluster is
    /// down or the region's slot is not served here, and a timer-driven repair must find that
    /// out before its first write rather than half-way through. Probed with `PERSIST` of a key of
    /// the region's slot that never exists: a write command, so the cluster checks it as one
    /// (even with `cluster-allow-reads-when-down`), and it changes nothing.
    pub fn write_access(&self, prefix: &str) -> WriteAccess {
        if !self.in_cluster() {
            return WriteAccess::Now;
        }
        let probe = [prefix, "write-probe"].concat();
        match self.read("PERSIST", &[probe.as_bytes()]) {
            Ok(_) => WriteAccess::Now,
            Err(e) if e.to_string().contains("cluster is down") => WriteAccess::Later,
            Err(_) => WriteAccess::Elsewhere,
        }
    }

    /// In a cluster, refuses a command on a region whose slot is being moved to this node: the
    /// command came after an `ASK`, and only part of the region may have arrived. Redis let
    /// the command in because its caller is `ASKING`; the module's own call on a key of the
    /// region is not (Redis 7.0 refuses it as a non-local key; where a module call inherits
    /// `ASKING`, a two-key read with a key that never exists gets `TRYAGAIN`). Either way the
    /// call fails exactly while the slot is not wholly this node's. Outside a cluster it costs
    /// nothing.
    pub fn region_is_whole_here(&self, prefix: &str) -> MarketResult<()> {
        if !self.in_cluster() {
            return Ok(());
        }
        let counters = [prefix, "stats:market"].concat();
        let probe = [prefix, "moving-probe"].concat();
        match self.read("EXISTS", &[counters.as_bytes(), probe.as_bytes()]) {
            Ok(_) => Ok(()),
            Err(_) => Err(MarketError::TryAgain(format!(
                "region {} is being moved to this node; retry once the move is over",
                prefix
                    .trim_start_matches("gpucache:{")
                    .trim_end_matches("}:")
            ))),
        }
    }

    /// Whether the server is near `maxmemory` (95 % or more of it in use; never without a
    /// limit).
    pub fn memory_is_tight(&self) -> bool {
        // SAFETY: RedisModule_GetUsedMemoryRatio takes no arguments and only reads counters.
        let ratio = unsafe { raw::RedisModule_GetUsedMemoryRatio.map_or(0.0, |f| f()) };
        ratio >= 0.95
    }

    /// Number of entries (stream), fields (hash) or members (set, sorted set) of a key; 0 for a
    /// missing key.
    pub fn length(&self, key: &str) -> usize {
        self.open_read(key).value_length()
    }

    /// A key's remaining time to live in milliseconds (`None` without one, or without the key).
    pub fn ttl_ms(&self, key: &str) -> Option<i64> {
        self.open_read(key).ttl_ms()
    }

    /// Up to `count` entries of a stream from id `start` on (inclusive), oldest first, each as
    /// (id, fields). Fields that are not text are left out.
    pub fn stream_range(
        &self,
        key: &str,
        start: &str,
        count: usize,
    ) -> MarketResult<Vec<StreamEntry>> {
        let count = count.to_string();
        let reply = self.read(
            "XRANGE",
            &[
                key.as_bytes(),
                start.as_bytes(),
                b"+",
                b"COUNT",
                count.as_bytes(),
            ],
        )?;
        let RedisValue::Array(entries) = reply else {
            return Ok(Vec::new());
        };
        Ok(entries
            .iter()
            .filter_map(|entry| {
                let RedisValue::Array(entry) = entry else {
                    return None;
                };
                let id = text(entry.first()?)?;
                let RedisValue::Array(fields) = entry.get(1)? else {
                    return None;
                };
                let pairs = fields
                    .chunks_exact(2)
                    .filter_map(|pair| match pair {
                        [name, value] => Some((text(name)?, text(value)?)),
                        _ => None,
                    })
                    .collect();
                Some((id, pairs))
            })
            .collect())
    }

    /// Whether entries were ever removed from a stream (trimmed or deleted): it then no longer
    /// holds everything appended to it.
    pub fn stream_lost_entries(&self, key: &str) -> MarketResult<bool> {
        let RedisValue::Array(info) = self.read("XINFO", &[b"STREAM", key.as_bytes()])? else {
            return Ok(true);
        };
        let field = |name: &str| {
            info.chunks_exact(2).find_map(|pair| match pair {
                [k, v] if text(k).as_deref() == Some(name) => {
                    text(v).and_then(|v| v.parse::<i64>().ok())
                }
                _ => None,
            })
        };
        Ok(match (field("entries-added"), field("length")) {
            (Some(added), Some(length)) => added > length,
            _ => true,
        })
    }

    /// A stream's last id (`XINFO STREAM`'s `last-generated-id`).
    pub fn stream_last_id(&self, key: &str) -> MarketResult<Option<String>> {
        let RedisValue::Array(info) = self.read("XINFO", &[b"STREAM", key.as_bytes()])? else {
            return Ok(None);
        };
        Ok(info.chunks_exact(2).find_map(|pair| match pair {
            [k, v] if text(k).as_deref() == Some("last-generated-id") => text(v),
            _ => None,
        }))
    }

    /// The region sequence recorded with the newest entry of an event stream (`seq` field), if
    /// that entry has one.
    pub fn last_recorded_seq(&self, events_key: &str) -> MarketResult<Option<i64>> {
        if self.key_type(events_key) != KeyType::Stream {
            return Ok(None);
        }
        let reply = self.read(
            "XREVRANGE",
            &[events_key.as_bytes(), b"+", b"-", b"COUNT", b"1"],
        )?;
        let RedisValue::Array(entries) = reply else {
            return Ok(None);
        };
        let Some(RedisValue::Array(entry)) = entries.first() else {
            return Ok(None);
        };
        let Some(RedisValue::Array(fields)) = entry.get(1) else {
            return Ok(None);
        };
        let mut pairs = fields.chunks_exact(2);
        Ok(pairs.find_map(|pair| match pair {
            [name, value] if text(name).as_deref() == Some("seq") => {
                text(value).and_then(|v| crate::core::version(v.as_bytes()))
            }
            _ => None,
        }))
    }

    pub fn ctx(&self) -> &Context {
        self.ctx
    }

    /// Wall-clock milliseconds, read once per command on the primary.
    pub fn now_ms(&self) -> i64 {
        // SAFETY: RedisModule_Milliseconds takes no arguments and only reads the clock.
        unsafe {
            redis_module::raw::RedisModule_Milliseconds
                .map(|f| f())
                .unwrap_or(0)
        }
    }

    pub fn key_type(&self, key: &str) -> KeyType {
        self.open_read(key).key_type()
    }

    /// Opens a key for reading through the key API (no command round trip, no reply parsing).
    fn open_read(&self, key: &str) -> ReadKey {
        ReadKey::open(self.ctx, key)
    }

    /// Refuses to go on when any key holds a type other than the one gpucache keeps there.
    /// Called before the first write, so a stray `SET` on a gpucache key changes nothing.
    pub fn expect_types(&self, expected: &[(&str, KeyType)]) -> MarketResult<()> {
        for (key, wanted) in expected {
            let actual = self.key_type(key);
            if actual != KeyType::Empty && actual != *wanted {
                return Err(MarketError::WrongType((*key).to_owned()));
            }
        }
        Ok(())
    }

    /// Runs a read command through `RedisModule_Call`. Errors come back as replies (`E`): a read
    /// Redis refuses — the cluster is down, the key's slot is not served here — must fail, not
    /// look like an empty key (the crate's plain `call` turns a refused call into an empty
    /// reply, which a repair would take for lost state).
    fn read(&self, command: &str, args: &[&[u8]]) -> MarketResult<RedisValue> {
        let options = self
            .read_options
            .get_or_init(|| CallOptionsBuilder::new().errors_as_replies().build());
        let result: CallResult = self.ctx.call_ext(command, options, args);
        match result {
            Ok(reply) => Ok((&reply).into()),
            Err(e) => {
                let message = e.to_utf8_string().unwrap_or_default();
                if message.starts_with("WRONGTYPE") {
                    let key = args
                        .first()
                        .map(|k| String::from_utf8_lossy(k).into_owned());
                    Err(MarketError::WrongType(key.unwrap_or_default()))
                } else {
                    Err(MarketError::syntax(format!(
                        "internal read failed: {message}"
                    )))
                }
            }
        }
    }

    pub fn hgetall(&self, key: &str) -> MarketResult<Vec<(Vec<u8>, Vec<u8>)>> {
        let reply = self.read("HGETALL", &[key.as_bytes()])?;
        let RedisValue::Array(items) = reply else {
            return Ok(Vec::new());
        };
        let flat: Vec<Vec<u8>> = items.iter().filter_map(bytes).collect();
        Ok(flat
            .chunks_exact(2)
            .map(|pair| (pair[0].clone(), pair[1].clone()))
            .collect())
    }

    /// One `HSCAN` step over a hash: the cursor to continue with (0: done) and the fields of
    /// this batch (about `count`; a small hash answers whole), those that are UTF-8 (no name
    /// gpucache writes is not). Unlike `scan_hash`, the walk can stop here and resume in a
    /// later call, the hash changing meanwhile.
    pub fn hscan_fields(
        &self,
        key: &str,
        cursor: u64,
        count: usize,
    ) -> MarketResult<(u64, Vec<String>)> {
        let (next, items) = self.scan_step("HSCAN", key, cursor, count)?;
        // Field, value, field, value...: the fields.
        Ok((next, items.iter().step_by(2).filter_map(text).collect()))
    }

    /// One `HSCAN`/`SSCAN` step: the next cursor (0 when the walk is over) and the items read.
    fn scan_step(
        &self,
        command: &str,
        key: &str,
        cursor: u64,
        count: usize,
    ) -> MarketResult<(u64, Vec<RedisValue>)> {
        let cursor = cursor.to_string();
        let count = count.to_string();
        let reply = self.read(
            command,
            &[
                key.as_bytes(),
                cursor.as_bytes(),
                b"COUNT",
                count.as_bytes(),
            ],
        )?;
        let RedisValue::Array(parts) = reply else {
            return Err(MarketError::Corrupt(key.to_owned()));
        };
        let mut parts = parts.into_iter();
        let next = parts
            .next()
            .as_ref()
            .and_then(text)
            .and_then(|c| c.parse::<u64>().ok());
        let (Some(next), Some(RedisValue::Array(items))) = (next, parts.next()) else {
            return Err(MarketError::Corrupt(key.to_owned()));
        };
        Ok((next, items))
    }

    /// Reads hash fields straight from the key (one `RedisModule_HashGet` per 12 fields, no
    /// command round trip) and hands them to `use_values` without copying: the hot read path of
    /// every command. `None` for a missing field (or key); a key of another type is refused.
    pub fn with_hash<T>(
        &self,
        key: &str,
        fields: &[&str],
        use_values: impl FnOnce(&[Option<&[u8]>]) -> T,
    ) -> MarketResult<T> {
        self.with_hash_meta(key, fields, |values, _| use_values(values))
    }

    /// `with_hash`, also handing over the open hash's length and time to live (read only if
    /// asked for).
    pub fn with_hash_meta<T>(
        &self,
        key: &str,
        fields: &[&str],
        use_values: impl FnOnce(&[Option<&[u8]>], HashMeta) -> T,
    ) -> MarketResult<T> {
        let opened = self.open_read(key);
        match opened.key_type() {
            KeyType::Empty | KeyType::Hash => {}
            _ => return Err(MarketError::WrongType(key.to_owned())),
        }
        let meta = HashMeta(&opened);
        if fields.len() <= HASH_GET_BATCH {
            let values = opened.hash_get(fields);
            let mut slices: [Option<&[u8]>; HASH_GET_BATCH] = [None; HASH_GET_BATCH];
            for (slot, value) in slices.iter_mut().zip(values.iter()) {
                *slot = value;
            }
            return Ok(use_values(
                slices.get(..fields.len()).unwrap_or_default(),
                meta,
            ));
        }
        let batches: Vec<FieldValues> = fields
            .chunks(HASH_GET_BATCH)
            .map(|chunk| opened.hash_get(chunk))
            .collect();
        let slices: Vec<Option<&[u8]>> = batches.iter().flat_map(FieldValues::iter).collect();
        Ok(use_values(&slices, meta))
    }

    /// Visits every field of a hash with `RedisModule_ScanKey`: one pass over the hash instead
    /// of a lookup per field (a small hash is a listpack, searched linearly for each field). A
    /// missing key has no fields; another type is refused.
    pub fn scan_hash(&self, key: &str, visit: impl FnMut(&[u8], &[u8])) -> MarketResult<()> {
        self.scan_hash_then(key, visit, |_| ()).map(|_| ())
    }

    /// `scan_hash`, also returning the key's remaining time to live (milliseconds, `None` without
    /// one) from the same lookup.
    pub fn scan_hash_ttl(
        &self,
        key: &str,
        visit: impl FnMut(&[u8], &[u8]),
    ) -> MarketResult<Option<i64>> {
        self.scan_hash_then(key, visit, ReadKey::ttl_ms)
            .map(Option::flatten)
    }

    /// `scan_hash`, then `then` on the open key (`None` for a missing key).
    fn scan_hash_then<T>(
        &self,
        key: &str,
        mut visit: impl FnMut(&[u8], &[u8]),
        then: impl FnOnce(&ReadKey) -> T,
    ) -> MarketResult<Option<T>> {
        let opened = self.open_read(key);
        match opened.key_type() {
            KeyType::Empty => Ok(None),
            KeyType::Hash => {
                if !opened.scan(&mut visit) {
                    return Err(MarketError::Corrupt(key.to_owned()));
                }
                Ok(Some(then(&opened)))
            }
            _ => Err(MarketError::WrongType(key.to_owned())),
        }
    }

    /// Reads hash fields straight from the key. `None` for a missing field; all `None` for a
    /// missing key.
    pub fn hmget(&self, key: &str, fields: &[&str]) -> MarketResult<Vec<Option<Vec<u8>>>> {
        self.with_hash(key, fields, |values| {
            values.iter().map(|v| v.map(<[u8]>::to_vec)).collect()
        })
    }

    pub fn hget(&self, key: &str, field: &str) -> MarketResult<Option<Vec<u8>>> {
        self.with_hash(key, &[field], |values| {
            values.first().copied().flatten().map(<[u8]>::to_vec)
        })
    }

    /// The named fields that are present, as (field, value) pairs.
    pub fn hash_fields(&self, key: &str, fields: &[&str]) -> MarketResult<Vec<(Vec<u8>, Vec<u8>)>> {
        self.with_hash(key, fields, |values| {
            fields
                .iter()
                .zip(values)
                .filter_map(|(field, value)| Some((field.as_bytes().to_vec(), (*value)?.to_vec())))
                .collect()
        })
    }

    /// Number of members of a sorted set (0 when it does not exist), like `ZCARD`.
    pub fn zcard(&self, key: &str) -> MarketResult<i64> {
        let opened = self.open_read(key);
        match opened.key_type() {
            KeyType::Empty => Ok(0),
            KeyType::ZSet => Ok(i64::try_from(opened.value_length()).unwrap_or(i64::MAX)),
            _ => Err(MarketError::WrongType(key.to_owned())),
        }
    }

    pub fn hlen(&self, key: &str) -> MarketResult<i64> {
        self.with_hash_meta(key, &[], |_, meta| {
            i64::try_from(meta.field_count()).unwrap_or(i64::MAX)
        })
    }

    pub fn integer(&self, command: &str, args: &[&[u8]]) -> MarketResult<i64> {
        match self.read(command, args)? {
            RedisValue::Integer(i) => Ok(i),
            _ => Ok(0),
        }
    }

    pub fn zscore(&self, key: &str, member: &str) -> MarketResult<Option<f64>> {
        let opened = self.open_read(key);
        match opened.key_type() {
            KeyType::Empty => Ok(None),
            KeyType::ZSet => Ok(opened.zscore(member)),
            _ => Err(MarketError::WrongType(key.to_owned())),
        }
    }

    /// Opens a lazy walk over a sorted set's members with scores in `[min, max]`, lowest first
    /// (highest first when `descending`): each `ZCursor::next` reads one more member, so a
    /// merge over several sets reads only what it takes. A missing key has no members; another
    /// type is refused.
    pub fn zcursor(
        &self,
        key: &str,
        (min, max): (f64, f64),
        descending: bool,
    ) -> MarketResult<ZCursor<'a>> {
        let opened = self.open_read(key);
        let active = match opened.key_type() {
            KeyType::Empty => false,
            KeyType::ZSet => opened.zset_start((min, false), max, descending),
            _ => return Err(MarketError::WrongType(key.to_owned())),
        };
        Ok(ZCursor {
            key: opened,
            descending,
            active,
            context: PhantomData,
        })
    }

    /// Visits the members of a sorted set with scores from `min` (exclusive when the flag says
    /// so) to `max` inclusive, lowest first (highest first when `descending`), until `visit`
    /// returns false. A missing key has no members; another type is refused.
    pub fn zwalk(
        &self,
        key: &str,
        (min, min_exclusive): (f64, bool),
        max: f64,
        descending: bool,
        visit: impl FnMut(&[u8], f64) -> bool,
    ) -> MarketResult<()> {
        let opened = self.open_read(key);
        match opened.key_type() {
            KeyType::Empty => Ok(()),
            KeyType::ZSet => {
                opened.zset_walk((min, min_exclusive), max, descending, visit);
                Ok(())
            }
            _ => Err(MarketError::WrongType(key.to_owned())),
        }
    }

    /// Up to `limit` members of a sorted set with scores up to `max`, lowest first, as stored.
    pub fn members_up_to(&self, key: &str, max: f64, limit: usize) -> MarketResult<Vec<Vec<u8>>> {
        let mut members = Vec::new();
        self.zwalk(key, (f64::NEG_INFINITY, false), max, false, |member, _| {
            members.push(member.to_vec());
            members.len() < limit
        })?;
        Ok(members)
    }

    /// The lowest score of a sorted set (`None` when it is empty or missing).
    pub fn first_score(&self, key: &str) -> MarketResult<Option<f64>> {
        let mut first = None;
        self.zwalk(
            key,
            (f64::NEG_INFINITY, false),
            f64::INFINITY,
            false,
            |_, score| {
                first = Some(score);
                false
            },
        )?;
        Ok(first)
    }

    fn members_of(&self, command: &str, args: &[&[u8]]) -> MarketResult<Vec<String>> {
        match self.read(command, args)? {
            RedisValue::Array(items) => Ok(items.iter().filter_map(text).collect()),
            _ => Ok(Vec::new()),
        }
    }

    /// Every member of a sorted set with its score, lowest first.
    pub fn members_of_range_with_scores(&self, key: &str) -> MarketResult<Vec<(String, f64)>> {
        let flat = self.members_of("ZRANGE", &[key.as_bytes(), b"0", b"-1", b"WITHSCORES"])?;
        Ok(flat
            .chunks_exact(2)
            .filter_map(|pair| Some((pair[0].clone(), pair[1].parse::<f64>().ok()?)))
            .collect())
    }

    /// Every member of a sorted set, lowest score first.
    pub fn members_of_range(&self, key: &str) -> MarketResult<Vec<String>> {
        self.members_of("ZRANGE", &[key.as_bytes(), b"0", b"-1"])
    }

    /// One `SSCAN` step of a set: the next cursor (0 when the walk is over) and the members
    /// read. Members that are not UTF-8 (written by hand) are skipped.
    pub fn sscan(&self, key: &str, cursor: u64, count: usize) -> MarketResult<(u64, Vec<String>)> {
        let (next, members) = self.scan_step("SSCAN", key, cursor, count)?;
        Ok((next, members.iter().filter_map(text).collect()))
    }

    pub fn members(&self, command: &str, key: &str) -> MarketResult<Vec<String>> {
        self.members_of(command, &[key.as_bytes()])
    }

    fn write_options(&self) -> &CallOptions {
        self.replicated.get_or_init(|| {
            CallOptionsBuilder::new()
                .replicate()
                .errors_as_replies()
                .build()
        })
    }

    /// Runs one replicated write. Every precondition was checked before the first write, so a
    /// failure here is a bug: it is logged rather than turned into a half-applied reply.
    pub fn write(&self, command: &str, args: &[&[u8]]) {
        if let Some(key) = args.first() {
            self.mark_written(&String::from_utf8_lossy(key));
        }
        let outcome = match replicated_call(self.ctx, command, args) {
            Some(outcome) => outcome,
            None => {
                let result: CallResult = self.ctx.call_ext(command, self.write_options(), args);
                result
                    .map(|_| ())
                    .map_err(|e| e.to_utf8_string().unwrap_or_default())
            }
        };
        if let Err(message) = outcome {
            self.failed_writes
                .set(self.failed_writes.get().saturating_add(1));
            crate::log(
                self.ctx,
                redis_module::logging::RedisLogLevel::Warning,
                &format!("gpucache: replicated {command} failed after validation: {message}"),
            );
        }
    }

    /// Replicates a `PING`: a command that writes nothing still moves the replication offset its
    /// client's `WAIT` waits for. From Redis 7.2 `WAIT` counts only the client's own replicated
    /// writes, so without it a retried `BOOK` answered `existing` on a fresh connection could be
    /// confirmed durable before the original booking reached any replica.
    pub fn replicate_noop(&self) {
        let no_args: [&[u8]; 0] = [];
        self.ctx.replicate("PING", &no_args[..]);
    }

    /// Records a key as changed by this command without writing it (its derived view changed).
    pub fn mark_written(&self, key: &str) {
        let mut written = self.written.borrow_mut();
        // A command writes a few keys: a scan. A repair may write 100,000: an index past that.
        if written.len() < WRITTEN_SCANNED {
            if !written.iter().any(|k| k == key) {
                written.push(key.to_owned());
            }
            return;
        }
        let mut index = self.written_index.borrow_mut();
        let index = index.get_or_insert_with(|| written.iter().cloned().collect());
        if index.insert(key.to_owned()) {
            written.push(key.to_owned());
        }
    }

    pub fn written_keys(&self) -> Vec<String> {
        self.written.borrow().clone()
    }

    pub fn hset(&self, key: &str, fields: &[(&str, String)]) {
        let mut args: Vec<&[u8]> = Vec::with_capacity(1 + fields.len() * 2);
        args.push(key.as_bytes());
        for (name, value) in fields {
            args.push(name.as_bytes());
            args.push(value.as_bytes());
        }
        self.write("HSET", &args);
    }

    /// Sets an absolute expiry, so the replica and the AOF get the instant, not a duration.
    pub fn pexpire_at(&self, key: &str, at_ms: i64) {
        self.write("PEXPIREAT", &[key.as_bytes(), at_ms.to_string().as_bytes()]);
    }

    /// Fires a module keyspace event (class `d`) on `key`.
    pub fn notify(&self, event: &str, key: &str) {
        // Event names are short constants: a NUL-terminated copy on the stack and a raw key
        // string, instead of the crate's CString and RedisString per call (~1.3k instructions,
        // eight or more times per write command).
        let mut name = [0u8; 48];
        if event.as_bytes().contains(&0) {
            // Not a valid event name (and the crate's path would panic on it).
            return;
        }
        if event.len() >= name.len() {
            let key = self.ctx.create_string(key);
            let _ = self
                .ctx
                .notify_keyspace_event(NotifyEvent::MODULE, event, &key);
            return;
        }
        let Some(slot) = name.get_mut(..event.len()) else {
            return;
        };
        slot.copy_from_slice(event.as_bytes());
        let ctx = self.ctx.get_raw();
        // SAFETY: plain module API calls on the command's context: `name` is NUL-terminated,
        // the key string is created, passed and freed here.
        unsafe {
            let (Some(create), Some(notify), Some(free)) = (
                raw::RedisModule_CreateString,
                raw::RedisModule_NotifyKeyspaceEvent,
                raw::RedisModule_FreeString,
            ) else {
                return;
            };
            let keyname = create(ctx, key.as_ptr().cast::<c_char>(), key.len());
            if keyname.is_null() {
                return;
            }
            notify(
                ctx,
                NotifyEvent::MODULE.bits(),
                name.as_ptr().cast::<c_char>(),
                keyname,
            );
            free(ctx, keyname);
        }
    }
}

/// The db a context works in (keyspace events arrive in the db of their key).
pub fn selected_db(ctx: &Context) -> i32 {
    // SAFETY: RedisModule_GetSelectedDb only reads the context's client, which is valid for the
    // duration of this callback.
    unsafe {
        redis_module::raw::RedisModule_GetSelectedDb
            .map(|f| f(ctx.get_raw()))
            .unwrap_or(0)
    }
}

/// Written keys checked by a scan before `mark_written` keeps an index of them.
const WRITTEN_SCANNED: usize = 32;

pub fn select_db(ctx: &Context, db: i32) -> bool {
    // SAFETY: RedisModule_SelectDb switches the context's client to another db; it returns an
    // error for an invalid index, which leaves the client where it was.
    unsafe {
        redis_module::raw::RedisModule_SelectDb
            .map(|f| f(ctx.get_raw(), db) == redis_module::raw::REDISMODULE_OK as i32)
            .unwrap_or(false)
    }
}

/// What `with_hash_meta` can tell of the open hash besides its fields, read when asked for.
pub struct HashMeta<'k>(&'k ReadKey);

impl HashMeta<'_> {
    /// Number of fields (0 for a missing key).
    pub fn field_count(&self) -> usize {
        self.0.value_length()
    }

    /// Remaining time to live in milliseconds, `None` without one (or without the key).
    pub fn ttl_ms(&self) -> Option<i64> {
        self.0.ttl_ms()
    }
}

/// How many fields one `RedisModule_HashGet` call reads (its variadic call below has this many
/// field/value slots).
const HASH_GET_BATCH: usize = 12;

/// A key opened read-only with `RedisModule_OpenKey` (NULL when it does not exist), closed on
/// drop. Opening looks the key up as any read command does (expiring it if its time passed).
struct ReadKey {
    ctx: *mut raw::RedisModuleCtx,
    key: *mut raw::RedisModuleKey,
}

/// Values read by one `RedisModule_HashGet` call, freed on drop.
struct FieldValues {
    ctx: *mut raw::RedisModuleCtx,
    values: [*mut raw::RedisModuleString; HASH_GET_BATCH],
    len: usize,
}

/// The bytes of a module string, `None` for NULL.
///
/// # Safety
/// `s` must be NULL or a live `RedisModuleString`; the slice is valid while it lives.
pub(crate) unsafe fn string_bytes<'a>(s: *const raw::RedisModuleString) -> Option<&'a [u8]> {
    if s.is_null() {
        return None;
    }
    let ptr_len = raw::RedisModule_StringPtrLen?;
    let mut len = 0usize;
    let ptr = ptr_len(s, &mut len);
    if ptr.is_null() || len == 0 {
        return Some(&[]);
    }
    Some(std::slice::from_raw_parts(ptr.cast::<u8>(), len))
}

impl ReadKey {
    fn open(ctx: &Context, name: &str) -> ReadKey {
        let ctx = ctx.get_raw();
        // SAFETY: plain module API calls on the command's context; the key name string is
        // released right after opening (RedisModule_OpenKey keeps its own reference).
        let key = unsafe {
            match (
                raw::RedisModule_CreateString,
                raw::RedisModule_OpenKey,
                raw::RedisModule_FreeString,
            ) {
                (Some(create), Some(open), Some(free)) => {
                    let keyname = create(ctx, name.as_ptr().cast::<c_char>(), name.len());
                    if keyname.is_null() {
                        std::ptr::null_mut()
                    } else {
                        let key = open(ctx, keyname, raw::REDISMODULE_READ as c_int);
                        free(ctx, keyname);
                        key
                    }
                }
                _ => std::ptr::null_mut(),
            }
        };
        ReadKey { ctx, key }
    }

    fn key_type(&self) -> KeyType {
        if self.key.is_null() {
            return KeyType::Empty;
        }
        // SAFETY: `self.key` is an open key.
        unsafe { raw::RedisModule_KeyType.map_or(KeyType::Empty, |f| KeyType::from(f(self.key))) }
    }

    fn value_length(&self) -> usize {
        if self.key.is_null() {
            return 0;
        }
        // SAFETY: `self.key` is an open key.
        unsafe { raw::RedisModule_ValueLength.map_or(0, |f| f(self.key)) }
    }

    /// Milliseconds to live; `None` without an expiry (or key).
    fn ttl_ms(&self) -> Option<i64> {
        if self.key.is_null() {
            return None;
        }
        // SAFETY: `self.key` is an open key.
        let ttl = unsafe { raw::RedisModule_GetExpire.map_or(-1, |f| f(self.key)) };
        (ttl >= 0).then_some(ttl)
    }

    /// The score of `member` in this sorted set (the caller checked the type).
    fn zscore(&self, member: &str) -> Option<f64> {
        if self.key.is_null() {
            return None;
        }
        // SAFETY: `self.key` is an open sorted set; the member string is freed after use.
        unsafe {
            let (create, score_of, free) = (
                raw::RedisModule_CreateString?,
                raw::RedisModule_ZsetScore?,
                raw::RedisModule_FreeString?,
            );
            let ele = create(self.ctx, member.as_ptr().cast::<c_char>(), member.len());
            if ele.is_null() {
                return None;
            }
            let mut score = 0.0f64;
            let found = score_of(self.key, ele, &mut score) == raw::REDISMODULE_OK as c_int;
            free(self.ctx, ele);
            found.then_some(score)
        }
    }

    /// Up to `HASH_GET_BATCH` fields of this hash (the caller checked the type) in one
    /// `RedisModule_HashGet` call. A field name with a NUL byte cannot be passed as a C string
    /// and reads as missing.
    fn hash_get(&self, fields: &[&str]) -> FieldValues {
        let len = fields.len().min(HASH_GET_BATCH);
        let mut out = FieldValues {
            ctx: self.ctx,
            values: [std::ptr::null_mut(); HASH_GET_BATCH],
            len,
        };
        // SAFETY: reading a function pointer the module API filled in at load time.
        let hash_get = unsafe { raw::RedisModule_HashGet };
        let (false, Some(hash_get)) = (self.key.is_null(), hash_get) else {
            return out;
        };
        // NUL-terminated copies of the names in one buffer; a NULL name ends the list.
        let fields = fields.get(..len).unwrap_or_default();
        let mut buffer: Vec<u8> = Vec::with_capacity(fields.iter().map(|f| f.len() + 1).sum());
        let mut starts = [None; HASH_GET_BATCH];
        for (start, field) in starts.iter_mut().zip(fields) {
            if !field.as_bytes().contains(&0) {
                *start = Some(buffer.len());
                buffer.extend_from_slice(field.as_bytes());
                buffer.push(0);
            }
        }
        let mut names = [std::ptr::null::<c_char>(); HASH_GET_BATCH];
        for (name, start) in names.iter_mut().zip(starts) {
            if let Some(rest) = start.and_then(|s| buffer.get(s..)) {
                *name = rest.as_ptr().cast::<c_char>();
            }
        }
        let flags = raw::REDISMODULE_HASH_CFIELDS as c_int;
        let end = std::ptr::null::<c_char>();
        let n = names;
        let v = out.values.as_mut_ptr();
        // SAFETY: `self.key` is an open key holding a hash; every name is NULL or a
        // NUL-terminated string in `buffer`, which outlives the calls; a NULL name ends the
        // variadic list; each value slot is a `*mut RedisModuleString` out-pointer into
        // `out.values` (HASH_GET_BATCH of them).
        unsafe {
            if starts.iter().take(len).all(Option::is_some) {
                hash_get(
                    self.key,
                    flags,
                    n[0],
                    v,
                    n[1],
                    v.add(1),
                    n[2],
                    v.add(2),
                    n[3],
                    v.add(3),
                    n[4],
                    v.add(4),
                    n[5],
                    v.add(5),
                    n[6],
                    v.add(6),
                    n[7],
                    v.add(7),
                    n[8],
                    v.add(8),
                    n[9],
                    v.add(9),
                    n[10],
                    v.add(10),
                    n[11],
                    v.add(11),
                    end,
                );
            } else {
                // A skipped name must not end the list early: one field per call.
                for (i, name) in n.iter().enumerate().take(len) {
                    if !name.is_null() {
                        hash_get(self.key, flags, *name, v.add(i), end);
                    }
                }
            }
        }
        out
    }
}

impl ReadKey {
    /// Walks this sorted set (the caller checked the type) over a score range with the key
    /// API's range iterator, until `visit` returns false or the range ends.
    fn zset_walk(
        &self,
        (min, min_exclusive): (f64, bool),
        max: f64,
        descending: bool,
        mut visit: impl FnMut(&[u8], f64) -> bool,
    ) {
        if self.key.is_null() {
            return;
        }
        // SAFETY: `self.key` is an open sorted set; the iterator is started and stopped here,
        // and each element string is freed right after `visit` borrowed it.
        unsafe {
            let (Some(first), Some(last), Some(next), Some(prev)) = (
                raw::RedisModule_ZsetFirstInScoreRange,
                raw::RedisModule_ZsetLastInScoreRange,
                raw::RedisModule_ZsetRangeNext,
                raw::RedisModule_ZsetRangePrev,
            ) else {
                return;
            };
            let (Some(current), Some(end_reached), Some(stop), Some(free)) = (
                raw::RedisModule_ZsetRangeCurrentElement,
                raw::RedisModule_ZsetRangeEndReached,
                raw::RedisModule_ZsetRangeStop,
                raw::RedisModule_FreeString,
            ) else {
                return;
            };
            let start = if descending { last } else { first };
            let min_exclusive = c_int::from(min_exclusive);
            if start(self.key, min, max, min_exclusive, 0) != raw::REDISMODULE_OK as c_int {
                return;
            }
            while end_reached(self.key) == 0 {
                let mut score = 0.0f64;
                let element = current(self.key, &mut score);
                let Some(member) = string_bytes(element) else {
                    break;
                };
                let go_on = visit(member, score);
                free(self.ctx, element);
                if !go_on {
                    break;
                }
                let more = if descending {
                    prev(self.key)
                } else {
                    next(self.key)
                };
                if more == 0 {
                    break;
                }
            }
            stop(self.key);
        }
    }
}

/// A walk over a sorted set opened by `Store::zcursor`; the key stays open until it is dropped,
/// which the lifetime keeps within the command (its context) that opened it.
pub struct ZCursor<'a> {
    key: ReadKey,
    descending: bool,
    /// The range iterator is started and not at its end.
    active: bool,
    context: PhantomData<&'a Context>,
}

impl ZCursor<'_> {
    /// The next member (as text) and its score. A member that is not UTF-8 (written by hand;
    /// GPU ids are ASCII) is skipped.
    pub fn next_member(&mut self) -> Option<(String, f64)> {
        while self.active {
            let element = self.key.zset_current();
            self.active = self.key.zset_advance(self.descending);
            let Some((member, score)) = element else {
                self.active = false;
                break;
            };
            if let Ok(member) = String::from_utf8(member) {
                return Some((member, score));
            }
        }
        None
    }
}

impl Drop for ZCursor<'_> {
    fn drop(&mut self) {
        self.key.zset_stop();
    }
}

impl ReadKey {
    /// Starts the key API's range iterator (the caller checked the type); false when the range
    /// is empty.
    fn zset_start(&self, (min, min_exclusive): (f64, bool), max: f64, descending: bool) -> bool {
        if self.key.is_null() {
            return false;
        }
        // SAFETY: `self.key` is an open sorted set.
        unsafe {
            let start = if descending {
                raw::RedisModule_ZsetLastInScoreRange
            } else {
                raw::RedisModule_ZsetFirstInScoreRange
            };
            let (Some(start), Some(end_reached)) = (start, raw::RedisModule_ZsetRangeEndReached)
            else {
                return false;
            };
            start(self.key, min, max, c_int::from(min_exclusive), 0) == raw::REDISMODULE_OK as c_int
                && end_reached(self.key) == 0
        }
    }

    /// The element the started iterator is on, copied out.
    fn zset_current(&self) -> Option<(Vec<u8>, f64)> {
        if self.key.is_null() {
            return None;
        }
        // SAFETY: `self.key` is an open sorted set with a started iterator; the element string
        // is copied and freed here.
        unsafe {
            let (current, free) = (
                raw::RedisModule_ZsetRangeCurrentElement?,
                raw::RedisModule_FreeString?,
            );
            let mut score = 0.0f64;
            let element = current(self.key, &mut score);
            let member = string_bytes(element)?.to_vec();
            free(self.ctx, element);
            Some((member, score))
        }
    }

    /// Moves the started iterator on; false at the end of the range.
    fn zset_advance(&self, descending: bool) -> bool {
        if self.key.is_null() {
            return false;
        }
        // SAFETY: `self.key` is an open sorted set with a started iterator.
        unsafe {
            let step = if descending {
                raw::RedisModule_ZsetRangePrev
            } else {
                raw::RedisModule_ZsetRangeNext
            };
            step.is_some_and(|step| step(self.key) != 0)
        }
    }

    /// Stops the range iterator (harmless when none was started).
    fn zset_stop(&self) {
        if self.key.is_null() {
            return;
        }
        // SAFETY: `self.key` is an open key; stopping an idle iterator does nothing.
        unsafe {
            if let Some(stop) = raw::RedisModule_ZsetRangeStop {
                stop(self.key);
            }
        }
    }
}

/// What `scan_callback` gets behind `privdata`: the visitor, and whether it panicked.
struct ScanState<'v> {
    visit: &'v mut dyn FnMut(&[u8], &[u8]),
    panicked: bool,
}

/// `RedisModuleScanKeyCB` handing each field and value to the visitor behind `privdata`.
///
/// # Safety
/// `privdata` must point to a live `ScanState`; `field` and `value` are NULL or strings Redis
/// keeps alive for the duration of the call.
unsafe extern "C" fn scan_callback(
    _key: *mut raw::RedisModuleKey,
    field: *mut raw::RedisModuleString,
    value: *mut raw::RedisModuleString,
    privdata: *mut std::ffi::c_void,
) {
    let state = &mut *privdata.cast::<ScanState>();
    if state.panicked {
        return;
    }
    // A set's members come as fields without a value.
    if let Some(field) = string_bytes(field) {
        let value = string_bytes(value).unwrap_or_default();
        // Unwinding out of a function Redis called aborts the server. A visitor that panics
        // marks the whole read as failed: half a record must never be stored back.
        let visit = &mut state.visit;
        if std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| visit(field, value))).is_err() {
            state.panicked = true;
        }
    }
}

impl ReadKey {
    /// Every field and value of this hash, or member of this set (with an empty value), through
    /// `RedisModule_ScanKey` until the cursor is done (the caller checked the type). False when
    /// the visitor panicked (what it saw is incomplete) or the scan could not run.
    #[must_use]
    fn scan(&self, visit: &mut dyn FnMut(&[u8], &[u8])) -> bool {
        if self.key.is_null() {
            return true;
        }
        // SAFETY: `self.key` is an open hash or set; the cursor is created and destroyed here; the
        // callback gets a pointer to `state`, which outlives every ScanKey call, and only reads
        // the field and value strings during the call.
        unsafe {
            let (Some(create), Some(scan), Some(destroy)) = (
                raw::RedisModule_ScanCursorCreate,
                raw::RedisModule_ScanKey,
                raw::RedisModule_ScanCursorDestroy,
            ) else {
                return false;
            };
            let cursor = create();
            if cursor.is_null() {
                return false;
            }
            let mut state = ScanState {
                visit,
                panicked: false,
            };
            let privdata = std::ptr::addr_of_mut!(state).cast::<std::ffi::c_void>();
            while scan(self.key, cursor, Some(scan_callback), privdata) != 0 {}
            destroy(cursor);
            !state.panicked
        }
    }
}

impl Drop for ReadKey {
    fn drop(&mut self) {
        if !self.key.is_null() {
            // SAFETY: the key was opened by `ReadKey::open` and is closed once.
            unsafe {
                if let Some(close) = raw::RedisModule_CloseKey {
                    close(self.key);
                }
            }
        }
    }
}

impl FieldValues {
    fn iter(&self) -> impl Iterator<Item = Option<&[u8]>> {
        self.values
            .iter()
            .take(self.len)
            // SAFETY: each value is NULL or a string returned by RedisModule_HashGet, alive
            // until `self` is dropped.
            .map(|v| unsafe { string_bytes(*v) })
    }
}

impl Drop for FieldValues {
    fn drop(&mut self) {
        // SAFETY: each non-NULL value was returned by RedisModule_HashGet and is freed once.
        unsafe {
            if let Some(free) = raw::RedisModule_FreeString {
                for v in self.values.iter().filter(|v| !v.is_null()) {
                    free(self.ctx, *v);
                }
            }
        }
    }
}

/// Most arguments `replicated_call` passes in one variadic call; longer writes go through the
/// crate's `call_ext`.
const CALL_MAX_ARGS: usize = 24;

/// `RedisModule_Call(ctx, command, "!E" + "b" x n, ptr, len, ...)`: a replicated write with
/// errors as replies, its arguments passed as (pointer, length) buffers. The same call the
/// crate's `call_ext` makes with the same flags, without building a `RedisModuleString` per
/// argument on our side, a `CString` for the name or a `CallReply` wrapper. `None` when it
/// cannot be made this way (too many arguments, a name with a NUL byte, no API).
fn replicated_call(ctx: &Context, command: &str, args: &[&[u8]]) -> Option<Result<(), String>> {
    if args.len() > CALL_MAX_ARGS || command.len() >= 32 || command.as_bytes().contains(&0) {
        return None;
    }
    // SAFETY: reading function pointers the module API filled in at load time.
    let (call, reply_type, reply_text, free_reply) = unsafe {
        (
            raw::RedisModule_Call?,
            raw::RedisModule_CallReplyType?,
            raw::RedisModule_CallReplyStringPtr?,
            raw::RedisModule_FreeCallReply?,
        )
    };
    let mut name = [0u8; 32];
    name.get_mut(..command.len())?
        .copy_from_slice(command.as_bytes());
    // "!E" then one 'b' per argument, NUL-terminated.
    let mut fmt = [0u8; 3 + CALL_MAX_ARGS];
    fmt[0] = b'!';
    fmt[1] = b'E';
    for slot in fmt.iter_mut().skip(2).take(args.len()) {
        *slot = b'b';
    }
    let mut p = [std::ptr::null::<c_char>(); CALL_MAX_ARGS];
    let mut l = [0usize; CALL_MAX_ARGS];
    for ((ptr, len), arg) in p.iter_mut().zip(l.iter_mut()).zip(args) {
        *ptr = arg.as_ptr().cast::<c_char>();
        *len = arg.len();
    }
    // SAFETY: `name` and `fmt` are NUL-terminated; the format names exactly `args.len()`
    // (pointer, length) pairs, each pointing into a live argument slice; Redis reads only as many
    // variadic arguments as the format names, so the unused (NULL, 0) slots are never read. The
    // reply is freed here.
    unsafe {
        let reply = call(
            ctx.get_raw(),
            name.as_ptr().cast::<c_char>(),
            fmt.as_ptr().cast::<c_char>(),
            p[0],
            l[0],
            p[1],
            l[1],
            p[2],
            l[2],
            p[3],
            l[3],
            p[4],
            l[4],
            p[5],
            l[5],
            p[6],
            l[6],
            p[7],
            l[7],
            p[8],
            l[8],
            p[9],
            l[9],
            p[10],
            l[10],
            p[11],
            l[11],
            p[12],
            l[12],
            p[13],
            l[13],
            p[14],
            l[14],
            p[15],
            l[15],
            p[16],
            l[16],
            p[17],
            l[17],
            p[18],
            l[18],
            p[19],
            l[19],
            p[20],
            l[20],
            p[21],
            l[21],
            p[22],
            l[22],
            p[23],
            l[23],
        );
        if reply.is_null() {
            return Some(Err(String::from("the call was refused")));
        }
        let outcome = if reply_type(reply) == raw::REDISMODULE_REPLY_ERROR as c_int {
            let mut len = 0usize;
            let text = reply_text(reply, &mut len);
            let message = if text.is_null() {
                String::from("error reply")
            } else {
                String::from_utf8_lossy(std::slice::from_raw_parts(text.cast::<u8>(), len))
                    .into_owned()
            };
            Err(message)
        } else {
            Ok(())
        };
        free_reply(reply);
        Some(outcome)
    }
}

// Reads through the key API for commands that must answer on a cluster replica without
// `READONLY` (where `RedisModule_Call` of a keyed read is redirected and fails): `GPUCACHE.STATS`.
impl Store<'_> {
    /// Every member of a set (none for a missing key), through `RedisModule_ScanKey` rather
    /// than an `SMEMBERS` call. Members that are not UTF-8 (written by hand) are skipped; another
    /// type is refused.
    pub fn set_members(&self, key: &str) -> MarketResult<Vec<String>> {
        let mut members = Vec::new();
        self.scan_set(key, |member| {
            if let Ok(member) = std::str::from_utf8(member) {
                members.push(member.to_owned());
            }
        })?;
        Ok(members)
    }

    /// Visits every member of a set as stored, with `RedisModule_ScanKey`. A missing key has no
    /// members; another type is refused.
    pub fn scan_set(&self, key: &str, mut visit: impl FnMut(&[u8])) -> MarketResult<()> {
        let opened = self.open_read(key);
        match opened.key_type() {
            KeyType::Empty => Ok(()),
            KeyType::Set => {
                if !opened.scan(&mut |member, _| visit(member)) {
                    return Err(MarketError::Corrupt(key.to_owned()));
                }
                Ok(())
            }
            _ => Err(MarketError::WrongType(key.to_owned())),
        }
    }

    /// The lowest-scored member of a sorted set and its score, through the key API's range
    /// iterator rather than a `ZRANGE` call. A member that is not UTF-8 reads as
    /// none; another type is refused.
    pub fn zset_first(&self, key: &str) -> MarketResult<Option<(String, f64)>> {
        let mut first = None;
        self.zwalk(
            key,
            (f64::NEG_INFINITY, false),
            f64::INFINITY,
            false,
            |member, score| {
                first = std::str::from_utf8(member)
                    .ok()
                    .map(|m| (m.to_owned(), score));
                false
            },
        )?;
        Ok(first)
    }
}
