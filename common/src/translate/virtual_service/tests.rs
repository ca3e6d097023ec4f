use std::collections::BTreeMap;

use prost::Message;
use proto::waypoint as wp;

use crate::translate::{Translation, Translator};

const SERVICES: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: reviews, namespace: bookinfo}
spec: {clusterIP: 10.96.5.1, ports: [{name: http, port: 9080}]}
---
apiVersion: v1
kind: Service
metadata: {name: reviews-v2, namespace: bookinfo}
spec: {clusterIP: 10.96.5.2, ports: [{name: http, port: 9080}]}
---
apiVersion: v1
kind: Service
metadata: {name: ratings, namespace: bookinfo}
spec: {clusterIP: 10.96.5.3, ports: [{name: http, port: 9080}, {name: grpc, port: 9090}]}
"#;

fn translate(vs: &str) -> Translation {
    Translator::default().translate_yaml([("t.yaml", format!("{SERVICES}---\n{vs}").as_str())])
}

fn resources(t: &Translation) -> BTreeMap<String, wp::resource::Kind> {
    t.resources
        .iter()
        .filter(|r| r.type_url == proto::WAYPOINT_RESOURCE_TYPE_URL)
        .map(|r| {
            (
                r.name.clone(),
                wp::Resource::decode(r.body.value.as_slice()).expect("decodes").kind.expect("kind"),
            )
        })
        .collect()
}

fn fault_of(t: &Translation) -> Option<crate::translate::Fault> {
    t.statuses.iter().find(|s| s.object.kind == "VirtualService").and_then(|s| s.fault.clone())
}

/// Istio's documented fault-injection and retry examples, as one VirtualService.
#[test]
fn faults_retries_timeouts_and_mirrors_of_istio_examples() {
    let t = translate(
        r#"apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: reviews, namespace: bookinfo}
spec:
  hosts: [reviews]
  http:
    - match: [{headers: {end-user: {exact: jason}}}]
      fault:
        delay: {percentage: {value: 100.0}, fixedDelay: 7s}
      route: [{destination: {host: reviews-v2}}]
    - route:
        - {destination: {host: reviews, port: {number: 9080}}, weight: 75}
        - {destination: {host: reviews-v2}, weight: 25}
      timeout: 10s
      retries: {attempts: 3, perTryTimeout: 2s, retryOn: "gateway-error,connect-failure,refused-stream,unavailable"}
      fault:
        abort: {percentage: {value: 0.1}, httpStatus: 400}
      mirror: {host: ratings, port: {number: 9080}}
      mirrorPercentage: {value: 50}
      headers: {request: {set: {X-Trace: "1"}}, response: {remove: [x-internal]}}
"#,
    );
    assert_eq!(fault_of(&t), None);
    let rs = resources(&t);
    let Some(wp::resource::Kind::Route(r0)) = rs.get("bookinfo/reviews#0") else { panic!("{:?}", rs.keys()) };
    assert_eq!(r0.matches[0].headers[0].name, "end-user");
    assert_eq!(r0.origin.as_ref().map(|o| o.kind.as_str()), Some("VirtualService"));
    let Some(wp::resource::Kind::Policy(delay)) = rs.get("bookinfo/reviews#0.fault") else { panic!("delay") };
    let d = delay.fault.and_then(|f| f.delay).expect("delay");
    assert_eq!((d.fixed_delay.map(|x| x.seconds), d.percentage), (Some(7), 100.0));
    let Some(wp::resource::Kind::Route(r1)) = rs.get("bookinfo/reviews#1") else { panic!("route 1") };
    assert_eq!(r1.backends.iter().map(|b| b.weight).collect::<Vec<_>>(), vec![Some(75), Some(25)]);
    assert_eq!(r1.timeouts.and_then(|t| t.request).map(|d| d.seconds), Some(10));
    assert_eq!(r1.filters.len(), 2);
    let Some(wp::resource::Kind::Policy(retry)) = rs.get("bookinfo/reviews#1.retry") else { panic!("retry") };
    let retry = retry.retry.clone().expect("retry");
    assert_eq!(retry.retry_on, vec!["gateway-error", "connect-failure", "refused-stream"]);
    assert_eq!(retry.per_try_timeout.map(|d| d.seconds), Some(2));
    let Some(wp::resource::Kind::Policy(mirror)) = rs.get("bookinfo/reviews#1.mirror0") else {
        panic!("mirror")
    };
    assert_eq!(mirror.mirror.as_ref().map(|m| m.percentage), Some(50.0));
    let Some(wp::resource::Kind::Policy(abort)) = rs.get("bookinfo/reviews#1.fault") else { panic!("abort") };
    assert_eq!(abort.fault.and_then(|f| f.abort).map(|a| a.http_status), Some(400));
}

#[test]
fn a_service_with_http_routes_ignores_virtual_services() {
    let t = translate(
        r#"apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: r, namespace: bookinfo}
spec:
  parentRefs: [{group: "", kind: Service, name: reviews}]
  rules: [{backendRefs: [{name: reviews, port: 9080}]}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: vs, namespace: bookinfo}
spec:
  hosts: [reviews, reviews-v2.bookinfo.svc.cluster.local]
  http: [{route: [{destination: {host: reviews-v2}}]}]
"#,
    );
    let rs = resources(&t);
    assert!(rs.contains_key("bookinfo/r#0"));
    assert!(!rs.contains_key("bookinfo/vs#0"), "reviews has an HTTPRoute");
    assert!(rs.contains_key("bookinfo/vs#0@1"), "reviews-v2 has none");
    let s = t.statuses.iter().find(|s| s.object.name == "vs").expect("status");
    assert!(s.accepted && s.notes.iter().any(|n| n.contains("does not mix")), "{s:?}");
}

#[test]
fn what_waypoints_cannot_do_is_refused_with_the_field() {
    let cases = [
        (
            "http: [{route: [{destination: {host: reviews, subset: v2}}]}]",
            "spec.http[0].route[0].destination.subset",
        ),
        ("http: [{route: [{destination: {host: ratings}}]}]", "spec.http[0].route[0].destination.port"),
        ("http: [{route: [{destination: {host: nowhere}}]}]", "spec.http[0].route[0].destination.host"),
        (
            "http: [{match: [{sourceLabels: {app: x}}], route: [{destination: {host: reviews}}]}]",
            "spec.http[0].match[0].sourceLabels",
        ),
        (
            "http: [{route: [{destination: {host: reviews}}], retries: {attempts: 2, retryOn: sometimes}}]",
            "spec.http[0].retries.retryOn",
        ),
        (
            "http: [{route: [{destination: {host: reviews}}], fault: {abort: {grpcStatus: UNAVAILABLE}}}]",
            "spec.http[0].fault.abort.grpcStatus",
        ),
        ("tcp: [{route: [{destination: {host: reviews}}]}]", "spec.tcp"),
        ("http: [{route: [{destination: {host: reviews}}], timout: 1s}]", "spec.http[0]"),
    ];
    for (body, field) in cases {
        let t = translate(&format!(
            "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: vs, namespace: bookinfo}}\nspec:\n  hosts: [reviews]\n  {body}\n"
        ));
        let fault = fault_of(&t).unwrap_or_else(|| panic!("{body}: accepted"));
        assert!(fault.field.starts_with(field), "{body}: {fault:?}");
    }
}
