//! Helpers shared by the integration tests; each test binary uses a subset.
#![allow(dead_code)]

pub mod backend;
pub mod client;
pub mod ldap;
pub mod pki;
pub mod postern;

use std::collections::BTreeSet;
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

/// Polls `f` every 20 ms until it returns true; panics naming `what` once
/// `deadline` has passed.
pub fn wait_until(what: &str, deadline: Duration, mut f: impl FnMut() -> bool) {
    let start = Instant::now();
    loop {
        if f() {
            return;
        }
        if start.elapsed() >= deadline {
            panic!("timed out after {deadline:?} waiting for {what}");
        }
        thread::sleep(Duration::from_millis(20));
    }
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
