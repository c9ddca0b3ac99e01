//! stuff -> unstuff round trip under arbitrary chunkings: the client gets back the
//! message with every line end made CRLF (plus a final CRLF), never an early terminator,
//! and `wire_size` is that without the added final CRLF; chunked and one-shot calls
//! agree.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pop3_wire::{stuff, unstuff, wire_size, DotStuffer, SizeCounter, Unstuffer};

/// The first octet picks chunk sizes for the stuffer and the unstuffer; the rest is the
/// message.
fn split(data: &[u8], seed: u8) -> Vec<&[u8]> {
    let mut out = Vec::new();
    let mut rest = data;
    let mut s = seed as usize | 1;
    while !rest.is_empty() {
        s = (s * 37 + 11) % 251;
        let n = (s % 17).min(rest.len());
        out.push(&rest[..n]);
        rest = &rest[n..];
    }
    out
}

/// The message with every line end made CRLF, and whether a final CRLF was added.
fn normalise(m: &[u8]) -> (Vec<u8>, bool) {
    let mut out = Vec::with_capacity(m.len() + 2);
    let mut i = 0;
    while i < m.len() {
        match m[i] {
            b'\r' => {
                out.extend_from_slice(b"\r\n");
                if m.get(i + 1) == Some(&b'\n') {
                    i += 1;
                }
            }
            b'\n' => out.extend_from_slice(b"\r\n"),
            b => out.push(b),
        }
        i += 1;
    }
    let added = !out.is_empty() && !out.ends_with(b"\r\n");
    if added {
        out.extend_from_slice(b"\r\n");
    }
    (out, added)
}

fuzz_target!(|data: &[u8]| {
    let Some((&seed, message)) = data.split_first() else {
        return;
    };
    let whole = stuff(message, None);

    let mut s = DotStuffer::new(None);
    let mut c = SizeCounter::new();
    let mut wire = Vec::new();
    for chunk in split(message, seed) {
        s.feed_into(chunk, &mut wire).unwrap();
        c.feed(chunk).unwrap();
    }
    s.finish_into(&mut wire).unwrap();
    assert_eq!(wire, whole);

    let (expected, added) = normalise(message);
    let size = c.finish().unwrap();
    assert_eq!(size + if added { 2 } else { 0 }, expected.len() as u64);
    assert_eq!(wire_size(message), size);

    let (payload, rest) = unstuff(&wire).unwrap();
    assert_eq!(payload, expected);
    assert!(rest.is_empty());

    let mut u = Unstuffer::new();
    let mut payload = Vec::new();
    let mut done = false;
    for chunk in split(&wire, seed.wrapping_add(1)) {
        assert!(!done, "terminator before the end of the stuffed message");
        if let Some(rest) = u.feed_into(chunk, &mut payload).unwrap() {
            assert!(rest.is_empty());
            done = true;
        }
    }
    assert!(done && u.done());
    assert_eq!(payload, expected);

    // A TOP of any length is a prefix of the whole response, up to its terminator.
    let top = stuff(message, Some(u64::from(seed % 8)));
    assert!(whole[..whole.len() - 3].starts_with(&top[..top.len() - 3]));
});
