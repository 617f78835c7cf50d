//! Whether the server's eviction policy can take market state.
//!
//! gpucache keeps what decides who holds a GPU — bookings, a booked GPU's record, registries,
//! indexes, counters — without a TTL, so a `volatile-*` policy (and `noeviction`) never evicts
//! it; only cached records (an idle GPU record, a type price) carry TTLs. An `allkeys-*` policy
//! can evict anything, a paid booking included. Such a policy is reported in the log (at load
//! and whenever it changes), by `GPUCACHE.CHECK` and in `INFO gpucache`, and `GPUCACHE.BOOK`
//! refuses to take money under it unless `gpucache.accept-eviction-risk` is `yes`.

use crate::config::ACCEPT_EVICTION_RISK;
use crate::core::error::{MarketError, MarketResult};
use redis_module::logging::RedisLogLevel;
use redis_module::{Context, RedisValue};
use redis_module_macros::config_changed_event_handler;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

/// The `maxmemory-policy` last read.
static POLICY: Mutex<String> = Mutex::new(String::new());
static UNSAFE: AtomicBool = AtomicBool::new(false);

/// Whether a `maxmemory-policy` can evict keys without a TTL.
pub fn can_evict_market_state(policy: &str) -> bool {
    policy.starts_with("allkeys-")
}

/// The policy as last read.
pub fn policy() -> String {
    POLICY
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
        .clone()
}

pub fn is_unsafe() -> bool {
    UNSAFE.load(Ordering::Relaxed)
}

/// What an operator should read when the policy is unsafe (for the log, `CHECK` and `BOOK`).
pub fn warning() -> Option<String> {
    if !is_unsafe() {
        return None;
    }
    Some(format!(
        "maxmemory-policy {} can evict bookings and other market state (kept without a TTL so \
         that volatile-* policies never choose them): use a volatile-* policy or noeviction{}",
        policy(),
        if ACCEPT_EVICTION_RISK.load(Ordering::Relaxed) {
            "; bookings are taken anyway because gpucache.accept-eviction-risk is yes"
        } else {
            "; GPUCACHE.BOOK is refused until then (or set gpucache.accept-eviction-risk yes)"
        }
    ))
}

/// Refuses a new booking under a policy that could evict it.
pub fn check_bookings_are_safe() -> MarketResult<()> {
    if is_unsafe() && !ACCEPT_EVICTION_RISK.load(Ordering::Relaxed) {
        return Err(MarketError::EvictionRisk(format!(
            "maxmemory-policy {} can evict bookings: set a volatile-* policy or noeviction, or \
             CONFIG SET gpucache.accept-eviction-risk yes to book anyway",
            policy()
        )));
    }
    Ok(())
}

/// Reads `maxmemory-policy` and logs when it changed to or from a policy that is unsafe.
pub fn refresh(ctx: &Context) {
    let Ok(RedisValue::Array(reply)) = ctx.call("CONFIG", &["GET", "maxmemory-policy"][..]) else {
        return;
    };
    let Some(current) = reply.get(1).and_then(value_text) else {
        return;
    };
    let changed = {
        let mut stored = POLICY
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let changed = *stored != current;
        stored.clone_from(&current);
        changed
    };
    let now_unsafe = can_evict_market_state(&current);
    let was_unsafe = UNSAFE.swap(now_unsafe, Ordering::Relaxed);
    if !changed {
        return;
    }
    if let Some(warning) = warning() {
        crate::log(ctx, RedisLogLevel::Warning, &format!("gpucache: {warning}"));
    } else if was_unsafe {
        crate::log(
            ctx,
            RedisLogLevel::Notice,
            &format!("gpucache: maxmemory-policy {current} keeps market state safe"),
        );
    }
}

fn value_text(value: &RedisValue) -> Option<String> {
    match value {
        RedisValue::SimpleString(s) | RedisValue::BulkString(s) => Some(s.clone()),
        RedisValue::BulkRedisString(s) => s.try_as_str().ok().map(str::to_owned),
        RedisValue::StringBuffer(b) => String::from_utf8(b.clone()).ok(),
        _ => None,
    }
}

#[config_changed_event_handler]
fn on_config_changed(ctx: &Context, changed: &[&str]) {
    crate::logging::guarded(|| {
        if changed
            .iter()
            .any(|name| name.eq_ignore_ascii_case("maxmemory-policy"))
        {
            refresh(ctx);
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_allkeys_policies_can_evict_market_state() {
        for policy in ["allkeys-lru", "allkeys-lfu", "allkeys-random"] {
            assert!(can_evict_market_state(policy), "{policy}");
        }
        for policy in [
            "noeviction",
            "volatile-lru",
            "volatile-lfu",
            "volatile-random",
            "volatile-ttl",
        ] {
            assert!(!can_evict_market_state(policy), "{policy}");
        }
    }
}
