//! Renders the Kustomize overlays with `kubectl kustomize` (once per test process) and gives the
//! checks typed access to the objects: the workloads with their pod specs, and lookups by kind.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use k8s_openapi::api::apps::v1::{DaemonSet, Deployment};
use k8s_openapi::api::core::v1::PodSpec;
use serde::Deserialize;
use serde_json::Value;

/// The repository's root.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("tests/ has a parent").to_path_buf()
}

/// `deploy/kubernetes/overlays`.
pub fn overlays_dir() -> PathBuf {
    repo_root().join("deploy/kubernetes/overlays")
}

/// One overlay, rendered.
#[derive(Clone, Debug)]
pub struct Rendered {
    /// The overlay's directory name (`default`, `example`, ...).
    pub overlay: String,
    pub objects: Vec<Value>,
}

/// Every overlay under `deploy/kubernetes/overlays`, rendered once per test process.
pub fn overlays() -> &'static [Rendered] {
    static RENDERED: OnceLock<Vec<Rendered>> = OnceLock::new();
    RENDERED.get_or_init(|| {
        let mut dirs: Vec<PathBuf> = std::fs::read_dir(overlays_dir())
            .expect("deploy/kubernetes/overlays")
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.join("kustomization.yaml").is_file())
            .collect();
        dirs.sort();
        assert!(
            dirs.iter().any(|d| d.ends_with("default")) && dirs.len() >= 2,
            "deploy/kubernetes/overlays must hold `default` and at least one example overlay; found {dirs:?}"
        );
        dirs.iter()
            .map(|dir| Rendered {
                overlay: dir.file_name().expect("dir name").to_string_lossy().into_owned(),
                objects: parse_yaml_stream(&kustomize(dir), &dir.display().to_string()),
            })
            .collect()
    })
}

/// The overlay named `name`.
pub fn overlay(name: &str) -> &'static Rendered {
    overlays().iter().find(|r| r.overlay == name).unwrap_or_else(|| panic!("no overlay {name}"))
}

/// `kubectl kustomize <dir>`; fails naming kubectl when it is not installed.
pub fn kustomize(dir: &Path) -> String {
    let out = match Command::new("kubectl").arg("kustomize").arg(dir).output() {
        Ok(out) => out,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => panic!(
            "kubectl is not installed: these checks render deploy/kubernetes with `kubectl kustomize`; \
             install kubectl (it ships Kustomize) and run again"
        ),
        Err(e) => panic!("cannot run kubectl: {e}"),
    };
    assert!(
        out.status.success(),
        "kubectl kustomize {} failed:\n{}",
        dir.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("kustomize output is UTF-8")
}

/// The documents of a YAML stream (empty ones skipped).
pub fn parse_yaml_stream(text: &str, what: &str) -> Vec<Value> {
    serde_yaml_ng::Deserializer::from_str(text)
        .map(|doc| Value::deserialize(doc).unwrap_or_else(|e| panic!("{what}: not YAML: {e}")))
        .filter(|v| !v.is_null())
        .collect()
}

/// `Kind namespace/name` of an object, for messages.
pub fn describe(object: &Value) -> String {
    let kind = object["kind"].as_str().unwrap_or("?");
    let name = object["metadata"]["name"].as_str().unwrap_or("?");
    match object["metadata"]["namespace"].as_str() {
        Some(ns) => format!("{kind} {ns}/{name}"),
        None => format!("{kind} {name}"),
    }
}

/// The objects of `kind` (any API version), deserialized as `T`.
pub fn of_kind<T: serde::de::DeserializeOwned>(objects: &[Value], kind: &str) -> Vec<T> {
    objects
        .iter()
        .filter(|o| o["kind"] == kind)
        .map(|o| {
            serde_json::from_value(o.clone()).unwrap_or_else(|e| panic!("{}: not a {kind}: {e}", describe(o)))
        })
        .collect()
}

/// A workload (Deployment or DaemonSet): its pod template and how it is rolled out.
#[derive(Clone, Debug)]
pub struct Workload {
    /// `Deployment ns/name`.
    pub name: String,
    pub namespace: String,
    pub pod_labels: std::collections::BTreeMap<String, String>,
    pub pod_annotations: std::collections::BTreeMap<String, String>,
    pub spec: PodSpec,
    /// A DaemonSet whose rolling update surges (starts the new pod beside the old one).
    pub surges: bool,
}

/// Every Deployment and DaemonSet of `objects`.
pub fn workloads(objects: &[Value]) -> Vec<Workload> {
    let mut out = Vec::new();
    for d in of_kind::<Deployment>(objects, "Deployment") {
        let spec = d.spec.expect("Deployment spec");
        out.push(workload("Deployment", d.metadata, spec.template, false));
    }
    for d in of_kind::<DaemonSet>(objects, "DaemonSet") {
        let spec = d.spec.expect("DaemonSet spec");
        let surge = spec
            .update_strategy
            .as_ref()
            .and_then(|s| s.rolling_update.as_ref())
            .and_then(|r| r.max_surge.as_ref());
        let surges = match surge {
            Some(k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(n)) => *n > 0,
            Some(k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::String(s)) => {
                s != "0" && s != "0%"
            }
            None => false,
        };
        out.push(workload("DaemonSet", d.metadata, spec.template, surges));
    }
    out
}

fn workload(
    kind: &str,
    meta: k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta,
    template: k8s_openapi::api::core::v1::PodTemplateSpec,
    surges: bool,
) -> Workload {
    let namespace = meta.namespace.unwrap_or_default();
    let name = format!("{kind} {namespace}/{}", meta.name.unwrap_or_default());
    let pod_meta = template.metadata.unwrap_or_default();
    Workload {
        spec: template.spec.unwrap_or_else(|| panic!("{name}: no pod spec")),
        name,
        namespace,
        pod_labels: pod_meta.labels.unwrap_or_default(),
        pod_annotations: pod_meta.annotations.unwrap_or_default(),
        surges,
    }
}
