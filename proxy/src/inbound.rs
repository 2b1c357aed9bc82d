//! Inbound: a peer sidecar connects to our inbound port, the request goes
//! to the local app.
//!
//! ```text
//! metrics → error responses → header hygiene → forward to 127.0.0.1:<app port>
//! ```
//!
//! Authorization (after the transport has verified the peer's identity)
//! and tracing will be pushed in between as layers.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tower::ServiceBuilder;
use tower::util::BoxCloneSyncService;

use crate::errors::ErrorResponseLayer;
use crate::forward::{Destination, Forward};
use crate::headers::HeadersLayer;
use crate::http::server::HttpService;
use crate::metrics::{MetricsLayer, RequestMetrics};
use crate::tcp::{self, ByteCounters};
use crate::transport::ClientTransport;

/// The HTTP stack for one inbound listener; `app` has the one endpoint.
pub fn http_stack<T: ClientTransport>(app: Arc<Destination<T>>) -> HttpService {
    let name = app.name.clone();
    let stack = ServiceBuilder::new()
        .layer(MetricsLayer::new(RequestMetrics::new("inbound", &name)))
        .layer(ErrorResponseLayer)
        .layer(HeadersLayer)
        .service(Forward::new(app));
    BoxCloneSyncService::new(stack)
}

/// Where an inbound TCP listener sends its connections.
#[derive(Debug)]
pub struct TcpApp<T> {
    pub name: Arc<str>,
    pub transport: T,
    pub addr: SocketAddr,
    pub connect_timeout: Duration,
    pub idle_timeout: Duration,
    pub counters: ByteCounters,
}

/// Carries one inbound TCP connection to the local app.
pub async fn forward_tcp<T, D>(downstream: D, peer: SocketAddr, app: Arc<TcpApp<T>>)
where
    T: ClientTransport,
    D: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let upstream = match app.transport.connect(app.addr, app.connect_timeout).await {
        Ok(io) => io,
        Err(error) => {
            tracing::warn!(workload = %app.name, app = %app.addr, %peer, %error, "cannot connect to the app; closing TCP connection");
            return;
        }
    };
    match tcp::forward(downstream, upstream, app.idle_timeout, &app.counters).await {
        Ok(ended) => tracing::debug!(workload = %app.name, ?ended, "TCP connection done"),
        Err(error) => tracing::debug!(workload = %app.name, %error, "TCP connection failed"),
    }
}
