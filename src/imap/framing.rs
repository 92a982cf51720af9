//! Reads whole pre-auth commands off a client stream: lines ending in CRLF,
//! with synchronizing `{n}` and non-synchronizing `{n+}` literals (RFC 9051
//! §4.3, RFC 7888) collected into the command they belong to.
//!
//! Every read is bounded: a command's text may not exceed `max_line` bytes
//! and its literals together may not exceed `max_literal` bytes. A literal
//! over the cap is refused before any `+` continuation is sent, so the client
//! never gets to send it. The buffer holds at most one line plus one read.
//! This module never interprets the command: it hands `session.rs` whole
//! commands as [`RawCommand`] and nothing else.

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// How much one `read` call asks for. Pre-auth commands are small; this keeps
/// the pre-login buffer small too.
const READ_CHUNK: usize = 2048;

/// A command as it arrived: text pieces (without CRLF) and the literals that
/// follow each text piece ending in `{n}` or `{n+}`. It may hold a password,
/// so its bytes are wiped when it is dropped.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct RawCommand {
    pub pieces: Vec<Piece>,
}

impl Drop for RawCommand {
    fn drop(&mut self) {
        for piece in &mut self.pieces {
            let (Piece::Text(bytes) | Piece::Literal(bytes)) = piece;
            zeroize::Zeroize::zeroize(bytes);
        }
    }
}

#[derive(Debug, PartialEq, Eq)]
pub enum Piece {
    Text(Vec<u8>),
    Literal(Vec<u8>),
}

impl RawCommand {
    /// The tag as sent, for answering a command that could not be parsed.
    /// `None` when the first word is not a valid tag.
    pub fn tag(&self) -> Option<&[u8]> {
        let Some(Piece::Text(first)) = self.pieces.first() else {
            return None;
        };
        let end = first.iter().position(|&b| b == b' ').unwrap_or(first.len());
        let tag = &first[..end];
        (!tag.is_empty() && tag.iter().all(|&b| super::is_tag_char(b))).then_some(tag)
    }

    /// Bytes held by this command, for accounting.
    pub fn len(&self) -> usize {
        self.pieces
            .iter()
            .map(|p| match p {
                Piece::Text(t) | Piece::Literal(t) => t.len(),
            })
            .sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[derive(Debug, thiserror::Error)]
pub enum FramingError {
    #[error("command line longer than {0} bytes")]
    LineTooLong(usize),
    #[error("literal of {size} bytes exceeds the limit of {limit}")]
    LiteralTooBig { size: u64, limit: usize },
    #[error("connection closed by the client")]
    Closed,
    #[error("i/o error: {0}")]
    Io(#[from] std::io::Error),
}

/// Bounded reader of pre-auth commands and SASL continuation lines.
pub struct CommandReader {
    buf: Vec<u8>,
    max_line: usize,
    max_literal: usize,
    /// Answer a synchronizing literal with `+ Ready` (IMAP); off for
    /// ManageSieve, whose clients send only `{n+}` and get no continuation.
    continuations: bool,
}

impl CommandReader {
    pub fn new(max_line: usize, max_literal: usize) -> Self {
        CommandReader {
            buf: Vec::new(),
            max_line,
            max_literal,
            continuations: true,
        }
    }

    /// A reader that never writes a continuation request: every literal
    /// is read as if non-synchronizing.
    pub fn without_continuations(mut self) -> Self {
        self.continuations = false;
        self
    }

    /// Forgets every byte read but not yet consumed. STARTTLS calls this so
    /// that nothing the client pipelined in plaintext is ever executed.
    /// Returns how many bytes were dropped.
    pub fn discard_buffered(&mut self) -> usize {
        let n = self.buf.len();
        self.buf = Vec::new();
        n
    }

    /// Hands over the bytes read past the last command: after a successful
    /// login they are the client's first commands for the backend.
    pub fn take_buffered(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.buf)
    }

    /// Reads one command with its literals. Sends `+ Ready` for each
    /// synchronizing literal that is within the limit.
    pub async fn read_command<S>(&mut self, stream: &mut S) -> Result<RawCommand, FramingError>
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        let mut command = RawCommand::default();
        let mut text_len = 0usize;
        let mut literal_len = 0usize;
        loop {
            let line = self.read_line(stream, self.max_line - text_len).await?;
            text_len += line.len();
            let marker = literal_marker(&line);
            command.pieces.push(Piece::Text(line));
            let Some(marker) = marker else {
                return Ok(command);
            };
            let size = marker.size;
            if size > (self.max_literal - literal_len) as u64 {
                return Err(FramingError::LiteralTooBig {
                    size,
                    limit: self.max_literal,
                });
            }
            let size = size as usize;
            literal_len += size;
            if marker.synchronizing && self.continuations {
                stream.write_all(b"+ Ready for literal data\r\n").await?;
                stream.flush().await?;
            }
            let literal = self.read_exact(stream, size).await?;
            command.pieces.push(Piece::Literal(literal));
        }
    }

    /// Reads one line (a SASL response) without literal processing.
    pub async fn read_line<S>(
        &mut self,
        stream: &mut S,
        limit: usize,
    ) -> Result<Vec<u8>, FramingError>
    where
        S: AsyncRead + Unpin,
    {
        let mut searched = 0;
        loop {
            if let Some(at) = self.buf[searched..].iter().position(|&b| b == b'\n') {
                let end = searched + at;
                let content = if end > 0 && self.buf[end - 1] == b'\r' {
                    end - 1
                } else {
                    end
                };
                if content > limit {
                    return Err(FramingError::LineTooLong(self.max_line));
                }
                let mut line: Vec<u8> = self.buf.drain(..=end).collect();
                line.pop();
                if line.last() == Some(&b'\r') {
                    line.pop();
                }
                return Ok(line);
            }
            searched = self.buf.len();
            if searched > limit {
                return Err(FramingError::LineTooLong(self.max_line));
            }
            self.fill(stream).await?;
        }
    }

    async fn read_exact<S>(&mut self, stream: &mut S, size: usize) -> Result<Vec<u8>, FramingError>
    where
        S: AsyncRead + Unpin,
    {
        while self.buf.len() < size {
            self.fill(stream).await?;
        }
        Ok(self.buf.drain(..size).collect())
    }

    async fn fill<S>(&mut self, stream: &mut S) -> Result<(), FramingError>
    where
        S: AsyncRead + Unpin,
    {
        let old = self.buf.len();
        self.buf.resize(old + READ_CHUNK, 0);
        let n = stream.read(&mut self.buf[old..]).await;
        self.buf.truncate(old + *n.as_ref().unwrap_or(&0));
        match n {
            Ok(0) => Err(FramingError::Closed),
            Ok(_) => Ok(()),
            // A TLS client that closes without close_notify has still closed.
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => Err(FramingError::Closed),
            Err(e) => Err(e.into()),
        }
    }
}

#[derive(Debug, PartialEq, Eq)]
pub struct LiteralMarker {
    pub size: u64,
    pub synchronizing: bool,
}

/// Finds a `{n}` or `{n+}` at the end of a line. A size too large for u64
/// reads as `u64::MAX`, so it is refused as too big rather than misparsed.
pub fn literal_marker(line: &[u8]) -> Option<LiteralMarker> {
    let inner = line.strip_suffix(b"}")?;
    let open = inner.iter().rposition(|&b| b == b'{')?;
    let mut digits = &inner[open + 1..];
    let synchronizing = match digits.strip_suffix(b"+") {
        Some(d) => {
            digits = d;
            false
        }
        None => true,
    };
    if digits.is_empty() || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let size = digits.iter().try_fold(0u64, |acc, &d| {
        acc.checked_mul(10)?.checked_add(u64::from(d - b'0'))
    });
    Some(LiteralMarker {
        size: size.unwrap_or(u64::MAX),
        synchronizing,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn read_all(
        input: &[u8],
        max_line: usize,
        max_literal: usize,
    ) -> (Vec<Result<RawCommand, String>>, Vec<u8>) {
        let (mut client, mut server) = tokio::io::duplex(1 << 20);
        client.write_all(input).await.unwrap();
        client.shutdown().await.unwrap();
        let mut reader = CommandReader::new(max_line, max_literal);
        let mut out = Vec::new();
        loop {
            match reader.read_command(&mut server).await {
                Ok(c) => out.push(Ok(c)),
                Err(FramingError::Closed) => break,
                Err(e) => {
                    out.push(Err(e.to_string()));
                    break;
                }
            }
        }
        drop(server);
        let mut sent = Vec::new();
        client.read_to_end(&mut sent).await.unwrap();
        (out, sent)
    }

    #[tokio::test]
    async fn synchronizing_literal_gets_one_continuation() {
        let (cmds, sent) = read_all(b"a LOGIN {5}\r\nalice {3}\r\npwd\r\n", 1024, 1024).await;
        let cmd = cmds[0].as_ref().unwrap();
        assert_eq!(
            cmd.pieces,
            vec![
                Piece::Text(b"a LOGIN {5}".to_vec()),
                Piece::Literal(b"alice".to_vec()),
                Piece::Text(b" {3}".to_vec()),
                Piece::Literal(b"pwd".to_vec()),
                Piece::Text(Vec::new()),
            ]
        );
        assert_eq!(
            sent,
            b"+ Ready for literal data\r\n+ Ready for literal data\r\n"
        );
    }

    #[tokio::test]
    async fn non_synchronizing_literal_gets_no_continuation() {
        let (cmds, sent) = read_all(b"a LOGIN {5+}\r\nalice x\r\nb NOOP\r\n", 1024, 1024).await;
        assert_eq!(cmds.len(), 2);
        assert!(sent.is_empty());
    }

    #[tokio::test]
    async fn oversized_literal_is_refused_without_continuation() {
        let (cmds, sent) = read_all(b"a LOGIN {5000}\r\n", 1024, 4096).await;
        assert!(cmds[0].as_ref().unwrap_err().contains("5000"));
        assert!(sent.is_empty());
        let (cmds, _) = read_all(b"a LOGIN {18446744073709551616}\r\n", 1024, 4096).await;
        assert!(cmds[0].is_err());
    }

    #[tokio::test]
    async fn literals_share_one_budget() {
        let (cmds, sent) = read_all(b"a LOGIN {600+}\r\n", 1024, 1000).await;
        assert!(
            cmds.is_empty(),
            "no data was sent, so the literal is incomplete"
        );
        assert!(sent.is_empty());
        let mut input = b"a LOGIN {600+}\r\n".to_vec();
        input.extend(vec![b'x'; 600]);
        input.extend(b" {600+}\r\n");
        input.extend(vec![b'x'; 600]);
        input.extend(b"\r\n");
        let (cmds, _) = read_all(&input, 1024, 1000).await;
        assert!(cmds[0].as_ref().unwrap_err().contains("exceeds"));
    }

    #[tokio::test]
    async fn long_line_is_refused_before_buffering_much() {
        let input = vec![b'a'; 100_000];
        let (cmds, _) = read_all(&input, 1024, 1024).await;
        assert!(cmds[0].as_ref().unwrap_err().contains("longer"));
    }

    #[test]
    fn literal_markers() {
        assert_eq!(
            literal_marker(b"a LOGIN {12}"),
            Some(LiteralMarker {
                size: 12,
                synchronizing: true
            })
        );
        assert_eq!(
            literal_marker(b"a LOGIN {0+}"),
            Some(LiteralMarker {
                size: 0,
                synchronizing: false
            })
        );
        assert_eq!(literal_marker(b"a LOGIN {}"), None);
        assert_eq!(literal_marker(b"a LOGIN {1a}"), None);
        assert_eq!(literal_marker(b"a LOGIN \"{1}\" x"), None);
        assert_eq!(
            literal_marker(b"{99999999999999999999999}").unwrap().size,
            u64::MAX
        );
    }

    #[test]
    fn tag_of_raw_command() {
        let cmd = RawCommand {
            pieces: vec![Piece::Text(b"a1 FOO".to_vec())],
        };
        assert_eq!(cmd.tag(), Some(&b"a1"[..]));
        let cmd = RawCommand {
            pieces: vec![Piece::Text(b"a(1 FOO".to_vec())],
        };
        assert_eq!(cmd.tag(), None);
    }
}
