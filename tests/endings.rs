//! How relayed sessions end, seen by real clients: mbsync syncing with
//! COMPRESS=DEFLATE through both listeners, a compressed IDLE session that
//! is kicked, shut down or loses its backend, a kick or a backend kill in
//! the middle of a 10 MiB FETCH (plain and compressed), and messages whose
//! text looks like responses. Postern's own words reach the client only
//! between responses and in the stream's own encoding, or not at all.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::backend::DovecotBackend;
use common::client::Client;
use common::postern::{user, Postern, Setup, PASSWORD};
use sha2::{Digest, Sha256};

const TOKEN: &str = "endings-admin-token";

/// A backend offering COMPRESS=DEFLATE, with alice.
fn compress_backend(name: &str) -> DovecotBackend {
    common::backend::ensure_installed();
    DovecotBackend::start_with_env(name, &[("alice", PASSWORD)], &[("DOVECOT_COMPRESS", "1")])
}

/// Postern in front of `backend`, with the admin API on `admin` and
/// `extra` configuration.
fn postern(backend: &DovecotBackend, admin: u16, extra: &str, backend_options: &str) -> Postern {
    let token_file = backend.dir.join("admin-token");
    std::fs::write(&token_file, format!("{TOKEN}\n")).unwrap();
    Postern::start(Setup {
        backends: &[backend],
        users: &user("alice"),
        extra: &format!(
            "admin:\n  bind: \"127.0.0.1:{admin}\"\n  token_file: \"{}\"\n{extra}",
            token_file.display()
        ),
        backend_options,
        ..Setup::default()
    })
}

/// Ends alice's sessions through the admin API; how many it ended.
fn kick_alice(admin: u16) -> u64 {
    let mut s = TcpStream::connect(("127.0.0.1", admin)).unwrap();
    s.set_read_timeout(Some(common::SETTLE)).unwrap();
    write!(
        s,
        "POST /v1/sessions/kick?user=alice HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {TOKEN}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    let body = out.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    let v: serde_json::Value = serde_json::from_str(body).unwrap();
    v["kicked"].as_u64().unwrap()
}

/// Puts a message into alice's INBOX on the backend's disk.
fn deliver(backend: &DovecotBackend, name: &str, message: &[u8]) {
    let new = backend.dir.join("mail/alice/Maildir/new");
    std::fs::create_dir_all(&new).unwrap();
    let tmp = backend.dir.join(format!("{name}.tmp"));
    std::fs::write(&tmp, message).unwrap();
    std::fs::rename(&tmp, new.join(format!("{name}.postern-test"))).unwrap();
    // Dovecot runs as an unprivileged user and must be able to move it.
    let status = Command::new("chown")
        .args(["-R", "65534:65534"])
        .arg(backend.dir.join("mail/alice"))
        .status()
        .unwrap();
    assert!(status.success());
}

/// A message whose body has lines that look like responses: a BYE, a
/// literal announcement, a tagged OK.
fn tricky_message(n: usize) -> Vec<u8> {
    let mut m = format!(
        "From: tricky@example.com\r\nTo: alice@example.com\r\nSubject: tricky {n}\r\nMessage-ID: <tricky{n}@example.com>\r\n\r\n"
    )
    .into_bytes();
    m.extend_from_slice(b"* BYE not from the server\r\n{5}\r\n* 1 FETCH (BODY[] {5}\r\n");
    m.extend_from_slice(b"F1 OK FETCH completed.\r\n");
    for i in 0..200 {
        m.extend_from_slice(format!("line {i} of the body\r\n").as_bytes());
    }
    m.extend_from_slice(b"* BYE {5}\r\n");
    m
}

/// The last "session ended" log line that has all of `needles`, waited for.
fn session_ended(p: &Postern, needles: &[&str]) -> String {
    let found = common::wait_for(
        &format!("a session-ended line with {needles:?}"),
        common::SETTLE,
        || {
            p.log()
                .lines()
                .rev()
                .find(|l| l.contains("session ended") && needles.iter().all(|n| l.contains(n)))
                .map(str::to_owned)
        },
        |line| line.is_some(),
    );
    found.unwrap()
}

fn mbsync_config(dir: &Path, port: u16, ssl: &str, cert: &Path) -> PathBuf {
    let local = dir.join("local");
    std::fs::create_dir_all(&local).unwrap();
    let config = format!(
        "IMAPAccount postern\nHost localhost\nPort {port}\nUser alice\nPass {PASSWORD}\n\
         SSLType {ssl}\nCertificateFile {cert}\n\n\
         IMAPStore remote\nAccount postern\n\n\
         MaildirStore local\nPath {local}/\nInbox {local}/INBOX\n\n\
         Channel sync\nFar :remote:\nNear :local:\nPatterns INBOX\nCreate Both\nExpunge Both\nSyncState *\n",
        cert = cert.display(),
        local = local.display()
    );
    let path = dir.join("mbsyncrc");
    std::fs::write(&path, config).unwrap();
    path
}

/// Runs one two-way sync; panics with mbsync's output if it fails.
fn mbsync(config: &Path) {
    let out = Command::new("timeout")
        .args(["120", "mbsync", "-c"])
        .arg(config)
        .arg("sync")
        .stdin(Stdio::null())
        .output()
        .expect("mbsync runs (isync is installed by scripts/test)");
    assert!(
        out.status.success(),
        "mbsync failed ({}):\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Files in a maildir folder's `cur` and `new`.
fn maildir_files(folder: &Path) -> Vec<PathBuf> {
    ["cur", "new"]
        .iter()
        .filter_map(|sub| std::fs::read_dir(folder.join(sub)).ok())
        .flatten()
        .map(|e| e.unwrap().path())
        .collect()
}

/// mbsync (isync) syncs both ways through each listener with COMPRESS on;
/// every session ends `backend_closed` at once after LOGOUT, although the
/// reconnect jitter is long, and the messages that look like responses
/// arrive intact.
#[test]
fn mbsync_syncs_both_ways_with_compress_through_both_listeners() {
    let b = compress_backend("end-mbsync");
    let p = postern(&b, common::free_port(), "", "reconnect_jitter: 60s");
    deliver(&b, "m1", &tricky_message(1));
    for (round, (ssl, port)) in [("IMAPS", p.imaps), ("STARTTLS", p.imap)]
        .into_iter()
        .enumerate()
    {
        let dir = b.dir.join(format!("mbsync-{ssl}"));
        let config = mbsync_config(&dir, port, ssl, &p.cert_path());
        let before = ended_closed(&p);
        mbsync(&config);
        let synced = Instant::now();
        // Down: the backend's message is in the local maildir, byte for
        // byte but for the line ends (mbsync stores LF) and the X-TUID
        // header mbsync adds to find it again.
        let inbox = dir.join("local/INBOX");
        let files = maildir_files(&inbox);
        assert_eq!(files.len(), 1 + round, "{files:?}");
        let expected = String::from_utf8(tricky_message(1))
            .unwrap()
            .replace("\r\n", "\n");
        assert!(
            files
                .iter()
                .any(|f| without_tuid(&std::fs::read_to_string(f).unwrap()) == expected),
            "the tricky message arrived intact: {:?}",
            files
                .iter()
                .map(|f| std::fs::read_to_string(f).unwrap())
                .collect::<Vec<_>>()
        );
        // The session ended in order, at once.
        common::wait_for(
            "mbsync's session to end backend_closed",
            common::SETTLE,
            || ended_closed(&p),
            |n| *n > before,
        );
        let took = synced.elapsed();
        println!("{ssl}: the session ended {took:?} after mbsync exited");
        assert!(
            took < Duration::from_secs(5),
            "ended {took:?} after mbsync exited, not after the 60 s jitter"
        );
        session_ended(&p, &["reason=\"backend_closed\"", "compressed=true"]);
        // Up: a message written locally reaches the backend.
        let local = String::from_utf8(tricky_message(10 + round))
            .unwrap()
            .replace("\r\n", "\n");
        let name = format!("{}.{round}.local:2,S", 1_700_000_000 + round);
        std::fs::write(inbox.join("cur").join(name), local).unwrap();
        mbsync(&config);
        let mut c = Client::logged_in(p.imaps, "alice");
        let select = c.command("s", "SELECT INBOX");
        assert!(
            select
                .iter()
                .any(|l| l == &format!("* {} EXISTS", 2 + round)),
            "{select:?}"
        );
        c.command("l", "LOGOUT");
    }
    assert_eq!(
        p.metric("postern_sessions_ended_total{reason=\"backend_lost\"}"),
        0.0
    );
}

/// A message as mbsync stored it, without the X-TUID header it added.
fn without_tuid(message: &str) -> String {
    message
        .split_inclusive('\n')
        .filter(|line| !line.starts_with("X-TUID: "))
        .collect()
}

/// Sessions ended `backend_closed` so far.
fn ended_closed(p: &Postern) -> f64 {
    p.try_metric("postern_sessions_ended_total{reason=\"backend_closed\"}")
        .unwrap_or(0.0)
}

/// The compress_session.py script, started.
struct Script {
    child: std::process::Child,
    stdout: BufReader<std::process::ChildStdout>,
}

impl Script {
    fn start(what: &str, compress: bool, port: u16) -> Script {
        let script = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/python/compress_session.py"
        );
        let mut child = Command::new("python3")
            .args([
                script,
                what,
                if compress { "1" } else { "0" },
                &port.to_string(),
                "alice",
                PASSWORD,
            ])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("python3 runs");
        let stdout = BufReader::new(child.stdout.take().unwrap());
        let mut s = Script { child, stdout };
        let mut line = String::new();
        s.stdout.read_line(&mut line).unwrap();
        if line.trim() != "ready" {
            let mut err = String::new();
            s.child
                .stderr
                .take()
                .unwrap()
                .read_to_string(&mut err)
                .unwrap();
            panic!("compress_session.py {what}: {line:?}\n{err}");
        }
        s
    }

    /// Lets a waiting `fetch` read on.
    fn go_on(&mut self) {
        let stdin = self.child.stdin.as_mut().unwrap();
        stdin.write_all(b"go\n").unwrap();
        stdin.flush().unwrap();
    }

    /// The report, once the script has seen the end of the session.
    fn report(mut self) -> serde_json::Value {
        let mut rest = String::new();
        self.stdout.read_to_string(&mut rest).unwrap();
        let status = self.child.wait().unwrap();
        let mut err = String::new();
        self.child
            .stderr
            .take()
            .unwrap()
            .read_to_string(&mut err)
            .unwrap();
        assert!(status.success(), "{status}: {rest}\n{err}");
        serde_json::from_str(rest.trim()).unwrap_or_else(|e| panic!("{e}: {rest}\n{err}"))
    }
}

/// The lines the script read after "ready" (literal data aside).
fn after_lines(report: &serde_json::Value) -> Vec<&str> {
    report["after"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l.as_str().unwrap())
        .collect()
}

/// A compressed session in IDLE hears Postern's BYE as deflate data when
/// it is kicked, when Postern shuts down, and when its backend is killed;
/// the client inflates it cleanly after the backend's last response.
#[test]
fn a_compressed_idle_session_hears_every_ending_in_deflate() {
    for how in ["kick", "shutdown", "backend killed"] {
        let b = compress_backend("end-idle");
        let admin = common::free_port();
        let mut p = postern(
            &b,
            admin,
            "limits:\n  shutdown_drain: 1s\n",
            "reconnect_jitter: 500ms",
        );
        let script = Script::start("idle", true, p.imaps);
        let (bye, reason) = match how {
            "kick" => {
                assert_eq!(kick_alice(admin), 1);
                ("* BYE Session ended by the administrator", "kicked")
            }
            "shutdown" => {
                p.signal("TERM");
                ("* BYE [UNAVAILABLE] Server shutting down", "shutdown")
            }
            _ => {
                b.stop();
                (
                    "* BYE [UNAVAILABLE] Mail server is unavailable, please reconnect",
                    "backend_",
                )
            }
        };
        let report = script.report();
        assert_eq!(report["clean"], true, "{how}: {report}");
        let after = after_lines(&report);
        assert_eq!(after.last(), Some(&bye), "{how}: {report}");
        let line = session_ended(&p, &["compressed=true", reason]);
        assert!(!line.contains("backend_closed"), "{how}: {line}");
        if how == "shutdown" {
            assert!(p.wait_exit(common::SETTLE).success());
        }
    }
}

/// One FETCH of a 10 MiB message interrupted: the client gets the whole
/// literal (intact, by its hash) and then at most Postern's BYE, or the
/// connection closes before the literal is complete — never a byte of
/// Postern's text inside it.
#[test]
fn a_kick_or_backend_kill_mid_fetch_never_writes_into_the_literal() {
    // Base64-like text: it compresses little, so even with COMPRESS the
    // message is far larger than the socket buffers.
    let message = {
        let mut m = b"From: big@example.com\r\nSubject: ten mebibytes\r\n\r\n".to_vec();
        let mut x = 0x2545_f491_4f6c_dd1du64;
        let alphabet = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
        while m.len() < 10 << 20 {
            for _ in 0..76 {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                m.push(alphabet[(x % 64) as usize]);
            }
            m.extend_from_slice(b"\r\n");
        }
        m
    };
    for compress in [false, true] {
        for how in ["kick", "backend killed"] {
            let b = compress_backend("end-fetch");
            let admin = common::free_port();
            let p = postern(&b, admin, "", "reconnect_jitter: 200ms");
            deliver(&b, "big", &message);
            let mut script = Script::start("fetch", compress, p.imaps);
            match how {
                "kick" => assert_eq!(kick_alice(admin), 1),
                _ => b.stop(),
            }
            script.go_on();
            let report = script.report();
            let what = format!("compress={compress}, {how}: {report}");
            assert_eq!(report["clean"], true, "{what}");
            let literal = &report["literal"];
            assert_eq!(
                literal["size"].as_u64(),
                Some(message.len() as u64),
                "{what}"
            );
            let received = literal["received"].as_u64().unwrap() as usize;
            assert!(received >= 1 << 20, "{what}");
            // What arrived of the literal is the message's own bytes.
            let expected = hex(&Sha256::digest(&message[..received]));
            assert_eq!(
                literal["sha256"].as_str(),
                Some(expected.as_str()),
                "{what}"
            );
            let after = after_lines(&report);
            if literal["complete"] == true {
                // The response's end, then at most the FETCH's tagged OK
                // (in the same compressed flush) and a BYE.
                assert!(after.first().is_some_and(|l| l.ends_with(')')), "{what}");
                for line in &after[1..] {
                    assert!(
                        line.starts_with("F1 OK")
                            || line.starts_with("* BYE ")
                            || line.starts_with('<'),
                        "{what}"
                    );
                }
            } else {
                assert!(
                    after.iter().all(|l| l.is_empty() || l.starts_with('<')),
                    "nothing after a cut literal: {what}"
                );
            }
            session_ended(&p, &[&format!("compressed={compress}")]);
        }
    }
}

/// Messages whose text looks like responses (a BYE, literal
/// announcements, a tagged OK) are fetched whole, and the LOGOUT after
/// them still ends the session in order; a backend killed right after
/// such a message (its last line `* BYE {5}`) is lost, not closed.
#[test]
fn response_lookalikes_in_a_message_do_not_confuse_the_framing() {
    let b = compress_backend("end-lookalike");
    let p = postern(&b, common::free_port(), "", "reconnect_jitter: 500ms");
    deliver(&b, "m1", &tricky_message(1));
    let fetch = |c: &mut Client| {
        assert!(c
            .command("s", "SELECT INBOX")
            .last()
            .unwrap()
            .starts_with("s OK"));
        assert_eq!(c.fetch_first_message(), tricky_message(1));
    };
    let mut c = Client::logged_in(p.imaps, "alice");
    fetch(&mut c);
    c.command("l", "LOGOUT");
    assert!(c.closed());
    drop(c);
    let line = session_ended(&p, &["reason=\"backend_closed\""]);
    assert!(line.contains("compressed=false"), "{line}");

    let mut c = Client::logged_in(p.imaps, "alice");
    fetch(&mut c);
    b.stop();
    let bye = c.line();
    assert!(
        bye.starts_with("* BYE [UNAVAILABLE] Mail server is unavailable"),
        "{bye}"
    );
    assert!(c.closed());
    drop(c);
    common::wait_for(
        "the second session to end as a lost backend",
        common::SETTLE,
        || {
            p.try_metric("postern_sessions_ended_total{reason=\"backend_lost\"}")
                .unwrap_or(0.0)
                + p.try_metric("postern_sessions_ended_total{reason=\"backend_error\"}")
                    .unwrap_or(0.0)
        },
        |&n| n == 1.0,
    );
    assert_eq!(ended_closed(&p), 1.0);
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
