//! The command line: `check-config` names the key and line of an error and
//! checks the shipped configs; `hash-password` prints hashes Postern reads.

use std::io::Write;
use std::process::{Command, Stdio};

use postern::auth::password::PasswordHash;

fn postern(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_postern"))
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
        let mut child = Command::new(env!("CARGO_BIN_EXE_postern"))
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

#[test]
fn run_refuses_an_address_another_process_holds_even_with_reuseport() {
    // A foreign listener with SO_REUSEPORT would silently share the port
    // with Postern's own SO_REUSEPORT sockets; Postern must refuse instead.
    let foreign = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    foreign.set_reuse_port(true).unwrap();
    foreign
        .bind(
            &"127.0.0.1:0"
                .parse::<std::net::SocketAddr>()
                .unwrap()
                .into(),
        )
        .unwrap();
    foreign.listen(16).unwrap();
    let port = foreign.local_addr().unwrap().as_socket().unwrap().port();
    let dir = std::env::temp_dir().join(format!("postern-cli-reuse-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("u.yaml"), "users: []\n").unwrap();
    let config = dir.join("p.yaml");
    std::fs::write(
        &config,
        format!(
            "listeners:\n  - {{ name: imaps, bind: \"127.0.0.1:{port}\", tls: implicit }}\nauth:\n  source: static\n  static: {{ users_file: u.yaml }}\nbackends:\n  pool: [ {{ name: a, address: \"127.0.0.1:1\" }} ]\nmetrics: {{ bind: \"127.0.0.1:0\" }}\nworkers: 2\n"
        ),
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_postern"))
        .args(["run", "--config", config.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("cannot bind") && err.contains("imaps"),
        "{err}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
