//! Errors on the data path and the HTTP responses they become.
//!
//! Inner services fail with a [`ProxyError`]; the [`ErrorResponseLayer`] at
//! the top of every HTTP stack turns it into a short plain-text response that
//! names the service, so the app (and its operator) can tell a proxy-made
//! 502/504 from one its peer sent.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode, header};
use tower::{Layer, Service};

use crate::BoxError;
use crate::http::body::{self, ProxyBody};

/// Header set on every response the proxy makes itself (not on forwarded ones).
pub const PROXY_ERROR_HEADER: &str = "x-outrigger-error";

#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    /// The upstream refused the connection, or could not be reached in time.
    #[error("service {service} unavailable: cannot connect to {endpoint}: {reason}")]
    Connect {
        service: String,
        endpoint: String,
        reason: String,
    },
    /// The service has no endpoint to send to.
    #[error("service {service} unavailable: no endpoints")]
    NoEndpoints { service: String },
    /// The upstream did not answer within the request timeout.
    #[error("service {service} timed out after {timeout:?} waiting for a response")]
    Timeout { service: String, timeout: Duration },
    /// The client's request body failed before it could be forwarded.
    #[error("request body could not be read: {reason}")]
    ClientBody { reason: String },
    /// The connection to the upstream failed mid-request.
    #[error("service {service} failed: {reason}")]
    Upstream { service: String, reason: String },
    /// The destination's circuit breaker is at a limit.
    #[error("service {service} over its limit: {overflow}; failing fast")]
    Overflow {
        service: String,
        overflow: crate::circuit::Overflow,
    },
    /// Outlier detection has ejected every endpoint.
    #[error(
        "service {service} unavailable: all {endpoints} endpoint(s) ejected after failing in a row (outlierDetection); failing fast until one is tried again"
    )]
    AllEjected { service: String, endpoints: usize },
    /// Authorization refused the caller. The message names the request,
    /// never the policy.
    #[error("not authorized for {method} {path}")]
    Forbidden { method: String, path: String },
}

impl ProxyError {
    pub fn status(&self) -> StatusCode {
        match self {
            ProxyError::Connect { .. } | ProxyError::Upstream { .. } => StatusCode::BAD_GATEWAY,
            ProxyError::NoEndpoints { .. }
            | ProxyError::Overflow { .. }
            | ProxyError::AllEjected { .. } => StatusCode::SERVICE_UNAVAILABLE,
            ProxyError::ClientBody { .. } => StatusCode::BAD_REQUEST,
            ProxyError::Timeout { .. } => StatusCode::GATEWAY_TIMEOUT,
            ProxyError::Forbidden { .. } => StatusCode::FORBIDDEN,
        }
    }

    /// A short machine-readable reason, sent in [`PROXY_ERROR_HEADER`].
    pub fn kind(&self) -> &'static str {
        match self {
            ProxyError::Connect { .. } => "connect-failure",
            ProxyError::NoEndpoints { .. } => "no-endpoints",
            ProxyError::Overflow { .. } => "overflow",
            ProxyError::AllEjected { .. } => "circuit-open",
            ProxyError::ClientBody { .. } => "bad-request-body",
            ProxyError::Timeout { .. } => "timeout",
            ProxyError::Upstream { .. } => "upstream-reset",
            ProxyError::Forbidden { .. } => "forbidden",
        }
    }
}

/// Builds the plain-text response for a proxy-made error.
pub fn error_response(
    status: StatusCode,
    kind: &'static str,
    message: String,
) -> Response<ProxyBody> {
    let mut text = String::with_capacity(message.len() + 12);
    text.push_str("outrigger: ");
    text.push_str(&message);
    text.push('\n');
    let mut rsp = Response::new(body::full(Bytes::from(text)));
    *rsp.status_mut() = status;
    let headers = rsp.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    headers.insert(PROXY_ERROR_HEADER, HeaderValue::from_static(kind));
    rsp
}

/// Maps a boxed error from an inner service to a response.
pub fn to_response(error: BoxError) -> Response<ProxyBody> {
    match error.downcast::<ProxyError>() {
        Ok(e) => {
            tracing::debug!(error = %e, "request failed in the proxy");
            error_response(e.status(), e.kind(), e.to_string())
        }
        Err(other) => {
            tracing::warn!(error = %other, "unexpected error on the data path");
            error_response(
                StatusCode::BAD_GATEWAY,
                "proxy-error",
                format!("proxy error: {other}"),
            )
        }
    }
}

// === ErrorResponseLayer ===

/// Turns every inner error into an HTTP response, so the stack above it is
/// infallible (what hyper needs).
#[derive(Clone, Copy, Debug, Default)]
pub struct ErrorResponseLayer;

#[derive(Clone, Debug)]
pub struct ErrorResponse<S> {
    inner: S,
    /// A readiness failure, answered as a response on the next call.
    not_ready: Option<String>,
}

impl<S> Layer<S> for ErrorResponseLayer {
    type Service = ErrorResponse<S>;
    fn layer(&self, inner: S) -> Self::Service {
        ErrorResponse {
            inner,
            not_ready: None,
        }
    }
}

impl<S, Req> Service<Req> for ErrorResponse<S>
where
    S: Service<Req, Response = Response<ProxyBody>>,
    S::Error: Into<BoxError>,
    S::Future: Send + 'static,
{
    type Response = Response<ProxyBody>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Response<ProxyBody>, Infallible>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        match self.inner.poll_ready(cx) {
            Poll::Ready(Ok(())) => Poll::Ready(Ok(())),
            Poll::Ready(Err(e)) => {
                self.not_ready = Some(e.into().to_string());
                Poll::Ready(Ok(()))
            }
            Poll::Pending => Poll::Pending,
        }
    }

    fn call(&mut self, req: Req) -> Self::Future {
        if let Some(reason) = self.not_ready.take() {
            let rsp = error_response(
                StatusCode::SERVICE_UNAVAILABLE,
                "not-ready",
                format!("proxy not ready: {reason}"),
            );
            return Box::pin(std::future::ready(Ok(rsp)));
        }
        let fut = self.inner.call(req);
        Box::pin(async move {
            match fut.await {
                Ok(rsp) => Ok(rsp),
                Err(e) => Ok(to_response(e.into())),
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_match_the_failure() {
        let connect = ProxyError::Connect {
            service: "shop/api".into(),
            endpoint: "127.0.0.1:1".into(),
            reason: "connection refused".into(),
        };
        assert_eq!(connect.status(), StatusCode::BAD_GATEWAY);
        assert!(connect.to_string().contains("shop/api"));
        let timeout = ProxyError::Timeout {
            service: "shop/api".into(),
            timeout: Duration::from_millis(200),
        };
        assert_eq!(timeout.status(), StatusCode::GATEWAY_TIMEOUT);
        let rsp = to_response(Box::new(timeout));
        assert_eq!(rsp.status(), StatusCode::GATEWAY_TIMEOUT);
        assert_eq!(rsp.headers()[PROXY_ERROR_HEADER], "timeout");
    }
}
