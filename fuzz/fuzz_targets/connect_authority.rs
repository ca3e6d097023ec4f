//! Fuzzes the HBONE CONNECT request check: the authority parser on arbitrary text, and the
//! whole check on a request line (`METHOD URI`) whose method and URI `http` accepts.
#![no_main]

use common::hbone::connect::{Authority, parse, parse_authority};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        check_authority(text);
    }
    let Some(space) = data.iter().position(|b| *b == b' ') else { return };
    let (method, uri) = (&data[..space], &data[space + 1..]);
    if let Ok(text) = std::str::from_utf8(uri) {
        check_authority(text);
    }
    let (Ok(method), Ok(uri)) = (http::Method::from_bytes(method), http::Uri::try_from(uri)) else {
        return;
    };
    if let Ok(a) = parse(&method, &uri) {
        assert_eq!(method, http::Method::CONNECT);
        assert!(uri.scheme().is_none(), "accepted {uri} with a scheme");
        let authority = uri.authority().map(http::uri::Authority::as_str).unwrap_or_default();
        assert_eq!(parse_authority(authority), Ok(a), "parse and parse_authority disagree on {uri}");
    }
});

/// Whatever is accepted is a plain `ip:port` or a DNS name with a port, non-zero, and prints
/// back to an authority that parses to the same thing.
fn check_authority(text: &str) {
    let Ok(a) = parse_authority(text) else { return };
    match &a {
        Authority::Addr(addr) => assert_ne!(addr.port(), 0, "{text:?}"),
        Authority::Host { host, port } => {
            assert_ne!(*port, 0, "{text:?}");
            assert!(!host.is_empty() && host.len() <= 253, "{text:?}");
            assert!(
                host.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'.' || b == b'-'),
                "{text:?} gave host {host:?}"
            );
        }
    }
    assert_eq!(parse_authority(&a.to_string()), Ok(a.clone()), "{text:?} does not round-trip");
}
