//! How the fuzz targets cut one input into what a parser takes: leading lines for the names
//! (a znode's, a service's), the rest as the bytes of data. Seeds stay readable that way.

/// The first `N` lines of `input` as text (empty when missing or not UTF-8) and the rest.
pub fn lines<const N: usize>(input: &[u8]) -> ([&str; N], &[u8]) {
    let mut names = [""; N];
    let mut rest = input;
    for name in &mut names {
        let (line, after) = match rest.iter().position(|&byte| byte == b'\n') {
            Some(end) => (&rest[..end], &rest[end + 1..]),
            None => (rest, &rest[rest.len()..]),
        };
        *name = std::str::from_utf8(line).unwrap_or_default();
        rest = after;
    }
    (names, rest)
}

/// Znodes under a registry root: records separated by NUL bytes, each a path relative to the
/// root on its first line and the znode's data after it.
pub fn znodes(input: &[u8]) -> impl Iterator<Item = (&str, &[u8])> {
    input.split(|&byte| byte == 0).map(|record| {
        let ([path], data) = lines::<1>(record);
        (path, data)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inputs_are_cut_into_names_and_data() {
        assert_eq!(
            lines::<2>(b"orders\nabc-1\n{\"a\":\n1}"),
            (["orders", "abc-1"], &b"{\"a\":\n1}"[..])
        );
        assert_eq!(lines::<2>(b"orders"), (["orders", ""], &b""[..]));
        let records: Vec<_> = znodes(b"web\n\0web/i-1\n{}").collect();
        assert_eq!(records, [("web", &b""[..]), ("web/i-1", &b"{}"[..])]);
    }
}
