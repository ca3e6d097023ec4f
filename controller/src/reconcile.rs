//! The reconcile loop: whenever the objects read change (debounced), translate them with the
//! shared library and publish what each waypoint is served; a separate writer, active on the
//! elected replica only, deploys our Gateways and writes the Gateway API status from the latest
//! translation (so a slow API server never delays new configuration reaching waypoints).
//!
//! Every replica translates and serves (a waypoint may be connected to any); only the leader
//! writes to the API server. An identity is served only for a Gateway that is accepted and
//! programmed (its objects are ours and its Service has an address), as its status says.
//! Writes are skipped when nothing changed: a provisioned object is re-applied when its desired
//! form changes or at the periodic resync, and a status is written only when it differs from
//! the one the object carries. An object of the name we would provision that is not owned by
//! the Gateway is never taken over: the Gateway is then not programmed.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::hash::{Hash, Hasher};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use common::identity::Identity;
use common::translate::{InForce, ObjectKey, ObjectStatus, RawObject, Settings, Translation, Translator};
use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{Api, DynamicObject, Patch, PatchParams, PostParams};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use serde_json::{Value, json};
use tokio::sync::watch;
use tracing::{debug, info, warn};

use crate::config::Config;
use crate::kinds::{self, Kind};
use crate::objects::Objects;
use crate::provision::{self, Desired, FIELD_MANAGER, Parameters};
use crate::scope::{self, Served, WaypointRef};
use crate::status::{self, GatewayFacts};

/// Changes arriving within this window are translated once.
const DEBOUNCE: Duration = Duration::from_millis(100);
/// Everything is re-applied this often, repairing objects changed behind our back.
const RESYNC: Duration = Duration::from_secs(300);
/// Each API write may take this long.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct WriteLabels {
    kind: &'static str,
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabels {
    kind: String,
}

/// Reconcile metrics (`ambient_controller_*`).
#[derive(Clone, Debug, Default)]
pub struct ReconcileMetrics {
    passes: Counter,
    writes: Family<WriteLabels, Counter>,
    refused: Family<KindLabels, Gauge>,
    waypoints: Gauge,
    leader: Gauge,
    conflicts: Counter,
}

impl ReconcileMetrics {
    pub fn new(registry: &mut Registry) -> Self {
        let m = Self::default();
        let r = registry.sub_registry_with_prefix("ambient_controller");
        r.register("reconciles", "Translations of the objects read", m.passes.clone());
        r.register(
            "api_writes",
            "Writes to the API server, by kind and result (ok, error)",
            m.writes.clone(),
        );
        r.register("refused_objects", "Objects refused by the last translation, by kind", m.refused.clone());
        r.register("waypoints", "Waypoint Gateways of our class", m.waypoints.clone());
        r.register("leader", "1 while this replica holds the Lease and writes to the API", m.leader.clone());
        r.register(
            "provisioning_conflicts",
            "Gateways not deployed because an object of the name we would use is not theirs",
            m.conflicts.clone(),
        );
        m
    }

    fn wrote(&self, kind: &'static str, ok: bool) {
        self.writes.get_or_create(&WriteLabels { kind, result: if ok { "ok" } else { "error" } }).inc();
    }
}

/// What the debug dump shows of the last pass.
#[derive(Debug, Default)]
pub struct LastPass {
    pub statuses: Vec<ObjectStatus>,
    pub waypoints: Vec<String>,
}

/// Shared with the admin server.
pub type LastPassHandle = Arc<Mutex<LastPass>>;

/// What the writer writes from: one translation and what it was split into.
#[derive(Debug)]
pub struct WriteJob {
    translation: Translation,
    ours: Vec<Value>,
    served: Arc<Served>,
}

pub struct Reconciler {
    config: Config,
    objects: Arc<Objects>,
    served: watch::Sender<Arc<Served>>,
    metrics: ReconcileMetrics,
    translator: Translator,
    generation: u64,
    /// The refusals logged already (logged again only when they change).
    logged: BTreeMap<String, String>,
    last: LastPassHandle,
    jobs: watch::Sender<Option<Arc<WriteJob>>>,
}

/// Writes to the API server from the latest translation, while this replica leads.
pub struct Writer {
    config: Config,
    objects: Arc<Objects>,
    client: kube::Client,
    leader: watch::Receiver<bool>,
    metrics: ReconcileMetrics,
    jobs: watch::Receiver<Option<Arc<WriteJob>>>,
    /// Hash of the last applied form of each provisioned object.
    applied: HashMap<(&'static str, String, String), u64>,
    /// Gateways ("namespace/name") whose status we wrote, to let go of when they stop being ours.
    written: BTreeSet<String>,
}

/// Why a Gateway could not be deployed.
#[derive(Debug, thiserror::Error)]
enum NotDeployed {
    /// Its `parametersRef` is wrong: `Accepted: False, InvalidParameters`.
    #[error("parametersRef: {0}")]
    Parameters(String),
    /// An object of a name we would use exists and is not the Gateway's: not programmed.
    #[error("{0}")]
    Conflict(String),
    /// The API server failed; retried, status left as it is.
    #[error("API server: {0}")]
    Api(String),
}

impl Reconciler {
    /// The translating loop and the writer it feeds.
    pub fn new(
        config: Config,
        objects: Arc<Objects>,
        client: kube::Client,
        served: watch::Sender<Arc<Served>>,
        leader: watch::Receiver<bool>,
        metrics: ReconcileMetrics,
        last: LastPassHandle,
    ) -> (Self, Writer) {
        let settings = Settings {
            waypoint_classes: vec![config.gateway_class.clone(), "istio-waypoint".into()],
            ..Settings::default()
        };
        let (jobs_tx, jobs_rx) = watch::channel(None);
        let writer = Writer {
            config: config.clone(),
            objects: objects.clone(),
            client,
            leader,
            metrics: metrics.clone(),
            jobs: jobs_rx,
            applied: HashMap::new(),
            written: BTreeSet::new(),
        };
        let reconciler = Self {
            config,
            objects,
            served,
            metrics,
            translator: Translator::new(settings),
            generation: 0,
            logged: BTreeMap::new(),
            last,
            jobs: jobs_tx,
        };
        (reconciler, writer)
    }

    /// Runs until the task is dropped. `synced` is told once the first pass is published.
    pub async fn run(mut self, synced: common::readiness::BlockReady) {
        let mut changed = self.objects.subscribe();
        let mut synced = Some(synced);
        loop {
            if changed.changed().await.is_err() {
                return;
            }
            tokio::time::sleep(DEBOUNCE).await;
            changed.borrow_and_update();
            let pending = self.objects.pending(kinds::WATCHED);
            if !pending.is_empty() {
                debug!(?pending, "waiting for the first list of every kind");
                continue;
            }
            self.pass().await;
            if let Some(s) = synced.take() {
                info!(generation = self.generation, "first configuration published");
                s.done();
            }
        }
    }

    /// One translation and its publication; the writer gets it too.
    pub async fn pass(&mut self) {
        self.metrics.passes.inc();
        let t = self.translate();
        let ours = our_gateways(&self.config, &self.objects);
        let accepted = |gw: &Value| {
            let key = object_key(&kinds::GATEWAY, gw);
            t.statuses.iter().any(|s| s.object == key && s.in_force != InForce::None)
        };
        // Served only once the leader found its objects ours and its address assigned.
        let programmed = |gw: &Value| {
            gw.pointer("/status/conditions")
                .and_then(Value::as_array)
                .is_some_and(|c| c.iter().any(|c| c["type"] == "Programmed" && c["status"] == "True"))
        };
        let waypoints: Vec<WaypointRef> = ours
            .iter()
            .filter(|gw| accepted(gw))
            .filter_map(|gw| {
                let (ns, name) = ns_name(gw)?;
                let identity = Identity::new(&self.config.trust_domain, ns, name).ok()?;
                let serve = programmed(gw);
                Some(WaypointRef { namespace: ns.to_string(), name: name.to_string(), identity, serve })
            })
            .collect();
        self.metrics.waypoints.set(i64::try_from(ours.len()).unwrap_or(i64::MAX));
        self.generation += 1;
        let served = Arc::new(scope::split(&t, &waypoints, &Settings::default().domain, self.generation));
        self.served.send_replace(served.clone());
        {
            let mut last = self.last.lock().unwrap_or_else(PoisonError::into_inner);
            last.statuses = t.statuses.clone();
            last.waypoints = waypoints.iter().filter(|w| w.serve).map(WaypointRef::key).collect();
        }
        self.jobs.send_replace(Some(Arc::new(WriteJob { translation: t, ours, served })));
    }

    fn translate(&mut self) -> Translation {
        let mut raws = Vec::new();
        let mut refused: BTreeMap<String, i64> = BTreeMap::new();
        let mut now_refused = BTreeMap::new();
        for kind in kinds::WATCHED.iter().filter(|k| k.translated) {
            for obj in self.objects.list(kind) {
                let origin = match ns_name(&obj) {
                    Some(("", name)) => format!("{} {name}", kind.kind),
                    Some((ns, name)) => format!("{} {ns}/{name}", kind.kind),
                    None => kind.kind.to_string(),
                };
                match RawObject::from_value(obj, origin.clone()) {
                    Ok(raw) => raws.push(raw),
                    Err(fault) => {
                        *refused.entry(kind.kind.to_string()).or_default() += 1;
                        now_refused.insert(origin, fault.to_string());
                    }
                }
            }
        }
        let t = self.translator.translate(raws);
        for s in &t.statuses {
            if let (false, Some(f)) = (s.accepted, &s.fault) {
                *refused.entry(s.object.kind.clone()).or_default() += 1;
                now_refused.insert(s.origin.clone(), f.to_string());
            }
        }
        for (origin, fault) in &now_refused {
            if self.logged.get(origin) != Some(fault) {
                warn!(object = %origin, %fault, "object refused; its last accepted version (or a fail-safe) stays in force");
            }
        }
        self.logged = now_refused;
        self.metrics.refused.clear();
        for (kind, n) in refused {
            self.metrics.refused.get_or_create(&KindLabels { kind }).set(n);
        }
        t
    }
}

/// Our GatewayClass, when it exists and names our controller.
fn our_class(config: &Config, objects: &Objects) -> Option<Value> {
    let class = objects.get(&kinds::GATEWAY_CLASS, "", &config.gateway_class)?;
    (class.pointer("/spec/controllerName").and_then(Value::as_str) == Some(config.controller_name.as_str()))
        .then_some(class)
}

/// The Gateways of our class (none when the class is not ours).
fn our_gateways(config: &Config, objects: &Objects) -> Vec<Value> {
    if our_class(config, objects).is_none() {
        return Vec::new();
    }
    objects
        .list(&kinds::GATEWAY)
        .into_iter()
        .filter(|g| {
            g.pointer("/spec/gatewayClassName").and_then(Value::as_str) == Some(config.gateway_class.as_str())
        })
        .collect()
}

impl Writer {
    /// Writes from every new translation while leading; until the task is dropped.
    pub async fn run(mut self) {
        let mut resync = tokio::time::interval(RESYNC);
        resync.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                res = self.jobs.changed() => if res.is_err() { return },
                res = self.leader.changed() => {
                    if res.is_err() { return }
                    let now = *self.leader.borrow_and_update();
                    self.metrics.leader.set(i64::from(now));
                    info!(leader = now, "leadership changed");
                    self.applied.clear();
                }
                _ = resync.tick() => self.applied.clear(),
            }
            if !*self.leader.borrow() {
                continue;
            }
            let job = self.jobs.borrow_and_update().clone();
            if let Some(job) = job {
                self.write(&job).await;
            }
        }
    }

    async fn write(&mut self, job: &WriteJob) {
        let (t, ours, served) = (&job.translation, &job.ours, &*job.served);
        let now = now();
        if let Some(class) = our_class(&self.config, &self.objects) {
            let st = status::gateway_class_status(&class, &now);
            if class.get("status") != Some(&st) {
                self.apply_status(&kinds::GATEWAY_CLASS, &class, st, true).await;
            }
        }
        let mut our_keys = BTreeSet::new();
        for gw in ours {
            let Some((ns, name)) = ns_name(gw) else { continue };
            our_keys.insert(format!("{ns}/{name}"));
            let key = object_key(&kinds::GATEWAY, gw);
            let refused = t
                .statuses
                .iter()
                .find(|s| s.object == key && !s.accepted)
                .map(|s| s.fault.as_ref().map_or_else(|| "refused".to_string(), ToString::to_string));
            let (mut invalid_parameters, mut not_provisioned) = (None, None);
            if refused.is_none() {
                match self.provision(gw, ns).await {
                    Ok(()) => {}
                    Err(NotDeployed::Parameters(why)) => invalid_parameters = Some(why),
                    Err(NotDeployed::Conflict(why)) => not_provisioned = Some(why),
                    // Transient: the status stays as it is (a waypoint is not cut off for it).
                    Err(NotDeployed::Api(_)) => continue,
                }
            }
            let uid = gw.pointer("/metadata/uid").and_then(Value::as_str).unwrap_or_default();
            let facts = GatewayFacts {
                refused,
                invalid_parameters,
                not_provisioned,
                addresses: self.service_addresses(ns, name, uid),
                attached_routes: attached_routes(&self.objects, t, served, ns, name),
            };
            let st = status::gateway_status(gw, &facts, &now);
            if gw.get("status") != Some(&st) {
                self.apply_status(&kinds::GATEWAY, gw, st, true).await;
            }
        }
        // Gateways that stopped being ours (their class changed or no longer names us): our
        // status fields go, so istiod no longer sends traffic to a waypoint we stopped feeding.
        let gone: Vec<String> = self.written.difference(&our_keys).cloned().collect();
        for key in gone {
            let (ns, name) = key.split_once('/').unwrap_or_default();
            if let Some(gw) = self.objects.get(&kinds::GATEWAY, ns, name) {
                info!(gateway = %key, "no longer ours: releasing its status");
                self.apply_status(&kinds::GATEWAY, &gw, json!({}), false).await;
            }
        }
        self.written = our_keys.clone();
        for kind in [kinds::HTTP_ROUTE, kinds::GRPC_ROUTE] {
            for route in self.objects.list(&kind) {
                let Some((ns, _)) = ns_name(&route) else { continue };
                let ns = ns.to_string();
                let key = object_key(&kind, &route);
                let st = t.statuses.iter().find(|s| s.object == key);
                let conds = status::route_conditions(st);
                let ours = |r: &Value| parent_is_ours(r, &ns, served, &our_keys);
                if let Some(parents) =
                    status::route_parents(&route, &self.config.controller_name, ours, &conds, &now)
                {
                    self.replace_route_status(&kind, route, parents).await;
                }
            }
        }
    }

    /// Applies the objects deploying `gw`; the reason when it cannot be deployed.
    async fn provision(&mut self, gw: &Value, ns: &str) -> Result<(), NotDeployed> {
        let params = provision::parameters_ref(gw).map_err(|e| NotDeployed::Parameters(e.to_string()))?;
        let data;
        let parameters = match params {
            None => Parameters::None,
            Some(name) => {
                let api: Api<ConfigMap> = Api::namespaced(self.client.clone(), ns);
                match tokio::time::timeout(WRITE_TIMEOUT, api.get_opt(&name)).await {
                    Ok(Ok(Some(cm))) => {
                        data = cm.data.unwrap_or_default();
                        Parameters::ConfigMap(&data)
                    }
                    Ok(Ok(None)) => Parameters::Missing,
                    Ok(Err(e)) => {
                        return Err(NotDeployed::Api(format!("reading ConfigMap {ns}/{name}: {e}")));
                    }
                    Err(_) => {
                        return Err(NotDeployed::Api(format!("reading ConfigMap {ns}/{name}: timed out")));
                    }
                }
            }
        };
        let desired = provision::desired(gw, &self.config, parameters).map_err(|e| match e {
            provision::ProvisionError::Parameters(why) => NotDeployed::Parameters(why),
            other => NotDeployed::Conflict(other.to_string()),
        })?;
        let uid = gw.pointer("/metadata/uid").and_then(Value::as_str).unwrap_or_default().to_string();
        for d in desired {
            let key = (d.kind, d.namespace.clone(), d.name.clone());
            let hash = hash_of(&d.body);
            if self.applied.get(&key) == Some(&hash) {
                continue;
            }
            let result = match self.owned_or_absent(&d, &uid).await {
                Ok(()) => self.apply(&d).await.map_err(NotDeployed::Api),
                Err(e) => Err(e),
            };
            match result {
                Ok(()) => {
                    info!(kind = d.kind, namespace = %d.namespace, name = %d.name, "applied");
                    self.applied.insert(key, hash);
                }
                Err(e) => {
                    match &e {
                        NotDeployed::Conflict(why) => {
                            self.metrics.conflicts.inc();
                            warn!(kind = d.kind, namespace = %d.namespace, name = %d.name, reason = %why,
                                "not deploying the Gateway: an object of its name is not ours");
                        }
                        other => {
                            warn!(kind = d.kind, namespace = %d.namespace, name = %d.name, error = %other,
                            "apply failed; retried on the next pass")
                        }
                    }
                    return Err(e);
                }
            }
        }
        Ok(())
    }

    /// Ok when the object `d` would write is absent or owned by the Gateway `uid`.
    async fn owned_or_absent(&self, d: &Desired, uid: &str) -> Result<(), NotDeployed> {
        let api: Api<DynamicObject> =
            Api::namespaced_with(self.client.clone(), &d.namespace, &provisioned(d.kind)?);
        match tokio::time::timeout(WRITE_TIMEOUT, api.get_opt(&d.name)).await {
            Ok(Ok(None)) => Ok(()),
            Ok(Ok(Some(obj))) if owned_by(&obj.metadata.owner_references, uid) => Ok(()),
            Ok(Ok(Some(_))) => Err(NotDeployed::Conflict(format!(
                "{} {}/{} exists and is not owned by this Gateway: rename the Gateway or remove it",
                d.kind, d.namespace, d.name
            ))),
            Ok(Err(e)) => {
                Err(NotDeployed::Api(format!("reading {} {}/{}: {e}", d.kind, d.namespace, d.name)))
            }
            Err(_) => {
                Err(NotDeployed::Api(format!("reading {} {}/{}: timed out", d.kind, d.namespace, d.name)))
            }
        }
    }

    async fn apply(&self, d: &Desired) -> Result<(), String> {
        let ar = provisioned(d.kind).map_err(|e| e.to_string())?;
        let api: Api<DynamicObject> = Api::namespaced_with(self.client.clone(), &d.namespace, &ar);
        // Forced: the fields are ours (the object was checked to be the Gateway's).
        let params = PatchParams::apply(FIELD_MANAGER).force();
        let res =
            tokio::time::timeout(WRITE_TIMEOUT, api.patch(&d.name, &params, &Patch::Apply(&d.body))).await;
        let ok = matches!(res, Ok(Ok(_)));
        self.metrics.wrote(d.kind, ok);
        match res {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err("timed out".into()),
        }
    }

    /// The waypoint Service's cluster IPs, when that Service is the Gateway's (`uid`).
    fn service_addresses(&self, ns: &str, name: &str, uid: &str) -> Vec<String> {
        let Some(svc) = self.objects.get(&kinds::SERVICE, ns, name) else { return vec![] };
        let owners: Vec<k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference> = svc
            .pointer("/metadata/ownerReferences")
            .and_then(|o| serde_json::from_value(o.clone()).ok())
            .unwrap_or_default();
        if !owned_by(&Some(owners), uid) {
            return vec![];
        }
        let mut ips: Vec<String> = svc
            .pointer("/spec/clusterIPs")
            .and_then(Value::as_array)
            .map(|a| a.iter().filter_map(Value::as_str).map(String::from).collect())
            .unwrap_or_default();
        if ips.is_empty()
            && let Some(ip) = svc.pointer("/spec/clusterIP").and_then(Value::as_str)
        {
            ips.push(ip.to_string());
        }
        ips.retain(|ip| ip.parse::<std::net::IpAddr>().is_ok());
        ips
    }

    /// Server-side applies `status` under our field manager; `force` takes fields over, and
    /// without it an empty status releases the fields we set.
    async fn apply_status(&self, kind: &Kind, obj: &Value, status: Value, force: bool) {
        let Some((ns, name)) = ns_name(obj) else { return };
        let ar = kind.api_resource();
        let api: Api<DynamicObject> = if ns.is_empty() {
            Api::all_with(self.client.clone(), &ar)
        } else {
            Api::namespaced_with(self.client.clone(), ns, &ar)
        };
        let body = json!({"apiVersion": ar.api_version, "kind": ar.kind, "status": status});
        let mut params = PatchParams::apply(FIELD_MANAGER);
        params.force = force;
        let res =
            tokio::time::timeout(WRITE_TIMEOUT, api.patch_status(name, &params, &Patch::Apply(&body))).await;
        self.log_status_write(kind.kind, ns, name, res);
    }

    async fn replace_route_status(&self, kind: &Kind, mut route: Value, parents: Value) {
        let Some((ns, name)) = ns_name(&route).map(|(a, b)| (a.to_string(), b.to_string())) else { return };
        match route.get_mut("status").and_then(Value::as_object_mut) {
            Some(st) => {
                st.insert("parents".into(), parents);
            }
            None => {
                if let Some(o) = route.as_object_mut() {
                    o.insert("status".into(), json!({"parents": parents}));
                }
            }
        }
        let Ok(obj) = serde_json::from_value::<DynamicObject>(route) else { return };
        let api: Api<DynamicObject> = Api::namespaced_with(self.client.clone(), &ns, &kind.api_resource());
        let res =
            tokio::time::timeout(WRITE_TIMEOUT, api.replace_status(&name, &PostParams::default(), &obj))
                .await;
        self.log_status_write(kind.kind, &ns, &name, res);
    }

    fn log_status_write<T>(
        &self,
        kind: &'static str,
        ns: &str,
        name: &str,
        res: Result<kube::Result<T>, tokio::time::error::Elapsed>,
    ) {
        let ok = matches!(res, Ok(Ok(_)));
        self.metrics.wrote(kind, ok);
        match res {
            Ok(Ok(_)) => debug!(kind, namespace = ns, name, "status written"),
            // A conflict means the object moved on: its new version brings a new pass.
            Ok(Err(e)) => {
                warn!(kind, namespace = ns, name, error = %e, "status write failed; retried on the next pass")
            }
            Err(_) => warn!(kind, namespace = ns, name, "status write timed out; retried on the next pass"),
        }
    }
}

/// The API resource of a kind we provision.
fn provisioned(kind: &str) -> Result<kube::api::ApiResource, NotDeployed> {
    let k = |group, kind, plural| Kind { group, version: "v1", kind, plural, translated: false };
    Ok(match kind {
        "ServiceAccount" => k("", "ServiceAccount", "serviceaccounts"),
        "Deployment" => k("apps", "Deployment", "deployments"),
        "Service" => kinds::SERVICE,
        "PodDisruptionBudget" => k("policy", "PodDisruptionBudget", "poddisruptionbudgets"),
        other => return Err(NotDeployed::Conflict(format!("{other} is not a kind we provision"))),
    }
    .api_resource())
}

fn owned_by(
    owners: &Option<Vec<k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference>>,
    uid: &str,
) -> bool {
    !uid.is_empty() && owners.iter().flatten().any(|o| o.uid == uid && o.kind == "Gateway")
}

/// The waypoint ("namespace/name") a route's parentRef reaches: a Gateway directly, or the
/// waypoint of ours a Service uses.
fn parent_waypoint(r: &Value, route_ns: &str, served: &Served) -> Option<String> {
    let text = |k: &str| r.get(k).and_then(Value::as_str);
    let group = text("group").unwrap_or(kinds::GATEWAY_GROUP);
    let kind = text("kind").unwrap_or("Gateway");
    let ns = text("namespace").unwrap_or(route_ns);
    let name = text("name")?;
    match (group, kind) {
        ("" | "core", "Service") => {
            let host = format!("{name}.{ns}.svc.{}", Settings::default().domain);
            served.waypoint_of_service(ns, &host).map(String::from)
        }
        (kinds::GATEWAY_GROUP, "Gateway") => Some(format!("{ns}/{name}")),
        _ => None,
    }
}

/// Whether a route's parentRef is one of our waypoints.
fn parent_is_ours(r: &Value, route_ns: &str, served: &Served, ours: &BTreeSet<String>) -> bool {
    parent_waypoint(r, route_ns, served).is_some_and(|w| ours.contains(&w))
}

/// Accepted routes attached to the waypoint `ns/name` (directly or through its services).
fn attached_routes(objects: &Objects, t: &Translation, served: &Served, ns: &str, name: &str) -> usize {
    let key = format!("{ns}/{name}");
    let mut n = 0;
    for kind in [kinds::HTTP_ROUTE, kinds::GRPC_ROUTE] {
        for route in objects.list(&kind) {
            let Some((rns, _)) = ns_name(&route) else { continue };
            let okey = object_key(&kind, &route);
            if !t.statuses.iter().any(|s| s.object == okey && s.accepted) {
                continue;
            }
            let refs =
                route.pointer("/spec/parentRefs").and_then(Value::as_array).cloned().unwrap_or_default();
            n += usize::from(
                refs.iter().any(|r| parent_waypoint(r, rns, served).as_deref() == Some(key.as_str())),
            );
        }
    }
    n
}

fn ns_name(obj: &Value) -> Option<(&str, &str)> {
    let meta = obj.get("metadata")?;
    let name = meta.get("name")?.as_str()?;
    Some((meta.get("namespace").and_then(Value::as_str).unwrap_or_default(), name))
}

fn object_key(kind: &Kind, obj: &Value) -> ObjectKey {
    let (ns, name) = ns_name(obj).unwrap_or_default();
    ObjectKey { kind: kind.kind.to_string(), namespace: ns.to_string(), name: name.to_string() }
}

fn hash_of(v: &Value) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    v.to_string().hash(&mut h);
    h.finish()
}

fn now() -> String {
    time::OffsetDateTime::now_utc()
        .replace_nanosecond(0)
        .unwrap_or_else(|_| time::OffsetDateTime::now_utc())
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}
