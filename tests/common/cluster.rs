//! A Redis Cluster of private redis-server processes, each with gpucache loaded: masters that
//! split the 16384 slots evenly and replicas attached to them, started and converged before a
//! test runs.

use super::{eventually, free_port, Server};
use redis::{Connection, RedisResult, Value};
use std::time::Duration;

/// How long a cluster may take to agree on its nodes, slots and replication links.
const CONVERGE: Duration = Duration::from_secs(30);

/// One cluster node: its server, its cluster bus port and node id.
pub struct ClusterNode {
    pub server: Server,
    pub bus_port: u16,
    pub id: String,
}

impl ClusterNode {
    /// Starts a cluster-enabled redis-server with gpucache (`module_args`) that knows no other
    /// node yet; `server_args` are extra `--name value` settings.
    pub fn start(module_args: &[&str], server_args: &[&str]) -> ClusterNode {
        ClusterNode::start_on_bus(module_args, server_args, free_port())
    }

    pub fn connect(&self) -> Connection {
        self.server.connect()
    }

    /// A field of `CLUSTER INFO` (`cluster_state`, `cluster_known_nodes`, ...).
    pub fn cluster_info(&self, field: &str) -> Option<String> {
        let info: String = redis::cmd("CLUSTER")
            .arg("INFO")
            .query(&mut self.connect())
            .ok()?;
        info_field(&info, field)
    }

    /// A field of `INFO replication` (`role`, `master_link_status`, ...).
    pub fn replication_info(&self, field: &str) -> Option<String> {
        let info: String = redis::cmd("INFO")
            .arg("replication")
            .query(&mut self.connect())
            .ok()?;
        info_field(&info, field)
    }

    /// Introduces `other` to this node (`CLUSTER MEET` with its bus port).
    pub fn meet(&self, other: &ClusterNode) {
        redis::cmd("CLUSTER")
            .arg("MEET")
            .arg("127.0.0.1")
            .arg(other.server.port)
            .arg(other.bus_port)
            .query::<()>(&mut self.connect())
            .expect("CLUSTER MEET");
    }

    /// Assigns the slots `first..=last` to this node.
    pub fn add_slots(&self, first: u16, last: u16) {
        redis::cmd("CLUSTER")
            .arg("ADDSLOTSRANGE")
            .arg(first)
            .arg(last)
            .query::<()>(&mut self.connect())
            .expect("CLUSTER ADDSLOTSRANGE");
    }

    /// Makes this node a replica of `master` (which it must already know).
    pub fn replicate(&self, master: &ClusterNode) {
        redis::cmd("CLUSTER")
            .arg("REPLICATE")
            .arg(&master.id)
            .query::<()>(&mut self.connect())
            .expect("CLUSTER REPLICATE");
    }

    /// Node ids this node knows (itself included), from `CLUSTER NODES`.
    pub fn known_ids(&self) -> Vec<String> {
        let nodes: String = redis::cmd("CLUSTER")
            .arg("NODES")
            .query(&mut self.connect())
            .unwrap_or_default();
        nodes
            .lines()
            .filter_map(|l| l.split_whitespace().next().map(str::to_owned))
            .collect()
    }
}

/// The settings that make a server a cluster node with its bus on `bus_port` (a node restarted
/// in its directory with them finds its `nodes.conf` again).
pub fn cluster_args(bus_port: &str) -> [&str; 8] {
    [
        "--cluster-enabled",
        "yes",
        "--cluster-port",
        bus_port,
        "--cluster-config-file",
        "nodes.conf",
        "--cluster-node-timeout",
        "5000",
    ]
}

/// `name:value` from an `INFO`-style text.
pub fn info_field(info: &str, field: &str) -> Option<String> {
    info.lines()
        .filter_map(|l| l.trim_end().split_once(':'))
        .find(|(name, _)| *name == field)
        .map(|(_, value)| value.to_owned())
}

/// The cluster slot of `key` (`CLUSTER KEYSLOT`).
pub fn key_slot(con: &mut Connection, key: &str) -> u16 {
    redis::cmd("CLUSTER")
        .arg("KEYSLOT")
        .arg(key)
        .query(con)
        .expect("CLUSTER KEYSLOT")
}

/// A converged cluster: `masters[i]` owns the i-th even share of the slots, and
/// `replicas[i]` are its replicas with a live replication link.
pub struct Cluster {
    pub masters: Vec<ClusterNode>,
    pub replicas: Vec<Vec<ClusterNode>>,
}

impl Cluster {
    /// Starts `masters` masters with `replicas_per_master` replicas each, gpucache loaded with
    /// `module_args` everywhere, and waits until every node reports `cluster_state:ok` and every
    /// replica's link to its master is up.
    pub fn start(masters: usize, replicas_per_master: usize, module_args: &[&str]) -> Cluster {
        assert!(masters >= 1, "a cluster needs a master");
        let masters: Vec<ClusterNode> = (0..masters)
            .map(|_| ClusterNode::start(module_args, &[]))
            .collect();
        let replicas: Vec<Vec<ClusterNode>> = masters
            .iter()
            .map(|_| {
                (0..replicas_per_master)
                    .map(|_| ClusterNode::start(module_args, &[]))
                    .collect()
            })
            .collect();
        Cluster::assemble(masters, replicas)
    }

    /// Every node, masters first.
    pub fn nodes(&self) -> impl Iterator<Item = &ClusterNode> {
        self.masters.iter().chain(self.replicas.iter().flatten())
    }

    /// Waits until every node reports `cluster_state:ok` and every replica's link is up.
    pub fn wait_converged(&self) {
        eventually("cluster_state:ok on every node", CONVERGE, || {
            self.nodes()
                .all(|n| n.cluster_info("cluster_state").as_deref() == Some("ok"))
        });
        eventually("every replica linked to its master", CONVERGE, || {
            self.replicas.iter().flatten().all(|r| {
                r.replication_info("role").as_deref() == Some("slave")
                    && r.replication_info("master_link_status").as_deref() == Some("up")
            })
        });
    }

    /// Waits until every replica of master `i` acknowledged its writes so far (`WAIT`).
    pub fn wait_replicated(&self, i: usize) {
        let expected = self.replicas[i].len();
        let acknowledged: usize = redis::cmd("WAIT")
            .arg(expected)
            .arg(10_000)
            .query(&mut self.masters[i].connect())
            .expect("WAIT");
        assert_eq!(acknowledged, expected, "replicas of master {i} lag behind");
    }
}

/// Creates `user` on the server behind `con` with the rules its `user <name> ...` line in
/// `config` (a redis.conf) gives it — for servers the harness starts without that file.
pub fn set_user_from(config: &str, user: &str, con: &mut Connection) {
    let prefix = format!("user {user} ");
    let line = config
        .lines()
        .find(|l| l.starts_with(&prefix))
        .unwrap_or_else(|| panic!("no `user {user}` line"));
    redis::cmd("ACL")
        .arg("SETUSER")
        .arg(user)
        .arg(line[prefix.len()..].split_whitespace().collect::<Vec<_>>())
        .query::<()>(con)
        .expect("ACL SETUSER");
}

impl ClusterNode {
    /// As `start`, with the cluster bus on `bus_port`: for a caller that chooses another port of
    /// the node itself (e.g. `--tls-port`) and must keep the two apart.
    pub fn start_on_bus(module_args: &[&str], server_args: &[&str], bus_port: u16) -> ClusterNode {
        let bus = bus_port.to_string();
        let mut args = cluster_args(&bus).to_vec();
        args.extend_from_slice(server_args);
        let server = Server::start(module_args, &args);
        let id: String = redis::cmd("CLUSTER")
            .arg("MYID")
            .query(&mut server.connect())
            .expect("CLUSTER MYID");
        ClusterNode {
            server,
            bus_port,
            id,
        }
    }
}

impl Cluster {
    /// A cluster of nodes already started (by `start`, or by the caller, e.g. with TLS
    /// settings): introduces them, gives `masters[i]` the i-th even share of the slots, makes
    /// `replicas[i]` its replicas, and waits until the cluster has converged.
    pub fn assemble(masters: Vec<ClusterNode>, replicas: Vec<Vec<ClusterNode>>) -> Cluster {
        assert!(!masters.is_empty(), "a cluster needs a master");
        assert!(
            replicas.len() <= masters.len(),
            "replicas of unknown masters"
        );
        let cluster = Cluster { masters, replicas };
        for node in cluster.nodes().skip(1) {
            cluster.masters[0].meet(node);
        }
        let all: Vec<String> = cluster.nodes().map(|n| n.id.clone()).collect();
        eventually("every node knows every other", CONVERGE, || {
            cluster.nodes().all(|n| {
                let known = n.known_ids();
                all.iter().all(|id| known.contains(id))
            })
        });
        let count = cluster.masters.len();
        for (i, master) in cluster.masters.iter().enumerate() {
            master.add_slots(
                (16384 * i / count) as u16,
                (16384 * (i + 1) / count - 1) as u16,
            );
        }
        for (master, replicas) in cluster.masters.iter().zip(&cluster.replicas) {
            for replica in replicas {
                replica.replicate(master);
            }
        }
        cluster.wait_converged();
        cluster
    }
}

/// Up to `count` keys the node behind `con` holds in `slot` (`CLUSTER GETKEYSINSLOT`).
pub fn keys_in_slot(con: &mut Connection, slot: u16, count: usize) -> Vec<String> {
    redis::cmd("CLUSTER")
        .arg("GETKEYSINSLOT")
        .arg(slot)
        .arg(count)
        .query(con)
        .unwrap()
}

/// Moves `keys` from the node behind `con` to `target` with one `MIGRATE` (never `REPLACE`).
pub fn migrate(con: &mut Connection, target: &ClusterNode, keys: &[String]) -> RedisResult<()> {
    redis::cmd("MIGRATE")
        .arg("127.0.0.1")
        .arg(target.server.port)
        .arg("")
        .arg(0)
        .arg(5000)
        .arg("KEYS")
        .arg(keys)
        .query(con)
}

/// Sends `args` to `con` after `ASKING`, as a cluster client does after an `ASK` redirection.
pub fn asking(con: &mut Connection, args: &[&str]) -> RedisResult<Value> {
    let mut pipe = redis::pipe();
    pipe.cmd("ASKING").ignore();
    let mut cmd = redis::cmd(args[0]);
    for arg in &args[1..] {
        cmd.arg(*arg);
    }
    pipe.add_command(cmd);
    pipe.query::<Vec<Value>>(con)
        .map(|mut replies| replies.pop().unwrap_or(Value::Nil))
}

/// `CLUSTER SETSLOT <slot> <state> <id>` on the node behind `con`.
pub fn set_slot(con: &mut Connection, slot: u16, state: &str, id: &str) {
    redis::cmd("CLUSTER")
        .arg("SETSLOT")
        .arg(slot)
        .arg(state)
        .arg(id)
        .query::<()>(con)
        .unwrap_or_else(|e| panic!("SETSLOT {state}: {e}"));
}

/// Opens the move of `slot` from `source` to `target` as `redis-cli --cluster reshard` does:
/// `IMPORTING` on the target, then `MIGRATING` on the source.
pub fn begin_slot_move(slot: u16, source: &ClusterNode, target: &ClusterNode) {
    set_slot(&mut target.connect(), slot, "IMPORTING", &source.id);
    set_slot(&mut source.connect(), slot, "MIGRATING", &target.id);
}

/// Closes the move of `slot` from `source` to `target` once its keys are there: `SETSLOT ...
/// NODE` on the target, the source, then each of `others` (the remaining masters).
pub fn end_slot_move(
    slot: u16,
    source: &ClusterNode,
    target: &ClusterNode,
    others: &[&ClusterNode],
) {
    for node in [target, source].into_iter().chain(others.iter().copied()) {
        set_slot(&mut node.connect(), slot, "NODE", &target.id);
    }
}
