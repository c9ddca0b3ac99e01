//! Unstuffing (client side): a multi-line response body back into the message.

use crate::WireError;
use memchr::memmem::Finder;
use std::sync::LazyLock;

/// The searcher for a line start with a dot. Shared, and kept out of [`Unstuffer`]: it
/// holds SIMD vectors with 32-octet alignment, more than Python's allocator gives the
/// objects that embed an `Unstuffer` (a pyo3 class), where it crashed.
static LINE_START_DOT: LazyLock<Finder<'static>> = LazyLock::new(|| Finder::new(b"\r\n."));

/// Octets held back because their meaning depends on the next chunk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Held {
    Nothing,
    /// A CR at the end of a chunk (it may start a CRLF).
    Cr,
    /// A `.` at a line start (terminator, or a stuffed dot).
    Dot,
    /// `.` CR at a line start.
    DotCr,
}

/// Turns a multi-line response body back into the message (RFC 1939 §3), strictly:
///
/// * only CRLF ends a line; a bare LF or bare CR is ordinary data;
/// * the terminator is a line of exactly `.` (`.\r\n` at a line start); the octets after
///   it are handed back as the "rest", and [`Unstuffer::done`] becomes true;
/// * any other line beginning with `.` loses that first `.`;
/// * the payload keeps its CRLF line ends (the CRLF before the terminator belongs to the
///   last message line);
/// * a `.` or `.\r` at a line start, or a CR, at the end of a chunk is held back until
///   the next chunk arrives.
///
/// ```
/// let mut u = pop3_wire::Unstuffer::new();
/// let (payload, rest) = u.feed(b"a\r\n..b\r\n.").unwrap();
/// assert_eq!((payload.as_slice(), rest), (&b"a\r\n.b\r\n"[..], None));
/// let (payload, rest) = u.feed(b"\r\n+OK next").unwrap();
/// assert_eq!((payload.as_slice(), rest), (&b""[..], Some(&b"+OK next"[..])));
/// assert!(u.done());
/// ```
#[derive(Debug, Clone)]
pub struct Unstuffer {
    line_start: bool,
    held: Held,
    done: bool,
}

impl Default for Unstuffer {
    fn default() -> Self {
        Unstuffer::new()
    }
}

impl Unstuffer {
    /// An unstuffer at the start of a multi-line body.
    pub fn new() -> Self {
        Unstuffer {
            line_start: true,
            held: Held::Nothing,
            done: false,
        }
    }

    /// True once the terminator line has been read.
    pub fn done(&self) -> bool {
        self.done
    }

    /// Appends the message octets of `data` to `out`. Returns `None` until the
    /// terminator is found, then `Some(rest)`: every octet of `data` after it.
    /// Fails with [`WireError::Finished`] once done.
    pub fn feed_into<'a>(
        &mut self,
        data: &'a [u8],
        out: &mut Vec<u8>,
    ) -> Result<Option<&'a [u8]>, WireError> {
        if self.done {
            return Err(WireError::Finished);
        }
        let len = data.len();
        if len == 0 {
            return Ok(None);
        }
        out.reserve(len + 1);
        let mut i = 0;
        match self.held {
            Held::Nothing => {}
            Held::Cr => {
                self.held = Held::Nothing;
                out.push(b'\r');
                if data[0] == b'\n' {
                    out.push(b'\n');
                    i = 1;
                    self.line_start = true;
                } else {
                    self.line_start = false;
                }
            }
            Held::Dot => {
                if data[0] == b'\r' {
                    if len == 1 {
                        self.held = Held::DotCr;
                        return Ok(None);
                    }
                    if data[1] == b'\n' {
                        return Ok(Some(self.terminate(&data[2..])));
                    }
                }
                // A stuffed dot: dropped.
                self.held = Held::Nothing;
                self.line_start = false;
            }
            Held::DotCr => {
                if data[0] == b'\n' {
                    return Ok(Some(self.terminate(&data[1..])));
                }
                // `.` and a bare CR: the dot is dropped, the CR is data.
                self.held = Held::Nothing;
                out.push(b'\r');
                self.line_start = false;
            }
        }
        // `data[run..i]` is checked input not yet written.
        let mut run = i;
        let finder = &*LINE_START_DOT;
        loop {
            if self.line_start {
                if i == len {
                    break;
                }
                if data[i] == b'.' {
                    out.extend_from_slice(&data[run..i]);
                    if i + 1 == len {
                        self.held = Held::Dot;
                        return Ok(None);
                    }
                    if data[i + 1] == b'\r' {
                        if i + 2 == len {
                            self.held = Held::DotCr;
                            return Ok(None);
                        }
                        if data[i + 2] == b'\n' {
                            return Ok(Some(self.terminate(&data[i + 3..])));
                        }
                    }
                    i += 1;
                    run = i;
                }
                self.line_start = false;
            }
            match finder.find(&data[i..]) {
                Some(k) => {
                    i += k + 2;
                    self.line_start = true;
                }
                None => break,
            }
        }
        // No line start with a dot in `data[i..]`; find out how the chunk ends.
        if !self.line_start {
            let tail = &data[i..];
            if tail.ends_with(b"\r\n") {
                self.line_start = true;
            } else if tail.ends_with(b"\r") {
                out.extend_from_slice(&data[run..len - 1]);
                self.held = Held::Cr;
                return Ok(None);
            }
        }
        out.extend_from_slice(&data[run..]);
        Ok(None)
    }

    /// The message octets of `data`, and `None` until the terminator is found, then
    /// `Some(rest)`: every octet of `data` after it. Fails with [`WireError::Finished`]
    /// once done.
    pub fn feed<'a>(&mut self, data: &'a [u8]) -> Result<(Vec<u8>, Option<&'a [u8]>), WireError> {
        let mut out = Vec::new();
        let rest = self.feed_into(data, &mut out)?;
        Ok((out, rest))
    }

    fn terminate<'a>(&mut self, rest: &'a [u8]) -> &'a [u8] {
        self.done = true;
        self.held = Held::Nothing;
        rest
    }
}

/// The whole-buffer [`Unstuffer`]: the message and the octets after the terminator.
/// Fails with [`WireError::MissingTerminator`] if there is no terminator.
pub fn unstuff(data: &[u8]) -> Result<(Vec<u8>, &[u8]), WireError> {
    let mut out = Vec::new();
    let rest = unstuff_into(data, &mut out)?;
    Ok((out, rest))
}

/// [`unstuff`], appending the message to `out` (a buffer the caller may reuse) and
/// returning the octets after the terminator. On [`WireError::MissingTerminator`], `out`
/// holds what was unstuffed before the end of `data`.
pub fn unstuff_into<'a>(data: &'a [u8], out: &mut Vec<u8>) -> Result<&'a [u8], WireError> {
    Unstuffer::new()
        .feed_into(data, out)?
        .ok_or(WireError::MissingTerminator)
}
