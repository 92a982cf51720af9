//! The live configuration: one immutable [`Runtime`] snapshot (config plus
//! everything built from it: TLS, users, backend selection) behind
//! `arc-swap`. Each session takes the snapshot current at accept and keeps it
//! to the end, so replacing the snapshot never disturbs a running session.
//! Building a snapshot validates everything; a bad one is never installed.

use std::path::Path;
use std::sync::Arc;

use arc_swap::ArcSwap;

use crate::auth::breaker::Breaker;
use crate::auth::cache::CachedAuthenticator;
use crate::auth::guard::{Guard, Slots};
use crate::auth::http::HttpAuth;
use crate::auth::ldap::LdapAuth;
use crate::auth::oauth::{Claims, Introspect, OAuth};
use crate::auth::static_users::StaticUsers;
use crate::auth::Authenticator;
use crate::backend::MasterLogin;
use crate::cluster::Cluster;
use crate::config::{AuthSource, Config};
use crate::http_client::Endpoint;
use crate::imap::Secret;
use crate::metrics::Metrics;
use crate::route::health::ProbeAccount;
use crate::route::Pool;
use crate::tls::SelfSignedMode;

/// Everything a session needs, built from one config.
pub struct Runtime {
    pub config: Config,
    pub tls: Arc<rustls::ServerConfig>,
    /// The same for each protocol (its own ALPN ID), in
    /// [`crate::config::Protocol::ALL`]'s order; certificates, session
    /// tickets and their keys are shared.
    pub tls_by_protocol: [Arc<rustls::ServerConfig>; 4],
    pub auth: Arc<dyn Authenticator>,
    pub pool: Arc<Pool>,
    /// `submission.relays`, when configured: where submissions go instead
    /// of the users' own backends.
    pub relays: Option<Arc<Pool>>,
    /// The health checks' probe account, when one is configured.
    pub probe: Option<ProbeAccount>,
    /// The master user for backend logins, when one is configured.
    pub master: Option<Arc<MasterLogin>>,
    /// Bearer-token checks, when `auth.oauth` is configured.
    pub oauth: Option<Arc<OAuth>>,
    /// Failed-login records; kept across reloads.
    pub guard: Arc<Guard>,
    /// Live sessions per network and per user; kept across reloads.
    pub slots: Arc<Slots>,
    /// State shared with the other replicas (or this node's own holds and
    /// pins); made once at start, kept across reloads.
    pub cluster: Arc<Cluster>,
    pub metrics: Arc<Metrics>,
}

impl Runtime {
    /// The TLS configuration for a listener of `protocol` (its ALPN ID).
    pub fn tls_for(&self, protocol: crate::config::Protocol) -> Arc<rustls::ServerConfig> {
        Arc::clone(&self.tls_by_protocol[protocol.index()])
    }

    /// Builds and checks a snapshot: certificates load and match their keys,
    /// the users file parses and names only known backends.
    pub fn build(
        config: Config,
        metrics: Arc<Metrics>,
        self_signed: SelfSignedMode,
        previous: Option<&Runtime>,
    ) -> Result<Runtime, String> {
        // The cluster block changes only with a restart (a reload that
        // changes it is refused), so the previous snapshot's is this one's.
        let cluster = match previous {
            Some(r) => Arc::clone(&r.cluster),
            None => Arc::new(Cluster::new(&config, &metrics)?),
        };
        let auth: Box<dyn Authenticator> = match config.auth.source {
            AuthSource::Static => {
                let s = config.auth.static_users.as_ref().expect("validated");
                let backends = &config.backends;
                let users = StaticUsers::load(
                    &config.resolve(&s.users_file),
                    s.format,
                    &config.auth,
                    // Discovered entries stand for their members, which
                    // are named by address: nobody can be pinned to them.
                    &|name| {
                        backends
                            .all_servers()
                            .any(|b| b.name == name && !b.discover)
                    },
                    &|name| backends.pools.iter().any(|p| p.name == name),
                )?;
                Box::new(users)
            }
            AuthSource::Http => {
                let h = config.auth.http.as_ref().expect("validated");
                Box::new(http_auth(&config, h)?)
            }
            AuthSource::Ldap => {
                let l = config.auth.ldap.as_ref().expect("validated");
                Box::new(ldap_auth(&config, l)?)
            }
        };
        // Remote sources fail fast while they keep failing.
        let cb = &config.auth.circuit_breaker;
        let auth: Box<dyn Authenticator> =
            if config.auth.source != AuthSource::Static && cb.failures > 0 {
                Box::new(Breaker::new(
                    auth,
                    cb.failures,
                    cb.open_for,
                    metrics.auth_circuit_open.clone(),
                    metrics.auth_circuit_rejected.clone(),
                ))
            } else {
                auth
            };
        // Outermost, so cached successes keep working while a source is down.
        let a = &config.auth;
        let auth: Arc<dyn Authenticator> =
            if a.cache_ttl().is_zero() && a.negative_cache_ttl.is_zero() {
                Arc::from(auth)
            } else {
                Arc::new(CachedAuthenticator::new(
                    auth,
                    a.cache_ttl(),
                    a.negative_cache_ttl,
                    Some(metrics.auth_cache_hits.clone()),
                ))
            };
        // Certificates last: a self-signed one is written only for a config
        // that is otherwise good.
        // The ticket keys outlive a reload: a client resumes with a ticket
        // from before it.
        let ticketer = previous.map(|r| Arc::clone(&r.tls.ticketer));
        let tls =
            crate::tls::server_config(&config, self_signed, ticketer).map_err(|e| e.to_string())?;
        let tls_by_protocol =
            crate::config::Protocol::ALL.map(|p| crate::tls::for_protocol(&tls, p));
        let probe = match &config.backends.health_check.login {
            Some(login) => Some(ProbeAccount {
                user: login.user.clone(),
                password: Arc::new(secret_file(
                    &config,
                    "backends.health_check.login.password_file",
                    &login.password_file,
                )?),
            }),
            None => None,
        };
        let oauth = match &config.auth.oauth {
            Some(o) => {
                let claims = Claims {
                    issuer: o.issuer.clone(),
                    audience: o.audience.clone(),
                    user_claim: o.user_claim.clone(),
                    allow_unverified_email: o.allow_unverified_email,
                    leeway: o.leeway,
                };
                let tls = |url: &str| -> Result<_, String> {
                    if url.starts_with("https://") {
                        Ok(Some(client_tls(
                            &config,
                            "auth.oauth.tls_ca_file",
                            o.tls_ca_file.as_deref(),
                        )?))
                    } else {
                        Ok(None)
                    }
                };
                Some(Arc::new(match (&o.jwks_file, &o.jwks_url) {
                    _ if o.introspection.is_some() => {
                        let i = o.introspection.as_ref().expect("checked");
                        OAuth::from_introspection(
                            Introspect {
                                endpoint: Endpoint::parse(
                                    &i.url,
                                    "auth.oauth.introspection.url",
                                    tls(&i.url)?,
                                )?,
                                client_id: i.client_id.clone(),
                                client_secret: secret_file(
                                    &config,
                                    "auth.oauth.introspection.client_secret_file",
                                    &i.client_secret_file,
                                )?,
                                timeout: i.timeout,
                            },
                            claims,
                        )
                    }
                    (Some(file), _) => OAuth::from_file(&config.resolve(file), claims)?,
                    (None, Some(url)) => {
                        let previous = previous.and_then(|r| r.oauth.as_deref());
                        OAuth::from_url(url, tls(url)?, o.jwks_refresh, claims, previous)?
                    }
                    (None, None) => unreachable!("validated"),
                }))
            }
            None => None,
        };
        let master = match &config.backends.master_user {
            Some(m) => Some(Arc::new(MasterLogin {
                user: m.user.clone(),
                password: secret_file(
                    &config,
                    "backends.master_user.password_file",
                    &m.password_file,
                )?,
                form: m.form,
                separator: m.separator.clone(),
                always: m.always,
            })),
            None => None,
        };
        let pool = Arc::new(Pool::new(
            &config.backends,
            &metrics,
            &|p| config.resolve(p),
            previous.map(|r| r.pool.as_ref()),
        )?);
        let relays = match config.submission.as_ref().filter(|s| !s.relays.is_empty()) {
            Some(s) => {
                let backends = crate::config::Backends {
                    pool: s.relays.clone(),
                    pools: Vec::new(),
                    ..config.backends.clone()
                };
                Some(Arc::new(Pool::new(
                    &backends,
                    &metrics,
                    &|p| config.resolve(p),
                    previous.and_then(|r| r.relays.as_deref()),
                )?))
            }
            None => None,
        };
        // A reload commits the pools itself, once everything else is good.
        if previous.is_none() {
            pool.commit();
            if let Some(relays) = &relays {
                relays.commit();
            }
        }
        Ok(Runtime {
            config,
            tls,
            tls_by_protocol,
            auth,
            pool,
            relays,
            probe,
            master,
            oauth,
            guard: previous.map(|r| Arc::clone(&r.guard)).unwrap_or_default(),
            slots: previous.map(|r| Arc::clone(&r.slots)).unwrap_or_default(),
            cluster,
            metrics,
        })
    }

    pub fn load(path: &Path, metrics: Arc<Metrics>) -> Result<Runtime, String> {
        let config = Config::load(path).map_err(|e| e.to_string())?;
        Runtime::build(config, metrics, SelfSignedMode::Persist, None)
    }
}

/// The current snapshot, swapped whole.
pub type Live = Arc<ArcSwap<Runtime>>;

/// The `http` source, with its header files read and, for https, a TLS
/// client that trusts the configured CAs or the system's.
fn http_auth(config: &Config, h: &crate::config::HttpAuth) -> Result<HttpAuth, String> {
    // Names were checked with the configuration; values must be one line
    // of header text.
    let value = |key: String, bytes: Vec<u8>| {
        if bytes.iter().any(|&b| (b < 0x20 && b != b'\t') || b == 0x7f) {
            return Err(format!("key `{key}`: not one line of header text"));
        }
        Ok(Secret::new(bytes))
    };
    let mut headers = Vec::new();
    for (name, text) in &h.headers {
        let v = value(
            format!("auth.http.headers.{name}"),
            text.as_bytes().to_vec(),
        )?;
        headers.push((name.clone(), v));
    }
    for (name, file) in &h.header_files {
        let key = format!("auth.http.header_files.{name}");
        let path = config.resolve(file);
        let text =
            std::fs::read(&path).map_err(|e| format!("key `{key}`: {}: {e}", path.display()))?;
        let line = text.strip_suffix(b"\n").unwrap_or(&text);
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        headers.push((name.clone(), value(key, line.to_vec())?));
    }
    let tls = if h.url.starts_with("https://") {
        Some(client_tls(
            config,
            "auth.http.tls_ca_file",
            h.tls_ca_file.as_deref(),
        )?)
    } else {
        None
    };
    HttpAuth::new(h, headers, tls)
}

/// The first line of a secret file named by the configuration key `key`;
/// it must not be empty.
fn secret_file(config: &Config, key: &str, file: &Path) -> Result<Secret, String> {
    let path = config.resolve(file);
    let text = std::fs::read_to_string(&path)
        .map_err(|e| format!("key `{key}`: cannot read {}: {e}", path.display()))?;
    let line = text.lines().next().unwrap_or_default();
    if line.is_empty() {
        return Err(format!("key `{key}`: {} holds no password", path.display()));
    }
    Ok(Secret::new(line.as_bytes().to_vec()))
}

/// The `ldap` source, with the service password read and, for ldaps or
/// StartTLS, a TLS client that trusts the configured CAs or the system's.
fn ldap_auth(config: &Config, l: &crate::config::LdapAuth) -> Result<LdapAuth, String> {
    use crate::auth::ldap::{Mode, Reading};
    let mode = match (&l.bind_dn, &l.user_dn) {
        (Some(bind_dn), _) => Mode::Search {
            bind_dn: bind_dn.clone(),
            bind_password: secret_file(
                config,
                "auth.ldap.bind_password_file",
                l.bind_password_file.as_ref().expect("validated"),
            )?,
            base_dn: l.base_dn.clone().expect("validated"),
            filter: l.filter.clone(),
        },
        (None, Some(user_dn)) => Mode::Direct {
            user_dn: user_dn.clone(),
        },
        (None, None) => unreachable!("validated"),
    };
    let tls = if l.starttls || l.url.starts_with("ldaps://") {
        Some(client_tls(
            config,
            "auth.ldap.tls_ca_file",
            l.tls_ca_file.as_deref(),
        )?)
    } else {
        None
    };
    Ok(LdapAuth::new(
        l.url.clone(),
        tls,
        l.starttls,
        mode,
        Reading {
            user_attribute: l.user_attribute.clone(),
            backend_attribute: l.backend_attribute.clone(),
            disabled_attribute: l.disabled_attribute.clone(),
            disabled_values: l.disabled_values.clone(),
            naming: config.auth.clone(),
        },
        l.pool_size,
        l.timeout,
    ))
}

/// A TLS client for an auth service: the CAs in `ca_file` (the key `key`)
/// or the system's store.
fn client_tls(
    config: &Config,
    key: &str,
    ca_file: Option<&Path>,
) -> Result<Arc<rustls::ClientConfig>, String> {
    let roots = crate::tls::backend_roots(ca_file.map(|f| config.resolve(f)).as_deref())
        .map_err(|e| format!("key `{key}`: {e}"))?;
    crate::tls::backend_client_config(roots, None).map_err(|e| e.to_string())
}
