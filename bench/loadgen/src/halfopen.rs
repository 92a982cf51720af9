//! `halfopen`: many TCP connections that each send the start of one TLS
//! handshake record and then stall, so the peer holds whatever it keeps for
//! a handshake in progress (or, with `--bytes 0`, for a connection that has
//! said nothing yet). The caller samples the peer's memory while they are
//! held.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Args;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, watch, Semaphore};
use tokio::time::timeout;

use crate::conn::{Result, READ_TIMEOUT};
use crate::{check_loopback, write_ready, Errors};

/// The record header announces this many bytes of handshake data: the
/// largest plaintext record (2^14), so no peer can finish reading it.
const RECORD_LENGTH: usize = 16384;
/// Record header: type, version, length.
const HEADER_LEN: usize = 5;
/// How long closing every connection and collecting the tasks may take.
const TEARDOWN_LIMIT: Duration = Duration::from_secs(30);

#[derive(Args)]
pub struct HalfopenArgs {
    /// Where to connect: a loopback address and port (a TLS listener).
    #[arg(long)]
    target: SocketAddr,
    /// Connections to open and hold.
    #[arg(long)]
    connections: usize,
    /// Bytes sent on each connection: 0 sends nothing; otherwise 5 (the
    /// record header alone) to 16388 bytes of one TLS handshake record
    /// whose header announces 16384 bytes, so the record is never complete.
    #[arg(long, default_value_t = 16000)]
    bytes: usize,
    /// Connections being opened (connect and send) at once.
    #[arg(long, default_value_t = 64)]
    connect_concurrency: usize,
    /// How long all connections stay open after the ready file is written.
    #[arg(long)]
    hold_secs: u64,
    /// Written (with the number of connections still open) once all are
    /// opened.
    #[arg(long)]
    ready_file: PathBuf,
}

/// The first `bytes` bytes of a TLS record of type handshake (22), record
/// version 3.1 as ClientHellos use, length 16384; its body starts with a
/// ClientHello message header claiming the rest of the record, then zeros.
fn partial_record(bytes: usize) -> Result<Vec<u8>> {
    if bytes == 0 {
        return Ok(Vec::new());
    }
    if !(HEADER_LEN..HEADER_LEN + RECORD_LENGTH).contains(&bytes) {
        return Err(format!(
            "--bytes must be 0 or {HEADER_LEN} to {} (a record header, then less than the \
             {RECORD_LENGTH} bytes it announces), not {bytes}",
            HEADER_LEN + RECORD_LENGTH - 1
        ));
    }
    let [len_hi, len_lo] = (RECORD_LENGTH as u16).to_be_bytes();
    let mut record = vec![0x16, 0x03, 0x01, len_hi, len_lo];
    // Handshake header: ClientHello (1), 24-bit length of the rest.
    let body = (RECORD_LENGTH - 4) as u32;
    let [_, b1, b2, b3] = body.to_be_bytes();
    record.extend_from_slice(&[0x01, b1, b2, b3]);
    record.resize(bytes, 0);
    record.truncate(bytes);
    Ok(record)
}

/// How a held connection ended, seen from the loadgen.
enum Held {
    /// Open until the hold ended; closed by us.
    Open,
    /// The peer closed or reset it, this long after the phase began.
    ClosedByPeer(Duration),
}

pub async fn halfopen(a: HalfopenArgs) -> Result<String> {
    check_loopback(a.target)?;
    if a.connections == 0 {
        return Err("--connections must be positive".into());
    }
    let payload = Arc::new(partial_record(a.bytes)?);
    let gate = Arc::new(Semaphore::new(a.connect_concurrency.max(1)));
    let (stop_tx, stop_rx) = watch::channel(false);
    let (setup_tx, mut setup_rx) = mpsc::unbounded_channel::<bool>();
    let errors = Arc::new(Errors::default());
    let closed_so_far = Arc::new(AtomicUsize::new(0));
    let start = Instant::now();
    // Reads during the hold wait at most this long; the hold ends sooner.
    let hold_limit = Duration::from_secs(a.hold_secs) + READ_TIMEOUT;

    let mut tasks = Vec::with_capacity(a.connections);
    for _ in 0..a.connections {
        let (gate, payload, mut stop_rx, setup_tx, errors, closed_so_far) = (
            gate.clone(),
            payload.clone(),
            stop_rx.clone(),
            setup_tx.clone(),
            errors.clone(),
            closed_so_far.clone(),
        );
        let target = a.target;
        tasks.push(tokio::spawn(async move {
            let opened = {
                let _permit = gate.acquire().await.expect("the gate is never closed");
                open(target, &payload).await
            };
            let _ = setup_tx.send(opened.is_ok());
            drop(setup_tx);
            let mut tcp = match opened {
                Ok(tcp) => tcp,
                Err(e) => {
                    errors.record(e);
                    return None;
                }
            };
            // Whatever the peer sends (an alert, say) is read and dropped;
            // end of stream or an error means it closed the connection.
            let mut sink = [0u8; 512];
            let closed = async {
                loop {
                    match tcp.read(&mut sink).await {
                        Ok(0) | Err(_) => break,
                        Ok(_) => continue,
                    }
                }
            };
            tokio::select! {
                r = timeout(hold_limit, closed) => Some(match r {
                    Ok(()) => {
                        closed_so_far.fetch_add(1, Ordering::Relaxed);
                        Held::ClosedByPeer(start.elapsed())
                    }
                    Err(_) => Held::Open,
                }),
                _ = stop_rx.wait_for(|stop| *stop) => Some(Held::Open),
            }
        }));
    }
    drop(setup_tx);

    // Each connect and send is bounded by READ_TIMEOUT, so this loop ends.
    let (mut opened, mut failed) = (0usize, 0usize);
    while let Some(ok) = setup_rx.recv().await {
        if ok {
            opened += 1;
        } else {
            failed += 1;
        }
    }
    let setup = start.elapsed();
    errors.report("half-open setup");
    let open_at_ready = opened.saturating_sub(closed_so_far.load(Ordering::Relaxed));
    eprintln!(
        "postern-loadgen: {opened} connections opened ({} bytes each), {failed} failed, \
         {open_at_ready} still open after {:.1} s; holding {} s",
        a.bytes,
        setup.as_secs_f64(),
        a.hold_secs
    );
    write_ready(&a.ready_file, open_at_ready)?;

    tokio::time::sleep(Duration::from_secs(a.hold_secs)).await;
    let _ = stop_tx.send(true);

    let deadline = tokio::time::Instant::now() + TEARDOWN_LIMIT;
    let (mut closed_by_peer, mut closed_in_hold) = (0usize, 0usize);
    for t in tasks {
        match tokio::time::timeout_at(deadline, t).await {
            Ok(Ok(Some(Held::ClosedByPeer(at)))) => {
                closed_by_peer += 1;
                if at > setup {
                    closed_in_hold += 1;
                }
            }
            Ok(Ok(_)) => {}
            Ok(Err(e)) => return Err(format!("connection task: {e}")),
            Err(_) => return Err("closing the connections took too long".into()),
        }
    }
    Ok(format!(
        "{{\"connections\":{opened},\"failed\":{failed},\"bytes\":{},\"setup_secs\":{:.2},\
         \"open_at_ready\":{open_at_ready},\"hold_secs\":{},\"closed_by_peer\":{closed_by_peer},\
         \"closed_during_hold\":{closed_in_hold}}}",
        a.bytes,
        setup.as_secs_f64(),
        a.hold_secs,
    ))
}

/// Connects (TCP_NODELAY, so the bytes leave at once) and sends `payload`.
async fn open(target: SocketAddr, payload: &[u8]) -> Result<TcpStream> {
    let mut tcp = timeout(READ_TIMEOUT, TcpStream::connect(target))
        .await
        .map_err(|_| "connect: timed out".to_string())?
        .map_err(|e| format!("connect: {e}"))?;
    tcp.set_nodelay(true)
        .map_err(|e| format!("TCP_NODELAY: {e}"))?;
    if !payload.is_empty() {
        timeout(READ_TIMEOUT, tcp.write_all(payload))
            .await
            .map_err(|_| "write: timed out".to_string())?
            .map_err(|e| format!("write: {e}"))?;
    }
    Ok(tcp)
}

#[cfg(test)]
mod tests {
    use super::partial_record;

    #[test]
    fn records() {
        assert!(partial_record(0).unwrap().is_empty());
        assert!(partial_record(4).is_err());
        assert!(partial_record(16389).is_err());
        assert_eq!(partial_record(5).unwrap(), [0x16, 3, 1, 0x40, 0]);
        let r = partial_record(16000).unwrap();
        assert_eq!(r.len(), 16000);
        assert_eq!(r[..9], [0x16, 3, 1, 0x40, 0, 1, 0, 0x3f, 0xfc]);
        assert!(r[9..].iter().all(|&b| b == 0));
        assert_eq!(partial_record(16388).unwrap().len(), 16388);
    }
}
