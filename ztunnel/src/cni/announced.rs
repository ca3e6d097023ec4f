//! The pods the CNI plugin announced at creation and ztunnel enrolled: kept enrolled whether or
//! not xDS knows their workload yet, until DEL, their deletion in the watch, or labels that
//! take them out of the mesh (or completion). Bounded; an address belongs to the pod announced
//! last with it (an address reused before an older pod's DEL arrived moves to the new pod).
//! Kept across ztunnel restarts in a file (`super::persisted`).

use std::collections::BTreeMap;
use std::net::IpAddr;

use serde::{Deserialize, Serialize};

use super::pods::PodKey;

/// Most pods announced at once (far above what a node runs).
pub const MAX_ANNOUNCED: usize = 1024;
/// The sandbox id recorded for a pod re-announced from the watch after a restart (the watch
/// does not tell the sandbox): its DEL is matched by the pod's uid and addresses instead.
pub const FROM_WATCH: &str = "(from the watch)";

/// One announced pod.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AnnouncedPod {
    pub pod: PodKey,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uid: Option<String>,
    /// The sandbox the plugin was called for ([`FROM_WATCH`] when re-announced from the watch).
    pub container_id: String,
    pub ips: Vec<IpAddr>,
    /// The host side of its veth, where capture is attached.
    pub interface: String,
    /// When it was announced (seconds since the Unix epoch).
    pub since_unix_s: u64,
    /// Its DNS is not handed to the DNS proxy (`ambient.istio.io/bypass-dns-capture`), as its
    /// annotations said when it was announced.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub bypass_dns: bool,
}

/// Which announcement a withdrawal is about.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Which {
    /// Whatever is announced for the pod.
    Any,
    /// Only the announcement of this sandbox (a DEL for an older sandbox leaves a newer one).
    Sandbox(String),
    /// Only the announcement of the pod with this uid (a deletion seen in the watch).
    Uid(String),
    /// What a DEL names: the announcement of its sandbox, or one re-announced from the watch
    /// ([`FROM_WATCH`], no sandbox known) that has one of the DEL's addresses and, when both
    /// are known, its uid. The address is required even with a uid: a late DEL of an older
    /// sandbox of the same pod carries the same uid, but not the current sandbox's addresses.
    Del { sandbox: String, uid: Option<String>, ips: Vec<IpAddr> },
}

impl Which {
    fn matches(&self, current: &AnnouncedPod) -> bool {
        match self {
            Which::Any => true,
            Which::Sandbox(id) => current.container_id == *id,
            Which::Uid(uid) => current.uid.as_deref().is_none_or(|u| u == uid),
            Which::Del { sandbox, uid, ips } => {
                current.container_id == *sandbox
                    || (current.container_id == FROM_WATCH
                        && current.ips.iter().any(|ip| ips.contains(ip))
                        && match (uid, &current.uid) {
                            (Some(asked), Some(known)) => asked == known,
                            _ => true,
                        })
            }
        }
    }
}

/// The registry was full.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{0} pods are already announced on this node")]
pub struct Full(pub usize);

#[derive(Clone, Debug, Default)]
pub struct Announced {
    pods: BTreeMap<PodKey, AnnouncedPod>,
}

impl Announced {
    /// Adds or replaces the pod's announcement (returning the one replaced); its addresses
    /// are taken from other pods.
    pub fn insert(&mut self, pod: AnnouncedPod) -> Result<Option<AnnouncedPod>, Full> {
        if self.pods.len() >= MAX_ANNOUNCED && !self.pods.contains_key(&pod.pod) {
            return Err(Full(self.pods.len()));
        }
        for other in self.pods.values_mut().filter(|o| o.pod != pod.pod) {
            other.ips.retain(|ip| !pod.ips.contains(ip));
        }
        self.pods.retain(|_, o| !o.ips.is_empty());
        Ok(self.pods.insert(pod.pod.clone(), pod))
    }

    /// Whether nothing is announced for the pod nor for any of its addresses: what
    /// re-announcing after a restart requires, so that it never replaces (or takes addresses
    /// from) an announcement made meanwhile.
    pub fn is_absent(&self, pod: &AnnouncedPod) -> bool {
        !self.pods.contains_key(&pod.pod)
            && !self.pods.values().any(|o| o.ips.iter().any(|ip| pod.ips.contains(ip)))
    }

    /// Removes the pod's announcement if it is `which`.
    pub fn remove(&mut self, key: &PodKey, which: &Which) -> Option<AnnouncedPod> {
        let current = self.pods.get(key)?;
        if which.matches(current) { self.pods.remove(key) } else { None }
    }

    pub fn get(&self, key: &PodKey) -> Option<&AnnouncedPod> {
        self.pods.get(key)
    }

    /// Every announced address with its interface.
    pub fn addresses(&self) -> impl Iterator<Item = (IpAddr, &str)> + '_ {
        self.pods.values().flat_map(|p| p.ips.iter().map(|ip| (*ip, p.interface.as_str())))
    }

    /// The addresses of the announced pods that bypass DNS capture.
    pub fn dns_bypass(&self) -> std::collections::BTreeSet<IpAddr> {
        self.pods.values().filter(|p| p.bypass_dns).flat_map(|p| p.ips.iter().copied()).collect()
    }

    pub fn list(&self) -> Vec<AnnouncedPod> {
        self.pods.values().cloned().collect()
    }

    pub fn len(&self) -> usize {
        self.pods.len()
    }

    pub fn is_empty(&self) -> bool {
        self.pods.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(name: &str, container: &str, ips: &[&str]) -> AnnouncedPod {
        AnnouncedPod {
            pod: PodKey::new("demo", name),
            uid: Some(format!("uid-{name}")),
            container_id: container.into(),
            ips: ips.iter().map(|ip| ip.parse().expect("ip")).collect(),
            interface: format!("veth-{name}"),
            since_unix_s: 0,
            bypass_dns: false,
        }
    }

    #[test]
    fn sandboxes_and_reused_addresses() {
        let mut a = Announced::default();
        a.insert(pod("a", "c1", &["10.0.0.2", "fd00::2"])).expect("room");
        a.insert(pod("b", "c2", &["10.0.0.3"])).expect("room");
        // A DEL for an older sandbox of `a` leaves the current one.
        assert!(a.remove(&PodKey::new("demo", "a"), &Which::Sandbox("c0".into())).is_none());
        // `c` got `b`'s address (b's DEL never came): b has nothing left and goes.
        a.insert(pod("c", "c3", &["10.0.0.3"])).expect("room");
        assert!(a.get(&PodKey::new("demo", "b")).is_none());
        assert_eq!(a.addresses().filter(|(ip, _)| ip.to_string() == "10.0.0.3").count(), 1);
        // A deletion seen for another uid of `a` leaves it; its own removes it.
        assert!(a.remove(&PodKey::new("demo", "a"), &Which::Uid("uid-old".into())).is_none());
        assert!(a.remove(&PodKey::new("demo", "a"), &Which::Uid("uid-a".into())).is_some());
        assert_eq!(a.len(), 1);
    }

    #[test]
    fn bounded() {
        let mut a = Announced::default();
        for i in 0..MAX_ANNOUNCED {
            a.insert(pod(&format!("p{i}"), "c", &[&format!("10.{}.{}.1", i / 256, i % 256)])).expect("room");
        }
        assert_eq!(a.insert(pod("one-more", "c", &["10.200.0.1"])), Err(Full(MAX_ANNOUNCED)));
        // Re-announcing a known pod is always possible.
        let replaced = a.insert(pod("p0", "c9", &["10.0.0.1"])).expect("replace");
        assert_eq!(replaced.map(|p| p.container_id), Some("c".to_string()));
    }

    #[test]
    fn absent_means_neither_the_pod_nor_its_addresses() {
        let mut a = Announced::default();
        a.insert(pod("a", "c1", &["10.0.0.2"])).expect("room");
        assert!(!a.is_absent(&pod("a", FROM_WATCH, &["10.0.0.9"])), "the pod is announced");
        assert!(!a.is_absent(&pod("b", FROM_WATCH, &["10.0.0.2"])), "its address is");
        assert!(a.is_absent(&pod("b", FROM_WATCH, &["10.0.0.3"])));
    }

    #[test]
    fn a_del_withdraws_what_the_watch_re_announced_by_uid_and_address() {
        let del = |sandbox: &str, uid: Option<&str>, ips: &[&str]| Which::Del {
            sandbox: sandbox.into(),
            uid: uid.map(String::from),
            ips: ips.iter().map(|ip| ip.parse().expect("ip")).collect(),
        };
        let key = PodKey::new("demo", "a");
        let mut a = Announced::default();
        a.insert(pod("a", FROM_WATCH, &["10.0.0.2"])).expect("room");
        // Another pod's uid, another sandbox's addresses, or no address: left.
        assert!(a.remove(&key, &del("s1", Some("uid-b"), &["10.0.0.2"])).is_none());
        assert!(a.remove(&key, &del("s1", Some("uid-a"), &["10.0.0.7"])).is_none());
        assert!(a.remove(&key, &del("s1", Some("uid-a"), &[])).is_none());
        assert!(a.remove(&key, &del("s1", Some("uid-a"), &["10.0.0.2"])).is_some());
        // Without a uid, the address decides.
        a.insert(pod("a", FROM_WATCH, &["10.0.0.2"])).expect("room");
        assert!(a.remove(&key, &del("s1", None, &["10.0.0.2"])).is_some());
        // A known sandbox is matched by its id only.
        a.insert(pod("a", "s2", &["10.0.0.2"])).expect("room");
        assert!(a.remove(&key, &del("s1", Some("uid-a"), &["10.0.0.2"])).is_none());
        assert!(a.remove(&key, &del("s2", None, &[])).is_some());
    }
}
