//! L4 authorization policies as evaluated, converted from `istio.security.Authorization` on
//! receipt (addresses parsed into networks, enums resolved).

use ipnet::IpNet;
use proto::security as sec;
use serde::Serialize;

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
