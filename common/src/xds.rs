//! xDS: the delta-ADS client both binaries share, its local-file twin, and the typed handler
//! plumbing both feed.
//!
//! Flow: a [`client::XdsClient`] (or a [`local::LocalSource`]) receives raw resources per type
//! URL, decodes them into the prost type registered for that URL and hands them to the typed
//! [`handler::Handler`]. Resources that fail to decode or that the handler rejects are NACKed
//! (or, for the file source, logged and counted) and the previous good state stays in force.

pub mod client;
pub mod handler;
pub mod local;
pub mod metrics;
pub mod store;
pub mod validate;

pub use client::{NodeInfo, XdsClient, XdsConfig};
pub use handler::{Handler, Handlers, Rejection, XdsResource, XdsUpdate};
pub use local::{LocalConfig, LocalSource};
pub use metrics::XdsMetrics;
pub use store::ResourceStore;
