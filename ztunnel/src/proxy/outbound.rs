//! Outbound (15001): a pod on this node dialled somewhere. The original destination decides:
//! - a service VIP: an endpoint is picked per the service's load balancing (or, if the service
//!   has a waypoint, the connection goes to the waypoint with the VIP as authority);
//! - a workload address: that workload (or its waypoint);
//! - anything else: passed through as plain TCP, or refused when registry-only.
//!
//! A workload reached over HBONE is dialled at `<pod ip>:15008` (its node's ztunnel captures
//! that) presenting the source workload's identity and requiring the destination's. A workload
//! on this node is served in-process by the inbound half; `tunnel_protocol: NONE` gets plain TCP.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use common::hbone::connect::Authority;
use common::hbone::pool::{PoolKey, PooledStream};
use common::identity::Identity;
use http::{HeaderMap, HeaderName, HeaderValue};
use rand::Rng;
use tokio::net::{TcpListener, TcpStream};

use super::inbound::deliver;
use super::metrics::{Peer, Record, Reporter};
use super::{Accepted, CONNECT_TIMEOUT, OutboundPolicy, Proxy, ProxyError, accept_loop, relay, relay_tunnel};
use common::state::workload::DEFAULT_HBONE_PORT;
use common::state::{Gateway, Snapshot, Target, Tunnel, Workload};

pub(super) async fn serve(proxy: Proxy, listener: TcpListener) {
    accept_loop(proxy, listener, "outbound", handle).await;
}

/// Where the bytes go once routed.
enum Upstream {
    /// Plain TCP; with the destination's own record when served in-process (same node).
    Tcp(TcpStream, Option<Box<Record>>),
    /// With how many of the client's bytes went along with the CONNECT.
    Hbone(PooledStream, u64),
}

/// Most of the client's first bytes sent along with a CONNECT.
const EARLY_DATA_MAX: usize = 4096;

async fn handle(proxy: Proxy, accepted: Accepted) {
    // The accepted connection is used where it is, never moved out (nor is the upstream
    // below): this future lives as long as the connection, and a value moved into a new
    // local would take its room twice.
    let (peer, dst) = match proxy.host_origin(accepted.peer, accepted.dst) {
        Ok(origin) => origin,
        Err(e) => {
            let rec = Record::new(proxy.metrics(), Reporter::Source, "outbound", accepted.peer, accepted.dst);
            rec.failed(e.failure());
            return;
        }
    };
    let downstream = &accepted.stream;
    // The connect phase in a block of its own: its locals (the record, the routing result)
    // end with it, so the connection's task, which lives as long as the connection, is sized
    // for the relay alone; the record goes on in the relay's list.
    let (mut upstream, mut records) = {
        let mut rec = Record::new(proxy.metrics(), Reporter::Source, "outbound", peer, dst);
        // Boxed: the connect phase's state (an HBONE dial, a TCP connect) is large and over
        // once the connection is up; on the heap, it is freed then.
        match Box::pin(route(&proxy, &mut rec, peer, dst, downstream)).await {
            Err(e) => return rec.failed(e.failure()),
            Ok(Upstream::Tcp(upstream, local)) => {
                rec.opened();
                let records: Vec<_> = std::iter::once(rec).chain(local.map(|r| *r)).collect();
                (Upstream::Tcp(upstream, None), records)
            }
            Ok(hbone) => {
                rec.opened();
                (hbone, vec![rec])
            }
        }
    };
    match upstream {
        Upstream::Tcp(tcp, _) => relay(&proxy, accepted.stream, tcp, records).await,
        Upstream::Hbone(ref mut tunnel, early) => {
            relay_tunnel(&proxy, &accepted.stream, tunnel.stream_mut(), true, early, &mut records).await
        }
    }
    drop(accepted.guard);
}

async fn route(
    proxy: &Proxy,
    rec: &mut Record,
    peer: SocketAddr,
    dst: SocketAddr,
    downstream: &TcpStream,
) -> Result<Upstream, ProxyError> {
    let snapshot = proxy.inner.state.snapshot();
    let src = snapshot
        .workload_by_ip(peer.ip())
        .filter(|w| proxy.is_local(w))
        .cloned()
        .ok_or(ProxyError::UnknownSource(peer.ip()))?;
    rec.src = Peer::of(&src);
    let client = Client { src: &src, peer, downstream };
    match snapshot.lookup_destination(dst) {
        Target::Unknown => {
            if proxy.config().outbound_policy == OutboundPolicy::RegistryOnly {
                proxy.metrics().passthrough("refused");
                return Err(ProxyError::RegistryOnly(dst));
            }
            proxy.metrics().passthrough("passthrough");
            rec.upstream = Some(dst);
            Ok(Upstream::Tcp(proxy.connect_direct(dst, Some(peer.ip())).await?, None))
        }
        Target::Service(svc) => {
            rec.service = Some(svc.clone());
            if let Some(gw) = &svc.waypoint {
                return via_waypoint(proxy, rec, &snapshot, &client, gw, dst).await;
            }
            if svc.load_balancing.as_ref().is_some_and(|lb| lb.mode == "PASSTHROUGH") {
                rec.upstream = Some(dst);
                return Ok(Upstream::Tcp(proxy.connect_direct(dst, Some(peer.ip())).await?, None));
            }
            let family = common::select::Family::of(dst.ip());
            let (endpoint, target) = snapshot.pick_endpoint(&svc, dst.port(), Some(&src), family)?;
            let sans = svc.subject_alt_names.iter().filter_map(|s| s.parse::<Identity>().ok()).collect();
            to_workload(proxy, rec, &client, &endpoint.workload, target, sans).await
        }
        Target::Workload(w) => {
            rec.service = snapshot.service_of(&w).cloned();
            if let Some(gw) = &w.waypoint {
                return via_waypoint(proxy, rec, &snapshot, &client, gw, dst).await;
            }
            to_workload(proxy, rec, &client, &w, dst, vec![]).await
        }
    }
}

/// The pod that dialled: its workload, its address, its connection.
struct Client<'a> {
    src: &'a Arc<Workload>,
    peer: SocketAddr,
    downstream: &'a TcpStream,
}

async fn to_workload(
    proxy: &Proxy,
    rec: &mut Record,
    client: &Client<'_>,
    dst: &Arc<Workload>,
    target: SocketAddr,
    sans: Vec<Identity>,
) -> Result<Upstream, ProxyError> {
    let Client { src, peer, .. } = *client;
    rec.dst = Peer::of(dst);
    match dst.tunnel {
        Tunnel::LegacyIstioMtls => Err(ProxyError::UnsupportedTunnel(dst.name.clone())),
        Tunnel::None => {
            rec.upstream = Some(target);
            Ok(Upstream::Tcp(proxy.connect_direct(target, Some(peer.ip())).await?, None))
        }
        Tunnel::Hbone if proxy.is_local(dst) => {
            // Same node: no tunnel; the destination half runs here with the source identity
            // we already know (the pod's, by its address on this node).
            rec.mtls = true;
            let mut inbound = Record::new(proxy.metrics(), Reporter::Destination, "inbound", peer, target);
            inbound.src = Peer::of(src);
            inbound.service = rec.service.clone();
            inbound.mtls = true;
            match deliver(proxy, &mut inbound, Some(&src.identity), peer.ip(), Some(peer.ip()), target).await
            {
                Ok(stream) => {
                    inbound.opened();
                    rec.upstream = Some(target);
                    Ok(Upstream::Tcp(stream, Some(Box::new(inbound))))
                }
                Err(e) => {
                    inbound.failed(e.failure());
                    Err(e)
                }
            }
        }
        Tunnel::Hbone => {
            let mut expected = vec![dst.identity.clone()];
            expected.extend(sans);
            let hbone = SocketAddr::new(target.ip(), DEFAULT_HBONE_PORT);
            rec.mtls = true;
            hbone_connect(proxy, rec, client, expected, hbone, target).await
        }
    }
}

async fn via_waypoint(
    proxy: &Proxy,
    rec: &mut Record,
    snapshot: &Snapshot,
    client: &Client<'_>,
    gateway: &Gateway,
    dst: SocketAddr,
) -> Result<Upstream, ProxyError> {
    let (addr, identity) = snapshot
        .resolve_gateway(gateway, Some(client.src))
        .ok_or_else(|| ProxyError::NoWaypoint(dst.to_string()))?;
    rec.dst =
        Peer { workload: snapshot.workload_by_ip(addr.ip()).cloned(), identity: Some(identity.clone()) };
    rec.mtls = true;
    hbone_connect(proxy, rec, client, vec![identity], addr, dst).await
}

/// Opens a CONNECT stream to `authority` through the peer proxy at `hbone`, as `src`, with
/// what the client has already sent right behind it (a round trip sooner than after the
/// response; the peer delivers it only if it accepts).
async fn hbone_connect(
    proxy: &Proxy,
    rec: &mut Record,
    client: &Client<'_>,
    expected: Vec<Identity>,
    hbone: SocketAddr,
    authority: SocketAddr,
) -> Result<Upstream, ProxyError> {
    let Client { src, peer, downstream } = *client;
    rec.upstream = Some(hbone);
    let key = PoolKey::new(src.identity.clone(), expected, None, hbone);
    let fail = |reason: String| ProxyError::Hbone { addr: hbone, reason };
    let authority = Authority::Addr(authority);
    let early = early_data(downstream).map_err(ProxyError::Downstream)?;
    let sent = early.len() as u64;
    let connect = proxy.inner.pool.connect_with(&key, &authority, connect_headers(src, peer), early);
    match tokio::time::timeout(CONNECT_TIMEOUT, connect).await {
        Ok(Ok(stream)) => Ok(Upstream::Hbone(stream, sent)),
        Ok(Err(e)) => Err(fail(e.to_string())),
        Err(_) => Err(fail("timed out".into())),
    }
}

/// What the client has already written, read without waiting (none if it has written
/// nothing yet, e.g. a protocol where the server speaks first). Read from the socket itself:
/// tokio does not know a just-accepted socket's readiness yet, and its `try_read` would not
/// even ask. An end of stream stays for the relay to find (a socket reports it again); an
/// error (a reset) is reported only once, so it fails the connection here.
fn early_data(downstream: &TcpStream) -> std::io::Result<Bytes> {
    thread_local! {
        /// Read into, then copied out: zeroing a fresh buffer for every connection cost more
        /// than the read.
        static BUF: std::cell::RefCell<Box<[u8; EARLY_DATA_MAX]>> =
            std::cell::RefCell::new(Box::new([0u8; EARLY_DATA_MAX]));
    }
    let socket = socket2::SockRef::from(downstream);
    BUF.with_borrow_mut(|buf| match std::io::Read::read(&mut &*socket, &mut buf[..]) {
        Ok(n) => Ok(Bytes::copy_from_slice(&buf[..n])),
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => Ok(Bytes::new()),
        Err(e) => Err(e),
    })
}

/// `baggage`, `forwarded` and `traceparent` as Istio's proxies send them.
/// (The baggage is made once per workload, when its resource arrives.)
fn connect_headers(src: &Workload, peer: SocketAddr) -> HeaderMap {
    const BAGGAGE: HeaderName = HeaderName::from_static("baggage");
    const TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");
    let mut h = HeaderMap::with_capacity(4);
    if let Some(baggage) = src.baggage() {
        h.insert(BAGGAGE, baggage.clone());
    }
    let mut forwarded = String::with_capacity(32);
    let _ = write!(forwarded, "for=\"{}\"", common::telemetry::LogAddr(&peer));
    if let Ok(v) = HeaderValue::try_from(forwarded) {
        h.insert(http::header::FORWARDED, v);
    }
    let mut rng = rand::rng();
    let mut traceparent = String::with_capacity(55);
    traceparent.push_str("00-");
    common::hex::push_hex(&mut traceparent, &rng.random::<u128>().to_be_bytes());
    traceparent.push('-');
    common::hex::push_hex(&mut traceparent, &rng.random::<u64>().to_be_bytes());
    traceparent.push_str("-01");
    if let Ok(v) = HeaderValue::try_from(traceparent) {
        h.insert(TRACEPARENT, v);
    }
    h
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    async fn pair() -> (std::net::TcpStream, TcpStream) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let client = std::net::TcpStream::connect(addr).expect("connect");
        let (server, _) = listener.accept().await.expect("accept");
        (client, server)
    }

    /// Waits until the accepted socket has something to report (data, an end or an error).
    async fn settled(s: &TcpStream) {
        tokio::time::timeout(std::time::Duration::from_secs(5), s.readable())
            .await
            .expect("readable")
            .expect("poll");
    }

    #[test]
    fn connect_headers_are_istios() {
        let w = proto::workload::Workload {
            uid: "u".into(),
            name: "client-7d9".into(),
            namespace: "demo".into(),
            workload_name: "client".into(),
            workload_type: proto::workload::WorkloadType::Deployment as i32,
            canonical_name: "client".into(),
            canonical_revision: "v1".into(),
            ..Default::default()
        };
        let w = Workload::from_proto(&w).expect("workload");
        let peer: SocketAddr = "10.0.0.7:41234".parse().expect("addr");
        let h = connect_headers(&w, peer);
        assert_eq!(
            h.get("baggage").and_then(|v| v.to_str().ok()),
            Some(
                "k8s.namespace.name=demo,k8s.deployment.name=client,service.name=client,service.version=v1,k8s.cluster.name=Kubernetes"
            )
        );
        assert_eq!(h.get("forwarded").and_then(|v| v.to_str().ok()), Some("for=\"10.0.0.7:41234\""));
        let tp = h.get("traceparent").and_then(|v| v.to_str().ok()).expect("traceparent").to_string();
        let parts: Vec<&str> = tp.split('-').collect();
        assert_eq!(parts.len(), 4, "{tp}");
        assert_eq!((parts[0], parts[1].len(), parts[2].len(), parts[3]), ("00", 32, 16, "01"), "{tp}");
        assert!(tp.bytes().all(|b| b == b'-' || b.is_ascii_hexdigit() && !b.is_ascii_uppercase()), "{tp}");
        let again = connect_headers(&w, peer);
        assert_ne!(again.get("traceparent"), h.get("traceparent"), "a new trace per connection");
    }

    #[tokio::test]
    async fn early_data_is_what_was_written_an_end_stays_and_a_reset_fails() {
        // Nothing written yet: nothing read, no waiting.
        let (mut client, server) = pair().await;
        assert_eq!(early_data(&server).expect("read"), Bytes::new());
        // Written: read, at most EARLY_DATA_MAX of it.
        std::io::Write::write_all(&mut client, &vec![7u8; EARLY_DATA_MAX + 10]).expect("write");
        settled(&server).await;
        let got = early_data(&server).expect("read");
        assert!(!got.is_empty() && got.len() <= EARLY_DATA_MAX, "{}", got.len());

        // An end of stream: nothing read, and it is still there for the relay to find.
        let (client, mut server) = pair().await;
        client.shutdown(std::net::Shutdown::Write).expect("shutdown");
        settled(&server).await;
        assert_eq!(early_data(&server).expect("read"), Bytes::new());
        let mut buf = [0u8; 8];
        assert_eq!(tokio::io::AsyncReadExt::read(&mut server, &mut buf).await.expect("read"), 0);
        let _ = server.shutdown().await;

        // A reset before the first read fails the connection as the client's doing.
        let (client, server) = pair().await;
        socket2::SockRef::from(&client).set_linger(Some(std::time::Duration::ZERO)).expect("linger");
        drop(client);
        settled(&server).await;
        let err = early_data(&server).expect_err("a reset");
        assert_eq!(err.kind(), std::io::ErrorKind::ConnectionReset);
    }
}
