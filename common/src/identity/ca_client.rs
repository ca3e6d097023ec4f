//! Istio CA client: `istio.v1.auth.IstioCertificateService/CreateCertificate` on istiod's 15012.
//!
//! Generates a P-256 key and CSR per request, sends it with the bearer token (and, when ztunnel
//! asks on behalf of a workload, `ImpersonatedIdentity` in the request metadata), and checks
//! that the returned leaf proves the identity asked for.

use std::collections::BTreeMap;
use std::time::Duration;

use prost_types::value::Kind;
use proto::istio::v1::auth::IstioCertificateRequest;
use proto::istio::v1::auth::istio_certificate_service_client::IstioCertificateServiceClient;
use tonic::transport::Channel;

use super::Identity;
use super::cert::{CertError, WorkloadCertificate};
use super::local_ca::{CaError, new_csr};
use crate::grpc::{GrpcError, GrpcTarget};

/// Metadata key naming the workload a ztunnel asks for.
pub const IMPERSONATED_IDENTITY: &str = "ImpersonatedIdentity";
/// Longest a CreateCertificate call may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum CaClientError {
    #[error("Istio CA: {0}")]
    Target(#[from] GrpcError),
    #[error("Istio CA: cannot build CSR for {identity}: {source}")]
    Csr { identity: Identity, source: CaError },
    #[error("Istio CA {address} refused {identity}: {status}")]
    Status { address: String, identity: Identity, status: tonic::Status },
    #[error("Istio CA {address}: no answer for {identity} within {REQUEST_TIMEOUT:?}")]
    Timeout { address: String, identity: Identity },
    #[error("Istio CA reply for {identity}: {source}")]
    Reply { identity: Identity, source: CertError },
    #[error("Istio CA issued {got} when {asked} was asked for")]
    WrongIdentity { asked: Identity, got: Identity },
}

/// A client of istiod's certificate service.
#[derive(Clone, Debug)]
pub struct IstioCaClient {
    target: GrpcTarget,
    channel: Channel,
    lifetime: Duration,
    /// Ask on behalf of the workload (ztunnel) rather than as ourselves (waypoint).
    impersonate: bool,
}

impl IstioCaClient {
    /// A lazily connecting client; requested certificates are valid for `lifetime`.
    pub fn new(target: GrpcTarget, lifetime: Duration, impersonate: bool) -> Result<Self, CaClientError> {
        let channel = target.endpoint()?.connect_lazy();
        Ok(Self { target, channel, lifetime, impersonate })
    }

    /// Requests a certificate for `identity`.
    pub async fn fetch(&self, identity: &Identity) -> Result<WorkloadCertificate, CaClientError> {
        let (csr, key_pem) =
            new_csr(identity).map_err(|source| CaClientError::Csr { identity: identity.clone(), source })?;
        let metadata = self.impersonate.then(|| prost_types::Struct {
            fields: BTreeMap::from([(
                IMPERSONATED_IDENTITY.to_string(),
                prost_types::Value { kind: Some(Kind::StringValue(identity.to_string())) },
            )]),
        });
        let body =
            IstioCertificateRequest { csr, validity_duration: self.lifetime.as_secs() as i64, metadata };
        let mut request = tonic::Request::new(body);
        if let Some(token) = self.target.bearer()? {
            request.metadata_mut().insert("authorization", token);
        }
        let address = self.target.address.clone();
        let mut client = IstioCertificateServiceClient::new(self.channel.clone());
        let reply = tokio::time::timeout(REQUEST_TIMEOUT, client.create_certificate(request))
            .await
            .map_err(|_| CaClientError::Timeout { address: address.clone(), identity: identity.clone() })?
            .map_err(|status| CaClientError::Status { address, identity: identity.clone(), status })?
            .into_inner();
        let cert = WorkloadCertificate::from_pem_chain(&reply.cert_chain, &key_pem)
            .map_err(|source| CaClientError::Reply { identity: identity.clone(), source })?;
        if &cert.identity != identity {
            return Err(CaClientError::WrongIdentity { asked: identity.clone(), got: cert.identity });
        }
        Ok(cert)
    }
}
