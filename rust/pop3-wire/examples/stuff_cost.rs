//! Cost of `DotStuffer::feed_into` on 1 MiB messages, for instruction counting under
//! callgrind (the machine is shared: instructions are the stable measure, time is not).
//!
//! ```text
//! cargo build --release -p pop3-wire --example stuff_cost
//! # Instructions: run a case with 1 and with 1 + N iterations; the difference / N is
//! # the cost of one 1 MiB message (setup and process start cancel out).
//! valgrind --tool=callgrind --callgrind-out-file=/dev/null target/release/examples/stuff_cost lf 1
//! valgrind --tool=callgrind --callgrind-out-file=/dev/null target/release/examples/stuff_cost lf 11
//! # Wall clock (informative only), best of many runs, every case:
//! target/release/examples/stuff_cost
//! ```
//!
//! Cases: `lf` (bare LF line ends), `crlf`, `cr` (bare CR line ends), `mixed` (LF, CRLF
//! and bare CR), `lf-top20` (LF, TOP cut of 20 lines), `lf-topall` (LF, a TOP count
//! larger than the message: the whole message goes through the counting path),
//! `size-lf` and `size-crlf` (`wire_size`, the SizeCounter, on LF and CRLF mail).

use pop3_wire::{wire_size, DotStuffer};
use std::hint::black_box;
use std::time::Instant;

const MIB: usize = 1 << 20;

/// 1 MiB of mail: a header, an empty line, then lines of 70 to 82 octets (76 on
/// average) whose line ends `end(i)` picks; every 40th line starts with a dot.
fn message(end: impl Fn(u32) -> &'static [u8]) -> Vec<u8> {
    let mut m = Vec::with_capacity(MIB + 128);
    for (i, h) in [
        &b"From: a@example.org"[..],
        b"To: b@example.org",
        b"Subject: stuff cost",
        b"",
    ]
    .iter()
    .enumerate()
    {
        m.extend_from_slice(h);
        m.extend_from_slice(end(i as u32));
    }
    let text =
        b"The quick brown fox jumps over the lazy dog; pack my box with five dozen liquor jugs.";
    let mut i = 0u32;
    while m.len() < MIB {
        if i.is_multiple_of(40) {
            m.push(b'.');
        }
        let n = 70 + (i as usize * 7) % 13;
        m.extend_from_slice(format!("{i:08} ").as_bytes());
        m.extend_from_slice(&text[..n - 9]);
        m.extend_from_slice(end(i));
        i += 1;
    }
    m.truncate(MIB);
    m
}

struct Case {
    name: &'static str,
    data: Vec<u8>,
    top: Option<u64>,
    /// Count the size (`wire_size`) instead of stuffing.
    size: bool,
}

fn cases() -> Vec<Case> {
    let lf = message(|_| b"\n");
    vec![
        Case {
            name: "lf",
            data: lf.clone(),
            top: None,
            size: false,
        },
        Case {
            name: "crlf",
            data: message(|_| b"\r\n"),
            top: None,
            size: false,
        },
        Case {
            name: "cr",
            data: message(|_| b"\r"),
            top: None,
            size: false,
        },
        Case {
            name: "mixed",
            data: message(|i| match i % 3 {
                0 => b"\n",
                1 => b"\r\n",
                _ => b"\r",
            }),
            top: None,
            size: false,
        },
        Case {
            name: "lf-top20",
            data: lf.clone(),
            top: Some(20),
            size: false,
        },
        Case {
            name: "lf-topall",
            data: lf.clone(),
            top: Some(1 << 40),
            size: false,
        },
        Case {
            name: "size-lf",
            data: lf,
            top: None,
            size: true,
        },
        Case {
            name: "size-crlf",
            data: message(|_| b"\r\n"),
            top: None,
            size: true,
        },
    ]
}

/// One message: a new stuffer, the whole 1 MiB in one chunk, the terminator, into a
/// reused buffer (as the Python binding's scratch buffer).
#[inline(never)]
fn run(case: &Case, out: &mut Vec<u8>) {
    let (data, top) = (&case.data[..], case.top);
    if case.size {
        black_box(wire_size(black_box(data)));
        return;
    }
    out.clear();
    let mut s = DotStuffer::new(top);
    s.feed_into(black_box(data), out).unwrap();
    s.finish_into(out).unwrap();
    black_box(&*out);
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let cases = cases();
    let mut out = Vec::with_capacity(2 * MIB + 64);
    if let [_, name, n] = &args[..] {
        let case = cases
            .iter()
            .find(|c| c.name == name)
            .unwrap_or_else(|| panic!("unknown case {name}"));
        let n: usize = n.parse().expect("an iteration count");
        for _ in 0..n {
            run(case, &mut out);
        }
        println!("{name}: {n} iterations, {} octets out", out.len());
        return;
    }
    for case in &cases {
        for _ in 0..5 {
            run(case, &mut out);
        }
        let mut best = f64::INFINITY;
        let start = Instant::now();
        while start.elapsed().as_secs_f64() < 0.5 {
            let t = Instant::now();
            run(case, &mut out);
            best = best.min(t.elapsed().as_secs_f64());
        }
        println!("{:<10} {:>9.0} ns/MiB", case.name, best * 1e9);
    }
}
