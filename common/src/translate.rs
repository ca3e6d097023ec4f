//! Translation of the resources users already write (Kubernetes `Service`/`Pod`/`Namespace`,
//! Gateway API `Gateway`/`HTTPRoute`/`GRPCRoute`/`ReferenceGrant`, Istio
//! `AuthorizationPolicy`/`RequestAuthentication`/`PeerAuthentication`/`DestinationRule`/
//! `VirtualService`/`ServiceEntry`/`WorkloadEntry`, and our one CRD `WaypointPolicy`) into the xDS resources the
//! proxies consume: `istio.workload.Address`, `istio.security.Authorization` and our
//! `ambient.waypoint.v1alpha1.Resource`. Used by the local file source and the in-repo control
//! plane (and, later, the Kubernetes controller).
//!
//! Each object is checked on its own: an object that cannot be applied (unknown field, wrong
//! type, a reference to nothing) is refused with its kind, namespace, name and the field at
//! fault, the rest still applies, and the last version of that object that was accepted stays
//! in force. [`Translator`] keeps those last good versions between translations.

pub mod index;
pub mod kinds;
pub mod object;
pub mod policies;
pub mod routes;
pub mod values;
pub mod virtual_service;
pub mod workloads;

use std::collections::{BTreeMap, HashMap, HashSet};

use serde::Serialize;

use crate::xds::local::EncodedResource;
pub use index::Index;
pub use kinds::{Object, Spec};
pub use object::{Fault, ObjectKey, RawObject, Unreadable, read_documents};

/// The DNS suffix of Kubernetes service hostnames.
pub const DEFAULT_DOMAIN: &str = "cluster.local";
/// Istio's root namespace: policies there without a selector apply mesh-wide.
pub const DEFAULT_ROOT_NAMESPACE: &str = "istio-system";

/// Which version of an object is in force after a translation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum InForce {
    /// The version just read.
    Current,
    /// It was refused; the last accepted version still applies.
    Previous,
    /// It was refused and no earlier version was ever accepted.
    None,
}

/// The status of one object after a translation, as the config dump shows it.
#[derive(Clone, Debug, Serialize)]
pub struct ObjectStatus {
    #[serde(flatten)]
    pub object: ObjectKey,
    /// Where it was read ("file.yaml#3"); empty when it was not in this read and was kept
    /// because the read had unreadable documents.
    pub origin: String,
    pub accepted: bool,
    pub in_force: InForce,
    /// Why it was refused (the field at fault and the reason).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fault: Option<Fault>,
    /// What was applied differently from what was written (fail-closed substitutions,
    /// ignored fields), or why a kind is ignored.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub notes: Vec<String>,
}

/// The result of one translation.
#[derive(Debug, Default)]
pub struct Translation {
    pub resources: Vec<EncodedResource>,
    pub statuses: Vec<ObjectStatus>,
    /// Documents that were not objects at all.
    pub unreadable: Vec<Unreadable>,
}

impl Translation {
    /// The refused objects and unreadable documents, as log-ready lines.
    pub fn refusals(&self) -> impl Iterator<Item = String> + '_ {
        let objects = self.statuses.iter().filter(|s| !s.accepted && !s.origin.is_empty()).map(|s| {
            let fault = s.fault.as_ref().map(|f| f.to_string()).unwrap_or_default();
            format!("{} ({}): {fault}", s.object, s.origin)
        });
        let docs = self.unreadable.iter().map(|u| format!("{}: {}", u.origin, u.fault));
        objects.chain(docs)
    }

    pub fn refused_count(&self) -> usize {
        self.statuses.iter().filter(|s| !s.accepted && !s.origin.is_empty()).count() + self.unreadable.len()
    }
}

/// What one object contributes.
#[derive(Debug, Default)]
pub struct Emitted {
    pub resources: Vec<EncodedResource>,
    pub notes: Vec<String>,
}

impl Emitted {
    pub fn push<M: prost::Message>(&mut self, type_url: &'static str, name: String, msg: &M) {
        self.resources.push(EncodedResource::new(type_url, name, msg));
    }
    pub fn note(&mut self, note: impl Into<String>) {
        self.notes.push(note.into());
    }
}

/// Names and defaults the translation needs.
#[derive(Clone, Debug)]
pub struct Settings {
    pub domain: String,
    pub root_namespace: String,
    /// Gateway classes whose Gateways are waypoints (Istio's and ours by default).
    pub waypoint_classes: Vec<String>,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            domain: DEFAULT_DOMAIN.into(),
            root_namespace: DEFAULT_ROOT_NAMESPACE.into(),
            waypoint_classes: index::WAYPOINT_CLASSES.iter().map(ToString::to_string).collect(),
        }
    }
}

impl Settings {
    /// Whether Gateways of `class` are waypoints.
    pub fn is_waypoint_class(&self, class: &str) -> bool {
        self.waypoint_classes.iter().any(|c| c == class)
    }
}

/// Translates sets of objects, keeping the last accepted version of each object.
#[derive(Debug, Default)]
pub struct Translator {
    settings: Settings,
    last_good: HashMap<ObjectKey, Object>,
}

impl Translator {
    pub fn new(settings: Settings) -> Self {
        Self { settings, last_good: HashMap::new() }
    }

    /// Reads and translates YAML texts (name, text), e.g. the files of a directory. When a
    /// document cannot be read as an object, which object it was is unknown: objects accepted
    /// before that are missing from this read are then kept (never taken as deleted, which
    /// could drop a policy), until the documents read cleanly again.
    pub fn translate_yaml<'t>(&mut self, texts: impl IntoIterator<Item = (&'t str, &'t str)>) -> Translation {
        let mut objects = Vec::new();
        let mut unreadable = Vec::new();
        for (source, text) in texts {
            let (o, u) = read_documents(text, source);
            objects.extend(o);
            unreadable.extend(u);
        }
        let mut t = self.translate_keeping(objects, !unreadable.is_empty());
        t.unreadable = unreadable;
        t
    }

    /// Translates a whole set of objects (what is not in it is gone).
    pub fn translate(&mut self, raws: Vec<RawObject>) -> Translation {
        self.translate_keeping(raws, false)
    }

    fn translate_keeping(&mut self, raws: Vec<RawObject>, keep_missing: bool) -> Translation {
        let mut statuses: BTreeMap<ObjectKey, ObjectStatus> = BTreeMap::new();
        let mut effective: BTreeMap<ObjectKey, Object> = BTreeMap::new();
        for raw in raws {
            let key = kinds::key_of(&raw);
            let mut status = ObjectStatus {
                object: key.clone(),
                origin: raw.origin.clone(),
                accepted: true,
                in_force: InForce::Current,
                fault: None,
                notes: vec![],
            };
            if statuses.contains_key(&key) {
                // The first one read stays; the duplicate is reported under its own origin.
                status.accepted = false;
                status.in_force = InForce::Previous;
                status.fault =
                    Some(Fault::new("metadata.name", "a second object of this kind, namespace and name"));
                statuses.insert(ObjectKey { name: format!("{} ({})", key.name, raw.origin), ..key }, status);
                continue;
            }
            match kinds::decode(&raw) {
                Ok(obj) => {
                    if let Spec::Ignored(why) = obj.spec {
                        status.notes.push(format!("ignored: {why}"));
                    }
                    effective.insert(key.clone(), obj);
                }
                Err(fault) => {
                    status.accepted = false;
                    status.fault = Some(fault);
                    status.in_force = match self.last_good.get(&key) {
                        Some(prev) => {
                            effective.insert(key.clone(), prev.clone());
                            InForce::Previous
                        }
                        None => match policies::failsafe(&raw) {
                            // A policy never applied must not leave its scope open.
                            Some((obj, note)) => {
                                status.notes.push(note);
                                effective.insert(key.clone(), obj);
                                InForce::None
                            }
                            None => InForce::None,
                        },
                    };
                }
            }
            statuses.insert(key, status);
        }
        if keep_missing {
            for (key, prev) in &self.last_good {
                if !statuses.contains_key(key) {
                    effective.insert(key.clone(), prev.clone());
                    statuses.insert(
                        key.clone(),
                        ObjectStatus {
                            object: key.clone(),
                            origin: String::new(),
                            accepted: false,
                            in_force: InForce::Previous,
                            fault: Some(Fault::new(
                                "",
                                "not in this read, which has unreadable documents: kept as it was",
                            )),
                            notes: vec![],
                        },
                    );
                }
            }
        }
        // Forget what is gone.
        self.last_good.retain(|k, _| effective.contains_key(k));

        let index = Index::build(&self.settings, &effective);
        let mut resources = Vec::new();
        let mut seen: HashSet<(&'static str, String)> = HashSet::new();
        // Policies first: workloads list the L4 policies that select them.
        let (first, second): (Vec<&Object>, Vec<&Object>) = effective
            .values()
            .partition(|o| !matches!(o.spec, Spec::Pod(..) | Spec::WorkloadEntry(_) | Spec::ServiceEntry(_)));
        for obj in first.into_iter().chain(second) {
            let status = statuses.get_mut(&obj.key);
            let fresh = status.as_ref().is_some_and(|s| s.in_force == InForce::Current);
            let outcome = index.emit(obj).and_then(|e| {
                // Two objects may not produce the same resource.
                match e.resources.iter().find(|r| seen.contains(&(r.type_url, r.name.clone()))) {
                    Some(r) => Err(Fault::new(
                        "metadata.name",
                        format!("{} is already produced by another object", r.name),
                    )),
                    None => Ok(e),
                }
            });
            let emitted = match outcome {
                Ok(e) => {
                    if fresh {
                        self.last_good.insert(obj.key.clone(), obj.clone());
                    }
                    Some(e)
                }
                Err(fault) => {
                    let previous =
                        self.last_good.get(&obj.key).filter(|_| fresh).and_then(|p| index.emit(p).ok());
                    // A security policy never applied must not leave its scope open.
                    let failsafe = match previous {
                        Some(_) => None,
                        None => policies::failsafe_of(obj).and_then(|(o, note)| {
                            index.emit(&o).ok().map(|mut e| {
                                e.notes.push(note);
                                e
                            })
                        }),
                    };
                    if let Some(s) = status {
                        s.accepted = false;
                        s.fault.get_or_insert(fault);
                        s.in_force = if previous.is_some() { InForce::Previous } else { InForce::None };
                    }
                    previous.or(failsafe)
                }
            };
            if let Some(e) = emitted {
                if let Some(s) = statuses.get_mut(&obj.key) {
                    s.notes.extend(e.notes);
                }
                for r in e.resources {
                    if seen.insert((r.type_url, r.name.clone())) {
                        resources.push(r);
                    }
                }
            }
        }
        Translation { resources, statuses: statuses.into_values().collect(), unreadable: vec![] }
    }
}

impl Index<'_> {
    /// What one object contributes, or why it cannot be applied.
    pub fn emit(&self, obj: &Object) -> Result<Emitted, Fault> {
        let mut out = Emitted::default();
        match &obj.spec {
            Spec::Namespace | Spec::ReferenceGrant(_) | Spec::Ignored(_) => {}
            Spec::Service(spec) => workloads::service(self, obj, spec, &mut out)?,
            Spec::Pod(spec, status) => workloads::pod(self, obj, spec, status, &mut out)?,
            Spec::Gateway(spec, status) => workloads::gateway(self, obj, spec, status, &mut out)?,
            Spec::ServiceEntry(spec) => workloads::service_entry(self, obj, spec, &mut out)?,
            Spec::WorkloadEntry(spec) => workloads::workload_entry(self, obj, spec, &mut out)?,
            Spec::HttpRoute(spec) => routes::http_route(self, obj, spec, &mut out)?,
            Spec::GrpcRoute(spec) => routes::grpc_route(self, obj, spec, &mut out)?,
            Spec::AuthorizationPolicy(spec) => policies::authorization(self, obj, spec, &mut out)?,
            Spec::RequestAuthentication(spec) => policies::request_authentication(self, obj, spec, &mut out)?,
            Spec::PeerAuthentication(spec) => policies::peer_authentication(self, obj, spec, &mut out)?,
            Spec::DestinationRule(spec) => policies::destination_rule(self, obj, spec, &mut out)?,
            Spec::VirtualService(spec) => virtual_service::virtual_service(self, obj, spec, &mut out)?,
            Spec::WaypointPolicy(spec) => policies::waypoint_policy(self, obj, spec, &mut out)?,
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests;
