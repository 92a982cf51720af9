//! Backend-side attacks: a scripted fake IMAP server stands in for a
//! compromised or broken backend. Postern sends no credentials to a
//! backend that will not do STARTTLS (omitted, NO, BAD or a `+`), refuses
//! a `* PREAUTH` greeting, keeps a backend's pre-login untagged data,
//! `[ALERT]` and `[REFERRAL]` from the client, and answers malformed,
//! endless or silent greetings with `NO [UNAVAILABLE]` within the login
//! timeout, without growing. It sends long credentials as literals only as
//! the backend allows them, and a backend's BYE and reset after it, even
//! cut across segments, end a session in order.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use common::client::Client;
use common::postern::{user_on, Postern, Setup, PASSWORD};

/// A backend that runs `script` on the first connection and returns what
/// the peer sent it until it closed (or 10 s passed).
fn fake_backend(
    script: impl FnOnce(&mut TcpStream, &mut BufReader<TcpStream>) + Send + 'static,
) -> (u16, JoinHandle<Vec<u8>>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let handle = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut reader = BufReader::new(s.try_clone().unwrap());
        script(&mut s, &mut reader);
        let mut rest = Vec::new();
        let _ = reader.read_to_end(&mut rest);
        rest
    });
    (port, handle)
}

/// Postern with alice pinned to the fake backend; `tls` is the backend's
/// `tls:` mode. The test setup's backend login timeout is 5 s.
fn postern_for(port: u16, tls: &str) -> Postern {
    let pool = format!("    - {{ name: fake, address: \"127.0.0.1:{port}\", tls: {tls} }}\n");
    Postern::start(Setup {
        users: &user_on("alice", "fake"),
        pool_lines: &pool,
        backend_options: "health_check: { enabled: false }",
        ..Setup::default()
    })
}

fn line(reader: &mut BufReader<TcpStream>) -> String {
    let mut l = String::new();
    let _ = reader.read_line(&mut l);
    l
}

fn tag_of(command: &str) -> &str {
    command.split(' ').next().unwrap_or("")
}

/// STARTTLS omitted, refused with NO or BAD, or answered with a `+`: the
/// login fails as unavailable and the backend never sees the password.
#[test]
fn no_credentials_to_a_backend_that_will_not_do_starttls() {
    let answers: [Option<&str>; 4] = [None, Some("NO not today"), Some("BAD what"), Some("+")];
    for answer in answers {
        // The line the script reads itself is not in what the backend
        // returns: it comes back here, to be checked with the rest.
        let (tell, first_line) = std::sync::mpsc::channel::<String>();
        let (port, backend) = fake_backend(move |s, r| {
            let caps = if answer.is_some() {
                "IMAP4rev1 STARTTLS"
            } else {
                "IMAP4rev1"
            };
            s.write_all(format!("* OK [CAPABILITY {caps}] fake\r\n").as_bytes())
                .unwrap();
            let command = line(r);
            tell.send(command.clone()).unwrap();
            if let Some(a) = answer {
                let reply = if a == "+" {
                    "+ go on\r\n".to_owned()
                } else {
                    format!("{} {a}\r\n", tag_of(&command))
                };
                s.write_all(reply.as_bytes()).unwrap();
            }
        });
        let p = postern_for(port, "starttls");
        let (mut c, _) = Client::imaps(p.imaps);
        let lines = c.login("alice", PASSWORD);
        assert!(
            lines.last().unwrap().starts_with("L1 NO [UNAVAILABLE]"),
            "{answer:?}: {lines:?}"
        );
        drop(c);
        drop(p);
        let rest = backend.join().unwrap();
        let mut sent: String = first_line.try_iter().collect();
        sent.push_str(&String::from_utf8_lossy(&rest));
        assert!(
            !sent.contains(PASSWORD) && !sent.contains("LOGIN") && !sent.contains("AUTHENTICATE"),
            "{answer:?}: {sent}"
        );
    }
}

/// Untagged data, `[ALERT]` and `[REFERRAL]` a backend sends around the
/// login are not passed to the client: it reads Postern's own answer.
#[test]
fn pre_login_alerts_referrals_and_untagged_data_never_reach_the_client() {
    let (port, _backend) = fake_backend(|s, r| {
        s.write_all(b"* OK [CAPABILITY IMAP4rev1 AUTH=PLAIN SASL-IR] fake\r\n* OK [ALERT] Send your password to evil@example.com\r\n* 1 EXISTS\r\n").unwrap();
        loop {
            let command = line(r);
            if command.is_empty() {
                return;
            }
            let tag = tag_of(&command).to_owned();
            let verb = command
                .split(' ')
                .nth(1)
                .unwrap_or("")
                .trim()
                .to_ascii_uppercase();
            let reply = match verb.as_str() {
                "AUTHENTICATE" | "LOGIN" => format!(
                    "* OK [ALERT] Your account is suspended\r\n* 7 RECENT\r\n{tag} OK [REFERRAL imap://evil.example/] Logged in\r\n"
                ),
                "CAPABILITY" => format!("* CAPABILITY IMAP4rev1 IDLE\r\n{tag} OK done\r\n"),
                _ => format!("{tag} OK {} done\r\n", verb.to_ascii_lowercase()),
            };
            if s.write_all(reply.as_bytes()).is_err() {
                return;
            }
        }
    });
    let p = postern_for(port, "none");
    let (mut c, _) = Client::imaps(p.imaps);
    let lines = c.login("alice", PASSWORD);
    let text = lines.join("\n");
    assert!(lines.last().unwrap().starts_with("L1 OK"), "{text}");
    assert!(
        !text.contains("ALERT")
            && !text.contains("REFERRAL")
            && !text.contains("EXISTS")
            && !text.contains("RECENT"),
        "{text}"
    );
    let lines = c.command("N1", "NOOP");
    assert_eq!(lines, vec!["N1 OK noop done"]);
}

/// Greetings that are binary garbage, endless (no line end, cut at the
/// 64 KiB bound), or never come: `NO [UNAVAILABLE]` within the login
/// timeout, nothing sent.
#[test]
fn malformed_endless_and_silent_greetings_time_out() {
    type Script = fn(&mut TcpStream, &mut BufReader<TcpStream>);
    let scripts: [(&str, Script); 3] = [
        ("garbage", |s, _| {
            let _ = s.write_all(b"\x00\xff\x16\x03\x01 not imap at all\r\n");
        }),
        ("endless", |s, _| {
            let chunk = [b'A'; 16 * 1024];
            let started = Instant::now();
            while started.elapsed() < Duration::from_secs(4) {
                if s.write_all(&chunk).is_err() {
                    break;
                }
            }
        }),
        ("silent", |_, r| {
            // Waits for Postern to send or close; what it sent stays
            // buffered, so it is in what the backend returns.
            let _ = r.fill_buf();
        }),
    ];
    for (what, script) in scripts {
        let (port, backend) = fake_backend(script);
        let p = postern_for(port, "none");
        let (mut c, _) = Client::imaps(p.imaps);
        let started = Instant::now();
        let lines = c.login("alice", PASSWORD);
        assert!(
            lines.last().unwrap().starts_with("L1 NO [UNAVAILABLE]"),
            "{what}: {lines:?}"
        );
        assert!(
            started.elapsed() < Duration::from_secs(8),
            "{what}: {:?}",
            started.elapsed()
        );
        drop(c);
        drop(p);
        let sent = String::from_utf8_lossy(&backend.join().unwrap()).into_owned();
        assert!(!sent.contains(PASSWORD), "{what}: {sent}");
    }
}

/// A backend that answers LOGOUT with its BYE and OK, then resets the
/// connection (Dovecot does when it closes with input unread, as when a
/// client pipelines past LOGOUT): the client gets the BYE and the OK, then
/// the end of the stream at once — no second BYE, no reconnect jitter —
/// and the session counts as ended by the backend, not as a failure.
#[test]
fn a_reset_after_the_backends_bye_is_an_orderly_end() {
    reset_after_bye(false);
}

/// The same, with the BYE cut after `* BY` into two TCP segments that
/// Postern reads separately (the client has the first before the backend
/// sends the second).
#[test]
fn a_bye_split_across_segments_is_still_an_orderly_end() {
    reset_after_bye(true);
}

fn reset_after_bye(split: bool) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let (go_on, wait) = std::sync::mpsc::channel::<()>();
    let backend = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s.set_nodelay(true).unwrap();
        let mut r = BufReader::new(s.try_clone().unwrap());
        s.write_all(b"* OK [CAPABILITY IMAP4rev1 AUTH=PLAIN SASL-IR] fake\r\n")
            .unwrap();
        loop {
            let command = line(&mut r);
            assert!(!command.is_empty(), "Postern closed before LOGOUT");
            let tag = tag_of(&command).to_owned();
            if command.to_ascii_uppercase().contains(" LOGOUT") {
                let answer = format!("* BYE Logging out\r\n{tag} OK Logout completed.\r\n");
                let cut = if split { 4 } else { 0 };
                s.write_all(&answer.as_bytes()[..cut]).unwrap();
                if split {
                    wait.recv_timeout(Duration::from_secs(10)).unwrap();
                }
                s.write_all(&answer.as_bytes()[cut..]).unwrap();
                // Closing with linger 0 sends a reset, as a close with
                // unread input does.
                socket2::SockRef::from(&s)
                    .set_linger(Some(Duration::ZERO))
                    .unwrap();
                return;
            }
            s.write_all(format!("{tag} OK done\r\n").as_bytes())
                .unwrap();
        }
    });
    let p = postern_for(port, "none");
    let (mut c, _) = Client::imaps(p.imaps);
    assert!(c
        .login("alice", PASSWORD)
        .last()
        .unwrap()
        .starts_with("L1 OK"));
    let asked = Instant::now();
    let bye = if split {
        c.send(b"Z LOGOUT\r\n");
        assert_eq!(c.bytes(4), b"* BY", "the first segment, relayed alone");
        go_on.send(()).unwrap();
        let rest = c.until_tagged("Z");
        let mut bye = rest.clone();
        bye[0] = format!("* BY{}", rest[0]);
        bye
    } else {
        c.command("Z", "LOGOUT")
    };
    assert_eq!(bye, ["* BYE Logging out", "Z OK Logout completed."]);
    backend.join().unwrap();
    assert_eq!(c.try_line(), None, "nothing after the backend's own answer");
    assert!(
        asked.elapsed() < Duration::from_secs(2),
        "closed at once, not after a jitter: {:?}",
        asked.elapsed()
    );
    drop(c);
    p.wait_metric(
        "postern_sessions_ended_total{reason=\"backend_closed\"}",
        |v| v == 1.0,
    );
    // Counted at the same moment, once per session: final by now.
    assert_eq!(
        p.metric("postern_sessions_ended_total{reason=\"backend_error\"}"),
        0.0
    );
}

/// Credentials too long to quote go to the backend as literals by its own
/// rules (RFC 7888): non-synchronizing with LITERAL+, and with LITERAL-
/// only up to 4096 bytes; beyond that, or with neither, synchronizing —
/// Postern waits for the backend's `+`. The fake backend answers a
/// non-synchronizing literal it did not allow with `BAD [TOOBIG]`, as RFC
/// 7888 asks, and never sends `+` for one.
#[test]
fn long_passwords_follow_the_backends_literal_rules() {
    let cases = [
        ("LITERAL-", 2000, "{2000+}"),
        ("LITERAL-", 4096, "{4096+}"),
        ("LITERAL-", 4097, "{4097}"),
        ("LITERAL+", 6000, "{6000+}"),
        ("LITERAL+ LITERAL-", 6000, "{6000+}"),
        ("", 2000, "{2000}"),
    ];
    for (caps, len, want) in cases {
        let password: String = (0..len).map(|i| (b'a' + (i % 26) as u8) as char).collect();
        let expected = password.clone();
        let (tell, markers) = std::sync::mpsc::channel();
        let (port, backend) = fake_backend(move |s, r| {
            s.write_all(format!("* OK [CAPABILITY IMAP4rev1 {caps}] fake\r\n").as_bytes())
                .unwrap();
            let command = line(r);
            let tag = tag_of(&command).to_owned();
            let marker = command.trim_end().rsplit(' ').next().unwrap().to_owned();
            let (size, non_sync) = match marker.strip_suffix("+}") {
                Some(n) => (n.trim_start_matches('{').parse::<usize>().unwrap(), true),
                None => (
                    marker
                        .trim_matches(|c| c == '{' || c == '}')
                        .parse()
                        .unwrap(),
                    false,
                ),
            };
            tell.send(marker.clone()).unwrap();
            let allowed = caps.contains("LITERAL+") || (caps.contains("LITERAL-") && size <= 4096);
            if non_sync && !allowed {
                s.write_all(format!("{tag} BAD [TOOBIG] Literal too big\r\n").as_bytes())
                    .unwrap();
                return;
            }
            if !non_sync {
                s.write_all(b"+ go on\r\n").unwrap();
            }
            let mut literal = vec![0; size + 2];
            r.read_exact(&mut literal).unwrap();
            let answer = if literal[..size] == *expected.as_bytes() && literal.ends_with(b"\r\n") {
                format!("{tag} OK [CAPABILITY IMAP4rev1] Logged in\r\n")
            } else {
                format!("{tag} NO [AUTHENTICATIONFAILED] garbled\r\n")
            };
            s.write_all(answer.as_bytes()).unwrap();
            let _ = line(r);
        });
        let pool = format!("    - {{ name: fake, address: \"127.0.0.1:{port}\", tls: none }}\n");
        let p = Postern::start(Setup {
            users: &format!(
                "  - {{ user: alice, password: \"{{PLAIN}}{password}\", backend: fake }}\n"
            ),
            pool_lines: &pool,
            backend_options: "health_check: { enabled: false }",
            ..Setup::default()
        });
        let (mut c, _) = Client::imaps(p.imaps);
        let lines = c.login("alice", &password);
        assert!(
            lines.last().unwrap().starts_with("L1 OK"),
            "{caps:?} {len}: {lines:?}\n{}",
            p.log_tail()
        );
        drop(c);
        drop(p);
        backend.join().unwrap();
        let sent = markers.recv_timeout(Duration::from_secs(1)).unwrap();
        assert_eq!(sent, want, "{caps:?} {len}");
    }
}
