//! Upstream: requests to an endpoint over HBONE to its node's ztunnel (`<pod ip>:15008`,
//! authority `<pod ip>:<target port>`), presenting the waypoint's identity and requiring the
//! endpoint's. HTTP/2 upstreams share one connection per endpoint; HTTP/1.1 upstreams keep a
//! few idle connections per endpoint. Endpoints are chosen round robin or by least requests
//! (power of two choices).

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use common::hbone::connect::Authority;
use common::hbone::pool::{Pool, PoolKey, PooledStream};
use common::identity::Identity;
use common::state::{Endpoint, Service, Snapshot};
use http::{HeaderMap, HeaderValue, Request, Response};
use hyper::body::Incoming;
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rand::Rng;
use tracing::debug;

use crate::body::ProxyBody;

/// HTTP/1.1 connections kept idle per endpoint.
const MAX_IDLE_H1: usize = 16;
/// The HBONE port of every node's ztunnel (and of pods that speak HBONE themselves).
const HBONE_PORT: u16 = 15008;

/// How to choose among endpoints.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Balance {
    RoundRobin,
    /// Power of two choices on outstanding requests (Istio's default).
    #[default]
    LeastRequest,
}

impl std::str::FromStr for Balance {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "round-robin" | "ROUND_ROBIN" => Ok(Self::RoundRobin),
            "least-request" | "LEAST_REQUEST" => Ok(Self::LeastRequest),
            other => Err(format!("unknown load balancing {other:?} (round-robin or least-request)")),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("HBONE to {addr}: {reason}")]
    Tunnel { addr: SocketAddr, reason: String },
    #[error("HTTP to {addr}: {source}")]
    Http { addr: SocketAddr, source: hyper::Error },
}

/// The endpoint a request goes to.
#[derive(Clone, Debug)]
pub struct Target {
    /// Pod IP and target port.
    pub addr: SocketAddr,
    pub identity: Identity,
    pub workload: Arc<common::state::Workload>,
    /// Dropped when the request ends (least-request accounting).
    pub outstanding: Arc<AtomicUsize>,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct ClientKey {
    addr: SocketAddr,
    identity: Identity,
    h2: bool,
}

/// Connections held per endpoint, with the requests each has carried.
enum Client {
    H2(http2::SendRequest<ProxyBody>, u32),
    H1(Vec<(http1::SendRequest<ProxyBody>, u32)>),
}

/// Sends requests to endpoints. Cheap to clone.
#[derive(Clone)]
pub struct Upstream {
    pool: Pool,
    identity: Identity,
    balance: Balance,
    clients: Arc<Mutex<HashMap<ClientKey, Client>>>,
    outstanding: Arc<Mutex<HashMap<SocketAddr, Arc<AtomicUsize>>>>,
    round_robin: Arc<Mutex<HashMap<String, usize>>>,
    /// Outlier detection state, kept across config updates.
    pub ejections: Arc<crate::filter::traffic::Ejections>,
}

impl Upstream {
    pub fn new(pool: Pool, identity: Identity, balance: Balance) -> Self {
        Self {
            pool,
            identity,
            balance,
            clients: Arc::default(),
            outstanding: Arc::default(),
            round_robin: Arc::default(),
            ejections: Arc::default(),
        }
    }

    fn outstanding(&self, addr: SocketAddr) -> Arc<AtomicUsize> {
        self.outstanding.lock().unwrap_or_else(PoisonError::into_inner).entry(addr).or_default().clone()
    }

    /// The healthy endpoints of `service` for `port`, with their addresses.
    fn endpoints<'a>(
        snapshot: &'a Snapshot,
        service: &Service,
        port: u16,
    ) -> Vec<(&'a Endpoint, SocketAddr)> {
        snapshot
            .endpoints(service)
            .iter()
            .filter(|e| e.workload.healthy)
            .filter_map(|e| {
                let ip: IpAddr = *e.workload.addresses.first()?;
                Some((e, SocketAddr::new(ip, e.target_port(service, port)?)))
            })
            .collect()
    }

    /// The addresses of `service`'s healthy endpoints for `port` (outlier detection's whole).
    pub fn endpoint_addrs(snapshot: &Snapshot, service: &Service, port: u16) -> Vec<SocketAddr> {
        Self::endpoints(snapshot, service, port).into_iter().map(|(_, a)| a).collect()
    }

    /// Chooses an endpoint of `service` for `port` among the healthy ones that outlier detection
    /// has not ejected (all of them if every one is ejected).
    pub fn choose(&self, snapshot: &Snapshot, service: &Service, port: u16) -> Option<Target> {
        let all = Self::endpoints(snapshot, service, port);
        let key = service.key();
        let live: Vec<_> =
            all.iter().filter(|(_, a)| !self.ejections.is_ejected(&key, *a)).copied().collect();
        let candidates = if live.is_empty() { all } else { live };
        if candidates.is_empty() {
            return None;
        }
        let index = match self.balance {
            Balance::RoundRobin => {
                let mut rr = self.round_robin.lock().unwrap_or_else(PoisonError::into_inner);
                let n = rr.entry(service.key()).or_default();
                *n = n.wrapping_add(1);
                *n % candidates.len()
            }
            Balance::LeastRequest => {
                let mut rng = rand::rng();
                let a = rng.random_range(0..candidates.len());
                let b = rng.random_range(0..candidates.len());
                let load = |i: usize| self.outstanding(candidates[i].1).load(Ordering::Relaxed);
                if load(b) < load(a) { b } else { a }
            }
        };
        let (e, addr) = candidates[index];
        Some(Target {
            addr,
            identity: e.workload.identity.clone(),
            workload: e.workload.clone(),
            outstanding: self.outstanding(addr),
        })
    }

    /// Opens a CONNECT stream to `target` as the waypoint.
    pub async fn tunnel(
        &self,
        target: &Target,
        forwarded: Option<SocketAddr>,
    ) -> Result<PooledStream, UpstreamError> {
        let hbone = SocketAddr::new(target.addr.ip(), HBONE_PORT);
        let key = PoolKey::new(self.identity.clone(), vec![target.identity.clone()], None, hbone);
        let mut headers = HeaderMap::new();
        if let Some(f) = forwarded
            && let Ok(v) = HeaderValue::from_str(&format!("for=\"{f}\""))
        {
            headers.insert("forwarded", v);
        }
        self.pool
            .connect(&key, &Authority::Addr(target.addr), headers)
            .await
            .map_err(|e| UpstreamError::Tunnel { addr: target.addr, reason: e.to_string() })
    }

    /// Sends `req` to `target` over HTTP/2 or HTTP/1.1, reusing a connection when one is free.
    pub async fn send(
        &self,
        target: &Target,
        h2: bool,
        req: Request<ProxyBody>,
    ) -> Result<Response<Incoming>, UpstreamError> {
        self.send_limited(target, h2, req, None).await
    }

    /// Like [`Upstream::send`], opening a new connection once one has carried `max_per_conn`
    /// requests.
    pub async fn send_limited(
        &self,
        target: &Target,
        h2: bool,
        req: Request<ProxyBody>,
        max_per_conn: Option<u32>,
    ) -> Result<Response<Incoming>, UpstreamError> {
        let max = max_per_conn.unwrap_or(u32::MAX);
        let key = ClientKey { addr: target.addr, identity: target.identity.clone(), h2 };
        let http_err = |source| UpstreamError::Http { addr: target.addr, source };
        if h2 {
            let sender = match self.h2_ready(&key, max) {
                Some(s) => s,
                None => {
                    let stream = self.tunnel(target, None).await?;
                    let (sender, conn) = http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
                        .await
                        .map_err(http_err)?;
                    tokio::spawn(async move {
                        if let Err(e) = conn.await {
                            debug!(error = %e, "upstream HTTP/2 connection ended");
                        }
                    });
                    self.put(key.clone(), Client::H2(sender.clone(), 1));
                    sender
                }
            };
            let mut sender = sender;
            return sender.send_request(req).await.map_err(|e| {
                self.evict(&key);
                http_err(e)
            });
        }
        let (mut sender, used) = match self.h1_ready(&key) {
            Some(s) => s,
            None => {
                let stream = self.tunnel(target, None).await?;
                let (sender, conn) = http1::handshake(TokioIo::new(stream)).await.map_err(http_err)?;
                tokio::spawn(async move {
                    if let Err(e) = conn.with_upgrades().await {
                        debug!(error = %e, "upstream HTTP/1.1 connection ended");
                    }
                });
                (sender, 0)
            }
        };
        let response = sender.send_request(req).await.map_err(http_err)?;
        // Back to the idle list (it takes a new request once this response's body is read),
        // unless it has carried its share.
        if used + 1 < max {
            self.return_h1(key, sender, used + 1);
        }
        Ok(response)
    }

    /// The shared HTTP/2 connection, if open and under `max` requests (counting this one).
    fn h2_ready(&self, key: &ClientKey, max: u32) -> Option<http2::SendRequest<ProxyBody>> {
        let mut clients = self.clients.lock().unwrap_or_else(PoisonError::into_inner);
        match clients.get_mut(key) {
            Some(Client::H2(s, used)) if !s.is_closed() && *used < max => {
                *used += 1;
                Some(s.clone())
            }
            _ => None,
        }
    }

    fn h1_ready(&self, key: &ClientKey) -> Option<(http1::SendRequest<ProxyBody>, u32)> {
        let mut clients = self.clients.lock().unwrap_or_else(PoisonError::into_inner);
        let Some(Client::H1(idle)) = clients.get_mut(key) else { return None };
        idle.retain(|(s, _)| !s.is_closed());
        let i = idle.iter().position(|(s, _)| s.is_ready())?;
        Some(idle.swap_remove(i))
    }

    fn return_h1(&self, key: ClientKey, sender: http1::SendRequest<ProxyBody>, used: u32) {
        let mut clients = self.clients.lock().unwrap_or_else(PoisonError::into_inner);
        if let Client::H1(idle) = clients.entry(key).or_insert_with(|| Client::H1(Vec::new()))
            && idle.len() < MAX_IDLE_H1
        {
            idle.push((sender, used));
        }
    }

    fn put(&self, key: ClientKey, client: Client) {
        self.clients.lock().unwrap_or_else(PoisonError::into_inner).insert(key, client);
    }

    fn evict(&self, key: &ClientKey) {
        self.clients.lock().unwrap_or_else(PoisonError::into_inner).remove(key);
    }

    /// Connections held (for the config dump).
    pub fn connection_count(&self) -> usize {
        self.clients
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .values()
            .map(|c| match c {
                Client::H2(..) => 1,
                Client::H1(v) => v.len(),
            })
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use common::identity::{CaSource, CertMetrics, CertificateManager, LocalCa};
    use common::xds::LocalConfig;
    use common::xds::handler::RawResource;

    const MESH: &str = r#"
workloads:
  - {name: a, namespace: demo, addresses: [10.0.0.1], services: {demo/s: [{servicePort: 80, targetPort: 8080}]}}
  - {name: b, namespace: demo, addresses: [10.0.0.2], services: {demo/s: [{servicePort: 80, targetPort: 8080}]}}
  - {name: c, namespace: demo, addresses: [10.0.0.3], services: {demo/s: [{servicePort: 80, targetPort: 8080}]}}
  - {name: sick, namespace: demo, addresses: [10.0.0.4], status: UNHEALTHY, services: {demo/s: [{servicePort: 80}]}}
services:
  - {name: s, namespace: demo, hostname: s, addresses: [10.96.0.1], ports: [{servicePort: 80}]}
"#;

    fn upstream(balance: Balance) -> (Upstream, Arc<Snapshot>) {
        let (state, handlers) = common::state::State::new("");
        let resources = LocalConfig::from_yaml(MESH).expect("yaml").to_resources().expect("resources");
        let raw = resources
            .into_iter()
            .map(|r| RawResource { name: r.name, version: "1".into(), body: Some(r.body) })
            .collect();
        assert_eq!(handlers.apply(proto::ADDRESS_TYPE_URL, raw, vec![]), Some(vec![]));
        let ca = Arc::new(LocalCa::generate("cluster.local").expect("ca"));
        let certs = CertificateManager::new(
            CaSource::Local(ca, std::time::Duration::from_secs(3600)),
            CertMetrics::default(),
        );
        let pool = Pool::new(certs, Default::default(), Default::default());
        let id = Identity::new("cluster.local", "demo", "waypoint").expect("id");
        (Upstream::new(pool, id, balance), state.snapshot())
    }

    #[tokio::test]
    async fn round_robin_takes_turns_over_healthy_endpoints() {
        let (u, snapshot) = upstream(Balance::RoundRobin);
        let svc = snapshot.service("demo", "s").expect("service").clone();
        let picks: Vec<SocketAddr> =
            (0..6).map(|_| u.choose(&snapshot, &svc, 80).expect("endpoint").addr).collect();
        assert_eq!(picks[0..3], picks[3..6], "a fixed rotation");
        let distinct: std::collections::BTreeSet<_> = picks.iter().collect();
        assert_eq!(distinct.len(), 3, "the unhealthy endpoint is skipped: {picks:?}");
        assert!(picks.iter().all(|a| a.port() == 8080), "target port mapped");
    }

    #[tokio::test]
    async fn least_request_avoids_the_busy_endpoint() {
        let (u, snapshot) = upstream(Balance::LeastRequest);
        let svc = snapshot.service("demo", "s").expect("service").clone();
        let busy: SocketAddr = "10.0.0.1:8080".parse().expect("addr");
        u.outstanding(busy).store(100, Ordering::Relaxed);
        let picks =
            (0..300).filter(|_| u.choose(&snapshot, &svc, 80).expect("endpoint").addr == busy).count();
        // Chosen only when both random choices land on it: ~1/9 of the time.
        assert!(picks < 70, "busy endpoint picked {picks} times of 300");
    }
}
