//! The standard resources users write, end to end (root; CI runs as root, elsewhere this fails
//! saying why): the in-repo control plane translates Kubernetes / Istio / Gateway API YAML, and
//! real traffic through ztunnel (eBPF capture, HBONE, mTLS) and the waypoint obeys it.
//!
//! ```text
//!   node-a (10.0.0.1) ---- link ---- node-b (10.0.0.2)
//!   client  10.1.1.2 shop/client     db        10.2.1.2 shop/db   (line echo 8080)
//!   legacy  10.1.2.2 (not enrolled)  api       10.2.2.2 shop/api  (line echo 8080)
//!                                    web       10.2.3.2 shop/web  (HTTP 8081, via waypoint)
//!                                    waypoint  10.2.5.2 shop/waypoint
//! ```
//! - An `AuthorizationPolicy` with a `selector` (ztunnel, L4): only `shop/api` reaches db.
//! - `PeerAuthentication` STRICT for the namespace refuses plaintext from the non-enrolled pod;
//!   a workload's `portLevelMtls` PERMISSIVE opens one port again.
//! - A refused object (a typo in the mode) leaves its previous version in force.
//! - An `AuthorizationPolicy` with `targetRefs` to a Service (waypoint, L7) denies a path; an
//!   `HTTPRoute` on that Service adds a response header, and a VirtualService for the same
//!   Service is not applied (no mixing); a VirtualService's fault applies on another Service.

use std::net::SocketAddr;

use mesh_tests::echo::{exchange, expect_refused};
use mesh_tests::netns::{Netns, link_nodes, require_root, wire};
use mesh_tests::node::NodeZtunnel;
use mesh_tests::xds_server::XdsStore;

#[path = "support/l7.rs"]
mod support;

const XDS_ADDR: &str = "10.0.0.1:15010";

const BASE: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: shop, labels: {istio.io/dataplane-mode: ambient}}
---
apiVersion: v1
kind: Namespace
metadata: {name: legacy}
---
apiVersion: v1
kind: Pod
metadata: {name: client, namespace: shop, labels: {app: client}}
spec: {serviceAccountName: client, nodeName: node-a}
status: {podIP: 10.1.1.2}
---
apiVersion: v1
kind: Pod
metadata: {name: legacy, namespace: legacy, labels: {app: legacy}}
spec: {nodeName: node-a}
status: {podIP: 10.1.2.2}
---
apiVersion: v1
kind: Pod
metadata: {name: db, namespace: shop, labels: {app: db}}
spec: {serviceAccountName: db, nodeName: node-b, containers: [{name: db, ports: [{name: tcp-db, containerPort: 8080}]}]}
status: {podIP: 10.2.1.2}
---
apiVersion: v1
kind: Pod
metadata: {name: api, namespace: shop, labels: {app: api}}
spec: {serviceAccountName: api, nodeName: node-b}
status: {podIP: 10.2.2.2}
---
apiVersion: v1
kind: Pod
metadata: {name: web, namespace: shop, labels: {app: web}}
spec: {serviceAccountName: web, nodeName: node-b}
status: {podIP: 10.2.3.2}
---
apiVersion: v1
kind: Pod
metadata: {name: waypoint, namespace: shop, labels: {gateway.networking.k8s.io/gateway-name: waypoint}}
spec: {serviceAccountName: waypoint, nodeName: node-b}
status: {podIP: 10.2.5.2}
---
apiVersion: v1
kind: Service
metadata: {name: db, namespace: shop}
spec: {selector: {app: db}, clusterIP: 10.96.0.20, ports: [{name: tcp, port: 5432, targetPort: tcp-db}]}
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop, labels: {istio.io/use-waypoint: waypoint}}
spec: {selector: {app: web}, clusterIP: 10.96.0.30, ports: [{name: http, port: 80, targetPort: 8081}]}
---
apiVersion: v1
kind: Service
metadata: {name: web2, namespace: shop, labels: {istio.io/use-waypoint: waypoint}}
spec: {selector: {app: web}, clusterIP: 10.96.0.31, ports: [{name: http, port: 80, targetPort: 8081}]}
---
# VirtualService at the waypoint: a fault on one path of web2. The one on web is not applied:
# web has an HTTPRoute, and Istio does not mix them.
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: web2, namespace: shop}
spec:
  hosts: [web2]
  http:
    - match: [{uri: {prefix: /teapot}}]
      fault: {abort: {httpStatus: 418, percentage: {value: 100}}}
      route: [{destination: {host: web2}}]
    - route: [{destination: {host: web2}}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: web, namespace: shop}
spec:
  hosts: [web]
  http: [{fault: {abort: {httpStatus: 500, percentage: {value: 100}}}, route: [{destination: {host: web}}]}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: waypoint, namespace: shop}
spec:
  gatewayClassName: istio-waypoint
  listeners: [{name: mesh, port: 15008, protocol: HBONE}]
status: {addresses: [{type: IPAddress, value: 10.96.0.100}]}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: db-from-api, namespace: shop}
spec:
  selector: {matchLabels: {app: db}}
  action: ALLOW
  rules: [{from: [{source: {principals: [cluster.local/ns/shop/sa/api]}}]}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: no-admin, namespace: shop}
spec:
  targetRefs: [{group: "", kind: Service, name: web}]
  action: DENY
  rules: [{to: [{operation: {paths: ["/admin*"]}}]}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: web, namespace: shop}
spec:
  parentRefs: [{group: "", kind: Service, name: web, port: 80}]
  rules:
    - filters: [{type: ResponseHeaderModifier, responseHeaderModifier: {set: [{name: x-route, value: web}]}}]
      backendRefs: [{name: web, port: 80}]
"#;

const STRICT: &str = r#"
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: default, namespace: shop}
spec: {mtls: {mode: STRICT}}
"#;

const API_PORT_PERMISSIVE: &str = r#"
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: api, namespace: shop}
spec:
  selector: {matchLabels: {app: api}}
  portLevelMtls: {8080: {mode: PERMISSIVE}}
"#;

/// Pushes `yaml` with the control plane's translator, which keeps refused objects' previous
/// versions; returns the refusals.
fn push(
    store: &XdsStore,
    translator: &std::sync::Mutex<common::translate::Translator>,
    yaml: &str,
) -> Vec<String> {
    let mut t = translator.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    store
        .load_yaml_with(&mut t, yaml, "test.yaml")
        .unwrap_or_else(|e| panic!("config does not load: {e:#}"))
        .1
}

/// The L4 policies that apply to the workload at `ip`, as text.
fn policies_of(s: &ztunnel::state::Snapshot, ip: &str) -> String {
    let ip = ip.parse().expect("ip");
    s.workload_by_ip(ip).map(|w| format!("{:?}", s.policies_for(w))).unwrap_or_default()
}

/// Waits until `zt`'s state satisfies `pred`.
fn converge_policy(
    zt: &NodeZtunnel,
    what: &str,
    pred: impl Fn(&ztunnel::state::Snapshot) -> bool + Send + 'static,
) {
    let state = zt.app.state.clone();
    let done = zt
        .block(async move { tokio::time::timeout(mesh_tests::CONVERGE_TIMEOUT, state.wait_for(pred)).await });
    assert!(done.is_ok(), "timed out waiting for {what}");
}

fn http_get(rt: &tokio::runtime::Runtime, path: &str) -> (u16, String) {
    http_get_from(rt, "10.96.0.30:80", "web.shop.svc.cluster.local", path)
}

fn http_get_from(rt: &tokio::runtime::Runtime, vip: &str, host: &str, path: &str) -> (u16, String) {
    let addr: SocketAddr = vip.parse().expect("addr");
    let req = support::get(path, host, &[]);
    // Spawned, so that it runs on the runtime's threads inside the client pod.
    rt.block_on(rt.spawn(async move { support::raw_http(addr, &req).await })).expect("join")
}

#[test]
fn standard_resources_govern_real_traffic() {
    require_root("standard-resources end-to-end test");
    let pid = std::process::id();
    let ns = |role: &str| Netns::create(&format!("sc{pid}-{role}"));
    let (node_a, node_b) = (ns("na"), ns("nb"));
    let (client, legacy, db, api, web, wp) =
        (ns("client"), ns("legacy"), ns("db"), ns("api"), ns("web"), ns("wp"));
    link_nodes(&node_a, &node_b);
    wire(&node_a, &client, "v-client", "10.1.1");
    wire(&node_a, &legacy, "v-legacy", "10.1.2");
    wire(&node_b, &db, "v-db", "10.2.1");
    wire(&node_b, &api, "v-api", "10.2.2");
    wire(&node_b, &web, "v-web", "10.2.3");
    wire(&node_b, &wp, "v-wp", "10.2.5");
    mesh_tests::echo::serve_pod(&db, "0.0.0.0", "db");
    mesh_tests::echo::serve_pod(&api, "0.0.0.0", "api");
    let _web_rt = support::http_backend(&web, "web");

    let store = XdsStore::new();
    let translator = std::sync::Mutex::new(common::translate::Translator::default());
    let refused = push(&store, &translator, BASE);
    assert!(refused.is_empty(), "{refused:?}");
    let (_cp_rt, _cp) = mesh_tests::node::control_plane(&node_a, XDS_ADDR, store.clone());
    let ca_dir = tempfile::tempdir().expect("tempdir");
    let ca = ca_dir.path().to_str().expect("path").to_string();
    let url = format!("http://{XDS_ADDR}");
    let zt_a = NodeZtunnel::start_node(&node_a, &url, &ca, "node-a", &[]);
    let zt_b = NodeZtunnel::start_node(&node_b, &url, &ca, "node-b", &[]);
    // Enrolled: the ambient pods (the waypoint speaks HBONE itself; legacy is not enrolled).
    zt_a.converge("node-a pods enrolled", &|s| s.pods.len() == 1);
    zt_b.converge("node-b pods enrolled", &|s| s.pods.len() == 3);

    // L4 AuthorizationPolicy with a selector: only shop/api reaches db, through its VIP.
    let reply = exchange(&api, "10.96.0.20:5432", "from api").expect("api -> db");
    assert!(reply.starts_with("db 10.2.2.2 from api"), "{reply}");
    expect_refused(exchange(&client, "10.96.0.20:5432", "from client"), "client (shop/client) -> db");
    expect_refused(
        exchange(&legacy, "10.2.1.2:8080", "plaintext"),
        "plaintext -> db (the ALLOW needs a principal)",
    );

    // No PeerAuthentication: plaintext from the non-enrolled pod reaches api (PERMISSIVE).
    let reply = exchange(&legacy, "10.2.2.2:8080", "plain").expect("plaintext -> api while permissive");
    assert!(reply.starts_with("api 10.1.2.2 plain"), "{reply}");
    // STRICT for the namespace: plaintext is refused, mTLS still passes.
    assert!(push(&store, &translator, &format!("{BASE}{STRICT}")).is_empty());
    converge_policy(&zt_b, "the STRICT policy", |s| {
        policies_of(s, "10.2.2.2").contains("peer-authentication:pod:api")
    });
    expect_refused(exchange(&legacy, "10.2.2.2:8080", "plain"), "plaintext -> api under STRICT");
    let reply = exchange(&client, "10.2.2.2:8080", "mtls").expect("client -> api over HBONE under STRICT");
    assert!(reply.starts_with("api 10.1.1.2 mtls"), "{reply}");
    // A workload's port-level PERMISSIVE opens that port again.
    assert!(push(&store, &translator, &format!("{BASE}{STRICT}{API_PORT_PERMISSIVE}")).is_empty());
    converge_policy(&zt_b, "the port exception", |s| policies_of(s, "10.2.2.2").contains("8080"));
    let reply = exchange(&legacy, "10.2.2.2:8080", "plain").expect("plaintext -> api:8080 when permissive");
    assert!(reply.starts_with("api 10.1.2.2 plain"), "{reply}");

    // A typo in the namespace's mode is refused, with the field; the STRICT version stays (the
    // port exception is removed in the same push and does go away).
    let typo = STRICT.replace("mode: STRICT", "mode: STIRCT");
    let refused = push(&store, &translator, &format!("{BASE}{typo}"));
    assert!(refused.len() == 1 && refused[0].contains("spec.mtls.mode"), "{refused:?}");
    converge_policy(&zt_b, "the port exception removed", |s| {
        let p = policies_of(s, "10.2.2.2");
        p.contains("peer-authentication:pod:api") && !p.contains("8080")
    });
    expect_refused(
        exchange(&legacy, "10.2.2.2:8080", "plain"),
        "plaintext -> api with the previous STRICT in force",
    );

    // L7: a DENY with targetRefs to the Service applies at the waypoint; the HTTPRoute's filter too.
    let wp_rt = wp.runtime();
    let _waypoint = support::start_waypoint_in(&wp_rt, &url, &ca, "shop", "10.2.5.2", &[]);
    let client_rt = client.runtime();
    let (status, answer) = http_get(&client_rt, "/hello");
    assert_eq!(status, 200, "{answer}");
    assert!(
        answer.contains("web GET /hello") && answer.to_ascii_lowercase().contains("x-route: web"),
        "{answer}"
    );
    let (status, answer) = http_get(&client_rt, "/admin/users");
    assert_eq!(status, 403, "{answer}");
    let (status, answer) = http_get(&client_rt, "/%61dmin");
    assert_eq!(status, 403, "normalized before the policy: {answer}");
    // The VirtualService's fault applies to its route on web2 (and only there).
    let (status, answer) =
        http_get_from(&client_rt, "10.96.0.31:80", "web2.shop.svc.cluster.local", "/teapot/1");
    assert_eq!(status, 418, "{answer}");
    let (status, answer) = http_get_from(&client_rt, "10.96.0.31:80", "web2.shop.svc.cluster.local", "/x");
    assert_eq!(status, 200, "{answer}");
    assert!(answer.contains("web GET /x"), "{answer}");

    drop(zt_a);
    drop(zt_b);
}
