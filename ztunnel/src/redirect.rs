//! Pod enrollment: keeps the eBPF redirector's enrolled set equal to the addresses (IPv4 and
//! IPv6) of the workloads scheduled on this node (their `node` field is our node name) that are
//! in the mesh (`tunnel_protocol: HBONE`; a pod outside ambient mode, `NONE`, or with a sidecar
//! is not captured, as in Istio) and do not speak HBONE natively (`native_tunnel`, e.g.
//! waypoints), plus the pods
//! configured explicitly (VM and ECS hosts without Kubernetes). A pod's interface is the one the
//! host routes its address through, unless the explicit entry names it.
//!
//! Uplinks (interfaces traffic from elsewhere arrives on) get the program too, so that traffic
//! to an enrolled pod is captured for ztunnel's inbound listeners; `*` means every interface of
//! the node but loopback, which also covers unenrolled pods on the same node (their veths) and
//! picks up interfaces as they appear.
//!
//! Reconciles after every workload update, and every few seconds so that a pod whose interface
//! was not up yet is retried. Failures are logged and counted; the pod is retried.
//!
//! Capture adopted from a previous ztunnel (pinned in the kernel) is only ever narrowed once
//! the first control-plane sync is through: until then a restarted ztunnel knows no workloads,
//! and unenrolling on that basis would open every pod of the node.
//!
//! Pods the CNI plugin announced at creation ([`Enrollment::announce`], see `crate::cni`) are
//! enrolled at once, before xDS may know their workload, and stay wanted until withdrawn. The
//! announcements live under the redirector's lock, so a reconcile pass never sees a pod
//! enrolled without its announcement and unenrolls it.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use common::readiness::Ready;
use common::xds::ResourceStore;
use ebpf::redirector::RedirectError;
use ebpf::{Redirector, Status};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use proto::workload::{Address, address};
use tokio::sync::watch;
use tracing::{info, warn};

use crate::cni::announced::{Announced, AnnouncedPod, Full, Which};
use crate::cni::pods::PodKey;

/// How often enrollment is re-checked without an update (retries of failed enrollments).
const RESYNC_INTERVAL: Duration = Duration::from_secs(5);

/// A pod to enroll whatever the control plane says: `ip` or `ip@interface`.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct StaticPod {
    pub ip: IpAddr,
    pub iface: Option<String>,
}

impl std::str::FromStr for StaticPod {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let (ip, iface) = match s.split_once('@') {
            Some((ip, iface)) if !iface.is_empty() => (ip, Some(iface.to_string())),
            Some(_) => return Err(format!("{s:?}: empty interface after @")),
            None => (s, None),
        };
        let ip = ip.parse().map_err(|e| format!("{s:?}: {e}"))?;
        Ok(Self { ip, iface })
    }
}

/// Enrollment metrics (`istio_redirect_*`).
#[derive(Clone, Debug, Default)]
struct RedirectMetrics {
    enrolled: Gauge,
    errors: Counter,
}

/// The redirector and the pods the CNI plugin announced, under one lock.
struct Guarded {
    /// Taken out on shutdown.
    redirector: Option<Redirector>,
    announced: Announced,
}

/// What the reconcile loop and the handles share.
struct Shared {
    guarded: Mutex<Guarded>,
    wanted: Wanted,
    workloads: Arc<ResourceStore<Address>>,
    metrics: RedirectMetrics,
    status: watch::Sender<Status>,
    /// The announced pods as of the last change, readable without the lock (which a reconcile
    /// pass holds while it runs `ip`).
    announced: watch::Sender<Vec<AnnouncedPod>>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Guarded> {
        self.guarded.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Every address to enroll now: xDS workloads, announced pods, explicit pods (in rising
    /// precedence for the interface).
    fn want(&self, announced: &Announced) -> BTreeMap<IpAddr, Option<String>> {
        let mut want = desired(&self.wanted, &self.workloads);
        for (ip, iface) in announced.addresses() {
            want.insert(ip, Some(iface.to_string()));
        }
        for p in &self.wanted.static_pods {
            want.insert(p.ip, p.iface.clone());
        }
        want
    }

    /// Publishes the status and the announced pods.
    fn publish(&self, r: Option<&Redirector>, announced: &Announced) {
        if let Some(r) = r {
            let now = r.status();
            self.metrics.enrolled.set(now.pods.len() as i64);
            self.status.send_replace(now);
        }
        self.announced.send_if_modified(|seen| {
            let now = announced.list();
            let changed = *seen != now;
            *seen = now;
            changed
        });
    }

    /// Unenrolls those of `ips` that nothing wants any more.
    fn release_unwanted(&self, r: &mut Redirector, announced: &Announced, ips: &[IpAddr]) {
        let want = self.want(announced);
        for ip in ips.iter().filter(|ip| !want.contains_key(ip)) {
            if let Err(e) = r.unenroll(*ip) {
                self.metrics.errors.inc();
                warn!(%ip, error = %e, "unenroll failed; the reconcile loop retries");
            }
        }
    }
}

/// Why an announced pod could not be enrolled.
#[derive(Debug, thiserror::Error)]
pub enum AnnounceError {
    #[error(transparent)]
    Full(#[from] Full),
    #[error("ztunnel is shutting down")]
    ShuttingDown,
    #[error("enrolling {ip} on {iface}: {source}")]
    Enroll { ip: IpAddr, iface: String, source: Box<RedirectError> },
    #[error("enrollment task failed: {0}")]
    Task(String),
}

/// The running enrollment: the redirector, the announced pods and the last reported status.
#[derive(Clone)]
pub struct Enrollment {
    shared: Arc<Shared>,
}

impl Enrollment {
    /// Starts reconciling `workloads` into `redirector` for `node_name`; returns the handle
    /// and the reconcile task.
    pub fn start(
        redirector: Redirector,
        node_name: String,
        uplinks: Vec<String>,
        static_pods: Vec<StaticPod>,
        workloads: Arc<ResourceStore<Address>>,
        synced: Ready,
        registry: &mut Registry,
    ) -> (Self, tokio::task::JoinHandle<()>) {
        let metrics = RedirectMetrics::default();
        let r = registry.sub_registry_with_prefix("redirect");
        r.register("enrolled_pods", "Pods whose traffic is redirected to ztunnel", metrics.enrolled.clone());
        r.register("enroll_errors", "Failed pod enrollments (retried)", metrics.errors.clone());
        let (status, _) = watch::channel(redirector.status());
        let shared = Arc::new(Shared {
            guarded: Mutex::new(Guarded { redirector: Some(redirector), announced: Announced::default() }),
            wanted: Wanted { node_name, uplinks, static_pods, synced },
            workloads,
            metrics,
            status,
            announced: watch::channel(Vec::new()).0,
        });
        let task = tokio::spawn(reconcile_loop(shared.clone()));
        (Self { shared }, task)
    }

    /// What is attached and enrolled now.
    pub fn status(&self) -> Status {
        self.shared.status.borrow().clone()
    }

    /// Waits until `pred` holds for the status (checked after every change).
    pub async fn wait_for(&self, pred: impl Fn(&Status) -> bool) {
        let mut rx = self.shared.status.subscribe();
        let _ = rx.wait_for(|s| pred(s)).await;
    }

    /// Stops reconciling and lets go of the redirector on shutdown, leaving capture pinned in
    /// the kernel (enrolled pods fail closed until a ztunnel adopts it). Idempotent.
    pub fn release(&self) {
        let taken = self.shared.lock().redirector.take();
        if let Some(r) = taken {
            r.release();
        }
    }

    /// Enrolls the addresses of a pod the CNI plugin announced on its interface, now, and
    /// keeps them enrolled (whatever xDS says) until [`Self::withdraw`]. On failure nothing of
    /// the announcement stays.
    pub async fn announce(&self, pod: AnnouncedPod) -> Result<(), AnnounceError> {
        let shared = self.shared.clone();
        // Enrolling runs netlink and `ip`: off the async workers.
        tokio::task::spawn_blocking(move || {
            let mut guard = shared.lock();
            let Guarded { redirector, announced } = &mut *guard;
            let r = redirector.as_mut().ok_or(AnnounceError::ShuttingDown)?;
            let replaced = announced.insert(pod.clone())?;
            for ip in &pod.ips {
                if let Err(source) = r.enroll(*ip, &pod.interface) {
                    shared.metrics.errors.inc();
                    announced.remove(&pod.pod, &Which::Sandbox(pod.container_id.clone()));
                    shared.release_unwanted(r, announced, &pod.ips);
                    shared.publish(Some(r), announced);
                    return Err(AnnounceError::Enroll {
                        ip: *ip,
                        iface: pod.interface.clone(),
                        source: Box::new(source),
                    });
                }
            }
            // A new sandbox of the same pod: what only the old one had goes.
            if let Some(old) = replaced {
                shared.release_unwanted(r, announced, &old.ips);
            }
            shared.publish(Some(r), announced);
            Ok(())
        })
        .await
        .map_err(|e| AnnounceError::Task(e.to_string()))?
    }

    /// Forgets the pod's announcement if it is `which`, and unenrolls its addresses unless
    /// something else still wants them. Returns the announcement removed.
    pub async fn withdraw(&self, key: PodKey, which: Which) -> Option<AnnouncedPod> {
        let shared = self.shared.clone();
        let done = tokio::task::spawn_blocking(move || {
            let mut guard = shared.lock();
            let Guarded { redirector, announced } = &mut *guard;
            let removed = announced.remove(&key, &which)?;
            if let Some(r) = redirector.as_mut() {
                shared.release_unwanted(r, announced, &removed.ips);
            }
            shared.publish(redirector.as_ref(), announced);
            Some(removed)
        })
        .await;
        done.unwrap_or_else(|e| {
            warn!(error = %e, "withdrawal task failed");
            None
        })
    }

    /// The pods announced now.
    pub fn announced(&self) -> Vec<AnnouncedPod> {
        self.shared.announced.borrow().clone()
    }

    /// How many pods are announced now.
    pub fn announced_count(&self) -> usize {
        self.shared.announced.borrow().len()
    }
}

/// What the configuration asks for.
struct Wanted {
    node_name: String,
    uplinks: Vec<String>,
    static_pods: Vec<StaticPod>,
    /// The control-plane source's own readiness: done once its first sync is through.
    synced: Ready,
}

impl Wanted {
    /// True once the control-plane source's first sync is done.
    fn synced(&self) -> bool {
        self.synced.is_ready()
    }

    /// Uplink interfaces, with `*` expanded to every current interface.
    fn uplinks(&self) -> Vec<String> {
        let mut out = Vec::new();
        for u in &self.uplinks {
            if u == "*" {
                match ebpf::routing::interfaces() {
                    Ok(names) => out.extend(names),
                    Err(e) => warn!(error = %e, "cannot list interfaces for uplink *"),
                }
            } else {
                out.push(u.clone());
            }
        }
        out.sort();
        out.dedup();
        out
    }
}

/// Whether ztunnel on `node` captures workload `w`: one of its pods, in the mesh, that does not
/// speak HBONE itself (a waypoint takes its traffic directly).
fn captured(w: &proto::workload::Workload, node: &str) -> bool {
    w.node == node && !w.native_tunnel && w.tunnel_protocol == proto::workload::TunnelProtocol::Hbone as i32
}

/// The workloads xDS wants enrolled: ip -> explicit interface (none: the route decides).
fn desired(wanted: &Wanted, workloads: &ResourceStore<Address>) -> BTreeMap<IpAddr, Option<String>> {
    let mut want: BTreeMap<IpAddr, Option<String>> = BTreeMap::new();
    for name in workloads.names() {
        let Some(Address { r#type: Some(address::Type::Workload(w)) }) = workloads.get(&name) else {
            continue;
        };
        if !captured(&w, &wanted.node_name) {
            continue;
        }
        for bytes in &w.addresses {
            if let Ok(octets) = <[u8; 4]>::try_from(bytes.as_slice()) {
                want.insert(IpAddr::from(octets), None);
            } else if let Ok(octets) = <[u8; 16]>::try_from(bytes.as_slice()) {
                want.insert(std::net::Ipv6Addr::from(octets).to_canonical(), None);
            }
        }
    }
    want
}

async fn reconcile_loop(shared: Arc<Shared>) {
    let mut changes = shared.workloads.subscribe();
    let mut pruned_adopted = false;
    loop {
        let uplinks = shared.wanted.uplinks();
        // Before the first sync only add; after it, drop what adoption brought and is not wanted.
        let synced = shared.wanted.synced();
        let prune_adopted = synced && !pruned_adopted;
        pruned_adopted |= synced;
        let pass = shared.clone();
        // Enrolling runs netlink and `ip`: keep it off the async workers.
        let result = tokio::task::spawn_blocking(move || {
            let shared = pass;
            let mut guard = shared.lock();
            let Guarded { redirector, announced } = &mut *guard;
            let r = redirector.as_mut()?;
            // Computed under the lock: an announcement cannot slip in between.
            let want = shared.want(announced);
            reconcile(r, &want, &uplinks, synced, &shared.metrics);
            if prune_adopted {
                match r.detach_unused(&uplinks) {
                    Ok(0) => {}
                    Ok(n) => info!(n, "detached from interfaces adopted but no longer needed"),
                    Err(e) => {
                        shared.metrics.errors.inc();
                        warn!(error = %e, "cannot detach unused interfaces");
                    }
                }
            }
            shared.publish(Some(r), announced);
            Some(())
        })
        .await;
        match result {
            Ok(None) => return,
            Ok(Some(())) => {}
            Err(e) => warn!(error = %e, "enrollment task failed"),
        }
        // The first sync may complete without a workload change: it wakes the loop too.
        tokio::select! {
            changed = changes.changed() => if changed.is_err() { return },
            _ = shared.wanted.synced.wait(), if !synced => {}
            _ = tokio::time::sleep(RESYNC_INTERVAL) => {}
        }
    }
}

/// One pass: unenroll what is no longer wanted (only once `synced`), enroll what is missing,
/// attach new uplinks.
fn reconcile(
    r: &mut Redirector,
    want: &BTreeMap<IpAddr, Option<String>>,
    uplinks: &[String],
    synced: bool,
    metrics: &RedirectMetrics,
) {
    // One listing per pass (each `ip` call is a process): uplink pruning and the check that an
    // enrolled pod's interface is still there both use it.
    let existing = match ebpf::routing::interfaces() {
        Ok(names) => Some(names),
        Err(e) => {
            warn!(error = %e, "cannot list interfaces");
            None
        }
    };
    if let Some(names) = &existing {
        r.prune_missing_uplinks(names);
    }
    for iface in uplinks {
        if r.is_uplink(iface) {
            continue;
        }
        if let Err(e) = r.attach_uplink(iface) {
            metrics.errors.inc();
            warn!(%iface, error = %e, "cannot attach to uplink; will retry");
        }
    }
    let have: Vec<IpAddr> = if synced { r.enrolled().collect() } else { Vec::new() };
    for ip in have.iter().filter(|ip| !want.contains_key(ip)) {
        if let Err(e) = r.unenroll(*ip) {
            metrics.errors.inc();
            warn!(%ip, error = %e, "unenroll failed");
        }
    }
    for (ip, iface) in want {
        // Enrolled on an interface that still exists: nothing to look up.
        let current = r.interface_of(*ip);
        if iface.is_none()
            && let (Some(current), Some(names)) = (current, &existing)
            && names.iter().any(|n| n == current)
        {
            continue;
        }
        let iface = match iface {
            Some(i) => i.clone(),
            None => match ebpf::interface_for(*ip) {
                Ok(i) => i,
                Err(e) => {
                    metrics.errors.inc();
                    warn!(%ip, error = %e, "cannot find the pod's interface; will retry");
                    continue;
                }
            },
        };
        if let Err(e) = r.enroll(*ip, &iface) {
            metrics.errors.inc();
            warn!(%ip, %iface, error = %e, "enroll failed; will retry");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_this_nodes_mesh_pods_are_captured() {
        use proto::workload::{TunnelProtocol, Workload};
        let w = |node: &str, tunnel: TunnelProtocol, native_tunnel: bool| Workload {
            node: node.into(),
            tunnel_protocol: tunnel as i32,
            native_tunnel,
            ..Default::default()
        };
        assert!(captured(&w("a", TunnelProtocol::Hbone, false), "a"));
        assert!(!captured(&w("b", TunnelProtocol::Hbone, false), "a"), "another node's");
        assert!(!captured(&w("a", TunnelProtocol::Hbone, true), "a"), "a waypoint");
        assert!(!captured(&w("a", TunnelProtocol::None, false), "a"), "not in ambient mode");
        assert!(!captured(&w("a", TunnelProtocol::LegacyIstioMtls, false), "a"), "a sidecar");
    }

    #[test]
    fn static_pods_parse() {
        assert_eq!("10.0.0.1".parse(), Ok(StaticPod { ip: "10.0.0.1".parse().expect("ip"), iface: None }));
        assert_eq!(
            "10.0.0.1@veth1".parse(),
            Ok(StaticPod { ip: "10.0.0.1".parse().expect("ip"), iface: Some("veth1".into()) })
        );
        assert!("10.0.0.1@".parse::<StaticPod>().is_err());
        assert!("pod-a".parse::<StaticPod>().is_err());
    }
}
