//! Postern: a TLS-terminating mail proxy and load balancer (IMAP, POP3,
//! submission, ManageSieve)
//! that authenticates users at the edge.
//!
//! The data path, in the order a connection meets it:
//!
//! - [`server`]: listeners and accept loops; each connection gets its own task.
//! - [`proxy_protocol`]: the client's address from a load balancer, and on to backends.
//! - [`tls`]: rustls server config, SNI certificates, the self-signed default.
//! - [`tls_conn`]: a client's TLS connection, holding no buffer while idle.
//! - [`session`]: the pipeline every protocol shares, from accept to the
//!   relay's end; [`session::sasl`] (the SASL exchange of the line
//!   protocols); [`session::gate`] (the login gate: names, the defence,
//!   credential and token checks, typed refusals) and [`session::connect`]
//!   (per-user limit, routing with failover, the protocol's backend login).
//! - the protocol fronts, which own only framing, commands, replies and
//!   capability lists: [`imap`] ([`imap::front`] before login, framing,
//!   parsing, SASL; after login [`imap::watch`] over response boundaries
//!   and COMPRESS), [`pop3`] ([`pop3::front`], [`pop3::backend`],
//!   [`pop3::watch`]), [`smtp`] for submission ([`smtp::front`],
//!   [`smtp::backend`] with XCLIENT or AUTH, [`smtp::watch`]) and
//!   [`sieve`] for ManageSieve ([`sieve::front`], [`sieve::backend`],
//!   [`sieve::watch`]).
//! - [`auth`]: the [`auth::Authenticator`] trait, its sources, password
//!   hashes, and the login defence ([`auth::guard`]: lanes of checks per
//!   network and user, failure delays, familiar users, network blocks).
//! - [`route`]: pools and backend selection (directory, stickiness,
//!   weighted rendezvous hashing, failover, bounded load), health checks
//!   and DNS discovery.
//! - [`backend`]: connect (TLS or STARTTLS, PROXY header) and log in to the
//!   chosen IMAP backend for the user; the connection and login request
//!   the other protocols' backend logins share.
//! - [`relay`]: the byte pump after login, with [`buffer`]'s borrowed
//!   buffers; it follows the responses through the protocol's watch (a
//!   [`relay::Follow`]) only to know when a backend's close is orderly and
//!   when Postern may speak.
//!
//! Around it: [`config`] (the YAML schema), [`live`] (the runtime snapshot
//! behind arc-swap), [`reload`] (SIGHUP, file changes, listeners),
//! [`admin`] (the admin API, with the [`registry`] of live sessions),
//! [`cluster`] (replicas sharing state through a Valkey/Redis store: the
//! defence's records, session leases, stickiness, holds, pins, events),
//! [`metrics`] (Prometheus families and the HTTP endpoint), [`logging`],
//! [`shutdown`] and [`latch`].

pub mod admin;
pub mod auth;
pub mod backend;
pub mod buffer;
pub mod cluster;
pub mod config;
#[doc(hidden)]
pub mod fuzzing;
pub mod http_client;
pub mod imap;
pub mod latch;
pub mod live;
pub mod logging;
pub mod metrics;
pub mod pop3;
pub mod proxy_protocol;
pub mod registry;
pub mod relay;
pub mod reload;
pub mod route;
pub mod server;
pub mod session;
pub mod shutdown;
pub mod sieve;
pub mod smtp;
pub mod stream;
pub mod tls;
pub mod tls_conn;
