//! HBONE: HTTP/2 `CONNECT` streams inside mutual TLS (shared/spec/hbone.md).
//!
//! `connect` validates a CONNECT request, `server` terminates HBONE and hands each accepted
//! stream to the caller, `client` opens streams over one mTLS HTTP/2 connection, `pool` shares such
//! connections between callers.

pub mod client;
pub mod connect;
pub mod pool;
pub mod server;

pub use connect::{forwarded_for, proven_client};

use std::time::Duration;

use hyper::upgrade::Upgraded;
use hyper_util::rt::TokioIo;

/// An established tunnel: a bidirectional byte stream.
pub type HboneStream = TokioIo<Upgraded>;

/// HTTP/2 stream window (4 MiB).
pub const STREAM_WINDOW: u32 = 4 * 1024 * 1024;
/// HTTP/2 connection window (16 MiB; must exceed the stream window).
pub const CONNECTION_WINDOW: u32 = 16 * 1024 * 1024;
/// HTTP/2 max frame size (1 MiB).
pub const MAX_FRAME_SIZE: u32 = 1024 * 1024;
/// Streams a server allows per connection.
pub const MAX_CONCURRENT_STREAMS: u32 = 200;
/// Keepalive PING interval and the time to wait for its answer.
pub const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);
pub const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(20);
/// Longest a TLS handshake may take before the connection is dropped.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest a peer may wait after the TLS handshake before its first CONNECT (the HTTP/2
/// preface and SETTINGS come first); a silent connection is dropped.
pub const FIRST_REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
