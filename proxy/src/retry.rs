//! Retries: a request that failed in a way the TrafficPolicy's `retryOn`
//! names is sent again, up to `attempts` in all, within a budget.
//!
//! - **Which requests:** GET, HEAD, OPTIONS, PUT, DELETE and TRACE (the
//!   idempotent ones). POST and PATCH only with `retryNonIdempotent:
//!   true`, since a replayed payment is worse than a failed one, with two
//!   exceptions that are safe for any method: a refused connection
//!   (nothing was sent), and a gRPC call failing with a code the policy
//!   lists in `retriableGrpcCodes` (every gRPC call is a POST; listing
//!   the code is the opt-in). Upgrades are never retried.
//! - **Bodies** stream to the first attempt as they arrive, and a copy of
//!   up to [`REPLAY_LIMIT`] is kept for the next one. A larger body is not
//!   retried: its copy is dropped once it passes the limit.
//! - **The budget** is tower's `TpsBudget`, as in Linkerd: every request
//!   deposits, every retry withdraws. Retries stay within `ratio` of the
//!   requests over `window`, plus `minRetriesPerSecond`. A failing service
//!   gets little more than its normal load, never attempts × it.
//! - **Backoff:** "full jitter". Before retry n the wait is random in
//!   [0, min(maxInterval, baseInterval × 2^(n-1))].
//! - **Per try:** `perTryTimeout` bounds each attempt. The request
//!   timeout (the layer above) bounds them all, backoffs included.
//! - **What the upstream sees:** each attempt carries
//!   `x-outrigger-retry-attempt: <n>` (1 for the first).
//!
//! Conditions, by `retryOn`:
//!
//! | condition | retries |
//! |---|---|
//! | `5xx` | any 5xx, a refused connection, a reset, a per-try timeout |
//! | `gateway-error` | 502, 503, 504, a refused connection, a reset, a per-try timeout |
//! | `connect-failure` | a refused connection (nothing was sent) |
//! | `reset` | the connection failed mid-request |
//! | `retriableStatusCodes` | those statuses |
//! | `retriableGrpcCodes` | a response whose headers carry one of those `grpc-status` codes (a trailers-only gRPC error) |
//!
//! A 503 the sidecar makes itself because of the circuit breaker or
//! ejected endpoints is never retried: it means "back off".

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, Method, Request, Response, header};
use http_body::{Body, Frame, SizeHint};
use metrics::Counter;
use outrigger_config::{RetryBudget, RetryOn, RetryPolicy};
use tower::retry::budget::{Budget as _, TpsBudget};
use tower::{Layer, Service, ServiceExt};

use crate::BoxError;
use crate::errors::ProxyError;
use crate::forward::SharedDestination;
use crate::http::body::ProxyBody;
use crate::random::random_below;
use crate::trace::SpanNotes;
use crate::transport::ClientTransport;

/// Request bodies up to this size are kept so they can be sent again.
pub const REPLAY_LIMIT: usize = 64 * 1024;

pub const ATTEMPT_HEADER: HeaderName = HeaderName::from_static("x-outrigger-retry-attempt");
pub const RETRIES_TOTAL: &str = "outrigger_retries_total";
pub const BUDGET_EXHAUSTED_TOTAL: &str = "outrigger_retry_budget_exhausted_total";

// === Budget ===

/// A destination's retry budget.
#[derive(Debug)]
pub struct Budget {
    settings: RetryBudget,
    tps: TpsBudget,
}

impl Budget {
    pub fn new(settings: &RetryBudget) -> Self {
        // TpsBudget asserts these ranges; validation keeps to them, and
        // clamping keeps the sidecar up whatever it is given.
        let window = settings
            .window
            .clamp(Duration::from_secs(1), Duration::from_secs(60));
        let min_per_sec = settings.min_retries_per_second.min(1_000_000);
        let ratio = settings.ratio.clamp(0.0, 1.0) as f32;
        Self {
            settings: settings.clone(),
            tps: TpsBudget::new(window, min_per_sec, ratio),
        }
    }

    pub fn settings(&self) -> &RetryBudget {
        &self.settings
    }
}

// === Layer ===

/// Retries per the destination's TrafficPolicy, read once per request.
#[derive(Debug)]
pub struct RetryLayer<T: ClientTransport> {
    destination: SharedDestination<T>,
    metrics: Arc<RetryMetrics>,
}

impl<T: ClientTransport> RetryLayer<T> {
    pub fn new(destination: SharedDestination<T>, service: &str) -> Self {
        Self {
            destination,
            metrics: Arc::new(RetryMetrics::new(service)),
        }
    }
}

impl<T: ClientTransport, S> Layer<S> for RetryLayer<T> {
    type Service = Retry<S, T>;
    fn layer(&self, inner: S) -> Retry<S, T> {
        Retry {
            inner,
            destination: self.destination.clone(),
            metrics: self.metrics.clone(),
        }
    }
}

#[derive(Debug)]
struct RetryMetrics {
    /// One counter per reason, made once.
    by_reason: [(Reason, Counter); 6],
    budget_exhausted: Counter,
}

impl RetryMetrics {
    fn new(service: &str) -> Self {
        let counter = |reason: Reason| {
            (
                reason,
                metrics::counter!(RETRIES_TOTAL, "service" => service.to_string(), "reason" => reason.label()),
            )
        };
        Self {
            by_reason: [
                counter(Reason::Status),
                counter(Reason::ConnectFailure),
                counter(Reason::Reset),
                counter(Reason::Timeout),
                counter(Reason::RetriableStatus),
                counter(Reason::GrpcStatus),
            ],
            budget_exhausted: metrics::counter!(BUDGET_EXHAUSTED_TOTAL, "service" => service.to_string()),
        }
    }

    fn retried(&self, reason: Reason) {
        if let Some((_, counter)) = self.by_reason.iter().find(|(r, _)| *r == reason) {
            counter.increment(1);
        }
    }
}

#[derive(Debug)]
pub struct Retry<S, T: ClientTransport> {
    inner: S,
    destination: SharedDestination<T>,
    metrics: Arc<RetryMetrics>,
}

impl<S: Clone, T: ClientTransport> Clone for Retry<S, T> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
            destination: self.destination.clone(),
            metrics: self.metrics.clone(),
        }
    }
}

type ResponseFuture = Pin<Box<dyn Future<Output = Result<Response<ProxyBody>, BoxError>> + Send>>;

impl<S, T, B> Service<Request<B>> for Retry<S, T>
where
    T: ClientTransport,
    S: Service<Request<AttemptBody<B>>, Response = Response<ProxyBody>, Error = BoxError>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    B: Body<Data = Bytes> + Send + Unpin + 'static,
    B::Error: Into<BoxError>,
{
    type Response = Response<ProxyBody>;
    type Error = BoxError;
    /// Without a retry policy, the inner future as it is (no box).
    type Future = futures_util::future::Either<S::Future, ResponseFuture>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        use futures_util::future::Either;
        let dest = self.destination.load();
        let (Some(policy), Some(budget)) = (dest.policy.retries.clone(), dest.budget.clone())
        else {
            return Either::Left(self.inner.call(req.map(AttemptBody::once)));
        };
        let service: Arc<str> = dest.name.clone();
        let per_try = dest.per_try_timeout(req.uri().path());
        drop(dest);
        budget.tps.deposit();
        let allowed = Allowed {
            any: is_idempotent(req.method()) || policy.retry_non_idempotent,
            grpc: is_grpc(req.headers()),
        };
        let replayable = !req.headers().contains_key(header::UPGRADE);
        // The service was made ready for this call; later attempts wait
        // for readiness on a clone.
        let first = self.inner.clone();
        let inner = std::mem::replace(&mut self.inner, first);
        let metrics = self.metrics.clone();
        Either::Right(Box::pin(attempts(
            inner,
            req,
            Attempts {
                policy,
                per_try,
                budget,
                replayable,
                allowed,
                service,
                metrics,
            },
        )))
    }
}

/// Which retries a request may have, by what it is.
#[derive(Clone, Copy, Debug)]
struct Allowed {
    /// An idempotent method, or the policy opts in to the others.
    any: bool,
    /// A gRPC call: the policy's gRPC codes are retried whatever the method.
    grpc: bool,
}

impl Allowed {
    fn permits(self, reason: Reason) -> bool {
        self.any || reason == Reason::ConnectFailure || (self.grpc && reason == Reason::GrpcStatus)
    }
}

struct Attempts {
    policy: Arc<RetryPolicy>,
    allowed: Allowed,
    /// For this request's path.
    per_try: Option<Duration>,
    budget: Arc<Budget>,
    replayable: bool,
    service: Arc<str>,
    metrics: Arc<RetryMetrics>,
}

async fn attempts<S, B>(
    mut inner: S,
    req: Request<B>,
    a: Attempts,
) -> Result<Response<ProxyBody>, BoxError>
where
    S: Service<Request<AttemptBody<B>>, Response = Response<ProxyBody>, Error = BoxError>,
    B: Body<Data = Bytes> + Send + Unpin + 'static,
    B::Error: Into<BoxError>,
{
    let per_try = a.per_try;
    let (parts, body) = req.into_parts();
    let notes = parts.extensions.get::<Arc<SpanNotes>>().cloned();
    let note = |attempt: u32| {
        if let Some(notes) = &notes {
            notes.attempt(attempt);
        }
    };
    if !a.replayable {
        let mut req = Request::from_parts(parts, AttemptBody::once(body));
        req.headers_mut()
            .insert(ATTEMPT_HEADER, HeaderValue::from_static("1"));
        note(1);
        return try_once(&mut inner, req, per_try, &a.service).await;
    }
    let replay = Replay::new(body);
    let mut attempt: u32 = 1;
    loop {
        let mut req = Request::from_parts(clone_parts(&parts), replay.next_attempt());
        req.headers_mut()
            .insert(ATTEMPT_HEADER, attempt_value(attempt));
        note(attempt);
        let result = try_once(&mut inner, req, per_try, &a.service).await;
        let Some(reason) = retry_reason(&a.policy.retry_on, &result) else {
            return result;
        };
        if attempt >= a.policy.attempts || !a.allowed.permits(reason) || !replay.can_replay() {
            return result;
        }
        if !a.budget.tps.withdraw() {
            a.metrics.budget_exhausted.increment(1);
            tracing::debug!(service = %a.service, attempt, "not retried: the retry budget is spent");
            return result;
        }
        a.metrics.retried(reason);
        tracing::debug!(service = %a.service, attempt, reason = reason.label(), "retrying");
        drop(result);
        tokio::time::sleep(backoff(&a.policy, attempt)).await;
        attempt += 1;
    }
}

/// One attempt, bounded by the per-try timeout.
async fn try_once<S, R>(
    inner: &mut S,
    req: R,
    per_try: Option<Duration>,
    service: &str,
) -> Result<Response<ProxyBody>, BoxError>
where
    S: Service<R, Response = Response<ProxyBody>, Error = BoxError>,
{
    let call = inner.ready().await?.call(req);
    let Some(limit) = per_try else {
        return call.await;
    };
    match tokio::time::timeout(limit, call).await {
        Ok(result) => result,
        Err(_) => Err(ProxyError::Timeout {
            service: service.to_string(),
            timeout: limit,
        }
        .into()),
    }
}

/// `x-outrigger-retry-attempt`'s value, without an allocation for the
/// attempts a policy can have (1 to 10).
fn attempt_value(attempt: u32) -> HeaderValue {
    const VALUES: [&str; 10] = ["1", "2", "3", "4", "5", "6", "7", "8", "9", "10"];
    match VALUES.get(attempt.saturating_sub(1) as usize) {
        Some(v) => HeaderValue::from_static(v),
        None => HeaderValue::from(attempt),
    }
}

fn is_idempotent(method: &Method) -> bool {
    matches!(
        *method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::PUT | Method::DELETE | Method::TRACE
    )
}

fn is_grpc(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"))
}

/// A copy of a request head for another attempt.
fn clone_parts(parts: &http::request::Parts) -> http::request::Parts {
    let mut req = Request::new(());
    *req.method_mut() = parts.method.clone();
    *req.uri_mut() = parts.uri.clone();
    *req.version_mut() = parts.version;
    *req.headers_mut() = parts.headers.clone();
    *req.extensions_mut() = parts.extensions.clone();
    req.into_parts().0
}

/// Before retry `n` (1 for the first retry): random in
/// [0, min(max, base × 2^(n-1))].
fn backoff(policy: &RetryPolicy, n: u32) -> Duration {
    let factor = 1u32.checked_shl(n.saturating_sub(1)).unwrap_or(u32::MAX);
    let cap = policy
        .backoff_base
        .saturating_mul(factor)
        .min(policy.backoff_max);
    let cap_nanos = usize::try_from(cap.as_nanos()).unwrap_or(usize::MAX);
    let nanos = random_below(cap_nanos.saturating_add(1));
    Duration::from_nanos(u64::try_from(nanos).unwrap_or(u64::MAX))
}

/// Why an attempt is retried (the `reason` label of the retries metric).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Reason {
    /// A 5xx (`5xx`) or 502/503/504 (`gateway-error`) from upstream.
    Status,
    ConnectFailure,
    Reset,
    /// The per-try timeout.
    Timeout,
    RetriableStatus,
    GrpcStatus,
}

impl Reason {
    fn label(self) -> &'static str {
        match self {
            Reason::Status => "status",
            Reason::ConnectFailure => "connect-failure",
            Reason::Reset => "reset",
            Reason::Timeout => "timeout",
            Reason::RetriableStatus => "retriable-status-code",
            Reason::GrpcStatus => "grpc-status",
        }
    }
}

/// The condition of `retry_on` the result meets, if any.
fn retry_reason(
    retry_on: &[RetryOn],
    result: &Result<Response<ProxyBody>, BoxError>,
) -> Option<Reason> {
    match result {
        Ok(rsp) => {
            let status = rsp.status().as_u16();
            retry_on.iter().find_map(|condition| match condition {
                RetryOn::ServerError if (500..=599).contains(&status) => Some(Reason::Status),
                RetryOn::GatewayError if matches!(status, 502..=504) => Some(Reason::Status),
                RetryOn::StatusCode(code) if *code == status => Some(Reason::RetriableStatus),
                RetryOn::GrpcStatus(name) if grpc_status(rsp.headers()) == Some(name.as_str()) => {
                    Some(Reason::GrpcStatus)
                }
                _ => None,
            })
        }
        Err(error) => {
            let (reason, own) = match error.downcast_ref::<ProxyError>()? {
                ProxyError::Connect { .. } => {
                    (Reason::ConnectFailure, Some(RetryOn::ConnectFailure))
                }
                ProxyError::Upstream { .. } => (Reason::Reset, Some(RetryOn::Reset)),
                ProxyError::Timeout { .. } => (Reason::Timeout, None),
                _ => return None,
            };
            retry_on
                .iter()
                .any(|c| {
                    matches!(c, RetryOn::ServerError | RetryOn::GatewayError)
                        || Some(c) == own.as_ref()
                })
                .then_some(reason)
        }
    }
}

/// The name of a gRPC status carried in response headers (a
/// trailers-only error), as `retriableGrpcCodes` spells it.
fn grpc_status(headers: &HeaderMap) -> Option<&'static str> {
    let code: usize = headers
        .get("grpc-status")?
        .to_str()
        .ok()?
        .trim()
        .parse()
        .ok()?;
    outrigger_config::GRPC_CODES
        .get(code.checked_sub(1)?)
        .copied()
}

// === Bodies ===

/// The body of one attempt.
#[derive(Debug)]
pub enum AttemptBody<B> {
    /// Not retried: the request's own body.
    Once(B),
    /// No body at all (most GETs): nothing to keep.
    Empty,
    /// Read from the shared [`Replay`].
    Replay {
        state: Arc<Mutex<ReplayState<B>>>,
        generation: u32,
        /// Chunks of `state` this attempt has sent.
        next_chunk: usize,
        trailers_sent: bool,
    },
}

impl<B> AttemptBody<B> {
    pub fn once(body: B) -> Self {
        AttemptBody::Once(body)
    }
}

/// A request body shared by the attempts of one request: the original,
/// read once, and a copy of what has been read (while it fits).
#[derive(Debug)]
pub struct ReplayState<B> {
    original: B,
    chunks: Vec<Bytes>,
    buffered: usize,
    trailers: Option<HeaderMap>,
    ended: bool,
    /// Past [`REPLAY_LIMIT`]: the copy was dropped.
    overflowed: bool,
    /// The original failed.
    failed: bool,
    /// The attempt allowed to read; older ones are cut off.
    generation: u32,
}

#[derive(Debug)]
struct Replay<B> {
    state: Option<Arc<Mutex<ReplayState<B>>>>,
}

impl<B: Body> Replay<B> {
    fn new(body: B) -> Self {
        if body.is_end_stream() {
            return Self { state: None };
        }
        Self {
            state: Some(Arc::new(Mutex::new(ReplayState {
                original: body,
                chunks: Vec::new(),
                buffered: 0,
                trailers: None,
                ended: false,
                overflowed: false,
                failed: false,
                generation: 0,
            }))),
        }
    }

    /// A body for the next attempt; the previous attempt's can no longer
    /// read (hyper may still hold it for a moment).
    fn next_attempt(&self) -> AttemptBody<B> {
        let Some(state) = &self.state else {
            return AttemptBody::Empty;
        };
        let generation = {
            let mut s = state.lock().unwrap_or_else(PoisonError::into_inner);
            s.generation = s.generation.wrapping_add(1);
            s.generation
        };
        AttemptBody::Replay {
            state: state.clone(),
            generation,
            next_chunk: 0,
            trailers_sent: false,
        }
    }

    fn can_replay(&self) -> bool {
        match &self.state {
            None => true,
            Some(state) => {
                let s = state.lock().unwrap_or_else(PoisonError::into_inner);
                !s.overflowed && !s.failed
            }
        }
    }
}

impl<B> Body for AttemptBody<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            AttemptBody::Once(body) => Pin::new(body).poll_frame(cx).map_err(Into::into),
            AttemptBody::Empty => Poll::Ready(None),
            AttemptBody::Replay {
                state,
                generation,
                next_chunk,
                trailers_sent,
            } => {
                let mut s = state.lock().unwrap_or_else(PoisonError::into_inner);
                if s.generation != *generation {
                    return Poll::Ready(Some(Err("request body superseded by a retry".into())));
                }
                if let Some(chunk) = s.chunks.get(*next_chunk) {
                    *next_chunk += 1;
                    return Poll::Ready(Some(Ok(Frame::data(chunk.clone()))));
                }
                if s.ended {
                    if !*trailers_sent && let Some(trailers) = s.trailers.clone() {
                        *trailers_sent = true;
                        return Poll::Ready(Some(Ok(Frame::trailers(trailers))));
                    }
                    return Poll::Ready(None);
                }
                let polled = Pin::new(&mut s.original).poll_frame(cx);
                match polled {
                    Poll::Pending => Poll::Pending,
                    Poll::Ready(None) => {
                        s.ended = true;
                        Poll::Ready(None)
                    }
                    Poll::Ready(Some(Err(e))) => {
                        s.failed = true;
                        Poll::Ready(Some(Err(e.into())))
                    }
                    Poll::Ready(Some(Ok(frame))) => {
                        if let Some(data) = frame.data_ref() {
                            if !s.overflowed {
                                s.buffered += data.len();
                                if s.buffered > REPLAY_LIMIT {
                                    s.overflowed = true;
                                    s.chunks = Vec::new();
                                } else {
                                    let data = data.clone();
                                    s.chunks.push(data);
                                    *next_chunk = s.chunks.len();
                                }
                            }
                        } else if let Some(trailers) = frame.trailers_ref() {
                            s.trailers = Some(trailers.clone());
                            *trailers_sent = true;
                        }
                        Poll::Ready(Some(Ok(frame)))
                    }
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            AttemptBody::Once(body) => body.is_end_stream(),
            AttemptBody::Empty => true,
            AttemptBody::Replay {
                state,
                next_chunk,
                trailers_sent,
                ..
            } => {
                let s = state.lock().unwrap_or_else(PoisonError::into_inner);
                s.ended && *next_chunk >= s.chunks.len() && (*trailers_sent || s.trailers.is_none())
            }
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            AttemptBody::Once(body) => body.size_hint(),
            AttemptBody::Empty => SizeHint::with_exact(0),
            AttemptBody::Replay {
                state, next_chunk, ..
            } => {
                let s = state.lock().unwrap_or_else(PoisonError::into_inner);
                if s.ended && !s.overflowed {
                    let rest: usize = s.chunks.iter().skip(*next_chunk).map(Bytes::len).sum();
                    SizeHint::with_exact(rest as u64)
                } else if *next_chunk == 0 && s.buffered == 0 {
                    s.original.size_hint()
                } else {
                    SizeHint::default()
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use arc_swap::ArcSwap;
    use http::StatusCode;
    use http_body_util::{BodyExt, Full, StreamBody};

    use crate::forward::{Destination, DestinationPolicy};
    use crate::http::body;
    use crate::http::client::ClientSettings;
    use crate::transport::Plaintext;

    fn policy(attempts: u32, retry_on: Vec<RetryOn>) -> RetryPolicy {
        RetryPolicy {
            attempts,
            retry_on,
            per_try_timeout: None,
            backoff_base: Duration::from_millis(1),
            backoff_max: Duration::from_millis(2),
            retry_non_idempotent: false,
            budget: RetryBudget::default(),
        }
    }

    fn status(code: u16) -> Result<Response<ProxyBody>, BoxError> {
        let mut rsp = Response::new(body::empty());
        *rsp.status_mut() = StatusCode::from_u16(code).expect("status");
        Ok(rsp)
    }

    fn failed(error: ProxyError) -> Result<Response<ProxyBody>, BoxError> {
        Err(error.into())
    }

    #[test]
    fn reasons_follow_retry_on() {
        use RetryOn::*;
        let connect = || {
            failed(ProxyError::Connect {
                service: "s".into(),
                endpoint: "e".into(),
                reason: "refused".into(),
            })
        };
        let reset = || {
            failed(ProxyError::Upstream {
                service: "s".into(),
                reason: "reset".into(),
            })
        };
        let overflow = || {
            failed(ProxyError::AllEjected {
                service: "s".into(),
                endpoints: 1,
            })
        };
        assert_eq!(
            retry_reason(&[ServerError], &status(500)),
            Some(Reason::Status)
        );
        assert_eq!(retry_reason(&[GatewayError], &status(500)), None);
        assert_eq!(
            retry_reason(&[GatewayError], &status(503)),
            Some(Reason::Status)
        );
        assert_eq!(retry_reason(&[GatewayError], &status(200)), None);
        assert_eq!(
            retry_reason(&[StatusCode(409)], &status(409)),
            Some(Reason::RetriableStatus)
        );
        assert_eq!(
            retry_reason(&[ConnectFailure], &connect()),
            Some(Reason::ConnectFailure)
        );
        assert_eq!(retry_reason(&[Reset], &connect()), None);
        assert_eq!(retry_reason(&[Reset], &reset()), Some(Reason::Reset));
        assert_eq!(retry_reason(&[GatewayError], &reset()), Some(Reason::Reset));
        assert_eq!(
            retry_reason(&[ServerError, GatewayError], &overflow()),
            None,
            "the sidecar's own fast-fail is final"
        );

        let mut grpc = Response::new(body::empty());
        grpc.headers_mut()
            .insert("grpc-status", HeaderValue::from_static("14"));
        let unavailable = Ok(grpc);
        assert_eq!(
            retry_reason(&[GrpcStatus("unavailable".into())], &unavailable),
            Some(Reason::GrpcStatus)
        );
        assert_eq!(
            retry_reason(&[GrpcStatus("internal".into())], &unavailable),
            None
        );
    }

    #[test]
    fn backoff_is_full_jitter_under_the_capped_exponential() {
        let mut p = policy(3, vec![]);
        p.backoff_base = Duration::from_millis(10);
        p.backoff_max = Duration::from_millis(35);
        for n in 1..=5u32 {
            let cap = Duration::from_millis(10 * (1 << (n - 1))).min(Duration::from_millis(35));
            let waits: Vec<Duration> = (0..200).map(|_| backoff(&p, n)).collect();
            assert!(waits.iter().all(|w| *w <= cap), "retry {n}: over {cap:?}");
            assert!(waits.iter().any(|w| *w < cap / 2), "retry {n}: jittered");
        }
        assert!(backoff(&p, 40) <= Duration::from_millis(35), "no overflow");
    }

    type Chunks = StreamBody<
        futures_util::stream::Iter<
            std::vec::IntoIter<Result<Frame<Bytes>, std::convert::Infallible>>,
        >,
    >;

    fn chunks(parts: &[&'static [u8]]) -> Chunks {
        let frames: Vec<Result<Frame<Bytes>, std::convert::Infallible>> = parts
            .iter()
            .map(|p| Ok(Frame::data(Bytes::from_static(p))))
            .collect();
        StreamBody::new(futures_util::stream::iter(frames))
    }

    async fn read(body: AttemptBody<Chunks>) -> Result<Bytes, BoxError> {
        Ok(body.collect().await?.to_bytes())
    }

    #[tokio::test]
    async fn every_attempt_gets_the_whole_body_however_much_the_last_read() {
        let replay = Replay::new(chunks(&[b"hello ", b"wor", b"ld"]));
        // The first attempt reads one chunk, then fails.
        let mut first = replay.next_attempt();
        let frame = first.frame().await.expect("frame").expect("ok");
        assert_eq!(frame.into_data().expect("data"), "hello ");
        assert!(replay.can_replay());
        let second = replay.next_attempt();
        // The first can no longer read: hyper may still hold it.
        assert!(first.frame().await.expect("frame").is_err());
        assert_eq!(read(second).await.expect("body"), "hello world");
        assert_eq!(
            read(replay.next_attempt()).await.expect("again"),
            "hello world"
        );
    }

    #[tokio::test]
    async fn a_body_over_the_limit_streams_once_and_is_not_replayed() {
        let big: &'static [u8] = Box::leak(vec![7u8; REPLAY_LIMIT].into_boxed_slice());
        let replay = Replay::new(chunks(&[big, b"x"]));
        let body = read(replay.next_attempt()).await.expect("streams whole");
        assert_eq!(body.len(), REPLAY_LIMIT + 1);
        assert!(!replay.can_replay());
    }

    /// A destination named shop/api with `retries`, and an inner service
    /// answering each attempt with the next status of `script` (then 200);
    /// returns the service and the attempt headers it saw.
    type TestService = tower::util::BoxService<Request<Full<Bytes>>, Response<ProxyBody>, BoxError>;

    fn harness(
        retries: Option<RetryPolicy>,
        script: Vec<u16>,
    ) -> (TestService, Arc<Mutex<Vec<String>>>) {
        let destination = Arc::new(ArcSwap::from_pointee(Destination::<Plaintext>::new(
            Arc::from("shop/api"),
            &[],
            &ClientSettings::default(),
            &DestinationPolicy {
                retries: retries.map(Arc::new),
                ..DestinationPolicy::default()
            },
        )));
        let seen = Arc::new(Mutex::new(Vec::new()));
        let calls = Arc::new(AtomicUsize::new(0));
        let log = seen.clone();
        let inner = tower::service_fn(move |req: Request<AttemptBody<Full<Bytes>>>| {
            let n = calls.fetch_add(1, Ordering::SeqCst);
            let code = script.get(n).copied().unwrap_or(200);
            let attempt = req
                .headers()
                .get(&ATTEMPT_HEADER)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("-")
                .to_string();
            let log = log.clone();
            async move {
                let body = req.into_body().collect().await?.to_bytes();
                log.lock()
                    .expect("log")
                    .push(format!("{attempt}:{}", body.len()));
                if code == 0 {
                    // 0 in the script: the connection was refused.
                    return failed(ProxyError::Connect {
                        service: "shop/api".into(),
                        endpoint: "127.0.0.1:1".into(),
                        reason: "refused".into(),
                    });
                }
                status(code)
            }
        });
        let service = RetryLayer::new(destination, "shop/api").layer(inner);
        (tower::util::BoxService::new(service), seen)
    }

    async fn send(service: &mut TestService, method: Method, body: &'static str) -> u16 {
        let req = Request::builder()
            .method(method)
            .uri("/")
            .body(Full::new(Bytes::from_static(body.as_bytes())))
            .expect("request");
        let rsp = service
            .ready()
            .await
            .expect("ready")
            .call(req)
            .await
            .expect("response");
        rsp.status().as_u16()
    }

    #[tokio::test]
    async fn retries_until_success_and_numbers_each_attempt() {
        let (mut svc, seen) = harness(Some(policy(3, vec![RetryOn::GatewayError])), vec![503, 503]);
        assert_eq!(send(&mut svc, Method::PUT, "data").await, 200);
        assert_eq!(*seen.lock().expect("seen"), ["1:4", "2:4", "3:4"]);
    }

    #[tokio::test]
    async fn gives_up_after_the_attempts_with_the_last_answer() {
        let (mut svc, seen) = harness(
            Some(policy(2, vec![RetryOn::GatewayError])),
            vec![503, 502, 501],
        );
        assert_eq!(send(&mut svc, Method::GET, "").await, 502);
        assert_eq!(seen.lock().expect("seen").len(), 2);
    }

    #[tokio::test]
    async fn post_is_sent_once_unless_the_policy_opts_in() {
        let (mut svc, seen) = harness(Some(policy(3, vec![RetryOn::ServerError])), vec![503]);
        assert_eq!(send(&mut svc, Method::POST, "pay").await, 503);
        assert_eq!(*seen.lock().expect("seen"), ["1:3"]);

        let mut opted = policy(3, vec![RetryOn::ServerError]);
        opted.retry_non_idempotent = true;
        let (mut svc, seen) = harness(Some(opted), vec![503]);
        assert_eq!(send(&mut svc, Method::POST, "pay").await, 200);
        assert_eq!(*seen.lock().expect("seen"), ["1:3", "2:3"]);
    }

    #[tokio::test]
    async fn a_post_is_retried_when_nothing_was_sent() {
        let p = policy(3, vec![RetryOn::ConnectFailure, RetryOn::GatewayError]);
        let (mut svc, seen) = harness(Some(p), vec![0, 503]);
        // Refused: retried. Then a 503 from the app: final for a POST.
        assert_eq!(send(&mut svc, Method::POST, "pay").await, 503);
        assert_eq!(*seen.lock().expect("seen"), ["1:3", "2:3"]);
    }

    #[tokio::test]
    async fn without_a_policy_nothing_is_retried_or_marked() {
        let (mut svc, seen) = harness(None, vec![503]);
        assert_eq!(send(&mut svc, Method::GET, "").await, 503);
        assert_eq!(*seen.lock().expect("seen"), ["-:0"]);
    }

    #[tokio::test]
    async fn the_budget_caps_retries_against_a_failing_service() {
        let mut p = policy(3, vec![RetryOn::ServerError]);
        p.budget = RetryBudget {
            ratio: 0.2,
            min_retries_per_second: 1,
            window: Duration::from_secs(10),
        };
        let (mut svc, seen) = harness(Some(p), vec![500; 10_000]);
        for _ in 0..200 {
            assert_eq!(send(&mut svc, Method::GET, "").await, 500);
        }
        let attempts = seen.lock().expect("seen").len();
        // 200 requests; retries at most 20% of them plus the reserve
        // (1/s × 10 s), never 200 × 2.
        assert!(attempts <= 200 + 40 + 10, "{attempts} attempts");
        assert!(attempts > 200, "some retries happen");
    }
}
