//! HTTP/1.1 carried over HTTP/2 between sidecars, as Linkerd does.
//!
//! Over mTLS the outbound sidecar sends the app's HTTP/1.1 requests on one
//! multiplexed HTTP/2 connection per endpoint, marked with
//! `x-outrigger-orig-proto: HTTP/1.1`, so a busy service does not open a
//! TLS connection per request in flight. The inbound sidecar sees the
//! mark, removes it, and hands the app HTTP/1.1 again. Requests that ask
//! to upgrade the connection (WebSocket, `CONNECT`) are not multiplexed.

use std::task::{Context, Poll};

use http::header::{self, HeaderName, HeaderValue};
use http::{Method, Request, Version};
use tower::{Layer, Service};

pub const ORIG_PROTO: HeaderName = HeaderName::from_static("x-outrigger-orig-proto");
const HTTP_11: &str = "HTTP/1.1";

/// Outbound: whether `req` may ride HTTP/2 to the next sidecar; if so,
/// marks it and makes it an HTTP/2 request. The caller turns the response
/// back into HTTP/1.1.
pub fn upgrade<B>(req: &mut Request<B>) -> bool {
    let upgradable = req.version() == Version::HTTP_11
        && req.method() != Method::CONNECT
        && !req.headers().contains_key(header::UPGRADE);
    if upgradable {
        *req.version_mut() = Version::HTTP_2;
        req.headers_mut()
            .insert(ORIG_PROTO, HeaderValue::from_static(HTTP_11));
    }
    upgradable
}

/// Inbound: an HTTP/2 request a sidecar marked goes on as the HTTP/1.1
/// request it was. Any other use of the header is dropped.
pub fn downgrade<B>(req: &mut Request<B>) {
    let Some(mark) = req.headers_mut().remove(ORIG_PROTO) else {
        return;
    };
    if req.version() == Version::HTTP_2 && mark == HTTP_11 {
        *req.version_mut() = Version::HTTP_11;
    }
}

/// [`downgrade`] as a layer, for the inbound stack.
#[derive(Clone, Copy, Debug, Default)]
pub struct DowngradeLayer;

#[derive(Clone, Debug)]
pub struct Downgrade<S> {
    inner: S,
}

impl<S> Layer<S> for DowngradeLayer {
    type Service = Downgrade<S>;
    fn layer(&self, inner: S) -> Downgrade<S> {
        Downgrade { inner }
    }
}

impl<S, B> Service<Request<B>> for Downgrade<S>
where
    S: Service<Request<B>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<B>) -> Self::Future {
        downgrade(&mut req);
        self.inner.call(req)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(version: Version, method: Method) -> Request<()> {
        let mut req = Request::new(());
        *req.version_mut() = version;
        *req.method_mut() = method;
        req
    }

    #[test]
    fn http11_goes_over_h2_and_comes_back() {
        let mut req = request(Version::HTTP_11, Method::POST);
        assert!(upgrade(&mut req));
        assert_eq!(req.version(), Version::HTTP_2);
        downgrade(&mut req);
        assert_eq!(req.version(), Version::HTTP_11);
        assert!(!req.headers().contains_key(ORIG_PROTO));
    }

    #[test]
    fn upgrades_connect_http10_and_h2_stay_as_they_are() {
        let mut connect = request(Version::HTTP_11, Method::CONNECT);
        assert!(!upgrade(&mut connect));
        let mut websocket = request(Version::HTTP_11, Method::GET);
        websocket
            .headers_mut()
            .insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        assert!(!upgrade(&mut websocket));
        assert!(!upgrade(&mut request(Version::HTTP_10, Method::GET)));
        let mut h2 = request(Version::HTTP_2, Method::GET);
        assert!(!upgrade(&mut h2));
        assert!(!h2.headers().contains_key(ORIG_PROTO));
    }

    #[test]
    fn a_mark_on_plain_http11_is_dropped() {
        let mut req = request(Version::HTTP_11, Method::GET);
        req.headers_mut()
            .insert(ORIG_PROTO, HeaderValue::from_static("HTTP/1.1"));
        downgrade(&mut req);
        assert_eq!(req.version(), Version::HTTP_11);
        assert!(!req.headers().contains_key(ORIG_PROTO));
    }
}
