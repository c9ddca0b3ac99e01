//! Reading a multi-line reply body with `pop3_wire::Unstuffer` (docs/wire.md,
//! "Unstuffer": only CRLF ends a line, the terminator is exactly `.` CRLF at a line
//! start, any other line that begins with `.` loses that dot), plus what the load
//! generator's checks need: how many octets of a chunk the body took (the rest is the
//! next pipelined reply), the payload length, and the shape of the payload's last line.

use pop3_wire::Unstuffer;

/// The last two LFs of a payload, to judge its last line without keeping the payload.
#[derive(Debug, Default, Clone)]
struct LastLines {
    len: u64,
    last_octet: Option<u8>,
    /// The latest LF first: (offset in the payload, preceded by CR).
    lf: [Option<(u64, bool)>; 2],
}

impl LastLines {
    fn push(&mut self, seg: &[u8]) {
        let mut found = [None, None];
        let mut k = 0;
        let mut end = seg.len();
        while k < 2 {
            let Some(i) = memchr::memrchr(b'\n', &seg[..end]) else {
                break;
            };
            let cr = match i {
                0 => self.last_octet == Some(b'\r'),
                _ => seg[i - 1] == b'\r',
            };
            found[k] = Some((self.len + i as u64, cr));
            end = i;
            k += 1;
        }
        match k {
            2 => self.lf = found,
            1 => self.lf = [found[0], self.lf[0]],
            _ => {}
        }
        if let Some(&b) = seg.last() {
            self.last_octet = Some(b);
        }
        self.len += seg.len() as u64;
    }

    /// True if the payload can be a message without a final line end plus the CRLF a
    /// server adds before the terminator: it ends with CRLF, and the line that CRLF
    /// ends is not empty and holds no LF (an LF would have ended the stored line,
    /// for pypop and Dovecot alike).
    fn may_lack_final_line_end(&self) -> bool {
        let n = self.len;
        match self.lf {
            [Some((p1, true)), None] => n >= 3 && p1 == n - 1,
            [Some((p1, true)), Some((p2, true))] => p1 == n - 1 && p2 + 3 < n,
            _ => false,
        }
    }
}

/// One multi-line body, fed chunk by chunk.
#[derive(Debug, Default)]
pub struct BodyReader {
    u: Unstuffer,
    last: LastLines,
}

impl BodyReader {
    pub fn new() -> Self {
        Self::default()
    }

    /// True once the terminator has been read.
    pub fn done(&self) -> bool {
        self.u.done()
    }

    /// Unstuffed payload octets so far (stuffing dots and terminator excluded).
    pub fn payload_len(&self) -> u64 {
        self.last.len
    }

    /// See [`LastLines::may_lack_final_line_end`]; meaningful once done.
    pub fn may_lack_final_line_end(&self) -> bool {
        self.last.may_lack_final_line_end()
    }

    /// Feeds `data` and appends its payload octets to `out`. Returns how many octets
    /// of `data` belong to the body: all of them before the terminator, up to and
    /// including it after. Nothing is taken once done.
    pub fn feed(&mut self, data: &[u8], out: &mut Vec<u8>) -> usize {
        if self.u.done() {
            return 0;
        }
        let start = out.len();
        let rest = self
            .u
            .feed_into(data, out)
            .expect("an Unstuffer that is not done accepts input");
        self.last.push(&out[start..]);
        data.len() - rest.map_or(0, <[u8]>::len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// (payload, done, octets not taken, may lack a final line end), with the payload
    /// collected into one buffer or discarded chunk by chunk as the RETR check does.
    fn run(chunks: &[&[u8]]) -> (Vec<u8>, bool, Vec<u8>, bool) {
        let mut r = BodyReader::new();
        let mut out = Vec::new();
        let mut rest = Vec::new();
        let mut discard = BodyReader::new();
        let mut scratch = Vec::new();
        for c in chunks {
            let n = r.feed(c, &mut out);
            rest.extend_from_slice(&c[n..]);
            scratch.clear();
            assert_eq!(discard.feed(c, &mut scratch), n);
        }
        assert_eq!(r.payload_len(), out.len() as u64);
        assert_eq!(discard.payload_len(), out.len() as u64);
        assert_eq!(discard.done(), r.done());
        let lacks = r.may_lack_final_line_end();
        assert_eq!(discard.may_lack_final_line_end(), lacks);
        (out, r.done(), rest, lacks)
    }

    fn all_splits(data: &[u8]) -> Vec<(Vec<u8>, bool, Vec<u8>, bool)> {
        let mut v = vec![run(&[data])];
        for k in 0..=data.len() {
            v.push(run(&[&data[..k], &data[k..]]));
            for j in k..=data.len() {
                v.push(run(&[&data[..k], &data[k..j], &data[j..]]));
            }
        }
        let bytes: Vec<&[u8]> = data.chunks(1).collect();
        v.push(run(&bytes));
        v
    }

    fn check(data: &[u8], payload: &[u8], done: bool, rest: &[u8]) -> bool {
        let all = all_splits(data);
        let lacks = all[0].3;
        for (p, d, r, l) in all {
            let shown = String::from_utf8_lossy(data);
            assert_eq!(p, payload, "payload for {shown:?}");
            assert_eq!(d, done, "done for {shown:?}");
            assert_eq!(r, rest, "rest for {shown:?}");
            assert_eq!(l, lacks, "last line for {shown:?}");
        }
        lacks
    }

    #[test]
    fn empty_body() {
        assert!(!check(b".\r\n", b"", true, b""));
        assert!(!check(b".\r\n+OK next", b"", true, b"+OK next"));
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

    #[test]
    fn last_line_that_may_lack_a_line_end() {
        // A non-empty last line without LF: the server may have added its CRLF.
        assert!(check(b"x\r\n.\r\n", b"x\r\n", true, b""));
        assert!(check(
            b"H: 1\r\n\r\nlast\r\n.\r\n+OK",
            b"H: 1\r\n\r\nlast\r\n",
            true,
            b"+OK"
        ));
        assert!(check(b"a\r\n..\r\n.\r\n", b"a\r\n.\r\n", true, b""));
        // Dovecot sends a bare CR as it is; it may sit in such a line.
        assert!(check(b"a\rb\r\n.\r\n", b"a\rb\r\n", true, b""));
        assert!(check(b"x\r\na\r\r\n.\r\n", b"x\r\na\r\r\n", true, b""));
    }

    #[test]
    fn last_line_that_cannot_lack_a_line_end() {
        // An empty last line: the stored message ended with a line end.
        assert!(!check(b"\r\n.\r\n", b"\r\n", true, b""));
        assert!(!check(b"H: 1\r\n\r\n.\r\n", b"H: 1\r\n\r\n", true, b""));
        // An LF in the last line ends a stored line: a line end was there.
        assert!(!check(b"a\nb\r\n.\r\n", b"a\nb\r\n", true, b""));
        assert!(!check(b"x\r\na\n\r\n.\r\n", b"x\r\na\n\r\n", true, b""));
        assert!(!check(b"\n\r\n.\r\n", b"\n\r\n", true, b""));
    }
}
