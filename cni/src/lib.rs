//! ambient-cni: a chained CNI plugin (spec 1.0) that hands each new pod to the node's ztunnel
//! before the pod's containers start, so that capture is in place from its first packet.
//!
//! `conf` reads the runtime's inputs, `result` the previous plugins' result (`peer` asks the
//! kernel for the host side of the pod's veth when the result does not say), `protocol` is the
//! exchange with ztunnel (its server uses the same types), `plugin` runs the CNI commands,
//! `error` is the CNI error result, `install` puts the plugin on a node, and `cli` is the
//! process around them.

pub mod cli;
pub mod conf;
pub mod error;
pub mod install;
pub mod peer;
pub mod plugin;
pub mod protocol;
pub mod result;
