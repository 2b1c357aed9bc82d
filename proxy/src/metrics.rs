//! Prometheus metrics, recorded through the `metrics` facade.
//!
//! Handles are registered once per listener and status class when the
//! stack is built, so recording a request is a few atomic operations: no
//! label formatting or map lookups on the hot path. Label values are
//! bounded: a direction, a configured service or workload name, a status
//! class.

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::Instant;

use arc_swap::ArcSwap;
use http::Response;

use crate::http::PeerId;
use metrics::{Counter, Gauge, Histogram};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use tower::{Layer, Service};

pub const REQUESTS_TOTAL: &str = "outrigger_requests_total";
pub const REQUEST_DURATION: &str = "outrigger_request_duration_seconds";
pub const REQUEST_SIZE: &str = "outrigger_request_size_bytes";
pub const RESPONSE_SIZE: &str = "outrigger_response_size_bytes";
pub const REQUESTS_BY_IDENTITY: &str = "outrigger_inbound_requests_by_identity_total";
pub const OPEN_CONNECTIONS: &str = "outrigger_open_connections";
pub const CONNECTIONS_TOTAL: &str = "outrigger_connections_total";
pub const TCP_BYTES_TOTAL: &str = "outrigger_tcp_bytes_total";
pub const CONFIG_INFO: &str = "outrigger_config_info";
pub const POLICY_STREAM_CONNECTED: &str = "outrigger_policy_stream_connected";
pub const POLICY_PUSHES_TOTAL: &str = "outrigger_policy_pushes_total";
pub const POLICY_ACKS_TOTAL: &str = "outrigger_policy_acks_total";
pub const POLICY_NACKS_TOTAL: &str = "outrigger_policy_nacks_total";
pub const TLS_HANDSHAKES_TOTAL: &str = "outrigger_tls_handshakes_total";
pub const CERT_EXPIRY: &str = "outrigger_identity_cert_expiry_timestamp_seconds";
pub const CERT_RENEWALS_TOTAL: &str = "outrigger_identity_renewals_total";

/// Size buckets in bytes, from 64 B to 16 MiB.
const SIZE_BUCKETS: &[f64] = &[
    64.0, 256.0, 1024.0, 4096.0, 16384.0, 65536.0, 262144.0, 1048576.0, 4194304.0, 16777216.0,
];

/// Distinct caller identities counted per inbound listener; more are
/// counted as `other`, so a flood of identities cannot blow up the series.
const MAX_IDENTITIES: usize = 256;

/// Latency buckets in seconds, from 100 µs (a local hop) to 30 s.
const LATENCY_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0, 30.0,
];

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// Installs the process-wide Prometheus recorder (once) and returns the
/// handle `/metrics` renders from.
pub fn install() -> PrometheusHandle {
    HANDLE
        .get_or_init(|| {
            let recorder = PrometheusBuilder::new()
                .set_buckets_for_metric(
                    metrics_exporter_prometheus::Matcher::Full(REQUEST_DURATION.to_string()),
                    LATENCY_BUCKETS,
                )
                .and_then(|b| {
                    b.set_buckets_for_metric(
                        metrics_exporter_prometheus::Matcher::Suffix("_size_bytes".to_string()),
                        SIZE_BUCKETS,
                    )
                })
                .map(|b| b.build_recorder())
                .unwrap_or_else(|_| PrometheusBuilder::new().build_recorder());
            let handle = recorder.handle();
            if metrics::set_global_recorder(recorder).is_err() {
                tracing::warn!("a metrics recorder was already installed; /metrics may be empty");
            }
            describe();
            handle
        })
        .clone()
}

fn describe() {
    use crate::{access_log, authz, balance, circuit, egress, otlp, retry};
    let counters = [
        (retry::RETRIES_TOTAL, "Retries sent, by service and reason"),
        (
            retry::BUDGET_EXHAUSTED_TOTAL,
            "Retries the retry budget refused",
        ),
        (
            circuit::OVERFLOW_TOTAL,
            "Requests refused at a circuit-breaker limit, by limit",
        ),
        (
            balance::EJECTIONS_TOTAL,
            "Endpoints ejected by outlier detection",
        ),
        (
            authz::DENIED_TOTAL,
            "Inbound requests and connections authorization refused",
        ),
        (
            egress::DENIED_TOTAL,
            "Requests to hosts the workload does not declare, refused",
        ),
        (otlp::SPANS_EXPORTED_TOTAL, "Spans the collector accepted"),
        (
            otlp::SPANS_DROPPED_TOTAL,
            "Spans dropped: queue full or export failed",
        ),
        (
            access_log::DROPPED_TOTAL,
            "Access log lines dropped (queue full)",
        ),
    ];
    for (name, help) in counters {
        metrics::describe_counter!(name, help);
    }
    metrics::describe_gauge!(balance::EJECTED_ENDPOINTS, "Endpoints ejected now");
    metrics::describe_gauge!(
        balance::CIRCUIT_OPEN,
        "1 while every endpoint of the service is ejected (requests fail fast)"
    );
    metrics::describe_histogram!(
        REQUEST_SIZE,
        metrics::Unit::Bytes,
        "Request body sizes, when known up front (Content-Length)"
    );
    metrics::describe_histogram!(
        RESPONSE_SIZE,
        metrics::Unit::Bytes,
        "Response body sizes, when known up front (Content-Length)"
    );
    metrics::describe_counter!(
        REQUESTS_BY_IDENTITY,
        "Inbound requests by the caller's verified SPIFFE ID (none without mTLS; other past 256 identities)"
    );
    metrics::describe_counter!(
        REQUESTS_TOTAL,
        "HTTP requests handled, by direction, service and status class"
    );
    metrics::describe_histogram!(
        REQUEST_DURATION,
        metrics::Unit::Seconds,
        "Time from request to response headers, by direction, service and status class"
    );
    metrics::describe_gauge!(
        OPEN_CONNECTIONS,
        "Open downstream connections, by direction and listener"
    );
    metrics::describe_counter!(
        CONNECTIONS_TOTAL,
        "Accepted downstream connections, by direction and listener"
    );
    metrics::describe_counter!(
        TCP_BYTES_TOTAL,
        "Bytes carried by opaque TCP listeners, by direction, listener and flow"
    );
    metrics::describe_counter!(
        TLS_HANDSHAKES_TOTAL,
        "mTLS handshakes, by direction, result (ok, failed) and failure reason"
    );
    metrics::describe_counter!(
        CERT_RENEWALS_TOTAL,
        "Certificate requests to the control plane, by result (ok, failed)"
    );
    metrics::describe_gauge!(
        CERT_EXPIRY,
        "When this sidecar's certificate expires (Unix seconds)"
    );
    metrics::describe_gauge!(
        CONFIG_INFO,
        "1, labelled with the version of the running configuration"
    );
    metrics::describe_gauge!(
        POLICY_STREAM_CONNECTED,
        "1 while the policy stream to the control plane is open"
    );
    metrics::describe_counter!(
        POLICY_PUSHES_TOTAL,
        "Snapshots received from the control plane"
    );
    metrics::describe_counter!(POLICY_ACKS_TOTAL, "Snapshots applied (ACK)");
    metrics::describe_counter!(POLICY_NACKS_TOTAL, "Snapshots refused (NACK)");
}

/// Status classes a response can fall in; index into the handle arrays.
const CLASSES: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];

fn class_index(status: http::StatusCode) -> usize {
    (status.as_u16() / 100).clamp(1, 5) as usize - 1
}

/// Request counters by status class, for each caller identity seen.
type IdentityCounters = HashMap<Arc<str>, Arc<[Counter; 5]>>;

/// Per-listener request metrics.
#[derive(Debug)]
pub struct RequestMetrics {
    service: String,
    totals: [Counter; 5],
    durations: [Histogram; 5],
    request_sizes: Histogram,
    response_sizes: Histogram,
    /// Inbound only: requests by the caller's verified SPIFFE ID.
    by_identity: Option<ArcSwap<IdentityCounters>>,
    /// Inbound only: requests without a verified caller (no mTLS).
    unidentified: Option<[Counter; 5]>,
}

impl RequestMetrics {
    pub fn new(direction: &'static str, service: &str) -> Arc<Self> {
        let name = service.to_string();
        let totals = CLASSES.map(|class| {
            metrics::counter!(REQUESTS_TOTAL, "direction" => direction, "service" => name.clone(), "status_class" => class)
        });
        let durations = CLASSES.map(|class| {
            metrics::histogram!(REQUEST_DURATION, "direction" => direction, "service" => name.clone(), "status_class" => class)
        });
        Arc::new(Self {
            request_sizes: metrics::histogram!(REQUEST_SIZE, "direction" => direction, "service" => name.clone()),
            response_sizes: metrics::histogram!(RESPONSE_SIZE, "direction" => direction, "service" => name.clone()),
            by_identity: (direction == "inbound").then(ArcSwap::default),
            unidentified: (direction == "inbound").then(|| {
                CLASSES.map(|class| {
                    metrics::counter!(REQUESTS_BY_IDENTITY, "service" => name.clone(), "identity" => "none", "status_class" => class)
                })
            }),
            service: name,
            totals,
            durations,
        })
    }

    fn record(&self, status: http::StatusCode, start: Instant, identity: Option<&Arc<str>>) {
        let i = class_index(status);
        self.totals[i].increment(1);
        self.durations[i].record(start.elapsed().as_secs_f64());
        match identity {
            Some(identity) => {
                if let Some(counters) = self.identity_counters(identity) {
                    counters[i].increment(1);
                }
            }
            None => {
                if let Some(counters) = &self.unidentified {
                    counters[i].increment(1);
                }
            }
        }
    }

    /// The counters for a caller: a lock-free read; the first request from
    /// a new identity registers them (copy on write, rare).
    fn identity_counters(&self, identity: &Arc<str>) -> Option<Arc<[Counter; 5]>> {
        let cache = self.by_identity.as_ref()?;
        if let Some(counters) = cache.load().get(identity) {
            return Some(counters.clone());
        }
        let key = identity.clone();
        let mut added = None;
        cache.rcu(|current| {
            let mut next = HashMap::clone(current);
            let key = if next.len() >= MAX_IDENTITIES && !next.contains_key(&key) {
                Arc::from("other")
            } else {
                key.clone()
            };
            let counters = next
                .entry(key.clone())
                .or_insert_with(|| {
                    Arc::new(CLASSES.map(|class| {
                        metrics::counter!(REQUESTS_BY_IDENTITY, "service" => self.service.clone(), "identity" => key.to_string(), "status_class" => class)
                    }))
                })
                .clone();
            added = Some(counters);
            next
        });
        added
    }
}

/// Per-listener connection metrics.
#[derive(Clone, Debug)]
pub struct ConnectionMetrics {
    pub open: Gauge,
    pub total: Counter,
}

impl ConnectionMetrics {
    pub fn new(direction: &'static str, listener: &str) -> Self {
        let listener = listener.to_string();
        Self {
            open: metrics::gauge!(OPEN_CONNECTIONS, "direction" => direction, "listener" => listener.clone()),
            total: metrics::counter!(CONNECTIONS_TOTAL, "direction" => direction, "listener" => listener),
        }
    }
}

// === MetricsLayer ===

#[derive(Clone, Debug)]
pub struct MetricsLayer {
    metrics: Arc<RequestMetrics>,
}

impl MetricsLayer {
    pub fn new(metrics: Arc<RequestMetrics>) -> Self {
        Self { metrics }
    }
}

#[derive(Clone, Debug)]
pub struct Metrics<S> {
    inner: S,
    metrics: Arc<RequestMetrics>,
}

impl<S> Layer<S> for MetricsLayer {
    type Service = Metrics<S>;
    fn layer(&self, inner: S) -> Metrics<S> {
        Metrics {
            inner,
            metrics: self.metrics.clone(),
        }
    }
}

impl<S, ReqB, B> Service<http::Request<ReqB>> for Metrics<S>
where
    S: Service<http::Request<ReqB>, Response = Response<B>, Error = Infallible>,
    S::Future: Send + 'static,
    ReqB: http_body::Body,
    B: http_body::Body,
{
    type Response = Response<B>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Response<B>, Infallible>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<ReqB>) -> Self::Future {
        let start = Instant::now();
        let metrics = self.metrics.clone();
        // Sizes are known up front for most bodies (Content-Length); a
        // streamed body of unknown length is not in the size histograms.
        if let Some(size) = req.body().size_hint().exact() {
            metrics.request_sizes.record(size as f64);
        }
        let identity = req.extensions().get::<PeerId>().map(|p| p.0.clone());
        let fut = self.inner.call(req);
        Box::pin(async move {
            let rsp = fut.await?;
            if let Some(size) = rsp.body().size_hint().exact() {
                metrics.response_sizes.record(size as f64);
            }
            metrics.record(rsp.status(), start, identity.as_ref());
            Ok(rsp)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_classes() {
        assert_eq!(CLASSES[class_index(http::StatusCode::OK)], "2xx");
        assert_eq!(CLASSES[class_index(http::StatusCode::CONTINUE)], "1xx");
        assert_eq!(
            CLASSES[class_index(http::StatusCode::GATEWAY_TIMEOUT)],
            "5xx"
        );
        assert_eq!(CLASSES[class_index(http::StatusCode::NOT_FOUND)], "4xx");
    }
}
