//! Literal and nesting attacks on the pre-auth parser, against a real
//! backend: `{0}`, garbage after a literal, a non-synchronizing literal
//! inside an invalid command (consumed as data, never run as a command),
//! a non-synchronizing literal over the pre-auth cap, literals that pass
//! it only together, one of exactly the cap, and deep nesting.
//! The connection stays usable where the protocol allows, and nothing
//! reaches the backend. (Length overflow and literals over the cap without
//! `+` are in tests/preauth.rs.)

mod common;

use common::client::Client;
use common::postern::PASSWORD;

fn start(name: &str) -> (common::backend::DovecotBackend, common::postern::Postern) {
    common::postern::alice_behind(name, "limits:\n  max_literal: 1024\n", "")
}

/// Alice logs in on `c`, and that is the one login the backend has seen.
fn logs_in_once(c: &mut Client, b: &common::backend::DovecotBackend) {
    assert!(c
        .login("alice", PASSWORD)
        .last()
        .unwrap()
        .starts_with("L1 OK"));
    let logins = b.wait_logins(1);
    assert_eq!(logins.len(), 1, "{logins:?}");
    assert!(logins[0].contains("user=<alice>"), "{logins:?}");
}

#[test]
fn an_empty_literal_is_an_empty_string() {
    let (b, p) = start("lit-empty");
    let (mut c, _) = Client::imaps(p.imaps);
    c.send(b"A1 LOGIN {0}\r\n");
    assert!(c.line().starts_with('+'), "a synchronizing literal gets +");
    c.send(format!(" {PASSWORD}\r\n").as_bytes());
    let answer = c.until_tagged("A1");
    assert!(answer.last().unwrap().starts_with("A1 NO"), "{answer:?}");
    // Only the real login reached the backend.
    logs_in_once(&mut c, &b);
}

#[test]
fn garbage_after_a_literal_is_a_bad_command() {
    let (_b, p) = start("lit-garbage");
    let (mut c, _) = Client::imaps(p.imaps);
    c.send(b"A1 LOGIN {5+}\r\nalice\"stray quote\" more\r\n");
    let answer = c.until_tagged("A1");
    assert!(answer.last().unwrap().starts_with("A1 BAD"), "{answer:?}");
    let lines = c.command("A2", "NOOP");
    assert_eq!(lines.last().unwrap(), "A2 OK NOOP completed");
}

/// The literal's bytes belong to the command that announced it: a command
/// hidden in them is data, never run, even when that command is invalid.
#[test]
fn a_command_inside_a_literal_is_never_run() {
    let (b, p) = start("lit-hidden");
    let (mut c, _) = Client::imaps(p.imaps);
    let hidden = format!("H1 LOGIN alice {PASSWORD}\r\n");
    c.send(format!("A1 FROBNICATE {{{}+}}\r\n{hidden}\r\n", hidden.len()).as_bytes());
    let answer = c.until_tagged("A1");
    assert!(answer.last().unwrap().starts_with("A1 BAD"), "{answer:?}");
    let lines = c.command("A2", "NOOP");
    assert_eq!(
        lines,
        vec!["A2 OK NOOP completed"],
        "no H1 answer: the hidden LOGIN was not run"
    );
    b.settle_log();
    assert!(b.logins().is_empty(), "{:?}", b.logins());
}

#[test]
fn a_non_synchronizing_literal_over_the_cap_ends_the_connection() {
    let (_b, p) = start("lit-nonsync-big");
    let (mut c, _) = Client::imaps(p.imaps);
    c.send(b"A1 LOGIN {4096+}\r\n");
    let line = c.line();
    assert!(line.starts_with("* BYE [TOOBIG]"), "{line}");
    assert!(c.closed());
}

/// The cap (`limits.max_literal`, 1024 here) is on a command's literal
/// bytes in all: a literal of exactly the cap is read and judged (a wrong
/// password, the session goes on); two that add up to more end it.
#[test]
fn literals_up_to_the_cap_are_read_and_add_up() {
    let (b, p) = start("lit-nonsync-cap");
    let (mut c, _) = Client::imaps(p.imaps);
    let mut command = b"A1 LOGIN alice {1024+}\r\n".to_vec();
    command.extend_from_slice(&[b'p'; 1024]);
    command.extend_from_slice(b"\r\n");
    c.send(&command);
    let answer = c.until_tagged("A1");
    assert!(answer.last().unwrap().starts_with("A1 NO"), "{answer:?}");
    logs_in_once(&mut c, &b);

    let (mut c, _) = Client::imaps(p.imaps);
    let mut command = b"A1 LOGIN {600+}\r\n".to_vec();
    command.extend_from_slice(&[b'u'; 600]);
    command.extend_from_slice(b" {600+}\r\n");
    c.send(&command);
    let line = c.line();
    assert!(line.starts_with("* BYE [TOOBIG]"), "{line}");
    assert!(c.closed());
}

#[test]
fn deep_nesting_is_a_bad_command_not_a_deep_parse() {
    let (_b, p) = start("lit-nesting");
    let (mut c, _) = Client::imaps(p.imaps);
    let nested = "(".repeat(4000) + &")".repeat(4000);
    c.send(format!("A1 ID {nested}\r\n").as_bytes());
    let answer = c.until_tagged("A1");
    assert!(answer.last().unwrap().starts_with("A1 BAD"), "{answer:?}");
    let lines = c.command("A2", "NOOP");
    assert_eq!(lines.last().unwrap(), "A2 OK NOOP completed");
}
