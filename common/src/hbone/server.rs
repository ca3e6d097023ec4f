//! HBONE server: accepts mTLS on a listener, serves HTTP/2, and for each CONNECT asks the
//! caller's [`ConnectHandler`] whether to accept. The handler sees the authority, the peer's
//! verified identity and the request headers; it answers with a stream callback (200) or a
//! status of its choosing. Malformed requests get 400 without reaching the handler.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;

use bytes::Bytes;
use http::{HeaderMap, Request, Response, StatusCode};
use http_body_util::Empty;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tracing::{debug, info, warn};

use super::HboneStream;
use super::connect::{self, Authority};
use crate::identity::Identity;
use crate::tls;

pub type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

/// One CONNECT as the handler sees it.
#[derive(Debug)]
pub struct ConnectRequest {
    pub authority: Authority,
    /// The client's verified SPIFFE identity.
    pub peer: Identity,
    /// The TCP peer (the source proxy).
    pub peer_addr: SocketAddr,
    /// The local address the connection arrived on.
    pub local_addr: SocketAddr,
    pub headers: HeaderMap,
}

/// What to do with the stream once the 200 is sent.
pub type OnStream = Box<dyn FnOnce(HboneStream) -> BoxFuture<()> + Send>;

/// A handler's answer: accept with a stream callback, or refuse with a status.
pub enum Decision {
    Accept(OnStream),
    Refuse(StatusCode, String),
}

/// Decides on each CONNECT.
pub trait ConnectHandler: Send + Sync + 'static {
    fn handle(&self, req: ConnectRequest) -> BoxFuture<Decision>;
}

impl<F> ConnectHandler for F
where
    F: Fn(ConnectRequest) -> BoxFuture<Decision> + Send + Sync + 'static,
{
    fn handle(&self, req: ConnectRequest) -> BoxFuture<Decision> {
        self(req)
    }
}

/// Serves HBONE on `listener` with `config` until the task is dropped.
pub async fn serve(
    listener: TcpListener,
    config: Arc<rustls::ServerConfig>,
    trust_domain: String,
    handler: Arc<dyn ConnectHandler>,
) {
    let acceptor = TlsAcceptor::from(config);
    let trust_domain: Arc<str> = trust_domain.into();
    if let Ok(addr) = listener.local_addr() {
        info!(%addr, "HBONE listening");
    }
    loop {
        let (tcp, peer_addr) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                warn!(error = %e, "HBONE accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let (acceptor, handler, trust_domain) = (acceptor.clone(), handler.clone(), trust_domain.clone());
        tokio::spawn(async move {
            if let Err(reason) = serve_connection(tcp, peer_addr, acceptor, &trust_domain, handler).await {
                warn!(%peer_addr, %reason, "HBONE connection refused");
            }
        });
    }
}

async fn serve_connection(
    tcp: tokio::net::TcpStream,
    peer_addr: SocketAddr,
    acceptor: TlsAcceptor,
    trust_domain: &str,
    handler: Arc<dyn ConnectHandler>,
) -> Result<(), String> {
    let _ = tcp.set_nodelay(true);
    let local_addr = tcp.local_addr().map_err(|e| e.to_string())?;
    let tls = tokio::time::timeout(super::HANDSHAKE_TIMEOUT, acceptor.accept(tcp))
        .await
        .map_err(|_| "TLS handshake timed out".to_string())?
        .map_err(|e| format!("TLS handshake failed: {e}"))?;
    let peer =
        tls::peer_identity(tls.get_ref().1.peer_certificates(), trust_domain).map_err(|e| e.to_string())?;
    debug!(%peer_addr, %peer, "HBONE connection established");
    let svc = service_fn(move |req: Request<Incoming>| {
        let (handler, peer) = (handler.clone(), peer.clone());
        async move { Ok::<_, Infallible>(on_request(req, peer, peer_addr, local_addr, handler).await) }
    });
    let mut builder = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
    builder
        .timer(TokioTimer::new())
        .initial_stream_window_size(super::STREAM_WINDOW)
        .initial_connection_window_size(super::CONNECTION_WINDOW)
        .max_frame_size(super::MAX_FRAME_SIZE)
        .max_concurrent_streams(super::MAX_CONCURRENT_STREAMS)
        .keep_alive_interval(super::KEEPALIVE_INTERVAL)
        .keep_alive_timeout(super::KEEPALIVE_TIMEOUT);
    builder.serve_connection(TokioIo::new(tls), svc).await.map_err(|e| format!("HTTP/2: {e}"))
}

fn reply(status: StatusCode) -> Response<Empty<Bytes>> {
    let mut r = Response::new(Empty::new());
    *r.status_mut() = status;
    r
}

async fn on_request(
    mut req: Request<Incoming>,
    peer: Identity,
    peer_addr: SocketAddr,
    local_addr: SocketAddr,
    handler: Arc<dyn ConnectHandler>,
) -> Response<Empty<Bytes>> {
    let authority = match connect::parse(req.method(), req.uri()) {
        Ok(a) => a,
        Err(e) => {
            warn!(%peer, %peer_addr, error = %e, "bad CONNECT");
            return reply(e.status());
        }
    };
    let upgrade = hyper::upgrade::on(&mut req);
    let request = ConnectRequest { authority, peer, peer_addr, local_addr, headers: req.headers().clone() };
    match handler.handle(request).await {
        Decision::Refuse(status, reason) => {
            debug!(%status, %reason, "CONNECT refused");
            reply(status)
        }
        Decision::Accept(on_stream) => {
            tokio::spawn(async move {
                match upgrade.await {
                    Ok(upgraded) => on_stream(TokioIo::new(upgraded)).await,
                    Err(e) => debug!(error = %e, "CONNECT stream ended before it started"),
                }
            });
            reply(StatusCode::OK)
        }
    }
}
