//! The one body type that flows through every stack.
//!
//! Requests and responses are boxed once at the edge so layers (and the
//! retry buffering that comes later) can wrap bodies without changing types.

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Full, combinators::UnsyncBoxBody};

use crate::BoxError;

pub type ProxyBody = UnsyncBoxBody<Bytes, BoxError>;

pub fn full(data: impl Into<Bytes>) -> ProxyBody {
    Full::new(data.into())
        .map_err(|e| match e {})
        .boxed_unsync()
}

pub fn empty() -> ProxyBody {
    Empty::new().map_err(|e| match e {}).boxed_unsync()
}

/// Boxes any body whose errors can be boxed.
pub fn boxed<B>(body: B) -> ProxyBody
where
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    body.map_err(Into::into).boxed_unsync()
}

/// Reads a body of known length up to `limit` bytes into memory (keeping
/// any trailers); anything else is boxed and streamed as it comes.
pub async fn buffer_if_small<B>(body: B, limit: u64) -> Result<ProxyBody, BoxError>
where
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    match body.size_hint().exact() {
        Some(len) if len > 0 && len <= limit => {
            let collected = body.collect().await.map_err(Into::into)?;
            if collected.trailers().is_some() {
                Ok(collected.map_err(|e| match e {}).boxed_unsync())
            } else {
                // `Full` keeps the exact length, so the next hop is sent a
                // Content-Length body rather than a chunked one.
                Ok(full(collected.to_bytes()))
            }
        }
        _ => Ok(boxed(body)),
    }
}

pin_project_lite::pin_project! {
    /// A body that holds `guard` until it ends (or is dropped): a request
    /// counted in flight stays counted while its response streams.
    pub struct Guarded<B, G> {
        #[pin]
        inner: B,
        guard: Option<G>,
    }
}

impl<B, G> Guarded<B, G> {
    pub fn new(inner: B, guard: G) -> Self {
        Self {
            inner,
            guard: Some(guard),
        }
    }
}

impl<B: http_body::Body, G> http_body::Body for Guarded<B, G> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<B::Data>, B::Error>>> {
        let this = self.project();
        let polled = this.inner.poll_frame(cx);
        if let std::task::Poll::Ready(None | Some(Err(_))) = polled {
            this.guard.take();
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body::Body as _;

    #[tokio::test]
    async fn small_known_bodies_are_buffered_whole() {
        let body = buffer_if_small(Full::new(Bytes::from_static(b"hello")), 16)
            .await
            .expect("buffer");
        assert_eq!(body.size_hint().exact(), Some(5));
        let data = body.collect().await.expect("collect").to_bytes();
        assert_eq!(data, "hello");
    }

    #[tokio::test]
    async fn large_bodies_stream() {
        let big = Full::new(Bytes::from(vec![0u8; 64]));
        let body = buffer_if_small(big, 16).await.expect("box");
        assert_eq!(body.size_hint().exact(), Some(64));
    }
}
