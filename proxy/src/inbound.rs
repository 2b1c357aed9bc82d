//! Inbound: a peer sidecar connects to our inbound port, the request goes
//! to the local app.
//!
//! ```text
//! metrics → error responses → HTTP/1.1 back from HTTP/2 → header hygiene → authorization → forward to 127.0.0.1:<app port>
//! ```
//!
//! Authorization (after the transport has verified the peer's identity)
//! and tracing will be pushed in between as layers.

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
use crate::transport::ClientTransport;

/// The HTTP stack for one inbound listener; `app` has the one endpoint
/// (swappable, e.g. when the app port changes).
pub fn http_stack<T: ClientTransport>(
    name: Arc<str>,
    app: SharedDestination<T>,
    authz: AuthzLayer,
) -> HttpService {
    let stack = ServiceBuilder::new()
        .layer(MetricsLayer::new(RequestMetrics::new("inbound", &name)))
        .layer(ErrorResponseLayer)
        .layer(DowngradeLayer)
        .layer(HeadersLayer)
        .layer(authz)
        .service(Forward::new(app));
    BoxCloneSyncService::new(stack)
}
