//! The pre-auth protocol over raw sockets against a real backend: literals,
//! SASL (PLAIN with and without SASL-IR, LOGIN, cancel), STARTTLS rules and
//! injection, LOGINDISABLED, and every limit ending in `* BYE`.

mod common;

use std::io::Write;

use base64::Engine;
use common::backend::DovecotBackend;
use common::client::{tcp, tls_over, Client};
use common::postern::{user, Postern, Setup, PASSWORD};

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

fn start(name: &str, extra: &str) -> (DovecotBackend, Postern) {
    common::postern::alice_behind(name, extra, "")
}

fn assert_logged_in(lines: &[String], tag: &str) {
    let last = lines.last().unwrap();
    assert!(
        last.starts_with(&format!("{tag} OK [CAPABILITY ")),
        "{lines:?}"
    );
    // The backend's post-login list, which Postern's pre-auth list lacks.
    assert!(last.contains("IDLE") && last.contains("MOVE"), "{last}");
    assert!(
        !last.contains("AUTH="),
        "post-login list has no AUTH=: {last}"
    );
}

#[test]
fn greeting_and_capabilities_on_each_port() {
    let (_b, p) = start("caps", "");
    let (mut c, greeting) = Client::imaps(p.imaps);
    assert!(
        greeting.starts_with("* OK [CAPABILITY IMAP4rev1 "),
        "{greeting}"
    );
    assert!(
        greeting.contains("AUTH=PLAIN")
            && greeting.contains("SASL-IR")
            && !greeting.contains("STARTTLS")
    );
    let lines = c.command("a", "CAPABILITY");
    assert!(
        lines[0].starts_with("* CAPABILITY ") && lines[0].contains("AUTH=LOGIN"),
        "{lines:?}"
    );
    assert_eq!(c.command("b", "NOOP"), vec!["b OK NOOP completed"]);
    let lines = c.command("c", "ID (\"name\" \"raw-test\" \"version\" \"1\")");
    assert!(lines[0].starts_with("* ID ("), "{lines:?}");
    assert_eq!(
        c.command("d", "LOGOUT"),
        vec!["* BYE Logging out", "d OK LOGOUT completed"]
    );
    assert!(c.closed());

    let (mut c, greeting) = Client::plain(p.imap);
    assert!(
        greeting.contains("STARTTLS") && greeting.contains("LOGINDISABLED"),
        "{greeting}"
    );
    assert!(!greeting.contains("AUTH="), "{greeting}");
    c.command("a", "NOOP");
}

#[test]
fn login_with_synchronizing_and_non_synchronizing_literals() {
    let (_b, p) = start("literals", "");
    let (mut c, _) = Client::imaps(p.imaps);
    c.send(b"a LOGIN {5}\r\n");
    assert!(
        c.line().starts_with("+ "),
        "continuation for a synchronizing literal"
    );
    c.send(format!("alice {{{}+}}\r\n{PASSWORD}\r\n", PASSWORD.len()).as_bytes());
    assert_logged_in(&c.until_tagged("a"), "a");
    assert!(c
        .command("b", "SELECT INBOX")
        .last()
        .unwrap()
        .starts_with("b OK"));
}

#[test]
fn authenticate_plain_with_sasl_ir() {
    let (_b, p) = start("sasl-ir", "");
    let (mut c, _) = Client::imaps(p.imaps);
    let lines = c.command(
        "a",
        &format!(
            "AUTHENTICATE PLAIN {}",
            b64(format!("\0alice\0{PASSWORD}").as_bytes())
        ),
    );
    assert_logged_in(&lines, "a");
    p.wait_metric(
        "postern_authentications_total{mechanism=\"PLAIN\",result=\"success\",source=\"static\"}",
        |v| v >= 1.0,
    );
}

#[test]
fn authenticate_plain_with_continuation_and_authzid_equal_to_user() {
    let (_b, p) = start("sasl-cont", "");
    let (mut c, _) = Client::imaps(p.imaps);
    c.send(b"a AUTHENTICATE PLAIN\r\n");
    assert_eq!(c.line(), "+ ");
    c.send(
        format!(
            "{}\r\n",
            b64(format!("alice\0alice\0{PASSWORD}").as_bytes())
        )
        .as_bytes(),
    );
    assert_logged_in(&c.until_tagged("a"), "a");
}

#[test]
fn authenticate_login_mechanism() {
    let (_b, p) = start("sasl-login", "");
    let (mut c, _) = Client::imaps(p.imaps);
    c.send(b"a AUTHENTICATE LOGIN\r\n");
    assert_eq!(c.line(), "+ VXNlcm5hbWU6");
    c.send(format!("{}\r\n", b64(b"alice")).as_bytes());
    assert_eq!(c.line(), "+ UGFzc3dvcmQ6");
    c.send(format!("{}\r\n", b64(PASSWORD.as_bytes())).as_bytes());
    assert_logged_in(&c.until_tagged("a"), "a");
}

#[test]
fn sasl_cancel_bad_base64_and_other_users_authzid() {
    let (b, p) = start("sasl-cancel", "");
    let (mut c, _) = Client::imaps(p.imaps);
    c.send(b"a AUTHENTICATE PLAIN\r\n");
    assert_eq!(c.line(), "+ ");
    c.send(b"*\r\n");
    assert_eq!(c.line(), "a BAD Authentication cancelled");
    let lines = c.command("b", "AUTHENTICATE PLAIN !!notbase64!!");
    assert!(lines[0].starts_with("b BAD "), "{lines:?}");
    let lines = c.command("c", "AUTHENTICATE CRAM-MD5");
    assert!(lines[0].starts_with("c NO "), "{lines:?}");
    let lines = c.command(
        "d",
        &format!(
            "AUTHENTICATE PLAIN {}",
            b64(format!("bob\0alice\0{PASSWORD}").as_bytes())
        ),
    );
    assert!(
        lines[0].starts_with("d NO [AUTHORIZATIONFAILED]"),
        "{lines:?}"
    );
    // Still usable after all that.
    assert_logged_in(&c.login("alice", PASSWORD), "L1");
    assert_eq!(b.wait_logins(1).len(), 1);
}

#[test]
fn plaintext_login_is_refused_with_privacyrequired() {
    let (b, p) = start("privacy", "");
    let (mut c, _) = Client::plain(p.imap);
    let lines = c.login("alice", PASSWORD);
    assert!(lines[0].starts_with("L1 NO [PRIVACYREQUIRED]"), "{lines:?}");
    let lines = c.command(
        "a",
        &format!(
            "AUTHENTICATE PLAIN {}",
            b64(format!("\0alice\0{PASSWORD}").as_bytes())
        ),
    );
    assert!(lines[0].starts_with("a NO [PRIVACYREQUIRED]"), "{lines:?}");
    b.settle_log();
    assert!(!b.saw_user("alice"), "the backend saw nothing");
}

#[test]
fn plaintext_login_allowed_only_when_configured() {
    common::backend::ensure_installed();
    let b = DovecotBackend::start_with_users("plain-allowed", &[("alice", PASSWORD)]);
    let p = Postern::start(Setup {
        backends: &[&b],
        users: &user("alice"),
        starttls_options: "allow_plaintext_auth: true",
        ..Setup::default()
    });
    let (mut c, greeting) = Client::plain(p.imap);
    assert!(
        greeting.contains("AUTH=PLAIN") && !greeting.contains("LOGINDISABLED"),
        "{greeting}"
    );
    assert_logged_in(&c.login("alice", PASSWORD), "L1");
}

#[test]
fn starttls_changes_capabilities_and_allows_login() {
    let (_b, p) = start("starttls", "");
    let mut c = Client::starttls(p.imap);
    let lines = c.command("a", "CAPABILITY");
    assert!(
        !lines[0].contains("STARTTLS") && lines[0].contains("AUTH=PLAIN"),
        "{lines:?}"
    );
    assert!(!lines[0].contains("LOGINDISABLED"), "{lines:?}");
    let lines = c.command("b", "STARTTLS");
    assert!(lines[0].starts_with("b BAD "), "second STARTTLS: {lines:?}");
    assert_logged_in(&c.login("alice", PASSWORD), "L1");
}

#[test]
fn starttls_on_implicit_port_is_bad() {
    let (_b, p) = start("starttls-implicit", "");
    let (mut c, _) = Client::imaps(p.imaps);
    let lines = c.command("a", "STARTTLS");
    assert!(lines[0].starts_with("a BAD "), "{lines:?}");
}

#[test]
fn commands_pipelined_after_starttls_are_never_executed() {
    let (_b, p) = start("starttls-inject", "");
    let s = tcp(p.imap);
    let mut plain = std::io::BufReader::new(s.try_clone().unwrap());
    let mut line = String::new();
    std::io::BufRead::read_line(&mut plain, &mut line).unwrap();
    // One segment: the injected `b CAPABILITY` arrives with STARTTLS.
    (&s).write_all(b"a STARTTLS\r\nb CAPABILITY\r\n").unwrap();
    line.clear();
    std::io::BufRead::read_line(&mut plain, &mut line).unwrap();
    assert!(line.starts_with("a OK"), "{line}");
    let tls = tls_over(s, "localhost", &[b"imap"]).expect("handshake after STARTTLS");
    let mut c = Client::from_stream(tls);
    c.send(b"c NOOP\r\n");
    assert_eq!(
        c.line(),
        "c OK NOOP completed",
        "the first response is to c, never to b"
    );
    let log = p.wait_for_log("discarded bytes pipelined after STARTTLS");
    assert!(log.contains("bytes=14"), "{log}");
    assert_eq!(
        p.wait_metric("postern_starttls_discarded_bytes_total", |v| v >= 14.0),
        14.0
    );
}

#[test]
fn unknown_and_authenticated_commands_get_bad_with_reason() {
    let (_b, p) = start("bad-commands", "");
    let (mut c, _) = Client::imaps(p.imaps);
    assert_eq!(
        c.command("a", "SELECT INBOX"),
        vec!["a BAD SELECT is not valid before login; log in first"]
    );
    assert_eq!(c.command("b", "FROBNICATE"), vec!["b BAD Unknown command"]);
    c.send(b"(((\r\n");
    assert_eq!(c.line(), "* BAD Missing or invalid tag");
    assert_eq!(
        c.command("d", "LOGIN alice"),
        vec!["d BAD LOGIN needs a user name and a password"]
    );
}

#[test]
fn too_many_bad_commands_end_with_bye() {
    let (_b, p) = start("bad-limit", "limits:\n  max_bad_commands: 3\n");
    let (mut c, _) = Client::imaps(p.imaps);
    c.command("a", "FOO");
    c.command("b", "FOO");
    c.send(b"c FOO\r\n");
    assert_eq!(c.line(), "c BAD Unknown command");
    assert_eq!(c.line(), "* BYE Too many invalid commands");
    assert!(c.closed());
}

#[test]
fn long_line_ends_with_bye() {
    let (_b, p) = start("long-line", "limits:\n  max_line: 1024\n");
    let (mut c, _) = Client::imaps(p.imaps);
    c.send(&vec![b'x'; 5000]);
    let line = c.line();
    assert!(line.starts_with("* BYE [TOOBIG]"), "{line}");
    assert!(c.closed());
}

#[test]
fn oversized_literal_is_refused_without_continuation() {
    let (_b, p) = start("big-literal", "limits:\n  max_literal: 1024\n");
    let (mut c, _) = Client::imaps(p.imaps);
    c.send(b"a LOGIN {2000}\r\n");
    let line = c.line();
    assert!(line.starts_with("* BYE [TOOBIG]"), "no `+`, a BYE: {line}");
    assert!(c.closed());
    let (mut c, _) = Client::imaps(p.imaps);
    c.send(b"a LOGIN {18446744073709551616}\r\n");
    assert!(c.line().starts_with("* BYE [TOOBIG]"));
}

#[test]
fn preauth_time_limit_ends_with_bye() {
    let (_b, p) = start("preauth-timeout", "limits:\n  preauth_timeout: 1s\n");
    let (mut c, _) = Client::imaps(p.imaps);
    let line = c.line();
    assert!(
        line.starts_with("* BYE ") && line.contains("time limit"),
        "{line}"
    );
    assert!(c.closed());
    p.wait_for_log("reason=\"preauth_timeout\"");
}

#[test]
fn silent_client_does_not_delay_others() {
    let (_b, p) = start("silent", "limits:\n  tls_handshake_timeout: 30s\n");
    // Connections that never send a ClientHello.
    let silent: Vec<_> = (0..20).map(|_| tcp(p.imaps)).collect();
    let started = std::time::Instant::now();
    let (mut c, greeting) = Client::imaps(p.imaps);
    assert!(greeting.starts_with("* OK"));
    assert_logged_in(&c.login("alice", PASSWORD), "L1");
    // Were the silent handshakes in its way, this would take their 30 s
    // timeout; a loaded machine gets the slack below that.
    assert!(
        started.elapsed() < std::time::Duration::from_secs(20),
        "{:?}",
        started.elapsed()
    );
    drop(silent);
}

#[test]
fn connections_over_the_limit_are_closed_at_accept() {
    let (_b, p) = start("conn-limit", "limits:\n  max_connections: 2\n");
    let (_one, _) = Client::imaps(p.imaps);
    let (_two, _) = Client::plain(p.imap);
    let (mut three, greeting) = Client::plain(p.imap);
    assert_eq!(greeting, "* BYE [UNAVAILABLE] Server busy, try again later");
    assert!(three.closed());
    assert_eq!(
        p.wait_metric(
            "postern_connections_rejected_total{listener=\"imap\"}",
            |v| v >= 1.0
        ),
        1.0
    );
    drop(_one);
    // A slot frees when a session ends.
    common::wait_until("a slot to free up", common::SETTLE, || {
        Client::plain(p.imap).1.starts_with("* OK")
    });
}

/// Plaintext after `OK Begin TLS` and before the ClientHello is never read
/// as a command: the handshake fails on it and nothing IMAP comes back.
#[test]
fn plaintext_between_starttls_ok_and_client_hello_is_never_executed() {
    use std::io::Read;
    let (_b, p) = start("starttls-gap", "");
    let s = tcp(p.imap);
    let mut plain = std::io::BufReader::new(s.try_clone().unwrap());
    let mut line = String::new();
    std::io::BufRead::read_line(&mut plain, &mut line).unwrap();
    (&s).write_all(b"a STARTTLS\r\n").unwrap();
    line.clear();
    std::io::BufRead::read_line(&mut plain, &mut line).unwrap();
    assert!(line.starts_with("a OK"), "{line}");
    (&s).write_all(b"b CAPABILITY\r\n").unwrap();
    let mut rest = Vec::new();
    let _ = plain.read_to_end(&mut rest);
    let text = String::from_utf8_lossy(&rest);
    assert!(
        !text.contains("CAPABILITY") && !text.contains("b OK") && !text.contains("b BAD"),
        "answered as IMAP: {text:?}"
    );
}

/// The injected command split over two segments around STARTTLS: whether
/// its tail arrives before or after the `OK`, it is never executed.
#[test]
fn a_command_split_around_starttls_is_never_executed() {
    let (_b, p) = start("starttls-split", "");
    let s = tcp(p.imap);
    let mut plain = std::io::BufReader::new(s.try_clone().unwrap());
    let mut line = String::new();
    std::io::BufRead::read_line(&mut plain, &mut line).unwrap();
    (&s).write_all(b"a STARTTLS\r\nb CAPA").unwrap();
    (&s).write_all(b"BILITY\r\n").unwrap();
    line.clear();
    std::io::BufRead::read_line(&mut plain, &mut line).unwrap();
    assert!(line.starts_with("a OK"), "{line}");
    // If the tail arrived after the OK it breaks the handshake (and the
    // TLS alert that says so may already be here, read with the OK); if it
    // arrived before, it was discarded with the head. Either way b never
    // runs.
    let after = plain.buffer();
    if !after.is_empty() {
        assert_eq!(after[0], 0x15, "only a TLS alert after the OK: {after:?}");
        return;
    }
    if let Ok(tls) = tls_over(s, "localhost", &[b"imap"]) {
        let mut c = Client::from_stream(tls);
        c.send(b"c NOOP\r\n");
        assert_eq!(c.line(), "c OK NOOP completed", "never an answer to b");
    }
}
