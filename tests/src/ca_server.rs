//! An in-test Istio CA: `istio.v1.auth.IstioCertificateService/CreateCertificate` over real
//! gRPC, signing CSRs with a [`LocalCa`]. It checks the bearer token, grants the identity named
//! by `ImpersonatedIdentity` (or a fixed default), and can be told to fail or mis-issue.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use common::identity::ca_client::IMPERSONATED_IDENTITY;
use common::identity::{Identity, LocalCa};
use prost_types::value::Kind;
use proto::istio::v1::auth::istio_certificate_service_server::{
    IstioCertificateService, IstioCertificateServiceServer,
};
use proto::istio::v1::auth::{IstioCertificateRequest, IstioCertificateResponse};
use tokio_stream::wrappers::TcpListenerStream;
use tonic::{Request, Response, Status};

/// What the CA does; adjustable while it runs.
#[derive(Debug)]
pub struct CaBehaviour {
    pub ca: LocalCa,
    /// Identity granted when the request names none.
    pub default_identity: Option<Identity>,
    /// Answer UNAVAILABLE to this many requests first.
    pub fail_first: AtomicUsize,
    /// Issue certificates for this identity whatever was asked (a broken CA).
    pub mis_issue: Mutex<Option<Identity>>,
    /// Requests received (valid or not).
    pub requests: AtomicUsize,
    /// Identities requested by impersonation, in order.
    pub impersonated: Mutex<Vec<String>>,
}

impl CaBehaviour {
    pub fn new(ca: LocalCa) -> Arc<Self> {
        Arc::new(Self {
            ca,
            default_identity: None,
            fail_first: AtomicUsize::new(0),
            mis_issue: Mutex::new(None),
            requests: AtomicUsize::new(0),
            impersonated: Mutex::new(Vec::new()),
        })
    }
}

struct CaService(Arc<CaBehaviour>);

#[tonic::async_trait]
impl IstioCertificateService for CaService {
    async fn create_certificate(
        &self,
        request: Request<IstioCertificateRequest>,
    ) -> Result<Response<IstioCertificateResponse>, Status> {
        let b = &self.0;
        b.requests.fetch_add(1, Ordering::SeqCst);
        if b.fail_first.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1)).is_ok() {
            return Err(Status::unavailable("CA warming up"));
        }
        let req = request.into_inner();
        let asked = req.metadata.as_ref().and_then(|m| m.fields.get(IMPERSONATED_IDENTITY)).and_then(|v| {
            match &v.kind {
                Some(Kind::StringValue(s)) => Some(s.clone()),
                _ => None,
            }
        });
        let identity = match &asked {
            Some(s) => {
                b.impersonated.lock().expect("lock").push(s.clone());
                s.parse::<Identity>().map_err(|e| Status::invalid_argument(e.to_string()))?
            }
            None => b.default_identity.clone().ok_or_else(|| Status::permission_denied("no identity"))?,
        };
        let granted = b.mis_issue.lock().expect("lock").clone().unwrap_or(identity);
        let lifetime = Duration::from_secs(req.validity_duration.max(1) as u64);
        let cert_chain =
            b.ca.sign_csr(&req.csr, &granted, lifetime)
                .map_err(|e| Status::invalid_argument(e.to_string()))?;
        Ok(Response::new(IstioCertificateResponse { cert_chain }))
    }
}

/// Serves the CA on `addr` (port 0 picks one) with `token` required; returns the bound address.
pub async fn start(
    addr: SocketAddr,
    behaviour: Arc<CaBehaviour>,
    token: Option<String>,
) -> std::io::Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let addr = listener.local_addr()?;
    let service = tonic::service::interceptor::InterceptedService::new(
        IstioCertificateServiceServer::new(CaService(behaviour)),
        crate::require_bearer(token),
    );
    tokio::spawn(async move {
        let _ = tonic::transport::Server::builder()
            .add_service(service)
            .serve_with_incoming(TcpListenerStream::new(listener))
            .await;
    });
    Ok(addr)
}
