//! Upstream: requests to an endpoint over HBONE to its node's ztunnel (`<pod ip>:15008`,
//! authority `<pod ip>:<target port>`), presenting the waypoint's identity and requiring the
//! endpoint's. HTTP/2 upstreams share one connection per endpoint; HTTP/1.1 upstreams keep a
//! few idle connections per endpoint. Endpoints are chosen round robin or by least requests
//! (power of two choices). The per-endpoint and per-service state (connections, requests in
//! flight, rotations, outlier records) is pruned as endpoints and services leave the mesh
//! ([`Upstream::spawn_pruner`]) and capped as a backstop.

use common::select;
/// An endpoint's requests in flight and its address as text.
type EndpointEntry = (Arc<AtomicUsize>, Arc<str>);

/// Maps on the request path, keyed by our own values (addresses, identities, service keys).
type HashMap<K, V> = std::collections::HashMap<K, V, foldhash::fast::RandomState>;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use common::hbone::connect::Authority;
use common::hbone::pool::{Pool, PoolError, PoolKey, PooledStream};
use common::identity::Identity;
use common::state::{Service, Snapshot, State};
use http::{HeaderMap, HeaderValue, Request, Response};
use hyper::body::Incoming;
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rand::Rng;
use tokio::task::JoinHandle;
use tracing::debug;

use crate::body::ProxyBody;

/// HTTP/1.1 connections kept idle per endpoint.
const MAX_IDLE_H1: usize = 16;
/// The HBONE port of every node's ztunnel (and of pods that speak HBONE themselves).
const HBONE_PORT: u16 = 15008;
/// Endpoints (address and identity, per protocol) whose connections are kept at once. Beyond
/// it closed ones are dropped first; a new endpoint that still finds no room is not pooled (its
/// connection serves its request, then closes).
pub const MAX_CLIENT_ENTRIES: usize = 16_384;
/// Endpoint addresses whose requests in flight are counted at once. Beyond it counters no
/// request holds are dropped first; an endpoint that still finds no room gets a counter of its
/// own that is not shared (least request then sees it idle).
pub const MAX_OUTSTANDING_ENTRIES: usize = 65_536;
/// Services whose round-robin position is kept at once. Beyond it a new service starts from a
/// random position each time.
pub const MAX_ROUND_ROBIN_ENTRIES: usize = 16_384;
/// The least time between two prunes by [`Upstream::spawn_pruner`], however often the mesh
/// changes.
const MIN_PRUNE_GAP: Duration = Duration::from_secs(1);

/// How to choose among endpoints (the selection itself is [`common::select`], shared with
/// ztunnel).
pub use common::select::Balance;

#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("HBONE to {addr}: {reason}")]
    Tunnel { addr: SocketAddr, reason: String },
    #[error("HTTP to {addr}: {source}")]
    Http { addr: SocketAddr, source: hyper::Error },
    #[error("HBONE to {addr}: not connected within {after:?}")]
    ConnectTimeout { addr: SocketAddr, after: std::time::Duration },
}

/// The endpoint a request goes to.
#[derive(Clone, Debug)]
pub struct Target {
    /// Pod IP and target port.
    pub addr: SocketAddr,
    /// `addr` as the access log shows it.
    pub addr_text: Arc<str>,
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

impl Client {
    /// Drops closed connections; `false` if none is left.
    fn retain_open(&mut self) -> bool {
        match self {
            Client::H2(s, _) => !s.is_closed(),
            Client::H1(idle) => {
                idle.retain(|(s, _)| !s.is_closed());
                !idle.is_empty()
            }
        }
    }
}

/// Room for `key` in `clients` under [`MAX_CLIENT_ENTRIES`], dropping closed connections if
/// needed.
fn client_room(clients: &mut HashMap<ClientKey, Client>, key: &ClientKey) -> bool {
    if clients.len() < MAX_CLIENT_ENTRIES || clients.contains_key(key) {
        return true;
    }
    clients.retain(|_, c| c.retain_open());
    clients.len() < MAX_CLIENT_ENTRIES
}

/// Sends requests to endpoints. Cheap to clone.
#[derive(Clone)]
pub struct Upstream {
    pool: Pool,
    identity: Identity,
    balance: Balance,
    clients: Arc<Mutex<HashMap<ClientKey, Client>>>,
    /// Per endpoint: requests in flight, and the address as text.
    outstanding: Arc<Mutex<HashMap<SocketAddr, EndpointEntry>>>,
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

    /// The requests in flight to `addr`, shared by every [`Target`] for it.
    fn outstanding(&self, addr: SocketAddr) -> Arc<AtomicUsize> {
        self.endpoint_entry(addr).0
    }

    /// The in-flight counter of `addr` and its text for the access log (formatted once, not
    /// per request).
    fn endpoint_entry(&self, addr: SocketAddr) -> EndpointEntry {
        let mut map = self.outstanding.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(entry) = map.get(&addr) {
            return entry.clone();
        }
        if map.len() >= MAX_OUTSTANDING_ENTRIES {
            // Counters no target holds are zero: dropping them loses nothing.
            map.retain(|_, (c, _)| Arc::strong_count(c) > 1);
        }
        let entry = (Arc::default(), Arc::from(addr.to_string()));
        if map.len() < MAX_OUTSTANDING_ENTRIES {
            map.insert(addr, entry.clone());
        }
        entry
    }

    /// The next round-robin turn of the service `key`.
    fn next_turn(&self, key: &str) -> usize {
        let mut rr = self.round_robin.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(n) = rr.get_mut(key) {
            *n = n.wrapping_add(1);
            return *n;
        }
        if rr.len() >= MAX_ROUND_ROBIN_ENTRIES {
            return rand::rng().random_range(0..usize::MAX);
        }
        let n = rr.entry(key.to_string()).or_default();
        *n = n.wrapping_add(1);
        *n
    }

    /// Forgets what belongs to endpoints and services that are not in `snapshot`: outlier
    /// records of endpoints no longer serving their service, rotations of services that are
    /// gone, pooled connections to endpoints that are gone (or whose identity changed) and
    /// closed ones, and request counters that no request holds (a [`Target`] keeps its counter
    /// working, and the counter stays the endpoint's, until its request ends).
    pub fn prune(&self, snapshot: &Snapshot) {
        self.outstanding
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .retain(|_, (c, _)| Arc::strong_count(c) > 1);
        self.round_robin.lock().unwrap_or_else(PoisonError::into_inner).retain(|key, _| {
            key.split_once('/')
                .is_some_and(|(namespace, hostname)| snapshot.service(namespace, hostname).is_some())
        });
        self.clients.lock().unwrap_or_else(PoisonError::into_inner).retain(|key, client| {
            let known = snapshot.workload_by_ip(key.addr.ip()).is_some_and(|w| w.identity == key.identity);
            known && client.retain_open()
        });
        self.ejections.prune(snapshot);
    }

    /// Prunes ([`Upstream::prune`]) against `state`'s current snapshot every `every`, and soon
    /// after the mesh changes (at most once a second). The task runs until aborted.
    pub fn spawn_pruner(&self, state: State, every: Duration) -> JoinHandle<()> {
        let upstream = self.clone();
        let mut changes = state.subscribe();
        let every = every.max(MIN_PRUNE_GAP);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = tick.tick() => {}
                    Ok(()) = changes.changed() => {}
                }
                upstream.prune(&state.snapshot());
                tokio::time::sleep(MIN_PRUNE_GAP).await;
            }
        })
    }

    /// Entries held per map (outstanding, round robin, clients, outlier records), for tests and
    /// the config dump.
    pub fn tracked(&self) -> (usize, usize, usize, usize) {
        (
            self.outstanding.lock().unwrap_or_else(PoisonError::into_inner).len(),
            self.round_robin.lock().unwrap_or_else(PoisonError::into_inner).len(),
            self.clients.lock().unwrap_or_else(PoisonError::into_inner).len(),
            self.ejections.len(),
        )
    }

    /// What [`common::select`] is asked for a backend of the waypoint.
    fn ask<'a>(snapshot: &'a Snapshot, service: &'a Service, port: u16) -> select::Ask<'a> {
        select::Ask {
            service,
            port: Some(port),
            network: snapshot.network(),
            near: None,
            family: select::Family::Any,
            same_node_first: false,
        }
    }

    /// The addresses of the endpoints of `service` that may serve `port` (outlier detection's
    /// whole).
    pub fn endpoint_addrs(snapshot: &Snapshot, service: &Service, port: u16) -> Vec<SocketAddr> {
        select::candidates(snapshot.endpoints(service), &Self::ask(snapshot, service, port))
            .map(|c| c.into_iter().map(|c| c.addr).collect())
            .unwrap_or_default()
    }

    /// Chooses an endpoint of `service` for `port` among those that may serve it and that
    /// outlier detection has not ejected (all of them if every one is ejected).
    pub fn choose(&self, snapshot: &Snapshot, service: &Service, port: u16) -> Option<Target> {
        self.choose_with(snapshot, service, port, None)
    }

    /// As [`Upstream::choose`], by `balance` when the service's traffic policy names one.
    pub fn choose_with(
        &self,
        snapshot: &Snapshot,
        service: &Service,
        port: u16,
        balance: Option<Balance>,
    ) -> Option<Target> {
        let candidates =
            select::candidates(snapshot.endpoints(service), &Self::ask(snapshot, service, port)).ok()?;
        let key = service.key();
        let c = select::choose(
            &candidates,
            balance.unwrap_or(self.balance),
            |c| self.ejections.is_ejected(key, c.addr),
            || self.next_turn(key),
            |c| self.outstanding(c.addr).load(Ordering::Relaxed),
        )?;
        let (outstanding, addr_text) = self.endpoint_entry(c.addr);
        Some(Target {
            addr: c.addr,
            addr_text,
            identity: c.endpoint.workload.identity.clone(),
            workload: c.endpoint.workload.clone(),
            outstanding,
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
            headers.insert(http::header::FORWARDED, v);
        }
        // The pool bounds the dial and the CONNECT (`--upstream-connect-timeout`).
        self.pool.connect(&key, &Authority::Addr(target.addr), headers).await.map_err(|e| match e {
            PoolError::ConnectTimeout { addr, after } => UpstreamError::ConnectTimeout { addr, after },
            e => UpstreamError::Tunnel { addr: target.addr, reason: e.to_string() },
        })
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
        // A new connection (the dial, TLS, CONNECT and the HTTP handshake) is boxed: inline, its
        // state was most of the size of every request's future, which is copied (into the
        // request's box, by hyper) on every request, new connection or not.
        if h2 {
            let mut sender = match self.h2_ready(&key, max) {
                Some(s) => s,
                None => Box::pin(self.open_h2(target, &key)).await?,
            };
            return sender.send_request(req).await.map_err(|e| {
                self.evict(&key);
                http_err(e)
            });
        }
        let (mut sender, used) = match self.h1_ready(&key) {
            Some(s) => s,
            None => (Box::pin(self.open_h1(target)).await?, 0),
        };
        let response = sender.send_request(req).await.map_err(http_err)?;
        // Back to the idle list (it takes a new request once this response's body is read),
        // unless it has carried its share.
        if used + 1 < max {
            self.return_h1(key, sender, used + 1);
        }
        Ok(response)
    }

    /// A new HTTP/2 connection to `target`, shared from then on under `key`.
    async fn open_h2(
        &self,
        target: &Target,
        key: &ClientKey,
    ) -> Result<http2::SendRequest<ProxyBody>, UpstreamError> {
        let stream = self.tunnel(target, None).await?;
        let (sender, conn) = http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .map_err(|source| UpstreamError::Http { addr: target.addr, source })?;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                debug!(error = %e, "upstream HTTP/2 connection ended");
            }
        });
        self.put(key.clone(), Client::H2(sender.clone(), 1));
        Ok(sender)
    }

    /// A new HTTP/1.1 connection to `target` (pooled once its first response is read).
    async fn open_h1(&self, target: &Target) -> Result<http1::SendRequest<ProxyBody>, UpstreamError> {
        let stream = self.tunnel(target, None).await?;
        let (sender, conn) = http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|source| UpstreamError::Http { addr: target.addr, source })?;
        tokio::spawn(async move {
            if let Err(e) = conn.with_upgrades().await {
                debug!(error = %e, "upstream HTTP/1.1 connection ended");
            }
        });
        Ok(sender)
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
        if !client_room(&mut clients, &key) {
            return;
        }
        if let Client::H1(idle) = clients.entry(key).or_insert_with(|| Client::H1(Vec::new()))
            && idle.len() < MAX_IDLE_H1
        {
            idle.push((sender, used));
        }
    }

    fn put(&self, key: ClientKey, client: Client) {
        let mut clients = self.clients.lock().unwrap_or_else(PoisonError::into_inner);
        if client_room(&mut clients, &key) {
            clients.insert(key, client);
        }
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
    use common::xds::handler::{Handlers, RawResource};

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
        let (u, state, _) = upstream_in(balance);
        (u, state.snapshot())
    }

    /// Applies the resources of `yaml` (adds them, or removes them by name).
    fn apply(handlers: &Handlers, yaml: &str, remove: bool) {
        let resources = LocalConfig::from_yaml(yaml).expect("yaml").to_resources().expect("resources");
        let (raw, removed) = if remove {
            (vec![], resources.into_iter().map(|r| r.name).collect())
        } else {
            let raw = resources
                .into_iter()
                .map(|r| RawResource { name: r.name, version: "1".into(), body: Some(r.body) })
                .collect();
            (raw, vec![])
        };
        assert_eq!(handlers.apply(proto::ADDRESS_TYPE_URL, raw, removed), Some(vec![]));
    }

    fn upstream_in(balance: Balance) -> (Upstream, State, Handlers) {
        let (state, handlers) = State::new("");
        apply(&handlers, MESH, false);
        let ca = Arc::new(LocalCa::generate("cluster.local").expect("ca"));
        let certs = CertificateManager::new(
            CaSource::Local(ca, std::time::Duration::from_secs(3600)),
            CertMetrics::default(),
        );
        let pool = Pool::new(certs, Default::default(), Default::default());
        let id = Identity::new("cluster.local", "demo", "waypoint").expect("id");
        (Upstream::new(pool, id, balance), state, handlers)
    }

    fn addr(s: &str) -> SocketAddr {
        s.parse().expect("addr")
    }

    /// An open HTTP/1.1 client over an in-memory pipe (and the pipe's other end, to keep).
    async fn open_h1() -> (http1::SendRequest<ProxyBody>, tokio::io::DuplexStream) {
        let (near, far) = tokio::io::duplex(1024);
        let (sender, conn) = http1::handshake(TokioIo::new(near)).await.expect("handshake");
        tokio::spawn(conn);
        (sender, far)
    }

    const WORKLOAD_C: &str = r#"
workloads:
  - {name: c, namespace: demo, addresses: [10.0.0.3], services: {demo/s: [{servicePort: 80, targetPort: 8080}]}}
"#;

    #[tokio::test]
    async fn prune_forgets_what_left_the_mesh_and_keeps_what_is_in_use() {
        let (u, state, handlers) = upstream_in(Balance::LeastRequest);
        let snapshot = state.snapshot();
        let svc = snapshot.service("demo", "s").expect("service").clone();
        let (a, c) = (addr("10.0.0.1:8080"), addr("10.0.0.3:8080"));
        let c_identity = snapshot.workload_by_ip(c.ip()).expect("c").identity.clone();
        let a_identity = snapshot.workload_by_ip(a.ip()).expect("a").identity.clone();
        // A request to c is in flight; a and b were counted but are idle.
        let in_flight = u.outstanding(c);
        in_flight.fetch_add(1, Ordering::Relaxed);
        drop((u.outstanding(a), u.outstanding(addr("10.0.0.2:8080"))));
        u.round_robin.lock().expect("rr").extend([("demo/s".to_string(), 1), ("demo/gone".to_string(), 1)]);
        let mut pipes = Vec::new();
        let stale = Identity::new("cluster.local", "demo", "replaced").expect("id");
        for (addr, identity) in [(a, &a_identity), (c, &c_identity), (a, &stale)] {
            let (sender, pipe) = open_h1().await;
            pipes.push(pipe);
            u.return_h1(ClientKey { addr, identity: identity.clone(), h2: false }, sender, 0);
        }
        let outlier = crate::filter::traffic::Outlier {
            consecutive_5xx: 5,
            consecutive_gateway: 0,
            base_ejection: Duration::from_secs(30),
            max_ejection_percent: 10,
        };
        let failed = crate::filter::traffic::Outcome::Status(500);
        for (service, endpoint) in [("demo/s", a), ("demo/s", c), ("demo/gone", a)] {
            u.ejections.report(service, endpoint, failed, &outlier, &[endpoint]);
        }
        assert_eq!(u.tracked(), (3, 2, 3, 3));

        apply(&handlers, WORKLOAD_C, true);
        let snapshot = state.snapshot();
        assert!(snapshot.workload_by_ip(c.ip()).is_none(), "c left the mesh");
        u.prune(&snapshot);

        {
            let outstanding = u.outstanding.lock().expect("outstanding");
            assert_eq!(outstanding.keys().collect::<Vec<_>>(), [&c], "only the counter in use is kept");
            assert!(Arc::ptr_eq(&outstanding[&c].0, &in_flight), "and it stays the one its request holds");
        }
        let rr: Vec<String> = u.round_robin.lock().expect("rr").keys().cloned().collect();
        assert_eq!(rr, ["demo/s"]);
        let clients: Vec<ClientKey> = u.clients.lock().expect("clients").keys().cloned().collect();
        assert_eq!(
            clients,
            [ClientKey { addr: a, identity: a_identity.clone(), h2: false }],
            "connections to c, and to a under another identity, are closed"
        );
        assert_eq!(u.ejections.len(), 1, "only a's record for its service is kept");
        assert!(u.choose(&snapshot, &svc, 80).is_some_and(|t| t.addr != c));

        // Connections that close go with the next prune.
        drop(pipes);
        tokio::time::sleep(Duration::from_millis(50)).await;
        u.prune(&snapshot);
        assert_eq!(u.tracked().2, 0, "closed connections are dropped");
    }

    #[tokio::test]
    async fn the_maps_are_capped_against_a_flood_of_keys() {
        let (u, _) = upstream(Balance::RoundRobin);
        let nth = |i: usize| SocketAddr::new(std::net::Ipv4Addr::from(0x0a00_0000 + i as u32).into(), 80);
        let held: Vec<_> = (0..10).map(|i| u.outstanding(nth(i))).collect();
        for i in 0..MAX_OUTSTANDING_ENTRIES + 100 {
            u.outstanding(nth(i));
        }
        let (outstanding, ..) = u.tracked();
        assert!(outstanding <= MAX_OUTSTANDING_ENTRIES, "{outstanding}");
        for (i, h) in held.iter().enumerate() {
            assert!(Arc::ptr_eq(h, &u.outstanding(nth(i))), "counters in use survive the cap");
        }
        for i in 0..MAX_ROUND_ROBIN_ENTRIES + 100 {
            u.next_turn(&format!("demo/s{i}"));
        }
        assert!(u.tracked().1 <= MAX_ROUND_ROBIN_ENTRIES);
        let identity = Identity::new("cluster.local", "demo", "a").expect("id");
        for i in 0..MAX_CLIENT_ENTRIES + 100 {
            u.put(ClientKey { addr: nth(i), identity: identity.clone(), h2: false }, Client::H1(Vec::new()));
        }
        assert!(u.tracked().2 <= MAX_CLIENT_ENTRIES);
    }

    #[tokio::test]
    async fn the_pruner_follows_the_mesh() {
        const EXTRA: &str = r#"
services:
  - {name: extra, namespace: demo, hostname: extra, addresses: [10.96.0.2], ports: [{servicePort: 80}]}
"#;
        let (u, state, handlers) = upstream_in(Balance::RoundRobin);
        apply(&handlers, EXTRA, false);
        let keys = |u: &Upstream| {
            let mut k: Vec<String> = u.round_robin.lock().expect("rr").keys().cloned().collect();
            k.sort();
            k
        };
        u.round_robin
            .lock()
            .expect("rr")
            .extend(["demo/s", "demo/extra", "demo/gone"].map(|k| (k.to_string(), 0)));
        let task = u.spawn_pruner(state.clone(), Duration::from_secs(3600));
        let settled = |want: &'static [&'static str]| {
            let u = u.clone();
            async move {
                for _ in 0..100 {
                    if keys(&u) == want {
                        return true;
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                false
            }
        };
        assert!(settled(&["demo/extra", "demo/s"]).await, "pruned at start: {:?}", keys(&u));
        apply(&handlers, EXTRA, true);
        assert!(settled(&["demo/s"]).await, "pruned after the change, long before the hour: {:?}", keys(&u));
        task.abort();
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
    async fn a_services_own_load_balancer_overrides_the_default() {
        // The waypoint's default is least request; the service's DestinationRule says
        // round robin, then random.
        let (u, snapshot) = upstream(Balance::LeastRequest);
        let svc = snapshot.service("demo", "s").expect("service").clone();
        let busy: SocketAddr = "10.0.0.1:8080".parse().expect("addr");
        u.outstanding(busy).store(100, Ordering::Relaxed);
        let rr: Vec<SocketAddr> = (0..6)
            .map(|_| u.choose_with(&snapshot, &svc, 80, Some(Balance::RoundRobin)).expect("endpoint").addr)
            .collect();
        assert_eq!(rr[0..3], rr[3..6], "a fixed rotation, the busy endpoint included: {rr:?}");
        assert!(rr.contains(&busy));
        let random = (0..300)
            .filter(|_| {
                u.choose_with(&snapshot, &svc, 80, Some(Balance::Random)).expect("endpoint").addr == busy
            })
            .count();
        assert!((50..=150).contains(&random), "random ignores load: {random} of 300 on the busy one");
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
