//! HTTPRoute and GRPCRoute, translated into waypoint routes: one route resource per rule and
//! parent (`<ns>/<route>#<rule>`, `@<parent>` when there are several parents), carrying the
//! route's origin for Gateway API precedence. Retries (GEP-1731) and `RequestMirror` filters
//! become waypoint policies that target the rule's route resource.
//!
//! Parents: a Service (GAMMA; in the route's own namespace, as Istio's waypoints only take
//! producer routes) with or without a port, a ServiceEntry, or a waypoint Gateway whose
//! listeners' `allowedRoutes` admit the route. Backends: Services (a port is required) or
//! ServiceEntries, in another namespace only where a ReferenceGrant there allows it. A
//! reference to nothing refuses the route (the last accepted version stays in force); a
//! zero-weight backend beside weighted ones is left out unresolved (it never gets a request).

use proto::waypoint as wp;

use super::index::{Index, selector_matches};
use super::kinds::Object;
use super::kinds::gateway::{
    self as gw, BackendObjectReference, GrpcRouteSpec, HttpBackendRef, HttpRouteFilter, HttpRouteMatch,
    HttpRouteSpec, ParentReference, PathModifier, ValueMatch,
};
use super::values::duration_field;
use super::{Emitted, Fault};

const METHODS: &[&str] = &["GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH"];

/// The route kinds, as ReferenceGrant and allowedRoutes name them.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Http,
    Grpc,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Http => "HTTPRoute",
            Kind::Grpc => "GRPCRoute",
        }
    }
}

/// One rule, once its parts are translated.
struct Rule {
    matches: Vec<wp::RouteMatch>,
    filters: Vec<wp::Filter>,
    backends: Vec<wp::Backend>,
    timeouts: Option<wp::Timeouts>,
    retry: Option<wp::Retry>,
    mirrors: Vec<wp::Mirror>,
    name: String,
}

/// Gateway API's own list bounds (its CRDs' `maxItems`), which also bound the resources one
/// route expands into (parents x rules): parents, then (matches, filters, backendRefs) per rule.
fn limits(parents: usize, rules: impl ExactSizeIterator<Item = (usize, usize, usize)>) -> Result<(), Fault> {
    let limit = |field: String, len: usize, max: usize| match len > max {
        true => Err(Fault::new(field, format!("{len} items; at most {max}"))),
        false => Ok(()),
    };
    limit("spec.parentRefs".into(), parents, 32)?;
    limit("spec.rules".into(), rules.len(), 16)?;
    for (i, (matches, filters, backends)) in rules.enumerate() {
        limit(format!("spec.rules[{i}].matches"), matches, 64)?;
        limit(format!("spec.rules[{i}].filters"), filters, 16)?;
        limit(format!("spec.rules[{i}].backendRefs"), backends, 16)?;
    }
    Ok(())
}

pub fn http_route(
    ix: &Index<'_>,
    obj: &Object,
    spec: &HttpRouteSpec,
    out: &mut Emitted,
) -> Result<(), Fault> {
    limits(
        spec.parent_refs.len(),
        spec.rules.iter().map(|r| (r.matches.len(), r.filters.len(), r.backend_refs.len())),
    )?;
    let parents = parents(ix, obj, Kind::Http, &spec.parent_refs)?;
    hostnames(&spec.hostnames, &parents, out)?;
    let mut rules = Vec::new();
    let default_rule = [gw::HttpRouteRule::default()];
    let spec_rules = if spec.rules.is_empty() { &default_rule[..] } else { &spec.rules[..] };
    for (i, r) in spec_rules.iter().enumerate() {
        let field = format!("spec.rules[{i}]");
        if r.session_persistence.is_some() {
            return Err(Fault::new(
                format!("{field}.sessionPersistence"),
                "session persistence is not supported",
            ));
        }
        let matches = r
            .matches
            .iter()
            .enumerate()
            .map(|(j, m)| http_match(m).map_err(|f| f.under(&format!("{field}.matches[{j}]"))))
            .collect::<Result<Vec<_>, _>>()?;
        let has_prefix = r
            .matches
            .iter()
            .all(|m| m.path.as_ref().is_none_or(|p| p.kind.as_deref().is_none_or(|k| k == "PathPrefix")));
        let (filters, mirrors) =
            filters(ix, obj, Kind::Http, &r.filters, has_prefix).map_err(|f| f.under(&field))?;
        let backends = backends(ix, obj, Kind::Http, &r.backend_refs).map_err(|f| f.under(&field))?;
        let timeouts = match &r.timeouts {
            None => None,
            Some(t) => {
                let request = t
                    .request
                    .as_deref()
                    .map(|d| duration_field(&format!("{field}.timeouts.request"), d))
                    .transpose()?;
                let backend_request = t
                    .backend_request
                    .as_deref()
                    .map(|d| duration_field(&format!("{field}.timeouts.backendRequest"), d))
                    .transpose()?;
                let secs = |d: &Option<prost_types::Duration>| d.as_ref().map(|d| (d.seconds, d.nanos));
                if let (Some(req), Some(be)) = (secs(&request), secs(&backend_request))
                    && req != (0, 0)
                    && be > req
                {
                    return Err(Fault::new(
                        format!("{field}.timeouts.backendRequest"),
                        "must not be longer than timeouts.request",
                    ));
                }
                // 0s disables a timeout.
                let nonzero = |d: Option<prost_types::Duration>| d.filter(|d| d.seconds != 0 || d.nanos != 0);
                Some(wp::Timeouts { request: nonzero(request), backend_request: nonzero(backend_request) })
            }
        };
        let retry = match &r.retry {
            None => None,
            Some(rt) => {
                let backoff = rt
                    .backoff
                    .as_deref()
                    .map(|d| duration_field(&format!("{field}.retry.backoff"), d))
                    .transpose()?;
                for (j, c) in rt.codes.iter().enumerate() {
                    if !(400..=599).contains(c) {
                        return Err(Fault::new(
                            format!("{field}.retry.codes[{j}]"),
                            format!("{c} is not a 4xx or 5xx status"),
                        ));
                    }
                }
                let retry_on = if rt.codes.is_empty() {
                    ["connect-failure", "refused-stream", "503"].map(String::from).to_vec()
                } else {
                    rt.codes.iter().map(u16::to_string).collect()
                };
                Some(wp::Retry {
                    attempts: rt.attempts.unwrap_or(2),
                    per_try_timeout: None,
                    retry_on,
                    backoff,
                })
            }
        };
        rules.push(Rule {
            matches,
            filters,
            backends,
            timeouts,
            retry,
            mirrors,
            name: r.name.clone().unwrap_or_default(),
        });
    }
    emit(obj, Kind::Http, &parents, rules, out);
    Ok(())
}

pub fn grpc_route(
    ix: &Index<'_>,
    obj: &Object,
    spec: &GrpcRouteSpec,
    out: &mut Emitted,
) -> Result<(), Fault> {
    limits(
        spec.parent_refs.len(),
        spec.rules.iter().map(|r| (r.matches.len(), r.filters.len(), r.backend_refs.len())),
    )?;
    let parents = parents(ix, obj, Kind::Grpc, &spec.parent_refs)?;
    hostnames(&spec.hostnames, &parents, out)?;
    let mut rules = Vec::new();
    let default_rule = [gw::GrpcRouteRule::default()];
    let spec_rules = if spec.rules.is_empty() { &default_rule[..] } else { &spec.rules[..] };
    for (i, r) in spec_rules.iter().enumerate() {
        let field = format!("spec.rules[{i}]");
        if r.session_persistence.is_some() {
            return Err(Fault::new(
                format!("{field}.sessionPersistence"),
                "session persistence is not supported",
            ));
        }
        let mut matches = Vec::new();
        for (j, m) in r.matches.iter().enumerate() {
            let mf = format!("{field}.matches[{j}]");
            let grpc = match &m.method {
                None => None,
                Some(method) => {
                    if method.kind.as_deref().is_some_and(|k| k != "Exact") {
                        return Err(Fault::new(
                            format!("{mf}.method.type"),
                            "only Exact gRPC method matches are supported",
                        ));
                    }
                    let service = method.service.clone().unwrap_or_default();
                    let name = method.method.clone().unwrap_or_default();
                    if service.is_empty() && name.is_empty() {
                        return Err(Fault::new(
                            format!("{mf}.method"),
                            "one of service or method is required",
                        ));
                    }
                    Some(wp::GrpcMethodMatch { service, method: name })
                }
            };
            let headers = value_matches(&m.headers, true).map_err(|f| f.under(&format!("{mf}.headers")))?;
            matches.push(wp::RouteMatch { headers, grpc, ..Default::default() });
        }
        let (filters, mirrors) =
            filters(ix, obj, Kind::Grpc, &r.filters, false).map_err(|f| f.under(&field))?;
        let backends = backends(ix, obj, Kind::Grpc, &r.backend_refs).map_err(|f| f.under(&field))?;
        rules.push(Rule {
            matches,
            filters,
            backends,
            timeouts: None,
            retry: None,
            mirrors,
            name: r.name.clone().unwrap_or_default(),
        });
    }
    emit(obj, Kind::Grpc, &parents, rules, out);
    Ok(())
}

/// `hostnames` narrows nothing for a Service parent (the Service decides, as in GAMMA); on a
/// route attached to the waypoint it would have to pick services by name, which is not
/// supported: refused rather than applied to every service behind the waypoint.
fn hostnames(hostnames: &[String], parents: &[wp::ParentRef], out: &mut Emitted) -> Result<(), Fault> {
    if hostnames.is_empty() {
        return Ok(());
    }
    if parents.iter().any(|p| matches!(p.target, Some(wp::parent_ref::Target::Waypoint(_)))) {
        return Err(Fault::new(
            "spec.hostnames",
            "hostnames on a route attached to the waypoint are not supported yet (it would apply to every service behind it): attach the route to the Service",
        ));
    }
    out.note("spec.hostnames is not used for routes attached to a Service (GAMMA): the Service decides");
    Ok(())
}

fn emit(obj: &Object, kind: Kind, parents: &[wp::ParentRef], rules: Vec<Rule>, out: &mut Emitted) {
    let (ns, name) = (&obj.key.namespace, &obj.key.name);
    for (pi, parent) in parents.iter().enumerate() {
        for (ri, rule) in rules.iter().enumerate() {
            let rname = if parents.len() == 1 { format!("{name}#{ri}") } else { format!("{name}#{ri}@{pi}") };
            let route = wp::Route {
                name: rname.clone(),
                namespace: ns.clone(),
                parent: Some(parent.clone()),
                kind: if kind == Kind::Grpc { wp::route::Kind::Grpc } else { wp::route::Kind::Http } as i32,
                matches: rule.matches.clone(),
                filters: rule.filters.clone(),
                backends: rule.backends.clone(),
                timeouts: rule.timeouts,
                origin: Some(wp::Origin {
                    kind: kind.name().into(),
                    name: format!("{ns}/{name}"),
                    created: obj.meta.creation_timestamp.clone().unwrap_or_default(),
                    rule: u32::try_from(ri).unwrap_or(u32::MAX),
                    rule_name: rule.name.clone(),
                }),
            };
            out.push(
                proto::WAYPOINT_RESOURCE_TYPE_URL,
                format!("{ns}/{rname}"),
                &wp::Resource { kind: Some(wp::resource::Kind::Route(route)) },
            );
            let target =
                Some(wp::ParentRef { target: Some(wp::parent_ref::Target::Route(format!("{ns}/{rname}"))) });
            if let Some(retry) = &rule.retry {
                let policy = wp::Policy {
                    name: format!("{rname}.retry"),
                    namespace: ns.clone(),
                    target: target.clone(),
                    retry: Some(retry.clone()),
                    ..Default::default()
                };
                out.push(
                    proto::WAYPOINT_RESOURCE_TYPE_URL,
                    format!("{ns}/{rname}.retry"),
                    &wp::Resource { kind: Some(wp::resource::Kind::Policy(policy)) },
                );
            }
            for (mi, mirror) in rule.mirrors.iter().enumerate() {
                let pname = format!("{rname}.mirror{mi}");
                let policy = wp::Policy {
                    name: pname.clone(),
                    namespace: ns.clone(),
                    target: target.clone(),
                    mirror: Some(mirror.clone()),
                    ..Default::default()
                };
                out.push(
                    proto::WAYPOINT_RESOURCE_TYPE_URL,
                    format!("{ns}/{pname}"),
                    &wp::Resource { kind: Some(wp::resource::Kind::Policy(policy)) },
                );
            }
        }
    }
}

fn parents(
    ix: &Index<'_>,
    obj: &Object,
    kind: Kind,
    refs: &[ParentReference],
) -> Result<Vec<wp::ParentRef>, Fault> {
    use wp::parent_ref::Target;
    let rns = obj.key.namespace.as_str();
    if refs.is_empty() {
        return Err(Fault::new(
            "spec.parentRefs",
            "a route needs a parent: a Service (GAMMA) or a waypoint Gateway",
        ));
    }
    let mut out = Vec::new();
    for (i, p) in refs.iter().enumerate() {
        let field = format!("spec.parentRefs[{i}]");
        let pns = p.namespace.as_deref().unwrap_or(rns);
        let group = p.group.as_deref().unwrap_or(gw::GROUP);
        let pkind = p.kind.as_deref().unwrap_or("Gateway");
        let target = match (group, pkind) {
            ("" | "core", "Service") | ("networking.istio.io", "ServiceEntry") => {
                if pns != rns {
                    return Err(Fault::new(
                        format!("{field}.namespace"),
                        "a route for a Service in another namespace (a consumer route) is not supported by waypoints; put the route in the Service's namespace",
                    ));
                }
                let (hostname, ports) =
                    ix.service_host(group, pkind, pns, &p.name).map_err(|e| Fault::new(field.clone(), e))?;
                if let Some(port) = p.port
                    && !ports.contains(&port)
                {
                    return Err(Fault::new(
                        format!("{field}.port"),
                        format!("{pkind} {pns}/{} has no port {port}", p.name),
                    ));
                }
                Target::Service(wp::ServiceRef {
                    namespace: pns.to_string(),
                    hostname,
                    port: p.port.map_or(0, u32::from),
                })
            }
            (gw::GROUP, "Gateway") => {
                let Some((gobj, gspec, _)) = ix.waypoints.get(&(pns, p.name.as_str())) else {
                    return Err(Fault::new(
                        field,
                        format!("Gateway {pns}/{} does not exist or is not a waypoint", p.name),
                    ));
                };
                let listeners: Vec<_> = gspec
                    .listeners
                    .iter()
                    .filter(|l| {
                        p.section_name.as_deref().is_none_or(|s| s == l.name)
                            && p.port.is_none_or(|port| port == l.port)
                    })
                    .collect();
                if listeners.is_empty() {
                    return Err(Fault::new(field, format!("Gateway {pns}/{} has no such listener", p.name)));
                }
                let mut allowed = false;
                for l in listeners {
                    let a = l.allowed_routes.clone().unwrap_or_default();
                    let kind_ok = a.kinds.is_empty()
                        || a.kinds.iter().any(|k| {
                            k.kind == kind.name() && k.group.as_deref().is_none_or(|g| g == gw::GROUP)
                        });
                    let ns_ok = match a.namespaces.as_ref().and_then(|n| n.from.as_deref()).unwrap_or("Same")
                    {
                        "All" => true,
                        // A Selector without a selector admits nothing (as Istio reads it).
                        "Selector" => match a.namespaces.as_ref().and_then(|n| n.selector.clone()) {
                            None => false,
                            Some(sel) => {
                                let empty = Default::default();
                                selector_matches(&sel, ix.namespace_labels(rns).unwrap_or(&empty))?
                            }
                        },
                        _ => rns == gobj.key.namespace,
                    };
                    allowed |= kind_ok && ns_ok;
                }
                if !allowed {
                    return Err(Fault::new(
                        field,
                        format!(
                            "the listeners of Gateway {pns}/{} do not allow this route (allowedRoutes)",
                            p.name
                        ),
                    ));
                }
                Target::Waypoint(format!("{pns}/{}", p.name))
            }
            _ => {
                return Err(Fault::new(
                    format!("{field}.kind"),
                    format!("a parent of kind {pkind} (group {group:?}) is not supported"),
                ));
            }
        };
        out.push(wp::ParentRef { target: Some(target) });
    }
    Ok(out)
}

/// A backend (or mirror) reference, resolved to a service port.
fn service_ref(
    ix: &Index<'_>,
    obj: &Object,
    kind: Kind,
    b: &BackendObjectReference,
    field: &str,
) -> Result<wp::ServiceRef, Fault> {
    let rns = obj.key.namespace.as_str();
    let group = b.group.as_deref().unwrap_or("");
    let bkind = b.kind.as_deref().unwrap_or("Service");
    let ns = b.namespace.as_deref().unwrap_or(rns);
    if !ix.granted(kind.name(), rns, group, bkind, ns, &b.name) {
        return Err(Fault::new(
            format!("{field}.namespace"),
            format!(
                "no ReferenceGrant in namespace {ns} lets {} of {rns} refer to {bkind} {}",
                kind.name(),
                b.name
            ),
        ));
    }
    let (hostname, ports) = ix.service_host(group, bkind, ns, &b.name).map_err(|e| Fault::new(field, e))?;
    let port = match b.port {
        Some(p) => p,
        None if bkind == "Service" => {
            return Err(Fault::new(format!("{field}.port"), "a port is required for a Service backend"));
        }
        None => 0,
    };
    if port != 0 && !ports.is_empty() && !ports.contains(&port) {
        return Err(Fault::new(
            format!("{field}.port"),
            format!("{bkind} {ns}/{} has no port {port}", b.name),
        ));
    }
    Ok(wp::ServiceRef { namespace: ns.to_string(), hostname, port: u32::from(port) })
}

fn backends(
    ix: &Index<'_>,
    obj: &Object,
    kind: Kind,
    refs: &[HttpBackendRef],
) -> Result<Vec<wp::Backend>, Fault> {
    let total: u64 = refs.iter().map(|b| u64::from(b.weight.unwrap_or(1))).sum();
    let mut out = Vec::new();
    for (i, b) in refs.iter().enumerate() {
        // A zero-weight backend beside weighted ones never gets a request: it is left out before
        // it is resolved (as Istio does), so one that refers to nothing does not refuse the route.
        if b.weight == Some(0) && total > 0 {
            continue;
        }
        let field = format!("backendRefs[{i}]");
        let service = service_ref(ix, obj, kind, &b.object(), &field)?;
        let (filters, mirrors) = filters(ix, obj, kind, &b.filters, false).map_err(|f| f.under(&field))?;
        if !mirrors.is_empty()
            || filters.iter().any(|f| {
                !matches!(
                    f.kind,
                    Some(
                        wp::filter::Kind::RequestHeaderModifier(_)
                            | wp::filter::Kind::ResponseHeaderModifier(_)
                    )
                )
            })
        {
            return Err(Fault::new(
                format!("{field}.filters"),
                "only header modifiers are supported on a backend",
            ));
        }
        out.push(wp::Backend { service: Some(service), weight: Some(b.weight.unwrap_or(1)), filters });
    }
    Ok(out)
}

fn value_matches(v: &[ValueMatch], lower_names: bool) -> Result<Vec<wp::ValueMatch>, Fault> {
    use wp::value_match::Value;
    v.iter()
        .enumerate()
        .map(|(i, m)| {
            let name = if lower_names { m.name.to_ascii_lowercase() } else { m.name.clone() };
            let value = match m.kind.as_deref() {
                None | Some("Exact") => Value::Exact(m.value.clone()),
                Some("RegularExpression") => Value::Regex(m.value.clone()),
                Some(other) => {
                    return Err(Fault::new(
                        format!("[{i}].type"),
                        format!("{other:?} (Exact or RegularExpression)"),
                    ));
                }
            };
            Ok(wp::ValueMatch { name, value: Some(value) })
        })
        .collect()
}

fn http_match(m: &HttpRouteMatch) -> Result<wp::RouteMatch, Fault> {
    use wp::path_match::Kind as P;
    let path = match &m.path {
        None => None,
        Some(p) => {
            let value = p.value.clone().unwrap_or_else(|| "/".into());
            let kind = match p.kind.as_deref() {
                None | Some("PathPrefix") => P::Prefix(value.clone()),
                Some("Exact") => P::Exact(value.clone()),
                Some("RegularExpression") => P::Regex(value.clone()),
                Some(other) => {
                    return Err(Fault::new(
                        "path.type",
                        format!("{other:?} (Exact, PathPrefix or RegularExpression)"),
                    ));
                }
            };
            if !matches!(kind, P::Regex(_)) && !value.starts_with('/') {
                return Err(Fault::new("path.value", "must start with /"));
            }
            Some(wp::PathMatch { kind: Some(kind) })
        }
    };
    let method = m.method.clone().unwrap_or_default();
    if !method.is_empty() && !METHODS.contains(&method.as_str()) {
        return Err(Fault::new("method", format!("{method:?} is not an HTTP method")));
    }
    Ok(wp::RouteMatch {
        path,
        headers: value_matches(&m.headers, true).map_err(|f| f.under("headers"))?,
        query_params: value_matches(&m.query_params, false).map_err(|f| f.under("queryParams"))?,
        method,
        grpc: None,
    })
}

fn path_modifier(p: &PathModifier, prefix_ok: bool, field: &str) -> Result<wp::PathModifier, Fault> {
    use wp::path_modifier::Kind as K;
    let kind = match p.kind.as_str() {
        "ReplaceFullPath" => K::ReplaceFullPath(p.replace_full_path.clone().ok_or_else(|| {
            Fault::new(format!("{field}.replaceFullPath"), "is required for ReplaceFullPath")
        })?),
        "ReplacePrefixMatch" => {
            if !prefix_ok {
                return Err(Fault::new(
                    field,
                    "ReplacePrefixMatch needs every match of the rule to be a PathPrefix",
                ));
            }
            K::ReplacePrefixMatch(p.replace_prefix_match.clone().ok_or_else(|| {
                Fault::new(format!("{field}.replacePrefixMatch"), "is required for ReplacePrefixMatch")
            })?)
        }
        other => {
            return Err(Fault::new(
                format!("{field}.type"),
                format!("{other:?} (ReplaceFullPath or ReplacePrefixMatch)"),
            ));
        }
    };
    Ok(wp::PathModifier { kind: Some(kind) })
}

fn header_modifier(m: &gw::HeaderModifier) -> wp::HeaderModifier {
    let h = |v: &[gw::Header]| {
        v.iter().map(|h| wp::Header { name: h.name.to_ascii_lowercase(), value: h.value.clone() }).collect()
    };
    wp::HeaderModifier {
        set: h(&m.set),
        add: h(&m.add),
        remove: m.remove.iter().map(|r| r.to_ascii_lowercase()).collect(),
    }
}

fn filters(
    ix: &Index<'_>,
    obj: &Object,
    kind: Kind,
    fs: &[HttpRouteFilter],
    prefix_ok: bool,
) -> Result<(Vec<wp::Filter>, Vec<wp::Mirror>), Fault> {
    use wp::filter::Kind as F;
    let mut filters = Vec::new();
    let mut mirrors = Vec::new();
    for (i, f) in fs.iter().enumerate() {
        let field = format!("filters[{i}]");
        let need =
            |name: &str| Fault::new(format!("{field}.{name}"), format!("is required for type {}", f.kind));
        let k = match f.kind.as_str() {
            "RequestHeaderModifier" => F::RequestHeaderModifier(header_modifier(
                f.request_header_modifier.as_ref().ok_or_else(|| need("requestHeaderModifier"))?,
            )),
            "ResponseHeaderModifier" => F::ResponseHeaderModifier(header_modifier(
                f.response_header_modifier.as_ref().ok_or_else(|| need("responseHeaderModifier"))?,
            )),
            "RequestRedirect" if kind == Kind::Http => {
                let r = f.request_redirect.as_ref().ok_or_else(|| need("requestRedirect"))?;
                let status = r.status_code.unwrap_or(302);
                if ![301, 302, 303, 307, 308].contains(&status) {
                    return Err(Fault::new(
                        format!("{field}.requestRedirect.statusCode"),
                        format!("{status} (301, 302, 303, 307 or 308)"),
                    ));
                }
                if let Some(s) = r.scheme.as_deref()
                    && !matches!(s, "http" | "https")
                {
                    return Err(Fault::new(
                        format!("{field}.requestRedirect.scheme"),
                        format!("{s:?} (http or https)"),
                    ));
                }
                F::RequestRedirect(wp::RequestRedirect {
                    scheme: r.scheme.clone().unwrap_or_default(),
                    hostname: r.hostname.clone().unwrap_or_default(),
                    port: r.port.map_or(0, u32::from),
                    path: r
                        .path
                        .as_ref()
                        .map(|p| path_modifier(p, prefix_ok, &format!("{field}.requestRedirect.path")))
                        .transpose()?,
                    status_code: u32::from(status),
                })
            }
            "URLRewrite" if kind == Kind::Http => {
                let r = f.url_rewrite.as_ref().ok_or_else(|| need("urlRewrite"))?;
                F::UrlRewrite(wp::UrlRewrite {
                    hostname: r.hostname.clone().unwrap_or_default(),
                    path: r
                        .path
                        .as_ref()
                        .map(|p| path_modifier(p, prefix_ok, &format!("{field}.urlRewrite.path")))
                        .transpose()?,
                })
            }
            "RequestMirror" => {
                let m = f.request_mirror.as_ref().ok_or_else(|| need("requestMirror"))?;
                let service =
                    service_ref(ix, obj, kind, &m.backend_ref, &format!("{field}.requestMirror.backendRef"))?;
                let percentage = match (&m.percent, &m.fraction) {
                    (Some(_), Some(_)) => {
                        return Err(Fault::new(
                            format!("{field}.requestMirror"),
                            "percent and fraction are exclusive",
                        ));
                    }
                    (Some(p), None) if *p <= 100 => f64::from(*p),
                    (None, Some(fr)) => {
                        let den = fr.denominator.unwrap_or(100);
                        if den == 0 || fr.numerator > den {
                            return Err(Fault::new(
                                format!("{field}.requestMirror.fraction"),
                                "numerator must be at most a non-zero denominator",
                            ));
                        }
                        f64::from(fr.numerator) * 100.0 / f64::from(den)
                    }
                    (None, None) => 100.0,
                    (Some(p), None) => {
                        return Err(Fault::new(
                            format!("{field}.requestMirror.percent"),
                            format!("{p} is over 100"),
                        ));
                    }
                };
                mirrors.push(wp::Mirror { service: Some(service), percentage });
                continue;
            }
            other => {
                return Err(Fault::new(
                    format!("{field}.type"),
                    format!("filter {other} is not supported on a {}", kind.name()),
                ));
            }
        };
        filters.push(wp::Filter { kind: Some(k) });
    }
    Ok((filters, mirrors))
}
