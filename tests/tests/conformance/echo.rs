//! The echo backends of the conformance run, like the suite's echo-advanced: each request is
//! answered with the pod that answered and the request it received (an [`Echo`]), over HTTP on
//! 8080 (JSON) and gRPC on 7070 (`ambient.testing.v1.Echo/Say`, as `<namespace>/<pod>` with the
//! metadata received).

use std::collections::BTreeMap;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::Full;
use hyper_util::rt::{TokioExecutor, TokioIo};
use proto::ambient::testing::v1::echo_server::{Echo as EchoRpc, EchoServer};
use proto::ambient::testing::v1::{EchoReply, EchoRequest};

use crate::cases::Echo;

pub const HTTP_PORT: u16 = 8080;
pub const GRPC_PORT: u16 = 7070;

/// An HTTP/1.1 + h2c echo on 8080: a JSON [`Echo`] of every request, status 200.
pub fn http_echo(rt: &tokio::runtime::Runtime, pod: &str, namespace: &str) {
    let listener = rt
        .block_on(rt.spawn(tokio::net::TcpListener::bind(("0.0.0.0", HTTP_PORT))))
        .expect("join")
        .expect("bind 8080");
    let me = Arc::new((pod.to_string(), namespace.to_string()));
    rt.spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let _ = stream.set_nodelay(true);
            let me = me.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
                    let me = me.clone();
                    async move {
                        let mut headers: BTreeMap<String, Vec<String>> = BTreeMap::new();
                        for (k, v) in req.headers() {
                            let v = String::from_utf8_lossy(v.as_bytes()).into_owned();
                            headers.entry(k.as_str().to_string()).or_default().push(v);
                        }
                        let host = req
                            .uri()
                            .authority()
                            .map(|a| a.to_string())
                            .or_else(|| headers.get("host").and_then(|h| h.first().cloned()))
                            .unwrap_or_default();
                        let echo = Echo {
                            pod: me.0.clone(),
                            namespace: me.1.clone(),
                            method: req.method().to_string(),
                            path: req.uri().path_and_query().map_or("/".into(), |p| p.to_string()),
                            host,
                            headers,
                        };
                        let body = serde_json::to_vec(&echo).unwrap_or_default();
                        let mut resp = http::Response::new(Full::new(Bytes::from(body)));
                        resp.headers_mut().insert(
                            http::header::CONTENT_TYPE,
                            http::HeaderValue::from_static("application/json"),
                        );
                        Ok::<_, std::convert::Infallible>(resp)
                    }
                });
                let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
                let _ = builder.serve_connection(TokioIo::new(stream), svc).await;
            });
        }
    });
}

/// `ambient.testing.v1.Echo` (its `Say`) answering as `<namespace>/<pod>` with the metadata it received.
struct GrpcEcho(String);

#[tonic::async_trait]
impl EchoRpc for GrpcEcho {
    async fn say(
        &self,
        req: tonic::Request<EchoRequest>,
    ) -> Result<tonic::Response<EchoReply>, tonic::Status> {
        let mut request_headers: BTreeMap<String, String> = BTreeMap::new();
        for kv in req.metadata().iter() {
            if let tonic::metadata::KeyAndValueRef::Ascii(k, v) = kv {
                let v = String::from_utf8_lossy(v.as_encoded_bytes()).into_owned();
                request_headers
                    .entry(k.as_str().to_string())
                    .and_modify(|all| {
                        all.push(',');
                        all.push_str(&v);
                    })
                    .or_insert(v);
            }
        }
        let text = req.into_inner().text;
        Ok(tonic::Response::new(EchoReply {
            text,
            server: self.0.clone(),
            request_headers: request_headers.into_iter().collect(),
        }))
    }

    type StreamStream = tokio_stream::wrappers::ReceiverStream<Result<EchoReply, tonic::Status>>;

    async fn stream(
        &self,
        _req: tonic::Request<EchoRequest>,
    ) -> Result<tonic::Response<Self::StreamStream>, tonic::Status> {
        Err(tonic::Status::unimplemented("the conformance echo answers Say only"))
    }
}

pub fn grpc_echo(rt: &tokio::runtime::Runtime, pod: &str, namespace: &str) {
    let listener = rt
        .block_on(rt.spawn(tokio::net::TcpListener::bind(("0.0.0.0", GRPC_PORT))))
        .expect("join")
        .expect("bind 7070");
    let service = EchoServer::new(GrpcEcho(format!("{namespace}/{pod}")));
    rt.spawn(async move {
        // Without TCP_NODELAY each reply (headers, message, trailers) waits out the client's
        // delayed ACK.
        let incoming =
            tokio_stream::StreamExt::map(tokio_stream::wrappers::TcpListenerStream::new(listener), |s| {
                s.inspect(|s| {
                    let _ = s.set_nodelay(true);
                })
            });
        let _ = tonic::transport::Server::builder().add_service(service).serve_with_incoming(incoming).await;
    });
}
