//! The YAML form of the waypoint's L7 resources (`ambient.waypoint.v1alpha1`): routes under
//! `routes:` and policies under `waypointPolicies:` (see [`WaypointPolicySpec`]). A route:
//!
//! ```yaml
//! routes:
//!   - name: echo-v2
//!     namespace: demo
//!     parent: {service: {namespace: demo, hostname: echo.demo.svc.cluster.local, port: 80}}
//!     matches: [{path: {prefix: /v2}, headers: [{name: x-canary, exact: "yes"}]}]
//!     filters: [{requestHeaderModifier: {set: [{name: x-route, value: v2}]}}]
//!     backends:
//!       - {service: {namespace: demo, hostname: echo-v2.demo.svc.cluster.local, port: 80}, weight: 90}
//!       - {service: {namespace: demo, hostname: echo-v1.demo.svc.cluster.local, port: 80}, weight: 10}
//!     timeouts: {request: 5s}
//! ```

use std::time::Duration;

use proto::waypoint as wp;
use serde::Deserialize;

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ServiceRefSpec {
    pub namespace: String,
    pub hostname: String,
    #[serde(default)]
    pub port: u32,
}

impl ServiceRefSpec {
    fn to_proto(&self) -> wp::ServiceRef {
        wp::ServiceRef { namespace: self.namespace.clone(), hostname: self.hostname.clone(), port: self.port }
    }
}

/// A service, a waypoint by `namespace/name`, or (for policies) a route by `namespace/name`.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ParentSpec {
    #[serde(default)]
    pub service: Option<ServiceRefSpec>,
    #[serde(default)]
    pub waypoint: Option<String>,
    #[serde(default)]
    pub route: Option<String>,
}

impl ParentSpec {
    fn to_proto(&self) -> Result<wp::ParentRef, String> {
        use wp::parent_ref::Target;
        let target = match (&self.service, &self.waypoint, &self.route) {
            (Some(s), None, None) => Target::Service(s.to_proto()),
            (None, Some(w), None) => Target::Waypoint(w.clone()),
            (None, None, Some(r)) => Target::Route(r.clone()),
            _ => return Err("a parent needs exactly one of service, waypoint or route".into()),
        };
        Ok(wp::ParentRef { target: Some(target) })
    }
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PathSpec {
    #[serde(default)]
    pub exact: Option<String>,
    #[serde(default)]
    pub prefix: Option<String>,
    #[serde(default)]
    pub regex: Option<String>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ValueMatchSpec {
    pub name: String,
    #[serde(default)]
    pub exact: Option<String>,
    #[serde(default)]
    pub regex: Option<String>,
}

impl ValueMatchSpec {
    fn to_proto(&self) -> Result<wp::ValueMatch, String> {
        use wp::value_match::Value;
        let value = match (&self.exact, &self.regex) {
            (Some(e), None) => Value::Exact(e.clone()),
            (None, Some(r)) => Value::Regex(r.clone()),
            _ => return Err(format!("match on {:?} needs exactly one of exact or regex", self.name)),
        };
        Ok(wp::ValueMatch { name: self.name.clone(), value: Some(value) })
    }
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct GrpcSpec {
    #[serde(default)]
    pub service: String,
    #[serde(default)]
    pub method: String,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RouteMatchSpec {
    #[serde(default)]
    pub path: Option<PathSpec>,
    #[serde(default)]
    pub headers: Vec<ValueMatchSpec>,
    #[serde(default)]
    pub query_params: Vec<ValueMatchSpec>,
    #[serde(default)]
    pub method: String,
    #[serde(default)]
    pub grpc: Option<GrpcSpec>,
}

impl RouteMatchSpec {
    fn to_proto(&self) -> Result<wp::RouteMatch, String> {
        use wp::path_match::Kind;
        let path = match &self.path {
            None => None,
            Some(p) => Some(wp::PathMatch {
                kind: Some(match (&p.exact, &p.prefix, &p.regex) {
                    (Some(e), None, None) => Kind::Exact(e.clone()),
                    (None, Some(e), None) => Kind::Prefix(e.clone()),
                    (None, None, Some(e)) => Kind::Regex(e.clone()),
                    _ => return Err("a path match needs exactly one of exact, prefix or regex".into()),
                }),
            }),
        };
        Ok(wp::RouteMatch {
            path,
            headers: self.headers.iter().map(ValueMatchSpec::to_proto).collect::<Result<_, _>>()?,
            query_params: self.query_params.iter().map(ValueMatchSpec::to_proto).collect::<Result<_, _>>()?,
            method: self.method.clone(),
            grpc: self
                .grpc
                .as_ref()
                .map(|g| wp::GrpcMethodMatch { service: g.service.clone(), method: g.method.clone() }),
        })
    }
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HeaderSpec {
    pub name: String,
    pub value: String,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HeaderModifierSpec {
    #[serde(default)]
    pub set: Vec<HeaderSpec>,
    #[serde(default)]
    pub add: Vec<HeaderSpec>,
    #[serde(default)]
    pub remove: Vec<String>,
}

impl HeaderModifierSpec {
    fn to_proto(&self) -> wp::HeaderModifier {
        let headers = |v: &[HeaderSpec]| {
            v.iter().map(|h| wp::Header { name: h.name.clone(), value: h.value.clone() }).collect()
        };
        wp::HeaderModifier { set: headers(&self.set), add: headers(&self.add), remove: self.remove.clone() }
    }
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PathModifierSpec {
    #[serde(default)]
    pub replace_full_path: Option<String>,
    #[serde(default)]
    pub replace_prefix_match: Option<String>,
}

impl PathModifierSpec {
    fn to_proto(&self) -> Result<wp::PathModifier, String> {
        use wp::path_modifier::Kind;
        let kind = match (&self.replace_full_path, &self.replace_prefix_match) {
            (Some(p), None) => Kind::ReplaceFullPath(p.clone()),
            (None, Some(p)) => Kind::ReplacePrefixMatch(p.clone()),
            _ => {
                return Err(
                    "a path modifier needs exactly one of replaceFullPath or replacePrefixMatch".into()
                );
            }
        };
        Ok(wp::PathModifier { kind: Some(kind) })
    }
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RedirectSpec {
    #[serde(default)]
    pub scheme: String,
    #[serde(default)]
    pub hostname: String,
    #[serde(default)]
    pub port: u32,
    #[serde(default)]
    pub path: Option<PathModifierSpec>,
    #[serde(default)]
    pub status_code: u32,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RewriteSpec {
    #[serde(default)]
    pub hostname: String,
    #[serde(default)]
    pub path: Option<PathModifierSpec>,
}

/// Exactly one of the fields.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FilterSpec {
    #[serde(default)]
    pub request_header_modifier: Option<HeaderModifierSpec>,
    #[serde(default)]
    pub response_header_modifier: Option<HeaderModifierSpec>,
    #[serde(default)]
    pub request_redirect: Option<RedirectSpec>,
    #[serde(default)]
    pub url_rewrite: Option<RewriteSpec>,
}

impl FilterSpec {
    fn to_proto(&self) -> Result<wp::Filter, String> {
        use wp::filter::Kind;
        let mut kinds = Vec::new();
        if let Some(m) = &self.request_header_modifier {
            kinds.push(Kind::RequestHeaderModifier(m.to_proto()));
        }
        if let Some(m) = &self.response_header_modifier {
            kinds.push(Kind::ResponseHeaderModifier(m.to_proto()));
        }
        if let Some(r) = &self.request_redirect {
            kinds.push(Kind::RequestRedirect(wp::RequestRedirect {
                scheme: r.scheme.clone(),
                hostname: r.hostname.clone(),
                port: r.port,
                path: r.path.as_ref().map(PathModifierSpec::to_proto).transpose()?,
                status_code: r.status_code,
            }));
        }
        if let Some(r) = &self.url_rewrite {
            kinds.push(Kind::UrlRewrite(wp::UrlRewrite {
                hostname: r.hostname.clone(),
                path: r.path.as_ref().map(PathModifierSpec::to_proto).transpose()?,
            }));
        }
        match kinds.len() {
            1 => Ok(wp::Filter { kind: kinds.pop() }),
            n => Err(format!("a filter needs exactly one kind, this one has {n}")),
        }
    }
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct BackendSpec {
    pub service: ServiceRefSpec,
    #[serde(default)]
    pub weight: Option<u32>,
    #[serde(default)]
    pub filters: Vec<FilterSpec>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TimeoutsSpec {
    /// `500ms`, `5s`, `1m`.
    #[serde(default)]
    pub request: Option<String>,
    #[serde(default)]
    pub backend_request: Option<String>,
}

/// The longest duration accepted: the range of `google.protobuf.Duration` (about 10,000 years).
const MAX_DURATION_SECONDS: u64 = 315_576_000_000;

/// Parses `250ms`, `5s`, `2m`, `1h`; refuses a duration beyond [`MAX_DURATION_SECONDS`]
/// (checked math: no overflow whatever the digits).
fn duration(s: &str) -> Result<prost_types::Duration, String> {
    let split = s.find(|c: char| !c.is_ascii_digit()).ok_or_else(|| format!("duration {s:?} has no unit"))?;
    let (n, unit) = s.split_at(split);
    let too_large = || format!("duration {s:?} is too large");
    let n: u64 = n.parse().map_err(|e: std::num::ParseIntError| match e.kind() {
        std::num::IntErrorKind::PosOverflow => too_large(),
        _ => format!("duration {s:?} is not a number"),
    })?;
    let secs = |per_unit: u64| n.checked_mul(per_unit).map(Duration::from_secs).ok_or_else(too_large);
    let d = match unit {
        "ms" => Duration::from_millis(n),
        "s" => Duration::from_secs(n),
        "m" => secs(60)?,
        "h" => secs(3600)?,
        _ => return Err(format!("duration {s:?}: unit must be ms, s, m or h")),
    };
    if d.as_secs() > MAX_DURATION_SECONDS {
        return Err(too_large());
    }
    prost_types::Duration::try_from(d).map_err(|_| too_large())
}

/// One HTTPRoute/GRPCRoute rule.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RouteSpec {
    pub name: String,
    pub namespace: String,
    pub parent: ParentSpec,
    /// HTTP (default) or GRPC.
    #[serde(default)]
    pub kind: Option<String>,
    #[serde(default)]
    pub matches: Vec<RouteMatchSpec>,
    #[serde(default)]
    pub filters: Vec<FilterSpec>,
    #[serde(default)]
    pub backends: Vec<BackendSpec>,
    #[serde(default)]
    pub timeouts: Option<TimeoutsSpec>,
}

impl RouteSpec {
    pub fn resource_name(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    pub fn to_proto(&self) -> Result<wp::Resource, String> {
        let kind = match self.kind.as_deref() {
            None => wp::route::Kind::Http,
            Some(k) => {
                wp::route::Kind::from_str_name(k).ok_or_else(|| format!("unknown route kind {k:?}"))?
            }
        };
        let filters = |v: &[FilterSpec]| v.iter().map(FilterSpec::to_proto).collect::<Result<Vec<_>, _>>();
        let backends = self
            .backends
            .iter()
            .map(|b| {
                Ok(wp::Backend {
                    service: Some(b.service.to_proto()),
                    weight: b.weight,
                    filters: filters(&b.filters)?,
                })
            })
            .collect::<Result<_, String>>()?;
        let timeouts = match &self.timeouts {
            None => None,
            Some(t) => Some(wp::Timeouts {
                request: t.request.as_deref().map(duration).transpose()?,
                backend_request: t.backend_request.as_deref().map(duration).transpose()?,
            }),
        };
        let route = wp::Route {
            name: self.name.clone(),
            namespace: self.namespace.clone(),
            parent: Some(self.parent.to_proto()?),
            kind: kind as i32,
            matches: self.matches.iter().map(RouteMatchSpec::to_proto).collect::<Result<_, _>>()?,
            filters: filters(&self.filters)?,
            backends,
            timeouts,
            origin: None,
        };
        Ok(wp::Resource { kind: Some(wp::resource::Kind::Route(route)) })
    }
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SourceSpec {
    #[serde(default)]
    pub principals: Vec<String>,
    #[serde(default)]
    pub not_principals: Vec<String>,
    #[serde(default)]
    pub namespaces: Vec<String>,
    #[serde(default)]
    pub not_namespaces: Vec<String>,
    #[serde(default)]
    pub ip_blocks: Vec<String>,
    #[serde(default)]
    pub not_ip_blocks: Vec<String>,
    #[serde(default)]
    pub request_principals: Vec<String>,
    #[serde(default)]
    pub not_request_principals: Vec<String>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct OperationSpec {
    #[serde(default)]
    pub hosts: Vec<String>,
    #[serde(default)]
    pub not_hosts: Vec<String>,
    #[serde(default)]
    pub ports: Vec<String>,
    #[serde(default)]
    pub not_ports: Vec<String>,
    #[serde(default)]
    pub methods: Vec<String>,
    #[serde(default)]
    pub not_methods: Vec<String>,
    #[serde(default)]
    pub paths: Vec<String>,
    #[serde(default)]
    pub not_paths: Vec<String>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ConditionSpec {
    pub key: String,
    #[serde(default)]
    pub values: Vec<String>,
    #[serde(default)]
    pub not_values: Vec<String>,
}

/// Istio's rule shape: `from: [{source: ...}]`, `to: [{operation: ...}]`, `when: [...]`.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AuthzRuleSpec {
    #[serde(default)]
    pub from: Vec<FromSpec>,
    #[serde(default)]
    pub to: Vec<ToSpec>,
    #[serde(default)]
    pub when: Vec<ConditionSpec>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FromSpec {
    pub source: SourceSpec,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ToSpec {
    pub operation: OperationSpec,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AuthorizationSpec {
    /// ALLOW (default), DENY, AUDIT or CUSTOM.
    #[serde(default)]
    pub action: Option<String>,
    #[serde(default)]
    pub rules: Vec<AuthzRuleSpec>,
    #[serde(default)]
    pub dry_run: bool,
}

/// A waypoint policy:
///
/// ```yaml
/// waypointPolicies:
///   - name: no-admin
///     namespace: demo
///     target: {service: {namespace: demo, hostname: echo.demo.svc.cluster.local}}
///     authorization:
///       action: DENY
///       rules: [{to: [{operation: {paths: ["/admin*"]}}]}]
/// ```
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct WaypointPolicySpec {
    pub name: String,
    pub namespace: String,
    pub target: ParentSpec,
    #[serde(default)]
    pub authorization: Option<AuthorizationSpec>,
    #[serde(default)]
    pub rate_limit: Option<RateLimitSpec>,
    #[serde(default)]
    pub fault: Option<FaultSpec>,
    #[serde(default)]
    pub retry: Option<RetrySpec>,
    #[serde(default)]
    pub mirror: Option<MirrorSpec>,
    /// `{jwtRules: [{issuer, audiences, jwks | jwksUri, forwardOriginalToken, outputClaimToHeaders,
    /// fromHeaders: [{name, prefix}], fromParams, fromCookies}]}`.
    #[serde(default)]
    pub request_authentication: Option<RequestAuthenticationSpec>,
    /// `{connectionPool: {maxRequests, maxPendingRequests}, outlierDetection: {consecutive5xxErrors,
    /// consecutiveGatewayErrors, baseEjectionTime, maxEjectionPercent}}`.
    #[serde(default)]
    pub traffic: Option<TrafficSpec>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TrafficSpec {
    #[serde(default)]
    pub connection_pool: Option<ConnectionPoolSpec>,
    #[serde(default)]
    pub outlier_detection: Option<OutlierSpec>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ConnectionPoolSpec {
    #[serde(default)]
    pub max_requests: u32,
    #[serde(default)]
    pub max_pending_requests: u32,
    #[serde(default)]
    pub max_requests_per_connection: u32,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct OutlierSpec {
    #[serde(default, rename = "consecutive5xxErrors")]
    pub consecutive_5xx_errors: u32,
    #[serde(default)]
    pub consecutive_gateway_errors: u32,
    #[serde(default)]
    pub base_ejection_time: Option<String>,
    #[serde(default)]
    pub max_ejection_percent: u32,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RequestAuthenticationSpec {
    pub jwt_rules: Vec<JwtRuleSpec>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct JwtRuleSpec {
    pub issuer: String,
    #[serde(default)]
    pub audiences: Vec<String>,
    #[serde(default)]
    pub jwks: String,
    #[serde(default)]
    pub jwks_uri: String,
    #[serde(default)]
    pub forward_original_token: bool,
    #[serde(default)]
    pub output_claim_to_headers: Vec<ClaimToHeaderSpec>,
    /// Where the token is read from; none of the three: `Authorization: Bearer` and the
    /// `access_token` query parameter.
    #[serde(default)]
    pub from_headers: Vec<JwtHeaderSpec>,
    #[serde(default)]
    pub from_params: Vec<String>,
    #[serde(default)]
    pub from_cookies: Vec<String>,
}

/// `{name: x-jwt, prefix: "Bearer "}` (no prefix: the whole value is the token).
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct JwtHeaderSpec {
    pub name: String,
    #[serde(default)]
    pub prefix: String,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ClaimToHeaderSpec {
    pub header: String,
    pub claim: String,
}

/// `{service: {namespace: demo, hostname: shadow.demo.svc.cluster.local, port: 80}, percentage: 10}`.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct MirrorSpec {
    pub service: ServiceRefSpec,
    #[serde(default = "hundred")]
    pub percentage: f64,
}

/// `{attempts: 3, perTryTimeout: 200ms, retryOn: [5xx, connect-failure], backoff: 25ms}`.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RetrySpec {
    pub attempts: u32,
    #[serde(default)]
    pub per_try_timeout: Option<String>,
    #[serde(default)]
    pub retry_on: Vec<String>,
    #[serde(default)]
    pub backoff: Option<String>,
}

/// `{maxTokens: 10, tokensPerFill: 10, fillInterval: 1s}`.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RateLimitSpec {
    pub max_tokens: u32,
    pub tokens_per_fill: u32,
    pub fill_interval: String,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct DelaySpec {
    pub fixed_delay: String,
    #[serde(default = "hundred")]
    pub percentage: f64,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AbortSpec {
    pub http_status: u32,
    #[serde(default = "hundred")]
    pub percentage: f64,
}

fn hundred() -> f64 {
    100.0
}

/// `{delay: {fixedDelay: 200ms, percentage: 10}, abort: {httpStatus: 503, percentage: 50}}`.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FaultSpec {
    #[serde(default)]
    pub delay: Option<DelaySpec>,
    #[serde(default)]
    pub abort: Option<AbortSpec>,
}

impl WaypointPolicySpec {
    pub fn resource_name(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    pub fn to_proto(&self) -> Result<wp::Resource, String> {
        let authorization = match &self.authorization {
            None => None,
            Some(a) => {
                let action = match a.action.as_deref() {
                    None => wp::authorization_policy::Action::Allow,
                    Some(n) => wp::authorization_policy::Action::from_str_name(n)
                        .ok_or_else(|| format!("unknown authorization action {n:?}"))?,
                };
                let rules = a
                    .rules
                    .iter()
                    .map(|r| wp::AuthorizationRule {
                        from: r
                            .from
                            .iter()
                            .map(|f| {
                                let s = &f.source;
                                wp::Source {
                                    principals: s.principals.clone(),
                                    not_principals: s.not_principals.clone(),
                                    namespaces: s.namespaces.clone(),
                                    not_namespaces: s.not_namespaces.clone(),
                                    ip_blocks: s.ip_blocks.clone(),
                                    not_ip_blocks: s.not_ip_blocks.clone(),
                                    request_principals: s.request_principals.clone(),
                                    not_request_principals: s.not_request_principals.clone(),
                                }
                            })
                            .collect(),
                        to: r
                            .to
                            .iter()
                            .map(|t| {
                                let o = &t.operation;
                                wp::Operation {
                                    hosts: o.hosts.clone(),
                                    not_hosts: o.not_hosts.clone(),
                                    ports: o.ports.clone(),
                                    not_ports: o.not_ports.clone(),
                                    methods: o.methods.clone(),
                                    not_methods: o.not_methods.clone(),
                                    paths: o.paths.clone(),
                                    not_paths: o.not_paths.clone(),
                                }
                            })
                            .collect(),
                        when: r
                            .when
                            .iter()
                            .map(|c| wp::Condition {
                                key: c.key.clone(),
                                values: c.values.clone(),
                                not_values: c.not_values.clone(),
                            })
                            .collect(),
                    })
                    .collect();
                Some(wp::AuthorizationPolicy { action: action as i32, rules, dry_run: a.dry_run })
            }
        };
        let rate_limit = match &self.rate_limit {
            None => None,
            Some(r) => Some(wp::LocalRateLimit {
                max_tokens: r.max_tokens,
                tokens_per_fill: r.tokens_per_fill,
                fill_interval: Some(duration(&r.fill_interval)?),
            }),
        };
        let fault = match &self.fault {
            None => None,
            Some(f) => Some(wp::Fault {
                delay: match &f.delay {
                    None => None,
                    Some(d) => Some(wp::fault::Delay {
                        fixed_delay: Some(duration(&d.fixed_delay)?),
                        percentage: d.percentage,
                    }),
                },
                abort: f
                    .abort
                    .as_ref()
                    .map(|a| wp::fault::Abort { http_status: a.http_status, percentage: a.percentage }),
            }),
        };
        let retry = match &self.retry {
            None => None,
            Some(r) => Some(wp::Retry {
                attempts: r.attempts,
                per_try_timeout: r.per_try_timeout.as_deref().map(duration).transpose()?,
                retry_on: r.retry_on.clone(),
                backoff: r.backoff.as_deref().map(duration).transpose()?,
            }),
        };
        let mirror = self
            .mirror
            .as_ref()
            .map(|m| wp::Mirror { service: Some(m.service.to_proto()), percentage: m.percentage });
        let request_authentication =
            self.request_authentication.as_ref().map(|r| wp::RequestAuthentication {
                rules: r
                    .jwt_rules
                    .iter()
                    .map(|j| wp::JwtRule {
                        issuer: j.issuer.clone(),
                        audiences: j.audiences.clone(),
                        jwks: j.jwks.clone(),
                        jwks_uri: j.jwks_uri.clone(),
                        forward_original_token: j.forward_original_token,
                        output_claim_to_headers: j
                            .output_claim_to_headers
                            .iter()
                            .map(|c| wp::ClaimToHeader { header: c.header.clone(), claim: c.claim.clone() })
                            .collect(),
                        from_headers: j
                            .from_headers
                            .iter()
                            .map(|h| wp::JwtHeader { name: h.name.clone(), prefix: h.prefix.clone() })
                            .collect(),
                        from_params: j.from_params.clone(),
                        from_cookies: j.from_cookies.clone(),
                    })
                    .collect(),
            });
        let policy = wp::Policy {
            name: self.name.clone(),
            namespace: self.namespace.clone(),
            target: Some(self.target.to_proto()?),
            authorization,
            rate_limit,
            fault,
            retry,
            mirror,
            request_authentication,
            traffic: match &self.traffic {
                None => None,
                Some(t) => Some(wp::TrafficPolicy {
                    connection_pool: t.connection_pool.as_ref().map(|c| wp::ConnectionPool {
                        max_requests: c.max_requests,
                        max_pending_requests: c.max_pending_requests,
                        max_requests_per_connection: c.max_requests_per_connection,
                    }),
                    outlier_detection: match &t.outlier_detection {
                        None => None,
                        Some(o) => Some(wp::OutlierDetection {
                            consecutive_5xx_errors: o.consecutive_5xx_errors,
                            consecutive_gateway_errors: o.consecutive_gateway_errors,
                            base_ejection_time: o.base_ejection_time.as_deref().map(duration).transpose()?,
                            max_ejection_percent: o.max_ejection_percent,
                        }),
                    },
                    load_balancer: 0,
                }),
            },
        };
        Ok(wp::Resource { kind: Some(wp::resource::Kind::Policy(policy)) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_route_in_yaml_becomes_its_wire_form() {
        let yaml = r#"
name: canary
namespace: demo
parent: {service: {namespace: demo, hostname: echo.demo.svc.cluster.local, port: 80}}
matches: [{path: {prefix: /api}, headers: [{name: x-canary, exact: "yes"}], method: GET}]
filters: [{requestHeaderModifier: {set: [{name: x-a, value: b}], remove: [x-drop]}}]
backends:
  - {service: {namespace: demo, hostname: v2.demo.svc.cluster.local, port: 80}, weight: 90}
  - {service: {namespace: demo, hostname: v1.demo.svc.cluster.local, port: 80}}
timeouts: {request: 1500ms}
"#;
        let spec: RouteSpec = serde_yaml_ng::from_str(yaml).expect("yaml");
        let Some(wp::resource::Kind::Route(r)) = spec.to_proto().expect("converts").kind else {
            panic!("a route")
        };
        assert_eq!(r.backends[0].weight, Some(90));
        assert_eq!(r.backends[1].weight, None, "unset weight stays unset (means 1)");
        assert_eq!(r.matches[0].method, "GET");
        let t = r.timeouts.and_then(|t| t.request).expect("timeout");
        assert_eq!((t.seconds, t.nanos), (1, 500_000_000));
        let two_kinds = "{requestHeaderModifier: {}, urlRewrite: {}}";
        let f: FilterSpec = serde_yaml_ng::from_str(two_kinds).expect("yaml");
        assert!(f.to_proto().is_err());
        assert!(duration("5 s").is_err());
    }

    #[test]
    fn durations_too_large_are_refused_not_wrapped() {
        for big in [
            "99999999999999999h",
            "5124095576030432h",
            "307445734561825861m",
            "315576000001s",
            "18446744073709551615ms",
            "99999999999999999999999ms",
        ] {
            assert_eq!(duration(big), Err(format!("duration {big:?} is too large")));
        }
        assert_eq!(duration("87660000h").map(|d| d.seconds), Ok(315_576_000_000), "the protobuf range");
        assert_eq!(
            duration("315576000000999ms").map(|d| (d.seconds, d.nanos)),
            Ok((315_576_000_000, 999_000_000))
        );
        assert_eq!(duration("2m").map(|d| d.seconds), Ok(120));
        assert!(duration("ms").is_err_and(|e| e.contains("not a number")));
    }

    #[test]
    fn jwt_token_locations_in_yaml_become_their_wire_form() {
        let yaml = r#"
name: jwt
namespace: demo
target: {route: demo/secure}
requestAuthentication:
  jwtRules:
    - issuer: https://issuer.test
      jwksUri: http://keys.test/jwks.json
      fromHeaders: [{name: x-jwt, prefix: "Bearer "}, {name: x-raw}]
      fromParams: [my_token]
      fromCookies: [session]
    - issuer: https://other.test
      jwks: '{"keys": []}'
"#;
        let spec: WaypointPolicySpec = serde_yaml_ng::from_str(yaml).expect("yaml");
        let Some(wp::resource::Kind::Policy(p)) = spec.to_proto().expect("converts").kind else {
            panic!("a policy")
        };
        let rules = p.request_authentication.expect("request authentication").rules;
        let headers: Vec<_> =
            rules[0].from_headers.iter().map(|h| (h.name.as_str(), h.prefix.as_str())).collect();
        assert_eq!(headers, [("x-jwt", "Bearer "), ("x-raw", "")]);
        assert_eq!(rules[0].from_params, ["my_token"]);
        assert_eq!(rules[0].from_cookies, ["session"]);
        assert!(rules[1].from_headers.is_empty() && rules[1].from_params.is_empty(), "defaults stay unset");
        let typo = yaml.replace("fromParams", "fromParam");
        assert!(serde_yaml_ng::from_str::<WaypointPolicySpec>(&typo).is_err(), "unknown fields are refused");
    }
}
