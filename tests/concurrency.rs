//! Many clients racing for one GPU: exactly one booking wins.

mod common;

use common::*;
use std::sync::{Arc, Barrier};

#[test]
fn exactly_one_of_many_concurrent_bookings_wins() {
    let server = Server::start(&[], &[]);
    let mut con = server.connect();
    seed(&mut con);
    const CLIENTS: usize = 32;
    for round in 0..5 {
        let barrier = Arc::new(Barrier::new(CLIENTS));
        let handles: Vec<_> = (0..CLIENTS)
            .map(|i| {
                let mut con = server.connect();
                let barrier = Arc::clone(&barrier);
                std::thread::spawn(move || {
                    barrier.wait();
                    let booking = format!("r{round}-b{i}");
                    let user = format!("user{i}");
                    run(
                        &mut con,
                        &["GPUCACHE.BOOK", "eu", "g1", &booking, &user, "600"],
                    )
                    .map(|_| booking)
                    .map_err(|e| e.code().unwrap_or("").to_owned())
                })
            })
            .collect();
        let results: Vec<_> = handles.into_iter().map(|h| h.join().unwrap()).collect();
        let winners: Vec<&String> = results.iter().filter_map(|r| r.as_ref().ok()).collect();
        assert_eq!(winners.len(), 1, "round {round}: {results:?}");
        assert!(results
            .iter()
            .filter_map(|r| r.as_ref().err())
            .all(|code| code == "GPUBUSY"));

        let gpu = fields(&mut con, &["GPUCACHE.GET", "eu", "g1"]);
        assert_eq!(&gpu["booking_id"], winners[0]);
        let stats = fields(&mut con, &["GPUCACHE.STATS", "eu"]);
        assert_eq!(stats["bookings_active"], "1");
        let bookings: Vec<String> = redis::cmd("KEYS")
            .arg("gpucache:{eu}:booking:*")
            .query(&mut con)
            .unwrap();
        assert_eq!(bookings.len(), 1);
        run(&mut con, &["GPUCACHE.CANCEL", "eu", winners[0]]).unwrap();
    }
    let stats = fields(&mut con, &["GPUCACHE.STATS", "eu"]);
    assert_eq!(stats["bookings_created"], "5");
    assert_eq!(stats["bookings_cancelled"], "5");
    assert_consistent(&mut con, "eu");
}
