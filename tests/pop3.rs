//! POP3 through Postern to real Dovecot backends (dovecot-pop3d): Python's
//! poplib over POP3S and STLS with a 10 MiB message checked by SHA-256,
//! fetchmail, getmail6 and curl; raw sessions for STLS injection, the
//! plaintext rules, every SASL form, long passwords, wrong passwords that
//! never reach a backend, `[IN-USE]`, a backend down, failover, the
//! client's address forwarded with XCLIENT, and routing identical to IMAP's.

mod common;

use std::process::Command;

use base64::Engine as _;
use common::backend::DovecotBackend;
use common::client::{tcp, tcp_from, tls_over, Client};
use common::postern::{user, Postern, Setup, PASSWORD};
use sha2::{Digest, Sha256};

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

fn pop3_postern(backends: &[&DovecotBackend], users: &str, backend_options: &str) -> Postern {
    Postern::start(Setup {
        backends,
        users,
        pop3: true,
        backend_options,
        ..Setup::default()
    })
}

/// One backend with `names` (password `PASSWORD`), Postern in front.
fn world(name: &str, names: &[&str], backend_options: &str) -> (DovecotBackend, Postern) {
    common::backend::ensure_installed();
    let users: Vec<(&str, &str)> = names.iter().map(|n| (*n, PASSWORD)).collect();
    let b = DovecotBackend::start_pop3_with_env(name, &users, &[]);
    let yaml: String = names.iter().map(|n| user(n)).collect();
    let p = pop3_postern(&[&b], &yaml, backend_options);
    (b, p)
}

/// POP3S, greeting read.
fn pop3s(port: u16) -> Client {
    let tls = tls_over(tcp(port), "localhost", &[b"pop3"]).expect("TLS handshake");
    let mut c = Client::from_stream(tls);
    let greeting = c.line();
    assert!(greeting.starts_with("+OK"), "{greeting}");
    c
}

/// Plain POP3 on the STLS listener, greeting read.
fn plain(port: u16) -> Client {
    let (c, greeting) = Client::plain(port);
    assert!(greeting.starts_with("+OK"), "{greeting}");
    c
}

fn say(c: &mut Client, line: &str) -> String {
    c.send(format!("{line}\r\n").as_bytes());
    c.line()
}

/// A multi-line answer's lines up to (not including) the ".".
fn multiline(c: &mut Client) -> Vec<String> {
    let mut lines = Vec::new();
    loop {
        let l = c.line();
        if l == "." {
            return lines;
        }
        lines.push(l);
    }
}

/// A message of about `size` bytes, CRLF lines, with lines a POP3 server
/// must dot-stuff and lines that look like status responses.
fn message(size: usize) -> Vec<u8> {
    let mut m = b"From: a@example.com\r\nTo: alice@example.com\r\nSubject: big\r\n\r\n".to_vec();
    let mut i = 0u64;
    while m.len() < size {
        match i % 50 {
            7 => m.extend_from_slice(b".\r\n"),
            8 => m.extend_from_slice(b"..leading dots\r\n"),
            9 => m.extend_from_slice(b"+OK not a response\r\n"),
            10 => m.extend_from_slice(b"-ERR nor this\r\n"),
            _ => {
                let line = format!(
                    "{i:08} {}\r\n",
                    "abcdefghijklmnopqrstuvwxyz0123456789".repeat(2)
                );
                m.extend_from_slice(line.as_bytes());
            }
        }
        i += 1;
    }
    m
}

fn poplib(mode: &str, port: u16, user: &str, password: &str) -> serde_json::Value {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/python/pop3_session.py");
    let out = Command::new("python3")
        .args([script, mode, &port.to_string(), user, password])
        .output()
        .expect("python3 runs");
    assert!(
        out.status.success(),
        "poplib session failed:\nstdout: {}\nstderr: {}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("one JSON line")
}

#[test]
fn poplib_over_pop3s_and_stls_retrieves_a_10_mib_message_intact() {
    let (b, p) = world("pop3-poplib", &["alice", "bob"], "");
    for (mode, port, who) in [("pop3s", p.pop3s, "alice"), ("stls", p.pop3, "bob")] {
        let big = message(10 << 20);
        b.deliver(who, &big);
        b.deliver(who, b"Subject: small\r\n\r\nhello\r\n");
        let out = poplib(mode, port, who, PASSWORD);
        let capa: Vec<&str> = out["capa"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|c| c.as_str())
            .collect();
        assert!(
            capa.contains(&"UIDL") && capa.contains(&"PIPELINING"),
            "{mode}: {out}"
        );
        assert_eq!(out["count"], 2, "{mode}: {out}");
        assert_eq!(out["listed"], 2, "{mode}: {out}");
        assert_eq!(out["uidls"], 2, "{mode}: {out}");
        let want = format!("{:x}", Sha256::digest(&big));
        assert_eq!(
            out["sha256"][0],
            want.as_str(),
            "{mode}: the 10 MiB message"
        );
        assert!(out["dele"].as_str().unwrap().starts_with("+OK"), "{out}");
        assert!(out["quit"].as_str().unwrap().starts_with("+OK"), "{out}");
        assert_eq!(b.wait_pop3_logins_of(who, 1), 1);
    }
    // QUIT's +OK, then either side's close, is an orderly end.
    common::wait_for(
        "two POP3 sessions ended in order",
        common::SETTLE,
        || {
            let ended = |reason: &str| {
                p.try_metric(&format!(
                    "postern_sessions_ended_total{{protocol=\"pop3\",reason=\"{reason}\"}}"
                ))
                .unwrap_or(0.0)
            };
            ended("backend_closed") + ended("client_closed")
        },
        |v| *v >= 2.0,
    );
    // The DELE was committed by the backend at QUIT.
    let out = poplib("pop3s", p.pop3s, "alice", PASSWORD);
    assert_eq!(out["count"], 1, "{out}");
}

#[test]
fn fetchmail_getmail_and_curl_fetch_through_postern() {
    let (b, p) = world("pop3-clients", &["alice", "bob", "carol"], "");
    let dir = p.dir.join("clients");
    std::fs::create_dir_all(&dir).unwrap();

    // fetchmail over POP3S, keeping nothing on the server, to an MDA.
    b.deliver(
        "alice",
        b"Subject: for fetchmail\r\n\r\nfetched by fetchmail\r\n",
    );
    let rc = dir.join("fetchmailrc");
    let out_file = dir.join("fetchmail.out");
    std::fs::write(
        &rc,
        format!(
            "set no syslog\nset postmaster root\npoll 127.0.0.1 service {} protocol pop3 timeout 30:\n  user \"alice\" password \"{PASSWORD}\" ssl no sslcertck\n  mda \"/bin/sh -c 'cat >> {}'\"\n",
            p.pop3s,
            out_file.display()
        ),
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&rc, std::fs::Permissions::from_mode(0o600)).unwrap();
    let out = Command::new("fetchmail")
        .args(["--nodetach", "--nosyslog", "-f"])
        .arg(&rc)
        .env("HOME", &dir)
        .env("FETCHMAILHOME", &dir)
        .output()
        .expect("fetchmail runs");
    assert!(
        out.status.success(),
        "fetchmail: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let got = std::fs::read_to_string(&out_file).unwrap();
    assert!(got.contains("fetched by fetchmail"), "{got}");

    // getmail6 over POP3S into a maildir.
    b.deliver("bob", b"Subject: for getmail\r\n\r\nfetched by getmail\r\n");
    // getmail delivers as `user` when run as root, never as root itself.
    let maildir = dir.join("maildir");
    for sub in ["", "cur", "new", "tmp"] {
        std::fs::create_dir_all(maildir.join(sub)).unwrap();
        std::os::unix::fs::chown(maildir.join(sub), Some(65534), Some(65534)).unwrap();
    }
    let rc = dir.join("getmailrc");
    std::fs::write(
        &rc,
        format!(
            "[retriever]\ntype = SimplePOP3SSLRetriever\nserver = 127.0.0.1\nport = {}\nusername = bob\npassword = {PASSWORD}\n\n[destination]\ntype = Maildir\npath = {}/\nuser = nobody\n\n[options]\ndelete = true\nread_all = true\n",
            p.pop3s,
            maildir.display()
        ),
    )
    .unwrap();
    let out = Command::new("getmail")
        .arg("--getmaildir")
        .arg(&dir)
        .arg("--rcfile")
        .arg(&rc)
        .output()
        .expect("getmail runs");
    assert!(
        out.status.success(),
        "getmail: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let delivered: Vec<_> = std::fs::read_dir(maildir.join("new")).unwrap().collect();
    assert_eq!(delivered.len(), 1, "one message in the maildir");
    let text = std::fs::read_to_string(delivered[0].as_ref().unwrap().path()).unwrap();
    assert!(text.contains("fetched by getmail"), "{text}");

    // curl pop3s://: message 1 of carol.
    b.deliver("carol", b"Subject: for curl\r\n\r\nfetched by curl\r\n");
    let out = Command::new("curl")
        .args(["-sS", "-k", "--max-time", "30", "-u"])
        .arg(format!("carol:{PASSWORD}"))
        .arg(format!("pop3s://127.0.0.1:{}/1", p.pop3s))
        .output()
        .expect("curl runs");
    assert!(
        out.status.success(),
        "curl: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("fetched by curl"));
}

#[test]
fn stls_rules_plaintext_refusals_and_injection() {
    let (b, p) = world("pop3-stls", &["alice"], "");
    // Before STLS: CAPA offers STLS, hides USER and SASL; credentials refused.
    let mut c = plain(p.pop3);
    assert!(say(&mut c, "CAPA").starts_with("+OK"));
    let caps = multiline(&mut c);
    assert!(caps.iter().any(|l| l == "STLS"), "{caps:?}");
    assert!(
        !caps.iter().any(|l| l == "USER" || l.starts_with("SASL")),
        "{caps:?}"
    );
    for cmd in ["USER alice", &format!("PASS {PASSWORD}"), "AUTH PLAIN"] {
        let answer = say(&mut c, cmd);
        assert!(answer.starts_with("-ERR [SYS/PERM]"), "{cmd}: {answer}");
    }
    assert!(say(&mut c, "QUIT").starts_with("+OK"));

    // STLS with a command injected in the same segment: discarded unread.
    let s = tcp(p.pop3);
    let mut plain_side = Client::from_stream(s.try_clone().unwrap());
    assert!(plain_side.line().starts_with("+OK"));
    use std::io::Write;
    (&s).write_all(b"STLS\r\nUSER mallory\r\n").unwrap();
    assert!(plain_side.line().starts_with("+OK Begin TLS"));
    let mut c = Client::from_stream(tls_over(s, "localhost", &[b"pop3"]).unwrap());
    // The first answer over TLS is CAPA's, not USER's; USER is offered now.
    assert_eq!(say(&mut c, "CAPA"), "+OK Capability list follows");
    let caps = multiline(&mut c);
    assert!(caps.iter().any(|l| l == "USER"), "{caps:?}");
    assert!(!caps.iter().any(|l| l == "STLS"), "{caps:?}");
    // A second STLS is refused.
    assert!(say(&mut c, "STLS").starts_with("-ERR"));
    assert!(say(&mut c, "USER alice").starts_with("+OK"));
    assert!(say(&mut c, &format!("PASS {PASSWORD}")).starts_with("+OK"));
    assert!(say(&mut c, "STAT").starts_with("+OK 0 0"));
    assert!(say(&mut c, "QUIT").starts_with("+OK"));
    p.wait_metric("postern_starttls_discarded_bytes_total", |v| v >= 13.0);
    b.settle_pop3_log();
    assert!(!b.saw_user("mallory"));

    // The same injection split: STLS alone, the injected bytes after the
    // +OK, before the handshake: they are not a TLS ClientHello, so the
    // handshake fails and nothing is executed.
    let s = tcp(p.pop3);
    let mut plain_side = Client::from_stream(s.try_clone().unwrap());
    assert!(plain_side.line().starts_with("+OK"));
    (&s).write_all(b"STLS\r\n").unwrap();
    assert!(plain_side.line().starts_with("+OK Begin TLS"));
    (&s).write_all(b"USER mallory\r\nPASS x\r\n").unwrap();
    assert!(
        plain_side.closed(),
        "the handshake fails and the connection closes"
    );
    b.settle_pop3_log();
    assert!(!b.saw_user("mallory"));
}

#[test]
fn every_sasl_form_and_long_passwords_log_in() {
    common::backend::ensure_installed();
    let long1 = "p".repeat(1024);
    let long4: String = (0..4096).map(|i| (b'a' + (i % 26) as u8) as char).collect();
    let b = DovecotBackend::start_pop3_with_env(
        "pop3-sasl",
        &[("alice", PASSWORD), ("long1", &long1), ("long4", &long4)],
        &[],
    );
    let users = format!(
        "{}  - {{ user: long1, password: \"{{PLAIN}}{long1}\" }}\n  - {{ user: long4, password: \"{{PLAIN}}{long4}\" }}\n",
        user("alice")
    );
    let p = pop3_postern(&[&b], &users, "");
    let plain_ir = |u: &str, pw: &str| b64(format!("\0{u}\0{pw}").as_bytes());
    let logged_in = |c: &mut Client, answer: String| {
        assert!(answer.starts_with("+OK"), "{answer}");
        assert!(say(c, "STAT").starts_with("+OK"));
        assert!(say(c, "QUIT").starts_with("+OK"));
    };
    // AUTH PLAIN with an initial response.
    let mut c = pop3s(p.pop3s);
    let a = say(
        &mut c,
        &format!("AUTH PLAIN {}", plain_ir("alice", PASSWORD)),
    );
    logged_in(&mut c, a);
    // AUTH PLAIN with a continuation.
    let mut c = pop3s(p.pop3s);
    assert_eq!(say(&mut c, "AUTH PLAIN"), "+ ");
    let a = say(&mut c, &plain_ir("alice", PASSWORD));
    logged_in(&mut c, a);
    // Cancelled, then `=` (an empty response: no credentials), then LOGIN.
    let mut c = pop3s(p.pop3s);
    assert_eq!(say(&mut c, "AUTH PLAIN"), "+ ");
    assert!(say(&mut c, "*").starts_with("-ERR"));
    assert!(say(&mut c, "AUTH PLAIN =").starts_with("-ERR"));
    assert!(say(&mut c, "AUTH LOGIN").starts_with("+ "));
    assert!(say(&mut c, &b64(b"alice")).starts_with("+ "));
    let a = say(&mut c, &b64(PASSWORD.as_bytes()));
    logged_in(&mut c, a);
    // AUTH without a mechanism lists them.
    let mut c = pop3s(p.pop3s);
    assert!(say(&mut c, "AUTH").starts_with("+OK"));
    let mechs = multiline(&mut c);
    assert!(mechs.contains(&"PLAIN".to_owned()) && mechs.contains(&"LOGIN".to_owned()));
    // 1 KiB and 4 KiB passwords through PASS; 1 KiB through AUTH PLAIN
    // (a SASL message holds up to 4 KiB).
    for (name, pw) in [("long1", &long1), ("long4", &long4)] {
        let mut c = pop3s(p.pop3s);
        assert!(say(&mut c, &format!("USER {name}")).starts_with("+OK"));
        let a = say(&mut c, &format!("PASS {pw}"));
        logged_in(&mut c, a);
    }
    let mut c = pop3s(p.pop3s);
    let a = say(&mut c, &format!("AUTH PLAIN {}", plain_ir("long1", &long1)));
    logged_in(&mut c, a);
    assert_eq!(b.wait_pop3_logins_of("long4", 1), 1);
    assert_eq!(b.wait_pop3_logins_of("long1", 2), 2);
    // Commands before login are refused with a reason; a pipelined
    // command after PASS reaches the backend once logged in.
    let mut c = pop3s(p.pop3s);
    let a = say(&mut c, "STAT");
    assert!(a.starts_with("-ERR") && a.contains("log in first"), "{a}");
    c.send(format!("USER alice\r\nPASS {PASSWORD}\r\nSTAT\r\nQUIT\r\n").as_bytes());
    assert!(c.line().starts_with("+OK"));
    assert!(c.line().starts_with("+OK Logged in"));
    assert!(c.line().starts_with("+OK 0 0"));
    assert!(c.line().starts_with("+OK"));
    assert!(c.closed());
}

#[test]
fn a_wrong_password_never_reaches_the_backend_and_limits_end_with_err() {
    let (b, p) = world("pop3-wrong", &["alice", "dave"], "");
    let mut c = pop3s(p.pop3s);
    assert!(say(&mut c, "USER dave").starts_with("+OK"));
    let a = say(&mut c, "PASS wrong");
    assert_eq!(a, "-ERR [AUTH] Authentication failed.");
    assert!(say(&mut c, "QUIT").starts_with("+OK"));
    p.wait_metric(
        "postern_authentications_total{mechanism=\"USER\",protocol=\"pop3\",result=\"failure\"}",
        |v| v >= 1.0,
    );
    // alice's right login after it: the backend's log has hers, never dave's.
    let mut c = pop3s(p.pop3s);
    assert!(say(&mut c, "USER alice").starts_with("+OK"));
    assert!(say(&mut c, &format!("PASS {PASSWORD}")).starts_with("+OK"));
    assert!(say(&mut c, "QUIT").starts_with("+OK"));
    b.wait_pop3_logins_of("alice", 1);
    b.settle_pop3_log();
    assert!(
        !b.saw_user("dave"),
        "a refused password reached the backend"
    );

    // Too many bad commands: -ERR and a close.
    let mut c = pop3s(p.pop3s);
    let mut last = String::new();
    for _ in 0..20 {
        c.send(b"BOGUS\r\n");
        match c.try_line() {
            Some(l) => last = l,
            None => break,
        }
        if last.contains("closing") {
            break;
        }
    }
    assert!(
        last.starts_with("-ERR") && last.contains("too many invalid commands"),
        "{last}"
    );
    assert!(c.closed());
}

#[test]
fn in_use_is_told_as_the_backend_says_it_and_never_held_against_it() {
    common::backend::ensure_installed();
    let b = DovecotBackend::start_pop3_with_env(
        "pop3-inuse",
        &[("alice", PASSWORD)],
        &[("DOVECOT_POP3_LOCK", "1")],
    );
    // Dovecot waits about 10 s for the lock before it answers [IN-USE].
    let p = pop3_postern(&[&b], &user("alice"), "login_timeout: 30s");
    let mut first = pop3s(p.pop3s);
    assert!(say(&mut first, "USER alice").starts_with("+OK"));
    assert!(say(&mut first, &format!("PASS {PASSWORD}")).starts_with("+OK"));
    // Dovecot waits about 10 s for the lock before it answers [IN-USE].
    let mut second = pop3s(p.pop3s);
    assert!(say(&mut second, "USER alice").starts_with("+OK"));
    let a = say(&mut second, &format!("PASS {PASSWORD}"));
    assert!(a.starts_with("-ERR [IN-USE]"), "{a}");
    assert!(say(&mut first, "QUIT").starts_with("+OK"));
    p.wait_metric(
        "postern_backend_logins_total{protocol=\"pop3\",result=\"in_use\"}",
        |v| v >= 1.0,
    );
    assert_eq!(p.metric("postern_backend_up{backend=\"pop3-inuse\"}"), 1.0);
    // With the lock free, the same connection logs in.
    assert!(say(&mut second, "USER alice").starts_with("+OK"));
    assert!(say(&mut second, &format!("PASS {PASSWORD}")).starts_with("+OK"));
    assert!(say(&mut second, "QUIT").starts_with("+OK"));
}

#[test]
fn failover_backend_down_xclient_and_routing_as_for_imap() {
    common::backend::ensure_installed();
    let names: Vec<String> = (0..12).map(|i| format!("u{i}")).collect();
    let refs: Vec<(&str, &str)> = names.iter().map(|n| (n.as_str(), PASSWORD)).collect();
    let a = DovecotBackend::start_pop3_with_env("pop3-route-a", &refs, &[]);
    let bb = DovecotBackend::start_pop3_with_env("pop3-route-b", &refs, &[]);
    let yaml: String = names.iter().map(|n| user(n)).collect();
    let p = pop3_postern(&[&a, &bb], &yaml, "");
    // Each user's POP3 session lands where their IMAP session does; the
    // client's own address (127.0.0.7) reaches Dovecot through XCLIENT.
    for n in &names {
        let mut imap = Client::logged_in(p.imaps, n);
        drop(imap.command("z", "LOGOUT"));
        let s = tcp_from("127.0.0.7", p.pop3s);
        let mut c = Client::from_stream(tls_over(s, "localhost", &[b"pop3"]).unwrap());
        assert!(c.line().starts_with("+OK"));
        assert!(say(&mut c, &format!("USER {n}")).starts_with("+OK"));
        assert!(say(&mut c, &format!("PASS {PASSWORD}")).starts_with("+OK"));
        assert!(say(&mut c, "QUIT").starts_with("+OK"));
        let (on_a, on_b) = common::wait_for(
            &format!("{n}'s IMAP and POP3 logins in a backend log"),
            common::SETTLE,
            || {
                let on = |b: &DovecotBackend| {
                    (b.logins_of(n) - b.pop3_logins_of(n), b.pop3_logins_of(n))
                };
                (on(&a), on(&bb))
            },
            // (IMAP, POP3) logins on each backend.
            |((ia, pa), (ib, pb))| ia + ib == 1 && pa + pb == 1,
        );
        assert_eq!(on_a.0, on_a.1, "{n}: POP3 went where IMAP went");
        assert_eq!(on_b.0, on_b.1, "{n}: POP3 went where IMAP went");
    }
    let lines = a.pop3_logins().join("\n") + &bb.pop3_logins().join("\n");
    assert!(
        lines.contains("rip=127.0.0.7"),
        "XCLIENT forwarded the client: {lines}"
    );
    // One backend down: every user still gets in, on the other.
    a.stop();
    for n in &names {
        let mut c = pop3s(p.pop3s);
        assert!(say(&mut c, &format!("USER {n}")).starts_with("+OK"));
        let answer = say(&mut c, &format!("PASS {PASSWORD}"));
        assert!(answer.starts_with("+OK"), "{n}: {answer}");
        assert!(say(&mut c, "QUIT").starts_with("+OK"));
    }
    // Both down: -ERR [SYS/TEMP], the connection stays usable.
    bb.stop();
    let mut c = pop3s(p.pop3s);
    assert!(say(&mut c, "USER u0").starts_with("+OK"));
    let answer = say(&mut c, &format!("PASS {PASSWORD}"));
    assert!(answer.starts_with("-ERR [SYS/TEMP]"), "{answer}");
    assert!(say(&mut c, "QUIT").starts_with("+OK"));
}
