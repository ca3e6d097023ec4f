//! Writes: create, replace, the patch flavours and server-side apply, on the main resource or its
//! `/status` subresource, plus the test handle's direct inserts.

use serde_json::{Value, json};

use super::{Key, Objects, Store, Stored, key_of, meta_str, present};
use crate::kube_api::defaults;
use crate::kube_api::error::ApiError;
use crate::kube_api::fields::{ManagedFields, SYSTEM_METADATA, Scope};
use crate::kube_api::ids::now_rfc3339;
use crate::kube_api::patch::{self, JsonPatchError};
use crate::kube_api::registry::{GroupResource, ResourceType, split_api_version};

/// A patch request body, by content type.
#[derive(Clone, Debug)]
pub(crate) enum PatchBody {
    /// `application/apply-patch+yaml`: server-side apply.
    Apply { object: Value, force: bool },
    /// `application/merge-patch+json`.
    Merge(Value),
    /// `application/strategic-merge-patch+json`, read as a merge patch.
    Strategic(Value),
    /// `application/json-patch+json`.
    Json(Value),
}

/// Who writes, and whether the write is a dry run (`dryRun=All`).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Writer<'a> {
    pub manager: &'a str,
    pub dry_run: bool,
}

/// How a write changes field ownership.
enum Ownership<'a> {
    /// A non-apply write by this manager.
    Update(&'a str),
    /// Already worked out (server-side apply).
    Set(ManagedFields),
}

/// What a write to an existing object may change, and how.
struct Change<'a> {
    scope: Scope,
    ownership: Ownership<'a>,
    dry_run: bool,
}

fn scope_of(res: &ResourceType, status: bool) -> Scope {
    if status { Scope::Status } else { Scope::Main { status_subresource: res.status_subresource } }
}

/// Rejects bodies whose shape the rest of the server relies on being right.
pub(crate) fn check_shape(object: &Value) -> Result<(), ApiError> {
    let bad = |what: &str| Err(ApiError::bad_request(what.to_string()));
    let Some(map) = object.as_object() else { return bad("the object must be a JSON object") };
    for key in ["apiVersion", "kind"] {
        if map.get(key).is_some_and(|v| !v.is_string()) {
            return bad(&format!("{key} must be a string"));
        }
    }
    let Some(meta) = map.get("metadata") else { return Ok(()) };
    let Some(meta) = meta.as_object() else { return bad("metadata must be an object") };
    let field = |key: &str| meta.get(key).filter(|v| !v.is_null());
    for key in ["name", "namespace", "generateName", "resourceVersion", "uid"] {
        if field(key).is_some_and(|v| !v.is_string()) {
            return bad(&format!("metadata.{key} must be a string"));
        }
    }
    for key in ["labels", "annotations"] {
        if field(key).is_some_and(|v| !v.as_object().is_some_and(|m| m.values().all(Value::is_string))) {
            return bad(&format!("metadata.{key} must be a map of strings"));
        }
    }
    if field("finalizers").is_some_and(|v| !v.as_array().is_some_and(|l| l.iter().all(Value::is_string))) {
        return bad("metadata.finalizers must be a list of strings");
    }
    if field("ownerReferences").is_some_and(|v| !v.as_array().is_some_and(|l| l.iter().all(Value::is_object)))
    {
        return bad("metadata.ownerReferences must be a list of objects");
    }
    Ok(())
}

/// The body's kind and group, when given, must be the endpoint's.
fn check_type(res: &ResourceType, object: &Value) -> Result<(), ApiError> {
    if let Some(kind) = object.get("kind").and_then(Value::as_str)
        && kind != res.kind
    {
        return Err(ApiError::bad_request(format!(
            "the kind {kind:?} does not match the endpoint's {:?}",
            res.kind
        )));
    }
    if let Some(api_version) = object.get("apiVersion").and_then(Value::as_str) {
        let (group, _) = split_api_version(api_version);
        if group != res.group {
            return Err(ApiError::bad_request(format!(
                "the apiVersion {api_version:?} does not match the endpoint's group {:?}",
                res.group
            )));
        }
    }
    Ok(())
}

/// The body's name and namespace, when given, must be the URL's.
fn check_identity(
    res: &ResourceType,
    object: &Value,
    namespace: &str,
    name: Option<&str>,
) -> Result<(), ApiError> {
    if let (Some(name), Some(given)) = (name, meta_str(object, "name").filter(|n| !n.is_empty()))
        && given != name
    {
        return Err(ApiError::bad_request(format!(
            "the name of the object ({given}) does not match the name on the URL ({name})"
        )));
    }
    if res.namespaced
        && let Some(given) = meta_str(object, "namespace").filter(|n| !n.is_empty())
        && given != namespace
    {
        return Err(ApiError::bad_request(
            "the namespace of the provided object does not match the namespace sent on the request",
        ));
    }
    Ok(())
}

fn check_name(res: &ResourceType, name: &str) -> Result<(), ApiError> {
    let ok = !name.is_empty()
        && name.len() <= 253
        && name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_' | ':'));
    if ok { Ok(()) } else { Err(ApiError::invalid(res, name, "metadata.name: Invalid value")) }
}

/// Whether anything but metadata and status differs (what bumps `metadata.generation`).
fn spec_changed(old: &Value, new: &Value) -> bool {
    let body = |v: &Value| -> Vec<(String, Value)> {
        v.as_object()
            .map(|m| {
                m.iter()
                    .filter(|(k, _)| !matches!(k.as_str(), "apiVersion" | "kind" | "metadata" | "status"))
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect()
            })
            .unwrap_or_default()
    };
    let (mut a, mut b) = (body(old), body(new));
    a.sort_by(|x, y| x.0.cmp(&y.0));
    b.sort_by(|x, y| x.0.cmp(&y.0));
    a != b
}

pub(super) fn has_finalizers(object: &Value) -> bool {
    object.pointer("/metadata/finalizers").and_then(Value::as_array).is_some_and(|l| !l.is_empty())
}

/// The part of an applied configuration that `scope` lets it set, without server-owned metadata.
fn cut_for_apply(object: &Value, scope: Scope) -> Value {
    let mut applied = object.clone();
    if let Some(meta) = applied.get_mut("metadata").and_then(Value::as_object_mut) {
        meta.retain(|k, _| !SYSTEM_METADATA.contains(&k.as_str()));
    }
    if let Some(map) = applied.as_object_mut() {
        map.remove("apiVersion");
        map.remove("kind");
        match scope {
            Scope::Main { status_subresource: true } => {
                map.remove("status");
            }
            Scope::Main { status_subresource: false } => {}
            Scope::Status => map.retain(|k, _| k == "status"),
        }
    }
    applied
}

impl Store {
    /// POST: creates an object in `namespace` (ignored for cluster-scoped kinds).
    pub fn create(
        &mut self,
        res: &ResourceType,
        namespace: &str,
        mut object: Value,
        writer: Writer<'_>,
    ) -> Result<Value, ApiError> {
        check_shape(&object)?;
        check_type(res, &object)?;
        check_identity(res, &object, namespace, None)?;
        let name = self.name_for_create(res, &object)?;
        if res.status_subresource
            && let Some(map) = object.as_object_mut()
        {
            map.remove("status");
        }
        self.insert_new(res, namespace, &name, object, Ownership::Update(writer.manager), writer.dry_run)
    }

    /// PUT: replaces an object (or, with `status`, only its status).
    pub fn replace(
        &mut self,
        res: &ResourceType,
        namespace: &str,
        name: &str,
        object: Value,
        status: bool,
        writer: Writer<'_>,
    ) -> Result<Value, ApiError> {
        check_shape(&object)?;
        check_type(res, &object)?;
        check_identity(res, &object, namespace, Some(name))?;
        let stored = self.stored(res, namespace, name).ok_or_else(|| ApiError::not_found(res, name))?;
        let given = meta_str(&object, "resourceVersion").filter(|rv| !rv.is_empty());
        if given.is_some_and(|rv| Some(rv) != meta_str(&stored.object, "resourceVersion")) {
            return Err(ApiError::conflict(res, name));
        }
        let change = Change {
            scope: scope_of(res, status),
            ownership: Ownership::Update(writer.manager),
            dry_run: writer.dry_run,
        };
        self.write_existing(res, namespace, name, object, change)
    }

    /// PATCH: applies `body` to an object; server-side apply creates a missing one. The flag tells
    /// whether the object was created.
    pub fn patch(
        &mut self,
        res: &ResourceType,
        namespace: &str,
        name: &str,
        body: &PatchBody,
        status: bool,
        writer: Writer<'_>,
    ) -> Result<(Value, bool), ApiError> {
        let scope = scope_of(res, status);
        let Some(stored) = self.stored(res, namespace, name) else {
            return match body {
                PatchBody::Apply { object, force } if !status => {
                    Ok((self.apply_create(res, namespace, name, object, *force, writer)?, true))
                }
                _ => Err(ApiError::not_found(res, name)),
            };
        };
        let old_rv = meta_str(&stored.object, "resourceVersion").unwrap_or_default().to_string();
        let mut new = stored.object.clone();
        let ownership = match body {
            PatchBody::Merge(p) => {
                patch::merge_patch(&mut new, p);
                Ownership::Update(writer.manager)
            }
            PatchBody::Strategic(p) => {
                patch::strategic_merge_patch(&mut new, p);
                Ownership::Update(writer.manager)
            }
            PatchBody::Json(p) => {
                patch::json_patch(&mut new, p).map_err(|e| match e {
                    JsonPatchError::Malformed(m) => ApiError::bad_request(m),
                    JsonPatchError::Failed(m) => ApiError::invalid(res, name, m),
                })?;
                Ownership::Update(writer.manager)
            }
            PatchBody::Apply { object, force } => {
                check_shape(object)?;
                check_type(res, object)?;
                check_identity(res, object, namespace, Some(name))?;
                let given = meta_str(object, "resourceVersion").filter(|rv| !rv.is_empty());
                if given.is_some_and(|rv| rv != old_rv) {
                    return Err(ApiError::conflict(res, name));
                }
                let mut fields = stored.fields.clone();
                fields
                    .apply(&mut new, &cut_for_apply(object, scope), writer.manager, scope, *force)
                    .map_err(|conflicts| ApiError::apply_conflict(res, name, &conflicts))?;
                Ownership::Set(fields)
            }
        };
        check_shape(&new).map_err(|e| ApiError::invalid(res, name, e.message))?;
        if meta_str(&new, "resourceVersion").is_some_and(|rv| rv != old_rv) {
            return Err(ApiError::conflict(res, name));
        }
        let change = Change { scope, ownership, dry_run: writer.dry_run };
        Ok((self.write_existing(res, namespace, name, new, change)?, false))
    }

    fn apply_create(
        &mut self,
        res: &ResourceType,
        namespace: &str,
        name: &str,
        object: &Value,
        force: bool,
        writer: Writer<'_>,
    ) -> Result<Value, ApiError> {
        check_shape(object)?;
        check_type(res, object)?;
        check_identity(res, object, namespace, Some(name))?;
        check_name(res, name)?;
        let scope = scope_of(res, false);
        let mut created = json!({ "metadata": { "name": name } });
        let mut fields = ManagedFields::default();
        fields
            .apply(&mut created, &cut_for_apply(object, scope), writer.manager, scope, force)
            .map_err(|conflicts| ApiError::apply_conflict(res, name, &conflicts))?;
        self.insert_new(res, namespace, name, created, Ownership::Set(fields), writer.dry_run)
    }

    /// The test handle's insert: the whole object as given (status included), in
    /// `metadata.namespace` (`default` when absent). With `overwrite`, replaces an existing one.
    pub fn put(&mut self, res: &ResourceType, object: Value, overwrite: bool) -> Result<Value, ApiError> {
        check_shape(&object)?;
        check_type(res, &object)?;
        let namespace = match meta_str(&object, "namespace").filter(|n| !n.is_empty()) {
            Some(ns) if res.namespaced => ns.to_string(),
            _ if res.namespaced => "default".to_string(),
            _ => String::new(),
        };
        let name = self.name_for_create(res, &object)?;
        let manager = Ownership::Update(super::HANDLE_MANAGER);
        if self.stored(res, &namespace, &name).is_none() {
            return self.insert_new(res, &namespace, &name, object, manager, false);
        }
        if !overwrite {
            return Err(ApiError::already_exists(res, &name));
        }
        let whole = Scope::Main { status_subresource: false };
        let change = Change { scope: whole, ownership: manager, dry_run: false };
        self.write_existing(res, &namespace, &name, object, change)
    }

    /// The test handle's status write.
    pub fn set_status(
        &mut self,
        res: &ResourceType,
        namespace: &str,
        name: &str,
        status: Value,
    ) -> Result<Value, ApiError> {
        let stored = self.stored(res, namespace, name).ok_or_else(|| ApiError::not_found(res, name))?;
        let mut object = stored.object.clone();
        object["status"] = status;
        let manager = Ownership::Update(super::HANDLE_MANAGER);
        let change = Change { scope: Scope::Status, ownership: manager, dry_run: false };
        self.write_existing(res, namespace, name, object, change)
    }

    /// `metadata.name`, or `metadata.generateName` plus a random suffix.
    fn name_for_create(&mut self, res: &ResourceType, object: &Value) -> Result<String, ApiError> {
        let name = match meta_str(object, "name").filter(|n| !n.is_empty()) {
            Some(name) => name.to_string(),
            None => match meta_str(object, "generateName").filter(|n| !n.is_empty()) {
                Some(prefix) => format!("{prefix}{}", self.ids.name_suffix()),
                None => {
                    return Err(ApiError::invalid(
                        res,
                        "",
                        "metadata.name: Required value: name or generateName is required",
                    ));
                }
            },
        };
        check_name(res, &name)?;
        Ok(name)
    }

    /// Stores a new object: server-owned metadata, defaults, ownership, an `ADDED` event.
    fn insert_new(
        &mut self,
        res: &ResourceType,
        namespace: &str,
        name: &str,
        mut object: Value,
        ownership: Ownership<'_>,
        dry_run: bool,
    ) -> Result<Value, ApiError> {
        if self.stored(res, namespace, name).is_some() {
            return Err(ApiError::already_exists(res, name));
        }
        self.check_namespace_exists(res, namespace)?;
        object["apiVersion"] = json!(res.api_version());
        object["kind"] = json!(res.kind);
        if let Some(meta) = object["metadata"].as_object_mut() {
            meta.retain(|k, _| !SYSTEM_METADATA.contains(&k.as_str()));
        }
        let meta = &mut object["metadata"];
        meta["name"] = json!(name);
        if res.namespaced {
            meta["namespace"] = json!(namespace);
        }
        meta["uid"] = json!(self.ids.uid());
        meta["creationTimestamp"] = json!(now_rfc3339());
        meta["generation"] = json!(1);
        let objects = &self.objects;
        defaults::apply(res, &mut object, None, &mut self.cluster_ips, || service_ips(objects))?;
        let fields = match ownership {
            Ownership::Set(fields) => fields,
            Ownership::Update(manager) => {
                let mut fields = ManagedFields::default();
                fields.update(&json!({}), &object, manager, scope_of(res, false));
                fields
            }
        };
        if dry_run {
            return Ok(present(res, &object));
        }
        let key = key_of(res, namespace, name);
        Ok(present(res, &self.commit(&res.group_resource(), key, object, fields)))
    }

    /// Stores a changed object: keeps what `scope` may not change and the server-owned metadata,
    /// applies defaults, bumps the generation on spec changes, and finishes a deletion whose last
    /// finalizer went. A write that changes nothing emits no event.
    fn write_existing(
        &mut self,
        res: &ResourceType,
        namespace: &str,
        name: &str,
        new: Value,
        change: Change<'_>,
    ) -> Result<Value, ApiError> {
        let Change { scope, ownership, dry_run } = change;
        let resource = res.group_resource();
        let key: Key = key_of(res, namespace, name);
        let Some(Stored { object: old, fields }) =
            self.objects.get(&resource).and_then(|b| b.get(&key)).cloned()
        else {
            return Err(ApiError::not_found(res, name));
        };
        let mut new = restrict(new, &old, scope);
        keep_server_metadata(&mut new, &old);
        let objects = &self.objects;
        defaults::apply(res, &mut new, Some(&old), &mut self.cluster_ips, || {
            service_ips(objects)
                .into_iter()
                .filter(|ip| Some(ip.as_str()) != old["spec"]["clusterIP"].as_str())
                .collect()
        })?;
        if spec_changed(&old, &new) {
            let generation = old["metadata"]["generation"].as_i64().unwrap_or(0);
            new["metadata"]["generation"] = json!(generation + 1);
        }
        let fields = match ownership {
            Ownership::Set(fields) => fields,
            Ownership::Update(manager) => {
                let mut fields = fields;
                fields.update(&old, &new, manager, scope);
                fields
            }
        };
        if dry_run {
            return Ok(present(res, &new));
        }
        if new == old {
            if let Some(stored) = self.objects.get_mut(&resource).and_then(|b| b.get_mut(&key)) {
                stored.fields = fields;
            }
            return Ok(present(res, &old));
        }
        if !new["metadata"]["deletionTimestamp"].is_null() && !has_finalizers(&new) {
            let removed =
                self.finish_deletion(&resource, &key, new).ok_or_else(|| ApiError::not_found(res, name))?;
            return Ok(present(res, &removed));
        }
        Ok(present(res, &self.commit(&resource, key, new, fields)))
    }
}

/// `new` cut to what `scope` may change, the rest taken from `old`.
fn restrict(mut new: Value, old: &Value, scope: Scope) -> Value {
    match scope {
        Scope::Main { status_subresource: false } => new,
        Scope::Main { status_subresource: true } => {
            match (new.as_object_mut(), old.get("status")) {
                (Some(map), Some(status)) => map.insert("status".into(), status.clone()),
                (Some(map), None) => map.remove("status"),
                (None, _) => None,
            };
            new
        }
        Scope::Status => {
            let mut out = old.clone();
            match (out.as_object_mut(), new.get_mut("status").map(std::mem::take)) {
                (Some(map), Some(status)) if !status.is_null() => map.insert("status".into(), status),
                (Some(map), _) => map.remove("status"),
                (None, _) => None,
            };
            out
        }
    }
}

/// Copies the metadata only the server sets from `old` to `new`.
fn keep_server_metadata(new: &mut Value, old: &Value) {
    for key in ["apiVersion", "kind"] {
        new[key] = old[key].clone();
    }
    if !new["metadata"].is_object() {
        new["metadata"] = json!({});
    }
    for key in SYSTEM_METADATA {
        match old["metadata"].get(*key) {
            Some(value) => new["metadata"][*key] = value.clone(),
            None => {
                if let Some(meta) = new["metadata"].as_object_mut() {
                    meta.remove(*key);
                }
            }
        }
    }
}

/// Cluster IPs of every stored Service.
fn service_ips(objects: &Objects) -> Vec<String> {
    let services = GroupResource { group: String::new(), plural: "services".into() };
    objects
        .get(&services)
        .map(|b| {
            b.values().filter_map(|s| s.object["spec"]["clusterIP"].as_str().map(str::to_string)).collect()
        })
        .unwrap_or_default()
}
