//! One file per command family: parse arguments into typed requests, read, ask the core, write,
//! reply. No marketplace rule lives here; they are in `crate::core`.

pub mod available;
pub mod book;
pub mod check;
pub mod get;
pub mod invalidate;
pub mod orderbook;
pub mod price;
pub mod provider;
pub mod register;
pub mod repair;
pub mod stats;
pub mod status;

use crate::core::error::{MarketError, MarketResult};
use crate::core::input;
use crate::store::Store;
use redis_module::redisvalue::RedisValueKey;
use redis_module::{Context, RedisError, RedisResult, RedisString, RedisValue};
use std::collections::BTreeMap;

/// Positional access to a command's arguments (after the command name).
pub struct Args<'a> {
    items: &'a [RedisString],
    pos: usize,
}

impl<'a> Args<'a> {
    /// Checks the argument count against `min..=max` (not counting the command name).
    pub fn new(all: &'a [RedisString], min: usize, max: usize) -> MarketResult<Args<'a>> {
        let items = all.get(1..).unwrap_or_default();
        if items.len() < min || items.len() > max {
            let name = all
                .first()
                .map(|n| input::shown(n.as_slice(), 64).to_lowercase())
                .unwrap_or_default();
            return Err(MarketError::syntax(format!(
                "wrong number of arguments for '{name}' command"
            )));
        }
        Ok(Args { items, pos: 0 })
    }

    pub fn next_arg(&mut self) -> Option<&'a [u8]> {
        let item = self.items.get(self.pos)?;
        self.pos += 1;
        Some(item.as_slice())
    }

    /// The next argument, which the arity check guarantees is present.
    pub fn required(&mut self, what: &str) -> MarketResult<&'a [u8]> {
        self.next_arg()
            .ok_or_else(|| MarketError::syntax(format!("missing {what}")))
    }

    pub fn region(&mut self) -> MarketResult<String> {
        input::region(self.required("region")?)
    }

    pub fn id(&mut self, what: &str) -> MarketResult<String> {
        input::id(what, self.required(what)?)
    }

    pub fn remaining(&mut self) -> Vec<&'a [u8]> {
        let rest = self.items.get(self.pos..).unwrap_or_default();
        self.pos = self.items.len();
        rest.iter().map(RedisString::as_slice).collect()
    }
}

/// Option names are case-insensitive, like Redis's own.
pub fn option_is(arg: &[u8], name: &str) -> bool {
    arg.eq_ignore_ascii_case(name.as_bytes())
}

pub fn unknown_option(arg: &[u8]) -> MarketError {
    MarketError::syntax(format!("unknown option '{}'", input::shown(arg, 64)))
}

/// Turns a command body into a Redis reply, mapping marketplace errors to error replies.
pub fn run(
    ctx: &Context,
    args: &[RedisString],
    body: impl FnOnce(&Store, &[RedisString]) -> MarketResult<RedisValue>,
) -> RedisResult {
    let store = Store::new(ctx);
    // The crate writes error replies byte by byte from chars: anything outside ASCII (from a
    // hand-edited record, say) would reach clients as broken UTF-8, so escape it here, once.
    body(&store, args).map_err(|e| RedisError::String(input::shown(e.to_string().as_bytes(), 4096)))
}

/// Builds a reply map with a stable field order (RESP3 map, RESP2 flat array).
#[derive(Default)]
pub struct Reply(BTreeMap<RedisValueKey, RedisValue>);

impl Reply {
    pub fn new() -> Reply {
        Reply::default()
    }

    pub fn text(mut self, name: &str, value: impl Into<String>) -> Reply {
        self.0.insert(
            RedisValueKey::String(name.into()),
            RedisValue::BulkString(value.into()),
        );
        self
    }

    pub fn int(mut self, name: &str, value: i64) -> Reply {
        self.0.insert(
            RedisValueKey::String(name.into()),
            RedisValue::Integer(value),
        );
        self
    }

    pub fn value(mut self, name: &str, value: RedisValue) -> Reply {
        self.0.insert(RedisValueKey::String(name.into()), value);
        self
    }

    pub fn opt_text(self, name: &str, value: Option<String>) -> Reply {
        match value {
            Some(v) => self.text(name, v),
            None => self.value(name, RedisValue::Null),
        }
    }

    pub fn build(self) -> RedisValue {
        RedisValue::OrderedMap(self.0)
    }
}
