//! Workload identity: SPIFFE IDs and the certificates that prove them and
//! where they come from (local CA, Istio CA, files), kept fresh by the manager.

pub mod ca_client;
pub mod cert;
pub mod files;
pub mod local_ca;
pub mod manager;
mod spiffe;

pub use cert::{CertError, WorkloadCertificate};
pub use local_ca::LocalCa;
pub use manager::{CaConfig, CaSource, CertMetrics, CertificateManager};
pub use spiffe::{DEFAULT_TRUST_DOMAIN, Identity, IdentityError};
