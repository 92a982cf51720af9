//! Client TLS: ALPN rules (RFC 9325), SNI certificate choice (and 100 000
//! random SNI names with flat memory), and the self-signed certificate
//! made on first start.

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
    // Counted as the refused handshake ends, which may be after the
    // client saw the alert.
    let refused = p.wait_metric(
        "postern_tls_handshake_failures_total{listener=\"imaps\",reason=\"alpn\"}",
        |v| v >= 1.0,
    );
    assert_eq!(refused, 1.0, "{}", p.metrics_text());
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

/// Three certificates: the default, `mail.example.com` and
/// `*.example.org`, written under `dir`; the `tls:` block and the DER of
/// each.
fn sni_certificates(dir: &std::path::Path) -> (String, Vec<Vec<u8>>) {
    std::fs::create_dir_all(dir).unwrap();
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
    (tls, ders)
}

#[test]
fn sni_chooses_the_certificate() {
    common::backend::ensure_installed();
    let dir = std::env::temp_dir().join(format!("postern-test-sni-{}", std::process::id()));
    let (tls, ders) = sni_certificates(&dir);
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

/// 100 000 full handshakes, each with a random SNI name: every one gets
/// the certificate its name calls for, and Postern's memory stays flat
/// (nothing is kept per name).
#[test]
fn a_hundred_thousand_random_sni_names_keep_memory_flat() {
    use std::time::{Duration, Instant};
    const NAMES: usize = 100_000;
    const ROUND: usize = 10_000;
    const WORKERS: usize = 3;
    const WARM: usize = 20_000;
    const BOUND: u64 = 4 << 20;
    common::backend::ensure_installed();
    let dir = std::env::temp_dir().join(format!("postern-test-sni-flood-{}", std::process::id()));
    let (tls, ders) = sni_certificates(&dir);
    let (_b, p) = start("sni-flood", &tls);
    let mut config = (*common::client::client_config(&[b"imap"])).clone();
    // Full handshakes only: a resumed one would not show the certificate.
    config.resumption = rustls::client::Resumption::disabled();
    let config = std::sync::Arc::new(config);
    let started = Instant::now();
    let mut samples = Vec::new();
    // Each worker's random state, carried from round to round.
    let mut states: Vec<u64> = (0..WORKERS)
        .map(|w| 0x2545_F491_4F6C_DD1D ^ (w as u64 + 1).wrapping_mul(0x9E37_79B9))
        .collect();
    // Rounds of 10 000 handshakes; Postern's memory is sampled between
    // them, once it has closed every connection: a loaded Postern lagging
    // behind its clients holds their TLS state a while, which is no growth.
    for round in 0..NAMES / ROUND {
        std::thread::scope(|scope| {
            for (w, x) in states.iter_mut().enumerate() {
                let (config, ders, p) = (&config, &ders, &p);
                scope.spawn(move || {
                    let mut next = move || {
                        *x ^= *x << 13;
                        *x ^= *x >> 7;
                        *x ^= *x << 17;
                        *x
                    };
                    let label = |next: &mut dyn FnMut() -> u64| -> String {
                        let len = 6 + next() % 20;
                        (0..len)
                            .map(|_| {
                                b"abcdefghijklmnopqrstuvwxyz0123456789-"[(next() % 36) as usize]
                                    as char
                            })
                            .collect()
                    };
                    for _ in 0..ROUND / WORKERS + usize::from(w < ROUND % WORKERS) {
                        let (name, want) = match next() % 4 {
                            0 => (format!("{}.example.org", label(&mut next)), 2),
                            1 => (
                                "mail.example.com"
                                    .chars()
                                    .map(|c| {
                                        if next() % 2 == 0 {
                                            c.to_ascii_uppercase()
                                        } else {
                                            c
                                        }
                                    })
                                    .collect(),
                                1,
                            ),
                            2 => (format!("{}.{}.test", label(&mut next), label(&mut next)), 0),
                            _ => (
                                format!("{}.{}.example.org", label(&mut next), label(&mut next)),
                                0,
                            ),
                        };
                        let mut conn = rustls::ClientConnection::new(
                            std::sync::Arc::clone(config),
                            name.clone().try_into().unwrap(),
                        )
                        .unwrap();
                        // A new source address every round, so closed
                        // connections in TIME_WAIT never exhaust the ports.
                        let from = format!("127.0.{}.{}", w + 1, 1 + round);
                        let mut sock = common::client::tcp_from(&from, p.imaps);
                        while conn.is_handshaking() {
                            conn.complete_io(&mut sock)
                                .unwrap_or_else(|e| panic!("{name}: {e}"));
                        }
                        let served = conn.peer_certificates().unwrap()[0].as_ref();
                        assert!(served == ders[want], "{name} got the wrong certificate");
                        // A guard against a hang, not a speed limit: this
                        // is slow under a sanitizer on a loaded machine.
                        assert!(
                            started.elapsed() < Duration::from_secs(1800),
                            "bounded in time"
                        );
                    }
                });
            }
        });
        common::wait_until("every connection closed", common::SETTLE, || {
            p.metric("postern_sessions_active{listener=\"imaps\"}") == 0.0
        });
        samples.push(((round + 1) * ROUND, p.rss_bytes()));
    }
    let elapsed = started.elapsed();
    eprintln!(
        "{NAMES} handshakes with random SNI names in {elapsed:.1?} ({:.0}/s); RSS KiB by count: {:?}",
        NAMES as f64 / elapsed.as_secs_f64(),
        samples.iter().map(|(n, r)| (n, r / 1024)).collect::<Vec<_>>()
    );
    let warm = samples.iter().find(|(n, _)| *n == WARM).unwrap().1;
    let last = samples.last().unwrap().1;
    assert!(
        !common::postern::rss_is_meaningful() || last < warm + BOUND,
        "RSS grew {} KiB over {} handshakes after warm-up",
        (last.saturating_sub(warm)) / 1024,
        NAMES - WARM
    );
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

/// The key exchange a TLS 1.3 client with these groups gets.
fn negotiated_group(
    port: u16,
    provider: rustls::crypto::CryptoProvider,
    groups: &[&'static dyn rustls::crypto::SupportedKxGroup],
) -> rustls::NamedGroup {
    let mut provider = provider;
    provider.kx_groups = groups.to_vec();
    let config = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(provider))
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(common::client::accept_any())
        .with_no_client_auth();
    let conn =
        rustls::ClientConnection::new(std::sync::Arc::new(config), "localhost".try_into().unwrap())
            .unwrap();
    let mut tls = rustls::StreamOwned::new(conn, tcp(port));
    while tls.conn.is_handshaking() {
        tls.conn.complete_io(&mut tls.sock).unwrap();
    }
    tls.conn.negotiated_key_exchange_group().unwrap().name()
}

/// The hybrid post-quantum key exchange for clients that send a key share
/// for it, X25519 or P-256 for those that do not (no retry round trip).
#[test]
fn post_quantum_key_exchange_for_clients_that_offer_it() {
    use rustls::crypto::aws_lc_rs::{default_provider, kx_group};
    use rustls::NamedGroup;
    let (_b, p) = start("pq", "");
    assert_eq!(
        negotiated_group(
            p.imaps,
            default_provider(),
            &[kx_group::X25519MLKEM768, kx_group::X25519]
        ),
        NamedGroup::X25519MLKEM768
    );
    assert_eq!(
        negotiated_group(
            p.imaps,
            default_provider(),
            &[kx_group::X25519, kx_group::X25519MLKEM768]
        ),
        NamedGroup::X25519,
        "a client that sends its key share for X25519 gets it, with no extra round trip"
    );
    assert_eq!(
        negotiated_group(
            p.imaps,
            rustls::crypto::ring::default_provider(),
            &[rustls::crypto::ring::kx_group::X25519]
        ),
        NamedGroup::X25519
    );
    assert_eq!(
        negotiated_group(
            p.imaps,
            rustls::crypto::ring::default_provider(),
            &[rustls::crypto::ring::kx_group::SECP256R1]
        ),
        NamedGroup::secp256r1
    );
}
