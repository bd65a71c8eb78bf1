//! TLS for the gateway's listeners (HTTP API, embedded MQTT broker): certificate and key from
//! PEM files, rustls with the `ring` provider only (aws-lc-rs would need cmake to build).
//! What this is not: client certificates (devices authenticate with MQTT username/password).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use serde::{Deserialize, Serialize};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;

/// `[http.tls]` / `[mqtt.tls]`: PEM files. `cert` holds the server certificate first, then any
/// intermediates; `key` a PKCS#8, PKCS#1 or SEC1 private key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// Errors loading certificates.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("certificate file {path}: {reason}")]
    Cert { path: String, reason: String },
    #[error("private key file {path}: {reason}")]
    Key { path: String, reason: String },
    #[error("TLS settings: {0}")]
    Rustls(#[from] rustls::Error),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// How long a client may take over the TLS handshake before it is dropped.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// The ring provider: every TLS object of the gateway is built from it, so no process-wide
/// default provider has to be installed.
pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A server configuration from the PEM files (read now, so a bad path fails at start).
pub fn server_config(cfg: &TlsConfig) -> Result<Arc<rustls::ServerConfig>> {
    let cert_err = |reason: String| Error::Cert { path: cfg.cert.display().to_string(), reason };
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&cfg.cert)
        .map_err(|e| cert_err(e.to_string()))?
        .collect::<std::result::Result<_, _>>()
        .map_err(|e| cert_err(e.to_string()))?;
    if certs.is_empty() {
        return Err(cert_err("no CERTIFICATE in the file".into()));
    }
    let key = PrivateKeyDer::from_pem_file(&cfg.key).map_err(|e| Error::Key { path: cfg.key.display().to_string(), reason: e.to_string() })?;
    let config = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(certs, key)?;
    Ok(Arc::new(config))
}

/// An acceptor for [`TlsConfig`].
pub fn acceptor(cfg: &TlsConfig) -> Result<TlsAcceptor> {
    Ok(TlsAcceptor::from(server_config(cfg)?))
}

/// A TCP listener whose connections come out TLS-terminated, for `axum::serve`. Handshakes run
/// in their own tasks (one slow client does not hold up the others) and those that fail or take
/// longer than [`HANDSHAKE_TIMEOUT`] are dropped and counted.
#[derive(Debug)]
pub struct TlsListener {
    ready: mpsc::Receiver<(TlsStream<TcpStream>, SocketAddr)>,
    local: SocketAddr,
    accept_loop: tokio::task::JoinHandle<()>,
    failed: Arc<std::sync::atomic::AtomicU64>,
}

impl TlsListener {
    pub fn new(listener: TcpListener, acceptor: TlsAcceptor) -> std::io::Result<TlsListener> {
        let local = listener.local_addr()?;
        let (tx, ready) = mpsc::channel(64);
        let failed = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let failures = Arc::clone(&failed);
        let accept_loop = tokio::spawn(async move {
            loop {
                let (tcp, peer) = match listener.accept().await {
                    Ok(c) => c,
                    Err(e) => {
                        // Out of file descriptors and the like: wait and go on (as axum does).
                        tracing::warn!(error = %e, "TLS listener: accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                };
                if tx.is_closed() {
                    return;
                }
                let (acceptor, tx, failures) = (acceptor.clone(), tx.clone(), Arc::clone(&failures));
                tokio::spawn(async move {
                    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                        Ok(Ok(tls)) => {
                            let _ = tx.send((tls, peer)).await;
                        }
                        Ok(Err(e)) => {
                            failures.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                            tracing::debug!(%peer, error = %e, "TLS handshake failed");
                        }
                        Err(_) => {
                            failures.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                            tracing::debug!(%peer, "TLS handshake timed out");
                        }
                    }
                });
            }
        });
        Ok(TlsListener { ready, local, accept_loop, failed })
    }

    /// Handshakes that failed or timed out since start.
    pub fn failed_handshakes(&self) -> Arc<std::sync::atomic::AtomicU64> {
        Arc::clone(&self.failed)
    }
}

impl Drop for TlsListener {
    fn drop(&mut self) {
        self.accept_loop.abort();
    }
}

impl axum::serve::Listener for TlsListener {
    type Io = TlsStream<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.ready.recv().await {
            Some(conn) => conn,
            // The accept loop only ends when this listener is dropped; never resolve.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        Ok(self.local)
    }
}

#[cfg(test)]
pub mod testing {
    //! Self-signed certificates for tests (rcgen, ring).
    use std::path::Path;

    /// Writes `cert.pem` and `key.pem` for `localhost` / 127.0.0.1 into `dir`; returns the
    /// config and the certificate PEM (for the client's trust store).
    pub fn self_signed(dir: &Path) -> (super::TlsConfig, String) {
        let cert = rcgen::generate_simple_self_signed(vec!["localhost".to_owned(), "127.0.0.1".to_owned()]).expect("rcgen");
        let cert_pem = cert.cert.pem();
        let (cert_path, key_path) = (dir.join("cert.pem"), dir.join("key.pem"));
        std::fs::write(&cert_path, &cert_pem).expect("write cert");
        std::fs::write(&key_path, cert.signing_key.serialize_pem()).expect("write key");
        (super::TlsConfig { cert: cert_path, key: key_path }, cert_pem)
    }

    /// A client configuration trusting only `cert_pem`.
    pub fn client_config(cert_pem: &str) -> std::sync::Arc<rustls::ClientConfig> {
        use rustls::pki_types::pem::PemObject;
        let mut roots = rustls::RootCertStore::empty();
        roots.add(rustls::pki_types::CertificateDer::from_pem_slice(cert_pem.as_bytes()).expect("pem")).expect("root");
        std::sync::Arc::new(
            rustls::ClientConfig::builder_with_provider(super::provider())
                .with_safe_default_protocol_versions()
                .expect("versions")
                .with_root_certificates(roots)
                .with_no_client_auth(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// One HTTP/1.1 request over TLS to `addr`, trusting `cert_pem`; the raw answer.
    async fn https_get(addr: SocketAddr, cert_pem: &str, path: &str) -> std::io::Result<String> {
        let connector = tokio_rustls::TlsConnector::from(testing::client_config(cert_pem));
        let tcp = TcpStream::connect(addr).await?;
        let name = rustls::pki_types::ServerName::try_from("localhost").expect("name");
        let mut tls = connector.connect(name, tcp).await?;
        tls.write_all(format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n").as_bytes()).await?;
        let mut answer = String::new();
        tls.read_to_string(&mut answer).await?;
        Ok(answer)
    }

    #[tokio::test]
    async fn https_listener_serves_the_router_and_drops_bad_handshakes() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (cfg, cert_pem) = testing::self_signed(dir.path());
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let tls = TlsListener::new(listener, acceptor(&cfg).expect("acceptor")).expect("listener");
        let addr = axum::serve::Listener::local_addr(&tls).expect("addr");
        let failed = tls.failed_handshakes();
        let app = axum::Router::new().route("/hello", axum::routing::get(|| async { "hello over tls" }));
        let server = tokio::spawn(async move { axum::serve(tls, app).await });

        // Plain HTTP to the TLS port: the handshake fails, the connection is dropped.
        let mut plain = TcpStream::connect(addr).await.expect("connect");
        plain.write_all(b"GET /hello HTTP/1.1\r\nHost: x\r\n\r\n").await.expect("write");
        let mut buf = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(10), plain.read_to_end(&mut buf)).await.expect("closed in time");
        assert!(!String::from_utf8_lossy(&buf).contains("hello over tls"));

        let answer = tokio::time::timeout(Duration::from_secs(10), https_get(addr, &cert_pem, "/hello")).await.expect("in time").expect("https");
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        assert!(answer.ends_with("hello over tls"), "{answer}");
        // Counted right after the failed handshake drops the connection: wait for it, bounded.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while failed.load(std::sync::atomic::Ordering::Relaxed) == 0 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(failed.load(std::sync::atomic::Ordering::Relaxed), 1);

        // A client that trusts another certificate refuses this server.
        let other = tempfile::tempdir().expect("tempdir");
        let (_, other_pem) = testing::self_signed(other.path());
        assert!(https_get(addr, &other_pem, "/hello").await.is_err());
        server.abort();
    }

    #[test]
    fn unreadable_files_are_named() {
        let dir = tempfile::tempdir().expect("tempdir");
        let missing = TlsConfig { cert: dir.path().join("none.pem"), key: dir.path().join("none-key.pem") };
        let err = server_config(&missing).expect_err("missing").to_string();
        assert!(err.contains("none.pem"), "{err}");
        let (good, _) = testing::self_signed(dir.path());
        std::fs::write(dir.path().join("empty.pem"), "").expect("write");
        let err = server_config(&TlsConfig { key: dir.path().join("empty.pem"), ..good }).expect_err("no key").to_string();
        assert!(err.contains("private key file"), "{err}");
    }
}
