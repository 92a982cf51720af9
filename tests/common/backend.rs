//! Real Dovecot IMAP backends for the integration tests. Each
//! `DovecotBackend` is a private instance that `scripts/dovecot-backend`
//! starts in its own temporary directory on a free loopback port; dropping
//! it kills the instance and deletes the directory. Those made by
//! `start_pop3*` also serve POP3, with the same users and maildrops, on a
//! second free port (`pop3_addr`).
//!
//! Every backend also accepts the master user: `LOGIN "alice*proxymaster"
//! "master-secret"` logs in as alice. Dovecot trusts `ID
//! ("x-originating-ip" …)` from loopback, so the login line's `rip=` shows
//! the address the proxy forwarded. On POP3, Dovecot greets a trusted
//! (loopback) client with `+OK [XCLIENT] …` and takes `XCLIENT ADDR=…`
//! (not listed in CAPA); `USER alice*proxymaster` / `PASS master-secret`
//! logs in as alice. Log lines look like:
//!
//! ```text
//! imap-login: Info: Login: user=<alice>, method=PLAIN, rip=127.0.0.1, lip=127.0.0.1, mpid=10979, secured, session=<…>
//! pop3-login: Info: Login: user=<alice>, method=PLAIN, rip=192.0.2.7, lip=127.0.0.1, mpid=8586, TLS, session=<…>
//! auth: Info: passwd-file(alice,127.0.0.1,<…>): Password mismatch
//! ```
//!
//! `logins`, `logins_of`, `saw_user` and their waits count both protocols;
//! the `pop3_` variants only POP3 logins.
//!
//! Dovecot writes its log asynchronously: wait for a line (`wait_logins`,
//! `wait_logins_of`, `wait_log`) before asserting that it is there, and call
//! `settle_log` before asserting that one is not.
#![allow(dead_code)]

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Once;

use super::free_port;

/// The master user every backend accepts (`user*proxymaster`).
pub const MASTER_USER: &str = "proxymaster";
pub const MASTER_PASSWORD: &str = "master-secret";
/// The users of a backend made by `DovecotBackend::start`.
pub const DEMO_USERS: &[(&str, &str)] = &[
    ("alice", "wonderland"),
    ("bob", "builder"),
    ("carol", "singer"),
];

/// How often `start` picks a new port after another process took its port.
const PORT_ATTEMPTS: usize = 3;

pub struct DovecotBackend {
    pub name: String,
    /// The loopback address it listens on (127.0.0.1 unless `start_at`).
    pub ip: String,
    pub port: u16,
    /// The POP3 port on `ip`, for backends made by `start_pop3*`.
    pub pop3_port: Option<u16>,
    /// The submission and ManageSieve ports on `ip`, for backends made by
    /// `start_services`.
    pub submission_port: Option<u16>,
    pub sieve_port: Option<u16>,
    /// Where Dovecot's submission service relays (host:port).
    submission_relay: Option<String>,
    pub dir: PathBuf,
    /// Passed to every (re)start; `None` means the script's demo users.
    users_file: Option<PathBuf>,
    /// Environment for the script on every (re)start (DOVECOT_TLS_*, …).
    env: Vec<(String, String)>,
}

impl DovecotBackend {
    /// A backend with the demo users alice/wonderland, bob/builder and
    /// carol/singer.
    pub fn start(name: &str) -> DovecotBackend {
        Self::launch(name, None, &[], false)
    }

    /// A backend that knows exactly `users` (name, plaintext password).
    pub fn start_with_users(name: &str, users: &[(&str, &str)]) -> DovecotBackend {
        Self::launch(name, Some(users), &[], false)
    }

    /// Like `start`, also serving POP3 on a free loopback port
    /// (`pop3_port`, `pop3_addr`).
    pub fn start_pop3(name: &str) -> DovecotBackend {
        Self::launch(name, None, &[], true)
    }

    /// Like `start_with_env`, also serving POP3 on a free loopback port.
    /// With DOVECOT_TLS_CERT/KEY in `env` that port offers STLS, and
    /// `("DOVECOT_POP3S_PORT", port)` adds implicit TLS on a port the test
    /// chose; `("DOVECOT_POP3_LOCK", "1")` makes a second concurrent
    /// session of a user fail with `-ERR [IN-USE]` (after about 10 s, the
    /// time Dovecot waits for the lock).
    pub fn start_pop3_with_env(
        name: &str,
        users: &[(&str, &str)],
        env: &[(&str, &str)],
    ) -> DovecotBackend {
        Self::launch(name, Some(users), env, true)
    }

    /// Like `start_with_users`, with `scripts/dovecot-backend`'s options in
    /// `env`, e.g. `("DOVECOT_HAPROXY", "1")`.
    pub fn start_with_env(
        name: &str,
        users: &[(&str, &str)],
        env: &[(&str, &str)],
    ) -> DovecotBackend {
        Self::launch(name, Some(users), env, false)
    }

    /// Like `start_with_env`, also serving SMTP submission (relaying to
    /// `relay`, host:port, e.g. a `PostfixServer`) and ManageSieve, each on
    /// a free loopback port (`submission_port`, `sieve_port`), and POP3
    /// with `pop3`.
    pub fn start_services(
        name: &str,
        users: &[(&str, &str)],
        env: &[(&str, &str)],
        relay: &str,
    ) -> DovecotBackend {
        ensure_installed();
        let mut backend = Self::prepare(name, Some(users), env);
        backend.submission_relay = Some(relay.to_owned());
        for _ in 0..PORT_ATTEMPTS {
            backend.port = free_port();
            backend.submission_port = Some(free_port());
            backend.sieve_port = Some(free_port());
            match backend.run_start() {
                Ok(()) => return backend,
                Err(stderr) if stderr.contains("Address already in use") => continue,
                Err(stderr) => panic!(
                    "dovecot backend {name:?} did not start on {}:\n{stderr}",
                    backend.addr()
                ),
            }
        }
        panic!("dovecot backend {name:?}: the port was taken {PORT_ATTEMPTS} times in a row")
    }

    /// A backend listening on `ip:port` (another loopback address), e.g.
    /// one of several members behind one DNS name and port.
    pub fn start_at(name: &str, users: &[(&str, &str)], ip: &str, port: u16) -> DovecotBackend {
        ensure_installed();
        let mut backend = Self::prepare(name, Some(users), &[("DOVECOT_LISTEN", ip)]);
        backend.ip = ip.to_owned();
        backend.port = port;
        if let Err(stderr) = backend.run_start() {
            panic!("dovecot backend {name:?} did not start on {ip}:{port}:\n{stderr}");
        }
        backend
    }

    fn launch(
        name: &str,
        users: Option<&[(&str, &str)]>,
        env: &[(&str, &str)],
        pop3: bool,
    ) -> DovecotBackend {
        ensure_installed();
        let mut backend = Self::prepare(name, users, env);

        for _ in 0..PORT_ATTEMPTS {
            backend.port = free_port();
            backend.pop3_port = pop3.then(free_port);
            match backend.run_start() {
                Ok(()) => return backend,
                // Another process bound the port after free_port released it.
                Err(stderr) if stderr.contains("Address already in use") => continue,
                Err(stderr) => panic!(
                    "dovecot backend {name:?} did not start on {}:\n{stderr}",
                    backend.addr()
                ),
            }
        }
        panic!("dovecot backend {name:?}: the port was taken {PORT_ATTEMPTS} times in a row")
    }

    /// The directory, users file and environment of a backend not yet started.
    fn prepare(name: &str, users: Option<&[(&str, &str)]>, env: &[(&str, &str)]) -> DovecotBackend {
        let dir = unique_dir(name);
        let users_file = users.map(|users| {
            let path = dir.join("users.in");
            let lines: String = users
                .iter()
                .map(|(u, p)| format!("{u}:{{PLAIN}}{p}\n"))
                .collect();
            fs::write(&path, lines).expect("write the backend's users file");
            path
        });
        DovecotBackend {
            name: name.to_owned(),
            ip: "127.0.0.1".to_owned(),
            port: 0,
            pop3_port: None,
            submission_port: None,
            sieve_port: None,
            submission_relay: None,
            dir,
            users_file,
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        }
    }

    /// Runs `dovecot-backend start`; on failure returns its stderr.
    fn run_start(&self) -> Result<(), String> {
        let mut command = script();
        command
            .arg("start")
            .arg(&self.dir)
            .arg(self.port.to_string())
            .envs(self.env.iter().map(|(k, v)| (k, v)));
        if let Some(pop3) = self.pop3_port {
            command.env("DOVECOT_POP3_PORT", pop3.to_string());
        }
        if let Some(port) = self.submission_port {
            command.env("DOVECOT_SUBMISSION_PORT", port.to_string());
        }
        if let Some(relay) = &self.submission_relay {
            command.env("DOVECOT_SUBMISSION_RELAY", relay);
        }
        if let Some(port) = self.sieve_port {
            command.env("DOVECOT_SIEVE_PORT", port.to_string());
        }
        if let Some(users) = &self.users_file {
            command.arg(users);
        }
        let out = command.output().expect("run scripts/dovecot-backend");
        if out.status.success() {
            Ok(())
        } else {
            Err(String::from_utf8_lossy(&out.stderr).into_owned())
        }
    }

    /// "IP:PORT".
    pub fn addr(&self) -> String {
        format!("{}:{}", self.ip, self.port)
    }

    /// "IP:PORT" of the POP3 service; panics unless made by `start_pop3*`.
    pub fn pop3_addr(&self) -> String {
        let port = self
            .pop3_port
            .unwrap_or_else(|| panic!("backend {:?} serves no POP3 (use start_pop3*)", self.name));
        format!("{}:{port}", self.ip)
    }

    /// Puts `message` (RFC 5322, CRLF line ends) into `user`'s INBOX as
    /// a new maildir file, as a delivery agent would: POP3 has no APPEND.
    /// Creates the maildir if the user never logged in. Dovecot sees the
    /// message at its next sync (a new POP3 session, an IMAP NOOP).
    pub fn deliver(&self, user: &str, message: &[u8]) {
        use std::os::unix::fs::chown;
        static DELIVERED: AtomicUsize = AtomicUsize::new(0);
        let owner = fs::metadata(self.dir.join("mail")).expect("the backend's mail directory");
        let (uid, gid) = {
            use std::os::unix::fs::MetadataExt;
            (owner.uid(), owner.gid())
        };
        let maildir = self.dir.join("mail").join(user).join("Maildir");
        for dir in [
            self.dir.join("mail").join(user),
            maildir.clone(),
            maildir.join("new"),
            maildir.join("cur"),
            maildir.join("tmp"),
        ] {
            if !dir.exists() {
                fs::create_dir(&dir).expect("create the maildir");
                chown(&dir, Some(uid), Some(gid)).expect("give the maildir to the mail user");
            }
        }
        let n = DELIVERED.fetch_add(1, Ordering::Relaxed);
        let file = format!("1700000000.P{}Q{n}.postern-test", std::process::id());
        // Written in tmp/ and renamed into new/, so Dovecot never sees a part.
        let staged = maildir.join("tmp").join(&file);
        fs::write(&staged, message).expect("write the message");
        chown(&staged, Some(uid), Some(gid)).expect("give the message to the mail user");
        fs::rename(&staged, maildir.join("new").join(&file)).expect("deliver the message");
    }

    /// The whole Dovecot log so far; empty if there is none yet.
    pub fn log(&self) -> String {
        fs::read_to_string(self.dir.join("dovecot.log")).unwrap_or_default()
    }

    /// The successful login lines (`… Login: user=<alice>, method=PLAIN, rip=…`).
    pub fn logins(&self) -> Vec<String> {
        self.log()
            .lines()
            .filter(|line| line.contains("Login: user=<"))
            .map(str::to_owned)
            .collect()
    }

    /// How many times `user` logged in successfully.
    pub fn logins_of(&self, user: &str) -> usize {
        let tagged = format!("user=<{user}>");
        self.logins().iter().filter(|l| l.contains(&tagged)).count()
    }

    /// The successful POP3 login lines (`pop3-login: Info: Login: user=<…`).
    /// Dovecot writes one too for a login whose session then fails to lock
    /// the maildrop (`-ERR [IN-USE]`).
    pub fn pop3_logins(&self) -> Vec<String> {
        self.logins()
            .into_iter()
            .filter(|line| line.contains("pop3-login: "))
            .collect()
    }

    /// How many times `user` logged in successfully over POP3.
    pub fn pop3_logins_of(&self, user: &str) -> usize {
        let tagged = format!("user=<{user}>");
        self.pop3_logins()
            .iter()
            .filter(|l| l.contains(&tagged))
            .count()
    }

    /// Whether the backend ever heard of `user`, in a successful or failed
    /// login. Failures show up as `user=<USER>` when the connection ends and
    /// as `passwd-file(USER,…): Password mismatch` (or `unknown user`) right
    /// away; a failed master login names only the master user.
    pub fn saw_user(&self, user: &str) -> bool {
        let tagged = format!("user=<{user}>");
        let looked_up = format!("passwd-file({user},");
        self.log()
            .lines()
            .any(|line| line.contains(&tagged) || line.contains(&looked_up))
    }

    /// Waits until the log holds at least `n` successful logins, and
    /// returns them all. Dovecot's log process writes a moment after the
    /// login was answered, so this, not `logins()`, follows an action.
    pub fn wait_logins(&self, n: usize) -> Vec<String> {
        super::wait_for(
            &format!("{n} login(s) in the log of backend {:?}", self.name),
            super::SETTLE,
            || self.logins(),
            |l| l.len() >= n,
        )
    }

    /// Waits until the log holds at least `n` successful POP3 logins, and
    /// returns them all.
    pub fn wait_pop3_logins(&self, n: usize) -> Vec<String> {
        super::wait_for(
            &format!("{n} POP3 login(s) in the log of backend {:?}", self.name),
            super::SETTLE,
            || self.pop3_logins(),
            |l| l.len() >= n,
        )
    }

    /// Waits until `user` has logged in at least `n` times over POP3; the
    /// count.
    pub fn wait_pop3_logins_of(&self, user: &str, n: usize) -> usize {
        super::wait_for(
            &format!("{n} POP3 login(s) of {user} on backend {:?}", self.name),
            super::SETTLE,
            || self.pop3_logins_of(user),
            |&c| c >= n,
        )
    }

    /// Waits until `user` has logged in at least `n` times; the count.
    pub fn wait_logins_of(&self, user: &str, n: usize) -> usize {
        super::wait_for(
            &format!("{n} login(s) of {user} on backend {:?}", self.name),
            super::SETTLE,
            || self.logins_of(user),
            |&c| c >= n,
        )
    }

    /// Waits until the log contains `needle`; returns the log.
    pub fn wait_log(&self, needle: &str) -> String {
        super::wait_for(
            &format!("{needle:?} in the log of backend {:?}", self.name),
            super::SETTLE,
            || super::LogText(self.log()),
            |log| log.0.contains(needle),
        )
        .0
    }

    /// Returns once the log holds every line that connections made before
    /// this call caused, so that a check for a line that must be absent
    /// ("the backend never saw the password") cannot pass only because
    /// the line was not written yet. It connects straight to the backend
    /// from 127.0.0.9, logs out, and waits for that connection's line: the
    /// one login process logs its connections in order, after theirs.
    pub fn settle_log(&self) {
        const MARK: &str = "rip=127.0.0.9,";
        let before = self.log().matches(MARK).count();
        let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)
            .expect("a socket");
        let from: std::net::SocketAddr = "127.0.0.9:0".parse().unwrap();
        socket.bind(&from.into()).expect("bind 127.0.0.9");
        let to: std::net::SocketAddr = self.addr().parse().unwrap();
        socket.connect(&to.into()).expect("connect to the backend");
        let tcp: std::net::TcpStream = socket.into();
        tcp.set_read_timeout(Some(super::client::TIMEOUT)).unwrap();
        let mut c = super::client::Client::from_stream(tcp);
        c.line();
        c.command("F", "LOGOUT");
        super::wait_for(
            &format!("a new {MARK:?} line in the log of backend {:?}", self.name),
            super::SETTLE,
            || self.log().matches(MARK).count(),
            |&n| n > before,
        );
    }

    /// `settle_log` for POP3 connections: pop3-login is a process of its
    /// own, so this connects to the POP3 port from 127.0.0.9, sends QUIT
    /// and waits for that connection's line.
    pub fn settle_pop3_log(&self) {
        use std::io::{BufRead, BufReader, Write};
        const MARK: &str = "rip=127.0.0.9,";
        let before = self.log().matches(MARK).count();
        let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)
            .expect("a socket");
        let from: std::net::SocketAddr = "127.0.0.9:0".parse().unwrap();
        socket.bind(&from.into()).expect("bind 127.0.0.9");
        let to: std::net::SocketAddr = self.pop3_addr().parse().unwrap();
        socket
            .connect(&to.into())
            .expect("connect to the backend's POP3 port");
        let mut tcp: std::net::TcpStream = socket.into();
        tcp.set_read_timeout(Some(super::client::TIMEOUT)).unwrap();
        let mut reader = BufReader::new(tcp.try_clone().unwrap());
        let mut line = String::new();
        reader.read_line(&mut line).expect("the POP3 greeting");
        assert!(line.starts_with("+OK"), "POP3 greeting: {line:?}");
        tcp.write_all(b"QUIT\r\n").expect("send QUIT");
        line.clear();
        reader.read_line(&mut line).expect("the answer to QUIT");
        super::wait_for(
            &format!("a new {MARK:?} line in the log of backend {:?}", self.name),
            super::SETTLE,
            || self.log().matches(MARK).count(),
            |&n| n > before,
        );
    }

    /// Kills the backend at once, like a crash; the port stops answering
    /// when this returns. `restart` brings it back.
    pub fn stop(&self) {
        let out = script()
            .arg("kill")
            .arg(&self.dir)
            .output()
            .expect("run scripts/dovecot-backend");
        assert!(
            out.status.success(),
            "stopping dovecot backend {:?} failed:\n{}",
            self.name,
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Starts the backend again on the same port(s), with the same users and
    /// mail; panics if a port was taken in the meantime.
    pub fn restart(&self) {
        if let Err(stderr) = self.run_start() {
            panic!(
                "dovecot backend {:?} did not restart on {}:\n{stderr}",
                self.name,
                self.addr()
            );
        }
    }
}

impl Drop for DovecotBackend {
    fn drop(&mut self) {
        // Killing, not a graceful stop: Dovecot's own shutdown takes 1-3 s,
        // and a test has read what it needs from the log by now.
        let _ = script().arg("kill").arg(&self.dir).output();
        if std::thread::panicking() {
            let log = self.log();
            let tail: Vec<&str> = log.lines().rev().take(20).collect();
            eprintln!(
                "--- last lines of dovecot backend {:?} ({}) ---",
                self.name,
                self.dir.display()
            );
            tail.iter().rev().for_each(|line| eprintln!("{line}"));
        }
        if std::env::var_os("POSTERN_KEEP_BACKENDS").is_none() {
            let _ = fs::remove_dir_all(&self.dir);
        }
    }
}

/// Panics unless `dovecot` can be run: the tests need a real backend and
/// must fail loudly, never skip, when it is missing.
pub fn ensure_installed() {
    // The script also looks in /usr/sbin and /sbin, where Debian puts it.
    let path = std::env::var_os("PATH").unwrap_or_default();
    let found = std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/sbin"), PathBuf::from("/sbin")])
        .any(|dir| dir.join("dovecot").is_file());
    assert!(
        found,
        "dovecot is not installed, and the integration tests need real Dovecot backends; \
         install it with `scripts/dovecot-backend install` (as root, Debian's dovecot-imapd)"
    );
}

fn script() -> Command {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/dovecot-backend");
    let mut command = Command::new("bash");
    command.arg(path);
    command
}

/// A fresh directory `postern-test-<name>-<pid>-<n>` under the system temp dir.
fn unique_dir(name: &str) -> PathBuf {
    static COUNTER: AtomicUsize = AtomicUsize::new(0);
    static REAP: Once = Once::new();
    REAP.call_once(reap_orphans);
    // The script accepts only these characters in paths (Dovecot expands %).
    let name: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "._+-".contains(c) {
                c
            } else {
                '-'
            }
        })
        .collect();
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!("postern-test-{name}-{}-{n}", std::process::id()));
    // Left over by an earlier run whose PID this process now has.
    if dir.exists() {
        let _ = script().arg("kill").arg(&dir).output();
        let _ = fs::remove_dir_all(&dir);
    }
    fs::create_dir_all(&dir).expect("create the backend's temporary directory");
    dir
}

/// Kills and deletes the backends of earlier test runs that ended without
/// dropping them (Ctrl-C, a CI timeout): their process no longer exists.
fn reap_orphans() {
    let Ok(entries) = fs::read_dir(std::env::temp_dir()) else {
        return;
    };
    for entry in entries.flatten() {
        let file_name = entry.file_name();
        let Some(rest) = file_name
            .to_str()
            .and_then(|n| n.strip_prefix("postern-test-"))
        else {
            continue;
        };
        // postern-test-<name>-<pid>-<n>; <name> may contain dashes itself.
        let Some(pid) = rest.rsplit('-').nth(1).and_then(|p| p.parse::<u32>().ok()) else {
            continue;
        };
        if !Path::new(&format!("/proc/{pid}")).exists() {
            let _ = script().arg("kill").arg(entry.path()).output();
            let _ = fs::remove_dir_all(entry.path());
        }
    }
}
