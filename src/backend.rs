//! Connecting and logging in to a backend IMAP server for a user; the
//! connection, its errors and the login request are shared with POP3's
//! backend login ([`crate::pop3::backend`]).
//!
//! Sequence: TCP connect (bounded by `connect_timeout`), then within
//! `login_timeout`: a PROXY protocol v2 header if the backend wants one,
//! TLS (implicit, or STARTTLS that must be offered and accepted before
//! anything else is sent), read the greeting (refusing `PREAUTH` and `BYE`), ask for
//! CAPABILITY if the greeting carried none, send `ID` with the client's
//! address pipelined with the login (`AUTHENTICATE PLAIN` with SASL-IR when
//! offered, else `AUTHENTICATE PLAIN` with a continuation, else `LOGIN` with
//! quoting or literals), and capture the post-login capabilities. Everything
//! the backend says before its tagged OK stays here; bytes after it are
//! handed to the relay so nothing is lost. Health checks ([`probe`]) take
//! the same path up to an optional probe login, then LOGOUT.

use std::net::SocketAddr;
use std::time::Duration;

use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;

use crate::config::{BackendTlsMode, MasterForm};
use crate::imap::{push_string, sasl, Capabilities, Secret};
use crate::proxy_protocol;
use crate::route::{Backend, BackendTls};

/// Longest backend response line kept while logging in (literals included).
const MAX_RESPONSE: usize = 64 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error("cannot connect to {address}: {reason}")]
    Connect { address: String, reason: String },
    #[error("timed out {0}")]
    Timeout(&'static str),
    #[error("backend greeting refused: {0}")]
    Greeting(String),
    #[error("backend rejected the login: {0}")]
    Rejected(String),
    #[error("backend protocol error: {0}")]
    Protocol(String),
    /// This login cannot be made at this backend for reasons of the user
    /// (a name holding the master separator) or of how the two fit (no
    /// `AUTH=PLAIN` for an authorization identity): not a fault of the
    /// backend, so never held against its health.
    #[error("login unsuitable for this backend: {0}")]
    Unsuitable(String),
    #[error("backend TLS: {0}")]
    Tls(String),
    /// The backend cannot take the login now and said so (POP3
    /// `[SYS/TEMP]`): the next backend may.
    #[error("backend temporarily unavailable: {0}")]
    Unavailable(String),
    /// The mailbox is locked by another session (POP3 `[IN-USE]`): the
    /// client is told as the backend said it; not a fault of the backend.
    #[error("mailbox in use: {0}")]
    InUse(String),
    #[error("backend connection failed: {0}")]
    Io(#[from] std::io::Error),
}

impl BackendError {
    /// Bounded label for the `result` of the backend-login metric.
    pub fn kind(&self) -> &'static str {
        match self {
            BackendError::Connect { .. } => "connect_error",
            BackendError::Timeout(_) => "timeout",
            BackendError::Greeting(_) => "bad_greeting",
            BackendError::Rejected(_) => "rejected",
            BackendError::Tls(_) => "tls_error",
            BackendError::Protocol(_) | BackendError::Io(_) => "protocol_error",
            BackendError::Unsuitable(_) => "unsuitable",
            BackendError::Unavailable(_) => "unavailable",
            BackendError::InUse(_) => "in_use",
        }
    }
}

/// A connection to a backend, plain or TLS. One type, so the relay need
/// not be generic over how the backend is reached.
pub enum BackendStream {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

impl AsyncRead for BackendStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            BackendStream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            BackendStream::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for BackendStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            BackendStream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            BackendStream::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            BackendStream::Plain(s) => Pin::new(s).poll_flush(cx),
            BackendStream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            BackendStream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            BackendStream::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

/// The client's connection, forwarded to the backend in `ID` or a PROXY
/// protocol header.
#[derive(Debug, Clone, Copy)]
pub struct ClientAddresses {
    pub peer: SocketAddr,
    pub local: SocketAddr,
}

/// A master user that logs in at backends on users' behalf.
pub struct MasterLogin {
    pub user: String,
    pub password: Secret,
    pub form: MasterForm,
    pub separator: String,
    /// Every login, not only those with no password to pass on.
    pub always: bool,
}

pub struct LoginRequest<'a> {
    pub user: &'a str,
    pub password: &'a Secret,
    /// Log in as this master user for `user`; `password` is then unused.
    pub master: Option<&'a MasterLogin>,
    pub client: Option<ClientAddresses>,
    /// Send the client's address in `ID` (where the backend has ID).
    pub send_id: bool,
    pub session_id: &'a str,
    pub connect_timeout: Duration,
    pub login_timeout: Duration,
    /// The client's EHLO name (submission), passed on where the backend
    /// takes it.
    pub helo: Option<&'a str>,
    /// Set once the user's credentials (or `XCLIENT LOGIN=`, which vouches
    /// for the user) are about to leave: a failure before it happened says
    /// nothing of the user, and the login may go to the next backend.
    pub credentials_sent: std::sync::atomic::AtomicBool,
}

/// Who logs in at a backend: the authorization identity (empty when the
/// same), the authentication identity and its password.
pub struct Identities<'a> {
    pub authzid: &'a [u8],
    pub authcid: std::borrow::Cow<'a, [u8]>,
    pub password: &'a Secret,
}

impl LoginRequest<'_> {
    /// The user with their password, or the master user for them: as an
    /// authorization identity, or joined to the name with the separator
    /// (refused, as unsuitable, for a name that holds the separator: the
    /// backend would split it and log in as someone else).
    ///
    /// Called right before the credentials are written: it marks them sent.
    pub fn identities(&self) -> Result<Identities<'_>, BackendError> {
        let ids = match self.master {
            None => Identities {
                authzid: b"",
                authcid: self.user.as_bytes().into(),
                password: self.password,
            },
            Some(m) if m.form == MasterForm::Authzid => Identities {
                authzid: self.user.as_bytes(),
                authcid: m.user.as_bytes().into(),
                password: &m.password,
            },
            Some(m) => {
                if self.user.contains(m.separator.as_str()) {
                    return Err(BackendError::Unsuitable(format!(
                        "user name contains the master separator `{}`",
                        m.separator
                    )));
                }
                Identities {
                    authzid: b"",
                    authcid: format!("{}{}{}", self.user, m.separator, m.user)
                        .into_bytes()
                        .into(),
                    password: &m.password,
                }
            }
        };
        self.mark_credentials_sent();
        Ok(ids)
    }

    /// The credentials (or a vouching `XCLIENT LOGIN=`) are about to leave.
    pub fn mark_credentials_sent(&self) {
        self.credentials_sent
            .store(true, std::sync::atomic::Ordering::Relaxed);
    }

    /// Whether the backend may have had the user's credentials.
    pub fn credentials_were_sent(&self) -> bool {
        self.credentials_sent
            .load(std::sync::atomic::Ordering::Relaxed)
    }
}

/// A backend connection on which the user is logged in.
pub struct BackendSession {
    pub stream: BackendStream,
    /// The backend's capabilities after login, as it announced them.
    pub capabilities: Capabilities,
    /// Bytes the backend sent after its tagged OK; they belong to the client.
    pub pending: Vec<u8>,
    /// The backend's own answer to the login, where the client is to hear
    /// it as it was said (ManageSieve's `OK`).
    pub answer: Option<Vec<u8>>,
}

/// One health check: connect, PROXY header (LOCAL), TLS as configured,
/// the greeting, a login with the probe account if one is given, then
/// LOGOUT. The caller bounds it.
pub async fn probe(backend: &Backend, login: Option<(&str, &Secret)>) -> Result<(), BackendError> {
    let mut tcp = connect(&backend.address).await?;
    if backend.proxy_protocol {
        tcp.write_all(&proxy_protocol::v2_header(None)).await?;
    }
    let (mut conn, caps) = start(backend, tcp).await?;
    if let Some((user, password)) = login {
        let req = LoginRequest {
            user,
            password,
            master: None,
            client: None,
            send_id: false,
            session_id: "health-check",
            connect_timeout: Duration::ZERO,
            login_timeout: Duration::ZERO,
            helo: None,
            credentials_sent: Default::default(),
        };
        let session = self::login(conn, caps, &req).await?;
        conn = Conn::new(session.stream);
    }
    conn.send(b"Z LOGOUT\r\n").await?;
    // The answer is a courtesy; the check has passed.
    let _ = conn.await_tagged("Z").await;
    Ok(())
}

pub async fn connect_and_login(
    backend: &Backend,
    req: &LoginRequest<'_>,
) -> Result<BackendSession, BackendError> {
    open(backend, &backend.address, req, |tcp| async move {
        let (conn, caps) = start(backend, tcp).await?;
        login(conn, caps, req).await
    })
    .await
}

/// What every protocol's backend login starts with: connect to `address`
/// within `connect_timeout`, then, within `login_timeout`, a PROXY v2
/// header where the backend wants one and the protocol's `login` on the
/// connection.
pub(crate) async fn open<F, Fut>(
    backend: &Backend,
    address: &str,
    req: &LoginRequest<'_>,
    login: F,
) -> Result<BackendSession, BackendError>
where
    F: FnOnce(TcpStream) -> Fut,
    Fut: std::future::Future<Output = Result<BackendSession, BackendError>>,
{
    let mut tcp = tokio::time::timeout(req.connect_timeout, connect(address))
        .await
        .map_err(|_| BackendError::Timeout("connecting"))??;
    let session = async {
        if backend.proxy_protocol {
            // Before the greeting: the backend reads it first. The client's
            // address, never what the client claimed in its own ID.
            let header = proxy_protocol::v2_header(req.client.map(|c| (c.peer, c.local)));
            tcp.write_all(&header).await?;
        }
        login(tcp).await
    };
    tokio::time::timeout(req.login_timeout, session)
        .await
        .map_err(|_| BackendError::Timeout("logging in"))?
}

/// Brings a fresh connection to the point of login: TLS as configured and
/// the greeting. Returns the capabilities to log in with.
///
/// With STARTTLS the backend must offer it and accept it before anything
/// else is sent; bytes it sent after its OK arrived in plaintext and are
/// dropped unread, and the capabilities are asked for again over TLS.
async fn start(backend: &Backend, tcp: TcpStream) -> Result<(Conn, Capabilities), BackendError> {
    let tls = backend.tls.load_full();
    let Some(tls) = tls.as_deref() else {
        let mut conn = Conn::new(BackendStream::Plain(tcp));
        let caps = greet(&mut conn).await?;
        return Ok((conn, caps));
    };
    let tcp = match tls.mode {
        BackendTlsMode::Starttls => {
            let mut conn = Conn::new(BackendStream::Plain(tcp));
            let caps = greet(&mut conn).await?;
            if !caps.has("STARTTLS") {
                return Err(BackendError::Tls(
                    "backend does not offer STARTTLS; nothing sent".into(),
                ));
            }
            conn.send(b"S STARTTLS\r\n").await?;
            if let Err(e) = conn.await_tagged("S").await {
                return Err(BackendError::Tls(format!("STARTTLS refused: {e}")));
            }
            // What the backend sent after its OK came in plaintext: dropped.
            conn.into_plain()
        }
        _ => tcp,
    };
    let mut conn = tls_handshake(tls, tcp).await?;
    let caps = if tls.mode == BackendTlsMode::Starttls {
        conn.send(b"P0 CAPABILITY\r\n").await?;
        conn.await_tagged("P0").await?.capabilities
    } else {
        greet(&mut conn).await?
    };
    Ok((conn, caps))
}

pub(crate) async fn connect(address: &str) -> Result<TcpStream, BackendError> {
    let failed = |reason: String| BackendError::Connect {
        address: address.to_owned(),
        reason,
    };
    let addrs = tokio::net::lookup_host(address)
        .await
        .map_err(|e| failed(format!("cannot resolve: {e}")))?;
    let mut last = failed("no addresses".into());
    for addr in addrs {
        match TcpStream::connect(addr).await {
            Ok(s) => {
                s.set_nodelay(true)?;
                return Ok(s);
            }
            Err(e) => last = failed(e.to_string()),
        }
    }
    Err(last)
}

async fn login(
    mut conn: Conn,
    caps: Capabilities,
    req: &LoginRequest<'_>,
) -> Result<BackendSession, BackendError> {
    // One write carries ID and the login, so the backend costs one round
    // trip. ID only where the backend has it (RFC 2971).
    let send_id = req.client.filter(|_| req.send_id && caps.has("ID"));
    let mut out = Vec::with_capacity(256);
    if let Some(addrs) = send_id {
        out.extend_from_slice(b"P1 ID (");
        let fields = [
            (
                "x-originating-ip",
                addrs.peer.ip().to_canonical().to_string(),
            ),
            ("x-originating-port", addrs.peer.port().to_string()),
            (
                "x-connected-ip",
                addrs.local.ip().to_canonical().to_string(),
            ),
            ("x-connected-port", addrs.local.port().to_string()),
            ("x-session-id", req.session_id.to_owned()),
        ];
        for (i, (k, v)) in fields.iter().enumerate() {
            if i > 0 {
                out.push(b' ');
            }
            push_string(&mut out, k.as_bytes(), false);
            out.push(b' ');
            push_string(&mut out, v.as_bytes(), false);
        }
        out.extend_from_slice(b")\r\n");
    }
    // The login: the first segment goes with ID; each later one waits for a
    // `+` continuation. Segments hold the password, so they are secrets.
    let mut segments: Vec<Secret> = Vec::new();
    // Who authenticates, for whom, with which password.
    let ids = req.identities()?;
    let (authzid, authcid, password) = (ids.authzid, &*ids.authcid, ids.password);
    if caps.has("AUTH=PLAIN") {
        let ir = sasl::encode_plain(authzid, authcid, password.expose());
        if caps.has("SASL-IR") {
            out.extend_from_slice(b"P2 AUTHENTICATE PLAIN ");
            out.extend_from_slice(ir.expose());
            out.extend_from_slice(b"\r\n");
            segments.push(Secret::new(out));
        } else {
            out.extend_from_slice(b"P2 AUTHENTICATE PLAIN\r\n");
            segments.push(Secret::new(out));
            let mut line = ir.expose().to_vec();
            line.extend_from_slice(b"\r\n");
            segments.push(Secret::new(line));
        }
    } else if !authzid.is_empty() {
        return Err(BackendError::Unsuitable(
            "backend offers no AUTH=PLAIN for a master login with an authorization identity \
             (use master_user.form: separator)"
                .into(),
        ));
    } else if !caps.has("LOGINDISABLED") {
        // RFC 7888: LITERAL- allows non-synchronizing literals up to 4096 bytes.
        let literal_plus = caps.has("LITERAL+");
        let literal_minus = caps.has("LITERAL-");
        let mut current = out;
        current.extend_from_slice(b"P2 LOGIN ");
        for (i, value) in [authcid, password.expose()].into_iter().enumerate() {
            if i == 1 {
                current.push(b' ');
            }
            let non_sync = literal_plus || (literal_minus && value.len() <= 4096);
            if push_string(&mut current, value, non_sync) {
                segments.push(Secret::new(std::mem::take(&mut current)));
                current.extend_from_slice(value);
            }
        }
        current.extend_from_slice(b"\r\n");
        segments.push(Secret::new(current));
    } else {
        return Err(BackendError::Protocol(
            "backend offers neither AUTH=PLAIN nor LOGIN (LOGINDISABLED)".into(),
        ));
    }
    let mut segments = segments.into_iter();
    let first = segments.next().expect("at least one segment");
    conn.send(first.expose()).await?;
    drop(first);

    if send_id.is_some() {
        // A refused ID costs only the forwarded address, not the login.
        match conn.await_tagged("P1").await {
            Ok(_) => {}
            Err(BackendError::Protocol(reason)) => tracing::debug!(reason, "backend refused ID"),
            Err(e) => return Err(e),
        }
    }
    let mut post_login = None;
    let done = loop {
        let line = conn.read_response().await?;
        if line.starts_with('+') {
            let Some(next) = segments.next() else {
                return Err(BackendError::Protocol(
                    "unexpected continuation during login".into(),
                ));
            };
            conn.send(next.expose()).await?;
            continue;
        }
        if let Some(rest) = line.strip_prefix("* ") {
            if let Some(c) = rest.strip_prefix("CAPABILITY ") {
                post_login = Some(Capabilities::parse(c));
            }
            continue;
        }
        if let Some(rest) = line.strip_prefix("P2 ") {
            break rest.to_owned();
        }
        return Err(BackendError::Protocol(format!(
            "unexpected line: {}",
            clip(&line)
        )));
    };
    if !starts_with_word(&done, "OK") {
        return Err(BackendError::Rejected(clip(&done)));
    }
    let capabilities = match capability_code(&done).or(post_login) {
        Some(c) => c,
        None => {
            conn.send(b"P3 CAPABILITY\r\n").await?;
            conn.await_tagged("P3").await?.capabilities
        }
    };
    Ok(BackendSession {
        stream: conn.stream,
        capabilities,
        pending: conn.buf,
        answer: None,
    })
}

/// Reads the greeting (refusing `PREAUTH`, `BYE` and anything else that
/// is not `* OK`) and returns the backend's pre-login capabilities.
async fn greet(conn: &mut Conn) -> Result<Capabilities, BackendError> {
    let greeting = conn.read_response().await?;
    let mut caps = judge_greeting(&greeting)?;
    if caps.is_empty() {
        conn.send(b"P0 CAPABILITY\r\n").await?;
        caps = conn.await_tagged("P0").await?.capabilities;
    }
    Ok(caps)
}

/// A greeting line's verdict: `* OK` with its capabilities (empty when it
/// names none), or why the backend is refused.
pub fn judge_greeting(greeting: &str) -> Result<Capabilities, BackendError> {
    match greeting.strip_prefix("* ") {
        Some(rest) if starts_with_word(rest, "OK") => Ok(capability_code(rest).unwrap_or_default()),
        Some(rest) if starts_with_word(rest, "PREAUTH") => Err(BackendError::Greeting(
            "PREAUTH: the backend logged us in as somebody already".into(),
        )),
        Some(rest) if starts_with_word(rest, "BYE") => Err(BackendError::Greeting(clip(greeting))),
        _ => Err(BackendError::Greeting(format!(
            "not an IMAP greeting: {}",
            clip(greeting)
        ))),
    }
}

fn starts_with_word(text: &str, word: &str) -> bool {
    // Bytes, not str slicing: network text may hold multi-byte characters
    // where a byte offset would split one.
    let (t, w) = (text.as_bytes(), word.as_bytes());
    t.get(..w.len()).is_some_and(|p| p.eq_ignore_ascii_case(w))
        && matches!(t.get(w.len()), None | Some(b' '))
}

/// `[CAPABILITY …]` at the start of a status response's text.
fn capability_code(status: &str) -> Option<Capabilities> {
    let after = status.split_once(' ')?.1;
    let code = after.strip_prefix('[')?;
    let end = code.find(']')?;
    let code = &code[..end];
    let (name, list) = code.split_once(' ')?;
    name.eq_ignore_ascii_case("CAPABILITY")
        .then(|| Capabilities::parse(list))
}

/// A response line, shortened and made printable for logs and errors.
fn clip(line: &str) -> String {
    crate::imap::printable(line, 200)
}

struct Tagged {
    capabilities: Capabilities,
}

/// A backend connection being logged in: the stream and what was read
/// from it but not yet taken.
pub(crate) struct Conn {
    pub(crate) stream: BackendStream,
    pub(crate) buf: Vec<u8>,
}

/// The TLS handshake with a backend, verified as configured.
pub(crate) async fn tls_handshake(tls: &BackendTls, tcp: TcpStream) -> Result<Conn, BackendError> {
    let stream = tls
        .connector
        .connect(tls.server_name.clone(), tcp)
        .await
        .map_err(|e| BackendError::Tls(format!("handshake failed: {e}")))?;
    Ok(Conn::new(BackendStream::Tls(Box::new(stream))))
}

impl Conn {
    /// The TCP connection under a plaintext one, for STARTTLS (anything
    /// read and not taken is dropped).
    pub(crate) fn into_plain(self) -> TcpStream {
        match self.stream {
            BackendStream::Plain(tcp) => tcp,
            BackendStream::Tls(_) => unreachable!("a plain connection before STARTTLS"),
        }
    }

    pub(crate) fn new(stream: BackendStream) -> Conn {
        Conn {
            stream,
            buf: Vec::with_capacity(1024),
        }
    }

    pub(crate) async fn send(&mut self, bytes: &[u8]) -> Result<(), BackendError> {
        self.stream.write_all(bytes).await?;
        Ok(())
    }

    /// Reads responses up to the tagged one for `tag`, keeping any
    /// CAPABILITY seen on the way; a tagged NO/BAD is an error.
    async fn await_tagged(&mut self, tag: &str) -> Result<Tagged, BackendError> {
        let mut caps = Capabilities::default();
        loop {
            let line = self.read_response().await?;
            if let Some(rest) = line.strip_prefix("* ") {
                if let Some(c) = rest.strip_prefix("CAPABILITY ") {
                    caps = Capabilities::parse(c);
                }
                continue;
            }
            let Some(status) = line.strip_prefix(tag).and_then(|r| r.strip_prefix(' ')) else {
                return Err(BackendError::Protocol(format!(
                    "unexpected line: {}",
                    clip(&line)
                )));
            };
            if !starts_with_word(status, "OK") {
                return Err(BackendError::Protocol(format!(
                    "{tag} failed: {}",
                    clip(status)
                )));
            }
            if let Some(c) = capability_code(status) {
                caps = c;
            }
            return Ok(Tagged { capabilities: caps });
        }
    }

    /// One response, its literals skipped over (an untagged `* ID` may carry
    /// them); bounded by [`MAX_RESPONSE`].
    async fn read_response(&mut self) -> Result<String, BackendError> {
        let mut text = Vec::new();
        loop {
            let line = self.read_line().await?;
            let marker = crate::imap::framing::literal_marker(&line);
            text.extend_from_slice(&line);
            let Some(m) = marker else { break };
            if m.size > MAX_RESPONSE as u64 || text.len() + m.size as usize > MAX_RESPONSE {
                return Err(BackendError::Protocol("response literal too large".into()));
            }
            let size = m.size as usize;
            while self.buf.len() < size {
                self.fill().await?;
            }
            self.buf.drain(..size);
        }
        Ok(String::from_utf8_lossy(&text).into_owned())
    }

    pub(crate) async fn read_line(&mut self) -> Result<Vec<u8>, BackendError> {
        let mut searched = 0;
        loop {
            if let Some(at) = self.buf[searched..].iter().position(|&b| b == b'\n') {
                let mut line: Vec<u8> = self.buf.drain(..=searched + at).collect();
                line.pop();
                if line.last() == Some(&b'\r') {
                    line.pop();
                }
                return Ok(line);
            }
            searched = self.buf.len();
            if searched > MAX_RESPONSE {
                return Err(BackendError::Protocol("response line too long".into()));
            }
            self.fill().await?;
        }
    }

    async fn fill(&mut self) -> Result<(), BackendError> {
        let mut chunk = [0u8; 4096];
        let n = self.stream.read(&mut chunk).await?;
        if n == 0 {
            return Err(BackendError::Protocol(
                "backend closed the connection".into(),
            ));
        }
        self.buf.extend_from_slice(&chunk[..n]);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capability_codes() {
        let caps =
            capability_code("OK [CAPABILITY IMAP4rev1 SASL-IR AUTH=PLAIN] Dovecot ready.").unwrap();
        assert!(caps.has("SASL-IR"));
        assert!(capability_code("OK Logged in").is_none());
        assert!(capability_code("OK [ALERT] hi").is_none());
        assert!(capability_code("OK [Capability IMAP4rev1 IDLE] hi")
            .unwrap()
            .has("IDLE"));
    }

    #[test]
    fn words() {
        assert!(starts_with_word("OK done", "OK"));
        assert!(starts_with_word("ok", "OK"));
        assert!(!starts_with_word("OKAY", "OK"));
        assert!(
            !starts_with_word("O\u{FFFD} ready", "OK"),
            "no panic on a split character"
        );
        assert!(!starts_with_word("", "OK"));
    }
}
