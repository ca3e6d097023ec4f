//! Traffic redirection for enrolled pods without iptables: a tc program in C (`bpf/redirect.c`,
//! compiled by clang in the build script and embedded here) hands an enrolled pod's TCP flows
//! (IPv4 and IPv6) to ztunnel's transparent listeners with `bpf_sk_assign`, and policy routing
//! delivers them locally. [`Redirector`] loads it once and enrolls/unenrolls pods by address and
//! interface.
//!
//! Failure policy: capture is pinned and outlives ztunnel. A packet of an enrolled pod that
//! should reach ztunnel but finds no ztunnel socket (ztunnel stopped, crashed, or not yet
//! listening), or that the program cannot classify (malformed headers, fragments, unknown IPv6
//! extension headers), is dropped and counted: an enrolled pod never bypasses ztunnel in
//! plaintext. [`pin::uninstall`] is the one way to remove capture from a node.

pub mod host;
pub mod pin;
pub mod redirector;
pub mod routing;

pub use host::{HostCapture, HostSettings};
pub use pin::{Removed, uninstall};
pub use redirector::{Listener, ListenerRole, RedirectError, Redirector, Settings, Status};
pub use routing::interface_for;
