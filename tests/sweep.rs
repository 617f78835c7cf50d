//! The sweep after a load walks a big region in many timer calls, stays correct while clients
//! write between them, and reaches a replica as plain replicated writes.

mod common;

use common::*;
use std::time::Duration;

const GPUS: usize = 3000;

fn register_many(con: &mut redis::Connection, ids: impl Iterator<Item = usize>) {
    let mut pipe = redis::pipe();
    for i in ids {
        let (gpu_id, provider, gpu_type) = (
            format!("n{i}"),
            format!("p{}", i % 10),
            format!("T{}", i % 3),
        );
        pipe.cmd("GPUCACHE.REGISTER")
            .arg("eu")
            .arg(gpu_id)
            .arg("PROVIDER")
            .arg(provider)
            .arg("TYPE")
            .arg(gpu_type)
            .arg("PRICE")
            .arg("1.5")
            .ignore();
    }
    pipe.query::<()>(con).expect("pipelined REGISTER");
}

fn link_up(con: &mut redis::Connection) -> bool {
    let info: String = redis::cmd("INFO").arg("replication").query(con).unwrap();
    info.contains("master_link_status:up")
}

fn digest(con: &mut redis::Connection) -> String {
    redis::cmd("DEBUG").arg("DIGEST").query(con).unwrap()
}

#[test]
fn a_big_region_is_swept_in_slices_and_the_replica_follows() {
    let short = ["AVAILABILITY_TTL", "2", "JITTER", "0"];
    let primary = Server::start(&short, &[]);
    let mut con = primary.connect();
    register_many(&mut con, 0..GPUS);
    run(&mut con, &["GPUCACHE.BOOK", "eu", "n0", "b1", "u", "3600"]).unwrap();
    redis::cmd("SAVE").query::<()>(&mut con).unwrap();
    let port = primary.port;
    let replica_of = [
        "--replicaof",
        "127.0.0.1",
        &port.to_string(),
        "--enable-debug-command",
        "yes",
    ]
    .map(str::to_owned);
    let replica_of: Vec<&str> = replica_of.iter().map(String::as_str).collect();
    let replica = Server::start(&short, &replica_of);
    let mut rcon = replica.connect();
    eventually("replica link up", Duration::from_secs(10), || {
        link_up(&mut rcon)
    });
    drop(con);
    let dir = primary.stop();
    // Every idle GPU's time passes while the primary is down: nothing will announce it.
    std::thread::sleep(Duration::from_millis(2300));
    // Records written from now on live long: only the ones loaded are past their time.
    let long = ["AVAILABILITY_TTL", "300", "JITTER", "0"];
    let restarted = Server::start_in(dir, port, &long, &["--enable-debug-command", "yes"]);
    let mut con = restarted.connect();
    if restarted.port != port {
        let new_port = restarted.port.to_string();
        redis::cmd("REPLICAOF")
            .arg("127.0.0.1")
            .arg(new_port)
            .query::<()>(&mut rcon)
            .unwrap();
    }
    // Clients write between the sweep's slices: GPUs registered again are kept, whichever
    // comes first, their REGISTER or the sweep.
    register_many(&mut con, 1..101);
    eventually(
        "the post-load sweep healed every vanished GPU",
        Duration::from_secs(60),
        || info_field(&mut con, "gpucache_heal_queue") == 0 && is_clean(&mut con),
    );
    let slices = info_field(&mut con, "gpucache_sweep_slices");
    assert!(
        slices > 1,
        "3,000 GPUs were swept in {slices} timer call(s), not in slices"
    );
    assert_eq!(
        info_field(&mut con, "gpucache_region_repairs"),
        0,
        "nothing but vanished records was wrong: no whole-region repair"
    );
    let stats = fields(&mut con, &["GPUCACHE.STATS", "eu"]);
    assert_eq!(
        (
            stats["gpus_total"].as_str(),
            stats["gpus_available"].as_str()
        ),
        ("101", "100"),
        "the booked GPU and the 100 registered again remain"
    );
    assert_eq!(
        fields(&mut con, &["GPUCACHE.GET", "eu", "n0"])["status"],
        "busy"
    );

    eventually("replica link up again", Duration::from_secs(20), || {
        link_up(&mut rcon)
    });
    let acked: i64 = redis::cmd("WAIT").arg(1).arg(5000).query(&mut con).unwrap();
    assert_eq!(acked, 1, "replica acknowledged the sweep's writes");
    assert_eq!(
        digest(&mut rcon),
        digest(&mut con),
        "replica equals primary"
    );
    assert_consistent(&mut rcon, "eu");
}

fn is_clean(con: &mut redis::Connection) -> bool {
    let report = run(con, &["GPUCACHE.CHECK", "eu"]).unwrap();
    text(&as_map(&report)["ok"]) == "1"
}
