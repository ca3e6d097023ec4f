//! Inbound HBONE (15008): terminate mTLS with the destination workload's identity, check the
//! CONNECT's authority is a workload on this node, authorize the peer's identity, connect to
//! the pod from the original client's address, and answer 200 only once that connection is
//! up. Refusals answer 400 (malformed, address mismatch), 401 (policy) or 503 (no such local
//! workload, own port, pod unreachable, draining).

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use common::hbone::connect::Authority;
use common::hbone::server::{self, BoxFuture, ConnectHandler, ConnectRequest, Decision};
use common::identity::Identity;
use http::StatusCode;
use tokio::net::{TcpListener, TcpStream};
use tracing::info;

use super::metrics::{Peer, Record, Reporter};
use super::server_tls::WorkloadTls;
use super::{OWN_PORTS, Proxy, ProxyError, relay_tunnel};
use common::rbac;

pub(super) async fn serve(proxy: Proxy, listener: TcpListener) {
    let c = proxy.config();
    let tls = Arc::new(WorkloadTls::new(
        proxy.inner.state.clone(),
        c.node_name.clone(),
        c.host_addresses.clone(),
        proxy.inner.certs.clone(),
    ));
    let handler = Arc::new(Inbound(proxy.clone()));
    let trust_domain = c.trust_domain.clone();
    if !proxy.wait_synced("inbound").await {
        return;
    }
    // On drain: the listener closes (a successor on the same port takes over) and peers get
    // GOAWAY on their connections.
    let drain = Some(proxy.drain().clone());
    let failures = proxy.metrics().inbound_failures.clone();
    server::serve_draining(listener, tls, trust_domain, handler, failures, drain).await;
    info!(listener = "inbound", "draining: no longer accepting");
}

struct Inbound(Proxy);

impl ConnectHandler for Inbound {
    fn handle(&self, req: ConnectRequest) -> BoxFuture<Decision> {
        Box::pin(accept(self.0.clone(), req))
    }
}

fn status_of(e: &ProxyError) -> StatusCode {
    match e {
        ProxyError::Denied(_) => StatusCode::UNAUTHORIZED,
        ProxyError::AddressMismatch { .. } => StatusCode::BAD_REQUEST,
        _ => StatusCode::SERVICE_UNAVAILABLE,
    }
}

async fn accept(proxy: Proxy, req: ConnectRequest) -> Decision {
    let dst = match req.authority {
        Authority::Addr(a) => a,
        other => {
            return Decision::Refuse(StatusCode::BAD_REQUEST, format!("authority {other} is not ip:port"));
        }
    };
    // The client's address as its ztunnel saw it, believed only when the peer proves the
    // identity of the workload at that address.
    let snapshot = proxy.inner.state.snapshot();
    let proven = common::hbone::proven_client(&req.headers, &req.peer, &snapshot);
    let forwarded = proven.map(|(a, _)| a);
    let src_addr = forwarded.unwrap_or(req.peer_addr);
    let mut rec = Record::new(proxy.metrics(), Reporter::Destination, "inbound", src_addr, dst);
    rec.src = Peer { workload: proven.map(|(_, w)| w.clone()), identity: Some(req.peer.clone()) };
    rec.mtls = true;
    let outcome = match proxy.drain().guard() {
        None => Err(ProxyError::Draining),
        Some(_) if dst.ip() != req.local_addr.ip() => {
            Err(ProxyError::AddressMismatch { authority: dst, local: req.local_addr.ip() })
        }
        Some(guard) => {
            let preserve = forwarded.map(|a| a.ip());
            deliver(&proxy, &mut rec, Some(&req.peer), src_addr.ip(), preserve, dst).await.map(|s| (s, guard))
        }
    };
    match outcome {
        Err(e) => {
            let status = status_of(&e);
            let reason = e.to_string();
            rec.failed(e.failure());
            Decision::Refuse(status, reason)
        }
        Ok((upstream, guard)) => {
            rec.opened();
            // The record goes in boxed (a list), not inline in the tunnel's future.
            let mut records = vec![rec];
            Decision::Accept(Box::new(move |mut stream| {
                Box::pin(async move {
                    relay_tunnel(&proxy, &upstream, &mut stream, false, 0, &mut records).await;
                    drop(guard);
                })
            }))
        }
    }
}

/// The destination half, shared by inbound HBONE and same-node outbound: `dst` must be a
/// workload on this node and not one of our ports, and its policies must allow the source;
/// then the pod is dialled (from `preserve` when given).
pub(super) async fn deliver(
    proxy: &Proxy,
    rec: &mut Record,
    source: Option<&Identity>,
    source_ip: IpAddr,
    preserve: Option<IpAddr>,
    dst: SocketAddr,
) -> Result<TcpStream, ProxyError> {
    let snapshot = proxy.inner.state.snapshot();
    let w = snapshot
        .workload_by_ip(dst.ip())
        .filter(|w| proxy.is_local(w))
        .ok_or(ProxyError::NotLocal(dst.ip()))?
        .clone();
    rec.dst = Peer::of(&w);
    if rec.service.is_none() {
        rec.service = snapshot.service_of(&w).cloned();
    }
    if OWN_PORTS.contains(&dst.port()) {
        return Err(ProxyError::SelfCall(dst.port()));
    }
    let conn = rbac::Connection {
        source,
        source_ip,
        destination_ip: dst.ip(),
        destination_port: dst.port(),
        http: None,
    };
    proxy.authorize(&snapshot, rec.direction(), &w, &conn)?;
    rec.upstream = Some(dst);
    proxy.connect_direct(dst, preserve).await
}
