//! The delta-ADS client: one bidirectional gRPC stream carrying every subscribed type URL.
//!
//! Per connection: send one wildcard subscription per type (node on the first), with
//! `initial_resource_versions` of what we hold; then for each response decode, apply through
//! the registered handler and ACK, or NACK with the rejected names and reasons. On any stream
//! error reconnect with jittered exponential backoff.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use proto::discovery::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use proto::discovery::{DeltaDiscoveryRequest, DeltaDiscoveryResponse, Node, Status};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tracing::{debug, info, warn};

use super::handler::{Handlers, RawResource};
use super::metrics::{ReasonLabels, XdsMetrics};
use crate::backoff::Backoff;
use crate::grpc::{GrpcError, GrpcTarget};
use crate::readiness::{BlockReady, Ready};

/// Default first reconnect delay (Istio's client starts at ~10 ms).
pub const DEFAULT_BACKOFF_INITIAL: Duration = Duration::from_millis(10);
/// Default reconnect delay cap (Istio's: 15 s).
pub const DEFAULT_BACKOFF_MAX: Duration = Duration::from_secs(15);
/// gRPC status code sent in a NACK's `error_detail` (INVALID_ARGUMENT).
const NACK_CODE: i32 = 3;
/// Largest response we accept: a full push of a big cluster is many megabytes.
const MAX_MESSAGE_BYTES: usize = 256 * 1024 * 1024;
/// Longest `error_detail` message we send; the rest is summarised.
const MAX_NACK_MESSAGE: usize = 4096;

/// Where and how to reach the control plane.
#[derive(Clone, Debug)]
pub struct XdsConfig {
    /// The server (istiod's 15012, or the local control plane) and how to authenticate.
    pub target: GrpcTarget,
    /// Who we are, sent to the server.
    pub node: NodeInfo,
    /// First reconnect delay.
    pub backoff_initial: Duration,
    /// Reconnect delay cap.
    pub backoff_max: Duration,
}

impl XdsConfig {
    pub fn new(address: impl Into<String>, node: NodeInfo) -> Self {
        Self {
            target: GrpcTarget::new(address),
            node,
            backoff_initial: DEFAULT_BACKOFF_INITIAL,
            backoff_max: DEFAULT_BACKOFF_MAX,
        }
    }
}

/// The proxy's identity as istiod expects it in `Node`.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct NodeInfo {
    /// `ztunnel` or `waypoint` (istiod's proxy types: `ztunnel`, `router`, `sidecar`).
    pub proxy_type: String,
    pub ip: String,
    pub pod_name: String,
    pub namespace: String,
    pub node_name: String,
    /// Cluster id; Istio's default is `Kubernetes`.
    pub cluster_id: String,
    /// Further metadata the operator configured.
    pub extra: BTreeMap<String, String>,
}

impl NodeInfo {
    /// `<proxy-type>~<ip>~<pod-name>.<namespace>~<namespace>.svc.cluster.local`
    pub fn id(&self) -> String {
        format!(
            "{}~{}~{}.{}~{}.svc.cluster.local",
            self.proxy_type, self.ip, self.pod_name, self.namespace, self.namespace
        )
    }

    pub fn to_proto(&self) -> Node {
        let mut fields = BTreeMap::new();
        let mut put = |k: &str, v: &str| {
            let kind = prost_types::value::Kind::StringValue(v.to_string());
            fields.insert(k.to_string(), prost_types::Value { kind: Some(kind) });
        };
        for (k, v) in &self.extra {
            put(k, v);
        }
        put("NAME", &self.pod_name);
        put("NAMESPACE", &self.namespace);
        put("INSTANCE_IPS", &self.ip);
        put("NODE_NAME", &self.node_name);
        put("CLUSTER_ID", if self.cluster_id.is_empty() { "Kubernetes" } else { &self.cluster_id });
        Node {
            id: self.id(),
            cluster: String::new(),
            metadata: Some(prost_types::Struct { fields }),
            build_version: env!("CARGO_PKG_VERSION").to_string(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum XdsError {
    #[error("xDS: {0}")]
    Target(#[from] GrpcError),
    #[error("xDS stream to {address} failed: {status}")]
    Stream { address: String, status: tonic::Status },
    #[error("xDS stream to {0} closed its request side")]
    RequestsClosed(String),
}

/// Per type URL: what we hold, for `initial_resource_versions` and readiness.
#[derive(Debug, Default)]
struct TypeState {
    /// Accepted resources and their versions. Rejected names are left out so that a reconnect
    /// makes the server send them again.
    versions: HashMap<String, String>,
    /// Released after the first response of this type was processed.
    initial_sync: Option<BlockReady>,
}

/// The delta-ADS client. Build it, then `run()` it on a task (abort the task to stop it).
pub struct XdsClient {
    config: XdsConfig,
    handlers: Handlers,
    metrics: XdsMetrics,
    types: BTreeMap<String, TypeState>,
}

impl XdsClient {
    /// Creates the client; readiness stays blocked until every subscribed type had its first
    /// response processed.
    pub fn new(config: XdsConfig, handlers: Handlers, ready: &Ready, metrics: XdsMetrics) -> Self {
        let types = handlers
            .type_urls()
            .map(|url| {
                let block = ready.register(format!("xds initial sync {url}"));
                (url.to_string(), TypeState { versions: HashMap::new(), initial_sync: Some(block) })
            })
            .collect();
        Self { config, handlers, metrics, types }
    }

    /// Runs forever: connect, stream, reconnect with backoff.
    pub async fn run(mut self) {
        let mut backoff = Backoff::new(self.config.backoff_initial, self.config.backoff_max);
        loop {
            let mut got_response = false;
            let result = self.stream_once(&mut got_response).await;
            self.metrics.connection_state.set(0);
            let reason = match &result {
                Ok(()) => "closed",
                Err(XdsError::Target(_)) => "connect_error",
                Err(_) => "stream_error",
            };
            self.metrics
                .connection_terminations
                .get_or_create(&ReasonLabels { reason: reason.to_string() })
                .inc();
            if got_response {
                backoff.reset();
            }
            let delay = backoff.next_delay();
            match result {
                Ok(()) => {
                    info!(address = %self.config.target.address, ?delay, "xDS stream closed by server, reconnecting")
                }
                Err(e) => warn!(error = %e, ?delay, "xDS stream ended, reconnecting"),
            }
            tokio::time::sleep(delay).await;
        }
    }

    async fn stream_once(&mut self, got_response: &mut bool) -> Result<(), XdsError> {
        let address = self.config.target.address.clone();
        let token = self.config.target.bearer()?;
        let channel = self.config.target.connect().await?;
        let mut client =
            AggregatedDiscoveryServiceClient::with_interceptor(channel, move |mut req: tonic::Request<()>| {
                if let Some(token) = &token {
                    req.metadata_mut().insert("authorization", token.clone());
                }
                Ok(req)
            })
            .max_decoding_message_size(MAX_MESSAGE_BYTES);

        let (tx, rx) = mpsc::channel(self.types.len() + 4);
        let node = self.config.node.to_proto();
        for (i, (type_url, state)) in self.types.iter().enumerate() {
            let initial = DeltaDiscoveryRequest {
                node: (i == 0).then(|| node.clone()),
                type_url: type_url.clone(),
                initial_resource_versions: state.versions.clone().into_iter().collect(),
                ..Default::default()
            };
            debug!(%type_url, held = state.versions.len(), "subscribing");
            // Capacity covers every initial request, so this cannot block.
            tx.send(initial).await.map_err(|_| XdsError::RequestsClosed(address.clone()))?;
        }

        let mut responses = client
            .delta_aggregated_resources(ReceiverStream::new(rx))
            .await
            .map_err(|status| XdsError::Stream { address: address.clone(), status })?
            .into_inner();
        self.metrics.connection_state.set(1);
        info!(%address, node = %node.id, types = self.types.len(), "xDS stream established");

        loop {
            let response = match responses.message().await {
                Ok(Some(response)) => response,
                Ok(None) => return Ok(()),
                Err(status) => return Err(XdsError::Stream { address, status }),
            };
            *got_response = true;
            let reply = self.on_response(response);
            tx.send(reply).await.map_err(|_| XdsError::RequestsClosed(address.clone()))?;
        }
    }

    /// Applies one push and builds its ACK or NACK.
    fn on_response(&mut self, response: DeltaDiscoveryResponse) -> DeltaDiscoveryRequest {
        let DeltaDiscoveryResponse { type_url, nonce, resources, removed_resources, .. } = response;
        let label = XdsMetrics::type_label(&type_url);
        self.metrics.messages.get_or_create(&label).inc();
        self.metrics
            .resources
            .get_or_create(&label)
            .inc_by((resources.len() + removed_resources.len()) as u64);

        let received: Vec<(String, String)> =
            resources.iter().map(|r| (r.name.clone(), r.version.clone())).collect();
        let raw = resources
            .into_iter()
            .map(|r| RawResource { name: r.name, version: r.version, body: r.resource })
            .collect();
        let total = received.len() + removed_resources.len();
        let rejections = match self.handlers.apply(&type_url, raw, removed_resources.clone()) {
            Some(rejections) => rejections,
            None => {
                warn!(%type_url, "push for a type we did not subscribe to");
                let detail = format!("no handler for type {type_url}");
                return self.nack(type_url, nonce, detail);
            }
        };

        let state = self.types.entry(type_url.clone()).or_default();
        let rejected: std::collections::HashSet<&str> = rejections.iter().map(|r| r.name.as_str()).collect();
        for (name, version) in received {
            if rejected.contains(name.as_str()) {
                state.versions.remove(&name);
            } else {
                state.versions.insert(name, version);
            }
        }
        for name in &removed_resources {
            state.versions.remove(name);
        }
        if let Some(block) = state.initial_sync.take() {
            block.done();
        }

        if rejections.is_empty() {
            debug!(%type_url, %nonce, resources = total, "ACK");
            return DeltaDiscoveryRequest { type_url, response_nonce: nonce, ..Default::default() };
        }
        self.metrics.rejected_resources.get_or_create(&label).inc_by(rejections.len() as u64);
        for r in &rejections {
            warn!(%type_url, resource = %r.name, reason = %r.reason, "rejected xDS resource, keeping the previous version (a rejected Authorization is held fail-safe)");
        }
        let mut detail = format!("rejected {} of {} resources: ", rejections.len(), total);
        for (i, r) in rejections.iter().enumerate() {
            let next = format!("{}{r}", if i == 0 { "" } else { "; " });
            if detail.len() + next.len() > MAX_NACK_MESSAGE {
                detail.push_str(&format!("; and {} more", rejections.len() - i));
                break;
            }
            detail.push_str(&next);
        }
        self.nack(type_url, nonce, detail)
    }

    fn nack(&self, type_url: String, nonce: String, message: String) -> DeltaDiscoveryRequest {
        self.metrics.nacks.get_or_create(&XdsMetrics::type_label(&type_url)).inc();
        DeltaDiscoveryRequest {
            type_url,
            response_nonce: nonce,
            error_detail: Some(Status { code: NACK_CODE, message, details: vec![] }),
            ..Default::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_id_and_metadata_follow_istio() {
        let node = NodeInfo {
            proxy_type: "ztunnel".into(),
            ip: "10.0.0.5".into(),
            pod_name: "ztunnel-abcde".into(),
            namespace: "istio-system".into(),
            node_name: "node-a".into(),
            cluster_id: String::new(),
            extra: BTreeMap::from([("FOO".into(), "bar".into())]),
        };
        let proto = node.to_proto();
        assert_eq!(proto.id, "ztunnel~10.0.0.5~ztunnel-abcde.istio-system~istio-system.svc.cluster.local");
        let fields = proto.metadata.expect("metadata").fields;
        let get = |k: &str| match fields.get(k).and_then(|v| v.kind.clone()) {
            Some(prost_types::value::Kind::StringValue(s)) => s,
            other => panic!("{k}: {other:?}"),
        };
        assert_eq!(get("NAME"), "ztunnel-abcde");
        assert_eq!(get("NAMESPACE"), "istio-system");
        assert_eq!(get("INSTANCE_IPS"), "10.0.0.5");
        assert_eq!(get("NODE_NAME"), "node-a");
        assert_eq!(get("CLUSTER_ID"), "Kubernetes");
        assert_eq!(get("FOO"), "bar");
    }
}
