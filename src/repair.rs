//! `GPUCACHE.REPAIR`, and every repair the module queues itself (when a sweep after a load or
//! a promotion finds more than vanished records, when a healing write was refused, when a
//! command finds market state damaged): puts a region back in order by applying the fixes of
//! its survey (`survey.rs`).
//!
//! Every fix is a plain replicated write, so a repair reaches replicas and the AOF as the
//! primary decided it. A repair recounts rather than replays: running it again is always safe.

use crate::core::error::MarketResult;
use crate::core::events::{notify, Event, EventKind};
use crate::market::{stat, BookingEnd, Region};
use crate::store::Store;
use crate::survey::{survey, Fix, Survey};
use redis_module::logging::RedisLogLevel;
use redis_module::Context;
use std::time::Instant;

/// Findings listed in `REPAIR`'s reply (the rest are only counted).
const MAX_LISTED: usize = 100;

/// What a repair did.
#[derive(Debug, Default, Clone)]
pub struct RepairReport {
    /// GPUs whose record is gone, dropped from the registry and indexes.
    pub gpus: i64,
    /// Bookings dropped: lost without a copy, or ended because another booking holds their GPU.
    pub bookings: i64,
    /// Types whose type price is gone, their GPUs moved back to their own prices.
    pub type_prices: i64,
    /// Provider set members that belonged to another provider's GPU (or to none).
    pub provider_members: i64,
    /// GPU records rewritten: rebuilt, taken back by their booking, released, copies restored.
    pub gpu_records: i64,
    /// Booking records rebuilt from the copy of their terms.
    pub booking_records: i64,
    /// Findings that only could be reported.
    pub unrecoverable: i64,
    /// Every finding fixed (or reported).
    pub fixed: i64,
    /// The first findings, as sentences.
    pub repairs: Vec<String>,
    /// The region's sequence after the repair.
    pub seq: i64,
    /// Writes Redis refused: the repair must run again.
    pub failed_writes: u32,
}

pub fn repair_region(ctx: &Context, region_name: &str) -> MarketResult<RepairReport> {
    let found = survey(&Store::new(ctx), region_name)?;
    let mut repair = Repair::new(ctx, region_name, found);
    repair.step(ctx, None);
    repair.finish(ctx)
}

/// A survey's fixes being applied: all at once ([`repair_region`]), or over several timer calls
/// for a large region (`survey_fork.rs`), each [`Repair::step`] until its deadline. The survey
/// must describe the region as it stands: taken just now, or in a forked child while nothing
/// wrote to the region since (and nothing between steps).
pub struct Repair {
    region: String,
    found: Survey,
    /// The first finding not applied yet.
    next: usize,
    version: i64,
    closed: i64,
    counters: Vec<(String, String)>,
    report: RepairReport,
    /// The demand multipliers of the types the fixes touch, read before the first fix: at the
    /// end, the types whose multiplier moved get a `pricing_updated` event.
    demand_before: Vec<(String, u32)>,
    /// Keys written (and notified) by earlier steps, listed in the final event.
    written: Vec<String>,
}

impl Repair {
    pub fn new(ctx: &Context, region_name: &str, found: Survey) -> Repair {
        let store = Store::new(ctx);
        let region = Region::new(&store, region_name.to_owned());
        // (A type whose keys the repair replaces cannot be read before: it gets no such event.)
        let demand_before = found
            .touched_types
            .iter()
            .cloned()
            .filter_map(|t| region.touch_type(&t, true).ok().map(|before| (t, before)))
            .collect();
        let report = RepairReport {
            gpus: count(found.vanished_gpus),
            bookings: count(found.dropped_bookings),
            type_prices: count(found.repriced_types),
            provider_members: count(found.stale_provider_members),
            fixed: count(found.findings.len()),
            seq: found.seq_floor,
            repairs: found
                .findings
                .iter()
                .take(MAX_LISTED)
                .map(|f| f.message.clone())
                .collect(),
            ..RepairReport::default()
        };
        Repair {
            region: region_name.to_owned(),
            version: found.seq_floor,
            found,
            next: 0,
            closed: 0,
            counters: Vec::new(),
            report,
            demand_before,
            written: Vec::new(),
        }
    }

    /// Findings not applied yet.
    pub fn left(&self) -> usize {
        self.found.findings.len().saturating_sub(self.next)
    }

    /// Applies fixes until `deadline` (all of them without one), and notifies the keys written.
    pub fn step(&mut self, ctx: &Context, deadline: Option<Instant>) {
        let store = Store::new(ctx);
        let region = Region::new(&store, self.region.clone());
        let now = store.now_ms();
        while let Some(finding) = self.found.findings.get(self.next) {
            if deadline.is_some_and(|d| Instant::now() >= d) {
                break;
            }
            self.next += 1;
            match &finding.fix {
                Fix::Report => self.report.unrecoverable += 1,
                Fix::Write(command, args) => {
                    let args: Vec<&[u8]> = args.iter().map(Vec::as_slice).collect();
                    store.write(command.0, &args);
                }
                Fix::Gpu {
                    gpu_id,
                    record,
                    before,
                } => {
                    self.version = self.version.saturating_add(1);
                    let mut record = (**record).clone();
                    record.version = self.version;
                    record.updated_ms = now;
                    let key = region.keys.gpu(gpu_id);
                    let fields = record.changed_fields(before.as_deref());
                    if !fields.is_empty() {
                        store.hset(&key, &fields);
                    }
                    if let Some(before) = before {
                        let dropped = before.dropped_fields(&record);
                        if !dropped.is_empty() {
                            let mut args: Vec<&[u8]> = vec![key.as_bytes()];
                            args.extend(dropped.iter().map(|f| f.as_bytes()));
                            store.write("HDEL", &args);
                        }
                    }
                    // Held: market state, no TTL. Idle: a cached record with a fresh one.
                    match region.gpu_expiry(now, record.booking.is_some()) {
                        Some(at) => store.pexpire_at(&key, at),
                        None if before.is_some() => store.write("PERSIST", &[key.as_bytes()]),
                        None => {}
                    }
                    self.report.gpu_records += 1;
                }
                Fix::Booking {
                    booking_id,
                    booking,
                } => {
                    store.hset(&region.keys.booking(booking_id), &booking.to_fields());
                    self.report.booking_records += 1;
                }
                Fix::Close {
                    booking_id,
                    booking,
                } => {
                    store.write("DEL", &[region.keys.booking(booking_id).as_bytes()]);
                    self.closed += 1;
                    let mut event = Event::new(EventKind::BookingCancelled, &region.name, now);
                    event.reason = Some(BookingEnd::Conflict.reason());
                    event.booking_id = Some(booking_id.clone());
                    event.gpu_id = Some(booking.gpu_id.clone());
                    event.user_id = Some(booking.user_id.clone());
                    event.keys = vec![region.keys.booking(booking_id)];
                    region.append_event(&event);
                }
                Fix::Counter(field, value) => {
                    self.counters.push((field.clone(), value.to_string()))
                }
            }
        }
        region.notify_written(notify::REPAIRED);
        self.written.extend(store.written_keys());
        self.report.failed_writes = self
            .report
            .failed_writes
            .saturating_add(store.failed_writes());
    }

    /// Writes the counters and the sequence and publishes the repair, once every fix is applied.
    pub fn finish(mut self, ctx: &Context) -> MarketResult<RepairReport> {
        let store = Store::new(ctx);
        let region = Region::new(&store, self.region.clone());
        let now = store.now_ms();
        for (gpu_type, before) in &self.demand_before {
            region.remember_demand(gpu_type, *before);
        }
        let found = &self.found;
        let mut counters = std::mem::take(&mut self.counters);
        if self.closed > 0 {
            let cancelled = found.stored_cancelled.saturating_add(self.closed);
            counters.retain(|(f, _)| f != stat::BOOKINGS_CANCELLED);
            counters.push((stat::BOOKINGS_CANCELLED.to_owned(), cancelled.to_string()));
        }
        let version = self.version;
        if version != found.seq_floor || found.stored_seq != Some(found.seq_floor) && version > 0 {
            counters.retain(|(f, _)| f != stat::SEQ);
            counters.push((stat::SEQ.to_owned(), version.to_string()));
        }
        let mut report = self.report;
        report.seq = version;
        if !counters.is_empty() {
            let fields: Vec<(&str, String)> = counters
                .iter()
                .map(|(f, v)| (f.as_str(), v.clone()))
                .collect();
            store.hset(&region.keys.stats(), &fields);
            for (field, _) in &counters {
                region.forget_counter(field);
            }
        }
        if report.fixed > 0 {
            crate::log(
                ctx,
                RedisLogLevel::Notice,
                &format!(
                    "gpucache: region {}: repaired {} findings (first: {})",
                    self.region,
                    report.fixed,
                    report.repairs.first().map_or("", String::as_str)
                ),
            );
            let mut event = Event::new(EventKind::ManualInvalidation, &region.name, now);
            event.reason = Some("repaired");
            region.publish_after(notify::REPAIRED, event, &self.written)?;
        }
        crate::booking_clock::look_again_at(ctx, &self.region);
        // A drain that failed (and queued this repair) goes on over what the repair left draining.
        crate::type_drains::resume_region(ctx, &self.region)?;
        report.failed_writes = report.failed_writes.saturating_add(store.failed_writes());
        Ok(report)
    }
}

fn count(n: usize) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}
