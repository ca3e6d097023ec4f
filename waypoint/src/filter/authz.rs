//! L7 authorization: Istio AuthorizationPolicy resources (our `Policy.authorization`) converted
//! into the evaluator ztunnel uses (`common::rbac`), with the request attributes added. A rule
//! becomes clauses that must all hold: one for `from` (any source), one for `to` (any
//! operation), one per `when` condition.

use std::net::IpAddr;
use std::sync::Arc;

use common::state::policy::{Action, Clause, Condition, HttpMatch, Match, Policy, Rule, Scope, StringMatch};
use ipnet::IpNet;
use proto::waypoint as wp;
use tracing::warn;

/// What a policy attaches to. Shared text: a tunnel's targets are built once and each of its
/// requests borrows or clones them.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
pub enum Target {
    /// `namespace/name` of a waypoint.
    Waypoint(Arc<str>),
    /// `namespace/hostname` of a service.
    Service(Arc<str>),
    /// `namespace/name` of a route.
    Route(Arc<str>),
}

fn strings(v: &[String]) -> Vec<StringMatch> {
    v.iter().map(|s| StringMatch::istio(s)).collect()
}

/// Host patterns as requests are matched: a trailing dot of the name dropped (`admin.svc.` and
/// `admin.svc.:80` mean `admin.svc` and `admin.svc:80`); case is ignored when matching.
fn host_patterns(v: &[String]) -> Vec<StringMatch> {
    v.iter()
        .map(|h| {
            let (name, port) = match h.rsplit_once(':') {
                Some((name, port)) if !port.contains(']') => (name, Some(port)),
                _ => (h.as_str(), None),
            };
            let name = name.strip_suffix('.').unwrap_or(name);
            StringMatch::istio(&port.map_or_else(|| name.to_string(), |p| format!("{name}:{p}")))
        })
        .collect()
}

fn nets(v: &[String]) -> Result<Vec<IpNet>, String> {
    v.iter()
        .map(|s| {
            s.parse::<IpNet>()
                .or_else(|_| s.parse::<IpAddr>().map(IpNet::from))
                .map_err(|_| format!("ip block {s:?} is neither an address nor a CIDR"))
        })
        .collect()
}

fn ports(v: &[String]) -> Result<Vec<u16>, String> {
    v.iter().map(|p| p.parse().map_err(|_| format!("port {p:?}"))).collect()
}

fn http_only(http: HttpMatch) -> Match {
    Match { http: Some(Box::new(http)), ..Default::default() }
}

fn rule(r: &wp::AuthorizationRule) -> Result<Rule, String> {
    let mut clauses = Vec::new();
    if !r.from.is_empty() {
        let matches = r
            .from
            .iter()
            .map(|s| {
                let request = HttpMatch {
                    request_principals: strings(&s.request_principals),
                    not_request_principals: strings(&s.not_request_principals),
                    ..Default::default()
                };
                let wants_request = !s.request_principals.is_empty() || !s.not_request_principals.is_empty();
                Ok(Match {
                    principals: strings(&s.principals),
                    not_principals: strings(&s.not_principals),
                    namespaces: strings(&s.namespaces),
                    not_namespaces: strings(&s.not_namespaces),
                    source_ips: nets(&s.ip_blocks)?,
                    not_source_ips: nets(&s.not_ip_blocks)?,
                    http: wants_request.then(|| Box::new(request)),
                    ..Default::default()
                })
            })
            .collect::<Result<_, String>>()?;
        clauses.push(Clause { matches });
    }
    if !r.to.is_empty() {
        let matches =
            r.to.iter()
                .map(|o| {
                    Ok(Match {
                        destination_ports: ports(&o.ports)?,
                        not_destination_ports: ports(&o.not_ports)?,
                        http: Some(Box::new(HttpMatch {
                            hosts: host_patterns(&o.hosts),
                            not_hosts: host_patterns(&o.not_hosts),
                            methods: strings(&o.methods),
                            not_methods: strings(&o.not_methods),
                            paths: strings(&o.paths),
                            not_paths: strings(&o.not_paths),
                            ..Default::default()
                        })),
                        ..Default::default()
                    })
                })
                .collect::<Result<_, String>>()?;
        clauses.push(Clause { matches });
    }
    for c in &r.when {
        if c.key.is_empty() {
            return Err("a when condition needs a key".into());
        }
        if !common::rbac::known_condition_key(&c.key) {
            return Err(format!("when key {:?} is not one the waypoint can read", c.key));
        }
        let condition =
            Condition { key: c.key.clone(), values: strings(&c.values), not_values: strings(&c.not_values) };
        clauses.push(Clause {
            matches: vec![http_only(HttpMatch { conditions: vec![condition], ..Default::default() })],
        });
    }
    Ok(Rule { clauses })
}

/// What `p` attaches to.
pub fn target_of(p: &wp::Policy) -> Result<Target, String> {
    Ok(match p.target.as_ref().and_then(|t| t.target.as_ref()) {
        Some(wp::parent_ref::Target::Waypoint(w)) => Target::Waypoint(w.as_str().into()),
        Some(wp::parent_ref::Target::Service(s)) => {
            Target::Service(format!("{}/{}", s.namespace, s.hostname).into())
        }
        Some(wp::parent_ref::Target::Route(r)) => Target::Route(r.as_str().into()),
        None => return Err("policy has no target".into()),
    })
}

/// The target and the evaluable policy of `p`, if it carries an authorization policy.
pub fn convert(p: &wp::Policy) -> Result<Option<(Target, Policy)>, String> {
    let target = target_of(p)?;
    let Some(a) = &p.authorization else { return Ok(None) };
    let action = match wp::authorization_policy::Action::try_from(a.action) {
        Ok(wp::authorization_policy::Action::Allow) => Action::Allow,
        Ok(wp::authorization_policy::Action::Deny) => Action::Deny,
        Ok(wp::authorization_policy::Action::Audit) => Action::Audit,
        Ok(wp::authorization_policy::Action::Custom) => {
            warn!(policy = %p.name, "CUSTOM authorization is not supported: the policy denies what it matches");
            Action::Deny
        }
        Err(_) => return Err(format!("unknown authorization action {}", a.action)),
    };
    let rules = a.rules.iter().map(rule).collect::<Result<_, _>>()?;
    let policy = Policy {
        name: p.name.clone(),
        namespace: p.namespace.clone(),
        scope: Scope::WorkloadSelector,
        action,
        dry_run: a.dry_run,
        rules,
    };
    Ok(Some((target, policy)))
}

/// The policies that apply to a request, by their targets.
pub fn applicable(
    by_target: &std::collections::BTreeMap<Target, Vec<Arc<Policy>>>,
    targets: &[Target],
) -> Vec<Arc<Policy>> {
    targets.iter().filter_map(|t| by_target.get(t)).flatten().cloned().collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use common::identity::Identity;
    use common::rbac::{Connection, Request, Verdict, evaluate};
    use common::xds::LocalConfig;

    fn policies(yaml: &str) -> Vec<Arc<Policy>> {
        let config = LocalConfig::from_yaml(yaml).expect("yaml");
        config
            .waypoint_policies
            .iter()
            .map(|p| {
                let Some(wp::resource::Kind::Policy(p)) = p.to_proto().expect("proto").kind else {
                    panic!("policy")
                };
                Arc::new(convert(&p).expect("converts").expect("authorization").1)
            })
            .collect()
    }

    fn decide(policies: &[Arc<Policy>], who: &Identity, ip: &str, method: &str, path: &str) -> Verdict {
        let headers = http::HeaderMap::new();
        let req = Request {
            host: "echo",
            port: None,
            method,
            path,
            headers: &headers,
            request_principal: None,
            claims: None,
        };
        let conn = Connection {
            source: Some(who),
            source_ip: ip.parse().expect("ip"),
            destination_ip: "10.0.0.9".parse().expect("ip"),
            destination_port: 8080,
            http: Some(&req),
        };
        evaluate(policies, &conn)
    }

    #[test]
    fn istio_rules_translate_to_the_shared_evaluator() {
        let p = policies(
            r#"
waypointPolicies:
  - name: readers
    namespace: demo
    target: {waypoint: demo/waypoint}
    authorization:
      rules:
        - from: [{source: {namespaces: [demo]}}, {source: {ipBlocks: [192.168.0.0/16]}}]
          to: [{operation: {methods: [GET, HEAD], paths: ["/api/*"], ports: ["8080"]}}]
  - name: custom
    namespace: demo
    target: {waypoint: demo/waypoint}
    authorization: {action: CUSTOM, rules: [{to: [{operation: {paths: ["/ext*"]}}]}]}
"#,
        );
        let demo = Identity::new("cluster.local", "demo", "a").expect("id");
        let other = Identity::new("cluster.local", "other", "b").expect("id");
        assert_eq!(decide(&p, &demo, "10.0.0.1", "GET", "/api/x"), Verdict::Allow);
        assert_eq!(decide(&p, &demo, "10.0.0.1", "POST", "/api/x"), Verdict::NotAllowed, "method not listed");
        assert_eq!(decide(&p, &other, "10.0.0.1", "GET", "/api/x"), Verdict::NotAllowed, "namespace");
        assert_eq!(decide(&p, &other, "192.168.3.4", "GET", "/api/x"), Verdict::Allow, "any source of from");
        assert_eq!(decide(&p, &demo, "10.0.0.1", "GET", "/ext/x"), Verdict::DeniedBy("demo/custom".into()));
    }

    #[test]
    fn malformed_policies_are_refused() {
        let bad = |rules: &str| {
            let yaml = format!(
                "waypointPolicies: [{{name: p, namespace: d, target: {{waypoint: d/w}}, authorization: {{rules: [{rules}]}}}}]"
            );
            let config = LocalConfig::from_yaml(&yaml).expect("yaml");
            let Some(wp::resource::Kind::Policy(p)) =
                config.waypoint_policies[0].to_proto().expect("proto").kind
            else {
                panic!("policy")
            };
            convert(&p).expect_err("refused")
        };
        assert!(bad("{from: [{source: {ipBlocks: [not-an-ip]}}]}").contains("ip block"));
        assert!(bad("{to: [{operation: {ports: [http]}}]}").contains("port"));
        assert!(bad("{when: [{key: ''}]}").contains("key"));
        assert!(
            bad("{when: [{key: 'request.auth.claims[a]]', values: [x]}]}").contains("not one the waypoint")
        );
        assert!(bad("{when: [{key: 'connection.sni', values: [x]}]}").contains("not one the waypoint"));
    }
}
