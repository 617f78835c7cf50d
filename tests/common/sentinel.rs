//! A Redis Sentinel (`redis-server --sentinel` on loopback) monitoring one primary as
//! [`MASTER`], with quorum 1 so that it may fail over alone.

use super::{eventually, free_port};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// The name the Sentinel knows the primary by.
pub const MASTER: &str = "gpumaster";

/// How long a started Sentinel may take to answer.
const READY: Duration = Duration::from_secs(10);

pub struct Sentinel {
    pub port: u16,
    dir: PathBuf,
    child: Child,
    /// Connect and read timeout of `query`, if any.
    timeout: Option<Duration>,
}

impl Sentinel {
    /// A Sentinel in a fresh directory under the system's temporary one, watching the primary
    /// on `primary_port`.
    pub fn start(primary_port: u16) -> Sentinel {
        let port = free_port();
        let dir =
            std::env::temp_dir().join(format!("gpucache-sentinel-{port}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        Sentinel::start_in(dir, port, primary_port, "", None)
    }

    /// A Sentinel on `port` working in `dir` (created), watching the primary on
    /// `primary_port`; `extra_config` are `sentinel.conf` lines (e.g. TLS settings) put before
    /// the `sentinel monitor` line. `query` gives up after `timeout`, if given.
    pub fn start_in(
        dir: PathBuf,
        port: u16,
        primary_port: u16,
        extra_config: &str,
        timeout: Option<Duration>,
    ) -> Sentinel {
        std::fs::create_dir_all(&dir).unwrap();
        let config = dir.join("sentinel.conf");
        std::fs::write(
            &config,
            format!(
                "port {port}\nbind 127.0.0.1\ndir {}\n{extra_config}\
                 sentinel monitor {MASTER} 127.0.0.1 {primary_port} 1\n\
                 sentinel down-after-milliseconds {MASTER} 5000\n\
                 sentinel failover-timeout {MASTER} 10000\n",
                dir.display(),
            ),
        )
        .unwrap();
        let child = Command::new("redis-server")
            .arg(&config)
            .arg("--sentinel")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server must be installed");
        let sentinel = Sentinel {
            port,
            dir,
            child,
            timeout,
        };
        eventually("the Sentinel answers", READY, || {
            sentinel.query::<String>(&["PING"]).is_ok()
        });
        sentinel
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    /// Runs a command on a new connection to the Sentinel.
    pub fn query<T: redis::FromRedisValue>(&self, args: &[&str]) -> redis::RedisResult<T> {
        let client = redis::Client::open(self.url())?;
        let mut con = match self.timeout {
            Some(timeout) => {
                let con = client.get_connection_with_timeout(timeout)?;
                con.set_read_timeout(Some(timeout))?;
                con
            }
            None => client.get_connection()?,
        };
        let mut cmd = redis::cmd(args[0]);
        for a in &args[1..] {
            cmd.arg(*a);
        }
        cmd.query(&mut con)
    }

    /// Waits until the Sentinel knows a replica of the primary (from the primary's `INFO`):
    /// it can promote one only then.
    pub fn wait_for_replica(&self) {
        eventually(
            "the Sentinel knows the replica",
            Duration::from_secs(20),
            || {
                self.query::<Vec<redis::Value>>(&["SENTINEL", "REPLICAS", MASTER])
                    .is_ok_and(|r| !r.is_empty())
            },
        );
    }

    /// `SENTINEL FAILOVER` (asked until the Sentinel accepts), then waits until the replica on
    /// `replica_port` is promoted: `is_master` (its own `INFO`) says so and the Sentinel names it.
    pub fn fail_over_to(&self, replica_port: u16, mut is_master: impl FnMut() -> bool) {
        eventually("the Sentinel fails over", Duration::from_secs(20), || {
            self.query::<String>(&["SENTINEL", "FAILOVER", MASTER])
                .is_ok()
        });
        eventually("the replica is promoted", Duration::from_secs(30), || {
            is_master() && self.primary_port() == Some(replica_port)
        });
    }

    /// The port of the primary the Sentinel names now.
    pub fn primary_port(&self) -> Option<u16> {
        self.query::<Option<(String, u16)>>(&["SENTINEL", "GET-MASTER-ADDR-BY-NAME", MASTER])
            .ok()
            .flatten()
            .map(|(_, port)| port)
    }
}

impl Drop for Sentinel {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
