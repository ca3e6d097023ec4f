//! What the fuzz targets share: how a fuzz input is cut into resource names and bodies, and the
//! invariants every target checks on what the parsers accept.

use common::state::{Action, Policy, Snapshot, State};
use common::xds::handler::RawResource;

/// Network the fuzzed states are built for.
pub const NETWORK: &str = "fuzz-net";

/// A selector byte below this means "the name the resource itself implies".
const EXPLICIT_NAME: u8 = 0x80;

/// Splits a fuzz input into a resource name and a body. A first byte below `0x80` means no
/// name is given (the target uses the name the resource implies, so that validation gets past
/// the name check); otherwise its low 7 bits are the length of the name that follows.
pub fn split_name(data: &[u8]) -> Option<(Option<String>, &[u8])> {
    let (&selector, rest) = data.split_first()?;
    if selector < EXPLICIT_NAME {
        return Some((None, rest));
    }
    let len = usize::from(selector - EXPLICIT_NAME).min(rest.len());
    let (name, body) = rest.split_at(len);
    Some((Some(String::from_utf8_lossy(name).into_owned()), body))
}

/// Encodes `(name, body)` in the form [`split_name`] reads (for seeds).
pub fn join_name(name: Option<&str>, body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(body.len() + 1 + name.map_or(0, str::len));
    match name {
        None => out.push(0),
        Some(n) => {
            let n = &n.as_bytes()[..n.len().min(0x7f)];
            out.push(EXPLICIT_NAME + n.len() as u8);
            out.extend_from_slice(n);
        }
    }
    out.extend_from_slice(body);
    out
}

/// Reads length-prefixed records: a kind byte, then a `split_name` selector and name, then a
/// two-byte little-endian body length and the body. A short last record takes what is left.
pub struct Records<'a>(&'a [u8]);

/// One record of a [`Records`] stream.
pub struct Record<'a> {
    pub kind: u8,
    pub name: Option<String>,
    pub body: &'a [u8],
}

impl<'a> Records<'a> {
    pub fn new(data: &'a [u8]) -> Self {
        Self(data)
    }
}

impl<'a> Iterator for Records<'a> {
    type Item = Record<'a>;

    fn next(&mut self) -> Option<Record<'a>> {
        let (&kind, rest) = self.0.split_first()?;
        let (name, rest) = split_name(rest)?;
        let (len, rest) = match rest {
            [a, b, rest @ ..] => (usize::from(u16::from_le_bytes([*a, *b])), rest),
            _ => (rest.len(), &[][..]),
        };
        let (body, rest) = rest.split_at(len.min(rest.len()));
        self.0 = rest;
        Some(Record { kind, name, body })
    }
}

/// Encodes one record in the form [`Records`] reads (for seeds).
pub fn record(kind: u8, name: Option<&str>, body: &[u8]) -> Vec<u8> {
    let named = join_name(name, &[]);
    let mut out = vec![kind];
    out.extend_from_slice(&named);
    let len = u16::try_from(body.len()).unwrap_or(u16::MAX);
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(&body[..usize::from(len)]);
    out
}

/// A raw xDS resource as the client hands it to the handlers.
pub fn raw(name: &str, type_url: &str, body: &[u8]) -> RawResource {
    RawResource {
        name: name.to_string(),
        version: "fuzz".to_string(),
        body: Some(prost_types::Any { type_url: type_url.to_string(), value: body.to_vec() }),
    }
}

/// A fresh state and the handlers that feed it.
pub fn fresh_state() -> (State, common::xds::Handlers) {
    State::new(NETWORK)
}

/// Fail closed: a policy held in its fail-safe form never widens access. An ALLOW matches
/// nothing (no rules); a DENY matches everything in its scope (one rule without clauses).
pub fn assert_fail_safe_shape(p: &Policy) {
    match p.action {
        Action::Allow => assert!(p.rules.is_empty(), "fail-safe ALLOW {} has rules", p.key()),
        Action::Deny => assert!(
            p.rules.len() == 1 && p.rules[0].clauses.is_empty(),
            "fail-safe DENY {} does not match everything",
            p.key()
        ),
        Action::Audit => panic!("fail-safe policy {} is an AUDIT", p.key()),
    }
}

/// What a target fed into a state, so that its snapshot can be queried and checked (the
/// snapshot's maps are private; proxies only ask narrow questions).
#[derive(Default)]
pub struct Fed {
    /// UIDs of workloads fed.
    pub workloads: Vec<String>,
    /// `(namespace, hostname)` of services fed.
    pub services: Vec<(String, String)>,
    /// The converted form of every Authorization that passed the checks on receipt.
    pub accepted_policies: Vec<Policy>,
}

/// Runs the read-only queries proxies make on `s` for what was fed, and checks the fail-closed
/// invariant on the policies it hands out: each is either the conversion of an accepted
/// Authorization or a fail-safe stand-in, so nothing rejected contributes its rules.
pub fn exercise_snapshot(s: &Snapshot, fed: &Fed) {
    let workloads: Vec<_> = fed.workloads.iter().filter_map(|uid| s.workload_by_uid(uid)).collect();
    for w in &workloads {
        for p in s.policies_for(w) {
            if !fed.accepted_policies.iter().any(|a| a == p.as_ref()) {
                assert!(
                    s.failsafe_reason(&p.key()).is_some(),
                    "policy {} applies to {} but was neither accepted nor held fail-safe",
                    p.key(),
                    w.uid
                );
                assert_fail_safe_shape(&p);
            }
        }
        for name in s.missing_policies(w) {
            assert!(w.authorization_policies.iter().any(|n| n == name));
        }
        if let Some(gw) = &w.waypoint {
            let _ = s.resolve_gateway(gw, Some(w));
        }
        for ip in &w.addresses {
            let _ = s.lookup_destination(std::net::SocketAddr::new(*ip, 80));
        }
        let _ = s.service_of(w);
    }
    for (namespace, hostname) in &fed.services {
        let Some(svc) = s.service(namespace, hostname) else { continue };
        for port in svc.ports.iter().map(|p| p.service_port).chain([80]) {
            let near = workloads.first().map(|w| w.as_ref());
            for family in [common::select::Family::Any, common::select::Family::PreferV6] {
                let _ = s.pick_endpoint(svc, port, near, family);
            }
        }
        if let Some(gw) = &svc.waypoint {
            let _ = s.resolve_gateway(gw, None);
        }
        for (_, vip) in &svc.vips {
            let _ = s.lookup_destination(std::net::SocketAddr::new(*vip, 80));
        }
    }
}
