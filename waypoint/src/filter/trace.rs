//! Tracing: one server span per request at the waypoint. The incoming context is read from W3C
//! `traceparent` (or B3 `x-b3-*`); the request goes upstream with a `traceparent` naming the
//! waypoint's span as parent (and `tracestate` passed on). Sampling follows the caller's
//! decision when there is one, else `--trace-sampling` percent. Sampled spans are exported in
//! batches over OTLP/gRPC to `--otlp-endpoint`.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::hex::{push_hex, write_hex};
use http::{HeaderMap, HeaderName, HeaderValue};
use proto::opentelemetry::proto::collector::trace::v1::ExportTraceServiceRequest;
use proto::opentelemetry::proto::collector::trace::v1::trace_service_client::TraceServiceClient;
use proto::opentelemetry::proto::common::v1::{AnyValue, InstrumentationScope, KeyValue, any_value};
use proto::opentelemetry::proto::resource::v1::Resource;
use proto::opentelemetry::proto::trace::v1::{ResourceSpans, ScopeSpans, Span, Status, span, status};
use rand::Rng;
use tokio::sync::mpsc;
use tracing::{debug, warn};

/// Spans waiting for export before new ones are dropped.
const QUEUE: usize = 4096;
/// Longest wait before a partial batch is sent.
const FLUSH_EVERY: Duration = Duration::from_millis(500);

/// A trace context: ids and whether it is sampled.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Context {
    pub trace_id: [u8; 16],
    pub span_id: [u8; 8],
    pub sampled: bool,
}

fn hex<const N: usize>(s: &str) -> Option<[u8; N]> {
    if s.len() != N * 2 {
        return None;
    }
    let mut out = [0u8; N];
    for (i, b) in out.iter_mut().enumerate() {
        *b = u8::from_str_radix(s.get(i * 2..i * 2 + 2)?, 16).ok()?;
    }
    Some(out).filter(|o| o.iter().any(|b| *b != 0))
}

fn to_hex(b: &[u8]) -> String {
    let mut s = String::with_capacity(b.len() * 2);
    push_hex(&mut s, b);
    s
}

const TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");
const TRACESTATE: HeaderName = HeaderName::from_static("tracestate");
const X_B3_TRACEID: HeaderName = HeaderName::from_static("x-b3-traceid");
/// B3 headers, replaced by W3C ones upstream.
static B3: [HeaderName; 6] = [
    X_B3_TRACEID,
    HeaderName::from_static("x-b3-spanid"),
    HeaderName::from_static("x-b3-parentspanid"),
    HeaderName::from_static("x-b3-sampled"),
    HeaderName::from_static("x-b3-flags"),
    HeaderName::from_static("b3"),
];

/// The caller's context from `traceparent`, else from B3 headers.
pub fn extract(headers: &HeaderMap) -> Option<Context> {
    let get = |n: &str| headers.get(n).and_then(|v| v.to_str().ok());
    if let Some(tp) = headers.get(&TRACEPARENT).and_then(|v| v.to_str().ok()) {
        let parts: Vec<&str> = tp.trim().split('-').collect();
        if parts.len() >= 4 && parts[0].len() == 2 && parts[0] != "ff" {
            let flags = u8::from_str_radix(parts[3], 16).ok()?;
            return Some(Context {
                trace_id: hex(parts[1])?,
                span_id: hex(parts[2])?,
                sampled: flags & 1 == 1,
            });
        }
        return None;
    }
    let trace = headers.get(&X_B3_TRACEID).and_then(|v| v.to_str().ok())?;
    // 64-bit B3 trace ids are padded to 128 bits.
    let trace = if trace.len() == 16 { format!("{:0>32}", trace) } else { trace.to_string() };
    let sampled = matches!(get("x-b3-sampled"), Some("1") | Some("true")) || get("x-b3-flags") == Some("1");
    Some(Context { trace_id: hex(&trace)?, span_id: hex(get("x-b3-spanid")?)?, sampled })
}

/// The waypoint's span for one request.
pub struct ServerSpan {
    pub ctx: Context,
    pub parent: Option<[u8; 8]>,
    pub trace_state: Option<String>,
    start: SystemTime,
}

impl ServerSpan {
    /// Starts a span as a child of the caller's context, or a new trace.
    pub fn start(headers: &HeaderMap, sampling_percent: f64) -> Self {
        let mut rng = rand::rng();
        let parent = extract(headers);
        let ctx = Context {
            trace_id: parent.as_ref().map_or_else(|| rng.random(), |p| p.trace_id),
            span_id: rng.random(),
            sampled: parent
                .as_ref()
                .map_or_else(|| rng.random_range(0.0..100.0) < sampling_percent, |p| p.sampled),
        };
        let trace_state = headers.get(&TRACESTATE).and_then(|v| v.to_str().ok()).map(str::to_string);
        Self { ctx, parent: parent.map(|p| p.span_id), trace_state, start: SystemTime::now() }
    }

    /// Sets the upstream request's context: our span is its parent. B3 headers are replaced
    /// by W3C ones.
    pub fn inject(&self, headers: &mut HeaderMap) {
        // `00-<32 hex>-<16 hex>-0x`, written in place.
        let mut tp = *b"00-00000000000000000000000000000000-0000000000000000-00";
        write_hex(&mut tp[3..35], &self.ctx.trace_id);
        write_hex(&mut tp[36..52], &self.ctx.span_id);
        if self.ctx.sampled {
            tp[54] = b'1';
        }
        if let Ok(v) = HeaderValue::from_bytes(&tp) {
            headers.insert(TRACEPARENT, v);
        }
        // One pass over the names finds whether there is any to remove (by prefix: comparing
        // every name with each of the six cost more than the rest of this function).
        if headers.keys().any(|n| n.as_str().starts_with("x-b3-") || n.as_str() == "b3") {
            for b3 in &B3 {
                headers.remove(b3);
            }
        }
    }

    /// The finished span, for export.
    pub fn finish(self, name: String, attributes: Vec<(&'static str, String)>, status_code: u16) -> Span {
        let nanos = |t: SystemTime| t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64);
        Span {
            trace_id: self.ctx.trace_id.to_vec(),
            span_id: self.ctx.span_id.to_vec(),
            trace_state: self.trace_state.unwrap_or_default(),
            parent_span_id: self.parent.map(|p| p.to_vec()).unwrap_or_default(),
            name,
            kind: span::SpanKind::Server as i32,
            start_time_unix_nano: nanos(self.start),
            end_time_unix_nano: nanos(SystemTime::now()),
            attributes: attributes
                .into_iter()
                .map(|(k, v)| KeyValue {
                    key: k.to_string(),
                    value: Some(AnyValue { value: Some(any_value::Value::StringValue(v)) }),
                })
                .collect(),
            status: Some(Status {
                message: String::new(),
                code: if status_code >= 500 || status_code == 0 {
                    status::StatusCode::Error as i32
                } else {
                    status::StatusCode::Unset as i32
                },
            }),
            flags: u32::from(self.ctx.sampled),
        }
    }
}

/// Where spans go: a bounded queue drained by the exporter task.
#[derive(Clone, Debug)]
pub struct Tracer {
    pub sampling_percent: f64,
    queue: Option<mpsc::Sender<Span>>,
}

impl Tracer {
    /// No export (spans are still propagated).
    pub fn disabled() -> Self {
        Self { sampling_percent: 0.0, queue: None }
    }

    /// Exports to `endpoint` (`http://host:4317`) as `service_name`.
    pub fn otlp(endpoint: String, service_name: String, sampling_percent: f64) -> Result<Self, String> {
        let channel = tonic::transport::Endpoint::from_shared(endpoint.clone())
            .map_err(|e| format!("OTLP endpoint {endpoint:?}: {e}"))?
            .connect_timeout(Duration::from_secs(5))
            .connect_lazy();
        let (tx, rx) = mpsc::channel(QUEUE);
        tokio::spawn(export(TraceServiceClient::new(channel), rx, service_name));
        Ok(Self { sampling_percent, queue: Some(tx) })
    }

    pub fn record(&self, span: Span) {
        debug!(trace = %to_hex(&span.trace_id), "span recorded");
        if let Some(q) = &self.queue
            && q.try_send(span).is_err()
        {
            debug!("span queue full; span dropped");
        }
    }

    pub fn enabled(&self) -> bool {
        self.queue.is_some()
    }
}

async fn export(
    mut client: TraceServiceClient<tonic::transport::Channel>,
    mut rx: mpsc::Receiver<Span>,
    service_name: String,
) {
    let resource = Resource {
        attributes: vec![KeyValue {
            key: "service.name".into(),
            value: Some(AnyValue { value: Some(any_value::Value::StringValue(service_name)) }),
        }],
    };
    loop {
        let Some(first) = rx.recv().await else { return };
        let mut batch = vec![first];
        let deadline = tokio::time::Instant::now() + FLUSH_EVERY;
        while batch.len() < 512 {
            match tokio::time::timeout_at(deadline, rx.recv()).await {
                Ok(Some(s)) => batch.push(s),
                _ => break,
            }
        }
        let request = ExportTraceServiceRequest {
            resource_spans: vec![ResourceSpans {
                resource: Some(resource.clone()),
                scope_spans: vec![ScopeSpans {
                    scope: Some(InstrumentationScope {
                        name: "waypoint".into(),
                        version: env!("CARGO_PKG_VERSION").into(),
                    }),
                    spans: batch,
                    schema_url: String::new(),
                }],
                schema_url: String::new(),
            }],
        };
        match client.export(request).await {
            Ok(_) => debug!("spans exported"),
            Err(e) => warn!(error = %e, "OTLP export failed; spans dropped"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn w3c_and_b3_contexts() {
        let mut h = HeaderMap::new();
        h.insert(
            "traceparent",
            HeaderValue::from_static("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"),
        );
        let c = extract(&h).expect("w3c");
        assert_eq!(to_hex(&c.trace_id), "0af7651916cd43dd8448eb211c80319c");
        assert_eq!(to_hex(&c.span_id), "b7ad6b7169203331");
        assert!(c.sampled);
        let mut b3 = HeaderMap::new();
        b3.insert("x-b3-traceid", HeaderValue::from_static("463ac35c9f6413ad"));
        b3.insert("x-b3-spanid", HeaderValue::from_static("a2fb4a1d1a96d312"));
        b3.insert("x-b3-sampled", HeaderValue::from_static("1"));
        let c = extract(&b3).expect("b3");
        assert_eq!(to_hex(&c.trace_id), "0000000000000000463ac35c9f6413ad");
        let mut bad = HeaderMap::new();
        bad.insert(
            "traceparent",
            HeaderValue::from_static("00-00000000000000000000000000000000-b7ad6b7169203331-01"),
        );
        assert!(extract(&bad).is_none(), "all-zero trace id is invalid");
        // The upstream context names our span as parent.
        let span = ServerSpan::start(&h, 0.0);
        let mut up = HeaderMap::new();
        span.inject(&mut up);
        let child = extract(&up).expect("injected");
        assert_eq!(child.trace_id, span.ctx.trace_id);
        assert_eq!(child.span_id, span.ctx.span_id);
        assert_eq!(span.parent.map(|p| to_hex(&p)).as_deref(), Some("b7ad6b7169203331"));
        // B3 headers do not go upstream beside the W3C ones, each of them alone included.
        for name in &B3 {
            let mut h = HeaderMap::new();
            h.insert(name.clone(), HeaderValue::from_static("1"));
            h.insert("x-kept", HeaderValue::from_static("1"));
            ServerSpan::start(&h, 0.0).inject(&mut h);
            assert!(h.get(name).is_none(), "{name} went upstream");
            assert!(h.get("x-kept").is_some() && h.get(&TRACEPARENT).is_some());
        }
    }
}
