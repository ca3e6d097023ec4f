//! Lower-case hex text of bytes, pushed onto a string or written into a buffer (trace and span
//! ids on every connection and request, where `format!("{:x}")` cost more than the rest of the
//! header, and pushing digit by digit a third of what is left).

const DIGITS: &[u8; 16] = b"0123456789abcdef";

/// Writes `bytes` as two lower-case hex digits each at the start of `out`; returns how many
/// digits were written (`2 * bytes.len()`, or fewer if `out` is shorter).
pub fn write_hex(out: &mut [u8], bytes: &[u8]) -> usize {
    let mut n = 0;
    for (pair, &b) in out.chunks_exact_mut(2).zip(bytes) {
        pair[0] = DIGITS[usize::from(b >> 4)];
        pair[1] = DIGITS[usize::from(b & 0xf)];
        n += 2;
    }
    n
}

/// Appends `bytes` as two lower-case hex digits each.
pub fn push_hex(s: &mut String, bytes: &[u8]) {
    let mut buf = [0u8; 64];
    s.reserve(bytes.len() * 2);
    for chunk in bytes.chunks(buf.len() / 2) {
        let n = write_hex(&mut buf, chunk);
        // Hex digits are ASCII: this never fails.
        if let Ok(digits) = std::str::from_utf8(&buf[..n]) {
            s.push_str(digits);
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn hex_is_what_format_writes() {
        for n in [0u128, 1, 0xfe, u128::MAX, 0x0123_4567_89ab_cdef_0011_2233_4455_6677] {
            let mut s = String::from("x");
            super::push_hex(&mut s, &n.to_be_bytes());
            assert_eq!(s, format!("x{n:032x}"));
        }
        // Longer than one chunk of the stack buffer.
        let long: Vec<u8> = (0..=255).collect();
        let mut s = String::new();
        super::push_hex(&mut s, &long);
        assert_eq!(s, long.iter().map(|b| format!("{b:02x}")).collect::<String>());
    }

    #[test]
    fn write_hex_stops_at_the_end_of_its_buffer() {
        let mut out = [b'.'; 5];
        assert_eq!(super::write_hex(&mut out, &[0xab, 0xcd, 0xef]), 4);
        assert_eq!(&out, b"abcd.");
    }
}
