//! Micro benchmark of the pre-auth path: framing and parsing of typical
//! commands, and SASL PLAIN decoding. `cargo bench --bench preauth` prints
//! ns per command; under `cargo test` it runs a few iterations as a smoke test.

use std::hint::black_box;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Instant;

use postern::imap::command;
use postern::imap::framing::CommandReader;
use postern::imap::sasl;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Reads from a byte slice, discards writes (the `+` continuations).
struct Script<'a>(&'a [u8]);

impl AsyncRead for Script<'_> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let n = self.0.len().min(buf.remaining());
        buf.put_slice(&self.0[..n]);
        self.0 = &self.0[n..];
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for Script<'_> {
    fn poll_write(self: Pin<&mut Self>, _: &mut Context<'_>, b: &[u8]) -> Poll<io::Result<usize>> {
        Poll::Ready(Ok(b.len()))
    }
    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

const CASES: &[(&str, &[u8])] = &[
    (
        "LOGIN quoted",
        b"a001 LOGIN \"alice@example.com\" \"correct horse battery\"\r\n",
    ),
    (
        "LOGIN literals",
        b"a002 LOGIN {17+}\r\nalice@example.com {21}\r\ncorrect horse battery\r\n",
    ),
    (
        "AUTHENTICATE PLAIN SASL-IR",
        b"a003 AUTHENTICATE PLAIN AGFsaWNlQGV4YW1wbGUuY29tAGNvcnJlY3QgaG9yc2UgYmF0dGVyeQ==\r\n",
    ),
    (
        "ID",
        b"a004 ID (\"name\" \"Thunderbird\" \"version\" \"128.5.0\" \"os\" \"Linux\")\r\n",
    ),
    ("CAPABILITY", b"a005 CAPABILITY\r\n"),
];

fn main() {
    let bench = std::env::args().any(|a| a == "--bench");
    let iterations = if bench { 200_000 } else { 100 };
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    println!("pre-auth framing + parsing ({iterations} iterations each)");
    for (name, bytes) in CASES {
        let start = Instant::now();
        rt.block_on(async {
            for _ in 0..iterations {
                let mut reader = CommandReader::new(8192, 8192);
                let mut stream = Script(bytes);
                let raw = reader.read_command(&mut stream).await.unwrap();
                black_box(command::parse(&raw).unwrap());
            }
        });
        let ns = start.elapsed().as_nanos() as f64 / iterations as f64;
        println!("  {name:<28} {ns:>8.0} ns/command");
    }
    let encoded = sasl::encode_plain(b"", b"alice@example.com", b"correct horse battery");
    let start = Instant::now();
    for _ in 0..iterations {
        let message = sasl::decode_response(black_box(encoded.expose())).unwrap();
        black_box(sasl::decode_plain(&message).unwrap());
    }
    let ns = start.elapsed().as_nanos() as f64 / iterations as f64;
    println!("  {:<28} {ns:>8.0} ns/message", "SASL PLAIN decode");
}
