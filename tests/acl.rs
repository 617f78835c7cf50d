//! The ACL users of redis.conf.example: the edge user reads and follows invalidations but may
//! write nothing; the booking service may write.

mod common;

use common::*;

const CONFIG: &str = include_str!("../redis.conf.example");

fn login(server: &Server, user: &str, password: &str) -> redis::Connection {
    let url = format!("redis://{user}:{password}@127.0.0.1:{}/", server.port);
    redis::Client::open(url)
        .and_then(|c| c.get_connection())
        .expect("login")
}

#[test]
fn the_edge_user_is_refused_every_write_and_the_booking_service_is_not() {
    let server = Server::start_with_config(CONFIG, &[]);
    let mut booking = login(&server, "booking", "CHANGE-ME-booking");
    seed(&mut booking);
    run(
        &mut booking,
        &["GPUCACHE.BOOK", "eu", "g1", "b1", "alice", "600"],
    )
    .unwrap();

    let mut edge = login(&server, "edge", "CHANGE-ME-edge");
    assert_eq!(
        fields(&mut edge, &["GPUCACHE.GET", "eu", "g1"])["status"],
        "busy"
    );
    assert_eq!(available_ids(&mut edge, &["eu", "LIMIT", "1"]), ["g2"]);
    run(&mut edge, &["GPUCACHE.STATS", "eu"]).unwrap();
    run(&mut edge, &["GPUCACHE.ORDERBOOK", "eu", "A100"]).unwrap();
    run(
        &mut edge,
        &["XRANGE", "gpucache:{eu}:events", "-", "+", "COUNT", "1"],
    )
    .unwrap();

    // The default user (open in the example for the loopback demo) takes the snapshots.
    let mut admin = server.connect();
    let before = snapshot(&mut admin);
    let writes: [&[&str]; 11] = [
        &[
            "GPUCACHE.REGISTER",
            "eu",
            "g9",
            "PROVIDER",
            "p",
            "TYPE",
            "T",
            "PRICE",
            "1",
        ],
        &["GPUCACHE.STATUS", "eu", "g2", "offline"],
        &["GPUCACHE.PRICE", "eu", "A100", "9"],
        &["GPUCACHE.BOOK", "eu", "g2", "b2", "mallory", "600"],
        &["GPUCACHE.CANCEL", "eu", "b1"],
        &["GPUCACHE.PROVIDER", "eu", "p1", "offline"],
        &["GPUCACHE.INVALIDATE", "eu", "stats"],
        &["HSET", "gpucache:{eu}:gpu:g2", "status", "busy"],
        &["DEL", "gpucache:{eu}:gpu:g2"],
        &["XADD", "gpucache:{eu}:events", "*", "type", "fake"],
        &["FLUSHALL"],
    ];
    for args in writes {
        let err = run(&mut edge, args).expect_err("edge must not write");
        assert_eq!(err.code(), Some("NOPERM"), "{args:?}: {err}");
    }
    assert_same_state(
        &snapshot(&mut admin),
        &before,
        "after the edge user's attempts",
    );

    // The edge user may follow invalidations on the keyspace channel.
    let mut pubsub_con = login(&server, "edge", "CHANGE-ME-edge");
    let mut pubsub = pubsub_con.as_pubsub();
    pubsub
        .psubscribe("__keyspace@0__:gpucache:*")
        .expect("edge may subscribe");
    // ...but not to other channels.
    let mut other = login(&server, "edge", "CHANGE-ME-edge");
    let refused = redis::cmd("SUBSCRIBE")
        .arg("payments")
        .query::<redis::Value>(&mut other);
    assert!(refused.is_err());
}

/// The commands of the README's command table (`| `GPUCACHE.X ...` | flags | ... |`).
fn readme_commands() -> Vec<String> {
    let readme = include_str!("../README.md");
    let start = readme
        .find("\n## Commands\n")
        .expect("README has a Commands section");
    let section = &readme[start + 1..];
    let section = &section[..section[1..].find("\n## ").map_or(section.len(), |i| i + 1)];
    let commands: Vec<String> = section
        .lines()
        .filter_map(|line| line.strip_prefix("| `GPUCACHE."))
        .map(|rest| {
            let name: String = rest
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric())
                .collect();
            format!("GPUCACHE.{name}")
        })
        .collect();
    assert!(
        commands.len() >= 13,
        "README command table not found: {commands:?}"
    );
    commands
}

/// Well-formed arguments (after the command name) for each command: Redis checks a command's
/// arity before its permissions.
fn example_arguments(command: &str) -> &'static [&'static str] {
    match command {
        "GPUCACHE.REGISTER" => &["eu", "g9", "PROVIDER", "p1", "TYPE", "A100", "PRICE", "1"],
        "GPUCACHE.GET" => &["eu", "g1"],
        "GPUCACHE.STATUS" => &["eu", "g1", "offline"],
        "GPUCACHE.PRICE" => &["eu", "A100", "3"],
        "GPUCACHE.BOOK" => &["eu", "g2", "b9", "alice", "60"],
        "GPUCACHE.CANCEL" => &["eu", "b9"],
        "GPUCACHE.PROVIDER" => &["eu", "p2", "online"],
        "GPUCACHE.AVAILABLE" => &["eu"],
        "GPUCACHE.ORDERBOOK" => &["eu", "A100"],
        "GPUCACHE.STATS" => &["eu"],
        "GPUCACHE.INVALIDATE" => &["eu", "stats"],
        "GPUCACHE.CHECK" => &["eu"],
        "GPUCACHE.REPAIR" => &["eu"],
        other => panic!("no example arguments for {other}: add them here"),
    }
}

#[test]
fn the_booking_service_may_run_every_command_of_the_readme_table() {
    let server = Server::start_with_config(CONFIG, &[]);
    let mut admin = server.connect();
    seed(&mut admin);
    let mut booking = login(&server, "booking", "CHANGE-ME-booking");
    for command in readme_commands() {
        let mut args = vec![command.as_str()];
        args.extend_from_slice(example_arguments(&command));
        run(&mut booking, &args).unwrap_or_else(|e| panic!("{args:?}: {e}"));
        let dry: String = redis::cmd("ACL")
            .arg("DRYRUN")
            .arg("booking")
            .arg(&args)
            .query(&mut admin)
            .unwrap_or_else(|e| panic!("ACL DRYRUN {args:?}: {e}"));
        assert_eq!(dry, "OK", "{command}");
    }
}

/// Creates an ACL user with no password and the given rules.
fn user(admin: &mut redis::Connection, name: &str, rules: &[&str]) {
    let mut cmd = redis::cmd("ACL");
    cmd.arg("SETUSER")
        .arg(name)
        .arg("reset")
        .arg("on")
        .arg("nopass");
    for rule in rules {
        cmd.arg(*rule);
    }
    cmd.query::<()>(admin).expect("ACL SETUSER");
}

/// The server's version as (major, minor).
fn version(con: &mut redis::Connection) -> (u32, u32) {
    let info: String = redis::cmd("INFO").arg("server").query(con).unwrap();
    let version = info
        .lines()
        .find_map(|l| l.trim_end().strip_prefix("redis_version:"))
        .expect("redis_version");
    let mut parts = version.split('.').map(|p| p.parse::<u32>().unwrap_or(0));
    (parts.next().unwrap_or(0), parts.next().unwrap_or(0))
}

/// Two regions: eu (four GPUs, one booked) and us (two GPUs).
fn two_regions(admin: &mut redis::Connection) {
    seed(admin);
    run(admin, &["GPUCACHE.BOOK", "eu", "g1", "b1", "alice", "600"]).unwrap();
    register(admin, "us", "u1", "p9", "A100", "3");
    register(admin, "us", "u2", "p9", "L4", "0.5");
}

#[test]
fn stats_without_a_region_sums_only_the_regions_the_user_may_read() {
    let server = Server::start(&[], &[]);
    let mut admin = server.connect();
    two_regions(&mut admin);
    user(&mut admin, "eu-keys", &["~gpucache:{eu}:*", "+@all"]);
    user(&mut admin, "eu-name", &["~eu", "+@all"]);
    user(
        &mut admin,
        "eu-write-only",
        &["%W~gpucache:{eu}:*", "%W~eu", "+@all"],
    );
    user(&mut admin, "everything", &["~*", "+@all"]);
    user(&mut admin, "no-keys", &["+@all"]);

    let everything = fields(&mut login(&server, "everything", "x"), &["GPUCACHE.STATS"]);
    assert_eq!(everything["regions"], "2");
    assert_eq!(everything["gpus_total"], "6");
    assert_eq!(everything, fields(&mut admin, &["GPUCACHE.STATS"]));

    let eu = fields(&mut admin, &["GPUCACHE.STATS", "eu"]);
    // Allowed by the region's keys or by the region name (what `STATS eu` is checked against).
    for name in ["eu-keys", "eu-name"] {
        let mine = fields(&mut login(&server, name, "x"), &["GPUCACHE.STATS"]);
        assert_eq!(mine["regions"], "1", "{name}");
        for field in ["gpus_total", "gpus_busy", "gpus_listed", "bookings_created"] {
            assert_eq!(mine[field], eu[field], "{name}: {field} counts eu only");
        }
        assert_eq!(mine["gpus_total"], "4", "{name}: us's GPUs are not counted");
    }
    // Write access alone reads nothing, and no key pattern at all reads nothing.
    for name in ["eu-write-only", "no-keys"] {
        let mine = fields(&mut login(&server, name, "x"), &["GPUCACHE.STATS"]);
        assert_eq!(mine["regions"], "0", "{name}");
        assert_eq!(mine["gpus_total"], "0", "{name}");
    }
    // Redis itself still checks the named region.
    let err = run(
        &mut login(&server, "eu-keys", "x"),
        &["GPUCACHE.STATS", "us"],
    )
    .expect_err("us is not readable");
    assert_eq!(err.code(), Some("NOPERM"));
}

/// The first key spec's flags of a `COMMAND INFO` entry, and its arity.
fn key_spec_flags(con: &mut redis::Connection, command: &str) -> (i64, Vec<String>) {
    let reply = run(con, &["COMMAND", "INFO", command]).unwrap();
    let redis::Value::Array(entries) = reply else {
        panic!("COMMAND INFO {command}: {reply:?}")
    };
    let redis::Value::Array(entry) = &entries[0] else {
        panic!("{command} unknown: {entries:?}")
    };
    let redis::Value::Int(arity) = entry[1] else {
        panic!("arity of {command}: {:?}", entry[1])
    };
    let redis::Value::Array(specs) = &entry[8] else {
        panic!("key specs of {command}: {:?}", entry[8])
    };
    assert_eq!(specs.len(), 1, "{command} declares one key, its region");
    let spec = as_map(&specs[0]);
    let redis::Value::Array(flags) = &spec["flags"] else {
        panic!("flags of {command}: {spec:?}")
    };
    (arity, flags.iter().map(text).collect())
}

#[test]
fn read_commands_declare_read_only_keys_and_write_commands_read_write_keys() {
    let server = Server::start(&[], &[]);
    let mut con = server.connect();
    let reads = [
        ("gpucache.get", 3),
        ("gpucache.available", -2),
        ("gpucache.orderbook", -3),
        ("gpucache.stats", -1),
        ("gpucache.check", 2),
    ];
    let writes = [
        ("gpucache.register", -9),
        ("gpucache.status", 4),
        ("gpucache.price", 4),
        ("gpucache.book", 6),
        ("gpucache.cancel", 3),
        ("gpucache.provider", 4),
        ("gpucache.invalidate", -3),
        ("gpucache.repair", 2),
    ];
    for (command, arity) in reads {
        assert_eq!(
            key_spec_flags(&mut con, command),
            (arity, vec!["RO".to_owned(), "access".to_owned()]),
            "{command}"
        );
    }
    for (command, arity) in writes {
        assert_eq!(
            key_spec_flags(&mut con, command),
            (
                arity,
                vec!["RW".to_owned(), "access".to_owned(), "update".to_owned()]
            ),
            "{command}"
        );
    }
    // Redis checks the arity now, with the same message the commands gave.
    assert_eq!(
        error(&mut con, &["GPUCACHE.GET", "eu"]),
        "ERR wrong number of arguments for 'gpucache.get' command"
    );
    assert_eq!(
        error(&mut con, &["GPUCACHE.STATS", "eu", "us"]),
        "ERR wrong number of arguments for 'gpucache.stats' command"
    );
}

#[test]
fn a_read_only_key_pattern_allows_every_read_and_no_write() {
    let server = Server::start(&[], &[]);
    let mut admin = server.connect();
    two_regions(&mut admin);
    user(&mut admin, "reader", &["%R~*", "+@all"]);
    let mut reader = login(&server, "reader", "x");

    assert_eq!(
        fields(&mut reader, &["GPUCACHE.GET", "eu", "g2"])["status"],
        "available"
    );
    assert_eq!(available_ids(&mut reader, &["eu", "LIMIT", "1"]), ["g2"]);
    run(&mut reader, &["GPUCACHE.ORDERBOOK", "eu", "A100"]).unwrap();
    assert_eq!(
        fields(&mut reader, &["GPUCACHE.STATS", "eu"])["gpus_busy"],
        "1"
    );
    assert_eq!(fields(&mut reader, &["GPUCACHE.STATS"])["regions"], "2");
    assert_eq!(fields(&mut reader, &["GPUCACHE.CHECK", "eu"])["ok"], "1");

    let before = snapshot(&mut admin);
    let writes: [&[&str]; 8] = [
        &["GPUCACHE.BOOK", "eu", "g2", "b2", "mallory", "600"],
        &[
            "GPUCACHE.REGISTER",
            "eu",
            "g9",
            "PROVIDER",
            "p",
            "TYPE",
            "T",
            "PRICE",
            "1",
        ],
        &["GPUCACHE.STATUS", "eu", "g2", "offline"],
        &["GPUCACHE.PRICE", "eu", "A100", "9"],
        &["GPUCACHE.CANCEL", "eu", "b1"],
        &["GPUCACHE.PROVIDER", "eu", "p1", "offline"],
        &["GPUCACHE.INVALIDATE", "eu", "stats"],
        &["GPUCACHE.REPAIR", "eu"],
    ];
    for args in writes {
        let err = run(&mut reader, args).expect_err("a read-only key pattern must not write");
        assert_eq!(err.code(), Some("NOPERM"), "{args:?}: {err}");
    }
    assert_same_state(
        &snapshot(&mut admin),
        &before,
        "after the reader's attempts",
    );
}

#[test]
fn acl_categories_where_the_server_supports_them() {
    let server = Server::start(&[], &[]);
    let mut admin = server.connect();
    seed(&mut admin);
    user(&mut admin, "no-writes", &["~*", "+@all", "-@write"]);
    let mut no_writes = login(&server, "no-writes", "x");
    let book = ["GPUCACHE.BOOK", "eu", "g1", "b1", "alice", "600"];
    let (major, minor) = version(&mut admin);
    if (major, minor) >= (7, 2) {
        // Commands carry read/write categories: `-@write` stops BOOK and lets GET through.
        let err = run(&mut no_writes, &book).expect_err("BOOK is in @write");
        assert_eq!(err.code(), Some("NOPERM"), "{err}");
        run(&mut no_writes, &["GPUCACHE.GET", "eu", "g1"]).unwrap();
        if (major, minor) >= (7, 4) {
            let mut listed: Vec<String> = redis::cmd("ACL")
                .arg("CAT")
                .arg("gpucache")
                .query(&mut admin)
                .unwrap();
            listed.sort();
            assert_eq!(listed.len(), 13, "{listed:?}");
            assert!(listed.contains(&"gpucache.book".to_owned()));
        }
    } else {
        // Redis 7.0: module commands belong to no ACL category, so `-@write` cannot stop them
        // (README, Security): only command permissions (`-gpucache.book`) do.
        run(&mut no_writes, &book).expect("7.0: module commands are in no category");
        user(&mut admin, "no-book", &["~*", "+@all", "-gpucache.book"]);
        let err = run(
            &mut login(&server, "no-book", "x"),
            &["GPUCACHE.BOOK", "eu", "g2", "b2", "bob", "600"],
        )
        .expect_err("command permissions work on 7.0");
        assert_eq!(err.code(), Some("NOPERM"), "{err}");
    }
    // Every command still works for a user allowed everything.
    assert_eq!(
        fields(&mut admin, &["GPUCACHE.STATS", "eu"])["gpus_total"],
        "4"
    );
}
