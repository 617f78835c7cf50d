//! gpucache: a GPU marketplace's cache as atomic server-side Redis commands.
//!
//! This file only registers commands, configuration and event handlers. Commands live in
//! `commands/`, marketplace rules in `core/`, the key scheme in `keys.rs`.

mod acl;
pub mod booking_clock;
mod command_info;
pub mod commands;
pub mod config;
mod config_registration;
pub mod core;
pub mod eviction;
mod figures_read;
pub mod heal;
mod info;
pub mod keys;
mod keyspace_events;
pub mod logging;
pub mod market;
mod provider_moves;
mod regions;
pub mod repair;
mod slice_queue;
mod stats_cache;
pub mod store;
pub mod survey;
mod survey_fork;
mod sweep;
mod ticker;
mod type_drains;

use redis_module::logging::RedisLogLevel;
use redis_module::{redis_module, Context, RedisResult, RedisString, Status};

/// Uses Redis's allocator inside redis-server (so `INFO memory` and `maxmemory` see the module's
/// allocations) and the system allocator anywhere else (unit tests, benchmarks).
pub struct ModuleAllocator;

// SAFETY: both allocators are valid global allocators; which one serves a process is fixed
// before its first allocation, because Redis fills `RedisModule_Alloc` in `RedisModule_OnLoad`
// before any module code allocates, and other processes never set it.
unsafe impl std::alloc::GlobalAlloc for ModuleAllocator {
    unsafe fn alloc(&self, layout: std::alloc::Layout) -> *mut u8 {
        if (*std::ptr::addr_of!(redis_module::raw::RedisModule_Alloc)).is_some() {
            redis_module::alloc::RedisAlloc.alloc(layout)
        } else {
            std::alloc::System.alloc(layout)
        }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: std::alloc::Layout) {
        if (*std::ptr::addr_of!(redis_module::raw::RedisModule_Free)).is_some() {
            redis_module::alloc::RedisAlloc.dealloc(ptr, layout)
        } else {
            std::alloc::System.dealloc(ptr, layout)
        }
    }
}

macro_rules! command {
    ($name:ident, $body:path, $writes:ident) => {
        fn $name(ctx: &Context, args: Vec<RedisString>) -> RedisResult {
            commands::run(ctx, &args, commands::Writes::$writes, $body)
        }
    };
}

command!(register, commands::register::command, Yes);
command!(get, commands::get::command, No);
command!(status, commands::status::command, Yes);
command!(price, commands::price::command, Yes);
command!(book, commands::book::book, Yes);
command!(cancel, commands::book::cancel, Yes);
command!(provider, commands::provider::command, Yes);
command!(available, commands::available::command, No);
command!(stats, commands::stats::command, No);
command!(orderbook, commands::orderbook::command, No);
command!(check, commands::check::command, No);
command!(repair, commands::repair::command, No);
command!(invalidate, commands::invalidate::command, No);

fn init(ctx: &Context, args: &[RedisString]) -> Status {
    let status = load(ctx, args);
    if status == Status::Err {
        unsubscribe_server_events(ctx);
    }
    status
}

/// Redis 7.0 does not drop a module's server-event subscriptions when its `OnLoad` fails (it
/// frees the module and unmaps the library): the crate subscribes before `init` runs, so a
/// refused `MODULE LOAD`/`LOADEX` (a bad load argument or `CONFIG` value) would leave the cron
/// callback pointing into unmapped code and crash the server on its next tick.
fn unsubscribe_server_events(ctx: &Context) {
    use redis_module::raw;
    // SAFETY: reading a function pointer Redis filled at load.
    let Some(subscribe) = (unsafe { raw::RedisModule_SubscribeToServerEvent }) else {
        return;
    };
    // Exactly the events the crate subscribed (those gpucache has handlers for): on 7.0 a NULL
    // callback for an event the module never subscribed *adds* a listener that calls NULL.
    for id in [
        raw::REDISMODULE_EVENT_REPLICATION_ROLE_CHANGED, // heal::after_promotion
        raw::REDISMODULE_EVENT_LOADING,                  // heal::after_loading
        raw::REDISMODULE_EVENT_CONFIG,                   // eviction::on_config_changed
        raw::REDISMODULE_EVENT_CRON_LOOP,                // ticker::on_cron
    ] {
        // SAFETY: a NULL callback removes this module's listener for a subscribed event.
        unsafe { subscribe(ctx.ctx, raw::RedisModuleEvent { id, dataver: 1 }, None) };
    }
}

fn load(ctx: &Context, args: &[RedisString]) -> Status {
    // A panic would abort redis-server; make sure it at least says why in the log.
    logging::install_panic_hook();
    // Settings first, so redis.conf's `gpucache.*` directives apply; load arguments win over them.
    if config_registration::register(ctx) == Status::Err {
        log(
            ctx,
            RedisLogLevel::Warning,
            "gpucache: cannot register its configuration",
        );
        return Status::Err;
    }
    let raw: Vec<&[u8]> = args.iter().map(RedisString::as_slice).collect();
    if let Err(message) = config::apply_load_args(&raw) {
        log(ctx, RedisLogLevel::Warning, &format!("gpucache: {message}"));
        return Status::Err;
    }
    // Arity, read-only/read-write key specs and ACL categories, as far as this server supports.
    command_info::apply(ctx);
    log(
        ctx,
        RedisLogLevel::Notice,
        &format!(
            "gpucache loaded: availability-ttl={}s pricing-ttl={}s jitter={}% stream-maxlen={} demand-tiers={}",
            config::get(&config::AVAILABILITY_TTL),
            config::get(&config::PRICING_TTL),
            config::get(&config::JITTER_PERCENT),
            config::get(&config::STREAM_MAXLEN),
            config::DEMAND_TIERS.current(),
        ),
    );
    eviction::refresh(ctx);
    heal::reserve();
    if keyspace_events::subscribe(ctx) == Status::Err {
        log(
            ctx,
            RedisLogLevel::Warning,
            "gpucache: cannot subscribe to keyspace events",
        );
        return Status::Err;
    }
    // Last: nothing may fail after it (see `unsubscribe_server_events`).
    regions::subscribe(ctx);
    Status::Ok
}

// Every command names its region as its first argument, declared as the command's one key
// (first_key = last_key = 1) so cluster-aware clients route it to the region's slot. The ACL
// category strings stay empty (7.0 refuses to load otherwise): `command_info::apply` sets the
// categories, arities and key-spec flags where the server supports them.
redis_module! {
    name: "gpucache",
    version: 1,
    allocator: (crate::ModuleAllocator, crate::ModuleAllocator),
    data_types: [],
    init: init,
    commands: [
        ["gpucache.register", register, "write deny-oom", 1, 1, 1, ""],
        ["gpucache.get", get, "readonly fast", 1, 1, 1, ""],
        ["gpucache.status", status, "write deny-oom", 1, 1, 1, ""],
        ["gpucache.price", price, "write deny-oom", 1, 1, 1, ""],
        ["gpucache.book", book, "write deny-oom", 1, 1, 1, ""],
        ["gpucache.cancel", cancel, "write deny-oom", 1, 1, 1, ""],
        ["gpucache.provider", provider, "write deny-oom", 1, 1, 1, ""],
        ["gpucache.available", available, "readonly", 1, 1, 1, ""],
        // STATS without a region sums this server's regions (those the caller may read); with
        // no argument it has no key, so a cluster client may send it to any node.
        ["gpucache.stats", stats, "readonly", 1, 1, 1, ""],
        ["gpucache.orderbook", orderbook, "readonly", 1, 1, 1, ""],
        ["gpucache.check", check, "readonly", 1, 1, 1, ""],
        ["gpucache.repair", repair, "write", 1, 1, 1, ""],
        ["gpucache.invalidate", invalidate, "write deny-oom", 1, 1, 1, ""],
    ],
    // Keyspace events are subscribed in `init` (`keyspace_events.rs`).
    event_handlers: [],
}

/// Writes to the Redis log, whatever bytes `message` holds (see `logging.rs`).
pub fn log(ctx: &Context, level: redis_module::logging::RedisLogLevel, message: &str) {
    logging::log(ctx, level, message);
}
