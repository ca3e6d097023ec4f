//! IPv6 and dual-stack pods through ztunnel end to end (root; CI runs as root, elsewhere this
//! fails saying why): captured by eBPF on both families, carried over HBONE between nodes on
//! IPv6, and held to the same L4 policy as IPv4.
//!
//! ```text
//!   node-a ---------------- link (10.0.0.0/24, fd00:0:0:1::/64) ---------------- node-b
//!   client   10.1.1.2 fd00:a:1::2  (demo)          echo  10.2.1.2 fd00:b:1::2 (demo)
//!   intruder 10.1.2.2 fd00:a:2::2  (other)
//! ```

use mesh_tests::echo::{exchange, expect_refused};
use mesh_tests::netns::{Netns, link_nodes, link_nodes6, require_root, wire, wire6};
use mesh_tests::node::NodeZtunnel;
use mesh_tests::xds_server::XdsStore;

const XDS_ADDR: &str = "10.0.0.1:15010";

const MESH: &str = r#"
workloads:
  - {name: client, namespace: demo, serviceAccount: client, addresses: [10.1.1.2, "fd00:a:1::2"],
     node: node-a, workloadName: client}
  - {name: intruder, namespace: other, serviceAccount: intruder,
     addresses: [10.1.2.2, "fd00:a:2::2"], node: node-a, workloadName: intruder}
  - {name: echo, namespace: demo, serviceAccount: echo, addresses: [10.2.1.2, "fd00:b:1::2"],
     node: node-b, workloadName: echo}
policies:
  - name: demo-only
    namespace: demo
    scope: NAMESPACE
    action: ALLOW
    rules: [{clauses: [{matches: [{namespaces: [{exact: demo}]}]}]}]
"#;

/// Sum of the `istio_authorization_decisions_total` samples with `decision`.
fn decisions(zt: &NodeZtunnel, decision: &str) -> f64 {
    zt.metrics()
        .lines()
        .filter(|l| l.starts_with("istio_authorization_decisions_total{"))
        .filter(|l| l.contains(&format!("decision=\"{decision}\"")))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[test]
fn ipv6_pods_are_proxied_and_held_to_policy_like_ipv4() {
    require_root("ztunnel IPv6 tests");
    let pid = std::process::id();
    let ns = |role: &str| Netns::create(&format!("v6{pid}-{role}"));
    let (node_a, node_b) = (ns("na"), ns("nb"));
    let (client, intruder, echo) = (ns("client"), ns("intr"), ns("echo"));
    link_nodes(&node_a, &node_b);
    link_nodes6(&node_a, &node_b);
    wire(&node_a, &client, "v-client", "10.1.1");
    wire6(&node_a, &client, "v-client", "fd00:a:1");
    wire(&node_a, &intruder, "v-intr", "10.1.2");
    wire6(&node_a, &intruder, "v-intr", "fd00:a:2");
    wire(&node_b, &echo, "v-echo", "10.2.1");
    wire6(&node_b, &echo, "v-echo", "fd00:b:1");
    // The echo server answers on both families with the peer it saw.
    mesh_tests::echo::serve_pod(&echo, "::", "echo");

    let ca_dir = tempfile::tempdir().expect("tempdir");
    let ca = ca_dir.path().to_str().expect("path").to_string();
    let store = XdsStore::new();
    store.load_yaml(MESH).unwrap_or_else(|e| panic!("config: {e:#}"));
    let (cp_rt, xds) = mesh_tests::node::control_plane(&node_a, XDS_ADDR, store.clone());
    let url = format!("http://{XDS_ADDR}");
    let zt_a = NodeZtunnel::start_node(&node_a, &url, &ca, "node-a", &[]);
    let zt_b = NodeZtunnel::start_node(&node_b, &url, &ca, "node-b", &[]);
    zt_a.converge("node-a pods enrolled on both families", &|s| s.pods.len() == 4);
    zt_b.converge("node-b pod enrolled on both families", &|s| s.pods.len() == 2);

    // The client reaches echo on each family, through both ztunnels; echo sees the client's
    // own address of that family.
    assert_eq!(exchange(&client, "[fd00:b:1::2]:8080", "hello"), Ok("echo fd00:a:1::2 hello".into()));
    assert_eq!(exchange(&client, "10.2.1.2:8080", "hello"), Ok("echo ::ffff:10.1.1.2 hello".into()));

    // The intruder is refused by the same policy on each family, and each refusal is counted.
    let denied_before = decisions(&zt_b, "deny");
    expect_refused(exchange(&intruder, "[fd00:b:1::2]:8080", "hello"), "intruder over IPv6");
    expect_refused(exchange(&intruder, "10.2.1.2:8080", "hello"), "intruder over IPv4");
    let denied = decisions(&zt_b, "deny") - denied_before;
    assert!(denied >= 2.0, "both refusals counted by node-b's ztunnel: {denied}");

    // Direct plaintext to the pod's IPv6 from the other node's namespace is captured for
    // inbound policy too: a connection with no identity is refused by the ALLOW policy.
    expect_refused(
        exchange(&node_a, "[fd00:b:1::2]:8080", "hello"),
        "plaintext from node-a to echo over IPv6",
    );

    zt_a.stop(&node_a);
    zt_b.stop(&node_b);
    cp_rt.block_on(xds.stop());
}
