//! The TLS client configuration of one upstream: which certificates it trusts (the built-in
//! web roots, the system's store, and its own `ca` file), the client certificate it
//! presents (`client_cert`/`client_key`), or no verification at all
//! (`insecure_skip_verify`, for a test registry).
//!
//! Built once at start-up; every file error is an error naming the upstream's key, so a
//! typo in a path stops the start instead of failing every pull later.

use std::path::Path;
use std::sync::{Arc, OnceLock};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};

use crate::settings::UpstreamSettings;

/// The certificates of the system's trust store (`/etc/ssl/certs`, `SSL_CERT_FILE`,
/// `SSL_CERT_DIR`), read once per process: a few hundred certificates, ~20 ms.
fn system_roots() -> &'static [CertificateDer<'static>] {
    static ROOTS: OnceLock<Vec<CertificateDer<'static>>> = OnceLock::new();
    ROOTS.get_or_init(|| {
        let found = rustls_native_certs::load_native_certs();
        for e in found.errors.iter().take(3) {
            tracing::debug!(error = %e, "reading the system's trusted certificates");
        }
        found.certs
    })
}

/// Reads every certificate of a PEM file; an error if it holds none.
pub fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs: Vec<_> = CertificateDer::pem_file_iter(path)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?
        .collect::<Result<_, _>>()
        .map_err(|e| format!("{}: not a PEM certificate file: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!("{}: no PEM certificate in it", path.display()));
    }
    Ok(certs)
}

/// Reads the first private key of a PEM file (PKCS#8, PKCS#1 or SEC1).
pub fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>, String> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| match e {
        rustls::pki_types::pem::Error::NoItemsFound => {
            format!("{}: no PEM private key in it", path.display())
        }
        e => format!("cannot read a private key from {}: {e}", path.display()),
    })
}

/// The TLS client configuration for `u`. Errors name the key at fault (`ca`,
/// `client_cert`, `client_key`) without the `upstreams[i].` before it.
pub fn client_config(u: &UpstreamSettings) -> Result<Arc<ClientConfig>, String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .expect("ring supports the default protocol versions");
    let builder = if u.insecure_skip_verify {
        builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(NoVerify(provider)))
    } else {
        let mut roots = RootCertStore {
            roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
        };
        // A broken certificate in the system store is skipped, as curl does.
        let _ = roots.add_parsable_certificates(system_roots().iter().cloned());
        if let Some(ca) = &u.ca {
            for c in read_certs(ca).map_err(|e| format!("ca: {e}"))? {
                roots
                    .add(c)
                    .map_err(|e| format!("ca: {}: {e}", ca.display()))?;
            }
        }
        builder.with_root_certificates(roots)
    };
    let mut cfg = match (&u.client_cert, &u.client_key) {
        (None, None) => builder.with_no_client_auth(),
        (Some(c), Some(k)) => {
            let chain = read_certs(c).map_err(|e| format!("client_cert: {e}"))?;
            let key = read_key(k).map_err(|e| format!("client_key: {e}"))?;
            builder
                .with_client_auth_cert(chain, key)
                .map_err(|e| format!("client_key: does not fit client_cert: {e}"))?
        }
        (Some(_), None) => return Err("client_key: needed with client_cert".into()),
        (None, Some(_)) => return Err("client_cert: needed with client_key".into()),
    };
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(cfg))
}

/// `insecure_skip_verify`: every certificate is accepted; the handshake's signatures are
/// still checked, so the session is at least bound to the key the server showed.
#[derive(Debug)]
struct NoVerify(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for NoVerify {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}
