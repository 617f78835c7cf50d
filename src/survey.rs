//! A region surveyed against its own records: what `GPUCACHE.CHECK` reports and what
//! `GPUCACHE.REPAIR` (and every repair the module queues itself) fixes, computed once.
//!
//! The survey reads everything the region holds, without writing, decides what the region
//! should hold, and lists every difference as a [`Finding`]: a sentence for `CHECK` and the
//! writes that fix it for `REPAIR`. Both commands use the same findings, so a repair leaves
//! nothing for the next `CHECK` to report (`CHECK` after `REPAIR` is clean unless a finding
//! could only be reported).
//!
//! What decides, when records disagree:
//! - **Who holds a GPU**: the GPU record's booking, when that booking is known — from its own
//!   record or from the copy of its terms the GPU record keeps. A booking whose GPU is held by
//!   another booking ends (reason `conflict`); a booking whose GPU holds none takes it back.
//! - **A booking's terms**: its own record; if that is gone, the copy on the GPU it holds.
//! - **A booked GPU whose record is gone**: rebuilt from its registry entry (or the booking's
//!   note of its type and provider) and the booking.
//! - **Everything else** — the registry, provider sets, type and provider sets, availability
//!   indexes, booking registry and clock, counters, the sequence — is derived from the records.
//!   The all-time booking counters cannot be recounted: a lost or garbled one restarts at the
//!   least it can be. The 24-hour window is checked against the event stream, as far back as
//!   the stream reaches.

use crate::core::booking::Booking;
use crate::core::error::MarketResult;
use crate::core::events::EventKind;
use crate::core::gpu::{price_source, GpuRecord, PriceSource, RegistryEntry, TypePrice};
use crate::core::price::Price;
use crate::core::status::{is_listed, GpuStatus, ProviderStatus};
use crate::core::window;
use crate::keys::RegionKeys;
use crate::market::{stat, Region};
use crate::store::Store;
use redis_module::KeyType;
use std::collections::{BTreeMap, BTreeSet};

/// One difference between what the region holds and what it should hold.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Finding {
    pub message: String,
    pub fix: Fix,
}

/// What a repair writes for a finding. Serializable: a large region is surveyed in a forked
/// child (`survey_fork.rs`), which hands its findings back to the server as JSON.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub enum Fix {
    /// Nothing a repair can write: reported only.
    Report,
    /// One replicated command, as (command, arguments).
    Write(Command, Vec<Vec<u8>>),
    /// A GPU record to write, with a fresh version drawn from the sequence when applied.
    /// `before` is the record as stored (`None`: written whole).
    Gpu {
        gpu_id: String,
        record: Box<GpuRecord>,
        before: Option<Box<GpuRecord>>,
    },
    /// A booking record to write back.
    Booking {
        booking_id: String,
        booking: Booking,
    },
    /// A booking that loses its GPU to another booking: its record goes (its index entries go
    /// with the derived indexes) and it counts as cancelled.
    Close {
        booking_id: String,
        booking: Box<Booking>,
    },
    /// A field of the counters hash (all written with one `HSET`).
    Counter(String, i64),
}

/// A command a fix writes. Named in a forked child's JSON and mapped back to one of the
/// commands surveys write: an unknown name is refused, never run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Command(pub &'static str);

const FIX_COMMANDS: [&str; 11] = [
    "DEL",
    "HDEL",
    "HSET",
    "PERSIST",
    "PEXPIREAT",
    "SADD",
    "SREM",
    "XDEL",
    "XSETID",
    "ZADD",
    "ZREM",
];

impl serde::Serialize for Command {
    fn serialize<S: serde::Serializer>(&self, out: S) -> Result<S::Ok, S::Error> {
        out.serialize_str(self.0)
    }
}

impl<'de> serde::Deserialize<'de> for Command {
    fn deserialize<D: serde::Deserializer<'de>>(input: D) -> Result<Command, D::Error> {
        let name = String::deserialize(input)?;
        FIX_COMMANDS
            .into_iter()
            .find(|known| *known == name)
            .map(Command)
            .ok_or_else(|| serde::de::Error::custom(format!("unknown fix command {name}")))
    }
}

impl Finding {
    fn new(message: String, fix: Fix) -> Finding {
        Finding { message, fix }
    }
}

#[derive(Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct Survey {
    pub region: String,
    pub gpus_checked: usize,
    pub bookings_checked: usize,
    pub findings: Vec<Finding>,
    /// The sequence as stored (`None`: missing or unreadable).
    pub stored_seq: Option<i64>,
    /// Where the sequence must stand at least: above every version still visible.
    pub seq_floor: i64,
    /// `bookings:cancelled` as stored (a repair adds the bookings it closes).
    pub stored_cancelled: i64,
    /// Registry entries of GPUs whose record is gone and that nothing rebuilds.
    pub vanished_gpus: usize,
    /// Bookings that are dropped (lost, or closed for a conflict).
    pub dropped_bookings: usize,
    /// Types whose type-price GPUs move back to their own prices (the type price is gone).
    pub repriced_types: usize,
    /// Provider set members that belong to no GPU of that provider.
    pub stale_provider_members: usize,
    /// Types whose index, counts or price sums the fixes change (their demand multipliers are
    /// read before a repair writes, to tell which moved).
    pub touched_types: BTreeSet<String>,
}

/// A key's content as read: present, absent, or present but unusable (another type, or fields
/// gpucache never writes).
enum Read<T> {
    Present(T),
    Missing,
    Broken,
}

/// What the event stream tells a survey.
#[derive(Debug, Default)]
struct StreamFacts {
    /// Time (ms) of its oldest entry.
    first_ms: Option<i64>,
    /// Entries were trimmed or deleted: it no longer holds everything appended.
    trimmed: bool,
    max_seq: i64,
    max_version: i64,
    /// Bookings made per 15-minute bucket: (count, volume in micro-units).
    bookings: BTreeMap<i64, (i64, i64)>,
    /// Each provider's status as its newest `provider_status_changed` event set it.
    provider_status: BTreeMap<String, String>,
    /// Types and providers the entries name (valid names only): where to look for GPUs that
    /// the lost registry and sets no longer name.
    types: BTreeSet<String>,
    providers: BTreeSet<String>,
    /// The stream's last id (`XINFO STREAM`'s `last-generated-id`), as (ms, seq).
    last_generated: Option<(u64, u64)>,
    /// Entries whose id lies more than `FUTURE_TOLERANCE_MS` ahead of the clock, and the newest
    /// id of the others.
    future_ids: Vec<String>,
    last_sound_id: Option<String>,
}

/// A stream id this far ahead of the clock was not drawn by gpucache (whose ids are the time,
/// with clocks a little apart across a failover at most): the stream would hand every new
/// event an id after it, and at the largest id there is, refuse new events altogether.
const FUTURE_TOLERANCE_MS: i64 = 24 * 3600 * 1000;

fn stream_id(id: &str) -> Option<(u64, u64)> {
    let (ms, seq) = id.split_once('-')?;
    Some((ms.parse().ok()?, seq.parse().ok()?))
}

/// A provider's record as read.
enum ProviderRead {
    Known(ProviderStatus),
    /// No record: online, unless its GPUs say otherwise.
    Missing,
    /// Another type, or a status gpucache never writes.
    Broken,
}

/// Every gpucache key family and its Redis type, for the findings' wording.
fn type_name(kind: KeyType) -> &'static str {
    match kind {
        KeyType::Empty => "nothing",
        KeyType::String => "a string",
        KeyType::List => "a list",
        KeyType::Hash => "a hash",
        KeyType::Set => "a set",
        KeyType::ZSet => "a sorted set",
        KeyType::Module => "a module value",
        KeyType::Stream => "a stream",
    }
}

struct Surveyor<'r, 's, 'c> {
    region: &'r Region<'s, 'c>,
    store: &'s Store<'c>,
    now_ms: i64,
    out: Survey,
    /// Keys found holding a foreign type: they are replaced, and read as empty.
    replaced: BTreeSet<String>,
}

pub fn survey(store: &Store, region_name: &str) -> MarketResult<Survey> {
    let region = Region::new(store, region_name.to_owned());
    let mut surveyor = Surveyor {
        region: &region,
        store,
        now_ms: store.now_ms(),
        out: Survey {
            region: region_name.to_owned(),
            ..Survey::default()
        },
        replaced: BTreeSet::new(),
    };
    surveyor.run()?;
    let mut out = surveyor.out;
    out.touched_types = touched_types(&out.findings);
    Ok(out)
}

/// The types whose availability index, GPU counts or own-price sums a repair's fixes change
/// (worked out here, in the forked child for a large region, rather than by the repair).
fn touched_types(findings: &[Finding]) -> BTreeSet<String> {
    let mut types = BTreeSet::new();
    for finding in findings {
        match &finding.fix {
            Fix::Write(_, args) => {
                let key = args.first().map(|k| String::from_utf8_lossy(k));
                if let Some((_, entity, id)) = key.as_deref().and_then(RegionKeys::parse) {
                    if entity.starts_with("avail-") {
                        types.insert(id.to_owned());
                    }
                }
            }
            Fix::Gpu { record, before, .. } => {
                types.insert(record.gpu_type.clone());
                if let Some(before) = before {
                    types.insert(before.gpu_type.clone());
                }
            }
            Fix::Counter(field, _) => {
                if let Some(gpu_type) = field.strip_prefix(stat::TYPE_TOTAL_PREFIX) {
                    types.insert(gpu_type.to_owned());
                }
            }
            Fix::Report | Fix::Booking { .. } | Fix::Close { .. } => {}
        }
    }
    types
}

fn int(text: &str) -> Option<i64> {
    text.parse().ok()
}

impl Surveyor<'_, '_, '_> {
    fn add(&mut self, message: String, fix: Fix) {
        self.out.findings.push(Finding::new(message, fix));
    }

    fn write(command: &'static str, args: &[&str]) -> Fix {
        Fix::Write(
            Command(command),
            args.iter().map(|a| a.as_bytes().to_vec()).collect(),
        )
    }

    /// A field or member that is not text (another client's hand: gpucache writes only ASCII
    /// ids) is removed as it is stored, rather than read under a name that matches nothing.
    fn drop_unreadable(&mut self, command: &'static str, key: &str, name: &[u8]) {
        self.add(
            format!(
                "{key} holds '{}', which is not a name gpucache writes: it is removed",
                crate::core::input::shown(name, 64)
            ),
            Fix::Write(
                Command(command),
                vec![key.as_bytes().to_vec(), name.to_vec()],
            ),
        );
    }

    /// Checks a key's type; a foreign one is replaced (reported, deleted, read as empty).
    /// Returns whether the key holds usable content of the wanted type.
    fn usable(&mut self, key: &str, wanted: KeyType) -> bool {
        if self.replaced.contains(key) {
            return false;
        }
        let actual = self.store.key_type(key);
        if actual == KeyType::Empty {
            return false;
        }
        if actual != wanted {
            self.add(
                format!(
                    "{key} holds {}, not {}: it is replaced",
                    type_name(actual),
                    type_name(wanted)
                ),
                Self::write("DEL", &[key]),
            );
            self.replaced.insert(key.to_owned());
            return false;
        }
        true
    }

    /// Market state must never carry a TTL (a `volatile-*` policy could evict it).
    fn no_ttl(&mut self, key: &str, what: &str) {
        if !self.replaced.contains(key) && self.store.ttl_ms(key).is_some() {
            self.add(
                format!("{what} {key} carries a TTL, so an eviction policy may take it"),
                Self::write("PERSIST", &[key]),
            );
        }
    }

    // Whole keys are read through the key API (no command round trip, no reply to build and
    // parse): a survey reads every index of the region.
    fn hash(&mut self, key: &str) -> MarketResult<BTreeMap<String, String>> {
        let mut fields = BTreeMap::new();
        let mut unreadable = Vec::new();
        if self.usable(key, KeyType::Hash) {
            self.store
                .scan_hash(key, |name, value| match std::str::from_utf8(name) {
                    Ok(name) => {
                        fields.insert(name.to_owned(), String::from_utf8_lossy(value).into_owned());
                    }
                    Err(_) => unreadable.push(name.to_vec()),
                })?;
        }
        for name in unreadable {
            self.drop_unreadable("HDEL", key, &name);
        }
        Ok(fields)
    }

    fn set(&mut self, key: &str) -> MarketResult<BTreeSet<String>> {
        let mut members = BTreeSet::new();
        let mut unreadable = Vec::new();
        if self.usable(key, KeyType::Set) {
            self.store
                .scan_set(key, |member| match std::str::from_utf8(member) {
                    Ok(member) => {
                        members.insert(member.to_owned());
                    }
                    Err(_) => unreadable.push(member.to_vec()),
                })?;
        }
        for member in unreadable {
            self.drop_unreadable("SREM", key, &member);
        }
        Ok(members)
    }

    fn zset(&mut self, key: &str) -> MarketResult<BTreeMap<String, f64>> {
        let mut members = BTreeMap::new();
        let mut unreadable = Vec::new();
        if self.usable(key, KeyType::ZSet) {
            self.store.zwalk(
                key,
                (f64::NEG_INFINITY, false),
                f64::INFINITY,
                false,
                |member, score| {
                    match std::str::from_utf8(member) {
                        Ok(member) => {
                            members.insert(member.to_owned(), score);
                        }
                        Err(_) => unreadable.push(member.to_vec()),
                    }
                    true
                },
            )?;
        }
        for member in unreadable {
            self.drop_unreadable("ZREM", key, &member);
        }
        Ok(members)
    }

    fn gpu(&mut self, gpu_id: &str) -> Read<(GpuRecord, Option<i64>)> {
        let key = self.region.keys.gpu(gpu_id);
        if !self.usable(&key, KeyType::Hash) {
            return if self.replaced.contains(&key) {
                Read::Broken
            } else {
                Read::Missing
            };
        }
        match self.region.load_gpu_with_ttl(gpu_id) {
            Ok(Some(loaded)) => Read::Present(loaded),
            Ok(None) => Read::Missing,
            Err(_) => {
                self.add(
                    format!("record of {gpu_id} lacks fields gpucache writes: it is replaced"),
                    Self::write("DEL", &[&key]),
                );
                self.replaced.insert(key);
                Read::Broken
            }
        }
    }

    fn booking(&mut self, booking_id: &str) -> Read<Booking> {
        let key = self.region.keys.booking(booking_id);
        if !self.usable(&key, KeyType::Hash) {
            return if self.replaced.contains(&key) {
                Read::Broken
            } else {
                Read::Missing
            };
        }
        match self.region.load_booking(booking_id) {
            Ok(Some(booking)) => Read::Present(booking),
            Ok(None) => Read::Missing,
            Err(_) => {
                self.add(
                    format!("record of booking {booking_id} lacks fields gpucache writes: it is replaced"),
                    Self::write("DEL", &[&key]),
                );
                self.replaced.insert(key);
                Read::Broken
            }
        }
    }

    fn run(&mut self) -> MarketResult<()> {
        let keys = self.region.keys.clone();
        let now = self.now_ms;

        // Region-wide keys, read whole.
        let registry_raw = self.hash(&keys.gpu_registry())?;
        let booking_registry = self.hash(&keys.booking_registry())?;
        let booking_ends = self.zset(&keys.booking_ends())?;
        let types_set = self.set(&keys.types())?;
        let providers_set = self.set(&keys.providers())?;
        let counters = self.hash(&keys.stats())?;
        let window = self.hash(&keys.window_24h())?;
        self.usable(&keys.events(), KeyType::Stream);
        for (key, what) in [
            (keys.gpu_registry(), "the GPU registry"),
            (keys.booking_registry(), "the booking registry"),
            (keys.booking_ends(), "the booking clock"),
            (keys.types(), "the type set"),
            (keys.providers(), "the provider set"),
            (keys.stats(), "the market counters"),
            (keys.window_24h(), "the 24-hour window"),
            (keys.events(), "the event stream"),
        ] {
            self.no_ttl(&key, what);
        }

        let registry: BTreeMap<String, Option<RegistryEntry>> = registry_raw
            .iter()
            .map(|(id, text)| (id.clone(), RegistryEntry::parse(text)))
            .collect();

        // Everything the region mentions, read until nothing new turns up: records name their
        // bookings, type and provider; bookings name their GPU; provider sets and indexes name
        // GPUs.
        let mut gpu_ids: BTreeSet<String> = registry.keys().cloned().collect();
        gpu_ids.extend(booking_registry.values().cloned());
        let mut booking_ids: BTreeSet<String> = booking_registry.keys().cloned().collect();
        booking_ids.extend(booking_ends.keys().cloned());
        let stream = if self.replaced.contains(&keys.events()) {
            StreamFacts::default()
        } else {
            self.read_stream(&keys)?
        };
        let mut providers: BTreeSet<String> = providers_set.clone();
        let mut types: BTreeSet<String> = types_set.clone();
        providers.extend(stream.providers.iter().cloned());
        types.extend(stream.types.iter().cloned());
        // The counters count GPUs per type: a type they name has indexes to look through.
        types.extend(counters.keys().filter_map(|field| {
            field
                .strip_prefix(stat::TYPE_TOTAL_PREFIX)
                .or_else(|| field.strip_prefix("own-sum:"))
                .filter(|t| crate::core::input::id("type", t.as_bytes()).is_ok())
                .map(str::to_owned)
        }));
        for entry in registry.values().flatten() {
            providers.insert(entry.provider.clone());
            types.insert(entry.gpu_type.clone());
            booking_ids.extend(entry.booking.clone());
        }
        let mut records: BTreeMap<String, Read<(GpuRecord, Option<i64>)>> = BTreeMap::new();
        let mut bookings: BTreeMap<String, Read<Booking>> = BTreeMap::new();
        let mut provider_members: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        let mut provider_status: BTreeMap<String, ProviderRead> = BTreeMap::new();
        // Per type: avail-own, avail-type, avail-score, avail-draining.
        let mut indexes: BTreeMap<String, [BTreeMap<String, f64>; 4]> = BTreeMap::new();
        let mut type_prices: BTreeMap<String, Option<TypePrice>> = BTreeMap::new();
        loop {
            let mut found = false;
            let unread: Vec<String> = gpu_ids
                .iter()
                .filter(|id| !records.contains_key(*id))
                .cloned()
                .collect();
            for gpu_id in unread {
                found = true;
                let read = self.gpu(&gpu_id);
                if let Read::Present((gpu, _)) = &read {
                    booking_ids.extend(gpu.booking.clone());
                    providers.insert(gpu.provider.clone());
                    types.insert(gpu.gpu_type.clone());
                }
                records.insert(gpu_id, read);
            }
            let unread: Vec<String> = booking_ids
                .iter()
                .filter(|id| !bookings.contains_key(*id))
                .cloned()
                .collect();
            for booking_id in unread {
                found = true;
                let read = self.booking(&booking_id);
                if let Read::Present(booking) = &read {
                    gpu_ids.insert(booking.gpu_id.clone());
                    // A booking whose GPU record is gone still leads to its type's indexes and
                    // its provider's GPUs (and through them to GPUs nothing else names).
                    let valid =
                        |name: &&String| crate::core::input::id("name", name.as_bytes()).is_ok();
                    types.extend(booking.gpu_type.iter().filter(valid).cloned());
                    providers.extend(booking.provider.iter().filter(valid).cloned());
                }
                bookings.insert(booking_id, read);
            }
            let unread: Vec<String> = providers
                .iter()
                .filter(|p| !provider_members.contains_key(*p))
                .cloned()
                .collect();
            for provider in unread {
                found = true;
                let members_key = keys.provider_gpus(&provider);
                let members = self.set(&members_key)?;
                self.no_ttl(&members_key, "the GPU set of a provider");
                gpu_ids.extend(members.iter().cloned());
                provider_members.insert(provider.clone(), members);
                let record_key = keys.provider(&provider);
                let status = if self.usable(&record_key, KeyType::Hash) {
                    self.no_ttl(&record_key, "the provider record");
                    match self.region.provider_status(&provider) {
                        Ok(status) => ProviderRead::Known(status),
                        Err(_) => ProviderRead::Broken,
                    }
                } else if self.replaced.contains(&record_key) {
                    ProviderRead::Broken
                } else {
                    ProviderRead::Missing
                };
                provider_status.insert(provider, status);
            }
            let unread: Vec<String> = types
                .iter()
                .filter(|t| !indexes.contains_key(*t))
                .cloned()
                .collect();
            for gpu_type in unread {
                found = true;
                let mut sets: [BTreeMap<String, f64>; 4] = Default::default();
                for (slot, key) in sets.iter_mut().zip([
                    keys.available_own(&gpu_type),
                    keys.available_typed(&gpu_type),
                    keys.available_by_score(&gpu_type),
                    keys.available_draining(&gpu_type),
                ]) {
                    *slot = self.zset(&key)?;
                    self.no_ttl(&key, "the availability index");
                    gpu_ids.extend(slot.keys().cloned());
                }
                indexes.insert(gpu_type.clone(), sets);
                let price_key = keys.type_price(&gpu_type);
                let price = if self.usable(&price_key, KeyType::Hash) {
                    match self.region.load_type_price(&gpu_type) {
                        Ok(price) => price,
                        Err(_) => {
                            self.add(
                                format!("type price {price_key} lacks fields gpucache writes: it is dropped (GPUs show their own prices)"),
                                Self::write("DEL", &[&price_key]),
                            );
                            None
                        }
                    }
                } else {
                    None
                };
                type_prices.insert(gpu_type, price);
            }
            if !found {
                break;
            }
        }

        // The highest version anything still shows: the sequence must stand above it.
        let mut seen_version = 0i64;
        for read in records.values() {
            if let Read::Present((gpu, _)) = read {
                seen_version = seen_version.max(gpu.version).max(gpu.price_seq);
            }
        }
        for price in type_prices.values().flatten() {
            seen_version = seen_version.max(price.version).max(price.seq);
        }
        for provider in &providers {
            if let Ok(Some(version)) = self
                .store
                .hget(
                    &keys.provider(provider),
                    crate::market::provider_field::VERSION,
                )
                .map(|v| v.and_then(|v| crate::core::version(&v)))
            {
                seen_version = seen_version.max(version);
            }
        }

        // Who holds what: start from the records as stored.
        let mut desired: BTreeMap<String, GpuRecord> = BTreeMap::new();
        let mut before: BTreeMap<String, Option<GpuRecord>> = BTreeMap::new();
        let mut reasons: BTreeMap<String, String> = BTreeMap::new();
        for (gpu_id, read) in &records {
            if let Read::Present((gpu, _)) = read {
                desired.insert(gpu_id.clone(), gpu.clone());
            }
        }
        let mut active: BTreeMap<String, Booking> = BTreeMap::new();
        // Which GPU's record holds each booking, and which the registry says holds it (looked up
        // once per booking, not by a scan of every GPU).
        let mut held_by: BTreeMap<String, String> = BTreeMap::new();
        for (gpu_id, gpu) in &desired {
            if let Some(booking_id) = &gpu.booking {
                held_by
                    .entry(booking_id.clone())
                    .or_insert_with(|| gpu_id.clone());
            }
        }
        let registry_claims: BTreeMap<String, String> = registry
            .iter()
            .filter_map(|(id, e)| Some((e.as_ref()?.booking.clone()?, id.clone())))
            .collect();
        let mut closing: BTreeSet<String> = BTreeSet::new();
        // Bookings their GPU record holds come first, so a conflict is decided for the holder.
        let held_first: Vec<String> = {
            let held: BTreeSet<&String> = desired
                .values()
                .filter_map(|g| g.booking.as_ref())
                .collect();
            let mut ordered: Vec<String> = booking_ids
                .iter()
                .filter(|b| held.contains(b))
                .cloned()
                .collect();
            ordered.extend(booking_ids.iter().filter(|b| !held.contains(b)).cloned());
            ordered
        };
        let mut changed = |gpu_id: &str,
                           record: GpuRecord,
                           reason: String,
                           desired: &mut BTreeMap<String, GpuRecord>,
                           before: &mut BTreeMap<String, Option<GpuRecord>>,
                           stored: Option<&GpuRecord>| {
            before
                .entry(gpu_id.to_owned())
                .or_insert_with(|| stored.cloned());
            reasons
                .entry(gpu_id.to_owned())
                .and_modify(|r| {
                    r.push_str("; ");
                    r.push_str(&reason);
                })
                .or_insert(reason);
            desired.insert(gpu_id.to_owned(), record);
        };
        for booking_id in &held_first {
            self.out.bookings_checked += 1;
            let stored = bookings.get(booking_id);
            let claimant = held_by.get(booking_id).cloned();
            let stored_booking = match stored {
                Some(Read::Present(b)) => Some(b.clone()),
                _ => None,
            };
            let gpu_id = stored_booking
                .as_ref()
                .map(|b| b.gpu_id.clone())
                .or_else(|| claimant.clone())
                .or_else(|| booking_registry.get(booking_id).cloned())
                .or_else(|| registry_claims.get(booking_id).cloned());
            let copy = gpu_id.as_ref().and_then(|g| {
                let gpu = desired.get(g)?;
                let terms = gpu.booking_terms.as_ref()?;
                (gpu.booking.as_deref() == Some(booking_id.as_str()))
                    .then(|| Booking::from_terms(g, terms).holding(&gpu.gpu_type, &gpu.provider))
            });
            let Some((gpu_id, booking)) = gpu_id.zip(stored_booking.clone().or(copy)) else {
                // Neither its record nor a copy of its terms remains: it cannot be served.
                self.out.dropped_bookings += 1;
                // Its GPU (if one holds it) is released below, and its index entries go.
                continue;
            };
            match desired.get(&gpu_id).cloned() {
                Some(gpu) if gpu.booking.as_deref() == Some(booking_id.as_str()) => {
                    let mut held = gpu.clone();
                    let mut why = Vec::new();
                    if gpu.booking_terms.as_ref() != Some(&booking.terms()) {
                        held.booking_terms = Some(booking.terms());
                        why.push(format!(
                            "{gpu_id} lacks a copy of the terms of booking {booking_id}"
                        ));
                    }
                    if gpu.status != GpuStatus::Busy {
                        held.status = GpuStatus::Busy;
                        why.push(format!(
                            "{gpu_id} holds booking {booking_id} but is {}",
                            gpu.status.as_str()
                        ));
                    }
                    if !why.is_empty() {
                        let stored_gpu = gpu.clone();
                        changed(
                            &gpu_id,
                            held,
                            why.join("; "),
                            &mut desired,
                            &mut before,
                            Some(&stored_gpu),
                        );
                    }
                }
                // The GPU holds another booking, and rightly so — that booking's record names
                // it, or it has only the GPU's copy: this one loses the GPU. (A GPU holding a
                // booking whose record names another GPU holds nothing, and this one takes it.)
                Some(gpu)
                    if gpu
                        .booking
                        .as_ref()
                        .is_some_and(|holder| match bookings.get(holder) {
                            Some(Read::Present(b)) => b.gpu_id == gpu_id,
                            _ => gpu.booking_terms.is_some(),
                        }) =>
                {
                    self.out.dropped_bookings += 1;
                    closing.insert(booking_id.clone());
                    self.add(
                        format!(
                            "booking {booking_id} is for {gpu_id}, which booking {} holds: {booking_id} ends (conflict)",
                            gpu.booking.as_deref().unwrap_or_default()
                        ),
                        Fix::Close {
                            booking_id: booking_id.clone(),
                            booking: Box::new(booking.clone()),
                        },
                    );
                    continue;
                }
                Some(gpu) => {
                    let mut held = gpu.clone();
                    held.status = GpuStatus::Busy;
                    held.booking = Some(booking_id.clone());
                    held.booking_terms = Some(booking.terms());
                    changed(
                        &gpu_id,
                        held,
                        format!("booking {booking_id} is for {gpu_id}, which does not hold it: it takes it back"),
                        &mut desired,
                        &mut before,
                        Some(&gpu),
                    );
                }
                None => {
                    let entry = registry.get(&gpu_id).cloned().flatten();
                    let kind = entry
                        .as_ref()
                        .map(|e| (e.gpu_type.clone(), e.provider.clone()))
                        .or_else(|| booking.gpu_type.clone().zip(booking.provider.clone()));
                    let Some((gpu_type, provider)) = kind else {
                        self.out.dropped_bookings += 1;
                        closing.insert(booking_id.clone());
                        self.add(
                            format!("booking {booking_id} is for {gpu_id}, which is not registered and whose type is unknown: {booking_id} ends"),
                            Fix::Close {
                                booking_id: booking_id.clone(),
                                booking: Box::new(booking.clone()),
                            },
                        );
                        continue;
                    };
                    // Its version is drawn when the repair writes it.
                    let rebuilt =
                        GpuRecord::rebuilt_for(&gpu_type, &provider, booking_id, &booking, 0, now);
                    providers.insert(provider);
                    types.insert(gpu_type);
                    changed(
                        &gpu_id,
                        rebuilt,
                        format!("the record of {gpu_id}, held by booking {booking_id}, is gone: it is rebuilt from the booking (its own price and attributes are placeholders until it is registered again)"),
                        &mut desired,
                        &mut before,
                        None,
                    );
                }
            }
            match stored {
                Some(Read::Present(_)) => self.no_ttl(&keys.booking(booking_id), "booking"),
                _ => self.add(
                    format!("{gpu_id} holds booking {booking_id}, which does not exist: it is rebuilt from the copy of its terms on {gpu_id}"),
                    Fix::Booking {
                        booking_id: booking_id.clone(),
                        booking: booking.clone(),
                    },
                ),
            }
            active.insert(booking_id.clone(), booking);
        }
        // Records holding a booking that is not active (or that is another GPU's), or busy
        // without one, are released.
        let orphans: Vec<(String, GpuRecord)> = desired
            .iter()
            .filter(|(gpu_id, g)| {
                g.booking
                    .as_ref()
                    .is_some_and(|b| active.get(b).is_none_or(|b| b.gpu_id != **gpu_id))
                    || (g.booking.is_none() && g.status == GpuStatus::Busy)
            })
            .map(|(id, g)| (id.clone(), g.clone()))
            .collect();
        for (gpu_id, gpu) in orphans {
            let mut released = gpu.clone();
            released.status = GpuStatus::Available;
            released.booking = None;
            released.booking_terms = None;
            let why = match (&gpu.booking, gpu.booking.as_ref().and_then(|b| active.get(b))) {
                (Some(b), Some(booking)) => format!(
                    "{gpu_id} holds booking {b}, which is for {}: {gpu_id} is released",
                    booking.gpu_id
                ),
                (Some(b), None) => format!("{gpu_id} holds booking {b}, which does not exist and of which no copy of its terms remains: {gpu_id} is released"),
                (None, _) => format!("{gpu_id} is busy without a booking: it is released"),
            };
            changed(
                &gpu_id,
                released,
                why,
                &mut desired,
                &mut before,
                Some(&gpu),
            );
        }
        self.out.gpus_checked = desired.len();
        for (gpu_id, record) in &desired {
            if let Some(stored) = before.get(gpu_id) {
                self.add(
                    reasons.get(gpu_id).cloned().unwrap_or_default(),
                    Fix::Gpu {
                        gpu_id: gpu_id.clone(),
                        record: Box::new(record.clone()),
                        before: stored.clone().map(Box::new),
                    },
                );
                continue;
            }
            // TTLs: a booked GPU's record is market state, an idle one a cached record.
            let ttl = match records.get(gpu_id) {
                Some(Read::Present((_, ttl))) => *ttl,
                _ => None,
            };
            let key = keys.gpu(gpu_id);
            match (record.booking.is_some(), ttl) {
                (true, Some(_)) => self.add(
                    format!("{gpu_id} is booked but its record carries a TTL, so an eviction policy may take it"),
                    Self::write("PERSIST", &[&key]),
                ),
                (false, None) => {
                    let at = self.region.gpu_expiry(now, false).unwrap_or(now);
                    self.add(
                        format!("{gpu_id} is an idle GPU's cached record without a TTL"),
                        Self::write("PEXPIREAT", &[&key, &at.to_string()]),
                    );
                }
                _ => {}
            }
        }

        // A provider record that is gone or cannot be read: its status is its last change the
        // event stream recorded; without one, it is inferred from the availability indexes — a
        // provider whose available GPUs are all unlisted while the same indexes list other
        // GPUs was not online. Otherwise it is online, as a provider nobody set is (its record
        // need not exist).
        let mut statuses: BTreeMap<String, ProviderStatus> = BTreeMap::new();
        // Per provider: whether it has available GPUs, whether any of them is listed, and
        // whether the indexes of their types list any GPU at all (they are not lost).
        let mut listing: BTreeMap<&str, (bool, bool, bool)> = BTreeMap::new();
        for (gpu_id, gpu) in desired
            .iter()
            .filter(|(_, g)| g.status == GpuStatus::Available)
        {
            let sets = indexes.get(&gpu.gpu_type);
            let listed = sets.is_some_and(|sets| sets.iter().any(|s| s.contains_key(gpu_id)));
            let indexed = sets.is_some_and(|sets| sets.iter().any(|s| !s.is_empty()));
            let entry = listing
                .entry(gpu.provider.as_str())
                .or_insert((false, false, true));
            entry.0 = true;
            entry.1 |= listed;
            entry.2 &= indexed;
        }
        for (provider, read) in &provider_status {
            let status = match read {
                ProviderRead::Known(status) => *status,
                ProviderRead::Missing | ProviderRead::Broken => {
                    let recorded = stream
                        .provider_status
                        .get(provider)
                        .and_then(|s| ProviderStatus::parse(s.as_bytes()).ok());
                    let (has_available, any_listed, indexed) =
                        listing.get(provider.as_str()).copied().unwrap_or_default();
                    let (status, source) = match recorded {
                        Some(status) => (status, "its last change in the event stream"),
                        None if has_available && !any_listed && indexed => (
                            ProviderStatus::Offline,
                            "inferred: its available GPUs are all unlisted",
                        ),
                        None => (ProviderStatus::Online, "as for a provider nobody set"),
                    };
                    let lost = matches!(read, ProviderRead::Broken);
                    if lost || status != ProviderStatus::Online {
                        let key = keys.provider(provider);
                        self.add(
                            format!(
                                "the record of provider {provider} is {}: its status is set to {} ({source})",
                                if lost { "unreadable" } else { "gone" },
                                status.as_str()
                            ),
                            Self::write(
                                "HSET",
                                &[&key, crate::market::provider_field::STATUS, status.as_str()],
                            ),
                        );
                    }
                    status
                }
            };
            statuses.insert(provider.clone(), status);
        }

        // The registry against the records.
        for (gpu_id, record) in &desired {
            let wanted = RegistryEntry::of(record).to_string();
            match registry_raw.get(gpu_id) {
                Some(entry) if *entry == wanted => {}
                Some(entry) => self.add(
                    format!("registry entry of {gpu_id} is '{entry}', record says '{wanted}'"),
                    Self::write("HSET", &[&keys.gpu_registry(), gpu_id, &wanted]),
                ),
                None => self.add(
                    format!("{gpu_id} is missing from the registry"),
                    Self::write("HSET", &[&keys.gpu_registry(), gpu_id, &wanted]),
                ),
            }
        }
        for gpu_id in registry_raw.keys().filter(|id| !desired.contains_key(*id)) {
            self.out.vanished_gpus += 1;
            self.add(
                format!("registry lists {gpu_id} but its record is gone (expiry not healed yet?)"),
                Self::write("HDEL", &[&keys.gpu_registry(), gpu_id]),
            );
        }

        // Type and provider sets, provider GPU sets.
        let mut wanted_members: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        for provider in provider_members.keys() {
            wanted_members.entry(provider.clone()).or_default();
        }
        for (gpu_id, record) in &desired {
            wanted_members
                .entry(record.provider.clone())
                .or_default()
                .insert(gpu_id.clone());
        }
        let mut missing_types: BTreeSet<String> = BTreeSet::new();
        for (gpu_id, record) in &desired {
            if !types_set.contains(&record.gpu_type)
                && missing_types.insert(record.gpu_type.clone())
            {
                self.add(
                    format!(
                        "type {} of {gpu_id} is missing from the type set",
                        record.gpu_type
                    ),
                    Self::write("SADD", &[&keys.types(), &record.gpu_type]),
                );
            }
        }
        for provider in wanted_members.keys() {
            if !providers_set.contains(provider) {
                self.add(
                    format!("provider {provider} is missing from the provider set"),
                    Self::write("SADD", &[&keys.providers(), provider]),
                );
            }
        }
        for (provider, wanted) in &wanted_members {
            let stored = provider_members.get(provider).cloned().unwrap_or_default();
            let key = keys.provider_gpus(provider);
            for missing in wanted.difference(&stored) {
                self.add(
                    format!("{missing} is missing from the GPU set of provider {provider}"),
                    Self::write("SADD", &[&key, missing]),
                );
            }
            for extra in stored.difference(wanted) {
                self.out.stale_provider_members += 1;
                self.add(
                    format!("provider {provider}'s GPU set holds {extra}, which is not its GPU"),
                    Self::write("SREM", &[&key, extra]),
                );
            }
        }

        // Availability indexes against the listed records.
        let mut wanted_indexes: BTreeMap<String, [BTreeMap<String, f64>; 3]> = BTreeMap::new();
        for gpu_type in indexes.keys().chain(desired.values().map(|g| &g.gpu_type)) {
            wanted_indexes.entry(gpu_type.clone()).or_default();
        }
        for (gpu_id, record) in &desired {
            let status = statuses.get(&record.provider).copied().unwrap_or_default();
            if !is_listed(record.status, status) {
                continue;
            }
            let type_price = type_prices.get(&record.gpu_type).copied().flatten();
            let Some(sets) = wanted_indexes.get_mut(&record.gpu_type) else {
                continue;
            };
            match price_source(record.price_seq, type_price.as_ref()) {
                PriceSource::Own => sets[0].insert(gpu_id.clone(), record.own_price.as_score()),
                PriceSource::Type => sets[1].insert(gpu_id.clone(), 0.0),
            };
            sets[2].insert(gpu_id.clone(), record.score.unwrap_or(0.0));
        }
        for (gpu_type, wanted) in &wanted_indexes {
            let stored = indexes.get(gpu_type).cloned().unwrap_or_default();
            // GPUs a large PRICE left draining into avail-type count as being there.
            let draining = &stored[3];
            if (!stored[1].is_empty() || !draining.is_empty())
                && type_prices.get(gpu_type).copied().flatten().is_none()
            {
                self.out.repriced_types += 1;
            }
            for (slot, (name, key)) in [
                ("avail-own", keys.available_own(gpu_type)),
                ("avail-type", keys.available_typed(gpu_type)),
                ("avail-score", keys.available_by_score(gpu_type)),
            ]
            .into_iter()
            .enumerate()
            {
                let (Some(have), Some(want)) = (stored.get(slot), wanted.get(slot)) else {
                    continue;
                };
                let index = format!("{name}:{gpu_type}");
                for (gpu_id, score) in want {
                    match have.get(gpu_id) {
                        None if slot == 1 && draining.contains_key(gpu_id) => {}
                        Some(s) if (s - score).abs() <= 1e-9 => {}
                        Some(s) => self.add(
                            format!("{gpu_id} has score {s} in {index}, expected {score}"),
                            Self::write("ZADD", &[&key, &score.to_string(), gpu_id]),
                        ),
                        None => self.add(
                            format!("{gpu_id} should be in {index} but is not"),
                            Self::write("ZADD", &[&key, &score.to_string(), gpu_id]),
                        ),
                    }
                }
                for gpu_id in have.keys().filter(|id| !want.contains_key(*id)) {
                    self.add(
                        format!("{gpu_id} is in {index} but should not be"),
                        Self::write("ZREM", &[&key, gpu_id]),
                    );
                }
            }
            let key = keys.available_draining(gpu_type);
            let index = format!("avail-draining:{gpu_type}");
            for gpu_id in draining.keys() {
                if !wanted[1].contains_key(gpu_id) {
                    self.add(
                        format!("{gpu_id} is in {index} but should not be"),
                        Self::write("ZREM", &[&key, gpu_id]),
                    );
                } else if stored[1].contains_key(gpu_id) {
                    self.add(
                        format!("{gpu_id} is in both avail-type:{gpu_type} and {index}"),
                        Self::write("ZREM", &[&key, gpu_id]),
                    );
                }
            }
        }

        // The booking registry and the booking clock against the active bookings.
        for (booking_id, booking) in &active {
            match booking_registry.get(booking_id) {
                Some(gpu_id) if *gpu_id == booking.gpu_id => {}
                Some(gpu_id) => self.add(
                    format!(
                        "booking {booking_id} is for {} but the registry says {gpu_id}",
                        booking.gpu_id
                    ),
                    Self::write(
                        "HSET",
                        &[&keys.booking_registry(), booking_id, &booking.gpu_id],
                    ),
                ),
                None => self.add(
                    format!(
                        "booking {booking_id} of {} is missing from the booking registry",
                        booking.gpu_id
                    ),
                    Self::write(
                        "HSET",
                        &[&keys.booking_registry(), booking_id, &booking.gpu_id],
                    ),
                ),
            }
            let end = booking.end_ms as f64;
            match booking_ends.get(booking_id) {
                Some(score) if *score == end => {}
                _ => self.add(
                    format!("booking {booking_id} is not on the booking clock at its end"),
                    Self::write(
                        "ZADD",
                        &[
                            &keys.booking_ends(),
                            &booking.end_ms.to_string(),
                            booking_id,
                        ],
                    ),
                ),
            }
        }
        for booking_id in booking_registry.keys().filter(|b| !active.contains_key(*b)) {
            self.add(
                format!("booking registry lists {booking_id}, which is not an active booking"),
                Self::write("HDEL", &[&keys.booking_registry(), booking_id]),
            );
        }
        for booking_id in booking_ends.keys().filter(|b| !active.contains_key(*b)) {
            self.add(
                format!("the booking clock holds {booking_id}, which is not an active booking"),
                Self::write("ZREM", &[&keys.booking_ends(), booking_id]),
            );
        }
        for (booking_id, read) in &bookings {
            if matches!(read, Read::Present(_))
                && !active.contains_key(booking_id)
                && !closing.contains(booking_id)
            {
                self.add(
                    format!("record of booking {booking_id} holds nothing"),
                    Self::write("DEL", &[&keys.booking(booking_id)]),
                );
            }
        }

        // Counters against a recount.
        let mut status_counts: BTreeMap<GpuStatus, i64> = BTreeMap::new();
        let mut type_totals: BTreeMap<String, i64> = BTreeMap::new();
        let mut own_sums: BTreeMap<String, i64> = BTreeMap::new();
        for record in desired.values() {
            *status_counts.entry(record.status).or_default() += 1;
            *type_totals.entry(record.gpu_type.clone()).or_default() += 1;
        }
        for (gpu_type, wanted) in &wanted_indexes {
            let sum = wanted[0]
                .values()
                .filter_map(|score| Price::from_score(*score))
                .fold(0i64, |acc, p| acc.saturating_add(p.micros()));
            own_sums.insert(gpu_type.clone(), sum);
        }
        let mut counter_types: BTreeSet<String> = wanted_indexes.keys().cloned().collect();
        for field in counters.keys() {
            if let Some(t) = field
                .strip_prefix(stat::TYPE_TOTAL_PREFIX)
                .or_else(|| field.strip_prefix("own-sum:"))
            {
                counter_types.insert(t.to_owned());
            }
        }
        let mut expected: Vec<(String, i64, String)> = Vec::new();
        for status in GpuStatus::ALL {
            expected.push((
                stat::gpus_with_status(status),
                status_counts.get(&status).copied().unwrap_or(0),
                format!("{} GPU count", status.as_str()),
            ));
        }
        for gpu_type in &counter_types {
            expected.push((
                stat::own_price_sum(gpu_type),
                own_sums.get(gpu_type).copied().unwrap_or(0),
                format!("own-price sum of {gpu_type}"),
            ));
            expected.push((
                stat::type_total(gpu_type),
                type_totals.get(gpu_type).copied().unwrap_or(0),
                format!("GPU count of type {gpu_type}"),
            ));
        }
        for (field, recount, what) in expected {
            match counters.get(&field) {
                None if recount == 0 => {}
                None => self.add(
                    format!("{what} is missing, recount gives {recount}"),
                    Fix::Counter(field, recount),
                ),
                Some(text) => match int(text) {
                    Some(value) if value == recount => {}
                    Some(value) => self.add(
                        format!("{what} is {value}, recount gives {recount}"),
                        Fix::Counter(field, recount),
                    ),
                    None => self.add(
                        format!(
                            "counter {field} holds '{text}', not a number; recount gives {recount}"
                        ),
                        Fix::Counter(field, recount),
                    ),
                },
            }
        }
        // All-time booking counters cannot be recounted: a lost or garbled one restarts at the
        // least it can be.
        let active_count = i64::try_from(active.len()).unwrap_or(i64::MAX);
        let created = counters.get(stat::BOOKINGS_CREATED);
        match created.map(|t| int(t)) {
            Some(Some(n)) if n >= active_count => {}
            None if active_count == 0 => {}
            Some(Some(n)) => self.add(
                format!("bookings created is {n}, fewer than the {active_count} active: it restarts there"),
                Fix::Counter(stat::BOOKINGS_CREATED.to_owned(), active_count),
            ),
            _ => self.add(
                format!(
                    "counter {} is {}: it restarts at the {active_count} active bookings",
                    stat::BOOKINGS_CREATED,
                    created.map_or("missing".to_owned(), |t| format!("'{t}'"))
                ),
                Fix::Counter(stat::BOOKINGS_CREATED.to_owned(), active_count),
            ),
        }
        for field in [stat::BOOKINGS_CANCELLED, stat::BOOKINGS_ENDED] {
            if let Some(text) = counters.get(field) {
                if int(text).is_none() {
                    self.add(
                        format!("counter {field} holds '{text}', not a number: it restarts at 0"),
                        Fix::Counter(field.to_owned(), 0),
                    );
                }
            }
        }
        self.out.stored_cancelled = counters
            .get(stat::BOOKINGS_CANCELLED)
            .and_then(|t| int(t))
            .unwrap_or(0);

        // The sequence: above every version still visible.
        let stored_seq = counters
            .get(stat::SEQ)
            .map(|t| (t, crate::core::version(t.as_bytes())));
        self.out.stored_seq = stored_seq.as_ref().and_then(|(_, v)| *v);
        self.check_stream_ids(&keys.events(), &stream);
        let floor = self
            .out
            .stored_seq
            .unwrap_or(0)
            .max(stream.max_seq)
            .max(stream.max_version)
            .max(seen_version);
        self.out.seq_floor = floor;
        match stored_seq {
            Some((_, Some(seq))) if seq >= seen_version => {}
            Some((_, Some(seq))) => self.add(
                format!("seq is {seq}, below version {seen_version} still in use: it resumes at {floor}"),
                Fix::Counter(stat::SEQ.to_owned(), floor),
            ),
            Some((text, None)) => self.add(
                format!("seq holds '{text}', not a sequence gpucache issues: it resumes at {floor}, above every version still visible"),
                Fix::Counter(stat::SEQ.to_owned(), floor),
            ),
            None if floor > 0 => self.add(
                format!("seq is missing: it resumes at {floor}, above every version still visible"),
                Fix::Counter(stat::SEQ.to_owned(), floor),
            ),
            // Writes refuse a region with state but no counters hash: it must exist again, if
            // only with its sequence.
            None if counters.is_empty() && self.region.has_market_state() => self.add(
                "the market counters are gone: they are written anew".to_owned(),
                Fix::Counter(stat::SEQ.to_owned(), floor),
            ),
            None => {}
        }

        self.check_window(&window, &keys, &stream)?;
        Ok(())
    }

    /// One pass over the event stream: the highest sequence its entries recorded and the
    /// highest version their payloads name (neither may be issued again), and the bookings made
    /// in each 15-minute bucket (what the 24-hour window must count at least). O(stream length).
    fn read_stream(&mut self, keys: &crate::keys::RegionKeys) -> MarketResult<StreamFacts> {
        let events = keys.events();
        let mut facts = StreamFacts::default();
        if self.store.key_type(&events) != KeyType::Stream {
            return Ok(facts);
        }
        facts.trimmed = self.store.stream_lost_entries(&events)?;
        facts.last_generated = self
            .store
            .stream_last_id(&events)?
            .as_deref()
            .and_then(stream_id);
        let horizon = self.future_horizon();
        let mut from = "-".to_owned();
        loop {
            let entries = self.store.stream_range(&events, &from, 1000)?;
            let Some((last_id, _)) = entries.last() else {
                break;
            };
            from = format!("({last_id}");
            let done = entries.len() < 1000;
            for (id, fields) in entries {
                if stream_id(&id).is_some_and(|(ms, _)| ms > horizon) {
                    facts.future_ids.push(id);
                    continue;
                }
                facts.last_sound_id = Some(id.clone());
                if facts.first_ms.is_none() {
                    facts.first_ms = id.split('-').next().and_then(int);
                }
                let field = |name: &str| fields.iter().find(|(k, _)| k == name).map(|(_, v)| v);
                if let Some(seq) = field("seq").and_then(|v| crate::core::version(v.as_bytes())) {
                    facts.max_seq = facts.max_seq.max(seq);
                }
                let Some(payload) = field("payload") else {
                    continue;
                };
                let Ok(json) = serde_json::from_str::<serde_json::Value>(payload) else {
                    continue;
                };
                if let Some(version) = json
                    .get("version")
                    .and_then(serde_json::Value::as_i64)
                    .filter(|v| (0..crate::core::MAX_VERSION).contains(v))
                {
                    facts.max_version = facts.max_version.max(version);
                }
                let name = |field: &str| {
                    json.get(field)
                        .and_then(serde_json::Value::as_str)
                        .filter(|n| crate::core::input::id(field, n.as_bytes()).is_ok())
                        .map(str::to_owned)
                };
                facts.types.extend(name("gpu_type"));
                facts.providers.extend(name("provider_id"));
                let kind = field("type").map(String::as_str);
                if kind == Some(EventKind::ProviderStatusChanged.as_str()) {
                    let provider = json.get("provider_id").and_then(serde_json::Value::as_str);
                    let status = json
                        .get("new")
                        .and_then(|n| n.get("status"))
                        .and_then(serde_json::Value::as_str);
                    if let (Some(provider), Some(status)) = (provider, status) {
                        facts
                            .provider_status
                            .insert(provider.to_owned(), status.to_owned());
                    }
                    continue;
                }
                let is_booking = kind == Some(EventKind::BookingCreated.as_str());
                // A rebuilt booking was counted when it was made.
                if !is_booking || json.get("reason").is_some() {
                    continue;
                }
                let ts = json.get("ts_ms").and_then(serde_json::Value::as_i64);
                let end = json
                    .get("new")
                    .and_then(|n| n.get("end_ms"))
                    .and_then(serde_json::Value::as_i64);
                let price = json
                    .get("new")
                    .and_then(|n| n.get("price"))
                    .and_then(serde_json::Value::as_str)
                    .and_then(|p| Price::parse_stored(p.as_bytes()));
                let (Some(ts), Some(end), Some(price)) = (ts, end, price) else {
                    continue;
                };
                let duration_s = end.saturating_sub(ts) / 1000;
                let cost = Booking::new("", "", price, duration_s, ts).cost_micros();
                let entry = facts.bookings.entry(window::bucket_of(ts)).or_default();
                entry.0 = entry.0.saturating_add(1);
                entry.1 = entry.1.saturating_add(cost);
            }
            if done {
                break;
            }
        }
        Ok(facts)
    }

    /// Stream ids (ms) beyond this are from the future (`FUTURE_TOLERANCE_MS`).
    fn future_horizon(&self) -> u64 {
        u64::try_from(self.now_ms.saturating_add(FUTURE_TOLERANCE_MS)).unwrap_or(0)
    }

    /// An event stream whose last id lies far ahead of the clock (another client's `XADD` with
    /// an id of its choosing): its entries from the future are deleted and its last id set back
    /// to the newest entry left, so new events are appended again in time order.
    fn check_stream_ids(&mut self, events: &str, stream: &StreamFacts) {
        let horizon = self.future_horizon();
        let Some((last_ms, last_seq)) = stream.last_generated else {
            return;
        };
        if last_ms <= horizon {
            return;
        }
        if !stream.future_ids.is_empty() {
            let mut args = vec![events.as_bytes().to_vec()];
            args.extend(stream.future_ids.iter().map(|id| id.as_bytes().to_vec()));
            self.add(
                format!(
                    "the event stream holds {} entries with ids from the future (up to {last_ms}-{last_seq}): they are deleted",
                    stream.future_ids.len()
                ),
                Fix::Write(Command("XDEL"), args),
            );
        }
        let back_to = stream.last_sound_id.as_deref().unwrap_or("0-1");
        self.add(
            format!(
                "the event stream's last id {last_ms}-{last_seq} is ahead of the clock, so new events would be appended after it (or not at all): it is set back to {back_to}"
            ),
            Self::write("XSETID", &[events, back_to, "MAXDELETEDID", back_to]),
        );
    }

    /// The 24-hour window: garbled fields go, and buckets the event stream shows bookings for
    /// are brought up to what the stream records (as far back as it reaches; never lowered,
    /// since a stream may have lost entries to trimming).
    fn check_window(
        &mut self,
        stored: &BTreeMap<String, String>,
        keys: &crate::keys::RegionKeys,
        stream: &StreamFacts,
    ) -> MarketResult<()> {
        let key = keys.window_24h();
        let mut buckets: BTreeMap<i64, (i64, i64)> = BTreeMap::new();
        for (field, value) in stored {
            let bucket = window::bucket_of_field(field);
            // Counts and volumes only grow from 0: a negative one is another hand's.
            match (bucket, int(value).filter(|v| *v >= 0)) {
                (Some(bucket), Some(value)) if field.starts_with("count:") => {
                    buckets.entry(bucket).or_default().0 = value;
                }
                (Some(bucket), Some(value)) if field.starts_with("volume:") => {
                    buckets.entry(bucket).or_default().1 = value;
                }
                _ => self.add(
                    format!("24-hour window field '{field}' holds '{value}', which gpucache does not write: it is dropped"),
                    Self::write("HDEL", &[&key, field]),
                ),
            }
        }
        let Some(first_ms) = stream.first_ms else {
            return Ok(());
        };
        let start_ms = window::live_buckets(self.now_ms)
            .start()
            .saturating_mul(window::BUCKET_MS);
        // A stream that lost entries may begin after the window (older buckets cannot be
        // checked) or half-way into a bucket (that bucket neither).
        let covered_from = window::bucket_of(first_ms).saturating_add(1);
        for (bucket, (count, volume)) in stream.bookings.iter().map(|(b, v)| (*b, *v)) {
            if !window::is_live(bucket, self.now_ms) {
                continue;
            }
            if stream.trimmed && bucket < covered_from && first_ms > start_ms {
                continue;
            }
            let (have_count, have_volume) = buckets.get(&bucket).copied().unwrap_or_default();
            if have_count < count {
                self.add(
                    format!("24-hour window bucket {bucket} counts {have_count} bookings, the event stream records {count}"),
                    Self::write(
                        "HSET",
                        &[
                            &key,
                            &window::count_field(bucket),
                            &count.to_string(),
                            &window::volume_field(bucket),
                            &volume.max(have_volume).to_string(),
                        ],
                    ),
                );
            }
        }
        Ok(())
    }
}
