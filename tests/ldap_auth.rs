//! The `ldap` auth source against a real OpenLDAP slapd (started and
//! seeded by the test) and real Dovecot backends: search-then-bind and
//! direct bind, `mailHost` choosing the backend, wrong and empty
//! passwords, filter injection attempts, StartTLS and LDAPS with the right and a
//! wrong CA, and the directory killed and restarted mid-test. Also: names
//! the directory chokes on never open the circuit breaker (the directory
//! going away does); every alias of a user reaches one identity, the
//! entry's `mail`; and an account the directory marks disabled is
//! refused after its right password without a backend hearing of it.

mod common;

use std::time::{Duration, Instant};

use base64::Engine;
use common::backend::DovecotBackend;
use common::client::Client;
use common::ldap::{person, person_with, Slapd, SERVICE_DN, SERVICE_PASSWORD};
use common::pki::{make_pki, PkiDir};
use common::postern::{Postern, Setup, PASSWORD};

struct World {
    a: DovecotBackend,
    b: DovecotBackend,
    slapd: Slapd,
    p: Postern,
    _pki: Option<PkiDir>,
}

/// Two backends; slapd with alice (mailHost: backend b), bob (no
/// mailHost) and carol (`employeeType: disabled`); Postern asking slapd.
/// `mode` is the `ldap:` keys that choose search-then-bind or direct bind;
/// `tls` runs slapd with a test CA and Postern with StartTLS (`"same"` CA,
/// or `"other"`: a CA that did not sign it) or LDAPS (`"ldaps"`).
fn world(name: &str, mode: &str, tls: Option<&str>) -> World {
    world_with(name, mode, tls, "")
}

/// [`world`] with more lines for the `auth:` block (`auth_options`).
fn world_with(name: &str, mode: &str, tls: Option<&str>, auth_options: &str) -> World {
    common::backend::ensure_installed();
    // Every name a login could reach a backend under, so that a login
    // that wrongly got through would succeed there and show in its log.
    let users = [
        ("alice", PASSWORD),
        ("bob", PASSWORD),
        ("carol", PASSWORD),
        ("alice@example.com", PASSWORD),
        ("bob@example.com", PASSWORD),
        ("carol@example.com", PASSWORD),
    ];
    let a = DovecotBackend::start_with_users(&format!("{name}-a"), &users);
    let b = DovecotBackend::start_with_users(&format!("{name}-b"), &users);
    let people = person("alice", "alice@example.com", PASSWORD, Some(&b.name))
        + &person("bob", "bob@example.com", PASSWORD, None)
        + &person_with(
            "carol",
            "carol@example.com",
            PASSWORD,
            "employeeType: staff\nemployeeType: Disabled\n",
        );
    let pki = tls.map(|_| PkiDir::new(name));
    let slapd_tls = pki.as_ref().map(|dir| make_pki(dir, "ldap"));
    let trusted = match (tls, pki.as_ref()) {
        (Some("other"), Some(dir)) => Some(make_pki(dir, "other").0),
        (Some(_), _) => slapd_tls.as_ref().map(|t| t.0.clone()),
        _ => None,
    };
    let slapd = Slapd::start(name, &people, slapd_tls);
    let secret = slapd.dir.join("service.password");
    std::fs::write(&secret, format!("{SERVICE_PASSWORD}\n")).unwrap();
    // StartTLS on the plain port, or LDAPS on its own port.
    let url = match (tls, slapd.ldaps_port) {
        (Some("ldaps"), Some(port)) => format!("ldaps://127.0.0.1:{port}"),
        _ => slapd.url(),
    };
    let tls_lines = match (trusted, tls) {
        (Some(ca), Some("ldaps")) => format!("    tls_ca_file: {}\n", ca.display()),
        (Some(ca), _) => format!("    starttls: true\n    tls_ca_file: {}\n", ca.display()),
        _ => String::new(),
    };
    let mode = mode
        .replace("SECRET", &secret.display().to_string())
        .replace("SERVICE", SERVICE_DN);
    let source = format!(
        "  source: ldap\n  ldap:\n    url: \"{url}\"\n{mode}    backend_attribute: mailHost\n    disabled_attribute: employeeType\n    timeout: 1s\n{tls_lines}  cache_ttl: 0s\n  brute_force: {{ max_delay: 300ms }}\n"
    );
    let p = Postern::start(Setup {
        backends: &[&a, &b],
        auth_source: &source,
        auth_options,
        ..Setup::default()
    });
    World {
        a,
        b,
        slapd,
        p,
        _pki: pki,
    }
}

const SEARCH: &str = "    bind_dn: \"SERVICE\"\n    bind_password_file: SECRET\n    base_dn: \"ou=people,dc=example,dc=com\"\n    filter: \"(&(objectClass=inetOrgPerson)(|(mail=%u)(uid=%u)))\"\n";
const DIRECT: &str = "    user_dn: \"uid=%n,ou=people,dc=example,dc=com\"\n";

fn login(p: &Postern, user: &str, password: &str) -> String {
    let (mut c, _) = Client::imaps(p.imaps);
    c.login(user, password).last().unwrap().clone()
}

/// Waits for `user`'s login in `b`'s log, which must be the only one.
fn wait_login(b: &DovecotBackend, user: &str) {
    assert_eq!(b.wait_logins_of(user, 1), 1, "{} logs {user} once", b.name);
}

#[test]
fn search_then_bind_and_mail_host_routes() {
    let w = world("ldap-search", SEARCH, None);
    assert!(login(&w.p, "alice", PASSWORD).starts_with("L1 OK"));
    // The entry's mail is the name at the backend.
    wait_login(&w.b, "alice@example.com");
    w.a.settle_log();
    assert_eq!(
        w.a.logins_of("alice@example.com"),
        0,
        "mailHost names backend b"
    );
    assert_eq!(
        w.p.wait_metric("postern_routes_total{reason=\"directory\"}", |v| v >= 1.0),
        1.0
    );
    // Found by mail too; bob has no mailHost and is placed by hash.
    assert!(login(&w.p, "bob@example.com", PASSWORD).starts_with("L1 OK"));
    assert_eq!(
        w.p.wait_metric("postern_routes_total{reason=\"hash\"}", |v| v >= 1.0),
        1.0
    );
    assert_eq!(
        w.p.wait_metric(
            "postern_authentications_total{mechanism=\"LOGIN\",result=\"success\",source=\"ldap\"}",
            |v| v >= 2.0
        ),
        2.0
    );
    assert!(login(&w.p, "alice", "wrong").starts_with("L1 NO [AUTHENTICATIONFAILED]"));
    assert!(login(&w.p, "nobody", PASSWORD).starts_with("L1 NO [AUTHENTICATIONFAILED]"));
    // The same wrong password again is answered from the negative cache.
    assert!(login(&w.p, "alice", "wrong").starts_with("L1 NO [AUTHENTICATIONFAILED]"));
    let negative = "postern_auth_cache_hits_total{kind=\"negative\"}";
    assert_eq!(w.p.wait_metric(negative, |v| v >= 1.0), 1.0);
    // A later login, once logged, shows the backends' logs are written past
    // the refused ones, which never reached them.
    assert!(login(&w.p, "alice", PASSWORD).starts_with("L1 OK"));
    w.b.wait_logins_of("alice@example.com", 2);
    assert!(!w.a.log().contains("wrong") && !w.b.log().contains("wrong"));
}

#[test]
fn direct_bind_reads_mail_host_as_the_user() {
    let w = world("ldap-direct", DIRECT, None);
    assert!(login(&w.p, "alice@example.com", PASSWORD).starts_with("L1 OK"));
    wait_login(&w.b, "alice@example.com");
    assert!(login(&w.p, "alice", "wrong").starts_with("L1 NO [AUTHENTICATIONFAILED]"));
}

/// Filter metacharacters are escaped (RFC 4515): they match nothing and
/// never widen the search; an empty password is never an anonymous bind.
#[test]
fn injection_and_empty_passwords_are_refused() {
    let w = world("ldap-inject", SEARCH, None);
    let plain = |user: &str, password: &str| plain(&w.p, user, password);
    for user in [
        "*",
        "*)(uid=*",
        "alice)(|(uid=*",
        "alice*",
        "ali\\2ace",
        "(uid=alice)",
        "%u",
        "alice\"@",
    ] {
        let answer = plain(user, PASSWORD);
        assert!(
            answer.starts_with("A1 NO [AUTHENTICATIONFAILED]"),
            "{user}: {answer}"
        );
    }
    assert!(
        !w.p.log().contains("more than one entry"),
        "no filter matched many"
    );
    // Empty: to LDAP an anonymous bind, which would succeed.
    assert!(plain("alice", "").starts_with("A1 NO"));
    assert!(plain("alice", "\u{e9}").starts_with("A1 NO [AUTHENTICATIONFAILED]"));
    assert!(
        plain("alice", PASSWORD).starts_with("A1 OK"),
        "and the real one works"
    );
    // Once the real one is logged (mailHost: b), it is the only login.
    w.b.wait_logins(1);
    assert_eq!(w.a.logins().len() + w.b.logins().len(), 1);
    // None of it was the directory failing.
    assert_eq!(w.p.metric(UNAVAILABLE), 0.0);
    assert_eq!(w.p.metric("postern_auth_circuit_open"), 0.0);
}

const UNAVAILABLE: &str =
    "postern_authentications_total{mechanism=\"PLAIN\",result=\"unavailable\",source=\"ldap\"}";

/// `AUTHENTICATE PLAIN` with an initial response (any bytes in the name,
/// no IMAP quoting); the tagged answer.
fn plain(p: &Postern, user: &str, password: &str) -> String {
    let (mut c, _) = Client::imaps(p.imaps);
    let ir = base64::engine::general_purpose::STANDARD.encode(format!("\0{user}\0{password}"));
    c.command("A1", &format!("AUTHENTICATE PLAIN {ir}"))
        .last()
        .unwrap()
        .clone()
}

/// Names that make no DN, or a DN of nothing, are failures of those
/// logins: however many, the circuit stays closed and the next right
/// login goes through. The directory going away opens it.
#[test]
fn client_made_errors_never_open_the_circuit_but_a_dead_directory_does() {
    let w = world_with(
        "ldap-breaker",
        DIRECT,
        None,
        "circuit_breaker: { failures: 3, open_for: 60s }",
    );
    // alice has logged in from here before: familiar, she is not held by
    // the block these ten names bring on (brute_force.block_after: 10).
    assert!(plain(&w.p, "alice", PASSWORD).starts_with("A1 OK"));
    let names = [
        "@example.com",
        "@",
        "a,b",
        "x=y",
        "uid=alice,ou=people,dc=example,dc=com",
        "a+b@example.com",
        "#lead",
        "q\"uote<d>;",
        "trailing\\",
        "nobody",
    ];
    for user in names {
        let answer = plain(&w.p, user, PASSWORD);
        assert!(
            answer.starts_with("A1 NO [AUTHENTICATIONFAILED]"),
            "{user}: {answer}"
        );
    }
    assert_eq!(
        w.p.wait_metric(
            "postern_authentications_total{mechanism=\"PLAIN\",result=\"failure\",source=\"ldap\"}",
            |v| v >= names.len() as f64
        ),
        names.len() as f64
    );
    assert_eq!(w.p.metric(UNAVAILABLE), 0.0);
    assert_eq!(w.p.metric("postern_auth_circuit_open"), 0.0);
    let answer = plain(&w.p, "alice", PASSWORD);
    assert!(answer.starts_with("A1 OK"), "{answer}");
    assert_eq!(w.b.wait_logins_of("alice@example.com", 2), 2);

    // The directory gone: three unavailable answers open the circuit, and
    // the next login is answered without asking.
    w.slapd.kill();
    for _ in 0..3 {
        let answer = plain(&w.p, "alice", PASSWORD);
        assert!(answer.starts_with("A1 NO [UNAVAILABLE]"), "{answer}");
    }
    assert_eq!(
        w.p.wait_metric("postern_auth_circuit_open", |v| v >= 1.0),
        1.0
    );
    let answer = plain(&w.p, "alice", PASSWORD);
    assert!(answer.starts_with("A1 NO [UNAVAILABLE]"), "{answer}");
    assert_eq!(
        w.p.wait_metric("postern_auth_circuit_rejected_total", |v| v >= 1.0),
        1.0
    );
}

/// `alice`, `ALICE@example.com` and `alice@example.com` are one user: the
/// entry's `mail`, at the backend and in the log, in either mode.
#[test]
fn every_alias_reaches_one_identity() {
    for (mode, name) in [(SEARCH, "ldap-alias-search"), (DIRECT, "ldap-alias-direct")] {
        let w = world(name, mode, None);
        let aliases = ["alice", "ALICE@example.com", "alice@example.com"];
        for user in aliases {
            assert!(
                login(&w.p, user, PASSWORD).starts_with("L1 OK"),
                "{name}: {user}"
            );
        }
        // A name with a leading space is no fourth spelling.
        let answer = login(&w.p, " alice@example.com", PASSWORD);
        assert!(
            answer.starts_with("L1 NO [AUTHENTICATIONFAILED]"),
            "{answer}"
        );
        assert_eq!(w.b.wait_logins_of("alice@example.com", 3), 3, "{name}");
        let ended = |log: &str| {
            log.lines()
                .filter(|l| l.contains("session ended"))
                .filter(|l| l.contains("user=\"alice@example.com\""))
                .count()
        };
        common::wait_for(
            "three sessions of alice@example.com ended",
            common::SETTLE,
            || common::LogText(w.p.log()),
            |log| ended(&log.0) >= 3,
        );
        let log = w.p.log();
        assert!(
            !log.lines().any(|l| l.contains("session ended")
                && (l.contains("user=\"alice\"") || l.contains("user=\"ALICE"))),
            "{name}: one identity only"
        );
        w.a.settle_log();
        w.b.settle_log();
        assert_eq!(w.a.logins().len(), 0, "{name}: mailHost names b");
        assert_eq!(w.b.logins().len(), 3, "{name}: {:?}", w.b.logins());
    }
}

/// carol's entry says `employeeType: Disabled`: with her right password she
/// is refused as with a wrong one, in either mode, and no backend hears of
/// her.
#[test]
fn a_disabled_account_is_refused_and_never_reaches_a_backend() {
    for (mode, name) in [
        (SEARCH, "ldap-disabled-search"),
        (DIRECT, "ldap-disabled-direct"),
    ] {
        let w = world(name, mode, None);
        let disabled = "postern_authentications_total{mechanism=\"LOGIN\",result=\"disabled\",source=\"ldap\"}";
        let failure =
            "postern_authentications_total{mechanism=\"LOGIN\",result=\"failure\",source=\"ldap\"}";
        let answer = login(&w.p, "carol", PASSWORD);
        assert!(
            answer.starts_with("L1 NO [AUTHENTICATIONFAILED]"),
            "{name}: {answer}"
        );
        assert_eq!(w.p.wait_metric(disabled, |v| v >= 1.0), 1.0, "{name}");
        w.p.wait_for_log("login refused: account disabled");
        // A wrong password is a plain failure: "disabled" says the
        // password was right, so only the right one may earn it.
        let wrong = login(&w.p, "carol@example.com", "wrong");
        assert_eq!(wrong, answer, "{name}: answered alike");
        assert_eq!(w.p.wait_metric(failure, |v| v >= 1.0), 1.0, "{name}");
        assert_eq!(w.p.metric(disabled), 1.0, "{name}");
        assert_eq!(
            w.p.metric(UNAVAILABLE.replace("PLAIN", "LOGIN").as_str()),
            0.0
        );
        // A later login, once logged, orders the backends' logs past
        // anything carol's attempts could have caused.
        assert!(login(&w.p, "bob", PASSWORD).starts_with("L1 OK"));
        common::wait_until("bob's login is logged", common::SETTLE, || {
            w.a.logins_of("bob@example.com") + w.b.logins_of("bob@example.com") == 1
        });
        w.a.settle_log();
        w.b.settle_log();
        for b in [&w.a, &w.b] {
            assert!(
                !b.saw_user("carol") && !b.saw_user("carol@example.com"),
                "{name}: backend {} heard of carol",
                b.name
            );
        }
    }
}

#[test]
fn starttls_and_ldaps_to_the_directory_with_the_right_ca_only() {
    let w = world("ldap-tls", SEARCH, Some("same"));
    assert!(login(&w.p, "alice", PASSWORD).starts_with("L1 OK"));
    wait_login(&w.b, "alice@example.com");

    let w = world("ldap-ldaps", SEARCH, Some("ldaps"));
    assert!(login(&w.p, "alice", PASSWORD).starts_with("L1 OK"));
    wait_login(&w.b, "alice@example.com");

    let w = world("ldap-tls-wrong", SEARCH, Some("other"));
    assert!(login(&w.p, "alice", PASSWORD).starts_with("L1 NO [UNAVAILABLE]"));
    // The cause is logged.
    w.p.wait_for_log("LDAP");
    w.b.settle_log();
    assert_eq!(w.b.logins().len(), 0);
}

#[test]
fn a_dead_directory_is_unavailable_within_the_timeout_then_recovers() {
    let mut w = world("ldap-down", SEARCH, None);
    assert!(login(&w.p, "alice", PASSWORD).starts_with("L1 OK"));
    w.slapd.kill();
    // Only the login is timed, not the TLS handshake before it.
    let (mut c, _) = Client::imaps(w.p.imaps);
    let started = Instant::now();
    let answer = c.login("alice", PASSWORD).last().unwrap().clone();
    assert_eq!(
        answer,
        "L1 NO [UNAVAILABLE] Authentication is unavailable, try again later"
    );
    // Every LDAP step is bounded by the 1 s timeout, the whole by 4 s; a
    // hang would last until the client's 10 s read timeout. Slack for a
    // loaded machine.
    assert!(
        started.elapsed() < Duration::from_secs(8),
        "{:?}",
        started.elapsed()
    );
    w.slapd.restart();
    common::wait_until("logins work again", common::SETTLE, || {
        login(&w.p, "alice", PASSWORD).starts_with("L1 OK")
    });
}
