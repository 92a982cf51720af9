//! Connecting and logging in to a backend POP3 server for a user.
//!
//! Sequence: TCP connect to the backend's `pop3_port` (bounded by
//! `connect_timeout`), then within `login_timeout`: a PROXY protocol v2
//! header if the backend wants one, TLS (implicit, or STLS that must be
//! offered in CAPA and accepted before anything else is sent), the greeting
//! (`+OK` required), `CAPA`, the client's address in `XCLIENT ADDR= PORT=`
//! where the backend advertises XCLIENT in CAPA or its greeting (Dovecot's
//! pop3-login greets with `+OK [XCLIENT]` on `login_trusted_networks`), then `AUTH PLAIN` with an initial response
//! (one write) where SASL PLAIN is offered, else `USER`/`PASS`, with the
//! user's password or as the master user.
//!
//! Answers are read by their RFC 3206 codes: `[IN-USE]` (the maildrop is
//! locked) is told to the client as the backend said it; `[SYS/TEMP]` lets
//! the pipeline try the next backend; any other `-ERR` to the login is a
//! refusal. Bytes after the backend's `+OK` to the login belong to the
//! client and are handed to the relay.

use crate::backend::{
    open, tls_handshake, BackendError, BackendSession, BackendStream, Conn, LoginRequest,
};
use crate::config::BackendTlsMode;
use crate::imap::{sasl, Capabilities, Secret};
use crate::route::Backend;

/// Most lines of a CAPA answer read; a longer list is a broken backend.
const MAX_CAPA_LINES: usize = 64;

pub async fn connect_and_login(
    backend: &Backend,
    req: &LoginRequest<'_>,
) -> Result<BackendSession, BackendError> {
    let Some(address) = backend.address_for(crate::config::Protocol::Pop3) else {
        return Err(BackendError::Unsuitable("backend has no pop3_port".into()));
    };
    open(backend, &address, req, |tcp| async move {
        let (conn, caps) = start(backend, tcp).await?;
        login(conn, caps, req).await
    })
    .await
}

/// The capabilities a POP3 server listed in CAPA (RFC 2449), by keyword.
#[derive(Default)]
struct Capa(Vec<String>);

impl Capa {
    fn has(&self, keyword: &str) -> bool {
        self.0.iter().any(|l| {
            l.split(' ')
                .next()
                .is_some_and(|k| k.eq_ignore_ascii_case(keyword))
        })
    }

    /// Adds `XCLIENT` when the greeting announced it.
    fn with_xclient(mut self, announced: bool) -> Capa {
        if announced && !self.has("XCLIENT") {
            self.0.push("XCLIENT".into());
        }
        self
    }

    /// Whether `SASL` lists `mechanism`.
    fn sasl(&self, mechanism: &str) -> bool {
        self.0.iter().any(|l| {
            let mut words = l.split(' ');
            words.next().is_some_and(|k| k.eq_ignore_ascii_case("SASL"))
                && words.any(|m| m.eq_ignore_ascii_case(mechanism))
        })
    }
}

/// TLS as configured and the greeting; returns the capabilities to log in
/// with. With STLS the backend must offer it and accept it before anything
/// else is sent; bytes after its `+OK` came in plaintext and are dropped.
async fn start(
    backend: &Backend,
    tcp: tokio::net::TcpStream,
) -> Result<(Conn, Capa), BackendError> {
    let tls = backend.tls.load_full();
    let Some(tls) = tls.as_deref() else {
        let mut conn = Conn::new(BackendStream::Plain(tcp));
        let xclient = greet(&mut conn).await?;
        let caps = capa(&mut conn).await?.with_xclient(xclient);
        return Ok((conn, caps));
    };
    let mut xclient = false;
    let tcp = match tls.mode {
        BackendTlsMode::Starttls => {
            let mut conn = Conn::new(BackendStream::Plain(tcp));
            xclient = greet(&mut conn).await?;
            if !capa(&mut conn).await?.has("STLS") {
                return Err(BackendError::Tls(
                    "backend does not offer STLS; nothing sent".into(),
                ));
            }
            conn.send(b"STLS\r\n").await?;
            let answer = status(&mut conn).await?;
            if !answer.ok {
                return Err(BackendError::Tls(format!("STLS refused: {}", answer.text)));
            }
            // What the backend sent after its +OK came in plaintext: dropped.
            conn.into_plain()
        }
        _ => tcp,
    };
    let mut conn = tls_handshake(tls, tcp).await?;
    if tls.mode != BackendTlsMode::Starttls {
        xclient = greet(&mut conn).await?;
    }
    let caps = capa(&mut conn).await?.with_xclient(xclient);
    Ok((conn, caps))
}

/// A status line: `+OK` or `-ERR`, and the text after it.
struct Status {
    ok: bool,
    text: String,
}

async fn status(conn: &mut Conn) -> Result<Status, BackendError> {
    let line = conn.read_line().await?;
    let line = String::from_utf8_lossy(&line);
    parse_status(&line)
        .ok_or_else(|| BackendError::Protocol(format!("not a POP3 status line: {}", clip(&line))))
}

fn parse_status(line: &str) -> Option<Status> {
    let (word, text) = line.split_once(' ').unwrap_or((line, ""));
    let ok = if word.eq_ignore_ascii_case("+OK") {
        true
    } else if word.eq_ignore_ascii_case("-ERR") {
        false
    } else {
        return None;
    };
    Some(Status {
        ok,
        text: text.to_owned(),
    })
}

/// The greeting must be `+OK`. Whether it announces `[XCLIENT]`: Dovecot
/// says so there, for trusted networks, and not in CAPA.
async fn greet(conn: &mut Conn) -> Result<bool, BackendError> {
    // A backend that closes before greeting had nothing yet: like a bad
    // greeting, the login may go to the next backend.
    let line = conn.read_line().await.map_err(|e| match e {
        BackendError::Protocol(why) | BackendError::Greeting(why) => {
            BackendError::Greeting(format!("no greeting: {why}"))
        }
        BackendError::Io(e) => BackendError::Greeting(format!("no greeting: {e}")),
        e => e,
    })?;
    let line = String::from_utf8_lossy(&line);
    match parse_status(&line) {
        Some(Status { ok: true, text }) => Ok(text
            .get(..9)
            .is_some_and(|c| c.eq_ignore_ascii_case("[XCLIENT]"))),
        Some(Status { ok: false, .. }) => Err(BackendError::Greeting(clip(&line))),
        None => Err(BackendError::Greeting(format!(
            "not a POP3 greeting: {}",
            clip(&line)
        ))),
    }
}

/// `CAPA`; a server without it (`-ERR`) has none.
async fn capa(conn: &mut Conn) -> Result<Capa, BackendError> {
    conn.send(b"CAPA\r\n").await?;
    if !status(conn).await?.ok {
        return Ok(Capa::default());
    }
    let mut lines = Vec::new();
    loop {
        let line = conn.read_line().await?;
        if line == b"." {
            return Ok(Capa(lines));
        }
        if lines.len() == MAX_CAPA_LINES {
            return Err(BackendError::Protocol("CAPA list too long".into()));
        }
        let line = line.strip_prefix(b".").unwrap_or(&line);
        lines.push(String::from_utf8_lossy(line).into_owned());
    }
}

async fn login(
    mut conn: Conn,
    caps: Capa,
    req: &LoginRequest<'_>,
) -> Result<BackendSession, BackendError> {
    let pipelining = caps.has("PIPELINING");
    let ids = req.identities()?;
    let (authzid, authcid, password) = (ids.authzid, &*ids.authcid, ids.password);
    let plain = caps.sasl("PLAIN");
    // On a command line a CR or LF would end the line and start another
    // command: such a password goes only inside AUTH PLAIN's base64.
    if !plain
        && password
            .expose()
            .iter()
            .any(|b| matches!(b, b'\r' | b'\n' | 0))
    {
        return Err(BackendError::Unsuitable(
            "the password holds CR, LF or NUL and the backend offers no SASL PLAIN".into(),
        ));
    }
    if !plain && !authzid.is_empty() {
        return Err(BackendError::Unsuitable(
            "backend offers no SASL PLAIN for a master login with an authorization identity \
             (use master_user.form: separator)"
                .into(),
        ));
    }
    // Written together where the backend pipelines, so the login costs one
    // round trip; the answers are read in order. The bytes hold the
    // password: kept as a secret.
    let mut out = Vec::with_capacity(256);
    let mut xclient_sent = false;
    if let Some(addrs) = req.client.filter(|_| req.send_id && caps.has("XCLIENT")) {
        let line = format!(
            "XCLIENT ADDR={} PORT={}\r\n",
            addrs.peer.ip().to_canonical(),
            addrs.peer.port()
        );
        if pipelining {
            out.extend_from_slice(line.as_bytes());
            xclient_sent = true;
        } else {
            conn.send(line.as_bytes()).await?;
            forwarded(&mut conn).await?;
        }
    }
    if plain {
        let ir = sasl::encode_plain(authzid, authcid, password.expose());
        out.extend_from_slice(b"AUTH PLAIN ");
        out.extend_from_slice(ir.expose());
        out.extend_from_slice(b"\r\n");
    } else {
        out.extend_from_slice(b"USER ");
        out.extend_from_slice(authcid);
        out.extend_from_slice(b"\r\n");
        if pipelining {
            out.extend_from_slice(b"PASS ");
            out.extend_from_slice(password.expose());
            out.extend_from_slice(b"\r\n");
        }
    }
    let out = Secret::new(out);
    conn.send(out.expose()).await?;
    drop(out);
    if xclient_sent {
        forwarded(&mut conn).await?;
    }
    let answer = if plain {
        status(&mut conn).await?
    } else {
        let user = status(&mut conn).await?;
        if !pipelining && user.ok {
            let mut pass = b"PASS ".to_vec();
            pass.extend_from_slice(password.expose());
            pass.extend_from_slice(b"\r\n");
            let pass = Secret::new(pass);
            conn.send(pass.expose()).await?;
        }
        if !user.ok {
            if pipelining {
                // The pipelined PASS is answered too; read it away.
                let _ = status(&mut conn).await;
            }
            return Err(judge(user));
        }
        status(&mut conn).await?
    };
    if !answer.ok {
        return Err(judge(answer));
    }
    Ok(BackendSession {
        stream: conn.stream,
        capabilities: Capabilities::default(),
        pending: conn.buf,
        answer: None,
    })
}

/// The answer to XCLIENT: a refusal costs only the forwarded address.
async fn forwarded(conn: &mut Conn) -> Result<(), BackendError> {
    let answer = status(conn).await?;
    if !answer.ok {
        tracing::debug!(reason = clip(&answer.text), "backend refused XCLIENT");
    }
    Ok(())
}

/// A `-ERR` to the login, by its RFC 3206 code.
fn judge(answer: Status) -> BackendError {
    let code = answer
        .text
        .strip_prefix('[')
        .and_then(|t| t.split_once(']'))
        .map(|(code, _)| code.to_ascii_uppercase());
    match code.as_deref() {
        Some("IN-USE") => BackendError::InUse(clip(&answer.text)),
        Some("SYS/TEMP") => BackendError::Unavailable(clip(&answer.text)),
        _ => BackendError::Rejected(clip(&answer.text)),
    }
}

fn clip(line: &str) -> String {
    crate::imap::printable(line, 200)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capabilities_by_keyword_and_mechanism() {
        let caps = Capa(vec![
            "TOP".into(),
            "SASL PLAIN LOGIN".into(),
            "XCLIENT".into(),
            "PIPELINING".into(),
        ]);
        assert!(caps.has("xclient") && caps.has("PIPELINING") && !caps.has("STLS"));
        assert!(caps.sasl("PLAIN") && caps.sasl("login") && !caps.sasl("CRAM-MD5"));
        assert!(!Capa::default().sasl("PLAIN"));
    }

    #[test]
    fn login_refusals_by_response_code() {
        let err = |text: &str| {
            judge(Status {
                ok: false,
                text: text.into(),
            })
        };
        assert!(matches!(
            err("[IN-USE] Mailbox is locked"),
            BackendError::InUse(_)
        ));
        assert!(matches!(
            err("[SYS/TEMP] Try later"),
            BackendError::Unavailable(_)
        ));
        assert!(matches!(
            err("[AUTH] Authentication failed."),
            BackendError::Rejected(_)
        ));
        assert!(matches!(
            err("Authentication failed."),
            BackendError::Rejected(_)
        ));
    }

    #[test]
    fn status_lines() {
        assert!(parse_status("+OK Dovecot ready.").unwrap().ok);
        assert!(parse_status("+ok").unwrap().ok);
        assert!(!parse_status("-ERR [IN-USE] locked").unwrap().ok);
        assert!(parse_status("* OK IMAP").is_none());
        assert!(parse_status("").is_none());
    }
}
