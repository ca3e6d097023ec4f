//! Store semantics without HTTP: versions, status separation, no-op writes, finalizers, garbage
//! collection and history expiry.

use serde_json::json;

use super::*;

fn pods() -> ResourceType {
    ResourceType::namespaced("v1", "Pod", "pods")
}

fn cms() -> ResourceType {
    ResourceType::namespaced("v1", "ConfigMap", "configmaps").without_status()
}

const W: Writer<'static> = Writer { manager: "test", dry_run: false };

fn pod(name: &str) -> Value {
    json!({ "apiVersion": "v1", "kind": "Pod", "metadata": { "name": name }, "spec": { "nodeName": "a" } })
}

#[test]
fn create_sets_server_metadata_and_drops_status() {
    let mut store = Store::new(100, false);
    let mut body = pod("p");
    body["status"] = json!({ "phase": "Running" });
    body["metadata"]["uid"] = json!("client-uid");
    let created = store.create(&pods(), "ns", body, W).unwrap();
    assert_eq!(created["metadata"]["namespace"], "ns");
    assert_eq!(created["metadata"]["resourceVersion"], "1");
    assert_eq!(created["metadata"]["generation"], 1);
    assert_ne!(created["metadata"]["uid"], "client-uid");
    assert!(created.get("status").is_none());
    assert_eq!(store.create(&pods(), "ns", pod("p"), W).unwrap_err().code, 409);
}

#[test]
fn status_and_main_writes_are_separate() {
    let mut store = Store::new(100, false);
    store.create(&pods(), "ns", pod("p"), W).unwrap();
    let mut with_status = pod("p");
    with_status["status"] = json!({ "phase": "Running" });
    with_status["spec"]["nodeName"] = json!("b");
    let after = store.replace(&pods(), "ns", "p", with_status.clone(), true, W).unwrap();
    assert_eq!(after["status"]["phase"], "Running");
    assert_eq!(after["spec"]["nodeName"], "a", "a status write keeps the spec");
    assert_eq!(after["metadata"]["generation"], 1);
    with_status["status"] = json!({ "phase": "Failed" });
    let after = store.replace(&pods(), "ns", "p", with_status, false, W).unwrap();
    assert_eq!(after["status"]["phase"], "Running", "a main write keeps the status");
    assert_eq!(after["spec"]["nodeName"], "b");
    assert_eq!(after["metadata"]["generation"], 2);

    // Without a status subresource, status is an ordinary field.
    let cm = json!({ "metadata": { "name": "c" }, "status": { "x": 1 } });
    assert_eq!(store.create(&cms(), "ns", cm, W).unwrap()["status"]["x"], 1);
}

#[test]
fn stale_versions_conflict_and_noop_writes_emit_nothing() {
    let mut store = Store::new(100, false);
    store.create(&pods(), "ns", pod("p"), W).unwrap();
    let mut stale = pod("p");
    stale["metadata"]["resourceVersion"] = json!("999");
    assert_eq!(store.replace(&pods(), "ns", "p", stale, false, W).unwrap_err().reason, "Conflict");
    let rv = store.resource_version();
    store.replace(&pods(), "ns", "p", pod("p"), false, W).unwrap();
    store
        .patch(&pods(), "ns", "p", &PatchBody::Merge(json!({ "spec": { "nodeName": "a" } })), false, W)
        .unwrap();
    assert_eq!(store.resource_version(), rv);
    let merge_rv = json!({ "metadata": { "resourceVersion": "1" }, "spec": { "x": 1 } });
    assert!(store.patch(&pods(), "ns", "p", &PatchBody::Merge(merge_rv), false, W).is_ok());
    let stale_merge = json!({ "metadata": { "resourceVersion": "1" }, "spec": { "x": 2 } });
    assert_eq!(
        store.patch(&pods(), "ns", "p", &PatchBody::Merge(stale_merge), false, W).unwrap_err().code,
        409
    );
}

#[test]
fn finalizers_hold_deletion_until_removed() {
    let mut store = Store::new(100, false);
    let mut body = pod("p");
    body["metadata"]["finalizers"] = json!(["example.com/hold"]);
    store.create(&pods(), "ns", body, W).unwrap();
    let marked = store.delete(&pods(), "ns", "p", &DeleteOptions::default(), false).unwrap();
    assert!(marked["metadata"]["deletionTimestamp"].is_string());
    assert!(store.get(&pods(), "ns", "p").is_some());
    let release = json!({ "metadata": { "finalizers": null } });
    store.patch(&pods(), "ns", "p", &PatchBody::Merge(release), false, W).unwrap();
    assert!(store.get(&pods(), "ns", "p").is_none());
    let events = store.events_after(0).unwrap();
    let kinds: Vec<EventType> = events.iter().map(|e| e.kind).collect();
    assert_eq!(kinds, [EventType::Added, EventType::Modified, EventType::Deleted]);
}

#[test]
fn garbage_collection_follows_owners() {
    let mut store = Store::new(100, false);
    let owner = store.create(&cms(), "ns", json!({ "metadata": { "name": "owner" } }), W).unwrap();
    let other = store.create(&cms(), "ns", json!({ "metadata": { "name": "other" } }), W).unwrap();
    let owned_by = |uids: &[&Value]| {
        let refs: Vec<Value> =
            uids.iter().map(|u| json!({ "uid": u, "name": "x", "kind": "ConfigMap" })).collect();
        json!(refs)
    };
    let uid = &owner["metadata"]["uid"];
    let mut child = pod("child");
    child["metadata"]["ownerReferences"] = owned_by(&[uid]);
    let child = store.create(&pods(), "ns", child, W).unwrap();
    let mut grandchild = json!({ "metadata": { "name": "grandchild" } });
    grandchild["metadata"]["ownerReferences"] = owned_by(&[&child["metadata"]["uid"]]);
    store.create(&cms(), "ns", grandchild, W).unwrap();
    let mut shared = pod("shared");
    shared["metadata"]["ownerReferences"] = owned_by(&[uid, &other["metadata"]["uid"]]);
    store.create(&pods(), "ns", shared, W).unwrap();

    store.delete(&cms(), "ns", "owner", &DeleteOptions::default(), false).unwrap();
    assert!(store.get(&pods(), "ns", "child").is_none());
    assert!(store.get(&cms(), "ns", "grandchild").is_none());
    let shared = store.get(&pods(), "ns", "shared").unwrap();
    assert_eq!(shared["metadata"]["ownerReferences"].as_array().map(Vec::len), Some(1));
}

#[test]
fn history_expires() {
    let mut store = Store::new(2, false);
    for name in ["a", "b", "c"] {
        store.create(&pods(), "ns", pod(name), W).unwrap();
    }
    assert!(store.events_after(0).is_err());
    assert_eq!(store.events_after(1).unwrap().len(), 2);
    assert_eq!(store.events_after(3).unwrap().len(), 0);
}

#[test]
fn apply_creates_updates_and_conflicts() {
    let mut store = Store::new(100, false);
    let apply = |object: Value, force| PatchBody::Apply { object, force };
    let mine = Writer { manager: "mine", dry_run: false };
    let theirs = Writer { manager: "theirs", dry_run: false };
    let body =
        json!({ "apiVersion": "v1", "kind": "Pod", "metadata": { "name": "p" }, "spec": { "a": 1, "b": 1 } });
    let (created, was_created) = store.patch(&pods(), "ns", "p", &apply(body, false), false, mine).unwrap();
    assert!(was_created);
    assert_eq!(created["spec"], json!({ "a": 1, "b": 1 }));
    let change = json!({ "metadata": { "name": "p" }, "spec": { "a": 2 } });
    let err = store.patch(&pods(), "ns", "p", &apply(change.clone(), false), false, theirs).unwrap_err();
    assert_eq!((err.code, err.reason), (409, "Conflict"));
    assert!(err.message.contains("mine"), "{}", err.message);
    store.patch(&pods(), "ns", "p", &apply(change, true), false, theirs).unwrap();
    let (after, _) =
        store.patch(&pods(), "ns", "p", &apply(json!({ "spec": { "b": 1 } }), false), false, mine).unwrap();
    assert_eq!(after["spec"], json!({ "a": 2, "b": 1 }));
    let (after, _) = store.patch(&pods(), "ns", "p", &apply(json!({}), false), false, mine).unwrap();
    assert_eq!(after["spec"], json!({ "a": 2 }), "fields mine stopped applying go");
}

#[test]
fn namespaces_can_be_required_and_take_their_objects() {
    let namespaces = ResourceType::cluster("v1", "Namespace", "namespaces");
    let mut store = Store::new(100, true);
    let err = store.create(&pods(), "ns", pod("p"), W).unwrap_err();
    assert_eq!((err.code, err.message.as_str()), (404, "namespaces \"ns\" not found"));
    let ns = store.create(&namespaces, "", json!({ "metadata": { "name": "ns" } }), W).unwrap();
    assert_eq!(ns["metadata"]["labels"]["kubernetes.io/metadata.name"], "ns");
    store.create(&pods(), "ns", pod("p"), W).unwrap();
    store.create(&pods(), "other", pod("q"), W).unwrap_err();
    store.delete(&namespaces, "", "ns", &DeleteOptions::default(), false).unwrap();
    assert!(store.get(&pods(), "ns", "p").is_none());
}
