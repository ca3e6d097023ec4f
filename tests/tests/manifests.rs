//! The install artifacts stay true: every overlay of `deploy/kubernetes` is rendered with
//! `kubectl kustomize` and checked
//! - against the Kubernetes API's schemas (kubernetes-validate, strict), our CRD's instances
//!   against its `openAPIV3Schema`, the GatewayClass through the `gateway-api` crate's types;
//! - for drift from the binaries: every flag and environment variable of every container must be
//!   one its binary's clap definition accepts, with a value it parses (`ztunnel::config::Args`,
//!   `waypoint::config::Args`, `controller::config::Args`, `ambient_cni::cli::Args`);
//! - for wiring: probes, ports, Services and annotations on the ports the binary listens on; the
//!   mesh root, token, bpffs and CNI socket mounted where its flags point; a grace period above
//!   its drain; the GatewayClass, Lease and Service the controller names.
//!
//! Each check is also run on a broken copy of the manifests, to show that it can fail.
//! Needs kubectl, and python3 with kubernetes-validate (deploy/setup.sh); fails naming them.

#[path = "manifests/binaries.rs"]
mod binaries;
#[path = "manifests/drift.rs"]
mod drift;
#[path = "manifests/render.rs"]
mod render;
#[path = "manifests/schema.rs"]
mod schema;
#[path = "manifests/wiring.rs"]
mod wiring;

use serde_json::Value;

use render::{overlay, overlays, parse_yaml_stream, repo_root};

/// Fails listing `problems`, under `what`.
fn assert_none(what: &str, problems: &[String]) {
    assert!(problems.is_empty(), "{what}:\n  - {}", problems.join("\n  - "));
}

/// Drift and wiring problems of `objects` (everything but the schemas).
fn drift_and_wiring(objects: &[Value]) -> Vec<String> {
    let (checked, mut problems) = drift::check(objects);
    problems.extend(wiring::problems(&checked, objects));
    problems
}

#[test]
fn overlays_pass_the_kubernetes_schemas() {
    for rendered in overlays() {
        let crds = schema::crds(&rendered.objects);
        assert!(!crds.is_empty(), "overlay {}: our CRD is not in the install", rendered.overlay);
        let mut problems = schema::problems(&rendered.objects, &crds);
        problems.extend(schema::gateway_class_problems(&rendered.objects));
        assert_none(&format!("overlay {} does not pass the schemas", rendered.overlay), &problems);
    }
}

#[test]
fn example_custom_resources_pass_their_crd_schemas() {
    let crds: Vec<Value> = read_yaml_dir(&repo_root().join("deploy/crds"))
        .into_iter()
        .filter(|o| o["kind"] == "CustomResourceDefinition")
        .collect();
    let examples = read_yaml_dir(&repo_root().join("deploy/kubernetes/examples"));
    assert!(
        examples.iter().any(|o| o["kind"] == "WaypointPolicy"),
        "deploy/kubernetes/examples holds no WaypointPolicy to check the CRD's schema with"
    );
    assert_none("the examples do not pass their schemas", &schema::problems(&examples, &crds));
}

#[test]
fn containers_use_flags_and_env_the_binaries_accept() {
    for rendered in overlays() {
        let (checked, problems) = drift::check(&rendered.objects);
        assert_none(&format!("overlay {}: manifests and binaries disagree", rendered.overlay), &problems);
        let binaries: Vec<&str> = checked.iter().map(|c| c.binary.name()).collect();
        for expected in ["ztunnel", "ambient-cni", "ambient-controller"] {
            assert!(
                binaries.contains(&expected),
                "overlay {}: no container runs {expected}",
                rendered.overlay
            );
        }
    }
}

#[test]
fn manifests_are_wired_to_what_the_binaries_do() {
    for rendered in overlays() {
        let (checked, unchecked) = drift::check(&rendered.objects);
        let mut problems = wiring::problems(&checked, &rendered.objects);
        problems
            .extend(unchecked.iter().map(|p| format!("not checked, its configuration does not parse: {p}")));
        assert_none(&format!("overlay {}: wiring", rendered.overlay), &problems);
    }
}

#[test]
fn overlays_name_real_images_and_default_is_this_version() {
    let version = env!("CARGO_PKG_VERSION");
    for rendered in overlays() {
        let text = serde_json::to_string(&rendered.objects).expect("json");
        assert!(
            !text.contains("ambient.invalid/"),
            "overlay {}: an image is still the base's placeholder (ambient.invalid/...): name it in `images:`",
            rendered.overlay
        );
    }
    let default = &overlay("default").objects;
    let mut images: Vec<String> = Vec::new();
    for w in render::workloads(default) {
        let containers = w.spec.init_containers.iter().flatten().chain(&w.spec.containers);
        for c in containers {
            images.extend(c.image.clone());
            let waypoint = c.env.iter().flatten().find(|e| e.name == "WAYPOINT_IMAGE");
            images.extend(waypoint.and_then(|e| e.value.clone()));
        }
    }
    assert!(
        images.iter().any(|i| i.contains("ambient-waypoint")),
        "the controller is given no waypoint image"
    );
    for image in &images {
        assert!(
            image.ends_with(&format!(":{version}")),
            "overlay default: image {image} is not tagged with the workspace version {version} \
             (deploy/images/build.sh tags its images so)"
        );
    }
}

/// Every object of the `*.yaml` files of `dir` (not kustomization files).
fn read_yaml_dir(dir: &std::path::Path) -> Vec<Value> {
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "yaml") && !p.ends_with("kustomization.yaml"))
        .collect();
    files.sort();
    files
        .iter()
        .flat_map(|f| {
            let text = std::fs::read_to_string(f).unwrap_or_else(|e| panic!("{}: {e}", f.display()));
            parse_yaml_stream(&text, &f.display().to_string())
        })
        .collect()
}

/// Each check, run on a copy of the default overlay broken in one place, finds it.
mod the_checks_can_fail {
    use serde_json::{Value, json};

    use super::{drift_and_wiring, overlay, schema};

    /// The default overlay's objects after `f`.
    fn broken(f: impl FnOnce(&mut Vec<Value>)) -> Vec<Value> {
        let mut objects = overlay("default").objects.clone();
        f(&mut objects);
        objects
    }

    fn object<'a>(objects: &'a mut [Value], kind: &str, name: &str) -> &'a mut Value {
        objects
            .iter_mut()
            .find(|o| o["kind"] == kind && o["metadata"]["name"] == name)
            .unwrap_or_else(|| panic!("no {kind} {name}"))
    }

    /// The container `name` (init or not) of the workload `kind`/`workload`.
    fn container<'a>(objects: &'a mut [Value], kind: &str, workload: &str, name: &str) -> &'a mut Value {
        let spec = &mut object(objects, kind, workload)["spec"]["template"]["spec"];
        let init_has =
            spec["initContainers"].as_array().is_some_and(|cs| cs.iter().any(|c| c["name"] == name));
        let list = if init_has { &mut spec["initContainers"] } else { &mut spec["containers"] };
        list.as_array_mut()
            .and_then(|cs| cs.iter_mut().find(|c| c["name"] == name))
            .unwrap_or_else(|| panic!("no container {name} in {workload}"))
    }

    fn env<'a>(container: &'a mut Value, name: &str) -> &'a mut Value {
        container["env"]
            .as_array_mut()
            .and_then(|e| e.iter_mut().find(|v| v["name"] == name))
            .unwrap_or_else(|| panic!("no env {name}"))
    }

    /// Fails unless one of `problems` contains every one of `needles`.
    fn assert_found(problems: &[String], needles: &[&str]) {
        assert!(
            problems.iter().any(|p| needles.iter().all(|n| p.contains(n))),
            "no problem mentions {needles:?}; found:\n  - {}",
            problems.join("\n  - ")
        );
    }

    #[test]
    fn an_unknown_flag() {
        let objects = broken(|o| {
            let args = &mut container(o, "DaemonSet", "ztunnel", "install-cni")["args"];
            args[1] = json!("--bin-directory");
        });
        assert_found(&drift_and_wiring(&objects), &["container install-cni", "no flag --bin-directory"]);
    }

    #[test]
    fn an_unknown_environment_variable() {
        let objects = broken(|o| {
            env(container(o, "Deployment", "ambient-controller", "controller"), "TRUST_DOMAIN")["name"] =
                json!("TRUST_DOMIAN");
        });
        assert_found(&drift_and_wiring(&objects), &["container controller", "TRUST_DOMIAN"]);
    }

    #[test]
    fn a_value_the_binary_refuses() {
        let objects = broken(|o| {
            env(container(o, "Deployment", "ambient-controller", "controller"), "LOG_FORMAT")["value"] =
                json!("yaml");
        });
        assert_found(&drift_and_wiring(&objects), &["container controller", "LOG_FORMAT"]);
    }

    #[test]
    fn a_readiness_probe_on_the_wrong_port() {
        let objects = broken(|o| {
            container(o, "Deployment", "ambient-controller", "controller")["readinessProbe"]["httpGet"]["port"] =
                json!(15022);
        });
        assert_found(&drift_and_wiring(&objects), &["container controller", "readinessProbe"]);
    }

    #[test]
    fn a_service_to_a_port_nobody_listens_on() {
        let objects = broken(|o| {
            object(o, "Service", "ambient-controller")["spec"]["ports"][0]["targetPort"] = json!(15010);
        });
        assert_found(&drift_and_wiring(&objects), &["Service ambient-system/ambient-controller", "15010"]);
    }

    #[test]
    fn ports_on_the_host_network_pod_that_surges() {
        let objects = broken(|o| {
            container(o, "DaemonSet", "ztunnel", "ztunnel")["ports"] = json!([{"containerPort": 15020}]);
        });
        assert_found(&drift_and_wiring(&objects), &["container ztunnel", "surge"]);
    }

    #[test]
    fn a_token_for_the_wrong_audience() {
        let objects = broken(|o| {
            let spec = &mut object(o, "Deployment", "ambient-controller")["spec"]["template"]["spec"];
            let volume = spec["volumes"]
                .as_array_mut()
                .and_then(|v| v.iter_mut().find(|v| v["name"] == "istio-token"));
            volume.expect("istio-token volume")["projected"]["sources"][0]["serviceAccountToken"]["audience"] =
                json!("kubernetes");
        });
        assert_found(&drift_and_wiring(&objects), &["container controller", "audience istio-ca"]);
    }

    #[test]
    fn a_grace_period_shorter_than_the_drain() {
        let objects = broken(|o| {
            object(o, "DaemonSet", "ztunnel")["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] =
                json!(20);
        });
        assert_found(&drift_and_wiring(&objects), &["container ztunnel", "terminationGracePeriodSeconds"]);
    }

    #[test]
    fn a_gateway_class_the_controller_does_not_own() {
        let objects = broken(|o| {
            object(o, "GatewayClass", "ambient-waypoint")["metadata"]["name"] = json!("other-waypoint");
        });
        assert_found(&drift_and_wiring(&objects), &["GatewayClass ambient-waypoint"]);
    }

    #[test]
    fn a_lease_the_role_does_not_name() {
        let objects = broken(|o| {
            env(container(o, "Deployment", "ambient-controller", "controller"), "LEASE_NAME")["value"] =
                json!("another-lease");
        });
        assert_found(&drift_and_wiring(&objects), &["Lease ambient-system/another-lease"]);
    }

    #[test]
    fn a_cni_socket_ztunnel_does_not_serve() {
        let objects = broken(|o| {
            let args = &mut container(o, "DaemonSet", "ztunnel", "install-cni")["args"];
            args[6] = json!("/var/run/elsewhere/cni.sock");
        });
        assert_found(&drift_and_wiring(&objects), &["container install-cni", "/var/run/elsewhere/cni.sock"]);
    }

    #[test]
    fn a_field_the_kubernetes_schema_does_not_have() {
        let objects = broken(|o| {
            container(o, "Deployment", "ambient-controller", "controller")["imagePullPolicyy"] =
                json!("Always");
        });
        let problems = schema::problems(&objects, &schema::crds(&objects));
        assert_found(&problems, &["Deployment ambient-system/ambient-controller", "imagePullPolicyy"]);
    }

    #[test]
    fn a_waypoint_policy_its_crd_refuses() {
        let policy = json!({
            "apiVersion": "waypoint.ambient.dev/v1alpha1",
            "kind": "WaypointPolicy",
            "metadata": {"name": "bad", "namespace": "demo"},
            "spec": {
                "targetRefs": [{"kind": "Service", "name": "echo"}],
                "localRateLimit": {"maxTokens": 0, "fillInterval": "1s", "burst": 3},
            },
        });
        let crds = schema::crds(&overlay("default").objects);
        let problems = schema::problems(&[policy], &crds);
        assert_found(&problems, &["WaypointPolicy demo/bad", "maxTokens"]);
        assert_found(&problems, &["WaypointPolicy demo/bad", "burst"]);
    }

    #[test]
    fn a_gateway_class_field_the_type_does_not_have() {
        let objects = broken(|o| {
            object(o, "GatewayClass", "ambient-waypoint")["spec"]["controlerName"] = json!("x.example/y");
        });
        assert_found(
            &schema::gateway_class_problems(&objects),
            &["GatewayClass ambient-waypoint", "spec.controlerName"],
        );
    }
}
