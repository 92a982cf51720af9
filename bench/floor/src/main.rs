//! postern-floor: what relaying TLS costs on this machine at the least, and
//! what each rustls crypto provider costs, for `bench/run`.
//!
//! Every figure is the CPU time of the thread doing the work
//! (`CLOCK_THREAD_CPUTIME_ID`), so a busy machine slows the run but moves
//! the figures less than wall time would. Prints a Markdown table and one
//! line of JSON (prefixed `json: `). Runs in-process on loopback only;
//! every loop is bounded by time or bytes.
//!
//! - full TLS 1.3 handshakes, server side only (the client's work is not
//!   counted), ECDSA P-256, AES-128-GCM first as Postern configures it:
//!   ring with X25519, aws-lc-rs with X25519 and with X25519MLKEM768;
//! - AES-128-GCM record encryption by the server (16 KiB records), which is
//!   what the backend-to-client direction of a relay does per byte;
//! - a plain relay thread on loopback: read 64 KiB from one socket, write
//!   it to another; the kernel's two copies and the TCP work per GiB.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use rustls::{ClientConfig, ClientConnection, RootCertStore, ServerConfig, ServerConnection};

const GIB: f64 = (1u64 << 30) as f64;

/// CPU time of the calling thread.
fn cpu() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid out-pointer to a timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

struct Case {
    name: &'static str,
    provider: CryptoProvider,
    /// Key exchange groups, the client's first one is the one it sends.
    groups: Vec<&'static dyn rustls::crypto::SupportedKxGroup>,
}

struct Figures {
    handshake_ms: f64,
    group: String,
    encrypt_s_per_gib: f64,
}

fn configs(
    case: &Case,
    cert: &CertificateDer<'static>,
    key: &[u8],
) -> (Arc<ServerConfig>, Arc<ClientConfig>) {
    let mut provider = case.provider.clone();
    // As Postern: AES-128-GCM first, the server's order.
    provider
        .cipher_suites
        .sort_by_key(|s| !format!("{:?}", s.suite()).contains("AES_128_GCM"));
    provider.kx_groups = case.groups.clone();
    let provider = Arc::new(provider);
    let mut server = ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("TLS 1.3")
        .with_no_client_auth()
        .with_single_cert(
            vec![cert.clone()],
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.to_vec())),
        )
        .expect("the certificate");
    server.ignore_client_order = true;
    server.send_tls13_tickets = 0;
    let mut roots = RootCertStore::empty();
    roots.add(cert.clone()).expect("the root");
    let mut client = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("TLS 1.3")
        .with_root_certificates(roots)
        .with_no_client_auth();
    client.resumption = rustls::client::Resumption::disabled();
    (Arc::new(server), Arc::new(client))
}

/// Runs one handshake in memory; returns the server's CPU time.
fn handshake(
    server: &Arc<ServerConfig>,
    client: &Arc<ClientConfig>,
) -> (Duration, ServerConnection, ClientConnection) {
    let mut c =
        ClientConnection::new(client.clone(), ServerName::try_from("localhost").unwrap()).unwrap();
    let t = cpu();
    let mut s = ServerConnection::new(server.clone()).unwrap();
    let mut spent = cpu() - t;
    let mut wire = Vec::with_capacity(8192);
    for _ in 0..16 {
        if !(c.is_handshaking() || s.is_handshaking()) {
            break;
        }
        wire.clear();
        while c.wants_write() {
            c.write_tls(&mut wire).unwrap();
        }
        let t = cpu();
        let mut r = &wire[..];
        while !r.is_empty() {
            s.read_tls(&mut r).unwrap();
        }
        s.process_new_packets().unwrap();
        wire.clear();
        while s.wants_write() {
            s.write_tls(&mut wire).unwrap();
        }
        spent += cpu() - t;
        let mut r = &wire[..];
        while !r.is_empty() {
            c.read_tls(&mut r).unwrap();
        }
        c.process_new_packets().unwrap();
    }
    assert!(
        !s.is_handshaking() && !c.is_handshaking(),
        "handshake did not finish"
    );
    (spent, s, c)
}

fn measure(case: &Case, cert: &CertificateDer<'static>, key: &[u8], secs: f64) -> Figures {
    let (server, client) = configs(case, cert, key);
    let (mut n, mut spent) = (0u32, Duration::ZERO);
    let started = Instant::now();
    let mut last = None;
    while started.elapsed().as_secs_f64() < secs || n < 10 {
        let (t, s, c) = handshake(&server, &client);
        spent += t;
        n += 1;
        last = Some((s, c));
    }
    let (mut s, _c) = last.expect("at least one handshake");
    let group = format!(
        "{:?}",
        s.negotiated_key_exchange_group().map(|g| g.name()).unwrap()
    );
    // Encryption: 16 KiB records, the output discarded.
    s.set_buffer_limit(None);
    let chunk = vec![7u8; 16 * 1024];
    let total = 512usize << 20;
    let mut out = Vec::with_capacity(1 << 20);
    let mut done = 0;
    let t = cpu();
    while done < total {
        out.clear();
        for _ in 0..16 {
            s.writer().write_all(&chunk).unwrap();
        }
        while s.wants_write() {
            s.write_tls(&mut out).unwrap();
        }
        done += 16 * chunk.len();
    }
    let encrypt = cpu() - t;
    Figures {
        handshake_ms: spent.as_secs_f64() * 1000.0 / n as f64,
        group,
        encrypt_s_per_gib: encrypt.as_secs_f64() / (done as f64 / GIB),
    }
}

/// CPU per GiB of a thread that reads 64 KiB from one loopback socket and
/// writes it to another (the peers run in their own threads).
fn plain_relay(bytes: usize) -> f64 {
    let la = TcpListener::bind("127.0.0.1:0").unwrap();
    let lb = TcpListener::bind("127.0.0.1:0").unwrap();
    let (aa, ba) = (la.local_addr().unwrap(), lb.local_addr().unwrap());
    let source = std::thread::spawn(move || {
        let mut s = TcpStream::connect(aa).unwrap();
        let buf = vec![7u8; 64 * 1024];
        let mut sent = 0;
        while sent < bytes {
            s.write_all(&buf).unwrap();
            sent += buf.len();
        }
    });
    let sink = std::thread::spawn(move || {
        let mut s = TcpStream::connect(ba).unwrap();
        let mut buf = vec![0u8; 256 * 1024];
        let mut got = 0;
        while got < bytes {
            match s.read(&mut buf).unwrap() {
                0 => break,
                n => got += n,
            }
        }
    });
    let (mut a, _) = la.accept().unwrap();
    let (mut b, _) = lb.accept().unwrap();
    let mut buf = vec![0u8; 64 * 1024];
    let t = cpu();
    let mut moved = 0;
    while moved < bytes {
        match a.read(&mut buf).unwrap() {
            0 => break,
            n => {
                b.write_all(&buf[..n]).unwrap();
                moved += n;
            }
        }
    }
    let spent = cpu() - t;
    drop(b);
    source.join().unwrap();
    sink.join().unwrap();
    spent.as_secs_f64() / (moved as f64 / GIB)
}

fn main() {
    let secs: f64 = std::env::args()
        .nth(1)
        .map(|s| s.parse().expect("seconds per handshake case"))
        .unwrap_or(3.0);
    let made =
        rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).expect("a certificate");
    let cert: CertificateDer<'static> = made.cert.der().clone();
    let key = made.key_pair.serialize_der();
    use rustls::crypto::{aws_lc_rs, ring};
    let cases = [
        Case {
            name: "ring",
            provider: ring::default_provider(),
            groups: vec![ring::kx_group::X25519],
        },
        Case {
            name: "aws-lc-rs",
            provider: aws_lc_rs::default_provider(),
            groups: vec![aws_lc_rs::kx_group::X25519],
        },
        Case {
            name: "aws-lc-rs",
            provider: aws_lc_rs::default_provider(),
            groups: vec![
                aws_lc_rs::kx_group::X25519MLKEM768,
                aws_lc_rs::kx_group::X25519,
            ],
        },
    ];
    println!("| provider | key exchange | server CPU ms per full handshake | handshakes/s per core | AES-128-GCM encrypt CPU s/GiB |");
    println!("|---|---|---|---|---|");
    let mut json = Vec::new();
    for case in &cases {
        let f = measure(case, &cert, &key, secs);
        println!(
            "| {} | {} | {:.3} | {:.0} | {:.3} |",
            case.name,
            f.group,
            f.handshake_ms,
            1000.0 / f.handshake_ms,
            f.encrypt_s_per_gib
        );
        json.push(format!(
            "{{\"provider\":\"{}\",\"group\":\"{}\",\"handshake_ms\":{:.4},\"encrypt_s_per_gib\":{:.4}}}",
            case.name, f.group, f.handshake_ms, f.encrypt_s_per_gib
        ));
    }
    // The median of three runs: one can meet a busy moment.
    let mut relay: Vec<f64> = (0..3).map(|_| plain_relay(1 << 30)).collect();
    relay.sort_by(f64::total_cmp);
    let relay = relay[1];
    println!();
    println!(
        "plain loopback relay thread (read 64 KiB, write): {relay:.3} CPU s/GiB (median of 3)"
    );
    println!(
        "json: {{\"providers\":[{}],\"plain_relay_s_per_gib\":{relay:.4}}}",
        json.join(",")
    );
}
