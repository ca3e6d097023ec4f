//! Wire compatibility: `istio.workload.Address` and `istio.security.Authorization` assembled
//! by hand, byte by byte, from the field numbers in shared/spec/xds-and-ca.md (independently
//! of prost), in field-number order as istiod's Go encoder writes them. Each fixture is
//! decoded, every field checked, and re-encoded to the identical bytes.

use prost::Message;
use proto::security as sec;
use proto::workload as wl;

/// A minimal protobuf writer: just tags, varints and length-delimited fields.
mod pb {
    pub fn varint(mut v: u64) -> Vec<u8> {
        let mut out = Vec::new();
        loop {
            let byte = (v & 0x7f) as u8;
            v >>= 7;
            if v == 0 {
                out.push(byte);
                return out;
            }
            out.push(byte | 0x80);
        }
    }
    fn key(field: u32, wire: u8) -> Vec<u8> {
        varint(u64::from(field) << 3 | u64::from(wire))
    }
    /// A varint field (int32/uint32/enum/bool).
    pub fn int(field: u32, v: u64) -> Vec<u8> {
        [key(field, 0), varint(v)].concat()
    }
    /// A length-delimited field (string, bytes, message, packed repeated).
    pub fn len(field: u32, body: &[u8]) -> Vec<u8> {
        [key(field, 2), varint(body.len() as u64), body.to_vec()].concat()
    }
    pub fn s(field: u32, v: &str) -> Vec<u8> {
        len(field, v.as_bytes())
    }
    pub fn msg(parts: &[Vec<u8>]) -> Vec<u8> {
        parts.concat()
    }
    pub fn packed(field: u32, values: &[u64]) -> Vec<u8> {
        let body: Vec<u8> = values.iter().flat_map(|v| varint(*v)).collect();
        len(field, &body)
    }
}

fn extension(name: &str) -> Vec<u8> {
    // Extension { name = 1; config (Any) = 2 { type_url = 1; value = 2 } }
    pb::msg(&[
        pb::s(1, name),
        pb::len(2, &pb::msg(&[pb::s(1, "type.googleapis.com/x.Y"), pb::len(2, &[8, 1])])),
    ])
}

fn network_address(network: &str, ip: &[u8], length: Option<u64>) -> Vec<u8> {
    // proto3: an empty string is the default and is not written.
    let mut parts = if network.is_empty() { vec![] } else { vec![pb::s(1, network)] };
    parts.push(pb::len(2, ip));
    if let Some(l) = length {
        parts.push(pb::int(3, l));
    }
    pb::msg(&parts)
}

fn port(service: u64, target: u64, app: u64) -> Vec<u8> {
    pb::msg(&[pb::int(1, service), pb::int(2, target), pb::int(3, app)])
}

fn roundtrip<M: Message + Default>(bytes: &[u8]) -> M {
    let decoded = M::decode(bytes).expect("fixture decodes");
    assert_eq!(decoded.encode_to_vec(), bytes, "re-encoding must give the same bytes");
    decoded
}

#[test]
fn workload_fixture_decodes_every_field() {
    let waypoint =
        pb::msg(&[pb::len(2, &network_address("net1", &[10, 0, 0, 9], Some(32))), pb::int(3, 15008)]);
    let gateway_host = pb::msg(&[pb::s(1, "istio-system"), pb::s(2, "eastwest.istio-system.svc")]);
    let network_gateway = pb::msg(&[pb::len(1, &gateway_host), pb::int(3, 15009)]);
    let services_entry = pb::msg(&[
        pb::s(1, "default/echo.default.svc.cluster.local"),
        pb::len(2, &pb::msg(&[pb::len(1, &port(80, 8080, 1)), pb::len(1, &port(9090, 9090, 3))])),
    ]);
    let workload = pb::msg(&[
        pb::s(1, "echo-7d9f"),
        pb::s(2, "default"),
        pb::len(3, &[10, 1, 2, 3]),
        pb::len(3, &[0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]),
        pb::s(4, "net1"),
        pb::int(5, 1),
        pb::s(6, "example.org"),
        pb::s(7, "echo-sa"),
        pb::len(8, &waypoint),
        pb::s(9, "node-a"),
        pb::s(10, "echo"),
        pb::s(11, "v2"),
        pb::int(12, 2),
        pb::s(13, "echo-deploy"),
        pb::int(14, 1),
        pb::s(16, "default/allow-a"),
        pb::s(16, "default/deny-b"),
        pb::int(17, 1),
        pb::s(18, "cluster-1"),
        pb::len(19, &network_gateway),
        pb::s(20, "cluster-1//v1/Pod/default/echo-7d9f"),
        pb::s(21, "echo.example"),
        pb::len(22, &services_entry),
        pb::len(23, &pb::msg(&[pb::int(1, 1), pb::int(2, 15088)])),
        pb::len(24, &pb::msg(&[pb::s(1, "eu-west"), pb::s(2, "eu-west-1a"), pb::s(3, "rack7")])),
        pb::int(25, 1),
        pb::len(26, &extension("ext-w")),
        pb::len(27, &pb::int(1, 7)),
    ]);
    let bytes = pb::len(1, &workload);
    let address: wl::Address = roundtrip(&bytes);
    let Some(wl::address::Type::Workload(w)) = address.r#type else { panic!("not a workload: {address:?}") };

    assert_eq!(w.uid, "cluster-1//v1/Pod/default/echo-7d9f");
    assert_eq!(w.name, "echo-7d9f");
    assert_eq!(w.namespace, "default");
    assert_eq!(w.addresses, vec![vec![10, 1, 2, 3], vec![0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]]);
    assert_eq!(w.hostname, "echo.example");
    assert_eq!(w.network, "net1");
    assert_eq!(w.tunnel_protocol(), wl::TunnelProtocol::Hbone);
    assert_eq!(w.trust_domain, "example.org");
    assert_eq!(w.service_account, "echo-sa");
    let wp = w.waypoint.clone().expect("waypoint");
    assert_eq!(wp.hbone_mtls_port, 15008);
    assert_eq!(
        wp.destination,
        Some(wl::gateway_address::Destination::Address(wl::NetworkAddress {
            network: "net1".into(),
            address: vec![10, 0, 0, 9],
            length: Some(32),
        }))
    );
    let ng = w.network_gateway.clone().expect("network gateway");
    assert_eq!(ng.hbone_mtls_port, 15009);
    assert_eq!(
        ng.destination,
        Some(wl::gateway_address::Destination::Hostname(wl::NamespacedHostname {
            namespace: "istio-system".into(),
            hostname: "eastwest.istio-system.svc".into(),
        }))
    );
    assert_eq!(w.node, "node-a");
    assert_eq!(w.canonical_name, "echo");
    assert_eq!(w.canonical_revision, "v2");
    assert_eq!(w.workload_type(), wl::WorkloadType::Pod);
    assert_eq!(w.workload_name, "echo-deploy");
    assert!(w.native_tunnel);
    let at = w.application_tunnel.expect("application tunnel");
    assert_eq!(at.protocol(), wl::application_tunnel::Protocol::Proxy);
    assert_eq!(at.port, 15088);
    let ports = &w.services["default/echo.default.svc.cluster.local"].ports;
    assert_eq!(ports.len(), 2);
    assert_eq!(
        (ports[0].service_port, ports[0].target_port, ports[0].app_protocol()),
        (80, 8080, wl::AppProtocol::Http11)
    );
    assert_eq!(
        (ports[1].service_port, ports[1].target_port, ports[1].app_protocol()),
        (9090, 9090, wl::AppProtocol::Grpc)
    );
    assert_eq!(w.authorization_policies, vec!["default/allow-a", "default/deny-b"]);
    assert_eq!(w.status(), wl::WorkloadStatus::Unhealthy);
    assert_eq!(w.cluster_id, "cluster-1");
    let loc = w.locality.clone().expect("locality");
    assert_eq!(
        (loc.region.as_str(), loc.zone.as_str(), loc.subzone.as_str()),
        ("eu-west", "eu-west-1a", "rack7")
    );
    assert_eq!(w.network_mode(), wl::NetworkMode::HostNetwork);
    assert_eq!(w.extensions.len(), 1);
    assert_eq!(w.extensions[0].name, "ext-w");
    let cfg = w.extensions[0].config.as_ref().expect("extension config");
    assert_eq!((cfg.type_url.as_str(), cfg.value.as_slice()), ("type.googleapis.com/x.Y", &[8u8, 1][..]));
    assert_eq!(w.capacity, Some(7));
}

#[test]
fn service_fixture_decodes_every_field() {
    let waypoint = pb::msg(&[
        pb::len(1, &pb::msg(&[pb::s(1, "default"), pb::s(2, "waypoint.default.svc.cluster.local")])),
        pb::int(3, 15008),
    ]);
    let lb = pb::msg(&[pb::packed(1, &[4, 2]), pb::int(2, 2), pb::int(3, 1)]);
    let weighted = pb::msg(&[
        pb::len(1, &pb::msg(&[pb::len(2, &network_address("", &[10, 0, 0, 7], None)), pb::int(3, 15008)])),
        pb::int(2, 90),
    ]);
    let service = pb::msg(&[
        pb::s(1, "echo"),
        pb::s(2, "default"),
        pb::s(3, "echo.default.svc.cluster.local"),
        pb::len(4, &network_address("net1", &[10, 96, 0, 10], None)),
        pb::len(5, &port(80, 8080, 2)),
        pb::s(6, "spiffe://cluster.local/ns/default/sa/echo"),
        pb::len(7, &waypoint),
        pb::len(8, &lb),
        pb::int(9, 3),
        pb::len(10, &extension("ext-s")),
        pb::int(11, 1),
        pb::int(12, 1),
        pb::len(13, &weighted),
        pb::int(14, 1),
    ]);
    let bytes = pb::len(2, &service);
    let address: wl::Address = roundtrip(&bytes);
    let Some(wl::address::Type::Service(s)) = address.r#type else { panic!("not a service: {address:?}") };
    assert_eq!(s.name, "echo");
    assert_eq!(s.namespace, "default");
    assert_eq!(s.hostname, "echo.default.svc.cluster.local");
    assert_eq!(
        s.addresses,
        vec![wl::NetworkAddress { network: "net1".into(), address: vec![10, 96, 0, 10], length: None }]
    );
    assert_eq!(s.ports.len(), 1);
    assert_eq!(
        (s.ports[0].service_port, s.ports[0].target_port, s.ports[0].app_protocol()),
        (80, 8080, wl::AppProtocol::Http2)
    );
    assert_eq!(s.subject_alt_names, vec!["spiffe://cluster.local/ns/default/sa/echo"]);
    let wp = s.waypoint.clone().expect("waypoint");
    assert_eq!(
        wp.destination,
        Some(wl::gateway_address::Destination::Hostname(wl::NamespacedHostname {
            namespace: "default".into(),
            hostname: "waypoint.default.svc.cluster.local".into(),
        }))
    );
    let lb = s.load_balancing.clone().expect("load balancing");
    assert_eq!(
        lb.routing_preference().collect::<Vec<_>>(),
        vec![wl::load_balancing::Scope::Node, wl::load_balancing::Scope::Zone]
    );
    assert_eq!(lb.mode(), wl::load_balancing::Mode::Failover);
    assert_eq!(lb.health_policy(), wl::load_balancing::HealthPolicy::AllowAll);
    assert_eq!(s.ip_families(), wl::IpFamilies::Dual);
    assert_eq!(s.extensions[0].name, "ext-s");
    assert!(s.canonical);
    assert!(s.ingress_use_waypoint);
    assert_eq!(s.weighted_waypoints.len(), 1);
    assert_eq!(s.weighted_waypoints[0].weight, 90);
    assert_eq!(s.weighted_waypoints[0].destination.as_ref().map(|d| d.hbone_mtls_port), Some(15008));
    assert_eq!(s.visibility(), wl::service::Visibility::Namespace);
}

#[test]
fn authorization_fixture_decodes_every_field() {
    let exact = pb::len(1, b"default");
    let prefix = pb::len(2, b"kube-");
    let suffix = pb::len(3, b"/sa/admin");
    let presence = pb::len(4, &[]);
    let ip = |addr: &[u8], l: u64| pb::msg(&[pb::len(1, addr), pb::int(2, l)]);
    let sa = |ns: &str, name: &str| pb::msg(&[pb::s(1, ns), pb::s(2, name)]);
    let m = pb::msg(&[
        pb::len(1, &exact),
        pb::len(2, &prefix),
        pb::len(3, &suffix),
        pb::len(4, &presence),
        pb::len(5, &ip(&[10, 0, 0, 0], 8)),
        pb::len(6, &ip(&[10, 9, 0, 0], 16)),
        pb::len(7, &ip(&[192, 168, 1, 1], 32)),
        pb::len(8, &ip(&[0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0], 64)),
        pb::packed(9, &[80, 443]),
        pb::packed(10, &[22]),
        pb::len(11, &sa("default", "client")),
        pb::len(12, &sa("default", "banned")),
        pb::len(13, &extension("ext-m")),
    ]);
    let rule = pb::msg(&[pb::len(1, &pb::msg(&[pb::len(2, &m)]))]);
    let bytes = pb::msg(&[
        pb::s(1, "allow-web"),
        pb::s(2, "default"),
        pb::int(3, 2),
        pb::int(4, 1),
        pb::len(5, &rule),
        pb::int(6, 1),
        pb::len(7, &extension("ext-a")),
    ]);
    let a: sec::Authorization = roundtrip(&bytes);
    use sec::string_match::MatchType;
    assert_eq!(a.name, "allow-web");
    assert_eq!(a.namespace, "default");
    assert_eq!(a.scope(), sec::Scope::WorkloadSelector);
    assert_eq!(a.action(), sec::Action::Deny);
    assert!(a.dry_run);
    assert_eq!(a.extensions[0].name, "ext-a");
    assert_eq!(a.rules.len(), 1);
    assert_eq!(a.rules[0].clauses.len(), 1);
    let m = &a.rules[0].clauses[0].matches[0];
    assert_eq!(m.namespaces[0].match_type, Some(MatchType::Exact("default".into())));
    assert_eq!(m.not_namespaces[0].match_type, Some(MatchType::Prefix("kube-".into())));
    assert_eq!(m.principals[0].match_type, Some(MatchType::Suffix("/sa/admin".into())));
    assert_eq!(m.not_principals[0].match_type, Some(MatchType::Presence(())));
    assert_eq!(m.source_ips, vec![sec::Address { address: vec![10, 0, 0, 0], length: 8 }]);
    assert_eq!(m.not_source_ips, vec![sec::Address { address: vec![10, 9, 0, 0], length: 16 }]);
    assert_eq!(m.destination_ips, vec![sec::Address { address: vec![192, 168, 1, 1], length: 32 }]);
    assert_eq!(m.not_destination_ips[0].length, 64);
    assert_eq!(m.not_destination_ips[0].address.len(), 16);
    assert_eq!(m.destination_ports, vec![80, 443]);
    assert_eq!(m.not_destination_ports, vec![22]);
    assert_eq!(
        m.service_accounts,
        vec![sec::ServiceAccountMatch { namespace: "default".into(), service_account: "client".into() }]
    );
    assert_eq!(m.not_service_accounts[0].service_account, "banned");
    assert_eq!(m.extensions[0].name, "ext-m");
}

#[test]
fn delta_discovery_messages_use_envoy_field_numbers() {
    use proto::discovery as d;
    // DeltaDiscoveryResponse: system_version_info=1, resources=2 (Resource: version=1,
    // resource=2, name=3, aliases=4), type_url=4, nonce=5, removed_resources=6.
    let resource = pb::msg(&[
        pb::s(1, "v7"),
        pb::len(2, &pb::msg(&[pb::s(1, proto::ADDRESS_TYPE_URL), pb::len(2, &[0x0a, 0x00])])),
        pb::s(3, "ns/name"),
        pb::s(4, "alias"),
    ]);
    let bytes = pb::msg(&[
        pb::s(1, "sys"),
        pb::len(2, &resource),
        pb::s(4, proto::ADDRESS_TYPE_URL),
        pb::s(5, "nonce-1"),
        pb::s(6, "gone"),
    ]);
    let r: d::DeltaDiscoveryResponse = roundtrip(&bytes);
    assert_eq!(r.system_version_info, "sys");
    assert_eq!(r.type_url, proto::ADDRESS_TYPE_URL);
    assert_eq!(r.nonce, "nonce-1");
    assert_eq!(r.removed_resources, vec!["gone"]);
    assert_eq!((r.resources[0].version.as_str(), r.resources[0].name.as_str()), ("v7", "ns/name"));
    assert_eq!(r.resources[0].aliases, vec!["alias"]);

    // DeltaDiscoveryRequest: node=1 (id=1, cluster=2, metadata=3), type_url=2,
    // subscribe=3, unsubscribe=4, initial_resource_versions=5 (map), nonce=6, error_detail=7.
    let entry = pb::msg(&[pb::s(1, "ns/name"), pb::s(2, "v7")]);
    let status = pb::msg(&[pb::int(1, 3), pb::s(2, "bad")]);
    let bytes = pb::msg(&[
        pb::len(1, &pb::msg(&[pb::s(1, "ztunnel~10.0.0.1~z.istio-system~istio-system.svc.cluster.local")])),
        pb::s(2, proto::AUTHORIZATION_TYPE_URL),
        pb::s(3, "*"),
        pb::s(4, "old"),
        pb::len(5, &entry),
        pb::s(6, "nonce-1"),
        pb::len(7, &status),
    ]);
    let q: d::DeltaDiscoveryRequest = roundtrip(&bytes);
    assert!(q.node.expect("node").id.starts_with("ztunnel~"));
    assert_eq!(q.type_url, proto::AUTHORIZATION_TYPE_URL);
    assert_eq!(q.resource_names_subscribe, vec!["*"]);
    assert_eq!(q.resource_names_unsubscribe, vec!["old"]);
    assert_eq!(q.initial_resource_versions.get("ns/name").map(String::as_str), Some("v7"));
    assert_eq!(q.response_nonce, "nonce-1");
    let e = q.error_detail.expect("error detail");
    assert_eq!((e.code, e.message.as_str()), (3, "bad"));
}

#[test]
fn certificate_messages_use_istio_field_numbers() {
    use proto::istio::v1::auth as ca;
    let bytes = pb::msg(&[pb::s(1, "-----BEGIN CERTIFICATE REQUEST-----"), pb::int(3, 86400)]);
    let req: ca::IstioCertificateRequest = roundtrip(&bytes);
    assert_eq!(req.csr, "-----BEGIN CERTIFICATE REQUEST-----");
    assert_eq!(req.validity_duration, 86400);
    let bytes = pb::msg(&[pb::s(1, "leaf"), pb::s(1, "root")]);
    let resp: ca::IstioCertificateResponse = roundtrip(&bytes);
    assert_eq!(resp.cert_chain, vec!["leaf", "root"]);
}
