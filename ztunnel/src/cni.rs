//! Enrollment at pod creation: the node's CNI plugin (`ambient-cni`, chained after the primary
//! CNI) hands each new pod to ztunnel on a unix socket before the pod's containers start, and
//! ztunnel enrolls it in eBPF capture then and there, instead of when xDS first mentions its
//! workload. That closes the window in which a new pod's first connections went out uncaptured.
//!
//! ztunnel decides with the labels it learns from a Kubernetes watch of this node's pods and of
//! namespaces (`watch`, into `pods`), by Istio's rules (`decide`); it answers a pod it cannot
//! decide on with a refusal, and the plugin then fails the sandbox so the kubelet retries:
//! fail closed. Enrolled pods are kept (`announced`, held by `crate::redirect`) until DEL, their
//! deletion in the watch, or labels that take them out of the mesh. Until xDS delivers such a
//! pod's workload, the proxies refuse its connections (an unknown source), so nothing leaves it
//! in plaintext.
//!
//! `server` answers the socket, `metrics` counts (`istio_cni_*`).

pub mod announced;
pub mod decide;
pub mod metrics;
pub mod pods;
pub mod server;
pub mod watch;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use common::readiness::{BlockReady, Ready};
use prometheus_client::registry::Registry;
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tracing::{info, warn};

use crate::redirect::Enrollment;
use announced::{AnnouncedPod, Which};
use decide::Decision;
use metrics::CniMetrics;
use pods::{Known, PodCache, PodKey};

/// Where the plugin finds ztunnel unless configured otherwise (`ambient_cni`'s default too).
pub const DEFAULT_SOCKET: &str = ambient_cni::conf::DEFAULT_SOCKET;
/// How long an ADD waits for the watch to deliver a pod or namespace it has not seen yet.
pub const DEFAULT_POD_WAIT: Duration = Duration::from_secs(2);
/// Readiness tasks: the first full list of each watched kind.
const PODS_LISTED: &str = "kubernetes watch: pods";
const NAMESPACES_LISTED: &str = "kubernetes watch: namespaces";
/// Blocks the first sync (and so any narrowing of capture adopted from a previous ztunnel)
/// until the pods this node captured and the watch says are in the mesh are held again.
const RECOVERED: &str = "cni: captured pods re-announced from the watch";
/// The sandbox id recorded for a pod re-announced from the watch (its DEL cannot name it; the
/// pod's deletion in the watch withdraws it).
const FROM_WATCH: &str = "(from the watch)";

/// Enrollment-at-creation settings (part of ztunnel's config).
#[derive(Clone, Debug, serde::Serialize)]
pub struct CniConfig {
    /// The unix socket the plugin talks to.
    pub socket: PathBuf,
    /// Kubeconfig for the watch; `None`: in-cluster, else `KUBECONFIG` or `~/.kube/config`.
    pub kubeconfig: Option<PathBuf>,
    /// How long an ADD waits for a pod or namespace the watch has not delivered yet.
    pub pod_wait: Duration,
}

/// Why enrollment at creation could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Client(#[from] watch::ClientError),
    #[error(transparent)]
    Bind(#[from] server::BindError),
}

/// The running server and watch.
#[derive(Clone)]
pub struct Cni {
    config: CniConfig,
    cache: Arc<PodCache>,
    enrollment: Enrollment,
}

impl Cni {
    /// Connects to Kubernetes, binds the socket and starts the watch, the server and the task
    /// that re-judges announced pods on every change. The watch blocks `ready` until listed;
    /// `synced` (the first control-plane sync, which narrows adopted capture) also waits until
    /// the pods still captured from a previous ztunnel are held again (see [`recover`]).
    pub async fn start(
        config: CniConfig,
        node: &str,
        enrollment: Enrollment,
        ready: &Ready,
        synced: &Ready,
        registry: &mut Registry,
    ) -> Result<(Self, Vec<JoinHandle<()>>), StartError> {
        let client = watch::client(config.kubeconfig.as_deref()).await?;
        let listener = server::bind(&config.socket)?;
        let metrics = CniMetrics::new(registry);
        let cache = Arc::new(PodCache::default());
        let changed = Arc::new(Notify::new());
        let watch = |client: &kube::Client| watch::Watch {
            client: client.clone(),
            node: node.to_string(),
            cache: cache.clone(),
            metrics: metrics.clone(),
            changed: changed.clone(),
        };
        let pods = watch(&client).pods(ready.register(PODS_LISTED));
        let namespaces = watch(&client).namespaces(ready.register(NAMESPACES_LISTED));
        let handler = Arc::new(server::Handler {
            cache: cache.clone(),
            enrollment: enrollment.clone(),
            metrics: metrics.clone(),
            wait: config.pod_wait,
        });
        info!(socket = %config.socket.display(), node, "enrollment socket listening");
        let tasks = vec![
            tokio::spawn(pods),
            tokio::spawn(namespaces),
            tokio::spawn(rejudge(cache.clone(), enrollment.clone(), changed, metrics.clone())),
            tokio::spawn(recover(cache.clone(), enrollment.clone(), synced.register(RECOVERED), metrics)),
            tokio::spawn(server::serve(listener, handler)),
        ];
        Ok((Self { config, cache, enrollment }, tasks))
    }

    /// For the config dump: the socket, the watch cache's size, the pods announced.
    pub fn dump(&self) -> serde_json::Value {
        serde_json::json!({
            "socket": self.config.socket,
            "watch": self.cache.summary(),
            "announced": self.enrollment.announced(),
        })
    }
}

/// After a restart the announcements of the previous ztunnel are gone, while its capture is
/// still pinned in the kernel. A pod it enrolled at creation whose workload xDS has not
/// delivered yet would be unenrolled by the first sync and talk uncaptured until xDS caught
/// up. So, once the watch has listed, every pod of this node that is captured now and in the
/// mesh by its labels is announced again (kept until its deletion in the watch or its labels
/// say otherwise), before the first sync may narrow anything.
async fn recover(cache: Arc<PodCache>, enrollment: Enrollment, block: BlockReady, metrics: CniMetrics) {
    cache.wait_listed().await;
    let captured = enrollment.status().pods;
    let held: Vec<PodKey> = enrollment.announced().into_iter().map(|p| p.pod).collect();
    let mut kept = 0;
    for (pod, uid, ips) in cache.members() {
        if held.contains(&pod) || !ips.iter().any(|ip| captured.contains_key(ip)) {
            continue;
        }
        let first = ips[0];
        let interface = match tokio::task::spawn_blocking(move || ebpf::interface_for(first)).await {
            Ok(Ok(i)) => i,
            Ok(Err(e)) => {
                warn!(%pod, error = %e, "cannot re-announce a captured pod: no interface");
                continue;
            }
            Err(e) => {
                warn!(%pod, error = %e, "cannot re-announce a captured pod");
                continue;
            }
        };
        let since_unix_s = std::time::SystemTime::now()
            .duration_since(std::time::SystemTime::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or_default();
        let announced = AnnouncedPod {
            pod: pod.clone(),
            uid: Some(uid),
            container_id: FROM_WATCH.into(),
            ips,
            interface,
            since_unix_s,
        };
        match enrollment.announce(announced).await {
            Ok(()) => kept += 1,
            Err(e) => warn!(%pod, error = %e, "cannot re-announce a captured pod"),
        }
    }
    metrics.announced(enrollment.announced_count());
    info!(kept, "captured pods in the mesh re-announced from the watch");
    block.done();
}

/// On every watch change, withdraws announced pods that were deleted or whose labels now keep
/// them out of the mesh.
async fn rejudge(cache: Arc<PodCache>, enrollment: Enrollment, changed: Arc<Notify>, metrics: CniMetrics) {
    loop {
        changed.notified().await;
        for pod in enrollment.announced() {
            let (which, why) = match cache.known(&pod.pod, pod.uid.as_deref()) {
                Known::Gone => {
                    (pod.uid.clone().map_or(Which::Any, Which::Uid), "the pod was deleted".to_string())
                }
                Known::Decided(Decision::Skip(why)) => (Which::Any, format!("it left the mesh: {why}")),
                Known::Decided(Decision::Enroll(_)) | Known::Missing(_) => continue,
            };
            if let Some(removed) = enrollment.withdraw(pod.pod.clone(), which).await {
                info!(pod = %removed.pod, ips = ?removed.ips, reason = %why, "announced pod withdrawn");
            }
        }
        metrics.announced(enrollment.announced_count());
    }
}
