//! Metric families and the small HTTP endpoint that serves them.
//!
//! Families follow Prometheus naming (`_total` counters, base units:
//! seconds and bytes). Labels have bounded values only: listener and backend
//! names from the config, and fixed reason words. Usernames, client
//! addresses and secrets are never labels.
//!
//! The endpoint (hyper, HTTP/1.1) serves `/metrics`, `/healthz` (the process
//! answers) and `/readyz` (every listener is bound and accepting).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Request, Response, StatusCode};
use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGaugeVec, Opts, Registry,
    TextEncoder,
};

pub struct Metrics {
    pub registry: Registry,
    pub connections_accepted: IntCounterVec,
    pub connections_rejected: IntCounterVec,
    pub sessions_active: IntGaugeVec,
    pub sessions_ended: IntCounterVec,
    pub listener_info: IntGaugeVec,
    pub tls_handshake_failures: IntCounterVec,
    pub tls_handshakes: IntCounterVec,
    pub auth_duration: HistogramVec,
    pub auth_penalties: IntCounter,
    pub auth_blocks: IntCounterVec,
    pub auth_throttled: IntCounterVec,
    pub auth_blocked_networks: prometheus::IntCounter,
    pub auth_refused_blocked: prometheus::IntCounter,
    pub auth_familiar: prometheus::IntCounter,
    pub auth_queued: IntCounterVec,
    pub auth_lane_full: IntCounterVec,
    pub auth_forwarded: prometheus::IntCounter,
    pub auth_tracked: IntGaugeVec,
    pub session_limit: IntCounterVec,
    pub auth_cache_hits: IntCounterVec,
    pub auth_circuit_open: prometheus::IntGauge,
    pub auth_circuit_rejected: IntCounter,
    pub backend_draining: IntGaugeVec,
    pub connection_limit: prometheus::IntGauge,
    pub authentications: IntCounterVec,
    pub backend_logins: IntCounterVec,
    pub backend_up: IntGaugeVec,
    pub backend_sessions: IntGaugeVec,
    pub backend_transitions: IntCounterVec,
    pub backend_checks: IntCounterVec,
    pub backend_check_duration: HistogramVec,
    pub routes: IntCounterVec,
    pub config_reloads: IntCounterVec,
    pub config_info: IntGaugeVec,
    pub config_last_reload: prometheus::Gauge,
    pub relay_bytes: IntCounterVec,
    pub session_duration: HistogramVec,
    pub login_duration: HistogramVec,
    pub starttls_discarded_bytes: IntCounter,
    pub ready: AtomicBool,
}

impl Metrics {
    pub fn new() -> Arc<Metrics> {
        let registry = Registry::new();
        fn counter(r: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
            let c = IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric");
            r.register(Box::new(c.clone())).expect("unique metric");
            c
        }
        fn histogram(
            r: &Registry,
            name: &str,
            help: &str,
            labels: &[&str],
            buckets: Vec<f64>,
        ) -> HistogramVec {
            let h = HistogramVec::new(HistogramOpts::new(name, help).buckets(buckets), labels)
                .expect("valid metric");
            r.register(Box::new(h.clone())).expect("unique metric");
            h
        }
        fn single(r: &Registry, name: &str, help: &str) -> IntCounter {
            let c = IntCounter::new(name, help).expect("valid metric");
            r.register(Box::new(c.clone())).expect("unique metric");
            c
        }
        fn gauge(r: &Registry, name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
            let g = IntGaugeVec::new(Opts::new(name, help), labels).expect("valid metric");
            r.register(Box::new(g.clone())).expect("unique metric");
            g
        }
        // process_cpu_seconds_total, process_resident_memory_bytes,
        // process_open_fds and the rest, from /proc.
        registry
            .register(Box::new(
                prometheus::process_collector::ProcessCollector::for_self(),
            ))
            .expect("unique metric");
        let sessions_active = IntGaugeVec::new(
            Opts::new(
                "postern_sessions_active",
                "Client connections open now, per listener.",
            ),
            &["listener"],
        )
        .expect("valid metric");
        registry
            .register(Box::new(sessions_active.clone()))
            .expect("unique metric");
        let starttls_discarded_bytes = IntCounter::new(
            "postern_starttls_discarded_bytes_total",
            "Bytes a client pipelined after STARTTLS, discarded unread.",
        )
        .expect("valid metric");
        registry
            .register(Box::new(starttls_discarded_bytes.clone()))
            .expect("unique metric");
        let m = Arc::new(Metrics {
            connections_accepted: counter(
                &registry,
                "postern_connections_accepted_total",
                "TCP connections accepted, per listener.",
                &["listener"],
            ),
            connections_rejected: counter(
                &registry,
                "postern_connections_rejected_total",
                "TCP connections closed at accept because limits.max_connections was reached, per listener.",
                &["listener"],
            ),
            sessions_ended: counter(
                &registry,
                "postern_sessions_ended_total",
                "Client connections ended, by protocol and why they ended.",
                &["protocol", "reason"],
            ),
            listener_info: gauge(
                &registry,
                "postern_listener_info",
                "1 for each configured listener, naming its protocol (join on `listener`).",
                &["listener", "protocol"],
            ),
            tls_handshakes: counter(
                &registry,
                "postern_tls_handshakes_total",
                "TLS handshakes with clients that completed, per listener.",
                &["listener"],
            ),
            auth_duration: histogram(
                &registry,
                "postern_auth_duration_seconds",
                "Time the authentication source took to answer, per source and result.",
                &["source", "result"],
                vec![0.0005, 0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5],
            ),
            connection_limit: {
                let g = prometheus::IntGauge::new(
                    "postern_connection_limit",
                    "limits.max_connections: client connections open at once, at most.",
                )
                .expect("valid metric");
                registry.register(Box::new(g.clone())).expect("unique metric");
                g
            },
            auth_penalties: single(&registry, "postern_auth_penalties_total", "Failed logins answered only after auth.failure_delay."),
            auth_throttled: counter(
                &registry,
                "postern_auth_throttled_total",
                "Failed logins answered later than auth.failure_delay because of earlier failures, by what had failed before (network or user).",
                &["scope"],
            ),
            auth_blocked_networks: single(&registry, "postern_auth_network_blocks_total", "Client networks blocked after auth.brute_force.block_after failed logins."),
            auth_refused_blocked: single(&registry, "postern_auth_refused_blocked_total", "Logins refused, without asking the auth source, because the client's network is blocked (familiar users excepted)."),
            auth_familiar: single(&registry, "postern_auth_familiar_total", "Logins of a user familiar on the client's network: past the network's block and lanes, in a lane of their own."),
            auth_queued: counter(
                &registry,
                "postern_auth_queued_total",
                "Logins that waited for a place in a full lane of credential checks, by the lane (network, user, pair).",
                &["scope"],
            ),
            auth_lane_full: counter(
                &registry,
                "postern_auth_lane_full_total",
                "Logins refused (NO [UNAVAILABLE]) because a lane of credential checks stayed full for auth.brute_force.queue_wait, by the lane (network, user, pair).",
                &["scope"],
            ),
            auth_forwarded: single(&registry, "postern_auth_forwarded_total", "Sessions whose client address was taken from a trusted forwarder's ID (x-originating-ip)."),
            auth_tracked: gauge(
                &registry,
                "postern_auth_tracked",
                "Networks and users with failed logins on record, and familiar user-and-network pairs remembered (scope familiar).",
                &["scope"],
            ),
            session_limit: counter(
                &registry,
                "postern_session_limit_total",
                "Connections or logins refused by a per-network or per-user limit.",
                &["scope"],
            ),
            auth_cache_hits: counter(
                &registry,
                "postern_auth_cache_hits_total",
                "Logins answered from the auth cache, by kind (positive: a remembered success; negative: a remembered refusal).",
                &["kind"],
            ),
            auth_circuit_open: {
                let g = prometheus::IntGauge::new(
                    "postern_auth_circuit_open",
                    "1 while the remote auth source's circuit breaker is open (logins answered unavailable at once).",
                )
                .expect("valid metric");
                registry.register(Box::new(g.clone())).expect("unique metric");
                g
            },
            auth_circuit_rejected: single(
                &registry,
                "postern_auth_circuit_rejected_total",
                "Logins answered unavailable at once because the circuit breaker was open.",
            ),
            auth_blocks: counter(
                &registry,
                "postern_auth_blocks_total",
                "Connections closed after limits.max_auth_failures failed logins, per listener.",
                &["listener"],
            ),
            backend_draining: gauge(
                &registry,
                "postern_backend_draining",
                "1 while a backend is draining (takes no new sessions).",
                &["backend"],
            ),
            tls_handshake_failures: counter(
                &registry,
                "postern_tls_handshake_failures_total",
                "TLS handshakes with clients that failed, per listener and reason.",
                &["listener", "reason"],
            ),
            authentications: counter(
                &registry,
                "postern_authentications_total",
                "Client authentication attempts, by mechanism, protocol, authentication source and result.",
                &["mechanism", "protocol", "source", "result"],
            ),
            backend_logins: counter(
                &registry,
                "postern_backend_logins_total",
                "Logins to backend servers, per backend, protocol and result.",
                &["backend", "protocol", "result"],
            ),
            backend_up: gauge(
                &registry,
                "postern_backend_up",
                "1 while a backend takes sessions by its health state, 0 while it is down.",
                &["backend"],
            ),
            backend_sessions: gauge(
                &registry,
                "postern_backend_sessions_active",
                "Relayed sessions open now, per backend.",
                &["backend"],
            ),
            backend_transitions: counter(
                &registry,
                "postern_backend_transitions_total",
                "Health state changes of a backend, by the state it went to.",
                &["backend", "to"],
            ),
            backend_checks: counter(
                &registry,
                "postern_backend_checks_total",
                "Active health checks, per backend and result.",
                &["backend", "result"],
            ),
            backend_check_duration: histogram(
                &registry,
                "postern_backend_check_duration_seconds",
                "Time an active health check took, per backend.",
                &["backend"],
                vec![0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0],
            ),
            config_reloads: counter(
                &registry,
                "postern_config_reloads_total",
                "Configuration reloads, by result (success, failure: the previous configuration stays).",
                &["result"],
            ),
            config_info: gauge(
                &registry,
                "postern_config_info",
                "1 for the live configuration, labelled with a hash of its file.",
                &["version"],
            ),
            config_last_reload: {
                let g = prometheus::Gauge::new(
                    "postern_config_last_reload_success_timestamp_seconds",
                    "When the live configuration was loaded, in Unix time.",
                )
                .expect("valid metric");
                registry.register(Box::new(g.clone())).expect("unique metric");
                g
            },
            routes: counter(
                &registry,
                "postern_routes_total",
                "Routing decisions for logged-in users, by reason (directory, hash, sticky, failover, bounded_load).",
                &["reason"],
            ),
            relay_bytes: counter(
                &registry,
                "postern_relay_bytes_total",
                "Bytes relayed after login, by direction.",
                &["direction"],
            ),
            session_duration: histogram(
                &registry,
                "postern_session_duration_seconds",
                "Time from backend login to the end of the relayed session.",
                &["listener"],
                vec![
                    1.0,
                    10.0,
                    60.0,
                    300.0,
                    900.0,
                    1800.0,
                    3600.0,
                    4.0 * 3600.0,
                    12.0 * 3600.0,
                    24.0 * 3600.0,
                ],
            ),
            login_duration: histogram(
                &registry,
                "postern_login_duration_seconds",
                "Time from the client's credentials to its tagged OK, backend login included.",
                &["listener"],
                vec![
                    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
                ],
            ),
            sessions_active,
            starttls_discarded_bytes,
            registry,
            ready: AtomicBool::new(false),
        });
        // Series that alerts compare against exist from the start, at 0.
        for result in ["success", "failure"] {
            m.config_reloads.with_label_values(&[result]);
        }
        m
    }

    pub fn render(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(8192);
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut out)
            .expect("text encoding cannot fail");
        out
    }
}

/// Serves the endpoint until the process ends. Bind errors are returned.
pub async fn serve(bind: SocketAddr, metrics: Arc<Metrics>) -> std::io::Result<()> {
    let listener = tokio::net::TcpListener::bind(bind).await?;
    tracing::info!(%bind, "metrics endpoint listening");
    tokio::spawn(async move {
        loop {
            let (stream, _) = match listener.accept().await {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!(error = %e, "metrics accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    continue;
                }
            };
            let metrics = Arc::clone(&metrics);
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |req| {
                    let metrics = Arc::clone(&metrics);
                    async move { Ok::<_, std::convert::Infallible>(answer(&req, &metrics)) }
                });
                let conn = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), service);
                // A scrape takes milliseconds; a connection held open longer is dropped.
                let _ = tokio::time::timeout(std::time::Duration::from_secs(30), conn).await;
            });
        }
    });
    Ok(())
}

fn answer<B>(req: &Request<B>, metrics: &Metrics) -> Response<Full<Bytes>> {
    let (status, content_type, body): (StatusCode, &str, Bytes) = match req.uri().path() {
        "/metrics" => (
            StatusCode::OK,
            "text/plain; version=0.0.4; charset=utf-8",
            Bytes::from(metrics.render()),
        ),
        "/healthz" => (StatusCode::OK, "text/plain", Bytes::from_static(b"ok\n")),
        "/readyz" if metrics.ready.load(Ordering::Relaxed) => {
            (StatusCode::OK, "text/plain", Bytes::from_static(b"ready\n"))
        }
        "/readyz" => (
            StatusCode::SERVICE_UNAVAILABLE,
            "text/plain",
            Bytes::from_static(b"not ready\n"),
        ),
        _ => (
            StatusCode::NOT_FOUND,
            "text/plain",
            Bytes::from_static(b"not found\n"),
        ),
    };
    Response::builder()
        .status(status)
        .header("content-type", content_type)
        .body(Full::new(body))
        .expect("valid response")
}
