//! A strict, counting POP3 multi-line body reader (RFC 1939 §3).
//!
//! This is the load generator's own minimal twin of `pop3_wire::Unstuffer`
//! (docs/wire.md, "Unstuffer"): only CRLF ends a line, the terminator is
//! exactly `.` CRLF at a line start, and any other line that begins with `.`
//! loses that dot. It reports how many octets of each chunk it consumed, so
//! that the octets after the terminator (the next pipelined reply) stay in the
//! caller's buffer, and it never copies the payload unless asked to.

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    /// At the first octet of a line.
    LineStart,
    /// Inside a line; `true` if the previous octet was CR.
    Mid(bool),
    /// Saw `.` at a line start.
    Dot,
    /// Saw `.` CR at a line start.
    DotCr,
    /// Terminator seen.
    Done,
}

#[derive(Debug)]
pub struct Unstuffer {
    state: State,
    /// Unstuffed payload octets so far (stuffing dots and terminator excluded).
    pub payload_len: u64,
}

impl Default for Unstuffer {
    fn default() -> Self {
        Self::new()
    }
}

impl Unstuffer {
    pub fn new() -> Self {
        Unstuffer {
            state: State::LineStart,
            payload_len: 0,
        }
    }

    pub fn done(&self) -> bool {
        self.state == State::Done
    }

    /// Feed octets; returns how many were consumed. Consumption stops right
    /// after the terminator. With `sink`, payload octets are appended to it.
    pub fn feed(&mut self, data: &[u8], mut sink: Option<&mut Vec<u8>>) -> usize {
        let mut i = 0;
        while i < data.len() {
            match self.state {
                State::Done => return i,
                State::LineStart => {
                    if data[i] == b'.' {
                        self.state = State::Dot;
                        i += 1;
                    } else {
                        self.state = State::Mid(false);
                    }
                }
                State::Dot => {
                    if data[i] == b'\r' {
                        self.state = State::DotCr;
                        i += 1;
                    } else {
                        // A stuffed dot: dropped; the octet is ordinary data.
                        self.state = State::Mid(false);
                    }
                }
                State::DotCr => {
                    if data[i] == b'\n' {
                        self.state = State::Done;
                        return i + 1;
                    }
                    // `.` CR <other>: the dot was stuffing, the CR is bare data.
                    self.emit(b"\r", &mut sink);
                    self.state = State::Mid(true);
                }
                State::Mid(prev_cr) => {
                    let rest = &data[i..];
                    match memchr::memchr(b'\n', rest) {
                        Some(p) => {
                            self.emit(&rest[..=p], &mut sink);
                            let crlf = if p > 0 { rest[p - 1] == b'\r' } else { prev_cr };
                            self.state = if crlf {
                                State::LineStart
                            } else {
                                State::Mid(false)
                            };
                            i += p + 1;
                        }
                        None => {
                            self.emit(rest, &mut sink);
                            self.state = State::Mid(rest[rest.len() - 1] == b'\r');
                            i = data.len();
                        }
                    }
                }
            }
        }
        i
    }

    #[inline]
    fn emit(&mut self, bytes: &[u8], sink: &mut Option<&mut Vec<u8>>) {
        self.payload_len += bytes.len() as u64;
        if let Some(v) = sink.as_deref_mut() {
            v.extend_from_slice(bytes);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(chunks: &[&[u8]]) -> (Vec<u8>, bool, Vec<u8>) {
        let mut u = Unstuffer::new();
        let mut out = Vec::new();
        let mut rest = Vec::new();
        for c in chunks {
            if u.done() {
                rest.extend_from_slice(c);
                continue;
            }
            let n = u.feed(c, Some(&mut out));
            rest.extend_from_slice(&c[n..]);
        }
        assert_eq!(u.payload_len, out.len() as u64);
        (out, u.done(), rest)
    }

    fn all_splits(data: &[u8]) -> Vec<(Vec<u8>, bool, Vec<u8>)> {
        let mut v = vec![run(&[data])];
        for k in 0..=data.len() {
            v.push(run(&[&data[..k], &data[k..]]));
        }
        let bytes: Vec<&[u8]> = data.chunks(1).collect();
        v.push(run(&bytes));
        v
    }

    fn check(data: &[u8], payload: &[u8], done: bool, rest: &[u8]) {
        for (p, d, r) in all_splits(data) {
            assert_eq!(
                p,
                payload,
                "payload for {:?}",
                String::from_utf8_lossy(data)
            );
            assert_eq!(d, done);
            assert_eq!(r, rest);
        }
    }

    #[test]
    fn empty_body() {
        check(b".\r\n", b"", true, b"");
        check(b".\r\n+OK next", b"", true, b"+OK next");
    }

    #[test]
    fn plain_and_stuffed() {
        check(b"a\r\n..b\r\n.\r\n", b"a\r\n.b\r\n", true, b"");
        check(b"..\r\n.\r\nX", b".\r\n", true, b"X");
        check(b".x\r\n.\r\n", b"x\r\n", true, b"");
    }

    #[test]
    fn strict_line_ends() {
        // Bare LF does not start a line: ".\r\n" after it is data, not the end.
        check(b"a\n.\r\n", b"a\n.\r\n", false, b"");
        check(b"a\r.\r\n", b"a\r.\r\n", false, b"");
        check(b"a\n.\r\n\r\n.\r\n", b"a\n.\r\n\r\n", true, b"");
        // `.` followed by a bare CR or LF loses its dot.
        check(b".\rx\r\n.\r\n", b"\rx\r\n", true, b"");
        check(b".\n\r\n.\r\n", b"\n\r\n", true, b"");
        check(b".\r\r\n.\r\n", b"\r\r\n", true, b"");
    }

    #[test]
    fn unterminated() {
        check(b"abc\r\n", b"abc\r\n", false, b"");
        check(b"abc\r\n.", b"abc\r\n", false, b"");
        check(b"abc\r\n.\r", b"abc\r\n", false, b"");
    }
}
