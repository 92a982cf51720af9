//! postern-loadgen: the IMAP and POP3 load generator behind `bench/run`.
//!
//! Each subcommand drives one benchmark phase against a proxy (or a backend
//! directly), prints ONE line of JSON on stdout and exits 0, or prints a
//! message on stderr and exits 1. Every loop is bounded in count or time,
//! every read by a 10 s timeout (a storm session waiting in IDLE to be told,
//! or a held half-open connection, by the phase's length), and only
//! loopback targets are accepted.

mod conn;
mod halfopen;
mod storm;

use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use clap::{Args, Parser, Subcommand, ValueEnum};
use tokio::sync::{mpsc, watch, Semaphore};
use tokio_rustls::TlsConnector;

use conn::{Conn, Result};

const MIB: f64 = 1024.0 * 1024.0;
/// Initial read buffer of a login or idle session: greetings and capability
/// lines fit; longer lines grow it.
const SMALL_BUF: usize = 1024;
/// How long the idle teardown (DONE + LOGOUT on every session) may take.
const TEARDOWN_LIMIT: Duration = Duration::from_secs(120);
/// How many distinct error messages are kept for stderr.
const ERRORS_SHOWN: usize = 5;

#[derive(Parser)]
#[command(
    name = "postern-loadgen",
    version,
    about = "IMAP and POP3 load generator for bench/run"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Repeated full logins (connect, TLS, LOGIN, SELECT, LOGOUT) for a fixed time.
    Logins(LoginsArgs),
    /// Download message 1 of INBOX a few times and report the throughput.
    Fetch(FetchArgs),
    /// Hold many sessions in IDLE at once, then log them all out.
    Idle(IdleArgs),
    /// Append one message of the given size to INBOX (seeds a backend).
    Append(AppendArgs),
    /// Repeated full POP3 logins (connect, TLS, AUTH PLAIN or USER/PASS,
    /// STAT, QUIT) for a fixed time.
    Pop3(Pop3Args),
    /// Hold many connections that each sent part of a TLS handshake record
    /// (or nothing), to measure what a stalled handshake costs the peer.
    Halfopen(halfopen::HalfopenArgs),
    /// Hold many sessions in IDLE, SIGKILL a backend's processes, and time
    /// how the sessions that lose it are told and reconnect.
    Storm(storm::StormArgs),
}

#[derive(Args)]
struct Target {
    /// Where to connect: a loopback address and port.
    #[arg(long)]
    target: SocketAddr,
    /// implicit: TLS from the first byte (IMAPS, POP3S); none: plain text.
    #[arg(long, value_enum, default_value_t = TlsMode::Implicit)]
    tls: TlsMode,
}

#[derive(ValueEnum, Clone, Copy, PartialEq, Eq)]
enum TlsMode {
    Implicit,
    None,
}

impl Target {
    /// Checks the target is loopback and builds the TLS connector, if any
    /// (one that never resumes).
    fn prepare(&self) -> Result<Option<TlsConnector>> {
        check_loopback(self.target)?;
        self.connector(false)
    }

    /// A new TLS connector (with its own ticket store when `resume`), or
    /// None for plain text.
    fn connector(&self, resume: bool) -> Result<Option<TlsConnector>> {
        match self.tls {
            TlsMode::Implicit => conn::tls_connector(resume).map(Some),
            TlsMode::None if resume => Err("--resume needs --tls implicit".into()),
            TlsMode::None => Ok(None),
        }
    }
}

/// Only loopback targets: the benchmark never loads another machine.
fn check_loopback(target: SocketAddr) -> Result<()> {
    if target.ip().is_loopback() {
        Ok(())
    } else {
        Err(format!("refusing non-loopback target {target}"))
    }
}

#[derive(Args)]
struct LoginsArgs {
    #[command(flatten)]
    target: Target,
    #[command(flatten)]
    repeat: RepeatArgs,
    #[arg(long)]
    password: String,
}

/// Who logs in, how many at once, for how long: shared by `logins` and `pop3`.
#[derive(Args)]
struct RepeatArgs {
    /// Users are PREFIX0 … PREFIX{N-1}.
    #[arg(long, default_value = "u")]
    user_prefix: String,
    #[arg(long)]
    users: usize,
    /// Login loops running at once.
    #[arg(long, default_value_t = 16)]
    concurrency: usize,
    /// No login starts after this many seconds.
    #[arg(long, default_value_t = 10)]
    duration_secs: u64,
    /// Resume TLS 1.3 sessions as a reconnecting client does: each loop
    /// keeps the session tickets it receives and offers one on its next
    /// connection (its first connection does a full handshake). The JSON
    /// counts the connections that did resume.
    #[arg(long)]
    resume: bool,
}

#[derive(Args)]
struct Pop3Args {
    #[command(flatten)]
    target: Target,
    #[command(flatten)]
    repeat: RepeatArgs,
    #[arg(long)]
    password: String,
    /// plain: AUTH PLAIN with an initial response (RFC 5034); user: USER
    /// then PASS, for a server without SASL.
    #[arg(long, value_enum, default_value_t = Pop3Auth::Plain)]
    auth: Pop3Auth,
}

#[derive(ValueEnum, Clone, Copy, PartialEq, Eq)]
enum Pop3Auth {
    Plain,
    User,
}

#[derive(Args)]
struct FetchArgs {
    #[command(flatten)]
    target: Target,
    #[arg(long)]
    user: String,
    #[arg(long)]
    password: String,
    /// How many times message 1 is fetched.
    #[arg(long, default_value_t = 3)]
    repeat: usize,
}

#[derive(Args)]
struct IdleArgs {
    #[command(flatten)]
    target: Target,
    #[arg(long, default_value = "u")]
    user_prefix: String,
    #[arg(long)]
    users: usize,
    #[arg(long)]
    password: String,
    /// Sessions to open; session K logs in as PREFIX{K mod users}.
    #[arg(long)]
    sessions: usize,
    /// Sessions being set up (connect to IDLE) at once.
    #[arg(long, default_value_t = 64)]
    connect_concurrency: usize,
    /// How long all sessions stay in IDLE after the ready file is written.
    #[arg(long)]
    hold_secs: u64,
    /// Written (with the number of idling sessions) once setup has finished.
    #[arg(long)]
    ready_file: std::path::PathBuf,
}

#[derive(Args)]
struct AppendArgs {
    #[command(flatten)]
    target: Target,
    #[arg(long)]
    user: String,
    #[arg(long)]
    password: String,
    #[arg(long, default_value_t = 10)]
    size_mib: u64,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // Thousands of idle sessions need thousands of descriptors.
    raise_nofile_limit();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let outcome = runtime.block_on(async {
        match cli.command {
            Command::Logins(a) => logins(a).await,
            Command::Fetch(a) => fetch(a).await,
            Command::Idle(a) => idle(a).await,
            Command::Append(a) => append(a).await,
            Command::Pop3(a) => pop3(a).await,
            Command::Halfopen(a) => halfopen::halfopen(a).await,
            // Prints its JSON itself, before closing its sessions.
            Command::Storm(a) => storm::storm(a).await,
        }
    });
    // Tasks still blocked on a dead peer must not delay the exit.
    runtime.shutdown_background();
    match outcome {
        Ok(json) => {
            if !json.is_empty() {
                println!("{json}");
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("postern-loadgen: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Counts errors and keeps the first few distinct messages.
#[derive(Default)]
struct Errors(Mutex<(u64, Vec<String>)>);

impl Errors {
    fn record(&self, message: String) {
        let mut inner = self.0.lock().expect("errors lock");
        inner.0 += 1;
        if inner.1.len() < ERRORS_SHOWN && !inner.1.contains(&message) {
            inner.1.push(message);
        }
    }

    fn count(&self) -> u64 {
        self.0.lock().expect("errors lock").0
    }

    /// The first few distinct messages.
    fn first(&self) -> Vec<String> {
        self.0.lock().expect("errors lock").1.clone()
    }

    /// "N errors, first: a | b" for stderr and failure messages.
    fn summary(&self, what: &str) -> String {
        let inner = self.0.lock().expect("errors lock");
        format!(
            "{} {what} errors; first distinct: {}",
            inner.0,
            inner.1.join(" | ")
        )
    }

    fn report(&self, what: &str) {
        if self.count() > 0 {
            eprintln!("postern-loadgen: {}", self.summary(what));
        }
    }
}

/// IMAP quoted string (the benchmark's names and passwords are plain ASCII).
fn quoted(s: &str) -> String {
    format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""))
}

/// Sends `tag command` and reads to its tagged OK; errors name `what`
/// (never the command, which may hold a password).
async fn command(
    c: &mut Conn,
    tag: &str,
    command: &str,
    what: &str,
    scratch: &mut Vec<u8>,
) -> Result<()> {
    c.send(format!("{tag} {command}\r\n").as_bytes()).await?;
    c.tagged(tag, scratch)
        .await
        .map_err(|e| format!("{what}: {e}"))?;
    Ok(())
}

async fn login(c: &mut Conn, user: &str, password: &str, scratch: &mut Vec<u8>) -> Result<()> {
    let line = format!("LOGIN {} {}", quoted(user), quoted(password));
    command(c, "a", &line, &format!("LOGIN {user}"), scratch).await
}

async fn select_inbox(c: &mut Conn, scratch: &mut Vec<u8>) -> Result<()> {
    command(c, "b", "SELECT INBOX", "SELECT", scratch).await
}

async fn logout(c: &mut Conn, scratch: &mut Vec<u8>) -> Result<()> {
    command(c, "c", "LOGOUT", "LOGOUT", scratch).await
}

/// What a successful visit reports: the TLS parameters it negotiated and
/// whether its handshake resumed an earlier session.
struct Visited {
    tls: String,
    resumed: bool,
}

impl Visited {
    fn of(c: &Conn) -> Visited {
        Visited {
            tls: c.tls_description(),
            resumed: c.resumed(),
        }
    }
}

/// One whole client visit.
async fn one_login(
    target: SocketAddr,
    tls: Option<&TlsConnector>,
    user: &str,
    password: &str,
) -> Result<Visited> {
    let mut scratch = Vec::new();
    let mut c = Conn::open(target, tls, SMALL_BUF).await?;
    login(&mut c, user, password, &mut scratch).await?;
    select_inbox(&mut c, &mut scratch).await?;
    logout(&mut c, &mut scratch).await?;
    Ok(Visited::of(&c))
}

async fn logins(a: LoginsArgs) -> Result<String> {
    let (target, password) = (a.target.target, Arc::new(a.password));
    let visit = move |user: String, tls: Option<TlsConnector>| {
        let password = password.clone();
        async move { one_login(target, tls.as_ref(), &user, &password).await }
    };
    let summary = timed_logins(&a.repeat, &a.target, visit).await?;
    Ok(format!("{{{summary}}}"))
}

/// One POP3 visit: greeting, authentication, STAT, QUIT.
async fn one_pop3_login(
    target: SocketAddr,
    tls: Option<&TlsConnector>,
    auth: Pop3Auth,
    user: &str,
    password: &str,
) -> Result<Visited> {
    let mut c = Conn::connect(target, tls, SMALL_BUF).await?;
    c.pop3_ok("greeting").await?;
    match auth {
        Pop3Auth::Plain => {
            // RFC 5034's initial response: one round trip, like IMAP's SASL-IR.
            let response = base64(format!("\0{user}\0{password}").as_bytes());
            c.send(format!("AUTH PLAIN {response}\r\n").as_bytes())
                .await?;
            c.pop3_ok(&format!("AUTH PLAIN {user}")).await?;
        }
        Pop3Auth::User => {
            c.send(format!("USER {user}\r\n").as_bytes()).await?;
            c.pop3_ok(&format!("USER {user}")).await?;
            c.send(format!("PASS {password}\r\n").as_bytes()).await?;
            c.pop3_ok(&format!("PASS {user}")).await?;
        }
    }
    c.send(b"STAT\r\n").await?;
    c.pop3_ok("STAT").await?;
    c.send(b"QUIT\r\n").await?;
    c.pop3_ok("QUIT").await?;
    Ok(Visited::of(&c))
}

async fn pop3(a: Pop3Args) -> Result<String> {
    let (target, password, auth) = (a.target.target, Arc::new(a.password), a.auth);
    let visit = move |user: String, tls: Option<TlsConnector>| {
        let password = password.clone();
        async move { one_pop3_login(target, tls.as_ref(), auth, &user, &password).await }
    };
    let summary = timed_logins(&a.repeat, &a.target, visit).await?;
    let auth = match a.auth {
        Pop3Auth::Plain => "plain",
        Pop3Auth::User => "user",
    };
    Ok(format!("{{{summary},\"auth\":\"{auth}\"}}"))
}

/// Runs `visit(user, connector)` in `concurrency` loops until the duration
/// has passed, users cycling over PREFIX0 … PREFIX{N-1}; each loop has a
/// TLS connector of its own (so with `--resume` its own ticket store).
/// Returns the JSON fields (without braces) of the outcome: logins, errors,
/// rate, latency percentiles, the loadgen's own CPU, the TLS parameters
/// seen, and whether resumption was on and how many logins resumed.
async fn timed_logins<F, Fut>(r: &RepeatArgs, target: &Target, visit: F) -> Result<String>
where
    F: Fn(String, Option<TlsConnector>) -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = Result<Visited>> + Send,
{
    check_loopback(target.target)?;
    if r.users == 0 || r.concurrency == 0 {
        return Err("--users and --concurrency must be positive".into());
    }
    let connectors = (0..r.concurrency)
        .map(|_| target.connector(r.resume))
        .collect::<Result<Vec<_>>>()?;
    let resumed = Arc::new(AtomicUsize::new(0));
    let next_user = Arc::new(AtomicUsize::new(0));
    let errors = Arc::new(Errors::default());
    let tls_used = Arc::new(OnceLock::new());
    let cpu_before = own_cpu_ms();
    let start = Instant::now();
    let deadline = start + Duration::from_secs(r.duration_secs);

    let mut loops = Vec::with_capacity(r.concurrency);
    for connector in connectors {
        let (visit, next_user, errors, tls_used, resumed) = (
            visit.clone(),
            next_user.clone(),
            errors.clone(),
            tls_used.clone(),
            resumed.clone(),
        );
        let (prefix, users) = (r.user_prefix.clone(), r.users);
        loops.push(tokio::spawn(async move {
            let mut latencies_us: Vec<u32> = Vec::new();
            // Each visit is bounded by the connection's timeouts, so the
            // loop ends at most one visit after the deadline.
            while Instant::now() < deadline {
                // One shared counter spreads the users over all loops.
                let user = format!(
                    "{prefix}{}",
                    next_user.fetch_add(1, Ordering::Relaxed) % users
                );
                let began = Instant::now();
                match visit(user, connector.clone()).await {
                    Ok(visited) => {
                        latencies_us.push(began.elapsed().as_micros().min(u32::MAX as u128) as u32);
                        if visited.resumed {
                            resumed.fetch_add(1, Ordering::Relaxed);
                        }
                        tls_used.get_or_init(|| visited.tls);
                    }
                    Err(e) => {
                        errors.record(e);
                        // A refusing target must not turn this into a busy loop.
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                }
            }
            latencies_us
        }));
    }
    let mut latencies = Vec::new();
    for l in loops {
        latencies.extend(l.await.map_err(|e| format!("login loop: {e}"))?);
    }
    let secs = start.elapsed().as_secs_f64();
    let cpu_ms = own_cpu_ms() - cpu_before;
    errors.report("login");
    if latencies.is_empty() {
        return Err(format!("no login succeeded: {}", errors.summary("login")));
    }
    latencies.sort_unstable();
    let ms = |p: f64| percentile(&latencies, p) as f64 / 1000.0;
    Ok(format!(
        "\"logins\":{},\"errors\":{},\"secs\":{:.3},\"logins_per_sec\":{:.1},\"p50_ms\":{:.2},\"p99_ms\":{:.2},\"loadgen_cpu_ms\":{},\"tls\":{},\"concurrency\":{},\"resume\":{},\"resumed\":{}",
        latencies.len(),
        errors.count(),
        secs,
        latencies.len() as f64 / secs,
        ms(0.50),
        ms(0.99),
        cpu_ms,
        json_string(tls_used.get().map(String::as_str).unwrap_or("")),
        r.concurrency,
        r.resume,
        resumed.load(Ordering::Relaxed),
    ))
}

/// Standard base64 with padding (RFC 4648), for SASL responses.
fn base64(data: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = u32::from(b[0]) << 16 | u32::from(b[1]) << 8 | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ALPHABET[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// Nearest-rank percentile of a sorted, non-empty slice.
fn percentile(sorted: &[u32], p: f64) -> u32 {
    let rank = (p * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

async fn fetch(a: FetchArgs) -> Result<String> {
    let tls = a.target.prepare()?;
    if a.repeat == 0 {
        return Err("--repeat must be positive".into());
    }
    // Large buffers: the literal is read in big chunks, as a real client would.
    let mut scratch = vec![0; 1024 * 1024];
    let mut c = Conn::open(a.target.target, tls.as_ref(), 64 * 1024).await?;
    login(&mut c, &a.user, &a.password, &mut scratch).await?;
    select_inbox(&mut c, &mut scratch).await?;
    let mut rates = Vec::with_capacity(a.repeat);
    let mut bytes = 0;
    for _ in 0..a.repeat {
        let began = Instant::now();
        c.send(b"f FETCH 1 BODY.PEEK[]\r\n").await?;
        bytes = c
            .tagged("f", &mut scratch)
            .await
            .map_err(|e| format!("FETCH: {e}"))?;
        let secs = began.elapsed().as_secs_f64();
        if bytes == 0 {
            return Err("FETCH returned no literal: is INBOX empty?".into());
        }
        rates.push(bytes as f64 / MIB / secs);
    }
    logout(&mut c, &mut scratch).await?;
    rates.sort_by(f64::total_cmp);
    Ok(format!(
        "{{\"bytes\":{},\"best_mib_per_sec\":{:.1},\"median_mib_per_sec\":{:.1}}}",
        bytes,
        rates[rates.len() - 1],
        rates[rates.len() / 2],
    ))
}

/// Logs in, selects INBOX and enters IDLE; the session is then quiet.
async fn open_idle(
    target: SocketAddr,
    tls: Option<&TlsConnector>,
    user: &str,
    password: &str,
) -> Result<Conn> {
    let mut scratch = Vec::new();
    let mut c = Conn::open(target, tls, SMALL_BUF).await?;
    login(&mut c, user, password, &mut scratch).await?;
    select_inbox(&mut c, &mut scratch).await?;
    c.send(b"i IDLE\r\n").await?;
    c.continuation("i")
        .await
        .map_err(|e| format!("IDLE: {e}"))?;
    c.compact(SMALL_BUF);
    Ok(c)
}

async fn close_idle(c: &mut Conn) -> Result<()> {
    let mut scratch = Vec::new();
    c.send(b"DONE\r\n").await?;
    c.tagged("i", &mut scratch)
        .await
        .map_err(|e| format!("DONE: {e}"))?;
    logout(c, &mut scratch).await
}

async fn idle(a: IdleArgs) -> Result<String> {
    let tls = a.target.prepare()?;
    if a.users == 0 || a.sessions == 0 {
        return Err("--users and --sessions must be positive".into());
    }
    let gate = Arc::new(Semaphore::new(a.connect_concurrency.max(1)));
    let (stop_tx, stop_rx) = watch::channel(false);
    let (setup_tx, mut setup_rx) = mpsc::unbounded_channel::<bool>();
    let errors = Arc::new(Errors::default());
    let start = Instant::now();

    let mut sessions = Vec::with_capacity(a.sessions);
    for k in 0..a.sessions {
        let user = format!("{}{}", a.user_prefix, k % a.users);
        let (tls, gate, mut stop_rx, setup_tx, errors) = (
            tls.clone(),
            gate.clone(),
            stop_rx.clone(),
            setup_tx.clone(),
            errors.clone(),
        );
        let (target, password) = (a.target.target, a.password.clone());
        sessions.push(tokio::spawn(async move {
            let opened = {
                let _permit = gate.acquire().await.expect("the gate is never closed");
                open_idle(target, tls.as_ref(), &user, &password).await
            };
            let _ = setup_tx.send(opened.is_ok());
            drop(setup_tx);
            let mut c = match opened {
                Ok(c) => c,
                Err(e) => {
                    errors.record(e);
                    return None;
                }
            };
            let _ = stop_rx.wait_for(|stop| *stop).await;
            Some(close_idle(&mut c).await)
        }));
    }
    drop(setup_tx);

    // Every setup step is bounded by timeouts, so this loop ends.
    let (mut idling, mut failed) = (0usize, 0usize);
    while let Some(ok) = setup_rx.recv().await {
        if ok {
            idling += 1;
        } else {
            failed += 1;
        }
    }
    let setup_secs = start.elapsed().as_secs_f64();
    errors.report("idle setup");
    eprintln!("postern-loadgen: {idling} sessions idling, {failed} failed, after {setup_secs:.1} s; holding {} s", a.hold_secs);
    write_ready(&a.ready_file, idling)?;

    tokio::time::sleep(Duration::from_secs(a.hold_secs)).await;

    let _ = stop_tx.send(true);
    let teardown_deadline = tokio::time::Instant::now() + TEARDOWN_LIMIT;
    let teardown_errors = Errors::default();
    for s in sessions {
        match tokio::time::timeout_at(teardown_deadline, s).await {
            Ok(Ok(None)) | Ok(Ok(Some(Ok(())))) => {}
            Ok(Ok(Some(Err(e)))) => teardown_errors.record(e),
            Ok(Err(e)) => teardown_errors.record(format!("session task: {e}")),
            Err(_) => teardown_errors.record("teardown time limit passed".into()),
        }
    }
    teardown_errors.report("idle teardown");
    Ok(format!(
        "{{\"sessions\":{},\"failed\":{},\"setup_secs\":{:.2},\"teardown_errors\":{}}}",
        idling,
        failed,
        setup_secs,
        teardown_errors.count(),
    ))
}

/// Writes `count` to the ready file whole, then renames it into place, so a
/// watcher never reads it half-done.
fn write_ready(path: &std::path::Path, count: usize) -> Result<()> {
    let partial = path.with_extension("partial");
    std::fs::write(&partial, count.to_string())
        .and_then(|()| std::fs::rename(&partial, path))
        .map_err(|e| format!("write {}: {e}", path.display()))
}

async fn append(a: AppendArgs) -> Result<String> {
    let tls = a.target.prepare()?;
    let size = usize::try_from(a.size_mib * 1024 * 1024).map_err(|_| "--size-mib too large")?;
    let message = message_of_size(size)?;
    let mut scratch = Vec::new();
    let mut c = Conn::open(a.target.target, tls.as_ref(), 4096).await?;
    login(&mut c, &a.user, &a.password, &mut scratch).await?;
    let began = Instant::now();
    c.send(format!("a APPEND INBOX {{{}}}\r\n", message.len()).as_bytes())
        .await?;
    c.continuation("a")
        .await
        .map_err(|e| format!("APPEND: {e}"))?;
    for chunk in message.chunks(256 * 1024) {
        c.send(chunk).await?;
    }
    c.send(b"\r\n").await?;
    c.tagged("a", &mut scratch)
        .await
        .map_err(|e| format!("APPEND: {e}"))?;
    let secs = began.elapsed().as_secs_f64();
    logout(&mut c, &mut scratch).await?;
    Ok(format!(
        "{{\"appended_bytes\":{},\"secs\":{:.3}}}",
        message.len(),
        secs
    ))
}

/// A text/plain message of exactly `size` bytes: a few headers, then CRLF
/// lines of pseudo-random words, so the body is neither constant nor binary.
fn message_of_size(size: usize) -> Result<Vec<u8>> {
    let header = format!(
        "From: loadgen <loadgen@localhost>\r\nTo: <u0@localhost>\r\n\
         Subject: postern-loadgen message of {size} bytes\r\n\
         Date: Mon, 01 Jan 2024 00:00:00 +0000\r\nMessage-ID: <loadgen-{size}@localhost>\r\n\
         MIME-Version: 1.0\r\nContent-Type: text/plain; charset=us-ascii\r\n\r\n"
    );
    if size < header.len() + 2 {
        return Err(format!(
            "a message needs at least {} bytes",
            header.len() + 2
        ));
    }
    const LETTERS: &[u8] = b"etaoinshrdlucmfwypvbgkqjxz";
    let mut m = Vec::with_capacity(size);
    m.extend_from_slice(header.as_bytes());
    let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut next = move || {
        // xorshift64: cheap, deterministic, good enough for filler text.
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    // Lines of at most 78 characters + CRLF, until one more might not fit.
    while size - m.len() > 80 {
        let width = 40 + (next() % 39) as usize;
        let start = m.len();
        while m.len() - start < width {
            let r = next();
            let word = 1 + (r % 9) as usize;
            for i in 0..word {
                // Skewed towards the first letters, like English text.
                let pick = ((r >> (8 + 3 * i)) % 26) as usize;
                m.push(LETTERS[pick * pick / 26]);
            }
            m.push(b' ');
        }
        m.truncate(start + width);
        m.extend_from_slice(b"\r\n");
    }
    // The loop left 2..=80 bytes: one last line of dots and its CRLF.
    m.resize(size - 2, b'.');
    m.extend_from_slice(b"\r\n");
    Ok(m)
}

/// This process's user + system CPU time so far, in milliseconds.
fn own_cpu_ms() -> u64 {
    // SAFETY: getrusage only writes into the zeroed struct we pass.
    let usage = unsafe {
        let mut usage: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_SELF, &mut usage);
        usage
    };
    let ms = |t: libc::timeval| t.tv_sec as u64 * 1000 + t.tv_usec as u64 / 1000;
    ms(usage.ru_utime) + ms(usage.ru_stime)
}

/// Raises the soft descriptor limit to the hard one (best effort).
fn raise_nofile_limit() {
    // SAFETY: plain libc calls on a local struct.
    unsafe {
        let mut limit: libc::rlimit = std::mem::zeroed();
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 && limit.rlim_cur < limit.rlim_max
        {
            limit.rlim_cur = limit.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
        }
    }
}

fn json_string(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for ch in s.chars() {
        match ch {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn message_has_exact_size_and_crlf_lines() {
        for size in [400, 1000, 1024 * 1024] {
            let m = message_of_size(size).unwrap();
            assert_eq!(m.len(), size);
            assert!(m.ends_with(b"\r\n"));
            for line in m[..size - 2].split(|&b| b == b'\n') {
                assert!(line.len() <= 80, "line too long");
                assert!(!line.contains(&b'\r') || line.ends_with(b"\r"));
            }
        }
    }

    #[test]
    fn base64_matches_rfc4648() {
        assert_eq!(base64(b""), "");
        assert_eq!(base64(b"f"), "Zg==");
        assert_eq!(base64(b"fo"), "Zm8=");
        assert_eq!(base64(b"foo"), "Zm9v");
        assert_eq!(base64(b"foobar"), "Zm9vYmFy");
        assert_eq!(base64(b"\0u0\0pw"), "AHUwAHB3");
    }

    #[test]
    fn percentiles() {
        let v: Vec<u32> = (1..=100).collect();
        assert_eq!(percentile(&v, 0.5), 50);
        assert_eq!(percentile(&v, 0.99), 99);
        assert_eq!(percentile(&[7], 0.99), 7);
    }
}
