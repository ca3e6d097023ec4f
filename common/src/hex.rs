//! Lower-case hex text of bytes, pushed onto a string (trace and span ids on every connection
//! and request, where `format!("{:x}")` cost more than the rest of the header).

const DIGITS: &[u8; 16] = b"0123456789abcdef";

/// Appends `bytes` as two lower-case hex digits each.
pub fn push_hex(s: &mut String, bytes: &[u8]) {
    for &b in bytes {
        s.push(char::from(DIGITS[usize::from(b >> 4)]));
        s.push(char::from(DIGITS[usize::from(b & 0xf)]));
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn hex_is_what_format_writes() {
        for n in [0u128, 1, 0xfe, u128::MAX, 0x0123_4567_89ab_cdef_0011_2233_4455_6677] {
            let mut s = String::new();
            super::push_hex(&mut s, &n.to_be_bytes());
            assert_eq!(s, format!("{n:032x}"));
        }
    }
}
