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

/// Within this a state change must be visible: fall (or rise) checks, one
/// more interval of phase, the check timeout, and slack for a busy machine.
const DETECT: Duration = Duration::from_secs(5);

fn up(p: &Postern, backend: &str) -> f64 {
    p.metric(&format!("postern_backend_up{{backend=\"{backend}\"}}"))
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
    common::wait_until("fo-a logs the login", DETECT, || a.logins_of(&walker) == 1);

    // A session open on fo-a when it dies hears why, within the jitter.
    let mut held = logged_in(&p, &walker);
    held.select_and_idle();
    a.stop();
    let killed = Instant::now();
    let bye = held.line();
    assert!(bye.starts_with("* BYE [UNAVAILABLE]"), "{bye}");
    assert!(
        killed.elapsed() < Duration::from_secs(3),
        "within the 500 ms jitter"
    );
    assert!(held.closed());
    common::wait_until("fo-a is marked down", DETECT, || up(&p, "fo-a") == 0.0);
    eprintln!("fo-a marked down after {:?}", killed.elapsed());

    // The hash-placed user goes to the next backend, at once.
    let started = Instant::now();
    logged_in(&p, &walker).command("Z", "LOGOUT");
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "no wait for a dead backend"
    );
    common::wait_until("fo-b logs the login", DETECT, || b.logins_of(&walker) == 1);
    // The pinned user is not moved: NO [UNAVAILABLE] without delay.
    let (mut c, _) = Client::imaps(p.imaps);
    let started = Instant::now();
    let lines = c.login("pinned", PASSWORD);
    assert!(lines[0].starts_with("L1 NO [UNAVAILABLE] "), "{lines:?}");
    assert!(started.elapsed() < Duration::from_secs(1));
    assert_eq!(b.logins_of("pinned"), 0);

    a.restart();
    common::wait_until("fo-a is marked up again", DETECT, || up(&p, "fo-a") == 1.0);
    logged_in(&p, &walker).command("Z", "LOGOUT");
    common::wait_until("fo-a takes its user back", DETECT, || {
        a.logins_of(&walker) == 3
    });
    assert_eq!(
        p.metric("postern_backend_transitions_total{backend=\"fo-a\",to=\"down\"}"),
        1.0
    );
    assert_eq!(
        p.metric("postern_backend_transitions_total{backend=\"fo-a\",to=\"up\"}"),
        1.0
    );
    assert!(p.metric("postern_routes_total{reason=\"failover\"}") >= 1.0);
    let log = p.log();
    assert!(log.contains("backend is down"), "state changes are logged");
    assert!(
        log.contains("reason=\"failover\""),
        "routing reasons are logged"
    );
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
    let started = Instant::now();
    logged_in(&p, &walker).command("Z", "LOGOUT");
    assert!(started.elapsed() < Duration::from_secs(2));
    common::wait_until("fo-quick-b logs the login", DETECT, || {
        b.logins_of(&walker) == 1
    });
    assert!(p.log().contains("backend unreachable, trying the next"));
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
    common::wait_until("st-a is marked down", DETECT, || up(&p, "st-a") == 0.0);
    let mut first = logged_in(&p, &walker);
    a.restart();
    common::wait_until("st-a is marked up again", DETECT, || up(&p, "st-a") == 1.0);
    // Still a live session on st-b: the new one joins it there.
    logged_in(&p, &walker).command("Z", "LOGOUT");
    common::wait_until("st-b logs both logins", DETECT, || {
        b.logins_of(&walker) == 2
    });
    assert_eq!(a.logins_of(&walker), 0, "no split sessions");
    assert!(p.metric("postern_routes_total{reason=\"sticky\"}") >= 1.0);
    first.command("Z", "LOGOUT");
    drop(first);
    common::wait_until("the first session has ended", DETECT, || {
        p.metric("postern_backend_sessions_active{backend=\"st-b\"}") == 0.0
    });
    logged_in(&p, &walker).command("Z", "LOGOUT");
    common::wait_until("st-a takes the user back", DETECT, || {
        a.logins_of(&walker) == 1
    });
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
    common::wait_until("drain-b logs all logins", DETECT, || {
        b.logins().len() == names.len()
    });
    assert!(a.logins().is_empty(), "{:?}", a.logins());
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
    common::wait_until("the probe logs in", DETECT, || b.logins_of("probe") >= 1);
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
    assert_eq!(up(&p, "bye"), 0.0);
    common::wait_until("the session end is counted", DETECT, || {
        p.metric("postern_sessions_ended_total{reason=\"backend_down\"}") == 1.0
    });
    assert!(p.metric("postern_backend_checks_total{backend=\"bye\",result=\"fail\"}") >= 2.0);
}
