//! ManageSieve's pre-auth front (RFC 5804): the greeting with the
//! capability list (`IMPLEMENTATION`, `SIEVE` with the extensions the
//! backends last listed, with `NOTIFY` and `MAXREDIRECTS` where they list
//! them, `SASL` only where logging in is allowed,
//! `STARTTLS` before TLS, `VERSION`), `CAPABILITY`, `STARTTLS` (the list
//! sent again after TLS), `AUTHENTICATE` with PLAIN, LOGIN, OAUTHBEARER and
//! XOAUTH2 (initial response, continuations as strings or literals, `"*"`
//! cancels), `NOOP` and `LOGOUT`. Script commands before login get `NO`.
//!
//! It owns framing, commands and replies only: the credentials go to the
//! gate ([`crate::session::gate`]), the login to [`crate::session::connect`]
//! and [`crate::sieve::backend`]. Commands are bounded by `limits.max_line`
//! (text and literals each), raised for bearer tokens as for IMAP.

use crate::config::ListenerTls;
use crate::imap::framing::{CommandReader, FramingError, RawCommand};
use crate::imap::{printable, Secret};
use crate::session::connect::{EnterError, Entered};
use crate::session::gate::{
    Admitted, Failure, Refusal, AUTHORIZATION_TEXT, BLOCKED_TEXT, UNAVAILABLE_TEXT,
};
use crate::session::sasl::{exchange as sasl_exchange, mechanisms, Dialect};
use crate::session::{reply, send, EndReason, Farewells, LoggedIn, Session, Step};
use crate::stream::ClientStream;
use tokio::time::Instant;

use super::{quoted, tokens, Token};

/// What ManageSieve says when Postern ends a session: `BYE`, written only
/// at a response boundary.
pub static FAREWELLS: Farewells = Farewells {
    too_many_connections: b"BYE (TRYLATER) \"Too many connections from your network\"\r\n",
    preauth_timeout: b"BYE \"Disconnected: pre-authentication time limit reached\"\r\n",
    shutdown: b"BYE (TRYLATER) \"Server shutting down\"\r\n",
    kicked: b"BYE \"Session ended by the administrator\"\r\n",
    moved:
        b"BYE (TRYLATER) \"Your account is moving to another server, try again in a moment\"\r\n",
    backend_gone: b"BYE (TRYLATER) \"Sieve server is unavailable, please reconnect\"\r\n",
};

const AUTHENTICATION_FAILED: &str = "NO \"Authentication failed.\"";

/// Runs the pre-auth phase to a login at a backend, or to its end.
pub async fn preauth(session: &mut Session, stream: &mut ClientStream) -> Step<LoggedIn> {
    let max_line = session.max_line();
    let mut front = Front {
        // RFC 5804 4: clients send only non-synchronizing literals.
        reader: CommandReader::new(max_line, max_line).without_continuations(),
        s: session,
    };
    front.run(stream).await
}

struct Front<'a> {
    s: &'a mut Session,
    reader: CommandReader,
}

impl Front<'_> {
    /// The capability list and the `OK` that ends it.
    fn capabilities(&self, stream: &ClientStream, ok: &str) -> String {
        let language = super::backend::seen_language().unwrap_or_else(|| {
            let sieve = self.s.rt.config.managesieve.sieve_extensions.clone();
            let mut caps = vec![("SIEVE".to_owned(), sieve.clone())];
            // RFC 5804 1.7: with enotify, the NOTIFY methods.
            if sieve.split(' ').any(|e| e == "enotify") {
                caps.push(("NOTIFY".to_owned(), "mailto".to_owned()));
            }
            caps
        });
        let mut out = String::from("\"IMPLEMENTATION\" \"Postern\"\r\n");
        for (name, value) in language {
            out.push_str(&format!("{} {}\r\n", quoted(&name), quoted(&value)));
        }
        if self.s.logins_allowed(stream) {
            out.push_str(&format!("\"SASL\" \"{}\"\r\n", mechanisms(self.s)));
        }
        if !stream.is_tls() && self.s.listener.tls == ListenerTls::Starttls {
            out.push_str("\"STARTTLS\"\r\n");
        }
        out.push_str("\"VERSION\" \"1.0\"\r\n");
        out.push_str(&format!("OK {}\r\n", quoted(ok)));
        out
    }

    async fn read(&mut self, stream: &mut ClientStream) -> Step<RawCommand> {
        match self.reader.read_command(stream).await {
            Ok(c) => Ok(c),
            Err(e) => Err(framing_failed(stream, e).await),
        }
    }

    async fn run(&mut self, stream: &mut ClientStream) -> Step<LoggedIn> {
        let greeting = self.capabilities(stream, "Postern ready.");
        reply(stream, greeting).await?;
        loop {
            let command = self.read(stream).await?;
            let words = match tokens(&command) {
                Ok(w) => w,
                Err(e) => {
                    self.bad(stream, e.0).await?;
                    continue;
                }
            };
            drop(command);
            let Some(Token::Atom(name)) = words.first() else {
                self.bad(stream, "Expected a command").await?;
                continue;
            };
            let admitted = match name.as_str() {
                "CAPABILITY" => {
                    let out = self.capabilities(stream, "Capability completed.");
                    reply(stream, out).await?;
                    continue;
                }
                "LOGOUT" => {
                    let _ = send(stream, b"OK \"Logout completed.\"\r\n").await;
                    return Err("logout");
                }
                "NOOP" => {
                    let out = match words.get(1).and_then(Token::as_str) {
                        Some(tag) => format!(
                            "OK (TAG {}) \"Done\"\r\n",
                            quoted(&String::from_utf8_lossy(tag))
                        ),
                        None => "OK \"NOOP completed.\"\r\n".into(),
                    };
                    reply(stream, out).await?;
                    continue;
                }
                "STARTTLS" => {
                    self.starttls(stream).await?;
                    continue;
                }
                "AUTHENTICATE" => {
                    if !self.s.logins_allowed(stream) {
                        self.s.count_auth("none", "privacy_required");
                        self.refuse(
                            stream,
                            "NO (ENCRYPT-NEEDED) \"Use STARTTLS first: logins over plaintext are disabled\"",
                        )
                        .await?;
                        continue;
                    }
                    self.authenticate(stream, words).await?
                }
                "HAVESPACE" | "PUTSCRIPT" | "LISTSCRIPTS" | "SETACTIVE" | "GETSCRIPT"
                | "DELETESCRIPT" | "RENAMESCRIPT" | "CHECKSCRIPT" | "UNAUTHENTICATE" => {
                    self.bad(stream, "Authenticate first").await?;
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

    /// `AUTHENTICATE "mechanism" ["initial response"]` and its exchange.
    async fn authenticate(
        &mut self,
        stream: &mut ClientStream,
        words: Vec<Token>,
    ) -> Step<Option<Admitted>> {
        let mut words = words.into_iter().skip(1);
        let mechanism = match words.next() {
            Some(Token::Str(m)) => String::from_utf8_lossy(&m).to_ascii_uppercase(),
            _ => {
                return self
                    .bad(stream, "Syntax: AUTHENTICATE \"mechanism\" [\"response\"]")
                    .await
                    .map(|_| None)
            }
        };
        let initial = match words.next() {
            Some(Token::Str(ir)) => Some(Secret::new(ir)),
            Some(Token::Atom(_)) => {
                return self
                    .bad(stream, "The initial response must be a string")
                    .await
                    .map(|_| None)
            }
            None => None,
        };
        sasl_exchange(self, stream, &mechanism, initial).await
    }

    async fn word_refusal(&mut self, stream: &mut ClientStream, refusal: Refusal) -> Step<()> {
        match refusal {
            Refusal::Failed { at, why } => {
                let response = match why {
                    Failure::Credentials | Failure::Token | Failure::Disabled(None) => {
                        AUTHENTICATION_FAILED.to_owned()
                    }
                    Failure::Disabled(Some(reason)) => format!("NO {}", quoted(&reason)),
                    Failure::Authorization => format!("NO {}", quoted(AUTHORIZATION_TEXT)),
                    Failure::Blocked => format!("NO (TRYLATER) {}", quoted(BLOCKED_TEXT)),
                    Failure::Source(text) => format!("NO {}", quoted(&text)),
                };
                self.failed_at(stream, at, &response).await
            }
            Refusal::Final { at, text } => {
                self.s.own_wait(tokio::time::sleep_until(at)).await;
                let out = format!("BYE {}\r\n", quoted(&printable(&text, 200)));
                let _ = send(stream, out.as_bytes()).await;
                Err("auth_refused")
            }
            Refusal::Busy(scope) => {
                reply(
                    stream,
                    format!("NO (TRYLATER) {}\r\n", quoted(scope.text())),
                )
                .await
            }
            Refusal::Unavailable => {
                reply(
                    stream,
                    format!("NO (TRYLATER) {}\r\n", quoted(UNAVAILABLE_TEXT)),
                )
                .await
            }
        }
    }

    async fn failed_at(
        &mut self,
        stream: &mut ClientStream,
        at: tokio::time::Instant,
        response: &str,
    ) -> Step<()> {
        let last = self.s.answer_failure_at(at).await;
        if last {
            let out = format!("{response}\r\nBYE \"Too many failed logins, closing.\"\r\n");
            let _ = send(stream, out.as_bytes()).await;
            return Err("too_many_auth_failures");
        }
        reply(stream, format!("{response}\r\n")).await
    }

    async fn enter(
        &mut self,
        stream: &mut ClientStream,
        admitted: Admitted,
    ) -> Step<Option<LoggedIn>> {
        match self.s.enter(admitted).await {
            Ok(Entered {
                mut backend,
                route,
                received,
            }) => Ok(Some(LoggedIn {
                answer: backend
                    .answer
                    .take()
                    .unwrap_or_else(|| b"OK \"Logged in.\"\r\n".to_vec()),
                backend,
                route,
                credentials_at: received,
                client_pending: Vec::new(),
            })),
            Err(e) => {
                let text = match e {
                    EnterError::UserLimit => "Too many sessions for this user, try again later",
                    EnterError::Unavailable(text) => text,
                    EnterError::InUse(_) => "Sieve server is busy, try again later",
                };
                reply(stream, format!("NO (TRYLATER) {}\r\n", quoted(text)))
                    .await
                    .map(|_| None)
            }
        }
    }

    async fn bad(&mut self, stream: &mut ClientStream, reason: &str) -> Step<()> {
        self.refuse(stream, &format!("NO {}", quoted(reason))).await
    }

    /// Sends a refusal that counts towards `max_bad_commands`.
    async fn refuse(&mut self, stream: &mut ClientStream, out: &str) -> Step<()> {
        self.s.bad_commands += 1;
        if self.s.bad_commands >= self.s.rt.config.limits.max_bad_commands {
            let out = format!("{out}\r\nBYE \"Too many invalid commands, closing.\"\r\n");
            let _ = send(stream, out.as_bytes()).await;
            return Err("too_many_bad_commands");
        }
        reply(stream, format!("{out}\r\n")).await
    }

    async fn starttls(&mut self, stream: &mut ClientStream) -> Step<()> {
        if stream.is_tls() {
            let reason = match self.s.listener.tls {
                ListenerTls::Implicit => "STARTTLS is not available on an implicit-TLS port",
                ListenerTls::Starttls => "TLS is already active",
            };
            return self.bad(stream, reason).await;
        }
        reply(stream, "OK \"Begin TLS negotiation now.\"\r\n".into()).await?;
        let dropped = self.reader.discard_buffered();
        self.s.upgrade(stream, dropped).await?;
        // RFC 5804 2.2: the capabilities again, now with SASL.
        let out = self.capabilities(stream, "TLS negotiation successful.");
        reply(stream, out).await
    }
}

impl Dialect for Front<'_> {
    async fn refused(&mut self, stream: &mut ClientStream, refusal: Refusal) -> Step<()> {
        self.word_refusal(stream, refusal).await
    }

    fn session(&mut self) -> &mut Session {
        self.s
    }

    /// A challenge is a string of base64 (RFC 5804 2.1).
    fn challenge(&self, prompt: &str) -> String {
        format!("{}\r\n", quoted(prompt))
    }

    fn cancelled(&self) -> &'static str {
        "NO \"Authentication cancelled.\"\r\n"
    }

    /// The answer is a string, quoted or a literal.
    async fn answer(&mut self, stream: &mut ClientStream) -> Step<Option<Secret>> {
        let command = self.read(stream).await?;
        let answer = match tokens(&command).as_deref() {
            Ok([Token::Str(s)]) => Some(Secret::new(s.clone())),
            _ => None,
        };
        drop(command);
        if answer.is_none() {
            self.bad(stream, "Expected a string answering the challenge")
                .await?;
        }
        Ok(answer)
    }

    async fn malformed(&mut self, stream: &mut ClientStream, reason: &str) -> Step<()> {
        self.bad(stream, reason).await
    }

    async fn unsupported(&mut self, stream: &mut ClientStream) -> Step<()> {
        self.bad(stream, "Unsupported authentication mechanism")
            .await
    }

    async fn token_failed(&mut self, stream: &mut ClientStream, at: Instant) -> Step<()> {
        self.failed_at(stream, at, AUTHENTICATION_FAILED).await
    }
}

async fn framing_failed(stream: &mut ClientStream, e: FramingError) -> EndReason {
    let (text, reason) = match e {
        FramingError::LineTooLong(limit) => (
            format!("BYE \"Command longer than {limit} bytes\"\r\n"),
            "line_too_long",
        ),
        FramingError::LiteralTooBig { limit, .. } => (
            format!("BYE \"Literal larger than {limit} bytes\"\r\n"),
            "literal_too_big",
        ),
        FramingError::Closed => return "client_closed",
        FramingError::Io(_) => return "client_error",
    };
    let _ = send(stream, text.as_bytes()).await;
    reason
}
