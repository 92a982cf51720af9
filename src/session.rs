//! One client connection, from accept to close: TLS handshake (implicit
//! listeners), greeting, the pre-auth command loop with STARTTLS, the
//! credentials check, routing, backend login, then the relay.
//!
//! The whole pre-auth phase runs under one deadline (`preauth_timeout`),
//! moved later only by Postern's own waits (the login defence's queues and
//! failure delays, within a bound), and every limit ends in `* BYE` with
//! its reason. What the client reads is
//! chosen here apart from what the log records: causes go to the log, the
//! client gets a response code and a short reason. One line is logged when a
//! session ends.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tracing::Instrument;

use crate::auth::guard::{Full, Key, Lane, LaneFull, Slot, Ticket};
use crate::auth::oauth::TokenError;
use crate::auth::{normalise_username, AuthContext, AuthError, Identity};
use crate::backend::{
    self, BackendError, BackendSession, BackendStream, ClientAddresses, LoginRequest,
};
use crate::config::{ForwardClientAddress, ListenerTls, ProxyProtocolIn};
use crate::imap::command::{self, IdFields, ParseError, PreauthCommand};
use crate::imap::framing::{CommandReader, FramingError};
use crate::imap::sasl::{self, Credentials};
use crate::imap::{printable, Secret};
use crate::live::Runtime;
use crate::proxy_protocol::{self, ProxyHeader};
use crate::registry::{Registry, SessionInfo};
use crate::relay::{self, Counters, RelayEnd, StopCause};
use crate::route::{Lease, Route, RouteError, RouteReason};
use crate::shutdown::Shutdown;
use crate::stream::ClientStream;
use crate::tls_conn::{self, TlsConn};

/// What a listener tells its sessions.
#[derive(Debug)]
pub struct ListenerInfo {
    pub name: String,
    pub tls: ListenerTls,
    pub allow_plaintext_auth: bool,
    pub proxy_protocol: Option<ProxyProtocolIn>,
}

/// The one answer to every failed login: unknown user, wrong password or a
/// user name no account could have all read the same.
const AUTHENTICATION_FAILED: &str = "NO [AUTHENTICATIONFAILED] Authentication failed.";

/// Why a session ended: a fixed word, used in the log line and as the
/// `reason` label of `postern_sessions_ended_total`.
type EndReason = &'static str;

/// `Err` ends the pre-auth phase with that reason.
type Step<T> = Result<T, EndReason>;

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
            bad_commands: 0,
            auth_failures: 0,
            handed_over: (0, 0),
            lease: None,
            own_waits: Arc::default(),
            forwarder: None,
            network_slot: None,
            user_slot: None,
            shutdown,
            registry,
        };
        let ending = session.drive(tcp).await;
        drop(session.lease.take());
        active.dec();
        metrics
            .sessions_ended
            .with_label_values(&[ending.reason])
            .inc();
        tracing::info!(
            client = %session.peer,
            listener = %session.listener.name,
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

/// The state of the pre-auth phase that outlives single commands.
struct Session {
    id: String,
    peer: SocketAddr,
    local: SocketAddr,
    listener: Arc<ListenerInfo>,
    rt: Arc<Runtime>,
    accepted: Instant,
    user: Option<String>,
    backend: Option<String>,
    /// The client's `ID` fields, kept for the log.
    client_id: Option<IdFields>,
    bad_commands: u32,
    auth_failures: u32,
    /// Bytes passed on at login (client to backend, backend to client),
    /// counted with the relayed bytes.
    handed_over: (u64, u64),
    /// The relayed session's place in the pool, from the backend login on.
    lease: Option<Lease>,
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
struct LoggedIn {
    tag: String,
    backend: BackendSession,
    route: Route,
    credentials_at: Instant,
    /// Bytes the client sent after its login command: its first commands
    /// for the backend.
    client_pending: Vec<u8>,
}

impl Session {
    async fn drive(&mut self, mut tcp: TcpStream) -> Ending {
        let rt = Arc::clone(&self.rt);
        let limits = &rt.config.limits;
        let deadline = self.accepted + limits.preauth_timeout;
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
                    let bye = b"* BYE [UNAVAILABLE] Too many connections from your network\r\n";
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
        let preauth = Box::pin(self.preauth(&mut stream));
        let logged_in = match within(deadline, &own_waits, preauth).await {
            Some(Ok(l)) => l,
            Some(Err(reason)) => {
                let _ = tokio::time::timeout(Duration::from_secs(1), stream.shutdown()).await;
                return reason.into();
            }
            None => {
                let bye = b"* BYE Autologout; pre-authentication time limit reached\r\n";
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
        let registration = self.registry.register(SessionInfo::new(
            &self.id,
            self.user.as_deref().unwrap_or("-"),
            self.peer,
            &self.listener.name,
            self.backend.as_deref().unwrap_or("-"),
        ));
        let info = Arc::clone(registration.info());
        let counters = Counters {
            client_to_backend: m.relay_bytes.with_label_values(&["client_to_backend"]),
            backend_to_client: m.relay_bytes.with_label_values(&["backend_to_client"]),
            session: Some((Arc::clone(&info.bytes_in), Arc::clone(&info.bytes_out))),
        };
        // When the backend goes down (health checks) or its drain's grace
        // period ends, Postern shuts down or an administrator ends the
        // session, the relay stops and says why; the client is told below.
        let backend = self.lease.as_ref().map(|l| Arc::clone(l.backend()));
        let jitter = rt.config.backends.reconnect_jitter;
        let shutdown = Arc::clone(&self.shutdown);
        let kick = Arc::clone(&info);
        let stop = async move {
            let backend_closing = async {
                match backend {
                    Some(backend) => {
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
                _ = kick.kicked() => StopCause::Kicked,
                cause = backend_closing => cause,
            }
        };
        let outcome = relay::relay(
            &mut stream,
            &mut backend_stream,
            backend_said,
            client_said,
            limits.idle_timeout,
            &counters,
            stop,
        )
        .await;
        drop(registration);
        // Shutting down, or ended by an administrator: the client is told
        // at once. The backend went down or away under the session: say so
        // at a random moment within the jitter, so its clients do not all
        // reconnect at once. Nothing is written where the client would not
        // read it as a new response (mid-literal, inside a compressed
        // stream that is not at a flush): it is only closed.
        let (bye, after_jitter): (Option<&[u8]>, bool) = match outcome.end {
            RelayEnd::Stopped(StopCause::Shutdown) => {
                (Some(b"* BYE [UNAVAILABLE] Server shutting down\r\n"), false)
            }
            RelayEnd::Stopped(StopCause::Kicked) => {
                (Some(b"* BYE Session ended by the administrator\r\n"), false)
            }
            RelayEnd::Stopped(StopCause::Drained | StopCause::BackendDown)
            | RelayEnd::BackendLost
            | RelayEnd::BackendError => (
                Some(b"* BYE [UNAVAILABLE] Mail server is unavailable, please reconnect\r\n"),
                true,
            ),
            _ => (None, false),
        };
        if let Some(bye) = bye {
            let farewell = outcome.farewell.as_str();
            // Encoded before any wait: a shadow inflater is freed now.
            let said = outcome.farewell.encode(bye);
            tracing::debug!(farewell, said = said.is_some(), "relay stopped");
            if after_jitter {
                drop(backend_stream);
                tokio::time::sleep(jitter.mul_f64(rand::random::<f64>())).await;
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

    /// Answers the client's login with the backend's capabilities and passes
    /// on what either side sent early: bytes the backend sent after its OK go
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
            tag,
            backend,
            route,
            credentials_at,
            client_pending,
        } = logged_in;
        let BackendSession {
            stream: mut backend_stream,
            capabilities,
            pending,
        } = backend;
        let mut ok = if capabilities.is_empty() {
            format!("{tag} OK Logged in\r\n")
        } else {
            format!("{tag} OK [CAPABILITY {capabilities}] Logged in\r\n")
        }
        .into_bytes();
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

    async fn handshake(&self, tcp: TcpStream) -> Step<TlsConn> {
        let timeout = self.rt.config.limits.tls_handshake_timeout;
        let failed = |reason: &'static str| {
            self.rt
                .metrics
                .tls_handshake_failures
                .with_label_values(&[&self.listener.name, reason])
                .inc();
        };
        match tokio::time::timeout(timeout, tls_conn::accept(tcp, Arc::clone(&self.rt.tls))).await {
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

    fn auth_allowed(&self, stream: &ClientStream) -> bool {
        stream.is_tls() || self.listener.allow_plaintext_auth
    }

    fn capabilities(&self, stream: &ClientStream) -> String {
        let base = match (stream.is_tls(), self.listener.allow_plaintext_auth) {
            (true, _) => "IMAP4rev1 SASL-IR ID LITERAL+ AUTH=PLAIN AUTH=LOGIN",
            (false, false) => return "IMAP4rev1 SASL-IR ID LITERAL+ STARTTLS LOGINDISABLED".into(),
            (false, true) => "IMAP4rev1 SASL-IR ID LITERAL+ STARTTLS AUTH=PLAIN AUTH=LOGIN",
        };
        if self.rt.oauth.is_some() {
            format!("{base} AUTH=OAUTHBEARER AUTH=XOAUTH2")
        } else {
            base.into()
        }
    }

    /// The longest pre-auth line: room for a bearer token in base64 when
    /// tokens are accepted.
    fn max_line(&self) -> usize {
        let configured = self.rt.config.limits.max_line;
        if self.rt.oauth.is_some() {
            configured.max(sasl::MAX_TOKEN_MESSAGE * 4 / 3 + 64)
        } else {
            configured
        }
    }

    async fn preauth(&mut self, stream: &mut ClientStream) -> Step<LoggedIn> {
        let limits = self.rt.config.limits.clone();
        let mut reader = CommandReader::new(self.max_line(), limits.max_literal);
        let greeting = format!(
            "* OK [CAPABILITY {}] Postern ready.\r\n",
            self.capabilities(stream)
        );
        send(stream, greeting.as_bytes())
            .await
            .map_err(|_| "client_error")?;
        loop {
            let raw = match reader.read_command(stream).await {
                Ok(raw) => raw,
                Err(e) => return Err(self.framing_failed(stream, e).await),
            };
            let cmd = match command::parse(&raw) {
                Ok(cmd) => cmd,
                Err(ParseError::NoTag) => {
                    self.bad(stream, "*", "Missing or invalid tag").await?;
                    continue;
                }
                Err(ParseError::Bad { tag, reason }) => {
                    self.bad(stream, &tag, reason).await?;
                    continue;
                }
            };
            drop(raw);
            let tag = cmd.tag;
            match cmd.body {
                PreauthCommand::Capability => {
                    let r = format!(
                        "* CAPABILITY {}\r\n{tag} OK CAPABILITY completed\r\n",
                        self.capabilities(stream)
                    );
                    reply(stream, r).await?;
                }
                PreauthCommand::Noop => {
                    reply(stream, format!("{tag} OK NOOP completed\r\n")).await?
                }
                PreauthCommand::Logout => {
                    reply(
                        stream,
                        format!("* BYE Logging out\r\n{tag} OK LOGOUT completed\r\n"),
                    )
                    .await?;
                    return Err("logout");
                }
                PreauthCommand::Id(fields) => {
                    tracing::debug!(client_id = ?fields, "client ID");
                    self.client_id = fields;
                    self.take_forwarded_address();
                    reply(
                        stream,
                        format!("* ID (\"name\" \"Postern\")\r\n{tag} OK ID completed\r\n"),
                    )
                    .await?;
                }
                PreauthCommand::StartTls => self.starttls(stream, &mut reader, &tag).await?,
                PreauthCommand::Login { user, password } => {
                    if !self.auth_allowed(stream) {
                        self.privacy_required(stream, &tag).await?;
                        continue;
                    }
                    let creds = Credentials {
                        authzid: None,
                        authcid: user,
                        password,
                    };
                    if let Some(mut l) = self.login(stream, &tag, "LOGIN", creds).await? {
                        l.client_pending = reader.take_buffered();
                        return Ok(l);
                    }
                }
                PreauthCommand::Authenticate {
                    mechanism,
                    initial_response,
                } => {
                    if !self.auth_allowed(stream) {
                        self.privacy_required(stream, &tag).await?;
                        continue;
                    }
                    if self.rt.oauth.is_some()
                        && matches!(mechanism.as_str(), "XOAUTH2" | "OAUTHBEARER")
                    {
                        let xoauth2 = mechanism == "XOAUTH2";
                        if let Some(mut l) = self
                            .token_login(stream, &mut reader, &tag, xoauth2, initial_response)
                            .await?
                        {
                            l.client_pending = reader.take_buffered();
                            return Ok(l);
                        }
                        continue;
                    }
                    let Some((mech, creds)) = self
                        .sasl_exchange(stream, &mut reader, &tag, &mechanism, initial_response)
                        .await?
                    else {
                        continue;
                    };
                    if let Some(mut l) = self.login(stream, &tag, mech, creds).await? {
                        l.client_pending = reader.take_buffered();
                        return Ok(l);
                    }
                }
                PreauthCommand::NotPermitted(name) => {
                    let reason = format!("{name} is not valid before login; log in first");
                    self.bad(stream, &tag, &reason).await?;
                }
            }
        }
    }

    async fn framing_failed(&mut self, stream: &mut ClientStream, e: FramingError) -> EndReason {
        let (bye, reason) = match e {
            FramingError::LineTooLong(limit) => (
                format!("* BYE [TOOBIG] Command line longer than {limit} bytes\r\n"),
                "line_too_long",
            ),
            FramingError::LiteralTooBig { size, limit } => (
                format!(
                    "* BYE [TOOBIG] Literal of {size} bytes exceeds the limit of {limit} bytes\r\n"
                ),
                "literal_too_big",
            ),
            FramingError::Closed => return "client_closed",
            FramingError::Io(_) => return "client_error",
        };
        let _ = send(stream, bye.as_bytes()).await;
        reason
    }

    /// Answers a bad command; too many of them end the session.
    /// Answers a bad command; too many of them end the session.
    async fn bad(&mut self, stream: &mut ClientStream, tag: &str, reason: &str) -> Step<()> {
        self.refuse(stream, format!("{tag} BAD {reason}\r\n")).await
    }

    /// Sends a refusal (BAD or NO) that counts towards `max_bad_commands`.
    async fn refuse(&mut self, stream: &mut ClientStream, mut out: String) -> Step<()> {
        self.bad_commands += 1;
        if self.bad_commands >= self.rt.config.limits.max_bad_commands {
            out.push_str("* BYE Too many invalid commands\r\n");
            let _ = send(stream, out.as_bytes()).await;
            return Err("too_many_bad_commands");
        }
        reply(stream, out).await
    }

    async fn privacy_required(&mut self, stream: &mut ClientStream, tag: &str) -> Step<()> {
        self.count_auth("none", "privacy_required");
        let out = format!(
            "{tag} NO [PRIVACYREQUIRED] Use STARTTLS first: logins over plaintext are disabled\r\n"
        );
        self.refuse(stream, out).await
    }

    async fn starttls(
        &mut self,
        stream: &mut ClientStream,
        reader: &mut CommandReader,
        tag: &str,
    ) -> Step<()> {
        if stream.is_tls() {
            let reason = match self.listener.tls {
                ListenerTls::Implicit => "STARTTLS is not available on an implicit-TLS port",
                ListenerTls::Starttls => "TLS is already active",
            };
            return self.bad(stream, tag, reason).await;
        }
        reply(stream, format!("{tag} OK Begin TLS negotiation now\r\n")).await?;
        // Anything the client sent after STARTTLS was sent in plaintext and
        // may have been injected: drop it unread (CVE-2011-0411 class).
        let dropped = reader.discard_buffered();
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

    /// Runs an AUTHENTICATE exchange. `Ok(None)` means it was answered
    /// already (cancelled, unsupported, malformed) and the loop goes on.
    async fn sasl_exchange(
        &mut self,
        stream: &mut ClientStream,
        reader: &mut CommandReader,
        tag: &str,
        mechanism: &str,
        initial: Option<Secret>,
    ) -> Step<Option<(&'static str, Credentials)>> {
        match mechanism {
            "PLAIN" => {
                let message = match initial {
                    Some(ir) => sasl::decode_response(ir.expose()),
                    None => match self.continuation(stream, reader, tag, "").await? {
                        Some(line) => sasl::decode_response(line.expose()),
                        None => return Ok(None),
                    },
                };
                match message.and_then(|m| sasl::decode_plain(&m)) {
                    Ok(creds) => Ok(Some(("PLAIN", creds))),
                    Err(e) => {
                        self.count_auth("PLAIN", "invalid");
                        self.bad(stream, tag, &e.to_string()).await.map(|_| None)
                    }
                }
            }
            "LOGIN" => {
                let user = match initial {
                    Some(ir) => ir,
                    None => match self
                        .continuation(stream, reader, tag, sasl::LOGIN_USERNAME_PROMPT)
                        .await?
                    {
                        Some(line) => line,
                        None => return Ok(None),
                    },
                };
                let Some(password) = self
                    .continuation(stream, reader, tag, sasl::LOGIN_PASSWORD_PROMPT)
                    .await?
                else {
                    return Ok(None);
                };
                match (
                    sasl::decode_response(user.expose()),
                    sasl::decode_response(password.expose()),
                ) {
                    (Ok(user), Ok(password)) => Ok(Some((
                        "LOGIN",
                        Credentials {
                            authzid: None,
                            authcid: user.expose().to_vec(),
                            password,
                        },
                    ))),
                    (Err(e), _) | (_, Err(e)) => {
                        self.count_auth("LOGIN", "invalid");
                        self.bad(stream, tag, &e.to_string()).await.map(|_| None)
                    }
                }
            }
            _ => {
                let out = format!("{tag} NO Unsupported authentication mechanism\r\n");
                self.refuse(stream, out).await.map(|_| None)
            }
        }
    }

    /// An OAUTHBEARER or XOAUTH2 exchange: the token is checked against
    /// the JWKS; a refusal is sent as the mechanism's JSON error challenge,
    /// the client's dummy answer read, then the tagged NO (RFC 7628 3.2.3).
    async fn token_login(
        &mut self,
        stream: &mut ClientStream,
        reader: &mut CommandReader,
        tag: &str,
        xoauth2: bool,
        initial: Option<Secret>,
    ) -> Step<Option<LoggedIn>> {
        let mechanism = if xoauth2 { "XOAUTH2" } else { "OAUTHBEARER" };
        let message = match initial {
            Some(ir) => ir,
            None => match self.continuation(stream, reader, tag, "").await? {
                Some(line) => line,
                None => return Ok(None),
            },
        };
        let received = Instant::now();
        let decoded = sasl::decode_response_up_to(message.expose(), sasl::MAX_TOKEN_MESSAGE)
            .and_then(|m| {
                if xoauth2 {
                    sasl::decode_xoauth2(&m)
                } else {
                    sasl::decode_oauthbearer(&m)
                }
            });
        let bearer = match decoded {
            Ok(b) => b,
            Err(e) => {
                self.count_auth(mechanism, "invalid");
                return self.bad(stream, tag, &e.to_string()).await.map(|_| None);
            }
        };
        let rt = Arc::clone(&self.rt);
        let auth = &rt.config.auth;
        let named = match bearer
            .authzid
            .as_deref()
            .map(|a| normalise_username(a, auth))
        {
            None => None,
            Some(Ok(user)) => Some(user),
            Some(Err(e)) => {
                self.count_auth(mechanism, "invalid");
                tracing::info!(client = %self.peer, mechanism, error = %e, "token login refused: invalid user name");
                return self
                    .auth_failed(stream, tag, received, AUTHENTICATION_FAILED, None, None)
                    .await;
            }
        };
        let ticket = match self
            .admit(stream, tag, mechanism, named.as_deref(), received)
            .await
        {
            Ok(ticket) => ticket,
            Err(answered) => return answered,
        };
        let oauth = rt.oauth.clone().expect("checked by the caller");
        let token = std::str::from_utf8(bearer.token.expose()).unwrap_or_default();
        let checked = oauth.check(token).await;
        if checked == Err(TokenError::NoKeys) {
            settle(ticket, Some(auth.failure_delay));
            self.count_auth(mechanism, "unavailable");
            tracing::warn!(client = %self.peer, "token login: the provider's keys or introspection are unavailable");
            return self.auth_unavailable(stream, tag).await;
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
                let identity = Identity {
                    user,
                    backend: None,
                    pool: None,
                    backend_password: None,
                };
                self.enter(stream, tag, identity, None, received).await
            }
            Err(why) => {
                self.count_auth(mechanism, "failure");
                tracing::info!(client = %self.peer, user = named.as_deref().unwrap_or("-"), mechanism, reason = why, "token refused");
                // Recorded, and the places held, before the client is asked
                // anything more: hanging up now must not undo the failure.
                let delay = self.penalty(named.as_deref(), received);
                settle(ticket, Some(delay));
                let error = if xoauth2 {
                    r#"{"status":"401","schemes":"bearer"}"#
                } else {
                    r#"{"status":"invalid_token"}"#
                };
                let challenge = base64::engine::general_purpose::STANDARD.encode(error);
                reply(stream, format!("+ {challenge}\r\n")).await?;
                // The client's answer (a dummy `\x01`, or `*`) only ends the exchange.
                if let Err(e) = reader.read_line(stream, self.max_line()).await {
                    return Err(self.framing_failed(stream, e).await);
                }
                self.auth_failed_after(stream, tag, received + delay, AUTHENTICATION_FAILED)
                    .await
            }
        }
    }

    /// Sends `+ prompt` and reads the client's answer line. `Ok(None)`
    /// when the client cancelled with `*` (answered with a tagged BAD).
    async fn continuation(
        &mut self,
        stream: &mut ClientStream,
        reader: &mut CommandReader,
        tag: &str,
        prompt: &str,
    ) -> Step<Option<Secret>> {
        reply(stream, format!("+ {prompt}\r\n")).await?;
        let line = match reader.read_line(stream, self.max_line()).await {
            Ok(line) => Secret::new(line),
            Err(e) => return Err(self.framing_failed(stream, e).await),
        };
        if line.expose() == b"*" {
            reply(stream, format!("{tag} BAD Authentication cancelled\r\n")).await?;
            return Ok(None);
        }
        Ok(Some(line))
    }

    fn count_auth(&self, mechanism: &str, result: &str) {
        // Tokens are checked against the JWKS, not the password source.
        let source = match mechanism {
            "XOAUTH2" | "OAUTHBEARER" => "jwt",
            _ => self.rt.auth.name(),
        };
        self.rt
            .metrics
            .authentications
            .with_label_values(&[mechanism, source, result])
            .inc();
    }

    /// Checks credentials, routes, and logs in at the backend. `Ok(None)`:
    /// answered with NO, the pre-auth loop goes on.
    async fn login(
        &mut self,
        stream: &mut ClientStream,
        tag: &str,
        mechanism: &'static str,
        creds: Credentials,
    ) -> Step<Option<LoggedIn>> {
        let received = Instant::now();
        let rt = Arc::clone(&self.rt);
        let auth = &rt.config.auth;
        let user = match normalise_username(&creds.authcid, auth) {
            Ok(user) => user,
            Err(e) => {
                self.count_auth(mechanism, "invalid");
                tracing::info!(client = %self.peer, mechanism, error = %e, "login refused: invalid user name");
                return self
                    .auth_failed(stream, tag, received, AUTHENTICATION_FAILED, None, None)
                    .await;
            }
        };
        if let Some(authzid) = &creds.authzid {
            if normalise_username(authzid, auth).ok().as_deref() != Some(user.as_str()) {
                self.count_auth(mechanism, "invalid");
                tracing::info!(client = %self.peer, user, mechanism, "login refused: authorization identity differs");
                return self
                    .auth_failed(
                        stream,
                        tag,
                        received,
                        "NO [AUTHORIZATIONFAILED] Logging in as another user is not permitted",
                        None,
                        None,
                    )
                    .await;
            }
        }
        let ticket = match self
            .admit(stream, tag, mechanism, Some(&user), received)
            .await
        {
            Ok(ticket) => ticket,
            Err(answered) => return answered,
        };
        let password = creds.password;
        let asked = Instant::now();
        let ctx = AuthContext {
            client: self.peer.ip(),
            attempt: self.auth_failures + 1,
            tls: stream.is_tls(),
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
                tracing::info!(client = %self.peer, user, mechanism, source = self.rt.auth.name(), "authentication failed");
                return self
                    .auth_failed(
                        stream,
                        tag,
                        received,
                        AUTHENTICATION_FAILED,
                        Some(&user),
                        ticket,
                    )
                    .await;
            }
            Err(AuthError::Disabled { reason }) => {
                self.count_auth(mechanism, "disabled");
                tracing::info!(client = %self.peer, user, mechanism, source = self.rt.auth.name(), reason = reason.as_deref().unwrap_or("-"), "login refused: account disabled");
                let response = match reason.filter(|_| auth.show_disabled_reason) {
                    Some(reason) => format!("NO [AUTHENTICATIONFAILED] {reason}"),
                    None => AUTHENTICATION_FAILED.to_owned(),
                };
                return self
                    .auth_failed(stream, tag, received, &response, Some(&user), ticket)
                    .await;
            }
            Err(AuthError::Refused { text, wait }) => {
                self.count_auth(mechanism, "failure");
                tracing::info!(client = %self.peer, user, mechanism, source = self.rt.auth.name(), reason = text, "authentication refused");
                let response = format!("NO [AUTHENTICATIONFAILED] {text}");
                // The source's delay, or ours if longer.
                let penalty = self.penalty(Some(&user), received);
                let delay = wait.unwrap_or_default().max(penalty);
                settle(ticket, Some(delay));
                let at = received + delay;
                return match wait {
                    Some(_) => self.auth_failed_after(stream, tag, at, &response).await,
                    // No retry: the answer, then the connection closes.
                    None => {
                        self.own_wait(tokio::time::sleep_until(at)).await;
                        let out = format!(
                            "{tag} {}\r\n* BYE Authentication refused\r\n",
                            printable(&response, 200)
                        );
                        let _ = send(stream, out.as_bytes()).await;
                        Err("auth_refused")
                    }
                };
            }
            Err(AuthError::Unavailable(cause) | AuthError::Busy(cause)) => {
                self.count_auth(mechanism, "unavailable");
                tracing::warn!(client = %self.peer, user, source = self.rt.auth.name(), cause, "authentication source unavailable");
                // An attempt all the same: its places are held as a
                // failure's would be, so "unavailable" costs a guesser too.
                settle(ticket, Some(auth.failure_delay));
                return self.auth_unavailable(stream, tag).await;
            }
        };
        settle(ticket, None);
        self.succeeded(mechanism, &user);
        self.enter(stream, tag, identity, Some(password), received)
            .await
    }

    /// After a successful authentication: the per-user limit, routing, and
    /// the backend login, with `password` or, where there is none (a token
    /// login) or the configuration says so, as the master user.
    async fn enter(
        &mut self,
        stream: &mut ClientStream,
        tag: &str,
        identity: Identity,
        password: Option<Secret>,
        received: Instant,
    ) -> Step<Option<LoggedIn>> {
        let rt = Arc::clone(&self.rt);
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
                reply(
                    stream,
                    format!("{tag} NO [LIMIT] Too many sessions for this user\r\n"),
                )
                .await?;
                return Ok(None);
            }
        };
        self.user = Some(identity.user.clone());
        let config = &rt.config.backends;
        // Connecting is bounded by connect_timeout over every backend tried:
        // a hash-placed user whose backend cannot be reached moves on to
        // the next in their order, within the same budget.
        let connect_deadline = Instant::now() + config.connect_timeout;
        let mut unreachable: Vec<String> = Vec::new();
        loop {
            let exclude: Vec<&str> = unreachable.iter().map(String::as_str).collect();
            let route = match rt.pool.select(&identity, &exclude) {
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
                    reply(stream, format!("{tag} NO [UNAVAILABLE] {text}\r\n")).await?;
                    return Ok(None);
                }
            };
            tracing::info!(
                user = identity.user,
                backend = %route.backend.name,
                address = %route.backend.address,
                pool = %route.pool,
                reason = route.reason.as_str(),
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
            };
            let result = backend::connect_and_login(&route.backend, &request).await;
            let label = match &result {
                Ok(_) => "success",
                Err(e) => e.kind(),
            };
            rt.metrics
                .backend_logins
                .with_label_values(&[&route.backend.name, label])
                .inc();
            // A refused password still reached a working backend; a login
            // unsuitable for it says nothing of its health either way.
            if !matches!(result, Err(BackendError::Unsuitable(_))) {
                let reached = matches!(result, Ok(_) | Err(BackendError::Rejected(_)));
                rt.pool.report(&route.backend, reached);
            }
            match result {
                Ok(session) => {
                    self.backend = Some(route.backend.name.clone());
                    self.lease = Some(rt.pool.lease(&identity.user, &route.backend));
                    self.user_slot = user_slot;
                    return Ok(Some(LoggedIn {
                        tag: tag.to_owned(),
                        backend: session,
                        route,
                        credentials_at: received,
                        client_pending: Vec::new(),
                    }));
                }
                Err(e @ (BackendError::Connect { .. } | BackendError::Timeout("connecting")))
                    if route.reason != RouteReason::Directory
                        && Instant::now() < connect_deadline
                        && unreachable.len() + 1 < rt.pool.backends().len() =>
                {
                    tracing::warn!(user = identity.user, backend = %route.backend.name, error = %e, "backend unreachable, trying the next");
                    unreachable.push(route.backend.name.clone());
                }
                Err(e) => {
                    let text = match &e {
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
                        BackendError::Connect { .. } | BackendError::Timeout("connecting") => {
                            tracing::warn!(user = identity.user, backend = %route.backend.name, error = %e, "backend unreachable");
                            "Mail server is not reachable, try again later"
                        }
                        _ => {
                            tracing::warn!(user = identity.user, backend = %route.backend.name, error = %e, "backend login failed");
                            "Mail server is not answering correctly, try again later"
                        }
                    };
                    reply(stream, format!("{tag} NO [UNAVAILABLE] {text}\r\n")).await?;
                    return Ok(None);
                }
            }
        }
    }

    /// The answer when the credentials could not be checked.
    async fn auth_unavailable(
        &mut self,
        stream: &mut ClientStream,
        tag: &str,
    ) -> Step<Option<LoggedIn>> {
        let text = "NO [UNAVAILABLE] Authentication is unavailable, try again later";
        reply(stream, format!("{tag} {text}\r\n")).await?;
        Ok(None)
    }

    /// Answers a failed login once the failure delay (counted from when the
    /// credentials arrived) has passed; too many failures end the session.
    async fn auth_failed(
        &mut self,
        stream: &mut ClientStream,
        tag: &str,
        received: Instant,
        response: &str,
        user: Option<&str>,
        ticket: Option<Ticket>,
    ) -> Step<Option<LoggedIn>> {
        let delay = self.penalty(user, received);
        // The attempt's places are held for as long as its answer waits.
        settle(ticket, Some(delay));
        self.auth_failed_after(stream, tag, received + delay, response)
            .await
    }

    /// The client's network, as brute-force records and limits count it.
    fn network(&self) -> Key {
        let bf = &self.rt.config.auth.brute_force;
        Key::network(self.peer.ip(), bf.ipv4_prefix, bf.ipv6_prefix)
    }

    /// Records a failed login and returns how long after the credentials
    /// arrived it is answered: `failure_delay`, or longer after earlier
    /// failures from this network or for this user.
    fn penalty(&self, user: Option<&str>, received: Instant) -> Duration {
        let rt = &self.rt;
        let auth = &rt.config.auth;
        if !auth.brute_force.enabled {
            return auth.failure_delay;
        }
        let p = rt.guard.failed(
            &self.network(),
            user,
            auth.failure_delay,
            &auth.brute_force,
            received,
        );
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
    /// them up to `queue_wait`. `Err` carries the answer already given.
    async fn admit(
        &mut self,
        stream: &mut ClientStream,
        tag: &str,
        mechanism: &'static str,
        user: Option<&str>,
        received: Instant,
    ) -> Result<Option<Ticket>, Step<Option<LoggedIn>>> {
        let rt = Arc::clone(&self.rt);
        let auth = &rt.config.auth;
        let bf = &auth.brute_force;
        if !bf.enabled {
            return Ok(None);
        }
        let guard = &rt.guard;
        let network = self.network();
        let familiar = user.is_some_and(|u| guard.familiar(u, &network, received));
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
                    return Err(self
                        .auth_failed_after(
                            stream,
                            tag,
                            received + auth.failure_delay,
                            "NO [UNAVAILABLE] Too many failed logins from your network, try again later",
                        )
                        .await);
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
                let text = match lane {
                    Lane::Network(_) | Lane::Familiar(_) => {
                        "Too many logins at once from your network"
                    }
                    Lane::User(_) | Lane::Pair(_) => "Too many logins at once for this account",
                };
                let out = format!("{tag} NO [UNAVAILABLE] {text}, try again later\r\n");
                Err(reply(stream, out).await.map(|_| None))
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
    async fn own_wait<F: std::future::Future>(&self, wait: F) -> F::Output {
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
    /// own address as its `ID` states it (`x-originating-ip`, and
    /// `x-originating-port`) replaces the forwarder's, once. From anywhere
    /// else the fields are only logged.
    fn take_forwarded_address(&mut self) {
        let Some(fields) = &self.client_id else {
            return;
        };
        let field = |name: &str| {
            fields
                .iter()
                .find(|(n, _)| n.eq_ignore_ascii_case(name))
                .and_then(|(_, v)| v.as_deref())
        };
        let Some(stated) = field("x-originating-ip") else {
            return;
        };
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
        let port = field("x-originating-port")
            .and_then(|p| p.parse().ok())
            .unwrap_or(0);
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

    /// Answers a failed login at `at`; too many failures end the session.
    async fn auth_failed_after(
        &mut self,
        stream: &mut ClientStream,
        tag: &str,
        at: Instant,
        response: &str,
    ) -> Step<Option<LoggedIn>> {
        let m = &self.rt.metrics;
        m.auth_penalties.inc();
        self.own_wait(tokio::time::sleep_until(at)).await;
        self.auth_failures += 1;
        let mut out = format!("{tag} {}\r\n", printable(response, 200));
        if self.auth_failures >= self.rt.config.limits.max_auth_failures {
            m.auth_blocks
                .with_label_values(&[&self.listener.name])
                .inc();
            out.push_str("* BYE Too many failed logins\r\n");
            let _ = send(stream, out.as_bytes()).await;
            return Err("too_many_auth_failures");
        }
        reply(stream, out).await?;
        Ok(None)
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
struct OwnWaits(std::sync::Mutex<(Duration, Option<Instant>)>);

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
async fn within<F: std::future::Future>(
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

/// Writes one response in one write and flushes it through TLS.
async fn send<S: AsyncWrite + Unpin>(stream: &mut S, bytes: &[u8]) -> std::io::Result<()> {
    stream.write_all(bytes).await?;
    stream.flush().await
}

async fn reply(stream: &mut ClientStream, text: String) -> Step<()> {
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
