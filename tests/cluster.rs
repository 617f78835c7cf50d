//! gpucache in a Redis Cluster: a replica answers `GPUCACHE.STATS` without a region (which has
//! no key, so a cluster client may send it to any node) with its master's figures.

mod common;

use common::cluster::Cluster;
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
