//! Real IMAP clients through Postern to real Dovecot backends: Python's
//! imaplib over both TLS modes (login, select, append, fetch, store, IDLE
//! with DONE, logout) and curl over IMAPS.

mod common;

use common::backend::DovecotBackend;
use common::postern::{user, Postern, Setup, PASSWORD};
use std::process::Command;

/// Runs the imaplib script; returns its JSON output line.
fn python_session(mode: &str, port: u16, user: &str) -> String {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/python/imap_session.py");
    let out = Command::new("python3")
        .args([script, mode, &port.to_string(), user, PASSWORD])
        .output()
        .expect("python3 runs");
    assert!(
        out.status.success(),
        "imaplib session failed:\nstdout: {}\nstderr: {}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn setup_one(backend: &DovecotBackend, users: &str) -> Postern {
    Postern::start(Setup {
        backends: &[backend],
        users,
        ..Setup::default()
    })
}

#[test]
fn imaplib_full_session_over_imaps() {
    common::backend::ensure_installed();
    let b = DovecotBackend::start_with_users("imaps-session", &[("alice", PASSWORD)]);
    let p = setup_one(&b, &user("alice"));
    let out = python_session("imaps", p.imaps, "alice");
    assert!(out.contains("\"ok\": true"), "{}", out);
    assert!(out.contains("through postern"), "fetched subject: {}", out);
    assert!(out.contains("\\\\Flagged"), "flags: {}", out);
    assert!(out.contains("\"idle_continuation\": \"+"), "{}", out);
    assert!(out.contains("EXISTS"), "IDLE saw the new message: {}", out);
    // The tagged OK of LOGIN carries the backend's post-login capabilities.
    assert!(
        out.contains("\"login_response\": \"[CAPABILITY IMAP4rev1"),
        "{}",
        out
    );
    assert!(out.contains("IDLE") && out.contains("MOVE"), "{}", out);
    assert_eq!(
        b.logins().len(),
        2,
        "two sessions logged in at the backend: {:?}",
        b.logins()
    );
}

#[test]
fn imaplib_full_session_over_starttls() {
    common::backend::ensure_installed();
    let b = DovecotBackend::start_with_users("starttls-session", &[("bob", PASSWORD)]);
    let p = setup_one(&b, &user("bob"));
    let out = python_session("starttls", p.imap, "bob");
    assert!(out.contains("\"ok\": true"), "{}", out);
    assert!(out.contains("EXISTS"), "{}", out);
    assert!(
        out.contains("STARTTLS LOGINDISABLED"),
        "the plain greeting offers STARTTLS: {}",
        out
    );
    assert!(
        !out.contains("\"capabilities_before_login\": [\"STARTTLS"),
        "{}",
        out
    );
    let log = p.wait_for_log("session ended");
    assert!(
        log.contains("user=\"bob\"") || log.contains("user=bob"),
        "{log}"
    );
}

#[test]
fn curl_reads_inbox_over_imaps() {
    common::backend::ensure_installed();
    let b = DovecotBackend::start_with_users("curl", &[("carol", PASSWORD)]);
    let p = setup_one(&b, &user("carol"));
    // Put a message in carol's INBOX through Postern, then read it with curl.
    let mut upload =
        tempfile(b"From: a@example.com\r\nSubject: curl test\r\n\r\nread me through postern\r\n");
    let url = format!("imaps://127.0.0.1:{}/INBOX", p.imaps);
    let out = Command::new("curl")
        .args([
            "--silent",
            "--show-error",
            "--insecure",
            "--max-time",
            "20",
            "--user",
        ])
        .arg(format!("carol:{PASSWORD}"))
        .arg("--upload-file")
        .arg(&upload.0)
        .arg(&url)
        .output()
        .expect("curl runs");
    assert!(
        out.status.success(),
        "curl APPEND: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = Command::new("curl")
        .args([
            "--silent",
            "--show-error",
            "--insecure",
            "--max-time",
            "20",
            "--user",
        ])
        .arg(format!("carol:{PASSWORD}"))
        .arg(format!("{url};UID=1"))
        .output()
        .expect("curl runs");
    assert!(
        out.status.success(),
        "curl FETCH: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("read me through postern"));
    upload.remove();
}

struct TempFile(std::path::PathBuf);
impl TempFile {
    fn remove(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}
fn tempfile(bytes: &[u8]) -> TempFile {
    let p = std::env::temp_dir().join(format!("postern-curl-{}", std::process::id()));
    std::fs::write(&p, bytes).unwrap();
    TempFile(p)
}
