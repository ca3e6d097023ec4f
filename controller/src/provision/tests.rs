use super::*;
use crate::config::{Args, Config};
use clap::Parser;

fn config() -> Config {
    Config::from_args(Args::parse_from(["ambient-controller", "--waypoint-image", "reg/waypoint:1"]))
        .expect("config")
}

fn gateway() -> Value {
    json!({"apiVersion": "gateway.networking.k8s.io/v1", "kind": "Gateway",
        "metadata": {"name": "wp", "namespace": "demo", "uid": "u-1", "generation": 1},
        "spec": {"gatewayClassName": "ambient-waypoint", "listeners": [{"name": "mesh", "port": 15008, "protocol": "HBONE"}],
            "infrastructure": {"labels": {"team": "x"}}}})
}

fn env(d: &Desired) -> BTreeMap<String, Value> {
    d.body["spec"]["template"]["spec"]["containers"][0]["env"]
        .as_array()
        .expect("env")
        .iter()
        .map(|e| {
            (e["name"].as_str().expect("name").to_string(), e.get("value").cloned().unwrap_or(json!(null)))
        })
        .collect()
}

#[test]
fn a_gateway_is_deployed_as_four_owned_objects_running_the_waypoint_as_its_identity() {
    let out = desired(&gateway(), &config(), Parameters::None).expect("desired");
    let kinds: Vec<_> = out.iter().map(|d| d.kind).collect();
    assert_eq!(kinds, ["ServiceAccount", "Deployment", "Service", "PodDisruptionBudget"]);
    for d in &out {
        assert_eq!((d.name.as_str(), d.namespace.as_str()), ("wp", "demo"));
        let owner = &d.body["metadata"]["ownerReferences"][0];
        assert_eq!((owner["kind"].as_str(), owner["uid"].as_str()), (Some("Gateway"), Some("u-1")));
        assert_eq!(d.body["metadata"]["labels"][GATEWAY_NAME_LABEL], "wp");
        assert_eq!(d.body["metadata"]["labels"]["team"], "x", "infrastructure labels on {}", d.kind);
    }
    let deployment = &out[1];
    let pod = &deployment.body["spec"]["template"];
    assert_eq!(pod["spec"]["serviceAccountName"], "wp");
    assert_eq!(pod["spec"]["automountServiceAccountToken"], false);
    assert_eq!(pod["metadata"]["labels"]["istio.io/dataplane-mode"], "none");
    let c = &pod["spec"]["containers"][0];
    assert_eq!(c["image"], "reg/waypoint:1");
    assert_eq!(c["securityContext"]["readOnlyRootFilesystem"], true);
    assert_eq!(c["securityContext"]["capabilities"]["drop"], json!(["ALL"]));
    let env = env(deployment);
    assert_eq!(env["XDS_ADDRESS"], "https://ambient-controller.ambient-system.svc:15012");
    assert_eq!(env["XDS_SERVER_IDENTITY"], "spiffe://cluster.local/ns/ambient-system/sa/ambient-controller");
    assert_eq!(env["CA_ADDRESS"], "https://istiod.istio-system.svc:15012");
    assert_eq!(env["WAYPOINT_NAME"], "wp");
    let service = &out[2];
    let ports: Vec<_> =
        service.body["spec"]["ports"].as_array().expect("ports").iter().map(|p| p["port"].clone()).collect();
    assert_eq!(ports, [json!(15008), json!(15021)]);
    assert_eq!(service.body["spec"]["selector"][GATEWAY_NAME_LABEL], "wp");
}

#[test]
fn parameters_merge_over_the_generated_objects_only_where_allowed() {
    let data = BTreeMap::from([
        ("deployment".to_string(), "spec: {replicas: 3}\n".to_string()),
        ("service".to_string(), "metadata: {annotations: {a: b}}\nspec: {type: LoadBalancer}\n".to_string()),
    ]);
    let out = desired(&gateway(), &config(), Parameters::ConfigMap(&data)).expect("desired");
    assert_eq!(out[1].body["spec"]["replicas"], 3);
    assert_eq!(out[2].body["spec"]["type"], "LoadBalancer");
    assert_eq!(out[2].body["spec"]["ports"][0]["port"], 15008, "maps merge, the rest stays");
    // Only allowed fields: not the image, the service account, the security context, the
    // selector, the containers.
    for (key, yaml) in [
        ("deployment", "spec: {template: {spec: {serviceAccountName: admin}}}"),
        ("deployment", "spec: {template: {spec: {hostNetwork: true}}}"),
        ("deployment", "spec: {template: {spec: {containers: [{name: x, image: evil}]}}}"),
        ("deployment", "spec: {selector: {matchLabels: {a: b}}}"),
        ("service", "spec: {selector: {app: other}}"),
        ("podDisruptionBudget", "spec: {selector: {}}"),
    ] {
        let data = BTreeMap::from([(key.to_string(), yaml.to_string())]);
        let err = desired(&gateway(), &config(), Parameters::ConfigMap(&data)).expect_err(yaml);
        assert!(err.to_string().contains("may not be set"), "{err}");
    }
    let data = BTreeMap::from([
        ("resources".to_string(), "{requests: {cpu: 1}}".to_string()),
        ("deployment".to_string(), "spec: {template: {metadata: {labels: {gateway.networking.k8s.io/gateway-name: x}}, spec: {nodeSelector: {pool: mesh}}}}".to_string()),
    ]);
    let out = desired(&gateway(), &config(), Parameters::ConfigMap(&data)).expect("allowed");
    let pod = &out[1].body["spec"]["template"];
    assert_eq!(pod["spec"]["containers"][0]["resources"], json!({"requests": {"cpu": 1}}));
    assert_eq!(pod["spec"]["nodeSelector"]["pool"], "mesh");
    assert_eq!(pod["metadata"]["labels"][GATEWAY_NAME_LABEL], "wp", "the selector label stays ours");
    let bad = BTreeMap::from([("deploy".to_string(), "{}".to_string())]);
    assert!(matches!(
        desired(&gateway(), &config(), Parameters::ConfigMap(&bad)),
        Err(ProvisionError::Parameters(_))
    ));
    let not_yaml = BTreeMap::from([("service".to_string(), "[unclosed".to_string())]);
    assert!(desired(&gateway(), &config(), Parameters::ConfigMap(&not_yaml)).is_err());
    assert!(desired(&gateway(), &config(), Parameters::Missing).is_err());
}

#[test]
fn parameters_ref_must_be_a_local_config_map_and_a_gateway_needs_its_identity() {
    let mut gw = gateway();
    assert_eq!(parameters_ref(&gw), Ok(None));
    gw["spec"]["infrastructure"]["parametersRef"] = json!({"group": "", "kind": "ConfigMap", "name": "p"});
    assert_eq!(parameters_ref(&gw), Ok(Some("p".into())));
    gw["spec"]["infrastructure"]["parametersRef"] =
        json!({"group": "example.com", "kind": "Params", "name": "p"});
    assert!(parameters_ref(&gw).is_err());
    let mut no_uid = gateway();
    no_uid["metadata"].as_object_mut().expect("meta").remove("uid");
    assert_eq!(desired(&no_uid, &config(), Parameters::None), Err(ProvisionError::Incomplete));
}
