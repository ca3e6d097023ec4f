//! HBONE server: accepts mTLS on a listener, serves HTTP/2, and for each CONNECT asks the
//! caller's [`ConnectHandler`] whether to accept. The handler sees the authority, the peer's
//! verified identity and the request headers; it answers with a stream callback (200) or a
//! status of its choosing. Malformed requests get 400 without reaching the handler.
//!
//! What fails before the handler decides (a TLS handshake, a peer identity, a silent peer, a
//! malformed CONNECT, a CONNECT the client cancels) is logged and reported to the handler's
//! [`ConnectHandler::failed`], which the proxies count in [`InboundFailures`].
//!
//! Draining ([`serve_draining`]): when the drain starts the listener is closed (with
//! `net.ipv4.tcp_migrate_req` its queued connections move to a successor listening on the same
//! port with `SO_REUSEPORT`) and every connection gets an HTTP/2 GOAWAY: its open streams run
//! on, new ones go to a new connection. A 503 refusal sent while draining carries
//! [`DRAINING_STATUS`] in `proxy-status` (RFC 9209), so that our own clients retry it on a new
//! connection rather than fail.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use h2::RecvStream;
use h2::server::SendResponse;
use http::{HeaderMap, Request, Response, StatusCode};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tracing::{debug, info, warn};

use super::HboneStream;
use super::connect::{self, Authority};
use crate::drain::Watch;
use crate::identity::{CertificateManager, Identity, WorkloadCertificate};
use crate::tls;

/// `proxy-status` of a 503 answered by a draining server: the request never reached its
/// destination and can be retried on a new connection.
pub const DRAINING_STATUS: &str = "ztunnel; error=connection_refused; details=\"draining\"";

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

/// Why an inbound connection or CONNECT ended before a handler decided on it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Failure {
    /// The client reset the connection before it was looked at.
    ConnectionReset,
    /// No server certificate for the address the connection arrived on.
    NoCertificate,
    /// The TLS handshake failed (no or bad client certificate, wrong ALPN, garbage).
    TlsHandshake,
    /// The TLS handshake did not finish within its bound.
    TlsHandshakeTimeout,
    /// The client certificate is not a SPIFFE identity of the trust domain.
    PeerIdentity,
    /// TLS was done, then no HTTP/2 preface or no request within the bound.
    NoRequest,
    /// The HTTP/2 connection preface or settings were malformed.
    Http2Handshake,
    /// The peer stopped answering keepalive pings.
    PeerSilent,
    /// Not a CONNECT, or a malformed authority (answered 400 or 405).
    BadConnect,
    /// The client reset the stream before the CONNECT was answered.
    CancelledByClient,
}

impl Failure {
    /// The `reason` label.
    pub fn reason(self) -> &'static str {
        match self {
            Self::ConnectionReset => "connection_reset",
            Self::NoCertificate => "no_certificate",
            Self::TlsHandshake => "tls_handshake",
            Self::TlsHandshakeTimeout => "tls_handshake_timeout",
            Self::PeerIdentity => "peer_identity",
            Self::NoRequest => "no_request",
            Self::Http2Handshake => "http2_handshake",
            Self::PeerSilent => "peer_silent",
            Self::BadConnect => "bad_connect",
            Self::CancelledByClient => "cancelled_by_client",
        }
    }
}

/// Labels of `istio_hbone_inbound_failures_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct FailureLabels {
    reason: &'static str,
}

/// `istio_hbone_inbound_failures_total{reason}`: inbound HBONE connections and CONNECTs that
/// ended before a tunnel was decided on (refusals after the decision are the handler's own).
#[derive(Clone, Debug, Default)]
pub struct InboundFailures(Family<FailureLabels, Counter>);

impl InboundFailures {
    pub fn register(registry: &mut Registry) -> Self {
        let f = Self::default();
        registry.register(
            "hbone_inbound_failures",
            "Inbound HBONE connections and CONNECTs that failed before a tunnel was decided on, by reason",
            f.0.clone(),
        );
        f
    }

    pub fn count(&self, why: Failure) {
        self.0.get_or_create(&FailureLabels { reason: why.reason() }).inc();
    }
}

impl<F> ConnectHandler for F
where
    F: Fn(ConnectRequest) -> BoxFuture<Decision> + Send + Sync + 'static,
{
    fn handle(&self, req: ConnectRequest) -> BoxFuture<Decision> {
        self(req)
    }
}

/// Chooses the TLS server config (and so the certificate presented) per accepted connection,
/// by the local address it arrived on.
pub trait ServerTls: Send + Sync + 'static {
    fn config_for(&self, local_addr: SocketAddr) -> BoxFuture<Result<Arc<rustls::ServerConfig>, String>>;
}

/// One config for every connection.
pub struct FixedTls(pub Arc<rustls::ServerConfig>);

impl ServerTls for FixedTls {
    fn config_for(&self, _: SocketAddr) -> BoxFuture<Result<Arc<rustls::ServerConfig>, String>> {
        let config = self.0.clone();
        Box::pin(async move { Ok(config) })
    }
}

/// One managed identity for every connection, following its rotations.
pub struct ManagedTls {
    certs: CertificateManager,
    identity: Identity,
    /// The config built for the current certificate.
    cache: Arc<Mutex<Option<BuiltFor>>>,
}

/// A server config and the certificate it was built from.
type BuiltFor = (Arc<WorkloadCertificate>, Arc<rustls::ServerConfig>);

impl ManagedTls {
    pub fn new(certs: CertificateManager, identity: Identity) -> Self {
        Self { certs, identity, cache: Arc::default() }
    }
}

impl ServerTls for ManagedTls {
    fn config_for(&self, _: SocketAddr) -> BoxFuture<Result<Arc<rustls::ServerConfig>, String>> {
        let (certs, identity, cache) = (self.certs.clone(), self.identity.clone(), self.cache.clone());
        Box::pin(async move {
            let cert = certs.fetch(&identity).await.map_err(|e| e.to_string())?;
            if let Ok(cached) = cache.lock()
                && let Some((held, config)) = &*cached
                && Arc::ptr_eq(held, &cert)
            {
                return Ok(config.clone());
            }
            let config = Arc::new(tls::server_config(&cert).map_err(|e| e.to_string())?);
            if let Ok(mut cached) = cache.lock() {
                *cached = Some((cert, config.clone()));
            }
            Ok(config)
        })
    }
}

/// Serves HBONE on `listener` until the task is dropped; `tls` picks the certificate. Every
/// connection or CONNECT that ends before `handler` decides on it is logged and counted in
/// `failures`.
pub async fn serve(
    listener: TcpListener,
    tls: Arc<dyn ServerTls>,
    trust_domain: String,
    handler: Arc<dyn ConnectHandler>,
    failures: InboundFailures,
) {
    serve_draining(listener, tls, trust_domain, handler, failures, None).await
}

/// Like [`serve`], and when `drain` starts: returns (closing the listener) and sends GOAWAY on
/// every connection, which then ends once its streams have.
pub async fn serve_draining(
    listener: TcpListener,
    tls: Arc<dyn ServerTls>,
    trust_domain: String,
    handler: Arc<dyn ConnectHandler>,
    failures: InboundFailures,
    drain: Option<Watch>,
) {
    let trust_domain: Arc<str> = trust_domain.into();
    if let Ok(addr) = listener.local_addr() {
        info!(%addr, "HBONE listening");
    }
    loop {
        let accepted = match &drain {
            Some(d) => tokio::select! {
                a = listener.accept() => a,
                _ = d.draining() => return,
            },
            None => listener.accept().await,
        };
        let (tcp, peer_addr) = match accepted {
            Ok(c) => c,
            Err(e) => {
                warn!(error = %e, "HBONE accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let (tls, handler, trust_domain, drain) =
            (tls.clone(), handler.clone(), trust_domain.clone(), drain.clone());
        let failures = failures.clone();
        tokio::spawn(async move {
            let ended = serve_connection(tcp, peer_addr, &*tls, &trust_domain, handler, &failures, drain);
            match ended.await {
                Ok(()) => {}
                Err(ConnError::Refused(why, detail)) => {
                    warn!(%peer_addr, reason = %detail, "HBONE connection refused");
                    failures.count(why);
                }
                Err(ConnError::Http2(e)) => debug!(%peer_addr, error = %e, "HBONE connection ended"),
                Err(ConnError::Silent(detail)) => {
                    debug!(%peer_addr, reason = %detail, "HBONE connection dropped");
                    failures.count(Failure::PeerSilent);
                }
            }
        });
    }
}

/// How a connection ended badly: refused before HTTP/2 started, or an HTTP/2 error after.
enum ConnError {
    Refused(Failure, String),
    Http2(h2::Error),
    /// The peer stopped answering keepalive pings.
    Silent(String),
}

async fn serve_connection(
    tcp: tokio::net::TcpStream,
    peer_addr: SocketAddr,
    server_tls: &dyn ServerTls,
    trust_domain: &str,
    handler: Arc<dyn ConnectHandler>,
    failures: &InboundFailures,
    drain: Option<Watch>,
) -> Result<(), ConnError> {
    let _ = tcp.set_nodelay(true);
    // (A socket without a local address was reset before we got to it.)
    let local_addr =
        tcp.local_addr().map_err(|e| ConnError::Refused(Failure::ConnectionReset, e.to_string()))?;
    let config = server_tls.config_for(local_addr).await.map_err(|e| {
        ConnError::Refused(Failure::NoCertificate, format!("no certificate for {local_addr}: {e}"))
    })?;
    let tls = tokio::time::timeout(super::HANDSHAKE_TIMEOUT, TlsAcceptor::from(config).accept(tcp))
        .await
        .map_err(|_| ConnError::Refused(Failure::TlsHandshakeTimeout, "TLS handshake timed out".into()))?
        .map_err(|e| ConnError::Refused(Failure::TlsHandshake, format!("TLS handshake failed: {e}")))?;
    let peer = tls::peer_identity(tls.get_ref().1.peer_certificates(), trust_domain)
        .map_err(|e| ConnError::Refused(Failure::PeerIdentity, e.to_string()))?;
    debug!(%peer_addr, %peer, "HBONE connection established");
    // A peer that completes TLS and then sends nothing (not even the HTTP/2 preface) is
    // dropped after FIRST_REQUEST_TIMEOUT instead of holding the connection.
    let silent = || {
        ConnError::Refused(
            Failure::NoRequest,
            format!("no request within {:?} of the TLS handshake", super::FIRST_REQUEST_TIMEOUT),
        )
    };
    let first_deadline = tokio::time::sleep(super::FIRST_REQUEST_TIMEOUT);
    tokio::pin!(first_deadline);
    let (io, heard) = super::Heard::new(tls);
    let handshake = h2::server::Builder::new()
        .initial_window_size(super::STREAM_WINDOW)
        .initial_connection_window_size(super::CONNECTION_WINDOW)
        .max_frame_size(super::MAX_FRAME_SIZE)
        .max_concurrent_streams(super::MAX_CONCURRENT_STREAMS)
        .max_header_list_size(super::MAX_HEADER_LIST_SIZE)
        .max_send_buffer_size(super::MAX_SEND_BUFFER)
        .handshake::<_, Bytes>(io);
    let mut conn = tokio::select! {
        c = handshake => c.map_err(|e| ConnError::Refused(Failure::Http2Handshake, format!("HTTP/2 handshake failed: {e}")))?,
        _ = &mut first_deadline => return Err(silent()),
    };
    let pings = conn.ping_pong();
    let keepalive = async {
        match pings {
            Some(p) => super::keepalive(p, heard).await,
            None => std::future::pending().await,
        }
    };
    tokio::pin!(keepalive);
    let draining = async {
        match &drain {
            Some(d) => d.draining().await,
            None => std::future::pending().await,
        }
    };
    tokio::pin!(draining);
    let mut waiting_first = true;
    let mut goaway_sent = false;
    loop {
        tokio::select! {
            // The connection first: a request that arrives with the deadline counts.
            biased;
            next = conn.accept() => match next {
                Some(Ok((req, respond))) => {
                    waiting_first = false;
                    let draining = drain.as_ref().is_some_and(Watch::is_draining);
                    let (handler, peer, failures) = (handler.clone(), peer.clone(), failures.clone());
                    let link = Link { peer, peer_addr, local_addr };
                    tokio::spawn(on_request(req, respond, link, handler, failures, draining));
                }
                Some(Err(e)) => return Err(ConnError::Http2(e)),
                None => return Ok(()),
            },
            _ = &mut first_deadline, if waiting_first => return Err(silent()),
            why = &mut keepalive => return Err(ConnError::Silent(why)),
            _ = &mut draining, if !goaway_sent => {
                debug!(%peer_addr, "draining: GOAWAY sent, open streams run on");
                conn.graceful_shutdown();
                goaway_sent = true;
            }
        }
    }
}

fn reply(status: StatusCode) -> Response<()> {
    let mut r = Response::new(());
    *r.status_mut() = status;
    r
}

/// The connection a CONNECT came on.
struct Link {
    /// The client's verified identity.
    peer: Identity,
    peer_addr: SocketAddr,
    local_addr: SocketAddr,
}

async fn on_request(
    req: Request<RecvStream>,
    mut respond: SendResponse<Bytes>,
    link: Link,
    handler: Arc<dyn ConnectHandler>,
    failures: InboundFailures,
    draining: bool,
) {
    let Link { peer, peer_addr, local_addr } = link;
    let answer = |respond: &mut SendResponse<Bytes>, r: Response<()>| {
        if let Err(e) = respond.send_response(r, true) {
            debug!(%peer_addr, error = %e, "CONNECT answer not sent");
        }
    };
    let authority = match connect::parse(req.method(), req.uri()) {
        Ok(a) => a,
        Err(e) => {
            warn!(%peer, %peer_addr, error = %e, "bad CONNECT");
            failures.count(Failure::BadConnect);
            return answer(&mut respond, reply(e.status()));
        }
    };
    let (parts, body) = req.into_parts();
    let request = ConnectRequest { authority, peer, peer_addr, local_addr, headers: parts.headers };
    // A client that resets the stream while the handler works (its connect timeout, or a
    // flood of HEADERS and RST_STREAM) stops the handler: nothing is dialled for it.
    let decision = tokio::select! {
        d = handler.handle(request) => d,
        reason = std::future::poll_fn(|cx| respond.poll_reset(cx)) => {
            debug!(%peer_addr, reason = ?reason.ok(), "CONNECT cancelled by the client before it was answered");
            failures.count(Failure::CancelledByClient);
            return;
        }
    };
    match decision {
        Decision::Refuse(status, reason) => {
            debug!(%status, %reason, "CONNECT refused");
            let mut r = reply(status);
            if draining && status == StatusCode::SERVICE_UNAVAILABLE {
                r.headers_mut().insert("proxy-status", http::HeaderValue::from_static(DRAINING_STATUS));
            }
            answer(&mut respond, r)
        }
        Decision::Accept(on_stream) => match respond.send_response(reply(StatusCode::OK), false) {
            // On a task of its own: this one, sized for the request and the decision, ends
            // here instead of being held for the tunnel's whole life.
            Ok(send) => drop(tokio::spawn(on_stream(HboneStream::new(send, body)))),
            Err(e) => debug!(error = %e, "CONNECT stream ended before it started"),
        },
    }
}
