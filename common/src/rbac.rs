//! Authorization with Istio's semantics, for ztunnel (L4) and the waypoint (L4 + request):
//! DENY policies first (any match refuses), AUDIT policies are logged, then ALLOW policies (none
//! means allow; otherwise one must match). Dry-run policies are evaluated and logged but never
//! decide. A request-level match evaluated where there is no request (L4) never allows, and in
//! a DENY its request fields are dropped while its L4 fields still decide (Istio's handling of
//! HTTP-only fields on TCP), so L7 rules fail closed in ztunnel and on the waypoint's TCP
//! ports. A workload that names a policy the state does not hold is not reached while it is
//! missing.

use std::net::IpAddr;
use std::sync::Arc;

use crate::identity::Identity;
use tracing::info;

use crate::state::policy::{HttpMatch, Match, StringMatch};
use crate::state::{Action, Policy, Snapshot, Workload};

/// What a connection looks like to a policy.
#[derive(Clone, Debug)]
pub struct Connection<'a> {
    /// The verified peer identity; `None` for plaintext.
    pub source: Option<&'a Identity>,
    pub source_ip: IpAddr,
    pub destination_ip: IpAddr,
    pub destination_port: u16,
    /// The request, at the waypoint.
    pub http: Option<&'a Request<'a>>,
}

/// What a request looks like to a policy.
#[derive(Clone, Debug)]
pub struct Request<'a> {
    /// Host without port.
    pub host: &'a str,
    pub method: &'a str,
    pub path: &'a str,
    pub headers: &'a http::HeaderMap,
    /// `<iss>/<sub>` of a verified JWT.
    pub request_principal: Option<&'a str>,
    /// Claims of a verified JWT.
    pub claims: Option<&'a serde_json::Value>,
}

/// The outcome of evaluating a workload's policies.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    Allow,
    /// Denied by the named DENY policy.
    DeniedBy(String),
    /// ALLOW policies exist and none matched.
    NotAllowed,
    /// The destination names this policy and the state does not hold it.
    PolicyMissing(String),
}

impl Verdict {
    pub fn is_allow(&self) -> bool {
        *self == Verdict::Allow
    }

    /// A short reason for logs, access records and CONNECT replies.
    pub fn reason(&self) -> String {
        match self {
            Verdict::Allow => "allowed".into(),
            Verdict::DeniedBy(p) => format!("denied by policy {p}"),
            Verdict::NotAllowed => "no ALLOW policy matched".into(),
            Verdict::PolicyMissing(p) => format!("policy {p} named by the destination is missing"),
        }
    }

    /// The metric label of the decision.
    pub fn label(&self) -> &'static str {
        match self {
            Verdict::Allow => "allow",
            Verdict::DeniedBy(_) | Verdict::NotAllowed | Verdict::PolicyMissing(_) => "deny",
        }
    }

    /// The metric label of why: `allowed`, `denied_by_policy`, `no_allow_match` or
    /// `policy_missing`.
    pub fn cause(&self) -> &'static str {
        match self {
            Verdict::Allow => "allowed",
            Verdict::DeniedBy(_) => "denied_by_policy",
            Verdict::NotAllowed => "no_allow_match",
            Verdict::PolicyMissing(_) => "policy_missing",
        }
    }

    /// The policy that decided a denial: the matching DENY, or the missing one.
    pub fn policy(&self) -> Option<&str> {
        match self {
            Verdict::DeniedBy(p) | Verdict::PolicyMissing(p) => Some(p),
            Verdict::Allow | Verdict::NotAllowed => None,
        }
    }
}

/// Evaluates the policies of the destination workload `w` in `snapshot` for `conn`: refused
/// while a policy `w` names is missing (its policies are not known in full), otherwise
/// [`evaluate`] over [`Snapshot::policies_for`].
pub fn evaluate_workload(snapshot: &Snapshot, w: &Workload, conn: &Connection<'_>) -> Verdict {
    if let Some(missing) = snapshot.missing_policies(w).next() {
        return Verdict::PolicyMissing(missing.to_string());
    }
    evaluate(&snapshot.policies_for(w), conn)
}

/// [`Verdict::reason`], saying also when the policies that decided are held in their fail-safe
/// form (rejected on receipt), for logs and access records.
pub fn explain(snapshot: &Snapshot, w: &Workload, verdict: &Verdict) -> String {
    let reason = verdict.reason();
    let failsafe: Vec<String> = match verdict {
        Verdict::DeniedBy(p) => {
            snapshot.failsafe_reason(p).map(|why| format!("{p}: {why}")).into_iter().collect()
        }
        Verdict::NotAllowed => snapshot
            .policies_for(w)
            .iter()
            .filter(|p| p.action == Action::Allow && !p.dry_run)
            .filter_map(|p| snapshot.failsafe_reason(&p.key()).map(|why| format!("{}: {why}", p.key())))
            .collect(),
        Verdict::Allow | Verdict::PolicyMissing(_) => vec![],
    };
    if failsafe.is_empty() {
        reason
    } else {
        format!("{reason} (held fail-safe after rejection: {})", failsafe.join("; "))
    }
}

/// Evaluates `policies` (those that apply to the destination workload) for `conn`.
pub fn evaluate(policies: &[Arc<Policy>], conn: &Connection<'_>) -> Verdict {
    let (dry, live): (Vec<&Arc<Policy>>, Vec<&Arc<Policy>>) = policies.iter().partition(|p| p.dry_run);
    for p in &dry {
        let matched = policy_matches(p, conn);
        let would = match (p.action, matched) {
            (Action::Deny, true) => "deny",
            (Action::Allow, true) => "allow",
            _ => "not match",
        };
        info!(policy = %p.key(), action = ?p.action, outcome = would, "dry-run policy evaluated");
    }
    if let Some(p) = live.iter().find(|p| p.action == Action::Deny && policy_matches(p, conn)) {
        return Verdict::DeniedBy(p.key());
    }
    for p in live.iter().filter(|p| p.action == Action::Audit && policy_matches(p, conn)) {
        info!(policy = %p.key(), "audit policy matched");
    }
    let allows: Vec<&&Arc<Policy>> = live.iter().filter(|p| p.action == Action::Allow).collect();
    if allows.is_empty() || allows.iter().any(|p| policy_matches(p, conn)) {
        Verdict::Allow
    } else {
        Verdict::NotAllowed
    }
}

/// Any rule; in a rule, every clause; in a clause, any match.
fn policy_matches(p: &Policy, conn: &Connection<'_>) -> bool {
    p.rules.iter().any(|rule| {
        rule.clauses.iter().all(|clause| clause.matches.iter().any(|m| match_holds(m, p.action, conn)))
    })
}

/// One match: every field given must hold.
fn match_holds(m: &Match, action: Action, conn: &Connection<'_>) -> bool {
    if m.unsupported {
        return action == Action::Deny;
    }
    let principal = conn.source.map(Identity::principal);
    let namespace = conn.source.map(Identity::namespace);
    let strings =
        |list: &[StringMatch], value: Option<&str>| value.is_some_and(|v| list.iter().any(|s| s.matches(v)));
    let account = |list: &[(String, String)]| {
        conn.source
            .is_some_and(|id| list.iter().any(|(ns, sa)| ns == id.namespace() && sa == id.service_account()))
    };
    let positive = |empty: bool, holds: bool| empty || holds;
    let negative = |empty: bool, holds: bool| empty || !holds;
    let l4 = positive(m.namespaces.is_empty(), strings(&m.namespaces, namespace))
        && negative(m.not_namespaces.is_empty(), strings(&m.not_namespaces, namespace))
        && positive(m.principals.is_empty(), strings(&m.principals, principal.as_deref()))
        && negative(m.not_principals.is_empty(), strings(&m.not_principals, principal.as_deref()))
        && positive(m.source_ips.is_empty(), m.source_ips.iter().any(|n| n.contains(&conn.source_ip)))
        && negative(
            m.not_source_ips.is_empty(),
            m.not_source_ips.iter().any(|n| n.contains(&conn.source_ip)),
        )
        && positive(
            m.destination_ips.is_empty(),
            m.destination_ips.iter().any(|n| n.contains(&conn.destination_ip)),
        )
        && negative(
            m.not_destination_ips.is_empty(),
            m.not_destination_ips.iter().any(|n| n.contains(&conn.destination_ip)),
        )
        && positive(m.destination_ports.is_empty(), m.destination_ports.contains(&conn.destination_port))
        && negative(
            m.not_destination_ports.is_empty(),
            m.not_destination_ports.contains(&conn.destination_port),
        )
        && positive(m.service_accounts.is_empty(), account(&m.service_accounts))
        && negative(m.not_service_accounts.is_empty(), account(&m.not_service_accounts));
    match (&m.http, conn.http) {
        (None, _) => l4,
        // A request-level rule with no request (L4), as Istio applies it to TCP: in a DENY the
        // request fields are dropped and the rest of the rule (source, destination, port)
        // still decides, so it refuses at least what it would at L7; in an ALLOW it admits
        // nothing. Fail closed either way.
        (Some(_), None) => action == Action::Deny && l4,
        (Some(h), Some(req)) => l4 && http_holds(h, action, conn, req),
    }
}

fn any(list: &[StringMatch], value: Option<&str>) -> bool {
    value.is_some_and(|v| list.iter().any(|s| s.matches(v)))
}

fn http_holds(h: &HttpMatch, action: Action, conn: &Connection<'_>, req: &Request<'_>) -> bool {
    let field = |pos: &[StringMatch], neg: &[StringMatch], value: Option<&str>| {
        (pos.is_empty() || any(pos, value)) && (neg.is_empty() || !any(neg, value))
    };
    field(&h.hosts, &h.not_hosts, Some(req.host))
        && field(&h.methods, &h.not_methods, Some(req.method))
        && field(&h.paths, &h.not_paths, Some(req.path))
        && field(&h.request_principals, &h.not_request_principals, req.request_principal)
        && h.conditions.iter().all(|c| match attribute(&c.key, conn, req) {
            Some(value) => field(&c.values, &c.not_values, value.as_deref()),
            // A key we cannot evaluate: fail closed.
            None => action == Action::Deny,
        })
}

/// The value of a `when` key for this request; `None` when the key is not one we know (the
/// inner `None` is a known key without a value here).
fn attribute(key: &str, conn: &Connection<'_>, req: &Request<'_>) -> Option<Option<String>> {
    let inner = |prefix: &str| key.strip_prefix(prefix).and_then(|k| k.strip_suffix(']'));
    if let Some(name) = inner("request.headers[") {
        return Some(req.headers.get(name).and_then(|v| v.to_str().ok()).map(str::to_string));
    }
    if let Some(name) = inner("request.auth.claims[") {
        let claim = req.claims.and_then(|c| c.get(name));
        return Some(claim.map(|v| v.as_str().map_or_else(|| v.to_string(), str::to_string)));
    }
    Some(match key {
        "source.ip" => Some(conn.source_ip.to_string()),
        "source.namespace" => conn.source.map(|s| s.namespace().to_string()),
        "source.principal" => conn.source.map(Identity::principal),
        "destination.port" => Some(conn.destination_port.to_string()),
        "request.auth.principal" => req.request_principal.map(str::to_string),
        _ => return None,
    })
}

#[cfg(test)]
mod tests;
