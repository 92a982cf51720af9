//! `storm`: the reconnect storm after a backend dies. Many sessions idle
//! through the peer; once all are idling the loadgen SIGKILLs the processes
//! listed in the kill file (a backend's whole process tree) and times how
//! the sessions that lose their backend are told (`* BYE`, or the
//! connection closed) and how long they take to be back in IDLE, each
//! reconnecting like a real client: back off, connect, TLS, LOGIN, SELECT,
//! IDLE, and back off longer after each failed try.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use clap::Args;
use tokio::sync::{mpsc, watch, Semaphore};
use tokio_rustls::TlsConnector;

use crate::conn::{Conn, Result};
use crate::{
    close_idle, json_string, open_idle, own_cpu_ms, percentile, write_ready, Errors, Target,
    TEARDOWN_LIMIT,
};

/// The longest back-off between reconnect tries (unless `--backoff-ms` is
/// longer still).
const MAX_BACKOFF: Duration = Duration::from_secs(2);
/// How often the kill file is looked for.
const KILL_FILE_POLL: Duration = Duration::from_millis(50);
/// After the deadline, every session reports within this time (a try in
/// progress is cut at the deadline; this covers scheduling).
const REPORT_LIMIT: Duration = Duration::from_secs(30);

#[derive(Args)]
pub(crate) struct StormArgs {
    #[command(flatten)]
    target: Target,
    #[arg(long, default_value = "u")]
    user_prefix: String,
    #[arg(long)]
    users: usize,
    #[arg(long)]
    password: String,
    /// Sessions to open and hold in IDLE; session K logs in as
    /// PREFIX{K mod users}.
    #[arg(long)]
    sessions: usize,
    /// Sessions being set up (connect to IDLE) at once before the kill;
    /// reconnects afterwards are not gated, as real clients are not.
    #[arg(long, default_value_t = 64)]
    connect_concurrency: usize,
    /// Written (with the number of idling sessions) once setup has finished.
    #[arg(long)]
    ready_file: PathBuf,
    /// Waited for after the ready file: PIDs to SIGKILL, one per line,
    /// killed in order. Write it whole (e.g. by renaming it into place).
    #[arg(long)]
    kill_file: PathBuf,
    /// How long to wait for the kill file.
    #[arg(long, default_value_t = 60)]
    kill_wait_secs: u64,
    /// First back-off before a told session reconnects (±50 % jitter);
    /// doubled after each failed try, up to 2 s.
    #[arg(long, default_value_t = 100)]
    backoff_ms: u64,
    /// Sessions are followed this long after the kill; a told session not
    /// back in IDLE by then counts as never back.
    #[arg(long, default_value_t = 60)]
    deadline_secs: u64,
}

/// What one session went through, sent once it is settled for the figures.
enum Report {
    SetupFailed,
    /// Told before the kill: not part of the storm (should not happen).
    DroppedBeforeKill,
    /// Not told by the deadline.
    Untold,
    Told {
        told: Duration,
        back: Option<Duration>,
        failed_tries: u32,
    },
}

/// What every session task shares.
struct Shared {
    target: std::net::SocketAddr,
    tls: Option<TlsConnector>,
    password: String,
    gate: Semaphore,
    /// The kill instant, once the kill has begun.
    t0: watch::Receiver<Option<Instant>>,
    /// True at the deadline: stop waiting to be told.
    end: watch::Receiver<bool>,
    /// True once the JSON is out: close every session.
    teardown: watch::Receiver<bool>,
    deadline_secs: u64,
    /// Bound on a read while a session waits in IDLE to be told.
    told_limit: Duration,
    backoff: Duration,
    setup_errors: Errors,
    /// Failed reconnect tries.
    errors: Errors,
}

pub(crate) async fn storm(a: StormArgs) -> Result<String> {
    let tls = a.target.prepare()?;
    if a.users == 0 || a.sessions == 0 || a.deadline_secs == 0 {
        return Err("--users, --sessions and --deadline-secs must be positive".into());
    }
    let (t0_tx, t0_rx) = watch::channel(None);
    let (end_tx, end_rx) = watch::channel(false);
    let (teardown_tx, teardown_rx) = watch::channel(false);
    let (setup_tx, mut setup_rx) = mpsc::unbounded_channel::<bool>();
    let (report_tx, mut report_rx) = mpsc::unbounded_channel::<Report>();
    let shared = Arc::new(Shared {
        target: a.target.target,
        tls,
        password: a.password.clone(),
        gate: Semaphore::new(a.connect_concurrency.max(1)),
        t0: t0_rx,
        end: end_rx,
        teardown: teardown_rx,
        deadline_secs: a.deadline_secs,
        told_limit: Duration::from_secs(a.kill_wait_secs + a.deadline_secs) + REPORT_LIMIT,
        backoff: Duration::from_millis(a.backoff_ms.max(1)),
        setup_errors: Errors::default(),
        errors: Errors::default(),
    });
    let start = Instant::now();
    let mut tasks = Vec::with_capacity(a.sessions);
    for k in 0..a.sessions {
        let user = format!("{}{}", a.user_prefix, k % a.users);
        let (shared, setup_tx, report_tx) = (shared.clone(), setup_tx.clone(), report_tx.clone());
        tasks.push(tokio::spawn(session(k, user, shared, setup_tx, report_tx)));
    }
    drop((setup_tx, report_tx));

    // Every setup step is bounded by timeouts, so this loop ends.
    let (mut idling, mut setup_failed) = (0usize, 0usize);
    while let Some(ok) = setup_rx.recv().await {
        if ok {
            idling += 1;
        } else {
            setup_failed += 1;
        }
    }
    let setup_secs = start.elapsed().as_secs_f64();
    shared.setup_errors.report("storm setup");
    if idling == 0 {
        return Err("no session reached IDLE".into());
    }
    eprintln!(
        "postern-loadgen: {idling} sessions idling, {setup_failed} failed, after {setup_secs:.1} s; \
         waiting up to {} s for {}",
        a.kill_wait_secs,
        a.kill_file.display()
    );
    write_ready(&a.ready_file, idling)?;

    let pids = wait_for_kill_file(&a.kill_file, Duration::from_secs(a.kill_wait_secs)).await?;
    let t0 = Instant::now();
    let cpu0 = own_cpu_ms();
    t0_tx.send_replace(Some(t0));
    let (killed, already_gone) = kill_all(&pids)?;
    // Told times include this: the last process was signalled this long
    // after t0.
    let kill_ms = t0.elapsed().as_secs_f64() * 1000.0;
    eprintln!(
        "postern-loadgen: SIGKILL sent to {killed} processes ({already_gone} already gone) \
         in {kill_ms:.1} ms; following the sessions for {} s",
        a.deadline_secs
    );

    let deadline = t0 + Duration::from_secs(a.deadline_secs);
    tokio::time::sleep_until(deadline.into()).await;
    let cpu_ms = own_cpu_ms() - cpu0;
    end_tx.send_replace(true);

    // Every session reports once: at setup failure, when back, or at the
    // deadline at the latest.
    let (mut dropped, mut told, mut back, mut failed_tries) =
        (0usize, Vec::new(), Vec::new(), 0u64);
    let report_deadline = tokio::time::Instant::now() + REPORT_LIMIT;
    for _ in 0..a.sessions {
        match tokio::time::timeout_at(report_deadline, report_rx.recv()).await {
            Ok(Some(Report::Told {
                told: t,
                back: b,
                failed_tries: f,
            })) => {
                told.push(micros(t));
                back.extend(b.map(micros));
                failed_tries += u64::from(f);
            }
            Ok(Some(Report::DroppedBeforeKill)) => dropped += 1,
            Ok(Some(Report::Untold | Report::SetupFailed)) => {}
            Ok(None) => return Err("a session task ended without reporting".into()),
            Err(_) => return Err("sessions did not report within 30 s of the deadline".into()),
        }
    }
    let failures = shared.errors.first();
    shared.errors.report("reconnect");
    told.sort_unstable();
    back.sort_unstable();
    let secs = |v: &[u32], p: f64| {
        if v.is_empty() {
            "null".to_string()
        } else {
            format!("{:.3}", f64::from(percentile(v, p)) / 1e6)
        }
    };
    let json = format!(
        "{{\"sessions\":{idling},\"setup_failed\":{setup_failed},\"setup_secs\":{setup_secs:.2},\
         \"killed\":{killed},\"already_gone\":{already_gone},\"kill_ms\":{kill_ms:.1},\
         \"dropped_before_kill\":{dropped},\
         \"affected\":{},\"told_p50_s\":{},\"told_p99_s\":{},\"told_max_s\":{},\
         \"back\":{},\"back_p50_s\":{},\"back_p99_s\":{},\"back_max_s\":{},\
         \"failed_tries\":{failed_tries},\"never_back\":{},\"deadline_secs\":{},\"backoff_ms\":{},\
         \"loadgen_cpu_ms\":{cpu_ms},\"failures\":[{}]}}",
        told.len(),
        secs(&told, 0.50),
        secs(&told, 0.99),
        secs(&told, 1.0),
        back.len(),
        secs(&back, 0.50),
        secs(&back, 0.99),
        secs(&back, 1.0),
        told.len() - back.len(),
        a.deadline_secs,
        a.backoff_ms,
        failures
            .iter()
            .map(|f| json_string(f))
            .collect::<Vec<_>>()
            .join(","),
    );
    // The figures are out before the teardown, which may take a while.
    {
        use std::io::Write;
        let mut out = std::io::stdout().lock();
        writeln!(out, "{json}")
            .and_then(|()| out.flush())
            .map_err(|e| format!("stdout: {e}"))?;
    }

    teardown_tx.send_replace(true);
    let teardown_deadline = tokio::time::Instant::now() + TEARDOWN_LIMIT;
    let teardown_errors = Errors::default();
    for t in tasks {
        match tokio::time::timeout_at(teardown_deadline, t).await {
            Ok(Ok(None)) | Ok(Ok(Some(Ok(())))) => {}
            Ok(Ok(Some(Err(e)))) => teardown_errors.record(e),
            Ok(Err(e)) => teardown_errors.record(format!("session task: {e}")),
            Err(_) => teardown_errors.record("teardown time limit passed".into()),
        }
    }
    teardown_errors.report("storm teardown");
    // The JSON has been printed already.
    Ok(String::new())
}

fn micros(d: Duration) -> u32 {
    d.as_micros().min(u128::from(u32::MAX)) as u32
}

/// One session: set up, wait in IDLE to be told, reconnect until back or
/// the deadline, report, then (if it has a session) wait for the teardown
/// and log out. Returns the teardown's outcome, None without a session.
async fn session(
    k: usize,
    user: String,
    s: Arc<Shared>,
    setup_tx: mpsc::UnboundedSender<bool>,
    report_tx: mpsc::UnboundedSender<Report>,
) -> Option<Result<()>> {
    let opened = {
        let _permit = s.gate.acquire().await.expect("the gate is never closed");
        open_idle(s.target, s.tls.as_ref(), &user, &s.password).await
    };
    let _ = setup_tx.send(opened.is_ok());
    drop(setup_tx);
    let mut c = match opened {
        Ok(c) => c,
        Err(e) => {
            s.setup_errors.record(e);
            let _ = report_tx.send(Report::SetupFailed);
            return None;
        }
    };

    let mut end = s.end.clone();
    let told_at = loop {
        tokio::select! {
            line = c.line_within(s.told_limit) => match line {
                // Untagged news (EXISTS, a keepalive) is not being told.
                Ok(line) if !line.starts_with("* BYE") => continue,
                // BYE, end of stream, a reset: the session is over.
                _ => break Instant::now(),
            },
            // The guard wait_for returns must not live across the await below.
            _ = async { end.wait_for(|end| *end).await.is_ok() } => {
                let _ = report_tx.send(Report::Untold);
                return Some(teardown(&s, &mut c).await);
            }
        }
    };
    drop(c);
    let Some(t0) = *s.t0.borrow() else {
        let _ = report_tx.send(Report::DroppedBeforeKill);
        return None;
    };
    let deadline = t0 + Duration::from_secs(s.deadline_secs);
    if told_at >= deadline {
        let _ = report_tx.send(Report::Untold);
        return None;
    }
    let told = told_at - t0;

    let mut jitter = Jitter::new(k);
    let mut backoff = s.backoff;
    let mut failed_tries = 0;
    loop {
        let wake = Instant::now() + jitter.spread(backoff);
        if wake >= deadline {
            break;
        }
        tokio::time::sleep_until(wake.into()).await;
        let attempt = tokio::time::timeout_at(
            deadline.into(),
            open_idle(s.target, s.tls.as_ref(), &user, &s.password),
        )
        .await;
        match attempt {
            Ok(Ok(mut c)) => {
                let back = t0.elapsed();
                let _ = report_tx.send(Report::Told {
                    told,
                    back: Some(back),
                    failed_tries,
                });
                return Some(teardown(&s, &mut c).await);
            }
            Ok(Err(e)) => {
                failed_tries += 1;
                s.errors.record(without_user(e));
            }
            // The deadline passed during the try.
            Err(_) => {
                failed_tries += 1;
                break;
            }
        }
        backoff = (backoff * 2).min(MAX_BACKOFF.max(s.backoff));
    }
    let _ = report_tx.send(Report::Told {
        told,
        back: None,
        failed_tries,
    });
    None
}

/// "LOGIN u17: …" as "LOGIN: …", so that the same failure for different
/// users counts as one kind.
fn without_user(e: String) -> String {
    match e
        .strip_prefix("LOGIN ")
        .and_then(|rest| rest.split_once(": "))
    {
        Some((_, why)) => format!("LOGIN: {why}"),
        None => e,
    }
}

/// Waits for the teardown signal, then DONE and LOGOUT.
async fn teardown(s: &Shared, c: &mut Conn) -> Result<()> {
    let mut teardown = s.teardown.clone();
    let _ = teardown.wait_for(|t| *t).await;
    close_idle(c).await
}

/// Polls (bounded) for the kill file and reads its PIDs.
async fn wait_for_kill_file(path: &Path, limit: Duration) -> Result<Vec<i32>> {
    let deadline = Instant::now() + limit;
    while !path.exists() {
        if Instant::now() >= deadline {
            return Err(format!(
                "the kill file {} did not appear within {} s",
                path.display(),
                limit.as_secs()
            ));
        }
        tokio::time::sleep(KILL_FILE_POLL).await;
    }
    let text =
        std::fs::read_to_string(path).map_err(|e| format!("read {}: {e}", path.display()))?;
    parse_pids(&text, std::process::id()).map_err(|e| format!("kill file {}: {e}", path.display()))
}

/// PIDs, one per line (blank lines skipped); never 0, 1, negative, or
/// `own` (this process).
fn parse_pids(text: &str, own: u32) -> Result<Vec<i32>> {
    let mut pids = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        match line.parse::<i32>() {
            Ok(pid) if pid > 1 && pid as u32 != own => pids.push(pid),
            _ => return Err(format!("line {}: not a PID to kill: {line:?}", n + 1)),
        }
    }
    if pids.is_empty() {
        return Err("no PIDs".into());
    }
    Ok(pids)
}

/// SIGKILLs each PID; returns (killed, already gone). Any other failure
/// (no permission) is an error.
fn kill_all(pids: &[i32]) -> Result<(usize, usize)> {
    let (mut killed, mut gone) = (0, 0);
    for &pid in pids {
        // SAFETY: kill(2) with a validated PID (> 1) and a constant signal.
        if unsafe { libc::kill(pid, libc::SIGKILL) } == 0 {
            killed += 1;
        } else {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::ESRCH) {
                gone += 1;
            } else {
                return Err(format!("kill {pid}: {e}"));
            }
        }
    }
    Ok((killed, gone))
}

/// ±50 % jitter from a per-session xorshift generator.
struct Jitter(u64);

impl Jitter {
    fn new(k: usize) -> Jitter {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        // Never zero, which xorshift would keep forever.
        Jitter((k as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ u64::from(nanos) | 1)
    }

    /// A duration uniformly within [base/2, base*3/2).
    fn spread(&mut self, base: Duration) -> Duration {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        let unit = (self.0 >> 11) as f64 / (1u64 << 53) as f64;
        base.mul_f64(0.5 + unit)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pids() {
        assert_eq!(parse_pids("12\n 34 \n\n56\n", 99).unwrap(), [12, 34, 56]);
        assert!(parse_pids("", 99).is_err());
        assert!(parse_pids("1\n", 99).is_err());
        assert!(parse_pids("0\n", 99).is_err());
        assert!(parse_pids("-5\n", 99).is_err());
        assert!(parse_pids("99\n", 99).is_err());
        assert!(parse_pids("12 34\n", 99).is_err());
        assert!(parse_pids("abc\n", 99).is_err());
    }

    #[test]
    fn failures_without_users() {
        assert_eq!(
            without_user("LOGIN u17: connection closed by the server".into()),
            "LOGIN: connection closed by the server"
        );
        assert_eq!(without_user("connect: refused".into()), "connect: refused");
    }

    #[test]
    fn jitter_stays_within_half() {
        let mut j = Jitter::new(7);
        let base = Duration::from_millis(100);
        for _ in 0..1000 {
            let d = j.spread(base);
            assert!(d >= Duration::from_millis(50) && d < Duration::from_millis(150));
        }
    }
}
