//! VirtualService, the HTTP subset Istio's waypoints apply: each `http` route becomes a
//! waypoint route (`<ns>/<vs>#<i>`, `@<host>` past the first host) with Istio's first-match
//! order, and its `retries`, `fault` and mirrors become waypoint policies on that route.
//!
//! As in Istio, HTTPRoute and VirtualService do not mix: a host that has an HTTPRoute or
//! GRPCRoute attached keeps those, and the VirtualService is not applied to it (noted).
//! `uri.prefix` matches a string prefix, as in Istio (a `rewrite.uri` with it replaces that
//! prefix, which needs a whole-segment match and says so).

use proto::waypoint as wp;

use super::index::Index;
use super::kinds::virtual_service::{
    DestinationRef, Fault as VsFault, HeaderOperations, HttpMatch, HttpRoute, Retries, StringMatch,
    VirtualServiceSpec,
};
use super::kinds::{Object, Spec};
use super::values::duration_field;
use super::{Emitted, Fault};

/// `retryOn` words the waypoint applies, and gRPC ones it cannot (dropped, noted).
const RETRY_ON: &[&str] =
    &["5xx", "gateway-error", "connect-failure", "refused-stream", "reset", "retriable-4xx"];
const RETRY_ON_GRPC: &[&str] = &[
    "cancelled",
    "deadline-exceeded",
    "internal",
    "resource-exhausted",
    "unavailable",
    "retriable-status-codes",
    "retriable-headers",
];

/// An Istio string match as a waypoint value match (a prefix as an anchored regex).
fn value(name: &str, m: &StringMatch, field: &str) -> Result<wp::ValueMatch, Fault> {
    use wp::value_match::Value;
    let v = match (&m.exact, &m.prefix, &m.regex) {
        (Some(e), None, None) => Value::Exact(e.clone()),
        (None, Some(p), None) => Value::Regex(format!("{}.*", regex::escape(p))),
        (None, None, Some(r)) => Value::Regex(r.clone()),
        _ => return Err(Fault::new(field, "exactly one of exact, prefix, regex")),
    };
    Ok(wp::ValueMatch { name: name.to_string(), value: Some(v) })
}

/// Whether an HTTPRoute or GRPCRoute attaches to the Service of `host`.
fn has_gateway_api_route(ix: &Index<'_>, ns: &str, host: &str) -> bool {
    ix.objects.values().any(|o| {
        let parents = match &o.spec {
            Spec::HttpRoute(r) => &r.parent_refs,
            Spec::GrpcRoute(r) => &r.parent_refs,
            _ => return false,
        };
        parents.iter().any(|p| {
            p.kind.as_deref() == Some("Service")
                && ix.hostname(p.namespace.as_deref().unwrap_or(&o.key.namespace), &p.name) == host
                && o.key.namespace == ns
        })
    })
}

fn service_ref(ix: &Index<'_>, ns: &str, d: &DestinationRef, field: &str) -> Result<wp::ServiceRef, Fault> {
    if d.subset.is_some() {
        return Err(Fault::new(format!("{field}.subset"), "subsets are not supported at waypoints"));
    }
    let (sns, hostname, ports) = ix.resolve_host(ns, &d.host).ok_or_else(|| {
        Fault::new(format!("{field}.host"), format!("no Service or ServiceEntry has host {}", d.host))
    })?;
    let port = match (&d.port, ports.as_slice()) {
        (Some(p), _) if ports.contains(&p.number) => p.number,
        (Some(p), _) => {
            return Err(Fault::new(format!("{field}.port"), format!("{hostname} has no port {}", p.number)));
        }
        (None, [only]) => *only,
        (None, _) => {
            return Err(Fault::new(
                format!("{field}.port"),
                format!("{hostname} has several ports: name one"),
            ));
        }
    };
    Ok(wp::ServiceRef { namespace: sns, hostname, port: u32::from(port) })
}

fn header_ops(h: &HeaderOperations) -> wp::HeaderModifier {
    let list = |m: &std::collections::BTreeMap<String, String>| {
        m.iter().map(|(k, v)| wp::Header { name: k.to_ascii_lowercase(), value: v.clone() }).collect()
    };
    wp::HeaderModifier {
        set: list(&h.set),
        add: list(&h.add),
        remove: h.remove.iter().map(|r| r.to_ascii_lowercase()).collect(),
    }
}

/// The matches of one http route, and whether a `rewrite.uri` may replace a prefix.
fn matches(r: &HttpRoute, field: &str) -> Result<(Vec<wp::RouteMatch>, Option<u16>, bool), Fault> {
    use wp::path_match::Kind as P;
    let mut out = Vec::new();
    let mut ports = std::collections::BTreeSet::new();
    let rewrites_prefix = r.rewrite.as_ref().is_some_and(|rw| rw.uri.is_some());
    let mut all_prefix = !r.matches.is_empty();
    for (j, m) in r.matches.iter().enumerate() {
        let mf = format!("{field}.match[{j}]");
        unsupported_match(m, &mf)?;
        let path = match &m.uri {
            None => {
                all_prefix = false;
                None
            }
            Some(u) => Some(wp::PathMatch {
                kind: Some(match (&u.exact, &u.prefix, &u.regex) {
                    (Some(e), None, None) => {
                        all_prefix = false;
                        P::Exact(e.clone())
                    }
                    // With a prefix rewrite the prefix must be a path-segment one.
                    (None, Some(p), None) if rewrites_prefix => P::Prefix(p.clone()),
                    (None, Some(p), None) => P::Regex(format!("{}.*", regex::escape(p))),
                    (None, None, Some(x)) => {
                        all_prefix = false;
                        P::Regex(x.clone())
                    }
                    _ => return Err(Fault::new(format!("{mf}.uri"), "exactly one of exact, prefix, regex")),
                }),
            }),
        };
        let method = match &m.method {
            None => String::new(),
            Some(StringMatch { exact: Some(e), prefix: None, regex: None }) => e.to_ascii_uppercase(),
            Some(_) => {
                return Err(Fault::new(format!("{mf}.method"), "only exact method matches are supported"));
            }
        };
        let headers = m
            .headers
            .iter()
            .map(|(k, v)| value(&k.to_ascii_lowercase(), v, &format!("{mf}.headers.{k}")))
            .collect::<Result<_, _>>()?;
        let query_params = m
            .query_params
            .iter()
            .map(|(k, v)| value(k, v, &format!("{mf}.queryParams.{k}")))
            .collect::<Result<_, _>>()?;
        ports.insert(m.port);
        out.push(wp::RouteMatch { path, headers, query_params, method, grpc: None });
    }
    if ports.len() > 1 {
        return Err(Fault::new(
            format!("{field}.match"),
            "matches of one http route on different ports are not supported: split the route",
        ));
    }
    Ok((out, ports.into_iter().next().flatten(), all_prefix))
}

fn unsupported_match(m: &HttpMatch, mf: &str) -> Result<(), Fault> {
    let set = [
        ("ignoreUriCase", m.ignore_uri_case == Some(true)),
        ("withoutHeaders", m.without_headers.is_some()),
        ("sourceLabels", m.source_labels.is_some()),
        ("sourceNamespace", m.source_namespace.is_some()),
        ("gateways", !m.gateways.is_empty()),
        ("scheme", m.scheme.is_some()),
        ("authority", m.authority.is_some()),
    ];
    match set.iter().find(|(_, on)| *on) {
        Some((name, _)) => Err(Fault::new(format!("{mf}.{name}"), "is not supported at waypoints")),
        None => Ok(()),
    }
}

fn retry(r: &Retries, field: &str, out: &mut Emitted) -> Result<wp::Retry, Fault> {
    let mut retry_on = Vec::new();
    for word in r.retry_on.as_deref().unwrap_or_default().split(',').map(str::trim).filter(|w| !w.is_empty())
    {
        if RETRY_ON.contains(&word) || (word.parse::<u16>().is_ok_and(|c| (100..=599).contains(&c))) {
            retry_on.push(word.to_string());
        } else if RETRY_ON_GRPC.contains(&word) {
            out.note(format!(
                "{field}.retryOn: {word} is not applied (the waypoint retries on HTTP conditions)"
            ));
        } else {
            return Err(Fault::new(format!("{field}.retryOn"), format!("unknown retry condition {word:?}")));
        }
    }
    if r.retry_on.is_some() && retry_on.is_empty() {
        // Only gRPC conditions were given: retry on what Istio's default covers for HTTP.
        retry_on = ["connect-failure", "refused-stream", "503"].map(String::from).to_vec();
    }
    Ok(wp::Retry {
        attempts: r.attempts.unwrap_or(2),
        per_try_timeout: r
            .per_try_timeout
            .as_deref()
            .map(|d| duration_field(&format!("{field}.perTryTimeout"), d))
            .transpose()?,
        retry_on,
        backoff: r.backoff.as_deref().map(|d| duration_field(&format!("{field}.backoff"), d)).transpose()?,
    })
}

fn percent(p: Option<f64>, field: &str) -> Result<f64, Fault> {
    match p {
        None => Ok(100.0),
        Some(v) if (0.0..=100.0).contains(&v) => Ok(v),
        Some(v) => Err(Fault::new(field, format!("{v} is not within 0..=100"))),
    }
}

fn fault(f: &VsFault, field: &str) -> Result<wp::Fault, Fault> {
    let delay = match &f.delay {
        None => None,
        Some(d) => {
            let fixed = d
                .fixed_delay
                .as_deref()
                .ok_or_else(|| Fault::new(format!("{field}.delay.fixedDelay"), "is required"))?;
            let share = d.percentage.map(|p| p.value).or(d.percent.map(f64::from));
            Some(wp::fault::Delay {
                fixed_delay: Some(duration_field(&format!("{field}.delay.fixedDelay"), fixed)?),
                percentage: percent(share, &format!("{field}.delay.percentage"))?,
            })
        }
    };
    let abort = match &f.abort {
        None => None,
        Some(a) => {
            if a.grpc_status.is_some() {
                return Err(Fault::new(
                    format!("{field}.abort.grpcStatus"),
                    "is not supported (use httpStatus)",
                ));
            }
            let status = a
                .http_status
                .ok_or_else(|| Fault::new(format!("{field}.abort.httpStatus"), "is required"))?;
            if !(200..=599).contains(&status) {
                return Err(Fault::new(
                    format!("{field}.abort.httpStatus"),
                    format!("{status} is not an HTTP status"),
                ));
            }
            Some(wp::fault::Abort {
                http_status: status,
                percentage: percent(a.percentage.map(|p| p.value), &format!("{field}.abort.percentage"))?,
            })
        }
    };
    Ok(wp::Fault { delay, abort })
}

pub fn virtual_service(
    ix: &Index<'_>,
    obj: &Object,
    spec: &VirtualServiceSpec,
    out: &mut Emitted,
) -> Result<(), Fault> {
    let (ns, name) = (obj.key.namespace.as_str(), obj.key.name.as_str());
    if spec.gateways.iter().any(|g| g != "mesh") {
        return Err(Fault::new(
            "spec.gateways",
            "only mesh traffic (waypoints) is served here; ingress gateways are not ours",
        ));
    }
    if spec.tcp.is_some() || spec.tls.is_some() {
        return Err(Fault::new(
            if spec.tcp.is_some() { "spec.tcp" } else { "spec.tls" },
            "only http routes are supported at waypoints",
        ));
    }
    if spec.hosts.is_empty() {
        return Err(Fault::new("spec.hosts", "at least one host is required"));
    }
    // Bounds on what one object expands into (hosts x routes).
    if spec.hosts.len() > 32 {
        return Err(Fault::new("spec.hosts", format!("{} hosts; at most 32", spec.hosts.len())));
    }
    if spec.http.len() > 128 {
        return Err(Fault::new("spec.http", format!("{} routes; at most 128", spec.http.len())));
    }
    let mut hosts = Vec::new();
    for (i, h) in spec.hosts.iter().enumerate() {
        let (sns, fqdn, _) = ix.resolve_host(ns, h).ok_or_else(|| {
            Fault::new(format!("spec.hosts[{i}]"), format!("no Service or ServiceEntry has host {h}"))
        })?;
        if has_gateway_api_route(ix, &sns, &fqdn) {
            out.note(format!("not applied to {fqdn}: it has HTTPRoutes or GRPCRoutes (Istio does not mix them with VirtualServices)"));
            continue;
        }
        hosts.push((i, sns, fqdn));
    }
    let mut rules = Vec::new();
    for (i, r) in spec.http.iter().enumerate() {
        let field = format!("spec.http[{i}]");
        for (what, set) in [
            ("delegate", r.delegate.is_some()),
            ("directResponse", r.direct_response.is_some()),
            ("corsPolicy", r.cors_policy.is_some()),
        ] {
            if set {
                return Err(Fault::new(format!("{field}.{what}"), "is not supported at waypoints"));
            }
        }
        let (route_matches, port, all_prefix) = matches(r, &field)?;
        let mut filters = Vec::new();
        if let Some(h) = &r.headers {
            if let Some(req) = &h.request {
                filters.push(wp::Filter {
                    kind: Some(wp::filter::Kind::RequestHeaderModifier(header_ops(req))),
                });
            }
            if let Some(resp) = &h.response {
                filters.push(wp::Filter {
                    kind: Some(wp::filter::Kind::ResponseHeaderModifier(header_ops(resp))),
                });
            }
        }
        if let Some(rd) = &r.redirect {
            if rd.derive_port.is_some() {
                return Err(Fault::new(format!("{field}.redirect.derivePort"), "is not supported"));
            }
            let status = rd.redirect_code.unwrap_or(301);
            if ![301, 302, 303, 307, 308].contains(&status) {
                return Err(Fault::new(
                    format!("{field}.redirect.redirectCode"),
                    format!("{status} (301, 302, 303, 307 or 308)"),
                ));
            }
            filters.push(wp::Filter {
                kind: Some(wp::filter::Kind::RequestRedirect(wp::RequestRedirect {
                    scheme: rd.scheme.clone().unwrap_or_default(),
                    hostname: rd.authority.clone().unwrap_or_default(),
                    port: rd.port.map_or(0, u32::from),
                    path: rd.uri.clone().map(|u| wp::PathModifier {
                        kind: Some(wp::path_modifier::Kind::ReplaceFullPath(u)),
                    }),
                    status_code: u32::from(status),
                })),
            });
        }
        if let Some(rw) = &r.rewrite {
            if rw.uri_regex_rewrite.is_some() {
                return Err(Fault::new(format!("{field}.rewrite.uriRegexRewrite"), "is not supported"));
            }
            let path = rw.uri.clone().map(|u| wp::PathModifier {
                kind: Some(if all_prefix {
                    wp::path_modifier::Kind::ReplacePrefixMatch(u)
                } else {
                    wp::path_modifier::Kind::ReplaceFullPath(u)
                }),
            });
            if all_prefix {
                out.note(format!("{field}: with rewrite.uri, uri.prefix matches whole path segments (as Gateway API's PathPrefix)"));
            }
            filters.push(wp::Filter {
                kind: Some(wp::filter::Kind::UrlRewrite(wp::UrlRewrite {
                    hostname: rw.authority.clone().unwrap_or_default(),
                    path,
                })),
            });
        }
        let mut backends = Vec::new();
        for (j, d) in r.route.iter().enumerate() {
            let df = format!("{field}.route[{j}].destination");
            let service = service_ref(ix, ns, &d.destination, &df)?;
            let filters = match &d.headers {
                None => vec![],
                Some(h) => [
                    h.request.as_ref().map(|x| wp::filter::Kind::RequestHeaderModifier(header_ops(x))),
                    h.response.as_ref().map(|x| wp::filter::Kind::ResponseHeaderModifier(header_ops(x))),
                ]
                .into_iter()
                .flatten()
                .map(|k| wp::Filter { kind: Some(k) })
                .collect(),
            };
            // Istio: an unset weight is 0 when others are set, all of it when alone.
            let weight = d.weight.unwrap_or(if r.route.len() == 1 { 100 } else { 0 });
            backends.push(wp::Backend { service: Some(service), weight: Some(weight), filters });
        }
        if backends.is_empty() && r.redirect.is_none() {
            return Err(Fault::new(format!("{field}.route"), "an http route needs a route or a redirect"));
        }
        let timeouts = match r.timeout.as_deref() {
            None => None,
            Some(t) => {
                let d = duration_field(&format!("{field}.timeout"), t)?;
                (d.seconds != 0 || d.nanos != 0)
                    .then_some(wp::Timeouts { request: Some(d), backend_request: None })
            }
        };
        let retry = r.retries.as_ref().map(|rt| retry(rt, &format!("{field}.retries"), out)).transpose()?;
        let fault = r.fault.as_ref().map(|f| fault(f, &format!("{field}.fault"))).transpose()?;
        let mut mirrors = Vec::new();
        if let Some(m) = &r.mirror {
            let service = service_ref(ix, ns, m, &format!("{field}.mirror"))?;
            mirrors.push(wp::Mirror {
                service: Some(service),
                percentage: percent(
                    r.mirror_percentage.map(|p| p.value),
                    &format!("{field}.mirrorPercentage"),
                )?,
            });
        }
        for (j, m) in r.mirrors.iter().enumerate() {
            let service = service_ref(ix, ns, &m.destination, &format!("{field}.mirrors[{j}].destination"))?;
            mirrors.push(wp::Mirror {
                service: Some(service),
                percentage: percent(
                    m.percentage.map(|p| p.value),
                    &format!("{field}.mirrors[{j}].percentage"),
                )?,
            });
        }
        rules.push((
            route_matches,
            port,
            filters,
            backends,
            timeouts,
            retry,
            fault,
            mirrors,
            r.name.clone().unwrap_or_default(),
        ));
    }
    for (hi, sns, fqdn) in &hosts {
        for (ri, (matches, port, filters, backends, timeouts, retry, fault, mirrors, rule_name)) in
            rules.iter().enumerate()
        {
            let rname = if *hi == 0 { format!("{name}#{ri}") } else { format!("{name}#{ri}@{hi}") };
            let parent = wp::ParentRef {
                target: Some(wp::parent_ref::Target::Service(wp::ServiceRef {
                    namespace: sns.clone(),
                    hostname: fqdn.clone(),
                    port: port.map_or(0, u32::from),
                })),
            };
            let route = wp::Route {
                name: rname.clone(),
                namespace: ns.to_string(),
                parent: Some(parent),
                kind: wp::route::Kind::Http as i32,
                matches: matches.clone(),
                filters: filters.clone(),
                backends: backends.clone(),
                timeouts: *timeouts,
                origin: Some(wp::Origin {
                    kind: "VirtualService".into(),
                    name: format!("{ns}/{name}"),
                    created: obj.meta.creation_timestamp.clone().unwrap_or_default(),
                    rule: u32::try_from(ri).unwrap_or(u32::MAX),
                    rule_name: rule_name.clone(),
                }),
            };
            out.push(
                proto::WAYPOINT_RESOURCE_TYPE_URL,
                format!("{ns}/{rname}"),
                &wp::Resource { kind: Some(wp::resource::Kind::Route(route)) },
            );
            let target =
                Some(wp::ParentRef { target: Some(wp::parent_ref::Target::Route(format!("{ns}/{rname}"))) });
            let mut policy = |suffix: &str, fill: &dyn Fn(&mut wp::Policy)| {
                let pname = format!("{rname}.{suffix}");
                let mut p = wp::Policy {
                    name: pname.clone(),
                    namespace: ns.to_string(),
                    target: target.clone(),
                    ..Default::default()
                };
                fill(&mut p);
                out.push(
                    proto::WAYPOINT_RESOURCE_TYPE_URL,
                    format!("{ns}/{pname}"),
                    &wp::Resource { kind: Some(wp::resource::Kind::Policy(p)) },
                );
            };
            if let Some(r) = retry {
                policy("retry", &|p| p.retry = Some(r.clone()));
            }
            if let Some(f) = fault {
                policy("fault", &|p| p.fault = Some(*f));
            }
            for (mi, m) in mirrors.iter().enumerate() {
                policy(&format!("mirror{mi}"), &|p| p.mirror = Some(m.clone()));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests;
