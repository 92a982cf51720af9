//! Reloading the configuration while sessions run: on SIGHUP, and when the
//! config file or a file it names changes on disk (checked every
//! `reload.interval`; following symlinks, so a Kubernetes ConfigMap or
//! Secret update, which swaps a symlink, is seen).
//!
//! A reload builds a whole new [`Runtime`] — config, certificates, users,
//! pools — and validates everything before it replaces the old one behind
//! arc-swap. A bad one is refused (logged, counted) and the old one keeps
//! serving. Sessions keep the snapshot they started with; new sessions get
//! the new one. Backends that did not change keep their health and counts;
//! health checks and discovery restart with the new settings.
//!
//! Listeners are matched by name: new ones are bound (a reload whose new
//! address cannot be bound is refused), changed options apply to the next
//! connection, removed or moved ones stop accepting while their sessions
//! go on. `workers`, `metrics.bind`, `admin.bind`, `limits.max_connections`
//! and `log.format` are fixed at start: a reload that changes them is
//! refused with that reason. `log.level` follows.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use crate::config::Config;
use crate::latch::Latch;
use crate::live::{Live, Runtime};
use crate::metrics::Metrics;
use crate::route::{discovery, health};
use crate::server::Listeners;
use crate::tls::SelfSignedMode;

/// What identifies a file's content without reading it.
type Stamp = Option<(SystemTime, u64, u64)>;

pub struct Reloader {
    path: PathBuf,
    live: Live,
    metrics: Arc<Metrics>,
    /// Stops the health checks and discovery of the live pool.
    probes: Arc<Latch>,
    stamps: Vec<(PathBuf, Stamp)>,
    listeners: Listeners,
}

fn stamp(path: &Path) -> Stamp {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(path).ok()?;
    Some((m.modified().ok()?, m.len(), m.ino()))
}

impl Reloader {
    /// Starts the live pool's health checks and discovery (the first
    /// discovery round is awaited) and notes the files to watch.
    pub async fn start(
        path: PathBuf,
        live: Live,
        metrics: Arc<Metrics>,
        listeners: Listeners,
    ) -> Reloader {
        let mut r = Reloader {
            path,
            live,
            metrics,
            probes: Arc::new(Latch::default()),
            stamps: Vec::new(),
            listeners,
        };
        let rt = r.live.load_full();
        r.start_probes(&rt).await;
        r.stamps = r.current_stamps();
        r.published(&r.live.load().config.version.clone());
        r
    }

    fn current_stamps(&self) -> Vec<(PathBuf, Stamp)> {
        std::iter::once(self.path.clone())
            .chain(self.live.load().config.referenced_files())
            .map(|p| {
                let s = stamp(&p);
                (p, s)
            })
            .collect()
    }

    /// Whether a watched file changed since the last look.
    pub fn files_changed(&mut self) -> bool {
        let now = self.current_stamps();
        let changed = now != self.stamps;
        self.stamps = now;
        changed
    }

    /// Closes every listening socket at once (shutdown): connections are
    /// refused rather than left waiting in a backlog nobody accepts from.
    pub fn close_listeners(&mut self) {
        self.listeners.close_all();
    }

    /// Starts the health checks and discovery of `rt`'s pool (awaiting the
    /// first discovery round), and stops those of the previous one.
    async fn start_probes(&mut self, rt: &Arc<Runtime>) {
        self.probes.set();
        self.probes = Arc::new(Latch::default());
        let checks = &rt.config.backends.health_check;
        health::spawn(
            &rt.pool,
            checks,
            rt.probe.clone(),
            &self.metrics,
            &self.probes,
        );
        // The provider's keys before the runtime goes live (bounded), then
        // refreshed until the next reload.
        if let Some(oauth) = rt.oauth.as_ref().filter(|o| o.fetches()) {
            match oauth.refresh().await {
                Ok(n) => tracing::info!(keys = n, "JWKS fetched"),
                Err(e) => {
                    tracing::warn!(error = %e, "JWKS fetch failed; token logins wait for the next try")
                }
            }
            tokio::spawn(crate::auth::oauth::keep_fresh(
                Arc::clone(oauth),
                Arc::clone(&self.probes),
            ));
        }
        discovery::start(
            Arc::clone(&rt.pool),
            &rt.config.backends.discovery,
            discovery::Checks {
                config: checks.clone(),
                probe: rt.probe.clone(),
                metrics: Arc::clone(&self.metrics),
                stop: Arc::clone(&self.probes),
            },
        )
        .await;
    }

    fn published(&self, version: &str) {
        self.metrics.config_info.reset();
        self.metrics
            .config_info
            .with_label_values(&[version])
            .set(1);
        self.metrics.listener_info.reset();
        for l in &self.live.load().config.listeners {
            self.metrics
                .listener_info
                .with_label_values(&[&l.name, l.protocol.as_str()])
                .set(1);
        }
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64());
        self.metrics.config_last_reload.set(now);
    }

    /// Reads the configuration again and, if it is good, makes it live.
    /// The new version, or why it was refused.
    pub async fn reload(&mut self, why: &str) -> Result<String, String> {
        let old = self.live.load_full();
        // Noted before reading: a file changed while this reload runs is
        // seen as changed at the next look.
        self.stamps = self.current_stamps();
        let built = Config::load(&self.path)
            .map_err(|e| e.to_string())
            .and_then(|config| match old.config.restart_only_changes(&config) {
                Some(key) => Err(format!(
                    "key `{key}` changed; it takes effect only with a restart"
                )),
                None => Runtime::build(
                    config,
                    Arc::clone(&self.metrics),
                    SelfSignedMode::Persist,
                    Some(&old),
                ),
            })
            // Last, as it cannot be taken back: new addresses are bound (or
            // the reload is refused), moved and removed listeners close.
            .and_then(|runtime| {
                self.listeners.apply(&runtime.config.listeners)?;
                Ok(runtime)
            });
        match built {
            Ok(runtime) => {
                let version = runtime.config.version.clone();
                if runtime.config.log.level != old.config.log.level {
                    if let Err(e) = crate::logging::set_level(&runtime.config.log.level) {
                        tracing::warn!(error = %e, "log level not changed");
                    }
                }
                let runtime = Arc::new(runtime);
                runtime.pool.commit();
                if let Some(relays) = &runtime.relays {
                    relays.commit();
                }
                // Discovered members are found before the pool goes live.
                self.start_probes(&runtime).await;
                self.live.store(Arc::clone(&runtime));
                runtime.pool.retire_replaced(&old.pool);
                match (&runtime.relays, &old.relays) {
                    (Some(new), Some(old)) => new.retire_replaced(old),
                    (None, Some(old)) => {
                        for relay in old.backends() {
                            relay.retire();
                        }
                    }
                    _ => {}
                }
                tracing::info!(why, version, "configuration reloaded");
                self.metrics
                    .config_reloads
                    .with_label_values(&["success"])
                    .inc();
                self.published(&version);
                Ok(version)
            }
            Err(e) => {
                // Logged before it is counted: whoever sees the count finds
                // the reason in the log.
                tracing::error!(why, error = %e, "configuration reload refused; the previous configuration stays");
                self.metrics
                    .config_reloads
                    .with_label_values(&["failure"])
                    .inc();
                Err(e)
            }
        }
    }
}
