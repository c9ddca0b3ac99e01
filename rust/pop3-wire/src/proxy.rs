//! The PROXY protocol header, versions 1 and 2 (HAProxy's proxy-protocol.txt).
//!
//! A load balancer that passes TCP through sends one header before the client's first
//! octet; it names the client's address. [`parse_proxy_header`] reads it from the
//! octets received so far: it says "need more", gives the header and how many octets
//! it took, or fails. It never reads past the header (octets after it belong to the
//! session, such as a TLS ClientHello) and never accepts more than `max_len` octets.

use std::net::{Ipv4Addr, Ipv6Addr};

/// The version 2 signature: a line that no v1 or POP3 peer sends.
pub const PROXY_V2_SIGNATURE: &[u8; 12] = b"\r\n\r\n\0\r\nQUIT\n";
/// The longest version 1 header, CRLF included (proxy-protocol.txt §2.1).
pub const PROXY_V1_MAX: usize = 107;
/// The SSL TLV of version 2, and its "client connected over SSL/TLS" flag.
const PP2_TYPE_SSL: u8 = 0x20;
const PP2_CLIENT_SSL: u8 = 0x01;

/// Why a header was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProxyError {
    /// The octets do not start a PROXY header.
    NotProxy,
    /// A version 1 line that breaks the grammar (or is over 107 octets).
    BadV1,
    /// A version 2 header with a bad version, command, family or TLV list.
    BadV2,
    /// A header (or the part of one received so far) longer than the limit.
    TooLong,
}

impl ProxyError {
    /// The message of the Python `ValueError`.
    pub fn message(self) -> &'static str {
        match self {
            ProxyError::NotProxy => "not a PROXY protocol header",
            ProxyError::BadV1 => "malformed PROXY v1 header",
            ProxyError::BadV2 => "malformed PROXY v2 header",
            ProxyError::TooLong => "PROXY header too long",
        }
    }
}

impl std::fmt::Display for ProxyError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.message())
    }
}

impl std::error::Error for ProxyError {}

/// A complete header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProxyHeader {
    /// Octets the header took (the session starts after them).
    pub length: usize,
    /// 1 or 2.
    pub version: u8,
    /// Version 2 LOCAL: the proxy speaks for itself (a health check); the addresses
    /// of the connection are the real ones.
    pub local: bool,
    /// Source and destination addresses: 4 or 16 octets each, or empty when the
    /// header carries none (v1 UNKNOWN, v2 LOCAL, AF_UNSPEC, AF_UNIX).
    pub source: Vec<u8>,
    /// Source port (0 without addresses).
    pub source_port: u16,
    /// Destination address, as `source`.
    pub destination: Vec<u8>,
    /// Destination port.
    pub destination_port: u16,
    /// Version 2 only: the SSL TLV says the client connected over TLS.
    pub ssl: bool,
}

/// Parses a header from the start of `data`.
///
/// `Ok(None)`: what is there is a valid beginning, send more. `Err(_)`: refuse the
/// connection. `max_len` bounds the header (at least [`PROXY_V1_MAX`] is sensible; a
/// version 2 header with a larger length is refused as soon as its length is known).
pub fn parse_proxy_header(data: &[u8], max_len: usize) -> Result<Option<ProxyHeader>, ProxyError> {
    if data.is_empty() {
        return Ok(None);
    }
    let v1 = b"PROXY ";
    let n = data.len().min(v1.len());
    if data[..n] == v1[..n] {
        return parse_v1(data, max_len);
    }
    let n = data.len().min(PROXY_V2_SIGNATURE.len());
    if data[..n] == PROXY_V2_SIGNATURE[..n] {
        return parse_v2(data, max_len);
    }
    Err(ProxyError::NotProxy)
}

fn parse_v1(data: &[u8], max_len: usize) -> Result<Option<ProxyHeader>, ProxyError> {
    let limit = PROXY_V1_MAX.min(max_len);
    let end = match memchr::memchr(b'\n', &data[..data.len().min(limit)]) {
        Some(lf) => lf,
        None if data.len() >= limit => {
            return Err(if limit < PROXY_V1_MAX {
                ProxyError::TooLong
            } else {
                ProxyError::BadV1
            })
        }
        None => return Ok(None),
    };
    // The line ends with CRLF, nothing else.
    if end == 0 || data[end - 1] != b'\r' {
        return Err(ProxyError::BadV1);
    }
    let line = &data[6..end - 1];
    let length = end + 1;
    let unknown = |length| ProxyHeader {
        length,
        version: 1,
        local: false,
        source: Vec::new(),
        source_port: 0,
        destination: Vec::new(),
        destination_port: 0,
        ssl: false,
    };
    // "UNKNOWN" may be followed by anything up to the CRLF, which is ignored.
    if line == b"UNKNOWN" || line.starts_with(b"UNKNOWN ") {
        return Ok(Some(unknown(length)));
    }
    let mut parts = line.split(|&b| b == b' ');
    let family = parts.next().ok_or(ProxyError::BadV1)?;
    let fields: Vec<&[u8]> = parts.collect();
    if fields.len() != 4 {
        return Err(ProxyError::BadV1);
    }
    let (source, destination) = match family {
        b"TCP4" => (v1_ipv4(fields[0])?, v1_ipv4(fields[1])?),
        b"TCP6" => (v1_ipv6(fields[0])?, v1_ipv6(fields[1])?),
        _ => return Err(ProxyError::BadV1),
    };
    Ok(Some(ProxyHeader {
        source,
        source_port: v1_port(fields[2])?,
        destination,
        destination_port: v1_port(fields[3])?,
        ..unknown(length)
    }))
}

fn v1_ipv4(text: &[u8]) -> Result<Vec<u8>, ProxyError> {
    if text.is_empty() || text.len() > 15 || !text.iter().all(|b| b.is_ascii_digit() || *b == b'.')
    {
        return Err(ProxyError::BadV1);
    }
    let text = std::str::from_utf8(text).map_err(|_| ProxyError::BadV1)?;
    let addr: Ipv4Addr = text.parse().map_err(|_| ProxyError::BadV1)?;
    Ok(addr.octets().to_vec())
}

fn v1_ipv6(text: &[u8]) -> Result<Vec<u8>, ProxyError> {
    // Hex digits, colons and the dots of an embedded IPv4 address: no zone index.
    if text.is_empty()
        || text.len() > 45
        || !text
            .iter()
            .all(|b| b.is_ascii_hexdigit() || *b == b':' || *b == b'.')
    {
        return Err(ProxyError::BadV1);
    }
    let text = std::str::from_utf8(text).map_err(|_| ProxyError::BadV1)?;
    let addr: Ipv6Addr = text.parse().map_err(|_| ProxyError::BadV1)?;
    Ok(addr.octets().to_vec())
}

fn v1_port(text: &[u8]) -> Result<u16, ProxyError> {
    // Decimal, no sign, no leading zero (except "0" itself).
    if text.is_empty()
        || text.len() > 5
        || !text.iter().all(u8::is_ascii_digit)
        || (text.len() > 1 && text[0] == b'0')
    {
        return Err(ProxyError::BadV1);
    }
    let value = text.iter().fold(0u32, |v, d| v * 10 + u32::from(d - b'0'));
    u16::try_from(value).map_err(|_| ProxyError::BadV1)
}

fn parse_v2(data: &[u8], max_len: usize) -> Result<Option<ProxyHeader>, ProxyError> {
    if data.len() < 16 {
        return Ok(None);
    }
    let ver_cmd = data[12];
    if ver_cmd >> 4 != 2 {
        return Err(ProxyError::BadV2);
    }
    let local = match ver_cmd & 0x0f {
        0 => true,
        1 => false,
        _ => return Err(ProxyError::BadV2),
    };
    let fam = data[13];
    let body_len = usize::from(u16::from_be_bytes([data[14], data[15]]));
    let length = 16 + body_len;
    if length > max_len {
        return Err(ProxyError::TooLong);
    }
    if data.len() < length {
        return Ok(None);
    }
    let body = &data[16..length];
    // Address family (high nibble) and transport (low nibble): only TCP carries POP3.
    let addr_len = match fam {
        0x00 => 0,   // AF_UNSPEC
        0x11 => 12,  // TCP over IPv4
        0x21 => 36,  // TCP over IPv6
        0x31 => 216, // AF_UNIX stream: no IP address to use
        _ if local => 0,
        _ => return Err(ProxyError::BadV2),
    };
    if body.len() < addr_len {
        return Err(ProxyError::BadV2);
    }
    let mut header = ProxyHeader {
        length,
        version: 2,
        local,
        source: Vec::new(),
        source_port: 0,
        destination: Vec::new(),
        destination_port: 0,
        ssl: false,
    };
    let port = |at: usize| u16::from_be_bytes([body[at], body[at + 1]]);
    if !local {
        match fam {
            0x11 => {
                header.source = body[0..4].to_vec();
                header.destination = body[4..8].to_vec();
                header.source_port = port(8);
                header.destination_port = port(10);
            }
            0x21 => {
                header.source = body[0..16].to_vec();
                header.destination = body[16..32].to_vec();
                header.source_port = port(32);
                header.destination_port = port(34);
            }
            _ => {}
        }
    }
    // TLVs: type, 16-bit length, value; they must fill the rest exactly.
    let mut tlvs = &body[addr_len..];
    while !tlvs.is_empty() {
        if tlvs.len() < 3 {
            return Err(ProxyError::BadV2);
        }
        let kind = tlvs[0];
        let len = usize::from(u16::from_be_bytes([tlvs[1], tlvs[2]]));
        if tlvs.len() < 3 + len {
            return Err(ProxyError::BadV2);
        }
        let value = &tlvs[3..3 + len];
        if kind == PP2_TYPE_SSL {
            // client flags (1 octet), verify (4 octets), then sub-TLVs.
            if value.len() < 5 {
                return Err(ProxyError::BadV2);
            }
            header.ssl = !local && value[0] & PP2_CLIENT_SSL != 0;
        }
        tlvs = &tlvs[3 + len..];
    }
    Ok(Some(header))
}

/// Builds a version 2 header (for tests, the fuzzer and the load generator): TCP over
/// IPv4 or IPv6 by the address length (4 or 16), LOCAL/AF_UNSPEC for empty addresses,
/// with an SSL TLV when `ssl` is set.
pub fn encode_proxy_v2(
    source: &[u8],
    source_port: u16,
    destination: &[u8],
    destination_port: u16,
    ssl: bool,
) -> Vec<u8> {
    let mut out = PROXY_V2_SIGNATURE.to_vec();
    let (cmd, fam) = match source.len() {
        4 => (0x21, 0x11),
        16 => (0x21, 0x21),
        _ => (0x20, 0x00),
    };
    let mut body = Vec::new();
    if fam != 0 {
        body.extend_from_slice(source);
        body.extend_from_slice(destination);
        body.extend_from_slice(&source_port.to_be_bytes());
        body.extend_from_slice(&destination_port.to_be_bytes());
    }
    if ssl {
        body.extend_from_slice(&[PP2_TYPE_SSL, 0, 5, PP2_CLIENT_SSL, 0, 0, 0, 0]);
    }
    out.push(cmd);
    out.push(fam);
    out.extend_from_slice(&(body.len() as u16).to_be_bytes());
    out.extend_from_slice(&body);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(data: &[u8]) -> Result<Option<ProxyHeader>, ProxyError> {
        parse_proxy_header(data, 1024)
    }

    #[test]
    fn v1_tcp4() {
        let data = b"PROXY TCP4 192.0.2.7 198.51.100.1 56324 110\r\nCAPA\r\n";
        let h = parse(data).unwrap().unwrap();
        assert_eq!(h.length, data.len() - 6);
        assert_eq!(h.source, vec![192, 0, 2, 7]);
        assert_eq!((h.source_port, h.destination_port), (56324, 110));
        for n in 0..h.length {
            assert_eq!(parse(&data[..n]), Ok(None), "prefix {n}");
        }
    }

    #[test]
    fn v1_refusals() {
        for bad in [
            &b"PROXY TCP4 192.0.2.7 198.51.100.1 56324 110\n"[..],
            b"PROXY TCP4 192.0.2.07 198.51.100.1 1 2\r\n",
            b"PROXY TCP4 192.0.2.7 198.51.100.1 056324 110\r\n",
            b"PROXY TCP4 192.0.2.7 198.51.100.1 65536 110\r\n",
            b"PROXY TCP4 192.0.2.7  198.51.100.1 1 110\r\n",
            b"PROXY TCP6 192.0.2.7 198.51.100.1 1 110\r\n",
            b"PROXY TCP6 fe80::1%eth0 ::1 1 110\r\n",
            b"PROXY UDP4 192.0.2.7 198.51.100.1 1 110\r\n",
            b"PROXY TCP4 192.0.2.7 198.51.100.1 1 110 \r\n",
            b"proxy TCP4 192.0.2.7 198.51.100.1 1 110\r\n",
        ] {
            assert!(parse(bad).is_err(), "{:?}", String::from_utf8_lossy(bad));
        }
        assert_eq!(parse(&[b'P'; 1][..]), Ok(None));
        let mut long = b"PROXY UNKNOWN ".to_vec();
        long.resize(107, b'x');
        assert_eq!(parse(&long), Err(ProxyError::BadV1));
        long.truncate(105);
        long.extend_from_slice(b"\r\n");
        assert!(parse(&long).unwrap().is_some());
    }

    #[test]
    fn v2_roundtrip_and_bounds() {
        let data = encode_proxy_v2(&[192, 0, 2, 7], 4000, &[10, 0, 0, 1], 995, true);
        let h = parse(&data).unwrap().unwrap();
        assert_eq!(
            (h.version, h.local, h.ssl, h.length),
            (2, false, true, data.len())
        );
        assert_eq!(h.source, vec![192, 0, 2, 7]);
        for n in 0..data.len() {
            assert_eq!(parse(&data[..n]), Ok(None));
        }
        let six = encode_proxy_v2(&[0xfe; 16], 1, &[1; 16], 2, false);
        assert_eq!(parse(&six).unwrap().unwrap().source, vec![0xfe; 16]);
        let local = encode_proxy_v2(&[], 0, &[], 0, false);
        let h = parse(&local).unwrap().unwrap();
        assert!(h.local && h.source.is_empty());
        let mut huge = PROXY_V2_SIGNATURE.to_vec();
        huge.extend_from_slice(&[0x21, 0x11, 0xff, 0xff]);
        assert_eq!(parse(&huge), Err(ProxyError::TooLong));
        let mut bad_tlv = data.clone();
        bad_tlv.push(0x04); // one more octet: a truncated TLV
        bad_tlv[15] += 1;
        assert_eq!(parse(&bad_tlv), Err(ProxyError::BadV2));
        assert_eq!(parse(b"USER bob\r\n"), Err(ProxyError::NotProxy));
    }
}
