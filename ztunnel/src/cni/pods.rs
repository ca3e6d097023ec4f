//! What the Kubernetes watch taught ztunnel: the pods of this node and every namespace, each
//! reduced to the facts enrollment decides on, and bounded in number. The enrollment server
//! waits here (briefly) for a pod the plugin names before the watch has delivered it.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use super::decide::{Decision, NamespaceFacts, PodFacts, decide};

/// Most pods kept (a node runs a few hundred at most).
pub const MAX_PODS: usize = 4096;
/// Most namespaces kept.
pub const MAX_NAMESPACES: usize = 65_536;

/// A pod's namespace and name.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct PodKey {
    pub namespace: String,
    pub name: String,
}

impl PodKey {
    pub fn new(namespace: impl Into<String>, name: impl Into<String>) -> Self {
        Self { namespace: namespace.into(), name: name.into() }
    }
}

impl fmt::Display for PodKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// Which half of the cache.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Pods,
    Namespaces,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Pods => "pods",
            Kind::Namespaces => "namespaces",
        }
    }
}

/// One watched kind: the objects, and the list being rebuilt while the watcher re-lists.
#[derive(Debug)]
struct Table<K: Ord, V> {
    objects: BTreeMap<K, V>,
    relist: Option<BTreeMap<K, V>>,
    /// A full list has been received at least once.
    listed: bool,
    cap: usize,
}

impl<K: Ord, V> Table<K, V> {
    fn new(cap: usize) -> Self {
        Self { objects: BTreeMap::new(), relist: None, listed: false, cap }
    }

    /// Stores `value` unless that would pass the bound; false when it was dropped.
    fn put(map: &mut BTreeMap<K, V>, cap: usize, key: K, value: V) -> bool {
        if map.len() >= cap && !map.contains_key(&key) {
            return false;
        }
        map.insert(key, value);
        true
    }

    fn apply(&mut self, key: K, value: V) -> bool {
        Self::put(&mut self.objects, self.cap, key, value)
    }

    fn delete(&mut self, key: &K) {
        self.objects.remove(key);
    }

    fn init(&mut self) {
        self.relist = Some(BTreeMap::new());
    }

    fn init_apply(&mut self, key: K, value: V) -> bool {
        let cap = self.cap;
        let relist = self.relist.get_or_insert_with(BTreeMap::new);
        Self::put(relist, cap, key, value)
    }

    /// The re-list is complete: what it did not list is gone.
    fn init_done(&mut self) {
        if let Some(list) = self.relist.take() {
            self.objects = list;
        }
        self.listed = true;
    }
}

/// A watch event, reduced.
#[derive(Debug)]
pub enum Change<K, V> {
    Apply(K, V),
    Delete(K),
    Init,
    InitApply(K, V),
    InitDone,
}

#[derive(Debug)]
struct Inner {
    pods: Table<PodKey, PodFacts>,
    namespaces: Table<String, NamespaceFacts>,
}

/// Why a pod could not be decided on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Missing {
    /// The pod (with that uid) is not among this node's pods.
    Pod,
    /// The pod is, but its namespace, which decides, is not known.
    Namespace,
}

impl Missing {
    /// The metric label.
    pub fn label(self) -> &'static str {
        match self {
            Missing::Pod => "pod_unknown",
            Missing::Namespace => "namespace_unknown",
        }
    }
}

/// What is known of `key` now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Known {
    Decided(Decision),
    Missing(Missing),
    /// Not among the pods of a complete list: deleted (or never on this node).
    Gone,
}

/// The cache; changes are announced on a watch channel (a counter).
#[derive(Debug)]
pub struct PodCache {
    inner: Mutex<Inner>,
    changed: watch::Sender<u64>,
}

impl Default for PodCache {
    fn default() -> Self {
        Self::with_bounds(MAX_PODS, MAX_NAMESPACES)
    }
}

/// Sizes for the admin dump.
#[derive(Clone, Debug, Serialize)]
pub struct CacheSummary {
    pub pods: usize,
    pub namespaces: usize,
    pub pods_listed: bool,
    pub namespaces_listed: bool,
}

impl PodCache {
    pub fn with_bounds(pods: usize, namespaces: usize) -> Self {
        Self {
            inner: Mutex::new(Inner { pods: Table::new(pods), namespaces: Table::new(namespaces) }),
            changed: watch::channel(0).0,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn bump(&self) {
        self.changed.send_modify(|n| *n = n.wrapping_add(1));
    }

    /// Applies a pod event; false when a pod was dropped because the bound was reached.
    pub fn pods(&self, change: Change<PodKey, PodFacts>) -> bool {
        let kept = apply(&mut self.lock().pods, change);
        self.bump();
        kept
    }

    /// Applies a namespace event; false when one was dropped because the bound was reached.
    pub fn namespaces(&self, change: Change<String, NamespaceFacts>) -> bool {
        let kept = apply(&mut self.lock().namespaces, change);
        self.bump();
        kept
    }

    /// True once each kind was listed in full at least once.
    pub fn listed(&self) -> bool {
        let inner = self.lock();
        inner.pods.listed && inner.namespaces.listed
    }

    pub fn summary(&self) -> CacheSummary {
        let inner = self.lock();
        CacheSummary {
            pods: inner.pods.objects.len(),
            namespaces: inner.namespaces.objects.len(),
            pods_listed: inner.pods.listed,
            namespaces_listed: inner.namespaces.listed,
        }
    }

    /// The decision for `key` (whose uid must be `uid` when given) with what is known now.
    pub fn known(&self, key: &PodKey, uid: Option<&str>) -> Known {
        let inner = self.lock();
        let pod = inner.pods.objects.get(key).filter(|p| uid.is_none_or(|u| u == p.uid));
        let Some(pod) = pod else {
            return if inner.pods.listed && inner.pods.relist.is_none() {
                Known::Gone
            } else {
                Known::Missing(Missing::Pod)
            };
        };
        match decide(pod, inner.namespaces.objects.get(&key.namespace)) {
            Some(d) => Known::Decided(d),
            None => Known::Missing(Missing::Namespace),
        }
    }

    /// Whether the pod opted out of DNS capture (false when it is not known).
    pub fn bypasses_dns(&self, key: &PodKey) -> bool {
        self.lock().pods.objects.get(key).is_some_and(|p| p.bypass_dns)
    }

    /// This node's pods that are in the mesh (so not completed) and have addresses, with their
    /// uid and whether they opted out of DNS capture.
    pub fn members(&self) -> Vec<(PodKey, String, Vec<std::net::IpAddr>, bool)> {
        let inner = self.lock();
        inner
            .pods
            .objects
            .iter()
            .filter(|(_, p)| !p.ips.is_empty())
            .filter(|(k, p)| {
                matches!(decide(p, inner.namespaces.objects.get(&k.namespace)), Some(Decision::Enroll(_)))
            })
            .map(|(k, p)| (k.clone(), p.uid.clone(), p.ips.clone(), p.bypass_dns))
            .collect()
    }

    /// Waits until both kinds have been listed in full once.
    pub async fn wait_listed(&self) {
        let mut changes = self.changed.subscribe();
        loop {
            changes.borrow_and_update();
            if self.listed() {
                return;
            }
            if changes.changed().await.is_err() {
                std::future::pending::<()>().await;
            }
        }
    }

    /// The decision for `key`, waiting up to `wait` for the watch to deliver what it needs.
    pub async fn decide(&self, key: &PodKey, uid: Option<&str>, wait: Duration) -> Result<Decision, Missing> {
        let deadline = tokio::time::Instant::now() + wait;
        let mut changes = self.changed.subscribe();
        loop {
            // Marked seen before looking, so a change in between wakes the wait below.
            changes.borrow_and_update();
            let missing = match self.known(key, uid) {
                Known::Decided(d) => return Ok(d),
                Known::Missing(m) => m,
                Known::Gone => Missing::Pod,
            };
            match tokio::time::timeout_at(deadline, changes.changed()).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) | Err(_) => return Err(missing),
            }
        }
    }
}

fn apply<K: Ord, V>(table: &mut Table<K, V>, change: Change<K, V>) -> bool {
    match change {
        Change::Apply(k, v) => table.apply(k, v),
        Change::Delete(k) => {
            table.delete(&k);
            true
        }
        Change::Init => {
            table.init();
            true
        }
        Change::InitApply(k, v) => table.init_apply(k, v),
        Change::InitDone => {
            table.init_done();
            true
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    fn pod(uid: &str, mode: Option<&str>) -> PodFacts {
        PodFacts { uid: uid.into(), dataplane_mode: mode.map(String::from), ..Default::default() }
    }

    fn ambient() -> NamespaceFacts {
        NamespaceFacts { dataplane_mode: Some("ambient".into()) }
    }

    #[tokio::test]
    async fn waits_for_the_pod_and_its_namespace() {
        let cache = Arc::new(PodCache::default());
        let key = PodKey::new("demo", "a");
        let short = Duration::from_millis(50);
        assert_eq!(cache.decide(&key, None, short).await, Err(Missing::Pod));
        cache.pods(Change::Apply(key.clone(), pod("u1", None)));
        assert_eq!(cache.decide(&key, None, short).await, Err(Missing::Namespace));
        // Arriving while the server waits.
        let c = cache.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(20)).await;
            c.namespaces(Change::Apply("demo".into(), ambient()));
        });
        let d = cache.decide(&key, Some("u1"), Duration::from_secs(5)).await.expect("decided");
        assert!(matches!(d, Decision::Enroll(_)));
        // Another pod of the same name (a new uid) is not this one.
        assert_eq!(cache.decide(&key, Some("u2"), short).await, Err(Missing::Pod));
    }

    #[test]
    fn relists_replace_and_deletions_are_gone() {
        let cache = PodCache::default();
        let (a, b) = (PodKey::new("demo", "a"), PodKey::new("demo", "b"));
        assert_eq!(cache.known(&a, None), Known::Missing(Missing::Pod), "not listed yet");
        cache.pods(Change::Init);
        cache.pods(Change::InitApply(a.clone(), pod("u1", Some("ambient"))));
        cache.pods(Change::InitApply(b.clone(), pod("u2", Some("none"))));
        assert_eq!(cache.known(&a, None), Known::Missing(Missing::Pod), "the list is not complete");
        cache.pods(Change::InitDone);
        cache.namespaces(Change::Init);
        cache.namespaces(Change::InitDone);
        assert!(cache.listed());
        assert!(matches!(cache.known(&a, None), Known::Decided(Decision::Enroll(_))));
        assert!(matches!(cache.known(&b, None), Known::Decided(Decision::Skip(_))));
        cache.pods(Change::Delete(b.clone()));
        assert_eq!(cache.known(&b, None), Known::Gone);
        // A re-list without `a`: gone once complete, still there while it runs.
        cache.pods(Change::Init);
        assert!(matches!(cache.known(&a, None), Known::Decided(_)), "kept until the re-list completes");
        cache.pods(Change::InitDone);
        assert_eq!(cache.known(&a, None), Known::Gone);
    }

    #[test]
    fn members_are_mesh_pods_with_addresses_that_have_not_completed() {
        let cache = PodCache::default();
        let ip = |s: &str| vec![s.parse::<std::net::IpAddr>().expect("ip")];
        let with = |uid: &str, ips, phase: Option<&str>| PodFacts {
            ips,
            phase: phase.map(String::from),
            ..pod(uid, Some("ambient"))
        };
        cache.pods(Change::Apply(PodKey::new("n", "running"), with("1", ip("10.0.0.1"), Some("Running"))));
        cache.pods(Change::Apply(PodKey::new("n", "done"), with("2", ip("10.0.0.2"), Some("Succeeded"))));
        cache.pods(Change::Apply(PodKey::new("n", "failed"), with("3", ip("10.0.0.3"), Some("Failed"))));
        cache.pods(Change::Apply(PodKey::new("n", "no-ip"), with("4", vec![], None)));
        let members: Vec<String> = cache.members().into_iter().map(|(k, ..)| k.name).collect();
        assert_eq!(members, ["running"]);
        assert!(matches!(cache.known(&PodKey::new("n", "done"), None), Known::Decided(Decision::Skip(_))));
    }

    #[test]
    fn bounded() {
        let cache = PodCache::with_bounds(2, 1);
        assert!(cache.pods(Change::Apply(PodKey::new("n", "a"), pod("1", None))));
        assert!(cache.pods(Change::Apply(PodKey::new("n", "b"), pod("2", None))));
        assert!(!cache.pods(Change::Apply(PodKey::new("n", "c"), pod("3", None))), "over the bound");
        assert!(
            cache.pods(Change::Apply(PodKey::new("n", "a"), pod("1", Some("none")))),
            "updates still apply"
        );
        assert!(cache.namespaces(Change::Apply("n".into(), ambient())));
        assert!(!cache.namespaces(Change::Apply("m".into(), ambient())));
        cache.pods(Change::Init);
        for name in ["x", "y", "z"] {
            cache.pods(Change::InitApply(PodKey::new("n", name), pod(name, None)));
        }
        cache.pods(Change::InitDone);
        assert_eq!(cache.summary().pods, 2);
    }
}
