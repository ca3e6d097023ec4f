//! The client side of the conformance run: a case's request sent from a pod, over HTTP/1.1 or
//! as a gRPC call, and what came back as a [`Reply`].

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use proto::ambient::testing::v1::EchoRequest;
use proto::ambient::testing::v1::echo_client::EchoClient;

use crate::cases::{Echo, Reply, Request};

/// How long one request may take.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// Sends `req` `count` times from this task's pod to `addr` (one connection, re-opened after a
/// failure) naming `authority`.
pub async fn send_http(addr: SocketAddr, authority: String, req: Arc<Request>, count: usize) -> Vec<Reply> {
    type Sender = hyper::client::conn::http1::SendRequest<Empty<Bytes>>;
    async fn connect(addr: SocketAddr) -> Result<Sender, String> {
        let stream = tokio::time::timeout(REQUEST_TIMEOUT, tokio::net::TcpStream::connect(addr))
            .await
            .map_err(|_| format!("connect {addr}: timed out"))?
            .map_err(|e| format!("connect {addr}: {e}"))?;
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| format!("HTTP/1.1 handshake with {addr}: {e}"))?;
        tokio::spawn(conn);
        Ok(sender)
    }
    async fn once(sender: &mut Sender, authority: &str, req: &Request) -> Result<Reply, String> {
        let mut b = http::Request::builder().method(req.method()).uri(req.path());
        if !req.headers.keys().any(|k| k.eq_ignore_ascii_case("host")) {
            b = b.header(http::header::HOST, authority);
        }
        for (k, v) in &req.headers {
            b = b.header(k.as_str(), v.as_str());
        }
        let request = b.body(Empty::<Bytes>::new()).map_err(|e| format!("request: {e}"))?;
        sender.ready().await.map_err(|e| format!("connection: {e}"))?;
        let resp = sender.send_request(request).await.map_err(|e| format!("no answer: {e}"))?;
        let (parts, body) = resp.into_parts();
        let body = body.collect().await.map_err(|e| format!("body: {e}"))?.to_bytes();
        let echo = serde_json::from_slice::<Echo>(&body);
        let error = echo.as_ref().err().map(|_| format!("body {:?}", String::from_utf8_lossy(&body)));
        Ok(Reply { status: parts.status.as_u16(), headers: parts.headers, echo: echo.ok(), error })
    }
    let mut replies = Vec::with_capacity(count);
    let mut sender = None;
    for _ in 0..count {
        let attempt = async {
            let s = match sender.take() {
                Some(s) => s,
                None => connect(addr).await?,
            };
            let s = sender.insert(s);
            once(s, &authority, &req).await
        };
        let reply = match tokio::time::timeout(REQUEST_TIMEOUT, attempt).await {
            Ok(Ok(r)) => r,
            Ok(Err(e)) => {
                sender = None;
                Reply { error: Some(e), ..Default::default() }
            }
            Err(_) => {
                sender = None;
                Reply { error: Some(format!("no answer within {REQUEST_TIMEOUT:?}")), ..Default::default() }
            }
        };
        replies.push(reply);
    }
    replies
}

/// As [`send_http`], for `Echo/Say` over h2c (one channel).
pub async fn send_grpc(addr: SocketAddr, authority: String, req: Arc<Request>, count: usize) -> Vec<Reply> {
    let failed =
        |e: String| (0..count).map(|_| Reply { error: Some(e.clone()), ..Default::default() }).collect();
    let endpoint = match tonic::transport::Endpoint::from_shared(format!("http://{addr}")) {
        Ok(e) => e,
        Err(e) => return failed(e.to_string()),
    };
    let origin = match format!("http://{authority}").parse::<http::Uri>() {
        Ok(o) => o,
        Err(e) => return failed(e.to_string()),
    };
    let endpoint = endpoint.origin(origin).connect_timeout(REQUEST_TIMEOUT).timeout(REQUEST_TIMEOUT);
    let channel = match endpoint.connect().await {
        Ok(c) => c,
        Err(e) => return failed(format!("connect {addr}: {e}")),
    };
    let mut client = EchoClient::new(channel);
    let mut replies = Vec::with_capacity(count);
    for _ in 0..count {
        let mut call = tonic::Request::new(EchoRequest { text: "conformance".into(), count: 0 });
        for (k, v) in &req.headers {
            let key = tonic::metadata::MetadataKey::from_bytes(k.to_ascii_lowercase().as_bytes());
            match (key, v.parse()) {
                (Ok(k), Ok(v)) => {
                    call.metadata_mut().append(k, v);
                }
                _ => return failed(format!("metadata {k}: {v}")),
            }
        }
        let reply = match client.say(call).await {
            Ok(resp) => {
                let headers = resp.metadata().clone().into_headers();
                let r = resp.into_inner();
                let (namespace, pod) = r.server.split_once('/').unwrap_or(("", &r.server));
                let echo = Echo {
                    pod: pod.to_string(),
                    namespace: namespace.to_string(),
                    method: "POST".into(),
                    path: "/ambient.testing.v1.Echo/Say".into(),
                    host: String::new(),
                    headers: r.request_headers.into_iter().map(|(k, v)| (k, vec![v])).collect(),
                };
                Reply { status: 200, headers, echo: Some(echo), error: None }
            }
            Err(status) => Reply {
                error: Some(format!("gRPC {:?}: {}", status.code(), status.message())),
                ..Default::default()
            },
        };
        replies.push(reply);
    }
    replies
}
