//! The calling client's ACL key permissions, for a command that reads keys it does not declare:
//! `GPUCACHE.STATS` without a region sums regions no argument names, so Redis's own ACL check
//! (which sees only declared keys) cannot stop a user restricted to some regions from reading
//! the others' figures. The command asks here, per region, instead.
//!
//! Uses `RedisModule_GetCurrentUserName`, `RedisModule_GetModuleUserFromUserName` and
//! `RedisModule_ACLCheckKeyPermissions` (Redis 7.0+), each probed: a server without them is
//! answered as before, unrestricted.

use redis_module::{raw, Context, RedisValue};
use std::os::raw::{c_char, c_int};

/// Who is calling, as far as key permissions go.
pub enum Caller {
    /// Every key may be read: a server without the ACL API, or a client Redis runs with no
    /// user (its own internal clients, which ACLs never restrict).
    Unrestricted,
    /// An ACL user, released on drop.
    User {
        ctx: *mut raw::RedisModuleCtx,
        user: *mut raw::RedisModuleUser,
        /// `None` when the name is not text.
        name: Option<String>,
    },
    /// The caller's user could not be found (a command run from a script or another module,
    /// whose client Redis does not list): no key may be read.
    Nobody,
}

/// `errno` when Redis refuses a user name because the client runs without a user.
#[cfg(target_os = "linux")]
const ENOTSUP: i32 = 95;
#[cfg(not(target_os = "linux"))]
const ENOTSUP: i32 = 45;

impl Caller {
    /// The user of the client running the current command.
    pub fn of(ctx: &Context) -> Caller {
        let ctx = ctx.get_raw();
        // SAFETY: reading function pointers the module API filled in at load time; the user
        // name string is freed right after the user is looked up (the user does not keep it).
        unsafe {
            let (Some(name_of), Some(user_of), Some(_), Some(_), Some(free_string)) = (
                raw::RedisModule_GetCurrentUserName,
                raw::RedisModule_GetModuleUserFromUserName,
                raw::RedisModule_ACLCheckKeyPermissions,
                raw::RedisModule_FreeModuleUser,
                raw::RedisModule_FreeString,
            ) else {
                return Caller::Unrestricted;
            };
            let name = name_of(ctx);
            if name.is_null() {
                // ENOTSUP: the client has no user (unrestricted); ENOENT: no such client.
                let errno = std::io::Error::last_os_error().raw_os_error();
                return if errno == Some(ENOTSUP) {
                    Caller::Unrestricted
                } else {
                    Caller::Nobody
                };
            }
            let user = user_of(name);
            let text = crate::store::string_bytes(name)
                .and_then(|bytes| String::from_utf8(bytes.to_vec()).ok());
            free_string(ctx, name);
            if user.is_null() {
                Caller::Nobody
            } else {
                Caller::User {
                    ctx,
                    user,
                    name: text,
                }
            }
        }
    }

    /// Whether the caller may read `key` (its ACL key patterns grant read access to it).
    pub fn may_read(&self, key: &str) -> bool {
        let (ctx, user) = match self {
            Caller::Unrestricted => return true,
            Caller::Nobody => return false,
            Caller::User { ctx, user, .. } => (*ctx, *user),
        };
        // SAFETY: `user` is a live module user (released only on drop); the key string is
        // created and freed here.
        unsafe {
            let (Some(create), Some(check), Some(free)) = (
                raw::RedisModule_CreateString,
                raw::RedisModule_ACLCheckKeyPermissions,
                raw::RedisModule_FreeString,
            ) else {
                return false;
            };
            let name = create(ctx, key.as_ptr().cast::<c_char>(), key.len());
            if name.is_null() {
                return false;
            }
            let allowed = check(user, name, raw::REDISMODULE_CMD_KEY_ACCESS as c_int)
                == raw::REDISMODULE_OK as c_int;
            free(ctx, name);
            allowed
        }
    }
}

impl Caller {
    /// Whether the caller may read every key (its root key patterns say so): then no region
    /// needs checking. Asked with `ACL GETUSER`; any doubt answers no.
    pub fn reads_every_key(&self, ctx: &Context) -> bool {
        let name = match self {
            Caller::Unrestricted => return true,
            Caller::Nobody => return false,
            Caller::User { name: None, .. } => return false,
            Caller::User {
                name: Some(name), ..
            } => name,
        };
        let Ok(RedisValue::Array(items)) = ctx.call("ACL", &["GETUSER", name.as_str()]) else {
            return false;
        };
        let text = |value: &RedisValue| match value {
            RedisValue::SimpleString(s) | RedisValue::BulkString(s) => Some(s.clone()),
            RedisValue::SimpleStringStatic(s) => Some((*s).to_owned()),
            RedisValue::BulkRedisString(s) => s.try_as_str().ok().map(str::to_owned),
            RedisValue::StringBuffer(b) => String::from_utf8(b.clone()).ok(),
            _ => None,
        };
        items
            .chunks_exact(2)
            .find(|pair| pair.first().and_then(text).as_deref() == Some("keys"))
            .and_then(|pair| pair.get(1).and_then(text))
            .is_some_and(|keys| crate::core::acl_keys::read_every_key(&keys))
    }
}

impl Drop for Caller {
    fn drop(&mut self) {
        if let Caller::User { user, .. } = self {
            // SAFETY: the user came from RedisModule_GetModuleUserFromUserName and is freed once.
            unsafe {
                if let Some(free_user) = raw::RedisModule_FreeModuleUser {
                    free_user(*user);
                }
            }
        }
    }
}
