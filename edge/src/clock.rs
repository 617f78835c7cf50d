//! A monotonic millisecond clock cheap enough to read on every L1 hit.
//!
//! On the VMs the edge runs on, the precise clock (`Instant::now`) costs about 80 ns a read,
//! half the time budget of a hit; Linux's coarse clock is read from memory the kernel updates
//! every tick (a few ns) but lags real time by up to its resolution, so every deadline check
//! gives that lag away (an entry leaves a tick early, never late).

use std::time::Duration;

pub(crate) struct Clock {
    /// How far the clock may lag real time, plus one for truncating to milliseconds.
    lag_ms: u64,
    #[cfg(target_os = "linux")]
    id: libc::clockid_t,
    #[cfg(not(target_os = "linux"))]
    start: std::time::Instant,
}

#[cfg(target_os = "linux")]
fn read(id: libc::clockid_t) -> Option<Duration> {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `now` is a valid, writable timespec for the duration of the call.
    let rc = unsafe { libc::clock_gettime(id, &mut now) };
    let secs = u64::try_from(now.tv_sec).ok()?;
    let nanos = u32::try_from(now.tv_nsec).ok()?;
    (rc == 0).then(|| Duration::new(secs, nanos))
}

#[cfg(target_os = "linux")]
fn resolution(id: libc::clockid_t) -> Option<Duration> {
    let mut res = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `res` is a valid, writable timespec for the duration of the call.
    let rc = unsafe { libc::clock_getres(id, &mut res) };
    let secs = u64::try_from(res.tv_sec).ok()?;
    let nanos = u32::try_from(res.tv_nsec).ok()?;
    (rc == 0).then(|| Duration::new(secs, nanos))
}

fn ceil_ms(d: Duration) -> u64 {
    u64::try_from(d.as_nanos().div_ceil(1_000_000)).unwrap_or(u64::MAX)
}

impl Clock {
    #[cfg(target_os = "linux")]
    pub fn new() -> Clock {
        // Kernels without a coarse clock (before 2.6.32) fall back to the precise one.
        let (id, res) = match resolution(libc::CLOCK_MONOTONIC_COARSE) {
            Some(res) if read(libc::CLOCK_MONOTONIC_COARSE).is_some() => {
                (libc::CLOCK_MONOTONIC_COARSE, res)
            }
            _ => (
                libc::CLOCK_MONOTONIC,
                resolution(libc::CLOCK_MONOTONIC).unwrap_or_default(),
            ),
        };
        Clock {
            lag_ms: ceil_ms(res).saturating_add(1),
            id,
        }
    }

    #[cfg(not(target_os = "linux"))]
    pub fn new() -> Clock {
        Clock {
            lag_ms: 1,
            start: std::time::Instant::now(),
        }
    }

    /// Milliseconds since an arbitrary fixed point, never ahead of real time.
    #[cfg(target_os = "linux")]
    pub fn now_ms(&self) -> u64 {
        read(self.id).map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
    }

    #[cfg(not(target_os = "linux"))]
    pub fn now_ms(&self) -> u64 {
        u64::try_from(self.start.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// How far behind real time a reading may be, in milliseconds: real time is before
    /// `now_ms() + lag_ms()`.
    pub fn lag_ms(&self) -> u64 {
        self.lag_ms
    }
}

/// `d` in whole milliseconds, saturating.
pub(crate) fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::*;

    fn precise_ms() -> u64 {
        read(libc::CLOCK_MONOTONIC).map_or(0, millis)
    }

    // The coarse and precise monotonic clocks count from the same point, so readings compare
    // directly. Never ahead holds always: the coarse clock is the precise one at the last tick.
    #[test]
    fn is_never_ahead_of_the_precise_clock() {
        let clock = Clock::new();
        for _ in 0..10_000 {
            let coarse = clock.now_ms();
            let precise = precise_ms();
            assert!(coarse <= precise, "{coarse} ms is ahead of {precise} ms");
        }
    }

    // How far behind it falls depends on the tick arriving on time, which a loaded VM does not
    // promise; so the bound must hold in most readings, not in every one, and a reading behind
    // by whole seconds (a wrong clock or unit) fails at once.
    #[test]
    fn falls_behind_by_at_most_its_lag_when_ticks_are_on_time() {
        let clock = Clock::new();
        let mut within = 0;
        for _ in 0..1_000 {
            let precise = precise_ms();
            let coarse = clock.now_ms();
            let behind = precise.saturating_sub(coarse);
            assert!(behind < 1_000, "{behind} ms behind the precise clock");
            if behind <= clock.lag_ms {
                within += 1;
            }
            std::thread::sleep(Duration::from_micros(50));
        }
        assert!(
            within >= 500,
            "within its lag in only {within} of 1000 readings"
        );
    }
}
