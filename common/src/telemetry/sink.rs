//! Where log lines go: a bounded buffer in memory that one writer thread empties into the
//! output (stderr) every [`LOG_FLUSH`].
//!
//! A proxy thread that logs only copies its line into the buffer: no `write` per line (ztunnel
//! writes one access line per connection), and no wait on the output. A log reader that stalls
//! (a pipe nobody drains, a container runtime's log shim that fell behind, a slow disk) used to
//! stop the thread at its next line, and with it every connection that thread served; now it
//! costs log lines instead, dropped once [`LOG_BUFFER`] bytes wait, counted in
//! `istio_log_lines_dropped_total` and reported by a warning when the output moves again.
//! [`flush`] writes out what waits in every sink of the process (the binaries call it before
//! they exit), bounded by [`LOG_EXIT_FLUSH`] so that a stuck output cannot keep a process from
//! exiting; the panic hook flushes too, bounded by [`LOG_PANIC_FLUSH`] (a panic caught in a task
//! holds up the thread that panicked for that long at most).
//!
//! Other line outputs (the waypoint's access log) start a [`Sink`] of their own.

use std::io::Write;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock, PoisonError, Weak};
use std::time::{Duration, Instant};

use prometheus_client::metrics::counter::Counter;

/// Bytes of log lines held for the writer; past this, lines are dropped and counted.
pub const LOG_BUFFER: usize = 1 << 20;
/// How long lines gather before the writer writes them out (a line reaches the output within
/// about this long; Envoy's access log flushes every 10 s by default).
pub const LOG_FLUSH: Duration = Duration::from_millis(50);
/// The longest [`flush`] waits for the output.
pub const LOG_EXIT_FLUSH: Duration = Duration::from_secs(2);
/// The longest the panic hook waits for the output before the panic message.
pub const LOG_PANIC_FLUSH: Duration = Duration::from_millis(200);
/// A buffer that grew past this under a burst is not kept for the next one.
const KEEP_CAPACITY: usize = 256 << 10;

/// The process's sink, started by `telemetry::init`.
static SINK: OnceLock<Option<Arc<Sink>>> = OnceLock::new();

/// Every sink started and not yet dropped, for [`flush`].
static SINKS: Mutex<Vec<Weak<Sink>>> = Mutex::new(Vec::new());

/// Lines dropped by the process's sink (`istio_log_lines_dropped_total`).
pub fn dropped_lines() -> Counter {
    static DROPPED: OnceLock<Counter> = OnceLock::new();
    DROPPED.get_or_init(Counter::default).clone()
}

/// Starts the process's sink on stderr (once; later calls keep the first).
pub(super) fn install() {
    SINK.get_or_init(|| {
        match Sink::start(
            Box::new(std::io::stderr()),
            LOG_BUFFER,
            dropped_lines(),
            "istio_log_lines_dropped_total",
        ) {
            Ok(sink) => Some(sink),
            Err(e) => {
                // Without a writer thread, lines are written by the threads that log them.
                let _ = writeln!(
                    std::io::stderr(),
                    "log writer thread not started ({e}): logging straight to stderr"
                );
                None
            }
        }
    });
}

/// Writes out the lines every sink of the process holds, waiting at most [`LOG_EXIT_FLUSH`] in
/// all; returns whether they were all written.
pub fn flush() -> bool {
    flush_within(LOG_EXIT_FLUSH)
}

/// Writes out the lines every sink of the process holds, waiting at most `limit` in all.
pub fn flush_within(limit: Duration) -> bool {
    flush_all(&registered(), Instant::now() + limit)
}

/// The sinks started and not dropped.
fn registered() -> Vec<Arc<Sink>> {
    SINKS.lock().unwrap_or_else(PoisonError::into_inner).iter().filter_map(Weak::upgrade).collect()
}

/// Flushes `sinks` by `deadline`: each writer writes its own output, so all are asked first.
fn flush_all(sinks: &[Arc<Sink>], deadline: Instant) -> bool {
    let asked: Vec<u64> = sinks.iter().map(|s| s.ask()).collect();
    sinks.iter().zip(asked).fold(true, |all, (s, target)| s.wait_done(target, deadline) && all)
}

/// The `MakeWriter` of the process's subscriber: each event's line (the formatter writes a
/// line with one `write_all`) goes into the sink.
#[derive(Clone, Copy, Debug, Default)]
pub(super) struct SinkWriter;

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for SinkWriter {
    type Writer = SinkWriter;
    fn make_writer(&'a self) -> SinkWriter {
        SinkWriter
    }
}

impl Write for SinkWriter {
    fn write(&mut self, line: &[u8]) -> std::io::Result<usize> {
        match SINK.get() {
            Some(Some(sink)) => {
                sink.push(line);
                Ok(line.len())
            }
            _ => std::io::stderr().write(line),
        }
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

thread_local! {
    /// Set on the writer thread.
    static IS_WRITER: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

struct State {
    lines: Vec<u8>,
    /// The `Sink` was dropped: the writer writes what is left and ends.
    closed: bool,
    /// The writer waits for lines (a push then wakes it).
    idle: bool,
    /// Flushes asked for, and the last one the writer has done.
    asked: u64,
    done: u64,
}

/// Lines for one output, written by a thread of its own; dropping it has the thread write what
/// is left and end.
pub struct Sink {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Sink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sink")
            .field("metric", &self.shared.metric)
            .field("dropped", &self.shared.dropped.get())
            .finish_non_exhaustive()
    }
}

/// What a sink and its writer share.
struct Shared {
    state: Mutex<State>,
    /// Wakes the writer: lines after idleness, a flush asked for, or the sink dropped.
    wake: Condvar,
    /// Wakes those waiting in `flush`.
    flushed: Condvar,
    max: usize,
    dropped: Counter,
    /// The counter's metric, named in the warning about drops.
    metric: &'static str,
}

impl Sink {
    /// A sink writing to `out` from a thread of its own, holding at most `max` bytes; lines
    /// dropped are counted in `dropped`, exposed as `metric`.
    pub fn start(
        mut out: Box<dyn Write + Send>,
        max: usize,
        dropped: Counter,
        metric: &'static str,
    ) -> std::io::Result<Arc<Self>> {
        let shared = Arc::new(Shared {
            state: Mutex::new(State { lines: Vec::new(), closed: false, idle: false, asked: 0, done: 0 }),
            wake: Condvar::new(),
            flushed: Condvar::new(),
            max,
            dropped,
            metric,
        });
        let writer = shared.clone();
        std::thread::Builder::new().name("log-writer".into()).spawn(move || writer.run(&mut *out))?;
        let sink = Arc::new(Self { shared });
        let mut all = SINKS.lock().unwrap_or_else(PoisonError::into_inner);
        all.retain(|s| s.strong_count() > 0);
        all.push(Arc::downgrade(&sink));
        Ok(sink)
    }

    /// Queues one line, or drops and counts it when the sink is full. Never waits on the output.
    pub fn push(&self, line: &[u8]) {
        self.shared.push(line, b"");
    }

    /// Like [`Sink::push`] for a line without its newline: the sink adds it (no copy of the
    /// line to append one).
    pub fn push_line(&self, line: &[u8]) {
        self.shared.push(line, b"\n");
    }

    /// Lines dropped because the sink was full.
    pub fn dropped(&self) -> &Counter {
        &self.shared.dropped
    }

    /// Has the writer write out what is queued now; false if that took longer than `limit`.
    pub fn flush(&self, limit: Duration) -> bool {
        let target = self.ask();
        self.wait_done(target, Instant::now() + limit)
    }

    /// Asks the writer for a flush; returns the flush's number.
    fn ask(&self) -> u64 {
        let mut s = self.shared.lock();
        s.asked += 1;
        self.shared.wake.notify_one();
        s.asked
    }

    /// Waits until the writer has done flush `target`; false if it has not by `deadline`.
    fn wait_done(&self, target: u64, deadline: Instant) -> bool {
        let mut s = self.shared.lock();
        while s.done < target {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            s = self.shared.flushed.wait_timeout(s, left).unwrap_or_else(PoisonError::into_inner).0;
        }
        true
    }
}

impl Drop for Sink {
    fn drop(&mut self) {
        self.shared.lock().closed = true;
        self.shared.wake.notify_one();
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn push(&self, line: &[u8], end: &[u8]) {
        let mut s = self.lock();
        // The writer's own report of drops is kept even when the buffer is full.
        if s.lines.len() + line.len() + end.len() > self.max && !IS_WRITER.get() {
            drop(s);
            self.dropped.inc();
            return;
        }
        s.lines.extend_from_slice(line);
        s.lines.extend_from_slice(end);
        let wake = std::mem::take(&mut s.idle);
        drop(s);
        if wake {
            self.wake.notify_one();
        }
    }

    fn run(&self, out: &mut dyn Write) {
        IS_WRITER.set(true);
        let mut batch = Vec::new();
        let mut reported = self.dropped.get();
        loop {
            let mut s = self.lock();
            while s.lines.is_empty() && s.asked == s.done {
                if s.closed {
                    return;
                }
                s.idle = true;
                s = self.wake.wait(s).unwrap_or_else(PoisonError::into_inner);
            }
            s.idle = false;
            if s.asked == s.done {
                // Lines, no flush asked for: let more gather, so one write carries many.
                s = self
                    .wake
                    .wait_timeout_while(s, LOG_FLUSH, |s| s.asked == s.done && !s.closed)
                    .unwrap_or_else(PoisonError::into_inner)
                    .0;
            }
            let target = s.asked;
            std::mem::swap(&mut s.lines, &mut batch);
            drop(s);
            // A write that fails (a closed pipe) loses the batch: there is nowhere else to say so.
            let _ = out.write_all(&batch).and_then(|()| out.flush());
            batch.clear();
            if batch.capacity() > KEEP_CAPACITY {
                batch = Vec::new();
            }
            let dropped = self.dropped.get();
            if dropped > reported {
                tracing::warn!(
                    dropped = dropped - reported,
                    total = dropped,
                    metric = self.metric,
                    "log lines dropped: the output fell behind"
                );
                reported = dropped;
            }
            self.lock().done = target;
            self.flushed.notify_all();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;

    /// An output that records what it is given, and can be held shut.
    #[derive(Clone, Default)]
    struct Output {
        text: Arc<Mutex<Vec<u8>>>,
        gate: Arc<Mutex<()>>,
        writes: Arc<std::sync::atomic::AtomicUsize>,
    }

    impl Write for Output {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.writes.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let _open = self.gate.lock().unwrap_or_else(PoisonError::into_inner);
            self.text.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl Output {
        fn text(&self) -> String {
            String::from_utf8(self.text.lock().unwrap().clone()).unwrap()
        }
    }

    #[test]
    fn lines_come_out_in_order_and_whole_on_flush() {
        let out = Output::default();
        let sink = Sink::start(Box::new(out.clone()), 1 << 20, Counter::default(), "t").expect("sink");
        let mut expected = String::new();
        for i in 0..1000 {
            let line = format!("line {i} of a thousand\n");
            sink.push(line.as_bytes());
            expected.push_str(&line);
        }
        assert!(sink.flush(Duration::from_secs(10)), "flushed");
        assert_eq!(out.text(), expected);
        // A flush with nothing queued returns too.
        assert!(sink.flush(Duration::from_secs(10)));
        assert_eq!(out.text(), expected);
    }

    #[test]
    fn a_stuck_output_costs_lines_not_waits() {
        let out = Output::default();
        let dropped = Counter::default();
        let sink = Sink::start(Box::new(out.clone()), 1000, dropped.clone(), "t").expect("sink");
        // The output stops taking anything: the writer will block in it.
        let shut = out.gate.lock().unwrap();
        sink.push(b"0123456789\n");
        // The writer takes that line and blocks writing it.
        let deadline = Instant::now() + Duration::from_secs(10);
        while out.writes.load(std::sync::atomic::Ordering::SeqCst) == 0 {
            assert!(Instant::now() < deadline, "the writer never wrote");
            std::thread::sleep(Duration::from_millis(5));
        }
        // The logging thread goes on: 500 lines of 11 bytes against a 1000-byte buffer.
        let (tx, rx) = mpsc::channel();
        let pusher = {
            let sink = sink.clone();
            std::thread::spawn(move || {
                // Half with their newline, half with the sink's: the same 11 bytes each.
                for i in 0..500 {
                    if i % 2 == 0 {
                        sink.push(b"abcdefghij\n");
                    } else {
                        sink.push_line(b"abcdefghij");
                    }
                }
                tx.send(()).unwrap();
            })
        };
        rx.recv_timeout(Duration::from_secs(10)).expect("pushing never waits on the output");
        pusher.join().unwrap();
        assert_eq!(dropped.get(), 500 - 1000 / 11, "what does not fit is dropped and counted");
        assert_eq!(sink.dropped().get(), dropped.get());
        // A flush gives up at its bound while the output is stuck...
        assert!(!sink.flush(Duration::from_millis(200)), "a stuck output bounds the flush");
        // ...and once the output moves, what was held comes out, then a warning with the count.
        drop(shut);
        assert!(sink.flush(Duration::from_secs(10)));
        let text = out.text();
        assert!(text.starts_with("0123456789\n"), "{text}");
        assert_eq!(text.matches("abcdefghij\n").count(), 1000 / 11, "{text}");
    }

    #[test]
    fn every_sink_is_flushed_on_exit_and_a_dropped_sink_writes_what_is_left_and_ends() {
        let (a, b) = (Output::default(), Output::default());
        let sink_a = Sink::start(Box::new(a.clone()), 1 << 20, Counter::default(), "t").expect("sink");
        let sink_b = Sink::start(Box::new(b.clone()), 1 << 20, Counter::default(), "t").expect("sink");
        let known = |sink: &Arc<Sink>| registered().iter().any(|s| Arc::ptr_eq(s, sink));
        assert!(known(&sink_a) && known(&sink_b), "the process flush knows both");
        let soon = || Instant::now() + Duration::from_secs(10);
        sink_a.push(b"to a\n");
        sink_b.push(b"to b\n");
        assert!(flush_all(&[sink_a.clone(), sink_b.clone()], soon()), "flushed");
        assert_eq!((a.text().as_str(), b.text().as_str()), ("to a\n", "to b\n"));
        // Dropped: the line pushed just before still comes out, then the writer ends (its end
        // drops the output's clone it held).
        sink_b.push(b"last\n");
        let weak_b = Arc::downgrade(&sink_b);
        drop(sink_b);
        assert!(!registered().iter().any(|s| Weak::ptr_eq(&Arc::downgrade(s), &weak_b)));
        let deadline = Instant::now() + Duration::from_secs(10);
        while Arc::strong_count(&b.text) > 1 {
            assert!(Instant::now() < deadline, "the writer of a dropped sink never ended");
            std::thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(b.text(), "to b\nlast\n");
        sink_a.push(b"again\n");
        assert!(flush_all(std::slice::from_ref(&sink_a), soon()), "flushed");
        assert_eq!(a.text(), "to a\nagain\n");
    }
}
