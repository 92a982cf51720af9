//! The byte pump after login: client and backend bytes both ways, untouched
//! (IDLE, COMPRESS=DEFLATE and large literals pass as they are), counted per
//! direction as they flow.
//!
//! One future drives both directions, so a side that is busy writing never
//! stops the other from reading, and no second task or lock is needed. An
//! idle session holds no buffer: a direction borrows one from the
//! per-thread pool in [`crate::buffer`] only for the moment a read returns
//! data, and gives it back once the data is written, so hundreds of
//! thousands of IDLE sessions cost their sockets and TLS state, not
//! 2 × 64 KiB each.
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

/// How long the other direction may go on after one side has closed.
pub const LINGER: Duration = Duration::from_secs(30);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RelayEnd {
    ClientClosed,
    BackendClosed,
    IdleTimeout,
    ClientError,
    BackendError,
    /// The caller's `stop` future resolved (the backend went down, or its
    /// drain's grace period ended).
    BackendDown,
    /// The backend closed without saying `* BYE` first: it went away. The
    /// client's side is left open for the caller to say so.
    BackendLost,
}

impl RelayEnd {
    pub fn as_str(self) -> &'static str {
        match self {
            RelayEnd::ClientClosed => "client_closed",
            RelayEnd::BackendClosed => "backend_closed",
            RelayEnd::IdleTimeout => "idle_timeout",
            RelayEnd::ClientError => "client_error",
            RelayEnd::BackendError => "backend_error",
            RelayEnd::BackendDown => "backend_down",
            RelayEnd::BackendLost => "backend_lost",
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
}

/// How far from the end of the stream a backend's `* BYE` is looked for:
/// the BYE, then at most the tagged answer to LOGOUT, end a closing stream.
const BYE_WINDOW: usize = 512;

/// An untagged BYE (RFC 9051 7.1.5), matched without regard to case.
const BYE: &[u8; 6] = b"* BYE ";

/// Watches a backend's stream for a BYE at the start of a line within
/// [`BYE_WINDOW`] bytes of its end: after that, the backend's end of stream
/// (or the reset of a backend closing with input unread) is orderly. A BYE
/// split across reads is found as well as a whole one.
struct ByeWatch {
    /// The stream's last bytes before the next read; at the start of the
    /// stream, a line end (the relay starts between responses).
    carry: [u8; BYE.len()],
    carry_len: usize,
    /// Bytes read since the end of the last BYE; `None` when there was
    /// none, or it lies further back than the window.
    since: Option<usize>,
}

impl ByeWatch {
    fn new() -> Self {
        let mut carry = [0; BYE.len()];
        carry[0] = b'\n';
        ByeWatch {
            carry,
            carry_len: 1,
            since: None,
        }
    }

    fn seen(&self) -> bool {
        self.since.is_some()
    }

    fn feed(&mut self, chunk: &[u8]) {
        // The chunk's last BYE_WINDOW bytes, after the byte or bytes that
        // precede them in the stream: enough to see a BYE begun in the
        // previous read and to tell a line start.
        let start = chunk.len().saturating_sub(BYE_WINDOW);
        let prefix: &[u8] = if start == 0 {
            &self.carry[..self.carry_len]
        } else {
            &chunk[start - 1..start]
        };
        let mut joined = [0u8; BYE.len() + BYE_WINDOW];
        let len = prefix.len() + chunk.len() - start;
        joined[..prefix.len()].copy_from_slice(prefix);
        joined[prefix.len()..len].copy_from_slice(&chunk[start..]);
        let joined = &joined[..len];
        // A match starts after its line end, so it ends inside this chunk.
        let last = (1..len.saturating_sub(BYE.len() - 1)).rev().find(|&i| {
            joined[i - 1] == b'\n' && joined[i..i + BYE.len()].eq_ignore_ascii_case(BYE)
        });
        self.since = match last {
            Some(i) => Some(len - i - BYE.len()),
            None => self
                .since
                .map(|since| since + chunk.len())
                .filter(|&since| since <= BYE_WINDOW - BYE.len()),
        };
        // Keep the stream's last bytes for the next read.
        if chunk.len() >= BYE.len() {
            self.carry
                .copy_from_slice(&chunk[chunk.len() - BYE.len()..]);
            self.carry_len = BYE.len();
        } else {
            let mut both = [0u8; 2 * BYE.len()];
            let total = self.carry_len + chunk.len();
            both[..self.carry_len].copy_from_slice(&self.carry[..self.carry_len]);
            both[self.carry_len..total].copy_from_slice(chunk);
            let from = total.saturating_sub(BYE.len());
            self.carry_len = total - from;
            self.carry[..self.carry_len].copy_from_slice(&both[from..total]);
        }
    }
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
    /// Backend to client: watches for the backend's `* BYE`.
    bye: Option<ByeWatch>,
}

impl Pump {
    fn new(counter: IntCounter, tally: Option<Arc<AtomicU64>>, from_backend: bool) -> Self {
        Pump {
            state: State::Reading,
            unflushed: false,
            total: 0,
            counter,
            tally,
            bye: from_backend.then(ByeWatch::new),
        }
    }

    /// At end of input: pass the half-close on, or report a lost backend.
    fn at_end(&mut self) -> Option<PumpEnd> {
        if self.bye.as_ref().is_some_and(|bye| !bye.seen()) {
            return Some(self.finish(PumpEnd::Lost));
        }
        self.state = State::ShuttingDown;
        None
    }

    /// Moves bytes from `rx` to `tx` until one of them is not ready.
    /// Ready once this direction is over.
    fn poll<R, W>(
        &mut self,
        cx: &mut Context<'_>,
        rx: &mut R,
        tx: &mut W,
        active: &mut bool,
    ) -> Poll<PumpEnd>
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        loop {
            match &mut self.state {
                State::Reading => {
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
                            if let Some(end) = self.at_end() {
                                return Poll::Ready(end);
                            }
                        }
                        Poll::Ready(Ok(())) => {
                            let end = read.filled().len();
                            if let Some(bye) = &mut self.bye {
                                bye.feed(read.filled());
                            }
                            *active = true;
                            self.state = State::Writing { buf, start: 0, end };
                        }
                        // A TLS peer that closes without close_notify has still closed.
                        Poll::Ready(Err(e)) if e.kind() == ErrorKind::UnexpectedEof => {
                            give_buffer(buf);
                            if let Some(end) = self.at_end() {
                                return Poll::Ready(end);
                            }
                        }
                        // A backend that closes with input unread (a
                        // client pipelining past LOGOUT) resets the
                        // connection; after its BYE that is an orderly end.
                        Poll::Ready(Err(_)) if self.bye.as_ref().is_some_and(ByeWatch::seen) => {
                            give_buffer(buf);
                            if let Some(end) = self.at_end() {
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
/// error ends the session, or `stop` resolves. `backend_said`: what the
/// backend sent after its login answer and the client already has; the
/// watch for the backend's BYE starts with it.
pub async fn relay<C, B, S>(
    mut client: C,
    mut backend: B,
    backend_said: Vec<u8>,
    idle: Duration,
    counters: &Counters,
    stop: S,
) -> RelayOutcome
where
    C: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
    S: Future<Output = ()>,
{
    tokio::pin!(stop);
    let (tally_in, tally_out) = counters.session.clone().unzip();
    let mut up = Pump::new(counters.client_to_backend.clone(), tally_in, false);
    let mut down = Pump::new(counters.backend_to_client.clone(), tally_out, true);
    if let Some(bye) = &mut down.bye {
        bye.feed(&backend_said);
    }
    drop(backend_said);
    let mut limit = idle;
    let mut last_activity = Instant::now();
    let timer = tokio::time::sleep(limit);
    tokio::pin!(timer);
    // Who closed first; once one side has, the session ends on its account.
    let mut closed: Option<RelayEnd> = None;
    // Writing to the backend failed (it closed, or the connection broke).
    let mut backend_write_failed = false;

    let end = poll_fn(|cx| {
        if stop.as_mut().poll(cx).is_ready() {
            return Poll::Ready(RelayEnd::BackendDown);
        }
        let mut active = false;
        if !up.done() {
            match up.poll(cx, &mut client, &mut backend, &mut active) {
                Poll::Pending => {}
                Poll::Ready(PumpEnd::Eof | PumpEnd::Lost) => {
                    closed.get_or_insert(RelayEnd::ClientClosed);
                }
                Poll::Ready(PumpEnd::ReadError) => {
                    return Poll::Ready(closed.unwrap_or(RelayEnd::ClientError))
                }
                // Not judged yet: the other direction reads on to the
                // backend's own end (its BYE, then the reset), within LINGER.
                Poll::Ready(PumpEnd::WriteError) => backend_write_failed = true,
            }
        }
        if !down.done() {
            match down.poll(cx, &mut backend, &mut client, &mut active) {
                Poll::Pending => {}
                Poll::Ready(PumpEnd::Eof) => {
                    closed.get_or_insert(RelayEnd::BackendClosed);
                }
                Poll::Ready(PumpEnd::Lost) => {
                    return Poll::Ready(closed.unwrap_or(RelayEnd::BackendLost))
                }
                Poll::Ready(PumpEnd::ReadError) => {
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
            timer.as_mut().reset(last_activity + limit);
        }
        if active {
            last_activity = Instant::now();
        }
        // The timer is reset only when it fires, not on every byte.
        while timer.as_mut().poll(cx).is_ready() {
            let deadline = last_activity + limit;
            if Instant::now() >= deadline {
                return Poll::Ready(closed.unwrap_or(if backend_write_failed {
                    RelayEnd::BackendError
                } else {
                    RelayEnd::IdleTimeout
                }));
            }
            timer.as_mut().reset(deadline);
        }
        Poll::Pending
    })
    .await;
    RelayOutcome {
        client_to_backend: up.total,
        backend_to_client: down.total,
        end,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
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
        // The last BYE was long ago: more data followed it.
        backend_far
            .write_all(b"* BYE not really\r\n")
            .await
            .unwrap();
        backend_far.write_all(&[b'x'; 4000]).await.unwrap();
        let mut seen = vec![0u8; 18 + 4000];
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

    /// Feeds `chunks` to a fresh watch.
    fn bye_after(chunks: &[&[u8]]) -> bool {
        let mut watch = ByeWatch::new();
        for chunk in chunks {
            watch.feed(chunk);
        }
        watch.seen()
    }

    #[test]
    fn bye_is_found_at_a_line_start_near_the_end() {
        assert!(bye_after(&[
            b"* BYE Logging out\r\nZ OK Logout completed.\r\n"
        ]));
        assert!(bye_after(&[b"x\r\n* bye shutting down\r\n"]));
        assert!(!bye_after(&[b"* OK [ALERT] say * BYE later\r\n"]));
        assert!(!bye_after(&[b"* OK [ALERT] say\r\n", b"x* BYE later\r\n"]));
        let mut far = b"* BYE early\r\n".to_vec();
        far.extend_from_slice(&[b'x'; 600]);
        assert!(!bye_after(&[&far]));
        // Far from the end of a long chunk, then near the end of the next.
        assert!(bye_after(&[&far, b"\r\n* BYE again\r\n"]));
        // Near the end of a long chunk.
        let mut long = vec![b'x'; 20_000];
        long.extend_from_slice(b"\r\n* BYE Logging out\r\nZ OK Logout completed.\r\n");
        assert!(bye_after(&[&long]));
        // Little after it, spread over later reads; then too much.
        let mut watch = ByeWatch::new();
        watch.feed(b"* BYE bye\r\n");
        for _ in 0..50 {
            watch.feed(b"0123456789");
        }
        assert!(watch.seen());
        watch.feed(b"0123456789");
        assert!(!watch.seen(), "{:?}", watch.since);
    }

    /// A BYE split across reads at any point, or arriving a byte at a
    /// time, is found; a line start is still required.
    #[test]
    fn bye_split_across_reads_is_found() {
        let stream = b"* 3 EXISTS\r\n* BYE Logging out\r\nZ OK Logout completed.\r\n";
        for cut in 0..=stream.len() {
            assert!(bye_after(&[&stream[..cut], &stream[cut..]]), "cut at {cut}");
        }
        let bytes: Vec<&[u8]> = stream.chunks(1).collect();
        assert!(bye_after(&bytes));
        let three: Vec<&[u8]> = stream.chunks(3).collect();
        assert!(bye_after(&three));
        let not = b"* OK say x* BYE now\r\n";
        for cut in 0..=not.len() {
            assert!(!bye_after(&[&not[..cut], &not[cut..]]), "cut at {cut}");
        }
        let bytes: Vec<&[u8]> = not.chunks(1).collect();
        assert!(!bye_after(&bytes));
        // At the very start of the relayed stream.
        assert!(bye_after(&[b"* B", b"YE bye\r\n"]));
    }

    #[tokio::test(start_paused = true)]
    async fn idle_limit_ends_a_quiet_session() {
        let (_client_far, client_near) = tokio::io::duplex(64);
        let (_backend_far, backend_near) = tokio::io::duplex(64);
        let outcome = quiet_relay(client_near, backend_near, Duration::from_secs(1800)).await;
        assert_eq!(outcome.end, RelayEnd::IdleTimeout);
    }
}
