//! `CHECK` and `REPAIR` of a large region: surveyed in a forked child, not on the main thread.
//!
//! A survey reads every record of a region (~19 µs per GPU: 1.9 s for 100,000 GPUs), and its
//! findings hold only if nothing writes to the region while it reads: slices on the main thread
//! would let writes in between and report what no moment ever held. So a region of more than
//! `gpucache.survey-inline-max` GPUs and bookings is surveyed by a child process forked with
//! `RedisModule_Fork`, as Redis's own `BGSAVE` is: the child reads a copy-on-write snapshot of
//! the dataset while the server goes on answering everyone else, and hands its findings back as
//! JSON in an anonymous memory file. Only the calling client waits (blocked, not holding).
//!
//! - `CHECK` answers from the snapshot: what the region held at the moment of the call.
//! - `REPAIR` applies the snapshot's fixes to the region only as the child saw it. From the fork
//!   until the fixes are written the region's write commands are refused with `TRYAGAIN`, and
//!   any other write to its keys (the module's own timers, another client) is seen by keyspace
//!   event and makes the repair survey again, up to [`MAX_SURVEYS`] times.
//! - Redis runs one child at a time: while a save or an AOF rewrite runs, surveys wait for it,
//!   and a save waits for a survey.
//!
//! Inside `MULTI`, a script or another module's call, a client cannot be blocked: there the
//! survey runs inline, as for a small region.

use crate::commands::Out;
use crate::config::{get, SURVEY_INLINE_MAX};
use crate::core::error::{MarketError, MarketResult};
use crate::keys::RegionKeys;
use crate::repair::Repair;
use crate::store::{select_db, selected_db, Store};
use crate::survey::Survey;
use redis_module::logging::RedisLogLevel;
use redis_module::{raw, Context, ContextFlags};
use std::collections::VecDeque;
use std::ffi::{c_int, c_void, CString};
use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::fd::FromRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// Surveys one repair may take before it gives up on a region that keeps changing.
const MAX_SURVEYS: u32 = 5;
/// A child running this long is stuck (a survey of 1,000,000 GPUs takes ~20 s): it is killed.
const CHILD_TIMEOUT_MS: i64 = 600_000;
/// The longest wait before a repair the module queued itself is tried again.
const LONGEST_RETRY_MS: i64 = 60_000;
/// Time one timer call may spend writing a repair's fixes before it yields to clients.
const STEP_BUDGET: Duration = Duration::from_millis(2);
/// How soon the next call goes on with them.
const STEP_AGAIN: Duration = Duration::from_millis(1);

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Purpose {
    Check,
    Repair,
}

/// A blocked client, answered from the main thread when its survey is done.
struct Client(*mut raw::RedisModuleBlockedClient);

// SAFETY: the pointer is only used on the main thread (cron, timers, commands); it crosses
// threads only inside the state's mutex.
unsafe impl Send for Client {}

struct Job {
    db: i32,
    region: String,
    purpose: Purpose,
    /// `None`: a repair the module queued itself (`heal.rs`).
    client: Option<Client>,
    surveys: u32,
    not_before_ms: i64,
}

struct Running {
    job: Job,
    pid: c_int,
    file: File,
    started_ms: i64,
    /// (exit code, signal) once Redis reaped the child.
    exit: Option<(c_int, c_int)>,
}

/// A repair whose survey came back: its fixes are written by a timer (writes outside a command
/// are made in timers, so they reach replicas and the AOF as one unit), [`STEP_BUDGET`] of
/// them per call.
struct Ready {
    job: Job,
    work: Work,
}

enum Work {
    Survey(Survey),
    Repair(Box<Repair>),
}

#[derive(Default)]
struct State {
    waiting: VecDeque<Job>,
    running: Option<Running>,
    /// A finished child's findings being parsed on a thread of their own (a repair's may be
    /// megabytes of JSON: tens of milliseconds the main thread does not wait).
    reading: bool,
    read: Option<(Job, Result<Findings, String>)>,
    ready: Option<Ready>,
    /// The region a repair is surveying or about to repair, and the writes seen on its keys
    /// since its child was forked.
    watched: Option<(String, u64)>,
}

static STATE: Mutex<Option<State>> = Mutex::new(None);
/// Set while a repair watches its region: keyspace events skip the lock otherwise.
static WATCHING: AtomicBool = AtomicBool::new(false);
/// Set in the forked child, which must touch no lock the parent's threads may have held.
static IN_CHILD: AtomicBool = AtomicBool::new(false);
static FORKED: AtomicU64 = AtomicU64::new(0);
static REPAIR_STEPS: AtomicU64 = AtomicU64::new(0);

fn state() -> MutexGuard<'static, Option<State>> {
    STATE
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn with_state<T>(work: impl FnOnce(&mut State) -> T) -> T {
    work(state().get_or_insert_with(State::default))
}

/// Surveys forked since the module loaded (`INFO gpucache`).
pub fn forked() -> u64 {
    FORKED.load(Ordering::Relaxed)
}

/// Timer calls that wrote fixes of a repair surveyed in a child (`INFO gpucache`).
pub fn repair_steps() -> u64 {
    REPAIR_STEPS.load(Ordering::Relaxed)
}

/// Surveys waiting for a child, and whether one runs (`INFO gpucache`).
pub fn pending() -> u64 {
    with_state(|s| s.waiting.len() as u64 + u64::from(s.running.is_some() || s.ready.is_some()))
}

pub fn in_child() -> bool {
    IN_CHILD.load(Ordering::Relaxed)
}

/// Whether `CHECK`/`REPAIR` of `region` should be surveyed in a child.
pub fn should_fork(store: &Store, region: &str) -> bool {
    let flags = store.ctx().get_flags();
    let cannot_block = ContextFlags::MULTI
        | ContextFlags::LUA
        | ContextFlags::DENY_BLOCKING
        | ContextFlags::LOADING;
    // SAFETY: reading function pointers Redis filled at load.
    let (fork, block) = unsafe { (raw::RedisModule_Fork, raw::RedisModule_BlockClient) };
    let can_fork = fork.is_some() && block.is_some();
    if !can_fork || flags.intersects(cannot_block) {
        return false;
    }
    let keys = RegionKeys::new(region);
    let size = store
        .length(&keys.gpu_registry())
        .saturating_add(store.length(&keys.booking_registry()));
    i64::try_from(size).unwrap_or(i64::MAX) > get(&SURVEY_INLINE_MAX)
}

/// `CHECK` of a large region: blocks the caller and surveys in a child.
pub fn check(ctx: &Context, region: &str) -> MarketResult<()> {
    enqueue(ctx, region, Purpose::Check, Some(block(ctx)?));
    Ok(())
}

/// `REPAIR` of a large region: blocks the caller, surveys in a child, then applies the fixes.
pub fn repair(ctx: &Context, region: &str) -> MarketResult<()> {
    enqueue(ctx, region, Purpose::Repair, Some(block(ctx)?));
    Ok(())
}

/// A repair the module queued itself (`heal.rs`), once per region.
pub fn repair_queued(ctx: &Context, region: &str) {
    let db = selected_db(ctx);
    let known = with_state(|s| {
        let same = |job: &Job| job.client.is_none() && job.db == db && job.region == region;
        s.waiting.iter().any(same)
            || s.running.as_ref().is_some_and(|r| same(&r.job))
            || s.ready.as_ref().is_some_and(|r| same(&r.job))
    });
    if !known {
        enqueue(ctx, region, Purpose::Repair, None);
    }
}

/// Write commands on a region being repaired from a child's survey are turned away: the fixes
/// are for the region as the child saw it.
pub fn refuse_while_repaired(region: &str) -> MarketResult<()> {
    if !WATCHING.load(Ordering::Relaxed) {
        return Ok(());
    }
    let repaired = with_state(|s| s.watched.as_ref().is_some_and(|(r, _)| r == region));
    if repaired {
        return Err(MarketError::TryAgain(format!(
            "region {region} is being repaired (GPUCACHE.REPAIR); retry shortly"
        )));
    }
    Ok(())
}

/// Counts a write to a key of the watched region (from the keyspace-event callback).
pub fn note_write(key: &[u8]) {
    if !WATCHING.load(Ordering::Relaxed) || in_child() {
        return;
    }
    let Some(region) = key
        .strip_prefix(b"gpucache:{")
        .and_then(|rest| rest.iter().position(|&b| b == b'}').map(|end| &rest[..end]))
    else {
        return;
    };
    with_state(|s| {
        if let Some((watched, writes)) = s.watched.as_mut() {
            if watched.as_bytes() == region {
                *writes = writes.saturating_add(1);
            }
        }
    });
}

fn block(ctx: &Context) -> MarketResult<Client> {
    // SAFETY: called from a command; no callbacks: replies are written through a thread-safe
    // context of the blocked client and delivered when it is unblocked.
    let client = unsafe {
        raw::RedisModule_BlockClient
            .map(|block| block(ctx.get_raw(), None, None, None, 0))
            .unwrap_or(std::ptr::null_mut())
    };
    if client.is_null() {
        return Err(MarketError::Internal("cannot block the client".into()));
    }
    Ok(Client(client))
}

fn enqueue(ctx: &Context, region: &str, purpose: Purpose, client: Option<Client>) {
    with_state(|s| {
        s.waiting.push_back(Job {
            db: selected_db(ctx),
            region: region.to_owned(),
            purpose,
            client,
            surveys: 0,
            not_before_ms: 0,
        })
    });
    start_next(ctx);
}

/// From the server's cron (10 times a second by default): takes a finished child's findings,
/// kills a stuck child, starts the next survey.
pub fn tick(ctx: &Context) {
    let finished = with_state(|s| {
        let now = Store::new(ctx).now_ms();
        let running = s.running.as_ref()?;
        if running.exit.is_none() && now.saturating_sub(running.started_ms) > CHILD_TIMEOUT_MS {
            // SAFETY: the pid is our own child's; Redis reaps it and calls `child_done`.
            unsafe {
                if let Some(kill) = raw::RedisModule_KillForkChild {
                    kill(running.pid);
                }
            }
        }
        if running.exit.is_some() {
            s.running.take()
        } else {
            None
        }
    });
    if let Some(running) = finished {
        read_aside(running);
    }
    if let Some((job, findings)) = with_state(|s| s.read.take()) {
        crate::logging::guarded(|| finish(ctx, job, findings));
    }
    start_next(ctx);
}

fn read_aside(running: Running) {
    with_state(|s| s.reading = true);
    // Held where both the thread and this function can take it: a thread that cannot be
    // started leaves it here, to be read on the main thread after all.
    let slot = Arc::new(Mutex::new(Some(running)));
    let theirs = Arc::clone(&slot);
    let spawned = std::thread::Builder::new()
        .name("gpucache-survey".into())
        .spawn(move || read_into_state(&theirs));
    if spawned.is_err() {
        read_into_state(&slot);
    }
}

fn read_into_state(slot: &Mutex<Option<Running>>) {
    let taken = slot
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
        .take();
    let Some(mut running) = taken else {
        return;
    };
    let findings = crate::logging::guarded(|| read_findings(&mut running))
        .unwrap_or_else(|| Err("the survey's findings could not be read".to_owned()));
    with_state(|s| {
        s.reading = false;
        s.read = Some((running.job, findings));
    });
}

fn start_next(ctx: &Context) {
    if ctx.get_flags().contains(ContextFlags::LOADING) {
        return;
    }
    let now = Store::new(ctx).now_ms();
    let job = with_state(|s| {
        if s.running.is_some() || s.reading || s.read.is_some() || s.ready.is_some() {
            return None;
        }
        let due = s.waiting.iter().position(|j| j.not_before_ms <= now)?;
        s.waiting.remove(due)
    });
    let Some(job) = job else {
        return;
    };
    if let Err(job) = fork(ctx, job) {
        // A save or rewrite holds Redis's one child: the next tick tries again.
        with_state(|s| s.waiting.push_front(job));
    }
}

fn memory_file() -> Option<File> {
    // SAFETY: a NUL-terminated name; the fd returned is owned by the File below.
    let fd = unsafe { libc::memfd_create(c"gpucache-survey".as_ptr(), libc::MFD_CLOEXEC) };
    // SAFETY: a fresh descriptor nothing else owns.
    (fd >= 0).then(|| unsafe { File::from_raw_fd(fd) })
}

fn fork(ctx: &Context, job: Job) -> Result<(), Job> {
    // SAFETY: reading a function pointer Redis filled at load.
    let Some(fork) = (unsafe { raw::RedisModule_Fork }) else {
        return Err(job);
    };
    let Some(file) = memory_file() else {
        return Err(job);
    };
    if job.purpose == Purpose::Repair {
        with_state(|s| s.watched = Some((job.region.clone(), 0)));
        WATCHING.store(true, Ordering::Relaxed);
    }
    // No lock of ours is held across the fork: the child could never take it.
    // SAFETY: `child_done` matches the done-handler signature and uses no user data.
    let pid = unsafe { fork(Some(child_done), std::ptr::null_mut()) };
    if pid == 0 {
        IN_CHILD.store(true, Ordering::Relaxed);
        survey_in_child(ctx, &job, file);
    }
    if pid < 0 {
        unwatch();
        return Err(job);
    }
    FORKED.fetch_add(1, Ordering::Relaxed);
    let started_ms = Store::new(ctx).now_ms();
    with_state(|s| {
        s.running = Some(Running {
            job,
            pid,
            file,
            started_ms,
            exit: None,
        })
    });
    Ok(())
}

fn unwatch() {
    WATCHING.store(false, Ordering::Relaxed);
    with_state(|s| s.watched = None);
}

/// What the child hands back: the survey (findings cut to what `CHECK` shows, for a check) and
/// how many findings there were.
#[derive(serde::Serialize, serde::Deserialize)]
struct Findings {
    total: usize,
    survey: Survey,
}

fn survey_in_child(ctx: &Context, job: &Job, mut file: File) -> ! {
    let outcome = crate::logging::guarded(|| {
        if !select_db(ctx, job.db) {
            return Err(format!("db {} is gone", job.db));
        }
        let mut survey =
            crate::survey::survey(&Store::new(ctx), &job.region).map_err(|e| e.to_string())?;
        let total = survey.findings.len();
        if job.purpose == Purpose::Check {
            survey
                .findings
                .truncate(crate::commands::check::MAX_REPORTED);
        }
        Ok(Findings { total, survey })
    })
    .unwrap_or_else(|| Err("the survey failed (see the server log)".to_owned()));
    let written = serde_json::to_vec(&outcome)
        .ok()
        .is_some_and(|bytes| file.write_all(&bytes).is_ok());
    let code = c_int::from(!written);
    // SAFETY: ends the child without running the parent's exit handlers.
    unsafe {
        if let Some(exit) = raw::RedisModule_ExitFromChild {
            exit(code);
        }
        libc::_exit(code)
    }
}

extern "C" fn child_done(exit_code: c_int, by_signal: c_int, _: *mut c_void) {
    with_state(|s| {
        if let Some(running) = s.running.as_mut() {
            running.exit = Some((exit_code, by_signal));
        }
    });
}

fn read_findings(running: &mut Running) -> Result<Findings, String> {
    match running.exit {
        Some((0, 0)) => {}
        Some((_, signal)) if signal != 0 => {
            return Err(format!("the survey's child was killed by signal {signal}"))
        }
        _ => return Err("the survey's child failed (see the server log)".to_owned()),
    }
    let mut bytes = Vec::new();
    running
        .file
        .seek(SeekFrom::Start(0))
        .and_then(|_| running.file.read_to_end(&mut bytes))
        .map_err(|e| format!("cannot read the survey's findings: {e}"))?;
    serde_json::from_slice::<Result<Findings, String>>(&bytes)
        .map_err(|e| format!("unreadable survey findings: {e}"))?
}

fn finish(ctx: &Context, job: Job, findings: Result<Findings, String>) {
    match (job.purpose, findings) {
        (Purpose::Check, Ok(found)) => answer(
            job.client,
            Ok(crate::commands::check::reply(
                &job.region,
                &found.survey,
                found.total,
            )),
        ),
        (Purpose::Check, Err(e)) => answer(job.client, Err(format!("ERR {e}"))),
        (Purpose::Repair, Ok(found)) => {
            if changed_since_fork() {
                survey_again(ctx, job);
            } else {
                with_state(|s| {
                    s.ready = Some(Ready {
                        job,
                        work: Work::Survey(found.survey),
                    })
                });
                ctx.create_timer(Duration::ZERO, apply_ready, ());
            }
        }
        (Purpose::Repair, Err(e)) => {
            unwatch();
            failed(ctx, job, &e);
        }
    }
}

fn changed_since_fork() -> bool {
    with_state(|s| s.watched.as_ref().is_some_and(|(_, writes)| *writes > 0))
}

/// The region changed while its child surveyed it: the findings may be wrong, survey again.
fn survey_again(ctx: &Context, mut job: Job) {
    unwatch();
    job.surveys = job.surveys.saturating_add(1);
    if job.surveys >= MAX_SURVEYS && job.client.is_some() {
        let message = format!(
            "TRYAGAIN region {} kept changing while it was surveyed ({} surveys): run \
             GPUCACHE.REPAIR again",
            job.region, job.surveys
        );
        answer(job.client, Err(message));
        return;
    }
    with_state(|s| s.waiting.push_front(job));
    start_next(ctx);
}

fn failed(ctx: &Context, mut job: Job, reason: &str) {
    if job.client.is_some() {
        answer(job.client, Err(format!("ERR {reason}")));
        return;
    }
    job.surveys = job.surveys.saturating_add(1);
    let delay = 1_000i64
        .saturating_mul(1i64 << job.surveys.min(10))
        .min(LONGEST_RETRY_MS);
    if job.surveys == 1 || job.surveys.is_multiple_of(10) {
        crate::log(
            ctx,
            RedisLogLevel::Warning,
            &format!(
                "gpucache: repairing region {} failed ({reason}); retrying in {delay} ms",
                job.region
            ),
        );
    }
    job.not_before_ms = Store::new(ctx).now_ms().saturating_add(delay);
    with_state(|s| s.waiting.push_back(job));
}

fn apply_ready(ctx: &Context, _: ()) {
    let Some(ready) = with_state(|s| s.ready.take()) else {
        return;
    };
    // Between two calls only the module's own timers or another client's hand could write to
    // the region (its commands are refused): the rest of the fixes may no longer fit it.
    if changed_since_fork() {
        survey_again(ctx, ready.job);
        return;
    }
    let job = ready.job;
    REPAIR_STEPS.fetch_add(1, Ordering::Relaxed);
    let deadline = Instant::now() + STEP_BUDGET;
    let original = selected_db(ctx);
    let outcome = if select_db(ctx, job.db) {
        crate::logging::guarded(|| {
            let mut repair = match ready.work {
                Work::Survey(survey) => Box::new(Repair::new(ctx, &job.region, survey)),
                Work::Repair(repair) => repair,
            };
            repair.step(ctx, Some(deadline));
            if repair.left() > 0 {
                Ok(Err(repair))
            } else {
                repair.finish(ctx).map(Ok)
            }
        })
        .unwrap_or_else(|| Err(MarketError::Internal("the repair failed".into())))
    } else {
        Err(MarketError::Internal(format!("db {} is gone", job.db)))
    };
    select_db(ctx, original);
    // Its own writes are not the region changing under it.
    with_state(|s| {
        if let Some((_, writes)) = s.watched.as_mut() {
            *writes = 0;
        }
    });
    match outcome {
        Ok(Err(repair)) => {
            with_state(|s| {
                s.ready = Some(Ready {
                    job,
                    work: Work::Repair(repair),
                })
            });
            ctx.create_timer(STEP_AGAIN, apply_ready, ());
            return;
        }
        Ok(Ok(report)) => {
            unwatch();
            if job.client.is_some() {
                let reply = crate::commands::repair::reply(&job.region, &report);
                answer(job.client, Ok(reply));
            } else if report.failed_writes > 0 {
                failed(ctx, job, "some repair writes were refused");
            }
        }
        Err(e) => {
            unwatch();
            failed(ctx, job, &e.to_string());
        }
    }
    start_next(ctx);
}

/// Replies to a blocked client and unblocks it (on the main thread).
fn answer(client: Option<Client>, reply: Result<Out, String>) {
    let Some(Client(client)) = client else {
        return;
    };
    // SAFETY: `client` came from RedisModule_BlockClient and is unblocked exactly once, here;
    // the thread-safe context is freed before that. The main thread needs no lock to reply.
    unsafe {
        let (Some(get), Some(free), Some(unblock)) = (
            raw::RedisModule_GetThreadSafeContext,
            raw::RedisModule_FreeThreadSafeContext,
            raw::RedisModule_UnblockClient,
        ) else {
            return;
        };
        let ctx = get(client);
        match reply {
            Ok(out) => out.emit(ctx),
            Err(message) => {
                let text = crate::core::input::shown(message.as_bytes(), 4096);
                let text = CString::new(text).unwrap_or_default();
                if let Some(error) = raw::RedisModule_ReplyWithError {
                    error(ctx, text.as_ptr());
                }
            }
        }
        free(ctx);
        unblock(client, std::ptr::null_mut());
    }
}
