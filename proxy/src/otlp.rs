//! Span export over OTLP/gRPC, to the collector the Mesh names.
//!
//! The trace layer hands finished spans to a bounded queue and never
//! waits: a full queue drops the span and counts it. A task sends the
//! spans in batches (up to 512, or what a second brings) with a 5 s
//! timeout. A collector that is down, slow or never answers costs dropped
//! spans, counted in `outrigger_spans_dropped_total{reason}`, and never a
//! failed or slower request.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use metrics::Counter;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_client::TraceServiceClient;
use opentelemetry_proto::tonic::common::v1::{AnyValue, InstrumentationScope, KeyValue, any_value};
use opentelemetry_proto::tonic::resource::v1::Resource;
use opentelemetry_proto::tonic::trace::v1::{
    ResourceSpans, ScopeSpans, Span, Status, span, status,
};
use outrigger_config::ResourceRef;
use tokio::sync::mpsc;
use tonic::transport::{Channel, Endpoint};

use crate::trace::{FinishedSpan, SpanKind};

pub const SPANS_DROPPED_TOTAL: &str = "outrigger_spans_dropped_total";
pub const SPANS_EXPORTED_TOTAL: &str = "outrigger_spans_exported_total";

/// Spans waiting for export; more are dropped.
const QUEUE: usize = 2048;
const BATCH: usize = 512;
/// A span waits at most this long for its batch to fill.
const FLUSH_AFTER: Duration = Duration::from_secs(1);
const EXPORT_TIMEOUT: Duration = Duration::from_secs(5);

/// Where spans go: a bounded queue in front of one collector.
#[derive(Debug)]
pub struct SpanSink {
    endpoint: String,
    workload: ResourceRef,
    queue: mpsc::Sender<FinishedSpan>,
    queue_full: Counter,
}

impl SpanSink {
    /// Starts the exporter task for `endpoint` (`http://host:port`). The
    /// connection is made lazily; a collector that is not there yet is
    /// not an error here.
    pub fn start(endpoint: &str, workload: &ResourceRef) -> Result<Self, String> {
        if endpoint.starts_with("https://") {
            return Err("https:// collectors are not supported yet; use http:// (a collector beside the sidecar, or a local agent)".to_string());
        }
        let channel = Endpoint::from_shared(endpoint.to_string())
            .map_err(|e| format!("not a usable endpoint: {e}"))?
            .connect_timeout(Duration::from_secs(1))
            .timeout(EXPORT_TIMEOUT)
            .connect_lazy();
        let (queue, spans) = mpsc::channel(QUEUE);
        tokio::spawn(export(
            spans,
            TraceServiceClient::new(channel),
            resource(workload),
        ));
        Ok(Self {
            endpoint: endpoint.to_string(),
            workload: workload.clone(),
            queue,
            queue_full: metrics::counter!(SPANS_DROPPED_TOTAL, "reason" => "queue-full"),
        })
    }

    pub fn is_for(&self, endpoint: &str, workload: &ResourceRef) -> bool {
        self.endpoint == endpoint && self.workload == *workload
    }

    /// Queues a span; drops it (counted) when the queue is full.
    pub fn record(&self, span: FinishedSpan) {
        if self.queue.try_send(span).is_err() {
            self.queue_full.increment(1);
        }
    }
}

/// The exporter task: batches and sends until every sender is gone.
async fn export(
    mut spans: mpsc::Receiver<FinishedSpan>,
    mut client: TraceServiceClient<Channel>,
    resource: Resource,
) {
    let failed = metrics::counter!(SPANS_DROPPED_TOTAL, "reason" => "export-failed");
    let exported = metrics::counter!(SPANS_EXPORTED_TOTAL);
    // Said once per outage, not once per batch.
    let mut failing = false;
    while let Some(first) = spans.recv().await {
        let mut batch = vec![to_proto(first)];
        let deadline = tokio::time::Instant::now() + FLUSH_AFTER;
        while batch.len() < BATCH {
            match tokio::time::timeout_at(deadline, spans.recv()).await {
                Ok(Some(span)) => batch.push(to_proto(span)),
                Ok(None) | Err(_) => break,
            }
        }
        let count = batch.len() as u64;
        let request = ExportTraceServiceRequest {
            resource_spans: vec![ResourceSpans {
                resource: Some(resource.clone()),
                scope_spans: vec![ScopeSpans {
                    scope: Some(InstrumentationScope {
                        name: "outrigger-proxy".to_string(),
                        version: env!("CARGO_PKG_VERSION").to_string(),
                        ..Default::default()
                    }),
                    spans: batch,
                    ..Default::default()
                }],
                ..Default::default()
            }],
        };
        let result = tokio::time::timeout(EXPORT_TIMEOUT, client.export(request)).await;
        match result {
            Ok(Ok(response)) => {
                let rejected = response
                    .into_inner()
                    .partial_success
                    .map_or(0, |p| u64::try_from(p.rejected_spans).unwrap_or(0));
                exported.increment(count.saturating_sub(rejected));
                failed.increment(rejected);
                if failing {
                    tracing::info!("span export works again");
                    failing = false;
                }
            }
            Ok(Err(error)) => {
                failed.increment(count);
                if !failing {
                    tracing::warn!(%error, "span export failed; dropping spans until it works");
                    failing = true;
                }
            }
            Err(_) => {
                failed.increment(count);
                if !failing {
                    tracing::warn!(
                        "span export timed out after {EXPORT_TIMEOUT:?}; dropping spans until it works"
                    );
                    failing = true;
                }
            }
        }
    }
}

fn resource(workload: &ResourceRef) -> Resource {
    Resource {
        attributes: vec![
            string("service.name", &workload.name),
            string("service.namespace", &workload.namespace),
            string("outrigger.workload", &workload.to_string()),
        ],
        ..Default::default()
    }
}

fn to_proto(s: FinishedSpan) -> Span {
    let mut attributes = vec![
        string("http.request.method", &s.method),
        string("url.path", &s.path),
        int("http.response.status_code", i64::from(s.status)),
        string("outrigger.request_id", &s.request_id),
    ];
    match s.kind {
        SpanKind::Client => attributes.push(string("outrigger.service", &s.target)),
        SpanKind::Server => attributes.push(string("outrigger.workload", &s.target)),
    }
    if let Some(peer) = &s.peer {
        attributes.push(string("outrigger.peer.identity", peer));
    }
    if let Some(upstream) = s.upstream {
        attributes.push(string("server.address", &upstream.ip().to_string()));
        attributes.push(int("server.port", i64::from(upstream.port())));
    }
    if s.attempts > 0 {
        attributes.push(int("outrigger.retry.attempts", i64::from(s.attempts)));
    }
    if let Some(error) = &s.proxy_error {
        attributes.push(string("outrigger.error", error));
    }
    // Semantic conventions: a 5xx is an error on both sides; a 4xx only
    // on the client's.
    let is_error = s.status >= 500 || (s.kind == SpanKind::Client && s.status >= 400);
    Span {
        trace_id: s.context.trace_id.bytes.to_vec(),
        span_id: s.context.span_id.to_vec(),
        trace_state: s.tracestate.unwrap_or_default(),
        parent_span_id: s
            .context
            .parent_span_id
            .map(|p| p.to_vec())
            .unwrap_or_default(),
        flags: if s.context.sampled { 1 } else { 0 },
        name: s.name,
        kind: match s.kind {
            SpanKind::Server => span::SpanKind::Server,
            SpanKind::Client => span::SpanKind::Client,
        } as i32,
        start_time_unix_nano: unix_nanos(s.start),
        end_time_unix_nano: unix_nanos(s.end),
        attributes,
        status: Some(Status {
            code: if is_error {
                status::StatusCode::Error
            } else {
                status::StatusCode::Unset
            } as i32,
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn unix_nanos(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

fn string(key: &str, value: &str) -> KeyValue {
    KeyValue {
        key: key.to_string(),
        value: Some(AnyValue {
            value: Some(any_value::Value::StringValue(value.to_string())),
        }),
        ..Default::default()
    }
}

fn int(key: &str, value: i64) -> KeyValue {
    KeyValue {
        key: key.to_string(),
        value: Some(AnyValue {
            value: Some(any_value::Value::IntValue(value)),
        }),
        ..Default::default()
    }
}
