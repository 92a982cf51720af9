//! Runs the real `postern` binary for a test: a config in a temporary
//! directory, listeners on free loopback ports, logs captured to a file, and
//! readiness awaited on `/readyz`.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use super::backend::DovecotBackend;
use super::free_port;

pub struct Postern {
    child: Child,
    pub dir: PathBuf,
    /// IMAPS listener.
    pub imaps: u16,
    /// STARTTLS listener.
    pub imap: u16,
    pub metrics: u16,
    /// POP3S and POP3-with-STLS listeners, with `Setup::pop3` (else 0).
    pub pop3s: u16,
    pub pop3: u16,
    /// Submission (STARTTLS and implicit TLS) and ManageSieve listeners,
    /// with `Setup::submission` and `Setup::sieve` (else 0).
    pub submission: u16,
    pub submissions: u16,
    pub sieve: u16,
}

/// What a test changes about the default test configuration.
#[derive(Default)]
pub struct Setup<'a> {
    pub backends: &'a [&'a DovecotBackend],
    /// The `users:` list of the users file, as YAML lines.
    pub users: &'a str,
    /// Extra top-level YAML appended to the config (e.g. a `limits:` block).
    pub extra: &'a str,
    /// Extra keys for the STARTTLS listener (e.g. `allow_plaintext_auth: true`).
    pub starttls_options: &'a str,
    /// Extra keys for the implicit-TLS listener (e.g. `proxy_protocol: …`).
    pub imaps_options: &'a str,
    /// Extra keys for the `auth:` block.
    pub auth_options: &'a str,
    /// Lines of the `auth:` block that choose the source, indented by two;
    /// empty for the users file (`source: static`).
    pub auth_source: &'a str,
    /// Extra keys for the `backends:` block.
    pub backend_options: &'a str,
    /// A whole `tls:` block; empty for a self-signed certificate in the test dir.
    pub tls: &'a str,
    /// More `backends.pool` entries (YAML list lines), e.g. a scripted backend.
    pub pool_lines: &'a str,
    /// `auth.failure_delay`; empty for 200ms.
    pub failure_delay: &'a str,
    /// Also listen for POP3 (`pop3s`, implicit TLS, and `pop3`, STLS);
    /// every backend must serve POP3 (`DovecotBackend::start_pop3*`).
    pub pop3: bool,
    /// Extra keys for the POP3 STLS listener.
    pub pop3_options: &'a str,
    /// Also listen for submission (`submission`, STARTTLS, and
    /// `submissions`, implicit TLS); every backend must serve it
    /// (`DovecotBackend::start_services`) unless `extra` names relays.
    pub submission: bool,
    /// Extra keys for both submission listeners.
    pub submission_options: &'a str,
    /// Also listen for ManageSieve (`sieve`, STARTTLS).
    pub sieve: bool,
}

/// The password every test user has on the test backends.
pub const PASSWORD: &str = "pw-secret";

impl Postern {
    pub fn start(setup: Setup<'_>) -> Postern {
        static COUNTER: AtomicU32 = AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!(
            "postern-test-proxy-{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        let mut last_log = String::new();
        for _attempt in 0..3 {
            // Made afresh each attempt: a failed attempt's drop removes it.
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::write(dir.join("users.yaml"), format!("users:\n{}", setup.users)).unwrap();
            let (imaps, imap, metrics) = (free_port(), free_port(), free_port());
            let (pop3s, pop3) = if setup.pop3 {
                (free_port(), free_port())
            } else {
                (0, 0)
            };
            let pool: String = setup
                .backends
                .iter()
                .map(|b| {
                    let pop3_port = [
                        ("pop3_port", b.pop3_port),
                        ("submission_port", b.submission_port),
                        ("sieve_port", b.sieve_port),
                    ]
                    .iter()
                    .filter_map(|(k, p)| p.map(|p| format!(", {k}: {p}")))
                    .collect::<String>();
                    format!(
                        "    - {{ name: {}, address: \"{}\"{pop3_port} }}\n",
                        b.name,
                        b.addr()
                    )
                })
                .collect::<String>()
                + setup.pool_lines;
            let pop3_listeners = if setup.pop3 {
                format!(
                    "  - {{ name: pop3s, bind: \"127.0.0.1:{pop3s}\", tls: implicit, protocol: pop3 }}\n  - {{ name: pop3, bind: \"127.0.0.1:{pop3}\", tls: starttls, protocol: pop3{} }}\n",
                    if setup.pop3_options.is_empty() { String::new() } else { format!(", {}", setup.pop3_options) },
                )
            } else {
                String::new()
            };
            let (submission, submissions) = if setup.submission {
                (free_port(), free_port())
            } else {
                (0, 0)
            };
            let sieve = if setup.sieve { free_port() } else { 0 };
            let mut more_listeners = String::new();
            if setup.submission {
                let opts = if setup.submission_options.is_empty() {
                    String::new()
                } else {
                    format!(", {}", setup.submission_options)
                };
                more_listeners.push_str(&format!(
                    "  - {{ name: submission, bind: \"127.0.0.1:{submission}\", tls: starttls, protocol: submission{opts} }}\n  - {{ name: submissions, bind: \"127.0.0.1:{submissions}\", tls: implicit, protocol: submission{opts} }}\n"
                ));
            }
            if setup.sieve {
                more_listeners.push_str(&format!(
                    "  - {{ name: sieve, bind: \"127.0.0.1:{sieve}\", tls: starttls, protocol: managesieve }}\n"
                ));
            }
            let pop3_listeners = pop3_listeners + &more_listeners;
            let config = format!(
                "listeners:\n  - {{ name: imaps, bind: \"127.0.0.1:{imaps}\", tls: implicit {imaps_opts} }}\n  - {{ name: imap, bind: \"127.0.0.1:{imap}\", tls: starttls {starttls} }}\n{pop3_listeners}\
                 {tls}\n\
                 auth:\n{source}  failure_delay: {failure_delay}\n{auth}\n\
                 backends:\n  connect_timeout: 2s\n{login_timeout}{backend_options}\n  pool:\n{pool}\
                 metrics:\n  bind: \"127.0.0.1:{metrics}\"\n\
                 log:\n  level: debug\n{extra}\n",
                imaps_opts = if setup.imaps_options.is_empty() { String::new() } else { format!(", {}", setup.imaps_options) },
                starttls = if setup.starttls_options.is_empty() { String::new() } else { format!(", {}", setup.starttls_options) },
                auth = indent(setup.auth_options),
                source = if setup.auth_source.is_empty() { "  source: static\n  static: { users_file: users.yaml }\n".to_owned() } else { format!("{}\n", setup.auth_source.trim_end()) },
                backend_options = indent(setup.backend_options),
                login_timeout = if setup.backend_options.contains("login_timeout") { "" } else { "  login_timeout: 5s\n" },
                failure_delay = if setup.failure_delay.is_empty() { "200ms" } else { setup.failure_delay },
                extra = setup.extra,
                tls = if setup.tls.is_empty() { "tls:\n  self_signed: { dir: tls, names: [localhost] }" } else { setup.tls },
            );
            std::fs::write(dir.join("postern.yaml"), &config).unwrap();
            let log = std::fs::File::create(dir.join("postern.log")).unwrap();
            let child = Command::new(binary())
                .args(["run", "--config"])
                .arg(dir.join("postern.yaml"))
                .env_remove("RUST_LOG")
                .stdin(Stdio::null())
                .stdout(log.try_clone().unwrap())
                .stderr(log)
                .spawn()
                .expect("postern binary runs");
            let mut p = Postern {
                child,
                dir: dir.clone(),
                imaps,
                imap,
                metrics,
                pop3s,
                pop3,
                submission,
                submissions,
                sieve,
            };
            let deadline = Instant::now() + Duration::from_secs(20);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = p.child.try_wait() {
                    break;
                }
                if p.http_get("/readyz")
                    .is_some_and(|r| r.starts_with("HTTP/1.1 200"))
                {
                    return p;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            last_log = p.log();
            // A port taken between choosing and binding: try new ones.
            if !last_log.contains("cannot bind") && !last_log.contains("Address already in use") {
                break;
            }
        }
        panic!("postern did not become ready; its log:\n{last_log}");
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("postern.log")).unwrap_or_default()
    }

    /// Waits until the log contains `needle`, returning the log.
    pub fn wait_for_log(&self, needle: &str) -> String {
        super::wait_for(
            &format!("postern log to contain {needle:?}"),
            super::SETTLE,
            || super::LogText(self.log()),
            |log| log.0.contains(needle),
        )
        .0
    }

    pub fn http_get(&self, path: &str) -> Option<String> {
        let mut s = TcpStream::connect(("127.0.0.1", self.metrics)).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
        write!(
            s,
            "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
        )
        .ok()?;
        let mut out = String::new();
        s.read_to_string(&mut out).ok()?;
        Some(out)
    }

    pub fn metrics_text(&self) -> String {
        self.http_get("/metrics").expect("metrics endpoint answers")
    }

    /// The value of one sample, e.g. `postern_authentications_total{mechanism="LOGIN",result="success"}`,
    /// summed over the labels it does not name (`protocol`, say); 0 if absent.
    pub fn metric(&self, sample: &str) -> f64 {
        self.try_metric(sample).expect("metrics endpoint answers")
    }

    /// Like `metric`; `None` when the endpoint did not answer.
    pub fn try_metric(&self, sample: &str) -> Option<f64> {
        let text = self.http_get("/metrics")?;
        Some(sample_sum(&text, sample))
    }

    /// Waits until `accept` holds for the value of one sample (0 while
    /// absent), and returns it. Counters are bumped as a session goes on
    /// and ends, after the client has had its reply, so this, not
    /// `metric`, follows an action. A slow answer from the endpoint is
    /// read again, not a failure.
    pub fn wait_metric(&self, sample: &str, accept: impl Fn(f64) -> bool) -> f64 {
        super::wait_for(
            &format!("metric {sample}"),
            super::SETTLE,
            || self.try_metric(sample),
            |v| v.is_some_and(&accept),
        )
        .unwrap()
    }

    pub fn cert_path(&self) -> PathBuf {
        self.dir.join("tls/cert.pem")
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The process's resident set size in bytes, from /proc.
    pub fn rss_bytes(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid()))
            .expect("postern is running");
        let kib: u64 = status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .expect("VmRSS in /proc/<pid>/status");
        kib * 1024
    }
}

impl Postern {
    /// Sends a signal (`TERM`, `HUP`) to the process.
    /// Stops this process and starts another on the same configuration,
    /// logging to `log_target` (a file or device opened for writing), and
    /// waits until it is ready.
    pub fn respawn_logging_to(&mut self, log_target: &std::path::Path) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let target = std::fs::OpenOptions::new()
            .write(true)
            .open(log_target)
            .expect("open the log target");
        self.child = Command::new(binary())
            .args(["run", "--config"])
            .arg(self.dir.join("postern.yaml"))
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stdout(target.try_clone().unwrap())
            .stderr(target)
            .spawn()
            .expect("postern binary runs");
        super::wait_until(
            "the respawned postern is ready",
            Duration::from_secs(20),
            || {
                self.http_get("/readyz")
                    .is_some_and(|r| r.starts_with("HTTP/1.1 200"))
            },
        );
    }

    pub fn signal(&self, name: &str) {
        assert!(self.try_signal(name), "kill -{name} failed");
    }

    /// Sends a signal; whether kill(1) succeeded.
    fn try_signal(&self, name: &str) -> bool {
        Command::new("kill")
            .arg(format!("-{name}"))
            .arg(self.child.id().to_string())
            .status()
            .is_ok_and(|s| s.success())
    }

    /// Waits (bounded) for the process to exit; its exit status.
    pub fn wait_exit(&mut self, deadline: Duration) -> std::process::ExitStatus {
        let start = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return status;
            }
            assert!(
                start.elapsed() < deadline,
                "postern did not exit within {deadline:?}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// Whether the process's memory figures are its own: not under a
/// sanitizer (scripts/sanitize sets `POSTERN_SANITIZER`), whose shadow
/// memory and quarantine of freed blocks swell the RSS. Memory bounds are
/// checked by the ordinary suite; under a sanitizer they are reported only.
pub fn rss_is_meaningful() -> bool {
    match std::env::var("POSTERN_SANITIZER") {
        Ok(s) => {
            eprintln!("RSS bounds not asserted under the {s} sanitizer");
            false
        }
        Err(_) => true,
    }
}

/// The binary under test: `POSTERN_BIN` when set (scripts/sanitize points
/// it at an AddressSanitizer build), else the one cargo built.
pub fn binary() -> PathBuf {
    std::env::var_os("POSTERN_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_postern")))
}

impl Postern {
    /// Stops a running process the way an operator would: SIGTERM, and a
    /// second one to cut the drain short; then it must exit 0 by itself.
    /// Under a sanitizer, that exit is when leaks are reported (and turn
    /// the exit status non-zero).
    fn stop_gracefully(&mut self) -> Result<(), String> {
        let running = |p: &mut Postern| matches!(p.child.try_wait(), Ok(None));
        let term = |p: &Postern| {
            p.try_signal("TERM");
        };
        if !running(self) {
            return Ok(());
        }
        term(self);
        // The first signal is taken once readiness turns off (before the
        // drain begins); a process with no sessions may just exit.
        let deadline = Instant::now() + Duration::from_secs(5);
        while running(self)
            && Instant::now() < deadline
            && self
                .http_get("/readyz")
                .is_some_and(|r| r.starts_with("HTTP/1.1 200"))
        {
            std::thread::sleep(Duration::from_millis(20));
        }
        if running(self) {
            term(self);
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return if status.success() {
                    Ok(())
                } else {
                    Err(format!("postern exited with {status} on SIGTERM"))
                };
            }
            if Instant::now() >= deadline {
                return Err("postern did not exit within 10 s of its second SIGTERM".into());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The last lines of the log, for a failure message.
    pub fn log_tail(&self) -> String {
        let log = self.log();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(200)..].join("\n")
    }
}

impl Drop for Postern {
    fn drop(&mut self) {
        // POSTERN_TEST_STOP=term: every test's process is stopped by
        // signal and must exit cleanly (scripts/sanitize sets it).
        let graceful = std::env::var_os("POSTERN_TEST_STOP").is_some_and(|v| v == "term");
        let stopped = if graceful && !std::thread::panicking() {
            self.stop_gracefully()
        } else {
            Ok(())
        };
        let _ = self.child.kill();
        let _ = self.child.wait();
        if let Err(e) = stopped {
            panic!(
                "{e}; log kept in {}, its last lines:\n{}",
                self.dir.display(),
                self.log_tail()
            );
        }
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.dir);
        } else {
            eprintln!(
                "postern log kept in {}, its last lines:\n{}",
                self.dir.display(),
                self.log_tail()
            );
        }
    }
}

/// The sum of every sample of one family over its labels, from a
/// `/metrics` text; `family` ends with `{`, e.g.
/// `postern_sessions_ended_total{`.
/// The sum of the samples of `sample`'s family whose labels include every
/// label `sample` names: `name{a="x"}` matches `name{a="x",b="y"}`.
pub fn sample_sum(metrics: &str, sample: &str) -> f64 {
    let (name, wanted) = split_sample(sample);
    metrics
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let (n, labels) = split_sample(series);
            (n == name && wanted.iter().all(|w| labels.contains(w)))
                .then(|| value.trim().parse::<f64>().ok())
                .flatten()
        })
        .sum()
}

/// `name{a="x",b="y"}` into the name and its `a="x"` pairs.
fn split_sample(sample: &str) -> (&str, Vec<&str>) {
    match sample.split_once('{') {
        Some((name, rest)) => {
            let labels = rest.trim_end_matches('}');
            // Label values in these tests hold no `",`.
            let pairs = labels
                .split("\",")
                .filter(|p| !p.is_empty())
                .map(|p| p.trim_end_matches('"'))
                .collect();
            (name, pairs)
        }
        None => (sample, Vec::new()),
    }
}

pub fn family_sum(metrics: &str, family: &str) -> f64 {
    metrics
        .lines()
        .filter(|l| l.starts_with(family))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

fn indent(block: &str) -> String {
    block.lines().map(|l| format!("  {l}\n")).collect()
}

/// One backend that knows `alice`, and Postern in front of it with `extra`
/// top-level config and a `tls` block (empty: self-signed).
pub fn alice_behind(name: &str, extra: &str, tls: &str) -> (DovecotBackend, Postern) {
    super::backend::ensure_installed();
    let b = DovecotBackend::start_with_users(name, &[("alice", PASSWORD)]);
    let p = Postern::start(Setup {
        backends: &[&b],
        users: &user("alice"),
        extra,
        tls,
        ..Setup::default()
    });
    (b, p)
}

/// A users-file entry with the test password, as a YAML list line.
pub fn user(name: &str) -> String {
    format!("  - {{ user: \"{name}\", password: \"{{PLAIN}}{PASSWORD}\" }}\n")
}

/// A users-file entry pinned to a backend by the directory.
pub fn user_on(name: &str, backend: &str) -> String {
    format!("  - {{ user: \"{name}\", password: \"{{PLAIN}}{PASSWORD}\", backend: {backend} }}\n")
}
