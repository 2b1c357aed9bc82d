//! The request timeout: how long a request may wait for its response
//! headers. Streaming bodies after that are not cut (a gRPC stream can run
//! for hours); the idle timeouts of the connections bound those.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use arc_swap::ArcSwap;
use tower::{Layer, Service};

use crate::BoxError;
use crate::errors::ProxyError;

/// The request timeout a listener applies now (`None`: no timeout). A
/// configuration change swaps it; each request reads it once, as it starts.
pub type SharedTimeout = Arc<ArcSwap<Option<Duration>>>;

#[derive(Clone, Debug)]
pub struct TimeoutLayer {
    timeout: SharedTimeout,
    service: Arc<str>,
}

impl TimeoutLayer {
    pub fn new(timeout: SharedTimeout, service: Arc<str>) -> Self {
        Self { timeout, service }
    }
}

#[derive(Clone, Debug)]
pub struct Timeout<S> {
    inner: S,
    timeout: SharedTimeout,
    service: Arc<str>,
}

impl<S> Layer<S> for TimeoutLayer {
    type Service = Timeout<S>;
    fn layer(&self, inner: S) -> Timeout<S> {
        Timeout {
            inner,
            timeout: self.timeout.clone(),
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
        let Some(timeout) = **self.timeout.load() else {
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Answers after `delay`.
    #[derive(Clone)]
    struct Slow(Duration);

    impl Service<()> for Slow {
        type Response = ();
        type Error = BoxError;
        type Future = Pin<Box<dyn Future<Output = Result<(), BoxError>> + Send>>;
        fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
            Poll::Ready(Ok(()))
        }
        fn call(&mut self, (): ()) -> Self::Future {
            let delay = self.0;
            Box::pin(async move {
                tokio::time::sleep(delay).await;
                Ok(())
            })
        }
    }

    #[tokio::test(start_paused = true)]
    async fn reads_the_timeout_current_when_each_request_starts() {
        let shared: SharedTimeout = Arc::new(ArcSwap::from_pointee(None));
        let mut svc = TimeoutLayer::new(shared.clone(), Arc::from("shop/api"))
            .layer(Slow(Duration::from_secs(5)));
        assert!(svc.call(()).await.is_ok(), "no timeout configured");

        shared.store(Arc::new(Some(Duration::from_secs(1))));
        let err = svc.call(()).await.expect_err("times out after the swap");
        assert!(err.to_string().contains("shop/api"), "{err}");

        // A request started before a swap keeps the timeout it started with.
        let started = svc.call(());
        shared.store(Arc::new(None));
        assert!(started.await.is_err());
        assert!(svc.call(()).await.is_ok());
    }
}
