//! HBONE client: one mTLS HTTP/2 connection to a peer proxy, multiplexing CONNECT streams.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use bytes::Bytes;
use h2::client::SendRequest;
use http::{HeaderMap, Method, Request, StatusCode};
use tokio::net::TcpSocket;
use tokio_rustls::TlsConnector;
use tracing::debug;

use super::HboneStream;
use super::connect::Authority;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("connect to {addr}: {source}")]
    Tcp { addr: SocketAddr, source: std::io::Error },
    #[error("TLS to {addr}: {source}")]
    Tls { addr: SocketAddr, source: std::io::Error },
    #[error("TLS handshake to {0} timed out")]
    HandshakeTimeout(SocketAddr),
    #[error("HTTP/2 to {addr}: {source}")]
    Http2 { addr: SocketAddr, source: h2::Error },
    #[error("CONNECT {authority} via {addr} answered {status}{}", if *.draining { " (peer draining)" } else { "" })]
    Status { addr: SocketAddr, authority: String, status: StatusCode, draining: bool },
    #[error("bad CONNECT request for {0}")]
    BadRequest(String),
}

/// An mTLS HTTP/2 connection to one peer (its ztunnel or waypoint on 15008).
#[derive(Clone, Debug)]
pub struct Connection {
    /// Unique per dialled connection (clones share it).
    id: u64,
    addr: SocketAddr,
    sender: SendRequest<Bytes>,
    /// Set when the connection task ends (closed, failed, or keepalive unanswered).
    closed: Arc<AtomicBool>,
}

impl ClientError {
    /// True when the stream cannot have been delivered and the connection is going away: an
    /// HTTP/2 error before the CONNECT was answered (GOAWAY, a refused stream, a closed
    /// connection), or a draining peer's 503. Nothing has reached the destination's application
    /// yet, so the same CONNECT may be sent again on a new connection.
    pub fn retry_on_new_connection(&self) -> bool {
        match self {
            Self::Status { draining, .. } => *draining,
            Self::Http2 { .. } => true,
            _ => false,
        }
    }

    /// True when the peer certainly did not act on the stream: it refused it while draining,
    /// refused it outright (REFUSED_STREAM), or its GOAWAY left it unprocessed. Anything else
    /// (the connection breaking after the CONNECT went out) may come after the peer accepted and
    /// passed early data on to the destination; sending that again would deliver it twice.
    pub fn unprocessed(&self) -> bool {
        match self {
            Self::Status { draining, .. } => *draining,
            Self::Http2 { source, .. } => {
                source.is_go_away() || source.reason() == Some(h2::Reason::REFUSED_STREAM)
            }
            _ => false,
        }
    }
}

impl Connection {
    /// Dials `addr`, handshakes mTLS with `config` (which fixes the identity expected of the
    /// server) and HTTP/2.
    pub async fn connect(addr: SocketAddr, config: Arc<rustls::ClientConfig>) -> Result<Self, ClientError> {
        Self::connect_from(addr, None, config).await
    }

    /// Like [`Connection::connect`], dialling from `local_ip` when given.
    pub async fn connect_from(
        addr: SocketAddr,
        local_ip: Option<IpAddr>,
        config: Arc<rustls::ClientConfig>,
    ) -> Result<Self, ClientError> {
        let tcp_err = |source| ClientError::Tcp { addr, source };
        let socket =
            if addr.is_ipv4() { TcpSocket::new_v4() } else { TcpSocket::new_v6() }.map_err(tcp_err)?;
        if let Some(ip) = local_ip {
            socket.bind(SocketAddr::new(ip, 0)).map_err(tcp_err)?;
        }
        let tcp = socket.connect(addr).await.map_err(tcp_err)?;
        let _ = tcp.set_nodelay(true);
        // The verifier ignores the name; the identity check is by URI SAN.
        let name = rustls_pki_types::ServerName::IpAddress(addr.ip().into());
        let tls =
            tokio::time::timeout(super::HANDSHAKE_TIMEOUT, TlsConnector::from(config).connect(name, tcp))
                .await
                .map_err(|_| ClientError::HandshakeTimeout(addr))?
                .map_err(|source| ClientError::Tls { addr, source })?;
        let (io, heard) = super::Heard::new(tls);
        let (sender, mut conn) = h2::client::Builder::new()
            .enable_push(false)
            .initial_window_size(super::STREAM_WINDOW)
            .initial_connection_window_size(super::CONNECTION_WINDOW)
            .max_frame_size(super::MAX_FRAME_SIZE)
            .max_header_list_size(super::MAX_HEADER_LIST_SIZE)
            .max_send_buffer_size(super::MAX_SEND_BUFFER)
            .handshake::<_, Bytes>(io)
            .await
            .map_err(|source| ClientError::Http2 { addr, source })?;
        let closed = Arc::new(AtomicBool::new(false));
        let pings = conn.ping_pong();
        let done = closed.clone();
        // The connection task: drives the connection, and pings the peer even while idle so a
        // dead peer is noticed and the pool stops using the connection.
        tokio::spawn(async move {
            let keepalive = async {
                match pings {
                    Some(p) => super::keepalive(p, heard).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                r = &mut conn => {
                    if let Err(e) = r {
                        debug!(%addr, error = %e, "HBONE connection closed");
                    }
                }
                why = keepalive => debug!(%addr, reason = %why, "HBONE connection dropped"),
            }
            done.store(true, Ordering::Release);
        });
        static NEXT_ID: AtomicU64 = AtomicU64::new(1);
        Ok(Self { id: NEXT_ID.fetch_add(1, Ordering::Relaxed), addr, sender, closed })
    }

    /// True if both handles are the same dialled connection.
    pub fn same_as(&self, other: &Connection) -> bool {
        self.id == other.id
    }

    /// The peer address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// False once the connection can no longer carry new streams.
    pub fn is_open(&self) -> bool {
        !self.closed.load(Ordering::Acquire)
    }

    /// Opens a CONNECT stream to `authority` with extra `headers` (baggage, forwarded, ...).
    pub async fn open(&self, authority: &Authority, headers: HeaderMap) -> Result<HboneStream, ClientError> {
        self.open_with(authority, headers, Bytes::new()).await
    }

    /// [`open`](Self::open), sending `early` (bytes the client has already written) right
    /// behind the request instead of a round trip later, once the response has come. The peer
    /// holds them in the stream's window and delivers them only if it accepts the CONNECT;
    /// a refusal discards them.
    pub async fn open_with(
        &self,
        authority: &Authority,
        headers: HeaderMap,
        early: Bytes,
    ) -> Result<HboneStream, ClientError> {
        let addr = self.addr;
        let target = authority.to_string();
        let mut req = Request::builder()
            .method(Method::CONNECT)
            .uri(&target)
            .body(())
            .map_err(|_| ClientError::BadRequest(target.clone()))?;
        req.headers_mut().extend(headers);
        // An HTTP/2 error here (GOAWAY received, the connection gone) means no new stream will
        // open on this connection: the pool stops offering it.
        let http2 = |source| {
            self.closed.store(true, Ordering::Release);
            ClientError::Http2 { addr, source }
        };
        let mut sender = self.sender.clone().ready().await.map_err(http2)?;
        let (response, mut send) = sender.send_request(req, false).map_err(http2)?;
        if !early.is_empty() {
            // h2 buffers what exceeds the stream's window and asks for more itself.
            send.send_data(early, false).map_err(http2)?;
        }
        let response = response.await.map_err(http2)?;
        if response.status() != StatusCode::OK {
            let draining = response
                .headers()
                .get("proxy-status")
                .is_some_and(|v| v.as_bytes() == super::server::DRAINING_STATUS.as_bytes());
            return Err(ClientError::Status { addr, authority: target, status: response.status(), draining });
        }
        Ok(HboneStream::new(send, response.into_body()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Early data may be sent again only after a refusal the peer certainly acted on; a broken
    /// connection may have come after the peer accepted and passed the bytes on.
    #[test]
    fn only_a_certain_refusal_lets_early_data_be_sent_again() {
        let addr: SocketAddr = "10.0.0.1:15008".parse().expect("addr");
        let h2_err = |source: h2::Error| ClientError::Http2 { addr, source };
        let status = |draining| ClientError::Status {
            addr,
            authority: "10.0.0.2:80".into(),
            status: StatusCode::SERVICE_UNAVAILABLE,
            draining,
        };
        // A stream reset for another reason stands for a connection that failed after the
        // CONNECT went out (h2's I/O errors cannot be built outside the crate).
        let broken = h2_err(h2::Error::from(h2::Reason::INTERNAL_ERROR));
        assert!(broken.retry_on_new_connection(), "without early data it is retried");
        assert!(!broken.unprocessed(), "the peer may have accepted before it failed");
        assert!(h2_err(h2::Error::from(h2::Reason::REFUSED_STREAM)).unprocessed());
        assert!(status(true).unprocessed());
        assert!(!status(false).unprocessed());
    }
}
