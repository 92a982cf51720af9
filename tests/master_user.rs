//! Master-user logins at real Dovecot backends (`proxymaster`, set up by
//! scripts/dovecot-backend with `auth_master_user_separator = *`): a user
//! whose backend password differs from the one Postern checks still gets
//! in, through SASL PLAIN with an authorization identity or through
//! Dovecot's `user*master` LOGIN form, with the master password read from
//! a file. A wrong master password fails at the backend with
//! `NO [UNAVAILABLE]`, never as the user's fault.

mod common;

use common::backend::DovecotBackend;
use common::client::Client;
use common::postern::{user, Postern, Setup, PASSWORD};

const MASTER_PASSWORD: &str = "master-secret";

fn behind_master(name: &str, form: &str, master_password: &str) -> (DovecotBackend, Postern) {
    common::backend::ensure_installed();
    // The backend knows alice by another password than Postern does.
    let b = DovecotBackend::start_with_users(name, &[("alice", "only-the-backend-knows")]);
    let dir =
        std::env::temp_dir().join(format!("postern-test-master-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("master.password");
    std::fs::write(&file, format!("{master_password}\n")).unwrap();
    let options = format!(
        "master_user:\n  user: proxymaster\n  password_file: {}\n  form: {form}\n  always: true\n",
        file.display()
    );
    let p = Postern::start(Setup {
        backends: &[&b],
        users: &user("alice"),
        backend_options: &options,
        ..Setup::default()
    });
    (b, p)
}

#[test]
fn master_login_with_an_authorization_identity() {
    let (b, p) = behind_master("master-authzid", "authzid", MASTER_PASSWORD);
    let mut c = Client::logged_in(p.imaps, "alice");
    let lines = c.command("S", "SELECT INBOX");
    assert!(lines.last().unwrap().starts_with("S OK"), "{lines:?}");
    assert_eq!(b.wait_logins_of("alice", 1), 1);
    let logins = b.logins();
    assert!(logins[0].contains("method=PLAIN"), "{logins:?}");
}

#[test]
fn master_login_with_the_separator_form() {
    let (b, p) = behind_master("master-separator", "separator", MASTER_PASSWORD);
    let mut c = Client::logged_in(p.imaps, "alice");
    c.command("Z", "LOGOUT");
    assert_eq!(b.wait_logins_of("alice", 1), 1);
}

/// With the separator form, a user name holding the separator would make
/// the backend log in as someone else: refused before the backend. It is
/// that user's problem, not the backend's: however often it happens, the
/// backend is not marked down (`passive_fall: 1` would on the first
/// failure of the backend itself).
#[test]
fn a_user_name_with_the_separator_never_reaches_the_backend_nor_marks_it_down() {
    common::backend::ensure_installed();
    let b = DovecotBackend::start_with_users("master-sep-name", &[("alice", "x")]);
    let dir = std::env::temp_dir().join(format!(
        "postern-test-master-{}-sepname",
        std::process::id()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("m"), "master-secret\n").unwrap();
    let options = format!(
        "passive_fall: 1\nmaster_user:\n  user: proxymaster\n  password_file: {}\n  form: separator\n  always: true\n",
        dir.join("m").display()
    );
    let p = Postern::start(Setup {
        backends: &[&b],
        users: &user("mallory*alice"),
        backend_options: &options,
        ..Setup::default()
    });
    for _ in 0..3 {
        let (mut c, _) = Client::imaps(p.imaps);
        let lines = c.login("mallory*alice", PASSWORD);
        assert!(
            lines.last().unwrap().starts_with("L1 NO [UNAVAILABLE]"),
            "{lines:?}"
        );
    }
    let unsuitable = format!(
        "postern_backend_logins_total{{backend=\"{}\",result=\"unsuitable\"}}",
        b.name
    );
    p.wait_metric(&unsuitable, |v| v == 3.0);
    assert_eq!(
        p.metric(&format!("postern_backend_up{{backend=\"{}\"}}", b.name)),
        1.0
    );
    b.settle_log();
    assert!(b.logins().is_empty(), "{:?}", b.logins());
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_wrong_master_password_is_the_backend_s_fault_not_the_user_s() {
    let (b, p) = behind_master("master-wrong", "authzid", "not-the-master-password");
    let (mut c, _) = Client::imaps(p.imaps);
    let lines = c.login("alice", PASSWORD);
    assert!(
        lines.last().unwrap().starts_with("L1 NO [UNAVAILABLE]"),
        "{lines:?}"
    );
    // Wait until the backend has logged the master password it refused
    // (the log names only the master user) and Postern the refusal, so
    // neither log below is read before it was written.
    common::wait_until(
        "the backend logs the refused master login",
        common::SETTLE,
        || b.saw_user("proxymaster"),
    );
    assert_eq!(b.logins_of("alice"), 0);
    let log = p.wait_for_log("backend refused a login");
    assert!(
        !log.contains("not-the-master-password"),
        "no secret in the log"
    );
}
