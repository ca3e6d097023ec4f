//! Schema checks: every object against the Kubernetes API's schemas with Python's
//! kubernetes-validate (strict: unknown fields fail), instances of our CRDs against the CRD's own
//! `openAPIV3Schema` with `jsonschema`, and the GatewayClass (a Gateway API kind the Kubernetes
//! schemas do not have) through the `gateway-api` crate's types.

use std::io::Write;
use std::process::{Command, Stdio};

use serde_json::{Value, json};

use super::render::describe;

/// The Kubernetes version the manifests are checked against (k8s-openapi's feature too).
pub const KUBERNETES_VERSION: &str = "1.33.0";

/// Kinds the Python side leaves to [`gateway_class_problems`].
const CHECKED_IN_RUST: [(&str, &str); 1] = [("gateway.networking.k8s.io/v1", "GatewayClass")];

/// Reads `{"version", "crds", "objects", "elsewhere"}` on stdin and prints a JSON list of
/// problems, one string each. Custom resources are held to Kubernetes' strict field validation
/// (what `kubectl apply` asks for): an object schema that lists its properties admits no others
/// unless it says `x-kubernetes-preserve-unknown-fields`.
const VALIDATOR: &str = r#"
import json, sys
import jsonschema, kubernetes_validate

def strict(schema):
    if isinstance(schema, dict):
        schema = {k: strict(v) for k, v in schema.items()}
        if ("properties" in schema and "additionalProperties" not in schema
                and not schema.get("x-kubernetes-preserve-unknown-fields")):
            schema["additionalProperties"] = False
    elif isinstance(schema, list):
        schema = [strict(v) for v in schema]
    return schema

def where(error):
    return ".".join(str(p) for p in error.absolute_path) or "(top)"

req = json.load(sys.stdin)
custom = {}
for crd in req["crds"]:
    spec = crd["spec"]
    for version in spec["versions"]:
        key = (spec["group"] + "/" + version["name"], spec["names"]["kind"])
        custom[key] = strict(version["schema"]["openAPIV3Schema"])
elsewhere = {tuple(k) for k in req["elsewhere"]}
problems = []
for obj in req["objects"]:
    name = obj["describe"]
    obj = obj["object"]
    key = (obj.get("apiVersion"), obj.get("kind"))
    if key in elsewhere:
        continue
    if key in custom:
        validator = jsonschema.Draft7Validator(custom[key])
        for e in sorted(validator.iter_errors(obj), key=lambda e: list(e.absolute_path)):
            problems.append("%s: %s: %s (CRD schema)" % (name, where(e), e.message))
        continue
    try:
        kubernetes_validate.validate(obj, req["version"], strict=True)
    except kubernetes_validate.ValidationError as e:
        problems.append("%s: %s: %s (Kubernetes %s schema, strict)" % (name, where(e), e.message, req["version"]))
    except kubernetes_validate.SchemaNotFoundError as e:
        problems.append("%s: no schema to validate it against: %s" % (name, e.message))
print(json.dumps(problems))
"#;

/// Problems found by validating `objects` (Kubernetes kinds strictly, instances of `crds` against
/// their schemas). Fails when python3 or kubernetes-validate is missing.
pub fn problems(objects: &[Value], crds: &[Value]) -> Vec<String> {
    let request = json!({
        "version": KUBERNETES_VERSION,
        "crds": crds,
        "objects": objects.iter().map(|o| json!({"describe": describe(o), "object": o})).collect::<Vec<_>>(),
        "elsewhere": CHECKED_IN_RUST,
    });
    let mut child = Command::new("python3")
        .args(["-c", VALIDATOR])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run python3 ({e}): the schema checks need python3 with kubernetes-validate (deploy/setup.sh installs it)"));
    let mut stdin = child.stdin.take().expect("stdin");
    stdin.write_all(request.to_string().as_bytes()).expect("write to python3");
    drop(stdin);
    let out = child.wait_with_output().expect("python3 output");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "the schema validator failed to run (is kubernetes-validate installed? deploy/setup.sh installs it):\n{stderr}"
    );
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("validator output: {e}: {stderr}"))
}

/// The CRDs among `objects`.
pub fn crds(objects: &[Value]) -> Vec<Value> {
    objects.iter().filter(|o| o["kind"] == "CustomResourceDefinition").cloned().collect()
}

/// Problems with the GatewayClasses among `objects`: each must read as the `gateway-api`
/// crate's `GatewayClass` and write back unchanged (a field the type does not know is lost on
/// the way, which is how an unknown field shows), with a domain-prefixed `controllerName`.
pub fn gateway_class_problems(objects: &[Value]) -> Vec<String> {
    use gateway_api::apis::standard::gatewayclasses::GatewayClass;
    let mut problems = Vec::new();
    for object in objects.iter().filter(|o| o["kind"] == "GatewayClass") {
        let name = describe(object);
        if object["apiVersion"] != "gateway.networking.k8s.io/v1" {
            problems.push(format!(
                "{name}: apiVersion {} is not gateway.networking.k8s.io/v1",
                object["apiVersion"]
            ));
            continue;
        }
        let class: GatewayClass = match serde_json::from_value(object.clone()) {
            Ok(c) => c,
            Err(e) => {
                problems.push(format!("{name}: not a GatewayClass: {e}"));
                continue;
            }
        };
        let back = serde_json::to_value(&class).expect("serialize GatewayClass");
        if let Some(path) = first_difference(object, &back, String::new()) {
            problems.push(format!("{name}: {path}: not a field of GatewayClass (or a wrong value)"));
        }
        if !is_domain_prefixed_path(&class.spec.controller_name) {
            problems.push(format!(
                "{name}: spec.controllerName {:?} is not a domain-prefixed path (`example.net/controller`)",
                class.spec.controller_name
            ));
        }
    }
    problems
}

/// The first path where `a` has something `b` has not (or has differently).
fn first_difference(a: &Value, b: &Value, path: String) -> Option<String> {
    match (a, b) {
        (Value::Object(a), Value::Object(b)) => a.iter().find_map(|(k, v)| {
            let here = if path.is_empty() { k.clone() } else { format!("{path}.{k}") };
            match b.get(k) {
                Some(w) => first_difference(v, w, here),
                None => Some(here),
            }
        }),
        (Value::Array(a), Value::Array(b)) if a.len() == b.len() => {
            a.iter().zip(b).enumerate().find_map(|(i, (v, w))| first_difference(v, w, format!("{path}[{i}]")))
        }
        _ if a == b => None,
        _ => Some(if path.is_empty() { "(top)".into() } else { path }),
    }
}

/// `host.domain/path`: a lower-case DNS subdomain, a slash, a non-empty path.
fn is_domain_prefixed_path(s: &str) -> bool {
    let Some((domain, path)) = s.split_once('/') else { return false };
    let label_ok = |l: &str| {
        !l.is_empty()
            && l.len() <= 63
            && l.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
            && !l.starts_with('-')
            && !l.ends_with('-')
    };
    domain.contains('.')
        && domain.split('.').all(label_ok)
        && !path.is_empty()
        && !path.contains(char::is_whitespace)
}
