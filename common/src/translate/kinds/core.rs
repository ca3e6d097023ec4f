//! Kubernetes core (`v1`) kinds: Namespace, Service, Pod. Fields the translation reads are typed;
//! the other fields of the real API are accepted and ignored; anything else is refused.

use std::collections::BTreeMap;

use serde::Deserialize;
use serde::de::IgnoredAny;
use serde_json::Value;

/// `Service.spec`.
// The real API's fields that are accepted and ignored are never read.
#[allow(dead_code)]
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ServiceSpec {
    #[serde(default)]
    pub selector: BTreeMap<String, String>,
    #[serde(default)]
    pub ports: Vec<ServicePort>,
    #[serde(default, rename = "clusterIP")]
    pub cluster_ip: Option<String>,
    #[serde(default, rename = "clusterIPs")]
    pub cluster_ips: Vec<String>,
    #[serde(default)]
    pub r#type: Option<String>,
    /// `PreferClose` prefers endpoints close to the client, as Istio does.
    #[serde(default)]
    pub traffic_distribution: Option<String>,
    #[serde(default)]
    ip_families: IgnoredAny,
    #[serde(default)]
    ip_family_policy: IgnoredAny,
    #[serde(default)]
    session_affinity: IgnoredAny,
    #[serde(default)]
    session_affinity_config: IgnoredAny,
    #[serde(default)]
    external_traffic_policy: IgnoredAny,
    #[serde(default)]
    internal_traffic_policy: IgnoredAny,
    #[serde(default, rename = "externalIPs")]
    external_ips: IgnoredAny,
    #[serde(default)]
    external_name: IgnoredAny,
    #[serde(default, rename = "loadBalancerIP")]
    load_balancer_ip: IgnoredAny,
    #[serde(default)]
    load_balancer_class: IgnoredAny,
    #[serde(default)]
    load_balancer_source_ranges: IgnoredAny,
    #[serde(default)]
    allocate_load_balancer_node_ports: IgnoredAny,
    #[serde(default)]
    health_check_node_port: IgnoredAny,
    #[serde(default)]
    publish_not_ready_addresses: IgnoredAny,
}

// The real API's fields that are accepted and ignored are never read.
#[allow(dead_code)]
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ServicePort {
    #[serde(default)]
    pub name: String,
    #[serde(deserialize_with = "port_number")]
    pub port: u16,
    /// A number or the name of a container port.
    #[serde(default)]
    pub target_port: Option<IntOrString>,
    #[serde(default)]
    pub app_protocol: Option<String>,
    /// TCP (default), UDP or SCTP.
    #[serde(default)]
    pub protocol: Option<String>,
    #[serde(default)]
    node_port: IgnoredAny,
}

/// Kubernetes' IntOrString.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum IntOrString {
    Int(u16),
    Name(String),
}

impl<'de> Deserialize<'de> for IntOrString {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        match Value::deserialize(d)? {
            Value::Number(n) => n
                .as_u64()
                .and_then(|n| u16::try_from(n).ok())
                .filter(|n| *n > 0)
                .map(IntOrString::Int)
                .ok_or_else(|| serde::de::Error::custom(format!("port {n} is not in 1..=65535"))),
            Value::String(s) => match s.parse::<u16>() {
                Ok(n) if n > 0 => Ok(IntOrString::Int(n)),
                _ if !s.is_empty() => Ok(IntOrString::Name(s)),
                _ => Err(serde::de::Error::custom("an empty port name")),
            },
            other => Err(serde::de::Error::custom(format!("expected a port number or name, found {other}"))),
        }
    }
}

/// `Pod.spec`: what the translation reads; the rest of PodSpec is accepted and ignored.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PodSpec {
    #[serde(default)]
    pub service_account_name: Option<String>,
    #[serde(default)]
    pub service_account: Option<String>,
    #[serde(default)]
    pub node_name: String,
    #[serde(default)]
    pub host_network: bool,
    #[serde(default)]
    pub containers: Vec<Container>,
    #[serde(flatten)]
    pub rest: BTreeMap<String, Value>,
}

/// The fields of Kubernetes' PodSpec the translation ignores (any other key is a typo).
pub const POD_SPEC_IGNORED: &[&str] = &[
    "activeDeadlineSeconds",
    "affinity",
    "automountServiceAccountToken",
    "dnsConfig",
    "dnsPolicy",
    "enableServiceLinks",
    "ephemeralContainers",
    "hostAliases",
    "hostIPC",
    "hostPID",
    "hostUsers",
    "hostname",
    "imagePullSecrets",
    "initContainers",
    "nodeSelector",
    "os",
    "overhead",
    "preemptionPolicy",
    "priority",
    "priorityClassName",
    "readinessGates",
    "resourceClaims",
    "resources",
    "restartPolicy",
    "runtimeClassName",
    "schedulerName",
    "schedulingGates",
    "securityContext",
    "setHostnameAsFQDN",
    "shareProcessNamespace",
    "subdomain",
    "terminationGracePeriodSeconds",
    "tolerations",
    "topologySpreadConstraints",
    "volumes",
];

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Container {
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub ports: Vec<ContainerPort>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ContainerPort {
    #[serde(default)]
    pub name: String,
    pub container_port: u16,
}

/// `Pod.status`, written by the system: read leniently.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PodStatus {
    #[serde(default, rename = "podIP")]
    pub pod_ip: Option<String>,
    #[serde(default, rename = "podIPs")]
    pub pod_ips: Vec<PodIp>,
    #[serde(default)]
    pub phase: Option<String>,
    #[serde(default)]
    pub conditions: Vec<Condition>,
}

#[derive(Clone, Debug, Default, Deserialize)]
pub struct PodIp {
    pub ip: String,
}

#[derive(Clone, Debug, Default, Deserialize)]
pub struct Condition {
    #[serde(default, rename = "type")]
    pub kind: String,
    #[serde(default)]
    pub status: String,
}

/// `Namespace.spec` (finalizers only); its labels are what matter.
// The real API's fields that are accepted and ignored are never read.
#[allow(dead_code)]
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct NamespaceSpec {
    #[serde(default)]
    finalizers: IgnoredAny,
}

/// A port number: 1..=65535 (0 is not a port, whatever the type allows).
pub fn port_number<'de, D: serde::Deserializer<'de>>(d: D) -> Result<u16, D::Error> {
    match u16::deserialize(d)? {
        0 => Err(serde::de::Error::custom("port 0 is not a port (1..=65535)")),
        p => Ok(p),
    }
}
