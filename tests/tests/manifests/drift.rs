//! Drift between the manifests and the binaries' flags: every container's flags and environment
//! variable names must be ones its binary accepts, and their values must parse as the binary
//! parses them. What each container's binary then makes of its configuration (its ports and
//! files) goes on to the wiring checks.

use k8s_openapi::api::core::v1::{ConfigMap, Container};
use serde_json::Value;

use super::binaries::{self, Binary, Facts};
use super::render::{Workload, of_kind, workloads};

/// A container of ours, with what its binary makes of its configuration.
#[derive(Debug)]
pub struct Checked {
    /// `DaemonSet ambient-system/ztunnel, container ztunnel`.
    pub label: String,
    pub workload: Workload,
    pub container: Container,
    pub binary: Binary,
    /// Its environment, values resolved.
    pub env: Vec<(String, String)>,
    pub facts: Facts,
}

/// Checks the flags and environment of every container of every workload in `objects`.
/// Returns the containers whose configuration the binary accepts, and the problems.
pub fn check(objects: &[Value]) -> (Vec<Checked>, Vec<String>) {
    let config_maps: Vec<ConfigMap> = of_kind(objects, "ConfigMap");
    let mut checked = Vec::new();
    let mut problems = Vec::new();
    for workload in workloads(objects) {
        let init = workload.spec.init_containers.clone().unwrap_or_default();
        for container in init.into_iter().chain(workload.spec.containers.clone()) {
            let label = format!("{}, container {}", workload.name, container.name);
            match check_container(&workload, &container, &config_maps) {
                Ok(Accepted { binary, env, facts }) => {
                    checked.push(Checked { label, workload: workload.clone(), container, binary, env, facts })
                }
                Err(errors) => problems.extend(errors.into_iter().map(|e| format!("{label}: {e}"))),
            }
        }
    }
    (checked, problems)
}

fn check_container(
    workload: &Workload,
    container: &Container,
    config_maps: &[ConfigMap],
) -> Result<Accepted, Vec<String>> {
    let image = container.image.as_deref().ok_or_else(|| vec!["no image".to_string()])?;
    let binary = Binary::of(image, container.command.as_deref()).map_err(|e| vec![e])?;
    let cmd = binary.command();
    let mut tokens: Vec<String> = container.command.iter().flatten().skip(1).cloned().collect();
    tokens.extend(container.args.iter().flatten().cloned());

    let mut problems: Vec<String> = binaries::unknown_flags(&cmd, &tokens)
        .into_iter()
        .map(|flag| format!("{} has no flag {flag}", binary.name()))
        .collect();
    if container.env_from.is_some() {
        problems.push("envFrom hides which variables it sets from these checks: list them under env".into());
    }
    let mut env = Vec::new();
    for var in container.env.iter().flatten() {
        if !binary.reads_env(&var.name) {
            problems.push(format!("{} reads no environment variable {}", binary.name(), var.name));
            continue;
        }
        match resolve(workload, var, config_maps) {
            Ok(value) => env.push((var.name.clone(), value)),
            Err(e) => problems.push(format!("env {}: {e}", var.name)),
        }
    }
    // The values of the variables it knows are checked even when some of their names are wrong
    // (not when a flag is: the command line they are checked with would not parse).
    if problems.iter().any(|p| p.contains(" has no flag ")) {
        return Err(problems);
    }
    let argv = match binaries::command_line(binary, &tokens, &env) {
        Ok(argv) => argv,
        Err(errors) => {
            problems.extend(errors);
            return Err(problems);
        }
    };
    if !problems.is_empty() {
        return Err(problems);
    }
    let facts =
        binary.facts(&argv).map_err(|e| vec![format!("{} refuses its configuration: {e}", binary.name())])?;
    Ok(Accepted { binary, env, facts })
}

/// A container whose configuration its binary accepts.
struct Accepted {
    binary: Binary,
    env: Vec<(String, String)>,
    facts: Facts,
}

/// The value a variable has in the pod: literal, from a ConfigMap of the manifests, or a
/// stand-in of the right shape for a downward-API field.
fn resolve(
    workload: &Workload,
    var: &k8s_openapi::api::core::v1::EnvVar,
    config_maps: &[ConfigMap],
) -> Result<String, String> {
    if let Some(value) = &var.value {
        return Ok(value.clone());
    }
    let Some(from) = &var.value_from else { return Ok(String::new()) };
    if let Some(field) = &from.field_ref {
        return match field.field_path.as_str() {
            "metadata.name" => Ok("pod-0".into()),
            "metadata.namespace" => Ok(workload.namespace.clone()),
            "spec.nodeName" => Ok("node-0".into()),
            "spec.serviceAccountName" => {
                Ok(workload.spec.service_account_name.clone().unwrap_or_else(|| "default".into()))
            }
            "status.podIP" | "status.hostIP" => Ok("10.0.0.1".into()),
            other => Err(format!("downward-API field {other} has no stand-in value in this check")),
        };
    }
    if let Some(key_ref) = &from.config_map_key_ref {
        let map = config_maps.iter().find(|m| {
            m.metadata.name.as_deref() == Some(key_ref.name.as_str())
                && m.metadata.namespace.as_deref() == Some(workload.namespace.as_str())
        });
        let Some(map) = map else {
            return Err(format!("ConfigMap {} is not in the manifests", key_ref.name));
        };
        return map
            .data
            .as_ref()
            .and_then(|d| d.get(&key_ref.key))
            .cloned()
            .ok_or_else(|| format!("ConfigMap {} has no key {}", key_ref.name, key_ref.key));
    }
    Err("only literal values, fieldRef and configMapKeyRef can be checked".into())
}
