//! Invalidation tags and their epochs.
//!
//! Every L1 entry depends on a few tags (its GPU, the GPU's type price and provider, the
//! region's market figures, the whole region). An invalidation bumps the epoch of each tag it
//! names; an entry remembers the epochs it was loaded under and is served only while they are
//! unchanged. This makes dropping "every search result of a region" O(1), and closes the
//! fill/invalidate race: a load that began before an invalidation carries the old epoch, so its
//! result is never served even if it lands in the cache after the invalidation.
//!
//! Epochs live in a fixed array of counters indexed by the tag's hash: memory stays bounded
//! however many keys are seen, and two tags sharing a slot only cost an extra miss.

use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};

/// A tag, reduced to a stable 64-bit hash of its kind and names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Tag(u64);

impl Tag {
    fn of(kind: u8, region: &str, id: &str) -> Tag {
        // DefaultHasher::new() uses fixed keys: the same tag hashes alike in every thread.
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        kind.hash(&mut hasher);
        region.hash(&mut hasher);
        id.hash(&mut hasher);
        Tag(hasher.finish())
    }

    /// Everything cached for a region (the fallback when events may have been lost).
    pub fn region(region: &str) -> Tag {
        Tag::of(0, region, "")
    }
    /// One GPU record.
    pub fn gpu(region: &str, gpu_id: &str) -> Tag {
        Tag::of(1, region, gpu_id)
    }
    /// A type's price and demand multiplier: the shown price of every GPU of the type.
    pub fn type_price(region: &str, gpu_type: &str) -> Tag {
        Tag::of(2, region, gpu_type)
    }
    /// A provider's status, shown in each of its GPU records.
    pub fn provider(region: &str, provider_id: &str) -> Tag {
        Tag::of(3, region, provider_id)
    }
    /// Any type price or provider of the region: guards a GPU load whose type and provider are
    /// known only once it has finished.
    pub fn gpu_inputs(region: &str) -> Tag {
        Tag::of(4, region, "")
    }
    /// Availability indexes and counters: search results and statistics.
    pub fn market(region: &str) -> Tag {
        Tag::of(5, region, "")
    }
    /// One type's ask ladder.
    pub fn order_book(region: &str, gpu_type: &str) -> Tag {
        Tag::of(6, region, gpu_type)
    }
    /// A booking, shown in the record of the GPU it holds.
    pub fn booking(region: &str, booking_id: &str) -> Tag {
        Tag::of(7, region, booking_id)
    }
}

/// The epoch of one tag as an entry recorded it: its slot in the low 16 bits, the slot's
/// epoch above them (48 bits: a slot would need 2^48 bumps to come back to a value an entry
/// holds), so an entry's stamps fit in a few words it can be copied with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Stamp(u64);

const SLOT_BITS: u32 = 16;
const SLOTS: usize = 1 << SLOT_BITS;

impl Stamp {
    fn new(slot: usize, epoch: u64) -> Stamp {
        Stamp((epoch << SLOT_BITS) | (slot & (SLOTS - 1)) as u64)
    }

    fn slot(self) -> usize {
        (self.0 as usize) & (SLOTS - 1)
    }

    fn matches(self, epoch: u64) -> bool {
        (self.0 >> SLOT_BITS) == (epoch << SLOT_BITS) >> SLOT_BITS
    }
}

/// The stamps an entry depends on, kept inline (a GPU record depends on five tags at most).
#[derive(Debug, Clone, Copy, Default)]
pub struct Stamps {
    len: u8,
    items: [Stamp; Stamps::CAPACITY],
}

impl Stamps {
    pub const CAPACITY: usize = 6;

    /// `None` when there are more than [`Stamps::CAPACITY`].
    pub fn collect(stamps: impl IntoIterator<Item = Stamp>) -> Option<Stamps> {
        let mut all = Stamps::default();
        for stamp in stamps {
            *all.items.get_mut(usize::from(all.len))? = stamp;
            all.len += 1;
        }
        Some(all)
    }

    pub fn as_slice(&self) -> &[Stamp] {
        self.items.get(..usize::from(self.len)).unwrap_or(&[])
    }
}

/// Striped epoch counters.
pub struct Epochs {
    slots: Box<[AtomicU64]>,
}

impl Default for Epochs {
    fn default() -> Self {
        Epochs {
            slots: (0..SLOTS).map(|_| AtomicU64::new(0)).collect(),
        }
    }
}

impl Epochs {
    fn slot(tag: Tag) -> usize {
        // SLOTS is a power of two; the low bits of a SipHash are uniform.
        (tag.0 as usize) & (SLOTS - 1)
    }

    fn epoch(&self, slot: usize) -> u64 {
        self.slots
            .get(slot)
            .map_or(0, |epoch| epoch.load(Ordering::Acquire))
    }

    /// The current epoch of `tag`, to be checked later with [`Epochs::unchanged`].
    pub fn stamp(&self, tag: Tag) -> Stamp {
        let slot = Epochs::slot(tag);
        Stamp::new(slot, self.epoch(slot))
    }

    /// Invalidates everything stamped with `tag` so far.
    pub fn bump(&self, tag: Tag) {
        if let Some(epoch) = self.slots.get(Epochs::slot(tag)) {
            epoch.fetch_add(1, Ordering::AcqRel);
        }
    }

    pub fn unchanged(&self, stamp: &Stamp) -> bool {
        stamp.matches(self.epoch(stamp.slot()))
    }

    pub fn all_unchanged(&self, stamps: &[Stamp]) -> bool {
        stamps.iter().all(|s| self.unchanged(s))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bump_invalidates_earlier_stamps_only() {
        let epochs = Epochs::default();
        let before = epochs.stamp(Tag::gpu("eu", "g1"));
        let other = epochs.stamp(Tag::gpu("eu", "g2"));
        epochs.bump(Tag::gpu("eu", "g1"));
        assert!(!epochs.unchanged(&before));
        assert!(epochs.unchanged(&other), "g2 shares no slot with g1 here");
        let after = epochs.stamp(Tag::gpu("eu", "g1"));
        assert!(epochs.unchanged(&after));
        assert!(!epochs.all_unchanged(&[after, before]));
    }

    #[test]
    fn stamps_hold_up_to_their_capacity_and_refuse_more() {
        let epochs = Epochs::default();
        let tags = |n: usize| (0..n).map(|i| epochs.stamp(Tag::gpu("eu", &format!("g{i}"))));
        let full = Stamps::collect(tags(Stamps::CAPACITY));
        assert_eq!(full.map(|s| s.as_slice().len()), Some(Stamps::CAPACITY));
        assert!(Stamps::collect(tags(Stamps::CAPACITY + 1)).is_none());
    }

    #[test]
    fn an_epoch_is_compared_on_its_low_48_bits() {
        let stamp = Stamp::new(3, 5);
        assert_eq!(stamp.slot(), 3);
        assert!(stamp.matches(5) && stamp.matches(5 + (1 << 48)));
        assert!(!stamp.matches(6));
    }

    #[test]
    fn tags_differ_by_kind_region_and_id() {
        assert_ne!(Tag::gpu("eu", "x"), Tag::type_price("eu", "x"));
        assert_ne!(Tag::gpu("eu", "x"), Tag::gpu("us", "x"));
        assert_eq!(Tag::market("eu"), Tag::market("eu"));
    }
}
