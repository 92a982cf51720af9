//! A short-lived cache of login results in front of any [`Authenticator`]:
//! a phone that reconnects every few minutes pays for its deliberately
//! slow password hash (or an LDAP round trip) once per TTL, not once per
//! login, and a client repeating a wrong password does not reach the
//! source again within the negative TTL.
//!
//! Entries are keyed 128-bit fingerprints of user and password (SipHash
//! with a key drawn at start, never stored), never the password. A success
//! is remembered per user for `ttl`: another password goes to the source
//! as usual. A plain refusal ("invalid credentials", not a source's own
//! refusal text) is remembered per user and password for `negative_ttl`,
//! so a new or corrected password is always checked. While a remote
//! source is down, cached successes keep working. The cache lives in the
//! runtime snapshot: a reload (a new users file) starts an empty one.

use std::collections::HashMap;
use std::hash::Hasher;
use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

use prometheus::IntCounterVec;

use super::{AuthContext, AuthError, AuthFuture, Authenticator, Identity};
use crate::imap::Secret;

/// Most entries kept; past it, expired entries are dropped and, if that is
/// not enough, new successes are simply not cached.
const MAX_ENTRIES: usize = 200_000;

pub struct CachedAuthenticator {
    inner: Box<dyn Authenticator>,
    ttl: Duration,
    negative_ttl: Duration,
    key: (u64, u64),
    entries: Mutex<HashMap<String, Entry>>,
    /// Refused user-and-password fingerprints, until when.
    refused: Mutex<HashMap<u128, Instant>>,
    /// Hits, by `kind` (`positive`, `negative`).
    hits: Option<IntCounterVec>,
}

struct Entry {
    fingerprint: u128,
    identity: Identity,
    expires: Instant,
}

impl CachedAuthenticator {
    /// `ttl` for successes and `negative_ttl` for refusals; zero turns
    /// that side off.
    pub fn new(
        inner: Box<dyn Authenticator>,
        ttl: Duration,
        negative_ttl: Duration,
        hits: Option<IntCounterVec>,
    ) -> Self {
        CachedAuthenticator {
            inner,
            ttl,
            negative_ttl,
            key: (rand::random(), rand::random()),
            entries: Mutex::new(HashMap::new()),
            refused: Mutex::new(HashMap::new()),
            hits,
        }
    }

    fn hit(&self, kind: &str) {
        if let Some(h) = &self.hits {
            h.with_label_values(&[kind]).inc();
        }
    }

    fn was_refused(&self, fingerprint: u128) -> bool {
        let refused = self.refused.lock().unwrap_or_else(|e| e.into_inner());
        refused
            .get(&fingerprint)
            .is_some_and(|&until| until > Instant::now())
    }

    fn remember_refusal(&self, fingerprint: u128) {
        let now = Instant::now();
        let mut refused = self.refused.lock().unwrap_or_else(|e| e.into_inner());
        if refused.len() >= MAX_ENTRIES {
            refused.retain(|_, until| *until > now);
            if refused.len() >= MAX_ENTRIES {
                return;
            }
        }
        refused.insert(fingerprint, now + self.negative_ttl);
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
            if !self.ttl.is_zero() {
                if let Some(identity) = self.lookup(user, fingerprint) {
                    self.hit("positive");
                    return Ok(identity);
                }
            }
            if !self.negative_ttl.is_zero() && self.was_refused(fingerprint) {
                self.hit("negative");
                return Err(AuthError::Rejected);
            }
            match self.inner.authenticate(user, password, ctx).await {
                Ok(identity) => {
                    if !self.ttl.is_zero() {
                        self.remember(user, fingerprint, &identity);
                    }
                    Ok(identity)
                }
                Err(AuthError::Rejected) => {
                    if !self.negative_ttl.is_zero() {
                        self.remember_refusal(fingerprint);
                    }
                    Err(AuthError::Rejected)
                }
                Err(other) => Err(other),
            }
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
            Duration::ZERO,
            None,
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

    #[tokio::test(start_paused = true)]
    async fn a_refused_password_is_remembered_briefly_and_only_that_one() {
        let calls = Arc::new(AtomicU32::new(0));
        let cache = CachedAuthenticator::new(
            Box::new(Counting(Arc::clone(&calls))),
            Duration::ZERO,
            Duration::from_secs(30),
            None,
        );
        let ctx = super::AuthContext::test();
        let pw = |p: &str| Secret::new(p.as_bytes().to_vec());
        for _ in 0..3 {
            assert!(matches!(
                cache.authenticate("alice", pw("wrong"), &ctx).await,
                Err(AuthError::Rejected)
            ));
        }
        assert_eq!(
            calls.load(Ordering::Relaxed),
            1,
            "repeats answered from the cache"
        );
        assert!(cache.authenticate("alice", pw("right"), &ctx).await.is_ok());
        assert!(cache.authenticate("alice", pw("right"), &ctx).await.is_ok());
        assert_eq!(
            calls.load(Ordering::Relaxed),
            3,
            "successes not cached with ttl 0"
        );
        tokio::time::advance(Duration::from_secs(31)).await;
        assert!(cache
            .authenticate("alice", pw("wrong"), &ctx)
            .await
            .is_err());
        assert_eq!(calls.load(Ordering::Relaxed), 4, "expired");
    }
}
