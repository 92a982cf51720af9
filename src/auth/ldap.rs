//! The `ldap` source: users checked against an LDAP directory with a
//! simple bind, over `ldaps://` or StartTLS where configured.
//!
//! Every answer is classified by its cause, because only the directory's
//! own failures may open the circuit breaker (which counts "unavailable"
//! answers): a client must not be able to take logins down for everyone
//! by sending names the directory chokes on. A failure the client's input
//! caused is a failure of that login ([`AuthError::Rejected`]): a wrong
//! password (invalidCredentials, 49), inappropriateAuthentication (48),
//! a user's DN the directory finds malformed or absent (invalidDNSyntax
//! 34, noSuchObject 32, invalidAttributeSyntax 21, on the user's bind or
//! the read of the user's entry), a filter or DN that cannot be built
//! from the name (a placeholder the name leaves empty, as `%n` does for
//! `@example.com`; a filter the client library cannot parse), and a
//! search finding no entry or more than one. Everything else is
//! [`AuthError::Unavailable`]: connection and TLS failures, timeouts, the
//! service account's bind failing, and server-side result codes (busy 51,
//! unavailable 52, unwillingToPerform 53, other 80, and any code not
//! listed above, including 32 and 34 on the service account's search,
//! whose base is configuration, not input). The templates themselves are
//! checked when the configuration is loaded ([`check_filter_template`],
//! [`check_dn_template`]), so a broken one is a configuration error, not
//! an outage on every login.
//!
//! Search-then-bind (`bind_dn` set): a service account finds the user's
//! entry with the `filter` template (`%u` the whole user name, `%n` its
//! local part, `%d` its domain, each escaped by RFC 4515), then the user's
//! own password is checked by binding as that entry. Direct bind
//! (`user_dn` set): the DN template (values escaped by RFC 4514) is bound
//! directly, and the entry is then read as the user (a base-scope search
//! on the bound DN).
//!
//! One identity per mailbox: the user name Postern goes on with is taken
//! from the entry, not from what the client typed: the least (in byte
//! order, for the same name every time) of the values of
//! `user_attribute` (default `mail`) that are valid user names, else of
//! `uid`, normalised like a typed name (lower-cased, default domain). So
//! `alice`, `ALICE@example.com` and `alice@example.com` are one user to
//! the backend, the per-user limits and the logs. An entry with neither
//! attribute keeps the typed name (with a warning in the log), and so
//! does a direct bind whose entry the user may not read (a directory ACL
//! that hides it, noSuchObject or insufficientAccessRights on the read),
//! unless `disabled_attribute` is set: then an unreadable entry makes the
//! login unavailable, never a disabled account that gets in.
//! `backend_attribute` (e.g. `mailHost`), when set, names the backend that
//! holds the mailbox.
//!
//! Disabled accounts: with `disabled_attribute` set (e.g. `accountStatus`,
//! or any attribute the directory's schema has), an entry whose attribute
//! holds one of `disabled_values` (compared without regard to case) is
//! refused as [`AuthError::Disabled`], but only once the bind proved the
//! password right; a wrong password stays a plain refusal, so the answer
//! tells a guesser nothing. The backend is never asked.
//!
//! An empty password is refused before anything is sent: to LDAP it would
//! be an unauthenticated bind, which succeeds. Connections are pooled (at
//! most `pool_size` operations at once; idle connections are reused, dead
//! ones dropped) and every step is bounded by `timeout`.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use ldap3::{
    dn_escape, ldap_escape, Ldap, LdapConnAsync, LdapConnSettings, LdapError, LdapResult, Scope,
    SearchEntry,
};
use tokio::sync::Semaphore;

use super::{normalise_username, AuthContext, AuthError, AuthFuture, Authenticator, Identity};
use crate::config::Auth as AuthConfig;
use crate::imap::Secret;

/// Result codes (RFC 4511) a user's bind, or the read of the user's own
/// entry, gets for input the client chose: invalidAttributeSyntax,
/// noSuchObject, invalidDNSyntax, inappropriateAuthentication,
/// invalidCredentials.
const CAUSED_BY_THE_USER: [u32; 5] = [21, 32, 34, 48, 49];
/// Result codes on the read of the user's own entry after a successful
/// bind that mean the user may not read it (noSuchObject,
/// insufficientAccessRights): the entry's attributes count as absent.
const ENTRY_UNREADABLE: [u32; 2] = [32, 50];

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

/// What is read from a user's entry, and how names are normalised.
pub struct Reading {
    /// The attribute holding the canonical user name (`mail`); `uid` is
    /// the fallback.
    pub user_attribute: String,
    /// The attribute naming the user's backend.
    pub backend_attribute: Option<String>,
    /// The attribute that marks a disabled account…
    pub disabled_attribute: Option<String>,
    /// …when it holds one of these (compared without regard to case).
    pub disabled_values: Vec<String>,
    /// Lower-casing and the default domain, as for typed names.
    pub naming: AuthConfig,
}

/// What the entry says about the user.
#[derive(Debug, Default, PartialEq)]
struct Found {
    /// The canonical name, when the entry has one.
    user: Option<String>,
    backend: Option<String>,
    disabled: bool,
}

pub struct LdapAuth {
    url: String,
    settings: LdapConnSettings,
    mode: Mode,
    reading: Reading,
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
        reading: Reading,
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
            reading,
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
                // Whatever the code, the service account's own failure.
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

    /// The attributes to ask for: the user name, `uid`, the backend and
    /// the disabled mark, each once.
    fn attributes(&self) -> Vec<&str> {
        let r = &self.reading;
        let mut attrs: Vec<&str> = Vec::with_capacity(4);
        let wanted = [
            Some(r.user_attribute.as_str()),
            Some("uid"),
            r.backend_attribute.as_deref(),
            r.disabled_attribute.as_deref(),
        ];
        for a in wanted.into_iter().flatten() {
            if !attrs.iter().any(|b| b.eq_ignore_ascii_case(a)) {
                attrs.push(a);
            }
        }
        attrs
    }

    /// The user's entry DN and what it says, by the service account's
    /// search.
    async fn find(
        &self,
        user: &str,
        base_dn: &str,
        filter: &str,
    ) -> Result<(String, Found), AuthError> {
        let Some(filter) = expand(filter, user, |v| ldap_escape(v).into_owned()) else {
            tracing::debug!(
                user,
                "LDAP filter: a placeholder the user name leaves empty"
            );
            return Err(AuthError::Rejected);
        };
        let mut ldap = self.connection(&self.searchers, true).await?;
        let result = ldap
            .with_timeout(self.timeout)
            .search(base_dn, Scope::Subtree, &filter, self.attributes())
            .await;
        let entries = match result {
            Ok(r) if r.1.rc == 0 => r.0,
            // The search base is configuration: any code is the
            // directory's (or the operator's) failure, not the client's.
            Ok(r) => return Err(unavailable("search", LdapError::from(r.1))),
            Err(LdapError::FilterParsing) => {
                Self::give_back(&self.searchers, ldap);
                tracing::info!(
                    user,
                    "LDAP filter made from the user name does not parse; login refused"
                );
                return Err(AuthError::Rejected);
            }
            Err(e) => return Err(unavailable("search", e)),
        };
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
        let found = self.read(&entry);
        Ok((entry.dn, found))
    }

    /// What `entry` says about its user.
    fn read(&self, entry: &SearchEntry) -> Found {
        fn values<'a>(entry: &'a SearchEntry, attr: &'a str) -> impl Iterator<Item = &'a str> {
            entry
                .attrs
                .iter()
                .filter(move |(k, _)| k.eq_ignore_ascii_case(attr))
                .flat_map(|(_, v)| v.iter())
                .map(|v| v.trim())
                .filter(|v| !v.is_empty())
        }
        let r = &self.reading;
        let name = |attr: &str| {
            // The least of the values: an attribute's values are a set, in
            // no order the directory promises, and one mailbox must always
            // get the same name.
            values(entry, attr)
                .filter_map(|v| normalise_username(v.as_bytes(), &r.naming).ok())
                .min()
        };
        Found {
            user: name(&r.user_attribute).or_else(|| name("uid")),
            backend: r
                .backend_attribute
                .as_deref()
                .and_then(|a| values(entry, a).next().map(str::to_owned)),
            disabled: r.disabled_attribute.as_deref().is_some_and(|a| {
                values(entry, a).any(|v| {
                    r.disabled_values
                        .iter()
                        .any(|d| d.trim().eq_ignore_ascii_case(v))
                })
            }),
        }
    }

    /// Binds as `dn` with the user's password; with `read_entry`, reads
    /// the entry as the user afterwards (direct bind: nothing was read
    /// before).
    async fn bind(&self, dn: &str, password: &str, read_entry: bool) -> Result<Found, AuthError> {
        let mut ldap = self.connection(&self.binders, false).await?;
        match ldap
            .with_timeout(self.timeout)
            .simple_bind(dn, password)
            .await
        {
            Ok(r) if r.rc == 0 => {}
            Ok(r) => {
                let refused = CAUSED_BY_THE_USER.contains(&r.rc);
                let answer = classify("bind", r);
                if refused {
                    // The connection is still good: only the bind failed.
                    Self::give_back(&self.binders, ldap);
                }
                return Err(answer);
            }
            Err(e) => return Err(unavailable("bind", e)),
        }
        let mut found = Found::default();
        if read_entry {
            let result = ldap
                .with_timeout(self.timeout)
                .search(dn, Scope::Base, "(objectClass=*)", self.attributes())
                .await
                .map_err(|e| unavailable("reading the user's entry", e))?;
            match result.1.rc {
                0 => {
                    if let Some(entry) = result.0.into_iter().next() {
                        found = self.read(&SearchEntry::construct(entry));
                    }
                }
                // Without the entry, a disabled account would look enabled:
                // fail closed, and loudly.
                rc if ENTRY_UNREADABLE.contains(&rc)
                    && self.reading.disabled_attribute.is_some() =>
                {
                    return Err(AuthError::Unavailable(format!(
                        "the user may not read their own LDAP entry (result {rc}), so disabled_attribute cannot be checked: allow it in the directory's ACLs"
                    )));
                }
                rc if ENTRY_UNREADABLE.contains(&rc) => {
                    tracing::debug!(dn, rc, "the user may not read their LDAP entry");
                }
                _ => return Err(classify("reading the user's entry", result.1)),
            }
        }
        Self::give_back(&self.binders, ldap);
        Ok(found)
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
        let found = match &self.mode {
            Mode::Search {
                base_dn, filter, ..
            } => {
                let (dn, found) = self.find(user, base_dn, filter).await?;
                self.bind(&dn, password, false).await?;
                found
            }
            Mode::Direct { user_dn } => {
                let Some(dn) = expand(user_dn, user, |v| dn_escape(v).into_owned()) else {
                    tracing::debug!(user, "LDAP DN: a placeholder the user name leaves empty");
                    return Err(AuthError::Rejected);
                };
                self.bind(&dn, password, true).await?
            }
        };
        // Only now: the password was right.
        if found.disabled {
            return Err(AuthError::Disabled { reason: None });
        }
        let canonical = found.user.unwrap_or_else(|| {
            tracing::warn!(
                user,
                attribute = self.reading.user_attribute,
                "the LDAP entry holds no user name (nor uid) Postern can read; the typed name is used"
            );
            user.to_owned()
        });
        Ok(Identity {
            user: canonical,
            backend: found.backend,
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

/// A non-success result of a step on the user's own DN: a refusal when the
/// client's input caused it, else the directory's failure.
fn classify(step: &str, r: LdapResult) -> AuthError {
    if CAUSED_BY_THE_USER.contains(&r.rc) {
        if r.rc != 49 {
            tracing::debug!(
                step,
                rc = r.rc,
                text = r.text,
                "LDAP refused the user's input"
            );
        }
        AuthError::Rejected
    } else {
        unavailable(step, LdapError::from(r))
    }
}

/// The template with `%u` (user), `%n` (local part), `%d` (domain) and
/// `%%` replaced, each value passed through `escape`; `None` when a
/// placeholder the template uses would be empty (`%n` of `@example.com`,
/// `%d` of `alice`): such a name cannot be this directory's user.
pub fn expand(template: &str, user: &str, escape: impl Fn(&str) -> String) -> Option<String> {
    let (local, domain) = user.split_once('@').unwrap_or((user, ""));
    let mut out = String::with_capacity(template.len() + user.len());
    let mut chars = template.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        let value = match chars.next() {
            Some('u') => user,
            Some('n') => local,
            Some('d') => domain,
            Some('%') => {
                out.push('%');
                continue;
            }
            Some(other) => {
                out.push('%');
                out.push(other);
                continue;
            }
            None => {
                out.push('%');
                continue;
            }
        };
        if value.is_empty() {
            return None;
        }
        out.push_str(&escape(value));
    }
    Some(out)
}

/// The placeholders a template may hold; anything else after `%` is a
/// mistake.
fn check_placeholders(template: &str) -> Result<(), String> {
    let mut chars = template.chars();
    let mut used = false;
    while let Some(c) = chars.next() {
        if c == '%' {
            match chars.next() {
                Some('u' | 'n') => used = true,
                Some('d' | '%') => {}
                Some(other) => {
                    return Err(format!(
                        "unknown placeholder `%{other}` (use %u, %n, %d, or %% for a %)"
                    ))
                }
                None => return Err("ends in a lone `%` (write %% for a %)".into()),
            }
        }
    }
    if used {
        Ok(())
    } else {
        Err("must contain %u or %n".into())
    }
}

/// A user name that fills every placeholder, for checking templates.
const SAMPLE_USER: &str = "user@example.com";

/// Checks a search filter template as loaded from the configuration: known
/// placeholders, and a filter (RFC 4515) once they are filled.
pub fn check_filter_template(template: &str) -> Result<(), String> {
    check_placeholders(template)?;
    let filter = expand(template, SAMPLE_USER, |v| ldap_escape(v).into_owned())
        .expect("the sample fills every placeholder");
    ldap3::parse_filter(&filter)
        .map(|_| ())
        .map_err(|()| format!("`{template}` is not an LDAP filter (RFC 4515)"))
}

/// Checks a DN template as loaded from the configuration: known
/// placeholders, and a DN (RFC 4514) once they are filled.
pub fn check_dn_template(template: &str) -> Result<(), String> {
    check_placeholders(template)?;
    let dn = expand(template, SAMPLE_USER, |v| dn_escape(v).into_owned())
        .expect("the sample fills every placeholder");
    check_dn(&dn).map_err(|e| format!("`{template}` is not a DN (RFC 4514): {e}"))
}

/// Checks a DN's syntax (RFC 4514), allowing spaces around the separators
/// as directories do.
pub fn check_dn(dn: &str) -> Result<(), String> {
    if dn.trim().is_empty() {
        return Err("empty".into());
    }
    let bytes = dn.as_bytes();
    let mut i = 0;
    let skip_spaces = |i: &mut usize| {
        while *i < bytes.len() && bytes[*i] == b' ' {
            *i += 1;
        }
    };
    loop {
        // attributeType: descr or numericoid.
        skip_spaces(&mut i);
        let start = i;
        while i < bytes.len() && (bytes[i].is_ascii_alphanumeric() || b"-.".contains(&bytes[i])) {
            i += 1;
        }
        let name = &dn[start..i];
        let descr = name.starts_with(|c: char| c.is_ascii_alphabetic()) && !name.contains('.');
        let oid = !name.is_empty()
            && name
                .split('.')
                .all(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()))
            && name.contains('.');
        if !(descr || oid) {
            return Err(format!("`{name}` at byte {start} is not an attribute type"));
        }
        skip_spaces(&mut i);
        if bytes.get(i) != Some(&b'=') {
            return Err(format!("`=` expected after `{name}`"));
        }
        i += 1;
        skip_spaces(&mut i);
        // attributeValue: #hex or a string with escapes.
        if bytes.get(i) == Some(&b'#') {
            i += 1;
            let start = i;
            while i < bytes.len() && bytes[i].is_ascii_hexdigit() {
                i += 1;
            }
            if i == start || (i - start) % 2 != 0 {
                return Err(format!("bad hex value for `{name}`"));
            }
        } else {
            while i < bytes.len() && !b",+".contains(&bytes[i]) {
                match bytes[i] {
                    b'\\' => {
                        let next = bytes.get(i + 1).copied();
                        match next {
                            Some(c) if b"\\ #=\"+,;<>".contains(&c) => i += 2,
                            Some(c)
                                if c.is_ascii_hexdigit()
                                    && bytes.get(i + 2).is_some_and(u8::is_ascii_hexdigit) =>
                            {
                                i += 3
                            }
                            _ => return Err(format!("bad escape in the value of `{name}`")),
                        }
                    }
                    b'"' | b';' | b'<' | b'>' | 0 => {
                        return Err(format!(
                            "`{}` must be escaped in the value of `{name}`",
                            bytes[i] as char
                        ))
                    }
                    _ => i += 1,
                }
            }
        }
        skip_spaces(&mut i);
        match bytes.get(i) {
            None => return Ok(()),
            Some(b',' | b'+') => {
                i += 1;
                if i >= bytes.len() || dn[i..].trim().is_empty() {
                    return Err("ends in a separator".into());
                }
            }
            Some(_) => return Err(format!("unexpected text at byte {i}")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn filter(t: &str, user: &str) -> String {
        expand(t, user, |v| ldap_escape(v).into_owned()).unwrap()
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
        let dn = |t: &str, user: &str| expand(t, user, |v| dn_escape(v).into_owned()).unwrap();
        assert_eq!(
            dn("uid=%n,ou=people,dc=example,dc=com", "alice@example.com"),
            "uid=alice,ou=people,dc=example,dc=com"
        );
        assert_eq!(
            dn("uid=%n,ou=people,dc=example,dc=com", "x,ou=admins"),
            "uid=x\\2cou\\3dadmins,ou=people,dc=example,dc=com"
        );
        for user in ["x,ou=admins", "a=b", " lead", "trail ", "#x", "q\"<>;+\\"] {
            let made = dn("uid=%n,ou=people,dc=example,dc=com", user);
            assert!(check_dn(&made).is_ok(), "{user}: {made}");
        }
    }

    #[test]
    fn an_empty_placeholder_builds_nothing() {
        let dn = |t: &str, user: &str| expand(t, user, |v| dn_escape(v).into_owned());
        assert_eq!(
            dn("uid=%n,ou=people,dc=example,dc=com", "@example.com"),
            None
        );
        assert_eq!(dn("uid=%n,dc=%d", "alice"), None);
        assert!(dn("uid=%n,ou=people", "alice").is_some());
        assert_eq!(
            expand("(uid=%u)", "@", |v| v.to_owned()).as_deref(),
            Some("(uid=@)")
        );
    }

    #[test]
    fn templates_are_checked_at_load() {
        assert!(
            check_filter_template("(&(objectClass=inetOrgPerson)(|(mail=%u)(uid=%u)))").is_ok()
        );
        assert!(check_filter_template("(uid=%n)").is_ok());
        for (bad, says) in [
            ("(&(uid=%n)", "not an LDAP filter"),
            ("uid=%n)(", "not an LDAP filter"),
            ("(uid=%U)", "%U"),
            ("(cn=x)", "%u or %n"),
            ("(uid=%n)%", "lone"),
        ] {
            let err = check_filter_template(bad).unwrap_err();
            assert!(err.contains(says), "{bad}: {err}");
        }
        assert!(check_dn_template("uid=%n,ou=people,dc=example,dc=com").is_ok());
        assert!(check_dn_template("uid=%n, ou=people, dc=example, dc=com").is_ok());
        assert!(check_dn_template("cn=%u+uid=%n,ou=people,1.2.3=x").is_ok());
        for (bad, says) in [
            ("uid=%n,,dc=x", "attribute type"),
            ("uid=%n,ou", "`=` expected"),
            ("uid=%n,", "separator"),
            ("uid=%n;dc=x", "escaped"),
            ("uid=%n,dc=a\\qb", "escape"),
            ("uid=%x,dc=x", "%x"),
            ("dc=x", "%u or %n"),
            ("(uid=%n)", "attribute type"),
        ] {
            let err = check_dn_template(bad).unwrap_err();
            assert!(err.contains(says), "{bad}: {err}");
        }
        assert!(check_dn("cn=postern,dc=example,dc=com").is_ok());
        assert!(check_dn("").is_err());
    }

    fn source(mode: Mode, disabled: Option<&str>) -> LdapAuth {
        let naming: AuthConfig =
            crate::config::from_yaml("source: ldap\nlowercase_usernames: true\n").unwrap();
        LdapAuth::new(
            "ldap://127.0.0.1:1".into(),
            None,
            false,
            mode,
            Reading {
                user_attribute: "mail".into(),
                backend_attribute: Some("mailHost".into()),
                disabled_attribute: disabled.map(str::to_owned),
                disabled_values: vec!["disabled".into(), "locked".into()],
                naming,
            },
            1,
            Duration::from_secs(1),
        )
    }

    fn entry(attrs: &[(&str, &[&str])]) -> SearchEntry {
        SearchEntry {
            dn: "uid=alice,ou=people,dc=example,dc=com".into(),
            attrs: attrs
                .iter()
                .map(|(k, v)| (k.to_string(), v.iter().map(|s| s.to_string()).collect()))
                .collect(),
            bin_attrs: Default::default(),
        }
    }

    #[test]
    fn the_entry_names_the_user_and_may_mark_them_disabled() {
        let s = source(
            Mode::Direct {
                user_dn: "uid=%n,dc=x".into(),
            },
            Some("employeeType"),
        );
        let found = s.read(&entry(&[
            ("mail", &["  Alice@Example.COM "]),
            ("uid", &["alice"]),
            ("mailHost", &["mail-b"]),
        ]));
        assert_eq!(
            found,
            Found {
                user: Some("alice@example.com".into()),
                backend: Some("mail-b".into()),
                disabled: false
            }
        );
        // No mail: uid; an unusable mail value is skipped.
        assert_eq!(
            s.read(&entry(&[("MAIL", &["a\u{7}b"]), ("uid", &["Bob"])]))
                .user
                .as_deref(),
            Some("bob")
        );
        assert_eq!(s.read(&entry(&[])), Found::default());
        assert!(
            s.read(&entry(&[("employeetype", &["staff", "LOCKED"])]))
                .disabled
        );
        assert!(!s.read(&entry(&[("employeeType", &["staff"])])).disabled);
        // Unset: never disabled.
        let s = source(
            Mode::Direct {
                user_dn: "uid=%n,dc=x".into(),
            },
            None,
        );
        assert!(!s.read(&entry(&[("employeeType", &["disabled"])])).disabled);
        assert_eq!(s.attributes(), vec!["mail", "uid", "mailHost"]);
    }

    #[test]
    fn result_codes_are_classified_by_cause() {
        let result = |rc: u32| LdapResult {
            rc,
            matched: String::new(),
            text: String::new(),
            refs: Vec::new(),
            ctrls: Vec::new(),
        };
        for rc in [21, 32, 34, 48, 49] {
            assert!(
                matches!(classify("bind", result(rc)), AuthError::Rejected),
                "{rc}"
            );
        }
        for rc in [1, 2, 8, 13, 50, 51, 52, 53, 80] {
            assert!(
                matches!(classify("bind", result(rc)), AuthError::Unavailable(_)),
                "{rc}"
            );
        }
    }

    #[tokio::test]
    async fn names_that_build_no_dn_are_refused_without_asking() {
        // The URL leads nowhere: an attempt to connect would be unavailable.
        let s = source(
            Mode::Direct {
                user_dn: "uid=%n,ou=people,dc=example,dc=com".into(),
            },
            None,
        );
        let answer = s
            .authenticate(
                "@example.com",
                Secret::new(b"pw".to_vec()),
                &AuthContext::test(),
            )
            .await;
        assert!(matches!(answer, Err(AuthError::Rejected)), "{answer:?}");
    }
}
