//! Workload identity: SPIFFE IDs and (with the CA work) the certificates that prove them.

pub mod cert;
pub mod local_ca;
mod spiffe;

pub use cert::{CertError, WorkloadCertificate};
pub use local_ca::LocalCa;
pub use spiffe::{DEFAULT_TRUST_DOMAIN, Identity, IdentityError};
