//! Choosing the backend for a user, and the backends' health.
//!
//! Order of decision for an authenticated user:
//!
//! 1. **directory**: the user's directory entry names the backend that
//!    holds the mailbox. It is not moved: if that backend is down or
//!    draining the login gets `NO [UNAVAILABLE]` at once.
//! 2. **sticky**: while the user has live sessions through this process on
//!    an available backend, new sessions join them there (no split
//!    sessions while a recovered backend takes its users back).
//! 3. **hash** / **failover** / **bounded_load**: weighted rendezvous
//!    (highest random weight) hashing of the user over the pool; the first
//!    backend in the user's order that is up, not draining and (with
//!    `bounded_load`) not above its share. The first choice is `hash`;
//!    skipping a down backend is `failover`; skipping a full one is
//!    `bounded_load`.
//!
//! Placement depends only on the normalised username, the backend *names*
//! and weights, and the health view, so every replica with the same
//! configuration and the same view sends a user to the same backend, and
//! changing a backend's address moves nobody. Health state lives in each
//! [`Backend`] as atomics, written by the checks in [`health`] and by
//! failed session logins (passive), read lock-free by every session.

pub mod discovery;
pub mod health;

use std::collections::HashMap;
use std::hash::{BuildHasher, Hasher};
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;

use prometheus::{IntCounter, IntGauge};
use rustls::pki_types::ServerName;
use tokio::sync::Notify;

use crate::auth::Identity;
use crate::config::{BackendServer, BackendTlsMode, Backends};
use crate::metrics::Metrics;

/// One backend IMAP server of the pool, with its live state.
pub struct Backend {
    /// The pool entry it was made from (for a discovered member, the
    /// entry with the DNS name).
    config: BackendServer,
    pub name: String,
    /// `host:port`, resolved at connect time.
    pub address: String,
    pub weight: u32,
    /// Send a PROXY protocol v2 header first.
    pub proxy_protocol: bool,
    /// TLS to the backend, when configured; replaced by a reload (rotated
    /// CA or client certificate files) without touching the rest.
    pub tls: arc_swap::ArcSwapOption<BackendTls>,
    up: AtomicBool,
    draining: AtomicBool,
    /// Relayed sessions through this process.
    active: AtomicUsize,
    passive_failures: AtomicU32,
    /// Gone from the pool (discovery no longer finds it): no new sessions,
    /// no more health checks.
    retired: AtomicBool,
    /// Woken when the backend goes down, or its drain grace has passed:
    /// its sessions close.
    closing: Notify,
    /// Set when a drain's grace period ends: live sessions must go.
    drained: AtomicBool,
    /// Counts drains, so a drain's timer knows it is still the current one.
    drain_epoch: AtomicU32,
    up_gauge: IntGauge,
    draining_gauge: IntGauge,
    sessions_gauge: IntGauge,
    to_up: IntCounter,
    to_down: IntCounter,
}

impl std::fmt::Debug for Backend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Backend")
            .field("name", &self.name)
            .field("address", &self.address)
            .field("up", &self.is_up())
            .finish()
    }
}

impl Backend {
    fn new(
        server: &BackendServer,
        metrics: &Metrics,
        tls: Option<Arc<BackendTls>>,
        name: &str,
        address: &str,
    ) -> Backend {
        Backend {
            config: server.clone(),
            tls: arc_swap::ArcSwapOption::new(tls),
            name: name.to_owned(),
            address: address.to_owned(),
            weight: server.weight,
            proxy_protocol: server.proxy_protocol,
            up: AtomicBool::new(true),
            draining: AtomicBool::new(server.drain),
            active: AtomicUsize::new(0),
            passive_failures: AtomicU32::new(0),
            retired: AtomicBool::new(false),
            closing: Notify::new(),
            drained: AtomicBool::new(false),
            drain_epoch: AtomicU32::new(0),
            up_gauge: metrics.backend_up.with_label_values(&[name]),
            draining_gauge: metrics.backend_draining.with_label_values(&[name]),
            sessions_gauge: metrics.backend_sessions.with_label_values(&[name]),
            to_up: metrics.backend_transitions.with_label_values(&[name, "up"]),
            to_down: metrics
                .backend_transitions
                .with_label_values(&[name, "down"]),
        }
    }

    pub fn is_up(&self) -> bool {
        self.up.load(Ordering::Acquire)
    }

    /// The backend's service for `protocol`: `address` for IMAP, else its
    /// host with the protocol's port (`pop3_port`, `submission_port`,
    /// `sieve_port`).
    pub fn address_for(&self, protocol: crate::config::Protocol) -> Option<String> {
        if protocol == crate::config::Protocol::Imap {
            return Some(self.address.to_string());
        }
        let port = self.config.port_for(protocol)?;
        let host = self
            .address
            .rsplit_once(':')
            .map_or(&*self.address, |(h, _)| h);
        Some(format!("{host}:{port}"))
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Acquire)
    }

    /// Takes new sessions: up, not draining, still in the pool.
    pub fn available(&self) -> bool {
        self.is_up() && !self.is_draining() && !self.is_retired()
    }

    pub fn is_retired(&self) -> bool {
        self.retired.load(Ordering::Acquire)
    }

    /// Whether a reloaded pool may keep this backend (and its health and
    /// counts) for `server`: the same entry but for `drain`.
    fn same_entry(&self, server: &BackendServer) -> bool {
        let mut config = self.config.clone();
        config.drain = server.drain;
        config == *server
    }

    pub fn retire(&self) {
        self.retired.store(true, Ordering::Release);
    }

    pub fn active_sessions(&self) -> usize {
        self.active.load(Ordering::Relaxed)
    }

    /// Marks the backend up or down; logs and counts a change. Returns
    /// whether the state changed.
    pub fn set_up(&self, up: bool, why: &str) -> bool {
        if self.up.swap(up, Ordering::AcqRel) == up {
            return false;
        }
        self.up_gauge.set(up as i64);
        if up {
            self.to_up.inc();
            self.passive_failures.store(0, Ordering::Relaxed);
            tracing::warn!(backend = %self.name, address = %self.address, why, "backend is up");
        } else {
            self.to_down.inc();
            tracing::warn!(backend = %self.name, address = %self.address, why, "backend is down");
            self.closing.notify_waiters();
        }
        true
    }

    /// Starts or ends a drain: no new sessions while it lasts. With a
    /// grace period, the sessions still open when it has passed are closed
    /// (needs a Tokio runtime); without one they stay until they end.
    pub fn set_draining(self: &Arc<Self>, draining: bool, close_after: Option<Duration>) {
        let epoch = self.drain_epoch.fetch_add(1, Ordering::AcqRel) + 1;
        self.draining.store(draining, Ordering::Release);
        self.draining_gauge.set(draining as i64);
        self.drained.store(false, Ordering::Release);
        tracing::info!(backend = %self.name, draining, ?close_after, "backend drain changed");
        let (true, Some(grace)) = (draining, close_after) else {
            return;
        };
        let backend = Arc::clone(self);
        tokio::spawn(async move {
            tokio::time::sleep(grace).await;
            // Only if this drain is still the current one.
            if backend.drain_epoch.load(Ordering::Acquire) == epoch && backend.is_draining() {
                backend.drained.store(true, Ordering::Release);
                tracing::info!(backend = %backend.name, "drain grace period over; closing its sessions");
                backend.closing.notify_waiters();
            }
        });
    }

    /// Resolves once this backend's sessions must close: it went down, or
    /// its drain's grace period is over.
    /// Whether a drain's grace period is over.
    pub fn is_drained(&self) -> bool {
        self.drained.load(Ordering::Acquire)
    }

    pub async fn closing(&self) {
        let notified = self.closing.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        if !self.is_up() || self.drained.load(Ordering::Acquire) {
            return;
        }
        notified.await;
    }
}

/// How Postern speaks TLS to one backend.
#[derive(Clone)]
pub struct BackendTls {
    pub mode: BackendTlsMode,
    pub connector: tokio_rustls::TlsConnector,
    /// Checked against the certificate and sent as SNI.
    pub server_name: ServerName<'static>,
}

impl BackendTls {
    fn new(
        server: &BackendServer,
        resolve: &dyn Fn(&Path) -> PathBuf,
        system_roots: &mut Option<rustls::RootCertStore>,
    ) -> Result<Option<BackendTls>, String> {
        if server.tls == BackendTlsMode::None {
            return Ok(None);
        }
        let key = |k: &str| format!("backends.pool `{}` {k}", server.name);
        let roots = match &server.tls_ca_file {
            Some(path) => crate::tls::backend_roots(Some(&resolve(path)))
                .map_err(|e| format!("{}: {e}", key("tls_ca_file")))?,
            None => match system_roots {
                Some(roots) => roots.clone(),
                None => {
                    let roots = crate::tls::backend_roots(None)
                        .map_err(|e| format!("{}: {e}", key("tls")))?;
                    *system_roots = Some(roots.clone());
                    roots
                }
            },
        };
        let client_cert = match (&server.tls_client_cert, &server.tls_client_key) {
            (Some(cert), Some(key)) => Some((resolve(cert), resolve(key))),
            _ => None,
        };
        let config = crate::tls::backend_client_config(
            roots,
            client_cert
                .as_ref()
                .map(|(c, k)| (c.as_path(), k.as_path())),
        )
        .map_err(|e| format!("{}: {e}", key("tls_client_cert")))?;
        let name = match &server.tls_server_name {
            Some(name) => name.clone(),
            None => host_of(&server.address).to_owned(),
        };
        let server_name = ServerName::try_from(name.clone()).map_err(|_| {
            format!(
                "{}: `{name}` is not a DNS name or IP address",
                key("tls_server_name")
            )
        })?;
        Ok(Some(BackendTls {
            mode: server.tls,
            connector: tokio_rustls::TlsConnector::from(config),
            server_name,
        }))
    }
}

/// The host of `host:port` or `[v6]:port`.
fn host_of(address: &str) -> &str {
    let host = address.rsplit_once(':').map_or(address, |(h, _)| h);
    host.trim_start_matches('[').trim_end_matches(']')
}

/// Why a backend was chosen; logged with every routing decision.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RouteReason {
    /// The user's directory entry names the backend.
    Directory,
    /// The user has live sessions there.
    Sticky,
    /// The user's first choice by rendezvous hashing.
    Hash,
    /// A later choice: the ones before it are down or draining.
    Failover,
    /// A later choice: one before it holds more than its bounded share.
    BoundedLoad,
    /// An administrator pinned the user there (a move).
    Pinned,
}

impl RouteReason {
    pub fn as_str(self) -> &'static str {
        match self {
            RouteReason::Directory => "directory",
            RouteReason::Sticky => "sticky",
            RouteReason::Hash => "hash",
            RouteReason::Failover => "failover",
            RouteReason::BoundedLoad => "bounded_load",
            RouteReason::Pinned => "pinned",
        }
    }
}

/// What the cluster store knows of a user, for routing.
#[derive(Debug, Clone, Default)]
pub struct Hint {
    /// An administrator's pin: the user goes there and nowhere else.
    pub pinned: Option<String>,
    /// The backend the user's live (or recent) sessions are on.
    pub sticky: Option<String>,
}

#[derive(Debug, Clone)]
pub struct Route {
    pub backend: Arc<Backend>,
    pub reason: RouteReason,
    /// The pool the user belongs to (`default` for the `pool` list).
    pub pool: Arc<str>,
}

#[derive(Debug, thiserror::Error)]
pub enum RouteError {
    #[error("backend `{0}` named by the directory is not in the pool")]
    UnknownBackend(String),
    #[error("backend `{0}` named by the directory is down or draining")]
    Unavailable(String),
    #[error("pool `{0}` named by the directory does not exist")]
    UnknownPool(String),
    #[error("no backend available in pool `{0}`")]
    NoBackend(Arc<str>),
}

/// A named set of backends; users of a pool are placed among its members.
struct Group {
    name: Arc<str>,
    /// The configured backends, then those discovery found; replaced whole.
    members: ArcSwap<Vec<Arc<Backend>>>,
    fixed: Vec<Arc<Backend>>,
}

/// A pool entry with `discover: true`: one member per address its DNS name
/// resolves to, named `NAME-ADDRESS`.
pub struct Discovered {
    group: usize,
    server: BackendServer,
    pub host: String,
    pub port: u16,
    tls: Option<Arc<BackendTls>>,
    members: Mutex<Vec<Arc<Backend>>>,
}

const STICKY_SHARDS: usize = 64;

/// Live sessions per user and backend.
type StickyShard = Mutex<HashMap<Arc<str>, Vec<(Arc<Backend>, u32)>>>;

struct Sticky {
    shards: Box<[StickyShard]>,
    keys: std::hash::RandomState,
}

/// A kept backend's drain flag and TLS settings as the new configuration
/// has them, applied on commit.
type KeptChange = (Arc<Backend>, bool, Option<Arc<BackendTls>>);

/// The backends, their health, and who is where.
pub struct Pool {
    /// The default pool first, then the named pools.
    groups: Vec<Group>,
    /// Lower-cased domain to group index.
    domains: HashMap<String, usize>,
    discovered: Vec<Discovered>,
    /// Shared with the pools of later configurations, so stickiness and
    /// leases survive a reload.
    sticky: Arc<Sticky>,
    bounded_load: Option<f64>,
    /// Failed session logins in a row that mark a backend down; 0: never.
    passive_fall: u32,
    routes: [IntCounter; 6],
    metrics: Arc<Metrics>,
    /// Changes to backends kept from the previous pool (drain, TLS files),
    /// applied by [`Pool::commit`] once the whole reload is good.
    pending: Mutex<Vec<KeptChange>>,
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.backends()).finish()
    }
}

impl Pool {
    /// Builds the pool; `resolve` turns the config's relative paths (CA
    /// files, client certificates) into real ones. With the `previous`
    /// pool of a reload, unchanged backends are kept with their health,
    /// counts and live sessions, and backends no longer configured are
    /// retired once the new pool is in place ([`Pool::retire_replaced`]).
    pub fn new(
        config: &Backends,
        metrics: &Arc<Metrics>,
        resolve: &dyn Fn(&Path) -> PathBuf,
        previous: Option<&Pool>,
    ) -> Result<Pool, String> {
        let mut pending = Vec::new();
        let kept = |server: &BackendServer| {
            previous?
                .backends()
                .into_iter()
                .find(|b| b.name == server.name && b.same_entry(server))
        };
        let reason = |r: RouteReason| metrics.routes.with_label_values(&[r.as_str()]);
        let mut system_roots = None;
        let mut groups = Vec::new();
        let mut domains = HashMap::new();
        let mut discovered = Vec::new();
        let named = config
            .pools
            .iter()
            .map(|p| (p.name.as_str(), &p.servers, &p.domains[..]));
        for (name, servers, pool_domains) in
            std::iter::once(("default", &config.pool, &[][..])).chain(named)
        {
            let mut fixed = Vec::with_capacity(servers.len());
            for server in servers {
                let tls = BackendTls::new(server, resolve, &mut system_roots)?.map(Arc::new);
                if server.discover {
                    let carried = previous
                        .and_then(|p| {
                            p.discovered.iter().find(|d| {
                                d.server.name == server.name
                                    && *p.groups[d.group].name == *name
                                    && {
                                        let mut c = d.server.clone();
                                        c.drain = server.drain;
                                        c == *server
                                    }
                            })
                        })
                        .map(|d| d.members.lock().unwrap_or_else(|e| e.into_inner()).clone())
                        .unwrap_or_default();
                    for member in &carried {
                        pending.push((Arc::clone(member), server.drain, tls.clone()));
                    }
                    let (host, port) = server
                        .address
                        .rsplit_once(':')
                        .and_then(|(h, p)| Some((h.to_owned(), p.parse().ok()?)))
                        .ok_or_else(|| {
                            format!("backend `{}`: address must be host:port", server.name)
                        })?;
                    discovered.push(Discovered {
                        group: groups.len(),
                        server: server.clone(),
                        host,
                        port,
                        tls,
                        members: Mutex::new(carried),
                    });
                    continue;
                }
                let backend = match kept(server) {
                    Some(old) => {
                        pending.push((Arc::clone(&old), server.drain, tls.clone()));
                        old
                    }
                    None => Arc::new(Backend::new(
                        server,
                        metrics,
                        tls,
                        &server.name,
                        &server.address,
                    )),
                };
                fixed.push(backend);
            }
            for domain in pool_domains {
                domains.insert(domain.to_ascii_lowercase(), groups.len());
            }
            groups.push(Group {
                name: name.into(),
                members: ArcSwap::from_pointee(fixed.clone()),
                fixed,
            });
        }
        let pool = Pool {
            groups,
            domains,
            discovered,
            sticky: previous.map_or_else(
                || {
                    Arc::new(Sticky {
                        shards: (0..STICKY_SHARDS).map(|_| Mutex::default()).collect(),
                        keys: std::hash::RandomState::new(),
                    })
                },
                |p| Arc::clone(&p.sticky),
            ),
            bounded_load: config.bounded_load,
            passive_fall: if config.health_check.enabled {
                config.passive_fall
            } else {
                0
            },
            routes: [
                reason(RouteReason::Directory),
                reason(RouteReason::Sticky),
                reason(RouteReason::Hash),
                reason(RouteReason::Failover),
                reason(RouteReason::BoundedLoad),
                reason(RouteReason::Pinned),
            ],
            metrics: Arc::clone(metrics),
            pending: Mutex::new(pending),
        };
        for group in 0..pool.groups.len() {
            pool.rebuild(group);
        }
        Ok(pool)
    }

    /// Makes this pool's view the live one: applies the changes a reload
    /// made to kept backends (drain, TLS) and sets every backend's gauges.
    /// Call once the whole configuration is known to be good.
    pub fn commit(&self) {
        let pending = std::mem::take(&mut *self.pending.lock().unwrap_or_else(|e| e.into_inner()));
        for (backend, drain, tls) in pending {
            if backend.is_draining() != drain {
                backend.set_draining(drain, None);
            }
            backend.tls.store(tls);
        }
        for b in self.backends() {
            b.up_gauge.set(b.is_up() as i64);
            b.draining_gauge.set(b.is_draining() as i64);
        }
    }

    /// After a reload: retires the backends of `previous` that this pool
    /// did not keep. Their live sessions stay; their checks stop. Series of
    /// names gone from the configuration are removed from the metrics.
    pub fn retire_replaced(&self, previous: &Pool) {
        let now = self.backends();
        for old in previous.backends() {
            if !now.iter().any(|b| Arc::ptr_eq(b, &old)) {
                tracing::info!(backend = %old.name, "backend left the configuration; retired");
                old.retire();
                if !now.iter().any(|b| b.name == old.name) {
                    self.forget(&old.name);
                }
            }
        }
    }

    /// Removes a backend name's gauge series (counters keep their history).
    fn forget(&self, name: &str) {
        let m = &self.metrics;
        let _ = m.backend_up.remove_label_values(&[name]);
        let _ = m.backend_draining.remove_label_values(&[name]);
        let _ = m.backend_sessions.remove_label_values(&[name]);
    }

    /// Every backend of every pool now.
    pub fn backends(&self) -> Vec<Arc<Backend>> {
        self.groups
            .iter()
            .flat_map(|g| g.members.load().iter().cloned().collect::<Vec<_>>())
            .collect()
    }

    /// The pool entries that are DNS names to discover.
    pub fn discovered(&self) -> &[Discovered] {
        &self.discovered
    }

    /// Sets the addresses a discovered entry resolves to. Members whose
    /// address stays keep their state; new ones start up; gone ones are
    /// retired (their live sessions stay). Returns the new members.
    pub fn set_discovered(&self, index: usize, addresses: &[IpAddr]) -> Vec<Arc<Backend>> {
        let entry = &self.discovered[index];
        let mut members = entry.members.lock().unwrap_or_else(|e| e.into_inner());
        let mut added = Vec::new();
        let mut next = Vec::with_capacity(addresses.len());
        for ip in addresses {
            let address = SocketAddr::new(*ip, entry.port).to_string();
            match members.iter().find(|b| b.address == address) {
                Some(kept) => next.push(Arc::clone(kept)),
                None => {
                    let name = format!("{}-{ip}", entry.server.name);
                    let backend = Arc::new(Backend::new(
                        &entry.server,
                        &self.metrics,
                        entry.tls.clone(),
                        &name,
                        &address,
                    ));
                    tracing::info!(backend = %name, address = %address, "backend discovered");
                    backend.up_gauge.set(1);
                    backend.draining_gauge.set(backend.is_draining() as i64);
                    added.push(Arc::clone(&backend));
                    next.push(backend);
                }
            }
        }
        for gone in members
            .iter()
            .filter(|b| !next.iter().any(|n| Arc::ptr_eq(n, b)))
        {
            gone.retired.store(true, Ordering::Release);
            gone.up_gauge.set(0);
            tracing::info!(backend = %gone.name, address = %gone.address, "backend no longer in DNS; retired");
        }
        *members = next;
        drop(members);
        self.rebuild(entry.group);
        added
    }

    fn rebuild(&self, group: usize) {
        let g = &self.groups[group];
        let mut members = g.fixed.clone();
        for entry in self.discovered.iter().filter(|d| d.group == group) {
            members.extend(
                entry
                    .members
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .iter()
                    .cloned(),
            );
        }
        g.members.store(Arc::new(members));
    }

    /// The user's pool: the directory's, else the one for their domain,
    /// else the default.
    fn group_of(&self, identity: &Identity) -> Result<usize, RouteError> {
        if let Some(name) = &identity.pool {
            return self
                .groups
                .iter()
                .position(|g| &*g.name == name)
                .ok_or_else(|| RouteError::UnknownPool(name.clone()));
        }
        let domain = identity.user.rsplit_once('@').map(|(_, d)| d);
        Ok(domain
            .and_then(|d| self.domains.get(&d.to_ascii_lowercase()))
            .copied()
            .unwrap_or(0))
    }

    /// The default pool in the user's weighted rendezvous order, best first.
    pub fn order(&self, user: &str) -> Vec<Arc<Backend>> {
        self.order_in(&self.groups[0], user)
    }

    /// A pool in the user's weighted rendezvous order, best first. Failover
    /// walks this list, so a user's second choice is as stable as the first.
    fn order_in(&self, group: &Group, user: &str) -> Vec<Arc<Backend>> {
        let members = group.members.load();
        let mut scored: Vec<(f64, u64, &Arc<Backend>)> = members
            .iter()
            .map(|b| {
                let h = score(&b.name, user);
                (weighted(h, b.weight), h, b)
            })
            .collect();
        // Equal weights order by the raw hash, exactly as unweighted
        // rendezvous hashing; the name settles the (theoretical) tie.
        scored.sort_by(|a, b| {
            b.0.total_cmp(&a.0)
                .then_with(|| b.1.cmp(&a.1))
                .then_with(|| a.2.name.cmp(&b.2.name))
        });
        scored.into_iter().map(|(_, _, b)| Arc::clone(b)).collect()
    }

    /// Picks the backend for an authenticated user, skipping the backends
    /// named in `exclude` (ones this login already failed to reach).
    pub fn select(&self, identity: &Identity, exclude: &[&str]) -> Result<Route, RouteError> {
        self.select_with(identity, exclude, &Hint::default())
    }

    /// As [`Pool::select`], with what the cluster knows of the user: an
    /// administrator's pin comes first, then the directory, then the
    /// backend their sessions on any replica are on (followed even where
    /// this replica's health checks disagree, so one mailbox is never
    /// split; only a failed connection here moves on), then this
    /// replica's own stickiness and the hash.
    pub fn select_with(
        &self,
        identity: &Identity,
        exclude: &[&str],
        hint: &Hint,
    ) -> Result<Route, RouteError> {
        let excluded = |b: &Backend| exclude.contains(&b.name.as_str());
        let route = self.pick(identity, &excluded, hint)?;
        self.routes[route.reason as usize].inc();
        Ok(route)
    }

    /// Where the hash places `user`, whatever the backends' health and
    /// drains: the first backend of their pool's order.
    pub fn hash_choice(&self, user: &str) -> Option<String> {
        let identity = Identity {
            user: user.to_owned(),
            backend: None,
            pool: None,
            backend_password: None,
        };
        let group = &self.groups[self.group_of(&identity).ok()?];
        self.order_in(group, user).first().map(|b| b.name.clone())
    }

    /// The backend a directory or an administrator names: by name, or by
    /// address (`host:port`, a bare host, or a name and any port).
    fn named(&self, name: &str) -> Option<Arc<Backend>> {
        self.backends()
            .into_iter()
            .find(|b| b.name == name || b.address == name)
            .or_else(|| {
                self.backends().into_iter().find(|b| {
                    b.address
                        .rsplit_once(':')
                        .is_some_and(|(h, _)| h.trim_matches(['[', ']']) == name)
                })
            })
            .or_else(|| {
                let (host, _) = name.rsplit_once(':')?;
                self.backends().into_iter().find(|b| b.name == host)
            })
    }

    fn pick(
        &self,
        identity: &Identity,
        excluded: &dyn Fn(&Backend) -> bool,
        hint: &Hint,
    ) -> Result<Route, RouteError> {
        let group = &self.groups[self.group_of(identity)?];
        let route = |backend, reason| Route {
            backend,
            reason,
            pool: Arc::clone(&group.name),
        };
        if let Some(name) = &hint.pinned {
            let backend = self
                .named(name)
                .ok_or_else(|| RouteError::UnknownBackend(name.clone()))?;
            if !backend.available() || excluded(&backend) {
                return Err(RouteError::Unavailable(name.clone()));
            }
            return Ok(route(backend, RouteReason::Pinned));
        }
        if identity.backend.is_none() {
            if let Some(name) = &hint.sticky {
                let members = group.members.load();
                let found = members.iter().find(|m| m.name == *name);
                if let Some(b) = found {
                    if !b.is_draining() && !b.is_retired() && !excluded(b) {
                        return Ok(route(Arc::clone(b), RouteReason::Sticky));
                    }
                }
            }
        }
        if let Some(name) = &identity.backend {
            let backend = self
                .named(name)
                .ok_or_else(|| RouteError::UnknownBackend(name.clone()))?;
            if !backend.available() || excluded(&backend) {
                return Err(RouteError::Unavailable(name.clone()));
            }
            return Ok(route(backend, RouteReason::Directory));
        }
        if let Some(backend) = self.sticky_backend(group, &identity.user) {
            if backend.available() && !excluded(&backend) {
                return Ok(route(backend, RouteReason::Sticky));
            }
        }
        let cap = self.bounded_load.and_then(|factor| {
            let members = group.members.load();
            let members = members.iter();
            let eligible = members.clone().filter(|b| b.available()).count();
            let total: usize = members.map(|b| b.active_sessions()).sum();
            (eligible > 0).then(|| (factor * (total + 1) as f64 / eligible as f64).ceil() as usize)
        });
        let mut reason = RouteReason::Hash;
        for backend in self.order_in(group, &identity.user) {
            if !backend.available() || excluded(&backend) {
                if reason == RouteReason::Hash {
                    reason = RouteReason::Failover;
                }
                continue;
            }
            if cap.is_some_and(|cap| backend.active_sessions() >= cap) {
                reason = RouteReason::BoundedLoad;
                continue;
            }
            return Ok(route(backend, reason));
        }
        Err(RouteError::NoBackend(Arc::clone(&group.name)))
    }

    fn shard(&self, user: &str) -> &StickyShard {
        let mut h = self.sticky.keys.build_hasher();
        h.write(user.as_bytes());
        &self.sticky.shards[h.finish() as usize % STICKY_SHARDS]
    }

    /// The backend of `group` holding most of the user's live sessions, if
    /// any (a user moved to another pool is not held in the old one).
    fn sticky_backend(&self, group: &Group, user: &str) -> Option<Arc<Backend>> {
        let members = group.members.load();
        let shard = self.shard(user).lock().unwrap_or_else(|e| e.into_inner());
        let held = shard.get(user)?;
        held.iter()
            .filter(|(b, _)| b.available() && members.iter().any(|m| Arc::ptr_eq(m, b)))
            .max_by_key(|(_, n)| *n)
            .map(|(b, _)| Arc::clone(b))
    }

    /// Counts a relayed session of `user` on `backend` until the lease is
    /// dropped: it feeds stickiness, bounded load and the sessions gauge.
    pub fn lease(self: &Arc<Self>, user: &str, backend: &Arc<Backend>) -> Lease {
        // The map's key and the lease share one copy of the name.
        let key: Arc<str> = {
            let mut shard = self.shard(user).lock().unwrap_or_else(|e| e.into_inner());
            let key = match shard.get_key_value(user) {
                Some((key, _)) => Arc::clone(key),
                None => Arc::from(user),
            };
            let held = shard.entry(Arc::clone(&key)).or_default();
            match held.iter_mut().find(|(b, _)| Arc::ptr_eq(b, backend)) {
                Some((_, n)) => *n += 1,
                None => held.push((Arc::clone(backend), 1)),
            }
            key
        };
        backend.active.fetch_add(1, Ordering::Relaxed);
        backend.sessions_gauge.inc();
        Lease {
            pool: Arc::clone(self),
            backend: Arc::clone(backend),
            user: key,
        }
    }

    /// A session's login at `backend` reached it (or failed on the way):
    /// consecutive failures past `passive_fall` mark it down until its
    /// health check passes again.
    pub fn report(&self, backend: &Backend, reached: bool) {
        if reached {
            backend.passive_failures.store(0, Ordering::Relaxed);
            return;
        }
        if self.passive_fall == 0 {
            return;
        }
        let failures = backend.passive_failures.fetch_add(1, Ordering::Relaxed) + 1;
        if failures >= self.passive_fall {
            backend.set_up(false, "session logins failed");
        }
    }
}

/// A relayed session's place in the pool; see [`Pool::lease`].
pub struct Lease {
    pool: Arc<Pool>,
    backend: Arc<Backend>,
    user: Arc<str>,
}

impl Lease {
    pub fn backend(&self) -> &Arc<Backend> {
        &self.backend
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        let backend = &self.backend;
        backend.active.fetch_sub(1, Ordering::Relaxed);
        backend.sessions_gauge.dec();
        let mut shard = self
            .pool
            .shard(&self.user)
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if let Some(held) = shard.get_mut(&*self.user) {
            if let Some(pos) = held.iter().position(|(b, _)| Arc::ptr_eq(b, &self.backend)) {
                held[pos].1 -= 1;
                if held[pos].1 == 0 {
                    held.swap_remove(pos);
                }
            }
            if held.is_empty() {
                shard.remove(&*self.user);
            }
        }
    }
}

/// The rendezvous weight of `user` on `backend`: SipHash-1-3 with fixed keys,
/// so it is the same in every process and every release. Changing it moves
/// users between backends; don't.
pub fn score(backend: &str, user: &str) -> u64 {
    let mut h =
        siphasher::sip::SipHasher13::new_with_keys(0x706f_7374_6572_6e21, 0x7264_7677_2d68_6173);
    h.write(backend.as_bytes());
    h.write_u8(0xff);
    h.write(user.as_bytes());
    h.finish()
}

/// Weighted rendezvous key (Schindelhauer and Schomaker): `-w / ln(u)` with
/// `u` the hash mapped into (0, 1]. A backend then wins a `w / Σw` share of
/// users, and changing one weight moves users only to or from that backend.
fn weighted(hash: u64, weight: u32) -> f64 {
    let u = (hash as f64 + 1.0) / 18_446_744_073_709_551_616.0;
    let ln = u.ln();
    if ln >= 0.0 {
        f64::INFINITY
    } else {
        -(weight as f64) / ln
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool_with(names: &[&str], extra: &str) -> Arc<Pool> {
        let mut yaml = String::from("pool:\n");
        for (i, n) in names.iter().enumerate() {
            yaml.push_str(&format!(
                "  - {{ name: {n}, address: \"127.0.0.1:{}\" }}\n",
                10000 + i
            ));
        }
        yaml.push_str(extra);
        let config: Backends = serde_yaml::from_str(&yaml).unwrap();
        let pool = Pool::new(&config, &Metrics::new(), &|p| p.to_owned(), None).unwrap();
        pool.commit();
        Arc::new(pool)
    }

    fn pool(names: &[&str]) -> Arc<Pool> {
        pool_with(names, "")
    }

    fn user(name: &str) -> Identity {
        Identity {
            user: name.into(),
            backend: None,
            pool: None,
            backend_password: None,
        }
    }

    fn pick(p: &Pool, u: &str) -> (String, RouteReason) {
        let r = p.select(&user(u), &[]).unwrap();
        (r.backend.name.clone(), r.reason)
    }

    fn backend(p: &Pool, name: &str) -> Arc<Backend> {
        p.backends().into_iter().find(|b| b.name == name).unwrap()
    }

    #[test]
    fn placement_is_stable_and_ignores_pool_order() {
        let a = pool(&["mail-a", "mail-b", "mail-c"]);
        let b = pool(&["mail-c", "mail-a", "mail-b"]);
        for i in 0..200 {
            let u = format!("user{i}@example.com");
            assert_eq!(pick(&a, &u), pick(&b, &u));
        }
    }

    #[test]
    fn users_spread_over_the_pool() {
        let p = pool(&["mail-a", "mail-b", "mail-c"]);
        let mut counts = HashMap::new();
        for i in 0..3000 {
            *counts.entry(pick(&p, &format!("u{i}")).0).or_insert(0) += 1;
        }
        for (name, n) in counts {
            assert!((800..1200).contains(&n), "{name} got {n} of 3000");
        }
    }

    #[test]
    fn weights_set_the_share_and_move_users_only_onto_the_heavier_backend() {
        let even = pool(&["mail-a", "mail-b"]);
        let heavy = pool_with(&[], "  - { name: mail-a, address: \"127.0.0.1:1\" }\n  - { name: mail-b, address: \"127.0.0.1:2\", weight: 3 }\n");
        let mut on_b = 0;
        for i in 0..4000 {
            let u = format!("u{i}");
            let (before, _) = pick(&even, &u);
            let (after, _) = pick(&heavy, &u);
            if after == "mail-b" {
                on_b += 1;
            } else {
                assert_eq!(before, "mail-a", "nobody moves onto the lighter backend");
            }
        }
        assert!(
            (2850..3150).contains(&on_b),
            "weight 3 of 4 took {on_b} of 4000"
        );
    }

    #[test]
    fn removing_a_backend_moves_only_its_users() {
        let full = pool(&["mail-a", "mail-b", "mail-c"]);
        let less = pool(&["mail-a", "mail-b"]);
        for i in 0..500 {
            let u = format!("u{i}");
            let (before, _) = pick(&full, &u);
            if before != "mail-c" {
                assert_eq!(pick(&less, &u).0, before);
            }
        }
    }

    #[test]
    fn a_down_backend_fails_over_to_the_next_in_order_and_back() {
        let p = pool(&["mail-a", "mail-b", "mail-c"]);
        let order = p.order("alice");
        assert_eq!(
            pick(&p, "alice"),
            (order[0].name.clone(), RouteReason::Hash)
        );
        order[0].set_up(false, "test");
        assert_eq!(
            pick(&p, "alice"),
            (order[1].name.clone(), RouteReason::Failover)
        );
        // Another replica with the same view picks the same one.
        let q = pool(&["mail-c", "mail-b", "mail-a"]);
        backend(&q, &order[0].name).set_up(false, "test");
        assert_eq!(pick(&q, "alice").0, order[1].name);
        // Excluding the failover target (it just refused a connection) goes on.
        let r = p.select(&user("alice"), &[order[1].name.as_str()]).unwrap();
        assert_eq!(r.backend.name, order[2].name);
        order[0].set_up(true, "test");
        assert_eq!(
            pick(&p, "alice"),
            (order[0].name.clone(), RouteReason::Hash)
        );
        for b in p.backends() {
            b.set_up(false, "test");
        }
        assert!(matches!(
            p.select(&user("alice"), &[]),
            Err(RouteError::NoBackend(_))
        ));
    }

    #[test]
    fn domains_and_the_directory_choose_the_pool() {
        let p = pool_with(
            &["mail-a", "mail-b"],
            "pools:\n  - name: business\n    domains: [Corp.Example.com]\n    servers:\n      - { name: biz-1, address: \"127.0.0.1:2001\" }\n      - { name: biz-2, address: \"127.0.0.1:2002\" }\n",
        );
        for i in 0..50 {
            let r = p
                .select(&user(&format!("u{i}@corp.example.COM")), &[])
                .unwrap();
            assert!(r.backend.name.starts_with("biz-"), "{}", r.backend.name);
            assert_eq!(&*r.pool, "business");
            let r = p.select(&user(&format!("u{i}@example.net")), &[]).unwrap();
            assert!(r.backend.name.starts_with("mail-"), "{}", r.backend.name);
            assert_eq!(&*r.pool, "default");
        }
        let mut u = user("v@example.net");
        u.pool = Some("business".into());
        assert!(p.select(&u, &[]).unwrap().backend.name.starts_with("biz-"));
        u.pool = Some("nowhere".into());
        assert!(matches!(p.select(&u, &[]), Err(RouteError::UnknownPool(_))));
        // A pool with every backend down does not spill into another pool.
        for b in p.backends().iter().filter(|b| b.name.starts_with("biz-")) {
            b.set_up(false, "test");
        }
        assert!(matches!(
            p.select(&user("w@corp.example.com"), &[]),
            Err(RouteError::NoBackend(pool)) if &*pool == "business"
        ));
    }

    #[test]
    fn discovered_addresses_become_members_and_leave_as_retired() {
        let p = pool_with(
            &[],
            "  - { name: dovecot, address: \"mail.test:143\", discover: true }\n",
        );
        assert!(p.backends().is_empty(), "nothing until the first lookup");
        assert!(matches!(
            p.select(&user("alice"), &[]),
            Err(RouteError::NoBackend(_))
        ));
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        let added = p.set_discovered(0, &[ip("10.0.0.1"), ip("10.0.0.2")]);
        assert_eq!(added.len(), 2);
        assert_eq!(added[0].name, "dovecot-10.0.0.1");
        assert_eq!(added[0].address, "10.0.0.1:143");
        let first = backend(&p, "dovecot-10.0.0.1");
        first.set_up(false, "test");
        let second = backend(&p, "dovecot-10.0.0.2");
        let added = p.set_discovered(0, &[ip("10.0.0.1"), ip("10.0.0.3")]);
        assert_eq!(added.len(), 1, "only 10.0.0.3 is new");
        assert!(
            !backend(&p, "dovecot-10.0.0.1").is_up(),
            "a kept member keeps its state"
        );
        let names: Vec<String> = p.backends().iter().map(|b| b.name.clone()).collect();
        assert_eq!(names, ["dovecot-10.0.0.1", "dovecot-10.0.0.3"]);
        assert!(second.is_retired() && !second.available());
        for i in 0..50 {
            assert_eq!(pick(&p, &format!("u{i}")).0, "dovecot-10.0.0.3");
        }
    }

    #[test]
    fn a_reloaded_pool_keeps_unchanged_backends_with_their_state() {
        let metrics = Metrics::new();
        let build = |yaml: &str, previous: Option<&Pool>| {
            let config: Backends = serde_yaml::from_str(yaml).unwrap();
            let pool = Pool::new(&config, &metrics, &|p| p.to_owned(), previous).unwrap();
            pool.commit();
            Arc::new(pool)
        };
        let old = build(
            "pool:\n  - { name: a, address: \"127.0.0.1:1\" }\n  - { name: b, address: \"127.0.0.1:2\" }\n  - { name: c, address: \"127.0.0.1:3\" }\n",
            None,
        );
        let a = backend(&old, "a");
        a.set_up(false, "test");
        let lease = old.lease("alice", &backend(&old, "b"));
        let new = build(
            "pool:\n  - { name: a, address: \"127.0.0.1:1\" }\n  - { name: b, address: \"127.0.0.1:2\", drain: true }\n  - { name: c, address: \"127.0.0.1:9\" }\n",
            Some(&old),
        );
        new.retire_replaced(&old);
        assert!(Arc::ptr_eq(&backend(&new, "a"), &a), "kept");
        assert!(!backend(&new, "a").is_up(), "with its health");
        let b = backend(&new, "b");
        assert!(
            Arc::ptr_eq(&b, &backend(&old, "b")),
            "a drain change keeps it"
        );
        assert!(b.is_draining() && b.active_sessions() == 1);
        assert!(
            !Arc::ptr_eq(&backend(&new, "c"), &backend(&old, "c")),
            "a new address is a new backend"
        );
        assert!(backend(&old, "c").is_retired());
        // Stickiness survives the reload: the lease's session is seen.
        assert!(
            new.sticky_backend(&new.groups[0], "alice").is_none(),
            "b is draining"
        );
        drop(lease);
        assert_eq!(b.active_sessions(), 0);
    }

    #[test]
    fn a_reload_changes_nothing_until_committed_and_keeps_gauges_true() {
        let metrics = Metrics::new();
        let config = |yaml: &str| serde_yaml::from_str::<Backends>(yaml).unwrap();
        let old = Pool::new(
            &config("pool:\n  - { name: a, address: \"127.0.0.1:1\" }\n  - { name: b, address: \"127.0.0.1:2\" }\n  - { name: c, address: \"127.0.0.1:3\" }\n"),
            &metrics,
            &|p| p.to_owned(),
            None,
        )
        .unwrap();
        old.commit();
        // a drains, b moves to another address, c leaves.
        let new = Pool::new(
            &config("pool:\n  - { name: a, address: \"127.0.0.1:1\", drain: true }\n  - { name: b, address: \"127.0.0.1:9\" }\n"),
            &metrics,
            &|p| p.to_owned(),
            Some(&old),
        )
        .unwrap();
        let a = backend(&old, "a");
        assert!(
            !a.is_draining(),
            "a reload refused after this point changed nothing"
        );
        new.commit();
        new.retire_replaced(&old);
        assert!(a.is_draining());
        let up = |name: &str| {
            metrics
                .registry
                .gather()
                .iter()
                .filter(|f| f.name() == "postern_backend_up")
                .flat_map(|f| f.get_metric().to_vec())
                .find(|m| m.get_label().iter().any(|l| l.value() == name))
                .map(|m| m.get_gauge().get_value())
        };
        assert_eq!(
            up("b"),
            Some(1.0),
            "the moved b is up, not zeroed by the old b's retirement"
        );
        assert_eq!(
            up("c"),
            None,
            "a name gone from the configuration leaves the metrics"
        );
    }

    #[test]
    fn a_draining_backend_takes_no_new_sessions() {
        let p = pool_with(&[], "  - { name: mail-a, address: \"127.0.0.1:1\", drain: true }\n  - { name: mail-b, address: \"127.0.0.1:2\" }\n");
        for i in 0..200 {
            assert_eq!(pick(&p, &format!("u{i}")).0, "mail-b");
        }
    }

    #[test]
    fn directory_hint_wins_and_a_pinned_user_is_never_moved() {
        let p = pool(&["mail-a", "mail-b"]);
        let mut u = user("alice");
        u.backend = Some("mail-b".into());
        let r = p.select(&u, &[]).unwrap();
        assert_eq!(
            (r.backend.name.as_str(), r.reason),
            ("mail-b", RouteReason::Directory)
        );
        backend(&p, "mail-b").set_up(false, "test");
        assert!(matches!(p.select(&u, &[]), Err(RouteError::Unavailable(n)) if n == "mail-b"));
        u.backend = Some("gone".into());
        assert!(matches!(
            p.select(&u, &[]),
            Err(RouteError::UnknownBackend(_))
        ));
    }

    #[test]
    fn live_sessions_keep_a_user_on_their_backend_through_failback() {
        let p = pool(&["mail-a", "mail-b", "mail-c"]);
        let order = p.order("alice");
        order[0].set_up(false, "test");
        let (failover, _) = pick(&p, "alice");
        let lease = p.lease("alice", &backend(&p, &failover));
        assert_eq!(backend(&p, &failover).active_sessions(), 1);
        order[0].set_up(true, "test");
        assert_eq!(pick(&p, "alice"), (failover.clone(), RouteReason::Sticky));
        drop(lease);
        assert_eq!(backend(&p, &failover).active_sessions(), 0);
        assert_eq!(
            pick(&p, "alice"),
            (order[0].name.clone(), RouteReason::Hash)
        );
    }

    #[test]
    fn bounded_load_sends_the_overflow_to_the_next_backend() {
        let p = pool_with(&["mail-a", "mail-b"], "bounded_load: 1.5\n");
        let mut leases = Vec::new();
        // 40 users whose first choice is mail-a, one session each.
        let mut users = (0..)
            .map(|i| format!("u{i}"))
            .filter(|u| p.order(u)[0].name == "mail-a");
        for _ in 0..40 {
            let u = users.next().unwrap();
            let r = p.select(&user(&u), &[]).unwrap();
            leases.push(p.lease(&u, &r.backend));
        }
        let a = backend(&p, "mail-a").active_sessions();
        let b = backend(&p, "mail-b").active_sessions();
        assert_eq!(a + b, 40);
        assert!(
            a <= 31 && b >= 9,
            "mail-a {a}, mail-b {b}: mail-a stays within 1.5 × the mean"
        );
    }

    #[test]
    fn failed_session_logins_mark_a_backend_down() {
        let p = pool_with(&["mail-a"], "passive_fall: 2\n");
        let a = backend(&p, "mail-a");
        p.report(&a, false);
        p.report(&a, true);
        p.report(&a, false);
        assert!(a.is_up(), "a success in between resets the count");
        p.report(&a, false);
        assert!(!a.is_up());
    }

    #[tokio::test]
    async fn closing_resolves_when_the_backend_goes_down() {
        let p = pool(&["mail-a"]);
        let a = backend(&p, "mail-a");
        let waiter = {
            let a = Arc::clone(&a);
            tokio::spawn(async move { a.closing().await })
        };
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished());
        a.set_up(false, "test");
        tokio::time::timeout(std::time::Duration::from_secs(5), waiter)
            .await
            .expect("woken")
            .unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn a_drain_closes_sessions_after_its_grace_period_only() {
        let p = pool(&["mail-a"]);
        let a = backend(&p, "mail-a");
        let waiter = {
            let a = Arc::clone(&a);
            tokio::spawn(async move { a.closing().await })
        };
        a.set_draining(true, Some(Duration::from_secs(600)));
        assert!(!a.available());
        tokio::time::sleep(Duration::from_secs(599)).await;
        assert!(
            !waiter.is_finished(),
            "live sessions stay during the grace period"
        );
        tokio::time::sleep(Duration::from_secs(2)).await;
        tokio::time::timeout(Duration::from_secs(1), waiter)
            .await
            .expect("closed after it")
            .unwrap();
        // A drain ended in time closes nothing.
        a.set_draining(true, Some(Duration::from_secs(60)));
        a.set_draining(false, None);
        let waiter = {
            let a = Arc::clone(&a);
            tokio::spawn(async move { a.closing().await })
        };
        tokio::time::sleep(Duration::from_secs(120)).await;
        assert!(!waiter.is_finished());
        assert!(a.available());
    }

    #[test]
    fn scores_are_fixed_across_releases() {
        // Pinned: a change here would move every user to another backend.
        assert_eq!(score("mail-a", "alice"), 3120978615429448286);
        assert_eq!(score("mail-b", "alice@example.com"), 2362004658889458960);
        assert_ne!(score("mail-a", "alice"), score("mail-b", "alice"));
        assert_ne!(score("mail-a", "bob"), score("mail-ab", "ob"));
        // Equal weights keep the unweighted order.
        assert!(weighted(5, 1) < weighted(6, 1));
        assert!(weighted(u64::MAX - 1, 1) <= weighted(u64::MAX, 1));
    }
}
