//! DotStuffer (with and without a TOP cut) and SizeCounter under arbitrary chunkings,
//! against a per-line model of docs/wire.md: CRLF, bare LF and bare CR each end a line
//! and go out as CRLF, a leading "." is doubled, the TOP cut keeps the header, its
//! empty line and n more lines; the size counts line ends as CRLF and nothing for the
//! CRLF added to a last line without one. Chunked and one-shot calls agree, and so does
//! the stuffed length counted first and written into a buffer of that length.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pop3_wire::{stuff, wire_size, DotStuffer, SizeCounter, WireError};
use std::mem::MaybeUninit;

/// Lines by the stuffer's rules: (content, has a line end).
fn lines(m: &[u8]) -> Vec<(Vec<u8>, bool)> {
    let mut out = Vec::new();
    let mut cur = Vec::new();
    let mut i = 0;
    while i < m.len() {
        match m[i] {
            b'\r' => {
                out.push((std::mem::take(&mut cur), true));
                if m.get(i + 1) == Some(&b'\n') {
                    i += 1;
                }
            }
            b'\n' => out.push((std::mem::take(&mut cur), true)),
            b => cur.push(b),
        }
        i += 1;
    }
    if !cur.is_empty() {
        out.push((cur, false));
    }
    out
}

/// The whole response body, terminator included, and whether a TOP cut completed.
fn model_stuff(m: &[u8], top: Option<u64>) -> (Vec<u8>, bool) {
    let mut ls = lines(m);
    let mut cut = false;
    if let Some(n) = top {
        if let Some(h) = ls.iter().position(|(l, end)| l.is_empty() && *end) {
            let keep = (h + 1).saturating_add(usize::try_from(n).unwrap_or(usize::MAX));
            // Done once the last kept line has its line end.
            cut = ls.len() > keep || (ls.len() == keep && ls[keep - 1].1);
            ls.truncate(keep.min(ls.len()));
        }
    }
    let mut out = Vec::new();
    for (l, _) in ls {
        if l.first() == Some(&b'.') {
            out.push(b'.');
        }
        out.extend_from_slice(&l);
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b".\r\n");
    (out, cut)
}

fn model_size(m: &[u8]) -> u64 {
    lines(m)
        .iter()
        .map(|(l, end)| l.len() as u64 + if *end { 2 } else { 0 })
        .sum()
}

fn split(data: &[u8], seed: u8) -> Vec<&[u8]> {
    let mut out = Vec::new();
    let mut rest = data;
    let mut s = usize::from(seed) | 1;
    while !rest.is_empty() {
        s = (s * 29 + 7) % 241;
        let n = (s % 23).min(rest.len());
        out.push(&rest[..n]);
        rest = &rest[n..];
    }
    out
}

fuzz_target!(|data: &[u8]| {
    let Some((&seed, message)) = data.split_first() else {
        return;
    };
    let shown = message.escape_ascii().to_string();
    let top = match seed % 4 {
        0 => None,
        _ => Some(u64::from(seed / 4 % 6)),
    };
    let (want, cut) = model_stuff(message, top);
    let size = model_size(message);

    let mut s = DotStuffer::new(top);
    let mut c = SizeCounter::new();
    let mut wire = Vec::new();
    for chunk in split(message, seed) {
        s.feed_into(chunk, &mut wire).unwrap();
        c.feed(chunk).unwrap();
        // What is out is never taken back.
        assert!(want.starts_with(&wire), "top {top:?}, input {shown}");
    }
    s.finish_into(&mut wire).unwrap();
    assert_eq!(wire, want, "top {top:?}, input {shown}");
    assert_eq!(s.done(), cut, "top {top:?}, input {shown}");
    assert_eq!(s.finish(), Err(WireError::Finished), "input {shown}");
    assert_eq!(stuff(message, top), want, "top {top:?}, input {shown}");

    assert_eq!(c.finish().unwrap(), size, "input {shown}");
    assert_eq!(wire_size(message), size, "input {shown}");

    // Counted first, then written into a buffer of exactly that length (one call:
    // the SIMD steps need 64 octets).
    let mut e = DotStuffer::new(top);
    let n = e.stuffed_len(message).unwrap();
    if let Some(quick) = e.lf_stuffed_len(message) {
        assert_eq!(quick, n, "top {top:?}, input {shown}");
    }
    let mut buf = vec![MaybeUninit::new(0u8); usize::try_from(n).unwrap()];
    assert_eq!(
        e.feed_exact(message, &mut buf),
        Ok(buf.len()),
        "input {shown}"
    );
    // SAFETY: every slot was initialised (to 0, then by feed_exact).
    let mut exact: Vec<u8> = buf.iter().map(|b| unsafe { b.assume_init() }).collect();
    exact.extend_from_slice(&e.finish().unwrap());
    assert_eq!(exact, want, "top {top:?}, input {shown}");
});
