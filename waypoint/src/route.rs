//! Routes as the waypoint applies them: `ambient.waypoint.v1alpha1.Route` compiled on receipt
//! (regexes built, weights defaulted, durations converted). A route that cannot be compiled is
//! rejected (NACKed) and the previous version stays in force.

pub mod normalize;
pub mod policies;
pub mod table;

use std::time::Duration;

use proto::waypoint as wp;
use regex::Regex;
use serde::Serialize;

/// A service port (`port` 0 = every port).
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize)]
pub struct ServiceRef {
    pub namespace: String,
    pub hostname: String,
    pub port: u16,
}

impl ServiceRef {
    fn from_proto(s: &wp::ServiceRef) -> Result<Self, String> {
        if s.namespace.is_empty() || s.hostname.is_empty() {
            return Err("service reference needs a namespace and a hostname".into());
        }
        let port = u16::try_from(s.port).map_err(|_| format!("port {} out of range", s.port))?;
        Ok(Self { namespace: s.namespace.clone(), hostname: s.hostname.clone(), port })
    }

    /// `namespace/hostname`.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.hostname)
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Parent {
    Service(ServiceRef),
    /// `namespace/name` of a waypoint.
    Waypoint(String),
}

#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum PathMatch {
    Exact(String),
    Prefix(String),
    Regex(#[serde(serialize_with = "regex_str")] Regex),
}

fn regex_str<S: serde::Serializer>(r: &Regex, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(r.as_str())
}

#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ValueMatch {
    Exact(String),
    Regex(#[serde(serialize_with = "regex_str")] Regex),
}

impl ValueMatch {
    pub fn matches(&self, v: &str) -> bool {
        match self {
            ValueMatch::Exact(e) => e == v,
            ValueMatch::Regex(r) => r.is_match(v),
        }
    }
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct RouteMatch {
    pub path: Option<PathMatch>,
    /// Lower-cased header names.
    pub headers: Vec<(String, ValueMatch)>,
    pub query_params: Vec<(String, ValueMatch)>,
    pub method: Option<String>,
    /// gRPC service and method (empty = any).
    pub grpc: Option<(String, String)>,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct HeaderModifier {
    pub set: Vec<(String, String)>,
    pub add: Vec<(String, String)>,
    pub remove: Vec<String>,
}

#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum PathModifier {
    ReplaceFullPath(String),
    ReplacePrefixMatch(String),
}

#[derive(Clone, Debug, Serialize)]
pub struct Redirect {
    pub scheme: Option<String>,
    pub hostname: Option<String>,
    pub port: Option<u16>,
    pub path: Option<PathModifier>,
    pub status: u16,
}

#[derive(Clone, Debug, Serialize)]
pub struct Rewrite {
    pub hostname: Option<String>,
    pub path: Option<PathModifier>,
}

#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Filter {
    RequestHeaders(HeaderModifier),
    ResponseHeaders(HeaderModifier),
    Redirect(Redirect),
    Rewrite(Rewrite),
}

#[derive(Clone, Debug, Serialize)]
pub struct Backend {
    pub service: ServiceRef,
    pub weight: u32,
    pub filters: Vec<Filter>,
}

#[derive(Clone, Debug, Serialize)]
pub struct Route {
    /// `namespace/name`.
    pub key: String,
    pub parent: Parent,
    pub grpc: bool,
    pub matches: Vec<RouteMatch>,
    pub filters: Vec<Filter>,
    pub backends: Vec<Backend>,
    pub request_timeout: Option<Duration>,
    pub backend_timeout: Option<Duration>,
    /// Gateway API order among routes that match equally well: creation time (empty first),
    /// then the route object's `namespace/name`, then the rule index, then `key`.
    #[serde(skip)]
    pub order: (String, String, u32),
    /// Translated from a VirtualService: routes of its service are tried in order and the
    /// first that matches wins (Istio's semantics), instead of Gateway API precedence.
    pub first_match: bool,
}

fn regex(r: &str) -> Result<Regex, String> {
    // Anchored: Gateway API regexes match the whole value.
    Regex::new(&format!("^(?:{r})$")).map_err(|e| format!("regex {r:?}: {e}"))
}

fn header_name(n: &str) -> Result<String, String> {
    http::HeaderName::from_bytes(n.as_bytes())
        .map(|h| h.as_str().to_string())
        .map_err(|_| format!("header name {n:?}"))
}

fn values(v: &[wp::ValueMatch], header: bool) -> Result<Vec<(String, ValueMatch)>, String> {
    v.iter()
        .map(|m| {
            let name = if header { header_name(&m.name)? } else { m.name.clone() };
            let value = match &m.value {
                Some(wp::value_match::Value::Exact(e)) => ValueMatch::Exact(e.clone()),
                Some(wp::value_match::Value::Regex(r)) => ValueMatch::Regex(regex(r)?),
                None => return Err(format!("match on {:?} has no value", m.name)),
            };
            Ok((name, value))
        })
        .collect()
}

fn path_modifier(p: &Option<wp::PathModifier>) -> Result<Option<PathModifier>, String> {
    let Some(p) = p else { return Ok(None) };
    match &p.kind {
        Some(wp::path_modifier::Kind::ReplaceFullPath(s)) if s.starts_with('/') => {
            Ok(Some(PathModifier::ReplaceFullPath(s.clone())))
        }
        Some(wp::path_modifier::Kind::ReplacePrefixMatch(s)) if s.starts_with('/') => {
            Ok(Some(PathModifier::ReplacePrefixMatch(s.clone())))
        }
        _ => Err("path modifier must be an absolute path".into()),
    }
}

fn header_modifier(m: &wp::HeaderModifier) -> Result<HeaderModifier, String> {
    let pairs = |v: &[wp::Header]| -> Result<Vec<(String, String)>, String> {
        v.iter()
            .map(|h| {
                http::HeaderValue::from_str(&h.value)
                    .map_err(|_| format!("header value for {:?}", h.name))?;
                Ok((header_name(&h.name)?, h.value.clone()))
            })
            .collect()
    };
    Ok(HeaderModifier {
        set: pairs(&m.set)?,
        add: pairs(&m.add)?,
        remove: m.remove.iter().map(|n| header_name(n)).collect::<Result<_, _>>()?,
    })
}

fn filters(v: &[wp::Filter]) -> Result<Vec<Filter>, String> {
    use wp::filter::Kind;
    v.iter()
        .map(|f| match &f.kind {
            Some(Kind::RequestHeaderModifier(m)) => Ok(Filter::RequestHeaders(header_modifier(m)?)),
            Some(Kind::ResponseHeaderModifier(m)) => Ok(Filter::ResponseHeaders(header_modifier(m)?)),
            Some(Kind::RequestRedirect(r)) => {
                let status = match r.status_code {
                    0 => 302,
                    s @ (301 | 302 | 303 | 307 | 308) => s as u16,
                    s => return Err(format!("redirect status {s} (301, 302, 303, 307 or 308)")),
                };
                let port = match r.port {
                    0 => None,
                    p => Some(u16::try_from(p).map_err(|_| format!("redirect port {p}"))?),
                };
                let non_empty = |s: &str| (!s.is_empty()).then(|| s.to_string());
                Ok(Filter::Redirect(Redirect {
                    scheme: non_empty(&r.scheme),
                    hostname: non_empty(&r.hostname),
                    port,
                    path: path_modifier(&r.path)?,
                    status,
                }))
            }
            Some(Kind::UrlRewrite(r)) => Ok(Filter::Rewrite(Rewrite {
                hostname: (!r.hostname.is_empty()).then(|| r.hostname.clone()),
                path: path_modifier(&r.path)?,
            })),
            None => Err("filter has no kind".into()),
        })
        .collect()
}

fn duration(d: &Option<prost_types::Duration>, field: &str) -> Result<Option<Duration>, String> {
    d.map(|d| crate::convert::duration_from_proto(d, field)).transpose()
}

impl Route {
    /// Compiles `r`; every error names what is wrong.
    pub fn from_proto(r: &wp::Route) -> Result<Self, String> {
        let parent = match r.parent.as_ref().and_then(|p| p.target.as_ref()) {
            Some(wp::parent_ref::Target::Service(s)) => Parent::Service(ServiceRef::from_proto(s)?),
            Some(wp::parent_ref::Target::Waypoint(w)) if w.contains('/') => Parent::Waypoint(w.clone()),
            Some(wp::parent_ref::Target::Waypoint(w)) => {
                return Err(format!("waypoint {w:?} is not namespace/name"));
            }
            Some(wp::parent_ref::Target::Route(_)) => return Err("a route cannot attach to a route".into()),
            None => return Err("route has no parent".into()),
        };
        let grpc = match wp::route::Kind::try_from(r.kind) {
            Ok(k) => k == wp::route::Kind::Grpc,
            Err(_) => return Err(format!("unknown route kind {}", r.kind)),
        };
        let matches = r
            .matches
            .iter()
            .map(|m| {
                let path = match m.path.as_ref().and_then(|p| p.kind.as_ref()) {
                    None => None,
                    Some(wp::path_match::Kind::Exact(p)) if p.starts_with('/') => {
                        Some(PathMatch::Exact(p.clone()))
                    }
                    Some(wp::path_match::Kind::Prefix(p)) if p.starts_with('/') => {
                        Some(PathMatch::Prefix(p.trim_end_matches('/').to_string()))
                    }
                    Some(wp::path_match::Kind::Regex(p)) => Some(PathMatch::Regex(regex(p)?)),
                    Some(_) => return Err("path matches must be absolute".to_string()),
                };
                let method = (!m.method.is_empty())
                    .then(|| {
                        http::Method::from_bytes(m.method.as_bytes())
                            .map(|m| m.as_str().to_string())
                            .map_err(|_| format!("method {:?}", m.method))
                    })
                    .transpose()?;
                Ok(RouteMatch {
                    path,
                    headers: values(&m.headers, true)?,
                    query_params: values(&m.query_params, false)?,
                    method,
                    grpc: m.grpc.as_ref().map(|g| (g.service.clone(), g.method.clone())),
                })
            })
            .collect::<Result<_, String>>()?;
        let backends: Vec<Backend> = r
            .backends
            .iter()
            .map(|b| {
                let service = b.service.as_ref().ok_or("backend has no service")?;
                Ok(Backend {
                    service: ServiceRef::from_proto(service)?,
                    weight: b.weight.unwrap_or(1),
                    filters: filters(&b.filters)?,
                })
            })
            .collect::<Result<_, String>>()?;
        let filters = filters(&r.filters)?;
        let redirects = filters.iter().any(|f| matches!(f, Filter::Redirect(_)));
        if backends.is_empty() && !redirects {
            return Err("route has neither backends nor a redirect".into());
        }
        let timeouts = r.timeouts.unwrap_or_default();
        Ok(Self {
            key: format!("{}/{}", r.namespace, r.name),
            parent,
            grpc,
            matches,
            filters,
            backends,
            request_timeout: duration(&timeouts.request, "timeouts.request")?,
            backend_timeout: duration(&timeouts.backend_request, "timeouts.backendRequest")?,
            first_match: r.origin.as_ref().is_some_and(|o| o.kind == "VirtualService"),
            order: match &r.origin {
                Some(o) => (o.created.clone(), o.name.clone(), o.rule),
                None => (String::new(), format!("{}/{}", r.namespace, r.name), 0),
            },
        })
    }
}
