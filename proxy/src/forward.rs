//! The innermost HTTP service: send the request to an endpoint of its
//! destination and hand back the response.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use arc_swap::ArcSwap;
use http::{Request, Response};
use tower::Service;

use crate::BoxError;
use crate::balance::RoundRobin;
use crate::errors::ProxyError;
use crate::http::body::{self, ProxyBody};
use crate::http::client::{ClientSettings, EndpointClient, SendError};
use crate::transport::ClientTransport;

/// Bodies of a known length up to this size are read whole before they are
/// forwarded, so the head and the body leave in one write instead of two
/// (a small response otherwise costs an extra syscall and wake-up on each
/// hop). Larger or unknown-length bodies stream through untouched.
const BUFFER_LIMIT: u64 = 32 * 1024;

/// A named destination and clients for each of its endpoints.
#[derive(Debug)]
pub struct Destination<T: ClientTransport> {
    /// Shown in errors and metrics, e.g. `shop/api`.
    pub name: Arc<str>,
    endpoints: RoundRobin<EndpointClient<T>>,
    settings: ClientSettings,
}

impl<T: ClientTransport + PartialEq> Destination<T> {
    /// `endpoints`: each address with the transport that reaches it.
    pub fn new(name: Arc<str>, endpoints: &[(SocketAddr, T)], settings: &ClientSettings) -> Self {
        Self::reusing(None, name, endpoints, settings)
    }

    /// Like [`Destination::new`], but takes over `previous`'s client for
    /// every endpoint it keeps with the same transport (the same expected
    /// identity) when the client settings are unchanged, so pooled
    /// keep-alive connections survive a configuration change.
    pub fn reusing(
        previous: Option<&Destination<T>>,
        name: Arc<str>,
        endpoints: &[(SocketAddr, T)],
        settings: &ClientSettings,
    ) -> Self {
        let reusable = previous.filter(|p| p.settings == *settings);
        let clients = endpoints
            .iter()
            .map(|(addr, transport)| {
                reusable
                    .and_then(|p| {
                        p.endpoints
                            .endpoints()
                            .iter()
                            .find(|c| c.addr() == *addr && c.transport() == transport)
                    })
                    .cloned()
                    .unwrap_or_else(|| EndpointClient::new(transport.clone(), *addr, settings))
            })
            .collect();
        Self {
            name,
            endpoints: RoundRobin::new(clients),
            settings: settings.clone(),
        }
    }
}

impl<T: ClientTransport> Destination<T> {
    pub fn endpoints(&self) -> &[EndpointClient<T>] {
        self.endpoints.endpoints()
    }
}

/// A destination that a configuration change can replace while requests
/// flow: each request loads the current one and keeps it until done.
pub type SharedDestination<T> = Arc<ArcSwap<Destination<T>>>;

/// Forwards each request to the next endpoint of a destination.
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
            let Some(endpoint) = dest.endpoints.pick() else {
                return Err(ProxyError::NoEndpoints {
                    service: dest.name.to_string(),
                }
                .into());
            };
            let (parts, body) = req.into_parts();
            let body = body::buffer_if_small(body, BUFFER_LIMIT)
                .await
                .map_err(|e| ProxyError::ClientBody {
                    reason: e.to_string(),
                })?;
            let mut rsp = match endpoint.send(Request::from_parts(parts, body)).await {
                Ok(rsp) => rsp,
                Err(SendError::Connect(reason)) => {
                    return Err(ProxyError::Connect {
                        service: dest.name.to_string(),
                        endpoint: endpoint.addr().to_string(),
                        reason,
                    }
                    .into());
                }
                Err(SendError::Upstream(reason)) => {
                    return Err(ProxyError::Upstream {
                        service: dest.name.to_string(),
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
            let body = body::buffer_if_small(body, BUFFER_LIMIT)
                .await
                .map_err(|e| ProxyError::Upstream {
                    service: dest.name.to_string(),
                    reason: format!("response body: {e}"),
                })?;
            Ok(Response::from_parts(parts, body))
        })
    }
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
        let shared: SharedDestination<Plaintext> = Arc::new(ArcSwap::from_pointee(
            Destination::new(name.clone(), &[(up, Plaintext)], &settings),
        ));
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
        )));
        get(&mut forward).await;
        assert_eq!(connections.load(Ordering::SeqCst), 2, "fresh pool");
    }
}
