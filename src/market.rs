//! Region state as the commands see it: loading records and keeping every index, counter and
//! event in step with a change. Each command calls these after validating everything, so the
//! index rules live here once instead of in every command.

use crate::config;
use crate::core::booking::Booking;
use crate::core::demand;
use crate::core::error::{MarketError, MarketResult};
use crate::core::events::{Event, EventKind};
use crate::core::gpu::{
    self, GpuChange, GpuFields, GpuRecord, PriceSource, RegistryEntry, TypePrice,
};
use crate::core::price::Price;
use crate::core::status::{is_listed, GpuStatus, ProviderStatus};
use crate::core::ttl::jittered_ttl_ms;
use crate::core::window;
use crate::keys::RegionKeys;
use crate::store::Store;
use redis_module::KeyType;
use std::cell::{Cell, RefCell};
use std::collections::{BTreeMap, BTreeSet, HashMap};

/// Hash fields of the region's market-counters hash (`RegionKeys::stats`).
pub mod stat {
    pub const SEQ: &str = "seq";
    pub const BOOKINGS_CREATED: &str = "bookings:created";
    pub const BOOKINGS_CANCELLED: &str = "bookings:cancelled";
    pub const BOOKINGS_ENDED: &str = "bookings:ended";

    pub fn gpus_with_status(status: crate::core::status::GpuStatus) -> String {
        ["gpus:", status.as_str()].concat()
    }

    /// Prefix of the `type_total` fields.
    pub const TYPE_TOTAL_PREFIX: &str = "type-total:";

    /// Registered GPUs of a type, whatever their status (the demand ratio's denominator).
    pub fn type_total(gpu_type: &str) -> String {
        [TYPE_TOTAL_PREFIX, gpu_type].concat()
    }

    /// Sum of the own prices (micro-units) of a type's listed, own-priced GPUs.
    pub fn own_price_sum(gpu_type: &str) -> String {
        ["own-sum:", gpu_type].concat()
    }
}

/// Hash fields of a provider record.
pub mod provider_field {
    pub const STATUS: &str = "status";
    pub const VERSION: &str = "version";
    pub const UPDATED_MS: &str = "updated_ms";
}

/// Hash fields of a type-price record.
pub mod price_field {
    pub const PRICE: &str = "price";
    pub const SEQ: &str = "seq";
    pub const VERSION: &str = "version";
    pub const UPDATED_MS: &str = "updated_ms";
}

pub struct Region<'s, 'c> {
    pub store: &'s Store<'c>,
    pub name: String,
    pub keys: RegionKeys,
    /// Demand multiplier of each type this command changes, as it was before the first change.
    demand_before: RefCell<BTreeMap<String, u32>>,
    /// Types whose availability index (order book) this command changed.
    books_changed: RefCell<BTreeSet<String>>,
    /// Counters (fields of the counters hash) this command changed, with their new values, in
    /// first-change order: written with one `HSET` by `flush_counters` instead of one per change.
    counters: RefCell<Vec<(String, i64)>>,
    /// Counter fields as stored (`None`: absent), each read from the counters hash at most once
    /// per command; `prefetch_counters` reads several with one lookup.
    stored_counters: RefCell<Vec<(String, Option<Vec<u8>>)>>,
    /// The region-wide keys passed `check_key_types` in this command.
    base_checked: Cell<bool>,
}

fn parse_int(bytes: Option<&[u8]>) -> Option<i64> {
    std::str::from_utf8(bytes?).ok()?.parse().ok()
}

impl<'s, 'c> Region<'s, 'c> {
    pub fn new(store: &'s Store<'c>, name: String) -> Self {
        let keys = RegionKeys::new(&name);
        Region {
            store,
            name,
            keys,
            demand_before: RefCell::new(BTreeMap::new()),
            books_changed: RefCell::new(BTreeSet::new()),
            counters: RefCell::new(Vec::new()),
            stored_counters: RefCell::new(Vec::new()),
            base_checked: Cell::new(false),
        }
    }

    /// The value this command gave a counter, if it changed it.
    fn pending_counter(&self, field: &str) -> Option<i64> {
        self.counters
            .borrow()
            .iter()
            .find(|(f, _)| f == field)
            .map(|(_, v)| *v)
    }

    /// A counter field as stored in the counters hash before this command's pending changes.
    fn stored_counter(&self, field: &str) -> MarketResult<Option<Vec<u8>>> {
        self.prefetch_counters(&[field])?;
        Ok(self
            .stored_counters
            .borrow()
            .iter()
            .find(|(f, _)| f == field)
            .and_then(|(_, value)| value.clone()))
    }

    /// Reads the counters a command is about to use with one hash lookup instead of one each
    /// (the counters hash is a listpack of a few dozen fields, opened once here).
    pub fn prefetch_counters(&self, fields: &[&str]) -> MarketResult<()> {
        let missing: Vec<&str> = {
            let stored = self.stored_counters.borrow();
            fields
                .iter()
                .copied()
                .filter(|f| !stored.iter().any(|(s, _)| s == f))
                .collect()
        };
        if missing.is_empty() {
            return Ok(());
        }
        let values = self.store.hmget(&self.keys.stats(), &missing)?;
        let mut stored = self.stored_counters.borrow_mut();
        for (field, value) in missing.into_iter().zip(values) {
            if !stored.iter().any(|(s, _)| s == field) {
                stored.push((field.to_owned(), value));
            }
        }
        Ok(())
    }

    /// `prefetch_counters` for a status change of a GPU of `gpu_type` (the sequence, the
    /// type's figures, both status counts) plus `extra`.
    pub fn prefetch_status_change(
        &self,
        gpu_type: &str,
        from: GpuStatus,
        to: GpuStatus,
        extra: &[&str],
    ) -> MarketResult<()> {
        let (total, own_sum) = (stat::type_total(gpu_type), stat::own_price_sum(gpu_type));
        let (was, now) = (stat::gpus_with_status(from), stat::gpus_with_status(to));
        let mut fields = vec![stat::SEQ, &total, &own_sum, &was, &now];
        fields.extend_from_slice(extra);
        self.prefetch_counters(&fields)
    }

    /// Forgets what was read of a counter field another write just changed.
    pub fn forget_counter(&self, field: &str) {
        self.stored_counters
            .borrow_mut()
            .retain(|(f, _)| f != field);
    }

    /// Sets a counter for `flush_counters` to write; the counters hash counts as written now.
    fn set_counter(&self, field: &str, value: i64) {
        self.store.mark_written(&self.keys.stats());
        let mut counters = self.counters.borrow_mut();
        match counters.iter_mut().find(|(f, _)| f == field) {
            Some(entry) => entry.1 = value,
            None => counters.push((field.to_owned(), value)),
        }
    }

    /// Writes the counters this command changed, all in one replicated `HSET`. Called by
    /// `publish` and, as a safety net, when the region is dropped.
    pub fn flush_counters(&self) {
        let counters = self.counters.take();
        if counters.is_empty() {
            return;
        }
        let fields: Vec<(&str, String)> = counters
            .iter()
            .map(|(field, value)| (field.as_str(), value.to_string()))
            .collect();
        self.store.hset(&self.keys.stats(), &fields);
        // What was read is now what was written.
        let mut stored = self.stored_counters.borrow_mut();
        for (field, value) in fields {
            let value = Some(value.into_bytes());
            match stored.iter_mut().find(|(f, _)| f == field) {
                Some(entry) => entry.1 = value,
                None => stored.push((field.to_owned(), value)),
            }
        }
    }

    /// Listed and registered GPUs of a type.
    pub fn type_counts(&self, gpu_type: &str) -> MarketResult<(i64, i64)> {
        let listed = self.listed_count(gpu_type)?;
        let field = stat::type_total(gpu_type);
        let total = match self.pending_counter(&field) {
            Some(total) => total,
            None => parse_int(self.stored_counter(&field)?.as_deref()).unwrap_or(0),
        };
        Ok((listed, total))
    }

    /// Bookable GPUs of a type: the entries of its price indexes.
    pub fn listed_count(&self, gpu_type: &str) -> MarketResult<i64> {
        let own = self.keys.available_own(gpu_type);
        Ok(self
            .store
            .zcard(&own)?
            .saturating_add(self.typed_count(gpu_type)?))
    }

    /// Listed GPUs of a type that show the type price (while it exists): `avail-type` and the
    /// GPUs a large `PRICE` left draining into it.
    pub fn typed_count(&self, gpu_type: &str) -> MarketResult<i64> {
        let typed = self.keys.available_typed(gpu_type);
        let draining = self.keys.available_draining(gpu_type);
        Ok(self
            .store
            .zcard(&typed)?
            .saturating_add(self.store.zcard(&draining)?))
    }

    /// Registered GPUs of each of `types` (the denominators of their demand ratios, as
    /// `type_counts` reads them), from one pass over the counters hash instead of a lookup per
    /// type: for a search over every type of the region.
    pub fn type_totals(&self, types: &[String]) -> MarketResult<Vec<i64>> {
        let wanted: HashMap<&[u8], usize> = types
            .iter()
            .enumerate()
            .map(|(i, t)| (t.as_bytes(), i))
            .collect();
        let mut totals = vec![None; types.len()];
        self.store.scan_hash(&self.keys.stats(), |name, value| {
            let index = name
                .strip_prefix(stat::TYPE_TOTAL_PREFIX.as_bytes())
                .and_then(|t| wanted.get(t));
            if let Some(slot) = index.and_then(|i| totals.get_mut(*i)) {
                *slot = Some(parse_int(Some(value)).unwrap_or(0));
            }
        })?;
        let pending = !self.counters.borrow().is_empty();
        Ok(types
            .iter()
            .zip(totals)
            .map(|(t, total)| {
                pending
                    .then(|| self.pending_counter(&stat::type_total(t)))
                    .flatten()
                    .or(total)
                    .unwrap_or(0)
            })
            .collect())
    }

    /// The demand multiplier (hundredths) a type's prices carry right now.
    pub fn demand_multiplier(&self, gpu_type: &str) -> MarketResult<u32> {
        let (listed, total) = self.type_counts(gpu_type)?;
        Ok(demand_multiplier_of(listed, total))
    }

    /// Remembers a type's multiplier before this command first changes its counts or index, so
    /// `publish` can tell whether its effective prices moved. Called before each such write.
    /// Returns that multiplier, which is also what the type's prices show until this command's
    /// first change.
    pub fn touch_type(&self, gpu_type: &str, book_changes: bool) -> MarketResult<u32> {
        let remembered = self.demand_before.borrow().get(gpu_type).copied();
        let before = match remembered {
            Some(before) => before,
            None => {
                let before = self.demand_multiplier(gpu_type)?;
                self.demand_before
                    .borrow_mut()
                    .insert(gpu_type.to_owned(), before);
                before
            }
        };
        if book_changes {
            self.books_changed.borrow_mut().insert(gpu_type.to_owned());
        }
        Ok(before)
    }

    pub fn load_gpu(&self, gpu_id: &str) -> MarketResult<Option<GpuRecord>> {
        Ok(self.load_gpu_with_ttl(gpu_id)?.map(|(gpu, _)| gpu))
    }

    /// A GPU record and its remaining time to live (one key lookup for both).
    pub fn load_gpu_with_ttl(
        &self,
        gpu_id: &str,
    ) -> MarketResult<Option<(GpuRecord, Option<i64>)>> {
        let key = self.keys.gpu(gpu_id);
        let mut fields = GpuFields::default();
        let ttl = self
            .store
            .scan_hash_ttl(&key, |name, value| fields.add(name, value))?;
        if !fields.any() {
            return Ok(None);
        }
        match fields.build() {
            Some(gpu) => Ok(Some((gpu, ttl))),
            None => Err(MarketError::Corrupt(key)),
        }
    }

    pub fn require_gpu(&self, gpu_id: &str) -> MarketResult<GpuRecord> {
        self.load_gpu(gpu_id)?
            .ok_or_else(|| MarketError::NoGpu(gpu_id.to_owned()))
    }

    pub fn load_booking(&self, booking_id: &str) -> MarketResult<Option<Booking>> {
        use crate::core::booking::field::ALL;
        let key = self.keys.booking(booking_id);
        let booking = self.store.with_hash(&key, &ALL, |values| {
            if values.iter().all(Option::is_none) {
                return Ok(None);
            }
            let present = ALL
                .iter()
                .zip(values)
                .filter_map(|(name, value)| Some((name.as_bytes(), (*value)?)));
            Booking::from_fields(present).map(Some).ok_or(())
        })?;
        booking.map_err(|()| MarketError::Corrupt(key))
    }

    pub fn load_type_price(&self, gpu_type: &str) -> MarketResult<Option<TypePrice>> {
        let key = self.keys.type_price(gpu_type);
        let fields = [price_field::PRICE, price_field::SEQ, price_field::VERSION];
        let price = self.store.with_hash(&key, &fields, |values| {
            let field = |i: usize| values.get(i).copied().flatten();
            let Some(price_text) = field(0) else {
                return Ok(None);
            };
            let price = Price::parse_stored(price_text).ok_or(())?;
            // Missing: 0 (written before they were recorded); beyond what gpucache issues: not
            // a record gpucache wrote.
            let version = |i: usize| field(i).map_or(Some(0), crate::core::version).ok_or(());
            Ok(Some(TypePrice {
                price,
                seq: version(1)?,
                version: version(2)?,
            }))
        })?;
        price.map_err(|()| MarketError::Corrupt(key))
    }

    pub fn provider_status(&self, provider_id: &str) -> MarketResult<ProviderStatus> {
        let key = self.keys.provider(provider_id);
        let status =
            self.store
                .with_hash(&key, &[provider_field::STATUS], |values| {
                    match values.first().copied().flatten() {
                        None => Ok(ProviderStatus::default()),
                        Some(text) => ProviderStatus::parse(text).map_err(|_| ()),
                    }
                })?;
        status.map_err(|()| MarketError::Corrupt(key))
    }

    /// Fails before any write when a key this region writes holds a foreign type.
    ///
    /// The region-wide keys are checked once per command: every check runs before the first
    /// write, and gpucache's own writes never change a key's type.
    pub fn check_key_types(&self, extra: &[(&str, KeyType)]) -> MarketResult<()> {
        if !self.base_checked.get() {
            let mut key = String::with_capacity(self.keys.prefix().len() + 16);
            for (entity, id, wanted) in [
                ("index", "providers", KeyType::Set),
                ("stats", "24h", KeyType::Hash),
                ("index", "gpus", KeyType::Hash),
                ("index", "types", KeyType::Set),
                ("index", "bookings", KeyType::Hash),
                ("index", "booking-ends", KeyType::ZSet),
                ("stats", "market", KeyType::Hash),
            ] {
                self.keys.key_into(&mut key, entity, id);
                self.store.expect_types(&[(key.as_str(), wanted)])?;
            }
            self.store
                .expect_types(&[(self.keys.events().as_str(), KeyType::Stream)])?;
            self.check_counters_present()?;
            self.base_checked.set(true);
        }
        self.store.expect_types(extra)
    }

    /// Key-type checks for everything a change to one GPU may write.
    pub fn check_gpu_key_types(
        &self,
        gpu_id: &str,
        gpu_type: &str,
        provider: &str,
    ) -> MarketResult<()> {
        self.check_key_types(&[])?;
        let mut key = String::with_capacity(self.keys.prefix().len() + 32);
        for (entity, id, wanted) in [
            ("gpu", gpu_id, KeyType::Hash),
            ("avail-own", gpu_type, KeyType::ZSet),
            ("avail-type", gpu_type, KeyType::ZSet),
            ("avail-draining", gpu_type, KeyType::ZSet),
            ("avail-score", gpu_type, KeyType::ZSet),
            ("price", gpu_type, KeyType::Hash),
            ("provider", provider, KeyType::Hash),
            ("provider-gpus", provider, KeyType::Set),
        ] {
            self.keys.key_into(&mut key, entity, id);
            self.store.expect_types(&[(key.as_str(), wanted)])?;
        }
        Ok(())
    }

    /// The next value of the region's sequence, which orders own prices against type prices.
    pub fn next_seq(&self) -> MarketResult<i64> {
        // Read before the command's first write: a hand-edited sequence is refused rather than
        // restarted, which would let an old type price beat every later own price.
        let current = match self.pending_counter(stat::SEQ) {
            Some(current) => current,
            None => match self.stored_counter(stat::SEQ)? {
                None => self.lost_seq_floor()?,
                Some(text) => match crate::core::version(&text) {
                    Some(seq) => seq,
                    None => {
                        crate::heal::queue_region_repair(self.store.ctx(), &self.name);
                        return Err(MarketError::Damaged(format!(
                            "the sequence of region '{}' holds '{}', not a sequence gpucache \
                             issues; a repair is queued, or run GPUCACHE.REPAIR {}",
                            self.name,
                            crate::core::input::shown(&text, 32),
                            self.name
                        )));
                    }
                },
            },
        };
        let next = current.saturating_add(1);
        self.set_counter(stat::SEQ, next);
        Ok(next)
    }

    /// The sequence as it stands (after this command's draws), if it is known.
    pub fn current_seq(&self) -> Option<i64> {
        self.pending_counter(stat::SEQ).or_else(|| {
            self.stored_counter(stat::SEQ)
                .ok()
                .flatten()
                .and_then(|text| crate::core::version(&text))
        })
    }

    /// Where a missing sequence resumes. A new region starts at 0. A region that has state lost
    /// its sequence (a hand `HDEL`, or `DEL` of the counters hash): it resumes at the value its
    /// event stream recorded with its last event, which no version issued so far exceeds, so
    /// versions never go backwards; without that record the write is refused until
    /// `GPUCACHE.REPAIR` restores the sequence from every version still visible.
    fn lost_seq_floor(&self) -> MarketResult<i64> {
        if let Some(seq) = self.store.last_recorded_seq(&self.keys.events())? {
            return Ok(seq);
        }
        if self.has_market_state() {
            crate::heal::queue_region_repair(self.store.ctx(), &self.name);
            return Err(MarketError::Damaged(format!(
                "the sequence of region '{}' is lost ({} has no 'seq' and the event stream \
                 records none); a repair is queued, or run GPUCACHE.REPAIR {}",
                self.name,
                self.keys.stats(),
                self.name
            )));
        }
        Ok(0)
    }

    /// Whether the region holds GPUs, bookings, types or providers (its indexes exist).
    pub fn has_market_state(&self) -> bool {
        [
            self.keys.gpu_registry(),
            self.keys.booking_registry(),
            self.keys.types(),
            self.keys.providers(),
        ]
        .iter()
        .any(|key| self.store.key_type(key) != KeyType::Empty)
    }

    /// Refuses to write on top of lost market counters: the GPU counts behind the demand
    /// multiplier (and so every price shown or charged) would restart from zero. A region with
    /// state and no counters hash is repaired from a recount first (queued here, or by hand).
    fn check_counters_present(&self) -> MarketResult<()> {
        if self.store.key_type(&self.keys.stats()) != KeyType::Empty || !self.has_market_state() {
            return Ok(());
        }
        crate::heal::queue_region_repair(self.store.ctx(), &self.name);
        Err(MarketError::Damaged(format!(
            "the market counters of region '{}' are gone ({}); a repair is queued, or run \
             GPUCACHE.REPAIR {}",
            self.name,
            self.keys.stats(),
            self.name
        )))
    }

    /// Adds `delta` to a counter of the region's counters hash.
    ///
    /// Written as the computed value (`HSET`), not `HINCRBY`: a counter someone overwrote with
    /// text, or one at the edge of `i64`, must not make a write fail halfway through a command.
    /// Garbage counts as 0 and sums saturate; `GPUCACHE.CHECK` reports the difference.
    ///
    /// The new value is kept until `flush_counters` writes every changed counter in one `HSET`;
    /// reads through this region (`type_counts`, `next_seq`, `status_count`) see it meanwhile.
    pub fn add_to_counter(&self, field: &str, delta: i64) {
        if delta == 0 {
            return;
        }
        let current = self.pending_counter(field).unwrap_or_else(|| {
            self.stored_counter(field)
                .ok()
                .flatten()
                .and_then(|v| parse_int(Some(&v)))
                .unwrap_or(0)
        });
        self.set_counter(field, current.saturating_add(delta));
    }

    /// Adds a new booking to the rolling 24-hour window and drops buckets that left it.
    pub fn record_booking(&self, now_ms: i64, cost_micros: i64) -> MarketResult<()> {
        let key = self.keys.window_24h();
        let bucket = window::bucket_of(now_ms);
        // Both figures of the bucket, the hash's size and its expiry: one lookup.
        let (count_field, volume_field) =
            (window::count_field(bucket), window::volume_field(bucket));
        let (current, len, ttl_ms) = self
            .store
            .with_hash_meta(&key, &[&count_field, &volume_field], |values, meta| {
                let value = |i: usize| parse_int(values.get(i).copied().flatten()).unwrap_or(0);
                ((value(0), value(1)), meta.field_count(), meta.ttl_ms())
            })
            // The command checked this key's type before its first write: nothing to refuse
            // here, where refusing would leave the booking half-recorded.
            .unwrap_or(((0, 0), 0, None));
        // Two fields per bucket; a few spare buckets before pruning keeps pruning rare.
        let prune = len > 2 * (window::BUCKETS + 8) as usize;
        let stale: Vec<String> = if prune {
            self.store
                .members("HKEYS", &key)?
                .into_iter()
                .filter(|f| window::bucket_of_field(f).is_some_and(|b| !window::is_live(b, now_ms)))
                .collect()
        } else {
            Vec::new()
        };
        // Garbage counts as 0, sums saturate.
        let mut bucket_fields = vec![(
            count_field.as_str(),
            current.0.saturating_add(1).to_string(),
        )];
        if cost_micros != 0 {
            bucket_fields.push((
                volume_field.as_str(),
                current.1.saturating_add(cost_micros).to_string(),
            ));
        }
        self.store.hset(&key, &bucket_fields);
        if !stale.is_empty() {
            let mut args: Vec<&[u8]> = vec![key.as_bytes()];
            args.extend(stale.iter().map(|f| f.as_bytes()));
            self.store.write("HDEL", &args);
        }
        // Market state carries no TTL (a volatile-* policy must not evict it); a window written
        // by an earlier version still has one.
        if ttl_ms.is_some() {
            self.store.write("PERSIST", &[key.as_bytes()]);
        }
        Ok(())
    }

    /// Puts a GPU in its type's availability index at the price it shows.
    pub fn list(
        &self,
        gpu_id: &str,
        gpu: &GpuRecord,
        type_price: Option<&TypePrice>,
    ) -> MarketResult<()> {
        self.touch_type(&gpu.gpu_type, true)?;
        let performance = gpu.score.unwrap_or(0.0).to_string();
        self.store.write(
            "ZADD",
            &[
                self.keys.available_by_score(&gpu.gpu_type).as_bytes(),
                performance.as_bytes(),
                gpu_id.as_bytes(),
            ],
        );
        match gpu::price_source(gpu.price_seq, type_price) {
            PriceSource::Own => {
                let score = gpu.own_price.as_score().to_string();
                self.store.write(
                    "ZADD",
                    &[
                        self.keys.available_own(&gpu.gpu_type).as_bytes(),
                        score.as_bytes(),
                        gpu_id.as_bytes(),
                    ],
                );
                self.add_to_counter(&stat::own_price_sum(&gpu.gpu_type), gpu.own_price.micros());
            }
            PriceSource::Type => {
                self.store.write(
                    "ZADD",
                    &[
                        self.keys.available_typed(&gpu.gpu_type).as_bytes(),
                        b"0",
                        gpu_id.as_bytes(),
                    ],
                );
            }
        }
        Ok(())
    }

    /// Takes a GPU out of its type's availability index, wherever it is listed.
    pub fn unlist(&self, gpu_id: &str, gpu_type: &str) -> MarketResult<()> {
        self.touch_type(gpu_type, true)?;
        let by_score = self.keys.available_by_score(gpu_type);
        self.store
            .write("ZREM", &[by_score.as_bytes(), gpu_id.as_bytes()]);
        let own = self.keys.available_own(gpu_type);
        if let Some(score) = self.store.zscore(&own, gpu_id)? {
            self.store
                .write("ZREM", &[own.as_bytes(), gpu_id.as_bytes()]);
            let micros = Price::from_score(score).map_or(0, Price::micros);
            self.add_to_counter(&stat::own_price_sum(gpu_type), -micros);
        } else {
            let typed = self.keys.available_typed(gpu_type);
            let draining = self.keys.available_draining(gpu_type);
            for key in [typed, draining] {
                if self.store.zscore(&key, gpu_id)?.is_some() {
                    self.store
                        .write("ZREM", &[key.as_bytes(), gpu_id.as_bytes()]);
                    break;
                }
            }
        }
        Ok(())
    }

    /// When a GPU record should expire: a jittered availability TTL from now for a cached
    /// record; never (`None`) while a booking holds it, since a booked GPU's record decides who
    /// holds it and must not be evicted or expire under its booking.
    pub fn gpu_expiry(&self, now_ms: i64, held: bool) -> Option<i64> {
        if held {
            return None;
        }
        let ttl = jittered_ttl_ms(
            config::get(&config::AVAILABILITY_TTL),
            config::get(&config::JITTER_PERCENT),
            fastrand::f64(),
        );
        Some(now_ms.saturating_add(ttl))
    }

    pub fn pricing_expire_at(&self, now_ms: i64) -> i64 {
        let ttl = jittered_ttl_ms(
            config::get(&config::PRICING_TTL),
            config::get(&config::JITTER_PERCENT),
            fastrand::f64(),
        );
        now_ms.saturating_add(ttl)
    }

    /// Writes a GPU's new record and moves it through every index it belongs to.
    ///
    /// `old` is the record before the change (None for a new GPU); provider statuses and the
    /// type price are passed in because the caller already read them while validating.
    pub fn store_gpu(&self, change: GpuWrite<'_>) -> MarketResult<()> {
        let GpuWrite {
            gpu_id,
            old,
            new,
            old_provider_status,
            new_provider_status,
            type_price,
            expire_at_ms,
        } = change;
        let key = self.keys.gpu(gpu_id);
        // Only the fields whose stored text changes: a status change rewrites 3-4 fields, not
        // the whole record (a record the module wrote reads back to exactly these texts).
        let fields = new.changed_fields(old);
        if !fields.is_empty() {
            self.store.hset(&key, &fields);
        }
        if let Some(old) = old {
            let dropped = old.dropped_fields(new);
            if !dropped.is_empty() {
                let mut args: Vec<&[u8]> = vec![key.as_bytes()];
                args.extend(dropped.iter().map(|f| f.as_bytes()));
                self.store.write("HDEL", &args);
            }
        }
        match expire_at_ms {
            Some(at) => self.store.pexpire_at(&key, at),
            // A record that existed may carry a TTL from when it was idle.
            None if old.is_some() => self.store.write("PERSIST", &[key.as_bytes()]),
            None => {}
        }

        let change = old.map_or(GpuChange::all(), |o| GpuChange::between(o, new));
        if change.alters_registry() {
            let registry_entry = RegistryEntry::of(new).to_string();
            self.store.write(
                "HSET",
                &[
                    self.keys.gpu_registry().as_bytes(),
                    gpu_id.as_bytes(),
                    registry_entry.as_bytes(),
                ],
            );
        }
        if change.contains(GpuChange::STATUS) {
            if let Some(old) = old {
                self.add_to_counter(&stat::gpus_with_status(old.status), -1);
            }
            self.add_to_counter(&stat::gpus_with_status(new.status), 1);
        }
        if change.contains(GpuChange::TYPE) {
            self.store.write(
                "SADD",
                &[self.keys.types().as_bytes(), new.gpu_type.as_bytes()],
            );
            if let Some(old) = old {
                self.touch_type(&old.gpu_type, false)?;
                self.add_to_counter(&stat::type_total(&old.gpu_type), -1);
            }
            self.touch_type(&new.gpu_type, false)?;
            self.add_to_counter(&stat::type_total(&new.gpu_type), 1);
        }
        if change.contains(GpuChange::PROVIDER) {
            self.store.write(
                "SADD",
                &[self.keys.providers().as_bytes(), new.provider.as_bytes()],
            );
            if let Some(old) = old {
                self.store.write(
                    "SREM",
                    &[
                        self.keys.provider_gpus(&old.provider).as_bytes(),
                        gpu_id.as_bytes(),
                    ],
                );
            }
            self.store.write(
                "SADD",
                &[
                    self.keys.provider_gpus(&new.provider).as_bytes(),
                    gpu_id.as_bytes(),
                ],
            );
        }

        let was_listed = old.is_some_and(|o| is_listed(o.status, old_provider_status));
        let now_listed = is_listed(new.status, new_provider_status);
        if was_listed && now_listed && !change.moves_listing() {
            return Ok(());
        }
        if let Some(old) = old.filter(|_| was_listed) {
            self.unlist(gpu_id, &old.gpu_type)?;
        }
        if now_listed {
            self.list(gpu_id, new, type_price)?;
        }
        Ok(())
    }

    /// Appends one JSON event to the region's stream, trimmed to about `stream-maxlen` entries.
    /// Each entry also records the region's sequence as it stands after the command (`seq`),
    /// so a lost sequence resumes above every version issued (see `lost_seq_floor`).
    ///
    /// Near `maxmemory` the stream stops growing: each entry trims the oldest (exactly), so
    /// that healing evicted records — which appends an event each — frees memory rather than
    /// taking more and making Redis evict further records.
    pub fn append_event(&self, event: &Event) {
        let events = self.keys.events();
        let configured = config::get(&config::STREAM_MAXLEN);
        let (approximate, maxlen): (&[u8], String) = if self.store.memory_is_tight() {
            let current = i64::try_from(self.store.length(&events)).unwrap_or(i64::MAX);
            (b"=", current.clamp(1, configured).to_string())
        } else {
            (b"~", configured.to_string())
        };
        let json = event.to_json();
        let mut args: Vec<&[u8]> = vec![
            events.as_bytes(),
            b"MAXLEN",
            approximate,
            maxlen.as_bytes(),
            b"*",
            b"type",
            event.kind.as_str().as_bytes(),
        ];
        // Left out while the sequence is unreadable: a wrong record would be worse than none.
        let seq = self.current_seq().map(|seq| seq.to_string());
        if let Some(seq) = &seq {
            args.extend_from_slice(&[b"seq", seq.as_bytes()]);
        }
        args.extend_from_slice(&[b"payload", json.as_bytes()]);
        let failed = self.store.failed_writes();
        self.store.write("XADD", &args);
        if self.store.failed_writes() > failed {
            // The stream refused the event (its last id set far ahead by another hand, say):
            // consumers would miss it. A repair of the region sets the stream right.
            crate::heal::queue_region_repair(self.store.ctx(), &self.name);
        }
    }

    /// The price a GPU shows now.
    pub fn shown_price(&self, gpu: &GpuRecord) -> MarketResult<ShownPrice> {
        let type_price = self.load_type_price(&gpu.gpu_type)?;
        let multiplier = self.demand_multiplier(&gpu.gpu_type)?;
        Ok(ShownPrice::of(gpu, type_price.as_ref(), multiplier))
    }

    pub fn status_count(&self, status: GpuStatus) -> MarketResult<i64> {
        let field = stat::gpus_with_status(status);
        if let Some(value) = self.pending_counter(&field) {
            return Ok(value);
        }
        let value = self.stored_counter(&field)?;
        Ok(parse_int(value.as_deref()).unwrap_or(0))
    }
}

impl Drop for Region<'_, '_> {
    fn drop(&mut self) {
        // Counters changed on a path that did not publish (none should) are still written.
        self.flush_counters();
    }
}

/// How a booking comes to an end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BookingEnd {
    /// `GPUCACHE.CANCEL`.
    Cancelled,
    /// Its time is up: the booking clock, or a command that met it first.
    Ended,
    /// `GPUCACHE.REPAIR` found its GPU held by another booking, which keeps it.
    Conflict,
}

impl BookingEnd {
    /// The `reason` of its `booking_cancelled` event.
    pub fn reason(self) -> &'static str {
        match self {
            BookingEnd::Cancelled => "cancelled",
            BookingEnd::Ended => "ended",
            BookingEnd::Conflict => "conflict",
        }
    }

    fn counter(self) -> &'static str {
        match self {
            BookingEnd::Cancelled | BookingEnd::Conflict => stat::BOOKINGS_CANCELLED,
            BookingEnd::Ended => stat::BOOKINGS_ENDED,
        }
    }
}

impl Region<'_, '_> {
    /// Ends an active booking: its record, its registry entry and its place on the booking
    /// clock go, and the GPU it holds — if this booking is the one holding it — becomes
    /// available again. Everything is read and checked before the first write; one
    /// `booking_cancelled` event (with `end`'s reason) is appended. Returns the released GPU.
    pub fn close_booking(
        &self,
        booking_id: &str,
        booking: &Booking,
        end: BookingEnd,
    ) -> MarketResult<Option<GpuRecord>> {
        let booking_key = self.keys.booking(booking_id);
        self.check_key_types(&[(booking_key.as_str(), KeyType::Hash)])?;
        let held = self.held_gpu(&booking.gpu_id, booking_id)?;
        match &held {
            Some(held) => self.prefetch_status_change(
                &held.gpu.gpu_type,
                held.gpu.status,
                GpuStatus::Available,
                &[end.counter()],
            )?,
            None => self.prefetch_counters(&[end.counter()])?,
        }
        let now = self.store.now_ms();
        // The sequence is read (and refused if corrupt) before the first write.
        let version = match held {
            Some(_) => Some(self.next_seq()?),
            None => None,
        };
        self.store.write("DEL", &[booking_key.as_bytes()]);
        self.store.write(
            "HDEL",
            &[
                self.keys.booking_registry().as_bytes(),
                booking_id.as_bytes(),
            ],
        );
        self.store.write(
            "ZREM",
            &[self.keys.booking_ends().as_bytes(), booking_id.as_bytes()],
        );
        let mut event = Event::new(EventKind::BookingCancelled, &self.name, now);
        event.reason = Some(end.reason());
        event.gpu_id = Some(booking.gpu_id.clone());
        event.booking_id = Some(booking_id.to_owned());
        event.user_id = Some(booking.user_id.clone());
        let released = match (&held, version) {
            (Some(held), Some(version)) => {
                Some(self.release(&booking.gpu_id, held, version, now, &mut event)?)
            }
            _ => None,
        };
        self.add_to_counter(end.counter(), 1);
        self.publish(crate::core::events::notify::CANCELLED, event)?;
        Ok(released)
    }
}

/// A GPU held by a booking that is about to end, read and checked before the first write.
pub struct HeldGpu {
    pub gpu: GpuRecord,
    pub provider_status: ProviderStatus,
    pub type_price: Option<TypePrice>,
}

impl Region<'_, '_> {
    /// The GPU `booking_id` holds, if that booking is the one holding it (a GPU that moved on
    /// to another booking, or vanished, is left alone).
    pub fn held_gpu(&self, gpu_id: &str, booking_id: &str) -> MarketResult<Option<HeldGpu>> {
        let Some(gpu) = self
            .load_gpu(gpu_id)?
            .filter(|g| g.booking.as_deref() == Some(booking_id))
        else {
            return Ok(None);
        };
        self.check_gpu_key_types(gpu_id, &gpu.gpu_type, &gpu.provider)?;
        Ok(Some(HeldGpu {
            provider_status: self.provider_status(&gpu.provider)?,
            type_price: self.load_type_price(&gpu.gpu_type)?,
            gpu,
        }))
    }

    /// Frees a GPU from its ended or cancelled booking: available again (listed if its provider
    /// is online) with a fresh TTL, and the change recorded on `event`.
    pub fn release(
        &self,
        gpu_id: &str,
        held: &HeldGpu,
        version: i64,
        now_ms: i64,
        event: &mut Event,
    ) -> MarketResult<GpuRecord> {
        let mut new = held.gpu.clone();
        new.status = GpuStatus::Available;
        new.booking = None;
        new.booking_terms = None;
        new.version = version;
        new.updated_ms = now_ms;
        self.store_gpu(GpuWrite {
            gpu_id,
            old: Some(&held.gpu),
            new: &new,
            old_provider_status: held.provider_status,
            new_provider_status: held.provider_status,
            type_price: held.type_price.as_ref(),
            expire_at_ms: self.gpu_expiry(now_ms, false),
        })?;
        event.gpu_type = Some(new.gpu_type.clone());
        event.provider_id = Some(new.provider.clone());
        event.version = Some(version);
        event.changed("status", held.gpu.status.as_str(), new.status.as_str());
        event.changed("listed", false, is_listed(new.status, held.provider_status));
        Ok(new)
    }
}

/// What a GPU costs now: its base price (own or type) times the type's demand multiplier.
#[derive(Debug, Clone, Copy)]
pub struct ShownPrice {
    pub price: Price,
    pub base: Price,
    pub source: PriceSource,
    /// Hundredths: 150 is x1.5.
    pub multiplier: u32,
}

impl ShownPrice {
    pub fn of(gpu: &GpuRecord, type_price: Option<&TypePrice>, multiplier: u32) -> ShownPrice {
        let (base, source) = gpu::effective_price(gpu, type_price);
        ShownPrice {
            price: demand::apply(base, multiplier),
            base,
            source,
            multiplier,
        }
    }
}

/// The demand multiplier (hundredths) for `listed` bookable GPUs of a type out of `total`.
pub fn demand_multiplier_of(listed: i64, total: i64) -> u32 {
    config::DEMAND_TIERS.current().multiplier(listed, total)
}

/// Everything `Region::store_gpu` needs to write one GPU change.
pub struct GpuWrite<'a> {
    pub gpu_id: &'a str,
    pub old: Option<&'a GpuRecord>,
    pub new: &'a GpuRecord,
    pub old_provider_status: ProviderStatus,
    pub new_provider_status: ProviderStatus,
    pub type_price: Option<&'a TypePrice>,
    /// `None`: the record keeps no TTL (it is held by a booking).
    pub expire_at_ms: Option<i64>,
}

impl Region<'_, '_> {
    /// Finishes a write command: appends its stream event (listing the keys a consumer must
    /// drop) and fires a keyspace notification on every key it changed. The counters hash gets
    /// `gpucache.stats`; every other key gets the command's own event name. Then, for each type
    /// whose demand multiplier moved, a `pricing_updated` event, and for each type whose
    /// availability index changed, an `order_book_updated` event.
    pub fn publish(&self, notify_name: &str, event: Event) -> MarketResult<()> {
        self.publish_after(notify_name, event, &[])
    }

    /// `publish` for a change written over several timer calls (a large repair): `earlier` are
    /// the keys of the earlier calls, notified then ([`Region::notify_written`]) and listed in
    /// the event now.
    pub fn publish_after(
        &self,
        notify_name: &str,
        mut event: Event,
        earlier: &[String],
    ) -> MarketResult<()> {
        self.flush_counters();
        let events = self.keys.events();
        let internal = [
            self.keys.gpu_registry(),
            self.keys.types(),
            self.keys.providers(),
            self.keys.booking_registry(),
            self.keys.booking_ends(),
            self.keys.window_24h(),
            self.keys.provider_moves(),
        ];
        let written = self.store.written_keys();
        let mut listed = std::collections::HashSet::new();
        event.keys = earlier
            .iter()
            .chain(&written)
            .filter(|k| **k != events && !internal.contains(k))
            .filter(|k| earlier.is_empty() || listed.insert(k.as_str()))
            .cloned()
            .collect();
        self.append_event(&event);
        self.notify_keys(notify_name, &written);
        self.publish_derived(event.ts_ms)
    }

    /// Notifies every key written so far (the counters hash as `gpucache.stats`), for a change
    /// whose event is appended later by [`Region::publish_after`].
    pub fn notify_written(&self, notify_name: &str) {
        self.flush_counters();
        self.notify_keys(notify_name, &self.store.written_keys());
    }

    fn notify_keys(&self, notify_name: &str, keys: &[String]) {
        let stats = self.keys.stats();
        let events = self.keys.events();
        for key in keys.iter().filter(|k| **k != events) {
            let name = if *key == stats {
                crate::core::events::notify::STATS
            } else {
                notify_name
            };
            self.store.notify(name, key);
        }
    }

    /// Restores a multiplier remembered by [`Region::touch_type`] in an earlier timer call of
    /// the same change.
    pub fn remember_demand(&self, gpu_type: &str, before: u32) {
        self.demand_before
            .borrow_mut()
            .insert(gpu_type.to_owned(), before);
        self.books_changed.borrow_mut().insert(gpu_type.to_owned());
    }

    fn publish_derived(&self, ts_ms: i64) -> MarketResult<()> {
        use crate::core::demand::format_hundredths;
        use crate::core::events::notify;
        let before = self.demand_before.take();
        for (gpu_type, old) in before {
            let new = self.demand_multiplier(&gpu_type)?;
            if new == old {
                continue;
            }
            let key = self.keys.type_price(&gpu_type);
            let mut event = Event::new(EventKind::PricingUpdated, &self.name, ts_ms);
            event.reason = Some("demand");
            event.gpu_type = Some(gpu_type.clone());
            event.changed("multiplier", format_hundredths(old), format_hundredths(new));
            event.keys = vec![key.clone()];
            self.append_event(&event);
            self.store.notify(notify::PRICE, &key);
            self.books_changed.borrow_mut().insert(gpu_type);
        }
        for gpu_type in self.books_changed.take() {
            let key = self.keys.order_book(&gpu_type);
            let mut event = Event::new(EventKind::OrderBookUpdated, &self.name, ts_ms);
            event.gpu_type = Some(gpu_type);
            event.keys = vec![key.clone()];
            self.append_event(&event);
            self.store.notify(notify::ORDER_BOOK, &key);
        }
        Ok(())
    }
}
