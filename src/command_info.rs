//! Command metadata the `commands:` table of `redis_module!` cannot carry on Redis 7.0, set
//! from `init` (inside `RedisModule_OnLoad`, after the commands are registered):
//!
//! - arity and key-spec flags, with `RedisModule_SetCommandInfo` (7.0+). The legacy
//!   (first, last, step) registration makes Redis derive a read-write key spec for every
//!   command, so a user with a read-only key pattern (`%R~...`) was refused even `GET`. Here
//!   read-only commands declare `RO ACCESS` on their region and write commands `RW ACCESS
//!   UPDATE` (what Redis derived before: they read the region as well as change it).
//! - ACL categories, with `RedisModule_SetCommandACLCategories` (7.2+): `read` or `write`,
//!   `fast` or `slow`, and the module's own `gpucache` category where
//!   `RedisModule_AddACLCategory` (7.4+) can create it. On 7.0 module commands belong to no
//!   category at all (`-@write` does not stop `BOOK`; grant or deny `+gpucache.<command>`).
//!
//! Every API is probed before use; a server without one keeps what registration gave. A
//! failure is logged and loading goes on: the commands work as registered.

use redis_module::logging::RedisLogLevel;
use redis_module::{raw, Context};
use std::ffi::CStr;
use std::os::raw::c_int;

/// The module's ACL category (Redis 7.4+).
const CATEGORY: &CStr = c"gpucache";

/// What one command declares.
struct Meta {
    name: &'static CStr,
    /// Argument count including the command name; negative: at least that many.
    arity: c_int,
    write: bool,
    /// In `@fast` (O(1) or O(log n), like Redis's own fast commands) rather than `@slow`.
    fast: bool,
    summary: &'static CStr,
}

/// Every command registered in `lib.rs`, with arities matching each command's own argument
/// check (`Args::new`).
const COMMANDS: [Meta; 13] = [
    Meta {
        name: c"gpucache.register",
        arity: -9,
        write: true,
        fast: false,
        summary: c"Creates or updates a GPU",
    },
    Meta {
        name: c"gpucache.get",
        arity: 3,
        write: false,
        fast: true,
        summary: c"Returns a GPU's record",
    },
    Meta {
        name: c"gpucache.status",
        arity: 4,
        write: true,
        fast: false,
        summary: c"Changes a GPU's status",
    },
    Meta {
        name: c"gpucache.price",
        arity: 4,
        write: true,
        fast: false,
        summary: c"Sets the hourly price of a GPU type in a region",
    },
    Meta {
        name: c"gpucache.book",
        arity: 6,
        write: true,
        fast: false,
        summary: c"Books a GPU",
    },
    Meta {
        name: c"gpucache.cancel",
        arity: 3,
        write: true,
        fast: false,
        summary: c"Cancels a booking",
    },
    Meta {
        name: c"gpucache.provider",
        arity: 4,
        write: true,
        fast: false,
        summary: c"Sets a provider's status for all its GPUs",
    },
    Meta {
        name: c"gpucache.available",
        arity: -2,
        write: false,
        fast: false,
        summary: c"Searches bookable GPUs",
    },
    Meta {
        name: c"gpucache.orderbook",
        arity: -3,
        write: false,
        fast: false,
        summary: c"Returns the ask ladder of a GPU type",
    },
    Meta {
        name: c"gpucache.stats",
        // The region is optional: without it the command has no key.
        arity: -1,
        write: false,
        fast: false,
        summary: c"Market statistics of a region, or of every region on this server",
    },
    Meta {
        name: c"gpucache.invalidate",
        arity: -3,
        write: true,
        fast: false,
        summary: c"Invalidates cached copies of keys of a region",
    },
    Meta {
        name: c"gpucache.check",
        arity: 2,
        write: false,
        fast: false,
        summary: c"Recounts a region and reports broken invariants",
    },
    Meta {
        name: c"gpucache.repair",
        arity: 2,
        write: true,
        fast: false,
        summary: c"Repairs what records that vanished silently left behind",
    },
];

/// The version block `REDISMODULE_COMMAND_INFO_VERSION` points to in redismodule.h (a `static`
/// there, so not a symbol the module could link to): version 1 and this build's struct sizes.
static INFO_VERSION: raw::RedisModuleCommandInfoVersion = raw::RedisModuleCommandInfoVersion {
    version: 1,
    sizeof_historyentry: std::mem::size_of::<raw::RedisModuleCommandHistoryEntry>(),
    sizeof_keyspec: std::mem::size_of::<raw::RedisModuleCommandKeySpec>(),
    sizeof_arg: std::mem::size_of::<raw::RedisModuleCommandArg>(),
};

/// Sets every command's metadata the running server supports. Call during `OnLoad`.
pub fn apply(ctx: &Context) {
    let with_category = add_category(ctx);
    for meta in &COMMANDS {
        // SAFETY: probing a function pointer the module API filled in at load time; the name
        // is NUL-terminated and the command handle lives as long as the module.
        let command = unsafe {
            match raw::RedisModule_GetCommand {
                Some(get) => get(ctx.get_raw(), meta.name.as_ptr()),
                None => return,
            }
        };
        if command.is_null() {
            warn(ctx, &format!("{} is not registered", show(meta.name)));
            continue;
        }
        set_info(ctx, command, meta);
        set_categories(ctx, command, meta, with_category);
    }
}

/// Creates the `gpucache` ACL category where the server can (7.4+). True when commands may
/// name it: created now, or left by an earlier load of the module.
fn add_category(ctx: &Context) -> bool {
    // SAFETY: probing a function pointer; the category name is a NUL-terminated constant.
    unsafe {
        let Some(add) = raw::RedisModule_AddACLCategory else {
            return false;
        };
        // Fails when the category exists already (the module was unloaded and loaded again):
        // commands can still name it, and `set_categories` falls back if they cannot.
        let _ = add(ctx.get_raw(), CATEGORY.as_ptr());
        true
    }
}

fn set_info(ctx: &Context, command: *mut raw::RedisModuleCommand, meta: &Meta) {
    // SAFETY: probing a function pointer the module API filled in at load time.
    let Some(set_command_info) = (unsafe { raw::RedisModule_SetCommandInfo }) else {
        return;
    };
    let flags = if meta.write {
        raw::REDISMODULE_CMD_KEY_RW
            | raw::REDISMODULE_CMD_KEY_ACCESS
            | raw::REDISMODULE_CMD_KEY_UPDATE
    } else {
        raw::REDISMODULE_CMD_KEY_RO | raw::REDISMODULE_CMD_KEY_ACCESS
    };
    // SAFETY: all-zero is a valid key spec (NULL notes, no flags, and the INVALID begin-search
    // type that ends a key-spec array).
    let mut region: raw::RedisModuleCommandKeySpec = unsafe { std::mem::zeroed() };
    region.flags = u64::from(flags);
    // The region: argument 1, one key (last key 0 after it, step 1, no limit).
    region.begin_search_type = raw::RedisModuleKeySpecBeginSearchType_REDISMODULE_KSPEC_BS_INDEX;
    region.bs.index.pos = 1;
    region.find_keys_type = raw::RedisModuleKeySpecFindKeysType_REDISMODULE_KSPEC_FK_RANGE;
    region.fk.range.lastkey = 0;
    region.fk.range.keystep = 1;
    region.fk.range.limit = 0;
    // SAFETY: as above; this one ends the array.
    let end: raw::RedisModuleCommandKeySpec = unsafe { std::mem::zeroed() };
    let mut key_specs = [region, end];
    let info = raw::RedisModuleCommandInfo {
        version: &INFO_VERSION,
        summary: meta.summary.as_ptr(),
        complexity: std::ptr::null(),
        since: std::ptr::null(),
        history: std::ptr::null_mut(),
        tips: std::ptr::null(),
        arity: meta.arity,
        key_specs: key_specs.as_mut_ptr(),
        args: std::ptr::null_mut(),
    };
    // SAFETY: `command` is a registered command; `info`, the version block, the key specs and
    // the summary all outlive the call, during which Redis copies what it keeps.
    let status = unsafe { set_command_info(command, &info) };
    if status != raw::REDISMODULE_OK as c_int {
        warn(
            ctx,
            &format!(
                "could not set the arity and key specs of {} (it keeps read-write key flags)",
                show(meta.name)
            ),
        );
    }
}

fn set_categories(
    ctx: &Context,
    command: *mut raw::RedisModuleCommand,
    meta: &Meta,
    with_category: bool,
) {
    // SAFETY: probing a function pointer the module API filled in at load time.
    let Some(set_categories) = (unsafe { raw::RedisModule_SetCommandACLCategories }) else {
        return;
    };
    let base: &CStr = match (meta.write, meta.fast) {
        (true, true) => c"write fast",
        (true, false) => c"write slow",
        (false, true) => c"read fast",
        (false, false) => c"read slow",
    };
    let extended = format!("{} {}", show(base), show(CATEGORY));
    let with_module_category = with_category
        && std::ffi::CString::new(extended).is_ok_and(|categories| {
            // SAFETY: `command` is a registered command and the string is NUL-terminated.
            unsafe { set_categories(command, categories.as_ptr()) == raw::REDISMODULE_OK as c_int }
        });
    if with_module_category {
        return;
    }
    // SAFETY: as above.
    let status = unsafe { set_categories(command, base.as_ptr()) };
    if status != raw::REDISMODULE_OK as c_int {
        warn(
            ctx,
            &format!(
                "could not put {} in the ACL categories {}",
                show(meta.name),
                show(base)
            ),
        );
    }
}

fn show(text: &CStr) -> String {
    text.to_string_lossy().into_owned()
}

fn warn(ctx: &Context, message: &str) {
    crate::log(ctx, RedisLogLevel::Warning, &format!("gpucache: {message}"));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_command_is_described_once_with_a_positive_minimum_arity() {
        let mut names: Vec<&CStr> = COMMANDS.iter().map(|m| m.name).collect();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), COMMANDS.len());
        for meta in &COMMANDS {
            assert!(meta.arity != 0, "{:?}", meta.name);
            assert!(meta.name.to_bytes().starts_with(b"gpucache."));
        }
    }
}
