//! LineFramer under arbitrary chunkings against a per-octet model of docs/wire.md.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pop3_wire::LineFramer;

fn model(max_line: usize, data: &[u8]) -> Vec<Option<Vec<u8>>> {
    let mut out = Vec::new();
    let mut cur: Vec<u8> = Vec::new();
    let mut skipping = false;
    for &b in data {
        if skipping {
            skipping = b != b'\n';
            continue;
        }
        cur.push(b);
        if b == b'\n' {
            if cur.len() > max_line {
                out.push(None);
            } else {
                cur.pop();
                if cur.last() == Some(&b'\r') {
                    cur.pop();
                }
                out.push(Some(cur.clone()));
            }
            cur.clear();
        } else if cur.len() >= max_line {
            out.push(None);
            cur.clear();
            skipping = true;
        }
    }
    out
}

fuzz_target!(|data: &[u8]| {
    let Some((&first, input)) = data.split_first() else {
        return;
    };
    let max_line = 2 + usize::from(first % 40);
    let want = model(max_line, input);
    let mut f = LineFramer::new(max_line).unwrap();
    let mut got = Vec::new();
    let mut rest = input;
    let mut n = usize::from(first);
    while !rest.is_empty() {
        n = (n * 29 + 7) % 97;
        let k = (n % 23).min(rest.len());
        got.extend(f.feed(&rest[..k]));
        rest = &rest[k..];
    }
    assert_eq!(got, want);
    assert!(f.buffered() < max_line);
});
