//! Micro benchmark of the relay loop over loopback TCP: one session moving
//! bytes backend→client as fast as the sockets allow, reporting MiB/s and
//! CPU per GiB of the whole process (relay and both test ends).
//! `cargo bench --bench relay`; under `cargo test` it moves a few MiB.

use std::time::{Duration, Instant};

use postern::relay::{relay, Counters};
use prometheus::IntCounter;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

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

fn main() {
    let bench = std::env::args().any(|a| a == "--bench");
    let total: usize = if bench { 4 << 30 } else { 8 << 20 };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
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
                Duration::from_secs(60),
                &counters,
                std::future::pending(),
            )
            .await
        });
        let cpu = cpu_seconds();
        let start = Instant::now();
        let writer = tokio::spawn(async move {
            let chunk = vec![0x5au8; 256 * 1024];
            let mut sent = 0;
            while sent < total {
                backend.write_all(&chunk).await.unwrap();
                sent += chunk.len();
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
        assert_eq!(got, total);
        drop(client);
        drop(writer.await.unwrap());
        let outcome = relay.await.unwrap();
        assert_eq!(outcome.backend_to_client as usize, total);
        let gib = total as f64 / (1u64 << 30) as f64;
        println!(
            "relay over loopback TCP: {:.0} MiB/s, {:.2} CPU s per GiB (whole process, both ends included)",
            total as f64 / (1 << 20) as f64 / secs,
            cpu / gib
        );
    });
}
