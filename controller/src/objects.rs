//! The objects read from the API server: one watch per kind (list, then watch, re-listing when
//! the watch breaks, with backoff), kept in memory and announced on a change counter.
//!
//! A kind counts as synced after its first complete list. A kind whose CRD is not installed
//! (the list answers 404) counts as synced and empty, and is retried in the background, so a
//! cluster without, say, Istio's networking CRDs still gets its waypoints. Every other error is
//! logged and counted and the last complete list stays in force (a broken watch never empties
//! the store).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, PoisonError};

use kube::api::{Api, DynamicObject};
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, Event};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;
use serde_json::Value;
use tokio::sync::watch;
use tokio_stream::StreamExt;
use tracing::{info, warn};

use crate::kinds::Kind;

/// (namespace, name)
pub type Key = (String, String);

#[derive(Debug, Default)]
struct KindState {
    objects: BTreeMap<Key, Value>,
    /// Filled during a (re)list, swapped in when it completes.
    listing: Option<BTreeMap<Key, Value>>,
    synced: bool,
    /// The API answered 404: the CRD is not installed.
    absent: bool,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabels {
    kind: &'static str,
}

/// Watch metrics (`ambient_controller_watch_*`).
#[derive(Clone, Debug, Default)]
pub struct WatchMetrics {
    errors: Family<KindLabels, Counter>,
    events: Family<KindLabels, Counter>,
}

impl WatchMetrics {
    pub fn new(registry: &mut Registry) -> Self {
        let m = Self::default();
        let r = registry.sub_registry_with_prefix("ambient_controller_watch");
        r.register("errors", "Failed lists and watches, by kind (retried with backoff)", m.errors.clone());
        r.register("events", "Watch events received, by kind", m.events.clone());
        m
    }
}

/// Everything read, by kind name.
#[derive(Debug)]
pub struct Objects {
    kinds: Mutex<BTreeMap<&'static str, KindState>>,
    changed: watch::Sender<u64>,
}

impl Default for Objects {
    fn default() -> Self {
        Self { kinds: Mutex::default(), changed: watch::channel(0).0 }
    }
}

impl Objects {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<&'static str, KindState>> {
        self.kinds.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn bump(&self) {
        self.changed.send_modify(|n| *n += 1);
    }

    /// A receiver woken on every change.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }

    /// Whether every kind in `kinds` has been listed once (or found absent).
    pub fn synced(&self, kinds: &[Kind]) -> bool {
        let all = self.lock();
        kinds.iter().all(|k| all.get(k.kind).is_some_and(|s| s.synced))
    }

    /// Kinds not yet listed (for readiness details).
    pub fn pending(&self, kinds: &[Kind]) -> Vec<&'static str> {
        let all = self.lock();
        kinds.iter().filter(|k| !all.get(k.kind).is_some_and(|s| s.synced)).map(|k| k.kind).collect()
    }

    /// Kinds whose CRD is not installed.
    pub fn absent(&self) -> Vec<&'static str> {
        self.lock().iter().filter(|(_, s)| s.absent).map(|(k, _)| *k).collect()
    }

    /// Every object of `kind`.
    pub fn list(&self, kind: &Kind) -> Vec<Value> {
        self.lock().get(kind.kind).map(|s| s.objects.values().cloned().collect()).unwrap_or_default()
    }

    /// One object.
    pub fn get(&self, kind: &Kind, namespace: &str, name: &str) -> Option<Value> {
        self.lock().get(kind.kind)?.objects.get(&(namespace.to_string(), name.to_string())).cloned()
    }

    /// Object counts by kind (for the debug dump).
    pub fn counts(&self) -> BTreeMap<&'static str, usize> {
        self.lock().iter().map(|(k, s)| (*k, s.objects.len())).collect()
    }

    /// Puts an object (tests and the watch).
    pub fn put(&self, kind: &Kind, obj: Value) {
        let Some(key) = key_of(&obj) else { return };
        let obj = trimmed(obj);
        let mut all = self.lock();
        let state = all.entry(kind.kind).or_default();
        match &mut state.listing {
            Some(listing) => {
                listing.insert(key, obj);
            }
            None => {
                state.objects.insert(key, obj);
                drop(all);
                self.bump();
            }
        }
    }

    fn remove(&self, kind: &Kind, obj: &Value) {
        let Some(key) = key_of(obj) else { return };
        let removed = self.lock().entry(kind.kind).or_default().objects.remove(&key).is_some();
        if removed {
            self.bump();
        }
    }

    fn begin_list(&self, kind: &Kind) {
        self.lock().entry(kind.kind).or_default().listing = Some(BTreeMap::new());
    }

    fn end_list(&self, kind: &Kind) {
        {
            let mut all = self.lock();
            let state = all.entry(kind.kind).or_default();
            if let Some(listing) = state.listing.take() {
                state.objects = listing;
            }
            state.synced = true;
            state.absent = false;
        }
        self.bump();
    }

    fn mark_absent(&self, kind: &Kind) {
        let newly = {
            let mut all = self.lock();
            let state = all.entry(kind.kind).or_default();
            let newly = !state.absent || !state.synced;
            state.absent = true;
            state.synced = true;
            state.listing = None;
            state.objects.clear();
            newly
        };
        if newly {
            self.bump();
        }
    }
}

fn key_of(obj: &Value) -> Option<Key> {
    let meta = obj.get("metadata")?;
    let name = meta.get("name")?.as_str()?.to_string();
    let namespace = meta.get("namespace").and_then(Value::as_str).unwrap_or_default().to_string();
    Some((namespace, name))
}

/// Drops what the controller never reads and that can be large (managed fields, the
/// last-applied annotation).
fn trimmed(mut obj: Value) -> Value {
    if let Some(meta) = obj.get_mut("metadata").and_then(Value::as_object_mut) {
        meta.remove("managedFields");
        if let Some(a) = meta.get_mut("annotations").and_then(Value::as_object_mut) {
            a.remove("kubectl.kubernetes.io/last-applied-configuration");
        }
    }
    obj
}

/// Watches `kind` into `objects` until the task is dropped.
pub async fn watch_kind(client: kube::Client, kind: Kind, objects: Arc<Objects>, metrics: WatchMetrics) {
    let api: Api<DynamicObject> = Api::all_with(client, &kind.api_resource());
    let labels = KindLabels { kind: kind.kind };
    let stream = watcher::watcher(api, watcher::Config::default()).default_backoff();
    let mut stream = std::pin::pin!(stream);
    while let Some(event) = stream.next().await {
        match event {
            Ok(event) => {
                metrics.events.get_or_create(&labels).inc();
                match event {
                    Event::Init => objects.begin_list(&kind),
                    Event::InitApply(o) | Event::Apply(o) => objects.put(&kind, to_value(o)),
                    Event::InitDone => {
                        objects.end_list(&kind);
                        info!(kind = kind.kind, objects = objects.list(&kind).len(), "listed");
                    }
                    Event::Delete(o) => objects.remove(&kind, &to_value(o)),
                }
            }
            Err(watcher::Error::InitialListFailed(kube::Error::Api(status))) if status.code == 404 => {
                if !objects.absent().contains(&kind.kind) {
                    info!(
                        kind = kind.kind,
                        "not served by the API server (CRD not installed): taken as empty, retried"
                    );
                }
                objects.mark_absent(&kind);
            }
            Err(e) => {
                metrics.errors.get_or_create(&labels).inc();
                warn!(kind = kind.kind, error = %e, "watch failed; the last list stays in force, retrying");
            }
        }
    }
}

fn to_value(obj: DynamicObject) -> Value {
    serde_json::to_value(obj).unwrap_or(Value::Null)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kinds;

    fn pod(name: &str) -> Value {
        serde_json::json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": "a",
            "managedFields": [{"manager": "x"}]}})
    }

    #[test]
    fn a_relist_replaces_only_when_complete_and_absent_kinds_count_as_synced() {
        let o = Objects::default();
        assert!(!o.synced(&[kinds::POD]));
        o.begin_list(&kinds::POD);
        o.put(&kinds::POD, pod("p1"));
        assert!(o.list(&kinds::POD).is_empty(), "a list in progress is not visible");
        o.end_list(&kinds::POD);
        assert_eq!(o.list(&kinds::POD).len(), 1);
        assert!(o.get(&kinds::POD, "a", "p1").is_some_and(|p| p["metadata"].get("managedFields").is_none()));
        o.begin_list(&kinds::POD);
        o.put(&kinds::POD, pod("p2"));
        assert_eq!(o.list(&kinds::POD).len(), 1, "the previous list stays until the new one completes");
        o.end_list(&kinds::POD);
        assert!(o.get(&kinds::POD, "a", "p1").is_none() && o.get(&kinds::POD, "a", "p2").is_some());
        o.mark_absent(&kinds::GATEWAY);
        assert!(o.synced(&[kinds::POD, kinds::GATEWAY]));
        assert_eq!(o.absent(), vec!["Gateway"]);
    }
}
