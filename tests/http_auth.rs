//! The `http` auth source against a real HTTP service speaking nginx's
//! `auth_http` protocol (tests/python/auth_http_server.py) and real Dovecot
//! backends: the request headers as nginx sends them, escaping included;
//! the service naming the backend by address; its refusal text, Auth-Wait
//! and attempt counter on the wire; no Auth-Wait closing the connection;
//! Auth-User/Auth-Pass replacing the backend credentials; and a hanging,
//! failing or dead service giving `NO [UNAVAILABLE]` within the timeout,
//! then recovering by itself.

mod common;

use std::fs;
use std::time::{Duration, Instant};

use base64::Engine;
use common::auth_http::AuthService;
use common::backend::DovecotBackend;
use common::client::Client;
use common::postern::{Postern, Setup, PASSWORD};

fn header<'a>(request: &'a serde_json::Value, name: &str) -> &'a str {
    request[name]
        .as_str()
        .unwrap_or_else(|| panic!("no {name} in {request}"))
}

/// `AUTHENTICATE PLAIN` with an initial response: any bytes in the password.
fn authenticate_plain(c: &mut Client, user: &str, password: &[u8]) -> Vec<String> {
    let mut message = vec![0];
    message.extend_from_slice(user.as_bytes());
    message.push(0);
    message.extend_from_slice(password);
    let ir = base64::engine::general_purpose::STANDARD.encode(message);
    c.command("A1", &format!("AUTHENTICATE PLAIN {ir}"))
}

fn setup(name: &str) -> (DovecotBackend, AuthService, Postern) {
    common::backend::ensure_installed();
    let b = DovecotBackend::start_with_users(
        &format!("authhttp-{name}"),
        &[
            ("alice", PASSWORD),
            ("dave", "p%ss w\u{f6}rd"),
            ("carol", "backend-only"),
        ],
    );
    let (ip, port) = b
        .addr()
        .rsplit_once(':')
        .map(|(i, p)| (i.to_owned(), p.parse::<u16>().unwrap()))
        .unwrap();
    let service = AuthService::start(
        name,
        &serde_json::json!({
            "users": {
                "alice": { "password": PASSWORD, "server": ip, "port": port },
                "dave": { "password": "p%ss w\u{f6}rd", "server": ip, "port": port },
                "carol": { "password": "client-pw", "server": ip, "port": port, "pass": "backend-only" },
                "lost": { "password": PASSWORD, "server": "192.0.2.1", "port": 143 },
            },
            "nowait": ["nowait"],
            "hang": ["hang"],
            "error": ["boom"],
            "wait": 1,
        }),
    );
    let source = service.auth_source("1s");
    let p = Postern::start(Setup {
        backends: &[&b],
        auth_source: &source,
        ..Setup::default()
    });
    (b, service, p)
}

#[test]
fn the_service_gets_nginx_headers_and_names_the_backend() {
    let (b, service, p) = setup("headers");
    let mut c = Client::logged_in(p.imaps, "alice");
    c.command("Z", "LOGOUT");
    // Closed, so the session ends now rather than after the relay's linger.
    drop(c);
    assert_eq!(b.wait_logins_of("alice", 1), 1);
    let requests = service.requests();
    assert_eq!(requests.len(), 1, "{requests:?}");
    let r = &requests[0];
    assert_eq!(header(r, "Auth-Method"), "plain");
    assert_eq!(header(r, "Auth-User"), "alice");
    assert_eq!(header(r, "Auth-Pass"), PASSWORD);
    assert_eq!(header(r, "Auth-Protocol"), "imap");
    assert_eq!(header(r, "Auth-Login-Attempt"), "1");
    assert_eq!(header(r, "Client-IP"), "127.0.0.1");
    assert_eq!(header(r, "Client-Host"), "[UNAVAILABLE]");
    assert_eq!(header(r, "Auth-SSL"), "on");
    assert_eq!(header(r, "X-Auth-Key"), "s3cret-key");
    assert_eq!(header(r, "X-Deployment"), "test");
    assert!(header(r, "Host").starts_with("127.0.0.1:"));
    assert_eq!(
        p.wait_metric(
            "postern_authentications_total{mechanism=\"LOGIN\",result=\"success\",source=\"http\"}",
            |v| v >= 1.0
        ),
        1.0
    );
    // The session's last line: the whole session's logging is in by then.
    let log = p.wait_for_log("session ended");
    assert!(
        !log.contains("s3cret-key"),
        "the shared secret is not logged"
    );
}

#[test]
fn credentials_are_escaped_as_nginx_escapes_them() {
    let (b, service, p) = setup("escape");
    let (mut c, _) = Client::imaps(p.imaps);
    let lines = authenticate_plain(&mut c, "dave", "p%ss w\u{f6}rd".as_bytes());
    assert!(lines.last().unwrap().starts_with("A1 OK"), "{lines:?}");
    let r = &service.requests()[0];
    assert_eq!(header(r, "Auth-Pass"), "p%25ss%20w%C3%B6rd");
    assert_eq!(b.wait_logins_of("dave", 1), 1);
}

/// Nothing a client sends can add a header: user names with control
/// characters (NUL among them) or invalid UTF-8 are refused before any
/// request, and
/// passwords reach the service %XX-escaped.
#[test]
fn nothing_a_client_sends_becomes_a_header() {
    let (_b, service, p) = setup("inject");
    let plain = |user: &[u8], password: &[u8]| {
        let (mut c, _) = Client::imaps(p.imaps);
        let mut message = vec![0];
        message.extend_from_slice(user);
        message.push(0);
        message.extend_from_slice(password);
        let ir = base64::engine::general_purpose::STANDARD.encode(message);
        c.command("A1", &format!("AUTHENTICATE PLAIN {ir}"))
            .last()
            .unwrap()
            .clone()
    };
    for user in [&b"a\r\nX-Injected: 1"[..], b"a\nb", b"\xff\xfe", b"a\x7fb"] {
        assert!(plain(user, b"pw").starts_with("A1 NO [AUTHENTICATIONFAILED]"));
    }
    // A NUL inside the name makes a PLAIN message of four parts.
    let answer = plain(b"al\0ice", b"pw");
    assert!(
        answer.starts_with("A1 NO") || answer.starts_with("A1 BAD"),
        "{answer}"
    );
    assert!(
        service.requests().is_empty(),
        "refused before asking the service"
    );
    let answer = plain(b"eve \"*)(%", b"x\r\nX-Injected: 1\r\n\r\nGET / HTTP/1.0");
    assert!(answer.starts_with("A1 NO"), "{answer}");
    let r = &service.requests()[0];
    assert_eq!(header(r, "Auth-User"), "eve%20\"*)(%25");
    assert_eq!(
        header(r, "Auth-Pass"),
        "x%0D%0AX-Injected:%201%0D%0A%0D%0AGET%20/%20HTTP/1.0"
    );
    assert!(r.get("X-Injected").is_none(), "{r}");
    assert_eq!(service.requests().len(), 1);
}

#[test]
fn refusals_carry_the_service_text_wait_and_attempt_number() {
    let (b, service, p) = setup("refusal");
    let (mut c, _) = Client::imaps(p.imaps);
    let started = Instant::now();
    let lines = c.login("alice", "wrong");
    assert_eq!(
        lines,
        vec!["L1 NO [AUTHENTICATIONFAILED] Invalid login or password"]
    );
    assert!(
        started.elapsed() >= Duration::from_secs(1),
        "Auth-Wait: 1 is honoured"
    );
    let lines = c.command("L2", &format!("LOGIN alice {PASSWORD}"));
    assert!(lines.last().unwrap().starts_with("L2 OK"), "{lines:?}");
    let attempts: Vec<String> = service
        .requests()
        .iter()
        .map(|r| header(r, "Auth-Login-Attempt").to_owned())
        .collect();
    assert_eq!(attempts, ["1", "2"]);
    // Logged after anything the refused attempt could have caused there.
    assert_eq!(b.wait_logins_of("alice", 1), 1);
    assert!(!b.log().contains("wrong"));
    assert_eq!(
        p.wait_metric(
            "postern_authentications_total{mechanism=\"LOGIN\",result=\"failure\",source=\"http\"}",
            |v| v >= 1.0
        ),
        1.0
    );
}

#[test]
fn a_refusal_without_auth_wait_closes_the_connection() {
    let (_b, _service, p) = setup("nowait");
    let (mut c, _) = Client::imaps(p.imaps);
    let lines = c.login("nowait", "whatever");
    assert_eq!(
        lines,
        vec!["L1 NO [AUTHENTICATIONFAILED] Invalid login or password"]
    );
    assert_eq!(c.line(), "* BYE Authentication refused");
    assert!(c.closed());
}

#[test]
fn auth_pass_replaces_the_password_used_at_the_backend() {
    let (b, _service, p) = setup("authpass");
    let mut c = Client::imaps(p.imaps).0;
    let lines = c.login("carol", "client-pw");
    assert!(lines.last().unwrap().starts_with("L1 OK"), "{lines:?}");
    assert_eq!(b.wait_logins_of("carol", 1), 1);
}

#[test]
fn a_server_that_is_not_a_backend_is_refused() {
    let (_b, _service, p) = setup("lost");
    let (mut c, _) = Client::imaps(p.imaps);
    let lines = c.login("lost", PASSWORD);
    assert!(
        lines.last().unwrap().starts_with("L1 NO [UNAVAILABLE]"),
        "{lines:?}"
    );
    // The log names what the service said.
    p.wait_for_log("192.0.2.1:143");
}

#[test]
fn a_hanging_failing_or_dead_service_is_unavailable_then_recovers() {
    let (_b, mut service, p) = setup("down");
    let (mut c, _) = Client::imaps(p.imaps);
    let started = Instant::now();
    let lines = c.login("hang", "x");
    assert_eq!(
        lines,
        vec!["L1 NO [UNAVAILABLE] Authentication is unavailable, try again later"]
    );
    let waited = started.elapsed();
    // The upper bound is generous for a loaded machine; the service hangs 60 s.
    assert!(
        waited >= Duration::from_millis(900) && waited < Duration::from_secs(5),
        "answered within the 1s timeout: {waited:?}"
    );
    let lines = c.command("L2", "LOGIN boom x");
    assert!(
        lines.last().unwrap().starts_with("L2 NO [UNAVAILABLE]"),
        "{lines:?}"
    );

    service.kill();
    let started = Instant::now();
    let lines = c.command("L3", &format!("LOGIN alice {PASSWORD}"));
    assert!(
        lines.last().unwrap().starts_with("L3 NO [UNAVAILABLE]"),
        "{lines:?}"
    );
    // Refused at once, not waited for; generous for a loaded machine.
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(
        p.wait_metric(
            "postern_authentications_total{mechanism=\"LOGIN\",result=\"unavailable\",source=\"http\"}",
            |v| v >= 3.0
        ),
        3.0
    );
    // Back on the same port: the next login goes through.
    let port = service.port;
    respawn_on(&mut service, port);
    let lines = c.command("L4", &format!("LOGIN alice {PASSWORD}"));
    assert!(lines.last().unwrap().starts_with("L4 OK"), "{lines:?}");
}

/// A service that keeps timing out opens the circuit: logins are answered
/// at once, without a request, until `open_for` has passed.
#[test]
fn a_failing_service_opens_the_circuit_then_is_retried() {
    common::backend::ensure_installed();
    let b = DovecotBackend::start_with_users("authhttp-breaker", &[("alice", PASSWORD)]);
    let (ip, port) = b
        .addr()
        .rsplit_once(':')
        .map(|(i, p)| (i.to_owned(), p.to_owned()))
        .unwrap();
    let service = AuthService::start(
        "breaker",
        &serde_json::json!({
            "users": { "alice": { "password": PASSWORD, "server": ip, "port": port.parse::<u16>().unwrap() } },
            "hang": ["hang"],
        }),
    );
    // Open long enough that the checks below, slow on a loaded machine,
    // are all made before it is retried.
    let source =
        service.auth_source("500ms") + "  circuit_breaker: { failures: 2, open_for: 5s }\n";
    let p = Postern::start(Setup {
        backends: &[&b],
        auth_source: &source,
        ..Setup::default()
    });
    let (mut c, _) = Client::imaps(p.imaps);
    for tag in ["H1", "H2"] {
        let lines = c.command(tag, "LOGIN hang x");
        assert!(lines
            .last()
            .unwrap()
            .starts_with(&format!("{tag} NO [UNAVAILABLE]")));
    }
    assert_eq!(p.metric("postern_auth_circuit_open"), 1.0);
    // Postern gave up on them after 500 ms; the service may log them later.
    let asked = common::wait_for(
        "both hanging requests in the service's log",
        common::SETTLE,
        || service.requests().len(),
        |&n| n >= 2,
    );
    let started = Instant::now();
    let lines = c.command("A1", &format!("LOGIN alice {PASSWORD}"));
    assert!(
        lines.last().unwrap().starts_with("A1 NO [UNAVAILABLE]"),
        "{lines:?}"
    );
    // Generous for a loaded machine, well within the open period.
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "answered at once: {:?}",
        started.elapsed()
    );
    assert_eq!(service.requests().len(), asked, "the service was not asked");
    assert_eq!(p.metric("postern_auth_circuit_rejected_total"), 1.0);
    common::wait_until("the circuit closes", common::SETTLE, || {
        let (mut c, _) = Client::imaps(p.imaps);
        c.login("alice", PASSWORD)
            .last()
            .unwrap()
            .starts_with("L1 OK")
    });
    assert_eq!(p.metric("postern_auth_circuit_open"), 0.0);
}

/// Starts the service again; it must get its old port back for Postern's
/// configuration to reach it, so this retries until the port is free.
fn respawn_on(service: &mut AuthService, port: u16) {
    let config = service.dir.join("config.json");
    let mut text: serde_json::Value =
        serde_json::from_str(&fs::read_to_string(&config).unwrap()).unwrap();
    text["bind_port"] = port.into();
    fs::write(&config, text.to_string()).unwrap();
    service.spawn();
    assert_eq!(service.port, port);
}
