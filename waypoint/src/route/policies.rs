//! The policy index: what attaches to the waypoint, a service or a route (authorization, JWT
//! rules, rate limits, faults, retries, mirrors, and per service the request cap and outlier
//! detection). Each policy resource is compiled once and kept across config pushes while it is
//! unchanged; when it changes, the parts that did not change are kept too. So a push that does
//! not touch a policy keeps its JWT keys, token buckets and request-cap slots as they were.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use common::state::Policy;
use proto::waypoint as wp;

use crate::filter::authz::{self, Target};
use crate::filter::fault::Fault;
use crate::filter::jwt::JwtRule;
use crate::filter::mirror::Mirror;
use crate::filter::ratelimit::TokenBucket;
use crate::filter::retry::RetryPolicy;
use crate::filter::traffic::TrafficPolicy;

/// Policies by what they attach to.
#[derive(Debug, Default)]
pub struct PolicyIndex {
    pub authz: BTreeMap<Target, Vec<Arc<Policy>>>,
    pub limits: BTreeMap<Target, Vec<Arc<TokenBucket>>>,
    pub faults: BTreeMap<Target, Vec<Arc<Fault>>>,
    /// The retry policy of each target (the last one of a target wins).
    pub retries: BTreeMap<Target, RetryPolicy>,
    pub mirrors: BTreeMap<Target, Vec<Mirror>>,
    pub jwt: BTreeMap<Target, Vec<Arc<JwtRule>>>,
    /// Request caps, outlier detection and load balancing by backend service
    /// (`namespace/hostname`), then port (0: every port without one of its own).
    pub traffic: BTreeMap<String, BTreeMap<u32, Arc<TrafficPolicy>>>,
}

impl PolicyIndex {
    /// The traffic policy for `service` (`namespace/hostname`) on `port`: the port's own, else
    /// the service's.
    pub fn traffic_for(&self, service: &str, port: u32) -> Option<Arc<TrafficPolicy>> {
        let ports = self.traffic.get(service)?;
        ports.get(&port).or_else(|| ports.get(&0)).cloned()
    }

    pub fn build<'a>(compiled: impl IntoIterator<Item = &'a CompiledPolicy>) -> Self {
        let mut index = Self::default();
        for c in compiled {
            let t = &c.target;
            if let Some(a) = &c.authz {
                index.authz.entry(t.clone()).or_default().push(a.clone());
            }
            if let Some(b) = &c.limit {
                index.limits.entry(t.clone()).or_default().push(b.clone());
            }
            if let Some(f) = &c.fault {
                index.faults.entry(t.clone()).or_default().push(f.clone());
            }
            if let Some(r) = &c.retry {
                index.retries.insert(t.clone(), r.clone());
            }
            if let Some(m) = &c.mirror {
                index.mirrors.entry(t.clone()).or_default().push(m.clone());
            }
            if !c.jwt.is_empty() {
                index.jwt.entry(t.clone()).or_default().extend(c.jwt.iter().map(|(_, r)| r.clone()));
            }
            if let (Target::Service(key), Some(tp)) = (t, &c.traffic) {
                // A policy for one port of the service beside the service's (port 0).
                let port = match c.source.target.as_ref().and_then(|t| t.target.as_ref()) {
                    Some(proto::waypoint::parent_ref::Target::Service(s)) => s.port,
                    _ => 0,
                };
                index.traffic.entry(key.to_string()).or_default().insert(port, tp.clone());
            }
        }
        index
    }
}

/// One policy resource, compiled, with the source it was compiled from.
#[derive(Debug)]
pub struct CompiledPolicy {
    pub source: wp::Policy,
    target: Target,
    authz: Option<Arc<Policy>>,
    limit: Option<Arc<TokenBucket>>,
    fault: Option<Arc<Fault>>,
    retry: Option<RetryPolicy>,
    mirror: Option<Mirror>,
    jwt: Vec<(wp::JwtRule, Arc<JwtRule>)>,
    traffic: Option<Arc<TrafficPolicy>>,
}

/// The compiled part of the previous version (`old_source`, `old`) if its source equals `new`,
/// else `new` compiled.
fn keep<S: PartialEq, T: Clone>(
    new: Option<&S>,
    old_source: Option<&S>,
    old: Option<&T>,
    compile: impl FnOnce(&S) -> Result<T, String>,
) -> Result<Option<T>, String> {
    let Some(new) = new else { return Ok(None) };
    match (old_source, old) {
        (Some(src), Some(compiled)) if src == new => Ok(Some(compiled.clone())),
        _ => compile(new).map(Some),
    }
}

impl CompiledPolicy {
    /// Compiles `p`, keeping the parts of `old` (the previous version of the same resource)
    /// whose source did not change. A new JWT rule whose JWKS URL some previous rule fetched
    /// starts with that rule's keys (`fetched`, by URL) while its own fetch runs.
    pub fn compile(
        p: wp::Policy,
        old: Option<&CompiledPolicy>,
        fetched: &HashMap<String, Arc<JwtRule>>,
    ) -> Result<Self, String> {
        let target = authz::target_of(&p)?;
        let authz = authz::convert(&p)?.map(|(_, policy)| Arc::new(policy));
        let limit = keep(
            p.rate_limit.as_ref(),
            old.and_then(|o| o.source.rate_limit.as_ref()),
            old.and_then(|o| o.limit.as_ref()),
            |r| TokenBucket::from_proto(r).map(Arc::new),
        )?;
        let fault = keep(
            p.fault.as_ref(),
            old.and_then(|o| o.source.fault.as_ref()),
            old.and_then(|o| o.fault.as_ref()),
            |f| Fault::from_proto(f).map(Arc::new),
        )?;
        // An unchanged request cap keeps its slots (requests in flight still count).
        let traffic = p
            .traffic
            .as_ref()
            .map(|t| TrafficPolicy::update(old.and_then(|o| o.traffic.as_ref()), t))
            .transpose()?;
        if traffic.is_some() && !matches!(target, Target::Service(_)) {
            return Err("a traffic policy must target a service".into());
        }
        let retry = p.retry.as_ref().map(RetryPolicy::from_proto).transpose()?;
        let mirror = p.mirror.as_ref().map(Mirror::from_proto).transpose()?;
        let mut jwt = Vec::new();
        for r in p.request_authentication.iter().flat_map(|a| &a.rules) {
            let kept = old.and_then(|o| o.jwt.iter().find(|(src, _)| src == r)).map(|(_, rule)| rule.clone());
            let rule = match kept {
                Some(rule) => rule,
                None => {
                    let rule = Arc::new(JwtRule::from_proto(r)?);
                    if let Some(previous) = rule.jwks_uri.as_ref().and_then(|u| fetched.get(u)) {
                        rule.adopt_keys(previous);
                    }
                    crate::filter::jwt::keep_fetched(&rule);
                    rule
                }
            };
            jwt.push((r.clone(), rule));
        }
        Ok(Self { source: p, target, authz, limit, fault, retry, mirror, jwt, traffic })
    }

    /// Rules of this policy that fetch their keys, by JWKS URL.
    pub fn fetched_rules(&self) -> impl Iterator<Item = (String, Arc<JwtRule>)> + '_ {
        self.jwt.iter().filter_map(|(_, r)| r.jwks_uri.clone().map(|u| (u, r.clone())))
    }
}
