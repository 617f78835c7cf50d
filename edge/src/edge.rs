//! `Edge`: the L1 plus its invalidation links and a default loader, ready for an app server.

use crate::cache::{InvalidationHook, L1Config, L1};
use crate::connect::{self, TlsConfig};
use crate::error::EdgeError;
use crate::links;
use crate::listener::LinkConfig;
use crate::query::Query;
use crate::reply;
use crate::stats::Stats;
use crate::topology::{self, Servers, Topology};
use redis::ConnectionLike;
use serde_json::Value;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Everything an edge node configures.
#[derive(Debug, Clone)]
pub struct EdgeConfig {
    /// `redis://[user:password@]host:port[/db]` of the primary that runs gpucache;
    /// `rediss://` for TLS (see `tls`). In a cluster or under Sentinel (`servers`), only its
    /// user, password, database and scheme are used: host and port are those discovered.
    pub url: String,
    /// For `rediss://`: the CA file to trust (default: the system's roots), and a client
    /// certificate and key for servers that verify clients. Used by every connection, to
    /// discovered nodes too.
    pub tls: TlsConfig,
    /// One primary (the default), a Redis Cluster, or a primary behind Sentinel.
    pub servers: Servers,
    /// Regions this node caches: their notifications and event streams are followed.
    pub regions: Vec<String>,
    pub l1: L1Config,
    pub link: LinkConfig,
    /// Connections of the default loader's pool (in a cluster, each holds one connection per
    /// node it has read from).
    pub loader_connections: u32,
    /// How long a default load may wait for a connection and for its reply before failing
    /// with `EdgeError::Connection` (a reader never hangs on a dead or stuck server). In a
    /// cluster it bounds each attempt; redirections and `TRYAGAIN` are retried up to
    /// `CLUSTER_RETRIES` times.
    pub loader_timeout: Duration,
}

/// How often a cluster load follows `MOVED`/`ASK` or waits out `TRYAGAIN`/`CLUSTERDOWN`
/// (10–200 ms apart) before it fails.
pub const CLUSTER_RETRIES: u32 = 4;

impl EdgeConfig {
    /// One primary at `url`.
    pub fn new(url: &str, regions: &[&str]) -> EdgeConfig {
        EdgeConfig {
            url: url.to_string(),
            tls: TlsConfig::default(),
            servers: Servers::Primary,
            regions: regions.iter().map(|r| r.to_string()).collect(),
            l1: L1Config::default(),
            link: LinkConfig::default(),
            loader_connections: 8,
            loader_timeout: Duration::from_millis(500),
        }
    }

    /// A Redis Cluster, found from any of `seeds` (node URLs; the first one's user, password
    /// and scheme serve every node).
    pub fn cluster(seeds: &[&str], regions: &[&str]) -> EdgeConfig {
        EdgeConfig {
            servers: Servers::Cluster {
                seeds: seeds.iter().map(|s| s.to_string()).collect(),
            },
            ..EdgeConfig::new(seeds.first().copied().unwrap_or_default(), regions)
        }
    }

    /// The primary that `sentinels` (Sentinel URLs) monitor as `master_name`. Set `url` for the
    /// primary's user, password or database (its host and port are ignored).
    pub fn sentinel(sentinels: &[&str], master_name: &str, regions: &[&str]) -> EdgeConfig {
        EdgeConfig {
            servers: Servers::Sentinel {
                sentinels: sentinels.iter().map(|s| s.to_string()).collect(),
                master_name: master_name.to_string(),
            },
            ..EdgeConfig::new("redis://127.0.0.1/", regions)
        }
    }
}

/// A pooled loader connection: runs a read, and leaves the pool after any failure — a reply
/// that timed out may still arrive, and must not be read as the answer to the next query.
trait Pooled {
    fn run(&mut self, cmd: &redis::Cmd) -> redis::RedisResult<redis::Value>;
    fn fail(&mut self);
}

/// The default loader's connections to one server (the primary, or the one Sentinel names):
/// RESP3, with read and write timeouts.
struct ServerConnections {
    topology: Arc<Topology>,
    timeout: Duration,
}

struct ServerConnection {
    con: redis::Connection,
    failed: bool,
    /// The server it reads: a connection to a primary Sentinel has since demoted is stale.
    node: String,
}

/// Whether `conn` reads another server than the one that holds the data now.
fn stale(topology: &Topology, conn: &ServerConnection) -> bool {
    topology
        .node_for(None)
        .is_some_and(|now| now.name != conn.node)
}

impl Pooled for ServerConnection {
    fn run(&mut self, cmd: &redis::Cmd) -> redis::RedisResult<redis::Value> {
        cmd.query(&mut self.con)
    }
    fn fail(&mut self) {
        self.failed = true;
    }
}

impl r2d2::ManageConnection for ServerConnections {
    type Connection = ServerConnection;
    type Error = redis::RedisError;

    fn connect(&self) -> Result<ServerConnection, redis::RedisError> {
        let node = match self.topology.node_for(None) {
            Some(node) => node,
            None => {
                self.topology.refresh()?;
                self.topology.node_for(None).ok_or_else(|| {
                    redis::RedisError::from((
                        redis::ErrorKind::MasterNameNotFoundBySentinel,
                        "no primary known yet",
                    ))
                })?
            }
        };
        let mut info = node.info.clone();
        info.redis.protocol = redis::ProtocolVersion::RESP3;
        let mut con = topology::connect(&info, self.timeout)?;
        if let Err(e) = self.topology.confirm_primary(&mut con) {
            let _ = self.topology.refresh();
            return Err(e);
        }
        Ok(ServerConnection {
            con,
            failed: false,
            node: node.name,
        })
    }

    fn is_valid(&self, conn: &mut ServerConnection) -> Result<(), redis::RedisError> {
        redis::cmd("PING").query(&mut conn.con)
    }

    fn has_broken(&self, conn: &mut ServerConnection) -> bool {
        conn.failed || !conn.con.is_open() || stale(&self.topology, conn)
    }
}

/// The default loader's connections to a cluster: the `redis` crate's cluster client, which
/// sends each read to the master of its region's slot and follows `MOVED`, `ASK`, `TRYAGAIN`.
///
/// One client per seed, tried in turn as the cluster client itself would: its TLS handshake
/// has no timeout, so a seed whose port answers in plain text is skipped here rather than
/// handed to it (it would wait forever); and where a seed fails, the edge's own connection to
/// it says why (an untrusted certificate, a refused password), which the cluster client's
/// "failed to check startup nodes" does not.
struct ClusterConnections {
    seeds: Vec<ClusterSeed>,
    timeout: Duration,
}

struct ClusterSeed {
    /// As the edge's own connections reach it (TLS settings included).
    info: redis::ConnectionInfo,
    client: redis::cluster::ClusterClient,
}

struct ClusterConnection {
    con: redis::cluster::ClusterConnection,
    failed: bool,
}

impl Pooled for ClusterConnection {
    fn run(&mut self, cmd: &redis::Cmd) -> redis::RedisResult<redis::Value> {
        cmd.query(&mut self.con)
    }
    fn fail(&mut self) {
        self.failed = true;
    }
}

impl ClusterConnections {
    /// Why `seed` failed: the error of the edge's own connection to it, if that fails too
    /// (the cluster client reports only that no seed could be used); otherwise `error`.
    fn why(&self, seed: &ClusterSeed, error: redis::RedisError) -> redis::RedisError {
        if error.kind() != redis::ErrorKind::IoError {
            return error; // the cluster's own answer (e.g. no slots yet)
        }
        match topology::connect(&seed.info, self.timeout) {
            Err(cause) => redis::RedisError::from(std::io::Error::other(format!(
                "cluster seed {}: {cause}",
                seed.info.addr
            ))),
            Ok(_) => error,
        }
    }
}

impl r2d2::ManageConnection for ClusterConnections {
    type Connection = ClusterConnection;
    type Error = redis::RedisError;

    fn connect(&self) -> Result<ClusterConnection, redis::RedisError> {
        let mut last_error = None;
        for seed in &self.seeds {
            let connected = connect::refuse_plain_text(&seed.info.addr, self.timeout)
                .and_then(|()| seed.client.get_connection().map_err(|e| self.why(seed, e)));
            match connected {
                Ok(con) => return Ok(ClusterConnection { con, failed: false }),
                Err(e) => last_error = Some(e),
            }
        }
        Err(last_error.unwrap_or_else(|| {
            redis::RedisError::from((redis::ErrorKind::InvalidClientConfig, "no cluster seed"))
        }))
    }

    fn is_valid(&self, conn: &mut ClusterConnection) -> Result<(), redis::RedisError> {
        if conn.con.check_connection() {
            Ok(())
        } else {
            Err(redis::RedisError::from((
                redis::ErrorKind::IoError,
                "a cluster node does not answer",
            )))
        }
    }

    fn has_broken(&self, conn: &mut ClusterConnection) -> bool {
        conn.failed || !conn.con.is_open()
    }
}

enum Loader {
    Server(r2d2::Pool<ServerConnections>, Arc<Topology>),
    Cluster(r2d2::Pool<ClusterConnections>),
}

impl Loader {
    fn new(
        config: &EdgeConfig,
        topology: &Arc<Topology>,
        timeout: Duration,
    ) -> Result<Loader, EdgeError> {
        fn pool<M: r2d2::ManageConnection>(
            config: &EdgeConfig,
            timeout: Duration,
        ) -> r2d2::Builder<M> {
            r2d2::Pool::builder()
                .max_size(config.loader_connections.max(1))
                .min_idle(Some(0))
                .connection_timeout(timeout)
                .test_on_check_out(false)
        }
        match &config.servers {
            Servers::Cluster { seeds } => {
                let certificates = if config.tls.is_set() {
                    Some(connect::certificates(&config.tls)?)
                } else {
                    None
                };
                let client = |nodes: Vec<redis::ConnectionInfo>| {
                    let mut builder = redis::cluster::ClusterClient::builder(nodes);
                    if let Some(certificates) = &certificates {
                        builder = builder.certs(certificates.clone());
                    }
                    builder
                        .use_protocol(redis::ProtocolVersion::RESP3)
                        .connection_timeout(timeout)
                        .response_timeout(timeout)
                        .retries(CLUSTER_RETRIES)
                        .min_retry_wait(10)
                        .max_retry_wait(200)
                        .retry_wait_formula(10, 2)
                        .build()
                };
                let mut infos = Vec::with_capacity(seeds.len());
                for seed in seeds {
                    infos.push(topology::parse_url(seed, &config.tls)?);
                }
                let resp3 = |info: &redis::ConnectionInfo| {
                    let mut info = info.clone();
                    info.redis.protocol = redis::ProtocolVersion::RESP3;
                    info
                };
                // Built with every seed once for its checks: one user, password and TLS mode.
                client(infos.iter().map(resp3).collect())?;
                let mut seeds = Vec::with_capacity(infos.len());
                for info in infos {
                    let client = client(vec![resp3(&info)])?;
                    seeds.push(ClusterSeed { info, client });
                }
                Ok(Loader::Cluster(
                    pool(config, timeout).build_unchecked(ClusterConnections { seeds, timeout }),
                ))
            }
            Servers::Primary | Servers::Sentinel { .. } => Ok(Loader::Server(
                pool(config, timeout).build_unchecked(ServerConnections {
                    topology: topology.clone(),
                    timeout,
                }),
                topology.clone(),
            )),
        }
    }

    fn load(&self, query: &Query) -> Result<Value, EdgeError> {
        match self {
            Loader::Server(pool, topology) => load_from(pool, query, |con| stale(topology, con)),
            Loader::Cluster(pool) => load_from(pool, query, |_| false),
        }
    }
}

/// The query's command on a pooled connection. A pooled connection the server closed
/// (restart, failover, idle timeout) fails at once: one retry on a fresh connection. A timeout
/// is not retried.
fn load_from<M>(
    pool: &r2d2::Pool<M>,
    query: &Query,
    stale: impl Fn(&M::Connection) -> bool,
) -> Result<Value, EdgeError>
where
    M: r2d2::ManageConnection,
    M::Connection: Pooled,
    M::Error: std::fmt::Display,
{
    let command = query.command();
    let mut attempts = 0;
    // Stale connections (to a demoted primary) are dropped on the way, at most a pool's worth.
    let mut stale_left = pool.max_size();
    loop {
        let mut con = pool
            .get()
            .map_err(|e| EdgeError::Connection(e.to_string()))?;
        if stale_left > 0 && stale(&con) {
            stale_left -= 1;
            con.fail();
            continue;
        }
        attempts += 1;
        match con.run(&command) {
            Ok(reply) => return Ok(reply::to_json(reply)),
            // A server error (NOGPU, ...) leaves the connection in step; nothing else may.
            Err(e) if e.kind() == redis::ErrorKind::ResponseError || e.code().is_some() => {
                return Err(e.into())
            }
            Err(e) => {
                con.fail();
                if attempts > 1 || e.is_timeout() || !e.is_connection_dropped() {
                    return Err(e.into());
                }
            }
        }
    }
}

/// A running edge cache. Dropping it stops its threads.
pub struct Edge {
    l1: Arc<L1>,
    regions: Vec<String>,
    loader: Loader,
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

impl Edge {
    /// Starts the links in the background and returns at once; until the stream link is up,
    /// reads go to Redis and nothing is cached (`wait_connected` waits for it).
    pub fn start(config: EdgeConfig) -> Result<Edge, EdgeError> {
        Edge::start_with_hook(config, None)
    }

    /// As `start`, calling `hook` for every invalidated key.
    pub fn start_with_hook(
        config: EdgeConfig,
        hook: Option<InvalidationHook>,
    ) -> Result<Edge, EdgeError> {
        let link = config.link.sanitized();
        let timeout = config
            .loader_timeout
            .clamp(Duration::from_millis(1), Duration::from_secs(3600));
        let topology = Arc::new(Topology::new(
            &config.servers,
            &config.url,
            &config.regions,
            &config.tls,
            link.timeout,
        )?);
        let loader = Loader::new(&config, &topology, timeout)?;
        let l1 = Arc::new(L1::new(&config.l1, hook));
        l1.counters
            .notifications_off
            .store(!link.notifications, Ordering::Release);
        let stop = Arc::new(AtomicBool::new(false));
        let threads = links::start(topology, &config.regions, l1.clone(), link, stop.clone())?;
        Ok(Edge {
            l1,
            regions: config.regions,
            loader,
            stop,
            threads,
        })
    }

    /// Waits until every enabled link is up; false on timeout.
    pub fn wait_connected(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if self.stats().connection == "connected" {
                return true;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        false
    }

    /// The read through the L1, loaded with its `GPUCACHE.*` command on a miss.
    pub fn get(&self, query: &Query) -> Result<Arc<Value>, EdgeError> {
        self.get_or_load(query, |q| self.load(q))
    }

    /// The read through the L1, loaded by `loader` on a miss (single flight). A region this
    /// edge does not follow is never cached: nothing would invalidate it.
    pub fn get_or_load<F>(&self, query: &Query, loader: F) -> Result<Arc<Value>, EdgeError>
    where
        F: FnOnce(&Query) -> Result<Value, EdgeError>,
    {
        if self.regions.iter().any(|r| r == query.region()) {
            self.l1.get_or_load(query, loader)
        } else {
            loader(query).map(Arc::new)
        }
    }

    /// The default loader: the query's `GPUCACHE.*` command on a pooled RESP3 connection (in
    /// a cluster, to the master of the query's region).
    pub fn load(&self, query: &Query) -> Result<Value, EdgeError> {
        self.loader.load(query)
    }

    /// The cached value only (no load).
    pub fn cached(&self, query: &Query) -> Option<Arc<Value>> {
        self.l1.get(query)
    }

    pub fn stats(&self) -> Stats {
        self.l1.stats()
    }

    pub fn l1(&self) -> &L1 {
        &self.l1
    }
}

impl Drop for Edge {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }
}
