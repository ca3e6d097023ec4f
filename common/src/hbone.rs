//! HBONE: HTTP/2 `CONNECT` streams inside mutual TLS (shared/spec/hbone.md).
//!
//! `connect` validates a CONNECT request, `server` terminates HBONE and hands each accepted
//! stream to the caller, `client` opens streams over one mTLS HTTP/2 connection, `pool` shares such
//! connections between callers.

pub mod client;
pub mod connect;
pub mod pool;
pub mod server;
pub mod stream;

pub use connect::{forwarded_for, proven_client};
pub use stream::HboneStream;

use std::time::Duration;

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
/// Data h2 holds per stream beyond its window before a write waits (1 MiB).
pub const MAX_SEND_BUFFER: usize = 1024 * 1024;
/// Largest header block accepted from a peer (a CONNECT carries a handful of headers).
pub const MAX_HEADER_LIST_SIZE: u32 = 16 * 1024;

/// Pings the peer every [`KEEPALIVE_INTERVAL`]; returns why once a ping goes unanswered for
/// [`KEEPALIVE_TIMEOUT`] or cannot be sent. The connection must be polled meanwhile.
pub(crate) async fn keepalive(mut pings: h2::PingPong) -> String {
    loop {
        tokio::time::sleep(KEEPALIVE_INTERVAL).await;
        match tokio::time::timeout(KEEPALIVE_TIMEOUT, pings.ping(h2::Ping::opaque())).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => return format!("keepalive ping failed: {e}"),
            Err(_) => return format!("no answer to a keepalive ping within {KEEPALIVE_TIMEOUT:?}"),
        }
    }
}
