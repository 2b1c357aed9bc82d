//! The innermost HTTP service: send the request to an endpoint of its
//! destination and hand back the response.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use http::{Request, Response};
use tower::Service;

use crate::BoxError;
use crate::balance::RoundRobin;
use crate::errors::ProxyError;
use crate::http::body::{self, ProxyBody};
use crate::http::client::{ClientSettings, EndpointClient, SendError};
use crate::transport::ClientTransport;

/// A named destination and clients for each of its endpoints.
#[derive(Debug)]
pub struct Destination<T: ClientTransport> {
    /// Shown in errors and metrics, e.g. `shop/api`.
    pub name: Arc<str>,
    endpoints: RoundRobin<EndpointClient<T>>,
}

impl<T: ClientTransport> Destination<T> {
    pub fn new(
        name: Arc<str>,
        transport: T,
        addrs: &[std::net::SocketAddr],
        settings: &ClientSettings,
    ) -> Self {
        let clients = addrs
            .iter()
            .map(|addr| EndpointClient::new(transport.clone(), *addr, settings))
            .collect();
        Self {
            name,
            endpoints: RoundRobin::new(clients),
        }
    }
}

/// Forwards each request to the next endpoint of a destination.
#[derive(Debug)]
pub struct Forward<T: ClientTransport> {
    destination: Arc<Destination<T>>,
}

impl<T: ClientTransport> Clone for Forward<T> {
    fn clone(&self) -> Self {
        Self {
            destination: self.destination.clone(),
        }
    }
}

impl<T: ClientTransport> Forward<T> {
    pub fn new(destination: Arc<Destination<T>>) -> Self {
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

    fn call(&mut self, req: Request<B>) -> Self::Future {
        let dest = &self.destination;
        let Some(endpoint) = dest.endpoints.pick() else {
            let err = ProxyError::NoEndpoints {
                service: dest.name.to_string(),
            };
            return Box::pin(std::future::ready(Err(err.into())));
        };
        let addr = endpoint.addr();
        let name = dest.name.clone();
        let sent = endpoint.send(req.map(body::boxed));
        Box::pin(async move {
            match sent.await {
                Ok(mut rsp) => {
                    // We answer as an HTTP/1.1 server whatever version the
                    // upstream spoke; echoing "HTTP/1.0" would make clients
                    // drop their keep-alive connections.
                    if rsp.version() == http::Version::HTTP_10 {
                        *rsp.version_mut() = http::Version::HTTP_11;
                    }
                    Ok(rsp.map(body::boxed))
                }
                Err(SendError::Connect(reason)) => Err(ProxyError::Connect {
                    service: name.to_string(),
                    endpoint: addr.to_string(),
                    reason,
                }
                .into()),
                Err(SendError::Upstream(reason)) => Err(ProxyError::Upstream {
                    service: name.to_string(),
                    reason,
                }
                .into()),
            }
        })
    }
}
