//! The request timeout: how long a request may wait for its response
//! headers. Streaming bodies after that are not cut (a gRPC stream can run
//! for hours); the idle timeouts of the connections bound those.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tower::{Layer, Service};

use crate::BoxError;
use crate::errors::ProxyError;

#[derive(Clone, Debug)]
pub struct TimeoutLayer {
    timeout: Option<Duration>,
    service: Arc<str>,
}

impl TimeoutLayer {
    /// `None` disables the timeout.
    pub fn new(timeout: Option<Duration>, service: Arc<str>) -> Self {
        Self { timeout, service }
    }
}

#[derive(Clone, Debug)]
pub struct Timeout<S> {
    inner: S,
    timeout: Option<Duration>,
    service: Arc<str>,
}

impl<S> Layer<S> for TimeoutLayer {
    type Service = Timeout<S>;
    fn layer(&self, inner: S) -> Timeout<S> {
        Timeout {
            inner,
            timeout: self.timeout,
            service: self.service.clone(),
        }
    }
}

impl<S, Req> Service<Req> for Timeout<S>
where
    S: Service<Req>,
    S::Error: Into<BoxError>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<S::Response, BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, req: Req) -> Self::Future {
        let fut = self.inner.call(req);
        let Some(timeout) = self.timeout else {
            return Box::pin(async move { fut.await.map_err(Into::into) });
        };
        let service = self.service.clone();
        Box::pin(async move {
            match tokio::time::timeout(timeout, fut).await {
                Ok(result) => result.map_err(Into::into),
                Err(_) => Err(ProxyError::Timeout {
                    service: service.to_string(),
                    timeout,
                }
                .into()),
            }
        })
    }
}
