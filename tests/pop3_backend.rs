//! The POP3 side of the Dovecot test backends (`DovecotBackend::start_pop3*`,
//! `scripts/dovecot-backend` with DOVECOT_POP3_PORT), which the POP3 tests
//! build on: the same users and maildrops as IMAP, XCLIENT offered to
//! loopback in the greeting, the master user, the log helpers, and the
//! maildrop lock that DOVECOT_POP3_LOCK turns on.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;

use common::backend::{DovecotBackend, MASTER_PASSWORD, MASTER_USER};

/// A plain POP3 connection straight to a backend.
struct Pop3 {
    reader: BufReader<TcpStream>,
    writer: TcpStream,
}

impl Pop3 {
    /// Connects and returns the greeting too.
    fn connect(addr: &str) -> (Pop3, String) {
        let tcp = TcpStream::connect(addr).expect("connect to the backend's POP3 port");
        tcp.set_read_timeout(Some(common::client::TIMEOUT)).unwrap();
        let mut c = Pop3 {
            reader: BufReader::new(tcp.try_clone().unwrap()),
            writer: tcp,
        };
        let greeting = c.line();
        (c, greeting)
    }

    fn line(&mut self) -> String {
        let mut line = String::new();
        self.reader
            .read_line(&mut line)
            .expect("a line from the backend");
        assert!(line.ends_with("\r\n"), "cut short: {line:?}");
        line.truncate(line.len() - 2);
        line
    }

    fn command(&mut self, command: &str) -> String {
        self.writer
            .write_all(format!("{command}\r\n").as_bytes())
            .unwrap();
        self.line()
    }

    /// A multi-line answer's lines up to the terminating ".", unstuffed.
    fn lines(&mut self) -> Vec<String> {
        let mut out = Vec::new();
        loop {
            let line = self.line();
            if line == "." {
                return out;
            }
            out.push(line.strip_prefix('.').map_or(line.clone(), str::to_owned));
        }
    }

    fn login(&mut self, user: &str, password: &str) -> String {
        let ok = self.command(&format!("USER {user}"));
        assert!(ok.starts_with("+OK"), "USER {user}: {ok}");
        self.command(&format!("PASS {password}"))
    }
}

#[test]
fn pop3_backend_serves_the_imap_users_maildrops() {
    let b = DovecotBackend::start_pop3("pop3-fixture");
    assert_ne!(b.pop3_addr(), b.addr());
    let message = b"From: bob@example.com\r\nTo: alice@example.com\r\nSubject: hi\r\n\r\n.dot-stuffed line\r\nbye\r\n";
    b.deliver("alice", message);

    let (mut c, greeting) = Pop3::connect(&b.pop3_addr());
    // A trusted (loopback) client is offered XCLIENT in the greeting.
    assert!(greeting.starts_with("+OK [XCLIENT]"), "{greeting}");
    let xclient = c.command("XCLIENT ADDR=192.0.2.7 PORT=4321");
    assert!(xclient.starts_with("+OK"), "{xclient}");
    let ok = c.login("alice", "wonderland");
    assert!(ok.starts_with("+OK"), "{ok}");
    assert_eq!(c.command("STAT"), format!("+OK 1 {}", message.len()));
    assert!(c.command("RETR 1").starts_with("+OK"));
    let body = c.lines().join("\r\n") + "\r\n";
    assert_eq!(body.as_bytes(), message);
    assert!(c.command("QUIT").starts_with("+OK"));

    let logins = b.wait_pop3_logins(1);
    assert!(logins[0].contains("user=<alice>"), "{logins:?}");
    assert!(
        logins[0].contains("rip=192.0.2.7,"),
        "XCLIENT set the address: {logins:?}"
    );
    // The general helpers count POP3 logins too.
    assert_eq!(b.logins_of("alice"), 1);
    assert!(b.saw_user("alice"));

    // The master user, and a wrong password that only saw_user notices.
    let (mut c, _) = Pop3::connect(&b.pop3_addr());
    let ok = c.login(&format!("bob*{MASTER_USER}"), MASTER_PASSWORD);
    assert!(ok.starts_with("+OK"), "{ok}");
    assert_eq!(c.command("STAT"), "+OK 0 0");
    c.command("QUIT");
    let (mut c, _) = Pop3::connect(&b.pop3_addr());
    let refused = c.login("carol", "wrong");
    assert!(refused.starts_with("-ERR [AUTH]"), "{refused}");
    c.command("QUIT");
    assert_eq!(b.wait_pop3_logins_of("bob", 1), 1);
    b.settle_pop3_log();
    assert_eq!(b.pop3_logins_of("carol"), 0);
    assert!(b.saw_user("carol"));

    // IMAP is still served, from the same maildrop.
    let mut imap = common::client::Client::from_stream(common::client::tcp(b.port));
    imap.line();
    assert!(imap
        .command("L", "LOGIN alice wonderland")
        .last()
        .unwrap()
        .starts_with("L OK"));
    assert!(imap
        .command("S", "SELECT INBOX")
        .iter()
        .any(|l| l == "* 1 EXISTS"));
    imap.command("Z", "LOGOUT");
    b.wait_logins_of("alice", 2);
    assert_eq!(b.pop3_logins_of("alice"), 1);
}

#[test]
fn pop3_lock_refuses_a_second_session_with_in_use() {
    let b = DovecotBackend::start_pop3_with_env(
        "pop3-lock",
        &[("alice", "wonderland")],
        &[("DOVECOT_POP3_LOCK", "1")],
    );
    let (mut first, _) = Pop3::connect(&b.pop3_addr());
    assert!(first.login("alice", "wonderland").starts_with("+OK"));
    // Dovecot waits about 10 s for the lock before it gives up.
    let (mut second, _) = Pop3::connect(&b.pop3_addr());
    let refused = second.login("alice", "wonderland");
    assert!(refused.starts_with("-ERR [IN-USE]"), "{refused}");
    assert!(first.command("STAT").starts_with("+OK"));
    first.command("QUIT");
    // Once the first session is gone, a new one gets in.
    let (mut third, _) = Pop3::connect(&b.pop3_addr());
    assert!(third.login("alice", "wonderland").starts_with("+OK"));
    third.command("QUIT");
}
