//! The kinds the translation reads, by API group: their typed specs and the decoding of a read
//! document into one of them.

pub mod core;
pub mod gateway;
pub mod istio;
pub mod virtual_service;

use super::object::{Fault, Metadata, ObjectKey, RawObject};

/// A decoded object of a kind we read.
#[derive(Clone, Debug)]
pub struct Object {
    pub key: ObjectKey,
    pub meta: Metadata,
    pub spec: Spec,
}

// Objects are few (one per document) and short-lived: variant sizes do not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Clone, Debug)]
pub enum Spec {
    Namespace,
    Service(core::ServiceSpec),
    Pod(Box<core::PodSpec>, core::PodStatus),
    Gateway(gateway::GatewaySpec, gateway::GatewayStatus),
    HttpRoute(gateway::HttpRouteSpec),
    GrpcRoute(gateway::GrpcRouteSpec),
    ReferenceGrant(gateway::ReferenceGrantSpec),
    AuthorizationPolicy(istio::AuthorizationPolicySpec),
    RequestAuthentication(istio::RequestAuthenticationSpec),
    PeerAuthentication(istio::PeerAuthenticationSpec),
    DestinationRule(istio::DestinationRuleSpec),
    VirtualService(virtual_service::VirtualServiceSpec),
    ServiceEntry(istio::ServiceEntrySpec),
    WorkloadEntry(istio::WorkloadEntrySpec),
    WaypointPolicy(istio::WaypointPolicySpec),
    /// A real kind that carries nothing the mesh reads here (why, for the status).
    Ignored(&'static str),
}

/// Our CRD's API group.
pub const OUR_GROUP: &str = "waypoint.ambient.dev";

/// The namespace of an object the document did not place (kubectl's default).
pub const DEFAULT_NAMESPACE: &str = "default";

/// Reads the key of a document (before its spec is decoded), defaulting the namespace.
pub fn key_of(raw: &RawObject) -> ObjectKey {
    let cluster_scoped = raw.kind == "Namespace";
    let namespace = if cluster_scoped {
        String::new()
    } else if raw.metadata.namespace.is_empty() {
        DEFAULT_NAMESPACE.to_string()
    } else {
        raw.metadata.namespace.clone()
    };
    ObjectKey { kind: raw.kind.clone(), namespace, name: raw.metadata.name.clone() }
}

/// Decodes a document's body into the typed spec of its kind.
pub fn decode(raw: &RawObject) -> Result<Object, Fault> {
    if let Some(f) = &raw.envelope_fault {
        return Err(f.clone());
    }
    let key = key_of(raw);
    let (group, version) = match raw.api_version.split_once('/') {
        Some((g, v)) => (g, v),
        None => ("", raw.api_version.as_str()),
    };
    let versions: &[&str] = match group {
        "" => &["v1"],
        "apps" => &["v1"],
        gateway::GROUP => &["v1", "v1beta1"],
        "security.istio.io" => &["v1", "v1beta1"],
        "networking.istio.io" => &["v1", "v1beta1", "v1alpha3"],
        OUR_GROUP => &["v1alpha1"],
        _ => return Err(Fault::new("apiVersion", format!("unknown API group {group:?}"))),
    };
    if !versions.contains(&version) {
        return Err(Fault::new(
            "apiVersion",
            format!("unknown version {version:?} of {group:?} (known: {versions:?})"),
        ));
    }
    let spec = match (group, raw.kind.as_str()) {
        ("", "Namespace") => {
            raw.spec::<core::NamespaceSpec>()?;
            Spec::Namespace
        }
        ("", "Service") => Spec::Service(raw.spec()?),
        ("", "Pod") => {
            let spec: core::PodSpec = raw.spec()?;
            if let Some(k) = spec.rest.keys().find(|k| !core::POD_SPEC_IGNORED.contains(&k.as_str())) {
                return Err(Fault::new(format!("spec.{k}"), "unknown field"));
            }
            Spec::Pod(Box::new(spec), raw.status()?)
        }
        ("", "ServiceAccount" | "ConfigMap") => Spec::Ignored("carries nothing the mesh reads"),
        ("apps", "Deployment" | "ReplicaSet" | "StatefulSet" | "DaemonSet") => {
            Spec::Ignored("workloads come from Pods (or WorkloadEntries) with addresses")
        }
        (gateway::GROUP, "Gateway") => Spec::Gateway(raw.spec()?, raw.status()?),
        (gateway::GROUP, "HTTPRoute") => Spec::HttpRoute(raw.spec()?),
        (gateway::GROUP, "GRPCRoute") => Spec::GrpcRoute(raw.spec()?),
        (gateway::GROUP, "ReferenceGrant") => Spec::ReferenceGrant(raw.spec()?),
        ("security.istio.io", "AuthorizationPolicy") => Spec::AuthorizationPolicy(raw.spec()?),
        ("security.istio.io", "RequestAuthentication") => Spec::RequestAuthentication(raw.spec()?),
        ("security.istio.io", "PeerAuthentication") => {
            let mut p: istio::PeerAuthenticationSpec = raw.spec()?;
            // An empty selector selects the whole namespace (Istio's namespace-level policy).
            if p.selector.as_ref().is_some_and(|s| s.match_labels.is_empty()) {
                p.selector = None;
            }
            // Checked here, not when built: workloads read PeerAuthentications directly, and a
            // refused one must reach them in its fail-safe (STRICT) form.
            if p.port_level_mtls.contains_key(&0) {
                return Err(Fault::new("spec.portLevelMtls", "port 0 is not a port (1..=65535)"));
            }
            if !p.port_level_mtls.is_empty() && p.selector.is_none() {
                return Err(Fault::new("spec.portLevelMtls", "needs a selector (as in Istio)"));
            }
            Spec::PeerAuthentication(p)
        }
        ("networking.istio.io", "DestinationRule") => Spec::DestinationRule(raw.spec()?),
        ("networking.istio.io", "VirtualService") => Spec::VirtualService(raw.spec()?),
        ("networking.istio.io", "ServiceEntry") => Spec::ServiceEntry(raw.spec()?),
        ("networking.istio.io", "WorkloadEntry") => Spec::WorkloadEntry(raw.spec()?),
        (OUR_GROUP, "WaypointPolicy") => Spec::WaypointPolicy(raw.spec()?),
        (_, kind) => {
            return Err(Fault::new("kind", format!("{kind} of {:?} is not supported", raw.api_version)));
        }
    };
    Ok(Object { key, meta: raw.metadata.clone(), spec })
}

impl Object {
    pub fn labels(&self) -> &std::collections::BTreeMap<String, String> {
        &self.meta.labels
    }
}
