//! What the relay follows of a submission session after login (RFC 5321
//! with RFC 2920 PIPELINING and RFC 3030 CHUNKING), so that Postern's own
//! `421` (shutdown, kick, drain, a lost backend) is written only between
//! commands, never while the client is sending a message, and never while
//! the backend owes an answer: a client that has sent its message's final
//! dot gets the backend's verdict on it, not a `421` that would make it
//! send the message twice. The watch never writes or changes a byte.
//!
//! The client's command lines are read only as far as their command word
//! (and `BDAT`'s size) and queued, in order, as the replies they will get.
//! After `DATA` the client waits for `354`; from then its bytes are the
//! message, scanned line by line (one `memchr` per line) up to the line
//! that is a lone dot; a `BDAT` chunk is skipped by its size. The backend's
//! replies are lines `ddd-text` (more follow) and `ddd text` (the last);
//! each last line answers the oldest command pending. The state is a few
//! dozen bytes; nothing is allocated or buffered.
//!
//! After login the client may not send `XCLIENT` or `XFORWARD`: an MTA
//! that trusts Postern's address would take the client's word for another
//! user or address. Such a command is never passed on whole (its line end
//! is held back) and the session ends ([`Watch::forbidden`]). Once the
//! client has sent a message's end, a stop waits up to
//! [`VERDICT_WAIT`] for the backend's verdict on it, not the usual two
//! seconds, so that a slow relay or filter does not leave the client
//! without an answer to a message the backend then delivers.
//!
//! The backend's last word is `221` (to `QUIT`) or `421` (it is closing):
//! its end of stream is orderly after either. What the watch cannot
//! follow makes it give up for good (`STARTTLS` or a `334` challenge after
//! login, a reply that answers nothing, a bare LF ending the message, too
//! many commands pending, an overlong line): Postern then only closes.

use crate::relay::Farewell;

/// Commands pending a reply beyond which the watch gives up (RFC 5321
/// 4.5.3.1.8: at least 100 recipients per message, pipelined).
pub const MAX_PENDING: u32 = 1000;

/// How long a stopped relay waits for the backend's verdict on a message
/// whose end the client has sent.
pub const VERDICT_WAIT: std::time::Duration = std::time::Duration::from_secs(30);

/// The longest command line followed, CRLF included (RFC 5321 allows 512
/// octets, extensions add parameters).
pub const MAX_COMMAND_LINE: u32 = 4096;

/// The longest reply line followed (RFC 5321: 512).
const MAX_REPLY_LINE: u32 = 4096;

/// Bytes kept of a command line's start: `BDAT ` and a size of up to 20
/// digits.
const HEAD: usize = 26;

/// Where the client is in its stream.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Client {
    /// Sending command lines.
    Commands,
    /// Sent `DATA`; waits for the backend's `354`.
    AwaitingData,
    /// Sending a message after `354`: `line_start` tells whether the next
    /// byte starts a line, `dot` how far a lone-dot line has come (1 after
    /// the dot, 2 after its CR).
    Message { line_start: bool, dot: u8 },
    /// Sending a `BDAT` chunk: bytes left.
    Chunk(u64),
}

/// Follows one submission session.
#[derive(Debug)]
pub struct Watch {
    client: Client,
    /// The start of the client's command line so far, and its length.
    head: [u8; HEAD],
    line_len: u32,
    /// Replies owed, and how many come before `DATA`'s (answered by `354`,
    /// or refused) when one is owed: a client waits for it before anything
    /// else (RFC 2920), so there is at most one.
    pending: u32,
    data_at: Option<u32>,
    /// A message's end (or a `BDAT` chunk) was sent and replies are owed.
    verdict_owed: bool,
    /// The client sent a command that must not reach the backend.
    forbidden: bool,
    /// The start of the backend's reply line so far, and its length.
    reply: [u8; 4],
    reply_len: u32,
    /// A reply's lines go on (the last line had `ddd-`).
    more: bool,
    bye: bool,
    gave_up: bool,
}

impl Default for Watch {
    fn default() -> Self {
        Watch::new()
    }
}

impl Watch {
    pub fn new() -> Watch {
        Watch {
            client: Client::Commands,
            head: [0; HEAD],
            line_len: 0,
            pending: 0,
            data_at: None,
            verdict_owed: false,
            forbidden: false,
            reply: [0; 4],
            reply_len: 0,
            more: false,
            bye: false,
            gave_up: false,
        }
    }

    fn give_up(&mut self) {
        self.gave_up = true;
    }

    fn push(&mut self, data: bool) {
        if self.pending == MAX_PENDING || (data && self.data_at.is_some()) {
            self.give_up();
            return;
        }
        if data {
            self.data_at = Some(self.pending);
        }
        self.pending += 1;
    }

    /// The oldest reply owed, `Some(true)` for `DATA`'s.
    fn pop(&mut self) -> Option<bool> {
        if self.pending == 0 {
            return None;
        }
        self.pending -= 1;
        if self.pending == 0 {
            self.verdict_owed = false;
        }
        Some(match self.data_at {
            Some(0) => {
                self.data_at = None;
                true
            }
            Some(n) => {
                self.data_at = Some(n - 1);
                false
            }
            None => false,
        })
    }

    pub fn client_sent(&mut self, mut chunk: &[u8]) {
        while !chunk.is_empty() && !self.gave_up {
            match self.client {
                Client::Commands => {
                    let Some(nl) = memchr::memchr(b'\n', chunk) else {
                        self.command_bytes(chunk);
                        return;
                    };
                    self.command_bytes(&chunk[..nl]);
                    chunk = &chunk[nl + 1..];
                    self.command_line();
                }
                Client::AwaitingData => {
                    // A client must wait for 354 before its message.
                    self.give_up();
                }
                Client::Chunk(left) => {
                    let n = left.min(chunk.len() as u64);
                    chunk = &chunk[n as usize..];
                    self.client = if left == n {
                        Client::Commands
                    } else {
                        Client::Chunk(left - n)
                    };
                }
                Client::Message {
                    mut line_start,
                    mut dot,
                } => {
                    let mut i = 0;
                    let mut ended = false;
                    while i < chunk.len() {
                        let b = chunk[i];
                        match (dot, b) {
                            (1, b'\r') => dot = 2,
                            (2, b'\n') => {
                                ended = true;
                                i += 1;
                                break;
                            }
                            // A lone dot ended by a bare LF: some servers end
                            // the message there, some do not.
                            (1, b'\n') | (2, _) => {
                                self.give_up();
                                return;
                            }
                            _ if line_start && b == b'.' => dot = 1,
                            _ => {
                                dot = 0;
                                match memchr::memchr(b'\n', &chunk[i..]) {
                                    Some(nl) => {
                                        i += nl + 1;
                                        line_start = true;
                                    }
                                    None => {
                                        i = chunk.len();
                                        line_start = false;
                                    }
                                }
                                continue;
                            }
                        }
                        line_start = false;
                        i += 1;
                    }
                    chunk = &chunk[i..];
                    if ended {
                        // The message's verdict is owed.
                        self.client = Client::Commands;
                        self.push(false);
                        self.verdict_owed = true;
                    } else {
                        self.client = Client::Message { line_start, dot };
                    }
                }
            }
        }
    }

    fn command_bytes(&mut self, bytes: &[u8]) {
        let at = self.line_len as usize;
        if at < HEAD {
            let n = bytes.len().min(HEAD - at);
            self.head[at..at + n].copy_from_slice(&bytes[..n]);
        }
        self.line_len = self.line_len.saturating_add(bytes.len() as u32);
        if self.line_len >= MAX_COMMAND_LINE {
            self.give_up();
        }
    }

    fn command_line(&mut self) {
        let len = (self.line_len as usize).min(HEAD);
        self.line_len = 0;
        let head = &self.head[..len];
        let head = head.strip_suffix(b"\r").unwrap_or(head);
        let word_end = head.iter().position(|&b| b == b' ').unwrap_or(head.len());
        let word = &head[..word_end];
        if word.eq_ignore_ascii_case(b"DATA") {
            self.push(true);
            self.client = Client::AwaitingData;
        } else if word.eq_ignore_ascii_case(b"BDAT") {
            let args = head.get(word_end + 1..).unwrap_or_default();
            let digits = args.iter().take_while(|b| b.is_ascii_digit()).count();
            let size = args[..digits].iter().try_fold(0u64, |n, &d| {
                n.checked_mul(10)?.checked_add((d - b'0') as u64)
            });
            match size {
                Some(size) if digits > 0 => {
                    self.push(false);
                    self.verdict_owed = true;
                    if size > 0 {
                        self.client = Client::Chunk(size);
                    }
                }
                _ => self.give_up(),
            }
        } else if word.eq_ignore_ascii_case(b"XCLIENT") || word.eq_ignore_ascii_case(b"XFORWARD") {
            self.forbidden = true;
            self.give_up();
        } else if word.eq_ignore_ascii_case(b"STARTTLS") {
            self.give_up();
        } else {
            self.push(false);
        }
    }

    /// Follows the backend's bytes; with `stop_at_boundary`, returns the
    /// offset just past the first reply after which nothing is owed.
    pub fn backend_sent(&mut self, chunk: &[u8], stop_at_boundary: bool) -> Option<usize> {
        let mut at = 0;
        while at < chunk.len() && !self.gave_up {
            let rest = &chunk[at..];
            let Some(nl) = memchr::memchr(b'\n', rest) else {
                self.reply_bytes(rest);
                return None;
            };
            self.reply_bytes(&rest[..nl]);
            at += nl + 1;
            self.reply_line();
            if stop_at_boundary && self.at_boundary() && !self.gave_up {
                return Some(at);
            }
        }
        None
    }

    fn reply_bytes(&mut self, bytes: &[u8]) {
        let at = self.reply_len as usize;
        if at < 4 {
            let n = bytes.len().min(4 - at);
            self.reply[at..at + n].copy_from_slice(&bytes[..n]);
        }
        self.reply_len = self.reply_len.saturating_add(bytes.len() as u32);
        if self.reply_len >= MAX_REPLY_LINE {
            self.give_up();
        }
    }

    fn reply_line(&mut self) {
        let len = (self.reply_len as usize).min(4);
        self.reply_len = 0;
        let line = &self.reply[..len];
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.len() < 3 || !line[..3].iter().all(u8::is_ascii_digit) {
            self.give_up();
            return;
        }
        let code: &[u8] = &[line[0], line[1], line[2]];
        let separator = line.get(3).copied();
        match separator {
            Some(b'-') => {
                self.more = true;
                return;
            }
            Some(b' ') | None => {}
            Some(_) => {
                self.give_up();
                return;
            }
        }
        self.more = false;
        if code == b"421" || code == b"221" {
            // The backend's last word (a 421 may come unasked).
            self.bye = true;
            self.pop();
            return;
        }
        match self.pop() {
            None => self.give_up(),
            Some(true) => {
                if self.client == Client::AwaitingData {
                    self.client = if code == b"354" {
                        Client::Message {
                            line_start: true,
                            dot: 0,
                        }
                    } else {
                        Client::Commands
                    };
                } else {
                    self.give_up();
                }
            }
            Some(false) => {
                if code == b"354" || code == b"334" {
                    // A challenge or a go-ahead Postern does not follow.
                    self.give_up();
                }
            }
        }
    }

    pub fn bye_seen(&self) -> bool {
        self.bye
    }

    pub fn following(&self) -> bool {
        !self.gave_up
    }

    /// Nothing is owed to the client, and no reply is half sent.
    pub fn at_boundary(&self) -> bool {
        self.reply_len == 0 && !self.more && self.pending == 0
    }

    pub fn farewell(&mut self) -> Farewell {
        let between_commands = matches!(self.client, Client::Commands);
        if self.gave_up || self.bye || !between_commands || !self.at_boundary() {
            Farewell::Silent
        } else {
            Farewell::Plain
        }
    }
}

impl crate::relay::Follow for Watch {
    fn client_sent(&mut self, chunk: &[u8]) {
        Watch::client_sent(self, chunk)
    }
    fn backend_sent(&mut self, chunk: &[u8], stop_at_boundary: bool) -> Option<usize> {
        Watch::backend_sent(self, chunk, stop_at_boundary)
    }
    fn bye_seen(&self) -> bool {
        Watch::bye_seen(self)
    }
    fn following(&self) -> bool {
        Watch::following(self)
    }
    fn at_boundary(&self) -> bool {
        Watch::at_boundary(self)
    }
    fn farewell(&mut self) -> Farewell {
        Watch::farewell(self)
    }
    fn forbidden(&self) -> bool {
        self.forbidden
    }
    fn finish_within(&self) -> std::time::Duration {
        if self.verdict_owed && self.following() {
            VERDICT_WAIT
        } else {
            crate::relay::FINISH
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds `bytes` in pieces of `size`.
    fn client(w: &mut Watch, bytes: &[u8], size: usize) {
        for piece in bytes.chunks(size.max(1)) {
            w.client_sent(piece);
        }
    }

    fn backend(w: &mut Watch, bytes: &[u8], size: usize) {
        for piece in bytes.chunks(size.max(1)) {
            assert_eq!(w.backend_sent(piece, false), None);
        }
    }

    fn plain(w: &mut Watch) -> bool {
        matches!(w.farewell(), Farewell::Plain)
    }

    const MESSAGE: &[u8] = b"Subject: x\r\n\r\n..stuffed\r\n. not the end\r\n.x\r\n\r\n.\r\n";

    #[test]
    fn a_whole_transaction_split_anyhow() {
        for size in [1, 2, 3, 7, 64] {
            let mut w = Watch::new();
            client(
                &mut w,
                b"MAIL FROM:<a@x>\r\nRCPT TO:<b@y>\r\nDATA\r\n",
                size,
            );
            assert!(!plain(&mut w), "replies are owed");
            backend(&mut w, b"250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n", size);
            assert!(!w.at_boundary(), "DATA's reply is owed");
            backend(&mut w, b"354 End data with <CR><LF>.<CR><LF>\r\n", size);
            assert!(w.at_boundary());
            assert!(!plain(&mut w), "the client is sending its message");
            client(&mut w, MESSAGE, size);
            assert!(!w.at_boundary(), "the message's verdict is owed");
            assert!(!plain(&mut w));
            backend(&mut w, b"250 2.0.0 Ok: queued as 1\r\n", size);
            assert!(plain(&mut w), "between commands, size {size}");
            assert!(w.following());
        }
    }

    #[test]
    fn the_message_ends_only_at_a_lone_dot() {
        let mut w = Watch::new();
        client(&mut w, b"DATA\r\n", 64);
        backend(&mut w, b"354 go\r\n", 64);
        client(&mut w, b"a\r\n.b\r\n..\r\n. \r\n", 64);
        assert!(matches!(w.client, Client::Message { .. }));
        client(&mut w, b".\r\n", 64);
        assert_eq!(w.client, Client::Commands);
        assert_eq!(w.pending, 1);
    }

    #[test]
    fn an_empty_message_ends_at_once() {
        let mut w = Watch::new();
        client(&mut w, b"DATA\r\n", 64);
        backend(&mut w, b"354 go\r\n", 64);
        client(&mut w, b".\r\n", 1);
        assert_eq!(w.client, Client::Commands);
    }

    #[test]
    fn a_refused_data_leaves_the_client_between_commands() {
        let mut w = Watch::new();
        client(&mut w, b"DATA\r\n", 64);
        backend(&mut w, b"554 5.5.1 Error: no valid recipients\r\n", 64);
        assert!(plain(&mut w));
    }

    #[test]
    fn bdat_chunks_are_skipped_by_size() {
        let mut w = Watch::new();
        client(&mut w, b"BDAT 12\r\nDATA\r\n.\r\nQUIBDAT 0 LAST\r\n", 3);
        assert_eq!(w.client, Client::Commands);
        assert_eq!(w.pending, 2);
        backend(&mut w, b"250 2.0.0 chunk\r\n", 5);
        assert!(!plain(&mut w));
        backend(&mut w, b"250 2.0.0 queued\r\n", 5);
        assert!(plain(&mut w));
        let mut w = Watch::new();
        client(&mut w, b"BDAT 100 LAST\r\npart", 64);
        backend(&mut w, b"250 ok\r\n", 64);
        assert!(!plain(&mut w), "mid-chunk");
        let mut w = Watch::new();
        client(&mut w, b"BDAT x\r\n", 64);
        assert!(!w.following());
    }

    #[test]
    fn multi_line_replies_end_at_their_last_line() {
        let mut w = Watch::new();
        client(&mut w, b"EHLO me\r\n", 64);
        backend(&mut w, b"250-mail.example\r\n250-PIPELINING\r\n", 4);
        assert!(!w.at_boundary());
        backend(&mut w, b"250 CHUNKING\r\n", 4);
        assert!(plain(&mut w));
    }

    #[test]
    fn a_stop_cuts_after_the_last_reply_owed() {
        let mut w = Watch::new();
        client(&mut w, b"RSET\r\nNOOP\r\n", 64);
        let replies = b"250 2.0.0 Ok\r\n250 2.0.0 Ok\r\n";
        assert_eq!(w.backend_sent(replies, true), Some(replies.len()));
        let mut w = Watch::new();
        client(&mut w, b"NOOP\r\n", 64);
        assert_eq!(w.backend_sent(b"250 Ok\r\n421 x\r\n", true), Some(8));
    }

    #[test]
    fn the_backends_last_word() {
        let mut w = Watch::new();
        client(&mut w, b"QUIT\r\n", 64);
        backend(&mut w, b"221 2.0.0 Bye\r\n", 64);
        assert!(w.bye_seen());
        assert!(!plain(&mut w), "nothing after the backend's goodbye");
        let mut w = Watch::new();
        backend(&mut w, b"421 4.4.2 Timeout exceeded\r\n", 64);
        assert!(w.bye_seen() && w.following());
    }

    #[test]
    fn a_hundred_recipients_pipelined_are_followed() {
        use crate::relay::Follow;
        let mut w = Watch::new();
        let mut commands = b"MAIL FROM:<a@x>\r\n".to_vec();
        for i in 0..100 {
            commands.extend_from_slice(format!("RCPT TO:<r{i}@y>\r\n").as_bytes());
        }
        commands.extend_from_slice(b"DATA\r\n");
        client(&mut w, &commands, 1000);
        backend(&mut w, &b"250 ok\r\n".repeat(101), 999);
        assert_eq!(w.client, Client::AwaitingData);
        backend(&mut w, b"354 go\r\n", 64);
        client(&mut w, b"x\r\n.\r\n", 64);
        assert_eq!(
            w.finish_within(),
            VERDICT_WAIT,
            "the message's verdict is owed"
        );
        backend(&mut w, b"250 queued\r\n", 64);
        assert!(plain(&mut w) && w.following());
        assert_eq!(w.finish_within(), crate::relay::FINISH);
    }

    #[test]
    fn xclient_and_xforward_after_login_are_forbidden() {
        use crate::relay::Follow;
        for line in [
            &b"XCLIENT LOGIN=ceo ADDR=10.9.9.9\r\n"[..],
            b"xforward addr=1.2.3.4\r\n",
        ] {
            let mut w = Watch::new();
            client(&mut w, b"NOOP\r\n", 64);
            assert!(!Follow::forbidden(&w));
            client(&mut w, line, 64);
            assert!(Follow::forbidden(&w) && !w.following());
        }
    }

    #[test]
    fn what_the_watch_cannot_follow_silences_it() {
        let cases: [(&[u8], &[u8]); 6] = [
            (b"STARTTLS\r\n", b""),
            (b"AUTH LOGIN\r\n", b"334 VXNlcm5hbWU6\r\n"),
            (b"", b"250 unasked\r\n"),
            (b"NOOP\r\n", b"hello\r\n"),
            (b"DATA\r\nearly", b""),
            (b"NOOP\r\n", b"250x\r\n"),
        ];
        for (c, b) in cases {
            let mut w = Watch::new();
            client(&mut w, c, 64);
            backend(&mut w, b, 64);
            assert!(!w.following(), "{:?} / {:?}", c, b);
            assert!(!plain(&mut w));
        }
        let mut w = Watch::new();
        client(&mut w, b"DATA\r\n", 64);
        backend(&mut w, b"354 go\r\n", 64);
        client(&mut w, b"x\r\n.\n", 64);
        assert!(!w.following(), "a bare LF after the dot");
        let mut w = Watch::new();
        client(&mut w, &vec![b'a'; MAX_COMMAND_LINE as usize], 100);
        assert!(!w.following());
        let mut w = Watch::new();
        client(&mut w, &b"NOOP\r\n".repeat(MAX_PENDING as usize + 1), 64);
        assert!(!w.following());
    }
}
