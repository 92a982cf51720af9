//! IMAP's pre-auth front: the greeting, the commands a client may send
//! before login (CAPABILITY, NOOP, LOGOUT, ID, STARTTLS, LOGIN,
//! AUTHENTICATE with PLAIN, LOGIN, OAUTHBEARER and XOAUTH2), and the words
//! of every answer, refusals of the login gate included.
//!
//! It owns framing, commands, replies and the capability list only: the
//! credentials go to the gate ([`crate::session::gate`]), the login to
//! [`crate::session::connect`], and it hands the pipeline a [`LoggedIn`]
//! whose answer is the tagged OK with the backend's own capabilities.

use crate::config::ListenerTls;
use crate::imap::command::{self, ParseError, PreauthCommand};
use crate::imap::framing::{CommandReader, FramingError};
use crate::imap::sasl::{self, Credentials};
use crate::imap::{printable, Secret};
use crate::session::connect::{EnterError, Entered};
use crate::session::gate::{
    Admitted, Failure, Refusal, AUTHORIZATION_TEXT, BLOCKED_TEXT, UNAVAILABLE_TEXT,
};
use crate::session::{reply, send, EndReason, Farewells, LoggedIn, Session, Step};
use crate::stream::ClientStream;

/// What IMAP says when Postern ends a session.
pub static FAREWELLS: Farewells = Farewells {
    too_many_connections: b"* BYE [UNAVAILABLE] Too many connections from your network\r\n",
    preauth_timeout: b"* BYE Autologout; pre-authentication time limit reached\r\n",
    shutdown: b"* BYE [UNAVAILABLE] Server shutting down\r\n",
    kicked: b"* BYE Session ended by the administrator\r\n",
    moved: b"* BYE [UNAVAILABLE] Your mailbox is moving to another server, log in again in a moment\r\n",
    backend_gone: b"* BYE [UNAVAILABLE] Mail server is unavailable, please reconnect\r\n",
};

/// The one answer to every failed login: unknown user, wrong password or a
/// user name no account could have all read the same.
const AUTHENTICATION_FAILED: &str = "NO [AUTHENTICATIONFAILED] Authentication failed.";

/// Runs the pre-auth phase to a login at a backend, or to its end.
pub async fn preauth(session: &mut Session, stream: &mut ClientStream) -> Step<LoggedIn> {
    let limits = session.rt.config.limits.clone();
    let mut front = Front {
        reader: CommandReader::new(session.max_line(), limits.max_literal),
        s: session,
    };
    front.run(stream).await
}

struct Front<'a> {
    s: &'a mut Session,
    reader: CommandReader,
}

impl Front<'_> {
    fn auth_allowed(&self, stream: &ClientStream) -> bool {
        stream.is_tls() || self.s.listener.allow_plaintext_auth
    }

    fn capabilities(&self, stream: &ClientStream) -> String {
        let base = match (stream.is_tls(), self.s.listener.allow_plaintext_auth) {
            (true, _) => "IMAP4rev1 SASL-IR ID LITERAL+ AUTH=PLAIN AUTH=LOGIN",
            (false, false) => return "IMAP4rev1 SASL-IR ID LITERAL+ STARTTLS LOGINDISABLED".into(),
            (false, true) => "IMAP4rev1 SASL-IR ID LITERAL+ STARTTLS AUTH=PLAIN AUTH=LOGIN",
        };
        if self.s.rt.oauth.is_some() {
            format!("{base} AUTH=OAUTHBEARER AUTH=XOAUTH2")
        } else {
            base.into()
        }
    }

    async fn run(&mut self, stream: &mut ClientStream) -> Step<LoggedIn> {
        let greeting = format!(
            "* OK [CAPABILITY {}] Postern ready.\r\n",
            self.capabilities(stream)
        );
        send(stream, greeting.as_bytes())
            .await
            .map_err(|_| "client_error")?;
        loop {
            let raw = match self.reader.read_command(stream).await {
                Ok(raw) => raw,
                Err(e) => return Err(framing_failed(stream, e).await),
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
            let admitted = match cmd.body {
                PreauthCommand::Capability => {
                    let r = format!(
                        "* CAPABILITY {}\r\n{tag} OK CAPABILITY completed\r\n",
                        self.capabilities(stream)
                    );
                    reply(stream, r).await?;
                    continue;
                }
                PreauthCommand::Noop => {
                    reply(stream, format!("{tag} OK NOOP completed\r\n")).await?;
                    continue;
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
                    self.s.client_id = fields;
                    self.forwarded_address();
                    reply(
                        stream,
                        format!("* ID (\"name\" \"Postern\")\r\n{tag} OK ID completed\r\n"),
                    )
                    .await?;
                    continue;
                }
                PreauthCommand::StartTls => {
                    self.starttls(stream, &tag).await?;
                    continue;
                }
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
                    let checked = self.s.check_password("LOGIN", creds, stream.is_tls()).await;
                    self.settled(stream, &tag, checked).await?
                }
                PreauthCommand::Authenticate {
                    mechanism,
                    initial_response,
                } => {
                    if !self.auth_allowed(stream) {
                        self.privacy_required(stream, &tag).await?;
                        continue;
                    }
                    if self.s.rt.oauth.is_some()
                        && matches!(mechanism.as_str(), "XOAUTH2" | "OAUTHBEARER")
                    {
                        let xoauth2 = mechanism == "XOAUTH2";
                        self.token_login(stream, &tag, xoauth2, initial_response)
                            .await?
                    } else {
                        let Some((mech, creds)) = self
                            .sasl_exchange(stream, &tag, &mechanism, initial_response)
                            .await?
                        else {
                            continue;
                        };
                        let checked = self.s.check_password(mech, creds, stream.is_tls()).await;
                        self.settled(stream, &tag, checked).await?
                    }
                }
                PreauthCommand::NotPermitted(name) => {
                    let reason = format!("{name} is not valid before login; log in first");
                    self.bad(stream, &tag, &reason).await?;
                    continue;
                }
            };
            let Some(admitted) = admitted else { continue };
            if let Some(mut l) = self.enter(stream, &tag, admitted).await? {
                l.client_pending = self.reader.take_buffered();
                return Ok(l);
            }
        }
    }

    /// The gate's verdict: the admitted login, or `None` once a refusal
    /// has been answered (the loop goes on).
    async fn settled(
        &mut self,
        stream: &mut ClientStream,
        tag: &str,
        checked: Result<Admitted, Refusal>,
    ) -> Step<Option<Admitted>> {
        match checked {
            Ok(admitted) => Ok(Some(admitted)),
            Err(refusal) => self.refused(stream, tag, refusal).await.map(|_| None),
        }
    }

    /// Words a refusal of the login gate.
    async fn refused(
        &mut self,
        stream: &mut ClientStream,
        tag: &str,
        refusal: Refusal,
    ) -> Step<()> {
        match refusal {
            Refusal::Failed { at, why } => {
                let response = match why {
                    Failure::Credentials | Failure::Token | Failure::Disabled(None) => {
                        AUTHENTICATION_FAILED.to_owned()
                    }
                    Failure::Disabled(Some(reason)) => {
                        format!("NO [AUTHENTICATIONFAILED] {reason}")
                    }
                    Failure::Authorization => {
                        format!("NO [AUTHORIZATIONFAILED] {AUTHORIZATION_TEXT}")
                    }
                    Failure::Blocked => format!("NO [UNAVAILABLE] {BLOCKED_TEXT}"),
                    Failure::Source(text) => format!("NO [AUTHENTICATIONFAILED] {text}"),
                };
                self.failed_at(stream, tag, at, &response).await
            }
            Refusal::Final { at, text } => {
                self.s.own_wait(tokio::time::sleep_until(at)).await;
                let response = format!("NO [AUTHENTICATIONFAILED] {text}");
                let out = format!(
                    "{tag} {}\r\n* BYE Authentication refused\r\n",
                    printable(&response, 200)
                );
                let _ = send(stream, out.as_bytes()).await;
                Err("auth_refused")
            }
            Refusal::Busy(scope) => {
                let text = scope.text();
                reply(stream, format!("{tag} NO [UNAVAILABLE] {text}\r\n")).await
            }
            Refusal::Unavailable => {
                reply(
                    stream,
                    format!("{tag} NO [UNAVAILABLE] {UNAVAILABLE_TEXT}\r\n"),
                )
                .await
            }
        }
    }

    /// Answers a failed login at `at`; too many failures end the session.
    async fn failed_at(
        &mut self,
        stream: &mut ClientStream,
        tag: &str,
        at: tokio::time::Instant,
        response: &str,
    ) -> Step<()> {
        let last = self.s.answer_failure_at(at).await;
        let mut out = format!("{tag} {}\r\n", printable(response, 200));
        if last {
            out.push_str("* BYE Too many failed logins\r\n");
            let _ = send(stream, out.as_bytes()).await;
            return Err("too_many_auth_failures");
        }
        reply(stream, out).await
    }

    /// Routing and the backend login; `None` once a refusal was answered.
    async fn enter(
        &mut self,
        stream: &mut ClientStream,
        tag: &str,
        admitted: Admitted,
    ) -> Step<Option<LoggedIn>> {
        match self.s.enter(admitted).await {
            Ok(Entered {
                backend,
                route,
                received,
            }) => {
                let capabilities = &backend.capabilities;
                let answer = if capabilities.is_empty() {
                    format!("{tag} OK Logged in\r\n")
                } else {
                    format!("{tag} OK [CAPABILITY {capabilities}] Logged in\r\n")
                };
                Ok(Some(LoggedIn {
                    answer: answer.into_bytes(),
                    backend,
                    route,
                    credentials_at: received,
                    client_pending: Vec::new(),
                }))
            }
            Err(e) => {
                let out = match e {
                    EnterError::UserLimit => {
                        format!("{tag} NO [LIMIT] Too many sessions for this user\r\n")
                    }
                    EnterError::Unavailable(text) => format!("{tag} NO [UNAVAILABLE] {text}\r\n"),
                    EnterError::InUse(text) => {
                        format!("{tag} NO [INUSE] {}\r\n", printable(&text, 200))
                    }
                };
                reply(stream, out).await.map(|_| None)
            }
        }
    }

    /// From a trusted forwarder, the client's address as its `ID` states it.
    fn forwarded_address(&mut self) {
        let Some(fields) = &self.s.client_id else {
            return;
        };
        let field = |name: &str| {
            fields
                .iter()
                .find(|(n, _)| n.eq_ignore_ascii_case(name))
                .and_then(|(_, v)| v.clone())
        };
        let Some(stated) = field("x-originating-ip") else {
            return;
        };
        let port = field("x-originating-port");
        self.s.take_forwarded_address(&stated, port.as_deref());
    }

    /// Answers a bad command; too many of them end the session.
    async fn bad(&mut self, stream: &mut ClientStream, tag: &str, reason: &str) -> Step<()> {
        self.refuse(stream, format!("{tag} BAD {reason}\r\n")).await
    }

    /// Sends a refusal (BAD or NO) that counts towards `max_bad_commands`.
    async fn refuse(&mut self, stream: &mut ClientStream, mut out: String) -> Step<()> {
        self.s.bad_commands += 1;
        if self.s.bad_commands >= self.s.rt.config.limits.max_bad_commands {
            out.push_str("* BYE Too many invalid commands\r\n");
            let _ = send(stream, out.as_bytes()).await;
            return Err("too_many_bad_commands");
        }
        reply(stream, out).await
    }

    async fn privacy_required(&mut self, stream: &mut ClientStream, tag: &str) -> Step<()> {
        self.s.count_auth("none", "privacy_required");
        let out = format!(
            "{tag} NO [PRIVACYREQUIRED] Use STARTTLS first: logins over plaintext are disabled\r\n"
        );
        self.refuse(stream, out).await
    }

    async fn starttls(&mut self, stream: &mut ClientStream, tag: &str) -> Step<()> {
        if stream.is_tls() {
            let reason = match self.s.listener.tls {
                ListenerTls::Implicit => "STARTTLS is not available on an implicit-TLS port",
                ListenerTls::Starttls => "TLS is already active",
            };
            return self.bad(stream, tag, reason).await;
        }
        reply(stream, format!("{tag} OK Begin TLS negotiation now\r\n")).await?;
        let dropped = self.reader.discard_buffered();
        self.s.upgrade(stream, dropped).await
    }

    /// Runs an AUTHENTICATE exchange. `Ok(None)` means it was answered
    /// already (cancelled, unsupported, malformed) and the loop goes on.
    async fn sasl_exchange(
        &mut self,
        stream: &mut ClientStream,
        tag: &str,
        mechanism: &str,
        initial: Option<Secret>,
    ) -> Step<Option<(&'static str, Credentials)>> {
        match mechanism {
            "PLAIN" => {
                let message = match initial {
                    Some(ir) => sasl::decode_response(ir.expose()),
                    None => match self.continuation(stream, tag, "").await? {
                        Some(line) => sasl::decode_response(line.expose()),
                        None => return Ok(None),
                    },
                };
                match message.and_then(|m| sasl::decode_plain(&m)) {
                    Ok(creds) => Ok(Some(("PLAIN", creds))),
                    Err(e) => {
                        self.s.count_auth("PLAIN", "invalid");
                        self.bad(stream, tag, &e.to_string()).await.map(|_| None)
                    }
                }
            }
            "LOGIN" => {
                let user = match initial {
                    Some(ir) => ir,
                    None => match self
                        .continuation(stream, tag, sasl::LOGIN_USERNAME_PROMPT)
                        .await?
                    {
                        Some(line) => line,
                        None => return Ok(None),
                    },
                };
                let Some(password) = self
                    .continuation(stream, tag, sasl::LOGIN_PASSWORD_PROMPT)
                    .await?
                else {
                    return Ok(None);
                };
                match sasl::decode_login(&user, &password) {
                    Ok(creds) => Ok(Some(("LOGIN", creds))),
                    Err(e) => {
                        self.s.count_auth("LOGIN", "invalid");
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

    /// An OAUTHBEARER or XOAUTH2 exchange: the token is checked by the
    /// gate; a refusal is sent as the mechanism's JSON error challenge,
    /// the client's dummy answer read, then the tagged NO (RFC 7628 3.2.3).
    async fn token_login(
        &mut self,
        stream: &mut ClientStream,
        tag: &str,
        xoauth2: bool,
        initial: Option<Secret>,
    ) -> Step<Option<Admitted>> {
        let mechanism = if xoauth2 { "XOAUTH2" } else { "OAUTHBEARER" };
        let message = match initial {
            Some(ir) => ir,
            None => match self.continuation(stream, tag, "").await? {
                Some(line) => line,
                None => return Ok(None),
            },
        };
        let bearer = match sasl::decode_bearer(&message, xoauth2) {
            Ok(b) => b,
            Err(e) => {
                self.s.count_auth(mechanism, "invalid");
                return self.bad(stream, tag, &e.to_string()).await.map(|_| None);
            }
        };
        let checked = self
            .s
            .check_token(mechanism, bearer.authzid.as_deref(), &bearer.token)
            .await;
        match checked {
            Err(Refusal::Failed {
                at,
                why: Failure::Token,
            }) => {
                let challenge = sasl::bearer_error_challenge(xoauth2);
                reply(stream, format!("+ {challenge}\r\n")).await?;
                // The client's answer (a dummy `\x01`, or `*`) only ends the exchange.
                let limit = self.s.max_line();
                if let Err(e) = self.reader.read_line(stream, limit).await {
                    return Err(framing_failed(stream, e).await);
                }
                self.failed_at(stream, tag, at, AUTHENTICATION_FAILED)
                    .await
                    .map(|_| None)
            }
            checked => self.settled(stream, tag, checked).await,
        }
    }

    /// Sends `+ prompt` and reads the client's answer line. `Ok(None)`
    /// when the client cancelled with `*` (answered with a tagged BAD).
    async fn continuation(
        &mut self,
        stream: &mut ClientStream,
        tag: &str,
        prompt: &str,
    ) -> Step<Option<Secret>> {
        reply(stream, format!("+ {prompt}\r\n")).await?;
        let limit = self.s.max_line();
        let line = match self.reader.read_line(stream, limit).await {
            Ok(line) => Secret::new(line),
            Err(e) => return Err(framing_failed(stream, e).await),
        };
        if line.expose() == b"*" {
            reply(stream, format!("{tag} BAD Authentication cancelled\r\n")).await?;
            return Ok(None);
        }
        Ok(Some(line))
    }
}

async fn framing_failed(stream: &mut ClientStream, e: FramingError) -> EndReason {
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
