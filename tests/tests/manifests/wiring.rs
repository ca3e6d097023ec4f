//! Whether the manifests are wired to what each binary actually does with its configuration:
//! probes, declared ports, Services and the metrics annotation on the ports it listens on; the
//! mesh root, the token, the bpffs and the CNI socket mounted where its flags point; a grace
//! period above its drain; the GatewayClass, Lease and Service the controller names.

use std::path::{Path, PathBuf};

use k8s_openapi::api::core::v1::{Container, Service, ServiceAccount, Volume};
use k8s_openapi::api::rbac::v1::Role;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use serde_json::Value;

use super::drift::Checked;
use super::render::of_kind;

/// ConfigMap istiod publishes in every namespace with the mesh root, and its key.
const ROOT_CERT_CONFIG_MAP: (&str, &str) = ("istio-ca-root-cert", "root-cert.pem");
/// The audience istiod's CA accepts tokens for.
const TOKEN_AUDIENCE: &str = "istio-ca";
/// ztunnel's variable for the socket the CNI plugin connects to.
const ENROLLMENT_SOCKET_ENV: &str = "ENROLLMENT_SOCKET";
/// Kubernetes' default `terminationGracePeriodSeconds`.
const DEFAULT_GRACE_SECONDS: i64 = 30;

/// Every wiring problem of `checked` (the containers of `objects`).
pub fn problems(checked: &[Checked], objects: &[Value]) -> Vec<String> {
    let mut problems = Vec::new();
    for c in checked {
        problems.extend(ports(c));
        problems.extend(mounts(c));
        problems.extend(grace(c));
    }
    problems.extend(metrics_annotations(checked));
    problems.extend(services(checked, objects));
    problems.extend(controller_references(checked, objects));
    problems.extend(cni_socket(checked));
    problems.extend(service_accounts(checked, objects));
    problems
}

/// The number a probe or Service port names in `container` (a number, or a port's name).
fn port_number(container: &Container, port: &IntOrString) -> Option<u16> {
    match port {
        IntOrString::Int(n) => u16::try_from(*n).ok(),
        IntOrString::String(name) => container
            .ports
            .iter()
            .flatten()
            .find(|p| p.name.as_deref() == Some(name.as_str()))
            .and_then(|p| u16::try_from(p.container_port).ok()),
    }
}

fn listening(c: &Checked) -> String {
    let ports: Vec<String> = c.facts.ports.iter().map(|(role, p)| format!("{p} ({role})")).collect();
    if ports.is_empty() { "nothing".into() } else { ports.join(", ") }
}

/// Probes and declared ports against the ports the binary listens on.
fn ports(c: &Checked) -> Vec<String> {
    let mut problems = Vec::new();
    let listens = |port: u16| c.facts.ports.iter().any(|(_, p)| *p == port);
    let probes = [
        ("readinessProbe", &c.container.readiness_probe),
        ("livenessProbe", &c.container.liveness_probe),
        ("startupProbe", &c.container.startup_probe),
    ];
    for (what, probe) in probes {
        let Some(get) = probe.as_ref().and_then(|p| p.http_get.as_ref()) else { continue };
        let port = port_number(&c.container, &get.port);
        let wanted =
            if what == "readinessProbe" { c.facts.readiness_port } else { port.filter(|p| listens(*p)) };
        if port.is_none() || port != wanted {
            let asked = match &get.port {
                IntOrString::Int(n) => n.to_string(),
                IntOrString::String(name) => format!("{name:?}"),
            };
            problems.push(format!(
                "{}: {what} asks port {asked}, but {} listens on {}",
                c.label,
                c.binary.name(),
                listening(c)
            ));
        }
    }
    for declared in c.container.ports.iter().flatten() {
        let Ok(port) = u16::try_from(declared.container_port) else { continue };
        let name = declared.name.as_deref().unwrap_or("");
        let role_port = if name.contains("xds") {
            c.facts.xds_port
        } else if name.contains("metrics") {
            c.facts.metrics_port
        } else {
            Some(port)
        };
        if !listens(port) || role_port != Some(port) {
            problems.push(format!(
                "{}: declares port {port} ({name}), but {} listens on {}",
                c.label,
                c.binary.name(),
                listening(c)
            ));
        }
    }
    let host_network = c.workload.spec.host_network == Some(true);
    if host_network && c.workload.surges && c.container.ports.as_ref().is_some_and(|p| !p.is_empty()) {
        problems.push(format!(
            "{}: declares ports in a hostNetwork pod of a surging DaemonSet: they become host ports, and \
             the scheduler will not place the surge pod beside the old one",
            c.label
        ));
    }
    problems
}

/// `prometheus.io/port` must be the metrics port of a container of the pod.
fn metrics_annotations(checked: &[Checked]) -> Vec<String> {
    let mut problems = Vec::new();
    let mut seen = std::collections::BTreeSet::new();
    for c in checked {
        if !seen.insert(c.workload.name.clone()) {
            continue;
        }
        let Some(port) = c.workload.pod_annotations.get("prometheus.io/port") else { continue };
        let ours = checked
            .iter()
            .filter(|o| o.workload.name == c.workload.name)
            .any(|o| o.facts.metrics_port.map(|p| p.to_string()).as_deref() == Some(port.as_str()));
        if !ours {
            problems.push(format!(
                "{}: prometheus.io/port {port} is not the metrics port of its containers",
                c.workload.name
            ));
        }
    }
    problems
}

/// Each Service port must reach a port its selected containers listen on.
fn services(checked: &[Checked], objects: &[Value]) -> Vec<String> {
    let mut problems = Vec::new();
    for service in of_kind::<Service>(objects, "Service") {
        let ns = service.metadata.namespace.clone().unwrap_or_default();
        let name = format!("Service {ns}/{}", service.metadata.name.clone().unwrap_or_default());
        let spec = service.spec.clone().unwrap_or_default();
        let selector = spec.selector.clone().unwrap_or_default();
        let selected: Vec<&Checked> = checked
            .iter()
            .filter(|c| {
                c.workload.namespace == ns
                    && !selector.is_empty()
                    && selector.iter().all(|(k, v)| c.workload.pod_labels.get(k) == Some(v))
                    && !c.workload.spec.init_containers.iter().flatten().any(|i| i.name == c.container.name)
            })
            .collect();
        if selected.is_empty() {
            problems.push(format!("{name}: selects none of our pods"));
            continue;
        }
        for port in spec.ports.iter().flatten() {
            let target = port.target_port.clone().unwrap_or(IntOrString::Int(port.port));
            let reached = selected.iter().any(|c| {
                port_number(&c.container, &target).is_some_and(|n| c.facts.ports.iter().any(|(_, p)| *p == n))
            });
            if !reached {
                problems.push(format!(
                    "{name}: port {} ({}) targets {target:?}, which no selected container listens on",
                    port.port,
                    port.name.as_deref().unwrap_or("")
                ));
            }
        }
    }
    problems
}

/// The mount of `container` that holds `path`, with the rest of the path below it.
fn mount_of<'a>(c: &'a Checked, path: &Path) -> Option<(&'a Volume, PathBuf, &'a str)> {
    let mount = c
        .container
        .volume_mounts
        .iter()
        .flatten()
        .filter(|m| path.starts_with(&m.mount_path))
        .max_by_key(|m| m.mount_path.len())?;
    let volume = c.workload.spec.volumes.iter().flatten().find(|v| v.name == mount.name)?;
    let rest = path.strip_prefix(&mount.mount_path).ok()?.to_path_buf();
    Some((volume, rest, mount.mount_path.as_str()))
}

/// A hostPath volume mounted at the host's own path.
fn same_host_path(volume: &Volume, mount_path: &str) -> bool {
    volume
        .host_path
        .as_ref()
        .is_some_and(|h| h.path.trim_end_matches('/') == mount_path.trim_end_matches('/'))
}

/// The files and directories the binary's flags name, against the pod's mounts.
fn mounts(c: &Checked) -> Vec<String> {
    let mut problems = Vec::new();
    if let Some(root) = &c.facts.root_cert {
        let (map, key) = ROOT_CERT_CONFIG_MAP;
        let ok = mount_of(c, root).is_some_and(|(volume, rest, _)| {
            volume.config_map.as_ref().is_some_and(|cm| {
                cm.name == map
                    && match &cm.items {
                        Some(items) => items.iter().any(|i| i.key == key && Path::new(&i.path) == rest),
                        None => rest == Path::new(key),
                    }
            })
        });
        if !ok {
            problems.push(format!(
                "{}: the mesh root {} is not the key {key} of ConfigMap {map} mounted there",
                c.label,
                root.display()
            ));
        }
    }
    if let Some(token) = &c.facts.token {
        let ok = mount_of(c, token).is_some_and(|(volume, rest, _)| {
            volume.projected.as_ref().and_then(|p| p.sources.as_ref()).is_some_and(|sources| {
                sources
                    .iter()
                    .filter_map(|s| s.service_account_token.as_ref())
                    .any(|t| t.audience.as_deref() == Some(TOKEN_AUDIENCE) && Path::new(&t.path) == rest)
            })
        });
        if !ok {
            problems.push(format!(
                "{}: the token {} is not a projected service-account token (audience {TOKEN_AUDIENCE}) mounted there",
                c.label,
                token.display()
            ));
        }
    }
    if let Some(pin_dir) = &c.facts.bpf_pin_dir {
        let ok = mount_of(c, pin_dir).is_some_and(|(volume, _, at)| same_host_path(volume, at));
        if !ok {
            problems.push(format!(
                "{}: the capture is pinned in {}, which is not on the node's bpffs (a hostPath mounted at its own path): \
                 the next ztunnel could not adopt it",
                c.label,
                pin_dir.display()
            ));
        }
    }
    if let Some(install) = &c.facts.cni_install {
        for (what, dir) in [("--bin-dir", &install.bin_dir), ("--conf-dir", &install.conf_dir)] {
            let on_host = mount_of(c, dir).is_some_and(|(volume, _, _)| volume.host_path.is_some());
            if !on_host {
                problems.push(format!(
                    "{}: {what} {} is not on a hostPath mount: the node would not see the plugin",
                    c.label,
                    dir.display()
                ));
            }
        }
    }
    problems
}

/// The grace period must outlast the drain, or the kubelet's SIGKILL cuts it short.
fn grace(c: &Checked) -> Vec<String> {
    let Some(drain) = c.facts.drain_seconds else { return Vec::new() };
    let grace = c.workload.spec.termination_grace_period_seconds.unwrap_or(DEFAULT_GRACE_SECONDS);
    if i64::try_from(drain).unwrap_or(i64::MAX) >= grace {
        return vec![format!(
            "{}: drains for {drain}s after SIGTERM, but terminationGracePeriodSeconds is {grace}",
            c.label
        )];
    }
    Vec::new()
}

/// The controller's GatewayClass, Lease and advertised xDS Service must exist as it names them.
fn controller_references(checked: &[Checked], objects: &[Value]) -> Vec<String> {
    let mut problems = Vec::new();
    for c in checked {
        if let Some((class, controller_name)) = &c.facts.gateway_class {
            let found = objects
                .iter()
                .find(|o| o["kind"] == "GatewayClass" && o["metadata"]["name"] == class.as_str());
            match found {
                None => problems.push(format!(
                    "{}: owns GatewayClass {class}, which the manifests do not create",
                    c.label
                )),
                Some(o) if o["spec"]["controllerName"] != controller_name.as_str() => problems.push(format!(
                    "{}: answers to controllerName {controller_name}, GatewayClass {class} names {}",
                    c.label, o["spec"]["controllerName"]
                )),
                Some(_) => {}
            }
        }
        if let Some(lease) = &c.facts.lease_name {
            problems.extend(lease_problems(c, lease, objects));
        }
        if let (Some(address), Some(xds_port)) = (&c.facts.advertised_xds, c.facts.xds_port) {
            problems.extend(advertised_xds_problems(c, address, xds_port, objects));
        }
    }
    problems
}

fn lease_problems(c: &Checked, lease: &str, objects: &[Value]) -> Vec<String> {
    let roles: Vec<Role> = of_kind(objects, "Role");
    let rules: Vec<_> = roles
        .iter()
        .filter(|r| r.metadata.namespace.as_deref() == Some(c.workload.namespace.as_str()))
        .flat_map(|r| r.rules.iter().flatten())
        .filter(|rule| {
            rule.api_groups.iter().flatten().any(|g| g == "coordination.k8s.io")
                && rule.resources.iter().flatten().any(|r| r == "leases")
        })
        .collect();
    let allows = |verb: &str| {
        rules.iter().any(|rule| {
            rule.verbs.iter().any(|v| v == verb || v == "*")
                && rule.resource_names.as_ref().is_none_or(|names| names.iter().any(|n| n == lease))
        })
    };
    let missing: Vec<&str> = ["get", "create", "patch"].into_iter().filter(|v| !allows(v)).collect();
    if missing.is_empty() {
        return Vec::new();
    }
    vec![format!(
        "{}: elects its leader with Lease {}/{lease}, but no Role there allows {} on it",
        c.label,
        c.workload.namespace,
        missing.join(", ")
    )]
}

/// `https://<service>.<namespace>.svc[...]:<port>` must be a Service of ours that reaches the
/// controller's xDS port.
fn advertised_xds_problems(c: &Checked, address: &str, xds_port: u16, objects: &[Value]) -> Vec<String> {
    let parsed = address.strip_prefix("https://").and_then(|rest| {
        let (host, port) = rest.rsplit_once(':')?;
        let mut labels = host.split('.');
        Some((labels.next()?.to_string(), labels.next()?.to_string(), port.parse::<i32>().ok()?))
    });
    let Some((svc, ns, port)) = parsed else {
        return vec![format!(
            "{}: tells waypoints to reach it at {address}, which is not https://<service>.<namespace>.svc:<port>",
            c.label
        )];
    };
    let services: Vec<Service> = of_kind(objects, "Service");
    let found = services.iter().find(|s| {
        s.metadata.name.as_deref() == Some(svc.as_str())
            && s.metadata.namespace.as_deref() == Some(ns.as_str())
    });
    let Some(service) = found else {
        return vec![format!(
            "{}: tells waypoints to reach it at {address}, but there is no Service {ns}/{svc}",
            c.label
        )];
    };
    let spec = service.spec.clone().unwrap_or_default();
    let selects = c.workload.namespace == ns
        && spec
            .selector
            .as_ref()
            .is_some_and(|sel| sel.iter().all(|(k, v)| c.workload.pod_labels.get(k) == Some(v)));
    let reaches = spec.ports.iter().flatten().any(|p| {
        p.port == port
            && port_number(&c.container, p.target_port.as_ref().unwrap_or(&IntOrString::Int(p.port)))
                == Some(xds_port)
    });
    if selects && reaches {
        return Vec::new();
    }
    vec![format!(
        "{}: tells waypoints to reach it at {address}, but Service {ns}/{svc} port {port} does not lead to its xDS port {xds_port}",
        c.label
    )]
}

/// The CNI plugin runs on the host: the socket `ambient-cni install --socket` writes into its
/// configuration must be ztunnel's ENROLLMENT_SOCKET, on a hostPath mounted at its own path.
fn cni_socket(checked: &[Checked]) -> Vec<String> {
    let mut problems = Vec::new();
    for c in checked {
        let Some(install) = &c.facts.cni_install else { continue };
        let ztunnel = checked.iter().find(|z| {
            z.workload.name == c.workload.name && z.env.iter().any(|(k, _)| k == ENROLLMENT_SOCKET_ENV)
        });
        let Some(z) = ztunnel else {
            problems.push(format!(
                "{}: no container of its pod sets {ENROLLMENT_SOCKET_ENV} to serve the plugin",
                c.label
            ));
            continue;
        };
        let served = z.env.iter().find(|(k, _)| k == ENROLLMENT_SOCKET_ENV).map(|(_, v)| PathBuf::from(v));
        if served.as_deref() != Some(install.socket.as_path()) {
            problems.push(format!(
                "{}: tells the plugin to connect to {}, but {} serves {ENROLLMENT_SOCKET_ENV}={served:?}",
                c.label,
                install.socket.display(),
                z.label
            ));
            continue;
        }
        let reachable =
            mount_of(z, &install.socket).is_some_and(|(volume, _, at)| same_host_path(volume, at));
        if !reachable {
            problems.push(format!(
                "{}: {} is not on a hostPath mounted at its own path, so the plugin on the host cannot reach it",
                z.label,
                install.socket.display()
            ));
        }
    }
    problems
}

/// Each workload's service account must be created by the manifests.
fn service_accounts(checked: &[Checked], objects: &[Value]) -> Vec<String> {
    let accounts: Vec<ServiceAccount> = of_kind(objects, "ServiceAccount");
    let mut problems = Vec::new();
    let mut seen = std::collections::BTreeSet::new();
    for c in checked {
        if !seen.insert(c.workload.name.clone()) {
            continue;
        }
        let sa = c.workload.spec.service_account_name.clone().unwrap_or_else(|| "default".into());
        let exists = accounts.iter().any(|a| {
            a.metadata.name.as_deref() == Some(sa.as_str())
                && a.metadata.namespace.as_deref() == Some(c.workload.namespace.as_str())
        });
        if !exists {
            problems.push(format!(
                "{}: runs as ServiceAccount {sa}, which the manifests do not create",
                c.workload.name
            ));
        }
    }
    problems
}
