//! The resource types the server serves (group, version, plural, kind, scope, status subresource),
//! preloaded with what the mesh uses, and the discovery documents built from them.

use serde_json::{Value, json};

/// One served resource type at one version.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ResourceType {
    /// API group; empty for the core group (`/api/v1`).
    pub group: String,
    /// API version within the group, such as `v1`.
    pub version: String,
    /// Lower-case plural used in URLs, such as `pods`.
    pub plural: String,
    /// Kind, such as `Pod`.
    pub kind: String,
    /// Namespaced (`.../namespaces/{ns}/{plural}`) or cluster-scoped.
    pub namespaced: bool,
    /// Has a `/status` subresource: writes to the main resource keep the stored `status`, writes to
    /// `/status` change only `status`.
    pub status_subresource: bool,
}

impl ResourceType {
    fn new(api_version: &str, kind: &str, plural: &str, namespaced: bool) -> Self {
        let (group, version) = split_api_version(api_version);
        Self {
            group: group.to_string(),
            version: version.to_string(),
            plural: plural.to_string(),
            kind: kind.to_string(),
            namespaced,
            status_subresource: true,
        }
    }

    /// A namespaced type with a status subresource, e.g. `("apps/v1", "Deployment", "deployments")`.
    pub fn namespaced(api_version: &str, kind: &str, plural: &str) -> Self {
        Self::new(api_version, kind, plural, true)
    }

    /// A cluster-scoped type with a status subresource.
    pub fn cluster(api_version: &str, kind: &str, plural: &str) -> Self {
        Self::new(api_version, kind, plural, false)
    }

    /// The same type without a status subresource (`status` is an ordinary field).
    pub fn without_status(mut self) -> Self {
        self.status_subresource = false;
        self
    }

    /// `v1` for the core group, `group/version` otherwise.
    pub fn api_version(&self) -> String {
        if self.group.is_empty() { self.version.clone() } else { format!("{}/{}", self.group, self.version) }
    }

    /// `plural.group` (or the plural alone in the core group), as error messages name it.
    pub fn resource_name(&self) -> String {
        if self.group.is_empty() { self.plural.clone() } else { format!("{}.{}", self.plural, self.group) }
    }

    /// The storage key: every version of a group's resource shares one set of objects.
    pub(crate) fn group_resource(&self) -> GroupResource {
        GroupResource { group: self.group.clone(), plural: self.plural.clone() }
    }

    fn matches(&self, group: &str, version: &str, kind_or_plural: &str) -> bool {
        self.group == group
            && self.version == version
            && (self.plural == kind_or_plural || self.kind == kind_or_plural)
    }
}

/// Group and plural: the key objects are stored under, shared by all versions.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) struct GroupResource {
    pub group: String,
    pub plural: String,
}

/// Splits `apps/v1` into (`apps`, `v1`) and `v1` into (``, `v1`).
pub(crate) fn split_api_version(api_version: &str) -> (&str, &str) {
    api_version.rsplit_once('/').unwrap_or(("", api_version))
}

/// The served types.
#[derive(Clone, Debug)]
pub(crate) struct Registry {
    types: Vec<ResourceType>,
}

impl Registry {
    /// The types the controller and ztunnel use.
    pub fn builtin() -> Self {
        use ResourceType as R;
        let types = vec![
            R::cluster("v1", "Namespace", "namespaces"),
            R::namespaced("v1", "Pod", "pods"),
            R::namespaced("v1", "Service", "services"),
            R::namespaced("v1", "ServiceAccount", "serviceaccounts").without_status(),
            R::namespaced("v1", "ConfigMap", "configmaps").without_status(),
            R::namespaced("v1", "Event", "events").without_status(),
            R::namespaced("apps/v1", "Deployment", "deployments"),
            R::namespaced("policy/v1", "PodDisruptionBudget", "poddisruptionbudgets"),
            R::namespaced("coordination.k8s.io/v1", "Lease", "leases").without_status(),
            R::namespaced("gateway.networking.k8s.io/v1", "Gateway", "gateways"),
            R::cluster("gateway.networking.k8s.io/v1", "GatewayClass", "gatewayclasses"),
            R::namespaced("gateway.networking.k8s.io/v1", "HTTPRoute", "httproutes"),
            R::namespaced("gateway.networking.k8s.io/v1", "GRPCRoute", "grpcroutes"),
            R::namespaced("gateway.networking.k8s.io/v1", "ReferenceGrant", "referencegrants"),
            R::namespaced("gateway.networking.k8s.io/v1beta1", "ReferenceGrant", "referencegrants"),
            R::namespaced("security.istio.io/v1", "AuthorizationPolicy", "authorizationpolicies"),
            R::namespaced("security.istio.io/v1", "RequestAuthentication", "requestauthentications"),
            R::namespaced("security.istio.io/v1", "PeerAuthentication", "peerauthentications"),
            R::namespaced("networking.istio.io/v1", "DestinationRule", "destinationrules"),
            R::namespaced("networking.istio.io/v1", "VirtualService", "virtualservices"),
            R::namespaced("networking.istio.io/v1", "ServiceEntry", "serviceentries"),
            R::namespaced("networking.istio.io/v1", "WorkloadEntry", "workloadentries"),
            R::namespaced("waypoint.ambient.dev/v1alpha1", "WaypointPolicy", "waypointpolicies"),
        ];
        Self { types }
    }

    /// Adds `ty`, replacing a type with the same group, version and plural.
    pub fn register(&mut self, ty: ResourceType) {
        self.types.retain(|t| !(t.group == ty.group && t.version == ty.version && t.plural == ty.plural));
        self.types.push(ty);
    }

    /// Removes the type named by `api_version` and kind or plural; true when there was one.
    pub fn unregister(&mut self, api_version: &str, kind_or_plural: &str) -> bool {
        let (group, version) = split_api_version(api_version);
        let before = self.types.len();
        self.types.retain(|t| !t.matches(group, version, kind_or_plural));
        self.types.len() != before
    }

    /// The type served at `group/version/plural`.
    pub fn by_plural(&self, group: &str, version: &str, plural: &str) -> Option<&ResourceType> {
        self.types.iter().find(|t| t.group == group && t.version == version && t.plural == plural)
    }

    /// The type named by `api_version` and kind or plural.
    pub fn find(&self, api_version: &str, kind_or_plural: &str) -> Option<&ResourceType> {
        let (group, version) = split_api_version(api_version);
        self.types.iter().find(|t| t.matches(group, version, kind_or_plural))
    }

    /// `/api`: the core group's versions.
    pub fn core_versions(&self, server_address: &str) -> Value {
        let versions = self.versions_of("");
        json!({
            "kind": "APIVersions",
            "versions": versions,
            "serverAddressByClientCIDRs": [{ "clientCIDR": "0.0.0.0/0", "serverAddress": server_address }],
        })
    }

    /// `/apis`: every named group with its versions, the most stable one preferred.
    pub fn group_list(&self) -> Value {
        let mut groups: Vec<&str> =
            self.types.iter().map(|t| t.group.as_str()).filter(|g| !g.is_empty()).collect();
        groups.sort_unstable();
        groups.dedup();
        let groups: Vec<Value> = groups
            .into_iter()
            .map(|group| {
                let versions: Vec<Value> = self
                    .versions_of(group)
                    .into_iter()
                    .map(|v| json!({ "groupVersion": format!("{group}/{v}"), "version": v }))
                    .collect();
                json!({
                    "name": group,
                    "versions": versions,
                    "preferredVersion": versions.first().cloned().unwrap_or(Value::Null),
                })
            })
            .collect();
        json!({ "kind": "APIGroupList", "apiVersion": "v1", "groups": groups })
    }

    /// `/api/{version}` or `/apis/{group}/{version}`: the resources served there, if any.
    pub fn resource_list(&self, group: &str, version: &str) -> Option<Value> {
        let mut resources = Vec::new();
        for t in self.types.iter().filter(|t| t.group == group && t.version == version) {
            resources.push(json!({
                "name": t.plural,
                "singularName": t.kind.to_lowercase(),
                "namespaced": t.namespaced,
                "kind": t.kind,
                "verbs": ["create", "delete", "deletecollection", "get", "list", "patch", "update", "watch"],
            }));
            if t.status_subresource {
                resources.push(json!({
                    "name": format!("{}/status", t.plural),
                    "singularName": "",
                    "namespaced": t.namespaced,
                    "kind": t.kind,
                    "verbs": ["get", "patch", "update"],
                }));
            }
        }
        if resources.is_empty() {
            return None;
        }
        let group_version = if group.is_empty() { version.to_string() } else { format!("{group}/{version}") };
        Some(json!({
            "kind": "APIResourceList",
            "apiVersion": "v1",
            "groupVersion": group_version,
            "resources": resources,
        }))
    }

    /// A group's versions, most stable first (`v2`, `v1`, `v1beta1`, `v1alpha1`).
    fn versions_of(&self, group: &str) -> Vec<String> {
        let mut versions: Vec<String> =
            self.types.iter().filter(|t| t.group == group).map(|t| t.version.clone()).collect();
        versions.sort_unstable_by_key(|v| std::cmp::Reverse(version_rank(v)));
        versions.dedup();
        versions
    }
}

/// Orders Kubernetes versions: GA above beta above alpha, then by number.
fn version_rank(version: &str) -> (u8, u32, u32) {
    let rest = version.strip_prefix('v').unwrap_or(version);
    let digits = |s: &str| -> (u32, usize) {
        let end = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
        (s[..end].parse().unwrap_or(0), end)
    };
    let (major, end) = digits(rest);
    let tail = &rest[end..];
    if tail.is_empty() {
        return (3, major, 0);
    }
    let (stability, tail) = if let Some(t) = tail.strip_prefix("beta") {
        (2, t)
    } else if let Some(t) = tail.strip_prefix("alpha") {
        (1, t)
    } else {
        (0, tail)
    };
    (stability, major, digits(tail).0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_rank_ga_first() {
        let mut v = vec!["v1alpha1", "v1", "v1beta1", "v2beta1", "v2"];
        v.sort_by_key(|v| std::cmp::Reverse(version_rank(v)));
        assert_eq!(v, ["v2", "v1", "v2beta1", "v1beta1", "v1alpha1"]);
    }

    #[test]
    fn find_by_kind_or_plural() {
        let r = Registry::builtin();
        assert_eq!(r.find("v1", "Pod").map(|t| t.plural.as_str()), Some("pods"));
        assert_eq!(r.find("apps/v1", "deployments").map(|t| t.kind.as_str()), Some("Deployment"));
        assert!(r.find("apps/v2", "deployments").is_none());
    }
}
