//! Outbound: the app calls a local port, the sidecar carries the request to
//! an endpoint of the service that port stands for.
//!
//! The HTTP stack, top to bottom (retries, circuit breaking and tracing
//! will be pushed in between as layers):
//!
//! ```text
//! metrics → error responses → header hygiene → request timeout → forward (balance + pool)
//! ```

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpStream;
use tower::ServiceBuilder;
use tower::util::BoxCloneSyncService;

use crate::balance::RoundRobin;
use crate::errors::ErrorResponseLayer;
use crate::forward::{Destination, Forward};
use crate::headers::HeadersLayer;
use crate::http::server::HttpService;
use crate::metrics::{MetricsLayer, RequestMetrics};
use crate::tcp::{self, ByteCounters};
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

/// Where an outbound TCP listener sends its connections.
#[derive(Debug)]
pub struct TcpDestination<T> {
    pub name: Arc<str>,
    pub transport: T,
    pub endpoints: RoundRobin<SocketAddr>,
    pub connect_timeout: Duration,
    pub idle_timeout: Duration,
    pub counters: ByteCounters,
}

/// Carries one outbound TCP connection to an endpoint of its service.
pub async fn forward_tcp<T: ClientTransport>(
    downstream: TcpStream,
    peer: SocketAddr,
    destination: Arc<TcpDestination<T>>,
) {
    let dest = &*destination;
    let Some(&endpoint) = dest.endpoints.pick() else {
        tracing::warn!(service = %dest.name, %peer, "no endpoints for TCP connection; closing it");
        return;
    };
    let upstream = match dest.transport.connect(endpoint, dest.connect_timeout).await {
        Ok(io) => io,
        Err(error) => {
            tracing::warn!(service = %dest.name, %endpoint, %peer, %error, "cannot connect upstream; closing TCP connection");
            return;
        }
    };
    match tcp::forward(downstream, upstream, dest.idle_timeout, &dest.counters).await {
        Ok(ended) => {
            tracing::debug!(service = %dest.name, %endpoint, ?ended, "TCP connection done")
        }
        Err(error) => {
            tracing::debug!(service = %dest.name, %endpoint, %error, "TCP connection failed")
        }
    }
}
