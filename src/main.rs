//! The `postern` command line: `run`, `check-config`, `hash-password`.

use std::io::BufRead;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use arc_swap::ArcSwap;
use clap::{Parser, Subcommand};

use postern::auth::password::{self, Scheme};
use postern::config::Config;
use postern::live::Runtime;
use postern::metrics::Metrics;
use postern::shutdown::Shutdown;
use postern::tls::SelfSignedMode;
use tokio::signal::unix::{signal, SignalKind};

#[derive(Parser)]
#[command(
    name = "postern",
    version,
    about = "TLS-terminating IMAP proxy and load balancer"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the proxy.
    Run {
        /// The configuration file.
        #[arg(short, long, default_value = "/etc/postern/postern.yaml")]
        config: PathBuf,
    },
    /// Check a configuration (and its users file and certificates) without starting.
    CheckConfig {
        /// The configuration file.
        config: PathBuf,
    },
    /// Print a password hash for a users file; reads the password from standard input.
    HashPassword {
        #[arg(long, value_enum, default_value = "argon2id")]
        scheme: Scheme,
    },
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    postern::tls::install_provider();
    match cli.command {
        Command::Run { config } => run(config),
        Command::CheckConfig { config } => check_config(config),
        Command::HashPassword { scheme } => hash_password(scheme),
    }
}

fn check_config(path: PathBuf) -> anyhow::Result<()> {
    let config = Config::load(&path)?;
    let summary = format!(
        "{}: configuration OK ({} listeners, {} backends)",
        path.display(),
        config.listeners.len(),
        config.backends.pool.len()
    );
    Runtime::build(config, Metrics::new(), SelfSignedMode::InMemory, None)
        .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    println!("{summary}");
    Ok(())
}

fn hash_password(scheme: Scheme) -> anyhow::Result<()> {
    if std::io::IsTerminal::is_terminal(&std::io::stdin()) {
        eprint!("Password (echoed): ");
    }
    let mut line = String::new();
    std::io::stdin().lock().read_line(&mut line)?;
    let password = line.strip_suffix('\n').unwrap_or(&line);
    let password = password.strip_suffix('\r').unwrap_or(password);
    if password.is_empty() {
        anyhow::bail!("empty password");
    }
    let hash = password::hash(password.as_bytes(), scheme).map_err(|e| anyhow::anyhow!(e))?;
    println!("{hash}");
    Ok(())
}

fn run(path: PathBuf) -> anyhow::Result<()> {
    let config = Config::load(&path)?;
    postern::logging::init(&config.log);
    let metrics = Metrics::new();
    let workers = config.workers.count();
    let metrics_bind = config.metrics.bind;
    let max_connections = config.limits.max_connections;
    let runtime = Runtime::build(config, Arc::clone(&metrics), SelfSignedMode::Persist, None)
        .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    let live = Arc::new(ArcSwap::from_pointee(runtime));
    let listeners = postern::server::bind_all(&live.load().config.listeners)?;
    let slots = Arc::new(tokio::sync::Semaphore::new(max_connections));
    metrics.connection_limit.set(max_connections as i64);
    let shutdown = Arc::new(Shutdown::default());
    let registry = Arc::new(postern::registry::Registry::default());
    let mut commands = Vec::with_capacity(workers);
    for index in 0..workers {
        let shared = listeners
            .iter()
            .map(|l| l.share())
            .collect::<std::io::Result<Vec<_>>>()?;
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        commands.push(tx);
        postern::server::run_worker(
            index,
            shared,
            rx,
            Arc::clone(&live),
            Arc::clone(&slots),
            Arc::clone(&shutdown),
            Arc::clone(&registry),
        )
        .context("cannot start a worker thread")?;
    }
    let listeners = postern::server::Listeners::new(listeners, commands);

    // The main thread serves metrics and waits for a signal.
    let control = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the control runtime")?;
    control.block_on(async move {
        // Before anything else: SIGHUP's default action would end the process.
        let mut hup = signal(SignalKind::hangup()).context("SIGHUP handler")?;
        let mut term = signal(SignalKind::terminate()).context("SIGTERM handler")?;
        let mut int = signal(SignalKind::interrupt()).context("SIGINT handler")?;
        // The cluster store: connected in the background, never waited for.
        let cluster = Arc::clone(&live.load().cluster);
        cluster
            .start(Arc::clone(&live), Arc::clone(&registry))
            .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        // Discovered backends join before the process reports ready.
        let mut reloader =
            postern::reload::Reloader::start(path.clone(), Arc::clone(&live), Arc::clone(&metrics), listeners)
                .await;
        postern::metrics::serve(metrics_bind, Arc::clone(&metrics))
            .await
            .with_context(|| format!("metrics endpoint cannot bind {metrics_bind}"))?;
        let (reload_tx, mut reload_rx) = tokio::sync::mpsc::channel::<postern::admin::ReloadRequest>(4);
        let admin_config = live.load().config.admin.clone();
        if let Some(admin) = admin_config {
            let api = postern::admin::Admin {
                live: Arc::clone(&live),
                registry: Arc::clone(&registry),
                reload: reload_tx,
                token_file: live.load().config.resolve(&admin.token_file),
                config_path: path.clone(),
            };
            postern::admin::serve(admin.bind, Arc::new(api))
                .await
                .with_context(|| format!("admin API cannot bind {}", admin.bind))?;
        }
        metrics.ready.store(true, std::sync::atomic::Ordering::Relaxed);
        tracing::info!(version = env!("CARGO_PKG_VERSION"), config = %path.display(), workers, "postern started");
        let mut watch = tokio::time::interval(live.load().config.reload.interval);
        watch.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = int.recv() => break,
                _ = term.recv() => break,
                _ = hup.recv() => {
                    let _ = reloader.reload("SIGHUP").await;
                }
                Some(answer) = reload_rx.recv() => {
                    let _ = answer.send(reloader.reload("admin API").await);
                }
                _ = watch.tick() => {
                    if live.load().config.reload.watch && reloader.files_changed() {
                        let _ = reloader.reload("file changed").await;
                    }
                }
            }
        }
        // Readiness fails first, so load balancers stop sending; then the
        // listeners close; sessions get the drain period, then a BYE.
        metrics.ready.store(false, std::sync::atomic::Ordering::Relaxed);
        shutdown.stop_accepting();
        reloader.close_listeners();
        let drain = live.load().config.limits.shutdown_drain;
        let open = max_connections - slots.available_permits();
        tracing::info!(sessions = open, drain = ?drain, "shutting down: listeners closed, draining sessions");
        let all_closed = || slots.acquire_many(max_connections as u32);
        // A second SIGTERM or SIGINT cuts the drain short.
        let drained = tokio::select! {
            drained = tokio::time::timeout(drain, all_closed()) => drained.is_ok(),
            _ = term.recv() => false,
            _ = int.recv() => false,
        };
        if !drained {
            let open = max_connections - slots.available_permits();
            tracing::info!(sessions = open, "drain over; closing the remaining sessions");
            shutdown.close_sessions();
            // Each session says BYE and closes within a second or two;
            // pre-auth sessions are cut at exit.
            let _ = tokio::time::timeout(Duration::from_secs(3), all_closed()).await;
        }
        tracing::info!("shut down");
        Ok(())
    })
}
