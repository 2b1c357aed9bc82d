//! The innermost HTTP service: send the request to an endpoint of its
//! destination and hand back the response.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use arc_swap::ArcSwap;
use http::{Request, Response};
use outrigger_config::{
    CircuitBreaker, LoadBalancer, OutlierDetection, RetryPolicy, RouteTimeouts,
};
use tokio::time::Instant;
use tower::Service;

use crate::BoxError;
use crate::balance::{Balancer, Endpoint, NoPick, Outcome, OutlierMetrics, Score};
use crate::circuit::{Limits, Overflow};
use crate::errors::ProxyError;
use crate::http::body::{self, ProxyBody};
use crate::http::client::{ClientSettings, EndpointClient, SendError};
use crate::retry::Budget;
use crate::trace::SpanNotes;
use crate::transport::ClientTransport;

/// Bodies of a known length up to this size are read whole before they are
/// forwarded, so the head and the body leave in one write instead of two
/// (a small response otherwise costs an extra syscall and wake-up on each
/// hop). Larger or unknown-length bodies stream through untouched.
const BUFFER_LIMIT: u64 = 32 * 1024;

/// How requests to a destination are balanced, limited and retried: its
/// TrafficPolicy, as the data path uses it.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct DestinationPolicy {
    /// To the response headers, retries included (`None`: no limit).
    pub request_timeout: Option<Duration>,
    /// Timeouts by path prefix, longest first.
    pub routes: Vec<RouteTimeouts>,
    pub load_balancer: LoadBalancer,
    pub outlier_detection: Option<OutlierDetection>,
    pub circuit_breaker: CircuitBreaker,
    /// Shared, so a request takes it without a copy.
    pub retries: Option<Arc<RetryPolicy>>,
    /// The local app behind an inbound listener: no outlier or circuit
    /// breaker metrics (there is nothing to balance or limit).
    pub local_app: bool,
}

impl DestinationPolicy {
    /// For the local app behind an inbound listener: one endpoint, no
    /// limits of our own (the app has its own), no retries.
    pub fn local_app() -> Self {
        Self {
            circuit_breaker: CircuitBreaker {
                max_connections: u32::MAX,
                max_pending_requests: u32::MAX,
                max_requests: u32::MAX,
            },
            local_app: true,
            ..Self::default()
        }
    }
}

/// A named destination and clients for each of its endpoints.
#[derive(Debug)]
pub struct Destination<T: ClientTransport> {
    /// Shown in errors and metrics, e.g. `shop/api`.
    pub name: Arc<str>,
    balancer: Balancer<EndpointClient<T>>,
    settings: ClientSettings,
    pub policy: DestinationPolicy,
    /// Counted across configuration changes: requests and connections in
    /// flight (the circuit breaker's limits).
    limits: Arc<Limits>,
    /// The retry budget; kept across changes that keep its settings.
    pub budget: Option<Arc<Budget>>,
}

impl<T: ClientTransport + PartialEq> Destination<T> {
    /// `endpoints`: each address with the transport that reaches it.
    pub fn new(
        name: Arc<str>,
        endpoints: &[(SocketAddr, T)],
        settings: &ClientSettings,
        policy: &DestinationPolicy,
    ) -> Self {
        Self::reusing(None, name, endpoints, settings, policy)
    }

    /// Like [`Destination::new`], but takes over from `previous` what it
    /// can: each kept endpoint's score (response times, health), its
    /// client when the client settings and transport (the expected
    /// identity) are unchanged, so pooled keep-alive connections survive
    /// a configuration change; the requests and connections counted in
    /// flight; and the retry budget when its settings are the same.
    pub fn reusing(
        previous: Option<&Destination<T>>,
        name: Arc<str>,
        endpoints: &[(SocketAddr, T)],
        settings: &ClientSettings,
        policy: &DestinationPolicy,
    ) -> Self {
        let limits = match previous {
            Some(p) => p.limits.clone(),
            None if policy.local_app => Arc::new(Limits::unmetered()),
            None => Arc::new(Limits::new(&name)),
        };
        limits.set(&policy.circuit_breaker);
        let kept = |addr: SocketAddr| {
            previous.and_then(|p| p.endpoints().iter().find(|e| e.score.addr == addr))
        };
        let reusable = previous.is_some_and(|p| p.settings == *settings);
        let endpoints = endpoints
            .iter()
            .map(|(addr, transport)| {
                let old = kept(*addr);
                let client = old
                    .filter(|e| reusable && e.client.transport() == transport)
                    .map(|e| e.client.clone())
                    .unwrap_or_else(|| {
                        EndpointClient::new(transport.clone(), *addr, settings, limits.clone())
                    });
                let score = old
                    .map(|e| e.score.clone())
                    .unwrap_or_else(|| Arc::new(Score::new(*addr)));
                Endpoint { client, score }
            })
            .collect();
        let metrics = match previous {
            Some(p) => p.balancer.metrics().clone(),
            None if policy.local_app => OutlierMetrics::noop(),
            None => OutlierMetrics::new(&name),
        };
        let budget = policy.retries.as_ref().map(|retries| {
            previous
                .and_then(|p| p.budget.clone())
                .filter(|b| b.settings() == &retries.budget)
                .unwrap_or_else(|| Arc::new(Budget::new(&retries.budget)))
        });
        Self {
            balancer: Balancer::new(
                name.clone(),
                endpoints,
                policy.load_balancer,
                policy.outlier_detection.clone(),
                metrics,
            ),
            name,
            settings: settings.clone(),
            policy: policy.clone(),
            limits,
            budget,
        }
    }
}

impl<T: ClientTransport> Destination<T> {
    pub fn endpoints(&self) -> &[Endpoint<EndpointClient<T>>] {
        self.balancer.endpoints()
    }

    /// The whole-request timeout for a request to `path`.
    pub fn request_timeout(&self, path: &str) -> Option<Duration> {
        match self.route_for(path) {
            Some(route) => route.request,
            None => self.policy.request_timeout,
        }
    }

    /// Each attempt's timeout for a request to `path` (with retries).
    pub fn per_try_timeout(&self, path: &str) -> Option<Duration> {
        match self.route_for(path) {
            Some(route) => route.per_try,
            None => self.policy.retries.as_ref().and_then(|r| r.per_try_timeout),
        }
    }

    fn route_for(&self, path: &str) -> Option<&RouteTimeouts> {
        // Few routes, if any: a scan beats a lookup structure here.
        self.policy
            .routes
            .iter()
            .find(|r| path.starts_with(r.path_prefix.as_str()))
    }

    /// Requests in flight and connections open now (circuit breaker).
    pub fn in_flight(&self) -> (u32, u32) {
        self.limits.in_flight()
    }
}

/// A destination that a configuration change can replace while requests
/// flow: each request loads the current one and keeps it until done.
pub type SharedDestination<T> = Arc<ArcSwap<Destination<T>>>;

/// Forwards each request to an endpoint of a destination: the circuit
/// breaker's request limit, then the balancer's pick, then the endpoint's
/// pool. Every outcome goes back to the balancer (response times, outlier
/// detection).
#[derive(Debug)]
pub struct Forward<T: ClientTransport> {
    destination: SharedDestination<T>,
}

impl<T: ClientTransport> Clone for Forward<T> {
    fn clone(&self) -> Self {
        Self {
            destination: self.destination.clone(),
        }
    }
}

impl<T: ClientTransport> Forward<T> {
    pub fn new(destination: SharedDestination<T>) -> Self {
        Self { destination }
    }
}

impl<T, B> Service<Request<B>> for Forward<T>
where
    T: ClientTransport,
    B: http_body::Body<Data = bytes::Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    type Response = Response<ProxyBody>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Response<ProxyBody>, BoxError>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, mut req: Request<B>) -> Self::Future {
        // Holding the Arc (not a guard) keeps this request on the
        // destination it started with, however long it runs.
        let dest = self.destination.load_full();
        let downstream_upgrade = crate::upgrade::take_downstream(&mut req);
        Box::pin(async move {
            let service = &dest.name;
            let active = dest
                .limits
                .admit_request()
                .map_err(|overflow| overflow_error(service, overflow))?;
            let (endpoint, in_flight) = match dest.balancer.pick(Instant::now()) {
                Ok(picked) => picked,
                Err(NoPick::NoEndpoints) => {
                    return Err(ProxyError::NoEndpoints {
                        service: service.to_string(),
                    }
                    .into());
                }
                Err(NoPick::AllEjected) => {
                    return Err(ProxyError::AllEjected {
                        service: service.to_string(),
                        endpoints: dest.endpoints().len(),
                    }
                    .into());
                }
            };
            if let Some(notes) = req.extensions().get::<Arc<SpanNotes>>() {
                notes.upstream(endpoint.client.addr());
            }
            let (parts, body) = req.into_parts();
            let body = body::buffer_if_small(body, BUFFER_LIMIT)
                .await
                .map_err(|e| ProxyError::ClientBody {
                    reason: e.to_string(),
                })?;
            let sent = endpoint.client.send(Request::from_parts(parts, body)).await;
            let now = Instant::now();
            let mut rsp = match sent {
                Ok(rsp) => {
                    let outcome = if rsp.status().is_server_error() {
                        Outcome::Failure
                    } else {
                        Outcome::Success
                    };
                    dest.balancer.record(in_flight, outcome, now);
                    rsp
                }
                Err(SendError::Overflow(overflow)) => {
                    // Our own limit, not the endpoint's fault.
                    drop(in_flight);
                    return Err(overflow_error(service, overflow));
                }
                Err(SendError::Connect(reason)) => {
                    dest.balancer.record(in_flight, Outcome::Failure, now);
                    return Err(ProxyError::Connect {
                        service: service.to_string(),
                        endpoint: endpoint.client.addr().to_string(),
                        reason,
                    }
                    .into());
                }
                Err(SendError::Upstream(reason)) => {
                    dest.balancer.record(in_flight, Outcome::Failure, now);
                    return Err(ProxyError::Upstream {
                        service: service.to_string(),
                        reason,
                    }
                    .into());
                }
            };
            crate::upgrade::splice(downstream_upgrade, &mut rsp);
            let (mut parts, body) = rsp.into_parts();
            // We answer as an HTTP/1.1 server whatever version the upstream
            // spoke; echoing "HTTP/1.0" would make clients drop their
            // keep-alive connections.
            if parts.version == http::Version::HTTP_10 {
                parts.version = http::Version::HTTP_11;
            }
            // A streamed response counts against maxRequests until its
            // body ends.
            let body = body::buffer_if_small(body::Guarded::new(body, active), BUFFER_LIMIT)
                .await
                .map_err(|e| ProxyError::Upstream {
                    service: service.to_string(),
                    reason: format!("response body: {e}"),
                })?;
            Ok(Response::from_parts(parts, body))
        })
    }
}

fn overflow_error(service: &str, overflow: Overflow) -> BoxError {
    ProxyError::Overflow {
        service: service.to_string(),
        overflow,
    }
    .into()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::convert::Infallible;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    use http_body_util::{BodyExt, Empty, Full};
    use hyper_util::rt::TokioIo;

    use crate::transport::Plaintext;

    /// An HTTP/1 upstream answering "ok"; counts the connections it accepts.
    async fn upstream() -> (SocketAddr, Arc<AtomicUsize>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let connections = Arc::new(AtomicUsize::new(0));
        let counter = connections.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                counter.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(|_| async {
                        Ok::<_, Infallible>(Response::new(Full::new(bytes::Bytes::from("ok"))))
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        (addr, connections)
    }

    async fn get(forward: &mut Forward<Plaintext>) {
        let req = Request::get("/")
            .header("host", "api")
            .body(Empty::<bytes::Bytes>::new())
            .expect("request");
        let rsp = forward.call(req).await.expect("response");
        assert_eq!(rsp.status(), 200);
        let body = rsp.into_body().collect().await.expect("body").to_bytes();
        assert_eq!(body, "ok");
    }

    #[tokio::test]
    async fn a_swapped_destination_keeps_the_pools_of_the_endpoints_it_keeps() {
        let (up, connections) = upstream().await;
        let (other, _) = upstream().await;
        let name: Arc<str> = Arc::from("shop/api");
        let settings = ClientSettings::default();
        let shared: SharedDestination<Plaintext> =
            Arc::new(ArcSwap::from_pointee(Destination::new(
                name.clone(),
                &[(up, Plaintext)],
                &settings,
                &DestinationPolicy::default(),
            )));
        let mut forward = Forward::new(shared.clone());
        get(&mut forward).await;
        assert_eq!(connections.load(Ordering::SeqCst), 1);

        // A new endpoint list that keeps `up` first: its pooled connection
        // carries on.
        let previous = shared.load_full();
        shared.store(Arc::new(Destination::reusing(
            Some(&previous),
            name.clone(),
            &[(up, Plaintext), (other, Plaintext)],
            &settings,
            &DestinationPolicy::default(),
        )));
        get(&mut forward).await;
        assert_eq!(connections.load(Ordering::SeqCst), 1, "pool reused");

        // Other client settings: new clients, new connections.
        let previous = shared.load_full();
        let changed = ClientSettings {
            connect_timeout: Duration::from_secs(2),
            ..settings
        };
        shared.store(Arc::new(Destination::reusing(
            Some(&previous),
            name,
            &[(up, Plaintext)],
            &changed,
            &DestinationPolicy::default(),
        )));
        get(&mut forward).await;
        assert_eq!(connections.load(Ordering::SeqCst), 2, "fresh pool");
    }
}
