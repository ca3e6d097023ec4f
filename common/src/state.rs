//! The indexed view of the mesh that proxies route on: workloads by UID and address, services by
//! VIP and `namespace/hostname`, endpoints per service, waypoints, and policies by scope.
//!
//! The xDS handlers are the only writers: each applied batch goes into the raw
//! [`ResourceStore`]s (validation, versions) and then a new immutable [`Snapshot`] is built and
//! swapped in. Proxies take the current snapshot (one `Arc` clone under a short read lock) and
//! ask it narrow questions; they never see the raw maps.
//!
//! Policy fails closed, as Istio's does for what it cannot apply: an Authorization rejected on
//! receipt is still NACKed, but is held in its fail-safe form (an ALLOW matching nothing, a
//! DENY matching everything in its scope) instead of the previous version or nothing; and a
//! workload that names a policy the state does not hold is reported by
//! [`Snapshot::missing_policies`] so that it is not reached while the policy is missing.

pub mod policy;
pub mod workload;

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, PoisonError, RwLock};

use crate::identity::Identity;
use crate::select;
use crate::xds::handler::RawResource;
use crate::xds::{Handler, Handlers, Rejection, ResourceStore, XdsUpdate, validate};
use proto::security::Authorization;
use proto::workload::{Address, address};
use serde::Serialize;
use tokio::sync::watch;
use tracing::warn;

pub use policy::{Action, FailSafe, Policy, Scope};
pub use workload::{Gateway, GatewayTarget, Port, Service, Tunnel, Workload};

/// Rejects what the store would accept but ztunnel cannot route on.
fn check_address(name: &str, a: &Address) -> Result<(), String> {
    validate::address(name, a)?;
    match &a.r#type {
        Some(address::Type::Workload(w)) => Workload::from_proto(w).map(drop),
        Some(address::Type::Service(s)) => Service::from_proto(s).map(drop),
        None => Ok(()),
    }
}

fn check_authorization(name: &str, a: &Authorization) -> Result<(), String> {
    validate::authorization(name, a)?;
    Policy::from_proto(a).map(drop)
}

/// A service backend: a workload and the ports it serves the service on.
#[derive(Clone, Debug, Serialize)]
pub struct Endpoint {
    #[serde(rename = "workload", serialize_with = "uid_of")]
    pub workload: Arc<Workload>,
    pub ports: Vec<Port>,
}

fn uid_of<S: serde::Serializer>(w: &Arc<Workload>, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&w.uid)
}

impl Endpoint {
    /// The port this endpoint listens on for `service_port`: its own mapping, else the
    /// service's, else the service port itself.
    pub fn target_port(&self, service: &Service, service_port: u16) -> Option<u16> {
        let own = self.ports.iter().find(|p| p.service_port == service_port).map(|p| p.target_port);
        let declared = service.port(service_port).map(|p| p.target_port);
        if own.is_none() && declared.is_none() && !self.ports.is_empty() {
            return None;
        }
        [own, declared].into_iter().flatten().find(|p| *p != 0).or(Some(service_port))
    }
}

/// One immutable view of the mesh.
#[derive(Debug, Default, Serialize)]
pub struct Snapshot {
    /// By UID.
    workloads: BTreeMap<String, Arc<Workload>>,
    #[serde(skip)]
    workloads_by_ip: HashMap<(String, IpAddr), Arc<Workload>>,
    /// The same, for our own network only: per-connection lookups allocate nothing.
    #[serde(skip)]
    local_workloads: HashMap<IpAddr, Arc<Workload>>,
    /// By `namespace/hostname`.
    services: BTreeMap<String, Arc<Service>>,
    #[serde(skip)]
    services_by_vip: HashMap<(String, IpAddr), Arc<Service>>,
    #[serde(skip)]
    local_services: HashMap<IpAddr, Arc<Service>>,
    /// Service `namespace/hostname` -> its endpoints.
    endpoints: BTreeMap<String, Vec<Endpoint>>,
    /// By `namespace/name`.
    policies: BTreeMap<String, Arc<Policy>>,
    #[serde(skip)]
    global_policies: Vec<Arc<Policy>>,
    #[serde(skip)]
    namespace_policies: HashMap<String, Vec<Arc<Policy>>>,
    /// Policies held in their fail-safe form (by `namespace/name`), and why they were rejected.
    failsafe_policies: BTreeMap<String, String>,
    /// The network this ztunnel is on (addresses are looked up in it).
    #[serde(skip)]
    network: String,
}

/// What an original destination address is.
#[derive(Clone, Debug)]
pub enum Target {
    Service(Arc<Service>),
    Workload(Arc<Workload>),
    Unknown,
}

/// Why no endpoint could be picked.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PickError {
    #[error("service {service} has no port {port}")]
    NoSuchPort { service: String, port: u16 },
    #[error("service {service} has no healthy endpoint for port {port}")]
    NoHealthyEndpoint { service: String, port: u16 },
}

impl Snapshot {
    fn build(
        network: &str,
        addresses: Vec<(String, Address)>,
        policies: Vec<(String, Authorization)>,
        failsafe: Vec<(String, FailSafe)>,
    ) -> Self {
        let mut s = Snapshot { network: network.to_string(), ..Default::default() };
        for (name, a) in addresses {
            let converted = match &a.r#type {
                Some(address::Type::Workload(w)) => {
                    Workload::from_proto(w).map(|w| s.add_workload(Arc::new(w)))
                }
                Some(address::Type::Service(svc)) => {
                    Service::from_proto(svc).map(|svc| s.add_service(Arc::new(svc)))
                }
                None => Ok(()),
            };
            if let Err(reason) = converted {
                // The store's validator runs the same conversion; this cannot happen for a
                // resource it accepted.
                warn!(resource = %name, %reason, "skipping address that does not convert");
            }
        }
        // A stand-in replaces whatever version of the same resource was accepted before.
        let replaced: std::collections::HashSet<&str> =
            failsafe.iter().map(|(name, _)| name.as_str()).collect();
        for (name, p) in policies.iter().filter(|(name, _)| !replaced.contains(name.as_str())) {
            match Policy::from_proto(p) {
                Ok(p) => s.add_policy(Arc::new(p)),
                Err(reason) => warn!(resource = %name, %reason, "skipping policy that does not convert"),
            }
        }
        for (_, f) in failsafe {
            s.failsafe_policies.insert(f.policy.key(), f.reason);
            s.add_policy(f.policy);
        }
        s
    }

    fn add_workload(&mut self, w: Arc<Workload>) {
        for ip in &w.addresses {
            self.workloads_by_ip.insert((w.network.clone(), *ip), w.clone());
            if w.network == self.network {
                self.local_workloads.insert(*ip, w.clone());
            }
        }
        for (service, ports) in &w.services {
            self.endpoints
                .entry(service.clone())
                .or_default()
                .push(Endpoint { workload: w.clone(), ports: ports.clone() });
        }
        self.workloads.insert(w.uid.clone(), w);
    }

    fn add_service(&mut self, svc: Arc<Service>) {
        for vip in &svc.vips {
            self.services_by_vip.insert(vip.clone(), svc.clone());
            if vip.0 == self.network {
                self.local_services.insert(vip.1, svc.clone());
            }
        }
        self.services.insert(svc.key(), svc);
    }

    fn add_policy(&mut self, p: Arc<Policy>) {
        match p.scope {
            Scope::Global => self.global_policies.push(p.clone()),
            Scope::Namespace => {
                self.namespace_policies.entry(p.namespace.clone()).or_default().push(p.clone())
            }
            Scope::WorkloadSelector => {}
        }
        self.policies.insert(p.key(), p);
    }

    /// The workload with this address on our network.
    pub fn workload_by_ip(&self, ip: IpAddr) -> Option<&Arc<Workload>> {
        self.local_workloads.get(&ip)
    }

    pub fn workload_by_uid(&self, uid: &str) -> Option<&Arc<Workload>> {
        self.workloads.get(uid)
    }

    pub fn service_by_vip(&self, ip: IpAddr) -> Option<&Arc<Service>> {
        self.local_services.get(&ip)
    }

    pub fn service(&self, namespace: &str, hostname: &str) -> Option<&Arc<Service>> {
        self.services.get(&format!("{namespace}/{hostname}"))
    }

    /// What `dst` (an original destination) is: a service VIP, a workload, or neither.
    pub fn lookup_destination(&self, dst: SocketAddr) -> Target {
        if let Some(svc) = self.service_by_vip(dst.ip()) {
            return Target::Service(svc.clone());
        }
        match self.workload_by_ip(dst.ip()) {
            Some(w) => Target::Workload(w.clone()),
            None => Target::Unknown,
        }
    }

    pub fn endpoints(&self, service: &Service) -> &[Endpoint] {
        self.endpoints.get(&service.key()).map_or(&[], Vec::as_slice)
    }

    /// The network this view is of (only its endpoints are reachable directly).
    pub fn network(&self) -> &str {
        &self.network
    }

    /// Picks an endpoint of `service` for `port` at random among those [`crate::select`]
    /// allows for a client `near` (health, network, locality preference), with an address of
    /// `family` when it has one. Returns the endpoint and the address (target port) to dial.
    pub fn pick_endpoint(
        &self,
        service: &Service,
        port: u16,
        near: Option<&Workload>,
        family: select::Family,
    ) -> Result<(Endpoint, SocketAddr), PickError> {
        let ask = select::Ask {
            service,
            port: Some(port),
            network: &self.network,
            near,
            family,
            same_node_first: false,
        };
        let candidates = select::candidates(self.endpoints(service), &ask)?;
        let chosen = select::choose(&candidates, select::Balance::Random, |_| false, || 0, |_| 0)
            .ok_or_else(|| PickError::NoHealthyEndpoint { service: service.key(), port })?;
        Ok((chosen.endpoint.clone(), chosen.addr))
    }

    /// The waypoint `gateway` designates: its HBONE address and the identity it must prove. A
    /// waypoint named by hostname is one of its service's endpoints ([`crate::select`]: on our
    /// network, healthy, the client's node first, then at random).
    pub fn resolve_gateway(
        &self,
        gateway: &Gateway,
        near: Option<&Workload>,
    ) -> Option<(SocketAddr, Identity)> {
        match &gateway.target {
            GatewayTarget::Address { network, ip } => {
                let w = self.workloads_by_ip.get(&(network.clone(), *ip))?;
                Some((SocketAddr::new(*ip, gateway.hbone_port), w.identity.clone()))
            }
            GatewayTarget::Hostname { namespace, hostname } => {
                let svc = self.service(namespace, hostname)?;
                let ask = select::Ask {
                    service: svc,
                    port: None,
                    network: &self.network,
                    near,
                    family: select::Family::Any,
                    same_node_first: true,
                };
                let candidates = select::candidates(self.endpoints(svc), &ask).ok()?;
                let c = select::choose(&candidates, select::Balance::Random, |_| false, || 0, |_| 0)?;
                Some((SocketAddr::new(c.addr.ip(), gateway.hbone_port), c.endpoint.workload.identity.clone()))
            }
        }
    }

    /// Policies that apply to `w`: global ones, its namespace's, and those selecting it. Those
    /// it names that are not held are left out: see [`Snapshot::missing_policies`].
    pub fn policies_for(&self, w: &Workload) -> Vec<Arc<Policy>> {
        let mut out = self.global_policies.clone();
        if let Some(ns) = self.namespace_policies.get(&w.namespace) {
            out.extend(ns.iter().cloned());
        }
        out.extend(
            w.authorization_policies
                .iter()
                .filter_map(|name| self.policies.get(name))
                .filter(|p| p.scope == Scope::WorkloadSelector)
                .cloned(),
        );
        out
    }

    /// The policies `w` names (`namespace/name`) that are not held. While one is missing, the
    /// policies of `w` are not known in full, so nothing may reach it (fail closed).
    pub fn missing_policies<'a>(&'a self, w: &'a Workload) -> impl Iterator<Item = &'a str> + 'a {
        w.authorization_policies.iter().map(String::as_str).filter(|name| !self.policies.contains_key(*name))
    }

    /// Why the policy `key` (`namespace/name`) is held in its fail-safe form, if it is.
    pub fn failsafe_reason(&self, key: &str) -> Option<&str> {
        self.failsafe_policies.get(key).map(String::as_str)
    }

    /// Workloads scheduled on `node`.
    pub fn workloads_on<'a>(&'a self, node: &'a str) -> impl Iterator<Item = &'a Arc<Workload>> + 'a {
        self.workloads.values().filter(move |w| w.node == node)
    }

    /// The service a workload address belongs to, for telemetry (the first one it backs).
    pub fn service_of(&self, w: &Workload) -> Option<&Arc<Service>> {
        w.services.keys().find_map(|k| self.services.get(k))
    }
}

struct Inner {
    network: String,
    addresses: Arc<ResourceStore<Address>>,
    policies: Arc<ResourceStore<Authorization>>,
    /// Rejected Authorizations held in their fail-safe form, by resource name.
    failsafe: policy::FailSafeSet,
    current: RwLock<Arc<Snapshot>>,
    changed: watch::Sender<u64>,
}

/// The read handle proxies hold. Cheap to clone.
#[derive(Clone)]
pub struct State {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for State {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = self.snapshot();
        f.debug_struct("State")
            .field("workloads", &s.workloads.len())
            .field("services", &s.services.len())
            .field("policies", &s.policies.len())
            .finish()
    }
}

impl State {
    /// An empty state for `network`, and the handlers that feed it (register them with the
    /// xDS client or the file source).
    pub fn new(network: &str) -> (Self, Handlers) {
        let inner = Arc::new(Inner {
            network: network.to_string(),
            addresses: ResourceStore::new(check_address),
            policies: ResourceStore::new(check_authorization),
            failsafe: policy::FailSafeSet::default(),
            current: RwLock::new(Arc::new(Snapshot { network: network.to_string(), ..Default::default() })),
            changed: watch::channel(0).0,
        });
        let state = Self { inner };
        let mut handlers = Handlers::new();
        handlers.add::<Address, _>(proto::ADDRESS_TYPE_URL, Feed(state.clone()));
        handlers.add::<Authorization, _>(proto::AUTHORIZATION_TYPE_URL, Feed(state.clone()));
        (state, handlers)
    }

    /// The current view.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.inner.current.read().unwrap_or_else(PoisonError::into_inner).clone()
    }

    /// The raw address resources as received (for enrollment and the config dump).
    pub fn addresses(&self) -> &Arc<ResourceStore<Address>> {
        &self.inner.addresses
    }

    pub fn policies(&self) -> &Arc<ResourceStore<Authorization>> {
        &self.inner.policies
    }

    /// Registers the state's own metrics (policies held fail-safe) in `registry`.
    pub fn register_metrics(&self, registry: &mut prometheus_client::registry::Registry) {
        self.inner.failsafe.register(registry);
    }

    /// A receiver that changes after every new snapshot.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.inner.changed.subscribe()
    }

    /// Waits until `pred` holds for the current snapshot.
    pub async fn wait_for(&self, pred: impl Fn(&Snapshot) -> bool) {
        let mut rx = self.subscribe();
        while !pred(&self.snapshot()) {
            if rx.changed().await.is_err() {
                return;
            }
        }
    }

    fn rebuild(&self) {
        let snapshot = Snapshot::build(
            &self.inner.network,
            self.inner.addresses.entries(),
            self.inner.policies.entries(),
            self.inner.failsafe.entries(),
        );
        *self.inner.current.write().unwrap_or_else(PoisonError::into_inner) = Arc::new(snapshot);
        self.inner.changed.send_modify(|n| *n += 1);
    }
}

/// The handler feeding [`State`]: applies to the raw store, then rebuilds the snapshot.
struct Feed(State);

impl Handler<Address> for Feed {
    fn handle(&self, updates: Vec<XdsUpdate<Address>>) -> Vec<Rejection> {
        let rejected = self.0.inner.addresses.handle(updates);
        self.0.rebuild();
        rejected
    }
}

/// Authorizations fail closed: one that is rejected is still NACKed, and held in its fail-safe
/// form in place of any earlier version; one accepted or removed takes its stand-in out.
impl Handler<Authorization> for Feed {
    fn handle(&self, updates: Vec<XdsUpdate<Authorization>>) -> Vec<Rejection> {
        let inner = &self.0.inner;
        let mut rejected = Vec::new();
        let mut apply = Vec::with_capacity(updates.len());
        for update in updates {
            match update {
                XdsUpdate::Update(r) => match check_authorization(&r.name, &r.resource) {
                    Ok(()) => {
                        inner.failsafe.clear(&r.name);
                        apply.push(XdsUpdate::Update(r));
                    }
                    Err(reason) => {
                        inner.failsafe.hold(&r.name, &r.resource, &reason);
                        rejected.push(Rejection::new(r.name, reason));
                    }
                },
                XdsUpdate::Remove(name) => {
                    inner.failsafe.clear(&name);
                    apply.push(XdsUpdate::Remove(name));
                }
            }
        }
        rejected.extend(inner.policies.handle(apply));
        self.0.rebuild();
        rejected
    }

    /// A body that does not decode as a whole may still carry a readable name, scope and action.
    fn undecodable(&self, raw: &RawResource, reason: &str) {
        let readable = raw
            .body
            .as_ref()
            .filter(|b| b.type_url == proto::AUTHORIZATION_TYPE_URL)
            .and_then(|b| policy::AuthorizationHeader::read(&b.value));
        match readable {
            Some(a) => {
                self.0.inner.failsafe.hold(&raw.name, &a, reason);
            }
            None => warn!(
                resource = %raw.name,
                %reason,
                "Authorization cannot be read at all; workloads naming it are refused while it is missing"
            ),
        }
    }
}

#[cfg(test)]
mod tests;
