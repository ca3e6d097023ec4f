//! Defaulting the real API server does and the controller relies on: a Service's cluster IP (and
//! its type, ports and IP families), a Namespace's name label and phase.

use std::net::Ipv4Addr;

use serde_json::{Value, json};

use super::error::ApiError;
use super::registry::ResourceType;

/// The first address handed out; the range is 10.96.0.0/12.
const FIRST_CLUSTER_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
const LAST_CLUSTER_IP: Ipv4Addr = Ipv4Addr::new(10, 111, 255, 254);

/// Hands out cluster IPs in order, skipping addresses in use.
#[derive(Debug)]
pub(crate) struct ClusterIps {
    next: u32,
}

impl ClusterIps {
    pub fn new() -> Self {
        Self { next: u32::from(FIRST_CLUSTER_IP) }
    }

    fn allocate(&mut self, in_use: &[String]) -> Option<String> {
        while self.next <= u32::from(LAST_CLUSTER_IP) {
            let ip = Ipv4Addr::from(self.next).to_string();
            self.next += 1;
            if !in_use.contains(&ip) {
                return Some(ip);
            }
        }
        None
    }
}

/// Fills in server-side defaults on `new` (the object about to be stored; `old` is the stored one
/// on updates). `in_use` lists the cluster IPs of the other Services.
pub(crate) fn apply(
    res: &ResourceType,
    new: &mut Value,
    old: Option<&Value>,
    ips: &mut ClusterIps,
    in_use: impl FnOnce() -> Vec<String>,
) -> Result<(), ApiError> {
    match (res.group.as_str(), res.plural.as_str()) {
        ("", "services") => service(res, new, old, ips, in_use),
        ("", "namespaces") => {
            namespace(new);
            Ok(())
        }
        _ => Ok(()),
    }
}

fn namespace(new: &mut Value) {
    let name = new["metadata"]["name"].clone();
    new["metadata"]["labels"]["kubernetes.io/metadata.name"] = name;
    let status_ok = new.get("status").is_none_or(|s| s.is_object() || s.is_null());
    if status_ok && new["status"]["phase"].is_null() {
        new["status"]["phase"] = json!("Active");
    }
}

fn service(
    res: &ResourceType,
    new: &mut Value,
    old: Option<&Value>,
    ips: &mut ClusterIps,
    in_use: impl FnOnce() -> Vec<String>,
) -> Result<(), ApiError> {
    let name = new["metadata"]["name"].as_str().unwrap_or_default().to_string();
    if !new.get("spec").is_none_or(Value::is_object) {
        return Err(ApiError::invalid(res, &name, "spec: must be an object"));
    }
    let spec = &mut new["spec"];
    if spec["type"].is_null() {
        spec["type"] = json!("ClusterIP");
    }
    if let Some(ports) = spec.get_mut("ports").and_then(Value::as_array_mut) {
        for port in ports.iter_mut().filter(|p| p.is_object()) {
            if port["protocol"].is_null() {
                port["protocol"] = json!("TCP");
            }
            if port["targetPort"].is_null() {
                port["targetPort"] = port["port"].clone();
            }
        }
    }
    if spec["type"] == "ExternalName" {
        return Ok(());
    }
    let old_ip = old.and_then(|o| o["spec"]["clusterIP"].as_str()).filter(|ip| !ip.is_empty());
    let given = spec["clusterIP"].as_str().filter(|ip| !ip.is_empty()).map(str::to_string);
    let ip = match (given, old_ip) {
        (Some(given), Some(old_ip)) if given != old_ip => {
            return Err(ApiError::invalid(
                res,
                &name,
                format!("spec.clusterIPs[0]: Invalid value: {given:?}: may not change once set"),
            ));
        }
        (Some(given), _) => given,
        (None, Some(old_ip)) => old_ip.to_string(),
        (None, None) => ips
            .allocate(&in_use())
            .ok_or_else(|| ApiError::internal("the cluster IP range 10.96.0.0/12 is exhausted"))?,
    };
    spec["clusterIP"] = json!(ip);
    if spec["clusterIPs"].as_array().is_none_or(Vec::is_empty) || spec["clusterIPs"][0] != json!(ip) {
        spec["clusterIPs"] = json!([ip]);
    }
    if spec["ipFamilies"].is_null() && ip != "None" {
        spec["ipFamilies"] = json!(["IPv4"]);
    }
    if spec["ipFamilyPolicy"].is_null() {
        spec["ipFamilyPolicy"] = json!("SingleStack");
    }
    if spec["sessionAffinity"].is_null() {
        spec["sessionAffinity"] = json!("None");
    }
    if spec["internalTrafficPolicy"].is_null() {
        spec["internalTrafficPolicy"] = json!("Cluster");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn svc() -> ResourceType {
        ResourceType::namespaced("v1", "Service", "services")
    }

    #[test]
    fn cluster_ips_are_sequential_and_kept() {
        let mut ips = ClusterIps::new();
        let mut a = json!({ "metadata": { "name": "a" }, "spec": { "ports": [{ "port": 80 }] } });
        apply(&svc(), &mut a, None, &mut ips, Vec::new).unwrap();
        assert_eq!(a["spec"]["clusterIP"], "10.96.0.10");
        assert_eq!(a["spec"]["clusterIPs"], json!(["10.96.0.10"]));
        assert_eq!(a["spec"]["ports"][0], json!({ "port": 80, "protocol": "TCP", "targetPort": 80 }));

        let mut b = json!({ "metadata": { "name": "b" }, "spec": {} });
        apply(&svc(), &mut b, None, &mut ips, || vec!["10.96.0.11".into()]).unwrap();
        assert_eq!(b["spec"]["clusterIP"], "10.96.0.12");

        let mut headless = json!({ "metadata": { "name": "h" }, "spec": { "clusterIP": "None" } });
        apply(&svc(), &mut headless, None, &mut ips, Vec::new).unwrap();
        assert_eq!(headless["spec"]["clusterIPs"], json!(["None"]));

        // An update without the address keeps it; one changing it is refused.
        let mut update = json!({ "metadata": { "name": "a" }, "spec": {} });
        apply(&svc(), &mut update, Some(&a), &mut ips, Vec::new).unwrap();
        assert_eq!(update["spec"]["clusterIP"], "10.96.0.10");
        let mut change = json!({ "metadata": { "name": "a" }, "spec": { "clusterIP": "10.96.9.9" } });
        assert_eq!(apply(&svc(), &mut change, Some(&a), &mut ips, Vec::new).unwrap_err().code, 422);
    }
}
