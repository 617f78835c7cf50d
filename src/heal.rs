//! Healing after a record disappears on its own (TTL expiry or eviction), and the queue that
//! makes sure no repair is ever dropped.
//!
//! Redis reports the deletion through a keyspace event, but writing from inside that callback
//! is unsafe on Redis 7.0, so the callback only queues the key and arms a 1 ms timer; the
//! timer runs on the main thread like a command, repairs the indexes with replicated writes and
//! publishes the usual events. Only the primary heals: a replica receives the primary's repairs
//! through replication. Until the repair runs, reads already skip index entries whose record is
//! gone, so no read ever returns an expired GPU.
//!
//! A repair Redis refuses to write (the cluster is down, the region's slot is not served here,
//! the server is loading) stays queued and is retried with a growing delay until it succeeds;
//! one whose writes failed half-way becomes a repair of its whole region (`repair.rs`), which
//! recounts rather than replays, so retrying it is always safe. Each timer call works for at
//! most a few milliseconds and leaves the rest for the next.

use crate::core::booking::{Booking, BookingTerms};
use crate::core::error::MarketResult;
use crate::core::events::{notify, Event, EventKind};
use crate::core::gpu::{GpuRecord, RegistryEntry};
use crate::core::price::Price;
use crate::core::status::GpuStatus;
use crate::keys::RegionKeys;
use crate::market::{stat, BookingEnd, Region};
use crate::store::{select_db, selected_db, Store, WriteAccess};
use crate::sweep::SweepProgress;
use redis_module::logging::RedisLogLevel;
use redis_module::{Context, ContextFlags};
use std::collections::{BTreeSet, VecDeque};
use std::sync::{LazyLock, Mutex, MutexGuard};
use std::time::{Duration, Instant};

#[derive(Debug, Clone, PartialEq, Eq)]
enum Target {
    /// A record that expired or was evicted: repair what it left behind.
    Key(String),
    /// Repair (recount, rebuild) a whole region.
    Region(String),
    /// After a load or a promotion: heal the records whose time passed meanwhile, and repair the
    /// region whole only if a cheap look finds more wrong. Runs in slices (`sweep.rs`), the
    /// job carrying its progress from one timer call to the next.
    Sweep {
        region: String,
        progress: Box<SweepProgress>,
    },
    /// The next slice of the GPUs of a type whose price expired going back to their own
    /// prices (`heal_type_price`).
    TypePrice { region: String, gpu_type: String },
}

impl Target {
    fn sweep(region: &str) -> Target {
        Target::Sweep {
            region: region.to_owned(),
            progress: Box::default(),
        }
    }
}

#[derive(Debug, Clone)]
struct Job {
    db: i32,
    target: Target,
    attempts: u32,
    not_before_ms: i64,
}

#[derive(Default)]
struct Queue {
    /// Keys whose records vanished, packed back to back from `read` on, each as
    /// `[db: i32][len: u32][key]`. Evictions are announced while Redis is freeing memory, and
    /// whatever this queue allocates counts against `maxmemory`: a few bytes beyond the key
    /// itself per entry keep healing from costing more evictions than it answers.
    fresh: Vec<u8>,
    read: usize,
    /// Entries in `fresh` after `read`.
    fresh_count: usize,
    /// Region repairs, sweeps and their retries (few): each with its attempt count and time.
    jobs: VecDeque<Job>,
    /// Regions with a whole-region repair queued, and with a sweep queued (each once).
    regions: BTreeSet<(i32, String)>,
    sweeps: BTreeSet<(i32, String)>,
    /// When the earliest armed timer fires (ms), if one is armed.
    timer_due_ms: Option<i64>,
    retries: u64,
    healed: u64,
    region_repairs: u64,
    sweep_slices: u64,
    type_price_slices: u64,
}

impl Queue {
    fn push_fresh(&mut self, db: i32, key: &str) -> bool {
        if self.fresh.len() - self.read >= MAX_FRESH_BYTES {
            return false;
        }
        let Ok(len) = u32::try_from(key.len()) else {
            return false;
        };
        self.fresh.extend_from_slice(&db.to_le_bytes());
        self.fresh.extend_from_slice(&len.to_le_bytes());
        self.fresh.extend_from_slice(key.as_bytes());
        self.fresh_count += 1;
        true
    }

    fn pop_fresh(&mut self) -> Option<(i32, String)> {
        let rest = self.fresh.get(self.read..)?;
        let db = i32::from_le_bytes(rest.get(..4)?.try_into().ok()?);
        let len = u32::from_le_bytes(rest.get(4..8)?.try_into().ok()?) as usize;
        let key = String::from_utf8_lossy(rest.get(8..8 + len)?).into_owned();
        self.read += 8 + len;
        self.fresh_count = self.fresh_count.saturating_sub(1);
        if self.read >= self.fresh.len() {
            self.fresh.clear();
            self.read = 0;
            if self.fresh.capacity() > FRESH_RESERVE {
                self.fresh = Vec::with_capacity(FRESH_RESERVE);
            }
        } else if self.read > 64 * 1024 && self.read * 2 > self.fresh.len() {
            self.fresh.drain(..self.read);
            self.read = 0;
        }
        Some((db, key))
    }
}

static QUEUE: LazyLock<Mutex<Queue>> = LazyLock::new(|| Mutex::new(Queue::default()));

fn queue() -> MutexGuard<'static, Queue> {
    QUEUE
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Bytes of vanished keys queued one by one; beyond this a mass expiry is handled as repairs
/// of whole regions (one job per region), so the queue stays bounded and nothing is dropped.
const MAX_FRESH_BYTES: usize = 64 * 1024 * 1024;
/// Time one timer call may spend repairing before it yields to clients.
const BUDGET: Duration = Duration::from_millis(2);
/// Retry delays double from the first to the last.
const FIRST_RETRY_MS: i64 = 100;
const LAST_RETRY_MS: i64 = 5_000;
/// Attempts at a region whose slot another node serves before giving it up (about a minute),
/// once none of the region's keys is left here.
const GIVE_UP_ELSEWHERE: u32 = 16;

/// What `INFO gpucache` shows of healing.
#[derive(Debug, Clone, Copy, Default)]
pub struct HealFigures {
    pub queued: usize,
    pub retrying: usize,
    pub retries: u64,
    pub healed: u64,
    pub region_repairs: u64,
    /// Timer calls that worked on a sweep (a big region's sweep takes many).
    pub sweep_slices: u64,
    /// Slices of type-price heals run (a type of many GPUs takes many).
    pub type_price_slices: u64,
}

pub fn figures() -> HealFigures {
    let queue = queue();
    HealFigures {
        queued: queue.jobs.len() + queue.fresh_count,
        retrying: queue.jobs.iter().filter(|j| j.attempts > 0).count(),
        retries: queue.retries,
        healed: queue.healed,
        region_repairs: queue.region_repairs,
        sweep_slices: queue.sweep_slices,
        type_price_slices: queue.type_price_slices,
    }
}

/// Whether a key name is one of gpucache's records that healing follows. Names gpucache's
/// parsers would refuse (another client's keys under the prefix) are ignored.
fn healable(key: &str) -> bool {
    let Some((region, entity, id)) = RegionKeys::parse(key) else {
        return false;
    };
    matches!(entity, "gpu" | "booking" | "price")
        && crate::core::input::region(region.as_bytes()).is_ok()
        && crate::core::input::id("id", id.as_bytes()).is_ok()
}

/// Room for this many bytes of vanished keys is taken when the module loads, so a burst of
/// evictions (about 2,000 keys) queues its repairs without allocating while Redis frees memory.
const FRESH_RESERVE: usize = 64 * 1024;

/// Takes the queue's room (from the module's load).
pub fn reserve() {
    queue().fresh.reserve(FRESH_RESERVE);
}

/// Keyspace-event handler for `expired` and `evicted`.
pub fn on_key_gone(ctx: &Context, key: &[u8]) {
    let Ok(key) = std::str::from_utf8(key) else {
        return;
    };
    if !healable(key) {
        return;
    }
    let db = selected_db(ctx);
    let overflow = !queue().push_fresh(db, key);
    if overflow {
        if let Some((region, _, _)) = RegionKeys::parse(key) {
            queue_region_repair(ctx, region);
        }
    }
    arm(ctx, 1);
}

/// Queues a repair of a whole region (once: a region already queued is not queued again).
pub fn queue_region_repair(ctx: &Context, region: &str) {
    queue_region_repair_in(ctx, selected_db(ctx), region);
}

fn queue_region_repair_in(ctx: &Context, db: i32, region: &str) {
    {
        let mut queue = queue();
        if !queue.regions.insert((db, region.to_owned())) {
            return;
        }
        queue.jobs.push_back(Job {
            db,
            target: Target::Region(region.to_owned()),
            attempts: 0,
            not_before_ms: 0,
        });
    }
    arm(ctx, 1);
}

/// Queues a repair of every region this server holds: after a load (records whose time
/// passed while the server was down are not loaded, and nothing announces them) and after a
/// promotion (repairs the old primary had queued). One job per region, worked through within
/// the timer's budget like any other.
pub fn queue_every_region(ctx: &Context) {
    for (db, region) in crate::regions::known_everywhere() {
        queue_sweep_in(ctx, db, &region);
    }
}

/// A region arrived on this node (its counters came by `MIGRATE`/`RESTORE`): once the slot is
/// wholly this node's (until then the sweep is refused and retried), heal the records that
/// expired on the old owner while the slot moved, which nothing announced here.
pub fn queue_sweep_of_arrived(ctx: &Context, region: &str) {
    queue_sweep_in(ctx, selected_db(ctx), region);
}

/// Queues a sweep of a region (once): heals its vanished records, and repairs it whole if a
/// cheap look finds more wrong. A sweep already under way starts over: what it walked before
/// may have been replaced since (a load), and its scan cursor means nothing in a new hash.
fn queue_sweep_in(ctx: &Context, db: i32, region: &str) {
    {
        let mut queue = queue();
        if queue.sweeps.insert((db, region.to_owned())) {
            queue.jobs.push_back(Job {
                db,
                target: Target::sweep(region),
                attempts: 0,
                not_before_ms: 0,
            });
        } else if let Some(job) = queue.jobs.iter_mut().find(|j| {
            j.db == db && matches!(&j.target, Target::Sweep { region: r, .. } if r == region)
        }) {
            job.target = Target::sweep(region);
        }
    }
    arm(ctx, 1);
}

/// Makes sure a timer fires within `delay_ms`: one armed for later (a retry's back-off) does
/// not hold back a key that just vanished.
fn arm(ctx: &Context, delay_ms: i64) {
    let delay = delay_ms.clamp(1, LAST_RETRY_MS);
    let due = Store::new(ctx).now_ms().saturating_add(delay);
    let must_arm = {
        let mut queue = queue();
        let earlier = queue.timer_due_ms.is_none_or(|armed| due < armed);
        if earlier {
            queue.timer_due_ms = Some(due);
        }
        earlier
    };
    if must_arm {
        let delay = u64::try_from(delay).unwrap_or(1);
        ctx.create_timer(Duration::from_millis(delay), drain, ());
    }
}

fn drain(ctx: &Context, _: ()) {
    // A later timer may still be armed: it finds the queue done and arms nothing.
    queue().timer_due_ms = None;
    let flags = ctx.get_flags();
    if flags.contains(ContextFlags::SLAVE) {
        // The primary repairs; its writes arrive by replication. A promotion queues every
        // region again.
        let mut queue = queue();
        queue.jobs.clear();
        queue.regions.clear();
        queue.sweeps.clear();
        queue.fresh.clear();
        queue.read = 0;
        queue.fresh_count = 0;
        return;
    }
    if flags.contains(ContextFlags::LOADING) {
        arm(ctx, FIRST_RETRY_MS);
        return;
    }
    let deadline = Instant::now() + BUDGET;
    let original = selected_db(ctx);
    let mut deferred: Vec<Job> = Vec::new();
    while Instant::now() < deadline {
        let now = Store::new(ctx).now_ms();
        let Some(job) = next_job(now) else {
            break;
        };
        // A job that panics (a bug; the log has it) is dropped rather than retried forever.
        if let Some(Some(retry)) = crate::logging::guarded(|| run(ctx, job, now, deadline)) {
            deferred.push(retry);
        }
    }
    select_db(ctx, original);
    let next_delay = {
        let mut queue = queue();
        for job in deferred {
            queue.retries += 1;
            queue.jobs.push_back(job);
        }
        let now = Store::new(ctx).now_ms();
        let fresh = (queue.fresh_count > 0).then_some(0);
        queue
            .jobs
            .iter()
            .map(|j| j.not_before_ms.saturating_sub(now))
            .chain(fresh)
            .min()
    };
    if let Some(delay) = next_delay {
        arm(ctx, delay);
    }
}

/// The first job that may run now: a due region repair or retry, else the next vanished key,
/// else a due sweep. A sweep takes many timer calls: records that vanish meanwhile are healed
/// first.
fn next_job(now_ms: i64) -> Option<Job> {
    let mut queue = queue();
    let due = |j: &Job| j.not_before_ms <= now_ms;
    let index = match queue
        .jobs
        .iter()
        .position(|j| due(j) && !matches!(j.target, Target::Sweep { .. }))
    {
        Some(index) => index,
        None => {
            if let Some((db, key)) = queue.pop_fresh() {
                return Some(Job {
                    db,
                    target: Target::Key(key),
                    attempts: 0,
                    not_before_ms: 0,
                });
            }
            queue.jobs.iter().position(due)?
        }
    };
    let job = queue.jobs.remove(index)?;
    match &job.target {
        Target::Region(region) => queue.regions.remove(&(job.db, region.clone())),
        Target::Sweep { region, .. } => queue.sweeps.remove(&(job.db, region.clone())),
        Target::Key(_) | Target::TypePrice { .. } => false,
    };
    Some(job)
}

/// Puts a sweep that has more to do back in the queue, due at once (unless a new sweep of the
/// region was queued meanwhile: that one starts over and replaces it).
fn requeue_sweep(job: Job) {
    let Target::Sweep { region, .. } = &job.target else {
        return;
    };
    let mut queue = queue();
    if queue.sweeps.insert((job.db, region.clone())) {
        queue.jobs.push_back(job);
    }
}

/// Runs one job (a sweep until `deadline`); returns it again (with its next attempt's time)
/// when it must be retried.
fn run(ctx: &Context, mut job: Job, now_ms: i64, deadline: Instant) -> Option<Job> {
    if !select_db(ctx, job.db) {
        return None;
    }
    let region = match &job.target {
        Target::Key(key) => RegionKeys::parse(key).map(|(r, _, _)| r.to_owned())?,
        Target::Region(region)
        | Target::Sweep { region, .. }
        | Target::TypePrice { region, .. } => region.clone(),
    };
    let access = Store::new(ctx).write_access(RegionKeys::new(&region).prefix());
    let outcome = match (&mut job.target, access) {
        // A vanished record whose healing Redis refuses: the region is swept once it accepts
        // writes again (one job per region, however many records vanished meanwhile).
        (Target::Key(_), WriteAccess::Later | WriteAccess::Elsewhere) => {
            queue_sweep_in(ctx, job.db, &region);
            Ok(())
        }
        (_, WriteAccess::Later) => Err("the cluster is down".to_owned()),
        (_, WriteAccess::Elsewhere) => Err("the region's slot is not served here".to_owned()),
        (Target::Key(key), WriteAccess::Now) => {
            if heal_key(ctx, key) {
                // Half-applied: recount the whole region instead of replaying.
                queue_region_repair(ctx, &region);
            }
            queue().healed += 1;
            Ok(())
        }
        (Target::Sweep { progress, .. }, WriteAccess::Now) => {
            let slice = crate::sweep::sweep_slice(ctx, &region, progress, deadline);
            {
                let mut queue = queue();
                queue.sweep_slices += 1;
                if let Ok(slice) = &slice {
                    queue.healed += slice.healed;
                }
            }
            match slice {
                Ok(slice) if !slice.done => {
                    requeue_sweep(job);
                    return None;
                }
                Ok(slice) => {
                    if slice.needs_repair {
                        queue_region_repair(ctx, &region);
                    }
                    Ok(())
                }
                Err(e) => Err(e.to_string()),
            }
        }
        (Target::TypePrice { gpu_type, .. }, WriteAccess::Now) => {
            continue_type_price_heal(ctx, job.db, &region, gpu_type);
            Ok(())
        }
        (Target::Region(_), WriteAccess::Now)
            if crate::survey_fork::should_fork(&Store::new(ctx), &region) =>
        {
            queue().region_repairs += 1;
            crate::survey_fork::repair_queued(ctx, &region);
            Ok(())
        }
        (Target::Region(_), WriteAccess::Now) => {
            queue().region_repairs += 1;
            match crate::repair::repair_region(ctx, &region) {
                Ok(report) if report.failed_writes == 0 => Ok(()),
                Ok(_) => Err("some repair writes were refused".to_owned()),
                Err(e) => Err(e.to_string()),
            }
        }
    };
    let Err(reason) = outcome else {
        return None;
    };
    let attempts = job.attempts.saturating_add(1);
    let what = match &job.target {
        Target::Key(key) => format!("healing after {key}"),
        Target::Region(_) => format!("repairing region {region}"),
        Target::Sweep { .. } => format!("sweeping region {region}"),
        Target::TypePrice { gpu_type, .. } => {
            format!("healing the type price of {gpu_type} in region {region}")
        }
    };
    // A region whose slot another node serves is that node's to repair once it takes charge
    // of it: this one stops asking after a minute, once the region's keys have left it too.
    // While they are still here (the slot is being moved here, however long that takes), it
    // keeps asking every few seconds, and repairs as soon as the slot is its own.
    if access == WriteAccess::Elsewhere
        && attempts > GIVE_UP_ELSEWHERE
        && !crate::regions::is_known(job.db, &region)
    {
        crate::log(
            ctx,
            RedisLogLevel::Warning,
            &format!("gpucache: {what} given up: the region's slot is served by another node"),
        );
        return None;
    }
    let delay = FIRST_RETRY_MS
        .saturating_mul(1i64 << attempts.min(10).saturating_sub(1))
        .min(LAST_RETRY_MS);
    if attempts == 1 || attempts.is_multiple_of(10) {
        crate::log(
            ctx,
            RedisLogLevel::Warning,
            &format!(
                "gpucache: {what} failed ({reason}); attempt {attempts}, retrying in {delay} ms"
            ),
        );
    }
    {
        let mut queue = queue();
        match &job.target {
            Target::Region(region) => queue.regions.insert((job.db, region.clone())),
            Target::Sweep { region, .. } => queue.sweeps.insert((job.db, region.clone())),
            Target::Key(_) | Target::TypePrice { .. } => false,
        };
    }
    // A sweep retried starts over: the region may have changed in any way while it waited.
    let target = match job.target {
        Target::Sweep { .. } => Target::sweep(&region),
        target => target,
    };
    Some(Job {
        target,
        attempts,
        not_before_ms: now_ms.saturating_add(delay),
        ..job
    })
}

/// Completes a pending repair inside a write command that is about to create `key` anew.
///
/// Redis deletes an expired key when a command reads it, and announces it, but the repair runs
/// in a timer just after the command: a `REGISTER` of the same GPU id would otherwise build on
/// the old record's index entries and counters. A record deleted by hand (announced by nothing)
/// is repaired the same way: a `BOOK` reusing the id of a booking whose record is gone gets it
/// rebuilt from its GPU's copy first. Called once the command found the record gone; does
/// nothing when the registry does not list the id. Returns whether it did.
pub fn settle_vanished(ctx: &Context, key: &str) -> bool {
    let Some((region, entity, id)) = RegionKeys::parse(key) else {
        return false;
    };
    let keys = RegionKeys::new(region);
    let registry = match entity {
        "gpu" => keys.gpu_registry(),
        "booking" => keys.booking_registry(),
        _ => return false,
    };
    // Cheap test first: a repair is pending only while the registry still lists the id.
    let store = Store::new(ctx);
    if !matches!(store.hget(&registry, id), Ok(Some(_))) {
        return false;
    }
    if heal_key(ctx, key) {
        queue_region_repair(ctx, region);
    }
    true
}

/// Repairs what one vanished record left behind. Returns whether some of its writes were
/// refused (the region then needs a whole repair).
pub(crate) fn heal_key(ctx: &Context, key: &str) -> bool {
    let Some((region, entity, id)) = RegionKeys::parse(key) else {
        return false;
    };
    let store = Store::new(ctx);
    let region = Region::new(&store, region.to_owned());
    if store.key_type(key) != redis_module::KeyType::Empty {
        return false; // written again since it expired
    }
    if let Err(e) = region.check_key_types(&[]) {
        crate::log(
            ctx,
            RedisLogLevel::Warning,
            &format!("gpucache: cannot heal after {key} ({e}): repairing the region instead"),
        );
        queue_region_repair(ctx, &region.name);
        return false;
    }
    let outcome = match entity {
        "gpu" => heal_gpu(&region, id),
        "booking" => heal_booking(&region, id),
        "price" => heal_type_price(&region, id, true).map(|more| {
            if more {
                queue_type_price_heal(ctx, selected_db(ctx), &region.name, id);
            }
            true
        }),
        _ => Ok(false),
    };
    if let Err(e) = outcome {
        crate::log(
            ctx,
            RedisLogLevel::Warning,
            &format!("gpucache: healing after {key} failed ({e}): repairing the region instead"),
        );
        queue_region_repair(ctx, &region.name);
    }
    store.failed_writes() > 0
}

/// After an RDB/AOF load, repair every region this server holds (on the primary; a replica
/// gets the primary's repairs through replication), and let the booking clock look at all.
#[redis_module_macros::loading_event_handler]
fn after_loading(ctx: &Context, event: redis_module::server_events::LoadingSubevent) {
    crate::logging::guarded(|| {
        if event == redis_module::server_events::LoadingSubevent::Ended {
            crate::stats_cache::all_changed();
            crate::booking_clock::look_again();
            queue_every_region(ctx);
        }
    });
}

/// A replica promoted to primary takes over healing and the booking clock.
#[redis_module_macros::role_changed_event_handler]
fn after_promotion(ctx: &Context, role: redis_module::server_events::ServerRole) {
    crate::logging::guarded(|| {
        if role == redis_module::server_events::ServerRole::Primary {
            crate::booking_clock::look_again();
            queue_every_region(ctx);
        }
    });
}

/// A GPU record vanished. A booked GPU's record is market state and comes back, rebuilt from
/// its registry entry and its booking (it only vanishes by hand or under an `allkeys-*`
/// policy); an idle GPU is dropped from every index using the registry entry kept for it.
pub(crate) fn heal_gpu(region: &Region, gpu_id: &str) -> MarketResult<bool> {
    let store = region.store;
    let registry = region.keys.gpu_registry();
    let Some(entry) = store.hget(&registry, gpu_id)? else {
        return Ok(false);
    };
    let Some(entry) = RegistryEntry::parse(&String::from_utf8_lossy(&entry)) else {
        // A garbled entry says nothing of what the GPU left in the indexes and counters: the
        // region is repaired whole (from a recount).
        crate::heal::queue_region_repair(store.ctx(), &region.name);
        return Ok(false);
    };
    let (gpu_type, provider) = (entry.gpu_type.as_str(), entry.provider.as_str());
    region.check_gpu_key_types(gpu_id, gpu_type, provider)?;
    let booking_registry = region.keys.booking_registry();
    let mut orphan = None;
    if let Some(booking_id) = &entry.booking {
        match region.load_booking(booking_id)? {
            Some(booking) if booking.gpu_id == gpu_id => {
                rebuild_booked_gpu(region, gpu_id, &entry, booking_id, &booking)?;
                return Ok(true);
            }
            // The booking names another GPU: records disagree, a recount decides.
            Some(_) => {
                crate::heal::queue_region_repair(store.ctx(), &region.name);
                return Ok(false);
            }
            // Its record is gone too: its registry entry goes with the GPU.
            None => {
                orphan = store
                    .hget(&booking_registry, booking_id)?
                    .filter(|holder| holder.as_slice() == gpu_id.as_bytes())
                    .map(|_| booking_id.clone());
            }
        }
    }

    region.touch_type(gpu_type, false)?;
    region.unlist(gpu_id, gpu_type)?;
    region.add_to_counter(&stat::type_total(gpu_type), -1);
    store.write(
        "SREM",
        &[
            region.keys.provider_gpus(provider).as_bytes(),
            gpu_id.as_bytes(),
        ],
    );
    store.write("HDEL", &[registry.as_bytes(), gpu_id.as_bytes()]);
    region.add_to_counter(&stat::gpus_with_status(entry.status), -1);
    store.mark_written(&region.keys.gpu(gpu_id));
    if let Some(booking_id) = &orphan {
        store.write("DEL", &[region.keys.booking(booking_id).as_bytes()]);
        store.write(
            "HDEL",
            &[booking_registry.as_bytes(), booking_id.as_bytes()],
        );
        store.write(
            "ZREM",
            &[region.keys.booking_ends().as_bytes(), booking_id.as_bytes()],
        );
        region.add_to_counter(stat::BOOKINGS_ENDED, 1);
    }

    let mut event = Event::new(
        EventKind::GpuAvailabilityChanged,
        &region.name,
        store.now_ms(),
    );
    event.reason = Some("expired");
    event.gpu_id = Some(gpu_id.to_owned());
    event.gpu_type = Some(gpu_type.to_owned());
    event.provider_id = Some(provider.to_owned());
    event.booking_id = orphan;
    event.changed("status", entry.status.as_str(), serde_json::Value::Null);
    region.publish(notify::EXPIRED, event)?;
    Ok(true)
}

/// Writes back the record of a GPU a booking holds, from its registry entry (type, provider)
/// and the booking (who holds it, until when, at what price). What only the lost record knew —
/// its own price and attributes — is not known: it shows the booking's hourly price as its own
/// (older than any type price) until the GPU is registered again.
pub(crate) fn rebuild_booked_gpu(
    region: &Region,
    gpu_id: &str,
    entry: &RegistryEntry,
    booking_id: &str,
    booking: &Booking,
) -> MarketResult<GpuRecord> {
    let store = region.store;
    let now = store.now_ms();
    let held = RegistryEntry {
        status: GpuStatus::Busy,
        gpu_type: entry.gpu_type.clone(),
        provider: entry.provider.clone(),
        booking: Some(booking_id.to_owned()),
    };
    if entry.status != GpuStatus::Busy {
        region.prefetch_status_change(&entry.gpu_type, entry.status, GpuStatus::Busy, &[])?;
    }
    let version = region.next_seq()?;
    let record = GpuRecord::rebuilt_for(
        &entry.gpu_type,
        &entry.provider,
        booking_id,
        booking,
        version,
        now,
    );
    let key = region.keys.gpu(gpu_id);
    store.hset(&key, &record.to_fields());
    if *entry != held {
        region.unlist(gpu_id, &entry.gpu_type)?;
        let text = held.to_string();
        store.write(
            "HSET",
            &[
                region.keys.gpu_registry().as_bytes(),
                gpu_id.as_bytes(),
                text.as_bytes(),
            ],
        );
        region.add_to_counter(&stat::gpus_with_status(entry.status), -1);
        region.add_to_counter(&stat::gpus_with_status(GpuStatus::Busy), 1);
    }
    crate::log(
        store.ctx(),
        RedisLogLevel::Warning,
        &format!(
            "gpucache: region {}: the record of {gpu_id}, held by booking {booking_id}, was lost \
             and is rebuilt from its booking; its own price and attributes are placeholders \
             until it is registered again",
            region.name
        ),
    );
    let mut event = Event::new(EventKind::GpuAvailabilityChanged, &region.name, now);
    event.reason = Some("rebuilt");
    event.gpu_id = Some(gpu_id.to_owned());
    event.gpu_type = Some(record.gpu_type.clone());
    event.provider_id = Some(record.provider.clone());
    event.booking_id = Some(booking_id.to_owned());
    event.version = Some(version);
    event.changed("status", serde_json::Value::Null, GpuStatus::Busy.as_str());
    region.publish(notify::REPAIRED, event)?;
    Ok(record)
}

/// A booking's record vanished. A booking whose time is not up comes back, rebuilt from the
/// copy of its terms on the GPU it holds; one whose time is up (or that no GPU vouches for)
/// ends, and the GPU it held becomes available again.
fn heal_booking(region: &Region, booking_id: &str) -> MarketResult<bool> {
    let store = region.store;
    let registry = region.keys.booking_registry();
    let Some(gpu_id) = store.hget(&registry, booking_id)? else {
        return Ok(false);
    };
    let gpu_id = String::from_utf8_lossy(&gpu_id).into_owned();
    let now = store.now_ms();
    let holder = region
        .load_gpu(&gpu_id)?
        .filter(|g| g.booking.as_deref() == Some(booking_id));
    if let Some(gpu) = &holder {
        if let Some(terms) = &gpu.booking_terms {
            let booking = Booking::from_terms(&gpu_id, terms).holding(&gpu.gpu_type, &gpu.provider);
            if booking.has_ended(now) {
                region.close_booking(booking_id, &booking, BookingEnd::Ended)?;
            } else {
                rebuild_booking(region, booking_id, &booking, terms)?;
            }
            return Ok(true);
        }
    }
    // No copy of its terms (written by an earlier version): it cannot be rebuilt.
    let held = region.held_gpu(&gpu_id, booking_id)?;
    let version = match held {
        Some(_) => Some(region.next_seq()?),
        None => None,
    };
    store.write("HDEL", &[registry.as_bytes(), booking_id.as_bytes()]);
    store.write(
        "ZREM",
        &[region.keys.booking_ends().as_bytes(), booking_id.as_bytes()],
    );
    store.mark_written(&region.keys.booking(booking_id));
    region.add_to_counter(stat::BOOKINGS_ENDED, 1);
    let mut event = Event::new(EventKind::BookingCancelled, &region.name, now);
    event.reason = Some("ended");
    event.booking_id = Some(booking_id.to_owned());
    event.gpu_id = Some(gpu_id.clone());
    if let (Some(held), Some(version)) = (&held, version) {
        region.release(&gpu_id, held, version, now, &mut event)?;
    }
    region.publish(notify::CANCELLED, event)?;
    Ok(true)
}

/// Writes back a booking's record (and its place on the booking clock) from its terms.
pub(crate) fn rebuild_booking(
    region: &Region,
    booking_id: &str,
    booking: &Booking,
    terms: &BookingTerms,
) -> MarketResult<()> {
    let store = region.store;
    store.hset(&region.keys.booking(booking_id), &booking.to_fields());
    let end = terms.end_ms.to_string();
    store.write(
        "ZADD",
        &[
            region.keys.booking_ends().as_bytes(),
            end.as_bytes(),
            booking_id.as_bytes(),
        ],
    );
    crate::log(
        store.ctx(),
        RedisLogLevel::Warning,
        &format!(
            "gpucache: region {}: the record of booking {booking_id} was lost and is rebuilt \
             from the GPU {} that holds it",
            region.name, booking.gpu_id
        ),
    );
    let mut event = Event::new(EventKind::BookingCreated, &region.name, store.now_ms());
    event.reason = Some("rebuilt");
    event.gpu_id = Some(booking.gpu_id.clone());
    event.booking_id = Some(booking_id.to_owned());
    event.user_id = Some(booking.user_id.clone());
    event.new.insert("end_ms".into(), terms.end_ms.into());
    region.publish(notify::REPAIRED, event)?;
    crate::booking_clock::booked(store.ctx(), &region.name, terms.end_ms);
    Ok(())
}

/// GPUs moved back to their own prices per slice of a type-price heal: ~25 µs each keeps a
/// slice well inside the healing timer's budget.
const TYPE_PRICE_SLICE_GPUS: usize = 64;

/// Queues the next slice of a type-price heal, due at once.
fn queue_type_price_heal(ctx: &Context, db: i32, region: &str, gpu_type: &str) {
    queue().jobs.push_back(Job {
        db,
        target: Target::TypePrice {
            region: region.to_owned(),
            gpu_type: gpu_type.to_owned(),
        },
        attempts: 0,
        not_before_ms: 0,
    });
    arm(ctx, 1);
}

/// A later slice of a type-price heal: stops when the type has a price again (a `PRICE`
/// since: its GPUs show that one) or nothing is left to move.
fn continue_type_price_heal(ctx: &Context, db: i32, region_name: &str, gpu_type: &str) {
    let store = Store::new(ctx);
    let region = Region::new(&store, region_name.to_owned());
    if store.key_type(&region.keys.type_price(gpu_type)) != redis_module::KeyType::Empty {
        return;
    }
    let outcome = region
        .check_key_types(&[])
        .and_then(|()| heal_type_price(&region, gpu_type, false));
    match outcome {
        Ok(true) => queue_type_price_heal(ctx, db, region_name, gpu_type),
        Ok(false) => {}
        Err(e) => {
            crate::log(
                ctx,
                RedisLogLevel::Warning,
                &format!(
                    "gpucache: region {region_name}: healing the expired type price of \
                     {gpu_type} failed ({e}): repairing the region instead"
                ),
            );
            queue_region_repair(ctx, region_name);
            return;
        }
    }
    if store.failed_writes() > 0 {
        queue_region_repair(ctx, region_name);
    }
}

/// One slice of the heal of an expired type price: up to `TYPE_PRICE_SLICE_GPUS` GPUs of
/// `avail-type`, then of `avail-draining`, go back to their own prices. Readers skip both
/// while the type price is gone, so every slice leaves a consistent state. The first slice
/// always publishes the expiry; a later one only what it moved. Returns whether GPUs are left.
fn heal_type_price(region: &Region, gpu_type: &str, first: bool) -> MarketResult<bool> {
    let store = region.store;
    let typed = region.keys.available_typed(gpu_type);
    let draining = region.keys.available_draining(gpu_type);
    let own = region.keys.available_own(gpu_type);
    let mut batch: Vec<(&str, Vec<u8>)> = Vec::new();
    for key in [typed.as_str(), draining.as_str()] {
        let room = TYPE_PRICE_SLICE_GPUS.saturating_sub(batch.len());
        if room == 0 {
            break;
        }
        for id in store.members_up_to(key, f64::INFINITY, room)? {
            batch.push((key, id));
        }
    }
    queue().type_price_slices += 1;
    if batch.is_empty() && !first {
        return Ok(false);
    }
    region.touch_type(gpu_type, !batch.is_empty())?;
    let mut moves: Vec<(String, Price)> = Vec::new();
    for (_, id) in &batch {
        // An id that is not UTF-8 (written by hand) has no record: it only leaves the index.
        let Ok(gpu_id) = std::str::from_utf8(id) else {
            continue;
        };
        if let Some(gpu) = region.load_gpu(gpu_id)? {
            moves.push((gpu_id.to_owned(), gpu.own_price));
        }
    }
    for key in [typed.as_str(), draining.as_str()] {
        let mut remove: Vec<&[u8]> = vec![key.as_bytes()];
        remove.extend(
            batch
                .iter()
                .filter(|(from, _)| *from == key)
                .map(|(_, id)| id.as_slice()),
        );
        if remove.len() > 1 {
            store.write("ZREM", &remove);
        }
    }
    for (gpu_id, price) in &moves {
        let score = price.as_score().to_string();
        store.write(
            "ZADD",
            &[own.as_bytes(), score.as_bytes(), gpu_id.as_bytes()],
        );
        region.add_to_counter(&stat::own_price_sum(gpu_type), price.micros());
    }
    let more = region.typed_count(gpu_type)? > 0;
    store.mark_written(&region.keys.type_price(gpu_type));
    let mut event = Event::new(EventKind::PricingUpdated, &region.name, store.now_ms());
    event.reason = Some("expired");
    event.gpu_type = Some(gpu_type.to_owned());
    event.new.insert("gpus_repriced".into(), moves.len().into());
    region.publish(notify::EXPIRED, event)?;
    Ok(more)
}
