//! docs/wire.md, rule by rule, against the public API, plus comparisons with naive
//! reference implementations under every chunking of short inputs and random chunkings
//! of random inputs.

use pop3_wire::{stuff, unstuff, wire_size, DotStuffer, SizeCounter, Unstuffer, WireError};

// ---------------------------------------------------------------- reference models

/// Lines by the stuffer's rules: (content, has a line end).
fn ref_lines(m: &[u8]) -> Vec<(Vec<u8>, bool)> {
    let mut lines = Vec::new();
    let mut cur = Vec::new();
    let mut i = 0;
    while i < m.len() {
        match m[i] {
            b'\r' => {
                lines.push((std::mem::take(&mut cur), true));
                if m.get(i + 1) == Some(&b'\n') {
                    i += 1;
                }
            }
            b'\n' => lines.push((std::mem::take(&mut cur), true)),
            b => cur.push(b),
        }
        i += 1;
    }
    if !cur.is_empty() {
        lines.push((cur, false));
    }
    lines
}

fn ref_stuff(m: &[u8], top: Option<u64>) -> Vec<u8> {
    let mut lines = ref_lines(m);
    if let Some(n) = top {
        if let Some(h) = lines.iter().position(|(l, end)| l.is_empty() && *end) {
            lines.truncate((h + 1).saturating_add(n as usize).min(lines.len()));
        }
    }
    let mut out = Vec::new();
    for (l, _) in lines {
        if l.first() == Some(&b'.') {
            out.push(b'.');
        }
        out.extend_from_slice(&l);
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b".\r\n");
    out
}

/// The size rule: every line with its line end made CRLF; a last line without a line
/// end counts without one (the CRLF the stuffer adds before the terminator is not part
/// of the message).
fn ref_size(m: &[u8]) -> u64 {
    ref_lines(m)
        .iter()
        .map(|(l, end)| l.len() as u64 + if *end { 2 } else { 0 })
        .sum()
}

/// 2 if the stuffer must add a CRLF before the terminator (no final line end), else 0.
fn closing_crlf(m: &[u8]) -> u64 {
    match ref_lines(m).last() {
        Some((_, false)) => 2,
        _ => 0,
    }
}

fn ref_unstuff(d: &[u8]) -> Option<(Vec<u8>, Vec<u8>)> {
    let mut out = Vec::new();
    let mut pos = 0;
    loop {
        let e = pos + d[pos..].windows(2).position(|w| w == b"\r\n")?;
        let line = &d[pos..e];
        if line == b"." {
            return Some((out, d[e + 2..].to_vec()));
        }
        out.extend_from_slice(line.strip_prefix(b".").unwrap_or(line));
        out.extend_from_slice(b"\r\n");
        pos = e + 2;
    }
}

// ---------------------------------------------------------------- streaming drivers

fn stuff_chunks(chunks: &[&[u8]], top: Option<u64>) -> Vec<u8> {
    let mut s = DotStuffer::new(top);
    let mut out = Vec::new();
    for c in chunks {
        out.extend(s.feed(c).unwrap());
    }
    out.extend(s.finish().unwrap());
    out
}

/// As a server that sends a chunk as it is whenever `feed_verbatim` allows.
/// Returns the output and how many chunks went verbatim.
fn stuff_chunks_verbatim(chunks: &[&[u8]], top: Option<u64>) -> (Vec<u8>, usize) {
    let mut s = DotStuffer::new(top);
    let mut out = Vec::new();
    let mut verbatim = 0;
    for c in chunks {
        if s.feed_verbatim(c) {
            out.extend_from_slice(c);
            verbatim += 1;
        } else {
            out.extend(s.feed(c).unwrap());
        }
    }
    out.extend(s.finish().unwrap());
    (out, verbatim)
}

fn size_chunks(chunks: &[&[u8]]) -> u64 {
    let mut c = SizeCounter::new();
    for ch in chunks {
        c.feed(ch).unwrap();
    }
    c.finish().unwrap()
}

/// (payload, rest) or None without a terminator. Octets after the terminator in later
/// chunks belong to the rest too.
fn unstuff_chunks(chunks: &[&[u8]]) -> Option<(Vec<u8>, Vec<u8>)> {
    let mut u = Unstuffer::new();
    let mut out = Vec::new();
    let mut rest: Option<Vec<u8>> = None;
    for c in chunks {
        match &mut rest {
            Some(r) => r.extend_from_slice(c),
            None => {
                let (p, r) = u.feed(c).unwrap();
                out.extend(p);
                if let Some(r) = r {
                    assert!(u.done());
                    rest = Some(r.to_vec());
                }
            }
        }
    }
    rest.map(|r| (out, r))
}

/// Every way to cut `data` into at most three chunks.
fn for_all_chunkings(data: &[u8], mut f: impl FnMut(&[&[u8]])) {
    f(&[data]);
    let bytes: Vec<&[u8]> = data.chunks(1).collect();
    f(&bytes);
    for i in 0..=data.len() {
        for j in i..=data.len() {
            f(&[&data[..i], &data[i..j], &data[j..]]);
        }
    }
}

fn check_stuff(m: &[u8], top: Option<u64>, expected: &[u8]) {
    assert_eq!(
        ref_stuff(m, top),
        expected,
        "reference model disagrees on {m:?}"
    );
    assert_eq!(stuff(m, top), expected, "stuff({m:?}, {top:?})");
    for_all_chunkings(m, |chunks| {
        assert_eq!(stuff_chunks(chunks, top), expected, "{chunks:?}, {top:?}");
    });
}

fn check_unstuff(d: &[u8], expected: Option<(&[u8], &[u8])>) {
    let expected = expected.map(|(p, r)| (p.to_vec(), r.to_vec()));
    assert_eq!(
        ref_unstuff(d),
        expected,
        "reference model disagrees on {d:?}"
    );
    match &expected {
        Some((p, r)) => {
            let (gp, gr) = unstuff(d).unwrap();
            assert_eq!((&gp, gr), (p, &r[..]), "unstuff({d:?})");
        }
        None => assert_eq!(unstuff(d), Err(WireError::MissingTerminator)),
    }
    for_all_chunkings(d, |chunks| {
        assert_eq!(unstuff_chunks(chunks), expected, "{chunks:?}");
    });
}

// ---------------------------------------------------------------- DotStuffer rules

#[test]
fn crlf_stays_crlf() {
    check_stuff(b"a\r\nb\r\n", None, b"a\r\nb\r\n.\r\n");
}

#[test]
fn bare_lf_becomes_crlf() {
    check_stuff(b"a\nb\n\n", None, b"a\r\nb\r\n\r\n.\r\n");
}

#[test]
fn bare_cr_becomes_crlf() {
    check_stuff(b"a\rb\r", None, b"a\r\nb\r\n.\r\n");
    check_stuff(b"\r", None, b"\r\n.\r\n");
}

#[test]
fn cr_cr_lf_is_two_line_ends() {
    check_stuff(b"a\r\r\nb", None, b"a\r\n\r\nb\r\n.\r\n");
    check_stuff(b"\r\r\r\n\n\r", None, b"\r\n\r\n\r\n\r\n\r\n.\r\n");
}

#[test]
fn leading_dots_are_doubled() {
    check_stuff(b".", None, b"..\r\n.\r\n");
    check_stuff(
        b".a\r\n..b\r\nc.d\r\n.\r\n",
        None,
        b"..a\r\n...b\r\nc.d\r\n..\r\n.\r\n",
    );
    check_stuff(b"x\n.y\r.z\r\n.", None, b"x\r\n..y\r\n..z\r\n..\r\n.\r\n");
}

#[test]
fn dot_at_chunk_boundary_is_stuffed() {
    // Twisted's per-chunk stuffing bug: "at line start" must carry over.
    assert_eq!(stuff_chunks(&[b"a\r\n", b".b"], None), b"a\r\n..b\r\n.\r\n");
    assert_eq!(stuff_chunks(&[b"a\r", b"\n.b"], None), b"a\r\n..b\r\n.\r\n");
    assert_eq!(stuff_chunks(&[b"a\r", b".b"], None), b"a\r\n..b\r\n.\r\n");
    assert_eq!(
        stuff_chunks(&[b"a\n", b"", b".b"], None),
        b"a\r\n..b\r\n.\r\n"
    );
    assert_eq!(
        stuff_chunks(&[b".", b".", b"\n."], None),
        b"...\r\n..\r\n.\r\n"
    );
    // A dot that is not at a line start is left alone at a boundary too.
    assert_eq!(stuff_chunks(&[b"a", b".b"], None), b"a.b\r\n.\r\n");
}

#[test]
fn cr_at_chunk_end_is_held_back() {
    let mut s = DotStuffer::new(None);
    assert_eq!(s.feed(b"abc\r").unwrap(), b"abc");
    assert_eq!(s.feed(b"\n").unwrap(), b"\r\n");
    assert_eq!(s.feed(b"x\r").unwrap(), b"x");
    assert_eq!(s.feed(b"\r").unwrap(), b"\r\n");
    assert_eq!(s.feed(b"").unwrap(), b"");
    assert_eq!(s.feed(b"y").unwrap(), b"\r\ny");
    assert_eq!(s.feed(b"\r").unwrap(), b"");
    assert_eq!(s.finish().unwrap(), b"\r\n.\r\n");
}

#[test]
fn finish_adds_crlf_only_when_needed() {
    check_stuff(b"abc", None, b"abc\r\n.\r\n");
    check_stuff(b"abc\r\n", None, b"abc\r\n.\r\n");
    check_stuff(b"abc\n", None, b"abc\r\n.\r\n");
}

#[test]
fn empty_message() {
    check_stuff(b"", None, b".\r\n");
    check_stuff(b"", Some(0), b".\r\n");
    check_stuff(b"", Some(3), b".\r\n");
}

#[test]
fn no_feed_after_finish() {
    let mut s = DotStuffer::new(None);
    assert!(!s.is_finished());
    s.finish().unwrap();
    assert!(s.is_finished());
    assert_eq!(s.feed(b"x"), Err(WireError::Finished));
    assert_eq!(s.finish(), Err(WireError::Finished));
    let mut c = SizeCounter::new();
    c.finish().unwrap();
    assert_eq!(c.feed(b"x"), Err(WireError::Finished));
}

// ---------------------------------------------------------------- TOP cut

const MSG: &[u8] = b"From: a\r\nSubject: b\r\n\r\nline 1\r\n.line 2\r\nline 3\r\n";

#[test]
fn top_zero_sends_header_and_blank_line() {
    check_stuff(MSG, Some(0), b"From: a\r\nSubject: b\r\n\r\n.\r\n");
}

#[test]
fn top_n_sends_n_body_lines() {
    check_stuff(
        MSG,
        Some(1),
        b"From: a\r\nSubject: b\r\n\r\nline 1\r\n.\r\n",
    );
    check_stuff(
        MSG,
        Some(2),
        b"From: a\r\nSubject: b\r\n\r\nline 1\r\n..line 2\r\n.\r\n",
    );
}

#[test]
fn top_with_fewer_body_lines_sends_whole() {
    let whole = b"From: a\r\nSubject: b\r\n\r\nline 1\r\n..line 2\r\nline 3\r\n.\r\n";
    check_stuff(MSG, Some(3), whole);
    check_stuff(MSG, Some(4), whole);
    check_stuff(MSG, Some(u64::MAX), whole);
    check_stuff(b"H: 1\n\nbody", Some(5), b"H: 1\r\n\r\nbody\r\n.\r\n");
}

#[test]
fn top_without_empty_line_is_all_header() {
    check_stuff(b"A: 1\r\nB: 2\r\nC", Some(0), b"A: 1\r\nB: 2\r\nC\r\n.\r\n");
}

#[test]
fn top_counts_normalised_lines() {
    // Bare LF and bare CR end header and body lines too.
    check_stuff(
        b"A: 1\n\nb1\rb2\r\nb3\n",
        Some(2),
        b"A: 1\r\n\r\nb1\r\nb2\r\n.\r\n",
    );
    check_stuff(b"A: 1\r\rb1\r\r\n", Some(1), b"A: 1\r\n\r\nb1\r\n.\r\n");
    check_stuff(b"A: 1\r\n\rb1\r\n", Some(0), b"A: 1\r\n\r\n.\r\n");
    // An empty first line is an empty header.
    check_stuff(b"\r\nbody\r\nmore\r\n", Some(1), b"\r\nbody\r\n.\r\n");
}

#[test]
fn top_done_ignores_later_input() {
    let mut s = DotStuffer::new(Some(1));
    assert_eq!(s.feed(b"H: x\r\n\r\nb1\r").unwrap(), b"H: x\r\n\r\nb1");
    assert!(!s.done());
    assert_eq!(s.feed(b"\nb2\r\n").unwrap(), b"\r\n");
    assert!(s.done());
    assert_eq!(s.feed(b".more\r\n").unwrap(), b"");
    assert_eq!(s.finish().unwrap(), b".\r\n");
    // A held-back CR followed by something else completes the cut too.
    let mut s = DotStuffer::new(Some(0));
    assert_eq!(s.feed(b"H: x\r\n\r").unwrap(), b"H: x\r\n");
    assert_eq!(s.feed(b"body").unwrap(), b"\r\n");
    assert!(s.done());
    assert_eq!(s.finish().unwrap(), b".\r\n");
}

// ---------------------------------------------------------------- size

#[test]
fn size_rules() {
    let cases: &[(&[u8], u64)] = &[
        (b"", 0),
        // No final line end: the CRLF sent before the terminator is not counted.
        (b"a", 1),
        (b".", 1),
        (b"a\r\nb", 4),
        (b"a\nb", 4),
        (b"Subject: x\r\n\r\nlast line", 23),
        (b"Subject: x\n\nlast line", 23),
        (b"a\r\n", 3),
        (b"a\n", 3),
        // A bare CR is a line end and goes out as CRLF: it counts 2 (unlike Dovecot).
        (b"a\r", 3),
        (b"a\rb", 4),
        (b"\r\r\n", 4),
        (b".\r\n..\r\n", 7),
        (MSG, MSG.len() as u64),
    ];
    for &(m, size) in cases {
        assert_eq!(wire_size(m), size, "{m:?}");
        assert_eq!(ref_size(m), size, "{m:?}");
        for_all_chunkings(m, |chunks| {
            assert_eq!(size_chunks(chunks), size, "{chunks:?}")
        });
    }
}

// ---------------------------------------------------------------- Unstuffer rules

#[test]
fn unstuff_basic() {
    check_unstuff(b".\r\n", Some((b"", b"")));
    check_unstuff(b"a\r\nb\r\n.\r\n", Some((b"a\r\nb\r\n", b"")));
    check_unstuff(b"a\r\n.\r\n+OK", Some((b"a\r\n", b"+OK")));
    check_unstuff(b"a\r\n.\r\n.\r\n", Some((b"a\r\n", b".\r\n")));
}

#[test]
fn unstuff_removes_one_leading_dot() {
    check_unstuff(
        b"..\r\n...x\r\n.y.\r\n.\r\n",
        Some((b".\r\n..x\r\ny.\r\n", b"")),
    );
    // "." then a bare LF or bare CR is a stuffed line, not the terminator.
    check_unstuff(b".\n.\r\n.\r\n", Some((b"\n.\r\n", b"")));
    check_unstuff(b".\n.\r\n", None);
    check_unstuff(b".\rx\r\n.\r\n", Some((b"\rx\r\n", b"")));
    check_unstuff(b".\r\r\n.\r\n", Some((b"\r\r\n", b"")));
}

#[test]
fn unstuff_is_strict_about_crlf() {
    // Bare LF / bare CR end nothing: the octet after them does not begin a line.
    check_unstuff(b"a\n.\nb\r\n.\r\n", Some((b"a\n.\nb\r\n", b"")));
    check_unstuff(b"a\n.\r\n.\r\n", Some((b"a\n.\r\n", b"")));
    check_unstuff(b"a\r.\r\n.\r\n", Some((b"a\r.\r\n", b"")));
    check_unstuff(b"a\n.\r\n", None);
    check_unstuff(b"a\r\r\n.\r\n", Some((b"a\r\r\n", b"")));
}

#[test]
fn unstuff_without_terminator() {
    check_unstuff(b"", None);
    check_unstuff(b"abc\r\n", None);
    check_unstuff(b".", None);
    check_unstuff(b".\r", None);
    check_unstuff(b"a\r\n.", None);
    check_unstuff(b"a\r\n.\r", None);
    check_unstuff(b"a\r\n.x\r\n", None);
}

#[test]
fn unstuff_holds_back_undecided_octets() {
    let mut u = Unstuffer::new();
    assert_eq!(u.feed(b"ab\r").unwrap(), (b"ab".to_vec(), None));
    assert_eq!(u.feed(b"\n").unwrap(), (b"\r\n".to_vec(), None));
    assert_eq!(u.feed(b".").unwrap(), (b"".to_vec(), None));
    assert_eq!(u.feed(b".").unwrap(), (b".".to_vec(), None));
    assert_eq!(u.feed(b"\r").unwrap(), (b"".to_vec(), None));
    assert_eq!(u.feed(b"x").unwrap(), (b"\rx".to_vec(), None));
    assert_eq!(u.feed(b"\r\n.").unwrap(), (b"\r\n".to_vec(), None));
    assert_eq!(u.feed(b"\r").unwrap(), (b"".to_vec(), None));
    assert_eq!(u.feed(b"y").unwrap(), (b"\ry".to_vec(), None));
    assert_eq!(u.feed(b"\r\n").unwrap(), (b"\r\n".to_vec(), None));
    assert_eq!(u.feed(b"").unwrap(), (b"".to_vec(), None));
    assert!(!u.done());
    assert_eq!(u.feed(b".\r").unwrap(), (b"".to_vec(), None));
    assert_eq!(
        u.feed(b"\nrest\r\n").unwrap(),
        (b"".to_vec(), Some(&b"rest\r\n"[..]))
    );
    assert!(u.done());
    assert_eq!(u.feed(b"more"), Err(WireError::Finished));
    assert_eq!(u.feed(b""), Err(WireError::Finished));
}

#[test]
fn unstuff_rest_may_be_empty() {
    let mut u = Unstuffer::new();
    assert_eq!(
        u.feed(b"x\r\n.\r\n").unwrap(),
        (b"x\r\n".to_vec(), Some(&b""[..]))
    );
}

// ---------------------------------------------------------------- properties

/// xorshift64*: deterministic, dependency-free.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    fn message(&mut self, max_len: usize) -> Vec<u8> {
        const ALPHABET: &[u8] = b"..\r\r\n\n\r\nab \0\xff";
        let len = self.below(max_len + 1);
        (0..len)
            .map(|_| ALPHABET[self.below(ALPHABET.len())])
            .collect()
    }
    fn chunks<'a>(&mut self, data: &'a [u8]) -> Vec<&'a [u8]> {
        let mut out = Vec::new();
        let mut rest = data;
        while !rest.is_empty() {
            let n = self.below(rest.len().min(8) + 1);
            out.push(&rest[..n]);
            rest = &rest[n..];
        }
        out
    }
}

#[test]
fn exhaustive_short_messages_match_reference() {
    // Every message of up to 5 octets over the interesting alphabet, all chunkings.
    const A: &[u8] = b".\r\na";
    let mut m = Vec::new();
    fn rec(m: &mut Vec<u8>, depth: usize) {
        for top in [None, Some(0), Some(1), Some(2)] {
            let want = ref_stuff(m, top);
            for_all_chunkings(m, |c| {
                assert_eq!(stuff_chunks(c, top), want, "{c:?} {top:?}");
                assert_eq!(stuff_chunks_verbatim(c, top).0, want, "{c:?} {top:?}");
            });
        }
        let size = ref_size(m);
        for_all_chunkings(m, |c| assert_eq!(size_chunks(c), size, "{c:?}"));
        let want = ref_unstuff(m);
        for_all_chunkings(m, |c| assert_eq!(unstuff_chunks(c), want, "{c:?}"));
        if depth == 5 {
            return;
        }
        for &b in A {
            m.push(b);
            rec(m, depth + 1);
            m.pop();
        }
    }
    rec(&mut m, 0);
}

#[test]
fn random_messages_match_reference() {
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    for _ in 0..20_000 {
        let m = rng.message(60);
        let top = match rng.below(4) {
            0 => None,
            n => Some(rng.below(4 * n) as u64),
        };
        let chunks = rng.chunks(&m);
        assert_eq!(
            stuff_chunks(&chunks, top),
            ref_stuff(&m, top),
            "{chunks:?} {top:?}"
        );
        assert_eq!(size_chunks(&chunks), ref_size(&m), "{chunks:?}");
        assert_eq!(unstuff_chunks(&chunks), ref_unstuff(&m), "{chunks:?}");
    }
}

#[test]
fn stuff_unstuff_round_trip_and_size() {
    let mut rng = Rng(42);
    for _ in 0..20_000 {
        let m = rng.message(80);
        let wire = stuff(&m, None);
        let stuffed_dots = ref_lines(&m)
            .iter()
            .filter(|(l, _)| l.first() == Some(&b'.'))
            .count();
        let (payload, rest) = unstuff(&wire).unwrap();
        assert!(rest.is_empty());
        let closing = closing_crlf(&m);
        assert_eq!(wire_size(&m) + closing, payload.len() as u64, "{m:?}");
        assert_eq!(
            wire_size(&m) + closing,
            (wire.len() - 3 - stuffed_dots) as u64
        );
        // The payload is the message with every line end made CRLF.
        let mut normal = Vec::new();
        for (l, _) in ref_lines(&m) {
            normal.extend_from_slice(&l);
            normal.extend_from_slice(b"\r\n");
        }
        assert_eq!(payload, normal);
        // Streaming the wire form back in random chunks gives the same.
        let mut tail = wire.clone();
        tail.extend_from_slice(b"+OK");
        let chunks = rng.chunks(&tail);
        assert_eq!(unstuff_chunks(&chunks), Some((normal, b"+OK".to_vec())));
    }
}

#[test]
fn large_message_round_trip() {
    let mut m = Vec::new();
    for i in 0..50_000u32 {
        if i % 7 == 0 {
            m.push(b'.');
        }
        m.extend_from_slice(format!("line {i} of a large message").as_bytes());
        m.extend_from_slice(match i % 5 {
            0 => b"\n",
            1 => b"\r",
            _ => b"\r\n",
        });
    }
    let want = ref_stuff(&m, None);
    assert_eq!(stuff(&m, None), want);
    for size in [1, 2, 3, 7, 64, 4096, 65536] {
        let chunks: Vec<&[u8]> = m.chunks(size).collect();
        assert_eq!(stuff_chunks(&chunks, None), want, "chunk size {size}");
        let chunks: Vec<&[u8]> = want.chunks(size).collect();
        let (payload, rest) = unstuff_chunks(&chunks).unwrap();
        assert!(rest.is_empty());
        assert_eq!(payload.len() as u64, wire_size(&m) + closing_crlf(&m));
    }
}

/// Long, mostly clean messages with sparse line ends and dots: exercises the
/// block-skipping fast path of the stuffer (64-octet blocks) and its edges.
#[test]
fn random_long_messages_match_reference() {
    let mut rng = Rng(0xD1B5_4A32_D192_ED03);
    for round in 0..3_000 {
        let len = rng.below(700);
        let density = 1 + rng.below(120);
        let mut m = Vec::with_capacity(len);
        for _ in 0..len {
            if rng.below(density) == 0 {
                const SPECIAL: &[u8] = b".\r\n\r\n\r\n.";
                m.push(SPECIAL[rng.below(SPECIAL.len())]);
            } else if rng.below(3) == 0 {
                // CRLF-heavy content, as real mail is.
                m.extend_from_slice(b"\r\n");
            } else {
                m.push(b'x');
            }
        }
        let top = if round % 4 == 0 {
            Some(rng.below(10) as u64)
        } else {
            None
        };
        let want = ref_stuff(&m, top);
        assert_eq!(stuff(&m, top), want, "{m:?} {top:?}");
        let mut chunks = Vec::new();
        let mut rest = &m[..];
        while !rest.is_empty() {
            let n = rng.below(rest.len().min(300) + 1);
            chunks.push(&rest[..n]);
            rest = &rest[n..];
        }
        assert_eq!(stuff_chunks(&chunks, top), want, "{chunks:?} {top:?}");
        assert_eq!(
            stuff_chunks_verbatim(&chunks, top).0,
            want,
            "{chunks:?} {top:?}"
        );
        assert_eq!(size_chunks(&chunks), ref_size(&m), "{chunks:?}");
        assert_eq!(wire_size(&m), ref_size(&m));
        let wire = ref_stuff(&m, None);
        assert_eq!(
            unstuff(&wire).unwrap().0.len() as u64,
            ref_size(&m) + closing_crlf(&m)
        );
    }
}

/// Mail stored in the wire form (CRLF, no dot lines) goes out verbatim in every chunk,
/// whatever the chunk size; one dot line or bare LF sends only its chunk the long way.
#[test]
fn wire_form_chunks_go_verbatim() {
    let mut m = Vec::new();
    for i in 0..20_000u32 {
        m.extend_from_slice(format!("line {i} of a message in the wire form\r\n").as_bytes());
    }
    let want = ref_stuff(&m, None);
    for size in [1, 63, 64, 65, 100, 4096, 65536] {
        let chunks: Vec<&[u8]> = m.chunks(size).collect();
        let (out, verbatim) = stuff_chunks_verbatim(&chunks, None);
        assert_eq!(out, want, "chunk size {size}");
        // A chunk that ends inside a CRLF (with its CR) must take the long way, and
        // so must the chunk after it (the held CR).
        let split = chunks.iter().filter(|c| c.last() == Some(&b'\r')).count();
        assert!(
            verbatim + 2 * split >= chunks.len(),
            "chunk size {size}: {verbatim}"
        );
        if size >= 64 {
            assert!(
                verbatim * 10 >= chunks.len() * 9,
                "chunk size {size}: {verbatim}"
            );
        }
    }
    let mut dotted = m.clone();
    dotted[70_000..70_002].copy_from_slice(b"\r\n");
    let pos = dotted[70_002..].iter().position(|&b| b == b'\n').unwrap() + 70_003;
    dotted[pos] = b'.';
    let chunks: Vec<&[u8]> = dotted.chunks(65536).collect();
    let (out, verbatim) = stuff_chunks_verbatim(&chunks, None);
    assert_eq!(out, ref_stuff(&dotted, None));
    assert_eq!(verbatim, chunks.len() - 1);
    // With a TOP cut nothing goes verbatim (lines must be counted).
    let chunks: Vec<&[u8]> = m.chunks(65536).collect();
    assert_eq!(stuff_chunks_verbatim(&chunks, Some(5)).1, 0);
}
