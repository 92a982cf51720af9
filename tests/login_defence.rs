//! The login defence (`auth::guard`) on the wire, with real Dovecot, the
//! `auth_http` test service counting every credential check it is asked
//! for, and PROXY headers giving test clients distinct addresses:
//!
//! - one shared address (a NAT): an attacker guesses at concurrency 50
//!   while familiar and new users log in from the same address, with no
//!   network block to help; familiar logins are answered in under a
//!   second, no legitimate login runs into the pre-auth time limit, and
//!   the source sees no more guesses than the network's lane allows;
//! - 100 addresses guessing one user: that user's checks stay within their
//!   lane's budget, the user still gets in from a familiar network, other
//!   users are not slowed;
//! - a webmail server as a trusted forwarder: each user's own address (from
//!   `ID x-originating-ip`) is penalised, blocked and shown to the backend;
//!   the same `ID` from an untrusted address changes nothing.

mod common;

use std::io::Write;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use common::auth_http::AuthService;
use common::backend::DovecotBackend;
use common::client::{tcp, tcp_from, Client};
use common::postern::{Postern, Setup, PASSWORD};
use common::SETTLE;

struct World {
    b: DovecotBackend,
    service: AuthService,
    p: Postern,
}

/// A Dovecot backend holding `users`, the auth service knowing them (any
/// other name is unknown to it) and Postern asking it. Failed logins are
/// answered with `Auth-Wait: 0`, so Postern's own delay is what counts.
fn world(name: &str, users: &[String], auth_options: &str, starttls_options: &str) -> World {
    common::backend::ensure_installed();
    let accounts: Vec<(&str, &str)> = users.iter().map(|u| (u.as_str(), PASSWORD)).collect();
    let b = DovecotBackend::start_with_users(name, &accounts);
    let (ip, port) = b
        .addr()
        .rsplit_once(':')
        .map(|(i, p)| (i.to_owned(), p.to_owned()))
        .unwrap();
    let entries: serde_json::Map<String, serde_json::Value> = users
        .iter()
        .map(|u| {
            (
                u.clone(),
                serde_json::json!({ "password": PASSWORD, "server": ip, "port": port.parse::<u16>().unwrap() }),
            )
        })
        .collect();
    let service = AuthService::start(name, &serde_json::json!({ "users": entries, "wait": 0 }));
    let source = service.auth_source("5s");
    let p = Postern::start(Setup {
        backends: &[&b],
        auth_source: &source,
        auth_options,
        starttls_options,
        failure_delay: "200ms",
        ..Setup::default()
    });
    World { b, service, p }
}

fn names(prefix: &str, n: usize) -> Vec<String> {
    (0..n).map(|i| format!("{prefix}{i:02}")).collect()
}

/// The tagged answer to a LOGIN, or what came before the server closed the
/// connection (a `* BYE`), as `Err`.
fn try_login(c: &mut Client, user: &str, password: &str) -> Result<String, Vec<String>> {
    c.send(format!("L1 LOGIN \"{user}\" \"{password}\"\r\n").as_bytes());
    let mut seen = Vec::new();
    loop {
        match c.try_line() {
            Some(line) if line.starts_with("L1 ") => return Ok(line),
            Some(line) => seen.push(line),
            None => return Err(seen),
        }
    }
}

/// A plain connection to a listener that expects a PROXY header, stating
/// `ip` as the client; the greeting is read.
fn plain_as(port: u16, ip: &str) -> Client {
    let mut s = tcp(port);
    s.write_all(format!("PROXY TCP4 {ip} 127.0.0.1 40000 143\r\n").as_bytes())
        .unwrap();
    let mut c = Client::from_stream(s);
    assert!(c.line().starts_with("* OK"));
    c
}

/// Checks the source was asked for with a wrong password, for `users`.
fn guesses_checked(service: &AuthService, users: &[String]) -> usize {
    service
        .requests()
        .iter()
        .filter(|r| {
            let user = r["Auth-User"].as_str().unwrap_or_default();
            users.iter().any(|u| u == user) && r["Auth-Pass"].as_str() != Some(PASSWORD)
        })
        .count()
}

/// The most failures a lane `width` wide lets through in `elapsed`: each
/// failure holds its place for its delay (200 ms doubling per failure on
/// record, up to `max_delay`), so past the first few doublings a place
/// serves one guess per `max_delay`.
fn budget(width: usize, elapsed: Duration, max_delay: Duration) -> usize {
    let per_place = (elapsed + max_delay).as_secs_f64() / max_delay.as_secs_f64();
    // 200 ms · 2^k reaches max_delay after this many failures.
    let doublings = (max_delay.as_secs_f64() / 0.2).log2().ceil() as usize + 1;
    width * per_place.ceil() as usize + doublings
}

/// What one legitimate login saw.
#[derive(Debug)]
struct Seen {
    user: String,
    familiar: bool,
    answer: Result<String, Vec<String>>,
    took: Duration,
}

#[test]
fn a_shared_address_keeps_its_users_while_an_attacker_guesses_from_it() {
    let familiar = names("fam", 10);
    let newcomers = names("new", 10);
    let targets = names("acct", 20);
    let mut users: Vec<String> = familiar.iter().chain(&newcomers).cloned().collect();
    // Half the attacked accounts exist.
    users.extend(targets.iter().take(10).cloned());
    let max_delay = Duration::from_secs(5);
    let w = world(
        "def-shared",
        &users,
        // No block: the network's lane alone must hold the attacker.
        "brute_force: { max_delay: 5s, queue_wait: 10s, block_after: 0 }",
        "allow_plaintext_auth: true",
    );
    let p = &w.p;
    // The familiar users logged in from here before.
    for u in &familiar {
        assert!(Client::login_ok(p.imaps, u), "{u}");
    }
    let attack_for = Duration::from_secs(60);
    let started = Instant::now();
    let over = Arc::new(AtomicBool::new(false));
    let sent = Arc::new(AtomicUsize::new(0));
    let attackers: Vec<_> = (0..50)
        .map(|i| {
            let (over, sent, targets) = (Arc::clone(&over), Arc::clone(&sent), targets.clone());
            let port = p.imap;
            thread::spawn(move || {
                let mut answers = Vec::new();
                while !over.load(Ordering::Relaxed) {
                    let n = sent.fetch_add(1, Ordering::Relaxed);
                    if n >= 500 {
                        break;
                    }
                    let (mut c, _) = Client::plain(port);
                    let answer = try_login(
                        &mut c,
                        &targets[(n + i) % targets.len()],
                        &format!("guess{n}"),
                    );
                    answers.push(answer);
                }
                answers
            })
        })
        .collect();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let legit: Vec<_> = familiar
        .iter()
        .map(|u| (u.clone(), true))
        .chain(newcomers.iter().map(|u| (u.clone(), false)))
        .map(|(user, is_familiar)| {
            let (over, seen) = (Arc::clone(&over), Arc::clone(&seen));
            let port = p.imaps;
            thread::spawn(move || {
                while !over.load(Ordering::Relaxed) {
                    let (mut c, _) = Client::imaps(port);
                    let asked = Instant::now();
                    let answer = try_login(&mut c, &user, PASSWORD);
                    let took = asked.elapsed();
                    if answer.as_ref().is_ok_and(|a| a.starts_with("L1 OK")) {
                        c.command("Z", "LOGOUT");
                    }
                    seen.lock().unwrap().push(Seen {
                        user: user.clone(),
                        familiar: is_familiar,
                        answer,
                        took,
                    });
                    // A client polling every 2 s, not a synchronisation.
                    thread::sleep(Duration::from_secs(2));
                }
            })
        })
        .collect();
    while started.elapsed() < attack_for && sent.load(Ordering::Relaxed) < 500 {
        thread::sleep(Duration::from_millis(100));
    }
    // Let the legitimate users poll through the whole minute.
    while started.elapsed() < attack_for {
        thread::sleep(Duration::from_millis(100));
    }
    over.store(true, Ordering::Relaxed);
    let attack: Vec<_> = attackers
        .into_iter()
        .flat_map(|t| t.join().unwrap())
        .collect();
    for t in legit {
        t.join().unwrap();
    }
    let elapsed = started.elapsed();
    let seen = seen.lock().unwrap();
    assert!(seen.len() >= 20 * 10, "{} logins", seen.len());
    for s in seen.iter() {
        let answer = s.answer.as_ref().unwrap_or_else(|before| {
            panic!("{}: closed without an answer after {before:?}", s.user)
        });
        if s.familiar {
            assert!(answer.starts_with("L1 OK"), "{s:?}");
            // Never held behind a failure (each holds its places for
            // `failure_delay`, 2 s); a loaded machine may take over a second.
            assert!(s.took < Duration::from_millis(1900), "{s:?}");
        } else {
            assert!(
                answer.starts_with("L1 OK") || answer.starts_with("L1 NO [UNAVAILABLE]"),
                "{s:?}"
            );
        }
    }
    // Every guess was answered, most of them unchecked.
    assert!(
        attack
            .iter()
            .all(|a| a.as_ref().is_ok_and(|a| a.starts_with("L1 NO"))),
        "{attack:?}"
    );
    let checked = guesses_checked(&w.service, &targets);
    let allowed = budget(8, elapsed, max_delay);
    eprintln!(
        "{} guesses sent in {elapsed:?}, {checked} checked at the source (the network's lane allows {allowed})",
        attack.len()
    );
    assert!(
        attack.len() > allowed,
        "the attack must outnumber the budget"
    );
    assert!(checked <= allowed, "{checked} > {allowed}");
    p.wait_metric("postern_auth_familiar_total", |v| v >= 100.0);
    p.wait_metric("postern_auth_lane_full_total{scope=\"network\"}", |v| {
        v >= 1.0
    });
    drop(w.b);
}

#[test]
fn guessing_one_user_from_many_networks_stays_within_that_user_s_lane() {
    let users = vec!["victim".to_owned(), "carol".to_owned()];
    let max_delay = Duration::from_secs(5);
    let w = world(
        "def-spread",
        &users,
        "brute_force: { max_delay: 5s, queue_wait: 10s }",
        "allow_plaintext_auth: true, proxy_protocol: { trusted_networks: [127.0.0.0/8] }",
    );
    let p = &w.p;
    let login_as = |ip: &str, user: &str| {
        let mut c = plain_as(p.imap, ip);
        let asked = Instant::now();
        let answer = try_login(&mut c, user, PASSWORD);
        (answer, asked.elapsed())
    };
    // The victim's home network.
    assert!(login_as("10.1.1.1", "victim")
        .0
        .unwrap()
        .starts_with("L1 OK"));
    let attack_for = Duration::from_secs(20);
    let started = Instant::now();
    let attackers: Vec<_> = (0..20)
        .map(|i| {
            let port = p.imap;
            thread::spawn(move || {
                let mut n = 0;
                while started.elapsed() < attack_for {
                    let ip = format!(
                        "10.2.{}.{}",
                        (i * 5 + n % 5) / 250,
                        (i * 5 + n % 5) % 250 + 1
                    );
                    let mut c = plain_as(port, &ip);
                    let answer = try_login(&mut c, "victim", &format!("guess{i}-{n}"));
                    assert!(
                        answer.as_ref().is_ok_and(|a| a.starts_with("L1 NO")),
                        "{answer:?}"
                    );
                    n += 1;
                }
                n
            })
        })
        .collect();
    // Meanwhile the victim at home and another user elsewhere log in.
    let mut logins = 0;
    while started.elapsed() < attack_for {
        for (ip, user) in [("10.1.1.1", "victim"), ("10.3.0.1", "carol")] {
            let (answer, took) = login_as(ip, user);
            let answer = answer.unwrap_or_else(|b| panic!("{user}: closed: {b:?}"));
            assert!(answer.starts_with("L1 OK"), "{user}: {answer}");
            // Never held behind a failure's 2 s (see above).
            assert!(took < Duration::from_millis(1900), "{user}: {took:?}");
            logins += 1;
        }
        // A mail client's poll, not a synchronisation.
        thread::sleep(Duration::from_millis(500));
    }
    let sent: usize = attackers.into_iter().map(|t| t.join().unwrap()).sum();
    let elapsed = started.elapsed();
    let checked = guesses_checked(&w.service, &users);
    let allowed = budget(2, elapsed, max_delay);
    eprintln!(
        "{sent} guesses from 100 addresses in {elapsed:?}, {checked} checked at the source (the user's lane allows {allowed}); {logins} other logins"
    );
    assert!(
        sent > allowed,
        "the attack must outnumber the budget: {sent}"
    );
    assert!(checked <= allowed, "{checked} > {allowed}");
    p.wait_metric("postern_auth_queued_total{scope=\"user\"}", |v| v >= 1.0);
}

#[test]
fn a_trusted_webmail_forwards_its_users_addresses() {
    let users = names("web", 49);
    let w = world(
        "def-webmail",
        &users,
        "trusted_forwarders: [127.0.0.5/32]\n\
         brute_force: { max_delay: 1s, block_after: 10 }",
        "allow_plaintext_auth: true",
    );
    let p = &w.p;
    // One webmail connection per login, as Roundcube makes them.
    let via = |from: &str, origin: &str, port: u16, user: &str, password: &str| {
        let mut c = Client::from_stream(tcp_from(from, p.imap));
        assert!(c.line().starts_with("* OK"));
        let id = c.command(
            "i",
            &format!("ID (\"name\" \"webmail\" \"x-originating-ip\" \"{origin}\" \"x-originating-port\" \"{port}\")"),
        );
        assert!(id.last().unwrap().starts_with("i OK"), "{id:?}");
        let answer = try_login(&mut c, user, password).unwrap();
        if answer.starts_with("L1 OK") {
            c.command("Z", "LOGOUT");
        }
        answer
    };
    let attacker = "198.51.100.66";
    for (i, user) in users.iter().enumerate() {
        // The attacker, among the webmail's users, tries a name now and then.
        if i % 4 == 0 {
            let answer = via("127.0.0.5", attacker, 50000, &format!("guess{i}"), "x");
            assert!(answer.starts_with("L1 NO"), "{answer}");
        }
        let answer = via(
            "127.0.0.5",
            &format!("192.0.2.{}", i + 1),
            40000 + i as u16,
            user,
            PASSWORD,
        );
        assert!(answer.starts_with("L1 OK"), "{user}: {answer}");
    }
    // 13 names tried: the attacker's address is blocked, nobody else's.
    let answer = via("127.0.0.5", attacker, 50000, "web00", PASSWORD);
    assert_eq!(
        answer,
        "L1 NO [UNAVAILABLE] Too many failed logins from your network, try again later"
    );
    let answer = via("127.0.0.5", "192.0.2.200", 40200, "web00", PASSWORD);
    assert!(answer.starts_with("L1 OK"), "{answer}");
    p.wait_metric("postern_auth_network_blocks_total", |v| v == 1.0);
    p.wait_metric("postern_auth_forwarded_total", |v| v >= 50.0);
    // The backend saw each user's own address.
    let expected: Vec<(String, String)> = users
        .iter()
        .enumerate()
        .map(|(i, u)| (format!("<{u}>"), format!("rip=192.0.2.{},", i + 1)))
        .collect();
    common::wait_for(
        "each user's login from their own address",
        SETTLE,
        || w.b.logins(),
        |logins| {
            expected
                .iter()
                .all(|(u, rip)| logins.iter().any(|l| l.contains(u) && l.contains(rip)))
        },
    );
    // From an address that is not trusted the ID is only logged: its own
    // address is the one that is penalised and forwarded.
    let answer = via("127.0.0.6", "192.0.2.201", 40201, "web01", PASSWORD);
    assert!(answer.starts_with("L1 OK"), "{answer}");
    common::wait_for(
        "web01's login from 127.0.0.6",
        SETTLE,
        || w.b.logins(),
        |l| {
            l.iter()
                .any(|l| l.contains("<web01>") && l.contains("rip=127.0.0.6,"))
        },
    );
    for n in 0..10 {
        let origin = format!("192.0.2.{}", 210 + n);
        let answer = via("127.0.0.6", &origin, 40300, &format!("guess-u{n}"), "x");
        assert!(answer.starts_with("L1 NO"), "{answer}");
    }
    let answer = via("127.0.0.6", "192.0.2.220", 40220, "web02", PASSWORD);
    assert_eq!(
        answer,
        "L1 NO [UNAVAILABLE] Too many failed logins from your network, try again later"
    );
    p.wait_metric("postern_auth_network_blocks_total", |v| v == 2.0);
}
