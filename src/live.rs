//! The live configuration: one immutable [`Runtime`] snapshot (config plus
//! everything built from it: TLS, users, backend selection) behind
//! `arc-swap`. Each session takes the snapshot current at accept and keeps it
//! to the end, so replacing the snapshot never disturbs a running session.
//! Building a snapshot validates everything; a bad one is never installed.

use std::path::Path;
use std::sync::Arc;

use arc_swap::ArcSwap;

use crate::auth::cache::CachedAuthenticator;
use crate::auth::static_users::StaticUsers;
use crate::auth::Authenticator;
use crate::config::{AuthSource, Config};
use crate::imap::Secret;
use crate::metrics::Metrics;
use crate::route::health::ProbeAccount;
use crate::route::Pool;
use crate::tls::SelfSignedMode;

/// Everything a session needs, built from one config.
pub struct Runtime {
    pub config: Config,
    pub tls: Arc<rustls::ServerConfig>,
    pub auth: Arc<dyn Authenticator>,
    pub pool: Arc<Pool>,
    /// The health checks' probe account, when one is configured.
    pub probe: Option<ProbeAccount>,
    pub metrics: Arc<Metrics>,
}

impl Runtime {
    /// Builds and checks a snapshot: certificates load and match their keys,
    /// the users file parses and names only known backends.
    pub fn build(
        config: Config,
        metrics: Arc<Metrics>,
        self_signed: SelfSignedMode,
        previous: Option<&Runtime>,
    ) -> Result<Runtime, String> {
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
        };
        let auth: Arc<dyn Authenticator> = if config.auth.cache_ttl.is_zero() {
            Arc::from(auth)
        } else {
            Arc::new(CachedAuthenticator::new(auth, config.auth.cache_ttl))
        };
        // Certificates last: a self-signed one is written only for a config
        // that is otherwise good.
        let tls = crate::tls::server_config(&config, self_signed).map_err(|e| e.to_string())?;
        let probe = match &config.backends.health_check.login {
            Some(login) => {
                let path = config.resolve(&login.password_file);
                let text = std::fs::read_to_string(&path).map_err(|e| {
                    format!(
                        "key `backends.health_check.login.password_file`: cannot read {}: {e}",
                        path.display()
                    )
                })?;
                let password = text.lines().next().unwrap_or_default();
                if password.is_empty() {
                    return Err(format!(
                        "key `backends.health_check.login.password_file`: {} holds no password",
                        path.display()
                    ));
                }
                Some(ProbeAccount {
                    user: login.user.clone(),
                    password: Arc::new(Secret::new(password.as_bytes().to_vec())),
                })
            }
            None => None,
        };
        let pool = Arc::new(Pool::new(
            &config.backends,
            &metrics,
            &|p| config.resolve(p),
            previous.map(|r| r.pool.as_ref()),
        )?);
        // A reload commits the pool itself, once everything else is good.
        if previous.is_none() {
            pool.commit();
        }
        Ok(Runtime {
            config,
            tls,
            auth,
            pool,
            probe,
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
