//! After the gate: the per-user session limit, routing with failover, and
//! the protocol's backend login ([`crate::backend`] for IMAP,
//! [`crate::pop3::backend`] for POP3), the same for every protocol.
//!
//! A refusal comes back typed ([`EnterError`]) for the front to word; the
//! causes go to the log here.

use std::sync::Arc;

use tokio::time::Instant;

use super::Session;
use crate::auth::guard::{Full, Key};
use crate::backend::{self, BackendError, BackendSession, ClientAddresses, LoginRequest};
use crate::config::{ForwardClientAddress, Protocol};
use crate::imap::Secret;
use crate::route::{Route, RouteError, RouteReason};

use super::gate::Admitted;

/// A user logged in at a backend.
pub struct Entered {
    pub backend: BackendSession,
    pub route: Route,
    /// When the credentials arrived.
    pub received: Instant,
}

/// Why a user Postern let in could not be logged in at a backend.
#[derive(Debug)]
pub enum EnterError {
    /// `max_sessions_per_user` reached.
    UserLimit,
    /// No backend could take the session; a short reason for the client.
    Unavailable(&'static str),
    /// The backend refused for a reason of its own that the client should
    /// hear as it was said (POP3 `[IN-USE]`: the maildrop is locked).
    InUse(String),
}

impl Session {
    /// The per-user limit, routing, and the backend login, with the user's
    /// password or, where there is none (a token login) or the
    /// configuration says so, as the master user.
    pub async fn enter(&mut self, admitted: Admitted) -> Result<Entered, EnterError> {
        let Admitted {
            identity,
            password,
            received,
        } = admitted;
        let rt = Arc::clone(&self.rt);
        let protocol = self.listener.protocol;
        let limit = rt.config.limits.max_sessions_per_user;
        // Dropping the previous attempt's place first: a retry on this
        // connection must not count against itself.
        self.user_slot = None;
        // Held from here, kept only if the backend login succeeds.
        let user_slot = match rt.slots.take(Key::User(identity.user.clone()), limit) {
            Ok(slot) => slot,
            Err(Full) => {
                rt.metrics.session_limit.with_label_values(&["user"]).inc();
                tracing::info!(client = %self.peer, user = identity.user, limit, "login refused: too many sessions for this user");
                return Err(EnterError::UserLimit);
            }
        };
        self.user = Some(identity.user.clone());
        // The cluster's word on the user: a hold for a move (wait), the
        // cluster-wide session count, their backend and pin.
        let bf = &rt.config.auth.brute_force;
        let network = self.network();
        let familiar_for = if bf.enabled {
            bf.familiar_for
        } else {
            Default::default()
        };
        let hold_until = Instant::now() + rt.cluster.hold_wait();
        let admission = loop {
            let a = rt
                .cluster
                .admit(
                    &identity.user,
                    Some(&network),
                    limit,
                    &self.id,
                    familiar_for,
                )
                .await;
            if !a.held {
                break a;
            }
            if Instant::now() >= hold_until {
                tracing::info!(client = %self.peer, user = identity.user, "login refused: the user is held for a move");
                return Err(EnterError::Unavailable(
                    "Your mailbox is moving to another server, try again in a moment",
                ));
            }
            tracing::debug!(
                user = identity.user,
                "login waits: the user is held for a move"
            );
            let poll = hold_until
                .saturating_duration_since(Instant::now())
                .min(std::time::Duration::from_millis(250));
            self.own_wait(rt.cluster.hold_changed(poll)).await;
        };
        let cluster_lease = admission
            .leased
            .then(|| crate::cluster::ClusterLease::new(&rt.cluster, &identity.user, &self.id));
        if let Some(count) = admission.full {
            rt.metrics.session_limit.with_label_values(&["user"]).inc();
            tracing::info!(client = %self.peer, user = identity.user, limit, count, "login refused: too many sessions for this user in the cluster");
            return Err(EnterError::UserLimit);
        }
        let mut hint = crate::route::Hint {
            pinned: admission.pinned,
            sticky: admission.sticky,
        };
        if hint.pinned.is_some() && hint.pinned == identity.backend {
            // The directory says the same now: the pin has done its work.
            let (cluster, user) = (Arc::clone(&rt.cluster), identity.user.clone());
            tokio::spawn(async move {
                if cluster.unpin(&user).await.is_ok() {
                    tracing::info!(user, "pin removed: the directory names the same backend");
                }
            });
            hint.pinned = None;
        }
        // Submissions may go to relays (MTAs) instead of the user's
        // backend: any relay will do, chosen by the hash alone; the user's
        // backend, pin and stickiness are not theirs to follow.
        let relays = match protocol {
            Protocol::Submission => rt.relays.clone(),
            _ => None,
        };
        let (pool, identity) = match &relays {
            Some(relays) => {
                hint = crate::route::Hint::default();
                let placed = crate::auth::Identity {
                    backend: None,
                    pool: None,
                    ..identity.clone()
                };
                (relays, placed)
            }
            None => (&rt.pool, identity),
        };
        let config = &rt.config.backends;
        // Connecting is bounded by connect_timeout over every backend tried:
        // a hash-placed user whose backend cannot be reached moves on to
        // the next in their order, within the same budget.
        let connect_deadline = Instant::now() + config.connect_timeout;
        let mut unreachable: Vec<String> = Vec::new();
        loop {
            let exclude: Vec<&str> = unreachable.iter().map(String::as_str).collect();
            let route = match pool.select_with(&identity, &exclude, &hint) {
                Ok(route) => route,
                Err(e) => {
                    let text = match &e {
                        RouteError::Unavailable(_) => {
                            tracing::warn!(user = identity.user, error = %e, "no backend for user");
                            "Your mail server is unavailable, try again later"
                        }
                        RouteError::NoBackend(_) => {
                            tracing::warn!(user = identity.user, error = %e, "no backend for user");
                            "No mail server is available, try again later"
                        }
                        RouteError::UnknownBackend(_) | RouteError::UnknownPool(_) => {
                            tracing::error!(user = identity.user, error = %e, "no backend for user");
                            "No mail server for this account, try again later"
                        }
                    };
                    return Err(EnterError::Unavailable(text));
                }
            };
            tracing::info!(
                user = identity.user,
                backend = %route.backend.name,
                address = %route.backend.address,
                pool = %route.pool,
                reason = route.reason.as_str(),
                protocol = protocol.as_str(),
                "routed"
            );
            let no_password = Secret::default();
            let given = identity.backend_password.as_ref().or(password.as_ref());
            let request = LoginRequest {
                user: &identity.user,
                password: given.unwrap_or(&no_password),
                // A password named for the backend wins; else the master
                // user, for every login if so configured, and for logins
                // that brought no password (tokens).
                master: rt.master.as_deref().filter(|m| {
                    identity.backend_password.is_none() && (m.always || password.is_none())
                }),
                client: Some(ClientAddresses {
                    peer: self.peer,
                    local: self.local,
                }),
                send_id: config.forward_client_address == ForwardClientAddress::Id,
                session_id: &self.id,
                connect_timeout: connect_deadline.saturating_duration_since(Instant::now()),
                login_timeout: config.login_timeout,
                helo: self.helo.as_deref(),
                credentials_sent: Default::default(),
            };
            let result = match protocol {
                Protocol::Imap => backend::connect_and_login(&route.backend, &request).await,
                Protocol::Pop3 => {
                    crate::pop3::backend::connect_and_login(&route.backend, &request).await
                }
                Protocol::Submission => {
                    let target = if relays.is_some() {
                        crate::smtp::backend::Target::Relay
                    } else {
                        crate::smtp::backend::Target::UserBackend
                    };
                    let hostname = rt
                        .config
                        .submission
                        .as_ref()
                        .and_then(|s| s.hostname.clone())
                        .unwrap_or_else(crate::smtp::front::host_name);
                    crate::smtp::backend::connect_and_login(
                        &route.backend,
                        &request,
                        target,
                        &hostname,
                    )
                    .await
                }
                Protocol::Managesieve => {
                    crate::sieve::backend::connect_and_login(&route.backend, &request).await
                }
            };
            let label = match &result {
                Ok(_) => "success",
                Err(e) => e.kind(),
            };
            rt.metrics
                .backend_logins
                .with_label_values(&[&route.backend.name, protocol.as_str(), label])
                .inc();
            // A refused password still reached a working backend; a login
            // unsuitable for it says nothing of its health either way. The
            // health of a backend is its IMAP service's: POP3 logins move
            // on to the next backend but do not mark one down.
            if protocol == Protocol::Imap && !matches!(result, Err(BackendError::Unsuitable(_))) {
                let reached = matches!(result, Ok(_) | Err(BackendError::Rejected(_)));
                rt.pool.report(&route.backend, reached);
            }
            // Before the credentials left, a failure says nothing of the
            // user and the next backend in their order may take the login:
            // a refused or reset connection, a TLS failure, a greeting cut
            // short or garbled, a timeout (a backend dying under its
            // listener accepts, then resets). A well-formed refusal from a
            // backend that answers (a BYE or -ERR greeting, POP3
            // [SYS/TEMP]) moves on only where the user's live sessions are
            // not: one user's mail must not be split across two backends.
            let credentials_sent = request.credentials_were_sent();
            let next = |e: &BackendError| match e {
                BackendError::Connect { .. } | BackendError::Timeout("connecting") => true,
                BackendError::Rejected(_)
                | BackendError::Unsuitable(_)
                | BackendError::InUse(_) => false,
                BackendError::Greeting(_) | BackendError::Unavailable(_) => {
                    route.reason != RouteReason::Sticky
                }
                BackendError::Timeout(_)
                | BackendError::Tls(_)
                | BackendError::Protocol(_)
                | BackendError::Io(_) => !credentials_sent,
            };
            match result {
                Ok(session) => {
                    self.backend = Some(route.backend.name.clone());
                    self.lease = Some(pool.lease(&identity.user, &route.backend));
                    self.relayed = relays.is_some();
                    self.cluster_lease = cluster_lease;
                    self.user_slot = user_slot;
                    return Ok(Entered {
                        backend: session,
                        route,
                        received,
                    });
                }
                Err(e)
                    if next(&e)
                        && route.reason != RouteReason::Directory
                        && Instant::now() < connect_deadline
                        && unreachable.len() + 1 < pool.backends().len() =>
                {
                    tracing::warn!(user = identity.user, backend = %route.backend.name, error = %e, "backend unreachable, trying the next");
                    unreachable.push(route.backend.name.clone());
                }
                Err(e) => {
                    let text = match &e {
                        BackendError::InUse(text) => {
                            tracing::info!(user = identity.user, backend = %route.backend.name, error = %e, "backend: mailbox in use");
                            return Err(EnterError::InUse(text.clone()));
                        }
                        BackendError::Rejected(_) => {
                            tracing::error!(
                                user = identity.user,
                                backend = %route.backend.name,
                                error = %e,
                                "backend refused a login that Postern accepted: the auth source and the backend disagree"
                            );
                            "Mail server refused the login, try again later"
                        }
                        BackendError::Unsuitable(_) => {
                            tracing::warn!(user = identity.user, backend = %route.backend.name, error = %e, "login cannot be made at this backend");
                            "This account cannot log in to its mail server, contact support"
                        }
                        BackendError::Unavailable(_) => {
                            tracing::warn!(user = identity.user, backend = %route.backend.name, error = %e, "backend temporarily unavailable");
                            "Mail server is temporarily unavailable, try again later"
                        }
                        BackendError::Connect { .. } | BackendError::Timeout("connecting") => {
                            tracing::warn!(user = identity.user, backend = %route.backend.name, error = %e, "backend unreachable");
                            "Mail server is not reachable, try again later"
                        }
                        _ => {
                            tracing::warn!(user = identity.user, backend = %route.backend.name, error = %e, "backend login failed");
                            "Mail server is not answering correctly, try again later"
                        }
                    };
                    return Err(EnterError::Unavailable(text));
                }
            }
        }
    }
}
