//! `gpucache-edge`: watch a region's invalidations, or measure how fast they reach an L1.
//!
//! ```text
//! gpucache-edge watch --region eu-west                 # notifications and stream events, live
//! gpucache-edge watch --url rediss://10.0.0.5:6380/ --tls-ca-file ca.pem --region eu-west
//! gpucache-edge watch --cluster 10.0.0.1:7000,10.0.0.2:7000 --region eu-west
//! gpucache-edge watch --sentinel 10.0.0.1:26379 --master-name gpucache --region eu-west
//! gpucache-edge bench --url redis://127.0.0.1:6379/   # propagation latency and L1 hit speed
//! ```

use clap::{Parser, Subcommand};
use gpucache_edge::{connect, keyspace, Edge, EdgeConfig, Servers, Source, TlsConfig};
use redis::{Connection, Value};
use std::collections::{BTreeMap, HashMap};
use std::io::{BufRead, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

mod bench;

#[derive(Parser)]
#[command(name = "gpucache-edge", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Print a region's keyspace notifications and event-stream entries as they arrive. With
    /// `--cluster` or `--sentinel`, run an edge that follows the region where it is served and
    /// print what it invalidates (`notify <key>`, `event <key>`, `drop <region>`) and where it
    /// follows each region (`follow <region> <host:port>`, `lost <region>`).
    Watch {
        /// The primary (or, with `--sentinel`, its user, password and database).
        #[arg(long, default_value = "redis://127.0.0.1:6379/")]
        url: String,
        /// Region to watch (repeatable).
        #[arg(long, required = true)]
        region: Vec<String>,
        #[command(flatten)]
        tls: TlsArgs,
        /// Follow a Redis Cluster found from these nodes (`host:port` or URLs, comma-separated).
        #[arg(long, value_delimiter = ',', conflicts_with = "sentinel")]
        cluster: Vec<String>,
        /// Follow the primary these Sentinels (`host:port` or URLs, comma-separated) name.
        #[arg(long, value_delimiter = ',', requires = "master_name")]
        sentinel: Vec<String>,
        /// The name the Sentinels monitor the primary under.
        #[arg(long)]
        master_name: Option<String>,
    },
    /// Measure invalidation propagation (writer → another process's L1) against the floor of a
    /// plain HSET → raw keyspace notification, and the L1's hit latency. Needs a server with
    /// gpucache loaded; writes into its own region (default `edge-bench`).
    Bench(bench::BenchArgs),
    /// The other process of `bench` (an L1 that reports each invalidation); not for direct use.
    #[command(hide = true)]
    Follow(bench::FollowArgs),
}

/// TLS for a `rediss://` URL (every connection the command opens).
#[derive(clap::Args, Clone, Default)]
pub struct TlsArgs {
    /// CA certificate(s) (PEM) to trust for a rediss:// URL, instead of the system's roots.
    #[arg(long)]
    tls_ca_file: Option<PathBuf>,
    /// Client certificate (PEM), for servers that verify clients (tls-auth-clients yes).
    #[arg(long, requires = "tls_key_file")]
    tls_cert_file: Option<PathBuf>,
    /// The client certificate's private key (PEM).
    #[arg(long, requires = "tls_cert_file")]
    tls_key_file: Option<PathBuf>,
}

impl TlsArgs {
    pub fn config(&self) -> TlsConfig {
        TlsConfig {
            ca_file: self.tls_ca_file.clone(),
            client_cert_file: self.tls_cert_file.clone(),
            client_key_file: self.tls_key_file.clone(),
        }
    }

    /// The same options as command-line arguments (for a child process).
    pub fn to_args(&self) -> Vec<std::ffi::OsString> {
        let mut args = Vec::new();
        for (flag, path) in [
            ("--tls-ca-file", &self.tls_ca_file),
            ("--tls-cert-file", &self.tls_cert_file),
            ("--tls-key-file", &self.tls_key_file),
        ] {
            if let Some(path) = path {
                args.push(flag.into());
                args.push(path.clone().into_os_string());
            }
        }
        args
    }
}

fn main() -> ExitCode {
    let result = match Cli::parse().command {
        Command::Watch {
            url,
            region,
            cluster,
            sentinel,
            master_name,
            tls,
        } => {
            if !cluster.is_empty() {
                let mut config = EdgeConfig::new(&url, &[]);
                config.tls = tls.config();
                config.url = as_url(&cluster[0]);
                config.servers = Servers::Cluster {
                    seeds: cluster.iter().map(|s| as_url(s)).collect(),
                };
                follow(config, region)
            } else if !sentinel.is_empty() {
                let mut config = EdgeConfig::new(&url, &[]);
                config.tls = tls.config();
                config.servers = Servers::Sentinel {
                    sentinels: sentinel.iter().map(|s| as_url(s)).collect(),
                    master_name: master_name.unwrap_or_default(),
                };
                follow(config, region)
            } else {
                watch(&url, &region, &tls.config())
            }
        }
        Command::Bench(args) => bench::run(&args),
        Command::Follow(args) => bench::follow(&args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("gpucache-edge: {e}");
            ExitCode::FAILURE
        }
    }
}

type AnyResult = Result<(), Box<dyn std::error::Error>>;

fn connect(url: &str, tls: &TlsConfig) -> Result<(Connection, i64), Box<dyn std::error::Error>> {
    let client = connect::client(url, tls)?;
    let db = client.get_connection_info().redis.db;
    Ok((connect::open(&client, None)?, db))
}

/// `host:port` as a URL; URLs as they are.
fn as_url(address: &str) -> String {
    if address.contains("://") {
        address.to_string()
    } else {
        format!("redis://{address}/")
    }
}

/// `watch` through an edge that follows each region where it is served.
fn follow(mut config: EdgeConfig, regions: Vec<String>) -> AnyResult {
    config.regions = regions;
    let hook: gpucache_edge::InvalidationHook = Arc::new(|key: &str, source: Source| {
        let line = match source {
            Source::Notification => format!("notify {key}"),
            Source::Stream => format!("event  {key}"),
            Source::RegionDrop => format!(
                "drop   {}",
                keyspace::parse_key(key).map_or(key, |k| k.region)
            ),
        };
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "{line}");
        let _ = out.flush();
    });
    let edge = Edge::start_with_hook(config, Some(hook))?;
    let mut shown: BTreeMap<String, String> = BTreeMap::new();
    loop {
        let now = edge.stats().followed_on;
        let mut out = std::io::stdout().lock();
        for (region, node) in &now {
            if shown.get(region) != Some(node) {
                writeln!(out, "follow {region} {node}")?;
            }
        }
        for region in shown.keys().filter(|r| !now.contains_key(*r)) {
            writeln!(out, "lost   {region}")?;
        }
        out.flush()?;
        drop(out);
        shown = now;
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn watch(url: &str, regions: &[String], tls: &TlsConfig) -> AnyResult {
    let (mut subscriber, db) = connect(url, tls)?;
    let (mut reader, _) = connect(url, tls)?;
    let mut ids: Vec<String> = vec!["$".to_string(); regions.len()];
    let streams: Vec<String> = regions.iter().map(|r| keyspace::events_key(r)).collect();
    let stream_thread = std::thread::spawn(move || -> Result<(), redis::RedisError> {
        loop {
            let mut cmd = redis::cmd("XREAD");
            cmd.arg("BLOCK")
                .arg(0)
                .arg("STREAMS")
                .arg(&streams)
                .arg(&ids);
            type Entries = Vec<(String, HashMap<String, Value>)>;
            let reply: Option<Vec<(String, Entries)>> = cmd.query(&mut reader)?;
            let mut out = std::io::stdout().lock();
            for (stream, entries) in reply.unwrap_or_default() {
                let Some(slot) = streams.iter().position(|s| *s == stream) else {
                    continue;
                };
                for (id, fields) in entries {
                    let payload = fields
                        .get("payload")
                        .and_then(|v| redis::from_redis_value::<String>(v).ok())
                        .unwrap_or_default();
                    let _ = writeln!(out, "event  {stream} {id} {payload}");
                    ids[slot] = id;
                }
            }
            let _ = out.flush();
        }
    });
    let mut pubsub = subscriber.as_pubsub();
    for region in regions {
        pubsub.psubscribe(keyspace::region_notification_pattern(db, region))?;
    }
    eprintln!(
        "watching {} (needs notify-keyspace-events with K and d, e.g. Kd)",
        regions.join(", ")
    );
    loop {
        if stream_thread.is_finished() {
            return match stream_thread.join() {
                Ok(Err(e)) => Err(e.into()),
                _ => Ok(()),
            };
        }
        let message = pubsub.get_message()?;
        let key = keyspace::key_of_channel(message.get_channel_name()).unwrap_or_default();
        let event: String = message.get_payload().unwrap_or_default();
        let mut out = std::io::stdout().lock();
        writeln!(out, "notify {key} {event}")?;
        out.flush()?;
    }
}

/// Reads `key \t nanos \t source` lines (the follower's report).
fn read_report(input: impl BufRead) -> Vec<(String, i128, String)> {
    input
        .lines()
        .map_while(Result::ok)
        .filter_map(|line| {
            let mut parts = line.split('\t');
            let key = parts.next()?.to_string();
            let nanos = parts.next()?.parse().ok()?;
            let source = parts.next().unwrap_or("").to_string();
            Some((key, nanos, source))
        })
        .collect()
}
