//! Routing: the route for a request (on its normalized path), a redirect if the route says so,
//! else the backend, weighted among the route's.

use rand::Rng;

use super::request::RequestCtx;
use super::{Context, Downstream, ProxyError};
use crate::route::table::{Lookup, RequestView, RouteTable, Selected};
use crate::route::{Filter, PathModifier};

/// Where a request goes: a service port and the filters of the backend that was chosen,
/// borrowed from the tunnel or the route table (nothing of it is copied per request).
pub struct Backend<'a> {
    pub namespace: &'a str,
    pub hostname: &'a str,
    pub port: u16,
    pub filters: &'a [Filter],
}

impl Backend<'_> {
    /// `namespace/hostname`.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.hostname)
    }
}

/// The route for `req`. A request addressed to a pod (not a service) has no service routes: it
/// goes to that pod.
pub fn select(ctx: &Context, down: &Downstream, table: &RouteTable, req: &RequestCtx) -> Lookup {
    if down.pod.is_some() {
        return Lookup::Default;
    }
    let view = RequestView {
        method: &req.parts.method,
        path: &req.path,
        query: req.query.as_deref(),
        headers: &req.parts.headers,
    };
    table.select(down.service.key(), down.port, &ctx.waypoint, &view)
}

/// The backend for `req` under `selected` (`None`: the service itself); a redirect is answered
/// here.
pub fn backend<'a>(
    down: &'a Downstream,
    selected: Option<&'a Selected>,
    req: &RequestCtx,
) -> Result<Backend<'a>, ProxyError> {
    let Some(Selected { route, matched_prefix }) = selected else {
        return Ok(Backend {
            namespace: &down.service.namespace,
            hostname: &down.service.hostname,
            port: down.port,
            filters: &[],
        });
    };
    if let Some(redirect) = route.filters.iter().find_map(|f| match f {
        Filter::Redirect(r) => Some(r),
        _ => None,
    }) {
        let scheme = redirect.scheme.as_deref().unwrap_or("http");
        let host = redirect.hostname.as_deref().unwrap_or(&req.host);
        let port = redirect.port.map(|p| format!(":{p}")).unwrap_or_default();
        let path = redirect
            .path
            .as_ref()
            .map_or(req.path.clone(), |m| modify_path(&req.path, m, matched_prefix.as_deref()));
        let status = http::StatusCode::from_u16(redirect.status).unwrap_or(http::StatusCode::FOUND);
        let location = format!("{scheme}://{host}{port}{}", req.path_and_query(&path));
        return Err(ProxyError::Redirect { status, location });
    }
    let total: u64 = route.backends.iter().map(|b| u64::from(b.weight)).sum();
    if total == 0 {
        return Err(ProxyError::ZeroWeights(route.key.clone()));
    }
    let mut pick = rand::rng().random_range(0..total);
    let chosen = route
        .backends
        .iter()
        .find(|b| {
            let w = u64::from(b.weight);
            if pick < w {
                true
            } else {
                pick -= w;
                false
            }
        })
        .ok_or_else(|| ProxyError::ZeroWeights(route.key.clone()))?;
    let service = &chosen.service;
    Ok(Backend {
        namespace: &service.namespace,
        hostname: &service.hostname,
        port: if service.port == 0 { down.port } else { service.port },
        filters: &chosen.filters,
    })
}

/// The new path for `path` under a path modifier, given the prefix the route matched.
pub fn modify_path(path: &str, m: &PathModifier, matched_prefix: Option<&str>) -> String {
    match m {
        PathModifier::ReplaceFullPath(p) => p.clone(),
        PathModifier::ReplacePrefixMatch(p) => {
            let rest = matched_prefix.and_then(|pre| path.strip_prefix(pre)).unwrap_or(path);
            let joined = format!("{}/{}", p.trim_end_matches('/'), rest.trim_start_matches('/'));
            if rest.is_empty() && p != "/" { p.clone() } else { joined }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_rewrites_follow_gateway_api() {
        let m = PathModifier::ReplacePrefixMatch("/v2".into());
        assert_eq!(modify_path("/api/users", &m, Some("/api")), "/v2/users");
        assert_eq!(modify_path("/api", &m, Some("/api")), "/v2");
        let root = PathModifier::ReplacePrefixMatch("/".into());
        assert_eq!(modify_path("/api/users", &root, Some("/api")), "/users");
        let full = PathModifier::ReplaceFullPath("/fixed".into());
        assert_eq!(modify_path("/anything", &full, None), "/fixed");
    }
}
