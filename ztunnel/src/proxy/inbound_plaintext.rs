//! Inbound plaintext (15006): traffic from outside the mesh to a pod on this node. There is no
//! identity to check, but the pod's policies still apply (a policy that requires a principal
//! or namespace refuses it).

use std::net::SocketAddr;

use common::drain::Guard;
use tokio::net::{TcpListener, TcpStream};
use tracing::warn;

use super::inbound::deliver;
use super::metrics::{Peer, Record, Reporter};
use super::{Proxy, accept_loop, relay};
use crate::socket;

pub(super) async fn serve(proxy: Proxy, listener: TcpListener) {
    accept_loop(proxy, listener, "inbound_plaintext", handle).await;
}

async fn handle(proxy: Proxy, downstream: TcpStream, peer: SocketAddr, guard: Guard) {
    let dst = match socket::original_dst(&downstream) {
        Ok(d) => d.0,
        Err(e) => {
            warn!(%peer, error = %e, "no original destination; closing");
            return;
        }
    };
    let mut rec = Record::new(proxy.metrics(), Reporter::Destination, "inbound_plaintext", peer, dst);
    rec.src =
        Peer { workload: proxy.inner.state.snapshot().workload_by_ip(peer.ip()).cloned(), identity: None };
    match deliver(&proxy, &mut rec, None, peer.ip(), Some(peer.ip()), dst).await {
        Err(e) => rec.failed(e.failure()),
        Ok(upstream) => {
            rec.opened();
            relay(&proxy, downstream, upstream, vec![rec]).await;
        }
    }
    drop(guard);
}
