//! `gpucache-edge bench`: invalidation propagation from a writer to another process's L1,
//! next to the floor (plain HSET → raw keyspace notification on a bare subscriber), and the
//! L1's hit latency — all in one run against one server.

use super::{connect, read_report, AnyResult, TlsArgs};
use gpucache_edge::{keyspace, Edge, EdgeConfig, L1Config, Query, Source, L1};
use redis::Connection;
use std::collections::HashMap;
use std::io::{BufRead, BufReader, BufWriter, Read, Write};
use std::process::{Command, Stdio};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

#[derive(clap::Args)]
pub struct BenchArgs {
    #[arg(long, default_value = "redis://127.0.0.1:6379/")]
    url: String,
    /// Region the benchmark registers its GPUs in (its own: it books and reprices them).
    #[arg(long, default_value = "edge-bench")]
    region: String,
    #[arg(long, default_value_t = 2000)]
    gpus: usize,
    /// Measured writes per series (module writes; the same number of floor HSETs).
    #[arg(long, default_value_t = 10_000)]
    events: usize,
    /// Writes per second (a steady, open-loop schedule).
    #[arg(long, default_value_t = 2000)]
    rate: u64,
    /// L1 reads per thread in the hit-latency measurement.
    #[arg(long, default_value_t = 2_000_000)]
    hits: usize,
    #[command(flatten)]
    tls: TlsArgs,
}

#[derive(clap::Args)]
pub struct FollowArgs {
    #[arg(long)]
    url: String,
    #[arg(long)]
    region: String,
    #[arg(long)]
    gpus: usize,
    #[arg(long)]
    floor_prefix: String,
    #[command(flatten)]
    tls: TlsArgs,
}

const TYPES: usize = 8;

fn now_ns() -> i128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as i128)
        .unwrap_or(0)
}

fn gpu_id(i: usize) -> String {
    format!("eb-{i}")
}

/// The follower: an L1 holding every benchmark GPU, reporting `key \t ns \t source` for each
/// invalidation, plus a bare subscriber reporting the floor's raw notifications.
pub fn follow(args: &FollowArgs) -> AnyResult {
    let (report, lines) = mpsc::channel::<String>();
    let writer = std::thread::spawn(move || {
        let mut out = BufWriter::new(std::io::stdout().lock());
        for line in lines {
            if line == "done" {
                break;
            }
            let _ = writeln!(out, "{line}");
            if line.starts_with("ready") {
                let _ = out.flush();
            }
        }
        let _ = out.flush();
    });
    let hook_report = std::sync::Mutex::new(report.clone());
    let hook: gpucache_edge::InvalidationHook = Arc::new(move |key: &str, source: Source| {
        let when = now_ns();
        if let Ok(report) = hook_report.lock() {
            let _ = report.send(format!("{key}\t{when}\t{source:?}"));
        }
    });
    let mut config = EdgeConfig::new(&args.url, &[&args.region]);
    config.tls = args.tls.config();
    config.l1.max_entries = (args.gpus as u64).max(1) * 2;
    let edge = Edge::start_with_hook(config, Some(hook))?;
    if !edge.wait_connected(Duration::from_secs(10)) {
        return Err("follower: links did not come up".into());
    }
    for i in 0..args.gpus {
        edge.get(&Query::gpu(&args.region, &gpu_id(i)))?;
    }

    let (mut bare, db) = connect(&args.url, &args.tls.config())?;
    let pattern = format!("__keyspace@{db}__:{}*", args.floor_prefix);
    let floor_report = report.clone();
    std::thread::spawn(move || -> Result<(), redis::RedisError> {
        let mut pubsub = bare.as_pubsub();
        pubsub.psubscribe(&pattern)?;
        loop {
            let message = pubsub.get_message()?;
            let when = now_ns();
            if let Some(key) = keyspace::key_of_channel(message.get_channel_name()) {
                let _ = floor_report.send(format!("{key}\t{when}\tfloor"));
            }
        }
    });
    // Let the bare subscription settle before announcing readiness.
    std::thread::sleep(Duration::from_millis(200));
    report.send("ready\t0\t".into())?;
    // Runs until the benchmark closes our stdin.
    let _ = std::io::stdin().read_to_end(&mut Vec::new());
    report.send("done".into())?;
    let _ = writer.join();
    std::process::exit(0);
}

struct TimedWrite {
    series: &'static str,
    key: String,
    sent: i128,
    replied: i128,
}

fn paced<F: FnMut(usize) -> Option<TimedWrite>>(
    count: usize,
    rate: u64,
    mut op: F,
) -> Vec<TimedWrite> {
    let start = Instant::now();
    let interval = Duration::from_nanos(1_000_000_000 / rate.max(1));
    let mut writes = Vec::with_capacity(count);
    for i in 0..count {
        let due = start + interval * (i as u32);
        while Instant::now() < due {
            std::hint::spin_loop();
        }
        if let Some(w) = op(i) {
            writes.push(w);
        }
    }
    writes
}

fn timed(con: &mut Connection, series: &'static str, key: String, cmd: &redis::Cmd) -> TimedWrite {
    let sent = now_ns();
    let ok = cmd.query::<redis::Value>(con).is_ok();
    let replied = now_ns();
    TimedWrite {
        series: if ok { series } else { "error" },
        key,
        sent,
        replied,
    }
}

pub fn run(args: &BenchArgs) -> AnyResult {
    let (mut con, db) = connect(&args.url, &args.tls.config())?;
    let region = args.region.as_str();
    let floor_prefix = format!("gpucache-floor:{{{region}}}:");
    let old_notify: Vec<String> = redis::cmd("CONFIG")
        .arg("GET")
        .arg("notify-keyspace-events")
        .query(&mut con)?;
    redis::cmd("CONFIG")
        .arg("SET")
        .arg("notify-keyspace-events")
        .arg("Kdh")
        .query::<()>(&mut con)?;
    println!("== setup: {} GPUs in region {region} (db {db})", args.gpus);
    let mut pipe = redis::pipe();
    for i in 0..args.gpus {
        pipe.cmd("GPUCACHE.REGISTER")
            .arg(region)
            .arg(gpu_id(i))
            .arg("PROVIDER")
            .arg("edge-bench")
            .arg("TYPE")
            .arg(format!("T{}", i % TYPES))
            .arg("PRICE")
            .arg(format!("1.{:02}", i % 100))
            .ignore();
    }
    pipe.query::<()>(&mut con)?;

    let mut follower = Command::new(std::env::current_exe()?)
        .args(["follow", "--url", &args.url, "--region", region])
        .args([
            "--gpus",
            &args.gpus.to_string(),
            "--floor-prefix",
            &floor_prefix,
        ])
        .args(args.tls.to_args())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()?;
    let stdout = follower.stdout.take().ok_or("follower stdout")?;
    let (ready_tx, ready_rx) = mpsc::channel();
    let collector = std::thread::spawn(move || {
        let mut reader = BufReader::new(stdout);
        let mut first = String::new();
        let _ = reader.read_line(&mut first);
        let _ = ready_tx.send(first.starts_with("ready"));
        read_report(reader)
    });
    if !ready_rx
        .recv_timeout(Duration::from_secs(60))
        .unwrap_or(false)
    {
        let _ = follower.kill();
        return Err("follower did not start".into());
    }

    println!(
        "== propagation: {} module writes, then {} plain HSETs, at {}/s",
        args.events, args.events, args.rate
    );
    let run_id = std::process::id();
    let gpus = args.gpus.max(1);
    let mut writes = paced(args.events, args.rate, |i| {
        // Every fifth write reprices a type; the rest book, then (a round later) cancel, each
        // GPU in turn, so one key's writes are a whole round apart.
        if i % 5 == 4 {
            let gpu_type = format!("T{}", (i / 5) % TYPES);
            let mut cmd = redis::cmd("GPUCACHE.PRICE");
            cmd.arg(region)
                .arg(&gpu_type)
                .arg(format!("{}.{:02}", 2 + i % 3, i % 100));
            let key = format!("gpucache:{{{region}}}:price:{gpu_type}");
            return Some(timed(&mut con, "PRICE", key, &cmd));
        }
        let n = i - i / 5;
        let (round, slot) = (n / gpus, n % gpus);
        let gpu = gpu_id(slot);
        let key = keyspace::gpu_key(region, &gpu);
        let booking = format!("eb-{run_id}-{slot}");
        let mut cmd;
        if round % 2 == 0 {
            cmd = redis::cmd("GPUCACHE.BOOK");
            cmd.arg(region)
                .arg(&gpu)
                .arg(&booking)
                .arg("bench")
                .arg(3600);
            Some(timed(&mut con, "BOOK", key, &cmd))
        } else {
            cmd = redis::cmd("GPUCACHE.CANCEL");
            cmd.arg(region).arg(&booking);
            Some(timed(&mut con, "CANCEL", key, &cmd))
        }
    });
    writes.extend(paced(args.events, args.rate, |i| {
        let key = format!("{floor_prefix}{}", i % gpus);
        let mut cmd = redis::cmd("HSET");
        cmd.arg(&key).arg("f").arg(i);
        Some(timed(&mut con, "HSET", key, &cmd))
    }));
    // Leave the GPUs free for the next run.
    for slot in 0..gpus {
        let _: redis::RedisResult<redis::Value> = redis::cmd("GPUCACHE.CANCEL")
            .arg(region)
            .arg(format!("eb-{run_id}-{slot}"))
            .query(&mut con);
    }
    std::thread::sleep(Duration::from_millis(500)); // stragglers reach the follower
    drop(follower.stdin.take());
    let reports = collector.join().map_err(|_| "collector failed")?;
    let _ = follower.wait();

    print_propagation(&writes, &reports);
    redis::cmd("CONFIG")
        .arg("SET")
        .arg("notify-keyspace-events")
        .arg(old_notify.get(1).map(String::as_str).unwrap_or(""))
        .query::<()>(&mut con)?;

    hit_latency(&mut con, region, gpus, args.hits)?;
    Ok(())
}

/// For each write, the first report of its key after it was sent and before the key's next
/// write was sent.
fn print_propagation(writes: &[TimedWrite], reports: &[(String, i128, String)]) {
    let mut by_key: HashMap<&str, Vec<(i128, &str)>> = HashMap::new();
    for (key, when, source) in reports {
        by_key.entry(key).or_default().push((*when, source));
    }
    for list in by_key.values_mut() {
        list.sort();
    }
    let mut next_send: HashMap<&str, i128> = HashMap::new();
    // Per series: latencies after the reply, after the send, misses, first via notification.
    type Series = (Vec<i128>, Vec<i128>, usize, usize);
    let mut samples: HashMap<&str, Series> = HashMap::new();
    for w in writes.iter().rev() {
        let until = next_send.get(w.key.as_str()).copied().unwrap_or(i128::MAX);
        next_send.insert(&w.key, w.sent);
        let series = if w.series == "HSET" {
            "floor: HSET -> raw notification"
        } else if w.series == "error" {
            "errors"
        } else {
            "gpucache write -> L1 invalidated"
        };
        let entry = samples.entry(series).or_default();
        let first = by_key
            .get(w.key.as_str())
            .and_then(|l| l.iter().find(|(t, _)| *t >= w.sent && *t < until));
        match first {
            Some((t, source)) => {
                entry.0.push(t - w.replied);
                entry.1.push(t - w.sent);
                if *source == "Notification" || *source == "floor" {
                    entry.3 += 1;
                }
            }
            None => entry.2 += 1,
        }
    }
    println!(
        "{:<34} {:>6} {:>6} | after reply (µs): {:>7} {:>7} {:>8} | after send: {:>7} {:>7} | {:>9}",
        "series", "n", "missed", "p50", "p99", "max", "p50", "p99", "via notif"
    );
    let mut names: Vec<_> = samples.keys().copied().collect();
    names.sort();
    for name in names {
        let (mut reply, mut send, missed, via_notification) =
            samples.remove(name).unwrap_or_default();
        reply.sort();
        send.sort();
        let pct = |lat: &[i128], p: f64| -> String {
            let Some(last) = lat.len().checked_sub(1) else {
                return "-".into();
            };
            let idx = ((last as f64) * p).round() as usize;
            format!("{:.1}", lat[idx.min(last)] as f64 / 1000.0)
        };
        println!(
            "{:<34} {:>6} {:>6} |                   {:>7} {:>7} {:>8} |             {:>7} {:>7} | {:>8.1}%",
            name,
            reply.len(),
            missed,
            pct(&reply, 0.50),
            pct(&reply, 0.99),
            pct(&reply, 1.0),
            pct(&send, 0.50),
            pct(&send, 0.99),
            100.0 * via_notification as f64 / reply.len().max(1) as f64
        );
    }
    println!("(negative: the invalidation landed before the writer had read its reply)");
}

/// Hit latency of the L1 itself (1 thread) and hits/s for 1 and 2 threads: medians of
/// `HIT_ROUNDS` rounds alternating the two, since the machine may be shared.
fn hit_latency(con: &mut Connection, region: &str, gpus: usize, hits: usize) -> AnyResult {
    const HIT_ROUNDS: usize = 5;
    let l1 = Arc::new(L1::new(&L1Config::default(), None));
    l1.set_link(true);
    let queries: Arc<Vec<Query>> =
        Arc::new((0..gpus).map(|i| Query::gpu(region, &gpu_id(i))).collect());
    for q in queries.iter() {
        let reply: redis::Value = q.command().query(con)?;
        l1.get_or_load(q, |_| Ok(gpucache_edge::reply::to_json(reply)))?;
    }
    println!("== L1 hits ({gpus} GPU records cached, random keys, median of {HIT_ROUNDS} rounds)");
    let mut rates = [Vec::new(), Vec::new()];
    let mut missed = 0;
    for _ in 0..HIT_ROUNDS {
        for (threads, rate) in (1usize..).zip(rates.iter_mut()) {
            let start = Instant::now();
            let workers: Vec<_> = (0..threads)
                .map(|t| {
                    let (l1, queries) = (l1.clone(), queries.clone());
                    std::thread::spawn(move || {
                        let mut rng = fastrand::Rng::with_seed(t as u64 + 1);
                        let mut found = 0usize;
                        for _ in 0..hits {
                            let q = &queries[rng.usize(..queries.len())];
                            found += usize::from(l1.get(q).is_some());
                        }
                        found
                    })
                })
                .collect();
            let found: usize = workers.into_iter().map(|w| w.join().unwrap_or(0)).sum();
            let total = hits * threads;
            missed += total - found.min(total);
            rate.push(total as f64 / start.elapsed().as_secs_f64() / 1e6);
        }
    }
    let median = |rates: &mut Vec<f64>| {
        rates.sort_by(f64::total_cmp);
        rates.get(rates.len() / 2).copied().unwrap_or(f64::NAN)
    };
    let (one, two) = (median(&mut rates[0]), median(&mut rates[1]));
    println!("threads 1: {:.0} ns/hit, {one:.2} M hits/s", 1e3 / one);
    println!(
        "threads 2: {:.0} ns/hit per thread, {two:.2} M hits/s total, {:.2}x one thread",
        2e3 / two,
        two / one
    );
    println!("({missed} of {} reads missed)", hits * 3 * HIT_ROUNDS);
    Ok(())
}
