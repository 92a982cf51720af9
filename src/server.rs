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

/// Binds every configured listener; fails if any address cannot be bound.
pub async fn bind_all(
    listeners: &[ListenerConfig],
) -> std::io::Result<Vec<(TcpListener, Arc<ListenerInfo>)>> {
    let mut bound = Vec::with_capacity(listeners.len());
    for l in listeners {
        let socket = TcpListener::bind(l.bind).await.map_err(|e| {
            std::io::Error::new(
                e.kind(),
                format!("listener `{}` cannot bind {}: {e}", l.name, l.bind),
            )
        })?;
        tracing::info!(listener = %l.name, bind = %socket.local_addr()?, tls = %l.tls, "listening");
        bound.push((
            socket,
            Arc::new(ListenerInfo {
                name: l.name.clone(),
                tls: l.tls,
                allow_plaintext_auth: l.allow_plaintext_auth,
            }),
        ));
    }
    Ok(bound)
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
