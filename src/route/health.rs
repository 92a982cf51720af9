//! Active health checks: one task per backend, on the control runtime.
//!
//! Every `interval` (the first check at start, later ones with up to 10 %
//! random delay so replicas and backends do not fall into step) a check
//! connects, reads the greeting, logs in with the probe account when one is
//! configured, and logs out, all within `timeout`. `fall` failures in a row
//! take an up backend down; `rise` passes in a row bring a down one up.
//! A backend taken down by failed session logins (passive) needs `rise`
//! fresh passes as well.
//!
//! This module decides nothing about routing: it only writes the state the
//! [`Pool`] reads.

use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::Rng;

use super::{Backend, Pool};
use crate::backend;
use crate::config::HealthCheck;
use crate::imap::Secret;
use crate::latch::Latch;
use crate::metrics::Metrics;

/// The probe account's credentials, read from its password file.
#[derive(Clone)]
pub struct ProbeAccount {
    pub user: String,
    pub password: Arc<Secret>,
}

/// Starts the checks of every backend in `pool` on the current runtime.
/// They run until the runtime stops, or a backend is retired.
pub fn spawn(
    pool: &Arc<Pool>,
    config: &HealthCheck,
    probe: Option<ProbeAccount>,
    metrics: &Arc<Metrics>,
    stop: &Arc<Latch>,
) {
    for backend in pool.backends() {
        spawn_one(backend, config, probe.clone(), metrics, stop);
    }
}

/// Starts the checks of one backend (a newly discovered one). They stop
/// when `stop` is set (a reload started new ones) or the backend retires.
pub fn spawn_one(
    backend: Arc<Backend>,
    config: &HealthCheck,
    probe: Option<ProbeAccount>,
    metrics: &Arc<Metrics>,
    stop: &Arc<Latch>,
) {
    if !config.enabled {
        return;
    }
    let config = config.clone();
    let metrics = Arc::clone(metrics);
    let stop = Arc::clone(stop);
    tokio::spawn(async move { check_loop(backend, config, probe, metrics, stop).await });
}

async fn check_loop(
    backend: Arc<Backend>,
    config: HealthCheck,
    probe: Option<ProbeAccount>,
    metrics: Arc<Metrics>,
    stop: Arc<Latch>,
) {
    let duration = metrics
        .backend_check_duration
        .with_label_values(&[&backend.name]);
    let passed_count = metrics
        .backend_checks
        .with_label_values(&[&backend.name, "pass"]);
    let failed_count = metrics
        .backend_checks
        .with_label_values(&[&backend.name, "fail"]);
    let mut passes = 0u32;
    let mut failures = 0u32;
    let mut seen_up = backend.is_up();
    while !backend.is_retired() && !stop.is_set() {
        let started = Instant::now();
        let login = probe
            .as_ref()
            .map(|p| (p.user.as_str(), p.password.as_ref()));
        let result =
            match tokio::time::timeout(config.timeout, backend::probe(&backend, login)).await {
                Ok(Ok(())) => Ok(()),
                Ok(Err(e)) => Err(e.to_string()),
                Err(_) => Err(format!("no answer within {:?}", config.timeout)),
            };
        duration.observe(started.elapsed().as_secs_f64());
        // Someone else (failed session logins) changed the state: count
        // afresh from here.
        if backend.is_up() != seen_up {
            passes = 0;
            failures = 0;
        }
        match result {
            Ok(()) => {
                passed_count.inc();
                passes = passes.saturating_add(1);
                failures = 0;
                if !backend.is_up() && passes >= config.rise {
                    backend.set_up(true, &format!("{passes} health checks passed"));
                }
            }
            Err(reason) => {
                failed_count.inc();
                failures = failures.saturating_add(1);
                passes = 0;
                tracing::debug!(backend = %backend.name, reason, "health check failed");
                if backend.is_up() && failures >= config.fall {
                    backend.set_up(
                        false,
                        &format!("{failures} health checks failed, last: {reason}"),
                    );
                }
            }
        }
        seen_up = backend.is_up();
        let spread = config
            .interval
            .mul_f64(rand::thread_rng().gen_range(0.0..0.1));
        let next = started + config.interval + spread;
        let wake = next.max(Instant::now() + Duration::from_millis(10));
        // A reload's new checks replace these at once.
        tokio::select! {
            _ = tokio::time::sleep_until(wake.into()) => {}
            _ = stop.wait() => {}
        }
    }
}
