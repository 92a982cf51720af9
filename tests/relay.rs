//! The relay after login: large messages byte for byte, pipelined commands
//! kept, half-closes passed on, the idle limit, and byte counters.

mod common;

use std::time::Duration;

use common::backend::DovecotBackend;
use common::client::Client;
use common::postern::{Postern, PASSWORD};
use sha2::{Digest, Sha256};

fn start(name: &str, extra: &str) -> (DovecotBackend, Postern) {
    common::postern::alice_behind(name, extra, "")
}

fn logged_in(p: &Postern) -> Client {
    Client::logged_in(p.imaps, "alice")
}

/// A 10 MiB message of CRLF lines with varied content.
fn big_message() -> Vec<u8> {
    let mut m = b"From: big@example.com\r\nSubject: ten mebibytes\r\n\r\n".to_vec();
    let mut i = 0u64;
    while m.len() < 10 * 1024 * 1024 - 80 {
        m.extend_from_slice(
            format!(
                "{i:016x} {:064x}\r\n",
                i.wrapping_mul(0x9e37_79b9_7f4a_7c15)
            )
            .as_bytes(),
        );
        i += 1;
    }
    m
}

#[test]
fn ten_mebibyte_message_round_trips_intact() {
    let (_b, p) = start("big", "");
    let message = big_message();
    let sent_hash = Sha256::digest(&message);

    let mut c = logged_in(&p);
    c.send(format!("a APPEND INBOX {{{}}}\r\n", message.len()).as_bytes());
    assert!(c.line().starts_with('+'));
    c.send(&message);
    c.send(b"\r\n");
    assert!(c.until_tagged("a").last().unwrap().starts_with("a OK"));
    c.command("b", "LOGOUT");
    drop(c);

    let mut c = logged_in(&p);
    assert!(c
        .command("s", "SELECT INBOX")
        .last()
        .unwrap()
        .starts_with("s OK"));
    let body = c.fetch_first_message();
    assert_eq!(body.len(), message.len());
    assert_eq!(
        Sha256::digest(&body),
        sent_hash,
        "SHA-256 of the fetched message"
    );
    c.command("z", "LOGOUT");
    drop(c);
    // Both sessions end in order after LOGOUT: whichever side closes
    // first, neither is an error or a lost backend.
    common::wait_until("both sessions have ended", common::SETTLE, || {
        p.log().matches("session ended").count() == 2
    });
    let log = p.log();
    for line in log.lines().filter(|l| l.contains("session ended")) {
        assert!(
            line.contains("reason=\"backend_closed\"") || line.contains("reason=\"client_closed\""),
            "{line}"
        );
    }
    // Counted as the bytes flow and when each session ends: waited for,
    // not read once.
    p.wait_metric(
        "postern_relay_bytes_total{direction=\"backend_to_client\"}",
        |v| v >= message.len() as f64,
    );
    p.wait_metric(
        "postern_relay_bytes_total{direction=\"client_to_backend\"}",
        |v| v >= message.len() as f64,
    );
}

#[test]
fn commands_pipelined_after_login_reach_the_backend() {
    let (_b, p) = start("pipelined", "");
    let (mut c, _) = Client::imaps(p.imaps);
    c.send(format!("a LOGIN alice {PASSWORD}\r\nb SELECT INBOX\r\nc LOGOUT\r\n").as_bytes());
    assert!(c
        .until_tagged("a")
        .last()
        .unwrap()
        .starts_with("a OK [CAPABILITY"));
    assert!(c.until_tagged("b").last().unwrap().starts_with("b OK"));
    assert!(c.until_tagged("c").last().unwrap().starts_with("c OK"));
}

#[test]
fn client_half_close_still_gets_the_backend_answer() {
    let (_b, p) = start("half-close", "");
    let s = common::client::tcp(p.imaps);
    let mut tls = common::client::tls_over(s, "localhost", &[b"imap"]).unwrap();
    use std::io::{BufRead, BufReader, Write};
    tls.write_all(format!("a LOGIN alice {PASSWORD}\r\nz LOGOUT\r\n").as_bytes())
        .unwrap();
    tls.flush().unwrap();
    tls.conn.send_close_notify();
    tls.conn.complete_io(&mut tls.sock).unwrap();
    tls.sock.shutdown(std::net::Shutdown::Write).unwrap();
    let mut lines = Vec::new();
    let mut r = BufReader::new(tls);
    loop {
        let mut line = String::new();
        match r.read_line(&mut line) {
            Ok(0) | Err(_) => break,
            Ok(_) => lines.push(line),
        }
    }
    assert!(lines.iter().any(|l| l.starts_with("* BYE")), "{lines:?}");
    assert!(lines.iter().any(|l| l.starts_with("z OK")), "{lines:?}");
}

#[test]
fn idle_session_is_closed_after_the_idle_limit() {
    let (_b, p) = start("idle", "limits:\n  idle_timeout: 1s\n");
    let mut c = logged_in(&p);
    assert!(
        c.closed(),
        "closed by the idle limit within the read timeout"
    );
    p.wait_for_log("reason=\"idle_timeout\"");
    let ended = p.wait_metric(
        "postern_sessions_ended_total{reason=\"idle_timeout\"}",
        |v| v >= 1.0,
    );
    assert_eq!(ended, 1.0);
}

#[test]
fn idle_command_keeps_the_session_while_traffic_flows() {
    // 6 x 800 ms of traffic outlasts the 4 s limit; each gap leaves 3 s
    // of slack for a loaded machine's round trips.
    let (_b, p) = start("idle-cmd", "limits:\n  idle_timeout: 4s\n");
    let mut c = logged_in(&p);
    c.select_and_idle();
    // Traffic before the limit keeps the session open past it.
    for _ in 0..6 {
        std::thread::sleep(Duration::from_millis(800)); // pacing client traffic, not synchronisation
        c.send(b"DONE\r\n");
        assert!(c.until_tagged("i").last().unwrap().starts_with("i OK"));
        c.send(b"i IDLE\r\n");
        assert!(c.line().starts_with('+'));
    }
    c.send(b"DONE\r\n");
    assert!(c.until_tagged("i").last().unwrap().starts_with("i OK"));
}
