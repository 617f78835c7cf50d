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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_pace_with_the_precise_clock_within_its_lag() {
        let clock = Clock::new();
        let pause = Duration::from_millis(30);
        // Each interval of one clock encloses the other's, so scheduling delays cannot
        // widen the gap in the direction checked.
        let outer_start = clock.now_ms();
        let inner = std::time::Instant::now();
        std::thread::sleep(pause);
        let precise = millis(inner.elapsed());
        let coarse = clock.now_ms().saturating_sub(outer_start);
        assert!(
            coarse + clock.lag_ms >= precise,
            "{coarse} ms fell behind {precise} ms"
        );

        let outer = std::time::Instant::now();
        let inner_start = clock.now_ms();
        std::thread::sleep(pause);
        let coarse = clock.now_ms().saturating_sub(inner_start);
        let precise = millis(outer.elapsed());
        assert!(
            coarse <= precise + clock.lag_ms,
            "{coarse} ms ran ahead of {precise} ms"
        );
    }
}
