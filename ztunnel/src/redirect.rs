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
//! narrowing is allowed (the `narrowing` readiness): after the first control-plane sync (until
//! then a restarted ztunnel knows no workloads, and unenrolling on that basis would open every
//! pod of the node) and, with enrollment at creation, once the pods announced before the restart
//! are held again (`crate::cni`). Its blocks are [`NarrowingBlock`]s, which postpone narrowing
//! for good when dropped undone; a postponement is warned about and counted every
//! [`NARROWING_OVERDUE`].
//!
//! Pods the CNI plugin announced at creation ([`Enrollment::announce`], see `crate::cni`) are
//! enrolled at once, before xDS may know their workload, and stay wanted until withdrawn. The
//! announcements live under the redirector's lock, so a reconcile pass never sees a pod
//! enrolled without its announcement and unenrolls it; every change is written to the
//! announced pods' file there too ([`Enrollment::persist_to`]), before the ADD is answered.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use common::readiness::{BlockReady, Ready};
use common::state::{State, Tunnel, Workload};
use ebpf::redirector::RedirectError;
use ebpf::{Redirector, Status};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio::sync::watch;
use tracing::{info, warn};

use crate::cni::announced::{Announced, AnnouncedPod, Full, Which};
use crate::cni::persisted;
use crate::cni::pods::PodKey;

/// How often enrollment is re-checked without an update (retries of failed enrollments).
const RESYNC_INTERVAL: Duration = Duration::from_secs(5);
/// How long narrowing of adopted capture may stay postponed before that is warned about and
/// counted (and again after each further period); it goes on waiting.
pub const NARROWING_OVERDUE: Duration = Duration::from_secs(30);

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
    narrowing_overdue: Counter,
    file_errors: Counter,
    /// The capture program's own counters (captured, followed, and each reason of a drop), as
    /// the kernel keeps them in the pinned map: brought up to the kernel's totals on every
    /// status publication.
    packets: KernelCounters,
}

/// Counters mirrored from counters the kernel keeps (monotonic, pinned across restarts): each
/// update adds what the kernel counted since the last one.
#[derive(Clone, Debug, Default)]
pub struct KernelCounters {
    family: prometheus_client::metrics::family::Family<OutcomeLabels, Counter>,
    seen: Arc<Mutex<BTreeMap<&'static str, u64>>>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet)]
struct OutcomeLabels {
    outcome: &'static str,
}

impl KernelCounters {
    pub fn register(&self, registry: &mut Registry, name: &str, help: &str) {
        registry.register(name, help, self.family.clone());
    }

    /// Brings each counter up to the kernel's `totals`.
    pub fn update(&self, totals: impl IntoIterator<Item = (&'static str, u64)>) {
        let mut seen = self.seen.lock().unwrap_or_else(PoisonError::into_inner);
        for (outcome, total) in totals {
            let before = seen.insert(outcome, total).unwrap_or(0);
            if total > before {
                self.family.get_or_create(&OutcomeLabels { outcome }).inc_by(total - before);
            }
        }
    }
}

/// The redirector and the pods the CNI plugin announced, under one lock.
struct Guarded {
    /// Taken out on shutdown.
    redirector: Option<Redirector>,
    announced: Announced,
    /// Where the announced pods are kept across restarts, once enabled.
    file: Option<AnnouncedFile>,
}

/// The announced pods' file and whether its last write failed (retried on every pass).
struct AnnouncedFile {
    path: PathBuf,
    stale: bool,
}

/// A condition of narrowing (see the module doc): done when [`Self::done`] is called. Unlike a
/// plain [`BlockReady`], dropping it undone (its task aborted or failed) never allows narrowing:
/// that stays postponed (fail closed), as the drop logs and the overdue warnings repeat.
#[derive(Debug)]
pub struct NarrowingBlock {
    block: Option<BlockReady>,
}

impl NarrowingBlock {
    /// Registers `name` as a condition of `narrowing`.
    pub fn register(narrowing: &Ready, name: &str) -> Self {
        Self { block: Some(narrowing.register(name)) }
    }

    /// Says what the condition still waits for (shown with the pending conditions).
    pub fn set_detail(&self, detail: Option<String>) {
        if let Some(b) = &self.block {
            b.set_detail(detail);
        }
    }

    pub fn done(mut self) {
        if let Some(b) = self.block.take() {
            b.done();
        }
    }
}

impl Drop for NarrowingBlock {
    fn drop(&mut self) {
        if let Some(b) = self.block.take() {
            warn!("a condition of narrowing adopted capture was abandoned: narrowing stays postponed");
            b.set_detail(Some("abandoned: narrowing stays postponed".into()));
            // Dropping the guard would release it (and allow narrowing): keep it pending. This
            // leaks the guard (a name and a handle), at most once per condition.
            std::mem::forget(b);
        }
    }
}

/// What the reconcile loop and the handles share.
struct Shared {
    guarded: Mutex<Guarded>,
    wanted: Wanted,
    workloads: State,
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

    /// Publishes the announced pods (writing them to the file when they changed or its last
    /// write failed), then the status: whoever sees the status change sees the announcements
    /// behind it.
    fn publish(&self, r: Option<&Redirector>, announced: &Announced, file: &mut Option<AnnouncedFile>) {
        let now = announced.list();
        let changed = self.announced.send_if_modified(|seen| {
            let changed = *seen != now;
            if changed {
                seen.clone_from(&now);
            }
            changed
        });
        if let Some(file) = file.as_mut().filter(|f| changed || f.stale) {
            match persisted::save(&file.path, &now) {
                Ok(()) => file.stale = false,
                Err(e) => {
                    file.stale = true;
                    self.metrics.file_errors.inc();
                    let path = file.path.display();
                    warn!(%path, error = %e, "cannot write the announced pods' file (retried)");
                }
            }
        }
        if let Some(r) = r {
            let now = r.status();
            self.metrics.packets.update(now.stats.iter().map(|(k, v)| (*k, *v)));
            self.metrics.enrolled.set(now.pods.len() as i64);
            self.status.send_replace(now);
        }
    }

    /// Enrolls an announced pod and commits its announcement (see [`Enrollment::announce`]);
    /// with `only_if_absent`, does nothing (false) when the pod or one of its addresses is
    /// announced already.
    fn announce(
        &self,
        guarded: &mut Guarded,
        pod: AnnouncedPod,
        only_if_absent: bool,
    ) -> Result<bool, AnnounceError> {
        let Guarded { redirector, announced, file } = guarded;
        let r = redirector.as_mut().ok_or(AnnounceError::ShuttingDown)?;
        if only_if_absent && !announced.is_absent(&pod) {
            return Ok(false);
        }
        // Computed on a copy and committed once enrolled: a failure leaves every announcement
        // (this pod's previous one too) as it was.
        let mut next = announced.clone();
        let replaced = next.insert(pod.clone())?;
        // Before the pod is enrolled: its first query must not be captured if it opted out.
        self.sync_dns_bypass(r, &next);
        let before: Vec<(IpAddr, Option<String>)> =
            pod.ips.iter().map(|ip| (*ip, r.interface_of(*ip).map(String::from))).collect();
        for ip in &pod.ips {
            if let Err(source) = r.enroll(*ip, &pod.interface) {
                self.metrics.errors.inc();
                self.roll_back(r, &before);
                self.publish(Some(r), announced, file);
                return Err(AnnounceError::Enroll {
                    ip: *ip,
                    iface: pod.interface.clone(),
                    source: Box::new(source),
                });
            }
        }
        *announced = next;
        // A new sandbox of the same pod: what only the old one had goes.
        if let Some(old) = replaced {
            self.release_unwanted(r, announced, &old.ips);
        }
        self.publish(Some(r), announced, file);
        Ok(true)
    }

    /// Puts the capture of these addresses back as it was before an enrollment that failed
    /// half way (an address captured before stays captured, on its interface).
    fn roll_back(&self, r: &mut Redirector, before: &[(IpAddr, Option<String>)]) {
        for (ip, iface) in before {
            let undone = match iface {
                None => r.unenroll(*ip).map(|_| ()),
                Some(iface) if r.interface_of(*ip) != Some(iface.as_str()) => r.enroll(*ip, iface),
                Some(_) => Ok(()),
            };
            if let Err(e) = undone {
                self.metrics.errors.inc();
                warn!(%ip, error = %e, "cannot undo a failed enrollment; the reconcile loop retries");
            }
        }
    }

    /// Makes the pods' DNS bypass (`ambient.istio.io/bypass-dns-capture`) that of the announced
    /// pods in `announced`; before narrowing is allowed it only adds (what a previous ztunnel
    /// set stays until the pods are known again). A failure is counted and retried by the next
    /// pass; meanwhile the pod's DNS is captured, as for any pod.
    fn sync_dns_bypass(&self, r: &mut Redirector, announced: &Announced) {
        let mut want = announced.dns_bypass();
        if !self.wanted.may_narrow() {
            want.extend(r.dns_bypassed());
        }
        if let Err(e) = r.set_dns_bypass(&want) {
            self.metrics.errors.inc();
            warn!(error = %e, "cannot update the pods whose DNS capture is bypassed (retried)");
        }
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
    /// Starts reconciling `workloads` into `redirector` for `node_name`, narrowing adopted
    /// capture only once `narrowing` is ready (see the module doc); returns the handle and the
    /// tasks (the reconcile loop, and the one warning while narrowing is overdue).
    pub fn start(
        redirector: Redirector,
        node_name: String,
        uplinks: Vec<String>,
        static_pods: Vec<StaticPod>,
        workloads: State,
        narrowing: Ready,
        registry: &mut Registry,
    ) -> (Self, Vec<tokio::task::JoinHandle<()>>) {
        let metrics = RedirectMetrics::default();
        let r = registry.sub_registry_with_prefix("redirect");
        r.register("enrolled_pods", "Pods whose traffic is redirected to ztunnel", metrics.enrolled.clone());
        r.register("enroll_errors", "Failed pod enrollments (retried)", metrics.errors.clone());
        metrics.packets.register(
            r,
            "packets",
            "Packets of enrolled pods as the capture program counted them (kept in the kernel across \
             restarts), by outcome: captured_*, followed_socket, or the reason of a drop (dropped_*, \
             assign_failed)",
        );
        r.register(
            "narrowing_overdue",
            "Times the narrowing of capture adopted from a previous ztunnel was still postponed after \
             another 30 s (its pods stay captured meanwhile)",
            metrics.narrowing_overdue.clone(),
        );
        r.register(
            "announced_file_errors",
            "Failed writes of the announced pods' file (retried; a restart meanwhile may forget the last \
             changes)",
            metrics.file_errors.clone(),
        );
        let (status, _) = watch::channel(redirector.status());
        let overdue = tokio::spawn(warn_while_postponed(
            narrowing.clone(),
            metrics.narrowing_overdue.clone(),
            NARROWING_OVERDUE,
        ));
        let shared = Arc::new(Shared {
            guarded: Mutex::new(Guarded {
                redirector: Some(redirector),
                announced: Announced::default(),
                file: None,
            }),
            wanted: Wanted { node_name, uplinks, static_pods, narrowing },
            workloads,
            metrics,
            status,
            announced: watch::channel(Vec::new()).0,
        });
        let task = tokio::spawn(reconcile_loop(shared.clone()));
        (Self { shared }, vec![task, overdue])
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
    /// keeps them enrolled (whatever xDS says) until [`Self::withdraw`]; replaces the pod's
    /// previous announcement. On failure the announcements and the capture of the pod's
    /// addresses stay as they were.
    pub async fn announce(&self, pod: AnnouncedPod) -> Result<(), AnnounceError> {
        self.announce_with(pod, false).await.map(|_| ())
    }

    /// As [`Self::announce`] (after a restart), but only when neither the pod nor any of its
    /// addresses is announced: checked and committed under the lock, so it never replaces an
    /// announcement made meanwhile (a new sandbox's ADD). Returns whether it announced.
    pub async fn announce_if_absent(&self, pod: AnnouncedPod) -> Result<bool, AnnounceError> {
        self.announce_with(pod, true).await
    }

    async fn announce_with(&self, pod: AnnouncedPod, only_if_absent: bool) -> Result<bool, AnnounceError> {
        let shared = self.shared.clone();
        // Enrolling runs netlink and `ip`: off the async workers.
        tokio::task::spawn_blocking(move || shared.announce(&mut shared.lock(), pod, only_if_absent))
            .await
            .map_err(|e| AnnounceError::Task(e.to_string()))?
    }

    /// Keeps the announced pods in the file at `path` from now on (written now, then on every
    /// change, before the change is reported done).
    pub async fn persist_to(&self, path: PathBuf) {
        let shared = self.shared.clone();
        let done = tokio::task::spawn_blocking(move || {
            let mut guard = shared.lock();
            let Guarded { redirector, announced, file } = &mut *guard;
            *file = Some(AnnouncedFile { path, stale: true });
            shared.publish(redirector.as_ref(), announced, file);
        })
        .await;
        if let Err(e) = done {
            warn!(error = %e, "enabling the announced pods' file failed");
        }
    }

    /// Forgets the pod's announcement if it is `which`, and unenrolls its addresses unless
    /// something else still wants them. Returns the announcement removed.
    pub async fn withdraw(&self, key: PodKey, which: Which) -> Option<AnnouncedPod> {
        let shared = self.shared.clone();
        let done = tokio::task::spawn_blocking(move || {
            let mut guard = shared.lock();
            let Guarded { redirector, announced, file } = &mut *guard;
            let removed = announced.remove(&key, &which)?;
            if let Some(r) = redirector.as_mut() {
                shared.release_unwanted(r, announced, &removed.ips);
                shared.sync_dns_bypass(r, announced);
            }
            shared.publish(redirector.as_ref(), announced, file);
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
    /// Done once adopted capture may be narrowed (see the module doc).
    narrowing: Ready,
}

impl Wanted {
    /// True once adopted capture may be narrowed.
    fn may_narrow(&self) -> bool {
        self.narrowing.is_ready()
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
fn captured(w: &Workload, node: &str) -> bool {
    w.node == node && !w.native_tunnel && w.tunnel == Tunnel::Hbone
}

/// The workloads xDS wants enrolled: ip -> explicit interface (none: the route decides). Read
/// from the state's index of this node's workloads: a push elsewhere in the mesh costs nothing
/// here.
fn desired(wanted: &Wanted, workloads: &State) -> BTreeMap<IpAddr, Option<String>> {
    let snapshot = workloads.snapshot();
    snapshot
        .workloads_on(&wanted.node_name)
        .filter(|w| captured(w, &wanted.node_name))
        .flat_map(|w| w.addresses.iter().map(|ip| (ip.to_canonical(), None)))
        .collect()
}

async fn reconcile_loop(shared: Arc<Shared>) {
    let mut changes = shared.workloads.subscribe();
    let mut pruned_adopted = false;
    loop {
        let uplinks = shared.wanted.uplinks();
        // Before narrowing is allowed only add; then drop what adoption brought and is not wanted.
        let may_narrow = shared.wanted.may_narrow();
        let prune_adopted = may_narrow && !pruned_adopted;
        pruned_adopted |= may_narrow;
        let pass = shared.clone();
        // Enrolling runs netlink and `ip`: keep it off the async workers.
        let result = tokio::task::spawn_blocking(move || {
            let shared = pass;
            let mut guard = shared.lock();
            let Guarded { redirector, announced, file } = &mut *guard;
            let r = redirector.as_mut()?;
            // Computed under the lock: an announcement cannot slip in between.
            let want = shared.want(announced);
            shared.sync_dns_bypass(r, announced);
            reconcile(r, &want, &uplinks, may_narrow, &shared.metrics);
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
            shared.publish(Some(r), announced, file);
            Some(())
        })
        .await;
        match result {
            Ok(None) => return,
            Ok(Some(())) => {}
            Err(e) => warn!(error = %e, "enrollment task failed"),
        }
        // Narrowing may be allowed without a workload change: that wakes the loop too.
        tokio::select! {
            changed = changes.changed() => if changed.is_err() { return },
            _ = shared.wanted.narrowing.wait(), if !may_narrow => {}
            _ = tokio::time::sleep(RESYNC_INTERVAL) => {}
        }
    }
}

/// Warns (and counts) every `every` while narrowing is postponed, until it is allowed.
async fn warn_while_postponed(narrowing: Ready, overdue: Counter, every: Duration) {
    let mut waited = Duration::ZERO;
    while tokio::time::timeout(every, narrowing.wait()).await.is_err() {
        waited += every;
        overdue.inc();
        warn!(
            waited_s = waited.as_secs(),
            pending = ?narrowing.pending(),
            "adopted capture not narrowed yet: its pods stay captured until these are done"
        );
    }
}

/// One pass: unenroll what is no longer wanted (only once narrowing is allowed), enroll what
/// is missing, attach new uplinks.
fn reconcile(
    r: &mut Redirector,
    want: &BTreeMap<IpAddr, Option<String>>,
    uplinks: &[String],
    may_narrow: bool,
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
    let have: Vec<IpAddr> = if may_narrow { r.enrolled().collect() } else { Vec::new() };
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
        use proto::workload::TunnelProtocol;
        let w = |node: &str, tunnel: TunnelProtocol, native_tunnel: bool| {
            let w = proto::workload::Workload {
                uid: "u".into(),
                name: "p".into(),
                namespace: "ns".into(),
                node: node.into(),
                tunnel_protocol: tunnel as i32,
                native_tunnel,
                ..Default::default()
            };
            Workload::from_proto(&w).expect("converts")
        };
        assert!(captured(&w("a", TunnelProtocol::Hbone, false), "a"));
        assert!(!captured(&w("b", TunnelProtocol::Hbone, false), "a"), "another node's");
        assert!(!captured(&w("a", TunnelProtocol::Hbone, true), "a"), "a waypoint");
        assert!(!captured(&w("a", TunnelProtocol::None, false), "a"), "not in ambient mode");
        assert!(!captured(&w("a", TunnelProtocol::LegacyIstioMtls, false), "a"), "a sidecar");
    }

    #[tokio::test]
    async fn a_postponed_narrowing_is_warned_about_until_allowed() {
        let narrowing = Ready::new();
        let block = NarrowingBlock::register(&narrowing, "recovery");
        let overdue = Counter::default();
        let every = Duration::from_millis(100);
        let task = tokio::spawn(warn_while_postponed(narrowing.clone(), overdue.clone(), every));
        tokio::time::sleep(every * 2 + every / 2).await;
        assert!(overdue.get() >= 2, "counted once per period: {}", overdue.get());
        block.done();
        tokio::time::timeout(Duration::from_secs(5), task).await.expect("ends once allowed").expect("join");
        assert!(narrowing.is_ready());
    }

    #[test]
    fn an_abandoned_narrowing_block_keeps_narrowing_postponed() {
        let narrowing = Ready::new();
        let sync = NarrowingBlock::register(&narrowing, "xds");
        let recovery = NarrowingBlock::register(&narrowing, "recovery");
        drop(recovery);
        sync.done();
        assert!(!narrowing.is_ready(), "a dropped condition must not allow narrowing");
        assert_eq!(narrowing.pending(), vec!["recovery: abandoned: narrowing stays postponed".to_string()]);
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
