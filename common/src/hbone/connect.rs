//! Validation of an incoming CONNECT request: method, authority form, no path or scheme.

use std::net::{IpAddr, SocketAddr};

use http::{Method, StatusCode};

/// Where a CONNECT asks to go.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Authority {
    /// `ip:port` (a pod or a service VIP).
    Addr(SocketAddr),
    /// `hostname:port` (a service by name; only some servers accept it).
    Host { host: String, port: u16 },
}

impl std::fmt::Display for Authority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            // Piece by piece for IPv4 (the standard `Display` formats twice, for padding):
            // every outbound HBONE connection writes its authority.
            Authority::Addr(a) => std::fmt::Display::fmt(&crate::telemetry::LogAddr(a), f),
            Authority::Host { host, port } => write!(f, "{host}:{port}"),
        }
    }
}

/// Why a CONNECT request is malformed; every case answers 400.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ConnectError {
    #[error("method {0} is not CONNECT")]
    NotConnect(String),
    #[error("CONNECT without an authority")]
    MissingAuthority,
    #[error("CONNECT carries a path or scheme: {0}")]
    HasPath(String),
    #[error("authority {0:?} is not host:port")]
    BadAuthority(String),
    #[error("authority {0:?} has port 0")]
    ZeroPort(String),
}

impl ConnectError {
    pub fn status(&self) -> StatusCode {
        StatusCode::BAD_REQUEST
    }
}

/// Checks a request is a well-formed HBONE CONNECT and returns its authority.
pub fn parse(method: &Method, uri: &http::Uri) -> Result<Authority, ConnectError> {
    if method != Method::CONNECT {
        return Err(ConnectError::NotConnect(method.to_string()));
    }
    if uri.scheme().is_some()
        || uri.path_and_query().is_some_and(|p| !p.as_str().is_empty() && p.as_str() != "/")
    {
        return Err(ConnectError::HasPath(uri.to_string()));
    }
    let authority = uri.authority().ok_or(ConnectError::MissingAuthority)?.as_str();
    parse_authority(authority)
}

/// Parses `ip:port`, `[v6]:port` or `hostname:port`.
pub fn parse_authority(authority: &str) -> Result<Authority, ConnectError> {
    let bad = || ConnectError::BadAuthority(authority.to_string());
    if authority.contains('@') {
        return Err(bad());
    }
    if let Ok(addr) = authority.parse::<SocketAddr>() {
        if addr.port() == 0 {
            return Err(ConnectError::ZeroPort(authority.to_string()));
        }
        return Ok(Authority::Addr(addr));
    }
    let (host, port) = authority.rsplit_once(':').ok_or_else(bad)?;
    let port: u16 = port.parse().map_err(|_| bad())?;
    if port == 0 {
        return Err(ConnectError::ZeroPort(authority.to_string()));
    }
    let label_ok = |l: &str| {
        !l.is_empty()
            && l.len() <= 63
            && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
            && !l.starts_with('-')
            && !l.ends_with('-')
    };
    // An IP-looking host that did not parse as an address is malformed, not a hostname.
    let looks_numeric = host.bytes().all(|b| b.is_ascii_digit() || b == b'.');
    if host.is_empty() || host.len() > 253 || looks_numeric || !host.split('.').all(label_ok) {
        return Err(bad());
    }
    Ok(Authority::Host { host: host.to_ascii_lowercase(), port })
}

/// The `for=` address of a `forwarded` header (`for="10.0.0.1:4000"`, `for=10.0.0.1`).
pub fn forwarded_for(headers: &http::HeaderMap) -> Option<SocketAddr> {
    let value = headers.get("forwarded")?.to_str().ok()?;
    value.split([';', ',']).find_map(|part| {
        let (k, v) = part.trim().split_once('=')?;
        if !k.eq_ignore_ascii_case("for") {
            return None;
        }
        let v = v.trim_matches('"');
        v.parse::<SocketAddr>().ok().or_else(|| v.parse::<IpAddr>().ok().map(|ip| SocketAddr::new(ip, 0)))
    })
}

/// The client a CONNECT's `forwarded` header names, believed only when the peer proved the
/// identity of the workload at that address (a ztunnel speaks for its own pods only): the
/// address and that workload. `None` when there is no such header or it is not proven; then
/// the peer's own address is the source. An unproven claim is logged.
pub fn proven_client<'a>(
    headers: &http::HeaderMap,
    peer: &crate::identity::Identity,
    snapshot: &'a crate::state::Snapshot,
) -> Option<(SocketAddr, &'a std::sync::Arc<crate::state::Workload>)> {
    let claimed = forwarded_for(headers)?;
    let proven = snapshot.workload_by_ip(claimed.ip()).filter(|w| w.identity == *peer);
    if proven.is_none() {
        tracing::debug!(%peer, %claimed, "forwarded address ignored: the peer is not the workload at it");
    }
    proven.map(|w| (claimed, w))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::Rng;

    #[test]
    fn accepts_addresses_and_hostnames() {
        assert_eq!(
            parse_authority("10.0.0.1:8080"),
            Ok(Authority::Addr("10.0.0.1:8080".parse().expect("addr")))
        );
        assert_eq!(
            parse_authority("[fd00::1]:80"),
            Ok(Authority::Addr("[fd00::1]:80".parse().expect("addr")))
        );
        assert_eq!(
            parse_authority("Echo.default.svc.cluster.local:80"),
            Ok(Authority::Host { host: "echo.default.svc.cluster.local".into(), port: 80 })
        );
    }

    #[test]
    fn authorities_print_as_they_parse() {
        for text in ["10.0.0.1:8080", "0.0.0.0:1", "255.255.255.255:65535", "[fd00::1]:80", "web.demo:443"] {
            let a = parse_authority(text).expect("valid");
            assert_eq!(a.to_string(), text);
            assert_eq!(parse_authority(&a.to_string()), Ok(a));
        }
    }

    #[test]
    fn refuses_malformed_authorities() {
        for bad in [
            "",
            "10.0.0.1",
            "10.0.0.1:",
            "10.0.0.1:0",
            "10.0.0.1:65536",
            "10.0.0.256:80",
            "1.2.3:80",
            ":80",
            "user@10.0.0.1:80",
            "fd00::1:80",
            "[fd00::1]",
            "host:port",
            "-bad.example:80",
            "a..b:80",
            "a b:80",
            "10.0.0.1:80:80",
        ] {
            assert!(parse_authority(bad).is_err(), "{bad:?} must be refused");
        }
    }

    #[test]
    fn method_and_path_are_checked() {
        let uri: http::Uri = "10.0.0.1:80".parse().expect("uri");
        assert!(matches!(parse(&Method::GET, &uri), Err(ConnectError::NotConnect(_))));
        assert!(parse(&Method::CONNECT, &uri).is_ok());
        let with_path: http::Uri = "http://10.0.0.1:80/x".parse().expect("uri");
        assert!(matches!(parse(&Method::CONNECT, &with_path), Err(ConnectError::HasPath(_))));
    }

    /// Property: on arbitrary input the parser never panics, and whatever it accepts prints back
    /// to an authority it accepts again with the same meaning.
    #[test]
    fn property_random_authorities_never_panic_and_round_trip() {
        let alphabet = b"0123456789abcdefABCDEF.:[]-@ %/_xyz";
        let mut rng = rand::rng();
        let mut accepted = 0;
        for _ in 0..200_000 {
            let len = rng.random_range(0..24);
            let s: String = (0..len).map(|_| alphabet[rng.random_range(0..alphabet.len())] as char).collect();
            if let Ok(a) = parse_authority(&s) {
                accepted += 1;
                let again = parse_authority(&a.to_string()).expect("printed authority parses");
                assert_eq!(again, a, "round trip of {s:?}");
            }
        }
        // Also feed raw bytes through the full request path.
        for _ in 0..20_000 {
            let len = rng.random_range(0..40);
            let bytes: Vec<u8> = (0..len).map(|_| rng.random()).collect();
            if let Ok(uri) = http::Uri::try_from(bytes.as_slice()) {
                let _ = parse(&Method::CONNECT, &uri);
            }
        }
        assert!(accepted > 0, "the generator should hit some valid authorities");
    }

    /// Property: `forwarded` values from the network never panic the parser, and an address
    /// it returns is one that was written in the value. Values are built from well-formed and
    /// broken pieces with random garbage in between.
    #[test]
    fn property_random_forwarded_values_never_panic() {
        let prefixes = ["for=", "FOR=", "host=x;for=", "for=\"", "", "by=a, for=", "for=for="];
        let garbage = b"=;,\" []:.9af";
        let mut rng = rand::rng();
        let mut found = 0;
        for _ in 0..50_000 {
            let ip = std::net::Ipv4Addr::from(rng.random::<u32>());
            let addr = match rng.random_range(0..4) {
                0 => ip.to_string(),
                1 => format!("{ip}:{}", rng.random::<u16>()),
                2 => format!("[2001:db8::{:x}]:{}", rng.random::<u16>(), rng.random::<u16>()),
                _ => (0..rng.random_range(0..12))
                    .map(|_| garbage[rng.random_range(0..garbage.len())] as char)
                    .collect(),
            };
            let tail: String = (0..rng.random_range(0..4))
                .map(|_| garbage[rng.random_range(0..garbage.len())] as char)
                .collect();
            let v = format!("{}{addr}{tail}", prefixes[rng.random_range(0..prefixes.len())]);
            let Ok(value) = http::HeaderValue::from_str(&v) else { continue };
            let mut h = http::HeaderMap::new();
            h.insert("forwarded", value);
            if let Some(a) = forwarded_for(&h) {
                found += 1;
                assert!(v.contains(&a.ip().to_string()), "{v:?} -> {a}");
            }
        }
        assert!(found > 1000, "the generator should hit parsable values often: {found}");
    }

    #[test]
    fn forwarded_for_forms() {
        let mut h = http::HeaderMap::new();
        assert_eq!(forwarded_for(&h), None);
        h.insert("forwarded", "for=\"10.1.1.2:4000\";host=echo.demo".parse().expect("value"));
        assert_eq!(forwarded_for(&h), Some("10.1.1.2:4000".parse().expect("addr")));
        h.insert("forwarded", "host=x;for=10.1.1.3".parse().expect("value"));
        assert_eq!(forwarded_for(&h), Some("10.1.1.3:0".parse().expect("addr")));
        h.insert("forwarded", "for=\"[2001:db8::1]:80\"".parse().expect("value"));
        assert_eq!(forwarded_for(&h), Some("[2001:db8::1]:80".parse().expect("addr")));
        h.insert("forwarded", "for=unknown".parse().expect("value"));
        assert_eq!(forwarded_for(&h), None);
    }
}
