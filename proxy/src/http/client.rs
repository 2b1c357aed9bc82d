//! The pooled HTTP client to one upstream endpoint.
//!
//! Each endpoint gets its own pair of hyper clients (HTTP/1.1 and HTTP/2
//! prior knowledge), whose connector always dials that endpoint whatever the
//! request's authority says. So the request keeps its original `Host` /
//! `:authority`, and the pools never mix endpoints. The request's HTTP
//! version is kept hop by hop: an HTTP/2 (gRPC) request stays HTTP/2.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http::uri::{Authority, PathAndQuery, Scheme, Uri};
use http::{Request, Response, Version, header};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::{Connected, Connection};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};

use super::body::ProxyBody;
use crate::circuit::{Limits, Overflow, Permit};
use crate::orig_proto;
use crate::tls::Alpn;
use crate::transport::ClientTransport;

/// How upstream connections are made and kept.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClientSettings {
    pub connect_timeout: Duration,
    /// Idle pooled connections are closed after this long.
    pub pool_idle_timeout: Duration,
    /// Largest response header section accepted from the upstream.
    pub max_header_bytes: usize,
}

impl Default for ClientSettings {
    fn default() -> Self {
        Self {
            connect_timeout: Duration::from_secs(1),
            pool_idle_timeout: Duration::from_secs(90),
            max_header_bytes: 64 * 1024,
        }
    }
}

/// Why a request to an endpoint failed.
#[derive(Debug)]
pub enum SendError {
    /// No connection could be made; the request was not sent.
    Connect(String),
    /// The connection failed while the request was in flight.
    Upstream(String),
    /// A new connection was needed, but the destination's circuit breaker
    /// is at its limit; the request was not sent.
    Overflow(Overflow),
}

/// Sends requests to one endpoint over pooled, kept-alive connections.
#[derive(Clone, Debug)]
pub struct EndpointClient<T: ClientTransport> {
    addr: SocketAddr,
    transport: T,
    authority: Authority,
    h1: Client<FixedConnector<T>, ProxyBody>,
    h2: Client<FixedConnector<T>, ProxyBody>,
}

impl<T: ClientTransport> EndpointClient<T> {
    /// `limits`: the destination's circuit breaker, which counts this
    /// endpoint's connections with the others'.
    pub fn new(
        transport: T,
        addr: SocketAddr,
        settings: &ClientSettings,
        limits: Arc<Limits>,
    ) -> Self {
        let connector = FixedConnector {
            transport: transport.clone(),
            addr,
            connect_timeout: settings.connect_timeout,
            alpn: Alpn::Http1,
            limits,
        };
        let mut builder = Client::builder(TokioExecutor::new());
        builder
            .timer(TokioTimer::new())
            .pool_timer(TokioTimer::new())
            .pool_idle_timeout(settings.pool_idle_timeout)
            // hyper retries only a request it hands back unsent, when a
            // pooled connection turns out closed before the request was
            // written (a peer closing gracefully, say, as sidecars do when
            // a certificate expires): safe for any method.
            .retry_canceled_requests(true)
            .http2_max_header_list_size(
                u32::try_from(settings.max_header_bytes).unwrap_or(u32::MAX),
            );
        let h1 = builder.build(connector.clone());
        builder.http2_only(true);
        let h2 = builder.build(FixedConnector {
            alpn: Alpn::Http2,
            ..connector
        });
        let authority = Authority::try_from(addr.to_string().as_str())
            .unwrap_or_else(|_| Authority::from_static("upstream"));
        Self {
            addr,
            transport,
            authority,
            h1,
            h2,
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// How its connections are made.
    pub fn transport(&self) -> &T {
        &self.transport
    }

    /// Sends a request, keeping its version, method, headers and body.
    pub fn send(
        &self,
        mut req: Request<ProxyBody>,
    ) -> impl Future<Output = Result<Response<Incoming>, SendError>> + Send + 'static {
        let carried = self.transport.multiplexes_http1() && orig_proto::upgrade(&mut req);
        let is_h2 = req.version() == Version::HTTP_2;
        let authority = if is_h2 {
            // HTTP/2 carries the authority in the URI (:authority); keep the
            // one the client sent.
            req.uri()
                .authority()
                .cloned()
                .or_else(|| host_authority(&req))
                .unwrap_or_else(|| self.authority.clone())
        } else {
            // HTTP/1 keeps the Host header as sent; the URI authority only
            // keys the pool, which is per endpoint anyway.
            if !req.headers().contains_key(header::HOST)
                && let Some(a) = req.uri().authority()
                && let Ok(v) = http::HeaderValue::from_str(a.as_str())
            {
                req.headers_mut().insert(header::HOST, v);
            }
            self.authority.clone()
        };
        let path = req
            .uri()
            .path_and_query()
            .cloned()
            .unwrap_or_else(|| PathAndQuery::from_static("/"));
        let mut parts = http::uri::Parts::default();
        parts.scheme = Some(Scheme::HTTP);
        parts.authority = Some(authority);
        parts.path_and_query = Some(path);
        let uri = Uri::from_parts(parts);
        let client = if is_h2 { &self.h2 } else { &self.h1 };
        let fut = match uri {
            Ok(uri) => {
                *req.uri_mut() = uri;
                Ok(client.request(req))
            }
            Err(e) => Err(SendError::Upstream(format!(
                "cannot build upstream URI: {e}"
            ))),
        };
        async move {
            let mut rsp = fut?.await.map_err(|e| {
                if let Some(overflow) = find_overflow(&e) {
                    SendError::Overflow(overflow)
                } else if e.is_connect() {
                    SendError::Connect(error_chain(&e))
                } else {
                    SendError::Upstream(error_chain(&e))
                }
            })?;
            if carried {
                // The app asked in HTTP/1.1 and gets its answer so.
                *rsp.version_mut() = Version::HTTP_11;
            }
            Ok(rsp)
        }
    }
}

fn host_authority<B>(req: &Request<B>) -> Option<Authority> {
    let host = req.headers().get(header::HOST)?.to_str().ok()?;
    Authority::try_from(host).ok()
}

/// The circuit breaker's refusal, if that is what stopped a connection.
fn find_overflow(e: &(dyn std::error::Error + 'static)) -> Option<Overflow> {
    let mut next = Some(e);
    while let Some(error) = next {
        if let Some(overflow) = error.downcast_ref::<Overflow>() {
            return Some(*overflow);
        }
        if let Some(overflow) = error
            .downcast_ref::<io::Error>()
            .and_then(|io| io.get_ref())
            .and_then(|inner| inner.downcast_ref::<Overflow>())
        {
            return Some(*overflow);
        }
        next = error.source();
    }
    None
}

/// The most specific cause of an error, e.g. "connection refused" rather
/// than "client error (Connect)".
fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut innermost = e;
    while let Some(next) = innermost.source() {
        innermost = next;
    }
    innermost.to_string()
}

// === FixedConnector ===

/// A hyper connector that always dials one address through a transport.
#[derive(Clone, Debug)]
pub struct FixedConnector<T> {
    transport: T,
    addr: SocketAddr,
    connect_timeout: Duration,
    /// What this pool's connections carry (offered by ALPN over TLS).
    alpn: Alpn,
    limits: Arc<Limits>,
}

impl<T: ClientTransport> tower::Service<Uri> for FixedConnector<T> {
    type Response = UpstreamIo<T::Io>;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = io::Result<UpstreamIo<T::Io>>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: Uri) -> Self::Future {
        let transport = self.transport.clone();
        let addr = self.addr;
        let timeout = self.connect_timeout;
        let alpn = self.alpn;
        let limits = self.limits.clone();
        Box::pin(async move {
            let pending = limits.admit_connect().map_err(io::Error::other)?;
            let io = transport.connect(addr, timeout, alpn).await?;
            let open = pending.connected().map_err(io::Error::other)?;
            Ok(UpstreamIo {
                io: TokioIo::new(io),
                _open: open,
            })
        })
    }
}

/// An upstream connection as hyper's pool wants it. It holds its place
/// under the destination's `maxConnections` until it closes.
#[derive(Debug)]
pub struct UpstreamIo<IO> {
    io: TokioIo<IO>,
    _open: Permit,
}

impl<IO> Connection for UpstreamIo<IO> {
    fn connected(&self) -> Connected {
        Connected::new()
    }
}

impl<IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin> hyper::rt::Read for UpstreamIo<IO> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: hyper::rt::ReadBufCursor<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin> hyper::rt::Write for UpstreamIo<IO> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }
}
