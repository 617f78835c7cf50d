//! Thin access to Redis from inside a command: typed reads, replicated writes, notifications.
//!
//! Writes go through `RM_Call` with the `!` flag, so Redis itself propagates each concrete
//! effect (`HSET`, `ZADD`, `PEXPIREAT` with an absolute time, `XADD` with the id it chose) to
//! replicas and the AOF, wrapped with the rest of the command in one `MULTI/EXEC`. Nothing a
//! replica or an AOF replay executes draws a random number or reads the clock.

use crate::core::error::{MarketError, MarketResult};
use redis_module::{
    CallOptions, CallOptionsBuilder, CallResult, Context, KeyType, NotifyEvent, RedisValue,
};
use std::cell::{OnceCell, RefCell};

pub struct Store<'a> {
    ctx: &'a Context,
    replicated: OnceCell<CallOptions>,
    /// Keys written so far, in first-write order: they receive this command's notification.
    written: RefCell<Vec<String>>,
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
            written: RefCell::new(Vec::new()),
        }
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
        let name = self.ctx.create_string(key);
        self.ctx.open_key(&name).key_type()
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

    fn read(&self, command: &str, args: &[&[u8]]) -> MarketResult<RedisValue> {
        self.ctx.call(command, args).map_err(|e| {
            let message = e.to_string();
            if message.starts_with("WRONGTYPE") {
                let key = args
                    .first()
                    .map(|k| String::from_utf8_lossy(k).into_owned());
                MarketError::WrongType(key.unwrap_or_default())
            } else {
                MarketError::syntax(format!("internal read failed: {message}"))
            }
        })
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

    /// Reads hash fields straight from the key (no command round trip): the hot read path of
    /// every command. `None` for a missing field; an empty result for a missing key.
    pub fn hmget(&self, key: &str, fields: &[&str]) -> MarketResult<Vec<Option<Vec<u8>>>> {
        let name = self.ctx.create_string(key);
        let opened = self.ctx.open_key(&name);
        match opened.key_type() {
            KeyType::Empty => return Ok(vec![None; fields.len()]),
            KeyType::Hash => {}
            _ => return Err(MarketError::WrongType(key.to_owned())),
        }
        fields
            .iter()
            .map(|field| {
                opened
                    .hash_get(field)
                    .map(|value| value.map(|v| v.as_slice().to_vec()))
                    .map_err(|_| MarketError::WrongType(key.to_owned()))
            })
            .collect()
    }

    pub fn hget(&self, key: &str, field: &str) -> MarketResult<Option<Vec<u8>>> {
        Ok(self.hmget(key, &[field])?.pop().flatten())
    }

    /// The named fields that are present, as (field, value) pairs.
    pub fn hash_fields(&self, key: &str, fields: &[&str]) -> MarketResult<Vec<(Vec<u8>, Vec<u8>)>> {
        let values = self.hmget(key, fields)?;
        Ok(fields
            .iter()
            .zip(values)
            .filter_map(|(field, value)| Some((field.as_bytes().to_vec(), value?)))
            .collect())
    }

    pub fn hlen(&self, key: &str) -> MarketResult<i64> {
        self.integer("HLEN", &[key.as_bytes()])
    }

    pub fn integer(&self, command: &str, args: &[&[u8]]) -> MarketResult<i64> {
        match self.read(command, args)? {
            RedisValue::Integer(i) => Ok(i),
            _ => Ok(0),
        }
    }

    pub fn zscore(&self, key: &str, member: &str) -> MarketResult<Option<f64>> {
        let reply = self.read("ZSCORE", &[key.as_bytes(), member.as_bytes()])?;
        Ok(text(&reply).and_then(|s| s.parse::<f64>().ok()))
    }

    /// Members with their scores in `[min, max]`, `count` of them from `offset`: lowest first,
    /// or highest first when `descending` (then `min`/`max` are still the bounds).
    pub fn zrange_by_score_page(
        &self,
        key: &str,
        (min, max): (&str, &str),
        descending: bool,
        offset: usize,
        count: usize,
    ) -> MarketResult<Vec<(String, f64)>> {
        let (offset, count) = (offset.to_string(), count.to_string());
        let (start, stop) = if descending { (max, min) } else { (min, max) };
        let mut args: Vec<&[u8]> = vec![
            key.as_bytes(),
            start.as_bytes(),
            stop.as_bytes(),
            b"BYSCORE",
        ];
        if descending {
            args.push(b"REV");
        }
        args.extend([
            &b"LIMIT"[..],
            offset.as_bytes(),
            count.as_bytes(),
            b"WITHSCORES",
        ]);
        let flat = self.members_of("ZRANGE", &args)?;
        Ok(flat
            .chunks_exact(2)
            .filter_map(|pair| Some((pair[0].clone(), pair[1].parse::<f64>().ok()?)))
            .collect())
    }

    /// The lowest-scored member at or above `min` (a `ZRANGE` bound such as `2.5` or `(2.5`),
    /// with its score exactly as Redis prints it.
    pub fn zfirst_from(&self, key: &str, min: &str) -> MarketResult<Option<(String, String)>> {
        let reply = self.read(
            "ZRANGE",
            &[
                key.as_bytes(),
                min.as_bytes(),
                b"+inf",
                b"BYSCORE",
                b"LIMIT",
                b"0",
                b"1",
                b"WITHSCORES",
            ],
        )?;
        let RedisValue::Array(items) = reply else {
            return Ok(None);
        };
        let mut items = items.iter().filter_map(text);
        Ok(items.next().zip(items.next()))
    }

    /// The first member and score of a sorted set (its cheapest entry).
    pub fn zfirst(&self, key: &str) -> MarketResult<Option<(String, f64)>> {
        let reply = self.read("ZRANGE", &[key.as_bytes(), b"0", b"0", b"WITHSCORES"])?;
        let RedisValue::Array(items) = reply else {
            return Ok(None);
        };
        let mut items = items.iter().filter_map(text);
        match (
            items.next(),
            items.next().and_then(|s| s.parse::<f64>().ok()),
        ) {
            (Some(member), Some(score)) => Ok(Some((member, score))),
            _ => Ok(None),
        }
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

    pub fn members(&self, command: &str, key: &str) -> MarketResult<Vec<String>> {
        self.members_of(command, &[key.as_bytes()])
    }

    /// Milliseconds left before `key` expires; `None` when it has no expiry or does not exist.
    pub fn pttl(&self, key: &str) -> MarketResult<Option<i64>> {
        let ttl = self.integer("PTTL", &[key.as_bytes()])?;
        Ok((ttl >= 0).then_some(ttl))
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
        let result: CallResult = self.ctx.call_ext(command, self.write_options(), args);
        if let Err(e) = result {
            let message = e.to_utf8_string().unwrap_or_default();
            crate::log(
                self.ctx,
                redis_module::logging::RedisLogLevel::Warning,
                &format!("gpucache: replicated {command} failed after validation: {message}"),
            );
        }
    }

    /// Records a key as changed by this command without writing it (its derived view changed).
    pub fn mark_written(&self, key: &str) {
        let mut written = self.written.borrow_mut();
        if !written.iter().any(|k| k == key) {
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

    pub fn notify(&self, event: &str, key: &str) {
        let name = self.ctx.create_string(key);
        let _ = self
            .ctx
            .notify_keyspace_event(NotifyEvent::MODULE, event, &name);
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

pub fn select_db(ctx: &Context, db: i32) -> bool {
    // SAFETY: RedisModule_SelectDb switches the context's client to another db; it returns an
    // error for an invalid index, which leaves the client where it was.
    unsafe {
        redis_module::raw::RedisModule_SelectDb
            .map(|f| f(ctx.get_raw(), db) == redis_module::raw::REDISMODULE_OK as i32)
            .unwrap_or(false)
    }
}
