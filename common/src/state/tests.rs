//! The index built from xDS resources: lookups, endpoints with target ports, load-balancing
//! preferences, policy scopes, and rejection keeping the last good state.

use super::*;
use crate::select::Family;
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
    // Keys too long to join on the stack, and empty parts, are looked up all the same.
    assert!(s.service(&"a".repeat(63), &"b".repeat(253)).is_none());
    assert!(s.service("demo", "").is_none() && s.service("", "").is_none());
}

#[test]
fn endpoints_map_target_ports_and_skip_unhealthy() {
    let s = state().snapshot();
    let echo = s.service("demo", "echo.demo.svc.cluster.local").expect("service").clone();
    let mut seen = std::collections::BTreeMap::new();
    for _ in 0..200 {
        let (e, addr) = s.pick_endpoint(&echo, 80, None, Family::Any).expect("endpoint");
        seen.insert(e.workload.name.clone(), addr.port());
    }
    // echo-1 maps 80 -> 8080 itself; echo-2 inherits the service's 80 -> 9090; echo-sick is skipped.
    assert_eq!(seen.get("echo-1"), Some(&8080));
    assert_eq!(seen.get("echo-2"), Some(&9090));
    assert_eq!(seen.len(), 2, "{seen:?}");
    assert!(matches!(s.pick_endpoint(&echo, 81, None, Family::Any), Err(PickError::NoSuchPort { .. })));
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
        let (e, _) = s.pick_endpoint(&echo, 80, Some(&client), Family::Any).expect("endpoint");
        assert_eq!(e.workload.node, "node-a");
    }
    // A client on a node without endpoints gets none under STRICT, the others under FAILOVER.
    let mut far = (*client).clone();
    far.node = "node-z".into();
    assert!(s.pick_endpoint(&echo, 80, Some(&far), Family::Any).is_err());
    let failover = strict.replace("mode: STRICT", "mode: FAILOVER");
    assert_eq!(load(&handlers, &failover), vec![]);
    let s = state.snapshot();
    let echo = s.service("demo", "echo.demo.svc.cluster.local").expect("service").clone();
    assert!(s.pick_endpoint(&echo, 80, Some(&far), Family::Any).is_ok());
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

// Policy fails closed: what cannot be applied never widens access.

use crate::rbac::{self, Connection, Verdict};
use proto::security as sec;

const GUARDED: &str = r#"
workloads:
  - {name: client, namespace: demo, serviceAccount: client, addresses: [10.1.1.2], node: node-a}
  - {name: echo, namespace: demo, serviceAccount: echo, addresses: [10.1.1.3], node: node-a,
     authorizationPolicies: [demo/only-client]}
  - {name: other, namespace: other, serviceAccount: other, addresses: [10.1.1.4], node: node-a}
"#;

/// An Authorization `namespace/name` whose one rule allows (or denies) principal `sa` of demo.
fn authz(
    namespace: &str,
    name: &str,
    scope: sec::Scope,
    action: sec::Action,
    sa: &str,
) -> sec::Authorization {
    let principal = sec::StringMatch {
        match_type: Some(sec::string_match::MatchType::Exact(format!("cluster.local/ns/demo/sa/{sa}"))),
    };
    let m = sec::Match { principals: vec![principal], ..Default::default() };
    sec::Authorization {
        name: name.into(),
        namespace: namespace.into(),
        scope: scope as i32,
        action: action as i32,
        rules: vec![sec::Rule { clauses: vec![sec::Clause { matches: vec![m] }] }],
        ..Default::default()
    }
}

/// The same with a rule that does not validate: a /40 prefix on an IPv4 address.
fn invalid(mut a: sec::Authorization) -> sec::Authorization {
    let bad = sec::Address { address: vec![10, 0, 0, 0], length: 40 };
    a.rules[0].clauses[0].matches[0].source_ips.push(bad);
    a
}

fn push_body(handlers: &Handlers, name: &str, body: Vec<u8>) -> Vec<Rejection> {
    let any = prost_types::Any { type_url: proto::AUTHORIZATION_TYPE_URL.into(), value: body };
    let raw = RawResource { name: name.into(), version: "v".into(), body: Some(any) };
    handlers.apply(proto::AUTHORIZATION_TYPE_URL, vec![raw], vec![]).expect("registered")
}

fn push_policy(handlers: &Handlers, a: &sec::Authorization) -> Vec<Rejection> {
    push_body(handlers, &format!("{}/{}", a.namespace, a.name), prost::Message::encode_to_vec(a))
}

fn remove_policy(handlers: &Handlers, name: &str) {
    let rejected =
        handlers.apply(proto::AUTHORIZATION_TYPE_URL, vec![], vec![name.into()]).expect("registered");
    assert_eq!(rejected, vec![]);
}

fn guarded() -> (State, Handlers) {
    let (state, handlers) = State::new("");
    assert_eq!(load(&handlers, GUARDED), vec![]);
    (state, handlers)
}

/// The verdict for `sa` of demo connecting to the workload at `dst`, with only the policies
/// that exist (the evaluation that predates missing-policy checks).
fn verdict_from(state: &State, sa: &str, dst: &str) -> Verdict {
    let s = state.snapshot();
    let w = s.workload_by_ip(dst.parse().expect("ip")).expect("workload").clone();
    let id = Identity::new("cluster.local", "demo", sa).expect("identity");
    let conn = Connection {
        source: Some(&id),
        source_ip: "10.1.1.2".parse().expect("ip"),
        destination_ip: dst.parse().expect("ip"),
        destination_port: 8080,
        http: None,
    };
    rbac::evaluate(&s.policies_for(&w), &conn)
}

/// The full decision for the workload at `dst`, missing policies included.
fn decide(state: &State, sa: &str, dst: &str) -> Verdict {
    let s = state.snapshot();
    let w = s.workload_by_ip(dst.parse().expect("ip")).expect("workload").clone();
    let id = Identity::new("cluster.local", "demo", sa).expect("identity");
    let conn = Connection {
        source: Some(&id),
        source_ip: "10.1.1.2".parse().expect("ip"),
        destination_ip: dst.parse().expect("ip"),
        destination_port: 8080,
        http: None,
    };
    rbac::evaluate_workload(&s, &w, &conn)
}

#[test]
fn a_new_allow_that_fails_validation_is_held_as_matching_nothing() {
    let (state, handlers) = guarded();
    let policy =
        invalid(authz("demo", "only-client", sec::Scope::WorkloadSelector, sec::Action::Allow, "client"));
    let rejected = push_policy(&handlers, &policy);
    assert_eq!(rejected.len(), 1, "still NACKed: {rejected:?}");
    assert!(rejected[0].reason.contains("prefix length 40"), "{rejected:?}");
    // The stand-in is the workload's only ALLOW, so nothing reaches it; not the open door an
    // absent policy would leave.
    assert_eq!(verdict_from(&state, "client", "10.1.1.3"), Verdict::NotAllowed);
    let s = state.snapshot();
    let echo = s.workload_by_ip("10.1.1.3".parse().expect("ip")).expect("echo").clone();
    let held = s.policies_for(&echo);
    assert_eq!(held.len(), 1);
    assert_eq!((held[0].action, held[0].scope), (Action::Allow, Scope::WorkloadSelector));
    assert!(held[0].rules.is_empty(), "an ALLOW stand-in matches nothing: {:?}", held[0]);
    assert!(s.failsafe_reason("demo/only-client").is_some_and(|r| r.contains("prefix length")));
    let reason = rbac::explain(&s, &echo, &decide(&state, "client", "10.1.1.3"));
    assert!(reason.contains("held fail-safe") && reason.contains("demo/only-client"), "{reason}");
    // Workloads that do not name it are not touched.
    assert_eq!(verdict_from(&state, "client", "10.1.1.4"), Verdict::Allow);
    let dump = serde_json::to_value(&*s).expect("dump");
    assert!(dump["failsafe_policies"]["demo/only-client"].is_string(), "{dump}");
}

#[test]
fn a_rejected_deny_is_held_as_matching_everything_in_its_scope() {
    let (state, handlers) = guarded();
    let mut deny = authz("demo", "deny-intruder", sec::Scope::Namespace, sec::Action::Deny, "intruder");
    deny.rules[0].clauses[0].matches[0].destination_ports.push(70_000);
    let rejected = push_policy(&handlers, &deny);
    assert_eq!(rejected.len(), 1, "{rejected:?}");
    assert!(rejected[0].reason.contains("70000"), "{rejected:?}");
    // Everything in namespace demo is refused, whoever asks; namespace other is not.
    let by = Verdict::DeniedBy("demo/deny-intruder".into());
    assert_eq!(verdict_from(&state, "client", "10.1.1.2"), by);
    assert_eq!(verdict_from(&state, "intruder", "10.1.1.2"), by);
    assert_eq!(verdict_from(&state, "client", "10.1.1.4"), Verdict::Allow);
}

#[test]
fn a_rejected_update_replaces_the_version_in_force_until_a_good_one_arrives() {
    let (state, handlers) = guarded();
    let good = authz("demo", "only-client", sec::Scope::WorkloadSelector, sec::Action::Allow, "client");
    assert_eq!(push_policy(&handlers, &good), vec![]);
    assert_eq!(verdict_from(&state, "client", "10.1.1.3"), Verdict::Allow);
    assert_eq!(verdict_from(&state, "intruder", "10.1.1.3"), Verdict::NotAllowed);

    // A bad update of an ALLOW must not leave the old, wider one in force...
    assert_eq!(push_policy(&handlers, &invalid(good.clone())).len(), 1);
    assert_eq!(verdict_from(&state, "client", "10.1.1.3"), Verdict::NotAllowed);
    // ...nor may a bad update of a DENY (here one turned from ALLOW) deny less than everything.
    let mut turned = invalid(good.clone());
    turned.action = sec::Action::Deny as i32;
    assert_eq!(push_policy(&handlers, &turned).len(), 1);
    assert_eq!(verdict_from(&state, "client", "10.1.1.3"), Verdict::DeniedBy("demo/only-client".into()));

    // A good version takes over again, and a removal takes everything out.
    assert_eq!(push_policy(&handlers, &good), vec![]);
    assert_eq!(verdict_from(&state, "client", "10.1.1.3"), Verdict::Allow);
    assert!(state.snapshot().failsafe_reason("demo/only-client").is_none());
    assert_eq!(push_policy(&handlers, &invalid(good)).len(), 1);
    remove_policy(&handlers, "demo/only-client");
    let s = state.snapshot();
    assert!(s.failsafe_reason("demo/only-client").is_none());
    assert!(!s.policies.contains_key("demo/only-client"), "removed, stand-in included");
}

#[test]
fn unreadable_actions_deny_and_unreadable_scopes_only_touch_the_workloads_naming_them() {
    let (state, handlers) = guarded();
    // An action this build does not know (a CUSTOM, say) is held as a DENY...
    let mut custom = authz("demo", "only-client", sec::Scope::WorkloadSelector, sec::Action::Allow, "client");
    custom.action = 2;
    assert_eq!(push_policy(&handlers, &custom).len(), 1);
    assert_eq!(verdict_from(&state, "client", "10.1.1.3"), Verdict::DeniedBy("demo/only-client".into()));
    // ...and a scope it does not know applies only where named.
    let mut odd = authz("demo", "odd-scope", sec::Scope::Namespace, sec::Action::Deny, "client");
    odd.scope = 9;
    assert_eq!(push_policy(&handlers, &odd).len(), 1);
    let s = state.snapshot();
    assert_eq!(s.policies.get("demo/odd-scope").map(|p| p.scope), Some(Scope::WorkloadSelector));
    assert_eq!(verdict_from(&state, "client", "10.1.1.2"), Verdict::Allow, "client does not name it");
}

#[test]
fn a_policy_that_does_not_decode_is_held_fail_safe_when_its_header_reads() {
    let (state, handlers) = guarded();
    let header = sec::Authorization {
        name: "only-client".into(),
        namespace: "demo".into(),
        scope: sec::Scope::WorkloadSelector as i32,
        action: sec::Action::Allow as i32,
        ..Default::default()
    };
    // Field 5 (rules), length-delimited, holding bytes that are no Rule.
    let mut body = prost::Message::encode_to_vec(&header);
    body.extend([0x2a, 3, 0xff, 0xff, 0xff]);
    let rejected = push_body(&handlers, "demo/only-client", body);
    assert_eq!(rejected.len(), 1);
    assert!(rejected[0].reason.contains("cannot decode"), "{rejected:?}");
    assert_eq!(verdict_from(&state, "client", "10.1.1.3"), Verdict::NotAllowed);
    assert!(state.snapshot().failsafe_reason("demo/only-client").is_some());

    // Garbage all through: nothing is readable, so nothing is held; the workload naming it
    // is refused because the policy is missing.
    let (state, handlers) = guarded();
    assert_eq!(push_body(&handlers, "demo/only-client", vec![0xff; 4]).len(), 1);
    assert!(state.snapshot().failsafe_reason("demo/only-client").is_none());
    assert_eq!(decide(&state, "client", "10.1.1.3"), Verdict::PolicyMissing("demo/only-client".into()));
}

#[test]
fn a_workload_naming_a_missing_policy_is_refused_until_it_arrives() {
    let (state, handlers) = guarded();
    let s = state.snapshot();
    let echo = s.workload_by_ip("10.1.1.3".parse().expect("ip")).expect("echo").clone();
    assert_eq!(s.missing_policies(&echo).collect::<Vec<_>>(), ["demo/only-client"]);
    let missing = decide(&state, "client", "10.1.1.3");
    assert_eq!(missing, Verdict::PolicyMissing("demo/only-client".into()));
    assert_eq!(
        (missing.label(), missing.cause(), missing.policy()),
        ("deny", "policy_missing", Some("demo/only-client"))
    );
    assert!(missing.reason().contains("demo/only-client"), "{}", missing.reason());
    // Workloads that name nothing missing are decided as before.
    assert_eq!(decide(&state, "client", "10.1.1.4"), Verdict::Allow);

    let good = authz("demo", "only-client", sec::Scope::WorkloadSelector, sec::Action::Allow, "client");
    assert_eq!(push_policy(&handlers, &good), vec![]);
    assert_eq!(decide(&state, "client", "10.1.1.3"), Verdict::Allow);
    assert_eq!(decide(&state, "intruder", "10.1.1.3"), Verdict::NotAllowed);
    // Removed again: missing again.
    remove_policy(&handlers, "demo/only-client");
    assert_eq!(decide(&state, "client", "10.1.1.3"), Verdict::PolicyMissing("demo/only-client".into()));
}

#[test]
fn fail_safe_policies_are_counted() {
    let (state, handlers) = guarded();
    let mut registry = crate::metrics::new_registry();
    state.register_metrics(&mut registry);
    let allow =
        invalid(authz("demo", "only-client", sec::Scope::WorkloadSelector, sec::Action::Allow, "client"));
    let mut deny = invalid(authz("demo", "deny-x", sec::Scope::Namespace, sec::Action::Deny, "x"));
    deny.rules[0].clauses[0].matches[0].source_ips[0].length = 33;
    assert_eq!(push_policy(&handlers, &allow).len(), 1);
    assert_eq!(push_policy(&handlers, &deny).len(), 1);
    let text = crate::metrics::render(&registry);
    assert!(text.contains("istio_authorization_policy_failsafe_total{action=\"ALLOW\"} 1"), "{text}");
    assert!(text.contains("istio_authorization_policy_failsafe_total{action=\"DENY\"} 1"), "{text}");
    assert!(text.contains("istio_authorization_policies_failsafe 2"), "{text}");
    remove_policy(&handlers, "demo/deny-x");
    let text = crate::metrics::render(&registry);
    assert!(text.contains("istio_authorization_policies_failsafe 1"), "{text}");
}

/// The shared endpoint selection (`crate::select`): network, address family, the client's node,
/// ejection with a fallback, and the three ways of picking.
#[test]
fn endpoint_selection_filters_prefers_and_balances() {
    use crate::select::{self, Ask, Balance};
    let (state, handlers) = State::new("");
    let mesh = MESH
        .replace("    addresses: [10.1.1.3]\n", "    addresses: [10.1.1.3, \"fd00::3\"]\n")
        .replace(
            "  - name: echo-sick\n",
            "  - name: echo-far\n    namespace: demo\n    addresses: [10.9.1.2]\n    network: elsewhere\n    node: node-z\n    services:\n      demo/echo.demo.svc.cluster.local: [{servicePort: 80, targetPort: 8080}]\n  - name: echo-sick\n",
        );
    assert_eq!(load(&handlers, &mesh), vec![]);
    let s = state.snapshot();
    let echo = s.service("demo", "echo.demo.svc.cluster.local").expect("service").clone();
    let client = s.workload_by_ip("10.1.1.2".parse().expect("ip")).expect("client").clone();
    let ask = |family, same_node_first| Ask {
        service: &echo,
        port: Some(80),
        network: s.network(),
        near: Some(&client),
        family,
        same_node_first,
    };
    let names = |c: &[select::Candidate<'_>]| {
        let mut n: Vec<String> = c.iter().map(|c| c.endpoint.workload.name.clone()).collect();
        n.sort();
        n
    };
    assert_eq!(s.endpoints(&echo).len(), 4, "echo-1, echo-2, echo-far, echo-sick");
    // Another network's endpoint and the unhealthy one are never candidates.
    let all =
        select::candidates(s.endpoints(&echo), &ask(select::Family::PreferV4, false)).expect("candidates");
    assert_eq!(names(&all), ["echo-1", "echo-2"]);
    // The client's family: IPv6 where the endpoint has it, else its first address.
    let v6 =
        select::candidates(s.endpoints(&echo), &ask(select::Family::PreferV6, false)).expect("candidates");
    for c in &v6 {
        let expect_v6 = c.endpoint.workload.name == "echo-1";
        assert_eq!(c.addr.is_ipv6(), expect_v6, "{c:?}");
    }
    // The client's node first.
    let near = select::candidates(s.endpoints(&echo), &ask(select::Family::Any, true)).expect("candidates");
    assert_eq!(names(&near), ["echo-1"]);

    let busy = all.iter().position(|c| c.endpoint.workload.name == "echo-1").expect("echo-1");
    let load = |c: &select::Candidate<'_>| if c.endpoint.workload.name == "echo-1" { 100 } else { 0 };
    // Round robin takes turns over all candidates.
    let turns: std::collections::BTreeSet<String> = (0..4)
        .filter_map(|t| select::choose(&all, Balance::RoundRobin, |_| false, || t, load))
        .map(|c| c.endpoint.workload.name.clone())
        .collect();
    assert_eq!(turns.len(), 2, "both endpoints get turns");
    // An ejected endpoint is left out, unless every one is ejected.
    for _ in 0..50 {
        let c = select::choose(&all, Balance::Random, |c| c.endpoint.workload.name == "echo-2", || 0, load);
        assert_eq!(c.expect("one").endpoint.workload.name, "echo-1");
    }
    assert!(select::choose(&all, Balance::Random, |_| true, || 0, load).is_some(), "all ejected: all again");
    // Round robin and least request take turns over the live ones only.
    for t in 0..4 {
        for balance in [Balance::RoundRobin, Balance::LeastRequest] {
            let c = select::choose(&all, balance, |c| c.endpoint.workload.name == "echo-1", || t, load);
            assert_eq!(c.expect("one").endpoint.workload.name, "echo-2", "{balance:?}, turn {t}");
        }
    }
    // Power of two choices avoids the loaded endpoint most of the time (it wins only when both
    // draws fall on it: a quarter of the time).
    let chose_busy = (0..400)
        .filter(|_| {
            let c = select::choose(&all, Balance::LeastRequest, |_| false, || 0, load).expect("one");
            std::ptr::eq(c.endpoint, all[busy].endpoint)
        })
        .count();
    assert!(chose_busy < 200, "least request chose the loaded endpoint {chose_busy} times of 400");
}

/// Everything the view holds, indexes included, in a form two views can be compared by.
fn digest(s: &Snapshot) -> String {
    fn json<T: serde::Serialize + ?Sized>(v: &T) -> String {
        serde_json::to_string(v).expect("serializes")
    }
    let mut out = vec![json(s)];
    let mut lines = |name: &str, mut items: Vec<String>| {
        items.sort();
        out.push(format!("{name}: {items:?}"));
    };
    lines("by_ip", s.workloads_by_ip.iter().map(|(k, w)| format!("{k:?} {}", json(&**w))).collect());
    lines("local", s.local_workloads.iter().map(|(k, w)| format!("{k} {}", json(&**w))).collect());
    lines(
        "by_node",
        s.workloads_by_node
            .iter()
            .map(|(n, ws)| format!("{n} {:?}", ws.keys().collect::<Vec<_>>()))
            .collect(),
    );
    lines(
        "by_host",
        s.services_by_host.iter().map(|(h, ss)| format!("{h} {:?}", ss.keys().collect::<Vec<_>>())).collect(),
    );
    lines("by_vip", s.services_by_vip.iter().map(|(k, v)| format!("{k:?} {}", json(&**v))).collect());
    lines("local_vips", s.local_services.iter().map(|(k, v)| format!("{k} {}", json(&**v))).collect());
    lines("global", s.global_policies.iter().map(|p| json(&**p)).collect());
    lines(
        "namespaced",
        s.namespace_policies
            .iter()
            .map(|(ns, ps)| format!("{ns} {:?}", ps.iter().map(|p| json(&**p)).collect::<Vec<_>>()))
            .collect(),
    );
    out.join("\n")
}

/// A random resource of a small pool, so that names, addresses, VIPs and policy keys collide
/// often.
fn random_address(rng: &mut impl rand::Rng) -> (String, RawResource) {
    use proto::workload as wl;
    let ip = |rng: &mut dyn rand::RngCore, base: u8| vec![10, base, 0, (rng.next_u32() % 5) as u8];
    let (name, address) = if rng.random_bool(0.7) {
        let n = rng.random_range(0..10);
        let name = format!("w{n}");
        let backed: Vec<usize> = (0..3).filter(|_| rng.random_bool(0.4)).collect();
        let services = backed
            .into_iter()
            .map(|s| {
                let port = wl::Port {
                    service_port: 80,
                    target_port: rng.random_range(0..3) * 8080,
                    app_protocol: 0,
                };
                (format!("demo/s{s}.demo"), wl::PortList { ports: vec![port] })
            })
            .collect();
        let w = wl::Workload {
            uid: name.clone(),
            name: name.clone(),
            namespace: "demo".into(),
            addresses: (0..rng.random_range(0..3)).map(|_| ip(rng, 1)).collect(),
            network: if rng.random_bool(0.8) { String::new() } else { "far".into() },
            tunnel_protocol: wl::TunnelProtocol::Hbone as i32,
            node: format!("node-{}", rng.random_range(0..3)),
            services,
            status: rng.random_range(0..2),
            ..Default::default()
        };
        (name, wl::Address { r#type: Some(wl::address::Type::Workload(w)) })
    } else {
        let n = rng.random_range(0..4);
        let s = wl::Service {
            name: format!("s{n}"),
            namespace: "demo".into(),
            hostname: format!("s{n}.demo"),
            addresses: (0..rng.random_range(0..3))
                .map(|_| wl::NetworkAddress {
                    network: if rng.random_bool(0.8) { String::new() } else { "far".into() },
                    address: ip(rng, 96),
                    length: None,
                })
                .collect(),
            ports: vec![wl::Port {
                service_port: 80,
                target_port: rng.random_range(0..2) * 9090,
                app_protocol: 0,
            }],
            ..Default::default()
        };
        (format!("demo/s{n}.demo"), wl::Address { r#type: Some(wl::address::Type::Service(s)) })
    };
    let body = prost_types::Any {
        type_url: proto::ADDRESS_TYPE_URL.into(),
        value: prost::Message::encode_to_vec(&address),
    };
    (name.clone(), RawResource { name, version: "1".into(), body: Some(body) })
}

fn random_policy(rng: &mut impl rand::Rng) -> (String, RawResource) {
    let scopes = [sec::Scope::Global, sec::Scope::Namespace, sec::Scope::WorkloadSelector];
    let mut p = authz(
        ["demo", "other"][rng.random_range(0..2)],
        &format!("p{}", rng.random_range(0..3)),
        scopes[rng.random_range(0..3)],
        [sec::Action::Allow, sec::Action::Deny][rng.random_range(0..2)],
        "client",
    );
    if rng.random_bool(0.2) {
        p = invalid(p);
    }
    // Half of them under a resource name that is not their key: rejected, and held fail-safe
    // under the key, which an accepted one may hold too.
    let name = if rng.random_bool(0.5) {
        format!("{}/{}", p.namespace, p.name)
    } else {
        format!("r{}", rng.random_range(0..3))
    };
    let body = prost_types::Any {
        type_url: proto::AUTHORIZATION_TYPE_URL.into(),
        value: prost::Message::encode_to_vec(&p),
    };
    (name.clone(), RawResource { name, version: "1".into(), body: Some(body) })
}

/// However the resources in force were pushed (in what batches, over what history of updates,
/// rejections and removals), the view is the one a single push of them builds: incremental
/// updates leave no stale index entry behind and lose none, also where several resources
/// claim one address, VIP or policy key.
#[test]
fn incremental_pushes_build_the_same_view_as_one_push_of_what_is_in_force() {
    use rand::{Rng, SeedableRng, rngs::StdRng};
    use std::collections::BTreeMap;
    for seed in 0..60 {
        let mut rng = StdRng::seed_from_u64(seed);
        let (state, handlers) = State::new("");
        // Resource name -> the last version pushed (rejected policies included: their stand-in
        // is in force), per type.
        let mut in_force: [BTreeMap<String, RawResource>; 2] = Default::default();
        let types = [proto::ADDRESS_TYPE_URL, proto::AUTHORIZATION_TYPE_URL];
        for _ in 0..40 {
            let t = rng.random_range(0..2);
            let mut batch = BTreeMap::new();
            let mut removed = Vec::new();
            for _ in 0..rng.random_range(1..5) {
                if rng.random_bool(0.25) && !in_force[t].is_empty() {
                    let names: Vec<&String> = in_force[t].keys().collect();
                    removed.push(names[rng.random_range(0..names.len())].clone());
                } else {
                    let (name, r) = if t == 0 { random_address(&mut rng) } else { random_policy(&mut rng) };
                    batch.insert(name, r);
                }
            }
            removed.retain(|n| !batch.contains_key(n));
            for n in &removed {
                in_force[t].remove(n);
            }
            in_force[t].extend(batch.clone());
            let rejected =
                handlers.apply(types[t], batch.into_values().collect(), removed).expect("registered");
            if t == 0 {
                assert_eq!(rejected, vec![], "seed {seed}: addresses are all valid");
            }
        }
        let (fresh, fresh_handlers) = State::new("");
        for t in 0..2 {
            fresh_handlers
                .apply(types[t], in_force[t].values().cloned().collect(), vec![])
                .expect("registered");
        }
        let (got, want) = (digest(&state.snapshot()), digest(&fresh.snapshot()));
        assert!(
            got == want,
            "seed {seed}: incremental view differs\n--- incremental\n{got}\n--- one push\n{want}"
        );
        assert!(!state.snapshot().workloads.is_empty() || in_force[0].is_empty());
    }
}
