//! The SASL exchange the line protocols share — POP3 `AUTH` (RFC 5034),
//! SMTP `AUTH` (RFC 4954), ManageSieve `AUTHENTICATE` (RFC 5804): PLAIN,
//! LOGIN, and OAUTHBEARER and XOAUTH2 where tokens are accepted, with an
//! initial response or after a challenge, a `*` answer cancelling.
//!
//! The flow is the same in each; only the words differ, and a front
//! supplies them as a [`Dialect`]: how a challenge is written, how an
//! answer is read, and how a malformed answer, an unknown mechanism and
//! the gate's verdict are told. Credentials are handed to the gate
//! ([`Session::check_password`], [`Session::check_token`]) and never kept
//! longer than the check.

use tokio::time::Instant;

use super::gate::{Admitted, Failure, Refusal};
use super::{reply, Session, Step};
use crate::imap::sasl;
use crate::imap::Secret;
use crate::stream::ClientStream;

/// A line protocol's words for the SASL exchange.
pub(crate) trait Dialect {
    fn session(&mut self) -> &mut Session;
    /// A challenge carrying `prompt` (base64, possibly empty), CRLF
    /// included.
    fn challenge(&self, prompt: &str) -> String;
    /// What answers a cancelled exchange, CRLF included.
    fn cancelled(&self) -> &'static str;
    /// Reads the client's answer to a challenge; `None` once an answer
    /// that is not one (in the protocol's framing) has been told so.
    async fn answer(&mut self, stream: &mut ClientStream) -> Step<Option<Secret>>;
    /// Tells the client its answer could not be decoded (`reason`).
    async fn malformed(&mut self, stream: &mut ClientStream, reason: &str) -> Step<()>;
    /// Tells the client the mechanism is not offered.
    async fn unsupported(&mut self, stream: &mut ClientStream) -> Step<()>;
    /// Words a refusal of the login gate, answering no earlier than it
    /// says.
    async fn refused(&mut self, stream: &mut ClientStream, refusal: Refusal) -> Step<()>;
    /// The gate's verdict: the admitted login, or `None` once a refusal
    /// has been answered.
    async fn settled(
        &mut self,
        stream: &mut ClientStream,
        checked: Result<Admitted, Refusal>,
    ) -> Step<Option<Admitted>> {
        match checked {
            Ok(admitted) => Ok(Some(admitted)),
            Err(refusal) => self.refused(stream, refusal).await.map(|_| None),
        }
    }
    /// Answers a refused token at `at`, after its error challenge.
    async fn token_failed(&mut self, stream: &mut ClientStream, at: Instant) -> Step<()>;
}

/// The mechanisms offered: PLAIN and LOGIN, and the token ones where
/// `auth.oauth` is configured.
pub fn mechanisms(session: &Session) -> &'static str {
    if session.rt.oauth.is_some() {
        "PLAIN LOGIN OAUTHBEARER XOAUTH2"
    } else {
        "PLAIN LOGIN"
    }
}

/// A command line split into its keyword (upper-cased) and the rest after
/// one space.
pub fn split(line: &[u8]) -> (String, &[u8]) {
    let end = line.iter().position(|&b| b == b' ').unwrap_or(line.len());
    let keyword = String::from_utf8_lossy(&line[..end]).to_ascii_uppercase();
    let rest = line.get(end + 1..).unwrap_or_default();
    (keyword, rest)
}

/// Runs the exchange for `mechanism` (upper-cased), with the client's
/// initial response if it sent one.
pub(crate) async fn exchange<D: Dialect>(
    d: &mut D,
    stream: &mut ClientStream,
    mechanism: &str,
    initial: Option<Secret>,
) -> Step<Option<Admitted>> {
    let tokens = d.session().rt.oauth.is_some();
    match mechanism {
        "XOAUTH2" | "OAUTHBEARER" if tokens => {
            token_login(d, stream, mechanism == "XOAUTH2", initial).await
        }
        "PLAIN" => {
            let message = match initial {
                Some(ir) => sasl::decode_response(ir.expose()),
                None => match continuation(d, stream, "").await? {
                    Some(answer) => sasl::decode_response(answer.expose()),
                    None => return Ok(None),
                },
            };
            match message.and_then(|m| sasl::decode_plain(&m)) {
                Ok(creds) => {
                    let tls = stream.is_tls();
                    let checked = d.session().check_password("PLAIN", creds, tls).await;
                    d.settled(stream, checked).await
                }
                Err(e) => {
                    d.session().count_auth("PLAIN", "invalid");
                    d.malformed(stream, &e.to_string()).await.map(|_| None)
                }
            }
        }
        "LOGIN" => {
            let user = match initial {
                Some(ir) => ir,
                None => match continuation(d, stream, sasl::LOGIN_USERNAME_PROMPT).await? {
                    Some(answer) => answer,
                    None => return Ok(None),
                },
            };
            let Some(password) = continuation(d, stream, sasl::LOGIN_PASSWORD_PROMPT).await? else {
                return Ok(None);
            };
            match sasl::decode_login(&user, &password) {
                Ok(creds) => {
                    let tls = stream.is_tls();
                    let checked = d.session().check_password("LOGIN", creds, tls).await;
                    d.settled(stream, checked).await
                }
                Err(e) => {
                    d.session().count_auth("LOGIN", "invalid");
                    d.malformed(stream, &e.to_string()).await.map(|_| None)
                }
            }
        }
        _ => d.unsupported(stream).await.map(|_| None),
    }
}

/// An OAUTHBEARER or XOAUTH2 exchange: a refused token is answered with
/// the mechanism's JSON error challenge, the client's dummy answer read,
/// then the failure (RFC 7628 3.2.3).
async fn token_login<D: Dialect>(
    d: &mut D,
    stream: &mut ClientStream,
    xoauth2: bool,
    initial: Option<Secret>,
) -> Step<Option<Admitted>> {
    let mechanism = if xoauth2 { "XOAUTH2" } else { "OAUTHBEARER" };
    let message = match initial {
        Some(ir) => ir,
        None => match continuation(d, stream, "").await? {
            Some(answer) => answer,
            None => return Ok(None),
        },
    };
    let bearer = match sasl::decode_bearer(&message, xoauth2) {
        Ok(b) => b,
        Err(e) => {
            d.session().count_auth(mechanism, "invalid");
            return d.malformed(stream, &e.to_string()).await.map(|_| None);
        }
    };
    let checked = d
        .session()
        .check_token(mechanism, bearer.authzid.as_deref(), &bearer.token)
        .await;
    match checked {
        Err(Refusal::Failed {
            at,
            why: Failure::Token,
        }) => {
            let challenge = d.challenge(&sasl::bearer_error_challenge(xoauth2));
            reply(stream, challenge).await?;
            d.answer(stream).await?;
            d.token_failed(stream, at).await.map(|_| None)
        }
        checked => d.settled(stream, checked).await,
    }
}

/// Sends a challenge and reads the answer. `Ok(None)` when the client
/// cancelled with `*` (answered), or its answer was not one.
async fn continuation<D: Dialect>(
    d: &mut D,
    stream: &mut ClientStream,
    prompt: &str,
) -> Step<Option<Secret>> {
    reply(stream, d.challenge(prompt)).await?;
    let Some(answer) = d.answer(stream).await? else {
        return Ok(None);
    };
    if answer.expose() == b"*" {
        reply(stream, d.cancelled().to_owned()).await?;
        return Ok(None);
    }
    Ok(Some(answer))
}
