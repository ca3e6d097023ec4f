//! Helpers the waypoint end-to-end tests share: HTTP clients in a pod, raw HTTP/1.1, an mTLS
//! HBONE connection to the waypoint, and ES256 tokens signed in the test.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A P-256 key: its JWKS (JSON) and the PEM to sign test tokens with.
pub fn jwt_keys() -> (String, jsonwebtoken::EncodingKey) {
    use base64::Engine;
    let key = rcgen::KeyPair::generate().expect("P-256 key");
    let raw = key.public_key_raw();
    assert_eq!(raw.len(), 65, "uncompressed point");
    let b64 = |b: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b);
    let jwks = serde_json::json!({"keys": [{"kty": "EC", "crv": "P-256", "alg": "ES256", "use": "sig", "kid": "k1",
        "x": b64(&raw[1..33]), "y": b64(&raw[33..65])}]});
    let signing =
        jsonwebtoken::EncodingKey::from_ec_pem(key.serialize_pem().as_bytes()).expect("signing key");
    (jwks.to_string(), signing)
}

/// A signed ES256 token with `claims` (kid k1).
pub fn token(key: &jsonwebtoken::EncodingKey, claims: serde_json::Value) -> String {
    let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::ES256);
    header.kid = Some("k1".into());
    jsonwebtoken::encode(&header, &claims, key).expect("token")
}

/// An mTLS HBONE connection to the waypoint as `<ns>/<sa>` (certificate from the shared CA).
pub async fn to_waypoint(
    ca: &str,
    waypoint_ip: &str,
    ns: &str,
    sa: &str,
) -> common::hbone::client::Connection {
    let local =
        common::identity::LocalCa::load_or_create(std::path::Path::new(ca), "cluster.local").expect("ca");
    let me = common::identity::Identity::new("cluster.local", ns, sa).expect("id");
    let cert = local.issue(&me, Duration::from_secs(600)).expect("cert");
    let wp_id = common::identity::Identity::new("cluster.local", "demo", "waypoint").expect("id");
    let config = Arc::new(common::tls::client_config(&cert, vec![wp_id]).expect("tls"));
    common::hbone::client::Connection::connect(format!("{waypoint_ip}:15008").parse().expect("addr"), config)
        .await
        .expect("mTLS to the waypoint")
}

/// One HTTP connection from a pod, reused for several requests.
pub enum HttpClient {
    H1(hyper::client::conn::http1::SendRequest<Empty<Bytes>>),
    H2(hyper::client::conn::http2::SendRequest<Empty<Bytes>>),
}

pub struct Reply {
    pub status: u16,
    pub headers: http::HeaderMap,
    pub body: String,
}

impl HttpClient {
    pub async fn connect(addr: SocketAddr, h2: bool) -> Self {
        let stream =
            tokio::net::TcpStream::connect(addr).await.unwrap_or_else(|e| panic!("connect {addr}: {e}"));
        let io = TokioIo::new(stream);
        if h2 {
            let (s, conn) =
                hyper::client::conn::http2::handshake(TokioExecutor::new(), io).await.expect("h2");
            tokio::spawn(conn);
            HttpClient::H2(s)
        } else {
            let (s, conn) = hyper::client::conn::http1::handshake(io).await.expect("h1");
            tokio::spawn(conn);
            HttpClient::H1(s)
        }
    }

    pub async fn send(&mut self, method: &str, uri: &str, headers: &[(&str, &str)]) -> Reply {
        let mut b = http::Request::builder().method(method);
        b = match self {
            HttpClient::H1(_) => b.uri(uri).header("host", "echo.demo.svc.cluster.local"),
            HttpClient::H2(_) => b.uri(format!("http://echo.demo.svc.cluster.local{uri}")),
        };
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        let req = b.body(Empty::<Bytes>::new()).expect("request");
        let resp = match self {
            HttpClient::H1(s) => {
                s.ready().await.expect("ready");
                s.send_request(req).await
            }
            HttpClient::H2(s) => s.send_request(req).await,
        }
        .unwrap_or_else(|e| panic!("{method} {uri}: {e}"));
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        let body = resp.into_body().collect().await.expect("body").to_bytes();
        Reply { status, headers, body: String::from_utf8_lossy(&body).into_owned() }
    }
}

/// Sends `request` (raw HTTP/1.1 bytes, sent as they are: no client-side normalization) to
/// `addr` and returns the status code and the whole answer (the server closes: send
/// `connection: close`). No answer within 10 s is status 0.
pub async fn raw_http(addr: SocketAddr, request: &str) -> (u16, String) {
    let exchange = async {
        let mut s =
            tokio::net::TcpStream::connect(addr).await.unwrap_or_else(|e| panic!("connect {addr}: {e}"));
        s.write_all(request.as_bytes()).await.expect("write request");
        let mut out = Vec::new();
        let _ = s.read_to_end(&mut out).await;
        String::from_utf8_lossy(&out).into_owned()
    };
    let answer =
        // No answer in time is status 0 (the caller's check names it), not a panic that would
        // hide the checks after it.
        tokio::time::timeout(Duration::from_secs(10), exchange)
            .await
            .unwrap_or_else(|_| "no answer within 10 s".to_string());
    let status = answer.split(' ').nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    (status, answer)
}

/// `GET <path>` with `host` and extra header lines, as raw HTTP/1.1.
pub fn get(path: &str, host: &str, headers: &[(&str, &str)]) -> String {
    let extra: String = headers.iter().map(|(k, v)| format!("{k}: {v}\r\n")).collect();
    format!("GET {path} HTTP/1.1\r\nhost: {host}\r\n{extra}connection: close\r\n\r\n")
}

/// Starts the waypoint `demo/waypoint` at `waypoint_ip` on `rt` (its pod's runtime) against the
/// control plane at `xds_url` and the CA in `ca`, with `extra` flags, and waits until it is
/// ready (first sync and certificate).
pub fn start_waypoint(
    rt: &tokio::runtime::Runtime,
    xds_url: &str,
    ca: &str,
    waypoint_ip: &str,
    extra: &[&str],
) -> waypoint::app::App {
    start_waypoint_in(rt, xds_url, ca, "demo", waypoint_ip, extra)
}

/// As [`start_waypoint`], for the waypoint `<namespace>/waypoint`.
pub fn start_waypoint_in(
    rt: &tokio::runtime::Runtime,
    xds_url: &str,
    ca: &str,
    namespace: &str,
    waypoint_ip: &str,
    extra: &[&str],
) -> waypoint::app::App {
    use clap::Parser;
    let base = [
        "waypoint",
        "--xds-address",
        xds_url,
        "--local-ca",
        ca,
        "--name",
        "waypoint",
        "--namespace",
        namespace,
        "--address",
        waypoint_ip,
        "--admin-addr",
        "127.0.0.1:0",
        "--metrics-addr",
        "127.0.0.1:0",
        "--readiness-addr",
        "127.0.0.1:0",
    ];
    let args = waypoint::config::Args::try_parse_from(base.iter().chain(extra)).expect("waypoint flags");
    let config = waypoint::config::Config::from_args(args).expect("config");
    let wp =
        rt.block_on(rt.spawn(waypoint::app::App::start(config))).expect("join").expect("waypoint starts");
    let ready = wp.ready.clone();
    rt.block_on(async { tokio::time::timeout(mesh_tests::CONVERGE_TIMEOUT, ready.wait()).await })
        .unwrap_or_else(|_| panic!("waypoint never ready: {:?}", wp.ready.pending()));
    wp
}

/// Waits on `rt` until the waypoint holds `n` route and policy resources.
pub fn wait_resources(rt: &tokio::runtime::Runtime, wp: &waypoint::app::App, n: usize) {
    let routes = wp.routes.clone();
    rt.block_on(async {
        tokio::time::timeout(mesh_tests::CONVERGE_TIMEOUT, routes.wait_for(|_| routes.len() == n)).await
    })
    .unwrap_or_else(|_| panic!("the waypoint never held {n} resources (holds {})", wp.routes.len()));
}

/// An HTTP server on `ns`:8081 answering `<name> <method> <path>`.
pub fn http_backend(ns: &mesh_tests::netns::Netns, name: &'static str) -> tokio::runtime::Runtime {
    use hyper_util::rt::{TokioExecutor, TokioIo};
    let rt = ns.runtime();
    let listener = rt
        .block_on(rt.spawn(async { tokio::net::TcpListener::bind("0.0.0.0:8081").await }))
        .expect("join")
        .unwrap_or_else(|e| panic!("bind 8081 in {}: {e}", ns.name));
    rt.spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(
                    move |req: hyper::Request<hyper::body::Incoming>| async move {
                        let body = format!("{name} {} {}", req.method(), req.uri().path());
                        Ok::<_, std::convert::Infallible>(hyper::Response::new(http_body_util::Full::new(
                            bytes::Bytes::from(body),
                        )))
                    },
                );
                let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
                let _ = builder.serve_connection(TokioIo::new(stream), svc).await;
            });
        }
    });
    rt
}
