//! Outbound: the app calls a local port, the sidecar carries the request to
//! an endpoint of the service that port stands for.
//!
//! The HTTP stack, top to bottom:
//!
//! ```text
//! metrics → trace → error responses → header hygiene → request timeout → retry
//!   → forward (circuit breaker limits → balancer → endpoint pool)
//! ```

use std::sync::Arc;

use tower::ServiceBuilder;
use tower::util::BoxCloneSyncService;

use crate::errors::ErrorResponseLayer;
use crate::forward::{Forward, SharedDestination};
use crate::headers::HeadersLayer;
use crate::http::server::HttpService;
use crate::metrics::{MetricsLayer, RequestMetrics};
use crate::retry::RetryLayer;
use crate::timeout::TimeoutLayer;
use crate::trace::{SpanKind, TraceLayer, Tracing};
use crate::transport::ClientTransport;

/// The HTTP stack for one outbound listener. `destination` (endpoints
/// and policy) can be swapped while it serves; the service name (metrics
/// labels, error texts) is fixed for the listener's lifetime.
pub fn http_stack<T: ClientTransport>(
    name: Arc<str>,
    destination: SharedDestination<T>,
    tracing: Arc<Tracing>,
) -> HttpService {
    let stack = ServiceBuilder::new()
        .layer(MetricsLayer::new(RequestMetrics::new("outbound", &name)))
        .layer(TraceLayer::new(tracing, SpanKind::Client, name.clone()))
        .layer(ErrorResponseLayer)
        .layer(HeadersLayer)
        .layer(TimeoutLayer::new(destination.clone()))
        .layer(RetryLayer::new(destination.clone(), &name))
        .service(Forward::new(destination));
    BoxCloneSyncService::new(stack)
}
