//! TLS from Postern to real Dovecot backends, with a CA made by the test:
//! STARTTLS and implicit TLS work and carry the login; a certificate from
//! another CA, or a backend that does not offer STARTTLS, fails closed — the
//! backend never sees the user's credentials.

mod common;

use std::path::{Path, PathBuf};

use common::backend::DovecotBackend;
use common::client::Client;
use common::pki::{make_pki, PkiDir};
use common::postern::{user, Postern, Setup, PASSWORD};
use common::SETTLE;

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
    let dir = PkiDir::new("starttls");
    let pki = make_pki(&dir, "good");
    let b = tls_backend("tls-st", &pki, None);
    let p = postern_with(format!(
        "    - {{ name: tls-st, address: \"{}\", tls: starttls, tls_ca_file: \"{}\", tls_server_name: localhost }}\n",
        b.addr(),
        pki.0.display()
    ));
    let lines = login(&p);
    assert!(lines.last().unwrap().starts_with("L1 OK"), "{lines:?}");
    let line = &b.wait_logins(1)[0];
    assert!(line.contains(", TLS"), "the login went over TLS: {line}");
    p.wait_metric(
        "postern_backend_checks_total{backend=\"tls-st\",result=\"pass\"}",
        |v| v >= 1.0,
    );
}

#[test]
fn implicit_tls_checks_the_address_when_no_name_is_given() {
    common::backend::ensure_installed();
    let dir = PkiDir::new("implicit");
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
    common::wait_until("the backend logs the login", SETTLE, || {
        b.logins().iter().any(|l| l.contains(", TLS"))
    });
}

#[test]
fn a_certificate_from_another_ca_fails_closed() {
    common::backend::ensure_installed();
    let dir = PkiDir::new("wrong");
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
    p.wait_metric(
        "postern_backend_logins_total{backend=\"tls-wrong\",result=\"tls_error\"}",
        |v| v >= 1.0,
    );
    b.settle_log();
    assert!(!b.saw_user("alice"), "no credentials reached the backend");
    p.wait_metric("postern_backend_up{backend=\"tls-wrong\"}", |v| v == 0.0);
}

#[test]
fn a_backend_without_starttls_gets_no_credentials() {
    common::backend::ensure_installed();
    let dir = PkiDir::new("missing");
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
    p.wait_for_log("does not offer STARTTLS");
    b.settle_log();
    assert!(!b.saw_user("alice"));
}

#[test]
fn a_client_certificate_for_backends_that_require_one() {
    common::backend::ensure_installed();
    let dir = PkiDir::new("mtls");
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
}

/// A one-connection STARTTLS backend that answers `STARTTLS` with its OK
/// and, in the same write, a forged capability line (as a man in the middle
/// could), then speaks TLS and accepts any login. Returns its port and
/// what it was sent over TLS.
fn injecting_backend(cert: &Path, key: &Path) -> (u16, std::thread::JoinHandle<String>) {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    use std::io::{BufRead, BufReader, Write};
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .unwrap()
        .map(Result::unwrap)
        .collect();
    let key = PrivateKeyDer::from_pem_file(key).unwrap();
    let config = rustls::ServerConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(chain, key)
    .unwrap();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let handle = std::thread::spawn(move || {
        let (mut tcp, _) = listener.accept().unwrap();
        // Generous: the session's steps come slowly on a loaded machine.
        tcp.set_read_timeout(Some(SETTLE)).unwrap();
        tcp.write_all(b"* OK [CAPABILITY IMAP4rev1 STARTTLS LOGINDISABLED] ready\r\n")
            .unwrap();
        let mut line = Vec::new();
        let mut byte = [0u8; 1];
        while !line.ends_with(b"\n") {
            std::io::Read::read_exact(&mut tcp, &mut byte).unwrap();
            line.push(byte[0]);
        }
        assert_eq!(line, b"S STARTTLS\r\n");
        tcp.write_all(b"S OK Begin TLS\r\n* CAPABILITY IMAP4rev1 AUTH=PLAIN INJECTED\r\n")
            .unwrap();
        let conn = rustls::ServerConnection::new(std::sync::Arc::new(config)).unwrap();
        let mut tls = BufReader::new(rustls::StreamOwned::new(conn, tcp));
        let mut seen = String::new();
        loop {
            let mut line = String::new();
            if tls.read_line(&mut line).unwrap_or(0) == 0 {
                break;
            }
            seen.push_str(&line);
            let tag = line.split(' ').next().unwrap_or("").to_owned();
            let answer = if line.contains(" CAPABILITY") {
                format!("* CAPABILITY IMAP4rev1 AUTH=PLAIN SASL-IR\r\n{tag} OK done\r\n")
            } else if line.contains(" LOGOUT") {
                format!("* BYE bye\r\n{tag} OK done\r\n")
            } else {
                format!("{tag} OK [CAPABILITY IMAP4rev1 GENUINE] done\r\n")
            };
            tls.get_mut().write_all(answer.as_bytes()).unwrap();
            tls.get_mut().flush().unwrap();
        }
        seen
    });
    (port, handle)
}

#[test]
fn lines_injected_after_the_starttls_ok_are_dropped() {
    let dir = PkiDir::new("inject");
    let pki = make_pki(&dir, "good");
    let (port, backend) = injecting_backend(&pki.1, &pki.2);
    let p = Postern::start(Setup {
        pool_lines: &format!(
            "    - {{ name: injecting, address: \"127.0.0.1:{port}\", tls: starttls, tls_ca_file: \"{}\", tls_server_name: localhost }}\n",
            pki.0.display()
        ),
        users: &user("alice"),
        // The scripted backend takes one connection: the session's.
        backend_options: "health_check: { enabled: false }",
        ..Setup::default()
    });
    let (mut c, _) = Client::imaps(p.imaps);
    let lines = c.login("alice", PASSWORD);
    let ok = lines.last().unwrap();
    assert!(
        ok.starts_with("L1 OK [CAPABILITY IMAP4rev1 GENUINE]"),
        "{lines:?}"
    );
    assert!(!lines.iter().any(|l| l.contains("INJECTED")), "{lines:?}");
    c.command("Z", "LOGOUT");
    drop(c);
    drop(p);
    let seen = backend.join().unwrap();
    // Capabilities were asked for again over TLS, not taken from the
    // forged line, and the login went over TLS only.
    assert!(seen.starts_with("P0 CAPABILITY\r\n"), "{seen}");
    assert!(seen.contains("AUTHENTICATE PLAIN"), "{seen}");
}
