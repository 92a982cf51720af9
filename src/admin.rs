//! The admin API: JSON over HTTP on its own listener (loopback by
//! default), every request carrying `Authorization: Bearer <token>` with
//! the token from `admin.token_file`, read on each request so it can be
//! rotated in place. Answers are small and bounded; a connection is held
//! at most 30 s.
//!
//! | method and path | does |
//! |---|---|
//! | `GET /v1/sessions` | logged-in sessions: id, user, client, listener, protocol, backend, start, bytes |
//! | `POST /v1/sessions/kick?user=NAME` | ends the user's sessions with `* BYE`, on every replica |
//! | `GET /v1/users/NAME/sessions` | the user's sessions on every replica (with a store) |
//! | `POST /v1/users/NAME/kick` | as `/v1/sessions/kick` |
//! | `POST /v1/users/NAME/hold[?for=60s]` | new logins wait (up to `cluster.hold_wait`, then `NO [UNAVAILABLE]`) |
//! | `POST /v1/users/NAME/release` | ends the hold |
//! | `POST /v1/users/NAME/pin?backend=B`, `DELETE …/pin` | sends the user to B whatever the hash says, until removed |
//! | `POST /v1/users/NAME/move?to=B[&hold=30s]` | hold, end the sessions with `* BYE [UNAVAILABLE]`, pin to B, release |
//! | `GET /v1/backends` | every backend with its health, drain and session count |
//! | `POST /v1/backends/NAME/drain[?close_after=30s]` | no new sessions (on every replica); optionally close the rest after the grace period |
//! | `POST /v1/backends/NAME/undrain` | takes sessions again |
//! | `GET /v1/config` | the live configuration's version |
//! | `POST /v1/reload` | reloads the configuration, answers with the result |
//! | `GET /v1/reload/dry-run` | how many users with live sessions (and sessions) the configuration file on disk would place elsewhere |

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Method, Request, Response, StatusCode};
use serde_json::{json, Value};
use subtle::ConstantTimeEq;
use tokio::sync::{mpsc, oneshot};

use crate::cluster::KickWhy;
use crate::live::Live;
use crate::registry::Registry;

/// A reload request to the control loop, and where to send its result
/// (the new version, or why it was refused).
pub type ReloadRequest = oneshot::Sender<Result<String, String>>;

pub struct Admin {
    pub live: Live,
    pub registry: Arc<Registry>,
    pub reload: mpsc::Sender<ReloadRequest>,
    pub token_file: PathBuf,
    /// The configuration file, for a reload's dry run.
    pub config_path: PathBuf,
}

pub async fn serve(bind: SocketAddr, admin: Arc<Admin>) -> std::io::Result<()> {
    let listener = tokio::net::TcpListener::bind(bind).await?;
    tracing::info!(%bind, "admin API listening");
    tokio::spawn(async move {
        loop {
            let (stream, peer) = match listener.accept().await {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!(error = %e, "admin accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let admin = Arc::clone(&admin);
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |req| {
                    let admin = Arc::clone(&admin);
                    async move { Ok::<_, std::convert::Infallible>(handle(&req, &admin, peer).await) }
                });
                let conn = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), service);
                let _ = tokio::time::timeout(Duration::from_secs(30), conn).await;
            });
        }
    });
    Ok(())
}

fn reply(status: StatusCode, body: Value) -> Response<Full<Bytes>> {
    let mut text = serde_json::to_vec_pretty(&body).expect("JSON values serialise");
    text.push(b'\n');
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(text)))
        .expect("valid response")
}

fn error(status: StatusCode, message: &str) -> Response<Full<Bytes>> {
    reply(status, json!({ "error": message }))
}

/// Whether the request carries the token in the file. An unreadable or
/// empty token file refuses everything.
fn authorised<B>(req: &Request<B>, token_file: &std::path::Path) -> bool {
    let Ok(text) = std::fs::read_to_string(token_file) else {
        return false;
    };
    let token = text.lines().next().unwrap_or("").trim();
    if token.is_empty() {
        return false;
    }
    let given = req
        .headers()
        .get(hyper::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    given.as_bytes().ct_eq(token.as_bytes()).into()
}

/// The value of `key` in the query string, percent-decoded.
fn query<'a, B>(req: &'a Request<B>, key: &str) -> Option<String> {
    let q: &'a str = req.uri().query()?;
    q.split('&')
        .filter_map(|pair| pair.split_once('='))
        .find(|(k, _)| *k == key)
        .and_then(|(_, v)| percent_decode(v))
}

fn percent_decode(text: &str) -> Option<String> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' => {
                let hex = std::str::from_utf8(bytes.get(i + 1..i + 3)?).ok()?;
                out.push(u8::from_str_radix(hex, 16).ok()?);
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8(out).ok()
}

async fn handle<B>(req: &Request<B>, admin: &Admin, peer: SocketAddr) -> Response<Full<Bytes>> {
    if !authorised(req, &admin.token_file) {
        tracing::warn!(client = %peer, path = req.uri().path(), "admin request refused: no valid token");
        return error(StatusCode::UNAUTHORIZED, "a valid bearer token is required");
    }
    let path = req.uri().path().trim_end_matches('/');
    let segments: Vec<&str> = path.split('/').skip(1).collect();
    let method = req.method().clone();
    tracing::info!(client = %peer, %method, path, "admin request");
    match (method, segments.as_slice()) {
        (Method::GET, ["v1", "sessions"]) => sessions(admin),
        (Method::POST, ["v1", "sessions", "kick"]) => match query(req, "user") {
            Some(user) if !user.is_empty() => kick(admin, &user).await,
            _ => error(StatusCode::BAD_REQUEST, "give the user: ?user=NAME"),
        },
        (method, ["v1", "users", user, rest @ ..]) => {
            let Some(user) = percent_decode(user).filter(|u| !u.is_empty()) else {
                return error(
                    StatusCode::BAD_REQUEST,
                    "the user name in the path is not valid",
                );
            };
            users(req, admin, method, &user, rest).await
        }
        (Method::GET, ["v1", "backends"]) => backends(admin),
        (Method::POST, ["v1", "backends", name, action @ ("drain" | "undrain")]) => {
            let close_after = match query(req, "close_after") {
                None => None,
                Some(text) => match crate::config::parse_duration(&text) {
                    Ok(d) => Some(d),
                    Err(e) => return error(StatusCode::BAD_REQUEST, &format!("close_after: {e}")),
                },
            };
            let rt = admin.live.load();
            let Some(backend) = rt.pool.backends().into_iter().find(|b| b.name == *name) else {
                return error(StatusCode::NOT_FOUND, &format!("no backend `{name}`"));
            };
            let draining = *action == "drain";
            rt.cluster
                .drain(&backend.name, draining, close_after.filter(|_| draining))
                .await;
            reply(
                StatusCode::OK,
                json!({ "backend": backend.name, "draining": draining,
                        "close_after_seconds": close_after.map(|d| d.as_secs_f64()) }),
            )
        }
        (Method::GET, ["v1", "reload", "dry-run"]) => dry_run(admin).await,
        (Method::GET, ["v1", "config"]) => reply(
            StatusCode::OK,
            json!({ "version": admin.live.load().config.version }),
        ),
        (Method::POST, ["v1", "reload"]) => {
            let (tx, rx) = oneshot::channel();
            if admin.reload.send(tx).await.is_err() {
                return error(StatusCode::SERVICE_UNAVAILABLE, "shutting down");
            }
            match tokio::time::timeout(Duration::from_secs(60), rx).await {
                Ok(Ok(Ok(version))) => reply(
                    StatusCode::OK,
                    json!({ "result": "success", "version": version }),
                ),
                Ok(Ok(Err(e))) => reply(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    json!({ "result": "failure", "error": e }),
                ),
                _ => error(StatusCode::SERVICE_UNAVAILABLE, "the reload did not answer"),
            }
        }
        (_, ["v1", ..]) => error(StatusCode::NOT_FOUND, "no such endpoint"),
        _ => error(StatusCode::NOT_FOUND, "the API is under /v1/"),
    }
}

/// What the configuration file on disk would do to the users with live
/// sessions (on every replica, with a store): how many the hash would place
/// on another backend, and their sessions, by backend. Users whose sessions
/// are not where the hash puts them now (a directory entry, a pin,
/// failover) are counted apart: a pool change does not move them by itself.
async fn dry_run(admin: &Admin) -> Response<Full<Bytes>> {
    use std::collections::{BTreeMap, HashMap};
    let config = match crate::config::Config::load(&admin.config_path) {
        Ok(c) => c,
        Err(e) => {
            return reply(
                StatusCode::UNPROCESSABLE_ENTITY,
                json!({ "error": e.to_string() }),
            )
        }
    };
    let next = match crate::route::Pool::new(
        &config.backends,
        &crate::metrics::Metrics::new(),
        &|p| config.resolve(p),
        None,
    ) {
        Ok(p) => p,
        Err(e) => return reply(StatusCode::UNPROCESSABLE_ENTITY, json!({ "error": e })),
    };
    let rt = admin.live.load_full();
    let Some(sessions) = rt.cluster.all_sessions().await else {
        return error(
            StatusCode::SERVICE_UNAVAILABLE,
            "the cluster store is unreachable",
        );
    };
    // user → (backends now, sessions)
    let mut users: HashMap<String, (Vec<String>, usize)> = HashMap::new();
    for s in &sessions {
        let (Some(user), Some(backend)) = (s["user"].as_str(), s["backend"].as_str()) else {
            continue;
        };
        let entry = users.entry(user.to_owned()).or_default();
        entry.1 += 1;
        if !entry.0.iter().any(|b| b == backend) {
            entry.0.push(backend.to_owned());
        }
    }
    let (mut moving_users, mut moving_sessions, mut elsewhere) = (0, 0, 0);
    let mut by_backend: BTreeMap<String, (usize, usize)> = BTreeMap::new();
    for (user, (backends, count)) in &users {
        let now = rt.pool.hash_choice(user);
        if backends.len() != 1 || now.as_deref() != Some(backends[0].as_str()) {
            elsewhere += 1;
            continue;
        }
        let then = next.hash_choice(user);
        if then != now {
            moving_users += 1;
            moving_sessions += count;
            let to = then.unwrap_or_else(|| "(none)".into());
            let e = by_backend
                .entry(format!("{} -> {to}", backends[0]))
                .or_default();
            e.0 += 1;
            e.1 += count;
        }
    }
    let moves: Vec<Value> = by_backend
        .into_iter()
        .map(|(k, (u, n))| json!({ "move": k, "users": u, "sessions": n }))
        .collect();
    reply(
        StatusCode::OK,
        json!({
            "users_with_sessions": users.len(),
            "sessions": sessions.len(),
            "users_moving": moving_users,
            "sessions_moving": moving_sessions,
            "users_not_placed_by_the_hash": elsewhere,
            "moves": moves,
            "cluster": rt.cluster.is_shared(),
        }),
    )
}

/// Ends a user's sessions on every replica.
async fn kick(admin: &Admin, user: &str) -> Response<Full<Bytes>> {
    let cluster = Arc::clone(&admin.live.load().cluster);
    let kicked = cluster.kick(user, KickWhy::Admin).await;
    tracing::info!(user, kicked, "sessions ended by the administrator");
    reply(
        StatusCode::OK,
        json!({ "user": user, "kicked": kicked, "cluster": cluster.is_shared() }),
    )
}

fn duration_query<B>(
    req: &Request<B>,
    key: &str,
    default: Duration,
    most: Duration,
) -> Result<Duration, String> {
    match query(req, key) {
        None => Ok(default),
        Some(text) => match crate::config::parse_duration(&text) {
            Ok(d) if !d.is_zero() && d <= most => Ok(d),
            Ok(_) => Err(format!("{key}: above zero and at most {}s", most.as_secs())),
            Err(e) => Err(format!("{key}: {e}")),
        },
    }
}

/// The longest hold an administrator may set.
const MOST_HOLD: Duration = Duration::from_secs(600);

/// `/v1/users/NAME/...`: a user's sessions everywhere, and the steps of a
/// move (hold, kick, pin, release), alone or in one call.
async fn users<B>(
    req: &Request<B>,
    admin: &Admin,
    method: Method,
    user: &str,
    rest: &[&str],
) -> Response<Full<Bytes>> {
    let rt = admin.live.load_full();
    let cluster = Arc::clone(&rt.cluster);
    let unreachable = |e: String| error(StatusCode::SERVICE_UNAVAILABLE, &e);
    let known = |name: &str| rt.pool.backends().iter().any(|b| b.name == name);
    match (method, rest) {
        (Method::GET, ["sessions"]) => match cluster.sessions(user).await {
            Some(list) => reply(
                StatusCode::OK,
                json!({ "user": user, "cluster": cluster.is_shared(), "sessions": list }),
            ),
            None => unreachable("the cluster store is unreachable".into()),
        },
        (Method::POST, ["kick"]) => kick(admin, user).await,
        (Method::POST, ["hold"]) => {
            let hold = match duration_query(req, "for", Duration::from_secs(60), MOST_HOLD) {
                Ok(d) => d,
                Err(e) => return error(StatusCode::BAD_REQUEST, &e),
            };
            match cluster.hold(user, hold).await {
                Ok(()) => {
                    tracing::info!(
                        user,
                        hold_s = hold.as_secs(),
                        "user held by the administrator"
                    );
                    reply(
                        StatusCode::OK,
                        json!({ "user": user, "held_seconds": hold.as_secs_f64() }),
                    )
                }
                Err(e) => unreachable(e),
            }
        }
        (Method::POST, ["release"]) => match cluster.release_hold(user).await {
            Ok(()) => {
                tracing::info!(user, "user's hold released by the administrator");
                reply(StatusCode::OK, json!({ "user": user, "held": false }))
            }
            Err(e) => unreachable(e),
        },
        (Method::POST | Method::PUT, ["pin"]) => {
            let Some(backend) = query(req, "backend").filter(|b| known(b)) else {
                return error(
                    StatusCode::BAD_REQUEST,
                    "give a configured backend: ?backend=NAME",
                );
            };
            match cluster.pin(user, &backend).await {
                Ok(()) => {
                    tracing::info!(user, backend, "user pinned by the administrator");
                    reply(StatusCode::OK, json!({ "user": user, "pinned": backend }))
                }
                Err(e) => unreachable(e),
            }
        }
        (Method::DELETE, ["pin"]) => match cluster.unpin(user).await {
            Ok(()) => {
                tracing::info!(user, "user's pin removed by the administrator");
                reply(StatusCode::OK, json!({ "user": user, "pinned": null }))
            }
            Err(e) => unreachable(e),
        },
        (Method::POST, ["move"]) => {
            let Some(to) = query(req, "to").filter(|b| known(b)) else {
                return error(
                    StatusCode::BAD_REQUEST,
                    "give a configured backend: ?to=NAME",
                );
            };
            let hold = match duration_query(req, "hold", Duration::from_secs(30), MOST_HOLD) {
                Ok(d) => d,
                Err(e) => return error(StatusCode::BAD_REQUEST, &e),
            };
            move_user(&cluster, user, &to, hold).await
        }
        _ => error(StatusCode::NOT_FOUND, "no such endpoint"),
    }
}

/// Moves a user to `to`: new logins held, live sessions ended everywhere
/// with `* BYE [UNAVAILABLE]`, waited for (within the hold, at most 15 s),
/// the user pinned to `to`, the hold released.
async fn move_user(
    cluster: &Arc<crate::cluster::Cluster>,
    user: &str,
    to: &str,
    hold: Duration,
) -> Response<Full<Bytes>> {
    let started = tokio::time::Instant::now();
    let unreachable = |e: String| error(StatusCode::SERVICE_UNAVAILABLE, &e);
    let before = cluster.sessions(user).await.map(|l| l.len());
    let from: Vec<String> = match cluster.sessions(user).await {
        Some(list) => {
            let mut b: Vec<String> = list
                .iter()
                .filter_map(|s| s["backend"].as_str().map(str::to_owned))
                .collect();
            b.sort();
            b.dedup();
            b
        }
        None => Vec::new(),
    };
    if let Err(e) = cluster.hold(user, hold).await {
        return unreachable(e);
    }
    let kicked_here = cluster.kick(user, KickWhy::Moved).await;
    let wait = hold
        .saturating_sub(Duration::from_secs(1))
        .clamp(Duration::from_secs(1), Duration::from_secs(15));
    let deadline = started + wait;
    let left = loop {
        let left = cluster.sessions(user).await.map_or(0, |l| l.len());
        if left == 0 || tokio::time::Instant::now() >= deadline {
            break left;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let pinned = cluster.pin(user, to).await;
    let released = cluster.release_hold(user).await;
    if let Err(e) = pinned.and(released) {
        return unreachable(format!(
            "{e}; the hold ends by itself after {}s",
            hold.as_secs()
        ));
    }
    tracing::info!(
        user,
        to,
        ?from,
        kicked_here,
        left,
        "user moved by the administrator"
    );
    reply(
        StatusCode::OK,
        json!({
            "user": user,
            "to": to,
            "from": from,
            "sessions_before": before,
            "kicked_here": kicked_here,
            "sessions_left": left,
            "took_ms": started.elapsed().as_millis() as u64,
        }),
    )
}

fn sessions(admin: &Admin) -> Response<Full<Bytes>> {
    use std::sync::atomic::Ordering;
    let list: Vec<Value> = admin
        .registry
        .list()
        .iter()
        .map(|s| {
            json!({
                "id": s.id,
                "user": s.user,
                "client": s.client.to_string(),
                "listener": s.listener,
                "protocol": s.protocol.as_str(),
                "backend": s.backend,
                "started_unix": s.started.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs()),
                "bytes_in": s.bytes_in.load(Ordering::Relaxed),
                "bytes_out": s.bytes_out.load(Ordering::Relaxed),
            })
        })
        .collect();
    reply(StatusCode::OK, json!({ "sessions": list }))
}

fn backends(admin: &Admin) -> Response<Full<Bytes>> {
    let list: Vec<Value> = admin
        .live
        .load()
        .pool
        .backends()
        .iter()
        .map(|b| {
            json!({
                "name": b.name,
                "address": b.address,
                "weight": b.weight,
                "up": b.is_up(),
                "draining": b.is_draining(),
                "active_sessions": b.active_sessions(),
            })
        })
        .collect();
    reply(StatusCode::OK, json!({ "backends": list }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_values_are_percent_decoded() {
        assert_eq!(
            percent_decode("alice%40example.com").as_deref(),
            Some("alice@example.com")
        );
        assert_eq!(percent_decode("a+b").as_deref(), Some("a b"));
        assert_eq!(percent_decode("bad%4"), None);
        assert_eq!(percent_decode("%zz"), None);
    }
}
