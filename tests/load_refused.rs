//! A `MODULE LOAD`/`MODULE LOADEX` that gpucache refuses (a bad load argument or `CONFIG`
//! value) leaves the server running: Redis 7.0 unmaps a module whose load failed but keeps its
//! server-event subscriptions, so any left behind would call into unmapped code on the next
//! cron tick.

mod common;

use common::*;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

#[test]
fn a_refused_module_load_leaves_the_server_running() {
    let port = free_port();
    let dir = std::env::temp_dir().join(format!("gpucache-load-{port}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let mut child = Command::new("redis-server")
        .args([
            "--port",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
        ])
        .args(["--enable-module-command", "yes"])
        .arg("--dir")
        .arg(&dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("redis-server");
    let url = format!("redis://127.0.0.1:{port}/");
    let mut con = None;
    eventually("the server answers", Duration::from_secs(10), || {
        con = redis::Client::open(url.as_str())
            .and_then(|c| c.get_connection())
            .ok();
        con.is_some()
    });
    let mut con = con.expect("connected");
    let module = module_path().display().to_string();

    let refused: [&[&str]; 2] = [
        &[
            "MODULE",
            "LOADEX",
            &module,
            "CONFIG",
            "gpucache.jitter",
            "99",
        ],
        &["MODULE", "LOAD", &module, "DEMAND_TIERS", "bogus"],
    ];
    for args in refused {
        assert!(run(&mut con, args).is_err(), "{args:?} must be refused");
        // Several cron ticks (hz 10): a dangling subscription crashes the server on the first.
        let until = Instant::now() + Duration::from_millis(500);
        while Instant::now() < until {
            assert!(
                run(&mut con, &["PING"]).is_ok(),
                "the server died after {args:?}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    // A good load afterwards works, and its events reach it.
    run(&mut con, &["MODULE", "LOAD", &module]).expect("MODULE LOAD");
    register(&mut con, "eu", "g1", "p1", "A100", "1");
    run(&mut con, &["FLUSHALL"]).expect("FLUSHALL");
    eventually(
        "FLUSHALL forgets the region",
        Duration::from_secs(5),
        || info_field(&mut con, "gpucache_regions") == 0,
    );
    assert!(child.try_wait().expect("wait").is_none(), "server alive");
    let _ = child.kill();
    let _ = child.wait();
    let _ = std::fs::remove_dir_all(&dir);
}

/// A `DEMAND_TIERS` load argument wins over a redis.conf directive; when the directive held the
/// tiers already in force, Redis asked for the value (and skipped the setter) before the load
/// argument applied: `CONFIG GET` must still show the tiers in force, and a `CONFIG SET` back to
/// the directive's value must reach the module.
#[test]
fn config_get_shows_the_tiers_a_load_argument_set() {
    let server = Server::start_with_config(
        "gpucache.demand-tiers \"10:2 30:1.5 50:1.2\"\n",
        &["DEMAND_TIERS", "10:3"],
    );
    let mut con = server.connect();
    let shown = |con: &mut redis::Connection| -> String {
        let reply: Vec<String> = redis::cmd("CONFIG")
            .arg("GET")
            .arg("gpucache.demand-tiers")
            .query(con)
            .expect("CONFIG GET");
        reply.get(1).cloned().unwrap_or_default()
    };
    assert_eq!(shown(&mut con), "10:3");
    run(
        &mut con,
        &[
            "CONFIG",
            "SET",
            "gpucache.demand-tiers",
            "10:2 30:1.5 50:1.2",
        ],
    )
    .expect("CONFIG SET");
    assert_eq!(shown(&mut con), "10:2 30:1.5 50:1.2");
}
