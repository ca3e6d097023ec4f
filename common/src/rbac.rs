//! Authorization with Istio's semantics, for ztunnel (L4) and the waypoint (L4 + request):
//! DENY policies first (any match refuses), AUDIT policies are logged, then ALLOW policies (none
//! means allow; otherwise one must match). Dry-run policies are evaluated and logged but never
//! decide. A request-level match evaluated where there is no request (L4) never allows, and in
//! a DENY its request fields are dropped while its L4 fields still decide (Istio's handling of
//! HTTP-only fields on TCP), so L7 rules fail closed in ztunnel and on the waypoint's TCP
//! ports. A workload that names a policy the state does not hold is not reached while it is
//! missing.
//!
//! Request fields. `hosts`/`not_hosts` compare ignoring ASCII case (exact, prefix, suffix and
//! presence alike), as Istio's host matcher does (`ignore_case`), whatever case the caller
//! passes; methods, paths and header values are case-sensitive, as in Istio.
//!
//! `when` conditions. An attribute has zero or more values: a field holds when some value
//! matches one of its `values`, and its `notValues` hold when no value matches any of them, so
//! an attribute without a value matches no positive value and every `notValues`. A key this
//! module does not know (or a malformed one) never allows and always denies. JWT claims, as
//! Istio reads them from Envoy's `jwt_authn` payload:
//! - `request.auth.claims[a][b]..` walks nested objects (at most [`MAX_CLAIM_DEPTH`] names,
//!   each non-empty and free of brackets; anything else is a malformed key). A missing name,
//!   or a step through a non-object, leaves the claim without a value.
//! - A list claim has a value per element. A string is one value, except the top-level
//!   `scope` and `permission` claims, which are space-delimited lists (Istio's default
//!   `spaceDelimitedClaims`). Numbers and booleans compare as their JSON text (`3`, `true`);
//!   objects, nulls, and lists inside a list have no value.
//! - `request.auth.audiences` is the `aud` claim (a string or a list), `request.auth.presenter`
//!   the `azp` claim. Without a JWT every claim key is known and has no value.

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
    /// The port the request's authority names; `None` when it names none (the destination
    /// port is then the one `hosts: ["name:port"]` patterns compare with).
    pub port: Option<u16>,
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

/// A request field: with patterns `pos`, some value matches one of them; with patterns `neg`,
/// no value matches any. A field without values matches no positive pattern.
fn field<V: AsRef<str>>(
    pos: &[StringMatch],
    neg: &[StringMatch],
    values: &[V],
    matches: fn(&StringMatch, &str) -> bool,
) -> bool {
    let any = |list: &[StringMatch]| values.iter().any(|v| list.iter().any(|s| matches(s, v.as_ref())));
    (pos.is_empty() || any(pos)) && (neg.is_empty() || !any(neg))
}

fn http_holds(h: &HttpMatch, action: Action, conn: &Connection<'_>, req: &Request<'_>) -> bool {
    hosts_hold(h, conn, req)
        && field(&h.methods, &h.not_methods, &[req.method], StringMatch::matches)
        && field(&h.paths, &h.not_paths, &[req.path], StringMatch::matches)
        && field(
            &h.request_principals,
            &h.not_request_principals,
            req.request_principal.as_slice(),
            StringMatch::matches,
        )
        && h.conditions.iter().all(|c| match attribute(&c.key, conn, req) {
            Some(values) => field(&c.values, &c.not_values, &values, StringMatch::matches),
            // A key we cannot evaluate: fail closed.
            None => action == Action::Deny,
        })
}

/// `hosts`/`notHosts`: a pattern with a port (`name:8080`, `name:*`) is compared with
/// `host:port` (the authority's port, else the destination port), one without with the host.
fn hosts_hold(h: &HttpMatch, conn: &Connection<'_>, req: &Request<'_>) -> bool {
    if h.hosts.is_empty() && h.not_hosts.is_empty() {
        return true;
    }
    let with_port = format!("{}:{}", req.host, req.port.unwrap_or(conn.destination_port));
    let subject = |m: &StringMatch| if has_port(m) { with_port.as_str() } else { req.host };
    let any = |list: &[StringMatch]| list.iter().any(|m| host_matches(m, subject(m)));
    (h.hosts.is_empty() || any(&h.hosts)) && !any(&h.not_hosts)
}

/// Whether a host pattern names a port: a `:` after any IPv6 literal's closing bracket.
fn has_port(m: &StringMatch) -> bool {
    let text = match m {
        StringMatch::Exact(s) | StringMatch::Prefix(s) | StringMatch::Suffix(s) => s.as_str(),
        StringMatch::Presence => return false,
    };
    text.rsplit_once(']').map_or(text, |(_, tail)| tail).contains(':')
}

/// [`StringMatch::matches`] ignoring ASCII case, for hosts. Compares bytes, so a pattern that
/// ends inside a multi-byte character of `host` simply does not match.
fn host_matches(m: &StringMatch, host: &str) -> bool {
    let (host, len) = (host.as_bytes(), host.len());
    match m {
        StringMatch::Exact(s) => host.eq_ignore_ascii_case(s.as_bytes()),
        StringMatch::Prefix(s) => host.get(..s.len()).is_some_and(|h| h.eq_ignore_ascii_case(s.as_bytes())),
        StringMatch::Suffix(s) => len
            .checked_sub(s.len())
            .and_then(|start| host.get(start..))
            .is_some_and(|h| h.eq_ignore_ascii_case(s.as_bytes())),
        StringMatch::Presence => len > 0,
    }
}

/// The values of a `when` key for this request; `None` when the key is not one we know or is
/// malformed (an empty list is a known key without a value here).
fn attribute(key: &str, conn: &Connection<'_>, req: &Request<'_>) -> Option<Vec<String>> {
    let claims = |path: &[&str]| req.claims.map(|c| values_at(c, path)).unwrap_or_default();
    let value = match parse_key(key)? {
        // Every value of a repeated header (a second `x-mode: bad` is not hidden behind the
        // first); a value that is not text is no value.
        Key::Header(name) => {
            return Some(
                req.headers
                    .get_all(name)
                    .iter()
                    .filter_map(|v| v.to_str().ok())
                    .map(str::to_string)
                    .collect(),
            );
        }
        Key::Claims(path) => return Some(claims(&path)),
        Key::Audiences => return Some(claims(&["aud"])),
        Key::Presenter => return Some(claims(&["azp"])),
        Key::SourceIp => Some(conn.source_ip.to_string()),
        Key::SourceNamespace => conn.source.map(|s| s.namespace().to_string()),
        Key::SourcePrincipal => conn.source.map(Identity::principal),
        Key::DestinationPort => Some(conn.destination_port.to_string()),
        Key::RequestPrincipal => req.request_principal.map(str::to_string),
    };
    Some(value.into_iter().collect())
}

/// A `when` key this evaluator knows.
enum Key<'a> {
    Header(&'a str),
    Claims(Vec<&'a str>),
    Audiences,
    Presenter,
    SourceIp,
    SourceNamespace,
    SourcePrincipal,
    DestinationPort,
    RequestPrincipal,
}

fn parse_key(key: &str) -> Option<Key<'_>> {
    if let Some(name) = key.strip_prefix("request.headers[").and_then(|k| k.strip_suffix(']')) {
        return (!name.is_empty()).then_some(Key::Header(name));
    }
    if let Some(path) = key.strip_prefix("request.auth.claims") {
        return claim_path(path).map(Key::Claims);
    }
    Some(match key {
        "request.auth.audiences" => Key::Audiences,
        "request.auth.presenter" => Key::Presenter,
        "source.ip" => Key::SourceIp,
        "source.namespace" => Key::SourceNamespace,
        "source.principal" => Key::SourcePrincipal,
        "destination.port" => Key::DestinationPort,
        "request.auth.principal" => Key::RequestPrincipal,
        _ => return None,
    })
}

/// Whether `key` is a `when` key this evaluator can read, to refuse a policy with another on
/// receipt (at run time an unknown key fails closed).
pub fn known_condition_key(key: &str) -> bool {
    parse_key(key).is_some()
}

/// The most claim names a `request.auth.claims[..]` key may walk through.
pub const MAX_CLAIM_DEPTH: usize = 16;

/// Top-level claims whose string value is a space-delimited list (Istio's default
/// `spaceDelimitedClaims`, normalized by Envoy's `jwt_authn`).
const SPACE_DELIMITED_CLAIMS: [&str; 2] = ["scope", "permission"];

/// The values `claims` has for `key`, the part of a `request.auth.claims[..]` condition key
/// after `request.auth.claims` (`[groups]`, `[realm][role]`); `None` when `key` is malformed.
/// Never panics.
pub fn claim_values(claims: &serde_json::Value, key: &str) -> Option<Vec<String>> {
    claim_path(key).map(|path| values_at(claims, &path))
}

/// The names in `[a][b]..`: at least one and at most [`MAX_CLAIM_DEPTH`], each non-empty and
/// without brackets, and nothing around them.
fn claim_path(key: &str) -> Option<Vec<&str>> {
    let mut names = Vec::new();
    let mut rest = key;
    while !rest.is_empty() {
        let (name, after) = rest.strip_prefix('[')?.split_once(']')?;
        if name.is_empty() || name.contains('[') || names.len() == MAX_CLAIM_DEPTH {
            return None;
        }
        names.push(name);
        rest = after;
    }
    (!names.is_empty()).then_some(names)
}

/// The values at `path` in `claims`, walking objects only.
fn values_at(claims: &serde_json::Value, path: &[&str]) -> Vec<String> {
    use serde_json::Value;
    let Some(claim) = path.iter().try_fold(claims, |v, name| v.as_object()?.get(*name)) else {
        return vec![];
    };
    let scalar = |v: &Value| match v {
        Value::String(s) => Some(s.clone()),
        Value::Number(_) | Value::Bool(_) => Some(v.to_string()),
        Value::Null | Value::Array(_) | Value::Object(_) => None,
    };
    match claim {
        Value::Array(items) => items.iter().filter_map(scalar).collect(),
        Value::String(s) if matches!(path, [name] if SPACE_DELIMITED_CLAIMS.contains(name)) => {
            let items: Vec<String> = s.split(' ').filter(|i| !i.is_empty()).map(str::to_string).collect();
            // Envoy leaves a string that splits into nothing as it is.
            if items.is_empty() { vec![s.clone()] } else { items }
        }
        other => scalar(other).into_iter().collect(),
    }
}

#[cfg(test)]
mod tests;
