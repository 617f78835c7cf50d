//! Single flight: concurrent misses of one key share one load, its result or its error.

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};

/// How a caller got its result.
pub(crate) enum Joined<R> {
    /// This caller ran the load.
    Led(R),
    /// Another caller's load, already running when this one joined.
    Shared(R),
    /// The load this caller waited for panicked: it must load by itself.
    Abandoned,
}

enum State<R> {
    Flying,
    Landed(R),
    Abandoned,
}

struct Flight<R> {
    state: Mutex<State<R>>,
    landed: Condvar,
}

pub(crate) struct Flights<K, R> {
    pending: Mutex<HashMap<K, Arc<Flight<R>>>>,
}

impl<K, R> Default for Flights<K, R> {
    fn default() -> Self {
        Flights {
            pending: Mutex::new(HashMap::new()),
        }
    }
}

/// A panicking loader must not leave its waiters blocked: a lock poisoned by it is still
/// consistent (every update is a single assignment).
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

impl<K: Hash + Eq + Clone, R: Clone> Flights<K, R> {
    /// Runs `load` unless a load of `key` is already running, in which case waits for its
    /// result instead.
    pub fn join(&self, key: &K, load: impl FnOnce() -> R) -> Joined<R> {
        let (flight, leads) = {
            let mut pending = lock(&self.pending);
            match pending.get(key) {
                Some(flight) => (flight.clone(), false),
                None => {
                    let flight = Arc::new(Flight {
                        state: Mutex::new(State::Flying),
                        landed: Condvar::new(),
                    });
                    pending.insert(key.clone(), flight.clone());
                    (flight, true)
                }
            }
        };
        if !leads {
            let state = lock(&flight.state);
            let state = flight
                .landed
                .wait_while(state, |s| matches!(s, State::Flying))
                .unwrap_or_else(PoisonError::into_inner);
            return match &*state {
                State::Landed(result) => Joined::Shared(result.clone()),
                State::Flying | State::Abandoned => Joined::Abandoned,
            };
        }
        let mut landing = Landing {
            flights: self,
            key,
            flight: &flight,
            result: None,
        };
        let result = load();
        landing.result = Some(result.clone());
        drop(landing);
        Joined::Led(result)
    }

    /// How many callers are in the running load of `key` (its leader included).
    #[cfg(test)]
    pub fn joined(&self, key: &K) -> usize {
        lock(&self.pending)
            .get(key)
            .map_or(0, |flight| Arc::strong_count(flight).saturating_sub(1))
    }
}

/// Ends a flight however its load ends, a panic included.
struct Landing<'a, K: Hash + Eq, R> {
    flights: &'a Flights<K, R>,
    key: &'a K,
    flight: &'a Flight<R>,
    result: Option<R>,
}

impl<K: Hash + Eq, R> Drop for Landing<'_, K, R> {
    fn drop(&mut self) {
        *lock(&self.flight.state) = match self.result.take() {
            Some(result) => State::Landed(result),
            None => State::Abandoned,
        };
        self.flight.landed.notify_all();
        lock(&self.flights.pending).remove(self.key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Barrier;

    #[test]
    fn concurrent_callers_share_one_load() {
        let flights: Flights<&str, usize> = Flights::default();
        let loads = AtomicUsize::new(0);
        let release = Barrier::new(2);
        let (led, shared) = std::thread::scope(|s| {
            let leader = s.spawn(|| {
                flights.join(&"k", || {
                    loads.fetch_add(1, Ordering::SeqCst);
                    release.wait(); // the follower is about to join
                    while flights.joined(&"k") != 2 {
                        std::thread::yield_now();
                    }
                    7
                })
            });
            release.wait();
            let follower = s.spawn(|| flights.join(&"k", || 8));
            (leader.join().ok(), follower.join().ok())
        });
        assert!(matches!(led, Some(Joined::Led(7))));
        assert!(matches!(shared, Some(Joined::Shared(7))));
        assert_eq!(loads.load(Ordering::SeqCst), 1);
        assert!(lock(&flights.pending).is_empty());
    }

    #[test]
    fn waiters_of_a_panicked_load_are_released() {
        let flights: Flights<&str, usize> = Flights::default();
        let release = Barrier::new(2);
        std::thread::scope(|s| {
            let leader = s.spawn(|| {
                flights.join(&"k", || {
                    release.wait();
                    while flights.joined(&"k") != 2 {
                        std::thread::yield_now();
                    }
                    panic!("loader failed")
                })
            });
            release.wait();
            let follower = s.spawn(|| flights.join(&"k", || 8));
            assert!(leader.join().is_err());
            assert!(matches!(follower.join().ok(), Some(Joined::Abandoned)));
        });
        assert!(matches!(flights.join(&"k", || 9), Joined::Led(9)));
    }
}
