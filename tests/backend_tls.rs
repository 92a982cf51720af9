//! TLS from Postern to real Dovecot backends, with a CA made by the test:
//! STARTTLS and implicit TLS work and carry the login; a certificate from
//! another CA, or a backend that does not offer STARTTLS, fails closed — the
//! backend never sees the user's credentials.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::backend::DovecotBackend;
use common::client::Client;
use common::postern::{user, Postern, Setup, PASSWORD};
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};

/// A CA and a certificate it signed for localhost and 127.0.0.1, as PEM
/// files in `dir`: (ca.pem, server.pem, server.key). The certificate also
/// serves as a client certificate.
fn make_pki(dir: &Path, tag: &str) -> (PathBuf, PathBuf, PathBuf) {
    std::fs::create_dir_all(dir).unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, format!("Postern test CA {tag}"));
    let ca_key = KeyPair::generate().unwrap();
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let leaf_params =
        CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()]).unwrap();
    let leaf_key = KeyPair::generate().unwrap();
    let leaf = leaf_params.signed_by(&leaf_key, &ca, &ca_key).unwrap();
    let paths = (
        dir.join(format!("{tag}-ca.pem")),
        dir.join(format!("{tag}-server.pem")),
        dir.join(format!("{tag}-server.key")),
    );
    std::fs::write(&paths.0, ca.pem()).unwrap();
    std::fs::write(&paths.1, leaf.pem()).unwrap();
    std::fs::write(&paths.2, leaf_key.serialize_pem()).unwrap();
    paths
}

fn pki_dir(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!("postern-test-pki-{}-{name}", std::process::id()))
}

fn tls_backend(
    name: &str,
    pki: &(PathBuf, PathBuf, PathBuf),
    imaps_port: Option<u16>,
) -> DovecotBackend {
    tls_backend_with(name, pki, imaps_port, None)
}

fn tls_backend_with(
    name: &str,
    pki: &(PathBuf, PathBuf, PathBuf),
    imaps_port: Option<u16>,
    client_ca: Option<&Path>,
) -> DovecotBackend {
    let cert = pki.1.to_str().unwrap().to_owned();
    let key = pki.2.to_str().unwrap().to_owned();
    let imaps = imaps_port.map(|p| p.to_string());
    let mut env = vec![
        ("DOVECOT_TLS_CERT", cert.as_str()),
        ("DOVECOT_TLS_KEY", key.as_str()),
    ];
    if let Some(port) = &imaps {
        env.push(("DOVECOT_IMAPS_PORT", port.as_str()));
    }
    let client_ca = client_ca.map(|p| p.to_str().unwrap().to_owned());
    if let Some(ca) = &client_ca {
        env.push(("DOVECOT_TLS_CLIENT_CA", ca.as_str()));
    }
    DovecotBackend::start_with_env(name, &[("alice", PASSWORD)], &env)
}

fn postern_with(pool_line: String) -> Postern {
    Postern::start(Setup {
        pool_lines: &pool_line,
        users: &user("alice"),
        backend_options: "health_check: { interval: 200ms }",
        ..Setup::default()
    })
}

fn login(p: &Postern) -> Vec<String> {
    let (mut c, _) = Client::imaps(p.imaps);
    let lines = c.login("alice", PASSWORD);
    c.command("Z", "LOGOUT");
    lines
}

#[test]
fn starttls_to_a_backend_with_a_private_ca() {
    common::backend::ensure_installed();
    let dir = pki_dir("starttls");
    let pki = make_pki(&dir, "good");
    let b = tls_backend("tls-st", &pki, None);
    let p = postern_with(format!(
        "    - {{ name: tls-st, address: \"{}\", tls: starttls, tls_ca_file: \"{}\", tls_server_name: localhost }}\n",
        b.addr(),
        pki.0.display()
    ));
    let lines = login(&p);
    assert!(lines.last().unwrap().starts_with("L1 OK"), "{lines:?}");
    common::wait_until(
        "the backend logs the login",
        Duration::from_secs(10),
        || !b.logins().is_empty(),
    );
    let line = &b.logins()[0];
    assert!(line.contains(", TLS"), "the login went over TLS: {line}");
    common::wait_until(
        "a health check passes over STARTTLS",
        Duration::from_secs(5),
        || p.metric("postern_backend_checks_total{backend=\"tls-st\",result=\"pass\"}") >= 1.0,
    );
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn implicit_tls_checks_the_address_when_no_name_is_given() {
    common::backend::ensure_installed();
    let dir = pki_dir("implicit");
    let pki = make_pki(&dir, "good");
    let imaps_port = common::free_port();
    let b = tls_backend("tls-imp", &pki, Some(imaps_port));
    // No tls_server_name: the certificate must name 127.0.0.1 itself.
    let p = postern_with(format!(
        "    - {{ name: tls-imp, address: \"127.0.0.1:{imaps_port}\", tls: implicit, tls_ca_file: \"{}\" }}\n",
        pki.0.display()
    ));
    let lines = login(&p);
    assert!(lines.last().unwrap().starts_with("L1 OK"), "{lines:?}");
    common::wait_until(
        "the backend logs the login",
        Duration::from_secs(10),
        || b.logins().iter().any(|l| l.contains(", TLS")),
    );
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn a_certificate_from_another_ca_fails_closed() {
    common::backend::ensure_installed();
    let dir = pki_dir("wrong");
    let pki = make_pki(&dir, "good");
    let other = make_pki(&dir, "other");
    let b = tls_backend("tls-wrong", &pki, None);
    let p = postern_with(format!(
        "    - {{ name: tls-wrong, address: \"{}\", tls: starttls, tls_ca_file: \"{}\", tls_server_name: localhost }}\n",
        b.addr(),
        other.0.display()
    ));
    let lines = login(&p);
    assert!(lines[0].starts_with("L1 NO [UNAVAILABLE] "), "{lines:?}");
    assert!(
        p.metric("postern_backend_logins_total{backend=\"tls-wrong\",result=\"tls_error\"}") >= 1.0
    );
    assert!(!b.saw_user("alice"), "no credentials reached the backend");
    common::wait_until("the backend is marked down", Duration::from_secs(5), || {
        p.metric("postern_backend_up{backend=\"tls-wrong\"}") == 0.0
    });
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn a_backend_without_starttls_gets_no_credentials() {
    common::backend::ensure_installed();
    let dir = pki_dir("missing");
    let pki = make_pki(&dir, "good");
    // A plain backend: its greeting offers no STARTTLS.
    let b = DovecotBackend::start_with_users("tls-none", &[("alice", PASSWORD)]);
    let p = Postern::start(Setup {
        pool_lines: &format!(
            "    - {{ name: tls-none, address: \"{}\", tls: starttls, tls_ca_file: \"{}\" }}\n",
            b.addr(),
            pki.0.display()
        ),
        users: &user("alice"),
        backend_options: "health_check: { enabled: false }",
        ..Setup::default()
    });
    let lines = login(&p);
    assert!(lines[0].starts_with("L1 NO [UNAVAILABLE] "), "{lines:?}");
    assert!(p.log().contains("does not offer STARTTLS"));
    assert!(!b.saw_user("alice"));
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn a_client_certificate_for_backends_that_require_one() {
    common::backend::ensure_installed();
    let dir = pki_dir("mtls");
    let server = make_pki(&dir, "server");
    let client = make_pki(&dir, "client");
    let b = tls_backend_with("tls-mtls", &server, None, Some(&client.0));
    let line = |with_cert: bool| {
        let cert = if with_cert {
            format!(
                ", tls_client_cert: \"{}\", tls_client_key: \"{}\"",
                client.1.display(),
                client.2.display()
            )
        } else {
            String::new()
        };
        format!(
            "    - {{ name: tls-mtls, address: \"{}\", tls: starttls, tls_ca_file: \"{}\", tls_server_name: localhost{cert} }}\n",
            b.addr(),
            server.0.display()
        )
    };
    let without = postern_with(line(false));
    let lines = login(&without);
    assert!(lines[0].starts_with("L1 NO [UNAVAILABLE] "), "{lines:?}");
    drop(without);
    let with = postern_with(line(true));
    let lines = login(&with);
    assert!(lines.last().unwrap().starts_with("L1 OK"), "{lines:?}");
    let _ = std::fs::remove_dir_all(dir);
}
