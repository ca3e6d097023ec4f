//! Watch streams: newline-delimited JSON events, replayed from the store's history after a
//! resourceVersion (or the current state as synthetic `ADDED` events), filtered by namespace and
//! selectors (an object that stops matching is sent as `DELETED`, one that starts as `ADDED`),
//! with periodic bookmarks. A stream ends on its timeout, on `drop_watches`, on shutdown, when the
//! client goes, or with an `ERROR` (410 Expired) when it falls behind the retained history.

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::Frame;
use serde_json::{Value, json};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::ReceiverStream;

use super::Shared;
use super::error::ApiError;
use super::registry::ResourceType;
use super::selector::Filter;
use super::server::Body;
use super::store::{Event, EventType, Expired};

/// Frames buffered per stream before the producer waits for the client.
const STREAM_BUFFER: usize = 64;

/// Where a watch starts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Start {
    /// Synthetic `ADDED` events for the current state, then changes; with `end_bookmark`, a
    /// bookmark annotated `k8s.io/initial-events-end` after them (`sendInitialEvents=true`).
    Now { end_bookmark: bool },
    /// Every change after this resourceVersion.
    After(u64),
}

/// A parsed watch request.
#[derive(Clone, Debug)]
pub(crate) struct WatchRequest {
    pub res: ResourceType,
    /// `None` watches every namespace (or a cluster-scoped kind).
    pub namespace: Option<String>,
    pub filter: Filter,
    pub start: Start,
    /// `allowWatchBookmarks=true`.
    pub bookmarks: bool,
    /// `timeoutSeconds`.
    pub timeout: Option<Duration>,
}

/// Counts a stream in `open_watches` while it lives.
struct OpenWatch(Arc<Shared>);

impl OpenWatch {
    fn new(shared: Arc<Shared>) -> Self {
        shared.open_watches.fetch_add(1, Ordering::SeqCst);
        shared.notify();
        Self(shared)
    }
}

impl Drop for OpenWatch {
    fn drop(&mut self) {
        self.0.open_watches.fetch_sub(1, Ordering::SeqCst);
        self.0.notify();
    }
}

/// Starts a watch and returns the response body that streams it.
pub(crate) fn start(shared: &Arc<Shared>, request: WatchRequest) -> Body {
    let changes = shared.changes.subscribe();
    let drops = shared.drops.subscribe();
    let shutdown = shared.shutdown.subscribe();
    let mut stream =
        Stream { shared: shared.clone(), request, cursor: 0, changes, drops, shutdown, tx: None };
    let initial = match stream.initial() {
        Ok(frames) => frames,
        Err(expired) => return Full::new(stream.expired_frame(&expired)).boxed(),
    };
    let (tx, rx) = mpsc::channel(STREAM_BUFFER);
    stream.tx = Some(tx);
    let open = OpenWatch::new(shared.clone());
    tokio::spawn(async move {
        let _open = open;
        stream.run(initial).await;
    });
    StreamBody::new(ReceiverStream::new(rx).map(|b| Ok::<_, Infallible>(Frame::data(b)))).boxed()
}

struct Stream {
    shared: Arc<Shared>,
    request: WatchRequest,
    /// Every event up to this resourceVersion has been considered.
    cursor: u64,
    changes: watch::Receiver<u64>,
    drops: watch::Receiver<u64>,
    shutdown: watch::Receiver<bool>,
    tx: Option<mpsc::Sender<Bytes>>,
}

impl Stream {
    /// The frames to send first, and the cursor to continue from.
    fn initial(&mut self) -> Result<Vec<Bytes>, Expired> {
        let state = self.shared.lock();
        let store = &state.store;
        match self.request.start {
            Start::Now { end_bookmark } => {
                let namespace = self.request.namespace.as_deref();
                let objects = store.list(&self.request.res, namespace, &self.request.filter);
                self.cursor = store.resource_version();
                drop(state);
                let mut frames: Vec<Bytes> = objects.iter().map(|o| frame("ADDED", o)).collect();
                if end_bookmark {
                    frames.push(self.bookmark_frame(true));
                }
                Ok(frames)
            }
            Start::After(rv) => {
                store.can_replay_from(rv)?;
                self.cursor = rv;
                Ok(Vec::new())
            }
        }
    }

    async fn run(mut self, initial: Vec<Bytes>) {
        for frame in initial {
            if !self.send(frame).await {
                return;
            }
        }
        let deadline = self.request.timeout.and_then(|t| Instant::now().checked_add(t));
        let period = self.shared.options.bookmark_interval.max(Duration::from_millis(10));
        let mut bookmarks = tokio::time::interval_at(Instant::now() + period, period);
        bookmarks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let bookmark = tokio::select! {
                changed = self.changes.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    false
                }
                _ = bookmarks.tick(), if self.request.bookmarks => true,
                _ = sleep_until(deadline) => return,
                _ = self.drops.changed() => return,
                _ = self.shutdown.changed() => return,
            };
            let frames = match self.drain() {
                Ok(frames) => frames,
                Err(expired) => {
                    let frame = self.expired_frame(&expired);
                    self.send(frame).await;
                    return;
                }
            };
            for frame in frames {
                if !self.send(frame).await {
                    return;
                }
            }
            if bookmark && !self.send(self.bookmark_frame(false)).await {
                return;
            }
        }
    }

    /// Sends one frame; false when the stream should end (client gone, dropped, shut down).
    async fn send(&mut self, frame: Bytes) -> bool {
        let Some(tx) = &self.tx else { return false };
        tokio::select! {
            sent = tx.send(frame) => sent.is_ok(),
            _ = self.drops.changed() => false,
            _ = self.shutdown.changed() => false,
        }
    }

    /// The frames for the events since the cursor, moving the cursor to the newest version.
    fn drain(&mut self) -> Result<Vec<Bytes>, Expired> {
        let (events, newest) = {
            let state = self.shared.lock();
            (state.store.events_after(self.cursor)?, state.store.resource_version())
        };
        self.cursor = newest.max(events.last().map_or(0, |e| e.rv));
        Ok(events.iter().filter_map(|e| self.frame_for(e)).collect())
    }

    /// The frame `event` becomes for this stream, if it concerns it.
    fn frame_for(&self, event: &Event) -> Option<Bytes> {
        let request = &self.request;
        if event.resource != request.res.group_resource() {
            return None;
        }
        if request.res.namespaced && request.namespace.as_ref().is_some_and(|ns| *ns != event.namespace) {
            return None;
        }
        let matches_now = request.filter.matches(&event.object);
        match event.kind {
            EventType::Added => matches_now.then(|| self.object_frame("ADDED", &event.object)),
            EventType::Deleted => matches_now.then(|| self.object_frame("DELETED", &event.object)),
            EventType::Modified => {
                let matched_before = event.prev.as_ref().is_some_and(|p| request.filter.matches(p));
                match (matched_before, matches_now) {
                    (true, true) => Some(self.object_frame("MODIFIED", &event.object)),
                    (false, true) => Some(self.object_frame("ADDED", &event.object)),
                    (true, false) => {
                        // The last state that matched, at the version of the change.
                        let mut gone = event.prev.clone().unwrap_or(Value::Null);
                        gone["metadata"]["resourceVersion"] = json!(event.rv.to_string());
                        Some(self.object_frame("DELETED", &gone))
                    }
                    (false, false) => None,
                }
            }
        }
    }

    fn object_frame(&self, kind: &str, object: &Value) -> Bytes {
        let mut object = object.clone();
        object["apiVersion"] = json!(self.request.res.api_version());
        object["kind"] = json!(self.request.res.kind);
        frame(kind, &object)
    }

    fn bookmark_frame(&self, initial_events_end: bool) -> Bytes {
        let mut metadata = json!({ "resourceVersion": self.cursor.to_string() });
        if initial_events_end {
            metadata["annotations"] = json!({ "k8s.io/initial-events-end": "true" });
        }
        let object = json!({
            "kind": self.request.res.kind,
            "apiVersion": self.request.res.api_version(),
            "metadata": metadata,
        });
        frame("BOOKMARK", &object)
    }

    fn expired_frame(&self, expired: &Expired) -> Bytes {
        let error = ApiError::expired(format!(
            "too old resource version: {} ({})",
            self.cursor.max(match self.request.start {
                Start::After(rv) => rv,
                Start::Now { .. } => 0,
            }),
            expired.oldest
        ));
        frame("ERROR", &error.status())
    }
}

/// One line of the stream.
fn frame(kind: &str, object: &Value) -> Bytes {
    let mut line = serde_json::to_vec(&json!({ "type": kind, "object": object })).unwrap_or_default();
    line.push(b'\n');
    Bytes::from(line)
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}
