//! Slow clients: connections that never start TLS, start it and stall, or
//! trickle their ClientHello a byte at a time are all cut at the handshake
//! deadline, which no trickle extends; and a client that stops reading
//! while its backend streams a 100 MiB message holds Postern's memory flat
//! (the backend is held back, nothing piles up) and, once it reads again,
//! gets every byte intact.

mod common;

use std::io::{BufRead, BufReader, ErrorKind, Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::client::{client_config, tcp, Client};
use common::postern::alice_behind;
use sha2::{Digest, Sha256};

/// The first flight of a real TLS client: its ClientHello record.
fn client_hello() -> Vec<u8> {
    let mut conn =
        rustls::ClientConnection::new(client_config(&[b"imap"]), "localhost".try_into().unwrap())
            .unwrap();
    let mut out = Vec::new();
    conn.write_tls(&mut out).unwrap();
    assert!(out.len() > 100, "a whole ClientHello");
    out
}

/// Blocks until the server closes `s` (EOF or reset), at most `limit`.
fn wait_closed(s: &mut TcpStream, limit: Duration) -> bool {
    let started = Instant::now();
    s.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let mut buf = [0u8; 4096];
    while started.elapsed() < limit {
        match s.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => continue,
            Err(_) => return true,
        }
    }
    false
}

const DEADLINE: Duration = Duration::from_secs(2);
/// A cut measured later than this is too late. Generous, as a loaded
/// machine is slow to accept, to fire the timer and to notice the close;
/// still below the default deadline (10 s) and far below the 25 s a
/// trickled ClientHello would take.
const CUT_BY: Duration = Duration::from_secs(8);
/// How long a connection is watched for its cut.
const WATCH: Duration = Duration::from_secs(20);

/// Watches `s` on a thread of its own from now on: the time from `at`
/// until the server closed it, if it did within `WATCH`.
fn watch(
    what: String,
    at: Instant,
    mut s: TcpStream,
) -> std::thread::JoinHandle<(String, Option<Duration>)> {
    std::thread::spawn(move || {
        let cut = wait_closed(&mut s, WATCH).then(|| at.elapsed());
        (what, cut)
    })
}

#[test]
fn handshakes_that_never_finish_are_cut_at_the_deadline() {
    let (_b, p) = alice_behind(
        "slow-handshake",
        "limits:\n  tls_handshake_timeout: 2s\n",
        "",
    );
    // 50 connections that never send a byte, each watched from the moment
    // it connected (taken before connecting: the deadline counts from the
    // accept, after it), so a slow setup below cannot delay noticing a cut.
    let mut cuts: Vec<_> = (0..50)
        .map(|i| {
            let at = Instant::now();
            watch(format!("silent #{i}"), at, tcp(p.imaps))
        })
        .collect();
    // A half handshake: a whole ClientHello, the server's answer read,
    // then nothing (no client Finished).
    let half_connected = Instant::now();
    let mut half = tcp(p.imaps);
    half.write_all(&client_hello()).unwrap();
    let mut first_flight = [0u8; 1024];
    assert!(half.read(&mut first_flight).unwrap() > 0, "ServerHello");
    // STARTTLS accepted, then no ClientHello (the deadline counts from
    // the OK).
    let mut upgraded = tcp(p.imap);
    let mut reader = BufReader::new(upgraded.try_clone().unwrap());
    let mut line = String::new();
    reader.read_line(&mut line).unwrap();
    // Taken before asking: the deadline counts from Postern's OK, which
    // comes after, however late this thread reads it.
    let upgraded_connected = Instant::now();
    upgraded.write_all(b"s STARTTLS\r\n").unwrap();
    line.clear();
    reader.read_line(&mut line).unwrap();
    assert!(line.starts_with("s OK"), "{line}");
    cuts.push(watch("half handshake".into(), half_connected, half));
    cuts.push(watch(
        "STARTTLS then silence".into(),
        upgraded_connected,
        upgraded,
    ));

    // A normal client is served meanwhile.
    let mut c = Client::logged_in(p.imaps, "alice");

    // A ClientHello trickled a byte every 100 ms would take 25 s or more;
    // the deadline counts from accept, so it ends at 2 s all the same.
    // Timed from before connecting: the accept comes after.
    let trickle_started = Instant::now();
    let mut trickle = tcp(p.imaps);
    trickle
        .set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    let hello = client_hello();
    let mut sent = 0;
    let mut buf = [0u8; 64];
    let trickle_cut = loop {
        assert!(
            trickle_started.elapsed() < WATCH,
            "the trickling client was never cut"
        );
        if sent < hello.len() {
            if trickle.write_all(&hello[sent..sent + 1]).is_err() {
                break trickle_started.elapsed();
            }
            sent += 1;
        }
        match trickle.read(&mut buf) {
            Ok(0) => break trickle_started.elapsed(),
            Ok(_) => panic!("a trickled partial ClientHello got an answer"),
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(_) => break trickle_started.elapsed(),
        }
    };
    assert!(sent < hello.len(), "cut before the ClientHello was whole");
    assert!(
        trickle_cut >= DEADLINE - Duration::from_millis(100) && trickle_cut < CUT_BY,
        "trickle cut after {trickle_cut:?}"
    );

    // Each was cut at its own deadline, give or take scheduling (they were
    // watched from the start, so the time is when each was cut).
    for handle in cuts {
        let (what, cut) = handle.join().unwrap();
        let cut = cut.unwrap_or_else(|| panic!("{what}: never cut"));
        assert!(
            cut >= DEADLINE - Duration::from_millis(100) && cut < CUT_BY,
            "{what}: cut after {cut:?}"
        );
    }
    common::wait_until("the failures counted", common::SETTLE, || {
        p.metric("postern_tls_handshake_failures_total{listener=\"imaps\",reason=\"timeout\"}")
            == 52.0
            && p.metric(
                "postern_tls_handshake_failures_total{listener=\"imap\",reason=\"timeout\"}",
            ) == 1.0
    });
    // The logged-in session was not touched by any of it.
    assert!(c.command("N", "NOOP").last().unwrap().starts_with("N OK"));
    // Only the logged-in session is left; a cut session leaves the gauge
    // a moment after its failure is counted.
    p.wait_metric("postern_sessions_active{listener=\"imaps\"}", |v| v == 1.0);
}

/// A 100 MiB message of printable lines, put straight into the backend's
/// maildir (appending it through the proxy would take longer).
fn big_message(len: usize) -> Vec<u8> {
    let mut m = b"From: big@example.com\r\nSubject: 100 MiB\r\n\r\n".to_vec();
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    while m.len() < len {
        for _ in 0..76 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            m.push(b'!' + (x % 90) as u8);
        }
        m.extend_from_slice(b"\r\n");
    }
    m
}

#[test]
fn a_client_that_stops_reading_holds_memory_flat_and_loses_nothing() {
    const SIZE: usize = 100 << 20;
    // 100 MiB piled up would show many times over; the slack is for the
    // allocator and TLS buffers on a loaded machine.
    const BOUND: u64 = 16 << 20;
    let message = big_message(SIZE);
    let digest = Sha256::digest(&message);
    let total = message.len();
    // The stalls below (1.5 s) stay well within it on a loaded machine.
    let (b, p) = alice_behind("slow-reader", "limits:\n  idle_timeout: 6s\n", "");
    // Written before the session starts (its idle timeout is short) next
    // to the maildir, and renamed in once it exists: Dovecot never sees a
    // part of it.
    let staged = b.dir.join("big.staged");
    std::fs::write(&staged, &message).unwrap();
    drop(message);
    let mut c = Client::logged_in(p.imaps, "alice");
    assert!(c
        .command("S", "SELECT INBOX")
        .last()
        .unwrap()
        .starts_with("S OK"));
    let new = b.dir.join("mail/alice/Maildir/new");
    let owner = std::fs::metadata(&new).unwrap();
    use std::os::unix::fs::MetadataExt;
    std::os::unix::fs::chown(&staged, Some(owner.uid()), Some(owner.gid())).unwrap();
    std::fs::rename(&staged, new.join("1700000000.big.test")).unwrap();
    // Dovecot finds it at a sync, which a NOOP asks for.
    common::wait_until("a NOOP reports the message", common::SETTLE, || {
        c.command("N", "NOOP").iter().any(|l| l == "* 1 EXISTS")
    });

    let baseline = p.rss_bytes();
    let mut peak = baseline;
    // The client asks for the message and reads nothing for 1.5 s (well
    // under the idle timeout): the relay must hold the backend back.
    c.send(b"F1 FETCH 1 BODY[]\r\n");
    let stalled = Instant::now();
    while stalled.elapsed() < Duration::from_millis(1500) {
        peak = peak.max(p.rss_bytes());
        std::thread::sleep(Duration::from_millis(50)); // sampling period
    }
    // Now it reads all of it, and every byte is the backend's.
    let head = c.line();
    assert!(
        head.starts_with("* 1 FETCH (") && head.contains("BODY[] {") && head.ends_with('}'),
        "{head}"
    );
    let len: usize = head
        .rsplit('{')
        .next()
        .unwrap()
        .trim_end_matches('}')
        .parse()
        .unwrap();
    assert_eq!(len, total, "{head}");
    let mut hasher = Sha256::new();
    let mut left = len;
    while left > 0 {
        let chunk = c.bytes(left.min(4 << 20));
        left -= chunk.len();
        hasher.update(&chunk);
        peak = peak.max(p.rss_bytes());
    }
    assert_eq!(hasher.finalize(), digest, "the message arrived unaltered");
    let done = c.until_tagged("F1");
    assert!(done.last().unwrap().starts_with("F1 OK"), "{done:?}");
    eprintln!(
        "stalled 1.5 s and read {len} bytes: RSS {} KiB before, peak {} KiB",
        baseline / 1024,
        peak / 1024
    );
    let bounded = common::postern::rss_is_meaningful();
    assert!(
        !bounded || peak - baseline < BOUND,
        "RSS grew by {} KiB while a client held 100 MiB back",
        (peak - baseline) / 1024
    );

    // The same again, but the client never reads: the idle timeout ends
    // the session, having sent only what the socket buffers hold.
    c.send(b"F2 FETCH 1 BODY[]\r\n");
    common::wait_until(
        "the stalled session to end at the idle timeout",
        common::SETTLE,
        || {
            peak = peak.max(p.rss_bytes());
            p.metric("postern_sessions_ended_total{reason=\"idle_timeout\"}") == 1.0
        },
    );
    let received = c.drain();
    assert!(
        received < SIZE / 4,
        "only socket buffers' worth reached the client: {received}"
    );
    assert!(
        !bounded || peak - baseline < BOUND,
        "{} KiB",
        (peak - baseline) / 1024
    );
    assert!(Client::login_ok(p.imaps, "alice"));
}
