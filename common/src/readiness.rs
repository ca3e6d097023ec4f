//! Readiness: the process is ready once every registered start-up task has finished.
//!
//! Each component that must finish before the proxy can serve (the first xDS sync, the first
//! certificates) takes a [`BlockReady`] and calls [`BlockReady::done`] when it is through. While
//! it waits, a task can say what it is waiting for ([`BlockReady::set_detail`]); the readiness
//! endpoint shows that next to its name.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, PoisonError};

use tokio::sync::watch;

/// Tracks the start-up tasks that still block readiness.
#[derive(Clone, Debug)]
pub struct Ready {
    /// Pending task names, each with what it is still waiting for (if it said).
    pending: Arc<Mutex<BTreeMap<String, Option<String>>>>,
    tx: Arc<watch::Sender<bool>>,
    /// Number of pending tasks, published on every change.
    count: Arc<watch::Sender<usize>>,
}

impl Default for Ready {
    fn default() -> Self {
        Self::new()
    }
}

impl Ready {
    pub fn new() -> Self {
        let (tx, _) = watch::channel(true);
        Self { pending: Arc::default(), tx: Arc::new(tx), count: Arc::new(watch::channel(0).0) }
    }

    /// Registers a task that blocks readiness until its guard is done or dropped.
    pub fn register(&self, name: impl Into<String>) -> BlockReady {
        let name = name.into();
        let mut pending = self.pending.lock().unwrap_or_else(PoisonError::into_inner);
        pending.insert(name.clone(), None);
        self.count.send_replace(pending.len());
        self.tx.send_replace(false);
        BlockReady { ready: self.clone(), name: Some(name) }
    }

    /// The tasks still pending, for the readiness endpoint's body: each task's name, followed by
    /// `: <detail>` when it said what it is waiting for.
    pub fn pending(&self) -> Vec<String> {
        let pending = self.pending.lock().unwrap_or_else(PoisonError::into_inner);
        pending
            .iter()
            .map(|(name, detail)| match detail {
                Some(d) => format!("{name}: {d}"),
                None => name.clone(),
            })
            .collect()
    }

    pub fn is_ready(&self) -> bool {
        *self.tx.borrow()
    }

    /// Waits until every registered task is done.
    pub async fn wait(&self) {
        let mut rx = self.tx.subscribe();
        // The sender lives in self, so the channel cannot close while we wait.
        let _ = rx.wait_for(|ready| *ready).await;
    }

    /// Waits until `name` is the only task still pending (or nothing is): for a start-up task
    /// that must come after all the others (certificates after the first xDS sync).
    pub async fn wait_for_others(&self, name: &str) {
        let mut rx = self.count.subscribe();
        let others = || {
            let pending = self.pending.lock().unwrap_or_else(PoisonError::into_inner);
            pending.keys().any(|p| p != name)
        };
        loop {
            rx.borrow_and_update();
            if !others() {
                return;
            }
            // The sender lives in self, so the channel cannot close while we wait.
            if rx.changed().await.is_err() {
                return;
            }
        }
    }

    fn describe(&self, name: &str, detail: Option<String>) {
        let mut pending = self.pending.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(d) = pending.get_mut(name) {
            *d = detail;
        }
    }

    fn finish(&self, name: &str) {
        let mut pending = self.pending.lock().unwrap_or_else(PoisonError::into_inner);
        pending.remove(name);
        self.count.send_replace(pending.len());
        if pending.is_empty() {
            self.tx.send_replace(true);
        }
    }
}

/// Guard for one start-up task; readiness is blocked until it is done or dropped.
#[derive(Debug)]
pub struct BlockReady {
    ready: Ready,
    name: Option<String>,
}

impl BlockReady {
    pub fn done(mut self) {
        self.release();
    }

    /// Says what the task is still waiting for (`None` clears it); shown after its name by
    /// [`Ready::pending`] until the task is done.
    pub fn set_detail(&self, detail: Option<String>) {
        if let Some(name) = &self.name {
            self.ready.describe(name, detail);
        }
    }

    fn release(&mut self) {
        if let Some(name) = self.name.take() {
            tracing::info!(task = %name, "start-up task done");
            self.ready.finish(&name);
        }
    }
}

impl Drop for BlockReady {
    fn drop(&mut self) {
        self.release();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_only_after_all_tasks_finish() {
        let ready = Ready::new();
        assert!(ready.is_ready(), "nothing registered means ready");
        let a = ready.register("xds");
        let b = ready.register("certs");
        assert!(!ready.is_ready());
        a.done();
        assert!(!ready.is_ready());
        assert_eq!(ready.pending(), vec!["certs".to_string()]);
        drop(b);
        assert!(ready.is_ready());
    }

    #[test]
    fn pending_tasks_say_what_they_wait_for() {
        let ready = Ready::new();
        let xds = ready.register("xds");
        let certs = ready.register("certs");
        certs.set_detail(Some("missing spiffe://td/ns/a/sa/b (CA error: refused)".into()));
        assert_eq!(
            ready.pending(),
            vec!["certs: missing spiffe://td/ns/a/sa/b (CA error: refused)".to_string(), "xds".to_string()]
        );
        certs.set_detail(None);
        assert_eq!(ready.pending(), vec!["certs".to_string(), "xds".to_string()]);
        certs.set_detail(Some("missing spiffe://td/ns/a/sa/c (waiting for the CA)".into()));
        xds.done();
        assert_eq!(
            ready.pending(),
            vec!["certs: missing spiffe://td/ns/a/sa/c (waiting for the CA)".to_string()]
        );
        certs.done();
        assert!(ready.is_ready() && ready.pending().is_empty());
    }

    #[tokio::test]
    async fn a_task_can_wait_for_the_others() {
        let ready = Ready::new();
        let xds = ready.register("xds");
        let certs = ready.register("certs");
        let waiter = {
            let ready = ready.clone();
            tokio::spawn(async move { ready.wait_for_others("certs").await })
        };
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished(), "xds is still pending");
        xds.done();
        tokio::time::timeout(std::time::Duration::from_secs(5), waiter).await.expect("woken").expect("join");
        assert!(!ready.is_ready(), "certs still pending");
        certs.done();
        assert!(ready.is_ready());
    }
}
