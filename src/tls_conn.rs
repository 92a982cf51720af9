//! A client's TLS connection, on rustls' unbuffered API, so that the buffers
//! belong to Postern and an idle session holds none of them.
//!
//! rustls' buffered `ServerConnection` keeps a 4 KiB receive buffer for the
//! life of the connection even when nothing is in it; with hundreds of
//! thousands of IDLE sessions that buffer is most of a session's memory.
//! Here the ciphertext buffers come from [`crate::buffer`]: the receive
//! buffer is taken only once the socket is readable and given back as soon
//! as every received byte has been processed (a part of a record left
//! when the socket goes quiet moves to a buffer of its own size, so a peer
//! that stalls mid-record holds what it sent, not a whole buffer); the send buffer lives from
//! the first encrypted write to the flush that empties it. Between bursts
//! a session holds the socket and the rustls state (keys, sequence
//! numbers), nothing else.
//!
//! Writes are encrypted into the send buffer and go out on flush, so the
//! TLS 1.3 session tickets sent after the handshake and the IMAP greeting
//! leave in one segment, and a relay burst leaves in as few `write` calls
//! as the socket takes. Decrypted records are copied straight into the
//! reader's buffer; a record the reader has no room for waits in rustls, or
//! (when a write has to get past it) in a small plaintext buffer.
//!
//! This module must not interpret the bytes it carries: it is TLS, not IMAP.

use std::future::poll_fn;
use std::io::{self, ErrorKind};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use rustls::server::{ServerConfig, UnbufferedServerConnection};
use rustls::unbuffered::{
    ConnectionState, EncodeError, EncodeTlsData, EncryptError, UnbufferedStatus,
};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

use crate::buffer;

/// Largest TLS message the receive buffer grows to hold: a handshake
/// message of 64 KiB (the limit rustls itself applies) plus record headers.
const MAX_RECEIVE: usize = 0x1_0000 + 1024;

/// Most plaintext bytes in one TLS record.
const MAX_FRAGMENT: usize = 16 * 1024;

/// Upper bound of what encryption adds to a record: header (5), TLS 1.2
/// explicit nonce (8) or TLS 1.3 content type (1), AEAD tag (16).
const RECORD_OVERHEAD: usize = 32;

/// What the caller wants from one turn of the rustls state machine.
enum Want<'a, 'b> {
    /// Finish the handshake.
    Handshake,
    /// Decrypted bytes, copied into this buffer.
    Read(&'a mut ReadBuf<'b>),
    /// Encrypt these bytes into the send buffer.
    Write(&'a [u8]),
    /// Queue a close_notify alert.
    Close,
}

/// Where one turn of the state machine stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Turn {
    /// Plaintext was delivered to the reader (possibly none, when only the
    /// plaintext buffer took it).
    Delivered,
    /// `n` plaintext bytes were encrypted (a write), or a close_notify was queued.
    Encrypted(usize),
    /// rustls needs more bytes from the peer.
    NeedInput,
    /// Application data may be sent and nothing else is pending (during
    /// a TLS 1.3 handshake: once our Finished is queued).
    Writable,
    /// The peer sent close_notify.
    PeerClosed,
    /// Both sides have sent close_notify.
    Closed,
}

pub struct TlsConn {
    tcp: TcpStream,
    conn: UnbufferedServerConnection,
    /// Received ciphertext, `rx[..rx_len]`, not yet processed by rustls.
    /// Empty (unallocated) whenever nothing is buffered.
    rx: Vec<u8>,
    rx_len: usize,
    /// Encrypted bytes not yet written, `tx[tx_start..tx_end]`; unallocated
    /// when everything is written.
    tx: Vec<u8>,
    tx_start: usize,
    tx_end: usize,
    /// Decrypted bytes not yet read, `plain[plain_start..]`: only when a
    /// record did not fit the reader's buffer, or a write had to get past
    /// records nobody had read yet.
    plain: Vec<u8>,
    plain_start: usize,
    /// The peer sent close_notify: reads return end of stream.
    read_closed: bool,
    close_queued: bool,
}

/// Accepts a TLS connection on `tcp`: runs the handshake to completion. The
/// session tickets it produces stay queued and leave with the first write.
pub async fn accept(tcp: TcpStream, config: Arc<ServerConfig>) -> io::Result<TlsConn> {
    let mut tls = TlsConn::new(tcp, config)?;
    match poll_fn(|cx| tls.poll_handshake(cx)).await {
        Ok(()) => Ok(tls),
        Err(e) => {
            tls.send_alert();
            Err(e)
        }
    }
}

fn tls_error(e: rustls::Error) -> io::Error {
    io::Error::new(ErrorKind::InvalidData, e)
}

impl TlsConn {
    fn new(tcp: TcpStream, config: Arc<ServerConfig>) -> io::Result<TlsConn> {
        Ok(TlsConn {
            tcp,
            conn: UnbufferedServerConnection::new(config).map_err(tls_error)?,
            rx: Vec::new(),
            rx_len: 0,
            tx: Vec::new(),
            tx_start: 0,
            tx_end: 0,
            plain: Vec::new(),
            plain_start: 0,
            read_closed: false,
            close_queued: false,
        })
    }

    /// The TLS version agreed with the client.
    pub fn protocol_version(&self) -> Option<rustls::ProtocolVersion> {
        self.conn.protocol_version()
    }

    /// Runs rustls over the received bytes until the wanted thing is done or
    /// it needs more input. TLS messages rustls produces along the way
    /// (handshake flights, tickets, alerts, key updates) are queued in the
    /// send buffer.
    fn turn(&mut self, want: &mut Want<'_, '_>) -> io::Result<Turn> {
        loop {
            let UnbufferedStatus { discard, state } =
                self.conn.process_tls_records(&mut self.rx[..self.rx_len]);
            let turn = match state {
                Err(e) => {
                    discard_rx(&mut self.rx, &mut self.rx_len, discard);
                    return Err(tls_error(e));
                }
                Ok(ConnectionState::ReadTraffic(mut records)) => {
                    let mut result = Ok(());
                    match want {
                        Want::Read(out) => {
                            // Whole records while they fit; a first record
                            // larger than the reader's room is split.
                            let start = out.filled().len();
                            while out.remaining() > 0 {
                                let len = records.peek_len().map_or(0, |n| n.get());
                                if len > out.remaining() && out.filled().len() > start {
                                    break;
                                }
                                match records.next_record() {
                                    Some(Ok(record)) => {
                                        let n = record.payload.len().min(out.remaining());
                                        out.put_slice(&record.payload[..n]);
                                        self.plain.extend_from_slice(&record.payload[n..]);
                                    }
                                    Some(Err(e)) => {
                                        result = Err(e);
                                        break;
                                    }
                                    None => break,
                                }
                            }
                        }
                        // A write or close has to get past records nobody
                        // read yet: keep them for the reader. Bounded by
                        // what one receive buffer held.
                        _ => {
                            while let Some(record) = records.next_record() {
                                match record {
                                    Ok(record) => self.plain.extend_from_slice(record.payload),
                                    Err(e) => {
                                        result = Err(e);
                                        break;
                                    }
                                }
                            }
                        }
                    }
                    if let Err(e) = result {
                        discard_rx(&mut self.rx, &mut self.rx_len, discard);
                        return Err(tls_error(e));
                    }
                    match want {
                        Want::Read(_) => Some(Turn::Delivered),
                        _ => None,
                    }
                }
                Ok(ConnectionState::EncodeTlsData(mut encoder)) => {
                    encode(&mut encoder, &mut self.tx, &mut self.tx_end);
                    None
                }
                // The bytes are queued in `tx`, ahead of anything written
                // later; they leave with the next flush.
                Ok(ConnectionState::TransmitTlsData(transmit)) => {
                    transmit.done();
                    None
                }
                Ok(ConnectionState::BlockedHandshake) => Some(Turn::NeedInput),
                Ok(ConnectionState::WriteTraffic(mut traffic)) => match want {
                    Want::Handshake | Want::Read(_) => Some(Turn::Writable),
                    Want::Write(data) => {
                        if self.tx.is_empty() {
                            self.tx = buffer::take();
                        }
                        let n = loop {
                            match traffic.encrypt(data, &mut self.tx[self.tx_end..]) {
                                Ok(n) => break n,
                                Err(EncryptError::InsufficientSize(s)) => {
                                    self.tx.resize(self.tx_end + s.required_size, 0);
                                }
                                Err(EncryptError::EncryptExhausted) => {
                                    discard_rx(&mut self.rx, &mut self.rx_len, discard);
                                    return Err(io::Error::other("TLS sequence numbers exhausted"));
                                }
                            }
                        };
                        self.tx_end += n;
                        Some(Turn::Encrypted(data.len()))
                    }
                    Want::Close => {
                        if self.tx.is_empty() {
                            self.tx = buffer::take();
                        }
                        let n = loop {
                            match traffic.queue_close_notify(&mut self.tx[self.tx_end..]) {
                                Ok(n) => break n,
                                Err(EncryptError::InsufficientSize(s)) => {
                                    self.tx.resize(self.tx_end + s.required_size, 0);
                                }
                                Err(EncryptError::EncryptExhausted) => break 0,
                            }
                        };
                        self.tx_end += n;
                        Some(Turn::Encrypted(0))
                    }
                },
                Ok(ConnectionState::PeerClosed) => {
                    self.read_closed = true;
                    match want {
                        Want::Write(_) | Want::Close => None,
                        _ => Some(Turn::PeerClosed),
                    }
                }
                Ok(ConnectionState::Closed) => Some(Turn::Closed),
                // Early data is never enabled, so never offered; any future
                // state is an error rather than a guess.
                Ok(_) => {
                    discard_rx(&mut self.rx, &mut self.rx_len, discard);
                    return Err(io::Error::new(
                        ErrorKind::InvalidData,
                        "unexpected TLS connection state",
                    ));
                }
            };
            discard_rx(&mut self.rx, &mut self.rx_len, discard);
            if let Some(turn) = turn {
                return Ok(turn);
            }
        }
    }

    /// Reads more ciphertext from the socket. The receive buffer is taken
    /// only once the socket is readable. `Ok(0)` is the end of the stream.
    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        loop {
            ready!(self.tcp.poll_read_ready(cx))?;
            if self.rx.len() < buffer::SIZE {
                // Nothing held, or part of a record parked while the
                // socket was quiet: back into a full buffer.
                let mut full = buffer::take();
                full[..self.rx_len].copy_from_slice(&self.rx[..self.rx_len]);
                self.rx = full;
            }
            if self.rx_len == self.rx.len() {
                if self.rx.len() >= MAX_RECEIVE {
                    return Poll::Ready(Err(io::Error::new(
                        ErrorKind::InvalidData,
                        "TLS message too large",
                    )));
                }
                let grown = (self.rx.len() * 2).min(MAX_RECEIVE);
                self.rx.resize(grown, 0);
            }
            match self.tcp.try_read(&mut self.rx[self.rx_len..]) {
                Ok(n) => {
                    self.rx_len += n;
                    self.release_rx_if_empty();
                    return Poll::Ready(Ok(n));
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => {
                    self.park_rx();
                }
                Err(e) => {
                    self.release_rx_if_empty();
                    return Poll::Ready(Err(e));
                }
            }
        }
    }

    /// The socket is quiet: a part of a record waits in a buffer of its own
    /// size, so that a peer that stalls mid-record (a slow or hostile
    /// handshake) holds what it sent, not a whole receive buffer.
    fn park_rx(&mut self) {
        if self.rx_len == 0 || self.rx_len == self.rx.len() {
            self.release_rx_if_empty();
            return;
        }
        let parked = self.rx[..self.rx_len].to_vec();
        buffer::give(std::mem::replace(&mut self.rx, parked));
    }

    fn release_rx_if_empty(&mut self) {
        if self.rx_len == 0 && !self.rx.is_empty() {
            buffer::give(std::mem::take(&mut self.rx));
        }
    }

    /// Writes the queued ciphertext; the send buffer goes back to the pool
    /// once it is empty.
    fn poll_send(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.tx_start < self.tx_end {
            let n = ready!(
                Pin::new(&mut self.tcp).poll_write(cx, &self.tx[self.tx_start..self.tx_end])
            )?;
            if n == 0 {
                return Poll::Ready(Err(ErrorKind::WriteZero.into()));
            }
            self.tx_start += n;
        }
        self.tx_start = 0;
        self.tx_end = 0;
        if !self.tx.is_empty() {
            buffer::give(std::mem::take(&mut self.tx));
        }
        Poll::Ready(Ok(()))
    }

    fn poll_handshake(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        loop {
            match self.turn(&mut Want::Handshake)? {
                // rustls lets a TLS 1.3 server write once its own Finished
                // is queued; the handshake is over when the client's arrived.
                // A client may pipeline its first commands and even its
                // close_notify behind its Finished: they wait for the reader.
                Turn::Writable | Turn::PeerClosed | Turn::Closed if !self.conn.is_handshaking() => {
                    return Poll::Ready(Ok(()))
                }
                Turn::PeerClosed | Turn::Closed => {
                    return Poll::Ready(Err(io::Error::new(
                        ErrorKind::UnexpectedEof,
                        "peer closed the connection during the TLS handshake",
                    )))
                }
                _ => {
                    // Our flight goes out before we wait for the answer.
                    ready!(self.poll_send(cx))?;
                    if ready!(self.poll_fill(cx))? == 0 {
                        return Poll::Ready(Err(io::Error::new(
                            ErrorKind::UnexpectedEof,
                            "peer closed the connection during the TLS handshake",
                        )));
                    }
                }
            }
        }
    }

    /// After a failed handshake: write what rustls queued (the flight so
    /// far, then the alert) if the socket takes it at once. Never waits.
    fn send_alert(&mut self) {
        for _ in 0..16 {
            let UnbufferedStatus { state, .. } = self.conn.process_tls_records(&mut []);
            match state {
                Ok(ConnectionState::EncodeTlsData(mut encoder)) => {
                    encode(&mut encoder, &mut self.tx, &mut self.tx_end)
                }
                Ok(ConnectionState::TransmitTlsData(transmit)) => transmit.done(),
                _ => break,
            }
        }
        if self.tx_start < self.tx_end {
            let _ = self.tcp.try_write(&self.tx[self.tx_start..self.tx_end]);
        }
    }
}

/// Appends a TLS message rustls prepared to the send buffer.
fn encode<Data>(encoder: &mut EncodeTlsData<'_, Data>, tx: &mut Vec<u8>, tx_end: &mut usize) {
    if tx.is_empty() {
        *tx = buffer::take();
    }
    loop {
        match encoder.encode(&mut tx[*tx_end..]) {
            Ok(n) => *tx_end += n,
            Err(EncodeError::InsufficientSize(s)) => {
                tx.resize(*tx_end + s.required_size, 0);
                continue;
            }
            Err(EncodeError::AlreadyEncoded) => {}
        }
        return;
    }
}

/// Drops `n` processed bytes from the front of the receive buffer, and the
/// buffer itself once it is empty.
fn discard_rx(rx: &mut Vec<u8>, rx_len: &mut usize, n: usize) {
    if n == 0 {
        return;
    }
    rx.copy_within(n..*rx_len, 0);
    *rx_len -= n;
    if *rx_len == 0 {
        buffer::give(std::mem::take(rx));
    }
}

impl AsyncRead for TlsConn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if buf.remaining() == 0 {
            return Poll::Ready(Ok(()));
        }
        loop {
            if this.plain_start < this.plain.len() {
                let n = (this.plain.len() - this.plain_start).min(buf.remaining());
                buf.put_slice(&this.plain[this.plain_start..this.plain_start + n]);
                this.plain_start += n;
                if this.plain_start == this.plain.len() {
                    this.plain = Vec::new();
                    this.plain_start = 0;
                }
                return Poll::Ready(Ok(()));
            }
            if this.read_closed {
                return Poll::Ready(Ok(()));
            }
            let before = buf.filled().len();
            match this.turn(&mut Want::Read(buf))? {
                Turn::Delivered if buf.filled().len() > before => return Poll::Ready(Ok(())),
                // Everything went to the plaintext buffer.
                Turn::Delivered => continue,
                Turn::PeerClosed | Turn::Closed => return Poll::Ready(Ok(())),
                _ => {
                    // rustls may have queued something to send (a key
                    // update's answer): send it without waiting on it.
                    if this.tx_end > 0 {
                        if let Poll::Ready(Err(e)) = this.poll_send(cx) {
                            return Poll::Ready(Err(e));
                        }
                    }
                    if ready!(this.poll_fill(cx))? == 0 {
                        // tokio-rustls and OpenSSL agree: a stream cut
                        // without close_notify may have been truncated.
                        return Poll::Ready(Err(io::Error::new(
                            ErrorKind::UnexpectedEof,
                            "peer closed the connection without close_notify",
                        )));
                    }
                }
            }
        }
    }
}

impl AsyncWrite for TlsConn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if data.is_empty() {
            return Poll::Ready(Ok(0));
        }
        if this.close_queued {
            return Poll::Ready(Err(ErrorKind::BrokenPipe.into()));
        }
        loop {
            let free = if this.tx.is_empty() {
                buffer::SIZE
            } else {
                this.tx.len() - this.tx_end
            };
            let room = free.saturating_sub(RECORD_OVERHEAD * (free / MAX_FRAGMENT + 1));
            // Encrypt only into real room: a small remainder would cut a
            // write into an undersized record. Send what is queued first.
            if room < data.len().min(MAX_FRAGMENT) {
                ready!(this.poll_send(cx))?;
                continue;
            }
            let n = data.len().min(room);
            return match this.turn(&mut Want::Write(&data[..n]))? {
                Turn::Encrypted(n) => Poll::Ready(Ok(n)),
                _ => Poll::Ready(Err(ErrorKind::BrokenPipe.into())),
            };
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_send(cx))?;
        Pin::new(&mut this.tcp).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.close_queued {
            this.close_queued = true;
            this.turn(&mut Want::Close)?;
        }
        ready!(this.poll_send(cx))?;
        Pin::new(&mut this.tcp).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::net::TcpListener as StdListener;

    use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
    use rustls::{ClientConfig, ClientConnection, RootCertStore, StreamOwned};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn provider() -> Arc<rustls::crypto::CryptoProvider> {
        Arc::new(rustls::crypto::aws_lc_rs::default_provider())
    }

    fn configs(
        versions: &[&'static rustls::SupportedProtocolVersion],
    ) -> (Arc<ServerConfig>, Arc<ClientConfig>) {
        let made = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
        let cert: CertificateDer<'static> = made.cert.der().clone();
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(made.key_pair.serialize_der()));
        let server = ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(versions)
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(vec![cert.clone()], key)
            .unwrap();
        let mut roots = RootCertStore::empty();
        roots.add(cert).unwrap();
        let client = ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(versions)
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        (Arc::new(server), Arc::new(client))
    }

    /// A blocking rustls client in its own thread, and the accepted server side.
    async fn pair(
        versions: &[&'static rustls::SupportedProtocolVersion],
        client: impl FnOnce(StreamOwned<ClientConnection, std::net::TcpStream>) + Send + 'static,
    ) -> (TlsConn, std::thread::JoinHandle<()>) {
        let (server_config, client_config) = configs(versions);
        let listener = StdListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let thread = std::thread::spawn(move || {
            let sock = std::net::TcpStream::connect(addr).unwrap();
            sock.set_read_timeout(Some(std::time::Duration::from_secs(10)))
                .unwrap();
            let conn =
                ClientConnection::new(client_config, ServerName::try_from("localhost").unwrap())
                    .unwrap();
            client(StreamOwned::new(conn, sock));
        });
        let (sock, _) = listener.accept().unwrap();
        sock.set_nonblocking(true).unwrap();
        let tcp = TcpStream::from_std(sock).unwrap();
        let tls = tokio::time::timeout(
            std::time::Duration::from_secs(10),
            accept(tcp, server_config),
        )
        .await
        .expect("handshake in time")
        .expect("handshake");
        (tls, thread)
    }

    fn pattern(len: usize, seed: u8) -> Vec<u8> {
        (0..len)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
            .collect()
    }

    fn holds_no_buffer(tls: &TlsConn) -> bool {
        tls.rx.capacity() == 0 && tls.tx.capacity() == 0 && tls.plain.capacity() == 0
    }

    #[tokio::test(flavor = "current_thread")]
    async fn bulk_both_ways_with_small_reads_and_clean_close() {
        for versions in [
            &[&rustls::version::TLS13][..],
            &[&rustls::version::TLS12][..],
        ] {
            let up = pattern(1_000_003, 7);
            let down = pattern(777_777, 3);
            let (up_sent, down_expected) = (up.clone(), down.clone());
            let (mut tls, client) = pair(versions, move |mut s| {
                s.write_all(&up_sent).unwrap();
                s.flush().unwrap();
                let mut got = vec![0u8; down_expected.len()];
                s.read_exact(&mut got).unwrap();
                assert!(got == down_expected, "server bytes arrive intact");
                // The server's close_notify ends the stream cleanly.
                let mut rest = Vec::new();
                s.read_to_end(&mut rest).unwrap();
                assert!(rest.is_empty());
                s.conn.send_close_notify();
                s.conn.complete_io(&mut s.sock).unwrap();
            })
            .await;
            // Odd, small reads split records across calls.
            let mut got = Vec::with_capacity(up.len());
            let mut chunk = [0u8; 1000];
            while got.len() < up.len() {
                let n = tls.read(&mut chunk).await.unwrap();
                assert!(n > 0, "no early end of stream");
                got.extend_from_slice(&chunk[..n]);
            }
            assert!(got == up, "client bytes arrive intact");
            for part in down.chunks(5000) {
                tls.write_all(part).await.unwrap();
            }
            tls.flush().await.unwrap();
            assert!(
                holds_no_buffer(&tls),
                "nothing buffered once all is read and written"
            );
            tls.shutdown().await.unwrap();
            let mut rest = Vec::new();
            tls.read_to_end(&mut rest).await.unwrap();
            assert!(rest.is_empty(), "the client's close_notify is a clean end");
            client.join().unwrap();
        }
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_write_gets_past_unread_records_and_key_updates_are_answered() {
        let (mut tls, client) = pair(&[&rustls::version::TLS13], |mut s| {
            s.write_all(b"first").unwrap();
            s.flush().unwrap();
            s.conn.refresh_traffic_keys().unwrap();
            s.write_all(b" second").unwrap();
            s.flush().unwrap();
            let mut got = [0u8; 5];
            s.read_exact(&mut got).unwrap();
            assert_eq!(&got, b"hello");
            s.write_all(b" third").unwrap();
            s.flush().unwrap();
            let mut got = [0u8; 6];
            s.read_exact(&mut got).unwrap();
            assert_eq!(&got, b" again");
        })
        .await;
        // Wait until the client's records have arrived, unread.
        tokio::time::timeout(std::time::Duration::from_secs(10), tls.tcp.readable())
            .await
            .unwrap()
            .unwrap();
        tls.write_all(b"hello").await.unwrap();
        tls.flush().await.unwrap();
        let mut got = Vec::new();
        let mut chunk = [0u8; 64];
        while got.len() < b"first second third".len() {
            let n = tls.read(&mut chunk).await.unwrap();
            assert!(n > 0);
            got.extend_from_slice(&chunk[..n]);
        }
        assert_eq!(got, b"first second third");
        tls.write_all(b" again").await.unwrap();
        tls.flush().await.unwrap();
        client.join().unwrap();
        assert!(holds_no_buffer(&tls));
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_stream_cut_without_close_notify_is_an_unexpected_eof() {
        let (mut tls, client) = pair(&[&rustls::version::TLS13], |mut s| {
            s.write_all(b"bye").unwrap();
            s.flush().unwrap();
            s.sock.shutdown(std::net::Shutdown::Both).unwrap();
        })
        .await;
        let mut got = [0u8; 3];
        tls.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"bye");
        let err = tls
            .read(&mut got)
            .await
            .expect_err("truncation is reported");
        assert_eq!(err.kind(), ErrorKind::UnexpectedEof);
        client.join().unwrap();
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_failed_handshake_sends_the_alert() {
        let (server_config, _) = configs(&[&rustls::version::TLS13]);
        let mut server_config = (*server_config).clone();
        server_config.alpn_protocols = vec![b"imap".to_vec()];
        let (_, client_config) = configs(&[&rustls::version::TLS13]);
        let mut client_config = (*client_config).clone();
        client_config.alpn_protocols = vec![b"h2".to_vec()];
        let listener = StdListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let client = std::thread::spawn(move || {
            let mut sock = std::net::TcpStream::connect(addr).unwrap();
            let mut conn = ClientConnection::new(
                Arc::new(client_config),
                ServerName::try_from("localhost").unwrap(),
            )
            .unwrap();
            loop {
                if let Err(e) = conn.complete_io(&mut sock) {
                    return e.to_string();
                }
            }
        });
        let (sock, _) = listener.accept().unwrap();
        sock.set_nonblocking(true).unwrap();
        let err = accept(TcpStream::from_std(sock).unwrap(), Arc::new(server_config))
            .await
            .err()
            .expect("refused");
        let inner = err
            .get_ref()
            .unwrap()
            .downcast_ref::<rustls::Error>()
            .unwrap();
        assert_eq!(*inner, rustls::Error::NoApplicationProtocol);
        let seen = client.join().unwrap();
        assert!(seen.contains("NoApplicationProtocol"), "{seen}");
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_stalled_half_record_holds_what_arrived_not_a_whole_buffer() {
        let (server_config, _) = configs(&[&rustls::version::TLS13]);
        let listener = StdListener::bind("127.0.0.1:0").unwrap();
        let mut client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (sock, _) = listener.accept().unwrap();
        sock.set_nonblocking(true).unwrap();
        let mut tls = TlsConn::new(TcpStream::from_std(sock).unwrap(), server_config).unwrap();
        // A handshake record announcing 16 KiB, of which 16 000 bytes come.
        const SENT: usize = 16_000;
        let mut record = vec![0x16, 0x03, 0x01, 0x40, 0x00];
        record.resize(SENT, 0);
        client.write_all(&record).unwrap();
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
        while tls.rx_len < SENT {
            let polled = poll_fn(|cx| Poll::Ready(tls.poll_handshake(cx))).await;
            assert!(polled.is_pending(), "the handshake waits for the rest");
            if tls.rx_len < SENT {
                tokio::time::timeout_at(deadline, tls.tcp.readable())
                    .await
                    .expect("the bytes arrive")
                    .unwrap();
            }
        }
        // Stalled: the socket is quiet and the part waits in its own size.
        let polled = poll_fn(|cx| Poll::Ready(tls.poll_handshake(cx))).await;
        assert!(polled.is_pending());
        assert_eq!(tls.rx_len, SENT);
        assert_eq!(tls.rx.len(), SENT, "a pooled buffer is not held");
        assert!(tls.rx.capacity() < SENT + 1024);
        // The rest of the record: the handshake goes on (and fails on the
        // filler, which is no ClientHello).
        client.write_all(&[0u8; 16 * 1024 + 5 - SENT]).unwrap();
        let err = tokio::time::timeout_at(deadline, poll_fn(|cx| tls.poll_handshake(cx)))
            .await
            .expect("the whole record is read")
            .expect_err("filler is no ClientHello");
        assert_eq!(err.kind(), ErrorKind::InvalidData, "{err}");
    }
}
