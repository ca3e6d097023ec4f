use common::translate::Translator;

use super::*;

const OBJECTS: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: a, labels: {istio.io/dataplane-mode: ambient}}
---
apiVersion: v1
kind: Namespace
metadata: {name: b, labels: {istio.io/dataplane-mode: ambient}}
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: wa, namespace: a}
spec: {gatewayClassName: ambient-waypoint, listeners: [{name: mesh, port: 15008, protocol: HBONE}]}
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: wb, namespace: b}
spec: {gatewayClassName: ambient-waypoint, listeners: [{name: mesh, port: 15008, protocol: HBONE}]}
---
apiVersion: v1
kind: Service
metadata: {name: sa, namespace: a, labels: {istio.io/use-waypoint: wa}}
spec: {clusterIP: 10.96.0.1, ports: [{port: 80}]}
---
apiVersion: v1
kind: Service
metadata: {name: sb, namespace: b, labels: {istio.io/use-waypoint: wb}}
spec: {clusterIP: 10.96.0.2, ports: [{port: 80}]}
---
apiVersion: v1
kind: Service
metadata: {name: plain, namespace: b}
spec: {clusterIP: 10.96.0.3, ports: [{port: 80}]}
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: ra, namespace: a}
spec:
  parentRefs: [{group: "", kind: Service, name: sa, port: 80}]
  rules: [{backendRefs: [{name: sa, port: 80}], timeouts: {request: 1s}, retry: {attempts: 2}}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: rb, namespace: b}
spec:
  parentRefs: [{group: "", kind: Service, name: sb, port: 80}]
  rules: [{backendRefs: [{name: sb, port: 80}]}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: rplain, namespace: b}
spec:
  parentRefs: [{group: "", kind: Service, name: plain, port: 80}]
  rules: [{backendRefs: [{name: plain, port: 80}]}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-b, namespace: b}
spec:
  targetRefs: [{group: "", kind: Service, name: sb}]
  action: DENY
  rules: [{to: [{operation: {methods: [DELETE]}}]}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: l4, namespace: a}
spec:
  selector: {matchLabels: {app: x}}
  action: DENY
  rules: [{from: [{source: {namespaces: [b]}}]}]
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: plain, namespace: b}
spec: {host: plain.b.svc.cluster.local, trafficPolicy: {loadBalancer: {simple: ROUND_ROBIN}}}
"#;

fn refs() -> Vec<WaypointRef> {
    let id = |ns: &str, sa: &str| Identity::new("cluster.local", ns, sa).expect("identity");
    vec![
        WaypointRef { namespace: "a".into(), name: "wa".into(), identity: id("a", "wa"), serve: true },
        WaypointRef { namespace: "b".into(), name: "wb".into(), identity: id("b", "wb"), serve: true },
    ]
}

fn names(served: &Served, id: &Identity, type_url: &str) -> Vec<String> {
    served.view(id, type_url).expect("known identity").keys().cloned().collect()
}

#[test]
fn each_waypoint_gets_the_mesh_state_and_only_its_own_configuration() {
    let t = Translator::default().translate_yaml([("objects.yaml", OBJECTS)]);
    assert_eq!(t.refused_count(), 0, "{:?}", t.refusals().collect::<Vec<_>>());
    let served = split(&t, &refs(), "cluster.local", 1);
    let [wa, wb] = [refs()[0].identity.clone(), refs()[1].identity.clone()];

    // Mesh-wide state: the same for both.
    let addresses_a = names(&served, &wa, proto::ADDRESS_TYPE_URL);
    assert!(addresses_a.contains(&"b/sb.b.svc.cluster.local".to_string()), "{addresses_a:?}");
    assert_eq!(addresses_a, names(&served, &wb, proto::ADDRESS_TYPE_URL));
    // L4 policies are ztunnel's: none served, but the type is answered.
    assert!(names(&served, &wa, proto::AUTHORIZATION_TYPE_URL).is_empty());

    // Routes go to the waypoint of their Service, policies where their target goes (the
    // retry policy with its route), backend traffic policy (DestinationRule) everywhere; a
    // route whose Service uses no waypoint of ours goes nowhere.
    let a = names(&served, &wa, proto::WAYPOINT_RESOURCE_TYPE_URL);
    let b = names(&served, &wb, proto::WAYPOINT_RESOURCE_TYPE_URL);
    assert_eq!(a, ["a/ra#0", "a/ra#0.retry", "b/DestinationRule:plain"]);
    assert_eq!(b, ["b/AuthorizationPolicy:deny-b", "b/DestinationRule:plain", "b/rb#0"]);

    assert_eq!(served.waypoint_of_service("a", "sa.a.svc.cluster.local"), Some("a/wa"));
    assert_eq!(served.waypoint_of_service("b", "plain.b.svc.cluster.local"), None);
}

#[test]
fn an_identity_that_is_no_waypoint_of_ours_gets_nothing() {
    let t = Translator::default().translate_yaml([("objects.yaml", OBJECTS)]);
    let served = split(&t, &refs(), "cluster.local", 1);
    let stranger = Identity::new("cluster.local", "a", "default").expect("identity");
    assert!(!served.knows(&stranger));
    assert!(served.view(&stranger, proto::ADDRESS_TYPE_URL).is_none());
    // A Gateway that is gone takes its identity's access with it.
    let served = split(&t, &refs()[1..], "cluster.local", 2);
    assert!(!served.knows(&refs()[0].identity));
    // One not programmed yet is not served, though its services are attributed to it.
    let mut waiting = refs();
    waiting[0].serve = false;
    let served = split(&t, &waiting, "cluster.local", 3);
    assert!(!served.knows(&waiting[0].identity) && served.knows(&waiting[1].identity));
    assert_eq!(served.waypoint_of_service("a", "sa.a.svc.cluster.local"), Some("a/wa"));
}
