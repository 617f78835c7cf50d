//! `rediss://`: every connection the edge opens (loader pool, notification link, stream link,
//! the connections `durable` and the CLI use) works against a redis-server that speaks TLS
//! only (`--port 0`), trusting a throwaway CA generated here; a missing or wrong CA fails with
//! a clear connection error instead of hanging. The same holds for an edge following a Redis
//! Cluster whose nodes (and cluster bus) speak TLS, and a TLS primary found through Sentinel
//! and followed across a failover: every edge connection comes in on the TLS port.

#[path = "../../tests/common/mod.rs"]
mod common;
mod support;

use common::cluster::{key_slot, Cluster, ClusterNode};
use common::sentinel::{Sentinel, MASTER};
use common::{eventually, fields, free_port, module_path, register, run};
use gpucache_edge::durable::{book_durably, BookOutcome, BookRequest, BookingResult, Durability};
use gpucache_edge::{
    connect, keyspace, Edge, EdgeConfig, EdgeError, InvalidationHook, LinkConfig, Query, Source,
    TlsConfig,
};
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};
use redis::Connection;
use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};
use support::{heard, last_event_id};

const DEADLINE: Duration = Duration::from_secs(10);

/// A CA, a server certificate for 127.0.0.1 and localhost, a client certificate, and an
/// unrelated CA, as PEM files in `dir`.
struct Pki {
    dir: PathBuf,
    ca: PathBuf,
    other_ca: PathBuf,
    server_cert: PathBuf,
    server_key: PathBuf,
    client_cert: PathBuf,
    client_key: PathBuf,
}

fn new_ca(name: &str) -> CertifiedIssuer<'static, KeyPair> {
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.distinguished_name.push(DnType::CommonName, name);
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap()
}

/// A certificate signed by `ca`; its PEM and its key's PEM.
fn leaf(
    ca: &CertifiedIssuer<'static, KeyPair>,
    names: &[&str],
    usage: ExtendedKeyUsagePurpose,
) -> (String, String) {
    let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
    let mut params = CertificateParams::new(names.clone()).unwrap();
    params
        .distinguished_name
        .push(DnType::CommonName, &names[0]);
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![usage];
    params.use_authority_key_identifier_extension = true;
    let key = KeyPair::generate().unwrap();
    let cert = params.signed_by(&key, ca).unwrap();
    (cert.pem(), key.serialize_pem())
}

impl Pki {
    fn generate() -> Pki {
        let dir = std::env::temp_dir().join(format!(
            "gpucache-edge-tls-{}-{}",
            std::process::id(),
            fastrand::u64(..)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let ca = new_ca("gpucache test CA");
        let other = new_ca("some other CA");
        let (server_cert, server_key) = leaf(
            &ca,
            &["127.0.0.1", "localhost"],
            ExtendedKeyUsagePurpose::ServerAuth,
        );
        let (client_cert, client_key) =
            leaf(&ca, &["gpucache-edge"], ExtendedKeyUsagePurpose::ClientAuth);
        let write = |name: &str, pem: &str| {
            let path = dir.join(name);
            std::fs::write(&path, pem).unwrap();
            path
        };
        Pki {
            ca: write("ca.pem", &ca.pem()),
            other_ca: write("other-ca.pem", &other.pem()),
            server_cert: write("server.pem", &server_cert),
            server_key: write("server-key.pem", &server_key),
            client_cert: write("client.pem", &client_cert),
            client_key: write("client-key.pem", &client_key),
            dir,
        }
    }

    /// Trusts the CA only (what an edge needs when clients are not verified).
    fn ca_only(&self) -> TlsConfig {
        TlsConfig::with_ca_file(&self.ca)
    }

    /// Trusts the CA and presents the client certificate.
    fn mutual(&self) -> TlsConfig {
        TlsConfig {
            ca_file: Some(self.ca.clone()),
            client_cert_file: Some(self.client_cert.clone()),
            client_key_file: Some(self.client_key.clone()),
        }
    }
}

impl Drop for Pki {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A redis-server with gpucache that listens on a TLS port only (`--port 0`): the harness's
/// `Server` checks readiness over plain TCP, so this one runs the same check over TLS.
struct TlsServer {
    port: u16,
    dir: PathBuf,
    child: Child,
}

impl TlsServer {
    fn start(pki: &Pki, extra: &[&str]) -> TlsServer {
        for _ in 0..5 {
            let port = free_port();
            let dir = pki.dir.join(format!("server-{port}"));
            std::fs::create_dir_all(&dir).unwrap();
            let child = Command::new("redis-server")
                .args(["--port", "0", "--tls-port", &port.to_string()])
                .args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
                .arg("--dir")
                .arg(&dir)
                .arg("--tls-cert-file")
                .arg(&pki.server_cert)
                .arg("--tls-key-file")
                .arg(&pki.server_key)
                .arg("--tls-ca-cert-file")
                .arg(&pki.ca)
                .args(["--notify-keyspace-events", "Kd"])
                .args(["--repl-diskless-sync-delay", "0"])
                .arg("--loadmodule")
                .arg(module_path())
                .args(extra)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("redis-server must be installed");
            let mut server = TlsServer { port, dir, child };
            if server.wait_ready(pki) {
                return server;
            }
        }
        panic!("redis-server with TLS did not start on any of 5 ports");
    }

    /// Our process answers PING over TLS (checked by its pid: the port may have been taken).
    fn wait_ready(&mut self, pki: &Pki) -> bool {
        let url = self.url();
        common::wait_ready(&mut self.child, || {
            connect::connection(&url, &pki.mutual()).ok()
        })
    }

    fn url(&self) -> String {
        format!("rediss://127.0.0.1:{}/", self.port)
    }

    /// A TLS connection that presents the client certificate (works with either
    /// `tls-auth-clients` setting).
    fn connect(&self, pki: &Pki) -> Connection {
        connect::connection(&self.url(), &pki.mutual()).unwrap()
    }
}

impl Drop for TlsServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn edge(server: &TlsServer, tls: TlsConfig, link: LinkConfig) -> Edge {
    let mut config = EdgeConfig::new(&server.url(), &["eu"]);
    config.tls = tls;
    config.link = link;
    Edge::start(config).expect("edge starts")
}

fn status(edge: &Edge, gpu: &str) -> Option<String> {
    edge.cached(&Query::gpu("eu", gpu))
        .and_then(|v| v["status"].as_str().map(str::to_string))
}

/// Names of the connected clients (`CLIENT LIST`).
fn client_names(con: &mut Connection) -> Vec<String> {
    clients(con)
        .into_iter()
        .filter_map(|c| c.get("name").filter(|n| !n.is_empty()).cloned())
        .collect()
}

#[test]
fn an_edge_trusting_the_ca_reads_and_is_invalidated_over_tls() {
    let pki = Pki::generate();
    let server = TlsServer::start(&pki, &["--tls-auth-clients", "no"]);
    let mut writer = server.connect(&pki);
    register(&mut writer, "eu", "g1", "p1", "A100", "2.5");
    register(&mut writer, "eu", "g2", "p1", "A100", "1.5");

    // Both links (notifications on), and the stream link alone: each must invalidate by itself.
    let both = edge(&server, pki.ca_only(), LinkConfig::default());
    let stream_only = edge(
        &server,
        pki.ca_only(),
        LinkConfig {
            notifications: false,
            ..LinkConfig::default()
        },
    );
    for edge in [&both, &stream_only] {
        assert!(edge.wait_connected(DEADLINE), "links come up over TLS");
    }
    let names = client_names(&mut writer);
    for name in ["gpucache-edge-notify", "gpucache-edge-stream"] {
        assert!(names.iter().any(|n| n == name), "{name} in {names:?}");
    }

    // Reads through the TLS loader pool are cached.
    for edge in [&both, &stream_only] {
        for gpu in ["g1", "g2"] {
            eventually("the read is cached", DEADLINE, || {
                let loaded = edge.get(&Query::gpu("eu", gpu)).expect("load over TLS");
                loaded["status"] == "available" && status(edge, gpu).as_deref() == Some("available")
            });
        }
    }
    let before = (both.stats(), stream_only.stats());

    // A write over TLS invalidates both L1s; g2, unchanged, stays cached.
    run(&mut writer, &["GPUCACHE.STATUS", "eu", "g1", "offline"]).unwrap();
    for edge in [&both, &stream_only] {
        eventually("g1's old status is no longer served", DEADLINE, || {
            status(edge, "g1").as_deref() != Some("available")
        });
        assert_eq!(
            edge.get(&Query::gpu("eu", "g1")).unwrap()["status"],
            "offline"
        );
        assert_eq!(status(edge, "g2").as_deref(), Some("available"));
    }
    eventually("both links delivered the write", DEADLINE, || {
        let stats = both.stats();
        stats.notifications > before.0.notifications && stats.stream_events > before.0.stream_events
    });
    let stats = stream_only.stats();
    assert!(stats.stream_events > before.1.stream_events, "{stats:?}");
    assert_eq!(stats.notifications, 0, "{stats:?}");
}

/// Runs `f` on another thread; panics if it takes longer than `limit` (a hang).
fn within<T: Send + 'static>(
    limit: Duration,
    what: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> T {
    let (done, result) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = done.send(f());
    });
    result
        .recv_timeout(limit)
        .unwrap_or_else(|_| panic!("{what} took longer than {limit:?}"))
}

#[test]
fn without_the_ca_or_with_another_ca_the_edge_fails_with_a_connection_error() {
    let pki = Pki::generate();
    let server = TlsServer::start(&pki, &["--tls-auth-clients", "no"]);
    let mut writer = server.connect(&pki);
    register(&mut writer, "eu", "g1", "p1", "A100", "2.5");

    // The system's roots (no CA file), then an unrelated CA.
    for tls in [TlsConfig::default(), TlsConfig::with_ca_file(&pki.other_ca)] {
        let url = server.url();
        let (edge_tls, con_tls) = (tls.clone(), tls.clone());
        let edge = within(DEADLINE, "Edge::start", move || {
            let mut config = EdgeConfig::new(&url, &["eu"]);
            config.tls = edge_tls;
            Edge::start(config).expect("starts: the links retry in the background")
        });
        let started = Instant::now();
        let error = edge.get(&Query::gpu("eu", "g1")).unwrap_err();
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "a read waits for its timeout only"
        );
        match &error {
            EdgeError::Connection(m) => {
                assert!(m.contains("UnknownIssuer"), "{tls:?}: {m}")
            }
            other => panic!("{tls:?}: not a connection error: {other:?}"),
        }
        assert!(!edge.wait_connected(Duration::from_millis(500)));
        assert_eq!(edge.stats().connection, "disconnected");
        let names = client_names(&mut writer);
        assert!(
            !names.iter().any(|n| n.starts_with("gpucache-edge")),
            "{names:?}"
        );
        within(DEADLINE, "dropping the edge", move || drop(edge));

        let url = server.url();
        match within(DEADLINE, "connect::connection", move || {
            connect::connection(&url, &con_tls)
        }) {
            Err(EdgeError::Connection(m)) => {
                assert!(m.contains("UnknownIssuer"), "{m}")
            }
            Err(other) => panic!("not a connection error: {other:?}"),
            Ok(_) => panic!("{tls:?}: connected without trusting the server's CA"),
        }
    }

    // Files that cannot be used fail Edge::start itself, naming the file.
    let missing = pki.dir.join("missing.pem");
    let mut config = EdgeConfig::new(&server.url(), &["eu"]);
    config.tls = TlsConfig::with_ca_file(&missing);
    match Edge::start(config) {
        Err(EdgeError::Connection(m)) => {
            assert!(
                m.contains("TLS CA file") && m.contains("missing.pem"),
                "{m}"
            )
        }
        Err(other) => panic!("not a connection error: {other:?}"),
        Ok(_) => panic!("started with a missing CA file"),
    }
}

#[test]
fn a_rediss_url_naming_a_plain_port_fails_at_once_instead_of_hanging() {
    let pki = Pki::generate();
    let plain = common::Server::start(&[], &["--notify-keyspace-events", "Kd"]);
    let url = format!("rediss://127.0.0.1:{}/", plain.port);

    let mut config = EdgeConfig::new(&url, &["eu"]);
    config.tls = pki.ca_only();
    let edge = Edge::start(config).unwrap();
    let started = Instant::now();
    match edge.get(&Query::gpu("eu", "g1")) {
        Err(EdgeError::Connection(m)) => assert!(m.contains("answered in plain text"), "{m}"),
        other => panic!("not a connection error: {other:?}"),
    }
    assert!(started.elapsed() < Duration::from_secs(5));
    assert!(!edge.wait_connected(Duration::from_millis(500)));
    // The links are not stuck in a handshake: the edge stops.
    within(DEADLINE, "dropping the edge", move || drop(edge));

    let tls = pki.ca_only();
    match within(DEADLINE, "connect::connection", move || {
        connect::connection(&url, &tls)
    }) {
        Err(EdgeError::Connection(m)) => {
            assert!(m.contains("must name the server's TLS port"), "{m}")
        }
        other => panic!("not a connection error: {:?}", other.map(|_| ())),
    }
}

#[test]
fn a_server_that_verifies_clients_accepts_the_edges_certificate_only() {
    let pki = Pki::generate();
    let server = TlsServer::start(&pki, &["--tls-auth-clients", "yes"]);
    let mut writer = server.connect(&pki);
    register(&mut writer, "eu", "g1", "p1", "A100", "2.5");

    let edge = edge(&server, pki.mutual(), LinkConfig::default());
    assert!(
        edge.wait_connected(DEADLINE),
        "links come up with a client certificate"
    );
    eventually("the read is cached", DEADLINE, || {
        edge.get(&Query::gpu("eu", "g1")).is_ok() && status(&edge, "g1").is_some()
    });
    run(&mut writer, &["GPUCACHE.STATUS", "eu", "g1", "offline"]).unwrap();
    eventually("invalidated", DEADLINE, || {
        status(&edge, "g1").as_deref() != Some("available")
    });

    // Trusting the server is not enough: the server refuses an edge without a certificate.
    let anonymous = self::edge(&server, pki.ca_only(), LinkConfig::default());
    match anonymous.get(&Query::gpu("eu", "g1")) {
        Err(EdgeError::Connection(_)) => {}
        other => panic!("served without a client certificate: {other:?}"),
    }
    assert!(!anonymous.wait_connected(Duration::from_millis(500)));
}

#[test]
fn durable_bookings_work_over_tls() {
    let pki = Pki::generate();
    let primary = TlsServer::start(&pki, &["--tls-auth-clients", "no"]);
    let primary_port = primary.port.to_string();
    // The replica follows the primary over TLS too (`--tls-replication yes`).
    let replica = TlsServer::start(
        &pki,
        &[
            "--tls-auth-clients",
            "no",
            "--tls-replication",
            "yes",
            "--replicaof",
            "127.0.0.1",
            &primary_port,
        ],
    );
    let mut admin = primary.connect(&pki);
    register(&mut admin, "eu", "g1", "p1", "A100", "2.5");
    let mut replica_con = replica.connect(&pki);
    eventually("the replica is in sync", Duration::from_secs(20), || {
        let info: String = redis::cmd("INFO")
            .arg("replication")
            .query(&mut replica_con)
            .unwrap();
        info.contains("master_link_status:up")
    });

    let mut con = connect::connection(&primary.url(), &pki.ca_only()).expect("TLS connection");
    let request = BookRequest::new("eu", "g1", "b1", "alice", 3600);
    let outcome = book_durably(
        &mut con,
        &request,
        &Durability::replicas(1, Duration::from_secs(5)),
    )
    .expect("booked over TLS");
    match outcome {
        BookOutcome::Durable { booking, acks } => {
            assert_eq!(booking.result, BookingResult::Created);
            assert_eq!(acks.replicas, 1);
        }
        other => panic!("not durable: {other:?}"),
    }
    let on_replica = fields(&mut replica_con, &["GPUCACHE.GET", "eu", "g1"]);
    assert_eq!(on_replica["status"], "busy", "{on_replica:?}");
    assert_eq!(on_replica["booking_id"], "b1", "{on_replica:?}");
}

/// Kills the CLI process this test started when the test ends.
struct Cli(Child);

impl Drop for Cli {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn lines(stream: impl std::io::Read + Send + 'static) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stream).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

#[test]
fn the_cli_watches_a_tls_server_with_a_ca_file() {
    let pki = Pki::generate();
    let server = TlsServer::start(&pki, &["--tls-auth-clients", "no"]);
    let mut writer = server.connect(&pki);
    register(&mut writer, "eu", "g1", "p1", "A100", "2.5");

    let bin = env!("CARGO_BIN_EXE_gpucache-edge");
    let watch = |ca: &Path| {
        Command::new(bin)
            .args([
                "watch",
                "--url",
                &server.url(),
                "--region",
                "eu",
                "--tls-ca-file",
            ])
            .arg(ca)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    let mut cli = Cli(watch(&pki.ca));
    let stdout = lines(cli.0.stdout.take().unwrap());
    let stderr = lines(cli.0.stderr.take().unwrap());
    let banner = stderr.recv_timeout(DEADLINE).expect("watch starts");
    assert!(banner.starts_with("watching eu"), "{banner}");

    // The event reader may subscribe a moment after the banner: write until both kinds arrive.
    let (mut notified, mut evented) = (false, false);
    let deadline = Instant::now() + DEADLINE;
    for status in ["offline", "available"].iter().cycle() {
        assert!(
            Instant::now() < deadline,
            "notify {notified}, event {evented}"
        );
        run(&mut writer, &["GPUCACHE.STATUS", "eu", "g1", status]).unwrap();
        while let Ok(line) = stdout.recv_timeout(Duration::from_millis(200)) {
            notified |= line.starts_with("notify gpucache:{eu}:gpu:g1 ");
            evented |= line.starts_with("event  gpucache:{eu}:events ");
        }
        if notified && evented {
            break;
        }
    }

    // Another CA: the CLI exits at once with the handshake error.
    let mut refused = Cli(watch(&pki.other_ca));
    let errors = lines(refused.0.stderr.take().unwrap());
    let deadline = Instant::now() + DEADLINE;
    let exit = loop {
        if let Some(exit) = refused.0.try_wait().unwrap() {
            break exit;
        }
        assert!(
            Instant::now() < deadline,
            "the CLI hangs on a server it cannot trust"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(!exit.success());
    let message: Vec<String> = errors.iter().collect();
    assert!(message.join("\n").contains("UnknownIssuer"), "{message:?}");
}

// ---- A Redis Cluster and a primary behind Sentinel, over TLS ----

/// `CLIENT LIST`, one map of `field -> value` per client.
fn clients(con: &mut Connection) -> Vec<HashMap<String, String>> {
    let list: String = redis::cmd("CLIENT").arg("LIST").query(con).unwrap();
    list.lines()
        .map(|line| {
            line.split(' ')
                .filter_map(|f| f.split_once('='))
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        })
        .collect()
}

/// The edge's connections to a server: its links (named) and its loader's (whose last command
/// was a gpucache read), with the local port each came in on (`laddr`).
fn edge_clients(con: &mut Connection) -> Vec<(String, u16)> {
    clients(con)
        .into_iter()
        .filter_map(|c| {
            let name = c.get("name").cloned().unwrap_or_default();
            let cmd = c.get("cmd").cloned().unwrap_or_default().to_lowercase();
            let what = if name.starts_with("gpucache-edge") {
                name
            } else if cmd == "gpucache.get" || cmd == "gpucache.available" {
                "loader".to_string()
            } else {
                return None;
            };
            let laddr = &c["laddr"];
            let port = laddr.rsplit_once(':').unwrap().1.parse().unwrap();
            Some((what, port))
        })
        .collect()
}

/// Asserts that the edge's links and loader are connected to the server behind `con`, and
/// every one of them on `tls_port`.
fn assert_edge_connected_over_tls(con: &mut Connection, tls_port: u16, server: &str) {
    let found = edge_clients(con);
    for wanted in ["gpucache-edge-notify", "gpucache-edge-stream", "loader"] {
        assert!(
            found.iter().any(|(what, _)| what == wanted),
            "{server}: no {wanted} connection in {found:?}"
        );
    }
    assert!(
        found.iter().all(|(_, port)| *port == tls_port),
        "{server}: an edge connection not on the TLS port {tls_port}: {found:?}"
    );
}

/// The ports of the masters `CLUSTER SLOTS` names to the client behind `con`, sorted.
fn slot_master_ports(con: &mut Connection) -> Vec<u16> {
    let ranges: Vec<redis::Value> = redis::cmd("CLUSTER").arg("SLOTS").query(con).unwrap();
    let mut ports: Vec<u16> = ranges
        .iter()
        .map(|range| {
            let redis::Value::Array(fields) = range else {
                panic!("not a slot range: {range:?}")
            };
            let redis::Value::Array(master) = &fields[2] else {
                panic!("no master in {fields:?}")
            };
            redis::from_redis_value(&master[1]).unwrap()
        })
        .collect();
    ports.sort_unstable();
    ports
}

/// A cluster whose nodes listen on a plain port (the harness's own setup) and a TLS port (the
/// edge's), with the cluster bus over TLS (`tls-cluster yes`).
struct TlsCluster {
    cluster: Cluster,
    tls_ports: Vec<u16>,
}

impl TlsCluster {
    fn start(pki: &Pki, masters: usize) -> TlsCluster {
        let path = |p: &Path| p.to_str().unwrap().to_string();
        let mut tls_ports = Vec::new();
        let nodes = (0..masters)
            .map(|_| {
                // Two ports free now, and not the same one twice (the earlier nodes' are taken).
                let bus = free_port();
                let port = std::iter::repeat_with(free_port)
                    .find(|p| *p != bus)
                    .unwrap();
                tls_ports.push(port);
                let args = [
                    "--tls-port".to_string(),
                    port.to_string(),
                    "--tls-cluster".into(),
                    "yes".into(),
                    "--tls-auth-clients".into(),
                    "no".into(),
                    "--tls-cert-file".into(),
                    path(&pki.server_cert),
                    "--tls-key-file".into(),
                    path(&pki.server_key),
                    // The certificate a node presents on the cluster bus, where it is a client.
                    "--tls-client-cert-file".into(),
                    path(&pki.client_cert),
                    "--tls-client-key-file".into(),
                    path(&pki.client_key),
                    "--tls-ca-cert-file".into(),
                    path(&pki.ca),
                    "--notify-keyspace-events".into(),
                    "Kd".into(),
                ];
                let args: Vec<&str> = args.iter().map(String::as_str).collect();
                ClusterNode::start_on_bus(&[], &args, bus)
            })
            .collect();
        TlsCluster {
            cluster: Cluster::assemble(nodes, Vec::new()),
            tls_ports,
        }
    }

    /// The `rediss://` URL of master `i`.
    fn url(&self, i: usize) -> String {
        format!("rediss://127.0.0.1:{}/", self.tls_ports[i])
    }

    /// A region whose slot master `i` owns.
    fn region_on(&self, i: usize) -> String {
        let count = self.cluster.masters.len();
        let (first, last) = (16384 * i / count, 16384 * (i + 1) / count - 1);
        let mut con = self.cluster.masters[0].connect();
        (0..10_000)
            .map(|n| format!("tls{n}"))
            .find(|r| (first..=last).contains(&(key_slot(&mut con, r) as usize)))
            .unwrap()
    }
}

/// Which link told the edge of each key, as an invalidation hook records it.
type Sources = Arc<Mutex<Vec<(String, Source)>>>;

fn recording(sources: &Sources) -> InvalidationHook {
    let sources = sources.clone();
    Arc::new(move |key: &str, source| sources.lock().unwrap().push((key.into(), source)))
}

fn notified(sources: &Sources, key: &str) -> bool {
    sources
        .lock()
        .unwrap()
        .iter()
        .any(|(k, s)| k == key && *s == Source::Notification)
}

/// Loads the GPU until the edge keeps it cached.
fn settle(edge: &Edge, region: &str, gpu: &str) {
    let query = Query::gpu(region, gpu);
    eventually(&format!("{region}/{gpu} stays cached"), DEADLINE, || {
        edge.get(&query).is_ok() && edge.cached(&query).is_some()
    });
}

/// A write on the region's server over TLS reaches the edge through both links: the cached
/// record is dropped (g2, unchanged, stays), the stream link applies the write's event and the
/// notification link delivers its keyspace notification.
fn assert_write_invalidates(
    edge: &Edge,
    sources: &Sources,
    writer: &mut Connection,
    region: &str,
    status: &str,
) {
    run(writer, &["GPUCACHE.STATUS", region, "g1", status]).unwrap();
    let id = last_event_id(writer, region);
    eventually(&format!("{region}/g1 {status} is served"), DEADLINE, || {
        edge.get(&Query::gpu(region, "g1"))
            .is_ok_and(|v| v["status"] == status)
    });
    eventually(&format!("the stream link applies {id}"), DEADLINE, || {
        heard(edge, region).is_some_and(|h| h >= id)
    });
    let key = keyspace::gpu_key(region, "g1");
    eventually(&format!("{key}'s notification arrives"), DEADLINE, || {
        notified(sources, &key)
    });
    assert!(
        edge.cached(&Query::gpu(region, "g2")).is_some(),
        "{region}/g2 did not change"
    );
}

#[test]
fn an_edge_follows_a_tls_cluster_over_tls_on_every_master() {
    let pki = Pki::generate();
    let tls = TlsCluster::start(&pki, 3);
    let masters = &tls.cluster.masters;
    // What discovery relies on: with `tls-cluster yes`, CLUSTER SLOTS names the masters' TLS
    // ports to a TLS client (and their plain ports to a plain one).
    let mut tls_ports = tls.tls_ports.clone();
    tls_ports.sort_unstable();
    let mut plain_ports: Vec<u16> = masters.iter().map(|m| m.server.port).collect();
    plain_ports.sort_unstable();
    let mut admin = connect::connection(&tls.url(0), &pki.ca_only()).unwrap();
    assert_eq!(slot_master_ports(&mut admin), tls_ports);
    assert_eq!(slot_master_ports(&mut masters[0].connect()), plain_ports);

    let regions: Vec<String> = (0..masters.len()).map(|i| tls.region_on(i)).collect();
    let names: Vec<&str> = regions.iter().map(String::as_str).collect();
    let mut writers: Vec<Connection> = (0..masters.len())
        .map(|i| connect::connection(&tls.url(i), &pki.ca_only()).unwrap())
        .collect();
    for (writer, region) in writers.iter_mut().zip(&regions) {
        register(writer, region, "g1", "p1", "A100", "2");
        register(writer, region, "g2", "p2", "H100", "3");
    }

    // One TLS seed; the other masters are discovered, and reached with the same CA.
    let sources = Sources::default();
    let mut config = EdgeConfig::cluster(&[&tls.url(1)], &names);
    config.tls = pki.ca_only();
    let edge = Edge::start_with_hook(config, Some(recording(&sources))).unwrap();
    assert!(edge.wait_connected(DEADLINE), "{:?}", edge.stats());
    let stats = edge.stats();
    for (region, port) in regions.iter().zip(&tls.tls_ports) {
        assert_eq!(
            stats.followed_on.get(region),
            Some(&format!("127.0.0.1:{port}")),
            "{region} is followed on its master's TLS port: {stats:?}"
        );
    }
    for region in &regions {
        settle(&edge, region, "g1");
        settle(&edge, region, "g2");
    }
    for (writer, region) in writers.iter_mut().zip(&regions) {
        assert_write_invalidates(&edge, &sources, writer, region, "offline");
    }
    for (i, master) in masters.iter().enumerate() {
        assert_edge_connected_over_tls(
            &mut master.connect(),
            tls.tls_ports[i],
            &format!("master {i}"),
        );
    }
    let stats = edge.stats();
    assert_eq!(stats.region_drops, 0, "{stats:?}");
    assert_eq!(stats.connection, "connected", "{stats:?}");

    // Another CA, or a seed naming a plain port: reads fail promptly with a connection error
    // that says why, the links stay down, and the edge still stops.
    let plain_seed = format!("rediss://127.0.0.1:{}/", masters[0].server.port);
    for (seed, tls_config, why) in [
        (
            tls.url(0),
            TlsConfig::with_ca_file(&pki.other_ca),
            "UnknownIssuer",
        ),
        (plain_seed, pki.ca_only(), "answered in plain text"),
    ] {
        let mut config = EdgeConfig::cluster(&[&seed], &names);
        config.tls = tls_config;
        let failing = within(DEADLINE, "Edge::start", move || {
            Edge::start(config).expect("starts: the links retry in the background")
        });
        for _ in 0..2 {
            let started = Instant::now();
            match failing.get(&Query::gpu(&regions[0], "g1")) {
                Err(EdgeError::Connection(m)) => assert!(m.contains(why), "{seed}: {m}"),
                other => panic!("{seed}: not a connection error: {other:?}"),
            }
            assert!(started.elapsed() < Duration::from_secs(2), "{seed}");
        }
        assert!(!failing.wait_connected(Duration::from_millis(500)));
        assert!(failing.stats().followed_on.is_empty());
        within(DEADLINE, "dropping the edge", move || drop(failing));
    }
}

/// A Sentinel on a plain port that talks TLS to the servers it monitors (`tls-replication
/// yes`), watching `primary` as `MASTER` (quorum 1: it may fail over alone).
fn tls_sentinel(pki: &Pki, primary: &TlsServer) -> Sentinel {
    let port = free_port();
    let dir = pki.dir.join(format!("sentinel-{port}"));
    let tls = format!(
        "tls-replication yes\ntls-cert-file {}\ntls-key-file {}\ntls-ca-cert-file {}\n",
        pki.server_cert.display(),
        pki.server_key.display(),
        pki.ca.display(),
    );
    Sentinel::start_in(dir, port, primary.port, &tls, Some(Duration::from_secs(1)))
}

/// A TLS connection to `server` that gives up after a second (Sentinel kills clients as it
/// fails over).
fn try_connect(server: &TlsServer, pki: &Pki) -> Result<Connection, EdgeError> {
    let client = connect::client(server.url().as_str(), &pki.ca_only())?;
    let con = connect::open(&client, Some(Duration::from_secs(1)))?;
    con.set_read_timeout(Some(Duration::from_secs(1)))?;
    Ok(con)
}

/// The server's role; empty while it cannot be asked.
fn role(server: &TlsServer, pki: &Pki) -> String {
    try_connect(server, pki)
        .ok()
        .and_then(|mut con| {
            redis::cmd("INFO")
                .arg("replication")
                .query::<String>(&mut con)
                .ok()
        })
        .and_then(|info| common::cluster::info_field(&info, "role"))
        .unwrap_or_default()
}

#[test]
fn an_edge_follows_a_tls_primary_behind_sentinel_across_a_failover() {
    let pki = Pki::generate();
    // TLS only (`--port 0`), replicating over TLS, so a primary or replica can only be reached
    // on its TLS port: the port Sentinel names.
    let tls_only = ["--tls-auth-clients", "no", "--tls-replication", "yes"];
    let primary = TlsServer::start(&pki, &tls_only);
    let primary_port = primary.port.to_string();
    let mut replica_args = tls_only.to_vec();
    replica_args.extend(["--replicaof", "127.0.0.1", &primary_port]);
    let replica = TlsServer::start(&pki, &replica_args);
    let mut writer = primary.connect(&pki);
    register(&mut writer, "eu", "g1", "p1", "A100", "2");
    register(&mut writer, "eu", "g2", "p1", "A100", "2");
    let sentinel = tls_sentinel(&pki, &primary);
    sentinel.wait_for_replica();

    // The Sentinel is asked in plain text; the primary it names is reached over TLS, trusting
    // the CA file (the template URL's scheme and the TLS settings apply to discovered servers).
    let sources = Sources::default();
    let mut config = EdgeConfig::sentinel(&[&sentinel.url()], MASTER, &["eu"]);
    config.url = "rediss://127.0.0.1/".into();
    config.tls = pki.ca_only();
    let edge = Edge::start_with_hook(config, Some(recording(&sources))).unwrap();
    assert!(edge.wait_connected(DEADLINE), "{:?}", edge.stats());
    assert_eq!(
        edge.stats().followed_on.get("eu"),
        Some(&format!("127.0.0.1:{}", primary.port))
    );
    settle(&edge, "eu", "g1");
    settle(&edge, "eu", "g2");
    assert_write_invalidates(&edge, &sources, &mut writer, "eu", "offline");
    assert_edge_connected_over_tls(&mut writer, primary.port, "the first primary");
    let _: i64 = redis::cmd("WAIT")
        .arg(1)
        .arg(5000)
        .query(&mut writer)
        .unwrap();

    sentinel.fail_over_to(replica.port, || role(&replica, &pki) == "master");
    eventually("the edge follows the new primary", DEADLINE, || {
        edge.stats().followed_on.get("eu") == Some(&format!("127.0.0.1:{}", replica.port))
    });
    // Notifications are not replayed: write once the notification link is up there too.
    eventually("every link is up on the new primary", DEADLINE, || {
        edge.stats().connection == "connected"
    });
    settle(&edge, "eu", "g1");
    sources.lock().unwrap().clear();
    let mut writer = try_connect(&replica, &pki).unwrap();
    assert_write_invalidates(&edge, &sources, &mut writer, "eu", "maintenance");
    assert_edge_connected_over_tls(&mut writer, replica.port, "the new primary");
    let stats = edge.stats();
    assert!(stats.region_moves >= 1, "{stats:?}");
    assert_eq!(stats.region_drops, 0, "{stats:?}");
}
