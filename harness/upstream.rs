//! Real servers for the proxy to forward to: an HTTP app (HTTP/1.1 and
//! h2c), an opaque TCP echo server, and a port nobody listens on.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, StreamBody, combinators::BoxBody};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

type BoxError = Box<dyn std::error::Error + Send + Sync>;
type Body = BoxBody<Bytes, BoxError>;

/// A test HTTP app. Routes:
/// - `/headers`: JSON of the method, path, version and request headers
/// - `/echo`: the request body streamed back
/// - `/slow?ms=N`: answers after N ms
/// - `/status?code=N`: answers with status N
/// - `/bytes?n=N`: N bytes of body (with a Content-Length up to 1 MiB,
///   streamed in 64 KiB chunks above that)
/// - `/flaky?percent=P`: 503 for P% of this app's requests, spread evenly
///   (never two in a row below 50%), 200 otherwise
/// - `/reset`: closes the connection without an answer
/// - `/hang`: answers after 60 s (tests give up long before)
///
/// Every response carries `x-upstream: <name>`. [`Misbehaviour`] makes
/// every route fail or go slow, and can change while the app runs.
pub struct HttpUpstream {
    pub addr: SocketAddr,
    /// Requests seen so far; a watch so tests can wait for one to arrive.
    requests: tokio::sync::watch::Sender<usize>,
    connections: Arc<AtomicUsize>,
    misbehaviour: Arc<std::sync::Mutex<Misbehaviour>>,
    task: tokio::task::JoinHandle<()>,
}

/// What an [`HttpUpstream`] does to every request, whatever the route.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Misbehaviour {
    #[default]
    None,
    /// Answers this status.
    Status(u16),
    /// Answers 503 to the app's first N requests (counted from its start).
    FailFirst(usize),
    /// Waits this long before answering.
    Delay(Duration),
}

impl HttpUpstream {
    pub async fn start(name: &'static str) -> Self {
        Self::start_with(name, Misbehaviour::None).await
    }

    pub async fn start_with(name: &'static str, misbehaviour: Misbehaviour) -> Self {
        let misbehaviour = Arc::new(std::sync::Mutex::new(misbehaviour));
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind upstream");
        let addr = listener.local_addr().expect("addr");
        let requests = tokio::sync::watch::Sender::new(0usize);
        let connections = Arc::new(AtomicUsize::new(0));
        let counter = requests.clone();
        let conns = connections.clone();
        let behaviour = misbehaviour.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                conns.fetch_add(1, Ordering::Relaxed);
                let counter = counter.clone();
                let behaviour = behaviour.clone();
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req| {
                        let mut seen = 0;
                        counter.send_modify(|n| {
                            *n += 1;
                            seen = *n;
                        });
                        let now = *behaviour.lock().unwrap_or_else(|e| e.into_inner());
                        misbehave(name, req, seen, now)
                    });
                    let _ = auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        Self {
            addr,
            requests,
            connections,
            misbehaviour,
            task,
        }
    }

    /// Changes what the app does from the next request on.
    pub fn set_misbehaviour(&self, misbehaviour: Misbehaviour) {
        *self.misbehaviour.lock().unwrap_or_else(|e| e.into_inner()) = misbehaviour;
    }

    pub fn requests(&self) -> usize {
        *self.requests.borrow()
    }

    /// Waits (at most 10 s) until the app has seen at least `n` requests.
    pub async fn wait_for_requests(&self, n: usize) {
        let mut rx = self.requests.subscribe();
        tokio::time::timeout(Duration::from_secs(10), rx.wait_for(|seen| *seen >= n))
            .await
            .unwrap_or_else(|_| panic!("the app never saw {n} request(s)"))
            .expect("upstream alive");
    }

    /// Connections accepted so far (to check the proxy pools them).
    pub fn connections(&self) -> usize {
        self.connections.load(Ordering::Relaxed)
    }
}

impl Drop for HttpUpstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn query_param(req: &Request<Incoming>, key: &str) -> Option<u64> {
    req.uri().query()?.split('&').find_map(|kv| {
        let (k, v) = kv.split_once('=')?;
        (k == key).then(|| v.parse().ok()).flatten()
    })
}

async fn misbehave(
    name: &'static str,
    req: Request<Incoming>,
    nth: usize,
    misbehaviour: Misbehaviour,
) -> Result<Response<Body>, BoxError> {
    match misbehaviour {
        Misbehaviour::None => {}
        Misbehaviour::Status(code) => {
            let mut rsp = Response::new(full(format!("{name} misbehaving: {code}")));
            *rsp.status_mut() =
                StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            rsp.headers_mut()
                .insert("x-upstream", http::HeaderValue::from_static(name));
            return Ok(rsp);
        }
        Misbehaviour::Delay(delay) => tokio::time::sleep(delay).await,
        Misbehaviour::FailFirst(n) if nth <= n => {
            let mut rsp = Response::new(full(format!("{name}: failure {nth} of the first {n}")));
            *rsp.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
            rsp.headers_mut()
                .insert("x-upstream", http::HeaderValue::from_static(name));
            return Ok(rsp);
        }
        Misbehaviour::FailFirst(_) => {}
    }
    match req.uri().path() {
        // hyper closes the connection when the service fails.
        "/reset" => Err("reset on purpose".into()),
        "/flaky" => {
            let percent = query_param(&req, "percent").unwrap_or(0).min(100) as usize;
            // Request n fails when it crosses a multiple of 100/P.
            let fails = (nth * percent) / 100 != ((nth - 1) * percent) / 100;
            let code = if fails { 503 } else { 200 };
            let mut rsp = Response::new(full(format!("flaky: {code}")));
            *rsp.status_mut() = StatusCode::from_u16(code).unwrap_or(StatusCode::OK);
            rsp.headers_mut()
                .insert("x-upstream", http::HeaderValue::from_static(name));
            Ok(rsp)
        }
        "/hang" => {
            tokio::time::sleep(Duration::from_secs(60)).await;
            Ok(Response::new(full("late")))
        }
        _ => Ok(handle(name, req).await),
    }
}

async fn handle(name: &'static str, req: Request<Incoming>) -> Response<Body> {
    let mut rsp = match req.uri().path() {
        "/headers" => {
            let mut headers: BTreeMap<String, Vec<String>> = BTreeMap::new();
            for (k, v) in req.headers() {
                headers
                    .entry(k.as_str().to_string())
                    .or_default()
                    .push(String::from_utf8_lossy(v.as_bytes()).into_owned());
            }
            let doc = serde_json::json!({
                "method": req.method().as_str(),
                "path": req.uri().path_and_query().map(|p| p.as_str()),
                "authority": req.uri().authority().map(|a| a.as_str()),
                "version": format!("{:?}", req.version()),
                "headers": headers,
            });
            Response::new(full(doc.to_string()))
        }
        "/echo" => {
            // Stream the body back as it arrives.
            Response::new(req.into_body().map_err(BoxError::from).boxed())
        }
        "/slow" => {
            let ms = query_param(&req, "ms").unwrap_or(1000);
            tokio::time::sleep(Duration::from_millis(ms)).await;
            Response::new(full("slow done"))
        }
        "/status" => {
            let code = query_param(&req, "code").unwrap_or(200);
            let mut rsp = Response::new(full(format!("status {code}")));
            *rsp.status_mut() = StatusCode::from_u16(code as u16).unwrap_or(StatusCode::OK);
            rsp
        }
        "/bytes" => {
            let n = query_param(&req, "n").unwrap_or(0) as usize;
            if n <= 1024 * 1024 {
                // Small: one body with a Content-Length, as most apps send.
                Response::new(full(vec![b'x'; n]))
            } else {
                // Large: streamed in 64 KiB chunks (chunked encoding on HTTP/1.1).
                let chunk = Bytes::from(vec![b'x'; 64 * 1024]);
                let chunks = (0..n.div_ceil(chunk.len())).map(move |i| {
                    let len = chunk.len().min(n - i * chunk.len());
                    Ok::<_, BoxError>(Frame::data(chunk.slice(..len)))
                });
                let stream = futures_util::stream::iter(chunks);
                Response::new(BodyExt::boxed(StreamBody::new(stream)))
            }
        }
        _ => {
            let mut rsp = Response::new(full("not found"));
            *rsp.status_mut() = StatusCode::NOT_FOUND;
            rsp
        }
    };
    rsp.headers_mut()
        .insert("x-upstream", http::HeaderValue::from_static(name));
    rsp
}

fn full(s: impl Into<Bytes>) -> Body {
    Full::new(s.into()).map_err(|e| match e {}).boxed()
}

/// A TCP server that echoes every byte, and on EOF from the client sends
/// "bye" and closes (to prove half-close works both ways).
pub struct TcpEcho {
    pub addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl TcpEcho {
    pub async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind echo");
        let addr = listener.local_addr().expect("addr");
        let task = tokio::spawn(async move {
            loop {
                let Ok((mut stream, _)) = listener.accept().await else {
                    continue;
                };
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 16 * 1024];
                    loop {
                        match stream.read(&mut buf).await {
                            Ok(0) | Err(_) => break,
                            Ok(n) => {
                                if stream.write_all(&buf[..n]).await.is_err() {
                                    return;
                                }
                            }
                        }
                    }
                    let _ = stream.write_all(b"bye").await;
                    let _ = stream.shutdown().await;
                });
            }
        });
        Self { addr, task }
    }
}

impl Drop for TcpEcho {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// An HTTP/1.1 server that accepts any `Upgrade` (as a WebSocket server
/// would) with `101 Switching Protocols`, then echoes every byte.
pub struct UpgradeEcho {
    pub addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl UpgradeEcho {
    pub async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let service =
                        hyper::service::service_fn(|mut req: Request<Incoming>| async move {
                            let Some(protocol) = req.headers().get(http::header::UPGRADE).cloned()
                            else {
                                let mut rsp = Response::new(full("upgrade required"));
                                *rsp.status_mut() = StatusCode::UPGRADE_REQUIRED;
                                return Ok::<_, Infallible>(rsp);
                            };
                            let on_upgrade = hyper::upgrade::on(&mut req);
                            tokio::spawn(async move {
                                if let Ok(upgraded) = on_upgrade.await {
                                    let (mut r, mut w) = tokio::io::split(TokioIo::new(upgraded));
                                    let _ = tokio::io::copy(&mut r, &mut w).await;
                                }
                            });
                            let mut rsp = Response::new(full(""));
                            *rsp.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
                            rsp.headers_mut().insert(http::header::UPGRADE, protocol);
                            rsp.headers_mut().insert(
                                http::header::CONNECTION,
                                http::HeaderValue::from_static("upgrade"),
                            );
                            Ok(rsp)
                        });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .with_upgrades()
                        .await;
                });
            }
        });
        Self { addr, task }
    }
}

impl Drop for UpgradeEcho {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Asks `addr` to upgrade to `protocol` over a fresh connection, then
/// sends `message` on the upgraded connection and returns the `101` head
/// and what came back (bounded in time).
pub async fn upgrade_roundtrip(
    addr: SocketAddr,
    protocol: &str,
    message: &[u8],
) -> (String, Vec<u8>) {
    let exchange = async {
        let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
        let head = format!(
            "GET /chat HTTP/1.1\r\nHost: chat\r\nConnection: Upgrade\r\nUpgrade: {protocol}\r\n\r\n"
        );
        stream.write_all(head.as_bytes()).await.expect("write");
        let mut answer = Vec::new();
        let mut byte = [0u8; 1];
        while !answer.ends_with(b"\r\n\r\n") {
            if stream.read(&mut byte).await.expect("read head") == 0 {
                break;
            }
            answer.push(byte[0]);
        }
        let head = String::from_utf8_lossy(&answer).into_owned();
        if !head.starts_with("HTTP/1.1 101") {
            return (head, Vec::new());
        }
        stream.write_all(message).await.expect("write message");
        let mut echoed = vec![0u8; message.len()];
        stream.read_exact(&mut echoed).await.expect("read echo");
        (head, echoed)
    };
    tokio::time::timeout(Duration::from_secs(10), exchange)
        .await
        .expect("upgrade round trip in time")
}

/// An address where nothing listens (bound, then released).
pub async fn closed_port() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    listener.local_addr().expect("addr")
}
