//! The Kubernetes watch behind enrollment decisions: this node's pods (field selector
//! `spec.nodeName=<node>`) and every namespace, reduced into the [`PodCache`]. Each kind blocks
//! readiness until its first full list is in; errors are logged, counted and retried with
//! kube-rs's backoff. Every change pokes `changed`, on which the announced pods are re-judged.

use std::fmt::Debug;
use std::path::Path;
use std::sync::Arc;

use common::readiness::BlockReady;
use k8s_openapi::api::core::v1::{Namespace, Pod};
use kube::api::Api;
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, Event};
use serde::de::DeserializeOwned;
use tokio::sync::Notify;
use tokio_stream::StreamExt;
use tracing::{info, warn};

use super::decide::{DATAPLANE_MODE, NamespaceFacts, PodFacts, SIDECAR_STATUS, bypasses_dns};
use super::metrics::CniMetrics;
use super::pods::{Change, Kind, PodCache, PodKey};

/// Why no Kubernetes client could be made.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("kubeconfig {path}: {reason}")]
    Kubeconfig { path: String, reason: String },
    #[error("no Kubernetes configuration (in-cluster or KUBECONFIG): {0}")]
    Infer(String),
    #[error("Kubernetes client: {0}")]
    Client(String),
}

/// A client from `kubeconfig` when given, else from the in-cluster environment or the usual
/// kubeconfig (`KUBECONFIG`, `~/.kube/config`).
pub async fn client(kubeconfig: Option<&Path>) -> Result<kube::Client, ClientError> {
    let config = match kubeconfig {
        Some(path) => {
            let fail = |reason: String| ClientError::Kubeconfig { path: path.display().to_string(), reason };
            let file = kube::config::Kubeconfig::read_from(path).map_err(|e| fail(e.to_string()))?;
            kube::Config::from_custom_kubeconfig(file, &kube::config::KubeConfigOptions::default())
                .await
                .map_err(|e| fail(e.to_string()))?
        }
        None => kube::Config::infer().await.map_err(|e| ClientError::Infer(e.to_string()))?,
    };
    kube::Client::try_from(config).map_err(|e| ClientError::Client(e.to_string()))
}

/// What a watch task needs.
pub struct Watch {
    pub client: kube::Client,
    pub node: String,
    pub cache: Arc<PodCache>,
    pub metrics: CniMetrics,
    pub changed: Arc<Notify>,
}

impl Watch {
    /// Watches this node's pods until the task is dropped.
    pub async fn pods(self, block: BlockReady) {
        let api: Api<Pod> = Api::all(self.client.clone());
        let config = watcher::Config::default().fields(&format!("spec.nodeName={}", self.node));
        let cache = self.cache.clone();
        self.run(api, config, Kind::Pods, block, pod_facts, move |c| cache.pods(c)).await;
    }

    /// Watches every namespace until the task is dropped.
    pub async fn namespaces(self, block: BlockReady) {
        let api: Api<Namespace> = Api::all(self.client.clone());
        let cache = self.cache.clone();
        self.run(api, watcher::Config::default(), Kind::Namespaces, block, namespace_facts, move |c| {
            cache.namespaces(c)
        })
        .await;
    }

    async fn run<K, Key, V>(
        &self,
        api: Api<K>,
        config: watcher::Config,
        kind: Kind,
        block: BlockReady,
        reduce: fn(&K) -> Option<(Key, V)>,
        apply: impl Fn(Change<Key, V>) -> bool,
    ) where
        K: kube::Resource + Clone + DeserializeOwned + Debug + Send + 'static,
    {
        let mut block = Some(block);
        let mut events = std::pin::pin!(watcher::watcher(api, config).default_backoff());
        while let Some(event) = events.next().await {
            let change = match event {
                Ok(Event::Apply(obj)) => reduce(&obj).map(|(k, v)| Change::Apply(k, v)),
                Ok(Event::Delete(obj)) => reduce(&obj).map(|(k, _)| Change::Delete(k)),
                Ok(Event::Init) => Some(Change::Init),
                Ok(Event::InitApply(obj)) => reduce(&obj).map(|(k, v)| Change::InitApply(k, v)),
                Ok(Event::InitDone) => Some(Change::InitDone),
                Err(e) => {
                    self.metrics.watch_error(kind.as_str());
                    warn!(kind = kind.as_str(), error = %e, "Kubernetes watch failed; retrying");
                    if let Some(b) = &block {
                        b.set_detail(Some(format!("watch failing: {e}")));
                    }
                    continue;
                }
            };
            let Some(change) = change else { continue };
            let listed = matches!(change, Change::InitDone);
            let buffered = matches!(change, Change::Init | Change::InitApply(..));
            if !apply(change) {
                self.metrics.dropped(kind.as_str());
                warn!(kind = kind.as_str(), "watch cache full: object dropped (pods of it are refused)");
            }
            if listed && let Some(b) = block.take() {
                info!(kind = kind.as_str(), "Kubernetes watch listed");
                b.done();
            }
            if !buffered {
                self.changed.notify_one();
            }
        }
    }
}

fn pod_facts(pod: &Pod) -> Option<(PodKey, PodFacts)> {
    let meta = &pod.metadata;
    let key = PodKey::new(meta.namespace.clone()?, meta.name.clone()?);
    let facts = PodFacts {
        uid: meta.uid.clone().unwrap_or_default(),
        dataplane_mode: meta.labels.as_ref().and_then(|l| l.get(DATAPLANE_MODE)).cloned(),
        sidecar: meta.annotations.as_ref().is_some_and(|a| a.contains_key(SIDECAR_STATUS)),
        host_network: pod.spec.as_ref().and_then(|s| s.host_network).unwrap_or(false),
        ips: pod_ips(pod),
        phase: pod.status.as_ref().and_then(|s| s.phase.clone()),
        bypass_dns: bypasses_dns(|name| meta.annotations.as_ref()?.get(name).map(String::as_str)),
    };
    Some((key, facts))
}

/// The pod's addresses from its status (`podIPs`, else `podIP`), at most [`MAX_POD_IPS`].
fn pod_ips(pod: &Pod) -> Vec<std::net::IpAddr> {
    let Some(status) = pod.status.as_ref() else { return Vec::new() };
    let mut ips: Vec<std::net::IpAddr> = status
        .pod_ips
        .iter()
        .flatten()
        .filter_map(|p| p.ip.parse().ok())
        .chain(status.pod_ip.as_deref().and_then(|ip| ip.parse().ok()))
        .collect();
    let mut seen = Vec::with_capacity(ips.len());
    ips.retain(|ip| {
        !seen.contains(ip) && {
            seen.push(*ip);
            true
        }
    });
    ips.truncate(MAX_POD_IPS);
    ips
}

/// Most addresses kept per pod (as many as the plugin may announce).
const MAX_POD_IPS: usize = super::server::MAX_IPS;

fn namespace_facts(ns: &Namespace) -> Option<(String, NamespaceFacts)> {
    let meta = &ns.metadata;
    let facts =
        NamespaceFacts { dataplane_mode: meta.labels.as_ref().and_then(|l| l.get(DATAPLANE_MODE)).cloned() };
    Some((meta.name.clone()?, facts))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reduces_pods_and_namespaces() {
        let pod: Pod = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "a", "namespace": "demo", "uid": "u1",
                         "labels": {"istio.io/dataplane-mode": "none", "app": "a"},
                         "annotations": {"sidecar.istio.io/status": "{}",
                                         "ambient.istio.io/bypass-dns-capture": "true"}},
            "spec": {"nodeName": "n1", "hostNetwork": true, "containers": []},
            "status": {"phase": "Running", "podIP": "10.1.1.2",
                       "podIPs": [{"ip": "10.1.1.2"}, {"ip": "fd00::2"}]}
        }))
        .expect("pod");
        let (key, facts) = pod_facts(&pod).expect("facts");
        assert_eq!(key, PodKey::new("demo", "a"));
        assert_eq!(
            facts,
            PodFacts {
                uid: "u1".into(),
                dataplane_mode: Some("none".into()),
                sidecar: true,
                host_network: true,
                ips: vec!["10.1.1.2".parse().expect("ip"), "fd00::2".parse().expect("ip")],
                phase: Some("Running".into()),
                bypass_dns: true,
            }
        );
        let ns: Namespace = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "demo", "labels": {"istio.io/dataplane-mode": "ambient"}}
        }))
        .expect("namespace");
        assert_eq!(
            namespace_facts(&ns),
            Some(("demo".into(), NamespaceFacts { dataplane_mode: Some("ambient".into()) }))
        );
        let nameless: Pod = serde_json::from_value(serde_json::json!({"metadata": {}})).expect("pod");
        assert!(pod_facts(&nameless).is_none());
    }
}
