//! The in-repo Kubernetes API server against the real kube-rs client over real HTTP: typed and
//! dynamic CRUD, the status subresource, server-side apply, conflicts, selectors on list and
//! watch, `kube::runtime::watcher` through reconnects and re-lists, garbage collection, Service
//! defaulting, unknown resources, bad input and bearer tokens.

use std::time::Duration;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Pod, Service};
use kube::api::{
    Api, ApiResource, DeleteParams, DynamicObject, GroupVersionKind, ListParams, Patch, PatchParams,
    PostParams, WatchEvent, WatchParams,
};
use kube::runtime::watcher;
use kube::{Client, Config, ResourceExt};
use mesh_tests::kube_api::{KubeApi, KubeApiServer, ResourceType};
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tokio_stream::StreamExt;

const WAIT: Duration = Duration::from_secs(10);

fn client_for(api: &KubeApi) -> Client {
    let config = Config::new(api.url().parse().expect("server url"));
    Client::try_from(config).expect("kube client")
}

async fn start() -> (KubeApi, Client) {
    let api = KubeApiServer::start().await.expect("start the kube api server");
    let client = client_for(&api);
    (api, client)
}

fn pod(name: &str, node: &str) -> Pod {
    serde_json::from_value(json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": { "name": name, "labels": { "app": "web" } },
        "spec": { "nodeName": node, "containers": [{ "name": "app", "image": "app:1" }] },
    }))
    .expect("pod")
}

fn api_code<T: std::fmt::Debug>(result: Result<T, kube::Error>) -> (u16, String) {
    match result {
        Err(kube::Error::Api(status)) => (status.code, status.reason.clone()),
        other => panic!("expected an API error, got {other:?}"),
    }
}

fn gateway_resource() -> ApiResource {
    let gvk = GroupVersionKind::gvk("gateway.networking.k8s.io", "v1", "Gateway");
    ApiResource::from_gvk_with_plural(&gvk, "gateways")
}

#[tokio::test]
async fn typed_crud_over_http() {
    let (api, client) = start().await;

    let namespaces: Api<Namespace> = Api::all(client.clone());
    let ns: Namespace = serde_json::from_value(json!({ "metadata": { "name": "team-a" } })).unwrap();
    namespaces.create(&PostParams::default(), &ns).await.unwrap();
    let ns = namespaces.get("team-a").await.unwrap();
    assert_eq!(ns.labels().get("kubernetes.io/metadata.name").map(String::as_str), Some("team-a"));
    assert_eq!(ns.status.and_then(|s| s.phase).as_deref(), Some("Active"));
    assert_eq!(namespaces.list(&ListParams::default()).await.unwrap().items.len(), 1);

    let pods: Api<Pod> = Api::namespaced(client.clone(), "team-a");
    let created = pods.create(&PostParams::default(), &pod("web-1", "node-a")).await.unwrap();
    assert_eq!(created.namespace().as_deref(), Some("team-a"));
    assert!(created.uid().is_some());
    assert!(created.metadata.creation_timestamp.is_some());
    assert_eq!(created.metadata.generation, Some(1));
    let (code, reason) = api_code(pods.create(&PostParams::default(), &pod("web-1", "node-a")).await);
    assert_eq!((code, reason.as_str()), (409, "AlreadyExists"));

    let mut fetched = pods.get("web-1").await.unwrap();
    assert_eq!(fetched.resource_version(), created.resource_version());
    fetched.labels_mut().insert("version".into(), "v2".into());
    let replaced = pods.replace("web-1", &PostParams::default(), &fetched).await.unwrap();
    assert_eq!(replaced.labels().get("version").map(String::as_str), Some("v2"));
    assert_ne!(replaced.resource_version(), created.resource_version());
    assert_eq!(replaced.metadata.generation, Some(1), "a label change is not a spec change");

    let listed = pods.list(&ListParams::default().labels("version in (v2,v3),app")).await.unwrap();
    assert_eq!(listed.items.iter().map(|p| p.name_any()).collect::<Vec<_>>(), ["web-1"]);
    assert!(pods.list(&ListParams::default().labels("version notin (v2)")).await.unwrap().items.is_empty());
    assert!(listed.metadata.resource_version.is_some_and(|rv| !rv.is_empty()));

    let deleted = pods.delete("web-1", &DeleteParams::default()).await.unwrap();
    assert!(deleted.left().is_some_and(|p| p.name_any() == "web-1"), "DELETE returns the object");
    assert!(pods.get_opt("web-1").await.unwrap().is_none());
    let (code, reason) = api_code(pods.get("web-1").await);
    assert_eq!((code, reason.as_str()), (404, "NotFound"));
    let (code, _) = api_code(pods.delete("web-1", &DeleteParams::default()).await);
    assert_eq!(code, 404);

    let leases: Api<Lease> = Api::namespaced(client.clone(), "team-a");
    let lease: Lease = serde_json::from_value(json!({
        "metadata": { "name": "leader" },
        "spec": { "holderIdentity": "a", "leaseDurationSeconds": 15 },
    }))
    .unwrap();
    let mut lease = leases.create(&PostParams::default(), &lease).await.unwrap();
    lease.spec.as_mut().unwrap().holder_identity = Some("b".into());
    let lease = leases.replace("leader", &PostParams::default(), &lease).await.unwrap();
    assert_eq!(lease.spec.and_then(|s| s.holder_identity).as_deref(), Some("b"));
    let stored = api.get("coordination.k8s.io/v1", "Lease", Some("team-a"), "leader").unwrap();
    assert_eq!(stored["spec"]["holderIdentity"], "b", "the handle sees what the client wrote");

    let reqs = api.requests();
    assert!(
        reqs.iter().any(|r| r.method == "PUT" && r.uri.starts_with("/api/v1/namespaces/team-a/pods/web-1?"))
    );
    assert!(reqs.iter().any(|r| r.method == "POST" && r.content_type.as_deref() == Some("application/json")));
}

#[tokio::test]
async fn services_get_cluster_ips() {
    let (_api, client) = start().await;
    let services: Api<Service> = Api::namespaced(client, "default");
    let svc = |name: &str, cluster_ip: Option<&str>| -> Service {
        let mut spec = json!({ "ports": [{ "port": 80 }], "selector": { "app": name } });
        if let Some(ip) = cluster_ip {
            spec["clusterIP"] = json!(ip);
        }
        serde_json::from_value(json!({ "metadata": { "name": name }, "spec": spec })).unwrap()
    };
    let pp = PostParams::default();
    let a = services.create(&pp, &svc("a", None)).await.unwrap().spec.unwrap();
    assert_eq!(a.cluster_ip.as_deref(), Some("10.96.0.10"));
    assert_eq!(a.cluster_ips, Some(vec!["10.96.0.10".to_string()]));
    assert_eq!(a.type_.as_deref(), Some("ClusterIP"));
    let b = services.create(&pp, &svc("b", None)).await.unwrap().spec.unwrap();
    assert_eq!(b.cluster_ip.as_deref(), Some("10.96.0.11"));
    let headless = services.create(&pp, &svc("h", Some("None"))).await.unwrap().spec.unwrap();
    assert_eq!(headless.cluster_ip.as_deref(), Some("None"));

    // A replace without the address keeps it.
    let mut a = services.get("a").await.unwrap();
    a.spec.as_mut().unwrap().cluster_ip = None;
    a.spec.as_mut().unwrap().cluster_ips = None;
    let a = services.replace("a", &pp, &a).await.unwrap();
    assert_eq!(a.spec.unwrap().cluster_ip.as_deref(), Some("10.96.0.10"));
}

#[tokio::test]
async fn stale_replace_conflicts() {
    let (_api, client) = start().await;
    let maps: Api<ConfigMap> = Api::namespaced(client, "default");
    let cm: ConfigMap =
        serde_json::from_value(json!({ "metadata": { "name": "c" }, "data": { "k": "1" } })).unwrap();
    let original = maps.create(&PostParams::default(), &cm).await.unwrap();
    let mut first = original.clone();
    first.data.as_mut().unwrap().insert("k".into(), "2".into());
    maps.replace("c", &PostParams::default(), &first).await.unwrap();

    let mut stale = original;
    stale.data.as_mut().unwrap().insert("k".into(), "3".into());
    let (code, reason) = api_code(maps.replace("c", &PostParams::default(), &stale).await);
    assert_eq!((code, reason.as_str()), (409, "Conflict"));
    let data = maps.get("c").await.unwrap().data.unwrap();
    assert_eq!(data.get("k").map(String::as_str), Some("2"));
}

#[tokio::test]
async fn gateway_status_and_server_side_apply() {
    let (api, client) = start().await;
    let gateways: Api<DynamicObject> = Api::namespaced_with(client.clone(), "default", &gateway_resource());
    let manifest = |port: u16| {
        json!({
            "apiVersion": "gateway.networking.k8s.io/v1",
            "kind": "Gateway",
            "metadata": { "name": "waypoint", "labels": { "istio.io/waypoint-for": "service" } },
            "spec": {
                "gatewayClassName": "waypoint",
                "listeners": [{ "name": "mesh", "port": port, "protocol": "HBONE" }],
            },
        })
    };
    let pp = PatchParams::apply("mgr").force();

    let created = gateways.patch("waypoint", &pp, &Patch::Apply(&manifest(15008))).await.unwrap();
    assert_eq!(created.metadata.generation, Some(1));
    assert_eq!(created.data["spec"]["listeners"][0]["port"], 15008);
    assert_eq!(created.types.as_ref().map(|t| t.kind.as_str()), Some("Gateway"));

    let status = json!({ "status": { "conditions": [{ "type": "Programmed", "status": "True" }] } });
    let with_status =
        gateways.patch_status("waypoint", &PatchParams::default(), &Patch::Merge(&status)).await.unwrap();
    assert_eq!(with_status.data["status"]["conditions"][0]["type"], "Programmed");
    assert_eq!(with_status.metadata.generation, Some(1), "a status write is not a spec change");
    assert_eq!(with_status.data["spec"]["listeners"][0]["port"], 15008);

    // Status in a write to the main resource is ignored; spec in a status write is ignored.
    let status_in_main =
        json!({ "status": { "conditions": [] }, "metadata": { "annotations": { "a": "b" } } });
    let merged =
        gateways.patch("waypoint", &PatchParams::default(), &Patch::Merge(&status_in_main)).await.unwrap();
    assert_eq!(merged.data["status"]["conditions"][0]["type"], "Programmed");
    assert_eq!(merged.annotations().get("a").map(String::as_str), Some("b"));
    let mut update = manifest(15009);
    update["status"] = json!({ "conditions": [] });
    update["metadata"]["labels"] = json!({});
    let updated = gateways.patch("waypoint", &pp, &Patch::Apply(&update)).await.unwrap();
    assert_eq!(updated.data["spec"]["listeners"][0]["port"], 15009);
    assert_eq!(updated.metadata.generation, Some(2));
    assert_eq!(updated.data["status"]["conditions"][0]["type"], "Programmed");
    assert!(updated.labels().is_empty(), "a label the manager stopped applying is removed");
    assert_eq!(updated.uid(), created.uid());
    let spec_in_status = json!({ "spec": { "gatewayClassName": "other" }, "status": { "addresses": [] } });
    let after =
        gateways.patch_status("waypoint", &PatchParams::default(), &Patch::Merge(&spec_in_status)).await;
    assert_eq!(after.unwrap().data["spec"]["gatewayClassName"], "waypoint");

    // Applying the same configuration again changes nothing.
    let again = gateways.patch("waypoint", &pp, &Patch::Apply(&update)).await.unwrap();
    assert_eq!(again.resource_version(), gateways.get("waypoint").await.unwrap().resource_version());
    assert_eq!(again.metadata.generation, Some(2));

    // Another manager changing an owned field conflicts unless it forces.
    let mut theirs = manifest(15009);
    theirs["spec"]["gatewayClassName"] = json!("other");
    let (code, reason) =
        api_code(gateways.patch("waypoint", &PatchParams::apply("other-mgr"), &Patch::Apply(&theirs)).await);
    assert_eq!((code, reason.as_str()), (409, "Conflict"));
    let forced =
        gateways.patch("waypoint", &PatchParams::apply("other-mgr").force(), &Patch::Apply(&theirs)).await;
    assert_eq!(forced.unwrap().data["spec"]["gatewayClassName"], "other");

    let apply = api.requests().into_iter().find(|r| r.method == "PATCH").expect("a PATCH was logged");
    assert_eq!(apply.content_type.as_deref(), Some("application/apply-patch+yaml"));
    assert!(apply.uri.contains("fieldManager=mgr") && apply.uri.contains("force=true"), "{}", apply.uri);
    assert_eq!(apply.status, 201, "an apply that creates answers 201");
}

#[tokio::test]
async fn merge_and_json_patches() {
    let (_api, client) = start().await;
    let pods: Api<Pod> = Api::namespaced(client, "default");
    pods.create(&PostParams::default(), &pod("p", "node-a")).await.unwrap();
    let merge = json!({ "metadata": { "labels": { "app": null, "tier": "db" } } });
    let patched = pods.patch("p", &PatchParams::default(), &Patch::Merge(&merge)).await.unwrap();
    assert_eq!(patched.labels().get("tier").map(String::as_str), Some("db"));
    assert!(!patched.labels().contains_key("app"));
    let strategic = json!({ "metadata": { "annotations": { "a": "1" } } });
    let patched = pods.patch("p", &PatchParams::default(), &Patch::Strategic(&strategic)).await.unwrap();
    assert_eq!(patched.annotations().get("a").map(String::as_str), Some("1"));
    // The JSON patch type (json_patch::Patch) is inferred from the variant.
    let ops = serde_json::from_value(json!([
        { "op": "test", "path": "/metadata/labels/tier", "value": "db" },
        { "op": "replace", "path": "/metadata/labels/tier", "value": "cache" },
    ]))
    .unwrap();
    let patched = pods.patch("p", &PatchParams::default(), &Patch::<()>::Json(ops)).await;
    assert_eq!(patched.unwrap().labels().get("tier").map(String::as_str), Some("cache"));
    let failing =
        serde_json::from_value(json!([{ "op": "test", "path": "/metadata/labels/tier", "value": "db" }]))
            .unwrap();
    let (code, _) = api_code(pods.patch("p", &PatchParams::default(), &Patch::<()>::Json(failing)).await);
    assert_eq!(code, 422);
}

#[tokio::test]
async fn field_selector_on_list_and_watch() {
    let (api, client) = start().await;
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    let pp = PostParams::default();
    pods.create(&pp, &pod("a1", "node-a")).await.unwrap();
    pods.create(&pp, &pod("b1", "node-b")).await.unwrap();
    Api::<Pod>::namespaced(client.clone(), "other").create(&pp, &pod("a3", "node-a")).await.unwrap();

    let on_a = ListParams::default().fields("spec.nodeName=node-a");
    let listed = pods.list(&on_a).await.unwrap();
    assert_eq!(listed.items.iter().map(|p| p.name_any()).collect::<Vec<_>>(), ["a1"]);
    let everywhere = Api::<Pod>::all(client.clone()).list(&on_a).await.unwrap();
    assert_eq!(everywhere.items.iter().map(|p| p.name_any()).collect::<Vec<_>>(), ["a1", "a3"]);
    let not_a =
        Api::<Pod>::all(client.clone()).list(&ListParams::default().fields("spec.nodeName!=node-a")).await;
    assert_eq!(not_a.unwrap().items.iter().map(|p| p.name_any()).collect::<Vec<_>>(), ["b1"]);

    // A node-scoped watch across namespaces, as ztunnel runs it.
    let rv = everywhere.metadata.resource_version.unwrap();
    let all_pods: Api<Pod> = Api::all(client.clone());
    let stream = all_pods.watch(&WatchParams::default().fields("spec.nodeName=node-a"), &rv).await.unwrap();
    let mut stream = Box::pin(stream);
    pods.create(&pp, &pod("a2", "node-a")).await.unwrap();
    pods.create(&pp, &pod("b2", "node-b")).await.unwrap();
    let to_b = json!({ "spec": { "nodeName": "node-b" } });
    pods.patch("a2", &PatchParams::default(), &Patch::Merge(&to_b)).await.unwrap();
    let to_a = json!({ "spec": { "nodeName": "node-a" } });
    pods.patch("b2", &PatchParams::default(), &Patch::Merge(&to_a)).await.unwrap();
    pods.delete("b1", &DeleteParams::default()).await.unwrap();
    pods.delete("b2", &DeleteParams::default()).await.unwrap();

    let mut seen = Vec::new();
    let collect = async {
        while seen.len() < 4 {
            match stream.next().await.expect("open stream").expect("event") {
                WatchEvent::Added(p) => seen.push(format!("ADDED {} {}", p.name_any(), node_of(&p))),
                WatchEvent::Modified(p) => seen.push(format!("MODIFIED {} {}", p.name_any(), node_of(&p))),
                WatchEvent::Deleted(p) => seen.push(format!("DELETED {} {}", p.name_any(), node_of(&p))),
                WatchEvent::Bookmark(_) => {}
                WatchEvent::Error(e) => panic!("watch error {e:?}"),
            }
        }
    };
    let finished = tokio::time::timeout(WAIT, collect).await;
    assert!(finished.is_ok(), "four events within {WAIT:?}, got {seen:?}");
    // a2 leaves node-a (sent as the last state that matched), b2 arrives; b1 is never seen.
    assert_eq!(seen, ["ADDED a2 node-a", "DELETED a2 node-a", "ADDED b2 node-a", "DELETED b2 node-a"]);
    let watch = api.requests().into_iter().find(|r| r.uri.contains("watch=true")).unwrap();
    assert!(watch.uri.starts_with("/api/v1/pods?"), "{}", watch.uri);
}

fn node_of(p: &Pod) -> String {
    p.spec.as_ref().and_then(|s| s.node_name.clone()).unwrap_or_default()
}

type WatcherEvent = Result<watcher::Event<Pod>, watcher::Error>;

/// Runs `kube::runtime::watcher` on `pods`, forwarding what it yields.
fn run_watcher(pods: Api<Pod>) -> (mpsc::UnboundedReceiver<WatcherEvent>, tokio::task::JoinHandle<()>) {
    run_watcher_with(pods, watcher::Config::default())
}

fn run_watcher_with(
    pods: Api<Pod>,
    config: watcher::Config,
) -> (mpsc::UnboundedReceiver<WatcherEvent>, tokio::task::JoinHandle<()>) {
    let (tx, rx) = mpsc::unbounded_channel();
    let task = tokio::spawn(async move {
        let mut stream = std::pin::pin!(watcher(pods, config));
        while let Some(event) = stream.next().await {
            if tx.send(event).is_err() {
                return;
            }
        }
    });
    (rx, task)
}

/// Waits for an item `want` accepts, returning it; the ones before it are dropped.
async fn next_matching(
    rx: &mut mpsc::UnboundedReceiver<WatcherEvent>,
    what: &str,
    want: impl Fn(&WatcherEvent) -> bool,
) -> WatcherEvent {
    let found = tokio::time::timeout(WAIT, async {
        while let Some(event) = rx.recv().await {
            if want(&event) {
                return Some(event);
            }
        }
        None
    })
    .await;
    found.ok().flatten().unwrap_or_else(|| panic!("watcher did not yield: {what}"))
}

/// Waits for an item `want` accepts.
async fn expect(
    rx: &mut mpsc::UnboundedReceiver<WatcherEvent>,
    what: &str,
    want: impl Fn(&WatcherEvent) -> bool,
) {
    drop(next_matching(rx, what, want).await);
}

fn is_apply(event: &WatcherEvent, name: &str, label: Option<&str>) -> bool {
    matches!(event, Ok(watcher::Event::Apply(p) | watcher::Event::InitApply(p))
        if p.name_any() == name && label.is_none_or(|l| p.labels().contains_key(l)))
}

#[tokio::test]
async fn watcher_sees_changes_and_reconnects() {
    let (api, client) = start().await;
    let pods: Api<Pod> = Api::namespaced(client.clone(), "w");
    pods.create(&PostParams::default(), &pod("before", "n")).await.unwrap();
    let (mut rx, task) = run_watcher(pods.clone());

    expect(&mut rx, "the listed pod", |e| is_apply(e, "before", None)).await;
    expect(&mut rx, "InitDone", |e| matches!(e, Ok(watcher::Event::InitDone))).await;
    api.wait_for(WAIT, |a| a.open_watches() == 1).await.expect("the watcher's stream opens");

    pods.create(&PostParams::default(), &pod("p1", "n")).await.unwrap();
    expect(&mut rx, "ADDED p1", |e| is_apply(e, "p1", None)).await;
    let label = json!({ "metadata": { "labels": { "changed": "yes" } } });
    pods.patch("p1", &PatchParams::default(), &Patch::Merge(&label)).await.unwrap();
    expect(&mut rx, "MODIFIED p1", |e| is_apply(e, "p1", Some("changed"))).await;
    pods.delete("p1", &DeleteParams::default()).await.unwrap();
    expect(&mut rx, "DELETED p1", |e| matches!(e, Ok(watcher::Event::Delete(p)) if p.name_any() == "p1"))
        .await;

    // The stream ends; the watcher watches again from where it was and misses nothing.
    api.drop_watches();
    api.create(json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": { "name": "during", "namespace": "w" },
        "spec": { "nodeName": "n" },
    }))
    .unwrap();
    expect(&mut rx, "ADDED during, after the reconnect", |e| is_apply(e, "during", None)).await;
    api.wait_for(WAIT, |a| a.open_watches() == 1).await.expect("the watcher re-opens its stream");
    pods.delete("during", &DeleteParams::default()).await.unwrap();
    expect(
        &mut rx,
        "DELETED during",
        |e| matches!(e, Ok(watcher::Event::Delete(p)) if p.name_any() == "during"),
    )
    .await;
    let watches = api
        .requests()
        .iter()
        .filter(|r| r.uri.starts_with("/api/v1/namespaces/w/pods?") && r.uri.contains("watch=true"))
        .count();
    assert!(watches >= 2, "the watcher watched again ({watches} watches)");
    task.abort();
}

#[tokio::test]
async fn streaming_list_watcher_on_one_node() {
    let (api, client) = start().await;
    let pp = PostParams::default();
    Api::<Pod>::namespaced(client.clone(), "a").create(&pp, &pod("mine", "node-a")).await.unwrap();
    Api::<Pod>::namespaced(client.clone(), "b").create(&pp, &pod("theirs", "node-b")).await.unwrap();
    let config = watcher::Config::default().fields("spec.nodeName=node-a").streaming_lists();
    let (mut rx, task) = run_watcher_with(Api::all(client.clone()), config);

    let first =
        next_matching(&mut rx, "an initial pod", |e| matches!(e, Ok(watcher::Event::InitApply(_)))).await;
    assert!(is_apply(&first, "mine", None), "{first:?}");
    let done = next_matching(&mut rx, "InitDone", |e| !matches!(e, Ok(watcher::Event::Init))).await;
    assert!(matches!(done, Ok(watcher::Event::InitDone)), "only node-a's pod comes first: {done:?}");
    Api::<Pod>::namespaced(client.clone(), "b").create(&pp, &pod("later", "node-a")).await.unwrap();
    expect(&mut rx, "a pod scheduled to node-a later", |e| is_apply(e, "later", None)).await;
    let initial = api.requests().into_iter().find(|r| r.uri.contains("sendInitialEvents=true")).unwrap();
    assert!(initial.uri.starts_with("/api/v1/pods?"), "{}", initial.uri);
    task.abort();
}

#[tokio::test]
async fn watcher_relists_when_its_version_expired() {
    let api = KubeApiServer {
        history_limit: 5,
        bookmark_interval: Duration::from_secs(3600),
        ..Default::default()
    }
    .serve()
    .await
    .unwrap();
    let client = client_for(&api);
    let pods: Api<Pod> = Api::namespaced(client.clone(), "w");
    pods.create(&PostParams::default(), &pod("first", "n")).await.unwrap();
    let (mut rx, task) = run_watcher(pods.clone());
    expect(&mut rx, "InitDone", |e| matches!(e, Ok(watcher::Event::InitDone))).await;
    api.wait_for(WAIT, |a| a.open_watches() == 1).await.unwrap();
    let old_rv = api.resource_version();
    assert_eq!(old_rv, "1");

    // More changes than the history holds, with no chance for the stream to keep up.
    for i in 0..10 {
        let cm = json!({ "apiVersion": "v1", "kind": "ConfigMap", "metadata": { "name": format!("c{i}") } });
        api.create(cm).unwrap();
    }
    api.create(
        json!({ "apiVersion": "v1", "kind": "Pod", "metadata": { "name": "late", "namespace": "w" } }),
    )
    .unwrap();

    let error = next_matching(&mut rx, "a 410 watch error", |e| e.is_err()).await;
    assert!(matches!(error, Err(watcher::Error::WatchError(ref s)) if s.code == 410), "{error:?}");
    expect(&mut rx, "the re-list", |e| matches!(e, Ok(watcher::Event::Init))).await;
    expect(&mut rx, "late, from the re-list", |e| is_apply(e, "late", None)).await;
    expect(&mut rx, "InitDone again", |e| matches!(e, Ok(watcher::Event::InitDone))).await;
    let lists = api
        .requests()
        .iter()
        .filter(|r| {
            r.method == "GET" && r.uri.starts_with("/api/v1/namespaces/w/pods?") && !r.uri.contains("watch=")
        })
        .count();
    assert_eq!(lists, 2, "one list at start, one after the 410");

    // A raw watch from the expired version gets the same ERROR event.
    let stream = pods.watch(&WatchParams::default(), &old_rv).await.unwrap();
    let events: Vec<_> =
        tokio::time::timeout(WAIT, Box::pin(stream).collect()).await.expect("the stream ends");
    assert!(
        matches!(events.as_slice(), [Ok(WatchEvent::Error(s))] if s.code == 410 && s.reason == "Expired"),
        "{events:?}"
    );
    task.abort();
}

#[tokio::test]
async fn deleting_an_owner_collects_dependents() {
    let (api, client) = start().await;
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), "default");
    let deployment: Deployment = serde_json::from_value(json!({
        "metadata": { "name": "waypoint" },
        "spec": {
            "selector": { "matchLabels": { "app": "waypoint" } },
            "template": { "metadata": { "labels": { "app": "waypoint" } }, "spec": { "containers": [] } },
        },
    }))
    .unwrap();
    let owner = deployments.create(&PostParams::default(), &deployment).await.unwrap();
    let owner_ref = json!([{
        "apiVersion": "apps/v1", "kind": "Deployment", "name": "waypoint",
        "uid": owner.uid().unwrap(), "controller": true,
    }]);
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    let mut owned = pod("waypoint-1", "n");
    owned.metadata.owner_references = Some(serde_json::from_value(owner_ref).unwrap());
    pods.create(&PostParams::default(), &owned).await.unwrap();
    pods.create(&PostParams::default(), &pod("unrelated", "n")).await.unwrap();

    deployments.delete("waypoint", &DeleteParams::background()).await.unwrap();
    assert!(pods.get_opt("waypoint-1").await.unwrap().is_none(), "the owned pod is collected");
    assert!(pods.get_opt("unrelated").await.unwrap().is_some());
    assert!(api.get("v1", "pods", Some("default"), "waypoint-1").is_none());
}

#[tokio::test]
async fn unregistered_resources_are_not_found() {
    let (api, client) = start().await;
    let gvk = GroupVersionKind::gvk("waypoint.ambient.dev", "v1alpha1", "WaypointPolicy");
    let ar = ApiResource::from_gvk_with_plural(&gvk, "waypointpolicies");
    let policies: Api<DynamicObject> = Api::namespaced_with(client.clone(), "default", &ar);
    assert!(policies.list(&ListParams::default()).await.unwrap().items.is_empty());

    assert!(api.unregister("waypoint.ambient.dev/v1alpha1", "WaypointPolicy"));
    let (code, reason) = api_code(policies.list(&ListParams::default()).await);
    assert_eq!((code, reason.as_str()), (404, "NotFound"));
    // A watch answers 404 too; kube reports it as the stream's first item.
    let watched = match policies.watch(&WatchParams::default(), "0").await {
        Ok(stream) => {
            let first = tokio::time::timeout(WAIT, Box::pin(stream).next()).await.expect("an item in time");
            first.expect("one item").map(|_| ())
        }
        Err(e) => Err(e),
    };
    assert_eq!(api_code(watched).0, 404);

    // A type a test registers is served like the built-in ones.
    api.register(ResourceType::namespaced("example.com/v1", "Widget", "widgets"));
    let gvk = GroupVersionKind::gvk("example.com", "v1", "Widget");
    let widgets: Api<DynamicObject> =
        Api::namespaced_with(client, "default", &ApiResource::from_gvk_with_plural(&gvk, "widgets"));
    let widget = DynamicObject::new("w", &ApiResource::from_gvk_with_plural(&gvk, "widgets"))
        .data(json!({ "spec": { "size": 1 } }));
    widgets.create(&PostParams::default(), &widget).await.unwrap();
    assert_eq!(widgets.get("w").await.unwrap().data["spec"]["size"], 1);
}

/// Sends a raw request through the kube client (so its error parsing is what is tested).
async fn raw(
    client: &Client,
    method: &str,
    uri: &str,
    content_type: &str,
    body: Vec<u8>,
) -> Result<Value, kube::Error> {
    let request = http::Request::builder()
        .method(method)
        .uri(uri)
        .header("content-type", content_type)
        .body(body)
        .expect("a valid request");
    client.request::<Value>(request).await
}

#[tokio::test]
async fn bad_input_gets_status_errors() {
    let api = KubeApiServer { max_body_bytes: 1024, ..Default::default() }.serve().await.unwrap();
    let client = client_for(&api);
    let maps = "/api/v1/namespaces/default/configmaps";

    let (code, reason) =
        api_code(raw(&client, "POST", maps, "application/json", b"{not json".to_vec()).await);
    assert_eq!((code, reason.as_str()), (400, "BadRequest"));
    let (code, _) = api_code(raw(&client, "POST", maps, "application/json", b"[1, 2]".to_vec()).await);
    assert_eq!(code, 400);
    let bad_labels = br#"{"metadata": {"name": "x", "labels": {"a": 1}}}"#.to_vec();
    assert_eq!(api_code(raw(&client, "POST", maps, "application/json", bad_labels).await).0, 400);
    let big =
        serde_json::to_vec(&json!({ "metadata": { "name": "big" }, "data": { "k": "x".repeat(2048) } }))
            .unwrap();
    let (code, _) = api_code(raw(&client, "POST", maps, "application/json", big).await);
    assert_eq!(code, 413);

    let created =
        raw(&client, "POST", maps, "application/json", br#"{"metadata":{"name":"c"}}"#.to_vec()).await;
    assert_eq!(created.unwrap()["metadata"]["name"], "c");
    let one = format!("{maps}/c");
    let (code, _) = api_code(raw(&client, "PATCH", &one, "text/plain", b"{}".to_vec()).await);
    assert_eq!(code, 415);
    let (code, _) =
        api_code(raw(&client, "PATCH", &one, "application/apply-patch+yaml", b"data: {}".to_vec()).await);
    assert_eq!(code, 400, "apply without fieldManager");
    let yaml = b"apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: c\ndata:\n  k: v\n".to_vec();
    let applied =
        raw(&client, "PATCH", &format!("{one}?fieldManager=yaml"), "application/apply-patch+yaml", yaml)
            .await;
    assert_eq!(applied.unwrap()["data"]["k"], "v");
    let (code, _) =
        api_code(raw(&client, "PATCH", &one, "application/json-patch+json", b"{}".to_vec()).await);
    assert_eq!(code, 400, "a JSON patch must be a list");
    let (code, _) =
        api_code(raw(&client, "GET", "/api/v1/pods?labelSelector=a%20in%20b", "", Vec::new()).await);
    assert_eq!(code, 400);
    let (code, _) = api_code(raw(&client, "GET", "/apis/nothing.example/v1/things", "", Vec::new()).await);
    assert_eq!(code, 404);

    let version = client.apiserver_version().await.unwrap();
    assert_eq!((version.major.as_str(), version.minor.as_str()), ("1", "33"));
}

#[tokio::test]
async fn bearer_token_and_kubeconfig() {
    let api = KubeApiServer { token: Some("s3cret".into()), ..Default::default() }.serve().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = api.write_kubeconfig(dir.path()).unwrap();
    let kubeconfig = kube::config::Kubeconfig::read_from(&path).unwrap();
    let config = Config::from_custom_kubeconfig(kubeconfig, &kube::config::KubeConfigOptions::default())
        .await
        .unwrap();
    assert_eq!(config.default_namespace, "default");
    let client = Client::try_from(config).unwrap();
    let namespaces: Api<Namespace> = Api::all(client);
    assert!(namespaces.list(&ListParams::default()).await.unwrap().items.is_empty());

    let anonymous: Api<Namespace> = Api::all(client_for(&api));
    let (code, reason) = api_code(anonymous.list(&ListParams::default()).await);
    assert_eq!((code, reason.as_str()), (401, "Unauthorized"));
}

#[tokio::test]
async fn stop_ends_the_server() {
    let (api, client) = start().await;
    let namespaces: Api<Namespace> = Api::all(client);
    namespaces.list(&ListParams::default()).await.unwrap();
    api.stop().await;
    assert!(namespaces.list(&ListParams::default()).await.is_err());
}
