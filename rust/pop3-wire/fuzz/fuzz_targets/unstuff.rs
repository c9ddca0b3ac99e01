//! Unstuffer on arbitrary input (not only what the stuffer makes) under arbitrary
//! chunkings, against a per-line model of docs/wire.md: only CRLF ends a line, a line
//! of exactly "." ends the body, any other line loses one leading ".", octets whose
//! meaning depends on the next chunk are held back, the rest after the terminator is
//! handed back; `unstuff` agrees.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pop3_wire::{unstuff, Unstuffer, WireError};

/// The payload after `fed`, and the octets after the terminator (None before it).
fn model(fed: &[u8]) -> (Vec<u8>, Option<Vec<u8>>) {
    let mut out = Vec::new();
    let mut pos = 0;
    while let Some(k) = fed[pos..].windows(2).position(|w| w == b"\r\n") {
        let line = &fed[pos..pos + k];
        if line == b"." {
            return (out, Some(fed[pos + k + 2..].to_vec()));
        }
        out.extend_from_slice(line.strip_prefix(b".").unwrap_or(line));
        out.extend_from_slice(b"\r\n");
        pos += k + 2;
    }
    // An incomplete line: "." and ".\r" may still be the terminator, a final CR may
    // start a CRLF; both are held back.
    let mut tail = &fed[pos..];
    if tail == b"." || tail == b".\r" {
        tail = b"";
    } else if let Some(t) = tail.strip_suffix(b"\r") {
        tail = t;
    }
    out.extend_from_slice(tail.strip_prefix(b".").unwrap_or(tail));
    (out, None)
}

fn split(data: &[u8], seed: u8) -> Vec<&[u8]> {
    let mut out = Vec::new();
    let mut rest = data;
    let mut s = usize::from(seed) | 1;
    while !rest.is_empty() {
        s = (s * 37 + 11) % 251;
        let n = (s % 19).min(rest.len());
        out.push(&rest[..n]);
        rest = &rest[n..];
    }
    out
}

fuzz_target!(|data: &[u8]| {
    let Some((&seed, input)) = data.split_first() else {
        return;
    };
    let shown = input.escape_ascii().to_string();
    let (want, want_rest) = model(input);
    // Checking every prefix is quadratic: only for short inputs.
    let each_chunk = input.len() <= 512;

    let mut u = Unstuffer::new();
    let mut got = Vec::new();
    let mut got_rest: Option<Vec<u8>> = None;
    let mut fed = 0;
    for chunk in split(input, seed) {
        if let Some(r) = &mut got_rest {
            r.extend_from_slice(chunk);
            continue;
        }
        fed += chunk.len();
        if let Some(rest) = u.feed_into(chunk, &mut got).unwrap() {
            assert!(u.done(), "input {shown}");
            got_rest = Some(rest.to_vec());
        } else {
            assert!(!u.done(), "input {shown}");
            if each_chunk {
                let (so_far, none) = model(&input[..fed]);
                assert_eq!(none, None, "input {shown}");
                assert_eq!(got, so_far, "after {fed} octets of input {shown}");
            }
        }
    }
    assert_eq!(got, want, "input {shown}");
    assert_eq!(got_rest, want_rest, "input {shown}");
    if u.done() {
        assert_eq!(u.feed(b"x"), Err(WireError::Finished), "input {shown}");
    }

    match unstuff(input) {
        Ok((payload, rest)) => {
            assert_eq!(payload, want, "input {shown}");
            assert_eq!(Some(rest.to_vec()), want_rest, "input {shown}");
        }
        Err(e) => {
            assert_eq!(e, WireError::MissingTerminator, "input {shown}");
            assert_eq!(want_rest, None, "input {shown}");
        }
    }
});
