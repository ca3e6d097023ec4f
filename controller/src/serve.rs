//! Our delta ADS service for waypoints, over the mesh's mutual TLS.
//!
//! Every connection must present a certificate chaining to the mesh root with a SPIFFE
//! identity in our trust domain; a stream is served only to an identity that is one of our
//! waypoints, and only that waypoint's view (see [`crate::scope`]). An identity that stops being
//! a waypoint (its Gateway deleted) has its streams ended. Refusals are logged and counted in
//! `ambient_controller_xds_refusals_total{reason}`.
//!
//! Per stream and subscribed type, the versions the client holds are remembered (seeded from
//! `initial_resource_versions`) and exactly the difference is sent: changed resources and the
//! names removed. Every subscription is answered, even empty, so a client can finish its first
//! sync.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use common::identity::{CertificateManager, Identity};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use proto::discovery::aggregated_discovery_service_server::{
    AggregatedDiscoveryService, AggregatedDiscoveryServiceServer,
};
use proto::discovery::{DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, mpsc, watch};
use tokio_stream::Stream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::server::Connected;
use tonic::{Request, Response, Status, Streaming};
use tracing::{debug, info, warn};

use crate::scope::{Resources, Served};

/// How long a client may take to finish the TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Connections open at once (held for each connection's life); more wait in the kernel's
/// backlog.
const MAX_CONNECTIONS: usize = 4096;
/// Streams one connection may open at once.
const MAX_STREAMS_PER_CONNECTION: u32 = 8;
/// Types one stream may subscribe to (waypoints use three).
const MAX_TYPES_PER_STREAM: usize = 16;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabels {
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TypeLabels {
    type_url: &'static str,
}

impl TypeLabels {
    /// Known types by name, anything a client made up as `other` (labels stay bounded).
    fn of(type_url: &str) -> Self {
        let known =
            [proto::ADDRESS_TYPE_URL, proto::AUTHORIZATION_TYPE_URL, proto::WAYPOINT_RESOURCE_TYPE_URL];
        Self { type_url: known.into_iter().find(|k| *k == type_url).unwrap_or("other") }
    }
}

/// The server's metrics (`ambient_controller_xds_*`).
#[derive(Clone, Debug)]
pub struct ServeMetrics {
    refusals: Family<ReasonLabels, Counter>,
    streams: Gauge,
    pushes: Family<TypeLabels, Counter>,
    nacks: Family<TypeLabels, Counter>,
}

impl ServeMetrics {
    pub fn new(registry: &mut Registry) -> Self {
        let m = Self {
            refusals: Family::default(),
            streams: Gauge::default(),
            pushes: Family::default(),
            nacks: Family::default(),
        };
        let r = registry.sub_registry_with_prefix("ambient_controller_xds");
        r.register(
            "refusals",
            "Connections and streams refused (reason: handshake, no_certificate, peer_identity, unknown_identity, identity_removed, too_many_types, sotw)",
            m.refusals.clone(),
        );
        r.register("streams", "Open waypoint xDS streams", m.streams.clone());
        r.register("pushes", "Responses sent, by type URL", m.pushes.clone());
        r.register("nacks", "Responses a waypoint rejected, by type URL", m.nacks.clone());
        m
    }

    fn refuse(&self, reason: &'static str) {
        self.refusals.get_or_create(&ReasonLabels { reason }).inc();
    }
}

/// Who is on the other end of a connection, as its certificate proved.
#[derive(Clone, Debug)]
pub struct PeerInfo {
    pub identity: Identity,
    pub addr: SocketAddr,
}

/// A TLS connection with its verified peer (what tonic hands to the service).
pub struct MtlsStream {
    inner: tokio_rustls::server::TlsStream<TcpStream>,
    peer: PeerInfo,
    /// One of [`MAX_CONNECTIONS`], released when the connection closes.
    _permit: tokio::sync::OwnedSemaphorePermit,
}

impl Connected for MtlsStream {
    type ConnectInfo = PeerInfo;

    fn connect_info(&self) -> PeerInfo {
        self.peer.clone()
    }
}

impl AsyncRead for MtlsStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for MtlsStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Our TLS side: the certificate of our own identity, refreshed per connection.
#[derive(Clone, Debug)]
pub struct ServerTls {
    pub certs: CertificateManager,
    pub identity: Identity,
    pub trust_domain: String,
}

/// Serves delta ADS on `listener` until the task is dropped.
pub async fn serve(
    listener: TcpListener,
    tls: ServerTls,
    served: watch::Receiver<Arc<Served>>,
    metrics: ServeMetrics,
) {
    let (tx, rx) = mpsc::channel::<Result<MtlsStream, std::io::Error>>(64);
    let accept = accept_loop(listener, tls, tx, metrics.clone());
    let service = AggregatedDiscoveryServiceServer::new(Ads { served, metrics })
        .max_decoding_message_size(4 * 1024 * 1024);
    let server = tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .http2_keepalive_timeout(Some(Duration::from_secs(10)))
        // One ADS stream per waypoint connection; a few more for reconnect overlap.
        .max_concurrent_streams(Some(MAX_STREAMS_PER_CONNECTION))
        .add_service(service)
        .serve_with_incoming(ReceiverStream::new(rx));
    tokio::select! {
        _ = accept => {}
        res = server => if let Err(e) = res { warn!(error = %e, "xDS server ended") },
    }
}

async fn accept_loop(
    listener: TcpListener,
    tls: ServerTls,
    tx: mpsc::Sender<Result<MtlsStream, std::io::Error>>,
    metrics: ServeMetrics,
) {
    if let Ok(addr) = listener.local_addr() {
        info!(%addr, identity = %tls.identity, "xDS server listening (mTLS)");
    }
    let limit = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let Ok(permit) = limit.clone().acquire_owned().await else { return };
        let (tcp, addr) = match listener.accept().await {
            Ok(conn) => conn,
            Err(e) => {
                debug!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let (tls, tx, metrics) = (tls.clone(), tx.clone(), metrics.clone());
        tokio::spawn(async move {
            let Some(stream) = handshake(tcp, addr, &tls, &metrics, permit).await else { return };
            let _ = tx.send(Ok(stream)).await;
        });
    }
}

async fn handshake(
    tcp: TcpStream,
    addr: SocketAddr,
    tls: &ServerTls,
    metrics: &ServeMetrics,
    permit: tokio::sync::OwnedSemaphorePermit,
) -> Option<MtlsStream> {
    let Some(cert) = tls.certs.current(&tls.identity) else {
        warn!(%addr, "connection refused: our own certificate is not there yet");
        metrics.refuse("no_certificate");
        tls.certs.prefetch(&tls.identity);
        return None;
    };
    let config = match common::tls::server_config(&cert) {
        Ok(c) => c,
        Err(e) => {
            warn!(%addr, error = %e, "connection refused: TLS set-up failed");
            metrics.refuse("no_certificate");
            return None;
        }
    };
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let inner = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            warn!(%addr, error = %e, "connection refused: TLS handshake failed");
            metrics.refuse("handshake");
            return None;
        }
        Err(_) => {
            warn!(%addr, timeout = ?HANDSHAKE_TIMEOUT, "connection refused: TLS handshake timed out");
            metrics.refuse("handshake");
            return None;
        }
    };
    let identity = match common::tls::peer_identity(inner.get_ref().1.peer_certificates(), &tls.trust_domain)
    {
        Ok(id) => id,
        Err(e) => {
            warn!(%addr, error = %e, "connection refused: peer identity");
            metrics.refuse("peer_identity");
            return None;
        }
    };
    Some(MtlsStream { inner, peer: PeerInfo { identity, addr }, _permit: permit })
}

/// The gRPC service over the served views.
#[derive(Clone, Debug)]
struct Ads {
    served: watch::Receiver<Arc<Served>>,
    metrics: ServeMetrics,
}

type DeltaStream = Pin<Box<dyn Stream<Item = Result<DeltaDiscoveryResponse, Status>> + Send>>;
type SotwStream = Pin<Box<dyn Stream<Item = Result<DiscoveryResponse, Status>> + Send>>;

#[tonic::async_trait]
impl AggregatedDiscoveryService for Ads {
    type StreamAggregatedResourcesStream = SotwStream;
    type DeltaAggregatedResourcesStream = DeltaStream;

    async fn stream_aggregated_resources(
        &self,
        request: Request<Streaming<DiscoveryRequest>>,
    ) -> Result<Response<SotwStream>, Status> {
        let who = request.extensions().get::<PeerInfo>().map(|p| p.identity.to_string()).unwrap_or_default();
        warn!(identity = %who, "state-of-the-world xDS stream refused: only delta ADS is served");
        self.metrics.refuse("sotw");
        Err(Status::unimplemented("only delta ADS is served"))
    }

    async fn delta_aggregated_resources(
        &self,
        request: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<Response<DeltaStream>, Status> {
        let Some(peer) = request.extensions().get::<PeerInfo>().cloned() else {
            self.metrics.refuse("peer_identity");
            return Err(Status::unauthenticated("no verified peer identity"));
        };
        if !self.served.borrow().knows(&peer.identity) {
            warn!(identity = %peer.identity, addr = %peer.addr, "xDS stream refused: not one of our waypoints");
            self.metrics.refuse("unknown_identity");
            return Err(Status::permission_denied(format!(
                "{} is not the identity of a waypoint of this controller",
                peer.identity
            )));
        }
        info!(identity = %peer.identity, addr = %peer.addr, "waypoint xDS stream opened");
        let (tx, rx) = mpsc::channel(16);
        let (served, metrics) = (self.served.clone(), self.metrics.clone());
        let requests = request.into_inner();
        tokio::spawn(async move {
            metrics.streams.inc();
            let result = stream(served, &peer, requests, &tx, &metrics).await;
            metrics.streams.dec();
            match result {
                Ok(()) => info!(identity = %peer.identity, "waypoint xDS stream closed"),
                Err(status) => {
                    info!(identity = %peer.identity, status = %status.message(), "waypoint xDS stream ended");
                    let _ = tx.send(Err(status)).await;
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

type Outbound = mpsc::Sender<Result<DeltaDiscoveryResponse, Status>>;

async fn stream(
    mut served: watch::Receiver<Arc<Served>>,
    peer: &PeerInfo,
    mut requests: Streaming<DeltaDiscoveryRequest>,
    tx: &Outbound,
    metrics: &ServeMetrics,
) -> Result<(), Status> {
    // Per subscribed type: name -> version the client holds.
    let mut held: BTreeMap<String, HashMap<String, String>> = BTreeMap::new();
    let mut nonce: u64 = 0;
    loop {
        tokio::select! {
            req = requests.message() => {
                let Some(req) = req? else { return Ok(()) };
                if !req.response_nonce.is_empty() {
                    if let Some(e) = &req.error_detail {
                        warn!(identity = %peer.identity, type_url = %req.type_url, nonce = %req.response_nonce,
                            error = %e.message, "waypoint NACKed a response");
                        metrics.nacks.get_or_create(&TypeLabels::of(&req.type_url)).inc();
                    }
                    continue;
                }
                if !held.contains_key(&req.type_url) && held.len() >= MAX_TYPES_PER_STREAM {
                    metrics.refuse("too_many_types");
                    return Err(Status::resource_exhausted("too many subscribed types"));
                }
                let client = held.entry(req.type_url.clone()).or_default();
                client.extend(req.initial_resource_versions);
                let view = current_view(&served, peer, &req.type_url, metrics)?;
                send_diff(&req.type_url, &view, client, &mut nonce, tx, true, metrics).await?;
            }
            changed = served.changed() => {
                if changed.is_err() { return Ok(()) }
                for (type_url, client) in held.iter_mut() {
                    let view = current_view(&served, peer, type_url, metrics)?;
                    send_diff(type_url, &view, client, &mut nonce, tx, false, metrics).await?;
                }
            }
        }
    }
}

fn current_view(
    served: &watch::Receiver<Arc<Served>>,
    peer: &PeerInfo,
    type_url: &str,
    metrics: &ServeMetrics,
) -> Result<Resources, Status> {
    match served.borrow().view(&peer.identity, type_url) {
        Some(view) => Ok(view),
        None => {
            warn!(identity = %peer.identity, "xDS stream ended: the identity is no longer one of our waypoints");
            metrics.refuse("identity_removed");
            Err(Status::permission_denied(format!("{} is no longer one of our waypoints", peer.identity)))
        }
    }
}

async fn send_diff(
    type_url: &str,
    view: &Resources,
    held: &mut HashMap<String, String>,
    nonce: &mut u64,
    tx: &Outbound,
    always: bool,
    metrics: &ServeMetrics,
) -> Result<(), Status> {
    let (resources, removed_resources) = common::xds::delta::delta(view, held);
    if resources.is_empty() && removed_resources.is_empty() && !always {
        return Ok(());
    }
    *nonce += 1;
    metrics.pushes.get_or_create(&TypeLabels::of(type_url)).inc();
    let response = DeltaDiscoveryResponse {
        type_url: type_url.to_string(),
        nonce: nonce.to_string(),
        resources,
        removed_resources,
        ..Default::default()
    };
    tx.send(Ok(response)).await.map_err(|_| Status::cancelled("client went away"))
}
