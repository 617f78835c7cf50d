//! A queue of background jobs run a slice at a time on the module's ticker: the moves of large
//! providers' GPUs (`provider_moves.rs`) and the drains of large types re-priced by `PRICE`
//! (`type_drains.rs`). Each job belongs to a database and may wait (its region could not be
//! written); the queue keeps them across ticks, follows `FLUSHDB`/`SWAPDB`, and runs slices
//! until the tick's deadline.

use crate::store::{select_db, selected_db, Store, WriteAccess};
use redis_module::Context;
use std::collections::VecDeque;
use std::sync::{Mutex, MutexGuard};
use std::time::Instant;

/// How long a job waits when its region cannot be written now (cluster down).
const RETRY_MS: i64 = 1_000;

/// What the queue needs of a job.
pub trait Job {
    fn db(&self) -> i32;
    fn db_mut(&mut self) -> &mut i32;
    /// Not run before this time (ms); 0 to run at once.
    fn not_before_ms_mut(&mut self) -> &mut i64;
}

pub struct SliceQueue<J>(Mutex<VecDeque<J>>);

/// Whether a slice may write its region now.
pub enum Access {
    Now,
    /// Not now (cluster down): the job is given back to wait.
    Later,
    /// The region's slot is another node's, which resumes the job when the region arrives.
    Elsewhere,
}

impl<J: Job> SliceQueue<J> {
    pub const fn new() -> Self {
        SliceQueue(Mutex::new(VecDeque::new()))
    }

    pub fn lock(&self) -> MutexGuard<'_, VecDeque<J>> {
        // A panic while the lock was held (a bug; the log has it) leaves a queue that is still
        // consistent: every entry is a complete job.
        self.0
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Jobs queued and not finished (`INFO gpucache`).
    pub fn pending(&self) -> usize {
        self.lock().len()
    }

    /// Forgets the jobs of a database (`FLUSHDB`, `SWAPDB`) or of all (`None`: `FLUSHALL`, a
    /// load).
    pub fn forget_db(&self, db: Option<i32>) {
        self.lock().retain(|j| db.is_some_and(|db| j.db() != db));
    }

    /// `SWAPDB a b`: each db's jobs now run in the other.
    pub fn swap_dbs(&self, a: i32, b: i32) {
        for j in self.lock().iter_mut() {
            let db = j.db_mut();
            *db = crate::regions::swap(*db, a, b);
        }
    }

    /// Runs slices of queued jobs (`run_slice` returns the job to go on with, if any) until
    /// `deadline`. Returns whether a job is left that could run now (the ticker then comes
    /// back at once).
    pub fn on_tick(
        &self,
        ctx: &Context,
        now_ms: i64,
        deadline: Instant,
        run_slice: impl Fn(&Context, J, i64) -> Option<J>,
    ) -> bool {
        let original = selected_db(ctx);
        let mut waiting = Vec::new();
        let mut unfinished = false;
        loop {
            let popped = self.lock().pop_front();
            let Some(mut next) = popped else { break };
            if *next.not_before_ms_mut() > now_ms {
                waiting.push(next);
                continue;
            }
            if Instant::now() >= deadline {
                self.lock().push_front(next);
                unfinished = true;
                break;
            }
            if !select_db(ctx, next.db()) {
                continue;
            }
            if let Some(rest) = run_slice(ctx, next, now_ms) {
                self.lock().push_front(rest);
            }
        }
        self.lock().extend(waiting);
        select_db(ctx, original);
        unfinished
    }
}

/// Whether a slice of `job` may write the region whose keys start with `prefix` now; a job
/// that must wait gets its retry time.
pub fn access<J: Job>(store: &Store, prefix: &str, job: &mut J, now_ms: i64) -> Access {
    match store.write_access(prefix) {
        WriteAccess::Now => Access::Now,
        WriteAccess::Later => {
            *job.not_before_ms_mut() = now_ms.saturating_add(RETRY_MS);
            Access::Later
        }
        WriteAccess::Elsewhere => Access::Elsewhere,
    }
}
