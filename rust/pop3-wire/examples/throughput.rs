//! Quick single-core throughput check of the codec (not a benchmark suite: that is
//! benches/wire_bench.py). Run with `cargo run --release -p pop3-wire --example throughput`.

use pop3_wire::{stuff, unstuff, wire_size, DotStuffer, LineFramer, Unstuffer};
use std::hint::black_box;
use std::time::Instant;

/// A 1 MiB message of ~72-octet lines with the given line end; every 40th line starts
/// with a dot.
fn message(line_end: &[u8]) -> Vec<u8> {
    let mut m = b"From: a@example.org\r\nSubject: throughput\r\n\r\n".to_vec();
    let mut i = 0u32;
    while m.len() < 1 << 20 {
        if i.is_multiple_of(40) {
            m.push(b'.');
        }
        m.extend_from_slice(
            format!("{i:08} The quick brown fox jumps over the lazy dog 0123456789").as_bytes(),
        );
        m.extend_from_slice(line_end);
        i += 1;
    }
    m.truncate(1 << 20);
    m
}

/// Reports the best of many timed runs (this is a shared machine: the minimum filters
/// out interference from other processes).
fn measure(name: &str, bytes: usize, mut f: impl FnMut()) {
    for _ in 0..5 {
        f();
    }
    let mut best = f64::INFINITY;
    let start = Instant::now();
    while start.elapsed().as_secs_f64() < 0.5 {
        let t = Instant::now();
        f();
        best = best.min(t.elapsed().as_secs_f64());
    }
    println!("{name:<48} {:>8.0} MB/s", bytes as f64 / best / 1e6);
}

/// A 1 MiB LF message shaped like the benchmark suite's Maildir mail (benches/fixtures.py):
/// lines of 30 to 76 random octets, every 17th a dotted line, every 53rd a lone dot.
fn mail_like() -> Vec<u8> {
    let mut m = b"From: a@example.org\nSubject: throughput\n\n".to_vec();
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut k = 0u32;
    while m.len() < 1 << 20 {
        k += 1;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        if k.is_multiple_of(17) {
            m.push(b'.');
            m.extend(std::iter::repeat_n(b'd', 40));
        } else if k.is_multiple_of(53) {
            m.push(b'.');
        } else {
            m.extend(std::iter::repeat_n(b'w', 30 + (x % 47) as usize));
        }
        m.push(b'\n');
    }
    m.truncate(1 << 20);
    m
}

fn main() {
    let crlf = message(b"\r\n");
    let lf = message(b"\n");
    let mail = mail_like();
    let len = crlf.len();
    measure(
        "stuff 1 MiB LF, random line lengths (one call)",
        len,
        || {
            black_box(stuff(black_box(&mail), None));
        },
    );
    measure("stuff 1 MiB CRLF (one call)", len, || {
        black_box(stuff(black_box(&crlf), None));
    });
    measure("stuff 1 MiB LF (one call)", len, || {
        black_box(stuff(black_box(&lf), None));
    });
    let mut out = Vec::with_capacity(2 * len + 64);
    measure(
        "DotStuffer 1 MiB CRLF, 64 KiB chunks, reused buf",
        len,
        || {
            out.clear();
            let mut s = DotStuffer::new(None);
            for c in crlf.chunks(64 * 1024) {
                s.feed_into(c, &mut out).unwrap();
            }
            s.finish_into(&mut out).unwrap();
            black_box(&out);
        },
    );
    measure(
        "DotStuffer 1 MiB CRLF, 64 KiB chunks, Vec each",
        len,
        || {
            let mut s = DotStuffer::new(None);
            for c in crlf.chunks(64 * 1024) {
                black_box(s.feed(c).unwrap());
            }
            black_box(s.finish().unwrap());
        },
    );
    measure("wire_size 1 MiB CRLF", len, || {
        black_box(wire_size(black_box(&crlf)));
    });
    measure("wire_size 1 MiB LF", len, || {
        black_box(wire_size(black_box(&lf)));
    });
    let wire = stuff(&crlf, None);
    measure("unstuff 1 MiB (one call)", wire.len(), || {
        black_box(unstuff(black_box(&wire)).unwrap());
    });
    measure(
        "Unstuffer 1 MiB, 64 KiB chunks, reused buf",
        wire.len(),
        || {
            out.clear();
            let mut u = Unstuffer::new();
            for c in wire.chunks(64 * 1024) {
                if u.feed_into(c, &mut out).unwrap().is_some() {
                    break;
                }
            }
            black_box(&out);
        },
    );
    let commands = b"RETR 1\r\nDELE 1\r\nNOOP\r\nSTAT\r\n".repeat(16 * 1024);
    measure(
        "LineFramer 512 KiB of short commands",
        commands.len(),
        || {
            let mut f = LineFramer::default();
            let mut n = 0usize;
            for c in commands.chunks(64 * 1024) {
                f.feed_with(c, |l| n += l.map_or(0, <[u8]>::len));
            }
            black_box(n);
        },
    );
}
