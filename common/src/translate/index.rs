//! The objects of one translation, indexed for the lookups references need: services and
//! service entries by name, waypoint Gateways, namespaces' labels, reference grants, and which
//! L4 policies select which workloads.

use std::collections::{BTreeMap, HashMap};

use super::Settings;
use super::kinds::gateway::{GatewaySpec, GatewayStatus, LabelSelector, ReferenceGrantSpec};
use super::kinds::istio::{AuthorizationPolicySpec, PeerAuthenticationSpec, ServiceEntrySpec};
use super::kinds::{Object, Spec, core::ServiceSpec};
use super::object::{Fault, ObjectKey};

/// Gateway classes whose Gateways are waypoints (Istio's, and ours).
/// The default waypoint classes (see [`super::Settings::waypoint_classes`]).
pub const WAYPOINT_CLASSES: &[&str] = &["istio-waypoint", "ambient-waypoint"];

/// Label keys users already write (Istio's).
pub mod labels {
    pub const USE_WAYPOINT: &str = "istio.io/use-waypoint";
    pub const USE_WAYPOINT_NAMESPACE: &str = "istio.io/use-waypoint-namespace";
    pub const WAYPOINT_FOR: &str = "istio.io/waypoint-for";
    pub const DATAPLANE_MODE: &str = "istio.io/dataplane-mode";
    pub const GATEWAY_NAME: &str = "gateway.networking.k8s.io/gateway-name";
    pub const INGRESS_USE_WAYPOINT: &str = "istio.io/ingress-use-waypoint";
}

pub struct Index<'a> {
    pub settings: &'a Settings,
    pub namespaces: HashMap<&'a str, &'a Object>,
    pub services: HashMap<(&'a str, &'a str), (&'a Object, &'a ServiceSpec)>,
    pub service_entries: HashMap<(&'a str, &'a str), (&'a Object, &'a ServiceEntrySpec)>,
    pub waypoints: HashMap<(&'a str, &'a str), (&'a Object, &'a GatewaySpec, &'a GatewayStatus)>,
    pub grants: Vec<(&'a str, &'a ReferenceGrantSpec)>,
    /// Everything, for selector matching (pods, workload entries).
    pub objects: &'a BTreeMap<ObjectKey, Object>,
    /// L4 policies with a selector: (namespace, selector, resource name).
    pub selector_policies: Vec<(&'a str, &'a BTreeMap<String, String>, String)>,
    pub peer_authentications: Vec<(&'a Object, &'a PeerAuthenticationSpec)>,
}

impl<'a> Index<'a> {
    pub fn build(settings: &'a Settings, objects: &'a BTreeMap<ObjectKey, Object>) -> Self {
        let mut ix = Index {
            settings,
            namespaces: HashMap::new(),
            services: HashMap::new(),
            service_entries: HashMap::new(),
            waypoints: HashMap::new(),
            grants: Vec::new(),
            objects,
            selector_policies: Vec::new(),
            peer_authentications: Vec::new(),
        };
        for obj in objects.values() {
            let ns = obj.key.namespace.as_str();
            let name = obj.key.name.as_str();
            match &obj.spec {
                Spec::Namespace => {
                    ix.namespaces.insert(name, obj);
                }
                Spec::Service(s) => {
                    ix.services.insert((ns, name), (obj, s));
                }
                Spec::ServiceEntry(s) => {
                    ix.service_entries.insert((ns, name), (obj, s));
                }
                Spec::Gateway(g, st) if settings.is_waypoint_class(&g.gateway_class_name) => {
                    ix.waypoints.insert((ns, name), (obj, g, st));
                }
                Spec::ReferenceGrant(g) => ix.grants.push((ns, g)),
                Spec::AuthorizationPolicy(AuthorizationPolicySpec {
                    selector: Some(sel),
                    target_ref: None,
                    target_refs,
                    ..
                }) if target_refs.is_empty() => {
                    ix.selector_policies.push((ns, &sel.match_labels, format!("{ns}/{name}")));
                }
                Spec::PeerAuthentication(p) => ix.peer_authentications.push((obj, p)),
                _ => {}
            }
        }
        ix
    }

    /// `<name>.<namespace>.svc.<domain>`.
    pub fn hostname(&self, namespace: &str, name: &str) -> String {
        format!("{name}.{namespace}.svc.{}", self.settings.domain)
    }

    /// Labels of a namespace (empty when the namespace object is not given).
    pub fn namespace_labels(&self, ns: &str) -> Option<&'a BTreeMap<String, String>> {
        self.namespaces.get(ns).map(|o| &o.meta.labels)
    }

    /// Whether `from` (group, kind, namespace) may refer to `to_kind` `to_name` in `to_ns`.
    pub fn granted(
        &self,
        from_kind: &str,
        from_ns: &str,
        to_group: &str,
        to_kind: &str,
        to_ns: &str,
        to_name: &str,
    ) -> bool {
        from_ns == to_ns
            || self.grants.iter().any(|(ns, g)| {
                *ns == to_ns
                    && g.from.iter().any(|f| {
                        f.group == super::kinds::gateway::GROUP
                            && f.kind == from_kind
                            && f.namespace == from_ns
                    })
                    && g.to.iter().any(|t| {
                        (t.group == to_group || (to_group.is_empty() && t.group == "core"))
                            && t.kind == to_kind
                            && t.name.as_deref().is_none_or(|n| n == to_name)
                    })
            })
    }

    /// The hostname of a Service or ServiceEntry referred to by kind and name, with its
    /// service ports (for port checks).
    pub fn service_host(
        &self,
        group: &str,
        kind: &str,
        ns: &str,
        name: &str,
    ) -> Result<(String, Vec<u16>), String> {
        match (group, kind) {
            ("" | "core", "Service") => match self.services.get(&(ns, name)) {
                Some((_, s)) => Ok((self.hostname(ns, name), s.ports.iter().map(|p| p.port).collect())),
                None => Err(format!("Service {ns}/{name} does not exist")),
            },
            ("networking.istio.io", "ServiceEntry") => match self.service_entries.get(&(ns, name)) {
                Some((_, s)) => match s.hosts.first() {
                    Some(h) => Ok((h.clone(), s.ports.iter().map(|p| p.number).collect())),
                    None => Err(format!("ServiceEntry {ns}/{name} has no hosts")),
                },
                None => Err(format!("ServiceEntry {ns}/{name} does not exist")),
            },
            ("networking.istio.io", "Hostname") => Ok((name.to_string(), vec![])),
            _ => Err(format!("a reference to {kind} (group {group:?}) is not supported")),
        }
    }
}

impl Index<'_> {
    /// The Service or ServiceEntry of `host` (a short name is in `ns`): its namespace, the
    /// fully qualified host and its ports. Wildcard hosts resolve to nothing.
    pub fn resolve_host(&self, ns: &str, host: &str) -> Option<(String, String, Vec<u16>)> {
        if host.contains('*') {
            return None;
        }
        let fqdn = if host.contains('.') { host.to_string() } else { self.hostname(ns, host) };
        self.services
            .iter()
            .find(|((sns, sname), _)| self.hostname(sns, sname) == fqdn)
            .map(|((sns, _), (_, s))| {
                (sns.to_string(), fqdn.clone(), s.ports.iter().map(|p| p.port).collect())
            })
            .or_else(|| {
                self.service_entries.iter().find(|(_, (_, se))| se.hosts.contains(&fqdn)).map(
                    |((sns, _), (_, se))| {
                        (sns.to_string(), fqdn.clone(), se.ports.iter().map(|p| p.number).collect())
                    },
                )
            })
    }
}

/// Whether `labels` satisfy a Kubernetes label selector.
pub fn selector_matches(sel: &LabelSelector, labels: &BTreeMap<String, String>) -> Result<bool, Fault> {
    if !sel.match_labels.iter().all(|(k, v)| labels.get(k) == Some(v)) {
        return Ok(false);
    }
    for e in &sel.match_expressions {
        let value = labels.get(&e.key);
        let ok = match e.operator.as_str() {
            "In" => value.is_some_and(|v| e.values.contains(v)),
            "NotIn" => value.is_none_or(|v| !e.values.contains(v)),
            "Exists" => value.is_some(),
            "DoesNotExist" => value.is_none(),
            other => return Err(Fault::new("operator", format!("unknown selector operator {other:?}"))),
        };
        if !ok {
            return Ok(false);
        }
    }
    Ok(true)
}

/// Whether every `key: value` of `selector` is among `labels` (Istio's matchLabels).
pub fn labels_match(selector: &BTreeMap<String, String>, labels: &BTreeMap<String, String>) -> bool {
    selector.iter().all(|(k, v)| labels.get(k) == Some(v))
}
