//! `Edge`: the L1 plus its invalidation links and a default loader, ready for an app server.

use crate::cache::{InvalidationHook, L1Config, L1};
use crate::connect::{self, TlsConfig};
use crate::error::EdgeError;
use crate::listener::{self, LinkConfig};
use crate::query::Query;
use crate::reply;
use crate::stats::Stats;
use serde_json::Value;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Everything an edge node configures.
#[derive(Debug, Clone)]
pub struct EdgeConfig {
    /// `redis://[user:password@]host:port[/db]` of the primary that runs gpucache;
    /// `rediss://` for TLS (see `tls`).
    pub url: String,
    /// For `rediss://`: the CA file to trust (default: the system's roots), and a client
    /// certificate and key for servers that verify clients. Used by every connection.
    pub tls: TlsConfig,
    /// Regions this node caches: their notifications and event streams are followed.
    pub regions: Vec<String>,
    pub l1: L1Config,
    pub link: LinkConfig,
    /// Connections of the default loader's pool.
    pub loader_connections: u32,
    /// How long a default load may wait for a connection and for its reply before failing
    /// with `EdgeError::Connection` (a reader never hangs on a dead or stuck server).
    pub loader_timeout: Duration,
}

impl EdgeConfig {
    pub fn new(url: &str, regions: &[&str]) -> EdgeConfig {
        EdgeConfig {
            url: url.to_string(),
            tls: TlsConfig::default(),
            regions: regions.iter().map(|r| r.to_string()).collect(),
            l1: L1Config::default(),
            link: LinkConfig::default(),
            loader_connections: 8,
            loader_timeout: Duration::from_millis(500),
        }
    }
}

/// The default loader's connections: RESP3, with read and write timeouts, and discarded after
/// any failure — a reply that timed out may still arrive, and must not be read as the answer
/// to the next query on that connection.
struct LoaderConnections {
    client: redis::Client,
    timeout: Duration,
}

struct LoaderConnection {
    con: redis::Connection,
    failed: bool,
}

impl r2d2::ManageConnection for LoaderConnections {
    type Connection = LoaderConnection;
    type Error = redis::RedisError;

    fn connect(&self) -> Result<LoaderConnection, redis::RedisError> {
        let con = connect::open(&self.client, Some(self.timeout))?;
        con.set_read_timeout(Some(self.timeout))?;
        con.set_write_timeout(Some(self.timeout))?;
        Ok(LoaderConnection { con, failed: false })
    }

    fn is_valid(&self, conn: &mut LoaderConnection) -> Result<(), redis::RedisError> {
        redis::cmd("PING").query(&mut conn.con)
    }

    fn has_broken(&self, conn: &mut LoaderConnection) -> bool {
        conn.failed || !redis::ConnectionLike::is_open(&conn.con)
    }
}

/// A running edge cache. Dropping it stops its threads.
pub struct Edge {
    l1: Arc<L1>,
    regions: Vec<String>,
    pool: r2d2::Pool<LoaderConnections>,
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
        let info: redis::ConnectionInfo = config
            .url
            .as_str()
            .parse()
            .map_err(|e: redis::RedisError| EdgeError::Connection(e.to_string()))?;
        let db = info.redis.db;
        let mut resp2 = info.clone();
        resp2.redis.protocol = redis::ProtocolVersion::RESP2;
        let mut resp3 = info;
        resp3.redis.protocol = redis::ProtocolVersion::RESP3;
        let link_client = connect::client(resp2, &config.tls)?;
        let timeout = config
            .loader_timeout
            .clamp(Duration::from_millis(1), Duration::from_secs(3600));
        let pool = r2d2::Pool::builder()
            .max_size(config.loader_connections.max(1))
            .min_idle(Some(0))
            .connection_timeout(timeout)
            .test_on_check_out(false)
            .build_unchecked(LoaderConnections {
                client: connect::client(resp3, &config.tls)?,
                timeout,
            });

        let link = config.link.sanitized();
        let l1 = Arc::new(L1::new(&config.l1, hook));
        l1.counters
            .notifications_off
            .store(!link.notifications, Ordering::Release);
        let stop = Arc::new(AtomicBool::new(false));
        let mut threads = Vec::with_capacity(2);
        if link.notifications {
            let (client, regions, l1, link, stop) = (
                link_client.clone(),
                config.regions.clone(),
                l1.clone(),
                link.clone(),
                stop.clone(),
            );
            threads.push(
                std::thread::Builder::new()
                    .name("gpucache-edge-notify".into())
                    .spawn(move || listener::run_notifications(client, db, regions, l1, link, stop))
                    .map_err(|e| EdgeError::Connection(e.to_string()))?,
            );
        }
        {
            let (regions, l1, stop) = (config.regions.clone(), l1.clone(), stop.clone());
            threads.push(
                std::thread::Builder::new()
                    .name("gpucache-edge-stream".into())
                    .spawn(move || listener::run_stream(link_client, regions, l1, link, stop))
                    .map_err(|e| EdgeError::Connection(e.to_string()))?,
            );
        }
        Ok(Edge {
            l1,
            regions: config.regions,
            pool,
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

    /// The default loader: the query's `GPUCACHE.*` command on a pooled RESP3 connection.
    pub fn load(&self, query: &Query) -> Result<Value, EdgeError> {
        // A pooled connection the server closed (restart, failover, idle timeout) fails at
        // once: one retry on a fresh connection. A timeout is not retried.
        let mut attempts = 0;
        loop {
            attempts += 1;
            let mut con = self
                .pool
                .get()
                .map_err(|e| EdgeError::Connection(e.to_string()))?;
            let reply = query.command().query::<redis::Value>(&mut con.con);
            match reply {
                Ok(reply) => return Ok(reply::to_json(reply)),
                // A server error (NOGPU, ...) leaves the connection in step; nothing else may.
                Err(e) if e.kind() == redis::ErrorKind::ResponseError || e.code().is_some() => {
                    return Err(e.into())
                }
                Err(e) => {
                    con.failed = true;
                    if attempts > 1 || e.is_timeout() || !e.is_connection_dropped() {
                        return Err(e.into());
                    }
                }
            }
        }
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
