//! Listeners and their accept loops. An accept loop only accepts: the TLS
//! handshake and everything after it run in the connection's own task, so
//! one slow client never delays another. Each connection gets the runtime
//! snapshot that is current when it is accepted.

use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, Semaphore};

use crate::config::Listener as ListenerConfig;
use crate::latch::Latch;
use crate::live::Live;
use crate::registry::Registry;
use crate::session::{self, ListenerInfo};
use crate::shutdown::Shutdown;

/// A bound listening socket, shared by every worker thread: what its
/// sessions are told (replaced when a reload changes a listener's options)
/// and a latch that closes it (when a reload removes or moves it).
pub struct BoundListener {
    pub socket: std::net::TcpListener,
    pub info: Arc<ArcSwap<ListenerInfo>>,
    pub closed: Arc<Latch>,
    pub config: ListenerConfig,
}

impl BoundListener {
    /// Another handle on the same socket, for another worker.
    pub fn share(&self) -> std::io::Result<BoundListener> {
        Ok(BoundListener {
            socket: self.socket.try_clone()?,
            info: Arc::clone(&self.info),
            closed: Arc::clone(&self.closed),
            config: self.config.clone(),
        })
    }
}

fn info_of(l: &ListenerConfig) -> ListenerInfo {
    ListenerInfo {
        name: l.name.clone(),
        tls: l.tls,
        protocol: l.protocol,
        allow_plaintext_auth: l.allow_plaintext_auth,
        proxy_protocol: l.proxy_protocol.clone(),
    }
}

/// Binds one listener.
pub fn bind(l: &ListenerConfig) -> std::io::Result<BoundListener> {
    let socket = listen(l.bind).map_err(|e| {
        std::io::Error::new(
            e.kind(),
            format!("listener `{}` cannot bind {}: {e}", l.name, l.bind),
        )
    })?;
    tracing::info!(listener = %l.name, bind = %socket.local_addr()?, tls = %l.tls, protocol = %l.protocol, "listening");
    Ok(BoundListener {
        socket,
        info: Arc::new(ArcSwap::from_pointee(info_of(l))),
        closed: Arc::new(Latch::default()),
        config: l.clone(),
    })
}

/// Binds every configured listener; fails if any address cannot be bound.
pub fn bind_all(listeners: &[ListenerConfig]) -> std::io::Result<Vec<BoundListener>> {
    listeners.iter().map(bind).collect()
}

/// What the control thread tells a worker.
pub enum WorkerCommand {
    /// Accept on this listener too.
    Listen(BoundListener),
}

/// The listeners of the process, kept by the control thread so a reload
/// can add, change and remove them while the workers run.
pub struct Listeners {
    bound: Vec<BoundListener>,
    workers: Vec<mpsc::UnboundedSender<WorkerCommand>>,
}

impl Listeners {
    pub fn new(
        bound: Vec<BoundListener>,
        workers: Vec<mpsc::UnboundedSender<WorkerCommand>>,
    ) -> Self {
        Listeners { bound, workers }
    }

    /// Closes every listener (their sessions go on).
    pub fn close_all(&mut self) {
        for b in self.bound.drain(..) {
            b.closed.set();
        }
    }

    /// Brings the listeners in line with `wanted`, matched by name. New
    /// addresses are bound first: if one cannot be, nothing changes and the
    /// error says why. Then the workers take the new sockets, listeners
    /// whose options changed get them for their next connection, and
    /// removed or moved listeners stop accepting (their sessions go on).
    pub fn apply(&mut self, wanted: &[ListenerConfig]) -> Result<(), String> {
        let mut fresh = Vec::new();
        for l in wanted {
            let same_socket = self
                .bound
                .iter()
                .any(|b| b.config.name == l.name && b.config.bind == l.bind);
            if !same_socket {
                fresh.push(bind(l).map_err(|e| e.to_string())?);
            }
        }
        self.bound.retain(|b| {
            let Some(l) = wanted
                .iter()
                .find(|l| l.name == b.config.name && l.bind == b.config.bind)
            else {
                tracing::info!(listener = %b.config.name, bind = %b.config.bind, "listener closed");
                b.closed.set();
                return false;
            };
            if *l != b.config {
                b.info.store(Arc::new(info_of(l)));
                tracing::info!(listener = %l.name, "listener options changed");
            }
            true
        });
        for b in &mut self.bound {
            if let Some(l) = wanted.iter().find(|l| l.name == b.config.name) {
                b.config = l.clone();
            }
        }
        for l in fresh {
            for worker in &self.workers {
                match l.share() {
                    Ok(shared) => {
                        let _ = worker.send(WorkerCommand::Listen(shared));
                    }
                    Err(e) => {
                        tracing::error!(listener = %l.config.name, error = %e, "cannot share a listener with a worker")
                    }
                }
            }
            self.bound.push(l);
        }
        Ok(())
    }
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
    mut commands: mpsc::UnboundedReceiver<WorkerCommand>,
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
                let listen = |l: BoundListener| match TcpListener::from_std(l.socket) {
                    Ok(socket) => {
                        tokio::spawn(accept_loop(
                            socket,
                            l.info,
                            l.closed,
                            Arc::clone(&live),
                            Arc::clone(&slots),
                            Arc::clone(&shutdown),
                            Arc::clone(&registry),
                        ));
                    }
                    Err(e) => {
                        tracing::error!(worker = index, listener = %l.config.name, error = %e, "cannot register listener");
                        std::process::exit(1);
                    }
                };
                for l in listeners {
                    listen(l);
                }
                while let Some(command) = commands.recv().await {
                    match command {
                        WorkerCommand::Listen(l) => listen(l),
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
    info: Arc<ArcSwap<ListenerInfo>>,
    closed: Arc<Latch>,
    live: Live,
    slots: Arc<Semaphore>,
    shutdown: Arc<Shutdown>,
    registry: Arc<Registry>,
) {
    loop {
        let accepted = tokio::select! {
            biased;
            _ = shutdown.accepting_stopped() => break,
            _ = closed.wait() => break,
            accepted = socket.accept() => accepted,
        };
        match accepted {
            Ok((tcp, peer)) => {
                let rt = live.load_full();
                let info = info.load_full();
                let Ok(slot) = Arc::clone(&slots).try_acquire_owned() else {
                    rt.metrics
                        .connections_rejected
                        .with_label_values(&[&info.name])
                        .inc();
                    tracing::warn!(listener = %info.name, client = %peer, "connection limit reached; closing new connection");
                    if info.tls == crate::config::ListenerTls::Starttls {
                        // Best effort, never waits: the socket buffer is empty.
                        let busy: &[u8] = match info.protocol {
                            crate::config::Protocol::Imap => {
                                b"* BYE [UNAVAILABLE] Server busy, try again later\r\n"
                            }
                            crate::config::Protocol::Pop3 => {
                                b"-ERR [SYS/TEMP] Server busy, try again later\r\n"
                            }
                            crate::config::Protocol::Submission => {
                                b"421 4.3.2 Server busy, try again later\r\n"
                            }
                            crate::config::Protocol::Managesieve => {
                                b"BYE (TRYLATER) \"Server busy, try again later\"\r\n"
                            }
                        };
                        let _ = tcp.try_write(busy);
                    }
                    continue;
                };
                let shutdown = Arc::clone(&shutdown);
                let registry = Arc::clone(&registry);
                tokio::spawn(async move {
                    session::run(tcp, peer, info, rt, shutdown, registry).await;
                    drop(slot);
                });
            }
            Err(e) => {
                // Out of file descriptors or similar: back off instead of spinning.
                tracing::warn!(listener = %info.load().name, error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}
