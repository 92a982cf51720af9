//! ManageSieve through Postern to real Dovecot backends (Pigeonhole's
//! dovecot-managesieved): sieve-connect uploads, lists, activates and
//! downloads a script; raw sessions for the capability lists, the
//! plaintext rule, STARTTLS injection, a wrong password that never reaches
//! the backend, PUTSCRIPT/LISTSCRIPTS/SETACTIVE/GETSCRIPT with literals,
//! `BYE` on shutdown, and a user's scripts landing on their IMAP backend.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::process::Command;

use base64::Engine as _;
use common::backend::DovecotBackend;
use common::client::{tcp, tls_over, Client};
use common::postern::{user, Postern, Setup, PASSWORD};

const SCRIPT: &str = "require \"fileinto\";\r\nif header :contains \"subject\" \"OK \\\"x\\\"\" {\r\n  fileinto \"INBOX\";\r\n}\r\n";

fn plain_auth(user: &str, password: &str) -> String {
    base64::engine::general_purpose::STANDARD.encode(format!("\0{user}\0{password}"))
}

/// A backend serving ManageSieve (its submission service relays nowhere:
/// these tests send no mail).
fn backend(name: &str, users: &[(&str, &str)]) -> DovecotBackend {
    DovecotBackend::start_services(name, users, &[], "127.0.0.1:9")
}

fn postern(backends: &[&DovecotBackend], users: &str) -> Postern {
    Postern::start(Setup {
        backends,
        users,
        sieve: true,
        extra: "limits:\n  shutdown_drain: 1s\n",
        ..Setup::default()
    })
}

/// Lines up to and including the one that starts with OK, NO or BYE.
fn response(c: &mut Client) -> Vec<String> {
    let mut lines = Vec::new();
    loop {
        let l = c.line();
        let done = ["OK", "NO", "BYE"]
            .iter()
            .any(|w| l.starts_with(&format!("{w} ")) || l == *w);
        lines.push(l);
        if done {
            return lines;
        }
    }
}

fn say(c: &mut Client, line: &str) -> Vec<String> {
    c.send(format!("{line}\r\n").as_bytes());
    response(c)
}

/// STARTTLS on a plain connection whose greeting was read; returns the
/// TLS client and the capabilities sent again after the handshake.
fn upgrade(
    s: std::net::TcpStream,
    r: &mut BufReader<std::net::TcpStream>,
    extra: &str,
) -> (Client, Vec<String>) {
    (&s).write_all(format!("STARTTLS\r\n{extra}").as_bytes())
        .unwrap();
    let mut line = String::new();
    r.read_line(&mut line).unwrap();
    assert!(line.starts_with("OK"), "{line}");
    assert!(r.buffer().is_empty());
    let mut c = Client::from_stream(tls_over(s, "localhost", &[b"managesieve"]).unwrap());
    let caps = response(&mut c);
    (c, caps)
}

fn greeted(
    port: u16,
) -> (
    std::net::TcpStream,
    BufReader<std::net::TcpStream>,
    Vec<String>,
) {
    let s = tcp(port);
    let mut r = BufReader::new(s.try_clone().unwrap());
    let mut lines = Vec::new();
    loop {
        let mut line = String::new();
        r.read_line(&mut line).unwrap();
        let line = line.trim_end().to_owned();
        let done = line.starts_with("OK");
        lines.push(line);
        if done {
            return (s, r, lines);
        }
    }
}

fn logged_in(port: u16, who: &str) -> Client {
    let (s, mut r, _) = greeted(port);
    let (mut c, _) = upgrade(s, &mut r, "");
    let answer = say(
        &mut c,
        &format!("AUTHENTICATE \"PLAIN\" \"{}\"", plain_auth(who, PASSWORD)),
    );
    assert_eq!(answer.last().unwrap(), "OK \"Logged in.\"", "{answer:?}");
    c
}

fn putscript(c: &mut Client, name: &str) {
    let put = format!("PUTSCRIPT \"{name}\" {{{}+}}\r\n{SCRIPT}\r\n", SCRIPT.len());
    c.send(put.as_bytes());
    let answer = response(c);
    assert!(answer.last().unwrap().starts_with("OK"), "{answer:?}");
}

#[test]
fn sieve_connect_uploads_lists_activates_and_downloads_through_postern() {
    let d = backend("sieve-client", &[("alice", PASSWORD)]);
    let p = postern(&[&d], &user("alice"));
    let local = p.dir.join("filter.sieve");
    std::fs::write(&local, SCRIPT).unwrap();
    let fetched = p.dir.join("fetched.sieve");
    let run = |args: &str| {
        let out = Command::new("bash")
            .arg("-c")
            .arg(format!(
                "sieve-connect --server 127.0.0.1 --port {} --user alice --notlsverify --passwordfd 3 {args} 3<<<\"$PW\"",
                p.sieve
            ))
            .env("PW", PASSWORD)
            .output()
            .expect("bash runs sieve-connect (scripts/test installs it)");
        assert!(
            out.status.success(),
            "sieve-connect {args}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    run(&format!(
        "--upload --localsieve {} --remotesieve filter",
        local.display()
    ));
    assert!(run("--list").contains("filter"));
    run("--activate --remotesieve filter");
    assert!(run("--list").contains("filter"));
    run(&format!(
        "--download --remotesieve filter --localsieve {}",
        fetched.display()
    ));
    assert_eq!(std::fs::read_to_string(&fetched).unwrap(), SCRIPT);
    let stored = d.dir.join("mail/alice/sieve/filter.sieve");
    assert_eq!(std::fs::read_to_string(stored).unwrap(), SCRIPT);
    d.wait_log("managesieve-login: Info: Login: user=<alice>");
    p.wait_metric(
        r#"postern_backend_logins_total{protocol="managesieve",result="success"}"#,
        |v| v >= 5.0,
    );
    // Each run logged out: whichever side closed first after the OK, the
    // ending is orderly, never a lost backend.
    p.wait_metric(
        r#"postern_sessions_ended_total{protocol="managesieve"}"#,
        |v| v >= 5.0,
    );
    assert_eq!(
        p.metric(r#"postern_sessions_ended_total{protocol="managesieve",reason="backend_lost"}"#),
        0.0
    );
}

#[test]
fn capabilities_plaintext_rule_injection_scripts_and_bye() {
    let d = backend("sieve-raw", &[("alice", PASSWORD)]);
    let p = postern(&[&d], &user("alice"));
    let (s, mut r, greeting) = greeted(p.sieve);
    assert!(greeting.iter().any(|l| l == "\"STARTTLS\""), "{greeting:?}");
    assert!(
        !greeting.iter().any(|l| l.starts_with("\"SASL\"")),
        "{greeting:?}"
    );
    assert!(
        greeting.iter().any(|l| l == "\"VERSION\" \"1.0\""),
        "{greeting:?}"
    );
    (&s).write_all(
        format!(
            "AUTHENTICATE \"PLAIN\" \"{}\"\r\n",
            plain_auth("alice", PASSWORD)
        )
        .as_bytes(),
    )
    .unwrap();
    let mut line = String::new();
    r.read_line(&mut line).unwrap();
    assert!(line.starts_with("NO (ENCRYPT-NEEDED)"), "{line}");

    // A login pipelined behind STARTTLS is dropped, not run.
    let injected = format!(
        "AUTHENTICATE \"PLAIN\" \"{}\"\r\n",
        plain_auth("alice", PASSWORD)
    );
    let (mut c, caps) = upgrade(s, &mut r, &injected);
    assert!(
        caps.iter().any(|l| l == "\"SASL\" \"PLAIN LOGIN\""),
        "{caps:?}"
    );
    assert!(!caps.iter().any(|l| l == "\"STARTTLS\""), "{caps:?}");
    assert_eq!(say(&mut c, "NOOP"), ["OK \"NOOP completed.\""]);

    // The wrong password stays at the edge.
    let answer = say(
        &mut c,
        &format!(
            "AUTHENTICATE \"PLAIN\" \"{}\"",
            plain_auth("alice", "wrong")
        ),
    );
    assert_eq!(answer, ["NO \"Authentication failed.\""]);
    d.settle_log();
    assert!(
        !d.saw_user("alice"),
        "the wrong password never reached Dovecot"
    );

    // A continuation answered with a literal, then scripts round trip.
    c.send(b"AUTHENTICATE \"PLAIN\"\r\n");
    assert_eq!(c.line(), "\"\"");
    let b64 = plain_auth("alice", PASSWORD);
    c.send(format!("{{{}+}}\r\n{b64}\r\n", b64.len()).as_bytes());
    assert_eq!(response(&mut c), ["OK \"Logged in.\""]);
    putscript(&mut c, "t");
    let listed = say(&mut c, "LISTSCRIPTS");
    assert_eq!(listed[0], "\"t\"", "{listed:?}");
    assert!(say(&mut c, "SETACTIVE \"t\"")
        .last()
        .unwrap()
        .starts_with("OK"));
    c.send(b"GETSCRIPT \"t\"\r\n");
    assert_eq!(c.line(), format!("{{{}}}", SCRIPT.len()));
    assert_eq!(c.bytes(SCRIPT.len()), SCRIPT.as_bytes());
    assert_eq!(c.line(), "");
    assert!(c.line().starts_with("OK"));

    // Shutdown: BYE at the response boundary.
    let status = Command::new("kill")
        .args(["-TERM", &p.pid().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    assert_eq!(c.line(), "BYE (TRYLATER) \"Server shutting down\"");
}

#[test]
fn scripts_land_on_the_users_imap_backend() {
    let who = common::user_preferring(&["sv1", "sv2"], "sv2");
    let users = [(who.as_str(), PASSWORD)];
    let d1 = backend("sv1", &users);
    let d2 = backend("sv2", &users);
    let p = postern(&[&d1, &d2], &user(&who));
    let mut c = logged_in(p.sieve, &who);
    putscript(&mut c, "where");
    assert!(d2
        .dir
        .join(format!("mail/{who}/sieve/where.sieve"))
        .exists());
    assert!(!d1.dir.join(format!("mail/{who}")).exists());
    assert!(Client::login_ok(p.imaps, &who));
    d2.wait_logins_of(&who, 2);
    d1.settle_log();
    assert_eq!(d1.logins_of(&who), 0);
}
