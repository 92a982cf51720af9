//! Client TLS: ALPN rules (RFC 9325), SNI certificate choice, and the
//! self-signed certificate made on first start.

mod common;

use common::backend::DovecotBackend;
use common::client::{tcp, tls_over, Client};
use common::postern::{Postern, PASSWORD};

fn start(name: &str, tls: &str) -> (DovecotBackend, Postern) {
    common::postern::alice_behind(name, "", tls)
}

#[test]
fn alpn_offering_only_other_protocols_is_refused() {
    let (_b, p) = start("alpn", "");
    let err = tls_over(tcp(p.imaps), "localhost", &[b"h2", b"http/1.1"]).expect_err("refused");
    assert!(
        err.to_string()
            .to_lowercase()
            .contains("noapplicationprotocol")
            || err.to_string().contains("NoApplicationProtocol"),
        "{err}"
    );
    assert!(tls_over(tcp(p.imaps), "localhost", &[b"h2", b"imap"]).is_ok());
    assert!(
        tls_over(tcp(p.imaps), "localhost", &[]).is_ok(),
        "no ALPN is fine"
    );
    let metrics = p.metrics_text();
    assert!(
        metrics
            .contains("postern_tls_handshake_failures_total{listener=\"imaps\",reason=\"alpn\"} 1"),
        "{metrics}"
    );
}

#[test]
fn self_signed_certificate_is_made_on_first_start_and_served() {
    let (_b, p) = start("self-signed", "");
    let pem = std::fs::read(p.cert_path()).expect("certificate written on first start");
    let tls = tls_over(tcp(p.imaps), "localhost", &[b"imap"]).unwrap();
    let served = tls.conn.peer_certificates().unwrap()[0].clone();
    let on_disk = rustls_pki_types::CertificateDer::from_pem_slice(&pem);
    use rustls_pki_types::pem::PemObject;
    assert_eq!(served.as_ref(), on_disk.unwrap().as_ref());
}

#[test]
fn sni_chooses_the_certificate() {
    common::backend::ensure_installed();
    let dir = std::env::temp_dir().join(format!("postern-test-sni-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut ders = Vec::new();
    for (i, name) in ["default.test", "mail.example.com", "*.example.org"]
        .iter()
        .enumerate()
    {
        let made = rcgen::generate_simple_self_signed(vec![name.to_string()]).unwrap();
        std::fs::write(dir.join(format!("{i}.crt")), made.cert.pem()).unwrap();
        std::fs::write(dir.join(format!("{i}.key")), made.key_pair.serialize_pem()).unwrap();
        ders.push(made.cert.der().to_vec());
    }
    let d = dir.display();
    let tls = format!(
        "tls:\n  certificates:\n    - {{ cert: {d}/0.crt, key: {d}/0.key }}\n    - {{ cert: {d}/1.crt, key: {d}/1.key, names: [mail.example.com] }}\n    - {{ cert: {d}/2.crt, key: {d}/2.key, names: [\"*.example.org\"] }}"
    );
    let (_b, p) = start("sni", &tls);
    let served = |sni: &str| {
        let s = tls_over(tcp(p.imaps), sni, &[b"imap"]).unwrap();
        s.conn.peer_certificates().unwrap()[0].to_vec()
    };
    assert_eq!(served("mail.example.com"), ders[1]);
    assert_eq!(served("imap.example.org"), ders[2]);
    assert_eq!(served("unknown.test"), ders[0]);
    // And a session works through the SNI-chosen certificate.
    let (mut c, _) = Client::imaps(p.imaps);
    assert!(c
        .login("alice", PASSWORD)
        .last()
        .unwrap()
        .starts_with("L1 OK"));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn tls12_clients_are_served() {
    let (_b, p) = start("tls12", "");
    let config = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS12])
    .unwrap()
    .dangerous()
    .with_custom_certificate_verifier(common::client::accept_any())
    .with_no_client_auth();
    let conn =
        rustls::ClientConnection::new(std::sync::Arc::new(config), "localhost".try_into().unwrap())
            .unwrap();
    let mut tls = rustls::StreamOwned::new(conn, tcp(p.imaps));
    while tls.conn.is_handshaking() {
        tls.conn.complete_io(&mut tls.sock).unwrap();
    }
    assert_eq!(
        tls.conn.protocol_version(),
        Some(rustls::ProtocolVersion::TLSv1_2)
    );
}
