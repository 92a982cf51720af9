//! The `static` source: users, password hashes and optional backends from a
//! file, held in memory. Two formats: Postern's YAML
//! (`users: [{ user, password, backend, pool, disabled, reason }]`) and
//! Dovecot's passwd-file (`user:{SCHEME}hash[:uid:gid:gecos:home:shell:extra]`,
//! the user, the hash and the extra fields read), so an existing Dovecot
//! file can be used as it is.
//!
//! Disabled accounts: `disabled: true` (with an optional `reason`) in the
//! YAML, or Dovecot's `nologin` extra field (`nologin`, `nologin=y`; a
//! value of `n`, `no`, `false` or `0` leaves the account enabled) with an
//! optional `reason=…` in the passwd-file. Extra fields are separated by
//! spaces, as Dovecot splits them, so a passwd-file reason is one word.
//! A disabled user's password is checked like anyone's, at the same cost;
//! only when it is right is the answer [`AuthError::Disabled`], so the
//! answer tells a guesser nothing.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use serde::Deserialize;

use super::password::PasswordHash;
use super::{normalise_username, AuthContext, AuthError, AuthFuture, Authenticator, Identity};
use crate::config::{Auth as AuthConfig, UsersFormat};
use crate::imap::Secret;

#[derive(Debug)]
struct Entry {
    hash: Arc<PasswordHash>,
    backend: Option<String>,
    pool: Option<String>,
    /// The account may not log in, for this reason if one is given.
    disabled: Option<Option<String>>,
}

/// Users loaded from one file; immutable once built.
#[derive(Debug)]
pub struct StaticUsers {
    users: HashMap<String, Entry>,
    /// An unknown user's password is checked against this hash, so an
    /// unknown user costs what a known one does and timing tells nothing.
    decoy: Option<Arc<PasswordHash>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct UsersFile {
    users: Vec<UserRecord>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct UserRecord {
    user: String,
    password: String,
    #[serde(default)]
    backend: Option<String>,
    #[serde(default)]
    pool: Option<String>,
    /// The account may not log in.
    #[serde(default)]
    disabled: bool,
    /// Why, for the log and, where `auth.show_disabled_reason` allows, the
    /// client.
    #[serde(default)]
    reason: Option<String>,
}

impl StaticUsers {
    /// Loads and checks the users file. `backend_exists` and `pool_exists`
    /// validate each user's backend and pool names against the config.
    pub fn load(
        path: &Path,
        format: UsersFormat,
        auth: &AuthConfig,
        backend_exists: &dyn Fn(&str) -> bool,
        pool_exists: &dyn Fn(&str) -> bool,
    ) -> Result<StaticUsers, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read users file {}: {e}", path.display()))?;
        let records = match format {
            UsersFormat::Yaml => {
                let file: UsersFile = crate::config::from_yaml(&text)
                    .map_err(|e| format!("users file {}: {e}", path.display()))?;
                file.users
                    .into_iter()
                    .enumerate()
                    .map(|(i, r)| (format!("key `users[{i}]`"), r))
                    .collect::<Vec<_>>()
            }
            UsersFormat::PasswdFile => parse_passwd_file(&text),
        };
        let mut users = HashMap::with_capacity(records.len());
        for (place, record) in records {
            let fail = |msg: String| format!("users file {}: {place}: {msg}", path.display());
            let user = normalise_username(record.user.as_bytes(), auth)
                .map_err(|e| fail(e.to_string()))?;
            let hash = PasswordHash::parse(&record.password)
                .map_err(|e| fail(format!("user `{user}`: {e}")))?;
            if let Some(b) = &record.backend {
                if !backend_exists(b) {
                    return Err(fail(format!(
                        "user `{user}`: backend `{b}` is not in any pool of backends"
                    )));
                }
            }
            if let Some(p) = &record.pool {
                if !pool_exists(p) {
                    return Err(fail(format!(
                        "user `{user}`: pool `{p}` is not in backends.pools"
                    )));
                }
            }
            let reason = record
                .reason
                .map(|r| r.trim().to_owned())
                .filter(|r| !r.is_empty());
            if reason
                .as_deref()
                .is_some_and(|r| r.chars().any(char::is_control))
            {
                return Err(fail(format!(
                    "user `{user}`: the reason holds control characters"
                )));
            }
            if reason.is_some() && !record.disabled {
                return Err(fail(format!(
                    "user `{user}`: a reason without `disabled: true`"
                )));
            }
            let entry = Entry {
                hash: Arc::new(hash),
                backend: record.backend,
                pool: record.pool,
                disabled: record.disabled.then_some(reason),
            };
            if users.insert(user.clone(), entry).is_some() {
                return Err(fail(format!("user `{user}` is listed twice")));
            }
        }
        // The decoy is a real user's hash, preferring one that is not {PLAIN},
        // so its cost matches what most users' checks cost.
        let decoy = users
            .values()
            .find(|e| !matches!(*e.hash, PasswordHash::Plain(_)))
            .or_else(|| users.values().next())
            .map(|e| Arc::clone(&e.hash));
        Ok(StaticUsers { users, decoy })
    }

    pub fn len(&self) -> usize {
        self.users.len()
    }

    pub fn is_empty(&self) -> bool {
        self.users.is_empty()
    }
}

fn parse_passwd_file(text: &str) -> Vec<(String, UserRecord)> {
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty() && !l.trim_start().starts_with('#'))
        .map(|(n, line)| {
            let mut fields = line.splitn(8, ':');
            let user = fields.next().unwrap_or_default().to_owned();
            let password = fields.next().unwrap_or_default().to_owned();
            let extra = fields.nth(5).unwrap_or_default();
            let (disabled, reason) = nologin(extra);
            (
                format!("line {}", n + 1),
                UserRecord {
                    user,
                    password,
                    backend: None,
                    pool: None,
                    disabled,
                    reason: reason.filter(|_| disabled),
                },
            )
        })
        .collect()
}

/// Dovecot's `nologin` and `reason` in a passwd-file line's extra fields
/// (space-separated `key` or `key=value`).
fn nologin(extra: &str) -> (bool, Option<String>) {
    let mut disabled = false;
    let mut reason = None;
    for field in extra.split(' ').filter(|f| !f.is_empty()) {
        let (key, value) = field.split_once('=').unwrap_or((field, ""));
        match key {
            "nologin" => {
                disabled = !["n", "no", "false", "0"]
                    .iter()
                    .any(|off| value.eq_ignore_ascii_case(off))
            }
            "reason" if !value.is_empty() => reason = Some(value.to_owned()),
            _ => {}
        }
    }
    (disabled, reason)
}

impl Authenticator for StaticUsers {
    fn authenticate<'a>(
        &'a self,
        user: &'a str,
        password: Secret,
        _ctx: &'a AuthContext,
    ) -> AuthFuture<'a> {
        Box::pin(async move {
            let entry = self.users.get(user);
            let Some(hash) = entry.map(|e| &e.hash).or(self.decoy.as_ref()) else {
                return Err(AuthError::Rejected);
            };
            let ok = super::password::verify_off_thread(Arc::clone(hash), password)
                .await
                .map_err(AuthError::Unavailable)?;
            match entry {
                // Only a right password learns that the account is disabled.
                Some(Entry {
                    disabled: Some(reason),
                    ..
                }) if ok => Err(AuthError::Disabled {
                    reason: reason.clone(),
                }),
                Some(entry) if ok => Ok(Identity {
                    user: user.to_owned(),
                    backend: entry.backend.clone(),
                    pool: entry.pool.clone(),
                    backend_password: None,
                }),
                _ => Err(AuthError::Rejected),
            }
        })
    }

    fn name(&self) -> &'static str {
        "static"
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::AuthSource;
    use std::time::Duration;

    fn auth() -> AuthConfig {
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
            lowercase_usernames: true,
            default_domain: None,
            cache_ttl_set: Some(Duration::ZERO),
        }
    }

    fn write(text: &str) -> tempfile_path::TempPath {
        tempfile_path::TempPath::with(text)
    }

    /// A file removed on drop, without a tempfile dependency.
    mod tempfile_path {
        pub struct TempPath(pub std::path::PathBuf);
        impl TempPath {
            pub fn with(text: &str) -> Self {
                use std::sync::atomic::{AtomicU32, Ordering};
                static N: AtomicU32 = AtomicU32::new(0);
                let p = std::env::temp_dir().join(format!(
                    "postern-users-{}-{}",
                    std::process::id(),
                    N.fetch_add(1, Ordering::Relaxed)
                ));
                std::fs::write(&p, text).unwrap();
                TempPath(p)
            }
        }
        impl Drop for TempPath {
            fn drop(&mut self) {
                let _ = std::fs::remove_file(&self.0);
            }
        }
    }

    #[tokio::test]
    async fn yaml_users_authenticate_and_carry_their_backend() {
        let f = write("users:\n  - { user: Alice, password: \"{PLAIN}pw\", backend: mail-b }\n  - { user: bob, password: \"{PLAIN}x\", pool: business }\n");
        let users = StaticUsers::load(&f.0, UsersFormat::Yaml, &auth(), &|b| b == "mail-b", &|p| {
            p == "business"
        })
        .unwrap();
        let bob = users
            .authenticate(
                "bob",
                Secret::new(b"x".to_vec()),
                &super::AuthContext::test(),
            )
            .await
            .unwrap();
        assert_eq!(bob.pool.as_deref(), Some("business"));
        assert!(
            StaticUsers::load(&f.0, UsersFormat::Yaml, &auth(), &|_| true, &|_| false)
                .unwrap_err()
                .contains("pool `business`")
        );
        let id = users
            .authenticate(
                "alice",
                Secret::new(b"pw".to_vec()),
                &super::AuthContext::test(),
            )
            .await
            .unwrap();
        assert_eq!(id.backend.as_deref(), Some("mail-b"));
        assert!(matches!(
            users
                .authenticate(
                    "alice",
                    Secret::new(b"nope".to_vec()),
                    &super::AuthContext::test()
                )
                .await,
            Err(AuthError::Rejected)
        ));
        assert!(matches!(
            users
                .authenticate(
                    "nobody",
                    Secret::new(b"pw".to_vec()),
                    &super::AuthContext::test()
                )
                .await,
            Err(AuthError::Rejected)
        ));
    }

    #[tokio::test]
    async fn dovecot_passwd_file_is_read_as_it_is() {
        let f = write("# comment\nalice:{PLAIN}pw:1000:1000::/home/alice::\n\nbob:{SHA256-CRYPT}$5$6yO3P.WhRn2wFF/1$puUdG/K7SJPqdhbkuhh0ih3Rz/SQLa8.fjepoLQA9//\n");
        let users = StaticUsers::load(&f.0, UsersFormat::PasswdFile, &auth(), &|_| true, &|_| true)
            .unwrap();
        assert_eq!(users.len(), 2);
        assert!(users
            .authenticate(
                "bob",
                Secret::new(b"secret".to_vec()),
                &super::AuthContext::test()
            )
            .await
            .is_ok());
        assert!(users
            .authenticate(
                "alice",
                Secret::new(b"pw".to_vec()),
                &super::AuthContext::test()
            )
            .await
            .is_ok());
    }

    #[tokio::test]
    async fn disabled_accounts_are_refused_only_with_the_right_password() {
        async fn login_as(
            users: &StaticUsers,
            user: &str,
            pw: &[u8],
        ) -> Result<Identity, AuthError> {
            users
                .authenticate(user, Secret::new(pw.to_vec()), &super::AuthContext::test())
                .await
        }
        let f = write("users:\n  - { user: carol, password: \"{PLAIN}pw\", disabled: true, reason: \"Account closed, ask support\" }\n  - { user: dan, password: \"{PLAIN}pw\", disabled: true }\n  - { user: erin, password: \"{PLAIN}pw\", disabled: false }\n");
        let users =
            StaticUsers::load(&f.0, UsersFormat::Yaml, &auth(), &|_| true, &|_| true).unwrap();
        match login_as(&users, "carol", b"pw").await {
            Err(AuthError::Disabled { reason }) => {
                assert_eq!(reason.as_deref(), Some("Account closed, ask support"))
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            login_as(&users, "carol", b"wrong").await,
            Err(AuthError::Rejected)
        ));
        assert!(matches!(
            login_as(&users, "dan", b"pw").await,
            Err(AuthError::Disabled { reason: None })
        ));
        assert!(login_as(&users, "erin", b"pw").await.is_ok());

        let f = write("carol:{PLAIN}pw:1000:1000::/home/carol::nologin reason=Closed\ndan:{PLAIN}pw::::::userdb_quota_rule=*:storage=1G nologin=y\nerin:{PLAIN}pw::::::nologin=n reason=unused\nfrank:{PLAIN}pw\n");
        let users = StaticUsers::load(&f.0, UsersFormat::PasswdFile, &auth(), &|_| true, &|_| true)
            .unwrap();
        match login_as(&users, "carol", b"pw").await {
            Err(AuthError::Disabled { reason }) => assert_eq!(reason.as_deref(), Some("Closed")),
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            login_as(&users, "carol", b"nope").await,
            Err(AuthError::Rejected)
        ));
        assert!(matches!(
            login_as(&users, "dan", b"pw").await,
            Err(AuthError::Disabled { reason: None })
        ));
        assert!(login_as(&users, "erin", b"pw").await.is_ok());
        assert!(login_as(&users, "frank", b"pw").await.is_ok());
    }

    #[test]
    fn nologin_is_read_as_dovecot_writes_it() {
        assert_eq!(nologin(""), (false, None));
        assert_eq!(nologin("nologin"), (true, None));
        assert_eq!(nologin("nologin=Y"), (true, None));
        assert_eq!(nologin("nologin=no"), (false, None));
        assert_eq!(
            nologin("  userdb_home=/x  nologin reason=Moved "),
            (true, Some("Moved".into()))
        );
        assert_eq!(nologin("nologinx reason="), (false, None));
    }

    #[test]
    fn errors_name_the_place() {
        let f = write("users:\n  - { user: alice, password: \"{MD5}x\" }\n");
        let err =
            StaticUsers::load(&f.0, UsersFormat::Yaml, &auth(), &|_| true, &|_| true).unwrap_err();
        assert!(err.contains("users[0]") && err.contains("MD5"), "{err}");
        let f = write("users:\n  - { user: alice, password: \"{PLAIN}x\", backend: nowhere }\n");
        let err =
            StaticUsers::load(&f.0, UsersFormat::Yaml, &auth(), &|_| false, &|_| true).unwrap_err();
        assert!(err.contains("nowhere"), "{err}");
        let f = write("users:\n  - { user: alice, pasword: \"{PLAIN}x\" }\n");
        let err =
            StaticUsers::load(&f.0, UsersFormat::Yaml, &auth(), &|_| true, &|_| true).unwrap_err();
        assert!(err.contains("line 2") && err.contains("pasword"), "{err}");
        let f = write("alice:{PLAIN}a\nbob:nohash\n");
        let err = StaticUsers::load(&f.0, UsersFormat::PasswdFile, &auth(), &|_| true, &|_| true)
            .unwrap_err();
        assert!(err.contains("line 2"), "{err}");
    }
}
