//! Authentication at the edge: the [`Authenticator`] trait every credential
//! source implements, the [`Identity`] it returns, and username
//! normalisation. A wrong password stops here; the backend never sees it.
//!
//! Sources: [`static_users`] (a YAML users file or a Dovecot passwd-file),
//! [`ldap`] (a directory) and [`http`] (a service speaking nginx's
//! `auth_http` protocol); [`oauth`] checks bearer tokens. Around them:
//! [`cache`], [`breaker`] and the login defence in [`guard`].
//! Password checks run on the blocking thread pool, never on the async
//! workers that carry other sessions.

pub mod breaker;
pub mod cache;
pub mod guard;
pub mod http;
pub mod ldap;
pub mod oauth;
pub mod password;
pub mod static_users;

use std::future::Future;
use std::net::IpAddr;
use std::pin::Pin;
use std::time::Duration;

use crate::config::Auth as AuthConfig;
use crate::imap::Secret;

/// Who logged in, and where their mailbox lives if the directory says so.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// The normalised username; also the name used at the backend.
    pub user: String,
    /// A backend from the directory, by name or address; `None` lets the
    /// hash place the user.
    pub backend: Option<String>,
    /// A pool name from the directory; `None` leaves the choice to the
    /// domain rules and the default pool.
    pub pool: Option<String>,
    /// The password to use at the backend, when the source names one
    /// other than the client's.
    pub backend_password: Option<Secret>,
}

/// What a source may know about the login besides the credentials.
#[derive(Debug, Clone)]
pub struct AuthContext {
    /// The client's address (from the PROXY header where trusted).
    pub client: IpAddr,
    /// This connection's login attempt, from 1.
    pub attempt: u32,
    /// Whether the client connection is TLS.
    pub tls: bool,
}

#[cfg(test)]
impl AuthContext {
    /// A first attempt over TLS from loopback.
    pub fn test() -> AuthContext {
        AuthContext {
            client: IpAddr::from([127, 0, 0, 1]),
            attempt: 1,
            tls: true,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// Unknown user or wrong password: the client is told only that it failed.
    #[error("invalid credentials")]
    Rejected,
    /// The source could not answer (down, timed out).
    #[error("authentication source unavailable: {0}")]
    Unavailable(String),
    /// Postern's own connections to the source are all in use: answered
    /// like `Unavailable`, but not held against the source.
    #[error("authentication source busy: {0}")]
    Busy(String),
    /// The password was right but the account may not log in (Dovecot's
    /// `nologin`): answered like a wrong password, after the same delay;
    /// `reason` reaches the client only where `auth.show_disabled_reason`
    /// allows it. Sources return it only for a correct password, so it
    /// tells a guesser nothing.
    #[error("account disabled")]
    Disabled { reason: Option<String> },
    /// The source refused with its own words for the client. With `wait`,
    /// the answer is delayed that long and the client may try again;
    /// without, the connection closes after the answer.
    #[error("refused by the source: {text}")]
    Refused {
        text: String,
        wait: Option<Duration>,
    },
}

pub type AuthFuture<'a> = Pin<Box<dyn Future<Output = Result<Identity, AuthError>> + Send + 'a>>;

/// A source of truth about users and their credentials.
pub trait Authenticator: Send + Sync {
    /// Checks `password` for the already normalised `user`.
    fn authenticate<'a>(
        &'a self,
        user: &'a str,
        password: Secret,
        ctx: &'a AuthContext,
    ) -> AuthFuture<'a>;

    /// Name for logs and the `source` metric label.
    fn name(&self) -> &'static str;
}

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum UsernameError {
    #[error("user name is empty")]
    Empty,
    #[error("user name is longer than 255 bytes")]
    TooLong,
    #[error("user name is not UTF-8")]
    NotUtf8,
    #[error("user name contains control characters")]
    ControlCharacters,
    #[error("user name has leading, trailing or doubled spaces")]
    Spaces,
}

/// Applies the configured normalisation: lower-casing and a default domain.
/// Refuses names no mail system would hold (control characters, non-UTF-8),
/// so they never reach a log line, a directory query or a backend raw.
pub fn normalise_username(raw: &[u8], config: &AuthConfig) -> Result<String, UsernameError> {
    if raw.is_empty() {
        return Err(UsernameError::Empty);
    }
    if raw.len() > 255 {
        return Err(UsernameError::TooLong);
    }
    let text = std::str::from_utf8(raw).map_err(|_| UsernameError::NotUtf8)?;
    if text.chars().any(char::is_control) {
        return Err(UsernameError::ControlCharacters);
    }
    // A directory would match ` alice` as `alice`: one mailbox must not
    // have two names.
    if text.starts_with(' ') || text.ends_with(' ') || text.contains("  ") {
        return Err(UsernameError::Spaces);
    }
    let mut user = if config.lowercase_usernames {
        text.to_lowercase()
    } else {
        text.to_owned()
    };
    if let Some(domain) = &config.default_domain {
        if !user.contains('@') {
            user.push('@');
            user.push_str(domain);
        }
    }
    Ok(user)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::AuthSource;
    use std::time::Duration;

    fn config(lower: bool, domain: Option<&str>) -> AuthConfig {
        AuthConfig {
            source: AuthSource::Static,
            static_users: None,
            http: None,
            ldap: None,
            oauth: None,
            negative_cache_ttl: Duration::ZERO,
            circuit_breaker: Default::default(),
            brute_force: Default::default(),
            trusted_forwarders: Vec::new(),
            show_disabled_reason: false,
            failure_delay: Duration::ZERO,
            lowercase_usernames: lower,
            default_domain: domain.map(str::to_owned),
            cache_ttl_set: Some(Duration::ZERO),
        }
    }

    #[test]
    fn usernames_are_lowercased_and_get_the_default_domain() {
        let c = config(true, Some("example.com"));
        assert_eq!(
            normalise_username(b"Alice", &c).unwrap(),
            "alice@example.com"
        );
        assert_eq!(
            normalise_username(b"Bob@Example.ORG", &c).unwrap(),
            "bob@example.org"
        );
        let c = config(false, None);
        assert_eq!(normalise_username(b"Alice", &c).unwrap(), "Alice");
    }

    #[test]
    fn hostile_usernames_are_refused() {
        let c = config(true, None);
        assert_eq!(normalise_username(b"", &c), Err(UsernameError::Empty));
        assert_eq!(
            normalise_username(b"a\r\nb", &c),
            Err(UsernameError::ControlCharacters)
        );
        assert_eq!(
            normalise_username(b"a\0b", &c),
            Err(UsernameError::ControlCharacters)
        );
        assert_eq!(
            normalise_username(b"\xff\xfe", &c),
            Err(UsernameError::NotUtf8)
        );
        assert_eq!(
            normalise_username(&[b'a'; 300], &c),
            Err(UsernameError::TooLong)
        );
        for spaced in [&b" alice"[..], b"alice ", b"al  ice"] {
            assert_eq!(normalise_username(spaced, &c), Err(UsernameError::Spaces));
        }
    }
}
