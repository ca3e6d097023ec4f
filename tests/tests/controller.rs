//! The waypoint controller against an HTTP server speaking the Kubernetes API
//! (`mesh_tests::kube_api`: no real API server can run here), with real waypoints fetching their
//! configuration from it over delta ADS with mesh mTLS:
//! - a Gateway of our class is deployed (ServiceAccount, Deployment, Service, PDB owned by it)
//!   and gets `Accepted`, `Programmed` and the Service's address; routes attached through a
//!   Service that uses it get our `parents` entry; our GatewayClass is `Accepted`;
//! - each waypoint, proving its SPIFFE identity, receives its own routes and not another's; an
//!   identity that is no waypoint of ours is refused, and so is a waypoint whose Gateway is
//!   deleted;
//! - two replicas elect one writer through a Lease, and the other takes over when it goes.

use std::time::Duration;

use clap::Parser;
use mesh_tests::kube_api::{KubeApi, KubeApiServer};
use serde_json::{Value, json};

const WAIT: Duration = Duration::from_secs(20);
const CONTROLLER_ID: &str = "spiffe://cluster.local/ns/ambient-system/sa/ambient-controller";
const GW: &str = "gateway.networking.k8s.io/v1";

/// The cluster: two namespaces, each with a waypoint Gateway, a Service using it and a route.
const OBJECTS: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: demo, labels: {istio.io/dataplane-mode: ambient}}
---
apiVersion: v1
kind: Namespace
metadata: {name: other, labels: {istio.io/dataplane-mode: ambient}}
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: wp, namespace: demo}
spec: {gatewayClassName: ambient-waypoint, listeners: [{name: mesh, port: 15008, protocol: HBONE}]}
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: wp2, namespace: other}
spec: {gatewayClassName: ambient-waypoint, listeners: [{name: mesh, port: 15008, protocol: HBONE}]}
---
apiVersion: v1
kind: Pod
metadata: {name: echo-1, namespace: demo, labels: {app: echo}}
spec: {serviceAccountName: echo, nodeName: node-a, containers: [{name: echo, image: echo}]}
status: {podIP: 10.1.0.5, phase: Running}
---
apiVersion: v1
kind: Service
metadata: {name: echo, namespace: demo, labels: {istio.io/use-waypoint: wp}}
spec: {selector: {app: echo}, ports: [{name: http, port: 80, targetPort: 8080}]}
---
apiVersion: v1
kind: Service
metadata: {name: svc2, namespace: other, labels: {istio.io/use-waypoint: wp2}}
spec: {selector: {app: svc2}, ports: [{name: http, port: 80}]}
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: r, namespace: demo}
spec:
  parentRefs: [{group: "", kind: Service, name: echo, port: 80}]
  rules: [{backendRefs: [{name: echo, port: 80}]}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: broken, namespace: demo}
spec:
  parentRefs: [{group: "", kind: Service, name: echo, port: 80}]
  rules: [{matches: [{path: {type: PathPrefix, value: /b}}], backendRefs: [{name: missing, port: 80}]}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: r2, namespace: other}
spec:
  parentRefs: [{group: "", kind: Service, name: svc2, port: 80}]
  rules: [{backendRefs: [{name: svc2, port: 80}]}]
"#;

/// Our GatewayClass (the manifests install it).
const GATEWAY_CLASS: &str = r#"
apiVersion: gateway.networking.k8s.io/v1
kind: GatewayClass
metadata: {name: ambient-waypoint}
spec: {controllerName: waypoint.ambient.dev/controller}
"#;

fn load(api: &KubeApi, yaml: &str) {
    for doc in serde_yaml_ng::Deserializer::from_str(yaml) {
        let v: Value = serde::Deserialize::deserialize(doc).expect("yaml");
        api.create(v).expect("create");
    }
}

async fn kube_client(api: &KubeApi) -> kube::Client {
    let kubeconfig = kube::config::Kubeconfig::from_yaml(&api.kubeconfig()).expect("kubeconfig");
    let config =
        kube::Config::from_custom_kubeconfig(kubeconfig, &kube::config::KubeConfigOptions::default())
            .await
            .expect("client config");
    kube::Client::try_from(config).expect("client")
}

fn controller_config(ca: &str, pod: &str) -> controller::config::Config {
    let args = controller::config::Args::try_parse_from([
        "ambient-controller",
        "--local-ca",
        ca,
        "--pod-name",
        pod,
        "--xds-addr",
        "127.0.0.1:0",
        "--admin-addr",
        "127.0.0.1:0",
        "--metrics-addr",
        "127.0.0.1:0",
        "--readiness-addr",
        "127.0.0.1:0",
    ])
    .expect("controller flags");
    let mut config = controller::config::Config::from_args(args).expect("config");
    config.lease_duration = Duration::from_secs(3);
    config
}

async fn start_controller(api: &KubeApi, ca: &str, pod: &str) -> controller::app::App {
    let app = controller::app::App::start(controller_config(ca, pod), kube_client(api).await)
        .await
        .expect("controller");
    let ready = app.ready.clone();
    tokio::time::timeout(WAIT, ready.wait())
        .await
        .unwrap_or_else(|_| panic!("controller never ready: {:?}", app.ready.pending()));
    app
}

/// A waypoint app named `name` in `ns` fetching from the controller at `xds` (not waited for).
async fn start_waypoint(xds: std::net::SocketAddr, ca: &str, ns: &str, name: &str) -> waypoint::app::App {
    let url = format!("https://{xds}");
    let args = waypoint::config::Args::try_parse_from([
        "waypoint",
        "--xds-address",
        &url,
        "--xds-server-identity",
        CONTROLLER_ID,
        "--local-ca",
        ca,
        "--name",
        name,
        "--namespace",
        ns,
        "--listen-addr",
        "127.0.0.1:0",
        "--admin-addr",
        "127.0.0.1:0",
        "--metrics-addr",
        "127.0.0.1:0",
        "--readiness-addr",
        "127.0.0.1:0",
    ])
    .expect("waypoint flags");
    let config = waypoint::config::Config::from_args(args).expect("waypoint config");
    waypoint::app::App::start(config).await.expect("waypoint starts")
}

fn condition<'a>(obj: &'a Value, path: &str, kind: &str) -> Option<&'a Value> {
    obj.pointer(path)?.as_array()?.iter().find(|c| c["type"] == kind)
}

fn is_true(obj: &Value, path: &str, kind: &str) -> bool {
    condition(obj, path, kind).is_some_and(|c| c["status"] == "True")
}

fn our_parent(route: &Value) -> Option<&Value> {
    route
        .pointer("/status/parents")?
        .as_array()?
        .iter()
        .find(|p| p["controllerName"] == "waypoint.ambient.dev/controller")
}

async fn metrics(addr: std::net::SocketAddr) -> String {
    let (status, body) = mesh_tests::http::get(addr, "/metrics").await.expect("metrics");
    assert_eq!(status, 200);
    body
}

/// The value of the first sample of `name` whose labels contain `label`, or 0.
fn sample(metrics: &str, name: &str, label: &str) -> f64 {
    metrics
        .lines()
        .filter(|l| l.starts_with(name) && l.contains(label))
        .filter_map(|l| l.rsplit(' ').next()?.parse().ok())
        .next()
        .unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_controller_deploys_programs_and_serves_each_waypoint_only_its_own_configuration() {
    let api = KubeApiServer::start().await.expect("api server");
    load(&api, OBJECTS);
    load(&api, GATEWAY_CLASS);
    let ca_dir = tempfile::tempdir().expect("tempdir");
    let ca = ca_dir.path().to_str().expect("path");
    let ctl = start_controller(&api, ca, "c-1").await;

    // Deployed, owned by the Gateway.
    let gw = api.get(GW, "Gateway", Some("demo"), "wp").expect("gateway");
    let uid = gw["metadata"]["uid"].clone();
    for (v, kind) in [
        ("v1", "ServiceAccount"),
        ("apps/v1", "Deployment"),
        ("v1", "Service"),
        ("policy/v1", "PodDisruptionBudget"),
    ] {
        let obj = api
            .wait_for_object(WAIT, v, kind, Some("demo"), "wp", |_| true)
            .await
            .unwrap_or_else(|_| panic!("{kind} demo/wp not deployed"));
        assert_eq!(obj["metadata"]["ownerReferences"][0]["uid"], uid, "{kind} owned by the Gateway");
    }
    let deployment = api.get("apps/v1", "Deployment", Some("demo"), "wp").expect("deployment");
    let env = deployment.pointer("/spec/template/spec/containers/0/env").expect("env").to_string();
    assert!(env.contains(CONTROLLER_ID), "{env}");
    let service_ip =
        api.get("v1", "Service", Some("demo"), "wp").expect("service")["spec"]["clusterIP"].clone();
    assert!(service_ip.as_str().is_some_and(|ip| ip.starts_with("10.96.")), "{service_ip}");

    // Gateway status: accepted, programmed, addressed by the Service's cluster IP.
    let gw = api
        .wait_for_object(WAIT, GW, "Gateway", Some("demo"), "wp", |g| {
            is_true(g, "/status/conditions", "Programmed")
        })
        .await
        .unwrap_or_else(|_| {
            panic!("Gateway never programmed: {:?}", api.get(GW, "Gateway", Some("demo"), "wp"))
        });
    assert!(is_true(&gw, "/status/conditions", "Accepted"), "{gw}");
    assert_eq!(gw["status"]["addresses"], json!([{"type": "IPAddress", "value": service_ip}]));
    assert_eq!(gw["status"]["listeners"][0]["attachedRoutes"], 1, "{gw}");
    let class = api
        .wait_for_object(WAIT, GW, "GatewayClass", None, "ambient-waypoint", |c| {
            is_true(c, "/status/conditions", "Accepted")
        })
        .await;
    assert!(class.is_ok(), "GatewayClass not accepted");

    // Route status: ours added for the Service parent; the broken route says why.
    let route = api
        .wait_for_object(WAIT, GW, "HTTPRoute", Some("demo"), "r", |r| our_parent(r).is_some())
        .await
        .expect("route status");
    let parent = our_parent(&route).expect("parent");
    assert!(
        is_true(parent, "/conditions", "Accepted") && is_true(parent, "/conditions", "ResolvedRefs"),
        "{parent}"
    );
    let broken = api
        .wait_for_object(WAIT, GW, "HTTPRoute", Some("demo"), "broken", |r| our_parent(r).is_some())
        .await
        .expect("broken route status");
    let resolved =
        condition(our_parent(&broken).expect("parent"), "/conditions", "ResolvedRefs").expect("cond");
    assert_eq!(
        (resolved["status"].as_str(), resolved["reason"].as_str()),
        (Some("False"), Some("BackendNotFound"))
    );

    // The waypoints, over mTLS: each gets its own route only.
    let wp = start_waypoint(ctl.xds_addr, ca, "demo", "wp").await;
    let wp2 = start_waypoint(ctl.xds_addr, ca, "other", "wp2").await;
    for w in [&wp, &wp2] {
        let ready = w.ready.clone();
        tokio::time::timeout(WAIT, ready.wait())
            .await
            .unwrap_or_else(|_| panic!("waypoint {} never synced: {:?}", w.identity, w.ready.pending()));
    }
    let names = |w: &waypoint::app::App| w.routes.versions().into_keys().collect::<Vec<_>>();
    assert_eq!(names(&wp), ["demo/r#0"], "the broken route is refused, the other namespace's is not ours");
    assert_eq!(names(&wp2), ["other/r2#0"]);
    assert!(!wp.state.addresses().versions().is_empty(), "mesh state served");

    // An identity that is no waypoint of ours is refused and never syncs.
    let stranger = start_waypoint(ctl.xds_addr, ca, "demo", "stranger").await;
    let ready = stranger.ready.clone();
    assert!(tokio::time::timeout(Duration::from_secs(3), ready.wait()).await.is_err(), "a stranger synced");
    assert!(stranger.routes.versions().is_empty());
    let m = metrics(ctl.addrs.metrics).await;
    assert!(sample(&m, "istio_ambient_controller_xds_refusals_total", "unknown_identity") >= 1.0, "{m}");

    // Garbage instead of a TLS handshake (no certificate at all) is refused and counted.
    {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut raw = tokio::net::TcpStream::connect(ctl.xds_addr).await.expect("connect");
        raw.write_all(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n").await.expect("write");
        let mut buf = Vec::new();
        let _ = tokio::time::timeout(WAIT, raw.read_to_end(&mut buf)).await.expect("closed by the server");
        let m = metrics(ctl.addrs.metrics).await;
        assert!(sample(&m, "istio_ambient_controller_xds_refusals_total", "handshake") >= 1.0, "{m}");
    }

    // A new route reaches its waypoint live.
    load(
        &api,
        r#"
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: r3, namespace: demo}
spec:
  parentRefs: [{group: "", kind: Service, name: echo, port: 80}]
  rules: [{matches: [{headers: [{name: x-canary, value: "1"}]}], backendRefs: [{name: echo, port: 80}]}]
"#,
    );
    let routes = wp.routes.clone();
    let got =
        tokio::time::timeout(WAIT, routes.wait_for(|_| routes.versions().contains_key("demo/r3#0"))).await;
    assert!(got.is_ok(), "the new route never arrived: {:?}", names(&wp));
    assert_eq!(names(&wp2), ["other/r2#0"], "and not at the other waypoint");

    // A Gateway named like an object it does not own is not deployed over it: the app's Service
    // stays as it was, the Gateway is not programmed, and its identity is not served.
    load(
        &api,
        r#"
apiVersion: v1
kind: Service
metadata: {name: taken, namespace: demo}
spec: {selector: {app: other}, ports: [{name: http, port: 80}]}
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: taken, namespace: demo}
spec: {gatewayClassName: ambient-waypoint, listeners: [{name: mesh, port: 15008, protocol: HBONE}]}
"#,
    );
    let taken = api
        .wait_for_object(WAIT, GW, "Gateway", Some("demo"), "taken", |g| {
            condition(g, "/status/conditions", "Programmed").is_some()
        })
        .await
        .expect("status on the Gateway named like an existing Service");
    let programmed = condition(&taken, "/status/conditions", "Programmed").expect("condition");
    assert_eq!(programmed["status"], "False", "{taken}");
    assert!(programmed["message"].as_str().is_some_and(|m| m.contains("not owned")), "{programmed}");
    assert_eq!(taken["status"]["addresses"], json!([]));
    let svc = api.get("v1", "Service", Some("demo"), "taken").expect("service");
    assert_eq!(svc["spec"]["selector"], json!({"app": "other"}), "the app's Service was not taken over");
    assert!(svc["metadata"].get("ownerReferences").is_none(), "{svc}");
    let impostor = start_waypoint(ctl.xds_addr, ca, "demo", "taken").await;
    let ready = impostor.ready.clone();
    assert!(tokio::time::timeout(Duration::from_secs(2), ready.wait()).await.is_err(), "served anyway");
    drop(impostor);

    // A waypoint refuses a server that is not the identity it was told (here: a controller
    // running as another service account).
    let mut other = controller_config(ca, "c-x");
    other.identity = common::identity::Identity::new("cluster.local", "ambient-system", "not-the-controller")
        .expect("identity");
    let fake = controller::app::App::start(other, kube_client(&api).await).await.expect("second controller");
    let ready = fake.ready.clone();
    tokio::time::timeout(WAIT, ready.wait()).await.expect("second controller ready");
    let fooled = start_waypoint(fake.xds_addr, ca, "demo", "wp").await;
    let ready = fooled.ready.clone();
    assert!(
        tokio::time::timeout(Duration::from_secs(2), ready.wait()).await.is_err(),
        "trusted the wrong server"
    );
    assert!(fooled.routes.versions().is_empty());
    drop((fooled, fake));

    // Converged: nothing more is written (no status ping-pong, no re-applies).
    let writes = |m: &str| -> f64 {
        m.lines()
            .filter(|l| l.starts_with("istio_ambient_controller_api_writes_total"))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    };
    tokio::time::sleep(Duration::from_secs(1)).await;
    let before = writes(&metrics(ctl.addrs.metrics).await);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after = writes(&metrics(ctl.addrs.metrics).await);
    assert_eq!(before, after, "the controller keeps writing to the API server");
    assert!(before > 0.0);

    // Deleting the Gateway removes what was deployed for it and cuts its waypoint off.
    api.delete(GW, "Gateway", Some("demo"), "wp").expect("deleted");
    for (v, kind) in [("apps/v1", "Deployment"), ("v1", "Service"), ("v1", "ServiceAccount")] {
        assert!(api.get(v, kind, Some("demo"), "wp").is_none(), "{kind} collected with its Gateway");
    }
    let cut = async {
        loop {
            let m = metrics(ctl.addrs.metrics).await;
            if sample(&m, "istio_ambient_controller_xds_refusals_total", "identity_removed") >= 1.0 {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    assert!(tokio::time::timeout(WAIT, cut).await.is_ok(), "the deleted waypoint's stream was not ended");
    drop((wp, wp2, stranger, ctl));
    api.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_elect_one_writer_and_the_other_takes_over() {
    let api = KubeApiServer::start().await.expect("api server");
    load(&api, OBJECTS);
    load(&api, GATEWAY_CLASS);
    let ca_dir = tempfile::tempdir().expect("tempdir");
    let ca = ca_dir.path().to_str().expect("path");
    let a = start_controller(&api, ca, "c-a").await;
    let b = start_controller(&api, ca, "c-b").await;
    let one_leader = async {
        loop {
            let (la, lb) = (*a.leader.borrow(), *b.leader.borrow());
            if la != lb {
                return la;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    let a_leads = tokio::time::timeout(WAIT, one_leader).await.expect("exactly one leader");
    // Both serve; for a while, exactly one leads.
    for _ in 0..10 {
        assert_ne!(*a.leader.borrow(), *b.leader.borrow(), "two leaders or none");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let lease = api.get("coordination.k8s.io/v1", "Lease", Some("ambient-system"), "ambient-controller");
    let holder = lease.as_ref().and_then(|l| l.pointer("/spec/holderIdentity")).cloned();
    assert_eq!(holder, Some(json!(if a_leads { "c-a" } else { "c-b" })), "{lease:?}");
    let (leader, follower) = if a_leads { (a, b) } else { (b, a) };
    drop(leader);
    let mut follows = follower.leader.clone();
    let took_over = tokio::time::timeout(WAIT, follows.wait_for(|l| *l)).await;
    assert!(took_over.is_ok(), "the other replica never took over");
    // The new leader writes: a new Gateway gets deployed.
    load(
        &api,
        "apiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\nmetadata: {name: late, namespace: demo}\nspec: {gatewayClassName: ambient-waypoint, listeners: [{name: mesh, port: 15008, protocol: HBONE}]}\n",
    );
    let deployed = api.wait_for_object(WAIT, "apps/v1", "Deployment", Some("demo"), "late", |_| true).await;
    assert!(deployed.is_ok(), "the new leader does not deploy");
    drop(follower);
    api.stop().await;
}

/// The same objects the ztunnels' control plane (standing in for istiod) and the controller
/// read: a client on node-a, `web` behind the waypoint on node-b.
const MESH: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: shop, labels: {istio.io/dataplane-mode: ambient}}
---
apiVersion: v1
kind: Pod
metadata: {name: client, namespace: shop, labels: {app: client}}
spec: {serviceAccountName: client, nodeName: node-a}
status: {podIP: 10.1.1.2}
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
metadata: {name: web, namespace: shop, labels: {istio.io/use-waypoint: waypoint}}
spec: {selector: {app: web}, clusterIP: 10.96.0.30, ports: [{name: http, port: 80, targetPort: 8081}]}
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: waypoint, namespace: shop}
spec: {gatewayClassName: ambient-waypoint, listeners: [{name: mesh, port: 15008, protocol: HBONE}]}
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
    - filters: [{type: ResponseHeaderModifier, responseHeaderModifier: {set: [{name: x-route, value: v1}]}}]
      backendRefs: [{name: web, port: 80}]
"#;

/// The waypoint's Service as istiod sees it (in the API server the controller creates it).
const WAYPOINT_SERVICE: &str = r#"
---
apiVersion: v1
kind: Service
metadata: {name: waypoint, namespace: shop}
spec:
  selector: {gateway.networking.k8s.io/gateway-name: waypoint}
  clusterIP: 10.96.0.100
  ports: [{name: mesh, port: 15008}]
"#;

#[path = "support/l7.rs"]
mod support;

/// Root (network namespaces and eBPF; CI runs as root, elsewhere this fails saying why).
#[test]
fn a_waypoint_configured_by_the_controller_carries_traffic_under_its_routes_and_policies() {
    use mesh_tests::netns::{Netns, link_nodes, require_root, wire};
    use mesh_tests::node::NodeZtunnel;
    require_root("controller end-to-end test");
    if std::env::var_os("RUST_LOG").is_some() {
        common::telemetry::init(common::telemetry::LogFormat::Text);
    }
    let pid = std::process::id();
    let ns = |role: &str| Netns::create(&format!("ct{pid}-{role}"));
    let (node_a, node_b) = (ns("na"), ns("nb"));
    let (client, web, wp) = (ns("client"), ns("web"), ns("wp"));
    link_nodes(&node_a, &node_b);
    wire(&node_a, &client, "v-client", "10.1.1");
    wire(&node_b, &web, "v-web", "10.2.3");
    wire(&node_b, &wp, "v-wp", "10.2.5");
    let _web_rt = support::http_backend(&web, "web");
    let ca_dir = tempfile::tempdir().expect("tempdir");
    let ca = ca_dir.path().to_str().expect("path").to_string();

    // istiod's part (the ztunnels' workloads and services) from the in-repo control plane.
    let store = mesh_tests::xds_server::XdsStore::new();
    store.load_yaml(&format!("{MESH}{WAYPOINT_SERVICE}")).expect("mesh config");
    let (_cp_rt, _cp) = mesh_tests::node::control_plane(&node_a, "10.0.0.1:15010", store);
    let zt_a = NodeZtunnel::start_node(&node_a, "http://10.0.0.1:15010", &ca, "node-a", &[]);
    let _zt_b = NodeZtunnel::start_node(&node_b, "http://10.0.0.1:15010", &ca, "node-b", &[]);
    zt_a.converge("node-a pods enrolled", &|s| s.pods.len() == 1);

    // Ours: the API server (as this test's HTTP stand-in) and the controller on node-a.
    let ctl_rt = node_a.runtime();
    let ca2 = ca.clone();
    let (api, _ctl) = ctl_rt
        .block_on(ctl_rt.spawn(async move {
            let api = KubeApiServer::start().await.expect("api server");
            load(&api, MESH);
            load(&api, GATEWAY_CLASS);
            let mut config = controller_config(&ca2, "c-1");
            config.xds_addr = "10.0.0.1:15012".parse().expect("addr");
            let ctl = controller::app::App::start(config, kube_client(&api).await).await.expect("controller");
            let ready = ctl.ready.clone();
            tokio::time::timeout(WAIT, ready.wait()).await.expect("controller ready");
            (api, ctl)
        }))
        .expect("join");

    // The waypoint pod fetches from the controller over mTLS, as the deployed one would.
    let wp_rt = wp.runtime();
    let waypoint = support::start_waypoint_in(
        &wp_rt,
        "https://10.0.0.1:15012",
        &ca,
        "shop",
        "10.2.5.2",
        &["--xds-server-identity", CONTROLLER_ID],
    );
    assert_eq!(waypoint.routes.versions().into_keys().collect::<Vec<_>>().len(), 2, "route and policy");

    let client_rt = client.runtime();
    let get = |path: &str| {
        let req = support::get(path, "web.shop.svc.cluster.local", &[]);
        let addr: std::net::SocketAddr = "10.96.0.30:80".parse().expect("addr");
        client_rt.block_on(client_rt.spawn(async move { support::raw_http(addr, &req).await })).expect("join")
    };
    let (status, answer) = get("/hello");
    assert_eq!(status, 200, "{answer}");
    assert!(
        answer.contains("web GET /hello") && answer.to_ascii_lowercase().contains("x-route: v1"),
        "{answer}"
    );
    let (status, answer) = get("/admin/x");
    assert_eq!(status, 403, "the AuthorizationPolicy from the API server applies: {answer}");

    // A route changed in the API server changes the traffic.
    let mut route = api.get(GW, "HTTPRoute", Some("shop"), "web").expect("route");
    route["spec"]["rules"][0]["filters"][0]["responseHeaderModifier"]["set"][0]["value"] = json!("v2");
    api.apply(route).expect("update");
    let mut last = String::new();
    let changed = (0..100).any(|_| {
        let (_, answer) = get("/hello");
        last = answer;
        let done = last.to_ascii_lowercase().contains("x-route: v2");
        if !done {
            std::thread::sleep(Duration::from_millis(100));
        }
        done
    });
    assert!(changed, "the updated route never applied: {last}");
    drop(waypoint);
}
