//! Envoy's pairs serialization, in which proxy-wasm hands over header maps and property
//! values that are maps: a 32-bit count, the 32-bit lengths of each name and value, then
//! each name and value followed by a NUL (all little-endian). Read in place, without a
//! copy or a UTF-8 check per entry: the SDK's own reader allocates two strings per entry
//! and panics (killing the VM) on a header value that is not UTF-8, which a client can
//! send.

/// The `(name, value)` entries of `bytes`; `None` unless the bytes are exactly that form.
pub fn parse(bytes: &[u8]) -> Option<Vec<(&[u8], &[u8])>> {
    if bytes.is_empty() {
        return Some(Vec::new()); // what a host sends for an empty map
    }
    let word = |at: usize| -> Option<usize> {
        let b = bytes.get(at..at.checked_add(4)?)?;
        Some(u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize)
    };
    let count = word(0)?;
    let mut data = 4usize.checked_add(count.checked_mul(8)?)?;
    if data > bytes.len() {
        return None;
    }
    let mut pairs = Vec::with_capacity(count);
    for i in 0..count {
        let (name_len, value_len) = (word(4 + 8 * i)?, word(8 + 8 * i)?);
        let name = bytes.get(data..data.checked_add(name_len)?)?;
        data += name_len;
        if bytes.get(data) != Some(&0) {
            return None;
        }
        data += 1;
        let value = bytes.get(data..data.checked_add(value_len)?)?;
        data += value_len;
        if bytes.get(data) != Some(&0) {
            return None;
        }
        data += 1;
        pairs.push((name, value));
    }
    (data == bytes.len()).then_some(pairs)
}

/// The value of the last entry named `name` (ASCII case ignored, as header names are).
pub fn get<'a>(entries: &[(&[u8], &'a [u8])], name: &str) -> Option<&'a [u8]> {
    entries
        .iter()
        .rev()
        .find(|(n, _)| n.eq_ignore_ascii_case(name.as_bytes()))
        .map(|(_, v)| *v)
}

/// `entries` in the same form (for tests and benchmarks that play the host).
pub fn serialize(entries: &[(&[u8], &[u8])]) -> Vec<u8> {
    let mut out = (entries.len() as u32).to_le_bytes().to_vec();
    for (name, value) in entries {
        out.extend((name.len() as u32).to_le_bytes());
        out.extend((value.len() as u32).to_le_bytes());
    }
    for (name, value) in entries {
        out.extend_from_slice(name);
        out.push(0);
        out.extend_from_slice(value);
        out.push(0);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_exactly_the_pairs_form() {
        let entries: Vec<(&[u8], &[u8])> = vec![
            (b":path", b"/a?b=c"),
            (b"x-odd", b"caf\xe9"),
            (b"empty", b""),
        ];
        let bytes = serialize(&entries);
        assert_eq!(parse(&bytes), Some(entries.clone()));
        assert_eq!(get(&entries, ":PATH"), Some(&b"/a?b=c"[..]));
        assert_eq!(get(&entries, "other"), None);
        for cut in 1..bytes.len() {
            assert!(parse(&bytes[..cut]).is_none(), "cut at {cut}");
        }
        let mut longer = bytes.clone();
        longer.push(0);
        assert!(parse(&longer).is_none());
        assert_eq!(parse(&[]), Some(vec![]));
        assert_eq!(parse(&[0, 0, 0, 0]), Some(vec![]));
        assert!(parse(&[0xff; 4]).is_none());
        let mut no_nul = bytes;
        no_nul[4 + 3 * 8 + 5] = b'x';
        assert!(parse(&no_nul).is_none());
    }
}
