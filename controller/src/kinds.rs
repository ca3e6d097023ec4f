//! The Kubernetes kinds the controller reads, as API resources: what the translation takes
//! (the standard kinds of `common::translate`) and the GatewayClasses it answers for.

use kube::api::ApiResource;

/// One watched kind.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Kind {
    pub group: &'static str,
    pub version: &'static str,
    pub kind: &'static str,
    pub plural: &'static str,
    /// Translated into xDS (GatewayClass is read for its own status only).
    pub translated: bool,
}

impl Kind {
    pub fn api_resource(&self) -> ApiResource {
        let api_version = if self.group.is_empty() {
            self.version.to_string()
        } else {
            format!("{}/{}", self.group, self.version)
        };
        ApiResource {
            group: self.group.to_string(),
            version: self.version.to_string(),
            api_version,
            kind: self.kind.to_string(),
            plural: self.plural.to_string(),
        }
    }
}

const fn kind(group: &'static str, version: &'static str, kind: &'static str, plural: &'static str) -> Kind {
    Kind { group, version, kind, plural, translated: true }
}

pub const GATEWAY_GROUP: &str = "gateway.networking.k8s.io";
pub const NAMESPACE: Kind = kind("", "v1", "Namespace", "namespaces");
pub const SERVICE: Kind = kind("", "v1", "Service", "services");
pub const POD: Kind = kind("", "v1", "Pod", "pods");
pub const GATEWAY: Kind = kind(GATEWAY_GROUP, "v1", "Gateway", "gateways");
pub const HTTP_ROUTE: Kind = kind(GATEWAY_GROUP, "v1", "HTTPRoute", "httproutes");
pub const GRPC_ROUTE: Kind = kind(GATEWAY_GROUP, "v1", "GRPCRoute", "grpcroutes");
pub const GATEWAY_CLASS: Kind = Kind {
    group: GATEWAY_GROUP,
    version: "v1",
    kind: "GatewayClass",
    plural: "gatewayclasses",
    translated: false,
};

/// Everything watched. A kind whose CRD is not installed (404) counts as empty and is
/// retried in the background.
pub const WATCHED: &[Kind] = &[
    NAMESPACE,
    SERVICE,
    POD,
    GATEWAY_CLASS,
    GATEWAY,
    HTTP_ROUTE,
    GRPC_ROUTE,
    kind(GATEWAY_GROUP, "v1beta1", "ReferenceGrant", "referencegrants"),
    kind("security.istio.io", "v1", "AuthorizationPolicy", "authorizationpolicies"),
    kind("security.istio.io", "v1", "RequestAuthentication", "requestauthentications"),
    kind("security.istio.io", "v1", "PeerAuthentication", "peerauthentications"),
    kind("networking.istio.io", "v1", "DestinationRule", "destinationrules"),
    kind("networking.istio.io", "v1", "VirtualService", "virtualservices"),
    kind("networking.istio.io", "v1", "ServiceEntry", "serviceentries"),
    kind("networking.istio.io", "v1", "WorkloadEntry", "workloadentries"),
    kind("waypoint.ambient.dev", "v1alpha1", "WaypointPolicy", "waypointpolicies"),
];
