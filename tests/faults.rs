//! Faults around a running Postern: a burst of 10 000 connections opened
//! and dropped at once, and its configuration file deleted while it runs.
//! After each, a normal login still works and `/metrics` adds up.
//! (Backends killed mid-IDLE or refusing connections, and auth sources
//! hanging or dying, are in tests/failover.rs, tests/http_auth.rs and
//! tests/ldap_auth.rs.)

mod common;

use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::client::Client;
use common::postern::{alice_behind, PASSWORD};

fn login_works(port: u16) -> bool {
    let (mut c, _) = Client::imaps(port);
    c.login("alice", PASSWORD)
        .last()
        .is_some_and(|l| l.starts_with("L1 OK"))
}

#[test]
fn ten_thousand_connections_opened_and_dropped_at_once() {
    const N: usize = 10_000;
    let (_b, p) = alice_behind("fault-burst", "limits:\n  max_connections: 12000\n", "");
    let started = Instant::now();
    let mut open = Vec::with_capacity(N);
    for _ in 0..N {
        let s = TcpStream::connect(("127.0.0.1", p.imap)).expect("connect");
        open.push(s);
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "bounded in time"
        );
    }
    common::wait_until(
        "Postern holds every connection",
        Duration::from_secs(30),
        || p.metric("postern_sessions_active{listener=\"imap\"}") == N as f64,
    );
    // A normal login works while they are all open.
    assert!(login_works(p.imaps));
    drop(open);
    common::wait_until(
        "every dropped connection is closed",
        Duration::from_secs(30),
        || p.metric("postern_sessions_active{listener=\"imap\"}") == 0.0,
    );
    assert!(login_works(p.imaps), "and after");
    assert_eq!(
        p.metric("postern_connections_accepted_total{listener=\"imap\"}"),
        N as f64
    );
    let ended: f64 = p
        .metrics_text()
        .lines()
        .filter(|l| l.starts_with("postern_sessions_ended_total{"))
        .map(|l| l.rsplit(' ').next().unwrap().parse::<f64>().unwrap())
        .sum();
    assert_eq!(
        ended,
        N as f64 + 2.0,
        "every connection ended once, the two logins too"
    );
    assert_eq!(
        p.metric("postern_connections_rejected_total{listener=\"imap\"}"),
        0.0
    );
}

#[test]
fn a_deleted_configuration_file_keeps_the_running_one() {
    let (_b, p) = alice_behind("fault-deleted", "reload:\n  interval: 200ms\n", "");
    let config = p.dir.join("postern.yaml");
    let kept = std::fs::read(&config).unwrap();
    std::fs::remove_file(&config).unwrap();
    common::wait_until(
        "the refused reload is counted",
        Duration::from_secs(10),
        || p.metric("postern_config_reloads_total{result=\"failure\"}") >= 1.0,
    );
    assert!(login_works(p.imaps), "the old configuration keeps serving");
    assert_eq!(
        p.http_get("/readyz").unwrap_or_default().lines().next(),
        Some("HTTP/1.1 200 OK")
    );
    // Put back, it is taken again.
    std::fs::write(&config, kept).unwrap();
    common::wait_until("a good reload", Duration::from_secs(10), || {
        p.metric("postern_config_reloads_total{result=\"success\"}") >= 1.0
    });
    assert!(login_works(p.imaps));
}
