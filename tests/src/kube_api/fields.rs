//! A small model of server-side apply's field ownership: which manager set which leaf field.
//!
//! A field is a path of map keys to a leaf: a scalar, a list (lists are atomic) or an empty map.
//! Apply records the fields a manager applied, refuses (without `force`) to change a field another
//! manager owns, removes fields the manager applied before and no longer applies (unless someone
//! else owns them), and merges the rest. Other writes (create, update, merge/JSON patch) give their
//! manager the fields they changed and take those fields from everyone else. The ownership is kept
//! beside the object; `metadata.managedFields` is not rendered.

use std::collections::{BTreeMap, BTreeSet};

use serde_json::{Map, Value};

/// Map keys from the object root to one leaf.
pub(crate) type FieldPath = Vec<String>;

/// Which part of an object a write may touch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Scope {
    /// Everything but system metadata; `status` too unless the kind has a status subresource.
    Main { status_subresource: bool },
    /// Only `status`.
    Status,
}

/// Metadata the server owns; never a managed field.
pub(crate) const SYSTEM_METADATA: &[&str] = &[
    "name",
    "namespace",
    "uid",
    "resourceVersion",
    "generation",
    "creationTimestamp",
    "deletionTimestamp",
    "deletionGracePeriodSeconds",
    "managedFields",
    "selfLink",
];

/// The leaf fields of `object` within `scope`.
pub(crate) fn leaves(object: &Value, scope: Scope) -> BTreeSet<FieldPath> {
    let mut out = BTreeSet::new();
    let Some(map) = object.as_object() else { return out };
    for (key, value) in map {
        let in_scope = match scope {
            Scope::Status => key == "status",
            Scope::Main { status_subresource } => {
                key != "apiVersion" && key != "kind" && !(status_subresource && key == "status")
            }
        };
        if !in_scope {
            continue;
        }
        let mut path = vec![key.clone()];
        if key == "metadata" {
            if let Some(meta) = value.as_object() {
                for (mkey, mvalue) in meta.iter().filter(|(k, _)| !SYSTEM_METADATA.contains(&k.as_str())) {
                    path.push(mkey.clone());
                    collect(mvalue, &mut path, &mut out);
                    path.pop();
                }
            }
        } else {
            collect(value, &mut path, &mut out);
        }
    }
    out
}

fn collect(value: &Value, path: &mut FieldPath, out: &mut BTreeSet<FieldPath>) {
    match value {
        Value::Object(map) if !map.is_empty() => {
            for (key, inner) in map {
                path.push(key.clone());
                collect(inner, path, out);
                path.pop();
            }
        }
        _ => {
            out.insert(path.clone());
        }
    }
}

/// The value at `path`, if any.
pub(crate) fn value_at<'a>(object: &'a Value, path: &[String]) -> Option<&'a Value> {
    path.iter().try_fold(object, |at, key| at.get(key))
}

/// Removes the value at `path`, then the maps it leaves empty (below the top level).
pub(crate) fn remove_at(object: &mut Value, path: &[String]) {
    fn walk(at: &mut Map<String, Value>, path: &[String], depth: usize) {
        let Some((first, rest)) = path.split_first() else { return };
        if rest.is_empty() {
            at.remove(first);
            return;
        }
        if let Some(Value::Object(inner)) = at.get_mut(first) {
            walk(inner, rest, depth + 1);
            if inner.is_empty() && depth > 0 {
                at.remove(first);
            }
        }
    }
    if let Value::Object(map) = object {
        walk(map, path, 0);
    }
}

/// Two paths overlap when one is a prefix of the other.
fn overlaps(a: &[String], b: &[String]) -> bool {
    a.starts_with(b) || b.starts_with(a)
}

/// How a manager last wrote: apply entries and update entries are tracked apart, as the real
/// server does.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Operation {
    Apply,
    Update,
}

/// Field ownership of one object, per (manager, operation, scope).
#[derive(Clone, Debug, Default, PartialEq)]
pub(crate) struct ManagedFields {
    owners: BTreeMap<(String, Operation, bool), BTreeSet<FieldPath>>,
}

/// A field another manager owns that an apply would change: (manager, `.dotted.path`).
pub(crate) type ApplyConflict = (String, String);

impl ManagedFields {
    fn key(manager: &str, op: Operation, scope: Scope) -> (String, Operation, bool) {
        (manager.to_string(), op, scope == Scope::Status)
    }

    /// Server-side apply of `applied` (already cut to `scope`) by `manager` onto `object`.
    pub fn apply(
        &mut self,
        object: &mut Value,
        applied: &Value,
        manager: &str,
        scope: Scope,
        force: bool,
    ) -> Result<(), Vec<ApplyConflict>> {
        let wanted = leaves(applied, scope);
        let me = Self::key(manager, Operation::Apply, scope);
        let changed: Vec<&FieldPath> = wanted
            .iter()
            .filter(|p| {
                let current = value_at(object, p);
                current.is_some() && current != value_at(applied, p)
            })
            .collect();
        let mut conflicts = Vec::new();
        for (owner, fields) in self.owners.iter_mut().filter(|(k, _)| k.0 != manager && k.2 == me.2) {
            let taken: Vec<FieldPath> =
                fields.iter().filter(|q| changed.iter().any(|p| overlaps(p, q))).cloned().collect();
            for q in taken {
                if force {
                    fields.remove(&q);
                } else {
                    conflicts.push((owner.0.clone(), format!(".{}", q.join("."))));
                }
            }
        }
        if !conflicts.is_empty() {
            conflicts.sort();
            conflicts.dedup();
            return Err(conflicts);
        }
        let previous = self.owners.remove(&me).unwrap_or_default();
        // Removing a dropped field before the merge is safe even when an applied one overlaps it:
        // the merge then writes the applied value (an empty map applied keeps no old keys).
        for dropped in previous.difference(&wanted) {
            let shared = self.owners.values().any(|fields| fields.iter().any(|q| overlaps(q, dropped)));
            if !shared {
                remove_at(object, dropped);
            }
        }
        super::patch::merge_patch(object, applied);
        self.owners.insert(me, wanted);
        self.owners.retain(|_, fields| !fields.is_empty());
        Ok(())
    }

    /// A non-apply write by `manager` that turned `old` into `new`: the manager owns what it changed,
    /// and nobody keeps a field that is gone.
    pub fn update(&mut self, old: &Value, new: &Value, manager: &str, scope: Scope) {
        let before = leaves(old, scope);
        let after = leaves(new, scope);
        let changed: Vec<&FieldPath> =
            after.iter().filter(|p| value_at(old, p) != value_at(new, p)).collect();
        let removed: Vec<&FieldPath> = before.iter().filter(|p| value_at(new, p).is_none()).collect();
        let me = Self::key(manager, Operation::Update, scope);
        for (owner, fields) in self.owners.iter_mut().filter(|(k, _)| k.2 == me.2) {
            let mine = *owner == me;
            fields.retain(|q| {
                let gone = removed.iter().any(|p| q.starts_with(p));
                let retaken = !mine && changed.iter().any(|p| overlaps(p, q));
                !gone && !retaken
            });
        }
        let entry = self.owners.entry(me).or_default();
        entry.extend(changed.into_iter().cloned());
        self.owners.retain(|_, fields| !fields.is_empty());
    }

    /// The fields `manager` owns through apply (for assertions in unit tests).
    #[cfg(test)]
    fn applied_by(&self, manager: &str, scope: Scope) -> Option<&BTreeSet<FieldPath>> {
        self.owners.get(&Self::key(manager, Operation::Apply, scope))
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    const MAIN: Scope = Scope::Main { status_subresource: true };

    #[test]
    fn leaves_skip_system_metadata_and_status() {
        let obj = json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": { "name": "a", "uid": "u", "labels": { "x": "1" } },
            "spec": { "list": [1], "empty": {} },
            "status": { "phase": "Running" },
        });
        let got: Vec<String> = leaves(&obj, MAIN).into_iter().map(|p| p.join(".")).collect();
        assert_eq!(got, ["metadata.labels.x", "spec.empty", "spec.list"]);
        let got: Vec<String> = leaves(&obj, Scope::Status).into_iter().map(|p| p.join(".")).collect();
        assert_eq!(got, ["status.phase"]);
    }

    #[test]
    fn apply_conflicts_unless_forced_and_drops_unapplied_fields() {
        let mut fields = ManagedFields::default();
        let mut obj = json!({ "metadata": { "name": "l" } });
        let a = json!({ "spec": { "holder": "a", "extra": 1 } });
        fields.apply(&mut obj, &a, "a", MAIN, false).unwrap();
        assert_eq!(obj["spec"], json!({ "holder": "a", "extra": 1 }));

        // Same value: shared, no conflict. A different value: conflict.
        fields.apply(&mut obj, &json!({ "spec": { "holder": "a" } }), "b", MAIN, false).unwrap();
        let err =
            fields.apply(&mut obj, &json!({ "spec": { "holder": "b" } }), "b", MAIN, false).unwrap_err();
        assert_eq!(err, vec![("a".to_string(), ".spec.holder".to_string())]);
        fields.apply(&mut obj, &json!({ "spec": { "holder": "b" } }), "b", MAIN, true).unwrap();
        assert_eq!(obj["spec"]["holder"], "b");

        // `a` stops applying `extra`: it goes; `holder` is now b's alone and stays.
        fields.apply(&mut obj, &json!({ "metadata": { "labels": { "k": "v" } } }), "a", MAIN, false).unwrap();
        assert_eq!(obj["spec"], json!({ "holder": "b" }));
        assert_eq!(fields.applied_by("a", MAIN).map(BTreeSet::len), Some(1));

        // Dropping the last label removes the emptied `labels` map.
        fields.apply(&mut obj, &json!({}), "a", MAIN, false).unwrap();
        assert_eq!(obj["metadata"], json!({ "name": "l" }));
    }

    #[test]
    fn update_takes_ownership() {
        let mut fields = ManagedFields::default();
        let mut obj = json!({});
        fields.apply(&mut obj, &json!({ "spec": { "x": 1 } }), "a", MAIN, false).unwrap();
        let old = obj.clone();
        obj["spec"]["x"] = json!(2);
        fields.update(&old, &obj, "editor", MAIN);
        // `a` no longer owns x, so a's apply of another value does not conflict with itself, and
        // the editor's ownership makes a different manager's apply conflict.
        assert!(fields.apply(&mut obj.clone(), &json!({ "spec": { "x": 3 } }), "c", MAIN, false).is_err());
        assert!(fields.applied_by("a", MAIN).is_none());
    }
}
