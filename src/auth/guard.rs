//! Brute-force defence and per-address / per-user session limits, shared
//! by every worker thread and kept across reloads.
//!
//! [`Guard`] remembers failed logins per client network (an IPv4 address,
//! an IPv6 /64 by default) and per user name. Each failure's answer waits
//! longer: `failure_delay`, doubled with every failure on record for the
//! address or the user, up to `max_delay`. After `block_after` failures an
//! address is blocked for `block_for`: its logins are refused without
//! asking the auth source. Users are never blocked, only slowed, so an
//! attacker cannot lock a victim out. Entries expire `window` after their
//! last failure; a successful login clears the user's entry (not the
//! address's: one known account must not reset a stuffing run). Memory is
//! bounded by `max_entries`; past it the stalest entry goes.
//!
//! [`Slots`] counts live sessions per network and per user against the
//! configured maxima; a [`Slot`] gives its place back when dropped.

use std::collections::hash_map::RandomState;
use std::collections::HashMap;
use std::hash::BuildHasher;
use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

use crate::config::BruteForce;

const SHARDS: usize = 16;

/// A client network or a user name.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Key {
    Network(u128, u8),
    User(String),
}

impl Key {
    /// The network `ip` belongs to: the address itself for IPv4 (with
    /// `v4_prefix` 32), the /`v6_prefix` for IPv6. IPv4-mapped IPv6
    /// addresses count as IPv4.
    pub fn network(ip: IpAddr, v4_prefix: u8, v6_prefix: u8) -> Key {
        match ip.to_canonical() {
            IpAddr::V4(v4) => {
                let bits = u32::from(v4) as u128;
                let mask = mask(32, v4_prefix);
                Key::Network(bits & mask, 4)
            }
            IpAddr::V6(v6) => Key::Network(u128::from(v6) & mask(128, v6_prefix), 6),
        }
    }
}

fn mask(width: u32, prefix: u8) -> u128 {
    let prefix = u32::from(prefix).min(width);
    if prefix == 0 {
        return 0;
    }
    let all = if width == 128 {
        u128::MAX
    } else {
        (1u128 << width) - 1
    };
    all & !((1u128 << (width - prefix)) - 1)
}

struct Entry {
    failures: u32,
    last: Instant,
    blocked_until: Option<Instant>,
}

/// What a failed login costs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Penalty {
    /// How long after the credentials arrived the answer goes out.
    pub delay: Duration,
    /// This failure started a block of the client's network.
    pub blocked: bool,
    /// Whose record set the delay: `network` or `user`.
    pub scope: &'static str,
}

pub struct Guard {
    shards: Vec<Mutex<HashMap<Key, Entry>>>,
    hasher: RandomState,
    /// Entries held, by kind, kept as they change (read for the metrics).
    networks: AtomicUsize,
    users: AtomicUsize,
}

impl Default for Guard {
    fn default() -> Self {
        Guard {
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
            hasher: RandomState::new(),
            networks: AtomicUsize::new(0),
            users: AtomicUsize::new(0),
        }
    }
}

impl Guard {
    fn shard(&self, key: &Key) -> &Mutex<HashMap<Key, Entry>> {
        &self.shards[self.hasher.hash_one(key) as usize % SHARDS]
    }

    /// How much longer `network` is blocked, if it is.
    pub fn blocked(&self, network: &Key, now: Instant) -> Option<Duration> {
        let shard = self.shard(network).lock().unwrap();
        let until = shard.get(network)?.blocked_until?;
        (until > now).then(|| until - now)
    }

    /// Records a failed login from `network` for `user` (when the name was
    /// one at all) and returns its penalty.
    pub fn failed(
        &self,
        network: &Key,
        user: Option<&str>,
        base: Duration,
        policy: &BruteForce,
        now: Instant,
    ) -> Penalty {
        let mut worst = 0;
        let mut scope = "network";
        let mut blocked = false;
        let user_key = user.map(|u| Key::User(u.to_owned()));
        for key in std::iter::once(network).chain(user_key.as_ref()) {
            let mut shard = self.shard(key).lock().unwrap();
            let limit = (policy.max_entries / SHARDS).max(1);
            if !shard.contains_key(key) {
                if shard.len() >= limit {
                    for gone in make_room(&mut shard, now, policy.window) {
                        self.count(&gone).fetch_sub(1, Ordering::Relaxed);
                    }
                }
                self.count(key).fetch_add(1, Ordering::Relaxed);
            }
            let entry = shard.entry(key.clone()).or_insert(Entry {
                failures: 0,
                last: now,
                blocked_until: None,
            });
            if now.saturating_duration_since(entry.last) > policy.window {
                entry.failures = 0;
                entry.blocked_until = None;
            }
            entry.failures = entry.failures.saturating_add(1);
            entry.last = now;
            if entry.failures > worst {
                worst = entry.failures;
                scope = if matches!(key, Key::User(_)) {
                    "user"
                } else {
                    "network"
                };
            }
            if matches!(key, Key::Network(..))
                && policy.block_after > 0
                && entry.failures >= policy.block_after
                && entry.blocked_until.is_none_or(|u| u <= now)
            {
                entry.blocked_until = Some(now + policy.block_for);
                blocked = true;
            }
        }
        Penalty {
            delay: delay(base, worst, policy.max_delay),
            blocked,
            scope,
        }
    }

    /// How long a login from `network` for `user` waits before the source
    /// is asked: what its failure would cost, if either has failures on
    /// record; nothing otherwise. So a guesser cannot learn the answer
    /// sooner by dropping the connection.
    pub fn pending(
        &self,
        network: &Key,
        user: Option<&str>,
        base: Duration,
        policy: &BruteForce,
        now: Instant,
    ) -> Duration {
        let user_key = user.map(|u| Key::User(u.to_owned()));
        let mut worst = 0;
        for key in std::iter::once(network).chain(user_key.as_ref()) {
            let shard = self.shard(key).lock().unwrap();
            if let Some(e) = shard.get(key) {
                if now.saturating_duration_since(e.last) <= policy.window {
                    worst = worst.max(e.failures);
                }
            }
        }
        if worst == 0 {
            Duration::ZERO
        } else {
            delay(base, worst + 1, policy.max_delay)
        }
    }

    /// A successful login: the user's record goes.
    pub fn succeeded(&self, user: &str) {
        let key = Key::User(user.to_owned());
        if self.shard(&key).lock().unwrap().remove(&key).is_some() {
            self.users.fetch_sub(1, Ordering::Relaxed);
        }
    }

    /// Entries held: (networks, users).
    pub fn tracked(&self) -> (usize, usize) {
        (
            self.networks.load(Ordering::Relaxed),
            self.users.load(Ordering::Relaxed),
        )
    }

    fn count(&self, key: &Key) -> &AtomicUsize {
        match key {
            Key::Network(..) => &self.networks,
            Key::User(_) => &self.users,
        }
    }
}

/// `base` doubled for every failure after the first, at most `max`.
fn delay(base: Duration, failures: u32, max: Duration) -> Duration {
    let doublings = failures.saturating_sub(1).min(31);
    base.saturating_mul(1 << doublings).min(max.max(base))
}

/// Drops expired entries; if none were, the one with the oldest failure.
/// Returns the keys dropped.
fn make_room(shard: &mut HashMap<Key, Entry>, now: Instant, window: Duration) -> Vec<Key> {
    let live = |e: &Entry| {
        now.saturating_duration_since(e.last) <= window || e.blocked_until.is_some_and(|u| u > now)
    };
    let mut gone: Vec<Key> = shard
        .iter()
        .filter(|(_, e)| !live(e))
        .map(|(k, _)| k.clone())
        .collect();
    if gone.is_empty() {
        gone.extend(
            shard
                .iter()
                .min_by_key(|(_, e)| e.last)
                .map(|(k, _)| k.clone()),
        );
    }
    for key in &gone {
        shard.remove(key);
    }
    gone
}

/// Live sessions per network and per user.
#[derive(Default)]
pub struct Slots {
    counts: Mutex<HashMap<Key, u32>>,
}

/// Every place for a key is taken.
#[derive(Debug, PartialEq, Eq)]
pub struct Full;

/// A place taken in [`Slots`]; given back when dropped.
pub struct Slot {
    slots: Arc<Slots>,
    key: Key,
}

impl Slots {
    /// Takes a place for `key` if fewer than `max` are taken; `max` 0 is no
    /// limit (and takes nothing).
    pub fn take(self: &Arc<Self>, key: Key, max: u32) -> Result<Option<Slot>, Full> {
        if max == 0 {
            return Ok(None);
        }
        let mut counts = self.counts.lock().unwrap();
        let count = counts.entry(key.clone()).or_insert(0);
        if *count >= max {
            return Err(Full);
        }
        *count += 1;
        Ok(Some(Slot {
            slots: Arc::clone(self),
            key,
        }))
    }

    #[cfg(test)]
    fn held(&self, key: &Key) -> u32 {
        self.counts.lock().unwrap().get(key).copied().unwrap_or(0)
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut counts = self.slots.counts.lock().unwrap();
        if let Some(count) = counts.get_mut(&self.key) {
            *count -= 1;
            if *count == 0 {
                counts.remove(&self.key);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> BruteForce {
        BruteForce {
            enabled: true,
            ipv4_prefix: 32,
            ipv6_prefix: 64,
            max_delay: Duration::from_secs(30),
            block_after: 5,
            block_for: Duration::from_secs(600),
            window: Duration::from_secs(900),
            max_entries: 1600,
        }
    }

    #[test]
    fn networks_group_ipv6_by_prefix_and_mapped_ipv4_as_ipv4() {
        let a = Key::network("2001:db8:1:2::1".parse().unwrap(), 32, 64);
        let b = Key::network("2001:db8:1:2:ffff::9".parse().unwrap(), 32, 64);
        let c = Key::network("2001:db8:1:3::1".parse().unwrap(), 32, 64);
        assert_eq!(a, b);
        assert_ne!(a, c);
        let v4 = Key::network("192.0.2.7".parse().unwrap(), 32, 64);
        let mapped = Key::network("::ffff:192.0.2.7".parse().unwrap(), 32, 64);
        assert_eq!(v4, mapped);
        assert_ne!(v4, Key::network("192.0.2.8".parse().unwrap(), 32, 64));
        assert_eq!(
            Key::network("192.0.2.7".parse().unwrap(), 24, 64),
            Key::network("192.0.2.200".parse().unwrap(), 24, 64)
        );
        assert_eq!(mask(128, 0), 0);
        assert_eq!(mask(32, 32), 0xffff_ffff);
        assert_eq!(mask(128, 128), u128::MAX);
    }

    #[test]
    fn delays_double_up_to_the_cap_then_the_network_is_blocked() {
        let g = Guard::default();
        let p = policy();
        let net = Key::network("192.0.2.7".parse().unwrap(), 32, 64);
        let now = Instant::now();
        let base = Duration::from_secs(2);
        assert_eq!(g.pending(&net, None, base, &p, now), Duration::ZERO);
        let delays: Vec<u64> = (0..5)
            .map(|i| {
                let penalty = g.failed(&net, Some(&format!("user{i}")), base, &p, now);
                assert_eq!(penalty.blocked, i == 4, "failure {}", i + 1);
                penalty.delay.as_secs()
            })
            .collect();
        assert_eq!(delays, [2, 4, 8, 16, 30]);
        assert_eq!(
            g.pending(&net, None, base, &p, now),
            Duration::from_secs(30)
        );
        assert_eq!(
            g.pending(
                &net,
                None,
                base,
                &p,
                now + p.window + Duration::from_secs(1)
            ),
            Duration::ZERO,
            "expired records cost nothing"
        );
        assert_eq!(g.blocked(&net, now), Some(Duration::from_secs(600)));
        assert_eq!(g.blocked(&net, now + Duration::from_secs(601)), None);
        let other = Key::network("192.0.2.8".parse().unwrap(), 32, 64);
        assert_eq!(g.blocked(&other, now), None);
    }

    #[test]
    fn users_are_slowed_from_any_network_and_cleared_by_success() {
        let g = Guard::default();
        let p = policy();
        let now = Instant::now();
        let base = Duration::from_secs(1);
        for i in 0..3 {
            let net = Key::network(IpAddr::from([198, 51, 100, i]), 32, 64);
            let d = g.failed(&net, Some("alice"), base, &p, now).delay;
            assert_eq!(
                d,
                Duration::from_secs(1 << i),
                "distributed guessing still slows alice"
            );
        }
        g.succeeded("alice");
        let net = Key::network(IpAddr::from([198, 51, 100, 9]), 32, 64);
        assert_eq!(g.failed(&net, Some("alice"), base, &p, now).delay, base);
        assert_eq!(g.tracked(), (4, 1));
    }

    #[test]
    fn entries_expire_after_the_window_and_memory_is_bounded() {
        let g = Guard::default();
        let p = policy();
        let net = Key::network("192.0.2.7".parse().unwrap(), 32, 64);
        let now = Instant::now();
        let base = Duration::from_secs(1);
        for _ in 0..3 {
            g.failed(&net, None, base, &p, now);
        }
        let later = now + p.window + Duration::from_secs(1);
        assert_eq!(g.failed(&net, None, base, &p, later).delay, base);

        let small = BruteForce {
            max_entries: 32,
            ..policy()
        };
        for i in 0..10_000u32 {
            let ip = IpAddr::from(i.to_be_bytes());
            g.failed(&Key::network(ip, 32, 64), None, base, &small, later);
        }
        let (networks, _) = g.tracked();
        assert!(networks <= 32 + SHARDS, "{networks}");
    }

    #[test]
    fn slots_limit_and_give_back() {
        let slots = Arc::new(Slots::default());
        let key = Key::User("alice".into());
        let a = slots.take(key.clone(), 2).unwrap();
        let b = slots.take(key.clone(), 2).unwrap();
        assert!(slots.take(key.clone(), 2).is_err());
        drop(a);
        let c = slots.take(key.clone(), 2).unwrap();
        assert_eq!(slots.held(&key), 2);
        drop((b, c));
        assert_eq!(slots.held(&key), 0);
        assert!(slots.take(key, 0).unwrap().is_none(), "0 is no limit");
    }
}
