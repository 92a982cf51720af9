//! Listeners and their accept loops. An accept loop only accepts: the TLS
//! handshake and everything after it run in the connection's own task, so
//! one slow client never delays another. Each connection gets the runtime
//! snapshot that is current when it is accepted.

use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::Semaphore;

use crate::config::Listener as ListenerConfig;
use crate::live::Live;
use crate::registry::Registry;
use crate::session::{self, ListenerInfo};
use crate::shutdown::Shutdown;

/// A bound listening socket, shared by every worker thread.
pub struct BoundListener {
    pub socket: std::net::TcpListener,
    pub info: Arc<ListenerInfo>,
}

/// Binds every configured listener; fails if any address cannot be bound.
pub fn bind_all(listeners: &[ListenerConfig]) -> std::io::Result<Vec<BoundListener>> {
    let mut bound = Vec::with_capacity(listeners.len());
    for l in listeners {
        let socket = listen(l.bind).map_err(|e| {
            std::io::Error::new(
                e.kind(),
                format!("listener `{}` cannot bind {}: {e}", l.name, l.bind),
            )
        })?;
        tracing::info!(listener = %l.name, bind = %socket.local_addr()?, tls = %l.tls, "listening");
        bound.push(BoundListener {
            socket,
            info: Arc::new(ListenerInfo {
                name: l.name.clone(),
                tls: l.tls,
                allow_plaintext_auth: l.allow_plaintext_auth,
                proxy_protocol: l.proxy_protocol.clone(),
            }),
        });
    }
    Ok(bound)
}

/// Pending connections the kernel may queue per listener (capped by
/// `net.core.somaxconn`): room for a reconnect storm while workers accept.
const BACKLOG: i32 = 4096;

fn listen(addr: std::net::SocketAddr) -> std::io::Result<std::net::TcpListener> {
    use socket2::{Domain, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    socket.set_reuse_address(true)?;
    if addr.is_ipv6() {
        // `[::]` serves IPv4 too, as operators expect from one listener.
        socket.set_only_v6(false)?;
    }
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(BACKLOG)?;
    Ok(socket.into())
}

/// Runs one worker: a single-threaded runtime that accepts on every
/// listener and runs the sessions it accepted, start to end. Workers share
/// the listening sockets, so whichever is free takes the next connection,
/// and a session's wake-ups never cross threads.
pub fn run_worker(
    index: usize,
    listeners: Vec<BoundListener>,
    live: Live,
    slots: Arc<Semaphore>,
    shutdown: Arc<Shutdown>,
    registry: Arc<Registry>,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new()
        .name(format!("postern-worker-{index}"))
        .spawn(move || {
            let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
                Ok(r) => r,
                Err(e) => {
                    tracing::error!(worker = index, error = %e, "cannot start a worker runtime");
                    std::process::exit(1);
                }
            };
            runtime.block_on(async move {
                for l in listeners {
                    match TcpListener::from_std(l.socket) {
                        Ok(socket) => {
                            tokio::spawn(accept_loop(
                                socket,
                                l.info,
                                Arc::clone(&live),
                                Arc::clone(&slots),
                                Arc::clone(&shutdown),
                                Arc::clone(&registry),
                            ));
                        }
                        Err(e) => {
                            tracing::error!(worker = index, listener = %l.info.name, error = %e, "cannot register listener");
                            std::process::exit(1);
                        }
                    }
                }
                std::future::pending::<()>().await
            })
        })
}

/// Accepts connections until shutdown begins, then closes the listening
/// socket. `slots` caps open client connections across all listeners; a
/// connection over the cap is closed at once (on a plain listener after a
/// `* BYE`).
pub async fn accept_loop(
    socket: TcpListener,
    info: Arc<ListenerInfo>,
    live: Live,
    slots: Arc<Semaphore>,
    shutdown: Arc<Shutdown>,
    registry: Arc<Registry>,
) {
    loop {
        let accepted = tokio::select! {
            biased;
            _ = shutdown.accepting_stopped() => break,
            accepted = socket.accept() => accepted,
        };
        match accepted {
            Ok((tcp, peer)) => {
                let rt = live.load_full();
                let Ok(slot) = Arc::clone(&slots).try_acquire_owned() else {
                    rt.metrics
                        .connections_rejected
                        .with_label_values(&[&info.name])
                        .inc();
                    tracing::warn!(listener = %info.name, client = %peer, "connection limit reached; closing new connection");
                    if info.tls == crate::config::ListenerTls::Starttls {
                        // Best effort, never waits: the socket buffer is empty.
                        let _ =
                            tcp.try_write(b"* BYE [UNAVAILABLE] Server busy, try again later\r\n");
                    }
                    continue;
                };
                let info = Arc::clone(&info);
                let shutdown = Arc::clone(&shutdown);
                let registry = Arc::clone(&registry);
                tokio::spawn(async move {
                    session::run(tcp, peer, info, rt, shutdown, registry).await;
                    drop(slot);
                });
            }
            Err(e) => {
                // Out of file descriptors or similar: back off instead of spinning.
                tracing::warn!(listener = %info.name, error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}
