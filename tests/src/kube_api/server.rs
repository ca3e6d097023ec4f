//! The HTTP/1.1 front: accepts connections, checks the bearer token, bounds bodies, logs requests,
//! maps URLs to resources and verbs to store operations, and renders results and errors.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, LengthLimitError, Limited};
use hyper::body::Incoming;
use hyper::header::{self, HeaderMap, HeaderValue};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::task::JoinSet;

use super::error::ApiError;
use super::registry::{Registry, ResourceType};
use super::selector::Filter;
use super::store::{DeleteOptions, PatchBody, Writer};
use super::watch::{self, Start, WatchRequest};
use super::{RequestRecord, Shared};

/// A response body: a whole document or a watch stream.
pub(crate) type Body = BoxBody<Bytes, Infallible>;

/// Accepts connections until shutdown; dropping the task set at the end closes them all.
pub(crate) async fn serve(listener: TcpListener, shared: Arc<Shared>) {
    let mut shutdown = shared.shutdown.subscribe();
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            _ = shutdown.changed() => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    let shared = shared.clone();
                    connections.spawn(async move {
                        let service = service_fn(move |req| handle(shared.clone(), req));
                        if let Err(e) = http1::Builder::new().serve_connection(TokioIo::new(stream), service).await {
                            tracing::debug!(error = %e, "kube api connection ended");
                        }
                    });
                }
                Err(e) => {
                    tracing::warn!(error = %e, "kube api accept failed");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            },
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
}

async fn handle(shared: Arc<Shared>, req: Request<Incoming>) -> Result<Response<Body>, Infallible> {
    let method = req.method().to_string();
    let uri = req.uri().path_and_query().map(|p| p.as_str().to_string()).unwrap_or_default();
    let content_type = header_str(req.headers(), header::CONTENT_TYPE).map(str::to_string);
    let response = respond(&shared, req).await.unwrap_or_else(|e| error_response(&e));
    let status = response.status().as_u16();
    tracing::debug!(%method, %uri, status, "kube api request");
    shared.log_request(RequestRecord { method, uri, content_type, status });
    Ok(response)
}

fn header_str(headers: &HeaderMap, name: header::HeaderName) -> Option<&str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

async fn respond(shared: &Arc<Shared>, req: Request<Incoming>) -> Result<Response<Body>, ApiError> {
    authorize(shared, req.headers())?;
    let (parts, body) = req.into_parts();
    let route = route(&shared.lock().registry, parts.uri.path(), &shared.addr.to_string())?;
    let target = match route {
        Route::Document(document) if parts.method == Method::GET => return Ok(json_response(200, &document)),
        Route::Document(_) => return Err(ApiError::method_not_allowed(parts.method.as_str())),
        Route::Resource(target) => target,
    };
    let body = read_body(body, &parts.headers, shared.options.max_body_bytes).await?;
    let request = ResourceRequest {
        method: parts.method,
        content_type: header_str(&parts.headers, header::CONTENT_TYPE).map(str::to_string),
        user_agent: header_str(&parts.headers, header::USER_AGENT).map(str::to_string),
        query: Query::parse(parts.uri.query().unwrap_or_default()),
        target,
        body,
    };
    request.dispatch(shared)
}

fn authorize(shared: &Shared, headers: &HeaderMap) -> Result<(), ApiError> {
    let Some(token) = &shared.options.token else { return Ok(()) };
    let given = header_str(headers, header::AUTHORIZATION).and_then(|v| v.strip_prefix("Bearer "));
    if given == Some(token.as_str()) { Ok(()) } else { Err(ApiError::unauthorized()) }
}

async fn read_body(body: Incoming, headers: &HeaderMap, limit: usize) -> Result<Bytes, ApiError> {
    let declared = header_str(headers, header::CONTENT_LENGTH).and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|len| len > limit as u64) {
        return Err(ApiError::too_large(limit));
    }
    match Limited::new(body, limit).collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(e) if e.downcast_ref::<LengthLimitError>().is_some() => Err(ApiError::too_large(limit)),
        Err(e) => Err(ApiError::bad_request(format!("reading the request body: {e}"))),
    }
}

/// A JSON response.
pub(crate) fn json_response(code: u16, value: &Value) -> Response<Body> {
    let bytes = serde_json::to_vec(value).unwrap_or_default();
    let mut response = Response::new(Full::new(Bytes::from(bytes)).boxed());
    *response.status_mut() = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}

fn error_response(error: &ApiError) -> Response<Body> {
    json_response(error.code, &error.status())
}

/// Decodes `%XX` escapes (and, in query strings, `+` as a space).
fn percent_decode(s: &str, plus_is_space: bool) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        match bytes[i] {
            b'%' if i + 2 < bytes.len() => match (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                (Some(h), Some(l)) => {
                    out.push((h * 16 + l) as u8);
                    i += 3;
                    continue;
                }
                _ => out.push(b'%'),
            },
            b'+' if plus_is_space => out.push(b' '),
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Query parameters, decoded.
#[derive(Debug, Default)]
struct Query(Vec<(String, String)>);

impl Query {
    fn parse(query: &str) -> Self {
        let pairs = query
            .split('&')
            .filter(|p| !p.is_empty())
            .map(|p| {
                let (k, v) = p.split_once('=').unwrap_or((p, ""));
                (percent_decode(k, true), percent_decode(v, true))
            })
            .collect();
        Self(pairs)
    }

    fn get(&self, key: &str) -> Option<&str> {
        self.0.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
    }

    fn flag(&self, key: &str) -> bool {
        matches!(self.get(key), Some("true" | "1"))
    }
}

/// What a URL names.
enum Route {
    /// A discovery or version document.
    Document(Value),
    Resource(Target),
}

/// A resource URL: the type, the namespace, the object and whether it is `/status`.
#[derive(Debug)]
struct Target {
    res: ResourceType,
    /// `None` for cluster-scoped kinds and all-namespaces collections.
    namespace: Option<String>,
    name: Option<String>,
    status: bool,
}

fn version_info() -> Value {
    json!({
        "major": "1",
        "minor": "33",
        "gitVersion": "v1.33.0",
        "gitCommit": "0000000000000000000000000000000000000000",
        "gitTreeState": "clean",
        "buildDate": "2025-04-23T00:00:00Z",
        "goVersion": "go1.24.2",
        "compiler": "gc",
        "platform": "linux/amd64",
    })
}

fn route(registry: &Registry, path: &str, server_address: &str) -> Result<Route, ApiError> {
    let segments: Vec<String> =
        path.split('/').filter(|s| !s.is_empty()).map(|s| percent_decode(s, false)).collect();
    let segments: Vec<&str> = segments.iter().map(String::as_str).collect();
    let document = |d: Option<Value>| d.map(Route::Document).ok_or_else(ApiError::unknown_resource);
    match segments.as_slice() {
        ["version"] => Ok(Route::Document(version_info())),
        ["api"] => Ok(Route::Document(registry.core_versions(server_address))),
        ["apis"] => Ok(Route::Document(registry.group_list())),
        ["api", version] => document(registry.resource_list("", version)),
        ["apis", group, version] => document(registry.resource_list(group, version)),
        ["api", version, rest @ ..] => target(registry, "", version, rest).map(Route::Resource),
        ["apis", group, version, rest @ ..] => target(registry, group, version, rest).map(Route::Resource),
        _ => Err(ApiError::unknown_resource()),
    }
}

fn target(registry: &Registry, group: &str, version: &str, rest: &[&str]) -> Result<Target, ApiError> {
    if let ["namespaces", namespace, plural, tail @ ..] = rest
        && let Some(res) = registry.by_plural(group, version, plural).filter(|r| r.namespaced)
    {
        return object_target(res, Some(namespace), tail);
    }
    let [plural, tail @ ..] = rest else { return Err(ApiError::unknown_resource()) };
    let res = registry.by_plural(group, version, plural).ok_or_else(ApiError::unknown_resource)?;
    if res.namespaced && !tail.is_empty() {
        return Err(ApiError::unknown_resource());
    }
    object_target(res, None, tail)
}

fn object_target(res: &ResourceType, namespace: Option<&str>, tail: &[&str]) -> Result<Target, ApiError> {
    let (name, status) = match tail {
        [] => (None, false),
        [name] => (Some(name.to_string()), false),
        [name, "status"] if res.status_subresource => (Some(name.to_string()), true),
        _ => return Err(ApiError::unknown_resource()),
    };
    Ok(Target { res: res.clone(), namespace: namespace.map(str::to_string), name, status })
}

/// One request to a resource URL, body read.
struct ResourceRequest {
    method: Method,
    content_type: Option<String>,
    user_agent: Option<String>,
    query: Query,
    target: Target,
    body: Bytes,
}

impl ResourceRequest {
    fn dispatch(self, shared: &Arc<Shared>) -> Result<Response<Body>, ApiError> {
        let target = &self.target;
        let namespace = target.namespace.as_deref().unwrap_or_default();
        let manager = self.manager();
        let writer = Writer { manager: &manager, dry_run: self.query.get("dryRun") == Some("All") };
        let res = &target.res;
        let watching = self.query.flag("watch");
        match (&self.method, target.name.as_deref()) {
            (&Method::GET, name) if watching && !target.status => {
                let mut request = self.watch_request()?;
                if let Some(name) = name {
                    request.filter = Filter::name(name).and(request.filter);
                }
                let mut response = Response::new(watch::start(shared, request));
                response
                    .headers_mut()
                    .insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
                Ok(response)
            }
            (&Method::GET, None) => {
                let filter = self.filter()?;
                let state = shared.lock();
                let items = state.store.list(res, target.namespace.as_deref(), &filter);
                let rv = state.store.resource_version();
                Ok(json_response(200, &list_document(res, rv, items)))
            }
            (&Method::GET, Some(name)) => {
                let object = shared.lock().store.get(res, namespace, name);
                object.map(|o| json_response(200, &o)).ok_or_else(|| ApiError::not_found(res, name))
            }
            (&Method::POST, None) if !target.status => {
                if res.namespaced && target.namespace.is_none() {
                    return Err(ApiError::method_not_allowed("POST"));
                }
                let object = self.object_body()?;
                let created = shared.write(|s| s.store.create(res, namespace, object, writer))?;
                Ok(json_response(201, &created))
            }
            (&Method::PUT, Some(name)) => {
                let object = self.object_body()?;
                let status = target.status;
                let replaced =
                    shared.write(|s| s.store.replace(res, namespace, name, object, status, writer))?;
                Ok(json_response(200, &replaced))
            }
            (&Method::PATCH, Some(name)) => {
                let patch = self.patch_body()?;
                let (patched, created) =
                    shared.write(|s| s.store.patch(res, namespace, name, &patch, target.status, writer))?;
                Ok(json_response(if created { 201 } else { 200 }, &patched))
            }
            (&Method::DELETE, Some(name)) if !target.status => {
                let options = self.delete_options()?;
                let deleted =
                    shared.write(|s| s.store.delete(res, namespace, name, &options, writer.dry_run))?;
                Ok(json_response(200, &deleted))
            }
            (&Method::DELETE, None) => {
                let filter = self.filter()?;
                let options = self.delete_options()?;
                let ns = target.namespace.as_deref();
                let (items, rv) = shared.write(|s| {
                    let deleted = s.store.delete_collection(res, ns, &filter, &options, writer.dry_run);
                    (deleted, s.store.resource_version())
                });
                Ok(json_response(200, &list_document(res, rv, items)))
            }
            (method, _) => Err(ApiError::method_not_allowed(method.as_str())),
        }
    }

    /// `fieldManager`, else the client's user agent up to the first `/`, as the real server does.
    fn manager(&self) -> String {
        if let Some(manager) = self.query.get("fieldManager").filter(|m| !m.is_empty()) {
            return manager.to_string();
        }
        let agent = self.user_agent.as_deref().and_then(|a| a.split('/').next()).filter(|a| !a.is_empty());
        agent.unwrap_or("unknown").to_string()
    }

    fn filter(&self) -> Result<Filter, ApiError> {
        Filter::parse(self.query.get("labelSelector"), self.query.get("fieldSelector"))
            .map_err(ApiError::bad_request)
    }

    fn watch_request(&self) -> Result<WatchRequest, ApiError> {
        let bookmarks = self.query.flag("allowWatchBookmarks");
        let rv = self.query.get("resourceVersion").unwrap_or_default();
        let start = if self.query.flag("sendInitialEvents") {
            Start::Now { end_bookmark: bookmarks }
        } else if rv.is_empty() || rv == "0" {
            Start::Now { end_bookmark: false }
        } else {
            Start::After(
                rv.parse().map_err(|_| ApiError::bad_request(format!("invalid resource version {rv:?}")))?,
            )
        };
        let timeout = match self.query.get("timeoutSeconds") {
            Some(t) => Some(Duration::from_secs(
                t.parse().map_err(|_| ApiError::bad_request(format!("invalid timeoutSeconds {t:?}")))?,
            )),
            None => None,
        };
        Ok(WatchRequest {
            res: self.target.res.clone(),
            namespace: self.target.namespace.clone(),
            filter: self.filter()?,
            start,
            bookmarks,
            timeout,
        })
    }

    fn media_type(&self) -> &str {
        self.content_type.as_deref().and_then(|c| c.split(';').next()).map(str::trim).unwrap_or_default()
    }

    /// A POST or PUT body: JSON, or YAML when the content type says so.
    fn object_body(&self) -> Result<Value, ApiError> {
        match self.media_type() {
            "application/yaml" | "application/x-yaml" => parse_yaml(&self.body),
            _ => parse_json(&self.body),
        }
    }

    fn patch_body(&self) -> Result<PatchBody, ApiError> {
        match self.media_type() {
            "application/apply-patch+yaml" => {
                if self.query.get("fieldManager").is_none_or(str::is_empty) {
                    return Err(ApiError::bad_request(
                        "PatchOptions.meta.k8s.io \"\" is invalid: fieldManager: Required value: is required \
                         for apply patch",
                    ));
                }
                let force = self.query.flag("force");
                Ok(PatchBody::Apply { object: parse_yaml(&self.body)?, force })
            }
            "application/merge-patch+json" => Ok(PatchBody::Merge(parse_json(&self.body)?)),
            "application/strategic-merge-patch+json" => Ok(PatchBody::Strategic(parse_json(&self.body)?)),
            "application/json-patch+json" => Ok(PatchBody::Json(parse_json(&self.body)?)),
            other => Err(ApiError::unsupported_media_type(other)),
        }
    }

    fn delete_options(&self) -> Result<DeleteOptions, ApiError> {
        let mut options = DeleteOptions::from_body(&self.body)?;
        if self.query.get("propagationPolicy") == Some("Orphan") {
            options.orphan = true;
        }
        Ok(options)
    }
}

fn parse_json(body: &[u8]) -> Result<Value, ApiError> {
    serde_json::from_slice(body)
        .map_err(|e| ApiError::bad_request(format!("the body is not valid JSON: {e}")))
}

fn parse_yaml(body: &[u8]) -> Result<Value, ApiError> {
    serde_yaml_ng::from_slice(body)
        .map_err(|e| ApiError::bad_request(format!("the body is not valid YAML or JSON: {e}")))
}

fn list_document(res: &ResourceType, rv: u64, items: Vec<Value>) -> Value {
    json!({
        "apiVersion": res.api_version(),
        "kind": format!("{}List", res.kind),
        "metadata": { "resourceVersion": rv.to_string() },
        "items": items,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decoding() {
        assert_eq!(percent_decode("a%3Db%2Cc+d", true), "a=b,c d");
        assert_eq!(percent_decode("a+b%", false), "a+b%");
        assert_eq!(percent_decode("%zz%4", true), "%zz%4");
        let q = Query::parse("watch=1&labelSelector=app+in+%28a%2Cb%29&x");
        assert!(q.flag("watch"));
        assert_eq!(q.get("labelSelector"), Some("app in (a,b)"));
        assert_eq!(q.get("x"), Some(""));
    }

    #[test]
    fn routes() {
        let registry = Registry::builtin();
        let t = |p: &str| match route(&registry, p, "x") {
            Ok(Route::Resource(t)) => Some((t.res.plural, t.namespace, t.name, t.status)),
            _ => None,
        };
        assert_eq!(
            t("/api/v1/namespaces/a/pods/p"),
            Some(("pods".into(), Some("a".into()), Some("p".into()), false))
        );
        assert_eq!(t("/api/v1/pods"), Some(("pods".into(), None, None, false)));
        assert_eq!(t("/api/v1/pods/p"), None);
        assert_eq!(t("/api/v1/namespaces/a"), Some(("namespaces".into(), None, Some("a".into()), false)));
        assert_eq!(
            t("/api/v1/namespaces/a/status"),
            Some(("namespaces".into(), None, Some("a".into()), true))
        );
        assert_eq!(t("/api/v1/namespaces/a/configmaps/c/status"), None);
        assert_eq!(
            t("/apis/gateway.networking.k8s.io/v1/namespaces/n/gateways/g/status"),
            Some(("gateways".into(), Some("n".into()), Some("g".into()), true))
        );
        assert_eq!(t("/apis/unknown.io/v1/namespaces/n/things"), None);
    }
}
