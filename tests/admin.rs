//! The admin API against a running Postern with real backends: requests
//! without the token are refused; sessions are listed and kicked (the
//! client hears the BYE); a drained backend takes no new sessions until it
//! is undrained; a reload can be triggered.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::time::Duration;

use common::backend::DovecotBackend;
use common::client::{tcp_from, tls_over, Client};
use common::postern::{user, Postern, Setup, PASSWORD};
use common::SETTLE;

const TOKEN: &str = "s3cret-admin-token";

/// One request; the status code and the body.
fn call(port: u16, method: &str, path: &str, token: Option<&str>) -> (u16, String) {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\n{auth}Content-Length: 0\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let status = out[9..12].parse().unwrap();
    let body = out.split_once("\r\n\r\n").map_or("", |(_, b)| b).to_owned();
    (status, body)
}

fn json(body: &str) -> serde_json::Value {
    serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {body}"))
}

#[test]
fn sessions_kick_drain_and_reload_through_the_admin_api() {
    common::backend::ensure_installed();
    let walker = common::user_preferring(&["adm-a", "adm-b"], "adm-a");
    let creds = [("alice", PASSWORD), (walker.as_str(), PASSWORD)];
    let a = DovecotBackend::start_with_users("adm-a", &creds);
    let b = DovecotBackend::start_with_users("adm-b", &creds);
    let dir: PathBuf = a.dir.join("admin");
    std::fs::create_dir_all(&dir).unwrap();
    let token_file = dir.join("token");
    std::fs::write(&token_file, format!("{TOKEN}\n")).unwrap();
    let port = common::free_port();
    let p = Postern::start(Setup {
        backends: &[&a, &b],
        users: &(user("alice") + &user(&walker)),
        extra: &format!(
            "admin:\n  bind: \"127.0.0.1:{port}\"\n  token_file: \"{}\"\n",
            token_file.display()
        ),
        ..Setup::default()
    });

    // Without the token, or with another one: refused.
    assert_eq!(call(port, "GET", "/v1/sessions", None).0, 401);
    assert_eq!(call(port, "GET", "/v1/sessions", Some("guess")).0, 401);
    assert_eq!(
        call(port, "POST", "/v1/sessions/kick?user=alice", None).0,
        401
    );

    let mut alice = Client::imaps(p.imaps).0;
    assert!(alice
        .login("alice", PASSWORD)
        .last()
        .unwrap()
        .starts_with("L1 OK"));
    alice.select_and_idle();
    let (status, body) = call(port, "GET", "/v1/sessions", Some(TOKEN));
    assert_eq!(status, 200, "{body}");
    let sessions = json(&body)["sessions"].as_array().unwrap().clone();
    assert_eq!(sessions.len(), 1, "{body}");
    let s = &sessions[0];
    assert_eq!(s["user"], "alice");
    assert_eq!(s["listener"], "imaps");
    assert_eq!(s["protocol"], "imap");
    assert!(s["client"].as_str().unwrap().starts_with("127.0.0.1:"));
    assert!(
        s["bytes_in"].as_u64().unwrap() > 0,
        "SELECT and IDLE were relayed"
    );
    assert!(s["bytes_out"].as_u64().unwrap() > 0);

    // Kick: the client is told and closed.
    let (status, body) = call(port, "POST", "/v1/sessions/kick?user=alice", Some(TOKEN));
    assert_eq!(
        (status, json(&body)["kicked"].as_u64()),
        (200, Some(1)),
        "{body}"
    );
    let bye = alice.line();
    assert!(
        bye.starts_with("* BYE Session ended by the administrator"),
        "{bye}"
    );
    assert!(alice.closed());
    common::wait_until("the session is gone", SETTLE, || {
        json(&call(port, "GET", "/v1/sessions", Some(TOKEN)).1)["sessions"]
            .as_array()
            .unwrap()
            .is_empty()
    });
    p.wait_for_log("reason=\"kicked\"");

    // Drain: the user whose first choice is adm-a goes to adm-b until undrained.
    let (status, body) = call(port, "POST", "/v1/backends/adm-a/drain", Some(TOKEN));
    assert_eq!(status, 200, "{body}");
    let backends = json(&call(port, "GET", "/v1/backends", Some(TOKEN)).1);
    let adm_a = backends["backends"]
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["name"] == "adm-a")
        .unwrap()
        .clone();
    assert_eq!(adm_a["draining"], true);
    assert!(Client::login_ok(p.imaps, &walker), "{walker}");
    assert_eq!(
        b.wait_logins_of(&walker, 1),
        1,
        "adm-b takes the drained backend's user"
    );
    assert_eq!(a.logins_of(&walker), 0);
    assert_eq!(
        call(port, "POST", "/v1/backends/adm-a/undrain", Some(TOKEN)).0,
        200
    );
    // The drained login's session holds its user on adm-b (stickiness) until
    // Postern has seen it end; only then is adm-a the user's backend again.
    common::wait_until("the drained login's session is gone", SETTLE, || {
        json(&call(port, "GET", "/v1/sessions", Some(TOKEN)).1)["sessions"]
            .as_array()
            .unwrap()
            .is_empty()
    });
    // From 127.0.0.2, so that adm-a's line for this login (rip=127.0.0.2)
    // is told apart from one the drained login would have left before it.
    let tls = tls_over(tcp_from("127.0.0.2", p.imaps), "localhost", &[b"imap"]).unwrap();
    let mut again = Client::from_stream(tls);
    again.line();
    let lines = again.login(&walker, PASSWORD);
    assert!(lines.last().unwrap().starts_with("L1 OK"), "{lines:?}");
    again.command("Z", "LOGOUT");
    let walker_tag = format!("user=<{walker}>");
    common::wait_until("adm-a takes its user again", SETTLE, || {
        a.logins()
            .iter()
            .any(|l| l.contains(&walker_tag) && l.contains("rip=127.0.0.2,"))
    });
    // Dovecot logs in order: a line of the drained login would be there now.
    assert_eq!(a.logins_of(&walker), 1, "{:?}", a.logins());
    assert_eq!(b.logins_of(&walker), 1, "{:?}", b.logins());
    assert_eq!(
        call(port, "POST", "/v1/backends/nowhere/drain", Some(TOKEN)).0,
        404
    );

    // Reload on request, and the version it reports is the live one.
    let (status, body) = call(port, "POST", "/v1/reload", Some(TOKEN));
    assert_eq!(status, 200, "{body}");
    let version = json(&body)["version"].as_str().unwrap().to_owned();
    let live = json(&call(port, "GET", "/v1/config", Some(TOKEN)).1);
    assert_eq!(live["version"], version);
}
