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
use redis_module::{Context, RedisError, RedisResult, RedisString, RedisValue};
use std::borrow::Cow;
use std::os::raw::{c_char, c_long};

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

/// An option given more than once (`name` in upper case): refused, never "last one wins".
pub fn repeated_option(name: &str) -> MarketError {
    MarketError::syntax(format!("option {name} given twice"))
}

/// Turns a command body into a Redis reply, mapping marketplace errors to error replies. A
/// successful reply is written straight through the module reply API (`Out::emit`).
/// Whether a command changes market state: those are refused while their region is repaired
/// from a forked child's survey (`survey_fork.rs`), which must find the region as it left it.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Writes {
    Yes,
    No,
}

pub fn run(
    ctx: &Context,
    args: &[RedisString],
    writes: Writes,
    body: impl FnOnce(&Store, &[RedisString]) -> MarketResult<Out>,
) -> RedisResult {
    let store = Store::new(ctx);
    let Some(outcome) = crate::logging::guarded(|| {
        // Every command names its region first (STATS may name none).
        if let Some(region) = args.get(1).map(RedisString::as_slice) {
            if let Ok(region) = input::region(region) {
                store.region_is_whole_here(crate::keys::RegionKeys::new(&region).prefix())?;
                if writes == Writes::Yes {
                    crate::survey_fork::refuse_while_repaired(&region)?;
                }
            }
        }
        body(&store, args)
    }) else {
        // A bug, not the caller's fault: the log has the panic. Writes made before it may be
        // half done, so the region is repaired (a recount) rather than trusted.
        let region = args.get(1).map(RedisString::as_slice).unwrap_or_default();
        if let Ok(region) = input::region(region) {
            crate::heal::queue_region_repair(ctx, &region);
        }
        return Err(RedisError::Str(
            "ERR gpucache internal error (see the server log); the region is being repaired",
        ));
    };
    match outcome {
        Ok(out) => {
            out.emit(ctx.get_raw());
            Ok(RedisValue::NoReply)
        }
        // The crate writes error replies byte by byte from chars: anything outside ASCII (from
        // a hand-edited record, say) would reach clients as broken UTF-8, so escape it here, once.
        Err(e) => Err(RedisError::String(input::shown(
            e.to_string().as_bytes(),
            4096,
        ))),
    }
}

/// A command's reply as it is built: written once, at the end, without the intermediate
/// `RedisValue` tree (a `BTreeMap` with an owned key per field).
#[derive(Debug, Clone, PartialEq)]
pub enum Out {
    Text(String),
    Int(i64),
    Null,
    Array(Vec<Out>),
    /// Field/value pairs in the order they are written (`Reply::build` sorts them).
    Map(Vec<(Cow<'static, str>, Out)>),
    /// Nothing now: the client is blocked and answered later (`survey_fork.rs`).
    Deferred,
}

impl Out {
    /// Writes the reply: the same module reply calls, in the same order, as the crate makes for
    /// the equivalent `RedisValue` (bulk strings, integers, null, arrays, maps).
    pub(crate) fn emit(&self, ctx: *mut redis_module::raw::RedisModuleCtx) {
        use redis_module::raw;
        match self {
            Out::Text(text) => {
                raw::reply_with_string_buffer(ctx, text.as_ptr().cast::<c_char>(), text.len());
            }
            Out::Int(value) => {
                raw::reply_with_long_long(ctx, *value);
            }
            Out::Null => {
                raw::reply_with_null(ctx);
            }
            Out::Array(items) => {
                raw::reply_with_array(ctx, c_long::try_from(items.len()).unwrap_or(c_long::MAX));
                for item in items {
                    item.emit(ctx);
                }
            }
            Out::Deferred => {}
            Out::Map(pairs) => {
                raw::reply_with_map(ctx, c_long::try_from(pairs.len()).unwrap_or(c_long::MAX));
                for (name, value) in pairs {
                    raw::reply_with_string_buffer(ctx, name.as_ptr().cast::<c_char>(), name.len());
                    value.emit(ctx);
                }
            }
        }
    }
}

/// Builds a reply map with a stable field order, sorted by field name (RESP3 map, RESP2 flat
/// array). Setting a field again replaces its value.
#[derive(Default)]
pub struct Reply(Vec<(Cow<'static, str>, Out)>);

impl Reply {
    pub fn new() -> Reply {
        Reply(Vec::with_capacity(24))
    }

    pub fn text(self, name: impl Into<Cow<'static, str>>, value: impl Into<String>) -> Reply {
        self.value(name, Out::Text(value.into()))
    }

    pub fn int(self, name: impl Into<Cow<'static, str>>, value: i64) -> Reply {
        self.value(name, Out::Int(value))
    }

    pub fn value(mut self, name: impl Into<Cow<'static, str>>, value: Out) -> Reply {
        let name = name.into();
        match self.0.iter_mut().find(|(n, _)| *n == name) {
            Some(entry) => entry.1 = value,
            None => self.0.push((name, value)),
        }
        self
    }

    pub fn opt_text(self, name: impl Into<Cow<'static, str>>, value: Option<String>) -> Reply {
        match value {
            Some(v) => self.text(name, v),
            None => self.value(name, Out::Null),
        }
    }

    pub fn build(mut self) -> Out {
        // Byte order of the names, as the `BTreeMap` this replaced kept them.
        self.0.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        Out::Map(self.0)
    }
}
