//! Load generator for `scripts/bench.sh`: fills a gpucache marketplace and measures one
//! operation at a time, module commands side by side with their Lua equivalents
//! (`scripts/lua/*.lua`, run with EVALSHA) and plain `HSET`/`HGETALL` floors.
//!
//! ```text
//! cargo build --release --example loadgen
//! loadgen load   --port P --gpus N [--regions 4] [--types 8] [--connections 2] [--batch 1000]
//! loadgen run    --port P --op OP --requests N [--pipeline K] [--connections C] --gpus N
//!                [--regions 4] [--types 8]
//! loadgen verify --port P --gpus N [--regions 4] [--types 8] [--verify-db 15]
//! loadgen subscribe --port P [--connections 1]
//! ```
//!
//! `--cluster yes` (with `load` and `run`) treats `--port` as one node of a Redis Cluster: the
//! masters and the slot of each region are read from it (`CLUSTER SLOTS`, `CLUSTER KEYSLOT`),
//! and each command goes to the master that owns its region. `load` keeps one connection per
//! master on each of its threads; `run` spreads its `--connections` over the masters that own at
//! least one region (round robin, so it needs at least one per master) and each connection
//! sends commands of its master's regions only, so every master gets the same number of
//! commands whatever the hash of the region names.
//!
//! `subscribe` holds `--connections` connections that `PSUBSCRIBE __keyspace@0__:gpucache:*`
//! (what an edge node's notification link does) and read everything they receive without
//! parsing it, until `PUBLISH loadgen:stop <anything>`; it then prints
//! `subscribers=<n> messages=<total> bytes=<total>`. A caller knows all are listening once
//! `PUBSUB NUMSUB loadgen:stop` counts them.
//!
//! `run` prints one line, `op=<name> pipeline=<K> ops_per_s=<x> p50_us=<x> p99_us=<x>` followed
//! by `ops=`, `connections=` and `expected_errors=`. Ops: `book_cancel`, `price`, `status`, `get`,
//! `available`, `orderbook`, their `lua_` twins, `hset` and `hgetall`.
//!
//! `verify` checks that the Lua scripts are honest equivalents: it builds two identical small
//! regions (in database `--verify-db`, which must be empty; they are deleted afterwards), runs
//! the same sequence of commands through the module on one and through the scripts on the
//! other, with the module's TTL jitter off meanwhile, and compares replies, error messages,
//! stream events and every key of the two regions (content and TTL) after each step; it also
//! compares read replies on the loaded regions and checks that a Lua BOOK cancelled by the
//! module (and the reverse) leaves `GPUCACHE.CHECK` clean. Meant for a benchmark server.
//!
//! Scripts are loaded (SCRIPT LOAD) from `scripts/lua/` of the repository, found through
//! `CARGO_MANIFEST_DIR` (at run time, else at build time) or the current directory: each as its
//! shebang line, the helpers of `common.lua` it uses (with `local CFG` set from `CONFIG GET
//! gpucache.*`) and its body. `LOADGEN_DUMP_SCRIPTS=<dir>` writes the assembled scripts there;
//! `LOADGEN_VERBOSE=1` makes `verify` print every step.
//!
//! Only the `redis` crate (a dev-dependency) and std are used.

use redis::{ConnectionLike, Value};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Barrier};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

type Res<T> = Result<T, String>;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("load") => Opts::parse(&args[1..]).and_then(|o| load(&o)),
        Some("run") => Opts::parse(&args[1..]).and_then(|o| run(&o)),
        Some("verify") => Opts::parse(&args[1..]).and_then(|o| verify(&o)),
        Some("subscribe") => Opts::parse(&args[1..]).and_then(|o| subscribe(&o)),
        _ => Err(
            "usage: loadgen load|run|verify|subscribe --port P --gpus N [--op OP --requests N \
                  --pipeline K --connections C --regions R --types T --cluster yes|no]"
                .into(),
        ),
    };
    if let Err(message) = result {
        eprintln!("loadgen: {message}");
        std::process::exit(1);
    }
}

// ---------------------------------------------------------------------------------------------
// Options and the marketplace layout shared by `load` and `run`.

#[derive(Debug, Clone)]
struct Opts {
    host: String,
    port: u16,
    gpus: usize,
    regions: usize,
    types: usize,
    op: String,
    requests: usize,
    pipeline: usize,
    connections: usize,
    batch: usize,
    verify_db: usize,
    /// `--cluster yes`: route each region's commands to the master that owns its slot.
    cluster: bool,
}

impl Opts {
    fn parse(args: &[String]) -> Res<Opts> {
        let mut o = Opts {
            host: "127.0.0.1".into(),
            port: 6379,
            gpus: 10_000,
            regions: 4,
            types: 8,
            op: String::new(),
            requests: 10_000,
            pipeline: 1,
            connections: 2,
            batch: 1000,
            verify_db: 15,
            cluster: false,
        };
        let mut it = args.iter();
        while let Some(name) = it.next() {
            let value = it
                .next()
                .ok_or_else(|| format!("option {name} needs a value"))?;
            let num = || -> Res<usize> {
                value
                    .parse()
                    .map_err(|_| format!("{name}: not a number: {value}"))
            };
            match name.as_str() {
                "--host" => o.host = value.clone(),
                "--port" => o.port = num()? as u16,
                "--gpus" => o.gpus = num()?,
                "--regions" => o.regions = num()?,
                "--types" => o.types = num()?,
                "--op" => o.op = value.clone(),
                "--requests" => o.requests = num()?,
                "--pipeline" => o.pipeline = num()?,
                "--connections" => o.connections = num()?,
                "--batch" => o.batch = num()?,
                "--verify-db" => o.verify_db = num()?,
                "--cluster" => {
                    o.cluster = match value.as_str() {
                        "yes" => true,
                        "no" => false,
                        _ => return Err(format!("--cluster: yes or no, not {value}")),
                    }
                }
                _ => return Err(format!("unknown option {name}")),
            }
        }
        if o.gpus == 0 || o.regions == 0 || o.types == 0 || o.pipeline == 0 {
            return Err("--gpus, --regions, --types and --pipeline must be positive".into());
        }
        o.connections = o.connections.max(1);
        o.batch = o.batch.max(1);
        Ok(o)
    }

    fn connect(&self) -> Res<redis::Connection> {
        connect_to(&self.host, self.port)
    }
}

fn connect_to(host: &str, port: u16) -> Res<redis::Connection> {
    let client =
        redis::Client::open(format!("redis://{host}:{port}/")).map_err(|e| e.to_string())?;
    client
        .get_connection()
        .map_err(|e| format!("cannot connect to {host}:{port}: {e}"))
}

/// A server that commands are sent to, and the regions (indexes) whose commands go there.
#[derive(Debug, Clone)]
struct Target {
    host: String,
    port: u16,
    regions: Vec<usize>,
}

impl Target {
    fn connect(&self) -> Res<redis::Connection> {
        connect_to(&self.host, self.port)
    }
}

/// Where each region's commands go: the one server, or (`--cluster yes`) the master that owns
/// the region's slot, masters without any of the regions left out, ordered by address.
fn targets(o: &Opts) -> Res<Vec<Target>> {
    if !o.cluster {
        return Ok(vec![Target {
            host: o.host.clone(),
            port: o.port,
            regions: (0..o.regions).collect(),
        }]);
    }
    let mut con = o.connect()?;
    // CLUSTER SLOTS: [[first, last, [host, port, id, ...], replicas...], ...]
    let slots = ok(&mut con, &["CLUSTER", "SLOTS"])?;
    let Value::Array(ranges) = slots else {
        return Err("CLUSTER SLOTS: not an array".into());
    };
    let mut owners: Vec<(i64, i64, String, u16)> = Vec::new();
    for range in &ranges {
        let Value::Array(parts) = range else {
            return Err("CLUSTER SLOTS: a range is not an array".into());
        };
        let (Some(first), Some(last), Some(Value::Array(master))) =
            (parts.first(), parts.get(1), parts.get(2))
        else {
            return Err("CLUSTER SLOTS: a range lacks its master".into());
        };
        let host = match master.first().map(text) {
            Some(h) if !h.is_empty() && h != "?" => h,
            _ => o.host.clone(),
        };
        let port = master.get(1).map(int).unwrap_or_default();
        owners.push((
            int(first),
            int(last),
            host,
            u16::try_from(port).map_err(|_| format!("CLUSTER SLOTS: port {port}"))?,
        ));
    }
    let mut targets: Vec<Target> = Vec::new();
    for r in 0..o.regions {
        let slot = int(&ok(&mut con, &["CLUSTER", "KEYSLOT", &region_name(r)])?);
        let (_, _, host, port) = owners
            .iter()
            .find(|(first, last, _, _)| (*first..=*last).contains(&slot))
            .ok_or_else(|| format!("slot {slot} of region {} has no master", region_name(r)))?;
        match targets
            .iter_mut()
            .find(|t| &t.host == host && t.port == *port)
        {
            Some(t) => t.regions.push(r),
            None => targets.push(Target {
                host: host.clone(),
                port: *port,
                regions: vec![r],
            }),
        }
    }
    targets.sort_by(|a, b| (&a.host, a.port).cmp(&(&b.host, b.port)));
    Ok(targets)
}

/// GPU `i` of the marketplace: region `r{i % R}`, type `t{(i / R) % T}`, one of 50 providers
/// per region, and a price, memory, core count and score that vary with the type and the index.
struct Gpu {
    region: String,
    id: String,
    gpu_type: String,
    provider: String,
    price: String,
    memory: u32,
    cores: u32,
    score: String,
}

const TYPE_BASE_MICROS: [u64; 8] = [
    350_000, 790_000, 1_100_000, 1_490_000, 1_990_000, 2_490_000, 3_290_000, 4_100_000,
];
const TYPE_MEMORY: [u32; 8] = [16, 24, 40, 48, 80, 80, 94, 141];
const TYPE_CORES: [u32; 8] = [2560, 4864, 6912, 8704, 10752, 14592, 16896, 18432];

fn region_name(r: usize) -> String {
    format!("r{r}")
}

fn gpu_id(i: usize) -> String {
    format!("g{i:07}")
}

fn type_name(t: usize) -> String {
    format!("t{t}")
}

fn price_text(micros: u64) -> String {
    let (whole, fraction) = (micros / 1_000_000, micros % 1_000_000);
    if fraction == 0 {
        return whole.to_string();
    }
    let digits = format!("{fraction:06}");
    format!("{whole}.{}", digits.trim_end_matches('0'))
}

fn gpu_at(o: &Opts, i: usize) -> Gpu {
    let t = (i / o.regions) % o.types;
    let k = t % 8;
    // 400 price steps of 0.005 above the type's base: a deep order book.
    let variation = ((i as u64).wrapping_mul(7919) % 400) * 5_000;
    Gpu {
        region: region_name(i % o.regions),
        id: gpu_id(i),
        gpu_type: type_name(t),
        provider: format!("p{:02}", (i / (o.regions * 8)) % 50),
        price: price_text(TYPE_BASE_MICROS[k] + variation),
        memory: TYPE_MEMORY[k],
        cores: TYPE_CORES[k] + (i % 4) as u32 * 128,
        score: format!("{}.{}", 10 + k * 10 + i % 7, i % 10),
    }
}

// ---------------------------------------------------------------------------------------------
// RESP encoding and reply checks.

fn pack(buf: &mut Vec<u8>, args: &[&[u8]]) {
    buf.extend_from_slice(format!("*{}\r\n", args.len()).as_bytes());
    for a in args {
        buf.extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
        buf.extend_from_slice(a);
        buf.extend_from_slice(b"\r\n");
    }
}

fn pack_strs(buf: &mut Vec<u8>, args: &[&str]) {
    let bytes: Vec<&[u8]> = args.iter().map(|a| a.as_bytes()).collect();
    pack(buf, &bytes);
}

fn error_text(v: &Value) -> Option<String> {
    match v {
        Value::ServerError(e) => Some(match e.details() {
            Some(d) => format!("{} {d}", e.code()),
            None => e.code().to_owned(),
        }),
        _ => None,
    }
}

fn query(con: &mut redis::Connection, args: &[&str]) -> Res<Value> {
    let mut buf = Vec::new();
    pack_strs(&mut buf, args);
    let mut replies = con
        .req_packed_commands(&buf, 0, 1)
        .map_err(|e| format!("{}: {e}", args.join(" ")))?;
    replies
        .pop()
        .ok_or_else(|| format!("{}: no reply", args.join(" ")))
}

/// A command that must succeed.
fn ok(con: &mut redis::Connection, args: &[&str]) -> Res<Value> {
    let v = query(con, args)?;
    match error_text(&v) {
        Some(e) => Err(format!("{} failed: {e}", args.join(" "))),
        None => Ok(v),
    }
}

fn text(v: &Value) -> String {
    match v {
        Value::BulkString(b) => String::from_utf8_lossy(b).into_owned(),
        Value::SimpleString(s) => s.clone(),
        Value::Int(i) => i.to_string(),
        Value::Okay => "OK".into(),
        Value::Nil => "(nil)".into(),
        other => format!("{other:?}"),
    }
}

fn int(v: &Value) -> i64 {
    match v {
        Value::Int(i) => *i,
        other => text(other).parse().unwrap_or(0),
    }
}

/// A flat field/value reply as a map.
fn fields(v: &Value) -> BTreeMap<String, Value> {
    let mut map = BTreeMap::new();
    if let Value::Array(items) = v {
        for pair in items.chunks_exact(2) {
            map.insert(text(&pair[0]), pair[1].clone());
        }
    }
    map
}

// ---------------------------------------------------------------------------------------------
// Lua scripts.

fn repo_root() -> Res<PathBuf> {
    let mut candidates = Vec::new();
    if let Ok(dir) = std::env::var("CARGO_MANIFEST_DIR") {
        candidates.push(PathBuf::from(dir));
    }
    candidates.push(PathBuf::from(env!("CARGO_MANIFEST_DIR")));
    if let Ok(dir) = std::env::current_dir() {
        candidates.push(dir);
    }
    candidates
        .into_iter()
        .find(|d| d.join("scripts/lua/common.lua").is_file())
        .ok_or_else(|| "scripts/lua/common.lua not found (run from the repository root)".into())
}

/// `{{10, 200}, {30, 150}}` from the module's `gpucache.demand-tiers` text `10:2 30:1.5`.
fn lua_tiers(text: &str) -> Res<String> {
    let mut tiers = Vec::new();
    for item in text.split([' ', ',']).filter(|s| !s.is_empty()) {
        let (percent, multiplier) = item
            .split_once(':')
            .ok_or_else(|| format!("cannot read demand tier '{item}'"))?;
        let (whole, fraction) = multiplier.split_once('.').unwrap_or((multiplier, ""));
        let fraction = format!("{fraction:0<2}");
        let hundredths = whole.parse::<u32>().ok().zip(fraction.parse::<u32>().ok());
        let (Some((w, f)), Ok(p)) = (hundredths, percent.parse::<u32>()) else {
            return Err(format!("cannot read demand tier '{item}'"));
        };
        tiers.push((p, w * 100 + f));
    }
    tiers.sort();
    let parts: Vec<String> = tiers.iter().map(|(p, m)| format!("{{{p}, {m}}}")).collect();
    Ok(format!("{{{}}}", parts.join(", ")))
}

/// The `local CFG = ...` line of common.lua with the server's module configuration.
fn config_line(con: &mut redis::Connection) -> Res<String> {
    let reply = fields(&ok(con, &["CONFIG", "GET", "gpucache.*"])?);
    let get = |name: &str| -> Res<String> {
        reply
            .get(&format!("gpucache.{name}"))
            .map(text)
            .ok_or_else(|| format!("CONFIG GET gpucache.{name}: missing (is the module loaded?)"))
    };
    Ok(format!(
        "local CFG = {{availability_ttl = {}, pricing_ttl = {}, jitter = {}, stream_maxlen = {}, tiers = {}}}",
        get("availability-ttl")?,
        get("pricing-ttl")?,
        get("jitter")?,
        get("stream-maxlen")?,
        lua_tiers(&get("demand-tiers")?)?
    ))
}

/// The identifiers of a piece of Lua source (over-approximated: words in strings count too).
fn identifiers(source: &str) -> std::collections::BTreeSet<&str> {
    source
        .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .filter(|w| w.starts_with(|c: char| c.is_ascii_alphabetic() || c == '_'))
        .collect()
}

/// The definitions of common.lua that `body` uses, directly or through each other, in their
/// original order: a script carries only the helpers it needs, as a hand-written one would, so
/// it does not pay for creating the others' closures on every call. Top-level definitions of
/// common.lua start at column 0 with `local`; everything up to the next one belongs to them.
fn helpers_for(common: &str, body: &str) -> String {
    let mut items: Vec<(Vec<String>, String)> = Vec::new();
    for line in common.lines() {
        if let Some(rest) = line.strip_prefix("local ") {
            let names = rest.strip_prefix("function ").unwrap_or(rest);
            let names = names.split(['(', '=']).next().unwrap_or_default();
            let names = names.split(',').map(|n| n.trim().to_owned()).collect();
            items.push((names, String::new()));
        }
        if let Some((_, text)) = items.last_mut() {
            if !line.starts_with("--") {
                text.push_str(line);
                text.push('\n');
            }
        }
    }
    let mut wanted: std::collections::BTreeSet<String> =
        identifiers(body).into_iter().map(str::to_owned).collect();
    // Walk backwards: an item can only use items defined before it.
    let mut keep = vec![false; items.len()];
    for (i, (names, text)) in items.iter().enumerate().rev() {
        if names.iter().any(|n| wanted.contains(n)) {
            keep[i] = true;
            wanted.extend(identifiers(text).into_iter().map(str::to_owned));
        }
    }
    items
        .iter()
        .zip(keep)
        .filter(|(_, k)| *k)
        .map(|((_, text), _)| text.as_str())
        .collect()
}

#[derive(Debug, Clone, Default)]
struct Shas {
    book: String,
    cancel: String,
    status: String,
    price: String,
    get: String,
    available: String,
    orderbook: String,
}

/// Loads every script: its shebang line, then the helpers of common.lua it uses (with the
/// server's configuration), then the rest of the script.
fn load_scripts(con: &mut redis::Connection) -> Res<Shas> {
    let dir = repo_root()?.join("scripts/lua");
    let read = |p: &Path| std::fs::read_to_string(p).map_err(|e| format!("{}: {e}", p.display()));
    let common = read(&dir.join("common.lua"))?;
    let cfg = config_line(con)?;
    let mut replaced = false;
    let common: String = common
        .lines()
        .map(|line| {
            if line.starts_with("local CFG = ") {
                replaced = true;
                cfg.clone()
            } else {
                line.to_owned()
            }
        })
        .collect::<Vec<_>>()
        .join("\n");
    if !replaced {
        return Err("common.lua has no 'local CFG = ' line".into());
    }
    let mut load_one = |name: &str| -> Res<String> {
        let body = read(&dir.join(format!("{name}.lua")))?;
        let (shebang, rest) = match body.strip_prefix("#!") {
            Some(_) => body.split_once('\n').unwrap_or((&body, "")),
            None => ("", body.as_str()),
        };
        let source = format!("{shebang}\n{}\n{rest}", helpers_for(&common, rest));
        // LOADGEN_DUMP_SCRIPTS=<dir> keeps the assembled sources, to read or load by hand.
        if let Some(out) = std::env::var_os("LOADGEN_DUMP_SCRIPTS") {
            let path = Path::new(&out).join(format!("{name}.lua"));
            std::fs::write(&path, &source).map_err(|e| format!("{}: {e}", path.display()))?;
        }
        Ok(text(&ok(con, &["SCRIPT", "LOAD", &source])?))
    };
    Ok(Shas {
        book: load_one("book")?,
        cancel: load_one("cancel")?,
        status: load_one("status")?,
        price: load_one("price")?,
        get: load_one("get")?,
        available: load_one("available")?,
        orderbook: load_one("orderbook")?,
    })
}

// ---------------------------------------------------------------------------------------------
// load

fn load(o: &Opts) -> Res<()> {
    let started = Instant::now();
    let targets = Arc::new(targets(o)?);
    // The target of each region.
    let mut route = vec![0; o.regions];
    for (n, target) in targets.iter().enumerate() {
        for &r in &target.regions {
            route[r] = n;
        }
    }
    let route = Arc::new(route);
    let threads: Vec<_> = (0..o.connections)
        .map(|t| {
            let o = o.clone();
            let targets = Arc::clone(&targets);
            let route = Arc::clone(&route);
            std::thread::spawn(move || -> Res<()> {
                let mut cons = targets
                    .iter()
                    .map(Target::connect)
                    .collect::<Res<Vec<_>>>()?;
                let mut bufs: Vec<(Vec<u8>, usize)> = vec![(Vec::new(), 0); targets.len()];
                let flush = |con: &mut redis::Connection, buf: &mut (Vec<u8>, usize)| {
                    if buf.1 == 0 {
                        return Ok(());
                    }
                    let replies = con
                        .req_packed_commands(&buf.0, 0, buf.1)
                        .map_err(|e| format!("REGISTER pipeline: {e}"))?;
                    if let Some(e) = replies.iter().find_map(error_text) {
                        return Err(format!("GPUCACHE.REGISTER failed: {e}"));
                    }
                    buf.0.clear();
                    buf.1 = 0;
                    Ok(())
                };
                let (lo, hi) = slice(o.gpus, o.connections, t);
                for i in lo..hi {
                    let g = gpu_at(&o, i);
                    let n = route[i % o.regions];
                    let (memory, cores) = (g.memory.to_string(), g.cores.to_string());
                    pack_strs(
                        &mut bufs[n].0,
                        &[
                            "GPUCACHE.REGISTER",
                            &g.region,
                            &g.id,
                            "PROVIDER",
                            &g.provider,
                            "TYPE",
                            &g.gpu_type,
                            "PRICE",
                            &g.price,
                            "MEMORY",
                            &memory,
                            "CORES",
                            &cores,
                            "SCORE",
                            &g.score,
                        ],
                    );
                    bufs[n].1 += 1;
                    if bufs[n].1 >= o.batch {
                        flush(&mut cons[n], &mut bufs[n])?;
                    }
                }
                for (con, buf) in cons.iter_mut().zip(bufs.iter_mut()) {
                    flush(con, buf)?;
                }
                Ok(())
            })
        })
        .collect();
    for t in threads {
        t.join().map_err(|_| "a load thread panicked")??;
    }
    let secs = started.elapsed().as_secs_f64();
    println!(
        "loaded gpus={} regions={} types={} seconds={secs:.2} per_s={:.0} servers={}",
        o.gpus,
        o.regions,
        o.types,
        o.gpus as f64 / secs,
        targets.len()
    );
    Ok(())
}

/// Thread `t`'s share `[lo, hi)` of `n` items split over `parts` threads.
fn slice(n: usize, parts: usize, t: usize) -> (usize, usize) {
    (n * t / parts, n * (t + 1) / parts)
}

// ---------------------------------------------------------------------------------------------
// run

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    BookCancel,
    Price,
    Status,
    Get,
    Available,
    OrderBook,
    Hset,
    Hgetall,
}

fn parse_op(name: &str) -> Res<(Op, bool)> {
    let (base, lua) = match name.strip_prefix("lua_") {
        Some(base) => (base, true),
        None => (name, false),
    };
    let op = match base {
        "book_cancel" => Op::BookCancel,
        "price" => Op::Price,
        "status" => Op::Status,
        "get" => Op::Get,
        "available" => Op::Available,
        "orderbook" => Op::OrderBook,
        "hset" if !lua => Op::Hset,
        "hgetall" if !lua => Op::Hgetall,
        _ => return Err(format!("unknown op '{name}'")),
    };
    Ok((op, lua))
}

/// Errors a command may meet without the benchmark being wrong.
#[derive(Debug, Clone, Copy)]
enum Allowed {
    Nothing,
    /// A BOOK of a GPU that a leftover booking or a maintenance status holds.
    BookRace,
    /// The CANCEL after such a BOOK.
    CancelRace,
}

impl Allowed {
    fn accepts(self, error: &str) -> bool {
        let code = error.split(' ').next().unwrap_or_default();
        match self {
            Allowed::Nothing => false,
            Allowed::BookRace => code == "GPUBUSY" || code == "GPUUNAVAILABLE",
            Allowed::CancelRace => code == "NOBOOKING",
        }
    }
}

/// A small xorshift generator: std has no RNG.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

/// Produces the commands of one connection. BOOK/CANCEL and the two STATUS changes come in
/// pairs (a GPU is booked then released, or set to maintenance then back to available), so the
/// marketplace is the same after a run; each pair counts as two operations.
struct Generator {
    o: Opts,
    op: Op,
    lua: bool,
    shas: Arc<Shas>,
    /// The GPUs this connection books and changes: indexes `lo..hi` of all GPUs, or with
    /// `regions_here` (`--cluster yes`) the `lo..hi`-th GPUs of each of those regions.
    lo: usize,
    hi: usize,
    /// The regions whose commands this connection sends (its master's), or all of them.
    regions_here: Option<Vec<usize>>,
    rng: Rng,
    thread: usize,
    run_id: String,
    counter: u64,
    /// The second command of a pair, already packed.
    pending: Option<(Vec<u8>, Allowed)>,
}

impl Generator {
    /// The index of the GPU the next command is about.
    fn pick_gpu(&mut self) -> usize {
        let Some(regions) = &self.regions_here else {
            return self.lo + self.rng.below(self.hi - self.lo);
        };
        for _ in 0..64 {
            let r = regions[self.rng.below(regions.len())];
            let i = r + self.o.regions * (self.lo + self.rng.below(self.hi - self.lo));
            if i < self.o.gpus {
                return i;
            }
        }
        // The first GPU of one of the regions (a slice past the last GPU: more connections
        // than GPUs per region).
        regions[0]
    }

    /// A region for the commands that name a region but no GPU.
    fn pick_region(&mut self) -> String {
        match &self.regions_here {
            None => region_name(self.rng.below(self.o.regions)),
            Some(regions) => region_name(regions[self.rng.below(regions.len())]),
        }
    }

    /// Appends one command to `buf` and says which errors it may meet.
    fn next(&mut self, buf: &mut Vec<u8>) -> Allowed {
        if let Some((cmd, allowed)) = self.pending.take() {
            buf.extend_from_slice(&cmd);
            return allowed;
        }
        self.counter += 1;
        let i = self.pick_gpu();
        let g = gpu_at(&self.o, i);
        let random_region = self.pick_region();
        let random_type = type_name(self.rng.below(self.o.types));
        let shas = Arc::clone(&self.shas);
        let lua = self.lua;
        // `module` is the command's name and arguments after it; a script gets them as
        // EVALSHA sha 1 <region> <rest>.
        let cmd = |buf: &mut Vec<u8>, module: &str, sha: &str, args: &[&str]| {
            if lua {
                let mut all = vec!["EVALSHA", sha, "1"];
                all.extend_from_slice(args);
                pack_strs(buf, &all);
            } else {
                let mut all = vec![module];
                all.extend_from_slice(args);
                pack_strs(buf, &all);
            }
        };
        match self.op {
            Op::BookCancel => {
                let booking = format!("bk-{}-{}-{}", self.run_id, self.thread, self.counter);
                let user = format!("u{}", self.thread);
                cmd(
                    buf,
                    "GPUCACHE.BOOK",
                    &shas.book,
                    &[&g.region, &g.id, &booking, &user, "3600"],
                );
                let mut second = Vec::new();
                cmd(
                    &mut second,
                    "GPUCACHE.CANCEL",
                    &shas.cancel,
                    &[&g.region, &booking],
                );
                self.pending = Some((second, Allowed::CancelRace));
                Allowed::BookRace
            }
            Op::Status => {
                cmd(
                    buf,
                    "GPUCACHE.STATUS",
                    &shas.status,
                    &[&g.region, &g.id, "maintenance"],
                );
                let mut second = Vec::new();
                cmd(
                    &mut second,
                    "GPUCACHE.STATUS",
                    &shas.status,
                    &[&g.region, &g.id, "available"],
                );
                self.pending = Some((second, Allowed::Nothing));
                Allowed::Nothing
            }
            Op::Price => {
                let micros =
                    TYPE_BASE_MICROS[self.rng.below(8)] + self.rng.below(200) as u64 * 10_000;
                cmd(
                    buf,
                    "GPUCACHE.PRICE",
                    &shas.price,
                    &[&random_region, &random_type, &price_text(micros)],
                );
                Allowed::Nothing
            }
            Op::Get => {
                cmd(buf, "GPUCACHE.GET", &shas.get, &[&g.region, &g.id]);
                Allowed::Nothing
            }
            Op::Available => {
                cmd(
                    buf,
                    "GPUCACHE.AVAILABLE",
                    &shas.available,
                    &[&random_region, "LIMIT", "10"],
                );
                Allowed::Nothing
            }
            Op::OrderBook => {
                cmd(
                    buf,
                    "GPUCACHE.ORDERBOOK",
                    &shas.orderbook,
                    &[&random_region, &random_type],
                );
                Allowed::Nothing
            }
            Op::Hset => {
                // In a cluster, a key of one of this connection's master's slots.
                let key = match &self.regions_here {
                    None => format!("bench:scratch:{}", self.thread),
                    Some(regions) => format!(
                        "bench:scratch:{{{}}}:{}",
                        region_name(regions[0]),
                        self.thread
                    ),
                };
                let value = self.counter.to_string();
                pack_strs(buf, &["HSET", &key, "field", &value]);
                Allowed::Nothing
            }
            Op::Hgetall => {
                let key = format!("gpucache:{{{}}}:gpu:{}", g.region, g.id);
                pack_strs(buf, &["HGETALL", &key]);
                Allowed::Nothing
            }
        }
    }
}

struct ThreadResult {
    ops: usize,
    expected_errors: usize,
    /// Nanoseconds per batch (per request when the pipeline is 1).
    latencies: Vec<u64>,
}

/// Sends `count` commands in batches of `pipeline`; returns the latency of each batch.
fn drive(
    con: &mut redis::Connection,
    generator: &mut Generator,
    count: usize,
    pipeline: usize,
    result: &mut ThreadResult,
    measure: bool,
) -> Res<()> {
    let mut buf = Vec::with_capacity(pipeline * 128);
    let mut allowed = Vec::with_capacity(pipeline);
    let mut sent = 0;
    while sent < count {
        let n = pipeline.min(count - sent);
        buf.clear();
        allowed.clear();
        for _ in 0..n {
            allowed.push(generator.next(&mut buf));
        }
        let start = Instant::now();
        let replies = con
            .req_packed_commands(&buf, 0, n)
            .map_err(|e| format!("connection error: {e}"))?;
        let elapsed = start.elapsed();
        if replies.len() != n {
            return Err(format!("{} replies to {n} commands", replies.len()));
        }
        for (reply, allowed) in replies.iter().zip(&allowed) {
            if let Some(e) = error_text(reply) {
                if !allowed.accepts(&e) {
                    return Err(format!("unexpected error reply: {e}"));
                }
                if measure {
                    result.expected_errors += 1;
                }
            }
        }
        if measure {
            result.latencies.push(elapsed.as_nanos() as u64);
            result.ops += n;
        }
        sent += n;
    }
    Ok(())
}

fn run(o: &Opts) -> Res<()> {
    let (op, lua) = parse_op(&o.op)?;
    let targets = targets(o)?;
    if o.connections < targets.len() {
        return Err(format!(
            "{} connections for {} masters: give each master one at least",
            o.connections,
            targets.len()
        ));
    }
    let shas = if lua {
        // Scripts are loaded on every server (the SHAs do not depend on it).
        let mut shas = Shas::default();
        for target in &targets {
            shas = load_scripts(&mut target.connect()?)?;
        }
        shas
    } else {
        Shas::default()
    };
    let shas = Arc::new(shas);
    let seed = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(1, |d| d.as_nanos() as u64)
        ^ u64::from(std::process::id());
    let run_id = format!("{:x}", seed & 0xffff_ffff);
    let barrier = Arc::new(Barrier::new(o.connections + 1));
    let threads: Vec<_> = (0..o.connections)
        .map(|t| {
            let o = o.clone();
            let shas = Arc::clone(&shas);
            let barrier = Arc::clone(&barrier);
            let run_id = run_id.clone();
            // Connection t goes to target t % targets; in a cluster it takes its share of each
            // of that master's regions, among the connections of that master.
            let target = targets[t % targets.len()].clone();
            let (regions_here, (lo, hi)) = if o.cluster {
                let peers = (t % targets.len()..o.connections)
                    .step_by(targets.len())
                    .count();
                let per_region = o.gpus.div_ceil(o.regions);
                (
                    Some(target.regions.clone()),
                    slice(per_region, peers, t / targets.len()),
                )
            } else {
                (None, slice(o.gpus, o.connections, t))
            };
            std::thread::spawn(move || -> Res<ThreadResult> {
                let connected = target.connect();
                let count = slice(o.requests, o.connections, t);
                let count = count.1 - count.0;
                let mut generator = Generator {
                    o: o.clone(),
                    op,
                    lua,
                    shas,
                    lo,
                    hi: hi.max(lo + 1),
                    regions_here,
                    rng: Rng(seed.wrapping_add(t as u64 * 0x9e37_79b9_7f4a_7c15) | 1),
                    thread: t,
                    run_id,
                    counter: 0,
                    pending: None,
                };
                let mut result = ThreadResult {
                    ops: 0,
                    expected_errors: 0,
                    latencies: Vec::with_capacity(count / o.pipeline + 1),
                };
                // Warm up (not measured) before everyone starts together; a failure still
                // reaches the barrier so the other threads are not left waiting.
                let warmed = connected.and_then(|mut con| {
                    let warmup = (count / 10).min(200).max(o.pipeline.min(count));
                    drive(
                        &mut con,
                        &mut generator,
                        warmup,
                        o.pipeline,
                        &mut result,
                        false,
                    )
                    .map(|_| con)
                });
                barrier.wait();
                let mut con = warmed?;
                drive(
                    &mut con,
                    &mut generator,
                    count,
                    o.pipeline,
                    &mut result,
                    true,
                )?;
                // An odd count ends between the two commands of a pair: send the second one
                // (unmeasured), so no BOOK or maintenance status outlives the run and the next
                // op finds the marketplace as it was loaded.
                if generator.pending.is_some() {
                    drive(&mut con, &mut generator, 1, 1, &mut result, false)?;
                }
                Ok(result)
            })
        })
        .collect();
    barrier.wait();
    let started = Instant::now();
    let mut latencies = Vec::new();
    let (mut ops, mut expected_errors) = (0, 0);
    let mut failure = None;
    for t in threads {
        match t.join() {
            Ok(Ok(r)) => {
                ops += r.ops;
                expected_errors += r.expected_errors;
                latencies.extend(r.latencies);
            }
            Ok(Err(e)) => failure = failure.or(Some(e)),
            Err(_) => failure = failure.or(Some("a benchmark thread panicked".into())),
        }
    }
    let elapsed = started.elapsed().as_secs_f64();
    if let Some(e) = failure {
        return Err(format!("op {}: {e}", o.op));
    }
    latencies.sort_unstable();
    let pct = |p: f64| -> f64 {
        if latencies.is_empty() {
            return 0.0;
        }
        let idx = ((latencies.len() as f64 * p).ceil() as usize).clamp(1, latencies.len()) - 1;
        latencies[idx] as f64 / 1000.0
    };
    // Latency is per request when the pipeline is 1 and per pipelined batch of `pipeline`
    // commands otherwise.
    println!(
        "op={} pipeline={} ops_per_s={:.0} p50_us={:.1} p99_us={:.1} ops={ops} connections={} expected_errors={expected_errors} servers={}",
        o.op,
        o.pipeline,
        ops as f64 / elapsed,
        pct(0.50),
        pct(0.99),
        o.connections,
        targets.len()
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// subscribe

/// Occurrences of `pattern` in `tail ++ data` that end inside `data` (the others were counted
/// with the previous read); `tail` becomes the last bytes of `tail ++ data`, enough for a
/// pattern split over two reads.
fn count_new(tail: &mut Vec<u8>, data: &[u8], patterns: &[&[u8]]) -> Vec<usize> {
    let old = tail.len();
    tail.extend_from_slice(data);
    let counts = patterns
        .iter()
        .map(|p| {
            tail.windows(p.len())
                .enumerate()
                .filter(|(at, w)| w == p && at + p.len() > old)
                .count()
        })
        .collect();
    let keep = patterns.iter().map(|p| p.len()).max().unwrap_or(1) - 1;
    let cut = tail.len().saturating_sub(keep);
    tail.drain(..cut);
    counts
}

fn subscribe(o: &Opts) -> Res<()> {
    use std::io::{Read, Write};
    const MESSAGE: &[u8] = b"$8\r\npmessage\r\n";
    const STOP: &[u8] = b"$7\r\nmessage\r\n$12\r\nloadgen:stop\r\n";
    let threads: Vec<_> = (0..o.connections)
        .map(|_| {
            let (host, port) = (o.host.clone(), o.port);
            std::thread::spawn(move || -> Res<(usize, usize)> {
                let mut con = std::net::TcpStream::connect((host.as_str(), port))
                    .map_err(|e| format!("cannot connect to {host}:{port}: {e}"))?;
                con.write_all(
                    b"PSUBSCRIBE __keyspace@0__:gpucache:*\r\nSUBSCRIBE loadgen:stop\r\n",
                )
                .map_err(|e| e.to_string())?;
                let (mut messages, mut bytes) = (0, 0);
                let mut buf = vec![0; 1 << 16];
                let mut tail = Vec::new();
                loop {
                    let n = con.read(&mut buf).map_err(|e| e.to_string())?;
                    if n == 0 {
                        return Err("the server closed a subscriber's connection".into());
                    }
                    bytes += n;
                    let counts = count_new(&mut tail, &buf[..n], &[MESSAGE, STOP]);
                    messages += counts[0];
                    if counts[1] > 0 {
                        return Ok((messages, bytes));
                    }
                }
            })
        })
        .collect();
    let (mut messages, mut bytes) = (0, 0);
    for t in threads {
        let (m, b) = t.join().map_err(|_| "a subscriber thread panicked")??;
        messages += m;
        bytes += b;
    }
    println!(
        "subscribers={} messages={messages} bytes={bytes}",
        o.connections
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// verify

/// A parsed JSON value, re-serialised with sorted object keys so that the module's serde output
/// and the scripts' cjson output compare equal when they carry the same data.
#[derive(Debug, Clone, PartialEq)]
enum Json {
    Null,
    Bool(bool),
    Num(String),
    Str(String),
    Arr(Vec<Json>),
    Obj(BTreeMap<String, Json>),
}

struct JsonParser<'a> {
    s: &'a [u8],
    pos: usize,
}

impl JsonParser<'_> {
    fn parse(text: &str) -> Res<Json> {
        let mut p = JsonParser {
            s: text.as_bytes(),
            pos: 0,
        };
        let v = p.value()?;
        p.ws();
        if p.pos != p.s.len() {
            return Err(format!("trailing data in JSON: {text}"));
        }
        Ok(v)
    }

    fn ws(&mut self) {
        while self.pos < self.s.len() && self.s[self.pos].is_ascii_whitespace() {
            self.pos += 1;
        }
    }

    fn peek(&self) -> Option<u8> {
        self.s.get(self.pos).copied()
    }

    fn expect(&mut self, b: u8) -> Res<()> {
        self.ws();
        if self.peek() == Some(b) {
            self.pos += 1;
            Ok(())
        } else {
            Err(format!("JSON: expected '{}' at {}", b as char, self.pos))
        }
    }

    fn value(&mut self) -> Res<Json> {
        self.ws();
        match self.peek() {
            Some(b'{') => {
                self.pos += 1;
                let mut map = BTreeMap::new();
                self.ws();
                if self.peek() == Some(b'}') {
                    self.pos += 1;
                    return Ok(Json::Obj(map));
                }
                loop {
                    self.ws();
                    let key = self.string()?;
                    self.expect(b':')?;
                    let v = self.value()?;
                    map.insert(key, v);
                    self.ws();
                    match self.peek() {
                        Some(b',') => self.pos += 1,
                        Some(b'}') => {
                            self.pos += 1;
                            return Ok(Json::Obj(map));
                        }
                        _ => return Err(format!("JSON: bad object at {}", self.pos)),
                    }
                }
            }
            Some(b'[') => {
                self.pos += 1;
                let mut items = Vec::new();
                self.ws();
                if self.peek() == Some(b']') {
                    self.pos += 1;
                    return Ok(Json::Arr(items));
                }
                loop {
                    items.push(self.value()?);
                    self.ws();
                    match self.peek() {
                        Some(b',') => self.pos += 1,
                        Some(b']') => {
                            self.pos += 1;
                            return Ok(Json::Arr(items));
                        }
                        _ => return Err(format!("JSON: bad array at {}", self.pos)),
                    }
                }
            }
            Some(b'"') => Ok(Json::Str(self.string()?)),
            Some(b't') => self.word("true", Json::Bool(true)),
            Some(b'f') => self.word("false", Json::Bool(false)),
            Some(b'n') => self.word("null", Json::Null),
            Some(_) => {
                let start = self.pos;
                while self
                    .peek()
                    .is_some_and(|b| b.is_ascii_digit() || b"+-.eE".contains(&b))
                {
                    self.pos += 1;
                }
                if start == self.pos {
                    return Err(format!("JSON: unexpected byte at {}", self.pos));
                }
                Ok(Json::Num(
                    String::from_utf8_lossy(&self.s[start..self.pos]).into_owned(),
                ))
            }
            None => Err("JSON: unexpected end".into()),
        }
    }

    fn word(&mut self, word: &str, v: Json) -> Res<Json> {
        if self.s[self.pos..].starts_with(word.as_bytes()) {
            self.pos += word.len();
            Ok(v)
        } else {
            Err(format!("JSON: bad literal at {}", self.pos))
        }
    }

    fn string(&mut self) -> Res<String> {
        if self.peek() != Some(b'"') {
            return Err(format!("JSON: expected a string at {}", self.pos));
        }
        self.pos += 1;
        let mut out = Vec::new();
        loop {
            let b = self.peek().ok_or("JSON: unterminated string")?;
            self.pos += 1;
            match b {
                b'"' => return Ok(String::from_utf8_lossy(&out).into_owned()),
                b'\\' => {
                    let e = self.peek().ok_or("JSON: bad escape")?;
                    self.pos += 1;
                    match e {
                        b'n' => out.push(b'\n'),
                        b't' => out.push(b'\t'),
                        b'r' => out.push(b'\r'),
                        b'b' => out.push(8),
                        b'f' => out.push(12),
                        b'u' => {
                            let hex = std::str::from_utf8(&self.s[self.pos..self.pos + 4])
                                .map_err(|_| "JSON: bad \\u escape")?;
                            let code =
                                u32::from_str_radix(hex, 16).map_err(|_| "JSON: bad \\u escape")?;
                            self.pos += 4;
                            let c = char::from_u32(code).unwrap_or('?');
                            out.extend_from_slice(c.to_string().as_bytes());
                        }
                        other => out.push(other),
                    }
                }
                other => out.push(other),
            }
        }
    }
}

impl Json {
    /// Blanks what differs between two runs of the same step: times, and the region's name.
    fn normalised(self, region: &str, canonical_region: &str) -> Json {
        match self {
            Json::Obj(map) => Json::Obj(
                map.into_iter()
                    .map(|(k, v)| {
                        let v = if matches!(k.as_str(), "ts_ms" | "end_ms" | "start_ms") {
                            Json::Num("T".into())
                        } else {
                            v.normalised(region, canonical_region)
                        };
                        (k, v)
                    })
                    .collect(),
            ),
            Json::Arr(items) => Json::Arr(
                items
                    .into_iter()
                    .map(|v| v.normalised(region, canonical_region))
                    .collect(),
            ),
            Json::Str(s) => Json::Str(rename_region(&s, region, canonical_region)),
            other => other,
        }
    }
}

fn rename_region(s: &str, region: &str, canonical: &str) -> String {
    if s == region {
        return canonical.to_owned();
    }
    s.replace(&format!("{{{region}}}"), &format!("{{{canonical}}}"))
}

/// Reply fields whose values are times (differ between the two runs of a step).
const TIME_FIELDS: [&str; 6] = [
    "start_ms",
    "end_ms",
    "booking_start_ms",
    "booking_end_ms",
    "updated_ms",
    "ttl_ms",
];

/// A reply as comparable text: times blanked, the region renamed.
fn normal_reply(v: &Value, region: &str, canonical: &str) -> String {
    match v {
        Value::Array(items) => {
            let mut parts = Vec::new();
            let mut blank_next = false;
            for item in items {
                if blank_next {
                    parts.push("T".to_owned());
                    blank_next = false;
                    continue;
                }
                let t = normal_reply(item, region, canonical);
                blank_next = TIME_FIELDS.contains(&t.as_str());
                parts.push(t);
            }
            format!("[{}]", parts.join(" "))
        }
        Value::Int(i) => format!("i{i}"),
        Value::Nil => "nil".into(),
        Value::ServerError(_) => format!(
            "ERROR({})",
            rename_region(&error_text(v).unwrap_or_default(), region, canonical)
        ),
        other => rename_region(&text(other), region, canonical),
    }
}

/// Every key of a (small) region, its type, content and whether it has a TTL, normalised, and
/// each key's TTL in milliseconds (-1 when none).
type Dump = (Vec<String>, Vec<i64>);

fn dump_region(con: &mut redis::Connection, region: &str, canonical: &str) -> Res<Dump> {
    let pattern = format!("gpucache:{{{region}}}:*");
    let keys = ok(con, &["KEYS", &pattern])?;
    let mut keys: Vec<String> = match keys {
        Value::Array(items) => items.iter().map(text).collect(),
        _ => Vec::new(),
    };
    keys.sort();
    let mut out = Vec::new();
    let mut ttls = Vec::new();
    for key in keys {
        let name = rename_region(&key, region, canonical);
        let kind = text(&ok(con, &["TYPE", &key])?);
        let ttl = int(&ok(con, &["PTTL", &key])?);
        let content = match kind.as_str() {
            "hash" => {
                let mut pairs: Vec<(String, String)> = fields(&ok(con, &["HGETALL", &key])?)
                    .into_iter()
                    .map(|(f, v)| {
                        let v = text(&v);
                        if TIME_FIELDS.contains(&f.as_str()) {
                            (f, "T".into())
                        } else if key.ends_with(":stats:24h") {
                            // 15-minute buckets: the name of the current one is a time.
                            (f.split(':').next().unwrap_or_default().to_owned(), v)
                        } else {
                            (f, v)
                        }
                    })
                    .collect();
                pairs.sort();
                format!("{pairs:?}")
            }
            // The booking clock: scores are end times. Each entry is shown with whether its score
            // is the end its booking records (by name: ends a few ms apart may sort either way).
            "zset" if key.ends_with(":index:booking-ends") => {
                let mut entries = Vec::new();
                if let Value::Array(items) = ok(con, &["ZRANGE", &key, "0", "-1", "WITHSCORES"])? {
                    for pair in items.chunks_exact(2) {
                        let member = text(&pair[0]);
                        let score: f64 = text(&pair[1]).parse().unwrap_or(f64::NAN);
                        let booking = format!("gpucache:{{{region}}}:booking:{member}");
                        let end = ok(con, &["HGET", &booking, "end_ms"])?;
                        let end: f64 = text(&end).parse().unwrap_or(f64::NAN);
                        let at = if end == score { "its end" } else { "T" };
                        entries.push(format!("{member}@{at}"));
                    }
                }
                entries.sort();
                format!("{entries:?}")
            }
            "zset" => normal_reply(
                &ok(con, &["ZRANGE", &key, "0", "-1", "WITHSCORES"])?,
                region,
                canonical,
            ),
            "set" => {
                let mut members: Vec<String> = match ok(con, &["SMEMBERS", &key])? {
                    Value::Array(items) => items.iter().map(text).collect(),
                    _ => Vec::new(),
                };
                members.sort();
                format!("{members:?}")
            }
            "stream" => format!("{} entries", int(&ok(con, &["XLEN", &key])?)),
            other => other.to_owned(),
        };
        out.push(format!(
            "{name} {kind} ttl={} {content}",
            if ttl >= 0 { "yes" } else { "no" }
        ));
        ttls.push(ttl.max(-1));
    }
    Ok((out, ttls))
}

/// The stream entries after `last` (their field names in order, type, recorded sequence and
/// normalised payload) and the new last id. The entries' `seq` fields never go down and the last
/// one is the region's sequence as it stands now (`stats:market` field `seq`; the steps run one
/// command at a time, and a command that first ends a booking appends that booking's events,
/// recording the sequence as it stood then).
fn new_events(
    con: &mut redis::Connection,
    region: &str,
    canonical: &str,
    last: &str,
) -> Res<(Vec<String>, String)> {
    let key = format!("gpucache:{{{region}}}:events");
    if text(&ok(con, &["TYPE", &key])?) != "stream" {
        return Ok((Vec::new(), last.to_owned()));
    }
    let start = format!("({last}");
    let reply = ok(con, &["XRANGE", &key, &start, "+"])?;
    let stats = format!("gpucache:{{{region}}}:stats:market");
    let seq_now = match text(&ok(con, &["TYPE", &stats])?).as_str() {
        "hash" => match ok(con, &["HGET", &stats, "seq"])? {
            Value::Nil => None,
            v => Some(text(&v)),
        },
        _ => None,
    };
    let mut out = Vec::new();
    let mut new_last = last.to_owned();
    let (mut last_seq, mut last_text): (Option<i64>, Option<String>) = (None, None);
    let appended = matches!(&reply, Value::Array(entries) if !entries.is_empty());
    if let Value::Array(entries) = reply {
        for entry in entries {
            let Value::Array(parts) = entry else { continue };
            new_last = text(&parts[0]);
            let names: Vec<String> = match &parts[1] {
                Value::Array(raw) => raw.iter().step_by(2).map(text).collect(),
                _ => Vec::new(),
            };
            let f = fields(&parts[1]);
            let kind = f.get("type").map(text).unwrap_or_default();
            let seq = f.get("seq").map(text);
            let number = seq.as_deref().and_then(|s| s.parse::<i64>().ok());
            if number < last_seq || (seq.is_some() && number.is_none()) {
                return Err(format!(
                    "{key}: entry {new_last} ({kind}) records seq {seq:?} after {last_seq:?}"
                ));
            }
            last_seq = number;
            last_text = seq.clone();
            let payload = f.get("payload").map(text).unwrap_or_default();
            let json = JsonParser::parse(&payload)?.normalised(region, canonical);
            out.push(format!(
                "[{}] {kind} seq={} {json:?}",
                names.join(" "),
                seq.unwrap_or_default()
            ));
        }
    }
    if appended && last_text != seq_now {
        return Err(format!(
            "{key}: the newest entry records seq {last_text:?}, the region's is {seq_now:?}"
        ));
    }
    Ok((out, new_last))
}

struct Twin {
    shas: Shas,
    module_region: String,
    lua_region: String,
    module_last: String,
    lua_last: String,
    steps: usize,
}

impl Twin {
    /// Runs one command through the module on one region and through its script on the other,
    /// and compares the replies, the events appended and every key of the two regions.
    fn step(&mut self, con: &mut redis::Connection, command: &str, args: &[&str]) -> Res<String> {
        self.steps += 1;
        let sha = match command {
            "GPUCACHE.BOOK" => &self.shas.book,
            "GPUCACHE.CANCEL" => &self.shas.cancel,
            "GPUCACHE.STATUS" => &self.shas.status,
            "GPUCACHE.PRICE" => &self.shas.price,
            "GPUCACHE.GET" => &self.shas.get,
            "GPUCACHE.AVAILABLE" => &self.shas.available,
            "GPUCACHE.ORDERBOOK" => &self.shas.orderbook,
            other => return Err(format!("no script for {other}")),
        }
        .clone();
        let mut module_args = vec![command, self.module_region.as_str()];
        module_args.extend_from_slice(args);
        let mut lua_args = vec!["EVALSHA", sha.as_str(), "1", self.lua_region.as_str()];
        lua_args.extend_from_slice(args);
        let canonical = self.module_region.clone();
        let m = query(con, &module_args)?;
        let l = query(con, &lua_args)?;
        let what = format!("{command} {}", args.join(" "));
        let (m_text, l_text) = (
            normal_reply(&m, &self.module_region, &canonical),
            normal_reply(&l, &self.lua_region, &canonical),
        );
        if m_text != l_text {
            return Err(format!(
                "{what}: replies differ\n  module: {m_text}\n  lua:    {l_text}"
            ));
        }
        let (m_events, m_last) =
            new_events(con, &self.module_region, &canonical, &self.module_last)?;
        let (l_events, l_last) = new_events(con, &self.lua_region, &canonical, &self.lua_last)?;
        self.module_last = m_last;
        self.lua_last = l_last;
        if m_events != l_events {
            return Err(format!(
                "{what}: stream events differ\n  module: {m_events:#?}\n  lua:    {l_events:#?}"
            ));
        }
        let (m_dump, m_ttls) = dump_region(con, &self.module_region, &canonical)?;
        let (l_dump, l_ttls) = dump_region(con, &self.lua_region, &canonical)?;
        if m_dump != l_dump {
            let only_m: Vec<_> = m_dump.iter().filter(|x| !l_dump.contains(x)).collect();
            let only_l: Vec<_> = l_dump.iter().filter(|x| !m_dump.contains(x)).collect();
            return Err(format!(
                "{what}: regions differ afterwards\n  module only: {only_m:#?}\n  lua only:    {only_l:#?}"
            ));
        }
        // verify runs without jitter: TTLs agree but for the time between the two commands.
        for ((key, m), l) in m_dump.iter().zip(&m_ttls).zip(&l_ttls) {
            if (m - l).abs() > 2000 {
                return Err(format!(
                    "{what}: TTL of {key} is {m} ms (module), {l} ms (Lua)"
                ));
            }
        }
        if std::env::var_os("LOADGEN_VERBOSE").is_some() {
            println!("{what}\n  reply: {m_text}\n  events: {m_events:?}");
        }
        Ok(m_text)
    }

    /// Runs the same plain command on both regions (setup that has no script). The events it
    /// appends (the module's, on both) are skipped: the next step compares only its own.
    fn both(&mut self, con: &mut redis::Connection, args: &[&str]) -> Res<()> {
        for region in [self.module_region.clone(), self.lua_region.clone()] {
            let args: Vec<String> = args.iter().map(|a| a.replace("REGION", &region)).collect();
            let refs: Vec<&str> = args.iter().map(String::as_str).collect();
            query(con, &refs)?;
            let last = newest_event(con, &region)?;
            if region == self.module_region {
                self.module_last = last;
            } else {
                self.lua_last = last;
            }
        }
        Ok(())
    }
}

/// The id of a region's newest event ("0-0" without one).
fn newest_event(con: &mut redis::Connection, region: &str) -> Res<String> {
    let key = format!("gpucache:{{{region}}}:events");
    if text(&ok(con, &["TYPE", &key])?) != "stream" {
        return Ok("0-0".into());
    }
    Ok(
        match ok(con, &["XREVRANGE", &key, "+", "-", "COUNT", "1"])? {
            Value::Array(entries) => match entries.first() {
                Some(Value::Array(parts)) => text(&parts[0]),
                _ => "0-0".into(),
            },
            _ => "0-0".into(),
        },
    )
}

fn check_clean(con: &mut redis::Connection, region: &str) -> Res<()> {
    let reply = fields(&ok(con, &["GPUCACHE.CHECK", region])?);
    if reply.get("ok").map(int) != Some(1) {
        return Err(format!(
            "GPUCACHE.CHECK {region} is not clean: {:?}",
            reply.get("violations")
        ));
    }
    Ok(())
}

/// Module and scripts, step by step on twin regions; the regions are dropped afterwards.
fn verify_twins(con: &mut redis::Connection, tag: &str) -> Res<()> {
    let shas = load_scripts(con)?;
    let mut twin = Twin {
        shas,
        module_region: format!("verify-m-{tag}"),
        lua_region: format!("verify-l-{tag}"),
        module_last: "0-0".into(),
        lua_last: "0-0".into(),
        steps: 0,
    };

    // Two identical small regions, registered by the module.
    let gpus: [(&str, &str, &str, &str, &str); 9] = [
        ("a1", "pa", "A100", "2.49", "SCORE 9.5 MEMORY 80"),
        ("a2", "pa", "A100", "1.99", "MEMORY 80"),
        ("a3", "pb", "A100", "1.99", "CORES 6912"),
        ("a4", "pb", "A100", "3.1", ""),
        ("a5", "pc", "A100", "2.25", "SCORE 3"),
        (
            "h1",
            "pa",
            "H100",
            "4.5",
            "SCORE 12.25 MEMORY 80 CORES 16896",
        ),
        ("h2", "pc", "H100", "4.25", ""),
        ("l1", "pc", "L4", "0.5", "MEMORY 24"),
        ("l2", "pb", "L4", "0.55", ""),
    ];
    for (id, provider, gpu_type, price, extra) in gpus {
        let mut args = vec![
            "GPUCACHE.REGISTER",
            "REGION",
            id,
            "PROVIDER",
            provider,
            "TYPE",
            gpu_type,
            "PRICE",
            price,
        ];
        args.extend(extra.split(' ').filter(|s| !s.is_empty()));
        twin.both(con, &args)?;
    }
    // (`both` skipped the registration events: only the compared steps' events are compared.)

    let steps: Vec<(&str, Vec<&str>)> = vec![
        ("GPUCACHE.GET", vec!["a1"]),
        ("GPUCACHE.AVAILABLE", vec![]),
        ("GPUCACHE.AVAILABLE", vec!["LIMIT", "3"]),
        // SORT SCORE: GPUs without a score tie at 0 within and across types (by GPU id).
        ("GPUCACHE.AVAILABLE", vec!["SORT", "SCORE"]),
        ("GPUCACHE.AVAILABLE", vec!["sort", "score", "LIMIT", "4"]),
        ("GPUCACHE.AVAILABLE", vec!["SORT", "PRICE", "LIMIT", "4"]),
        ("GPUCACHE.ORDERBOOK", vec!["A100"]),
        ("GPUCACHE.ORDERBOOK", vec!["A100", "DEPTH", "2"]),
        ("GPUCACHE.BOOK", vec!["a2", "b1", "alice", "7200"]),
        ("GPUCACHE.BOOK", vec!["a2", "b1", "alice", "7200"]),
        ("GPUCACHE.BOOK", vec!["a2", "b2", "bob", "60"]),
        ("GPUCACHE.BOOK", vec!["a3", "b1", "alice", "60"]),
        ("GPUCACHE.GET", vec!["a2"]),
        // busy is never set by hand, not even on a busy GPU.
        ("GPUCACHE.STATUS", vec!["a2", "busy"]),
        // Two more bookings of A100: 2 of 5 listed is below 50% (x1.2), then 1 of 5 (x1.5).
        ("GPUCACHE.BOOK", vec!["a3", "b3", "carol", "5400"]),
        ("GPUCACHE.BOOK", vec!["a4", "b4", "dave", "61"]),
        ("GPUCACHE.GET", vec!["a1"]),
        ("GPUCACHE.ORDERBOOK", vec!["A100"]),
        ("GPUCACHE.AVAILABLE", vec!["LIMIT", "100"]),
        ("GPUCACHE.STATUS", vec!["a2", "available"]),
        ("GPUCACHE.STATUS", vec!["a1", "busy"]),
        ("GPUCACHE.STATUS", vec!["a5", "maintenance"]),
        ("GPUCACHE.STATUS", vec!["a5", "MAINTENANCE"]),
        ("GPUCACHE.BOOK", vec!["a5", "b5", "erin", "60"]),
        ("GPUCACHE.STATUS", vec!["a5", "offline"]),
        ("GPUCACHE.PRICE", vec!["A100", "2.75"]),
        ("GPUCACHE.PRICE", vec!["A100", "2.8"]),
        ("GPUCACHE.GET", vec!["a1"]),
        ("GPUCACHE.ORDERBOOK", vec!["A100"]),
        ("GPUCACHE.AVAILABLE", vec![]),
        ("GPUCACHE.CANCEL", vec!["b1"]),
        ("GPUCACHE.CANCEL", vec!["b1"]),
        ("GPUCACHE.STATUS", vec!["a5", "available"]),
        ("GPUCACHE.BOOK", vec!["a2", "b6", "frank", "3600"]),
        ("GPUCACHE.CANCEL", vec!["b3"]),
        ("GPUCACHE.PRICE", vec!["L4", "0.6"]),
        ("GPUCACHE.PRICE", vec!["NEWTYPE", "1"]),
        ("GPUCACHE.BOOK", vec!["l1", "b7", "gina", "600"]),
        ("GPUCACHE.ORDERBOOK", vec!["L4", "DEPTH", "1"]),
        ("GPUCACHE.ORDERBOOK", vec!["nope"]),
        ("GPUCACHE.GET", vec!["h1"]),
        ("GPUCACHE.AVAILABLE", vec!["LIMIT", "2"]),
        // Refusals.
        ("GPUCACHE.GET", vec!["missing"]),
        ("GPUCACHE.GET", vec!["bad id"]),
        ("GPUCACHE.GET", vec![""]),
        ("GPUCACHE.GET", vec!["a1", "extra"]),
        ("GPUCACHE.BOOK", vec!["missing", "b9", "u", "60"]),
        ("GPUCACHE.BOOK", vec!["a1", "b9", "u", "0"]),
        ("GPUCACHE.BOOK", vec!["a1", "b9", "u", "+5"]),
        (
            "GPUCACHE.BOOK",
            vec!["a1", "b9", "u", "99999999999999999999"],
        ),
        ("GPUCACHE.BOOK", vec!["a1", "b9", "u", "31622401"]),
        ("GPUCACHE.BOOK", vec!["a1", "b{9}", "u", "60"]),
        ("GPUCACHE.CANCEL", vec!["never"]),
        ("GPUCACHE.STATUS", vec!["a1", "asleep"]),
        ("GPUCACHE.PRICE", vec!["A100", "nan"]),
        ("GPUCACHE.PRICE", vec!["A100", "2."]),
        ("GPUCACHE.PRICE", vec!["A100", "1000000.000001"]),
        ("GPUCACHE.PRICE", vec!["A100", "0.0000001"]),
        ("GPUCACHE.AVAILABLE", vec!["LIMIT", "0"]),
        ("GPUCACHE.AVAILABLE", vec!["LIMIT"]),
        ("GPUCACHE.AVAILABLE", vec!["BOGUS", "1"]),
        ("GPUCACHE.AVAILABLE", vec!["SORT", "BEST"]),
        ("GPUCACHE.AVAILABLE", vec!["LIMIT", "5", "LIMIT", "1"]),
        (
            "GPUCACHE.AVAILABLE",
            vec!["limit", "5", "SORT", "SCORE", "Limit", "1"],
        ),
        ("GPUCACHE.AVAILABLE", vec!["SORT", "SCORE", "sort", "PRICE"]),
        (
            "GPUCACHE.ORDERBOOK",
            vec!["A100", "DEPTH", "2", "depth", "3"],
        ),
        ("GPUCACHE.ORDERBOOK", vec!["A100", "DEPTH"]),
        ("GPUCACHE.ORDERBOOK", vec!["A100", "DEPTH", "1001"]),
        ("GPUCACHE.ORDERBOOK", vec!["A100", "WIDTH", "3"]),
    ];
    for (command, args) in &steps {
        twin.step(con, command, args)?;
    }

    // A provider going offline (PROVIDER has no script: the module does it on both regions).
    twin.both(con, &["GPUCACHE.PROVIDER", "REGION", "pc", "offline"])?;
    let steps: Vec<(&str, Vec<&str>)> = vec![
        ("GPUCACHE.BOOK", vec!["h2", "b8", "hank", "60"]),
        ("GPUCACHE.GET", vec!["h2"]),
        ("GPUCACHE.STATUS", vec!["h2", "maintenance"]),
        ("GPUCACHE.STATUS", vec!["h2", "available"]),
        ("GPUCACHE.CANCEL", vec!["b7"]),
        ("GPUCACHE.AVAILABLE", vec![]),
        ("GPUCACHE.AVAILABLE", vec!["SORT", "SCORE"]),
    ];
    for (command, args) in &steps {
        twin.step(con, command, args)?;
    }
    twin.both(con, &["GPUCACHE.PROVIDER", "REGION", "pc", "online"])?;

    // Keys of a foreign type are refused before any write.
    twin.both(con, &["SET", "gpucache:{REGION}:provider-gpus:pa", "x"])?;
    twin.step(con, "GPUCACHE.BOOK", &["a1", "b10", "ivy", "60"])?;
    twin.step(con, "GPUCACHE.STATUS", &["a1", "offline"])?;
    twin.both(con, &["DEL", "gpucache:{REGION}:provider-gpus:pa"])?;
    twin.both(
        con,
        &[
            "SADD",
            "gpucache:{REGION}:provider-gpus:pa",
            "a1",
            "a2",
            "h1",
        ],
    )?;
    twin.both(con, &["SET", "gpucache:{REGION}:booking:b11", "x"])?;
    twin.step(con, "GPUCACHE.BOOK", &["a1", "b11", "ivy", "60"])?;
    twin.step(con, "GPUCACHE.CANCEL", &["b11"])?;
    twin.both(con, &["DEL", "gpucache:{REGION}:booking:b11"])?;
    // Keys the scripts guard with TYPE rather than meet in a read first.
    for (key, command, args) in [
        ("stats:24h", "GPUCACHE.BOOK", vec!["a1", "b13", "kim", "60"]),
        (
            "avail-score:A100",
            "GPUCACHE.STATUS",
            vec!["a1", "maintenance"],
        ),
        ("stats:market", "GPUCACHE.CANCEL", vec!["b6"]),
        ("stats:market", "GPUCACHE.PRICE", vec!["A100", "3"]),
        ("events", "GPUCACHE.PRICE", vec!["A100", "3"]),
        ("index:bookings", "GPUCACHE.CANCEL", vec!["b6"]),
        (
            "index:booking-ends",
            "GPUCACHE.BOOK",
            vec!["a1", "b13", "kim", "60"],
        ),
        ("index:booking-ends", "GPUCACHE.CANCEL", vec!["b6"]),
        ("index:booking-ends", "GPUCACHE.PRICE", vec!["A100", "3"]),
        ("avail-own:H100", "GPUCACHE.STATUS", vec!["h2", "offline"]),
    ] {
        let full = format!("gpucache:{{REGION}}:{key}");
        let aside = format!("verify-aside:{{REGION}}:{key}");
        twin.both(con, &["RENAME", &full, &aside])?;
        twin.both(con, &["SET", &full, "x"])?;
        let result = twin.step(con, command, &args);
        twin.both(con, &["DEL", &full])?;
        twin.both(con, &["RENAME", &aside, &full])?;
        let reply = result?;
        if !reply.contains("WRONGTYPE") {
            return Err(format!("{command} with {key} of a foreign type: {reply}"));
        }
    }
    // A booking whose record vanished while the registry still lists it (deleted by hand, or
    // evicted): reusing its id repairs it first. The GPU holding it keeps a copy of the terms,
    // so the booking is rebuilt and its GPU stays booked: the same id for another GPU is
    // refused, the same request again is answered `existing`.
    twin.step(con, "GPUCACHE.BOOK", &["h1", "b20", "max", "600"])?;
    twin.step(con, "GPUCACHE.GET", &["h1"])?;
    twin.both(con, &["DEL", "gpucache:{REGION}:booking:b20"])?;
    twin.step(con, "GPUCACHE.BOOK", &["a1", "b20", "max", "600"])?;
    twin.both(con, &["DEL", "gpucache:{REGION}:booking:b20"])?;
    twin.step(con, "GPUCACHE.BOOK", &["h1", "b20", "max", "600"])?;
    twin.step(con, "GPUCACHE.GET", &["h1"])?;
    twin.step(con, "GPUCACHE.CANCEL", &["b20"])?;
    // A GPU record without the copy (as written before copies were kept): the vanished booking
    // ends and releases its GPU, and the id is free again.
    twin.step(con, "GPUCACHE.BOOK", &["h1", "b21", "max", "600"])?;
    twin.both(con, &["DEL", "gpucache:{REGION}:booking:b21"])?;
    twin.both(
        con,
        &[
            "HDEL",
            "gpucache:{REGION}:gpu:h1",
            "booking_user",
            "booking_price",
            "booking_duration_s",
            "booking_start_ms",
            "booking_end_ms",
        ],
    )?;
    twin.step(con, "GPUCACHE.GET", &["h1"])?;
    twin.step(con, "GPUCACHE.BOOK", &["a1", "b21", "max", "600"])?;
    twin.step(con, "GPUCACHE.CANCEL", &["b21"])?;
    twin.step(con, "GPUCACHE.GET", &["h1"])?;
    // Bookings whose time is up before the booking clock ended them (their end moved into the
    // past by hand; the clock's index still has the real end): CANCEL finds none, and BOOK ends
    // them first, as the clock would, when it reuses the id or books the GPU.
    twin.step(con, "GPUCACHE.BOOK", &["h1", "b30", "olga", "600"])?;
    twin.both(
        con,
        &["HSET", "gpucache:{REGION}:booking:b30", "end_ms", "1000"],
    )?;
    twin.step(con, "GPUCACHE.CANCEL", &["b30"])?;
    twin.step(con, "GPUCACHE.GET", &["h1"])?;
    twin.step(con, "GPUCACHE.BOOK", &["a1", "b30", "olga", "600"])?;
    twin.step(con, "GPUCACHE.BOOK", &["h1", "b31", "pat", "600"])?;
    // (Its record and its GPU's copy now disagree on the user: GET shows the copy's, the end
    // shows the record's.)
    twin.both(
        con,
        &[
            "HSET",
            "gpucache:{REGION}:booking:b31",
            "end_ms",
            "1000",
            "user",
            "pat2",
        ],
    )?;
    twin.step(con, "GPUCACHE.GET", &["h1"])?;
    twin.step(con, "GPUCACHE.BOOK", &["h1", "b32", "quinn", "120"])?;
    // The same through the GPU's copy of the terms, the booking record gone.
    twin.step(con, "GPUCACHE.BOOK", &["l1", "b33", "rita", "600"])?;
    twin.both(con, &["DEL", "gpucache:{REGION}:booking:b33"])?;
    twin.both(
        con,
        &["HSET", "gpucache:{REGION}:gpu:l1", "booking_end_ms", "1000"],
    )?;
    twin.step(con, "GPUCACHE.BOOK", &["l1", "b34", "sam", "120"])?;
    twin.step(con, "GPUCACHE.BOOK", &["l2", "b35", "tom", "600"])?;
    twin.both(con, &["DEL", "gpucache:{REGION}:booking:b35"])?;
    twin.both(
        con,
        &["HSET", "gpucache:{REGION}:gpu:l2", "booking_end_ms", "1000"],
    )?;
    twin.step(con, "GPUCACHE.BOOK", &["a3", "b35", "tom", "600"])?;
    for booking in ["b30", "b32", "b34", "b35"] {
        twin.step(con, "GPUCACHE.CANCEL", &[booking])?;
    }
    // A lost sequence resumes where the event stream's newest entry recorded it.
    twin.both(con, &["HDEL", "gpucache:{REGION}:stats:market", "seq"])?;
    twin.step(con, "GPUCACHE.STATUS", &["a1", "maintenance"])?;
    twin.step(con, "GPUCACHE.STATUS", &["a1", "available"])?;
    // A 24-hour window holding more than a day of old buckets: the next booking prunes them.
    let mut old_buckets = vec!["HSET".to_owned(), "gpucache:{REGION}:stats:24h".to_owned()];
    for bucket in 1000..1110 {
        old_buckets.extend([format!("count:{bucket}"), "1".into()]);
        old_buckets.extend([format!("volume:{bucket}"), "1000".into()]);
    }
    let refs: Vec<&str> = old_buckets.iter().map(String::as_str).collect();
    twin.both(con, &refs)?;
    twin.step(con, "GPUCACHE.BOOK", &["l1", "b14", "lee", "120"])?;
    twin.step(con, "GPUCACHE.CANCEL", &["b14"])?;
    twin.both(con, &["HDEL", "gpucache:{REGION}:gpu:l2", "price"])?;
    twin.step(con, "GPUCACHE.GET", &["l2"])?;
    twin.step(con, "GPUCACHE.BOOK", &["l2", "b12", "jo", "60"])?;
    twin.both(con, &["HSET", "gpucache:{REGION}:gpu:l2", "price", "0.55"])?;
    twin.step(con, "GPUCACHE.BOOK", &["l2", "b12", "jo", "60"])?;
    twin.step(con, "GPUCACHE.CANCEL", &["b12"])?;

    // A tie larger than the module's look-ahead (it walks that score again, ascending), in two
    // types, registered in scrambled order, between a better and a worse score.
    for n in 0..40usize {
        let id = format!("s{:02}", (n * 17) % 40);
        let gpu_type = if n % 3 == 0 { "S2" } else { "S1" };
        let score = match n {
            5 => "8.25",
            6 => "1",
            _ => "7.5",
        };
        twin.both(
            con,
            &[
                "GPUCACHE.REGISTER",
                "REGION",
                &id,
                "PROVIDER",
                "pa",
                "TYPE",
                gpu_type,
                "PRICE",
                "1.5",
                "SCORE",
                score,
            ],
        )?;
    }
    for limit in ["5", "30", "100"] {
        let reply = twin.step(
            con,
            "GPUCACHE.AVAILABLE",
            &["SORT", "SCORE", "LIMIT", limit],
        )?;
        if limit == "100" {
            let ids: Vec<&str> = reply
                .split("gpu_id ")
                .skip(1)
                .filter_map(|rest| rest.split(' ').next())
                .collect();
            let tie: Vec<&str> = ids
                .iter()
                .copied()
                .filter(|id| id.starts_with('s'))
                .collect();
            let mut sorted = tie[1..tie.len().saturating_sub(1)].to_vec();
            sorted.sort_unstable();
            if tie.len() != 40 || tie[1..39] != sorted[..] {
                return Err(format!(
                    "SORT SCORE: the tie is not in GPU id order: {ids:?}"
                ));
            }
        }
    }
    twin.step(con, "GPUCACHE.AVAILABLE", &["LIMIT", "100"])?;

    check_clean(con, &twin.module_region)?;
    check_clean(con, &twin.lua_region)?;
    println!(
        "verify: {} steps, module and Lua replies, stream events and region contents identical",
        twin.steps
    );
    // The twin regions are left out of the benchmark regions; drop them.
    for region in [&twin.module_region, &twin.lua_region] {
        let pattern = format!("gpucache:{{{region}}}:*");
        if let Value::Array(keys) = ok(con, &["KEYS", &pattern])? {
            for key in keys {
                ok(con, &["DEL", &text(&key)])?;
            }
        }
    }
    Ok(())
}

/// Writes on a region whose market counters are gone, or whose sequence is lost with no record
/// of it in the event stream, are refused alike (`CORRUPT ...`) by the module and the scripts.
/// The module also queues a repair of its region, which then runs at once, so every command is
/// tried on a fresh pair of regions; the module's repair is waited for before both are dropped.
fn verify_damaged(con: &mut redis::Connection, tag: &str) -> Res<()> {
    let shas = load_scripts(con)?;
    let damages: [(&str, &[&[&str]]); 2] = [
        ("counters gone", &[&["DEL", "gpucache:{R}:stats:market"]]),
        (
            "sequence lost",
            &[
                &["HDEL", "gpucache:{R}:stats:market", "seq"],
                &["DEL", "gpucache:{R}:events"],
            ],
        ),
    ];
    let commands: [(&str, &str, &[&str]); 4] = [
        ("GPUCACHE.STATUS", &shas.status, &["g1", "maintenance"]),
        ("GPUCACHE.PRICE", &shas.price, &["T", "2"]),
        ("GPUCACHE.BOOK", &shas.book, &["g1", "b2", "u", "60"]),
        ("GPUCACHE.CANCEL", &shas.cancel, &["b1"]),
    ];
    let mut compared = 0;
    for (d, (damage, writes)) in damages.iter().enumerate() {
        for (c, (command, sha, args)) in commands.iter().enumerate() {
            let m = format!("verify-dm{d}{c}-{tag}");
            let l = format!("verify-dl{d}{c}-{tag}");
            for region in [&m, &l] {
                for gpu in ["g1", "g2"] {
                    let register = [
                        "GPUCACHE.REGISTER",
                        region,
                        gpu,
                        "PROVIDER",
                        "p",
                        "TYPE",
                        "T",
                        "PRICE",
                        "1",
                    ];
                    ok(con, &register)?;
                }
                ok(con, &["GPUCACHE.BOOK", region, "g2", "b1", "u", "600"])?;
                for write in writes.iter() {
                    let args: Vec<String> = write
                        .iter()
                        .map(|a| a.replace("{R}", &format!("{{{region}}}")))
                        .collect();
                    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
                    ok(con, &refs)?;
                }
            }
            let mut module_args = vec![*command, m.as_str()];
            module_args.extend_from_slice(args);
            let mut lua_args = vec!["EVALSHA", sha, "1", l.as_str()];
            lua_args.extend_from_slice(args);
            let module_reply = error_text(&query(con, &module_args)?).unwrap_or_default();
            let lua_reply = error_text(&query(con, &lua_args)?)
                .unwrap_or_default()
                .replace(&l, &m);
            let what = format!("{command} {} ({damage})", args.join(" "));
            if !module_reply.starts_with("CORRUPT") || module_reply != lua_reply {
                return Err(format!(
                    "{what}: replies differ or are not CORRUPT\n  module: {module_reply}\n  lua:    {lua_reply}"
                ));
            }
            // The module's queued repair puts the sequence (and the counters) back.
            let stats = format!("gpucache:{{{m}}}:stats:market");
            let deadline = Instant::now() + std::time::Duration::from_secs(10);
            while int(&ok(con, &["HEXISTS", &stats, "seq"])?) != 1 {
                if Instant::now() > deadline {
                    return Err(format!("{what}: the module's region was not repaired"));
                }
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            for region in [&m, &l] {
                let pattern = format!("gpucache:{{{region}}}:*");
                if let Value::Array(keys) = ok(con, &["KEYS", &pattern])? {
                    for key in keys {
                        ok(con, &["DEL", &text(&key)])?;
                    }
                }
            }
            compared += 1;
        }
    }
    println!("verify: {compared} writes on damaged regions refused alike (CORRUPT)");
    Ok(())
}

fn verify(o: &Opts) -> Res<()> {
    let mut con = o.connect()?;
    let tag = format!(
        "{:x}",
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis())
            % 0xffff_ffff
    );
    // Without jitter both sides draw the same TTLs, so expiry rules can be compared to the
    // millisecond; the server's jitter is restored afterwards.
    let jitter = text(
        fields(&ok(&mut con, &["CONFIG", "GET", "gpucache.jitter"])?)
            .get("gpucache.jitter")
            .ok_or("CONFIG GET gpucache.jitter: missing")?,
    );
    // The twin regions live in a database of their own (empty, so that listing their keys
    // stays cheap however large the benchmark's marketplace is).
    let mut twin_con = o.connect()?;
    ok(&mut twin_con, &["SELECT", &o.verify_db.to_string()])?;
    if int(&ok(&mut twin_con, &["DBSIZE"])?) != 0 {
        return Err(format!(
            "database {} is not empty (--verify-db)",
            o.verify_db
        ));
    }
    ok(&mut con, &["CONFIG", "SET", "gpucache.jitter", "0"])?;
    let twins = verify_twins(&mut twin_con, &tag);
    ok(&mut con, &["CONFIG", "SET", "gpucache.jitter", &jitter])?;
    twins?;
    verify_damaged(&mut twin_con, &tag)?;
    let shas = load_scripts(&mut con)?;

    // Reads on the loaded marketplace: identical replies.
    let mut compared = 0;
    for r in 0..o.regions {
        let region = region_name(r);
        for sort in ["PRICE", "SCORE"] {
            for limit in ["10", "100"] {
                let args = ["SORT", sort, "LIMIT", limit];
                let mut module_args = vec!["GPUCACHE.AVAILABLE", region.as_str()];
                module_args.extend(args);
                let mut lua_args = vec!["EVALSHA", shas.available.as_str(), "1", region.as_str()];
                lua_args.extend(args);
                let m = ok(&mut con, &module_args)?;
                let l = ok(&mut con, &lua_args)?;
                if m != l {
                    return Err(format!(
                        "AVAILABLE {region} SORT {sort} LIMIT {limit} differs"
                    ));
                }
                compared += 1;
            }
        }
        for t in 0..o.types {
            let gpu_type = type_name(t);
            let m = ok(&mut con, &["GPUCACHE.ORDERBOOK", &region, &gpu_type])?;
            let l = ok(
                &mut con,
                &["EVALSHA", &shas.orderbook, "1", &region, &gpu_type],
            )?;
            if m != l {
                return Err(format!("ORDERBOOK {region} {gpu_type} differs"));
            }
            compared += 1;
        }
    }
    for i in (0..o.gpus).step_by((o.gpus / 50).max(1)) {
        let g = gpu_at(o, i);
        let m = ok(&mut con, &["GPUCACHE.GET", &g.region, &g.id])?;
        let l = ok(&mut con, &["EVALSHA", &shas.get, "1", &g.region, &g.id])?;
        if normal_reply(&m, "", "") != normal_reply(&l, "", "") {
            return Err(format!("GET {} {} differs", g.region, g.id));
        }
        compared += 1;
    }
    println!("verify: {compared} reads on the loaded regions identical");

    // Mixed: a Lua booking cancelled by the module and the reverse keep every invariant.
    let (a, b) = (gpu_at(o, o.gpus - 1), gpu_at(o, o.gpus.saturating_sub(2)));
    let id_a = format!("verify-a-{tag}");
    let id_b = format!("verify-b-{tag}");
    ok(
        &mut con,
        &[
            "EVALSHA", &shas.book, "1", &a.region, &a.id, &id_a, "v", "60",
        ],
    )?;
    ok(&mut con, &["GPUCACHE.CANCEL", &a.region, &id_a])?;
    ok(
        &mut con,
        &["GPUCACHE.BOOK", &b.region, &b.id, &id_b, "v", "60"],
    )?;
    ok(&mut con, &["EVALSHA", &shas.cancel, "1", &b.region, &id_b])?;
    ok(
        &mut con,
        &["EVALSHA", &shas.status, "1", &a.region, &a.id, "offline"],
    )?;
    ok(
        &mut con,
        &["GPUCACHE.STATUS", &a.region, &a.id, "available"],
    )?;
    for r in 0..o.regions {
        check_clean(&mut con, &region_name(r))?;
    }
    println!("verify: Lua BOOK + module CANCEL, module BOOK + Lua CANCEL: GPUCACHE.CHECK clean");
    Ok(())
}
