//! One client connection, from accept to close, the same pipeline for
//! every protocol: PROXY header, per-network limit, TLS handshake
//! (implicit listeners) → the protocol's pre-auth front
//! ([`crate::imap::front`], [`crate::pop3::front`]) → the login gate
//! ([`gate`]) → routing with failover and the protocol's backend login
//! ([`connect`]) → the hand-over of the login's answer → the relay, with
//! the protocol's watch → the ending, told to the client only at a
//! response boundary.
//!
//! The whole pre-auth phase runs under one deadline (`preauth_timeout`),
//! moved later only by Postern's own waits (the login defence's queues and
//! failure delays, within a bound), and every limit ends with the
//! protocol's farewell and its reason. What the client reads is chosen
//! apart from what the log records: causes go to the log, the client gets
//! a response code and a short reason. One line is logged when a session
//! ends.

pub mod connect;
pub mod gate;
pub mod sasl;
#[cfg(test)]
mod tests;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tracing::Instrument;

use crate::auth::guard::{Full, Slot};
use crate::backend::{BackendSession, BackendStream};
use crate::config::{ListenerTls, Protocol, ProxyProtocolIn};
use crate::imap::command::IdFields;
use crate::live::Runtime;
use crate::proxy_protocol::{self, ProxyHeader};
use crate::registry::{Registry, SessionInfo};
use crate::relay::{self, Counters, RelayEnd, StopCause};
use crate::route::{Lease, Route};
use crate::shutdown::Shutdown;
use crate::stream::ClientStream;
use crate::tls_conn::{self, TlsConn};

use gate::OwnWaits;

/// What a listener tells its sessions.
#[derive(Debug)]
pub struct ListenerInfo {
    pub name: String,
    pub tls: ListenerTls,
    pub protocol: Protocol,
    pub allow_plaintext_auth: bool,
    pub proxy_protocol: Option<ProxyProtocolIn>,
}

/// Why a session ended: a fixed word, used in the log line and as the
/// `reason` label of `postern_sessions_ended_total`.
pub type EndReason = &'static str;

/// `Err` ends the pre-auth phase with that reason.
pub type Step<T> = Result<T, EndReason>;

/// What a protocol says, unasked, when Postern ends a session: each a
/// whole response line, CRLF included.
pub struct Farewells {
    /// Refusing a connection over the per-network limit (plaintext
    /// listeners only: on an implicit-TLS one nothing could be read).
    pub too_many_connections: &'static [u8],
    pub preauth_timeout: &'static [u8],
    pub shutdown: &'static [u8],
    pub kicked: &'static [u8],
    /// The user is being moved to another backend: log in again shortly.
    pub moved: &'static [u8],
    pub backend_gone: &'static [u8],
}

impl Protocol {
    fn farewells(self) -> &'static Farewells {
        match self {
            Protocol::Imap => &crate::imap::front::FAREWELLS,
            Protocol::Pop3 => &crate::pop3::front::FAREWELLS,
            Protocol::Submission => &crate::smtp::front::FAREWELLS,
            Protocol::Managesieve => &crate::sieve::front::FAREWELLS,
        }
    }
}

pub async fn run(
    tcp: TcpStream,
    peer: SocketAddr,
    listener: Arc<ListenerInfo>,
    rt: Arc<Runtime>,
    shutdown: Arc<Shutdown>,
    registry: Arc<Registry>,
) {
    let id = format!("{:016x}", rand::random::<u64>());
    let span = tracing::info_span!("session", id = %id);
    async move {
        let metrics = Arc::clone(&rt.metrics);
        metrics
            .connections_accepted
            .with_label_values(&[&listener.name])
            .inc();
        let active = metrics.sessions_active.with_label_values(&[&listener.name]);
        active.inc();
        let local = tcp.local_addr().unwrap_or(peer);
        let _ = tcp.set_nodelay(true);
        let mut session = Session {
            id,
            peer,
            local,
            listener,
            rt,
            accepted: Instant::now(),
            user: None,
            backend: None,
            client_id: None,
            helo: None,
            relayed: false,
            bad_commands: 0,
            auth_failures: 0,
            handed_over: (0, 0),
            lease: None,
            cluster_lease: None,
            own_waits: Arc::default(),
            forwarder: None,
            network_slot: None,
            user_slot: None,
            shutdown,
            registry,
        };
        let ending = session.drive(tcp).await;
        drop(session.lease.take());
        drop(session.cluster_lease.take());
        active.dec();
        metrics
            .sessions_ended
            .with_label_values(&[session.listener.protocol.as_str(), ending.reason])
            .inc();
        tracing::info!(
            client = %session.peer,
            listener = %session.listener.name,
            protocol = session.listener.protocol.as_str(),
            user = session.user.as_deref().unwrap_or("-"),
            backend = session.backend.as_deref().unwrap_or("-"),
            bytes_in = ending.client_to_backend,
            bytes_out = ending.backend_to_client,
            compressed = ending.compressed,
            duration_ms = session.accepted.elapsed().as_millis() as u64,
            reason = ending.reason,
            "session ended"
        );
    }
    .instrument(span)
    .await
}

struct Ending {
    reason: EndReason,
    client_to_backend: u64,
    backend_to_client: u64,
    /// The client had turned COMPRESS=DEFLATE on.
    compressed: bool,
}

impl From<EndReason> for Ending {
    fn from(reason: EndReason) -> Self {
        Ending {
            reason,
            client_to_backend: 0,
            backend_to_client: 0,
            compressed: false,
        }
    }
}

/// The state of one session that outlives single commands; the fronts
/// keep their protocol's own state beside it.
pub struct Session {
    pub id: String,
    pub peer: SocketAddr,
    pub local: SocketAddr,
    pub listener: Arc<ListenerInfo>,
    pub rt: Arc<Runtime>,
    accepted: Instant,
    user: Option<String>,
    backend: Option<String>,
    /// The client's `ID` fields, kept for the log.
    pub client_id: Option<IdFields>,
    /// The client's EHLO name (submission).
    pub helo: Option<String>,
    /// Logged in at a submission relay, not at the user's backend: the
    /// cluster is not told the user's backend is there.
    relayed: bool,
    pub bad_commands: u32,
    pub auth_failures: u32,
    /// Bytes passed on at login (client to backend, backend to client),
    /// counted with the relayed bytes.
    handed_over: (u64, u64),
    /// The relayed session's place in the pool, from the backend login on.
    lease: Option<Lease>,
    /// Its lease in the cluster store, when there is one.
    cluster_lease: Option<crate::cluster::ClusterLease>,
    /// The pre-auth phase's time spent in Postern's own waits (a lane's
    /// queue, a failure's delay): not held against the client.
    own_waits: Arc<OwnWaits>,
    /// The trusted forwarder's address, when the client's own came from
    /// its `ID` (then `peer` is the client's).
    forwarder: Option<SocketAddr>,
    /// Places in the per-network and per-user session limits.
    network_slot: Option<Slot>,
    user_slot: Option<Slot>,
    shutdown: Arc<Shutdown>,
    registry: Arc<Registry>,
}

/// A client logged in at its backend, ready to relay.
pub struct LoggedIn {
    /// The answer to the client's login, in its protocol.
    pub answer: Vec<u8>,
    pub backend: BackendSession,
    pub route: Route,
    pub credentials_at: Instant,
    /// Bytes the client sent after its login command: its first commands
    /// for the backend.
    pub client_pending: Vec<u8>,
}

impl Session {
    async fn drive(&mut self, mut tcp: TcpStream) -> Ending {
        let rt = Arc::clone(&self.rt);
        let limits = &rt.config.limits;
        let deadline = self.accepted + limits.preauth_timeout;
        let protocol = self.listener.protocol;
        let farewells = protocol.farewells();
        if let Some(pp) = self.listener.proxy_protocol.clone() {
            if let Err(reason) = self.proxy_header(&mut tcp, &pp).await {
                return reason.into();
            }
        }
        // Per-network connection limit, once the client's address is known.
        let limit = limits.max_connections_per_network;
        match rt.slots.take(self.network(), limit) {
            Ok(slot) => self.network_slot = slot,
            Err(Full) => {
                rt.metrics
                    .session_limit
                    .with_label_values(&["network"])
                    .inc();
                tracing::info!(client = %self.peer, limit, "connection refused: too many from this network");
                if self.listener.tls == ListenerTls::Starttls {
                    let bye = farewells.too_many_connections;
                    let _ = tokio::time::timeout(Duration::from_secs(1), send(&mut tcp, bye)).await;
                }
                return "network_limit".into();
            }
        }
        // The handshake and pre-auth futures are large (TLS handshake, command
        // buffers, backend login); boxing them frees that space once they are
        // done, so a long idle session keeps only what the relay needs.
        let mut stream = match self.listener.tls {
            ListenerTls::Implicit => match Box::pin(self.handshake(tcp)).await {
                Ok(tls) => ClientStream::Tls(Box::new(tls)),
                Err(reason) => return reason.into(),
            },
            ListenerTls::Starttls => ClientStream::Plain(tcp),
        };
        let own_waits = Arc::clone(&self.own_waits);
        let preauth: std::pin::Pin<Box<dyn std::future::Future<Output = Step<LoggedIn>> + Send>> =
            match protocol {
                Protocol::Imap => Box::pin(crate::imap::front::preauth(self, &mut stream)),
                Protocol::Pop3 => Box::pin(crate::pop3::front::preauth(self, &mut stream)),
                Protocol::Submission => Box::pin(crate::smtp::front::preauth(self, &mut stream)),
                Protocol::Managesieve => Box::pin(crate::sieve::front::preauth(self, &mut stream)),
            };
        let logged_in = match gate::within(deadline, &own_waits, preauth).await {
            Some(Ok(l)) => l,
            Some(Err(reason)) => {
                let _ = tokio::time::timeout(Duration::from_secs(1), stream.shutdown()).await;
                return reason.into();
            }
            None => {
                let bye = farewells.preauth_timeout;
                let _ = tokio::time::timeout(Duration::from_secs(1), send(&mut stream, bye)).await;
                return "preauth_timeout".into();
            }
        };
        let (mut backend_stream, backend_said, client_said) =
            match Box::pin(self.handover(&mut stream, logged_in)).await {
                Ok(handed_over) => handed_over,
                Err(reason) => return reason.into(),
            };

        let m = &self.rt.metrics;
        let relay_started = Instant::now();
        let mut info = SessionInfo::new(
            &self.id,
            self.user.as_deref().unwrap_or("-"),
            self.peer,
            &self.listener.name,
            self.listener.protocol,
            self.backend.as_deref().unwrap_or("-"),
        );
        info.relayed = self.relayed;
        let registration = self.registry.register(info);
        let info = Arc::clone(registration.info());
        rt.cluster.register(&info);
        let counters = Counters {
            client_to_backend: m.relay_bytes.with_label_values(&["client_to_backend"]),
            backend_to_client: m.relay_bytes.with_label_values(&["backend_to_client"]),
            session: Some((Arc::clone(&info.bytes_in), Arc::clone(&info.bytes_out))),
        };
        // When the backend goes down (health checks) or its drain's grace
        // period ends, Postern shuts down or an administrator ends the
        // session, the relay stops and says why; the client is told below.
        let backend = self.lease.as_ref().map(|l| Arc::clone(l.backend()));
        let herd_of = backend.clone();
        let shutdown = Arc::clone(&self.shutdown);
        let kick = Arc::clone(&info);
        let stop = async move {
            let backend_closing = async {
                match backend {
                    Some(backend) => {
                        // Placed against this replica's health view (the
                        // cluster knows the user's sessions are there): only
                        // a drain, or a fall after the backend is seen up,
                        // ends it.
                        while !backend.is_up() && !backend.is_drained() {
                            tokio::time::sleep(Duration::from_secs(2)).await;
                        }
                        backend.closing().await;
                        if backend.is_up() {
                            StopCause::Drained
                        } else {
                            StopCause::BackendDown
                        }
                    }
                    None => std::future::pending().await,
                }
            };
            // When several hold at once, the one the client hears first.
            tokio::select! {
                biased;
                _ = shutdown.sessions_closing() => StopCause::Shutdown,
                _ = kick.kicked() => if kick.is_moving() { StopCause::Moved } else { StopCause::Kicked },
                cause = backend_closing => cause,
            }
        };
        let idle = limits.idle_timeout;
        macro_rules! follow {
            ($watch:expr) => {
                relay::relay_following(
                    $watch,
                    &mut stream,
                    &mut backend_stream,
                    backend_said,
                    client_said,
                    idle,
                    &counters,
                    stop,
                )
                .await
            };
        }
        let outcome = match protocol {
            Protocol::Imap => follow!(crate::imap::watch::Watch::new()),
            Protocol::Pop3 => follow!(crate::pop3::watch::Watch::new()),
            Protocol::Submission => follow!(crate::smtp::watch::Watch::new()),
            Protocol::Managesieve => follow!(crate::sieve::watch::Watch::new()),
        };
        drop(registration);
        if outcome.end == RelayEnd::Forbidden {
            tracing::warn!(
                client = %self.peer,
                user = self.user.as_deref().unwrap_or("-"),
                "session closed: the client sent XCLIENT or XFORWARD after login"
            );
        }
        // Shutting down, or ended by an administrator: the client is told
        // at once. The backend went down or away under the session: say so
        // at a random moment within the herd's spread, so its clients do
        // not all reconnect at once, unless the client is waiting for an
        // answer (it would only wait longer). Nothing is written where the
        // client would not read it as a new response (mid-literal, inside
        // a compressed stream that is not at a flush): it is only closed.
        let (bye, after_jitter): (Option<&[u8]>, bool) = match outcome.end {
            RelayEnd::Stopped(StopCause::Shutdown) => (Some(farewells.shutdown), false),
            RelayEnd::Stopped(StopCause::Kicked) => (Some(farewells.kicked), false),
            RelayEnd::Stopped(StopCause::Moved) => (Some(farewells.moved), false),
            RelayEnd::Stopped(StopCause::Drained | StopCause::BackendDown)
            | RelayEnd::BackendLost
            | RelayEnd::BackendError => (Some(farewells.backend_gone), true),
            _ => (None, false),
        };
        if let Some(bye) = bye {
            let farewell = outcome.farewell.as_str();
            // Encoded before any wait: a shadow inflater is freed now.
            let said = outcome.farewell.encode(bye);
            tracing::debug!(farewell, said = said.is_some(), "relay stopped");
            if after_jitter && !outcome.client_waiting {
                drop(backend_stream);
                let herd = herd_of.as_ref().map_or(1, |b| b.active_sessions());
                let spread = herd_spread(
                    herd,
                    rt.config.backends.reconnect_rate,
                    rt.config.backends.reconnect_jitter,
                );
                tokio::time::sleep(spread.mul_f64(rand::random::<f64>())).await;
            }
            let _ = tokio::time::timeout(Duration::from_secs(1), async {
                if let Some(said) = said {
                    send(&mut stream, &said).await?;
                }
                stream.shutdown().await
            })
            .await;
        }
        m.session_duration
            .with_label_values(&[&self.listener.name])
            .observe(relay_started.elapsed().as_secs_f64());
        Ending {
            reason: outcome.end.as_str(),
            compressed: outcome.compressed,
            client_to_backend: outcome.client_to_backend + self.handed_over.0,
            backend_to_client: outcome.backend_to_client + self.handed_over.1,
        }
    }

    /// Answers the client's login (the front's words: IMAP's with the
    /// backend's capabilities) and passes on what either side sent early: bytes the backend sent after its OK go
    /// to the client, commands the client pipelined after its login go to
    /// the backend. Bounded by the login timeout: neither side may stall the
    /// session before the relay's idle timer takes over. Returns the backend
    /// stream and what each side sent early (backend, then client): the
    /// relay's watch starts with them.
    async fn handover(
        &mut self,
        stream: &mut ClientStream,
        logged_in: LoggedIn,
    ) -> Step<(BackendStream, Vec<u8>, Vec<u8>)> {
        let LoggedIn {
            answer: mut ok,
            backend,
            route,
            credentials_at,
            client_pending,
        } = logged_in;
        let BackendSession {
            stream: mut backend_stream,
            pending,
            ..
        } = backend;
        ok.extend_from_slice(&pending);
        let writes = async {
            send(stream, &ok).await.map_err(|_| "client_error")?;
            if !client_pending.is_empty() {
                backend_stream
                    .write_all(&client_pending)
                    .await
                    .map_err(|_| "backend_error")?;
            }
            Ok::<(), EndReason>(())
        };
        tokio::time::timeout(self.rt.config.backends.login_timeout, writes)
            .await
            .map_err(|_| "handover_timeout")??;
        self.handed_over = (client_pending.len() as u64, pending.len() as u64);
        self.rt
            .metrics
            .login_duration
            .with_label_values(&[&self.listener.name])
            .observe(credentials_at.elapsed().as_secs_f64());
        tracing::info!(
            user = self.user.as_deref().unwrap_or("-"),
            backend = %route.backend.name,
            protocol = self.listener.protocol.as_str(),
            client_id = ?self.client_id,
            forwarder = ?self.forwarder,
            "logged in"
        );
        Ok((backend_stream, pending, client_pending))
    }

    /// Takes the client's address from a trusted load balancer's PROXY
    /// header; any other connection on this listener is closed unread.
    async fn proxy_header(&mut self, tcp: &mut TcpStream, pp: &ProxyProtocolIn) -> Step<()> {
        let balancer = self.peer;
        if !pp
            .trusted_networks
            .iter()
            .any(|n| n.contains(balancer.ip()))
        {
            tracing::warn!(client = %balancer, "connection from outside proxy_protocol.trusted_networks closed");
            return Err("proxy_untrusted");
        }
        match tokio::time::timeout(pp.timeout, proxy_protocol::read_header(tcp)).await {
            Ok(Ok(ProxyHeader::Proxied {
                source,
                destination,
            })) => {
                self.peer = source;
                self.local = destination;
                tracing::debug!(client = %source, balancer = %balancer, "client address from PROXY header");
                Ok(())
            }
            Ok(Ok(ProxyHeader::Local)) => Ok(()),
            Ok(Err(e)) => {
                tracing::info!(client = %balancer, error = %e, "bad PROXY header");
                Err("proxy_header_invalid")
            }
            Err(_) => {
                tracing::info!(client = %balancer, "no PROXY header in time");
                Err("proxy_header_timeout")
            }
        }
    }

    /// Whether credentials may be sent now: over TLS, or where the
    /// listener allows plaintext logins.
    pub fn logins_allowed(&self, stream: &ClientStream) -> bool {
        stream.is_tls() || self.listener.allow_plaintext_auth
    }

    /// The longest pre-auth line a front reads: `limits.max_line`, with
    /// room for a bearer token in base64 when tokens are accepted.
    pub fn max_line(&self) -> usize {
        let configured = self.rt.config.limits.max_line;
        if self.rt.oauth.is_some() {
            configured.max(crate::imap::sasl::MAX_TOKEN_MESSAGE * 4 / 3 + 64)
        } else {
            configured
        }
    }

    /// STARTTLS (IMAP) or STLS (POP3), once the client has been told to
    /// begin: `dropped` bytes it sent after the command were discarded
    /// unread, as they came in plaintext and may have been injected
    /// (CVE-2011-0411 class); then the handshake.
    pub async fn upgrade(&mut self, stream: &mut ClientStream, dropped: usize) -> Step<()> {
        if dropped > 0 {
            self.rt
                .metrics
                .starttls_discarded_bytes
                .inc_by(dropped as u64);
            tracing::info!(client = %self.peer, bytes = dropped, "discarded bytes pipelined after STARTTLS");
        }
        let ClientStream::Plain(tcp) = std::mem::replace(stream, ClientStream::Upgrading) else {
            return Err("client_error");
        };
        let tls = self.handshake(tcp).await?;
        *stream = ClientStream::Tls(Box::new(tls));
        Ok(())
    }

    pub async fn handshake(&self, tcp: TcpStream) -> Step<TlsConn> {
        let timeout = self.rt.config.limits.tls_handshake_timeout;
        let failed = |reason: &'static str| {
            self.rt
                .metrics
                .tls_handshake_failures
                .with_label_values(&[&self.listener.name, reason])
                .inc();
        };
        match tokio::time::timeout(
            timeout,
            tls_conn::accept(tcp, self.rt.tls_for(self.listener.protocol)),
        )
        .await
        {
            Ok(Ok(tls)) => {
                self.rt
                    .metrics
                    .tls_handshakes
                    .with_label_values(&[&self.listener.name])
                    .inc();
                Ok(tls)
            }
            Ok(Err(e)) => {
                let reason = handshake_failure_reason(&e);
                failed(reason);
                tracing::debug!(client = %self.peer, reason, error = %e, "TLS handshake failed");
                Err("tls_handshake_failed")
            }
            Err(_) => {
                failed("timeout");
                tracing::debug!(client = %self.peer, "TLS handshake timed out");
                Err("tls_handshake_timeout")
            }
        }
    }
}

/// Over how long the sessions of a lost backend are told: the herd (the
/// sessions this process holds there, each told at a random moment within
/// the spread) at `rate` logins per second, at most `cap`.
pub fn herd_spread(herd: usize, rate: f64, cap: Duration) -> Duration {
    Duration::from_secs_f64(herd as f64 / rate).min(cap)
}

/// Writes one response in one write and flushes it through TLS.
pub async fn send<S: AsyncWrite + Unpin>(stream: &mut S, bytes: &[u8]) -> std::io::Result<()> {
    stream.write_all(bytes).await?;
    stream.flush().await
}

pub async fn reply(stream: &mut ClientStream, text: String) -> Step<()> {
    send(stream, text.as_bytes())
        .await
        .map_err(|_| "client_error")
}

/// A bounded word for why a TLS handshake failed.
fn handshake_failure_reason(e: &std::io::Error) -> &'static str {
    if let Some(tls) = e
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
    {
        return match tls {
            rustls::Error::NoApplicationProtocol => "alpn",
            rustls::Error::PeerIncompatible(_) => "incompatible",
            rustls::Error::AlertReceived(_) => "alert_received",
            rustls::Error::InvalidMessage(_) | rustls::Error::InappropriateMessage { .. } => {
                "protocol"
            }
            _ => "tls_error",
        };
    }
    match e.kind() {
        std::io::ErrorKind::UnexpectedEof | std::io::ErrorKind::ConnectionReset => "client_closed",
        std::io::ErrorKind::InvalidData => "protocol",
        _ => "io_error",
    }
}
