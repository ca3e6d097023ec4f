//! Request path and host normalization, applied once per request before routing and
//! authorization: the normalized path is the one matched, authorized and forwarded.
//!
//! Paths follow Istio's `meshConfig.pathNormalization` (`normalize_path`, `merge_slashes` and
//! `path_with_escaped_slashes_action` of Envoy's connection manager), in Istio's order:
//! 1. percent-escapes: unreserved characters (`A-Z a-z 0-9 - . _ ~`) are decoded, the hex digits
//!    of every other escape are upper-cased (RFC 3986 6.2.2.1; Envoy keeps their case), and
//!    under `DECODE_AND_MERGE_SLASHES` `%2F` and `%5C` are decoded too (Envoy's
//!    `UNESCAPE_AND_FORWARD`). One pass: `%252F` stays `%252F`, nothing is decoded twice;
//! 2. a backslash becomes a forward slash (Envoy's `normalize_path` does, `/a/..\c` -> `/c`);
//! 3. dot segments are removed (RFC 3986 5.2.4; `..` above the root stays at the root);
//! 4. runs of `/` are merged under `MERGE_SLASHES` and `DECODE_AND_MERGE_SLASHES`.
//!
//! A path that cannot be normalized safely is refused: not origin-form, longer than
//! [`MAX_PATH_LEN`], a malformed escape, a control character raw or percent-encoded (`%00`
//! included: Istio always refuses it). Other raw characters, non-ASCII included, pass through
//! unchanged (Envoy would percent-encode some of them).

use std::borrow::Cow;
use std::fmt;
use std::str::FromStr;

use serde::Serialize;

/// Longest request path accepted (Envoy's default `max_request_headers_kb` is 60, but no
/// sensible path comes near this).
pub const MAX_PATH_LEN: usize = 8 * 1024;

/// Istio's `meshConfig.pathNormalization.normalization` values.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum PathNormalization {
    /// The path is forwarded as received (still refused if not origin-form, too long, with a
    /// raw control character or `%00`).
    None,
    /// RFC 3986 normalization plus backslash to slash (Istio's default).
    #[default]
    Base,
    /// `Base`, then runs of `/` merged into one.
    MergeSlashes,
    /// `%2F` and `%5C` decoded first, then `MergeSlashes`.
    DecodeAndMergeSlashes,
}

impl PathNormalization {
    /// The name Istio gives the mode.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::None => "NONE",
            Self::Base => "BASE",
            Self::MergeSlashes => "MERGE_SLASHES",
            Self::DecodeAndMergeSlashes => "DECODE_AND_MERGE_SLASHES",
        }
    }

    fn merges_slashes(self) -> bool {
        matches!(self, Self::MergeSlashes | Self::DecodeAndMergeSlashes)
    }

    fn decodes_slashes(self) -> bool {
        self == Self::DecodeAndMergeSlashes
    }
}

impl fmt::Display for PathNormalization {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for PathNormalization {
    type Err = String;

    /// Istio's names in any case, with `-` for `_` (`merge-slashes`); `DEFAULT` is `BASE`, as in
    /// Istio.
    fn from_str(s: &str) -> Result<Self, String> {
        match s.trim().to_ascii_uppercase().replace('-', "_").as_str() {
            "NONE" => Ok(Self::None),
            "BASE" | "DEFAULT" => Ok(Self::Base),
            "MERGE_SLASHES" => Ok(Self::MergeSlashes),
            "DECODE_AND_MERGE_SLASHES" => Ok(Self::DecodeAndMergeSlashes),
            _ => Err(format!(
                "unknown path normalization {s:?} (NONE, BASE, MERGE_SLASHES or DECODE_AND_MERGE_SLASHES)"
            )),
        }
    }
}

/// Why a path was refused; `at` is the byte offset in the path as received. The client is to
/// blame (400).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum NormalizeError {
    #[error("not an origin-form path (must start with '/')")]
    NotOriginForm,
    #[error("path of {len} bytes is longer than {MAX_PATH_LEN}")]
    TooLong { len: usize },
    #[error("malformed percent-escape at byte {at}")]
    BadEscape { at: usize },
    #[error("percent-encoded control character %{byte:02X} at byte {at}")]
    EncodedControl { byte: u8, at: usize },
    #[error("control character {byte:#04x} at byte {at}")]
    RawControl { byte: u8, at: usize },
}

/// Normalizes `path` (the path only: the caller keeps the query apart, untouched) under `mode`.
/// Borrows `path` when nothing changes, the common case.
pub fn normalize_path(path: &str, mode: PathNormalization) -> Result<Cow<'_, str>, NormalizeError> {
    check_raw(path)?;
    if mode == PathNormalization::None {
        if let Some(at) = path.find("%00") {
            return Err(NormalizeError::EncodedControl { byte: 0, at });
        }
        return Ok(Cow::Borrowed(path));
    }
    if is_normal(path, mode) {
        return Ok(Cow::Borrowed(path));
    }
    let decoded = decode_escapes(path, mode.decodes_slashes())?;
    let mut out = remove_dot_segments(&decoded);
    if mode.merges_slashes() {
        out = merge_slashes(&out);
    }
    // Upper-case escapes that were upper-case already send us here without a change.
    Ok(if out == path { Cow::Borrowed(path) } else { Cow::Owned(out) })
}

/// The host for matching: ASCII lower case, the port removed, then one trailing dot removed
/// (`Echo.Demo.:80` -> `echo.demo`); userinfo, if any, is not part of the host. A bracketed IPv6 literal keeps its brackets
/// (`[::1]:8080` -> `[::1]`), as Envoy's `stripPortFromHost` does; a bare IPv6 literal (more than
/// one `:`, no brackets) is taken as having no port and kept whole.
pub fn normalize_host(authority: &str) -> String {
    let (host, _) = split_authority(authority);
    let host = host.strip_suffix('.').unwrap_or(host);
    host.to_ascii_lowercase()
}

/// The port an authority names, if any (`echo:8080` -> 8080; `echo`, `[::1]` -> none).
pub fn authority_port(authority: &str) -> Option<u16> {
    split_authority(authority).1?.parse().ok()
}

/// An authority split into its host and port text, userinfo dropped (see [`normalize_host`]
/// for the IPv6 forms).
fn split_authority(authority: &str) -> (&str, Option<&str>) {
    let authority = authority.rsplit_once('@').map_or(authority, |(_userinfo, host)| host);
    match authority.rfind(':') {
        // `[v6]:port` has its colon right after the bracket; `[v6]` has none outside it.
        Some(colon) if authority.starts_with('[') && !authority[..colon].ends_with(']') => (authority, None),
        Some(colon) if !authority.starts_with('[') && authority[..colon].contains(':') => (authority, None),
        Some(colon) => (&authority[..colon], Some(&authority[colon + 1..])),
        None => (authority, None),
    }
}

/// Origin-form, within [`MAX_PATH_LEN`], no raw control character.
fn check_raw(path: &str) -> Result<(), NormalizeError> {
    if !path.starts_with('/') {
        return Err(NormalizeError::NotOriginForm);
    }
    if path.len() > MAX_PATH_LEN {
        return Err(NormalizeError::TooLong { len: path.len() });
    }
    match path.bytes().position(is_control) {
        Some(at) => Err(NormalizeError::RawControl { byte: path.as_bytes()[at], at }),
        None => Ok(()),
    }
}

/// Whether `path` is already normalized under `mode`, checked without allocating: no escape,
/// no backslash, no dot segment and, when merging, no `//`.
fn is_normal(path: &str, mode: PathNormalization) -> bool {
    let needs_work = path.contains(['%', '\\'])
        || (mode.merges_slashes() && path.contains("//"))
        || path.split('/').any(|segment| segment == "." || segment == "..");
    !needs_work
}

/// Step 1 and 2: escapes decoded or upper-cased, backslashes (raw or decoded) made slashes.
fn decode_escapes(path: &str, decode_slashes: bool) -> Result<String, NormalizeError> {
    let bytes = path.as_bytes();
    let mut out = String::with_capacity(path.len());
    let mut run_start = 0;
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' => {
                out.push_str(&path[run_start..i]);
                let byte = escape_at(bytes, i)?;
                if is_control(byte) {
                    return Err(NormalizeError::EncodedControl { byte, at: i });
                }
                if is_unreserved(byte) || (decode_slashes && byte == b'/') {
                    out.push(char::from(byte));
                } else if decode_slashes && byte == b'\\' {
                    out.push('/');
                } else {
                    out.push('%');
                    out.push(char::from(HEX_UPPER[usize::from(byte >> 4)]));
                    out.push(char::from(HEX_UPPER[usize::from(byte & 0xf)]));
                }
                i += 3;
                run_start = i;
            }
            b'\\' => {
                out.push_str(&path[run_start..i]);
                out.push('/');
                i += 1;
                run_start = i;
            }
            _ => i += 1,
        }
    }
    out.push_str(&path[run_start..]);
    Ok(out)
}

const HEX_UPPER: &[u8; 16] = b"0123456789ABCDEF";

/// The byte `%XY` at `at` encodes.
fn escape_at(bytes: &[u8], at: usize) -> Result<u8, NormalizeError> {
    match bytes.get(at + 1..at + 3) {
        Some(&[hi, lo]) => match (hex_value(hi), hex_value(lo)) {
            (Some(hi), Some(lo)) => Ok((hi << 4) | lo),
            _ => Err(NormalizeError::BadEscape { at }),
        },
        _ => Err(NormalizeError::BadEscape { at }),
    }
}

fn hex_value(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// RFC 3986 2.3.
fn is_unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

fn is_control(b: u8) -> bool {
    b < 0x20 || b == 0x7f
}

/// RFC 3986 5.2.4 for an absolute path: `.` segments dropped, `..` drops the segment before it
/// (none above the root); a path ending in a dot segment ends in `/`.
fn remove_dot_segments(path: &str) -> String {
    let mut out = String::with_capacity(path.len());
    let mut ends_in_dir = false;
    for segment in path.strip_prefix('/').unwrap_or(path).split('/') {
        match segment {
            "." => ends_in_dir = true,
            ".." => {
                out.truncate(out.rfind('/').unwrap_or(0));
                ends_in_dir = true;
            }
            _ => {
                out.push('/');
                out.push_str(segment);
                ends_in_dir = false;
            }
        }
    }
    if ends_in_dir || out.is_empty() {
        out.push('/');
    }
    out
}

fn merge_slashes(path: &str) -> String {
    let mut out = String::with_capacity(path.len());
    for c in path.chars() {
        if !(c == '/' && out.ends_with('/')) {
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::PathNormalization::{Base, DecodeAndMergeSlashes, MergeSlashes, None as Plain};
    use super::*;
    use rand::Rng;

    const ALL: [PathNormalization; 4] = [Plain, Base, MergeSlashes, DecodeAndMergeSlashes];
    const NORMALIZING: [PathNormalization; 3] = [Base, MergeSlashes, DecodeAndMergeSlashes];

    fn norm(path: &str, mode: PathNormalization) -> String {
        match normalize_path(path, mode) {
            Ok(p) => p.into_owned(),
            Err(e) => panic!("{path:?} under {mode}: {e}"),
        }
    }

    #[test]
    fn parses_istio_names() {
        for mode in ALL {
            assert_eq!(mode.as_str().parse(), Ok(mode));
            assert_eq!(mode.as_str().to_ascii_lowercase().parse(), Ok(mode));
            assert_eq!(mode.as_str().to_ascii_lowercase().replace('_', "-").parse(), Ok(mode));
        }
        assert_eq!("DEFAULT".parse(), Ok(Base));
        assert_eq!(PathNormalization::default(), Base);
        assert!("MERGE".parse::<PathNormalization>().is_err());
        assert!("".parse::<PathNormalization>().is_err());
        assert_eq!(
            serde_json::to_string(&DecodeAndMergeSlashes).ok().as_deref(),
            Some("\"DECODE_AND_MERGE_SLASHES\"")
        );
    }

    #[test]
    fn none_keeps_the_path() {
        for path in ["/", "//admin", "/a/../b", "/%61dmin", "/a%2Fb", "/a\\b", "/%zz", "/caf\u{e9}"] {
            assert!(matches!(normalize_path(path, Plain), Ok(Cow::Borrowed(p)) if p == path), "{path:?}");
        }
    }

    #[test]
    fn base_decodes_unreserved_and_removes_dot_segments() {
        for (path, want) in [
            ("/%61dmin", "/admin"),
            ("/./admin", "/admin"),
            ("/x/../admin", "/admin"),
            ("/%2e%2e/admin", "/admin"),
            ("/%2E%2E/admin", "/admin"),
            ("/a/%2e/b", "/a/b"),
            ("/a/b/%2E./c", "/a/c"),
            ("/a/b/../c", "/a/c"),
            ("/a/b/./c", "/a/b/c"),
            ("/a/b/../../../../c", "/c"),
            ("/../a/b", "/a/b"),
            ("/..", "/"),
            ("/.", "/"),
            ("/a/..", "/"),
            ("/a/b/..", "/a/"),
            ("/a/b/.", "/a/b/"),
            ("/a/b/../", "/a/"),
            ("/a/.b/..c/...", "/a/.b/..c/..."),
            ("/%7Euser/%5F%2D", "/~user/_-"),
            ("/%41%5A%30%39", "/AZ09"),
            ("/A/B/C", "/A/B/C"),
        ] {
            assert_eq!(norm(path, Base), want, "{path:?}");
        }
    }

    #[test]
    fn base_upper_cases_other_escapes_and_keeps_slashes() {
        for (path, want) in [
            ("/a/%2f/c", "/a/%2F/c"),
            ("/a/%2F%2f/c", "/a/%2F%2F/c"),
            ("/%5c%25", "/%5C%25"),
            ("/%c0%af", "/%C0%AF"),
            ("/%252e%252e/admin", "/%252e%252e/admin"),
            ("/a%2F..%2Fadmin", "/a%2F..%2Fadmin"),
            ("//admin", "//admin"),
            ("/a//b", "/a//b"),
        ] {
            assert_eq!(norm(path, Base), want, "{path:?}");
        }
    }

    #[test]
    fn backslashes_become_slashes() {
        // Istio's `\da` -> `/da` is not origin-form, so it is refused here.
        assert_eq!(normalize_path("\\da", Base), Err(NormalizeError::NotOriginForm));
        assert_eq!(norm("/a/..\\c", Base), "/c");
        assert_eq!(norm("/\\da", Base), "//da");
        assert_eq!(norm("/a\\\\b", MergeSlashes), "/a/b");
        assert_eq!(norm("/a\\..\\..\\admin", Base), "/admin");
    }

    #[test]
    fn merge_slashes_after_base() {
        for (path, merged, decoded) in [
            ("//admin", "/admin", "/admin"),
            ("/a///b", "/a/b", "/a/b"),
            ("/a/b//", "/a/b/", "/a/b/"),
            ("///", "/", "/"),
            ("/a//../b", "/a/b", "/a/b"),
            ("/a/%2F/b", "/a/%2F/b", "/a/b"),
            ("//%2e%2e//admin", "/admin", "/admin"),
        ] {
            assert_eq!(norm(path, MergeSlashes), merged, "{path:?}");
            assert_eq!(norm(path, DecodeAndMergeSlashes), decoded, "{path:?}");
        }
    }

    #[test]
    fn decode_and_merge_decodes_escaped_slashes_first() {
        for (path, want) in [
            ("/a%2F..%2Fadmin", "/admin"),
            ("/a%2f..%2fadmin", "/admin"),
            ("/a%5C..%5Cadmin", "/admin"),
            ("/a%5c..%5cadmin", "/admin"),
            ("/a%2fb", "/a/b"),
            ("/a%2F%2Fb", "/a/b"),
            ("/%2F%2Fadmin", "/admin"),
            ("/a/%252F/b", "/a/%252F/b"),
            ("/a%2F%2e%2e%2Fadmin", "/admin"),
        ] {
            assert_eq!(norm(path, DecodeAndMergeSlashes), want, "{path:?}");
        }
        // The other modes leave escaped slashes where they are.
        assert_eq!(norm("/a%2F..%2Fadmin", MergeSlashes), "/a%2F..%2Fadmin");
    }

    #[test]
    fn borrows_when_nothing_changes() {
        for mode in NORMALIZING {
            for path in ["/", "/admin", "/a/b/c/", "/a.b/..c", "/%25", "/a%20b", "/caf\u{e9}"] {
                assert!(matches!(normalize_path(path, mode), Ok(Cow::Borrowed(_))), "{path:?} under {mode}");
            }
            assert!(matches!(normalize_path("/%61", mode), Ok(Cow::Owned(_))));
        }
        assert!(matches!(normalize_path("/%2F", MergeSlashes), Ok(Cow::Borrowed(_))));
        assert!(matches!(normalize_path("/%2F", DecodeAndMergeSlashes), Ok(Cow::Owned(_))));
        assert!(matches!(normalize_path("//a", Base), Ok(Cow::Borrowed(_))));
        assert!(matches!(normalize_path("//a", MergeSlashes), Ok(Cow::Owned(_))));
    }

    #[test]
    fn refuses_what_cannot_be_normalized() {
        use NormalizeError::*;
        for mode in ALL {
            for (path, want) in [
                ("", NotOriginForm),
                ("*", NotOriginForm),
                ("admin", NotOriginForm),
                ("a/b/../c", NotOriginForm),
                ("http://x/y", NotOriginForm),
                ("/a/%00b", EncodedControl { byte: 0, at: 3 }),
                ("/a\nb", RawControl { byte: b'\n', at: 2 }),
                ("/a\0", RawControl { byte: 0, at: 2 }),
                ("/\x7f", RawControl { byte: 0x7f, at: 1 }),
                ("/\r\n", RawControl { byte: b'\r', at: 1 }),
            ] {
                assert_eq!(normalize_path(path, mode), Err(want), "{path:?} under {mode}");
            }
            let long = format!("/{}", "a".repeat(MAX_PATH_LEN));
            assert_eq!(normalize_path(&long, mode), Err(TooLong { len: MAX_PATH_LEN + 1 }));
            assert!(normalize_path(&long[..MAX_PATH_LEN], mode).is_ok());
        }
        for mode in NORMALIZING {
            for (path, want) in [
                ("/%zz", BadEscape { at: 1 }),
                ("/a%", BadEscape { at: 2 }),
                ("/a%4", BadEscape { at: 2 }),
                ("/a%%0000", BadEscape { at: 2 }),
                ("/%\u{e9}9", BadEscape { at: 1 }),
                ("/ab%0g", BadEscape { at: 3 }),
                ("/xyz/.%00../abc", EncodedControl { byte: 0, at: 6 }),
                ("/a%0Ab", EncodedControl { byte: b'\n', at: 2 }),
                ("/a%0d%0a", EncodedControl { byte: b'\r', at: 2 }),
                ("/a%1f", EncodedControl { byte: 0x1f, at: 2 }),
                ("/a%7F", EncodedControl { byte: 0x7f, at: 2 }),
            ] {
                assert_eq!(normalize_path(path, mode), Err(want), "{path:?} under {mode}");
            }
        }
    }

    /// What every normalized path must satisfy: origin-form, a fixed point, no dot segment, no
    /// `//` when merging, no backslash, only upper-case escapes of reserved bytes.
    fn check_normal(input: &str, out: &str, mode: PathNormalization) {
        assert!(out.starts_with('/'), "{input:?} -> {out:?}");
        assert_eq!(norm(out, mode), out, "{input:?} -> {out:?} is not a fixed point under {mode}");
        assert!(
            !out.split('/').any(|s| s == "." || s == ".."),
            "{input:?} -> {out:?} keeps a dot segment under {mode}"
        );
        assert!(!out.contains('\\'), "{input:?} -> {out:?}");
        assert!(!(mode.merges_slashes() && out.contains("//")), "{input:?} -> {out:?}");
        for (at, _) in out.match_indices('%') {
            let byte = escape_at(out.as_bytes(), at).expect("escapes stay well-formed");
            assert!(!is_unreserved(byte), "{input:?} -> {out:?}");
            assert!(!out[at + 1..at + 3].bytes().any(|b| b.is_ascii_lowercase()), "{input:?} -> {out:?}");
        }
    }

    #[test]
    fn normalizing_is_idempotent() {
        let inputs = [
            "/",
            "/admin",
            "//admin",
            "/%61dmin",
            "/./admin",
            "/x/../admin",
            "/%2e%2e/admin",
            "/a/%2e/b",
            "/a%2F..%2Fadmin",
            "/a%5c..%5cadmin",
            "/a///b/",
            "/a/b//../..//c/.",
            "/..//..//x",
            "/%2e%2e%2f%2e%2e%2fetc",
            "/\\..\\admin",
            "/a/%2F%2f/%5c/c",
            "/%252e/%25",
            "/%7e%7E/caf\u{e9}",
            "/.../..../.%2e./",
        ];
        for mode in NORMALIZING {
            for input in inputs {
                check_normal(input, &norm(input, mode), mode);
            }
        }
    }

    #[test]
    fn random_paths_normalize_to_fixed_points() {
        const PIECES: [&str; 16] =
            ["/", "//", ".", "..", "%2e", "%2E", "%2f", "%5C", "%61", "%25", "\\", "a", "B", "~", "%7f", "%"];
        // Seeded, so a failure reproduces.
        let mut rng = <rand::rngs::StdRng as rand::SeedableRng>::seed_from_u64(0x5eed);
        for _ in 0..20_000 {
            let mut path = String::from("/");
            for _ in 0..rng.random_range(0..12) {
                path.push_str(PIECES[rng.random_range(0..PIECES.len())]);
            }
            for mode in NORMALIZING {
                if let Ok(out) = normalize_path(&path, mode) {
                    check_normal(&path, &out, mode);
                }
            }
        }
    }

    #[test]
    fn hosts_for_matching() {
        assert_eq!(authority_port("Echo:8080"), Some(8080));
        assert_eq!(authority_port("[::1]:80"), Some(80));
        assert_eq!(
            (authority_port("echo"), authority_port("[::1]"), authority_port("::1")),
            (None, None, None)
        );
        assert_eq!(authority_port("echo:http"), None);
        for (authority, want) in [
            ("ADMIN.svc", "admin.svc"),
            ("echo.demo.svc.cluster.local.", "echo.demo.svc.cluster.local"),
            ("echo.demo.svc.cluster.local.:80", "echo.demo.svc.cluster.local"),
            ("echo:80", "echo"),
            ("Echo:", "echo"),
            ("echo", "echo"),
            ("10.0.0.1:80", "10.0.0.1"),
            ("10.0.0.1", "10.0.0.1"),
            ("[::1]:8080", "[::1]"),
            ("[::1]", "[::1]"),
            ("[FD00::A]:80", "[fd00::a]"),
            ("fd00::1", "fd00::1"),
            ("echo..", "echo."),
            ("user@Echo:80", "echo"),
            ("", ""),
            (":80", ""),
            ("[", "["),
            ("[:", "[:"),
        ] {
            assert_eq!(normalize_host(authority), want, "{authority:?}");
        }
    }
}
