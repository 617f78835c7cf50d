//! gpucache in a Redis Cluster: a replica answers `GPUCACHE.STATS` without a region (which has
//! no key, so a cluster client may send it to any node) with its master's figures.

mod common;

use common::cluster::{
    asking, begin_slot_move, end_slot_move, key_slot, keys_in_slot, migrate, Cluster,
};
use common::*;
use redis::Value;
use std::time::Duration;

/// A reply with every map turned into sorted (field, value) pairs, so two replies compare
/// equal whatever order their maps came in.
fn canonical(value: &Value) -> String {
    match value {
        Value::Array(items) if items.len() % 2 == 0 && !items.is_empty() => {
            let mut pairs: Vec<(String, String)> = items
                .chunks(2)
                .map(|p| (text(&p[0]), canonical(&p[1])))
                .collect();
            pairs.sort();
            format!("{pairs:?}")
        }
        other => text(other),
    }
}

#[test]
fn stats_without_a_region_on_a_replica_equals_its_masters() {
    let cluster = Cluster::start(1, 1, &[]);
    let mut master = cluster.masters[0].connect();
    seed(&mut master);
    register(&mut master, "us", "u1", "p9", "A100", "3");
    register(&mut master, "us", "u2", "p9", "L4", "0.5");
    run(
        &mut master,
        &["GPUCACHE.BOOK", "eu", "g1", "b1", "alice", "600"],
    )
    .unwrap();
    run(&mut master, &["GPUCACHE.PRICE", "us", "L4", "0.75"]).unwrap();
    run(&mut master, &["GPUCACHE.STATUS", "eu", "g4", "maintenance"]).unwrap();
    cluster.wait_replicated(0);

    let all_on_master = run(&mut master, &["GPUCACHE.STATS"]).unwrap();
    let figures = as_map(&all_on_master);
    assert_eq!(text(&figures["regions"]), "2");
    assert_eq!(text(&figures["gpus_listed"]), "4", "g2, g3, u1, u2");
    assert_eq!(as_map(&figures["types"]).len(), 3);

    // No READONLY: a key-less command runs on the replica itself.
    let replica = &cluster.replicas[0][0];
    let mut on_replica_con = replica.connect();
    eventually(
        "the replica's STATS equal the master's",
        Duration::from_secs(10),
        || {
            let on_replica = run(&mut on_replica_con, &["GPUCACHE.STATS"]).unwrap();
            canonical(&on_replica) == canonical(&all_on_master)
        },
    );

    // A region's STATS on the replica (after READONLY, without which the cluster redirects a
    // keyed command to the master) equal the master's too.
    redis::cmd("READONLY")
        .query::<()>(&mut on_replica_con)
        .unwrap();
    for region in ["eu", "us"] {
        let on_master = run(&mut master, &["GPUCACHE.STATS", region]).unwrap();
        let on_replica = run(&mut on_replica_con, &["GPUCACHE.STATS", region]).unwrap();
        assert_eq!(canonical(&on_replica), canonical(&on_master), "{region}");
    }
    // The replica's own no-argument STATS is unchanged by READONLY.
    let on_replica = run(&mut on_replica_con, &["GPUCACHE.STATS"]).unwrap();
    assert_eq!(canonical(&on_replica), canonical(&all_on_master));
}

/// Records that expired while the node was down, and a booking that ended meanwhile, are
/// repaired by the node itself once it is back — although for its first ~2 s the cluster is
/// down and refuses every write, the module's included: the refused repair stays queued and is
/// retried until it goes through, without anyone running `GPUCACHE.REPAIR`.
#[test]
fn healing_refused_while_the_cluster_is_down_is_retried_until_it_succeeds() {
    let module_args = ["AVAILABILITY_TTL", "1", "JITTER", "0"];
    let node = common::cluster::ClusterNode::start(&module_args, &[]);
    node.add_slots(0, 16383);
    eventually("a one-node cluster is up", Duration::from_secs(30), || {
        node.cluster_info("cluster_state").as_deref() == Some("ok")
    });
    let mut con = node.connect();
    seed(&mut con);
    fields(&mut con, &["GPUCACHE.BOOK", "eu", "g1", "b1", "alice", "1"]);
    redis::cmd("SAVE").query::<()>(&mut con).unwrap();
    drop(con);
    let bus_port = node.bus_port.to_string();
    let port = node.server.port;
    let dir = node.server.stop();
    // Every idle record's TTL and the booking's time pass while the node is down.
    std::thread::sleep(Duration::from_millis(1500));
    let restarted = Server::start_in(
        dir,
        port,
        &module_args,
        &common::cluster::cluster_args(&bus_port),
    );
    let mut con = restarted.connect();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let last;
        match run(&mut con, &["GPUCACHE.CHECK", "eu"]) {
            Ok(report) => {
                let report = as_map(&report);
                last = format!("{:?}", report["violations"]);
                if text(&report["ok"]) == "1"
                    && fields(&mut con, &["GPUCACHE.STATS", "eu"])["bookings_ended"] == "1"
                {
                    break;
                }
            }
            Err(e) => last = e.to_string(),
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the node never repaired the region by itself: {last}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        info_field(&mut con, "gpucache_heal_retries") > 0,
        "the first repair was refused while the cluster was down, and retried"
    );
    let stats = fields(&mut con, &["GPUCACHE.STATS", "eu"]);
    assert_eq!(stats["bookings_active"], "0");
    assert_eq!(stats["gpus_busy"], "0");
}

/// While a region's slot moves, the node receiving it holds only part of the region: every
/// gpucache command sent there (after `ASK`) is refused with `TRYAGAIN`, so cluster clients
/// retry until the move is over, and nothing is read from, or written into, half a region.
/// Once the slot is the new node's, the region is whole there and consistent.
#[test]
fn a_region_being_moved_is_never_served_in_part() {
    move_a_region(Duration::ZERO);
}

/// A move slower than the minute after which healing gives up a region served elsewhere: the
/// new owner, which already holds part of the region, keeps its sweep queued and heals the
/// record that expired mid-move once the slot is its own.
#[test]
fn a_slow_move_is_still_healed_by_the_new_owner() {
    move_a_region(Duration::from_secs(70));
}

/// Moves a region's slot from one master to the other by hand (`SETSLOT`, `MIGRATE` in two
/// parts), holding the move half-way for `hold`, with an idle GPU's record expiring on the old
/// owner meanwhile.
fn move_a_region(hold: Duration) {
    let cluster = Cluster::start(2, 0, &[]);
    let (source, target) = (&cluster.masters[0], &cluster.masters[1]);
    let mut from = source.connect();
    let mut to = target.connect();
    // A region whose slot the first master serves.
    let region = (0..1000)
        .map(|i| format!("mv{i}"))
        .find(|r| key_slot(&mut from, r) < 8192)
        .unwrap();
    let slot = key_slot(&mut from, &region);
    for i in 0..3 {
        register(&mut from, &region, &format!("g{i}"), "p1", "A100", "2");
    }
    fields(
        &mut from,
        &["GPUCACHE.BOOK", &region, "g0", "b0", "alice", "3600"],
    );
    let version_before: i64 = fields(&mut from, &["GPUCACHE.GET", &region, "g1"])["version"]
        .parse()
        .unwrap();

    begin_slot_move(slot, source, target);
    // The source redirects (the region name is the declared key and never exists)...
    let moved = error(&mut from, &["GPUCACHE.GET", &region, "g1"]);
    assert!(moved.starts_with("ASK"), "{moved}");
    // ...and the target refuses every command until the region is whole there.
    let commands: Vec<Vec<String>> = [
        vec!["GPUCACHE.GET", &region, "g1"],
        vec!["GPUCACHE.STATS", &region],
        vec!["GPUCACHE.AVAILABLE", &region],
        vec!["GPUCACHE.CHECK", &region],
        vec![
            "GPUCACHE.REGISTER",
            &region,
            "g1",
            "PROVIDER",
            "p1",
            "TYPE",
            "A100",
            "PRICE",
            "3",
        ],
        vec!["GPUCACHE.BOOK", &region, "g1", "b1", "bob", "60"],
        vec!["GPUCACHE.PRICE", &region, "A100", "5"],
        vec!["GPUCACHE.REPAIR", &region],
    ]
    .iter()
    .map(|c| c.iter().map(|s| s.to_string()).collect())
    .collect();
    let mut move_some_keys = true;
    for round in 0..2 {
        for command in &commands {
            let args: Vec<&str> = command.iter().map(String::as_str).collect();
            let refused = asking(&mut to, &args).expect_err("served from part of a region");
            assert_eq!(
                refused.kind(),
                redis::ErrorKind::TryAgain,
                "round {round}, {args:?}: {refused}"
            );
        }
        // STATS over every region counts the moving region on neither side while it moves.
        for (side, con) in [("new owner", &mut to), ("old owner", &mut from)] {
            let all = fields(con, &["GPUCACHE.STATS"]);
            assert_eq!(all["regions"], "0", "round {round}, {side}: {all:?}");
        }
        if move_some_keys {
            // Half-way: everything but two GPU records has arrived.
            let records: Vec<String> = keys_in_slot(&mut from, slot, 1000)
                .into_iter()
                .filter(|k| !k.ends_with(":gpu:g1") && !k.ends_with(":gpu:g2"))
                .collect();
            migrate(&mut from, target, &records).unwrap();
            move_some_keys = false;
        }
    }
    // An idle GPU's record expires on the old owner while its indexes are already on the new
    // one: nothing announces it there.
    let gone = format!("gpucache:{{{region}}}:gpu:g2");
    redis::cmd("PEXPIRE")
        .arg(&gone)
        .arg(1)
        .query::<()>(&mut from)
        .unwrap();
    eventually(
        "g2 expired on the old owner",
        Duration::from_secs(10),
        || !keys_in_slot(&mut from, slot, 1000).contains(&gone),
    );
    // A slow move: the point of the test, not synchronisation.
    std::thread::sleep(hold);
    // The rest of the region moves, and the slot is the target's.
    let rest = keys_in_slot(&mut from, slot, 1000);
    migrate(&mut from, target, &rest).unwrap();
    end_slot_move(slot, source, target, &[]);
    // The new owner took charge of the region: it knows it, and heals what expired mid-move.
    eventually_consistent(&mut to, &region);
    assert_eq!(fields(&mut to, &["GPUCACHE.STATS"])["regions"], "1");
    assert_eq!(info_field(&mut to, "gpucache_regions"), 1);
    assert!(error(&mut to, &["GPUCACHE.GET", &region, "g2"]).starts_with("NOGPU"));
    let booked = fields(&mut to, &["GPUCACHE.GET", &region, "g0"]);
    assert_eq!(
        booked["booking_id"], "b0",
        "the acknowledged booking moved with the region"
    );
    let registered = fields(
        &mut to,
        &[
            "GPUCACHE.REGISTER",
            &region,
            "g1",
            "PROVIDER",
            "p1",
            "TYPE",
            "A100",
            "PRICE",
            "3",
        ],
    );
    assert!(registered["version"].parse::<i64>().unwrap() > version_before);
    assert_consistent(&mut to, &region);
}
