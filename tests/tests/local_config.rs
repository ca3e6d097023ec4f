//! The local YAML config source: initial load, reload on change, removal, and bad files or
//! resources leaving the previous state in force.

use std::path::Path;
use std::time::Duration;

use common::readiness::Ready;
use common::xds::{LocalConfig, LocalSource, XdsMetrics, validate};
use mesh_tests::until;
use proto::ADDRESS_TYPE_URL;
use proto::workload::address;

const WAIT: Duration = Duration::from_secs(20);

const V1: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: demo, labels: {istio.io/dataplane-mode: ambient}}
---
apiVersion: v1
kind: Pod
metadata: {name: client, namespace: demo, labels: {app: client}}
spec: {serviceAccountName: client, nodeName: node-a}
status: {podIP: 10.42.1.10}
---
apiVersion: v1
kind: Pod
metadata: {name: echo, namespace: demo, labels: {app: echo, istio.io/dataplane-mode: none}}
spec: {nodeName: node-a, containers: [{name: echo, ports: [{name: grpc, containerPort: 8080}]}]}
status: {podIPs: [{ip: 10.42.2.20}, {ip: "fd00::20"}]}
---
apiVersion: v1
kind: Service
metadata: {name: echo, namespace: demo, labels: {istio.io/use-waypoint: waypoint}}
spec:
  selector: {app: echo}
  clusterIP: 10.96.0.80
  trafficDistribution: PreferClose
  ports: [{name: grpc, port: 80, targetPort: grpc, appProtocol: kubernetes.io/h2c}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-intruder, namespace: demo}
spec:
  action: DENY
  rules:
    - from:
        - source:
            principals: [cluster.local/ns/other/sa/intruder]
            notNamespaces: [kube-*]
            ipBlocks: [10.0.0.0/8, 192.168.1.1]
            serviceAccounts: [other/intruder]
      to: [{operation: {ports: ["8080"]}}]
"#;

fn write(path: &Path, text: &str) {
    // Write then rename, the way a config-map update lands.
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).expect("write config");
    std::fs::rename(&tmp, path).expect("rename config");
}

#[tokio::test]
async fn file_source_loads_reloads_and_keeps_last_good_state() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("mesh.yaml");
    write(&path, V1);

    let mesh_tests::Stores { addresses, policies, handlers } = mesh_tests::Stores::new();
    let ready = Ready::new();
    let mut registry = common::metrics::new_registry();
    let metrics = XdsMetrics::new(&mut registry);
    let source =
        LocalSource::new(&path, handlers, &ready, metrics).with_poll_interval(Duration::from_millis(20));
    assert!(!ready.is_ready());
    let task = tokio::spawn(source.run());
    tokio::time::timeout(WAIT, ready.wait()).await.expect("initial load makes the source ready");

    // Initial load: the objects translated onto the wire types.
    let client_uid = "Kubernetes//Pod/demo/client";
    let echo_uid = "Kubernetes//Pod/demo/echo";
    let svc = "demo/echo.demo.svc.cluster.local";
    assert_eq!(addresses.names(), vec![client_uid.to_string(), echo_uid.to_string(), svc.to_string()]);
    let Some(address::Type::Workload(echo)) = addresses.get(echo_uid).and_then(|a| a.r#type) else {
        panic!("echo is a workload")
    };
    assert_eq!(echo.addresses[0], vec![10, 42, 2, 20]);
    assert_eq!(echo.addresses[1].len(), 16);
    assert_eq!(echo.tunnel_protocol(), proto::workload::TunnelProtocol::None, "opted out of the mesh");
    assert_eq!(echo.services[svc].ports[0].target_port, 8080, "named target port");
    let Some(address::Type::Service(service)) = addresses.get(svc).and_then(|a| a.r#type) else {
        panic!("echo service")
    };
    assert_eq!(service.ports[0].app_protocol(), proto::workload::AppProtocol::Http2);
    assert_eq!(service.waypoint.as_ref().map(|w| w.hbone_mtls_port), Some(15008));
    let lb = service.load_balancing.expect("lb");
    assert_eq!(lb.mode(), proto::workload::load_balancing::Mode::Failover);
    let policy = policies.get("demo/deny-intruder").expect("policy");
    assert_eq!(policy.action(), proto::security::Action::Deny);
    let m = &policy.rules[0].clauses[0].matches[0];
    assert_eq!(m.source_ips[0].length, 8);
    assert_eq!(m.source_ips[1].length, 32);
    assert_eq!(m.service_accounts[0].service_account, "intruder");
    assert!(m.not_namespaces[0].match_type.is_some());
    assert_eq!(policy.rules[0].clauses[1].matches[0].destination_ports, vec![8080]);

    // Reload: client moves, the policy goes away.
    let v2 = V1.replace("10.42.1.10", "10.42.1.11");
    let v2 = &v2[..v2.find("---\napiVersion: security.istio.io/v1").expect("policy")];
    write(&path, v2);
    until(&*policies, "policy removed", |s| s.is_empty()).await;
    until(&*addresses, "client moved", |s| {
        matches!(s.get(client_uid).and_then(|a| a.r#type), Some(address::Type::Workload(w)) if w.addresses == vec![vec![10, 42, 1, 11]])
    })
    .await;
    let echo_version = addresses.version(echo_uid);

    // Not YAML at all: nothing changes (what could not be read is not taken as deleted). Then
    // an unknown field in the Service: it keeps its previous version while the client moves.
    write(&path, "apiVersion: v1\nkind: [ {{{ not yaml");
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(addresses.len(), 3);
    assert_eq!(addresses.version(echo_uid), echo_version);
    let svc_version = addresses.version(svc);
    let v3 = v2.replace(
        "trafficDistribution: PreferClose",
        "trafficDistribution: PreferClose\n  sessionAfinity: None",
    );
    write(&path, &v3.replace("10.42.1.11", "10.42.1.12"));
    until(&*addresses, "client moved again", |s| {
        matches!(s.get(client_uid).and_then(|a| a.r#type), Some(address::Type::Workload(w)) if w.addresses == vec![vec![10, 42, 1, 12]])
    })
    .await;
    assert_eq!(addresses.version(svc), svc_version, "the refused service keeps its previous version");

    // Our internal wire schema is not a config format: refused whole, nothing changes.
    write(&path, "workloads: []\n");
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(addresses.len(), 3);

    let text = common::metrics::render(&registry);
    for expected in [
        "istio_xds_rejected_config_objects_total{kind=\"Service\"} 1",
        "istio_xds_rejected_config_objects_total{kind=\"\"} 1",
    ] {
        assert!(text.contains(expected), "{expected}: {text}");
    }
    let nacks = format!("istio_xds_nack_total{{url=\"{ADDRESS_TYPE_URL}\"}} 1");
    assert!(text.contains(&nacks), "the internal-schema file: {text}");
    task.abort();
}

#[test]
fn demo_config_is_valid() {
    let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/local-mesh.yaml"))
        .expect("demo config");
    let translation =
        common::translate::Translator::default().translate_yaml([("local-mesh.yaml", text.as_str())]);
    let refused: Vec<String> = translation.refusals().collect();
    assert!(refused.is_empty(), "{refused:?}");
    let resources = translation.resources;
    assert!(resources.len() >= 6);
    for r in resources {
        let ok = match r.type_url {
            ADDRESS_TYPE_URL => {
                validate::address(&r.name, &prost::Message::decode(r.body.value.as_slice()).expect("decodes"))
            }
            proto::AUTHORIZATION_TYPE_URL => validate::authorization(
                &r.name,
                &prost::Message::decode(r.body.value.as_slice()).expect("decodes"),
            ),
            proto::WAYPOINT_RESOURCE_TYPE_URL => {
                let resource: proto::waypoint::Resource =
                    prost::Message::decode(r.body.value.as_slice()).expect("decodes");
                match resource.kind {
                    Some(proto::waypoint::resource::Kind::Route(route)) => {
                        waypoint::route::Route::from_proto(&route).map(drop)
                    }
                    other => Err(format!("unexpected waypoint resource {other:?}")),
                }
            }
            other => Err(format!("unexpected type {other}")),
        };
        assert_eq!(ok, Ok(()), "{}", r.name);
    }
}

#[test]
fn unknown_fields_are_refused_with_their_name() {
    let err = LocalConfig::from_yaml("workloads: [{name: a, namespace: b, serviceAcount: typo}]")
        .expect_err("typo");
    assert!(err.to_string().contains("serviceAcount"), "{err}");
}

const OBJECTS: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: demo, labels: {istio.io/dataplane-mode: ambient}}
---
apiVersion: v1
kind: Pod
metadata: {name: client, namespace: demo, labels: {app: client}}
spec: {serviceAccountName: client, nodeName: node-a}
status: {podIP: 10.42.1.10}
"#;

const POLICY: &str = r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-intruder, namespace: demo}
spec:
  action: DENY
  rules: [{from: [{source: {principals: [cluster.local/ns/other/sa/intruder]}}]}]
"#;

/// The user-facing form: a directory of multi-document YAML of standard kinds. A refused
/// object is logged, counted and shown with its field, its previous version stays in force,
/// and the rest of the directory applies.
#[tokio::test]
async fn directory_of_standard_objects_refuses_one_object_and_applies_the_rest() {
    let dir = tempfile::tempdir().expect("tempdir");
    write(&dir.path().join("10-workloads.yaml"), OBJECTS);
    write(&dir.path().join("20-policy.yml"), POLICY);
    std::fs::write(dir.path().join("notes.txt"), "not config").expect("write");

    let mesh_tests::Stores { addresses, policies, handlers } = mesh_tests::Stores::new();
    let ready = Ready::new();
    let mut registry = common::metrics::new_registry();
    let metrics = XdsMetrics::new(&mut registry);
    let objects = common::xds::ConfigObjects::default();
    let source = LocalSource::new(dir.path(), handlers, &ready, metrics)
        .with_poll_interval(Duration::from_millis(20))
        .with_objects(objects.clone());
    let task = tokio::spawn(source.run());
    tokio::time::timeout(WAIT, ready.wait()).await.expect("initial load makes the source ready");
    assert_eq!(addresses.names(), vec!["Kubernetes//Pod/demo/client".to_string()]);
    let deny = policies.get("demo/deny-intruder").expect("policy");
    assert_eq!(deny.action(), proto::security::Action::Deny);

    // The policy gains a typo and the pod moves: the pod moves, the policy stays as it was.
    write(&dir.path().join("20-policy.yml"), &POLICY.replace("principals:", "principal:"));
    write(&dir.path().join("10-workloads.yaml"), &OBJECTS.replace("10.42.1.10", "10.42.1.11"));
    until(&*addresses, "client moved", |s| {
        matches!(s.get("Kubernetes//Pod/demo/client").and_then(|a| a.r#type), Some(address::Type::Workload(w)) if w.addresses == vec![vec![10, 42, 1, 11]])
    })
    .await;
    let refused = tokio::time::timeout(WAIT, async {
        loop {
            let snap = objects.snapshot();
            if let Some(s) = snap.objects.iter().find(|s| s.object.name == "deny-intruder" && !s.accepted) {
                return s.clone();
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("the refusal is reported");
    assert_eq!(refused.origin, "20-policy.yml#1");
    assert_eq!(refused.in_force, common::translate::InForce::Previous);
    assert_eq!(
        refused.fault.as_ref().map(|f| f.field.as_str()),
        Some("spec.rules[0].from[0].source.principal")
    );
    assert_eq!(policies.get("demo/deny-intruder"), Some(deny), "the previous version stays in force");
    let text = common::metrics::render(&registry);
    assert!(
        text.contains("istio_xds_rejected_config_objects_total{kind=\"AuthorizationPolicy\"} 1"),
        "{text}"
    );
    let dump = serde_json::to_value(objects.snapshot()).expect("json");
    assert_eq!(dump["objects"][0]["fault"]["field"], "spec.rules[0].from[0].source.principal", "{dump}");
    task.abort();
}
