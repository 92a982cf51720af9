//! What the relay follows of a POP3 session after login (RFC 1939, with
//! RFC 2449 PIPELINING), so that Postern's own words (an `-ERR` on
//! shutdown, kick, drain or a lost backend) land only where the client
//! expects a new response, and so that a backend's orderly close is told
//! from its disappearance. The watch owns that framing and nothing else:
//! it never writes or changes a byte, it only follows both streams.
//!
//! The client's command lines, split anyhow and pipelined, are read only
//! as far as their command word and whether an argument follows, and are
//! queued, in order, as the responses they will get: one status line
//! (`+OK` or `-ERR`), and after a `+OK` to `RETR`, `TOP`, `CAPA` or an
//! argumentless `LIST`/`UIDL`, content up to the line that is exactly `.`
//! (dot-stuffed lines go on). Content is scanned for `\n.` with one SIMD
//! search over each read, so a 10 MiB `RETR` costs one pass of `memmem`,
//! not a call per line. The state is a few dozen bytes: counts, the pending
//! answers as bits, the first bytes of a command word or status line cut
//! across reads. Nothing is allocated and nothing buffered, idle or not.
//!
//! The backend's last word is its `+OK` (or `-ERR`) to `QUIT`, or an
//! `-ERR` while no command is pending (Dovecot's "Disconnected for
//! inactivity." or shutdown notice before it closes): its end of stream is
//! orderly after either. A stream the watch cannot follow (a command it
//! does not know, `AUTH` and its continuations, too many commands pending,
//! an overlong command line, a status line that is neither `+OK` nor
//! `-ERR`, a `+OK` that answers nothing) makes it give up for good: framing
//! out of step can only silence Postern, never make it write into a stream
//! it misreads.

use std::sync::LazyLock;

use memchr::memmem::Finder;

use crate::relay::Farewell;

/// Commands pending an answer beyond which the watch gives up (a pipelining
/// client waits for answers long before that; each is one bit here).
pub const MAX_PENDING: u32 = u64::BITS;

/// The longest command line followed, CRLF included (RFC 2449 allows 255
/// octets; a longer one is no command the watch knows).
pub const MAX_COMMAND_LINE: u32 = 1024;

/// Bytes kept of a status line's start: enough for `-ERR`.
const STATUS_HEAD: usize = 4;

/// Bytes kept of a command word: the longest the watch knows is four.
const WORD: usize = 4;

/// A content line that starts with a dot: the end of a multi-line answer
/// when the dot is all it holds, else a dot-stuffed line.
static DOT_LINE: LazyLock<Finder<'static>> = LazyLock::new(|| Finder::new(b"\n."));

/// What follows a command word.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Arg {
    /// The line ends after the word.
    None,
    /// A space and something other than a space.
    Given,
    /// A space, then a space or the line's end: whether the server counts
    /// an argument (and so answers `LIST` in one line or many) is its own.
    Unclear,
}

/// How far the client's current command line has been read.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Phase {
    /// In the command word.
    Word,
    /// The word, then CR: only LF may follow.
    WordCr,
    /// The word and one space: the next byte tells whether an argument follows.
    Space,
    /// All that matters is known; the rest of the line is skipped.
    Rest(Arg),
}

/// The client's current command line.
#[derive(Clone, Copy)]
struct Command {
    word: [u8; WORD],
    word_len: u8,
    phase: Phase,
    /// Bytes of the line so far (LF included once it comes), saturating.
    len: u32,
}

impl Command {
    const START: Command = Command {
        word: [0; WORD],
        word_len: 0,
        phase: Phase::Word,
        len: 0,
    };
}

/// What a command's answer is, after its status line.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Answer {
    /// One status line.
    Single,
    /// After `+OK`, content up to a line that is exactly `.`.
    Multi,
    /// `QUIT`: one status line, the backend's last.
    Quit,
}

/// Where the backend's current content line stands.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum BodyLine {
    /// Its first byte is next.
    Start,
    /// It began with a dot.
    Dot,
    /// A dot and CR: LF ends the answer.
    DotCr,
    /// Any other line, followed to its LF.
    Within,
}

/// Where the backend's stream stands.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Response {
    /// Between responses: the next byte starts a status line.
    Boundary,
    /// In a status line, whose first bytes (at most [`STATUS_HEAD`]) these are.
    Status { head: [u8; STATUS_HEAD], len: u8 },
    /// In a multi-line answer's content.
    Body(BodyLine),
}

/// Both directions of one relayed POP3 session, as far as the relay needs.
pub struct Watch {
    command: Command,
    /// Answers awaited, oldest in bit 0: whether each is multi-line after
    /// `+OK`, and whether it answers `QUIT`.
    multi: u64,
    quit: u64,
    pending: u32,
    response: Response,
    /// The backend said its last word: its end of stream is orderly.
    bye: bool,
    /// The streams could not be followed: never write into them.
    lost: bool,
    /// Once given up, the client's lines are still read, only to tell
    /// whether the last was `QUIT` (then the backend's close is orderly):
    /// bytes of the current line (saturating; [`SKIP`] until the next LF
    /// when the watch gave up mid-line), its first bytes, the verdict.
    quit_line: u8,
    quit_head: [u8; 5],
    quit_last: bool,
}

/// The watch gave up in the middle of a client's line: wait for its end.
const SKIP: u8 = u8::MAX;

impl Default for Watch {
    fn default() -> Self {
        Watch {
            command: Command::START,
            multi: 0,
            quit: 0,
            pending: 0,
            response: Response::Boundary,
            bye: false,
            lost: false,
            quit_line: 0,
            quit_head: [0; 5],
            quit_last: false,
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

impl Watch {
    pub fn new() -> Self {
        Self::default()
    }

    /// Bytes the client sent towards the backend (any split).
    pub fn client_sent(&mut self, chunk: &[u8]) {
        let mut pos = 0;
        while pos < chunk.len() && !self.lost {
            if let Phase::Rest(_) = self.command.phase {
                // Past the word: only the line's end and length matter.
                let rest = &chunk[pos..];
                let (taken, ended) = match memchr::memchr(b'\n', rest) {
                    Some(nl) => (nl + 1, true),
                    None => (rest.len(), false),
                };
                pos += taken;
                if !self.command_grew(taken) {
                    if ended {
                        // Given up on a line that has ended: the next starts anew.
                        self.quit_line = 0;
                    }
                    continue;
                }
                if ended {
                    self.command_ended();
                }
                continue;
            }
            let b = chunk[pos];
            pos += 1;
            if !self.command_grew(1) {
                return;
            }
            if b == b'\n' {
                self.command_ended();
            } else {
                self.command_byte(b);
            }
        }
        if self.lost {
            self.after_giving_up(&chunk[pos..]);
        }
    }

    /// The client's bytes once the watch has given up: only whether its
    /// last line is `QUIT`.
    fn after_giving_up(&mut self, bytes: &[u8]) {
        for &b in bytes {
            if b == b'\n' {
                let n = self.quit_line;
                self.quit_last = (n == 4 || (n == 5 && self.quit_head[4] == b'\r'))
                    && self.quit_head[..4].eq_ignore_ascii_case(b"QUIT");
                self.quit_line = 0;
            } else if self.quit_line != SKIP {
                if let Some(slot) = self.quit_head.get_mut(self.quit_line as usize) {
                    *slot = b;
                }
                self.quit_line = (self.quit_line + 1).min(6);
            }
        }
    }

    /// Bytes the backend sent towards the client. With `stop_at_boundary`
    /// (the relay is ending), the stream is followed only up to its first
    /// response boundary, whose offset in `chunk` is returned: the client
    /// must get no byte past it (`Some(0)` when the stream stands at one
    /// already). `None` when no boundary was asked for or found, and once
    /// the backend said its last word: its stream runs to its close.
    pub fn backend_sent(&mut self, chunk: &[u8], stop_at_boundary: bool) -> Option<usize> {
        if self.lost {
            return None;
        }
        let stop = |watch: &Watch| stop_at_boundary && !watch.bye && watch.at_boundary();
        if stop(self) {
            return Some(0);
        }
        let mut pos = 0;
        while pos < chunk.len() {
            pos = match self.response {
                Response::Boundary | Response::Status { .. } => self.follow_status(chunk, pos),
                Response::Body(line) => self.follow_body(chunk, pos, line),
            };
            if self.lost {
                return None;
            }
            if stop(self) {
                return Some(pos);
            }
        }
        None
    }

    /// The backend said its last word: an end of its stream now is orderly
    /// (its answer to `QUIT`, or an `-ERR` while no command is pending).
    pub fn bye_seen(&self) -> bool {
        self.bye || (self.lost && self.quit_last)
    }

    /// Whether the streams are still followed (the watch has not given up).
    pub fn following(&self) -> bool {
        !self.lost
    }

    /// Whether the backend's stream so far ends at a response boundary
    /// where Postern could write.
    pub fn at_boundary(&self) -> bool {
        !self.lost && self.response == Response::Boundary
    }

    /// What Postern may write now, if the client has every byte fed so far.
    pub fn farewell(&mut self) -> Farewell {
        if self.at_boundary() {
            Farewell::Plain
        } else {
            Farewell::Silent
        }
    }

    /// Counts `n` more bytes of the command line; gives up (false) past
    /// [`MAX_COMMAND_LINE`].
    fn command_grew(&mut self, n: usize) -> bool {
        let n = u32::try_from(n).unwrap_or(u32::MAX);
        self.command.len = self.command.len.saturating_add(n);
        if self.command.len > MAX_COMMAND_LINE {
            self.give_up();
            return false;
        }
        true
    }

    /// A byte of the command line before its rest, LF excluded.
    fn command_byte(&mut self, b: u8) {
        let command = &mut self.command;
        match command.phase {
            Phase::Word => match b {
                b' ' if command.word_len > 0 => command.phase = Phase::Space,
                b'\r' => command.phase = Phase::WordCr,
                b' ' => self.give_up(),
                _ if (command.word_len as usize) < WORD => {
                    command.word[command.word_len as usize] = b;
                    command.word_len += 1;
                }
                // Longer than any command the watch knows.
                _ => self.give_up(),
            },
            // A CR inside the line: no command the watch knows.
            Phase::WordCr => self.give_up(),
            Phase::Space => {
                command.phase = Phase::Rest(if b == b' ' || b == b'\r' {
                    Arg::Unclear
                } else {
                    Arg::Given
                });
            }
            Phase::Rest(_) => unreachable!("the rest of a line is skipped"),
        }
    }

    /// The client's command line ended: its answer is queued.
    fn command_ended(&mut self) {
        let command = std::mem::replace(&mut self.command, Command::START);
        let arg = match command.phase {
            Phase::Word | Phase::WordCr => Arg::None,
            Phase::Space => Arg::Unclear,
            Phase::Rest(arg) => arg,
        };
        let Some(answer) = answer(&command.word[..command.word_len as usize], arg) else {
            self.give_up();
            return;
        };
        if self.pending >= MAX_PENDING {
            self.give_up();
            return;
        }
        let bit = 1u64 << self.pending;
        if answer == Answer::Multi {
            self.multi |= bit;
        }
        if answer == Answer::Quit {
            self.quit |= bit;
        }
        self.pending += 1;
    }

    /// Follows a status line from `pos`; returns where following stopped.
    fn follow_status(&mut self, chunk: &[u8], pos: usize) -> usize {
        let (mut head, mut len) = match self.response {
            Response::Status { head, len } => (head, len as usize),
            _ => ([0; STATUS_HEAD], 0),
        };
        let rest = &chunk[pos..];
        let nl = memchr::memchr(b'\n', rest);
        let line = &rest[..nl.unwrap_or(rest.len())];
        let take = (STATUS_HEAD - len).min(line.len());
        head[len..len + take].copy_from_slice(&line[..take]);
        len += take;
        match nl {
            None => {
                self.response = Response::Status {
                    head,
                    len: len as u8,
                };
                chunk.len()
            }
            Some(nl) => {
                self.status_ended(&head[..len]);
                pos + nl + 1
            }
        }
    }

    /// A status line, whose first bytes are `head`, ended.
    fn status_ended(&mut self, head: &[u8]) {
        let ok = head.len() >= 3 && head[..3].eq_ignore_ascii_case(b"+OK");
        let err = head.eq_ignore_ascii_case(b"-ERR");
        self.response = Response::Boundary;
        if !ok && !err {
            self.give_up();
            return;
        }
        if self.pending == 0 {
            // Unasked for: a farewell, or a stream out of step.
            if err {
                self.bye = true;
            } else {
                self.give_up();
            }
            return;
        }
        let (multi, quit) = (self.multi & 1 != 0, self.quit & 1 != 0);
        self.multi >>= 1;
        self.quit >>= 1;
        self.pending -= 1;
        // The server closes after QUIT whatever it answers (RFC 1939 6).
        self.bye |= quit;
        if ok && multi {
            self.response = Response::Body(BodyLine::Start);
        }
    }

    /// Follows multi-line content from `pos`, in a line that stands at
    /// `line`; returns where following stopped.
    fn follow_body(&mut self, chunk: &[u8], pos: usize, line: BodyLine) -> usize {
        let b = chunk[pos];
        let (next, pos) = match line {
            BodyLine::Start if b == b'.' => (Response::Body(BodyLine::Dot), pos + 1),
            // Looked at again by the search, which sees an empty line's LF.
            BodyLine::Start => (Response::Body(BodyLine::Within), pos),
            BodyLine::Dot | BodyLine::DotCr if b == b'\n' => (Response::Boundary, pos + 1),
            BodyLine::Dot if b == b'\r' => (Response::Body(BodyLine::DotCr), pos + 1),
            // Dot-stuffed content (or a dot, CR and more): not the end.
            BodyLine::Dot | BodyLine::DotCr => (Response::Body(BodyLine::Within), pos + 1),
            BodyLine::Within => match DOT_LINE.find(&chunk[pos..]) {
                Some(at) => (Response::Body(BodyLine::Dot), pos + at + 2),
                None if chunk.last() == Some(&b'\n') => {
                    (Response::Body(BodyLine::Start), chunk.len())
                }
                None => (Response::Body(BodyLine::Within), chunk.len()),
            },
        };
        self.response = next;
        pos
    }

    fn give_up(&mut self) {
        if !self.lost {
            // Mid-line, the rest of the line is not a line of its own.
            self.quit_line = if self.command.len == 0 { 0 } else { SKIP };
        }
        self.lost = true;
    }
}

/// The answer a command gets, from its word (any case) and whether an
/// argument follows; `None` for a command the watch does not follow.
fn answer(word: &[u8], arg: Arg) -> Option<Answer> {
    let mut upper = [0u8; WORD];
    let upper = &mut upper[..word.len()];
    upper.copy_from_slice(word);
    upper.make_ascii_uppercase();
    Some(match (&*upper, arg) {
        (b"STAT" | b"DELE" | b"NOOP" | b"RSET" | b"LAST" | b"USER" | b"PASS" | b"APOP", _) => {
            Answer::Single
        }
        (b"QUIT", _) => Answer::Quit,
        (b"RETR" | b"TOP" | b"CAPA", _) => Answer::Multi,
        (b"LIST" | b"UIDL", Arg::None) => Answer::Multi,
        (b"LIST" | b"UIDL", Arg::Given) => Answer::Single,
        // AUTH (its exchange has continuations), STLS, extensions, and
        // LIST/UIDL whose argument is unclear.
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A small deterministic generator for random splits.
    struct Rng(u64);

    impl Rng {
        fn below(&mut self, n: usize) -> usize {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            (self.0 % n as u64) as usize
        }
    }

    /// `stream` cut into pieces: one byte each, whole, then random lengths.
    fn splits(stream: &[u8], seed: u64) -> Vec<Vec<&[u8]>> {
        let mut ways = vec![stream.chunks(1).collect::<Vec<_>>(), vec![stream]];
        let mut rng = Rng(seed | 1);
        for _ in 0..60 {
            let mut pieces = Vec::new();
            let mut at = 0;
            while at < stream.len() {
                let n = 1 + rng
                    .below(if ways.len() % 2 == 0 { 7 } else { 60 })
                    .min(stream.len() - at - 1);
                pieces.push(&stream[at..at + n]);
                at += n;
            }
            ways.push(pieces);
        }
        ways
    }

    /// The offsets just after each response.
    fn ends(responses: &[&[u8]]) -> Vec<usize> {
        responses
            .iter()
            .scan(0, |at, r| {
                *at += r.len();
                Some(*at)
            })
            .collect()
    }

    fn is_silent(watch: &mut Watch) -> bool {
        matches!(watch.farewell(), Farewell::Silent)
    }

    const COMMANDS: &[u8] = b"STAT\r\nLIST\r\nRETR 1\r\nUIDL\r\nTOP 1 0\r\nretr 2\r\n\
        List 2\r\nuidl 1\r\nCapa\nNOOP\r\nQUIT\r\n";

    /// The answers to [`COMMANDS`], in order; the last is QUIT's.
    const RESPONSES: &[&[u8]] = &[
        b"+OK 2 320\r\n",
        b"+OK 2 messages (320 octets)\r\n1 120\r\n2 200\r\n.\r\n",
        b"+OK 120 octets\r\nSubject: dots\r\n\r\n..\r\n.x\r\n...\r\n\
          +OK not a status\r\n-ERR nor this\r\n. \r\n.\r\r\n.a.\r\nbare\nlines\n\n.\r\n",
        b"+OK\r\n1 whqtswO00WBw418f9t5JxYwZ\r\n2 QhdPYR:00WBw1Ph7x7\n.\n",
        b"+OK top of message follows\r\nSubject: dots\r\n\r\n.\r\n",
        b"-ERR no such message\r\n",
        b"+OK 2 200\r\n",
        b"-ERR [SYS/TEMP] try later\r\n",
        b"+OK Capability list follows\r\nTOP\r\nUIDL\r\nPIPELINING\r\n.\n",
        b"+OK\n",
        b"+OK Logging out.\r\n",
    ];

    #[test]
    fn a_pipelined_session_is_followed_in_any_split() {
        let stream = RESPONSES.concat();
        let ends = ends(RESPONSES);
        let total = stream.len();
        let clients = splits(COMMANDS, 5);
        for (i, pieces) in splits(&stream, 7).iter().enumerate() {
            let mut watch = Watch::new();
            for piece in &clients[i % clients.len()] {
                watch.client_sent(piece);
            }
            assert!(watch.at_boundary());
            let mut at = 0;
            for piece in pieces {
                assert_eq!(watch.backend_sent(piece, false), None);
                at += piece.len();
                assert!(watch.following(), "split {i} at {at}");
                assert_eq!(watch.at_boundary(), ends.contains(&at), "split {i} at {at}");
                assert_eq!(watch.bye_seen(), at == total, "split {i} at {at}");
            }
            assert!(matches!(watch.farewell(), Farewell::Plain));
        }
    }

    /// One command at a time, answered byte by byte: a boundary only
    /// after each answer's last byte.
    #[test]
    fn commands_answered_in_turn_are_followed() {
        let mut watch = Watch::new();
        let commands = COMMANDS.split_inclusive(|&b| b == b'\n');
        for (command, response) in commands.zip(RESPONSES) {
            watch.client_sent(command);
            for (i, byte) in response.iter().enumerate() {
                assert!(watch.at_boundary() == (i == 0), "{command:?} at {i}");
                assert!(is_silent(&mut watch) == (i != 0));
                watch.backend_sent(&[*byte], false);
            }
            assert!(watch.at_boundary(), "{command:?}");
        }
        assert!(watch.bye_seen());
    }

    /// Stopped anywhere, the stream is cut just after the first response
    /// that ends from there (at once when one just ended), never after the
    /// backend's last word.
    #[test]
    fn stopping_cuts_at_the_first_boundary() {
        let stream = RESPONSES.concat();
        let ends = ends(RESPONSES);
        for from in 0..stream.len() {
            let mut watch = Watch::new();
            watch.client_sent(COMMANDS);
            watch.backend_sent(&stream[..from], false);
            let cut = watch.backend_sent(&stream[from..], true);
            let expected = if from == 0 || ends.contains(&from) {
                Some(0)
            } else {
                ends.iter()
                    .find(|&&end| end > from && end != stream.len())
                    .map(|end| end - from)
            };
            assert_eq!(cut, expected, "from {from}");
            assert!(watch.at_boundary(), "from {from}");
            assert!(matches!(watch.farewell(), Farewell::Plain));
        }
        // Mid-RETR: right after the `.` line, not at a stuffed one.
        let mut watch = Watch::new();
        watch.client_sent(b"RETR 1\r\nSTAT\r\n");
        watch.backend_sent(b"+OK\r\nSubject: x\r\n\r\nbody\r", false);
        assert!(!watch.at_boundary());
        assert!(is_silent(&mut watch));
        assert_eq!(
            watch.backend_sent(b"\n..\r\n.\r\n+OK 1 2\r\n", true),
            Some(8)
        );
        assert!(matches!(watch.farewell(), Farewell::Plain));
        // Nothing ends in the chunk: nothing to cut.
        let mut watch = Watch::new();
        watch.client_sent(b"RETR 1\r\n");
        assert_eq!(watch.backend_sent(b"+OK\r\n", false), None);
        assert_eq!(watch.backend_sent(b".\r", true), None);
        assert_eq!(watch.backend_sent(b"\n", true), Some(1));
        assert_eq!(watch.backend_sent(b"+OK\r\n", true), Some(0));
    }

    #[test]
    fn the_backends_last_word_is_seen() {
        // QUIT's answer, +OK or -ERR (RFC 1939 6: it closes either way).
        for answer in [
            &b"+OK bye\r\n"[..],
            b"-ERR some deleted messages not removed\r\n",
        ] {
            for pieces in splits(answer, 3) {
                let mut watch = Watch::new();
                watch.client_sent(b"DELE 1\r\nquit\r\n");
                watch.backend_sent(b"+OK marked\r\n", false);
                assert!(!watch.bye_seen());
                for piece in &pieces {
                    watch.backend_sent(piece, false);
                }
                assert!(watch.bye_seen() && watch.at_boundary(), "{answer:?}");
            }
        }
        // Unasked for: Dovecot's inactivity and shutdown notices.
        for notice in [
            &b"-ERR Disconnected for inactivity.\r\n"[..],
            b"-ERR [SYS/TEMP] Server shutting down.\n",
        ] {
            for pieces in splits(notice, 9) {
                let mut watch = Watch::new();
                watch.client_sent(b"NOOP\r\n");
                watch.backend_sent(b"+OK\r\n", false);
                assert_eq!(watch.backend_sent(notice, true), Some(0));
                for piece in &pieces {
                    assert!(!watch.bye_seen());
                    watch.backend_sent(piece, false);
                }
                assert!(watch.bye_seen() && watch.following() && watch.at_boundary());
            }
        }
        // After the last word, stopping cuts nothing: the close follows.
        let mut watch = Watch::new();
        watch.client_sent(b"QUIT\r\n");
        watch.backend_sent(b"+O", false);
        assert_eq!(watch.backend_sent(b"K bye\r\n", true), None);
        assert_eq!(watch.backend_sent(b"-ERR x\r\n", true), None);
        assert!(watch.bye_seen() && watch.at_boundary());
        // An -ERR that answers a command is no farewell; nor is one in content.
        let mut watch = Watch::new();
        watch.client_sent(b"RETR 9\r\nRETR 1\r\n");
        watch.backend_sent(b"-ERR no such message\r\n+OK\r\n-ERR x\r\n.\r\n", false);
        assert!(!watch.bye_seen() && watch.at_boundary());
    }

    /// After the client's and then the backend's bytes, the watch has given up and stays silent.
    fn gives_up(client: &[u8], backend: &[u8]) {
        for pieces in splits(client, 11).iter().take(8) {
            let mut watch = Watch::new();
            for piece in pieces {
                watch.client_sent(piece);
            }
            assert_eq!(watch.backend_sent(backend, false), None);
            assert!(!watch.following(), "{client:?} {backend:?}");
            assert!(!watch.at_boundary());
            assert!(is_silent(&mut watch));
            // For good: well-formed traffic later changes nothing.
            watch.client_sent(b"NOOP\r\n");
            assert_eq!(watch.backend_sent(b"+OK\r\n", true), None);
            assert!(!watch.following() && !watch.at_boundary() && !watch.bye_seen());
            assert!(is_silent(&mut watch));
        }
    }

    #[test]
    fn commands_it_does_not_know_make_the_watch_give_up() {
        for line in [
            &b"XTND XMIT\r\n"[..],
            b"STLS\r\n",
            b"UTF8\r\n",
            b"AUTH PLAIN\r\n",
            b"AUTH\r\n",
            b"auth plain AGFsaWNlAHNlY3JldA==\r\n",
            b"LISTS\r\n",
            b"\r\n",
            b"\n",
            b" STAT\r\n",
            b"STAT\rX\r\n",
            // Whether an argument follows is the server's call.
            b"LIST \r\n",
            b"UIDL  1\r\n",
            b"list \n",
        ] {
            let mut stream = b"STAT\r\n".to_vec();
            stream.extend_from_slice(line);
            gives_up(&stream, b"+OK 1 2\r\n");
        }
    }

    #[test]
    fn a_response_out_of_step_makes_the_watch_give_up() {
        for status in [
            &b"* OK\r\n"[..],
            b"+ \r\n",
            b"OK\r\n",
            b"-ER\r\n",
            b"\r\n",
            b"+O\n",
        ] {
            let mut stream = b"+OK 1 2\r\n".to_vec();
            stream.extend_from_slice(status);
            gives_up(b"STAT\r\nNOOP\r\n", &stream);
        }
        // A +OK that answers nothing.
        gives_up(b"", b"+OK\r\n");
        gives_up(b"NOOP\r\n", b"+OK\r\n+OK\r\n");
        gives_up(b"LIST 1\r\n", b"+OK 1 20\r\n1 20\r\n.\r\n");
    }

    #[test]
    fn limits_make_the_watch_give_up() {
        let many = b"NOOP\r\n".repeat(MAX_PENDING as usize);
        let mut watch = Watch::new();
        watch.client_sent(&many);
        assert!(watch.following());
        watch.backend_sent(&b"+OK\r\n".repeat(MAX_PENDING as usize), false);
        assert!(watch.following() && watch.at_boundary());
        gives_up(&b"NOOP\r\n".repeat(MAX_PENDING as usize + 1), b"");
        // The longest command line, CRLF included, and one byte more.
        let longest = MAX_COMMAND_LINE as usize - "PASS \r\n".len();
        let line = format!("PASS {}\r\n", "p".repeat(longest));
        let mut watch = Watch::new();
        watch.client_sent(line.as_bytes());
        watch.backend_sent(b"-ERR already logged in\r\n", false);
        assert!(watch.following() && watch.at_boundary());
        let line = format!("PASS {}\r\n", "p".repeat(longest + 1));
        gives_up(line.as_bytes(), b"");
        // Too long before its end comes.
        gives_up(format!("PASS {}", "p".repeat(longest + 3)).as_bytes(), b"");
    }

    /// A large message passes in a few reads, its content looked at only
    /// where lines start with a dot.
    #[test]
    fn a_large_retr_is_followed() {
        let mut message = b"+OK 2000000 octets\r\n".to_vec();
        let mut i = 0;
        while message.len() < 2_000_000 {
            let line = match i % 97 {
                0 => "..stuffed\r\n".to_string(),
                1 => ".\r\r\n".to_string(),
                _ => format!("line {i} of a long message, as long as most lines are\r\n"),
            };
            message.extend_from_slice(line.as_bytes());
            i += 1;
        }
        let body_end = message.len();
        message.extend_from_slice(b".\r\n");
        for read in [1 << 14, 65_536, 3_001] {
            let mut watch = Watch::new();
            watch.client_sent(b"RETR 1\r\nNOOP\r\n");
            let mut at = 0;
            for piece in message.chunks(read) {
                watch.backend_sent(piece, false);
                at += piece.len();
                assert_eq!(watch.at_boundary(), at == message.len());
            }
            let mut watch = Watch::new();
            watch.client_sent(b"RETR 1\r\nNOOP\r\n");
            watch.backend_sent(&message[..body_end - 5], false);
            let mut rest = message[body_end - 5..].to_vec();
            rest.extend_from_slice(b"+OK\r\n");
            assert_eq!(watch.backend_sent(&rest, true), Some(8));
        }
    }

    #[test]
    fn the_watch_is_small() {
        assert!(std::mem::size_of::<Watch>() <= 48);
    }

    #[test]
    fn after_giving_up_a_quit_still_makes_the_close_orderly() {
        let quits = |client: &[&[u8]]| {
            let mut w = Watch::new();
            for c in client {
                w.client_sent(c);
            }
            assert!(!w.following());
            w.bye_seen()
        };
        assert!(quits(&[b"UTF8\r\n", b"QUIT\r\n"]));
        assert!(quits(&[b"UTF8\r\nquit\r\n"]));
        assert!(quits(&[b"XTND XMIT\r\nQU", b"IT\n"]));
        assert!(!quits(&[b"UTF8\r\nQUIT\r\nNOOP\r\n"]));
        assert!(!quits(&[b"UTF8\r\n"]));
        // Given up mid-line: the line's tail is not a line of its own.
        assert!(!quits(&[b"XTNDQUIT\r\n"]));
        assert!(!quits(&[b"QUITS\r\n"]));
        // A line too long to follow, then QUIT.
        let long = [b'x'; 2000];
        assert!(quits(&[b"RETR ", &long, b"\r\nQUIT\r\n"]));
    }
}
