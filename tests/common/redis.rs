//! A throwaway Redis for tests of the cluster store: Debian's
//! `redis-server` on a free loopback port, with a random password, no
//! snapshots and no append-only file, in its own temporary directory;
//! killed and removed when dropped. `stop` kills it (as a crashed or
//! unreachable store), `restart` brings it back, empty, on the same port
//! with the same password.
//!
//! What is in it is read with `redis-cli` (`keys`, `dump_all`), so a test
//! sees the store as an operator would, not through Postern's own client.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use rand::distributions::{Alphanumeric, DistString};

use super::{free_port, wait_until, SETTLE};

const SERVER: &str = "/usr/bin/redis-server";
const CLI: &str = "/usr/bin/redis-cli";
/// How often `start` picks a new port after another process took its port.
const PORT_ATTEMPTS: usize = 3;

/// Fails loudly when Redis is missing: scripts/test installs it.
pub fn ensure_installed() {
    for tool in [SERVER, CLI] {
        assert!(
            Path::new(tool).exists(),
            "{tool} is missing: apt-get install redis-server redis-tools (scripts/test does)"
        );
    }
}

pub struct RedisServer {
    pub dir: PathBuf,
    pub port: u16,
    password: String,
    child: Option<Child>,
}

impl RedisServer {
    /// Starts a server and waits until it answers PING.
    pub fn start() -> RedisServer {
        ensure_installed();
        static COUNTER: AtomicU32 = AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!(
            "postern-test-redis-{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        let password = Alphanumeric.sample_string(&mut rand::thread_rng(), 24);
        fs::write(dir.join("password"), format!("{password}\n")).unwrap();
        let mut server = RedisServer {
            dir,
            port: 0,
            password,
            child: None,
        };
        let mut failed = String::new();
        for _ in 0..PORT_ATTEMPTS {
            server.port = free_port();
            match server.spawn() {
                Ok(()) => return server,
                // Another process bound the port after free_port released it.
                Err(log) if log.contains("Address already in use") => failed = log,
                Err(log) => panic!("redis-server did not start on port {}:\n{log}", server.port),
            }
        }
        panic!("redis-server: the port was taken {PORT_ATTEMPTS} times in a row:\n{failed}")
    }

    /// Runs redis-server on `self.port` and waits until it answers PING;
    /// its log if it exited first.
    fn spawn(&mut self) -> Result<(), String> {
        let log = fs::File::create(self.log_path()).unwrap();
        let mut child = Command::new(SERVER)
            .args(["--bind", "127.0.0.1", "--port", &self.port.to_string()])
            .args(["--save", "", "--appendonly", "no"])
            .args(["--requirepass", &self.password])
            .arg("--dir")
            .arg(&self.dir)
            .args(["--daemonize", "no", "--logfile", ""])
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("run redis-server");
        let deadline = Instant::now() + SETTLE;
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                return Err(format!("exited with {status}; its log:\n{}", self.log()));
            }
            if self.answers_ping() {
                self.child = Some(child);
                return Ok(());
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "redis-server on port {} did not answer PING within {SETTLE:?}; its log:\n{}",
                    self.port,
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// `redis://127.0.0.1:PORT/0`; the password is apart (`password`,
    /// `password_file`), as Postern's configuration takes it.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    pub fn password(&self) -> &str {
        &self.password
    }

    /// A file holding the password on one line (`cluster.store.password_file`).
    pub fn password_file(&self) -> PathBuf {
        self.dir.join("password")
    }

    fn log_path(&self) -> PathBuf {
        self.dir.join("redis.log")
    }

    /// The server's log so far.
    pub fn log(&self) -> String {
        fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// Whether the server answers an authenticated PING with PONG now.
    pub fn answers_ping(&self) -> bool {
        self.try_cli(&["PING"])
            .is_some_and(|out| out.trim() == "\"PONG\"")
    }

    /// Kills the server (SIGKILL) and waits for it: its port refuses
    /// connections when this returns, and what it held is gone.
    pub fn stop(&mut self) {
        let mut child = self.child.take().expect("the server is running");
        child.kill().expect("kill redis-server");
        child.wait().expect("wait for redis-server");
        assert!(
            !self.answers_ping(),
            "redis-server still answers after SIGKILL"
        );
    }

    /// Starts it again, empty, on the same port with the same password,
    /// and waits until it answers PING.
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "restart follows stop");
        if let Err(log) = self.spawn() {
            panic!("redis-server did not restart on port {}: {log}", self.port);
        }
    }

    /// Runs one command through redis-cli and returns its JSON output, or
    /// `None` when the server did not answer (not running, not yet
    /// listening). redis-cli exits 0 on an error reply too, so a reply
    /// that is an error (wrong password, wrong type) is a panic here.
    fn try_cli(&self, args: &[&str]) -> Option<String> {
        let out = Command::new(CLI)
            .args(["-h", "127.0.0.1", "-p", &self.port.to_string()])
            .args(["--no-auth-warning", "-a", &self.password, "--json"])
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("run redis-cli");
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        if !out.status.success() {
            let unreachable = [
                "Could not connect",
                "closed the connection",
                "Connection reset",
            ];
            assert!(
                unreachable
                    .iter()
                    .any(|u| stderr.contains(u) || stdout.contains(u)),
                "redis-cli {args:?} on port {} failed: {stdout}{stderr}",
                self.port
            );
            return None;
        }
        // An error reply, printed as `error:"…"`. LOADING: up, not ready.
        if let Some(error) = stdout.strip_prefix("error:") {
            assert!(
                error.starts_with("\"LOADING"),
                "redis-cli {args:?} on port {}: {error}{stderr}",
                self.port
            );
            return None;
        }
        Some(stdout)
    }

    /// Runs one command through redis-cli; its reply as JSON.
    pub fn cli(&self, args: &[&str]) -> serde_json::Value {
        let out = self
            .try_cli(args)
            .unwrap_or_else(|| panic!("redis-server on port {} does not answer", self.port));
        serde_json::from_str(&out)
            .unwrap_or_else(|e| panic!("redis-cli {args:?}: not JSON ({e}): {out}"))
    }

    /// The keys matching `pattern` (KEYS), sorted.
    pub fn keys(&self, pattern: &str) -> Vec<String> {
        let mut keys: Vec<String> = match self.cli(&["KEYS", pattern]) {
            serde_json::Value::Array(keys) => keys
                .into_iter()
                .map(|k| k.as_str().expect("a key is a string").to_owned())
                .collect(),
            other => panic!("KEYS {pattern}: {other}"),
        };
        keys.sort();
        keys
    }

    /// Every key, sorted, with its value as text: a string as it is; a
    /// hash as `field=value` lines sorted by field; a set as its members,
    /// sorted, one a line; a sorted set as `member score` lines in score
    /// order; a list as its items, one a line.
    pub fn dump_all(&self) -> Vec<(String, String)> {
        self.keys("*")
            .into_iter()
            .map(|key| {
                let value = self.render(&key);
                (key, value)
            })
            .collect()
    }

    /// One key's value as `dump_all` renders it; empty for a key gone
    /// (expired) since it was listed.
    fn render(&self, key: &str) -> String {
        use serde_json::Value;
        let text = |v: &Value| match v {
            Value::String(s) => s.clone(),
            other => other.to_string(),
        };
        let ty = self.cli(&["TYPE", key]);
        match ty.as_str().unwrap_or_default() {
            "string" => self.cli(&["GET", key]).as_str().unwrap_or("").to_owned(),
            "hash" => {
                let Value::Object(map) = self.cli(&["HGETALL", key]) else {
                    panic!("HGETALL {key}: not a map");
                };
                // serde_json's map is sorted by key.
                let lines: Vec<String> = map
                    .iter()
                    .map(|(f, v)| format!("{f}={}", text(v)))
                    .collect();
                lines.join("\n")
            }
            "set" => {
                let mut members: Vec<String> = array(self.cli(&["SMEMBERS", key]))
                    .iter()
                    .map(text)
                    .collect();
                members.sort();
                members.join("\n")
            }
            "zset" => {
                let lines: Vec<String> = array(self.cli(&["ZRANGE", key, "0", "-1", "WITHSCORES"]))
                    .iter()
                    .map(|pair| {
                        let pair = pair.as_array().expect("[member, score]");
                        format!("{} {}", text(&pair[0]), text(&pair[1]))
                    })
                    .collect();
                lines.join("\n")
            }
            "list" => array(self.cli(&["LRANGE", key, "0", "-1"]))
                .iter()
                .map(text)
                .collect::<Vec<_>>()
                .join("\n"),
            "none" => String::new(),
            other => format!("<{other}>"),
        }
    }

    /// Waits until no key matches `pattern`, e.g. a lease after its TTL.
    pub fn wait_no_keys(&self, pattern: &str) {
        wait_until(&format!("no key matching {pattern:?}"), SETTLE, || {
            self.keys(pattern).is_empty()
        });
    }
}

fn array(v: serde_json::Value) -> Vec<serde_json::Value> {
    match v {
        serde_json::Value::Array(items) => items,
        serde_json::Value::Null => Vec::new(),
        other => panic!("not an array: {other}"),
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        if std::thread::panicking() {
            eprintln!(
                "redis-server on port {} kept in {}; its log:\n{}",
                self.port,
                self.dir.display(),
                self.log()
            );
        } else {
            let _ = fs::remove_dir_all(&self.dir);
        }
    }
}
