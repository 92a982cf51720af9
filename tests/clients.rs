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
    let logins = b.wait_logins(2);
    assert_eq!(
        logins.len(),
        2,
        "two sessions logged in at the backend: {logins:?}"
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
    // imaplib asks again after STARTTLS: the list has changed.
    let after_starttls = out
        .split("\"capabilities_before_login\": [")
        .nth(1)
        .unwrap();
    let after_starttls = &after_starttls[..after_starttls.find(']').unwrap()];
    assert!(
        !after_starttls.contains("STARTTLS") && after_starttls.contains("AUTH=PLAIN"),
        "{after_starttls}"
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
    let curl = |extra: &[&std::ffi::OsStr]| {
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
            .args(extra)
            .output()
            .expect("curl runs");
        assert!(
            out.status.success(),
            "curl {extra:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        out
    };
    curl(&["--upload-file".as_ref(), upload.0.as_os_str(), url.as_ref()]);
    let out = curl(&[format!("{url};UID=1").as_ref()]);
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
