//! One IMAP or POP3 client connection: TCP (optionally under TLS), a small
//! read buffer, and just enough response parsing to find tagged replies and
//! skip literals (IMAP) or to check status lines (POP3). Every read is
//! bounded by `READ_TIMEOUT`.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::Resumption;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, HandshakeKind, SignatureScheme};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::timeout;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

/// Bound on each line read, each literal chunk, the connect and the handshake.
pub const READ_TIMEOUT: Duration = Duration::from_secs(10);
/// A response line longer than this is a protocol error, not something to buffer.
const MAX_LINE: usize = 64 * 1024;

pub type Result<T> = std::result::Result<T, String>;

/// Accepts any server certificate: the benchmark measures the proxies, and
/// every peer serves the same throwaway self-signed certificate. Signatures
/// are not checked either, which keeps client-side CPU out of the numbers.
#[derive(Debug)]
struct AcceptAnyCert(Arc<CryptoProvider>);

impl ServerCertVerifier for AcceptAnyCert {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> std::result::Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        Ok(HandshakeSignatureValid::assertion())
    }

    fn verify_tls13_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        Ok(HandshakeSignatureValid::assertion())
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// How many servers' tickets a resuming connector's store keeps; the
/// benchmark talks to one (`localhost`), and rustls keeps up to 8 TLS 1.3
/// tickets per server.
const RESUMPTION_SERVERS: usize = 8;

/// A TLS connector that trusts anything, sends SNI `localhost` and offers
/// no ALPN. Without `resume` it never resumes: every connection pays a full
/// handshake, as a fleet of distinct clients would. With `resume` it keeps
/// the TLS 1.3 session tickets it receives in its own in-memory store and
/// offers one (the newest; each is used once) on its next connection, as
/// one client that reconnects does: give each client loop its own
/// connector, so that loops do not share tickets.
pub fn tls_connector(resume: bool) -> Result<TlsConnector> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS config: {e}"))?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AcceptAnyCert(provider)))
        .with_no_client_auth();
    config.resumption = if resume {
        Resumption::in_memory_sessions(RESUMPTION_SERVERS)
    } else {
        Resumption::disabled()
    };
    Ok(TlsConnector::from(Arc::new(config)))
}

enum Stream {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_write(cx, data),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, data),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_flush(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

pub struct Conn {
    stream: Stream,
    /// Unread bytes are `buf[pos..end]`; the vector grows only for long lines.
    buf: Vec<u8>,
    pos: usize,
    end: usize,
}

impl Conn {
    /// Connects (TCP_NODELAY), does the TLS handshake when `tls` is given,
    /// and reads the IMAP greeting, which must be `* OK`. `buf_size` is the
    /// initial read buffer: small for idle sessions, large for bulk transfers.
    pub async fn open(
        target: SocketAddr,
        tls: Option<&TlsConnector>,
        buf_size: usize,
    ) -> Result<Conn> {
        let mut conn = Conn::connect(target, tls, buf_size).await?;
        let greeting = conn.line().await?;
        if !greeting.starts_with("* OK") {
            return Err(format!("greeting: {greeting}"));
        }
        Ok(conn)
    }

    /// Connects and does the TLS handshake, as `open`, but reads nothing:
    /// the caller reads the greeting of its protocol.
    pub async fn connect(
        target: SocketAddr,
        tls: Option<&TlsConnector>,
        buf_size: usize,
    ) -> Result<Conn> {
        let tcp = timeout(READ_TIMEOUT, TcpStream::connect(target))
            .await
            .map_err(|_| "connect: timed out".to_string())?
            .map_err(|e| format!("connect: {e}"))?;
        // Commands are single small writes; Nagle would only add delay.
        tcp.set_nodelay(true)
            .map_err(|e| format!("TCP_NODELAY: {e}"))?;
        let stream = match tls {
            None => Stream::Plain(tcp),
            Some(connector) => {
                let name = ServerName::try_from("localhost").expect("static name");
                let tls = timeout(READ_TIMEOUT, connector.connect(name, tcp))
                    .await
                    .map_err(|_| "TLS handshake: timed out".to_string())?
                    .map_err(|e| format!("TLS handshake: {e}"))?;
                Stream::Tls(Box::new(tls))
            }
        };
        Ok(Conn {
            stream,
            buf: vec![0; buf_size.max(512)],
            pos: 0,
            end: 0,
        })
    }

    /// The negotiated TLS version and cipher suite, or "none".
    pub fn tls_description(&self) -> String {
        match &self.stream {
            Stream::Plain(_) => "none".into(),
            Stream::Tls(s) => {
                let (_, c) = s.get_ref();
                let version = c.protocol_version().map(|v| format!("{v:?}"));
                let suite = c
                    .negotiated_cipher_suite()
                    .map(|s| format!("{:?}", s.suite()));
                format!(
                    "{}/{}",
                    version.unwrap_or_default(),
                    suite.unwrap_or_default()
                )
            }
        }
    }

    /// Whether the TLS handshake resumed an earlier session (with a ticket)
    /// rather than doing a full one; false without TLS.
    pub fn resumed(&self) -> bool {
        match &self.stream {
            Stream::Plain(_) => false,
            Stream::Tls(s) => s.get_ref().1.handshake_kind() == Some(HandshakeKind::Resumed),
        }
    }

    pub async fn send(&mut self, data: &[u8]) -> Result<()> {
        // write_all + flush: a TLS stream holds records until flushed.
        let io = async {
            self.stream.write_all(data).await?;
            self.stream.flush().await
        };
        timeout(READ_TIMEOUT, io)
            .await
            .map_err(|_| "write: timed out".to_string())?
            .map_err(|e| format!("write: {e}"))
    }

    /// Reads more bytes into the buffer (compacting or growing it first),
    /// waiting at most `limit`; end of stream is an error, since every
    /// caller still expects data. Cancel-safe: bytes count as read only once
    /// the read has returned them.
    async fn fill(&mut self, limit: Duration) -> Result<()> {
        if self.pos == self.end {
            self.pos = 0;
            self.end = 0;
        } else if self.end == self.buf.len() {
            if self.pos > 0 {
                self.buf.copy_within(self.pos..self.end, 0);
                self.end -= self.pos;
                self.pos = 0;
            } else if self.buf.len() >= MAX_LINE {
                return Err(format!("response line longer than {MAX_LINE} bytes"));
            } else {
                let len = (self.buf.len() * 2).min(MAX_LINE);
                self.buf.resize(len, 0);
            }
        }
        let n = timeout(limit, self.stream.read(&mut self.buf[self.end..]))
            .await
            .map_err(|_| format!("read: timed out after {} s", limit.as_secs()))?
            .map_err(|e| format!("read: {e}"))?;
        if n == 0 {
            return Err("connection closed by the server".into());
        }
        self.end += n;
        Ok(())
    }

    /// One response line without its CRLF (lossy UTF-8; only for matching).
    pub async fn line(&mut self) -> Result<String> {
        self.line_within(READ_TIMEOUT).await
    }

    /// As `line`, but each read waits up to `limit` instead of
    /// `READ_TIMEOUT`: for a session that waits in IDLE for the server to
    /// speak. Cancel-safe, so it can race another event in `select!`.
    pub async fn line_within(&mut self, limit: Duration) -> Result<String> {
        let mut scanned = 0;
        loop {
            let unread = &self.buf[self.pos..self.end];
            if let Some(i) = unread[scanned..].iter().position(|&b| b == b'\n') {
                let mut line = &unread[..scanned + i];
                if line.last() == Some(&b'\r') {
                    line = &line[..line.len() - 1];
                }
                let text = String::from_utf8_lossy(line).into_owned();
                self.pos += scanned + i + 1;
                return Ok(text);
            }
            // fill() may move the unread bytes to the buffer's start, but
            // keeps their order, so `scanned` stays valid.
            scanned = unread.len();
            self.fill(limit).await?;
        }
    }

    /// Consumes exactly `n` literal bytes: first what is buffered, then reads
    /// straight into `scratch` (large reads), never past the literal's end.
    async fn skip_literal(&mut self, mut n: u64, scratch: &mut Vec<u8>) -> Result<()> {
        let buffered = ((self.end - self.pos) as u64).min(n);
        self.pos += buffered as usize;
        n -= buffered;
        if n > 0 && scratch.is_empty() {
            scratch.resize(64 * 1024, 0);
        }
        while n > 0 {
            let want = (scratch.len() as u64).min(n) as usize;
            let got = timeout(READ_TIMEOUT, self.stream.read(&mut scratch[..want]))
                .await
                .map_err(|_| "read literal: timed out after 10 s".to_string())?
                .map_err(|e| format!("read literal: {e}"))?;
            if got == 0 {
                return Err("connection closed inside a literal".into());
            }
            n -= got as u64;
        }
        Ok(())
    }

    /// Reads responses until the one tagged `tag`; succeeds on `OK` and
    /// returns the number of literal bytes that came with the responses.
    pub async fn tagged(&mut self, tag: &str, scratch: &mut Vec<u8>) -> Result<u64> {
        let mut literal_bytes = 0;
        loop {
            let line = self.line().await?;
            if let Some(n) = literal_size(&line) {
                // The response continues after the literal; its remainder
                // is read as the next "line".
                self.skip_literal(n, scratch).await?;
                literal_bytes += n;
                continue;
            }
            if let Some(rest) = line.strip_prefix(tag).and_then(|r| r.strip_prefix(' ')) {
                if rest.starts_with("OK") {
                    return Ok(literal_bytes);
                }
                return Err(format!("server answered: {line}"));
            }
        }
    }

    /// Reads one POP3 status line: `+OK …` is returned, `-ERR …` (or
    /// anything else) is an error naming `what`.
    pub async fn pop3_ok(&mut self, what: &str) -> Result<String> {
        let line = self.line().await.map_err(|e| format!("{what}: {e}"))?;
        if line.starts_with("+OK") {
            Ok(line)
        } else {
            Err(format!("{what}: server answered: {line}"))
        }
    }

    /// Reads until a continuation request (`+ …`), e.g. after IDLE or APPEND.
    pub async fn continuation(&mut self, tag: &str) -> Result<()> {
        loop {
            let line = self.line().await?;
            if line.starts_with('+') {
                return Ok(());
            }
            if line.starts_with(tag) && line.as_bytes().get(tag.len()) == Some(&b' ') {
                return Err(format!("server answered: {line}"));
            }
        }
    }

    /// Shrinks the read buffer back to `size` if a long line grew it and
    /// nothing is pending; long-held idle sessions keep their footprint small.
    pub fn compact(&mut self, size: usize) {
        if self.pos == self.end && self.buf.len() > size {
            self.buf = vec![0; size];
            self.pos = 0;
            self.end = 0;
        }
    }
}

/// `{123}` or `{123+}` at the end of a line announces a literal.
fn literal_size(line: &str) -> Option<u64> {
    let body = line.strip_suffix('}')?;
    let open = body.rfind('{')?;
    let digits = body[open + 1..].trim_end_matches('+');
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::literal_size;

    #[test]
    fn literal_sizes() {
        assert_eq!(literal_size("* 1 FETCH (BODY[] {10485760}"), Some(10485760));
        assert_eq!(literal_size("* 1 FETCH (BODY[] {5+}"), Some(5));
        assert_eq!(literal_size("a OK done"), None);
        assert_eq!(literal_size("* OK {x}"), None);
        assert_eq!(literal_size("{}"), None);
    }
}
