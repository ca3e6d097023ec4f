//! The object store: objects by resource, namespace and name, the global resourceVersion counter,
//! and the bounded history of change events that watches replay. Writes live in `store/write.rs`,
//! deletion and garbage collection in `store/delete.rs`.

mod delete;
mod write;

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Arc;

use serde_json::{Value, json};

pub(crate) use self::delete::DeleteOptions;
pub(crate) use self::write::{PatchBody, Writer};
use super::defaults::ClusterIps;
use super::error::ApiError;
use super::fields::ManagedFields;
use super::ids::Ids;
use super::registry::{GroupResource, ResourceType};
use super::selector::Filter;

/// The field manager recorded for writes made through the test handle.
pub(crate) const HANDLE_MANAGER: &str = "kube-api-test";

/// The kind of a change, as a watch event's `type`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum EventType {
    Added,
    Modified,
    Deleted,
}

/// One change, kept in the history for watches.
#[derive(Debug)]
pub(crate) struct Event {
    /// The resourceVersion this change created.
    pub rv: u64,
    pub kind: EventType,
    pub resource: GroupResource,
    /// Empty for cluster-scoped objects.
    pub namespace: String,
    /// The object after the change (for a deletion, its last state with the deletion's version).
    pub object: Value,
    /// The object before a modification, to tell when it starts or stops matching a selector.
    pub prev: Option<Value>,
}

/// The history no longer holds every event after the requested resourceVersion.
#[derive(Debug)]
pub(crate) struct Expired {
    /// The oldest resourceVersion a watch can still start from.
    pub oldest: u64,
}

/// An object and the field ownership of its writers.
#[derive(Clone, Debug)]
struct Stored {
    object: Value,
    fields: ManagedFields,
}

/// Namespace (empty when cluster-scoped) and name.
type Key = (String, String);

/// Every object, by resource and key.
type Objects = HashMap<GroupResource, BTreeMap<Key, Stored>>;

/// Every stored object, the version counter and the event history.
#[derive(Debug)]
pub(crate) struct Store {
    objects: Objects,
    rv: u64,
    history: VecDeque<Arc<Event>>,
    history_limit: usize,
    /// The newest resourceVersion whose event has left the history.
    evicted_rv: u64,
    require_namespaces: bool,
    ids: Ids,
    cluster_ips: ClusterIps,
}

fn namespaces_resource() -> GroupResource {
    GroupResource { group: String::new(), plural: "namespaces".into() }
}

/// A string field of `metadata`.
pub(crate) fn meta_str<'a>(object: &'a Value, key: &str) -> Option<&'a str> {
    object.get("metadata")?.get(key)?.as_str()
}

/// The object as a response shows it: with the apiVersion and kind of the version asked for.
fn present(res: &ResourceType, object: &Value) -> Value {
    let mut out = object.clone();
    if out.is_object() {
        out["apiVersion"] = json!(res.api_version());
        out["kind"] = json!(res.kind);
    }
    out
}

fn key_of(res: &ResourceType, namespace: &str, name: &str) -> Key {
    let namespace = if res.namespaced { namespace.to_string() } else { String::new() };
    (namespace, name.to_string())
}

impl Store {
    pub fn new(history_limit: usize, require_namespaces: bool) -> Self {
        Self {
            objects: HashMap::new(),
            rv: 0,
            history: VecDeque::new(),
            history_limit,
            evicted_rv: 0,
            require_namespaces,
            ids: Ids::new(),
            cluster_ips: ClusterIps::new(),
        }
    }

    /// The newest resourceVersion.
    pub fn resource_version(&self) -> u64 {
        self.rv
    }

    fn stored(&self, res: &ResourceType, namespace: &str, name: &str) -> Option<&Stored> {
        self.objects.get(&res.group_resource())?.get(&key_of(res, namespace, name))
    }

    pub fn get(&self, res: &ResourceType, namespace: &str, name: &str) -> Option<Value> {
        self.stored(res, namespace, name).map(|s| present(res, &s.object))
    }

    /// Objects of `res` in `namespace` (every namespace when `None`) matching `filter`, in key order.
    pub fn list(&self, res: &ResourceType, namespace: Option<&str>, filter: &Filter) -> Vec<Value> {
        let Some(bucket) = self.objects.get(&res.group_resource()) else { return Vec::new() };
        bucket
            .iter()
            .filter(|((ns, _), _)| !res.namespaced || namespace.is_none_or(|want| want == ns))
            .filter(|(_, s)| filter.matches(&s.object))
            .map(|(_, s)| present(res, &s.object))
            .collect()
    }

    /// The events after `cursor`, or `Expired` when some of them have left the history.
    pub fn events_after(&self, cursor: u64) -> Result<Vec<Arc<Event>>, Expired> {
        if cursor < self.evicted_rv {
            return Err(Expired { oldest: self.evicted_rv });
        }
        let start = self.history.partition_point(|e| e.rv <= cursor);
        Ok(self.history.range(start..).cloned().collect())
    }

    /// Whether a watch from `rv` can be served from the history.
    pub fn can_replay_from(&self, rv: u64) -> Result<(), Expired> {
        self.events_after(rv).map(drop)
    }

    /// Stores `object` under `key` with a new resourceVersion and records the event.
    fn commit(
        &mut self,
        resource: &GroupResource,
        key: Key,
        mut object: Value,
        fields: ManagedFields,
    ) -> Value {
        self.rv += 1;
        object["metadata"]["resourceVersion"] = json!(self.rv.to_string());
        let bucket = self.objects.entry(resource.clone()).or_default();
        let prev = bucket.insert(key.clone(), Stored { object: object.clone(), fields }).map(|s| s.object);
        let kind = if prev.is_some() { EventType::Modified } else { EventType::Added };
        self.record(Event {
            rv: self.rv,
            kind,
            resource: resource.clone(),
            namespace: key.0,
            object: object.clone(),
            prev,
        });
        object
    }

    /// Removes the object under `key`, recording a deletion with a new resourceVersion.
    fn remove(&mut self, resource: &GroupResource, key: &Key) -> Option<Value> {
        let stored = self.objects.get_mut(resource)?.remove(key)?;
        self.rv += 1;
        let mut object = stored.object;
        object["metadata"]["resourceVersion"] = json!(self.rv.to_string());
        self.record(Event {
            rv: self.rv,
            kind: EventType::Deleted,
            resource: resource.clone(),
            namespace: key.0.clone(),
            object: object.clone(),
            prev: None,
        });
        Some(object)
    }

    fn record(&mut self, event: Event) {
        while !self.history.is_empty() && self.history.len() >= self.history_limit {
            if let Some(old) = self.history.pop_front() {
                self.evicted_rv = old.rv;
            }
        }
        if self.history_limit == 0 {
            self.evicted_rv = event.rv;
            return;
        }
        self.history.push_back(Arc::new(event));
    }

    fn namespace_exists(&self, name: &str) -> bool {
        self.objects
            .get(&namespaces_resource())
            .is_some_and(|b| b.contains_key(&(String::new(), name.into())))
    }

    /// Fails with 404 when namespaces are required to exist and `namespace` does not.
    fn check_namespace_exists(&self, res: &ResourceType, namespace: &str) -> Result<(), ApiError> {
        if res.namespaced && self.require_namespaces && !self.namespace_exists(namespace) {
            let namespaces = ResourceType::cluster("v1", "Namespace", "namespaces");
            return Err(ApiError::not_found(&namespaces, namespace));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;
