//! Test harness: a private `redis-server` with the module loaded, on a free loopback port.
#![allow(dead_code)]

pub mod cluster;
pub mod sentinel;

use redis::{Connection, ConnectionLike, Value};
use std::collections::{BTreeMap, HashMap};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The module built by this `cargo test` run (`deps/` holds the freshest copy). The harness is
/// shared with the `edge/` workspace member, whose manifest sits one level down.
pub fn module_path() -> PathBuf {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    let workspace = if manifest.join("edge").is_dir() {
        manifest
    } else {
        manifest.parent().unwrap_or(manifest)
    };
    let profile_dir = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace.join("target"))
        .join("debug");
    let candidates = [
        profile_dir.join("deps").join("libgpucache.so"),
        profile_dir.join("libgpucache.so"),
    ];
    candidates
        .iter()
        .filter_map(|p| Some((p.metadata().ok()?.modified().ok()?, p.clone())))
        .max()
        .map(|(_, p)| p)
        .expect("libgpucache.so not built: run `cargo build` first")
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("no free loopback port")
}

pub struct Server {
    pub port: u16,
    pub dir: PathBuf,
    child: Child,
}

impl Server {
    /// Starts redis-server with gpucache loaded; `module_args` follow the module path and
    /// `server_args` are extra `--name value` settings.
    pub fn start(module_args: &[&str], server_args: &[&str]) -> Server {
        let port = free_port();
        let dir = std::env::temp_dir().join(format!("gpucache-test-{port}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("create test dir");
        Server::start_in(dir, port, module_args, server_args)
    }

    pub fn start_in(dir: PathBuf, port: u16, module_args: &[&str], server_args: &[&str]) -> Server {
        Server::launch(None, dir, port, module_args, server_args)
    }

    /// Starts redis-server from a configuration file (its own `loadmodule` lines are dropped:
    /// the module under test is loaded instead, with `module_args`).
    pub fn start_with_config(config: &str, module_args: &[&str]) -> Server {
        let port = free_port();
        let dir = std::env::temp_dir().join(format!("gpucache-test-{port}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("create test dir");
        let kept: Vec<&str> = config
            .lines()
            .filter(|l| !l.trim_start().starts_with("loadmodule"))
            .collect();
        let path = dir.join("redis.conf");
        std::fs::write(&path, kept.join("\n")).expect("write config");
        Server::launch(Some(path), dir, port, module_args, &[])
    }

    /// Starts the server; if the port turned out to be taken meanwhile (another test's server
    /// or client got it between `free_port` and the bind), starts again on another port rather
    /// than talk to a server that is not ours.
    fn launch(
        config: Option<PathBuf>,
        dir: PathBuf,
        port: u16,
        module_args: &[&str],
        server_args: &[&str],
    ) -> Server {
        let mut port = port;
        for _ in 0..5 {
            match Server::spawn(config.clone(), dir.clone(), port, module_args, server_args) {
                Ok(server) => return server,
                Err(mut failed) => {
                    let _ = failed.child.kill();
                    let _ = failed.child.wait();
                    failed.dir = PathBuf::new(); // keep the directory for the next attempt
                    port = free_port();
                }
            }
        }
        panic!("redis-server did not start on any of 5 ports");
    }

    fn spawn(
        config: Option<PathBuf>,
        dir: PathBuf,
        port: u16,
        module_args: &[&str],
        server_args: &[&str],
    ) -> Result<Server, Server> {
        let mut load = vec![module_path().display().to_string()];
        load.extend(module_args.iter().map(|s| s.to_string()));
        let mut cmd = Command::new("redis-server");
        if let Some(config) = config {
            cmd.arg(config);
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
            .arg("--repl-diskless-sync-delay")
            .arg("0")
            .arg("--loadmodule")
            .args(&load)
            .args(server_args)
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let child = cmd.spawn().expect("redis-server must be installed");
        let mut server = Server { port, dir, child };
        if server.wait_ready() {
            Ok(server)
        } else {
            Err(server)
        }
    }

    /// Waits until this server answers, and checks it is the process we started (the port may
    /// have been taken by another one). False when our process exited or never answered.
    fn wait_ready(&mut self) -> bool {
        let port = self.port;
        wait_ready(&mut self.child, || connection_to(port).ok())
    }

    fn try_connect(&self) -> redis::RedisResult<Connection> {
        connection_to(self.port)
    }

    pub fn connect(&self) -> Connection {
        self.try_connect().expect("connect")
    }

    pub fn connect_resp3(&self) -> Connection {
        redis::Client::open(format!("redis://127.0.0.1:{}/?protocol=resp3", self.port))
            .and_then(|c| c.get_connection())
            .expect("connect resp3")
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    /// Stops the server without saving; a restarted server uses the same directory.
    pub fn stop(mut self) -> PathBuf {
        let _ = self.child.kill();
        let _ = self.child.wait();
        std::mem::take(&mut self.dir)
    }
}

fn connection_to(port: u16) -> redis::RedisResult<Connection> {
    redis::Client::open(format!("redis://127.0.0.1:{port}/"))?.get_connection()
}

/// Waits (up to 10 s) until the redis-server `child` answers on a connection `connect` opens,
/// and checks it is that process (its port may have been taken by another one). False when
/// the process exited (e.g. the port was in use), is not the one answering, or never answered.
pub fn wait_ready(child: &mut Child, mut connect: impl FnMut() -> Option<Connection>) -> bool {
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return false; // e.g. the port was in use
        }
        if let Some(mut con) = connect() {
            let info: redis::RedisResult<String> = redis::cmd("INFO").arg("server").query(&mut con);
            if let Ok(info) = info {
                let pid = info
                    .lines()
                    .find_map(|l| l.trim_end().strip_prefix("process_id:"))
                    .and_then(|p| p.parse::<u32>().ok());
                if pid != Some(child.id()) {
                    return false;
                }
                // INFO answers while the dataset is still loading; PING once it is loaded.
                if redis::cmd("PING").query::<String>(&mut con).is_ok() {
                    return true;
                }
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if !self.dir.as_os_str().is_empty() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// Polls `check` until it returns true or the deadline passes.
pub fn eventually(what: &str, timeout: Duration, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if check() {
            return;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    panic!("timed out waiting for: {what}");
}

pub fn text(v: &Value) -> String {
    match v {
        Value::BulkString(b) => String::from_utf8_lossy(b).into_owned(),
        Value::SimpleString(s) => s.clone(),
        Value::Int(i) => i.to_string(),
        Value::Nil => "(nil)".into(),
        Value::Okay => "OK".into(),
        Value::Double(d) => d.to_string(),
        other => format!("{other:?}"),
    }
}

/// A reply map (RESP3 map or RESP2 flat array) as field -> value.
pub fn as_map(v: &Value) -> HashMap<String, Value> {
    match v {
        Value::Map(pairs) => pairs.iter().map(|(k, v)| (text(k), v.clone())).collect(),
        Value::Array(items) => items
            .chunks(2)
            .filter(|c| c.len() == 2)
            .map(|c| (text(&c[0]), c[1].clone()))
            .collect(),
        other => panic!("not a map: {other:?}"),
    }
}

/// Runs a command and returns its reply as a map of field -> text.
pub fn fields(con: &mut impl ConnectionLike, args: &[&str]) -> HashMap<String, String> {
    let reply = run(con, args).unwrap_or_else(|e| panic!("{args:?} failed: {e}"));
    as_map(&reply)
        .iter()
        .map(|(k, v)| (k.clone(), text(v)))
        .collect()
}

/// Runs a command on any connection (a cluster connection included).
pub fn run(con: &mut impl ConnectionLike, args: &[&str]) -> redis::RedisResult<Value> {
    let mut cmd = redis::cmd(args[0]);
    for a in &args[1..] {
        cmd.arg(*a);
    }
    cmd.query(con)
}

/// The error a command fails with, as text (`CODE message`).
pub fn error(con: &mut Connection, args: &[&str]) -> String {
    match run(con, args) {
        Ok(v) => panic!("{args:?} should fail but returned {v:?}"),
        Err(e) => {
            let code = e.code().unwrap_or("");
            let detail = e.detail().unwrap_or("");
            format!("{code} {detail}").trim().to_owned()
        }
    }
}

/// Every key of the database with its logical content and absolute expiry, to prove a failed
/// command changed nothing (and created no stray key), and that a replica or a restart holds the
/// same state. (Content rather than `DUMP`, whose encoding may differ between equal values.)
pub fn snapshot(con: &mut Connection) -> BTreeMap<String, (String, i64)> {
    let keys: Vec<Vec<u8>> = redis::cmd("KEYS").arg("*").query(con).expect("KEYS");
    keys.into_iter()
        .map(|raw| {
            let kind: String = redis::cmd("TYPE").arg(&raw).query(con).expect("TYPE");
            let read = |con: &mut Connection, command: &[&str]| -> Value {
                let mut cmd = redis::cmd(command[0]);
                cmd.arg(&raw);
                for a in &command[1..] {
                    cmd.arg(*a);
                }
                cmd.query(con).expect("snapshot read")
            };
            let sorted = |value: Value| -> String {
                match value {
                    Value::Array(items) => {
                        let mut items: Vec<String> = items.iter().map(text).collect();
                        items.sort();
                        format!("{items:?}")
                    }
                    other => format!("{other:?}"),
                }
            };
            let content = match kind.as_str() {
                "hash" => {
                    let Value::Array(flat) = read(con, &["HGETALL"]) else {
                        panic!()
                    };
                    let mut pairs: Vec<(String, String)> =
                        flat.chunks(2).map(|p| (text(&p[0]), text(&p[1]))).collect();
                    pairs.sort();
                    format!("hash {pairs:?}")
                }
                "set" => format!("set {}", sorted(read(con, &["SMEMBERS"]))),
                "zset" => format!("zset {:?}", read(con, &["ZRANGE", "0", "-1", "WITHSCORES"])),
                "stream" => format!("stream {:?}", read(con, &["XRANGE", "-", "+"])),
                _ => format!("{kind} {:?}", read(con, &["DUMP"])),
            };
            let expiry: i64 = redis::cmd("PEXPIRETIME")
                .arg(&raw)
                .query(con)
                .expect("PEXPIRETIME");
            let name = String::from_utf8_lossy(&raw).into_owned();
            (name, (content, expiry))
        })
        .collect()
}

/// Asserts two snapshots are equal, naming only the keys that differ.
pub fn assert_same_state(
    left: &BTreeMap<String, (String, i64)>,
    right: &BTreeMap<String, (String, i64)>,
    what: &str,
) {
    let keys: std::collections::BTreeSet<&String> = left.keys().chain(right.keys()).collect();
    let differing: Vec<String> = keys
        .into_iter()
        .filter(|k| left.get(*k) != right.get(*k))
        .map(|k| format!("{k}:\n  {:?}\n  {:?}", left.get(k), right.get(k)))
        .collect();
    assert!(
        differing.is_empty(),
        "{what}: {} keys differ:\n{}",
        differing.len(),
        differing.join("\n")
    );
}

/// A small marketplace: region `eu`, providers p1/p2, A100s and an H100.
/// Registers a GPU with only its provider, type and price (the shape most tests need).
pub fn register(
    con: &mut impl ConnectionLike,
    region: &str,
    gpu_id: &str,
    provider: &str,
    gpu_type: &str,
    price: &str,
) {
    let args = register_args(region, gpu_id, provider, gpu_type, price, &[]);
    run(con, &args).expect("register");
}

/// The `GPUCACHE.REGISTER` arguments of a GPU with its provider, type and price, followed by
/// `extra` (e.g. `["MEMORY", "80"]`).
pub fn register_args<'a>(
    region: &'a str,
    gpu_id: &'a str,
    provider: &'a str,
    gpu_type: &'a str,
    price: &'a str,
    extra: &[&'a str],
) -> Vec<&'a str> {
    let mut args = vec![
        "GPUCACHE.REGISTER",
        region,
        gpu_id,
        "PROVIDER",
        provider,
        "TYPE",
        gpu_type,
        "PRICE",
        price,
    ];
    args.extend_from_slice(extra);
    args
}

pub fn seed(con: &mut Connection) {
    for (gpu_id, provider, gpu_type, price) in [
        ("g1", "p1", "A100", "2.5"),
        ("g2", "p1", "A100", "1.5"),
        ("g3", "p2", "A100", "2.0"),
        ("g4", "p2", "H100", "4.0"),
    ] {
        register(con, "eu", gpu_id, provider, gpu_type, price);
    }
}

/// GPU ids returned by `GPUCACHE.AVAILABLE`, in order.
pub fn available_ids(con: &mut Connection, args: &[&str]) -> Vec<String> {
    let mut full = vec!["GPUCACHE.AVAILABLE"];
    full.extend_from_slice(args);
    match run(con, &full).expect("AVAILABLE") {
        Value::Array(rows) => rows
            .iter()
            .map(|row| text(as_map(row).get("gpu_id").expect("gpu_id")))
            .collect(),
        other => panic!("AVAILABLE returned {other:?}"),
    }
}

/// Asserts `GPUCACHE.CHECK` finds every invariant of the region intact.
pub fn assert_consistent(con: &mut Connection, region: &str) {
    let reply = run(con, &["GPUCACHE.CHECK", region]).expect("CHECK");
    let report = as_map(&reply);
    assert_eq!(
        text(&report["ok"]),
        "1",
        "CHECK {region} found violations: {:?}",
        report["violations"]
    );
}

/// A numeric field of `INFO` (any section).
pub fn info_field(con: &mut Connection, name: &str) -> i64 {
    let info: String = redis::cmd("INFO")
        .arg("everything")
        .query(con)
        .expect("INFO");
    info.lines()
        .find_map(|l| l.strip_prefix(&format!("{name}:")))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("INFO has no numeric {name}"))
}

/// Polls `GPUCACHE.CHECK` until the region is consistent (healing runs in a timer just after
/// the commands that need it).
pub fn eventually_consistent(con: &mut Connection, region: &str) {
    let mut last = String::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        let report = run(con, &["GPUCACHE.CHECK", region]).expect("CHECK");
        let report = as_map(&report);
        if text(&report["ok"]) == "1" {
            return;
        }
        last = format!("{:?}", report["violations"]);
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("CHECK {region} never became clean: {last}");
}

/// Every key family gpucache writes, as the part after `gpucache:{R}:` (README "Keys"): what
/// the tests of other clients' writes write into.
pub const KEY_FAMILIES: [&str; 16] = [
    "gpu",
    "booking",
    "price",
    "provider",
    "provider-gpus",
    "avail-own",
    "avail-type",
    "avail-score",
    "index:gpus",
    "index:types",
    "index:providers",
    "index:bookings",
    "index:booking-ends",
    "stats:market",
    "stats:24h",
    "events",
];
