//! Registers the module's settings with Redis (`CONFIG SET/GET gpucache.<name>`, and
//! `gpucache.<name>` directives in redis.conf), then lets Redis apply the configured values.
//!
//! The string setting (`demand-tiers`) is registered here by hand rather than through the
//! crate's `configurations:` block, which cannot be made safe from outside:
//! - its getter hands Redis a fresh string on every `CONFIG GET`, which Redis 7.0 copies and never
//!   frees (the API expects a string the module owns): every call leaked ~48 bytes;
//! - its setter turns the error text into a C string with `unwrap`, so an error message holding a
//!   NUL byte from the value (`CONFIG SET gpucache.demand-tiers "x\x00y"`) aborted the server.

use crate::config::{self, DEMAND_TIERS};
use redis_module::configuration::{
    register_bool_configuration, register_i64_configuration, ConfigurationFlags,
};
use redis_module::{raw, Context, Status};
use std::ffi::{c_char, c_int, c_void};
use std::sync::Mutex;

/// The module's copy of `demand-tiers` as a Redis string, handed to every `CONFIG GET`, and the
/// text it holds. Made again whenever the tiers in force read differently (a `CONFIG SET`, or a
/// `DEMAND_TIERS` load argument applied after Redis already asked for the value), so Redis never
/// compares a `CONFIG SET` against stale text and skips the setter.
struct OwnedString(*mut raw::RedisModuleString, String);

// SAFETY: the pointer is only created, read and freed while Redis runs a config callback, which
// it does on the main thread with the GIL held; the mutex orders those calls.
unsafe impl Send for OwnedString {}

static DEMAND_TIERS_SHOWN: Mutex<OwnedString> =
    Mutex::new(OwnedString(std::ptr::null_mut(), String::new()));

fn shown() -> std::sync::MutexGuard<'static, OwnedString> {
    DEMAND_TIERS_SHOWN
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Registers every setting and applies the values redis.conf gave for them. Load arguments are
/// applied afterwards by the caller, so they win over redis.conf directives.
pub fn register(ctx: &Context) -> Status {
    for setting in &config::SETTINGS {
        register_i64_configuration(
            ctx,
            setting.config_name,
            setting.value,
            setting.default,
            setting.min,
            setting.max,
            ConfigurationFlags::DEFAULT,
            None,
        );
    }
    register_bool_configuration(
        ctx,
        "accept-eviction-risk",
        &config::ACCEPT_EVICTION_RISK,
        false,
        ConfigurationFlags::DEFAULT,
        None,
    );
    // SAFETY: reading function pointers Redis filled at load.
    let (Some(register_string), Some(load_configs)) = (unsafe {
        (
            raw::RedisModule_RegisterStringConfig,
            raw::RedisModule_LoadConfigs,
        )
    }) else {
        return Status::Err;
    };
    let Ok(default) = std::ffi::CString::new(config::DEFAULT_DEMAND_TIERS) else {
        return Status::Err;
    };
    // SAFETY: the name and default are NUL-terminated and copied by Redis; the callbacks match
    // the API's signatures and need no private data.
    let registered = unsafe {
        register_string(
            ctx.ctx,
            c"demand-tiers".as_ptr(),
            default.as_ptr(),
            ConfigurationFlags::DEFAULT.bits(),
            Some(get_demand_tiers),
            Some(set_demand_tiers),
            None,
            std::ptr::null_mut(),
        )
    };
    if registered != raw::REDISMODULE_OK as c_int {
        return Status::Err;
    }
    // SAFETY: called from the module's load with its context, once, after every registration.
    if unsafe { load_configs(ctx.ctx) } != raw::REDISMODULE_OK as c_int {
        return Status::Err;
    }
    Status::Ok
}

fn replace_shown(new: *mut raw::RedisModuleString) {
    let old = std::mem::replace(&mut shown().0, new);
    free_shown(old);
}

fn free_shown(old: *mut raw::RedisModuleString) {
    if !old.is_null() {
        // SAFETY: `old` was created by `RedisModule_CreateString` with no context and is owned
        // by this module alone (Redis copies what `CONFIG GET` returns).
        unsafe {
            if let Some(free) = raw::RedisModule_FreeString {
                free(std::ptr::null_mut(), old);
            }
        }
    }
}

unsafe extern "C" fn get_demand_tiers(
    _name: *const c_char,
    _privdata: *mut c_void,
) -> *mut raw::RedisModuleString {
    let text = DEMAND_TIERS.current().to_string();
    let mut shown = shown();
    if shown.0.is_null() || shown.1 != text {
        if let Some(create) = raw::RedisModule_CreateString {
            let fresh = create(
                std::ptr::null_mut(),
                text.as_ptr().cast::<c_char>(),
                text.len(),
            );
            free_shown(std::mem::replace(&mut shown.0, fresh));
            shown.1 = text;
        }
    }
    shown.0
}

unsafe extern "C" fn set_demand_tiers(
    _name: *const c_char,
    value: *mut raw::RedisModuleString,
    _privdata: *mut c_void,
    err: *mut *mut raw::RedisModuleString,
) -> c_int {
    let bytes = crate::store::string_bytes(value).unwrap_or_default();
    let outcome = std::str::from_utf8(bytes)
        .map_err(|_| "demand tiers must be text".to_owned())
        .and_then(|text| DEMAND_TIERS.replace(text));
    match outcome {
        Ok(()) => {
            replace_shown(std::ptr::null_mut()); // the next CONFIG GET shows the new tiers
            raw::REDISMODULE_OK as c_int
        }
        Err(message) => {
            // Escaped: the message may quote the value, which may hold any byte.
            let message = crate::logging::printable(message.as_bytes(), 512);
            if !err.is_null() {
                if let Some(create) = raw::RedisModule_CreateString {
                    *err = create(
                        std::ptr::null_mut(),
                        message.as_ptr().cast::<c_char>(),
                        message.len(),
                    );
                }
            }
            raw::REDISMODULE_ERR as c_int
        }
    }
}
