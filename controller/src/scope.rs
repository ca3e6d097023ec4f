//! What each waypoint is served: the translation split by waypoint.
//!
//! Mesh-wide state (`istio.workload.Address`: services and workloads, which a waypoint needs to
//! reach any backend) goes to every waypoint. The waypoint configuration
//! (`ambient.waypoint.v1alpha1.Resource`) goes only to the waypoints it belongs to:
//! - a route attached to a Service goes to the waypoint that Service uses (its Address names
//!   it); one attached to a waypoint Gateway goes to that waypoint;
//! - a policy targeting a Service, a waypoint or a route goes where that target goes;
//! - a policy that only shapes traffic toward a backend (DestinationRule-style `traffic`)
//!   applies wherever that backend is sent to, so every waypoint gets it.
//!
//! L4 `istio.security.Authorization` is ztunnel's (istiod serves it there): waypoints get
//! none, and answer the subscription empty.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

use common::identity::Identity;
use common::translate::Translation;
use common::xds::delta::Versioned;
use prost::Message;
use proto::waypoint as wp;
use proto::workload as wl;

/// Resources of one type, by name.
pub type Resources = BTreeMap<String, Versioned>;

/// A waypoint of ours: its Gateway and the identity its pods prove.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct WaypointRef {
    pub namespace: String,
    pub name: String,
    pub identity: Identity,
    /// Its identity is served (the Gateway is programmed); otherwise it only takes part in
    /// attributing services and routes (for status).
    pub serve: bool,
}

impl WaypointRef {
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

/// One immutable view of everything served, by client identity.
#[derive(Debug, Default)]
pub struct Served {
    /// Bumped on every change; shown in the debug dump.
    pub generation: u64,
    /// Served to every known waypoint, by type URL.
    shared: BTreeMap<String, Arc<Resources>>,
    /// Per identity: the waypoints it is (a Gateway may be served to one identity).
    identities: BTreeMap<String, Vec<String>>,
    /// Per waypoint key: its own resources, by type URL.
    scoped: HashMap<String, BTreeMap<String, Arc<Resources>>>,
    /// Service ("namespace/hostname") -> the waypoint of ours it uses.
    service_waypoint: HashMap<String, String>,
}

impl Served {
    /// Whether `identity` is one of our waypoints (anything else is refused).
    pub fn knows(&self, identity: &Identity) -> bool {
        self.identities.contains_key(&identity.to_string())
    }

    /// What `identity` is served of `type_url`; `None` when the identity is not a waypoint of
    /// ours (anymore).
    pub fn view(&self, identity: &Identity, type_url: &str) -> Option<Resources> {
        let waypoints = self.identities.get(&identity.to_string())?;
        let mut out = self.shared.get(type_url).map(|r| (**r).clone()).unwrap_or_default();
        for w in waypoints {
            if let Some(r) = self.scoped.get(w).and_then(|m| m.get(type_url)) {
                out.extend(r.iter().map(|(k, v)| (k.clone(), v.clone())));
            }
        }
        Some(out)
    }

    /// The waypoint of ours ("namespace/name") the service `namespace/hostname` uses.
    pub fn waypoint_of_service(&self, namespace: &str, hostname: &str) -> Option<&str> {
        self.service_waypoint.get(&format!("{namespace}/{hostname}")).map(String::as_str)
    }

    /// Resource names per waypoint (for the debug dump).
    pub fn summary(&self) -> serde_json::Value {
        let scoped: BTreeMap<&String, BTreeMap<&String, Vec<&String>>> = self
            .scoped
            .iter()
            .map(|(w, types)| (w, types.iter().map(|(t, r)| (t, r.keys().collect())).collect()))
            .collect();
        serde_json::json!({
            "generation": self.generation,
            "identities": self.identities,
            "shared": self.shared.iter().map(|(t, r)| (t.clone(), r.len())).collect::<BTreeMap<_, _>>(),
            "waypoints": scoped,
        })
    }
}

/// Splits `translation` for `waypoints`. `domain` is the cluster domain (waypoint hostnames are
/// `<name>.<namespace>.svc.<domain>`).
pub fn split(translation: &Translation, waypoints: &[WaypointRef], domain: &str, generation: u64) -> Served {
    let by_host: HashMap<String, String> = waypoints
        .iter()
        .map(|w| (format!("{}/{}.{}.svc.{domain}", w.namespace, w.name, w.namespace), w.key()))
        .collect();
    let mut shared: BTreeMap<String, Resources> = BTreeMap::new();
    // Service ("namespace/hostname") -> the waypoint it names, when that is one of ours.
    let mut service_waypoint: HashMap<String, String> = HashMap::new();
    let mut waypoint_resources = Vec::new();
    for r in &translation.resources {
        match r.type_url {
            proto::ADDRESS_TYPE_URL => {
                if let Ok(wl::Address { r#type: Some(wl::address::Type::Service(s)) }) =
                    wl::Address::decode(r.body.value.as_slice())
                    && let Some(wl::gateway_address::Destination::Hostname(h)) =
                        s.waypoint.and_then(|w| w.destination)
                    && let Some(w) = by_host.get(&format!("{}/{}", h.namespace, h.hostname))
                {
                    service_waypoint.insert(format!("{}/{}", s.namespace, s.hostname), w.clone());
                }
                shared.entry(r.type_url.to_string()).or_default().insert(r.name.clone(), stored(&r.body));
            }
            proto::WAYPOINT_RESOURCE_TYPE_URL => {
                if let Ok(res) = wp::Resource::decode(r.body.value.as_slice()) {
                    waypoint_resources.push((r, res));
                }
            }
            // L4 policies are ztunnel's; anything else is not ours to serve.
            _ => {}
        }
    }
    let parent_waypoints = |parent: Option<&wp::ParentRef>| -> BTreeSet<String> {
        match parent.and_then(|p| p.target.as_ref()) {
            Some(wp::parent_ref::Target::Service(s)) => service_waypoint
                .get(&format!("{}/{}", s.namespace, s.hostname))
                .cloned()
                .into_iter()
                .collect(),
            Some(wp::parent_ref::Target::Waypoint(w)) if by_host.values().any(|k| k == w) => {
                BTreeSet::from([w.clone()])
            }
            _ => BTreeSet::new(),
        }
    };
    // Routes first: policies may target them.
    let mut route_waypoints: HashMap<String, BTreeSet<String>> = HashMap::new();
    let mut scoped: HashMap<String, BTreeMap<String, Resources>> = HashMap::new();
    let mut put = |w: &str, name: &str, body: &prost_types::Any| {
        scoped
            .entry(w.to_string())
            .or_default()
            .entry(proto::WAYPOINT_RESOURCE_TYPE_URL.to_string())
            .or_default()
            .insert(name.to_string(), stored(body));
    };
    for (r, res) in &waypoint_resources {
        if let Some(wp::resource::Kind::Route(route)) = &res.kind {
            let ws = parent_waypoints(route.parent.as_ref());
            for w in &ws {
                put(w, &r.name, &r.body);
            }
            route_waypoints.entry(format!("{}/{}", route.namespace, route.name)).or_default().extend(ws);
        }
    }
    for (r, res) in &waypoint_resources {
        let Some(wp::resource::Kind::Policy(policy)) = &res.kind else { continue };
        if policy.traffic.is_some() {
            shared
                .entry(proto::WAYPOINT_RESOURCE_TYPE_URL.to_string())
                .or_default()
                .insert(r.name.clone(), stored(&r.body));
            continue;
        }
        let ws = match policy.target.as_ref().and_then(|t| t.target.as_ref()) {
            Some(wp::parent_ref::Target::Route(route)) => {
                route_waypoints.get(route).cloned().unwrap_or_default()
            }
            _ => parent_waypoints(policy.target.as_ref()),
        };
        for w in &ws {
            put(w, &r.name, &r.body);
        }
    }
    let mut identities: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for w in waypoints.iter().filter(|w| w.serve) {
        identities.entry(w.identity.to_string()).or_default().push(w.key());
    }
    Served {
        generation,
        shared: shared.into_iter().map(|(t, r)| (t, Arc::new(r))).collect(),
        identities,
        scoped: scoped
            .into_iter()
            .map(|(w, types)| (w, types.into_iter().map(|(t, r)| (t, Arc::new(r))).collect()))
            .collect(),
        service_waypoint,
    }
}

fn stored(body: &prost_types::Any) -> Versioned {
    Versioned::new(body.clone())
}

#[cfg(test)]
mod tests;
