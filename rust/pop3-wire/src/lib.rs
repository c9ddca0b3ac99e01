//! The POP3 wire codec of pypop, as a pure Rust crate (no Python).
//!
//! Every byte of POP3 that pypop sends or reads passes through this crate (bound to Python
//! as `pypop._wire` by `rust/pypop-ext`). `docs/wire.md` in the repository is the
//! specification; the pure-Python twin `pypop._wire_py` follows it too.
//!
//! * [`LineFramer`]: server side, splits a byte stream into command lines (LF with an
//!   optional CR before it ends a line; RFC 2449 §4 length limit, line end included).
//! * [`DotStuffer`] / [`stuff`]: a stored message into a multi-line response body
//!   (RFC 1939 §3): every line end made CRLF, leading dots doubled, `.\r\n` terminator,
//!   optionally cut after the header and `n` body lines (TOP, RFC 1939 §7). Into a
//!   `Vec`, or counted first (`stuffed_len`) and written into a buffer of that length
//!   (`feed_exact`).
//! * [`SizeCounter`] / [`wire_size`]: the RFC 1939 §11 size of a message, no output.
//! * [`Unstuffer`] / [`unstuff`]: client side, a multi-line response body back into the
//!   message, strict about CRLF.
//! * [`plain_download`]: `RETR n`, `TOP n m` and `DELE n` in their plain shape (the
//!   server's quick path for the commands of a mail download).
//! * [`parse_proxy_header`]: the PROXY protocol header (v1 and v2) a load balancer
//!   sends before the client's first octet.
//! * [`apop_digest`], [`cram_md5_digest`], [`cram_md5_context`] and their constant-time
//!   verifiers; [`make_challenge`] for APOP / CRAM-MD5 challenges.
//!
//! All streaming types take whole chunks of any size, carry their state across chunk
//! boundaries, and examine each input octet a bounded number of times (they scan with
//! `memchr` and copy spans).

// Audited exceptions, each allowed where it is: the stuffer's SIMD steps (AVX2 and
// AVX-512) and the raw output they write (stuff.rs).
#![deny(unsafe_code)]
#![warn(missing_docs)]

mod auth;
mod command;
mod framer;
mod proxy;
mod stuff;
mod unstuff;

pub use auth::{
    apop_digest, apop_verify, constant_time_eq, cram_md5_context, cram_md5_digest, cram_md5_verify,
    cram_md5_verify_context, make_challenge, CRAM_MD5_CONTEXT_LEN,
};
pub use command::{plain_download, Download, MAX_TOP_LINES};
pub use framer::LineFramer;
pub use proxy::{
    encode_proxy_v2, parse_proxy_header, ProxyError, ProxyHeader, PROXY_V1_MAX, PROXY_V2_SIGNATURE,
};
pub use stuff::{
    stuff, stuff_into, wire_header_is_ascii, wire_size, DotStuffer, SizeCounter, HEADER_SCAN_LIMIT,
};
pub use unstuff::{unstuff, unstuff_into, Unstuffer};

/// The RFC 2449 §4 command-line limit: 255 octets, line end included.
pub const DEFAULT_MAX_LINE: usize = 255;

/// The errors of this crate. Each maps to a `ValueError` in Python.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WireError {
    /// `LineFramer::new` with a limit below 2 octets.
    MaxLineTooSmall,
    /// A stream object was fed (or finished) after it had finished.
    Finished,
    /// [`unstuff`] found no terminator line.
    MissingTerminator,
    /// A CRAM-MD5 context that is not [`CRAM_MD5_CONTEXT_LEN`] octets long.
    BadContextLength,
    /// A challenge host name that is empty or holds `<`, `>`, `@`, whitespace or
    /// control characters.
    BadHost,
    /// [`DotStuffer::feed_exact`] got a buffer shorter than the stuffed form.
    OutputTooSmall,
}

impl std::fmt::Display for WireError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            WireError::MaxLineTooSmall => "max_line must be at least 2",
            WireError::Finished => "the stream has already finished",
            WireError::MissingTerminator => "no terminating \".\" line",
            WireError::BadContextLength => "a CRAM-MD5 context is 32 octets",
            WireError::OutputTooSmall => "the output buffer is shorter than the stuffed form",
            WireError::BadHost => {
                "host must be non-empty, without '<', '>', '@', whitespace or control characters"
            }
        })
    }
}

impl std::error::Error for WireError {}
