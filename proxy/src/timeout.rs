//! The request timeout: how long a request may wait for its response
//! headers. Streaming bodies after that are not cut (a gRPC stream can run
//! for hours); the idle timeouts of the connections bound those.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use http::Request;
use tower::{Layer, Service};

use crate::BoxError;
use crate::errors::ProxyError;
use crate::forward::SharedDestination;
use crate::transport::ClientTransport;

/// The destination's request timeout (by route prefix where the policy
/// has routes), read once per request as it starts: a configuration
/// change applies to the next request, and one in flight keeps its own.
#[derive(Debug)]
pub struct TimeoutLayer<T: ClientTransport> {
    destination: SharedDestination<T>,
}

impl<T: ClientTransport> TimeoutLayer<T> {
    pub fn new(destination: SharedDestination<T>) -> Self {
        Self { destination }
    }
}

#[derive(Debug)]
pub struct Timeout<S, T: ClientTransport> {
    inner: S,
    destination: SharedDestination<T>,
}

impl<S: Clone, T: ClientTransport> Clone for Timeout<S, T> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
            destination: self.destination.clone(),
        }
    }
}

impl<S, T: ClientTransport> Layer<S> for TimeoutLayer<T> {
    type Service = Timeout<S, T>;
    fn layer(&self, inner: S) -> Timeout<S, T> {
        Timeout {
            inner,
            destination: self.destination.clone(),
        }
    }
}

impl<S, T, B> Service<Request<B>> for Timeout<S, T>
where
    S: Service<Request<B>>,
    S::Error: Into<BoxError>,
    S::Future: Send + 'static,
    T: ClientTransport,
{
    type Response = S::Response;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<S::Response, BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        // The service name is only needed for a timeout error: taken (an
        // Arc clone) only when there is a timeout.
        let timeout = {
            let dest = self.destination.load();
            dest.request_timeout(req.uri().path())
                .map(|timeout| (timeout, dest.name.clone()))
        };
        let fut = self.inner.call(req);
        let Some((timeout, service)) = timeout else {
            return Box::pin(async move { fut.await.map_err(Into::into) });
        };
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
    use std::sync::Arc;
    use std::time::Duration;

    use arc_swap::ArcSwap;
    use outrigger_config::RouteTimeouts;

    use crate::forward::{Destination, DestinationPolicy};
    use crate::http::client::ClientSettings;
    use crate::transport::Plaintext;

    /// Answers after the number of seconds in the path (`/5`).
    #[derive(Clone)]
    struct Slow;

    impl Service<Request<()>> for Slow {
        type Response = ();
        type Error = BoxError;
        type Future = Pin<Box<dyn Future<Output = Result<(), BoxError>> + Send>>;
        fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
            Poll::Ready(Ok(()))
        }
        fn call(&mut self, req: Request<()>) -> Self::Future {
            let secs: u64 = req.uri().path()[1..].parse().unwrap_or(0);
            Box::pin(async move {
                tokio::time::sleep(Duration::from_secs(secs)).await;
                Ok(())
            })
        }
    }

    fn destination(policy: DestinationPolicy) -> Destination<Plaintext> {
        Destination::new(
            Arc::from("shop/api"),
            &[],
            &ClientSettings::default(),
            &policy,
        )
    }

    fn get(path: &str) -> Request<()> {
        Request::get(path).body(()).expect("request")
    }

    #[tokio::test(start_paused = true)]
    async fn reads_the_timeout_current_when_each_request_starts() {
        let shared = Arc::new(ArcSwap::from_pointee(destination(
            DestinationPolicy::default(),
        )));
        let mut svc = TimeoutLayer::new(shared.clone()).layer(Slow);
        assert!(svc.call(get("/5")).await.is_ok(), "no timeout configured");

        let with = |timeout: Option<Duration>| {
            Arc::new(destination(DestinationPolicy {
                request_timeout: timeout,
                ..DestinationPolicy::default()
            }))
        };
        shared.store(with(Some(Duration::from_secs(1))));
        let err = svc
            .call(get("/5"))
            .await
            .expect_err("times out after the swap");
        assert!(err.to_string().contains("shop/api"), "{err}");

        // A request started before a swap keeps the timeout it started with.
        let started = svc.call(get("/5"));
        shared.store(with(None));
        assert!(started.await.is_err());
        assert!(svc.call(get("/5")).await.is_ok());
    }

    #[tokio::test(start_paused = true)]
    async fn a_route_prefix_has_its_own_timeout() {
        let shared = Arc::new(ArcSwap::from_pointee(destination(DestinationPolicy {
            request_timeout: Some(Duration::from_secs(1)),
            routes: vec![RouteTimeouts {
                path_prefix: "/1".into(),
                request: Some(Duration::from_secs(20)),
                per_try: None,
            }],
            ..DestinationPolicy::default()
        })));
        let mut svc = TimeoutLayer::new(shared).layer(Slow);
        assert!(svc.call(get("/10")).await.is_ok(), "/10 matches /1: 20s");
        assert!(svc.call(get("/5")).await.is_err(), "the default: 1s");
    }
}
