//! `rediss://`: every connection the edge opens (loader pool, notification link, stream link,
//! the connections `durable` and the CLI use) works against a redis-server that speaks TLS
//! only (`--port 0`), trusting a throwaway CA generated here; a missing or wrong CA fails with
//! a clear connection error instead of hanging.

#[path = "../../tests/common/mod.rs"]
mod common;

use common::{eventually, fields, free_port, module_path, register, run};
use gpucache_edge::durable::{book_durably, BookOutcome, BookRequest, BookingResult, Durability};
use gpucache_edge::{connect, Edge, EdgeConfig, EdgeError, LinkConfig, Query, TlsConfig};
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};
use redis::Connection;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

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
/// `Server` checks readiness over plain TCP, so this one has its own, over TLS.
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
        let deadline = Instant::now() + DEADLINE;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return false;
            }
            if let Ok(mut con) = connect::connection(&self.url(), &pki.mutual()) {
                let info: redis::RedisResult<String> =
                    redis::cmd("INFO").arg("server").query(&mut con);
                if let Ok(info) = info {
                    let pid = info
                        .lines()
                        .find_map(|l| l.trim_end().strip_prefix("process_id:"))
                        .and_then(|p| p.parse::<u32>().ok());
                    return pid == Some(self.child.id())
                        && redis::cmd("PING").query::<String>(&mut con).is_ok();
                }
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
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
    let list: String = redis::cmd("CLIENT").arg("LIST").query(con).unwrap();
    list.lines()
        .filter_map(|l| l.split(' ').find_map(|f| f.strip_prefix("name=")))
        .filter(|n| !n.is_empty())
        .map(str::to_string)
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
