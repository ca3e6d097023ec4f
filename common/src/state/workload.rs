//! Workloads and services as ztunnel routes on them, converted from `istio.workload` on
//! receipt so that proxies never parse bytes or enum integers on the hot path.

use std::collections::BTreeMap;
use std::net::IpAddr;

use crate::identity::Identity;
use crate::xds::validate::ip_bytes;
use proto::workload as wl;
use serde::Serialize;

/// Trust domain of a workload that names none.
pub const DEFAULT_TRUST_DOMAIN: &str = "cluster.local";
/// Service account of a workload that names none.
pub const DEFAULT_SERVICE_ACCOUNT: &str = "default";
/// HBONE port of a gateway that names none.
pub const DEFAULT_HBONE_PORT: u16 = 15008;

/// How traffic reaches a workload.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Tunnel {
    /// HBONE to its node's ztunnel on 15008.
    Hbone,
    /// Plain TCP (the workload is outside the mesh's tunnels).
    None,
    /// A sidecar's Istio mTLS, which ztunnel does not speak: connections to it are refused.
    LegacyIstioMtls,
}

/// A port a service exposes and the port its pods listen on.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Port {
    pub service_port: u16,
    /// 0 means "same as the service port" (or as the service's own mapping).
    pub target_port: u16,
    pub app_protocol: &'static str,
}

impl Port {
    fn from_proto(p: &wl::Port) -> Result<Self, String> {
        let port = |v: u32| u16::try_from(v).map_err(|_| format!("port {v} out of range"));
        let app_protocol = wl::AppProtocol::try_from(p.app_protocol)
            .map(|a| a.as_str_name())
            .map_err(|_| format!("unknown app protocol {}", p.app_protocol))?;
        Ok(Self { service_port: port(p.service_port)?, target_port: port(p.target_port)?, app_protocol })
    }
}

/// Where a waypoint (or network gateway) is: by address or by service hostname.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum GatewayTarget {
    Address { network: String, ip: IpAddr },
    Hostname { namespace: String, hostname: String },
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Gateway {
    pub target: GatewayTarget,
    pub hbone_port: u16,
}

impl Gateway {
    fn from_proto(g: &wl::GatewayAddress) -> Result<Self, String> {
        use wl::gateway_address::Destination;
        let target = match &g.destination {
            Some(Destination::Address(a)) => {
                GatewayTarget::Address { network: a.network.clone(), ip: ip_bytes(&a.address)? }
            }
            Some(Destination::Hostname(h)) => {
                GatewayTarget::Hostname { namespace: h.namespace.clone(), hostname: h.hostname.clone() }
            }
            None => return Err("gateway has no destination".into()),
        };
        let hbone_port = match g.hbone_mtls_port {
            0 => DEFAULT_HBONE_PORT,
            p => u16::try_from(p).map_err(|_| format!("gateway port {p} out of range"))?,
        };
        Ok(Self { target, hbone_port })
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Locality {
    pub region: String,
    pub zone: String,
    pub subzone: String,
}

/// A workload (pod, VM, ECS task).
#[derive(Clone, Debug, Serialize)]
pub struct Workload {
    pub uid: String,
    pub name: String,
    pub namespace: String,
    pub addresses: Vec<IpAddr>,
    pub network: String,
    pub tunnel: Tunnel,
    /// Speaks HBONE itself (a waypoint, a gateway): never captured by ztunnel.
    pub native_tunnel: bool,
    pub identity: Identity,
    pub waypoint: Option<Gateway>,
    pub node: String,
    pub canonical_name: String,
    pub canonical_revision: String,
    pub workload_name: String,
    pub workload_type: &'static str,
    /// `namespace/hostname` of each service this workload backs -> its ports for it.
    pub services: BTreeMap<String, Vec<Port>>,
    /// `namespace/name` of WORKLOAD_SELECTOR policies that select it.
    pub authorization_policies: Vec<String>,
    pub healthy: bool,
    pub cluster_id: String,
    pub locality: Locality,
    /// Istio's `baggage` header for connections from this workload, made once.
    #[serde(skip)]
    baggage: Option<http::HeaderValue>,
}

impl Workload {
    /// The `baggage` header ztunnel sends on this workload's CONNECTs (`None` when a name in
    /// it cannot be a header value).
    pub fn baggage(&self) -> Option<&http::HeaderValue> {
        self.baggage.as_ref()
    }

    /// Makes the `baggage` header from the other fields (once, when the workload is built).
    fn with_baggage(mut self) -> Self {
        let text = format!(
            "k8s.namespace.name={},k8s.{}.name={},service.name={},service.version={},k8s.cluster.name={}",
            self.namespace,
            self.workload_type.to_ascii_lowercase(),
            self.workload_name,
            self.canonical_name,
            self.canonical_revision,
            self.cluster_id
        );
        self.baggage = http::HeaderValue::try_from(text).ok();
        self
    }

    pub fn from_proto(w: &wl::Workload) -> Result<Self, String> {
        let or = |s: &str, default: &str| if s.is_empty() { default.to_string() } else { s.to_string() };
        let identity = Identity::new(
            &or(&w.trust_domain, DEFAULT_TRUST_DOMAIN),
            &w.namespace,
            &or(&w.service_account, DEFAULT_SERVICE_ACCOUNT),
        )
        .map_err(|e| format!("workload identity: {e}"))?;
        let tunnel = match wl::TunnelProtocol::try_from(w.tunnel_protocol) {
            Ok(wl::TunnelProtocol::Hbone) => Tunnel::Hbone,
            Ok(wl::TunnelProtocol::None) => Tunnel::None,
            Ok(wl::TunnelProtocol::LegacyIstioMtls) => Tunnel::LegacyIstioMtls,
            Err(_) => return Err(format!("unsupported tunnel protocol {}", w.tunnel_protocol)),
        };
        let services = w
            .services
            .iter()
            .map(|(k, ports)| {
                Ok((k.clone(), ports.ports.iter().map(Port::from_proto).collect::<Result<_, _>>()?))
            })
            .collect::<Result<_, String>>()?;
        let locality = w.locality.as_ref().map_or_else(Locality::default, |l| Locality {
            region: l.region.clone(),
            zone: l.zone.clone(),
            subzone: l.subzone.clone(),
        });
        Ok(Self {
            uid: w.uid.clone(),
            name: w.name.clone(),
            namespace: w.namespace.clone(),
            addresses: w.addresses.iter().map(|a| ip_bytes(a)).collect::<Result<_, _>>()?,
            network: w.network.clone(),
            tunnel,
            native_tunnel: w.native_tunnel,
            identity,
            waypoint: w.waypoint.as_ref().map(Gateway::from_proto).transpose()?,
            node: w.node.clone(),
            canonical_name: or(&w.canonical_name, &w.name),
            canonical_revision: or(&w.canonical_revision, "latest"),
            workload_name: or(&w.workload_name, &w.name),
            workload_type: wl::WorkloadType::try_from(w.workload_type).map_or("unknown", |t| t.as_str_name()),
            services,
            authorization_policies: w.authorization_policies.clone(),
            healthy: w.status == wl::WorkloadStatus::Healthy as i32,
            cluster_id: or(&w.cluster_id, "Kubernetes"),
            locality,
            baggage: None,
        }
        .with_baggage())
    }
}

/// Load-balancing preferences of a service.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct LoadBalancing {
    /// `UNSPECIFIED_MODE`, `STRICT`, `FAILOVER` or `PASSTHROUGH`.
    pub mode: &'static str,
    /// Scopes in order of preference (`NODE`, `ZONE`, ...).
    pub routing_preference: Vec<&'static str>,
    /// Whether unhealthy endpoints may be chosen.
    pub allow_unhealthy: bool,
}

/// A service: virtual IPs, ports, and who may serve it.
#[derive(Clone, Debug, Serialize)]
pub struct Service {
    pub name: String,
    pub namespace: String,
    pub hostname: String,
    /// (network, VIP) pairs.
    pub vips: Vec<(String, IpAddr)>,
    pub ports: Vec<Port>,
    pub subject_alt_names: Vec<String>,
    pub waypoint: Option<Gateway>,
    pub load_balancing: Option<LoadBalancing>,
    /// `namespace/hostname`, made once.
    #[serde(skip)]
    key: String,
}

impl Service {
    pub fn from_proto(s: &wl::Service) -> Result<Self, String> {
        let load_balancing = s
            .load_balancing
            .as_ref()
            .map(|lb| {
                let mode = wl::load_balancing::Mode::try_from(lb.mode)
                    .map_err(|_| format!("unknown load-balancing mode {}", lb.mode))?
                    .as_str_name();
                let routing_preference = lb
                    .routing_preference
                    .iter()
                    .map(|s| {
                        wl::load_balancing::Scope::try_from(*s)
                            .map(|s| s.as_str_name())
                            .map_err(|_| format!("unknown routing scope {s}"))
                    })
                    .collect::<Result<_, String>>()?;
                let allow_unhealthy = lb.health_policy == wl::load_balancing::HealthPolicy::AllowAll as i32;
                Ok::<_, String>(LoadBalancing { mode, routing_preference, allow_unhealthy })
            })
            .transpose()?;
        Ok(Self {
            key: format!("{}/{}", s.namespace, s.hostname),
            name: s.name.clone(),
            namespace: s.namespace.clone(),
            hostname: s.hostname.clone(),
            vips: s
                .addresses
                .iter()
                .map(|a| Ok((a.network.clone(), ip_bytes(&a.address)?)))
                .collect::<Result<_, String>>()?,
            ports: s.ports.iter().map(Port::from_proto).collect::<Result<_, _>>()?,
            subject_alt_names: s.subject_alt_names.clone(),
            waypoint: s.waypoint.as_ref().map(Gateway::from_proto).transpose()?,
            load_balancing,
        })
    }

    /// `namespace/hostname`: the resource name and the key of endpoints.
    pub fn key(&self) -> &str {
        &self.key
    }

    pub fn port(&self, service_port: u16) -> Option<&Port> {
        self.ports.iter().find(|p| p.service_port == service_port)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_fill_identity_and_names() {
        let w = wl::Workload {
            uid: "u".into(),
            name: "p".into(),
            namespace: "ns".into(),
            addresses: vec![vec![10, 0, 0, 1]],
            tunnel_protocol: wl::TunnelProtocol::Hbone as i32,
            ..Default::default()
        };
        let w = Workload::from_proto(&w).expect("converts");
        assert_eq!(w.identity.to_string(), "spiffe://cluster.local/ns/ns/sa/default");
        assert_eq!(w.canonical_name, "p");
        assert_eq!(w.tunnel, Tunnel::Hbone);
        assert!(w.healthy);
    }

    #[test]
    fn bad_values_are_refused() {
        let w =
            wl::Workload { uid: "u".into(), name: "p".into(), namespace: "NS!".into(), ..Default::default() };
        assert!(Workload::from_proto(&w).is_err(), "invalid namespace cannot make an identity");
        let w = wl::Workload {
            uid: "u".into(),
            name: "p".into(),
            namespace: "ns".into(),
            tunnel_protocol: 7,
            ..Default::default()
        };
        assert!(Workload::from_proto(&w).unwrap_err().contains("tunnel"));
        let s = wl::Service {
            name: "s".into(),
            namespace: "ns".into(),
            hostname: "s.ns".into(),
            ports: vec![wl::Port { service_port: 70000, target_port: 1, app_protocol: 0 }],
            ..Default::default()
        };
        assert!(Service::from_proto(&s).is_err());
    }
}
