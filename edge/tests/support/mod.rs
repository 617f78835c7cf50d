//! Helpers shared by the edge's integration tests that need the edge crate itself (the
//! harness in `tests/common` is also compiled into the module's tests, which do not have it).
#![allow(dead_code)]

use gpucache_edge::listener::EntryId;
use gpucache_edge::{keyspace, Edge};
use redis::ConnectionLike;

/// The id of `region`'s newest event on the server (or cluster) behind `con`.
pub fn last_event_id(con: &mut impl ConnectionLike, region: &str) -> EntryId {
    let last: Vec<(String, Vec<(String, String)>)> = redis::cmd("XREVRANGE")
        .arg(keyspace::events_key(region))
        .arg("+")
        .arg("-")
        .arg("COUNT")
        .arg(1)
        .query(con)
        .unwrap();
    EntryId::parse(&last[0].0).unwrap()
}

/// The last event id of `region` the edge has applied.
pub fn heard(edge: &Edge, region: &str) -> Option<EntryId> {
    edge.stats()
        .last_event_ids
        .get(region)
        .and_then(|id| EntryId::parse(id))
}
