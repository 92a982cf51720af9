//! POP3's pre-auth front (RFC 1939 AUTHORIZATION state, RFC 2449 CAPA,
//! RFC 2595 STLS, RFC 5034 AUTH, RFC 3206 response codes): the greeting,
//! `CAPA`, `USER`/`PASS`, `AUTH` with PLAIN, LOGIN, OAUTHBEARER and
//! XOAUTH2 (initial response, `=` for empty, `*` cancels), `STLS` and
//! `QUIT`; anything else before login is answered `-ERR` with a reason.
//!
//! It owns framing, commands, replies and the capability list only: the
//! credentials go to the gate ([`crate::session::gate`]), the login to
//! [`crate::session::connect`]. Limits end with `-ERR` and a close. Lines
//! are bounded by `limits.max_line` (8 KiB by default, so `PASS` carries
//! passwords of several KiB), raised for bearer tokens as for IMAP.

use crate::config::ListenerTls;
use crate::imap::framing::{CommandReader, FramingError};
use crate::imap::sasl::Credentials;
use crate::imap::{printable, Secret};
use crate::session::connect::{EnterError, Entered};
use crate::session::gate::{
    Admitted, Failure, Refusal, AUTHORIZATION_TEXT, BLOCKED_TEXT, UNAVAILABLE_TEXT,
};
use crate::session::sasl::{exchange as sasl_exchange, mechanisms, split, Dialect};
use crate::session::{reply, send, EndReason, Farewells, LoggedIn, Session, Step};
use crate::stream::ClientStream;
use tokio::time::Instant;

/// What POP3 says when Postern ends a session. POP3 has no unsolicited
/// responses; these are written only at a response boundary, where a
/// client reads them as the answer to its next command.
pub static FAREWELLS: Farewells = Farewells {
    too_many_connections: b"-ERR [SYS/TEMP] Too many connections from your network\r\n",
    preauth_timeout: b"-ERR Autologout; pre-authentication time limit reached\r\n",
    shutdown: b"-ERR [SYS/TEMP] Server shutting down\r\n",
    kicked: b"-ERR Session ended by the administrator\r\n",
    moved: b"-ERR [SYS/TEMP] Your mailbox is moving to another server, try again in a moment\r\n",
    backend_gone: b"-ERR [SYS/TEMP] Mail server is unavailable, please reconnect\r\n",
};

/// The one answer to every failed login.
const AUTHENTICATION_FAILED: &str = "-ERR [AUTH] Authentication failed.";

/// Runs the pre-auth phase to a login at a backend, or to its end.
pub async fn preauth(session: &mut Session, stream: &mut ClientStream) -> Step<LoggedIn> {
    let limits = &session.rt.config.limits;
    let mut front = Front {
        reader: CommandReader::new(limits.max_line, 0),
        user: None,
        s: session,
    };
    front.run(stream).await
}

struct Front<'a> {
    s: &'a mut Session,
    reader: CommandReader,
    /// The name given by `USER`, waiting for `PASS`.
    user: Option<Vec<u8>>,
}

impl Front<'_> {
    /// The proxy's own capability list (RFC 2449): `USER` and `SASL` only
    /// where logging in is allowed, `STLS` only before TLS.
    fn capabilities(&self, stream: &ClientStream) -> String {
        let mut out = String::from("+OK Capability list follows\r\nTOP\r\nUIDL\r\nRESP-CODES\r\nPIPELINING\r\nAUTH-RESP-CODE\r\n");
        if self.s.logins_allowed(stream) {
            out.push_str("USER\r\nSASL ");
            out.push_str(mechanisms(self.s));
            out.push_str("\r\n");
        }
        if !stream.is_tls() && self.s.listener.tls == ListenerTls::Starttls {
            out.push_str("STLS\r\n");
        }
        out.push_str("IMPLEMENTATION Postern\r\n.\r\n");
        out
    }

    async fn run(&mut self, stream: &mut ClientStream) -> Step<LoggedIn> {
        send(stream, b"+OK Postern ready.\r\n")
            .await
            .map_err(|_| "client_error")?;
        loop {
            let limit = self.s.max_line();
            let line = match self.reader.read_line(stream, limit).await {
                Ok(line) => Secret::new(line),
                Err(e) => return Err(framing_failed(stream, e).await),
            };
            let (keyword, rest) = split(line.expose());
            let admitted = match keyword.as_str() {
                "CAPA" => {
                    let caps = self.capabilities(stream);
                    reply(stream, caps).await?;
                    continue;
                }
                "QUIT" => {
                    let _ = send(stream, b"+OK Bye\r\n").await;
                    return Err("logout");
                }
                "NOOP" => {
                    // Only in the TRANSACTION state (RFC 1939), but harmless.
                    reply(stream, "+OK\r\n".into()).await?;
                    continue;
                }
                "STLS" => {
                    self.stls(stream).await?;
                    continue;
                }
                "USER" => {
                    if !self.s.logins_allowed(stream) {
                        self.privacy_required(stream, "USER").await?;
                        continue;
                    }
                    if rest.is_empty() {
                        self.bad(stream, "USER needs a user name").await?;
                        continue;
                    }
                    self.user = Some(rest.to_vec());
                    reply(stream, "+OK Send your password\r\n".into()).await?;
                    continue;
                }
                "PASS" => {
                    if !self.s.logins_allowed(stream) {
                        self.privacy_required(stream, "PASS").await?;
                        continue;
                    }
                    let Some(user) = self.user.take() else {
                        self.bad(stream, "PASS comes after USER").await?;
                        continue;
                    };
                    let creds = Credentials {
                        authzid: None,
                        authcid: user,
                        password: Secret::new(rest.to_vec()),
                    };
                    drop(line);
                    let checked = self.s.check_password("USER", creds, stream.is_tls()).await;
                    self.settled(stream, checked).await?
                }
                "AUTH" => {
                    if !self.s.logins_allowed(stream) {
                        self.privacy_required(stream, "AUTH").await?;
                        continue;
                    }
                    self.user = None;
                    // The initial response holds credentials.
                    let rest = Secret::new(rest.to_vec());
                    drop(line);
                    self.auth(stream, rest.expose()).await?
                }
                "" => {
                    self.bad(stream, "Empty command").await?;
                    continue;
                }
                "APOP" => {
                    self.bad(stream, "APOP is not supported; use USER and PASS or AUTH")
                        .await?;
                    continue;
                }
                "STAT" | "LIST" | "RETR" | "DELE" | "RSET" | "TOP" | "UIDL" | "LAST" => {
                    let reason = format!("{keyword} is not valid before login; log in first");
                    self.bad(stream, &reason).await?;
                    continue;
                }
                _ => {
                    self.bad(stream, "Unknown command").await?;
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

    /// `AUTH` (RFC 5034): without a mechanism, the list of mechanisms
    /// (as clients that predate CAPA ask); with one, its exchange.
    async fn auth(&mut self, stream: &mut ClientStream, args: &[u8]) -> Step<Option<Admitted>> {
        if args.is_empty() {
            let list = mechanisms(self.s).replace(' ', "\r\n");
            reply(stream, format!("+OK\r\n{list}\r\n.\r\n")).await?;
            return Ok(None);
        }
        let (mechanism, initial) = split(args);
        let initial = (!initial.is_empty()).then(|| Secret::new(initial.to_vec()));
        sasl_exchange(self, stream, &mechanism, initial).await
    }

    /// Words a refusal of the login gate with RFC 3206 codes.
    async fn word_refusal(&mut self, stream: &mut ClientStream, refusal: Refusal) -> Step<()> {
        match refusal {
            Refusal::Failed { at, why } => {
                let response = match why {
                    Failure::Credentials | Failure::Token | Failure::Disabled(None) => {
                        AUTHENTICATION_FAILED.to_owned()
                    }
                    Failure::Disabled(Some(reason)) => format!("-ERR [AUTH] {reason}"),
                    Failure::Authorization => format!("-ERR [AUTH] {AUTHORIZATION_TEXT}"),
                    Failure::Blocked => format!("-ERR [SYS/TEMP] {BLOCKED_TEXT}"),
                    Failure::Source(text) => format!("-ERR [AUTH] {text}"),
                };
                self.failed_at(stream, at, &response).await
            }
            Refusal::Final { at, text } => {
                self.s.own_wait(tokio::time::sleep_until(at)).await;
                let out = format!("-ERR [AUTH] {}\r\n", printable(&text, 200));
                let _ = send(stream, out.as_bytes()).await;
                Err("auth_refused")
            }
            Refusal::Busy(scope) => {
                reply(stream, format!("-ERR [SYS/TEMP] {}\r\n", scope.text())).await
            }
            Refusal::Unavailable => {
                reply(stream, format!("-ERR [SYS/TEMP] {UNAVAILABLE_TEXT}\r\n")).await
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
            let out = format!("{response} Too many failed logins, closing.\r\n");
            let _ = send(stream, out.as_bytes()).await;
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
                answer: b"+OK Logged in.\r\n".to_vec(),
                backend,
                route,
                credentials_at: received,
                client_pending: Vec::new(),
            })),
            Err(e) => {
                let out = match e {
                    EnterError::UserLimit => {
                        "-ERR [SYS/TEMP] Too many sessions for this user\r\n".to_owned()
                    }
                    EnterError::Unavailable(text) => format!("-ERR [SYS/TEMP] {text}\r\n"),
                    // The backend's own words, its [IN-USE] code with them.
                    EnterError::InUse(text) => format!("-ERR {}\r\n", printable(&text, 200)),
                };
                reply(stream, out).await.map(|_| None)
            }
        }
    }

    /// Answers a bad command; too many of them end the session.
    async fn bad(&mut self, stream: &mut ClientStream, reason: &str) -> Step<()> {
        self.refuse(stream, format!("-ERR {reason}\r\n")).await
    }

    /// Sends a refusal that counts towards `max_bad_commands`.
    async fn refuse(&mut self, stream: &mut ClientStream, out: String) -> Step<()> {
        self.s.bad_commands += 1;
        if self.s.bad_commands >= self.s.rt.config.limits.max_bad_commands {
            let out = format!(
                "{}; too many invalid commands, closing.\r\n",
                out.trim_end()
            );
            let _ = send(stream, out.as_bytes()).await;
            return Err("too_many_bad_commands");
        }
        reply(stream, out).await
    }

    /// RFC 2595: no credentials in plaintext.
    async fn privacy_required(&mut self, stream: &mut ClientStream, command: &str) -> Step<()> {
        self.s.count_auth("none", "privacy_required");
        let out = format!(
            "-ERR [SYS/PERM] {command} refused: use STLS first, logins over plaintext are disabled\r\n"
        );
        self.refuse(stream, out).await
    }

    async fn stls(&mut self, stream: &mut ClientStream) -> Step<()> {
        if stream.is_tls() {
            let reason = match self.s.listener.tls {
                ListenerTls::Implicit => "STLS is not available on an implicit-TLS port",
                ListenerTls::Starttls => "TLS is already active",
            };
            return self.bad(stream, reason).await;
        }
        reply(stream, "+OK Begin TLS negotiation now\r\n".into()).await?;
        // A name given before TLS was given in plaintext: forgotten.
        self.user = None;
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
        format!("+ {prompt}\r\n")
    }

    fn cancelled(&self) -> &'static str {
        "-ERR Authentication cancelled\r\n"
    }

    async fn answer(&mut self, stream: &mut ClientStream) -> Step<Option<Secret>> {
        let limit = self.s.max_line();
        match self.reader.read_line(stream, limit).await {
            Ok(line) => Ok(Some(Secret::new(line))),
            Err(e) => Err(framing_failed(stream, e).await),
        }
    }

    async fn malformed(&mut self, stream: &mut ClientStream, reason: &str) -> Step<()> {
        self.bad(stream, reason).await
    }

    async fn unsupported(&mut self, stream: &mut ClientStream) -> Step<()> {
        let out = "-ERR Unsupported authentication mechanism\r\n";
        self.refuse(stream, out.into()).await
    }

    async fn token_failed(&mut self, stream: &mut ClientStream, at: Instant) -> Step<()> {
        self.failed_at(stream, at, AUTHENTICATION_FAILED).await
    }
}

async fn framing_failed(stream: &mut ClientStream, e: FramingError) -> EndReason {
    let (text, reason) = match e {
        FramingError::LineTooLong(limit) => (
            format!("-ERR Command line longer than {limit} bytes\r\n"),
            "line_too_long",
        ),
        FramingError::LiteralTooBig { .. } => unreachable!("POP3 lines have no literals"),
        FramingError::Closed => return "client_closed",
        FramingError::Io(_) => return "client_error",
    };
    let _ = send(stream, text.as_bytes()).await;
    reason
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_split_at_the_first_space() {
        assert_eq!(split(b"user alice"), ("USER".into(), &b"alice"[..]));
        assert_eq!(split(b"PASS a b "), ("PASS".into(), &b"a b "[..]));
        assert_eq!(split(b"QUIT"), ("QUIT".into(), &b""[..]));
        assert_eq!(split(b""), ("".into(), &b""[..]));
    }
}
