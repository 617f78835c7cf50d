//! Every connection the edge opens — the loader pool, both links, and the connections callers
//! open for [`crate::durable`] — is made from a client built here: plain for `redis://`, TLS
//! (rustls) for `rediss://`.
//!
//! A `rediss://` URL trusts the system's root certificates, or only the CA file in
//! [`TlsConfig::ca_file`]; with a client certificate and key the edge also authenticates
//! itself (servers with `tls-auth-clients yes`). Certificate verification is never turned
//! off: a `rediss://...#insecure` URL is refused.
//!
//! ```no_run
//! use gpucache_edge::{connect, Edge, EdgeConfig, TlsConfig};
//! let tls = TlsConfig::with_ca_file("/etc/gpucache/ca.pem");
//! let mut config = EdgeConfig::new("rediss://10.0.0.5:6380/", &["eu-west"]);
//! config.tls = tls.clone();
//! let edge = Edge::start(config)?;
//! let mut con = connect::connection("rediss://10.0.0.5:6380/", &tls)?; // e.g. for book_durably
//! # Ok::<(), gpucache_edge::EdgeError>(())
//! ```

use crate::error::EdgeError;
use redis::{ConnectionAddr, ConnectionInfo, IntoConnectionInfo, RedisResult};
use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// How long the plain-text check of a `rediss://` port waits when the caller gives no timeout.
const CHECK_TIMEOUT: Duration = Duration::from_secs(2);

/// TLS settings, used by `rediss://` URLs. Files are PEM and read once, when a client is built
/// (at `Edge::start`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TlsConfig {
    /// The CA certificate(s) to trust instead of the system's roots.
    pub ca_file: Option<PathBuf>,
    /// The edge's own certificate (chain), for servers that verify clients; needs
    /// `client_key_file`.
    pub client_cert_file: Option<PathBuf>,
    /// The private key of `client_cert_file`.
    pub client_key_file: Option<PathBuf>,
}

impl TlsConfig {
    /// Trust `ca_file` (PEM) alone.
    pub fn with_ca_file(ca_file: impl Into<PathBuf>) -> TlsConfig {
        TlsConfig {
            ca_file: Some(ca_file.into()),
            ..TlsConfig::default()
        }
    }

    /// Whether anything is set (anything set requires a `rediss://` URL).
    pub fn is_set(&self) -> bool {
        self.ca_file.is_some() || self.client_cert_file.is_some() || self.client_key_file.is_some()
    }
}

/// A client for `target` (a URL or `ConnectionInfo`): plain for `redis://`, TLS as `tls` says
/// for `rediss://`. Fails with `EdgeError::Connection` on a bad URL, an unreadable or empty
/// certificate file, a key without its certificate (or the reverse), TLS settings given for
/// a plain URL, or `#insecure`. Opens no connection.
pub fn client<T: IntoConnectionInfo>(
    target: T,
    tls: &TlsConfig,
) -> Result<redis::Client, EdgeError> {
    let info: ConnectionInfo = target
        .into_connection_info()
        .map_err(|e| EdgeError::Connection(format!("invalid redis URL: {e}")))?;
    match &info.addr {
        ConnectionAddr::TcpTls { insecure: true, .. } => Err(EdgeError::Connection(
            "rediss://...#insecure (TLS without certificate verification) is not supported: \
             give the server's CA certificate as the TLS CA file instead"
                .into(),
        )),
        ConnectionAddr::TcpTls { .. } if tls.is_set() => {
            redis::Client::build_with_tls(info, certificates(tls)?).map_err(|e| {
                EdgeError::Connection(format!("TLS certificates ({}): {e}", describe(tls)))
            })
        }
        ConnectionAddr::TcpTls { .. } => redis::Client::open(info)
            .map_err(|e| EdgeError::Connection(format!("invalid redis URL: {e}"))),
        _ if tls.is_set() => Err(EdgeError::Connection(format!(
            "TLS settings ({}) were given but the URL is not rediss://: the connection would \
             not be encrypted",
            describe(tls)
        ))),
        _ => redis::Client::open(info)
            .map_err(|e| EdgeError::Connection(format!("invalid redis URL: {e}"))),
    }
}

/// One connection to `url`, built as [`client`] does and opened by [`open`] (e.g. for
/// `durable::book_durably`).
pub fn connection(url: &str, tls: &TlsConfig) -> Result<redis::Connection, EdgeError> {
    open(&client(url, tls)?, None)
        .map_err(|e| EdgeError::Connection(format!("{}: {e}", redacted(url))))
}

/// Opens a connection from `client`; `timeout` bounds the TCP connect (none: the system's).
///
/// For `rediss://`, first checks that the port does not answer in plain text: the TLS
/// handshake has no timeout in redis-rs 0.27, and against a plain Redis port (a `rediss://`
/// URL with the server's `port` instead of its `tls-port`) it would wait forever. The check
/// sends `PING` on a separate TCP connection: a plain server answers it, a TLS server drops
/// it. Only a plain-text answer fails the check; anything else leaves the verdict to the
/// connection itself.
pub fn open(client: &redis::Client, timeout: Option<Duration>) -> RedisResult<redis::Connection> {
    refuse_plain_text(
        &client.get_connection_info().addr,
        timeout.unwrap_or(CHECK_TIMEOUT),
    )?;
    match timeout {
        Some(timeout) => client.get_connection_with_timeout(timeout),
        None => client.get_connection(),
    }
}

/// For a `rediss://` address, fails if its port answers in plain text (see [`open`]); any
/// other address passes.
pub(crate) fn refuse_plain_text(addr: &ConnectionAddr, timeout: Duration) -> RedisResult<()> {
    let ConnectionAddr::TcpTls { host, port, .. } = addr else {
        return Ok(());
    };
    let (host, port) = (host.as_str(), *port);
    let Ok(addrs) = (host, port).to_socket_addrs() else {
        return Ok(()); // the connection reports it
    };
    let Some(mut tcp) = addrs
        .into_iter()
        .find_map(|addr| TcpStream::connect_timeout(&addr, timeout).ok())
    else {
        return Ok(());
    };
    let mut first = [0u8; 1];
    let answered = tcp.set_read_timeout(Some(timeout)).is_ok()
        && tcp.set_write_timeout(Some(timeout)).is_ok()
        && tcp.write_all(b"PING\r\n").is_ok()
        && matches!(tcp.read(&mut first), Ok(1));
    // RESP replies start with one of these; a TLS alert with 0x15, a closed socket with nothing.
    if answered && b"+-:$*%_#,(!=>|~".contains(&first[0]) {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!(
                "{host}:{port} answered in plain text: a rediss:// URL must name the server's \
                 TLS port (tls-port), or use redis:// for this one"
            ),
        )
        .into());
    }
    Ok(())
}

/// `tls`'s files, read and checked as [`client`] does, for redis-rs's TLS builders (e.g.
/// `ClusterClientBuilder::certs`).
pub fn certificates(tls: &TlsConfig) -> Result<redis::TlsCertificates, EdgeError> {
    Ok(redis::TlsCertificates {
        client_tls: client_identity(tls)?,
        root_cert: tls
            .ca_file
            .as_deref()
            .map(|path| read_pem(path, "TLS CA file", "CERTIFICATE"))
            .transpose()?,
    })
}

fn client_identity(tls: &TlsConfig) -> Result<Option<redis::ClientTlsConfig>, EdgeError> {
    match (&tls.client_cert_file, &tls.client_key_file) {
        (None, None) => Ok(None),
        (Some(cert), Some(key)) => Ok(Some(redis::ClientTlsConfig {
            client_cert: read_pem(cert, "TLS client certificate file", "CERTIFICATE")?,
            client_key: read_pem(key, "TLS client key file", "PRIVATE KEY")?,
        })),
        (Some(_), None) => Err(EdgeError::Connection(
            "a TLS client certificate was given without its key file".into(),
        )),
        (None, Some(_)) => Err(EdgeError::Connection(
            "a TLS client key was given without its certificate file".into(),
        )),
    }
}

/// The file's bytes, if it holds a PEM block whose label ends with `label` (`CERTIFICATE`;
/// `PRIVATE KEY` also matches `RSA PRIVATE KEY` and `EC PRIVATE KEY`). A file without one
/// would otherwise be accepted and trust nothing (or fail only at the first handshake).
fn read_pem(path: &Path, what: &str, label: &str) -> Result<Vec<u8>, EdgeError> {
    let bytes = std::fs::read(path)
        .map_err(|e| EdgeError::Connection(format!("{what} {}: {e}", path.display())))?;
    let has_block = String::from_utf8_lossy(&bytes).lines().any(|line| {
        line.trim()
            .strip_prefix("-----BEGIN ")
            .and_then(|rest| rest.strip_suffix("-----"))
            .is_some_and(|found| found.ends_with(label))
    });
    if has_block {
        Ok(bytes)
    } else {
        Err(EdgeError::Connection(format!(
            "{what} {}: no PEM {label} in it",
            path.display()
        )))
    }
}

fn describe(tls: &TlsConfig) -> String {
    let files: Vec<String> = [
        ("CA", &tls.ca_file),
        ("client certificate", &tls.client_cert_file),
        ("client key", &tls.client_key_file),
    ]
    .iter()
    .filter_map(|(what, path)| path.as_ref().map(|p| format!("{what} {}", p.display())))
    .collect();
    files.join(", ")
}

/// `url` without a password, for error messages.
fn redacted(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            format!("{}://***@{}", &url[..scheme], &url[at + 1..])
        }
        _ => url.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(result: Result<redis::Client, EdgeError>) -> String {
        match result {
            Err(EdgeError::Connection(m)) => m,
            Err(other) => panic!("not a connection error: {other:?}"),
            Ok(client) => panic!("accepted: {:?}", client.get_connection_info()),
        }
    }

    fn temp_file(name: &str, content: &str) -> PathBuf {
        let path = std::env::temp_dir().join(format!(
            "gpucache-edge-connect-{}-{name}",
            std::process::id()
        ));
        std::fs::write(&path, content).unwrap();
        path
    }

    #[test]
    fn plain_and_tls_urls_without_settings_are_accepted() {
        let none = TlsConfig::default();
        assert!(client("redis://127.0.0.1:6379/", &none).is_ok());
        let tls = client("rediss://127.0.0.1:6380/", &none).unwrap();
        assert!(matches!(
            tls.get_connection_info().addr,
            ConnectionAddr::TcpTls {
                insecure: false,
                ..
            }
        ));
    }

    #[test]
    fn settings_that_would_not_be_used_or_verify_nothing_are_refused() {
        let tls = TlsConfig::with_ca_file("/nonexistent/ca.pem");
        let m = message(client("redis://127.0.0.1:6379/", &tls));
        assert!(
            m.contains("not rediss://") && m.contains("/nonexistent/ca.pem"),
            "{m}"
        );
        let m = message(client(
            "rediss://127.0.0.1:6380/#insecure",
            &TlsConfig::default(),
        ));
        assert!(m.contains("#insecure"), "{m}");
        let m = message(client("nope://x", &TlsConfig::default()));
        assert!(m.starts_with("invalid redis URL"), "{m}");
    }

    #[test]
    fn unreadable_or_empty_files_are_named() {
        let url = "rediss://127.0.0.1:6380/";
        let m = message(client(url, &TlsConfig::with_ca_file("/nonexistent/ca.pem")));
        assert!(m.starts_with("TLS CA file /nonexistent/ca.pem: "), "{m}");

        let empty = temp_file("empty.pem", "not a certificate\n");
        let m = message(client(url, &TlsConfig::with_ca_file(&empty)));
        assert!(m.ends_with("no PEM CERTIFICATE in it"), "{m}");

        let corrupt = temp_file(
            "corrupt.pem",
            "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
        );
        let m = message(client(url, &TlsConfig::with_ca_file(&corrupt)));
        assert!(m.starts_with("TLS certificates (CA "), "{m}");

        let half = TlsConfig {
            client_cert_file: Some(corrupt.clone()),
            ..TlsConfig::default()
        };
        assert!(message(client(url, &half)).contains("without its key file"));
        let key_only = TlsConfig {
            client_key_file: Some(corrupt.clone()),
            ..TlsConfig::default()
        };
        assert!(message(client(url, &key_only)).contains("without its certificate file"));
        let no_key = TlsConfig {
            client_cert_file: Some(corrupt.clone()),
            client_key_file: Some(empty.clone()),
            ..TlsConfig::default()
        };
        assert!(message(client(url, &no_key)).ends_with("no PEM PRIVATE KEY in it"));
        for path in [empty, corrupt] {
            let _ = std::fs::remove_file(path);
        }
    }

    #[test]
    fn passwords_are_not_repeated_in_errors() {
        assert_eq!(
            redacted("rediss://edge:secret@10.0.0.5:6380/"),
            "rediss://***@10.0.0.5:6380/"
        );
        assert_eq!(redacted("redis://10.0.0.5/"), "redis://10.0.0.5/");
    }
}
