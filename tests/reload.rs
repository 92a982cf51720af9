//! Configuration reloads under load: the users file, the certificate and
//! the config change on disk (or SIGHUP asks) while an IDLE session stays
//! open and logins keep coming; bad configurations are refused and the
//! previous one keeps serving.

mod common;

use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::backend::DovecotBackend;
use common::client::{tcp, tls_over, Client};
use common::postern::{family_sum, user, Postern, Setup, PASSWORD};

/// How long a reload may take to be noticed and done: a loaded machine
/// is slow to poll, to build the new runtime and to bind.
const DETECT: Duration = common::SETTLE;

/// Writes `text` to `path` the way an orchestrator would: a new file
/// renamed over the old one.
fn replace(path: &Path, text: &[u8]) {
    let tmp = path.with_extension("new");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// A self-signed certificate for localhost: (cert PEM, key PEM, cert DER).
fn certificate() -> (String, String, Vec<u8>) {
    let made = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
    (
        made.cert.pem(),
        made.key_pair.serialize_pem(),
        made.cert.der().to_vec(),
    )
}

fn served_certificate(port: u16) -> Vec<u8> {
    let tls = tls_over(tcp(port), "localhost", &[b"imap"]).unwrap();
    tls.conn.peer_certificates().unwrap()[0].to_vec()
}

fn reloads(p: &Postern, result: &str) -> f64 {
    p.metric(&format!(
        "postern_config_reloads_total{{result=\"{result}\"}}"
    ))
}

fn login_ok(port: u16, name: &str) -> bool {
    Client::login_ok(port, name)
}

/// Whether every connection accepted so far has ended and been counted (a
/// session leaves the active gauge a moment before it is counted as ended).
fn all_sessions_counted(p: &Postern) -> bool {
    let text = p.metrics_text();
    family_sum(&text, "postern_connections_accepted_total{")
        == family_sum(&text, "postern_sessions_ended_total{")
}

#[test]
fn files_changing_under_load_reload_without_dropping_anything() {
    common::backend::ensure_installed();
    let b = DovecotBackend::start_with_users("reload", &[("alice", PASSWORD), ("bob", PASSWORD)]);
    let certs = std::env::temp_dir().join(format!("postern-test-reload-{}", std::process::id()));
    std::fs::create_dir_all(&certs).unwrap();
    let (cert_path, key_path) = (certs.join("tls.crt"), certs.join("tls.key"));
    let first = certificate();
    std::fs::write(&cert_path, &first.0).unwrap();
    std::fs::write(&key_path, &first.1).unwrap();
    let tls = format!(
        "tls:\n  certificates:\n    - {{ cert: \"{}\", key: \"{}\" }}",
        cert_path.display(),
        key_path.display()
    );
    let p = Postern::start(Setup {
        backends: &[&b],
        users: &user("alice"),
        tls: &tls,
        extra: "reload:\n  interval: 200ms\n",
        ..Setup::default()
    });
    assert_eq!(served_certificate(p.imaps), first.2);
    let version = p.metrics_text();
    let mut idle = Client::imaps(p.imaps).0;
    assert!(idle
        .login("alice", PASSWORD)
        .last()
        .unwrap()
        .starts_with("L1 OK"));
    idle.select_and_idle();

    // A steady stream of logins that must all succeed, bounded in count.
    let failures = Arc::new(AtomicUsize::new(0));
    let stream = {
        let failures = Arc::clone(&failures);
        let port = p.imaps;
        std::thread::spawn(move || {
            for _ in 0..40 {
                if !login_ok(port, "alice") {
                    failures.fetch_add(1, Ordering::Relaxed);
                }
            }
        })
    };

    // A new user in the users file.
    assert!(!login_ok(p.imaps, "bob"));
    let succeeded = reloads(&p, "success");
    replace(
        &p.dir.join("users.yaml"),
        format!("users:\n{}{}", user("alice"), user("bob")).as_bytes(),
    );
    common::wait_until("the users file is reloaded", DETECT, || {
        reloads(&p, "success") > succeeded
    });
    assert!(login_ok(p.imaps, "bob"));

    // A rotated certificate (cert-manager writes new files).
    let second = certificate();
    replace(&key_path, second.1.as_bytes());
    replace(&cert_path, second.0.as_bytes());
    common::wait_until("the new certificate is served", DETECT, || {
        served_certificate(p.imaps) == second.2
    });

    // A broken config is refused; the previous one keeps serving. Counted
    // from here: a poll between the key's and the certificate's rename
    // above may have refused a mismatched pair already.
    let config_path = p.dir.join("postern.yaml");
    let good = std::fs::read(&config_path).unwrap();
    let (failed, refusals) = (
        reloads(&p, "failure"),
        p.log().matches("configuration reload refused").count(),
    );
    replace(&config_path, b"listeners: [ this is not valid\n");
    common::wait_until("the bad config is refused", DETECT, || {
        reloads(&p, "failure") > failed
    });
    assert!(login_ok(p.imaps, "bob"));
    // Logged before it is counted.
    assert!(p.log().matches("configuration reload refused").count() > refusals);
    replace(&config_path, &good);

    stream.join().unwrap();
    assert_eq!(
        failures.load(Ordering::Relaxed),
        0,
        "no login failed during reloads"
    );
    // The session from before all this is alive and well.
    idle.send(b"DONE\r\n");
    assert!(idle.until_tagged("i").last().unwrap().starts_with("i OK"));
    assert!(version.contains("postern_config_info{version=\""));
    let _ = std::fs::remove_dir_all(certs);
}

#[test]
fn sighup_reloads_and_restart_only_keys_are_refused() {
    common::backend::ensure_installed();
    let b = DovecotBackend::start_with_users("hup", &[("alice", PASSWORD), ("bob", PASSWORD)]);
    let p = Postern::start(Setup {
        backends: &[&b],
        users: &user("alice"),
        extra: "reload:\n  watch: false\n",
        ..Setup::default()
    });
    replace(
        &p.dir.join("users.yaml"),
        format!("users:\n{}{}", user("alice"), user("bob")).as_bytes(),
    );
    // Not watching: nothing happens until SIGHUP.
    assert!(!login_ok(p.imaps, "bob"));
    p.signal("HUP");
    common::wait_until("SIGHUP reloads", DETECT, || reloads(&p, "success") == 1.0);
    assert!(login_ok(p.imaps, "bob"));

    // The log level follows the configuration.
    let config_path = p.dir.join("postern.yaml");
    let text = std::fs::read_to_string(&config_path).unwrap();
    assert!(text.contains("level: debug"));
    replace(
        &config_path,
        text.replace("level: debug", "level: warn").as_bytes(),
    );
    p.signal("HUP");
    common::wait_until("the level change is reloaded", DETECT, || {
        reloads(&p, "success") == 2.0
    });
    let ended = || {
        p.metric("postern_sessions_ended_total{reason=\"backend_closed\"}")
            + p.metric("postern_sessions_ended_total{reason=\"client_closed\"}")
    };
    // Bob's sessions above are counted first, so the next end is alice's.
    common::wait_until("earlier sessions are counted", DETECT, || {
        all_sessions_counted(&p)
    });
    let (before, lines) = (ended(), p.log().matches("session ended").count());
    assert!(login_ok(p.imaps, "alice"));
    common::wait_until("the session has ended", DETECT, || ended() > before);
    replace(&config_path, text.as_bytes());

    // A start-only key is refused, and the old configuration serves on.
    replace(
        &config_path,
        text.replace(
            "log:\n  level: debug",
            "log:\n  level: debug\n  format: json",
        )
        .as_bytes(),
    );
    p.signal("HUP");
    common::wait_until("the log format change is refused", DETECT, || {
        reloads(&p, "failure") == 1.0
    });
    let log = p.wait_for_log("key `log.format` changed; it takes effect only with a restart");
    // Checked only now: a session's "session ended" line is written just
    // after it is counted, and this ERROR line came well after that.
    assert_eq!(
        log.matches("session ended").count(),
        lines,
        "INFO lines are off"
    );
    assert!(login_ok(p.imaps, "alice"));
}

#[test]
fn listeners_are_added_moved_and_removed_by_a_reload() {
    common::backend::ensure_installed();
    let b = DovecotBackend::start_with_users("listeners", &[("alice", PASSWORD)]);
    let p = Postern::start(Setup {
        backends: &[&b],
        users: &user("alice"),
        extra: "reload:\n  watch: false\n",
        ..Setup::default()
    });
    let mut held = Client::imaps(p.imaps).0;
    assert!(held
        .login("alice", PASSWORD)
        .last()
        .unwrap()
        .starts_with("L1 OK"));
    held.select_and_idle();

    // The IMAPS listener moves to a new port; the STARTTLS one goes away;
    // a second IMAPS listener appears.
    let (moved, added) = (common::free_port(), common::free_port());
    let config_path = p.dir.join("postern.yaml");
    let text = std::fs::read_to_string(&config_path).unwrap();
    let listeners: String = format!(
        "listeners:\n  - {{ name: imaps, bind: \"127.0.0.1:{moved}\", tls: implicit }}\n  - {{ name: extra, bind: \"127.0.0.1:{added}\", tls: implicit }}\n"
    );
    let rest = &text[text.find("\ntls:").expect("a tls block") + 1..];
    replace(&config_path, (listeners + rest).as_bytes());
    p.signal("HUP");
    common::wait_until("the listeners are reloaded", DETECT, || {
        reloads(&p, "success") == 1.0
    });
    assert!(login_ok(moved, "alice"), "the moved listener serves");
    assert!(login_ok(added, "alice"), "the added listener serves");
    common::wait_until("the old ports are closed", DETECT, || {
        std::net::TcpStream::connect(("127.0.0.1", p.imaps)).is_err()
            && std::net::TcpStream::connect(("127.0.0.1", p.imap)).is_err()
    });
    // The session that came in through the old listener goes on.
    held.send(b"DONE\r\n");
    assert!(held.until_tagged("i").last().unwrap().starts_with("i OK"));
}

#[test]
fn a_configmap_style_symlink_swap_is_seen() {
    use std::os::unix::fs::symlink;
    common::backend::ensure_installed();
    let b = DovecotBackend::start_with_users("symlink", &[("alice", PASSWORD), ("bob", PASSWORD)]);
    let p = Postern::start(Setup {
        backends: &[&b],
        users: &user("alice"),
        extra: "reload:\n  interval: 200ms\n",
        ..Setup::default()
    });
    // The kubelet's layout: users.yaml -> ..data/users.yaml, ..data -> a
    // timestamped directory, swapped whole on update.
    let dir = &p.dir;
    std::fs::create_dir(dir.join("..2026_11_23_a")).unwrap();
    std::fs::write(
        dir.join("..2026_11_23_a/users.yaml"),
        format!("users:\n{}", user("alice")),
    )
    .unwrap();
    symlink("..2026_11_23_a", dir.join("..data")).unwrap();
    symlink("..data/users.yaml", dir.join("users.yaml.link")).unwrap();
    std::fs::rename(dir.join("users.yaml.link"), dir.join("users.yaml")).unwrap();
    common::wait_until("the first swap is reloaded", DETECT, || {
        reloads(&p, "success") >= 1.0
    });
    let before = reloads(&p, "success");
    assert!(!login_ok(p.imaps, "bob"));

    std::fs::create_dir(dir.join("..2026_11_23_b")).unwrap();
    std::fs::write(
        dir.join("..2026_11_23_b/users.yaml"),
        format!("users:\n{}{}", user("alice"), user("bob")),
    )
    .unwrap();
    symlink("..2026_11_23_b", dir.join("..data_tmp")).unwrap();
    std::fs::rename(dir.join("..data_tmp"), dir.join("..data")).unwrap();
    common::wait_until("the swapped directory is reloaded", DETECT, || {
        reloads(&p, "success") > before
    });
    assert!(login_ok(p.imaps, "bob"));
}

/// One IMAPS connection with `config` (whose session store keeps the
/// tickets): reads the greeting, so the ticket sent with it is kept, and
/// says whether the handshake was a resumption.
fn resumed(port: u16, config: &Arc<rustls::ClientConfig>) -> bool {
    use std::io::BufRead;
    let conn =
        rustls::ClientConnection::new(Arc::clone(config), "localhost".try_into().unwrap()).unwrap();
    let mut tls = rustls::StreamOwned::new(conn, tcp(port));
    while tls.conn.is_handshaking() {
        tls.conn.complete_io(&mut tls.sock).unwrap();
    }
    let kind = tls.conn.handshake_kind();
    let mut greeting = String::new();
    std::io::BufReader::new(&mut tls)
        .read_line(&mut greeting)
        .unwrap();
    assert!(greeting.starts_with("* OK"), "{greeting:?}");
    kind == Some(rustls::HandshakeKind::Resumed)
}

/// TLS 1.3 tickets are the process's: any worker thread takes a ticket
/// another issued, and a reload keeps the keys, so a reconnecting client
/// resumes rather than paying for a full handshake.
#[test]
fn session_tickets_work_on_every_worker_and_survive_a_reload() {
    common::backend::ensure_installed();
    let b = DovecotBackend::start_with_users("tickets", &[("alice", PASSWORD)]);
    let p = Postern::start(Setup {
        backends: &[&b],
        users: &user("alice"),
        extra: "reload:\n  watch: false\nworkers: 4\n",
        ..Setup::default()
    });
    let mut config = (*common::client::client_config(&[b"imap"])).clone();
    config.resumption = rustls::client::Resumption::in_memory_sessions(8);
    let config = Arc::new(config);
    assert!(!resumed(p.imaps, &config), "the first handshake is full");
    // Each connection takes the ticket the previous one left; with four
    // workers they land on different threads.
    for i in 0..12 {
        assert!(resumed(p.imaps, &config), "connection {i} resumed");
    }
    p.signal("HUP");
    common::wait_until("SIGHUP reloads", DETECT, || reloads(&p, "success") == 1.0);
    assert!(resumed(p.imaps, &config), "a ticket from before the reload");
}
