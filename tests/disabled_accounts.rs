//! Disabled accounts in the users file, through Postern to a real Dovecot
//! that would let them in: `disabled: true` in the YAML and `nologin` in a
//! Dovecot passwd-file. With the right password the answer is the one a
//! wrong password gets (with the reason only where
//! `auth.show_disabled_reason` allows it), and the backend never hears of
//! the login.

mod common;

use common::backend::DovecotBackend;
use common::client::Client;
use common::postern::{user, Postern, Setup, PASSWORD};

const FAILED: &str = "L1 NO [AUTHENTICATIONFAILED] Authentication failed.";

fn login(p: &Postern, user: &str, password: &str) -> String {
    let (mut c, _) = Client::imaps(p.imaps);
    c.login(user, password).last().unwrap().clone()
}

/// Waits for alice's login (which must succeed) in the backend's log, then
/// for the log to hold everything earlier connections caused: after this,
/// a login that is absent never happened.
fn alice_then_settle(p: &Postern, b: &DovecotBackend, nth: usize) {
    assert!(login(p, "alice", PASSWORD).starts_with("L1 OK"));
    assert_eq!(b.wait_logins_of("alice", nth), nth);
    b.settle_log();
}

fn disabled_count(p: &Postern) -> f64 {
    p.wait_metric(
        "postern_authentications_total{mechanism=\"LOGIN\",result=\"disabled\",source=\"static\"}",
        |v| v >= 1.0,
    )
}

#[test]
fn a_disabled_user_with_the_right_password_is_refused_before_the_backend() {
    common::backend::ensure_installed();
    let b = DovecotBackend::start_with_users(
        "disabled",
        &[("alice", PASSWORD), ("carol", PASSWORD), ("dan", PASSWORD)],
    );

    // The YAML users file, reason kept from the client.
    let users = user("alice")
        + &format!(
            "  - {{ user: carol, password: \"{{PLAIN}}{PASSWORD}\", disabled: true, reason: \"Account closed, ask support\" }}\n"
        );
    let p = Postern::start(Setup {
        backends: &[&b],
        users: &users,
        ..Setup::default()
    });
    assert_eq!(login(&p, "carol", PASSWORD), FAILED);
    assert_eq!(disabled_count(&p), 1.0);
    assert_eq!(login(&p, "carol", "wrong"), FAILED, "as a wrong password");
    let log = p.wait_for_log("login refused: account disabled");
    assert!(log.contains("Account closed, ask support"), "logged");
    alice_then_settle(&p, &b, 1);
    assert!(!b.saw_user("carol"), "the backend never heard of carol");

    // A Dovecot passwd-file with nologin, the reason shown to the client.
    let file = p.cert_path().with_file_name("users.passwd");
    std::fs::write(
        &file,
        format!(
            "alice:{{PLAIN}}{PASSWORD}\ndan:{{PLAIN}}{PASSWORD}:1000:1000::/home/dan::nologin=y reason=Suspended\n"
        ),
    )
    .unwrap();
    let source = format!(
        "  source: static\n  static: {{ users_file: {}, format: passwd-file }}\n",
        file.display()
    );
    let q = Postern::start(Setup {
        backends: &[&b],
        auth_source: &source,
        auth_options: "show_disabled_reason: true",
        ..Setup::default()
    });
    assert_eq!(
        login(&q, "dan", PASSWORD),
        "L1 NO [AUTHENTICATIONFAILED] Suspended"
    );
    assert_eq!(disabled_count(&q), 1.0);
    // The reason only for the right password: it would tell a guesser.
    assert_eq!(login(&q, "dan", "wrong"), FAILED);
    alice_then_settle(&q, &b, 2);
    assert!(!b.saw_user("dan"), "the backend never heard of dan");
    assert!(!b.saw_user("carol"));
}
