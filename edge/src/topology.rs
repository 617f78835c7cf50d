//! Where each followed region is served, and the connections to it.
//!
//! - [`Servers::Primary`]: the one server at `EdgeConfig::url`.
//! - [`Servers::Cluster`]: the master that owns the region's slot, from `CLUSTER SLOTS` asked of
//!   the masters already known, then of the seeds. A `MOVED` reply names the new owner at once.
//! - [`Servers::Sentinel`]: the primary the Sentinels name (`SENTINEL GET-MASTER-ADDR-BY-NAME`),
//!   confirmed by its `ROLE`.
//!
//! Every call here has a timeout: discovery runs on the link threads, which a stop (or a dead
//! Sentinel) must never hold forever. (The `redis` crate's own `Sentinel` connects to Sentinels
//! and checks `ROLE` without any timeout, hence the few lines below.)

use crate::connect::TlsConfig;
use crate::error::EdgeError;
use crate::keyspace;
use redis::{Connection, ConnectionAddr, ConnectionInfo, ErrorKind, RedisError, RedisResult};
use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Where gpucache runs (`EdgeConfig::servers`).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Servers {
    /// One primary, at `EdgeConfig::url`.
    #[default]
    Primary,
    /// A Redis Cluster, found from any of these node URLs. Each region is followed on the
    /// master that owns its slot; node connections take their user, password and TLS from
    /// `EdgeConfig::url` (the first seed, with `EdgeConfig::cluster`).
    Cluster { seeds: Vec<String> },
    /// A primary watched by Redis Sentinel: the Sentinels' URLs and the name they monitor it
    /// under. Connections to the primary take their user, password, database and TLS from
    /// `EdgeConfig::url`, whose host and port are replaced by the discovered ones.
    Sentinel {
        sentinels: Vec<String>,
        master_name: String,
    },
}

/// A server a link or a load connects to.
#[derive(Clone, Debug)]
pub(crate) struct Node {
    /// `host:port`, as shown in `Stats::followed_on`.
    pub name: String,
    pub info: ConnectionInfo,
}

impl PartialEq for Node {
    fn eq(&self, other: &Node) -> bool {
        self.name == other.name
    }
}

/// Regions read together on one stream link: in a cluster, those of one slot (one `XREAD`
/// cannot span slots); elsewhere all of them (`None`).
pub(crate) type Group = Option<u16>;

/// Discovery is not asked again sooner than this (many links may fail at once).
const MIN_REFRESH: Duration = Duration::from_millis(100);

enum Discovery {
    Fixed(Node),
    Cluster {
        seeds: Vec<ConnectionInfo>,
        slots: BTreeSet<u16>,
    },
    Sentinel {
        sentinels: Vec<ConnectionInfo>,
        master_name: String,
    },
}

/// The current map from groups to the servers that hold them.
pub(crate) struct Topology {
    discovery: Discovery,
    /// User, password, database, protocol and TLS of every node connection.
    template: ConnectionInfo,
    timeout: Duration,
    owners: Mutex<Owners>,
    /// Bumped whenever an owner changes.
    generation: AtomicU64,
}

#[derive(Default)]
struct Owners {
    by_group: HashMap<Group, Node>,
    last_refresh: Option<Instant>,
}

/// A server's address as the edge connects to it: for `rediss://`, with the TLS settings (CA,
/// client certificate) that every connection to it uses.
pub(crate) fn parse_url(url: &str, tls: &TlsConfig) -> Result<ConnectionInfo, EdgeError> {
    let info = redis::IntoConnectionInfo::into_connection_info(url)
        .map_err(|e| EdgeError::Connection(format!("{url}: {e}")))?;
    if !matches!(info.addr, ConnectionAddr::TcpTls { .. }) {
        return Ok(info);
    }
    Ok(crate::connect::client(info, tls)?
        .get_connection_info()
        .clone())
}

/// The cluster slot of a region: the slot of its keys (`gpucache:{<region>}:...`).
pub(crate) fn slot_of(region: &str) -> u16 {
    redis::cluster_routing::get_slot(keyspace::events_key(region).as_bytes())
}

/// Opens a connection to `info` with `timeout` on the connect and on every read and write
/// (`connect::open`: a `rediss://` address answering in plain text is refused, not waited on).
pub(crate) fn connect(info: &ConnectionInfo, timeout: Duration) -> RedisResult<Connection> {
    let con = crate::connect::open(&redis::Client::open(info.clone())?, Some(timeout))?;
    con.set_read_timeout(Some(timeout))?;
    con.set_write_timeout(Some(timeout))?;
    Ok(con)
}

fn name_of(addr: &ConnectionAddr) -> String {
    match addr {
        ConnectionAddr::Tcp(host, port) | ConnectionAddr::TcpTls { host, port, .. } => {
            format!("{host}:{port}")
        }
        ConnectionAddr::Unix(path) => path.display().to_string(),
    }
}

impl Topology {
    /// `url` is the primary (`Servers::Primary`) or the template of node connections.
    pub(crate) fn new(
        servers: &Servers,
        url: &str,
        regions: &[String],
        tls: &TlsConfig,
        timeout: Duration,
    ) -> Result<Topology, EdgeError> {
        let none_given = match servers {
            Servers::Primary => None,
            Servers::Cluster { seeds } => seeds.is_empty().then_some("no cluster seed given"),
            Servers::Sentinel { sentinels, .. } => {
                sentinels.is_empty().then_some("no Sentinel given")
            }
        };
        if let Some(message) = none_given {
            return Err(EdgeError::Connection(message.into()));
        }
        // TLS settings given for a plain URL are refused here, as for a single server.
        let template = crate::connect::client(url, tls)?
            .get_connection_info()
            .clone();
        let discovery = match servers {
            Servers::Primary => Discovery::Fixed(Node {
                name: name_of(&template.addr),
                info: template.clone(),
            }),
            Servers::Cluster { seeds } => Discovery::Cluster {
                seeds: seeds
                    .iter()
                    .map(|s| parse_url(s, tls))
                    .collect::<Result<_, _>>()?,
                slots: regions.iter().map(|r| slot_of(r)).collect(),
            },
            Servers::Sentinel {
                sentinels,
                master_name,
            } => Discovery::Sentinel {
                sentinels: sentinels
                    .iter()
                    .map(|s| parse_url(s, tls))
                    .collect::<Result<_, _>>()?,
                master_name: master_name.clone(),
            },
        };
        Ok(Topology {
            discovery,
            template,
            timeout,
            owners: Mutex::new(Owners::default()),
            generation: AtomicU64::new(0),
        })
    }

    /// Whether servers are discovered (and so may change) rather than fixed.
    pub(crate) fn discovers(&self) -> bool {
        !matches!(self.discovery, Discovery::Fixed(_))
    }

    pub(crate) fn is_cluster(&self) -> bool {
        matches!(self.discovery, Discovery::Cluster { .. })
    }

    /// The database of node connections (always 0 in a cluster).
    pub(crate) fn db(&self) -> i64 {
        self.template.redis.db
    }

    /// `regions` grouped by the stream link that follows them.
    pub(crate) fn groups(&self, regions: &[String]) -> Vec<(Group, Vec<String>)> {
        let mut groups: Vec<(Group, Vec<String>)> = Vec::new();
        for region in regions {
            let group = self.is_cluster().then(|| slot_of(region));
            match groups.iter_mut().find(|(g, _)| *g == group) {
                Some((_, members)) => members.push(region.clone()),
                None => groups.push((group, vec![region.clone()])),
            }
        }
        groups
    }

    /// Bumped on every change of owner, so links can notice cheaply.
    pub(crate) fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// The server that holds `group` now, as far as known.
    pub(crate) fn node_for(&self, group: Group) -> Option<Node> {
        if let Discovery::Fixed(node) = &self.discovery {
            return Some(node.clone());
        }
        self.owners
            .lock()
            .ok()
            .and_then(|owners| owners.by_group.get(&group).cloned())
    }

    /// Every server that holds one of `groups` now.
    pub(crate) fn nodes_for(&self, groups: &[Group]) -> Vec<Node> {
        let mut nodes: Vec<Node> = Vec::new();
        for node in groups.iter().filter_map(|g| self.node_for(*g)) {
            if !nodes.contains(&node) {
                nodes.push(node);
            }
        }
        nodes
    }

    /// A link or load on `group` failed with `error`: learn the new owner from a `MOVED`,
    /// otherwise ask discovery again.
    pub(crate) fn after_error(&self, group: Group, error: &RedisError) {
        if let (Some(slot), Some((addr, _))) = (group, error.redirect_node()) {
            if error.kind() == ErrorKind::Moved {
                if let Some((host, port)) = addr
                    .rsplit_once(':')
                    .and_then(|(h, p)| Some((h, p.parse::<u16>().ok()?)))
                {
                    let node = self.node_at(host, port);
                    self.set_owners(|owners| {
                        owners.insert(Some(slot), node);
                    });
                    return;
                }
            }
        }
        let _ = self.refresh();
    }

    /// Asks discovery where every group is now (at most once per `MIN_REFRESH`).
    pub(crate) fn refresh(&self) -> RedisResult<()> {
        {
            let Ok(mut owners) = self.owners.lock() else {
                return Ok(());
            };
            if owners
                .last_refresh
                .is_some_and(|at| at.elapsed() < MIN_REFRESH)
            {
                return Ok(());
            }
            owners.last_refresh = Some(Instant::now());
        }
        match &self.discovery {
            Discovery::Fixed(_) => Ok(()),
            Discovery::Cluster { seeds, slots } => {
                let found = self.ask_cluster(seeds, slots)?;
                self.set_owners(|owners| *owners = found);
                Ok(())
            }
            Discovery::Sentinel {
                sentinels,
                master_name,
            } => {
                let known = self.node_for(None);
                let primary = self.ask_sentinels(sentinels, master_name, known.as_ref())?;
                self.set_owners(|owners| {
                    owners.insert(None, primary);
                });
                Ok(())
            }
        }
    }

    fn set_owners(&self, change: impl FnOnce(&mut HashMap<Group, Node>)) {
        let Ok(mut owners) = self.owners.lock() else {
            return;
        };
        let mut changed = owners.by_group.clone();
        change(&mut changed);
        let differs = changed.len() != owners.by_group.len()
            || changed
                .iter()
                .any(|(group, node)| owners.by_group.get(group) != Some(node));
        if differs {
            owners.by_group = changed;
            self.generation.fetch_add(1, Ordering::AcqRel);
        }
    }

    /// The connection settings of the server at `host:port`.
    fn node_at(&self, host: &str, port: u16) -> Node {
        let addr = match &self.template.addr {
            ConnectionAddr::TcpTls {
                insecure,
                tls_params,
                ..
            } => ConnectionAddr::TcpTls {
                host: host.to_string(),
                port,
                insecure: *insecure,
                tls_params: tls_params.clone(),
            },
            _ => ConnectionAddr::Tcp(host.to_string(), port),
        };
        Node {
            name: name_of(&addr),
            info: ConnectionInfo {
                addr,
                redis: self.template.redis.clone(),
            },
        }
    }

    /// A link connection to `node` (RESP2: the links use pub/sub), with timeouts.
    pub(crate) fn connect(&self, node: &Node) -> RedisResult<Connection> {
        let mut info = node.info.clone();
        info.redis.protocol = redis::ProtocolVersion::RESP2;
        connect(&info, self.timeout)
    }

    /// Under Sentinel, that `con` is a primary: a demoted primary still answers reads, and a
    /// Sentinel may name one it has not yet seen demoted. (In a cluster a replica answers a
    /// read of a key with `MOVED`; a fixed primary is taken as configured.)
    pub(crate) fn confirm_primary(&self, con: &mut Connection) -> RedisResult<()> {
        if !matches!(self.discovery, Discovery::Sentinel { .. }) {
            return Ok(());
        }
        let role: Vec<redis::Value> = redis::cmd("ROLE").query(con)?;
        let role = role
            .first()
            .and_then(|r| redis::from_redis_value::<String>(r).ok())
            .unwrap_or_default();
        if role == "master" {
            Ok(())
        } else {
            Err(RedisError::from((
                ErrorKind::MasterNameNotFoundBySentinel,
                "not the primary",
                role,
            )))
        }
    }

    fn ask_cluster(
        &self,
        seeds: &[ConnectionInfo],
        slots: &BTreeSet<u16>,
    ) -> RedisResult<HashMap<Group, Node>> {
        // The masters already known first (they know the cluster best), then the seeds.
        let known: Vec<ConnectionInfo> = self
            .owners
            .lock()
            .map(|o| o.by_group.values().map(|n| n.info.clone()).collect())
            .unwrap_or_default();
        let mut last_error = None;
        for info in known.iter().chain(seeds) {
            let asked = connect(info, self.timeout).and_then(|mut con| {
                redis::cmd("CLUSTER")
                    .arg("SLOTS")
                    .query::<redis::Value>(&mut con)
            });
            let reply = match asked {
                Ok(reply) => reply,
                Err(e) => {
                    last_error = Some(e);
                    continue;
                }
            };
            let asked_host = match &info.addr {
                ConnectionAddr::Tcp(host, _) | ConnectionAddr::TcpTls { host, .. } => host,
                ConnectionAddr::Unix(_) => "127.0.0.1",
            };
            let ranges = parse_slots(&reply, asked_host);
            if ranges.is_empty() {
                continue; // a node that knows no slot yet
            }
            let mut owners = HashMap::new();
            for slot in slots {
                if let Some((_, _, host, port)) = ranges
                    .iter()
                    .find(|(first, last, _, _)| first <= slot && slot <= last)
                {
                    owners.insert(Some(*slot), self.node_at(host, *port));
                }
            }
            return Ok(owners);
        }
        Err(last_error.unwrap_or_else(|| {
            RedisError::from((ErrorKind::ClusterDown, "no node knows the cluster's slots"))
        }))
    }

    fn ask_sentinels(
        &self,
        sentinels: &[ConnectionInfo],
        master_name: &str,
        known: Option<&Node>,
    ) -> RedisResult<Node> {
        let mut last_error = None;
        for sentinel in sentinels {
            let named = connect(sentinel, self.timeout).and_then(|mut con| {
                redis::cmd("SENTINEL")
                    .arg("GET-MASTER-ADDR-BY-NAME")
                    .arg(master_name)
                    .query::<Option<(String, u16)>>(&mut con)
            });
            let (host, port) = match named {
                Ok(Some(addr)) => addr,
                Ok(None) => {
                    last_error = Some(RedisError::from((
                        ErrorKind::MasterNameNotFoundBySentinel,
                        "the Sentinel monitors no primary of that name",
                        master_name.to_string(),
                    )));
                    continue;
                }
                Err(e) => {
                    last_error = Some(e);
                    continue;
                }
            };
            let node = self.node_at(&host, port);
            if known == Some(&node) {
                return Ok(node);
            }
            let confirmed = self
                .connect(&node)
                .and_then(|mut con| self.confirm_primary(&mut con));
            match confirmed {
                Ok(()) => return Ok(node),
                Err(e) => last_error = Some(e),
            }
        }
        Err(last_error.unwrap_or_else(|| {
            RedisError::from((ErrorKind::EmptySentinelList, "no Sentinel given"))
        }))
    }
}

/// `CLUSTER SLOTS` as `(first, last, master host, master port)`; a master without a known
/// address is the node that was asked.
fn parse_slots(reply: &redis::Value, asked_host: &str) -> Vec<(u16, u16, String, u16)> {
    let redis::Value::Array(ranges) = reply else {
        return Vec::new();
    };
    ranges
        .iter()
        .filter_map(|range| {
            let redis::Value::Array(fields) = range else {
                return None;
            };
            let first: u16 = redis::from_redis_value(fields.first()?).ok()?;
            let last: u16 = redis::from_redis_value(fields.get(1)?).ok()?;
            let redis::Value::Array(master) = fields.get(2)? else {
                return None;
            };
            let host: String = master
                .first()
                .and_then(|h| redis::from_redis_value(h).ok())
                .filter(|h: &String| !h.is_empty() && h != "?")
                .unwrap_or_else(|| asked_host.to_string());
            let port: u16 = redis::from_redis_value(master.get(1)?).ok()?;
            Some((first, last, host, port))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use redis::Value;

    fn bulk(s: &str) -> Value {
        Value::BulkString(s.as_bytes().to_vec())
    }

    #[test]
    fn cluster_slots_parse_into_ranges_of_masters() {
        let reply = Value::Array(vec![
            Value::Array(vec![
                Value::Int(0),
                Value::Int(5460),
                Value::Array(vec![bulk("10.0.0.1"), Value::Int(7000), bulk("id1")]),
                Value::Array(vec![bulk("10.0.0.4"), Value::Int(7003), bulk("id4")]),
            ]),
            Value::Array(vec![
                Value::Int(5461),
                Value::Int(16383),
                Value::Array(vec![bulk(""), Value::Int(7001), bulk("id2")]),
            ]),
            Value::Int(3), // not a range: skipped
        ]);
        assert_eq!(
            parse_slots(&reply, "seed"),
            vec![
                (0, 5460, "10.0.0.1".to_string(), 7000),
                (5461, 16383, "seed".to_string(), 7001)
            ]
        );
        assert!(parse_slots(&Value::Nil, "seed").is_empty());
    }

    #[test]
    fn regions_group_by_slot_in_a_cluster_only() {
        let regions: Vec<String> = ["eu", "us", "eu"].iter().map(|s| s.to_string()).collect();
        let primary = Topology::new(
            &Servers::Primary,
            "redis://h:1/",
            &regions,
            &TlsConfig::default(),
            Duration::from_secs(1),
        )
        .unwrap();
        assert_eq!(primary.groups(&regions), vec![(None, regions.clone())]);
        let cluster = Topology::new(
            &Servers::Cluster {
                seeds: vec!["redis://h:1/".into()],
            },
            "redis://h:1/",
            &regions,
            &TlsConfig::default(),
            Duration::from_secs(1),
        )
        .unwrap();
        let groups = cluster.groups(&regions);
        assert_eq!(groups.len(), 2);
        assert_eq!(
            groups[0],
            (Some(slot_of("eu")), vec!["eu".into(), "eu".into()])
        );
        // The slot of a region is the slot Redis gives its keys.
        assert_eq!(slot_of("eu"), redis::cluster_routing::get_slot(b"eu"));
        assert_eq!(
            primary.node_for(None).map(|n| n.name),
            Some("h:1".to_string())
        );
        assert!(cluster.node_for(Some(slot_of("eu"))).is_none());
    }

    #[test]
    fn a_moved_reply_names_the_new_owner() {
        let regions = vec!["eu".to_string()];
        let cluster = Topology::new(
            &Servers::Cluster {
                seeds: vec!["redis://user:pw@h:1/".into()],
            },
            "redis://user:pw@h:1/",
            &regions,
            &TlsConfig::default(),
            Duration::from_secs(1),
        )
        .unwrap();
        let slot = slot_of("eu");
        let before = cluster.generation();
        let moved = RedisError::from((
            ErrorKind::Moved,
            "An error was signalled by the server",
            format!("{slot} 10.1.2.3:7005"),
        ));
        cluster.after_error(Some(slot), &moved);
        let node = cluster.node_for(Some(slot)).unwrap();
        assert_eq!(node.name, "10.1.2.3:7005");
        assert_eq!(node.info.redis.password.as_deref(), Some("pw"));
        assert!(cluster.generation() > before);
    }

    #[test]
    fn a_cluster_or_sentinel_list_must_name_a_server() {
        for servers in [
            Servers::Cluster { seeds: vec![] },
            Servers::Sentinel {
                sentinels: vec![],
                master_name: "m".into(),
            },
        ] {
            let refused = Topology::new(
                &servers,
                "",
                &[],
                &TlsConfig::default(),
                Duration::from_secs(1),
            );
            assert!(matches!(refused, Err(EdgeError::Connection(_))));
        }
    }
}
