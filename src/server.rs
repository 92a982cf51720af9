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
use crate::session::{self, ListenerInfo};

/// A bound listening socket of one worker thread.
pub struct BoundListener {
    pub socket: std::net::TcpListener,
    pub info: Arc<ListenerInfo>,
}

/// Binds every configured listener once per worker; fails if any address
/// cannot be bound. With several workers each gets its own socket on the
/// same address (SO_REUSEPORT), so the kernel spreads new connections over
/// them and no worker wakes for a connection another one takes.
pub fn bind_all(
    listeners: &[ListenerConfig],
    workers: usize,
) -> std::io::Result<Vec<Vec<BoundListener>>> {
    let mut per_worker: Vec<Vec<BoundListener>> = (0..workers.max(1)).map(|_| Vec::new()).collect();
    for l in listeners {
        let named = |e: std::io::Error| {
            std::io::Error::new(
                e.kind(),
                format!("listener `{}` cannot bind {}: {e}", l.name, l.bind),
            )
        };
        let info = Arc::new(ListenerInfo {
            name: l.name.clone(),
            tls: l.tls,
            allow_plaintext_auth: l.allow_plaintext_auth,
        });
        // A plain bind first: it fails if another process holds the address,
        // which SO_REUSEPORT alone would hide by sharing the port with it.
        let first = listen(l.bind, false).map_err(named)?;
        let local = first.local_addr()?;
        tracing::info!(listener = %l.name, bind = %local, tls = %l.tls, "listening");
        if per_worker.len() == 1 {
            per_worker[0].push(BoundListener {
                socket: first,
                info,
            });
            continue;
        }
        drop(first);
        for worker in per_worker.iter_mut() {
            worker.push(BoundListener {
                socket: listen(local, true).map_err(named)?,
                info: Arc::clone(&info),
            });
        }
    }
    Ok(per_worker)
}

/// Pending connections the kernel may queue per listener (capped by
/// `net.core.somaxconn`): room for a reconnect storm while workers accept.
const BACKLOG: i32 = 4096;

fn listen(addr: std::net::SocketAddr, reuse_port: bool) -> std::io::Result<std::net::TcpListener> {
    use socket2::{Domain, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    socket.set_reuse_address(true)?;
    if reuse_port {
        socket.set_reuse_port(true)?;
    }
    if addr.is_ipv6() {
        // `[::]` serves IPv4 too, as operators expect from one listener.
        socket.set_only_v6(false)?;
    }
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(BACKLOG)?;
    Ok(socket.into())
}

/// Runs one worker: a single-threaded runtime that accepts on its own
/// sockets and runs the sessions it accepted, start to end, so a session's
/// wake-ups never cross threads.
pub fn run_worker(
    index: usize,
    listeners: Vec<BoundListener>,
    live: Live,
    slots: Arc<Semaphore>,
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
                            tokio::spawn(accept_loop(socket, l.info, Arc::clone(&live), Arc::clone(&slots)));
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

/// Accepts connections until the process ends. `slots` caps open client
/// connections across all listeners; a connection over the cap is closed
/// at once (on a plain listener after a `* BYE`).
pub async fn accept_loop(
    socket: TcpListener,
    info: Arc<ListenerInfo>,
    live: Live,
    slots: Arc<Semaphore>,
) {
    loop {
        match socket.accept().await {
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
                tokio::spawn(async move {
                    session::run(tcp, peer, info, rt).await;
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
