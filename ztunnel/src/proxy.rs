//! The L4 proxies: outbound (15001), inbound HBONE (15008) and inbound plaintext (15006).
//!
//! Each connection goes through explicit phases: accept -> resolve (who is talking to what,
//! from the state snapshot) -> authorize -> connect -> copy -> record. Every refusal is logged
//! in the access log with its reason and counted in `istio_tcp_connections_failed_total`.
//!
//! The listeners are bound at start but accept nothing before the first sync of Address and
//! Authorization: until then connections wait in the kernel's backlog, and are served once
//! policies are known (`istio_proxy_listeners_accepting` turns 1).

pub mod inbound;
pub mod inbound_plaintext;
pub mod metrics;
pub mod outbound;
mod server_tls;

use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use common::copy::{ByteCounters, CopyError, copy_bidirectional, copy_tcp_hbone};
use common::drain::{Guard, Watch};
use common::flags::ResponseFlag;
use common::hbone::HboneStream;
use common::hbone::pool::Pool;
use common::identity::CertificateManager;
use common::readiness::Ready;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tracing::{debug, info, warn};

use crate::socket::{self, SocketError};
use common::rbac;
use common::state::{Snapshot, State, Workload};
use metrics::{Failure, Metrics, Record};

/// How long a TCP connect or an HBONE CONNECT may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Ports of ztunnel itself: never a destination (loops).
pub const OWN_PORTS: [u16; 3] = [15001, 15006, 15008];

/// What happens to outbound traffic for destinations the registry does not know.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum OutboundPolicy {
    /// Pass it through as plain TCP from the pod's address (Istio's ALLOW_ANY).
    #[default]
    Passthrough,
    /// Refuse it (Istio's REGISTRY_ONLY).
    RegistryOnly,
}

impl std::str::FromStr for OutboundPolicy {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "passthrough" | "ALLOW_ANY" => Ok(Self::Passthrough),
            "registry-only" | "REGISTRY_ONLY" => Ok(Self::RegistryOnly),
            other => Err(format!("unknown outbound policy {other:?} (passthrough or registry-only)")),
        }
    }
}

/// Proxy settings (part of ztunnel's config).
#[derive(Clone, Debug, serde::Serialize)]
pub struct ProxyConfig {
    /// Our node: workloads whose `node` is this are ours to serve.
    pub node_name: String,
    /// Trust domain peers must share.
    pub trust_domain: String,
    pub outbound_addr: SocketAddr,
    pub inbound_addr: SocketAddr,
    pub inbound_plaintext_addr: SocketAddr,
    /// `SO_MARK` on ztunnel's own sockets, so the capture program lets them be.
    pub mark: u32,
    pub outbound_policy: OutboundPolicy,
    /// Host mode: the host's workload addresses (the source of its captured connections, and
    /// destinations dialled without keeping the client's address, which only works for
    /// addresses that are not this host's own).
    pub host_addresses: Vec<IpAddr>,
}

/// Why a connection could not be proxied. Knows its response flag and CONNECT status.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("source {0} is not a workload on this node")]
    UnknownSource(IpAddr),
    #[error("{0} is not in the registry and the outbound policy is registry-only")]
    RegistryOnly(SocketAddr),
    #[error(transparent)]
    NoEndpoint(#[from] common::state::PickError),
    #[error("waypoint of {0} cannot be resolved")]
    NoWaypoint(String),
    #[error("{0} is reached over Istio's legacy mTLS, which ztunnel does not speak")]
    UnsupportedTunnel(String),
    #[error("{0} is not a workload on this node")]
    NotLocal(IpAddr),
    #[error("port {0} is ztunnel's own")]
    SelfCall(u16),
    #[error("{0}")]
    Denied(String),
    #[error("authority {authority} is not the address the connection arrived for ({local})")]
    AddressMismatch { authority: SocketAddr, local: IpAddr },
    #[error("connect to {addr}: {reason}")]
    Connect { addr: SocketAddr, reason: String },
    #[error("HBONE to {addr}: {reason}")]
    Hbone { addr: SocketAddr, reason: String },
    #[error("draining")]
    Draining,
    #[error("connection from {0} over loopback with no original destination recorded by the host capture")]
    NoOriginalDst(SocketAddr),
    #[error("client connection failed: {0}")]
    Downstream(std::io::Error),
}

impl ProxyError {
    /// Envoy's response flag for this failure.
    pub fn flag(&self) -> ResponseFlag {
        match self {
            ProxyError::UnknownSource(_) | ProxyError::RegistryOnly(_) | ProxyError::NoOriginalDst(_) => {
                ResponseFlag::NoRoute
            }
            ProxyError::NoEndpoint(_) | ProxyError::NoWaypoint(_) | ProxyError::NotLocal(_) => {
                ResponseFlag::NoHealthyUpstream
            }
            ProxyError::Connect { .. } | ProxyError::Hbone { .. } | ProxyError::UnsupportedTunnel(_) => {
                ResponseFlag::UpstreamConnectionFailure
            }
            ProxyError::SelfCall(_) | ProxyError::Draining | ProxyError::AddressMismatch { .. } => {
                ResponseFlag::None
            }
            ProxyError::Denied(_) | ProxyError::Downstream(_) => ResponseFlag::None,
        }
    }

    /// [`Self::flag`] as Envoy writes it.
    pub fn flags(&self) -> &'static str {
        self.flag().as_str()
    }

    pub fn failure(&self) -> Failure {
        Failure { reason: self.to_string(), flags: self.flags() }
    }
}

struct Inner {
    config: ProxyConfig,
    state: State,
    pool: Pool,
    certs: CertificateManager,
    metrics: Metrics,
    drain: Watch,
    /// Done once the control-plane source has processed its first push of every type.
    synced: Ready,
    /// Host mode's capture, where captured connections' original destinations are read.
    host: Option<Arc<ebpf::HostCapture>>,
}

/// What every proxy task shares. Cheap to clone.
#[derive(Clone)]
pub struct Proxy {
    inner: Arc<Inner>,
}

/// What [`Proxy::start`] returns: the bound addresses, the listening sockets by role, and the
/// accept loops.
pub type Started = (Bound, Vec<ebpf::Listener>, Vec<JoinHandle<()>>);

/// The proxies' bound addresses.
#[derive(Clone, Copy, Debug)]
pub struct Bound {
    pub outbound: SocketAddr,
    pub inbound: SocketAddr,
    pub inbound_plaintext: SocketAddr,
}

impl Proxy {
    /// `synced` is the readiness of the control-plane source alone (its first sync of every
    /// type): the listeners accept nothing before it is ready.
    #[expect(clippy::too_many_arguments, reason = "the proxies' shared parts, each built by the app")]
    pub fn new(
        config: ProxyConfig,
        state: State,
        pool: Pool,
        certs: CertificateManager,
        metrics: Metrics,
        drain: Watch,
        synced: Ready,
        host: Option<Arc<ebpf::HostCapture>>,
    ) -> Self {
        Self { inner: Arc::new(Inner { config, state, pool, certs, metrics, drain, synced, host }) }
    }

    /// Host mode: a connection the host capture sent to the outbound listener over loopback
    /// is really from the host's workload address (same family as the destination, else the
    /// first) at the client's port, to the destination the capture recorded. Anything else on
    /// loopback (a process dialling 15001 itself) has no recorded destination and is refused.
    /// Without host mode, or not over loopback: as accepted.
    fn host_origin(&self, peer: SocketAddr, dst: SocketAddr) -> Result<(SocketAddr, SocketAddr), ProxyError> {
        let Some(host) = &self.inner.host else { return Ok((peer, dst)) };
        if !dst.ip().is_loopback() && !is_mapped_loopback(dst.ip()) {
            return Ok((peer, dst));
        }
        let orig = host.original_dst(peer).ok_or(ProxyError::NoOriginalDst(peer))?;
        let addrs = &self.inner.config.host_addresses;
        let source = addrs
            .iter()
            .find(|a| a.is_ipv4() == orig.is_ipv4())
            .or(addrs.first())
            .copied()
            .ok_or(ProxyError::NoOriginalDst(peer))?;
        Ok((SocketAddr::new(source, peer.port()), orig))
    }

    /// Binds the three transparent listeners and spawns their accept loops, which stop when
    /// the drain starts. Also returns the listening sockets by role, for the redirector's
    /// listener lookups ([`ebpf::Redirector::serve_listeners`]).
    pub fn start(&self) -> Result<Started, SocketError> {
        let c = &self.inner.config;
        socket::enable_listener_migration();
        let outbound = socket::transparent_listener(c.outbound_addr, Some(c.mark))?;
        let inbound = socket::transparent_listener(c.inbound_addr, Some(c.mark))?;
        let plaintext = socket::transparent_listener(c.inbound_plaintext_addr, Some(c.mark))?;
        let local = |l: &TcpListener, a: SocketAddr| l.local_addr().unwrap_or(a);
        let bound = Bound {
            outbound: local(&outbound, c.outbound_addr),
            inbound: local(&inbound, c.inbound_addr),
            inbound_plaintext: local(&plaintext, c.inbound_plaintext_addr),
        };
        // IPv6 twins of listeners bound to the unspecified IPv4 address, on the same ports.
        let twin = |a: SocketAddr, bound: SocketAddr| ipv6_twin(a, bound, c.mark);
        let outbound6 = twin(c.outbound_addr, bound.outbound);
        let inbound6 = twin(c.inbound_addr, bound.inbound);
        let plaintext6 = twin(c.inbound_plaintext_addr, bound.inbound_plaintext);
        let mut sockets = Vec::new();
        {
            use ebpf::ListenerRole::{Hbone, Inbound, Outbound};
            use std::os::fd::AsRawFd;
            let mut add = |role, ipv6, l: Option<&TcpListener>| {
                if let Some(l) = l {
                    sockets.push(ebpf::Listener { role, ipv6, fd: l.as_raw_fd() });
                }
            };
            add(Outbound, bound.outbound.is_ipv6(), Some(&outbound));
            add(Hbone, bound.inbound.is_ipv6(), Some(&inbound));
            add(Inbound, bound.inbound_plaintext.is_ipv6(), Some(&plaintext));
            add(Outbound, true, outbound6.as_ref());
            add(Hbone, true, inbound6.as_ref());
            add(Inbound, true, plaintext6.as_ref());
        }
        let mut tasks = vec![
            tokio::spawn(outbound::serve(self.clone(), outbound)),
            tokio::spawn(inbound::serve(self.clone(), inbound)),
            tokio::spawn(inbound_plaintext::serve(self.clone(), plaintext)),
        ];
        tasks.extend(outbound6.map(|l| tokio::spawn(outbound::serve(self.clone(), l))));
        tasks.extend(inbound6.map(|l| tokio::spawn(inbound::serve(self.clone(), l))));
        tasks.extend(plaintext6.map(|l| tokio::spawn(inbound_plaintext::serve(self.clone(), l))));
        Ok((bound, sockets, tasks))
    }

    fn config(&self) -> &ProxyConfig {
        &self.inner.config
    }

    fn metrics(&self) -> &Metrics {
        &self.inner.metrics
    }

    fn drain(&self) -> &Watch {
        &self.inner.drain
    }

    /// A workload this ztunnel serves: one of its node's, or in host mode the host itself
    /// (known by its addresses: a WorkloadEntry names no node).
    fn is_local(&self, w: &Workload) -> bool {
        let c = &self.inner.config;
        w.node == c.node_name
            || (!c.host_addresses.is_empty() && w.addresses.iter().any(|a| c.host_addresses.contains(a)))
    }

    /// Evaluates the destination workload's policies (refused while one it names is missing),
    /// counting and logging the decision. A refusal carries the reason for the access record.
    fn authorize(
        &self,
        snapshot: &Snapshot,
        direction: &'static str,
        dst: &Workload,
        conn: &rbac::Connection<'_>,
    ) -> Result<(), ProxyError> {
        let verdict = rbac::evaluate_workload(snapshot, dst, conn);
        self.metrics().decision(direction, &verdict);
        if verdict.is_allow() {
            return Ok(());
        }
        let reason = rbac::explain(snapshot, dst, &verdict);
        warn!(
            direction,
            dst = %dst.name,
            src = %conn.source.map_or_else(|| "-".to_string(), ToString::to_string),
            src_ip = %conn.source_ip,
            %reason,
            "connection denied by policy"
        );
        Err(ProxyError::Denied(reason))
    }

    /// Waits until the first sync of Address and Authorization is in, so that nothing is
    /// accepted before the policies are known. False when the drain starts first.
    async fn wait_synced(&self, listener: &'static str) -> bool {
        if !self.inner.synced.is_ready() {
            info!(listener, pending = ?self.inner.synced.pending(), "bound; accepting nothing before the first xDS sync");
            tokio::select! {
                _ = self.inner.synced.wait() => {}
                _ = self.drain().draining() => {
                    info!(listener, "draining before the first xDS sync: never accepted");
                    return false;
                }
            }
            info!(listener, "first xDS sync done: accepting");
        }
        self.metrics().accepting(listener);
        true
    }

    /// A plain TCP connection carrying ztunnel's mark, from `source` when given (the client's
    /// address, kept so the server sees who really called). Falls back to our own address if
    /// the kernel refuses the source.
    async fn connect_direct(&self, dst: SocketAddr, source: Option<IpAddr>) -> Result<TcpStream, ProxyError> {
        let fail = |reason: String| ProxyError::Connect { addr: dst, reason };
        let mark = self.inner.config.mark;
        // This host's own workload is dialled locally: a foreign source address would send its
        // replies out to the network instead of back to us.
        let source = source.filter(|_| !self.inner.config.host_addresses.contains(&dst.ip()));
        let socket = match socket::outbound_socket(dst, mark, source.map(|ip| SocketAddr::new(ip, 0))) {
            Ok(s) => s,
            Err(e) if source.is_some() => {
                debug!(error = %e, "cannot keep the client's source address; connecting from ours");
                socket::outbound_socket(dst, mark, None).map_err(|e| fail(e.to_string()))?
            }
            Err(e) => return Err(fail(e.to_string())),
        };
        match tokio::time::timeout(CONNECT_TIMEOUT, socket.connect(dst)).await {
            Ok(Ok(s)) => Ok(s),
            Ok(Err(e)) => Err(fail(e.to_string())),
            Err(_) => Err(fail("timed out".into())),
        }
    }
}

/// Copies until both sides close, or until the drain period ends; then records the close.
async fn relay<D, U>(proxy: &Proxy, downstream: D, upstream: U, mut records: Vec<Record>)
where
    D: AsyncRead + AsyncWrite + Unpin,
    U: AsyncRead + AsyncWrite + Unpin,
{
    let counters = ByteCounters::default();
    let copy = std::pin::pin!(copy_bidirectional(downstream, upstream, &counters));
    finish_relay(proxy, copy, &counters, &mut records).await
}

/// [`relay`] between a TCP connection and an HBONE stream, without the extra copy;
/// `already_sent` counts the downstream's bytes that went with the CONNECT.
async fn relay_tunnel(
    proxy: &Proxy,
    tcp: &TcpStream,
    tunnel: &mut HboneStream,
    tcp_is_downstream: bool,
    already_sent: u64,
    records: &mut Vec<Record>,
) {
    let counters = ByteCounters::default();
    counters.sent.fetch_add(already_sent, std::sync::atomic::Ordering::Relaxed);
    let copy = std::pin::pin!(copy_tcp_hbone(tcp, tunnel, tcp_is_downstream, &counters));
    finish_relay(proxy, copy, &counters, records).await
}

/// Runs the `copy` to its end or the drain's, then records. The copy (most of a connection's
/// task) comes pinned by its owner, and the records by reference: moved in, a value would
/// take its room in the connection's task once per level it passes through.
async fn finish_relay<F: Future<Output = Result<(), CopyError>>>(
    proxy: &Proxy,
    copy: std::pin::Pin<&mut F>,
    counters: &ByteCounters,
    records: &mut Vec<Record>,
) {
    let error = tokio::select! {
        r = copy => r.err().map(|e| e.to_string()),
        _ = proxy.drain().closing() => Some("closed at the end of the drain period".to_string()),
    };
    for r in records.drain(..) {
        r.closed(counters, error.clone());
    }
}

/// One accepted, redirected connection: the client's address and where it was going.
struct Accepted {
    stream: TcpStream,
    peer: SocketAddr,
    dst: SocketAddr,
    /// Keeps a drain waiting while the connection runs.
    guard: Guard,
}

/// Accepts on a transparent `listener` until the drain starts, handing each connection to
/// `handle` on its own task.
async fn accept_loop<F, Fut>(proxy: Proxy, listener: TcpListener, name: &'static str, handle: F)
where
    F: Fn(Proxy, Accepted) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    if let Ok(addr) = listener.local_addr() {
        info!(listener = name, %addr, "listening");
    }
    if !proxy.wait_synced(name).await {
        return;
    }
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = proxy.drain().draining() => {
                info!(listener = name, "draining: no longer accepting");
                return;
            }
        };
        match accepted {
            Ok((stream, peer)) => {
                // Accepted just as the drain began: served, not reset.
                let Some(guard) = proxy.drain().guard().or_else(|| proxy.drain().late_guard()) else {
                    warn!(listener = name, %peer, "accepted after the drain finished; closing");
                    return;
                };
                let dst = match socket::original_dst(&stream) {
                    Ok(d) => d.0,
                    Err(e) => {
                        warn!(listener = name, %peer, error = %e, "no original destination; closing");
                        continue;
                    }
                };
                // TCP_NODELAY comes from the listener (see `socket::transparent_listener`).
                tokio::spawn(handle(proxy.clone(), Accepted { stream, peer, dst, guard }));
            }
            Err(e) => {
                warn!(listener = name, error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

fn is_mapped_loopback(ip: IpAddr) -> bool {
    matches!(ip, IpAddr::V6(v6) if v6.to_ipv4_mapped().is_some_and(|v4| v4.is_loopback()))
}

/// For a listener configured on `0.0.0.0:port`, the same listener on `[::]:port` (IPv6 only),
/// so that IPv6 and dual-stack pods are served alike. A host without IPv6 gets a warning and
/// only the IPv4 listener; its pods have no IPv6 traffic to capture.
fn ipv6_twin(configured: SocketAddr, bound: SocketAddr, mark: u32) -> Option<TcpListener> {
    if configured.ip() != IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED) {
        return None;
    }
    let addr = SocketAddr::new(IpAddr::V6(std::net::Ipv6Addr::UNSPECIFIED), bound.port());
    match socket::transparent_listener(addr, Some(mark)) {
        Ok(l) => Some(l),
        Err(e) => {
            warn!(%addr, error = %e, "no IPv6 listener: IPv6 pods cannot be served on this host");
            None
        }
    }
}
