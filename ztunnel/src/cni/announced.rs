//! The pods the CNI plugin announced at creation and ztunnel enrolled: kept enrolled whether or
//! not xDS knows their workload yet, until DEL, their deletion in the watch, or labels that
//! take them out of the mesh. Bounded; an address belongs to the pod announced last with it
//! (an address reused before an older pod's DEL arrived moves to the new pod).

use std::collections::BTreeMap;
use std::net::IpAddr;

use serde::Serialize;

use super::pods::PodKey;

/// Most pods announced at once (far above what a node runs).
pub const MAX_ANNOUNCED: usize = 1024;

/// One announced pod.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct AnnouncedPod {
    pub pod: PodKey,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub uid: Option<String>,
    /// The sandbox the plugin was called for.
    pub container_id: String,
    pub ips: Vec<IpAddr>,
    /// The host side of its veth, where capture is attached.
    pub interface: String,
    /// When it was announced (seconds since the Unix epoch).
    pub since_unix_s: u64,
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
}

/// The registry was full.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{0} pods are already announced on this node")]
pub struct Full(pub usize);

#[derive(Debug, Default)]
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

    /// Removes the pod's announcement if it is `which`.
    pub fn remove(&mut self, key: &PodKey, which: &Which) -> Option<AnnouncedPod> {
        let current = self.pods.get(key)?;
        let matches = match which {
            Which::Any => true,
            Which::Sandbox(id) => current.container_id == *id,
            Which::Uid(uid) => current.uid.as_deref().is_none_or(|u| u == uid),
        };
        if matches { self.pods.remove(key) } else { None }
    }

    pub fn get(&self, key: &PodKey) -> Option<&AnnouncedPod> {
        self.pods.get(key)
    }

    /// Every announced address with its interface.
    pub fn addresses(&self) -> impl Iterator<Item = (IpAddr, &str)> + '_ {
        self.pods.values().flat_map(|p| p.ips.iter().map(|ip| (*ip, p.interface.as_str())))
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
}
