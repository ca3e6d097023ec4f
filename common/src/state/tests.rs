//! The index built from xDS resources: lookups, endpoints with target ports, load-balancing
//! preferences, policy scopes, and rejection keeping the last good state.

use super::*;
use crate::xds::LocalConfig;
use crate::xds::handler::RawResource;

const MESH: &str = r#"
workloads:
  - name: client
    namespace: demo
    serviceAccount: client
    addresses: [10.1.1.2]
    node: node-a
    authorizationPolicies: [demo/selected]
  - name: echo-1
    namespace: demo
    addresses: [10.1.1.3]
    node: node-a
    services:
      demo/echo.demo.svc.cluster.local: [{servicePort: 80, targetPort: 8080}]
  - name: echo-2
    namespace: demo
    addresses: [10.2.1.2]
    node: node-b
    services:
      demo/echo.demo.svc.cluster.local: [{servicePort: 80, targetPort: 0}]
  - name: echo-sick
    namespace: demo
    addresses: [10.2.1.9]
    node: node-b
    status: UNHEALTHY
    services:
      demo/echo.demo.svc.cluster.local: [{servicePort: 80, targetPort: 8080}]
services:
  - name: echo
    namespace: demo
    hostname: echo.demo.svc.cluster.local
    addresses: [10.96.0.80]
    ports: [{servicePort: 80, targetPort: 9090}]
policies:
  - {name: global, namespace: istio-system, scope: GLOBAL, action: DENY, rules: []}
  - {name: ns, namespace: demo, scope: NAMESPACE, action: ALLOW, rules: []}
  - {name: other-ns, namespace: other, scope: NAMESPACE, action: ALLOW, rules: []}
  - {name: selected, namespace: demo, scope: WORKLOAD_SELECTOR, action: ALLOW, rules: []}
  - {name: unselected, namespace: demo, scope: WORKLOAD_SELECTOR, action: ALLOW, rules: []}
"#;

fn load(handlers: &Handlers, yaml: &str) -> Vec<Rejection> {
    let resources = LocalConfig::from_yaml(yaml).expect("yaml").to_resources().expect("resources");
    let mut rejected = Vec::new();
    for type_url in [proto::ADDRESS_TYPE_URL, proto::AUTHORIZATION_TYPE_URL] {
        let raw: Vec<RawResource> = resources
            .iter()
            .filter(|r| r.body.type_url == type_url)
            .map(|r| RawResource { name: r.name.clone(), version: "1".into(), body: Some(r.body.clone()) })
            .collect();
        rejected.extend(handlers.apply(type_url, raw, vec![]).expect("registered"));
    }
    rejected
}

fn state() -> State {
    let (state, handlers) = State::new("");
    assert_eq!(load(&handlers, MESH), vec![]);
    state
}

#[test]
fn lookups_by_address_vip_and_uid() {
    let s = state().snapshot();
    let dst = |a: &str| s.lookup_destination(a.parse().expect("addr"));
    assert!(matches!(dst("10.96.0.80:80"), Target::Service(svc) if svc.name == "echo"));
    assert!(matches!(dst("10.2.1.2:8080"), Target::Workload(w) if w.name == "echo-2"));
    assert!(matches!(dst("192.0.2.1:80"), Target::Unknown));
    assert!(s.workload_by_uid("Kubernetes//Pod/demo/client").is_some());
    assert_eq!(s.workloads_on("node-a").count(), 2);
    let echo = s.service("demo", "echo.demo.svc.cluster.local").expect("service");
    assert_eq!(s.endpoints(echo).len(), 3);
}

#[test]
fn endpoints_map_target_ports_and_skip_unhealthy() {
    let s = state().snapshot();
    let echo = s.service("demo", "echo.demo.svc.cluster.local").expect("service").clone();
    let mut seen = std::collections::BTreeMap::new();
    for _ in 0..200 {
        let (e, port) = s.pick_endpoint(&echo, 80, None).expect("endpoint");
        seen.insert(e.workload.name.clone(), port);
    }
    // echo-1 maps 80 -> 8080 itself; echo-2 inherits the service's 80 -> 9090; echo-sick is skipped.
    assert_eq!(seen.get("echo-1"), Some(&8080));
    assert_eq!(seen.get("echo-2"), Some(&9090));
    assert_eq!(seen.len(), 2, "{seen:?}");
    assert!(matches!(s.pick_endpoint(&echo, 81, None), Err(PickError::NoSuchPort { .. })));
}

#[test]
fn strict_and_failover_prefer_the_clients_node() {
    let (state, handlers) = State::new("");
    let strict = MESH.replace(
        "    ports: [{servicePort: 80, targetPort: 9090}]",
        "    ports: [{servicePort: 80, targetPort: 9090}]\n    loadBalancing: {mode: STRICT, routingPreference: [NODE]}",
    );
    assert_eq!(load(&handlers, &strict), vec![]);
    let s = state.snapshot();
    let echo = s.service("demo", "echo.demo.svc.cluster.local").expect("service").clone();
    let client = s.workload_by_ip("10.1.1.2".parse().expect("ip")).expect("client").clone();
    for _ in 0..50 {
        let (e, _) = s.pick_endpoint(&echo, 80, Some(&client)).expect("endpoint");
        assert_eq!(e.workload.node, "node-a");
    }
    // A client on a node without endpoints gets none under STRICT, the others under FAILOVER.
    let mut far = (*client).clone();
    far.node = "node-z".into();
    assert!(s.pick_endpoint(&echo, 80, Some(&far)).is_err());
    let failover = strict.replace("mode: STRICT", "mode: FAILOVER");
    assert_eq!(load(&handlers, &failover), vec![]);
    let s = state.snapshot();
    let echo = s.service("demo", "echo.demo.svc.cluster.local").expect("service").clone();
    assert!(s.pick_endpoint(&echo, 80, Some(&far)).is_ok());
}

#[test]
fn policies_by_scope() {
    let s = state().snapshot();
    let names = |ip: &str| {
        let w = s.workload_by_ip(ip.parse().expect("ip")).expect("workload").clone();
        let mut n: Vec<String> = s.policies_for(&w).iter().map(|p| p.key()).collect();
        n.sort();
        n
    };
    assert_eq!(names("10.1.1.2"), ["demo/ns", "demo/selected", "istio-system/global"]);
    assert_eq!(names("10.2.1.2"), ["demo/ns", "istio-system/global"]);
}

#[test]
fn a_rejected_update_keeps_the_last_good_state() {
    let (state, handlers) = State::new("");
    assert_eq!(load(&handlers, MESH), vec![]);
    // An identity that cannot be built (upper case namespace) is refused at receipt.
    let bad = MESH.replace("  - name: echo-2\n    namespace: demo", "  - name: echo-2\n    namespace: Demo!");
    let rejected = load(&handlers, &bad);
    assert_eq!(rejected.len(), 1, "{rejected:?}");
    let s = state.snapshot();
    assert!(s.workload_by_ip("10.2.1.2".parse().expect("ip")).is_some(), "old echo-2 still in force");
    let dump = serde_json::to_value(&*s).expect("dump");
    assert!(dump["workloads"]["Kubernetes//Pod/demo/echo-2"]["identity"].is_string(), "{dump}");
    assert!(dump["endpoints"]["demo/echo.demo.svc.cluster.local"].is_array(), "{dump}");
}
