//! The byte pump after login: client and backend bytes both ways, never
//! changed (IDLE, COMPRESS=DEFLATE and large literals pass as they are),
//! counted per direction as they flow.
//!
//! One future drives both directions, so a side that is busy writing never
//! stops the other from reading, and no second task or lock is needed. An
//! idle session holds no buffer: a direction borrows one from the
//! per-thread pool in [`crate::buffer`] only for the moment a read returns
//! data, and gives it back once the data is written, so hundreds of
//! thousands of IDLE sessions cost their sockets and TLS state, not
//! 2 × 64 KiB each.
//!
//! Every byte read is shown to the protocol's watch (a [`Follow`]:
//! [`crate::imap::watch`], [`crate::pop3::watch`]), which follows where the
//! backend's responses end, through IMAP's COMPRESS=DEFLATE too. It decides two things: a backend's end of stream after its `* BYE`
//! (POP3: its answer to QUIT) is an orderly close, any other is a lost
//! backend; and when the caller's
//! `stop` resolves, the relay stops reading the client, lets the response
//! the backend is sending finish (within [`FINISH`]), and hands back a
//! [`Farewell`] saying whether and how a `* BYE` may still be written. The
//! client never gets Postern's words inside a literal or a compressed
//! stream.
//!
//! When one side ends its stream, the other side's write half is shut down
//! (the half-close is passed on) and the remaining direction may finish
//! within [`LINGER`]. A session with no bytes in either direction for `idle`
//! is closed.

use std::future::{poll_fn, Future};
use std::io::ErrorKind;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use prometheus::IntCounter;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Instant;

use crate::buffer::{self, give as give_buffer, take as take_buffer};
pub use crate::imap::watch::Farewell;

/// A protocol's view of a relayed session: where the backend's responses
/// end, and whether Postern may still write to the client. It only
/// follows; when it cannot, it gives up, and Postern stays silent.
pub trait Follow {
    /// Bytes the client sent towards the backend.
    fn client_sent(&mut self, chunk: &[u8]);
    /// Bytes the backend sent towards the client. With `stop_at_boundary`
    /// the stream is followed only up to its first response boundary, whose
    /// offset is returned: the client must get no byte past it.
    fn backend_sent(&mut self, chunk: &[u8], stop_at_boundary: bool) -> Option<usize>;
    /// The backend said its last word: an end of its stream now is orderly.
    fn bye_seen(&self) -> bool;
    /// Whether the streams are still followed (the watch has not given up).
    fn following(&self) -> bool;
    /// Whether the backend's stream so far ends at a response boundary.
    fn at_boundary(&self) -> bool;
    /// What Postern may write now, if the client has every byte fed so far.
    fn farewell(&mut self) -> Farewell;
    /// Whether a shadow inflater is held (and could be parked).
    fn inflating(&self) -> bool {
        false
    }
    /// Parks the shadow inflater while the backend is quiet; whether it did.
    fn park(&mut self) -> bool {
        false
    }
    /// Whether the backend's stream is compressed.
    fn compressed(&self) -> bool {
        false
    }
    /// The client completed a command Postern must not pass on (SMTP's
    /// `XCLIENT` after login would let it claim another user): the chunk
    /// that completed it is not written, and the session ends.
    fn forbidden(&self) -> bool {
        false
    }
    /// Once stopped, how long the backend's response in flight may take
    /// to finish.
    fn finish_within(&self) -> Duration {
        FINISH
    }
}

/// How long the other direction may go on after one side has closed.
pub const LINGER: Duration = Duration::from_secs(30);

/// How long a response the backend is sending may take to finish once the
/// relay is stopped; after it the client's connection is closed mid-response,
/// without a word.
pub const FINISH: Duration = Duration::from_secs(2);

/// How long the backend of a compressed session must be quiet before the
/// watch's shadow inflater is parked (its window kept deflated).
pub const PARK_AFTER: Duration = Duration::from_secs(10);

/// Why the caller stopped the relay.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopCause {
    /// Postern is shutting down and its drain time is over.
    Shutdown,
    /// An administrator ended the session.
    Kicked,
    /// An administrator is moving the user to another backend.
    Moved,
    /// The backend is being drained and its grace period is over.
    Drained,
    /// Health checks took the backend down.
    BackendDown,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RelayEnd {
    ClientClosed,
    BackendClosed,
    IdleTimeout,
    ClientError,
    BackendError,
    /// The caller's `stop` future resolved, for this reason.
    Stopped(StopCause),
    /// The backend closed without saying `* BYE` first: it went away. The
    /// client's side is left open for the caller to say so.
    BackendLost,
    /// The client sent a command Postern does not pass on after login.
    Forbidden,
}

impl RelayEnd {
    pub fn as_str(self) -> &'static str {
        match self {
            RelayEnd::ClientClosed => "client_closed",
            RelayEnd::BackendClosed => "backend_closed",
            RelayEnd::IdleTimeout => "idle_timeout",
            RelayEnd::ClientError => "client_error",
            RelayEnd::BackendError => "backend_error",
            RelayEnd::Stopped(StopCause::Shutdown) => "shutdown",
            RelayEnd::Stopped(StopCause::Kicked) => "kicked",
            RelayEnd::Stopped(StopCause::Moved) => "moved",
            RelayEnd::Stopped(StopCause::Drained) => "backend_drained",
            RelayEnd::Stopped(StopCause::BackendDown) => "backend_down",
            RelayEnd::BackendLost => "backend_lost",
            RelayEnd::Forbidden => "forbidden_command",
        }
    }
}

pub struct RelayOutcome {
    pub client_to_backend: u64,
    pub backend_to_client: u64,
    pub end: RelayEnd,
    /// Whether and how Postern may still write to the client.
    pub farewell: Farewell,
    /// The session had turned COMPRESS=DEFLATE on.
    pub compressed: bool,
    /// The client spoke last: it sent bytes after the backend's last ones,
    /// so it is likely waiting for an answer (a command in flight), not
    /// idling (IMAP IDLE's `+` came from the backend).
    pub client_waiting: bool,
}

pub struct Counters {
    pub client_to_backend: IntCounter,
    pub backend_to_client: IntCounter,
    /// The session's own running totals (for the admin API), when kept.
    pub session: Option<(Arc<AtomicU64>, Arc<AtomicU64>)>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PumpEnd {
    Eof,
    /// End of stream from a backend that had not said `* BYE`: it went
    /// away. The half-close is not passed on; the caller tells the client.
    Lost,
    ReadError,
    WriteError,
    /// Stopping: the backend's stream stands at a response boundary and
    /// the client has every byte read up to it.
    Boundary,
    /// The client completed a command that is not passed on.
    Forbidden,
}

enum State {
    Reading,
    Writing {
        buf: Vec<u8>,
        start: usize,
        end: usize,
    },
    ShuttingDown,
    Done(PumpEnd),
}

/// One direction of the relay.
struct Pump {
    state: State,
    /// Bytes written that the writer may still hold (TLS): flushed before
    /// the pump waits for more input.
    unflushed: bool,
    total: u64,
    counter: IntCounter,
    tally: Option<Arc<AtomicU64>>,
    /// Backend to client (the other way: client to backend).
    from_backend: bool,
    /// The relay is stopping: end at the backend's next response boundary.
    stopping: bool,
    /// Reads that brought bytes.
    reads: u64,
}

impl Pump {
    fn new(counter: IntCounter, tally: Option<Arc<AtomicU64>>, from_backend: bool) -> Self {
        Pump {
            state: State::Reading,
            unflushed: false,
            total: 0,
            counter,
            tally,
            from_backend,
            stopping: false,
            reads: 0,
        }
    }

    /// At end of input: pass the half-close on, or report a lost backend.
    fn at_end<W: Follow>(&mut self, watch: &W) -> Option<PumpEnd> {
        if self.from_backend && !watch.bye_seen() {
            return Some(self.finish(PumpEnd::Lost));
        }
        self.state = State::ShuttingDown;
        None
    }

    /// Whether the client has every byte this direction read: nothing is
    /// half written, and the client's write half is still open.
    fn delivered(&self) -> bool {
        matches!(
            self.state,
            State::Reading | State::Done(PumpEnd::Lost | PumpEnd::ReadError | PumpEnd::Boundary)
        )
    }

    /// Moves bytes from `rx` to `tx` until one of them is not ready.
    /// Ready once this direction is over.
    fn poll<R, W, F>(
        &mut self,
        cx: &mut Context<'_>,
        rx: &mut R,
        tx: &mut W,
        active: &mut bool,
        watch: &mut F,
    ) -> Poll<PumpEnd>
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
        F: Follow,
    {
        loop {
            match &mut self.state {
                State::Reading => {
                    // After the backend's own BYE, its stream runs to its end.
                    if self.stopping && watch.at_boundary() && !watch.bye_seen() {
                        return Poll::Ready(self.finish(PumpEnd::Boundary));
                    }
                    let mut buf = take_buffer();
                    let mut read = ReadBuf::new(&mut buf[..buffer::READ]);
                    match Pin::new(&mut *rx).poll_read(cx, &mut read) {
                        Poll::Pending => {
                            give_buffer(buf);
                            if self.unflushed {
                                match Pin::new(&mut *tx).poll_flush(cx) {
                                    Poll::Ready(Ok(())) => self.unflushed = false,
                                    Poll::Ready(Err(_)) => {
                                        return Poll::Ready(self.finish(PumpEnd::WriteError))
                                    }
                                    Poll::Pending => {}
                                }
                            }
                            return Poll::Pending;
                        }
                        Poll::Ready(Ok(())) if read.filled().is_empty() => {
                            give_buffer(buf);
                            if let Some(end) = self.at_end(watch) {
                                return Poll::Ready(end);
                            }
                        }
                        Poll::Ready(Ok(())) => {
                            self.reads += 1;
                            let mut end = read.filled().len();
                            if !self.from_backend {
                                watch.client_sent(read.filled());
                                if watch.forbidden() {
                                    // Not written: the backend never gets the
                                    // command's line end.
                                    give_buffer(buf);
                                    return Poll::Ready(self.finish(PumpEnd::Forbidden));
                                }
                            } else if let Some(cut) =
                                watch.backend_sent(read.filled(), self.stopping)
                            {
                                // The bytes after the boundary are never sent.
                                end = cut;
                            }
                            *active = true;
                            if end == 0 {
                                give_buffer(buf);
                                continue;
                            }
                            self.state = State::Writing { buf, start: 0, end };
                        }
                        // A TLS peer that closes without close_notify has still closed.
                        Poll::Ready(Err(e)) if e.kind() == ErrorKind::UnexpectedEof => {
                            give_buffer(buf);
                            if let Some(end) = self.at_end(watch) {
                                return Poll::Ready(end);
                            }
                        }
                        // A backend that closes with input unread (a
                        // client pipelining past LOGOUT) resets the
                        // connection; after its BYE that is an orderly end.
                        Poll::Ready(Err(_)) if self.from_backend && watch.bye_seen() => {
                            give_buffer(buf);
                            if let Some(end) = self.at_end(watch) {
                                return Poll::Ready(end);
                            }
                        }
                        Poll::Ready(Err(_)) => {
                            give_buffer(buf);
                            return Poll::Ready(self.finish(PumpEnd::ReadError));
                        }
                    }
                }
                State::Writing { buf, start, end } => {
                    match Pin::new(&mut *tx).poll_write(cx, &buf[*start..*end]) {
                        Poll::Pending => return Poll::Pending,
                        Poll::Ready(Ok(0)) | Poll::Ready(Err(_)) => {
                            return Poll::Ready(self.finish(PumpEnd::WriteError))
                        }
                        Poll::Ready(Ok(n)) => {
                            *start += n;
                            self.total += n as u64;
                            self.counter.inc_by(n as u64);
                            if let Some(tally) = &self.tally {
                                tally.fetch_add(n as u64, Ordering::Relaxed);
                            }
                            self.unflushed = true;
                            *active = true;
                            if start == end {
                                let State::Writing { buf, .. } =
                                    std::mem::replace(&mut self.state, State::Reading)
                                else {
                                    unreachable!()
                                };
                                give_buffer(buf);
                            }
                        }
                    }
                }
                State::ShuttingDown => {
                    // Pass the half-close on; the peer may still be sending.
                    if Pin::new(&mut *tx).poll_shutdown(cx).is_pending() {
                        return Poll::Pending;
                    }
                    return Poll::Ready(self.finish(PumpEnd::Eof));
                }
                State::Done(end) => return Poll::Ready(*end),
            }
        }
    }

    fn finish(&mut self, end: PumpEnd) -> PumpEnd {
        if let State::Writing { buf, .. } = std::mem::replace(&mut self.state, State::Done(end)) {
            give_buffer(buf);
        }
        end
    }

    fn done(&self) -> bool {
        matches!(self.state, State::Done(_))
    }
}

/// Relays until both directions have ended, the idle limit passes, an
/// error ends the session, or `stop` resolves (then as described in the
/// module docs). `backend_said`: what the backend sent after its login
/// answer, which the client already has; `client_said`: what the client
/// sent after its login command, which the backend already has. The watch
/// starts with both. The IMAP watch follows the session.
pub async fn relay<C, B, S>(
    client: C,
    backend: B,
    backend_said: Vec<u8>,
    client_said: Vec<u8>,
    idle: Duration,
    counters: &Counters,
    stop: S,
) -> RelayOutcome
where
    C: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
    S: Future<Output = StopCause>,
{
    let watch = crate::imap::watch::Watch::new();
    relay_following(
        watch,
        client,
        backend,
        backend_said,
        client_said,
        idle,
        counters,
        stop,
    )
    .await
}

/// [`relay`], with the protocol's own watch.
#[allow(clippy::too_many_arguments)]
pub async fn relay_following<W, C, B, S>(
    mut watch: W,
    mut client: C,
    mut backend: B,
    backend_said: Vec<u8>,
    client_said: Vec<u8>,
    idle: Duration,
    counters: &Counters,
    stop: S,
) -> RelayOutcome
where
    C: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
    S: Future<Output = StopCause>,
    W: Follow,
{
    tokio::pin!(stop);
    let (tally_in, tally_out) = counters.session.clone().unzip();
    let mut up = Pump::new(counters.client_to_backend.clone(), tally_in, false);
    let mut down = Pump::new(counters.backend_to_client.clone(), tally_out, true);
    // What the backend sent came before it had the client's pipelined
    // commands: it answers none of them.
    watch.backend_sent(&backend_said, false);
    watch.client_sent(&client_said);
    // Commands pipelined behind the login are the backend's to answer.
    let mut client_waiting = !client_said.is_empty();
    // Not kept: the client's may be the pre-auth read buffer.
    drop((backend_said, client_said));
    let mut limit = idle;
    let mut last_activity = Instant::now();
    let timer = tokio::time::sleep(limit);
    tokio::pin!(timer);
    // Who closed first; once one side has, the session ends on its account.
    let mut closed: Option<RelayEnd> = None;
    // Writing to the backend failed (it closed, or the connection broke).
    let mut backend_write_failed = false;
    // Once `stop` has resolved: why, and until when the backend's current
    // response may go on.
    let mut stopping: Option<(StopCause, Pin<Box<tokio::time::Sleep>>)> = None;
    // When the shadow inflater of a compressed session may be parked.
    let mut park_at: Option<Instant> = None;

    let end = poll_fn(|cx| {
        if stopping.is_none() {
            if let Poll::Ready(cause) = stop.as_mut().poll(cx) {
                let finish = watch.finish_within();
                stopping = Some((cause, Box::pin(tokio::time::sleep(finish))));
                down.stopping = true;
            }
        }
        if let Some((cause, finish)) = &mut stopping {
            // The client's commands are no longer read; the backend's
            // response in flight finishes, to its boundary, or time runs out.
            if closed == Some(RelayEnd::BackendClosed) {
                // The backend had already ended in order.
                return Poll::Ready(RelayEnd::BackendClosed);
            }
            let end = RelayEnd::Stopped(*cause);
            if down.done() || !watch.following() || finish.as_mut().poll(cx).is_ready() {
                return Poll::Ready(end);
            }
            let mut active = false;
            return match down.poll(cx, &mut backend, &mut client, &mut active, &mut watch) {
                Poll::Pending => Poll::Pending,
                Poll::Ready(_) => Poll::Ready(end),
            };
        }
        let mut active = false;
        // Who spoke last: the client, if only its direction read this turn.
        let (up_reads, down_reads) = (up.reads, down.reads);
        if !up.done() {
            let polled = up.poll(cx, &mut client, &mut backend, &mut active, &mut watch);
            if up.reads != up_reads {
                client_waiting = true;
            }
            match polled {
                Poll::Pending => {}
                Poll::Ready(PumpEnd::Eof | PumpEnd::Lost | PumpEnd::Boundary) => {
                    closed.get_or_insert(RelayEnd::ClientClosed);
                }
                Poll::Ready(PumpEnd::ReadError) => {
                    return Poll::Ready(closed.unwrap_or(RelayEnd::ClientError))
                }
                Poll::Ready(PumpEnd::Forbidden) => return Poll::Ready(RelayEnd::Forbidden),
                // Not judged yet: the other direction reads on to the
                // backend's own end (its BYE, then the reset), within LINGER.
                Poll::Ready(PumpEnd::WriteError) => backend_write_failed = true,
            }
        }
        if !down.done() {
            let before = down.total;
            let polled = down.poll(cx, &mut backend, &mut client, &mut active, &mut watch);
            if down.reads != down_reads {
                client_waiting = false;
            }
            if down.total != before && watch.inflating() {
                // The backend spoke: park its shadow once it is quiet.
                let at = Instant::now() + PARK_AFTER;
                if park_at.is_none() && at < timer.deadline() {
                    timer.as_mut().reset(at);
                }
                park_at = Some(at);
            }
            match polled {
                Poll::Pending => {}
                Poll::Ready(PumpEnd::Eof | PumpEnd::Boundary) => {
                    closed.get_or_insert(RelayEnd::BackendClosed);
                }
                Poll::Ready(PumpEnd::Lost) => {
                    return Poll::Ready(closed.unwrap_or(RelayEnd::BackendLost))
                }
                Poll::Ready(PumpEnd::ReadError | PumpEnd::Forbidden) => {
                    return Poll::Ready(closed.unwrap_or(RelayEnd::BackendError))
                }
                Poll::Ready(PumpEnd::WriteError) => {
                    return Poll::Ready(closed.unwrap_or(RelayEnd::ClientError))
                }
            }
        }
        // After a failed write to the backend, its direction to the client
        // decides: an orderly end (BYE, then the reset of a backend that
        // closed with input unread) ends the session as closed by the
        // backend, with the BYE delivered; a read error or a lost backend
        // returned above; LINGER bounds the wait for either.
        if up.done() && down.done() {
            return Poll::Ready(closed.unwrap_or(RelayEnd::ClientClosed));
        }
        if (closed.is_some() || backend_write_failed) && limit > LINGER {
            // The other side has LINGER from now: re-arm the timer, which
            // would otherwise wait for the idle deadline first.
            limit = LINGER;
            last_activity = Instant::now();
            let deadline = last_activity + limit;
            timer
                .as_mut()
                .reset(park_at.map_or(deadline, |at| at.min(deadline)));
        }
        if active {
            last_activity = Instant::now();
        }
        // The timer is reset only when it fires, not on every byte.
        while timer.as_mut().poll(cx).is_ready() {
            let now = Instant::now();
            if park_at.is_some_and(|at| now >= at) {
                // Not at a flushed boundary (a response stalled): later.
                park_at = (!watch.park() && watch.inflating()).then(|| now + PARK_AFTER);
            }
            let deadline = last_activity + limit;
            if now >= deadline {
                return Poll::Ready(closed.unwrap_or(if backend_write_failed {
                    RelayEnd::BackendError
                } else {
                    RelayEnd::IdleTimeout
                }));
            }
            timer
                .as_mut()
                .reset(park_at.map_or(deadline, |at| at.min(deadline)));
        }
        Poll::Pending
    })
    .await;
    let farewell = if down.delivered() {
        watch.farewell()
    } else {
        Farewell::Silent
    };
    RelayOutcome {
        client_to_backend: up.total,
        backend_to_client: down.total,
        end,
        farewell,
        compressed: watch.compressed(),
        client_waiting,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::imap::watch::tests::{deflated, inflate};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// The relay with fresh counters, nothing said before it, no stop.
    async fn quiet_relay<C, B>(client: C, backend: B, idle: Duration) -> RelayOutcome
    where
        C: AsyncRead + AsyncWrite + Unpin,
        B: AsyncRead + AsyncWrite + Unpin,
    {
        relay(
            client,
            backend,
            Vec::new(),
            Vec::new(),
            idle,
            &counters(),
            std::future::pending(),
        )
        .await
    }

    fn counters() -> Counters {
        Counters {
            client_to_backend: IntCounter::new("up", "up").unwrap(),
            backend_to_client: IntCounter::new("down", "down").unwrap(),
            session: None,
        }
    }

    #[tokio::test]
    async fn bytes_flow_both_ways_and_half_close_passes_on() {
        let (client_far, client_near) = tokio::io::duplex(4096);
        let (backend_far, backend_near) = tokio::io::duplex(4096);
        let relay = tokio::spawn(async move {
            quiet_relay(client_near, backend_near, Duration::from_secs(60)).await
        });
        let (mut client_rx, mut client_tx) = tokio::io::split(client_far);
        let (mut backend_rx, mut backend_tx) = tokio::io::split(backend_far);
        let mut big: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        big[199_998..].copy_from_slice(b"\r\n");
        let sent = big.clone();
        let writer = tokio::spawn(async move {
            backend_tx.write_all(&sent).await.unwrap();
            backend_tx
                .write_all(b"* BYE Logging out\r\na OK Logout completed.\r\n")
                .await
                .unwrap();
            backend_tx.shutdown().await.unwrap();
        });
        client_tx.write_all(b"a LOGOUT\r\n").await.unwrap();
        client_tx.shutdown().await.unwrap();
        let mut got = Vec::new();
        client_rx.read_to_end(&mut got).await.unwrap();
        let mut expected = big.clone();
        expected.extend_from_slice(b"* BYE Logging out\r\na OK Logout completed.\r\n");
        assert_eq!(got, expected, "backend bytes arrive intact, then EOF");
        let mut up = Vec::new();
        backend_rx.read_to_end(&mut up).await.unwrap();
        assert_eq!(up, b"a LOGOUT\r\n");
        writer.await.unwrap();
        let outcome = relay.await.unwrap();
        assert_eq!(outcome.backend_to_client, 200_000 + 43);
        assert_eq!(outcome.client_to_backend, 10);
        assert_eq!(outcome.end, RelayEnd::ClientClosed);
    }

    /// A BYE begun in what the backend sent with its login answer (which
    /// the client already has) and ended in the relay's first read. (The
    /// client stays open: the backend's end must decide.)
    #[tokio::test(start_paused = true)]
    async fn a_bye_begun_before_the_relay_is_found() {
        for (said, rest, end) in [
            (
                &b"* 1 EXISTS\r\n* BY"[..],
                &b"E bye\r\n"[..],
                RelayEnd::BackendClosed,
            ),
            (b"* 1 EXISTS\r\n* BYE bye\r\n", b"", RelayEnd::BackendClosed),
            (b"* 1 EXISTS\r\nx* BY", b"E bye\r\n", RelayEnd::BackendLost),
        ] {
            let (mut client_far, client_near) = tokio::io::duplex(4096);
            let (mut backend_far, backend_near) = tokio::io::duplex(4096);
            backend_far.write_all(rest).await.unwrap();
            drop(backend_far);
            let c = counters();
            let relay = tokio::spawn(async move {
                let mut client_near = client_near;
                let outcome = relay(
                    &mut client_near,
                    backend_near,
                    said.to_vec(),
                    Vec::new(),
                    Duration::from_secs(60),
                    &c,
                    std::future::pending(),
                )
                .await;
                (outcome, client_near)
            });
            let mut got = vec![0u8; rest.len()];
            client_far.read_exact(&mut got).await.unwrap();
            assert_eq!(got, rest);
            let (outcome, _client_near) = relay.await.unwrap();
            assert_eq!(outcome.end, end, "{said:?}");
            drop(client_far);
        }
    }

    #[tokio::test]
    async fn a_backend_that_vanishes_without_bye_is_lost_and_the_client_kept() {
        let (mut client_far, client_near) = tokio::io::duplex(4096);
        let (mut backend_far, backend_near) = tokio::io::duplex(4096);
        let relay = tokio::spawn(async move {
            let mut client_near = client_near;
            let outcome =
                quiet_relay(&mut client_near, backend_near, Duration::from_secs(60)).await;
            (outcome, client_near)
        });
        // A BYE inside a message is not the backend's.
        let said = b"* 1 FETCH (BODY[] {18}\r\n* BYE not really\r\n)\r\n";
        backend_far.write_all(said).await.unwrap();
        backend_far.write_all(&[b'x'; 4000]).await.unwrap();
        let mut seen = vec![0u8; said.len() + 4000];
        client_far.read_exact(&mut seen).await.unwrap();
        drop(backend_far);
        let (outcome, mut client_near) = relay.await.unwrap();
        assert_eq!(outcome.end, RelayEnd::BackendLost);
        // The client's side is still open for the caller's BYE.
        client_near
            .write_all(b"* BYE [UNAVAILABLE]\r\n")
            .await
            .unwrap();
        let mut bye = [0u8; 21];
        client_far.read_exact(&mut bye).await.unwrap();
        assert_eq!(&bye, b"* BYE [UNAVAILABLE]\r\n");
    }

    /// A backend that sends `said`, then resets the connection: every read
    /// after and every write fails with ECONNRESET.
    struct ResetAfter {
        said: Vec<u8>,
        /// Most bytes one read returns.
        chunk: usize,
    }

    fn reset() -> std::io::Error {
        std::io::ErrorKind::ConnectionReset.into()
    }

    impl AsyncRead for ResetAfter {
        fn poll_read(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<std::io::Result<()>> {
            if self.said.is_empty() {
                return Poll::Ready(Err(reset()));
            }
            let n = self.said.len().min(buf.remaining()).min(self.chunk);
            buf.put_slice(&self.said[..n]);
            self.said.drain(..n);
            Poll::Ready(Ok(()))
        }
    }

    impl AsyncWrite for ResetAfter {
        fn poll_write(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
            _: &[u8],
        ) -> Poll<std::io::Result<usize>> {
            Poll::Ready(Err(reset()))
        }
        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
            Poll::Ready(Err(reset()))
        }
        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
            Poll::Ready(Err(reset()))
        }
    }

    /// Dovecot resets the connection when it closes after LOGOUT with
    /// input unread: the client gets the BYE and the tagged OK, then the
    /// end of the stream, and the session ended in order — whether the
    /// client wrote something after LOGOUT or not.
    #[tokio::test]
    async fn a_reset_after_the_backends_bye_is_an_orderly_end() {
        // The backend's answer arrives a few bytes at a time (40 cuts the
        // BYE after "* ", 1, 3 and 7 cut it everywhere); with an 8-byte
        // pipe the client reads slowly, so the BYE is not even read when
        // the write to the backend fails.
        let cases = [
            (&b""[..], 4096, 16),
            (b"N NOOP\r\n", 4096, 16),
            (b"N NOOP\r\n", 8, 16),
            (b"", 4096, 40),
            (b"N NOOP\r\n", 4096, 1),
            (b"N NOOP\r\n", 4096, 3),
            (b"N NOOP\r\n", 8, 7),
        ];
        for (pipelined, room, chunk) in cases {
            let (mut client_far, client_near) = tokio::io::duplex(room);
            let said = b"* 1 FETCH (FLAGS (\\Seen))\r\nF OK done\r\n* BYE Logging out\r\nZ OK Logout completed.\r\n";
            let backend = ResetAfter {
                said: said.to_vec(),
                chunk,
            };
            client_far.write_all(pipelined).await.unwrap();
            let relay = tokio::spawn(async move {
                quiet_relay(client_near, backend, Duration::from_secs(60)).await
            });
            let mut got = Vec::new();
            client_far.read_to_end(&mut got).await.unwrap();
            assert_eq!(got, said, "the BYE and OK, then end of stream");
            client_far.shutdown().await.unwrap();
            let outcome = relay.await.unwrap();
            assert_eq!(
                outcome.end,
                RelayEnd::BackendClosed,
                "{pipelined:?} {room} {chunk}"
            );
        }
    }

    /// A reset without a BYE first is a failure, as before.
    #[tokio::test]
    async fn a_reset_without_bye_is_a_backend_error() {
        let (mut client_far, client_near) = tokio::io::duplex(4096);
        client_far.write_all(b"a NOOP\r\n").await.unwrap();
        let backend = ResetAfter {
            said: b"* 1 EXISTS\r\n".to_vec(),
            chunk: 4096,
        };
        let outcome = quiet_relay(client_near, backend, Duration::from_secs(60)).await;
        assert_eq!(outcome.end, RelayEnd::BackendError);
    }

    #[tokio::test(start_paused = true)]
    async fn after_one_side_closes_the_other_has_linger_not_the_idle_limit() {
        let (mut client_far, client_near) = tokio::io::duplex(64);
        let (_backend_far, backend_near) = tokio::io::duplex(64);
        client_far.shutdown().await.unwrap();
        let started = Instant::now();
        let outcome = quiet_relay(client_near, backend_near, Duration::from_secs(1800)).await;
        assert_eq!(outcome.end, RelayEnd::ClientClosed);
        let took = started.elapsed();
        assert!(
            took >= LINGER && took < LINGER + Duration::from_secs(1),
            "{took:?}"
        );
    }

    /// A relay between two pipes that stops when `stop` is sent a cause;
    /// gives back the outcome and the client's side of the relay.
    fn stoppable(
        room: usize,
    ) -> (
        tokio::io::DuplexStream,
        tokio::io::DuplexStream,
        tokio::sync::oneshot::Sender<StopCause>,
        tokio::task::JoinHandle<(RelayOutcome, tokio::io::DuplexStream)>,
    ) {
        let (client_far, client_near) = tokio::io::duplex(room);
        let (backend_far, backend_near) = tokio::io::duplex(room);
        let (stop, stopped) = tokio::sync::oneshot::channel();
        let relay = tokio::spawn(async move {
            let mut client_near = client_near;
            let outcome = relay(
                &mut client_near,
                backend_near,
                Vec::new(),
                Vec::new(),
                Duration::from_secs(60),
                &counters(),
                async move { stopped.await.unwrap() },
            )
            .await;
            (outcome, client_near)
        });
        (client_far, backend_far, stop, relay)
    }

    /// Writes the farewell `text` as the session would, closes, and
    /// returns everything the client read.
    async fn farewell_and_read(
        relay: tokio::task::JoinHandle<(RelayOutcome, tokio::io::DuplexStream)>,
        mut client_far: tokio::io::DuplexStream,
        text: &[u8],
    ) -> (RelayEnd, &'static str, Vec<u8>) {
        // The client reads on while the relay finishes.
        let reader = tokio::spawn(async move {
            let mut got = Vec::new();
            client_far.read_to_end(&mut got).await.unwrap();
            got
        });
        let (outcome, mut client_near) = relay.await.unwrap();
        let kind = outcome.farewell.as_str();
        if let Some(said) = outcome.farewell.encode(text) {
            client_near.write_all(&said).await.unwrap();
        }
        drop(client_near);
        (outcome.end, kind, reader.await.unwrap())
    }

    /// Stopped in the middle of a literal, the relay lets the response
    /// finish, cuts what follows it, and the BYE comes after.
    #[tokio::test]
    async fn a_stop_mid_literal_waits_for_the_response_to_end() {
        for room in [4096, 7] {
            let (mut client_far, mut backend_far, stop, relay) = stoppable(room);
            let head = b"* 1 FETCH (BODY[] {10}\r\n01234";
            let (go_on, resume) = tokio::sync::oneshot::channel::<()>();
            let backend = tokio::spawn(async move {
                backend_far.write_all(head).await.unwrap();
                resume.await.unwrap();
                // The relay stops reading after the boundary: what follows
                // it may not be taken.
                let _ = backend_far.write_all(b"56789)\r\n* 2 EXISTS\r\n").await;
                backend_far
            });
            let mut got = vec![0u8; head.len()];
            client_far.read_exact(&mut got).await.unwrap();
            stop.send(StopCause::Kicked).unwrap();
            tokio::task::yield_now().await;
            go_on.send(()).unwrap();
            let (end, kind, rest) = farewell_and_read(relay, client_far, b"* BYE kicked\r\n").await;
            assert_eq!(end, RelayEnd::Stopped(StopCause::Kicked));
            assert_eq!(kind, "plain", "room {room}: {rest:?}");
            assert_eq!(rest, b"56789)\r\n* BYE kicked\r\n", "room {room}");
            drop(backend.await.unwrap());
        }
    }

    /// Stopped between the backend's BYE and its tagged answer to LOGOUT:
    /// the client gets the answer and the backend's close, no second BYE.
    #[tokio::test]
    async fn a_stop_after_the_backends_bye_lets_it_finish() {
        let (mut client_far, mut backend_far, stop, relay) = stoppable(4096);
        backend_far
            .write_all(b"* BYE Logging out\r\n")
            .await
            .unwrap();
        let mut got = [0u8; 19];
        client_far.read_exact(&mut got).await.unwrap();
        stop.send(StopCause::Shutdown).unwrap();
        tokio::task::yield_now().await;
        backend_far
            .write_all(b"Z OK Logout completed.\r\n")
            .await
            .unwrap();
        drop(backend_far);
        let (end, kind, rest) = farewell_and_read(relay, client_far, b"* BYE no\r\n").await;
        assert_eq!(end, RelayEnd::Stopped(StopCause::Shutdown));
        assert_eq!(kind, "silent");
        assert_eq!(rest, b"Z OK Logout completed.\r\n");
    }

    /// A response that does not finish within FINISH: the client's stream
    /// is closed without a word.
    #[tokio::test(start_paused = true)]
    async fn a_response_that_never_ends_gets_no_bye() {
        let (mut client_far, mut backend_far, stop, relay) = stoppable(4096);
        let head = b"* 1 FETCH (BODY[] {10}\r\n01234";
        backend_far.write_all(head).await.unwrap();
        let mut got = vec![0u8; head.len()];
        client_far.read_exact(&mut got).await.unwrap();
        let started = Instant::now();
        stop.send(StopCause::Shutdown).unwrap();
        let (end, kind, rest) = farewell_and_read(relay, client_far, b"* BYE\r\n").await;
        assert_eq!(end, RelayEnd::Stopped(StopCause::Shutdown));
        assert_eq!(kind, "silent");
        assert!(rest.is_empty(), "{rest:?}");
        assert!(started.elapsed() >= FINISH);
        drop(backend_far);
    }

    /// Between responses the stop is at once.
    #[tokio::test(start_paused = true)]
    async fn a_stop_between_responses_is_at_once() {
        let (mut client_far, mut backend_far, stop, relay) = stoppable(4096);
        backend_far.write_all(b"* 1 EXISTS\r\n").await.unwrap();
        let mut got = [0u8; 12];
        client_far.read_exact(&mut got).await.unwrap();
        let started = Instant::now();
        stop.send(StopCause::BackendDown).unwrap();
        let (end, kind, rest) = farewell_and_read(relay, client_far, b"* BYE down\r\n").await;
        assert_eq!(end, RelayEnd::Stopped(StopCause::BackendDown));
        assert_eq!((kind, &rest[..]), ("plain", &b"* BYE down\r\n"[..]));
        assert!(started.elapsed() < Duration::from_millis(10));
    }

    /// The client sends `c COMPRESS DEFLATE` through the relay; the
    /// backend's deflater, for after its OK.
    async fn compress_asked(
        client_far: &mut tokio::io::DuplexStream,
        backend_far: &mut tokio::io::DuplexStream,
    ) -> flate2::write::DeflateEncoder<Vec<u8>> {
        client_far
            .write_all(b"c COMPRESS DEFLATE\r\n")
            .await
            .unwrap();
        let mut asked = [0u8; 20];
        backend_far.read_exact(&mut asked).await.unwrap();
        assert_eq!(&asked, b"c COMPRESS DEFLATE\r\n");
        flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::new(6))
    }

    /// After COMPRESS DEFLATE, a stop in the middle of a response (even
    /// at a sync flush) waits for its end; the BYE is then a deflate block
    /// the client inflates after the backend's responses.
    #[tokio::test]
    async fn a_stop_on_a_compressed_stream_ends_in_deflate() {
        let (mut client_far, mut backend_far, stop, relay) = stoppable(4096);
        let mut z = compress_asked(&mut client_far, &mut backend_far).await;
        let mut sent = b"c OK DEFLATE active\r\n".to_vec();
        sent.extend(deflated(&mut z, &[b"* 1 FETCH (BODY[] {10}\r\n01234"]));
        backend_far.write_all(&sent).await.unwrap();
        let mut got = vec![0u8; sent.len()];
        client_far.read_exact(&mut got).await.unwrap();
        stop.send(StopCause::Drained).unwrap();
        tokio::task::yield_now().await;
        let rest = deflated(&mut z, &[b"56789)\r\n"]);
        backend_far.write_all(&rest).await.unwrap();
        let bye = b"* BYE [UNAVAILABLE] reconnect\r\n";
        let (end, kind, after) = farewell_and_read(relay, client_far, bye).await;
        assert_eq!(end, RelayEnd::Stopped(StopCause::Drained));
        assert_eq!(kind, "deflate");
        got.extend(after);
        let compressed = &got[b"c OK DEFLATE active\r\n".len()..];
        assert_eq!(
            inflate(compressed),
            b"* 1 FETCH (BODY[] {10}\r\n0123456789)\r\n* BYE [UNAVAILABLE] reconnect\r\n"
        );
    }

    /// A compressed `* BYE Logging out`, then the backend's close: an
    /// orderly end, not a lost backend.
    #[tokio::test]
    async fn a_compressed_bye_then_close_is_an_orderly_end() {
        let (mut client_far, mut backend_far, _stop, relay) = stoppable(4096);
        let mut z = compress_asked(&mut client_far, &mut backend_far).await;
        let mut sent = b"c OK\r\n".to_vec();
        sent.extend(deflated(&mut z, &[b"* BYE Logging out\r\n"]));
        sent.extend(deflated(&mut z, &[b"l OK Logout completed.\r\n"]));
        backend_far.write_all(&sent).await.unwrap();
        drop(backend_far);
        let mut got = Vec::new();
        client_far.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, sent);
        drop(client_far);
        let (outcome, _) = relay.await.unwrap();
        assert_eq!(outcome.end, RelayEnd::BackendClosed);
        assert!(outcome.compressed);
        assert_eq!(outcome.farewell.as_str(), "silent");
    }

    /// A compressed session quiet for longer than PARK_AFTER (its shadow
    /// parked) is followed as before when the backend speaks again, and a
    /// stop while parked still ends in a deflate BYE.
    #[tokio::test(start_paused = true)]
    async fn a_compressed_session_is_followed_across_quiet_periods() {
        let (mut client_far, mut backend_far, stop, relay) = stoppable(1 << 16);
        let mut z = compress_asked(&mut client_far, &mut backend_far).await;
        let text: Vec<u8> = (0..500)
            .flat_map(|i| format!("* {i} FETCH (FLAGS (\\Seen))\r\n").into_bytes())
            .collect();
        let mut sent = b"c OK\r\n".to_vec();
        sent.extend(deflated(&mut z, &[&text]));
        backend_far.write_all(&sent).await.unwrap();
        let mut got = vec![0u8; sent.len()];
        client_far.read_exact(&mut got).await.unwrap();
        for _ in 0..2 {
            tokio::time::sleep(PARK_AFTER * 2).await;
            // The same lines again: deflate refers into the parked window.
            let more = deflated(&mut z, &[&text]);
            backend_far.write_all(&more).await.unwrap();
            let mut again = vec![0u8; more.len()];
            client_far.read_exact(&mut again).await.unwrap();
            got.extend(again);
        }
        tokio::time::sleep(PARK_AFTER * 2).await;
        stop.send(StopCause::Shutdown).unwrap();
        let (end, kind, after) = farewell_and_read(relay, client_far, b"* BYE bye\r\n").await;
        assert_eq!(end, RelayEnd::Stopped(StopCause::Shutdown));
        assert_eq!(kind, "deflate");
        got.extend(after);
        let mut expected = [&text[..], &text, &text].concat();
        expected.extend_from_slice(b"* BYE bye\r\n");
        assert_eq!(inflate(&got[6..]), expected);
    }

    #[tokio::test(start_paused = true)]
    async fn idle_limit_ends_a_quiet_session() {
        let (_client_far, client_near) = tokio::io::duplex(64);
        let (_backend_far, backend_near) = tokio::io::duplex(64);
        let outcome = quiet_relay(client_near, backend_near, Duration::from_secs(1800)).await;
        assert_eq!(outcome.end, RelayEnd::IdleTimeout);
    }
}
