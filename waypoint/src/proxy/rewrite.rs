//! Rewriting: the route's and the backend's request filters (header modifiers, URL rewrite),
//! then the head the upstream gets (URI and version for its protocol, `Host`, the forwarding
//! headers, the trace context). Hop-by-hop headers were removed when the request was read, so
//! nothing here can be undone by a client's `Connection` header.

use bytes::Bytes;
use http::header::{self, HeaderName};
use http::uri::{self, PathAndQuery};
use http::{HeaderMap, HeaderValue, Uri, Version};

use super::request::{Exchange, RequestCtx, X_FORWARDED_FOR, X_REQUEST_ID};
use super::route::{Backend, modify_path};
use super::{Downstream, ProxyError};
use crate::route::table::Selected;
use crate::route::{Filter, HeaderModifier};

pub fn apply_headers(headers: &mut HeaderMap, m: &HeaderModifier) {
    for (n, v) in &m.set {
        if let (Ok(n), Ok(v)) = (HeaderName::from_bytes(n.as_bytes()), HeaderValue::from_str(v)) {
            headers.insert(n, v);
        }
    }
    for (n, v) in &m.add {
        if let (Ok(n), Ok(v)) = (HeaderName::from_bytes(n.as_bytes()), HeaderValue::from_str(v)) {
            headers.append(n, v);
        }
    }
    for n in &m.remove {
        headers.remove(n.as_str());
    }
}

/// What the request filters decided: the upstream path and host, if rewritten (else the
/// request's own).
pub struct Rewritten {
    pub path: Option<String>,
    pub host: Option<String>,
}

/// Applies the route's request filters, then the backend's.
pub fn request_filters(
    req: &mut RequestCtx,
    selected: Option<&Selected>,
    backend: &Backend<'_>,
) -> Rewritten {
    let mut out = Rewritten { path: None, host: None };
    let route_filters = selected.map(|s| s.route.filters.as_slice()).unwrap_or_default();
    let prefix = selected.and_then(|s| s.matched_prefix.as_deref());
    for f in route_filters.iter().chain(backend.filters.iter()) {
        match f {
            Filter::RequestHeaders(m) => apply_headers(&mut req.parts.headers, m),
            Filter::Rewrite(r) => {
                if let Some(m) = &r.path {
                    out.path = Some(modify_path(&req.path, m, prefix));
                }
                if let Some(h) = &r.hostname {
                    out.host = Some(h.clone());
                }
            }
            Filter::ResponseHeaders(_) | Filter::Redirect(_) => {}
        }
    }
    out
}

/// Sets the head the upstream gets. `h2`: the upstream speaks HTTP/2.
pub fn upstream_head(
    req: &mut RequestCtx,
    down: &Downstream,
    ex: &Exchange,
    rewritten: Rewritten,
    authority: &str,
    h2: bool,
) -> Result<(), ProxyError> {
    let authority = rewritten.host.as_deref().unwrap_or(authority);
    let path_and_query = req.path_and_query(rewritten.path.as_deref().unwrap_or(&req.path));
    let bad_uri =
        |e: &dyn std::fmt::Display| ProxyError::BadRequest(format!("cannot build the upstream URI: {e}"));
    // The text becomes the URI's own buffer (no copy).
    let path_and_query =
        PathAndQuery::from_maybe_shared(Bytes::from(path_and_query)).map_err(|e| bad_uri(&e))?;
    let parts = &mut req.parts;
    parts.uri = if h2 {
        let mut uri = uri::Parts::default();
        uri.scheme = Some(uri::Scheme::HTTP);
        uri.authority = Some(uri::Authority::try_from(authority).map_err(|e| bad_uri(&e))?);
        uri.path_and_query = Some(path_and_query);
        Uri::from_parts(uri).map_err(|e| bad_uri(&e))?
    } else {
        Uri::from(path_and_query)
    };
    parts.version = if h2 { Version::HTTP_2 } else { Version::HTTP_11 };
    let headers = &mut parts.headers;
    if h2 {
        headers.remove(header::HOST);
    } else if let Ok(v) = HeaderValue::from_str(authority) {
        headers.insert(header::HOST, v);
    }
    let xff = match headers.get(&X_FORWARDED_FOR).and_then(|v| v.to_str().ok()) {
        Some(prev) => HeaderValue::from_str(&format!("{prev}, {}", down.client_addr.ip())).ok(),
        // Formatted once per tunnel.
        None => Some(down.logged.client_ip.clone()),
    };
    if let Some(v) = xff {
        headers.insert(X_FORWARDED_FOR, v);
    }
    if let Some(Ok(v)) = ex.log.request_id.as_deref().map(HeaderValue::from_str) {
        headers.insert(X_REQUEST_ID, v);
    }
    headers.insert(HeaderName::from_static("x-forwarded-proto"), HeaderValue::from_static("http"));
    if let Some(span) = &ex.span {
        span.inject(headers);
    }
    if let Some((protocol, _)) = &req.upgrade {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        headers.insert(header::UPGRADE, protocol.clone());
    }
    Ok(())
}
