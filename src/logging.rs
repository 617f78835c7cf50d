//! Every line gpucache writes to the Redis log goes through here.
//!
//! The crate's logger builds a C string with `CString::new(message).unwrap()`, so a NUL byte
//! anywhere in a message (a key name another client wrote, say) panics — and a panic aborts
//! redis-server. Here a message is escaped to printable ASCII and cut to the length Redis keeps
//! of a line anyway, then handed to `RedisModule_Log` as the argument of a `%s` format, so
//! neither a NUL, a newline nor a `%` in it can do harm.

use redis_module::logging::RedisLogLevel;
use redis_module::{raw, Context};
use std::ffi::CStr;
use std::ptr;
use std::sync::atomic::{AtomicU64, Ordering};

/// Redis cuts a log line at 1024 bytes (`LOG_MAX_LEN`); longer messages are cut here first,
/// with a mark, so escaping never builds more than that.
const MAX_LINE: usize = 1000;

/// Writes `message` to the Redis log through the module's context (the line names gpucache).
pub fn log(ctx: &Context, level: RedisLogLevel, message: &str) {
    write(ctx.ctx, level, message.as_bytes());
}

/// Writes to the Redis log without a context: usable from any thread and from a panic hook.
pub fn log_anywhere(level: RedisLogLevel, message: &str) {
    write(ptr::null_mut(), level, message.as_bytes());
}

fn write(ctx: *mut raw::RedisModuleCtx, level: RedisLogLevel, message: &[u8]) {
    if cfg!(test) {
        return; // unit tests run outside redis-server
    }
    // SAFETY: reading a function pointer Redis filled at load (or never: then nothing is logged).
    let Some(log) = (unsafe { raw::RedisModule_Log }) else {
        return;
    };
    let mut line = printable(message, MAX_LINE);
    line.push(0);
    let Ok(line) = CStr::from_bytes_with_nul(&line) else {
        return; // unreachable: `printable` never produces a NUL
    };
    // SAFETY: the level, the format and the line are NUL-terminated strings alive for the call;
    // `%s` takes exactly the one argument given. A NULL context is allowed by Redis.
    unsafe {
        log(
            ctx,
            level_name(level).as_ptr(),
            c"%s".as_ptr(),
            line.as_ptr(),
        )
    };
}

fn level_name(level: RedisLogLevel) -> &'static CStr {
    match level {
        RedisLogLevel::Debug => c"debug",
        RedisLogLevel::Verbose => c"verbose",
        RedisLogLevel::Notice => c"notice",
        RedisLogLevel::Warning => c"warning",
    }
}

/// `message` as printable ASCII: bytes outside it (NUL, control bytes, newlines, anything not
/// ASCII) as `\xHH`, cut at `max` output bytes with `...` after the cut.
pub fn printable(message: &[u8], max: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(message.len().min(max) + 3);
    for &b in message {
        let escaped = !(0x20..0x7f).contains(&b);
        let width = if escaped { 4 } else { 1 };
        if out.len() + width > max {
            out.extend_from_slice(b"...");
            return out;
        }
        if escaped {
            out.extend_from_slice(format!("\\x{b:02x}").as_bytes());
        } else {
            out.push(b);
        }
    }
    out
}

/// Makes a panic's message reach the Redis log before the server aborts: redis-server
/// daemonized sends stderr to `/dev/null`, so a hook that only prints there leaves no trace.
pub fn install_panic_hook() {
    std::panic::set_hook(Box::new(|info| {
        let message = format!("gpucache: panic: {info}");
        eprintln!("{message}");
        log_anywhere(RedisLogLevel::Warning, &message);
    }));
}

/// Runs `work`, turning a panic into `None` (the hook above has logged it). Every entry point
/// Redis calls (commands, timers, event handlers) goes through here: unwinding out of a
/// function Redis called aborts the server.
pub fn guarded<T>(work: impl FnOnce() -> T) -> Option<T> {
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(work)).ok();
    if outcome.is_none() {
        PANICS_CAUGHT.fetch_add(1, Ordering::Relaxed);
    }
    outcome
}

static PANICS_CAUGHT: AtomicU64 = AtomicU64::new(0);

/// Panics caught since the module loaded (`INFO gpucache`): each one is a bug to report.
pub fn panics_caught() -> u64 {
    PANICS_CAUGHT.load(Ordering::Relaxed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_that_would_break_a_log_line_are_escaped() {
        assert_eq!(
            printable(b"key a\x00b\r\n%s", 100),
            b"key a\\x00b\\x0d\\x0a%s"
        );
        assert_eq!(printable("é".as_bytes(), 100), b"\\xc3\\xa9");
        assert!(!printable(&[0u8; 50], 1000).contains(&0));
    }

    #[test]
    fn a_panic_is_caught_and_reported_as_none() {
        assert_eq!(guarded(|| 7), Some(7));
        let caught: Option<()> = guarded(|| panic!("boom"));
        assert_eq!(caught, None);
    }

    #[test]
    fn long_messages_are_cut_with_a_mark() {
        let cut = printable(&[b'x'; 5000], 1000);
        assert!(cut.len() <= 1003);
        assert!(cut.ends_with(b"..."));
        let cut = printable(&[0u8; 5000], 1000);
        assert!(cut.len() <= 1003, "escaping never grows past the limit");
        assert_eq!(printable(b"short", 1000), b"short");
    }
}
