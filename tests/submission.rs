//! SMTP submission through Postern to real backends: Dovecot's submission
//! service (dovecot-submissiond) relaying to a private Postfix, and Postfix
//! itself as a configured relay taking the login by XCLIENT. Python's
//! smtplib (STARTTLS and implicit TLS, AUTH PLAIN and LOGIN, a 5 MiB 8-bit
//! message found intact where Postfix delivered it), curl and swaks; raw
//! sessions for the pre-auth rules, STARTTLS injection, wrong passwords
//! that never reach a backend, a backend that offers neither XCLIENT nor
//! AUTH, failover, and `421` only between commands.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::process::Command;

use base64::Engine as _;
use common::backend::DovecotBackend;
use common::client::{tcp, tcp_from, tls_over, Client};
use common::postern::{user, Postern, Setup, PASSWORD};
use common::postfix::PostfixServer;
use sha2::{Digest, Sha256};

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

fn plain_auth(user: &str, password: &str) -> String {
    b64(format!("\0{user}\0{password}").as_bytes())
}

/// A message of about `size` bytes: CRLF lines with 8-bit text, lines an
/// SMTP client must dot-stuff, and a unique subject.
fn message(subject: &str, size: usize) -> Vec<u8> {
    let mut m = format!(
        "From: alice@example.org\r\nTo: rcpt@example.net\r\nSubject: {subject}\r\nMIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\n"
    )
    .into_bytes();
    let mut i = 0u64;
    while m.len() < size {
        let line = match i % 5 {
            0 => format!(".leading dot {i}\r\n"),
            1 => format!("250 looks like a reply {i}\r\n"),
            2 => format!("Grüße, naïve café, 日本語 {i}\r\n"),
            3 => ".\r\n".to_owned(),
            _ => format!("{}\r\n", "x".repeat(70)),
        };
        m.extend_from_slice(line.as_bytes());
        i += 1;
    }
    m
}

/// The body of a message as a maildir holds it (LF line ends), from the
/// first empty line on.
fn body_of_delivered(file: &[u8]) -> &[u8] {
    let at = file
        .windows(2)
        .position(|w| w == b"\n\n")
        .expect("a header/body separator");
    &file[at + 2..]
}

fn body_as_delivered(sent: &[u8]) -> Vec<u8> {
    let at = sent
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("a header/body separator");
    sent[at + 4..]
        .split(|&b| b == b'\n')
        .map(|l| l.strip_suffix(b"\r").unwrap_or(l))
        .collect::<Vec<_>>()
        .join(&b'\n')
}

fn sha(bytes: &[u8]) -> String {
    format!("{:x}", Sha256::digest(bytes))
}

/// Runs tests/python/smtp_session.py; returns its JSON line.
fn smtplib(mode: &str, port: u16, source: &str, mechanism: &str, file: &std::path::Path) -> String {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/python/smtp_session.py");
    let out = Command::new("python3")
        .arg(script)
        .args([
            mode,
            &port.to_string(),
            source,
            "alice",
            PASSWORD,
            mechanism,
        ])
        .arg(file)
        .output()
        .expect("python3 runs");
    assert!(
        out.status.success(),
        "smtplib {mode} {mechanism} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// One reply, all its lines.
fn replies(c: &mut Client) -> Vec<String> {
    let mut lines = Vec::new();
    loop {
        let l = c.line();
        let more = l.as_bytes().get(3) == Some(&b'-');
        lines.push(l);
        if !more {
            return lines;
        }
    }
}

fn say(c: &mut Client, line: &str) -> String {
    c.send(format!("{line}\r\n").as_bytes());
    replies(c).pop().unwrap()
}

/// Plain connection to a STARTTLS submission port, greeting read.
fn plain(port: u16) -> Client {
    let (c, greeting) = Client::plain(port);
    assert!(greeting.starts_with("220 "), "{greeting}");
    c
}

/// STARTTLS, then EHLO over TLS; returns the TLS client and the EHLO lines.
fn upgraded(port: u16) -> (Client, Vec<String>) {
    let s = tcp(port);
    let mut r = BufReader::new(s.try_clone().unwrap());
    let mut line = String::new();
    r.read_line(&mut line).unwrap();
    assert!(line.starts_with("220 "), "{line}");
    (&s).write_all(b"EHLO client.example\r\n").unwrap();
    loop {
        line.clear();
        r.read_line(&mut line).unwrap();
        if line.as_bytes()[3] == b' ' {
            break;
        }
    }
    (&s).write_all(b"STARTTLS\r\n").unwrap();
    line.clear();
    r.read_line(&mut line).unwrap();
    assert!(line.starts_with("220 2.0.0"), "{line}");
    assert!(r.buffer().is_empty());
    let mut c = Client::from_stream(tls_over(s, "localhost", &[b"smtp"]).unwrap());
    c.send(b"EHLO client.example\r\n");
    let ehlo = replies(&mut c);
    (c, ehlo)
}

fn world(name: &str) -> (PostfixServer, DovecotBackend, Postern) {
    let mta = PostfixServer::start(name);
    let d = DovecotBackend::start_services(name, &[("alice", PASSWORD)], &[], &mta.addr());
    let p = Postern::start(Setup {
        backends: &[&d],
        users: &user("alice"),
        submission: true,
        extra: "limits:\n  shutdown_drain: 1s\n",
        ..Setup::default()
    });
    (mta, d, p)
}

#[test]
fn smtplib_submits_through_dovecot_submission_to_postfix_intact() {
    let (mta, d, p) = world("sub-intact");
    let big = message("big-8bit", 5 * 1024 * 1024);
    let file = p.dir.join("big.eml");
    std::fs::write(&file, &big).unwrap();
    let seen = smtplib("starttls", p.submission, "127.0.0.5", "PLAIN", &file);
    let seen: serde_json::Value = serde_json::from_str(seen.trim()).unwrap();
    let before: Vec<&str> = seen["before"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert!(before.contains(&"starttls"), "{seen}");
    assert!(!before.contains(&"auth"), "no AUTH before TLS: {seen}");
    assert!(seen["after_tls"].to_string().contains("\"auth\""), "{seen}");
    let delivered = mta.wait_delivered("with subject big-8bit", |m| {
        m.windows(17).any(|w| w == b"Subject: big-8bit")
    });
    assert_eq!(
        sha(body_of_delivered(&delivered)),
        sha(&body_as_delivered(&big)),
        "the 5 MiB 8-bit body arrived intact"
    );
    // The client's own address reached Dovecot (XCLIENT) and Postfix.
    d.wait_log("rip=127.0.0.5");
    let log = mta.wait_log("sasl_username=alice");
    assert!(log.contains("client=unknown[127.0.0.5]"), "{log}");

    // Implicit TLS and AUTH LOGIN.
    let small = message("small-login", 2000);
    let file = p.dir.join("small.eml");
    std::fs::write(&file, &small).unwrap();
    smtplib("ssl", p.submissions, "127.0.0.6", "LOGIN", &file);
    let delivered = mta.wait_delivered("with subject small-login", |m| {
        m.windows(20).any(|w| w == b"Subject: small-login")
    });
    assert_eq!(
        sha(body_of_delivered(&delivered)),
        sha(&body_as_delivered(&small))
    );
    p.wait_metric(
        r#"postern_backend_logins_total{protocol="submission",result="success"}"#,
        |v| v >= 2.0,
    );
}

#[test]
fn curl_and_swaks_submit_through_postern() {
    let (mta, _d, p) = world("sub-clients");
    let file = p.dir.join("curl.eml");
    std::fs::write(&file, message("by-curl", 3000)).unwrap();
    let out = Command::new("curl")
        .args(["-sS", "--ssl-reqd", "-k", "--max-time", "60"])
        .arg(format!("smtp://127.0.0.1:{}/client.example", p.submission))
        .args(["--user", &format!("alice:{PASSWORD}")])
        .args([
            "--mail-from",
            "alice@example.org",
            "--mail-rcpt",
            "rcpt@example.net",
        ])
        .arg("--upload-file")
        .arg(&file)
        .output()
        .expect("curl runs");
    assert!(
        out.status.success(),
        "curl: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    mta.wait_delivered("by curl", |m| {
        m.windows(16).any(|w| w == b"Subject: by-curl")
    });

    let out = Command::new("swaks")
        .args([
            "--server",
            "127.0.0.1",
            "--port",
            &p.submissions.to_string(),
            "--tlsc",
        ])
        .args([
            "--auth",
            "PLAIN",
            "--auth-user",
            "alice",
            "--auth-password",
            PASSWORD,
        ])
        .args(["--from", "alice@example.org", "--to", "rcpt@example.net"])
        .args(["--helo", "client.example", "--header", "Subject: by-swaks"])
        .args(["--timeout", "60"])
        .output()
        .expect("swaks runs (scripts/test installs it)");
    assert!(
        out.status.success(),
        "swaks: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    mta.wait_delivered("by swaks", |m| {
        m.windows(17).any(|w| w == b"Subject: by-swaks")
    });
}

#[test]
fn pre_auth_rules_injection_and_wrong_passwords() {
    let (mta, d, p) = world("sub-rules");
    let mut c = plain(p.submission);
    let ehlo = {
        c.send(b"EHLO client.example\r\n");
        replies(&mut c)
    };
    assert!(ehlo.iter().any(|l| l.ends_with("STARTTLS")), "{ehlo:?}");
    assert!(!ehlo.iter().any(|l| l.contains("AUTH")), "{ehlo:?}");
    assert!(ehlo.iter().any(|l| l.contains("SIZE ")), "{ehlo:?}");
    assert!(say(&mut c, "MAIL FROM:<alice@example.org>").starts_with("530 5.7.0"));
    assert!(say(
        &mut c,
        &format!("AUTH PLAIN {}", plain_auth("alice", PASSWORD))
    )
    .starts_with("538 5.7.11"));
    assert!(say(&mut c, "VRFY alice").starts_with("530 5.7.0"));
    assert!(say(&mut c, "FROB").starts_with("500 5.5.1"));
    assert!(say(&mut c, "NOOP").starts_with("250 2.0.0"));

    // STARTTLS with a login pipelined behind it: the login is dropped.
    let s = tcp(p.submission);
    let mut r = BufReader::new(s.try_clone().unwrap());
    let mut line = String::new();
    r.read_line(&mut line).unwrap();
    let injected = format!(
        "EHLO x\r\nSTARTTLS\r\nAUTH PLAIN {}\r\nMAIL FROM:<evil@example.org>\r\n",
        plain_auth("alice", PASSWORD)
    );
    (&s).write_all(injected.as_bytes()).unwrap();
    loop {
        line.clear();
        r.read_line(&mut line).unwrap();
        if line.starts_with("220 ") {
            break;
        }
    }
    assert!(line.starts_with("220 2.0.0"), "{line}");
    let mut t = Client::from_stream(tls_over(s, "localhost", &[b"smtp"]).unwrap());
    // The first answer over TLS is to this NOOP: nothing injected ran.
    assert!(say(&mut t, "NOOP").starts_with("250 2.0.0"));
    // The EHLO before TLS is forgotten.
    assert!(say(
        &mut t,
        &format!("AUTH PLAIN {}", plain_auth("alice", PASSWORD))
    )
    .starts_with("503 5.5.1"));
    p.wait_metric("postern_starttls_discarded_bytes_total", |v| v > 0.0);

    // A wrong password is refused at the edge; the backend never hears of it.
    let (mut t, ehlo) = upgraded(p.submission);
    assert!(
        ehlo.iter().any(|l| l.contains("AUTH PLAIN LOGIN")),
        "{ehlo:?}"
    );
    assert!(!ehlo.iter().any(|l| l.ends_with("STARTTLS")), "{ehlo:?}");
    let answer = say(
        &mut t,
        &format!("AUTH PLAIN {}", plain_auth("alice", "wrong")),
    );
    assert!(answer.starts_with("535 5.7.8"), "{answer}");
    // A cancelled exchange.
    t.send(b"AUTH LOGIN\r\n");
    assert_eq!(t.line(), "334 VXNlcm5hbWU6");
    assert!(say(&mut t, "*").starts_with("501 5.7.0"));
    d.settle_log();
    assert!(
        !d.saw_user("alice"),
        "the wrong password never reached Dovecot"
    );

    // The right one: 235, then a transaction by hand through to Postfix.
    let answer = say(
        &mut t,
        &format!("AUTH PLAIN {}", plain_auth("alice", PASSWORD)),
    );
    assert_eq!(answer, "235 2.7.0 Authentication successful");
    assert!(say(&mut t, "MAIL FROM:<alice@example.org>").starts_with("250"));
    assert!(say(&mut t, "RCPT TO:<rcpt@example.net>").starts_with("250"));
    assert!(say(&mut t, "DATA").starts_with("354"));
    t.send(b"Subject: by-hand\r\n\r\n..dot\r\n.\r\n");
    assert!(replies(&mut t).pop().unwrap().starts_with("250"));
    assert!(say(&mut t, "QUIT").starts_with("221"));
    let m = mta.wait_delivered("by hand", |m| {
        m.windows(16).any(|w| w == b"Subject: by-hand")
    });
    assert!(
        body_of_delivered(&m).starts_with(b".dot\n"),
        "dot-stuffing undone once"
    );
}

#[test]
fn postfix_as_a_relay_takes_the_login_by_xclient() {
    let mta = PostfixServer::start("relay");
    let d = DovecotBackend::start_with_users("relay-imap", &[("alice", PASSWORD)]);
    let extra = format!(
        "submission:\n  hostname: edge.test\n  relays:\n    - {{ name: mta, address: \"{}\" }}\n",
        mta.addr()
    );
    let p = Postern::start(Setup {
        backends: &[&d],
        users: &user("alice"),
        submission: true,
        extra: &extra,
        ..Setup::default()
    });
    let file = p.dir.join("m.eml");
    std::fs::write(&file, message("via-relay", 4000)).unwrap();
    smtplib("starttls", p.submission, "127.0.0.7", "PLAIN", &file);
    let m = mta.wait_delivered("via the relay", |m| {
        m.windows(18).any(|w| w == b"Subject: via-relay")
    });
    let text = String::from_utf8_lossy(&m);
    assert!(
        text.contains("from client.example (unknown [127.0.0.7])"),
        "the client's EHLO name and address: {text}"
    );
    let log = mta.wait_log("sasl_method=XCLIENT, sasl_username=alice");
    assert!(log.contains("client=unknown[127.0.0.7]"), "{log}");

    // XCLIENT from the client after login never reaches the MTA: the
    // session is closed before its line ends.
    let (mut t, _) = upgraded(p.submission);
    assert!(say(
        &mut t,
        &format!("AUTH PLAIN {}", plain_auth("alice", PASSWORD))
    )
    .starts_with("235"));
    t.send(b"XCLIENT LOGIN=ceo ADDR=10.9.9.9\r\n");
    assert!(t.closed(), "the session ends");
    p.wait_metric(
        r#"postern_sessions_ended_total{protocol="submission",reason="forbidden_command"}"#,
        |v| v >= 1.0,
    );

    // A wrong password never opens a connection to the MTA.
    let connects = |log: &str| log.matches(": connect from").count();
    let before = connects(&mta.log());
    let (mut t, _) = upgraded(p.submission);
    assert!(say(
        &mut t,
        &format!("AUTH PLAIN {}", plain_auth("alice", "nope"))
    )
    .starts_with("535 5.7.8"));
    // A marker connection straight to Postfix: its line comes after any of ours.
    {
        let mut m = Client::from_stream(tcp_from("127.0.0.9", mta.port));
        assert!(m.line().starts_with("220"));
        m.send(b"QUIT\r\n");
        m.line();
    }
    let log = mta.wait_log("connect from unknown[127.0.0.9]");
    assert_eq!(
        connects(&log),
        before + 1,
        "only the marker connected:\n{log}"
    );
    assert!(
        !log.contains("sasl_username=ceo") && !log.contains("10.9.9.9"),
        "{log}"
    );
}

/// A backend that offers neither XCLIENT nor AUTH: it must get nothing.
#[test]
fn a_backend_without_xclient_or_auth_gets_nothing() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let heard = std::sync::Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let log = std::sync::Arc::clone(&heard);
    let log_of_bare = std::sync::Arc::clone(&heard);
    std::thread::spawn(move || {
        for conn in listener.incoming().flatten() {
            let log = std::sync::Arc::clone(&log);
            std::thread::spawn(move || {
                let mut w = conn.try_clone().unwrap();
                let mut r = BufReader::new(conn);
                let _ = w.write_all(b"220 bare.test ESMTP\r\n");
                let mut line = String::new();
                while r.read_line(&mut line).unwrap_or(0) > 0 {
                    log.lock().unwrap().push(line.trim_end().to_owned());
                    let answer: &[u8] = if line.starts_with("EHLO") {
                        b"250-bare.test\r\n250 PIPELINING\r\n"
                    } else if line.starts_with("QUIT") {
                        b"221 bye\r\n"
                    } else {
                        b"502 no\r\n"
                    };
                    let _ = w.write_all(answer);
                    line.clear();
                }
            });
        }
    });
    let d = DovecotBackend::start_with_users("bare-imap", &[("alice", PASSWORD)]);
    let extra =
        format!("submission:\n  relays:\n    - {{ name: bare, address: \"127.0.0.1:{port}\" }}\n");
    let p = Postern::start(Setup {
        backends: &[&d],
        users: &user("alice"),
        submission: true,
        extra: &extra,
        ..Setup::default()
    });
    let (mut t, _) = upgraded(p.submission);
    let answer = say(
        &mut t,
        &format!("AUTH PLAIN {}", plain_auth("alice", PASSWORD)),
    );
    assert!(answer.starts_with("454 4.7.0"), "{answer}");
    common::wait_until("the bare backend heard EHLO", common::SETTLE, || {
        heard.lock().unwrap().iter().any(|l| l.starts_with("EHLO"))
    });
    let heard = heard.lock().unwrap().clone();
    assert!(
        heard
            .iter()
            .all(|l| !l.starts_with("AUTH") && !l.contains(PASSWORD)),
        "no credential left the edge: {heard:?}"
    );
    // The same relay with `tls: starttls`: it offers no STARTTLS, so it
    // gets nothing past EHLO.
    let before = heard.len();
    let extra = format!(
        "submission:\n  relays:\n    - {{ name: bare, address: \"127.0.0.1:{port}\", tls: starttls }}\n"
    );
    let p2 = Postern::start(Setup {
        backends: &[&d],
        users: &user("alice"),
        submission: true,
        extra: &extra,
        ..Setup::default()
    });
    let (mut t, _) = upgraded(p2.submission);
    let answer = say(
        &mut t,
        &format!("AUTH PLAIN {}", plain_auth("alice", PASSWORD)),
    );
    assert!(answer.starts_with("454 4.7.0"), "{answer}");
    p2.wait_for_log("backend does not offer STARTTLS; nothing sent");
    let heard = log_of_bare.lock().unwrap()[before..].to_vec();
    assert!(
        heard.iter().all(|l| l.starts_with("EHLO")),
        "nothing but EHLO reached the backend: {heard:?}"
    );
}

#[test]
fn failover_to_the_next_backend_and_every_backend_down() {
    let mta = PostfixServer::start("sub-failover");
    let who = common::user_preferring(&["sub-f1", "sub-f2"], "sub-f1");
    let users = [(who.as_str(), PASSWORD)];
    let d1 = DovecotBackend::start_services("sub-f1", &users, &[], &mta.addr());
    let d2 = DovecotBackend::start_services("sub-f2", &users, &[], &mta.addr());
    let p = Postern::start(Setup {
        backends: &[&d1, &d2],
        users: &user(&who),
        submission: true,
        ..Setup::default()
    });
    let login = |p: &Postern| {
        let (mut t, _) = upgraded(p.submission);
        say(
            &mut t,
            &format!("AUTH PLAIN {}", plain_auth(&who, PASSWORD)),
        )
    };
    assert!(login(&p).starts_with("235"));
    d1.wait_log(&format!("submission-login: Info: Login: user=<{who}>"));
    d1.stop();
    assert!(login(&p).starts_with("235"), "moved on to the next backend");
    d2.wait_log(&format!("submission-login: Info: Login: user=<{who}>"));
    d2.stop();
    let answer = login(&p);
    assert!(answer.starts_with("454 4.7.0"), "{answer}");
}

#[test]
fn shutdown_says_421_between_commands_and_nothing_inside_a_message() {
    let (_mta, _d, p) = world("sub-ending");
    let logged_in = || {
        let (mut t, _) = upgraded(p.submission);
        assert!(say(
            &mut t,
            &format!("AUTH PLAIN {}", plain_auth("alice", PASSWORD))
        )
        .starts_with("235"));
        t
    };
    let mut idle = logged_in();
    assert!(say(&mut idle, "NOOP").starts_with("250"));
    let mut sending = logged_in();
    assert!(say(&mut sending, "MAIL FROM:<alice@example.org>").starts_with("250"));
    assert!(say(&mut sending, "RCPT TO:<rcpt@example.net>").starts_with("250"));
    assert!(say(&mut sending, "DATA").starts_with("354"));
    sending.send(b"Subject: half\r\n\r\nthe first half\r\n");
    p.wait_metric("postern_sessions_active", |v| v >= 2.0);
    let status = Command::new("kill")
        .args(["-TERM", &p.pid().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    assert_eq!(idle.line(), "421 4.3.2 Server shutting down, closing");
    let mut rest = Vec::new();
    while let Some(l) = sending.try_line() {
        rest.push(l);
    }
    assert!(
        rest.is_empty(),
        "nothing written inside the message: {rest:?}"
    );
}

#[test]
fn early_talkers_long_lines_and_too_many_bad_commands() {
    let d = DovecotBackend::start_with_users("sub-limits", &[("alice", PASSWORD)]);
    let p = Postern::start(Setup {
        backends: &[&d],
        users: &user("alice"),
        submission: true,
        extra: "submission:\n  greeting_delay: 2s\n  relays:\n    - { name: nowhere, address: \"127.0.0.1:9\" }\n",
        ..Setup::default()
    });
    // Talking before the greeting: 554 and a close, no greeting at all.
    let mut c = Client::from_stream(tcp(p.submission));
    c.send(b"EHLO hasty.example\r\n");
    let answer = c.line();
    assert!(answer.starts_with("554 5.5.0"), "{answer}");
    assert!(c.closed());
    p.wait_metric(
        r#"postern_sessions_ended_total{protocol="submission",reason="early_talker"}"#,
        |v| v >= 1.0,
    );
    // A patient client is greeted after the delay.
    let mut c = plain(p.submission);
    let long = format!("NOOP {}", "x".repeat(600));
    assert!(
        say(&mut c, &long).starts_with("500 5.5.2"),
        "a command line over 512 octets"
    );
    for _ in 0..8 {
        assert!(say(&mut c, "FROB").starts_with("500 5.5.1"));
    }
    c.send(b"FROB\r\n");
    assert!(c.line().starts_with("500 5.5.1"));
    assert_eq!(c.line(), "421 4.7.0 Too many invalid commands, closing");
    assert!(c.closed());
}
