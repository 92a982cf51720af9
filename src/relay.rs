//! The byte pump after login: client and backend bytes both ways, untouched
//! (IDLE, COMPRESS=DEFLATE and large literals pass as they are), counted per
//! direction as they flow.
//!
//! Each direction runs on its own, so a side that is busy writing never stops
//! the other from reading. When one side ends its stream, the other side's
//! write half is shut down (the half-close is passed on) and the remaining
//! direction may finish within `linger`. A session with no bytes in either
//! direction for `idle` is closed.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use prometheus::IntCounter;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::time::Instant;

/// Per-direction buffer. One read's worth; a full TLS record is 16 KiB.
const BUFFER: usize = 16 * 1024;

/// How long the other direction may go on after one side has closed.
pub const LINGER: Duration = Duration::from_secs(30);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RelayEnd {
    ClientClosed,
    BackendClosed,
    IdleTimeout,
    ClientError,
    BackendError,
}

impl RelayEnd {
    pub fn as_str(self) -> &'static str {
        match self {
            RelayEnd::ClientClosed => "client_closed",
            RelayEnd::BackendClosed => "backend_closed",
            RelayEnd::IdleTimeout => "idle_timeout",
            RelayEnd::ClientError => "client_error",
            RelayEnd::BackendError => "backend_error",
        }
    }
}

#[derive(Debug, Clone, Copy)]
pub struct RelayOutcome {
    pub client_to_backend: u64,
    pub backend_to_client: u64,
    pub end: RelayEnd,
}

pub struct Counters {
    pub client_to_backend: IntCounter,
    pub backend_to_client: IntCounter,
}

/// Relays until both directions have ended, the idle limit passes, or an
/// error ends the session.
pub async fn relay<C, B>(client: C, backend: B, idle: Duration, counters: &Counters) -> RelayOutcome
where
    C: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    let start = Instant::now();
    let last_activity = AtomicU64::new(0);
    let (mut client_rx, mut client_tx) = tokio::io::split(client);
    let (mut backend_rx, mut backend_tx) = tokio::io::split(backend);
    let mut up_bytes = 0u64;
    let mut down_bytes = 0u64;

    let end = {
        let up = pump(
            &mut client_rx,
            &mut backend_tx,
            &mut up_bytes,
            &counters.client_to_backend,
            &last_activity,
            start,
        );
        let down = pump(
            &mut backend_rx,
            &mut client_tx,
            &mut down_bytes,
            &counters.backend_to_client,
            &last_activity,
            start,
        );
        tokio::pin!(up, down);

        // Who closed first; once one side has, the session ends on its account.
        let mut closed: Option<RelayEnd> = None;
        let mut limit = idle;
        loop {
            let since = start + Duration::from_millis(last_activity.load(Ordering::Relaxed));
            tokio::select! {
                r = &mut up, if closed != Some(RelayEnd::ClientClosed) => match (closed, r) {
                    (Some(first), _) => break first,
                    (None, PumpEnd::Eof) => closed = Some(RelayEnd::ClientClosed),
                    (None, PumpEnd::ReadError) => break RelayEnd::ClientError,
                    (None, PumpEnd::WriteError) => break RelayEnd::BackendError,
                },
                r = &mut down, if closed != Some(RelayEnd::BackendClosed) => match (closed, r) {
                    (Some(first), _) => break first,
                    (None, PumpEnd::Eof) => closed = Some(RelayEnd::BackendClosed),
                    (None, PumpEnd::ReadError) => break RelayEnd::BackendError,
                    (None, PumpEnd::WriteError) => break RelayEnd::ClientError,
                },
                _ = tokio::time::sleep_until(since + limit) => {
                    let since = start + Duration::from_millis(last_activity.load(Ordering::Relaxed));
                    if Instant::now() >= since + limit {
                        break closed.unwrap_or(RelayEnd::IdleTimeout);
                    }
                }
            }
            if closed.is_some() {
                limit = limit.min(LINGER);
            }
        }
    };
    RelayOutcome {
        client_to_backend: up_bytes,
        backend_to_client: down_bytes,
        end,
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PumpEnd {
    Eof,
    ReadError,
    WriteError,
}

async fn pump<R, W>(
    rx: &mut R,
    tx: &mut W,
    total: &mut u64,
    counter: &IntCounter,
    last_activity: &AtomicU64,
    start: Instant,
) -> PumpEnd
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut buf = vec![0u8; BUFFER];
    loop {
        let n = match rx.read(&mut buf).await {
            Ok(0) => {
                // Pass the half-close on; the peer may still be sending.
                let _ = tx.shutdown().await;
                return PumpEnd::Eof;
            }
            Ok(n) => n,
            // A TLS peer that closes without close_notify has still closed.
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                let _ = tx.shutdown().await;
                return PumpEnd::Eof;
            }
            Err(_) => return PumpEnd::ReadError,
        };
        last_activity.store(start.elapsed().as_millis() as u64, Ordering::Relaxed);
        if tx.write_all(&buf[..n]).await.is_err() || tx.flush().await.is_err() {
            return PumpEnd::WriteError;
        }
        last_activity.store(start.elapsed().as_millis() as u64, Ordering::Relaxed);
        *total += n as u64;
        counter.inc_by(n as u64);
    }
}
