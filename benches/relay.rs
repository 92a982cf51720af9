//! Micro benchmark of the relay loop over loopback TCP: one session moving
//! bytes backend→client as fast as the sockets allow, reporting MiB/s and
//! CPU per GiB of the whole process (relay and both test ends).
//!
//! Three streams, each what a backend really sends:
//! - `fetch`: FETCH responses each carrying a 1 MiB literal (a mail sync);
//! - `lines`: short untagged responses only (a flag sync of a big mailbox),
//!   the worst case for the relay's response framing;
//! - `compress`: after `COMPRESS DEFLATE` and its OK, the `fetch` stream
//!   deflated with a sync flush after each response, as Dovecot sends it.
//!   CPU per GiB is given per GiB on the wire and per GiB of mail inflated.
//!
//! `cargo bench --bench relay`; under `cargo test` each moves a few MiB.

use std::alloc::{GlobalAlloc, Layout, System};
use std::io::Write;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use flate2::write::DeflateEncoder;
use flate2::Compression;
use postern::imap::watch::Watch;
use postern::relay::{relay, Counters, StopCause};
use prometheus::IntCounter;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Counts the bytes allocated and not yet freed, to weigh the watch.
struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE.fetch_add(layout.size(), Ordering::Relaxed);
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

fn cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let fields: Vec<&str> = stat
        .rsplit(')')
        .next()
        .unwrap_or("")
        .split_whitespace()
        .collect();
    let ticks: f64 = fields.get(11).and_then(|u| u.parse().ok()).unwrap_or(0.0)
        + fields.get(12).and_then(|s| s.parse().ok()).unwrap_or(0.0);
    ticks / 100.0
}

async fn pair() -> (TcpStream, TcpStream) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (a, b) = tokio::join!(TcpStream::connect(addr), listener.accept());
    (a.unwrap(), b.unwrap().0)
}

/// Mail text: CRLF lines of varied content, about `size` bytes.
fn mail(size: usize, seed: u64) -> Vec<u8> {
    let mut m = b"From: bench@example.com\r\nSubject: relay\r\n\r\n".to_vec();
    let mut i = seed;
    while m.len() + 83 < size {
        let x = i.wrapping_mul(0x9e37_79b9_7f4a_7c15);
        m.extend_from_slice(format!("{i:016x} {x:064x}\r\n").as_bytes());
        i += 1;
    }
    m
}

/// Four FETCH responses with a 1 MiB literal each.
fn fetch_stream() -> Vec<Vec<u8>> {
    (0..4u64)
        .map(|n| {
            let body = mail(1 << 20, n << 32);
            let mut r = format!(
                "* {} FETCH (UID {} BODY[] {{{}}}\r\n",
                n + 1,
                n + 1,
                body.len()
            )
            .into_bytes();
            r.extend_from_slice(&body);
            r.extend_from_slice(b")\r\n");
            r
        })
        .collect()
}

/// Untagged FETCH responses of about 45 bytes, 1 MiB of them.
fn lines_stream() -> Vec<u8> {
    let mut s = Vec::with_capacity(1 << 20);
    let mut n = 1u64;
    while s.len() < 1 << 20 {
        s.extend_from_slice(format!("* {n} FETCH (UID {n} FLAGS (\\Seen))\r\n").as_bytes());
        n += 1;
    }
    s
}

/// The responses deflated (raw, level 6) with a sync flush after each: a
/// piece of a stream that may be repeated, since it refers to nothing
/// before its start.
fn deflated(responses: &[Vec<u8>]) -> Vec<u8> {
    let mut z = DeflateEncoder::new(Vec::new(), Compression::new(6));
    for r in responses {
        z.write_all(r).unwrap();
        z.flush().unwrap();
    }
    z.get_ref().clone()
}

struct Figures {
    wire: usize,
    secs: f64,
    cpu: f64,
}

/// Relays `piece` repeated until `total` bytes, after the exchange
/// `preamble` (what the client sends, what the backend answers).
fn run(
    rt: &tokio::runtime::Runtime,
    piece: Vec<u8>,
    total: usize,
    preamble: (&'static [u8], &'static [u8]),
) -> Figures {
    rt.block_on(async {
        let (mut client, client_near) = pair().await;
        let (backend_near, mut backend) = pair().await;
        let counters = Counters {
            client_to_backend: IntCounter::new("up", "up").unwrap(),
            backend_to_client: IntCounter::new("down", "down").unwrap(),
            session: None,
        };
        let relay = tokio::spawn(async move {
            relay(
                client_near,
                backend_near,
                Vec::new(),
                Vec::new(),
                Duration::from_secs(60),
                &counters,
                std::future::pending::<StopCause>(),
            )
            .await
        });
        let (ask, answer) = preamble;
        client.write_all(ask).await.unwrap();
        let mut asked = vec![0u8; ask.len()];
        backend.read_exact(&mut asked).await.unwrap();
        backend.write_all(answer).await.unwrap();
        let mut answered = vec![0u8; answer.len()];
        client.read_exact(&mut answered).await.unwrap();
        let repeats = total.div_ceil(piece.len());
        let wire = repeats * piece.len();
        let cpu = cpu_seconds();
        let start = Instant::now();
        let writer = tokio::spawn(async move {
            for _ in 0..repeats {
                backend.write_all(&piece).await.unwrap();
            }
            backend.shutdown().await.unwrap();
            backend
        });
        let mut buf = vec![0u8; 256 * 1024];
        let mut got = 0;
        loop {
            let n = client.read(&mut buf).await.unwrap();
            if n == 0 {
                break;
            }
            got += n;
        }
        let secs = start.elapsed().as_secs_f64();
        let cpu = cpu_seconds() - cpu;
        assert_eq!(got, wire);
        drop(client);
        drop(writer.await.unwrap());
        let outcome = relay.await.unwrap();
        assert_eq!(outcome.backend_to_client as usize, wire + answer.len());
        Figures { wire, secs, cpu }
    })
}

fn main() {
    let bench = std::env::args().any(|a| a == "--bench");
    let total: usize = if bench { 4 << 30 } else { 8 << 20 };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let gib = (1u64 << 30) as f64;
    let mib = (1u64 << 20) as f64;
    let none: (&[u8], &[u8]) = (b"", b"");
    // RELAY_BENCH=lines (or fetch, compress, a comma-separated list) runs
    // only those.
    let only = std::env::var("RELAY_BENCH").unwrap_or_default();
    let runs = |name: &str| only.is_empty() || only.split(',').any(|n| n == name);

    let fetch = fetch_stream();
    if runs("fetch") {
        let f = run(&rt, fetch.concat(), total, none);
        println!(
        "relay fetch    (1 MiB literals): {:6.0} MiB/s, {:.2} CPU s per GiB (whole process, both ends included)",
        f.wire as f64 / mib / f.secs,
        f.cpu / (f.wire as f64 / gib)
    );
    }

    if runs("watch") {
        // The response framing alone, on one core, 64 KiB reads.
        for (name, stream) in [("fetch", fetch.concat()), ("lines", lines_stream())] {
            let mut watch = Watch::new();
            let bytes = total / 4;
            let cpu = cpu_seconds();
            let start = Instant::now();
            let mut fed = 0;
            while fed < bytes {
                for chunk in stream.chunks(64 * 1024) {
                    watch.backend_sent(std::hint::black_box(chunk), false);
                }
                fed += stream.len();
            }
            let secs = start.elapsed().as_secs_f64();
            let cpu = cpu_seconds() - cpu;
            assert!(watch.at_boundary());
            println!(
                "watch alone    ({name}):            {:6.0} MiB/s, {:.2} CPU s per GiB",
                fed as f64 / mib / secs,
                cpu / (fed as f64 / gib)
            );
        }
    }

    if runs("memory") {
        // What a compressed session holds beyond a plain one: the watch's
        // inflater, made when the backend says OK.
        let mut watch = Watch::new();
        watch.client_sent(b"z COMPRESS DEFLATE\r\n");
        let before = LIVE.load(Ordering::Relaxed);
        let mut wire = b"z OK\r\n".to_vec();
        wire.extend(deflated(&[b"* 1 EXISTS\r\n".to_vec()]));
        watch.backend_sent(&wire, false);
        assert!(watch.compressed() && watch.at_boundary());
        let inflater = LIVE.load(Ordering::Relaxed) - before;
        // What the alternative, compressing for the client at the proxy,
        // would hold per session: a deflate state at level 6, and an
        // inflater for the client's own compressed commands.
        let before = LIVE.load(Ordering::Relaxed);
        let mut z = DeflateEncoder::new(Vec::new(), Compression::new(6));
        z.write_all(b"* 1 EXISTS\r\n").unwrap();
        z.flush().unwrap();
        let deflater = LIVE.load(Ordering::Relaxed) - before;
        println!(
            "memory per compressed session: {:.1} KiB (the shadow inflater); a proxy-side deflater alone would take {:.1} KiB",
            inflater as f64 / 1024.0,
            deflater as f64 / 1024.0
        );
        // Parked while the backend is quiet: the window, deflated. Measured
        // after a mail sync (the window full of message text) and after a
        // flag sync (short FETCH lines). The first park makes the thread's
        // one deflater for parking, which is not the session's.
        for (name, stream) in [
            ("warm-up", lines_stream()),
            ("mail", fetch.concat()),
            ("flags", lines_stream()),
        ] {
            let mut watch = Watch::new();
            watch.client_sent(b"z COMPRESS DEFLATE\r\n");
            let mut wire = b"z OK\r\n".to_vec();
            wire.extend(deflated(&[stream]));
            watch.backend_sent(&wire, false);
            let before = LIVE.load(Ordering::Relaxed);
            assert!(watch.park());
            let freed = before.saturating_sub(LIVE.load(Ordering::Relaxed));
            if name == "warm-up" {
                continue;
            }
            println!(
                "memory per quiet compressed session ({name}): {:.1} KiB once parked",
                (inflater - freed) as f64 / 1024.0
            );
        }
        drop((watch, z));
        // What compressing the responses at the proxy would cost in CPU.
        let mail = fetch.concat();
        let cpu = cpu_seconds();
        let mut z = DeflateEncoder::new(std::io::sink(), Compression::new(6));
        let rounds = (total / 16).div_ceil(mail.len());
        for _ in 0..rounds {
            z.write_all(&mail).unwrap();
            z.flush().unwrap();
        }
        let cpu = cpu_seconds() - cpu;
        println!(
            "deflate at level 6 (what taking COMPRESS over would add): {:.2} CPU s per GiB of mail",
            cpu / ((rounds * mail.len()) as f64 / gib)
        );
    }

    if runs("lines") {
        let f = run(&rt, lines_stream(), total / 4, none);
        println!(
            "relay lines    (45-byte lines):  {:6.0} MiB/s, {:.2} CPU s per GiB",
            f.wire as f64 / mib / f.secs,
            f.cpu / (f.wire as f64 / gib)
        );
    }

    if runs("compress") {
        let plain = fetch.concat().len();
        let piece = deflated(&fetch);
        let ratio = plain as f64 / piece.len() as f64;
        let f = run(
            &rt,
            piece,
            total / 4,
            (b"z COMPRESS DEFLATE\r\n", b"z OK DEFLATE active\r\n"),
        );
        let inflated = f.wire as f64 * ratio;
        println!(
        "relay compress (deflated {ratio:.1}:1): {:6.0} MiB/s on the wire, {:.2} CPU s per GiB on the wire, {:.2} per GiB of mail",
        f.wire as f64 / mib / f.secs,
        f.cpu / (f.wire as f64 / gib),
        f.cpu / (inflated / gib)
    );
    }
}
