//! The login gate, the same for every protocol: a user name normalised,
//! the login defence asked (blocked networks, the lanes of in-flight
//! checks, see [`crate::auth::guard`]), the credentials checked by the
//! auth source or the bearer token by the JWKS, and the outcome recorded
//! (failures and their delays, familiar pairs, metrics, log lines).
//!
//! It answers with an [`Identity`] or a typed [`Refusal`]; it never writes
//! to the client. Each protocol's front words a refusal in its own
//! protocol (IMAP `NO [AUTHENTICATIONFAILED]`, POP3 `-ERR [AUTH]`) and
//! answers a failure no earlier than the refusal says.
//!
//! Postern's own waits (a lane's queue, a failure's delay) run through
//! [`Session::own_wait`], which moves the pre-auth deadline later by as
//! long as they take, within a bound; a client that only sits there is
//! still cut at `preauth_timeout` ([`within`]).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use super::Session;
use crate::auth::guard::{Key, Lane, LaneFull, Ticket};
use crate::auth::oauth::TokenError;
use crate::auth::{normalise_username, AuthContext, AuthError, Identity};
use crate::imap::sasl::Credentials;
use crate::imap::{printable, Secret};

/// Why a login was not let through, for the front to word.
#[derive(Debug)]
pub enum Refusal {
    /// A failed login: answered no earlier than `at`, and counted towards
    /// `max_auth_failures` ([`Session::answer_failure_at`]).
    Failed { at: Instant, why: Failure },
    /// The auth source refused with its own text and no retry: answered at
    /// `at`, then the connection closes.
    Final { at: Instant, text: String },
    /// The lanes stayed full for `queue_wait`: answered at once.
    Busy(BusyScope),
    /// The credentials could not be checked: answered at once.
    Unavailable,
}

/// What kind of failure a [`Refusal::Failed`] is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Failure {
    /// Unknown user, wrong password, or a name no account could have: all
    /// read the same.
    Credentials,
    /// The bearer token was refused (its mechanism's error challenge is
    /// due before the answer).
    Token,
    /// The authorization identity names another user.
    Authorization,
    /// The account is disabled; the reason, when it may be shown.
    Disabled(Option<String>),
    /// The client's network is blocked after failed logins.
    Blocked,
    /// The auth source's own text; the client may try again.
    Source(String),
}

/// Whose lane was full.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BusyScope {
    Network,
    Account,
}

impl BusyScope {
    /// The reason as the client reads it, after its protocol's code.
    pub fn text(self) -> &'static str {
        match self {
            BusyScope::Network => "Too many logins at once from your network, try again later",
            BusyScope::Account => "Too many logins at once for this account, try again later",
        }
    }
}

/// Reasons as the client reads them, after its protocol's code.
pub const BLOCKED_TEXT: &str = "Too many failed logins from your network, try again later";
pub const UNAVAILABLE_TEXT: &str = "Authentication is unavailable, try again later";
pub const AUTHORIZATION_TEXT: &str = "Logging in as another user is not permitted";

/// A login the gate let through.
pub struct Admitted {
    pub identity: Identity,
    /// The user's own password, to pass on to the backend (none for tokens).
    pub password: Option<Secret>,
    /// When the credentials arrived: the login's duration counts from it.
    pub received: Instant,
}

impl Session {
    /// Checks a user name and password (`mechanism` names the SASL
    /// mechanism or command, for metrics and logs).
    pub async fn check_password(
        &mut self,
        mechanism: &'static str,
        creds: Credentials,
        tls: bool,
    ) -> Result<Admitted, Refusal> {
        let received = Instant::now();
        let rt = Arc::clone(&self.rt);
        let auth = &rt.config.auth;
        let user = match normalise_username(&creds.authcid, auth) {
            Ok(user) => user,
            Err(e) => {
                self.count_auth(mechanism, "invalid");
                tracing::info!(client = %self.peer, mechanism, error = %e, "login refused: invalid user name");
                return Err(self
                    .failed(received, Failure::Credentials, None, None)
                    .await);
            }
        };
        if let Some(authzid) = &creds.authzid {
            if normalise_username(authzid, auth).ok().as_deref() != Some(user.as_str()) {
                self.count_auth(mechanism, "invalid");
                tracing::info!(client = %self.peer, user, mechanism, "login refused: authorization identity differs");
                return Err(self
                    .failed(received, Failure::Authorization, None, None)
                    .await);
            }
        }
        let ticket = self.admit(mechanism, Some(&user), received).await?;
        let password = creds.password;
        let asked = Instant::now();
        let ctx = AuthContext {
            client: self.peer.ip(),
            attempt: self.auth_failures + 1,
            tls,
        };
        let answer = rt.auth.authenticate(&user, password.clone(), &ctx).await;
        rt.metrics
            .auth_duration
            .with_label_values(&[
                rt.auth.name(),
                match &answer {
                    Ok(_) => "success",
                    Err(
                        AuthError::Rejected
                        | AuthError::Refused { .. }
                        | AuthError::Disabled { .. },
                    ) => "failure",
                    Err(AuthError::Unavailable(_) | AuthError::Busy(_)) => "unavailable",
                },
            ])
            .observe(asked.elapsed().as_secs_f64());
        let identity = match answer {
            Ok(identity) => identity,
            Err(AuthError::Rejected) => {
                self.count_auth(mechanism, "failure");
                tracing::info!(client = %self.peer, user, mechanism, source = rt.auth.name(), "authentication failed");
                return Err(self
                    .failed(received, Failure::Credentials, Some(&user), ticket)
                    .await);
            }
            Err(AuthError::Disabled { reason }) => {
                self.count_auth(mechanism, "disabled");
                tracing::info!(client = %self.peer, user, mechanism, source = rt.auth.name(), reason = reason.as_deref().unwrap_or("-"), "login refused: account disabled");
                let shown = reason.filter(|_| auth.show_disabled_reason);
                return Err(self
                    .failed(received, Failure::Disabled(shown), Some(&user), ticket)
                    .await);
            }
            Err(AuthError::Refused { text, wait }) => {
                self.count_auth(mechanism, "failure");
                tracing::info!(client = %self.peer, user, mechanism, source = rt.auth.name(), reason = text, "authentication refused");
                // The source's delay, or ours if longer.
                let penalty = self.penalty(Some(&user), received).await;
                let delay = wait.unwrap_or_default().max(penalty);
                settle(ticket, Some(delay));
                let at = received + delay;
                return Err(match wait {
                    Some(_) => Refusal::Failed {
                        at,
                        why: Failure::Source(text),
                    },
                    // No retry: the answer, then the connection closes.
                    None => Refusal::Final { at, text },
                });
            }
            Err(AuthError::Unavailable(cause) | AuthError::Busy(cause)) => {
                self.count_auth(mechanism, "unavailable");
                tracing::warn!(client = %self.peer, user, source = rt.auth.name(), cause, "authentication source unavailable");
                // An attempt all the same: its places are held as a
                // failure's would be, so "unavailable" costs a guesser too.
                settle(ticket, Some(auth.failure_delay));
                return Err(Refusal::Unavailable);
            }
        };
        settle(ticket, None);
        self.succeeded(mechanism, &user);
        Ok(Admitted {
            identity,
            password: Some(password),
            received,
        })
    }

    /// Checks a bearer token (OAUTHBEARER, XOAUTH2) against the JWKS;
    /// `named` is the user the client named beside it, if any. A refused
    /// token is recorded, and its places held, before the refusal is
    /// returned: the client's dummy answer to the error challenge comes
    /// after, and hanging up then must not undo the failure.
    pub async fn check_token(
        &mut self,
        mechanism: &'static str,
        named: Option<&[u8]>,
        token: &Secret,
    ) -> Result<Admitted, Refusal> {
        let received = Instant::now();
        let rt = Arc::clone(&self.rt);
        let auth = &rt.config.auth;
        let named = match named.map(|a| normalise_username(a, auth)) {
            None => None,
            Some(Ok(user)) => Some(user),
            Some(Err(e)) => {
                self.count_auth(mechanism, "invalid");
                tracing::info!(client = %self.peer, mechanism, error = %e, "token login refused: invalid user name");
                return Err(self
                    .failed(received, Failure::Credentials, None, None)
                    .await);
            }
        };
        let ticket = self.admit(mechanism, named.as_deref(), received).await?;
        let Some(oauth) = rt.oauth.clone() else {
            settle(ticket, None);
            return Err(Refusal::Unavailable);
        };
        let token = std::str::from_utf8(token.expose()).unwrap_or_default();
        let checked = oauth.check(token).await;
        if checked == Err(TokenError::NoKeys) {
            settle(ticket, Some(auth.failure_delay));
            self.count_auth(mechanism, "unavailable");
            tracing::warn!(client = %self.peer, "token login: the provider's keys or introspection are unavailable");
            return Err(Refusal::Unavailable);
        }
        let verdict = checked
            .map_err(|e| match e {
                TokenError::Invalid(why) | TokenError::UnknownKey(why) => why,
                TokenError::NoKeys => unreachable!("answered above"),
            })
            .and_then(|claim| {
                normalise_username(claim.as_bytes(), auth)
                    .map_err(|e| format!("the token's user claim: {e}"))
            })
            .and_then(|user| match &named {
                Some(n) if *n != user => Err(format!("the client named {n}, the token {user}")),
                _ => Ok(user),
            });
        match verdict {
            Ok(user) => {
                settle(ticket, None);
                self.succeeded(mechanism, &user);
                Ok(Admitted {
                    identity: Identity {
                        user,
                        backend: None,
                        pool: None,
                        backend_password: None,
                    },
                    password: None,
                    received,
                })
            }
            Err(why) => {
                self.count_auth(mechanism, "failure");
                tracing::info!(client = %self.peer, user = named.as_deref().unwrap_or("-"), mechanism, reason = why, "token refused");
                let delay = self.penalty(named.as_deref(), received).await;
                settle(ticket, Some(delay));
                Err(Refusal::Failed {
                    at: received + delay,
                    why: Failure::Token,
                })
            }
        }
    }

    /// Counts one authentication attempt by mechanism, source and result.
    pub fn count_auth(&self, mechanism: &str, result: &str) {
        // Tokens are checked against the JWKS, not the password source.
        let source = match mechanism {
            "XOAUTH2" | "OAUTHBEARER" => "jwt",
            _ => self.rt.auth.name(),
        };
        self.rt
            .metrics
            .authentications
            .with_label_values(&[mechanism, self.listener.protocol.as_str(), source, result])
            .inc();
    }

    /// Waits until `at` (one of Postern's own waits), then counts a failed
    /// login. `true` when it was one too many: the front says so and ends
    /// the session (`too_many_auth_failures`).
    pub async fn answer_failure_at(&mut self, at: Instant) -> bool {
        let m = Arc::clone(&self.rt.metrics);
        m.auth_penalties.inc();
        self.own_wait(tokio::time::sleep_until(at)).await;
        self.auth_failures += 1;
        if self.auth_failures >= self.rt.config.limits.max_auth_failures {
            m.auth_blocks
                .with_label_values(&[&self.listener.name])
                .inc();
            return true;
        }
        false
    }

    /// A failed login's refusal: recorded, its places held for its delay.
    async fn failed(
        &mut self,
        received: Instant,
        why: Failure,
        user: Option<&str>,
        ticket: Option<Ticket>,
    ) -> Refusal {
        let delay = self.penalty(user, received).await;
        // The attempt's places are held for as long as its answer waits.
        settle(ticket, Some(delay));
        Refusal::Failed {
            at: received + delay,
            why,
        }
    }

    /// The client's network, as brute-force records and limits count it.
    pub fn network(&self) -> Key {
        let bf = &self.rt.config.auth.brute_force;
        Key::network(self.peer.ip(), bf.ipv4_prefix, bf.ipv6_prefix)
    }

    /// Records a failed login and returns how long after the credentials
    /// arrived it is answered: `failure_delay`, or longer after earlier
    /// failures from this network or for this user.
    async fn penalty(&self, user: Option<&str>, received: Instant) -> Duration {
        let rt = &self.rt;
        let auth = &rt.config.auth;
        if !auth.brute_force.enabled {
            return auth.failure_delay;
        }
        let network = self.network();
        let mut p = rt.guard.failed(
            &network,
            user,
            auth.failure_delay,
            &auth.brute_force,
            received,
        );
        // The cluster's count, where there is one: the delays and the block
        // hold for every replica together.
        if let Some(shared) = rt.cluster.failed(&network, user, &auth.brute_force).await {
            let bf = &auth.brute_force;
            let worst = shared.network_failures.max(shared.user_failures);
            let delay = crate::auth::guard::delay(auth.failure_delay, worst, bf.max_delay);
            if delay > p.delay {
                p.delay = delay;
                p.scope = if shared.user_failures > shared.network_failures {
                    "user"
                } else {
                    "network"
                };
            }
            if shared.blocked && !p.blocked {
                rt.guard.block(&network, bf.block_for);
                p.blocked = true;
            }
        }
        if p.delay > auth.failure_delay {
            rt.metrics
                .auth_throttled
                .with_label_values(&[p.scope])
                .inc();
        }
        if p.blocked {
            rt.metrics.auth_blocked_networks.inc();
            tracing::warn!(
                client = %self.peer,
                failures = auth.brute_force.block_after,
                block_s = auth.brute_force.block_for.as_secs(),
                "client network blocked after failed logins"
            );
        }
        self.track_guard_size();
        p.delay
    }

    /// The login defence before the source is asked (see `auth::guard`):
    /// a blocked network's logins are refused unless the user is familiar
    /// there, and every check takes its places in its lanes, waiting for
    /// them up to `queue_wait`.
    async fn admit(
        &mut self,
        mechanism: &'static str,
        user: Option<&str>,
        received: Instant,
    ) -> Result<Option<Ticket>, Refusal> {
        let rt = Arc::clone(&self.rt);
        let auth = &rt.config.auth;
        let bf = &auth.brute_force;
        if !bf.enabled {
            return Ok(None);
        }
        let guard = &rt.guard;
        let network = self.network();
        let mut familiar = user.is_some_and(|u| guard.familiar(u, &network, received));
        if let (Some(u), false) = (user, familiar) {
            // Blocked here: a success through another replica may have
            // made the pair familiar (the store is asked only now).
            if guard.blocked(&network, received).is_some() {
                familiar = rt.cluster.familiar(u, &network).await.unwrap_or(false);
            }
        }
        let lanes: Vec<(Lane, u32)> = match user {
            Some(u) if familiar => {
                rt.metrics.auth_familiar.inc();
                tracing::debug!(client = %self.peer, user = u, "familiar user and network");
                vec![
                    (guard.familiar_lane(&network), bf.max_checks_per_network),
                    (guard.pair_lane(u, &network), bf.max_checks_per_user),
                ]
            }
            _ => {
                if let Some(left) = guard.blocked(&network, received) {
                    rt.metrics.auth_refused_blocked.inc();
                    self.count_auth(mechanism, "blocked");
                    tracing::info!(client = %self.peer, user = user.unwrap_or("-"), remaining_s = left.as_secs(), "login refused: network blocked after failed logins");
                    return Err(Refusal::Failed {
                        at: received + auth.failure_delay,
                        why: Failure::Blocked,
                    });
                }
                let mut lanes = vec![(guard.network_lane(&network), bf.max_checks_per_network)];
                lanes.extend(user.map(|u| (guard.user_lane(u), bf.max_checks_per_user)));
                lanes
            }
        };
        let waited = |lane: Lane| {
            rt.metrics
                .auth_queued
                .with_label_values(&[lane.scope()])
                .inc();
        };
        let give_up = Instant::now() + bf.queue_wait;
        let admitted = guard.admit(&lanes, give_up, auth.failure_delay, waited);
        match self.own_wait(admitted).await {
            Ok(ticket) => Ok(Some(ticket)),
            Err(LaneFull(lane)) => {
                let scope = lane.scope();
                rt.metrics.auth_lane_full.with_label_values(&[scope]).inc();
                self.count_auth(mechanism, "busy");
                tracing::info!(client = %self.peer, user = user.unwrap_or("-"), scope, waited_s = bf.queue_wait.as_secs(), "login refused: too many logins at once");
                Err(Refusal::Busy(match lane {
                    Lane::Network(_) | Lane::Familiar(_) => BusyScope::Network,
                    Lane::User(_) | Lane::Pair(_) => BusyScope::Account,
                }))
            }
        }
    }

    /// A successful authentication: counted, and the user made familiar on
    /// the client's network.
    fn succeeded(&self, mechanism: &str, user: &str) {
        self.count_auth(mechanism, "success");
        let bf = &self.rt.config.auth.brute_force;
        if bf.enabled {
            self.rt
                .guard
                .remember(user, &self.network(), bf, Instant::now());
            self.track_guard_size();
        }
    }

    /// Runs one of Postern's own waits, moving the pre-auth deadline later
    /// by as long as it takes, up to a bound: `max_auth_failures` times the
    /// longest failure delay (or a source's `Auth-Wait`) and queue wait.
    pub async fn own_wait<F: std::future::Future>(&self, wait: F) -> F::Output {
        let bf = &self.rt.config.auth.brute_force;
        let longest_delay = bf
            .max_delay
            .max(self.rt.config.auth.failure_delay)
            .max(crate::auth::http::MAX_WAIT);
        let most = (longest_delay + bf.queue_wait)
            .saturating_mul(self.rt.config.limits.max_auth_failures.max(1));
        let started = self.own_waits.begin();
        let out = wait.await;
        self.own_waits.end(started, most);
        out
    }

    /// From a trusted forwarder (`auth.trusted_forwarders`), the client's
    /// own address as the forwarder states it (IMAP `ID` fields
    /// `x-originating-ip` and `x-originating-port`) replaces the
    /// forwarder's, once. From anywhere else the statement is only logged.
    pub fn take_forwarded_address(&mut self, stated: &str, port: Option<&str>) {
        let trusted = &self.rt.config.auth.trusted_forwarders;
        if self.forwarder.is_some() {
            tracing::debug!(client = %self.peer, stated = printable(stated, 64), "x-originating-ip ignored: the forwarder stated an address already");
            return;
        }
        if !trusted.iter().any(|n| n.contains(self.peer.ip())) {
            tracing::debug!(client = %self.peer, stated = printable(stated, 64), "x-originating-ip from an untrusted client ignored");
            return;
        }
        let ip = stated.trim_start_matches('[').trim_end_matches(']');
        let Ok(ip) = ip.parse::<std::net::IpAddr>() else {
            tracing::info!(forwarder = %self.peer, stated = printable(stated, 64), "trusted forwarder's x-originating-ip is not an address");
            return;
        };
        let port = port.and_then(|p| p.parse().ok()).unwrap_or(0);
        let client = SocketAddr::new(ip.to_canonical(), port);
        tracing::info!(client = %client, forwarder = %self.peer, "client address from a trusted forwarder");
        self.rt.metrics.auth_forwarded.inc();
        self.forwarder = Some(std::mem::replace(&mut self.peer, client));
    }

    fn track_guard_size(&self) {
        let (networks, users, familiar) = self.rt.guard.tracked();
        let m = &self.rt.metrics.auth_tracked;
        m.with_label_values(&["network"]).set(networks as i64);
        m.with_label_values(&["user"]).set(users as i64);
        m.with_label_values(&["familiar"]).set(familiar as i64);
    }
}

/// Gives a credential check's places back: now (`None`), or held for as
/// long as a failure's answer waits.
fn settle(ticket: Option<Ticket>, hold: Option<Duration>) {
    if let Some(ticket) = ticket {
        ticket.release(hold);
    }
}

/// Postern's own waits in the pre-auth phase: how far they have moved its
/// deadline, and when the one running now began.
#[derive(Default)]
pub struct OwnWaits(std::sync::Mutex<(Duration, Option<Instant>)>);

impl OwnWaits {
    fn get(&self) -> (Duration, Option<Instant>) {
        *self.0.lock().unwrap()
    }

    fn begin(&self) -> Instant {
        let now = Instant::now();
        self.0.lock().unwrap().1.get_or_insert(now);
        now
    }

    fn end(&self, started: Instant, most: Duration) {
        let mut state = self.0.lock().unwrap();
        state.0 = (state.0 + started.elapsed()).min(most);
        state.1 = None;
    }
}

/// Runs the pre-auth phase until `deadline`, moved later by Postern's own
/// waits. `None` when the time ran out.
pub async fn within<F: std::future::Future>(
    deadline: Instant,
    waits: &OwnWaits,
    preauth: F,
) -> Option<F::Output> {
    tokio::pin!(preauth);
    loop {
        let (moved, running) = waits.get();
        let until = match running {
            None => deadline + moved,
            // The time left when the wait began is still left after it.
            Some(began) => {
                let left = (deadline + moved).saturating_duration_since(began);
                Instant::now() + left.max(Duration::from_millis(100))
            }
        };
        tokio::select! {
            out = &mut preauth => return Some(out),
            _ = tokio::time::sleep_until(until) => {
                let (moved, running) = waits.get();
                if running.is_none() && Instant::now() >= deadline + moved {
                    return None;
                }
            }
        }
    }
}
