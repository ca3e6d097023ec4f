//! Deletion: preconditions, finalizers (an object with some gets a `deletionTimestamp` and goes when
//! the last one is removed), owner-reference garbage collection (background, done at once), and a
//! deleted Namespace taking its objects with it.

use std::collections::VecDeque;

use serde_json::{Value, json};

use super::write::has_finalizers;
use super::{Key, Store, Stored, key_of, meta_str, namespaces_resource, present};
use crate::kube_api::error::ApiError;
use crate::kube_api::ids::now_rfc3339;
use crate::kube_api::registry::{GroupResource, ResourceType};
use crate::kube_api::selector::Filter;

/// The parts of a `DeleteOptions` body (or query) the server honours.
#[derive(Clone, Debug, Default, PartialEq)]
pub(crate) struct DeleteOptions {
    /// `propagationPolicy: Orphan`: dependents lose the owner reference instead of being deleted.
    /// `Background` and `Foreground` both delete dependents at once.
    pub orphan: bool,
    /// `preconditions.uid`.
    pub uid: Option<String>,
    /// `preconditions.resourceVersion`.
    pub resource_version: Option<String>,
}

impl DeleteOptions {
    /// Reads a `DeleteOptions` object (a missing or empty body is no options).
    pub fn from_body(body: &[u8]) -> Result<Self, ApiError> {
        if body.iter().all(u8::is_ascii_whitespace) {
            return Ok(Self::default());
        }
        let value: Value = serde_json::from_slice(body)
            .map_err(|e| ApiError::bad_request(format!("invalid DeleteOptions: {e}")))?;
        let text = |pointer: &str| value.pointer(pointer).and_then(Value::as_str).map(str::to_string);
        Ok(Self {
            orphan: text("/propagationPolicy").as_deref() == Some("Orphan")
                || value.get("orphanDependents").and_then(Value::as_bool) == Some(true),
            uid: text("/preconditions/uid"),
            resource_version: text("/preconditions/resourceVersion"),
        })
    }
}

/// What a delete did to an object.
enum Deletion {
    /// It has finalizers: it now carries a `deletionTimestamp`.
    Marked(Value),
    /// It is gone (the value is its last state).
    Removed(Value),
}

fn owner_uids(object: &Value) -> Vec<String> {
    object
        .pointer("/metadata/ownerReferences")
        .and_then(Value::as_array)
        .map(|refs| refs.iter().filter_map(|r| r["uid"].as_str().map(str::to_string)).collect())
        .unwrap_or_default()
}

fn drop_owner(object: &mut Value, uid: &str) {
    if let Some(meta) = object["metadata"].as_object_mut() {
        if let Some(refs) = meta.get_mut("ownerReferences").and_then(Value::as_array_mut) {
            refs.retain(|r| r["uid"].as_str() != Some(uid));
        }
        if meta.get("ownerReferences").and_then(Value::as_array).is_some_and(Vec::is_empty) {
            meta.remove("ownerReferences");
        }
    }
}

impl Store {
    /// DELETE of one object; returns it as it is after the call.
    pub fn delete(
        &mut self,
        res: &ResourceType,
        namespace: &str,
        name: &str,
        options: &DeleteOptions,
        dry_run: bool,
    ) -> Result<Value, ApiError> {
        let stored = self.stored(res, namespace, name).ok_or_else(|| ApiError::not_found(res, name))?;
        let holds = |want: &Option<String>, key: &str| {
            want.as_deref().is_none_or(|want| Some(want) == meta_str(&stored.object, key))
        };
        if !holds(&options.uid, "uid") || !holds(&options.resource_version, "resourceVersion") {
            return Err(ApiError::conflict(res, name));
        }
        if dry_run {
            return Ok(present(res, &stored.object));
        }
        let object = self
            .delete_and_collect(&res.group_resource(), &key_of(res, namespace, name), options.orphan)
            .ok_or_else(|| ApiError::not_found(res, name))?;
        Ok(present(res, &object))
    }

    /// DELETE of a collection: every object in `namespace` (all when `None`) matching `filter`.
    pub fn delete_collection(
        &mut self,
        res: &ResourceType,
        namespace: Option<&str>,
        filter: &Filter,
        options: &DeleteOptions,
        dry_run: bool,
    ) -> Vec<Value> {
        let resource = res.group_resource();
        let keys: Vec<Key> = self
            .objects
            .get(&resource)
            .map(|bucket| {
                bucket
                    .iter()
                    .filter(|((ns, _), _)| !res.namespaced || namespace.is_none_or(|want| want == ns))
                    .filter(|(_, s)| filter.matches(&s.object))
                    .map(|(k, _)| k.clone())
                    .collect()
            })
            .unwrap_or_default();
        let mut deleted = Vec::new();
        for key in keys {
            let object = if dry_run {
                self.objects.get(&resource).and_then(|b| b.get(&key)).map(|s| s.object.clone())
            } else {
                self.delete_and_collect(&resource, &key, options.orphan)
            };
            deleted.extend(object.map(|o| present(res, &o)));
        }
        deleted
    }

    fn mark_or_remove(&mut self, resource: &GroupResource, key: &Key) -> Option<Deletion> {
        let stored = self.objects.get(resource)?.get(key)?;
        if !has_finalizers(&stored.object) {
            return self.remove(resource, key).map(Deletion::Removed);
        }
        if !stored.object["metadata"]["deletionTimestamp"].is_null() {
            return Some(Deletion::Marked(stored.object.clone()));
        }
        let Stored { mut object, fields } = stored.clone();
        object["metadata"]["deletionTimestamp"] = json!(now_rfc3339());
        object["metadata"]["deletionGracePeriodSeconds"] = json!(0);
        Some(Deletion::Marked(self.commit(resource, key.clone(), object, fields)))
    }

    fn delete_and_collect(&mut self, resource: &GroupResource, key: &Key, orphan: bool) -> Option<Value> {
        match self.mark_or_remove(resource, key)? {
            Deletion::Marked(object) => Some(object),
            Deletion::Removed(object) => {
                self.collect_garbage(resource, &object, orphan);
                Some(object)
            }
        }
    }

    /// Removes an object being deleted whose last finalizer went; `last` is its final state.
    pub(super) fn finish_deletion(
        &mut self,
        resource: &GroupResource,
        key: &Key,
        last: Value,
    ) -> Option<Value> {
        if let Some(stored) = self.objects.get_mut(resource).and_then(|b| b.get_mut(key)) {
            stored.object = last;
        }
        let removed = self.remove(resource, key)?;
        self.collect_garbage(resource, &removed, false);
        Some(removed)
    }

    /// After `removed` is gone: a namespace's objects go with it; a dependent (an object with an
    /// owner reference to it) is deleted when none of its other owners exists, and otherwise (or
    /// with `orphan`) only loses the reference. Repeats for everything deleted on the way.
    fn collect_garbage(&mut self, resource: &GroupResource, removed: &Value, orphan: bool) {
        let mut queue = VecDeque::from([(resource.clone(), removed.clone(), orphan)]);
        while let Some((resource, object, orphan)) = queue.pop_front() {
            if resource == namespaces_resource()
                && let Some(namespace) = meta_str(&object, "name")
            {
                for (r, k) in self.keys_in_namespace(namespace) {
                    if let Some(gone) = self.remove(&r, &k) {
                        queue.push_back((r, gone, false));
                    }
                }
            }
            let Some(uid) = meta_str(&object, "uid") else { continue };
            for (r, k) in self.dependents_of(uid) {
                let Some(stored) = self.objects.get(&r).and_then(|b| b.get(&k)) else { continue };
                let others_alive = owner_uids(&stored.object).iter().any(|o| o != uid && self.uid_exists(o));
                if orphan || others_alive {
                    let Stored { mut object, fields } = stored.clone();
                    drop_owner(&mut object, uid);
                    self.commit(&r, k, object, fields);
                } else if let Some(Deletion::Removed(gone)) = self.mark_or_remove(&r, &k) {
                    queue.push_back((r, gone, false));
                }
            }
        }
    }

    fn all_keys(&self) -> impl Iterator<Item = (&GroupResource, &Key, &Stored)> {
        self.objects.iter().flat_map(|(r, bucket)| bucket.iter().map(move |(k, s)| (r, k, s)))
    }

    fn keys_in_namespace(&self, namespace: &str) -> Vec<(GroupResource, Key)> {
        self.all_keys().filter(|(_, k, _)| k.0 == namespace).map(|(r, k, _)| (r.clone(), k.clone())).collect()
    }

    fn dependents_of(&self, uid: &str) -> Vec<(GroupResource, Key)> {
        self.all_keys()
            .filter(|(_, _, s)| owner_uids(&s.object).iter().any(|o| o == uid))
            .map(|(r, k, _)| (r.clone(), k.clone()))
            .collect()
    }

    fn uid_exists(&self, uid: &str) -> bool {
        self.all_keys().any(|(_, _, s)| meta_str(&s.object, "uid") == Some(uid))
    }
}
