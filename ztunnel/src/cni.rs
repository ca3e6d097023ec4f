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
//! in plaintext. Completed pods (phase `Succeeded` or `Failed`) are withdrawn too.
//!
//! Across a restart of ztunnel the capture stays pinned and the announcements are kept in a
//! file (`persisted`); the restarted ztunnel holds its pods again, and the captured pods the
//! watch shows in the mesh, before it may narrow the capture it adopted ([`recover`]).
//!
//! `server` answers the socket, `metrics` counts (`istio_cni_*`).

pub mod announced;
pub mod decide;
pub mod metrics;
pub mod persisted;
pub mod pods;
pub mod server;
pub mod watch;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use common::readiness::Ready;
use prometheus_client::registry::Registry;
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tracing::{info, warn};

use crate::redirect::{AnnounceError, Enrollment, NarrowingBlock};
use announced::{AnnouncedPod, FROM_WATCH, Which};
use decide::Decision;
use metrics::CniMetrics;
use pods::{Known, PodCache};

/// Where the plugin finds ztunnel unless configured otherwise (`ambient_cni`'s default too).
pub const DEFAULT_SOCKET: &str = ambient_cni::conf::DEFAULT_SOCKET;
/// How long an ADD waits for the watch to deliver a pod or namespace it has not seen yet.
pub const DEFAULT_POD_WAIT: Duration = Duration::from_secs(2);
/// Readiness tasks: the first full list of each watched kind.
const PODS_LISTED: &str = "kubernetes watch: pods";
const NAMESPACES_LISTED: &str = "kubernetes watch: namespaces";
/// The condition of narrowing capture adopted from a previous ztunnel that enrollment at
/// creation adds: the pods announced before the restart (from the file) and the captured pods
/// the watch shows in the mesh are held again (see [`recover`]).
pub const RECOVERED: &str = "cni: announced pods held again after the restart";

/// Enrollment-at-creation settings (part of ztunnel's config).
#[derive(Clone, Debug, serde::Serialize)]
pub struct CniConfig {
    /// The unix socket the plugin talks to.
    pub socket: PathBuf,
    /// Kubeconfig for the watch; `None`: in-cluster, else `KUBECONFIG` or `~/.kube/config`.
    pub kubeconfig: Option<PathBuf>,
    /// How long an ADD waits for a pod or namespace the watch has not delivered yet.
    pub pod_wait: Duration,
    /// Where the announced pods are kept across restarts (see `persisted`; by default
    /// [`persisted::FILE_NAME`] next to the socket).
    pub announced_file: PathBuf,
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
    /// Connects to Kubernetes, holds again the pods of the announced pods' file, binds the
    /// socket, keeps the file from then on, and starts the watch, the server, the task that
    /// re-judges announced pods on every change and the one that re-announces captured pods
    /// from the watch. The watch blocks `ready` until listed; `recovered` (a condition of
    /// narrowing adopted capture, see [`recover`]) is done once both recoveries are. An error
    /// fails ztunnel's start.
    pub async fn start(
        config: CniConfig,
        node: &str,
        enrollment: Enrollment,
        ready: &Ready,
        recovered: NarrowingBlock,
        registry: &mut Registry,
    ) -> Result<(Self, Vec<JoinHandle<()>>), StartError> {
        let metrics = CniMetrics::new(registry);
        let client = watch::client(config.kubeconfig.as_deref()).await?;
        // Before the socket is bound (no ADD can come in between) and before the file is
        // written again.
        recovered.set_detail(Some("re-announcing the pods of the announced pods' file".into()));
        restore_from_file(&config.announced_file, &enrollment, &metrics).await;
        let listener = server::bind(&config.socket)?;
        enrollment.persist_to(config.announced_file.clone()).await;
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
            tokio::spawn(recover(cache.clone(), enrollment.clone(), recovered, metrics)),
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

/// Holds again the pods of the announced pods' file a previous ztunnel left (those whose
/// interface still exists; never replacing an announcement), so that a pod announced moments
/// before the restart, which neither xDS nor the watch may show yet, stays captured. Those the
/// watch then shows deleted (or out of the mesh) are withdrawn by [`rejudge`]. An untrusted file
/// is logged, counted and ignored.
async fn restore_from_file(path: &std::path::Path, enrollment: &Enrollment, metrics: &CniMetrics) {
    let file = path.to_path_buf();
    let loaded = match tokio::task::spawn_blocking(move || persisted::load(&file)).await {
        Ok(Ok(pods)) => pods,
        Ok(Err(e)) => {
            metrics.file_rejected();
            warn!(error = %e, "the announced pods' file is not trusted: ignored (the watch alone recovers)");
            return;
        }
        Err(e) => {
            metrics.file_rejected();
            warn!(error = %e, "reading the announced pods' file failed: ignored");
            return;
        }
    };
    if loaded.is_empty() {
        return;
    }
    let interfaces = match tokio::task::spawn_blocking(ebpf::routing::interfaces).await {
        Ok(Ok(names)) => Some(names),
        Ok(Err(e)) => {
            warn!(error = %e, "cannot list interfaces: every pod of the file is tried");
            None
        }
        Err(e) => {
            warn!(error = %e, "cannot list interfaces: every pod of the file is tried");
            None
        }
    };
    let mut held = 0;
    for pod in loaded {
        if interfaces.as_ref().is_some_and(|names| !names.contains(&pod.interface)) {
            metrics.recovered("file", "interface_gone");
            let (key, iface) = (&pod.pod, &pod.interface);
            info!(pod = %key, %iface, "announced pod not held again: its interface is gone");
            continue;
        }
        if hold_again(enrollment, pod, "file", metrics).await {
            held += 1;
        }
    }
    metrics.announced(enrollment.announced_count());
    info!(held, path = %path.display(), "pods of the announced pods' file held again");
}

/// Announces `pod` again after a restart unless something is announced for it or its
/// addresses already; true when it did.
async fn hold_again(
    enrollment: &Enrollment,
    pod: AnnouncedPod,
    source: &'static str,
    metrics: &CniMetrics,
) -> bool {
    let (key, ips) = (pod.pod.clone(), pod.ips.clone());
    match enrollment.announce_if_absent(pod).await {
        Ok(true) => {
            metrics.recovered(source, "announced");
            info!(pod = %key, ?ips, source, "announced pod held again after the restart");
            true
        }
        Ok(false) => {
            metrics.recovered(source, "already_held");
            false
        }
        Err(e) => {
            metrics.recovered(source, "failed");
            // Shutting down: nothing left to hold.
            if !matches!(e, AnnounceError::ShuttingDown) {
                warn!(pod = %key, error = %e, source, "cannot hold a captured pod again after the restart");
            }
            false
        }
    }
}

/// After a restart the announcements of the previous ztunnel are gone from memory, while its
/// capture is still pinned in the kernel. Those of the file were held again at start; besides,
/// once the watch has listed, every pod of this node that is captured now and in the mesh by
/// its labels is announced again (kept until its DEL, its deletion in the watch or its labels
/// say otherwise, or it completes). Only then is `recovered` done: narrowing the adopted
/// capture waits for it (an unreachable API server postpones narrowing, never serving).
async fn recover(
    cache: Arc<PodCache>,
    enrollment: Enrollment,
    recovered: NarrowingBlock,
    metrics: CniMetrics,
) {
    recovered.set_detail(Some("waiting for the Kubernetes watch to list pods and namespaces".into()));
    cache.wait_listed().await;
    recovered.set_detail(Some("re-announcing captured pods in the mesh from the watch".into()));
    let captured = enrollment.status().pods;
    // A first, cheap look; `hold_again` decides under the lock (an ADD may come meanwhile).
    let held: Vec<_> = enrollment.announced().into_iter().map(|p| p.pod).collect();
    let mut kept = 0;
    for (pod, uid, ips, bypass_dns) in cache.members() {
        if !ips.iter().any(|ip| captured.contains_key(ip)) {
            continue;
        }
        if held.contains(&pod) {
            metrics.recovered("watch", "already_held");
            continue;
        }
        let Some(first) = ips.first().copied() else { continue };
        let interface = match tokio::task::spawn_blocking(move || ebpf::interface_for(first)).await {
            Ok(Ok(i)) => i,
            Ok(Err(e)) => {
                metrics.recovered("watch", "failed");
                warn!(%pod, error = %e, "cannot re-announce a captured pod: no interface");
                continue;
            }
            Err(e) => {
                metrics.recovered("watch", "failed");
                warn!(%pod, error = %e, "cannot re-announce a captured pod");
                continue;
            }
        };
        let since_unix_s = std::time::SystemTime::now()
            .duration_since(std::time::SystemTime::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or_default();
        let announced = AnnouncedPod {
            pod,
            uid: Some(uid),
            container_id: FROM_WATCH.into(),
            ips,
            interface,
            since_unix_s,
            bypass_dns,
        };
        if hold_again(&enrollment, announced, "watch", &metrics).await {
            kept += 1;
        }
    }
    metrics.announced(enrollment.announced_count());
    info!(kept, "captured pods in the mesh re-announced from the watch");
    recovered.done();
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
