//! Choosing the backend for a user. [`Selector`] is the seam: today's
//! [`RendezvousPool`] places users by the directory's hint or by rendezvous
//! (highest random weight) hashing; health, weights and failover slot in
//! behind the same trait without touching the session code.
//!
//! Placement depends only on the normalised username and the backend
//! *names*, so every replica with the same configuration sends a user to the
//! same backend, and changing a backend's address moves nobody.

use std::sync::Arc;

use crate::auth::Identity;
use crate::config::BackendServer;

/// One backend IMAP server of the pool.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Backend {
    pub name: String,
    /// `host:port`, resolved at connect time.
    pub address: String,
}

/// Why a backend was chosen; logged with every routing decision.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RouteReason {
    /// The user's directory entry names the backend.
    Directory,
    /// Rendezvous hash of the username over the pool.
    Hash,
}

impl RouteReason {
    pub fn as_str(self) -> &'static str {
        match self {
            RouteReason::Directory => "directory",
            RouteReason::Hash => "hash",
        }
    }
}

#[derive(Debug, Clone)]
pub struct Route {
    pub backend: Arc<Backend>,
    pub reason: RouteReason,
}

#[derive(Debug, thiserror::Error)]
pub enum RouteError {
    #[error("backend `{0}` named by the directory is not in the pool")]
    UnknownBackend(String),
    #[error("no backend available")]
    NoBackend,
}

/// Picks the backend for an authenticated user.
pub trait Selector: Send + Sync {
    fn select(&self, identity: &Identity) -> Result<Route, RouteError>;
}

/// A fixed pool placed by directory hint, else by rendezvous hashing.
#[derive(Debug)]
pub struct RendezvousPool {
    backends: Vec<Arc<Backend>>,
}

impl RendezvousPool {
    pub fn new(servers: &[BackendServer]) -> Self {
        RendezvousPool {
            backends: servers
                .iter()
                .map(|s| {
                    Arc::new(Backend {
                        name: s.name.clone(),
                        address: s.address.clone(),
                    })
                })
                .collect(),
        }
    }

    /// The pool in the user's rendezvous order, best first. Failover walks
    /// this list, so a user's second choice is as stable as the first.
    pub fn order(&self, user: &str) -> Vec<Arc<Backend>> {
        let mut scored: Vec<(u64, &Arc<Backend>)> = self
            .backends
            .iter()
            .map(|b| (score(&b.name, user), b))
            .collect();
        scored.sort_by(|a, b| b.0.cmp(&a.0).then_with(|| a.1.name.cmp(&b.1.name)));
        scored.into_iter().map(|(_, b)| Arc::clone(b)).collect()
    }
}

impl Selector for RendezvousPool {
    fn select(&self, identity: &Identity) -> Result<Route, RouteError> {
        if let Some(name) = &identity.backend {
            let backend = self
                .backends
                .iter()
                .find(|b| &b.name == name)
                .ok_or_else(|| RouteError::UnknownBackend(name.clone()))?;
            return Ok(Route {
                backend: Arc::clone(backend),
                reason: RouteReason::Directory,
            });
        }
        let backend = self
            .backends
            .iter()
            .max_by(|a, b| {
                score(&a.name, &identity.user)
                    .cmp(&score(&b.name, &identity.user))
                    .then_with(|| b.name.cmp(&a.name))
            })
            .ok_or(RouteError::NoBackend)?;
        Ok(Route {
            backend: Arc::clone(backend),
            reason: RouteReason::Hash,
        })
    }
}

/// The rendezvous weight of `user` on `backend`: SipHash-1-3 with fixed keys,
/// so it is the same in every process and every release. Changing it moves
/// users between backends; don't.
pub fn score(backend: &str, user: &str) -> u64 {
    use std::hash::Hasher;
    let mut h =
        siphasher::sip::SipHasher13::new_with_keys(0x706f_7374_6572_6e21, 0x7264_7677_2d68_6173);
    h.write(backend.as_bytes());
    h.write_u8(0xff);
    h.write(user.as_bytes());
    h.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool(names: &[&str]) -> RendezvousPool {
        let servers: Vec<BackendServer> = names
            .iter()
            .enumerate()
            .map(|(i, n)| BackendServer {
                name: n.to_string(),
                address: format!("127.0.0.1:{}", 10000 + i),
            })
            .collect();
        RendezvousPool::new(&servers)
    }

    fn user(name: &str) -> Identity {
        Identity {
            user: name.into(),
            backend: None,
        }
    }

    #[test]
    fn placement_is_stable_and_ignores_pool_order() {
        let a = pool(&["mail-a", "mail-b", "mail-c"]);
        let b = pool(&["mail-c", "mail-a", "mail-b"]);
        for i in 0..200 {
            let u = user(&format!("user{i}@example.com"));
            assert_eq!(
                a.select(&u).unwrap().backend.name,
                b.select(&u).unwrap().backend.name
            );
        }
    }

    #[test]
    fn users_spread_over_the_pool() {
        let p = pool(&["mail-a", "mail-b", "mail-c"]);
        let mut counts = std::collections::HashMap::new();
        for i in 0..3000 {
            *counts
                .entry(
                    p.select(&user(&format!("u{i}")))
                        .unwrap()
                        .backend
                        .name
                        .clone(),
                )
                .or_insert(0) += 1;
        }
        for (name, n) in counts {
            assert!((800..1200).contains(&n), "{name} got {n} of 3000");
        }
    }

    #[test]
    fn removing_a_backend_moves_only_its_users() {
        let full = pool(&["mail-a", "mail-b", "mail-c"]);
        let less = pool(&["mail-a", "mail-b"]);
        for i in 0..500 {
            let u = user(&format!("u{i}"));
            let before = full.select(&u).unwrap().backend.name.clone();
            if before != "mail-c" {
                assert_eq!(less.select(&u).unwrap().backend.name, before);
            }
        }
    }

    #[test]
    fn order_starts_with_the_selected_backend() {
        let p = pool(&["mail-a", "mail-b", "mail-c"]);
        let u = user("alice");
        assert_eq!(p.order("alice")[0].name, p.select(&u).unwrap().backend.name);
        assert_eq!(p.order("alice").len(), 3);
    }

    #[test]
    fn directory_hint_wins() {
        let p = pool(&["mail-a", "mail-b"]);
        let mut u = user("alice");
        u.backend = Some("mail-b".into());
        let r = p.select(&u).unwrap();
        assert_eq!(
            (r.backend.name.as_str(), r.reason),
            ("mail-b", RouteReason::Directory)
        );
        u.backend = Some("gone".into());
        assert!(p.select(&u).is_err());
    }

    #[test]
    fn scores_are_fixed_across_releases() {
        // Pinned: a change here would move every user to another backend.
        assert_eq!(score("mail-a", "alice"), 3120978615429448286);
        assert_eq!(score("mail-b", "alice@example.com"), 2362004658889458960);
        assert_ne!(score("mail-a", "alice"), score("mail-b", "alice"));
        assert_ne!(score("mail-a", "bob"), score("mail-ab", "ob"));
    }
}
