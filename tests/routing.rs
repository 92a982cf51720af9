//! Authentication at the edge and placement on backends, checked against
//! what real Dovecot backends log: a wrong password never reaches a backend,
//! users land where the rendezvous hash or the directory says, a dead
//! backend gives `NO [UNAVAILABLE]` promptly, and the client's address is
//! forwarded with ID.

mod common;

use std::time::{Duration, Instant};

use common::backend::DovecotBackend;
use common::client::Client;
use common::postern::{user, user_on, Postern, Setup, PASSWORD};
use postern::auth::Identity;
use postern::config::Backends;
use postern::metrics::Metrics;
use postern::route::Pool;

#[test]
fn wrong_password_never_reaches_backend() {
    common::backend::ensure_installed();
    let b = DovecotBackend::start_with_users("wrong-pw", &[("alice", PASSWORD)]);
    let p = Postern::start(Setup {
        backends: &[&b],
        users: &user("alice"),
        ..Setup::default()
    });
    let (mut c, _) = Client::imaps(p.imaps);
    let started = Instant::now();
    let lines = c.login("alice", "not-the-password");
    assert_eq!(
        lines,
        vec!["L1 NO [AUTHENTICATIONFAILED] Authentication failed."]
    );
    assert!(
        started.elapsed() >= Duration::from_millis(200),
        "the failure delay applies"
    );
    let lines = c.command("L2", "LOGIN nobody whatever");
    assert_eq!(
        lines,
        vec!["L2 NO [AUTHENTICATIONFAILED] Authentication failed."],
        "unknown user looks the same"
    );
    // A correct login on the same connection still works and reaches the backend.
    let lines = c.command("L3", &format!("LOGIN alice {PASSWORD}"));
    assert!(
        lines.last().unwrap().starts_with("L3 OK [CAPABILITY"),
        "{lines:?}"
    );
    // Alice's login line comes after anything the failures could have
    // caused, so the absence checks below are not vacuous.
    assert_eq!(b.wait_logins(1).len(), 1, "{:?}", b.logins());
    let log = b.log();
    assert!(
        !log.contains("auth failed")
            && !log.contains("Authentication failure")
            && !log.contains("password mismatch"),
        "{log}"
    );
    assert!(!b.saw_user("nobody"), "{log}");
    let failures = p.wait_metric(
        "postern_authentications_total{mechanism=\"LOGIN\",result=\"failure\",source=\"static\"}",
        |v| v >= 2.0,
    );
    assert_eq!(failures, 2.0);
    // Once the session has ended, all it will log is in the log.
    c.command("Z", "LOGOUT");
    drop(c);
    let log = p.wait_for_log("session ended");
    assert!(
        !log.contains("not-the-password"),
        "no password in Postern's log"
    );
}

#[test]
fn too_many_failed_logins_end_with_bye() {
    common::backend::ensure_installed();
    let b = DovecotBackend::start_with_users("fail-limit", &[("alice", PASSWORD)]);
    let p = Postern::start(Setup {
        backends: &[&b],
        users: &user("alice"),
        extra: "limits:\n  max_auth_failures: 2\n",
        ..Setup::default()
    });
    let (mut c, _) = Client::imaps(p.imaps);
    c.login("alice", "x");
    c.send(b"L2 LOGIN alice y\r\n");
    assert!(c.line().starts_with("L2 NO [AUTHENTICATIONFAILED]"));
    assert_eq!(c.line(), "* BYE Too many failed logins");
    assert!(c.closed());
    let penalties = p.wait_metric("postern_auth_penalties_total", |v| v >= 2.0);
    assert_eq!(penalties, 2.0);
    let blocks = p.wait_metric("postern_auth_blocks_total{listener=\"imaps\"}", |v| {
        v >= 1.0
    });
    assert_eq!(blocks, 1.0);
}

#[test]
fn users_land_on_the_backend_the_hash_or_directory_names() {
    common::backend::ensure_installed();
    let names: Vec<String> = (0..12).map(|i| format!("user{i}")).collect();
    let creds: Vec<(&str, &str)> = names
        .iter()
        .map(|n| (n.as_str(), PASSWORD))
        .chain([("pinned", PASSWORD)])
        .collect();
    let backends = [
        DovecotBackend::start_with_users("place-a", &creds),
        DovecotBackend::start_with_users("place-b", &creds),
        DovecotBackend::start_with_users("place-c", &creds),
    ];
    let refs: Vec<&DovecotBackend> = backends.iter().collect();
    let mut users: String = names.iter().map(|n| user(n)).collect();
    users.push_str(&user_on("pinned", "place-b"));
    let p = Postern::start(Setup {
        backends: &refs,
        users: &users,
        ..Setup::default()
    });
    let mut yaml = String::from("pool:\n");
    for b in &backends {
        yaml.push_str(&format!(
            "  - {{ name: {}, address: \"{}\" }}\n",
            b.name,
            b.addr()
        ));
    }
    let pool = Pool::new(
        &serde_yaml::from_str::<Backends>(&yaml).unwrap(),
        &Metrics::new(),
        &|p| p.to_owned(),
        None,
    )
    .unwrap();
    for n in names.iter().chain([&"pinned".to_string()]) {
        let (mut c, _) = Client::imaps(p.imaps);
        let lines = c.login(n, PASSWORD);
        assert!(lines.last().unwrap().starts_with("L1 OK"), "{n}: {lines:?}");
        c.command("L2", "LOGOUT");
    }
    common::wait_until("backends log all 13 logins", common::SETTLE, || {
        backends.iter().map(|b| b.logins().len()).sum::<usize>() == 13
    });
    let mut used = std::collections::HashSet::new();
    for n in &names {
        let expected = pool
            .select(
                &Identity {
                    user: n.clone(),
                    backend: None,
                    pool: None,
                    backend_password: None,
                },
                &[],
            )
            .unwrap()
            .backend
            .name
            .clone();
        used.insert(expected.clone());
        for b in &backends {
            let here = b
                .logins()
                .iter()
                .any(|l| l.contains(&format!("user=<{n}>")));
            assert_eq!(
                here,
                b.name == expected,
                "{n} expected on {expected}, checked {}",
                b.name
            );
        }
    }
    assert!(
        used.len() >= 2,
        "twelve users spread over more than one backend"
    );
    assert!(
        backends[1]
            .logins()
            .iter()
            .any(|l| l.contains("user=<pinned>")),
        "directory pin wins"
    );
    common::wait_for(
        "the directory pin in postern's log",
        common::SETTLE,
        || common::LogText(p.log()),
        |log| log.0.contains("reason=\"directory\"") || log.0.contains("reason=directory"),
    );
}

#[test]
fn backend_down_gives_unavailable_within_the_connect_timeout() {
    common::backend::ensure_installed();
    let b = DovecotBackend::start_with_users("down", &[("alice", PASSWORD)]);
    let p = Postern::start(Setup {
        backends: &[&b],
        users: &user("alice"),
        ..Setup::default()
    });
    drop(b); // stopped: nothing listens on its port any more
    let (mut c, _) = Client::imaps(p.imaps);
    let started = Instant::now();
    let lines = c.login("alice", PASSWORD);
    assert!(lines[0].starts_with("L1 NO [UNAVAILABLE] "), "{lines:?}");
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "within the 2 s connect timeout plus the failure path"
    );
    // The session stays usable.
    assert_eq!(c.command("a", "NOOP"), vec!["a OK NOOP completed"]);
    p.wait_metric(
        "postern_backend_logins_total{backend=\"down\",result=\"connect_error\"}",
        |v| v >= 1.0,
    );
}

#[test]
fn backend_that_rejects_an_accepted_user_gives_unavailable() {
    common::backend::ensure_installed();
    // The backend knows alice with another password than Postern's users file.
    let b = DovecotBackend::start_with_users("disagree", &[("alice", "other-password")]);
    let p = Postern::start(Setup {
        backends: &[&b],
        users: &user("alice"),
        ..Setup::default()
    });
    let (mut c, _) = Client::imaps(p.imaps);
    let lines = c.login("alice", PASSWORD);
    assert!(lines[0].starts_with("L1 NO [UNAVAILABLE] "), "{lines:?}");
    let log = p.wait_for_log("backend refused a login that Postern accepted");
    assert!(log.contains("ERROR"), "logged loudly: {log}");
}

#[test]
fn client_address_is_forwarded_with_id() {
    common::backend::ensure_installed();
    let b = DovecotBackend::start_with_users("forward", &[("alice", PASSWORD)]);
    let p = Postern::start(Setup {
        backends: &[&b],
        users: &user("alice"),
        ..Setup::default()
    });
    // Connect from 127.0.0.2: Postern itself reaches the backend from 127.0.0.1.
    let tcp = common::client::tcp_from("127.0.0.2", p.imaps);
    let tls = common::client::tls_over(tcp, "localhost", &[b"imap"]).unwrap();
    let mut c = Client::from_stream(tls);
    assert!(c.line().starts_with("* OK"));
    assert!(c
        .login("alice", PASSWORD)
        .last()
        .unwrap()
        .starts_with("L1 OK"));
    let login = &b.wait_logins(1)[0];
    assert!(login.contains("rip=127.0.0.2"), "{login}");
}

#[test]
fn usernames_are_normalised_before_lookup_and_routing() {
    common::backend::ensure_installed();
    let b = DovecotBackend::start_with_users("normalise", &[("alice@example.com", PASSWORD)]);
    let p = Postern::start(Setup {
        backends: &[&b],
        users: &user("alice@example.com"),
        auth_options: "default_domain: example.com",
        ..Setup::default()
    });
    let (mut c, _) = Client::imaps(p.imaps);
    assert!(c
        .login("ALICE", PASSWORD)
        .last()
        .unwrap()
        .starts_with("L1 OK"));
    let logins = b.wait_logins(1);
    assert!(logins[0].contains("user=<alice@example.com>"), "{logins:?}");
}

/// A one-connection backend that greets with `greeting` and records what
/// it is sent until the peer closes (or 5 s pass).
fn scripted_backend(greeting: &'static str) -> (u16, std::thread::JoinHandle<Vec<u8>>) {
    use std::io::{Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let handle = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s.write_all(greeting.as_bytes()).unwrap();
        let mut got = Vec::new();
        let _ = s.read_to_end(&mut got);
        got
    });
    (port, handle)
}

#[test]
fn backend_greeting_preauth_or_bye_is_refused_without_credentials() {
    for greeting in [
        "* PREAUTH [CAPABILITY IMAP4rev1] logged in as root\r\n",
        "* BYE too busy\r\n",
    ] {
        let (port, backend) = scripted_backend(greeting);
        let pool = format!("    - {{ name: scripted, address: \"127.0.0.1:{port}\" }}\n");
        let p = Postern::start(Setup {
            users: &user_on("alice", "scripted"),
            pool_lines: &pool,
            // The scripted backend answers one connection: the session's.
            backend_options: "health_check: { enabled: false }",
            ..Setup::default()
        });
        let (mut c, _) = Client::imaps(p.imaps);
        let lines = c.login("alice", PASSWORD);
        assert!(
            lines[0].starts_with("L1 NO [UNAVAILABLE] "),
            "{greeting}: {lines:?}"
        );
        drop(c);
        drop(p);
        let got = backend.join().unwrap();
        assert!(
            got.is_empty(),
            "{greeting}: backend was sent {:?}",
            String::from_utf8_lossy(&got)
        );
    }
}

#[test]
fn pools_by_domain_and_by_directory() {
    common::backend::ensure_installed();
    let creds = [
        ("ann@example.net", PASSWORD),
        ("bea@corp.example.com", PASSWORD),
        ("cid@example.net", PASSWORD),
    ];
    let a = DovecotBackend::start_with_users("pool-default", &creds);
    let b = DovecotBackend::start_with_users("pool-business", &creds);
    let pools = format!(
        "pools:\n  - name: business\n    domains: [corp.example.com]\n    servers:\n      - {{ name: pool-business, address: \"{}\" }}",
        b.addr()
    );
    let users = user("ann@example.net")
        + &user("bea@corp.example.com")
        + "  - { user: cid@example.net, password: \"{PLAIN}pw-secret\", pool: business }\n";
    let p = Postern::start(Setup {
        backends: &[&a],
        users: &users,
        backend_options: &pools,
        ..Setup::default()
    });
    for (name, _) in creds {
        let (mut c, _) = Client::imaps(p.imaps);
        let lines = c.login(name, PASSWORD);
        assert!(
            lines.last().unwrap().starts_with("L1 OK"),
            "{name}: {lines:?}"
        );
        c.command("Z", "LOGOUT");
    }
    common::wait_until("three logins", common::SETTLE, || {
        a.logins().len() + b.logins().len() == 3
    });
    assert!(a.saw_user("ann@example.net"));
    assert!(b.saw_user("bea@corp.example.com"), "by domain");
    assert!(b.saw_user("cid@example.net"), "by the users file");
    p.wait_for_log("pool=business");
}

/// Two replicas with one configuration and no link between them send every
/// user to the same backend: placement is a pure function of the user name
/// and the backend names, so scaling out needs no shared state.
#[test]
fn replicas_route_every_user_to_the_same_backend() {
    common::backend::ensure_installed();
    let names: Vec<String> = (0..40).map(|i| format!("replica-user-{i}")).collect();
    let accounts: Vec<(&str, &str)> = names.iter().map(|n| (n.as_str(), PASSWORD)).collect();
    let backends: Vec<DovecotBackend> = ["replica-a", "replica-b", "replica-c"]
        .iter()
        .map(|n| DovecotBackend::start_with_users(n, &accounts))
        .collect();
    let refs: Vec<&DovecotBackend> = backends.iter().collect();
    let users: String = names.iter().map(|n| user(n)).collect();
    let replicas: Vec<Postern> = (0..2)
        .map(|_| {
            Postern::start(Setup {
                backends: &refs,
                users: &users,
                ..Setup::default()
            })
        })
        .collect();
    let mut placed = vec![0; backends.len()];
    for name in &names {
        let mut chosen = Vec::new();
        for (round, replica) in replicas.iter().enumerate() {
            assert!(
                Client::login_ok(replica.imaps, name),
                "{name} via replica {round}"
            );
            let mut at = None;
            common::wait_until(
                &format!("a backend logs {name}'s login {}", round + 1),
                common::SETTLE,
                || {
                    let counts: Vec<usize> = backends.iter().map(|b| b.logins_of(name)).collect();
                    at = counts.iter().position(|&c| c > 0);
                    counts.iter().sum::<usize>() == round + 1
                },
            );
            chosen.push(at.unwrap());
        }
        assert_eq!(chosen[0], chosen[1], "{name}: replicas disagree");
        assert_eq!(backends[chosen[0]].logins_of(name), 2, "{name}");
        placed[chosen[0]] += 1;
    }
    assert!(
        placed.iter().all(|&n| n > 0),
        "users spread over every backend: {placed:?}"
    );
}
