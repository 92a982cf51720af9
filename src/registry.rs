//! The logged-in sessions of this process, for the admin API: who is
//! connected from where to which backend, since when, how many bytes; and
//! a way to end a user's sessions.
//!
//! A session registers when its relay starts and is removed when it ends
//! (the [`Registration`] guard). Sharded so registering never contends
//! across worker threads.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use crate::latch::Latch;

const SHARDS: usize = 16;

pub struct SessionInfo {
    pub id: String,
    pub user: String,
    pub client: SocketAddr,
    pub listener: String,
    pub protocol: crate::config::Protocol,
    pub backend: String,
    pub started: SystemTime,
    /// Logged in at a submission relay, not at the user's backend: the
    /// cluster store never records it as the user's backend.
    pub relayed: bool,
    /// Relayed bytes so far, client to backend and back.
    pub bytes_in: Arc<AtomicU64>,
    pub bytes_out: Arc<AtomicU64>,
    kicked: Latch,
    /// Kicked because the user is being moved to another backend.
    moving: std::sync::atomic::AtomicBool,
}

impl SessionInfo {
    pub fn new(
        id: &str,
        user: &str,
        client: SocketAddr,
        listener: &str,
        protocol: crate::config::Protocol,
        backend: &str,
    ) -> SessionInfo {
        SessionInfo {
            id: id.to_owned(),
            user: user.to_owned(),
            client,
            listener: listener.to_owned(),
            protocol,
            backend: backend.to_owned(),
            started: SystemTime::now(),
            relayed: false,
            bytes_in: Arc::default(),
            bytes_out: Arc::default(),
            kicked: Latch::default(),
            moving: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// Whether the kick was for a move to another backend.
    pub fn is_moving(&self) -> bool {
        self.moving.load(std::sync::atomic::Ordering::Acquire)
    }

    pub fn is_kicked(&self) -> bool {
        self.kicked.is_set()
    }

    /// Resolves once an administrator ends this session.
    pub async fn kicked(&self) {
        self.kicked.wait().await
    }
}

#[derive(Default)]
pub struct Registry {
    shards: [Mutex<HashMap<String, Arc<SessionInfo>>>; SHARDS],
}

/// Removes its session from the registry when dropped.
pub struct Registration {
    registry: Arc<Registry>,
    info: Arc<SessionInfo>,
}

impl Registration {
    pub fn info(&self) -> &Arc<SessionInfo> {
        &self.info
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.registry
            .shard(&self.info.id)
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&self.info.id);
    }
}

impl Registry {
    fn shard(&self, id: &str) -> &Mutex<HashMap<String, Arc<SessionInfo>>> {
        let h = id
            .bytes()
            .fold(0usize, |h, b| h.wrapping_mul(31).wrapping_add(b as usize));
        &self.shards[h % SHARDS]
    }

    pub fn register(self: &Arc<Self>, info: SessionInfo) -> Registration {
        let info = Arc::new(info);
        self.shard(&info.id)
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(info.id.clone(), Arc::clone(&info));
        Registration {
            registry: Arc::clone(self),
            info,
        }
    }

    /// Every registered session, oldest first.
    pub fn list(&self) -> Vec<Arc<SessionInfo>> {
        let mut all: Vec<Arc<SessionInfo>> = self
            .shards
            .iter()
            .flat_map(|s| {
                s.lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .values()
                    .cloned()
                    .collect::<Vec<_>>()
            })
            .collect();
        all.sort_by_key(|s| s.started);
        all
    }

    /// Ends every session of `user` (`moving`: for a move to another
    /// backend); how many there were.
    pub fn kick_user(&self, user: &str, moving: bool) -> usize {
        let mut n = 0;
        for s in self.list().into_iter().filter(|s| s.user == user) {
            if moving {
                s.moving.store(true, std::sync::atomic::Ordering::Release);
            }
            s.kicked.set();
            n += 1;
        }
        n
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Protocol;

    #[tokio::test]
    async fn sessions_register_list_kick_and_leave() {
        let r = Arc::new(Registry::default());
        let addr: SocketAddr = "192.0.2.1:1".parse().unwrap();
        let a = r.register(SessionInfo::new(
            "s1",
            "alice",
            addr,
            "imaps",
            Protocol::Imap,
            "mail-a",
        ));
        let b = r.register(SessionInfo::new(
            "s2",
            "bob",
            addr,
            "imaps",
            Protocol::Imap,
            "mail-a",
        ));
        assert_eq!(r.list().len(), 2);
        let waiter = {
            let info = Arc::clone(a.info());
            tokio::spawn(async move { info.kicked().await })
        };
        tokio::task::yield_now().await;
        assert_eq!(r.kick_user("alice", false), 1);
        waiter.await.unwrap();
        assert!(!b.info().is_kicked());
        drop(a);
        assert_eq!(r.list().len(), 1);
    }
}
