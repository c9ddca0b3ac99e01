//! APOP (RFC 1939 §7) and CRAM-MD5 (RFC 2195) digests, constant-time comparison and
//! challenges.

use crate::WireError;
use md5::block_api::compress;
use std::sync::atomic::{AtomicU64, Ordering};

/// The length of a Dovecot CRAM-MD5 context ([`cram_md5_context`]).
pub const CRAM_MD5_CONTEXT_LEN: usize = 32;

const MD5_IV: [u32; 4] = [0x6745_2301, 0xefcd_ab89, 0x98ba_dcfe, 0x1032_5476];
const BLOCK: usize = 64;

/// MD5 of `data`, continued from `state` after `prior_blocks` 64-octet blocks.
fn md5_continue(mut state: [u32; 4], prior_blocks: u64, data: &[u8]) -> [u8; 16] {
    let mut blocks = data.chunks_exact(BLOCK);
    for block in &mut blocks {
        let block: &[u8; BLOCK] = block.try_into().expect("chunks_exact gives 64 octets");
        compress(&mut state, std::slice::from_ref(block));
    }
    let tail = blocks.remainder();
    let bits = prior_blocks
        .wrapping_mul(BLOCK as u64)
        .wrapping_add(data.len() as u64)
        .wrapping_mul(8);
    let mut last = [[0u8; BLOCK]; 2];
    let flat = last.as_flattened_mut();
    flat[..tail.len()].copy_from_slice(tail);
    flat[tail.len()] = 0x80;
    let n = if tail.len() < BLOCK - 8 { 1 } else { 2 };
    flat[n * BLOCK - 8..n * BLOCK].copy_from_slice(&bits.to_le_bytes());
    compress(&mut state, &last[..n]);
    let mut out = [0u8; 16];
    for (o, w) in out.chunks_exact_mut(4).zip(state) {
        o.copy_from_slice(&w.to_le_bytes());
    }
    out
}

fn md5(data: &[u8]) -> [u8; 16] {
    md5_continue(MD5_IV, 0, data)
}

/// HMAC-MD5 (RFC 2104) states after the outer and the inner pad block.
fn hmac_md5_states(secret: &[u8]) -> ([u32; 4], [u32; 4]) {
    let mut key = [0u8; BLOCK];
    if secret.len() > BLOCK {
        key[..16].copy_from_slice(&md5(secret));
    } else {
        key[..secret.len()].copy_from_slice(secret);
    }
    let ipad = key.map(|k| k ^ 0x36);
    let opad = key.map(|k| k ^ 0x5c);
    let mut inner = MD5_IV;
    compress(&mut inner, &[ipad]);
    let mut outer = MD5_IV;
    compress(&mut outer, &[opad]);
    (outer, inner)
}

fn hmac_md5_from_states(outer: [u32; 4], inner: [u32; 4], message: &[u8]) -> [u8; 16] {
    let inner_hash = md5_continue(inner, 1, message);
    md5_continue(outer, 1, &inner_hash)
}

fn hex(digest: &[u8; 16]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(32);
    for b in digest {
        s.push(char::from(DIGITS[usize::from(b >> 4)]));
        s.push(char::from(DIGITS[usize::from(b & 0xf)]));
    }
    s
}

/// Compares in time that depends only on the lengths, not on where `a` and `b` differ.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let diff = a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y));
    std::hint::black_box(diff) == 0
}

/// Compares a received hex digest, in either case, with our lower-case one in constant
/// time (only the length may leak).
fn hex_digest_eq(expected_lower: &str, received: &[u8]) -> bool {
    if received.len() != expected_lower.len() {
        return false;
    }
    let diff = expected_lower
        .bytes()
        .zip(received)
        .fold(0u8, |acc, (x, &y)| {
            // Fold 'A'..='F' to 'a'..='f' without a data-dependent branch.
            let upper_hex = u8::from(y.wrapping_sub(b'A') < 6);
            acc | (x ^ (y | (upper_hex << 5)))
        });
    std::hint::black_box(diff) == 0
}

/// The APOP digest (RFC 1939 §7): lower-case hex MD5 of `timestamp + secret`.
pub fn apop_digest(timestamp: &[u8], secret: &[u8]) -> String {
    let mut data = Vec::with_capacity(timestamp.len() + secret.len());
    data.extend_from_slice(timestamp);
    data.extend_from_slice(secret);
    hex(&md5(&data))
}

/// Checks an APOP digest (either hex case) in constant time.
pub fn apop_verify(timestamp: &[u8], secret: &[u8], digest: &[u8]) -> bool {
    hex_digest_eq(&apop_digest(timestamp, secret), digest)
}

/// The CRAM-MD5 digest (RFC 2195): lower-case hex HMAC-MD5 of `challenge` keyed by
/// `secret`.
pub fn cram_md5_digest(secret: &[u8], challenge: &[u8]) -> String {
    let (outer, inner) = hmac_md5_states(secret);
    hex(&hmac_md5_from_states(outer, inner, challenge))
}

/// Checks a CRAM-MD5 digest (either hex case) in constant time.
pub fn cram_md5_verify(secret: &[u8], challenge: &[u8], digest: &[u8]) -> bool {
    hex_digest_eq(&cram_md5_digest(secret, challenge), digest)
}

/// The HMAC-MD5 intermediate state that Dovecot stores for `{CRAM-MD5}` passwords
/// (`hmac_md5_get_cram_context`): the MD5 state words a, b, c, d after the outer pad
/// block, then after the inner pad block, each word little-endian.
pub fn cram_md5_context(secret: &[u8]) -> [u8; CRAM_MD5_CONTEXT_LEN] {
    let (outer, inner) = hmac_md5_states(secret);
    let mut out = [0u8; CRAM_MD5_CONTEXT_LEN];
    for (o, w) in out.chunks_exact_mut(4).zip(outer.into_iter().chain(inner)) {
        o.copy_from_slice(&w.to_le_bytes());
    }
    out
}

/// Checks a CRAM-MD5 digest (either hex case) in constant time from a stored
/// [`cram_md5_context`] alone. Fails with [`WireError::BadContextLength`] unless the
/// context is 32 octets.
pub fn cram_md5_verify_context(
    context: &[u8],
    challenge: &[u8],
    digest: &[u8],
) -> Result<bool, WireError> {
    if context.len() != CRAM_MD5_CONTEXT_LEN {
        return Err(WireError::BadContextLength);
    }
    let mut words = context
        .chunks_exact(4)
        .map(|w| u32::from_le_bytes(w.try_into().expect("4 octets")));
    let mut next = || words.next().expect("8 words");
    let outer = [next(), next(), next(), next()];
    let inner = [next(), next(), next(), next()];
    let expected = hex(&hmac_md5_from_states(outer, inner, challenge));
    Ok(hex_digest_eq(&expected, digest))
}

static CHALLENGE_COUNTER: AtomicU64 = AtomicU64::new(1);

/// A fresh challenge in msg-id form (RFC 1939 §7, RFC 2195):
/// `<PID.COUNTER.RANDOM@host>`, with the decimal process id, a per-process counter that
/// never repeats, and 64 random bits from the OS as 16 lower-case hex digits.
///
/// Fails with [`WireError::BadHost`] if `host` is empty or holds `<`, `>`, `@`,
/// whitespace or control characters.
///
/// # Panics
///
/// If the operating system cannot supply random octets.
pub fn make_challenge(host: &str) -> Result<String, WireError> {
    if host.is_empty()
        || host
            .chars()
            .any(|c| matches!(c, '<' | '>' | '@') || c.is_whitespace() || c.is_control())
    {
        return Err(WireError::BadHost);
    }
    let counter = CHALLENGE_COUNTER.fetch_add(1, Ordering::Relaxed);
    let random = getrandom::u64().expect("the OS random source failed");
    Ok(format!(
        "<{}.{}.{:016x}@{}>",
        std::process::id(),
        counter,
        random,
        host
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn md5_known_answers() {
        // RFC 1321 appendix A.5.
        let cases: [(&[u8], &str); 7] = [
            (b"", "d41d8cd98f00b204e9800998ecf8427e"),
            (b"a", "0cc175b9c0f1b6a831c399e269772661"),
            (b"abc", "900150983cd24fb0d6963f7d28e17f72"),
            (b"message digest", "f96b697d7cb7938d525a2f31aaf161d0"),
            (
                b"abcdefghijklmnopqrstuvwxyz",
                "c3fcd3d76192e4007dfb496cca67e13b",
            ),
            (
                b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789",
                "d174ab98d277d9f5a5611c2c9f419d9f",
            ),
            (
                b"12345678901234567890123456789012345678901234567890123456789012345678901234567890",
                "57edf4a22be3c955ac49da2e2107b67a",
            ),
        ];
        for (input, want) in cases {
            assert_eq!(hex(&md5(input)), want, "{input:?}");
        }
    }

    #[test]
    fn md5_padding_edges() {
        // 55, 56, 63, 64, 65 octets exercise one and two padding blocks.
        let want = [
            (55, "ef1772b6dff9a122358552954ad0df65"),
            (56, "3b0c8ac703f828b04c6c197006d17218"),
            (63, "b06521f39153d618550606be297466d5"),
            (64, "014842d480b571495a4a0363793f7367"),
            (65, "c743a45e0d2e6a95cb859adae0248435"),
        ];
        for (n, digest) in want {
            assert_eq!(hex(&md5(&vec![b'a'; n])), digest, "{n}");
        }
    }

    #[test]
    fn apop_rfc1939_vector() {
        let ts = b"<1896.697170952@dbc.mtview.ca.us>";
        let d = apop_digest(ts, b"tanstaaf");
        assert_eq!(d, "c4c9334bac560ecc979e58001b3e22fb");
        assert!(apop_verify(ts, b"tanstaaf", d.as_bytes()));
        assert!(apop_verify(
            ts,
            b"tanstaaf",
            b"C4C9334BAC560ECC979E58001B3E22FB"
        ));
        assert!(!apop_verify(
            ts,
            b"tanstaaf",
            b"c4c9334bac560ecc979e58001b3e22fc"
        ));
        assert!(!apop_verify(
            ts,
            b"tanstaaf",
            b"c4c9334bac560ecc979e58001b3e22f"
        ));
        assert!(!apop_verify(ts, b"tanstaaF", d.as_bytes()));
        assert!(!apop_verify(ts, b"tanstaaf", b""));
    }

    #[test]
    fn hex_case_folding_is_exact() {
        let ts = b"<1896.697170952@dbc.mtview.ca.us>";
        // Only A-F fold; other octets that differ by 0x20 from a digit or a-f must fail.
        let mut d = b"c4c9334bac560ecc979e58001b3e22fb".to_vec();
        d[0] = b'C';
        assert!(apop_verify(ts, b"tanstaaf", &d));
        d[0] = b'c' ^ 0x20 ^ 0x80;
        assert!(!apop_verify(ts, b"tanstaaf", &d));
        let mut d = b"c4c9334bac560ecc979e58001b3e22fb".to_vec();
        d[1] = 0x14; // '4' with bit 5 cleared
        assert!(!apop_verify(ts, b"tanstaaf", &d));
        let mut d = b"c4c9334bac560ecc979e58001b3e22fb".to_vec();
        d[2] = b'G'; // not hex, not folded
        assert!(!apop_verify(ts, b"tanstaaf", &d));
    }

    #[test]
    fn cram_md5_rfc2195_vector() {
        let ch = b"<1896.697170952@postoffice.reston.mci.net>";
        let d = cram_md5_digest(b"tanstaaftanstaaf", ch);
        assert_eq!(d, "b913a602c7eda7a495b4e6e7334d3890");
        assert!(cram_md5_verify(b"tanstaaftanstaaf", ch, d.as_bytes()));
        assert!(cram_md5_verify(
            b"tanstaaftanstaaf",
            ch,
            b"B913A602C7EDA7A495B4E6E7334D3890"
        ));
        assert!(!cram_md5_verify(b"tanstaaftanstaaX", ch, d.as_bytes()));
        assert!(!cram_md5_verify(
            b"tanstaaftanstaaf",
            b"<x@y>",
            d.as_bytes()
        ));
    }

    #[test]
    fn hmac_md5_rfc2202_vectors() {
        assert_eq!(
            cram_md5_digest(&[0x0b; 16], b"Hi There"),
            "9294727a3638bb1c13f48ef8158bfc9d"
        );
        assert_eq!(
            cram_md5_digest(b"Jefe", b"what do ya want for nothing?"),
            "750c783e6ab0b503eaa86e310a5db738"
        );
        assert_eq!(
            cram_md5_digest(&[0xaa; 16], &[0xdd; 50]),
            "56be34521d144c88dbb8c733f0e8b3f6"
        );
        // A key longer than the block is hashed first.
        assert_eq!(
            cram_md5_digest(
                &[0xaa; 80],
                b"Test Using Larger Than Block-Size Key - Hash Key First"
            ),
            "6b1ab7fe4bd7bf8f0b62e6ce61b9d0cd"
        );
        assert_eq!(
            cram_md5_digest(
                &[0xaa; 80],
                b"Test Using Larger Than Block-Size Key and Larger Than One Block-Size Data"
            ),
            "6f630fad67cda0ee1fb1f562db3aa53e"
        );
    }

    #[test]
    fn cram_md5_context_layout() {
        let ctx = cram_md5_context(b"tanstaaftanstaaf");
        // Words: outer a, b, c, d, then inner a, b, c, d, each little-endian.
        let (outer, inner) = hmac_md5_states(b"tanstaaftanstaaf");
        for (k, w) in outer.iter().chain(&inner).enumerate() {
            assert_eq!(ctx[4 * k..4 * k + 4], w.to_le_bytes());
        }
        // The outer state is MD5 after one block of key ^ 0x5c.
        let mut opad = [0x5cu8; 64];
        for (o, k) in opad.iter_mut().zip(b"tanstaaftanstaaf") {
            *o ^= k;
        }
        let mut s = MD5_IV;
        compress(&mut s, &[opad]);
        assert_eq!(s, outer);
    }

    #[test]
    fn cram_md5_verify_from_context() {
        let ch = b"<1896.697170952@postoffice.reston.mci.net>";
        let ctx = cram_md5_context(b"tanstaaftanstaaf");
        let good = b"b913a602c7eda7a495b4e6e7334d3890";
        assert_eq!(cram_md5_verify_context(&ctx, ch, good), Ok(true));
        assert_eq!(
            cram_md5_verify_context(&ctx, ch, b"B913A602C7EDA7A495B4E6E7334D3890"),
            Ok(true)
        );
        assert_eq!(
            cram_md5_verify_context(&ctx, ch, b"b913a602c7eda7a495b4e6e7334d3891"),
            Ok(false)
        );
        assert_eq!(
            cram_md5_verify_context(&ctx[..31], ch, good),
            Err(WireError::BadContextLength)
        );
        assert_eq!(
            cram_md5_verify_context(&[0; 33], ch, good),
            Err(WireError::BadContextLength)
        );
        // Long secrets too.
        let secret = [7u8; 100];
        let ctx = cram_md5_context(&secret);
        let d = cram_md5_digest(&secret, b"<1.2.3@h>");
        assert_eq!(
            cram_md5_verify_context(&ctx, b"<1.2.3@h>", d.as_bytes()),
            Ok(true)
        );
    }

    #[test]
    fn constant_time_eq_basics() {
        assert!(constant_time_eq(b"", b""));
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"ab"));
        assert!(!constant_time_eq(b"\x00", b"\x80"));
    }

    #[test]
    fn challenges_are_msg_ids_and_unique() {
        let mut seen = std::collections::HashSet::new();
        for _ in 0..1000 {
            let c = make_challenge("pop.example.org").unwrap();
            assert!(
                c.starts_with('<') && c.ends_with("@pop.example.org>"),
                "{c}"
            );
            let inner = &c[1..c.len() - "@pop.example.org>".len()];
            let parts: Vec<&str> = inner.split('.').collect();
            assert_eq!(parts.len(), 3, "{c}");
            assert_eq!(parts[0], std::process::id().to_string());
            assert!(parts[1].bytes().all(|b| b.is_ascii_digit()));
            assert_eq!(parts[2].len(), 16);
            assert!(parts[2].bytes().all(|b| b"0123456789abcdef".contains(&b)));
            assert!(seen.insert(c));
        }
    }

    #[test]
    fn challenge_host_is_checked() {
        for bad in [
            "", "a b", "a<b", "a>b", "a@b", "a\tb", "a\nb", "a\x7fb", "a\u{85}b",
        ] {
            assert_eq!(make_challenge(bad), Err(WireError::BadHost), "{bad:?}");
        }
        assert!(make_challenge("localhost").is_ok());
        assert!(make_challenge("xn--bcher-kva.example").is_ok());
        assert!(make_challenge("bücher.example").is_ok());
    }
}
