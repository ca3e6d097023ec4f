//! Fuzzes request path normalization (and host normalization) on arbitrary text: the first byte
//! picks the mode, the rest is the path. What is accepted is origin-form and, when normalized,
//! a fixed point with no dot segment (and no `//` when slashes are merged).
#![no_main]

use libfuzzer_sys::fuzz_target;
use waypoint::route::normalize::{PathNormalization, normalize_host, normalize_path};

const MODES: [PathNormalization; 4] = [
    PathNormalization::None,
    PathNormalization::Base,
    PathNormalization::MergeSlashes,
    PathNormalization::DecodeAndMergeSlashes,
];

fuzz_target!(|data: &[u8]| {
    let Some((&selector, rest)) = data.split_first() else { return };
    let mode = MODES[usize::from(selector) % MODES.len()];
    let text = String::from_utf8_lossy(rest);
    check_path(&text, mode);
    check_host(&text);
});

fn check_path(path: &str, mode: PathNormalization) {
    let Ok(out) = normalize_path(path, mode) else { return };
    assert!(out.starts_with('/'), "{path:?} -> {out:?} under {mode}");
    if mode == PathNormalization::None {
        assert_eq!(out, path, "NONE changed {path:?}");
        return;
    }
    assert!(out.len() <= path.len(), "{path:?} -> {out:?} grew under {mode}");
    match normalize_path(&out, mode) {
        Ok(again) => assert_eq!(again, out, "{path:?} -> {out:?} is not a fixed point under {mode}"),
        Err(e) => panic!("{path:?} -> {out:?} is refused under {mode}: {e}"),
    }
    assert!(
        !out.contains("/./") && !out.contains("/../") && !out.ends_with("/.") && !out.ends_with("/.."),
        "{path:?} -> {out:?} keeps a dot segment under {mode}"
    );
    assert!(!out.contains('\\'), "{path:?} -> {out:?} keeps a backslash under {mode}");
    if mode != PathNormalization::Base {
        assert!(!out.contains("//"), "{path:?} -> {out:?} keeps a `//` under {mode}");
    }
}

/// The host is lower case, no longer than the authority and without userinfo.
fn check_host(authority: &str) {
    let host = normalize_host(authority);
    assert!(!host.bytes().any(|b| b.is_ascii_uppercase()), "{authority:?} -> {host:?}");
    assert!(host.len() <= authority.len(), "{authority:?} -> {host:?}");
    assert!(!host.contains('@'), "{authority:?} -> {host:?}");
}
