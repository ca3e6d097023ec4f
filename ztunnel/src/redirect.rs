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

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use common::readiness::Ready;
use common::xds::ResourceStore;
use ebpf::{Redirector, Status};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use proto::workload::{Address, address};
use tokio::sync::watch;
use tracing::{info, warn};

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

/// The running enrollment: the redirector and its last reported status.
#[derive(Clone)]
pub struct Enrollment {
    /// Taken out on shutdown.
    redirector: Arc<Mutex<Option<Redirector>>>,
    status: watch::Receiver<Status>,
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
        let (tx, status) = watch::channel(redirector.status());
        let redirector = Arc::new(Mutex::new(Some(redirector)));
        let wanted = Wanted { node_name, uplinks, static_pods, synced };
        let task = tokio::spawn(reconcile_loop(redirector.clone(), wanted, workloads, metrics, tx));
        (Self { redirector, status }, task)
    }

    /// What is attached and enrolled now.
    pub fn status(&self) -> Status {
        self.status.borrow().clone()
    }

    /// Waits until `pred` holds for the status (checked after every reconcile).
    pub async fn wait_for(&self, pred: impl Fn(&Status) -> bool) {
        let mut rx = self.status.clone();
        let _ = rx.wait_for(|s| pred(s)).await;
    }

    /// Stops reconciling and lets go of the redirector on shutdown, leaving capture pinned in
    /// the kernel (enrolled pods fail closed until a ztunnel adopts it). Idempotent.
    pub fn release(&self) {
        let taken = self.redirector.lock().unwrap_or_else(PoisonError::into_inner).take();
        if let Some(r) = taken {
            r.release();
        }
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

/// The pods that should be enrolled: ip -> explicit interface (if any).
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
    for p in &wanted.static_pods {
        want.insert(p.ip, p.iface.clone());
    }
    want
}

async fn reconcile_loop(
    redirector: Arc<Mutex<Option<Redirector>>>,
    wanted: Wanted,
    workloads: Arc<ResourceStore<Address>>,
    metrics: RedirectMetrics,
    status: watch::Sender<Status>,
) {
    let mut changes = workloads.subscribe();
    let mut pruned_adopted = false;
    loop {
        let want = desired(&wanted, &workloads);
        let uplinks = wanted.uplinks();
        // Before the first sync only add; after it, drop what adoption brought and is not wanted.
        let synced = wanted.synced();
        let prune_adopted = synced && !pruned_adopted;
        pruned_adopted |= synced;
        let redirector = redirector.clone();
        let metrics_ = metrics.clone();
        // Enrolling runs netlink and `ip`: keep it off the async workers.
        let result = tokio::task::spawn_blocking(move || {
            let mut guard = redirector.lock().unwrap_or_else(PoisonError::into_inner);
            let r = guard.as_mut()?;
            reconcile(r, &want, &uplinks, synced, &metrics_);
            if prune_adopted {
                match r.detach_unused(&uplinks) {
                    Ok(0) => {}
                    Ok(n) => info!(n, "detached from interfaces adopted but no longer needed"),
                    Err(e) => {
                        metrics_.errors.inc();
                        warn!(error = %e, "cannot detach unused interfaces");
                    }
                }
            }
            Some(r.status())
        })
        .await;
        match result {
            Ok(None) => return,
            Ok(Some(now)) => {
                metrics.enrolled.set(now.pods.len() as i64);
                status.send_replace(now);
            }
            Err(e) => warn!(error = %e, "enrollment task failed"),
        }
        // The first sync may complete without a workload change: it wakes the loop too.
        tokio::select! {
            changed = changes.changed() => if changed.is_err() { return },
            _ = wanted.synced.wait(), if !synced => {}
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
