//! A raw IMAP client for protocol-level tests: exact bytes out, lines in,
//! every read bounded by a timeout. TLS through rustls with a verifier that
//! accepts the test's self-signed certificate.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::sync::Arc;
use std::time::Duration;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{ClientConfig, ClientConnection, DigitallySignedStruct, SignatureScheme, StreamOwned};

/// How long a read or write may block: a closed connection is told from an
/// open one by this, and a loaded machine must not be taken for a hung one.
pub const TIMEOUT: Duration = Duration::from_secs(30);

trait Stream: Read + Write + Send {}
impl<T: Read + Write + Send> Stream for T {}

pub struct Client {
    reader: BufReader<Box<dyn Stream>>,
}

/// Accepts any certificate: the tests' server uses a self-signed one.
#[derive(Debug)]
struct AcceptAny;

impl ServerCertVerifier for AcceptAny {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Ok(HandshakeSignatureValid::assertion())
    }
    fn verify_tls13_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Ok(HandshakeSignatureValid::assertion())
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        rustls::crypto::ring::default_provider()
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// The verifier that accepts any certificate, for tests building their own config.
pub fn accept_any() -> Arc<dyn ServerCertVerifier> {
    Arc::new(AcceptAny)
}

pub fn client_config(alpn: &[&[u8]]) -> Arc<ClientConfig> {
    let mut config =
        ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .unwrap()
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AcceptAny))
            .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Arc::new(config)
}

/// Completes a TLS handshake over `tcp`; the error is rustls' own.
pub fn tls_over(
    tcp: TcpStream,
    sni: &str,
    alpn: &[&[u8]],
) -> Result<StreamOwned<ClientConnection, TcpStream>, std::io::Error> {
    let conn = ClientConnection::new(
        client_config(alpn),
        ServerName::try_from(sni.to_owned()).unwrap(),
    )
    .unwrap();
    let mut tls = StreamOwned::new(conn, tcp);
    while tls.conn.is_handshaking() {
        tls.conn.complete_io(&mut tls.sock)?;
    }
    Ok(tls)
}

/// A TCP connection to 127.0.0.1:`port` from the loopback address `from`
/// (e.g. 127.0.0.2, to tell the client from Postern's own connections).
pub fn tcp_from(from: &str, port: u16) -> TcpStream {
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    let local: std::net::SocketAddr = format!("{from}:0").parse().unwrap();
    socket.bind(&local.into()).unwrap();
    socket
        .connect(&std::net::SocketAddr::from(([127, 0, 0, 1], port)).into())
        .unwrap();
    let tcp: TcpStream = socket.into();
    tcp.set_read_timeout(Some(TIMEOUT)).unwrap();
    tcp.set_write_timeout(Some(TIMEOUT)).unwrap();
    tcp
}

pub fn tcp(port: u16) -> TcpStream {
    let s = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    s.set_read_timeout(Some(TIMEOUT)).unwrap();
    s.set_write_timeout(Some(TIMEOUT)).unwrap();
    s.set_nodelay(true).unwrap();
    s
}

impl Client {
    /// Implicit TLS; returns after reading the greeting.
    pub fn imaps(port: u16) -> (Client, String) {
        let tls = tls_over(tcp(port), "localhost", &[b"imap"]).expect("TLS handshake");
        let mut c = Client {
            reader: BufReader::new(Box::new(tls)),
        };
        let greeting = c.line();
        (c, greeting)
    }

    /// Wraps an already connected stream (the greeting is not read).
    pub fn from_stream<S: Read + Write + Send + 'static>(stream: S) -> Client {
        Client {
            reader: BufReader::new(Box::new(stream)),
        }
    }

    /// Plain TCP; returns after reading the greeting.
    pub fn plain(port: u16) -> (Client, String) {
        let mut c = Client {
            reader: BufReader::new(Box::new(tcp(port))),
        };
        let greeting = c.line();
        (c, greeting)
    }

    /// Plain TCP on a STARTTLS port, upgraded; the buffer must be empty.
    pub fn starttls(port: u16) -> Client {
        let s = tcp(port);
        let mut plain = BufReader::new(s.try_clone().unwrap());
        let mut greeting = String::new();
        plain.read_line(&mut greeting).unwrap();
        (&s).write_all(b"s1 STARTTLS\r\n").unwrap();
        let mut ok = String::new();
        plain.read_line(&mut ok).unwrap();
        assert!(ok.starts_with("s1 OK"), "{ok}");
        assert!(plain.buffer().is_empty());
        Client {
            reader: BufReader::new(Box::new(tls_over(s, "localhost", &[b"imap"]).unwrap())),
        }
    }

    pub fn send(&mut self, bytes: &[u8]) {
        let s = self.reader.get_mut();
        s.write_all(bytes).unwrap();
        s.flush().unwrap();
    }

    /// One line without CRLF; panics on timeout or EOF.
    pub fn line(&mut self) -> String {
        self.try_line().expect("a line from the server")
    }

    /// One line, or `None` at EOF or on error (a closed connection).
    pub fn try_line(&mut self) -> Option<String> {
        let mut buf = Vec::new();
        match self.reader.read_until(b'\n', &mut buf) {
            Ok(0) | Err(_) => None,
            Ok(_) => Some(
                String::from_utf8_lossy(&buf)
                    .trim_end_matches(['\r', '\n'])
                    .to_owned(),
            ),
        }
    }

    /// One line; `Ok(None)` at EOF, an error of kind `WouldBlock` or
    /// `TimedOut` when nothing came within the read timeout.
    pub fn next_line(&mut self) -> std::io::Result<Option<String>> {
        let mut buf = Vec::new();
        match self.reader.read_until(b'\n', &mut buf)? {
            0 => Ok(None),
            _ => Ok(Some(
                String::from_utf8_lossy(&buf)
                    .trim_end_matches(['\r', '\n'])
                    .to_owned(),
            )),
        }
    }

    /// Lines up to and including the tagged response for `tag`.
    pub fn until_tagged(&mut self, tag: &str) -> Vec<String> {
        let mut lines = Vec::new();
        loop {
            let line = self.line();
            let done = line.starts_with(&format!("{tag} "));
            lines.push(line);
            if done {
                return lines;
            }
        }
    }

    /// Sends `tag command` and returns the response lines.
    pub fn command(&mut self, tag: &str, command: &str) -> Vec<String> {
        self.send(format!("{tag} {command}\r\n").as_bytes());
        self.until_tagged(tag)
    }

    /// Reads exactly `n` bytes (a literal's content).
    pub fn bytes(&mut self, n: usize) -> Vec<u8> {
        let mut buf = vec![0; n];
        self.reader.read_exact(&mut buf).unwrap();
        buf
    }

    /// Reads until the server closes the connection (or a read times out);
    /// how many bytes that was.
    pub fn drain(&mut self) -> usize {
        let mut total = 0;
        let mut buf = vec![0; 64 * 1024];
        loop {
            match self.reader.read(&mut buf) {
                Ok(0) | Err(_) => return total,
                Ok(n) => total += n,
            }
        }
    }

    /// True when the server closes the connection within the timeout.
    pub fn closed(&mut self) -> bool {
        loop {
            let mut buf = Vec::new();
            match self.reader.read_until(b'\n', &mut buf) {
                Ok(0) => return true,
                Ok(_) => continue,
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    return false
                }
                // A reset or a TLS stream cut without close_notify: closed.
                Err(_) => return true,
            }
        }
    }

    /// `FETCH 1 BODY.PEEK[]` in the selected mailbox: the message, read
    /// as the literal it comes in, after which the response must end and
    /// the command succeed.
    pub fn fetch_first_message(&mut self) -> Vec<u8> {
        self.send(b"f FETCH 1 BODY.PEEK[]\r\n");
        let head = self.line();
        let size: usize = head
            .rsplit_once('{')
            .and_then(|(_, n)| n.strip_suffix('}'))
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("FETCH literal header: {head}"));
        let body = self.bytes(size);
        assert_eq!(self.line(), ")");
        let done = self.until_tagged("f");
        assert!(done.last().unwrap().starts_with("f OK"), "{done:?}");
        body
    }

    /// Selects INBOX and enters IDLE, up to the server's `+`.
    pub fn select_and_idle(&mut self) {
        let selected = self.command("s", "SELECT INBOX");
        assert!(selected.last().unwrap().starts_with("s OK"), "{selected:?}");
        self.send(b"i IDLE\r\n");
        assert!(self.line().starts_with('+'));
    }

    /// Implicit TLS and a LOGIN with the test password, which must succeed.
    pub fn logged_in(port: u16, user: &str) -> Client {
        let (mut c, _) = Client::imaps(port);
        let lines = c.login(user, super::postern::PASSWORD);
        assert!(
            lines.last().is_some_and(|l| l.starts_with("L1 OK")),
            "{user}: {lines:?}"
        );
        c
    }

    /// Logs in with the test password and out again; whether the login
    /// succeeded.
    pub fn login_ok(port: u16, user: &str) -> bool {
        let (mut c, _) = Client::imaps(port);
        let ok = c
            .login(user, super::postern::PASSWORD)
            .last()
            .is_some_and(|l| l.starts_with("L1 OK"));
        c.command("Z", "LOGOUT");
        ok
    }

    pub fn login(&mut self, user: &str, password: &str) -> Vec<String> {
        self.command("L1", &format!("LOGIN \"{user}\" \"{password}\""))
    }
}
