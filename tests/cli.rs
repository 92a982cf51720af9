//! The command line: `check-config` names the key and line of an error and
//! checks the shipped configs; `hash-password` prints hashes Postern reads.

mod common;

use std::io::Write;
use std::process::{Command, Stdio};

use postern::auth::password::PasswordHash;

fn postern(args: &[&str]) -> std::process::Output {
    Command::new(common::postern::binary())
        .args(args)
        .output()
        .unwrap()
}

#[test]
fn shipped_demo_config_checks_clean() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/config/demo.yaml");
    let out = postern(&["check-config", path]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("configuration OK"));
}

/// Every complete example under config/ loads (files it names need not exist).
#[test]
fn every_example_config_parses() {
    let dir = std::path::Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/config"));
    let mut seen = 0;
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.to_string_lossy().ends_with(".example.yaml") {
            postern::config::Config::load(&path)
                .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            seen += 1;
        }
    }
    assert!(seen >= 2, "{seen} examples");
}

#[test]
fn example_config_parses_with_every_key() {
    let path = std::path::Path::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/config/postern.example.yaml"
    ));
    let config = postern::config::Config::load(path).expect("the commented example is valid");
    assert_eq!(config.listeners.len(), 2);
    assert_eq!(
        config.limits.idle_timeout,
        std::time::Duration::from_secs(31 * 60)
    );
}

#[test]
fn check_config_names_key_and_line() {
    let dir = std::env::temp_dir().join(format!("postern-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("bad.yaml");
    std::fs::write(
        &path,
        "listeners:\n  - { name: imaps, bind: \"127.0.0.1:9993\", tls: implicit }\nauth:\n  source: static\n  static: { users_file: u.yaml }\nbackends:\n  pool:\n    - { name: a, adress: \"127.0.0.1:1\" }\n",
    )
    .unwrap();
    let out = postern(&["check-config", path.to_str().unwrap()]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("line 8") && err.contains("adress") && err.contains("backends.pool[0]"),
        "{err}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn hash_password_prints_a_hash_postern_verifies() {
    for scheme in ["argon2id", "bcrypt", "sha512-crypt"] {
        let mut child = Command::new(common::postern::binary())
            .args(["hash-password", "--scheme", scheme])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(b"s3cret pass\n")
            .unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success());
        let hash = String::from_utf8(out.stdout).unwrap();
        let parsed = PasswordHash::parse(hash.trim()).unwrap();
        assert!(parsed.verify(b"s3cret pass"), "{scheme}");
        assert!(!parsed.verify(b"s3cret pas"), "{scheme}");
    }
}

#[test]
fn version_is_printed() {
    let out = postern(&["--version"]);
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("postern "));
}
