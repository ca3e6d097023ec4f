//! The waypoint's defences, each tried through the real mesh (root; CI runs as root, elsewhere
//! this fails saying why): client -> ztunnel (node-a) -> HBONE -> waypoint -> HBONE -> ztunnel
//! -> server, in network namespaces with eBPF capture, mTLS everywhere and the in-repo xDS
//! server. Every check here got around the waypoint before it was hardened.
//!
//! ```text
//!   node-a (10.0.0.1) ---- link ---- node-b (10.0.0.2)
//!   client  10.1.1.2                 v1        10.2.1.2  (HTTP 8080)
//!                                    v2        10.2.2.2  (HTTP 8080)
//!                                    waypoint  10.2.5.2  (JWKS server on its 127.0.0.1:8999)
//! ```
//! Service `echo` (10.96.0.10: 80 HTTP/1.1, 9090 gRPC) and the pods v1 and v2 have the waypoint.
//! The waypoint runs with `MERGE_SLASHES`, a 1 s protocol-detection timeout, a 2 s idle timeout
//! and a 1 s request-body timeout.

use std::net::SocketAddr;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use hyper_util::rt::{TokioExecutor, TokioIo};
use mesh_tests::netns::{Netns, link_nodes, require_root, wire};
use mesh_tests::node::NodeZtunnel;
use mesh_tests::xds_server::XdsStore;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[path = "support/l7.rs"]
mod support;
use support::{get, jwt_keys, raw_http, to_waypoint, token};

const WAYPOINT_IP: &str = "10.2.5.2";
const XDS_ADDR: &str = "10.0.0.1:15010";
const HOST: &str = "echo.demo.svc.cluster.local";

const MESH: &str = r#"
workloads:
  - {name: client, namespace: demo, serviceAccount: client, addresses: [10.1.1.2], node: node-a}
  - {name: v1, namespace: demo, serviceAccount: echo, addresses: [10.2.1.2], node: node-b, workloadName: echo-v1,
     waypoint: {hostname: {namespace: demo, hostname: waypoint.demo.svc.cluster.local}},
     services: {demo/echo.demo.svc.cluster.local: [{servicePort: 80, targetPort: 8080}, {servicePort: 9090}]}}
  - {name: v2, namespace: demo, serviceAccount: echo, addresses: [10.2.2.2], node: node-b, workloadName: echo-v2,
     waypoint: {hostname: {namespace: demo, hostname: waypoint.demo.svc.cluster.local}},
     services: {demo/echo.demo.svc.cluster.local: [{servicePort: 80, targetPort: 8080}, {servicePort: 9090}]}}
  - {name: waypoint, namespace: demo, serviceAccount: waypoint, addresses: [10.2.5.2], node: node-b,
     nativeTunnel: true, services: {demo/waypoint.demo.svc.cluster.local: [{servicePort: 15008}]}}
services:
  - {name: echo, namespace: demo, hostname: echo.demo.svc.cluster.local, addresses: [10.96.0.10],
     ports: [{servicePort: 80, targetPort: 8080, appProtocol: HTTP11}, {servicePort: 9090, appProtocol: GRPC}],
     waypoint: {hostname: {namespace: demo, hostname: waypoint.demo.svc.cluster.local}}}
  - {name: waypoint, namespace: demo, hostname: waypoint.demo.svc.cluster.local, addresses: [10.96.0.20],
     ports: [{servicePort: 15008}]}
routes:
  - {name: secure, namespace: demo, matches: [{path: {prefix: /secure}}],
     parent: {service: {namespace: demo, hostname: echo.demo.svc.cluster.local, port: 80}},
     backends: [{service: {namespace: demo, hostname: echo.demo.svc.cluster.local, port: 80}}]}
  - {name: retried, namespace: demo, matches: [{path: {prefix: /retry}}],
     parent: {service: {namespace: demo, hostname: echo.demo.svc.cluster.local, port: 80}},
     backends: [{service: {namespace: demo, hostname: echo.demo.svc.cluster.local, port: 80}}]}
  - {name: trusted, namespace: demo, matches: [{path: {prefix: /trusted}}],
     parent: {service: {namespace: demo, hostname: echo.demo.svc.cluster.local, port: 80}},
     backends: [{service: {namespace: demo, hostname: echo.demo.svc.cluster.local, port: 80}}]}
  - {name: added, namespace: demo, matches: [{path: {prefix: /added}}],
     parent: {service: {namespace: demo, hostname: echo.demo.svc.cluster.local, port: 80}},
     filters: [{requestHeaderModifier: {set: [{name: x-added, value: "yes"}]}}],
     backends: [{service: {namespace: demo, hostname: echo.demo.svc.cluster.local, port: 80}}]}
  - {name: rest, namespace: demo, matches: [{path: {prefix: /}}],
     parent: {service: {namespace: demo, hostname: echo.demo.svc.cluster.local, port: 80}},
     backends: [{service: {namespace: demo, hostname: echo.demo.svc.cluster.local, port: 80}}]}
waypointPolicies:
  - name: no-admin
    namespace: demo
    target: {service: {namespace: demo, hostname: echo.demo.svc.cluster.local}}
    authorization:
      action: DENY
      rules:
        - to: [{operation: {paths: ["/admin*"], ports: ["80"]}}]
        - to: [{operation: {hosts: ["admin.demo.svc"], ports: ["80"]}}]
        - to: [{operation: {hosts: ["secret.demo.svc:*", "vault.demo.svc.:80"], ports: ["80"]}}]
        - to: [{operation: {paths: ["/ambient.testing.v1.Echo/*"], ports: ["9090"]}}]
  - name: claims
    namespace: demo
    target: {route: demo/secure}
    authorization:
      action: DENY
      rules:
        - when: [{key: "request.auth.claims[groups]", values: [blocked]}]
        - when: [{key: "request.auth.claims[realm][role]", values: [intern]}]
  - name: jwt
    namespace: demo
    target: {route: demo/secure}
    requestAuthentication:
      jwtRules:
        - {issuer: "https://issuer.test", jwksUri: "http://127.0.0.1:8999/jwks", outputClaimToHeaders: [{header: x-jwt-sub, claim: sub}]}
  - name: retry
    namespace: demo
    target: {route: demo/retried}
    retry: {attempts: 2, retryOn: [5xx], backoff: 10ms}
  - name: only-the-client-address
    namespace: demo
    target: {route: demo/trusted}
    authorization:
      rules: [{from: [{source: {ipBlocks: [10.1.1.2/32]}}]}]
"#;

/// Paths the HTTP servers were asked for (to prove a refused request never reached them).
static SEEN: Mutex<Vec<String>> = Mutex::new(Vec::new());
/// The JWKS server stalls while this is set.
static JWKS_SLOW: AtomicBool = AtomicBool::new(false);

/// An HTTP/1.1 server on 8080 answering `<name> <method> <path>` with the request headers as
/// `x-echo-<name>`; paths under `/retry` answer 503.
fn http_server(rt: &tokio::runtime::Runtime, name: &'static str) {
    let listener = rt
        .block_on(rt.spawn(tokio::net::TcpListener::bind("0.0.0.0:8080")))
        .expect("join")
        .expect("bind 8080");
    rt.spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let svc =
                    hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| async move {
                        let path = req.uri().path_and_query().map_or("/", |p| p.as_str()).to_string();
                        SEEN.lock().unwrap_or_else(|e| e.into_inner()).push(path.clone());
                        let mut resp = http::Response::new(http_body_util::Full::new(Bytes::from(format!(
                            "{name} {} {path}",
                            req.method()
                        ))));
                        if path.starts_with("/retry") {
                            *resp.status_mut() = http::StatusCode::SERVICE_UNAVAILABLE;
                        }
                        for (k, v) in req.headers() {
                            if let Ok(n) = http::HeaderName::from_bytes(format!("x-echo-{k}").as_bytes()) {
                                resp.headers_mut().append(n, v.clone());
                            }
                        }
                        Ok::<_, std::convert::Infallible>(resp)
                    });
                let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
                let _ = builder.serve_connection(TokioIo::new(stream), svc).await;
            });
        }
    });
}

/// Serves `jwks` at `http://127.0.0.1:8999/jwks`, stalling 8 s per request while [`JWKS_SLOW`].
fn jwks_server(rt: &tokio::runtime::Runtime, jwks: String) {
    let listener = rt
        .block_on(rt.spawn(tokio::net::TcpListener::bind("127.0.0.1:8999")))
        .expect("join")
        .expect("bind 8999");
    rt.spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let jwks = jwks.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |_req: http::Request<hyper::body::Incoming>| {
                    let jwks = jwks.clone();
                    async move {
                        if JWKS_SLOW.load(Ordering::SeqCst) {
                            tokio::time::sleep(Duration::from_secs(8)).await;
                        }
                        Ok::<_, std::convert::Infallible>(http::Response::new(http_body_util::Full::new(
                            Bytes::from(jwks),
                        )))
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
}

/// Every check runs; the test fails at the end naming each one that did not hold (so a run on
/// code without the defences shows all that get through, not only the first).
#[derive(Default)]
struct Checks(Vec<String>);

impl Checks {
    fn record(&mut self, ok: bool, what: String) {
        if !ok {
            self.0.push(what);
        }
    }

    fn finish(self) {
        assert!(self.0.is_empty(), "{} checks failed:\n{}", self.0.len(), self.0.join("\n"));
    }
}

macro_rules! check {
    ($checks:ident, $ok:expr, $($what:tt)+) => {
        $checks.record($ok, format!($($what)+))
    };
}

macro_rules! check_eq {
    ($checks:ident, $got:expr, $want:expr, $($what:tt)+) => {{
        let (got, want) = (&$got, &$want);
        $checks.record(got == want, format!("{} (got {got:?}, want {want:?})", format!($($what)+)))
    }};
}

fn header<'a>(answer: &'a str, name: &str) -> Option<&'a str> {
    answer.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.eq_ignore_ascii_case(name).then(|| v.trim())
    })
}

#[test]
fn waypoint_refuses_what_got_around_it() {
    require_root("waypoint hardening tests");
    let pid = std::process::id();
    let ns = |role: &str| Netns::create(&format!("wh{pid}-{role}"));
    let (node_a, node_b, client, v1, v2, wp_ns) =
        (ns("na"), ns("nb"), ns("client"), ns("v1"), ns("v2"), ns("wp"));
    link_nodes(&node_a, &node_b);
    wire(&node_a, &client, "v-client", "10.1.1");
    wire(&node_b, &v1, "v-v1", "10.2.1");
    wire(&node_b, &v2, "v-v2", "10.2.2");
    wire(&node_b, &wp_ns, "v-wp", "10.2.5");
    if std::env::var_os("RUST_LOG").is_some() {
        common::telemetry::init(common::telemetry::LogFormat::Text);
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let ca = dir.path().join("ca").to_str().expect("path").to_string();

    let store = XdsStore::new();
    store.load_yaml(MESH).unwrap_or_else(|e| panic!("mesh config: {e:#}"));
    let (_cp_rt, _xds) = mesh_tests::node::control_plane(&node_a, XDS_ADDR, store.clone());
    let url = format!("http://{XDS_ADDR}");
    let zt_a = NodeZtunnel::start_node(&node_a, &url, &ca, "node-a", &[]);
    let zt_b = NodeZtunnel::start_node(&node_b, &url, &ca, "node-b", &[]);
    zt_a.converge("node-a pod enrolled", &|s| s.pods.len() == 1);
    zt_b.converge("node-b pods enrolled", &|s| s.pods.len() == 2);

    let (jwks, key) = jwt_keys();
    let wp_rt = wp_ns.runtime();
    jwks_server(&wp_rt, jwks);
    let wp = support::start_waypoint(
        &wp_rt,
        &url,
        &ca,
        WAYPOINT_IP,
        &[
            "--path-normalization",
            "MERGE_SLASHES",
            "--protocol-detection-timeout",
            "1s",
            "--idle-timeout",
            "2s",
            "--request-body-timeout",
            "1s",
        ],
    );
    let resources = store.len(proto::WAYPOINT_RESOURCE_TYPE_URL);
    support::wait_resources(&wp_rt, &wp, resources);
    let (v1_rt, v2_rt) = (v1.runtime(), v2.runtime());
    http_server(&v1_rt, "v1");
    http_server(&v2_rt, "v2");

    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).expect("clock").as_secs();
    let claims = |extra: serde_json::Value| {
        let mut c = serde_json::json!({"iss": "https://issuer.test", "sub": "alice", "exp": now + 3600});
        if let (Some(c), Some(extra)) = (c.as_object_mut(), extra.as_object()) {
            c.extend(extra.clone());
        }
        c
    };
    let valid = token(&key, claims(serde_json::json!({})));
    let (_, other_key) = jwt_keys();
    let forged = token(&other_key, claims(serde_json::json!({})));
    let blocked_group = token(&key, claims(serde_json::json!({"groups": ["dev", "blocked"]})));
    let intern = token(&key, claims(serde_json::json!({"realm": {"role": "intern"}})));

    let mut checks = Checks::default();
    let client_rt = client.runtime();
    let vip: SocketAddr = "10.96.0.10:80".parse().expect("addr");
    let ask = |req: String| {
        client_rt.block_on(client_rt.spawn(async move { raw_http(vip, &req).await })).expect("join")
    };

    // Paths: a DENY on /admin* holds for every spelling that normalizes to it; the upstream
    // gets the normalized path; a path that cannot be normalized is a 400.
    for path in
        ["/admin", "/%61dmin", "/./admin", "/x/../admin", "//admin", "/%2e%2e/admin", "/public/..//admin/x"]
    {
        let (status, answer) = ask(get(path, HOST, &[]));
        check_eq!(checks, status, 403, "{path} must be denied: {answer}");
    }
    let (status, answer) = ask(get("/x/./y/../public?a=%2e", HOST, &[]));
    check_eq!(checks, status, 200, "{answer}");
    check!(
        checks,
        answer.contains(" GET /x/public?a=%2e"),
        "the upstream gets the normalized path, query untouched: {answer}"
    );
    let (status, answer) = ask(get("/bad%zzpath", HOST, &[]));
    check_eq!(checks, status, 400, "an escape that cannot be decoded: {answer}");
    let seen = SEEN.lock().unwrap_or_else(|e| e.into_inner()).clone();
    check!(
        checks,
        !seen.iter().any(|p| p.contains("admin") || p.contains("%zz")),
        "refused paths reached a server: {seen:?}"
    );

    // Hosts: matched without case, port or trailing dot.
    for host in [
        "admin.demo.svc",
        "ADMIN.demo.svc",
        "admin.demo.svc.",
        "Admin.Demo.Svc:80",
        "Secret.Demo.Svc.:8080",
        "vault.demo.svc",
        "VAULT.demo.svc.:80",
    ] {
        let (status, answer) = ask(get("/public", host, &[]));
        check_eq!(checks, status, 403, "host {host} must be denied: {answer}");
    }

    // JWT: a forged token under a lower-case scheme, or a second Authorization header, is a 401
    // and never reaches the upstream; a valid token passes.
    let seen_before = SEEN.lock().unwrap_or_else(|e| e.into_inner()).len();
    let bearer = |t: &str| format!("Bearer {t}");
    let lower = format!("bearer {forged}");
    let (status, answer) = ask(get("/secure/forged", HOST, &[("authorization", &lower)]));
    check_eq!(checks, status, 401, "lower-case bearer with a forged token: {answer}");
    let (status, answer) = ask(get(
        "/secure/two",
        HOST,
        &[("authorization", &bearer(&valid)), ("authorization", &bearer(&forged))],
    ));
    check_eq!(checks, status, 401, "two Authorization headers: {answer}");
    let seen = SEEN.lock().unwrap_or_else(|e| e.into_inner()).len();
    check_eq!(checks, seen, seen_before, "refused requests never reached a server");
    let (status, answer) = ask(get("/secure/ok", HOST, &[("authorization", &bearer(&valid))]));
    check_eq!(checks, status, 200, "{answer}");
    check_eq!(
        checks,
        header(&answer, "x-echo-x-jwt-sub"),
        Some("alice"),
        "claim copied to a header: {answer}"
    );
    check_eq!(checks, header(&answer, "x-echo-authorization"), None, "the token is not forwarded: {answer}");

    // Claims: a DENY on an element of a list claim and on a nested claim applies.
    let (status, answer) = ask(get("/secure/list", HOST, &[("authorization", &bearer(&blocked_group))]));
    check_eq!(checks, status, 403, "list claim: {answer}");
    let (status, answer) = ask(get("/secure/nested", HOST, &[("authorization", &bearer(&intern))]));
    check_eq!(checks, status, 403, "nested claim: {answer}");

    // JWKS continuity: with the JWKS server stalled, an unrelated route is pushed; the valid
    // token keeps working at once (the rule and its keys were kept).
    JWKS_SLOW.store(true, Ordering::SeqCst);
    let pushed = MESH.replacen(
        "waypointPolicies:\n",
        "  - {name: unrelated, namespace: demo, matches: [{path: {prefix: /unrelated}}],\n     parent: {service: {namespace: demo, hostname: echo.demo.svc.cluster.local, port: 80}},\n     backends: [{service: {namespace: demo, hostname: echo.demo.svc.cluster.local, port: 80}}]}\nwaypointPolicies:\n",
        1,
    );
    store.load_yaml(&pushed).expect("push");
    support::wait_resources(&wp_rt, &wp, resources + 1);
    let started = Instant::now();
    let (status, answer) = ask(get("/secure/after-push", HOST, &[("authorization", &bearer(&valid))]));
    check_eq!(checks, status, 200, "the token still verifies right after the push: {answer}");
    check!(checks, started.elapsed() < Duration::from_secs(3), "answered without waiting for the JWKS");
    JWKS_SLOW.store(false, Ordering::SeqCst);

    // Hop-by-hop: a client cannot make the waypoint drop a header the mesh sets.
    let (status, answer) = ask(get("/added", HOST, &[("connection", "x-added, x-forwarded-for")]));
    check_eq!(checks, status, 200, "{answer}");
    check_eq!(checks, header(&answer, "x-echo-x-added"), Some("yes"), "route header kept: {answer}");
    check_eq!(checks, header(&answer, "x-echo-x-forwarded-for"), Some("10.1.1.2"), "{answer}");

    // A stalled request body on a retry route is answered (408), not held forever.
    let started = Instant::now();
    let (status, answer) = ask(format!(
        "POST /retry/body HTTP/1.1\r\nhost: {HOST}\r\ncontent-length: 10\r\nconnection: close\r\n\r\nabc"
    ));
    check_eq!(checks, status, 408, "{answer}");
    check!(checks, started.elapsed() < Duration::from_secs(5), "{:?}", started.elapsed());

    // A pod address reaches that pod (never another endpoint of its service).
    let pod: SocketAddr = "10.2.1.2:8080".parse().expect("addr");
    let servers: Vec<String> = client_rt
        .block_on(client_rt.spawn(async move {
            let mut out = Vec::new();
            for i in 0..20 {
                let (_, answer) = raw_http(pod, &get(&format!("/pod/{i}"), "10.2.1.2", &[])).await;
                out.push(answer.lines().last().unwrap_or("").split(' ').next().unwrap_or("").to_string());
            }
            out
        }))
        .expect("join");
    check!(
        checks,
        servers.iter().all(|s| s == "v1"),
        "every request to v1's address reached v1: {servers:?}"
    );

    // gRPC: denied by policy, the answer is a gRPC status (7), not text/plain.
    let code = client_rt
        .block_on(client_rt.spawn(async {
            let channel = tonic::transport::Endpoint::from_static("http://10.96.0.10:9090")
                .connect_timeout(Duration::from_secs(5))
                .connect()
                .await
                .expect("channel");
            let mut c = proto::ambient::testing::v1::echo_client::EchoClient::new(channel);
            let req = proto::ambient::testing::v1::EchoRequest { text: "hi".into(), ..Default::default() };
            match c.say(req).await {
                Ok(_) => panic!("denied by policy"),
                Err(status) => status.code(),
            }
        }))
        .expect("join");
    check_eq!(checks, code, tonic::Code::PermissionDenied, "value");

    // `forwarded` is believed only from the workload at that address: another identity that
    // claims the client's address gets neither its ipBlocks ALLOW nor its x-forwarded-for.
    let probe_rt = node_a.runtime();
    let (liar, honest) = probe_rt
        .block_on(probe_rt.spawn({
            let ca = ca.clone();
            async move {
                let authority = common::hbone::connect::parse_authority("10.96.0.10:80").expect("authority");
                let mut forwarded = http::HeaderMap::new();
                forwarded.insert("forwarded", http::HeaderValue::from_static("for=\"10.1.1.2:4000\""));
                let mut out = Vec::new();
                for (ns, sa) in [("other", "liar"), ("demo", "client")] {
                    let conn = to_waypoint(&ca, WAYPOINT_IP, ns, sa).await;
                    let mut stream = conn.open(&authority, forwarded.clone()).await.expect("tunnel");
                    stream
                        .write_all(get("/trusted/x", HOST, &[]).as_bytes())
                        .await
                        .expect("request in the tunnel");
                    let mut answer = Vec::new();
                    let _ =
                        tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut answer)).await;
                    out.push(String::from_utf8_lossy(&answer).into_owned());
                }
                (out.remove(0), out.remove(0))
            }
        }))
        .expect("join");
    check!(checks, liar.starts_with("HTTP/1.1 403"), "the liar is not 10.1.1.2: {liar}");
    check!(checks, honest.starts_with("HTTP/1.1 200"), "{honest}");
    check_eq!(checks, header(&honest, "x-echo-x-forwarded-for"), Some("10.1.1.2"), "{honest}");

    // Silent tunnels: 500 CONNECTs that never send a byte are closed after the detection
    // timeout; a tunnel idle after a request is closed after the idle timeout.
    let (closed, idle_closed) = probe_rt
        .block_on(probe_rt.spawn({
            let ca = ca.clone();
            async move {
                let authority = common::hbone::connect::parse_authority("10.96.0.10:80").expect("authority");
                let mut streams = Vec::new();
                for _ in 0..5 {
                    let conn = to_waypoint(&ca, WAYPOINT_IP, "demo", "client").await;
                    for _ in 0..100 {
                        streams.push(conn.open(&authority, http::HeaderMap::new()).await.expect("tunnel"));
                    }
                    std::mem::forget(conn);
                }
                let mut reads = tokio::task::JoinSet::new();
                for mut s in streams {
                    reads.spawn(async move {
                        let mut buf = [0u8; 1];
                        matches!(
                            tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf)).await,
                            Ok(Ok(0))
                        )
                    });
                }
                let closed = reads.join_all().await.into_iter().filter(|c| *c).count();
                let conn = to_waypoint(&ca, WAYPOINT_IP, "demo", "client").await;
                let mut s = conn.open(&authority, http::HeaderMap::new()).await.expect("tunnel");
                s.write_all(format!("GET /idle HTTP/1.1\r\nhost: {HOST}\r\n\r\n").as_bytes())
                    .await
                    .expect("write");
                let mut answer = vec![0u8; 4096];
                let n = s.read(&mut answer).await.expect("answer");
                assert!(
                    answer[..n].starts_with(b"HTTP/1.1 200"),
                    "{}",
                    String::from_utf8_lossy(&answer[..n])
                );
                let started = Instant::now();
                let mut rest = Vec::new();
                let ended =
                    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut rest)).await.is_ok();
                (closed, ended && started.elapsed() >= Duration::from_secs(1))
            }
        }))
        .expect("join");
    check_eq!(checks, closed, 500, "every silent tunnel closed by the waypoint");
    check!(checks, idle_closed, "the idle tunnel was closed after the idle timeout");

    checks.finish();
    drop(wp);
    drop(wp_rt);
    zt_a.stop(&node_a);
    zt_b.stop(&node_b);
}
