//! What the relay follows of an IMAP session after login, so that Postern's
//! own words (a `* BYE` on shutdown, kick, drain or a lost backend) land
//! only where the client expects a new response, and so that a backend's
//! orderly close is told from its disappearance.
//!
//! Per direction, a [`Lines`] framer knows where the current line ends and
//! skips the literals a line announces (`{n}`, `~{n}`, and from clients
//! `{n+}`/`{n-}`) in one step, so the relay always knows whether the
//! backend→client stream stands at a response boundary. It allocates
//! nothing: a few dozen bytes of the current line's start and end, and the
//! count of literal bytes still to pass. Literal bodies cost nothing per
//! byte; lines cost one `memchr` and a look at their first and last bytes.
//!
//! [`Watch`] puts both directions together: the client's
//! `<tag> COMPRESS DEFLATE` and the backend's tagged answer (RFC 4978);
//! after an `OK` the backend's stream is raw deflate from the byte after
//! the answer's CRLF, and a shadow [`Inflater`] decodes a copy of it to go
//! on framing responses. Only a compressed session pays for that: its
//! inflate state and a copy of the 32 KiB window (about 79 KiB) are made
//! when the backend says `OK`, never before, and while the backend is quiet
//! the relay parks them ([`Watch::park`]): at a sync flush all a shadow
//! needs is its window, kept deflated (a few KiB) until the backend speaks
//! again, when a fresh inflater takes it as its dictionary.
//!
//! The watch never changes a byte; it only answers two questions: "was the
//! backend's last word a `* BYE`?" and "may Postern write to the client
//! now, and in what form?" ([`Watch::farewell`]). A stream it cannot follow
//! (invalid deflate, a COMPRESS command it cannot read whole) makes it
//! give up: from then on nothing is ever written into that stream.

use flate2::{Decompress, FlushDecompress, Status};

/// The longest tag of a `COMPRESS DEFLATE` command that is followed; a
/// longer one makes the watch give up on the session (no client uses one).
pub const MAX_TAG: usize = 32;

/// Bytes kept of a line's end: enough for `{` + 19 digits + `+}` + CR.
const TAIL: usize = 24;

/// Bytes kept of a command line's start: the tag, ` COMPRESS DEFLATE`, CR.
const COMMAND_HEAD: usize = MAX_TAG + 18;

/// Bytes kept of a response line's start: `* PREAUTH ` or a tag and ` BAD`.
const RESPONSE_HEAD: usize = MAX_TAG + 6;

/// An untagged BYE (RFC 9051 7.1.5), matched without regard to case.
const BYE: &[u8] = b"* BYE";

/// What a sync flush leaves at the end of a deflate stream: an empty stored
/// block's LEN and NLEN.
const SYNC_FLUSH: [u8; 4] = [0, 0, 0xff, 0xff];

/// One direction's framing: where lines end and which bytes are literals.
///
/// A line that lies whole in one read is looked at where it lies; only a
/// line cut across reads has its first and last bytes kept here.
#[derive(Clone)]
pub struct Lines<const HEAD: usize> {
    /// Literal bytes still to pass before the line goes on.
    literal: u64,
    /// The next byte starts a line (a response or a command).
    at_start: bool,
    /// Still in the line's first segment (no literal yet).
    first: bool,
    /// The literal due is synchronizing and none of it came yet.
    sync: bool,
    /// Where the current line's first segment lies in the chunk being
    /// followed (start, end), when it lies there whole; otherwise its
    /// first bytes are in `head`.
    in_chunk: Option<(usize, usize)>,
    /// The current segment began in the chunk being followed.
    segment_here: bool,
    /// Where the last segment of the line that ended last lies in the
    /// chunk; `None`: its last bytes are in `tail`.
    last: Option<(usize, usize)>,
    /// The first bytes of a line begun in an earlier read, LF excluded.
    head: [u8; HEAD],
    head_len: u8,
    /// The last bytes of a segment begun in an earlier read (since the
    /// line start or the last literal), LF excluded.
    tail: [u8; TAIL],
    tail_len: u8,
}

impl<const HEAD: usize> Default for Lines<HEAD> {
    fn default() -> Self {
        Lines {
            literal: 0,
            at_start: true,
            first: true,
            sync: false,
            in_chunk: None,
            segment_here: true,
            last: None,
            head: [0; HEAD],
            head_len: 0,
            tail: [0; TAIL],
            tail_len: 0,
        }
    }
}

impl<const HEAD: usize> Lines<HEAD> {
    /// At a line boundary: the last line is complete and no literal is due.
    pub fn at_boundary(&self) -> bool {
        self.at_start
    }

    /// The first bytes (at most `HEAD`) of the line [`Lines::next_line`]
    /// just ended in `chunk`, LF excluded.
    pub fn head<'a>(&'a self, chunk: &'a [u8]) -> &'a [u8] {
        match self.in_chunk {
            Some((start, end)) => &chunk[start..end.min(start + HEAD)],
            None => &self.head[..self.head_len as usize],
        }
    }

    /// The last bytes of the line [`Lines::next_line`] just ended in
    /// `chunk` (of its last segment, LF excluded; at least [`TAIL`] of
    /// them when it has that many).
    pub fn last<'a>(&'a self, chunk: &'a [u8]) -> &'a [u8] {
        match self.last {
            Some((start, end)) => &chunk[start..end],
            None => &self.tail[..self.tail_len as usize],
        }
    }

    /// Follows `chunk` from `pos` to the end of the next complete line and
    /// returns the offset just after its LF; `None` once the chunk is used
    /// up without one. `literal_allowed` says, from a line's head, whether
    /// a literal marker at the end of a segment announces a literal. After
    /// `Some`, [`Lines::head`] and [`Lines::last`] describe that line.
    pub fn next_line(
        &mut self,
        chunk: &[u8],
        mut pos: usize,
        literal_allowed: impl Fn(&[u8]) -> bool,
    ) -> Option<usize> {
        if pos == 0 {
            // A new chunk: what began before it is described by the kept
            // head and tail.
            self.in_chunk = None;
            self.segment_here = self.tail_len == 0;
        }
        while pos < chunk.len() {
            if self.literal > 0 {
                let skip = self.literal.min((chunk.len() - pos) as u64);
                self.literal -= skip;
                self.sync = false;
                pos += skip as usize;
                continue;
            }
            if self.at_start {
                self.at_start = false;
                self.first = true;
                self.head_len = 0;
                self.tail_len = 0;
                self.in_chunk = Some((pos, pos));
                self.segment_here = true;
            }
            // A byte after a literal's announcement: whatever it was, it
            // is no longer awaited (a `{0}` literal is over at once).
            self.sync = false;
            let start = pos;
            let Some(nl) = memchr::memchr(b'\n', &chunk[start..]) else {
                // The line goes on in the next read: keep what it needs.
                let segment = &chunk[start..];
                if self.first {
                    self.keep_head(segment);
                } else {
                    self.save_head(chunk);
                }
                self.keep_tail(segment);
                return None;
            };
            pos = start + nl + 1;
            let segment = &chunk[start..start + nl];
            if self.first {
                match &mut self.in_chunk {
                    Some((_, end)) => *end = start + nl,
                    None => self.keep_head(segment),
                }
            }
            self.last = if self.segment_here {
                Some((start, start + nl))
            } else {
                self.keep_tail(segment);
                None
            };
            let last = self.last(chunk);
            let marker = match last {
                [.., b'}', b'\r'] | [.., b'}'] => literal_marker(last),
                _ => None,
            };
            match marker {
                Some((n, sync)) if literal_allowed(self.head(chunk)) => {
                    // The line goes on after the literal, in a new segment.
                    self.literal = n;
                    self.sync = sync;
                    self.first = false;
                    self.tail_len = 0;
                    self.segment_here = true;
                }
                _ => {
                    self.at_start = true;
                    return Some(pos);
                }
            }
        }
        // The chunk ended in a literal.
        self.save_head(chunk);
        None
    }

    /// Whether the line waits for a synchronizing literal (`{n}` from a
    /// client) none of whose bytes came yet: the server answers `+`, or
    /// refuses the command and the client sends no literal.
    pub fn awaits_literal(&self) -> bool {
        self.sync
    }

    /// The server refused the command whose literal was awaited: the
    /// client will not send it, and its next bytes start a line.
    pub fn literal_refused(&mut self) {
        self.literal = 0;
        self.sync = false;
        self.at_start = true;
    }

    /// The first bytes of the current line, kept when the chunk it began
    /// in ended (valid between chunks).
    pub fn kept_head(&self) -> &[u8] {
        &self.head[..self.head_len as usize]
    }

    /// Keeps the head of a line whose first segment lay in `chunk`, as the
    /// chunk ends.
    fn save_head(&mut self, chunk: &[u8]) {
        if self.at_start {
            // The line is over; the next one starts afresh.
            self.in_chunk = None;
            return;
        }
        if let Some((start, end)) = self.in_chunk.take() {
            let take = (end - start).min(HEAD);
            self.head[..take].copy_from_slice(&chunk[start..start + take]);
            self.head_len = take as u8;
        }
    }

    /// Appends to the kept head what fits of `segment`.
    fn keep_head(&mut self, segment: &[u8]) {
        if let Some((start, end)) = self.in_chunk.take() {
            // Moving out of the chunk: nothing kept yet (the line began in it).
            debug_assert_eq!(start, end);
            self.head_len = 0;
        }
        let at = self.head_len as usize;
        let take = (HEAD - at).min(segment.len());
        self.head[at..at + take].copy_from_slice(&segment[..take]);
        self.head_len += take as u8;
    }

    /// Appends `segment` to the kept tail, keeping its last [`TAIL`] bytes.
    fn keep_tail(&mut self, segment: &[u8]) {
        if segment.len() >= TAIL {
            self.tail.copy_from_slice(&segment[segment.len() - TAIL..]);
            self.tail_len = TAIL as u8;
            return;
        }
        let kept = self.tail_len as usize;
        let drop = (kept + segment.len()).saturating_sub(TAIL);
        self.tail.copy_within(drop..kept, 0);
        let kept = kept - drop;
        self.tail[kept..kept + segment.len()].copy_from_slice(segment);
        self.tail_len = (kept + segment.len()) as u8;
    }
}

/// The literal a line segment announces at its end (the bytes before its
/// LF): `{n}`, `{n+}`, `{n-}` or `~{n}`, then CR; and whether it is
/// synchronizing (`{n}`, `~{n}`).
fn literal_marker(segment: &[u8]) -> Option<(u64, bool)> {
    let s = segment.strip_suffix(b"\r").unwrap_or(segment);
    let s = s.strip_suffix(b"}")?;
    let (s, sync) = match s.strip_suffix(b"+").or_else(|| s.strip_suffix(b"-")) {
        Some(s) => (s, false),
        None => (s, true),
    };
    let digits = s.iter().rev().take_while(|b| b.is_ascii_digit()).count();
    if digits == 0 || digits > 19 || s.len() == digits || s[s.len() - digits - 1] != b'{' {
        return None;
    }
    let n = std::str::from_utf8(&s[s.len() - digits..])
        .ok()?
        .parse()
        .ok()?;
    Some((n, sync))
}

/// Whether a response with this head may carry literals: untagged data
/// (`* 3 FETCH …`, `* LIST …`), never a status response (`* OK`, `* NO`,
/// `* BAD`, `* BYE`, `* PREAUTH`, tagged), nor a continuation request,
/// whose text may end in anything, braces included.
fn response_has_literals(head: &[u8]) -> bool {
    let Some(rest) = head.strip_prefix(b"* ") else {
        return false;
    };
    let word = rest.split(|&b| b == b' ').next().unwrap_or(rest);
    !["OK", "NO", "BAD", "BYE", "PREAUTH"]
        .iter()
        .any(|status| word.eq_ignore_ascii_case(status.as_bytes()))
}

/// Whether a line with this head can start a response: untagged (`* `),
/// a continuation request (`+`), or a tag (printable, no atom-specials)
/// and a status word. A head cut short by its size is given the benefit.
fn plausible_response(head: &[u8]) -> bool {
    match head {
        [b'*', b' ', ..] | [b'+', ..] => true,
        _ => {
            let Some(space) = head.iter().position(|&b| b == b' ') else {
                return head.len() >= RESPONSE_HEAD && head.iter().all(|&b| is_tag_char(b));
            };
            let (tag, rest) = head.split_at(space);
            !tag.is_empty()
                && tag.iter().all(|&b| is_tag_char(b))
                && (tagged_answer(head, tag).is_some()
                    || (head.len() >= RESPONSE_HEAD && rest.len() < " BAD ".len()))
        }
    }
}

/// A character of a tag (RFC 9051: ASTRING-CHAR except `+`).
fn is_tag_char(b: u8) -> bool {
    b.is_ascii_graphic() && !b"(){%*\"\\+".contains(&b)
}

/// Whether a response line with this head is an untagged BYE.
fn is_bye(head: &[u8]) -> bool {
    head.len() >= BYE.len()
        && head[2] | 0x20 == b'b'
        && head[..BYE.len()].eq_ignore_ascii_case(BYE)
        && head.get(BYE.len()).is_none_or(|&b| b == b' ' || b == b'\r')
}

/// A shadow of the backend's deflate stream: inflates a copy to frame the
/// responses inside it.
pub struct Inflater {
    state: Decompress,
    /// The last [`WINDOW`] bytes inflated (a ring from `ring_at`), all that
    /// later data may refer back to: what a parked shadow keeps.
    ring: Box<[u8; WINDOW]>,
    ring_at: usize,
    ring_full: bool,
    /// The compressed stream's last bytes, to see a sync flush at its end.
    last: [u8; 4],
    /// Output was left in the inflater when the last input ended.
    pending: bool,
}

/// How far back deflate data may refer (RFC 1951: 32 KiB).
const WINDOW: usize = 32 * 1024;

/// Bytes inflated at a time, on the stack.
const INFLATE_OUT: usize = 16 * 1024;

thread_local! {
    /// One deflater per thread for parking shadows (made on first use).
    static PARKER: std::cell::RefCell<Option<flate2::Compress>> =
        const { std::cell::RefCell::new(None) };
}

impl Inflater {
    fn new() -> Box<Inflater> {
        Box::new(Inflater {
            state: Decompress::new(false),
            ring: Box::new([0; WINDOW]),
            ring_at: 0,
            ring_full: false,
            // A deflate stream starts on a block boundary, as after a flush.
            last: SYNC_FLUSH,
            pending: false,
        })
    }

    /// Remembers inflated bytes in the ring.
    fn remember(&mut self, mut out: &[u8]) {
        if out.len() >= WINDOW {
            out = &out[out.len() - WINDOW..];
        }
        let first = out.len().min(WINDOW - self.ring_at);
        self.ring[self.ring_at..self.ring_at + first].copy_from_slice(&out[..first]);
        self.ring[..out.len() - first].copy_from_slice(&out[first..]);
        let end = self.ring_at + out.len();
        self.ring_full |= end >= WINDOW;
        self.ring_at = end % WINDOW;
    }

    /// The window, oldest byte first.
    fn window(&self) -> Vec<u8> {
        let mut w = Vec::with_capacity(WINDOW);
        if self.ring_full {
            w.extend_from_slice(&self.ring[self.ring_at..]);
        }
        w.extend_from_slice(&self.ring[..self.ring_at]);
        w
    }

    /// At a sync flush, the shadow's whole state is its window: kept
    /// deflated until the backend speaks again. `None` if deflating fails.
    fn park(&self) -> Option<Box<[u8]>> {
        let window = self.window();
        PARKER.with(|parker| {
            let mut parker = parker.borrow_mut();
            let z = parker
                .get_or_insert_with(|| flate2::Compress::new(flate2::Compression::new(6), false));
            z.reset();
            let mut out = Vec::with_capacity(window.len() / 2 + 64);
            loop {
                let before = z.total_in() as usize;
                let status = z
                    .compress_vec(&window[before..], &mut out, flate2::FlushCompress::Finish)
                    .ok()?;
                if status == Status::StreamEnd {
                    return Some(out.into_boxed_slice());
                }
                out.reserve(out.capacity().max(1024));
            }
        })
    }

    /// A shadow again, from a parked window.
    fn unpark(parked: &[u8]) -> Option<Box<Inflater>> {
        let mut window = Vec::with_capacity(WINDOW);
        let mut d = Decompress::new(false);
        match d.decompress_vec(parked, &mut window, FlushDecompress::Finish) {
            Ok(Status::StreamEnd) => {}
            _ => return None,
        }
        let mut inflater = Inflater::new();
        if !window.is_empty() {
            inflater.state.set_dictionary(&window).ok()?;
        }
        inflater.remember(&window);
        inflater.last = SYNC_FLUSH;
        Some(inflater)
    }

    /// Inflates `input`, handing each piece of output to `out`. Fails on
    /// invalid deflate and at the end of the stream (nothing can follow it).
    fn feed(&mut self, input: &[u8], mut out: impl FnMut(&[u8])) -> Result<(), ()> {
        let mut buf = [0u8; INFLATE_OUT];
        let mut used = 0;
        loop {
            let (in_before, out_before) = (self.state.total_in(), self.state.total_out());
            let status = self
                .state
                .decompress(&input[used..], &mut buf, FlushDecompress::None)
                .map_err(|_| ())?;
            let consumed = (self.state.total_in() - in_before) as usize;
            let made = (self.state.total_out() - out_before) as usize;
            used += consumed;
            if made > 0 {
                self.remember(&buf[..made]);
                out(&buf[..made]);
            }
            if status == Status::StreamEnd {
                return Err(());
            }
            self.pending = made == buf.len();
            if used == input.len() && !self.pending {
                break;
            }
            if consumed == 0 && made == 0 {
                if used == input.len() {
                    break;
                }
                return Err(());
            }
        }
        if input.len() >= 4 {
            self.last.copy_from_slice(&input[input.len() - 4..]);
        } else {
            for &b in input {
                self.last.rotate_left(1);
                self.last[3] = b;
            }
        }
        Ok(())
    }

    /// Whether the stream stands at a sync flush: everything sent so far
    /// is inflated and the next block starts on a byte boundary.
    fn flushed(&self) -> bool {
        self.last == SYNC_FLUSH && !self.pending
    }

    /// `text` as a stored deflate block to follow a sync flush, checked by
    /// inflating it here: `None` when it would not decode to exactly `text`.
    fn stored_block(&mut self, text: &[u8]) -> Option<Vec<u8>> {
        let len = u16::try_from(text.len()).ok()?;
        let mut block = vec![0u8];
        block.extend_from_slice(&len.to_le_bytes());
        block.extend_from_slice(&(!len).to_le_bytes());
        block.extend_from_slice(text);
        let mut decoded = Vec::with_capacity(text.len());
        self.feed(&block, |out| decoded.extend_from_slice(out))
            .ok()?;
        (decoded == text).then_some(block)
    }
}

/// Where the client's compression stands.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Compress {
    Plain,
    /// `COMPRESS DEFLATE` sent with this tag; the answer is awaited.
    Asked([u8; MAX_TAG], u8),
    /// The backend said OK: both directions are deflate from then on.
    On,
}

/// The shadow of a compressed stream.
enum Shadow {
    None,
    Active(Box<Inflater>),
    /// Parked at a sync flush while the backend is quiet: the window,
    /// deflated (a few KiB instead of the inflater's 47).
    Parked(Box<[u8]>),
}

/// Both directions of one relayed IMAP session, as far as the relay needs.
pub struct Watch {
    commands: Lines<COMMAND_HEAD>,
    responses: Lines<RESPONSE_HEAD>,
    compress: Compress,
    /// The backend's stream, inflated, when it is compressed.
    shadow: Shadow,
    /// The backend said `* BYE`: its end of stream is orderly.
    bye: bool,
    /// The stream could not be followed: never write into it.
    lost: bool,
}

impl Default for Watch {
    fn default() -> Self {
        Watch {
            commands: Lines::default(),
            responses: Lines::default(),
            compress: Compress::Plain,
            shadow: Shadow::None,
            bye: false,
            lost: false,
        }
    }
}

/// How Postern may still write to the client when the relay ends.
pub enum Farewell {
    /// At a response boundary of a plain stream.
    Plain,
    /// At a response boundary of a compressed stream, after a sync flush.
    Deflate(Box<Inflater>),
    /// In the middle of a response, or in a stream Postern does not follow:
    /// nothing may be written, only the connection closed.
    Silent,
}

impl Farewell {
    /// `text` (a whole response, CRLF included) as it must be written to
    /// the client, or `None` when nothing may be.
    pub fn encode(self, text: &[u8]) -> Option<Vec<u8>> {
        match self {
            Farewell::Plain => Some(text.to_vec()),
            Farewell::Deflate(mut inflater) => inflater.stored_block(text),
            Farewell::Silent => None,
        }
    }

    pub fn as_str(&self) -> &'static str {
        match self {
            Farewell::Plain => "plain",
            Farewell::Deflate(_) => "deflate",
            Farewell::Silent => "silent",
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
    fn inflating(&self) -> bool {
        Watch::inflating(self)
    }
    fn park(&mut self) -> bool {
        Watch::park(self)
    }
    fn compressed(&self) -> bool {
        Watch::compressed(self)
    }
}

impl Watch {
    pub fn new() -> Self {
        Self::default()
    }

    /// The backend said `* BYE`: an end of its stream now is orderly.
    pub fn bye_seen(&self) -> bool {
        self.bye
    }

    /// Whether the streams are still followed (the watch has not given up).
    pub fn following(&self) -> bool {
        !self.lost
    }

    /// Whether the backend's stream is compressed.
    pub fn compressed(&self) -> bool {
        self.compress == Compress::On
    }

    /// Whether the stream so far ends at a response boundary where Postern
    /// could write (after a sync flush, when compressed).
    pub fn at_boundary(&self) -> bool {
        !self.lost
            && self.responses.at_boundary()
            && match (&self.compress, &self.shadow) {
                (Compress::On, Shadow::Active(inflater)) => inflater.flushed(),
                (Compress::On, Shadow::Parked(_)) => true,
                (Compress::On, Shadow::None) => false,
                _ => true,
            }
    }

    /// What Postern may write now, if the client has every byte fed so far.
    pub fn farewell(&mut self) -> Farewell {
        if !self.at_boundary() {
            return Farewell::Silent;
        }
        match std::mem::replace(&mut self.shadow, Shadow::None) {
            Shadow::Active(inflater) => Farewell::Deflate(inflater),
            Shadow::Parked(window) => {
                Inflater::unpark(&window).map_or(Farewell::Silent, Farewell::Deflate)
            }
            Shadow::None => Farewell::Plain,
        }
    }

    /// Whether a shadow inflater is held (and could be parked).
    pub fn inflating(&self) -> bool {
        matches!(self.shadow, Shadow::Active(_))
    }

    /// Parks the shadow inflater while the backend is quiet, if the stream
    /// stands at a response boundary after a sync flush; whether it did.
    /// The next bytes from the backend bring it back.
    pub fn park(&mut self) -> bool {
        let Shadow::Active(inflater) = &self.shadow else {
            return false;
        };
        if !(inflater.flushed() && self.responses.at_boundary()) {
            return false;
        }
        match inflater.park() {
            Some(window) => {
                self.shadow = Shadow::Parked(window);
                true
            }
            None => false,
        }
    }

    /// Bytes the client sent towards the backend.
    pub fn client_sent(&mut self, chunk: &[u8]) {
        if self.lost || self.compress == Compress::On {
            return;
        }
        let mut pos = 0;
        while let Some(end) = self.commands.next_line(chunk, pos, |_| true) {
            pos = end;
            let head = self.commands.head(chunk);
            if let Some(tag) = compress_command(head) {
                let mut t = [0u8; MAX_TAG];
                t[..tag.len()].copy_from_slice(tag);
                self.compress = Compress::Asked(t, tag.len() as u8);
            } else if head.len() == COMMAND_HEAD && ends_compress(self.commands.last(chunk)) {
                // Too long to read whole: a COMPRESS with a tag too long
                // to follow. Its answer would go unseen.
                self.give_up();
                return;
            }
        }
    }

    /// Bytes the backend sent towards the client. With `stop_at_boundary`
    /// (the relay is ending), a plain stream is followed only up to its
    /// first response boundary, whose offset is returned: the client must
    /// get no byte past it. `None` when no boundary was asked for or found.
    pub fn backend_sent(&mut self, chunk: &[u8], stop_at_boundary: bool) -> Option<usize> {
        if self.lost {
            return None;
        }
        let compressed_from = match self.shadow {
            Shadow::None => match self.follow_plain(chunk, stop_at_boundary) {
                Ok(cut) => return cut,
                Err(from) => from,
            },
            _ => 0,
        };
        let mut inflater = match std::mem::replace(&mut self.shadow, Shadow::None) {
            Shadow::Active(inflater) => inflater,
            Shadow::Parked(window) => match Inflater::unpark(&window) {
                Some(inflater) => inflater,
                None => {
                    self.give_up();
                    return None;
                }
            },
            Shadow::None => Inflater::new(),
        };
        let mut followed = true;
        let fed = inflater.feed(&chunk[compressed_from..], |plain| {
            followed &= self.follow_plain(plain, false).is_ok();
        });
        if fed.is_ok() && followed {
            self.shadow = Shadow::Active(inflater);
        } else {
            self.give_up();
        }
        None
    }

    /// Frames plain response bytes. `Ok(Some(offset))` at the first
    /// boundary when asked to stop there; `Err(offset)` when the stream
    /// turns compressed at `offset` (the rest is not followed here).
    fn follow_plain(
        &mut self,
        plain: &[u8],
        stop_at_boundary: bool,
    ) -> Result<Option<usize>, usize> {
        let mut pos = 0;
        while let Some(end) = self.responses.next_line(plain, pos, response_has_literals) {
            pos = end;
            let head = self.responses.head(plain);
            if !plausible_response(head) {
                // Not a response: the framing is out of step (or the
                // stream is not what it seems). Nothing more is judged.
                self.give_up();
                return Ok(None);
            }
            if is_bye(head) {
                self.bye = true;
            }
            if self.commands.awaits_literal() {
                // A refused command sends no literal (RFC 9051 7.5).
                let tag = self.commands.kept_head();
                let tag = &tag[..tag.iter().position(|&b| b == b' ').unwrap_or(tag.len())];
                if !tag.is_empty() && matches!(tagged_answer(head, tag), Some(Answer::Refused)) {
                    self.commands.literal_refused();
                }
            }
            if let Compress::Asked(tag, len) = self.compress {
                match tagged_answer(head, &tag[..len as usize]) {
                    Some(Answer::Ok) => {
                        self.compress = Compress::On;
                        return Err(pos);
                    }
                    Some(Answer::Refused) => self.compress = Compress::Plain,
                    None => {}
                }
            }
            // After the backend's own BYE its stream runs to its close
            // (the tagged answer to LOGOUT follows): no cut, no word.
            if stop_at_boundary && !self.bye {
                return Ok(Some(pos));
            }
        }
        Ok(None)
    }

    fn give_up(&mut self) {
        self.lost = true;
        self.shadow = Shadow::None;
    }
}

enum Answer {
    Ok,
    Refused,
}

/// The answer to the command tagged `tag`, if `head` is one.
fn tagged_answer(head: &[u8], tag: &[u8]) -> Option<Answer> {
    let rest = head.strip_prefix(tag)?.strip_prefix(b" ")?;
    let word = rest.split(|&b| matches!(b, b' ' | b'\r')).next()?;
    if word.eq_ignore_ascii_case(b"OK") {
        Some(Answer::Ok)
    } else if word.eq_ignore_ascii_case(b"NO") || word.eq_ignore_ascii_case(b"BAD") {
        Some(Answer::Refused)
    } else {
        None
    }
}

/// The words after the tag of a `COMPRESS DEFLATE` command.
const COMPRESS_DEFLATE: &[u8] = b" COMPRESS DEFLATE";

/// The tag of a whole command line `<tag> COMPRESS DEFLATE` (LF excluded).
fn compress_command(line: &[u8]) -> Option<&[u8]> {
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    let (tag, rest) = line.split_at(line.iter().position(|&b| b == b' ')?);
    (!tag.is_empty() && tag.len() <= MAX_TAG && rest.eq_ignore_ascii_case(COMPRESS_DEFLATE))
        .then_some(tag)
}

/// Whether a line's last bytes (LF excluded) are ` COMPRESS DEFLATE`.
fn ends_compress(tail: &[u8]) -> bool {
    let tail = tail.strip_suffix(b"\r").unwrap_or(tail);
    tail.len() >= COMPRESS_DEFLATE.len()
        && tail[tail.len() - COMPRESS_DEFLATE.len()..].eq_ignore_ascii_case(COMPRESS_DEFLATE)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use flate2::write::DeflateEncoder;
    use flate2::Compression;
    use std::io::Write;

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

    /// `stream` cut into pieces: one byte each, then random lengths.
    fn splits(stream: &[u8], seed: u64) -> Vec<Vec<&[u8]>> {
        let mut ways = vec![stream.chunks(1).collect::<Vec<_>>(), vec![stream]];
        let mut rng = Rng(seed | 1);
        for _ in 0..50 {
            let mut pieces = Vec::new();
            let mut at = 0;
            while at < stream.len() {
                let n = 1 + rng
                    .below(if ways.len() % 2 == 0 { 17 } else { 80 })
                    .min(stream.len() - at - 1);
                pieces.push(&stream[at..at + n]);
                at += n;
            }
            ways.push(pieces);
        }
        ways
    }

    /// The response boundaries (offsets after each response) of `stream`.
    fn boundaries(pieces: &[&[u8]]) -> Vec<usize> {
        let mut lines = Lines::<RESPONSE_HEAD>::default();
        let mut found = Vec::new();
        let mut base = 0;
        for piece in pieces {
            let mut pos = 0;
            while let Some(end) = lines.next_line(piece, pos, response_has_literals) {
                found.push(base + end);
                pos = end;
            }
            base += piece.len();
        }
        found
    }

    const RESPONSES: &[u8] = b"* 3 EXISTS\r\n\
        * 1 FETCH (UID 7 BODY[] {24}\r\n* BYE not me\r\n{5}\r\nabc)\r\n\
        * 2 FETCH (BINARY[1] ~{3}\r\n\x00\x01\x02 BODY[HEADER] {0}\r\n)\r\n\
        * OK [ALERT] text may end in {5}\r\n\
        + go on {3}\r\n\
        a1 OK FETCH done {2}\r\n\
        * LIST () \"/\" {5}\r\nIN\nBX\r\n";

    #[test]
    fn responses_end_where_their_lines_end_after_literals() {
        let expected = {
            let mut ends = Vec::new();
            let mut at = 0;
            for response in [
                &b"* 3 EXISTS\r\n"[..],
                b"* 1 FETCH (UID 7 BODY[] {24}\r\n* BYE not me\r\n{5}\r\nabc)\r\n",
                b"* 2 FETCH (BINARY[1] ~{3}\r\n\x00\x01\x02 BODY[HEADER] {0}\r\n)\r\n",
                b"* OK [ALERT] text may end in {5}\r\n",
                b"+ go on {3}\r\n",
                b"a1 OK FETCH done {2}\r\n",
                b"* LIST () \"/\" {5}\r\nIN\nBX\r\n",
            ] {
                at += response.len();
                ends.push(at);
            }
            ends
        };
        for (i, pieces) in splits(RESPONSES, 7).iter().enumerate() {
            assert_eq!(boundaries(pieces), expected, "split {i}");
        }
    }

    #[test]
    fn literal_markers() {
        assert_eq!(literal_marker(b"* 1 FETCH (BODY[] {5}\r"), Some((5, true)));
        assert_eq!(literal_marker(b"a APPEND x {12+}\r"), Some((12, false)));
        assert_eq!(literal_marker(b"a APPEND x {12-}"), Some((12, false)));
        assert_eq!(
            literal_marker(b"~{9223372036854775807}\r"),
            Some((i64::MAX as u64, true))
        );
        assert_eq!(literal_marker(b"{}\r"), None);
        assert_eq!(literal_marker(b"{12345678901234567890}\r"), None);
        assert_eq!(literal_marker(b"5}\r"), None);
        assert_eq!(literal_marker(b"{5} \r"), None);
        assert_eq!(literal_marker(b"x{5x}\r"), None);
    }

    /// The watch after `pieces` of backend bytes.
    fn fed(pieces: &[&[u8]]) -> Watch {
        let mut watch = Watch::new();
        for piece in pieces {
            assert_eq!(watch.backend_sent(piece, false), None);
        }
        watch
    }

    #[test]
    fn a_bye_is_seen_only_as_a_response() {
        let bye = b"* 1 FETCH (FLAGS ())\r\n* BYE Logging out\r\nZ OK Logout completed.\r\n";
        for pieces in splits(bye, 3) {
            let watch = fed(&pieces);
            assert!(watch.bye_seen());
            assert!(watch.at_boundary());
        }
        for stream in [&b"* bye shutting down\r\n"[..], b"* BYE\r\n"] {
            assert!(fed(&[stream]).bye_seen(), "{stream:?}");
        }
        for stream in [
            &b"* OK [ALERT] say * BYE later\r\n"[..],
            b"* OK x\r\nx* BYE later\r\n",
            b"* BYEBYE\r\n",
            b"a BYE\r\n",
            // In a literal, and a literal that is not over.
            RESPONSES,
            b"* 1 FETCH (BODY[] {100}\r\n\r\n* BYE in the body\r\n",
        ] {
            for pieces in splits(stream, 5) {
                assert!(!fed(&pieces).bye_seen(), "{stream:?}");
            }
        }
    }

    /// A line no response can start with: the watch gives up, and so
    /// never speaks into that stream.
    #[test]
    fn a_line_that_is_no_response_makes_the_watch_give_up() {
        for stream in [
            &b"\x8b\x02garbage\r\n"[..],
            b"\r\n",
            b"a1 FETCH done\r\n",
            b"(x) OK\r\n",
        ] {
            let mut watch = fed(&[b"* 1 EXISTS\r\na OK\r\n+ go\r\n"]);
            assert!(watch.following() && watch.at_boundary());
            watch.backend_sent(stream, false);
            assert!(!watch.following(), "{stream:?}");
            assert!(matches!(watch.farewell(), Farewell::Silent));
        }
        let long_tag = format!("{} OK done\r\n", "t".repeat(RESPONSE_HEAD));
        assert!(fed(&[long_tag.as_bytes()]).following());
    }

    #[test]
    fn stopping_cuts_at_the_first_boundary() {
        let mut watch = Watch::new();
        assert_eq!(
            watch.backend_sent(b"* 1 FETCH (BODY[] {4}\r\nab", false),
            None
        );
        assert!(!watch.at_boundary());
        let rest = b"cd)\r\n* 2 EXISTS\r\n";
        assert_eq!(watch.backend_sent(rest, true), Some(5));
        assert!(watch.at_boundary());
        assert!(matches!(watch.farewell(), Farewell::Plain));
        let mut watch = Watch::new();
        watch.backend_sent(b"* 1 FETCH (BODY[] {4}\r\nab", false);
        assert!(matches!(watch.farewell(), Farewell::Silent));
        // After the backend's own BYE, nothing is cut: its tagged answer
        // and its close follow.
        let mut watch = Watch::new();
        assert_eq!(
            watch.backend_sent(b"* BYE Logging out\r\nZ OK Logout completed.\r\n", true),
            None
        );
        assert!(watch.bye_seen());
    }

    /// What a COMPRESS backend sends: each response deflated, then a sync
    /// flush, all in one stream.
    pub(crate) fn deflated(z: &mut DeflateEncoder<Vec<u8>>, responses: &[&[u8]]) -> Vec<u8> {
        let before = z.get_ref().len();
        for r in responses {
            z.write_all(r).unwrap();
            z.flush().unwrap();
        }
        z.get_ref()[before..].to_vec()
    }

    /// What a client's inflater makes of a raw deflate stream.
    pub(crate) fn inflate(compressed: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        let mut d = flate2::write::DeflateDecoder::new(&mut out);
        d.write_all(compressed).unwrap();
        d.flush().unwrap();
        drop(d);
        out
    }

    fn compressed_session() -> (Watch, DeflateEncoder<Vec<u8>>) {
        let mut watch = Watch::new();
        watch.client_sent(b"a1 SELECT INBOX\r\n");
        watch.backend_sent(b"* 1 EXISTS\r\na1 OK done\r\n", false);
        watch.client_sent(b"Z7 compress deflate\r\n");
        assert!(!watch.compressed());
        (watch, DeflateEncoder::new(Vec::new(), Compression::new(6)))
    }

    #[test]
    fn compress_is_followed_from_the_byte_after_the_ok() {
        for split in [1, 3, 40, 4096] {
            let (mut watch, mut z) = compressed_session();
            let mut stream = b"* 2 EXISTS\r\nZ7 OK DEFLATE active\r\n".to_vec();
            stream.extend(deflated(
                &mut z,
                &[
                    b"* 1 FETCH (BODY[] {12}\r\n* BYE inside)\r\n",
                    b"* 3 EXISTS\r\n",
                ],
            ));
            for piece in stream.chunks(split) {
                watch.backend_sent(piece, false);
            }
            assert!(watch.compressed());
            assert!(!watch.bye_seen());
            assert!(watch.at_boundary(), "split {split}");
            // Half a response, not yet flushed: no word may be written.
            let half = deflated(&mut z, &[b"* 2 FETCH (BODY[] {10}\r\n01234"]);
            watch.backend_sent(&half, false);
            assert!(!watch.at_boundary());
            let rest = deflated(&mut z, &[b"56789)\r\n"]);
            watch.backend_sent(&rest, false);
            assert!(watch.at_boundary());
            let bye = deflated(&mut z, &[b"* BYE Logging out\r\n"]);
            watch.backend_sent(&bye, false);
            assert!(watch.bye_seen());
        }
    }

    #[test]
    fn a_refused_compress_leaves_the_stream_plain() {
        for answer in [&b"Z7 NO not now\r\n"[..], b"Z7 BAD what\r\n"] {
            let (mut watch, _) = compressed_session();
            watch.backend_sent(answer, false);
            watch.backend_sent(b"* BYE bye\r\n", false);
            assert!(!watch.compressed());
            assert!(watch.bye_seen());
            assert!(matches!(watch.farewell(), Farewell::Plain));
        }
    }

    /// Postern's BYE on a compressed stream is a stored block that the
    /// client's inflater reads after everything the backend sent.
    #[test]
    fn a_farewell_on_a_compressed_stream_inflates_to_the_text() {
        let (mut watch, mut z) = compressed_session();
        let mut wire = b"Z7 OK\r\n".to_vec();
        watch.backend_sent(&wire, false);
        let body = deflated(&mut z, &[b"* 1 FETCH (FLAGS (\\Seen))\r\n"]);
        watch.backend_sent(&body, false);
        let Farewell::Deflate(inflater) = watch.farewell() else {
            panic!("a flushed boundary");
        };
        let bye = b"* BYE [UNAVAILABLE] Server shutting down\r\n";
        let block = Farewell::Deflate(inflater).encode(bye).unwrap();
        wire.extend_from_slice(&body);
        let compressed_from = 7;
        wire.extend_from_slice(&block);
        assert_eq!(
            inflate(&wire[compressed_from..]),
            b"* 1 FETCH (FLAGS (\\Seen))\r\n* BYE [UNAVAILABLE] Server shutting down\r\n"
        );
    }

    /// A quiet compressed session parks its shadow at a sync flush and
    /// takes it up again when the backend speaks: later data, which refers
    /// back into the parked window, is followed as before.
    #[test]
    fn a_parked_shadow_follows_on() {
        let (mut watch, mut z) = compressed_session();
        watch.backend_sent(b"Z7 OK\r\n", false);
        let mut mail = Vec::new();
        for i in 0..2000 {
            mail.extend_from_slice(format!("line {i} of a message\r\n").as_bytes());
        }
        let mut fetch = format!("* 1 FETCH (BODY[] {{{}}}\r\n", mail.len()).into_bytes();
        fetch.extend_from_slice(&mail);
        fetch.extend_from_slice(b")\r\n");
        // Half a response: not parked.
        let (first, second) = fetch.split_at(fetch.len() / 2);
        watch.backend_sent(&deflated(&mut z, &[first]), false);
        assert!(!watch.park());
        watch.backend_sent(&deflated(&mut z, &[second]), false);
        assert!(watch.park());
        assert!(!watch.inflating());
        assert!(watch.at_boundary());
        // The same text again: deflate refers back into the window.
        watch.backend_sent(&deflated(&mut z, &[&fetch]), false);
        assert!(watch.inflating() && watch.at_boundary());
        assert!(watch.park());
        watch.backend_sent(&deflated(&mut z, &[b"* BYE Logging out\r\n"]), false);
        assert!(watch.bye_seen());
        // Parked, the farewell is still deflate data the client reads.
        assert!(watch.park());
        let wire = {
            let mut all = z.get_ref().clone();
            let Farewell::Deflate(inflater) = watch.farewell() else {
                panic!("a parked shadow stands at a flushed boundary");
            };
            all.extend(Farewell::Deflate(inflater).encode(b"* BYE x\r\n").unwrap());
            all
        };
        assert!(inflate(&wire).ends_with(b"* BYE Logging out\r\n* BYE x\r\n"));
    }

    /// A synchronizing literal the server refuses is never sent: the
    /// client's next bytes are a command again. One it accepts is skipped.
    #[test]
    fn a_refused_synchronizing_literal_is_not_awaited() {
        for pieces in splits(b"a1 APPEND INBOX {30}\r\n", 13) {
            let mut watch = Watch::new();
            for piece in &pieces {
                watch.client_sent(piece);
            }
            watch.backend_sent(b"* 3 EXISTS\r\na1 NO [TOOBIG] too big\r\n", false);
            watch.client_sent(b"z COMPRESS DEFLATE\r\n");
            assert!(matches!(watch.compress, Compress::Asked(..)), "{pieces:?}");
        }
        let mut watch = Watch::new();
        watch.client_sent(b"a1 APPEND INBOX {20}\r\n");
        watch.backend_sent(b"+ go ahead\r\n", false);
        watch.client_sent(b"z COMPRESS DEFLATE\r\n");
        assert!(watch.compress == Compress::Plain);
        // An empty synchronizing literal waits for its `+` as well.
        let mut watch = Watch::new();
        watch.client_sent(b"a1 APPEND INBOX {0}\r\n");
        watch.backend_sent(b"a1 NO [TOOBIG] empty\r\n", false);
        watch.client_sent(b"z COMPRESS DEFLATE\r\n");
        assert!(matches!(watch.compress, Compress::Asked(..)));
        // Another command's refusal does not end the wait.
        let mut watch = Watch::new();
        watch.client_sent(b"a1 APPEND INBOX {20}\r\n");
        watch.backend_sent(b"a0 NO earlier\r\n", false);
        watch.client_sent(b"z COMPRESS DEFLATE\r\n");
        assert!(watch.compress == Compress::Plain);
    }

    #[test]
    fn invalid_deflate_makes_the_watch_give_up() {
        let (mut watch, _) = compressed_session();
        watch.backend_sent(b"Z7 OK\r\n\xff\xff\xff\xff\xff\xff", false);
        assert!(!watch.at_boundary());
        assert!(matches!(watch.farewell(), Farewell::Silent));
    }

    #[test]
    fn a_compress_command_is_seen_split_anyhow_and_only_whole() {
        let stream = b"a1 APPEND INBOX {22}\r\nZ9 COMPRESS DEFLATE\r\n)\r\nt COMPRESS DEFLATE\r\n";
        for pieces in splits(stream, 11) {
            let mut watch = Watch::new();
            for piece in &pieces {
                watch.client_sent(piece);
            }
            assert!(
                matches!(watch.compress, Compress::Asked(tag, 1) if tag[0] == b't'),
                "{pieces:?}"
            );
        }
        for line in [
            &b"a COMPRESS DEFLATE extra\r\n"[..],
            b"a COMPRESS\r\n",
            b"COMPRESS DEFLATE\r\n",
        ] {
            let mut watch = Watch::new();
            watch.client_sent(line);
            assert!(watch.compress == Compress::Plain, "{line:?}");
        }
        // A tag too long to follow: the watch gives up rather than miss it.
        let mut watch = Watch::new();
        let long = format!("{} COMPRESS DEFLATE\r\n", "t".repeat(MAX_TAG + 1));
        watch.client_sent(long.as_bytes());
        watch.backend_sent(b"* 1 EXISTS\r\n", false);
        assert!(!watch.at_boundary());
    }
}
