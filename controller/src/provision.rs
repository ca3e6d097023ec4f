//! What a waypoint Gateway of our class is deployed as, all owned by the Gateway (so deleting
//! it deletes them): a ServiceAccount named after it (its SPIFFE identity), a Deployment of
//! the waypoint image, a Service (15008 HBONE and 15021 status, labelled with the standard
//! `gateway.networking.k8s.io/gateway-name`), and a PodDisruptionBudget. Written with
//! server-side apply under our field manager, so re-applying the same desire changes nothing
//! and fields other managers own (an HPA's `replicas`) are left alone.
//!
//! Customization, as Istio's own deployment controller does it: `spec.infrastructure.labels`
//! and `annotations` go on every object; `spec.infrastructure.parametersRef` names a ConfigMap
//! in the Gateway's namespace whose keys `deployment`, `service` and `podDisruptionBudget` hold
//! YAML merged over the generated objects (maps merged, lists and values replaced), and
//! `resources` the waypoint container's resources. Only the fields of [`ALLOWED`] may be set
//! that way: whoever may write a Gateway and a ConfigMap must not get to choose the waypoint's
//! image, service account, security context, volumes or selector through us.

use std::collections::BTreeMap;

use serde_json::{Value, json};

use crate::config::Config;

pub const GATEWAY_NAME_LABEL: &str = "gateway.networking.k8s.io/gateway-name";
pub const MANAGED_BY_LABEL: &str = "gateway.istio.io/managed";
/// Our field manager for server-side apply.
pub const FIELD_MANAGER: &str = "ambient-controller";
/// The waypoint's in-pod paths for the mesh root and the CA token.
const ROOT_CERT_DIR: &str = "/var/run/secrets/istio";
const TOKEN_DIR: &str = "/var/run/secrets/tokens";

/// One object to apply.
#[derive(Clone, Debug, PartialEq)]
pub struct Desired {
    /// `ServiceAccount`, `Deployment`, `Service` or `PodDisruptionBudget`.
    pub kind: &'static str,
    pub name: String,
    pub namespace: String,
    pub body: Value,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ProvisionError {
    #[error("the Gateway has no name, namespace or uid")]
    Incomplete,
    #[error("parametersRef: {0}")]
    Parameters(String),
}

/// What a `parametersRef` ConfigMap may set, per key: JSON pointers a value may sit at or under.
pub const ALLOWED: &[(&str, &[&str])] = &[
    (
        "deployment",
        &[
            "/metadata/labels",
            "/metadata/annotations",
            "/spec/replicas",
            "/spec/strategy",
            "/spec/minReadySeconds",
            "/spec/template/metadata/labels",
            "/spec/template/metadata/annotations",
            "/spec/template/spec/nodeSelector",
            "/spec/template/spec/tolerations",
            "/spec/template/spec/affinity",
            "/spec/template/spec/topologySpreadConstraints",
            "/spec/template/spec/priorityClassName",
            "/spec/template/spec/terminationGracePeriodSeconds",
        ],
    ),
    (
        "service",
        &[
            "/metadata/labels",
            "/metadata/annotations",
            "/spec/type",
            "/spec/externalTrafficPolicy",
            "/spec/internalTrafficPolicy",
            "/spec/loadBalancerClass",
            "/spec/loadBalancerSourceRanges",
            "/spec/ipFamilyPolicy",
            "/spec/ipFamilies",
        ],
    ),
    (
        "podDisruptionBudget",
        &[
            "/metadata/labels",
            "/metadata/annotations",
            "/spec/minAvailable",
            "/spec/maxUnavailable",
            "/spec/unhealthyPodEvictionPolicy",
        ],
    ),
    ("resources", &[""]),
];

/// The first field of `v` (a `key` override) outside what [`ALLOWED`] lets it set.
fn disallowed(key: &str, v: &Value) -> Option<String> {
    let allowed = ALLOWED.iter().find(|(k, _)| *k == key)?.1;
    fn walk(v: &Value, path: &str, allowed: &[&str]) -> Option<String> {
        if allowed.contains(&path) {
            return None;
        }
        match v.as_object() {
            Some(o) if allowed.iter().any(|a| a.starts_with(&format!("{path}/"))) || path.is_empty() => {
                o.iter().find_map(|(k, child)| walk(child, &format!("{path}/{k}"), allowed))
            }
            _ => Some(if path.is_empty() { "/".into() } else { path.to_string() }),
        }
    }
    walk(v, "", allowed)
}

/// The parameters a Gateway's `parametersRef` points at, when it does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Parameters<'a> {
    None,
    /// The ConfigMap's `data`.
    ConfigMap(&'a BTreeMap<String, String>),
    /// Named but not found (or not a ConfigMap): the Gateway is not programmed.
    Missing,
}

/// Which ConfigMap a Gateway's `spec.infrastructure.parametersRef` names, if any.
pub fn parameters_ref(gateway: &Value) -> Result<Option<String>, ProvisionError> {
    let Some(r) = gateway.pointer("/spec/infrastructure/parametersRef") else { return Ok(None) };
    let group = r.get("group").and_then(Value::as_str).unwrap_or_default();
    let kind = r.get("kind").and_then(Value::as_str).unwrap_or_default();
    let name = r.get("name").and_then(Value::as_str).unwrap_or_default();
    if !group.is_empty() || kind != "ConfigMap" || name.is_empty() {
        return Err(ProvisionError::Parameters(format!(
            "only a ConfigMap in the Gateway's namespace is supported (got group {group:?}, kind {kind:?})"
        )));
    }
    Ok(Some(name.to_string()))
}

/// The objects that deploy `gateway` (a Gateway of our class).
pub fn desired(
    gateway: &Value,
    config: &Config,
    params: Parameters<'_>,
) -> Result<Vec<Desired>, ProvisionError> {
    let meta = gateway.get("metadata").ok_or(ProvisionError::Incomplete)?;
    let text = |k: &str| meta.get(k).and_then(Value::as_str).filter(|s| !s.is_empty());
    let (Some(name), Some(ns), Some(uid)) = (text("name"), text("namespace"), text("uid")) else {
        return Err(ProvisionError::Incomplete);
    };
    let overrides = match params {
        Parameters::None => BTreeMap::new(),
        Parameters::Missing => {
            return Err(ProvisionError::Parameters("the ConfigMap it names does not exist".into()));
        }
        Parameters::ConfigMap(data) => {
            let mut out = BTreeMap::new();
            for (key, text) in data {
                if !ALLOWED.iter().any(|(k, _)| k == key) {
                    return Err(ProvisionError::Parameters(format!(
                        "unknown key {key:?} (deployment, service, podDisruptionBudget, resources)"
                    )));
                }
                let v: Value = serde_yaml_ng::from_str(text)
                    .map_err(|e| ProvisionError::Parameters(format!("{key}: not YAML: {e}")))?;
                if !v.is_object() {
                    return Err(ProvisionError::Parameters(format!("{key}: must be an object")));
                }
                if let Some(field) = disallowed(key, &v) {
                    return Err(ProvisionError::Parameters(format!(
                        "{key}: {field} may not be set through parametersRef"
                    )));
                }
                out.insert(key.clone(), v);
            }
            out
        }
    };
    let infra_labels = gateway.pointer("/spec/infrastructure/labels").cloned().unwrap_or(json!({}));
    let infra_annotations = gateway.pointer("/spec/infrastructure/annotations").cloned().unwrap_or(json!({}));
    let mut labels = infra_labels.as_object().cloned().unwrap_or_default();
    labels.insert(GATEWAY_NAME_LABEL.into(), json!(name));
    labels.insert(MANAGED_BY_LABEL.into(), json!("ambient-controller"));
    let metadata = |kind: &str| {
        json!({
            "name": name,
            "namespace": ns,
            "labels": labels,
            "annotations": infra_annotations,
            "ownerReferences": [{
                "apiVersion": "gateway.networking.k8s.io/v1",
                "kind": "Gateway",
                "name": name,
                "uid": uid,
                "controller": true,
                "blockOwnerDeletion": kind != "ServiceAccount",
            }],
        })
    };
    let selector = json!({ GATEWAY_NAME_LABEL: name });
    let mut pod_labels = labels.clone();
    // The waypoint speaks HBONE itself: its pods are never captured by a ztunnel, and never
    // get a sidecar (a namespace migrating from sidecars may still have injection on).
    pod_labels.insert("istio.io/dataplane-mode".into(), json!("none"));
    pod_labels.insert("sidecar.istio.io/inject".into(), json!("false"));
    let mut pod_annotations = infra_annotations.as_object().cloned().unwrap_or_default();
    pod_annotations.insert("sidecar.istio.io/inject".into(), json!("false"));
    let field = |path: &str| json!({"valueFrom": {"fieldRef": {"fieldPath": path}}});
    let env = json!([
        {"name": "WAYPOINT_NAME", "value": name},
        {"name": "POD_NAMESPACE", "value": ns},
        {"name": "SERVICE_ACCOUNT", "value": name},
        {"name": "TRUST_DOMAIN", "value": config.trust_domain},
        merge_name("INSTANCE_IP", field("status.podIP")),
        merge_name("NODE_NAME", field("spec.nodeName")),
        {"name": "XDS_ADDRESS", "value": config.waypoint_xds_address},
        {"name": "XDS_SERVER_IDENTITY", "value": config.identity.to_string()},
        {"name": "XDS_ROOT_CA", "value": format!("{ROOT_CERT_DIR}/root-cert.pem")},
        {"name": "CA_ADDRESS", "value": config.waypoint_ca_address},
        {"name": "XDS_TOKEN_PATH", "value": format!("{TOKEN_DIR}/istio-token")},
    ]);
    let deployment = json!({
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": metadata("Deployment"),
        "spec": {
            "selector": {"matchLabels": selector},
            "template": {
                "metadata": {"labels": pod_labels, "annotations": pod_annotations},
                "spec": {
                    "serviceAccountName": name,
                    // The waypoint never talks to the API server.
                    "automountServiceAccountToken": false,
                    "terminationGracePeriodSeconds": 30,
                    "securityContext": {
                        "runAsNonRoot": true, "runAsUser": 65532, "runAsGroup": 65532,
                        "seccompProfile": {"type": "RuntimeDefault"},
                    },
                    "containers": [{
                        "name": "waypoint",
                        "image": config.waypoint_image,
                        "env": env,
                        "ports": [
                            {"name": "mesh", "containerPort": 15008, "protocol": "TCP"},
                            {"name": "metrics", "containerPort": 15020, "protocol": "TCP"},
                            {"name": "status-port", "containerPort": 15021, "protocol": "TCP"},
                        ],
                        "readinessProbe": {
                            "httpGet": {"path": "/healthz/ready", "port": 15021},
                            "periodSeconds": 2, "failureThreshold": 3,
                        },
                        "resources": {"requests": {"cpu": "100m", "memory": "128Mi"}, "limits": {"memory": "1Gi"}},
                        "securityContext": {
                            "allowPrivilegeEscalation": false,
                            "readOnlyRootFilesystem": true,
                            "capabilities": {"drop": ["ALL"]},
                        },
                        "volumeMounts": [
                            {"name": "istiod-ca-cert", "mountPath": ROOT_CERT_DIR, "readOnly": true},
                            {"name": "istio-token", "mountPath": TOKEN_DIR, "readOnly": true},
                        ],
                    }],
                    "volumes": [
                        {"name": "istiod-ca-cert", "configMap": {"name": "istio-ca-root-cert"}},
                        {"name": "istio-token", "projected": {"sources": [{"serviceAccountToken": {
                            "audience": "istio-ca", "expirationSeconds": 43200, "path": "istio-token"}}]}},
                    ],
                },
            },
        },
    });
    let service = json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": metadata("Service"),
        "spec": {
            "type": "ClusterIP",
            "selector": selector,
            "ports": [
                {"name": "mesh", "port": 15008, "targetPort": 15008, "protocol": "TCP", "appProtocol": "all"},
                {"name": "status-port", "port": 15021, "targetPort": 15021, "protocol": "TCP"},
            ],
        },
    });
    let pdb = json!({
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": metadata("PodDisruptionBudget"),
        // One at a time: a drain never takes every replica, and a single replica can still move.
        "spec": {"selector": {"matchLabels": selector}, "maxUnavailable": 1},
    });
    let sa = json!({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": metadata("ServiceAccount")});
    let with = |key: &str, mut body: Value| {
        if let Some(o) = overrides.get(key) {
            merge(&mut body, o);
        }
        body
    };
    let mut deployment = with("deployment", deployment);
    if let Some(r) = overrides.get("resources") {
        deployment["spec"]["template"]["spec"]["containers"][0]["resources"] = r.clone();
    }
    // What ties the pods to their Deployment, Service and identity stays ours.
    if let Some(l) = deployment.pointer_mut("/spec/template/metadata/labels").and_then(Value::as_object_mut) {
        l.insert(GATEWAY_NAME_LABEL.into(), json!(name));
        l.insert("istio.io/dataplane-mode".into(), json!("none"));
        l.insert("sidecar.istio.io/inject".into(), json!("false"));
    }
    let one = |kind: &'static str, body: Value| Desired {
        kind,
        name: name.to_string(),
        namespace: ns.to_string(),
        body,
    };
    Ok(vec![
        one("ServiceAccount", sa),
        one("Deployment", deployment),
        one("Service", with("service", service)),
        one("PodDisruptionBudget", with("podDisruptionBudget", pdb)),
    ])
}

fn merge_name(name: &str, mut v: Value) -> Value {
    if let Some(o) = v.as_object_mut() {
        o.insert("name".into(), json!(name));
    }
    v
}

/// Merges `over` into `base`: maps recursively, everything else replaced. Identity fields
/// (apiVersion, kind, name, namespace, owner) are not overridable.
fn merge(base: &mut Value, over: &Value) {
    fn go(base: &mut Value, over: &Value, path: &str) {
        match (base, over) {
            (Value::Object(b), Value::Object(o)) => {
                for (k, v) in o {
                    let here = format!("{path}/{k}");
                    if matches!(
                        here.as_str(),
                        "/apiVersion"
                            | "/kind"
                            | "/metadata/name"
                            | "/metadata/namespace"
                            | "/metadata/ownerReferences"
                    ) {
                        continue;
                    }
                    match b.get_mut(k) {
                        Some(existing) => go(existing, v, &here),
                        None => {
                            b.insert(k.clone(), v.clone());
                        }
                    }
                }
            }
            (b, o) => *b = o.clone(),
        }
    }
    go(base, over, "");
}

#[cfg(test)]
mod tests;
