//! Value syntaxes shared by the kinds: durations (Go's syntax, which Gateway API and Istio
//! both use), application protocols, addresses and Istio's string patterns.

use std::net::IpAddr;
use std::time::Duration;

use ipnet::IpNet;
use proto::security as sec;
use proto::workload as wl;

/// Parses a duration in Go's syntax (`1h2m3.5s`, `250ms`, `10s`); up to one year.
pub fn duration(s: &str) -> Result<Duration, String> {
    let bad = || format!("{s:?} is not a duration (e.g. 10s, 1m30s, 250ms)");
    if s.is_empty() || s == "0" {
        return if s.is_empty() { Err(bad()) } else { Ok(Duration::ZERO) };
    }
    let mut total = 0f64;
    let mut rest = s;
    while !rest.is_empty() {
        let num_len = rest.find(|c: char| !(c.is_ascii_digit() || c == '.')).ok_or_else(bad)?;
        if num_len == 0 {
            return Err(bad());
        }
        let value: f64 = rest[..num_len].parse().map_err(|_| bad())?;
        rest = &rest[num_len..];
        let unit_len = rest.find(|c: char| c.is_ascii_digit() || c == '.').unwrap_or(rest.len());
        let scale = match &rest[..unit_len] {
            "h" => 3600.0,
            "m" => 60.0,
            "s" => 1.0,
            "ms" => 1e-3,
            "us" | "µs" => 1e-6,
            "ns" => 1e-9,
            _ => return Err(bad()),
        };
        rest = &rest[unit_len..];
        total += value * scale;
    }
    if !total.is_finite() || total > 365.0 * 24.0 * 3600.0 {
        return Err(format!("{s:?} is longer than a year"));
    }
    Ok(Duration::from_secs_f64(total))
}

pub fn proto_duration(d: Duration) -> prost_types::Duration {
    prost_types::Duration {
        seconds: i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        nanos: i32::try_from(d.subsec_nanos()).unwrap_or(0),
    }
}

/// A duration field as the proto type, naming the field on error.
pub fn duration_field(field: &str, s: &str) -> Result<prost_types::Duration, super::Fault> {
    duration(s).map(proto_duration).map_err(|e| super::Fault::new(field, e))
}

/// The application protocol of a Service port: its `appProtocol`, else the prefix of its name
/// (Istio's protocol selection), else unknown (the waypoint follows the client).
pub fn app_protocol(app_protocol: Option<&str>, port_name: &str) -> wl::AppProtocol {
    let from = |p: &str| match p.to_ascii_lowercase().as_str() {
        "http" | "http1" | "http11" => Some(wl::AppProtocol::Http11),
        "http2" | "h2c" | "kubernetes.io/h2c" => Some(wl::AppProtocol::Http2),
        "grpc" | "grpc-web" => Some(wl::AppProtocol::Grpc),
        "tcp" | "mongo" | "mysql" | "redis" => Some(wl::AppProtocol::Tcp),
        "tls" | "https" | "kubernetes.io/wss" => Some(wl::AppProtocol::Tls),
        _ => None,
    };
    if let Some(p) = app_protocol.and_then(from) {
        return p;
    }
    let prefix = port_name.split('-').next().unwrap_or_default();
    from(prefix).unwrap_or(wl::AppProtocol::Unknown)
}

pub fn ip_bytes(ip: IpAddr) -> Vec<u8> {
    match ip {
        IpAddr::V4(v4) => v4.octets().to_vec(),
        IpAddr::V6(v6) => v6.octets().to_vec(),
    }
}

pub fn ip(field: &str, s: &str) -> Result<IpAddr, super::Fault> {
    s.parse().map_err(|_| super::Fault::new(field, format!("{s:?} is not an IP address")))
}

/// An address or CIDR.
pub fn net(field: &str, s: &str) -> Result<sec::Address, super::Fault> {
    let net = match s.parse::<IpNet>() {
        Ok(n) => n,
        Err(_) => IpNet::from(ip(field, s)?),
    };
    Ok(sec::Address { address: ip_bytes(net.addr()), length: u32::from(net.prefix_len()) })
}

/// Istio's string pattern: `*` any (presence), `abc*` prefix, `*abc` suffix, else exact.
pub fn string_match(s: &str) -> sec::StringMatch {
    use sec::string_match::MatchType;
    let m = if s == "*" {
        MatchType::Presence(())
    } else if let Some(p) = s.strip_suffix('*') {
        MatchType::Prefix(p.to_string())
    } else if let Some(p) = s.strip_prefix('*') {
        MatchType::Suffix(p.to_string())
    } else {
        MatchType::Exact(s.to_string())
    };
    sec::StringMatch { match_type: Some(m) }
}

pub fn port(field: &str, s: &str) -> Result<u32, super::Fault> {
    s.parse::<u16>()
        .ok()
        .filter(|p| *p > 0)
        .map(u32::from)
        .ok_or_else(|| super::Fault::new(field, format!("{s:?} is not a port number")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_in_go_syntax() {
        assert_eq!(duration("10s"), Ok(Duration::from_secs(10)));
        assert_eq!(duration("1m30s"), Ok(Duration::from_secs(90)));
        assert_eq!(duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(duration("1.5s"), Ok(Duration::from_millis(1500)));
        assert_eq!(duration("1h"), Ok(Duration::from_secs(3600)));
        assert_eq!(duration("0"), Ok(Duration::ZERO));
        for bad in ["", "10", "s", "1x", "-1s", "1e9h", "99999999h", "1..5s"] {
            assert!(duration(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn protocols_from_app_protocol_then_name() {
        assert_eq!(app_protocol(Some("http"), "tcp"), wl::AppProtocol::Http11);
        assert_eq!(app_protocol(Some("kubernetes.io/h2c"), ""), wl::AppProtocol::Http2);
        assert_eq!(app_protocol(None, "grpc-web"), wl::AppProtocol::Grpc);
        assert_eq!(app_protocol(None, "http-alt"), wl::AppProtocol::Http11);
        assert_eq!(app_protocol(None, "https"), wl::AppProtocol::Tls);
        assert_eq!(app_protocol(None, "metrics"), wl::AppProtocol::Unknown);
    }
}
