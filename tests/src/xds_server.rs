//! The in-repo xDS server: serves delta ADS from an in-memory store that tests (or the demo's
//! YAML file) mutate.
//!
//! Per stream it remembers, per subscribed type, the versions the client holds (seeded from
//! `initial_resource_versions`) and sends exactly the difference with the store: changed
//! resources, and removals for names the client holds that the store no longer has. That makes
//! a reconnect after a server restart converge. Tests can also record ACK/NACKs, inject
//! undecodable resources and drop every stream.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use common::translate::Translator;
use common::xds::delta::{Versioned, delta};
use common::xds::local::{EncodedResource, LocalConfig};
use proto::discovery::aggregated_discovery_service_server::{
    AggregatedDiscoveryService, AggregatedDiscoveryServiceServer,
};
use proto::discovery::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse, Resource,
};
use tokio::sync::{mpsc, watch};
use tokio_stream::Stream;
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tonic::{Request, Response, Status, Streaming};
use tracing::{debug, info, warn};

/// What a client said about one of our responses.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClientReply {
    pub type_url: String,
    pub nonce: String,
    /// `Some(message)` for a NACK.
    pub error: Option<String>,
}

/// The resources served, by type URL then name. Every mutation wakes all streams.
#[derive(Debug)]
pub struct XdsStore {
    resources: Mutex<BTreeMap<String, BTreeMap<String, Versioned>>>,
    changed: watch::Sender<u64>,
    replies: Mutex<Vec<ClientReply>>,
    nodes: Mutex<Vec<proto::discovery::Node>>,
    replies_changed: watch::Sender<u64>,
    drop_streams: watch::Sender<u64>,
}

impl Default for XdsStore {
    fn default() -> Self {
        Self {
            resources: Mutex::default(),
            changed: watch::channel(0).0,
            replies: Mutex::default(),
            nodes: Mutex::default(),
            replies_changed: watch::channel(0).0,
            drop_streams: watch::channel(0).0,
        }
    }
}

impl XdsStore {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, BTreeMap<String, Versioned>>> {
        self.resources.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn bump(&self) {
        self.changed.send_modify(|n| *n += 1);
    }

    /// Adds or replaces a resource with a raw body (which may be garbage, to force a NACK).
    pub fn insert_raw(&self, type_url: &str, name: &str, body: prost_types::Any) {
        self.lock().entry(type_url.to_string()).or_default().insert(name.to_string(), Versioned::new(body));
        self.bump();
    }

    /// Adds or replaces a typed resource.
    pub fn insert<M: prost::Message>(&self, type_url: &str, name: &str, msg: &M) {
        let body = prost_types::Any { type_url: type_url.to_string(), value: msg.encode_to_vec() };
        self.insert_raw(type_url, name, body);
    }

    /// Adds many resources with a single wake-up.
    pub fn insert_many(&self, resources: impl IntoIterator<Item = EncodedResource>) {
        put_all(&mut self.lock(), resources);
        self.bump();
    }

    pub fn remove(&self, type_url: &str, name: &str) -> bool {
        let removed = self.lock().get_mut(type_url).is_some_and(|m| m.remove(name).is_some());
        self.bump();
        removed
    }

    /// Replaces everything with `resources` (used on a YAML reload).
    pub fn replace_all(&self, resources: impl IntoIterator<Item = EncodedResource>) {
        {
            let mut all = self.lock();
            all.clear();
            put_all(&mut all, resources);
        }
        self.bump();
    }

    /// Loads a YAML local-config document, replacing the store's content: Kubernetes-style
    /// objects (translated, see [`common::translate`]; the refused ones are returned as log
    /// lines, their last accepted version kept by `translator`), or our internal schema.
    pub fn load_yaml_with(
        &self,
        translator: &mut Translator,
        text: &str,
        source: &str,
    ) -> anyhow::Result<(usize, Vec<String>)> {
        let texts = [(source.to_string(), text.to_string())];
        if common::xds::local::is_objects(&texts) {
            let t = translator.translate_yaml([(source, text)]);
            let refusals: Vec<String> = t.refusals().collect();
            let n = t.resources.len();
            self.replace_all(t.resources);
            return Ok((n, refusals));
        }
        let resources = LocalConfig::from_yaml(text)?.to_resources()?;
        let n = resources.len();
        self.replace_all(resources);
        Ok((n, vec![]))
    }

    /// As [`XdsStore::load_yaml_with`], with a fresh translator; a refused object is an error.
    pub fn load_yaml(&self, text: &str) -> anyhow::Result<usize> {
        let (n, refusals) = self.load_yaml_with(&mut Translator::default(), text, "config")?;
        match refusals.is_empty() {
            true => Ok(n),
            false => anyhow::bail!("refused: {}", refusals.join("; ")),
        }
    }

    /// Name -> version of the resources of one type, as clients are sent them.
    pub fn versions(&self, type_url: &str) -> BTreeMap<String, String> {
        self.lock()
            .get(type_url)
            .map(|m| m.iter().map(|(name, s)| (name.clone(), s.version.clone())).collect())
            .unwrap_or_default()
    }

    pub fn len(&self, type_url: &str) -> usize {
        self.lock().get(type_url).map_or(0, BTreeMap::len)
    }

    pub fn is_empty(&self) -> bool {
        self.lock().values().all(BTreeMap::is_empty)
    }

    /// Ends every open stream with UNAVAILABLE (clients are expected to reconnect).
    pub fn drop_streams(&self) {
        self.drop_streams.send_modify(|n| *n += 1);
    }

    /// The `Node` of every stream opened so far.
    pub fn nodes(&self) -> Vec<proto::discovery::Node> {
        self.nodes.lock().unwrap_or_else(PoisonError::into_inner).clone()
    }

    /// Every ACK/NACK received so far.
    pub fn replies(&self) -> Vec<ClientReply> {
        self.replies.lock().unwrap_or_else(PoisonError::into_inner).clone()
    }

    /// Waits up to `timeout` for a reply matching `pred`, returning it.
    pub async fn wait_reply(
        &self,
        timeout: Duration,
        pred: impl Fn(&ClientReply) -> bool,
    ) -> Option<ClientReply> {
        let replies = self.wait_replies(timeout, |all| all.iter().any(&pred)).await?;
        replies.into_iter().find(|r| pred(r))
    }

    /// Waits up to `timeout` until the replies received so far satisfy `pred`; returns them.
    pub async fn wait_replies(
        &self,
        timeout: Duration,
        pred: impl Fn(&[ClientReply]) -> bool,
    ) -> Option<Vec<ClientReply>> {
        let mut rx = self.replies_changed.subscribe();
        let wait = async {
            loop {
                let replies = self.replies();
                if pred(&replies) {
                    return replies;
                }
                if rx.changed().await.is_err() {
                    std::future::pending::<()>().await;
                }
            }
        };
        tokio::time::timeout(timeout, wait).await.ok()
    }

    fn record(&self, reply: ClientReply) {
        self.replies.lock().unwrap_or_else(PoisonError::into_inner).push(reply);
        self.replies_changed.send_modify(|n| *n += 1);
    }

    /// The delta between what a client holds and the store, for one type; updates `held`.
    fn diff(&self, type_url: &str, held: &mut HashMap<String, String>) -> (Vec<Resource>, Vec<String>) {
        let all = self.lock();
        let empty = BTreeMap::new();
        delta(all.get(type_url).unwrap_or(&empty), held)
    }
}

fn put_all(
    all: &mut BTreeMap<String, BTreeMap<String, Versioned>>,
    resources: impl IntoIterator<Item = EncodedResource>,
) {
    for r in resources {
        all.entry(r.type_url.to_string()).or_default().insert(r.name, Versioned::new(r.body));
    }
}

/// The gRPC service over an [`XdsStore`].
#[derive(Clone, Debug)]
pub struct AdsService {
    store: Arc<XdsStore>,
}

type DeltaStream = Pin<Box<dyn Stream<Item = Result<DeltaDiscoveryResponse, Status>> + Send>>;
type SotwStream = Pin<Box<dyn Stream<Item = Result<DiscoveryResponse, Status>> + Send>>;

#[tonic::async_trait]
impl AggregatedDiscoveryService for AdsService {
    type StreamAggregatedResourcesStream = SotwStream;
    type DeltaAggregatedResourcesStream = DeltaStream;

    async fn stream_aggregated_resources(
        &self,
        _request: Request<Streaming<DiscoveryRequest>>,
    ) -> Result<Response<SotwStream>, Status> {
        Err(Status::unimplemented("only delta ADS is served"))
    }

    async fn delta_aggregated_resources(
        &self,
        request: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<Response<DeltaStream>, Status> {
        let (tx, rx) = mpsc::channel(16);
        let store = self.store.clone();
        let requests = request.into_inner();
        tokio::spawn(async move {
            let result = serve_stream(store, requests, &tx).await;
            if let Err(status) = result {
                let _ = tx.send(Err(status)).await;
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

type Outbound = mpsc::Sender<Result<DeltaDiscoveryResponse, Status>>;

async fn serve_stream(
    store: Arc<XdsStore>,
    mut requests: Streaming<DeltaDiscoveryRequest>,
    tx: &Outbound,
) -> Result<(), Status> {
    let mut changed = store.changed.subscribe();
    let mut dropped = store.drop_streams.subscribe();
    let mut held: BTreeMap<String, HashMap<String, String>> = BTreeMap::new();
    let mut nonce: u64 = 0;
    loop {
        tokio::select! {
            req = requests.message() => {
                let Some(req) = req? else { return Ok(()) };
                if let Some(node) = &req.node {
                    info!(node = %node.id, "xDS client connected");
                    store.nodes.lock().unwrap_or_else(PoisonError::into_inner).push(node.clone());
                }
                if !req.response_nonce.is_empty() {
                    let error = req.error_detail.map(|s| s.message);
                    if let Some(e) = &error {
                        warn!(type_url = %req.type_url, nonce = %req.response_nonce, error = %e, "client NACK");
                    }
                    store.record(ClientReply { type_url: req.type_url, nonce: req.response_nonce, error });
                    continue;
                }
                // A (re)subscription: seed what the client holds, then answer even if empty so
                // the client can finish its initial sync.
                let client_held = held.entry(req.type_url.clone()).or_default();
                client_held.extend(req.initial_resource_versions);
                debug!(type_url = %req.type_url, held = client_held.len(), "subscribe");
                send_diff(&store, &req.type_url, client_held, &mut nonce, tx, true).await?;
            }
            res = changed.changed() => {
                if res.is_err() { return Ok(()) }
                for (type_url, client_held) in held.iter_mut() {
                    send_diff(&store, type_url, client_held, &mut nonce, tx, false).await?;
                }
            }
            _ = dropped.changed() => {
                return Err(Status::unavailable("stream dropped by the xDS server"));
            }
        }
    }
}

async fn send_diff(
    store: &XdsStore,
    type_url: &str,
    held: &mut HashMap<String, String>,
    nonce: &mut u64,
    tx: &Outbound,
    always: bool,
) -> Result<(), Status> {
    let (resources, removed_resources) = store.diff(type_url, held);
    if resources.is_empty() && removed_resources.is_empty() && !always {
        return Ok(());
    }
    *nonce += 1;
    let response = DeltaDiscoveryResponse {
        type_url: type_url.to_string(),
        nonce: nonce.to_string(),
        resources,
        removed_resources,
        ..Default::default()
    };
    tx.send(Ok(response)).await.map_err(|_| Status::cancelled("client went away"))
}

/// A running server; dropping the handle does not stop it, `stop()` does.
#[derive(Debug)]
pub struct XdsServerHandle {
    pub addr: SocketAddr,
    pub store: Arc<XdsStore>,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
}

impl XdsServerHandle {
    /// `http://addr`, for an xDS client config.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Ends all streams and stops listening.
    pub async fn stop(mut self) {
        self.store.drop_streams();
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if tokio::time::timeout(Duration::from_secs(5), &mut self.task).await.is_err() {
            self.task.abort();
        }
    }
}

/// How the server presents itself: plaintext by default; TLS and a required bearer token to
/// look like istiod on 15012.
#[derive(Clone, Debug, Default)]
pub struct ServerOptions {
    /// PEM certificate chain and key to serve TLS with.
    pub tls: Option<(String, String)>,
    /// When set, every stream must carry `authorization: Bearer <token>`.
    pub bearer_token: Option<String>,
}

/// Starts serving `store` on `addr` (port 0 picks a free port), plaintext, no authentication.
pub async fn start(addr: SocketAddr, store: Arc<XdsStore>) -> std::io::Result<XdsServerHandle> {
    start_with(addr, store, ServerOptions::default()).await
}

/// Starts serving `store` on `addr` with `options`.
pub async fn start_with(
    addr: SocketAddr,
    store: Arc<XdsStore>,
    options: ServerOptions,
) -> std::io::Result<XdsServerHandle> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let addr = listener.local_addr()?;
    let (shutdown_tx, shutdown_rx) = tokio::sync::oneshot::channel::<()>();
    let service = AggregatedDiscoveryServiceServer::new(AdsService { store: store.clone() })
        .max_decoding_message_size(64 * 1024 * 1024)
        .max_encoding_message_size(usize::MAX);
    let service = tonic::service::interceptor::InterceptedService::new(
        service,
        crate::require_bearer(options.bearer_token),
    );
    let mut builder = tonic::transport::Server::builder();
    if let Some((cert, key)) = options.tls {
        let tls = tonic::transport::ServerTlsConfig::new()
            .identity(tonic::transport::Identity::from_pem(cert, key));
        builder = builder.tls_config(tls).map_err(std::io::Error::other)?;
    }
    let task = tokio::spawn(async move {
        let result = builder
            .add_service(service)
            .serve_with_incoming_shutdown(TcpListenerStream::new(listener), async {
                let _ = shutdown_rx.await;
            })
            .await;
        if let Err(e) = result {
            warn!(error = %e, "xDS server ended with an error");
        }
    });
    info!(%addr, "xDS server listening");
    Ok(XdsServerHandle { addr, store, shutdown: Some(shutdown_tx), task })
}
