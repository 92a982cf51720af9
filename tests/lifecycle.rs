//! The process's life with sessions open: SIGTERM turns readiness off at
//! once, closes the listeners, lets sessions go on for the drain period,
//! then tells them `* BYE [UNAVAILABLE] Server shutting down` and exits 0;
//! a second SIGTERM cuts the drain short.

mod common;

use std::time::{Duration, Instant};

use common::client::Client;

#[test]
fn sigterm_drains_then_says_bye_and_exits_zero() {
    let (_b, mut p) =
        common::postern::alice_behind("sigterm", "limits:\n  shutdown_drain: 1500ms\n", "");
    let mut c = Client::imaps(p.imaps).0;
    assert!(c
        .login("alice", common::postern::PASSWORD)
        .last()
        .unwrap()
        .starts_with("L1 OK"));
    c.select_and_idle();
    assert!(p
        .http_get("/readyz")
        .is_some_and(|r| r.starts_with("HTTP/1.1 200")));

    // Taken before the signal: the drain may begin before kill(1) returns.
    let signalled = Instant::now();
    p.signal("TERM");
    common::wait_until("readiness fails", Duration::from_secs(2), || {
        p.http_get("/readyz")
            .is_some_and(|r| r.starts_with("HTTP/1.1 503"))
    });
    common::wait_until("the listener is closed", Duration::from_secs(2), || {
        std::net::TcpStream::connect(("127.0.0.1", p.imaps)).is_err()
    });
    // The session lives through the drain period, then hears why it ends.
    // Dovecot's IDLE keepalive (`* OK Still here`) may come first: its
    // timing is spread over the interval, so it can fall in the drain.
    let bye = loop {
        let line = c.line();
        if line != "* OK Still here" {
            break line;
        }
    };
    assert!(
        bye.starts_with("* BYE [UNAVAILABLE] Server shutting down"),
        "{bye}"
    );
    assert!(
        signalled.elapsed() >= Duration::from_millis(1400),
        "not before the drain period: {:?}",
        signalled.elapsed()
    );
    // Generous: under a sanitizer the leak check runs at exit.
    let status = p.wait_exit(common::SETTLE);
    assert!(status.success(), "{status:?}");
    let log = p.log();
    assert!(log.contains("reason=\"shutdown\""), "{log}");
    assert!(log.contains("shut down"), "{log}");
}

#[test]
fn a_second_sigterm_ends_the_drain_at_once() {
    let (_b, mut p) =
        common::postern::alice_behind("sigterm-twice", "limits:\n  shutdown_drain: 60s\n", "");
    let mut c = Client::logged_in(p.imaps, "alice");
    c.select_and_idle();
    p.signal("TERM");
    p.wait_for_log("draining sessions");
    p.signal("TERM");
    let second = Instant::now();
    let bye = c.line();
    assert!(
        bye.starts_with("* BYE [UNAVAILABLE] Server shutting down"),
        "{bye}"
    );
    assert!(p.wait_exit(common::SETTLE).success());
    // Generous for a loaded machine, and still a third of the drain.
    assert!(
        second.elapsed() < Duration::from_secs(20),
        "not the 60 s drain: {:?}",
        second.elapsed()
    );
}

#[test]
fn sigterm_with_no_sessions_exits_at_once() {
    let (_b, mut p) = common::postern::alice_behind("sigterm-idle", "", "");
    p.signal("TERM");
    let started = Instant::now();
    assert!(p.wait_exit(common::SETTLE).success());
    // Generous for a loaded machine (and a sanitizer's leak check at exit),
    // and still half the default 20 s drain.
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "no drain wait without sessions: {:?}",
        started.elapsed()
    );
}
