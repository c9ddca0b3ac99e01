//! Command-line framing (server side, lenient line ends).

use crate::{WireError, DEFAULT_MAX_LINE};

/// Splits a byte stream into command lines.
///
/// * A line ends at LF; one CR directly before the LF is part of the line end. Lines are
///   handed out without their line end. Any other CR, NUL or 8-bit octet stays in the line
///   (the command parser rejects it).
/// * `max_line` counts the whole line with its line end as received (RFC 2449 §4):
///   with the default 255, `"x" * 253 + "\r\n"` is a line and `"x" * 254 + "\r\n"` is not.
/// * An overlong line is reported once, as `None`, in order among the lines, as soon as
///   it is known: when `max_line` octets are buffered without an LF, or when an LF
///   completes a line that is too long. The rest of it, through its LF, is skipped without
///   being buffered.
/// * Each input octet is examined once, however the input is chunked.
///
/// ```
/// let mut f = pop3_wire::LineFramer::default();
/// let mut lines = Vec::new();
/// f.feed_with(b"USER a\r\nPA", |l| lines.push(l.map(<[u8]>::to_vec)));
/// f.feed_with(b"SS b\n", |l| lines.push(l.map(<[u8]>::to_vec)));
/// assert_eq!(lines, [Some(b"USER a".to_vec()), Some(b"PASS b".to_vec())]);
/// ```
#[derive(Debug, Clone)]
pub struct LineFramer {
    max_line: usize,
    buf: Vec<u8>,
    skipping: bool,
}

impl Default for LineFramer {
    /// A framer with the RFC 2449 limit, [`DEFAULT_MAX_LINE`].
    fn default() -> Self {
        LineFramer {
            max_line: DEFAULT_MAX_LINE,
            buf: Vec::new(),
            skipping: false,
        }
    }
}

impl LineFramer {
    /// A framer whose lines may be `max_line` octets long, line end included.
    /// Fails with [`WireError::MaxLineTooSmall`] below 2.
    pub fn new(max_line: usize) -> Result<Self, WireError> {
        if max_line < 2 {
            return Err(WireError::MaxLineTooSmall);
        }
        Ok(LineFramer {
            max_line,
            buf: Vec::new(),
            skipping: false,
        })
    }

    /// The line limit, line end included.
    pub fn max_line(&self) -> usize {
        self.max_line
    }

    /// Octets held for an incomplete line (0 while skipping an overlong one).
    pub fn buffered(&self) -> usize {
        self.buf.len()
    }

    /// Forgets buffered input and any overlong-skip state (used at STLS).
    pub fn clear(&mut self) {
        self.buf.clear();
        self.skipping = false;
    }

    /// Feeds a chunk; calls `emit` for every line it completes, in order: `Some(line)`
    /// without its line end, or `None` for an overlong line.
    pub fn feed_with<F>(&mut self, data: &[u8], mut emit: F)
    where
        F: FnMut(Option<&[u8]>),
    {
        let mut pos = 0;
        while pos < data.len() {
            let rest = &data[pos..];
            if self.skipping {
                match memchr::memchr(b'\n', rest) {
                    Some(i) => {
                        self.skipping = false;
                        pos += i + 1;
                        continue;
                    }
                    None => return,
                }
            }
            // Room left before the buffered part reaches `max_line` without an LF.
            let room = self.max_line - self.buf.len();
            // An LF at index < room completes a line of at most `max_line` octets.
            let window = &rest[..rest.len().min(room)];
            match memchr::memchr(b'\n', window) {
                Some(i) => {
                    let line: &[u8] = if self.buf.is_empty() {
                        &rest[..i]
                    } else {
                        self.buf.extend_from_slice(&rest[..i]);
                        &self.buf
                    };
                    let line = match line.split_last() {
                        Some((b'\r', head)) => head,
                        _ => line,
                    };
                    emit(Some(line));
                    self.buf.clear();
                    pos += i + 1;
                }
                None if rest.len() < room => {
                    self.buf.extend_from_slice(rest);
                    return;
                }
                None => {
                    // `max_line` octets without an LF: overlong, skip through the next LF.
                    emit(None);
                    self.buf.clear();
                    self.skipping = true;
                    pos += room;
                }
            }
        }
    }

    /// Feeds a chunk and returns the lines it completes (see [`LineFramer::feed_with`]).
    pub fn feed(&mut self, data: &[u8]) -> Vec<Option<Vec<u8>>> {
        let mut lines = Vec::new();
        self.feed_with(data, |line| lines.push(line.map(<[u8]>::to_vec)));
        lines
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(x: &[u8]) -> Option<Vec<u8>> {
        Some(x.to_vec())
    }

    /// Every split of `data` into two and three chunks gives `expected`.
    fn check_all_chunkings(max_line: usize, data: &[u8], expected: &[Option<Vec<u8>>]) {
        let whole = LineFramer::new(max_line).unwrap().feed(data);
        assert_eq!(whole, expected, "whole");
        let mut f = LineFramer::new(max_line).unwrap();
        let mut got = Vec::new();
        for b in data {
            got.extend(f.feed(std::slice::from_ref(b)));
        }
        assert_eq!(got, expected, "byte by byte");
        for i in 0..=data.len() {
            for j in i..=data.len() {
                let mut f = LineFramer::new(max_line).unwrap();
                let mut got = f.feed(&data[..i]);
                got.extend(f.feed(&data[i..j]));
                got.extend(f.feed(&data[j..]));
                assert_eq!(got, expected, "split at {i}, {j}");
            }
        }
    }

    #[test]
    fn line_ends() {
        check_all_chunkings(
            255,
            b"USER a\r\nPASS b\nQUIT\r\r\nX\rY\n\n\r\n",
            &[
                s(b"USER a"),
                s(b"PASS b"),
                s(b"QUIT\r"),
                s(b"X\rY"),
                s(b""),
                s(b""),
            ],
        );
    }

    #[test]
    fn nul_and_8bit_stay() {
        check_all_chunkings(255, b"A\0\xff\x80\r\n", &[s(b"A\0\xff\x80")]);
    }

    #[test]
    fn incomplete_line_is_buffered() {
        let mut f = LineFramer::default();
        assert!(f.feed(b"NOOP").is_empty());
        assert_eq!(f.buffered(), 4);
        assert!(f.feed(b"\r").is_empty());
        assert_eq!(f.buffered(), 5);
        assert_eq!(f.feed(b"\nST"), [s(b"NOOP")]);
        assert_eq!(f.buffered(), 2);
        f.clear();
        assert_eq!(f.buffered(), 0);
        assert_eq!(f.feed(b"AT\r\n"), [s(b"AT")]);
    }

    #[test]
    fn limit_counts_line_end() {
        let mut ok = vec![b'x'; 253];
        ok.extend_from_slice(b"\r\n");
        assert_eq!(ok.len(), 255);
        check_all_chunkings(255, &ok, &[s(&[b'x'; 253])]);

        let mut long = vec![b'x'; 254];
        long.extend_from_slice(b"\r\n");
        check_all_chunkings(255, &long, &[None]);

        let mut lf = vec![b'x'; 254];
        lf.push(b'\n');
        check_all_chunkings(255, &lf, &[s(&[b'x'; 254])]);
    }

    #[test]
    fn small_limits() {
        check_all_chunkings(2, b"\r\nx\n\n", &[s(b""), s(b"x"), s(b"")]);
        check_all_chunkings(2, b"xx\nA\r\n\n", &[None, None, s(b"")]);
        check_all_chunkings(3, b"ab\rc\nd\r\n", &[None, s(b"d")]);
    }

    #[test]
    fn overlong_reported_once_in_order() {
        let mut data = b"A\r\n".to_vec();
        data.extend_from_slice(&[b'y'; 600]);
        data.extend_from_slice(b"\r\nB\r\n");
        check_all_chunkings(10, &data, &[s(b"A"), None, s(b"B")]);
    }

    #[test]
    fn overlong_reported_when_limit_reached() {
        let mut f = LineFramer::new(10).unwrap();
        assert!(f.feed(b"123456789").is_empty());
        assert_eq!(f.buffered(), 9);
        assert_eq!(f.feed(b"0"), [None]);
        assert_eq!(f.buffered(), 0);
        assert!(f.feed(&[b'z'; 1000]).is_empty());
        assert_eq!(f.buffered(), 0);
        assert_eq!(f.feed(b"zz\nOK\r\n"), [s(b"OK")]);
        // Nine octets and a CR: the LF would make eleven.
        assert_eq!(f.feed(b"123456789\r"), [None]);
        assert_eq!(f.feed(b"\nX\n"), [s(b"X")]);
    }

    #[test]
    fn clear_drops_skip_state() {
        let mut f = LineFramer::new(4).unwrap();
        assert_eq!(f.feed(b"abcdef"), [None]);
        f.clear();
        assert_eq!(f.feed(b"ab\n"), [s(b"ab")]);
    }

    #[test]
    fn max_line_below_two_is_an_error() {
        assert_eq!(LineFramer::new(1).unwrap_err(), WireError::MaxLineTooSmall);
        assert_eq!(LineFramer::new(0).unwrap_err(), WireError::MaxLineTooSmall);
        assert_eq!(LineFramer::new(2).unwrap().max_line(), 2);
        assert_eq!(LineFramer::default().max_line(), 255);
    }

    #[test]
    fn many_lines_in_one_chunk() {
        let data = b"NOOP\r\n".repeat(10_000);
        let got = LineFramer::default().feed(&data);
        assert_eq!(got.len(), 10_000);
        assert!(got.iter().all(|l| l.as_deref() == Some(&b"NOOP"[..])));
    }
}
