//! Inbound HBONE presents the certificate of the workload a connection is for: the destination
//! address it arrived on picks the local workload, and so the identity proven to the client.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};

use common::hbone::server::{BoxFuture, ServerTls};
use common::identity::{CertificateManager, Identity, WorkloadCertificate};
use common::tls;

use common::state::State;

/// A server config and the certificate it was built from, per identity.
type Configs = HashMap<Identity, (Arc<WorkloadCertificate>, Arc<rustls::ServerConfig>)>;

/// Server configs per identity, rebuilt when the certificate rotates.
pub(super) struct WorkloadTls {
    state: State,
    node_name: String,
    /// Host mode: the host's own addresses (its workload may name no node).
    host_addresses: Vec<std::net::IpAddr>,
    certs: CertificateManager,
    cache: Arc<Mutex<Configs>>,
}

impl WorkloadTls {
    pub(super) fn new(
        state: State,
        node_name: String,
        host_addresses: Vec<std::net::IpAddr>,
        certs: CertificateManager,
    ) -> Self {
        Self { state, node_name, host_addresses, certs, cache: Arc::default() }
    }
}

impl ServerTls for WorkloadTls {
    fn config_for(&self, local_addr: SocketAddr) -> BoxFuture<Result<Arc<rustls::ServerConfig>, String>> {
        let snapshot = self.state.snapshot();
        let identity = snapshot
            .workload_by_ip(local_addr.ip())
            .filter(|w| w.node == self.node_name || self.host_addresses.contains(&local_addr.ip()))
            .map(|w| w.identity.clone());
        let (certs, cache) = (self.certs.clone(), self.cache.clone());
        Box::pin(async move {
            let identity =
                identity.ok_or_else(|| format!("{} is not a workload on this node", local_addr.ip()))?;
            let cert = certs.fetch(&identity).await.map_err(|e| e.to_string())?;
            if let Some((held, config)) = cache.lock().unwrap_or_else(PoisonError::into_inner).get(&identity)
                && Arc::ptr_eq(held, &cert)
            {
                return Ok(config.clone());
            }
            let config = Arc::new(tls::server_config(&cert).map_err(|e| e.to_string())?);
            cache.lock().unwrap_or_else(PoisonError::into_inner).insert(identity, (cert, config.clone()));
            Ok(config)
        })
    }
}
