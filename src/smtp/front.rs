//! Submission's pre-auth front (RFC 6409 message submission, RFC 5321
//! SMTP, RFC 3207 STARTTLS, RFC 4954 AUTH, RFC 2034 enhanced status
//! codes): the greeting, `EHLO`/`HELO` with the proxy's own extension
//! list, `STARTTLS`, `AUTH` with PLAIN, LOGIN, OAUTHBEARER and XOAUTH2
//! (initial response, `=` for empty, `*` cancels), `NOOP`, `RSET`, `HELP`
//! and `QUIT`. Mail commands before login get `530 5.7.0`; anything else
//! unknown `500`.
//!
//! It owns framing, commands, replies and the extension list only: the
//! credentials go to the gate ([`crate::session::gate`]), the login to
//! [`crate::session::connect`] and [`crate::smtp::backend`]. After the
//! backend has taken the login the client gets `235` and the session is
//! relayed; the client's EHLO name travels in `XCLIENT HELO=` where the
//! backend allows it. Command lines are bounded at 512 octets (RFC 5321
//! 4.5.3.1.4); `AUTH` lines and SASL answers by `limits.max_line`, raised
//! for bearer tokens as for IMAP. Limits end with `421` and a close.

use std::time::Duration;

use tokio::io::AsyncReadExt;
use tokio::time::Instant;

use crate::config::ListenerTls;
use crate::imap::framing::{CommandReader, FramingError};
use crate::imap::{printable, Secret};
use crate::session::connect::{EnterError, Entered};
use crate::session::gate::{
    Admitted, Failure, Refusal, AUTHORIZATION_TEXT, BLOCKED_TEXT, UNAVAILABLE_TEXT,
};
use crate::session::sasl::{exchange as sasl_exchange, mechanisms, split, Dialect};
use crate::session::{reply, send, EndReason, Farewells, LoggedIn, Session, Step};
use crate::stream::ClientStream;

/// What submission says when Postern ends a session: `421`, written only
/// between commands (never inside a message), where a client reads it as
/// the reply to its next command (RFC 5321 3.8).
pub static FAREWELLS: Farewells = Farewells {
    too_many_connections: b"421 4.7.0 Too many connections from your network, closing\r\n",
    preauth_timeout: b"421 4.4.2 Timeout waiting for authentication, closing\r\n",
    shutdown: b"421 4.3.2 Server shutting down, closing\r\n",
    kicked: b"421 4.3.2 Session ended by the administrator, closing\r\n",
    moved: b"421 4.3.2 Your mailbox is moving to another server, try again in a moment\r\n",
    backend_gone: b"421 4.3.2 Mail server is unavailable, please reconnect\r\n",
};

/// The longest command line (RFC 5321 4.5.3.1.4), CRLF included; `AUTH`
/// lines may be longer (RFC 4954 4: 12288 octets), up to `max_line`.
const MAX_COMMAND_LINE: usize = 512;

/// The one answer to every failed login.
const AUTHENTICATION_FAILED: &str = "535 5.7.8 Authentication credentials invalid";

/// The name Postern greets with when `submission.hostname` is not set.
pub fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".into())
}

/// Runs the pre-auth phase to a login at a backend, or to its end.
pub async fn preauth(session: &mut Session, stream: &mut ClientStream) -> Step<LoggedIn> {
    let limits = &session.rt.config.limits;
    let config = session.rt.config.submission.clone().unwrap_or_default();
    let mut front = Front {
        reader: CommandReader::new(limits.max_line, 0),
        hostname: config.hostname.clone().unwrap_or_else(host_name),
        config,
        s: session,
    };
    front.run(stream).await
}

struct Front<'a> {
    s: &'a mut Session,
    reader: CommandReader,
    config: crate::config::Submission,
    hostname: String,
}

impl Front<'_> {
    /// The proxy's own EHLO answer: `AUTH` only where logging in is
    /// allowed, `STARTTLS` only before TLS, `CHUNKING` and `SMTPUTF8` only
    /// where configured (every backend must offer them).
    fn ehlo_reply(&self, stream: &ClientStream) -> String {
        let mut lines = vec![self.hostname.clone(), "PIPELINING".into()];
        if self.config.max_message_size > 0 {
            lines.push(format!("SIZE {}", self.config.max_message_size));
        } else {
            lines.push("SIZE".into());
        }
        lines.push("8BITMIME".into());
        lines.push("ENHANCEDSTATUSCODES".into());
        if self.s.logins_allowed(stream) {
            lines.push(format!("AUTH {}", mechanisms(self.s)));
        }
        if !stream.is_tls() && self.s.listener.tls == ListenerTls::Starttls {
            lines.push("STARTTLS".into());
        }
        if self.config.chunking {
            lines.push("CHUNKING".into());
        }
        if self.config.smtputf8 {
            lines.push("SMTPUTF8".into());
        }
        let last = lines.len() - 1;
        let mut out = String::new();
        for (i, line) in lines.iter().enumerate() {
            out.push_str(if i == last { "250 " } else { "250-" });
            out.push_str(line);
            out.push_str("\r\n");
        }
        out
    }

    /// A client that talks before the greeting (within the configured
    /// delay) is told so and closed.
    async fn greet(&mut self, stream: &mut ClientStream) -> Step<()> {
        let delay = self.config.greeting_delay;
        if !delay.is_zero() {
            let mut byte = [0u8; 1];
            match tokio::time::timeout(delay, stream.read(&mut byte)).await {
                Err(_) => {}
                Ok(Ok(0)) | Ok(Err(_)) => return Err("client_closed"),
                Ok(Ok(_)) => {
                    let _ = send(
                        stream,
                        b"554 5.5.0 Protocol violation: talking before the greeting\r\n",
                    )
                    .await;
                    return Err("early_talker");
                }
            }
        }
        let greeting = format!("220 {} ESMTP Postern\r\n", self.hostname);
        reply(stream, greeting).await
    }

    async fn run(&mut self, stream: &mut ClientStream) -> Step<LoggedIn> {
        self.greet(stream).await?;
        loop {
            let limit = self.s.max_line();
            let line = match self.reader.read_line(stream, limit).await {
                Ok(line) => Secret::new(line),
                Err(e) => return Err(framing_failed(stream, e).await),
            };
            let (keyword, rest) = split(line.expose());
            if keyword != "AUTH" && line.expose().len() + 2 > MAX_COMMAND_LINE {
                self.bad(stream, "500 5.5.2 Line too long").await?;
                continue;
            }
            let admitted = match keyword.as_str() {
                "EHLO" | "HELO" => {
                    let name = printable(&String::from_utf8_lossy(rest), 255);
                    if name.trim().is_empty() {
                        let out = format!("501 5.5.4 Syntax: {keyword} hostname");
                        self.bad(stream, &out).await?;
                        continue;
                    }
                    self.s.helo = Some(name.trim().to_owned());
                    let out = if keyword == "EHLO" {
                        self.ehlo_reply(stream)
                    } else {
                        format!("250 {}\r\n", self.hostname)
                    };
                    reply(stream, out).await?;
                    continue;
                }
                "QUIT" => {
                    let _ = send(stream, b"221 2.0.0 Bye\r\n").await;
                    return Err("logout");
                }
                "NOOP" | "RSET" => {
                    reply(stream, "250 2.0.0 OK\r\n".into()).await?;
                    continue;
                }
                "HELP" => {
                    let out = "214 2.0.0 Log in with AUTH (after STARTTLS), then send mail\r\n";
                    reply(stream, out.into()).await?;
                    continue;
                }
                "STARTTLS" => {
                    self.starttls(stream, rest.is_empty()).await?;
                    continue;
                }
                "AUTH" => {
                    if !self.s.logins_allowed(stream) {
                        self.s.count_auth("none", "privacy_required");
                        let out = "538 5.7.11 Encryption required: use STARTTLS first";
                        self.bad(stream, out).await?;
                        continue;
                    }
                    if self.s.helo.is_none() {
                        self.bad(stream, "503 5.5.1 Send EHLO first").await?;
                        continue;
                    }
                    // The initial response holds credentials.
                    let rest = Secret::new(rest.to_vec());
                    drop(line);
                    self.auth(stream, rest.expose()).await?
                }
                "MAIL" | "RCPT" | "DATA" | "BDAT" | "VRFY" | "EXPN" | "ETRN" | "BURL" => {
                    self.bad(stream, "530 5.7.0 Authentication required")
                        .await?;
                    continue;
                }
                "" => {
                    self.bad(stream, "500 5.5.2 Empty command").await?;
                    continue;
                }
                _ => {
                    self.bad(stream, "500 5.5.1 Command unrecognized").await?;
                    continue;
                }
            };
            let Some(admitted) = admitted else { continue };
            if let Some(mut l) = self.enter(stream, admitted).await? {
                l.client_pending = self.reader.take_buffered();
                return Ok(l);
            }
        }
    }

    /// `AUTH mechanism [initial-response]` (RFC 4954) and its exchange.
    async fn auth(&mut self, stream: &mut ClientStream, args: &[u8]) -> Step<Option<Admitted>> {
        let (mechanism, initial) = split(args);
        if mechanism.is_empty() {
            return self
                .bad(stream, "501 5.5.4 Syntax: AUTH mechanism")
                .await
                .map(|_| None);
        }
        let initial = (!initial.is_empty()).then(|| Secret::new(initial.to_vec()));
        sasl_exchange(self, stream, &mechanism, initial).await
    }

    /// Words a refusal of the login gate (RFC 4954 6 codes).
    async fn word_refusal(&mut self, stream: &mut ClientStream, refusal: Refusal) -> Step<()> {
        match refusal {
            Refusal::Failed { at, why } => {
                let response = match why {
                    Failure::Credentials | Failure::Token | Failure::Disabled(None) => {
                        AUTHENTICATION_FAILED.to_owned()
                    }
                    Failure::Disabled(Some(reason)) => format!("535 5.7.8 {reason}"),
                    Failure::Authorization => format!("535 5.7.8 {AUTHORIZATION_TEXT}"),
                    Failure::Blocked => format!("454 4.7.0 {BLOCKED_TEXT}"),
                    Failure::Source(text) => format!("535 5.7.8 {text}"),
                };
                self.failed_at(stream, at, &response).await
            }
            Refusal::Final { at, text } => {
                self.s.own_wait(tokio::time::sleep_until(at)).await;
                let out = format!("535 5.7.8 {}\r\n", printable(&text, 200));
                let _ = send(stream, out.as_bytes()).await;
                Err("auth_refused")
            }
            Refusal::Busy(scope) => reply(stream, format!("454 4.7.0 {}\r\n", scope.text())).await,
            Refusal::Unavailable => {
                reply(stream, format!("454 4.7.0 {UNAVAILABLE_TEXT}\r\n")).await
            }
        }
    }

    /// Answers a failed login at `at`; too many failures end the session.
    async fn failed_at(
        &mut self,
        stream: &mut ClientStream,
        at: tokio::time::Instant,
        response: &str,
    ) -> Step<()> {
        let last = self.s.answer_failure_at(at).await;
        let response = printable(response, 200);
        if last {
            let _ = send(stream, format!("{response}\r\n").as_bytes()).await;
            let _ = send(stream, b"421 4.7.0 Too many failed logins, closing\r\n").await;
            return Err("too_many_auth_failures");
        }
        reply(stream, format!("{response}\r\n")).await
    }

    /// Routing and the backend login; `None` once a refusal was answered.
    async fn enter(
        &mut self,
        stream: &mut ClientStream,
        admitted: Admitted,
    ) -> Step<Option<LoggedIn>> {
        match self.s.enter(admitted).await {
            Ok(Entered {
                backend,
                route,
                received,
            }) => Ok(Some(LoggedIn {
                answer: b"235 2.7.0 Authentication successful\r\n".to_vec(),
                backend,
                route,
                credentials_at: received,
                client_pending: Vec::new(),
            })),
            Err(e) => {
                let text = match e {
                    EnterError::UserLimit => "Too many sessions for this user, try again later",
                    EnterError::Unavailable(text) => text,
                    EnterError::InUse(_) => "Mail server is busy, try again later",
                };
                reply(stream, format!("454 4.7.0 {text}\r\n"))
                    .await
                    .map(|_| None)
            }
        }
    }

    /// Answers a bad command (`out`: code and text); too many of them end
    /// the session.
    async fn bad(&mut self, stream: &mut ClientStream, out: &str) -> Step<()> {
        self.s.bad_commands += 1;
        if self.s.bad_commands >= self.s.rt.config.limits.max_bad_commands {
            let _ = send(stream, format!("{out}\r\n").as_bytes()).await;
            let _ = send(stream, b"421 4.7.0 Too many invalid commands, closing\r\n").await;
            return Err("too_many_bad_commands");
        }
        reply(stream, format!("{out}\r\n")).await
    }

    async fn starttls(&mut self, stream: &mut ClientStream, bare: bool) -> Step<()> {
        if stream.is_tls() {
            let out = match self.s.listener.tls {
                ListenerTls::Implicit => {
                    "502 5.5.1 STARTTLS is not available on an implicit-TLS port"
                }
                ListenerTls::Starttls => "503 5.5.1 TLS is already active",
            };
            return self.bad(stream, out).await;
        }
        if !bare {
            return self.bad(stream, "501 5.5.4 Syntax: STARTTLS").await;
        }
        reply(stream, "220 2.0.0 Ready to start TLS\r\n".into()).await?;
        // RFC 3207 4.2: the client must start over with EHLO.
        self.s.helo = None;
        let dropped = self.reader.discard_buffered();
        self.s.upgrade(stream, dropped).await
    }
}

impl Dialect for Front<'_> {
    async fn refused(&mut self, stream: &mut ClientStream, refusal: Refusal) -> Step<()> {
        self.word_refusal(stream, refusal).await
    }

    fn session(&mut self) -> &mut Session {
        self.s
    }

    fn challenge(&self, prompt: &str) -> String {
        format!("334 {prompt}\r\n")
    }

    fn cancelled(&self) -> &'static str {
        "501 5.7.0 Authentication cancelled\r\n"
    }

    async fn answer(&mut self, stream: &mut ClientStream) -> Step<Option<Secret>> {
        let limit = self.s.max_line();
        match self.reader.read_line(stream, limit).await {
            Ok(line) => Ok(Some(Secret::new(line))),
            Err(e) => Err(framing_failed(stream, e).await),
        }
    }

    async fn malformed(&mut self, stream: &mut ClientStream, reason: &str) -> Step<()> {
        self.bad(stream, &format!("501 5.5.2 {reason}")).await
    }

    async fn unsupported(&mut self, stream: &mut ClientStream) -> Step<()> {
        self.bad(stream, "504 5.5.4 Unrecognized authentication type")
            .await
    }

    async fn token_failed(&mut self, stream: &mut ClientStream, at: Instant) -> Step<()> {
        self.failed_at(stream, at, AUTHENTICATION_FAILED).await
    }
}

async fn framing_failed(stream: &mut ClientStream, e: FramingError) -> EndReason {
    let (text, reason) = match e {
        FramingError::LineTooLong(limit) => (
            format!("500 5.5.2 Line longer than {limit} bytes, closing\r\n"),
            "line_too_long",
        ),
        FramingError::LiteralTooBig { .. } => unreachable!("SMTP lines have no literals"),
        FramingError::Closed => return "client_closed",
        FramingError::Io(_) => return "client_error",
    };
    let _ = tokio::time::timeout(Duration::from_secs(1), send(stream, text.as_bytes())).await;
    reason
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_split_at_the_first_space() {
        assert_eq!(
            split(b"ehlo client.example"),
            ("EHLO".into(), &b"client.example"[..])
        );
        assert_eq!(
            split(b"AUTH PLAIN AGEAYg=="),
            ("AUTH".into(), &b"PLAIN AGEAYg=="[..])
        );
        assert_eq!(split(b"QUIT"), ("QUIT".into(), &b""[..]));
    }

    #[test]
    fn the_host_name_is_never_empty() {
        assert!(!host_name().is_empty());
    }
}
