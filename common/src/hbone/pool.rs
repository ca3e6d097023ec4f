//! HBONE connection pool: CONNECT streams multiplexed over shared mTLS HTTP/2 connections.
//!
//! Key = (source identity, expected destination identities, source IP, destination address).
//! A connection carries at most `max_streams` streams; when all are full another is dialled.
//! Only one dial per key runs at a time and callers of that key wait for it, but no lock is held
//! across the handshake, so other keys never wait. Connections idle longer than `idle_timeout`
//! are dropped; a connection that failed is evicted; when the source certificate rotates, new
//! streams go to new connections while streams on the old ones run to their end.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::HeaderMap;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::watch;
use tracing::{debug, info};

use super::HboneStream;
use super::client::{ClientError, Connection};
use super::connect::Authority;
use crate::identity::manager::ManagerError;
use crate::identity::{CertificateManager, Identity, WorkloadCertificate};
use crate::tls;

/// Streams per connection before another is opened (the server allows 200).
pub const DEFAULT_MAX_STREAMS: usize = 100;
/// Idle connections are released after this long.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(5 * 60);
/// A key's idle connections beyond the first are released after this long: a burst that
/// needed many connections does not keep their buffers (some 250 KiB each) for `idle_timeout`.
pub const DEFAULT_SURPLUS_IDLE_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest a new connection (TCP, mTLS, HTTP/2) or a stream's CONNECT may take.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    #[error("HBONE pool: {0}")]
    Certificate(#[from] ManagerError),
    #[error("HBONE pool: TLS config for {src}: {reason}")]
    Tls { src: Identity, reason: String },
    #[error("HBONE pool: {0}")]
    Client(#[from] ClientError),
    #[error("HBONE pool: dial to {addr} failed: {reason}")]
    Dial { addr: SocketAddr, reason: String },
    #[error("HBONE pool: {addr} not reached within {after:?}")]
    ConnectTimeout { addr: SocketAddr, after: Duration },
    #[error("HBONE pool closed")]
    Closed,
}

/// Which connections may carry a stream.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct PoolKey {
    /// Whose certificate we present.
    pub src: Identity,
    /// Identities the server may prove (sorted, deduplicated).
    pub dst: Vec<Identity>,
    /// Local address to dial from, if pinned.
    pub src_ip: Option<IpAddr>,
    /// The peer proxy (ztunnel or waypoint on 15008).
    pub dst_addr: SocketAddr,
}

impl PoolKey {
    pub fn new(src: Identity, mut dst: Vec<Identity>, src_ip: Option<IpAddr>, dst_addr: SocketAddr) -> Self {
        dst.sort();
        dst.dedup();
        Self { src, dst, src_ip, dst_addr }
    }
}

/// Pool tuning.
#[derive(Clone, Debug)]
pub struct PoolConfig {
    pub max_streams: usize,
    pub idle_timeout: Duration,
    /// For a key's idle connections other than the first (see [`DEFAULT_SURPLUS_IDLE_TIMEOUT`]).
    pub surplus_idle_timeout: Duration,
    /// Bounds each dial (TCP, mTLS, HTTP/2 handshake) and each stream's CONNECT.
    pub connect_timeout: Duration,
}

impl Default for PoolConfig {
    fn default() -> Self {
        Self {
            max_streams: DEFAULT_MAX_STREAMS,
            idle_timeout: DEFAULT_IDLE_TIMEOUT,
            surplus_idle_timeout: DEFAULT_SURPLUS_IDLE_TIMEOUT,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabels {
    reason: &'static str,
}

/// Pool metrics (`istio_hbone_pool_*`).
#[derive(Clone, Debug, Default)]
pub struct PoolMetrics {
    connections: Gauge,
    opened: Counter,
    closed: Family<ReasonLabels, Counter>,
    retried: Counter,
}

impl PoolMetrics {
    pub fn new(registry: &mut Registry) -> Self {
        let m = Self::default();
        let r = registry.sub_registry_with_prefix("hbone_pool");
        r.register("connections", "HBONE connections held in the pool", m.connections.clone());
        r.register("connections_opened", "HBONE connections dialled", m.opened.clone());
        r.register("connections_closed", "HBONE connections released, by reason", m.closed.clone());
        r.register(
            "streams_retried",
            "CONNECTs sent again on a new connection because theirs was going away (peer draining)",
            m.retried.clone(),
        );
        m
    }
}

/// One pooled connection.
struct Pooled {
    slot: Arc<Slot>,
    /// The source certificate it was built with.
    cert: Arc<WorkloadCertificate>,
}

/// A connection and its use, shared by the pool and the streams on it (one pointer per
/// stream: a stream's guard lives as long as the proxied connection it carries).
struct Slot {
    conn: Connection,
    /// Streams open on it now.
    active: AtomicUsize,
    /// When its last stream ended (or it was opened).
    idle_since: Mutex<Instant>,
}

#[derive(Default)]
struct KeyState {
    conns: Vec<Pooled>,
    /// Set while a dial for this key runs; its result is published when done.
    dialing: Option<watch::Receiver<Option<Result<(), String>>>>,
}

struct Inner {
    certs: CertificateManager,
    config: PoolConfig,
    metrics: PoolMetrics,
    keys: Mutex<HashMap<PoolKey, KeyState>>,
}

/// The pool. Cheap to clone; create it inside a tokio runtime (it runs an idle reaper).
#[derive(Clone)]
pub struct Pool {
    inner: Arc<Inner>,
}

/// What the caller should do after one look at the pool.
enum Step {
    Use(Arc<Slot>),
    Wait(watch::Receiver<Option<Result<(), String>>>),
    Dial(watch::Sender<Option<Result<(), String>>>),
}

impl Pool {
    pub fn new(certs: CertificateManager, config: PoolConfig, metrics: PoolMetrics) -> Self {
        let inner = Arc::new(Inner { certs, config, metrics, keys: Mutex::new(HashMap::new()) });
        tokio::spawn(reap(Arc::downgrade(&inner)));
        Self { inner }
    }

    /// Opens a CONNECT stream to `authority` through a connection for `key`.
    pub async fn connect(
        &self,
        key: &PoolKey,
        authority: &Authority,
        headers: HeaderMap,
    ) -> Result<PooledStream, PoolError> {
        self.connect_with(key, authority, headers, Bytes::new()).await
    }

    /// [`connect`](Self::connect), sending `early` behind the request (see
    /// [`Connection::open_with`]). A retry on a new connection sends it again only when the
    /// peer certainly dropped the first stream ([`ClientError::unprocessed`]).
    pub async fn connect_with(
        &self,
        key: &PoolKey,
        authority: &Authority,
        headers: HeaderMap,
        early: Bytes,
    ) -> Result<PooledStream, PoolError> {
        let cert = self.inner.certs.fetch(&key.src).await?;
        // A connection that is going away (its peer drains or restarts) gets one more try on a
        // new connection, so a ztunnel hand-over fails no stream.
        let mut retried = false;
        loop {
            match self.step(key, &cert)? {
                Step::Use(slot) => {
                    let guard = StreamGuard(slot);
                    let conn = &guard.0.conn;
                    let after = self.inner.config.connect_timeout;
                    let opened = tokio::time::timeout(
                        after,
                        conn.open_with(authority, headers.clone(), early.clone()),
                    )
                    .await
                    .map_err(|_| PoolError::ConnectTimeout { addr: key.dst_addr, after })?;
                    match opened {
                        Ok(stream) => return Ok(PooledStream { stream, _guard: guard }),
                        Err(e) => {
                            let going_away = e.retry_on_new_connection();
                            if going_away || !matches!(e, ClientError::Status { .. }) {
                                self.evict(key, conn, if going_away { "going_away" } else { "error" });
                            }
                            // With early data only a stream the peer certainly dropped is sent
                            // again: its bytes may already have reached the destination.
                            let may_resend = early.is_empty() || e.unprocessed();
                            if going_away && !retried && may_resend {
                                retried = true;
                                self.inner.metrics.retried.inc();
                                debug!(dst = %key.dst_addr, error = %e, "HBONE stream retried on a new connection");
                                continue;
                            }
                            return Err(e.into());
                        }
                    }
                }
                Step::Wait(mut rx) => {
                    let outcome = rx.wait_for(Option::is_some).await.map(|r| r.clone());
                    if let Ok(Some(Err(reason))) = outcome {
                        return Err(PoolError::Dial { addr: key.dst_addr, reason });
                    }
                    // Done (or the dialler gave up): look again.
                }
                Step::Dial(tx) => {
                    let pending = DialGuard { pool: self, key };
                    let result = self.dial(key, &cert).await;
                    drop(pending);
                    let published = result.as_ref().map(|_| ()).map_err(|e| e.to_string());
                    tx.send_replace(Some(published));
                    result?;
                }
            }
        }
    }

    /// Connections held now (all keys).
    pub fn connection_count(&self) -> usize {
        self.inner.keys.lock().map(|k| k.values().map(|s| s.conns.len()).sum()).unwrap_or(0)
    }

    /// One look at the pool under the lock: a connection with room, a dial to wait for, or
    /// our turn to dial.
    fn step(&self, key: &PoolKey, cert: &Arc<WorkloadCertificate>) -> Result<Step, PoolError> {
        let mut keys = self.inner.keys.lock().map_err(|_| PoolError::Closed)?;
        let state = keys.entry(key.clone()).or_default();
        let before = state.conns.len();
        // Closed connections and those built with a replaced certificate take no new streams;
        // their open streams keep them alive until they end.
        state.conns.retain(|p| p.slot.conn.is_open() && Arc::ptr_eq(&p.cert, cert));
        self.count_closed("stale", before - state.conns.len());
        let max = self.inner.config.max_streams;
        for p in &state.conns {
            let reserved = p
                .slot
                .active
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| (n < max).then_some(n + 1));
            if reserved.is_ok() {
                return Ok(Step::Use(p.slot.clone()));
            }
        }
        if let Some(rx) = &state.dialing
            && rx.has_changed().is_ok()
        {
            return Ok(Step::Wait(rx.clone()));
        }
        let (tx, rx) = watch::channel(None);
        state.dialing = Some(rx);
        Ok(Step::Dial(tx))
    }

    /// Dials a new connection for `key` (no lock held) and adds it to the pool.
    async fn dial(&self, key: &PoolKey, cert: &Arc<WorkloadCertificate>) -> Result<(), PoolError> {
        let config = tls::client_config(cert, key.dst.clone())
            .map_err(|e| PoolError::Tls { src: key.src.clone(), reason: e.to_string() })?;
        let after = self.inner.config.connect_timeout;
        let conn =
            tokio::time::timeout(after, Connection::connect_from(key.dst_addr, key.src_ip, Arc::new(config)))
                .await
                .map_err(|_| PoolError::ConnectTimeout { addr: key.dst_addr, after })??;
        info!(src = %key.src, dst = %key.dst_addr, "HBONE connection opened");
        self.inner.metrics.opened.inc();
        self.inner.metrics.connections.inc();
        let slot =
            Arc::new(Slot { conn, active: AtomicUsize::new(0), idle_since: Mutex::new(Instant::now()) });
        let pooled = Pooled { slot, cert: cert.clone() };
        let mut keys = self.inner.keys.lock().map_err(|_| PoolError::Closed)?;
        keys.entry(key.clone()).or_default().conns.push(pooled);
        Ok(())
    }

    fn evict(&self, key: &PoolKey, conn: &Connection, reason: &'static str) {
        let Ok(mut keys) = self.inner.keys.lock() else { return };
        if let Some(state) = keys.get_mut(key) {
            let before = state.conns.len();
            state.conns.retain(|p| !p.slot.conn.same_as(conn));
            let evicted = before - state.conns.len();
            if evicted > 0 {
                debug!(dst = %key.dst_addr, reason, "HBONE connection evicted");
            }
            self.count_closed(reason, evicted);
        }
    }

    fn count_closed(&self, reason: &'static str, n: usize) {
        if n > 0 {
            self.inner.metrics.closed.get_or_create(&ReasonLabels { reason }).inc_by(n as u64);
            self.inner.metrics.connections.dec_by(n as i64);
        }
    }
}

/// Clears a key's "dialing" mark when the dial ends, even if the caller is cancelled.
struct DialGuard<'a> {
    pool: &'a Pool,
    key: &'a PoolKey,
}

impl Drop for DialGuard<'_> {
    fn drop(&mut self) {
        if let Ok(mut keys) = self.pool.inner.keys.lock()
            && let Some(state) = keys.get_mut(self.key)
        {
            state.dialing = None;
        }
    }
}

/// Drops idle connections (a key's first after `idle_timeout`, the others after
/// `surplus_idle_timeout`) and empty keys, until the pool is dropped.
async fn reap(pool: Weak<Inner>) {
    let period = match pool.upgrade() {
        Some(inner) => {
            let shortest = inner.config.idle_timeout.min(inner.config.surplus_idle_timeout);
            (shortest / 2).max(Duration::from_millis(50))
        }
        None => return,
    };
    loop {
        tokio::time::sleep(period).await;
        let Some(inner) = pool.upgrade() else { return };
        let (idle_timeout, surplus_idle_timeout) =
            (inner.config.idle_timeout, inner.config.surplus_idle_timeout);
        let Ok(mut keys) = inner.keys.lock() else { return };
        let mut released = 0;
        keys.retain(|_, state| {
            let before = state.conns.len();
            let mut kept_idle = false;
            state.conns.retain(|p| {
                if p.slot.active.load(Ordering::Acquire) != 0 {
                    return true;
                }
                let idle_for = p.slot.idle_since.lock().map(|t| t.elapsed()).unwrap_or(Duration::MAX);
                let limit = if kept_idle { surplus_idle_timeout.min(idle_timeout) } else { idle_timeout };
                let keep = idle_for < limit;
                kept_idle |= keep;
                keep
            });
            released += before - state.conns.len();
            !state.conns.is_empty() || state.dialing.is_some()
        });
        drop(keys);
        if released > 0 {
            debug!(released, "idle HBONE connections released");
            inner.metrics.closed.get_or_create(&ReasonLabels { reason: "idle" }).inc_by(released as u64);
            inner.metrics.connections.dec_by(released as i64);
        }
    }
}

/// Releases a stream's place on its connection when the stream ends; keeps the connection
/// alive while the stream runs, even once evicted from the pool.
struct StreamGuard(Arc<Slot>);

impl Drop for StreamGuard {
    fn drop(&mut self) {
        if self.0.active.fetch_sub(1, Ordering::AcqRel) == 1
            && let Ok(mut t) = self.0.idle_since.lock()
        {
            *t = Instant::now();
        }
    }
}

/// A CONNECT stream from the pool; its slot is released when it is dropped.
pub struct PooledStream {
    stream: HboneStream,
    _guard: StreamGuard,
}

impl PooledStream {
    /// The stream itself (for [`crate::copy::copy_tcp_hbone`]).
    pub fn stream_mut(&mut self) -> &mut HboneStream {
        &mut self.stream
    }
}

impl AsyncRead for PooledStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for PooledStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
}
