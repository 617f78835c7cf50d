//! Which cluster slots a node holds whole, from its own line of `CLUSTER NODES`, and the slot
//! of a region: what `GPUCACHE.STATS` without a region needs to count a region that is moving
//! between nodes on neither, without a probe per region.

/// The slot of every key of a region (`gpucache:{<region>}:...`): CRC16 (XMODEM) of the hash
/// tag, modulo 16384, as Redis Cluster computes it.
pub fn region_slot(region: &str) -> u16 {
    let mut crc: u16 = 0;
    for byte in region.bytes() {
        crc ^= u16::from(byte) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
        }
    }
    crc & 0x3fff
}

/// The slots a node serves, less those it is moving out or in.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WholeSlots {
    served: Vec<(u16, u16)>,
    moving: Vec<u16>,
}

impl WholeSlots {
    /// From `CLUSTER NODES`: the line flagged `myself` (`<id> <addr> <flags> <master> <ping>
    /// <pong> <epoch> <link> <slot>...`, slots as `N`, `N-M`, `[N->-id]` (migrating) or
    /// `[N-<-id]` (importing)). `None` without such a line.
    pub fn of_myself(nodes: &str) -> Option<WholeSlots> {
        let line = nodes.lines().find(|line| {
            line.split(' ')
                .nth(2)
                .is_some_and(|flags| flags.split(',').any(|f| f == "myself"))
        })?;
        let mut slots = WholeSlots::default();
        for item in line.split(' ').skip(8).filter(|s| !s.is_empty()) {
            if let Some(moving) = item.strip_prefix('[') {
                let number = moving.split('-').next().and_then(|n| n.parse().ok());
                if let Some(slot) = number {
                    slots.moving.push(slot);
                }
                continue;
            }
            let (first, last) = item.split_once('-').unwrap_or((item, item));
            if let (Ok(first), Ok(last)) = (first.parse(), last.parse()) {
                slots.served.push((first, last));
            }
        }
        Some(slots)
    }

    pub fn holds_whole(&self, slot: u16) -> bool {
        !self.moving.contains(&slot)
            && self
                .served
                .iter()
                .any(|(first, last)| (*first..=*last).contains(&slot))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_those_redis_cluster_computes() {
        // `CLUSTER KEYSLOT foo` and `CLUSTER KEYSLOT 123456789` on Redis.
        assert_eq!(region_slot("foo"), 12182);
        assert_eq!(region_slot("123456789"), 0x31c3);
        assert_eq!(region_slot(""), 0);
    }

    const NODES: &str = "\
07c3 127.0.0.1:30004@40004 master - 0 1 2 connected 5461-10922 [10923-<-e7d1]\n\
e7d1 127.0.0.1:30001@40001 myself,master - 0 0 1 connected 0-10 12 4000-5460 [10923->-07c3] [5-<-07c3]\n\
6ec2 127.0.0.1:30005@40005 slave e7d1 0 1 1 connected\n";

    #[test]
    fn a_node_holds_whole_what_it_serves_and_does_not_move() {
        let mine = WholeSlots::of_myself(NODES).unwrap();
        assert!(mine.holds_whole(0));
        assert!(mine.holds_whole(10));
        assert!(!mine.holds_whole(11));
        assert!(mine.holds_whole(12));
        assert!(mine.holds_whole(5460));
        assert!(!mine.holds_whole(5461), "another node's");
        assert!(!mine.holds_whole(10923), "migrating away");
        assert!(!mine.holds_whole(5), "importing");
    }

    #[test]
    fn no_myself_line_no_answer() {
        assert_eq!(
            WholeSlots::of_myself("a b master - 0 0 1 connected 0-16383"),
            None
        );
        assert_eq!(WholeSlots::of_myself(""), None);
    }
}
