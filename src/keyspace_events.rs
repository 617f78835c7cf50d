//! The keyspace events gpucache follows, received through one callback of its own.
//!
//! Not through the crate's `event_handlers:` table: its callback turns the event name into a
//! `&str` with `unwrap`, and another module may fire events under any name and class — a name
//! that is not UTF-8 would abort the server before any of gpucache's code ran. Here the name
//! stays bytes, every key outside gpucache's prefix is dropped first, and the handlers run
//! under `catch_unwind`.

use redis_module::{raw, Context, Status};
use std::ffi::{c_char, c_int, CStr};

const GONE: c_int = raw::REDISMODULE_NOTIFY_EXPIRED | raw::REDISMODULE_NOTIFY_EVICTED;
const WRITTEN: c_int = raw::REDISMODULE_NOTIFY_HASH | raw::REDISMODULE_NOTIFY_LOADED;
const MOVED: c_int = raw::REDISMODULE_NOTIFY_GENERIC | GONE;
/// Writes to the indexes STATS figures are read from (`stats_cache.rs`).
const INDEXED: c_int = raw::REDISMODULE_NOTIFY_ZSET | raw::REDISMODULE_NOTIFY_SET;

/// Subscribes (from the module's load).
pub fn subscribe(ctx: &Context) -> Status {
    // SAFETY: reading a function pointer Redis filled at load.
    let Some(subscribe) = (unsafe { raw::RedisModule_SubscribeToKeyspaceEvents }) else {
        return Status::Err;
    };
    // SAFETY: called from the module's load; the callback matches the API's signature.
    let done = unsafe { subscribe(ctx.ctx, WRITTEN | MOVED | INDEXED, Some(on_event)) };
    if done == raw::REDISMODULE_OK as c_int {
        Status::Ok
    } else {
        Status::Err
    }
}

unsafe extern "C" fn on_event(
    ctx: *mut raw::RedisModuleCtx,
    class: c_int,
    event: *const c_char,
    key: *mut raw::RedisModuleString,
) -> c_int {
    let key = crate::store::string_bytes(key).unwrap_or_default();
    if !key.starts_with(b"gpucache:{") || crate::survey_fork::in_child() {
        return raw::REDISMODULE_OK as c_int; // every other key in the server: the common case
    }
    crate::survey_fork::note_write(key);
    let event = if event.is_null() {
        &[][..]
    } else {
        CStr::from_ptr(event).to_bytes()
    };
    // Commands' own writes raise most events here (`hset`, `expire`, `zadd`, ...): those that
    // concern nobody are dropped before any work.
    // Parsed once: every gpucache write raises one or more events here.
    let counted = crate::stats_cache::region_of_input(key);
    let wanted = counted.is_some()
        || class & GONE != 0
        || (class & WRITTEN != 0 && key.ends_with(b":stats:market"))
        || (class & MOVED != 0 && crate::regions::follows_event(event));
    if !wanted {
        return raw::REDISMODULE_OK as c_int;
    }
    let ctx = Context::new(ctx);
    crate::logging::guarded(|| {
        if let Some(region) = counted {
            crate::stats_cache::on_input_changed(&ctx, region);
        }
        if class & GONE != 0 {
            crate::heal::on_key_gone(&ctx, key);
        }
        if class & WRITTEN != 0 {
            crate::regions::on_counters_written(&ctx, key);
        }
        if class & MOVED != 0 && crate::regions::follows_event(event) {
            crate::regions::on_key_moved(&ctx, event, key);
        }
    });
    raw::REDISMODULE_OK as c_int
}
