//! Gateway API matching and precedence.

use super::*;
use common::xds::LocalConfig;

fn table(yaml: &str) -> RouteTable {
    let config = LocalConfig::from_yaml(yaml).expect("yaml");
    let routes = config.routes.iter().map(|r| {
        let Some(wp::resource::Kind::Route(route)) = r.to_proto().expect("proto").kind else {
            panic!("route")
        };
        Route::from_proto(&route).expect("compiles")
    });
    RouteTable::build(routes.collect::<Vec<_>>())
}

const ROUTES: &str = r#"
routes:
  - name: a-prefix
    namespace: demo
    parent: {service: {namespace: demo, hostname: echo, port: 80}}
    matches: [{path: {prefix: /api}}]
    backends: [{service: {namespace: demo, hostname: prefix}}]
  - name: b-longer
    namespace: demo
    parent: {service: {namespace: demo, hostname: echo}}
    matches: [{path: {prefix: /api/v2}}]
    backends: [{service: {namespace: demo, hostname: longer}}]
  - name: c-exact
    namespace: demo
    parent: {service: {namespace: demo, hostname: echo}}
    matches: [{path: {exact: /api}}]
    backends: [{service: {namespace: demo, hostname: exact}}]
  - name: d-header
    namespace: demo
    parent: {service: {namespace: demo, hostname: echo}}
    matches: [{path: {prefix: /api}, headers: [{name: X-Canary, exact: "yes"}], queryParams: [{name: v, regex: "[0-9]+"}]}]
    backends: [{service: {namespace: demo, hostname: header}}]
  - name: e-method
    namespace: demo
    parent: {service: {namespace: demo, hostname: echo}}
    matches: [{path: {prefix: /api}, method: POST}]
    backends: [{service: {namespace: demo, hostname: method}}]
  - name: wp-all
    namespace: demo
    parent: {waypoint: demo/waypoint}
    backends: [{service: {namespace: demo, hostname: everything}}]
"#;

fn pick(t: &RouteTable, service: &str, method: &str, uri: &str, headers: &[(&str, &str)]) -> String {
    let uri: http::Uri = uri.parse().expect("uri");
    let method: Method = method.parse().expect("method");
    let mut h = HeaderMap::new();
    for (k, v) in headers {
        h.insert(http::HeaderName::from_bytes(k.as_bytes()).expect("name"), v.parse().expect("value"));
    }
    let req = RequestView { method: &method, path: uri.path(), query: uri.query(), headers: &h };
    match t.select(service, 80, "demo/waypoint", &req) {
        Lookup::Route(s) => s.route.backends[0].service.hostname.clone(),
        Lookup::NoMatch => "404".into(),
        Lookup::Default => "default".into(),
    }
}

#[test]
fn the_most_specific_match_wins() {
    let t = table(ROUTES);
    assert_eq!(pick(&t, "demo/echo", "GET", "/api", &[]), "exact");
    assert_eq!(pick(&t, "demo/echo", "GET", "/api/", &[]), "prefix");
    assert_eq!(pick(&t, "demo/echo", "GET", "/api/v2/x", &[]), "longer");
    assert_eq!(pick(&t, "demo/echo", "POST", "/api/x", &[]), "method");
    assert_eq!(pick(&t, "demo/echo", "GET", "/api/x?v=12", &[("x-canary", "yes")]), "header");
    assert_eq!(
        pick(&t, "demo/echo", "GET", "/api/x?v=abc", &[("x-canary", "yes")]),
        "prefix",
        "regex is anchored"
    );
    // Prefixes match whole path segments.
    assert_eq!(pick(&t, "demo/echo", "GET", "/apix", &[]), "404");
}

#[test]
fn a_match_without_a_path_is_a_prefix_match_on_the_root() {
    // Gateway API defaults a match's path to PathPrefix /: a header match without a path is more
    // specific than PathPrefix / alone (conformance MeshHTTPRouteMatching).
    let t = table(
        r#"
routes:
  - name: a-root
    namespace: demo
    parent: {service: {namespace: demo, hostname: echo}}
    matches: [{path: {prefix: /}}, {headers: [{name: version, exact: one}]}]
    backends: [{service: {namespace: demo, hostname: one}}]
  - name: b-header
    namespace: demo
    parent: {service: {namespace: demo, hostname: echo}}
    matches: [{path: {prefix: /v2}}, {headers: [{name: version, exact: two}]}]
    backends: [{service: {namespace: demo, hostname: two}}]
"#,
    );
    assert_eq!(pick(&t, "demo/echo", "GET", "/", &[("version", "two")]), "two");
    assert_eq!(pick(&t, "demo/echo", "GET", "/", &[]), "one");
    assert_eq!(pick(&t, "demo/echo", "GET", "/v2example", &[]), "one");
    assert_eq!(pick(&t, "demo/echo", "GET", "/v2/x", &[("version", "one")]), "two", "a longer prefix wins");
}

#[test]
fn service_routes_win_then_waypoint_routes_then_the_service_itself() {
    let t = table(ROUTES);
    assert_eq!(pick(&t, "demo/echo", "GET", "/other", &[]), "404", "service routes exist, none match");
    assert_eq!(pick(&t, "demo/other", "GET", "/x", &[]), "everything", "waypoint-attached route");
    let no_waypoint_routes = ROUTES.split("  - name: wp-all").next().expect("split");
    assert_eq!(pick(&table(no_waypoint_routes), "demo/other", "GET", "/x", &[]), "default");
}

#[test]
fn bad_routes_are_rejected_with_a_reason() {
    let bad = |yaml: &str| {
        let config = LocalConfig::from_yaml(yaml).expect("yaml");
        let Some(wp::resource::Kind::Route(route)) = config.routes[0].to_proto().expect("proto").kind else {
            panic!("route")
        };
        Route::from_proto(&route).expect_err("must be rejected")
    };
    let base = "routes: [{name: r, namespace: demo, parent: {service: {namespace: demo, hostname: echo}}, ";
    assert!(bad(&format!("{base}matches: [{{path: {{regex: \"(\"}}}}], backends: [{{service: {{namespace: d, hostname: h}}}}]}}]"))
        .contains("regex"));
    assert!(bad(&format!("{base}backends: []}}]")).contains("neither"));
    assert!(bad(&format!("{base}matches: [{{path: {{prefix: relative}}}}], backends: [{{service: {{namespace: d, hostname: h}}}}]}}]"))
        .contains("absolute"));
}

#[test]
fn out_of_range_route_timeouts_are_rejected_not_panicking() {
    let config = LocalConfig::from_yaml(
        "routes: [{name: r, namespace: demo, parent: {service: {namespace: demo, hostname: echo}}, backends: [{service: {namespace: d, hostname: h}}]}]",
    )
    .expect("yaml");
    let Some(wp::resource::Kind::Route(mut route)) = config.routes[0].to_proto().expect("proto").kind else {
        panic!("route")
    };
    for (seconds, nanos) in [(i64::MIN, 0), (-1, 0), (0, -1), (i64::MAX, 0)] {
        route.timeouts = Some(wp::Timeouts {
            request: Some(prost_types::Duration { seconds, nanos }),
            ..Default::default()
        });
        let e = Route::from_proto(&route).expect_err("must be rejected");
        assert!(e.contains("timeouts.request"), "{seconds}s {nanos}ns: {e}");
    }
}

/// Routes translated from standard objects: `translate` output straight into the table.
fn translated(yaml: &str) -> RouteTable {
    let t = common::translate::Translator::default().translate_yaml([("t.yaml", yaml)]);
    let refused: Vec<String> = t.refusals().collect();
    assert!(refused.is_empty(), "{refused:?}");
    let routes = t.resources.iter().filter_map(|r| {
        match prost::Message::decode(r.body.value.as_slice()).map(|res: wp::Resource| res.kind) {
            Ok(Some(wp::resource::Kind::Route(route))) => Some(Route::from_proto(&route).expect("compiles")),
            _ => None,
        }
    });
    RouteTable::build(routes.collect::<Vec<_>>())
}

const SERVICES: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: echo, namespace: demo}
spec: {clusterIP: 10.96.0.1, ports: [{name: http, port: 80}]}
---
apiVersion: v1
kind: Service
metadata: {name: a, namespace: demo}
spec: {clusterIP: 10.96.0.2, ports: [{name: http, port: 80}]}
---
apiVersion: v1
kind: Service
metadata: {name: b, namespace: demo}
spec: {clusterIP: 10.96.0.3, ports: [{name: http, port: 80}]}
"#;

#[test]
fn virtual_service_routes_keep_istio_first_match_order_and_string_prefixes() {
    let t = translated(&format!(
        "{SERVICES}---\n{}",
        r#"apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: vs, namespace: demo}
spec:
  hosts: [echo]
  http:
    - match: [{uri: {prefix: /api}}]
      route: [{destination: {host: a}}]
    - match: [{uri: {exact: /api/v1}}]
      route: [{destination: {host: b}}]
"#
    ));
    // Gateway API precedence would pick the exact match; Istio takes the first route.
    assert_eq!(
        pick(&t, "demo/echo.demo.svc.cluster.local", "GET", "/api/v1", &[]),
        "a.demo.svc.cluster.local"
    );
    // Istio's prefix is a string prefix.
    assert_eq!(pick(&t, "demo/echo.demo.svc.cluster.local", "GET", "/apix", &[]), "a.demo.svc.cluster.local");
    assert_eq!(pick(&t, "demo/echo.demo.svc.cluster.local", "GET", "/other", &[]), "404");
}

#[test]
fn http_routes_from_standard_objects_keep_gateway_api_precedence_and_rule_order() {
    let t = translated(&format!(
        "{SERVICES}---\n{}",
        r#"apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: r, namespace: demo}
spec:
  parentRefs: [{group: "", kind: Service, name: echo}]
  rules:
    - matches: [{path: {type: PathPrefix, value: /api}}]
      backendRefs: [{name: a, port: 80}]
    - matches: [{path: {type: Exact, value: /api/v1}}]
      backendRefs: [{name: b, port: 80}]
    - matches: [{path: {type: PathPrefix, value: /api}}]
      backendRefs: [{name: b, port: 80}]
"#
    ));
    assert_eq!(
        pick(&t, "demo/echo.demo.svc.cluster.local", "GET", "/api/v1", &[]),
        "b.demo.svc.cluster.local"
    );
    // Equal matches: the earlier rule wins.
    assert_eq!(
        pick(&t, "demo/echo.demo.svc.cluster.local", "GET", "/api/x", &[]),
        "a.demo.svc.cluster.local"
    );
}

#[test]
fn destination_rule_settings_apply_per_port_then_per_service() {
    let t = common::translate::Translator::default().translate_yaml([(
        "t.yaml",
        format!(
            "{SERVICES}---\n{}",
            "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: echo, namespace: demo}\nspec:\n  host: echo\n  trafficPolicy:\n    loadBalancer: {simple: ROUND_ROBIN}\n    portLevelSettings: [{port: {number: 80}, loadBalancer: {simple: RANDOM}}]\n"
        )
        .as_str(),
    )]);
    let compiled: Vec<CompiledPolicy> = t
        .resources
        .iter()
        .filter_map(|r| {
            match prost::Message::decode(r.body.value.as_slice()).map(|res: wp::Resource| res.kind) {
                Ok(Some(wp::resource::Kind::Policy(p))) => {
                    Some(CompiledPolicy::compile(p, None, &Default::default()).expect("compiles"))
                }
                _ => None,
            }
        })
        .collect();
    assert_eq!(compiled.len(), 2);
    let index = PolicyIndex::build(&compiled);
    let balance = |port| index.traffic_for("demo/echo.demo.svc.cluster.local", port).and_then(|t| t.balance);
    use crate::upstream::Balance;
    assert_eq!(balance(80), Some(Balance::Random), "the port's own");
    assert_eq!(balance(81), Some(Balance::RoundRobin), "the service's");
}
