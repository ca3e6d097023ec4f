//! Sockets for redirected traffic: transparent listeners (`IP_TRANSPARENT`) that accept flows
//! the eBPF program assigns to them, whose accepted sockets' local address is the original
//! destination; and outbound sockets carrying ztunnel's `SO_MARK` so that ztunnel's own traffic
//! is never captured again, optionally bound to a non-local address (the pod's).

use std::net::SocketAddr;

use socket2::{Domain, Protocol, SockAddr, Socket, Type};
use tokio::net::{TcpListener, TcpSocket, TcpStream};

/// Backlog of the transparent listeners.
const BACKLOG: i32 = 1024;

/// Where a redirected connection was going: the accepted socket's local address.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize)]
pub struct OriginalDst(pub SocketAddr);

impl std::fmt::Display for OriginalDst {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

#[derive(Debug, thiserror::Error)]
#[error("{what} for {addr}: {source} (IP_TRANSPARENT and SO_MARK need CAP_NET_ADMIN)")]
pub struct SocketError {
    what: &'static str,
    addr: SocketAddr,
    source: std::io::Error,
}

fn new_socket(addr: SocketAddr) -> Result<Socket, SocketError> {
    let domain = if addr.is_ipv4() { Domain::IPV4 } else { Domain::IPV6 };
    // Non-blocking from the start (SOCK_NONBLOCK): no fcntl round trip per connection.
    Socket::new(domain, Type::STREAM.nonblocking(), Some(Protocol::TCP)).map_err(|source| SocketError {
        what: "socket",
        addr,
        source,
    })
}

fn set_transparent(socket: &Socket, addr: SocketAddr) -> Result<(), SocketError> {
    let result =
        if addr.is_ipv4() { socket.set_ip_transparent_v4(true) } else { socket.set_ip_transparent_v6(true) };
    result.map_err(|source| SocketError { what: "IP_TRANSPARENT", addr, source })
}

/// A listener on `addr` that accepts connections for any destination assigned to it.
///
/// `SO_REUSEPORT` lets the next ztunnel bind the same ports while this one still runs (a
/// hand-over): both take new connections until this one drains and closes its listener, whose
/// queued connections the kernel then moves to the successor (`tcp_migrate_req`).
///
/// `TCP_NODELAY` is set on the listener: Linux gives it to every connection accepted from it,
/// which saves a `setsockopt` per connection.
pub fn transparent_listener(addr: SocketAddr, mark: Option<u32>) -> Result<TcpListener, SocketError> {
    let socket = new_socket(addr)?;
    let err = |what| move |source| SocketError { what, addr, source };
    socket.set_reuse_address(true).map_err(err("SO_REUSEADDR"))?;
    socket.set_reuse_port(true).map_err(err("SO_REUSEPORT"))?;
    if addr.is_ipv6() {
        // The IPv4 listener of the same port is a socket of its own.
        socket.set_only_v6(true).map_err(err("IPV6_V6ONLY"))?;
    }
    set_transparent(&socket, addr)?;
    if let Some(mark) = mark {
        socket.set_mark(mark).map_err(err("SO_MARK"))?;
    }
    socket.set_tcp_nodelay(true).map_err(err("TCP_NODELAY"))?;
    socket.bind(&SockAddr::from(addr)).map_err(err("bind"))?;
    socket.listen(BACKLOG).map_err(err("listen"))?;
    TcpListener::from_std(socket.into()).map_err(err("tokio listener"))
}

/// The original destination of a connection accepted on a transparent listener.
pub fn original_dst(stream: &TcpStream) -> std::io::Result<OriginalDst> {
    stream.local_addr().map(OriginalDst)
}

/// An outbound socket carrying ztunnel's mark, bound to `source` when given (transparently,
/// so a pod's address can be used to preserve the client's source).
pub fn outbound_socket(
    dst: SocketAddr,
    mark: u32,
    source: Option<SocketAddr>,
) -> Result<TcpSocket, SocketError> {
    let socket = new_socket(dst)?;
    let err = |what| move |source| SocketError { what, addr: dst, source };
    socket.set_mark(mark).map_err(err("SO_MARK"))?;
    socket.set_tcp_nodelay(true).map_err(err("TCP_NODELAY"))?;
    if let Some(src) = source {
        set_transparent(&socket, dst)?;
        socket.bind(&SockAddr::from(src)).map_err(err("bind source"))?;
    }
    let std: std::net::TcpStream = socket.into();
    Ok(TcpSocket::from_std_stream(std))
}

/// `net.ipv4.tcp_migrate_req`: whether a closing listener's queued connections move to another
/// listener of its `SO_REUSEPORT` group. Per network namespace; also covers IPv6.
const MIGRATE_REQ: &str = "/proc/sys/net/ipv4/tcp_migrate_req";

/// Turns on `tcp_migrate_req` in the calling thread's network namespace, so that a draining
/// ztunnel closing its listeners hands the connections still queued on them to its successor
/// instead of resetting them. Returns whether it is on.
pub fn enable_listener_migration() -> bool {
    match std::fs::write(MIGRATE_REQ, "1") {
        Ok(()) => true,
        Err(e) => {
            tracing::warn!(
                error = %e,
                path = MIGRATE_REQ,
                "cannot enable listener migration: connections queued when ztunnel hands over may be reset"
            );
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Connections accepted from a transparent listener have `TCP_NODELAY` without a
    /// `setsockopt` of their own (small writes of a relay are not held back by Nagle). Needs
    /// CAP_NET_ADMIN for `IP_TRANSPARENT` (CI runs as root).
    #[tokio::test]
    async fn accepted_connections_inherit_nodelay_from_the_listener() {
        for addr in ["127.0.0.1:0", "[::1]:0"] {
            let listener = match transparent_listener(addr.parse().expect("addr"), None) {
                Ok(l) => l,
                Err(e)
                    if addr.starts_with('[') && e.source.kind() == std::io::ErrorKind::AddrNotAvailable =>
                {
                    continue; // no IPv6 loopback here
                }
                Err(e) => panic!("{addr}: {e} (needs CAP_NET_ADMIN: run as root)"),
            };
            let bound = listener.local_addr().expect("addr");
            let client = TcpStream::connect(bound).await.expect("connect");
            let (accepted, _) = listener.accept().await.expect("accept");
            assert!(accepted.nodelay().expect("nodelay"), "{addr}: the accepted socket has TCP_NODELAY");
            assert!(!client.nodelay().expect("nodelay"), "{addr}: a plain socket does not");
        }
    }
}
