//! xDS: the delta-ADS client both binaries share, its local-file twin, and the typed handler
//! plumbing both feed.
//!
//! Flow: a [`client::XdsClient`] (or a [`local::LocalSource`]) receives raw resources per type
//! URL, decodes them into the prost type registered for that URL and hands them to the typed
//! [`handler::Handler`]. Resources that fail to decode or that the handler rejects are NACKed
//! (or, for the file source, logged and counted) and the previous good state stays in force.

pub mod args;
pub mod client;
pub mod delta;
pub mod handler;
pub mod local;
pub mod metrics;
pub mod store;
pub mod validate;

pub use args::{ControlPlaneArgs, SourceError};
pub use client::{NodeInfo, XdsClient, XdsConfig};
pub use handler::{Handler, Handlers, Rejection, XdsResource, XdsUpdate};
pub use local::{ConfigObjects, LocalConfig, LocalSource};
pub use metrics::XdsMetrics;
pub use store::ResourceStore;

/// Where a proxy gets its configuration: a control plane over delta ADS, or a local file.
#[derive(Clone, Debug)]
pub enum Source {
    Xds(Box<XdsConfig>),
    File(std::path::PathBuf),
}

impl Source {
    /// Starts feeding `handlers` from this source on a background task. Readiness is blocked
    /// until the first sync (every type once for xDS, the first good load for a file).
    pub fn spawn(
        self,
        handlers: Handlers,
        ready: &crate::readiness::Ready,
        metrics: XdsMetrics,
    ) -> tokio::task::JoinHandle<()> {
        self.spawn_reporting(handlers, ready, metrics, ConfigObjects::default())
    }

    /// Attaches our certificate source, for an xDS server reached over mesh mTLS (see
    /// [`crate::grpc::MeshTls`]); a no-op for a file or a server verified otherwise.
    pub fn with_mesh_tls(
        self,
        certs: crate::identity::CertificateManager,
        own: crate::identity::Identity,
    ) -> Self {
        match self {
            Source::Xds(mut config) => {
                config.target = config.target.with_mesh_tls(certs, own);
                Source::Xds(config)
            }
            file => file,
        }
    }

    /// As [`Source::spawn`]; a file source also reports its objects' statuses into `objects`.
    pub fn spawn_reporting(
        self,
        handlers: Handlers,
        ready: &crate::readiness::Ready,
        metrics: XdsMetrics,
        objects: ConfigObjects,
    ) -> tokio::task::JoinHandle<()> {
        match self {
            Source::Xds(config) => tokio::spawn(XdsClient::new(*config, handlers, ready, metrics).run()),
            Source::File(path) => {
                tokio::spawn(LocalSource::new(path, handlers, ready, metrics).with_objects(objects).run())
            }
        }
    }
}
