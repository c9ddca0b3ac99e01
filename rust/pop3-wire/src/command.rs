//! The commands of a mail download in their plain shape, parsed without the general
//! command parser (which answers every other line, and the same for these).

/// TOP's line count is capped here, as the general parser caps it (a larger count
/// sends the whole body anyway).
pub const MAX_TOP_LINES: u64 = 1 << 32;

/// The commands of a mail download in their plain shape (see [`plain_download`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Download {
    /// `RETR n`
    Retr(u64),
    /// `TOP n m`, `m` capped at [`MAX_TOP_LINES`]
    Top(u64, u64),
    /// `DELE n`
    Dele(u64),
}

/// `RETR n`, `TOP n m` and `DELE n` in their plain shape: the verb in any case, one
/// space before each argument, ASCII digits only, nothing after (the line end is
/// already gone). Numbers saturate at `u64::MAX` (no maildrop holds that many
/// messages) and `m` at [`MAX_TOP_LINES`]. `None` for any other line.
pub fn plain_download(line: &[u8]) -> Option<Download> {
    if line.len() >= 5 {
        let (verb, arg) = line.split_at(5);
        if verb.eq_ignore_ascii_case(b"RETR ") {
            return Some(Download::Retr(digits(arg)?));
        }
        if verb.eq_ignore_ascii_case(b"DELE ") {
            return Some(Download::Dele(digits(arg)?));
        }
    }
    if line.len() >= 4 && line[..4].eq_ignore_ascii_case(b"TOP ") {
        let rest = &line[4..];
        let space = rest.iter().position(|&b| b == b' ')?;
        let msg = digits(&rest[..space])?;
        let lines = digits(&rest[space + 1..])?;
        return Some(Download::Top(msg, lines.min(MAX_TOP_LINES)));
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
        assert_eq!(plain_download(b"RETR 1"), Some(Download::Retr(1)));
        assert_eq!(plain_download(b"retr 007"), Some(Download::Retr(7)));
        assert_eq!(plain_download(b"dEle 12"), Some(Download::Dele(12)));
        assert_eq!(plain_download(b"Top 2 0"), Some(Download::Top(2, 0)));
        assert_eq!(
            plain_download(b"TOP 2 99999999999"),
            Some(Download::Top(2, MAX_TOP_LINES))
        );
        assert_eq!(
            plain_download(b"RETR 99999999999999999999999"),
            Some(Download::Retr(u64::MAX))
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
            b"DELE",
            b"DELE 1 2",
            b"DELE x",
            b"TOP 1",
            b"TOP 1 ",
            b"TOP  1 1",
            b"TOP 1  1",
            b"TOP 1 1 1",
            b"TOP x 1",
            b"TOPS 1 1",
            b"LIST 1",
            b"",
        ] {
            assert_eq!(plain_download(line), None, "{line:?}");
        }
    }
}
