//! Services and workloads, translated into `istio.workload.Address` the way istiod does for
//! ambient: a Service's cluster IPs and ports (protocol from `appProtocol` or the port name);
//! a Pod's addresses, identity, the Services that select it and its waypoint; a waypoint
//! Gateway's own Service; ServiceEntry hosts and endpoints; WorkloadEntries.
//!
//! Enrollment follows Istio: a workload is in the mesh (HBONE) when its own or its namespace's
//! `istio.io/dataplane-mode` is `ambient` (its own `none` opts out); otherwise it is a plain
//! workload (`tunnel_protocol: NONE`). A waypoint named by `istio.io/use-waypoint` that does not
//! exist (or has no address yet) is still named, so traffic to that destination is refused
//! rather than sent around the missing waypoint.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;

use proto::security as sec;
use proto::workload as wl;

use super::index::{Index, labels, labels_match};
use super::kinds::Object;
use super::kinds::core::{IntOrString, PodSpec, PodStatus, ServiceSpec};
use super::kinds::gateway::{GatewaySpec, GatewayStatus};
use super::kinds::istio::{Mtls, MtlsMode, PeerAuthenticationSpec, ServiceEntrySpec, WorkloadEntrySpec};
use super::values::{app_protocol, ip, ip_bytes};
use super::{Emitted, Fault};

/// HBONE port of waypoints.
pub const HBONE_PORT: u16 = 15008;

#[derive(Clone, Copy, PartialEq, Eq)]
enum Traffic {
    Service,
    Workload,
}

/// The waypoint a service or workload names (its own labels, then its namespace's).
fn waypoint(
    ix: &Index<'_>,
    own: &BTreeMap<String, String>,
    ns: &str,
    traffic: Traffic,
    out: &mut Emitted,
) -> Result<Option<wl::GatewayAddress>, Fault> {
    let ns_labels = ix.namespace_labels(ns);
    let (source, name) = match own.get(labels::USE_WAYPOINT) {
        Some(n) => (own, n),
        None => match ns_labels.and_then(|l| l.get(labels::USE_WAYPOINT).map(|n| (l, n))) {
            Some(found) => found,
            None => return Ok(None),
        },
    };
    if name == "none" {
        return Ok(None);
    }
    let own_label = std::ptr::eq(source, own);
    let wns = source.get(labels::USE_WAYPOINT_NAMESPACE).map_or(ns, String::as_str);
    match ix.waypoints.get(&(wns, name.as_str())) {
        Some((gw, _, _)) => {
            let serves = gw.meta.labels.get(labels::WAYPOINT_FOR).map_or("service", String::as_str);
            let ok = match traffic {
                Traffic::Service => matches!(serves, "service" | "all"),
                Traffic::Workload => matches!(serves, "workload" | "all"),
            };
            if !ok {
                // As istiod: no waypoint for this traffic, said in the status; the object
                // itself stays in the mesh.
                if own_label {
                    let what = if traffic == Traffic::Service { "services" } else { "workloads" };
                    out.note(format!(
                        "metadata.labels[{}]: waypoint {wns}/{name} does not take traffic for {what} ({}: {serves}); not used",
                        labels::USE_WAYPOINT,
                        labels::WAYPOINT_FOR
                    ));
                }
                return Ok(None);
            }
        }
        None => out.note(format!(
            "waypoint {wns}/{name} does not exist (or is not of a waypoint class): traffic that must cross it is refused until it does"
        )),
    }
    Ok(Some(wl::GatewayAddress {
        destination: Some(wl::gateway_address::Destination::Hostname(wl::NamespacedHostname {
            namespace: wns.to_string(),
            hostname: ix.hostname(wns, name),
        })),
        hbone_mtls_port: u32::from(HBONE_PORT),
    }))
}

/// Whether a workload with these labels in `ns` is enrolled in the mesh.
fn ambient(ix: &Index<'_>, own: &BTreeMap<String, String>, ns: &str) -> bool {
    match own.get(labels::DATAPLANE_MODE).map(String::as_str) {
        Some("none") => false,
        Some("ambient") => true,
        _ => ix
            .namespace_labels(ns)
            .and_then(|l| l.get(labels::DATAPLANE_MODE))
            .is_some_and(|m| m == "ambient"),
    }
}

fn push_address(out: &mut Emitted, name: String, kind: wl::address::Type) {
    out.push(proto::ADDRESS_TYPE_URL, name, &wl::Address { r#type: Some(kind) });
}

pub fn service(ix: &Index<'_>, obj: &Object, spec: &ServiceSpec, out: &mut Emitted) -> Result<(), Fault> {
    let (ns, name) = (&obj.key.namespace, &obj.key.name);
    let mut addresses = Vec::new();
    let ips: Vec<&String> = if spec.cluster_ips.is_empty() {
        spec.cluster_ip.iter().collect()
    } else {
        spec.cluster_ips.iter().collect()
    };
    for (i, a) in ips.into_iter().enumerate() {
        if a.is_empty() || a == "None" {
            continue;
        }
        let field = if spec.cluster_ips.is_empty() {
            "spec.clusterIP".to_string()
        } else {
            format!("spec.clusterIPs[{i}]")
        };
        addresses.push(wl::NetworkAddress {
            network: String::new(),
            address: ip_bytes(ip(&field, a)?),
            length: None,
        });
    }
    let mut ports = Vec::new();
    for (i, p) in spec.ports.iter().enumerate() {
        if p.protocol.as_deref().is_some_and(|proto| proto != "TCP") {
            out.note(format!("spec.ports[{i}]: only TCP ports are meshed"));
            continue;
        }
        let target_port = match &p.target_port {
            None => u32::from(p.port),
            Some(IntOrString::Int(n)) => u32::from(*n),
            // Resolved per workload, from its container ports.
            Some(IntOrString::Name(_)) => 0,
        };
        ports.push(wl::Port {
            service_port: u32::from(p.port),
            target_port,
            app_protocol: app_protocol(p.app_protocol.as_deref(), &p.name) as i32,
        });
    }
    let waypoint = waypoint(ix, &obj.meta.labels, ns, Traffic::Service, out)?;
    let prefer_close = spec.traffic_distribution.as_deref() == Some("PreferClose")
        || obj
            .meta
            .annotations
            .get("networking.istio.io/traffic-distribution")
            .is_some_and(|v| v == "PreferClose");
    let load_balancing = prefer_close.then(|| {
        use wl::load_balancing::{Mode, Scope};
        wl::LoadBalancing {
            routing_preference: [Scope::Network, Scope::Region, Scope::Zone, Scope::Subzone]
                .map(|s| s as i32)
                .to_vec(),
            mode: Mode::Failover as i32,
            health_policy: 0,
        }
    });
    // Ingress gateway traffic also crosses the waypoint (own label, else the namespace's).
    let ingress_use_waypoint = obj
        .meta
        .labels
        .get(labels::INGRESS_USE_WAYPOINT)
        .or_else(|| ix.namespace_labels(ns).and_then(|l| l.get(labels::INGRESS_USE_WAYPOINT)))
        .is_some_and(|v| v == "true");
    let hostname = ix.hostname(ns, name);
    let service = wl::Service {
        name: name.clone(),
        namespace: ns.clone(),
        hostname: hostname.clone(),
        addresses,
        ports,
        waypoint,
        load_balancing,
        ingress_use_waypoint,
        ..Default::default()
    };
    push_address(out, format!("{ns}/{hostname}"), wl::address::Type::Service(service));
    Ok(())
}

pub fn gateway(
    ix: &Index<'_>,
    obj: &Object,
    spec: &GatewaySpec,
    status: &GatewayStatus,
    out: &mut Emitted,
) -> Result<(), Fault> {
    let (ns, name) = (&obj.key.namespace, &obj.key.name);
    if !ix.settings.is_waypoint_class(&spec.gateway_class_name) {
        out.note(format!(
            "class {:?} is not a waypoint class ({:?}): not ours to run",
            spec.gateway_class_name, ix.settings.waypoint_classes
        ));
        return Ok(());
    }
    if !spec.listeners.iter().any(|l| l.port == HBONE_PORT && l.protocol == "HBONE") {
        return Err(Fault::new(
            "spec.listeners",
            "a waypoint needs a listener {name: mesh, port: 15008, protocol: HBONE}",
        ));
    }
    for (i, l) in spec.listeners.iter().enumerate() {
        if let Some(from) =
            l.allowed_routes.as_ref().and_then(|a| a.namespaces.as_ref()).and_then(|n| n.from.as_deref())
            && !matches!(from, "Same" | "All" | "Selector")
        {
            return Err(Fault::new(
                format!("spec.listeners[{i}].allowedRoutes.namespaces.from"),
                format!("{from:?} (Same, All or Selector)"),
            ));
        }
    }
    if ix.services.contains_key(&(ns.as_str(), name.as_str())) {
        // Its Service is given as an object of its own (as on Kubernetes).
        return Ok(());
    }
    let mut addresses = Vec::new();
    for (i, a) in spec.addresses.iter().chain(&status.addresses).enumerate() {
        match a.kind.as_deref() {
            None | Some("IPAddress") => {
                let field = if i < spec.addresses.len() {
                    format!("spec.addresses[{i}].value")
                } else {
                    format!("status.addresses[{}].value", i - spec.addresses.len())
                };
                let bytes = ip_bytes(ip(&field, &a.value)?);
                if !addresses.iter().any(|n: &wl::NetworkAddress| n.address == bytes) {
                    addresses.push(wl::NetworkAddress {
                        network: String::new(),
                        address: bytes,
                        length: None,
                    });
                }
            }
            Some(other) => out.note(format!("address type {other} is not used (IPAddress only)")),
        }
    }
    if addresses.is_empty() {
        out.note("no address yet (spec.addresses or status.addresses): services that use this waypoint are refused until it has one");
    }
    let hostname = ix.hostname(ns, name);
    let service = wl::Service {
        name: name.clone(),
        namespace: ns.clone(),
        hostname: hostname.clone(),
        addresses,
        ports: vec![wl::Port {
            service_port: u32::from(HBONE_PORT),
            target_port: u32::from(HBONE_PORT),
            app_protocol: 0,
        }],
        ..Default::default()
    };
    push_address(out, format!("{ns}/{hostname}"), wl::address::Type::Service(service));
    Ok(())
}

/// What a Pod, a WorkloadEntry and a ServiceEntry endpoint have in common.
struct WorkloadInput<'a> {
    uid: String,
    name: &'a str,
    ns: &'a str,
    labels: &'a BTreeMap<String, String>,
    addresses: Vec<IpAddr>,
    service_account: &'a str,
    node: &'a str,
    network: &'a str,
    workload_name: String,
    /// Named ports (container ports, or a WorkloadEntry's `ports`).
    named_ports: HashMap<&'a str, u16>,
    healthy: bool,
    host_network: bool,
    /// Is this a waypoint's own pod (gateway name)?
    waypoint_of: Option<&'a str>,
    locality: Option<wl::Locality>,
    /// Names the workload's derived policies (`pod:<name>`, ...): unique, and never a
    /// Kubernetes name (so no user object can take it).
    policy_key: String,
    /// Services it backs by declaration (a ServiceEntry's inline endpoints), beside those whose
    /// selectors match it.
    declared_services: BTreeMap<String, wl::PortList>,
    /// Outside the mesh whatever its labels say (a MESH_EXTERNAL endpoint).
    external: bool,
}

fn canonical(labels: &BTreeMap<String, String>, workload_name: &str) -> (String, String) {
    let first = |keys: &[&str]| keys.iter().find_map(|k| labels.get(*k).cloned());
    (
        first(&["service.istio.io/canonical-name", "app.kubernetes.io/name", "app"])
            .unwrap_or_else(|| workload_name.to_string()),
        first(&["service.istio.io/canonical-revision", "app.kubernetes.io/version", "version"])
            .unwrap_or_else(|| "latest".into()),
    )
}

fn build_workload(ix: &Index<'_>, w: WorkloadInput<'_>, out: &mut Emitted) -> Result<(), Fault> {
    let ns = w.ns;
    let mut services: BTreeMap<String, wl::PortList> = w.declared_services.clone();
    for ((sns, sname), (_, spec)) in &ix.services {
        if *sns != ns || spec.selector.is_empty() || !labels_match(&spec.selector, w.labels) {
            continue;
        }
        let ports = spec
            .ports
            .iter()
            .filter(|p| p.protocol.as_deref().is_none_or(|p| p == "TCP"))
            .filter_map(|p| {
                let target = match &p.target_port {
                    None => p.port,
                    Some(IntOrString::Int(n)) => *n,
                    Some(IntOrString::Name(n)) => *w.named_ports.get(n.as_str())?,
                };
                Some(wl::Port {
                    service_port: u32::from(p.port),
                    target_port: u32::from(target),
                    app_protocol: 0,
                })
            })
            .collect();
        services.insert(format!("{ns}/{}", ix.hostname(sns, sname)), wl::PortList { ports });
    }
    for ((sns, _), (_, se)) in &ix.service_entries {
        let Some(sel) = &se.workload_selector else { continue };
        if *sns != ns || !labels_match(&sel.labels, w.labels) {
            continue;
        }
        let ports: Vec<wl::Port> = se
            .ports
            .iter()
            .map(|p| {
                let target =
                    w.named_ports.get(p.name.as_str()).copied().or(p.target_port).unwrap_or(p.number);
                wl::Port {
                    service_port: u32::from(p.number),
                    target_port: u32::from(target),
                    app_protocol: 0,
                }
            })
            .collect();
        for host in &se.hosts {
            services.insert(format!("{ns}/{host}"), wl::PortList { ports: ports.clone() });
        }
    }
    let is_waypoint = w.waypoint_of.is_some_and(|g| ix.waypoints.contains_key(&(ns, g)));
    if let Some(gw) = w.waypoint_of.filter(|_| is_waypoint)
        && !ix.services.contains_key(&(ns, gw))
    {
        let port = wl::Port {
            service_port: u32::from(HBONE_PORT),
            target_port: u32::from(HBONE_PORT),
            app_protocol: 0,
        };
        services.insert(format!("{ns}/{}", ix.hostname(ns, gw)), wl::PortList { ports: vec![port] });
    }
    let enrolled = !w.external && (is_waypoint || ambient(ix, w.labels, ns));
    let waypoint = if is_waypoint { None } else { waypoint(ix, w.labels, ns, Traffic::Workload, out)? };
    let mut authorization_policies: Vec<String> = ix
        .selector_policies
        .iter()
        .filter(|(pns, sel, _)| {
            (*pns == ns || *pns == ix.settings.root_namespace) && labels_match(sel, w.labels)
        })
        .map(|(_, _, name)| name.clone())
        .collect();
    if let Some(policy) = peer_authentication(ix, ns, &w.policy_key, w.labels) {
        let name = format!("{ns}/{}", policy.name);
        authorization_policies.push(name.clone());
        out.push(proto::AUTHORIZATION_TYPE_URL, name, &policy);
    }
    let (canonical_name, canonical_revision) = canonical(w.labels, &w.workload_name);
    let workload = wl::Workload {
        uid: w.uid.clone(),
        name: w.name.to_string(),
        namespace: ns.to_string(),
        addresses: w.addresses.iter().copied().map(ip_bytes).collect(),
        network: w.network.to_string(),
        tunnel_protocol: if enrolled { wl::TunnelProtocol::Hbone } else { wl::TunnelProtocol::None } as i32,
        service_account: w.service_account.to_string(),
        waypoint,
        node: w.node.to_string(),
        canonical_name,
        canonical_revision,
        workload_name: w.workload_name.clone(),
        native_tunnel: is_waypoint,
        services,
        authorization_policies,
        status: if w.healthy { wl::WorkloadStatus::Healthy } else { wl::WorkloadStatus::Unhealthy } as i32,
        cluster_id: "Kubernetes".into(),
        locality: w.locality,
        network_mode: if w.host_network { wl::NetworkMode::HostNetwork } else { wl::NetworkMode::Standard }
            as i32,
        ..Default::default()
    };
    push_address(out, w.uid, wl::address::Type::Workload(workload));
    Ok(())
}

pub fn pod(
    ix: &Index<'_>,
    obj: &Object,
    spec: &PodSpec,
    status: &PodStatus,
    out: &mut Emitted,
) -> Result<(), Fault> {
    let (ns, name) = (&obj.key.namespace, &obj.key.name);
    if matches!(status.phase.as_deref(), Some("Succeeded" | "Failed")) {
        out.note("terminated: not in the mesh");
        return Ok(());
    }
    let mut addresses = Vec::new();
    if let (true, Some(a)) = (status.pod_ips.is_empty(), &status.pod_ip) {
        addresses.push(ip("status.podIP", a)?);
    }
    for (i, a) in status.pod_ips.iter().enumerate() {
        addresses.push(ip(&format!("status.podIPs[{i}].ip"), &a.ip)?);
    }
    if addresses.is_empty() {
        out.note("no address yet (status.podIP): not in the mesh until it has one");
        return Ok(());
    }
    let workload_name = obj
        .meta
        .owner_references
        .iter()
        .find(|o| o.kind == "ReplicaSet")
        .map(|o| o.name.rsplit_once('-').map_or(o.name.clone(), |(d, _)| d.to_string()))
        .or_else(|| obj.meta.owner_references.first().map(|o| o.name.clone()))
        .unwrap_or_else(|| name.clone());
    let named_ports = spec
        .containers
        .iter()
        .flat_map(|c| &c.ports)
        .filter(|p| !p.name.is_empty())
        .map(|p| (p.name.as_str(), p.container_port))
        .collect();
    let healthy = status.conditions.iter().find(|c| c.kind == "Ready").is_none_or(|c| c.status == "True");
    let service_account =
        spec.service_account_name.as_deref().or(spec.service_account.as_deref()).unwrap_or("default");
    let input = WorkloadInput {
        uid: format!("Kubernetes//Pod/{ns}/{name}"),
        name,
        ns,
        labels: &obj.meta.labels,
        addresses,
        service_account,
        node: &spec.node_name,
        network: "",
        workload_name,
        named_ports,
        healthy,
        host_network: spec.host_network,
        waypoint_of: obj.meta.labels.get(labels::GATEWAY_NAME).map(String::as_str),
        locality: None,
        policy_key: format!("pod:{name}"),
        declared_services: BTreeMap::new(),
        external: false,
    };
    build_workload(ix, input, out)
}

fn locality(s: &str) -> Option<wl::Locality> {
    if s.is_empty() {
        return None;
    }
    let mut parts = s.splitn(3, '/').map(str::to_string);
    Some(wl::Locality {
        region: parts.next().unwrap_or_default(),
        zone: parts.next().unwrap_or_default(),
        subzone: parts.next().unwrap_or_default(),
    })
}

pub fn workload_entry(
    ix: &Index<'_>,
    obj: &Object,
    spec: &WorkloadEntrySpec,
    out: &mut Emitted,
) -> Result<(), Fault> {
    let (ns, name) = (&obj.key.namespace, &obj.key.name);
    let address = spec.address.parse::<IpAddr>().map_err(|_| {
        Fault::new(
            "spec.address",
            format!("{:?} is not an IP address (addresses resolved by DNS are not supported)", spec.address),
        )
    })?;
    // Istio selects WorkloadEntries by spec.labels (metadata.labels when those are empty).
    let labels = if spec.labels.is_empty() { &obj.meta.labels } else { &spec.labels };
    let input = WorkloadInput {
        uid: format!("Kubernetes/networking.istio.io/WorkloadEntry/{ns}/{name}"),
        name,
        ns,
        labels,
        addresses: vec![address],
        service_account: if spec.service_account.is_empty() { "default" } else { &spec.service_account },
        node: "",
        network: &spec.network,
        workload_name: name.clone(),
        named_ports: spec.ports.iter().map(|(k, v)| (k.as_str(), *v)).collect(),
        healthy: spec.weight != Some(0),
        host_network: false,
        waypoint_of: None,
        locality: locality(&spec.locality),
        policy_key: format!("workloadentry:{name}"),
        declared_services: BTreeMap::new(),
        external: false,
    };
    build_workload(ix, input, out)
}

pub fn service_entry(
    ix: &Index<'_>,
    obj: &Object,
    spec: &ServiceEntrySpec,
    out: &mut Emitted,
) -> Result<(), Fault> {
    let (ns, name) = (&obj.key.namespace, &obj.key.name);
    match spec.resolution.as_deref() {
        None | Some("NONE" | "STATIC") => {}
        Some(r @ ("DNS" | "DNS_ROUND_ROBIN")) => {
            return Err(Fault::new(
                "spec.resolution",
                format!(
                    "{r} is not supported yet (ztunnel resolves no hostnames); use STATIC with endpoint addresses"
                ),
            ));
        }
        Some(other) => return Err(Fault::new("spec.resolution", format!("unknown resolution {other:?}"))),
    }
    let external = match spec.location.as_deref() {
        None | Some("MESH_INTERNAL") => false,
        Some("MESH_EXTERNAL") => true,
        Some(other) => return Err(Fault::new("spec.location", format!("unknown location {other:?}"))),
    };
    if spec.hosts.is_empty() {
        return Err(Fault::new("spec.hosts", "at least one host is required"));
    }
    if let Some(i) = spec.hosts.iter().position(|h| h.is_empty() || h.contains(['/', ' '])) {
        return Err(Fault::new(format!("spec.hosts[{i}]"), "is not a host name"));
    }
    let mut addresses = Vec::new();
    for (i, a) in spec.addresses.iter().enumerate() {
        let field = format!("spec.addresses[{i}]");
        let net = super::values::net(&field, a)?;
        if (net.address.len() == 4 && net.length != 32) || (net.address.len() == 16 && net.length != 128) {
            return Err(Fault::new(field, "only single addresses are supported, not ranges"));
        }
        addresses.push(wl::NetworkAddress { network: String::new(), address: net.address, length: None });
    }
    let mut ports = Vec::new();
    for p in &spec.ports {
        ports.push(wl::Port {
            service_port: u32::from(p.number),
            target_port: u32::from(p.target_port.unwrap_or(p.number)),
            app_protocol: app_protocol(p.protocol.as_deref(), &p.name) as i32,
        });
    }
    let waypoint = waypoint(ix, &obj.meta.labels, ns, Traffic::Service, out)?;
    for host in &spec.hosts {
        let service = wl::Service {
            name: name.clone(),
            namespace: ns.clone(),
            hostname: host.clone(),
            addresses: addresses.clone(),
            ports: ports.clone(),
            subject_alt_names: spec.subject_alt_names.clone(),
            waypoint: waypoint.clone(),
            ..Default::default()
        };
        push_address(out, format!("{ns}/{host}"), wl::address::Type::Service(service));
    }
    for (i, ep) in spec.endpoints.iter().enumerate() {
        let field = format!("spec.endpoints[{i}].address");
        let address = ep
            .address
            .parse::<IpAddr>()
            .map_err(|_| Fault::new(field, format!("{:?} is not an IP address", ep.address)))?;
        let ep_ports: Vec<wl::Port> = spec
            .ports
            .iter()
            .map(|p| {
                let target = ep.ports.get(&p.name).copied().or(p.target_port).unwrap_or(p.number);
                wl::Port {
                    service_port: u32::from(p.number),
                    target_port: u32::from(target),
                    app_protocol: 0,
                }
            })
            .collect();
        let declared_services = spec
            .hosts
            .iter()
            .map(|h| (format!("{ns}/{h}"), wl::PortList { ports: ep_ports.clone() }))
            .collect();
        // Istio selects an endpoint by the ServiceEntry's labels and its own.
        let mut labels = obj.meta.labels.clone();
        labels.extend(ep.labels.clone());
        let input = WorkloadInput {
            uid: format!("Kubernetes/networking.istio.io/ServiceEntry/{ns}/{name}/{address}"),
            name,
            ns,
            labels: &labels,
            addresses: vec![address],
            service_account: if ep.service_account.is_empty() { "default" } else { &ep.service_account },
            node: "",
            network: &ep.network,
            workload_name: name.clone(),
            named_ports: HashMap::new(),
            healthy: ep.weight != Some(0),
            host_network: false,
            waypoint_of: None,
            locality: locality(&ep.locality),
            policy_key: format!("serviceentry:{name}:{address}"),
            declared_services,
            external,
        };
        build_workload(ix, input, out)?;
    }
    Ok(())
}

/// The mTLS mode of a PeerAuthentication level (`None`: UNSET, inherit).
fn mode(m: Option<&Mtls>) -> Option<MtlsMode> {
    m.map(|m| m.mode).filter(|m| *m != MtlsMode::Unset)
}

/// The L4 policy that carries a workload's effective PeerAuthentication: a DENY of plaintext
/// (no peer identity) on the ports where mTLS is STRICT. Workload-level settings override the
/// namespace's, which override the mesh's (root namespace); PERMISSIVE and DISABLE both let
/// plaintext in (ztunnel still speaks mTLS to every peer that can).
fn peer_authentication(
    ix: &Index<'_>,
    ns: &str,
    workload: &str,
    labels: &BTreeMap<String, String>,
) -> Option<sec::Authorization> {
    let root = ix.settings.root_namespace.as_str();
    let mut mesh = None;
    let mut namespace = None;
    let mut own = None;
    // The oldest of a level wins (then the first by name), as in Istio; a selector policy in
    // the root namespace applies to nothing.
    let mut candidates: Vec<&(&Object, &PeerAuthenticationSpec)> = ix.peer_authentications.iter().collect();
    candidates
        .sort_by_key(|(o, _)| (o.meta.creation_timestamp.clone().unwrap_or_default(), o.key.name.clone()));
    for (obj, pa) in candidates {
        let pns = obj.key.namespace.as_str();
        match &pa.selector {
            None if pns == root && mesh.is_none() => mesh = Some(*pa),
            None if pns == ns && pns != root && namespace.is_none() => namespace = Some(*pa),
            Some(sel)
                if pns == ns && pns != root && own.is_none() && labels_match(&sel.match_labels, labels) =>
            {
                own = Some(*pa)
            }
            _ => {}
        }
    }
    let base = [own, namespace, mesh]
        .iter()
        .flatten()
        .find_map(|pa| mode(pa.mtls.as_ref()))
        .unwrap_or(MtlsMode::Permissive);
    let ports = own.map(|pa| &pa.port_level_mtls);
    let with_mode = |strict: bool| -> Vec<u32> {
        ports
            .into_iter()
            .flatten()
            .filter(|(_, m)| mode(Some(m)).is_some_and(|m| (m == MtlsMode::Strict) == strict))
            .map(|(p, _)| u32::from(*p))
            .collect()
    };
    let plaintext = vec![sec::StringMatch { match_type: Some(sec::string_match::MatchType::Presence(())) }];
    let m = if base == MtlsMode::Strict {
        sec::Match {
            not_principals: plaintext,
            not_destination_ports: with_mode(false),
            ..Default::default()
        }
    } else {
        let strict_ports = with_mode(true);
        if strict_ports.is_empty() {
            return None;
        }
        sec::Match { not_principals: plaintext, destination_ports: strict_ports, ..Default::default() }
    };
    Some(sec::Authorization {
        name: format!("peer-authentication:{workload}"),
        namespace: ns.to_string(),
        scope: sec::Scope::WorkloadSelector as i32,
        action: sec::Action::Deny as i32,
        rules: vec![sec::Rule { clauses: vec![sec::Clause { matches: vec![m] }] }],
        dry_run: false,
        extensions: vec![],
    })
}
