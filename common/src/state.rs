//! The indexed view of the mesh that proxies route on: workloads by UID, address and node,
//! services by VIP and `namespace/hostname`, endpoints per service, waypoints, and policies by
//! scope.
//!
//! The xDS handlers are the only writers. Each resource is validated and converted once, on
//! receipt; the writer-side `model` (private) then changes only the index entries that
//! resource touches, and a new immutable [`Snapshot`] (persistent maps sharing everything else
//! with the last one) is swapped in. A push of one workload costs the same in a mesh of 50k
//! as of 50. Proxies take the current snapshot (one `Arc` clone under a short read lock) and
//! ask it narrow questions; they never see the raw maps.
//!
//! Policy fails closed, as Istio's does for what it cannot apply: an Authorization rejected on
//! receipt is still NACKed, but is held in its fail-safe form (an ALLOW matching nothing, a
//! DENY matching everything in its scope) instead of the previous version or nothing; and a
//! workload that names a policy the state does not hold is reported by
//! [`Snapshot::missing_policies`] so that it is not reached while the policy is missing.

mod model;
pub mod policy;
pub mod workload;

use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, PoisonError, RwLock};

use crate::identity::Identity;
use crate::select;
use crate::xds::handler::RawResource;
use crate::xds::{Handler, Handlers, Rejection, ResourceStore, XdsUpdate, validate};
use imbl::{HashMap, OrdMap};
use model::{Entry, Model};
use proto::security::Authorization;
use proto::workload::{Address, address};
use serde::Serialize;
use tokio::sync::watch;

pub use policy::{Action, FailSafe, Policy, Scope};
pub use workload::{Gateway, GatewayTarget, Port, Service, Tunnel, Workload};

/// Validates and converts an address resource: what it puts in the view (`None` for an
/// address of no known type, which is held but indexes nothing).
fn convert_address(name: &str, a: &Address) -> Result<Option<Entry>, String> {
    validate::address(name, a)?;
    Ok(match &a.r#type {
        Some(address::Type::Workload(w)) => Some(Entry::Workload(Arc::new(Workload::from_proto(w)?))),
        Some(address::Type::Service(s)) => Some(Entry::Service(Arc::new(Service::from_proto(s)?))),
        None => None,
    })
}

fn convert_authorization(name: &str, a: &Authorization) -> Result<Policy, String> {
    validate::authorization(name, a)?;
    Policy::from_proto(a)
}

fn check_address(name: &str, a: &Address) -> Result<(), String> {
    convert_address(name, a).map(drop)
}

fn check_authorization(name: &str, a: &Authorization) -> Result<(), String> {
    convert_authorization(name, a).map(drop)
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

/// One immutable view of the mesh. Its maps are persistent: cloning one is cheap, and the
/// next view shares all but what a push changed with it.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Snapshot {
    /// By UID.
    workloads: OrdMap<String, Arc<Workload>>,
    #[serde(skip)]
    workloads_by_ip: HashMap<(String, IpAddr), Arc<Workload>>,
    /// The same, for our own network only: per-connection lookups allocate nothing.
    #[serde(skip)]
    local_workloads: HashMap<IpAddr, Arc<Workload>>,
    /// Node -> its workloads by UID.
    #[serde(skip)]
    workloads_by_node: HashMap<String, OrdMap<String, Arc<Workload>>>,
    /// By `namespace/hostname`.
    services: OrdMap<String, Arc<Service>>,
    #[serde(skip)]
    services_by_vip: HashMap<(String, IpAddr), Arc<Service>>,
    /// Lower-case hostname (a wildcard one as written, `*.example.com`) -> its services by key
    /// (one per namespace that declares it).
    #[serde(skip)]
    services_by_host: HashMap<String, OrdMap<String, Arc<Service>>>,
    #[serde(skip)]
    local_services: HashMap<IpAddr, Arc<Service>>,
    /// Service `namespace/hostname` -> its endpoints.
    endpoints: OrdMap<String, Arc<[Endpoint]>>,
    /// By `namespace/name`.
    policies: OrdMap<String, Arc<Policy>>,
    #[serde(skip)]
    global_policies: Arc<[Arc<Policy>]>,
    #[serde(skip)]
    namespace_policies: HashMap<String, Arc<[Arc<Policy>]>>,
    /// Policies held in their fail-safe form (by `namespace/name`), and why they were rejected.
    failsafe_policies: OrdMap<String, String>,
    /// The network this ztunnel is on (addresses are looked up in it).
    #[serde(skip)]
    network: Arc<str>,
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

    /// The services with this hostname (lower case; `*.example.com` for a wildcard one), in
    /// every namespace that declares one.
    pub fn services_by_host<'a>(&'a self, hostname: &str) -> impl Iterator<Item = &'a Arc<Service>> + 'a {
        self.services_by_host.get(hostname).into_iter().flat_map(|by_key| by_key.values())
    }

    pub fn service(&self, namespace: &str, hostname: &str) -> Option<&Arc<Service>> {
        // Joined on the stack when it fits (this runs for every request at the waypoint).
        let len = namespace.len() + 1 + hostname.len();
        let mut buf = [0u8; 256];
        if let Some(out) = buf.get_mut(..len) {
            let (ns, rest) = out.split_at_mut(namespace.len());
            ns.copy_from_slice(namespace.as_bytes());
            rest[0] = b'/';
            rest[1..].copy_from_slice(hostname.as_bytes());
            // Two strings and a '/' are UTF-8: this never fails.
            if let Ok(key) = std::str::from_utf8(out) {
                return self.services.get(key);
            }
        }
        self.services.get(format!("{namespace}/{hostname}").as_str())
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
        self.endpoints.get(service.key()).map_or(&[], |e| &e[..])
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
            .ok_or_else(|| PickError::NoHealthyEndpoint { service: service.key().to_string(), port })?;
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
        let mut out = self.global_policies.to_vec();
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

    /// Workloads scheduled on `node` (from the node's own index: as cheap in a big mesh as in
    /// a small one).
    pub fn workloads_on<'a>(&'a self, node: &'a str) -> impl Iterator<Item = &'a Arc<Workload>> + 'a {
        self.workloads_by_node.get(node).into_iter().flat_map(|on_node| on_node.values())
    }

    /// The service a workload address belongs to, for telemetry (the first one it backs).
    pub fn service_of(&self, w: &Workload) -> Option<&Arc<Service>> {
        w.services.keys().find_map(|k| self.services.get(k))
    }
}

struct Inner {
    addresses: Arc<ResourceStore<Address>>,
    policies: Arc<ResourceStore<Authorization>>,
    /// Rejected Authorizations held in their fail-safe form, by resource name.
    failsafe: policy::FailSafeSet,
    /// What the writers edit; `current` is its last published copy.
    model: Mutex<Model>,
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
        let model = Model::new(network);
        let inner = Arc::new(Inner {
            addresses: ResourceStore::new(check_address),
            policies: ResourceStore::new(check_authorization),
            failsafe: policy::FailSafeSet::default(),
            current: RwLock::new(Arc::new(model.view.clone())),
            model: Mutex::new(model),
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

    fn model(&self) -> std::sync::MutexGuard<'_, Model> {
        self.inner.model.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Publishes what `model` now holds as the current snapshot.
    fn publish(&self, model: &mut Model) {
        model.flush();
        *self.inner.current.write().unwrap_or_else(PoisonError::into_inner) = Arc::new(model.view.clone());
        self.inner.changed.send_modify(|n| *n += 1);
    }
}

/// The handler feeding [`State`]: converts each resource once, applies it to the model and
/// the raw store, then publishes.
struct Feed(State);

impl Handler<Address> for Feed {
    fn handle(&self, updates: Vec<XdsUpdate<Address>>) -> Vec<Rejection> {
        let mut rejected = Vec::new();
        let mut accepted = Vec::with_capacity(updates.len());
        let mut model = self.0.model();
        for update in updates {
            match update {
                XdsUpdate::Update(r) => match convert_address(&r.name, &r.resource) {
                    Ok(entry) => {
                        model.set_address(&r.name, entry);
                        accepted.push(XdsUpdate::Update(r));
                    }
                    Err(reason) => rejected.push(Rejection::new(r.name, reason)),
                },
                XdsUpdate::Remove(name) => {
                    model.set_address(&name, None);
                    accepted.push(XdsUpdate::Remove(name));
                }
            }
        }
        self.0.inner.addresses.apply_accepted(accepted);
        self.0.publish(&mut model);
        rejected
    }
}

impl Feed {
    /// Holds the rejected `resource` fail-safe, in the model too. False when it has no readable
    /// name (then whatever was in force for it stays).
    fn hold(&self, model: &mut Model, name: &str, resource: &Authorization, reason: &str) -> bool {
        let inner = &self.0.inner;
        if !inner.failsafe.hold(name, resource, reason) {
            return false;
        }
        let held = inner.failsafe.get(name);
        model.set_policy(name, held.as_ref().map(|f| f.policy.clone()), held.map(|f| f.reason));
        true
    }
}

/// Authorizations fail closed: one that is rejected is still NACKed, and held in its fail-safe
/// form in place of any earlier version; one accepted or removed takes its stand-in out.
impl Handler<Authorization> for Feed {
    fn handle(&self, updates: Vec<XdsUpdate<Authorization>>) -> Vec<Rejection> {
        let inner = &self.0.inner;
        let mut rejected = Vec::new();
        let mut apply = Vec::with_capacity(updates.len());
        let mut model = self.0.model();
        for update in updates {
            match update {
                XdsUpdate::Update(r) => match convert_authorization(&r.name, &r.resource) {
                    Ok(policy) => {
                        inner.failsafe.clear(&r.name);
                        model.set_policy(&r.name, Some(Arc::new(policy)), None);
                        apply.push(XdsUpdate::Update(r));
                    }
                    Err(reason) => {
                        self.hold(&mut model, &r.name, &r.resource, &reason);
                        rejected.push(Rejection::new(r.name, reason));
                    }
                },
                XdsUpdate::Remove(name) => {
                    inner.failsafe.clear(&name);
                    model.set_policy(&name, None, None);
                    apply.push(XdsUpdate::Remove(name));
                }
            }
        }
        inner.policies.apply_accepted(apply);
        self.0.publish(&mut model);
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
                // Published with the rest of its batch, by `handle`.
                self.hold(&mut self.0.model(), &raw.name, &a, reason);
            }
            None => tracing::warn!(
                resource = %raw.name,
                %reason,
                "Authorization cannot be read at all; workloads naming it are refused while it is missing"
            ),
        }
    }
}

#[cfg(test)]
mod tests;
