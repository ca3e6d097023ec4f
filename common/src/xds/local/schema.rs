//! The YAML schema of the local config file: a thin, human-friendly mirror of the protos
//! (IP addresses as text, enums by their proto names, camelCase field names), converted into
//! the exact wire types the xDS client would have received.
//!
//! ```yaml
//! workloads:
//!   - name: client
//!     namespace: default
//!     addresses: [10.0.1.2]
//!     serviceAccount: client
//!     node: node-a
//!     services:
//!       default/echo.default.svc.cluster.local: [{servicePort: 80, targetPort: 8080}]
//! services:
//!   - name: echo
//!     namespace: default
//!     hostname: echo.default.svc.cluster.local
//!     addresses: [10.96.0.10]
//!     ports: [{servicePort: 80, targetPort: 8080, appProtocol: HTTP11}]
//! policies:
//!   - name: deny-sleep
//!     namespace: default
//!     scope: NAMESPACE
//!     action: DENY
//!     rules: [{clauses: [{matches: [{principals: [{exact: cluster.local/ns/default/sa/sleep}]}]}]}]
//! ```
//! `extensions` fields (opaque `Any`s) have no YAML form.

use std::collections::BTreeMap;
use std::net::IpAddr;

use ipnet::IpNet;
use proto::security as sec;
use proto::workload as wl;
use serde::Deserialize;

/// Default HBONE port of a waypoint or gateway.
pub const DEFAULT_HBONE_PORT: u32 = 15008;

/// A whole local config file.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LocalConfig {
    #[serde(default)]
    pub workloads: Vec<WorkloadSpec>,
    #[serde(default)]
    pub services: Vec<ServiceSpec>,
    #[serde(default)]
    pub policies: Vec<PolicySpec>,
    /// The waypoint's L7 routes (`ambient.waypoint.v1alpha1`); see [`super::routes`].
    #[serde(default)]
    pub routes: Vec<super::routes::RouteSpec>,
    /// The waypoint's L7 policies; see [`super::routes::WaypointPolicySpec`].
    #[serde(default)]
    pub waypoint_policies: Vec<super::routes::WaypointPolicySpec>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct WorkloadSpec {
    /// Defaults to `<clusterId or Kubernetes>//Pod/<namespace>/<name>`.
    #[serde(default)]
    pub uid: String,
    pub name: String,
    pub namespace: String,
    #[serde(default)]
    pub addresses: Vec<IpAddr>,
    #[serde(default)]
    pub hostname: String,
    #[serde(default)]
    pub network: String,
    /// NONE, HBONE (default) or LEGACY_ISTIO_MTLS.
    #[serde(default)]
    pub tunnel_protocol: Option<String>,
    #[serde(default)]
    pub trust_domain: String,
    #[serde(default)]
    pub service_account: String,
    #[serde(default)]
    pub waypoint: Option<GatewaySpec>,
    #[serde(default)]
    pub network_gateway: Option<GatewaySpec>,
    #[serde(default)]
    pub node: String,
    #[serde(default)]
    pub canonical_name: String,
    #[serde(default)]
    pub canonical_revision: String,
    #[serde(default)]
    pub workload_type: Option<String>,
    #[serde(default)]
    pub workload_name: String,
    #[serde(default)]
    pub native_tunnel: bool,
    #[serde(default)]
    pub application_tunnel: Option<ApplicationTunnelSpec>,
    /// `namespace/hostname` -> ports of that service served by this workload.
    #[serde(default)]
    pub services: BTreeMap<String, Vec<PortSpec>>,
    #[serde(default)]
    pub authorization_policies: Vec<String>,
    /// HEALTHY (default) or UNHEALTHY.
    #[serde(default)]
    pub status: Option<String>,
    #[serde(default)]
    pub cluster_id: String,
    #[serde(default)]
    pub locality: Option<LocalitySpec>,
    #[serde(default)]
    pub network_mode: Option<String>,
    #[serde(default)]
    pub capacity: Option<u32>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ApplicationTunnelSpec {
    pub protocol: String,
    #[serde(default)]
    pub port: u32,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LocalitySpec {
    #[serde(default)]
    pub region: String,
    #[serde(default)]
    pub zone: String,
    #[serde(default)]
    pub subzone: String,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PortSpec {
    pub service_port: u32,
    /// Defaults to the service port.
    #[serde(default)]
    pub target_port: Option<u32>,
    #[serde(default)]
    pub app_protocol: Option<String>,
}

/// A waypoint or network gateway: by address or by service hostname.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct GatewaySpec {
    #[serde(default)]
    pub address: Option<IpAddr>,
    #[serde(default)]
    pub network: String,
    #[serde(default)]
    pub hostname: Option<NamespacedHostnameSpec>,
    #[serde(default)]
    pub hbone_mtls_port: Option<u32>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct NamespacedHostnameSpec {
    pub namespace: String,
    pub hostname: String,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ServiceSpec {
    pub name: String,
    pub namespace: String,
    pub hostname: String,
    #[serde(default)]
    pub addresses: Vec<IpAddr>,
    #[serde(default)]
    pub network: String,
    #[serde(default)]
    pub ports: Vec<PortSpec>,
    #[serde(default)]
    pub subject_alt_names: Vec<String>,
    #[serde(default)]
    pub waypoint: Option<GatewaySpec>,
    #[serde(default)]
    pub load_balancing: Option<LoadBalancingSpec>,
    #[serde(default)]
    pub ip_families: Option<String>,
    #[serde(default)]
    pub canonical: bool,
    #[serde(default)]
    pub ingress_use_waypoint: bool,
    #[serde(default)]
    pub weighted_waypoints: Vec<WeightedWaypointSpec>,
    #[serde(default)]
    pub visibility: Option<String>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LoadBalancingSpec {
    #[serde(default)]
    pub routing_preference: Vec<String>,
    #[serde(default)]
    pub mode: Option<String>,
    #[serde(default)]
    pub health_policy: Option<String>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct WeightedWaypointSpec {
    pub destination: GatewaySpec,
    pub weight: u32,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PolicySpec {
    pub name: String,
    pub namespace: String,
    /// GLOBAL, NAMESPACE or WORKLOAD_SELECTOR.
    pub scope: String,
    /// ALLOW or DENY.
    pub action: String,
    #[serde(default)]
    pub rules: Vec<RuleSpec>,
    #[serde(default)]
    pub dry_run: bool,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RuleSpec {
    #[serde(default)]
    pub clauses: Vec<ClauseSpec>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ClauseSpec {
    #[serde(default)]
    pub matches: Vec<MatchSpec>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct MatchSpec {
    #[serde(default)]
    pub namespaces: Vec<StringMatchSpec>,
    #[serde(default)]
    pub not_namespaces: Vec<StringMatchSpec>,
    #[serde(default)]
    pub principals: Vec<StringMatchSpec>,
    #[serde(default)]
    pub not_principals: Vec<StringMatchSpec>,
    #[serde(default)]
    pub source_ips: Vec<IpNetSpec>,
    #[serde(default)]
    pub not_source_ips: Vec<IpNetSpec>,
    #[serde(default)]
    pub destination_ips: Vec<IpNetSpec>,
    #[serde(default)]
    pub not_destination_ips: Vec<IpNetSpec>,
    #[serde(default)]
    pub destination_ports: Vec<u32>,
    #[serde(default)]
    pub not_destination_ports: Vec<u32>,
    #[serde(default)]
    pub service_accounts: Vec<ServiceAccountSpec>,
    #[serde(default)]
    pub not_service_accounts: Vec<ServiceAccountSpec>,
}

/// `{exact: x}`, `{prefix: x}`, `{suffix: x}` or `{presence: {}}`.
#[derive(Clone, Debug, Deserialize)]
#[serde(try_from = "StringMatchFields")]
pub enum StringMatchSpec {
    Exact(String),
    Prefix(String),
    Suffix(String),
    Presence,
}

/// The YAML form of a string match: exactly one key set.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct StringMatchFields {
    exact: Option<String>,
    prefix: Option<String>,
    suffix: Option<String>,
    presence: Option<serde_yaml_ng::Value>,
}

impl TryFrom<StringMatchFields> for StringMatchSpec {
    type Error = String;
    fn try_from(f: StringMatchFields) -> Result<Self, String> {
        match (f.exact, f.prefix, f.suffix, f.presence) {
            (Some(v), None, None, None) => Ok(Self::Exact(v)),
            (None, Some(v), None, None) => Ok(Self::Prefix(v)),
            (None, None, Some(v), None) => Ok(Self::Suffix(v)),
            (None, None, None, Some(_)) => Ok(Self::Presence),
            _ => Err("a string match needs exactly one of exact, prefix, suffix, presence".into()),
        }
    }
}

/// An address or CIDR: `10.0.0.1` or `10.0.0.0/8`.
#[derive(Clone, Debug)]
pub struct IpNetSpec(pub IpNet);

impl<'de> Deserialize<'de> for IpNetSpec {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        let net = match s.parse::<IpNet>() {
            Ok(net) => net,
            Err(_) => s.parse::<IpAddr>().map(IpNet::from).map_err(|_| {
                serde::de::Error::custom(format!("{s:?} is neither an IP address nor a CIDR"))
            })?,
        };
        Ok(Self(net))
    }
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ServiceAccountSpec {
    pub namespace: String,
    pub service_account: String,
}

/// A conversion error, naming the resource and field involved.
#[derive(Debug, thiserror::Error)]
#[error("{resource}: {message}")]
pub struct SchemaError {
    pub resource: String,
    pub message: String,
}

/// Resolves an enum by its proto name (an absent value is the proto default, 0).
fn enum_value(value: &Option<String>, parse: fn(&str) -> Option<i32>, what: &str) -> Result<i32, String> {
    match value {
        None => Ok(0),
        Some(name) => parse(name).ok_or_else(|| format!("unknown {what} {name:?}")),
    }
}

fn ip_to_bytes(ip: IpAddr) -> Vec<u8> {
    match ip {
        IpAddr::V4(v4) => v4.octets().to_vec(),
        IpAddr::V6(v6) => v6.octets().to_vec(),
    }
}

impl PortSpec {
    fn to_proto(&self) -> Result<wl::Port, String> {
        let app_protocol = enum_value(
            &self.app_protocol,
            |s| wl::AppProtocol::from_str_name(s).map(|v| v as i32),
            "appProtocol",
        )?;
        Ok(wl::Port {
            service_port: self.service_port,
            target_port: self.target_port.unwrap_or(self.service_port),
            app_protocol,
        })
    }
}

impl GatewaySpec {
    fn to_proto(&self) -> Result<wl::GatewayAddress, String> {
        use wl::gateway_address::Destination;
        let destination = match (&self.address, &self.hostname) {
            (Some(ip), None) => Destination::Address(wl::NetworkAddress {
                network: self.network.clone(),
                address: ip_to_bytes(*ip),
                length: None,
            }),
            (None, Some(h)) => Destination::Hostname(wl::NamespacedHostname {
                namespace: h.namespace.clone(),
                hostname: h.hostname.clone(),
            }),
            _ => return Err("a gateway needs exactly one of address or hostname".into()),
        };
        Ok(wl::GatewayAddress {
            destination: Some(destination),
            hbone_mtls_port: self.hbone_mtls_port.unwrap_or(DEFAULT_HBONE_PORT),
        })
    }
}

impl WorkloadSpec {
    /// The resource name (uid), defaulted from cluster, namespace and name.
    pub fn resource_name(&self) -> String {
        if !self.uid.is_empty() {
            return self.uid.clone();
        }
        let cluster = if self.cluster_id.is_empty() { "Kubernetes" } else { &self.cluster_id };
        format!("{cluster}//Pod/{}/{}", self.namespace, self.name)
    }

    pub fn to_proto(&self) -> Result<wl::Workload, String> {
        let tunnel_protocol = match &self.tunnel_protocol {
            None => wl::TunnelProtocol::Hbone as i32,
            some => enum_value(
                some,
                |s| wl::TunnelProtocol::from_str_name(s).map(|v| v as i32),
                "tunnelProtocol",
            )?,
        };
        let mut services = BTreeMap::new();
        for (svc, ports) in &self.services {
            let ports = ports.iter().map(PortSpec::to_proto).collect::<Result<_, _>>()?;
            services.insert(svc.clone(), wl::PortList { ports });
        }
        let application_tunnel = match &self.application_tunnel {
            None => None,
            Some(t) => Some(wl::ApplicationTunnel {
                protocol: enum_value(
                    &Some(t.protocol.clone()),
                    |s| wl::application_tunnel::Protocol::from_str_name(s).map(|v| v as i32),
                    "applicationTunnel.protocol",
                )?,
                port: t.port,
            }),
        };
        Ok(wl::Workload {
            uid: self.resource_name(),
            name: self.name.clone(),
            namespace: self.namespace.clone(),
            addresses: self.addresses.iter().copied().map(ip_to_bytes).collect(),
            hostname: self.hostname.clone(),
            network: self.network.clone(),
            tunnel_protocol,
            trust_domain: self.trust_domain.clone(),
            service_account: self.service_account.clone(),
            waypoint: self.waypoint.as_ref().map(GatewaySpec::to_proto).transpose()?,
            network_gateway: self.network_gateway.as_ref().map(GatewaySpec::to_proto).transpose()?,
            node: self.node.clone(),
            canonical_name: self.canonical_name.clone(),
            canonical_revision: self.canonical_revision.clone(),
            workload_type: enum_value(
                &self.workload_type,
                |s| wl::WorkloadType::from_str_name(s).map(|v| v as i32),
                "workloadType",
            )?,
            workload_name: self.workload_name.clone(),
            native_tunnel: self.native_tunnel,
            application_tunnel,
            services,
            authorization_policies: self.authorization_policies.clone(),
            status: enum_value(
                &self.status,
                |s| wl::WorkloadStatus::from_str_name(s).map(|v| v as i32),
                "status",
            )?,
            cluster_id: self.cluster_id.clone(),
            locality: self.locality.as_ref().map(|l| wl::Locality {
                region: l.region.clone(),
                zone: l.zone.clone(),
                subzone: l.subzone.clone(),
            }),
            network_mode: enum_value(
                &self.network_mode,
                |s| wl::NetworkMode::from_str_name(s).map(|v| v as i32),
                "networkMode",
            )?,
            extensions: vec![],
            capacity: self.capacity,
        })
    }
}

impl ServiceSpec {
    pub fn resource_name(&self) -> String {
        format!("{}/{}", self.namespace, self.hostname)
    }

    pub fn to_proto(&self) -> Result<wl::Service, String> {
        let load_balancing = match &self.load_balancing {
            None => None,
            Some(lb) => Some(wl::LoadBalancing {
                routing_preference: lb
                    .routing_preference
                    .iter()
                    .map(|s| {
                        enum_value(
                            &Some(s.clone()),
                            |s| wl::load_balancing::Scope::from_str_name(s).map(|v| v as i32),
                            "routingPreference",
                        )
                    })
                    .collect::<Result<_, _>>()?,
                mode: enum_value(
                    &lb.mode,
                    |s| wl::load_balancing::Mode::from_str_name(s).map(|v| v as i32),
                    "loadBalancing.mode",
                )?,
                health_policy: enum_value(
                    &lb.health_policy,
                    |s| wl::load_balancing::HealthPolicy::from_str_name(s).map(|v| v as i32),
                    "loadBalancing.healthPolicy",
                )?,
            }),
        };
        Ok(wl::Service {
            name: self.name.clone(),
            namespace: self.namespace.clone(),
            hostname: self.hostname.clone(),
            addresses: self
                .addresses
                .iter()
                .map(|ip| wl::NetworkAddress {
                    network: self.network.clone(),
                    address: ip_to_bytes(*ip),
                    length: None,
                })
                .collect(),
            ports: self.ports.iter().map(PortSpec::to_proto).collect::<Result<_, _>>()?,
            subject_alt_names: self.subject_alt_names.clone(),
            waypoint: self.waypoint.as_ref().map(GatewaySpec::to_proto).transpose()?,
            load_balancing,
            ip_families: enum_value(
                &self.ip_families,
                |s| wl::IpFamilies::from_str_name(s).map(|v| v as i32),
                "ipFamilies",
            )?,
            extensions: vec![],
            canonical: self.canonical,
            ingress_use_waypoint: self.ingress_use_waypoint,
            weighted_waypoints: self
                .weighted_waypoints
                .iter()
                .map(|w| {
                    Ok(wl::WeightedWaypoint {
                        destination: Some(w.destination.to_proto()?),
                        weight: w.weight,
                    })
                })
                .collect::<Result<_, String>>()?,
            visibility: enum_value(
                &self.visibility,
                |s| wl::service::Visibility::from_str_name(s).map(|v| v as i32),
                "visibility",
            )?,
        })
    }
}

impl StringMatchSpec {
    fn to_proto(&self) -> sec::StringMatch {
        use sec::string_match::MatchType;
        let m = match self {
            Self::Exact(s) => MatchType::Exact(s.clone()),
            Self::Prefix(s) => MatchType::Prefix(s.clone()),
            Self::Suffix(s) => MatchType::Suffix(s.clone()),
            Self::Presence => MatchType::Presence(()),
        };
        sec::StringMatch { match_type: Some(m) }
    }
}

fn strings(v: &[StringMatchSpec]) -> Vec<sec::StringMatch> {
    v.iter().map(StringMatchSpec::to_proto).collect()
}

fn nets(v: &[IpNetSpec]) -> Vec<sec::Address> {
    v.iter()
        .map(|n| sec::Address { address: ip_to_bytes(n.0.addr()), length: u32::from(n.0.prefix_len()) })
        .collect()
}

fn accounts(v: &[ServiceAccountSpec]) -> Vec<sec::ServiceAccountMatch> {
    v.iter()
        .map(|a| sec::ServiceAccountMatch {
            namespace: a.namespace.clone(),
            service_account: a.service_account.clone(),
        })
        .collect()
}

impl MatchSpec {
    fn to_proto(&self) -> sec::Match {
        sec::Match {
            namespaces: strings(&self.namespaces),
            not_namespaces: strings(&self.not_namespaces),
            principals: strings(&self.principals),
            not_principals: strings(&self.not_principals),
            source_ips: nets(&self.source_ips),
            not_source_ips: nets(&self.not_source_ips),
            destination_ips: nets(&self.destination_ips),
            not_destination_ips: nets(&self.not_destination_ips),
            destination_ports: self.destination_ports.clone(),
            not_destination_ports: self.not_destination_ports.clone(),
            service_accounts: accounts(&self.service_accounts),
            not_service_accounts: accounts(&self.not_service_accounts),
            extensions: vec![],
        }
    }
}

impl PolicySpec {
    pub fn resource_name(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    pub fn to_proto(&self) -> Result<sec::Authorization, String> {
        Ok(sec::Authorization {
            name: self.name.clone(),
            namespace: self.namespace.clone(),
            scope: enum_value(
                &Some(self.scope.clone()),
                |s| sec::Scope::from_str_name(s).map(|v| v as i32),
                "scope",
            )?,
            action: enum_value(
                &Some(self.action.clone()),
                |s| sec::Action::from_str_name(s).map(|v| v as i32),
                "action",
            )?,
            rules: self
                .rules
                .iter()
                .map(|r| sec::Rule {
                    clauses: r
                        .clauses
                        .iter()
                        .map(|c| sec::Clause { matches: c.matches.iter().map(MatchSpec::to_proto).collect() })
                        .collect(),
                })
                .collect(),
            dry_run: self.dry_run,
            extensions: vec![],
        })
    }
}

/// One resource ready to hand to a handler: type URL, name and encoded body.
#[derive(Clone, Debug, PartialEq)]
pub struct EncodedResource {
    pub type_url: &'static str,
    pub name: String,
    pub body: prost_types::Any,
}

impl EncodedResource {
    /// Encodes `msg` as the body of resource `name` of `type_url`.
    pub fn new<M: prost::Message>(type_url: &'static str, name: String, msg: &M) -> Self {
        let body = prost_types::Any { type_url: type_url.into(), value: msg.encode_to_vec() };
        Self { type_url, name, body }
    }
}

impl LocalConfig {
    /// Parses a YAML document.
    pub fn from_yaml(text: &str) -> Result<Self, serde_yaml_ng::Error> {
        serde_yaml_ng::from_str(text)
    }

    /// Converts every entry into its wire resource. Fails on the first entry that cannot be
    /// expressed (unknown enum name, malformed gateway), naming it.
    pub fn to_resources(&self) -> Result<Vec<EncodedResource>, SchemaError> {
        let mut out = Vec::with_capacity(self.workloads.len() + self.services.len() + self.policies.len());
        let err = |resource: String| move |message| SchemaError { resource, message };
        for w in &self.workloads {
            let name = w.resource_name();
            let workload = w.to_proto().map_err(err(format!("workload {name}")))?;
            let address = wl::Address { r#type: Some(wl::address::Type::Workload(workload)) };
            out.push(EncodedResource::new(proto::ADDRESS_TYPE_URL, name, &address));
        }
        for s in &self.services {
            let name = s.resource_name();
            let service = s.to_proto().map_err(err(format!("service {name}")))?;
            let address = wl::Address { r#type: Some(wl::address::Type::Service(service)) };
            out.push(EncodedResource::new(proto::ADDRESS_TYPE_URL, name, &address));
        }
        for p in &self.policies {
            let name = p.resource_name();
            let policy = p.to_proto().map_err(err(format!("policy {name}")))?;
            out.push(EncodedResource::new(proto::AUTHORIZATION_TYPE_URL, name, &policy));
        }
        for r in &self.routes {
            let name = r.resource_name();
            let route = r.to_proto().map_err(err(format!("route {name}")))?;
            out.push(EncodedResource::new(proto::WAYPOINT_RESOURCE_TYPE_URL, name, &route));
        }
        for p in &self.waypoint_policies {
            let name = p.resource_name();
            let policy = p.to_proto().map_err(err(format!("waypoint policy {name}")))?;
            out.push(EncodedResource::new(proto::WAYPOINT_RESOURCE_TYPE_URL, name, &policy));
        }
        Ok(out)
    }
}
