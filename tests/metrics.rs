//! The metrics output after real traffic, checked by Prometheus' own
//! `promtool check metrics` (naming, units, types), and the families an
//! operator's dashboards and alerts rely on are present. promtool comes
//! with the `prometheus` package; scripts/test installs it.

mod common;

use std::io::Write;
use std::process::{Command, Stdio};

use common::client::Client;
use common::postern::PASSWORD;

/// The families an operator's dashboards and alerts rely on.
const FAMILIES: &[&str] = &[
    "postern_connections_accepted_total",
    "postern_sessions_active",
    "postern_tls_handshakes_total",
    "postern_authentications_total",
    "postern_auth_duration_seconds_bucket",
    "postern_auth_penalties_total",
    "postern_backend_logins_total",
    "postern_backend_up",
    "postern_backend_draining",
    "postern_backend_checks_total",
    "postern_backend_check_duration_seconds_bucket",
    "postern_routes_total",
    "postern_login_duration_seconds_bucket",
    "postern_session_duration_seconds_bucket",
    "postern_relay_bytes_total",
    "postern_config_reloads_total",
    "postern_config_info",
    "process_resident_memory_bytes",
    "process_open_fds",
];

/// The body of an HTTP response (all of it if there is no header).
fn body_of(response: &str) -> &str {
    response.split_once("\r\n\r\n").map_or(response, |(_, b)| b)
}

/// The families in `FAMILIES` that `body` lacks.
fn missing(body: &str) -> Vec<&'static str> {
    FAMILIES
        .iter()
        .copied()
        .filter(|family| !body.lines().any(|l| l.starts_with(family)))
        .collect()
}

fn promtool() -> Command {
    let found = Command::new("promtool").arg("--version").output();
    assert!(
        found.is_ok_and(|o| o.status.success()),
        "promtool is missing: apt-get install prometheus (scripts/test does)"
    );
    Command::new("promtool")
}

#[test]
fn metrics_pass_promtool_and_cover_the_operators_needs() {
    let (_b, p) = common::postern::alice_behind("metrics", "", "");
    let (mut c, _) = Client::imaps(p.imaps);
    assert!(c
        .login("alice", "wrong")
        .last()
        .unwrap()
        .starts_with("L1 NO"));
    assert!(c
        .login("alice", PASSWORD)
        .last()
        .unwrap()
        .starts_with("L1 OK"));
    c.command("Z", "LOGOUT");
    drop(c);
    common::wait_until("the session has ended", common::SETTLE, || {
        p.metric("postern_sessions_ended_total{reason=\"backend_closed\"}")
            + p.metric("postern_sessions_ended_total{reason=\"client_closed\"}")
            >= 1.0
    });
    // Some series appear only once a task has run (the health checks'),
    // not by the time a session ends: wait for every family checked below.
    common::wait_for(
        "every family the operators need",
        common::SETTLE,
        || missing(body_of(&p.metrics_text())),
        |left| left.is_empty(),
    );
    let text = p.metrics_text();
    let body = body_of(&text);
    let mut check = promtool()
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    check
        .stdin
        .take()
        .unwrap()
        .write_all(body.as_bytes())
        .unwrap();
    let out = check.wait_with_output().unwrap();
    let report =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && report.trim().is_empty(),
        "promtool: {report}"
    );
    for family in FAMILIES {
        assert!(
            body.lines().any(|l| l.starts_with(family)),
            "{family} missing from:\n{body}"
        );
    }
    // No label carries a user name or a client address.
    assert!(!body.contains("alice"));
    assert!(!body.contains("127.0.0.1:"));
}
