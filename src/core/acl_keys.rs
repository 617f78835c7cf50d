//! Whether an ACL user's key patterns (`ACL GETUSER`'s `keys` field, Redis 7.0+) let it read
//! every key: then `GPUCACHE.STATS` without a region can serve its running sum over all
//! regions instead of checking each region against the user.
//!
//! Only the root patterns are looked at; a user that reads everything through a selector
//! alone is checked region by region (the same answer, more slowly).

/// `~*` (or `allkeys`), or a read pattern on every key (`%R~*`, `%RW~*`).
pub fn read_every_key(keys_field: &str) -> bool {
    keys_field.split(' ').any(|pattern| {
        if pattern == "~*" || pattern == "allkeys" {
            return true;
        }
        pattern
            .strip_prefix('%')
            .and_then(|rest| rest.split_once('~'))
            .is_some_and(|(permissions, keys)| keys == "*" && permissions.contains('R'))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_patterns_covering_every_key_for_reading_count() {
        for everything in ["~*", "%R~*", "%RW~*", "~gpucache:{eu}:* ~*", "allkeys"] {
            assert!(read_every_key(everything), "{everything}");
        }
        for restricted in [
            "",
            "~gpucache:*",
            "%W~*",
            "~* x".trim_start_matches('~'),
            "%R~gpucache:{eu}:*",
            "~\\*",
        ] {
            assert!(!read_every_key(restricted), "{restricted}");
        }
    }
}
