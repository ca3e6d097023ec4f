use common::translate::{Fault, InForce, ObjectKey};

use super::*;

fn gateway(status: Value) -> Value {
    json!({"metadata": {"name": "wp", "namespace": "demo", "generation": 3},
        "spec": {"listeners": [{"name": "mesh", "port": 15008, "protocol": "HBONE"}]}, "status": status})
}

fn cond<'a>(st: &'a Value, kind: &str) -> &'a Value {
    st["conditions"].as_array().expect("conditions").iter().find(|c| c["type"] == kind).expect("condition")
}

fn facts(addresses: &[&str]) -> GatewayFacts {
    GatewayFacts {
        refused: None,
        invalid_parameters: None,
        not_provisioned: None,
        addresses: addresses.iter().map(ToString::to_string).collect(),
        attached_routes: 2,
    }
}

#[test]
fn a_gateway_is_programmed_once_its_service_has_an_address_and_unchanged_status_is_stable() {
    let pending = gateway_status(&gateway(json!({})), &facts(&[]), "t1");
    assert_eq!(cond(&pending, "Accepted")["status"], "True");
    assert_eq!(cond(&pending, "Programmed")["status"], "False");
    assert_eq!(cond(&pending, "Programmed")["reason"], "AddressNotAssigned");
    assert_eq!(pending["addresses"], json!([]));

    let programmed = gateway_status(&gateway(pending.clone()), &facts(&["10.96.0.10"]), "t2");
    assert_eq!(cond(&programmed, "Programmed")["status"], "True");
    assert_eq!(cond(&programmed, "Programmed")["lastTransitionTime"], "t2");
    assert_eq!(cond(&programmed, "Accepted")["lastTransitionTime"], "t1", "unchanged keeps its time");
    assert_eq!(cond(&programmed, "Accepted")["observedGeneration"], 3);
    assert_eq!(programmed["addresses"], json!([{"type": "IPAddress", "value": "10.96.0.10"}]));
    assert_eq!(programmed["listeners"][0]["attachedRoutes"], 2);
    // Computing again from the written status gives the same value: nothing to write.
    assert_eq!(gateway_status(&gateway(programmed.clone()), &facts(&["10.96.0.10"]), "t3"), programmed);

    let refused =
        GatewayFacts { refused: Some("spec.listeners: a waypoint needs a listener".into()), ..facts(&[]) };
    let st = gateway_status(&gateway(json!({})), &refused, "t4");
    assert_eq!(cond(&st, "Accepted")["reason"], "ListenersNotValid");
    assert_eq!(cond(&st, "Programmed")["status"], "False");
    let params = GatewayFacts {
        invalid_parameters: Some("deployment: /spec/x may not be set".into()),
        ..facts(&["10.96.0.10"])
    };
    let st = gateway_status(&gateway(json!({})), &params, "t5");
    assert_eq!(
        (cond(&st, "Accepted")["status"].as_str(), cond(&st, "Accepted")["reason"].as_str()),
        (Some("False"), Some("InvalidParameters"))
    );
    assert_eq!(cond(&st, "Programmed")["status"], "False");
    let taken = GatewayFacts {
        not_provisioned: Some("Service demo/wp exists and is not owned".into()),
        ..facts(&[])
    };
    let st = gateway_status(&gateway(json!({})), &taken, "t6");
    assert_eq!(cond(&st, "Accepted")["status"], "True");
    assert_eq!(
        (cond(&st, "Programmed")["status"].as_str(), cond(&st, "Programmed")["reason"].as_str()),
        (Some("False"), Some("Invalid"))
    );
}

fn route_status(accepted: bool, fault: Option<Fault>) -> ObjectStatus {
    ObjectStatus {
        object: ObjectKey { kind: "HTTPRoute".into(), namespace: "demo".into(), name: "r".into() },
        origin: "x".into(),
        accepted,
        in_force: if accepted { InForce::Current } else { InForce::None },
        fault,
        notes: vec![],
    }
}

#[test]
fn route_conditions_follow_the_translation() {
    let [a, r] = route_conditions(Some(&route_status(true, None)));
    assert!(a.ok && r.ok);
    let [a, r] = route_conditions(Some(&route_status(
        false,
        Some(Fault::new("spec.rules[0].backendRefs[0].name", "Service demo/nope does not exist")),
    )));
    assert_eq!((a.ok, r.ok, r.reason), (false, false, "BackendNotFound"));
    let [a, _] = route_conditions(Some(&route_status(
        false,
        Some(Fault::new("spec.parentRefs[0]", "no such parent")),
    )));
    assert_eq!(a.reason, "NoMatchingParent");
    let [a, _] = route_conditions(None);
    assert_eq!(a.reason, "Pending");
}

#[test]
fn route_parents_replace_only_our_entries() {
    let route = json!({"metadata": {"generation": 1}, "spec": {"parentRefs": [
        {"group": "", "kind": "Service", "name": "mine"}, {"group": "", "kind": "Service", "name": "theirs"}]},
        "status": {"parents": [{"parentRef": {"group": "", "kind": "Service", "name": "theirs"},
            "controllerName": "istio.io/gateway-controller", "conditions": []}]}});
    let conds = route_conditions(Some(&route_status(true, None)));
    let ours = |r: &Value| r["name"] == "mine";
    let parents =
        route_parents(&route, "waypoint.ambient.dev/controller", ours, &conds, "t1").expect("changed");
    let parents = parents.as_array().expect("list");
    assert_eq!(parents.len(), 2);
    assert_eq!(parents[0]["controllerName"], "istio.io/gateway-controller");
    assert_eq!(parents[1]["parentRef"]["name"], "mine");
    let mut written = route.clone();
    written["status"]["parents"] = Value::Array(parents.clone());
    assert_eq!(route_parents(&written, "waypoint.ambient.dev/controller", ours, &conds, "t2"), None);
    // Another controller that puts its entry last: ours stays where it is, nothing to write
    // (no ping-pong of reorderings).
    let mut reordered = written.clone();
    reordered["status"]["parents"] = json!([parents[1].clone(), parents[0].clone()]);
    assert_eq!(route_parents(&reordered, "waypoint.ambient.dev/controller", ours, &conds, "t3"), None);
    // A parentRef that is no longer ours loses our entry, the foreign one stays.
    let none = |_: &Value| false;
    let left =
        route_parents(&written, "waypoint.ambient.dev/controller", none, &conds, "t4").expect("changed");
    assert_eq!(left.as_array().map(Vec::len), Some(1));
    assert_eq!(left[0]["controllerName"], "istio.io/gateway-controller");
}
