//! Integration-test support: the in-repo delta-ADS control plane (also run by the local demo)
//! and helpers for whole-app tests.

pub mod ca_server;
pub mod echo;
pub mod http;
pub mod kube_api;
pub mod netns;
pub mod node;
pub mod xds_server;

use std::sync::Arc;

use common::xds::{Handlers, ResourceStore, validate};
use proto::security::Authorization;
use proto::workload::Address;

/// A gRPC interceptor requiring `authorization: Bearer <token>` when `token` is set.
pub fn require_bearer(
    token: Option<String>,
) -> impl Fn(tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> + Clone {
    let expected = token.map(|t| format!("Bearer {t}"));
    move |req| {
        let Some(expected) = &expected else { return Ok(req) };
        let given = req.metadata().get("authorization").and_then(|v| v.to_str().ok());
        if given == Some(expected.as_str()) {
            Ok(req)
        } else {
            tracing::warn!("gRPC request refused: missing or wrong bearer token");
            Err(tonic::Status::unauthenticated("missing or wrong bearer token"))
        }
    }
}

/// How long a test waits for state to converge before failing.
pub const CONVERGE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(20);

/// Waits until `pred` holds for `store` (re-checked on every change), failing the test with
/// `what` after [`CONVERGE_TIMEOUT`].
pub async fn until<T: Clone + Send + Sync + 'static>(
    store: &ResourceStore<T>,
    what: &str,
    pred: impl Fn(&ResourceStore<T>) -> bool,
) {
    if tokio::time::timeout(CONVERGE_TIMEOUT, store.wait_for(pred)).await.is_err() {
        panic!("timed out waiting for: {what}");
    }
}

/// The two stores a ztunnel-like consumer holds, and the handlers that feed them.
pub struct Stores {
    pub addresses: Arc<ResourceStore<Address>>,
    pub policies: Arc<ResourceStore<Authorization>>,
    pub handlers: Handlers,
}

impl Stores {
    /// Address and Authorization stores validating on receipt, registered for their type URLs.
    pub fn new() -> Self {
        let addresses = ResourceStore::<Address>::new(validate::address);
        let policies = ResourceStore::<Authorization>::new(validate::authorization);
        let mut handlers = Handlers::new();
        handlers.add::<Address, _>(proto::ADDRESS_TYPE_URL, addresses.clone());
        handlers.add::<Authorization, _>(proto::AUTHORIZATION_TYPE_URL, policies.clone());
        Self { addresses, policies, handlers }
    }
}

impl Default for Stores {
    fn default() -> Self {
        Self::new()
    }
}

/// A TLS 1.3 client config offering ALPN `h2` that verifies the server as `server` (SPIFFE, by
/// `ca`'s roots) and presents no certificate of its own: what a peer outside the mesh sends
/// to an mTLS port.
pub fn client_without_certificate(
    ca: &common::identity::LocalCa,
    server: common::identity::Identity,
) -> rustls::ClientConfig {
    let mut roots = rustls::RootCertStore::empty();
    roots.add_parsable_certificates(ca.roots().expect("the CA's roots"));
    let verifier = common::tls::SpiffeServerVerifier::new(roots, vec![server], common::tls::provider());
    let mut config = rustls::ClientConfig::builder_with_provider(common::tls::provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("TLS 1.3")
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_no_client_auth();
    config.alpn_protocols = vec![b"h2".to_vec()];
    config
}
