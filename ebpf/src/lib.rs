//! Traffic redirection for enrolled pods without iptables: a tc program in C (`bpf/redirect.c`,
//! compiled by clang in the build script and embedded here) hands an enrolled pod's TCP flows
//! to ztunnel's transparent listeners with `bpf_sk_assign`, and policy routing delivers them
//! locally. [`Redirector`] loads it once and enrolls/unenrolls pods by IP and interface.
//!
//! Failure policy: a new connection that should be captured but finds no ztunnel listener is
//! dropped (fail closed); an enrolled pod never bypasses ztunnel in plaintext.

pub mod redirector;
pub mod routing;

pub use redirector::{RedirectError, Redirector, Settings, Status};
pub use routing::interface_for;
