//! Faults around a running Postern: a burst of 10 000 connections opened
//! and dropped at once, its configuration file deleted while it runs, and
//! a backend killed in the middle of a large FETCH, and a log target that
//! cannot be written (a full disk).
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
    login_works_as(port, "alice")
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
    // Postern holds every connection.
    p.wait_metric("postern_sessions_active{listener=\"imap\"}", |v| {
        v == N as f64
    });
    // A normal login works while they are all open.
    assert!(login_works(p.imaps));
    drop(open);
    // Every dropped connection is closed.
    p.wait_metric("postern_sessions_active{listener=\"imap\"}", |v| v == 0.0);
    assert!(login_works(p.imaps), "and after");
    assert_eq!(
        p.metric("postern_connections_accepted_total{listener=\"imap\"}"),
        N as f64
    );
    // Counted after the active gauge went down, and the second login's
    // session ends only now that its client is gone: waited for, then
    // checked exactly.
    let ended = common::wait_for(
        "every session to be counted as ended",
        common::SETTLE,
        || common::postern::family_sum(&p.metrics_text(), "postern_sessions_ended_total{"),
        |&ended| ended >= N as f64 + 2.0,
    );
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
    // The refused reload is counted.
    p.wait_metric("postern_config_reloads_total{result=\"failure\"}", |v| {
        v >= 1.0
    });
    assert!(login_works(p.imaps), "the old configuration keeps serving");
    assert_eq!(
        p.http_get("/readyz").unwrap_or_default().lines().next(),
        Some("HTTP/1.1 200 OK")
    );
    // Put back, it is taken again.
    std::fs::write(&config, kept).unwrap();
    // A good reload.
    p.wait_metric("postern_config_reloads_total{result=\"success\"}", |v| {
        v >= 1.0
    });
    assert!(login_works(p.imaps));
}

/// A backend killed while it streams a large FETCH: the client's session
/// ends promptly (whatever part of the literal it had), and a session on
/// the other backend goes on untouched.
#[test]
fn a_backend_killed_mid_fetch_ends_its_sessions_only() {
    use common::backend::DovecotBackend;
    use common::postern::{user_on, Postern, Setup};
    common::backend::ensure_installed();
    let creds = [("alice", PASSWORD), ("bob", PASSWORD)];
    let a = DovecotBackend::start_with_users("fault-fetch-a", &creds);
    let b = DovecotBackend::start_with_users("fault-fetch-b", &creds);
    let p = Postern::start(Setup {
        backends: &[&a, &b],
        users: &(user_on("alice", "fault-fetch-a") + &user_on("bob", "fault-fetch-b")),
        backend_options: "reconnect_jitter: 500ms",
        ..Setup::default()
    });
    // An 8 MiB message for alice, appended through Postern.
    let body = {
        let mut m = b"From: a@example.com\r\nSubject: big\r\n\r\n".to_vec();
        while m.len() < 8 << 20 {
            m.extend_from_slice(&[b'x'; 998]);
            m.extend_from_slice(b"\r\n");
        }
        m
    };
    let mut alice = Client::logged_in(p.imaps, "alice");
    alice.send(format!("A1 APPEND INBOX {{{}+}}\r\n", body.len()).as_bytes());
    alice.send(&body);
    alice.send(b"\r\n");
    assert!(alice
        .until_tagged("A1")
        .last()
        .unwrap()
        .starts_with("A1 OK"));
    assert!(alice
        .command("S1", "SELECT INBOX")
        .last()
        .unwrap()
        .starts_with("S1 OK"));
    let mut bob = Client::logged_in(p.imaps, "bob");
    bob.select_and_idle();

    alice.send(b"F1 FETCH 1 BODY[]\r\n");
    let first = alice.line();
    assert!(first.contains("BODY[] {"), "{first}");
    let _ = alice.bytes(64 * 1024);
    a.stop();
    let killed = Instant::now();
    assert!(alice.closed(), "the client is told the session is over");
    assert!(
        killed.elapsed() < Duration::from_secs(5),
        "{:?}",
        killed.elapsed()
    );
    // Bob's IDLE on the other backend is still alive.
    bob.send(b"DONE\r\n");
    let done = bob.until_tagged("i");
    assert!(done.last().unwrap().starts_with("i OK"), "{done:?}");
    assert!(bob.command("N", "NOOP").last().unwrap().starts_with("N OK"));
    assert!(login_works_as(p.imaps, "bob"));
}

fn login_works_as(port: u16, user: &str) -> bool {
    let (mut c, _) = Client::imaps(port);
    c.login(user, PASSWORD)
        .last()
        .is_some_and(|l| l.starts_with("L1 OK"))
}

/// Logging to a full disk (/dev/full): log lines are lost, the proxy is
/// not. It serves, stays ready and shuts down cleanly.
#[test]
fn a_full_log_target_loses_lines_not_the_proxy() {
    let (_b, mut p) = alice_behind("fault-full-log", "", "");
    p.respawn_logging_to(std::path::Path::new("/dev/full"));
    for _ in 0..3 {
        assert!(login_works(p.imaps));
    }
    assert_eq!(
        p.wait_metric(
            "postern_authentications_total{mechanism=\"LOGIN\",result=\"success\",source=\"static\"}",
            |v| v >= 3.0
        ),
        3.0
    );
    p.signal("TERM");
    // Generous: a login's session may still be closing (the drain waits
    // for it), and the sanitizer's leak check runs at exit.
    let status = p.wait_exit(common::SETTLE);
    assert!(status.success(), "{status:?}");
}
