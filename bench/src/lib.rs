//! What the benchmark binaries share: the figures `state-bench` prints and the runner reports.

pub mod push;
