//! PROXY header parser on arbitrary input: never panics; a complete header is no longer
//! than the input, the limit or 107 octets (v1); every shorter prefix of it is "need
//! more"; what follows it does not change it. Then a round trip: a v2 header built from
//! the input's octets parses back to the same fields.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pop3_wire::{encode_proxy_v2, parse_proxy_header, PROXY_V1_MAX};

fuzz_target!(|input: &[u8]| {
    let Some((&pick, data)) = input.split_first() else {
        return;
    };
    let max_len = [16, 60, 107, 200, 1024, 65551][usize::from(pick % 6)];
    if let Ok(Some(h)) = parse_proxy_header(data, max_len) {
        assert!(h.length <= data.len() && h.length <= max_len);
        assert!(h.version == 2 || h.length <= PROXY_V1_MAX);
        assert!(matches!(h.source.len(), 0 | 4 | 16) && h.source.len() == h.destination.len());
        for n in 0..h.length {
            assert_eq!(
                parse_proxy_header(&data[..n], max_len),
                Ok(None),
                "prefix {n}"
            );
        }
        let mut more = data[..h.length].to_vec();
        more.extend_from_slice(b"\x16\x03\x01garbage");
        assert_eq!(parse_proxy_header(&more, max_len), Ok(Some(h)));
    }
    // Round trip of v2 built from the input.
    if data.len() >= 36 {
        let n = if pick & 0x80 != 0 { 16 } else { 4 };
        let (src, dst) = (&data[..n], &data[16..16 + n]);
        let sport = u16::from_be_bytes([data[32], data[33]]);
        let dport = u16::from_be_bytes([data[34], data[35]]);
        let ssl = pick & 0x40 != 0;
        let header = encode_proxy_v2(src, sport, dst, dport, ssl);
        let h = parse_proxy_header(&header, 1024).unwrap().unwrap();
        assert_eq!(h.length, header.len());
        assert_eq!((h.source.as_slice(), h.destination.as_slice()), (src, dst));
        assert_eq!(
            (h.source_port, h.destination_port, h.ssl),
            (sport, dport, ssl)
        );
    }
});
