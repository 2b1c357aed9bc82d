//! Bad input from clients and failing upstreams: every case gets a clear
//! answer, and the proxy keeps serving the next request.

use std::time::{Duration, Instant};

use http::Request;
use outrigger_e2e::clients::{self, get, raw_exchange, read_body};
use outrigger_e2e::upstream::{HttpUpstream, closed_port};
use outrigger_e2e::{Pair, ProxyBuilder, mesh};

/// A request that must still work after each bad one.
async fn still_serving(addr: std::net::SocketAddr) {
    let (status, _) = clients::http1_get(addr, "/status?code=200")
        .await
        .expect("proxy still serving");
    assert_eq!(status, 200);
}

#[tokio::test]
async fn malformed_request_gets_400() {
    let app = HttpUpstream::start("api").await;
    let mesh = Pair::start(app.addr, "http", "").await;
    for garbage in [
        &b"THIS IS NOT HTTP\r\n\r\n"[..],
        b"GET / HTTP/1.1\r\nHost: x\r\nBad Header Name: y\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: 7\r\n\r\nhello",
    ] {
        let answer = raw_exchange(mesh.outbound, garbage, Duration::from_secs(5)).await;
        assert!(answer.starts_with("HTTP/1.1 400"), "got {answer:?}");
    }
    assert_eq!(app.requests(), 0, "nothing malformed reached the app");
    still_serving(mesh.outbound).await;
}

#[tokio::test]
async fn oversized_headers_get_431_and_large_ones_pass() {
    let app = HttpUpstream::start("api").await;
    let mesh = Pair::start(app.addr, "http", "").await;
    let client = clients::http1();

    // 40 KiB of headers: more than many proxies' 16 KiB default, under our 64 KiB.
    let big = "b".repeat(40 * 1024);
    let req = Request::get(format!("http://{}/status?code=200", mesh.outbound))
        .header("x-big", &big)
        .body(clients::empty())
        .expect("request");
    let rsp = client.request(req).await.expect("response");
    assert_eq!(rsp.status(), 200, "40 KiB of headers pass both sidecars");

    let huge = "h".repeat(70 * 1024);
    let raw = format!("GET / HTTP/1.1\r\nHost: x\r\nX-Huge: {huge}\r\n\r\n");
    let answer = raw_exchange(mesh.outbound, raw.as_bytes(), Duration::from_secs(5)).await;
    assert!(
        answer.starts_with("HTTP/1.1 431"),
        "got {:?}",
        &answer[..answer.len().min(80)]
    );

    // HTTP/2 has its own header-list limit, same size.
    let req = Request::get(format!("http://{}/status?code=200", mesh.outbound))
        .header("x-huge", &huge)
        .body(clients::empty())
        .expect("request");
    match clients::http2().request(req).await {
        Ok(rsp) => assert_eq!(rsp.status(), 431),
        Err(e) => panic!("expected a 431 over HTTP/2, got error {e:?}"),
    }
    still_serving(mesh.outbound).await;
}

#[tokio::test]
async fn configurable_header_limit() {
    let app = HttpUpstream::start("api").await;
    let mesh = Pair::start_with(app.addr, "http", "", &["--max-header-bytes", "8192"]).await;
    let raw = format!(
        "GET / HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n",
        "b".repeat(10_000)
    );
    let answer = raw_exchange(mesh.outbound, raw.as_bytes(), Duration::from_secs(5)).await;
    assert!(
        answer.starts_with("HTTP/1.1 431"),
        "got {:?}",
        &answer[..answer.len().min(80)]
    );
    still_serving(mesh.outbound).await;
}

#[tokio::test]
async fn slow_client_is_disconnected() {
    let app = HttpUpstream::start("api").await;
    let mesh = Pair::start_with(app.addr, "http", "", &["--header-read-timeout", "300ms"]).await;
    let start = Instant::now();
    // Headers that never finish.
    let answer = raw_exchange(
        mesh.outbound,
        b"GET / HTTP/1.1\r\nHost: x\r\nX-Slow: ",
        Duration::from_secs(10),
    )
    .await;
    let waited = start.elapsed();
    assert!(
        waited < Duration::from_secs(5),
        "closed by the proxy, not by our 10 s bound ({waited:?})"
    );
    assert!(
        !answer.contains("200"),
        "no response to a request never finished: {answer:?}"
    );

    // A client that connects and sends nothing at all is closed too.
    let start = Instant::now();
    raw_exchange(mesh.outbound, b"", Duration::from_secs(10)).await;
    assert!(start.elapsed() < Duration::from_secs(5));
    still_serving(mesh.outbound).await;
}

#[tokio::test]
async fn refused_upstream_gets_502_naming_the_service() {
    let dead = closed_port().await;
    let proxy = ProxyBuilder::new(mesh::client_config(&[dead], "http", ""), "shop/web")
        .start()
        .await;
    let outbound = proxy.listener("outbound/shop/api");
    let rsp = clients::http1()
        .request(get(outbound, "/"))
        .await
        .expect("response");
    assert_eq!(rsp.status(), 502);
    assert_eq!(rsp.headers()["x-outrigger-error"], "connect-failure");
    let body = String::from_utf8(read_body(rsp).await.expect("body").to_vec()).expect("utf8");
    assert!(body.contains("shop/api"), "body names the service: {body}");
    assert!(body.contains(&dead.to_string()), "and the endpoint: {body}");
    assert!(body.to_lowercase().contains("refused"), "and why: {body}");
}

#[tokio::test]
async fn dead_app_behind_the_inbound_sidecar_gets_502() {
    let dead = closed_port().await;
    let mesh = Pair::start(dead, "http", "").await;
    let rsp = clients::http1()
        .request(get(mesh.outbound, "/"))
        .await
        .expect("response");
    assert_eq!(rsp.status(), 502);
    let body = String::from_utf8(read_body(rsp).await.expect("body").to_vec()).expect("utf8");
    assert!(body.contains("shop/api"), "{body}");
}

#[tokio::test]
async fn service_without_endpoints_gets_503() {
    let proxy = ProxyBuilder::new(mesh::client_config(&[], "http", ""), "shop/web")
        .start()
        .await;
    let outbound = proxy.listener("outbound/shop/api");
    let (status, body) = clients::http1_get(outbound, "/").await.expect("response");
    assert_eq!(status, 503);
    assert!(String::from_utf8_lossy(&body).contains("no endpoints"));
}

#[tokio::test]
async fn upstream_timeout_gets_504_and_later_requests_work() {
    let app = HttpUpstream::start("api").await;
    let policy = r#"---
apiVersion: outrigger.io/v1alpha1
kind: TrafficPolicy
metadata: {name: api, namespace: shop}
spec:
  service: api
  timeouts: {request: 300ms}
"#;
    let mesh = Pair::start(app.addr, "http", policy).await;
    let start = Instant::now();
    let rsp = clients::http1()
        .request(get(mesh.outbound, "/slow?ms=5000"))
        .await
        .expect("response");
    assert_eq!(rsp.status(), 504);
    assert!(start.elapsed() < Duration::from_secs(4));
    assert_eq!(rsp.headers()["x-outrigger-error"], "timeout");
    let body = String::from_utf8(read_body(rsp).await.expect("body").to_vec()).expect("utf8");
    assert!(
        body.contains("shop/api") && body.contains("timed out"),
        "{body}"
    );
    still_serving(mesh.outbound).await;
}

#[tokio::test]
async fn http11_without_host_gets_400() {
    let app = HttpUpstream::start("api").await;
    let mesh = Pair::start(app.addr, "http", "").await;
    let answer = raw_exchange(
        mesh.outbound,
        b"GET /status?code=200 HTTP/1.1\r\nConnection: close\r\n\r\n",
        Duration::from_secs(5),
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 400"), "got {answer:?}");
    assert!(answer.contains("Host"), "{answer}");
    // HTTP/1.0 needs no Host.
    let answer = raw_exchange(
        mesh.outbound,
        b"GET /status?code=200 HTTP/1.0\r\n\r\n",
        Duration::from_secs(5),
    )
    .await;
    assert!(answer.contains(" 200 "), "got {answer:?}");
}
