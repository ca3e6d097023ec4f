//! A small HTTP/1.1 server for the plain endpoints: metrics (15020), readiness (15021) and
//! admin (127.0.0.1:15000). Each route is a function of the request path and query.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tracing::{debug, info};

use crate::metrics::SharedRegistry;
use crate::readiness::Ready;

/// Admin endpoints are served on localhost only.
#[derive(Debug, thiserror::Error)]
#[error("admin address {0} is not a loopback address; admin is served on localhost only")]
pub struct NotLoopback(pub std::net::SocketAddr);

/// Refuses an admin address that is not loopback.
pub fn require_loopback(addr: std::net::SocketAddr) -> Result<(), NotLoopback> {
    if addr.ip().is_loopback() { Ok(()) } else { Err(NotLoopback(addr)) }
}

/// What a route returns.
#[derive(Debug)]
pub struct Reply {
    pub status: StatusCode,
    pub content_type: &'static str,
    pub body: Bytes,
}

impl Reply {
    pub fn text(status: StatusCode, body: impl Into<String>) -> Self {
        Self { status, content_type: "text/plain; charset=utf-8", body: Bytes::from(body.into()) }
    }

    pub fn json(value: &serde_json::Value) -> Self {
        let body = serde_json::to_vec_pretty(value)
            .unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}").into_bytes());
        Self { status: StatusCode::OK, content_type: "application/json", body: Bytes::from(body) }
    }
}

type RouteFn = dyn Fn(&http::request::Parts) -> Reply + Send + Sync;

/// Path -> handler. Only GET (and POST where a route wants it) are served.
#[derive(Clone, Default)]
pub struct Router {
    routes: Vec<(String, Arc<RouteFn>)>,
}

impl Router {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn route(
        mut self,
        path: &str,
        f: impl Fn(&http::request::Parts) -> Reply + Send + Sync + 'static,
    ) -> Self {
        self.routes.push((path.to_string(), Arc::new(f)));
        self
    }

    fn dispatch(&self, parts: &http::request::Parts) -> Reply {
        if parts.method != Method::GET && parts.method != Method::POST {
            return Reply::text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n");
        }
        match self.routes.iter().find(|(p, _)| p == parts.uri.path()) {
            Some((_, f)) => f(parts),
            None => {
                let paths: Vec<&str> = self.routes.iter().map(|(p, _)| p.as_str()).collect();
                Reply::text(StatusCode::NOT_FOUND, format!("not found; try one of: {}\n", paths.join(" ")))
            }
        }
    }
}

/// Serves `router` on `listener` until the task is dropped.
pub async fn serve(listener: TcpListener, router: Router, name: &'static str) {
    let router = Arc::new(router);
    if let Ok(addr) = listener.local_addr() {
        info!(%addr, server = name, "listening");
    }
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(conn) => conn,
            Err(e) => {
                debug!(error = %e, server = name, "accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let router = router.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req: Request<Incoming>| {
                let router = router.clone();
                async move {
                    let (parts, _body) = req.into_parts();
                    let reply = router.dispatch(&parts);
                    let response = Response::builder()
                        .status(reply.status)
                        .header(header::CONTENT_TYPE, reply.content_type)
                        .body(Full::new(reply.body))
                        .unwrap_or_else(|_| {
                            Response::new(Full::new(Bytes::from_static(b"internal error\n")))
                        });
                    Ok::<_, Infallible>(response)
                }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(std::time::Duration::from_secs(10))
                .serve_connection(TokioIo::new(stream), svc);
            if let Err(e) = conn.await {
                debug!(error = %e, %peer, server = name, "connection error");
            }
        });
    }
}

/// Binds `addr`; a bind failure is returned, not hidden.
pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    // SO_REUSEPORT: a new process can start on the same ports while the old one drains.
    let socket =
        if addr.is_ipv4() { tokio::net::TcpSocket::new_v4()? } else { tokio::net::TcpSocket::new_v6()? };
    socket.set_reuseaddr(true)?;
    socket.set_reuseport(true)?;
    socket.bind(addr)?;
    socket.listen(1024)
}

/// `/metrics` and `/stats/prometheus` for the registry.
pub fn metrics_routes(router: Router, registry: SharedRegistry) -> Router {
    let r2 = registry.clone();
    let reply = |registry: &SharedRegistry| Reply {
        status: StatusCode::OK,
        content_type: "application/openmetrics-text; version=1.0.0; charset=utf-8",
        body: Bytes::from(crate::metrics::render(registry)),
    };
    router.route("/metrics", move |_| reply(&registry)).route("/stats/prometheus", move |_| reply(&r2))
}

/// `/memory`: the heap as jemalloc (the binaries' global allocator) sees it, and the process's
/// resident set: how much is in use (`allocated`), held in pages for reuse (`active` minus
/// `allocated`), allocator bookkeeping (`metadata`), resident, mapped but handed back
/// (`retained`), and freed objects the threads cache for reuse (`thread_caches`, counted in
/// `allocated`). What a resident figure that stays high after a burst is made of.
pub fn memory_routes(router: Router) -> Router {
    router.route("/memory", |_| match heap_stats() {
        Ok(v) => Reply::json(&v),
        Err(e) => Reply::text(StatusCode::INTERNAL_SERVER_ERROR, format!("jemalloc statistics: {e}\n")),
    })
}

fn heap_stats() -> Result<serde_json::Value, tikv_jemalloc_ctl::Error> {
    use tikv_jemalloc_ctl::{Access, AsName, epoch, stats};
    // The statistics are a snapshot refreshed by advancing the epoch.
    epoch::advance()?;
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let bytes = |field: &str| status_kib(&status, field).map(|kib| kib * 1024);
    let thread_caches: usize = b"stats.arenas.4096.tcache_bytes\0".name().read()?;
    Ok(serde_json::json!({
        "allocated": stats::allocated::read()?,
        "active": stats::active::read()?,
        "metadata": stats::metadata::read()?,
        "resident": stats::resident::read()?,
        "mapped": stats::mapped::read()?,
        "retained": stats::retained::read()?,
        // Freed objects held in the threads' caches (all arenas: index 4096).
        "thread_caches": thread_caches,
        // The kernel's own split of the resident set: anonymous (heap, stacks, written
        // data), file pages (the executable's code and read-only data, libraries), shared
        // memory. Null where the kernel does not say.
        "process_resident": bytes("VmRSS:"),
        "process_resident_anon": bytes("RssAnon:"),
        "process_resident_file": bytes("RssFile:"),
        "process_resident_shmem": bytes("RssShmem:"),
    }))
}

/// A `kB` figure of a `/proc/<pid>/status` text (`field` with its colon, e.g. `"VmRSS:"`), in
/// KiB; `None` when the field is absent or not a `kB` figure.
pub fn status_kib(status: &str, field: &str) -> Option<u64> {
    let rest = status.lines().find_map(|l| l.strip_prefix(field))?;
    let mut words = rest.split_whitespace();
    let kib = words.next()?.parse().ok()?;
    (words.next() == Some("kB")).then_some(kib)
}

/// `/healthz/ready`: 200 once every start-up task is done, 503 listing what is pending.
pub fn readiness_routes(router: Router, ready: Ready) -> Router {
    router.route("/healthz/ready", move |_| {
        let pending = ready.pending();
        if pending.is_empty() {
            Reply::text(StatusCode::OK, "ready\n")
        } else {
            Reply::text(StatusCode::SERVICE_UNAVAILABLE, format!("not ready: {}\n", pending.join(", ")))
        }
    })
}

#[cfg(test)]
mod tests {
    use super::status_kib;

    #[test]
    fn status_figures_are_read_in_kib_and_only_with_their_unit() {
        let status =
            "Name:\tztunnel\nVmRSS:\t   11084 kB\nRssAnon:\t    2716 kB\nRssFile:\t8368 kB\nThreads:\t3\n";
        assert_eq!(status_kib(status, "VmRSS:"), Some(11084));
        assert_eq!(status_kib(status, "RssAnon:"), Some(2716));
        assert_eq!(status_kib(status, "RssFile:"), Some(8368));
        assert_eq!(status_kib(status, "RssShmem:"), None, "absent");
        assert_eq!(status_kib(status, "Threads:"), None, "not a kB figure");
        assert_eq!(status_kib("VmRSS:\tlots kB\n", "VmRSS:"), None);
    }
}
