//! The YAML configuration: its schema, its defaults and its validation.
//!
//! Every struct rejects unknown keys, and every value that can be checked on
//! its own (addresses, durations, sizes, enums) is checked while it is
//! deserialised, so an error names the key path and the line of the file.
//! Checks that span several keys run after parsing and name the key path.
//! Relative file paths are resolved against the directory of the config file.
//! This module reads files only to load the configuration and its users file;
//! it opens no sockets and keeps no state.

use std::collections::HashSet;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Deserializer};

/// An error in the configuration, worded for the operator.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Invalid { path: PathBuf, message: String },
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub listeners: Vec<Listener>,
    #[serde(default)]
    pub tls: Tls,
    pub auth: Auth,
    pub backends: Backends,
    #[serde(default)]
    pub limits: Limits,
    #[serde(default)]
    pub metrics: Metrics,
    #[serde(default)]
    pub log: Log,
    /// Worker threads, each running its own sessions start to end; `auto`
    /// (or 0) is one per core.
    #[serde(default)]
    pub workers: Workers,
    #[serde(default)]
    pub reload: Reload,
    /// The admin API; off when absent.
    #[serde(default)]
    pub admin: Option<AdminApi>,
    /// State shared by replicas in a store; single node when absent.
    #[serde(default)]
    pub cluster: Option<Cluster>,
    /// What submission listeners say and where their mail goes.
    #[serde(default)]
    pub submission: Option<Submission>,
    /// What ManageSieve listeners say before login.
    #[serde(default)]
    pub managesieve: Managesieve,
    /// Directory of the config file; relative paths are resolved against it.
    #[serde(skip)]
    pub base_dir: PathBuf,
    /// A hash of the config file's text: which configuration is live.
    #[serde(skip)]
    pub version: String,
}

/// The admin API: its own HTTP listener, every request with
/// `Authorization: Bearer <token>`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminApi {
    #[serde(default = "default_admin_bind")]
    pub bind: SocketAddr,
    /// A file holding the token (one line); read on every request, so it
    /// can be rotated in place.
    pub token_file: PathBuf,
}

/// When the configuration is read again (SIGHUP always reloads).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Reload {
    /// Reload when the config file, or a file it names (users file,
    /// certificates, keys, CA files, the probe password), changes on disk;
    /// a Kubernetes ConfigMap or Secret update (a swapped symlink) counts.
    #[serde(default = "yes")]
    pub watch: bool,
    /// How often the files are looked at.
    #[serde(default = "default_watch_interval", deserialize_with = "duration")]
    pub interval: Duration,
}

impl Default for Reload {
    fn default() -> Self {
        Reload {
            watch: true,
            interval: default_watch_interval(),
        }
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Workers(pub usize);

impl Workers {
    /// The number of worker threads to start.
    pub fn count(self) -> usize {
        match self.0 {
            0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
            n => n,
        }
    }
}

impl<'de> Deserialize<'de> for Workers {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        match NumberOrText::deserialize(d)? {
            NumberOrText::Number(n) if n <= 1024 => Ok(Workers(n as usize)),
            NumberOrText::Text(t) if t == "auto" => Ok(Workers(0)),
            _ => Err(serde::de::Error::custom(
                "expected `auto` or a number of threads up to 1024",
            )),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Listener {
    /// Used in logs and as the `listener` metric label.
    pub name: String,
    pub bind: SocketAddr,
    pub tls: ListenerTls,
    /// The mail protocol spoken on it: `imap` (the default), `pop3`,
    /// `submission` or `managesieve`.
    #[serde(default)]
    pub protocol: Protocol,
    /// Allow LOGIN/AUTHENTICATE before STARTTLS on a `starttls` listener.
    /// Meant for loopback testing only; off by default.
    #[serde(default)]
    pub allow_plaintext_auth: bool,
    /// Read a PROXY protocol header (v1 or v2) before anything else, from
    /// these networks only; a connection from elsewhere is closed.
    #[serde(default)]
    pub proxy_protocol: Option<ProxyProtocolIn>,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProxyProtocolIn {
    /// Load balancers allowed to state a client's address, as CIDR
    /// networks or single addresses.
    pub trusted_networks: Vec<crate::proxy_protocol::Network>,
    /// The whole header must arrive within this.
    #[serde(
        default = "default_proxy_header_timeout",
        deserialize_with = "duration"
    )]
    pub timeout: Duration,
}

/// A listener's mail protocol.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    /// IMAP4rev1 (993 implicit TLS, 143 STARTTLS).
    #[default]
    Imap,
    /// POP3 (995 implicit TLS, 110 STLS).
    Pop3,
    /// SMTP message submission (465 implicit TLS, 587 STARTTLS).
    Submission,
    /// ManageSieve (4190, STARTTLS).
    Managesieve,
}

impl Protocol {
    /// The `protocol` metric label and log word.
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Imap => "imap",
            Protocol::Pop3 => "pop3",
            Protocol::Submission => "submission",
            Protocol::Managesieve => "managesieve",
        }
    }

    /// The TLS ALPN protocol ID (RFC 7301 registry).
    pub fn alpn(self) -> &'static [u8] {
        match self {
            Protocol::Imap => b"imap",
            Protocol::Pop3 => b"pop3",
            Protocol::Submission => b"smtp",
            Protocol::Managesieve => b"managesieve",
        }
    }

    /// Every protocol, in a fixed order ([`Protocol::index`]).
    pub const ALL: [Protocol; 4] = [
        Protocol::Imap,
        Protocol::Pop3,
        Protocol::Submission,
        Protocol::Managesieve,
    ];

    /// Its place in [`Protocol::ALL`].
    pub fn index(self) -> usize {
        self as usize
    }

    /// The backend key naming this protocol's port, for protocols served
    /// beside IMAP on the backend's host.
    pub fn port_key(self) -> Option<&'static str> {
        match self {
            Protocol::Imap => None,
            Protocol::Pop3 => Some("pop3_port"),
            Protocol::Submission => Some("submission_port"),
            Protocol::Managesieve => Some("sieve_port"),
        }
    }
}

impl std::fmt::Display for Protocol {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ListenerTls {
    /// IMAPS: TLS from the first byte (port 993).
    Implicit,
    /// Plain IMAP that must upgrade with STARTTLS before login (port 143).
    Starttls,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Tls {
    /// Certificates; the first is the default for clients without a known SNI name.
    #[serde(default)]
    pub certificates: Vec<Certificate>,
    /// Where a self-signed certificate is made and kept when `certificates` is empty.
    #[serde(default)]
    pub self_signed: SelfSigned,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Certificate {
    /// PEM file: the end-entity certificate first, then its chain.
    pub cert: PathBuf,
    /// PEM file: the private key (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
    /// SNI names this certificate answers (`mail.example.com`, `*.example.com`).
    /// May be empty for the first (default) certificate.
    #[serde(default)]
    pub names: Vec<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SelfSigned {
    #[serde(default = "default_self_signed_dir")]
    pub dir: PathBuf,
    #[serde(default = "default_self_signed_names")]
    pub names: Vec<String>,
}

impl Default for SelfSigned {
    fn default() -> Self {
        SelfSigned {
            dir: default_self_signed_dir(),
            names: default_self_signed_names(),
        }
    }
}

fn default_self_signed_dir() -> PathBuf {
    PathBuf::from("self-signed-tls")
}

fn default_self_signed_names() -> Vec<String> {
    vec!["localhost".into()]
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Auth {
    pub source: AuthSource,
    #[serde(rename = "static")]
    pub static_users: Option<StaticUsers>,
    /// The `http` source: a service speaking nginx's `auth_http` protocol.
    #[serde(default)]
    pub http: Option<HttpAuth>,
    /// OAuth 2.0 bearer tokens (XOAUTH2, OAUTHBEARER), besides passwords.
    #[serde(default)]
    pub oauth: Option<OAuthConfig>,
    /// The `ldap` source: a directory checked with simple binds.
    #[serde(default)]
    pub ldap: Option<LdapAuth>,
    /// How long a refused user-and-password pair is answered from memory;
    /// `0s` turns it off.
    #[serde(default = "default_negative_cache_ttl", deserialize_with = "duration")]
    pub negative_cache_ttl: Duration,
    /// Fail fast while a remote source (ldap, http) keeps failing.
    #[serde(default)]
    pub circuit_breaker: CircuitBreaker,
    /// Growing delays per network and user, blocks per network.
    #[serde(default)]
    pub brute_force: BruteForce,
    /// Forwarders whose clients' addresses are believed: from these
    /// networks (a webmail server, another proxy) the `x-originating-ip`
    /// and `x-originating-port` of an `ID` sent before login replace the
    /// connection's address for the defence, limits, logs and the backend
    /// (Dovecot's `login_trusted_networks`). Elsewhere they are only logged.
    #[serde(default)]
    pub trusted_forwarders: Vec<crate::proxy_protocol::Network>,
    /// Tell the client why a disabled account may not log in (the users
    /// file's or the directory's `reason`); off: the plain failure answer.
    #[serde(default)]
    pub show_disabled_reason: bool,
    /// How long a failed login waits, counted from when the credentials arrived.
    #[serde(default = "default_failure_delay", deserialize_with = "duration")]
    pub failure_delay: Duration,
    /// Lower-case usernames before lookup and routing.
    #[serde(default = "yes")]
    pub lowercase_usernames: bool,
    /// Appended as `@domain` to usernames that have no `@`.
    #[serde(default)]
    pub default_domain: Option<String>,
    /// How long a successful login is remembered, so a slow password hash
    /// is paid once per TTL; `0s` turns the cache off. Unset: see
    /// [`Auth::cache_ttl`].
    #[serde(default, rename = "cache_ttl", deserialize_with = "some_duration")]
    pub cache_ttl_set: Option<Duration>,
}

impl Auth {
    /// The success cache's TTL: as set, else 5 minutes for the users file,
    /// 1 minute for a directory (a disabled account stops soon), and off
    /// for an auth_http service, which decides each login itself (by
    /// address, attempt, TLS) as nginx asks it every time.
    pub fn cache_ttl(&self) -> Duration {
        self.cache_ttl_set.unwrap_or(match self.source {
            AuthSource::Static => default_cache_ttl(),
            AuthSource::Ldap => Duration::from_secs(60),
            AuthSource::Http => Duration::ZERO,
        })
    }
}

fn some_duration<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
    duration(d).map(Some)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AuthSource {
    Static,
    Http,
    Ldap,
}

/// An LDAP directory: search-then-bind (`bind_dn`) or direct bind (`user_dn`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LdapAuth {
    /// `ldap://host:port` or `ldaps://host:port`.
    pub url: String,
    /// StartTLS on an `ldap://` URL (required: no credentials in clear).
    #[serde(default)]
    pub starttls: bool,
    /// CAs for the directory's certificate (default: the system's store).
    #[serde(default)]
    pub tls_ca_file: Option<PathBuf>,
    /// The service account that searches for users.
    #[serde(default)]
    pub bind_dn: Option<String>,
    /// Its password, one line in a file.
    #[serde(default)]
    pub bind_password_file: Option<PathBuf>,
    /// Where users are searched for (subtree).
    #[serde(default)]
    pub base_dn: Option<String>,
    /// `%u` user, `%n` local part, `%d` domain; escaped by RFC 4515.
    #[serde(default = "default_ldap_filter")]
    pub filter: String,
    /// Direct bind instead of a search: a DN template (`%u`, `%n`, `%d`,
    /// escaped by RFC 4514).
    #[serde(default)]
    pub user_dn: Option<String>,
    /// The attribute naming the user's backend (e.g. `mailHost`).
    #[serde(default)]
    pub backend_attribute: Option<String>,
    /// The attribute whose value is the user's one name, whatever alias
    /// they typed (`uid` when the entry lacks it); normalised like a typed
    /// name.
    #[serde(default = "default_ldap_user_attribute")]
    pub user_attribute: String,
    /// The attribute that marks a disabled account (e.g. `accountStatus`,
    /// `employeeType`); unset: no account is disabled by the directory.
    #[serde(default)]
    pub disabled_attribute: Option<String>,
    /// Values of `disabled_attribute` that disable the account, compared
    /// without regard to case.
    #[serde(default = "default_ldap_disabled_values")]
    pub disabled_values: Vec<String>,
    #[serde(default = "default_ldap_pool_size")]
    pub pool_size: usize,
    /// For each step: connect, bind, search.
    #[serde(default = "default_ldap_timeout", deserialize_with = "duration")]
    pub timeout: Duration,
}

fn default_ldap_filter() -> String {
    "(&(objectClass=inetOrgPerson)(|(mail=%u)(uid=%u)))".into()
}

fn default_ldap_user_attribute() -> String {
    "mail".into()
}

fn default_ldap_disabled_values() -> Vec<String> {
    ["disabled", "inactive", "locked", "suspended", "closed"]
        .map(String::from)
        .to_vec()
}

fn default_ldap_pool_size() -> usize {
    8
}

fn default_ldap_timeout() -> Duration {
    Duration::from_secs(5)
}

/// JWT access tokens checked against a JWKS file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OAuthConfig {
    /// The issuer's public keys (a JWKS document), reloaded with the
    /// configuration when the file changes…
    #[serde(default)]
    pub jwks_file: Option<PathBuf>,
    /// …or fetched from the provider's `jwks_uri`, again every
    /// `jwks_refresh` (and at most every 10 s on a token with an unknown
    /// `kid`), the last good set kept while a fetch fails.
    #[serde(default)]
    pub jwks_url: Option<String>,
    #[serde(default = "default_jwks_refresh", deserialize_with = "duration")]
    pub jwks_refresh: Duration,
    /// …or every token asked about at the provider's RFC 7662
    /// introspection endpoint (opaque tokens too, revocation seen at once).
    #[serde(default)]
    pub introspection: Option<Introspection>,
    /// CAs for an https `jwks_url` or introspection URL (default: the
    /// system's store).
    #[serde(default)]
    pub tls_ca_file: Option<PathBuf>,
    /// `iss` must be this.
    pub issuer: String,
    /// `aud` must contain this.
    pub audience: String,
    /// The claim that names the user (e.g. `email`, `preferred_username`).
    #[serde(default = "default_user_claim")]
    pub user_claim: String,
    /// With `user_claim: email`, take tokens whose `email_verified` is
    /// missing (still never one that says false). Off: a provider that
    /// lets users edit their address would hand out other people's
    /// mailboxes, and token logins reach the backend as the master user.
    #[serde(default)]
    pub allow_unverified_email: bool,
    /// Clock skew allowed for `exp` and `nbf`.
    #[serde(default = "default_oauth_leeway", deserialize_with = "duration")]
    pub leeway: Duration,
}

/// An RFC 7662 token introspection endpoint and Postern's client
/// credentials for it (HTTP Basic).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Introspection {
    pub url: String,
    pub client_id: String,
    /// One line; a Kubernetes Secret, never the YAML itself.
    pub client_secret_file: PathBuf,
    #[serde(
        default = "default_introspection_timeout",
        deserialize_with = "duration"
    )]
    pub timeout: Duration,
}

fn default_introspection_timeout() -> Duration {
    Duration::from_secs(5)
}

fn default_jwks_refresh() -> Duration {
    Duration::from_secs(600)
}

fn default_user_claim() -> String {
    "email".into()
}

fn default_oauth_leeway() -> Duration {
    Duration::from_secs(30)
}

fn default_negative_cache_ttl() -> Duration {
    Duration::from_secs(30)
}

/// See `auth::breaker`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CircuitBreaker {
    /// "Unavailable" answers in a row that open the circuit; 0: never.
    pub failures: u32,
    /// How long logins are answered "unavailable" at once.
    #[serde(deserialize_with = "duration")]
    pub open_for: Duration,
}

impl Default for CircuitBreaker {
    fn default() -> Self {
        CircuitBreaker {
            failures: 5,
            open_for: Duration::from_secs(10),
        }
    }
}

/// The login defence: see `auth::guard` for the model and the guess
/// budget it allows.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BruteForce {
    pub enabled: bool,
    /// Failures are counted per IPv4 network of this prefix length…
    pub ipv4_prefix: u8,
    /// …and per IPv6 network of this one (a /64 is one customer).
    pub ipv6_prefix: u8,
    /// The longest an answer to a failed login waits.
    #[serde(deserialize_with = "duration")]
    pub max_delay: Duration,
    /// Failures for this many distinct user names from one network, within
    /// a sliding `window`, block it (familiar users excepted); 0: never.
    pub block_after: u32,
    #[serde(deserialize_with = "duration")]
    pub block_for: Duration,
    /// A record is forgotten this long after its last failure.
    #[serde(deserialize_with = "duration")]
    pub window: Duration,
    /// Networks and users with failures remembered at once, at most.
    pub max_entries: usize,
    /// Credential checks at once from one network, failures' delays
    /// included.
    pub max_checks_per_network: u32,
    /// Credential checks at once for one user (from networks where they
    /// are not familiar), failures' delays included.
    pub max_checks_per_user: u32,
    /// How long a login waits for a place before `NO [UNAVAILABLE]`.
    #[serde(deserialize_with = "duration")]
    pub queue_wait: Duration,
    /// How long a successful login makes its user familiar on its network;
    /// `0s` turns familiar pairs off.
    #[serde(deserialize_with = "duration")]
    pub familiar_for: Duration,
    /// Familiar pairs remembered at once, at most.
    pub max_familiar: usize,
}

impl Default for BruteForce {
    fn default() -> Self {
        BruteForce {
            enabled: true,
            ipv4_prefix: 32,
            ipv6_prefix: 64,
            max_delay: Duration::from_secs(30),
            block_after: 10,
            block_for: Duration::from_secs(15 * 60),
            window: Duration::from_secs(15 * 60),
            max_entries: 100_000,
            max_checks_per_network: 8,
            max_checks_per_user: 2,
            queue_wait: Duration::from_secs(10),
            familiar_for: Duration::from_secs(14 * 24 * 3600),
            max_familiar: 250_000,
        }
    }
}

/// SMTP submission (RFC 6409): the proxy's greeting and EHLO list, and
/// where a logged-in client's mail goes.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Submission {
    /// The name in the greeting and the EHLO answer, and Postern's EHLO to
    /// backends; the host name when absent.
    #[serde(default)]
    pub hostname: Option<String>,
    /// The `SIZE` advertised (RFC 1870), bytes; 0 says no fixed limit.
    /// Should match the backends' own limit.
    #[serde(default = "default_max_message_size")]
    pub max_message_size: u64,
    /// Advertise `CHUNKING` (BDAT, RFC 3030): only when every backend
    /// offers it.
    #[serde(default)]
    pub chunking: bool,
    /// Advertise `SMTPUTF8` (RFC 6531): only when every backend offers it.
    #[serde(default)]
    pub smtputf8: bool,
    /// Wait this long before the greeting; a client that talks first gets
    /// `554` and is closed (a spam bot's habit). Off by default.
    #[serde(default, deserialize_with = "duration")]
    pub greeting_delay: Duration,
    /// Send submissions to these servers (MTAs such as Postfix, each
    /// `address` its submission port), chosen per user by rendezvous hash
    /// and tried in that order, instead of to the `submission_port` of the
    /// user's own backend.
    #[serde(default)]
    pub relays: Vec<BackendServer>,
}

impl Default for Submission {
    fn default() -> Self {
        Submission {
            hostname: None,
            max_message_size: default_max_message_size(),
            chunking: false,
            smtputf8: false,
            greeting_delay: Duration::ZERO,
            relays: Vec::new(),
        }
    }
}

fn default_max_message_size() -> u64 {
    50 * 1024 * 1024
}

/// ManageSieve (RFC 5804) before login.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Managesieve {
    /// The `SIEVE` capability (the script language's extensions) told to
    /// clients before login, until a backend's own list has been seen.
    #[serde(default = "default_sieve_extensions")]
    pub sieve_extensions: String,
}

impl Default for Managesieve {
    fn default() -> Self {
        Managesieve {
            sieve_extensions: default_sieve_extensions(),
        }
    }
}

fn default_sieve_extensions() -> String {
    "fileinto reject envelope encoded-character vacation subaddress comparator-i;ascii-numeric relational regex imap4flags copy include variables body enotify environment mailbox date index ihave duplicate mime foreverypart extracttext".into()
}

/// Replicas acting as one: the login defence's records, per-user session
/// counts, stickiness, holds and pins, and admin actions shared through a
/// Valkey or Redis store (see `cluster`).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Cluster {
    pub store: Store,
    /// This replica's name in session records; the host name when empty
    /// (in Kubernetes, the pod's name).
    #[serde(default)]
    pub replica: String,
    /// A secret (its first line, 16 bytes or more) that keys the
    /// fingerprints user names are stored under; every replica needs the
    /// same. Without it the fingerprints are plain hashes of the names.
    #[serde(default)]
    pub key_file: Option<PathBuf>,
    /// A live session's lease is refreshed every third of this; a replica
    /// that dies leaves its sessions counted for at most this long.
    #[serde(default = "default_lease_ttl", deserialize_with = "duration")]
    pub lease_ttl: Duration,
    /// How long a user stays with their backend after their last session
    /// ended anywhere (Dovecot director's `director_user_expire`).
    #[serde(default = "default_user_expire", deserialize_with = "duration")]
    pub user_expire: Duration,
    /// How long a login waits while its user is held for a move, at most;
    /// then `NO [UNAVAILABLE]`.
    #[serde(default = "default_hold_wait", deserialize_with = "duration")]
    pub hold_wait: Duration,
}

impl Cluster {
    fn validate(&self) -> Result<(), String> {
        let url = &self.store.url;
        if !(url.starts_with("redis://") || url.starts_with("rediss://")) {
            return Err("key `cluster.store.url`: not a redis:// or rediss:// URL".into());
        }
        let authority = url
            .split("://")
            .nth(1)
            .unwrap_or("")
            .split('/')
            .next()
            .unwrap_or("");
        if authority
            .rsplit_once('@')
            .is_some_and(|(userinfo, _)| userinfo.contains(':'))
        {
            return Err(
                "key `cluster.store.url`: no password in the URL; put it in `cluster.store.password_file`"
                    .into(),
            );
        }
        if self.store.ca_file.is_some() && !url.starts_with("rediss://") {
            return Err("key `cluster.store.ca_file`: only for a rediss:// URL".into());
        }
        let prefix = &self.store.key_prefix;
        if prefix.is_empty() || !prefix.bytes().all(|b| b.is_ascii_graphic() && b != b'*') {
            return Err(
                "key `cluster.store.key_prefix`: printable characters, no spaces or `*`".into(),
            );
        }
        if self.store.timeout.is_zero() || self.store.timeout > Duration::from_secs(5) {
            return Err("key `cluster.store.timeout`: above zero and at most 5s".into());
        }
        if self.lease_ttl < Duration::from_secs(3) {
            return Err("key `cluster.lease_ttl`: at least 3s".into());
        }
        if self.hold_wait > Duration::from_secs(120) {
            return Err("key `cluster.hold_wait`: at most 120s".into());
        }
        if !self.replica.is_empty() && !self.replica.bytes().all(|b| b.is_ascii_graphic()) {
            return Err("key `cluster.replica`: printable characters, no spaces".into());
        }
        Ok(())
    }
}

fn default_lease_ttl() -> Duration {
    Duration::from_secs(60)
}

fn default_user_expire() -> Duration {
    Duration::from_secs(60)
}

fn default_hold_wait() -> Duration {
    Duration::from_secs(10)
}

/// The store: a Valkey or Redis server (RESP).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Store {
    /// `redis://host:port/db`, or `rediss://` for TLS.
    pub url: String,
    /// An ACL user name, if the store has users.
    #[serde(default)]
    pub username: Option<String>,
    /// A file holding the password (one line).
    #[serde(default)]
    pub password_file: Option<PathBuf>,
    /// CA certificates (PEM) for `rediss://`; the system's when absent.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// How long one store operation on the login path may take; past it
    /// the login goes on with this replica's own state.
    #[serde(default = "default_store_timeout", deserialize_with = "duration")]
    pub timeout: Duration,
    /// Every key starts with `<key_prefix>:`.
    #[serde(default = "default_key_prefix")]
    pub key_prefix: String,
}

fn default_store_timeout() -> Duration {
    Duration::from_millis(50)
}

fn default_key_prefix() -> String {
    "postern".into()
}

/// An authentication service speaking nginx's `auth_http` protocol.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpAuth {
    /// `http://host:port/path` or `https://…`.
    pub url: String,
    /// For the whole exchange: connect, request, response headers.
    #[serde(default = "default_http_auth_timeout", deserialize_with = "duration")]
    pub timeout: Duration,
    /// Extra request headers (nginx's `auth_http_header`).
    #[serde(default)]
    pub headers: std::collections::BTreeMap<String, String>,
    /// Extra request headers whose values are read from files (a shared
    /// secret from a Kubernetes Secret); one line, trailing newline dropped.
    #[serde(default)]
    pub header_files: std::collections::BTreeMap<String, PathBuf>,
    /// CAs for an https service (default: the system's store).
    #[serde(default)]
    pub tls_ca_file: Option<PathBuf>,
}

fn default_http_auth_timeout() -> Duration {
    Duration::from_secs(5)
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StaticUsers {
    pub users_file: PathBuf,
    #[serde(default)]
    pub format: UsersFormat,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum UsersFormat {
    /// `users: [{ user, password, backend? }]`
    #[default]
    Yaml,
    /// Dovecot's `user:{SCHEME}hash:...` lines, read as they are.
    PasswdFile,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Backends {
    /// The default pool: users no rule or directory entry sends elsewhere.
    pub pool: Vec<BackendServer>,
    /// Log in at backends as a master user on the user's behalf.
    #[serde(default)]
    pub master_user: Option<MasterUser>,
    /// More pools, chosen by the user's domain or their directory entry.
    #[serde(default)]
    pub pools: Vec<NamedPool>,
    #[serde(default)]
    pub discovery: Discovery,
    #[serde(default = "default_connect_timeout", deserialize_with = "duration")]
    pub connect_timeout: Duration,
    /// Greeting, ID and login exchange with the backend, after connect.
    #[serde(default = "default_login_timeout", deserialize_with = "duration")]
    pub login_timeout: Duration,
    #[serde(default)]
    pub forward_client_address: ForwardClientAddress,
    #[serde(default)]
    pub health_check: HealthCheck,
    /// Consecutive failed session logins at a backend (connect, greeting or
    /// protocol failures, timeouts; not a refused password) that mark it
    /// down until its health check passes `rise` times. 0 turns it off;
    /// it is off as well when health checks are.
    #[serde(default = "default_passive_fall")]
    pub passive_fall: u32,
    /// Sessions on a backend that goes down are closed with
    /// `* BYE [UNAVAILABLE]` at a random moment within a spread, so their
    /// clients do not reconnect to the survivors in one burst: the spread
    /// is the herd (the sessions this process had on the backend) over
    /// `reconnect_rate`, at most this. A session whose client is waiting
    /// for an answer is told at once.
    #[serde(default = "default_reconnect_jitter", deserialize_with = "duration")]
    pub reconnect_jitter: Duration,
    /// Logins per second the surviving backends take from this process's
    /// herd when a backend goes down: 1000 sessions at 200/s are told over
    /// 5 s, 50 over a quarter of a second. Per replica.
    #[serde(default = "default_reconnect_rate")]
    pub reconnect_rate: f64,
    /// Consistent hashing with bounded loads: no backend takes a new
    /// session while it holds more than this factor of the pool's mean
    /// active sessions (counted in this process); the user goes to their
    /// next backend in rendezvous order. Off when absent; at least 1.1.
    #[serde(default)]
    pub bounded_load: Option<f64>,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackendServer {
    /// Stable identity: the rendezvous hash uses it, so renaming moves users
    /// and changing `address` does not.
    pub name: String,
    /// `host:port`; a host name is resolved when a session connects.
    pub address: String,
    /// Share of hash-placed users, relative to the other backends (weighted
    /// rendezvous hashing: raising one backend's weight moves users only
    /// onto it). 1 to 1000.
    #[serde(default = "default_weight")]
    pub weight: u32,
    /// Takes no new sessions; its live sessions stay.
    #[serde(default)]
    pub drain: bool,
    /// `address` is a DNS name standing for a set of servers (a Kubernetes
    /// headless Service): every A and AAAA record is a member, named
    /// `NAME-ADDRESS`, and the set is resolved again every
    /// `discovery.interval`.
    #[serde(default)]
    pub discover: bool,
    /// TLS to this backend: `none`, `implicit` (TLS from the first byte,
    /// port 993) or `starttls` (required: a backend that does not offer it,
    /// or refuses it, gets no credentials).
    #[serde(default)]
    pub tls: BackendTlsMode,
    /// PEM file of the CAs that may sign the backend's certificate; the
    /// system's trust store when absent.
    #[serde(default)]
    pub tls_ca_file: Option<PathBuf>,
    /// Name the certificate must carry, sent as SNI; the host part of
    /// `address` when absent (an IP address is checked as one).
    #[serde(default)]
    pub tls_server_name: Option<String>,
    /// Client certificate chain and key (PEM) for backends that require
    /// mutual TLS; both or neither.
    #[serde(default)]
    pub tls_client_cert: Option<PathBuf>,
    #[serde(default)]
    pub tls_client_key: Option<PathBuf>,
    /// Send a PROXY protocol v2 header with the client's address first
    /// (Dovecot: `haproxy = yes` on the listener and Postern's addresses
    /// in `haproxy_trusted_networks`). Health checks send a LOCAL header.
    #[serde(default)]
    pub proxy_protocol: bool,
    /// The backend's POP3 service, on the same host as `address` and with
    /// the same kind of TLS (`none`: plain POP3, `starttls`: STLS,
    /// `implicit`: POP3S). Needed when a listener speaks POP3.
    #[serde(default)]
    pub pop3_port: Option<u16>,
    /// The backend's SMTP submission service (Dovecot's `submission`, or an
    /// MTA such as Postfix), on the same host and with the same kind of
    /// TLS. Needed when a submission listener routes to users' backends.
    #[serde(default)]
    pub submission_port: Option<u16>,
    /// The backend's ManageSieve service, likewise. Needed when a listener
    /// speaks ManageSieve.
    #[serde(default)]
    pub sieve_port: Option<u16>,
}

impl BackendServer {
    /// The port of the backend's service for `protocol`; IMAP's is in
    /// `address`.
    pub fn port_for(&self, protocol: Protocol) -> Option<u16> {
        match protocol {
            Protocol::Imap => None,
            Protocol::Pop3 => self.pop3_port,
            Protocol::Submission => self.submission_port,
            Protocol::Managesieve => self.sieve_port,
        }
    }
}

/// How backends with `discover: true` are resolved.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Discovery {
    #[serde(default = "default_discovery_interval", deserialize_with = "duration")]
    pub interval: Duration,
    /// Ask this DNS server (`address:port`, UDP then TCP) instead of the
    /// system resolver.
    #[serde(default)]
    pub nameserver: Option<SocketAddr>,
}

impl Default for Discovery {
    fn default() -> Self {
        Discovery {
            interval: default_discovery_interval(),
            nameserver: None,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NamedPool {
    pub name: String,
    /// Users `@` these domains go to this pool (exact, case-insensitive).
    #[serde(default)]
    pub domains: Vec<String>,
    pub servers: Vec<BackendServer>,
}

impl Backends {
    /// Every backend of every pool, the default pool first.
    pub fn all_servers(&self) -> impl Iterator<Item = &BackendServer> {
        self.pool
            .iter()
            .chain(self.pools.iter().flat_map(|p| p.servers.iter()))
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendTlsMode {
    #[default]
    None,
    Implicit,
    Starttls,
}

/// Active IMAP health checks: connect, read the greeting (`* OK`, not
/// `BYE` or `PREAUTH`), optionally log in with a probe account and LOG OUT.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HealthCheck {
    #[serde(default = "yes")]
    pub enabled: bool,
    #[serde(default = "default_check_interval", deserialize_with = "duration")]
    pub interval: Duration,
    /// For the whole check: connect, greeting, login and logout.
    #[serde(default = "default_check_timeout", deserialize_with = "duration")]
    pub timeout: Duration,
    /// Consecutive passed checks that bring a down backend up.
    #[serde(default = "default_rise")]
    pub rise: u32,
    /// Consecutive failed checks that take an up backend down.
    #[serde(default = "default_fall")]
    pub fall: u32,
    /// Log in as this account on every check (and LOGOUT), proving the
    /// backend's own authentication works too.
    #[serde(default)]
    pub login: Option<ProbeLogin>,
}

impl Default for HealthCheck {
    fn default() -> Self {
        HealthCheck {
            enabled: true,
            interval: default_check_interval(),
            timeout: default_check_timeout(),
            rise: default_rise(),
            fall: default_fall(),
            login: None,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MasterUser {
    pub user: String,
    /// A file holding the master password (one line), relative to the
    /// config file: a Kubernetes Secret, never the YAML itself.
    pub password_file: PathBuf,
    /// `authzid`: `AUTHENTICATE PLAIN` with the user as authorization
    /// identity and the master as authentication identity. `separator`:
    /// `LOGIN "user<separator>master"` (Dovecot's auth_master_user_separator).
    #[serde(default)]
    pub form: MasterForm,
    #[serde(default = "default_master_separator")]
    pub separator: String,
    /// true: every backend login is a master login. false: only logins with
    /// no password to pass on (token logins).
    #[serde(default)]
    pub always: bool,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MasterForm {
    #[default]
    Authzid,
    Separator,
}

fn default_master_separator() -> String {
    "*".into()
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProbeLogin {
    pub user: String,
    /// A file holding the probe account's password (one line), relative to
    /// the config file; kept out of the config so the config can be shown.
    pub password_file: PathBuf,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ForwardClientAddress {
    /// `ID ("x-originating-ip" …)` before login, as Dovecot reads it from trusted proxies.
    #[default]
    Id,
    None,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Limits {
    #[serde(
        default = "default_tls_handshake_timeout",
        deserialize_with = "duration"
    )]
    pub tls_handshake_timeout: Duration,
    /// From accept until the backend login succeeds.
    #[serde(default = "default_preauth_timeout", deserialize_with = "duration")]
    pub preauth_timeout: Duration,
    /// A relayed session with no bytes either way for this long is closed.
    #[serde(default = "default_idle_timeout", deserialize_with = "duration")]
    pub idle_timeout: Duration,
    /// On SIGTERM: how long established sessions may go on after the
    /// listeners close, before they get `* BYE [UNAVAILABLE]`. Keep it
    /// below the orchestrator's termination grace period (Kubernetes: 30s).
    #[serde(default = "default_shutdown_drain", deserialize_with = "duration")]
    pub shutdown_drain: Duration,
    /// Longest pre-auth command line, in bytes, not counting literals.
    #[serde(default = "default_max_line", deserialize_with = "size")]
    pub max_line: usize,
    /// Largest pre-auth literal; bigger ones are refused without a `+`.
    #[serde(default = "default_max_literal", deserialize_with = "size")]
    pub max_literal: usize,
    /// Bad pre-auth commands before the connection is closed.
    #[serde(default = "default_max_bad_commands")]
    pub max_bad_commands: u32,
    /// Failed logins on one connection before it is closed.
    #[serde(default = "default_max_auth_failures")]
    pub max_auth_failures: u32,
    /// Client connections open at once, over all listeners; more are closed
    /// at accept. Each session holds two file descriptors.
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
    /// Connections open at once from one client network (see
    /// `auth.brute_force.ipv4_prefix`/`ipv6_prefix`); 0: no limit.
    #[serde(default)]
    pub max_connections_per_network: u32,
    /// Logged-in sessions at once per user; 0: no limit.
    #[serde(default = "default_max_sessions_per_user")]
    pub max_sessions_per_user: u32,
}

fn default_max_sessions_per_user() -> u32 {
    50
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            tls_handshake_timeout: default_tls_handshake_timeout(),
            preauth_timeout: default_preauth_timeout(),
            idle_timeout: default_idle_timeout(),
            shutdown_drain: default_shutdown_drain(),
            max_line: default_max_line(),
            max_literal: default_max_literal(),
            max_bad_commands: default_max_bad_commands(),
            max_auth_failures: default_max_auth_failures(),
            max_connections: default_max_connections(),
            max_connections_per_network: 0,
            max_sessions_per_user: default_max_sessions_per_user(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Metrics {
    #[serde(default = "default_metrics_bind")]
    pub bind: SocketAddr,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            bind: default_metrics_bind(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Log {
    #[serde(default)]
    pub format: LogFormat,
    /// A tracing filter: `info`, `postern=debug`, …; `RUST_LOG` overrides it.
    #[serde(default = "default_log_level")]
    pub level: String,
}

impl Default for Log {
    fn default() -> Self {
        Log {
            format: LogFormat::default(),
            level: default_log_level(),
        }
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Human,
    Json,
}

fn yes() -> bool {
    true
}
fn default_failure_delay() -> Duration {
    Duration::from_secs(2)
}
fn default_cache_ttl() -> Duration {
    Duration::from_secs(300)
}
fn default_connect_timeout() -> Duration {
    Duration::from_secs(5)
}
fn default_proxy_header_timeout() -> Duration {
    Duration::from_secs(5)
}
fn default_discovery_interval() -> Duration {
    Duration::from_secs(30)
}
fn default_passive_fall() -> u32 {
    3
}
fn default_reconnect_jitter() -> Duration {
    Duration::from_secs(10)
}
fn default_reconnect_rate() -> f64 {
    200.0
}
fn default_weight() -> u32 {
    1
}
fn default_check_interval() -> Duration {
    Duration::from_secs(5)
}
fn default_check_timeout() -> Duration {
    Duration::from_secs(3)
}
fn default_rise() -> u32 {
    2
}
fn default_fall() -> u32 {
    2
}
fn default_login_timeout() -> Duration {
    Duration::from_secs(15)
}
fn default_tls_handshake_timeout() -> Duration {
    Duration::from_secs(10)
}
fn default_preauth_timeout() -> Duration {
    Duration::from_secs(60)
}
fn default_admin_bind() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 9091))
}
fn default_watch_interval() -> Duration {
    Duration::from_secs(2)
}
fn default_shutdown_drain() -> Duration {
    Duration::from_secs(20)
}
fn default_idle_timeout() -> Duration {
    Duration::from_secs(31 * 60)
}
fn default_max_line() -> usize {
    8192
}
fn default_max_literal() -> usize {
    8192
}
fn default_max_bad_commands() -> u32 {
    10
}
fn default_max_auth_failures() -> u32 {
    3
}
fn default_max_connections() -> usize {
    10_000
}
fn default_metrics_bind() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 9090))
}
fn default_log_level() -> String {
    "info".into()
}

/// Parses `500ms`, `10s`, `31m`, `2h`; a bare number is seconds.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let value: f64 = number
        .parse()
        .map_err(|_| format!("`{text}` is not a duration (use 500ms, 10s, 31m, 2h, 14d)"))?;
    let seconds = match unit.trim() {
        "ms" => value / 1000.0,
        "" | "s" => value,
        "m" => value * 60.0,
        "h" => value * 3600.0,
        "d" => value * 86400.0,
        other => {
            return Err(format!(
                "unknown duration unit `{other}` (use ms, s, m, h, d)"
            ))
        }
    };
    if !(0.0..=1e9).contains(&seconds) {
        return Err(format!("duration `{text}` is out of range"));
    }
    Ok(Duration::from_secs_f64(seconds))
}

/// Parses `8192`, `64KiB`, `1MiB`.
pub fn parse_size(text: &str) -> Result<usize, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let value: usize = number
        .parse()
        .map_err(|_| format!("`{text}` is not a size (use 8192, 64KiB, 1MiB)"))?;
    let factor = match unit.trim() {
        "" | "B" => 1,
        "KiB" | "K" | "k" => 1024,
        "MiB" | "M" => 1024 * 1024,
        other => return Err(format!("unknown size unit `{other}` (use KiB or MiB)")),
    };
    value
        .checked_mul(factor)
        .ok_or_else(|| format!("size `{text}` is too large"))
}

#[derive(Deserialize)]
#[serde(untagged)]
enum NumberOrText {
    Number(u64),
    Text(String),
}

fn duration<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    match NumberOrText::deserialize(d)? {
        NumberOrText::Number(n) if n <= 1_000_000_000 => Ok(Duration::from_secs(n)),
        NumberOrText::Number(n) => Err(serde::de::Error::custom(format!(
            "duration of {n} seconds is out of range"
        ))),
        NumberOrText::Text(t) => parse_duration(&t).map_err(serde::de::Error::custom),
    }
}

fn size<'de, D: Deserializer<'de>>(d: D) -> Result<usize, D::Error> {
    match NumberOrText::deserialize(d)? {
        NumberOrText::Number(n) => usize::try_from(n).map_err(serde::de::Error::custom),
        NumberOrText::Text(t) => parse_size(&t).map_err(serde::de::Error::custom),
    }
}

/// Deserialises YAML, naming the key path and line of the first error.
pub fn from_yaml<T: serde::de::DeserializeOwned>(text: &str) -> Result<T, String> {
    let de = serde_yaml::Deserializer::from_str(text);
    serde_path_to_error::deserialize(de).map_err(|err| {
        let path = err.path().to_string();
        let inner = err.into_inner();
        let location = inner
            .location()
            .map(|l| format!("line {}, column {}: ", l.line(), l.column()))
            .unwrap_or_default();
        // serde_yaml appends its own "at line N column M"; the prefix already says it.
        let mut message = inner.to_string();
        if let Some(at) = message.find(" at line ") {
            message.truncate(at);
        }
        if path == "." || path.is_empty() {
            format!("{location}{message}")
        } else {
            format!("{location}key `{path}`: {message}")
        }
    })
}

impl Config {
    /// Reads, parses and validates a config file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Config::parse(&text, path)
    }

    /// Parses and validates config text; `path` names the file in errors and
    /// anchors relative paths.
    pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
        let invalid = |message: String| ConfigError::Invalid {
            path: path.to_owned(),
            message,
        };
        let mut config: Config = from_yaml(text).map_err(invalid)?;
        config.version = {
            use std::hash::Hasher;
            let mut h = siphasher::sip::SipHasher13::new();
            h.write(text.as_bytes());
            format!("{:016x}", h.finish())
        };
        config.base_dir = path
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .map(Path::to_path_buf)
            .unwrap_or_else(|| PathBuf::from("."));
        config.validate().map_err(invalid)?;
        Ok(config)
    }

    /// Every file the configuration reads, resolved: what a change on disk
    /// of should reload it (the config file itself not included).
    pub fn referenced_files(&self) -> Vec<PathBuf> {
        let mut files = Vec::new();
        if let Some(s) = &self.auth.static_users {
            files.push(self.resolve(&s.users_file));
        }
        if let Some(m) = &self.backends.master_user {
            files.push(self.resolve(&m.password_file));
        }
        if let Some(o) = &self.auth.oauth {
            files.extend(o.jwks_file.iter().map(|f| self.resolve(f)));
            files.extend(
                o.introspection
                    .iter()
                    .map(|i| self.resolve(&i.client_secret_file)),
            );
            files.extend(o.tls_ca_file.iter().map(|f| self.resolve(f)));
        }
        if let Some(l) = &self.auth.ldap {
            files.extend(l.bind_password_file.iter().map(|f| self.resolve(f)));
            files.extend(l.tls_ca_file.iter().map(|f| self.resolve(f)));
        }
        if let Some(h) = &self.auth.http {
            files.extend(h.header_files.values().map(|f| self.resolve(f)));
            files.extend(h.tls_ca_file.iter().map(|f| self.resolve(f)));
        }
        for c in &self.tls.certificates {
            files.push(self.resolve(&c.cert));
            files.push(self.resolve(&c.key));
        }
        for b in self.backends.all_servers() {
            for f in [&b.tls_ca_file, &b.tls_client_cert, &b.tls_client_key]
                .into_iter()
                .flatten()
            {
                files.push(self.resolve(f));
            }
        }
        if let Some(login) = &self.backends.health_check.login {
            files.push(self.resolve(&login.password_file));
        }
        files
    }

    /// What a reload cannot change in a running process: the sockets and
    /// threads made at start.
    pub fn restart_only_changes(&self, new: &Config) -> Option<&'static str> {
        if self.metrics.bind != new.metrics.bind {
            Some("metrics.bind")
        } else if self.workers != new.workers {
            Some("workers")
        } else if self.admin.as_ref().map(|a| a.bind) != new.admin.as_ref().map(|a| a.bind) {
            Some("admin.bind")
        } else if self.limits.max_connections != new.limits.max_connections {
            Some("limits.max_connections")
        } else if self.log.format != new.log.format {
            Some("log.format")
        } else if self.cluster != new.cluster {
            Some("cluster")
        } else {
            None
        }
    }

    /// Resolves a path from the config against the config file's directory.
    pub fn resolve(&self, path: &Path) -> PathBuf {
        if path.is_absolute() {
            path.to_owned()
        } else {
            self.base_dir.join(path)
        }
    }

    fn validate(&self) -> Result<(), String> {
        if self.listeners.is_empty() {
            return Err("key `listeners`: at least one listener is needed".into());
        }
        let mut names = HashSet::new();
        let mut binds = HashSet::new();
        for (i, l) in self.listeners.iter().enumerate() {
            check_name(&format!("listeners[{i}].name"), &l.name)?;
            if !names.insert(&l.name) {
                return Err(format!(
                    "key `listeners[{i}].name`: listener `{}` is defined twice",
                    l.name
                ));
            }
            if !binds.insert(l.bind) {
                return Err(format!(
                    "key `listeners[{i}].bind`: {} is used by another listener",
                    l.bind
                ));
            }
            if let Some(pp) = &l.proxy_protocol {
                if pp.trusted_networks.is_empty() {
                    return Err(format!(
                        "key `listeners[{i}].proxy_protocol.trusted_networks`: name the load balancers' networks"
                    ));
                }
                if pp.timeout.is_zero() {
                    return Err(format!(
                        "key `listeners[{i}].proxy_protocol.timeout`: must be above zero"
                    ));
                }
            }
            if l.allow_plaintext_auth && l.tls == ListenerTls::Implicit {
                return Err(format!(
                    "key `listeners[{i}].allow_plaintext_auth`: only meaningful on a `starttls` listener"
                ));
            }
            let relayed = l.protocol == Protocol::Submission
                && self
                    .submission
                    .as_ref()
                    .is_some_and(|s| !s.relays.is_empty());
            if let Some(port_key) = l.protocol.port_key().filter(|_| !relayed) {
                let pools = std::iter::once(("backends.pool".to_owned(), &self.backends.pool))
                    .chain(
                        self.backends.pools.iter().enumerate().map(|(p, pool)| {
                            (format!("backends.pools[{p}].servers"), &pool.servers)
                        }),
                    );
                for (key, servers) in pools {
                    if let Some(j) = servers
                        .iter()
                        .position(|b| b.port_for(l.protocol).is_none())
                    {
                        return Err(format!(
                            "key `{key}[{j}].{port_key}`: listener `{}` speaks {}, so every backend needs that port",
                            l.name,
                            l.protocol.as_str()
                        ));
                    }
                }
            }
        }
        if let Some(admin) = &self.admin {
            if binds.contains(&admin.bind) || admin.bind == self.metrics.bind {
                return Err(format!(
                    "key `admin.bind`: {} is also a listener's or the metrics address",
                    admin.bind
                ));
            }
        }
        if binds.contains(&self.metrics.bind) {
            return Err(format!(
                "key `metrics.bind`: {} is also a listener's address",
                self.metrics.bind
            ));
        }
        for (i, c) in self.tls.certificates.iter().enumerate() {
            if i > 0 && c.names.is_empty() {
                return Err(format!(
                    "key `tls.certificates[{i}].names`: every certificate but the first (the default) needs the SNI names it serves"
                ));
            }
            for (j, n) in c.names.iter().enumerate() {
                if n.is_empty() || n.contains(|ch: char| ch.is_whitespace() || ch == '/') {
                    return Err(format!(
                        "key `tls.certificates[{i}].names[{j}]`: `{n}` is not a host name"
                    ));
                }
            }
        }
        if self.tls.certificates.is_empty() && self.tls.self_signed.names.is_empty() {
            return Err("key `tls.self_signed.names`: at least one name is needed".into());
        }
        match self.auth.source {
            AuthSource::Static if self.auth.static_users.is_none() => {
                return Err(
                    "key `auth.static`: `source: static` needs `static: { users_file: … }`".into(),
                )
            }
            AuthSource::Ldap => {
                let Some(l) = &self.auth.ldap else {
                    return Err("key `auth.ldap`: `source: ldap` needs `ldap: { url: … }`".into());
                };
                let ldaps = l.url.starts_with("ldaps://");
                if !(ldaps || l.url.starts_with("ldap://")) {
                    return Err(format!(
                        "key `auth.ldap.url`: `{}` must start with ldap:// or ldaps://",
                        l.url
                    ));
                }
                if ldaps && l.starttls {
                    return Err("key `auth.ldap.starttls`: not with an ldaps:// URL".into());
                }
                if !ldaps && !l.starttls && !loopback_url(&l.url) {
                    return Err(format!(
                        "key `auth.ldap.starttls`: passwords would cross the network in clear to `{}`; use ldaps:// or starttls: true (plain ldap:// is for loopback only)",
                        l.url
                    ));
                }
                use crate::auth::ldap::{check_dn, check_dn_template, check_filter_template};
                match (&l.bind_dn, &l.user_dn) {
                    (Some(bind_dn), None) => {
                        let (Some(_), Some(base_dn)) = (&l.bind_password_file, &l.base_dn) else {
                            return Err("key `auth.ldap`: search-then-bind (`bind_dn`) needs `bind_password_file` and `base_dn`".into());
                        };
                        check_dn(bind_dn).map_err(|e| {
                            format!("key `auth.ldap.bind_dn`: `{bind_dn}` is not a DN: {e}")
                        })?;
                        check_dn(base_dn).map_err(|e| {
                            format!("key `auth.ldap.base_dn`: `{base_dn}` is not a DN: {e}")
                        })?;
                        check_filter_template(&l.filter)
                            .map_err(|e| format!("key `auth.ldap.filter`: {e}"))?;
                    }
                    (None, Some(dn)) => {
                        check_dn_template(dn)
                            .map_err(|e| format!("key `auth.ldap.user_dn`: {e}"))?;
                    }
                    _ => {
                        return Err("key `auth.ldap`: set `bind_dn` (search, then bind as the user) or `user_dn` (bind directly), one of them".into())
                    }
                }
                if !(1..=256).contains(&l.pool_size) {
                    return Err("key `auth.ldap.pool_size`: 1 to 256".into());
                }
                let attributes = [
                    ("user_attribute", Some(&l.user_attribute)),
                    ("backend_attribute", l.backend_attribute.as_ref()),
                    ("disabled_attribute", l.disabled_attribute.as_ref()),
                ];
                for (key, name) in attributes {
                    if let Some(name) = name {
                        let descr = name.starts_with(|c: char| c.is_ascii_alphabetic())
                            && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-');
                        if !descr {
                            return Err(format!(
                                "key `auth.ldap.{key}`: `{name}` is not an attribute name"
                            ));
                        }
                    }
                }
                if l.disabled_attribute.is_some()
                    && l.disabled_values.iter().all(|v| v.trim().is_empty())
                {
                    return Err("key `auth.ldap.disabled_values`: `disabled_attribute` needs at least one value".into());
                }
            }
            AuthSource::Http => {
                let Some(h) = &self.auth.http else {
                    return Err("key `auth.http`: `source: http` needs `http: { url: … }`".into());
                };
                if !(h.url.starts_with("http://") || h.url.starts_with("https://")) {
                    return Err(format!(
                        "key `auth.http.url`: `{}` must start with http:// or https://",
                        h.url
                    ));
                }
                for name in h.headers.keys().chain(h.header_files.keys()) {
                    let reserved = name.to_ascii_lowercase().starts_with("auth-")
                        || ["host", "client-ip", "client-host"]
                            .contains(&name.to_ascii_lowercase().as_str());
                    if reserved || hyper::header::HeaderName::from_bytes(name.as_bytes()).is_err() {
                        return Err(format!(
                            "key `auth.http.headers`: `{name}` is not a header Postern may add"
                        ));
                    }
                }
                if h.timeout.is_zero() {
                    return Err("key `auth.http.timeout`: must be above 0".into());
                }
            }
            _ => {}
        }
        if let Some(o) = &self.auth.oauth {
            let sources = [
                o.jwks_file.is_some(),
                o.jwks_url.is_some(),
                o.introspection.is_some(),
            ];
            if sources.iter().filter(|s| **s).count() != 1 {
                return Err(
                    "key `auth.oauth`: set one of `jwks_file`, `jwks_url` and `introspection`"
                        .into(),
                );
            }
            if let Some(i) = &o.introspection {
                if !(i.url.starts_with("https://")
                    || i.url.starts_with("http://") && loopback_url(&i.url))
                {
                    return Err(format!("key `auth.oauth.introspection.url`: `{}` must be https:// (plain http:// is for loopback only: it carries the client secret)", i.url));
                }
            }
            if let Some(url) = &o.jwks_url {
                if !(url.starts_with("https://") || url.starts_with("http://") && loopback_url(url))
                {
                    return Err(format!("key `auth.oauth.jwks_url`: `{url}` must be https:// (plain http:// is for loopback only: the keys decide who logs in)"));
                }
            }
            if o.jwks_refresh < Duration::from_secs(10) {
                return Err("key `auth.oauth.jwks_refresh`: at least 10s".into());
            }
        }
        if self.auth.oauth.is_some() && self.backends.master_user.is_none() {
            return Err("key `auth.oauth`: token logins bring no password for the backend; configure `backends.master_user`".into());
        }
        let bf = &self.auth.brute_force;
        if bf.ipv4_prefix > 32 || bf.ipv6_prefix > 128 {
            return Err(
                "key `auth.brute_force.ipv4_prefix`/`ipv6_prefix`: at most 32 and 128".into(),
            );
        }
        if bf.max_entries < 16 {
            return Err("key `auth.brute_force.max_entries`: at least 16".into());
        }
        if bf.max_checks_per_network == 0 || bf.max_checks_per_user == 0 {
            return Err("key `auth.brute_force.max_checks_per_network`/`max_checks_per_user`: at least 1 (each is a number of checks at once)".into());
        }
        if let Some(all) = self
            .auth
            .trusted_forwarders
            .iter()
            .position(|n| n.prefix() == 0)
        {
            return Err(format!(
                "key `auth.trusted_forwarders[{all}]`: a /0 would believe every client's stated address; name the forwarders' own networks"
            ));
        }
        if bf.block_after > 1000 {
            return Err(
                "key `auth.brute_force.block_after`: at most 1000 distinct user names".into(),
            );
        }
        if let Some(m) = &self.backends.master_user {
            if m.user.is_empty() || m.user.chars().any(|c| c.is_control() || c == ' ') {
                return Err("key `backends.master_user.user`: not a user name".into());
            }
            if m.form == MasterForm::Separator && m.separator.is_empty() {
                return Err("key `backends.master_user.separator`: empty".into());
            }
        }
        if let Some(domain) = &self.auth.default_domain {
            if domain.is_empty() || domain.contains(['@', ' ']) {
                return Err(format!(
                    "key `auth.default_domain`: `{domain}` is not a domain"
                ));
            }
        }
        if self.backends.pool.is_empty() {
            return Err("key `backends.pool`: at least one backend is needed".into());
        }
        let mut backend_names = HashSet::new();
        let mut pool_names = HashSet::new();
        let mut domains = HashSet::new();
        for (p, pool) in self.backends.pools.iter().enumerate() {
            check_name(&format!("backends.pools[{p}].name"), &pool.name)?;
            if pool.name == "default" || !pool_names.insert(pool.name.as_str()) {
                return Err(format!(
                    "key `backends.pools[{p}].name`: pool `{}` is defined twice (`default` is the `pool` list)",
                    pool.name
                ));
            }
            if pool.servers.is_empty() {
                return Err(format!(
                    "key `backends.pools[{p}].servers`: at least one backend is needed"
                ));
            }
            for (d, domain) in pool.domains.iter().enumerate() {
                if domain.is_empty() || domain.contains(['@', ' ']) {
                    return Err(format!(
                        "key `backends.pools[{p}].domains[{d}]`: `{domain}` is not a domain"
                    ));
                }
                if !domains.insert(domain.to_ascii_lowercase()) {
                    return Err(format!(
                        "key `backends.pools[{p}].domains[{d}]`: `{domain}` is routed to another pool already"
                    ));
                }
            }
        }
        let servers = self
            .backends
            .pool
            .iter()
            .enumerate()
            .map(|(i, b)| (format!("backends.pool[{i}]"), b))
            .chain(
                self.backends
                    .pools
                    .iter()
                    .enumerate()
                    .flat_map(|(p, pool)| {
                        pool.servers
                            .iter()
                            .enumerate()
                            .map(move |(i, b)| (format!("backends.pools[{p}].servers[{i}]"), b))
                    }),
            )
            .chain(
                self.submission
                    .iter()
                    .flat_map(|s| s.relays.iter().enumerate())
                    .map(|(i, b)| (format!("submission.relays[{i}]"), b)),
            );
        for (at, b) in servers {
            check_name(&format!("{at}.name"), &b.name)?;
            if !backend_names.insert(&b.name) {
                return Err(format!(
                    "key `{at}.name`: backend `{}` is defined twice",
                    b.name
                ));
            }
            check_host_port(&b.address).map_err(|e| format!("key `{at}.address`: {e}"))?;
            let tls_keys = b.tls_ca_file.is_some()
                || b.tls_server_name.is_some()
                || b.tls_client_cert.is_some()
                || b.tls_client_key.is_some();
            if b.tls == BackendTlsMode::None && tls_keys {
                return Err(format!(
                    "key `{at}.tls`: the tls_* keys need `tls: implicit` or `tls: starttls`"
                ));
            }
            if b.tls_client_cert.is_some() != b.tls_client_key.is_some() {
                return Err(format!(
                    "key `{at}.tls_client_cert`: give tls_client_cert and tls_client_key together"
                ));
            }
            if !(1..=1000).contains(&b.weight) {
                return Err(format!(
                    "key `{at}.weight`: must be between 1 and 1000, not {}",
                    b.weight
                ));
            }
        }
        if let Some(i) = self
            .submission
            .iter()
            .flat_map(|s| s.relays.iter())
            .position(|r| r.discover)
        {
            return Err(format!(
                "key `submission.relays[{i}].discover`: relays are named one by one, not discovered"
            ));
        }
        if self.backends.discovery.interval < Duration::from_millis(100) {
            return Err("key `backends.discovery.interval`: must be at least 100ms".into());
        }
        let hc = &self.backends.health_check;
        if hc.interval < Duration::from_millis(100) || hc.timeout.is_zero() {
            return Err(
                "key `backends.health_check`: interval must be at least 100ms and timeout above zero"
                    .into(),
            );
        }
        if hc.rise == 0 || hc.fall == 0 {
            return Err("key `backends.health_check`: rise and fall must be at least 1".into());
        }
        if let Some(login) = &hc.login {
            if login.user.is_empty() || login.user.contains(|c: char| c.is_control()) {
                return Err("key `backends.health_check.login.user`: not a user name".into());
            }
        }
        let rate = self.backends.reconnect_rate;
        if !(rate.is_finite() && (0.1..=1_000_000.0).contains(&rate)) {
            return Err(format!(
                "key `backends.reconnect_rate`: must be between 0.1 and 1000000 logins per second, not {rate}"
            ));
        }
        if let Some(f) = self.backends.bounded_load {
            if !(1.1..=100.0).contains(&f) {
                return Err(format!(
                    "key `backends.bounded_load`: must be between 1.1 and 100, not {f}"
                ));
            }
        }
        let l = &self.limits;
        if l.max_line < 512 {
            return Err("key `limits.max_line`: must be at least 512 bytes".into());
        }
        if l.max_connections == 0 || l.max_connections > 10_000_000 {
            return Err("key `limits.max_connections`: must be between 1 and 10000000".into());
        }
        if l.max_bad_commands == 0 || l.max_auth_failures == 0 {
            return Err(
                "key `limits`: max_bad_commands and max_auth_failures must be at least 1".into(),
            );
        }
        for (key, d) in [
            ("tls_handshake_timeout", l.tls_handshake_timeout),
            ("preauth_timeout", l.preauth_timeout),
            ("idle_timeout", l.idle_timeout),
        ] {
            if d.is_zero() {
                return Err(format!("key `limits.{key}`: must be above zero"));
            }
        }
        if self.backends.connect_timeout.is_zero() || self.backends.login_timeout.is_zero() {
            return Err(
                "key `backends`: connect_timeout and login_timeout must be above zero".into(),
            );
        }
        tracing_subscriber::EnvFilter::try_new(&self.log.level)
            .map_err(|e| format!("key `log.level`: {e}"))?;
        if let Some(c) = &self.cluster {
            c.validate()?;
        }
        Ok(())
    }
}

fn check_name(key: &str, name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "key `{key}`: `{name}` must be 1-64 characters of letters, digits, `-`, `_` or `.`"
        ))
    }
}

/// Checks `host:port` or `[v6]:port` without resolving it.
/// Whether a URL's host is a loopback address or `localhost`, where a
/// plaintext connection never leaves the machine.
fn loopback_url(url: &str) -> bool {
    let Ok(uri) = url.parse::<hyper::Uri>() else {
        return false;
    };
    let host = uri.host().unwrap_or_default().trim_matches(['[', ']']);
    host.eq_ignore_ascii_case("localhost")
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

pub fn check_host_port(address: &str) -> Result<(), String> {
    if address.parse::<SocketAddr>().is_ok() {
        return Ok(());
    }
    let (host, port) = address
        .rsplit_once(':')
        .ok_or_else(|| format!("`{address}` needs a port (host:port)"))?;
    port.parse::<u16>()
        .ok()
        .filter(|p| *p != 0)
        .ok_or_else(|| format!("`{port}` in `{address}` is not a port"))?;
    if host.is_empty() || host.contains([' ', '[', ']', ':']) {
        return Err(format!("`{host}` in `{address}` is not a host name"));
    }
    Ok(())
}

impl fmt::Display for ListenerTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ListenerTls::Implicit => "implicit",
            ListenerTls::Starttls => "starttls",
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = "
listeners:
  - { name: imaps, bind: \"127.0.0.1:9993\", tls: implicit }
auth:
  source: static
  static: { users_file: users.yaml }
backends:
  pool:
    - { name: mail-a, address: \"127.0.0.1:10143\" }
";

    #[test]
    fn minimal_config_gets_documented_defaults() {
        let c = Config::parse(MINIMAL, Path::new("/etc/postern/postern.yaml")).unwrap();
        assert_eq!(c.limits.idle_timeout, Duration::from_secs(31 * 60));
        assert_eq!(c.limits.preauth_timeout, Duration::from_secs(60));
        assert_eq!(c.metrics.bind.port(), 9090);
        assert_eq!(
            c.resolve(&c.auth.static_users.as_ref().unwrap().users_file),
            PathBuf::from("/etc/postern/users.yaml")
        );
        assert!(c.auth.lowercase_usernames);
    }

    #[test]
    fn submission_and_sieve_listeners_need_their_backend_ports() {
        let parse = |listener: &str, server: &str, extra: &str| {
            let text = MINIMAL
                .replace(
                    "tls: implicit }\n",
                    &format!("tls: implicit }}\n  - {listener}\n"),
                )
                .replace(
                    "address: \"127.0.0.1:10143\" }",
                    &format!("address: \"127.0.0.1:10143\"{server} }}"),
                )
                + extra;
            Config::parse(&text, Path::new("p.yaml")).map_err(|e| e.to_string())
        };
        let submission =
            "{ name: sub, bind: \"127.0.0.1:9587\", tls: starttls, protocol: submission }";
        let err = parse(submission, "", "").unwrap_err();
        assert!(err.contains("backends.pool[0].submission_port"), "{err}");
        let c = parse(submission, ", submission_port: 587", "").unwrap();
        assert_eq!(c.listeners[1].protocol, Protocol::Submission);
        assert_eq!(c.backends.pool[0].port_for(Protocol::Submission), Some(587));
        // With relays the users' backends need no submission port.
        let relays = "submission:\n  hostname: edge.example\n  relays:\n    - { name: mta, address: \"127.0.0.1:2525\" }\n";
        let c = parse(submission, "", relays).unwrap();
        let s = c.submission.unwrap();
        assert_eq!(s.hostname.as_deref(), Some("edge.example"));
        assert_eq!(s.max_message_size, 50 * 1024 * 1024);
        let err = parse(
            submission,
            "",
            "submission:\n  relays:\n    - { name: mail-a, address: \"127.0.0.1:2525\" }\n",
        )
        .unwrap_err();
        assert!(err.contains("submission.relays[0].name"), "{err}");
        let sieve =
            "{ name: sieve, bind: \"127.0.0.1:9190\", tls: starttls, protocol: managesieve }";
        let err = parse(sieve, "", "").unwrap_err();
        assert!(err.contains("backends.pool[0].sieve_port"), "{err}");
        assert!(parse(sieve, ", sieve_port: 4190", "").is_ok());
        assert_eq!(Protocol::Submission.alpn(), b"smtp");
        assert_eq!(Protocol::Managesieve.alpn(), b"managesieve");
        for p in Protocol::ALL {
            assert_eq!(Protocol::ALL[p.index()], p);
        }
    }

    #[test]
    fn http_source_and_master_user_are_checked() {
        let http = |block: &str| {
            let text = MINIMAL.replace("  source: static\n", &format!("  source: http\n{block}"));
            Config::parse(&text, Path::new("p.yaml"))
                .map(|_| ())
                .map_err(|e| e.to_string())
        };
        let err = http("").unwrap_err();
        assert!(err.contains("auth.http"), "{err}");
        assert!(http("  http: { url: \"http://127.0.0.1:8080/auth\" }\n").is_ok());
        let err = http("  http: { url: \"ftp://x/\" }\n").unwrap_err();
        assert!(err.contains("auth.http.url"), "{err}");
        for bad in ["Auth-Pass", "Client-IP", "Host", "Bad Name"] {
            let err = http(&format!(
                "  http: {{ url: \"http://a:1/\", headers: {{ \"{bad}\": x }} }}\n"
            ))
            .unwrap_err();
            assert!(
                err.contains("auth.http.headers") && err.contains(bad),
                "{err}"
            );
        }
        let master = |block: &str| {
            let text = MINIMAL.replace("backends:\n", &format!("backends:\n{block}"));
            Config::parse(&text, Path::new("p.yaml")).map_err(|e| e.to_string())
        };
        let c = master("  master_user: { user: pm, password_file: m.pw }\n").unwrap();
        let m = c.backends.master_user.as_ref().unwrap();
        assert_eq!(
            (m.form, m.separator.as_str(), m.always),
            (MasterForm::Authzid, "*", false)
        );
        assert!(c.referenced_files().contains(&c.resolve(Path::new("m.pw"))));
        let err = master("  master_user: { user: \"p m\", password_file: m.pw }\n").unwrap_err();
        assert!(err.contains("backends.master_user.user"), "{err}");
        let err = master("  master_user: { user: pm, password: x }\n").unwrap_err();
        assert!(err.contains("password"), "{err}");
        let oauth = MINIMAL.replace(
            "  source: static\n",
            "  source: static\n  oauth: { jwks_file: j.json, issuer: i, audience: a }\n",
        );
        let err = Config::parse(&oauth, Path::new("p.yaml"))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("auth.oauth") && err.contains("master_user"),
            "{err}"
        );
        let both = oauth.replace(
            "jwks_file: j.json,",
            "jwks_file: j.json, jwks_url: \"https://id/jwks\",",
        );
        let err = Config::parse(&both, Path::new("p.yaml"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("one of"), "{err}");
    }

    #[test]
    fn the_cluster_block_is_checked() {
        let cluster = |block: &str| {
            Config::parse(&format!("{MINIMAL}cluster:\n{block}"), Path::new("p.yaml"))
                .map_err(|e| e.to_string())
        };
        let c = cluster("  store: { url: \"redis://127.0.0.1:6379/0\" }\n").unwrap();
        let cl = c.cluster.unwrap();
        assert_eq!(cl.store.timeout, Duration::from_millis(50));
        assert_eq!(cl.store.key_prefix, "postern");
        assert_eq!(cl.lease_ttl, Duration::from_secs(60));
        assert_eq!(cl.user_expire, Duration::from_secs(60));
        assert_eq!(cl.hold_wait, Duration::from_secs(10));
        for (block, says) in [
            (
                "  store: { url: \"http://cache:6379\" }\n",
                "not a redis://",
            ),
            (
                "  store: { url: \"redis://:hunter2@cache:6379\" }\n",
                "no password in the URL",
            ),
            (
                "  store: { url: \"redis://cache:6379\", ca_file: ca.pem }\n",
                "only for a rediss://",
            ),
            (
                "  store: { url: \"redis://cache\", timeout: 0s }\n",
                "cluster.store.timeout",
            ),
            (
                "  store: { url: \"redis://cache\" }\n  lease_ttl: 1s\n",
                "cluster.lease_ttl",
            ),
            (
                "  store: { url: \"redis://cache\", key_prefix: \"a b\" }\n",
                "key_prefix",
            ),
        ] {
            let err = cluster(block).unwrap_err();
            assert!(err.contains(says), "{block}: {err}");
            assert!(!err.contains("hunter2"), "{err}");
        }
        // A user name without a password is fine.
        assert!(cluster("  store: { url: \"rediss://postern@cache:6380/1\" }\n").is_ok());
    }

    #[test]
    fn ldap_source_is_checked() {
        let ldap = |block: &str| {
            let text = MINIMAL.replace("  source: static\n", &format!("  source: ldap\n{block}"));
            Config::parse(&text, Path::new("p.yaml"))
                .map(|_| ())
                .map_err(|e| e.to_string())
        };
        let search = "bind_dn: cn=p, bind_password_file: p.pw, base_dn: \"dc=x\"";
        assert!(ldap(&format!(
            "  ldap: {{ url: \"ldap://127.0.0.1:389\", {search} }}\n"
        ))
        .is_ok());
        assert!(ldap(&format!(
            "  ldap: {{ url: \"ldap://h:389\", starttls: true, {search} }}\n"
        ))
        .is_ok());
        let err = ldap(&format!("  ldap: {{ url: \"ldap://h:389\", {search} }}\n")).unwrap_err();
        assert!(
            err.contains("auth.ldap.starttls") && err.contains("clear"),
            "{err}"
        );
        assert!(ldap("  ldap: { url: \"ldaps://h\", user_dn: \"uid=%n,dc=x\" }\n").is_ok());
        assert!(ldap("  ldap: { url: \"ldaps://h\", user_dn: \"uid=%n,dc=x\", user_attribute: uid, disabled_attribute: employeeType }\n").is_ok());
        for (block, key) in [
            ("", "auth.ldap"),
            (
                "  ldap: { url: \"http://h\", user_dn: \"uid=%n\" }\n",
                "auth.ldap.url",
            ),
            (
                "  ldap: { url: \"ldaps://h\", starttls: true, user_dn: \"uid=%n\" }\n",
                "auth.ldap.starttls",
            ),
            ("  ldap: { url: \"ldap://localhost\" }\n", "auth.ldap"),
            (
                "  ldap: { url: \"ldap://localhost\", user_dn: \"uid=x\" }\n",
                "auth.ldap.user_dn",
            ),
            (
                "  ldap: { url: \"ldap://localhost\", bind_dn: cn=p }\n",
                "bind_password_file",
            ),
            (
                "  ldap: { url: \"ldap://localhost\", user_dn: \"uid=%n\", bind_dn: cn=p }\n",
                "one of them",
            ),
            (
                "  ldap: { url: \"ldap://localhost\", user_dn: \"uid=%n;dc=x\" }\n",
                "auth.ldap.user_dn",
            ),
            (
                "  ldap: { url: \"ldap://localhost\", user_dn: \"uid=%N,dc=x\" }\n",
                "auth.ldap.user_dn",
            ),
            (
                "  ldap: { url: \"ldap://localhost\", bind_dn: cn=p, bind_password_file: p.pw, base_dn: \"dc=x\", filter: \"(&(uid=%n)\" }\n",
                "auth.ldap.filter",
            ),
            (
                "  ldap: { url: \"ldap://localhost\", bind_dn: cn=p, bind_password_file: p.pw, base_dn: \"dc=x,\" }\n",
                "auth.ldap.base_dn",
            ),
            (
                "  ldap: { url: \"ldap://localhost\", user_dn: \"uid=%n,dc=x\", user_attribute: \"mail)\" }\n",
                "auth.ldap.user_attribute",
            ),
            (
                "  ldap: { url: \"ldap://localhost\", user_dn: \"uid=%n,dc=x\", disabled_attribute: employeeType, disabled_values: [] }\n",
                "auth.ldap.disabled_values",
            ),
        ] {
            let err = ldap(block).unwrap_err();
            assert!(err.contains(key), "{block}: {err}");
        }
    }

    #[test]
    fn unknown_key_is_named_with_its_line() {
        let text = MINIMAL.replace("tls: implicit }", "tls: implicit, colour: blue }");
        let err = Config::parse(&text, Path::new("p.yaml"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("line 3"), "{err}");
        assert!(err.contains("colour"), "{err}");
        assert!(err.contains("listeners[0]"), "{err}");
    }

    #[test]
    fn bad_duration_is_named_with_key_and_line() {
        let text = format!("{MINIMAL}limits:\n  idle_timeout: 31 fortnights\n");
        let err = Config::parse(&text, Path::new("p.yaml"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("limits.idle_timeout"), "{err}");
        assert!(err.contains("line 11"), "{err}");
    }

    #[test]
    fn backend_balancing_keys_are_checked() {
        for (from, to, key) in [
            (
                "address: \"127.0.0.1:10143\" }",
                "address: \"127.0.0.1:10143\", weight: 0 }",
                "backends.pool[0].weight",
            ),
            (
                "  pool:\n",
                "  bounded_load: 0.9\n  pool:\n",
                "backends.bounded_load",
            ),
            (
                "  pool:\n",
                "  reconnect_rate: 0\n  pool:\n",
                "backends.reconnect_rate",
            ),
            (
                "  pool:\n",
                "  pools:\n    - { name: a, domains: [x.org], servers: [{ name: p1, address: \"127.0.0.1:1\" }] }\n    - { name: b, domains: [X.org], servers: [{ name: p2, address: \"127.0.0.1:2\" }] }\n  pool:\n",
                "backends.pools[1].domains[0]",
            ),
            (
                "  pool:\n",
                "  pools:\n    - { name: a, servers: [{ name: mail-a, address: \"127.0.0.1:1\" }] }\n  pool:\n",
                "backends.pools[0].servers[0].name",
            ),
            (
                "address: \"127.0.0.1:10143\" }",
                "address: \"127.0.0.1:10143\", tls_ca_file: ca.pem }",
                "backends.pool[0].tls",
            ),
            (
                "address: \"127.0.0.1:10143\" }",
                "address: \"127.0.0.1:10143\", tls: starttls, tls_client_cert: c.pem }",
                "backends.pool[0].tls_client_cert",
            ),
            (
                "address: \"127.0.0.1:10143\" }",
                "address: \"127.0.0.1:10143\", tls: sometimes }",
                "backends.pool[0].tls",
            ),
            (
                "  pool:\n",
                "  health_check: { fall: 0 }\n  pool:\n",
                "backends.health_check",
            ),
            (
                "  pool:\n",
                "  health_check: { interval: 1ms }\n  pool:\n",
                "backends.health_check",
            ),
        ] {
            let text = MINIMAL.replace(from, to);
            assert_ne!(text, MINIMAL, "{from}");
            let err = Config::parse(&text, Path::new("p.yaml"))
                .unwrap_err()
                .to_string();
            assert!(err.contains(key), "{to}: {err}");
        }
        let c = Config::parse(MINIMAL, Path::new("p.yaml")).unwrap();
        let hc = &c.backends.health_check;
        assert!(hc.enabled);
        assert_eq!(
            (hc.interval, hc.timeout, hc.rise, hc.fall),
            (Duration::from_secs(5), Duration::from_secs(3), 2, 2)
        );
        assert_eq!(c.backends.passive_fall, 3);
        assert_eq!(c.backends.pool[0].weight, 1);
        assert!(!c.backends.pool[0].drain);
    }

    #[test]
    fn duplicate_backend_is_refused() {
        let text = MINIMAL.replace(
            "    - { name: mail-a, address: \"127.0.0.1:10143\" }",
            "    - { name: mail-a, address: \"127.0.0.1:10143\" }\n    - { name: mail-a, address: \"127.0.0.1:10144\" }",
        );
        let err = Config::parse(&text, Path::new("p.yaml"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("backends.pool[1].name"), "{err}");
    }

    #[test]
    fn durations_and_sizes_parse() {
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("31m").unwrap(), Duration::from_secs(1860));
        assert_eq!(parse_duration("2").unwrap(), Duration::from_secs(2));
        assert!(parse_duration("2 weeks").is_err());
        assert_eq!(parse_size("64KiB").unwrap(), 65536);
        assert!(parse_size("99999999999999999999MiB").is_err());
    }

    #[test]
    fn host_port_forms() {
        assert!(check_host_port("mail.example.com:143").is_ok());
        assert!(check_host_port("[::1]:143").is_ok());
        assert!(check_host_port("mail.example.com").is_err());
        assert!(check_host_port("mail:0").is_err());
    }
}
