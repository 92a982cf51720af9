//! Replicas acting as one, through a Valkey or Redis store (`cluster`).
//!
//! Without a `cluster` block Postern is one node and this module keeps
//! only what a single process needs of it (migration holds and pins, in
//! memory). With one, the store holds, each with a TTL so that a replica
//! that dies leaves nothing that lasts:
//!
//! - the login defence's records: failures per network and per user,
//!   the distinct names failing from a network, its block, and familiar
//!   pairs (the failure delays and blocks hold for the whole cluster; the
//!   in-flight lanes stay per replica);
//! - each live session as a lease (`<prefix>:s:<user>`, a sorted set of
//!   session ids scored by expiry, refreshed by the replica holding it
//!   every third of `lease_ttl`), so `max_sessions_per_user` counts the
//!   whole cluster, and the session's record for the admin API;
//! - the user's backend while they have live sessions and `user_expire`
//!   after (Dovecot director's stickiness), so replicas with briefly
//!   different health views never split a mailbox;
//! - holds and pins of user migration, and backend drains.
//!
//! Admin actions (kick, drain, hold, pin) and network blocks reach every
//! replica on one pub/sub channel (`<prefix>:events`).
//!
//! User names appear in keys only as keyed fingerprints (`key_file`);
//! session records carry the name for the admin API. No password, token
//! or other secret is ever written to the store.
//!
//! **The store is never a reason to refuse a login.** Every operation is
//! bounded by `cluster.store.timeout`; one that fails marks the store
//! down, and until a background ping reaches it again every operation
//! answers from this replica's own state at once (limits become per
//! replica), counted in `postern_cluster_fallbacks_total` and shown by
//! `postern_cluster_store_up`. Coming back, the replica re-registers its
//! live sessions and reloads blocks and drains.
//!
//! Cost on the login path: a right password takes one round trip (the
//! admission script, after the credentials are checked); the session's
//! registration when it reaches its backend and its release are sent
//! without waiting for the answer. A failure takes one round trip, within
//! its delay. Whether a pair is familiar is asked of the store only when
//! this replica would refuse the login as blocked.

mod store;

use std::collections::HashMap;
use std::hash::Hasher;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use prometheus::{HistogramOpts, HistogramVec, IntCounterVec, IntGauge, Opts};
use redis::AsyncCommands;
use serde::{Deserialize, Serialize};
use tokio::sync::Notify;
use tokio::time::Instant;

use crate::auth::guard::Key;
use crate::config::{self, BruteForce};
use crate::live::Live;
use crate::metrics::Metrics;
use crate::registry::{Registry, SessionInfo};
use store::Store;

/// How often a store that is down is tried again.
const RETRY_EVERY: Duration = Duration::from_secs(1);

/// What the store said about a login about to go to a backend.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Admission {
    /// The user is held for a move: the login waits.
    pub held: bool,
    /// `max_sessions_per_user` is reached cluster-wide (their count).
    pub full: Option<u32>,
    /// The backend the user's live (or recent) sessions are on.
    pub sticky: Option<String>,
    /// The backend an administrator pinned the user to.
    pub pinned: Option<String>,
    /// The session holds a lease in the store (to release if the login
    /// fails).
    pub leased: bool,
}

/// The outcome of a failure as the whole cluster counts it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SharedFailure {
    pub network_failures: u32,
    pub user_failures: u32,
    pub blocked: bool,
}

/// Why an administrator ends a user's sessions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum KickWhy {
    Admin,
    /// The user is being moved to another backend: `* BYE [UNAVAILABLE]`.
    Moved,
}

/// An event on the channel every replica listens to.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Event {
    /// The sending process, which does not apply its own events again.
    from: String,
    #[serde(flatten)]
    what: What,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
enum What {
    Kick {
        user: String,
        why: KickWhy,
    },
    Drain {
        backend: String,
        draining: bool,
        close_after_ms: Option<u64>,
    },
    Block {
        network: String,
        ms: u64,
    },
    Hold {
        user: String,
        ms: u64,
    },
    Release {
        user: String,
    },
    Pin {
        user: String,
        backend: String,
    },
    Unpin {
        user: String,
    },
}

impl What {
    fn kind(&self) -> &'static str {
        match self {
            What::Kick { .. } => "kick",
            What::Drain { .. } => "drain",
            What::Block { .. } => "block",
            What::Hold { .. } => "hold",
            What::Release { .. } => "release",
            What::Pin { .. } => "pin",
            What::Unpin { .. } => "unpin",
        }
    }
}

struct ClusterMetrics {
    up: IntGauge,
    errors: IntCounterVec,
    fallbacks: IntCounterVec,
    seconds: HistogramVec,
    events: IntCounterVec,
}

impl ClusterMetrics {
    fn new(m: &Metrics) -> ClusterMetrics {
        let r = &m.registry;
        let up = IntGauge::new(
            "postern_cluster_store_up",
            "1 while the cluster store answers, 0 while this replica uses its own state.",
        )
        .expect("valid metric");
        let errors = IntCounterVec::new(
            Opts::new(
                "postern_cluster_store_errors_total",
                "Store operations that failed or ran past cluster.store.timeout, by operation.",
            ),
            &["op"],
        )
        .expect("valid metric");
        let fallbacks = IntCounterVec::new(
            Opts::new(
                "postern_cluster_fallbacks_total",
                "Store operations answered from this replica's own state instead, by operation.",
            ),
            &["op"],
        )
        .expect("valid metric");
        let seconds = HistogramVec::new(
            HistogramOpts::new(
                "postern_cluster_store_seconds",
                "Round trips to the cluster store, by operation.",
            )
            .buckets(vec![
                0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0,
            ]),
            &["op"],
        )
        .expect("valid metric");
        let events = IntCounterVec::new(
            Opts::new(
                "postern_cluster_events_total",
                "Events received from other replicas, by kind.",
            ),
            &["kind"],
        )
        .expect("valid metric");
        for c in [&errors, &fallbacks, &events] {
            r.register(Box::new(c.clone())).expect("unique metric");
        }
        r.register(Box::new(up.clone())).expect("unique metric");
        r.register(Box::new(seconds.clone()))
            .expect("unique metric");
        ClusterMetrics {
            up,
            errors,
            fallbacks,
            seconds,
            events,
        }
    }
}

/// The store's settings and what was read for it at start.
struct Shared {
    config: config::Cluster,
    prefix: String,
    channel: String,
    password: Option<String>,
    ca: Option<Vec<u8>>,
    metrics: ClusterMetrics,
    store: OnceLock<Store>,
    up: AtomicBool,
}

pub struct Cluster {
    shared: Option<Shared>,
    /// This process, on the event channel.
    instance: String,
    replica: String,
    key: (u64, u64),
    /// Holds and pins as this replica knows them: all of them on a single
    /// node; with a store, a mirror kept by events, used while it is down.
    holds: Mutex<HashMap<String, Instant>>,
    pins: Mutex<HashMap<String, String>>,
    /// Woken when a hold is released.
    released: Notify,
    /// Set at start: what events act on.
    context: OnceLock<(Live, Arc<Registry>)>,
}

fn now_unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn ms(d: Duration) -> u64 {
    d.as_millis().min(u64::MAX as u128) as u64
}

impl Cluster {
    /// From the configuration; files it names are read now, so their
    /// errors are configuration errors. Nothing is connected until
    /// [`Cluster::start`].
    pub fn new(config: &config::Config, metrics: &Metrics) -> Result<Cluster, String> {
        let instance = format!("{:016x}", rand::random::<u64>());
        let Some(c) = &config.cluster else {
            return Ok(Cluster {
                shared: None,
                instance,
                replica: String::new(),
                key: (0, 0),
                holds: Mutex::default(),
                pins: Mutex::default(),
                released: Notify::new(),
                context: OnceLock::new(),
            });
        };
        let read = |key: &str, file: &std::path::Path| {
            let path = config.resolve(file);
            std::fs::read(&path)
                .map_err(|e| format!("key `{key}`: cannot read {}: {e}", path.display()))
        };
        let line = |key: &str, bytes: Vec<u8>| -> Result<String, String> {
            let text = String::from_utf8(bytes).map_err(|_| format!("key `{key}`: not UTF-8"))?;
            let line = text.lines().next().unwrap_or_default().to_owned();
            if line.is_empty() {
                return Err(format!("key `{key}`: the file's first line is empty"));
            }
            Ok(line)
        };
        let password = match &c.store.password_file {
            Some(f) => Some(line(
                "cluster.store.password_file",
                read("cluster.store.password_file", f)?,
            )?),
            None => None,
        };
        let ca = match &c.store.ca_file {
            Some(f) => Some(read("cluster.store.ca_file", f)?),
            None => None,
        };
        let key = match &c.key_file {
            Some(f) => {
                let secret = line("cluster.key_file", read("cluster.key_file", f)?)?;
                if secret.len() < 16 {
                    return Err("key `cluster.key_file`: the key needs 16 bytes or more".into());
                }
                let mut a = siphasher::sip::SipHasher13::new_with_keys(1, 2);
                a.write(secret.as_bytes());
                let mut b = siphasher::sip::SipHasher13::new_with_keys(3, 4);
                b.write(secret.as_bytes());
                (a.finish(), b.finish())
            }
            None => (0x706f_7374_6572_6e21, 0x6669_6e67_6572_7072),
        };
        let replica = if c.replica.is_empty() {
            std::fs::read_to_string("/proc/sys/kernel/hostname")
                .ok()
                .map(|h| h.trim().to_owned())
                .filter(|h| !h.is_empty())
                .unwrap_or_else(|| "postern".into())
        } else {
            c.replica.clone()
        };
        let metrics = ClusterMetrics::new(metrics);
        Ok(Cluster {
            shared: Some(Shared {
                config: c.clone(),
                prefix: c.store.key_prefix.clone(),
                channel: format!("{}:events", c.store.key_prefix),
                password,
                ca,
                metrics,
                store: OnceLock::new(),
                up: AtomicBool::new(false),
            }),
            instance,
            replica,
            key,
            holds: Mutex::default(),
            pins: Mutex::default(),
            released: Notify::new(),
            context: OnceLock::new(),
        })
    }

    /// Whether a store is configured.
    pub fn is_shared(&self) -> bool {
        self.shared.is_some()
    }

    /// Whether the store answers now (false without one).
    pub fn store_up(&self) -> bool {
        self.shared
            .as_ref()
            .is_some_and(|s| s.up.load(Ordering::Acquire))
    }

    /// Connects to the store and starts listening to the other replicas,
    /// refreshing this one's leases, and watching the store's health; on
    /// the runtime this is called on (it must live as long as the process).
    pub fn start(self: &Arc<Self>, live: Live, registry: Arc<Registry>) -> Result<(), String> {
        let _ = self.context.set((live, registry));
        let Some(shared) = &self.shared else {
            return Ok(());
        };
        let store = Store::open(
            &shared.config,
            shared.password.as_deref(),
            shared.ca.clone(),
        )?;
        let _ = shared.store.set(store);
        let me = Arc::clone(self);
        tokio::spawn(async move { me.watch_health().await });
        let me = Arc::clone(self);
        tokio::spawn(async move { me.listen().await });
        let me = Arc::clone(self);
        tokio::spawn(async move { me.refresh_leases().await });
        Ok(())
    }

    /// A user name's fingerprint, as keys hold it.
    fn fingerprint(&self, user: &str) -> String {
        let mut h = siphasher::sip128::SipHasher13::new_with_keys(self.key.0, self.key.1);
        h.write(user.as_bytes());
        format!(
            "{:032x}",
            siphasher::sip128::Hasher128::finish128(&h).as_u128()
        )
    }

    fn key(&self, kind: &str, id: &str) -> String {
        let prefix = self
            .shared
            .as_ref()
            .map_or("postern", |s| s.prefix.as_str());
        format!("{prefix}:{kind}:{id}")
    }

    /// Runs one store operation within the time budget; `None` (counted as
    /// a fallback) when there is no store, it is down, or it fails now.
    async fn call<T, F>(&self, op: &'static str, run: impl FnOnce(Store2) -> F) -> Option<T>
    where
        F: std::future::Future<Output = redis::RedisResult<T>>,
    {
        let shared = self.shared.as_ref()?;
        let m = &shared.metrics;
        let Some(store) = shared.store.get() else {
            m.fallbacks.with_label_values(&[op]).inc();
            return None;
        };
        if !shared.up.load(Ordering::Acquire) {
            m.fallbacks.with_label_values(&[op]).inc();
            return None;
        }
        let started = Instant::now();
        let handle = Store2 {
            conn: store.conn.clone(),
            scripts: Arc::clone(&store.scripts),
        };
        let result = tokio::time::timeout(shared.config.store.timeout, run(handle)).await;
        m.seconds
            .with_label_values(&[op])
            .observe(started.elapsed().as_secs_f64());
        let error = match result {
            Ok(Ok(value)) => return Some(value),
            Ok(Err(e)) => e.to_string(),
            Err(_) => format!("no answer within {:?}", shared.config.store.timeout),
        };
        m.errors.with_label_values(&[op]).inc();
        m.fallbacks.with_label_values(&[op]).inc();
        self.mark_down(op, &error);
        None
    }

    fn mark_down(&self, op: &str, error: &str) {
        let Some(shared) = &self.shared else { return };
        if shared.up.swap(false, Ordering::AcqRel) {
            shared.metrics.up.set(0);
            tracing::warn!(op, error, "cluster store unreachable: this replica goes on with its own state (limits per replica) until it answers again");
        }
    }

    /// Pings the store every second while it is down (every few while it
    /// is up); when it answers again, re-registers this replica's
    /// sessions and reloads blocks and drains.
    async fn watch_health(self: Arc<Self>) {
        let Some(shared) = &self.shared else { return };
        let Some(store) = shared.store.get() else {
            return;
        };
        loop {
            let mut conn = store.conn.clone();
            let ping = tokio::time::timeout(
                Duration::from_secs(1),
                redis::cmd("PING").query_async::<String>(&mut conn),
            )
            .await;
            let up = shared.up.load(Ordering::Acquire);
            match ping {
                Ok(Ok(_)) if !up => {
                    shared.up.store(true, Ordering::Release);
                    shared.metrics.up.set(1);
                    tracing::info!("cluster store reachable: state shared with the other replicas");
                    self.resync().await;
                }
                Ok(Ok(_)) => {}
                Ok(Err(e)) => self.mark_down("ping", &e.to_string()),
                Err(_) => self.mark_down("ping", "no answer within 1s"),
            }
            let next = if shared.up.load(Ordering::Acquire) {
                Duration::from_secs(5)
            } else {
                RETRY_EVERY
            };
            tokio::time::sleep(next).await;
        }
    }

    /// After the store was unreachable (or at start): this replica's
    /// sessions registered again, blocks and drains read.
    async fn resync(&self) {
        self.refresh_all().await;
        let Some((live, _)) = self.context.get() else {
            return;
        };
        let Some(shared) = &self.shared else { return };
        let Some(store) = shared.store.get() else {
            return;
        };
        let mut conn = store.conn.clone();
        let scan = async {
            let mut blocks = Vec::new();
            let mut drains = Vec::new();
            for (pattern, into) in [
                (self.key("d:b", "*"), &mut blocks),
                (self.key("c:drain", "*"), &mut drains),
            ] {
                let mut cursor: u64 = 0;
                loop {
                    let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
                        .arg(cursor)
                        .arg("MATCH")
                        .arg(&pattern)
                        .arg("COUNT")
                        .arg(1000)
                        .query_async(&mut conn)
                        .await?;
                    into.extend(keys);
                    cursor = next;
                    if cursor == 0 || into.len() > 100_000 {
                        break;
                    }
                }
            }
            let mut timed = Vec::with_capacity(blocks.len());
            for k in blocks {
                let left: i64 = conn.pttl(&k).await?;
                timed.push((k, left));
            }
            redis::RedisResult::Ok((timed, drains))
        };
        match tokio::time::timeout(Duration::from_secs(10), scan).await {
            Ok(Ok((blocks, drains))) => {
                let rt = live.load();
                let block_prefix = self.key("d:b", "");
                for (k, left) in blocks {
                    let (Some(net), true) = (
                        k.strip_prefix(&block_prefix).and_then(Key::from_ident),
                        left > 0,
                    ) else {
                        continue;
                    };
                    rt.guard.block(&net, Duration::from_millis(left as u64));
                }
                let drain_prefix = self.key("c:drain", "");
                for k in drains {
                    let Some(name) = k.strip_prefix(&drain_prefix) else {
                        continue;
                    };
                    if let Some(b) = rt.pool.backends().into_iter().find(|b| b.name == name) {
                        if !b.is_draining() {
                            b.set_draining(true, None);
                        }
                    }
                }
            }
            Ok(Err(e)) => self.mark_down("resync", &e.to_string()),
            Err(_) => self.mark_down("resync", "no answer within 10s"),
        }
    }

    /// Subscribes to the event channel, again after every disconnection.
    async fn listen(self: Arc<Self>) {
        use futures_util::StreamExt;
        let Some(shared) = &self.shared else { return };
        let Some(store) = shared.store.get() else {
            return;
        };
        loop {
            let subscribed = async {
                let mut pubsub = store.client.get_async_pubsub().await?;
                pubsub.subscribe(&shared.channel).await?;
                redis::RedisResult::Ok(pubsub)
            };
            match tokio::time::timeout(Duration::from_secs(3), subscribed).await {
                Ok(Ok(pubsub)) => {
                    tracing::debug!(channel = shared.channel, "listening to the other replicas");
                    let mut messages = pubsub.into_on_message();
                    while let Some(msg) = messages.next().await {
                        let Ok(text) = msg.get_payload::<String>() else {
                            continue;
                        };
                        match serde_json::from_str::<Event>(&text) {
                            Ok(event) if event.from != self.instance => self.apply(event.what),
                            Ok(_) => {}
                            Err(e) => tracing::warn!(error = %e, "cluster event not understood"),
                        }
                    }
                    tracing::warn!("cluster event channel lost; subscribing again");
                }
                Ok(Err(e)) => {
                    tracing::debug!(error = %e, "cannot subscribe to the cluster events yet")
                }
                Err(_) => tracing::debug!("cannot subscribe to the cluster events yet: no answer"),
            }
            tokio::time::sleep(RETRY_EVERY).await;
        }
    }

    /// Acts on an event from another replica (or, without a store, from
    /// this one).
    fn apply(&self, what: What) {
        if let Some(s) = &self.shared {
            s.metrics.events.with_label_values(&[what.kind()]).inc();
        }
        let Some((live, registry)) = self.context.get() else {
            return;
        };
        match what {
            What::Kick { user, why } => {
                let n = registry.kick_user(&user, why == KickWhy::Moved);
                tracing::info!(
                    user,
                    kicked = n,
                    ?why,
                    "sessions ended at another replica's request"
                );
            }
            What::Drain {
                backend,
                draining,
                close_after_ms,
            } => {
                let rt = live.load();
                if let Some(b) = rt.pool.backends().into_iter().find(|b| b.name == backend) {
                    b.set_draining(draining, close_after_ms.map(Duration::from_millis));
                }
            }
            What::Block { network, ms } => {
                if let Some(net) = Key::from_ident(&network) {
                    live.load().guard.block(&net, Duration::from_millis(ms));
                    tracing::info!(
                        network,
                        block_s = ms / 1000,
                        "network blocked by another replica's failures"
                    );
                }
            }
            What::Hold { user, ms } => {
                self.holds
                    .lock()
                    .unwrap()
                    .insert(user, Instant::now() + Duration::from_millis(ms));
            }
            What::Release { user } => {
                self.holds.lock().unwrap().remove(&user);
                self.released.notify_waiters();
            }
            What::Pin { user, backend } => {
                self.pins.lock().unwrap().insert(user, backend);
            }
            What::Unpin { user } => {
                self.pins.lock().unwrap().remove(&user);
            }
        }
    }

    /// Applies an event here and sends it to every other replica.
    async fn announce(&self, what: What) {
        let event = Event {
            from: self.instance.clone(),
            what: what.clone(),
        };
        self.apply(what);
        let Some(shared) = &self.shared else { return };
        let text = serde_json::to_string(&event).expect("serialisable");
        let channel = shared.channel.clone();
        self.call("publish", |mut s| async move {
            s.conn.publish::<_, _, i64>(channel, text).await
        })
        .await;
    }

    /// Every third of `lease_ttl`, this replica's live sessions' leases
    /// (and their users' backends) are extended.
    async fn refresh_leases(self: Arc<Self>) {
        let Some(shared) = &self.shared else { return };
        let every = shared.config.lease_ttl / 3;
        loop {
            tokio::time::sleep(every).await;
            if self.store_up() {
                self.refresh_all().await;
            }
        }
    }

    async fn refresh_all(&self) {
        let Some((_, registry)) = self.context.get() else {
            return;
        };
        let sessions = registry.list();
        let Some(store) = self.shared.as_ref().and_then(|s| s.store.get()) else {
            return;
        };
        // A pipeline runs scripts by hash only: loaded first (a restarted
        // store has none).
        let loaded = self
            .call("refresh", |mut s| async move {
                s.scripts
                    .register
                    .prepare_invoke()
                    .load_async(&mut s.conn)
                    .await
            })
            .await;
        if loaded.is_none() {
            return;
        }
        for chunk in sessions.chunks(500) {
            let mut pipe = redis::pipe();
            for s in chunk {
                if s.user == "-" {
                    continue;
                }
                self.register_into(&mut pipe, &store.scripts.register, s);
            }
            let done = self
                .call("refresh", |mut s| async move {
                    pipe.query_async::<()>(&mut s.conn).await
                })
                .await;
            if done.is_none() {
                return;
            }
        }
    }

    fn register_into(&self, pipe: &mut redis::Pipeline, script: &redis::Script, s: &SessionInfo) {
        let Some((keys, args)) = self.registration(s) else {
            return;
        };
        let mut invocation = script.prepare_invoke();
        for k in &keys {
            invocation.key(k);
        }
        for a in args {
            invocation.arg(a);
        }
        pipe.invoke_script(&invocation);
    }

    /// The keys and arguments of a session's [`store::REGISTER`].
    #[allow(clippy::type_complexity)]
    fn registration(&self, s: &SessionInfo) -> Option<([String; 3], Vec<String>)> {
        let shared = self.shared.as_ref()?;
        if s.relayed {
            // Its backend is a relay, not where the user's mail lives.
            return None;
        }
        let c = &shared.config;
        let fp = self.fingerprint(&s.user);
        let info = serde_json::json!({
            "id": s.id,
            "user": s.user,
            "replica": self.replica,
            "client": s.client.to_string(),
            "listener": s.listener,
            "protocol": s.protocol.as_str(),
            "backend": s.backend,
            "started_unix": s.started.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs()),
        })
        .to_string();
        Some((
            [
                self.key("s", &fp),
                self.key("s:i", &fp),
                self.key("u:b", &fp),
            ],
            vec![
                s.id.clone(),
                ms(c.lease_ttl).to_string(),
                info,
                s.backend.clone(),
                ms(c.lease_ttl + c.user_expire).to_string(),
            ],
        ))
    }

    /// Before a login goes to a backend: holds, the cluster-wide session
    /// count (a lease taken for `session` when there is room), the user's
    /// backend and pin; the pair made familiar for `familiar_for`.
    pub async fn admit(
        &self,
        user: &str,
        network: Option<&Key>,
        max: u32,
        session: &str,
        familiar_for: Duration,
    ) -> Admission {
        let local = || Admission {
            held: self.held_here(user),
            pinned: self.pins.lock().unwrap().get(user).cloned(),
            ..Admission::default()
        };
        let Some(shared) = &self.shared else {
            return local();
        };
        let fp = self.fingerprint(user);
        let keys = [
            self.key("s", &fp),
            self.key("s:i", &fp),
            self.key("u:b", &fp),
            self.key("u:p", &fp),
            self.key("u:h", &fp),
            network.map_or_else(
                || self.key("d:p", "-"),
                |n| self.key("d:p", &self.pair(user, n)),
            ),
        ];
        let familiar_ms = if network.is_some() {
            ms(familiar_for)
        } else {
            0
        };
        let lease = ms(shared.config.lease_ttl);
        let answer = self
            .call("admit", |mut s| async move {
                let mut inv = s.scripts.admit.prepare_invoke();
                for k in &keys {
                    inv.key(k);
                }
                inv.arg(max).arg(session).arg(lease).arg(familiar_ms);
                inv.invoke_async::<(u8, u32, Option<String>, Option<String>)>(&mut s.conn)
                    .await
            })
            .await;
        let Some((state, live, sticky, pinned)) = answer else {
            return local();
        };
        {
            let mut pins = self.pins.lock().unwrap();
            match &pinned {
                Some(b) => pins.insert(user.to_owned(), b.clone()),
                None => pins.remove(user),
            };
        }
        Admission {
            held: state == 1,
            full: (state == 2).then_some(live),
            sticky,
            pinned,
            leased: state == 0,
        }
    }

    /// A session reached its backend: its lease and record, and the user's
    /// backend. Sent without waiting for the answer.
    pub fn register(self: &Arc<Self>, info: &Arc<SessionInfo>) {
        if !self.store_up() {
            return;
        }
        let me = Arc::clone(self);
        let info = Arc::clone(info);
        tokio::spawn(async move {
            let Some(inv) = me.registration(&info) else {
                return;
            };
            me.call("register", |mut s| async move {
                let mut inv = inv;
                let script = Arc::clone(&s.scripts);
                let mut call = script.register.prepare_invoke();
                for k in &inv.0 {
                    call.key(k);
                }
                for a in inv.1.drain(..) {
                    call.arg(a);
                }
                call.invoke_async::<i64>(&mut s.conn).await
            })
            .await;
        });
    }

    /// A session ended, or its login failed after [`Cluster::admit`]
    /// leased it. Sent without waiting for the answer.
    pub fn release(self: &Arc<Self>, user: &str, session: &str) {
        let Some(shared) = &self.shared else { return };
        if !self.store_up() {
            return;
        }
        let fp = self.fingerprint(user);
        let keys = [
            self.key("s", &fp),
            self.key("s:i", &fp),
            self.key("u:b", &fp),
        ];
        let session = session.to_owned();
        let expire = ms(shared.config.user_expire);
        let me = Arc::clone(self);
        tokio::spawn(async move {
            me.call("release", |mut s| async move {
                let mut inv = s.scripts.release.prepare_invoke();
                for k in &keys {
                    inv.key(k);
                }
                inv.arg(session).arg(expire);
                inv.invoke_async::<i64>(&mut s.conn).await
            })
            .await;
        });
    }

    fn pair(&self, user: &str, network: &Key) -> String {
        self.fingerprint(&format!("{}\n{user}", network.ident()))
    }

    /// Records a failed login in the store; `None` while it is unreachable
    /// (the caller has recorded it in its own state already).
    pub async fn failed(
        &self,
        network: &Key,
        user: Option<&str>,
        policy: &BruteForce,
    ) -> Option<SharedFailure> {
        let shared = self.shared.as_ref()?;
        let net = network.ident();
        let fp = user.map(|u| self.fingerprint(u)).unwrap_or_default();
        let keys = [
            self.key("d:n", &net),
            self.key("d:u", if fp.is_empty() { "-" } else { &fp }),
            self.key("d:nn", &net),
            self.key("d:b", &net),
            match user {
                Some(u) => self.key("d:p", &self.pair(u, network)),
                None => self.key("d:p", "-"),
            },
        ];
        let block_ms = ms(policy.block_for);
        let event = serde_json::to_string(&Event {
            from: self.instance.clone(),
            what: What::Block {
                network: net.clone(),
                ms: block_ms,
            },
        })
        .expect("serialisable");
        let channel = shared.channel.clone();
        let args = (ms(policy.window), policy.block_after, block_ms, fp);
        let (nf, uf, blocked) = self
            .call("fail", |mut s| async move {
                let mut inv = s.scripts.fail.prepare_invoke();
                for k in &keys {
                    inv.key(k);
                }
                inv.arg(args.0)
                    .arg(args.1)
                    .arg(args.2)
                    .arg(args.3)
                    .arg(channel)
                    .arg(net)
                    .arg(event);
                inv.invoke_async::<(u32, u32, u8)>(&mut s.conn).await
            })
            .await?;
        Some(SharedFailure {
            network_failures: nf,
            user_failures: uf,
            blocked: blocked == 1,
        })
    }

    /// Whether the store knows `user` as familiar on `network` (a success
    /// there, through any replica, and fewer than three failures since).
    pub async fn familiar(&self, user: &str, network: &Key) -> Option<bool> {
        self.shared.as_ref()?;
        let key = self.key("d:p", &self.pair(user, network));
        let failures: Option<u32> = self
            .call("familiar", |mut s| async move { s.conn.get(key).await })
            .await?;
        Some(failures.is_some_and(|f| f < u32::from(crate::auth::guard::FAMILIAR_FAILURES)))
    }

    fn held_here(&self, user: &str) -> bool {
        let mut holds = self.holds.lock().unwrap();
        match holds.get(user) {
            Some(until) if *until > Instant::now() => true,
            Some(_) => {
                holds.remove(user);
                false
            }
            None => false,
        }
    }

    /// Resolves when a hold is released here (or soon after, at most
    /// `poll`, for a release this replica did not hear of).
    pub async fn hold_changed(&self, poll: Duration) {
        let released = self.released.notified();
        tokio::select! {
            _ = released => {}
            _ = tokio::time::sleep(poll) => {}
        }
    }

    /// The longest a login waits on a hold.
    pub fn hold_wait(&self) -> Duration {
        self.shared
            .as_ref()
            .map_or(Duration::from_secs(10), |s| s.config.hold_wait)
    }

    // ----- admin actions -----

    /// Ends `user`'s sessions on every replica; how many were here.
    pub async fn kick(&self, user: &str, why: KickWhy) -> usize {
        let here = self
            .context
            .get()
            .map_or(0, |(_, r)| r.kick_user(user, why == KickWhy::Moved));
        if self.shared.is_some() {
            let event = Event {
                from: self.instance.clone(),
                what: What::Kick {
                    user: user.to_owned(),
                    why,
                },
            };
            let channel = self
                .shared
                .as_ref()
                .map(|s| s.channel.clone())
                .unwrap_or_default();
            let text = serde_json::to_string(&event).expect("serialisable");
            self.call("publish", |mut s| async move {
                s.conn.publish::<_, _, i64>(channel, text).await
            })
            .await;
        }
        here
    }

    /// Drains or undrains `backend` on every replica; a drain is kept in
    /// the store until undrained, for replicas that start later.
    pub async fn drain(&self, backend: &str, draining: bool, close_after: Option<Duration>) {
        if self.shared.is_some() {
            let key = self.key("c:drain", backend);
            self.call("drain", |mut s| async move {
                if draining {
                    s.conn.set::<_, _, ()>(key, 1).await
                } else {
                    s.conn.del::<_, ()>(key).await
                }
            })
            .await;
        }
        self.announce(What::Drain {
            backend: backend.to_owned(),
            draining,
            close_after_ms: close_after.map(ms),
        })
        .await;
    }

    /// Holds `user`'s new logins for up to `hold` (or until released).
    pub async fn hold(&self, user: &str, hold: Duration) -> Result<(), String> {
        if self.shared.is_some() {
            let key = self.key("u:h", &self.fingerprint(user));
            let held = self
                .call("hold", |mut s| async move {
                    s.conn.pset_ex::<_, _, ()>(key, 1, ms(hold)).await
                })
                .await;
            if held.is_none() {
                return Err("the cluster store is unreachable".into());
            }
        }
        self.announce(What::Hold {
            user: user.to_owned(),
            ms: ms(hold),
        })
        .await;
        Ok(())
    }

    /// Lets `user`'s logins through again.
    pub async fn release_hold(&self, user: &str) -> Result<(), String> {
        if self.shared.is_some() {
            let key = self.key("u:h", &self.fingerprint(user));
            if self
                .call(
                    "hold",
                    |mut s| async move { s.conn.del::<_, ()>(key).await },
                )
                .await
                .is_none()
            {
                return Err("the cluster store is unreachable".into());
            }
        }
        self.announce(What::Release {
            user: user.to_owned(),
        })
        .await;
        Ok(())
    }

    /// Sends `user` to `backend` from now on, whatever the hash or their
    /// sessions say, until unpinned (or the directory names the same
    /// backend). Their recorded backend is forgotten.
    pub async fn pin(&self, user: &str, backend: &str) -> Result<(), String> {
        if self.shared.is_some() {
            let fp = self.fingerprint(user);
            let (pin, sticky) = (self.key("u:p", &fp), self.key("u:b", &fp));
            let backend = backend.to_owned();
            if self
                .call("pin", |mut s| async move {
                    redis::pipe()
                        .set(pin, backend)
                        .ignore()
                        .del(sticky)
                        .ignore()
                        .query_async::<()>(&mut s.conn)
                        .await
                })
                .await
                .is_none()
            {
                return Err("the cluster store is unreachable".into());
            }
        }
        self.announce(What::Pin {
            user: user.to_owned(),
            backend: backend.to_owned(),
        })
        .await;
        Ok(())
    }

    /// Removes `user`'s pin.
    pub async fn unpin(&self, user: &str) -> Result<(), String> {
        if self.shared.is_some() {
            let key = self.key("u:p", &self.fingerprint(user));
            if self
                .call("pin", |mut s| async move { s.conn.del::<_, ()>(key).await })
                .await
                .is_none()
            {
                return Err("the cluster store is unreachable".into());
            }
        }
        self.announce(What::Unpin {
            user: user.to_owned(),
        })
        .await;
        Ok(())
    }

    /// The pin of `user` as this replica knows it.
    pub fn pinned(&self, user: &str) -> Option<String> {
        self.pins.lock().unwrap().get(user).cloned()
    }

    /// `user`'s live sessions on every replica (`None`: the store is
    /// unreachable); without a store, this replica's.
    pub async fn sessions(&self, user: &str) -> Option<Vec<serde_json::Value>> {
        if self.shared.is_none() {
            let (_, registry) = self.context.get()?;
            return Some(
                registry
                    .list()
                    .iter()
                    .filter(|s| s.user == user)
                    .map(|s| {
                        serde_json::json!({
                            "id": s.id,
                            "user": s.user,
                            "replica": self.replica,
                            "client": s.client.to_string(),
                            "listener": s.listener,
                            "protocol": s.protocol.as_str(),
                            "backend": s.backend,
                            "started_unix": s.started.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs()),
                        })
                    })
                    .collect(),
            );
        }
        let fp = self.fingerprint(user);
        let keys = [self.key("s", &fp), self.key("s:i", &fp)];
        let records = self
            .call("sessions", |mut s| async move {
                let mut inv = s.scripts.sessions.prepare_invoke();
                inv.key(&keys[0]).key(&keys[1]);
                inv.invoke_async::<Vec<Option<String>>>(&mut s.conn).await
            })
            .await?;
        Some(
            records
                .into_iter()
                .flatten()
                .filter_map(|r| serde_json::from_str(&r).ok())
                .collect(),
        )
    }

    /// Every live session's record, on every replica (`None`: the store
    /// is unreachable); without a store, this replica's.
    pub async fn all_sessions(&self) -> Option<Vec<serde_json::Value>> {
        let record = |s: &SessionInfo| {
            serde_json::json!({
                "id": s.id,
                "user": s.user,
                "replica": self.replica,
                "client": s.client.to_string(),
                "listener": s.listener,
                "protocol": s.protocol.as_str(),
                "backend": s.backend,
                "started_unix": s.started.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs()),
            })
        };
        let Some(shared) = &self.shared else {
            let (_, registry) = self.context.get()?;
            return Some(registry.list().iter().map(|s| record(s)).collect());
        };
        if !self.store_up() {
            return None;
        }
        let store = shared.store.get()?;
        let mut conn = store.conn.clone();
        let pattern = self.key("s:i", "*");
        let scan = async {
            let mut out = Vec::new();
            let mut cursor: u64 = 0;
            loop {
                let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
                    .arg(cursor)
                    .arg("MATCH")
                    .arg(&pattern)
                    .arg("COUNT")
                    .arg(1000)
                    .query_async(&mut conn)
                    .await?;
                for k in keys {
                    let live: Vec<String> = redis::cmd("ZRANGEBYSCORE")
                        .arg(k.replacen(":s:i:", ":s:", 1))
                        .arg(now_unix_ms())
                        .arg("+inf")
                        .query_async(&mut conn)
                        .await?;
                    if live.is_empty() {
                        continue;
                    }
                    let records: Vec<Option<String>> = redis::cmd("HMGET")
                        .arg(&k)
                        .arg(&live)
                        .query_async(&mut conn)
                        .await?;
                    out.extend(
                        records
                            .into_iter()
                            .flatten()
                            .filter_map(|r| serde_json::from_str(&r).ok()),
                    );
                }
                cursor = next;
                if cursor == 0 || out.len() > 2_000_000 {
                    return redis::RedisResult::Ok(out);
                }
            }
        };
        match tokio::time::timeout(Duration::from_secs(60), scan).await {
            Ok(Ok(out)) => Some(out),
            _ => None,
        }
    }

    /// The unix time in milliseconds, for replies.
    pub fn now_ms() -> u64 {
        now_unix_ms()
    }
}

/// A session's lease in the store, taken by [`Cluster::admit`]; given
/// back when dropped (the session ended, or its backend login failed).
pub struct ClusterLease {
    cluster: Arc<Cluster>,
    user: String,
    session: String,
}

impl ClusterLease {
    pub fn new(cluster: &Arc<Cluster>, user: &str, session: &str) -> ClusterLease {
        ClusterLease {
            cluster: Arc::clone(cluster),
            user: user.to_owned(),
            session: session.to_owned(),
        }
    }
}

impl Drop for ClusterLease {
    fn drop(&mut self) {
        self.cluster.release(&self.user, &self.session);
    }
}

/// A store handle for one operation.
struct Store2 {
    conn: redis::aio::ConnectionManager,
    scripts: Arc<store::Scripts>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_read_back_as_written() {
        let e = Event {
            from: "a".into(),
            what: What::Drain {
                backend: "mail-1".into(),
                draining: true,
                close_after_ms: Some(3000),
            },
        };
        let text = serde_json::to_string(&e).unwrap();
        assert_eq!(
            text,
            r#"{"from":"a","kind":"drain","backend":"mail-1","draining":true,"close_after_ms":3000}"#
        );
        assert_eq!(serde_json::from_str::<Event>(&text).unwrap(), e);
        let k = Event {
            from: "b".into(),
            what: What::Kick {
                user: "alice@example.com".into(),
                why: KickWhy::Moved,
            },
        };
        let text = serde_json::to_string(&k).unwrap();
        assert_eq!(serde_json::from_str::<Event>(&text).unwrap(), k);
    }
}
