//! Connecting and logging in to a backend submission server for a user
//! (Dovecot's submission service, or an MTA such as Postfix).
//!
//! Sequence: TCP connect to the user's backend's `submission_port` (or to
//! a configured relay's `address`), bounded by `connect_timeout`; then
//! within `login_timeout`: a PROXY protocol v2 header if the backend wants
//! one, TLS (implicit, or STARTTLS that must be offered in the EHLO answer
//! and accepted before anything else is sent, then `EHLO` again), the
//! `220` greeting, `EHLO`. Then the client is forwarded with Postfix's
//! `XCLIENT` (only the attributes the backend lists: `ADDR`, `PORT`,
//! `PROTO`, `HELO`, `LOGIN`, xtext-encoded, `IPV6:` before an IPv6
//! address), after whose `220` Postern says `EHLO` again. Where `LOGIN`
//! was accepted and the backend then asks for no `AUTH` (an MTA that takes
//! the edge's word, as Postfix with `smtpd_authorized_xclient_hosts` and
//! no SASL of its own) no password leaves the edge; where it still offers
//! `AUTH` (Dovecot's submission service, which takes `LOGIN=` for its log
//! only), `AUTH PLAIN` with an initial response, with the user's password
//! or as the master user (a `503` to it after `LOGIN=`: already logged
//! in). A backend that offers neither gets nothing (the client hears
//! `454`).
//!
//! Replies are read by their class: `4xx` is temporary (the pipeline may
//! try the next backend), `5xx` to the login a refusal.

use crate::backend::{
    open, tls_handshake, BackendError, BackendSession, BackendStream, Conn, LoginRequest,
};
use crate::config::{BackendTlsMode, Protocol};
use crate::imap::{sasl, Capabilities, Secret};
use crate::route::Backend;

/// Most lines of one reply read; a longer one is a broken backend.
const MAX_REPLY_LINES: usize = 64;

/// Where a submission login goes.
pub enum Target {
    /// The user's backend's `submission_port`.
    UserBackend,
    /// A relay from `submission.relays`: its own `address`.
    Relay,
}

pub async fn connect_and_login(
    backend: &Backend,
    req: &LoginRequest<'_>,
    target: Target,
    hostname: &str,
) -> Result<BackendSession, BackendError> {
    let address = match target {
        Target::Relay => backend.address.clone(),
        Target::UserBackend => backend
            .address_for(Protocol::Submission)
            .ok_or_else(|| BackendError::Unsuitable("backend has no submission_port".into()))?,
    };
    open(backend, &address, req, |tcp| async move {
        let (conn, ehlo) = start(backend, tcp, hostname).await?;
        login(conn, ehlo, req, hostname).await
    })
    .await
}

/// One reply: its code and its lines' texts.
struct Reply {
    code: u16,
    lines: Vec<String>,
}

impl Reply {
    fn class(&self) -> u16 {
        self.code / 100
    }

    fn text(&self) -> String {
        clip(&format!("{} {}", self.code, self.lines.join(" / ")))
    }
}

async fn reply(conn: &mut Conn) -> Result<Reply, BackendError> {
    let mut lines = Vec::new();
    loop {
        let line = conn.read_line().await?;
        let line = String::from_utf8_lossy(&line);
        let (code, more, text) = parse_line(&line)
            .ok_or_else(|| BackendError::Protocol(format!("not an SMTP reply: {}", clip(&line))))?;
        if lines.len() == MAX_REPLY_LINES {
            return Err(BackendError::Protocol("reply too long".into()));
        }
        lines.push(text.to_owned());
        if !more {
            return Ok(Reply { code, lines });
        }
    }
}

/// `ddd-text` (more lines follow) or `ddd text`.
fn parse_line(line: &str) -> Option<(u16, bool, &str)> {
    let code = line.get(..3)?;
    if !code.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let code = code.parse().ok()?;
    match line.as_bytes().get(3) {
        None => Some((code, false, "")),
        Some(b' ') => Some((code, false, &line[4..])),
        Some(b'-') => Some((code, true, &line[4..])),
        Some(_) => None,
    }
}

/// The extensions an EHLO answer lists (its lines after the first).
struct Extensions(Vec<String>);

impl Extensions {
    fn from_reply(reply: Reply) -> Extensions {
        Extensions(reply.lines.into_iter().skip(1).collect())
    }

    /// The parameters of `keyword`, when listed.
    fn get(&self, keyword: &str) -> Option<Vec<&str>> {
        self.0.iter().find_map(|l| {
            let mut words = l.split_ascii_whitespace();
            words
                .next()
                .is_some_and(|k| k.eq_ignore_ascii_case(keyword))
                .then(|| words.collect())
        })
    }

    fn has(&self, keyword: &str) -> bool {
        self.get(keyword).is_some()
    }
}

/// The greeting must be `220`; a `4xx` or `554` one is the backend saying
/// it cannot take the session (the login may go to the next backend).
async fn greet(conn: &mut Conn) -> Result<(), BackendError> {
    let greeting = reply(conn).await.map_err(|e| match e {
        BackendError::Protocol(why) => BackendError::Greeting(format!("no greeting: {why}")),
        BackendError::Io(e) => BackendError::Greeting(format!("no greeting: {e}")),
        e => e,
    })?;
    if greeting.code != 220 {
        return Err(BackendError::Greeting(greeting.text()));
    }
    Ok(())
}

async fn ehlo(conn: &mut Conn, hostname: &str) -> Result<Extensions, BackendError> {
    conn.send(format!("EHLO {hostname}\r\n").as_bytes()).await?;
    let answer = reply(conn).await?;
    if answer.code != 250 {
        return Err(BackendError::Protocol(format!(
            "EHLO refused: {}",
            answer.text()
        )));
    }
    Ok(Extensions::from_reply(answer))
}

/// TLS as configured, the greeting and `EHLO`. With STARTTLS the backend
/// must offer it and accept it before anything else is sent; bytes after
/// its `220` came in plaintext and are dropped.
async fn start(
    backend: &Backend,
    tcp: tokio::net::TcpStream,
    hostname: &str,
) -> Result<(Conn, Extensions), BackendError> {
    let tls = backend.tls.load_full();
    let Some(tls) = tls.as_deref() else {
        let mut conn = Conn::new(BackendStream::Plain(tcp));
        greet(&mut conn).await?;
        let ext = ehlo(&mut conn, hostname).await?;
        return Ok((conn, ext));
    };
    let tcp = match tls.mode {
        BackendTlsMode::Starttls => {
            let mut conn = Conn::new(BackendStream::Plain(tcp));
            greet(&mut conn).await?;
            if !ehlo(&mut conn, hostname).await?.has("STARTTLS") {
                return Err(BackendError::Tls(
                    "backend does not offer STARTTLS; nothing sent".into(),
                ));
            }
            conn.send(b"STARTTLS\r\n").await?;
            let answer = reply(&mut conn).await?;
            if answer.code != 220 {
                return Err(BackendError::Tls(format!(
                    "STARTTLS refused: {}",
                    answer.text()
                )));
            }
            conn.into_plain()
        }
        _ => tcp,
    };
    let mut conn = tls_handshake(tls, tcp).await?;
    if tls.mode != BackendTlsMode::Starttls {
        greet(&mut conn).await?;
    }
    let ext = ehlo(&mut conn, hostname).await?;
    Ok((conn, ext))
}

/// xtext (RFC 3461 4): `+XX` for `+`, `=`, and bytes outside `!`..`~`.
pub fn xtext(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for b in value.bytes() {
        if (b'!'..=b'~').contains(&b) && b != b'+' && b != b'=' {
            out.push(b as char);
        } else {
            out.push_str(&format!("+{b:02X}"));
        }
    }
    out
}

/// The `XCLIENT` command for the attributes the backend lists, and
/// whether it carries `LOGIN`.
fn xclient_line(attributes: &[&str], req: &LoginRequest<'_>) -> Option<(String, bool)> {
    let listed = |a: &str| attributes.iter().any(|x| x.eq_ignore_ascii_case(a));
    let mut line = String::from("XCLIENT");
    // The address only where the configuration forwards it; the login and
    // EHLO name always.
    if let Some(addrs) = req.client.filter(|_| req.send_id) {
        let ip = addrs.peer.ip().to_canonical();
        if listed("ADDR") {
            match ip {
                std::net::IpAddr::V4(v4) => line.push_str(&format!(" ADDR={v4}")),
                std::net::IpAddr::V6(v6) => line.push_str(&format!(" ADDR=IPV6:{v6}")),
            }
        }
        if listed("PORT") {
            line.push_str(&format!(" PORT={}", addrs.peer.port()));
        }
    }
    if listed("PROTO") {
        line.push_str(" PROTO=ESMTP");
    }
    if let Some(helo) = req.helo.filter(|_| listed("HELO")) {
        line.push_str(&format!(" HELO={}", xtext(helo)));
    }
    // LOGIN= vouches for the user: only for a login Postern checked itself
    // (not a master user's form of the name).
    let login = listed("LOGIN");
    if login {
        line.push_str(&format!(" LOGIN={}", xtext(req.user)));
    }
    (line.len() > "XCLIENT".len()).then(|| (line + "\r\n", login))
}

async fn login(
    mut conn: Conn,
    mut ext: Extensions,
    req: &LoginRequest<'_>,
    hostname: &str,
) -> Result<BackendSession, BackendError> {
    // LOGIN= was accepted: the backend may count the user as logged in.
    let mut vouched = false;
    let xclient = ext.get("XCLIENT").map(|a| {
        a.iter()
            .map(|s| s.to_ascii_uppercase())
            .collect::<Vec<String>>()
    });
    if let Some(attributes) = xclient {
        let attributes: Vec<&str> = attributes.iter().map(String::as_str).collect();
        if let Some((line, login)) = xclient_line(&attributes, req) {
            if login {
                req.mark_credentials_sent();
            }
            conn.send(line.as_bytes()).await?;
            let answer = reply(&mut conn).await?;
            if answer.code == 220 {
                // A new session as the client's: EHLO again, as the client.
                ext = ehlo(&mut conn, req.helo.unwrap_or(hostname)).await?;
                vouched = login;
            } else if answer.class() == 4 {
                return Err(BackendError::Unavailable(answer.text()));
            } else {
                tracing::debug!(reason = answer.text(), "backend refused XCLIENT");
            }
        }
    }
    let auth = ext.get("AUTH");
    if !(vouched && auth.is_none()) {
        let plain = auth.is_some_and(|m| m.iter().any(|m| m.eq_ignore_ascii_case("PLAIN")));
        if !plain {
            // The backend's set-up, not the user's: counted as a
            // protocol error, which the alert rules watch.
            return Err(BackendError::Protocol(
                "backend offers neither XCLIENT LOGIN nor AUTH PLAIN; nothing sent".into(),
            ));
        }
        let ids = req.identities()?;
        let ir = sasl::encode_plain(ids.authzid, &ids.authcid, ids.password.expose());
        let mut out = b"AUTH PLAIN ".to_vec();
        out.extend_from_slice(ir.expose());
        out.extend_from_slice(b"\r\n");
        let out = Secret::new(out);
        conn.send(out.expose()).await?;
        drop(out);
        let answer = reply(&mut conn).await?;
        match answer.class() {
            2 => {}
            5 if vouched && answer.code == 503 => {}
            4 => return Err(BackendError::Unavailable(answer.text())),
            _ => return Err(BackendError::Rejected(answer.text())),
        }
    }
    Ok(BackendSession {
        stream: conn.stream,
        capabilities: Capabilities::default(),
        pending: conn.buf,
        answer: None,
    })
}

fn clip(line: &str) -> String {
    crate::imap::printable(line, 200)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::ClientAddresses;

    #[test]
    fn reply_lines() {
        assert_eq!(
            parse_line("250-PIPELINING"),
            Some((250, true, "PIPELINING"))
        );
        assert_eq!(parse_line("220 mx ESMTP"), Some((220, false, "mx ESMTP")));
        assert_eq!(parse_line("250"), Some((250, false, "")));
        assert_eq!(parse_line("25"), None);
        assert_eq!(parse_line("abc def"), None);
        assert_eq!(parse_line("250x"), None);
    }

    #[test]
    fn extensions_by_keyword() {
        let ext = Extensions::from_reply(Reply {
            code: 250,
            lines: vec![
                "mx.example".into(),
                "AUTH PLAIN LOGIN".into(),
                "XCLIENT NAME ADDR PROTO HELO REVERSE_NAME PORT LOGIN DESTADDR DESTPORT".into(),
                "STARTTLS".into(),
            ],
        });
        assert!(ext.has("starttls") && !ext.has("mx.example") && !ext.has("CHUNKING"));
        assert_eq!(ext.get("AUTH").unwrap(), ["PLAIN", "LOGIN"]);
        assert!(ext.get("XCLIENT").unwrap().contains(&"LOGIN"));
    }

    #[test]
    fn xtext_encodes_what_it_must() {
        assert_eq!(xtext("alice@example.org"), "alice@example.org");
        assert_eq!(xtext("a+b=c d"), "a+2Bb+3Dc+20d");
        assert_eq!(xtext("é"), "+C3+A9");
    }

    #[test]
    fn xclient_carries_only_listed_attributes() {
        let password = Secret::default();
        let mut req = LoginRequest {
            user: "alice@example.org",
            password: &password,
            master: None,
            client: Some(ClientAddresses {
                peer: "[2001:db8::7]:40000".parse().unwrap(),
                local: "127.0.0.1:587".parse().unwrap(),
            }),
            send_id: true,
            session_id: "s",
            connect_timeout: std::time::Duration::from_secs(1),
            login_timeout: std::time::Duration::from_secs(1),
            helo: Some("laptop home"),
            credentials_sent: Default::default(),
        };
        let (line, login) = xclient_line(&["ADDR", "PORT", "HELO", "LOGIN"], &req).unwrap();
        assert_eq!(
            line,
            "XCLIENT ADDR=IPV6:2001:db8::7 PORT=40000 HELO=laptop+20home LOGIN=alice@example.org\r\n"
        );
        assert!(login);
        req.client = Some(ClientAddresses {
            peer: "[::ffff:192.0.2.7]:1".parse().unwrap(),
            local: "127.0.0.1:587".parse().unwrap(),
        });
        let (line, login) = xclient_line(&["ADDR", "TTL"], &req).unwrap();
        assert_eq!(line, "XCLIENT ADDR=192.0.2.7\r\n");
        assert!(!login);
        assert!(xclient_line(&["TTL"], &req).is_none());
    }
}
