//! The control-plane figures: what one xDS push costs the mesh state (`state-bench`).

use serde::{Deserialize, Serialize};

/// One kind of push at one mesh size.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Push {
    pub kind: String,
    /// Median wall time.
    pub median_us: f64,
    /// Allocation requests per push (mean). Nearly the same run to run (random hash seeds
    /// shape the maps a little differently), unlike the time: the companion figure that
    /// shows a regression.
    pub allocations: u64,
    pub alloc_bytes: u64,
}

/// The pushes measured in a mesh of `workloads`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Size {
    pub workloads: usize,
    pub services: usize,
    pub policies: usize,
    /// Loading the whole mesh in one push.
    pub load_ms: f64,
    pub load_allocations: u64,
    pub pushes: Vec<Push>,
}
