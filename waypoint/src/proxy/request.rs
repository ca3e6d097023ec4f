//! The request as the stages see it (read once, normalized once) and the record of the exchange
//! that metrics, the access log and the trace span are written from when it ends.

use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::{Instant, SystemTime};

use common::flags::ResponseFlag;
use common::state::Service;
use http::header::{self, HeaderName};
use http::{HeaderMap, HeaderValue, Request, Version};
use hyper::body::Incoming;
use hyper::upgrade::OnUpgrade;
use rand::Rng;

use super::{Context, Downstream, ProxyError};
use crate::metrics::AccessLog;
use crate::route::normalize::{authority_port, normalize_host, normalize_path};
use crate::upstream::Target;

pub const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
pub const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// Hop-by-hop headers a proxy must not forward (RFC 9110 7.6.1).
static HOP_BY_HOP: [HeaderName; 8] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::UPGRADE,
];

/// Removes hop-by-hop headers and those `Connection` names (keeping `te: trailers`, which gRPC
/// needs end to end).
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // Most requests carry none: one pass over the names (no hashing) says so. With none, there
    // is no `Connection` naming others either.
    let hop = |n: &HeaderName| *n == header::TRANSFER_ENCODING || HOP_BY_HOP.contains(n);
    if !headers.keys().any(hop) {
        return;
    }
    let keeps_trailers =
        headers.get_all(header::TE).iter().any(|v| v.to_str().is_ok_and(|v| v.contains("trailers")));
    // The common case, one `Connection` line (`keep-alive` on most responses): taken out of the
    // map, the names it lists are removed one by one, without copying them. A name matches
    // whatever its case (lookups by text lower-case it; names are kept in lower case).
    let connection_lines = headers.get_all(header::CONNECTION).iter().count();
    if connection_lines == 1
        && let Some(line) = headers.remove(header::CONNECTION)
    {
        for name in line.to_str().unwrap_or_default().split(',').map(str::trim) {
            headers.remove(name);
        }
    }
    // Whatever is left (the fixed names, and every name of several `Connection` lines).
    if headers.keys().any(hop) {
        let present: Vec<HeaderName> = {
            let listed: Vec<&str> = headers
                .get_all(header::CONNECTION)
                .iter()
                .filter_map(|v| v.to_str().ok())
                .flat_map(|v| v.split(','))
                .map(str::trim)
                .collect();
            let named = |n: &HeaderName| listed.iter().any(|l| l.eq_ignore_ascii_case(n.as_str()));
            headers.keys().filter(|n| hop(n) || named(n)).cloned().collect()
        };
        for n in present {
            headers.remove(n);
        }
    }
    if keeps_trailers {
        headers.insert(header::TE, HeaderValue::from_static("trailers"));
    }
}

/// One request, as every stage reads it. Built once: hop-by-hop headers are gone (so nothing a
/// client lists in `Connection` can remove what the mesh adds later) and the path is normalized
/// (so routing, policy and the upstream see the same path).
pub struct RequestCtx {
    pub parts: http::request::Parts,
    pub body: Incoming,
    /// The normalized path, without the query.
    pub path: String,
    /// The query, untouched.
    pub query: Option<String>,
    /// The host for matching: lower case, no port, no trailing dot. (The authority as the
    /// client sent it, for the upstream, is the exchange's: `Exchange::log.authority`.)
    pub host: String,
    /// The port the authority names, if any.
    pub authority_port: Option<u16>,
    /// An HTTP/1.1 upgrade asked for: the protocol and the client side of the upgrade.
    pub upgrade: Option<(HeaderValue, OnUpgrade)>,
    pub grpc: bool,
}

impl RequestCtx {
    /// Reads `req`; what the exchange already read (request id, authority, gRPC) is taken from
    /// `ex`.
    pub fn new(ctx: &Context, mut req: Request<Incoming>, ex: &Exchange) -> Result<Self, ProxyError> {
        let upgrade = (req.version() == Version::HTTP_11)
            .then(|| req.headers().get(header::UPGRADE).cloned())
            .flatten()
            .map(|protocol| (protocol, hyper::upgrade::on(&mut req)));
        let (mut parts, body) = req.into_parts();
        strip_hop_by_hop(&mut parts.headers);
        let raw = parts.uri.path();
        let path = normalize_path(raw, ctx.limits.path_normalization)
            .map_err(|source| ProxyError::BadPath { path: raw.to_string(), source })?
            .into_owned();
        let query = parts.uri.query().map(str::to_string);
        let authority = ex.log.authority.as_deref();
        let host = authority.map(normalize_host).unwrap_or_default();
        let authority_port = authority.and_then(authority_port);
        Ok(Self { parts, body, path, query, host, authority_port, upgrade, grpc: ex.grpc })
    }

    /// `path?query`, normalized path first.
    pub fn path_and_query(&self, path: &str) -> String {
        match &self.query {
            Some(q) => format!("{path}?{q}"),
            None => path.to_string(),
        }
    }
}

pub fn is_grpc(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/grpc"))
}

/// The client's `x-request-id`, else a new UUIDv4.
fn request_id_of(headers: &HeaderMap) -> String {
    if let Some(id) = headers.get(X_REQUEST_ID).and_then(|v| v.to_str().ok()) {
        return id.to_string();
    }
    uuid_v4(rand::rng().random())
}

/// `n` as a version-4 UUID: its hex digits, the 13th set to `4` and the 17th to `a`.
fn uuid_v4(n: u128) -> String {
    let mut b = n.to_be_bytes();
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x0f) | 0xa0;
    let mut out = *b"00000000-0000-0000-0000-000000000000";
    let mut at = 0;
    for group in [&b[..4], &b[4..6], &b[6..8], &b[8..10], &b[10..]] {
        at += common::hex::write_hex(&mut out[at..], group) + 1;
    }
    // Hex digits and dashes are ASCII: this never fails.
    std::str::from_utf8(&out).map(str::to_string).unwrap_or_default()
}

/// The request's path and query as the access log shows it: as `http` displays it (a path
/// starts with `/` or is `*`), without going through `fmt` for every request.
fn logged_path(p: &http::uri::PathAndQuery) -> String {
    let s = p.as_str();
    if s.starts_with(['/', '*']) {
        s.to_string()
    } else {
        let mut out = String::with_capacity(s.len() + 1);
        out.push('/');
        out.push_str(s);
        out
    }
}

/// What the access log and metrics need about one request, filled in as it goes.
pub struct Exchange {
    pub start: Instant,
    pub start_time: SystemTime,
    pub log: AccessLog,
    pub grpc: bool,
    pub route: Option<Arc<crate::route::Route>>,
    pub target: Option<Target>,
    pub backend_service: Option<Arc<Service>>,
    pub request_bytes: Arc<AtomicU64>,
    /// A fault delay was injected (flag `DI`).
    pub delayed: bool,
    /// The flag of an answer that came from upstream (`URX` when retries ran out).
    pub upstream_flag: ResponseFlag,
    /// A slot of the backend's request cap, released when the exchange ends.
    pub slot: Option<crate::filter::traffic::Slot>,
    /// This request's trace span.
    pub span: Option<crate::filter::trace::ServerSpan>,
}

/// How the access log names an HTTP version.
fn protocol_name(v: http::Version) -> &'static str {
    match v {
        http::Version::HTTP_09 => "HTTP/0.9",
        http::Version::HTTP_10 => "HTTP/1.0",
        http::Version::HTTP_11 => "HTTP/1.1",
        http::Version::HTTP_2 => "HTTP/2.0",
        http::Version::HTTP_3 => "HTTP/3.0",
        _ => "HTTP/?",
    }
}

impl Exchange {
    pub fn new(ctx: &Context, down: &Downstream, req: &Request<Incoming>) -> Self {
        let header = |n: HeaderName| req.headers().get(n).and_then(|v| v.to_str().ok()).map(str::to_string);
        let authority =
            req.uri().authority().map(|a| a.as_str().to_string()).or_else(|| header(header::HOST));
        Self {
            start: Instant::now(),
            start_time: SystemTime::now(),
            log: AccessLog {
                authority,
                method: Some(req.method().as_str().to_string()),
                path: req.uri().path_and_query().map(logged_path),
                protocol: Some(protocol_name(req.version())),
                request_id: Some(request_id_of(req.headers())),
                user_agent: header(header::USER_AGENT),
                x_forwarded_for: header(X_FORWARDED_FOR),
                downstream_remote_address: Some(down.logged.client_addr.clone()),
                downstream_local_address: Some(down.logged.local_addr.clone()),
                source_principal: Some(down.logged.principal.clone()),
                response_flags: "-",
                ..Default::default()
            },
            grpc: is_grpc(req.headers()),
            route: None,
            target: None,
            backend_service: None,
            request_bytes: Arc::new(AtomicU64::new(0)),
            delayed: false,
            upstream_flag: ResponseFlag::None,
            slot: None,
            span: Some(crate::filter::trace::ServerSpan::start(req.headers(), ctx.tracer.sampling_percent)),
        }
    }

    /// The flag of an answer that came from upstream.
    pub fn success_flag(&self) -> ResponseFlag {
        match self.upstream_flag {
            ResponseFlag::None if self.delayed => ResponseFlag::DelayInjected,
            f => f,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_ids_are_version_4_uuids() {
        let n = 0x0123_4567_89ab_cdef_0011_2233_4455_6677_u128;
        assert_eq!(uuid_v4(n), "01234567-89ab-4def-a011-223344556677");
        let id = request_id_of(&HeaderMap::new());
        assert_eq!((id.len(), &id[14..15], &id[19..20]), (36, "4", "a"), "{id}");
        assert_ne!(id, request_id_of(&HeaderMap::new()));
    }

    #[test]
    fn hop_by_hop_headers_are_dropped_and_te_trailers_kept() {
        let mut h = HeaderMap::new();
        h.insert("connection", HeaderValue::from_static("keep-alive, x-secret"));
        h.insert("x-secret", HeaderValue::from_static("1"));
        // A second `Connection` line, its name in capitals.
        h.append("connection", HeaderValue::from_static(" X-Other "));
        h.insert("x-other", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert("te", HeaderValue::from_static("trailers"));
        h.insert("x-kept", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut h);
        assert!(
            h.get("x-secret").is_none()
                && h.get("x-other").is_none()
                && h.get("connection").is_none()
                && h.get("keep-alive").is_none()
        );
        assert_eq!(h.get("te").map(|v| v.as_bytes()), Some(&b"trailers"[..]));
        assert!(h.get("x-kept").is_some());
    }

    #[test]
    fn one_connection_line_is_read_whatever_its_spacing_and_case() {
        // The path without copies: a single `Connection` line.
        let mut h = HeaderMap::new();
        h.insert("connection", HeaderValue::from_static("Keep-Alive ,X-Secret,, x-other ,bad name"));
        for n in ["x-secret", "x-other", "keep-alive", "upgrade", "x-kept"] {
            h.insert(n, HeaderValue::from_static("1"));
        }
        strip_hop_by_hop(&mut h);
        assert_eq!(h.keys().map(HeaderName::as_str).collect::<Vec<_>>(), ["x-kept"]);
        // A `Connection` that is not text names nothing, and is itself removed.
        let mut h = HeaderMap::new();
        h.insert("connection", HeaderValue::from_bytes(b"x-a\xff").expect("obs-text is a valid value"));
        h.insert("x-kept", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut h);
        assert_eq!(h.keys().map(HeaderName::as_str).collect::<Vec<_>>(), ["x-kept"]);
    }

    #[test]
    fn logged_paths_are_those_http_displays() {
        for uri in ["http://web.ns?x=1", "http://web.ns", "/a/b?c", "*", "http://web.ns/p?q"] {
            let uri: http::Uri = uri.parse().expect(uri);
            if let Some(p) = uri.path_and_query() {
                assert_eq!(logged_path(p), p.to_string(), "{uri}");
            }
        }
    }

    #[test]
    fn each_hop_by_hop_header_alone_is_dropped() {
        // One at a time: the pass that looks for any of them must see each one.
        for name in HOP_BY_HOP.iter().chain([&header::TRANSFER_ENCODING]) {
            let mut h = HeaderMap::new();
            h.insert(name.clone(), HeaderValue::from_static("x"));
            h.insert("x-kept", HeaderValue::from_static("1"));
            strip_hop_by_hop(&mut h);
            assert!(h.get(name).is_none(), "{name} was kept");
            assert_eq!(h.len(), 1, "{name}: {h:?}");
        }
        let mut plain = HeaderMap::new();
        plain.insert("x-kept", HeaderValue::from_static("1"));
        plain.insert(header::HOST, HeaderValue::from_static("web"));
        strip_hop_by_hop(&mut plain);
        assert_eq!(plain.len(), 2);
    }
}
