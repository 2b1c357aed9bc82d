//! Outbound: the app calls a local port, the sidecar carries the request to
//! an endpoint of the service that port stands for.
//!
//! The HTTP stack, top to bottom (retries, circuit breaking and tracing
//! will be pushed in between as layers):
//!
//! ```text
//! metrics → error responses → header hygiene → request timeout → forward (balance + pool)
//! ```

use std::sync::Arc;
use std::time::Duration;

use tower::ServiceBuilder;
use tower::util::BoxCloneSyncService;

use crate::errors::ErrorResponseLayer;
use crate::forward::{Destination, Forward};
use crate::headers::HeadersLayer;
use crate::http::server::HttpService;
use crate::metrics::{MetricsLayer, RequestMetrics};
use crate::timeout::TimeoutLayer;
use crate::transport::ClientTransport;

/// The HTTP stack for one outbound listener.
pub fn http_stack<T: ClientTransport>(
    destination: Arc<Destination<T>>,
    request_timeout: Option<Duration>,
) -> HttpService {
    let name = destination.name.clone();
    let stack = ServiceBuilder::new()
        .layer(MetricsLayer::new(RequestMetrics::new("outbound", &name)))
        .layer(ErrorResponseLayer)
        .layer(HeadersLayer)
        .layer(TimeoutLayer::new(request_timeout, name))
        .service(Forward::new(destination));
    BoxCloneSyncService::new(stack)
}
