//! DNS discovery: pool entries with `discover: true` name a set of servers
//! (a Kubernetes headless Service has one A or AAAA record per ready pod).
//! Every `discovery.interval` each name is resolved again; new addresses
//! become members with their own health checks, addresses that went away
//! are retired (no new sessions; live ones stay). An empty answer or a
//! failed lookup keeps the members as they are: DNS trouble must not empty
//! a pool that is serving.
//!
//! Resolution uses the system resolver (`/etc/hosts`, search domains, as
//! every other program on the host), or a configured name server.

use std::net::IpAddr;
use std::sync::Arc;

use hickory_resolver::config::{LookupIpStrategy, NameServerConfigGroup, ResolverConfig};
use hickory_resolver::name_server::TokioConnectionProvider;
use hickory_resolver::TokioResolver;

use super::health::{self, ProbeAccount};
use super::Pool;
use crate::config::{Discovery, HealthCheck};
use crate::latch::Latch;
use crate::metrics::Metrics;

enum Resolver {
    System,
    Server(Box<TokioResolver>),
}

impl Resolver {
    fn new(config: &Discovery) -> Resolver {
        let Some(server) = config.nameserver else {
            return Resolver::System;
        };
        let servers = NameServerConfigGroup::from_ips_clear(&[server.ip()], server.port(), true);
        let mut builder = hickory_resolver::Resolver::builder_with_config(
            ResolverConfig::from_parts(None, vec![], servers),
            TokioConnectionProvider::default(),
        );
        let options = builder.options_mut();
        options.ip_strategy = LookupIpStrategy::Ipv4AndIpv6;
        // Every round asks again; the interval is the cache.
        options.cache_size = 0;
        options.timeout = std::time::Duration::from_secs(2);
        options.attempts = 2;
        Resolver::Server(Box::new(builder.build()))
    }

    /// Every address `host` resolves to, sorted, without duplicates.
    async fn lookup(&self, host: &str, port: u16) -> Result<Vec<IpAddr>, String> {
        let mut ips: Vec<IpAddr> = match self {
            Resolver::System => tokio::net::lookup_host((host, port))
                .await
                .map_err(|e| e.to_string())?
                .map(|a| a.ip())
                .collect(),
            Resolver::Server(r) => r
                .lookup_ip(host)
                .await
                .map_err(|e| e.to_string())?
                .iter()
                .collect(),
        };
        ips.sort();
        ips.dedup();
        Ok(ips)
    }
}

/// Everything a newly found backend needs for its health checks.
pub struct Checks {
    pub config: HealthCheck,
    pub probe: Option<ProbeAccount>,
    pub metrics: Arc<Metrics>,
    /// Set when a reload replaces this pool: lookups and checks stop.
    pub stop: Arc<Latch>,
}

/// Resolves every discovered entry once, then keeps doing so every
/// interval in a task on the current runtime. Returns after the first
/// round, so a starting process serves with its pool filled.
pub async fn start(pool: Arc<Pool>, config: &Discovery, checks: Checks) {
    if pool.discovered().is_empty() {
        return;
    }
    let resolver = Resolver::new(config);
    round(&pool, &resolver, &checks).await;
    let interval = config.interval;
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = tokio::time::sleep(interval) => {}
                _ = checks.stop.wait() => break,
            }
            round(&pool, &resolver, &checks).await;
        }
    });
}

async fn round(pool: &Pool, resolver: &Resolver, checks: &Checks) {
    for (index, entry) in pool.discovered().iter().enumerate() {
        match resolver.lookup(&entry.host, entry.port).await {
            Ok(ips) if !ips.is_empty() => {
                for added in pool.set_discovered(index, &ips) {
                    health::spawn_one(
                        added,
                        &checks.config,
                        checks.probe.clone(),
                        &checks.metrics,
                        &checks.stop,
                    );
                }
            }
            Ok(_) => {
                tracing::warn!(name = %entry.host, "DNS returned no addresses; keeping the members found before");
            }
            Err(e) => {
                tracing::warn!(name = %entry.host, error = %e, "DNS lookup failed; keeping the members found before");
            }
        }
    }
}
