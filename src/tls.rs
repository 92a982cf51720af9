//! TLS for client connections: the rustls server configuration (TLS 1.2 and
//! 1.3 only, ALPN `imap`, or `pop3` on POP3 listeners), the SNI
//! certificate resolver, PEM loading through rustls-pki-types'
//! `PemObject`, and the self-signed certificate made on first start when
//! none is configured.
//!
//! ALPN (RFC 9325 §3.4): a client that offers ALPN must offer the
//! listener's protocol (`imap`, `pop3`); rustls refuses a handshake whose list holds only other protocols with the
//! `no_application_protocol` alert. A client that offers no ALPN is served.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::crypto::aws_lc_rs as provider;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::ServerConfig;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use crate::config::{Config, SelfSigned};

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{path}: {message}")]
    File { path: PathBuf, message: String },
    #[error("TLS setup failed: {0}")]
    Setup(String),
}

/// What to do when the self-signed certificate is needed but missing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SelfSignedMode {
    /// Make it and keep it on disk (running).
    Persist,
    /// Make one in memory only (`check-config` writes nothing).
    InMemory,
}

/// Makes aws-lc-rs the process's crypto provider, for the libraries that
/// build their TLS configurations from it (the cluster store's client).
/// Postern's own configurations name it explicitly. Idempotent.
pub fn install_provider() {
    let _ = provider::default_provider().install_default();
}

/// Builds the server config from `tls.certificates`, or from the
/// self-signed certificate (made if missing) when none is listed.
pub fn server_config(
    config: &Config,
    mode: SelfSignedMode,
    ticketer: Option<Arc<dyn rustls::server::ProducesTickets>>,
) -> Result<Arc<ServerConfig>, TlsError> {
    let resolver = if config.tls.certificates.is_empty() {
        SniResolver::new(self_signed(config, &config.tls.self_signed, mode)?)
    } else {
        let mut certs = config.tls.certificates.iter();
        let first = certs.next().expect("validated: at least one certificate");
        let default =
            load_certified_key(&config.resolve(&first.cert), &config.resolve(&first.key))?;
        let mut resolver = SniResolver::new(Arc::clone(&default));
        for name in &first.names {
            resolver.add(name, Arc::clone(&default));
        }
        for c in certs {
            let key = load_certified_key(&config.resolve(&c.cert), &config.resolve(&c.key))?;
            for name in &c.names {
                resolver.add(name, Arc::clone(&key));
            }
        }
        resolver
    };
    // AES-128-GCM first, and our order over the client's: it costs less per
    // handshake (SHA-256 key schedule) and per byte relayed than AES-256,
    // and every TLS 1.2/1.3 client offers it.
    let mut crypto = provider::default_provider();
    crypto
        .cipher_suites
        .sort_by_key(|s| !format!("{:?}", s.suite()).contains("AES_128_GCM"));
    let mut server = ServerConfig::builder_with_provider(Arc::new(crypto))
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| TlsError::Setup(e.to_string()))?
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(resolver));
    server.alpn_protocols = vec![b"imap".to_vec()];
    server.ignore_client_order = true;
    // Resumption: a reconnecting phone skips the full handshake. Tickets are
    // encrypted with keys that rotate every few hours; one ticket per
    // handshake is enough for a client that reconnects one session at a time.
    // The keys are the process's: every worker thread and every listener
    // share them, and a reload passes them on.
    server.ticketer = match ticketer {
        Some(t) => t,
        None => provider::Ticketer::new().map_err(|e| TlsError::Setup(e.to_string()))?,
    };
    server.send_tls13_tickets = 1;
    Ok(Arc::new(server))
}

/// The server configuration for another protocol's listeners: the same
/// certificates, resolver and ticket keys, offering that protocol's ALPN ID.
pub fn for_protocol(
    server: &Arc<ServerConfig>,
    protocol: crate::config::Protocol,
) -> Arc<ServerConfig> {
    let mut config = ServerConfig::clone(server);
    config.alpn_protocols = vec![protocol.alpn().to_vec()];
    Arc::new(config)
}

/// Loads a PEM certificate chain and private key and checks they belong together.
pub fn load_certified_key(
    cert_path: &Path,
    key_path: &Path,
) -> Result<Arc<CertifiedKey>, TlsError> {
    let file_err = |path: &Path, message: String| TlsError::File {
        path: path.to_owned(),
        message,
    };
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert_path)
        .map_err(|e| file_err(cert_path, format!("cannot read certificates: {e}")))?
        .collect::<Result<_, _>>()
        .map_err(|e| file_err(cert_path, format!("invalid PEM: {e}")))?;
    if chain.is_empty() {
        return Err(file_err(cert_path, "no CERTIFICATE block found".into()));
    }
    let key = PrivateKeyDer::from_pem_file(key_path)
        .map_err(|e| file_err(key_path, format!("cannot read private key: {e}")))?;
    let signing = provider::sign::any_supported_type(&key)
        .map_err(|e| file_err(key_path, format!("unsupported private key: {e}")))?;
    let certified = CertifiedKey::new(chain, signing);
    certified.keys_match().map_err(|e| {
        file_err(
            key_path,
            format!("key does not match {}: {e}", cert_path.display()),
        )
    })?;
    Ok(Arc::new(certified))
}

/// The trust anchors for backend certificates: the PEM CAs in `ca_file`,
/// or the system's trust store.
pub fn backend_roots(ca_file: Option<&Path>) -> Result<rustls::RootCertStore, TlsError> {
    let mut roots = rustls::RootCertStore::empty();
    match ca_file {
        Some(path) => {
            let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(path)
                .map_err(|e| TlsError::File {
                    path: path.to_owned(),
                    message: format!("cannot read CA certificates: {e}"),
                })?
                .collect::<Result<_, _>>()
                .map_err(|e| TlsError::File {
                    path: path.to_owned(),
                    message: format!("invalid PEM: {e}"),
                })?;
            let (added, _) = roots.add_parsable_certificates(certs);
            if added == 0 {
                return Err(TlsError::File {
                    path: path.to_owned(),
                    message: "no usable CA certificate found".into(),
                });
            }
        }
        None => {
            let found = rustls_native_certs::load_native_certs();
            let (added, _) = roots.add_parsable_certificates(found.certs);
            if added == 0 {
                return Err(TlsError::Setup(format!(
                    "no system CA certificates found ({} errors); set tls_ca_file",
                    found.errors.len()
                )));
            }
        }
    }
    Ok(roots)
}

/// Client TLS for connections to a backend: TLS 1.2 and 1.3, the given
/// trust anchors, and a client certificate when one is given.
pub fn backend_client_config(
    roots: rustls::RootCertStore,
    client_cert: Option<(&Path, &Path)>,
) -> Result<Arc<rustls::ClientConfig>, TlsError> {
    let builder =
        rustls::ClientConfig::builder_with_provider(Arc::new(provider::default_provider()))
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsError::Setup(e.to_string()))?
            .with_root_certificates(roots);
    let config = match client_cert {
        None => builder.with_no_client_auth(),
        Some((cert_path, key_path)) => {
            let certified = load_certified_key(cert_path, key_path)?;
            let key = PrivateKeyDer::from_pem_file(key_path).map_err(|e| TlsError::File {
                path: key_path.to_owned(),
                message: format!("cannot read private key: {e}"),
            })?;
            let mut config = builder
                .with_client_auth_cert(certified.cert.clone(), key)
                .map_err(|e| TlsError::File {
                    path: key_path.to_owned(),
                    message: e.to_string(),
                })?;
            // A resumed session carries no client certificate, and servers
            // that check one (Dovecot 2.3 on OpenSSL) fail such handshakes:
            // every connection does a full handshake with the certificate.
            config.resumption = rustls::client::Resumption::disabled();
            config
        }
    };
    Ok(Arc::new(config))
}

/// Loads the self-signed certificate, making it on first use.
fn self_signed(
    config: &Config,
    settings: &SelfSigned,
    mode: SelfSignedMode,
) -> Result<Arc<CertifiedKey>, TlsError> {
    let dir = config.resolve(&settings.dir);
    let cert = dir.join("cert.pem");
    let key = dir.join("key.pem");
    if cert.exists() && key.exists() {
        return load_certified_key(&cert, &key);
    }
    let setup = |e: String| TlsError::File {
        path: dir.clone(),
        message: e,
    };
    let made = rcgen::generate_simple_self_signed(settings.names.clone())
        .map_err(|e| setup(format!("cannot make a self-signed certificate: {e}")))?;
    if mode == SelfSignedMode::InMemory {
        let key = PrivateKeyDer::from_pem_slice(made.key_pair.serialize_pem().as_bytes())
            .map_err(|e| setup(format!("self-signed key: {e}")))?;
        let signing = provider::sign::any_supported_type(&key).map_err(|e| setup(e.to_string()))?;
        return Ok(Arc::new(CertifiedKey::new(
            vec![made.cert.der().clone()],
            signing,
        )));
    }
    std::fs::create_dir_all(&dir).map_err(|e| setup(format!("cannot create directory: {e}")))?;
    write_private(&key, made.key_pair.serialize_pem().as_bytes())
        .map_err(|e| setup(format!("cannot write key: {e}")))?;
    std::fs::write(&cert, made.cert.pem())
        .map_err(|e| setup(format!("cannot write certificate: {e}")))?;
    tracing::warn!(
        cert = %cert.display(),
        names = ?settings.names,
        "no certificate configured; made a self-signed one (clients will not trust it)"
    );
    load_certified_key(&cert, &key)
}

fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    options.open(path)?.write_all(bytes)
}

/// Chooses a certificate by SNI name: an exact name first, then a wildcard
/// one level up, then the default (first) certificate.
#[derive(Debug)]
pub struct SniResolver {
    default: Arc<CertifiedKey>,
    exact: HashMap<String, Arc<CertifiedKey>>,
    wildcard: HashMap<String, Arc<CertifiedKey>>,
}

impl SniResolver {
    pub fn new(default: Arc<CertifiedKey>) -> Self {
        SniResolver {
            default,
            exact: HashMap::new(),
            wildcard: HashMap::new(),
        }
    }

    pub fn add(&mut self, name: &str, key: Arc<CertifiedKey>) {
        let name = name.to_ascii_lowercase();
        match name.strip_prefix("*.") {
            Some(parent) => self.wildcard.insert(parent.to_owned(), key),
            None => self.exact.insert(name, key),
        };
    }

    pub fn pick(&self, sni: Option<&str>) -> Arc<CertifiedKey> {
        let Some(name) = sni else {
            return Arc::clone(&self.default);
        };
        let name = name.trim_end_matches('.').to_ascii_lowercase();
        if let Some(k) = self.exact.get(&name) {
            return Arc::clone(k);
        }
        if let Some((_, parent)) = name.split_once('.') {
            if let Some(k) = self.wildcard.get(parent) {
                return Arc::clone(k);
            }
        }
        Arc::clone(&self.default)
    }
}

impl ResolvesServerCert for SniResolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.pick(hello.server_name()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(name: &str) -> Arc<CertifiedKey> {
        let made = rcgen::generate_simple_self_signed(vec![name.to_owned()]).unwrap();
        let key = PrivateKeyDer::from_pem_slice(made.key_pair.serialize_pem().as_bytes()).unwrap();
        let signing = provider::sign::any_supported_type(&key).unwrap();
        Arc::new(CertifiedKey::new(vec![made.cert.der().clone()], signing))
    }

    #[test]
    fn sni_picks_exact_then_wildcard_then_default() {
        let default = key("default.test");
        let exact = key("mail.example.com");
        let wild = key("*.example.org");
        let mut r = SniResolver::new(Arc::clone(&default));
        r.add("mail.example.com", Arc::clone(&exact));
        r.add("*.example.org", Arc::clone(&wild));
        assert!(Arc::ptr_eq(&r.pick(Some("MAIL.example.com")), &exact));
        assert!(Arc::ptr_eq(&r.pick(Some("imap.example.org")), &wild));
        assert!(Arc::ptr_eq(&r.pick(Some("a.b.example.org")), &default));
        assert!(Arc::ptr_eq(&r.pick(Some("other.test")), &default));
        assert!(Arc::ptr_eq(&r.pick(None), &default));
    }
}
