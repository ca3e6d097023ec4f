//! An HTTP server that speaks the Kubernetes API well enough for kube-rs clients (the controller,
//! ztunnel's node-scoped watches) to be tested against it over real HTTP, with a handle for tests.
//!
//! Served: plain HTTP/1.1 on 127.0.0.1 (port chosen by the OS).
//! - Resources by URL: `/api/v1/...` and `/apis/{group}/{version}/...`; namespaced
//!   `.../namespaces/{ns}/{plural}[/{name}[/status]]`, cluster-scoped `.../{plural}[/{name}[/status]]`,
//!   and all-namespaces `.../{plural}` for list, watch and delete-collection. Only registered types
//!   are served (see [`ResourceType`]; the mesh's are preloaded); anything else is a 404 `Status`.
//!   Discovery (`/api`, `/apis`, `/api/v1`, `/apis/{g}/{v}`) and `/version` are served too.
//! - Objects are JSON values with one global resourceVersion counter, a uid, creationTimestamp,
//!   and a generation bumped when anything outside `metadata` and `status` changes. Every version
//!   of a group's resource shares one set of objects (no conversion beyond `apiVersion`).
//! - GET, LIST (`labelSelector`, `fieldSelector`; `limit`/`continue` ignored: one page),
//!   WATCH (`watch=true|1`, `resourceVersion`, `timeoutSeconds`, `allowWatchBookmarks`,
//!   `sendInitialEvents`, selectors; objects that stop/start matching are sent as DELETED/ADDED;
//!   a resourceVersion older than the retained history gets one `ERROR` 410 Expired event),
//!   POST (201, 409 AlreadyExists, `generateName`), PUT (409 Conflict on a stale resourceVersion),
//!   PATCH (apply, merge, strategic merge, JSON patch; other content types 415), DELETE (200 with
//!   the object; `preconditions`; `propagationPolicy: Orphan`), delete-collection, `dryRun=All`.
//!   A write that changes nothing does not bump the resourceVersion or emit an event.
//! - `/status`: writes to it change only `status`; writes to the main resource keep the stored
//!   `status` (a create drops it) for kinds with a status subresource.
//! - Server-side apply requires `fieldManager` and models field ownership per manager (see
//!   `fields.rs`): it creates a missing object, conflicts (409) when changing a field another
//!   manager owns unless `force=true`, removes fields the manager stopped applying, and merges the
//!   rest with maps merged recursively and lists and scalars replaced. Simplifications: lists are
//!   atomic (no merge keys: `containers` or `ports` are replaced whole); ownership is not rendered
//!   into `metadata.managedFields`. Strategic merge patches are merge patches (lists replaced).
//! - Deletion honours `metadata.finalizers` (the object gets a `deletionTimestamp` and goes when
//!   the last finalizer is removed), garbage-collects dependents at once (an object whose
//!   `ownerReferences` name the deleted uid is deleted when no other owner exists, and otherwise
//!   loses that reference; recursively), and a deleted Namespace removes its objects at once.
//! - Defaulting: a Service gets a cluster IP from 10.96.0.10 upward (`None` kept for headless),
//!   `clusterIPs`, type, port protocol and targetPort, IP families; a cluster IP is immutable. A
//!   Namespace gets its `kubernetes.io/metadata.name` label and `status.phase: Active`.
//! - Any or no bearer token is accepted, unless [`KubeApiServer::token`] requires one (401).
//! - Bounds: the event history, request bodies (413), the request log.
//!
//! Not implemented: TLS, authorization (RBAC), admission and validation beyond shapes and names,
//! pagination, `resourceVersionMatch` on lists, list-at-resourceVersion, protobuf and table
//! output, aggregated discovery, graceful pod termination, other subresources (`scale`, `log`,
//! `exec`, `eviction`), field selectors restricted per kind (any dotted path works here), and
//! namespace termination waiting for finalizers.

mod defaults;
mod error;
mod fields;
mod ids;
mod patch;
mod registry;
mod selector;
mod server;
mod store;
mod watch;

use std::collections::VecDeque;
use std::io;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use serde_json::Value;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

pub use self::error::ApiError;
use self::registry::Registry;
pub use self::registry::ResourceType;
use self::selector::Filter;
use self::store::{DeleteOptions, Store};

/// Watch events kept for replay by default.
pub const DEFAULT_HISTORY_LIMIT: usize = 10_000;
/// Largest request body accepted by default.
pub const DEFAULT_MAX_BODY_BYTES: usize = 4 << 20;
/// Requests remembered by default.
pub const DEFAULT_REQUEST_LOG_LIMIT: usize = 10_000;
/// How often a watch that allows bookmarks gets one, by default.
pub const DEFAULT_BOOKMARK_INTERVAL: Duration = Duration::from_secs(2);
/// The token written into kubeconfigs when the server requires none.
const ANY_TOKEN: &str = "kube-api-test-token";

/// Start options of the server. `KubeApiServer::start()` starts one with the defaults;
/// `KubeApiServer { token: Some(..), ..Default::default() }.serve()` with others.
#[derive(Clone, Debug)]
pub struct KubeApiServer {
    /// Require `Authorization: Bearer <token>` (401 otherwise). When unset any token, or none, is
    /// accepted.
    pub token: Option<String>,
    /// Watch events kept for replay; a watch from a resourceVersion whose successors have left the
    /// history gets 410 Expired.
    pub history_limit: usize,
    /// Largest request body; larger ones get 413.
    pub max_body_bytes: usize,
    /// Requests kept in the log ([`KubeApi::requests`]); the oldest go first.
    pub request_log_limit: usize,
    /// How often a watch with `allowWatchBookmarks=true` gets a bookmark.
    pub bookmark_interval: Duration,
    /// Refuse (404) to create a namespaced object in a namespace that does not exist, as the real
    /// server does. Off by default so tests need not create namespaces first.
    pub require_namespaces: bool,
}

impl Default for KubeApiServer {
    fn default() -> Self {
        Self {
            token: None,
            history_limit: DEFAULT_HISTORY_LIMIT,
            max_body_bytes: DEFAULT_MAX_BODY_BYTES,
            request_log_limit: DEFAULT_REQUEST_LOG_LIMIT,
            bookmark_interval: DEFAULT_BOOKMARK_INTERVAL,
            require_namespaces: false,
        }
    }
}

impl KubeApiServer {
    /// Starts a server with the default options.
    pub async fn start() -> io::Result<KubeApi> {
        Self::default().serve().await
    }

    /// Starts a server with these options on 127.0.0.1 and a port the OS picks.
    pub async fn serve(self) -> io::Result<KubeApi> {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await?;
        let addr = listener.local_addr()?;
        let state = State {
            registry: Registry::builtin(),
            store: Store::new(self.history_limit, self.require_namespaces),
            requests: VecDeque::new(),
        };
        let shared = Arc::new(Shared {
            state: Mutex::new(state),
            changes: tokio::sync::watch::Sender::new(0),
            drops: tokio::sync::watch::Sender::new(0),
            shutdown: tokio::sync::watch::Sender::new(false),
            open_watches: AtomicUsize::new(0),
            options: self,
            addr,
        });
        let task = tokio::spawn(server::serve(listener, shared.clone()));
        tracing::info!(%addr, "kube api test server listening");
        Ok(KubeApi { shared, task })
    }
}

/// One request the server answered.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RequestRecord {
    pub method: String,
    /// Path and query, as sent.
    pub uri: String,
    pub content_type: Option<String>,
    /// The response status.
    pub status: u16,
}

/// A `wait_for` ran out of time.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WaitTimeout(pub Duration);

impl std::fmt::Display for WaitTimeout {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "condition not met within {:?}", self.0)
    }
}

impl std::error::Error for WaitTimeout {}

/// What the lock guards.
struct State {
    registry: Registry,
    store: Store,
    requests: VecDeque<RequestRecord>,
}

/// State shared by the handle, the connections and the watch streams.
struct Shared {
    /// Held only for short, synchronous sections, never across an await.
    state: Mutex<State>,
    /// Ticks on every change (objects, request log, open watches); watches and waits follow it.
    changes: tokio::sync::watch::Sender<u64>,
    /// Ticks on `drop_watches`.
    drops: tokio::sync::watch::Sender<u64>,
    shutdown: tokio::sync::watch::Sender<bool>,
    open_watches: AtomicUsize,
    options: KubeApiServer,
    addr: SocketAddr,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn notify(&self) {
        self.changes.send_modify(|n| *n = n.wrapping_add(1));
    }

    /// Runs `f` under the lock, then wakes watches and waits.
    fn write<T>(&self, f: impl FnOnce(&mut State) -> T) -> T {
        let out = f(&mut self.lock());
        self.notify();
        out
    }

    fn log_request(&self, record: RequestRecord) {
        self.write(|state| {
            while !state.requests.is_empty() && state.requests.len() >= self.options.request_log_limit {
                state.requests.pop_front();
            }
            if self.options.request_log_limit > 0 {
                state.requests.push_back(record);
            }
        });
    }
}

/// A running server. Dropping it stops the server.
pub struct KubeApi {
    shared: Arc<Shared>,
    task: JoinHandle<()>,
}

impl Drop for KubeApi {
    fn drop(&mut self) {
        self.shared.shutdown.send_replace(true);
        self.task.abort();
    }
}

impl KubeApi {
    /// `http://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("http://{}", self.shared.addr)
    }

    pub fn addr(&self) -> SocketAddr {
        self.shared.addr
    }

    /// A kubeconfig (YAML) whose current context points at this server with a bearer token
    /// (the required one, if any) and namespace `default`.
    pub fn kubeconfig(&self) -> String {
        let token = self.shared.options.token.as_deref().unwrap_or(ANY_TOKEN);
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: kube-api-test\n  cluster:\n    server: {url}\n\
             users:\n- name: kube-api-test\n  user:\n    token: {token:?}\ncontexts:\n- name: kube-api-test\n  \
             context:\n    cluster: kube-api-test\n    user: kube-api-test\n    namespace: default\n\
             current-context: kube-api-test\n",
            url = self.url(),
        )
    }

    /// Writes [`Self::kubeconfig`] to `dir/kubeconfig` and returns the path (for `KUBECONFIG` or
    /// `kube::config::Kubeconfig::read_from`).
    pub fn write_kubeconfig(&self, dir: &Path) -> io::Result<PathBuf> {
        let path = dir.join("kubeconfig");
        std::fs::write(&path, self.kubeconfig())?;
        Ok(path)
    }

    /// Serves another resource type (or replaces one with the same group, version and plural).
    pub fn register(&self, ty: ResourceType) {
        self.shared.write(|s| s.registry.register(ty));
    }

    /// Stops serving a type, as when its CRD is not installed; its objects stay stored but
    /// unreachable. True when it was served.
    pub fn unregister(&self, api_version: &str, kind_or_plural: &str) -> bool {
        self.shared.write(|s| s.registry.unregister(api_version, kind_or_plural))
    }

    fn resource(&self, api_version: &str, kind_or_plural: &str) -> Result<ResourceType, ApiError> {
        let found = self.shared.lock().registry.find(api_version, kind_or_plural).cloned();
        found.ok_or_else(|| {
            tracing::warn!(api_version, kind_or_plural, "kube api test handle: unknown resource type");
            ApiError::unknown_resource()
        })
    }

    fn resource_of(&self, object: &Value) -> Result<ResourceType, ApiError> {
        let field = |k: &str| object.get(k).and_then(Value::as_str).unwrap_or_default();
        self.resource(field("apiVersion"), field("kind"))
    }

    /// Inserts `object` (with `apiVersion`, `kind`, `metadata.name` or `generateName`, and
    /// `metadata.namespace`, `default` when absent) as given, status included; 409 if it exists.
    /// Watches see it as any other change.
    pub fn create(&self, object: Value) -> Result<Value, ApiError> {
        let res = self.resource_of(&object)?;
        self.shared.write(|s| s.store.put(&res, object, false))
    }

    /// Like [`Self::create`], but replaces an existing object whole (status included), keeping its
    /// uid and creationTimestamp.
    pub fn apply(&self, object: Value) -> Result<Value, ApiError> {
        let res = self.resource_of(&object)?;
        self.shared.write(|s| s.store.put(&res, object, true))
    }

    /// One object. `namespace` is ignored for cluster-scoped kinds and `None` means `default` for
    /// namespaced ones.
    pub fn get(
        &self,
        api_version: &str,
        kind_or_plural: &str,
        namespace: Option<&str>,
        name: &str,
    ) -> Option<Value> {
        let res = self.resource(api_version, kind_or_plural).ok()?;
        self.shared.lock().store.get(&res, namespace.unwrap_or("default"), name)
    }

    /// The objects of a kind in `namespace`, or in every namespace when `None`, in name order.
    pub fn list(&self, api_version: &str, kind_or_plural: &str, namespace: Option<&str>) -> Vec<Value> {
        let Ok(res) = self.resource(api_version, kind_or_plural) else { return Vec::new() };
        self.shared.lock().store.list(&res, namespace, &Filter::default())
    }

    /// Deletes an object as a DELETE request would (finalizers honoured, dependents collected);
    /// returns it as it was left, or `None` when absent.
    pub fn delete(
        &self,
        api_version: &str,
        kind_or_plural: &str,
        namespace: Option<&str>,
        name: &str,
    ) -> Option<Value> {
        let res = self.resource(api_version, kind_or_plural).ok()?;
        let namespace = namespace.unwrap_or("default");
        self.shared.write(|s| s.store.delete(&res, namespace, name, &DeleteOptions::default(), false)).ok()
    }

    /// Replaces an object's `status`, as a write to its `/status` subresource would.
    pub fn set_status(
        &self,
        api_version: &str,
        kind_or_plural: &str,
        namespace: Option<&str>,
        name: &str,
        status: Value,
    ) -> Result<Value, ApiError> {
        let res = self.resource(api_version, kind_or_plural)?;
        let namespace = namespace.unwrap_or("default");
        self.shared.write(|s| s.store.set_status(&res, namespace, name, status))
    }

    /// The newest resourceVersion.
    pub fn resource_version(&self) -> String {
        self.shared.lock().store.resource_version().to_string()
    }

    /// Waits until `condition` holds, checking it on every change (objects, requests, watches)
    /// and at least every 100 ms.
    pub async fn wait_for(
        &self,
        timeout: Duration,
        mut condition: impl FnMut(&KubeApi) -> bool,
    ) -> Result<(), WaitTimeout> {
        let mut changes = self.shared.changes.subscribe();
        let wait = async {
            while !condition(self) {
                // Either wakes us; a closed channel cannot happen while `self` holds the sender.
                let _ = tokio::time::timeout(Duration::from_millis(100), changes.changed()).await;
            }
        };
        tokio::time::timeout(timeout, wait).await.map_err(|_| WaitTimeout(timeout))
    }

    /// Waits until the object exists and `condition` holds for it; returns it.
    pub async fn wait_for_object(
        &self,
        timeout: Duration,
        api_version: &str,
        kind_or_plural: &str,
        namespace: Option<&str>,
        name: &str,
        mut condition: impl FnMut(&Value) -> bool,
    ) -> Result<Value, WaitTimeout> {
        let mut found = None;
        self.wait_for(timeout, |api| {
            found = api.get(api_version, kind_or_plural, namespace, name).filter(|o| condition(o));
            found.is_some()
        })
        .await?;
        found.ok_or(WaitTimeout(timeout))
    }

    /// The requests answered so far (up to the log limit), oldest first.
    pub fn requests(&self) -> Vec<RequestRecord> {
        self.shared.lock().requests.iter().cloned().collect()
    }

    pub fn clear_requests(&self) {
        self.shared.lock().requests.clear();
    }

    /// Watch streams currently open.
    pub fn open_watches(&self) -> usize {
        self.shared.open_watches.load(Ordering::SeqCst)
    }

    /// Ends every open watch stream cleanly (clients see the stream end and reconnect).
    pub fn drop_watches(&self) {
        self.shared.drops.send_modify(|n| *n = n.wrapping_add(1));
    }

    /// Stops accepting, ends every connection and watch, and waits for the server task.
    pub async fn stop(mut self) {
        self.shared.shutdown.send_replace(true);
        if let Err(e) = (&mut self.task).await {
            tracing::debug!(error = %e, "kube api server task ended abnormally");
        }
    }
}
