//! The admin API: JSON over HTTP on its own listener (loopback by
//! default), every request carrying `Authorization: Bearer <token>` with
//! the token from `admin.token_file`, read on each request so it can be
//! rotated in place. Answers are small and bounded; a connection is held
//! at most 30 s.
//!
//! | method and path | does |
//! |---|---|
//! | `GET /v1/sessions` | logged-in sessions: id, user, client, listener, protocol, backend, start, bytes |
//! | `POST /v1/sessions/kick?user=NAME` | ends the user's sessions with `* BYE` |
//! | `GET /v1/backends` | every backend with its health, drain and session count |
//! | `POST /v1/backends/NAME/drain[?close_after=30s]` | no new sessions; optionally close the rest after the grace period |
//! | `POST /v1/backends/NAME/undrain` | takes sessions again |
//! | `GET /v1/config` | the live configuration's version |
//! | `POST /v1/reload` | reloads the configuration, answers with the result |

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
            Some(user) if !user.is_empty() => {
                let kicked = admin.registry.kick_user(&user);
                tracing::info!(user, kicked, "sessions ended by the administrator");
                reply(StatusCode::OK, json!({ "user": user, "kicked": kicked }))
            }
            _ => error(StatusCode::BAD_REQUEST, "give the user: ?user=NAME"),
        },
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
            backend.set_draining(draining, close_after.filter(|_| draining));
            reply(
                StatusCode::OK,
                json!({ "backend": backend.name, "draining": draining,
                        "close_after_seconds": close_after.map(|d| d.as_secs_f64()) }),
            )
        }
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
