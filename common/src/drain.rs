//! Graceful shutdown: stop accepting, let open connections finish for up to a drain period,
//! then close what is left.
//!
//! A [`Drain`] hands out [`Watch`]es. Accept loops stop when [`Watch::draining`] fires.
//! Each connection holds a [`Guard`] (from [`Watch::guard`]) for as long as it runs and stops
//! its copy when [`Watch::closing`] fires. [`Drain::run`] waits for the last guard or for the
//! period, whichever comes first.

use std::time::Duration;

use std::sync::Arc;

use tokio::sync::{Notify, mpsc, watch};
use tracing::{info, warn};

/// How long closing connections get to unwind after the drain period.
const CLOSE_GRACE: Duration = Duration::from_secs(1);

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Phase {
    Running,
    Draining,
    Closing,
}

/// The trigger side, owned by the app.
#[derive(Debug)]
pub struct Drain {
    phase: watch::Sender<Phase>,
    /// Held until the drain starts; guards are clones.
    token: Option<mpsc::Sender<()>>,
    done: mpsc::Receiver<()>,
    weak: mpsc::WeakSender<()>,
    /// Woken when the period is over: what each open connection waits on (lighter than a
    /// `watch` wait, which every connection's task would carry).
    close: Arc<Notify>,
}

/// The listening side, held by accept loops and proxies. Cheap to clone.
#[derive(Clone, Debug)]
pub struct Watch {
    phase: watch::Receiver<Phase>,
    token: mpsc::WeakSender<()>,
    close: Arc<Notify>,
}

/// Keeps the drain waiting while a connection runs.
#[derive(Debug)]
pub struct Guard {
    _token: mpsc::Sender<()>,
}

impl Default for Drain {
    fn default() -> Self {
        Self::new()
    }
}

impl Drain {
    pub fn new() -> Self {
        let (token, done) = mpsc::channel(1);
        let weak = token.downgrade();
        let close = Arc::new(Notify::new());
        Self { phase: watch::channel(Phase::Running).0, token: Some(token), done, weak, close }
    }

    pub fn watch(&self) -> Watch {
        Watch { phase: self.phase.subscribe(), token: self.weak.clone(), close: self.close.clone() }
    }

    /// Stops accepting, waits up to `period` for open connections to finish, then tells the
    /// rest to close. Returns how many were still open when the period ran out (0 when all
    /// finished in time; an estimate bounded by the channel's accounting otherwise).
    pub async fn run(mut self, period: Duration) -> usize {
        self.phase.send_replace(Phase::Draining);
        let open = self.weak.strong_count().saturating_sub(1);
        info!(open, period_ms = period.as_millis() as u64, "draining: no new connections");
        self.token = None;
        if tokio::time::timeout(period, self.done.recv()).await.is_ok() {
            info!("drained: every connection finished");
            return 0;
        }
        let left = self.weak.strong_count();
        warn!(left, "drain period over: closing the remaining connections");
        self.phase.send_replace(Phase::Closing);
        self.close.notify_waiters();
        let _ = tokio::time::timeout(CLOSE_GRACE, self.done.recv()).await;
        left
    }
}

impl Drop for Drain {
    fn drop(&mut self) {
        // Whoever still waits for the close is told, as when the period runs out.
        self.close.notify_waiters();
    }
}

impl Watch {
    /// A guard for a new connection; `None` once draining has started.
    pub fn guard(&self) -> Option<Guard> {
        if *self.phase.borrow() != Phase::Running {
            return None;
        }
        self.token.upgrade().map(|t| Guard { _token: t })
    }

    /// A guard for a connection the kernel handed over just as the drain started (accepted,
    /// but not yet counted): allowed until the period ends, as long as the drain is still
    /// waiting for other connections. `None` otherwise.
    pub fn late_guard(&self) -> Option<Guard> {
        if *self.phase.borrow() == Phase::Closing {
            return None;
        }
        self.token.upgrade().map(|t| Guard { _token: t })
    }

    pub fn is_draining(&self) -> bool {
        *self.phase.borrow() != Phase::Running
    }

    /// Resolves when the drain starts (stop accepting).
    pub async fn draining(&self) {
        let mut rx = self.phase.clone();
        let _ = rx.wait_for(|p| *p >= Phase::Draining).await;
    }

    /// Resolves when the drain period is over (close now).
    pub async fn closing(&self) {
        // Registered before the phase is read: a close between the two still wakes it. A
        // dropped `Drain` (its owner gone without draining) closes too.
        let notified = self.close.notified();
        if *self.phase.borrow() == Phase::Closing || self.phase.has_changed().is_err() {
            return;
        }
        notified.await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn finishes_early_when_connections_end_and_closes_laggards() {
        let drain = Drain::new();
        let watch = drain.watch();
        let quick = watch.guard().expect("running");
        let slow = watch.guard().expect("running");
        let w = watch.clone();
        let slow_task = tokio::spawn(async move {
            w.closing().await;
            drop(slow);
        });
        let quick_task = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(20)).await;
            drop(quick);
        });
        let left = drain.run(Duration::from_millis(200)).await;
        assert_eq!(left, 1, "the slow connection outlived the period");
        assert!(watch.guard().is_none(), "no new connections while draining");
        quick_task.await.expect("quick");
        slow_task.await.expect("slow closed when told");

        let drain = Drain::new();
        let g = drain.watch().guard().expect("running");
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(20)).await;
            drop(g);
        });
        let started = std::time::Instant::now();
        assert_eq!(drain.run(Duration::from_secs(5)).await, 0);
        assert!(started.elapsed() < Duration::from_secs(2), "returned as soon as the last guard went");
    }

    #[tokio::test]
    async fn a_dropped_drain_closes_what_waits_and_what_asks_later() {
        let drain = Drain::new();
        let watch = drain.watch();
        let w = watch.clone();
        let waiting = tokio::spawn(async move { w.closing().await });
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!waiting.is_finished(), "closed while the drain was still there");
        drop(drain);
        tokio::time::timeout(Duration::from_secs(5), waiting).await.expect("woken").expect("task");
        tokio::time::timeout(Duration::from_secs(5), watch.closing()).await.expect("closed at once");
    }
}
