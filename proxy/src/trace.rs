//! The trace layer, on both stacks: every request gets a span context
//! (`trace_context.rs`) and an `x-request-id`. A sampled request's span
//! goes to the OTLP exporter (`otlp.rs`) when the mesh names a collector.
//!
//! Outbound spans are CLIENT spans and inbound ones SERVER spans. With
//! the usual semantic-convention attributes: method, path, status, the
//! Service, the peer's SPIFFE ID, the upstream endpoint, the attempts.
//!
//! The sampling rate and the collector come from the Mesh's `tracing`
//! settings and change hot ([`Tracing::configure`]). A request that is not
//! sampled costs a header parse and write, and nothing is recorded.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::SystemTime;

use arc_swap::ArcSwapOption;
use http::header::{HeaderMap, HeaderName, HeaderValue};
use http::{Request, Response};
use outrigger_config::{ResourceRef, TracingSettings};
use tower::{Layer, Service};

use crate::access_log::AccessLog;
use crate::http::PeerId;
use crate::http::body::ProxyBody;
use crate::otlp::SpanSink;
use crate::random::random_u64;
use crate::trace_context::{self, SpanContext, TRACESTATE};

pub const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

// === Settings, shared and hot ===

/// The sampling rate and the exporter every trace layer uses now.
#[derive(Debug, Default)]
pub struct Tracing {
    /// f64 bits; 0..=100.
    sampling_percent: AtomicU64,
    sink: ArcSwapOption<SpanSink>,
    /// Set at start from the command line; `None`: off.
    access_log: Option<AccessLog>,
}

impl Tracing {
    pub fn new(access_log: Option<AccessLog>) -> Arc<Self> {
        Arc::new(Self {
            sampling_percent: AtomicU64::new(1.0f64.to_bits()),
            sink: ArcSwapOption::empty(),
            access_log,
        })
    }

    fn sampling_percent(&self) -> f64 {
        f64::from_bits(self.sampling_percent.load(Relaxed))
    }

    /// Takes the Mesh's tracing settings: a new rate applies to the next
    /// request, a new collector gets a new exporter (the old one sends
    /// what it has queued, then stops).
    pub fn configure(&self, settings: &TracingSettings, workload: &ResourceRef) {
        self.sampling_percent
            .store(settings.sampling_percent.to_bits(), Relaxed);
        let current = self.sink.load();
        let unchanged = match (current.as_deref(), &settings.otlp_endpoint) {
            (Some(sink), Some(endpoint)) => sink.is_for(endpoint, workload),
            (None, None) => true,
            _ => false,
        };
        if unchanged {
            return;
        }
        let next = settings.otlp_endpoint.as_ref().and_then(|endpoint| {
            match SpanSink::start(endpoint, workload) {
                Ok(sink) => {
                    tracing::info!(%endpoint, "exporting spans over OTLP/gRPC");
                    Some(Arc::new(sink))
                }
                Err(e) => {
                    tracing::warn!(%endpoint, "spans are not exported: {e}");
                    None
                }
            }
        });
        self.sink.store(next);
    }
}

// === Notes from lower layers ===

/// What the layers below learn about a sampled request (the endpoint it
/// went to, the attempts it took), put in its extensions only when it is
/// sampled, so other requests pay nothing.
#[derive(Debug, Default)]
pub struct SpanNotes {
    upstream: Mutex<Option<SocketAddr>>,
    attempts: AtomicU32,
}

impl SpanNotes {
    pub fn upstream(&self, addr: SocketAddr) {
        *self.upstream.lock().unwrap_or_else(PoisonError::into_inner) = Some(addr);
    }

    pub fn attempt(&self, n: u32) {
        self.attempts.store(n, Relaxed);
    }
}

// === Layer ===

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SpanKind {
    /// Inbound: this sidecar serves the request.
    Server,
    /// Outbound: this sidecar calls a Service.
    Client,
}

#[derive(Clone, Debug)]
pub struct TraceLayer {
    tracing: Arc<Tracing>,
    kind: SpanKind,
    /// The Service (outbound) or workload (inbound).
    target: Arc<str>,
}

impl TraceLayer {
    pub fn new(tracing: Arc<Tracing>, kind: SpanKind, target: Arc<str>) -> Self {
        Self {
            tracing,
            kind,
            target,
        }
    }
}

impl<S> Layer<S> for TraceLayer {
    type Service = Trace<S>;
    fn layer(&self, inner: S) -> Trace<S> {
        Trace {
            inner,
            layer: self.clone(),
        }
    }
}

#[derive(Clone, Debug)]
pub struct Trace<S> {
    inner: S,
    layer: TraceLayer,
}

type ResponseFuture = Pin<Box<dyn Future<Output = Result<Response<ProxyBody>, Infallible>> + Send>>;
/// The inner future as it is when nothing is recorded (most requests),
/// boxed only when a span or a log line is.
type TraceFuture<F> = futures_util::future::Either<F, ResponseFuture>;

impl<S, B> Service<Request<B>> for Trace<S>
where
    S: Service<Request<B>, Response = Response<ProxyBody>, Error = Infallible>,
    S::Future: Send + 'static,
{
    type Response = Response<ProxyBody>;
    type Error = Infallible;
    type Future = TraceFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<B>) -> Self::Future {
        use futures_util::future::Either;
        let tracing = &self.layer.tracing;
        let parent = trace_context::extract(req.headers());
        let span = SpanContext::start(parent.as_ref(), tracing.sampling_percent());
        trace_context::inject(req.headers_mut(), &span);
        ensure_request_id(req.headers_mut());
        let sink = tracing.sink.load_full().filter(|_| span.sampled);
        let logged = tracing.access_log.as_ref().is_some_and(AccessLog::sampled);
        if sink.is_none() && !logged {
            return Either::Left(self.inner.call(req));
        }
        let tracing = tracing.clone();
        let request_id = request_id(req.headers());
        let notes = Arc::new(SpanNotes::default());
        req.extensions_mut().insert(notes.clone());
        let started = SystemTime::now();
        let method = req.method().to_string();
        let path = req.uri().path().to_string();
        let tracestate = req
            .headers()
            .get(&TRACESTATE)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let peer = req.extensions().get::<PeerId>().map(|p| p.0.clone());
        let kind = self.layer.kind;
        let target = self.layer.target.clone();
        let fut = self.inner.call(req);
        Either::Right(Box::pin(async move {
            let rsp = fut.await?;
            let status = rsp.status().as_u16();
            let proxy_error = rsp
                .headers()
                .get(crate::errors::PROXY_ERROR_HEADER)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string);
            let upstream = *notes
                .upstream
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            let finished = FinishedSpan {
                context: span,
                tracestate,
                kind,
                name: method.clone(),
                start: started,
                end: SystemTime::now(),
                method,
                path,
                status,
                target,
                peer,
                upstream,
                attempts: notes.attempts.load(Relaxed),
                request_id,
                proxy_error,
            };
            if logged && let Some(log) = &tracing.access_log {
                let direction = match kind {
                    SpanKind::Server => "inbound",
                    SpanKind::Client => "outbound",
                };
                log.write(direction, &finished);
            }
            if let Some(sink) = sink {
                sink.record(finished);
            }
            Ok(rsp)
        }))
    }
}

/// A finished span, as the exporter needs it.
#[derive(Debug)]
pub struct FinishedSpan {
    pub context: SpanContext,
    pub tracestate: Option<String>,
    pub kind: SpanKind,
    pub name: String,
    pub start: SystemTime,
    pub end: SystemTime,
    pub method: String,
    pub path: String,
    pub status: u16,
    pub target: Arc<str>,
    /// The caller's SPIFFE ID (inbound, over mTLS).
    pub peer: Option<Arc<str>>,
    /// The endpoint the (last) attempt went to.
    pub upstream: Option<SocketAddr>,
    /// Attempts with a retry policy (0: no policy).
    pub attempts: u32,
    pub request_id: String,
    /// `x-outrigger-error` when the sidecar made the response itself.
    pub proxy_error: Option<String>,
}

/// Makes sure the request has a good `x-request-id`: kept when it is
/// well-formed (1 to 128 of `A-Z a-z 0-9 - _ . :`), otherwise replaced by
/// a new random UUID.
fn ensure_request_id(headers: &mut HeaderMap) {
    let good = headers.get(&REQUEST_ID).is_some_and(|id| {
        (1..=128).contains(&id.len())
            && id
                .as_bytes()
                .iter()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b':'))
    });
    if good {
        return;
    }
    let mut bytes = [0u8; 16];
    bytes[..8].copy_from_slice(&random_u64().to_be_bytes());
    bytes[8..].copy_from_slice(&random_u64().to_be_bytes());
    // Version 4, RFC 4122 variant: looks like any other UUID to a log tool.
    bytes[6] = (bytes[6] & 0x0f) | 0x40;
    bytes[8] = (bytes[8] & 0x3f) | 0x80;
    let mut id = *b"00000000-0000-0000-0000-000000000000";
    let groups = [
        (0..8, 0..4),
        (9..13, 4..6),
        (14..18, 6..8),
        (19..23, 8..10),
        (24..36, 10..16),
    ];
    for (text, part) in groups {
        trace_context::write_hex(&mut id[text], &bytes[part]);
    }
    if let Ok(mut value) = HeaderValue::from_bytes(&id) {
        // New on every request: not worth an HPACK table entry.
        value.set_sensitive(true);
        headers.insert(REQUEST_ID, value);
    }
}

fn request_id(headers: &HeaderMap) -> String {
    headers
        .get(&REQUEST_ID)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn well_formed_request_ids_are_kept_and_others_replaced() {
        let mut headers = HeaderMap::new();
        headers.insert(REQUEST_ID, HeaderValue::from_static("abc-123_x.y:z"));
        ensure_request_id(&mut headers);
        assert_eq!(request_id(&headers), "abc-123_x.y:z");

        for bad in ["has space", "", "a\tb"] {
            let mut headers = HeaderMap::new();
            if let Ok(v) = HeaderValue::from_str(bad) {
                headers.insert(REQUEST_ID, v);
            }
            ensure_request_id(&mut headers);
            let id = request_id(&headers);
            assert_eq!(id.len(), 36, "{id}");
            assert_eq!(&id[14..15], "4", "version 4: {id}");
            assert!(
                matches!(&id[19..20], "8" | "9" | "a" | "b"),
                "variant: {id}"
            );
            assert_eq!(id.matches('-').count(), 4, "{id}");
        }
        let mut long = HeaderMap::new();
        long.insert(
            REQUEST_ID,
            HeaderValue::from_str(&"a".repeat(129)).expect("value"),
        );
        ensure_request_id(&mut long);
        assert_eq!(request_id(&long).len(), 36);
    }
}
