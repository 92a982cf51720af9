//! The `ldap` source: users checked against an LDAP directory with a
//! simple bind, over `ldaps://` or StartTLS where configured.
//!
//! Search-then-bind (`bind_dn` set): a service account finds the user's
//! entry with the `filter` template (`%u` the whole user name, `%n` its
//! local part, `%d` its domain, each escaped by RFC 4515), then the user's
//! own password is checked by binding as that entry. Direct bind
//! (`user_dn` set): the DN template (values escaped by RFC 4514) is bound
//! directly. Either way `backend_attribute` (e.g. `mailHost`), when set,
//! names the backend that holds the mailbox.
//!
//! An empty password is refused before anything is sent: to LDAP it would
//! be an unauthenticated bind, which succeeds. Connections are pooled (at
//! most `pool_size` operations at once; idle connections are reused, dead
//! ones dropped) and every step is bounded by `timeout`. Invalid
//! credentials and unknown or ambiguous users are refusals; anything else
//! (directory down, timeouts, other result codes) is "unavailable".

use std::sync::{Arc, Mutex};
use std::time::Duration;

use ldap3::{
    dn_escape, ldap_escape, Ldap, LdapConnAsync, LdapConnSettings, LdapError, Scope, SearchEntry,
};
use tokio::sync::Semaphore;

use super::{AuthContext, AuthError, AuthFuture, Authenticator, Identity};
use crate::imap::Secret;

/// LDAP result code invalidCredentials (RFC 4511).
const INVALID_CREDENTIALS: u32 = 49;

pub enum Mode {
    /// Find the entry as the service account, then bind as it.
    Search {
        bind_dn: String,
        bind_password: Secret,
        base_dn: String,
        filter: String,
    },
    /// Bind as the DN the template makes.
    Direct { user_dn: String },
}

pub struct LdapAuth {
    url: String,
    settings: LdapConnSettings,
    mode: Mode,
    backend_attribute: Option<String>,
    timeout: Duration,
    /// Limits operations in flight (and so connections) to the pool size.
    permits: Semaphore,
    /// Idle connections bound as the service account.
    searchers: Mutex<Vec<Ldap>>,
    /// Idle connections used for users' binds (rebound each time).
    binders: Mutex<Vec<Ldap>>,
}

impl LdapAuth {
    pub fn new(
        url: String,
        tls: Option<Arc<rustls::ClientConfig>>,
        starttls: bool,
        mode: Mode,
        backend_attribute: Option<String>,
        pool_size: usize,
        timeout: Duration,
    ) -> LdapAuth {
        let mut settings = LdapConnSettings::new()
            .set_conn_timeout(timeout)
            .set_starttls(starttls);
        if let Some(config) = tls {
            settings = settings.set_config(config);
        }
        LdapAuth {
            url,
            settings,
            mode,
            backend_attribute,
            timeout,
            permits: Semaphore::new(pool_size),
            searchers: Mutex::new(Vec::new()),
            binders: Mutex::new(Vec::new()),
        }
    }

    /// An idle connection from `idle`, or a new one (bound as the service
    /// account when `service` is set).
    async fn connection(&self, idle: &Mutex<Vec<Ldap>>, service: bool) -> Result<Ldap, AuthError> {
        loop {
            let Some(mut ldap) = idle.lock().unwrap().pop() else {
                break;
            };
            if !ldap.is_closed() {
                return Ok(ldap);
            }
        }
        let (conn, mut ldap) = LdapConnAsync::with_settings(self.settings.clone(), &self.url)
            .await
            .map_err(|e| unavailable("connect", e))?;
        ldap3::drive!(conn);
        ldap.with_timeout(self.timeout);
        if service {
            if let Mode::Search {
                bind_dn,
                bind_password,
                ..
            } = &self.mode
            {
                let password = std::str::from_utf8(bind_password.expose())
                    .map_err(|_| AuthError::Unavailable("the bind password is not UTF-8".into()))?;
                ldap.simple_bind(bind_dn, password)
                    .await
                    .and_then(|r| r.success())
                    .map_err(|e| unavailable("service account bind", e))?;
            }
        }
        Ok(ldap)
    }

    fn give_back(idle: &Mutex<Vec<Ldap>>, ldap: Ldap) {
        idle.lock().unwrap().push(ldap);
    }

    /// The user's entry DN and backend, by the service account's search.
    async fn find(
        &self,
        user: &str,
        base_dn: &str,
        filter: &str,
    ) -> Result<(String, Option<String>), AuthError> {
        let mut ldap = self.connection(&self.searchers, true).await?;
        let filter = expand(filter, user, |v| ldap_escape(v).into_owned());
        let attrs: Vec<&str> = match &self.backend_attribute {
            Some(a) => vec![a.as_str()],
            None => vec!["1.1"],
        };
        let (entries, _) = ldap
            .with_timeout(self.timeout)
            .search(base_dn, Scope::Subtree, &filter, attrs)
            .await
            .and_then(|r| r.success())
            .map_err(|e| unavailable("search", e))?;
        Self::give_back(&self.searchers, ldap);
        match entries.len() {
            1 => {}
            0 => return Err(AuthError::Rejected),
            n => {
                tracing::warn!(
                    user,
                    entries = n,
                    "LDAP filter matches more than one entry; login refused"
                );
                return Err(AuthError::Rejected);
            }
        }
        let entry = SearchEntry::construct(entries.into_iter().next().expect("one"));
        let backend = self.backend_of(&entry);
        Ok((entry.dn, backend))
    }

    fn backend_of(&self, entry: &SearchEntry) -> Option<String> {
        let attr = self.backend_attribute.as_ref()?;
        entry
            .attrs
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(attr))
            .and_then(|(_, v)| v.first())
            .map(|v| v.trim().to_owned())
            .filter(|v| !v.is_empty())
    }

    /// Binds as `dn` with the user's password; with `read_backend`, reads
    /// the backend attribute of the entry as the user afterwards.
    async fn bind(
        &self,
        dn: &str,
        password: &str,
        read_backend: bool,
    ) -> Result<Option<String>, AuthError> {
        let mut ldap = self.connection(&self.binders, false).await?;
        match ldap
            .with_timeout(self.timeout)
            .simple_bind(dn, password)
            .await
        {
            Ok(r) if r.rc == 0 => {}
            Ok(r) if r.rc == INVALID_CREDENTIALS => {
                Self::give_back(&self.binders, ldap);
                return Err(AuthError::Rejected);
            }
            Ok(r) => {
                return Err(AuthError::Unavailable(format!(
                    "LDAP bind: result code {} {}",
                    r.rc, r.text
                )))
            }
            Err(e) => return Err(unavailable("bind", e)),
        }
        let mut backend = None;
        if read_backend {
            if let Some(attr) = &self.backend_attribute {
                let (entries, _) = ldap
                    .with_timeout(self.timeout)
                    .search(dn, Scope::Base, "(objectClass=*)", vec![attr.as_str()])
                    .await
                    .and_then(|r| r.success())
                    .map_err(|e| unavailable("reading the user's entry", e))?;
                backend = entries
                    .into_iter()
                    .next()
                    .and_then(|e| self.backend_of(&SearchEntry::construct(e)));
            }
        }
        Self::give_back(&self.binders, ldap);
        Ok(backend)
    }

    async fn check(&self, user: &str, password: &Secret) -> Result<Identity, AuthError> {
        if password.is_empty() {
            // An empty simple bind is an anonymous bind: it would succeed.
            return Err(AuthError::Rejected);
        }
        let password = std::str::from_utf8(password.expose()).map_err(|_| AuthError::Rejected)?;
        let _permit = tokio::time::timeout(self.timeout, self.permits.acquire())
            .await
            .map_err(|_| AuthError::Busy("every LDAP connection is in use".into()))?
            .expect("never closed");
        let backend = match &self.mode {
            Mode::Search {
                base_dn, filter, ..
            } => {
                let (dn, backend) = self.find(user, base_dn, filter).await?;
                self.bind(&dn, password, false).await?;
                backend
            }
            Mode::Direct { user_dn } => {
                let dn = expand(user_dn, user, |v| dn_escape(v).into_owned());
                self.bind(&dn, password, true).await?
            }
        };
        Ok(Identity {
            user: user.to_owned(),
            backend,
            pool: None,
            backend_password: None,
        })
    }
}

impl Authenticator for LdapAuth {
    fn authenticate<'a>(
        &'a self,
        user: &'a str,
        password: Secret,
        _ctx: &'a AuthContext,
    ) -> AuthFuture<'a> {
        Box::pin(async move {
            // Every step has its own timeout; this bounds the whole.
            tokio::time::timeout(self.timeout * 4, self.check(user, &password))
                .await
                .map_err(|_| {
                    AuthError::Unavailable("the directory did not answer in time".into())
                })?
        })
    }

    fn name(&self) -> &'static str {
        "ldap"
    }
}

fn unavailable(step: &str, e: LdapError) -> AuthError {
    AuthError::Unavailable(format!("LDAP {step}: {e}"))
}

/// The template with `%u` (user), `%n` (local part), `%d` (domain) and
/// `%%` replaced, each value passed through `escape`.
pub fn expand(template: &str, user: &str, escape: impl Fn(&str) -> String) -> String {
    let (local, domain) = user.split_once('@').unwrap_or((user, ""));
    let mut out = String::with_capacity(template.len() + user.len());
    let mut chars = template.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('u') => out.push_str(&escape(user)),
            Some('n') => out.push_str(&escape(local)),
            Some('d') => out.push_str(&escape(domain)),
            Some('%') => out.push('%'),
            Some(other) => {
                out.push('%');
                out.push(other);
            }
            None => out.push('%'),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn filter(t: &str, user: &str) -> String {
        expand(t, user, |v| ldap_escape(v).into_owned())
    }

    #[test]
    fn filters_escape_the_user_name() {
        assert_eq!(
            filter(
                "(&(objectClass=inetOrgPerson)(mail=%u))",
                "alice@example.com"
            ),
            "(&(objectClass=inetOrgPerson)(mail=alice@example.com))"
        );
        assert_eq!(filter("(uid=%n)", "*)(uid=*"), "(uid=\\2a\\29\\28uid=\\2a)");
        assert_eq!(filter("(uid=%n)", "a\\b"), "(uid=a\\5cb)");
        assert_eq!(
            filter("(&(uid=%n)(dc=%d))", "bob@corp.example"),
            "(&(uid=bob)(dc=corp.example))"
        );
        assert_eq!(filter("(x=100%%)(y=%q)", "z"), "(x=100%)(y=%q)");
    }

    #[test]
    fn dn_templates_escape_the_user_name() {
        let dn = |t: &str, user: &str| expand(t, user, |v| dn_escape(v).into_owned());
        assert_eq!(
            dn("uid=%n,ou=people,dc=example,dc=com", "alice@example.com"),
            "uid=alice,ou=people,dc=example,dc=com"
        );
        assert_eq!(
            dn("uid=%n,ou=people,dc=example,dc=com", "x,ou=admins"),
            "uid=x\\2cou\\3dadmins,ou=people,dc=example,dc=com"
        );
    }
}
