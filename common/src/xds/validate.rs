//! Checks run on receipt, before a resource is applied. What fails here is rejected (NACKed)
//! and the previous version of that resource stays in force, except for an Authorization in
//! ztunnel's state, which is held in its fail-safe form instead (see `state::policy`): what
//! cannot be applied never widens access.

use proto::security::{Authorization, Match, StringMatch};
use proto::workload::{Address, GatewayAddress, NetworkAddress, Port, Service, Workload, address};

/// Validates an `istio.workload.Address` named `name`.
pub fn address(name: &str, a: &Address) -> Result<(), String> {
    match &a.r#type {
        None => Err("Address has neither workload nor service".into()),
        Some(address::Type::Workload(w)) => workload(name, w),
        Some(address::Type::Service(s)) => service(name, s),
    }
}

fn workload(name: &str, w: &Workload) -> Result<(), String> {
    if w.uid.is_empty() {
        return Err("workload has no uid".into());
    }
    if w.uid != name {
        return Err(format!("workload uid {:?} differs from resource name", w.uid));
    }
    if w.name.is_empty() || w.namespace.is_empty() {
        return Err("workload needs a name and a namespace".into());
    }
    for a in &w.addresses {
        ip_bytes(a).map_err(|e| format!("workload address: {e}"))?;
    }
    for gw in w.waypoint.iter().chain(w.network_gateway.iter()) {
        gateway(gw)?;
    }
    for (svc, ports) in &w.services {
        if !svc.contains('/') {
            return Err(format!("service key {svc:?} is not namespace/hostname"));
        }
        ports.ports.iter().try_for_each(port)?;
    }
    Ok(())
}

fn service(name: &str, s: &Service) -> Result<(), String> {
    if s.name.is_empty() || s.namespace.is_empty() || s.hostname.is_empty() {
        return Err("service needs a name, a namespace and a hostname".into());
    }
    let expected = format!("{}/{}", s.namespace, s.hostname);
    if name != expected {
        return Err(format!("service resource name should be {expected:?}"));
    }
    for a in &s.addresses {
        network_address(a)?;
    }
    s.ports.iter().try_for_each(port)?;
    if let Some(gw) = &s.waypoint {
        gateway(gw)?;
    }
    for w in &s.weighted_waypoints {
        w.destination.as_ref().map(gateway).transpose()?;
    }
    Ok(())
}

fn port(p: &Port) -> Result<(), String> {
    if p.service_port == 0 || p.service_port > 65535 || p.target_port > 65535 {
        return Err(format!("invalid port {} -> {}", p.service_port, p.target_port));
    }
    Ok(())
}

fn gateway(g: &GatewayAddress) -> Result<(), String> {
    use proto::workload::gateway_address::Destination;
    match &g.destination {
        None => return Err("gateway address has no destination".into()),
        Some(Destination::Address(a)) => network_address(a)?,
        Some(Destination::Hostname(h)) if h.hostname.is_empty() => {
            return Err("gateway hostname is empty".into());
        }
        Some(Destination::Hostname(_)) => {}
    }
    if g.hbone_mtls_port == 0 || g.hbone_mtls_port > 65535 {
        return Err(format!("invalid gateway HBONE port {}", g.hbone_mtls_port));
    }
    Ok(())
}

fn network_address(a: &NetworkAddress) -> Result<(), String> {
    let ip = ip_bytes(&a.address)?;
    if let Some(len) = a.length {
        prefix_len(ip, len)?;
    }
    Ok(())
}

/// An IPv4 or IPv6 address as carried on the wire (4 or 16 bytes).
pub fn ip_bytes(b: &[u8]) -> Result<std::net::IpAddr, String> {
    match b.len() {
        4 => Ok(std::net::IpAddr::from(<[u8; 4]>::try_from(b).map_err(|e| e.to_string())?)),
        16 => Ok(std::net::IpAddr::from(<[u8; 16]>::try_from(b).map_err(|e| e.to_string())?)),
        n => Err(format!("address of {n} bytes (expected 4 or 16)")),
    }
}

fn prefix_len(ip: std::net::IpAddr, len: u32) -> Result<(), String> {
    let max = if ip.is_ipv4() { 32 } else { 128 };
    if len > max {
        return Err(format!("prefix length {len} too long for {ip}"));
    }
    Ok(())
}

/// Validates an `istio.security.Authorization` named `name` (`namespace/name`).
pub fn authorization(name: &str, a: &Authorization) -> Result<(), String> {
    if a.name.is_empty() {
        return Err("authorization has no name".into());
    }
    let expected = format!("{}/{}", a.namespace, a.name);
    if name != expected {
        return Err(format!("authorization resource name should be {expected:?}"));
    }
    for rule in &a.rules {
        for clause in &rule.clauses {
            clause.matches.iter().try_for_each(policy_match)?;
        }
    }
    Ok(())
}

fn policy_match(m: &Match) -> Result<(), String> {
    let strings = [&m.namespaces, &m.not_namespaces, &m.principals, &m.not_principals];
    for s in strings.into_iter().flatten() {
        string_match(s)?;
    }
    let ips = [&m.source_ips, &m.not_source_ips, &m.destination_ips, &m.not_destination_ips];
    for a in ips.into_iter().flatten() {
        let ip = ip_bytes(&a.address)?;
        prefix_len(ip, a.length)?;
    }
    for p in m.destination_ports.iter().chain(&m.not_destination_ports) {
        if *p == 0 || *p > 65535 {
            return Err(format!("invalid destination port {p}"));
        }
    }
    Ok(())
}

fn string_match(s: &StringMatch) -> Result<(), String> {
    if s.match_type.is_none() {
        return Err("string match without exact/prefix/suffix/presence".into());
    }
    Ok(())
}
