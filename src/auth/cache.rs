//! A short-lived cache of successful logins in front of any
//! [`Authenticator`]: a phone that reconnects every few minutes pays for its
//! deliberately slow password hash once per TTL, not once per login.
//!
//! Only successes are kept, as a keyed 128-bit fingerprint of user and
//! password (SipHash with a key drawn at start, never stored), never the
//! password. A password that does not match the fingerprint goes to the
//! source as usual, so a cached user with a wrong password is still refused
//! by the source. The cache lives in the runtime snapshot: a reload (a new
//! users file) starts an empty one.

use std::collections::HashMap;
use std::hash::Hasher;
use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

use super::{AuthContext, AuthFuture, Authenticator, Identity};
use crate::imap::Secret;

/// Most entries kept; past it, expired entries are dropped and, if that is
/// not enough, new successes are simply not cached.
const MAX_ENTRIES: usize = 200_000;

pub struct CachedAuthenticator {
    inner: Box<dyn Authenticator>,
    ttl: Duration,
    key: (u64, u64),
    entries: Mutex<HashMap<String, Entry>>,
}

struct Entry {
    fingerprint: u128,
    identity: Identity,
    expires: Instant,
}

impl CachedAuthenticator {
    pub fn new(inner: Box<dyn Authenticator>, ttl: Duration) -> Self {
        CachedAuthenticator {
            inner,
            ttl,
            key: (rand::random(), rand::random()),
            entries: Mutex::new(HashMap::new()),
        }
    }

    fn fingerprint(&self, user: &str, password: &[u8]) -> u128 {
        let mut h = siphasher::sip128::SipHasher13::new_with_keys(self.key.0, self.key.1);
        h.write(user.as_bytes());
        h.write_u8(0);
        h.write(password);
        siphasher::sip128::Hasher128::finish128(&h).as_u128()
    }

    fn lookup(&self, user: &str, fingerprint: u128) -> Option<Identity> {
        let entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        let e = entries.get(user)?;
        (e.fingerprint == fingerprint && e.expires > Instant::now()).then(|| e.identity.clone())
    }

    fn remember(&self, user: &str, fingerprint: u128, identity: &Identity) {
        let now = Instant::now();
        let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        if entries.len() >= MAX_ENTRIES && !entries.contains_key(user) {
            entries.retain(|_, e| e.expires > now);
            if entries.len() >= MAX_ENTRIES {
                return;
            }
        }
        entries.insert(
            user.to_owned(),
            Entry {
                fingerprint,
                identity: identity.clone(),
                expires: now + self.ttl,
            },
        );
    }
}

impl Authenticator for CachedAuthenticator {
    fn authenticate<'a>(
        &'a self,
        user: &'a str,
        password: Secret,
        ctx: &'a AuthContext,
    ) -> AuthFuture<'a> {
        Box::pin(async move {
            let fingerprint = self.fingerprint(user, password.expose());
            if let Some(identity) = self.lookup(user, fingerprint) {
                return Ok(identity);
            }
            let identity = self.inner.authenticate(user, password, ctx).await?;
            self.remember(user, fingerprint, &identity);
            Ok(identity)
        })
    }

    fn name(&self) -> &'static str {
        self.inner.name()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::AuthError;
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::sync::Arc;

    /// Accepts one password and counts how often it is asked.
    struct Counting(Arc<AtomicU32>);

    impl Authenticator for Counting {
        fn authenticate<'a>(
            &'a self,
            user: &'a str,
            password: Secret,
            _ctx: &'a AuthContext,
        ) -> AuthFuture<'a> {
            self.0.fetch_add(1, Ordering::Relaxed);
            Box::pin(async move {
                if password.expose() == b"right" {
                    Ok(Identity {
                        user: user.to_owned(),
                        backend: None,
                        pool: None,
                        backend_password: None,
                    })
                } else {
                    Err(AuthError::Rejected)
                }
            })
        }
        fn name(&self) -> &'static str {
            "counting"
        }
    }

    #[tokio::test(start_paused = true)]
    async fn success_is_cached_until_it_expires_and_never_for_another_password() {
        let calls = Arc::new(AtomicU32::new(0));
        let cache = CachedAuthenticator::new(
            Box::new(Counting(Arc::clone(&calls))),
            Duration::from_secs(60),
        );
        let pw = |p: &str| Secret::new(p.as_bytes().to_vec());
        assert!(cache
            .authenticate("alice", pw("right"), &super::AuthContext::test())
            .await
            .is_ok());
        assert!(cache
            .authenticate("alice", pw("right"), &super::AuthContext::test())
            .await
            .is_ok());
        assert_eq!(
            calls.load(Ordering::Relaxed),
            1,
            "second login served from the cache"
        );
        assert!(cache
            .authenticate("alice", pw("wrong"), &super::AuthContext::test())
            .await
            .is_err());
        assert_eq!(
            calls.load(Ordering::Relaxed),
            2,
            "a different password asks the source"
        );
        assert!(cache
            .authenticate("bob", pw("right"), &super::AuthContext::test())
            .await
            .is_ok());
        assert_eq!(calls.load(Ordering::Relaxed), 3);
        tokio::time::advance(Duration::from_secs(61)).await;
        assert!(cache
            .authenticate("alice", pw("right"), &super::AuthContext::test())
            .await
            .is_ok());
        assert_eq!(
            calls.load(Ordering::Relaxed),
            4,
            "expired entries ask the source again"
        );
    }
}
