//! The client's address through load balancers: PROXY protocol headers in
//! (v1 and v2, only from trusted networks, bounded in time) and out (v2 to
//! a Dovecot listening with `haproxy = yes`, which logs the real client). A
//! client's own `ID ("x-originating-ip" …)` is never taken for its address.

mod common;

use std::io::Write;
use std::net::SocketAddr;

use common::backend::DovecotBackend;
use common::client::{tcp_from, tls_over, Client};
use common::postern::{user, Postern, Setup, PASSWORD};
use postern::proxy_protocol::v2_header;

fn behind_balancer(name: &str) -> (DovecotBackend, Postern) {
    common::backend::ensure_installed();
    let b = DovecotBackend::start_with_users(name, &[("alice", PASSWORD)]);
    let p = Postern::start(Setup {
        backends: &[&b],
        users: &user("alice"),
        // Long enough that a client descheduled between connecting and
        // sending its first bytes on a loaded machine is not taken for silent.
        imaps_options: "proxy_protocol: { trusted_networks: [127.0.0.1/32], timeout: 2s }",
        ..Setup::default()
    });
    (b, p)
}

#[test]
fn a_trusted_balancer_states_the_client_address_in_v1_or_v2() {
    let (b, p) = behind_balancer("pp-in");
    let source: SocketAddr = "192.0.2.7:40001".parse().unwrap();
    let destination: SocketAddr = "198.51.100.1:993".parse().unwrap();
    let headers = [
        v2_header(Some((source, destination))),
        b"PROXY TCP4 192.0.2.8 198.51.100.1 40002 993\r\n".to_vec(),
    ];
    for header in &headers {
        let mut tcp = tcp_from("127.0.0.1", p.imaps);
        tcp.write_all(header).unwrap();
        let tls = tls_over(tcp, "localhost", &[b"imap"]).expect("TLS after the header");
        let mut c = Client::from_stream(tls);
        assert!(c.line().starts_with("* OK"));
        // What the client claims about itself is only logged, never forwarded.
        let id = c.command("i", "ID (\"x-originating-ip\" \"203.0.113.66\")");
        assert!(id.last().unwrap().starts_with("i OK"), "{id:?}");
        assert!(c
            .login("alice", PASSWORD)
            .last()
            .unwrap()
            .starts_with("L1 OK"));
        c.command("Z", "LOGOUT");
    }
    let logins = b.wait_logins(2);
    assert_eq!(logins.len(), 2, "{logins:?}");
    assert!(logins[0].contains("rip=192.0.2.7"), "{logins:?}");
    assert!(logins[1].contains("rip=192.0.2.8"), "{logins:?}");
    assert!(!logins.iter().any(|l| l.contains("203.0.113.66")));
    p.wait_for_log("session ended client=192.0.2.7:40001");
    p.wait_for_log("session ended client=192.0.2.8:40002");
}

#[test]
fn untrusted_senders_bad_headers_and_silence_are_closed() {
    let (_b, p) = behind_balancer("pp-refuse");
    let header = v2_header(Some((
        "192.0.2.7:1".parse().unwrap(),
        "198.51.100.1:993".parse().unwrap(),
    )));
    // From 127.0.0.2, outside the trusted network: closed, header or not.
    let mut tcp = tcp_from("127.0.0.2", p.imaps);
    let _ = tcp.write_all(&header);
    assert!(tls_over(tcp, "localhost", &[b"imap"]).is_err());
    // Trusted, but no header: a TLS ClientHello is not one.
    assert!(tls_over(tcp_from("127.0.0.1", p.imaps), "localhost", &[b"imap"]).is_err());
    // Trusted, and silent past the header timeout.
    let mut silent = Client::from_stream(tcp_from("127.0.0.1", p.imaps));
    assert!(silent.closed(), "closed after the 2 s header timeout");
    for reason in [
        "proxy_untrusted",
        "proxy_header_invalid",
        "proxy_header_timeout",
    ] {
        let sample = format!("postern_sessions_ended_total{{reason=\"{reason}\"}}");
        assert_eq!(p.wait_metric(&sample, |v| v >= 1.0), 1.0, "{reason}");
    }
}

#[test]
fn backends_with_proxy_protocol_see_the_client_address_and_pass_checks() {
    common::backend::ensure_installed();
    let b = DovecotBackend::start_with_env(
        "pp-out",
        &[("alice", PASSWORD)],
        &[("DOVECOT_HAPROXY", "1")],
    );
    let pool = format!(
        "    - {{ name: pp-out, address: \"{}\", proxy_protocol: true }}\n",
        b.addr()
    );
    let p = Postern::start(Setup {
        pool_lines: &pool,
        users: &user("alice"),
        // Only the PROXY header can carry the address now.
        backend_options: "forward_client_address: none\nhealth_check: { interval: 200ms }",
        ..Setup::default()
    });
    let tls = tls_over(tcp_from("127.0.0.2", p.imaps), "localhost", &[b"imap"]).unwrap();
    let mut c = Client::from_stream(tls);
    assert!(c.line().starts_with("* OK"));
    assert!(c
        .login("alice", PASSWORD)
        .last()
        .unwrap()
        .starts_with("L1 OK"));
    let logins = b.wait_logins(1);
    let login = &logins[0];
    assert!(login.contains("rip=127.0.0.2"), "{login}");
    // Health checks send a LOCAL header, which Dovecot accepts.
    p.wait_metric(
        "postern_backend_checks_total{backend=\"pp-out\",result=\"pass\"}",
        |v| v >= 2.0,
    );
    // Marked up just after a pass is counted, not with it.
    p.wait_metric("postern_backend_up{backend=\"pp-out\"}", |v| v == 1.0);
}
