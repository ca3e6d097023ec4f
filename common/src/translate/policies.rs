//! Istio policies (and our one CRD), translated:
//! - `AuthorizationPolicy` with `targetRefs` (a waypoint Gateway, a Service, a ServiceEntry):
//!   a waypoint policy, with every L7 field. With a `selector`, or neither: an L4
//!   `istio.security.Authorization` for ztunnel (scope WORKLOAD_SELECTOR, NAMESPACE, or GLOBAL
//!   in the root namespace), where request attributes cannot be read: an ALLOW rule that needs
//!   them is dropped (it matches nothing) and a DENY rule keeps only its L4 fields (so it
//!   refuses at least what it would at L7). CUSTOM is not supported: it is enforced as a DENY
//!   of what it matches and says so in the status. AUDIT does nothing at L4.
//! - `RequestAuthentication` with `targetRefs`: the waypoint's JWT rules.
//! - `PeerAuthentication`: checked here, applied per workload (see `workloads`).
//! - `DestinationRule`: the waypoint's connection pool and outlier detection for the host's
//!   service, per port where `portLevelSettings` say so.
//! - `WaypointPolicy` (ours): local rate limits.

use proto::security as sec;
use proto::waypoint as wp;

use super::index::Index;
use super::kinds::Object;
use super::kinds::istio::{
    Action, AuthorizationPolicySpec, ConnectionPool, DestinationRuleSpec, OutlierDetection,
    PeerAuthenticationSpec, RequestAuthenticationSpec, Rule, Source, TargetRef, WaypointPolicySpec,
};
use super::values::{duration_field, net, port, string_match};
use super::{Emitted, Fault};

/// The annotation Istio reads to evaluate a policy without enforcing it.
pub const DRY_RUN_ANNOTATION: &str = "istio.io/dry-run";

/// Resolves `targetRef`/`targetRefs` into waypoint policy targets.
fn targets(
    ix: &Index<'_>,
    obj: &Object,
    single: Option<&TargetRef>,
    many: &[TargetRef],
) -> Result<Vec<wp::ParentRef>, Fault> {
    use wp::parent_ref::Target;
    let ns = obj.key.namespace.as_str();
    let refs: Vec<(String, &TargetRef)> = match single {
        Some(t) if many.is_empty() => vec![("spec.targetRef".into(), t)],
        Some(_) => return Err(Fault::new("spec.targetRef", "targetRef and targetRefs are exclusive")),
        None => many.iter().enumerate().map(|(i, t)| (format!("spec.targetRefs[{i}]"), t)).collect(),
    };
    let mut out = Vec::new();
    for (field, t) in refs {
        if t.namespace.as_deref().is_some_and(|n| n != ns) {
            return Err(Fault::new(
                format!("{field}.namespace"),
                "a policy can only target objects of its own namespace",
            ));
        }
        let group = t.group.as_deref().unwrap_or("");
        let target = match (group, t.kind.as_str()) {
            (super::kinds::gateway::GROUP, "Gateway") => {
                if !ix.waypoints.contains_key(&(ns, t.name.as_str())) {
                    return Err(Fault::new(
                        field,
                        format!("Gateway {ns}/{} does not exist or is not a waypoint", t.name),
                    ));
                }
                Target::Waypoint(format!("{ns}/{}", t.name))
            }
            ("networking.istio.io", "ServiceEntry") => {
                // Every host of the entry is a service of its own.
                let Some((_, se)) = ix.service_entries.get(&(ns, t.name.as_str())) else {
                    return Err(Fault::new(field, format!("ServiceEntry {ns}/{} does not exist", t.name)));
                };
                for h in &se.hosts {
                    let r = wp::ServiceRef { namespace: ns.to_string(), hostname: h.clone(), port: 0 };
                    out.push(wp::ParentRef { target: Some(Target::Service(r)) });
                }
                continue;
            }
            ("" | "core", "Service") => {
                let (hostname, _) =
                    ix.service_host(group, &t.kind, ns, &t.name).map_err(|e| Fault::new(field.clone(), e))?;
                Target::Service(wp::ServiceRef { namespace: ns.to_string(), hostname, port: 0 })
            }
            (g, k) => {
                return Err(Fault::new(
                    format!("{field}.kind"),
                    format!("a target of kind {k} (group {g:?}) is not supported"),
                ));
            }
        };
        out.push(wp::ParentRef { target: Some(target) });
    }
    Ok(out)
}

/// Pushes one waypoint policy per target (`<ns>/<Kind>:<name>`, `@<i>` past the first).
fn push_per_target(
    obj: &Object,
    targets: Vec<wp::ParentRef>,
    out: &mut Emitted,
    fill: impl Fn(&mut wp::Policy),
) {
    let (ns, name) = (&obj.key.namespace, &obj.key.name);
    for (i, target) in targets.into_iter().enumerate() {
        let pname =
            if i == 0 { format!("{}:{name}", obj.key.kind) } else { format!("{}:{name}@{i}", obj.key.kind) };
        let mut p = wp::Policy {
            name: pname.clone(),
            namespace: ns.clone(),
            target: Some(target),
            ..Default::default()
        };
        fill(&mut p);
        out.push(
            proto::WAYPOINT_RESOURCE_TYPE_URL,
            format!("{ns}/{pname}"),
            &wp::Resource { kind: Some(wp::resource::Kind::Policy(p)) },
        );
    }
}

/// What Istio refuses in a rule (and what we cannot apply exactly), so that nothing is read as
/// "match everything" by accident: an empty source or operation, a condition without values,
/// path templates, `ipBlocks` together with `remoteIpBlocks`.
fn check_rule(r: &Rule) -> Result<(), Fault> {
    for (i, f) in r.from.iter().enumerate() {
        let s = &f.source;
        let lists = [
            &s.principals,
            &s.not_principals,
            &s.request_principals,
            &s.not_request_principals,
            &s.namespaces,
            &s.not_namespaces,
            &s.service_accounts,
            &s.not_service_accounts,
            &s.ip_blocks,
            &s.not_ip_blocks,
            &s.remote_ip_blocks,
            &s.not_remote_ip_blocks,
        ];
        if lists.iter().all(|l| l.is_empty()) {
            return Err(Fault::new(
                format!("from[{i}].source"),
                "an empty source is not allowed (it would match everything)",
            ));
        }
        let direct = !(s.ip_blocks.is_empty() && s.not_ip_blocks.is_empty());
        let remote = !(s.remote_ip_blocks.is_empty() && s.not_remote_ip_blocks.is_empty());
        if direct && remote {
            return Err(Fault::new(
                format!("from[{i}].source.remoteIpBlocks"),
                "ipBlocks and remoteIpBlocks in one source are not supported (the waypoint sees one client address)",
            ));
        }
    }
    for (i, t) in r.to.iter().enumerate() {
        let o = &t.operation;
        let lists = [
            &o.hosts,
            &o.not_hosts,
            &o.ports,
            &o.not_ports,
            &o.methods,
            &o.not_methods,
            &o.paths,
            &o.not_paths,
        ];
        if lists.iter().all(|l| l.is_empty()) {
            return Err(Fault::new(
                format!("to[{i}].operation"),
                "an empty operation is not allowed (it would match everything)",
            ));
        }
        if let Some(p) = o.paths.iter().chain(&o.not_paths).find(|p| p.contains('{') || p.contains('}')) {
            return Err(Fault::new(
                format!("to[{i}].operation.paths"),
                format!("path templates ({{*}}, {{**}}) are not supported: {p:?}"),
            ));
        }
    }
    for (i, c) in r.when.iter().enumerate() {
        if c.values.is_empty() && c.not_values.is_empty() {
            return Err(Fault::new(format!("when[{i}]"), "a condition needs values or notValues"));
        }
    }
    Ok(())
}

pub fn authorization(
    ix: &Index<'_>,
    obj: &Object,
    spec: &AuthorizationPolicySpec,
    out: &mut Emitted,
) -> Result<(), Fault> {
    for (i, r) in spec.rules.iter().flatten().enumerate() {
        check_rule(r).map_err(|f| f.under(&format!("spec.rules[{i}]")))?;
    }
    if spec.provider.is_some() && spec.action != Action::Custom {
        return Err(Fault::new("spec.provider", "is only for action CUSTOM"));
    }
    let dry_run = obj.meta.annotations.get(DRY_RUN_ANNOTATION).is_some_and(|v| v == "true");
    let rules = spec.rules.as_deref().unwrap_or_default();
    if spec.action == Action::Custom {
        out.note("CUSTOM (external authorization) is not supported: enforced as a DENY of what it matches");
    }
    let targeted = spec.target_ref.is_some() || !spec.target_refs.is_empty();
    if targeted {
        if spec.selector.is_some() {
            return Err(Fault::new("spec.selector", "selector and targetRefs are exclusive"));
        }
        let targets = targets(ix, obj, spec.target_ref.as_ref(), &spec.target_refs)?;
        let l7_rules = rules
            .iter()
            .enumerate()
            .map(|(i, r)| l7_rule(&obj.key.namespace, r).map_err(|f| f.under(&format!("spec.rules[{i}]"))))
            .collect::<Result<Vec<_>, _>>()?;
        let action = match spec.action {
            Action::Allow => wp::authorization_policy::Action::Allow,
            Action::Deny => wp::authorization_policy::Action::Deny,
            Action::Audit => wp::authorization_policy::Action::Audit,
            Action::Custom => wp::authorization_policy::Action::Custom,
        };
        let policy = wp::AuthorizationPolicy { action: action as i32, rules: l7_rules, dry_run };
        push_per_target(obj, targets, out, |p| p.authorization = Some(policy.clone()));
        return Ok(());
    }
    let deny = matches!(spec.action, Action::Deny | Action::Custom);
    let mut l4_rules = Vec::new();
    let mut dropped = 0;
    for (i, r) in rules.iter().enumerate() {
        match l4_rule(&obj.key.namespace, r, deny).map_err(|f| f.under(&format!("spec.rules[{i}]")))? {
            Some(rule) => l4_rules.push(rule),
            None => dropped += 1,
        }
    }
    if dropped > 0 {
        out.note(format!("{dropped} ALLOW rule(s) need request attributes ztunnel cannot read (L4): they match nothing; attach the policy to a waypoint (targetRefs) to enforce them"));
    }
    if deny && rules.iter().any(has_l7) {
        out.note("DENY rules with request attributes are enforced by ztunnel (L4) on their other fields only, refusing more than at L7; attach the policy to a waypoint (targetRefs) to enforce them exactly");
    }
    let action = if spec.action == Action::Audit {
        out.note("AUDIT has no effect in ztunnel (L4)");
        // A DENY that matches nothing: present (workloads may name it), never deciding.
        l4_rules.clear();
        sec::Action::Deny
    } else if deny {
        sec::Action::Deny
    } else {
        sec::Action::Allow
    };
    let (ns, name) = (&obj.key.namespace, &obj.key.name);
    let scope = if spec.selector.is_some() {
        sec::Scope::WorkloadSelector
    } else if *ns == ix.settings.root_namespace {
        sec::Scope::Global
    } else {
        sec::Scope::Namespace
    };
    let policy = sec::Authorization {
        name: name.clone(),
        namespace: ns.clone(),
        scope: scope as i32,
        action: action as i32,
        rules: l4_rules,
        dry_run,
        extensions: vec![],
    };
    out.push(proto::AUTHORIZATION_TYPE_URL, format!("{ns}/{name}"), &policy);
    Ok(())
}

/// `namespace/name` of a service account, as the `serviceAccounts` fields take it.
fn service_account(ns: &str, field: &str, s: &str) -> Result<(String, String), Fault> {
    match s.split_once('/') {
        // A bare name is in the policy's namespace, as in Istio.
        None if !s.is_empty() => Ok((ns.into(), s.into())),
        Some((n, sa)) if !n.is_empty() && !sa.is_empty() && !sa.contains('/') => Ok((n.into(), sa.into())),
        _ => {
            Err(Fault::new(field, format!("{s:?} is not <namespace>/<service account> or <service account>")))
        }
    }
}

fn l7_rule(pns: &str, r: &Rule) -> Result<wp::AuthorizationRule, Fault> {
    let mut from = Vec::new();
    for (i, f) in r.from.iter().enumerate() {
        let s = &f.source;
        let field = format!("from[{i}].source");
        let mut principals = s.principals.clone();
        for (j, a) in s.service_accounts.iter().enumerate() {
            let (ns, sa) = service_account(pns, &format!("{field}.serviceAccounts[{j}]"), a)?;
            principals.push(format!("*/ns/{ns}/sa/{sa}"));
        }
        let mut not_principals = s.not_principals.clone();
        for (j, a) in s.not_service_accounts.iter().enumerate() {
            let (ns, sa) = service_account(pns, &format!("{field}.notServiceAccounts[{j}]"), a)?;
            not_principals.push(format!("*/ns/{ns}/sa/{sa}"));
        }
        for (j, b) in s
            .ip_blocks
            .iter()
            .chain(&s.remote_ip_blocks)
            .chain(&s.not_ip_blocks)
            .chain(&s.not_remote_ip_blocks)
            .enumerate()
        {
            net(&format!("{field}.ipBlocks[{j}]"), b)?;
        }
        from.push(wp::Source {
            principals,
            not_principals,
            namespaces: s.namespaces.clone(),
            not_namespaces: s.not_namespaces.clone(),
            ip_blocks: s.ip_blocks.iter().chain(&s.remote_ip_blocks).cloned().collect(),
            not_ip_blocks: s.not_ip_blocks.iter().chain(&s.not_remote_ip_blocks).cloned().collect(),
            request_principals: s.request_principals.clone(),
            not_request_principals: s.not_request_principals.clone(),
        });
    }
    let mut to = Vec::new();
    for (i, t) in r.to.iter().enumerate() {
        let o = &t.operation;
        for (j, p) in o.ports.iter().chain(&o.not_ports).enumerate() {
            port(&format!("to[{i}].operation.ports[{j}]"), p)?;
        }
        to.push(wp::Operation {
            hosts: o.hosts.clone(),
            not_hosts: o.not_hosts.clone(),
            ports: o.ports.clone(),
            not_ports: o.not_ports.clone(),
            methods: o.methods.clone(),
            not_methods: o.not_methods.clone(),
            paths: o.paths.clone(),
            not_paths: o.not_paths.clone(),
        });
    }
    let mut when = Vec::new();
    for (i, c) in r.when.iter().enumerate() {
        if !crate::rbac::known_condition_key(&c.key) {
            return Err(Fault::new(
                format!("when[{i}].key"),
                format!("{:?} is not a condition key the waypoint reads", c.key),
            ));
        }
        when.push(wp::Condition {
            key: c.key.clone(),
            values: c.values.clone(),
            not_values: c.not_values.clone(),
        });
    }
    Ok(wp::AuthorizationRule { from, to, when })
}

/// Request principals, and the original client address behind a proxy (`remoteIpBlocks`),
/// which ztunnel cannot know.
fn source_has_l7(s: &Source) -> bool {
    !s.request_principals.is_empty()
        || !s.not_request_principals.is_empty()
        || !s.remote_ip_blocks.is_empty()
        || !s.not_remote_ip_blocks.is_empty()
}

/// Whether a rule reads anything only a waypoint can.
fn has_l7(r: &Rule) -> bool {
    r.from.iter().any(|f| source_has_l7(&f.source))
        || r.to.iter().any(|t| {
            let o = &t.operation;
            !(o.hosts.is_empty()
                && o.not_hosts.is_empty()
                && o.methods.is_empty()
                && o.not_methods.is_empty()
                && o.paths.is_empty()
                && o.not_paths.is_empty())
        })
        || r.when.iter().any(|c| l4_condition(&c.key).is_none())
}

#[derive(Clone, Copy)]
enum L4Key {
    SourceIp,
    SourceNamespace,
    SourcePrincipal,
    DestinationIp,
    DestinationPort,
}

fn l4_condition(key: &str) -> Option<L4Key> {
    Some(match key {
        "source.ip" | "remote.ip" => L4Key::SourceIp,
        "source.namespace" => L4Key::SourceNamespace,
        "source.principal" => L4Key::SourcePrincipal,
        "destination.ip" => L4Key::DestinationIp,
        "destination.port" => L4Key::DestinationPort,
        _ => return None,
    })
}

/// One rule for ztunnel, or `None` when it is an ALLOW rule that needs request attributes.
fn l4_rule(pns: &str, r: &Rule, deny: bool) -> Result<Option<sec::Rule>, Fault> {
    if has_l7(r) && !deny {
        // Still check what can be checked, so a typo is reported either way.
        l7_rule(pns, r)?;
        return Ok(None);
    }
    let strings = |v: &[String]| v.iter().map(|s| string_match(s)).collect::<Vec<_>>();
    let nets = |field: &str, v: &[&String]| {
        v.iter().enumerate().map(|(i, s)| net(&format!("{field}[{i}]"), s)).collect::<Result<Vec<_>, _>>()
    };
    let mut clauses = Vec::new();
    if !r.from.is_empty() {
        let mut matches = Vec::new();
        for (i, f) in r.from.iter().enumerate() {
            let s = &f.source;
            let field = format!("from[{i}].source");
            let accounts = |v: &[String], what: &str| {
                v.iter()
                    .enumerate()
                    .map(|(j, a)| {
                        service_account(pns, &format!("{field}.{what}[{j}]"), a).map(
                            |(namespace, service_account)| sec::ServiceAccountMatch {
                                namespace,
                                service_account,
                            },
                        )
                    })
                    .collect::<Result<Vec<_>, _>>()
            };
            matches.push(sec::Match {
                principals: strings(&s.principals),
                not_principals: strings(&s.not_principals),
                namespaces: strings(&s.namespaces),
                not_namespaces: strings(&s.not_namespaces),
                source_ips: nets(&format!("{field}.ipBlocks"), &s.ip_blocks.iter().collect::<Vec<_>>())?,
                not_source_ips: nets(
                    &format!("{field}.notIpBlocks"),
                    &s.not_ip_blocks.iter().collect::<Vec<_>>(),
                )?,
                service_accounts: accounts(&s.service_accounts, "serviceAccounts")?,
                not_service_accounts: accounts(&s.not_service_accounts, "notServiceAccounts")?,
                ..Default::default()
            });
        }
        clauses.push(sec::Clause { matches });
    }
    if !r.to.is_empty() {
        let mut matches = Vec::new();
        for (i, t) in r.to.iter().enumerate() {
            let o = &t.operation;
            let ports = |v: &[String], what: &str| {
                v.iter()
                    .enumerate()
                    .map(|(j, p)| port(&format!("to[{i}].operation.{what}[{j}]"), p))
                    .collect::<Result<Vec<_>, _>>()
            };
            matches.push(sec::Match {
                destination_ports: ports(&o.ports, "ports")?,
                not_destination_ports: ports(&o.not_ports, "notPorts")?,
                ..Default::default()
            });
        }
        clauses.push(sec::Clause { matches });
    }
    for (i, c) in r.when.iter().enumerate() {
        let field = format!("when[{i}]");
        let Some(key) = l4_condition(&c.key) else {
            if !crate::rbac::known_condition_key(&c.key) {
                return Err(Fault::new(
                    format!("{field}.key"),
                    format!("{:?} is not a condition key Istio defines", c.key),
                ));
            }
            // A request attribute in a DENY rule: taken as matching.
            continue;
        };
        let mut m = sec::Match::default();
        let v: Vec<&String> = c.values.iter().collect();
        let nv: Vec<&String> = c.not_values.iter().collect();
        match key {
            L4Key::SourceIp => {
                m.source_ips = nets(&format!("{field}.values"), &v)?;
                m.not_source_ips = nets(&format!("{field}.notValues"), &nv)?;
            }
            L4Key::DestinationIp => {
                m.destination_ips = nets(&format!("{field}.values"), &v)?;
                m.not_destination_ips = nets(&format!("{field}.notValues"), &nv)?;
            }
            L4Key::SourceNamespace => {
                m.namespaces = strings(&c.values);
                m.not_namespaces = strings(&c.not_values);
            }
            L4Key::SourcePrincipal => {
                m.principals = strings(&c.values);
                m.not_principals = strings(&c.not_values);
            }
            L4Key::DestinationPort => {
                m.destination_ports =
                    c.values.iter().map(|p| port(&format!("{field}.values"), p)).collect::<Result<_, _>>()?;
                m.not_destination_ports = c
                    .not_values
                    .iter()
                    .map(|p| port(&format!("{field}.notValues"), p))
                    .collect::<Result<_, _>>()?;
            }
        }
        clauses.push(sec::Clause { matches: vec![m] });
    }
    Ok(Some(sec::Rule { clauses }))
}

pub fn request_authentication(
    ix: &Index<'_>,
    obj: &Object,
    spec: &RequestAuthenticationSpec,
    out: &mut Emitted,
) -> Result<(), Fault> {
    if spec.selector.is_some() {
        return Err(Fault::new(
            "spec.selector",
            "in ambient mode RequestAuthentication applies at waypoints: use targetRefs (a waypoint Gateway or a Service)",
        ));
    }
    if spec.target_ref.is_none() && spec.target_refs.is_empty() {
        return Err(Fault::new(
            "spec.targetRefs",
            "in ambient mode RequestAuthentication applies at waypoints: name the waypoint Gateway or a Service",
        ));
    }
    let targets = targets(ix, obj, spec.target_ref.as_ref(), &spec.target_refs)?;
    let mut rules = Vec::new();
    for (i, r) in spec.jwt_rules.iter().enumerate() {
        let field = format!("spec.jwtRules[{i}]");
        if r.output_payload_to_header.is_some() {
            return Err(Fault::new(format!("{field}.outputPayloadToHeader"), "is not supported"));
        }
        if r.issuer.is_empty() {
            return Err(Fault::new(format!("{field}.issuer"), "is required"));
        }
        let (jwks, jwks_uri) = match (&r.jwks, &r.jwks_uri) {
            (Some(_), Some(_)) => return Err(Fault::new(field, "jwks and jwksUri are exclusive")),
            (None, None) => {
                return Err(Fault::new(
                    field,
                    "jwks or jwksUri is required (OpenID discovery from the issuer is not supported)",
                ));
            }
            (j, u) => (j.clone().unwrap_or_default(), u.clone().unwrap_or_default()),
        };
        rules.push(wp::JwtRule {
            issuer: r.issuer.clone(),
            audiences: r.audiences.clone(),
            jwks,
            jwks_uri,
            forward_original_token: r.forward_original_token,
            output_claim_to_headers: r
                .output_claim_to_headers
                .iter()
                .map(|c| wp::ClaimToHeader { header: c.header.clone(), claim: c.claim.clone() })
                .collect(),
            from_headers: r
                .from_headers
                .iter()
                .map(|h| wp::JwtHeader { name: h.name.clone(), prefix: h.prefix.clone() })
                .collect(),
            from_params: r.from_params.clone(),
            from_cookies: r.from_cookies.clone(),
        });
    }
    let ra = wp::RequestAuthentication { rules };
    push_per_target(obj, targets, out, |p| p.request_authentication = Some(ra.clone()));
    Ok(())
}

pub fn peer_authentication(
    _ix: &Index<'_>,
    _obj: &Object,
    _spec: &PeerAuthenticationSpec,
    _out: &mut Emitted,
) -> Result<(), Fault> {
    // Checked when decoded; applied per workload (see `workloads`).
    Ok(())
}

fn traffic(
    field: &str,
    pool: Option<&ConnectionPool>,
    outlier: Option<&OutlierDetection>,
    out: &mut Emitted,
) -> Result<wp::TrafficPolicy, Fault> {
    let connection_pool = pool.map(|p| {
        if p.tcp.is_some() {
            out.note(format!("{field}.connectionPool.tcp is not applied (the waypoint caps requests, not connections)"));
        }
        let h = p.http.clone().unwrap_or_default();
        if h.max_retries.is_some() || h.idle_timeout.is_some() || h.h2_upgrade_policy.is_some() || h.use_client_protocol.is_some() || h.max_concurrent_streams.is_some() {
            out.note(format!("{field}.connectionPool.http: only http1MaxPendingRequests, http2MaxRequests and maxRequestsPerConnection are applied"));
        }
        wp::ConnectionPool {
            max_requests: h.http2_max_requests.unwrap_or(0),
            // Istio's defaults: a queue of 2^32-1 (in effect none).
            max_pending_requests: h.http1_max_pending_requests.unwrap_or(u32::MAX),
            max_requests_per_connection: h.max_requests_per_connection.unwrap_or(0),
        }
    });
    let outlier_detection = match outlier {
        None => None,
        Some(o) => {
            if o.interval.is_some()
                || o.min_health_percent.is_some()
                || o.split_external_local_origin_errors.is_some()
                || o.consecutive_local_origin_failures.is_some()
            {
                out.note(format!("{field}.outlierDetection: interval, minHealthPercent and local-origin settings are not applied"));
            }
            if o.max_ejection_percent.is_some_and(|p| p > 100) {
                return Err(Fault::new(
                    format!("{field}.outlierDetection.maxEjectionPercent"),
                    "is over 100",
                ));
            }
            Some(wp::OutlierDetection {
                // Istio's (Envoy's) default: 5.
                consecutive_5xx_errors: o.consecutive_5xx_errors.unwrap_or(5),
                consecutive_gateway_errors: o.consecutive_gateway_errors.unwrap_or(0),
                base_ejection_time: o
                    .base_ejection_time
                    .as_deref()
                    .map(|d| duration_field(&format!("{field}.outlierDetection.baseEjectionTime"), d))
                    .transpose()?,
                max_ejection_percent: o.max_ejection_percent.unwrap_or(0),
            })
        }
    };
    Ok(wp::TrafficPolicy { connection_pool, outlier_detection, load_balancer: 0 })
}

/// DestinationRule `loadBalancer`: `simple` picks the waypoint's endpoint choice; consistent
/// hashing and locality settings are not applied (noted).
fn load_balancer(field: &str, lb: Option<&serde_json::Value>, out: &mut Emitted) -> Result<i32, Fault> {
    use wp::traffic_policy::LoadBalancer;
    let Some(lb) = lb else { return Ok(LoadBalancer::Default as i32) };
    let Some(map) = lb.as_object() else {
        return Err(Fault::new(format!("{field}.loadBalancer"), "must be an object"));
    };
    for key in map.keys().filter(|k| *k != "simple") {
        out.note(format!("{field}.loadBalancer.{key} is not applied"));
    }
    Ok(match map.get("simple").map(|v| v.as_str()) {
        None => LoadBalancer::Default,
        Some(Some("ROUND_ROBIN")) => LoadBalancer::RoundRobin,
        Some(Some("LEAST_REQUEST" | "LEAST_CONN")) => LoadBalancer::LeastRequest,
        Some(Some("RANDOM")) => LoadBalancer::Random,
        Some(Some("UNSPECIFIED")) => LoadBalancer::Default,
        Some(Some("PASSTHROUGH")) => {
            return Err(Fault::new(
                format!("{field}.loadBalancer.simple"),
                "PASSTHROUGH is not supported at waypoints",
            ));
        }
        Some(other) => {
            return Err(Fault::new(
                format!("{field}.loadBalancer.simple"),
                format!("unknown value {other:?}"),
            ));
        }
    } as i32)
}

pub fn destination_rule(
    ix: &Index<'_>,
    obj: &Object,
    spec: &DestinationRuleSpec,
    out: &mut Emitted,
) -> Result<(), Fault> {
    let ns = obj.key.namespace.as_str();
    if spec.workload_selector.is_some() {
        return Err(Fault::new(
            "spec.workloadSelector",
            "applies to sidecars; not supported in ambient mode",
        ));
    }
    if spec.host.contains('*') {
        return Err(Fault::new("spec.host", "wildcard hosts are not supported"));
    }
    let (service_ns, host, _) = ix.resolve_host(ns, &spec.host).ok_or_else(|| {
        Fault::new("spec.host", format!("no Service or ServiceEntry has host {}", spec.host))
    })?;
    if !spec.subsets.is_empty() {
        out.note("spec.subsets are only used by VirtualService routes, which are not supported yet");
    }
    let Some(tp) = &spec.traffic_policy else { return Ok(()) };
    if tp.tls.is_some() || tp.tunnel.is_some() || tp.proxy_protocol.is_some() {
        out.note(
            "spec.trafficPolicy: tls, tunnel and proxyProtocol are not applied (mesh traffic is always mTLS)",
        );
    }
    let mut base =
        traffic("spec.trafficPolicy", tp.connection_pool.as_ref(), tp.outlier_detection.as_ref(), out)?;
    base.load_balancer = load_balancer("spec.trafficPolicy", tp.load_balancer.as_ref(), out)?;
    let name = &obj.key.name;
    let push = |out: &mut Emitted, pname: String, port: u32, traffic: wp::TrafficPolicy| {
        let target = wp::ParentRef {
            target: Some(wp::parent_ref::Target::Service(wp::ServiceRef {
                namespace: service_ns.clone(),
                hostname: host.clone(),
                port,
            })),
        };
        let p = wp::Policy {
            name: pname.clone(),
            namespace: ns.to_string(),
            target: Some(target),
            traffic: Some(traffic),
            ..Default::default()
        };
        out.push(
            proto::WAYPOINT_RESOURCE_TYPE_URL,
            format!("{ns}/{pname}"),
            &wp::Resource { kind: Some(wp::resource::Kind::Policy(p)) },
        );
    };
    if base.connection_pool.is_some() || base.outlier_detection.is_some() || base.load_balancer != 0 {
        push(out, format!("DestinationRule:{name}"), 0, base);
    }
    for (i, pl) in tp.port_level_settings.iter().enumerate() {
        let field = format!("spec.trafficPolicy.portLevelSettings[{i}]");
        if pl.tls.is_some() {
            out.note(format!("{field}: tls is not applied"));
        }
        let own = traffic(&field, pl.connection_pool.as_ref(), pl.outlier_detection.as_ref(), out)?;
        let own_lb = load_balancer(&field, pl.load_balancer.as_ref(), out)?;
        // Port settings replace the base settings field by field, as in Istio.
        let merged = wp::TrafficPolicy {
            connection_pool: own.connection_pool.or(base.connection_pool),
            outlier_detection: own.outlier_detection.or(base.outlier_detection),
            load_balancer: if own_lb != 0 { own_lb } else { base.load_balancer },
        };
        push(out, format!("DestinationRule:{name}:{}", pl.port.number), u32::from(pl.port.number), merged);
    }
    Ok(())
}

pub fn waypoint_policy(
    ix: &Index<'_>,
    obj: &Object,
    spec: &WaypointPolicySpec,
    out: &mut Emitted,
) -> Result<(), Fault> {
    let targets = targets(ix, obj, None, &spec.target_refs)?;
    if targets.is_empty() {
        return Err(Fault::new("spec.targetRefs", "at least one target is required"));
    }
    let rate_limit = match &spec.local_rate_limit {
        None => None,
        Some(r) => {
            let fill_interval = duration_field("spec.localRateLimit.fillInterval", &r.fill_interval)?;
            if fill_interval.seconds == 0 && fill_interval.nanos == 0 {
                return Err(Fault::new("spec.localRateLimit.fillInterval", "must be above 0"));
            }
            let tokens_per_fill = r.tokens_per_fill.unwrap_or(1);
            if r.max_tokens == 0 || tokens_per_fill == 0 {
                return Err(Fault::new("spec.localRateLimit", "maxTokens and tokensPerFill must be above 0"));
            }
            Some(wp::LocalRateLimit {
                max_tokens: r.max_tokens,
                tokens_per_fill,
                fill_interval: Some(fill_interval),
            })
        }
    };
    push_per_target(obj, targets, out, |p| p.rate_limit = rate_limit);
    Ok(())
}

/// The fail-safe stand-in for a security policy that cannot be read and was never accepted,
/// in the scope its `selector`/`targetRefs` name when those can be read (otherwise its
/// namespace); see [`failsafe_of`]. An unreadable action is taken as DENY.
pub fn failsafe(raw: &super::RawObject) -> Option<(Object, String)> {
    if !raw.api_version.starts_with("security.istio.io") {
        return None;
    }
    let field = |k: &str| raw.body.get("spec").and_then(|s| s.get(k)).cloned();
    fn lenient<T: serde::de::DeserializeOwned>(v: Option<serde_json::Value>) -> Option<T> {
        v.and_then(|v| serde_json::from_value(v).ok())
    }
    let spec = match raw.kind.as_str() {
        "AuthorizationPolicy" => {
            let action = match field("action") {
                None => Action::Allow,
                Some(serde_json::Value::String(a)) if a == "ALLOW" => Action::Allow,
                Some(serde_json::Value::String(a)) if a == "AUDIT" => Action::Audit,
                _ => Action::Deny,
            };
            super::Spec::AuthorizationPolicy(AuthorizationPolicySpec {
                selector: lenient(field("selector")),
                target_ref: lenient(field("targetRef")),
                target_refs: lenient(field("targetRefs")).unwrap_or_default(),
                action,
                ..Default::default()
            })
        }
        "PeerAuthentication" => super::Spec::PeerAuthentication(PeerAuthenticationSpec {
            selector: lenient(field("selector")),
            ..Default::default()
        }),
        _ => return None,
    };
    failsafe_of(&Object { key: super::kinds::key_of(raw), meta: raw.metadata.clone(), spec })
}

/// The fail-safe form of a security policy that was refused and never accepted: an
/// AuthorizationPolicy ALLOW as an ALLOW that matches nothing, anything else (DENY, CUSTOM) as
/// a DENY of everything, in the same scope (AUDIT decides nothing and needs none); a
/// PeerAuthentication as STRICT on every port (plaintext refused).
pub fn failsafe_of(obj: &Object) -> Option<(Object, String)> {
    use super::kinds::istio::{Mtls, MtlsMode};
    let (spec, note) = match &obj.spec {
        super::Spec::AuthorizationPolicy(p) => {
            let (rules, note) = match p.action {
                Action::Audit => return None,
                Action::Allow => {
                    (vec![], "held fail-safe: an ALLOW that matches nothing in its scope until it is fixed")
                }
                Action::Deny | Action::Custom => (
                    vec![Rule::default()],
                    "held fail-safe: a DENY of everything in its scope until it is fixed",
                ),
            };
            let action = if p.action == Action::Allow { Action::Allow } else { Action::Deny };
            let spec = AuthorizationPolicySpec { rules: Some(rules), action, provider: None, ..p.clone() };
            (super::Spec::AuthorizationPolicy(spec), note)
        }
        super::Spec::PeerAuthentication(p) => {
            let spec = PeerAuthenticationSpec {
                selector: p.selector.clone(),
                mtls: Some(Mtls { mode: MtlsMode::Strict }),
                port_level_mtls: Default::default(),
            };
            (
                super::Spec::PeerAuthentication(spec),
                "held fail-safe: STRICT on every port of its scope (plaintext refused) until it is fixed",
            )
        }
        _ => return None,
    };
    Some((Object { key: obj.key.clone(), meta: obj.meta.clone(), spec }, note.to_string()))
}
