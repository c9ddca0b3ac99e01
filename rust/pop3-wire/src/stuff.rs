//! Dot-stuffing (server side): a stored message into a multi-line response body.

use crate::WireError;

/// Where the normalised octets go: the stuffer writes them, the size counter counts them.
trait Sink {
    /// Input octets passed through unchanged.
    fn span(&mut self, octets: &[u8]);
    /// A line end (always CRLF on the wire).
    fn crlf(&mut self);
    /// A stuffing dot (not part of the message size).
    fn dot(&mut self);
    /// The CRLF that ends a message without a final line end, so that the terminator
    /// starts a line. Sent, but not part of the message size (RFC 1939 §11, Dovecot).
    fn closing_crlf(&mut self) {
        self.crlf();
    }
}

impl Sink for Vec<u8> {
    #[inline]
    fn span(&mut self, octets: &[u8]) {
        self.extend_from_slice(octets);
    }
    #[inline]
    fn crlf(&mut self) {
        self.extend_from_slice(b"\r\n");
    }
    #[inline]
    fn dot(&mut self) {
        self.push(b'.');
    }
}

/// Counts message octets (RFC 1939 §11): stuffing dots and the closing CRLF are not
/// counted.
#[derive(Debug, Clone)]
struct Count(u64);

impl Sink for Count {
    #[inline]
    fn span(&mut self, octets: &[u8]) {
        self.0 += octets.len() as u64;
    }
    #[inline]
    fn crlf(&mut self) {
        self.0 += 2;
    }
    #[inline]
    fn dot(&mut self) {}
    #[inline]
    fn closing_crlf(&mut self) {}
}

/// Octets per block in [`skip_verbatim_blocks`].
const BLOCK: usize = 64;

/// True if no octet of the block `w[1..=BLOCK]` needs rewriting: no bare LF, no bare CR,
/// no `.` after an LF. `w[0]` and `w[BLOCK + 1]` are the octets around the block. Written
/// as branch-free work on three shifted views so that the compiler vectorises it.
#[inline(always)]
fn block_is_verbatim(w: &[u8; BLOCK + 2]) -> bool {
    let prev: &[u8; BLOCK] = w[..BLOCK].try_into().expect("BLOCK octets");
    let cur: &[u8; BLOCK] = w[1..=BLOCK].try_into().expect("BLOCK octets");
    let next: &[u8; BLOCK] = w[2..].try_into().expect("BLOCK octets");
    let mut bad = [0u8; BLOCK];
    for j in 0..BLOCK {
        let bare_lf = (cur[j] == b'\n') & (prev[j] != b'\r');
        let bare_cr = (cur[j] == b'\r') & (next[j] != b'\n');
        let dot_at_line_start = (cur[j] == b'.') & (prev[j] == b'\n');
        bad[j] = u8::from(bare_lf | bare_cr | dot_at_line_start);
    }
    bad.iter().fold(0, |acc, b| acc | b) == 0
}

/// From `i` (at least 1, not inside a CRLF), skips whole blocks that pass through
/// unchanged and returns where the first other block starts. Used only without a TOP cut,
/// where line ends need not be counted.
#[inline]
fn skip_verbatim_blocks(data: &[u8], mut i: usize) -> usize {
    while i + BLOCK < data.len() {
        let w: &[u8; BLOCK + 2] = data[i - 1..i + BLOCK + 1]
            .try_into()
            .expect("a window of BLOCK + 2 octets");
        if !block_is_verbatim(w) {
            break;
        }
        i += BLOCK;
    }
    i
}

/// Where a TOP cut stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Top {
    /// No cut: send everything.
    Off,
    /// In the header; after the empty line that ends it, send this many lines.
    Header(u64),
    /// In the body; this many lines (at least one) may still be sent.
    Body(u64),
    /// The cut is complete: ignore further input.
    Done,
}

/// The line-end normalising, dot-stuffing state machine shared by [`DotStuffer`] and
/// [`SizeCounter`].
#[derive(Debug, Clone)]
struct Normaliser {
    /// The next octet begins a line (nothing of the current line has been seen yet).
    at_line_start: bool,
    /// The last octet seen was a CR whose meaning (CRLF or bare CR) awaits the next octet.
    pending_cr: bool,
    top: Top,
    finished: bool,
}

impl Normaliser {
    fn new(top_lines: Option<u64>) -> Self {
        Normaliser {
            at_line_start: true,
            pending_cr: false,
            top: top_lines.map_or(Top::Off, Top::Header),
            finished: false,
        }
    }

    /// A line has ended (its CRLF already written). Returns true if the TOP cut is now
    /// complete and output must stop.
    #[inline]
    fn line_end(&mut self, empty: bool) -> bool {
        self.at_line_start = true;
        match self.top {
            Top::Off | Top::Done => false,
            Top::Header(_) if !empty => false,
            Top::Header(0) | Top::Body(1) => {
                self.top = Top::Done;
                true
            }
            // The empty line that ends the header: n body lines may follow.
            Top::Header(n) => {
                self.top = Top::Body(n);
                false
            }
            Top::Body(n) => {
                self.top = Top::Body(n - 1);
                false
            }
        }
    }

    fn feed<S: Sink>(&mut self, data: &[u8], out: &mut S) -> Result<(), WireError> {
        if self.finished {
            return Err(WireError::Finished);
        }
        if self.top == Top::Done || data.is_empty() {
            return Ok(());
        }
        let len = data.len();
        let mut i = 0;
        if self.pending_cr {
            // The held CR ends a line whatever follows; an LF after it belongs to it.
            self.pending_cr = false;
            out.crlf();
            if data[0] == b'\n' {
                i = 1;
            }
            let empty = self.at_line_start;
            if self.line_end(empty) {
                return Ok(());
            }
        }
        // `data[run..i]` is input not yet written that passes through unchanged.
        let mut run = i;
        // Block skipping is tried again from `retry_at`; after a block that needs rewriting
        // the distance doubles (up to 4 KiB), so that input with many bare LFs does not pay
        // for a failed check on every block.
        let mut retry_at = i;
        let mut backoff = BLOCK;
        while i < len {
            if self.top == Top::Off
                && i > 0
                && i >= retry_at
                && !(self.at_line_start && data[i] == b'.')
            {
                let skipped = skip_verbatim_blocks(data, i);
                if skipped == i {
                    retry_at = i + backoff;
                    backoff = (backoff * 2).min(4096);
                } else {
                    backoff = BLOCK;
                    i = skipped;
                    if data[i - 1] == b'\r' {
                        // The block check saw that this CR's LF follows: keep them together.
                        i += 1;
                    }
                    self.at_line_start = data[i - 1] == b'\n';
                    if i == len {
                        break;
                    }
                }
            }
            if self.at_line_start && data[i] == b'.' {
                out.span(&data[run..i]);
                out.dot();
                run = i;
            }
            let Some(k) = memchr::memchr2(b'\r', b'\n', &data[i..]) else {
                self.at_line_start = false;
                break;
            };
            let j = i + k;
            let empty = self.at_line_start && k == 0;
            if data[j] == b'\n' {
                // A bare LF (a CRLF is consumed at its CR).
                out.span(&data[run..j]);
                out.crlf();
                i = j + 1;
                run = i;
            } else if j + 1 == len {
                // A CR at the end of the chunk: the next octet decides.
                out.span(&data[run..j]);
                self.at_line_start = empty;
                self.pending_cr = true;
                return Ok(());
            } else if data[j + 1] == b'\n' {
                i = j + 2;
            } else {
                // A bare CR ends a line too.
                out.span(&data[run..j]);
                out.crlf();
                i = j + 1;
                run = i;
            }
            if self.line_end(empty) {
                out.span(&data[run..i]);
                return Ok(());
            }
        }
        out.span(&data[run..]);
        Ok(())
    }

    fn finish<S: Sink>(&mut self, out: &mut S) -> Result<(), WireError> {
        if self.finished {
            return Err(WireError::Finished);
        }
        self.finished = true;
        if self.pending_cr {
            self.pending_cr = false;
            out.crlf();
            let empty = self.at_line_start;
            self.line_end(empty);
        }
        if !self.at_line_start {
            out.closing_crlf();
            self.at_line_start = true;
        }
        Ok(())
    }
}

/// Streams a stored message as a multi-line response body (RFC 1939 §3).
///
/// * Every line end on the wire is CRLF: CRLF stays, a bare LF becomes CRLF, and so does
///   a bare CR (so `CR CR LF` is two line ends). A CR at the end of a chunk is held back
///   until the next octet (or [`DotStuffer::finish`]) decides.
/// * Every line that begins with `.` gets one more `.` in front, including the first
///   line and a line that begins at a chunk boundary.
/// * [`DotStuffer::finish`] adds a CRLF if the output does not end at a line start, then
///   the `.\r\n` terminator.
/// * TOP cut (`top_lines = Some(n)`, RFC 1939 §7): the header through its empty line is
///   sent, then at most `n` more lines; then [`DotStuffer::done`] becomes true and later
///   input is ignored.
///
/// ```
/// let mut s = pop3_wire::DotStuffer::new(None);
/// let mut out = s.feed(b"Subject: x\n\n.hidden\r").unwrap();
/// out.extend(s.feed(b"\n.").unwrap());
/// out.extend(s.finish().unwrap());
/// assert_eq!(out, b"Subject: x\r\n\r\n..hidden\r\n..\r\n.\r\n");
/// ```
#[derive(Debug, Clone)]
pub struct DotStuffer {
    state: Normaliser,
}

impl Default for DotStuffer {
    fn default() -> Self {
        DotStuffer::new(None)
    }
}

impl DotStuffer {
    /// A stuffer for the whole message (`None`) or for a TOP of `n` body lines.
    pub fn new(top_lines: Option<u64>) -> Self {
        DotStuffer {
            state: Normaliser::new(top_lines),
        }
    }

    /// True once a TOP cut is complete; further input is ignored.
    pub fn done(&self) -> bool {
        self.state.top == Top::Done
    }

    /// True once [`DotStuffer::finish`] has been called.
    pub fn is_finished(&self) -> bool {
        self.state.finished
    }

    /// Appends the stuffed form of `data` to `out`.
    /// Fails with [`WireError::Finished`] after [`DotStuffer::finish`].
    pub fn feed_into(&mut self, data: &[u8], out: &mut Vec<u8>) -> Result<(), WireError> {
        // Mail is mostly CRLF text: reserve a little more than the input; `Vec` grows
        // for the rest.
        out.reserve(data.len() + data.len() / 16 + 8);
        self.state.feed(data, out)
    }

    /// If the stuffed form of `data` is `data` itself (CRLF line ends only, no line
    /// that begins with `.`, no CR held back on either side, no TOP cut), advances the
    /// state exactly as [`DotStuffer::feed`] would and returns true; otherwise changes
    /// nothing and returns false. Lets a caller send mail stored in the wire form
    /// without copying it. A read-only scan that stops at the first octet to rewrite.
    pub fn feed_verbatim(&mut self, data: &[u8]) -> bool {
        let s = &mut self.state;
        let len = data.len();
        if s.finished
            || s.top != Top::Off
            || s.pending_cr
            || len == 0
            || data[len - 1] == b'\r'
            || data[0] == b'\n'
            || (s.at_line_start && data[0] == b'.')
            || (data[0] == b'\r' && data[1] != b'\n')
        {
            return false;
        }
        // Octets 1.. in whole blocks, then the tail one by one (same three rules).
        let mut i = skip_verbatim_blocks(data, 1);
        if i + BLOCK < len {
            return false;
        }
        while i < len {
            let (prev, cur) = (data[i - 1], data[i]);
            let bad = match cur {
                b'\n' => prev != b'\r',
                b'\r' => i + 1 == len || data[i + 1] != b'\n',
                b'.' => prev == b'\n',
                _ => false,
            };
            if bad {
                return false;
            }
            i += 1;
        }
        s.at_line_start = data[len - 1] == b'\n';
        true
    }

    /// The stuffed form of `data`. Fails with [`WireError::Finished`] after
    /// [`DotStuffer::finish`].
    pub fn feed(&mut self, data: &[u8]) -> Result<Vec<u8>, WireError> {
        let mut out = Vec::new();
        self.feed_into(data, &mut out)?;
        Ok(out)
    }

    /// Appends the held-back octets, a CRLF if the output does not end a line, then
    /// `.\r\n`. Fails with [`WireError::Finished`] if called twice.
    pub fn finish_into(&mut self, out: &mut Vec<u8>) -> Result<(), WireError> {
        self.state.finish(out)?;
        out.extend_from_slice(b".\r\n");
        Ok(())
    }

    /// The held-back octets, a CRLF if the output does not end a line, then `.\r\n`.
    /// Fails with [`WireError::Finished`] if called twice.
    pub fn finish(&mut self) -> Result<Vec<u8>, WireError> {
        let mut out = Vec::with_capacity(7);
        self.finish_into(&mut out)?;
        Ok(out)
    }
}

/// Counts a message's POP3 size (RFC 1939 §11) without producing output: the message
/// as stored with every line end made CRLF (a bare CR counts as a line end, as the
/// stuffer sends it). Not counted: stuffing dots, the terminator, and the CRLF that
/// [`DotStuffer::finish`] adds to a message without a final line end (Dovecot's and
/// IMAP's RFC822.SIZE rule). So a client that unstuffs a RETR gets the size, plus 2
/// when the message had no final line end.
#[derive(Debug, Clone)]
pub struct SizeCounter {
    state: Normaliser,
    count: Count,
}

impl Default for SizeCounter {
    fn default() -> Self {
        SizeCounter::new()
    }
}

impl SizeCounter {
    /// A counter at zero.
    pub fn new() -> Self {
        SizeCounter {
            state: Normaliser::new(None),
            count: Count(0),
        }
    }

    /// Counts `data`. Fails with [`WireError::Finished`] after [`SizeCounter::finish`].
    pub fn feed(&mut self, data: &[u8]) -> Result<(), WireError> {
        self.state.feed(data, &mut self.count)
    }

    /// The size of everything fed. Fails with [`WireError::Finished`] if called twice.
    pub fn finish(&mut self) -> Result<u64, WireError> {
        self.state.finish(&mut self.count)?;
        Ok(self.count.0)
    }
}

/// The whole-message [`DotStuffer`]: `feed(message)` then `finish()`.
pub fn stuff(message: &[u8], top_lines: Option<u64>) -> Vec<u8> {
    let mut out = Vec::new();
    stuff_into(message, top_lines, &mut out);
    out
}

/// [`stuff`], appending to `out` (a buffer the caller may reuse).
pub fn stuff_into(message: &[u8], top_lines: Option<u64>, out: &mut Vec<u8>) {
    let mut s = DotStuffer::new(top_lines);
    s.feed_into(message, out)
        .and_then(|()| s.finish_into(out))
        .expect("a new DotStuffer is not finished");
}

/// The whole-message [`SizeCounter`].
pub fn wire_size(message: &[u8]) -> u64 {
    let mut c = SizeCounter::new();
    c.feed(message)
        .and_then(|()| c.finish())
        .expect("a new SizeCounter is not finished")
}
