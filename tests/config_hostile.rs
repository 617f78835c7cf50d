//! Hostile configuration: every module setting given hostile values by `CONFIG SET`, by load
//! arguments and by a configuration file. A value is either applied or refused with an error
//! that keeps the old one; the server never crashes, and a server that cannot start with a
//! value exits (not by a signal) and says why in its log.

mod common;

use common::*;
use redis::Connection;
use std::ffi::{OsStr, OsString};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// The module's settings and what each accepts.
#[derive(Clone, Copy)]
enum Kind {
    Integer { min: i64, max: i64 },
    Bool,
    Tiers,
}

const SETTINGS: [(&str, Kind); 8] = [
    (
        "availability-ttl",
        Kind::Integer {
            min: 1,
            max: 31_536_000,
        },
    ),
    (
        "pricing-ttl",
        Kind::Integer {
            min: 1,
            max: 31_536_000,
        },
    ),
    ("jitter", Kind::Integer { min: 0, max: 50 }),
    (
        "stream-maxlen",
        Kind::Integer {
            min: 1,
            max: 100_000_000,
        },
    ),
    (
        "search-max-skips",
        Kind::Integer {
            min: 1,
            max: 100_000_000,
        },
    ),
    (
        "survey-inline-max",
        Kind::Integer {
            min: 0,
            max: 100_000_000,
        },
    ),
    ("demand-tiers", Kind::Tiers),
    ("accept-eviction-risk", Kind::Bool),
];

/// Sixteen tiers (the most the module takes), and seventeen.
fn many_tiers(n: u32) -> Vec<u8> {
    (1..=n)
        .map(|i| format!("{i}:1"))
        .collect::<Vec<_>>()
        .join(" ")
        .into_bytes()
}

/// Values thrown at every setting.
fn hostile_values() -> Vec<Vec<u8>> {
    let mut values: Vec<Vec<u8>> = [
        &b"x\0y"[..],
        b"\0",
        b"1\x000",
        b"5\0",
        b"10:2\0",
        b"yes\0",
        b"\r\n",
        b"1\r\n",
        b"10:2\r\n30:1.5",
        b"yes\r\nno",
        b"\xff\xfe",
        b"\xc3(",
        b"10:\xff",
        b"\x01\x1b[2J",
        b"\t",
        b"%s%n%p",
        b"%s%s%s%s%s%s%s%n",
        b"-1",
        b"-9223372036854775808",
        b"9223372036854775807",
        b"9223372036854775808",
        b"99999999999999999999",
        b"1e3",
        b"",
        b" ",
        b"yes",
        b"no",
        b"YES",
        b"No",
        b"1",
        b"0",
        b"5",
        b"50",
        b"51",
        b"31536000",
        b"31536001",
        b"100000000",
        b"100000001",
        b"+5",
        b" 5",
        b"5 ",
        b"007",
        b"0x10",
        b"1.5",
        b"NaN",
        b"inf",
    ]
    .iter()
    .map(|v| v.to_vec())
    .collect();
    values.push(vec![b'x'; 1 << 20]);
    values.push(vec![b'1'; 1 << 20]);
    values.push(vec![b'%'; 1 << 20]);
    values.push(b"10:2 ".repeat((1 << 20) / 5));
    values
}

/// Values for the demand tiers in particular: (value, what `CONFIG GET` shows once applied, or
/// `None` when it must be refused).
fn tier_values() -> Vec<(Vec<u8>, Option<&'static str>)> {
    let mut values: Vec<(Vec<u8>, Option<&'static str>)> = [
        (&b"10:3"[..], Some("10:3")),
        (b"10:3,20:2.50", Some("10:3 20:2.5")),
        (b"50:1.2 10:2", Some("10:2 50:1.2")),
        (b"  10:2.0   30:1.5 ", Some("10:2 30:1.5")),
        (b"100:100", Some("100:100")),
        (b"1:0.01", Some("1:0.01")),
        (b"", Some("")),
        // Separators alone name no tier: demand pricing off, like the empty string.
        (b" ", Some("")),
        (b" , ", Some("")),
        (b"10:0", None),
        (b"0:2", None),
        (b"101:2", None),
        (b"10:100.01", None),
        (b"10:2 10:3", None),
        (b"10:-1", None),
        (b"10:1e1", None),
        (b"10:", None),
        (b":2", None),
        (b"10:2:3", None),
        (b"10:2.001", None),
        (b"10:+2", None),
        (b"ten:2", None),
        (b"10;2", None),
        (b"10:2\t30:1.5", None),
        (b"10:NaN", None),
        (b"4294967306:2", None),
        (b"10:42949672.96", None),
        (b"10:2 30:1.5 50:1.2", Some("10:2 30:1.5 50:1.2")),
    ]
    .iter()
    .map(|(v, e)| (v.to_vec(), *e))
    .collect();
    values.push((
        many_tiers(16),
        Some("1:1 2:1 3:1 4:1 5:1 6:1 7:1 8:1 9:1 10:1 11:1 12:1 13:1 14:1 15:1 16:1"),
    ));
    values.push((many_tiers(17), None));
    values
}

/// What `CONFIG GET` must show after `CONFIG SET` of `value`, or `None` when it must be refused.
/// Integers are what Redis parses (`string2ll`: canonical decimal only), within range.
fn expected(kind: Kind, value: &[u8]) -> Option<String> {
    let text = std::str::from_utf8(value).ok()?;
    match kind {
        Kind::Integer { min, max } => text
            .parse::<i64>()
            .ok()
            .filter(|n| n.to_string() == text && (min..=max).contains(n))
            .map(|n| n.to_string()),
        Kind::Bool => {
            if text.eq_ignore_ascii_case("yes") {
                Some("yes".into())
            } else if text.eq_ignore_ascii_case("no") {
                Some("no".into())
            } else {
                None
            }
        }
        Kind::Tiers => tier_values()
            .into_iter()
            .find(|(v, _)| v == value)
            .and_then(|(_, shown)| shown.map(str::to_owned)),
    }
}

fn shown(bytes: &[u8]) -> String {
    let mut text = format!(
        "{:?}",
        String::from_utf8_lossy(&bytes[..bytes.len().min(32)])
    );
    if bytes.len() > 32 {
        text.push_str(&format!("..({} bytes)", bytes.len()));
    }
    text
}

fn config_get(con: &mut Connection, name: &str) -> redis::RedisResult<Vec<u8>> {
    let pair: Vec<Vec<u8>> = redis::cmd("CONFIG")
        .arg("GET")
        .arg(format!("gpucache.{name}"))
        .query(con)?;
    Ok(pair.get(1).cloned().unwrap_or_default())
}

fn alive(con: &mut Connection) -> bool {
    redis::cmd("PING")
        .query::<String>(con)
        .is_ok_and(|p| p == "PONG")
}

/// An error reply fit to show a client: parsed as one, printable ASCII only.
fn plain_error(e: &redis::RedisError) -> Result<(), String> {
    if e.code().is_none() {
        return Err(format!("not a proper error reply: {e}"));
    }
    let detail = e.detail().unwrap_or("");
    if let Some(b) = detail.bytes().find(|b| !(b' '..=b'~').contains(b)) {
        return Err(format!(
            "error reply holds byte {b:#04x}: {}",
            shown(detail.as_bytes())
        ));
    }
    Ok(())
}

/// `CONFIG SET gpucache.<name> value`: applied exactly as expected, or refused with a plain
/// error keeping the old value; the server answers `PING` either way. `Err` says what went
/// wrong (`Err` with "server down" when it crashed).
fn set_and_check(
    con: &mut Connection,
    name: &str,
    value: &[u8],
    want: Option<String>,
) -> Result<(), String> {
    let what = format!("CONFIG SET gpucache.{name} {}", shown(value));
    let old = config_get(con, name).map_err(|e| format!("{what}: CONFIG GET before: {e}"))?;
    let reply: redis::RedisResult<()> = redis::cmd("CONFIG")
        .arg("SET")
        .arg(format!("gpucache.{name}"))
        .arg(value)
        .query(con);
    if !alive(con) {
        return Err(format!("{what}: server down"));
    }
    let now = config_get(con, name).map_err(|e| format!("{what}: CONFIG GET after: {e}"))?;
    match (reply, want) {
        (Ok(()), Some(want)) if now == want.as_bytes() => Ok(()),
        (Ok(()), Some(want)) => Err(format!(
            "{what}: applied, but CONFIG GET shows {} instead of {want:?}",
            shown(&now)
        )),
        (Ok(()), None) => Err(format!(
            "{what}: accepted a value it must refuse (now {})",
            shown(&now)
        )),
        (Err(e), Some(_)) => Err(format!("{what}: refused a valid value: {e}")),
        (Err(e), None) => {
            plain_error(&e).map_err(|why| format!("{what}: {why}"))?;
            if now != old {
                return Err(format!(
                    "{what}: refused ({e}) but the value changed from {} to {}",
                    shown(&old),
                    shown(&now)
                ));
            }
            Ok(())
        }
    }
}

#[test]
fn config_get_lists_every_setting() {
    let server = Server::start(&[], &[]);
    let mut con = server.connect();
    let pairs: Vec<String> = redis::cmd("CONFIG")
        .arg("GET")
        .arg("gpucache.*")
        .query(&mut con)
        .unwrap();
    let mut names: Vec<&str> = pairs.iter().step_by(2).map(String::as_str).collect();
    names.sort_unstable();
    let mut want: Vec<String> = SETTINGS
        .iter()
        .map(|(n, _)| format!("gpucache.{n}"))
        .collect();
    want.sort();
    assert_eq!(names, want);
}

/// Every setting, every hostile value: applied or refused, never a crash. All failures are
/// collected (the server is restarted after a crash) so one run reports every bad value.
#[test]
fn every_setting_refuses_hostile_values_and_keeps_the_old_one() {
    let mut server = Server::start(&[], &[]);
    let mut con = server.connect();
    let mut failures: Vec<String> = Vec::new();
    let mut checked = 0;
    for (name, kind) in SETTINGS {
        let mut values: Vec<(Vec<u8>, Option<String>)> = hostile_values()
            .into_iter()
            .map(|v| {
                let want = expected(kind, &v);
                (v, want)
            })
            .collect();
        if let Kind::Tiers = kind {
            values.extend(
                tier_values()
                    .into_iter()
                    .map(|(v, want)| (v, want.map(str::to_owned))),
            );
        }
        for (value, want) in values {
            if let Kind::Bool = kind {
                if nul_suffixed_bool(&value) {
                    continue; // a_bool_setting_refuses_yes_or_no_followed_by_a_nul
                }
            }
            checked += 1;
            if let Err(why) = set_and_check(&mut con, name, &value, want) {
                failures.push(why);
                if !alive(&mut con) {
                    server = Server::start(&[], &[]);
                    con = server.connect();
                }
            }
        }
    }
    assert!(checked > 300, "only {checked} values checked");
    assert!(
        failures.is_empty(),
        "{} of {checked} CONFIG SETs misbehaved:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

/// `yes\0...` / `no\0...`: valid up to the NUL.
fn nul_suffixed_bool(value: &[u8]) -> bool {
    let head = value.split(|&b| b == 0).next().unwrap_or_default();
    head.len() < value.len()
        && (head.eq_ignore_ascii_case(b"yes") || head.eq_ignore_ascii_case(b"no"))
}

/// Redis parses a module's bool setting itself, as a C string (`strcasecmp`), so `"yes\0junk"`
/// reads as `yes` — exactly as it does for its own bool settings. gpucache's bool follows
/// Redis's rule rather than a rule of its own; this pins that it is the same rule.
#[test]
fn a_bool_setting_reads_nul_bytes_as_redis_own_bool_settings_do() {
    let server = Server::start(&[], &[]);
    let mut con = server.connect();
    for value in [
        &b"yes\0"[..],
        b"yes\0no",
        b"no\0",
        b"NO\0yes",
        b"maybe\0yes",
    ] {
        let ours: redis::RedisResult<()> = redis::cmd("CONFIG")
            .arg("SET")
            .arg("gpucache.accept-eviction-risk")
            .arg(value)
            .query(&mut con);
        let redis_own: redis::RedisResult<()> = redis::cmd("CONFIG")
            .arg("SET")
            .arg("lazyfree-lazy-user-flush")
            .arg(value)
            .query(&mut con);
        assert!(alive(&mut con), "{}", shown(value));
        assert_eq!(ours.is_ok(), redis_own.is_ok(), "{}", shown(value));
        let ours = config_get(&mut con, "accept-eviction-risk").unwrap();
        let pair: Vec<Vec<u8>> = redis::cmd("CONFIG")
            .arg("GET")
            .arg("lazyfree-lazy-user-flush")
            .query(&mut con)
            .unwrap();
        assert_eq!(Some(&ours), pair.get(1), "{}", shown(value));
    }
}

/// One `CONFIG SET` naming several settings is all or nothing: a bad value anywhere keeps
/// every old value, the module's string setting included.
#[test]
fn a_config_set_of_several_settings_with_one_bad_value_changes_none() {
    let server = Server::start(&[], &[]);
    let mut con = server.connect();
    let before: Vec<Vec<u8>> = SETTINGS
        .iter()
        .map(|(n, _)| config_get(&mut con, n).unwrap())
        .collect();
    let cases: [&[&[u8]]; 4] = [
        &[
            b"gpucache.jitter",
            b"7",
            b"gpucache.demand-tiers",
            b"x\0y",
            b"gpucache.availability-ttl",
            b"60",
        ],
        &[b"gpucache.demand-tiers", b"10:3", b"gpucache.jitter", b"51"],
        &[
            b"gpucache.demand-tiers",
            b"10:3",
            b"gpucache.accept-eviction-risk",
            b"y\0es",
        ],
        &[
            b"gpucache.accept-eviction-risk",
            b"yes",
            b"gpucache.stream-maxlen",
            b"5",
            b"gpucache.demand-tiers",
            b"%s%n%p",
        ],
    ];
    for args in cases {
        let mut cmd = redis::cmd("CONFIG");
        cmd.arg("SET");
        for a in args {
            cmd.arg(*a);
        }
        let reply: redis::RedisResult<()> = cmd.query(&mut con);
        let what: Vec<String> = args.iter().map(|a| shown(a)).collect();
        assert!(alive(&mut con), "server down after CONFIG SET {what:?}");
        let e = reply.expect_err(&format!("CONFIG SET {what:?} must be refused"));
        plain_error(&e).unwrap_or_else(|why| panic!("CONFIG SET {what:?}: {why}"));
        let after: Vec<Vec<u8>> = SETTINGS
            .iter()
            .map(|(n, _)| config_get(&mut con, n).unwrap())
            .collect();
        assert_eq!(
            before, after,
            "CONFIG SET {what:?} was refused but changed settings"
        );
    }
}

/// A valid `CONFIG SET gpucache.demand-tiers` reads back in the module's normal form and is the
/// one prices use.
#[test]
fn valid_demand_tiers_read_back_normalised_and_price_the_market() {
    let server = Server::start(&[], &[]);
    let mut con = server.connect();
    redis::cmd("CONFIG")
        .arg("SET")
        .arg("gpucache.demand-tiers")
        .arg("60:3.50,10:4")
        .query::<()>(&mut con)
        .unwrap();
    assert_eq!(
        config_get(&mut con, "demand-tiers").unwrap(),
        b"10:4 60:3.5"
    );
    register(&mut con, "eu", "g1", "p1", "A100", "2");
    register(&mut con, "eu", "g2", "p1", "A100", "2");
    run(&mut con, &["GPUCACHE.BOOK", "eu", "g1", "b1", "u1", "600"]).unwrap();
    // One of two A100s bookable: 50 %, below 60 % -> x3.5.
    let gpu = fields(&mut con, &["GPUCACHE.GET", "eu", "g2"]);
    assert_eq!(gpu["demand_multiplier"], "3.5");
    assert_eq!(gpu["price"], "7");
    // A refused value leaves the tiers in force.
    assert!(redis::cmd("CONFIG")
        .arg("SET")
        .arg("gpucache.demand-tiers")
        .arg("60:0")
        .query::<()>(&mut con)
        .is_err());
    assert_eq!(
        config_get(&mut con, "demand-tiers").unwrap(),
        b"10:4 60:3.5"
    );
    let gpu = fields(&mut con, &["GPUCACHE.GET", "eu", "g2"]);
    assert_eq!(gpu["demand_multiplier"], "3.5");
    // Empty turns demand pricing off.
    redis::cmd("CONFIG")
        .arg("SET")
        .arg("gpucache.demand-tiers")
        .arg("")
        .query::<()>(&mut con)
        .unwrap();
    assert_eq!(config_get(&mut con, "demand-tiers").unwrap(), b"");
    let gpu = fields(&mut con, &["GPUCACHE.GET", "eu", "g2"]);
    assert_eq!(gpu["demand_multiplier"], "1");
    assert_eq!(gpu["price"], "2");
}

/// `CONFIG GET` of the string setting hands Redis a string each time; reading it many times
/// must not grow the server's memory.
#[test]
fn reading_the_demand_tiers_does_not_leak() {
    let server = Server::start(&[], &[]);
    let mut con = server.connect();
    redis::cmd("CONFIG")
        .arg("SET")
        .arg("gpucache.demand-tiers")
        .arg(many_tiers(16))
        .query::<()>(&mut con)
        .unwrap();
    let used = |con: &mut Connection| info_field(con, "used_memory");
    let read = |con: &mut Connection, times: usize| {
        for _ in 0..times / 1000 {
            let mut pipe = redis::pipe();
            for _ in 0..1000 {
                pipe.cmd("CONFIG").arg("GET").arg("gpucache.demand-tiers");
            }
            pipe.query::<Vec<redis::Value>>(con).unwrap();
        }
    };
    read(&mut con, 2000);
    let before = used(&mut con);
    read(&mut con, 50_000);
    let after = used(&mut con);
    // A leaked string per read would be at least 50,000 x ~100 bytes = 5 MB.
    assert!(
        after - before < 1 << 20,
        "used_memory grew by {} bytes over 50,000 CONFIG GETs (from {before} to {after})",
        after - before
    );
}

// ---------------------------------------------------------------------------------------------
// Hostile values at load: a server that must not start.

/// How a redis-server run ended up.
enum Launch {
    /// It exited by itself: its status and its log.
    Exited(ExitStatus, String),
    /// It answers: the process, its port and its directory (removed on drop).
    Running(Running),
}

struct Running {
    child: Child,
    port: u16,
    dir: PathBuf,
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Starts redis-server with `config` (a configuration file's text, `{module}` standing for the
/// module's path) and, when `module_args` is given, `--loadmodule <module> args...`; waits until
/// it either exits or answers. A run that lost its port to another process is started again.
fn launch(config: Option<&str>, module_args: Option<&[OsString]>) -> Launch {
    let module = module_path();
    for _ in 0..5 {
        let port = free_port();
        let dir =
            std::env::temp_dir().join(format!("gpucache-config-{port}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let log = dir.join("redis.log");
        let mut cmd = Command::new("redis-server");
        if let Some(config) = config {
            let path = dir.join("redis.conf");
            let text = config.replace("{module}", &module.display().to_string());
            std::fs::write(&path, text).unwrap();
            cmd.arg(&path);
        }
        cmd.arg("--port")
            .arg(port.to_string())
            .arg("--bind")
            .arg("127.0.0.1")
            .arg("--dir")
            .arg(&dir)
            .arg("--save")
            .arg("")
            .arg("--appendonly")
            .arg("no")
            .arg("--logfile")
            .arg(&log);
        if let Some(args) = module_args {
            cmd.arg("--loadmodule").arg(&module).args(args);
        }
        let stderr = std::fs::File::create(dir.join("stderr")).unwrap();
        let mut child = cmd
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .expect("redis-server must be installed");
        let deadline = Instant::now() + Duration::from_secs(15);
        let outcome = loop {
            if let Ok(Some(status)) = child.try_wait() {
                // The log, then what went to stderr (the module's panic hook writes there).
                let mut text = String::new();
                for file in [log.clone(), dir.join("stderr")] {
                    if let Ok(bytes) = std::fs::read(file) {
                        text.push_str(&String::from_utf8_lossy(&bytes));
                    }
                }
                break Some(Launch::Exited(status, text));
            }
            let answered = redis::Client::open(format!("redis://127.0.0.1:{port}/"))
                .and_then(|c| c.get_connection_with_timeout(Duration::from_millis(200)))
                .is_ok_and(|mut con| alive(&mut con));
            if answered {
                break Some(Launch::Running(Running {
                    child,
                    port,
                    dir: dir.clone(),
                }));
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("redis-server neither started nor exited within 15 s");
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        match outcome {
            Some(Launch::Exited(_, ref text)) if text.contains("Address already in use") => {
                let _ = std::fs::remove_dir_all(&dir);
            }
            Some(Launch::Exited(status, text)) => {
                let _ = std::fs::remove_dir_all(&dir);
                return Launch::Exited(status, text);
            }
            Some(running) => return running,
            None => unreachable!(),
        }
    }
    panic!("redis-server found no free port in 5 attempts");
}

/// The server must have exited by itself, not by a signal, and its log must hold a gpucache
/// line naming one of `because` (case-insensitive). `Err` says what went wrong.
fn refused_cleanly(what: &str, launch: Launch, because: &[&str]) -> Result<(), String> {
    let (status, log) = match launch {
        Launch::Exited(status, log) => (status, log),
        Launch::Running(running) => {
            return Err(format!(
                "{what}: the server started (port {}) although it must refuse",
                running.port
            ))
        }
    };
    if let Some(signal) = status.signal() {
        let tail: Vec<&str> = log
            .lines()
            .filter(|l| l.contains("<gpucache>") || l.contains("panic"))
            .collect();
        return Err(format!(
            "{what}: redis-server died by signal {signal}{}; its gpucache and panic lines:\n    {}",
            if status.core_dumped() {
                " (core dumped)"
            } else {
                ""
            },
            tail.join("\n    ")
        ));
    }
    if status.success() {
        return Err(format!("{what}: redis-server exited with success"));
    }
    let said = log.lines().any(|line| {
        let line = line.to_ascii_lowercase();
        line.contains("gpucache")
            && !line.contains("gpucache loaded")
            && because
                .iter()
                .any(|word| line.contains(&word.to_ascii_lowercase()))
    });
    if !said {
        return Err(format!(
            "{what}: exited ({status}) but no gpucache log line names any of {because:?}; log:\n{}",
            log.lines()
                .filter(|l| !l.contains("Preparing to test memory"))
                .collect::<Vec<_>>()
                .join("\n")
        ));
    }
    Ok(())
}

fn os(bytes: &[u8]) -> OsString {
    OsStr::from_bytes(bytes).to_owned()
}

#[test]
fn hostile_load_arguments_stop_the_server_cleanly() {
    const TIERS: &[&str] = &["DEMAND_TIERS", "demand-tiers", "demand tiers"];
    let long = vec![b'x'; 100_000];
    let cases: Vec<(Vec<&[u8]>, &[&str])> = vec![
        (vec![b"NOPE", b"1"], &["NOPE", "unknown"]),
        (vec![b"%s%n%p", b"1"], &["%s%n%p", "unknown"]),
        (vec![b"\xff\xfe", b"1"], &["unknown"]),
        (vec![b"JITTER"], &["pair", "JITTER"]),
        (
            vec![b"JITTER", b"5", b"STREAM_MAXLEN"],
            &["pair", "STREAM_MAXLEN"],
        ),
        (vec![b"JITTER", b"51"], &["JITTER"]),
        (vec![b"JITTER", b"-1"], &["JITTER"]),
        (vec![b"JITTER", b"1e3"], &["JITTER"]),
        (vec![b"JITTER", b"\xff"], &["JITTER"]),
        (vec![b"JITTER", b"%s%n%p"], &["JITTER"]),
        (vec![b"AVAILABILITY_TTL", b"0"], &["AVAILABILITY_TTL"]),
        (vec![b"PRICING_TTL", b"31536001"], &["PRICING_TTL"]),
        (
            vec![b"STREAM_MAXLEN", b"9223372036854775808"],
            &["STREAM_MAXLEN"],
        ),
        (
            vec![b"ACCEPT_EVICTION_RISK", b"maybe"],
            &["ACCEPT_EVICTION_RISK"],
        ),
        (vec![b"DEMAND_TIERS", b"x"], TIERS),
        (vec![b"DEMAND_TIERS", b"10:0"], TIERS),
        (vec![b"DEMAND_TIERS", b"101:2"], TIERS),
        (vec![b"DEMAND_TIERS", b"10:2 10:3"], TIERS),
        (vec![b"DEMAND_TIERS", b"%s%n%p"], TIERS),
        (vec![b"DEMAND_TIERS", b"\xff\xfe"], TIERS),
        (vec![b"DEMAND_TIERS", b"10:2\r\n30:1.5"], TIERS),
        (vec![b"DEMAND_TIERS", b"\x01\x1b[2J"], TIERS),
        (vec![b"DEMAND_TIERS", &long], TIERS),
    ];
    let mut failures = Vec::new();
    for (args, because) in &cases {
        let what = format!(
            "--loadmodule <gpucache> {}",
            args.iter().map(|a| shown(a)).collect::<Vec<_>>().join(" ")
        );
        let args: Vec<OsString> = args.iter().map(|a| os(a)).collect();
        if let Err(why) = refused_cleanly(&what, launch(None, Some(&args)), because) {
            failures.push(why);
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} load argument cases misbehaved:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
}

/// A configuration file's quoted strings take escapes (`"\x00"`), so it can hand the module
/// bytes a command line cannot: as load arguments and as `gpucache.*` directives.
#[test]
fn hostile_config_file_values_stop_the_server_cleanly() {
    const TIERS: &[&str] = &["DEMAND_TIERS", "demand-tiers", "demand tiers"];
    let cases: [(&str, &[&str]); 11] = [
        (r#"loadmodule {module} DEMAND_TIERS "x\x00y""#, TIERS),
        (r#"loadmodule {module} DEMAND_TIERS "\x00""#, TIERS),
        (
            r#"loadmodule {module} DEMAND_TIERS "10:2\r\n30:1.5""#,
            TIERS,
        ),
        (r#"loadmodule {module} JITTER "5\x00""#, &["JITTER"]),
        (r#"loadmodule {module} "NO\x00PE" 1"#, &["unknown", "NO"]),
        (
            "loadmodule {module}\ngpucache.demand-tiers \"x\\x00y\"",
            TIERS,
        ),
        (
            "loadmodule {module}\ngpucache.demand-tiers \"\\xff\"",
            TIERS,
        ),
        (
            "loadmodule {module}\ngpucache.demand-tiers \"%s%n%p\"",
            TIERS,
        ),
        (
            "loadmodule {module}\ngpucache.demand-tiers \"10:2\\x0130:1.5\"",
            TIERS,
        ),
        (
            "loadmodule {module}\ngpucache.jitter \"5\\x00\"",
            &["jitter"],
        ),
        (
            "loadmodule {module}\ngpucache.accept-eviction-risk \"y\\x00es\"",
            &["accept-eviction-risk"],
        ),
    ];
    let mut failures = Vec::new();
    for (config, because) in cases {
        let what = format!("config file {config:?}");
        if let Err(why) = refused_cleanly(&what, launch(Some(config), None), because) {
            failures.push(why);
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} configuration files misbehaved:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
}

/// Valid `gpucache.*` directives in a configuration file are applied.
#[test]
fn config_file_directives_are_applied() {
    let config = "loadmodule {module}\ngpucache.demand-tiers \"10:3\"\ngpucache.jitter 7\n\
                  gpucache.accept-eviction-risk yes\n";
    let running = match launch(Some(config), None) {
        Launch::Running(running) => running,
        Launch::Exited(status, log) => {
            panic!("a valid configuration file did not start ({status}):\n{log}")
        }
    };
    let mut con = redis::Client::open(format!("redis://127.0.0.1:{}/", running.port))
        .unwrap()
        .get_connection()
        .unwrap();
    assert_eq!(config_get(&mut con, "demand-tiers").unwrap(), b"10:3");
    assert_eq!(config_get(&mut con, "jitter").unwrap(), b"7");
    assert_eq!(
        config_get(&mut con, "accept-eviction-risk").unwrap(),
        b"yes"
    );
    assert_eq!(config_get(&mut con, "availability-ttl").unwrap(), b"300");
    // ...and used: with no A100 bookable (0 %, below 10 %) the multiplier is x3.
    register(&mut con, "eu", "g1", "p1", "A100", "2");
    run(&mut con, &["GPUCACHE.BOOK", "eu", "g1", "b1", "u1", "600"]).unwrap();
    let stats = run(&mut con, &["GPUCACHE.ORDERBOOK", "eu", "A100"]).unwrap();
    assert_eq!(text(&as_map(&stats)["demand_multiplier"]), "3");
}
