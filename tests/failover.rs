//! Backends that die, come back, drain or fail their health checks, with
//! real Dovecot backends killed and restarted under a running Postern:
//! hash-placed users move to their next backend and back, pinned users get
//! `NO [UNAVAILABLE]` at once, live sessions keep a user where they are, and
//! the sessions of a backend that goes down end with `* BYE [UNAVAILABLE]`.

mod common;

use std::time::{Duration, Instant};

use common::backend::DovecotBackend;
use common::client::Client;
use common::postern::{user, user_on, Postern, Setup, PASSWORD};

/// Checks every 200 ms; two failures take a backend down, two passes bring
/// it back: a dead backend is out within about 3 intervals.
const FAST_CHECKS: &str =
    "health_check: { interval: 200ms, timeout: 1s, rise: 2, fall: 2 }\nreconnect_jitter: 500ms";

fn up(p: &Postern, backend: &str) -> f64 {
    p.metric(&format!("postern_backend_up{{backend=\"{backend}\"}}"))
}

/// Waits until the checks have marked `backend` up (1) or down (0). They
/// take about a second here; the deadline is slack for a loaded machine.
fn wait_state(p: &Postern, backend: &str, state: f64) {
    p.wait_metric(
        &format!("postern_backend_up{{backend=\"{backend}\"}}"),
        |v| v == state,
    );
}

/// Waits until no IMAPS session is left. The gauge goes down after the
/// session's lease is gone, so no live session keeps a user sticky.
fn wait_no_sessions(p: &Postern) {
    p.wait_metric("postern_sessions_active{listener=\"imaps\"}", |v| v == 0.0);
}

/// A LOGIN with the test password on a connection already open, which must
/// succeed; how long it took (the TLS handshake not included).
fn timed_login(c: &mut Client, user: &str) -> Duration {
    let started = Instant::now();
    let lines = c.login(user, PASSWORD);
    let took = started.elapsed();
    assert!(
        lines.last().is_some_and(|l| l.starts_with("L1 OK")),
        "{user}: {lines:?}"
    );
    took
}

fn logged_in(p: &Postern, user: &str) -> Client {
    Client::logged_in(p.imaps, user)
}

#[test]
fn users_of_a_dead_backend_move_to_their_next_one_and_come_back() {
    common::backend::ensure_installed();
    let walker = common::user_preferring(&["fo-a", "fo-b"], "fo-a");
    let creds = [(walker.as_str(), PASSWORD), ("pinned", PASSWORD)];
    let (a, b) = (
        DovecotBackend::start_with_users("fo-a", &creds),
        DovecotBackend::start_with_users("fo-b", &creds),
    );
    let p = Postern::start(Setup {
        backends: &[&a, &b],
        users: &(user(&walker) + &user_on("pinned", "fo-a")),
        backend_options: FAST_CHECKS,
        ..Setup::default()
    });
    logged_in(&p, &walker).command("Z", "LOGOUT");
    assert_eq!(a.wait_logins_of(&walker, 1), 1);

    // A session open on fo-a when it dies hears why, within the jitter.
    let mut held = logged_in(&p, &walker);
    held.select_and_idle();
    a.stop();
    let killed = Instant::now();
    let bye = held.line();
    assert!(bye.starts_with("* BYE [UNAVAILABLE]"), "{bye}");
    // Generous for a loaded machine, and still half the default 10 s jitter.
    assert!(
        killed.elapsed() < Duration::from_secs(5),
        "within the 500 ms jitter: {:?}",
        killed.elapsed()
    );
    assert!(held.closed());
    wait_state(&p, "fo-a", 0.0);
    eprintln!("fo-a marked down after {:?}", killed.elapsed());

    // The pinned user is not moved: NO [UNAVAILABLE] without delay (under
    // the 2 s connect timeout). First, so that the walker's login on fo-b
    // below is logged after anything this one could have caused there.
    let (mut c, _) = Client::imaps(p.imaps);
    let started = Instant::now();
    let lines = c.login("pinned", PASSWORD);
    assert!(lines[0].starts_with("L1 NO [UNAVAILABLE] "), "{lines:?}");
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    drop(c);

    // The hash-placed user goes to the next backend, at once (the LOGIN
    // alone is timed, under the 2 s connect timeout).
    let (mut c, _) = Client::imaps(p.imaps);
    let took = timed_login(&mut c, &walker);
    assert!(
        took < Duration::from_secs(2),
        "no wait for a dead backend: {took:?}"
    );
    c.command("Z", "LOGOUT");
    drop(c);
    assert_eq!(b.wait_logins_of(&walker, 1), 1);
    assert_eq!(b.logins_of("pinned"), 0);

    a.restart();
    wait_state(&p, "fo-a", 1.0);
    // The walker's session on fo-b must be over, or it keeps them there.
    wait_no_sessions(&p);
    logged_in(&p, &walker).command("Z", "LOGOUT");
    assert_eq!(a.wait_logins_of(&walker, 3), 3, "fo-a takes its user back");
    // Counted just after the gauge changed: waited for, then checked exactly.
    assert_eq!(
        p.wait_metric(
            "postern_backend_transitions_total{backend=\"fo-a\",to=\"down\"}",
            |v| v >= 1.0
        ),
        1.0
    );
    assert_eq!(
        p.wait_metric(
            "postern_backend_transitions_total{backend=\"fo-a\",to=\"up\"}",
            |v| v >= 1.0
        ),
        1.0
    );
    p.wait_metric("postern_routes_total{reason=\"failover\"}", |v| v >= 1.0);
    // State changes and routing reasons are logged.
    p.wait_for_log("backend is down");
    p.wait_for_log("reason=\"failover\"");
}

#[test]
fn a_login_moves_on_when_the_backend_refuses_before_the_checks_notice() {
    common::backend::ensure_installed();
    let walker = common::user_preferring(&["fo-quick-a", "fo-quick-b"], "fo-quick-a");
    let creds = [(walker.as_str(), PASSWORD)];
    let (a, b) = (
        DovecotBackend::start_with_users("fo-quick-a", &creds),
        DovecotBackend::start_with_users("fo-quick-b", &creds),
    );
    let p = Postern::start(Setup {
        backends: &[&a, &b],
        users: &user(&walker),
        // Checks far apart: the session finds the dead backend first.
        backend_options: "health_check: { interval: 1h }",
        ..Setup::default()
    });
    a.stop();
    // The LOGIN alone is timed: under the 2 s connect timeout.
    let (mut c, _) = Client::imaps(p.imaps);
    let took = timed_login(&mut c, &walker);
    assert!(took < Duration::from_secs(2), "{took:?}");
    c.command("Z", "LOGOUT");
    assert_eq!(b.wait_logins_of(&walker, 1), 1);
    p.wait_for_log("backend unreachable, trying the next");
}

#[test]
fn live_sessions_keep_a_user_on_the_failover_backend_after_recovery() {
    common::backend::ensure_installed();
    let walker = common::user_preferring(&["st-a", "st-b"], "st-a");
    let creds = [(walker.as_str(), PASSWORD)];
    let (a, b) = (
        DovecotBackend::start_with_users("st-a", &creds),
        DovecotBackend::start_with_users("st-b", &creds),
    );
    let p = Postern::start(Setup {
        backends: &[&a, &b],
        users: &user(&walker),
        backend_options: FAST_CHECKS,
        ..Setup::default()
    });
    a.stop();
    wait_state(&p, "st-a", 0.0);
    let mut first = logged_in(&p, &walker);
    a.restart();
    wait_state(&p, "st-a", 1.0);
    // Still a live session on st-b: the new one joins it there.
    logged_in(&p, &walker).command("Z", "LOGOUT");
    assert_eq!(b.wait_logins_of(&walker, 2), 2, "st-b logs both logins");
    // Checked again at the end, once st-a has logged a later login.
    assert_eq!(a.logins_of(&walker), 0, "no split sessions");
    p.wait_metric("postern_routes_total{reason=\"sticky\"}", |v| v >= 1.0);
    first.command("Z", "LOGOUT");
    drop(first);
    p.wait_metric("postern_backend_sessions_active{backend=\"st-b\"}", |v| {
        v == 0.0
    });
    // Both sessions over, their leases (and stickiness) gone with them.
    wait_no_sessions(&p);
    logged_in(&p, &walker).command("Z", "LOGOUT");
    // Exactly one: the split session, had there been one, was logged before.
    assert_eq!(
        a.wait_logins_of(&walker, 1),
        1,
        "st-a takes the user back, and had no split session before"
    );
}

#[test]
fn a_draining_backend_gets_no_new_sessions() {
    common::backend::ensure_installed();
    let names: Vec<String> = (0..8).map(|i| format!("d{i}")).collect();
    let creds: Vec<(&str, &str)> = names.iter().map(|n| (n.as_str(), PASSWORD)).collect();
    let a = DovecotBackend::start_with_users("drain-a", &creds);
    let b = DovecotBackend::start_with_users("drain-b", &creds);
    let pool = format!(
        "    - {{ name: drain-a, address: \"{}\", drain: true }}\n",
        a.addr()
    );
    let p = Postern::start(Setup {
        backends: &[&b],
        pool_lines: &pool,
        users: &names.iter().map(|n| user(n)).collect::<String>(),
        ..Setup::default()
    });
    for n in &names {
        logged_in(&p, n).command("Z", "LOGOUT");
    }
    assert_eq!(b.wait_logins(names.len()).len(), names.len());
    // A login straight to drain-a, after all of those: once its line is in
    // the log, a login Postern had made there would be too.
    let (mut direct, _) = Client::plain(a.port);
    let lines = direct.login("d0", PASSWORD);
    assert!(
        lines.last().is_some_and(|l| l.starts_with("L1 OK")),
        "{lines:?}"
    );
    direct.command("Z", "LOGOUT");
    let logins = a.wait_logins(1);
    assert_eq!(logins.len(), 1, "only the direct login: {logins:?}");
}

#[test]
fn sessions_of_a_backend_that_fails_its_checks_end_with_bye_unavailable() {
    common::backend::ensure_installed();
    let b =
        DovecotBackend::start_with_users("bye", &[("alice", PASSWORD), ("probe", "probe-secret")]);
    let password_file = b.dir.join("probe.password");
    std::fs::write(&password_file, "probe-secret\n").unwrap();
    let options = format!(
        "health_check: {{ interval: 200ms, timeout: 1s, rise: 2, fall: 2, login: {{ user: probe, password_file: \"{}\" }} }}\nreconnect_jitter: 500ms",
        password_file.display()
    );
    let p = Postern::start(Setup {
        backends: &[&b],
        users: &user("alice"),
        backend_options: &options,
        ..Setup::default()
    });
    b.wait_logins_of("probe", 1);
    let mut c = logged_in(&p, "alice");
    c.select_and_idle();

    // The backend still serves alice's open session, but its own logins
    // fail: the probe account is gone.
    let passwd = b.dir.join("passwd");
    let kept: String = std::fs::read_to_string(&passwd)
        .unwrap()
        .lines()
        .filter(|l| !l.starts_with("probe:"))
        .map(|l| format!("{l}\n"))
        .collect();
    let tmp = b.dir.join("passwd.edit");
    std::fs::write(&tmp, kept).unwrap();
    let perms = std::fs::metadata(&passwd).unwrap().permissions();
    std::fs::set_permissions(&tmp, perms).unwrap();
    std::fs::rename(&tmp, &passwd).unwrap();

    let mut rest = Vec::new();
    while let Some(line) = c.try_line() {
        rest.push(line);
    }
    assert!(
        rest.iter().any(|l| l.starts_with("* BYE [UNAVAILABLE]")),
        "{rest:?}"
    );
    // Set, like the failed checks' count, before the sessions are told.
    assert_eq!(up(&p, "bye"), 0.0);
    // Counted once the session has said BYE and closed.
    p.wait_metric(
        "postern_sessions_ended_total{reason=\"backend_down\"}",
        |v| v == 1.0,
    );
    assert!(p.metric("postern_backend_checks_total{backend=\"bye\",result=\"fail\"}") >= 2.0);
}

/// Sends SIGSTOP to a backend's Dovecot (master and children): it holds
/// its connections open but answers nothing until killed.
fn freeze(b: &DovecotBackend) {
    let pid = std::fs::read_to_string(b.dir.join("run/master.pid")).expect("master.pid");
    let pid = pid.trim();
    // Children first, so the master cannot start new ones meanwhile.
    std::process::Command::new("pkill")
        .args(["-STOP", "-P", pid])
        .status()
        .expect("run pkill");
    let status = std::process::Command::new("kill")
        .args(["-STOP", pid])
        .status()
        .expect("run kill");
    assert!(status.success(), "SIGSTOP to the master {pid}");
}

/// How long until the client hears `* BYE [UNAVAILABLE]`, from `since`.
fn told_after(c: &mut Client, since: Instant) -> Duration {
    let mut seen = Vec::new();
    while let Some(line) = c.try_line() {
        if line.starts_with("* BYE [UNAVAILABLE]") {
            return since.elapsed();
        }
        seen.push(line);
    }
    panic!("no BYE before the end: {seen:?}");
}

/// A small herd is told within its own spread (2 sessions at the default
/// 200 logins/s: 10 ms), not over the whole `reconnect_jitter`.
#[test]
fn a_small_herd_is_told_within_its_spread_not_the_whole_jitter() {
    common::backend::ensure_installed();
    let creds = [("alice", PASSWORD), ("bob", PASSWORD)];
    let a = DovecotBackend::start_with_users("herd-a", &creds);
    let p = Postern::start(Setup {
        backends: &[&a],
        users: &(user_on("alice", "herd-a") + &user_on("bob", "herd-a")),
        backend_options: "health_check: { interval: 1h }\nreconnect_jitter: 60s",
        ..Setup::default()
    });
    let mut clients: Vec<Client> = ["alice", "bob"]
        .into_iter()
        .map(|u| logged_in(&p, u))
        .collect();
    for c in &mut clients {
        c.select_and_idle();
    }
    let killed = Instant::now();
    a.stop();
    for c in &mut clients {
        let took = told_after(c, killed);
        assert!(took < Duration::from_secs(5), "told after {took:?}");
    }
}

/// With a spread far longer than the test, a client that waits for an
/// answer when its backend dies is told at once; one in IDLE waits its turn.
#[test]
fn a_client_waiting_for_an_answer_is_told_at_once() {
    common::backend::ensure_installed();
    let creds = [("alice", PASSWORD), ("bob", PASSWORD)];
    let a = DovecotBackend::start_with_users("herd-wait", &creds);
    let p = Postern::start(Setup {
        backends: &[&a],
        users: &(user_on("alice", "herd-wait") + &user_on("bob", "herd-wait")),
        // Two sessions at 0.1/s: a spread of 20 s.
        backend_options:
            "health_check: { interval: 1h }\nreconnect_jitter: 60s\nreconnect_rate: 0.1",
        ..Setup::default()
    });
    let mut waiting = logged_in(&p, "alice");
    assert!(waiting
        .command("S", "SELECT INBOX")
        .last()
        .unwrap()
        .starts_with("S OK"));
    let mut idle = logged_in(&p, "bob");
    idle.select_and_idle();
    // The backend stops answering; alice's NOOP goes unanswered, then the
    // backend dies.
    freeze(&a);
    let sent = "postern_relay_bytes_total{direction=\"client_to_backend\"}";
    let before = p.metric(sent);
    waiting.send(b"N NOOP\r\n");
    p.wait_metric(sent, |v| v > before);
    let killed = Instant::now();
    a.stop();
    let took = told_after(&mut waiting, killed);
    assert!(took < Duration::from_secs(5), "told after {took:?}");
    drop(idle);
}

/// A backend that accepts the connection and closes it before greeting (a
/// mail server dying under its listener): nothing of the user was sent,
/// so the login goes to the user's next backend, as a refused connect does.
#[test]
fn a_login_moves_on_when_the_backend_closes_before_its_greeting() {
    common::backend::ensure_installed();
    let walker = common::user_preferring(&["closing", "fo-close-b"], "closing");
    let b = DovecotBackend::start_with_users("fo-close-b", &[(walker.as_str(), PASSWORD)]);
    let closing = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let closing_addr = closing.local_addr().unwrap();
    let accepted = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = std::sync::Arc::clone(&accepted);
    std::thread::spawn(move || {
        for conn in closing.incoming() {
            counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            drop(conn);
        }
    });
    let pool = format!("    - {{ name: closing, address: \"{closing_addr}\" }}\n");
    let p = Postern::start(Setup {
        backends: &[&b],
        pool_lines: &pool,
        users: &user(&walker),
        // No check runs before the login, nor marks `closing` down.
        backend_options: "health_check: { interval: 1h, fall: 5 }",
        ..Setup::default()
    });
    let (mut c, _) = Client::imaps(p.imaps);
    timed_login(&mut c, &walker);
    c.command("Z", "LOGOUT");
    assert_eq!(b.wait_logins_of(&walker, 1), 1);
    assert!(accepted.load(std::sync::atomic::Ordering::SeqCst) >= 1);
    p.wait_for_log("backend unreachable, trying the next");
}
