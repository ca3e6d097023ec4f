//! Fuzzes the `forwarded` header parser (`for=` of the original client) on any bytes `http`
//! accepts as a header value.
#![no_main]

use common::hbone::connect::forwarded_for;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(value) = http::HeaderValue::from_bytes(data) else { return };
    let mut headers = http::HeaderMap::new();
    headers.insert("forwarded", value.clone());
    let found = forwarded_for(&headers);
    if let Some(addr) = found {
        let text = value.to_str().expect("a value with an address is text");
        assert!(text.to_ascii_lowercase().contains("for="), "{text:?} gave {addr} without for=");
    }
});
