//! Helpers shared by the integration tests; each test binary uses a subset.
#![allow(dead_code)]

pub mod auth_http;
pub mod backend;
pub mod client;
pub mod ldap;
pub mod pki;
pub mod postern;
pub mod postfix;
pub mod redis;

use std::collections::BTreeSet;
use std::fmt::Debug;
use std::net::TcpListener;
use std::sync::Mutex;
use std::thread;
use std::time::{Duration, Instant};

/// A loopback port that was free a moment ago. The port is released before
/// it is returned, so a caller that fails to bind it should retry with a
/// new one; within this process no port is handed out twice.
pub fn free_port() -> u16 {
    static GIVEN: Mutex<BTreeSet<u16>> = Mutex::new(BTreeSet::new());
    loop {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|listener| listener.local_addr())
            .expect("bind an ephemeral loopback port")
            .port();
        if GIVEN.lock().unwrap().insert(port) {
            return port;
        }
    }
}

/// How long a test waits for something that happens by itself, a moment
/// after the action that causes it: Dovecot's log process writing a line,
/// a counter bumped after the reply went out, a process or socket closing.
/// Generous, because CI machines are loaded and the AddressSanitizer pass
/// is several times slower; a wait that succeeds costs only its own time.
pub const SETTLE: Duration = Duration::from_secs(30);

/// Reads `probe` every 20 ms until `accept` holds for what it returned,
/// and returns that value. Past `deadline` it panics naming `what` and
/// showing the last value read, so a failure says what was seen instead.
///
/// This is how a test reads anything that completes after the action it
/// checks (logs, metrics, files, processes): never once, right after.
pub fn wait_for<T: Debug>(
    what: &str,
    deadline: Duration,
    mut probe: impl FnMut() -> T,
    accept: impl Fn(&T) -> bool,
) -> T {
    let start = Instant::now();
    loop {
        let seen = probe();
        if accept(&seen) {
            return seen;
        }
        if start.elapsed() >= deadline {
            panic!("timed out after {deadline:?} waiting for {what}; last seen: {seen:#?}");
        }
        thread::sleep(Duration::from_millis(20));
    }
}

/// A log's text whose `Debug` shows only its last 40 lines, as they are:
/// what a failed wait on a log prints.
pub struct LogText(pub String);

impl Debug for LogText {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let lines: Vec<&str> = self.0.lines().collect();
        let tail = &lines[lines.len().saturating_sub(40)..];
        write!(
            f,
            "(last {} of {} lines)\n{}",
            tail.len(),
            lines.len(),
            tail.join("\n")
        )
    }
}

/// Polls `f` every 20 ms until it returns true; panics naming `what` once
/// `deadline` has passed. For conditions with nothing worth showing on
/// failure; otherwise `wait_for`.
pub fn wait_until(what: &str, deadline: Duration, mut f: impl FnMut() -> bool) {
    wait_for(what, deadline, &mut f, |ok| *ok);
}

/// A user name whose first choice, by the rendezvous hashing Postern uses
/// over these backend names, is `first`. Placement depends on names only,
/// so no backend needs to run for this.
pub fn user_preferring(names: &[&str], first: &str) -> String {
    let mut yaml = String::from("pool:\n");
    for (i, name) in names.iter().enumerate() {
        yaml.push_str(&format!(
            "  - {{ name: {name}, address: \"127.0.0.1:{}\" }}\n",
            i + 1
        ));
    }
    let pool = ::postern::route::Pool::new(
        &serde_yaml::from_str::<::postern::config::Backends>(&yaml).unwrap(),
        &::postern::metrics::Metrics::new(),
        &|p| p.to_owned(),
        None,
    )
    .unwrap();
    (0..)
        .map(|i| format!("u{i}"))
        .find(|u| pool.order(u)[0].name == first)
        .unwrap()
}
