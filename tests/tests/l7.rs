//! The waypoint end to end (root; CI runs as root, elsewhere this fails saying why):
//! client -> ztunnel (node-a) -> HBONE -> waypoint -> HBONE -> ztunnel -> server, in network
//! namespaces with eBPF capture, mTLS everywhere and the in-repo xDS server.
//!
//! ```text
//!   node-a (10.0.0.1) ---- link ---- node-b (10.0.0.2)
//!   client  10.1.1.2                 v1        10.2.1.2  (HTTP 8080, gRPC 9090)
//!   v2      10.1.2.2                 waypoint  10.2.5.2  (demo/waypoint, not captured)
//! ```
//! Service `echo` (10.96.0.10: 80 HTTP/1.1, 81 HTTP/2, 9090 gRPC) has the waypoint; `echo-v1`
//! and `echo-v2` are the route backends.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Empty;
use hyper_util::rt::{TokioExecutor, TokioIo};
use mesh_tests::netns::{Netns, link_nodes, require_root, run, wire};

#[path = "support/l7.rs"]
mod support;
use mesh_tests::node::NodeZtunnel;
use mesh_tests::xds_server::XdsStore;
use proto::ambient::testing::v1::echo_client::EchoClient;
use proto::ambient::testing::v1::echo_server::{Echo, EchoServer};
use proto::ambient::testing::v1::{EchoReply, EchoRequest};
use support::{HttpClient, Reply, jwt_keys, to_waypoint, token};

const VIP: &str = "10.96.0.10";
const WAYPOINT_IP: &str = "10.2.5.2";
const XDS_ADDR: &str = "10.0.0.1:15010";

const MESH: &str = r#"
workloads:
  - {name: client, namespace: demo, serviceAccount: client, addresses: [10.1.1.2], node: node-a,
     workloadName: client, canonicalName: client, canonicalRevision: v1}
  - {name: v1, namespace: demo, serviceAccount: echo, addresses: [10.2.1.2], node: node-b,
     workloadName: echo-v1, canonicalName: echo, canonicalRevision: v1,
     services: {demo/echo.demo.svc.cluster.local: [{servicePort: 80, targetPort: 8080}, {servicePort: 81, targetPort: 8080}, {servicePort: 82, targetPort: 8080}, {servicePort: 9090}],
                demo/echo-v1.demo.svc.cluster.local: [{servicePort: 80, targetPort: 8080}, {servicePort: 9090}],
                demo/echo-slow.demo.svc.cluster.local: [{servicePort: 80, targetPort: 8080}]}}
  - {name: v2, namespace: demo, serviceAccount: echo, addresses: [10.1.2.2], node: node-a,
     workloadName: echo-v2, canonicalName: echo, canonicalRevision: v2,
     services: {demo/echo.demo.svc.cluster.local: [{servicePort: 80, targetPort: 8080}, {servicePort: 81, targetPort: 8080}, {servicePort: 82, targetPort: 8080}, {servicePort: 9090}],
                demo/echo-v2.demo.svc.cluster.local: [{servicePort: 80, targetPort: 8080}, {servicePort: 9090}],
                demo/echo-slow.demo.svc.cluster.local: [{servicePort: 80, targetPort: 8080}]}}
  - {name: waypoint, namespace: demo, serviceAccount: waypoint, addresses: [10.2.5.2], node: node-b,
     nativeTunnel: true, services: {demo/waypoint.demo.svc.cluster.local: [{servicePort: 15008}]}}
services:
  - {name: echo, namespace: demo, hostname: echo.demo.svc.cluster.local, addresses: [10.96.0.10],
     ports: [{servicePort: 80, targetPort: 8080, appProtocol: HTTP11}, {servicePort: 81, targetPort: 8080, appProtocol: HTTP2},
             {servicePort: 82, targetPort: 8080, appProtocol: TCP}, {servicePort: 9090, appProtocol: GRPC}],
     waypoint: {hostname: {namespace: demo, hostname: waypoint.demo.svc.cluster.local}}}
  - {name: echo-v1, namespace: demo, hostname: echo-v1.demo.svc.cluster.local, addresses: [10.96.0.11],
     ports: [{servicePort: 80, targetPort: 8080, appProtocol: HTTP11}, {servicePort: 9090, appProtocol: GRPC}]}
  - {name: echo-v2, namespace: demo, hostname: echo-v2.demo.svc.cluster.local, addresses: [10.96.0.12],
     ports: [{servicePort: 80, targetPort: 8080, appProtocol: HTTP11}, {servicePort: 9090, appProtocol: GRPC}]}
  - {name: echo-slow, namespace: demo, hostname: echo-slow.demo.svc.cluster.local, addresses: [10.96.0.13],
     ports: [{servicePort: 80, targetPort: 8080, appProtocol: HTTP11}]}
  - {name: waypoint, namespace: demo, hostname: waypoint.demo.svc.cluster.local, addresses: [10.96.0.20],
     ports: [{servicePort: 15008}]}
routes:
  - name: exact
    namespace: demo
    parent: {service: {namespace: demo, hostname: echo.demo.svc.cluster.local, port: 80}}
    matches: [{path: {exact: /exact}}]
    filters: [{responseHeaderModifier: {set: [{name: x-route, value: exact}]}}]
    backends: [{service: {namespace: demo, hostname: echo-v1.demo.svc.cluster.local, port: 80}}]
  - name: api
    namespace: demo
    parent: {service: {namespace: demo, hostname: echo.demo.svc.cluster.local, port: 80}}
    matches: [{path: {prefix: /api}}]
    backends: [{service: {namespace: demo, hostname: echo-v1.demo.svc.cluster.local, port: 80}}]
  - name: api-v2-header
    namespace: demo
    parent: {service: {namespace: demo, hostname: echo.demo.svc.cluster.local, port: 80}}
    matches: [{path: {prefix: /api}, headers: [{name: x-version, exact: v2}]}]
    filters: [{requestHeaderModifier: {set: [{name: x-added, value: "yes"}], remove: [x-remove-me]}}]
    backends: [{service: {namespace: demo, hostname: echo-v2.demo.svc.cluster.local, port: 80}}]
  - name: api-post
    namespace: demo
    parent: {service: {namespace: demo, hostname: echo.demo.svc.cluster.local, port: 80}}
    matches: [{path: {prefix: /api}, method: POST}]
    backends: [{service: {namespace: demo, hostname: echo-v2.demo.svc.cluster.local, port: 80}}]
  - name: api-query
    namespace: demo
    parent: {service: {namespace: demo, hostname: echo.demo.svc.cluster.local, port: 80}}
    matches: [{path: {prefix: /api}, queryParams: [{name: canary, exact: "true"}]}]
    backends: [{service: {namespace: demo, hostname: echo-v2.demo.svc.cluster.local, port: 80}}]
  - name: split
    namespace: demo
    parent: {service: {namespace: demo, hostname: echo.demo.svc.cluster.local, port: 80}}
    matches: [{path: {prefix: /split}}]
    backends:
      - {service: {namespace: demo, hostname: echo-v1.demo.svc.cluster.local, port: 80}, weight: 90}
      - {service: {namespace: demo, hostname: echo-v2.demo.svc.cluster.local, port: 80}, weight: 10}
  - name: moved
    namespace: demo
    parent: {service: {namespace: demo, hostname: echo.demo.svc.cluster.local, port: 80}}
    matches: [{path: {prefix: /old}}]
    filters: [{requestRedirect: {path: {replacePrefixMatch: /new}, statusCode: 301}}]
  - name: rewrite
    namespace: demo
    parent: {service: {namespace: demo, hostname: echo.demo.svc.cluster.local, port: 80}}
    matches: [{path: {prefix: /rw}}]
    filters: [{urlRewrite: {hostname: rewritten.example, path: {replacePrefixMatch: /inner}}}]
    backends: [{service: {namespace: demo, hostname: echo-v1.demo.svc.cluster.local, port: 80}}]
  - name: grpc-say
    namespace: demo
    kind: GRPC
    parent: {service: {namespace: demo, hostname: echo.demo.svc.cluster.local, port: 9090}}
    matches: [{grpc: {service: ambient.testing.v1.Echo, method: Say}}]
    backends: [{service: {namespace: demo, hostname: echo-v2.demo.svc.cluster.local, port: 9090}}]
  - name: grpc-stream
    namespace: demo
    kind: GRPC
    parent: {service: {namespace: demo, hostname: echo.demo.svc.cluster.local, port: 9090}}
    matches: [{grpc: {service: ambient.testing.v1.Echo, method: Stream}}]
    backends: [{service: {namespace: demo, hostname: echo-v1.demo.svc.cluster.local, port: 9090}}]
  - name: outlier
    namespace: demo
    parent: {service: {namespace: demo, hostname: echo.demo.svc.cluster.local, port: 80}}
    matches: [{path: {prefix: /outlier}}]
    backends: [{service: {namespace: demo, hostname: echo.demo.svc.cluster.local, port: 80}}]
  - name: capped
    namespace: demo
    parent: {service: {namespace: demo, hostname: echo.demo.svc.cluster.local, port: 80}}
    matches: [{path: {prefix: /capped}}]
    backends: [{service: {namespace: demo, hostname: echo-v2.demo.svc.cluster.local, port: 80}}]
  - name: outlier-slow
    namespace: demo
    parent: {service: {namespace: demo, hostname: echo.demo.svc.cluster.local, port: 80}}
    matches: [{path: {prefix: /outlier-slow}}]
    backends: [{service: {namespace: demo, hostname: echo-slow.demo.svc.cluster.local, port: 80}}]
    timeouts: {request: 200ms}
waypointPolicies:
  - name: eject-slow
    namespace: demo
    target: {service: {namespace: demo, hostname: echo-slow.demo.svc.cluster.local}}
    traffic: {outlierDetection: {consecutiveGatewayErrors: 2, baseEjectionTime: 30s, maxEjectionPercent: 50}}
  - name: eject
    namespace: demo
    target: {service: {namespace: demo, hostname: echo.demo.svc.cluster.local}}
    traffic: {outlierDetection: {consecutive5xxErrors: 2, baseEjectionTime: 2s, maxEjectionPercent: 50}}
  - name: cap
    namespace: demo
    target: {service: {namespace: demo, hostname: echo-v2.demo.svc.cluster.local}}
    traffic: {connectionPool: {maxRequests: 1, maxPendingRequests: 0, maxRequestsPerConnection: 1}}
  - name: jwt-required
    namespace: demo
    target: {route: demo/secure}
    authorization:
      action: DENY
      rules:
        - from: [{source: {notRequestPrincipals: ["*"]}}]
        - when: [{key: "request.auth.claims[group]", notValues: [admins]}]
  - name: shadow
    namespace: demo
    target: {route: demo/mirrored}
    mirror: {service: {namespace: demo, hostname: echo-v2.demo.svc.cluster.local, port: 80}, percentage: 100}
  - name: retry-5xx
    namespace: demo
    target: {route: demo/retried}
    retry: {attempts: 3, retryOn: [5xx], backoff: 10ms}
  - name: per-try
    namespace: demo
    target: {route: demo/sleepy}
    retry: {attempts: 1, perTryTimeout: 200ms, retryOn: [5xx]}
  - name: limit
    namespace: demo
    target: {route: demo/limited}
    rateLimit: {maxTokens: 5, tokensPerFill: 5, fillInterval: 1h}
  - name: half-abort
    namespace: demo
    target: {route: demo/flaky}
    fault: {abort: {httpStatus: 503, percentage: 50}}
  - name: delay
    namespace: demo
    target: {route: demo/slow}
    fault: {delay: {fixedDelay: 300ms}}
  - name: no-admin
    namespace: demo
    target: {service: {namespace: demo, hostname: echo.demo.svc.cluster.local}}
    authorization:
      action: DENY
      rules:
        # Scoped to port 80: on the TCP port (82) the request fields cannot be read, and a
        # DENY rule made only of them would refuse every tunnel (fail closed, as Istio does).
        - to: [{operation: {paths: ["/admin*"], ports: ["80"]}}]
        - to: [{operation: {ports: ["80"]}}]
          when: [{key: "request.headers[x-block]", values: ["yes"]}]
        - to: [{operation: {methods: [DELETE], ports: ["80"]}}]
  - name: only-client
    namespace: demo
    target: {waypoint: demo/waypoint}
    authorization:
      action: ALLOW
      rules: [{from: [{source: {principals: ["cluster.local/ns/demo/sa/client"], namespaces: ["demo"]}}]}]
"#;

/// Routes that send a path prefix to echo-v1 on port 80 (each a target for one policy).
const PREFIX_ROUTES: [(&str, &str); 7] = [
    ("limited", "/limited"),
    ("flaky", "/flaky"),
    ("slow", "/slow"),
    ("retried", "/retry"),
    ("sleepy", "/sleepy"),
    ("mirrored", "/mirror"),
    ("secure", "/secure"),
];

/// The mesh config: `MESH` with the prefix routes added to its routes.
fn mesh_config() -> String {
    let routes: String = PREFIX_ROUTES
        .iter()
        .map(|(name, prefix)| {
            format!(
                "  - {{name: {name}, namespace: demo, matches: [{{path: {{prefix: {prefix}}}}}],\n     parent: {{service: {{namespace: demo, hostname: echo.demo.svc.cluster.local, port: 80}}}},\n     backends: [{{service: {{namespace: demo, hostname: echo-v1.demo.svc.cluster.local, port: 80}}}}]}}\n"
            )
        })
        .collect();
    MESH.replacen("waypointPolicies:\n", &format!("{routes}waypointPolicies:\n"), 1)
}

/// An OTLP/gRPC collector keeping every span it receives.
#[derive(Clone, Default)]
struct Collector(Arc<std::sync::Mutex<Vec<proto::opentelemetry::proto::trace::v1::Span>>>);

#[tonic::async_trait]
impl proto::opentelemetry::proto::collector::trace::v1::trace_service_server::TraceService for Collector {
    async fn export(
        &self,
        req: tonic::Request<proto::opentelemetry::proto::collector::trace::v1::ExportTraceServiceRequest>,
    ) -> Result<
        tonic::Response<proto::opentelemetry::proto::collector::trace::v1::ExportTraceServiceResponse>,
        tonic::Status,
    > {
        let spans =
            req.into_inner().resource_spans.into_iter().flat_map(|r| r.scope_spans).flat_map(|s| s.spans);
        self.0.lock().unwrap_or_else(|e| e.into_inner()).extend(spans);
        Ok(tonic::Response::new(Default::default()))
    }
}

/// Requests under /mirror the HTTP servers saw: (server, host).
static SEEN_MIRROR: std::sync::Mutex<Vec<(String, String)>> = std::sync::Mutex::new(Vec::new());

/// An HTTP/1.1 + h2c server on 8080 answering `<name> <method> <path> <version>` with the
/// request headers as `x-echo-<name>` response headers.
fn http_server(rt: &tokio::runtime::Runtime, name: &'static str) {
    let listener = rt
        .block_on(rt.spawn(tokio::net::TcpListener::bind("0.0.0.0:8080")))
        .expect("join")
        .expect("bind 8080");
    rt.spawn(async move {
        while let Ok((stream, peer)) = listener.accept().await {
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(
                    move |mut req: http::Request<hyper::body::Incoming>| async move {
                        if req.headers().get("upgrade").is_some_and(|u| u == "echo") {
                            // An upgraded connection echoes its bytes back.
                            let on = hyper::upgrade::on(&mut req);
                            tokio::spawn(async move {
                                if let Ok(up) = on.await {
                                    let (mut r, mut w) = tokio::io::split(TokioIo::new(up));
                                    let _ = tokio::io::copy(&mut r, &mut w).await;
                                }
                            });
                            let mut resp = http::Response::new(http_body_util::Full::new(Bytes::new()));
                            *resp.status_mut() = http::StatusCode::SWITCHING_PROTOCOLS;
                            resp.headers_mut()
                                .insert("connection", http::HeaderValue::from_static("upgrade"));
                            resp.headers_mut().insert("upgrade", http::HeaderValue::from_static("echo"));
                            return Ok::<_, std::convert::Infallible>(resp);
                        }
                        let path = req.uri().path().to_string();
                        if path.starts_with("/mirror") {
                            let host = req
                                .headers()
                                .get("host")
                                .and_then(|h| h.to_str().ok())
                                .unwrap_or("")
                                .to_string();
                            SEEN_MIRROR
                                .lock()
                                .unwrap_or_else(|e| e.into_inner())
                                .push((name.to_string(), host));
                        }
                        if path.starts_with("/retry/") {
                            // Fails twice per path, then answers.
                            static SEEN: std::sync::Mutex<BTreeMap<String, u32>> =
                                std::sync::Mutex::new(BTreeMap::new());
                            let n = {
                                let mut seen = SEEN.lock().unwrap_or_else(|e| e.into_inner());
                                let n = seen.entry(path.clone()).or_default();
                                *n += 1;
                                *n
                            };
                            if n <= 2 {
                                let mut resp =
                                    http::Response::new(http_body_util::Full::new(Bytes::from("flaky")));
                                *resp.status_mut() = http::StatusCode::SERVICE_UNAVAILABLE;
                                return Ok(resp);
                            }
                        }
                        if path.starts_with("/outlier-slow") && name == "v2" {
                            tokio::time::sleep(Duration::from_secs(1)).await;
                        } else if path.starts_with("/outlier") && name == "v2" {
                            let mut resp =
                                http::Response::new(http_body_util::Full::new(Bytes::from("broken")));
                            *resp.status_mut() = http::StatusCode::SERVICE_UNAVAILABLE;
                            return Ok(resp);
                        }
                        if path.ends_with("/slowish") {
                            tokio::time::sleep(Duration::from_millis(400)).await;
                        }
                        if path.starts_with("/sleepy") {
                            tokio::time::sleep(Duration::from_secs(2)).await;
                        }
                        let mut resp = http::Response::new(http_body_util::Full::new(Bytes::from(format!(
                            "{name} {} {} {:?}",
                            req.method(),
                            req.uri().path_and_query().map(|p| p.as_str()).unwrap_or("/"),
                            req.version()
                        ))));
                        for (k, v) in req.headers() {
                            if let Ok(n) = http::HeaderName::from_bytes(format!("x-echo-{k}").as_bytes()) {
                                resp.headers_mut().insert(n, v.clone());
                            }
                        }
                        if let Ok(v) = http::HeaderValue::from_str(&peer.to_string()) {
                            resp.headers_mut().insert("x-peer", v);
                        }
                        Ok::<_, std::convert::Infallible>(resp)
                    },
                );
                let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
                let _ = builder.serve_connection_with_upgrades(TokioIo::new(stream), svc).await;
            });
        }
    });
}

struct EchoService(&'static str);

#[tonic::async_trait]
impl Echo for EchoService {
    async fn say(
        &self,
        req: tonic::Request<EchoRequest>,
    ) -> Result<tonic::Response<EchoReply>, tonic::Status> {
        let text = req.into_inner().text;
        if text == "fail" {
            return Err(tonic::Status::not_found("asked to fail"));
        }
        Ok(tonic::Response::new(EchoReply { text, server: self.0.into(), ..Default::default() }))
    }

    type StreamStream = tokio_stream::wrappers::ReceiverStream<Result<EchoReply, tonic::Status>>;

    async fn stream(
        &self,
        req: tonic::Request<EchoRequest>,
    ) -> Result<tonic::Response<Self::StreamStream>, tonic::Status> {
        let r = req.into_inner();
        let (tx, rx) = tokio::sync::mpsc::channel(8);
        let server = self.0.to_string();
        tokio::spawn(async move {
            for i in 0..r.count {
                let reply = EchoReply {
                    text: format!("{} {i}", r.text),
                    server: server.clone(),
                    ..Default::default()
                };
                if tx.send(Ok(reply)).await.is_err() {
                    return;
                }
            }
        });
        Ok(tonic::Response::new(tokio_stream::wrappers::ReceiverStream::new(rx)))
    }
}

fn grpc_server(rt: &tokio::runtime::Runtime, name: &'static str) {
    let listener = rt
        .block_on(rt.spawn(tokio::net::TcpListener::bind("0.0.0.0:9090")))
        .expect("join")
        .expect("bind 9090");
    rt.spawn(async move {
        let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
        let _ = tonic::transport::Server::builder()
            .add_service(EchoServer::new(EchoService(name)))
            .serve_with_incoming(incoming)
            .await;
    });
}

struct Pods {
    node_a: Netns,
    node_b: Netns,
    client: Netns,
    v1: Netns,
    v2: Netns,
    waypoint: Netns,
}

fn pods() -> Pods {
    require_root("waypoint end-to-end tests");
    let pid = std::process::id();
    let ns = |role: &str| Netns::create(&format!("l7{pid}-{role}"));
    let p = Pods {
        node_a: ns("na"),
        node_b: ns("nb"),
        client: ns("client"),
        v1: ns("v1"),
        v2: ns("v2"),
        waypoint: ns("wp"),
    };
    link_nodes(&p.node_a, &p.node_b);
    wire(&p.node_a, &p.client, "v-client", "10.1.1");
    wire(&p.node_a, &p.v2, "v-v2", "10.1.2");
    wire(&p.node_b, &p.v1, "v-v1", "10.2.1");
    wire(&p.node_b, &p.waypoint, "v-wp", "10.2.5");
    p
}

fn samples(metrics: &str, metric: &str, labels: &[&str]) -> f64 {
    metrics
        .lines()
        .filter(|l| l.starts_with(&format!("{metric}{{")) && labels.iter().all(|w| l.contains(w)))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[test]
fn waypoint_end_to_end() {
    let p = pods();
    if std::env::var_os("RUST_LOG").is_some() {
        common::telemetry::init(common::telemetry::LogFormat::Text);
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let ca = dir.path().join("ca").to_str().expect("path").to_string();
    let access_log = dir.path().join("access.log");

    let (jwks, signing_key) = jwt_keys();
    let mesh = format!(
        "{}  - name: jwt\n    namespace: demo\n    target: {{route: demo/secure}}\n    requestAuthentication:\n      jwtRules:\n        - issuer: https://issuer.test\n          audiences: [echo]\n          outputClaimToHeaders: [{{header: x-jwt-group, claim: group}}]\n          jwks: '{jwks}'\n",
        mesh_config()
    );
    let store = XdsStore::new();
    store.load_yaml(&mesh).unwrap_or_else(|e| panic!("mesh config: {e:#}"));
    let (cp_rt, xds) = mesh_tests::node::control_plane(&p.node_a, XDS_ADDR, store.clone());
    let url = format!("http://{XDS_ADDR}");
    let zt_a = NodeZtunnel::start_node(&p.node_a, &url, &ca, "node-a", &[]);
    let zt_b = NodeZtunnel::start_node(&p.node_b, &url, &ca, "node-b", &[]);
    zt_a.converge("node-a pods enrolled", &|s| s.pods.len() == 2);
    zt_b.converge("node-b pod enrolled", &|s| s.pods.len() == 1);

    // The waypoint, in its own pod, from the same control plane and CA, exporting spans to a
    // collector beside it.
    let wp_rt = p.waypoint.runtime();
    let collector = Collector::default();
    let otlp = tokio_stream::wrappers::TcpListenerStream::new(
        wp_rt
            .block_on(wp_rt.spawn(tokio::net::TcpListener::bind("127.0.0.1:4317")))
            .expect("join")
            .expect("bind 4317"),
    );
    wp_rt.spawn(
        tonic::transport::Server::builder()
            .add_service(proto::opentelemetry::proto::collector::trace::v1::trace_service_server::TraceServiceServer::new(
                collector.clone(),
            ))
            .serve_with_incoming(otlp),
    );
    let wp = support::start_waypoint(
        &wp_rt,
        &url,
        &ca,
        WAYPOINT_IP,
        &[
            "--log-format",
            "json",
            "--access-log",
            access_log.to_str().expect("path"),
            "--otlp-endpoint",
            "http://127.0.0.1:4317",
            "--trace-sampling",
            "100",
        ],
    );
    support::wait_resources(&wp_rt, &wp, 33);

    let (v1_rt, v2_rt) = (p.v1.runtime(), p.v2.runtime());
    http_server(&v1_rt, "v1");
    http_server(&v2_rt, "v2");
    grpc_server(&v1_rt, "v1");
    grpc_server(&v2_rt, "v2");

    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).expect("clock").as_secs();
    let claims = |aud: &str, group: &str, exp: u64| serde_json::json!({"iss": "https://issuer.test", "sub": "alice", "aud": aud, "group": group, "exp": exp});
    let (other_jwks, other_key) = jwt_keys();
    drop(other_jwks);
    let tokens: Vec<(&'static str, String)> = vec![
        ("none", String::new()),
        ("admin", token(&signing_key, claims("echo", "admins", now + 3600))),
        ("user", token(&signing_key, claims("echo", "users", now + 3600))),
        ("expired", token(&signing_key, claims("echo", "admins", now - 3600))),
        ("audience", token(&signing_key, claims("other", "admins", now + 3600))),
        ("forged", token(&other_key, claims("echo", "admins", now + 3600))),
    ];
    let client_rt = p.client.runtime();
    let vip80: SocketAddr = format!("{VIP}:80").parse().expect("addr");
    let vip81: SocketAddr = format!("{VIP}:81").parse().expect("addr");
    let replies = client_rt
        .block_on(client_rt.spawn(async move {
            let mut h1 = HttpClient::connect(vip80, false).await;
            let mut out = BTreeMap::new();
            out.insert("exact", h1.send("GET", "/exact", &[]).await);
            out.insert(
                "traced",
                h1.send(
                    "GET",
                    "/exact",
                    &[("traceparent", "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01")],
                )
                .await,
            );
            out.insert(
                "b3",
                h1.send(
                    "GET",
                    "/exact",
                    &[
                        ("x-b3-traceid", "463ac35c9f6413ad"),
                        ("x-b3-spanid", "a2fb4a1d1a96d312"),
                        ("x-b3-sampled", "1"),
                    ],
                )
                .await,
            );
            out.insert("api", h1.send("GET", "/api/users", &[]).await);
            out.insert(
                "header",
                h1.send("GET", "/api/users", &[("x-version", "v2"), ("x-remove-me", "1")]).await,
            );
            out.insert("post", h1.send("POST", "/api/users", &[]).await);
            out.insert("query", h1.send("GET", "/api/users?canary=true", &[]).await);
            out.insert("redirect", h1.send("GET", "/old/page?x=1", &[]).await);
            out.insert("rewrite", h1.send("GET", "/rw/thing", &[]).await);
            out.insert("nomatch", h1.send("GET", "/nothing", &[]).await);
            out.insert("admin", h1.send("GET", "/admin/panel", &[]).await);
            out.insert("blocked", h1.send("GET", "/api/users", &[("x-block", "yes")]).await);
            out.insert("delete", h1.send("DELETE", "/api/users", &[]).await);
            let mut peers = std::collections::BTreeSet::new();
            for _ in 0..3 {
                let r = h1.send("GET", "/api/users", &[("x-version", "v2")]).await;
                peers.insert(
                    r.headers.get("x-peer").map(|v| v.to_str().unwrap_or("").to_string()).unwrap_or_default(),
                );
            }
            out.insert(
                "per-conn",
                Reply {
                    status: peers.len() as u16,
                    headers: http::HeaderMap::new(),
                    body: format!("{peers:?}"),
                },
            );
            let mut slow_outlier = Vec::new();
            for i in 0..20 {
                let r = h1.send("GET", &format!("/outlier-slow/{i}"), &[]).await;
                slow_outlier.push(format!("{} {}", r.status, r.body.split(' ').next().unwrap_or("")));
            }
            let mut policy = BTreeMap::<String, usize>::new();
            for _ in 0..20 {
                let r = h1.send("GET", "/limited", &[]).await;
                *policy.entry(format!("limited {}", r.status)).or_default() += 1;
            }
            for _ in 0..400 {
                let r = h1.send("GET", "/flaky", &[]).await;
                *policy.entry(format!("flaky {}", r.status)).or_default() += 1;
            }
            for i in 0..10 {
                let r = h1.send("GET", &format!("/mirror/{i}"), &[]).await;
                *policy
                    .entry(format!("mirror {} {}", r.status, r.body.split(' ').next().unwrap_or("")))
                    .or_default() += 1;
            }
            for (name, auth) in &tokens {
                let bearer = format!("Bearer {auth}");
                let headers: Vec<(&str, &str)> =
                    if auth.is_empty() { vec![] } else { vec![("authorization", bearer.as_str())] };
                let r = h1.send("GET", "/secure/data", &headers).await;
                let group = r
                    .headers
                    .get("x-echo-x-jwt-group")
                    .map(|v| v.to_str().unwrap_or("").to_string())
                    .unwrap_or_default();
                let forwarded = r.headers.contains_key("x-echo-authorization");
                policy.insert(format!("jwt {name} {} {group} {forwarded}", r.status), 1);
            }
            let mut outlier = Vec::new();
            for i in 0..30 {
                outlier.push(h1.send("GET", &format!("/outlier/{i}"), &[]).await.status);
            }
            tokio::time::sleep(Duration::from_millis(2300)).await;
            let mut recovered = Vec::new();
            for i in 0..30 {
                recovered.push(h1.send("GET", &format!("/outlier/again-{i}"), &[]).await.status);
            }
            policy.insert(format!("outlier 503s {}", outlier.iter().filter(|s| **s == 503).count()), 1);
            let last_503 = outlier.iter().rposition(|s| *s == 503).unwrap_or(0);
            policy.insert(
                format!("outlier then all 200 {}", outlier[last_503 + 1..].iter().all(|s| *s == 200)),
                1,
            );
            policy.insert(format!("recovered {}", recovered.contains(&503)), 1);
            let capped: Vec<_> = (0..4)
                .map(|_| {
                    tokio::spawn(async move {
                        let mut c = HttpClient::connect(vip80, false).await;
                        c.send("GET", "/capped/slowish", &[]).await.status
                    })
                })
                .collect();
            let mut capped_statuses = Vec::new();
            for c in capped {
                capped_statuses.push(c.await.expect("capped request"));
            }
            capped_statuses.sort();
            policy.insert(format!("capped {capped_statuses:?}"), 1);
            let retried = h1.send("GET", "/retry/one", &[]).await;
            policy.insert(
                format!("retry {} {}", retried.status, retried.body.split(' ').next().unwrap_or("")),
                1,
            );
            let mut fresh = HttpClient::connect(vip80, false).await;
            let started = std::time::Instant::now();
            let sleepy = fresh.send("GET", "/sleepy", &[]).await.status;
            let took = started.elapsed();
            policy.insert(format!("sleepy {sleepy} {}", took < Duration::from_millis(1500)), 1);
            let started = std::time::Instant::now();
            let slow = h1.send("GET", "/slow", &[]).await.status;
            policy.insert(format!("slow {slow} {}", started.elapsed() >= Duration::from_millis(300)), 1);
            let mut h2 = HttpClient::connect(vip80, true).await;
            out.insert("h2-on-80", h2.send("GET", "/exact", &[]).await);
            let mut h2_81 = HttpClient::connect(vip81, true).await;
            out.insert("h2-default", h2_81.send("GET", "/anything", &[]).await);
            let mut split = BTreeMap::<String, usize>::new();
            for _ in 0..1000 {
                let r = h1.send("GET", "/split", &[]).await;
                *split.entry(r.body.split(' ').next().unwrap_or_default().to_string()).or_default() += 1;
            }
            (out, split, policy, slow_outlier)
        }))
        .expect("client");
    let (out, split, policy, slow) = replies;
    // A slow endpoint: two request timeouts (504) eject it, then the fast one serves.
    let timeouts = slow.iter().filter(|s| s.starts_with("504")).count();
    assert_eq!(timeouts, 2, "{slow:?}");
    let last = slow.iter().rposition(|s| s.starts_with("504")).unwrap_or(0);
    assert!(slow[last + 1..].iter().all(|s| s == "200 v1"), "{slow:?}");
    // Local rate limit: the bucket's 5 tokens, then 429s.
    assert_eq!((policy["limited 200"], policy["limited 429"]), (5, 15), "{policy:?}");
    // A 50% abort over 400 requests: 200 expected, sd 10; +-5 sd.
    let aborted = policy.get("flaky 503").copied().unwrap_or(0);
    assert!((150..=250).contains(&aborted), "{policy:?}");
    assert_eq!(policy.get("slow 200 true"), Some(&1), "the delay was injected: {policy:?}");
    // Mirroring: the client's answers come from v1; v2 gets a copy of each, marked -shadow.
    assert_eq!(policy.get("mirror 200 v1"), Some(&10), "{policy:?}");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let shadows = loop {
        let seen = SEEN_MIRROR.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let shadows: Vec<_> = seen.iter().filter(|(server, _)| server == "v2").cloned().collect();
        if shadows.len() >= 10 || std::time::Instant::now() > deadline {
            break shadows;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(shadows.len(), 10, "every request mirrored to v2: {shadows:?}");
    assert!(shadows.iter().all(|(_, host)| host == "echo.demo.svc.cluster.local-shadow"), "{shadows:?}");
    // JWT: verified tokens feed authorization (principal, claims) and headers; bad ones get 401.
    for expected in [
        "jwt none 403  false",
        "jwt admin 200 admins false",
        "jwt user 403  false",
        "jwt expired 401  false",
        "jwt audience 401  false",
        "jwt forged 401  false",
    ] {
        assert!(policy.contains_key(expected), "{expected:?} missing from {policy:?}");
    }
    // Outlier detection: v2 answers 503 twice, is ejected, and v1 takes everything; after the
    // ejection time v2 is back in rotation.
    assert!(policy.contains_key("outlier 503s 2"), "{policy:?}");
    assert!(policy.contains_key("outlier then all 200 true"), "{policy:?}");
    assert!(policy.contains_key("recovered true"), "{policy:?}");
    // Circuit breaking: one request in flight to echo-v2, no waiting room.
    assert!(policy.contains_key("capped [200, 503, 503, 503]"), "{policy:?}");
    // Two 503s, then success on the third try.
    assert_eq!(policy.get("retry 200 v1"), Some(&1), "{policy:?}");
    // Two tries of 200 ms each against a 2 s upstream: 504 well before the upstream answers.
    assert_eq!(policy.get("sleepy 504 true"), Some(&1), "{policy:?}");
    let body = |k: &str| out[k].body.clone();
    assert_eq!(out["exact"].status, 200);
    assert_eq!(body("exact"), "v1 GET /exact HTTP/1.1");
    assert_eq!(
        out["exact"].headers.get("x-route").map(|v| v.as_bytes()),
        Some(&b"exact"[..]),
        "response header set"
    );
    assert!(body("api").starts_with("v1 GET /api/users"), "{}", body("api"));
    assert!(body("header").starts_with("v2 GET /api/users"), "{}", body("header"));
    assert_eq!(out["header"].headers.get("x-echo-x-added").map(|v| v.as_bytes()), Some(&b"yes"[..]));
    assert!(out["header"].headers.get("x-echo-x-remove-me").is_none(), "request header removed");
    assert!(body("post").starts_with("v2 POST"), "{}", body("post"));
    assert!(body("query").starts_with("v2 GET /api/users?canary=true"), "{}", body("query"));
    assert_eq!(out["redirect"].status, 301);
    assert_eq!(
        out["redirect"].headers.get("location").map(|v| v.to_str().unwrap_or_default()),
        Some("http://echo.demo.svc.cluster.local/new/page?x=1")
    );
    assert_eq!(body("rewrite"), "v1 GET /inner/thing HTTP/1.1");
    assert_eq!(
        out["rewrite"].headers.get("x-echo-host").map(|v| v.as_bytes()),
        Some(&b"rewritten.example"[..])
    );
    assert_eq!(out["nomatch"].status, 404, "{}", body("nomatch"));
    // L7 authorization: DENY by path and by header condition, before routing.
    assert_eq!(out["admin"].status, 403);
    assert_eq!(body("admin").trim(), "RBAC: access denied");
    assert_eq!(out["blocked"].status, 403);
    assert_eq!(out["delete"].status, 403, "DENY by method");
    // maxRequestsPerConnection 1 on echo-v2: each request on a new upstream connection.
    assert_eq!(out["per-conn"].status, 3, "distinct upstream connections: {}", out["per-conn"].body);
    assert_eq!(body("h2-on-80"), "v1 GET /exact HTTP/1.1", "an HTTP/2 client reaches an HTTP/1.1 port");
    assert!(out["h2-default"].body.ends_with("HTTP/2.0"), "HTTP/2 port: {}", body("h2-default"));
    assert!(out["h2-default"].headers.contains_key("x-echo-x-forwarded-for"));
    assert!(out["exact"].headers.contains_key("x-echo-x-request-id"));
    // 90/10 over 1000 requests: v2 expects 100 (sd ~9.5); +-4 sd.
    let v2 = split.get("v2").copied().unwrap_or(0);
    assert_eq!(split.values().sum::<usize>(), 1000, "{split:?}");
    assert!((62..=138).contains(&v2), "90/10 split landed {split:?}");

    // An HTTP/1.1 upgrade passes through the waypoint: 101, then raw bytes both ways.
    let upgraded = client_rt
        .block_on(client_rt.spawn(async move {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let mut s = tokio::net::TcpStream::connect(vip80).await.expect("connect");
            let hello = "GET /api/ws HTTP/1.1\r\nhost: echo\r\nconnection: upgrade\r\nupgrade: echo\r\n\r\n";
            s.write_all(hello.as_bytes()).await.expect("write");
            let mut head = Vec::new();
            while !head.ends_with(b"\r\n\r\n") {
                let mut b = [0u8; 1];
                if s.read(&mut b).await.expect("read") == 0 {
                    break;
                }
                head.push(b[0]);
            }
            s.write_all(b"ping over the upgrade").await.expect("write");
            let mut echoed = [0u8; 21];
            tokio::time::timeout(Duration::from_secs(10), s.read_exact(&mut echoed))
                .await
                .expect("in time")
                .expect("echo");
            (String::from_utf8_lossy(&head).into_owned(), String::from_utf8_lossy(&echoed).into_owned())
        }))
        .expect("upgrade client");
    assert!(upgraded.0.starts_with("HTTP/1.1 101"), "{}", upgraded.0);
    assert!(upgraded.0.to_ascii_lowercase().contains("upgrade: echo"), "{}", upgraded.0);
    assert_eq!(upgraded.1, "ping over the upgrade");

    // A TCP port: the waypoint passes the bytes through to an endpoint untouched (no route, no
    // x-forwarded-for added).
    let raw = client_rt
        .block_on(client_rt.spawn(async move {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let addr: SocketAddr = format!("{VIP}:82").parse().expect("addr");
            let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
            s.write_all(b"GET /tcp HTTP/1.1\r\nhost: raw\r\nconnection: close\r\n\r\n").await.expect("write");
            let mut out = String::new();
            tokio::time::timeout(Duration::from_secs(10), s.read_to_string(&mut out))
                .await
                .expect("in time")
                .expect("read");
            out
        }))
        .expect("tcp client");
    assert!(raw.starts_with("HTTP/1.1 200"), "{raw}");
    assert!(raw.contains(" GET /tcp HTTP/1.1"), "{raw}");
    assert!(!raw.contains("x-echo-x-forwarded-for"), "bytes untouched: {raw}");

    // gRPC through the waypoint: unary, server streaming, and an error status in trailers.
    let grpc = client_rt
        .block_on(client_rt.spawn(async move {
            let mut c = EchoClient::connect(format!("http://{VIP}:9090")).await.expect("grpc connect");
            let say = c.say(EchoRequest { text: "hi".into(), count: 0 }).await.expect("say").into_inner();
            let mut stream =
                c.stream(EchoRequest { text: "s".into(), count: 3 }).await.expect("stream").into_inner();
            let mut got = Vec::new();
            while let Some(m) = stream.message().await.expect("message") {
                got.push(format!("{} {}", m.server, m.text));
            }
            let fail = c.say(EchoRequest { text: "fail".into(), count: 0 }).await.expect_err("fails");
            (say, got, fail.code())
        }))
        .expect("grpc client");
    assert_eq!((grpc.0.server.as_str(), grpc.0.text.as_str()), ("v2", "hi"));
    assert_eq!(grpc.1, ["v1 s 0", "v1 s 1", "v1 s 2"]);
    assert_eq!(grpc.2, tonic::Code::NotFound, "the status in the trailers came through");

    // Real clients: curl (HTTP/1.1 and prior-knowledge HTTP/2) and Python grpcio.
    let curl = |extra: &[&str]| {
        let mut args = vec!["netns", "exec", p.client.name.as_str(), "curl", "-sS", "--max-time", "10"];
        args.extend_from_slice(extra);
        args.push("http://10.96.0.10/api/curl");
        run("ip", &args)
    };
    assert!(curl(&[]).starts_with("v1 GET /api/curl HTTP/1.1"), "curl");
    assert!(
        curl(&["--http2-prior-knowledge"]).starts_with("v1 GET /api/curl HTTP/1.1"),
        "curl --http2-prior-knowledge"
    );
    let python = std::process::Command::new("python3").args(["-c", "import grpc"]).output();
    assert!(
        python.as_ref().is_ok_and(|o| o.status.success()),
        "python3 with grpcio is needed for the independent gRPC client (pip install grpcio): {python:?}"
    );
    let script = r#"
import grpc, sys
channel = grpc.insecure_channel("10.96.0.10:9090")
say = channel.unary_unary("/ambient.testing.v1.Echo/Say")
# EchoRequest{text: "py"} by hand: field 1, length-delimited.
reply = say(b"\x0a\x02py", timeout=10)
# EchoReply{text: 1, server: 2}
sys.stdout.write(repr(reply))
"#;
    let py = run("ip", &["netns", "exec", &p.client.name, "python3", "-c", script]);
    assert!(py.contains("py") && py.contains("v2"), "grpcio reply via the waypoint: {py}");

    // A CONNECT for a service this waypoint does not serve is refused; one it serves is not.
    // These peers speak HBONE to the waypoint themselves, as a ztunnel does, so they run in
    // node-a's own namespace: an enrolled pod's SYN to port 15008 is captured like any other.
    let probe_rt = p.node_a.runtime();
    let statuses = probe_rt
        .block_on(probe_rt.spawn({
            let ca = ca.clone();
            async move {
                use common::hbone::client::ClientError;
                let conn = to_waypoint(&ca, WAYPOINT_IP, "demo", "client").await;
                let mut out = Vec::new();
                for a in ["10.96.0.11:80", "10.96.0.10:80", "10.96.0.10:7777"] {
                    let authority = common::hbone::connect::parse_authority(a).expect("authority");
                    out.push(match conn.open(&authority, http::HeaderMap::new()).await {
                        Ok(_) => 200,
                        Err(ClientError::Status { status, .. }) => status.as_u16(),
                        Err(e) => panic!("{a}: {e}"),
                    });
                }
                out
            }
        }))
        .expect("connect checks");
    assert_eq!(statuses, [403, 200, 403], "not ours / ours / no such port");

    // At L7 the waypoint-wide ALLOW admits only demo/client: another identity gets its tunnel
    // but its requests are refused 403.
    let stranger = probe_rt
        .block_on(probe_rt.spawn({
            let ca = ca.clone();
            async move {
                let conn = to_waypoint(&ca, WAYPOINT_IP, "other", "stranger").await;
                let authority = common::hbone::connect::parse_authority("10.96.0.10:80").expect("authority");
                let stream = conn.open(&authority, http::HeaderMap::new()).await.expect("tunnel accepted");
                let (mut send, c) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
                    .await
                    .expect("h1 in the tunnel");
                tokio::spawn(c);
                let req = http::Request::get("/exact")
                    .header("host", "echo")
                    .body(Empty::<Bytes>::new())
                    .expect("req");
                send.send_request(req).await.expect("answer").status().as_u16()
            }
        }))
        .expect("stranger");
    assert_eq!(stranger, 403, "ALLOW by principal and namespace refuses other/stranger");

    // A TCP port is authorized at L4 when the tunnel is asked for: other/stranger is refused
    // before any byte is passed through (no request to refuse later); demo/client is admitted.
    let tcp_tunnels = probe_rt
        .block_on(probe_rt.spawn({
            let ca = ca.clone();
            async move {
                use common::hbone::client::ClientError;
                let authority =
                    common::hbone::connect::parse_authority(&format!("{VIP}:82")).expect("authority");
                let mut out = Vec::new();
                for (ns, sa) in [("other", "stranger"), ("demo", "client")] {
                    let conn = to_waypoint(&ca, WAYPOINT_IP, ns, sa).await;
                    out.push(match conn.open(&authority, http::HeaderMap::new()).await {
                        Ok(_) => 200,
                        Err(ClientError::Status { status, .. }) => status.as_u16(),
                        Err(e) => panic!("{ns}/{sa}: {e}"),
                    });
                }
                out
            }
        }))
        .expect("tcp tunnels");
    assert_eq!(tcp_tunnels, [401, 200], "TCP port: stranger refused, client admitted");

    // Tracing: the waypoint's span is the caller's child and the upstream's parent, and reaches
    // the collector; B3 input continues the same trace.
    let upstream_tp = |k: &str| {
        out[k].headers.get("x-echo-traceparent").and_then(|v| v.to_str().ok()).unwrap_or("").to_string()
    };
    let tp = upstream_tp("traced");
    let parts: Vec<&str> = tp.split('-').collect();
    assert_eq!(parts.len(), 4, "upstream traceparent {tp:?}");
    assert_eq!(parts[1], "0af7651916cd43dd8448eb211c80319c", "same trace upstream");
    let waypoint_span = parts[2].to_string();
    assert_ne!(waypoint_span, "b7ad6b7169203331", "the waypoint's own span is the upstream's parent");
    assert!(upstream_tp("b3").contains("0000000000000000463ac35c9f6413ad"), "{}", upstream_tp("b3"));
    let hexs = |b: &[u8]| b.iter().map(|b| format!("{b:02x}")).collect::<String>();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let span = loop {
        let spans = collector.0.lock().unwrap_or_else(|e| e.into_inner()).clone();
        if let Some(s) = spans.into_iter().find(|s| hexs(&s.trace_id) == "0af7651916cd43dd8448eb211c80319c") {
            break s;
        }
        assert!(std::time::Instant::now() < deadline, "the span never reached the collector");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(hexs(&span.parent_span_id), "b7ad6b7169203331");
    assert_eq!(hexs(&span.span_id), waypoint_span);
    assert_eq!(span.name, "demo/exact");
    assert_eq!(span.kind, proto::opentelemetry::proto::trace::v1::span::SpanKind::Server as i32);

    // Plaintext where the waypoint's 15008 expects mTLS: refused, logged and counted by reason.
    let metrics_addr = wp.metrics_addr;
    let tls_failures = || {
        let (_, m) = wp_rt
            .block_on(wp_rt.spawn(mesh_tests::http::get(metrics_addr, "/metrics")))
            .expect("join")
            .expect("metrics");
        samples(&m, "istio_hbone_inbound_failures_total", &["reason=\"tls_handshake\""])
    };
    let before = tls_failures();
    let hbone: std::net::SocketAddr = format!("{WAYPOINT_IP}:15008").parse().expect("addr");
    wp_rt.block_on(wp_rt.spawn(mesh_tests::echo::plaintext_until_closed(hbone))).expect("join");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while tls_failures() < before + 1.0 {
        assert!(std::time::Instant::now() < deadline, "plaintext to the waypoint's 15008 not counted");
        std::thread::sleep(Duration::from_millis(20));
    }

    // Metrics with Istio's labels, reported by the waypoint.
    let (status, m) = wp_rt
        .block_on(wp_rt.spawn(mesh_tests::http::get(metrics_addr, "/metrics")))
        .expect("join")
        .expect("metrics");
    assert_eq!(status, 200);
    let base = [
        "reporter=\"waypoint\"",
        "source_workload=\"client\"",
        "source_principal=\"spiffe://cluster.local/ns/demo/sa/client\"",
    ];
    let v1_ok = samples(
        &m,
        "istio_requests_total",
        &[
            &base[..],
            &[
                "destination_service=\"echo-v1.demo.svc.cluster.local\"",
                "response_code=\"200\"",
                "request_protocol=\"http\"",
                "destination_workload=\"echo-v1\"",
            ],
        ]
        .concat(),
    );
    assert!(v1_ok >= 800.0, "{v1_ok}\n{m}");
    let not_found = samples(
        &m,
        "istio_requests_total",
        &[&base[..], &["response_code=\"404\"", "response_flags=\"NR\""]].concat(),
    );
    assert_eq!(not_found, 1.0);
    let grpc_ok =
        samples(&m, "istio_requests_total", &["request_protocol=\"grpc\"", "grpc_response_status=\"0\""]);
    assert!(grpc_ok >= 3.0, "{grpc_ok}");
    let grpc_nf =
        samples(&m, "istio_requests_total", &["request_protocol=\"grpc\"", "grpc_response_status=\"5\""]);
    assert_eq!(grpc_nf, 1.0);
    assert!(samples(&m, "istio_request_duration_milliseconds_count", &["reporter=\"waypoint\""]) >= 1000.0);
    assert!(m.contains("istio_response_bytes_bucket"), "{m}");
    // A passthrough connection is recorded when it ends, which for the admitted tunnel (closed
    // at once by the client) may be a moment after the scrape above: read again until it is in.
    let tcp_connections = |m: &str| {
        samples(
            m,
            "istio_tcp_connections_opened_total",
            &["reporter=\"waypoint\"", "request_protocol=\"tcp\""],
        )
    };
    let mut tcp = tcp_connections(&m);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while tcp < 2.0 && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
        let (_, again) = wp_rt
            .block_on(wp_rt.spawn(mesh_tests::http::get(metrics_addr, "/metrics")))
            .expect("join")
            .expect("metrics");
        tcp = tcp_connections(&again);
    }
    assert_eq!(tcp, 2.0, "the TCP passthrough, and demo/client's admitted tunnel to port 82");
    let denied = samples(
        &m,
        "istio_authorization_decisions_total",
        &["direction=\"waypoint\"", "decision=\"deny\"", "policy=\"-\""],
    );
    assert_eq!(denied, 1.0, "other/stranger's tunnel to port 82, refused by the waypoint-wide ALLOW");

    // The JSON access log: one line per request with the fields users parse.
    // Lines are written by the waypoint's log thread: read once the file stops growing.
    let mut log = String::new();
    for _ in 0..50 {
        let now = std::fs::read_to_string(&access_log).expect("access log");
        if !now.is_empty() && now.len() == log.len() {
            break;
        }
        log = now;
        std::thread::sleep(Duration::from_millis(100));
    }
    let lines: Vec<serde_json::Value> =
        log.lines().map(|l| serde_json::from_str(l).expect("JSON line")).collect();
    assert!(lines.len() >= 1000, "{} lines", lines.len());
    let redirect = lines.iter().find(|l| l["path"] == "/old/page?x=1").expect("redirect logged");
    assert_eq!(redirect["response_code"], 301);
    assert_eq!(redirect["route_name"], "demo/moved");
    let exact = lines.iter().find(|l| l["path"] == "/exact").expect("exact logged");
    for field in [
        "authority",
        "method",
        "protocol",
        "request_id",
        "start_time",
        "upstream_cluster",
        "upstream_host",
        "x_forwarded_for",
        "duration",
        "bytes_sent",
        "bytes_received",
        "response_flags",
    ] {
        assert!(exact.get(field).is_some(), "{field} missing: {exact}");
    }
    assert_eq!(exact["upstream_cluster"], "outbound|80||echo-v1.demo.svc.cluster.local");
    let admin = lines.iter().find(|l| l["path"] == "/admin/panel").expect("denial logged");
    assert_eq!(admin["response_code"], 403);
    assert_eq!(admin["response_code_details"], "rbac_access_denied_matched_policy[demo/no-admin]");
    assert!(exact["requested_server_name"].is_null(), "null where not applicable");

    // Drain: with an idle keep-alive connection open, the waypoint closes it gracefully and the
    // drain ends early; afterwards new requests no longer get through it.
    let idle = client_rt
        .block_on(client_rt.spawn(async move {
            let mut c = HttpClient::connect(vip80, false).await;
            let status = c.send("GET", "/exact", &[]).await.status;
            (c, status)
        }))
        .expect("idle client");
    assert_eq!(idle.1, 200);
    let mut wp = wp;
    let started = std::time::Instant::now();
    let cut = wp_rt.block_on(wp.drain(Duration::from_secs(10)));
    assert_eq!(cut, 0, "the idle tunnel closed gracefully");
    assert!(started.elapsed() < Duration::from_secs(8), "drain took {:?}", started.elapsed());
    let after = client_rt
        .block_on(client_rt.spawn(async move {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let mut s = tokio::net::TcpStream::connect(vip80).await.expect("captured by ztunnel");
            let _ = s.write_all(b"GET /exact HTTP/1.1\r\nhost: echo\r\nconnection: close\r\n\r\n").await;
            let mut out = Vec::new();
            let _ = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out)).await;
            String::from_utf8_lossy(&out).into_owned()
        }))
        .expect("after drain");
    assert!(!after.starts_with("HTTP/1.1 200"), "a drained waypoint took a new request: {after}");
    drop(idle);

    drop(wp);
    zt_a.stop(&p.node_a);
    zt_b.stop(&p.node_b);
    cp_rt.block_on(xds.stop());
}
