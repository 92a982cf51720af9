//! The login defence, and per-address / per-user session limits, shared by
//! every worker thread and kept across reloads.
//!
//! The defence has to stop password guessing without ever locking out the
//! people behind the address it watches: a carrier-grade NAT, an office, a
//! webmail server. It rests on four rules.
//!
//! 1. **Attempts are counted before they are checked.** A credential check
//!    takes a place in its network's lane and in its user's lane
//!    ([`Guard::admit`]; at most `max_checks_per_network` and
//!    `max_checks_per_user` at once) before the source is asked. A failed
//!    attempt keeps its places for its delay (`failure_delay`, doubled for
//!    every failure on record for the network or the user, up to
//!    `max_delay`), counted from when it got them, so queueing shortens
//!    nothing; an unavailable or busy answer keeps them for
//!    `failure_delay`, and so does a check abandoned midway (the session
//!    ended during it): hanging up early frees nothing. A login that finds
//!    a lane full waits for a place (up to `queue_wait`), then gets
//!    `NO [UNAVAILABLE]`.
//! 2. **Right passwords are answered at once**, whatever failures are on
//!    record for the network or the user. The timing this reveals (an answer now
//!    means right, none yet means wrong) buys nothing: a guess holds its
//!    places for its whole delay whether or not the client waits. So one
//!    network gets at most `max_checks_per_network` guesses per
//!    `failure_delay` (defaults: 8 per 2 s, 4 a second), falling towards 8
//!    per `max_delay` (8 per 30 s, about 960 an hour) as its failures pile
//!    up; one user, from all networks together, at most
//!    `max_checks_per_user` per `max_delay` once guessed at (2 per 30 s:
//!    240 an hour), plus three tries from each network where the user is
//!    familiar. Users are counted by the name as typed (normalised): a
//!    mailbox with several names has each name's budget. A success does
//!    not clear the user's record, so the victim's own logins do not reset
//!    an attacker's budget.
//! 3. **Familiar pairs.** A user who logged in from a network within
//!    `familiar_for` is familiar there: their logins from it skip the
//!    network's block and both lanes above, taking instead a lane of their
//!    own for the pair (`max_checks_per_user` wide) and one lane shared by
//!    all familiar pairs of that network (`max_checks_per_network`), so an
//!    attacker behind the same address never queues in front of them, and
//!    the names familiar there add one network's width, not one each.
//!    After [`FAMILIAR_FAILURES`] failures since its last success a pair is
//!    a stranger again: a familiar name buys a guesser three tries, not a
//!    way around the block. Pairs are kept as keyed 64-bit fingerprints
//!    (no user name or address is stored), at most `max_familiar` (about
//!    40 bytes each); past it the soonest to expire goes.
//! 4. **Network blocks are for spraying.** A network is blocked for
//!    `block_for` once failures for `block_after` distinct user names are
//!    on record for it within a sliding `window`: one phone retrying an old
//!    password never blocks its NAT, one address trying many accounts does.
//!    A block refuses logins without asking the source, except familiar
//!    pairs'; it starts the count afresh, so a network that sprays on after
//!    its block ends is blocked again.
//!
//! Failure records (per network, per user) expire `window` after their
//! last failure; memory is bounded by `max_entries`, past it the stalest
//! goes. Postern's own waits (a lane's queue, a failure's delay) do not
//! count against the pre-auth time limit (see `session.rs`).
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

use tokio::sync::Notify;
use tokio::time::Instant;

use crate::config::BruteForce;

const SHARDS: usize = 16;

/// Failures after which a familiar pair is treated as a stranger until its
/// next success: a familiar name is not a way around the network's block.
pub const FAMILIAR_FAILURES: u8 = 3;

/// Lanes with no place taken are dropped at least this often.
const SWEEP_EVERY: Duration = Duration::from_secs(60);

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

impl Key {
    /// A network as the cluster store names it: `4:` or `6:` and the
    /// masked address in hex.
    pub fn ident(&self) -> String {
        match self {
            Key::Network(bits, family) => format!("{family}:{bits:x}"),
            Key::User(name) => format!("u:{name}"),
        }
    }

    /// The network [`Key::ident`] named.
    pub fn from_ident(text: &str) -> Option<Key> {
        let (family, bits) = text.split_once(':')?;
        let family: u8 = family.parse().ok()?;
        if family != 4 && family != 6 {
            return None;
        }
        Some(Key::Network(u128::from_str_radix(bits, 16).ok()?, family))
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
    /// For a network: fingerprints of the distinct user names that failed
    /// from it within `window`, with their last failure, up to
    /// `block_after`.
    users: Vec<(u64, Instant)>,
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

/// A lane of credential checks: a network's, a user's, or a familiar
/// pair's.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Lane {
    Network(u64),
    User(u64),
    Pair(u64),
    Familiar(u64),
}

impl Lane {
    /// Bounded label for metrics and logs.
    pub fn scope(&self) -> &'static str {
        match self {
            Lane::Network(_) => "network",
            Lane::User(_) => "user",
            Lane::Pair(_) => "pair",
            Lane::Familiar(_) => "familiar",
        }
    }
}

/// Places taken in a lane: checks running, and answers not yet due.
#[derive(Default)]
struct Places {
    checking: u32,
    held_until: Vec<Instant>,
}

impl Places {
    fn taken(&mut self, now: Instant) -> usize {
        self.held_until.retain(|u| *u > now);
        self.checking as usize + self.held_until.len()
    }
}

struct Lanes {
    places: HashMap<Lane, Places>,
    /// Sweep the lanes no place is held in once there are this many, or
    /// at the latest at `sweep_by`.
    sweep_at: usize,
    sweep_by: Option<Instant>,
}

/// Every place in a lane stayed taken for as long as a login may wait.
#[derive(Debug, PartialEq, Eq)]
pub struct LaneFull(pub Lane);

/// Places in one or two lanes, held for one credential check. Give them
/// back with [`Ticket::release`]; dropped unreleased (the session went
/// away mid-check) they stay taken for `hold_on_drop`, as a failure's
/// would.
pub struct Ticket {
    guard: Arc<Guard>,
    lanes: [Option<Lane>; 2],
    admitted: Instant,
    hold_on_drop: Duration,
    released: bool,
}

impl Ticket {
    /// Frees the places now (`None`: a right password) or `hold` after they
    /// were taken (a failure's delay). Counted from the admission, not from
    /// when the credentials arrived: time spent queueing must not shorten
    /// what a failure costs its lanes.
    pub fn release(mut self, hold: Option<Duration>) {
        self.released = true;
        let until = hold.map(|h| self.admitted + h);
        self.guard.give_back(&self.lanes, until);
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        if !self.released {
            let until = Instant::now() + self.hold_on_drop;
            self.guard.give_back(&self.lanes, Some(until));
        }
    }
}

pub struct Guard {
    shards: Vec<Mutex<HashMap<Key, Entry>>>,
    hasher: RandomState,
    /// Entries held, by kind, kept as they change (read for the metrics).
    networks: AtomicUsize,
    users: AtomicUsize,
    /// Familiar pairs: fingerprint → when it is forgotten, and failures
    /// since its last success.
    familiar: Vec<Mutex<HashMap<u64, (Instant, u8)>>>,
    familiar_count: AtomicUsize,
    lanes: Mutex<Lanes>,
    /// Woken whenever places are given back at once.
    freed: Notify,
}

impl Default for Guard {
    fn default() -> Self {
        Guard {
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
            hasher: RandomState::new(),
            networks: AtomicUsize::new(0),
            users: AtomicUsize::new(0),
            familiar: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
            familiar_count: AtomicUsize::new(0),
            lanes: Mutex::new(Lanes {
                places: HashMap::new(),
                sweep_at: 1024,
                sweep_by: None,
            }),
            freed: Notify::new(),
        }
    }
}

impl Guard {
    fn shard(&self, key: &Key) -> &Mutex<HashMap<Key, Entry>> {
        &self.shards[self.hasher.hash_one(key) as usize % SHARDS]
    }

    /// A keyed fingerprint: the key is this process's, so fingerprints
    /// cannot be made to collide from outside.
    fn fingerprint<T: std::hash::Hash>(&self, value: T) -> u64 {
        self.hasher.hash_one(value)
    }

    /// The lane of `network`'s checks.
    pub fn network_lane(&self, network: &Key) -> Lane {
        Lane::Network(self.fingerprint(("network", network)))
    }

    /// The lane of `user`'s checks from networks where they are not familiar.
    pub fn user_lane(&self, user: &str) -> Lane {
        Lane::User(self.fingerprint(("user", user)))
    }

    /// The lane of `user`'s checks from `network`, where they are familiar.
    pub fn pair_lane(&self, user: &str, network: &Key) -> Lane {
        Lane::Pair(self.pair(user, network))
    }

    fn pair(&self, user: &str, network: &Key) -> u64 {
        self.fingerprint(("pair", user, network))
    }

    /// Takes a place in each of `lanes` (each with its width), waiting
    /// until `give_up` for places to free. `waited` is told which lane was
    /// full the first time one is.
    pub async fn admit(
        self: &Arc<Self>,
        lanes: &[(Lane, u32)],
        give_up: Instant,
        hold_on_drop: Duration,
        mut waited: impl FnMut(Lane),
    ) -> Result<Ticket, LaneFull> {
        debug_assert!(lanes.len() <= 2, "a ticket holds two lanes at most");
        let mut told = false;
        loop {
            let freed = self.freed.notified();
            tokio::pin!(freed);
            freed.as_mut().enable();
            let now = Instant::now();
            // The lane that is full and, if its places free by themselves,
            // when the first does.
            let full = {
                let mut state = self.lanes.lock().unwrap();
                let full = lanes.iter().find_map(|(lane, width)| {
                    let places = state.places.entry(*lane).or_default();
                    (places.taken(now) >= *width as usize)
                        .then(|| (*lane, places.held_until.iter().min().copied()))
                });
                match full {
                    None => {
                        let mut taken = [None; 2];
                        for (slot, (lane, _)) in taken.iter_mut().zip(lanes) {
                            state.places.entry(*lane).or_default().checking += 1;
                            *slot = Some(*lane);
                        }
                        if state.places.len() >= state.sweep_at
                            || state.sweep_by.is_none_or(|by| by <= now)
                        {
                            state.places.retain(|_, p| p.taken(now) > 0);
                            state.sweep_at = (state.places.len() * 2).max(1024);
                            state.sweep_by = Some(now + SWEEP_EVERY);
                        }
                        return Ok(Ticket {
                            guard: Arc::clone(self),
                            lanes: taken,
                            admitted: now,
                            hold_on_drop,
                            released: false,
                        });
                    }
                    Some(full) => full,
                }
            };
            let (lane, frees_at) = full;
            if now >= give_up {
                return Err(LaneFull(lane));
            }
            if !told {
                told = true;
                waited(lane);
            }
            let wake = frees_at.map_or(give_up, |at| at.min(give_up));
            tokio::select! {
                _ = freed => {}
                _ = tokio::time::sleep_until(wake) => {}
            }
        }
    }

    fn give_back(&self, lanes: &[Option<Lane>; 2], until: Option<Instant>) {
        let now = Instant::now();
        let mut state = self.lanes.lock().unwrap();
        for lane in lanes.iter().flatten() {
            if let Some(places) = state.places.get_mut(lane) {
                places.checking = places.checking.saturating_sub(1);
                match until {
                    Some(until) if until > now => places.held_until.push(until),
                    _ => {}
                }
                if places.taken(now) == 0 {
                    state.places.remove(lane);
                }
            }
        }
        drop(state);
        // Also when the places become holds: a waiter that saw only checks
        // running learns when they free.
        self.freed.notify_waiters();
    }

    /// Whether `user` logged in from `network` within `familiar_for` and
    /// has failed there fewer than [`FAMILIAR_FAILURES`] times since.
    pub fn familiar(&self, user: &str, network: &Key, now: Instant) -> bool {
        let pair = self.pair(user, network);
        let shard = self.familiar[pair as usize % SHARDS].lock().unwrap();
        shard
            .get(&pair)
            .is_some_and(|(until, failures)| *until > now && *failures < FAMILIAR_FAILURES)
    }

    /// A failure of `user` from `network`: counted against the pair's
    /// familiarity, so a familiar name cannot be guessed at for long.
    fn pair_failed(&self, user: &str, network: &Key) {
        let pair = self.pair(user, network);
        let mut shard = self.familiar[pair as usize % SHARDS].lock().unwrap();
        if let Some((_, failures)) = shard.get_mut(&pair) {
            *failures = failures.saturating_add(1);
        }
    }

    /// The lane all familiar pairs of `network` share, so that the names
    /// familiar there add one network's width of checks, not one each.
    pub fn familiar_lane(&self, network: &Key) -> Lane {
        Lane::Familiar(self.fingerprint(("familiar", network)))
    }

    /// Remembers that `user` logged in from `network`.
    pub fn remember(&self, user: &str, network: &Key, policy: &BruteForce, now: Instant) {
        if policy.max_familiar == 0 || policy.familiar_for.is_zero() {
            return;
        }
        let pair = self.pair(user, network);
        let mut shard = self.familiar[pair as usize % SHARDS].lock().unwrap();
        let limit = (policy.max_familiar / SHARDS).max(1);
        if !shard.contains_key(&pair) {
            if shard.len() >= limit {
                let before = shard.len();
                shard.retain(|_, (until, _)| *until > now);
                if shard.len() == before {
                    let soonest = shard.iter().min_by_key(|(_, (u, _))| *u).map(|(k, _)| *k);
                    if let Some(soonest) = soonest {
                        shard.remove(&soonest);
                    }
                }
                self.familiar_count
                    .fetch_sub(before - shard.len(), Ordering::Relaxed);
            }
            self.familiar_count.fetch_add(1, Ordering::Relaxed);
        }
        shard.insert(pair, (now + policy.familiar_for, 0));
    }

    /// Blocks `network` for `span` from now, as another replica decided
    /// (a block already running to a later time is kept).
    pub fn block(&self, network: &Key, span: Duration) {
        let now = Instant::now();
        let until = now + span;
        let mut shard = self.shard(network).lock().unwrap();
        if !shard.contains_key(network) {
            self.count(network).fetch_add(1, Ordering::Relaxed);
        }
        let entry = shard.entry(network.clone()).or_insert(Entry {
            failures: 0,
            last: now,
            blocked_until: None,
            users: Vec::new(),
        });
        if entry.blocked_until.is_none_or(|u| u < until) {
            entry.blocked_until = Some(until);
            entry.users.clear();
        }
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
        let who = user.map(|u| self.fingerprint(("failed", u)));
        if let Some(u) = user {
            self.pair_failed(u, network);
        }
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
                users: Vec::new(),
            });
            if now.saturating_duration_since(entry.last) > policy.window {
                entry.failures = 0;
                entry.users.clear();
                if entry.blocked_until.is_some_and(|u| u <= now) {
                    entry.blocked_until = None;
                }
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
            if let (Key::Network(..), Some(who)) = (key, who) {
                let wanted = policy.block_after as usize;
                // Names are counted within a sliding window; a block starts
                // the count afresh, so a network that goes on spraying
                // after its block ends is blocked again.
                entry
                    .users
                    .retain(|(_, at)| now.saturating_duration_since(*at) <= policy.window);
                match entry.users.iter_mut().find(|(name, _)| *name == who) {
                    Some(seen) => seen.1 = now,
                    None if wanted > 0 => entry.users.push((who, now)),
                    None => {}
                }
                if wanted > 0
                    && entry.users.len() >= wanted
                    && entry.blocked_until.is_none_or(|u| u <= now)
                {
                    entry.blocked_until = Some(now + policy.block_for);
                    entry.users.clear();
                    blocked = true;
                }
            }
        }
        Penalty {
            delay: delay(base, worst, policy.max_delay),
            blocked,
            scope,
        }
    }

    /// Entries held: (networks, users, familiar pairs).
    pub fn tracked(&self) -> (usize, usize, usize) {
        (
            self.networks.load(Ordering::Relaxed),
            self.users.load(Ordering::Relaxed),
            self.familiar_count.load(Ordering::Relaxed),
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
pub fn delay(base: Duration, failures: u32, max: Duration) -> Duration {
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
            block_after: 5,
            block_for: Duration::from_secs(600),
            window: Duration::from_secs(900),
            max_entries: 1600,
            ..BruteForce::default()
        }
    }

    #[test]
    fn networks_are_named_for_the_store_and_read_back() {
        for ip in ["203.0.113.7", "2001:db8:1:2::5"] {
            let net = Key::network(ip.parse().unwrap(), 32, 64);
            let ident = net.ident();
            assert_eq!(Key::from_ident(&ident), Some(net), "{ident}");
        }
        assert_eq!(
            Key::network("203.0.113.7".parse().unwrap(), 32, 64).ident(),
            "4:cb007107"
        );
        assert_eq!(Key::from_ident("5:00"), None);
        assert_eq!(Key::from_ident("4:xyz"), None);
    }

    #[test]
    fn a_block_from_another_replica_holds_here() {
        let g = Guard::default();
        let net = Key::network("192.0.2.1".parse().unwrap(), 32, 64);
        let now = Instant::now();
        assert_eq!(g.blocked(&net, now), None);
        g.block(&net, Duration::from_secs(60));
        assert!(g.blocked(&net, now).is_some());
        // A shorter block does not cut a longer one short.
        g.block(&net, Duration::from_secs(1));
        assert!(g.blocked(&net, now + Duration::from_secs(30)).is_some());
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
    fn delays_double_up_to_the_cap_and_many_names_block_the_network() {
        let g = Guard::default();
        let p = policy();
        let net = Key::network("192.0.2.7".parse().unwrap(), 32, 64);
        let now = Instant::now();
        let base = Duration::from_secs(2);
        let delays: Vec<u64> = (0..5)
            .map(|i| {
                let penalty = g.failed(&net, Some(&format!("user{i}")), base, &p, now);
                assert_eq!(penalty.blocked, i == 4, "failure {}", i + 1);
                penalty.delay.as_secs()
            })
            .collect();
        assert_eq!(delays, [2, 4, 8, 16, 30]);
        assert_eq!(g.blocked(&net, now), Some(Duration::from_secs(600)));
        assert_eq!(g.blocked(&net, now + Duration::from_secs(601)), None);
        let other = Key::network("192.0.2.8".parse().unwrap(), 32, 64);
        assert_eq!(g.blocked(&other, now), None);
    }

    #[test]
    fn one_user_failing_again_and_again_never_blocks_the_network() {
        let g = Guard::default();
        let p = policy();
        let net = Key::network("192.0.2.7".parse().unwrap(), 32, 64);
        let now = Instant::now();
        for _ in 0..100 {
            assert!(
                !g.failed(&net, Some("phone"), Duration::from_secs(1), &p, now)
                    .blocked
            );
        }
        // Nameless failures (a name no account could have) count for the
        // delay but name nobody.
        for _ in 0..100 {
            assert!(
                !g.failed(&net, None, Duration::from_secs(1), &p, now)
                    .blocked
            );
        }
        assert_eq!(g.blocked(&net, now), None);
        // A window later the names are forgotten too.
        let later = now + p.window + Duration::from_secs(1);
        for i in 0..4 {
            g.failed(
                &net,
                Some(&format!("u{i}")),
                Duration::from_secs(1),
                &p,
                later,
            );
        }
        assert_eq!(g.blocked(&net, later), None, "4 names, block_after 5");
    }

    #[test]
    fn a_network_spraying_on_is_blocked_again_and_old_names_age_out() {
        let g = Guard::default();
        let p = BruteForce {
            block_after: 3,
            block_for: Duration::from_secs(60),
            ..policy()
        };
        let net = Key::network("192.0.2.7".parse().unwrap(), 32, 64);
        let base = Duration::from_secs(1);
        let t0 = Instant::now();
        let fail = |name: &str, at: u64| {
            g.failed(&net, Some(name), base, &p, t0 + Duration::from_secs(at))
                .blocked
        };
        assert!(!fail("u0", 0) && !fail("u1", 0) && fail("u2", 0));
        // The block ends; three more names block again.
        assert_eq!(g.blocked(&net, t0 + Duration::from_secs(61)), None);
        assert!(!fail("u3", 61) && !fail("u4", 61) && fail("u5", 61));
        assert!(g.blocked(&net, t0 + Duration::from_secs(62)).is_some());
        // Names count within a sliding window: a trickle of failures keeps
        // the record alive, but a name older than `window` no longer counts.
        let at = 200;
        assert!(!fail("a", at));
        assert!(!fail("b", at + 800));
        assert!(!fail("c", at + 1000), "a is 1000 s old, window 900 s");
        assert!(fail("d", at + 1001));
    }

    #[test]
    fn familiar_pairs_that_keep_failing_become_strangers_until_a_success() {
        let g = Guard::default();
        let p = policy();
        let home = Key::network("192.0.2.7".parse().unwrap(), 32, 64);
        let now = Instant::now();
        g.remember("alice", &home, &p, now);
        for _ in 1..FAMILIAR_FAILURES {
            g.failed(&home, Some("alice"), Duration::from_secs(1), &p, now);
            assert!(g.familiar("alice", &home, now));
        }
        g.failed(&home, Some("alice"), Duration::from_secs(1), &p, now);
        assert!(!g.familiar("alice", &home, now));
        g.remember("alice", &home, &p, now);
        assert!(g.familiar("alice", &home, now));
    }

    #[test]
    fn users_are_slowed_from_any_network_and_success_clears_nothing() {
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
        let net = Key::network(IpAddr::from([198, 51, 100, 9]), 32, 64);
        g.remember("alice", &net, &p, now);
        let d = g.failed(&net, Some("alice"), base, &p, now).delay;
        assert_eq!(d, Duration::from_secs(8));
        assert_eq!(g.tracked(), (4, 1, 1));
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
        let (networks, _, _) = g.tracked();
        assert!(networks <= 32 + SHARDS, "{networks}");
    }

    #[test]
    fn familiar_pairs_are_remembered_for_a_time_and_bounded() {
        let g = Guard::default();
        let p = BruteForce {
            familiar_for: Duration::from_secs(3600),
            max_familiar: 64,
            ..policy()
        };
        let home = Key::network("192.0.2.7".parse().unwrap(), 32, 64);
        let away = Key::network("192.0.2.8".parse().unwrap(), 32, 64);
        let now = Instant::now();
        assert!(!g.familiar("alice", &home, now));
        g.remember("alice", &home, &p, now);
        assert!(g.familiar("alice", &home, now));
        assert!(!g.familiar("alice", &away, now), "only where she logged in");
        assert!(!g.familiar("bob", &home, now), "only for her");
        assert!(!g.familiar("alice", &home, now + Duration::from_secs(3601)));
        for i in 0..10_000u32 {
            g.remember(&format!("u{i}"), &home, &p, now);
        }
        let (_, _, familiar) = g.tracked();
        assert!(familiar <= 64 + SHARDS, "{familiar}");
        let off = BruteForce {
            familiar_for: Duration::ZERO,
            ..policy()
        };
        g.remember("carol", &home, &off, now);
        assert!(!g.familiar("carol", &home, now));
    }

    fn lanes(g: &Guard, user: &str) -> Vec<(Lane, u32)> {
        let net = Key::network("192.0.2.7".parse().unwrap(), 32, 64);
        vec![(g.network_lane(&net), 3), (g.user_lane(user), 2)]
    }

    #[tokio::test(start_paused = true)]
    async fn a_lane_admits_its_width_and_failures_hold_their_places() {
        let g = Arc::new(Guard::default());
        let hold = Duration::from_secs(2);
        let soon = || Instant::now() + Duration::from_secs(10);
        let a = g
            .admit(&lanes(&g, "alice"), soon(), hold, |_| {})
            .await
            .unwrap();
        let b = g
            .admit(&lanes(&g, "alice"), soon(), hold, |_| {})
            .await
            .unwrap();
        // alice's lane (2) is full; bob still has the network's third place.
        let now = Instant::now();
        let full = g.admit(&lanes(&g, "alice"), now, hold, |_| {}).await;
        assert!(matches!(full, Err(LaneFull(Lane::User(_)))));
        let c = g
            .admit(&lanes(&g, "bob"), soon(), hold, |_| {})
            .await
            .unwrap();
        let full = g.admit(&lanes(&g, "carol"), now, hold, |_| {}).await;
        assert!(matches!(full, Err(LaneFull(Lane::Network(_)))));
        // A right password frees its places at once: a waiter gets in.
        let mut told = None;
        let waiter = {
            let g = Arc::clone(&g);
            let lanes = lanes(&g, "carol");
            tokio::spawn(async move {
                let t = g
                    .admit(&lanes, soon(), hold, |l| told = Some(l.scope()))
                    .await;
                (t.map(|t| t.release(None)).is_ok(), Instant::now(), told)
            })
        };
        tokio::task::yield_now().await;
        let released = Instant::now();
        a.release(None);
        let (ok, at, told) = waiter.await.unwrap();
        assert!(ok);
        assert_eq!(at, released, "admitted as soon as the place was free");
        assert_eq!(told, Some("network"));
        // A failure holds its places until its answer is due.
        b.release(Some(Duration::from_secs(5)));
        let d = g
            .admit(&lanes(&g, "carol"), soon(), hold, |_| {})
            .await
            .unwrap();
        let started = Instant::now();
        let e = g
            .admit(&lanes(&g, "dave"), soon(), hold, |_| {})
            .await
            .unwrap();
        assert_eq!(Instant::now() - started, Duration::from_secs(5));
        // Checks dropped unreleased (the client went away) hold for
        // `hold_on_drop`, as a failure would.
        drop((c, d, e));
        let started = Instant::now();
        let f = g
            .admit(&lanes(&g, "erin"), soon(), hold, |_| {})
            .await
            .unwrap();
        assert_eq!(Instant::now() - started, hold);
        let h = g
            .admit(&lanes(&g, "frank"), soon(), hold, |_| {})
            .await
            .unwrap();
        let i = g
            .admit(&lanes(&g, "gina"), soon(), hold, |_| {})
            .await
            .unwrap();
        // Waiting is bounded.
        let started = Instant::now();
        let give_up = started + Duration::from_secs(3);
        let full = g.admit(&lanes(&g, "hal"), give_up, hold, |_| {}).await;
        assert!(matches!(full, Err(LaneFull(Lane::Network(_)))));
        assert_eq!(Instant::now(), give_up);
        for t in [f, h, i] {
            t.release(None);
        }
        // Lanes whose places have all come free are swept away.
        for i in 0..3000 {
            let lane = [(g.user_lane(&format!("u{i}")), 1)];
            let t = g.admit(&lane, soon(), hold, |_| {}).await.unwrap();
            t.release(Some(Duration::from_secs(1)));
        }
        assert!(g.lanes.lock().unwrap().places.len() >= 3000);
        tokio::time::sleep(SWEEP_EVERY).await;
        let _ = g
            .admit(&lanes(&g, "gina"), soon(), hold, |_| {})
            .await
            .unwrap();
        assert!(g.lanes.lock().unwrap().places.len() <= 2);
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
