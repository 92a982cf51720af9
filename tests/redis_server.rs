//! The test Redis (`common::redis::RedisServer`) that the cluster store's
//! tests stand on: it starts with a password, shows what was written to
//! it, and stops and comes back on the same address as a store that went
//! away would.

mod common;

use std::process::Command;

use common::redis::RedisServer;

#[test]
fn redis_server_starts_shows_keys_stops_and_restarts() {
    let mut redis = RedisServer::start();
    assert_eq!(redis.url(), format!("redis://127.0.0.1:{}/0", redis.port));
    assert_eq!(
        std::fs::read_to_string(redis.password_file()).unwrap(),
        format!("{}\n", redis.password())
    );
    assert!(redis.answers_ping());

    // Without the password, nothing.
    let out = Command::new("redis-cli")
        .args(["-p", &redis.port.to_string(), "GET", "x"])
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("NOAUTH"),
        "{out:?}"
    );

    // A key written by another client, as Postern's would be.
    let port = redis.port.to_string();
    for command in [
        &["SET", "postern:lease:a", "replica-1"][..],
        &[
            "HSET",
            "postern:user:b",
            "backend",
            "mail-1",
            "sessions",
            "2",
        ],
        &["SADD", "postern:drained", "mail-2"],
        &["ZADD", "postern:sessions:b", "1700000000", "s1|replica-1"],
    ] {
        let out = Command::new("redis-cli")
            .args(["-p", &port, "--no-auth-warning", "-a", redis.password()])
            .args(command)
            .output()
            .unwrap();
        assert!(out.status.success(), "{command:?}: {out:?}");
    }
    assert_eq!(redis.keys("postern:lease:*"), ["postern:lease:a"]);
    assert_eq!(
        redis.dump_all(),
        [
            ("postern:drained".to_owned(), "mail-2".to_owned()),
            ("postern:lease:a".to_owned(), "replica-1".to_owned()),
            (
                "postern:sessions:b".to_owned(),
                "s1|replica-1 1700000000".to_owned()
            ),
            (
                "postern:user:b".to_owned(),
                "backend=mail-1\nsessions=2".to_owned()
            ),
        ]
    );

    // Killed: it answers nothing; restarted: it answers again, empty,
    // on the same port with the same password.
    redis.stop();
    assert!(!redis.answers_ping());
    redis.restart();
    assert!(redis.answers_ping());
    assert_eq!(redis.port.to_string(), port);
    assert!(redis.keys("*").is_empty());
}
