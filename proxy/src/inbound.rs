//! Inbound: a peer sidecar connects to our inbound port, the request goes
//! to the local app.
//!
//! ```text
//! metrics → trace → error responses → HTTP/1.1 back from HTTP/2 → header hygiene → authorization → forward to 127.0.0.1:<app port>
//! ```
//!
//! Authorization comes after the transport has verified the peer's
//! identity; a denied request still gets its span.

use std::sync::Arc;

use tower::ServiceBuilder;
use tower::util::BoxCloneSyncService;

use crate::authz::AuthzLayer;
use crate::errors::ErrorResponseLayer;
use crate::forward::{Forward, SharedDestination};
use crate::headers::HeadersLayer;
use crate::http::server::HttpService;
use crate::metrics::{MetricsLayer, RequestMetrics};
use crate::orig_proto::DowngradeLayer;
use crate::trace::{SpanKind, TraceLayer, Tracing};
use crate::transport::ClientTransport;

/// The HTTP stack for one inbound listener; `app` has the one endpoint
/// (swappable, e.g. when the app port changes).
pub fn http_stack<T: ClientTransport>(
    name: Arc<str>,
    app: SharedDestination<T>,
    authz: AuthzLayer,
    tracing: Arc<Tracing>,
) -> HttpService {
    let stack = ServiceBuilder::new()
        .layer(MetricsLayer::new(RequestMetrics::new("inbound", &name)))
        .layer(TraceLayer::new(tracing, SpanKind::Server, name.clone()))
        .layer(ErrorResponseLayer)
        .layer(DowngradeLayer)
        .layer(HeadersLayer)
        .layer(authz)
        .service(Forward::new(app));
    BoxCloneSyncService::new(stack)
}
