//! Endpoint selection, the one place ztunnel (service VIPs, waypoints named by hostname) and
//! the waypoint (its backends) choose where a connection or request goes.
//!
//! Two steps. [`candidates`] says which endpoints may serve: healthy ones (all of them when the
//! service allows unhealthy endpoints), on our network, with an address (of the client's family
//! when one has it), that serve the port; then which of those the client should prefer: those
//! on its own node when asked, and the service's routing preference (`STRICT`: only endpoints
//! sharing every listed scope with the client; `FAILOVER`: those sharing the most). [`choose`]
//! then leaves out endpoints outlier detection ejected (unless that leaves none: then all are
//! candidates again, as Envoy's panic threshold does) and picks one at random, in turn, or by
//! power of two choices on outstanding requests.

use std::net::{IpAddr, SocketAddr};

use rand::Rng;

use crate::state::{Endpoint, PickError, Service, Workload};

/// How to pick among the candidates.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Balance {
    RoundRobin,
    /// Power of two choices on outstanding requests (Istio's default for HTTP).
    #[default]
    LeastRequest,
    /// Uniformly at random.
    Random,
}

impl std::str::FromStr for Balance {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "round-robin" | "ROUND_ROBIN" => Ok(Self::RoundRobin),
            "least-request" | "LEAST_REQUEST" => Ok(Self::LeastRequest),
            "random" | "RANDOM" => Ok(Self::Random),
            other => Err(format!("unknown load balancing {other:?} (round-robin, least-request or random)")),
        }
    }
}

/// Which address of an endpoint to use.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Family {
    /// The first address.
    #[default]
    Any,
    /// An IPv4 address when the endpoint has one, else its first.
    PreferV4,
    /// An IPv6 address when the endpoint has one, else its first.
    PreferV6,
}

impl Family {
    /// The family of the address a client used.
    pub fn of(addr: IpAddr) -> Self {
        if addr.is_ipv4() { Self::PreferV4 } else { Self::PreferV6 }
    }

    fn pick(self, addresses: &[IpAddr]) -> Option<IpAddr> {
        let wanted = match self {
            Self::Any => None,
            Self::PreferV4 => addresses.iter().find(|a| a.is_ipv4()),
            Self::PreferV6 => addresses.iter().find(|a| a.is_ipv6()),
        };
        wanted.or(addresses.first()).copied()
    }
}

/// What the caller asks for.
#[derive(Clone, Copy, Debug)]
pub struct Ask<'a> {
    pub service: &'a Service,
    /// The service port; `None` takes any endpoint address and leaves the port to the caller
    /// (a waypoint's HBONE port).
    pub port: Option<u16>,
    /// Only endpoints on this network are reachable directly.
    pub network: &'a str,
    /// The client, for locality.
    pub near: Option<&'a Workload>,
    pub family: Family,
    /// Prefer endpoints on the client's node when there are any.
    pub same_node_first: bool,
}

/// An endpoint that may serve, with the address and port to use.
#[derive(Clone, Copy, Debug)]
pub struct Candidate<'a> {
    pub endpoint: &'a Endpoint,
    pub addr: SocketAddr,
}

/// The endpoints (of `ask.service`, given as `endpoints`) that may serve the ask, best scope
/// first applied. An error says why there is none.
pub fn candidates<'a>(endpoints: &'a [Endpoint], ask: &Ask<'_>) -> Result<Vec<Candidate<'a>>, PickError> {
    let service = ask.service;
    if let Some(port) = ask.port
        && !service.ports.is_empty()
        && service.port(port).is_none()
    {
        return Err(PickError::NoSuchPort { service: service.key().to_string(), port });
    }
    let lb = service.load_balancing.as_ref();
    let allow_unhealthy = lb.is_some_and(|lb| lb.allow_unhealthy);
    let mut out: Vec<Candidate<'a>> = endpoints
        .iter()
        .filter(|e| allow_unhealthy || e.workload.healthy)
        .filter(|e| e.workload.network == ask.network)
        .filter_map(|e| {
            let ip = ask.family.pick(&e.workload.addresses)?;
            let port = match ask.port {
                Some(p) => e.target_port(service, p)?,
                None => 0,
            };
            Some(Candidate { endpoint: e, addr: SocketAddr::new(ip, port) })
        })
        .collect();
    if let Some(near) = ask.near {
        if ask.same_node_first && out.iter().any(|c| c.endpoint.workload.node == near.node) {
            out.retain(|c| c.endpoint.workload.node == near.node);
        }
        if let Some(lb) = lb
            && !lb.routing_preference.is_empty()
        {
            let rank = |c: &Candidate<'_>| {
                lb.routing_preference
                    .iter()
                    .take_while(|scope| same_scope(scope, &c.endpoint.workload, near))
                    .count()
            };
            match lb.mode {
                "STRICT" => {
                    let all = lb.routing_preference.len();
                    out.retain(|c| rank(c) == all);
                }
                "FAILOVER" => {
                    let best = out.iter().map(rank).max().unwrap_or(0);
                    out.retain(|c| rank(c) == best);
                }
                _ => {}
            }
        }
    }
    if out.is_empty() {
        return Err(PickError::NoHealthyEndpoint {
            service: service.key().to_string(),
            port: ask.port.unwrap_or(0),
        });
    }
    Ok(out)
}

/// Whether `a` and `b` share a locality scope (Istio's names; an unknown scope does not
/// narrow).
pub fn same_scope(scope: &str, a: &Workload, b: &Workload) -> bool {
    match scope {
        "REGION" => a.locality.region == b.locality.region,
        "ZONE" => a.locality.region == b.locality.region && a.locality.zone == b.locality.zone,
        "SUBZONE" => a.locality == b.locality,
        "NODE" => a.node == b.node,
        "CLUSTER" => a.cluster_id == b.cluster_id,
        "NETWORK" => a.network == b.network,
        _ => true,
    }
}

/// Picks one of `candidates` by `balance`, leaving out the `ejected` ones unless all are.
/// `turn` is asked for the next round-robin turn, `load` for a candidate's outstanding
/// requests; each only when `balance` needs it.
pub fn choose<'c, 'a>(
    candidates: &'c [Candidate<'a>],
    balance: Balance,
    ejected: impl Fn(&Candidate<'a>) -> bool,
    turn: impl FnOnce() -> usize,
    load: impl Fn(&Candidate<'a>) -> usize,
) -> Option<&'c Candidate<'a>> {
    // The pool (the live candidates, or all of them if none is) is counted, then walked to the
    // one chosen: no list is built for a pick.
    let live = candidates.iter().filter(|c| !ejected(c)).count();
    let everyone = live == 0;
    let len = if everyone { candidates.len() } else { live };
    if len == 0 {
        return None;
    }
    let nth = |i: usize| {
        if everyone { candidates.get(i) } else { candidates.iter().filter(|c| !ejected(c)).nth(i) }
            // An ejection that began between the two walks: the first candidate.
            .or(candidates.first())
    };
    match balance {
        Balance::RoundRobin => nth(turn() % len),
        Balance::Random => nth(rand::rng().random_range(0..len)),
        Balance::LeastRequest => {
            let mut rng = rand::rng();
            let (a, b) = (nth(rng.random_range(0..len))?, nth(rng.random_range(0..len))?);
            Some(if load(b) < load(a) { b } else { a })
        }
    }
}
