//! The GPU record as stored in its hash, and how its effective price is resolved.

use super::booking::BookingTerms;
use super::price::Price;
use super::status::GpuStatus;
use bitflags::bitflags;

/// Hash field names of a GPU record (documented in the README's key table).
pub mod field {
    pub const PROVIDER: &str = "provider";
    pub const TYPE: &str = "type";
    pub const PRICE: &str = "price";
    pub const PRICE_SEQ: &str = "price_seq";
    pub const MEMORY_GB: &str = "memory_gb";
    pub const CORES: &str = "cores";
    pub const SCORE: &str = "score";
    pub const STATUS: &str = "status";
    pub const BOOKING: &str = "booking";
    pub const VERSION: &str = "version";
    pub const UPDATED_MS: &str = "updated_ms";
    /// The terms of the booking holding the GPU (present only while it is held).
    pub const BOOKING_USER: &str = "booking_user";
    pub const BOOKING_PRICE: &str = "booking_price";
    pub const BOOKING_DURATION_S: &str = "booking_duration_s";
    pub const BOOKING_START_MS: &str = "booking_start_ms";
    pub const BOOKING_END_MS: &str = "booking_end_ms";

    pub const BOOKING_TERMS: [&str; 5] = [
        BOOKING_USER,
        BOOKING_PRICE,
        BOOKING_DURATION_S,
        BOOKING_START_MS,
        BOOKING_END_MS,
    ];
}

#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct GpuRecord {
    pub provider: String,
    pub gpu_type: String,
    /// The GPU's own hourly price, set by `REGISTER`.
    pub own_price: Price,
    /// Region sequence number at which `own_price` was set; a type price set later wins.
    pub price_seq: i64,
    pub memory_gb: Option<i64>,
    pub cores: Option<i64>,
    pub score: Option<f64>,
    pub status: GpuStatus,
    /// The active booking holding this GPU, if any.
    pub booking: Option<String>,
    /// A copy of that booking's terms (absent on records written before copies were kept).
    pub booking_terms: Option<BookingTerms>,
    pub version: i64,
    pub updated_ms: i64,
}

/// A per-type hourly price set with `GPUCACHE.PRICE`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TypePrice {
    pub price: Price,
    /// Region sequence number at which it was set.
    pub seq: i64,
    pub version: i64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PriceSource {
    Own,
    Type,
}

impl PriceSource {
    pub fn as_str(self) -> &'static str {
        match self {
            PriceSource::Own => "own",
            PriceSource::Type => "type",
        }
    }
}

/// Which of the two prices a GPU shows: whichever was set last.
pub fn price_source(price_seq: i64, type_price: Option<&TypePrice>) -> PriceSource {
    match type_price {
        Some(tp) if tp.seq > price_seq => PriceSource::Type,
        _ => PriceSource::Own,
    }
}

pub fn effective_price(gpu: &GpuRecord, type_price: Option<&TypePrice>) -> (Price, PriceSource) {
    match (price_source(gpu.price_seq, type_price), type_price) {
        (PriceSource::Type, Some(tp)) => (tp.price, PriceSource::Type),
        _ => (gpu.own_price, PriceSource::Own),
    }
}

bitflags! {
    /// What a write changed on a GPU, deciding which events fire and which indexes move.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub struct GpuChange: u8 {
        const CREATED = 1;
        const STATUS = 1 << 1;
        const PRICE = 1 << 2;
        const PROVIDER = 1 << 3;
        const TYPE = 1 << 4;
        const ATTRIBUTES = 1 << 5;
        const BOOKING = 1 << 6;
    }
}

impl GpuChange {
    /// What differs between two versions of one GPU's record.
    pub fn between(old: &GpuRecord, new: &GpuRecord) -> GpuChange {
        let mut change = GpuChange::empty();
        change.set(GpuChange::STATUS, old.status != new.status);
        change.set(
            GpuChange::PRICE,
            old.own_price != new.own_price || old.price_seq != new.price_seq,
        );
        change.set(GpuChange::PROVIDER, old.provider != new.provider);
        change.set(GpuChange::TYPE, old.gpu_type != new.gpu_type);
        change.set(
            GpuChange::ATTRIBUTES,
            old.memory_gb != new.memory_gb || old.cores != new.cores || old.score != new.score,
        );
        change.set(GpuChange::BOOKING, old.booking != new.booking);
        change
    }

    /// Changes that move a listed GPU to another place in the availability index.
    pub fn moves_listing(self) -> bool {
        self.intersects(GpuChange::PRICE | GpuChange::TYPE)
    }

    /// Changes that alter the registry entry (see [`RegistryEntry`]).
    pub fn alters_registry(self) -> bool {
        self.intersects(
            GpuChange::CREATED
                | GpuChange::STATUS
                | GpuChange::TYPE
                | GpuChange::PROVIDER
                | GpuChange::BOOKING,
        )
    }
}

/// What the region's GPU registry keeps about each GPU, so its indexes and booking can be
/// cleaned up after the GPU's own record expired or was evicted:
/// `"<status> <type> <provider>"`, plus `" <booking>"` while it holds one. Ids contain no spaces.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegistryEntry {
    pub status: GpuStatus,
    pub gpu_type: String,
    pub provider: String,
    pub booking: Option<String>,
}

impl RegistryEntry {
    pub fn of(gpu: &GpuRecord) -> RegistryEntry {
        RegistryEntry {
            status: gpu.status,
            gpu_type: gpu.gpu_type.clone(),
            provider: gpu.provider.clone(),
            booking: gpu.booking.clone(),
        }
    }

    pub fn parse(text: &str) -> Option<RegistryEntry> {
        let mut parts = text.split(' ');
        let status = GpuStatus::parse(parts.next()?.as_bytes()).ok()?;
        // Names gpucache accepts only: they become parts of keys.
        let name = |part: Option<&str>| super::input::id("name", part?.as_bytes()).ok();
        let gpu_type = name(parts.next())?;
        let provider = name(parts.next())?;
        let booking = match parts.next() {
            Some(booking) => Some(name(Some(booking))?),
            None => None,
        };
        if parts.next().is_some() {
            return None;
        }
        Some(RegistryEntry {
            status,
            gpu_type,
            provider,
            booking,
        })
    }
}

impl std::fmt::Display for RegistryEntry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} {} {}",
            self.status.as_str(),
            self.gpu_type,
            self.provider
        )?;
        match &self.booking {
            Some(b) => write!(f, " {b}"),
            None => Ok(()),
        }
    }
}

impl GpuRecord {
    /// The record of a booked GPU whose own record was lost, rebuilt from its booking and the
    /// type and provider known elsewhere. What only the lost record knew — its own price and
    /// attributes — is not known: it shows the booking's hourly price as its own, set before any
    /// type price (sequence 0), until the GPU is registered again.
    pub fn rebuilt_for(
        gpu_type: &str,
        provider: &str,
        booking_id: &str,
        booking: &super::booking::Booking,
        version: i64,
        now_ms: i64,
    ) -> GpuRecord {
        GpuRecord {
            provider: provider.to_owned(),
            gpu_type: gpu_type.to_owned(),
            own_price: booking.price,
            price_seq: 0,
            memory_gb: None,
            cores: None,
            score: None,
            status: GpuStatus::Busy,
            booking: Some(booking_id.to_owned()),
            booking_terms: Some(booking.terms()),
            version,
            updated_ms: now_ms,
        }
    }

    /// Reads a record from its hash fields; `None` when a field this module always writes is
    /// missing or malformed (someone edited the hash by hand).
    pub fn from_fields<'a>(fields: impl IntoIterator<Item = (&'a [u8], &'a [u8])>) -> Option<Self> {
        let mut record = GpuFields::default();
        for (name, value) in fields {
            record.add(name, value);
        }
        record.build()
    }

    /// All fields to write with one `HSET`. `booking` is written as an empty string when there is
    /// none, so a single `HSET` fully replaces the previous value.
    pub fn to_fields(&self) -> Vec<(&'static str, String)> {
        let mut fields = vec![
            (field::PROVIDER, self.provider.clone()),
            (field::TYPE, self.gpu_type.clone()),
            (field::PRICE, self.own_price.to_string()),
            (field::PRICE_SEQ, self.price_seq.to_string()),
            (field::STATUS, self.status.as_str().to_owned()),
            (field::BOOKING, self.booking.clone().unwrap_or_default()),
            (field::VERSION, self.version.to_string()),
            (field::UPDATED_MS, self.updated_ms.to_string()),
        ];
        if let Some(m) = self.memory_gb {
            fields.push((field::MEMORY_GB, m.to_string()));
        }
        if let Some(c) = self.cores {
            fields.push((field::CORES, c.to_string()));
        }
        if let Some(s) = self.score {
            fields.push((field::SCORE, s.to_string()));
        }
        if let Some(terms) = &self.booking_terms {
            fields.extend(terms_fields(terms));
        }
        fields
    }

    /// The fields of `to_fields` whose stored text differs from `before`'s (all of them without
    /// a previous record), compared value by value so unchanged fields cost no allocation.
    /// Equal values have equal texts (a score compares by its bits, as its text does).
    pub fn changed_fields(&self, before: Option<&GpuRecord>) -> Vec<(&'static str, String)> {
        let Some(old) = before else {
            return self.to_fields();
        };
        let mut fields = Vec::new();
        if self.provider != old.provider {
            fields.push((field::PROVIDER, self.provider.clone()));
        }
        if self.gpu_type != old.gpu_type {
            fields.push((field::TYPE, self.gpu_type.clone()));
        }
        if self.own_price != old.own_price {
            fields.push((field::PRICE, self.own_price.to_string()));
        }
        if self.price_seq != old.price_seq {
            fields.push((field::PRICE_SEQ, self.price_seq.to_string()));
        }
        if self.status != old.status {
            fields.push((field::STATUS, self.status.as_str().to_owned()));
        }
        let booking = self.booking.as_deref().unwrap_or_default();
        if booking != old.booking.as_deref().unwrap_or_default() {
            fields.push((field::BOOKING, booking.to_owned()));
        }
        if self.version != old.version {
            fields.push((field::VERSION, self.version.to_string()));
        }
        if self.updated_ms != old.updated_ms {
            fields.push((field::UPDATED_MS, self.updated_ms.to_string()));
        }
        if let Some(m) = self.memory_gb.filter(|m| old.memory_gb != Some(*m)) {
            fields.push((field::MEMORY_GB, m.to_string()));
        }
        if let Some(c) = self.cores.filter(|c| old.cores != Some(*c)) {
            fields.push((field::CORES, c.to_string()));
        }
        if let Some(s) = self
            .score
            .filter(|s| old.score.map(f64::to_bits) != Some(s.to_bits()))
        {
            fields.push((field::SCORE, s.to_string()));
        }
        if let Some(terms) = self
            .booking_terms
            .as_ref()
            .filter(|t| old.booking_terms.as_ref() != Some(*t))
        {
            fields.extend(terms_fields(terms));
        }
        fields
    }

    /// Optional fields that the new record no longer has, to be removed with `HDEL`.
    pub fn dropped_fields(&self, newer: &GpuRecord) -> Vec<&'static str> {
        let mut dropped = Vec::new();
        if self.memory_gb.is_some() && newer.memory_gb.is_none() {
            dropped.push(field::MEMORY_GB);
        }
        if self.cores.is_some() && newer.cores.is_none() {
            dropped.push(field::CORES);
        }
        if self.score.is_some() && newer.score.is_none() {
            dropped.push(field::SCORE);
        }
        if self.booking_terms.is_some() && newer.booking_terms.is_none() {
            dropped.extend(field::BOOKING_TERMS);
        }
        dropped
    }
}

fn terms_fields(terms: &BookingTerms) -> [(&'static str, String); 5] {
    [
        (field::BOOKING_USER, terms.user_id.clone()),
        (field::BOOKING_PRICE, terms.price.to_string()),
        (field::BOOKING_DURATION_S, terms.duration_s.to_string()),
        (field::BOOKING_START_MS, terms.start_ms.to_string()),
        (field::BOOKING_END_MS, terms.end_ms.to_string()),
    ]
}

/// A GPU record read field by field (in any order, e.g. straight from a hash scan); `build`
/// gives what `GpuRecord::from_fields` gives for the same fields.
#[derive(Debug, Default)]
pub struct GpuFields {
    provider: Option<String>,
    gpu_type: Option<String>,
    own_price: Option<Price>,
    price_seq: i64,
    memory_gb: Option<i64>,
    cores: Option<i64>,
    score: Option<f64>,
    status: Option<GpuStatus>,
    booking: Option<String>,
    booking_user: Option<String>,
    booking_price: Option<Price>,
    booking_duration_s: Option<i64>,
    booking_start_ms: Option<i64>,
    booking_end_ms: Option<i64>,
    version: i64,
    updated_ms: i64,
    /// A field that must be an integer is not one: the record is corrupt.
    malformed: bool,
    /// At least one field of a GPU record was seen.
    any: bool,
}

impl GpuFields {
    /// Takes one hash field; fields that are not part of a GPU record are ignored.
    pub fn add(&mut self, name: &[u8], value: &[u8]) {
        let text = |v: &[u8]| std::str::from_utf8(v).ok().map(str::to_owned);
        let valid = |v: &[u8]| super::input::id("name", v).ok();
        let int = |v: &[u8]| {
            std::str::from_utf8(v)
                .ok()
                .and_then(|s| s.parse::<i64>().ok())
        };
        let mut required_int = |target: &mut i64, v: &[u8]| match int(v) {
            Some(i) => *target = i,
            None => self.malformed = true,
        };
        match std::str::from_utf8(name).unwrap_or_default() {
            // Names become parts of keys and registry entries: only names gpucache accepts
            // (a record naming another is not gpucache's, and reads as garbled).
            field::PROVIDER => self.provider = valid(value),
            field::TYPE => self.gpu_type = valid(value),
            field::PRICE => self.own_price = Price::parse_stored(value),
            field::PRICE_SEQ => match super::version(value) {
                Some(seq) => self.price_seq = seq,
                None => self.malformed = true,
            },
            field::MEMORY_GB => self.memory_gb = int(value),
            field::CORES => self.cores = int(value),
            field::SCORE => {
                self.score = std::str::from_utf8(value)
                    .ok()
                    .and_then(|s| s.parse::<f64>().ok())
                    .filter(|v| v.is_finite())
            }
            field::STATUS => self.status = GpuStatus::parse(value).ok(),
            field::BOOKING => {
                self.booking = text(value).filter(|b| !b.is_empty());
                if self.booking.is_some() && valid(value).is_none() {
                    self.malformed = true;
                }
            }
            field::VERSION => match super::version(value) {
                Some(version) => self.version = version,
                None => self.malformed = true,
            },
            field::UPDATED_MS => required_int(&mut self.updated_ms, value),
            field::BOOKING_USER => self.booking_user = valid(value),
            field::BOOKING_PRICE => self.booking_price = Price::parse_stored(value),
            field::BOOKING_DURATION_S => self.booking_duration_s = int(value),
            field::BOOKING_START_MS => self.booking_start_ms = int(value),
            field::BOOKING_END_MS => self.booking_end_ms = int(value),
            _ => return,
        }
        self.any = true;
    }

    /// Whether any field of a GPU record was seen (a hash without one holds no GPU).
    pub fn any(&self) -> bool {
        self.any
    }

    pub fn build(self) -> Option<GpuRecord> {
        if self.malformed {
            return None;
        }
        // A copy of the booking's terms counts only whole and only beside the booking it copies.
        let booking_terms = match (
            &self.booking,
            self.booking_user,
            self.booking_price,
            self.booking_duration_s,
            self.booking_start_ms,
            self.booking_end_ms,
        ) {
            (
                Some(_),
                Some(user_id),
                Some(price),
                Some(duration_s),
                Some(start_ms),
                Some(end_ms),
            ) => Some(BookingTerms {
                user_id,
                price,
                duration_s,
                start_ms,
                end_ms,
            }),
            _ => None,
        };
        Some(GpuRecord {
            provider: self.provider?,
            gpu_type: self.gpu_type?,
            own_price: self.own_price?,
            price_seq: self.price_seq,
            memory_gb: self.memory_gb,
            cores: self.cores,
            score: self.score,
            status: self.status?,
            booking: self.booking,
            booking_terms,
            version: self.version,
            updated_ms: self.updated_ms,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> GpuRecord {
        GpuRecord {
            provider: "p1".into(),
            gpu_type: "A100".into(),
            own_price: Price::from_micros(2_500_000),
            price_seq: 3,
            memory_gb: Some(80),
            cores: None,
            score: Some(9.5),
            status: GpuStatus::Available,
            booking: None,
            booking_terms: None,
            version: 7,
            updated_ms: 1_700_000_000_000,
        }
    }

    fn terms() -> BookingTerms {
        BookingTerms {
            user_id: "alice".into(),
            price: Price::from_micros(2_000_000),
            duration_s: 60,
            start_ms: 1_700_000_000_000,
            end_ms: 1_700_000_060_000,
        }
    }

    #[test]
    fn fields_round_trip() {
        let mut booked = sample();
        booked.status = GpuStatus::Busy;
        booked.booking = Some("b-1".into());
        booked.booking_terms = Some(terms());
        for gpu in [sample(), booked] {
            let fields: Vec<(String, String)> = gpu
                .to_fields()
                .into_iter()
                .map(|(k, v)| (k.to_owned(), v))
                .collect();
            let back =
                GpuRecord::from_fields(fields.iter().map(|(k, v)| (k.as_bytes(), v.as_bytes())));
            assert_eq!(back, Some(gpu));
        }
    }

    #[test]
    fn booking_terms_count_only_whole_and_with_their_booking() {
        let mut booked = sample();
        booked.booking = Some("b-1".into());
        booked.booking_terms = Some(terms());
        let mut fields: Vec<(String, String)> = booked
            .to_fields()
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v))
            .collect();
        fields.retain(|(k, _)| k != field::BOOKING_END_MS);
        let back = GpuRecord::from_fields(fields.iter().map(|(k, v)| (k.as_bytes(), v.as_bytes())));
        assert_eq!(back.map(|g| g.booking_terms), Some(None));
    }

    #[test]
    fn releasing_a_booking_drops_its_terms() {
        let mut booked = sample();
        booked.booking = Some("b-1".into());
        booked.booking_terms = Some(terms());
        let mut released = booked.clone();
        released.booking = None;
        released.booking_terms = None;
        assert_eq!(
            booked.dropped_fields(&released),
            field::BOOKING_TERMS.to_vec()
        );
        let changed = booked.changed_fields(Some(&sample()));
        assert_eq!(
            changed
                .iter()
                .filter(|(f, _)| f.starts_with("booking_"))
                .count(),
            5
        );
    }

    #[test]
    fn a_hand_edited_record_is_rejected_not_trusted() {
        let fields = [
            (&b"provider"[..], &b"p"[..]),
            (b"type", b"t"),
            (b"status", b"busy"),
        ];
        assert_eq!(GpuRecord::from_fields(fields), None, "price missing");
        let fields = [
            (&b"provider"[..], &b"p"[..]),
            (b"type", b"t"),
            (b"status", b"busy"),
            (b"price", b"cheap"),
        ];
        assert_eq!(GpuRecord::from_fields(fields), None);
    }

    #[test]
    fn the_price_set_last_wins() {
        let gpu = sample();
        let older_type = TypePrice {
            price: Price::from_micros(1),
            seq: 2,
            version: 1,
        };
        let newer_type = TypePrice {
            price: Price::from_micros(1),
            seq: 4,
            version: 1,
        };
        assert_eq!(
            effective_price(&gpu, None),
            (gpu.own_price, PriceSource::Own)
        );
        assert_eq!(
            effective_price(&gpu, Some(&older_type)),
            (gpu.own_price, PriceSource::Own)
        );
        assert_eq!(
            effective_price(&gpu, Some(&newer_type)),
            (Price::from_micros(1), PriceSource::Type)
        );
    }

    #[test]
    fn changes_are_classified() {
        let old = sample();
        let mut new = sample();
        assert!(GpuChange::between(&old, &new).is_empty());
        new.memory_gb = Some(40);
        let change = GpuChange::between(&old, &new);
        assert_eq!(change, GpuChange::ATTRIBUTES);
        assert!(!change.moves_listing() && !change.alters_registry());
        new.price_seq += 1;
        assert!(
            GpuChange::between(&old, &new).moves_listing(),
            "a newer own price re-lists"
        );
        new.status = GpuStatus::Busy;
        new.booking = Some("b".into());
        let change = GpuChange::between(&old, &new);
        assert!(change.contains(GpuChange::STATUS | GpuChange::BOOKING));
        assert!(change.alters_registry());
    }

    #[test]
    fn registry_entries_round_trip() {
        let mut gpu = sample();
        let entry = RegistryEntry::of(&gpu);
        assert_eq!(entry.to_string(), "available A100 p1");
        assert_eq!(RegistryEntry::parse(&entry.to_string()), Some(entry));
        gpu.status = GpuStatus::Busy;
        gpu.booking = Some("b-1".into());
        let entry = RegistryEntry::of(&gpu);
        assert_eq!(entry.to_string(), "busy A100 p1 b-1");
        assert_eq!(RegistryEntry::parse(&entry.to_string()), Some(entry));
        for bad in [
            "",
            "busy",
            "busy A100",
            "asleep A100 p1",
            "busy A100 p1 b extra",
            "busy  p1",
        ] {
            assert_eq!(RegistryEntry::parse(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn changed_fields_are_the_fields_whose_text_changed() {
        let old = sample();
        let by_text = |new: &GpuRecord| {
            let before = old.to_fields();
            let mut fields = new.to_fields();
            fields.retain(|f| !before.contains(f));
            fields
        };
        let mut new = sample();
        assert!(new.changed_fields(Some(&old)).is_empty());
        new.status = GpuStatus::Busy;
        new.booking = Some("b-1".into());
        new.version += 1;
        new.updated_ms += 5;
        assert_eq!(new.changed_fields(Some(&old)), by_text(&new));
        new.score = Some(-0.0);
        new.cores = Some(3);
        new.memory_gb = None;
        new.own_price = Price::from_micros(1);
        new.provider = "p2".into();
        assert_eq!(new.changed_fields(Some(&old)), by_text(&new));
        assert_eq!(new.changed_fields(None), new.to_fields());
    }

    #[test]
    fn dropped_attributes_are_listed() {
        let old = sample();
        let mut newer = sample();
        newer.memory_gb = None;
        assert_eq!(old.dropped_fields(&newer), vec![field::MEMORY_GB]);
    }
}
