//! Whether a pod is in the mesh, as Istio decides it: enrolled when the pod is labelled
//! `istio.io/dataplane-mode=ambient`, or its namespace is and the pod does not opt out with
//! `istio.io/dataplane-mode=none`; never a pod with a sidecar (`sidecar.istio.io/status`), one
//! on the host network, or one that has completed (phase `Succeeded` or `Failed`: its
//! containers are done and its address is free for the next pod).

use serde::Serialize;

/// The label (on pods and namespaces) that puts workloads in ambient mode, or takes them out.
pub const DATAPLANE_MODE: &str = "istio.io/dataplane-mode";
/// The annotation injection leaves on pods with a sidecar.
pub const SIDECAR_STATUS: &str = "sidecar.istio.io/status";
/// The annotation by which a pod in the mesh keeps its DNS out of the DNS proxy (value `true`).
pub const BYPASS_DNS_CAPTURE: &str = "ambient.istio.io/bypass-dns-capture";
/// The older spelling of the same opt-out Istio's documentation gives (value `false`).
pub const DNS_CAPTURE: &str = "ambient.istio.io/dns-capture";
/// The label value that enrolls.
pub const AMBIENT: &str = "ambient";
/// The label value that opts a pod out.
pub const NONE: &str = "none";
/// The pod phases after which nothing of the pod runs again.
pub const COMPLETED_PHASES: [&str; 2] = ["Succeeded", "Failed"];

/// The facts of a pod enrollment depends on (all the watch keeps of it).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct PodFacts {
    pub uid: String,
    /// Its `istio.io/dataplane-mode` label.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dataplane_mode: Option<String>,
    /// It carries `sidecar.istio.io/status`.
    pub sidecar: bool,
    pub host_network: bool,
    /// Its addresses (`status.podIPs`), once it has them.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub ips: Vec<std::net::IpAddr>,
    /// Its `status.phase`, once reported.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub phase: Option<String>,
    /// Its DNS stays out of the DNS proxy ([`BYPASS_DNS_CAPTURE`]` = true` or
    /// [`DNS_CAPTURE`]` = false`).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub bypass_dns: bool,
}

/// Whether a pod with these annotations opted out of DNS capture.
pub fn bypasses_dns<'a>(annotation: impl Fn(&str) -> Option<&'a str>) -> bool {
    annotation(BYPASS_DNS_CAPTURE).is_some_and(|v| v.trim().eq_ignore_ascii_case("true"))
        || annotation(DNS_CAPTURE).is_some_and(|v| v.trim().eq_ignore_ascii_case("false"))
}

/// The facts of a namespace enrollment depends on.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct NamespaceFacts {
    /// Its `istio.io/dataplane-mode` label.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dataplane_mode: Option<String>,
}

/// The verdict, with the reason given to the plugin and the logs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    Enroll(&'static str),
    Skip(&'static str),
}

/// Decides for `pod` in a namespace with `namespace`'s facts; `None` when that depends on the
/// namespace and it is not known.
pub fn decide(pod: &PodFacts, namespace: Option<&NamespaceFacts>) -> Option<Decision> {
    if pod.phase.as_deref().is_some_and(|p| COMPLETED_PHASES.contains(&p)) {
        return Some(Decision::Skip("pod has completed (phase Succeeded or Failed)"));
    }
    if pod.host_network {
        return Some(Decision::Skip("pod uses the host network"));
    }
    if pod.sidecar {
        return Some(Decision::Skip("pod has a sidecar (sidecar.istio.io/status)"));
    }
    match pod.dataplane_mode.as_deref() {
        Some(AMBIENT) => return Some(Decision::Enroll("pod labelled istio.io/dataplane-mode=ambient")),
        Some(NONE) => return Some(Decision::Skip("pod opted out (istio.io/dataplane-mode=none)")),
        _ => {}
    }
    let namespace = namespace?;
    Some(match namespace.dataplane_mode.as_deref() {
        Some(AMBIENT) => Decision::Enroll("namespace labelled istio.io/dataplane-mode=ambient"),
        _ => Decision::Skip("neither the pod nor its namespace is labelled istio.io/dataplane-mode=ambient"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(mode: Option<&str>) -> PodFacts {
        PodFacts { dataplane_mode: mode.map(String::from), ..Default::default() }
    }

    fn ns(mode: Option<&str>) -> NamespaceFacts {
        NamespaceFacts { dataplane_mode: mode.map(String::from) }
    }

    fn enrolled(p: &PodFacts, n: Option<&NamespaceFacts>) -> Option<bool> {
        decide(p, n).map(|d| matches!(d, Decision::Enroll(_)))
    }

    #[test]
    fn dns_capture_opt_out() {
        let with = |pairs: &[(&'static str, &'static str)]| {
            let pairs = pairs.to_vec();
            bypasses_dns(move |name| pairs.iter().find(|(k, _)| *k == name).map(|(_, v)| *v))
        };
        assert!(!with(&[]));
        assert!(with(&[(BYPASS_DNS_CAPTURE, "true")]));
        assert!(with(&[(BYPASS_DNS_CAPTURE, "True ")]));
        assert!(!with(&[(BYPASS_DNS_CAPTURE, "false")]));
        assert!(!with(&[(BYPASS_DNS_CAPTURE, "")]), "only an explicit true opts out");
        assert!(with(&[(DNS_CAPTURE, "false")]));
        assert!(!with(&[(DNS_CAPTURE, "true")]));
    }

    #[test]
    fn istio_rules() {
        let ambient_ns = ns(Some("ambient"));
        // The namespace enrolls its pods, except those that opt out.
        assert_eq!(enrolled(&pod(None), Some(&ambient_ns)), Some(true));
        assert_eq!(enrolled(&pod(Some("none")), Some(&ambient_ns)), Some(false));
        // A pod label enrolls on its own, whatever the namespace (known or not).
        assert_eq!(enrolled(&pod(Some("ambient")), Some(&ns(None))), Some(true));
        assert_eq!(enrolled(&pod(Some("ambient")), None), Some(true));
        assert_eq!(enrolled(&pod(Some("none")), None), Some(false));
        // Otherwise the namespace decides, and must be known.
        assert_eq!(enrolled(&pod(None), None), None);
        assert_eq!(enrolled(&pod(None), Some(&ns(None))), Some(false));
        assert_eq!(enrolled(&pod(None), Some(&ns(Some("none")))), Some(false));
        assert_eq!(
            enrolled(&pod(Some("sidecar")), Some(&ambient_ns)),
            Some(true),
            "other values: the namespace decides"
        );
        // Sidecars and host-network pods never.
        let sidecar = PodFacts { sidecar: true, ..pod(Some("ambient")) };
        assert_eq!(enrolled(&sidecar, Some(&ambient_ns)), Some(false));
        let host = PodFacts { host_network: true, ..pod(None) };
        assert_eq!(enrolled(&host, Some(&ambient_ns)), Some(false));
        // Nor a pod that has completed; a running (or pending) one is judged by its labels.
        for (phase, in_mesh) in
            [("Succeeded", false), ("Failed", false), ("Running", true), ("Pending", true)]
        {
            let p = PodFacts { phase: Some(phase.into()), ..pod(Some("ambient")) };
            assert_eq!(enrolled(&p, None), Some(in_mesh), "{phase}");
        }
    }
}
