//! In-process tests of the session pipeline: a [`Runtime`] built from a
//! YAML config, real loopback sockets, and scripted backends that speak
//! just enough IMAP or POP3 to log a user in and record what they were
//! sent. Time is paused: failure delays and the pre-auth timeout pass in
//! virtual time, and a read that would hang fails at once.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Notify};
use tokio::task::JoinHandle;
use tokio::time::{timeout, Instant};

use super::{run, ListenerInfo};
use crate::config::Config;
use crate::live::Runtime;
use crate::metrics::Metrics;
use crate::registry::Registry;
use crate::shutdown::Shutdown;
use crate::tls::SelfSignedMode;

const PASSWORD: &str = "pw-secret";

/// The longest any one read or write of a test may take (virtual time).
const WAIT: Duration = Duration::from_secs(20);

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

fn plain(user: &str, password: &str) -> String {
    b64(format!("\0{user}\0{password}").as_bytes())
}

/// The user and password of a SASL PLAIN initial response.
fn decode_plain(ir: &str) -> Option<(String, String)> {
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(ir.trim())
        .ok()?;
    let text = String::from_utf8(bytes).ok()?;
    let mut parts = text.splitn(3, '\0');
    let (_, user, password) = (parts.next()?, parts.next()?, parts.next()?);
    Some((user.to_owned(), password.to_owned()))
}

// ---------------------------------------------------------------------------
// Scripted backends

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Speaks {
    Imap,
    Pop3,
}

/// How a connection opens.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Opening {
    Greet,
    /// `-ERR` (POP3) or `* BYE` (IMAP) instead of a greeting, then close.
    BadGreeting,
    /// Accepted, then closed without a word.
    AcceptClose,
}

/// The answer to a login with the right password (a wrong one is refused).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Answer {
    Ok,
    InUse,
    Temp,
}

/// Where a POP3 backend announces XCLIENT.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Xclient {
    No,
    Capa,
    Greeting,
}

#[derive(Clone, Debug)]
struct Script {
    speaks: Speaks,
    opening: Opening,
    answer: Answer,
    xclient: Xclient,
    /// Accounts and passwords the backend accepts.
    accounts: Vec<(String, String)>,
    /// `RETR` sends its first line and body, then waits for
    /// [`Backend::release`] before the terminating dot.
    hold_retr: bool,
    /// POP3: the CAPA list (lines, CRLF each) instead of SASL PLAIN,
    /// PIPELINING and USER.
    capa: Option<&'static str>,
}

impl Script {
    fn new(speaks: Speaks) -> Script {
        Script {
            speaks,
            opening: Opening::Greet,
            answer: Answer::Ok,
            xclient: Xclient::No,
            accounts: Vec::new(),
            hold_retr: false,
            capa: None,
        }
    }

    fn accepts(&self, user: &str, password: &str) -> bool {
        password == PASSWORD
            || self
                .accounts
                .iter()
                .any(|(u, p)| u == user && p == password)
    }
}

struct Backend {
    addr: SocketAddr,
    /// Every line received, over every connection, in order.
    seen: watch::Receiver<Vec<String>>,
    connections: Arc<AtomicUsize>,
    release: Arc<Notify>,
    task: JoinHandle<()>,
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Backend {
    async fn start(script: Script) -> Backend {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, seen) = watch::channel(Vec::new());
        let tx = Arc::new(tx);
        let connections = Arc::new(AtomicUsize::new(0));
        let release = Arc::new(Notify::new());
        let task = {
            let connections = Arc::clone(&connections);
            let release = Arc::clone(&release);
            tokio::spawn(async move {
                while let Ok((tcp, _)) = listener.accept().await {
                    // No Nagle: with paused time a delayed segment would
                    // let the clock run out.
                    tcp.set_nodelay(true).unwrap();
                    connections.fetch_add(1, Ordering::SeqCst);
                    let (script, tx, release) =
                        (script.clone(), Arc::clone(&tx), Arc::clone(&release));
                    tokio::spawn(async move {
                        let _ = serve(tcp, &script, &tx, &release).await;
                    });
                }
            })
        };
        Backend {
            addr,
            seen,
            connections,
            release,
            task,
        }
    }

    fn connections(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }

    fn lines(&self) -> Vec<String> {
        self.seen.borrow().clone()
    }

    /// Waits until a line starting with `prefix` has been received.
    async fn saw(&self, prefix: &str) -> String {
        let mut rx = self.seen.clone();
        let found = timeout(
            WAIT,
            rx.wait_for(|lines| lines.iter().any(|l| l.starts_with(prefix))),
        )
        .await
        .unwrap_or_else(|_| panic!("backend never got {prefix:?}; it got {:?}", self.lines()))
        .unwrap();
        let line = found.iter().find(|l| l.starts_with(prefix)).unwrap();
        line.clone()
    }

    /// The credentials of the `AUTH[ENTICATE] PLAIN` the backend received.
    async fn login(&self, command: &str) -> (String, String) {
        let line = self.saw(command).await;
        let ir = line.rsplit(' ').next().unwrap();
        decode_plain(ir).unwrap_or_else(|| panic!("not a PLAIN response: {line}"))
    }
}

async fn serve(
    tcp: TcpStream,
    script: &Script,
    seen: &watch::Sender<Vec<String>>,
    release: &Notify,
) -> std::io::Result<()> {
    let (r, mut w) = tcp.into_split();
    let mut r = BufReader::new(r);
    let pop3 = script.speaks == Speaks::Pop3;
    match script.opening {
        Opening::AcceptClose => return Ok(()),
        Opening::BadGreeting => {
            let bye: &[u8] = if pop3 {
                b"-ERR [SYS/TEMP] Not ready, try later\r\n"
            } else {
                b"* BYE Not ready\r\n"
            };
            w.write_all(bye).await?;
            return Ok(());
        }
        Opening::Greet => {}
    }
    let greeting: &[u8] = match (script.speaks, script.xclient) {
        (Speaks::Imap, _) => b"* OK [CAPABILITY IMAP4rev1 SASL-IR AUTH=PLAIN ID] ready\r\n",
        (Speaks::Pop3, Xclient::Greeting) => b"+OK [XCLIENT] Scripted ready.\r\n",
        (Speaks::Pop3, _) => b"+OK Scripted ready.\r\n",
    };
    w.write_all(greeting).await?;
    let mut raw = String::new();
    // POP3: the name given by USER.
    let mut named = String::new();
    loop {
        raw.clear();
        if r.read_line(&mut raw).await? == 0 {
            return Ok(());
        }
        let line = raw.trim_end_matches(['\r', '\n']).to_owned();
        seen.send_modify(|lines| lines.push(line.clone()));
        let check =
            |user: &str, password: &str| script.accepts(user, password).then_some(script.answer);
        let login = |ir: &str| decode_plain(ir).and_then(|(u, p)| check(&u, &p));
        let answer = |verdict: Option<Answer>| -> String {
            match verdict {
                Some(Answer::Ok) => "+OK Logged in.\r\n".into(),
                Some(Answer::InUse) => {
                    "-ERR [IN-USE] Mailbox is locked by another POP3 session\r\n".into()
                }
                Some(Answer::Temp) => "-ERR [SYS/TEMP] Temporary failure, try again\r\n".into(),
                None => "-ERR [AUTH] Authentication failed.\r\n".into(),
            }
        };
        if pop3 {
            let (keyword, rest) = line.split_once(' ').unwrap_or((&line, ""));
            let out: String = match keyword.to_ascii_uppercase().as_str() {
                "CAPA" => {
                    let xclient = if script.xclient == Xclient::Capa {
                        "XCLIENT\r\n"
                    } else {
                        ""
                    };
                    let list = script
                        .capa
                        .unwrap_or("SASL PLAIN\r\nPIPELINING\r\nUSER\r\n");
                    format!("+OK\r\n{list}{xclient}.\r\n")
                }
                "USER" => {
                    named = rest.to_owned();
                    "+OK\r\n".into()
                }
                "PASS" => answer(check(&named, rest)),
                "XCLIENT" => "+OK\r\n".into(),
                "AUTH" => answer(login(rest.strip_prefix("PLAIN ").unwrap_or_default())),
                "STAT" => "+OK 2 320\r\n".into(),
                "NOOP" => "+OK\r\n".into(),
                "RETR" => {
                    w.write_all(b"+OK 7 octets\r\nhello\r\n").await?;
                    if script.hold_retr {
                        release.notified().await;
                    }
                    ".\r\n".into()
                }
                "QUIT" => {
                    w.write_all(b"+OK Bye\r\n").await?;
                    return Ok(());
                }
                _ => "-ERR Unknown command\r\n".into(),
            };
            w.write_all(out.as_bytes()).await?;
        } else {
            let (tag, rest) = line.split_once(' ').unwrap_or((&line, ""));
            let (command, args) = rest.split_once(' ').unwrap_or((rest, ""));
            let out = match command.to_ascii_uppercase().as_str() {
                "ID" => format!("* ID NIL\r\n{tag} OK ID completed\r\n"),
                "AUTHENTICATE" => match login(args.strip_prefix("PLAIN ").unwrap_or_default()) {
                    Some(Answer::Ok) => {
                        format!("{tag} OK [CAPABILITY IMAP4rev1 IDLE MOVE] Logged in\r\n")
                    }
                    Some(_) => format!("{tag} NO [UNAVAILABLE] Try again later\r\n"),
                    None => format!("{tag} NO [AUTHENTICATIONFAILED] Authentication failed.\r\n"),
                },
                "SELECT" => format!("* 2 EXISTS\r\n{tag} OK [READ-WRITE] Select completed.\r\n"),
                "LOGOUT" => {
                    let bye = format!("* BYE Logging out\r\n{tag} OK Logout completed.\r\n");
                    w.write_all(bye.as_bytes()).await?;
                    return Ok(());
                }
                other => format!("{tag} OK {other} completed\r\n"),
            };
            w.write_all(out.as_bytes()).await?;
        }
    }
}

// ---------------------------------------------------------------------------
// The proxy under test

/// A pool entry for a scripted backend: POP3 goes to `pop3_port` on the
/// same host, so the backend's own port is that one and `address` names
/// an IMAP port (the backend's own for IMAP).
fn entry(name: &str, b: &Backend) -> String {
    format!(
        "    - {{ name: {name}, address: \"127.0.0.1:{port}\", pop3_port: {port} }}\n",
        port = b.addr.port()
    )
}

/// A users-file entry with the test password, optionally pinned.
fn user(name: &str, pinned: Option<&str>) -> String {
    let pin = pinned
        .map(|b| format!(", backend: {b}"))
        .unwrap_or_default();
    format!("  - {{ user: \"{name}\", password: \"{{PLAIN}}{PASSWORD}\"{pin} }}\n")
}

fn user_with(name: &str, password: &str) -> String {
    format!("  - {{ user: \"{name}\", password: \"{{PLAIN}}{password}\" }}\n")
}

/// What a test sets; the rest is the default test configuration.
struct Setup<'a> {
    /// The listener's keys after `name` and `bind`.
    listener: &'a str,
    /// `backends.pool` entries ([`entry`]).
    pool: String,
    /// `users:` entries ([`user`]).
    users: String,
    /// Top-level YAML appended (a `limits:` block).
    extra: &'a str,
    /// The login defence on (blocks after failures for two names), else off.
    brute_force: bool,
}

const POP3_PLAIN: &str = "tls: starttls, protocol: pop3, allow_plaintext_auth: true";
const POP3_STLS: &str = "tls: starttls, protocol: pop3";
const IMAP_PLAIN: &str = "tls: starttls, protocol: imap, allow_plaintext_auth: true";
const IMAP_STARTTLS: &str = "tls: starttls, protocol: imap";

struct Proxy {
    rt: Arc<Runtime>,
    info: Arc<ListenerInfo>,
    shutdown: Arc<Shutdown>,
    registry: Arc<Registry>,
    dir: PathBuf,
}

impl Drop for Proxy {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Proxy {
    fn new(setup: Setup<'_>) -> Proxy {
        let _ = tracing_subscriber::fmt()
            .with_env_filter("debug")
            .with_test_writer()
            .try_init();
        static COUNTER: AtomicU32 = AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!(
            "postern-pipeline-{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("users.yaml"), format!("users:\n{}", setup.users)).unwrap();
        let text = format!(
            "listeners:\n  - {{ name: test, bind: \"127.0.0.1:0\", {listener} }}\n\
             tls:\n  self_signed: {{ dir: tls, names: [localhost] }}\n\
             auth:\n  source: static\n  static: {{ users_file: users.yaml }}\n  \
             failure_delay: 2s\n  brute_force: {brute_force}\n\
             backends:\n  connect_timeout: 2s\n  login_timeout: 5s\n  \
             health_check: {{ enabled: false }}\n  pool:\n{pool}{extra}\n",
            listener = setup.listener,
            pool = setup.pool,
            extra = setup.extra,
            brute_force = if setup.brute_force {
                "{ enabled: true, block_after: 2, familiar_for: 1h }"
            } else {
                "{ enabled: false }"
            },
        );
        let path = dir.join("postern.yaml");
        let config = Config::parse(&text, &path).unwrap_or_else(|e| panic!("{e}\n{text}"));
        let l = &config.listeners[0];
        let info = Arc::new(ListenerInfo {
            name: l.name.clone(),
            tls: l.tls,
            protocol: l.protocol,
            allow_plaintext_auth: l.allow_plaintext_auth,
            proxy_protocol: l.proxy_protocol.clone(),
        });
        let rt = Runtime::build(config, Metrics::new(), SelfSignedMode::InMemory, None)
            .expect("runtime builds");
        Proxy {
            rt: Arc::new(rt),
            info,
            shutdown: Arc::default(),
            registry: Arc::default(),
            dir,
        }
    }

    /// A client connected to a session of the listener under test.
    async fn connect(&self) -> (Client<TcpStream>, JoinHandle<()>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        client.set_nodelay(true).unwrap();
        let (tcp, peer) = listener.accept().await.unwrap();
        let session = tokio::spawn(run(
            tcp,
            peer,
            Arc::clone(&self.info),
            Arc::clone(&self.rt),
            Arc::clone(&self.shutdown),
            Arc::clone(&self.registry),
        ));
        (Client::new(client), session)
    }

    /// How many sessions of the listener's protocol ended for `reason`.
    fn ended(&self, reason: &str) -> u64 {
        self.rt
            .metrics
            .sessions_ended
            .with_label_values(&[self.info.protocol.as_str(), reason])
            .get()
    }
}

/// Waits for a session to end.
async fn ended(session: JoinHandle<()>) {
    timeout(WAIT, session)
        .await
        .expect("the session ends")
        .expect("the session does not panic");
}

// ---------------------------------------------------------------------------
// The client

struct Client<S> {
    stream: S,
    buf: Vec<u8>,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Client<S> {
    fn new(stream: S) -> Client<S> {
        Client {
            stream,
            buf: Vec::new(),
        }
    }

    async fn send(&mut self, text: &str) {
        timeout(WAIT, async {
            self.stream.write_all(text.as_bytes()).await?;
            self.stream.flush().await
        })
        .await
        .expect("write in time")
        .expect("write");
    }

    /// More bytes; `false` at the end of the stream.
    async fn fill(&mut self) -> bool {
        let mut chunk = [0u8; 4096];
        let n = timeout(WAIT, self.stream.read(&mut chunk))
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "nothing more to read; have {:?}",
                    String::from_utf8_lossy(&self.buf)
                )
            })
            .unwrap_or(0);
        self.buf.extend_from_slice(&chunk[..n]);
        n > 0
    }

    /// One line, without its CRLF.
    async fn line(&mut self) -> String {
        loop {
            if let Some(at) = self.buf.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = self.buf.drain(..=at).collect();
                let line = String::from_utf8_lossy(&line);
                return line.trim_end_matches(['\r', '\n']).to_owned();
            }
            if !self.fill().await {
                panic!(
                    "closed before a whole line; have {:?}",
                    String::from_utf8_lossy(&self.buf)
                );
            }
        }
    }

    /// One line, which must start with `prefix`.
    async fn expect(&mut self, prefix: &str) -> String {
        let line = self.line().await;
        assert!(
            line.starts_with(prefix),
            "expected {prefix:?}, got {line:?}"
        );
        line
    }

    /// The lines of a POP3 multi-line answer after its status line, up to
    /// the terminating dot.
    async fn multiline(&mut self) -> Vec<String> {
        let mut lines = Vec::new();
        loop {
            let line = self.line().await;
            if line == "." {
                return lines;
            }
            lines.push(line);
        }
    }

    /// Everything up to the end of the stream, which must come.
    async fn rest(&mut self) -> String {
        while self.fill().await {}
        String::from_utf8_lossy(&std::mem::take(&mut self.buf)).into_owned()
    }

    /// The end of the stream, with nothing before it.
    async fn closed(&mut self) {
        let rest = self.rest().await;
        assert!(rest.is_empty(), "expected the end, got {rest:?}");
    }
}

impl Client<TcpStream> {
    /// TLS over the connection (after STLS or STARTTLS), accepting any
    /// certificate.
    async fn tls(self) -> Client<tokio_rustls::client::TlsStream<TcpStream>> {
        self.tls_alpn(&[]).await
    }

    /// TLS offering the ALPN protocols `alpn`.
    async fn tls_alpn(self, alpn: &[&[u8]]) -> Client<tokio_rustls::client::TlsStream<TcpStream>> {
        assert!(self.buf.is_empty(), "bytes before the TLS handshake");
        let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::aws_lc_rs::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AcceptAny))
        .with_no_client_auth();
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
        let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
        let tls = timeout(WAIT, connector.connect(name, self.stream))
            .await
            .expect("handshake in time")
            .expect("handshake");
        Client::new(tls)
    }
}

/// Accepts any certificate: the proxy's is self-signed.
#[derive(Debug)]
struct AcceptAny;

impl rustls::client::danger::ServerCertVerifier for AcceptAny {
    fn verify_server_cert(
        &self,
        _: &rustls_pki_types::CertificateDer<'_>,
        _: &[rustls_pki_types::CertificateDer<'_>],
        _: &rustls_pki_types::ServerName<'_>,
        _: &[u8],
        _: rustls_pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _: &[u8],
        _: &rustls_pki_types::CertificateDer<'_>,
        _: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        Ok(rustls::client::danger::HandshakeSignatureValid::assertion())
    }

    fn verify_tls13_signature(
        &self,
        _: &[u8],
        _: &rustls_pki_types::CertificateDer<'_>,
        _: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        Ok(rustls::client::danger::HandshakeSignatureValid::assertion())
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        rustls::crypto::aws_lc_rs::default_provider()
            .signature_verification_algorithms
            .supported_schemes()
    }
}

// ---------------------------------------------------------------------------
// Common set-ups

/// A POP3 proxy in front of one scripted backend, alice a hash-placed user.
async fn pop3_one(listener: &str, script: Script, extra: &str) -> (Proxy, Backend) {
    let b = Backend::start(script).await;
    let proxy = Proxy::new(Setup {
        listener,
        pool: entry("b1", &b),
        users: user("alice", None),
        extra,
        brute_force: false,
    });
    (proxy, b)
}

async fn imap_one(listener: &str, script: Script, extra: &str) -> (Proxy, Backend) {
    let b = Backend::start(script).await;
    let proxy = Proxy::new(Setup {
        listener,
        pool: entry("b1", &b),
        users: user("alice", None),
        extra,
        brute_force: false,
    });
    (proxy, b)
}

/// Reads the POP3 greeting.
async fn pop3_greeted(proxy: &Proxy) -> (Client<TcpStream>, JoinHandle<()>) {
    let (mut c, session) = proxy.connect().await;
    c.expect("+OK Postern ready.").await;
    (c, session)
}

async fn imap_greeted(proxy: &Proxy) -> (Client<TcpStream>, JoinHandle<()>) {
    let (mut c, session) = proxy.connect().await;
    c.expect("* OK [CAPABILITY IMAP4rev1").await;
    (c, session)
}

// ---------------------------------------------------------------------------
// POP3

#[tokio::test(start_paused = true)]
async fn pop3_user_pass_login_relays_the_next_command_with_xclient() {
    let mut script = Script::new(Speaks::Pop3);
    script.xclient = Xclient::Capa;
    let (proxy, b) = pop3_one(POP3_PLAIN, script, "").await;
    let (mut c, session) = pop3_greeted(&proxy).await;
    let client_port = {
        // The session's peer is the client's end of the connection.
        c.stream.local_addr().unwrap().port()
    };
    c.send("USER alice\r\n").await;
    c.expect("+OK Send your password").await;
    c.send(&format!("PASS {PASSWORD}\r\n")).await;
    c.expect("+OK Logged in.").await;
    c.send("STAT\r\n").await;
    assert_eq!(c.line().await, "+OK 2 320");
    let lines = b.lines();
    assert_eq!(lines[0], "CAPA", "{lines:?}");
    assert_eq!(
        lines[1],
        format!("XCLIENT ADDR=127.0.0.1 PORT={client_port}"),
        "{lines:?}"
    );
    assert_eq!(
        b.login("AUTH PLAIN").await,
        ("alice".into(), PASSWORD.into())
    );
    assert_eq!(lines.last().unwrap(), "STAT");
    c.send("QUIT\r\n").await;
    c.expect("+OK Bye").await;
    c.closed().await;
    drop(c);
    ended(session).await;
    assert_eq!(b.connections(), 1);
}

#[tokio::test(start_paused = true)]
async fn pop3_xclient_announced_in_the_greeting_is_used() {
    let mut script = Script::new(Speaks::Pop3);
    script.xclient = Xclient::Greeting;
    let (proxy, b) = pop3_one(POP3_PLAIN, script, "").await;
    let (mut c, _session) = pop3_greeted(&proxy).await;
    let client_port = c.stream.local_addr().unwrap().port();
    c.send(&format!("AUTH PLAIN {}\r\n", plain("alice", PASSWORD)))
        .await;
    c.expect("+OK Logged in.").await;
    let xclient = b.saw("XCLIENT").await;
    assert_eq!(
        xclient,
        format!("XCLIENT ADDR=127.0.0.1 PORT={client_port}")
    );
}

#[tokio::test(start_paused = true)]
async fn pop3_no_xclient_where_the_backend_does_not_offer_it() {
    let (proxy, b) = pop3_one(POP3_PLAIN, Script::new(Speaks::Pop3), "").await;
    let (mut c, _session) = pop3_greeted(&proxy).await;
    c.send(&format!("AUTH PLAIN {}\r\n", plain("alice", PASSWORD)))
        .await;
    c.expect("+OK Logged in.").await;
    b.saw("AUTH PLAIN").await;
    assert!(
        !b.lines().iter().any(|l| l.starts_with("XCLIENT")),
        "{:?}",
        b.lines()
    );
}

#[tokio::test(start_paused = true)]
async fn pop3_commands_pipelined_after_the_login_reach_the_backend() {
    let (proxy, b) = pop3_one(POP3_PLAIN, Script::new(Speaks::Pop3), "").await;
    let (mut c, _session) = pop3_greeted(&proxy).await;
    c.send(&format!(
        "USER alice\r\nPASS {PASSWORD}\r\nSTAT\r\nNOOP\r\n"
    ))
    .await;
    c.expect("+OK Send your password").await;
    c.expect("+OK Logged in.").await;
    assert_eq!(c.line().await, "+OK 2 320");
    assert_eq!(c.line().await, "+OK");
    b.saw("NOOP").await;
}

#[tokio::test(start_paused = true)]
async fn pop3_wrong_password_is_refused_after_the_failure_delay_and_never_reaches_a_backend() {
    let (proxy, b) = pop3_one(POP3_PLAIN, Script::new(Speaks::Pop3), "").await;
    let (mut c, _session) = pop3_greeted(&proxy).await;
    c.send("USER alice\r\n").await;
    c.expect("+OK").await;
    let sent = Instant::now();
    c.send("PASS wrong\r\n").await;
    assert_eq!(c.line().await, "-ERR [AUTH] Authentication failed.");
    let took = sent.elapsed();
    assert!(
        took >= Duration::from_secs(2) && took < Duration::from_secs(3),
        "answered after {took:?}, not after failure_delay"
    );
    // An unknown user reads the same.
    c.send(&format!("AUTH PLAIN {}\r\n", plain("mallory", PASSWORD)))
        .await;
    assert_eq!(c.line().await, "-ERR [AUTH] Authentication failed.");
    assert_eq!(b.connections(), 0, "the backend was reached");
    // The connection goes on: the right password now logs in.
    c.send(&format!("AUTH PLAIN {}\r\n", plain("alice", PASSWORD)))
        .await;
    c.expect("+OK Logged in.").await;
    assert_eq!(b.connections(), 1);
}

#[tokio::test(start_paused = true)]
async fn pop3_too_many_failed_logins_end_the_session() {
    let (proxy, b) = pop3_one(
        POP3_PLAIN,
        Script::new(Speaks::Pop3),
        "limits:\n  max_auth_failures: 2\n",
    )
    .await;
    let (mut c, session) = pop3_greeted(&proxy).await;
    c.send(&format!("AUTH PLAIN {}\r\n", plain("alice", "wrong")))
        .await;
    assert_eq!(c.line().await, "-ERR [AUTH] Authentication failed.");
    c.send(&format!("AUTH PLAIN {}\r\n", plain("alice", "wrong")))
        .await;
    assert_eq!(
        c.line().await,
        "-ERR [AUTH] Authentication failed. Too many failed logins, closing."
    );
    c.closed().await;
    ended(session).await;
    assert_eq!(proxy.ended("too_many_auth_failures"), 1);
    assert_eq!(b.connections(), 0);
}

#[tokio::test(start_paused = true)]
async fn pop3_auth_plain_with_initial_response() {
    let (proxy, b) = pop3_one(POP3_PLAIN, Script::new(Speaks::Pop3), "").await;
    let (mut c, _session) = pop3_greeted(&proxy).await;
    c.send(&format!("AUTH PLAIN {}\r\n", plain("alice", PASSWORD)))
        .await;
    c.expect("+OK Logged in.").await;
    c.send("STAT\r\n").await;
    assert_eq!(c.line().await, "+OK 2 320");
    assert_eq!(
        b.login("AUTH PLAIN").await,
        ("alice".into(), PASSWORD.into())
    );
}

#[tokio::test(start_paused = true)]
async fn pop3_auth_plain_by_continuation() {
    let (proxy, b) = pop3_one(POP3_PLAIN, Script::new(Speaks::Pop3), "").await;
    let (mut c, _session) = pop3_greeted(&proxy).await;
    c.send("auth plain\r\n").await;
    assert_eq!(c.line().await, "+ ");
    c.send(&format!("{}\r\n", plain("alice", PASSWORD))).await;
    c.expect("+OK Logged in.").await;
    c.send("STAT\r\n").await;
    assert_eq!(c.line().await, "+OK 2 320");
    assert_eq!(
        b.login("AUTH PLAIN").await,
        ("alice".into(), PASSWORD.into())
    );
}

#[tokio::test(start_paused = true)]
async fn pop3_auth_plain_empty_and_cancelled_exchanges_are_answered_and_the_session_goes_on() {
    let (proxy, b) = pop3_one(POP3_PLAIN, Script::new(Speaks::Pop3), "").await;
    let (mut c, _session) = pop3_greeted(&proxy).await;
    // `=`: an empty initial response, which is no PLAIN message.
    c.send("AUTH PLAIN =\r\n").await;
    c.expect("-ERR ").await;
    // `=` answering the continuation: the same.
    c.send("AUTH PLAIN\r\n").await;
    assert_eq!(c.line().await, "+ ");
    c.send("=\r\n").await;
    c.expect("-ERR ").await;
    // `*` cancels.
    c.send("AUTH PLAIN\r\n").await;
    assert_eq!(c.line().await, "+ ");
    c.send("*\r\n").await;
    assert_eq!(c.line().await, "-ERR Authentication cancelled");
    assert_eq!(b.connections(), 0);
    c.send(&format!("AUTH PLAIN {}\r\n", plain("alice", PASSWORD)))
        .await;
    c.expect("+OK Logged in.").await;
}

#[tokio::test(start_paused = true)]
async fn pop3_auth_login_with_and_without_initial_response() {
    let (proxy, b) = pop3_one(POP3_PLAIN, Script::new(Speaks::Pop3), "").await;
    // By prompts.
    let (mut c, _first) = pop3_greeted(&proxy).await;
    c.send("AUTH LOGIN\r\n").await;
    assert_eq!(c.line().await, "+ VXNlcm5hbWU6");
    c.send(&format!("{}\r\n", b64(b"alice"))).await;
    assert_eq!(c.line().await, "+ UGFzc3dvcmQ6");
    c.send(&format!("{}\r\n", b64(PASSWORD.as_bytes()))).await;
    c.expect("+OK Logged in.").await;
    c.send("STAT\r\n").await;
    assert_eq!(c.line().await, "+OK 2 320");
    // The user name as the initial response; `*` at the password cancels.
    let (mut d, _second) = pop3_greeted(&proxy).await;
    d.send(&format!("AUTH LOGIN {}\r\n", b64(b"alice"))).await;
    assert_eq!(d.line().await, "+ UGFzc3dvcmQ6");
    d.send("*\r\n").await;
    assert_eq!(d.line().await, "-ERR Authentication cancelled");
    d.send(&format!("AUTH LOGIN {}\r\n", b64(b"alice"))).await;
    assert_eq!(d.line().await, "+ UGFzc3dvcmQ6");
    d.send(&format!("{}\r\n", b64(PASSWORD.as_bytes()))).await;
    d.expect("+OK Logged in.").await;
    assert_eq!(b.connections(), 2);
}

#[tokio::test(start_paused = true)]
async fn pop3_capa_and_auth_listing() {
    let (proxy, _b) = pop3_one(POP3_PLAIN, Script::new(Speaks::Pop3), "").await;
    let (mut c, _session) = pop3_greeted(&proxy).await;
    c.send("CAPA\r\n").await;
    c.expect("+OK").await;
    let caps = c.multiline().await;
    for cap in [
        "USER",
        "SASL PLAIN LOGIN",
        "STLS",
        "PIPELINING",
        "RESP-CODES",
    ] {
        assert!(caps.iter().any(|c| c == cap), "{cap} missing: {caps:?}");
    }
    c.send("AUTH\r\n").await;
    c.expect("+OK").await;
    assert_eq!(c.multiline().await, ["PLAIN", "LOGIN"]);
}

#[tokio::test(start_paused = true)]
async fn pop3_logins_before_stls_are_refused_and_stls_discards_pipelined_bytes() {
    let (proxy, b) = pop3_one(POP3_STLS, Script::new(Speaks::Pop3), "").await;
    let (mut c, _session) = pop3_greeted(&proxy).await;
    c.send("CAPA\r\n").await;
    c.expect("+OK").await;
    let caps = c.multiline().await;
    assert!(caps.iter().any(|c| c == "STLS"), "{caps:?}");
    assert!(
        !caps.iter().any(|c| c == "USER" || c.starts_with("SASL")),
        "{caps:?}"
    );
    for command in [
        "USER alice".to_owned(),
        format!("PASS {PASSWORD}"),
        format!("AUTH PLAIN {}", plain("alice", PASSWORD)),
    ] {
        c.send(&format!("{command}\r\n")).await;
        c.expect("-ERR [SYS/PERM]").await;
    }
    assert_eq!(b.connections(), 0);
    // Sent with STLS, in plaintext: never read.
    let injected = "USER mallory\r\n";
    c.send(&format!("STLS\r\n{injected}")).await;
    assert_eq!(c.line().await, "+OK Begin TLS negotiation now");
    let mut t = c.tls().await;
    t.send("CAPA\r\n").await;
    t.expect("+OK").await;
    let caps = t.multiline().await;
    assert!(caps.iter().any(|c| c == "USER"), "{caps:?}");
    assert!(caps.iter().any(|c| c == "SASL PLAIN LOGIN"), "{caps:?}");
    assert!(!caps.iter().any(|c| c == "STLS"), "{caps:?}");
    assert_eq!(
        proxy.rt.metrics.starttls_discarded_bytes.get(),
        injected.len() as u64
    );
    // The discarded USER set no name: PASS needs one of its own.
    t.send(&format!("PASS {PASSWORD}\r\n")).await;
    t.expect("-ERR PASS comes after USER").await;
    t.send("STLS\r\n").await;
    t.expect("-ERR TLS is already active").await;
    t.send(&format!("USER alice\r\nPASS {PASSWORD}\r\n")).await;
    t.expect("+OK Send your password").await;
    t.expect("+OK Logged in.").await;
    t.send("STAT\r\n").await;
    assert_eq!(t.line().await, "+OK 2 320");
    assert_eq!(b.login("AUTH PLAIN").await.0, "alice");
}

#[tokio::test(start_paused = true)]
async fn pop3_long_passwords_pass_through_pass() {
    let long1: String = "k".repeat(1024);
    let long4: String = (0..4096)
        .map(|i| char::from(b'a' + (i % 26) as u8))
        .collect();
    let mut script = Script::new(Speaks::Pop3);
    script.accounts = vec![
        ("kilo".into(), long1.clone()),
        ("four".into(), long4.clone()),
    ];
    let b = Backend::start(script).await;
    let proxy = Proxy::new(Setup {
        listener: POP3_PLAIN,
        pool: entry("b1", &b),
        users: user_with("kilo", &long1) + &user_with("four", &long4),
        extra: "",
        brute_force: false,
    });
    for (name, password) in [("kilo", &long1), ("four", &long4)] {
        let (mut c, _session) = pop3_greeted(&proxy).await;
        c.send(&format!("USER {name}\r\nPASS {password}\r\n")).await;
        c.expect("+OK Send your password").await;
        c.expect("+OK Logged in.").await;
        c.send("STAT\r\n").await;
        assert_eq!(c.line().await, "+OK 2 320");
    }
    let logins: Vec<(String, String)> = b
        .lines()
        .iter()
        .filter_map(|l| l.strip_prefix("AUTH PLAIN ").and_then(decode_plain))
        .collect();
    assert_eq!(
        logins,
        [("kilo".to_owned(), long1), ("four".to_owned(), long4)]
    );
}

#[tokio::test(start_paused = true)]
async fn pop3_in_use_from_the_backend_is_passed_on_as_said() {
    let mut script = Script::new(Speaks::Pop3);
    script.answer = Answer::InUse;
    let (proxy, b) = pop3_one(POP3_PLAIN, script, "").await;
    let (mut c, session) = pop3_greeted(&proxy).await;
    c.send(&format!("USER alice\r\nPASS {PASSWORD}\r\n")).await;
    c.expect("+OK").await;
    assert_eq!(
        c.line().await,
        "-ERR [IN-USE] Mailbox is locked by another POP3 session"
    );
    // Not a failed login: the client may try again, or leave.
    c.send("QUIT\r\n").await;
    assert_eq!(c.line().await, "+OK Bye");
    c.closed().await;
    ended(session).await;
    assert_eq!(proxy.ended("logout"), 1);
    assert_eq!(b.connections(), 1);
}

/// Two backends, b1 scripted as `first`; a hash-placed user whose first
/// choice is b1 (and a pinned one, on b1).
async fn pop3_two(first: Script) -> (Proxy, Backend, Backend, String) {
    let b1 = Backend::start(first).await;
    let b2 = Backend::start(Script::new(Speaks::Pop3)).await;
    let names: Vec<String> = (0..16).map(|i| format!("user{i}")).collect();
    let users: String =
        names.iter().map(|n| user(n, None)).collect::<String>() + &user("pinned", Some("b1"));
    let proxy = Proxy::new(Setup {
        listener: POP3_PLAIN,
        pool: entry("b1", &b1) + &entry("b2", &b2),
        users,
        extra: "",
        brute_force: false,
    });
    let placed = names
        .into_iter()
        .find(|n| proxy.rt.pool.order(n)[0].name == "b1")
        .expect("one of 16 users placed on b1");
    (proxy, b1, b2, placed)
}

#[tokio::test(start_paused = true)]
async fn pop3_sys_temp_from_the_first_backend_moves_the_login_to_the_next() {
    let mut script = Script::new(Speaks::Pop3);
    script.answer = Answer::Temp;
    let (proxy, b1, b2, user) = pop3_two(script).await;
    let (mut c, _session) = pop3_greeted(&proxy).await;
    c.send(&format!("AUTH PLAIN {}\r\n", plain(&user, PASSWORD)))
        .await;
    c.expect("+OK Logged in.").await;
    c.send("STAT\r\n").await;
    assert_eq!(c.line().await, "+OK 2 320");
    assert_eq!(b1.login("AUTH PLAIN").await.0, user);
    assert_eq!(b2.login("AUTH PLAIN").await.0, user);
    assert_eq!(b2.lines().last().unwrap(), "STAT");
}

#[tokio::test(start_paused = true)]
async fn pop3_bad_greeting_from_the_first_backend_moves_the_login_to_the_next() {
    let mut script = Script::new(Speaks::Pop3);
    script.opening = Opening::BadGreeting;
    let (proxy, b1, b2, user) = pop3_two(script).await;
    let (mut c, _session) = pop3_greeted(&proxy).await;
    c.send(&format!("USER {user}\r\nPASS {PASSWORD}\r\n")).await;
    c.expect("+OK Send your password").await;
    c.expect("+OK Logged in.").await;
    c.send("STAT\r\n").await;
    assert_eq!(c.line().await, "+OK 2 320");
    assert_eq!(b1.connections(), 1);
    assert!(b1.lines().is_empty(), "{:?}", b1.lines());
    assert_eq!(b2.login("AUTH PLAIN").await.0, user);
}

#[tokio::test(start_paused = true)]
async fn pop3_a_first_backend_that_closes_at_once_moves_the_login_to_the_next() {
    let mut script = Script::new(Speaks::Pop3);
    script.opening = Opening::AcceptClose;
    let (proxy, b1, b2, user) = pop3_two(script).await;
    let (mut c, _session) = pop3_greeted(&proxy).await;
    c.send(&format!("AUTH PLAIN {}\r\n", plain(&user, PASSWORD)))
        .await;
    c.expect("+OK Logged in.").await;
    assert_eq!(b1.connections(), 1);
    assert_eq!(b2.login("AUTH PLAIN").await.0, user);
}

#[tokio::test(start_paused = true)]
async fn pop3_a_pinned_user_does_not_fail_over() {
    let mut script = Script::new(Speaks::Pop3);
    script.answer = Answer::Temp;
    let (proxy, b1, b2, _) = pop3_two(script).await;
    let (mut c, _session) = pop3_greeted(&proxy).await;
    c.send(&format!("AUTH PLAIN {}\r\n", plain("pinned", PASSWORD)))
        .await;
    c.expect("-ERR [SYS/TEMP]").await;
    assert_eq!(b1.login("AUTH PLAIN").await.0, "pinned");
    assert_eq!(b2.connections(), 0);
}

#[tokio::test(start_paused = true)]
async fn pop3_a_backend_that_closes_at_once_is_a_temporary_failure() {
    let mut script = Script::new(Speaks::Pop3);
    script.opening = Opening::AcceptClose;
    let (proxy, b) = pop3_one(POP3_PLAIN, script, "").await;
    let (mut c, _session) = pop3_greeted(&proxy).await;
    c.send(&format!("AUTH PLAIN {}\r\n", plain("alice", PASSWORD)))
        .await;
    c.expect("-ERR [SYS/TEMP]").await;
    assert_eq!(b.connections(), 1);
    // The session goes on.
    c.send("NOOP\r\n").await;
    assert_eq!(c.line().await, "+OK");
}

#[tokio::test(start_paused = true)]
async fn pop3_preauth_timeout_ends_with_its_farewell() {
    let (proxy, b) = pop3_one(
        POP3_PLAIN,
        Script::new(Speaks::Pop3),
        "limits:\n  preauth_timeout: 15s\n",
    )
    .await;
    let started = Instant::now();
    let (mut c, session) = pop3_greeted(&proxy).await;
    c.send("NOOP\r\n").await;
    assert_eq!(c.line().await, "+OK");
    assert_eq!(
        c.line().await,
        "-ERR Autologout; pre-authentication time limit reached"
    );
    let took = started.elapsed();
    assert!(
        took >= Duration::from_secs(15) && took < Duration::from_secs(16),
        "{took:?}"
    );
    c.closed().await;
    ended(session).await;
    assert_eq!(proxy.ended("preauth_timeout"), 1);
    assert_eq!(b.connections(), 0);
}

#[tokio::test(start_paused = true)]
async fn pop3_too_many_bad_commands_end_with_err() {
    let (proxy, _b) = pop3_one(
        POP3_PLAIN,
        Script::new(Speaks::Pop3),
        "limits:\n  max_bad_commands: 3\n",
    )
    .await;
    let (mut c, session) = pop3_greeted(&proxy).await;
    c.send("FROB\r\n").await;
    assert_eq!(c.line().await, "-ERR Unknown command");
    c.send("STAT\r\n").await;
    assert_eq!(
        c.line().await,
        "-ERR STAT is not valid before login; log in first"
    );
    c.send("APOP alice 0123\r\n").await;
    assert_eq!(
        c.line().await,
        "-ERR APOP is not supported; use USER and PASS or AUTH; too many invalid commands, closing."
    );
    c.closed().await;
    ended(session).await;
    assert_eq!(proxy.ended("too_many_bad_commands"), 1);
}

/// A kick during a relayed POP3 session is told only at a response
/// boundary: a multi-line answer under way is finished first.
#[tokio::test(start_paused = true)]
async fn pop3_kick_is_told_at_a_response_boundary() {
    let mut script = Script::new(Speaks::Pop3);
    script.hold_retr = true;
    let (proxy, b) = pop3_one(POP3_PLAIN, script, "").await;
    let (mut c, session) = pop3_greeted(&proxy).await;
    c.send(&format!("AUTH PLAIN {}\r\n", plain("alice", PASSWORD)))
        .await;
    c.expect("+OK Logged in.").await;
    c.send("RETR 1\r\n").await;
    assert_eq!(c.line().await, "+OK 7 octets");
    assert_eq!(c.line().await, "hello");
    // Mid-answer: the administrator ends the session.
    assert_eq!(proxy.registry.kick_user("alice", false), 1);
    for _ in 0..10 {
        tokio::task::yield_now().await;
    }
    b.release.notify_one();
    assert_eq!(
        c.rest().await,
        ".\r\n-ERR Session ended by the administrator\r\n"
    );
    ended(session).await;
    assert_eq!(proxy.ended("kicked"), 1);

    // Idle, at a boundary: told at once.
    let (mut c, session) = pop3_greeted(&proxy).await;
    c.send(&format!("AUTH PLAIN {}\r\n", plain("alice", PASSWORD)))
        .await;
    c.expect("+OK Logged in.").await;
    c.send("STAT\r\n").await;
    assert_eq!(c.line().await, "+OK 2 320");
    assert_eq!(proxy.registry.kick_user("alice", false), 1);
    assert_eq!(
        c.rest().await,
        "-ERR Session ended by the administrator\r\n"
    );
    ended(session).await;
}

#[tokio::test(start_paused = true)]
async fn pop3_backend_without_sasl_gets_user_and_pass() {
    for capa in ["USER\r\nPIPELINING\r\n", "USER\r\n"] {
        let mut script = Script::new(Speaks::Pop3);
        script.capa = Some(capa);
        script.xclient = Xclient::Capa;
        let (proxy, b) = pop3_one(POP3_PLAIN, script, "").await;
        let (mut c, _session) = pop3_greeted(&proxy).await;
        c.send(&format!("AUTH PLAIN {}\r\n", plain("alice", PASSWORD)))
            .await;
        c.expect("+OK Logged in.").await;
        c.send("STAT\r\n").await;
        assert_eq!(c.line().await, "+OK 2 320");
        let lines = b.lines();
        assert_eq!(lines[0], "CAPA", "{capa:?}: {lines:?}");
        assert!(lines[1].starts_with("XCLIENT ADDR=127.0.0.1 "), "{lines:?}");
        assert_eq!(
            &lines[2..],
            ["USER alice", &format!("PASS {PASSWORD}"), "STAT"],
            "{capa:?}"
        );
    }
}

#[tokio::test(start_paused = true)]
async fn pop3_a_login_the_backend_refuses_is_a_temporary_failure() {
    // Postern knows alice by another password than her backend.
    let b = Backend::start(Script::new(Speaks::Pop3)).await;
    let proxy = Proxy::new(Setup {
        listener: POP3_PLAIN,
        pool: entry("b1", &b),
        users: user_with("alice", "postern-only"),
        extra: "",
        brute_force: false,
    });
    let (mut c, _session) = pop3_greeted(&proxy).await;
    c.send("USER alice\r\nPASS postern-only\r\n").await;
    c.expect("+OK Send your password").await;
    assert_eq!(
        c.line().await,
        "-ERR [SYS/TEMP] Mail server refused the login, try again later"
    );
    assert_eq!(b.connections(), 1);
}

#[tokio::test(start_paused = true)]
async fn pop3_an_overlong_line_ends_the_session() {
    let (proxy, b) = pop3_one(POP3_PLAIN, Script::new(Speaks::Pop3), "").await;
    let (mut c, session) = pop3_greeted(&proxy).await;
    c.send("USER alice\r\n").await;
    c.expect("+OK").await;
    c.send(&format!("PASS {}\r\n", "x".repeat(9000))).await;
    assert_eq!(c.line().await, "-ERR Command line longer than 8192 bytes");
    drop(c);
    ended(session).await;
    assert_eq!(proxy.ended("line_too_long"), 1);
    assert_eq!(b.connections(), 0);
}

#[tokio::test(start_paused = true)]
async fn pop3_per_user_session_limit() {
    let mut script = Script::new(Speaks::Pop3);
    script.accounts = vec![("bob".into(), PASSWORD.into())];
    let (proxy, b) = pop3_one(POP3_PLAIN, script, "limits:\n  max_sessions_per_user: 1\n").await;
    let (mut first, first_session) = pop3_greeted(&proxy).await;
    first
        .send(&format!("AUTH PLAIN {}\r\n", plain("alice", PASSWORD)))
        .await;
    first.expect("+OK Logged in.").await;
    let (mut second, _session) = pop3_greeted(&proxy).await;
    second
        .send(&format!("AUTH PLAIN {}\r\n", plain("alice", PASSWORD)))
        .await;
    assert_eq!(
        second.line().await,
        "-ERR [SYS/TEMP] Too many sessions for this user"
    );
    assert_eq!(b.connections(), 1);
    // Once the first session has ended, the second connection may log in.
    first.send("QUIT\r\n").await;
    first.expect("+OK Bye").await;
    drop(first);
    ended(first_session).await;
    second
        .send(&format!("AUTH PLAIN {}\r\n", plain("alice", PASSWORD)))
        .await;
    second.expect("+OK Logged in.").await;
}

#[tokio::test(start_paused = true)]
async fn pop3_in_use_twice_on_one_connection_does_not_count_against_the_user_limit() {
    let mut script = Script::new(Speaks::Pop3);
    script.answer = Answer::InUse;
    let (proxy, b) = pop3_one(POP3_PLAIN, script, "limits:\n  max_sessions_per_user: 1\n").await;
    let (mut c, _session) = pop3_greeted(&proxy).await;
    for _ in 0..2 {
        c.send(&format!("AUTH PLAIN {}\r\n", plain("alice", PASSWORD)))
            .await;
        c.expect("-ERR [IN-USE]").await;
    }
    assert_eq!(b.connections(), 2);
}

#[tokio::test(start_paused = true)]
async fn pop3_per_network_connection_limit_is_told_on_a_plaintext_listener() {
    let (proxy, _b) = pop3_one(
        POP3_PLAIN,
        Script::new(Speaks::Pop3),
        "limits:\n  max_connections_per_network: 1\n",
    )
    .await;
    let (_first, _session) = pop3_greeted(&proxy).await;
    let (mut second, session) = proxy.connect().await;
    assert_eq!(
        second.line().await,
        "-ERR [SYS/TEMP] Too many connections from your network"
    );
    ended(session).await;
    assert_eq!(proxy.ended("network_limit"), 1);
}

#[tokio::test(start_paused = true)]
async fn pop3_an_unreachable_first_backend_moves_the_login_to_the_next() {
    // A port nothing listens on.
    let closed = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = closed.local_addr().unwrap().port();
    drop(closed);
    let b2 = Backend::start(Script::new(Speaks::Pop3)).await;
    let names: Vec<String> = (0..16).map(|i| format!("user{i}")).collect();
    let proxy = Proxy::new(Setup {
        listener: POP3_PLAIN,
        pool: format!("    - {{ name: b1, address: \"127.0.0.1:{port}\", pop3_port: {port} }}\n")
            + &entry("b2", &b2),
        users: names.iter().map(|n| user(n, None)).collect(),
        extra: "",
        brute_force: false,
    });
    let placed = names
        .iter()
        .find(|n| proxy.rt.pool.order(n)[0].name == "b1")
        .expect("one of 16 users placed on b1");
    let (mut c, _session) = pop3_greeted(&proxy).await;
    c.send(&format!("AUTH PLAIN {}\r\n", plain(placed, PASSWORD)))
        .await;
    c.expect("+OK Logged in.").await;
    assert_eq!(&b2.login("AUTH PLAIN").await.0, placed);
}

#[tokio::test(start_paused = true)]
async fn pop3_over_implicit_tls_with_its_alpn() {
    let (proxy, _b) = pop3_one(
        "tls: implicit, protocol: pop3",
        Script::new(Speaks::Pop3),
        "",
    )
    .await;
    let (c, _session) = proxy.connect().await;
    let mut t = c.tls_alpn(&[b"pop3"]).await;
    assert_eq!(t.stream.get_ref().1.alpn_protocol(), Some(&b"pop3"[..]));
    t.expect("+OK Postern ready.").await;
    t.send("CAPA\r\n").await;
    t.expect("+OK").await;
    let caps = t.multiline().await;
    assert!(caps.iter().any(|c| c == "USER"), "{caps:?}");
    assert!(!caps.iter().any(|c| c == "STLS"), "{caps:?}");
    t.send("STLS\r\n").await;
    t.expect("-ERR STLS is not available on an implicit-TLS port")
        .await;
    t.send(&format!("USER alice\r\nPASS {PASSWORD}\r\nSTAT\r\n"))
        .await;
    t.expect("+OK Send your password").await;
    t.expect("+OK Logged in.").await;
    assert_eq!(t.line().await, "+OK 2 320");
}

/// Postern's own waits move the pre-auth deadline: a failure's delay
/// that runs past it is answered, and the client keeps the time it had
/// left when the delay began.
#[tokio::test(start_paused = true)]
async fn pop3_failure_delay_moves_the_preauth_deadline() {
    let (proxy, _b) = pop3_one(
        POP3_PLAIN,
        Script::new(Speaks::Pop3),
        "limits:\n  preauth_timeout: 3s\n",
    )
    .await;
    let started = Instant::now();
    let (mut c, session) = pop3_greeted(&proxy).await;
    // The client itself takes 2.5s of its 3s.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    c.send(&format!("AUTH PLAIN {}\r\n", plain("alice", "wrong")))
        .await;
    assert_eq!(c.line().await, "-ERR [AUTH] Authentication failed.");
    let answered = started.elapsed();
    assert!(
        answered >= Duration::from_millis(4500) && answered < Duration::from_millis(4600),
        "{answered:?}"
    );
    assert_eq!(
        c.line().await,
        "-ERR Autologout; pre-authentication time limit reached"
    );
    let out = started.elapsed();
    assert!(
        out >= Duration::from_secs(5) && out < Duration::from_millis(5200),
        "{out:?}"
    );
    drop(c);
    ended(session).await;
    assert_eq!(proxy.ended("preauth_timeout"), 1);
}

#[tokio::test(start_paused = true)]
async fn pop3_a_blocked_network_is_told_so_and_familiar_users_still_log_in() {
    let mut script = Script::new(Speaks::Pop3);
    script.accounts = vec![("bob".into(), PASSWORD.into())];
    let b = Backend::start(script).await;
    let proxy = Proxy::new(Setup {
        listener: POP3_PLAIN,
        pool: entry("b1", &b),
        users: user("alice", None) + &user("bob", None),
        extra: "",
        brute_force: true,
    });
    // alice logs in from here: familiar.
    let (mut c, _first) = pop3_greeted(&proxy).await;
    c.send(&format!("AUTH PLAIN {}\r\n", plain("alice", PASSWORD)))
        .await;
    c.expect("+OK Logged in.").await;
    // Failures for two user names block the network.
    let (mut m, _second) = pop3_greeted(&proxy).await;
    for name in ["mallory", "trudy"] {
        m.send(&format!("AUTH PLAIN {}\r\n", plain(name, "guess")))
            .await;
        assert_eq!(m.line().await, "-ERR [AUTH] Authentication failed.");
    }
    let (mut d, _third) = pop3_greeted(&proxy).await;
    d.send(&format!("USER bob\r\nPASS {PASSWORD}\r\n")).await;
    d.expect("+OK Send your password").await;
    assert_eq!(
        d.line().await,
        "-ERR [SYS/TEMP] Too many failed logins from your network, try again later"
    );
    d.send(&format!("AUTH PLAIN {}\r\n", plain("alice", PASSWORD)))
        .await;
    d.expect("+OK Logged in.").await;
    assert_eq!(b.connections(), 2);
}

// ---------------------------------------------------------------------------
// IMAP

#[tokio::test(start_paused = true)]
async fn imap_login_is_relayed_with_the_backends_capabilities_and_the_clients_address() {
    let (proxy, b) = imap_one(IMAP_PLAIN, Script::new(Speaks::Imap), "").await;
    let (mut c, session) = imap_greeted(&proxy).await;
    let client_port = c.stream.local_addr().unwrap().port();
    c.send(&format!("a1 LOGIN alice {PASSWORD}\r\n")).await;
    assert_eq!(
        c.line().await,
        "a1 OK [CAPABILITY IMAP4rev1 IDLE MOVE] Logged in"
    );
    c.send("a2 SELECT INBOX\r\n").await;
    assert_eq!(c.line().await, "* 2 EXISTS");
    c.expect("a2 OK [READ-WRITE]").await;
    let id = b.saw("P1 ID").await;
    assert!(
        id.contains("\"x-originating-ip\" \"127.0.0.1\"")
            && id.contains(&format!("\"x-originating-port\" \"{client_port}\"")),
        "{id}"
    );
    assert_eq!(
        b.login("P2 AUTHENTICATE PLAIN").await,
        ("alice".into(), PASSWORD.into())
    );
    c.send("a3 LOGOUT\r\n").await;
    assert_eq!(c.line().await, "* BYE Logging out");
    c.expect("a3 OK").await;
    c.closed().await;
    // The backend has closed; the session ends with the client's side.
    drop(c);
    ended(session).await;
    assert_eq!(b.connections(), 1);
}

#[tokio::test(start_paused = true)]
async fn imap_wrong_password_is_refused_after_the_failure_delay_and_never_reaches_a_backend() {
    let (proxy, b) = imap_one(IMAP_PLAIN, Script::new(Speaks::Imap), "").await;
    let (mut c, _session) = imap_greeted(&proxy).await;
    let sent = Instant::now();
    c.send("a1 LOGIN alice wrong\r\n").await;
    assert_eq!(
        c.line().await,
        "a1 NO [AUTHENTICATIONFAILED] Authentication failed."
    );
    let took = sent.elapsed();
    assert!(
        took >= Duration::from_secs(2) && took < Duration::from_secs(3),
        "{took:?}"
    );
    assert_eq!(b.connections(), 0);
    c.send(&format!("a2 LOGIN alice {PASSWORD}\r\n")).await;
    c.expect("a2 OK").await;
}

#[tokio::test(start_paused = true)]
async fn imap_authenticate_plain_with_and_without_initial_response_and_cancelled() {
    let (proxy, b) = imap_one(IMAP_PLAIN, Script::new(Speaks::Imap), "").await;
    let (mut c, _first) = imap_greeted(&proxy).await;
    c.send("a1 AUTHENTICATE PLAIN\r\n").await;
    assert_eq!(c.line().await, "+ ");
    c.send("*\r\n").await;
    assert_eq!(c.line().await, "a1 BAD Authentication cancelled");
    c.send("a2 AUTHENTICATE PLAIN\r\n").await;
    assert_eq!(c.line().await, "+ ");
    c.send(&format!("{}\r\n", plain("alice", PASSWORD))).await;
    c.expect("a2 OK [CAPABILITY IMAP4rev1 IDLE MOVE]").await;
    let (mut d, _second) = imap_greeted(&proxy).await;
    d.send(&format!(
        "b1 AUTHENTICATE PLAIN {}\r\n",
        plain("alice", PASSWORD)
    ))
    .await;
    d.expect("b1 OK [CAPABILITY IMAP4rev1 IDLE MOVE]").await;
    d.send("b2 NOOP\r\n").await;
    assert_eq!(d.line().await, "b2 OK NOOP completed");
    assert_eq!(b.connections(), 2);
}

#[tokio::test(start_paused = true)]
async fn imap_logins_before_starttls_are_refused_and_starttls_discards_pipelined_bytes() {
    let (proxy, b) = imap_one(IMAP_STARTTLS, Script::new(Speaks::Imap), "").await;
    let (mut c, _session) = proxy.connect().await;
    let greeting = c.line().await;
    assert!(greeting.contains("LOGINDISABLED"), "{greeting}");
    c.send(&format!("a1 LOGIN alice {PASSWORD}\r\n")).await;
    c.expect("a1 NO [PRIVACYREQUIRED]").await;
    let injected = "a3 LOGIN mallory x\r\n";
    c.send(&format!("a2 STARTTLS\r\n{injected}")).await;
    assert_eq!(c.line().await, "a2 OK Begin TLS negotiation now");
    let mut t = c.tls().await;
    t.send(&format!("a4 LOGIN alice {PASSWORD}\r\n")).await;
    // Nothing answers the injected a3.
    t.expect("a4 OK [CAPABILITY IMAP4rev1 IDLE MOVE]").await;
    assert_eq!(
        proxy.rt.metrics.starttls_discarded_bytes.get(),
        injected.len() as u64
    );
    assert_eq!(b.login("P2 AUTHENTICATE PLAIN").await.0, "alice");
}

#[tokio::test(start_paused = true)]
async fn imap_preauth_timeout_ends_with_bye() {
    let (proxy, _b) = imap_one(
        IMAP_PLAIN,
        Script::new(Speaks::Imap),
        "limits:\n  preauth_timeout: 15s\n",
    )
    .await;
    let started = Instant::now();
    let (mut c, session) = imap_greeted(&proxy).await;
    assert_eq!(
        c.line().await,
        "* BYE Autologout; pre-authentication time limit reached"
    );
    assert!(started.elapsed() >= Duration::from_secs(15));
    c.closed().await;
    ended(session).await;
    assert_eq!(proxy.ended("preauth_timeout"), 1);
}

#[tokio::test(start_paused = true)]
async fn imap_too_many_bad_commands_end_with_bye() {
    let (proxy, _b) = imap_one(
        IMAP_PLAIN,
        Script::new(Speaks::Imap),
        "limits:\n  max_bad_commands: 2\n",
    )
    .await;
    let (mut c, session) = imap_greeted(&proxy).await;
    c.send("a1 SELECT INBOX\r\n").await;
    c.expect("a1 BAD").await;
    c.send("a2 FROB\r\n").await;
    c.expect("a2 BAD").await;
    assert_eq!(c.line().await, "* BYE Too many invalid commands");
    c.closed().await;
    ended(session).await;
    assert_eq!(proxy.ended("too_many_bad_commands"), 1);
}

#[tokio::test(start_paused = true)]
async fn imap_kick_during_a_relayed_session_says_bye() {
    let (proxy, _b) = imap_one(IMAP_PLAIN, Script::new(Speaks::Imap), "").await;
    let (mut c, session) = imap_greeted(&proxy).await;
    c.send(&format!("a1 LOGIN alice {PASSWORD}\r\n")).await;
    c.expect("a1 OK").await;
    c.send("a2 NOOP\r\n").await;
    c.expect("a2 OK").await;
    assert_eq!(proxy.registry.list().len(), 1);
    assert_eq!(proxy.registry.kick_user("alice", false), 1);
    assert_eq!(
        c.rest().await,
        "* BYE Session ended by the administrator\r\n"
    );
    ended(session).await;
    assert_eq!(proxy.ended("kicked"), 1);
    assert!(proxy.registry.list().is_empty());
}

#[tokio::test(start_paused = true)]
async fn imap_shutdown_during_a_relayed_session_says_bye() {
    let (proxy, _b) = imap_one(IMAP_PLAIN, Script::new(Speaks::Imap), "").await;
    let (mut c, session) = imap_greeted(&proxy).await;
    c.send(&format!("a1 LOGIN alice {PASSWORD}\r\n")).await;
    c.expect("a1 OK").await;
    proxy.shutdown.close_sessions();
    assert_eq!(
        c.rest().await,
        "* BYE [UNAVAILABLE] Server shutting down\r\n"
    );
    ended(session).await;
    assert_eq!(proxy.ended("shutdown"), 1);
}

#[tokio::test(start_paused = true)]
async fn imap_commands_pipelined_after_the_login_reach_the_backend() {
    let (proxy, b) = imap_one(IMAP_PLAIN, Script::new(Speaks::Imap), "").await;
    let (mut c, _session) = imap_greeted(&proxy).await;
    c.send(&format!(
        "a1 LOGIN alice {PASSWORD}\r\na2 SELECT INBOX\r\na3 NOOP\r\n"
    ))
    .await;
    c.expect("a1 OK [CAPABILITY IMAP4rev1 IDLE MOVE]").await;
    assert_eq!(c.line().await, "* 2 EXISTS");
    c.expect("a2 OK [READ-WRITE]").await;
    assert_eq!(c.line().await, "a3 OK NOOP completed");
    let lines = b.lines();
    assert_eq!(&lines[lines.len() - 2..], ["a2 SELECT INBOX", "a3 NOOP"]);
}
