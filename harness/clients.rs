//! Real clients: hyper over HTTP/1.1 and HTTP/2 (h2c prior knowledge), and
//! raw TCP for the malformed inputs no well-behaved client sends.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Full, combinators::BoxBody};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
pub type ClientBody = BoxBody<Bytes, BoxError>;

/// An HTTP/1.1 client with a keep-alive pool.
pub fn http1() -> Client<HttpConnector, ClientBody> {
    Client::builder(TokioExecutor::new()).build_http()
}

/// An HTTP/2 client (h2c, prior knowledge).
pub fn http2() -> Client<HttpConnector, ClientBody> {
    Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build_http()
}

pub fn body(data: impl Into<Bytes>) -> ClientBody {
    Full::new(data.into()).map_err(|e| match e {}).boxed()
}

pub fn empty() -> ClientBody {
    body(Bytes::new())
}

pub fn get(addr: SocketAddr, path: &str) -> Request<ClientBody> {
    Request::get(format!("http://{addr}{path}"))
        .body(empty())
        .expect("request")
}

/// Collects a response body (bounded in time).
pub async fn read_body(rsp: Response<Incoming>) -> Result<Bytes, BoxError> {
    let collected =
        tokio::time::timeout(Duration::from_secs(30), rsp.into_body().collect()).await??;
    Ok(collected.to_bytes())
}

/// One-off HTTP/1.1 GET: status and body.
pub async fn http1_get(addr: SocketAddr, path: &str) -> Result<(u16, Bytes), BoxError> {
    let rsp =
        tokio::time::timeout(Duration::from_secs(10), http1().request(get(addr, path))).await??;
    let status = rsp.status().as_u16();
    Ok((status, read_body(rsp).await?))
}

/// A whole answer: status, headers and body.
pub struct Answer {
    pub status: u16,
    pub headers: http::HeaderMap,
    pub body: Bytes,
}

impl Answer {
    /// A header's value, or "" when it is absent or not text.
    pub fn header(&self, name: &str) -> String {
        self.headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string()
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// Sends `req` over a fresh HTTP/1.1 client and reads the whole answer
/// (bounded in time).
pub async fn exchange(req: Request<ClientBody>) -> Answer {
    let rsp = tokio::time::timeout(Duration::from_secs(10), http1().request(req))
        .await
        .expect("answered in time")
        .expect("response");
    let status = rsp.status().as_u16();
    let headers = rsp.headers().clone();
    let body = read_body(rsp).await.expect("body");
    Answer {
        status,
        headers,
        body,
    }
}

/// GETs `path` from `addr` with `client` (bounded in time): the status and
/// the `x-upstream` header, which names the test app that answered.
pub async fn upstream_of(
    client: &Client<HttpConnector, ClientBody>,
    addr: SocketAddr,
    path: &str,
) -> (u16, String) {
    let rsp = tokio::time::timeout(Duration::from_secs(10), client.request(get(addr, path)))
        .await
        .expect("answered in time")
        .expect("response");
    let status = rsp.status().as_u16();
    let upstream = rsp
        .headers()
        .get("x-upstream")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    read_body(rsp).await.expect("body");
    (status, upstream)
}

/// Writes raw bytes on a fresh connection and reads until the server
/// closes or `within` passes; returns what came back.
pub async fn raw_exchange(addr: SocketAddr, bytes: &[u8], within: Duration) -> String {
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    stream.write_all(bytes).await.expect("write");
    let mut out = Vec::new();
    let _ = tokio::time::timeout(within, stream.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}
