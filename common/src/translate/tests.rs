use std::collections::BTreeMap;

use prost::Message;
use proto::security as sec;
use proto::waypoint as wp;
use proto::workload as wl;

use super::*;

fn run(t: &mut Translator, yaml: &str) -> Translation {
    t.translate_yaml([("test.yaml", yaml)])
}

fn once(yaml: &str) -> Translation {
    run(&mut Translator::default(), yaml)
}

fn addresses(t: &Translation) -> BTreeMap<String, wl::address::Type> {
    t.resources
        .iter()
        .filter(|r| r.type_url == proto::ADDRESS_TYPE_URL)
        .map(|r| {
            let a = wl::Address::decode(r.body.value.as_slice()).expect("address");
            (r.name.clone(), a.r#type.expect("type"))
        })
        .collect()
}

fn workload(t: &Translation, uid: &str) -> wl::Workload {
    match addresses(t).remove(uid) {
        Some(wl::address::Type::Workload(w)) => w,
        other => panic!("no workload {uid}: {other:?}; have {:?}", addresses(t).keys().collect::<Vec<_>>()),
    }
}

fn service(t: &Translation, name: &str) -> wl::Service {
    match addresses(t).remove(name) {
        Some(wl::address::Type::Service(s)) => s,
        other => panic!("no service {name}: {other:?}; have {:?}", addresses(t).keys().collect::<Vec<_>>()),
    }
}

fn authorizations(t: &Translation) -> BTreeMap<String, sec::Authorization> {
    t.resources
        .iter()
        .filter(|r| r.type_url == proto::AUTHORIZATION_TYPE_URL)
        .map(|r| {
            (r.name.clone(), sec::Authorization::decode(r.body.value.as_slice()).expect("authorization"))
        })
        .collect()
}

fn waypoint_resources(t: &Translation) -> BTreeMap<String, wp::resource::Kind> {
    t.resources
        .iter()
        .filter(|r| r.type_url == proto::WAYPOINT_RESOURCE_TYPE_URL)
        .map(|r| {
            (
                r.name.clone(),
                wp::Resource::decode(r.body.value.as_slice()).expect("resource").kind.expect("kind"),
            )
        })
        .collect()
}

fn route(t: &Translation, name: &str) -> wp::Route {
    match waypoint_resources(t).remove(name) {
        Some(wp::resource::Kind::Route(r)) => r,
        other => {
            panic!("no route {name}: {other:?}; have {:?}", waypoint_resources(t).keys().collect::<Vec<_>>())
        }
    }
}

fn policy(t: &Translation, name: &str) -> wp::Policy {
    match waypoint_resources(t).remove(name) {
        Some(wp::resource::Kind::Policy(p)) => p,
        other => {
            panic!("no policy {name}: {other:?}; have {:?}", waypoint_resources(t).keys().collect::<Vec<_>>())
        }
    }
}

fn status<'a>(t: &'a Translation, kind: &str, name: &str) -> &'a ObjectStatus {
    t.statuses
        .iter()
        .find(|s| s.object.kind == kind && s.object.name == name)
        .unwrap_or_else(|| panic!("no status for {kind} {name}: {:?}", t.statuses))
}

fn assert_all_accepted(t: &Translation) {
    let refused: Vec<String> = t.refusals().collect();
    assert!(refused.is_empty(), "refused: {refused:#?}");
}

const DEMO: &str = include_str!("../../../deploy/local-mesh.yaml");

#[test]
fn the_demo_mesh_translates_as_istiod_would() {
    let t = once(DEMO);
    assert_all_accepted(&t);
    // Pods: identity, node, enrollment, canonical names, the services that select them with
    // named target ports resolved from the container ports.
    let echo1 = workload(&t, "Kubernetes//Pod/demo/echo-1");
    assert_eq!(echo1.service_account, "echo");
    assert_eq!(echo1.node, "node-a");
    assert_eq!(echo1.addresses, vec![vec![10, 42, 2, 2]]);
    assert_eq!(echo1.tunnel_protocol, wl::TunnelProtocol::Hbone as i32);
    assert_eq!((echo1.canonical_name.as_str(), echo1.canonical_revision.as_str()), ("echo", "v1"));
    assert_eq!(echo1.workload_name, "echo");
    let ports = |w: &wl::Workload, svc: &str| -> Vec<(u32, u32)> {
        w.services
            .get(svc)
            .map(|p| p.ports.iter().map(|p| (p.service_port, p.target_port)).collect())
            .unwrap_or_default()
    };
    assert_eq!(ports(&echo1, "demo/echo.demo.svc.cluster.local"), vec![(80, 8080)]);
    assert_eq!(ports(&echo1, "demo/web.demo.svc.cluster.local"), vec![(80, 8081)]);
    assert!(!echo1.services.contains_key("demo/web-canary.demo.svc.cluster.local"));
    let echo2 = workload(&t, "Kubernetes//Pod/demo/echo-2");
    assert_eq!(ports(&echo2, "demo/web-canary.demo.svc.cluster.local"), vec![(80, 8081)]);
    // The waypoint's pod speaks HBONE itself and backs the Gateway's service.
    let wpod = workload(&t, "Kubernetes//Pod/demo/waypoint");
    assert!(wpod.native_tunnel);
    assert_eq!(ports(&wpod, "demo/waypoint.demo.svc.cluster.local"), vec![(15008, 15008)]);
    let wsvc = service(&t, "demo/waypoint.demo.svc.cluster.local");
    assert_eq!(wsvc.addresses[0].address, vec![10, 96, 0, 100]);
    // Services: VIPs, protocols from port names, the waypoint by hostname.
    let web = service(&t, "demo/web.demo.svc.cluster.local");
    assert_eq!(web.addresses[0].address, vec![10, 96, 0, 90]);
    assert_eq!(web.ports[0].app_protocol, wl::AppProtocol::Http11 as i32);
    match web.waypoint.and_then(|w| w.destination) {
        Some(wl::gateway_address::Destination::Hostname(h)) => {
            assert_eq!(
                (h.namespace.as_str(), h.hostname.as_str()),
                ("demo", "waypoint.demo.svc.cluster.local")
            )
        }
        other => panic!("web's waypoint: {other:?}"),
    }
    assert!(!web.ingress_use_waypoint);
    let labelled = once(&DEMO.replace(
        "istio.io/use-waypoint: waypoint",
        "istio.io/use-waypoint: waypoint\n    istio.io/ingress-use-waypoint: \"true\"",
    ));
    assert!(service(&labelled, "demo/web.demo.svc.cluster.local").ingress_use_waypoint);
    let echo = service(&t, "demo/echo.demo.svc.cluster.local");
    assert_eq!(echo.ports[0].app_protocol, wl::AppProtocol::Tcp as i32);
    assert!(echo.waypoint.is_none());
    // The namespace-wide policy is an L4 one for ztunnel.
    let p = &authorizations(&t)["demo/demo-only"];
    assert_eq!(p.scope, sec::Scope::Namespace as i32);
    assert_eq!(p.action, sec::Action::Allow as i32);
    assert_eq!(
        p.rules[0].clauses[0].matches[0].namespaces[0].match_type,
        Some(sec::string_match::MatchType::Exact("demo".into()))
    );
    // The HTTPRoute: one route per rule, in order, attached to web:80.
    let canary = route(&t, "demo/web#0");
    assert_eq!(canary.matches[0].headers[0].name, "x-canary");
    assert_eq!(
        canary.backends[0].service.as_ref().map(|s| s.hostname.as_str()),
        Some("web-canary.demo.svc.cluster.local")
    );
    let rest = route(&t, "demo/web#1");
    assert!(rest.matches.is_empty());
    assert_eq!(rest.origin.as_ref().map(|o| (o.name.as_str(), o.rule)), Some(("demo/web", 1)));
}

#[test]
fn unknown_fields_wrong_types_and_dangling_references_are_refused_with_the_field() {
    let base = r#"
apiVersion: v1
kind: Service
metadata: {name: web, namespace: demo}
spec: {selector: {app: web}, clusterIP: 10.96.0.9, ports: [{name: http, port: 80}]}
"#;
    let cases = [
        (
            "HTTPRoute",
            "typo",
            "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: typo, namespace: demo}\nspec:\n  parentRefs: [{kind: Service, group: \"\", name: web}]\n  rules: [{backendRef: [{name: web, port: 80}]}]",
            "spec.rules[0]",
        ),
        (
            "HTTPRoute",
            "type",
            "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: type, namespace: demo}\nspec:\n  parentRefs: [{kind: Service, group: \"\", name: web}]\n  rules: [{backendRefs: [{name: web, port: eighty}]}]",
            "spec.rules[0].backendRefs[0].port",
        ),
        (
            "HTTPRoute",
            "dangling",
            "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: dangling, namespace: demo}\nspec:\n  parentRefs: [{kind: Service, group: \"\", name: web}]\n  rules: [{backendRefs: [{name: nothing, port: 80}]}]",
            "spec.rules[0].backendRefs[0]",
        ),
        (
            "HTTPRoute",
            "crossns",
            "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: crossns, namespace: demo}\nspec:\n  parentRefs: [{kind: Service, group: \"\", name: web}]\n  rules: [{backendRefs: [{name: web, namespace: other, port: 80}]}]",
            "spec.rules[0].backendRefs[0].namespace",
        ),
        (
            "AuthorizationPolicy",
            "nothing",
            "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: nothing, namespace: demo}\nspec:\n  targetRefs: [{kind: Service, group: \"\", name: missing}]\n  action: DENY\n  rules: [{}]",
            "spec.targetRefs[0]",
        ),
        (
            "DestinationRule",
            "nohost",
            "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: nohost, namespace: demo}\nspec: {host: missing}",
            "spec.host",
        ),
        (
            "Service",
            "badip",
            "apiVersion: v1\nkind: Service\nmetadata: {name: badip, namespace: demo}\nspec: {clusterIP: 10.96.0.300}",
            "spec.clusterIP",
        ),
        (
            "Pod",
            "typo",
            "apiVersion: v1\nkind: Pod\nmetadata: {name: typo, namespace: demo}\nspec: {nodename: a}",
            "spec.nodename",
        ),
    ];
    for (kind, name, doc, field) in cases {
        let t = once(&format!("{base}---\n{doc}"));
        let s = status(&t, kind, name);
        assert!(!s.accepted, "{kind} {name} accepted");
        let fault = s.fault.as_ref().expect("fault");
        assert!(
            fault.field.starts_with(field),
            "{kind} {name}: field {:?}, expected {field:?} ({})",
            fault.field,
            fault.reason
        );
        assert_eq!(s.in_force, InForce::None);
        // The rest applies.
        assert!(status(&t, "Service", "web").accepted);
        assert!(
            addresses(&t).contains_key("demo/web.demo.svc.cluster.local"),
            "{kind} {name}: the service is gone"
        );
    }
}

#[test]
fn a_refused_object_keeps_its_previous_version_in_force() {
    let mut t = Translator::default();
    let good = r#"
apiVersion: v1
kind: Service
metadata: {name: web, namespace: demo}
spec: {clusterIP: 10.96.0.9, ports: [{name: http, port: 80}]}
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: r, namespace: demo}
spec:
  parentRefs: [{group: "", kind: Service, name: web}]
  rules: [{matches: [{path: {type: PathPrefix, value: /v1}}], backendRefs: [{name: web, port: 80}]}]
"#;
    let first = run(&mut t, good);
    assert_all_accepted(&first);
    // The new version has an unknown field; then one with a dangling backend.
    for bad in [
        good.replace("value: /v1}}]", "value: /v2}, extra: 1}]"),
        good.replace("{name: web, port: 80}]}]", "{name: gone, port: 80}]}]"),
    ] {
        let next = run(&mut t, &bad);
        let s = status(&next, "HTTPRoute", "r");
        assert!(!s.accepted);
        assert_eq!(s.in_force, InForce::Previous, "{:?}", s.fault);
        let r = route(&next, "demo/r#0");
        assert_eq!(
            r.matches[0].path.as_ref().and_then(|p| p.kind.clone()),
            Some(wp::path_match::Kind::Prefix("/v1".into()))
        );
    }
    // Fixed: the new version applies; removed: it is gone (and not resurrected later).
    let fixed = run(&mut t, &good.replace("value: /v1", "value: /v3"));
    assert!(status(&fixed, "HTTPRoute", "r").accepted, "{:?}", status(&fixed, "HTTPRoute", "r"));
    assert_eq!(
        route(&fixed, "demo/r#0").matches[0].path.as_ref().and_then(|p| p.kind.clone()),
        Some(wp::path_match::Kind::Prefix("/v3".into()))
    );
    let service_only = good.split("---").next().unwrap_or_default().to_string();
    let gone = run(&mut t, &service_only);
    assert!(!waypoint_resources(&gone).contains_key("demo/r#0"));
    let bad_again = run(&mut t, &good.replace("value: /v1}}]", "value: /v1}, extra: 1}]"));
    assert_eq!(status(&bad_again, "HTTPRoute", "r").in_force, InForce::None);
}

#[test]
fn unreadable_documents_never_count_as_deletions() {
    let mut t = Translator::default();
    let good = "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: deny-all, namespace: demo}\nspec: {action: DENY, rules: [{}]}\n";
    assert_all_accepted(&run(&mut t, good));
    // The same file with the policy's kind mangled: which object this was is unknown.
    let mangled = run(&mut t, &good.replace("kind: AuthorizationPolicy", "kinds: AuthorizationPolicy"));
    assert_eq!(mangled.unreadable.len(), 1);
    assert!(
        authorizations(&mangled).contains_key("demo/deny-all"),
        "a DENY vanished with an unreadable document"
    );
    assert_eq!(status(&mangled, "AuthorizationPolicy", "deny-all").in_force, InForce::Previous);
    // Broken YAML: the same.
    let broken = run(&mut t, "apiVersion: v1\nkind: [unclosed\n");
    assert!(authorizations(&broken).contains_key("demo/deny-all"));
}

#[test]
fn a_policy_never_accepted_is_held_fail_safe() {
    // A DENY with a typo: everything in its scope is denied (it never widens access).
    let t = once(
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: d, namespace: demo}\nspec:\n  action: DENY\n  rules: [{from: [{source: {principal: [x]}}]}]\n",
    );
    let s = status(&t, "AuthorizationPolicy", "d");
    assert!(!s.accepted);
    assert_eq!(s.fault.as_ref().map(|f| f.field.as_str()), Some("spec.rules[0].from[0].source.principal"));
    let p = &authorizations(&t)["demo/d"];
    assert_eq!(p.action, sec::Action::Deny as i32);
    assert_eq!(p.rules, vec![sec::Rule { clauses: vec![] }], "a DENY of everything");
    // An ALLOW with a typo: an ALLOW that matches nothing.
    let t = once(
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: a, namespace: demo}\nspec:\n  selector: {matchLabels: {app: x}}\n  rules: [{to: [{operation: {method: [GET]}}]}]\n",
    );
    let p = &authorizations(&t)["demo/a"];
    assert_eq!(
        (p.action, p.scope, p.rules.len()),
        (sec::Action::Allow as i32, sec::Scope::WorkloadSelector as i32, 0)
    );
}

const WORKLOADS: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: shop, labels: {istio.io/dataplane-mode: ambient}}
---
apiVersion: v1
kind: Pod
metadata: {name: cart, namespace: shop, labels: {app: cart}}
spec: {serviceAccountName: cart, nodeName: n1, containers: [{name: c, ports: [{name: http, containerPort: 9080}]}]}
status: {podIP: 10.1.0.5}
---
apiVersion: v1
kind: Service
metadata: {name: cart, namespace: shop}
spec: {selector: {app: cart}, clusterIP: 10.96.1.5, ports: [{name: http, port: 80, targetPort: http}]}
"#;

#[test]
fn authorization_policies_at_l4_drop_what_ztunnel_cannot_read() {
    let t = once(&format!(
        "{WORKLOADS}---\n{}",
        r#"apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: allow-get, namespace: shop}
spec:
  selector: {matchLabels: {app: cart}}
  action: ALLOW
  rules:
    - from: [{source: {principals: [cluster.local/ns/shop/sa/web]}}]
      to: [{operation: {methods: [GET]}}]
    - from: [{source: {namespaces: ["shop*"], ipBlocks: [10.0.0.0/8]}}]
      to: [{operation: {ports: ["9080"]}}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-admin, namespace: shop}
spec:
  action: DENY
  rules:
    - from: [{source: {notNamespaces: [shop]}}]
      to: [{operation: {paths: ["/admin*"]}}]
      when: [{key: "request.headers[x-debug]", values: ["1"]}, {key: destination.port, values: ["9080"]}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: mesh-audit, namespace: istio-system}
spec: {action: AUDIT, rules: [{}]}
"#
    ));
    assert_all_accepted(&t);
    let ps = authorizations(&t);
    // ALLOW: the rule with a method is dropped (matches nothing), the L4 rule stays.
    let allow = &ps["shop/allow-get"];
    assert_eq!(allow.scope, sec::Scope::WorkloadSelector as i32);
    assert_eq!(allow.rules.len(), 1);
    let m = &allow.rules[0].clauses[0].matches[0];
    assert_eq!(m.namespaces[0].match_type, Some(sec::string_match::MatchType::Prefix("shop".into())));
    assert_eq!(m.source_ips[0].length, 8);
    assert_eq!(allow.rules[0].clauses[1].matches[0].destination_ports, vec![9080]);
    assert!(status(&t, "AuthorizationPolicy", "allow-get").notes.iter().any(|n| n.contains("match nothing")));
    // DENY: the path and the header are taken as matching; the L4 parts stay.
    let deny = &ps["shop/deny-admin"];
    assert_eq!(deny.scope, sec::Scope::Namespace as i32);
    let clauses = &deny.rules[0].clauses;
    assert_eq!(clauses.len(), 3, "from, to (an empty match: any), destination.port: {clauses:?}");
    assert_eq!(clauses[1].matches[0], sec::Match::default());
    assert_eq!(clauses[2].matches[0].destination_ports, vec![9080]);
    // The workload names the selector policy; AUDIT in the root namespace is global and inert.
    assert_eq!(
        workload(&t, "Kubernetes//Pod/shop/cart").authorization_policies,
        vec!["shop/allow-get".to_string()]
    );
    let audit = &ps["istio-system/mesh-audit"];
    assert_eq!(
        (audit.scope, audit.action, audit.rules.len()),
        (sec::Scope::Global as i32, sec::Action::Deny as i32, 0)
    );
}

#[test]
fn targeted_policies_go_to_the_waypoint() {
    let t = once(&format!(
        "{WORKLOADS}---\n{}",
        r#"apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: waypoint, namespace: shop}
spec:
  gatewayClassName: istio-waypoint
  listeners: [{name: mesh, port: 15008, protocol: HBONE}]
status: {addresses: [{type: IPAddress, value: 10.96.1.100}]}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: get-only, namespace: shop, annotations: {istio.io/dry-run: "true"}}
spec:
  targetRefs: [{kind: Gateway, group: gateway.networking.k8s.io, name: waypoint}, {kind: Service, group: "", name: cart}]
  action: ALLOW
  rules:
    - from: [{source: {serviceAccounts: [shop/web], requestPrincipals: ["issuer/*"]}}]
      to: [{operation: {methods: [GET], paths: ["/items*"]}}]
      when: [{key: "request.auth.claims[groups]", values: [buyers]}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: ext, namespace: shop}
spec:
  targetRefs: [{kind: Service, group: "", name: cart}]
  action: CUSTOM
  provider: {name: opa}
  rules: [{to: [{operation: {paths: ["/secret*"]}}]}]
---
apiVersion: security.istio.io/v1
kind: RequestAuthentication
metadata: {name: jwt, namespace: shop}
spec:
  targetRefs: [{kind: Service, group: "", name: cart}]
  jwtRules:
    - issuer: "issuer"
      jwksUri: http://keys.shop/jwks.json
      fromHeaders: [{name: x-token, prefix: "Bearer "}]
      outputClaimToHeaders: [{header: x-sub, claim: sub}]
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: cart, namespace: shop}
spec:
  host: cart
  trafficPolicy:
    connectionPool: {http: {http2MaxRequests: 10, http1MaxPendingRequests: 2}}
    outlierDetection: {consecutive5xxErrors: 3, baseEjectionTime: 30s, maxEjectionPercent: 50}
    portLevelSettings: [{port: {number: 80}, connectionPool: {http: {http2MaxRequests: 5}}}]
---
apiVersion: waypoint.ambient.dev/v1alpha1
kind: WaypointPolicy
metadata: {name: limit, namespace: shop}
spec:
  targetRefs: [{kind: Service, group: "", name: cart}]
  localRateLimit: {maxTokens: 10, tokensPerFill: 5, fillInterval: 1s}
"#
    ));
    assert_all_accepted(&t);
    let on_gateway = policy(&t, "shop/AuthorizationPolicy:get-only");
    assert_eq!(
        on_gateway.target.and_then(|t| t.target),
        Some(wp::parent_ref::Target::Waypoint("shop/waypoint".into()))
    );
    let on_service = policy(&t, "shop/AuthorizationPolicy:get-only@1");
    let authz = on_service.authorization.expect("authorization");
    assert!(authz.dry_run);
    assert_eq!(authz.rules[0].from[0].principals, vec!["*/ns/shop/sa/web".to_string()]);
    assert_eq!(authz.rules[0].to[0].paths, vec!["/items*".to_string()]);
    assert_eq!(authz.rules[0].when[0].key, "request.auth.claims[groups]");
    // Nothing of it reaches ztunnel.
    assert!(authorizations(&t).is_empty());
    let custom = policy(&t, "shop/AuthorizationPolicy:ext").authorization.expect("authorization");
    assert_eq!(custom.action, wp::authorization_policy::Action::Custom as i32);
    assert!(status(&t, "AuthorizationPolicy", "ext").notes.iter().any(|n| n.contains("CUSTOM")));
    let jwt = policy(&t, "shop/RequestAuthentication:jwt").request_authentication.expect("jwt");
    assert_eq!(jwt.rules[0].from_headers[0].prefix, "Bearer ");
    let dr = policy(&t, "shop/DestinationRule:cart").traffic.expect("traffic");
    assert_eq!(dr.connection_pool.map(|c| (c.max_requests, c.max_pending_requests)), Some((10, 2)));
    assert_eq!(dr.outlier_detection.as_ref().and_then(|o| o.base_ejection_time).map(|d| d.seconds), Some(30));
    let per_port = policy(&t, "shop/DestinationRule:cart:80");
    assert!(
        matches!(per_port.target.and_then(|t| t.target), Some(wp::parent_ref::Target::Service(s)) if s.port == 80)
    );
    let pt = per_port.traffic.expect("traffic");
    assert_eq!(pt.connection_pool.map(|c| c.max_requests), Some(5));
    assert!(pt.outlier_detection.is_some(), "the base outlier detection carries over to the port");
    let rl = policy(&t, "shop/WaypointPolicy:limit").rate_limit.expect("rate limit");
    assert_eq!((rl.max_tokens, rl.tokens_per_fill), (10, 5));
}

#[test]
fn peer_authentication_strict_refuses_plaintext_where_it_applies() {
    let t = once(&format!(
        "{WORKLOADS}---\n{}",
        r#"apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: default, namespace: istio-system}
spec: {mtls: {mode: STRICT}}
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: cart, namespace: shop}
spec:
  selector: {matchLabels: {app: cart}}
  mtls: {mode: UNSET}
  portLevelMtls: {9090: {mode: PERMISSIVE}}
"#
    ));
    assert_all_accepted(&t);
    let w = workload(&t, "Kubernetes//Pod/shop/cart");
    assert_eq!(w.authorization_policies, vec!["shop/peer-authentication:pod:cart".to_string()]);
    let p = &authorizations(&t)["shop/peer-authentication:pod:cart"];
    assert_eq!(p.action, sec::Action::Deny as i32);
    let m = &p.rules[0].clauses[0].matches[0];
    assert_eq!(m.not_principals[0].match_type, Some(sec::string_match::MatchType::Presence(())));
    assert_eq!(m.not_destination_ports, vec![9090]);
    // A typo in the mode is refused, not read as PERMISSIVE: never accepted, it is held as
    // STRICT in its scope.
    let t = once(&format!(
        "{WORKLOADS}---\napiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {{name: d, namespace: shop}}\nspec: {{mtls: {{mode: STIRCT}}}}\n"
    ));
    let s = status(&t, "PeerAuthentication", "d");
    assert_eq!(s.fault.as_ref().map(|f| f.field.as_str()), Some("spec.mtls.mode"));
    assert!(s.notes.iter().any(|n| n.contains("fail-safe")), "{s:?}");
    let p = &authorizations(&t)["shop/peer-authentication:pod:cart"];
    let m = &p.rules[0].clauses[0].matches[0];
    assert!(m.not_destination_ports.is_empty() && m.destination_ports.is_empty(), "every port: {m:?}");
}

#[test]
fn routes_follow_gateway_api_semantics() {
    let t = once(&format!(
        "{WORKLOADS}---\n{}",
        r#"apiVersion: v1
kind: Service
metadata: {name: cart-v2, namespace: shop}
spec: {selector: {app: cart, version: v2}, clusterIP: 10.96.1.6, ports: [{name: http, port: 80}]}
---
apiVersion: v1
kind: Service
metadata: {name: legacy, namespace: old}
spec: {clusterIP: 10.96.2.6, ports: [{name: http, port: 8080}]}
---
apiVersion: gateway.networking.k8s.io/v1beta1
kind: ReferenceGrant
metadata: {name: from-shop, namespace: old}
spec:
  from: [{group: gateway.networking.k8s.io, kind: HTTPRoute, namespace: shop}]
  to: [{group: "", kind: Service}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: split, namespace: shop, creationTimestamp: "2026-01-02T00:00:00Z"}
spec:
  parentRefs: [{group: "", kind: Service, name: cart, port: 80}]
  rules:
    - name: redirect-old
      matches: [{path: {type: Exact, value: /old}, method: GET}]
      filters: [{type: RequestRedirect, requestRedirect: {statusCode: 308, path: {type: ReplaceFullPath, replaceFullPath: /new}}}]
    - matches: [{path: {value: /api}, queryParams: [{name: Debug, value: "1"}], headers: [{name: X-Env, type: RegularExpression, value: "stag.*"}]}]
      filters: [{type: URLRewrite, urlRewrite: {path: {type: ReplacePrefixMatch, replacePrefixMatch: /v2}}}, {type: RequestMirror, requestMirror: {backendRef: {name: cart-v2, port: 80}, fraction: {numerator: 1, denominator: 4}}}]
      backendRefs: [{name: cart, port: 80, weight: 90}, {name: cart-v2, port: 80, weight: 10, filters: [{type: RequestHeaderModifier, requestHeaderModifier: {add: [{name: x-v, value: "2"}]}}]}]
      timeouts: {request: 10s, backendRequest: 2s}
      retry: {codes: [503], attempts: 3, backoff: 100ms}
    - backendRefs: [{name: legacy, namespace: old, port: 8080}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: GRPCRoute
metadata: {name: rpc, namespace: shop}
spec:
  parentRefs: [{group: "", kind: Service, name: cart}]
  rules: [{matches: [{method: {service: shop.Cart, method: Add}}], backendRefs: [{name: cart-v2, port: 80}]}]
"#
    ));
    assert_all_accepted(&t);
    let r0 = route(&t, "shop/split#0");
    let origin = r0.origin.clone().expect("origin");
    assert_eq!(
        (origin.created.as_str(), origin.rule_name.as_str()),
        ("2026-01-02T00:00:00Z", "redirect-old")
    );
    assert!(
        matches!(&r0.filters[0].kind, Some(wp::filter::Kind::RequestRedirect(r)) if r.status_code == 308)
    );
    assert_eq!(r0.matches[0].method, "GET");
    let r1 = route(&t, "shop/split#1");
    assert_eq!(r1.matches[0].headers[0].name, "x-env", "header names match without case");
    assert_eq!(r1.matches[0].query_params[0].name, "Debug", "query names keep their case");
    assert_eq!(r1.backends.iter().map(|b| b.weight).collect::<Vec<_>>(), vec![Some(90), Some(10)]);
    assert_eq!(r1.timeouts.and_then(|t| t.backend_request).map(|d| d.seconds), Some(2));
    let retry = policy(&t, "shop/split#1.retry").retry.expect("retry");
    assert_eq!((retry.attempts, retry.retry_on.clone()), (3, vec!["503".to_string()]));
    let mirror = policy(&t, "shop/split#1.mirror0").mirror.expect("mirror");
    assert_eq!(mirror.percentage, 25.0);
    let r2 = route(&t, "shop/split#2");
    assert_eq!(r2.backends[0].service.as_ref().map(|s| s.namespace.as_str()), Some("old"), "granted");
    let g = route(&t, "shop/rpc#0");
    assert_eq!(g.kind, wp::route::Kind::Grpc as i32);
    assert_eq!(g.matches[0].grpc.as_ref().map(|m| m.method.as_str()), Some("Add"));
    assert_eq!(
        g.parent.and_then(|p| p.target),
        Some(wp::parent_ref::Target::Service(wp::ServiceRef {
            namespace: "shop".into(),
            hostname: "cart.shop.svc.cluster.local".into(),
            port: 0
        }))
    );
}

#[test]
fn a_zero_weight_backend_is_left_out_before_it_is_resolved() {
    // Conformance MeshGRPCRouteWeight: a zero-weight backend that does not exist, beside weighted
    // ones, never gets a request and does not refuse the route (Istio leaves it out too).
    let grpc_route = |refs: &str| {
        format!(
            "{WORKLOADS}---\napiVersion: gateway.networking.k8s.io/v1\nkind: GRPCRoute\nmetadata: {{name: w, namespace: shop}}\nspec:\n  parentRefs: [{{group: \"\", kind: Service, name: cart}}]\n  rules: [{{backendRefs: {refs}}}]\n"
        )
    };
    let t = once(&grpc_route("[{name: cart, port: 80, weight: 70}, {name: ghost, port: 80, weight: 0}]"));
    assert_all_accepted(&t);
    let r = route(&t, "shop/w#0");
    let hosts: Vec<&str> =
        r.backends.iter().filter_map(|b| b.service.as_ref()).map(|s| s.hostname.as_str()).collect();
    assert_eq!(hosts, ["cart.shop.svc.cluster.local"]);
    // Only zero weights: every backend stays (the waypoint answers 500), so a dangling one still
    // refuses the route.
    let t = once(&grpc_route("[{name: ghost, port: 80, weight: 0}]"));
    let fault = status(&t, "GRPCRoute", "w").fault.clone().expect("refused");
    assert!(fault.field.starts_with("spec.rules[0].backendRefs[0]"), "{fault:?}");
}

#[test]
fn service_entries_and_workload_entries_become_services_and_workloads() {
    let t = once(
        r#"apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: db, namespace: shop, labels: {istio.io/use-waypoint: none}}
spec:
  hosts: [db.internal]
  addresses: [240.0.0.10]
  ports: [{number: 5432, name: tcp-pg, protocol: TCP, targetPort: 15432}]
  location: MESH_INTERNAL
  resolution: STATIC
  workloadSelector: {labels: {app: db}}
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {name: db-vm, namespace: shop}
spec: {address: 192.168.10.4, labels: {app: db, istio.io/dataplane-mode: ambient}, serviceAccount: db, locality: eu/west/a}
"#,
    );
    assert_all_accepted(&t);
    let s = service(&t, "shop/db.internal");
    assert_eq!((s.ports[0].service_port, s.ports[0].target_port), (5432, 15432));
    let w = workload(&t, "Kubernetes/networking.istio.io/WorkloadEntry/shop/db-vm");
    assert_eq!(w.tunnel_protocol, wl::TunnelProtocol::Hbone as i32);
    assert_eq!(w.services["shop/db.internal"].ports[0].target_port, 15432);
    assert_eq!(w.locality.map(|l| l.zone), Some("west".into()));
    let dns = once(
        "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {name: x, namespace: shop}\nspec: {hosts: [x.com], resolution: DNS}\n",
    );
    assert_eq!(
        status(&dns, "ServiceEntry", "x").fault.as_ref().map(|f| f.field.as_str()),
        Some("spec.resolution")
    );
}

#[test]
fn waypoint_references_fail_closed_and_routes_respect_allowed_routes() {
    // A service naming a waypoint that does not exist still names it (refused, not bypassed).
    let t = once(
        "apiVersion: v1\nkind: Service\nmetadata: {name: s, namespace: a, labels: {istio.io/use-waypoint: ghost}}\nspec: {clusterIP: 10.96.3.1, ports: [{port: 80}]}\n",
    );
    let s = service(&t, "a/s.a.svc.cluster.local");
    assert!(s.waypoint.is_some());
    assert!(status(&t, "Service", "s").notes.iter().any(|n| n.contains("does not exist")));
    // A route attached to a Gateway in another namespace that only allows its own.
    let gw = "apiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\nmetadata: {name: wp, namespace: a}\nspec: {gatewayClassName: ambient-waypoint, listeners: [{name: mesh, port: 15008, protocol: HBONE}]}\n";
    let route = "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: r, namespace: b}\nspec: {parentRefs: [{name: wp, namespace: a}]}\n";
    let t = once(&format!("{gw}---\n{route}"));
    assert!(!status(&t, "HTTPRoute", "r").accepted);
    let all = gw.replace("protocol: HBONE}", "protocol: HBONE, allowedRoutes: {namespaces: {from: All}}}");
    let t = once(&format!("{all}---\n{route}"));
    assert!(status(&t, "HTTPRoute", "r").accepted, "{:?}", status(&t, "HTTPRoute", "r"));
}

/// Our CRD's published schema and the translator read the same fields.
#[test]
fn the_waypoint_policy_crd_schema_matches_what_the_translator_reads() {
    let crd: serde_json::Value =
        serde_yaml_ng::from_str(include_str!("../../../deploy/crds/waypointpolicy.yaml")).expect("crd yaml");
    let schema = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"];
    let keys = |v: &serde_json::Value| -> Vec<String> {
        v["properties"].as_object().map(|m| m.keys().cloned().collect()).unwrap_or_default()
    };
    assert_eq!(keys(schema), vec!["localRateLimit".to_string(), "targetRefs".to_string()]);
    assert_eq!(
        keys(&schema["properties"]["localRateLimit"]),
        vec!["fillInterval", "maxTokens", "tokensPerFill"]
    );
    assert_eq!(
        keys(&schema["properties"]["targetRefs"]["items"]),
        vec!["group", "kind", "name", "namespace"]
    );
    // A policy using every field of the schema is accepted; one more field is refused.
    let doc = r#"apiVersion: v1
kind: Service
metadata: {name: s, namespace: n}
spec: {clusterIP: 10.96.0.1, ports: [{port: 80}]}
---
apiVersion: waypoint.ambient.dev/v1alpha1
kind: WaypointPolicy
metadata: {name: p, namespace: n}
spec:
  targetRefs: [{group: "", kind: Service, name: s, namespace: n}]
  localRateLimit: {maxTokens: 5, tokensPerFill: 1, fillInterval: 250ms}
"#;
    assert_all_accepted(&once(doc));
    let extra = once(&doc.replace("fillInterval: 250ms}", "fillInterval: 250ms, burst: 3}"));
    assert_eq!(
        status(&extra, "WaypointPolicy", "p").fault.as_ref().map(|f| f.field.as_str()),
        Some("spec.localRateLimit.burst")
    );
}

const AP: &str = "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\n";

/// A policy refused for what it holds (not only for its shape), never accepted before, is held
/// fail-safe too: a namespace DENY with a port name denies the namespace, an ALLOW matches
/// nothing; so is one whose metadata has a typo or whose apiVersion lacks its version.
#[test]
fn every_refused_policy_is_held_fail_safe() {
    let deny_all = |t: &Translation, name: &str| {
        let p = authorizations(t).remove(name).unwrap_or_else(|| panic!("{name} missing: {:?}", t.statuses));
        assert_eq!(
            (p.action, p.rules.clone()),
            (sec::Action::Deny as i32, vec![sec::Rule { clauses: vec![] }]),
            "{name}"
        );
    };
    let t = once(&format!(
        "{AP}metadata: {{name: d, namespace: shop}}\nspec: {{action: DENY, rules: [{{to: [{{operation: {{ports: [http]}}}}]}}]}}\n"
    ));
    assert_eq!(
        status(&t, "AuthorizationPolicy", "d").fault.as_ref().map(|f| f.field.as_str()),
        Some("spec.rules[0].to[0].operation.ports[0]")
    );
    deny_all(&t, "shop/d");
    let t = once(&format!(
        "{AP}metadata: {{name: a, namespace: shop}}\nspec: {{rules: [{{to: [{{operation: {{ports: [http]}}}}]}}]}}\n"
    ));
    let a = &authorizations(&t)["shop/a"];
    assert_eq!(
        (a.action, a.rules.len(), a.scope),
        (sec::Action::Allow as i32, 0, sec::Scope::Namespace as i32)
    );
    let t = once(&format!(
        "{AP}metadata: {{name: m, namespace: shop, annotation: {{x: y}}}}\nspec: {{action: DENY, rules: [{{}}]}}\n"
    ));
    assert_eq!(
        status(&t, "AuthorizationPolicy", "m").fault.as_ref().map(|f| f.field.as_str()),
        Some("metadata.annotation")
    );
    deny_all(&t, "shop/m");
    let t = once(
        "apiVersion: security.istio.io\nkind: AuthorizationPolicy\nmetadata: {name: v, namespace: shop}\nspec: {action: DENY, rules: [{}]}\n",
    );
    deny_all(&t, "shop/v");
    // Path templates and empty matchers are refused (and so held fail-safe).
    for (name, rules) in [
        ("tpl", "[{to: [{operation: {paths: [\"/admin/{**}\"]}}]}]"),
        ("empty", "[{from: [{source: {principals: []}}]}]"),
        ("novalues", "[{when: [{key: source.namespace}]}]"),
    ] {
        let t = once(&format!(
            "{AP}metadata: {{name: {name}, namespace: shop}}\nspec: {{action: DENY, rules: {rules}}}\n"
        ));
        assert!(!status(&t, "AuthorizationPolicy", name).accepted, "{name}");
        deny_all(&t, &format!("shop/{name}"));
    }
}

#[test]
fn workloads_stay_in_the_mesh_and_derived_names_cannot_collide() {
    let t = once(&format!(
        "{WORKLOADS}---\n{}",
        r#"apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: waypoint, namespace: shop}
spec: {gatewayClassName: istio-waypoint, listeners: [{name: mesh, port: 15008, protocol: HBONE}]}
---
apiVersion: v1
kind: Pod
metadata: {name: worker, namespace: shop, labels: {app: worker, istio.io/use-waypoint: waypoint}}
spec: {nodeName: n1}
status: {podIP: 10.1.0.9}
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: default, namespace: shop}
spec: {mtls: {mode: STRICT}}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: peer-authentication.cart, namespace: shop}
spec: {action: DENY, rules: [{from: [{source: {namespaces: [evil]}}]}]}
"#
    ));
    assert_all_accepted(&t);
    // The waypoint takes service traffic only: the pod stays, without a waypoint.
    assert!(workload(&t, "Kubernetes//Pod/shop/worker").waypoint.is_none());
    assert!(status(&t, "Pod", "worker").notes.iter().any(|n| n.contains("not used")));
    let ps = authorizations(&t);
    assert!(
        ps.contains_key("shop/peer-authentication.cart")
            && ps.contains_key("shop/peer-authentication:pod:cart")
    );
    // Names outside Kubernetes' syntax are refused.
    let t = once("apiVersion: v1\nkind: Service\nmetadata: {name: \"web#0\", namespace: shop}\nspec: {}\n");
    assert_eq!(t.unreadable.len(), 1, "{:?}", t.unreadable);
}

#[test]
fn service_entries_get_their_policies_and_every_host_is_a_target() {
    let t = once(
        r#"apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: default, namespace: ext}
spec: {mtls: {mode: STRICT}}
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: vms, namespace: ext, labels: {app: vm}}
spec:
  hosts: [a.ext, b.ext]
  ports: [{number: 80, name: http}]
  resolution: STATIC
  endpoints: [{address: 10.9.0.1, labels: {istio.io/dataplane-mode: ambient}}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-vm, namespace: ext}
spec: {selector: {matchLabels: {app: vm}}, action: DENY, rules: [{from: [{source: {namespaces: [evil]}}]}]}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: l7, namespace: ext}
spec:
  targetRefs: [{group: networking.istio.io, kind: ServiceEntry, name: vms}]
  action: DENY
  rules: [{to: [{operation: {paths: ["/admin*"]}}]}]
"#,
    );
    assert_all_accepted(&t);
    let w = workload(&t, "Kubernetes/networking.istio.io/ServiceEntry/ext/vms/10.9.0.1");
    assert_eq!(
        w.authorization_policies,
        vec!["ext/deny-vm".to_string(), "ext/peer-authentication:serviceentry:vms:10.9.0.1".to_string()]
    );
    let targets: Vec<_> = waypoint_resources(&t)
        .into_values()
        .filter_map(|k| match k {
            wp::resource::Kind::Policy(p) => p.target.and_then(|t| t.target),
            _ => None,
        })
        .collect();
    assert_eq!(targets.len(), 2, "one per host: {targets:?}");
}

#[test]
fn remote_addresses_are_l7_and_peer_authentications_go_by_age() {
    let t = once(&format!(
        "{WORKLOADS}---\n{}",
        r#"apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: remote, namespace: shop}
spec: {selector: {matchLabels: {app: cart}}, rules: [{from: [{source: {remoteIpBlocks: [10.0.0.0/8]}}]}]}
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: zz-strict, namespace: shop, creationTimestamp: "2020-01-01T00:00:00Z"}
spec: {mtls: {mode: STRICT}}
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: aa-permissive, namespace: shop, creationTimestamp: "2024-01-01T00:00:00Z"}
spec: {mtls: {mode: PERMISSIVE}}
"#
    ));
    assert_all_accepted(&t);
    // ztunnel cannot know the address behind a proxy: the ALLOW rule matches nothing.
    assert!(authorizations(&t)["shop/remote"].rules.is_empty());
    // The older namespace policy (STRICT) wins over the younger, whatever the names.
    assert!(authorizations(&t).contains_key("shop/peer-authentication:pod:cart"));
}

#[test]
fn yaml_aliases_are_bounded() {
    let mut text = String::from(
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: bomb, namespace: a}\ndata:\n  base: &x [1, 2, 3]\n",
    );
    for i in 0..100 {
        text.push_str(&format!("  k{i}: *x\n"));
    }
    let t = once(&text);
    assert!(t.unreadable.iter().any(|u| u.fault.reason.contains("aliases")), "{:?}", t.unreadable);
    // At the limit it reads; quoted `*` values and patterns are not aliases.
    let mut within = String::from(
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: ok, namespace: a}\ndata:\n  base: &x [1, 2, 3]\n",
    );
    for i in 0..64 {
        within.push_str(&format!("  k{i}: *x\n  q{i}: \"*x\"\n  p{i}: '*/ns/a/sa/b'\n"));
    }
    assert!(once(&within).unreadable.is_empty(), "{:?}", once(&within).unreadable);
}

#[test]
fn destination_rules_take_istios_defaults() {
    let t = once(&format!(
        "{WORKLOADS}---\n{}",
        "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: cart, namespace: shop}\nspec: {host: cart, trafficPolicy: {connectionPool: {http: {http2MaxRequests: 100}}, outlierDetection: {baseEjectionTime: 30s}}}\n"
    ));
    let tp = policy(&t, "shop/DestinationRule:cart").traffic.expect("traffic");
    assert_eq!(tp.connection_pool.map(|c| c.max_pending_requests), Some(u32::MAX));
    assert_eq!(tp.outlier_detection.map(|o| o.consecutive_5xx_errors), Some(5));
}

#[test]
fn a_key_given_twice_is_refused_not_taken_last() {
    // `action: DENY` then `action: ALLOW`: never a silent ALLOW.
    let t = once(&format!(
        "{AP}metadata: {{name: d, namespace: shop}}\nspec:\n  action: DENY\n  action: ALLOW\n  rules: [{{}}]\n"
    ));
    assert!(t.unreadable.iter().any(|u| u.fault.reason.contains("duplicate")), "{:?}", t.unreadable);
    assert!(!authorizations(&t).values().any(|p| p.action == sec::Action::Allow as i32));
}

#[test]
fn destination_rule_load_balancers_per_service_and_port() {
    let t = once(&format!(
        "{WORKLOADS}---\n{}",
        "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: cart, namespace: shop}\nspec:\n  host: cart\n  trafficPolicy:\n    loadBalancer: {simple: ROUND_ROBIN}\n    portLevelSettings: [{port: {number: 80}, loadBalancer: {simple: RANDOM}}]\n"
    ));
    assert_all_accepted(&t);
    use wp::traffic_policy::LoadBalancer;
    let base = policy(&t, "shop/DestinationRule:cart").traffic.expect("traffic");
    assert_eq!(base.load_balancer, LoadBalancer::RoundRobin as i32);
    let port = policy(&t, "shop/DestinationRule:cart:80").traffic.expect("traffic");
    assert_eq!(port.load_balancer, LoadBalancer::Random as i32);
    let bad = once(&format!(
        "{WORKLOADS}---\n{}",
        "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: cart, namespace: shop}\nspec: {host: cart, trafficPolicy: {loadBalancer: {simple: PASSTHROUGH}}}\n"
    ));
    assert_eq!(
        status(&bad, "DestinationRule", "cart").fault.as_ref().map(|f| f.field.as_str()),
        Some("spec.trafficPolicy.loadBalancer.simple")
    );
}

#[test]
fn port_zero_is_refused_where_it_would_reach_a_resource() {
    for (kind, doc, field) in [
        (
            "Service",
            "apiVersion: v1\nkind: Service\nmetadata: {name: s, namespace: a}\nspec: {ports: [{port: 0}]}\n",
            "spec.ports[0].port",
        ),
        (
            "ServiceEntry",
            "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {name: e, namespace: a}\nspec: {hosts: [x.y], ports: [{number: 0, name: p}]}\n",
            "spec.ports[0].number",
        ),
        (
            "PeerAuthentication",
            "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: p, namespace: a}\nspec: {selector: {matchLabels: {a: b}}, portLevelMtls: {0: {mode: STRICT}}}\n",
            "spec.portLevelMtls",
        ),
    ] {
        let t = once(doc);
        assert_eq!(
            status(
                &t,
                kind,
                doc.split("name: ").nth(1).and_then(|n| n.split(',').next()).unwrap_or_default()
            )
            .fault
            .as_ref()
            .map(|f| f.field.as_str()),
            Some(field),
            "{kind}"
        );
    }
}

#[test]
fn routes_keep_gateway_api_list_bounds() {
    let rules: String = (0..17).map(|_| "{backendRefs: [{name: cart, port: 80}]}, ").collect();
    let t = once(&format!(
        "{WORKLOADS}---\napiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {{name: big, namespace: shop}}\nspec:\n  parentRefs: [{{group: \"\", kind: Service, name: cart}}]\n  rules: [{rules}]\n"
    ));
    assert_eq!(status(&t, "HTTPRoute", "big").fault.as_ref().map(|f| f.field.as_str()), Some("spec.rules"));
    assert!(!waypoint_resources(&t).keys().any(|k| k.starts_with("shop/big")));
}
