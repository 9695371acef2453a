//! `pullcache certs`: a private PKI for one registry mirror in one command, in place of the
//! multi-step CFSSL procedure people follow today.
//!
//! It writes, into `--out DIR`:
//! - `ca.crt`, `ca.key`: a root CA (10 years), the one file clients are told to trust;
//! - `intermediate.crt`, `intermediate.key`: an intermediate CA (5 years), signed by the
//!   root, which signs the leaves, so the root key can go offline;
//! - `server.crt` (the leaf, then the intermediate: the chain `[server.tls] cert` wants),
//!   `server.key`: for every `--host` and `--ip`;
//! - `client.crt` (leaf then intermediate), `client.key`: a client certificate, for
//!   Prometheus scraping an mTLS metrics listener (`[metrics.tls] client_ca = ca.crt`).
//!
//! Keys are ECDSA P-256 in PKCS#8, written with mode 0600. Leaves last `--days` (397 by
//! default, the most browsers and Apple accept). `--renew` keeps the root and intermediate
//! and writes new leaves, so that clients that trust `ca.crt` need nothing new: a running
//! pullcache picks up the new server certificate by itself.

use std::fmt::Write as _;
use std::io::Write as _;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};
use time::{Duration, OffsetDateTime};

/// `pullcache certs`'s arguments.
#[derive(Debug, Clone, clap::Args)]
pub struct CertsArgs {
    /// Directory to write the certificates and keys into (created if missing).
    #[arg(long)]
    pub out: PathBuf,
    /// A DNS name the server certificate is valid for (repeatable), e.g. registry.example.com.
    #[arg(long = "host")]
    pub hosts: Vec<String>,
    /// An IP address the server certificate is valid for (repeatable), e.g. 127.0.0.1.
    #[arg(long = "ip")]
    pub ips: Vec<IpAddr>,
    /// The common name of the client certificate.
    #[arg(long, default_value = "prometheus")]
    pub client_name: String,
    /// Validity of the server and client certificates, in days.
    #[arg(long, default_value_t = 397)]
    pub days: u32,
    /// Keep the existing root and intermediate CA in --out; write new server and client
    /// certificates only.
    #[arg(long, conflicts_with = "force")]
    pub renew: bool,
    /// Overwrite existing files (a new root CA: every client must trust it anew).
    #[arg(long)]
    pub force: bool,
}

const ROOT_CN: &str = "pullcache root CA";
const INTERMEDIATE_CN: &str = "pullcache intermediate CA";
const ORG: &str = "pullcache";

/// What [`generate`] wrote.
#[derive(Debug)]
pub struct Written {
    pub dir: PathBuf,
    pub renewed: bool,
}

/// Writes the PKI described in the module documentation.
pub fn generate(args: &CertsArgs) -> Result<Written, String> {
    if args.hosts.is_empty() && args.ips.is_empty() {
        return Err("give at least one --host or --ip for the server certificate".into());
    }
    for h in &args.hosts {
        // rcgen takes any IA5 text; a client compares names by the DNS rules.
        if rustls::pki_types::DnsName::try_from(h.as_str()).is_err() {
            return Err(format!(
                "--host {h:?} is not a DNS name (an address goes in --ip)"
            ));
        }
    }
    if args.days == 0 {
        return Err("--days must be at least 1".into());
    }
    let dir = &args.out;
    std::fs::create_dir_all(dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    let now = OffsetDateTime::now_utc();
    // An hour back: a client whose clock is a little behind still accepts a new certificate.
    let start = now - Duration::hours(1);

    let (intermediate, intermediate_pem) = if args.renew {
        let key = read_key(&dir.join("intermediate.key"))?;
        let pem = std::fs::read_to_string(dir.join("intermediate.crt"))
            .map_err(|e| format!("--renew: cannot read intermediate.crt: {e}"))?;
        for f in ["ca.crt", "ca.key"] {
            if !dir.join(f).exists() {
                return Err(format!("--renew: {f} is missing in {}", dir.display()));
            }
        }
        // The issuer is named by the subject the intermediate was made with, and its
        // identifier comes from the key: no need to parse the old certificate.
        (Issuer::new(ca_params(INTERMEDIATE_CN, Some(0)), key), pem)
    } else {
        let existing: Vec<&str> = FILES
            .iter()
            .copied()
            .filter(|f| dir.join(f).exists())
            .collect();
        if !existing.is_empty() && !args.force {
            return Err(format!(
                "{} already holds {}: --renew writes new server and client certificates under the same CA, --force starts a new CA",
                dir.display(),
                existing.join(", ")
            ));
        }
        let root_key = KeyPair::generate().map_err(err)?;
        let mut root_params = ca_params(ROOT_CN, None);
        root_params.not_before = start;
        root_params.not_after = now + Duration::days(3653);
        let root_cert = root_params.self_signed(&root_key).map_err(err)?;
        let root = Issuer::new(ca_params(ROOT_CN, None), root_key);

        let int_key = KeyPair::generate().map_err(err)?;
        let mut int_params = ca_params(INTERMEDIATE_CN, Some(0));
        int_params.not_before = start;
        int_params.not_after = now + Duration::days(1826);
        let int_cert = int_params.signed_by(&int_key, &root).map_err(err)?;
        write(dir, "ca.crt", &root_cert.pem(), false)?;
        write(dir, "ca.key", &root.key().serialize_pem(), true)?;
        write(dir, "intermediate.crt", &int_cert.pem(), false)?;
        write(dir, "intermediate.key", &int_key.serialize_pem(), true)?;
        (
            Issuer::new(ca_params(INTERMEDIATE_CN, Some(0)), int_key),
            int_cert.pem(),
        )
    };
    let until = now + Duration::days(i64::from(args.days));

    // The server certificate: every --host and --ip as a subject alternative name.
    let mut sans: Vec<SanType> = Vec::new();
    for h in &args.hosts {
        sans.push(SanType::DnsName(
            h.clone()
                .try_into()
                .map_err(|_| format!("--host {h:?} is not a DNS name"))?,
        ));
    }
    sans.extend(args.ips.iter().map(|ip| SanType::IpAddress(*ip)));
    let mut server = leaf_params(
        args.hosts
            .first()
            .cloned()
            .unwrap_or_else(|| args.ips[0].to_string()),
        ExtendedKeyUsagePurpose::ServerAuth,
    );
    server.subject_alt_names = sans;
    server.not_before = start;
    server.not_after = until;
    let server_key = KeyPair::generate().map_err(err)?;
    let server_cert = server.signed_by(&server_key, &intermediate).map_err(err)?;
    write(
        dir,
        "server.crt",
        &format!("{}{}", server_cert.pem(), intermediate_pem),
        false,
    )?;
    write(dir, "server.key", &server_key.serialize_pem(), true)?;

    let mut client = leaf_params(
        args.client_name.clone(),
        ExtendedKeyUsagePurpose::ClientAuth,
    );
    client.not_before = start;
    client.not_after = until;
    let client_key = KeyPair::generate().map_err(err)?;
    let client_cert = client.signed_by(&client_key, &intermediate).map_err(err)?;
    write(
        dir,
        "client.crt",
        &format!("{}{}", client_cert.pem(), intermediate_pem),
        false,
    )?;
    write(dir, "client.key", &client_key.serialize_pem(), true)?;
    Ok(Written {
        dir: dir.clone(),
        renewed: args.renew,
    })
}

/// Every file `certs` writes.
const FILES: [&str; 8] = [
    "ca.crt",
    "ca.key",
    "intermediate.crt",
    "intermediate.key",
    "server.crt",
    "server.key",
    "client.crt",
    "client.key",
];

/// A CA's parameters; `path_len`: how many CAs may follow it (`None`: any).
fn ca_params(cn: &str, path_len: Option<u8>) -> CertificateParams {
    let mut p = CertificateParams::default();
    p.distinguished_name.push(DnType::OrganizationName, ORG);
    p.distinguished_name.push(DnType::CommonName, cn);
    p.is_ca = IsCa::Ca(match path_len {
        Some(n) => BasicConstraints::Constrained(n),
        None => BasicConstraints::Unconstrained,
    });
    p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    p
}

fn leaf_params(cn: String, usage: ExtendedKeyUsagePurpose) -> CertificateParams {
    let mut p = CertificateParams::default();
    p.distinguished_name.push(DnType::OrganizationName, ORG);
    p.distinguished_name.push(DnType::CommonName, cn);
    p.is_ca = IsCa::ExplicitNoCa;
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    p.extended_key_usages = vec![usage];
    p.use_authority_key_identifier_extension = true;
    p
}

fn read_key(path: &Path) -> Result<KeyPair, String> {
    let pem = std::fs::read_to_string(path)
        .map_err(|e| format!("--renew: cannot read {}: {e}", path.display()))?;
    KeyPair::from_pem(&pem).map_err(|e| format!("--renew: {}: {e}", path.display()))
}

fn err(e: rcgen::Error) -> String {
    format!("generating certificates: {e}")
}

/// Writes `name` in `dir` through a temporary file and a rename; keys readable by the
/// owner only.
fn write(dir: &Path, name: &str, text: &str, secret: bool) -> Result<(), String> {
    use std::os::unix::fs::OpenOptionsExt;
    let path = dir.join(name);
    let tmp = dir.join(format!(".{name}.tmp"));
    let e = |e: std::io::Error| format!("cannot write {}: {e}", path.display());
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(if secret { 0o600 } else { 0o644 })
        .open(&tmp)
        .map_err(e)?;
    f.write_all(text.as_bytes()).map_err(e)?;
    f.sync_all().map_err(e)?;
    std::fs::rename(&tmp, &path).map_err(e)
}

/// What the operator does with the files, printed after they are written.
pub fn instructions(args: &CertsArgs, w: &Written) -> String {
    let d = std::fs::canonicalize(&w.dir).unwrap_or_else(|_| w.dir.clone());
    let d = d.display();
    let names: Vec<String> = args
        .hosts
        .iter()
        .cloned()
        .chain(args.ips.iter().map(|i| i.to_string()))
        .collect();
    let host = names.first().cloned().unwrap_or_default();
    let mut s = String::new();
    let _ = writeln!(
        s,
        "{} in {d}:",
        if w.renewed {
            "New server and client certificates (same CA)"
        } else {
            "A new CA, server and client certificates"
        }
    );
    let _ = writeln!(
        s,
        "  server.crt is valid for {}, for {} days\n",
        names.join(", "),
        args.days
    );
    let _ = writeln!(
        s,
        "pullcache (config file):\n  [server.tls]\n  cert = \"{d}/server.crt\"\n  key = \"{d}/server.key\"\n"
    );
    let _ = writeln!(
        s,
        "Docker daemon, on each client host (PORT: pullcache's port, e.g. 5000):\n  sudo mkdir -p /etc/docker/certs.d/{host}:PORT\n  sudo cp {d}/ca.crt /etc/docker/certs.d/{host}:PORT/ca.crt\n  and in /etc/docker/daemon.json: \"registry-mirrors\": [\"https://{host}:PORT\"]\n"
    );
    let _ = writeln!(
        s,
        "containerd, in /etc/containerd/certs.d/docker.io/hosts.toml:\n  [host.\"https://{host}:PORT\"]\n    capabilities = [\"pull\", \"resolve\"]\n    ca = \"{d}/ca.crt\"\n"
    );
    let _ = writeln!(
        s,
        "Prometheus scraping the metrics listener with mutual TLS:\n  pullcache:   [metrics.tls]\n               cert = \"{d}/server.crt\"\n               key = \"{d}/server.key\"\n               client_ca = \"{d}/ca.crt\"\n  prometheus.yml, in the scrape job:\n    scheme: https\n    tls_config:\n      ca_file: {d}/ca.crt\n      cert_file: {d}/client.crt\n      key_file: {d}/client.key\n"
    );
    if !w.renewed {
        let _ = writeln!(
            s,
            "Keep ca.key and intermediate.key private (mode 0600); ca.key is needed only to make a new intermediate.\nRenew the leaves before they expire with: pullcache certs --renew --out {d} {}",
            args.hosts
                .iter()
                .map(|h| format!("--host {h}"))
                .chain(args.ips.iter().map(|i| format!("--ip {i}")))
                .collect::<Vec<_>>()
                .join(" ")
        );
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use pullcache_actors::upstream::{read_certs, read_key as read_der_key};
    use rustls::client::danger::ServerCertVerifier;
    use rustls::pki_types::{ServerName, UnixTime};
    use std::sync::Arc;

    fn args(out: &Path) -> CertsArgs {
        CertsArgs {
            out: out.to_path_buf(),
            hosts: vec!["registry.example.com".into(), "localhost".into()],
            ips: vec!["127.0.0.1".parse().unwrap()],
            client_name: "prometheus".into(),
            days: 30,
            renew: false,
            force: false,
        }
    }

    fn roots(dir: &Path) -> Arc<rustls::RootCertStore> {
        let mut r = rustls::RootCertStore::empty();
        for c in read_certs(&dir.join("ca.crt")).unwrap() {
            r.add(c).unwrap();
        }
        Arc::new(r)
    }

    /// The server chain verifies against ca.crt alone for every name, and the client
    /// certificate passes a client verifier rooted at ca.crt: what Docker, containerd and
    /// the mTLS metrics listener check.
    fn verify(dir: &Path) {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let chain = read_certs(&dir.join("server.crt")).unwrap();
        assert_eq!(chain.len(), 2, "leaf then intermediate");
        let v = rustls::client::WebPkiServerVerifier::builder_with_provider(
            roots(dir),
            provider.clone(),
        )
        .build()
        .unwrap();
        for name in ["registry.example.com", "localhost", "127.0.0.1"] {
            v.verify_server_cert(
                &chain[0],
                &chain[1..],
                &ServerName::try_from(name).unwrap(),
                &[],
                UnixTime::now(),
            )
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        }
        assert!(v
            .verify_server_cert(
                &chain[0],
                &chain[1..],
                &ServerName::try_from("other.example.com").unwrap(),
                &[],
                UnixTime::now(),
            )
            .is_err());
        let client = read_certs(&dir.join("client.crt")).unwrap();
        let cv = rustls::server::WebPkiClientVerifier::builder_with_provider(roots(dir), provider)
            .build()
            .unwrap();
        cv.verify_client_cert(&client[0], &client[1..], UnixTime::now())
            .unwrap();
        // The keys are PKCS#8 and fit their certificates.
        for leaf in ["server", "client"] {
            let key = read_der_key(&dir.join(format!("{leaf}.key"))).unwrap();
            assert!(matches!(key, rustls::pki_types::PrivateKeyDer::Pkcs8(_)));
            let ck = rustls::sign::CertifiedKey::from_der(
                read_certs(&dir.join(format!("{leaf}.crt"))).unwrap(),
                key,
                &rustls::crypto::ring::default_provider(),
            )
            .unwrap();
            assert!(ck.keys_match().is_ok());
        }
    }

    #[test]
    fn writes_a_chain_that_verifies_and_renews_under_the_same_ca() {
        let dir = tempfile::tempdir().unwrap();
        let a = args(dir.path());
        let w = generate(&a).unwrap();
        verify(dir.path());
        use std::os::unix::fs::PermissionsExt;
        for f in ["ca.key", "intermediate.key", "server.key", "client.key"] {
            let mode = std::fs::metadata(dir.path().join(f))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600, "{f}");
        }
        let text = instructions(&a, &w);
        assert!(text.contains("/etc/docker/certs.d/registry.example.com:PORT/ca.crt"));
        assert!(text.contains("client_ca"));

        // A second run without --renew or --force refuses: it would replace the CA.
        let e = generate(&a).unwrap_err();
        assert!(e.contains("--renew"), "{e}");

        let ca_before = std::fs::read(dir.path().join("ca.crt")).unwrap();
        let server_before = std::fs::read(dir.path().join("server.crt")).unwrap();
        generate(&CertsArgs { renew: true, ..a }).unwrap();
        assert_eq!(std::fs::read(dir.path().join("ca.crt")).unwrap(), ca_before);
        assert_ne!(
            std::fs::read(dir.path().join("server.crt")).unwrap(),
            server_before
        );
        verify(dir.path());
    }

    #[test]
    fn needs_a_name() {
        let dir = tempfile::tempdir().unwrap();
        let mut a = args(dir.path());
        a.hosts.clear();
        a.ips.clear();
        assert!(generate(&a).unwrap_err().contains("--host"));
        a.hosts = vec!["not a host".into()];
        assert!(generate(&a).unwrap_err().contains("not a DNS name"));
    }
}
