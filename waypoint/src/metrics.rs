//! Istio's request metrics (`reporter="waypoint"`) and the per-request access log, written as
//! one line to stdout (JSON with `--log-format json`, in the shape of shared/spec/telemetry.md).

use std::io::Write;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use common::metrics::{HANDLE_CACHE, HandleCache, PartiesKey, TrafficLabels};
use common::telemetry::{LogFormat, Sink};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use serde::Serialize;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    #[prometheus(flatten)]
    pub traffic: TrafficLabels,
    pub response_code: String,
    pub grpc_response_status: String,
}

/// What a request's labels are made from (see [`PartiesKey`]): its metrics are found by
/// hashing this, and its labels built only the first time.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct RequestKey {
    pub parties: PartiesKey,
    pub grpc: bool,
    pub flag: &'static str,
    pub code: u16,
    pub grpc_status: Option<String>,
}

impl RequestKey {
    /// Istio's labels for this key.
    pub fn labels(&self) -> RequestLabels {
        let protocol = if self.grpc { "grpc" } else { "http" };
        RequestLabels {
            traffic: TrafficLabels::new("waypoint", self.parties.parties(), protocol, self.flag, true),
            response_code: self.code.to_string(),
            grpc_response_status: self.grpc_status.clone().unwrap_or_default(),
        }
    }
}

type Histograms = Family<RequestLabels, Histogram, fn() -> Histogram>;

fn duration_histogram() -> Histogram {
    Histogram::new([
        0.5, 1.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0, 30000.0,
    ])
}

fn bytes_histogram() -> Histogram {
    Histogram::new(exponential_buckets(1.0, 10.0, 9))
}

/// The waypoint's request metrics.
/// Labels of `istio_authorization_decisions_total` at the waypoint (tunnels to TCP/TLS ports,
/// authorized at L4; HTTP requests are counted by their response code).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DecisionLabels {
    pub direction: &'static str,
    pub decision: &'static str,
    pub policy: String,
}

#[derive(Clone, Debug)]
pub struct Metrics {
    decisions: Family<DecisionLabels, Counter>,
    requests: Family<RequestLabels, Counter>,
    duration: Histograms,
    request_bytes: Histograms,
    response_bytes: Histograms,
    tcp_opened: Family<TrafficLabels, Counter>,
    tcp_closed: Family<TrafficLabels, Counter>,
    tcp_received: Family<TrafficLabels, Counter>,
    tcp_sent: Family<TrafficLabels, Counter>,
    timeouts: Family<TimeoutLabels, Counter>,
    /// Inbound HBONE connections and CONNECTs that failed before a decision.
    pub inbound_failures: common::hbone::server::InboundFailures,
    log_format: LogFormat,
    sink: AccessSink,
    /// The four metrics of a request's label set, found with one hash of its key.
    by_key: HandleCache<RequestKey, RequestMetrics>,
}

/// The handles of one request label set's metrics (cheap clones of the families' entries).
#[derive(Clone, Debug)]
struct RequestMetrics {
    requests: Counter,
    duration: Histogram,
    request_bytes: Histogram,
    response_bytes: Histogram,
}

/// Bytes of access log lines waiting for the writer; beyond this, lines are dropped and counted
/// rather than slowing requests down (a JSON line is about 600 bytes: some 7000 lines).
pub const ACCESS_LOG_BUFFER: usize = 4 << 20;

/// Where access log lines go: a bounded buffer emptied by a writer thread of its own (see
/// [`Sink`]), so a request never waits on stdout or a file. Lines still buffered are written
/// out when the waypoint exits.
#[derive(Clone, Debug)]
pub struct AccessSink {
    sink: Arc<Sink>,
}

impl AccessSink {
    /// `-` is stdout; anything else a file opened for appending.
    pub fn open(path: &str) -> std::io::Result<Self> {
        let out: Box<dyn Write + Send> = if path == "-" {
            Box::new(std::io::stdout())
        } else {
            Box::new(std::fs::OpenOptions::new().create(true).append(true).open(path)?)
        };
        let sink = Sink::start(
            out,
            ACCESS_LOG_BUFFER,
            Counter::default(),
            "istio_waypoint_access_log_dropped_total",
        )?;
        Ok(Self { sink })
    }

    fn send(&self, line: &str) {
        self.sink.push_line(line.as_bytes());
    }
}

/// Labels of `istio_waypoint_timeouts_total`: which bound fired.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TimeoutLabels {
    pub timeout: &'static str,
}

impl Metrics {
    pub fn new(registry: &mut Registry, log_format: LogFormat, sink: AccessSink) -> Self {
        let m = Self {
            decisions: Family::default(),
            requests: Family::default(),
            duration: Family::new_with_constructor(duration_histogram),
            request_bytes: Family::new_with_constructor(bytes_histogram),
            response_bytes: Family::new_with_constructor(bytes_histogram),
            tcp_opened: Family::default(),
            tcp_closed: Family::default(),
            tcp_received: Family::default(),
            tcp_sent: Family::default(),
            timeouts: Family::default(),
            inbound_failures: common::hbone::server::InboundFailures::register(registry),
            by_key: HandleCache::new(HANDLE_CACHE),
            log_format,
            sink,
        };
        registry.register(
            "waypoint_timeouts",
            "Waits of the waypoint cut short by their bound (protocol_detection, idle, request_body, upstream_connect, ...)",
            m.timeouts.clone(),
        );
        registry.register(
            "waypoint_access_log_dropped",
            "Access log lines dropped because the writer fell behind",
            m.sink.sink.dropped().clone(),
        );
        registry.register("requests", "Requests handled", m.requests.clone());
        registry.register(
            "authorization_decisions",
            "L4 authorization decisions on tunnels to TCP/TLS ports",
            m.decisions.clone(),
        );
        registry.register("request_duration_milliseconds", "Request duration", m.duration.clone());
        registry.register("request_bytes", "Request body sizes", m.request_bytes.clone());
        registry.register("response_bytes", "Response body sizes", m.response_bytes.clone());
        registry.register("tcp_connections_opened", "TCP connections opened", m.tcp_opened.clone());
        registry.register("tcp_connections_closed", "TCP connections closed", m.tcp_closed.clone());
        registry.register("tcp_received_bytes", "Bytes received from the client", m.tcp_received.clone());
        registry.register("tcp_sent_bytes", "Bytes sent to the client", m.tcp_sent.clone());
        m
    }

    /// Records one finished request and writes its access log line.
    pub fn request(
        &self,
        key: RequestKey,
        duration: Duration,
        req_bytes: u64,
        resp_bytes: u64,
        log: &AccessLog,
    ) {
        let m = self.handles(key);
        m.requests.inc();
        m.duration.observe(duration.as_secs_f64() * 1000.0);
        m.request_bytes.observe(req_bytes as f64);
        m.response_bytes.observe(resp_bytes as f64);
        self.write(log);
    }

    fn handles(&self, key: RequestKey) -> RequestMetrics {
        self.by_key.get(key, |key| {
            let labels = key.labels();
            RequestMetrics {
                requests: self.requests.get_or_create(&labels).clone(),
                duration: self.duration.get_or_create(&labels).clone(),
                request_bytes: self.request_bytes.get_or_create(&labels).clone(),
                response_bytes: self.response_bytes.get_or_create(&labels).clone(),
            }
        })
    }

    /// Counts a bound that fired.
    pub fn timeout(&self, which: &'static str) {
        self.timeouts.get_or_create(&TimeoutLabels { timeout: which }).inc();
    }

    /// Counts an L4 authorization decision on a tunnel.
    pub fn decision(&self, decision: &'static str, policy: &str) {
        let labels = DecisionLabels { direction: "waypoint", decision, policy: policy.to_string() };
        self.decisions.get_or_create(&labels).inc();
    }

    /// Records one TCP connection passed through.
    pub fn tcp(&self, labels: &TrafficLabels, received: u64, sent: u64) {
        self.tcp_opened.get_or_create(labels).inc();
        self.tcp_received.get_or_create(labels).inc_by(received);
        self.tcp_sent.get_or_create(labels).inc_by(sent);
        self.tcp_closed.get_or_create(labels).inc();
    }

    fn write(&self, log: &AccessLog) {
        let line = match self.log_format {
            LogFormat::Json => serde_json::to_string(log).unwrap_or_default(),
            LogFormat::Text => log.text(),
        };
        self.sink.send(&line);
    }
}

/// One request as the access log shows it (Envoy's field names; `None` is `null`).
#[derive(Clone, Debug, Default, Serialize)]
pub struct AccessLog {
    pub authority: Option<String>,
    pub bytes_received: u64,
    pub bytes_sent: u64,
    pub connection_termination_details: Option<String>,
    pub downstream_local_address: Option<Arc<str>>,
    pub downstream_remote_address: Option<Arc<str>>,
    /// Milliseconds.
    pub duration: u64,
    pub method: Option<String>,
    pub path: Option<String>,
    pub protocol: Option<&'static str>,
    pub request_id: Option<String>,
    pub requested_server_name: Option<String>,
    pub response_code: u16,
    pub response_code_details: Option<String>,
    pub response_flags: &'static str,
    pub route_name: Option<String>,
    pub start_time: String,
    pub upstream_cluster: Option<String>,
    pub upstream_host: Option<Arc<str>>,
    pub upstream_local_address: Option<String>,
    pub upstream_service_time: Option<u64>,
    pub upstream_transport_failure_reason: Option<String>,
    pub user_agent: Option<String>,
    pub x_forwarded_for: Option<String>,
    /// The caller's SPIFFE identity (from its ztunnel's certificate).
    pub source_principal: Option<Arc<str>>,
}

/// RFC 3339 with milliseconds, UTC. The text up to the second is formatted once per second
/// per thread; each request adds its milliseconds.
pub fn rfc3339(t: SystemTime) -> String {
    thread_local! {
        /// A second since the epoch and its text without the fraction (`..T11:06:40`).
        static SECOND: std::cell::RefCell<Option<(u64, String)>> = const { std::cell::RefCell::new(None) };
    }
    let Ok(since) = t.duration_since(SystemTime::UNIX_EPOCH) else { return rfc3339_full(t) };
    let secs = since.as_secs();
    SECOND.with_borrow_mut(|second| {
        let prefix = match second {
            Some((s, text)) if *s == secs => text,
            _ => {
                let whole = rfc3339_full(SystemTime::UNIX_EPOCH + Duration::from_secs(secs));
                // `whole` ends in `.000Z`.
                let text = whole.strip_suffix(".000Z").unwrap_or(&whole).to_string();
                &mut second.insert((secs, text)).1
            }
        };
        if prefix.is_empty() {
            // The second could not be formatted (beyond year 9999): no timestamp, as before.
            return String::new();
        }
        let millis = since.subsec_millis();
        let mut out = String::with_capacity(prefix.len() + 5);
        out.push_str(prefix);
        out.push('.');
        for d in [millis / 100, millis / 10 % 10, millis % 10] {
            out.push(char::from(b'0' + d as u8));
        }
        out.push('Z');
        out
    })
}

fn rfc3339_full(t: SystemTime) -> String {
    /// Parsed once: this runs for every request.
    static FORMAT: std::sync::LazyLock<
        Result<
            Vec<time::format_description::BorrowedFormatItem<'static>>,
            time::error::InvalidFormatDescription,
        >,
    > = std::sync::LazyLock::new(|| {
        time::format_description::parse_borrowed::<2>(
            "[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:3]Z",
        )
    });
    match &*FORMAT {
        Ok(f) => time::OffsetDateTime::from(t).format(f.as_slice()).unwrap_or_default(),
        Err(_) => String::new(),
    }
}

impl AccessLog {
    fn text(&self) -> String {
        fn o<S: std::ops::Deref<Target = str>>(v: &Option<S>) -> &str {
            v.as_deref().unwrap_or("-")
        }
        // Pieces pushed in turn: `write!` with 17 arguments cost a few thousand instructions
        // per request.
        let (mut code, mut received, mut sent, mut duration) =
            (itoa::Buffer::new(), itoa::Buffer::new(), itoa::Buffer::new(), itoa::Buffer::new());
        let pieces = [
            "[",
            &self.start_time,
            "] \"",
            o(&self.method),
            " ",
            o(&self.path),
            " ",
            self.protocol.unwrap_or("-"),
            "\" ",
            code.format(self.response_code),
            " ",
            self.response_flags,
            " ",
            received.format(self.bytes_received),
            " ",
            sent.format(self.bytes_sent),
            " ",
            duration.format(self.duration),
            " \"",
            o(&self.x_forwarded_for),
            "\" \"",
            o(&self.user_agent),
            "\" \"",
            o(&self.request_id),
            "\" \"",
            o(&self.authority),
            "\" ",
            o(&self.upstream_host),
            " ",
            o(&self.upstream_cluster),
            " route=",
            o(&self.route_name),
            " src=",
            o(&self.source_principal),
        ];
        let mut line = String::with_capacity(pieces.iter().map(|p| p.len()).sum());
        for p in pieces {
            line.push_str(p);
        }
        line
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_lines_have_envoys_field_order() {
        let log = AccessLog {
            authority: Some("web:80".into()),
            bytes_received: 12,
            bytes_sent: 3456,
            duration: 7,
            method: Some("POST".into()),
            path: Some("/a?b=c".into()),
            protocol: Some("HTTP/1.1"),
            request_id: Some("id-1".into()),
            response_code: 503,
            response_flags: "UF",
            route_name: Some("ns/r.0".into()),
            start_time: "2026-11-18T11:06:40.123Z".into(),
            upstream_cluster: Some("outbound|80||web.ns.svc.cluster.local".into()),
            upstream_host: Some("10.0.0.1:8080".into()),
            user_agent: Some("curl/8".into()),
            source_principal: Some("spiffe://cluster.local/ns/a/sa/b".into()),
            ..Default::default()
        };
        assert_eq!(
            log.text(),
            "[2026-11-18T11:06:40.123Z] \"POST /a?b=c HTTP/1.1\" 503 UF 12 3456 7 \"-\" \"curl/8\" \"id-1\" \"web:80\" 10.0.0.1:8080 outbound|80||web.ns.svc.cluster.local route=ns/r.0 src=spiffe://cluster.local/ns/a/sa/b"
        );
        let empty = AccessLog { response_flags: "-", ..Default::default() };
        assert_eq!(empty.text(), "[] \"- - -\" 0 - 0 0 0 \"-\" \"-\" \"-\" \"-\" - - route=- src=-");
    }

    #[test]
    fn timestamps_are_rfc3339_with_milliseconds() {
        let t = SystemTime::UNIX_EPOCH + Duration::from_millis(1_795_000_000_123);
        assert_eq!(rfc3339(t), "2026-11-18T11:06:40.123Z");
        assert_eq!(rfc3339(SystemTime::UNIX_EPOCH), "1970-01-01T00:00:00.000Z");
        // The second's text is kept between calls: a new second, and the same one again.
        assert_eq!(rfc3339(t + Duration::from_millis(900)), "2026-11-18T11:06:41.023Z");
        assert_eq!(rfc3339(t + Duration::from_millis(877)), "2026-11-18T11:06:41.000Z");
        assert_eq!(rfc3339(t + Duration::from_millis(1876)), "2026-11-18T11:06:41.999Z");
        assert_eq!(rfc3339(t), "2026-11-18T11:06:40.123Z");
        assert_eq!(rfc3339(SystemTime::UNIX_EPOCH - Duration::from_millis(1)), "1969-12-31T23:59:59.999Z");
    }
}
