//! Postern as a cluster: several Postern processes with one configuration
//! and one real `redis-server` as their store, in front of real Dovecot
//! backends.
//!
//! - The login defence's block, the per-user session limit and an
//!   administrator's kick hold across the replicas; the store holds no
//!   password and no user name in its keys.
//! - A replica whose health checks see a user's backend down still sends
//!   the user where their live sessions are; once they are gone and the
//!   record expired, placement is the hash's again.
//! - A user with IDLE sessions on two replicas is moved: the sessions hear
//!   `* BYE [UNAVAILABLE]`, a login during the hold waits and lands on the
//!   new backend, and the old backend sees no login after the move.
//! - The store killed: logins go on with per-replica limits, the metric
//!   and the log say so; restarted: the limits are shared again.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::backend::DovecotBackend;
use common::client::{tcp_from, tls_over, Client};
use common::postern::{user, Postern, Setup, PASSWORD};
use common::redis::RedisServer;
use common::SETTLE;

const TOKEN: &str = "cluster-admin-token";

/// One admin request; the status and the body.
fn call(port: u16, method: &str, path: &str) -> (u16, serde_json::Value) {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {TOKEN}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let status = out[9..12].parse().unwrap();
    let body = out.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    let value = serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {out}"));
    (status, value)
}

/// A replica: Postern with the store, its admin API on `admin`.
struct Replica {
    p: Postern,
    admin: u16,
}

/// The `cluster:` block (and an admin API) for a replica of `store`.
fn cluster_yaml(store: &RedisServer, name: &str, admin: u16, dir: &std::path::Path) -> String {
    let token = dir.join(format!("token-{admin}"));
    std::fs::write(&token, format!("{TOKEN}\n")).unwrap();
    format!(
        "cluster:\n  store: {{ url: \"{}\", password_file: \"{}\", timeout: 2s }}\n  replica: {name}\n  lease_ttl: 6s\n  user_expire: 2s\n  hold_wait: 20s\nadmin:\n  bind: \"127.0.0.1:{admin}\"\n  token_file: \"{}\"\n",
        store.url(),
        store.password_file().display(),
        token.display()
    )
}

/// Starts `n` replicas; `extra` and `backend_options` go into each, and
/// `options(i)` adds a replica's own `backends` keys.
fn replicas(
    n: usize,
    store: &RedisServer,
    backends: &[&DovecotBackend],
    users: &str,
    extra: &str,
    auth_options: &str,
    backend_options: &dyn Fn(usize) -> String,
) -> Vec<Replica> {
    (0..n)
        .map(|i| {
            let admin = common::free_port();
            let yaml = cluster_yaml(store, &format!("replica-{i}"), admin, &store.dir);
            let p = Postern::start(Setup {
                backends,
                users,
                extra: &format!("{yaml}{extra}"),
                auth_options,
                backend_options: &backend_options(i),
                ..Setup::default()
            });
            p.wait_metric("postern_cluster_store_up", |v| v == 1.0);
            Replica { p, admin }
        })
        .collect()
}

/// A logged-in IMAPS client of `user` through `port`, from `from`.
fn logged_in(port: u16, from: &str, user: &str) -> Client {
    let tls = tls_over(tcp_from(from, port), "localhost", &[b"imap"]).unwrap();
    let mut c = Client::from_stream(tls);
    c.line();
    let lines = c.login(user, PASSWORD);
    assert!(
        lines.last().unwrap().starts_with("L1 OK"),
        "{user} through {port}: {lines:?}"
    );
    c
}

/// The tagged answer to a LOGIN through `port` from `from`.
fn login_answer(port: u16, from: &str, user: &str, password: &str) -> String {
    let tls = tls_over(tcp_from(from, port), "localhost", &[b"imap"]).unwrap();
    let mut c = Client::from_stream(tls);
    c.line();
    c.login(user, password).last().unwrap().clone()
}

fn live_sessions(r: &Replica, user: &str) -> usize {
    let (status, body) = call(r.admin, "GET", &format!("/v1/users/{user}/sessions"));
    assert_eq!(status, 200, "{body}");
    body["sessions"].as_array().unwrap().len()
}

#[test]
fn the_defence_the_session_limit_and_kicks_hold_across_replicas() {
    common::backend::ensure_installed();
    let creds = [("alice", PASSWORD), ("bob", PASSWORD)];
    let a = DovecotBackend::start_with_users("cl-lim-a", &creds);
    let store = RedisServer::start();
    let rs = replicas(
        3,
        &store,
        &[&a],
        &(user("alice") + &user("bob")),
        "limits:\n  max_sessions_per_user: 3\n",
        "brute_force: { max_delay: 400ms, block_after: 6 }",
        &|_| String::new(),
    );

    // Six names guessed from one address, two through each replica: no
    // replica saw more than two, yet the network is blocked on all three.
    for (i, name) in ["g0", "g1", "g2", "g3", "g4", "g5"].iter().enumerate() {
        let answer = login_answer(rs[i % 3].p.imaps, "127.0.0.9", name, "guess");
        assert!(answer.contains("NO [AUTHENTICATIONFAILED]"), "{answer}");
    }
    for r in &rs {
        // The right password of a user never seen there: refused unasked.
        let answer = login_answer(r.p.imaps, "127.0.0.9", "bob", PASSWORD);
        assert!(
            answer.contains("NO [UNAVAILABLE] Too many failed logins"),
            "{answer}"
        );
    }
    assert!(
        rs.iter()
            .all(|r| r.p.log().matches("authentication failed").count() <= 2),
        "the guesses were spread"
    );
    assert_eq!(
        a.logins_of("bob"),
        0,
        "a blocked login never reaches the backend"
    );
    // Another address is not blocked.
    assert!(login_answer(rs[1].p.imaps, "127.0.0.10", "bob", PASSWORD).starts_with("L1 OK"));

    // alice's sessions over the replicas stop at 3 in all.
    let mut sessions: Vec<Client> = rs
        .iter()
        .map(|r| logged_in(r.p.imaps, "127.0.0.2", "alice"))
        .collect();
    common::wait_until("three sessions of alice in the store", SETTLE, || {
        live_sessions(&rs[0], "alice") == 3
    });
    for r in &rs {
        let answer = login_answer(r.p.imaps, "127.0.0.2", "alice", PASSWORD);
        assert!(answer.contains("NO [LIMIT]"), "{answer}");
    }
    let listed = call(rs[2].admin, "GET", "/v1/users/alice/sessions").1;
    let mut replicas: Vec<&str> = listed["sessions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["replica"].as_str().unwrap())
        .collect();
    replicas.sort();
    assert_eq!(
        replicas,
        ["replica-0", "replica-1", "replica-2"],
        "{listed}"
    );

    // Nothing secret in the store: no password, no user name in a key.
    let dump = store.dump_all();
    assert!(!dump.is_empty());
    for (key, value) in &dump {
        assert!(!key.contains("alice") && !key.contains("bob"), "{key}");
        assert!(
            !value.contains(PASSWORD) && !value.contains("guess"),
            "{key}: {value}"
        );
    }

    // A kick sent to one replica ends alice's sessions on all three.
    let kicked_at = Instant::now();
    let (status, body) = call(rs[1].admin, "POST", "/v1/users/alice/kick");
    assert_eq!(status, 200, "{body}");
    for c in &mut sessions {
        let bye = c.line();
        assert!(
            bye.starts_with("* BYE Session ended by the administrator"),
            "{bye}"
        );
        assert!(c.closed());
    }
    let took = kicked_at.elapsed();
    eprintln!("kick reached every replica's session in {took:?}");
    assert!(took < Duration::from_secs(5), "{took:?}");
    common::wait_until("alice's leases given back", SETTLE, || {
        live_sessions(&rs[0], "alice") == 0
    });
    // Room again.
    logged_in(rs[0].p.imaps, "127.0.0.2", "alice").command("Z", "LOGOUT");
}

#[test]
fn a_user_stays_where_their_sessions_are_whatever_one_replica_sees() {
    common::backend::ensure_installed();
    let walker = common::user_preferring(&["cl-st-a", "cl-st-b"], "cl-st-a");
    // The probe account exists on cl-st-b only: replica 1, which probes
    // with it, sees cl-st-a down although it answers.
    let creds = [(walker.as_str(), PASSWORD)];
    let a = DovecotBackend::start_with_users("cl-st-a", &creds);
    let b = DovecotBackend::start_with_users(
        "cl-st-b",
        &[(walker.as_str(), PASSWORD), ("probe", "probe-pw")],
    );
    let store = RedisServer::start();
    let probe = store.dir.join("probe-password");
    std::fs::write(&probe, "probe-pw\n").unwrap();
    let no_watch = "reload:\n  watch: false\n";
    let rs = replicas(3, &store, &[&a, &b], &user(&walker), no_watch, "", &|i| {
        match i {
            1 => format!(
                "health_check: {{ interval: 200ms, timeout: 1s, rise: 1, fall: 1, login: {{ user: probe, password_file: \"{}\" }} }}",
                probe.display()
            ),
            _ => String::new(),
        }
    });
    rs[1]
        .p
        .wait_metric("postern_backend_up{backend=\"cl-st-a\"}", |v| v == 0.0);

    let mut first = logged_in(rs[0].p.imaps, "127.0.0.2", &walker);
    assert_eq!(a.wait_logins_of(&walker, 1), 1, "the hash's choice");
    common::wait_until("the session recorded in the store", SETTLE, || {
        live_sessions(&rs[0], &walker) == 1
    });
    // Replica 1 thinks cl-st-a is down, and still sends the user there.
    let mut second = logged_in(rs[1].p.imaps, "127.0.0.2", &walker);
    let mut third = logged_in(rs[2].p.imaps, "127.0.0.2", &walker);
    assert_eq!(a.wait_logins_of(&walker, 3), 3);
    assert_eq!(
        b.logins_of(&walker),
        0,
        "no split mailbox: {:?}",
        b.logins()
    );
    assert!(rs[1].p.metric("postern_routes_total{reason=\"sticky\"}") >= 1.0);
    // Registrations are sent without waiting: all three in the store first.
    common::wait_until("the three sessions recorded in the store", SETTLE, || {
        live_sessions(&rs[0], &walker) == 3
    });

    // A dry run of a pool without cl-st-a (the file is not watched here):
    // the user and their three sessions, on three replicas, would move.
    let config = rs[0].p.dir.join("postern.yaml");
    let text = std::fs::read_to_string(&config).unwrap();
    let without: String = text
        .lines()
        .filter(|l| !l.contains("name: cl-st-a"))
        .map(|l| format!("{l}\n"))
        .collect();
    assert_ne!(without, text);
    std::fs::write(&config, without).unwrap();
    let (status, plan) = call(rs[0].admin, "GET", "/v1/reload/dry-run");
    assert_eq!(status, 200, "{plan}");
    assert_eq!(plan["users_moving"], 1, "{plan}");
    assert_eq!(plan["sessions_moving"], 3, "{plan}");
    assert_eq!(plan["moves"][0]["move"], "cl-st-a -> cl-st-b", "{plan}");
    std::fs::write(&config, text).unwrap();

    for c in [&mut first, &mut second, &mut third] {
        c.command("Z", "LOGOUT");
    }
    drop((first, second, third));
    common::wait_until("the sessions gone from the store", SETTLE, || {
        live_sessions(&rs[0], &walker) == 0
    });
    // The user's backend is remembered for user_expire (2 s), then forgotten.
    store.wait_no_keys("postern:u:b:*");
    // Back to each replica's own view: the hash on replica 0, the next
    // backend on replica 1, which sees cl-st-a down.
    logged_in(rs[1].p.imaps, "127.0.0.3", &walker).command("Z", "LOGOUT");
    assert_eq!(b.wait_logins_of(&walker, 1), 1);
    common::wait_until("the failover session gone", SETTLE, || {
        live_sessions(&rs[0], &walker) == 0
    });
    store.wait_no_keys("postern:u:b:*");
    logged_in(rs[0].p.imaps, "127.0.0.4", &walker).command("Z", "LOGOUT");
    assert_eq!(a.wait_logins_of(&walker, 4), 4);
}

#[test]
fn a_user_is_moved_with_sessions_on_two_replicas() {
    common::backend::ensure_installed();
    let walker = common::user_preferring(&["cl-mv-a", "cl-mv-b"], "cl-mv-a");
    let creds = [(walker.as_str(), PASSWORD)];
    let a = DovecotBackend::start_with_users("cl-mv-a", &creds);
    let b = DovecotBackend::start_with_users("cl-mv-b", &creds);
    let store = RedisServer::start();
    let rs = replicas(2, &store, &[&a, &b], &user(&walker), "", "", &|_| {
        String::new()
    });

    let mut idle: Vec<Client> = rs
        .iter()
        .map(|r| {
            let mut c = logged_in(r.p.imaps, "127.0.0.2", &walker);
            c.command("S", "SELECT INBOX");
            c.send(b"I IDLE\r\n");
            assert!(c.line().starts_with("+ "));
            c
        })
        .collect();
    assert_eq!(a.wait_logins_of(&walker, 2), 2);

    // Held first, so that a login is sure to arrive during the hold.
    let (status, body) = call(
        rs[0].admin,
        "POST",
        &format!("/v1/users/{walker}/hold?for=20s"),
    );
    assert_eq!(status, 200, "{body}");
    let (port, name) = (rs[1].p.imaps, walker.clone());
    let waiting = std::thread::spawn(move || {
        let started = Instant::now();
        let answer = login_answer(port, "127.0.0.3", &name, PASSWORD);
        (answer, started.elapsed())
    });
    common::wait_until("the login waits on the hold", SETTLE, || {
        rs[1].p.log().contains("login waits: the user is held")
            || rs[1].p.log().contains("held for a move")
    });
    assert_eq!(
        a.logins_of(&walker),
        2,
        "nothing reached a backend meanwhile"
    );

    let (status, body) = call(
        rs[1].admin,
        "POST",
        &format!("/v1/users/{walker}/move?to=cl-mv-b&hold=20s"),
    );
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["sessions_before"], 2, "{body}");
    assert_eq!(body["sessions_left"], 0, "{body}");
    for c in &mut idle {
        let bye = c.line();
        assert!(bye.starts_with("* BYE [UNAVAILABLE]"), "{bye}");
    }
    let (answer, waited) = waiting.join().unwrap();
    assert!(answer.starts_with("L1 OK"), "{answer}");
    eprintln!("the login during the hold waited {waited:?}");
    assert_eq!(
        b.wait_logins_of(&walker, 1),
        1,
        "the held login lands on the new backend"
    );
    // Every replica sends the user to the new backend from now on.
    for r in &rs {
        logged_in(r.p.imaps, "127.0.0.4", &walker).command("Z", "LOGOUT");
    }
    assert_eq!(b.wait_logins_of(&walker, 3), 3);
    assert_eq!(
        a.logins_of(&walker),
        2,
        "no login at the old backend after the move"
    );
    assert!(rs[0].p.metric("postern_routes_total{reason=\"pinned\"}") >= 1.0);
    // The pin is removed on request; the hash places the user again.
    let (status, _) = call(rs[0].admin, "DELETE", &format!("/v1/users/{walker}/pin"));
    assert_eq!(status, 200);
    common::wait_until("no live sessions", SETTLE, || {
        live_sessions(&rs[0], &walker) == 0
    });
    store.wait_no_keys("postern:u:b:*");
    logged_in(rs[1].p.imaps, "127.0.0.5", &walker).command("Z", "LOGOUT");
    assert_eq!(a.wait_logins_of(&walker, 3), 3);
}

#[test]
fn logins_go_on_while_the_store_is_down_and_limits_are_shared_again_after() {
    common::backend::ensure_installed();
    let creds = [("alice", PASSWORD)];
    let a = DovecotBackend::start_with_users("cl-down-a", &creds);
    let mut store = RedisServer::start();
    let rs = replicas(
        2,
        &store,
        &[&a],
        &user("alice"),
        "limits:\n  max_sessions_per_user: 2\n",
        "",
        &|_| String::new(),
    );
    store.stop();
    for r in &rs {
        r.p.wait_metric("postern_cluster_store_up", |v| v == 0.0);
        r.p.wait_for_log("cluster store unreachable");
    }
    // Two sessions on each replica: the limit is per replica meanwhile.
    let mut held: Vec<Client> = Vec::new();
    for r in &rs {
        for _ in 0..2 {
            let started = Instant::now();
            held.push(logged_in(r.p.imaps, "127.0.0.2", "alice"));
            eprintln!("login with the store down took {:?}", started.elapsed());
        }
        let answer = login_answer(r.p.imaps, "127.0.0.2", "alice", PASSWORD);
        assert!(answer.contains("NO [LIMIT]"), "{answer}");
        assert!(
            r.p.metric("postern_cluster_fallbacks_total{op=\"admit\"}") >= 1.0
                || r.p
                    .metrics_text()
                    .contains("postern_cluster_fallbacks_total")
        );
    }
    store.restart();
    for r in &rs {
        r.p.wait_metric("postern_cluster_store_up", |v| v == 1.0);
        r.p.wait_for_log("cluster store reachable");
    }
    // The replicas registered their live sessions again: four, over the
    // cluster's limit of two, so no replica lets another in.
    common::wait_until("the live sessions registered again", SETTLE, || {
        live_sessions(&rs[0], "alice") == 4
    });
    for r in &rs {
        let answer = login_answer(r.p.imaps, "127.0.0.2", "alice", PASSWORD);
        assert!(answer.contains("NO [LIMIT]"), "{answer}");
    }
    drop(held);
    common::wait_until("the sessions given back", SETTLE, || {
        live_sessions(&rs[1], "alice") == 0
    });
    logged_in(rs[1].p.imaps, "127.0.0.2", "alice").command("Z", "LOGOUT");
}
