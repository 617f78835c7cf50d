//! Where a walk over a big hash stands between two timer calls: the position of a `HSCAN`-style
//! cursor and the fields of its last batch not yet visited.
//!
//! A repair that visits every GPU of a region must not hold the main thread, so it visits a few
//! per timer call and keeps its place here. Redis's scan cursor is a plain number that stays
//! meaningful across calls: every field present from the walk's start to its end is handed out
//! at least once, whatever was added or removed meanwhile (a field may come twice, so each visit
//! re-reads what it looks at).

use std::collections::VecDeque;

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HashWalk {
    /// Cursor of the next batch to fetch (0 before the first and after the last).
    cursor: u64,
    /// A batch was fetched and the cursor came back as 0: no batch is left to fetch.
    scanned: bool,
    /// Fields of the fetched batches not yet handed out.
    pending: VecDeque<String>,
}

impl HashWalk {
    /// The cursor to fetch the next batch with, when the fields fetched so far are all handed
    /// out and more may follow.
    pub fn wanted_cursor(&self) -> Option<u64> {
        (self.pending.is_empty() && !self.scanned).then_some(self.cursor)
    }

    /// Takes a fetched batch and the cursor the scan answered with.
    pub fn take_batch(&mut self, next_cursor: u64, fields: impl IntoIterator<Item = String>) {
        self.cursor = next_cursor;
        self.scanned = next_cursor == 0;
        self.pending.extend(fields);
    }

    /// The next field to visit, if one was fetched and not yet handed out.
    pub fn next_field(&mut self) -> Option<String> {
        self.pending.pop_front()
    }

    /// Every field was fetched and handed out.
    pub fn is_done(&self) -> bool {
        self.scanned && self.pending.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| (*s).to_owned()).collect()
    }

    #[test]
    fn a_new_walk_asks_for_the_first_batch_with_cursor_zero() {
        let walk = HashWalk::default();
        assert_eq!(walk.wanted_cursor(), Some(0));
        assert!(!walk.is_done());
    }

    #[test]
    fn fields_are_handed_out_before_the_next_batch_is_asked_for() {
        let mut walk = HashWalk::default();
        walk.take_batch(17, names(&["a", "b"]));
        assert_eq!(walk.wanted_cursor(), None);
        assert_eq!(walk.next_field().as_deref(), Some("a"));
        assert_eq!(walk.next_field().as_deref(), Some("b"));
        assert_eq!(walk.next_field(), None);
        assert_eq!(walk.wanted_cursor(), Some(17));
        assert!(!walk.is_done());
    }

    #[test]
    fn a_cursor_back_at_zero_ends_the_walk_once_its_batch_is_visited() {
        let mut walk = HashWalk::default();
        walk.take_batch(5, names(&["a"]));
        assert_eq!(walk.next_field().as_deref(), Some("a"));
        walk.take_batch(0, names(&["b"]));
        assert!(!walk.is_done());
        assert_eq!(walk.wanted_cursor(), None);
        assert_eq!(walk.next_field().as_deref(), Some("b"));
        assert!(walk.is_done());
        assert_eq!(walk.wanted_cursor(), None);
    }

    #[test]
    fn an_empty_hash_is_done_after_one_empty_batch() {
        let mut walk = HashWalk::default();
        walk.take_batch(0, Vec::new());
        assert!(walk.is_done());
    }

    #[test]
    fn an_empty_batch_with_more_to_come_asks_again() {
        let mut walk = HashWalk::default();
        walk.take_batch(9, Vec::new());
        assert!(!walk.is_done());
        assert_eq!(walk.wanted_cursor(), Some(9));
    }
}
