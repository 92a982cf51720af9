//! What the relay follows of a ManageSieve session after login (RFC
//! 5804), so that Postern's own `BYE` is written only where the client
//! expects a new response, and a backend's orderly close is told from its
//! disappearance. It never writes or changes a byte.
//!
//! Both directions are lines that may end in a literal announcement
//! (`{n}`, from clients also `{n+}`), whose `n` bytes are skipped before
//! the line goes on; a command or a response ends at a line end with no
//! literal announced. Each client command is owed one response; a response
//! is any number of data lines ended by a line starting with `OK`, `NO` or
//! `BYE`. The state is a few dozen bytes; nothing is buffered.
//!
//! The backend's `BYE`, and its answer to `LOGOUT` (`OK`, then it
//! closes), are its last word. Postern's `BYE` is written only where the
//! client is not in the middle of a command (a `PUTSCRIPT` literal). What the watch cannot follow (a line
//! longer than it reads, a response nothing asked for, `STARTTLS` or
//! `AUTHENTICATE` after login, too many commands pending) makes it give
//! up: Postern then only closes.

use crate::relay::Farewell;

/// Commands pending beyond which the watch gives up.
pub const MAX_PENDING: u32 = 1024;

/// The longest line followed, literals aside.
const MAX_LINE: u32 = 64 * 1024;

/// Bytes kept of a line's start (its first word), and of its end (a
/// literal announcement: `{` up to 20 digits, `+}`).
const HEAD: usize = 13;
const TAIL: usize = 24;

/// One direction's line state.
#[derive(Debug, Default)]
struct Lines {
    /// Bytes of the current literal still to skip.
    literal: u64,
    /// The logical line's first bytes (only before its first literal).
    head: [u8; HEAD],
    head_len: usize,
    /// The physical line's last bytes.
    tail: [u8; TAIL],
    tail_len: usize,
    /// Length of the current physical line.
    len: u32,
    /// The logical line has had a literal (its head is complete).
    continued: bool,
}

/// What one complete logical line started with.
struct Ended {
    head: [u8; HEAD],
    head_len: usize,
}

impl Ended {
    fn first_word(&self) -> &[u8] {
        let head = &self.head[..self.head_len];
        let end = head
            .iter()
            .position(|&b| b == b' ' || b == b'\r')
            .unwrap_or(head.len());
        &head[..end]
    }
}

impl Lines {
    /// Feeds bytes; calls `ended` for each logical line completed, with the
    /// offset just past it. `Err` when the line is too long to follow.
    fn feed(
        &mut self,
        mut chunk: &[u8],
        mut ended: impl FnMut(Ended, usize) -> bool,
    ) -> Result<(), ()> {
        let total = chunk.len();
        while !chunk.is_empty() {
            if self.literal > 0 {
                let n = self.literal.min(chunk.len() as u64);
                self.literal -= n;
                chunk = &chunk[n as usize..];
                continue;
            }
            let (piece, done) = match memchr::memchr(b'\n', chunk) {
                Some(nl) => (&chunk[..nl], true),
                None => (chunk, false),
            };
            if !self.continued && self.head_len < HEAD {
                let n = piece.len().min(HEAD - self.head_len);
                self.head[self.head_len..self.head_len + n].copy_from_slice(&piece[..n]);
                self.head_len += n;
            }
            // Keep the last TAIL bytes of the physical line.
            if piece.len() >= TAIL {
                self.tail.copy_from_slice(&piece[piece.len() - TAIL..]);
                self.tail_len = TAIL;
            } else {
                let keep = (TAIL - piece.len()).min(self.tail_len);
                self.tail
                    .copy_within(self.tail_len - keep..self.tail_len, 0);
                self.tail[keep..keep + piece.len()].copy_from_slice(piece);
                self.tail_len = keep + piece.len();
            }
            self.len = self.len.saturating_add(piece.len() as u32);
            if self.len > MAX_LINE {
                return Err(());
            }
            if !done {
                return Ok(());
            }
            chunk = &chunk[piece.len() + 1..];
            let tail = &self.tail[..self.tail_len];
            let tail = tail.strip_suffix(b"\r").unwrap_or(tail);
            self.len = 0;
            self.tail_len = 0;
            if let Some(m) = crate::imap::framing::literal_marker(tail) {
                if m.size == u64::MAX {
                    return Err(());
                }
                self.literal = m.size;
                self.continued = true;
                continue;
            }
            let line = Ended {
                head: self.head,
                head_len: self.head_len,
            };
            self.head_len = 0;
            self.continued = false;
            if ended(line, total - chunk.len()) {
                return Ok(());
            }
        }
        Ok(())
    }

    /// Nothing of a line or literal is half through.
    fn at_line_start(&self) -> bool {
        self.literal == 0 && self.len == 0 && !self.continued
    }
}

/// Follows one ManageSieve session.
#[derive(Debug, Default)]
pub struct Watch {
    client: Lines,
    backend: Lines,
    pending: u32,
    /// Responses until the one answering `LOGOUT`, when one is owed.
    logout_in: Option<u32>,
    bye: bool,
    gave_up: bool,
}

impl Watch {
    pub fn new() -> Watch {
        Watch::default()
    }

    pub fn client_sent(&mut self, chunk: &[u8]) {
        if self.gave_up {
            return;
        }
        let (mut pending, mut logout_in) = (self.pending, self.logout_in);
        let mut gave_up = false;
        let fed = self.client.feed(chunk, |line, _| {
            let word = line.first_word();
            if word.eq_ignore_ascii_case(b"STARTTLS")
                || word.eq_ignore_ascii_case(b"AUTHENTICATE")
                || pending == MAX_PENDING
            {
                gave_up = true;
                return true;
            }
            pending += 1;
            if word.eq_ignore_ascii_case(b"LOGOUT") && logout_in.is_none() {
                logout_in = Some(pending);
            }
            false
        });
        self.pending = pending;
        self.logout_in = logout_in;
        if fed.is_err() || gave_up {
            self.gave_up = true;
        }
    }

    pub fn backend_sent(&mut self, chunk: &[u8], stop_at_boundary: bool) -> Option<usize> {
        if self.gave_up {
            return None;
        }
        let (mut pending, mut bye, mut gave_up) = (self.pending, self.bye, false);
        let mut logout_in = self.logout_in;
        let mut cut = None;
        let fed = self.backend.feed(chunk, |line, at| {
            let word = line.first_word();
            let status = [&b"OK"[..], b"NO", b"BYE"]
                .iter()
                .any(|w| word.eq_ignore_ascii_case(w));
            if !status {
                return false;
            }
            if let Some(n) = logout_in {
                // The answer to LOGOUT: the backend closes next.
                if n == 1 {
                    bye = true;
                }
                logout_in = n.checked_sub(1).filter(|&n| n > 0);
            }
            if word.eq_ignore_ascii_case(b"BYE") {
                bye = true;
                pending = pending.saturating_sub(1);
            } else if pending == 0 {
                gave_up = true;
                return true;
            } else {
                pending -= 1;
            }
            if stop_at_boundary && pending == 0 {
                cut = Some(at);
                return true;
            }
            false
        });
        self.pending = pending;
        self.bye = bye;
        self.logout_in = logout_in;
        if fed.is_err() || gave_up {
            self.gave_up = true;
            return None;
        }
        cut
    }

    pub fn bye_seen(&self) -> bool {
        self.bye
    }

    pub fn following(&self) -> bool {
        !self.gave_up
    }

    pub fn at_boundary(&self) -> bool {
        self.backend.at_line_start() && self.pending == 0
    }

    pub fn farewell(&mut self) -> Farewell {
        let mid_command = !self.client.at_line_start();
        if self.gave_up || self.bye || mid_command || !self.at_boundary() {
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
}

#[cfg(test)]
mod tests {
    use super::*;

    fn feed(w: &mut Watch, client: &[u8], backend: &[u8], size: usize) {
        for piece in client.chunks(size) {
            w.client_sent(piece);
        }
        for piece in backend.chunks(size) {
            assert_eq!(w.backend_sent(piece, false), None);
        }
    }

    const SCRIPT: &[u8] = b"require \"fileinto\";\r\nOK \"not a response\"\r\n";

    #[test]
    fn commands_and_responses_with_literals_split_anyhow() {
        let put = [
            &b"PUTSCRIPT \"s\" {"[..],
            SCRIPT.len().to_string().as_bytes(),
            b"+}\r\n",
            SCRIPT,
            b"\r\nLISTSCRIPTS\r\nGETSCRIPT \"s\"\r\n",
        ]
        .concat();
        let answers = [
            &b"OK \"PUTSCRIPT completed.\"\r\n\"s\" ACTIVE\r\nOK \"Listscripts completed.\"\r\n{"[..],
            SCRIPT.len().to_string().as_bytes(),
            b"}\r\n",
            SCRIPT,
            b"\r\nOK \"Getscript completed.\"\r\n",
        ]
        .concat();
        for size in [1, 2, 5, 13, 64, 4096] {
            let mut w = Watch::new();
            feed(&mut w, &put, &[], size);
            assert_eq!(w.pending, 3, "size {size}");
            assert!(!w.at_boundary());
            feed(&mut w, &[], &answers[..answers.len() - 10], size);
            assert!(!w.at_boundary() && w.following(), "size {size}");
            feed(&mut w, &[], &answers[answers.len() - 10..], size);
            assert!(w.at_boundary() && w.following(), "size {size}");
            assert!(matches!(w.farewell(), Farewell::Plain));
        }
    }

    #[test]
    fn a_stop_cuts_after_the_last_response_owed() {
        let mut w = Watch::new();
        w.client_sent(b"NOOP\r\nCAPABILITY\r\n");
        let answers = b"OK \"NOOP completed.\"\r\n\"VERSION\" \"1.0\"\r\nOK \"done\"\r\nextra";
        assert_eq!(w.backend_sent(answers, true), Some(answers.len() - 5));
    }

    #[test]
    fn the_backends_bye_is_its_last_word() {
        let mut w = Watch::new();
        w.backend_sent(b"BYE \"Disconnected for inactivity.\"\r\n", false);
        assert!(w.bye_seen() && w.following());
        assert!(matches!(w.farewell(), Farewell::Silent));
    }

    #[test]
    fn what_it_cannot_follow_silences_it() {
        for (client, backend) in [
            (&b"STARTTLS\r\n"[..], &b""[..]),
            (b"AUTHENTICATE \"PLAIN\"\r\n", b""),
            (b"", b"OK \"unasked\"\r\n"),
        ] {
            let mut w = Watch::new();
            feed(&mut w, client, backend, 64);
            assert!(!w.following());
            assert!(matches!(w.farewell(), Farewell::Silent));
        }
        let mut w = Watch::new();
        feed(&mut w, &vec![b'a'; MAX_LINE as usize + 2], b"", 4096);
        assert!(!w.following());
    }

    #[test]
    fn the_answer_to_logout_is_the_last_word() {
        let mut w = Watch::new();
        feed(
            &mut w,
            b"NOOP\r\nLOGOUT\r\n",
            b"OK \"NOOP completed.\"\r\n",
            3,
        );
        assert!(!w.bye_seen());
        feed(&mut w, b"", b"OK \"Logout completed.\"\r\n", 3);
        assert!(w.bye_seen() && w.following());
    }

    #[test]
    fn no_bye_while_the_client_sends_a_literal() {
        let mut w = Watch::new();
        w.client_sent(b"PUTSCRIPT \"big\" {200000+}\r\nrequire");
        assert!(w.at_boundary(), "the backend owes nothing yet");
        assert!(matches!(w.farewell(), Farewell::Silent));
    }

    #[test]
    fn mid_response_is_no_boundary() {
        let mut w = Watch::new();
        w.client_sent(b"GETSCRIPT \"s\"\r\n");
        w.backend_sent(b"{10}\r\nabc", false);
        assert!(!w.at_boundary());
        assert!(matches!(w.farewell(), Farewell::Silent));
    }
}
