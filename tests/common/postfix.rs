//! A real Postfix MTA for the submission tests: a private instance that
//! `scripts/postfix-backend` starts in its own temporary directory, smtpd
//! on a free loopback port, XCLIENT allowed from loopback, every message
//! delivered to one maildir. Dropping it kills the instance and deletes the
//! directory.
//!
//! Postfix logs (to `postfix.log` in its directory) a line per message
//! such as `smtpd[6963]: 073E498E052: client=unknown[192.0.2.7],
//! sasl_method=XCLIENT, sasl_username=alice`, and `connect from …` for
//! every connection; it writes them a moment after the fact, so wait for a
//! line (`wait_log`) before asserting on it.
#![allow(dead_code)]

use std::fs;
use std::path::PathBuf;
use std::process::Command;

use super::free_port;

pub struct PostfixServer {
    pub port: u16,
    pub dir: PathBuf,
}

fn script() -> Command {
    Command::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/scripts/postfix-backend"
    ))
}

/// Panics unless Postfix can be run: the tests must fail loudly, never
/// skip, when it is missing.
pub fn ensure_installed() {
    let found = ["/usr/sbin/postfix", "/sbin/postfix"]
        .iter()
        .any(|p| std::path::Path::new(p).is_file());
    assert!(
        found,
        "postfix is not installed, and the submission tests need a real MTA; \
         install it with `scripts/postfix-backend install` (as root)"
    );
}

impl PostfixServer {
    pub fn start(name: &str) -> PostfixServer {
        ensure_installed();
        let dir = std::env::temp_dir().join(format!(
            "postern-test-postfix-{name}-{}-{}",
            std::process::id(),
            free_port()
        ));
        let _ = fs::remove_dir_all(&dir);
        let mut last = String::new();
        for _ in 0..3 {
            let port = free_port();
            let out = script()
                .arg("start")
                .arg(&dir)
                .arg(port.to_string())
                .output()
                .expect("run scripts/postfix-backend");
            if out.status.success() {
                return PostfixServer { port, dir };
            }
            last = String::from_utf8_lossy(&out.stderr).into_owned();
            let _ = script().arg("kill").arg(&dir).output();
        }
        panic!("postfix {name:?} did not start:\n{last}");
    }

    /// "127.0.0.1:PORT".
    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    pub fn log(&self) -> String {
        fs::read_to_string(self.dir.join("postfix.log")).unwrap_or_default()
    }

    pub fn wait_log(&self, needle: &str) -> String {
        super::wait_for(
            &format!("{needle:?} in the Postfix log"),
            super::SETTLE,
            || super::LogText(self.log()),
            |log| log.0.contains(needle),
        )
        .0
    }

    /// The messages delivered so far (the maildir's files), whole.
    pub fn delivered(&self) -> Vec<Vec<u8>> {
        let new = self.dir.join("mail/inbox/new");
        let mut out = Vec::new();
        for entry in fs::read_dir(new).into_iter().flatten().flatten() {
            if let Ok(bytes) = fs::read(entry.path()) {
                out.push(bytes);
            }
        }
        out
    }

    /// Waits until a delivered message satisfies `found`, and returns it.
    pub fn wait_delivered(&self, what: &str, found: impl Fn(&[u8]) -> bool) -> Vec<u8> {
        super::wait_for(
            &format!("a message {what} delivered by Postfix"),
            super::SETTLE,
            || Delivered(self.delivered()),
            |all| all.0.iter().any(|m| found(m)),
        )
        .0
        .into_iter()
        .find(|m| found(m))
        .expect("found above")
    }
}

/// Messages, shown by their count and sizes only.
struct Delivered(Vec<Vec<u8>>);

impl std::fmt::Debug for Delivered {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let sizes: Vec<usize> = self.0.iter().map(Vec::len).collect();
        write!(f, "{} message(s) of {sizes:?} bytes", self.0.len())
    }
}

impl Drop for PostfixServer {
    fn drop(&mut self) {
        let _ = script().arg("kill").arg(&self.dir).output();
        if std::thread::panicking() {
            let log = self.log();
            let tail: Vec<&str> = log.lines().rev().take(20).collect();
            eprintln!("--- last lines of postfix ({}) ---", self.dir.display());
            tail.iter().rev().for_each(|line| eprintln!("{line}"));
        }
        let _ = fs::remove_dir_all(&self.dir);
    }
}
