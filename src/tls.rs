//! TLS on pullcache's own listeners (`[server.tls]`, `[metrics.tls]`): rustls with ring,
//! TLS 1.2 and 1.3 only (or 1.3 only), and only rustls's cipher suites, which are all
//! AEAD with forward secrecy (no CBC, no RSA key exchange).
//!
//! Certificates are reloaded without a restart ([`crate::watch`]): when one of the files
//! changed, a whole new `ServerConfig` is built from them. New connections take the
//! current one; connections already open keep theirs. A file that does not load (half
//! written, key not matching, not PEM) keeps the previous configuration and logs an error;
//! the next change is tried again.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use actix_web::rt::net::TcpStream;
use pullcache_actors::upstream::{read_certs, read_key};
use rustls::server::WebPkiClientVerifier;
use rustls::ServerConfig;
use serde::{Deserialize, Serialize};
use tokio_rustls::server::TlsStream;

pub use crate::watch::POLL;
/// A client that has not finished its handshake by then is dropped (a slowloris on the
/// handshake would otherwise hold the connection forever).
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// `[server.tls]` and `[metrics.tls]`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TlsSettings {
    /// PEM certificate chain: the leaf, then its intermediates. Unset: plain HTTP.
    pub cert: Option<PathBuf>,
    /// PEM private key of `cert` (PKCS#8, RSA or ECDSA; PKCS#1 and SEC1 also read).
    pub key: Option<PathBuf>,
    /// Lowest TLS version accepted: "1.2" or "1.3".
    pub min_version: MinVersion,
    /// PEM CA certificates: when set, clients must present a certificate signed by one.
    pub client_ca: Option<PathBuf>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum MinVersion {
    #[default]
    #[serde(rename = "1.2")]
    Tls12,
    #[serde(rename = "1.3")]
    Tls13,
}

impl TlsSettings {
    pub fn enabled(&self) -> bool {
        self.cert.is_some()
    }

    /// Checks the keys and loads the files once. `section`: `server.tls` or `metrics.tls`,
    /// named in the error.
    pub fn validate(&self, section: &str) -> Result<(), String> {
        match (&self.cert, &self.key) {
            (None, None) if self.client_ca.is_some() => {
                Err(format!("{section}.client_ca: needs cert and key"))
            }
            (None, None) => Ok(()),
            (Some(_), None) => Err(format!("{section}.key: needed with cert")),
            (None, Some(_)) => Err(format!("{section}.cert: needed with key")),
            (Some(_), Some(_)) => self
                .server_config()
                .map(|_| ())
                .map_err(|e| format!("{section}.{e}")),
        }
    }

    /// A rustls server configuration from the files; errors start with the key at fault.
    fn server_config(&self) -> Result<Arc<ServerConfig>, String> {
        let (Some(cert), Some(key)) = (&self.cert, &self.key) else {
            return Err("cert: not set".into());
        };
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let versions: &[&rustls::SupportedProtocolVersion] = match self.min_version {
            MinVersion::Tls12 => &[&rustls::version::TLS13, &rustls::version::TLS12],
            MinVersion::Tls13 => &[&rustls::version::TLS13],
        };
        let builder = ServerConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(versions)
            .map_err(|e| format!("min_version: {e}"))?;
        let builder = match &self.client_ca {
            None => builder.with_no_client_auth(),
            Some(ca) => {
                let mut roots = rustls::RootCertStore::empty();
                for c in read_certs(ca).map_err(|e| format!("client_ca: {e}"))? {
                    roots
                        .add(c)
                        .map_err(|e| format!("client_ca: {}: {e}", ca.display()))?;
                }
                let v = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                    .build()
                    .map_err(|e| format!("client_ca: {}: {e}", ca.display()))?;
                builder.with_client_cert_verifier(v)
            }
        };
        let chain = read_certs(cert).map_err(|e| format!("cert: {e}"))?;
        let key = read_key(key).map_err(|e| format!("key: {e}"))?;
        // Also checks that the key is the leaf's.
        let mut cfg = builder
            .with_single_cert(chain, key)
            .map_err(|e| format!("key: does not fit cert: {e}"))?;
        // HTTP/1.1 only: what actix-http serves here (Docker, containerd and Prometheus all
        // speak it).
        cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Arc::new(cfg))
    }

    fn files(&self) -> Vec<PathBuf> {
        [&self.cert, &self.key, &self.client_ca]
            .into_iter()
            .flatten()
            .cloned()
            .collect()
    }
}

/// The TLS side of one listener: the current configuration, swapped by the watcher.
#[derive(Clone)]
pub struct Acceptor {
    current: Arc<RwLock<Arc<ServerConfig>>>,
}

impl Acceptor {
    /// Loads the files and starts the watcher thread (it ends when the last `Acceptor`
    /// clone is dropped). `section` names the settings in log lines.
    pub fn new(settings: &TlsSettings, section: &'static str) -> Result<Acceptor, String> {
        let cfg = settings
            .server_config()
            .map_err(|e| format!("{section}.{e}"))?;
        let current = Arc::new(RwLock::new(cfg));
        let s = settings.clone();
        crate::watch::spawn(
            "tls",
            settings.files(),
            Arc::downgrade(&current),
            move |current: &RwLock<Arc<ServerConfig>>| match s.server_config() {
                Ok(cfg) => {
                    *current.write().unwrap_or_else(|p| p.into_inner()) = cfg;
                    tracing::info!(
                        cert = %s.cert.as_deref().unwrap_or(Path::new("")).display(),
                        "{section}: certificate reloaded"
                    );
                }
                Err(e) => tracing::error!(
                    "{section}.{e}: keeping the certificate loaded before (the next change of the files is tried again)"
                ),
            },
        )
        .map_err(|e| format!("{section}: cannot start the reload thread: {e}"))?;
        Ok(Acceptor { current })
    }

    /// The TLS handshake on a new connection, bounded by [`HANDSHAKE_TIMEOUT`].
    pub async fn accept(&self, io: TcpStream) -> io::Result<TlsStream<TcpStream>> {
        let cfg = self
            .current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        match tokio::time::timeout(
            HANDSHAKE_TIMEOUT,
            tokio_rustls::TlsAcceptor::from(cfg).accept(io),
        )
        .await
        {
            Ok(r) => r,
            Err(_) => Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "TLS handshake timed out",
            )),
        }
    }
}
