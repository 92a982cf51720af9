//! The `http` source: an authentication service that speaks nginx's
//! `auth_http` protocol, so a platform moving off nginx's mail proxy keeps
//! the service it runs.
//!
//! One `GET` per login, on a fresh connection (as nginx does), with the
//! credentials and the client in request headers:
//! `Auth-Method: plain`, `Auth-User`, `Auth-Pass` (both escaped as nginx
//! escapes them: `%XX` for space, `%`, control bytes and bytes above
//! 0x7e), `Auth-Protocol: imap`, `Auth-Login-Attempt` (per connection,
//! from 1), `Client-IP`, `Client-Host` (`[UNAVAILABLE]`: Postern does no
//! reverse lookups) and `Auth-SSL: on` for TLS clients, plus the
//! configured extra headers (a shared secret read from a file, say).
//!
//! The answer is in the response headers; the body is ignored. Any 2xx
//! status is an answer, and so is a 4xx that carries `Auth-Status` (a
//! refusal, as nginx reads it, which ignores the status code). A 4xx
//! without `Auth-Status` is the service refusing this request: a failure
//! of this login, answered like a wrong password, and not held against
//! the service by the circuit breaker; except 408 and 429 (the service is
//! busy) and 401 and 407 (it refused Postern's own credentials, so every
//! login would fail), which are the service's. 5xx and other statuses,
//! timeouts and unreachable services make the login `NO [UNAVAILABLE]`.
//! - `Auth-Status: OK` with `Auth-Server` and `Auth-Port`: the user is in.
//!   The server must be a configured backend, matched by its address
//!   (`Auth-Server:Auth-Port`) or by its name; `Auth-User` and `Auth-Pass`,
//!   when present, replace the user name and password used at the backend.
//! - Any other `Auth-Status` is a refusal, and its text is what the client
//!   reads after `NO [AUTHENTICATIONFAILED]`. With `Auth-Wait: N` the answer
//!   waits N seconds and the client may try again; without it the
//!   connection is closed after the answer, as nginx does.

use std::fmt::Write as _;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use super::{AuthContext, AuthError, AuthFuture, Authenticator, Identity};
use crate::config::HttpAuth as HttpAuthConfig;
use crate::http_client::{Endpoint, Response};
use crate::imap::Secret;

/// Longest `Auth-Status` text passed on to a client.
const MAX_STATUS_TEXT: usize = 200;
/// Longest `Auth-Wait` honoured.
pub const MAX_WAIT: Duration = Duration::from_secs(60);

pub struct HttpAuth {
    endpoint: Endpoint,
    timeout: Duration,
    /// Extra request headers, name and value, checked to be header text.
    headers: Vec<(String, Secret)>,
}

impl HttpAuth {
    /// `headers` are the extra request headers with their values already
    /// read (from files where configured).
    pub fn new(
        config: &HttpAuthConfig,
        headers: Vec<(String, Secret)>,
        tls: Option<Arc<rustls::ClientConfig>>,
    ) -> Result<HttpAuth, String> {
        Ok(HttpAuth {
            endpoint: Endpoint::parse(&config.url, "auth.http.url", tls)?,
            timeout: config.timeout,
            headers,
        })
    }

    /// The request as nginx writes it: HTTP/1.0, one per connection, the
    /// header names in nginx's case.
    fn request(&self, user: &str, password: &Secret, ctx: &AuthContext) -> Secret {
        let mut out = format!(
            "GET {} HTTP/1.0\r\nHost: {}\r\nAuth-Method: plain\r\nAuth-User: {}\r\nAuth-Pass: ",
            self.endpoint.target,
            self.endpoint.authority,
            escape(user.as_bytes())
        );
        out.push_str(&escape(password.expose()));
        let _ = write!(
            out,
            "\r\nAuth-Protocol: imap\r\nAuth-Login-Attempt: {}\r\nClient-IP: {}\r\nClient-Host: [UNAVAILABLE]\r\n",
            ctx.attempt,
            ctx.client.to_canonical()
        );
        if ctx.tls {
            out.push_str("Auth-SSL: on\r\n");
        }
        let mut bytes = out.into_bytes();
        for (name, value) in &self.headers {
            bytes.extend_from_slice(name.as_bytes());
            bytes.extend_from_slice(b": ");
            bytes.extend_from_slice(value.expose());
            bytes.extend_from_slice(b"\r\n");
        }
        bytes.extend_from_slice(b"\r\n");
        Secret::new(bytes)
    }

    async fn ask(
        &self,
        user: &str,
        password: &Secret,
        ctx: &AuthContext,
    ) -> Result<Answer, AuthError> {
        let request = self.request(user, password, ctx);
        let response = self
            .endpoint
            .exchange(&request, 0)
            .await
            .map_err(AuthError::Unavailable)?;
        answer(&response)
    }
}

/// What the service said, from the response headers.
#[derive(Debug, Default, PartialEq)]
struct Answer {
    status: String,
    server: Option<String>,
    port: Option<String>,
    user: Option<String>,
    pass: Option<Secret>,
    wait: Option<String>,
}

/// The answer in `response`; a 4xx without `Auth-Status` is a failure of
/// this login, except 408 and 429 (busy) and 401 and 407 (Postern's own
/// credentials refused: unavailable); any other status but 2xx and 4xx is
/// the service's failure.
fn answer(response: &Response) -> Result<Answer, AuthError> {
    let text = |name: &str| {
        response
            .header(name)
            .map(|v| String::from_utf8_lossy(v).trim().to_owned())
    };
    let status = text("Auth-Status");
    match (response.code, &status) {
        (200..=299, _) => {}
        // A refusal with the service's words, whatever the status code.
        (400..=499, Some(s)) if s != "OK" => {}
        // The service is overloaded or timed out: not this login's fault.
        (408 | 429, None) => {
            return Err(AuthError::Busy(format!(
                "the auth service answered HTTP {}",
                response.code
            )))
        }
        // Postern's own credentials for the service (its header_files) are
        // wrong: every login would fail, so this is the service's failure.
        (401 | 407, None) => {
            tracing::warn!(
                code = response.code,
                "the auth service refused Postern's own request: check auth.http.headers and header_files"
            );
            return Err(AuthError::Unavailable(format!(
                "the auth service answered HTTP {}",
                response.code
            )));
        }
        (400..=499, None) => {
            tracing::info!(
                code = response.code,
                "the auth service refused the request without Auth-Status; login failed"
            );
            return Err(AuthError::Rejected);
        }
        (code, _) => {
            return Err(AuthError::Unavailable(format!(
                "the auth service answered HTTP {code}"
            )))
        }
    }
    Ok(Answer {
        status: status
            .ok_or_else(|| AuthError::Unavailable("no Auth-Status header in the answer".into()))?,
        server: text("Auth-Server"),
        port: text("Auth-Port"),
        user: text("Auth-User"),
        pass: response
            .header("Auth-Pass")
            .map(|p| Secret::new(p.to_vec())),
        wait: text("Auth-Wait"),
    })
}

impl Authenticator for HttpAuth {
    fn authenticate<'a>(
        &'a self,
        user: &'a str,
        password: Secret,
        ctx: &'a AuthContext,
    ) -> AuthFuture<'a> {
        Box::pin(async move {
            let answer = tokio::time::timeout(self.timeout, self.ask(user, &password, ctx))
                .await
                .map_err(|_| {
                    AuthError::Unavailable(format!("no answer within {:?}", self.timeout))
                })??;
            decide(user, answer)
        })
    }

    fn name(&self) -> &'static str {
        "http"
    }
}

fn decide(user: &str, answer: Answer) -> Result<Identity, AuthError> {
    if answer.status != "OK" {
        let wait = match answer.wait.as_deref() {
            None | Some("") => None,
            Some(w) => Some(
                w.parse::<u64>()
                    .map(|s| Duration::from_secs(s).min(MAX_WAIT))
                    .map_err(|_| {
                        AuthError::Unavailable(format!(
                            "Auth-Wait `{w}` is not a number of seconds"
                        ))
                    })?,
            ),
        };
        return Err(AuthError::Refused {
            text: printable(&answer.status),
            wait,
        });
    }
    let server = answer
        .server
        .filter(|s| !s.is_empty())
        .ok_or_else(|| AuthError::Unavailable("Auth-Status OK without Auth-Server".into()))?;
    let port: u16 = answer
        .port
        .as_deref()
        .and_then(|p| p.parse().ok())
        .ok_or_else(|| AuthError::Unavailable("Auth-Status OK without a valid Auth-Port".into()))?;
    let address = match server.parse::<IpAddr>() {
        Ok(IpAddr::V6(ip)) => format!("[{ip}]:{port}"),
        _ => format!("{server}:{port}"),
    };
    let backend_user = match answer.user {
        Some(u) if !u.is_empty() => {
            if u.chars().any(char::is_control) {
                return Err(AuthError::Unavailable(
                    "Auth-User with control characters".into(),
                ));
            }
            u
        }
        _ => user.to_owned(),
    };
    Ok(Identity {
        user: backend_user,
        backend: Some(address),
        pool: None,
        backend_password: answer.pass,
    })
}

/// nginx's escaping of `Auth-User` and `Auth-Pass` (`ngx_escape_uri` with
/// its mail-auth table): `%XX` for space, `%`, control bytes, DEL and every
/// byte above 0x7e; everything else as it is.
pub fn escape(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len());
    for &b in bytes {
        if b <= 0x20 || b == b'%' || b >= 0x7f {
            let _ = write!(out, "%{b:02X}");
        } else {
            out.push(b as char);
        }
    }
    out
}

/// The service's refusal text, as a client may read it: printable ASCII,
/// bounded.
fn printable(text: &str) -> String {
    let clean: String = text
        .chars()
        .filter(|c| c.is_ascii_graphic() || *c == ' ')
        .take(MAX_STATUS_TEXT)
        .collect();
    if clean.trim().is_empty() {
        "Authentication failed.".into()
    } else {
        clean
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escaping_matches_nginx() {
        assert_eq!(escape(b"alice@example.com"), "alice@example.com");
        assert_eq!(escape(b"p%ss w\xc3\xa9rd"), "p%25ss%20w%C3%A9rd");
        assert_eq!(escape(b"a\r\nb\0\x7f"), "a%0D%0Ab%00%7F");
        assert_eq!(escape(b"(*)\\\"'+:/?&="), "(*)\\\"'+:/?&=");
    }

    fn answer(status: &str) -> Answer {
        Answer {
            status: status.into(),
            ..Answer::default()
        }
    }

    #[test]
    fn ok_names_the_backend_and_may_replace_user_and_password() {
        let mut a = answer("OK");
        a.server = Some("192.0.2.1".into());
        a.port = Some("143".into());
        let id = decide("alice", a).unwrap();
        assert_eq!(id.user, "alice");
        assert_eq!(id.backend.as_deref(), Some("192.0.2.1:143"));
        assert!(id.backend_password.is_none());

        let mut a = answer("OK");
        a.server = Some("2001:db8::1".into());
        a.port = Some("993".into());
        a.user = Some("alice@internal".into());
        a.pass = Some(Secret::new(b"master-made".to_vec()));
        let id = decide("alice", a).unwrap();
        assert_eq!(id.user, "alice@internal");
        assert_eq!(id.backend.as_deref(), Some("[2001:db8::1]:993"));
        assert_eq!(id.backend_password.unwrap().expose(), b"master-made");

        let mut a = answer("OK");
        a.server = Some("mail-1".into());
        assert!(
            matches!(decide("alice", a), Err(AuthError::Unavailable(_))),
            "no port"
        );
        assert!(matches!(
            decide("alice", answer("OK")),
            Err(AuthError::Unavailable(_))
        ));
    }

    fn response(code: u16, headers: &[(&str, &str)]) -> Response {
        Response {
            code,
            headers: headers
                .iter()
                .map(|(n, v)| (n.to_string(), Secret::new(v.as_bytes().to_vec())))
                .collect(),
            body: Secret::new(Vec::new()),
        }
    }

    #[test]
    fn statuses_are_classified_by_cause() {
        let ok = [
            ("Auth-Status", "OK"),
            ("Auth-Server", "192.0.2.1"),
            ("Auth-Port", "143"),
        ];
        assert_eq!(super::answer(&response(200, &ok)).unwrap().status, "OK");
        // A 4xx refusal in nginx's words is a refusal like a 200 one.
        let refusal = [("Auth-Status", "Invalid login"), ("Auth-Wait", "2")];
        for code in [200, 403] {
            let a = super::answer(&response(code, &refusal)).unwrap();
            assert!(
                matches!(decide("alice", a), Err(AuthError::Refused { ref text, .. }) if text == "Invalid login"),
                "{code}"
            );
        }
        // A 4xx without Auth-Status fails this login only…
        for code in [400, 403, 404, 422] {
            assert!(
                matches!(
                    super::answer(&response(code, &[])),
                    Err(AuthError::Rejected)
                ),
                "{code}"
            );
        }
        // …unless it says the service is busy, or refused Postern itself.
        for code in [408, 429] {
            let answer = super::answer(&response(code, &[]));
            assert!(matches!(answer, Err(AuthError::Busy(_))), "{code}");
        }
        for code in [401, 407] {
            let answer = super::answer(&response(code, &[]));
            assert!(matches!(answer, Err(AuthError::Unavailable(_))), "{code}");
        }
        // The service's own failures, and answers that contradict
        // themselves, are "unavailable".
        for (code, headers) in [
            (500, &[][..]),
            (502, &[][..]),
            (503, &refusal[..]),
            (302, &[][..]),
            (403, &ok[..]),
            (200, &[][..]),
        ] {
            assert!(
                matches!(
                    super::answer(&response(code, headers)),
                    Err(AuthError::Unavailable(_))
                ),
                "{code} {headers:?}"
            );
        }
    }

    #[test]
    fn refusals_carry_the_text_and_the_wait() {
        let mut a = answer("Invalid login or password");
        a.wait = Some("3".into());
        match decide("alice", a) {
            Err(AuthError::Refused { text, wait }) => {
                assert_eq!(text, "Invalid login or password");
                assert_eq!(wait, Some(Duration::from_secs(3)));
            }
            other => panic!("{other:?}"),
        }
        let mut a = answer("Go away\u{7}\u{1b}[31m");
        a.wait = Some("999999".into());
        match decide("alice", a) {
            Err(AuthError::Refused { text, wait }) => {
                assert_eq!(text, "Go away[31m");
                assert_eq!(wait, Some(MAX_WAIT));
            }
            other => panic!("{other:?}"),
        }
        match decide("alice", answer("")) {
            Err(AuthError::Refused { text, wait: None }) => {
                assert_eq!(text, "Authentication failed.")
            }
            other => panic!("{other:?}"),
        }
        let mut a = answer("No");
        a.wait = Some("soon".into());
        assert!(matches!(decide("alice", a), Err(AuthError::Unavailable(_))));
    }
}
