//! The commands of a mail download in their plain shape, parsed without the general
//! command parser (which answers every other line, and the same for these).

/// TOP's line count is capped here, as the general parser caps it (a larger count
/// sends the whole body anyway).
pub const MAX_TOP_LINES: u64 = 1 << 32;

/// `RETR n` as `(n, None)` and `TOP n m` as `(n, Some(m))` in their plain shape: the
/// verb in any case, one space before each argument, ASCII digits only, nothing after
/// (the line end is already gone). Numbers saturate at `u64::MAX` (no maildrop holds
/// that many messages) and `m` at [`MAX_TOP_LINES`]. `None` for any other line.
pub fn plain_fetch(line: &[u8]) -> Option<(u64, Option<u64>)> {
    if line.len() >= 5 && line[..5].eq_ignore_ascii_case(b"RETR ") {
        return Some((digits(&line[5..])?, None));
    }
    if line.len() >= 4 && line[..4].eq_ignore_ascii_case(b"TOP ") {
        let rest = &line[4..];
        let space = rest.iter().position(|&b| b == b' ')?;
        let msg = digits(&rest[..space])?;
        let lines = digits(&rest[space + 1..])?;
        return Some((msg, Some(lines.min(MAX_TOP_LINES))));
    }
    None
}

/// One or more ASCII digits as a number, saturated at `u64::MAX`.
fn digits(s: &[u8]) -> Option<u64> {
    if s.is_empty() {
        return None;
    }
    let mut n: u64 = 0;
    for &b in s {
        if !b.is_ascii_digit() {
            return None;
        }
        n = n.saturating_mul(10).saturating_add(u64::from(b - b'0'));
    }
    Some(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_shapes() {
        assert_eq!(plain_fetch(b"RETR 1"), Some((1, None)));
        assert_eq!(plain_fetch(b"retr 007"), Some((7, None)));
        assert_eq!(plain_fetch(b"Top 2 0"), Some((2, Some(0))));
        assert_eq!(
            plain_fetch(b"TOP 2 99999999999"),
            Some((2, Some(MAX_TOP_LINES)))
        );
        assert_eq!(
            plain_fetch(b"RETR 99999999999999999999999"),
            Some((u64::MAX, None))
        );
    }

    #[test]
    fn other_shapes_are_not_ours() {
        for line in [
            &b"RETR"[..],
            b"RETR ",
            b"RETR  1",
            b"RETR 1 ",
            b"RETR +1",
            b"RETR -1",
            b"RETR 1x",
            b"RETR \xd9\xa1",
            b"RETRX 1",
            b"TOP 1",
            b"TOP 1 ",
            b"TOP  1 1",
            b"TOP 1  1",
            b"TOP 1 1 1",
            b"TOP x 1",
            b"TOPS 1 1",
            b"DELE 1",
            b"",
        ] {
            assert_eq!(plain_fetch(line), None, "{line:?}");
        }
    }
}
