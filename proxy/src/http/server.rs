//! The server side of one downstream connection.
//!
//! The protocol is chosen from ALPN when the transport negotiated one, else
//! by sniffing for the HTTP/2 connection preface (h2c with prior knowledge);
//! anything else is served as HTTP/1.x. The limits here are what keeps the
//! proxy healthy in front of bad clients: oversized headers get 431, a
//! client that does not finish its headers in time is disconnected, and a
//! malformed request gets 400 from hyper.

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use http::{Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};
use tower::ServiceExt;
use tower::util::BoxCloneSyncService;

use super::body::ProxyBody;
use super::{ClientAddr, PeerId};
use crate::drain;
use crate::errors::error_response;
use crate::transport::{Accepted, Recheck};

const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// A whole HTTP stack, boxed at the listener boundary so signatures stay
/// readable.
pub type HttpService = BoxCloneSyncService<Request<Incoming>, Response<ProxyBody>, Infallible>;

/// Limits applied to every downstream HTTP connection.
#[derive(Clone, Debug)]
pub struct ServerSettings {
    /// Request line plus headers (HTTP/1), or the header list (HTTP/2).
    pub max_header_bytes: usize,
    /// Time allowed for a request's headers to arrive; also bounds how long
    /// an idle HTTP/1 keep-alive connection is kept.
    pub header_read_timeout: Duration,
}

impl Default for ServerSettings {
    fn default() -> Self {
        Self {
            max_header_bytes: 64 * 1024,
            header_read_timeout: Duration::from_secs(10),
        }
    }
}

/// Serves HTTP on one accepted connection until the client goes away or a
/// drain completes it gracefully.
pub fn serve<IO>(
    accepted: Accepted<IO>,
    service: HttpService,
    settings: ServerSettings,
    drain: drain::Watch,
) -> Pin<Box<dyn Future<Output = ()> + Send>>
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    Box::pin(serve_inner(accepted, service, settings, drain))
}

async fn serve_inner<IO>(
    accepted: Accepted<IO>,
    service: HttpService,
    settings: ServerSettings,
    mut drain: drain::Watch,
) where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let Accepted {
        io,
        peer,
        alpn,
        peer_id,
        recheck,
    } = accepted;
    let (version, io) = match alpn {
        Some(v) => (v, Rewind::new(Bytes::new(), io)),
        None => {
            let sniffed = tokio::select! {
                r = tokio::time::timeout(settings.header_read_timeout, sniff(io)) => r,
                _ = drain.signaled() => return,
            };
            match sniffed {
                Ok(Ok(Some(found))) => found,
                // EOF before a byte, a read error, or a client that sent
                // nothing in time: nothing to answer, just close.
                Ok(Ok(None)) | Ok(Err(_)) | Err(_) => return,
            }
        }
    };

    let client = ClientAddr(peer);
    let peer_id = peer_id.map(PeerId);
    let hyper_service = hyper::service::service_fn(move |mut req: Request<Incoming>| {
        let svc = service.clone();
        let peer_id = peer_id.clone();
        async move {
            if let Some(reason) = malformed(&req) {
                return Ok(error_response(
                    StatusCode::BAD_REQUEST,
                    "bad-request",
                    reason.to_string(),
                ));
            }
            req.extensions_mut().insert(client);
            if let Some(id) = peer_id {
                req.extensions_mut().insert(id);
            }
            svc.oneshot(req).await
        }
    });
    let io = TokioIo::new(io);
    // Close gracefully (in-flight requests finish, no new ones) when the
    // proxy drains, or when the mTLS verification this connection rests on
    // is due again; the peer's next request opens a fresh connection.
    // (Borrowing the drain watch, not taking it: the proxy's shutdown
    // waits for this connection for as long as the watch lives.)
    let stop = std::pin::pin!(async {
        tokio::select! {
            () = drain.signaled() => {}
            () = Recheck::due(recheck) => {
                tracing::debug!(%peer, "closing an mTLS connection: a certificate expired or the trust bundle changed");
            }
        }
    });

    let result = if version == http::Version::HTTP_2 {
        let mut builder = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
        builder
            .timer(TokioTimer::new())
            .max_header_list_size(u32::try_from(settings.max_header_bytes).unwrap_or(u32::MAX));
        drive_gracefully!(builder.serve_connection(io, hyper_service), stop)
    } else {
        let mut builder = hyper::server::conn::http1::Builder::new();
        builder
            .timer(TokioTimer::new())
            .header_read_timeout(settings.header_read_timeout)
            .max_header_size(settings.max_header_bytes);
        drive_gracefully!(
            builder.serve_connection(io, hyper_service).with_upgrades(),
            stop
        )
    };
    if let Err(error) = result {
        tracing::debug!(%peer, %error, "connection closed with an error");
    }
}

/// Runs a hyper connection to completion, switching it to a graceful
/// shutdown (finish in-flight requests, take no new ones) when `stop`
/// resolves. A macro rather than a generic function: the generic version
/// trips a rustc limitation proving the future `Send`.
macro_rules! drive_gracefully {
    ($conn:expr, $stop:expr) => {{
        let mut conn = std::pin::pin!($conn);
        tokio::select! {
            result = conn.as_mut() => result,
            () = $stop => {
                conn.as_mut().graceful_shutdown();
                conn.await
            }
        }
    }};
}
use drive_gracefully;

/// What hyper lets through but RFC 9112 says a server must refuse.
fn malformed(req: &Request<Incoming>) -> Option<&'static str> {
    if req.version() == http::Version::HTTP_11
        && req.uri().authority().is_none()
        && !req.headers().contains_key(http::header::HOST)
    {
        return Some("bad request: HTTP/1.1 requires a Host header");
    }
    None
}

/// Reads just enough to tell an HTTP/2 preface from anything else.
/// Returns `None` when the client closed before sending a byte.
async fn sniff<IO>(mut io: IO) -> io::Result<Option<(http::Version, Rewind<IO>)>>
where
    IO: AsyncRead + Unpin,
{
    // Read whatever the client sent (usually the whole first request), not
    // just the 24 preface bytes: it is replayed to hyper either way, and a
    // short read here would cost an extra syscall.
    let mut buf = BytesMut::with_capacity(8 * 1024);
    loop {
        let n = io.read_buf(&mut buf).await?;
        if n == 0 {
            if buf.is_empty() {
                return Ok(None);
            }
            // A partial request then EOF: let HTTP/1 answer it (400).
            return Ok(Some((
                http::Version::HTTP_11,
                Rewind::new(buf.freeze(), io),
            )));
        }
        let seen = buf.len().min(H2_PREFACE.len());
        if buf[..seen] != H2_PREFACE[..seen] {
            return Ok(Some((
                http::Version::HTTP_11,
                Rewind::new(buf.freeze(), io),
            )));
        }
        if buf.len() >= H2_PREFACE.len() {
            return Ok(Some((http::Version::HTTP_2, Rewind::new(buf.freeze(), io))));
        }
    }
}

/// An IO that replays bytes already read before reading from the inner IO.
#[derive(Debug)]
pub struct Rewind<IO> {
    prefix: Bytes,
    inner: IO,
}

impl<IO> Rewind<IO> {
    pub fn new(prefix: Bytes, inner: IO) -> Self {
        Self { prefix, inner }
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for Rewind<IO> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if !self.prefix.is_empty() {
            let n = self.prefix.len().min(buf.remaining());
            buf.put_slice(&self.prefix[..n]);
            self.prefix.advance(n);
            if self.prefix.is_empty() {
                // An emptied `Bytes` still pins its whole buffer; let it go
                // (8 KiB per idle connection otherwise).
                self.prefix = Bytes::new();
            }
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for Rewind<IO> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    #[tokio::test]
    async fn sniffs_h2_preface_and_replays_it() {
        let (mut client, server) = tokio::io::duplex(64);
        client.write_all(H2_PREFACE).await.expect("write");
        let (version, mut io) = sniff(server).await.expect("io").expect("some");
        assert_eq!(version, http::Version::HTTP_2);
        let mut replay = vec![0; H2_PREFACE.len()];
        io.read_exact(&mut replay).await.expect("replay");
        assert_eq!(replay, H2_PREFACE);
    }

    #[tokio::test]
    async fn anything_else_is_http1() {
        let (mut client, server) = tokio::io::duplex(64);
        client
            .write_all(b"GET / HTTP/1.1\r\n")
            .await
            .expect("write");
        let (version, mut io) = sniff(server).await.expect("io").expect("some");
        assert_eq!(version, http::Version::HTTP_11);
        let mut first = [0u8; 3];
        io.read_exact(&mut first).await.expect("replay");
        assert_eq!(&first, b"GET");
    }

    #[tokio::test]
    async fn eof_before_any_byte_is_none() {
        let (client, server) = tokio::io::duplex(64);
        drop(client);
        assert!(sniff(server).await.expect("io").is_none());
    }
}
