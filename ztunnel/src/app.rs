//! Wiring: the control-plane feed into the state, certificates, the proxies, eBPF enrollment
//! (and enrollment at pod creation through the CNI plugin), and the metrics, readiness and
//! admin servers. Returns once everything is bound and spawned.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use common::admin::{Reply, Router};
use common::app::{ServerAddrs, Skeleton, Tasks};
use common::drain::Drain;
use common::hbone::pool::{Pool, PoolConfig, PoolMetrics};
use common::identity::manager::{CaSource, CertMetrics};
use common::identity::{CertificateManager, Identity};
use common::readiness::Ready;
use common::xds::{ResourceStore, XdsMetrics};
use proto::security::Authorization;
use proto::workload::Address;
use tokio::task::JoinHandle;

use crate::cni::Cni;
use crate::config::Config;
use crate::proxy::{self, Bound, Proxy};
use crate::redirect::{Enrollment, NarrowingBlock};
use common::state::State;
use ebpf::Redirector;

/// Readiness task released once the certificates of this node's workloads are in.
const CERTS_TASK: &str = "workload certificates";
/// The condition of narrowing adopted capture that the control plane adds.
const NARROW_AFTER_SYNC: &str = "xds: first sync";

/// A running ztunnel.
pub struct App {
    pub ready: Ready,
    /// Whether capture adopted from a previous ztunnel may be narrowed (see `crate::redirect`):
    /// once the first xDS sync is through and, with enrollment at creation, the announced pods
    /// are held again. Without redirection nothing is adopted, and it has no conditions.
    pub narrowing: Ready,
    /// The indexed mesh state the proxies route on.
    pub state: State,
    pub addresses: Arc<ResourceStore<Address>>,
    pub policies: Arc<ResourceStore<Authorization>>,
    /// Workload certificates, when proxying is on.
    pub certs: Option<CertificateManager>,
    /// Bound addresses of admin, metrics and readiness (useful when configured with port 0).
    pub admin_addr: SocketAddr,
    pub metrics_addr: SocketAddr,
    pub readiness_addr: SocketAddr,
    /// The proxies' listeners, when proxying is on.
    pub proxy_addrs: Option<Bound>,
    /// eBPF enrollment, when redirection is on.
    pub enrollment: Option<Enrollment>,
    /// Enrollment at pod creation (the CNI plugin's socket and the Kubernetes watch), when on.
    pub cni: Option<Cni>,
    drain: Option<Drain>,
    tasks: Tasks,
}

impl Drop for App {
    fn drop(&mut self) {
        // Tasks first: nothing may enroll again once the enrollment is released.
        self.tasks.abort();
        if let Some(e) = &self.enrollment {
            e.release();
        }
    }
}

impl App {
    /// Binds the servers and starts the control-plane feed.
    pub async fn start(config: Config) -> anyhow::Result<Self> {
        let addrs = ServerAddrs {
            admin: config.admin_addr,
            metrics: config.metrics_addr,
            readiness: config.readiness_addr,
        };
        let mut skeleton = Skeleton::bind("ztunnel", addrs).await?;
        let ready = skeleton.ready.clone();
        let registry = &mut skeleton.registry;
        let xds_metrics = XdsMetrics::new(registry);

        let (state, handlers) = State::new(&config.network);
        state.register_metrics(registry);

        // Its conditions exist before anything that could fulfil one (the first sync of a
        // local file is quick) or narrow is spawned.
        let narrowing = Ready::new();
        let mut after_sync = None;
        let mut recovered = None;
        if config.redirect {
            after_sync = Some(NarrowingBlock::register(&narrowing, NARROW_AFTER_SYNC));
            if config.enrollment.is_some() {
                recovered = Some(NarrowingBlock::register(&narrowing, crate::cni::RECOVERED));
            }
        }

        let config_objects = common::xds::ConfigObjects::default();
        let (source, mirror, synced) =
            spawn_source(&config, handlers, &ready, xds_metrics, config_objects.clone());
        let mut tasks = std::mem::take(&mut skeleton.tasks);
        tasks.push_critical("control-plane source", source);
        tasks.push(mirror);
        if let Some(block) = after_sync {
            let synced = synced.clone();
            tasks.push(tokio::spawn(async move {
                synced.wait().await;
                block.done();
            }));
        }
        let drain = Drain::new();
        let mut certs = None;
        let mut listener_sockets = Vec::new();
        // Host mode: the host's processes' connections go to the outbound listener from now on
        // (refused until it listens: never uncaptured).
        let host = match (&config.host, &config.proxy) {
            (Some(h), Some(p)) => {
                let settings = ebpf::HostSettings {
                    pin_dir: config.redirect_settings.pin_dir.clone(),
                    cgroup: h.cgroup.clone(),
                    outbound_port: p.outbound_addr.port(),
                    ztunnel_mark: p.mark,
                    dns_port: config.dns.as_ref().map_or(0, |d| d.addr.port()),
                };
                let capture =
                    Arc::new(ebpf::HostCapture::load(settings).map_err(|e| {
                        anyhow::anyhow!("host capture of {}: {e} ({e:?})", h.cgroup.display())
                    })?);
                // The programs' counters (captured, ztunnel's own, refused, DNS), every 5 s.
                let counters = crate::redirect::KernelCounters::default();
                counters.register(
                    registry.sub_registry_with_prefix("redirect"),
                    "host_connects",
                    "Connects and datagrams of the host's processes as the host capture counted them (kept in \
                     the kernel across restarts), by outcome: host_captured, host_dns, host_own (ztunnel's \
                     own, left alone), host_refused",
                );
                let host = capture.clone();
                tasks.push(tokio::spawn(async move {
                    loop {
                        counters.update(host.stats());
                        tokio::time::sleep(std::time::Duration::from_secs(5)).await;
                    }
                }));
                Some(capture)
            }
            _ => None,
        };
        let proxy_addrs = match &config.proxy {
            Some(proxy_config) => {
                let manager = CertificateManager::new(ca_source(&config)?, CertMetrics::new(registry));
                certs = Some(manager.clone());
                let certs = manager;
                let pool = Pool::new(certs.clone(), PoolConfig::default(), PoolMetrics::new(registry));
                let metrics = proxy::metrics::Metrics::new(registry);
                let proxy = Proxy::new(
                    proxy_config.clone(),
                    state.clone(),
                    pool,
                    certs.clone(),
                    metrics,
                    drain.watch(),
                    synced.clone(),
                    host.clone(),
                );
                let (bound, sockets, proxy_tasks) = proxy.start()?;
                listener_sockets = sockets;
                for t in proxy_tasks {
                    tasks.push_critical("proxy listener", t);
                }
                if let Some(dns) = &config.dns {
                    let resolver =
                        crate::dns::Resolver::new(dns, state.clone(), crate::dns::DnsMetrics::new(registry));
                    for t in crate::dns::start(dns, resolver).await? {
                        tasks.push_critical("DNS proxy", t);
                    }
                }
                let block = ready.register(CERTS_TASK);
                tasks.push(tokio::spawn(prefetch_certificates(
                    state.clone(),
                    certs.clone(),
                    config.node_name.clone(),
                    proxy_config.host_addresses.clone(),
                    ready.clone(),
                    block,
                )));
                Some(bound)
            }
            None => None,
        };
        let enrollment = if config.redirect {
            let mut redirector = Redirector::load(config.redirect_settings.clone())?;
            redirector
                .set_inbound_bypass(&config.inbound_bypass_ports)
                .map_err(|e| anyhow::anyhow!("setting the inbound ports left out of capture: {e}"))?;
            if !listener_sockets.is_empty() {
                // Without it, a SYN meeting a TIME_WAIT socket of ours would be looked up by the
                // kernel on its original port, where a host service might listen: no start.
                redirector.serve_listeners(&listener_sockets).map_err(|e| {
                    anyhow::anyhow!("serving the kernel's listener lookups for enrolled pods: {e}")
                })?;
            }
            let (enrollment, task) = Enrollment::start(
                redirector,
                config.node_name.clone(),
                config.uplinks.clone(),
                host_interfaces(&config)?,
                state.clone(),
                narrowing.clone(),
                registry,
            );
            tasks.extend(task);
            Some(enrollment)
        } else {
            None
        };
        let cni = match (&config.enrollment, &enrollment, recovered) {
            (Some(cni_config), Some(enrollment), Some(recovered)) => {
                // An error fails the start: the app and its tasks go (a dropped `recovered`
                // would keep narrowing postponed anyway).
                let (cni, cni_tasks) = Cni::start(
                    cni_config.clone(),
                    &config.node_name,
                    enrollment.clone(),
                    &ready,
                    recovered,
                    registry,
                )
                .await?;
                tasks.extend(cni_tasks);
                Some(cni)
            }
            (Some(_), _, _) => anyhow::bail!("the enrollment socket needs redirection (--redirect)"),
            (None, _, _) => None,
        };
        let admin_router = admin_routes(
            &config,
            &ready,
            &state,
            certs.clone(),
            Dumped { enrollment: enrollment.clone(), cni: cni.clone(), narrowing: narrowing.clone(), host },
            config_objects,
        );
        skeleton.serve(admin_router);
        tasks.append(&mut skeleton.tasks);
        let ServerAddrs { admin: admin_addr, metrics: metrics_addr, readiness: readiness_addr } =
            skeleton.addrs;
        Ok(Self {
            ready,
            narrowing,
            addresses: state.addresses().clone(),
            policies: state.policies().clone(),
            state,
            certs,
            admin_addr,
            metrics_addr,
            readiness_addr,
            proxy_addrs,
            enrollment,
            cni,
            drain: Some(drain),
            tasks,
        })
    }

    /// Resolves when a task ztunnel cannot do without (its control-plane source, a proxy
    /// listener) ended or panicked before a drain: the binary then exits, to be restarted (the
    /// capture stays pinned and fails closed meanwhile), rather than stay ready on a dead part.
    pub fn failed(&self) -> impl std::future::Future<Output = String> + Send + 'static {
        self.tasks.failed()
    }

    /// Stops accepting, lets open connections run for up to `period`, then closes them.
    /// Returns how many were cut at the end of the period.
    pub async fn drain(&mut self, period: Duration) -> usize {
        match self.drain.take() {
            Some(d) => d.run(period).await,
            None => 0,
        }
    }
}

/// Starts the control-plane source. It reports its first sync (every subscribed type, Address
/// and Authorization, processed once) on a readiness of its own, returned for the proxies (and
/// the narrowing of adopted capture) to wait on; the same pending tasks, by the same names, block
/// the app's readiness until then. Only the source registers on it, before this returns: nothing
/// may register later (the mirror would not name it; other start-up conditions go elsewhere).
fn spawn_source(
    config: &Config,
    handlers: common::xds::Handlers,
    ready: &Ready,
    metrics: XdsMetrics,
    objects: common::xds::ConfigObjects,
) -> (JoinHandle<()>, JoinHandle<()>, Ready) {
    let synced = Ready::new();
    let source = config.source.clone().spawn_reporting(handlers, &synced, metrics, objects);
    let mirrored: Vec<_> = synced.pending().into_iter().map(|name| ready.register(name)).collect();
    let waiter = synced.clone();
    let mirror = tokio::spawn(async move {
        waiter.wait().await;
        drop(mirrored);
    });
    (source, mirror, synced)
}

fn ca_source(config: &Config) -> anyhow::Result<CaSource> {
    let trust_domain = config.proxy.as_ref().map_or(crate::config::DEFAULT_TRUST_DOMAIN, |p| &p.trust_domain);
    config.ca.source(trust_domain, config.cert_lifetime, true).map_err(anyhow::Error::msg)
}

/// Once the first xDS sync is in, holds the certificates of this node's workloads and then
/// releases readiness (naming, until then, the identities still missing and why); afterwards
/// keeps fetching for workloads that arrive, so a first connection never waits on the CA, and
/// drops the certificates of workloads that left.
async fn prefetch_certificates(
    state: State,
    certs: CertificateManager,
    node: String,
    host_addresses: Vec<std::net::IpAddr>,
    ready: Ready,
    block: common::readiness::BlockReady,
) {
    ready.wait_for_others(CERTS_TASK).await;
    let wanted = || -> std::collections::BTreeSet<Identity> {
        let snapshot = state.snapshot();
        // In host mode, the host's workload too (a WorkloadEntry names no node).
        let host = host_addresses.iter().filter_map(|a| snapshot.workload_by_ip(*a));
        snapshot.workloads_on(&node).chain(host).map(|w| w.identity.clone()).collect()
    };
    certs.follow(state.subscribe(), wanted, block).await;
}

/// The explicitly enrolled addresses, with the host's own addresses given without an
/// interface placed on the interface that carries them (routing would name loopback). Not
/// finding it stops the start: the host's inbound would go uncaptured.
fn host_interfaces(config: &Config) -> anyhow::Result<Vec<crate::redirect::StaticPod>> {
    let host: Vec<std::net::IpAddr> =
        config.host.iter().flat_map(|h| h.addresses.iter().map(|a| a.ip)).collect();
    config
        .static_pods
        .iter()
        .map(|p| match (&p.iface, host.contains(&p.ip)) {
            (None, true) => {
                let iface = ebpf::routing::interface_with_address(p.ip)
                    .map_err(|e| anyhow::anyhow!("host address {}: no interface carries it ({e})", p.ip))?;
                tracing::info!(ip = %p.ip, %iface, "host address found on its interface");
                Ok(crate::redirect::StaticPod { ip: p.ip, iface: Some(iface) })
            }
            _ => Ok(p.clone()),
        })
        .collect()
}

/// The enrollment handles the config dump reports on.
struct Dumped {
    enrollment: Option<Enrollment>,
    cni: Option<Cni>,
    narrowing: Ready,
    host: Option<Arc<ebpf::HostCapture>>,
}

fn admin_routes(
    config: &Config,
    ready: &Ready,
    state: &State,
    certs: Option<CertificateManager>,
    dumped: Dumped,
    objects: common::xds::ConfigObjects,
) -> Router {
    let config_json = serde_json::to_value(config).unwrap_or_default();
    let (ready, dump_state) = (ready.clone(), state.clone());
    let router = Router::new().route("/config_dump", move |_| {
        Reply::json(&serde_json::json!({
            "config": config_json,
            "ready": ready.is_ready(),
            "pending": ready.pending(),
            "resources": {
                proto::ADDRESS_TYPE_URL: dump_state.addresses().versions(),
                proto::AUTHORIZATION_TYPE_URL: dump_state.policies().versions(),
            },
            "state": serde_json::to_value(&*dump_state.snapshot()).unwrap_or_default(),
            "redirection": dumped.enrollment.as_ref().map(Enrollment::status),
            // What narrowing of the capture adopted from a previous ztunnel still waits for.
            "narrowing_pending": dumped.enrollment.as_ref().map(|_| dumped.narrowing.pending()),
            // Pods enrolled at creation through the CNI plugin, and the watch behind it.
            "cni": dumped.cni.as_ref().map(Cni::dump),
            // Host mode: where the host's processes are captured, and the programs' counters.
            "host_capture": dumped.host.as_ref().map(|h| serde_json::json!({
                "settings": h.settings(),
                "ztunnel_cgroup": h.ztunnel_cgroup(),
                "stats": h.stats().into_iter().collect::<std::collections::BTreeMap<_, _>>(),
            })),
            // The local config's objects: accepted or refused (field and reason), and which
            // version is in force.
            "config_objects": objects.snapshot(),
        }))
    });
    let router = router.route("/certs", move |_| {
        let summary = certs.as_ref().map(CertificateManager::summary).unwrap_or_default();
        Reply::json(&serde_json::to_value(summary).unwrap_or_default())
    });
    common::admin::memory_routes(router)
}
