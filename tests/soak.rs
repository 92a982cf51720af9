//! Soak with integrity: many concurrent sessions through Postern to two
//! real Dovecot backends, each worker logging in (IMAPS or STARTTLS),
//! APPENDing a random message, FETCHing it back by UID and checking its
//! SHA-256, expunging it and logging out, over and over, while other
//! sessions of the same users sit in IDLE and must hear of new mail (each
//! of them of the last message).
//! Postern's memory is sampled throughout: it must not grow with the
//! number of session cycles, and no byte may be lost or altered.
//!
//! The suite runs it for 40 s. The long soak is the same test:
//! `POSTERN_SOAK_SECONDS=1800 cargo test --release --test soak -- --nocapture`.

mod common;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::backend::DovecotBackend;
use common::client::Client;
use common::postern::{user, Postern, Setup, PASSWORD};
use sha2::{Digest, Sha256};

const USERS: usize = 16;
const WATCHERS_PER_USER: usize = 2;
/// Session cycles the soak runs at least, past its time if the machine
/// is slow, so the memory trend is over enough of them.
const MIN_CYCLES: u64 = 101;

fn seconds() -> u64 {
    std::env::var("POSTERN_SOAK_SECONDS")
        .ok()
        .map(|s| s.parse().expect("POSTERN_SOAK_SECONDS is a number"))
        .unwrap_or(40)
}

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    /// A message of about `len` bytes: headers naming it, then printable
    /// lines of varied length (CRLF-terminated, as IMAP stores them).
    fn message(&mut self, id: &str, len: usize) -> Vec<u8> {
        let mut m = format!(
            "From: soak@example.com\r\nTo: {id}@example.com\r\nMessage-ID: <{id}@soak.test>\r\nSubject: {id}\r\n\r\n"
        )
        .into_bytes();
        while m.len() < len {
            let line = 1 + self.next() % 200;
            for _ in 0..line {
                m.push(b' ' + (self.next() % 95) as u8);
            }
            m.extend_from_slice(b"\r\n");
        }
        m
    }
}

/// The number inside the trailing `{n}` of a line announcing a literal.
fn literal_len(line: &str) -> usize {
    line.strip_suffix('}')
        .and_then(|l| l.rsplit('{').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no literal announced: {line}"))
}

#[derive(Default)]
struct Totals {
    cycles: AtomicU64,
    bytes: AtomicU64,
}

/// One session cycle: log in, APPEND, FETCH back and compare, expunge
/// (unless `keep`), log out.
fn cycle(p: &Postern, name: &str, n: u64, rng: &mut Rng, totals: &Totals, keep: bool) {
    let mut c = if n.is_multiple_of(2) {
        Client::imaps(p.imaps).0
    } else {
        Client::starttls(p.imap)
    };
    let login = c.login(name, PASSWORD);
    assert!(
        login.last().unwrap().starts_with("L1 OK"),
        "{name}: {login:?}"
    );
    // Sizes from 100 bytes to about 400 KiB, most of them small.
    let size = 100 + (rng.next() % 4096) as usize * (1 + (rng.next() % 100) as usize);
    let message = rng.message(&format!("{name}-{n}"), size);
    let digest = Sha256::digest(&message);
    c.send(format!("A APPEND INBOX {{{}+}}\r\n", message.len()).as_bytes());
    c.send(&message);
    c.send(b"\r\n");
    let appended = c.until_tagged("A");
    let ok = appended.last().unwrap();
    // A OK [APPENDUID <validity> <uid>] Append completed.
    let uid: u32 = ok
        .strip_prefix("A OK [APPENDUID ")
        .and_then(|r| r.split([' ', ']']).nth(1))
        .and_then(|u| u.parse().ok())
        .unwrap_or_else(|| panic!("{name}: {appended:?}"));
    let selected = c.command("S", "SELECT INBOX");
    assert!(selected.last().unwrap().starts_with("S OK"), "{selected:?}");
    c.send(format!("F UID FETCH {uid} BODY.PEEK[]\r\n").as_bytes());
    let head = loop {
        let line = c.line();
        if line.contains("BODY[] {") {
            break line;
        }
        assert!(
            !line.starts_with("F "),
            "{name}: uid {uid} not fetched: {line}"
        );
    };
    let len = literal_len(&head);
    assert_eq!(len, message.len(), "{name}: size of uid {uid}");
    let fetched = c.bytes(len);
    assert!(
        Sha256::digest(&fetched) == digest,
        "{name}: uid {uid} came back altered"
    );
    let done = c.until_tagged("F");
    assert!(done.last().unwrap().starts_with("F OK"), "{done:?}");
    if !keep {
        let flagged = c.command("X", &format!("UID STORE {uid} +FLAGS.SILENT (\\Deleted)"));
        assert!(flagged.last().unwrap().starts_with("X OK"), "{flagged:?}");
        let expunged = c.command("E", &format!("UID EXPUNGE {uid}"));
        assert!(expunged.last().unwrap().starts_with("E OK"), "{expunged:?}");
    }
    let bye = c.command("Z", "LOGOUT");
    assert!(bye.last().unwrap().starts_with("Z OK"), "{bye:?}");
    assert!(c.closed());
    totals.cycles.fetch_add(1, Ordering::Relaxed);
    totals.bytes.fetch_add(2 * len as u64, Ordering::Relaxed);
}

#[test]
fn sessions_cycle_for_minutes_without_losing_a_byte_or_growing() {
    common::backend::ensure_installed();
    let names: Vec<String> = (0..USERS).map(|i| format!("soak{i:02}")).collect();
    let creds: Vec<(&str, &str)> = names.iter().map(|n| (n.as_str(), PASSWORD)).collect();
    let a = DovecotBackend::start_with_users("soak-a", &creds);
    let b = DovecotBackend::start_with_users("soak-b", &creds);
    let users: String = names.iter().map(|n| user(n)).collect();
    let p = Postern::start(Setup {
        backends: &[&a, &b],
        users: &users,
        ..Setup::default()
    });
    let run_for = Duration::from_secs(seconds());
    let totals = Totals::default();
    // Set once the last, kept message of each user is on its way: a
    // watcher ends at the next EXISTS it hears.
    let finale = AtomicBool::new(false);
    // Set if the test fails while watchers run, so they stop waiting.
    let abandon = AtomicBool::new(false);
    struct Abandon<'a>(&'a AtomicBool);
    impl Drop for Abandon<'_> {
        fn drop(&mut self) {
            self.0.store(true, Ordering::Relaxed);
        }
    }
    let started = Instant::now();
    let mut samples: Vec<(u64, u64)> = Vec::new();
    std::thread::scope(|scope| {
        let _abandon = Abandon(&abandon);
        let mut watchers = Vec::new();
        for name in &names {
            // Sessions that idle all along and must hear of new mail, the
            // last message above all.
            for _ in 0..WATCHERS_PER_USER {
                let mut w = Client::logged_in(p.imaps, name);
                w.select_and_idle();
                let (finale, abandon) = (&finale, &abandon);
                watchers.push(scope.spawn(move || {
                    let mut exists = 0u64;
                    let mut finale_since = None;
                    loop {
                        if abandon.load(Ordering::Relaxed) {
                            return exists;
                        }
                        if finale.load(Ordering::Relaxed) {
                            let since = *finale_since.get_or_insert_with(Instant::now);
                            // Dovecot checks an IDLE mailbox every 30 s when
                            // it cannot watch it (inotify limits on a busy
                            // machine): beyond that, with room to spare.
                            assert!(
                                since.elapsed() < Duration::from_secs(90),
                                "an idle session never heard of the last message"
                            );
                        }
                        match w.next_line() {
                            Ok(Some(line)) => {
                                assert!(line.starts_with("* "), "in IDLE: {line}");
                                if line.ends_with(" EXISTS") {
                                    exists += 1;
                                    if finale.load(Ordering::Relaxed) {
                                        break;
                                    }
                                }
                            }
                            Err(e)
                                if matches!(
                                    e.kind(),
                                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                                ) => {}
                            end => panic!("an idle session was cut: {end:?}"),
                        }
                    }
                    w.send(b"DONE\r\n");
                    let done = w.until_tagged("i");
                    assert!(done.last().unwrap().starts_with("i OK"), "{done:?}");
                    exists
                }));
            }
        }
        let workers: Vec<_> = names
            .iter()
            .enumerate()
            .map(|(i, name)| {
                let (p, totals) = (&p, &totals);
                scope.spawn(move || {
                    let mut rng = Rng(0x5DEE_CE66_D1CE_4E5B ^ (i as u64 + 1) << 20);
                    let mut n = 0;
                    while started.elapsed() < run_for
                        || totals.cycles.load(Ordering::Relaxed) < MIN_CYCLES
                    {
                        cycle(p, name, n, &mut rng, totals, false);
                        n += 1;
                    }
                })
            })
            .collect();
        while !workers.iter().all(|w| w.is_finished()) {
            samples.push((totals.cycles.load(Ordering::Relaxed), p.rss_bytes()));
            assert!(
                started.elapsed() < run_for + Duration::from_secs(120),
                "bounded in time"
            );
            std::thread::sleep(Duration::from_secs(1)); // sampling period
        }
        for w in workers {
            w.join().expect("a worker failed");
        }
        // One more message per user, kept (one appended and expunged at
        // once may pass an idle session by): every watcher must hear of it.
        finale.store(true, Ordering::Relaxed);
        for (i, name) in names.iter().enumerate() {
            let mut rng = Rng(i as u64 + 7);
            cycle(&p, name, 0, &mut rng, &totals, true);
        }
        for w in watchers {
            let seen = w.join().expect("a watcher failed");
            assert!(seen > 0, "a watcher saw no new message");
        }
    });
    let cycles = totals.cycles.load(Ordering::Relaxed);
    let bytes = totals.bytes.load(Ordering::Relaxed);
    let elapsed = started.elapsed();
    // Memory: after the first quarter, no growth with the cycles. The
    // lowest of the last three samples against the highest around the
    // warm-up mark, so one late step of the allocator is not a trend.
    let warm = samples.len() / 4;
    let around = &samples[warm..(warm + 3).min(samples.len())];
    let warm_rss = around.iter().map(|s| s.1).max().unwrap();
    let warm_cycles = around[0].0;
    let tail = &samples[samples.len().saturating_sub(3)..];
    let end_rss = tail.iter().map(|s| s.1).min().unwrap();
    let end_cycles = tail[0].0;
    let growth = end_rss.saturating_sub(warm_rss);
    let per_cycle = growth / (end_cycles - warm_cycles).max(1);
    eprintln!(
        "soak: {cycles} session cycles, {} MiB appended and fetched back intact, {} sessions idle throughout, in {elapsed:.1?}; RSS {} KiB after {warm_cycles} cycles, {} KiB after {end_cycles} ({per_cycle} bytes/cycle); peak {} KiB",
        bytes >> 20,
        USERS * WATCHERS_PER_USER,
        warm_rss / 1024,
        end_rss / 1024,
        samples.iter().map(|s| s.1).max().unwrap() / 1024,
    );
    assert!(cycles >= MIN_CYCLES, "the soak ran: {cycles} cycles");
    // 8 MiB of slack for the allocator's steps on a loaded machine.
    assert!(
        !common::postern::rss_is_meaningful()
            || growth < (8 << 20) + 256 * (end_cycles - warm_cycles),
        "Postern grew {} KiB over {} cycles",
        growth / 1024,
        end_cycles - warm_cycles
    );
    // The books balance: every session ended, none lost. A session leaves
    // the active gauge a moment before it is counted as ended: both waited
    // for, then read from one scrape.
    let sum = common::postern::family_sum;
    let expected = (cycles + (USERS * WATCHERS_PER_USER) as u64) as f64;
    let text = common::wait_for(
        "every session ended and counted",
        common::SETTLE,
        || common::LogText(p.metrics_text()),
        |t| {
            sum(&t.0, "postern_sessions_active{") == 0.0
                && sum(&t.0, "postern_sessions_ended_total{")
                    == sum(&t.0, "postern_connections_accepted_total{")
        },
    )
    .0;
    let accepted = sum(&text, "postern_connections_accepted_total{");
    assert_eq!(accepted, expected);
    assert_eq!(sum(&text, "postern_sessions_ended_total{"), accepted);
    let ended_badly: Vec<&str> = text
        .lines()
        .filter(|l| l.starts_with("postern_sessions_ended_total{"))
        .filter(|l| {
            !l.contains("reason=\"client_closed\"") && !l.contains("reason=\"backend_closed\"")
        })
        .collect();
    assert!(ended_badly.is_empty(), "{ended_badly:?}");
}
