//! L4 authorization policies as evaluated, converted from `istio.security.Authorization` on
//! receipt (addresses parsed into networks, enums resolved), and the fail-safe form a policy
//! that cannot be converted is held in.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, PoisonError};

use ipnet::IpNet;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use proto::security as sec;
use serde::Serialize;
use tracing::warn;

use crate::xds::validate::ip_bytes;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Scope {
    /// Every workload in the mesh.
    Global,
    /// Every workload of the policy's namespace.
    Namespace,
    /// The workloads that list the policy in their `authorization_policies`.
    WorkloadSelector,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Action {
    Allow,
    Deny,
    /// Only logged and counted (waypoint policies).
    Audit,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum StringMatch {
    Exact(String),
    Prefix(String),
    Suffix(String),
    /// Any non-empty value.
    Presence,
}

impl StringMatch {
    /// Istio's string syntax: `*` any non-empty value, `abc*` a prefix, `*abc` a suffix, else exact.
    pub fn istio(s: &str) -> Self {
        if s == "*" {
            StringMatch::Presence
        } else if let Some(p) = s.strip_suffix('*') {
            StringMatch::Prefix(p.to_string())
        } else if let Some(p) = s.strip_prefix('*') {
            StringMatch::Suffix(p.to_string())
        } else {
            StringMatch::Exact(s.to_string())
        }
    }

    pub fn matches(&self, value: &str) -> bool {
        match self {
            StringMatch::Exact(s) => value == s,
            StringMatch::Prefix(s) => value.starts_with(s.as_str()),
            StringMatch::Suffix(s) => value.ends_with(s.as_str()),
            StringMatch::Presence => !value.is_empty(),
        }
    }
}

/// One match: every non-empty field must hold (a positive field: the value is one of those
/// listed; a `not_` field: it is none of them).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Match {
    pub namespaces: Vec<StringMatch>,
    pub not_namespaces: Vec<StringMatch>,
    pub principals: Vec<StringMatch>,
    pub not_principals: Vec<StringMatch>,
    pub source_ips: Vec<IpNet>,
    pub not_source_ips: Vec<IpNet>,
    pub destination_ips: Vec<IpNet>,
    pub not_destination_ips: Vec<IpNet>,
    pub destination_ports: Vec<u16>,
    pub not_destination_ports: Vec<u16>,
    /// (namespace, service account) pairs.
    pub service_accounts: Vec<(String, String)>,
    pub not_service_accounts: Vec<(String, String)>,
    /// Carries extensions ztunnel does not understand: it never matches for ALLOW and always
    /// matches for DENY (fail closed).
    pub unsupported: bool,
    /// Request attributes (waypoint policies). Where there is no request (L4), a match that
    /// has them never allows and always denies (fail closed).
    pub http: Option<Box<HttpMatch>>,
}

/// The request side of a match: every non-empty field must hold.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct HttpMatch {
    pub hosts: Vec<StringMatch>,
    pub not_hosts: Vec<StringMatch>,
    pub methods: Vec<StringMatch>,
    pub not_methods: Vec<StringMatch>,
    pub paths: Vec<StringMatch>,
    pub not_paths: Vec<StringMatch>,
    /// `<iss>/<sub>` of a verified JWT.
    pub request_principals: Vec<StringMatch>,
    pub not_request_principals: Vec<StringMatch>,
    pub conditions: Vec<Condition>,
}

/// A `when` condition: the attribute named by `key` must match one of `values` and none of
/// `not_values`. Keys: `request.headers[<name>]`, `source.ip`, `source.namespace`,
/// `source.principal`, `destination.port`, `request.auth.principal`,
/// `request.auth.claims[<name>]`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Condition {
    pub key: String,
    pub values: Vec<StringMatch>,
    pub not_values: Vec<StringMatch>,
}

/// A clause matches when any of its matches does.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Clause {
    pub matches: Vec<Match>,
}

/// A rule matches when all of its clauses do.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Rule {
    pub clauses: Vec<Clause>,
}

/// A policy matches when any of its rules does.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Policy {
    pub name: String,
    pub namespace: String,
    pub scope: Scope,
    pub action: Action,
    pub dry_run: bool,
    pub rules: Vec<Rule>,
}

impl Policy {
    /// `namespace/name`: the resource name, and how workloads refer to it.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    pub fn from_proto(p: &sec::Authorization) -> Result<Self, String> {
        let scope = match sec::Scope::try_from(p.scope) {
            Ok(sec::Scope::Global) => Scope::Global,
            Ok(sec::Scope::Namespace) => Scope::Namespace,
            Ok(sec::Scope::WorkloadSelector) => Scope::WorkloadSelector,
            Err(_) => return Err(format!("unknown scope {}", p.scope)),
        };
        let action = match sec::Action::try_from(p.action) {
            Ok(sec::Action::Allow) => Action::Allow,
            Ok(sec::Action::Deny) => Action::Deny,
            Err(_) => return Err(format!("unknown action {}", p.action)),
        };
        let rules = p
            .rules
            .iter()
            .map(|r| {
                let clauses = r
                    .clauses
                    .iter()
                    .map(|c| {
                        Ok(Clause { matches: c.matches.iter().map(convert_match).collect::<Result<_, _>>()? })
                    })
                    .collect::<Result<_, String>>()?;
                Ok(Rule { clauses })
            })
            .collect::<Result<_, String>>()?;
        Ok(Self {
            name: p.name.clone(),
            namespace: p.namespace.clone(),
            scope,
            action,
            dry_run: p.dry_run,
            rules,
        })
    }
}

impl Policy {
    /// The form an Authorization rejected on receipt is held in, so that what cannot be applied
    /// never widens access: an ALLOW matches nothing (no rules), a DENY matches everything in its
    /// scope (one rule without clauses). `resource` is the xDS resource name (`namespace/name`),
    /// which is what workloads refer to; the body's name and namespace stand in when it is not
    /// of that form. An action that is not ALLOW or DENY (a CUSTOM, or a value this build does not
    /// know) is held as a DENY; a scope that cannot be read as WORKLOAD_SELECTOR, so only the
    /// workloads that name the policy are affected. `None` when no name can be read.
    pub fn fail_safe(resource: &str, p: &sec::Authorization) -> Option<Self> {
        let (namespace, name) = match resource.split_once('/') {
            Some((ns, name)) if !ns.is_empty() && !name.is_empty() && !name.contains('/') => {
                (ns.to_string(), name.to_string())
            }
            _ if !p.namespace.is_empty() && !p.name.is_empty() => (p.namespace.clone(), p.name.clone()),
            _ => return None,
        };
        let scope = match sec::Scope::try_from(p.scope) {
            Ok(sec::Scope::Global) => Scope::Global,
            Ok(sec::Scope::Namespace) => Scope::Namespace,
            Ok(sec::Scope::WorkloadSelector) | Err(_) => Scope::WorkloadSelector,
        };
        let (action, rules) = match sec::Action::try_from(p.action) {
            Ok(sec::Action::Allow) => (Action::Allow, vec![]),
            Ok(sec::Action::Deny) | Err(_) => (Action::Deny, vec![Rule { clauses: vec![] }]),
        };
        Some(Self { name, namespace, scope, action, dry_run: p.dry_run, rules })
    }
}

/// The leading fields of `istio.security.Authorization` (same numbers and types), decoded on
/// their own when the whole resource does not decode (a malformed rule), so that a rejected
/// policy can still be held in its fail-safe form. Rules and extensions are skipped unread.
#[derive(Clone, PartialEq, prost::Message)]
pub struct AuthorizationHeader {
    #[prost(string, tag = "1")]
    pub name: String,
    #[prost(string, tag = "2")]
    pub namespace: String,
    #[prost(int32, tag = "3")]
    pub scope: i32,
    #[prost(int32, tag = "4")]
    pub action: i32,
    #[prost(bool, tag = "6")]
    pub dry_run: bool,
}

impl AuthorizationHeader {
    /// What can be read of an encoded Authorization whose body does not decode as a whole.
    pub fn read(body: &[u8]) -> Option<sec::Authorization> {
        let h = <Self as prost::Message>::decode(body).ok()?;
        Some(sec::Authorization {
            name: h.name,
            namespace: h.namespace,
            scope: h.scope,
            action: h.action,
            dry_run: h.dry_run,
            ..Default::default()
        })
    }
}

/// A policy held in its fail-safe form, and why it was rejected.
#[derive(Clone, Debug)]
pub struct FailSafe {
    pub policy: Arc<Policy>,
    pub reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ActionLabels {
    action: &'static str,
}

/// The Authorizations held in their fail-safe form, by xDS resource name, and the metrics that
/// count them. A rejected update installs the stand-in in place of whatever version was held;
/// a later accepted update or a removal of the same resource takes it out.
#[derive(Debug, Default)]
pub struct FailSafeSet {
    held: Mutex<BTreeMap<String, FailSafe>>,
    /// Rejected Authorizations installed in fail-safe form, by the action held.
    installed: Family<ActionLabels, Counter>,
    /// Authorizations held in fail-safe form now.
    current: Gauge,
}

impl FailSafeSet {
    /// Registers `istio_authorization_policy_failsafe_total{action}` and
    /// `istio_authorization_policies_failsafe` (the registry carries the `istio` prefix).
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "authorization_policy_failsafe",
            "Authorizations rejected on receipt and installed in fail-safe form (ALLOW: matches nothing; DENY: matches everything in its scope), by action",
            self.installed.clone(),
        );
        registry.register(
            "authorization_policies_failsafe",
            "Authorizations currently held in fail-safe form",
            self.current.clone(),
        );
    }

    /// Holds `resource`, rejected for `reason`, in its fail-safe form when its name can be
    /// read; logs and counts it. Returns whether a stand-in is now held.
    pub fn hold(&self, resource: &str, p: &sec::Authorization, reason: &str) -> bool {
        let Some(policy) = Policy::fail_safe(resource, p) else {
            warn!(
                resource,
                %reason,
                "rejected Authorization has no readable name; workloads naming it are refused while it is missing"
            );
            return false;
        };
        let (action, effect) = match policy.action {
            Action::Allow => ("ALLOW", "an ALLOW that matches nothing"),
            _ => ("DENY", "a DENY that matches everything in its scope"),
        };
        warn!(
            policy = %policy.key(),
            action,
            scope = ?policy.scope,
            %reason,
            "Authorization rejected on receipt; held fail-safe as {effect}"
        );
        self.installed.get_or_create(&ActionLabels { action }).inc();
        let mut held = self.lock();
        held.insert(resource.to_string(), FailSafe { policy: Arc::new(policy), reason: reason.to_string() });
        self.current.set(held.len() as i64);
        true
    }

    /// `resource` was accepted or removed: its stand-in, if any, goes.
    pub fn clear(&self, resource: &str) {
        let mut held = self.lock();
        if let Some(f) = held.remove(resource) {
            tracing::info!(policy = %f.policy.key(), "Authorization no longer held fail-safe");
        }
        self.current.set(held.len() as i64);
    }

    /// The stand-in held for `resource`, if any.
    pub fn get(&self, resource: &str) -> Option<FailSafe> {
        self.lock().get(resource).cloned()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, FailSafe>> {
        self.held.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

fn strings(v: &[sec::StringMatch]) -> Result<Vec<StringMatch>, String> {
    use sec::string_match::MatchType;
    v.iter()
        .map(|s| match &s.match_type {
            Some(MatchType::Exact(e)) => Ok(StringMatch::Exact(e.clone())),
            Some(MatchType::Prefix(e)) => Ok(StringMatch::Prefix(e.clone())),
            Some(MatchType::Suffix(e)) => Ok(StringMatch::Suffix(e.clone())),
            Some(MatchType::Presence(_)) => Ok(StringMatch::Presence),
            None => Err("string match without a match type".to_string()),
        })
        .collect()
}

fn nets(v: &[sec::Address]) -> Result<Vec<IpNet>, String> {
    v.iter()
        .map(|a| {
            let ip = ip_bytes(&a.address)?;
            let len = u8::try_from(a.length).map_err(|_| format!("prefix length {} too long", a.length))?;
            IpNet::new(ip, len).map_err(|e| format!("{ip}/{len}: {e}"))
        })
        .collect()
}

fn ports(v: &[u32]) -> Result<Vec<u16>, String> {
    v.iter().map(|p| u16::try_from(*p).map_err(|_| format!("port {p} out of range"))).collect()
}

fn accounts(v: &[sec::ServiceAccountMatch]) -> Vec<(String, String)> {
    v.iter().map(|a| (a.namespace.clone(), a.service_account.clone())).collect()
}

fn convert_match(m: &sec::Match) -> Result<Match, String> {
    Ok(Match {
        namespaces: strings(&m.namespaces)?,
        not_namespaces: strings(&m.not_namespaces)?,
        principals: strings(&m.principals)?,
        not_principals: strings(&m.not_principals)?,
        source_ips: nets(&m.source_ips)?,
        not_source_ips: nets(&m.not_source_ips)?,
        destination_ips: nets(&m.destination_ips)?,
        not_destination_ips: nets(&m.not_destination_ips)?,
        destination_ports: ports(&m.destination_ports)?,
        not_destination_ports: ports(&m.not_destination_ports)?,
        service_accounts: accounts(&m.service_accounts),
        not_service_accounts: accounts(&m.not_service_accounts),
        unsupported: !m.extensions.is_empty(),
        http: None,
    })
}
