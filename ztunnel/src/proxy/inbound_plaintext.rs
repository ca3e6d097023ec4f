//! Inbound plaintext (15006): traffic from outside the mesh to a pod on this node. There is no
//! identity to check, but the pod's policies still apply (a policy that requires a principal
//! or namespace refuses it).

use tokio::net::TcpListener;

use super::inbound::deliver;
use super::metrics::{Peer, Record, Reporter};
use super::{Accepted, Proxy, accept_loop, relay};

pub(super) async fn serve(proxy: Proxy, listener: TcpListener) {
    accept_loop(proxy, listener, "inbound_plaintext", handle).await;
}

async fn handle(proxy: Proxy, accepted: Accepted) {
    let Accepted { stream: downstream, peer, dst, guard } = accepted;
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
