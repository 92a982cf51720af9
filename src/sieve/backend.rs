//! Connecting and logging in to a backend ManageSieve server for a user
//! (Dovecot's Pigeonhole).
//!
//! Sequence: TCP connect to the backend's `sieve_port` (bounded by
//! `connect_timeout`), then within `login_timeout`: a PROXY protocol v2
//! header if the backend wants one, TLS (implicit, or STARTTLS that must be
//! listed and accepted before anything else is sent; the capabilities are
//! read again after it), the client's address in `XCLIENT ADDR= PORT=`
//! where the backend lists `XCLIENT` (Pigeonhole does, to
//! `login_trusted_networks`), then `AUTHENTICATE "PLAIN"` with an initial
//! response, with the user's password or as the master user. The backend's
//! `OK` to the login is passed on to the client as it said it; the
//! language capabilities it listed (`SIEVE`, `NOTIFY`, `MAXREDIRECTS`)
//! are what the pre-auth front tells later clients.

use std::sync::RwLock;

use crate::backend::{
    open, tls_handshake, BackendError, BackendSession, BackendStream, Conn, LoginRequest,
};
use crate::config::{BackendTlsMode, Protocol};
use crate::imap::{sasl, Capabilities, Secret};
use crate::route::Backend;

use super::{line_tokens, quoted, Token};

/// Most lines of a capability list read; a longer one is a broken backend.
const MAX_CAPABILITY_LINES: usize = 64;

/// The capabilities that describe the script language, not the session.
pub const LANGUAGE: [&str; 3] = ["SIEVE", "NOTIFY", "MAXREDIRECTS"];

/// The language capabilities a backend listed last.
static SEEN_LANGUAGE: RwLock<Option<Vec<(String, String)>>> = RwLock::new(None);

/// The language capabilities (name, value) the backends listed last, if
/// any has been seen.
pub fn seen_language() -> Option<Vec<(String, String)>> {
    SEEN_LANGUAGE
        .read()
        .unwrap_or_else(|e| e.into_inner())
        .clone()
}

pub async fn connect_and_login(
    backend: &Backend,
    req: &LoginRequest<'_>,
) -> Result<BackendSession, BackendError> {
    let Some(address) = backend.address_for(Protocol::Managesieve) else {
        return Err(BackendError::Unsuitable("backend has no sieve_port".into()));
    };
    open(backend, &address, req, |tcp| async move {
        let (conn, caps) = start(backend, tcp).await?;
        login(conn, caps, req).await
    })
    .await
}

/// A response's last line: `OK`, `NO` or `BYE`, and its whole text.
struct Status {
    word: String,
    line: String,
}

/// Capability lines (`"NAME" ["value"]`) up to the status line ending them.
struct Listed {
    capabilities: Vec<(String, String)>,
    status: Status,
}

impl Listed {
    fn has(&self, name: &str) -> bool {
        self.capabilities
            .iter()
            .any(|(n, _)| n.eq_ignore_ascii_case(name))
    }

    fn get(&self, name: &str) -> Option<&str> {
        self.capabilities
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// Reads lines up to a status line; the lines before it are capabilities.
async fn listed(conn: &mut Conn) -> Result<Listed, BackendError> {
    let mut capabilities = Vec::new();
    loop {
        let line = conn.read_line().await?;
        let mut words = Vec::new();
        if line.first() == Some(&b'"') {
            line_tokens(&line, &mut words).map_err(|e| {
                BackendError::Protocol(format!(
                    "{}: {}",
                    e.0,
                    clip(&String::from_utf8_lossy(&line))
                ))
            })?;
        } else {
            // A status line: only its first word matters here.
            let end = line.iter().position(|&b| b == b' ').unwrap_or(line.len());
            let word = String::from_utf8_lossy(&line[..end]).to_ascii_uppercase();
            words.push(Token::Atom(word));
        }
        match words.first() {
            Some(Token::Atom(word)) if matches!(word.as_str(), "OK" | "NO" | "BYE") => {
                return Ok(Listed {
                    capabilities,
                    status: Status {
                        word: word.clone(),
                        line: String::from_utf8_lossy(&line).into_owned(),
                    },
                });
            }
            Some(Token::Str(name)) => {
                if capabilities.len() == MAX_CAPABILITY_LINES {
                    return Err(BackendError::Protocol("capability list too long".into()));
                }
                let value = match words.get(1) {
                    Some(Token::Str(v)) => String::from_utf8_lossy(v).into_owned(),
                    _ => String::new(),
                };
                capabilities.push((String::from_utf8_lossy(name).into_owned(), value));
            }
            _ => {
                return Err(BackendError::Protocol(format!(
                    "not a ManageSieve response: {}",
                    clip(&String::from_utf8_lossy(&line))
                )))
            }
        }
    }
}

/// The greeting must end in `OK`.
async fn greet(conn: &mut Conn) -> Result<Listed, BackendError> {
    let greeting = listed(conn).await.map_err(|e| match e {
        BackendError::Protocol(why) => BackendError::Greeting(format!("no greeting: {why}")),
        BackendError::Io(e) => BackendError::Greeting(format!("no greeting: {e}")),
        e => e,
    })?;
    if greeting.status.word != "OK" {
        return Err(BackendError::Greeting(clip(&greeting.status.line)));
    }
    Ok(greeting)
}

async fn start(
    backend: &Backend,
    tcp: tokio::net::TcpStream,
) -> Result<(Conn, Listed), BackendError> {
    let tls = backend.tls.load_full();
    let Some(tls) = tls.as_deref() else {
        let mut conn = Conn::new(BackendStream::Plain(tcp));
        let caps = greet(&mut conn).await?;
        return Ok((conn, caps));
    };
    let tcp = match tls.mode {
        BackendTlsMode::Starttls => {
            let mut conn = Conn::new(BackendStream::Plain(tcp));
            if !greet(&mut conn).await?.has("STARTTLS") {
                return Err(BackendError::Tls(
                    "backend does not offer STARTTLS; nothing sent".into(),
                ));
            }
            conn.send(b"STARTTLS\r\n").await?;
            let answer = listed(&mut conn).await?;
            if answer.status.word != "OK" {
                return Err(BackendError::Tls(format!(
                    "STARTTLS refused: {}",
                    clip(&answer.status.line)
                )));
            }
            conn.into_plain()
        }
        _ => tcp,
    };
    let mut conn = tls_handshake(tls, tcp).await?;
    // After STARTTLS the capabilities come again, unasked (RFC 5804 2.2).
    let caps = greet(&mut conn).await?;
    Ok((conn, caps))
}

async fn login(
    mut conn: Conn,
    caps: Listed,
    req: &LoginRequest<'_>,
) -> Result<BackendSession, BackendError> {
    if caps.has("SIEVE") {
        let language: Vec<(String, String)> = caps
            .capabilities
            .iter()
            .filter(|(n, _)| LANGUAGE.iter().any(|l| n.eq_ignore_ascii_case(l)))
            .map(|(n, v)| (n.to_ascii_uppercase(), v.clone()))
            .collect();
        let mut seen = SEEN_LANGUAGE.write().unwrap_or_else(|e| e.into_inner());
        if seen.as_ref() != Some(&language) {
            *seen = Some(language);
        }
    }
    if let Some(addrs) = req.client.filter(|_| req.send_id && caps.has("XCLIENT")) {
        let line = format!(
            "XCLIENT ADDR={} PORT={}\r\n",
            addrs.peer.ip().to_canonical(),
            addrs.peer.port()
        );
        conn.send(line.as_bytes()).await?;
        let answer = listed(&mut conn).await?;
        if answer.status.word != "OK" {
            tracing::debug!(
                reason = clip(&answer.status.line),
                "backend refused XCLIENT"
            );
        }
    }
    let plain = caps
        .get("SASL")
        .is_some_and(|m| m.split(' ').any(|m| m.eq_ignore_ascii_case("PLAIN")));
    if !plain {
        // The backend's set-up, not the user's: a protocol error.
        return Err(BackendError::Protocol(
            "backend offers no SASL PLAIN; nothing sent".into(),
        ));
    }
    let ids = req.identities()?;
    let ir = sasl::encode_plain(ids.authzid, &ids.authcid, ids.password.expose());
    let mut out = b"AUTHENTICATE \"PLAIN\" \"".to_vec();
    out.extend_from_slice(ir.expose());
    out.extend_from_slice(b"\"\r\n");
    let out = Secret::new(out);
    conn.send(out.expose()).await?;
    drop(out);
    let answer = listed(&mut conn).await?;
    if !answer.capabilities.is_empty() {
        return Err(BackendError::Protocol(
            "a challenge to an initial response".into(),
        ));
    }
    match answer.status.word.as_str() {
        "OK" => {}
        "NO" if answer
            .status
            .line
            .to_ascii_uppercase()
            .contains("(TRYLATER") =>
        {
            return Err(BackendError::Unavailable(clip(&answer.status.line)))
        }
        "NO" => return Err(BackendError::Rejected(clip(&answer.status.line))),
        _ => return Err(BackendError::Protocol(clip(&answer.status.line))),
    }
    let mut said = crate::imap::printable(&answer.status.line, 500).into_bytes();
    if said.len() <= 2 {
        said = format!("OK {}", quoted("Logged in.")).into_bytes();
    }
    said.extend_from_slice(b"\r\n");
    Ok(BackendSession {
        stream: conn.stream,
        capabilities: Capabilities::default(),
        pending: conn.buf,
        answer: Some(said),
    })
}

fn clip(line: &str) -> String {
    crate::imap::printable(line, 200)
}
