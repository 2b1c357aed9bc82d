//! HTTP/1.1 and HTTP/2 through a real sidecar pair:
//! client → outbound sidecar → inbound sidecar → app.

use bytes::Bytes;
use futures_util::StreamExt;
use http::{Request, Version};
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Frame;
use outrigger_e2e::Pair;
use outrigger_e2e::clients::{self, BoxError, body, get, read_body};
use outrigger_e2e::proxy::metric_sum;
use outrigger_e2e::upstream::HttpUpstream;
use serde_json::Value;

async fn headers_seen(rsp: http::Response<hyper::body::Incoming>) -> Value {
    let body = read_body(rsp).await.expect("body");
    serde_json::from_slice(&body).expect("json")
}

#[tokio::test]
async fn http1_get_reaches_the_app_with_clean_headers() {
    let app = HttpUpstream::start("api").await;
    let mesh = Pair::start(app.addr, "http", "").await;

    let req = Request::get(format!("http://{}/headers?x=1", mesh.outbound))
        .header("host", "api.shop.example")
        .header("x-outrigger-client-id", "spiffe://evil/ns/x/sa/spoofed")
        .header("connection", "keep-alive, x-hop")
        .header("x-hop", "must not pass")
        .header("x-app", "kept")
        .body(clients::empty())
        .expect("request");
    let rsp = clients::http1().request(req).await.expect("response");
    assert_eq!(rsp.status(), 200);
    assert_eq!(rsp.headers()["x-upstream"], "api");
    let seen = headers_seen(rsp).await;
    assert_eq!(seen["version"], "HTTP/1.1");
    assert_eq!(seen["method"], "GET");
    assert_eq!(seen["path"], "/headers?x=1");
    let h = &seen["headers"];
    assert_eq!(h["host"][0], "api.shop.example", "Host is preserved: {h}");
    assert_eq!(h["x-app"][0], "kept");
    assert!(
        h.get("x-outrigger-client-id").is_none(),
        "client id stripped: {h}"
    );
    assert!(
        h.get("x-hop").is_none(),
        "connection-named header stripped: {h}"
    );
    // Two hops, each appends its client's address.
    assert_eq!(h["x-forwarded-for"][0], "127.0.0.1, 127.0.0.1");
    assert_eq!(
        h["forwarded"][0],
        "for=127.0.0.1;proto=http, for=127.0.0.1;proto=http"
    );
}

#[tokio::test]
async fn http1_post_bodies_round_trip() {
    let app = HttpUpstream::start("api").await;
    let mesh = Pair::start(app.addr, "http", "").await;
    let client = clients::http1();

    let req = Request::post(format!("http://{}/echo", mesh.outbound))
        .body(body("hello through two sidecars"))
        .expect("request");
    let rsp = client.request(req).await.expect("response");
    assert_eq!(rsp.status(), 200);
    assert_eq!(
        read_body(rsp).await.expect("body"),
        "hello through two sidecars"
    );
}

#[tokio::test]
async fn streamed_bodies_over_10_mib_both_ways() {
    let app = HttpUpstream::start("api").await;
    let mesh = Pair::start(app.addr, "http", "").await;
    const CHUNK: usize = 256 * 1024;
    const CHUNKS: usize = 48; // 12 MiB

    for client in [clients::http1(), clients::http2()] {
        // Upload: a chunked (unknown length) streamed request body, echoed back.
        let chunks = (0..CHUNKS)
            .map(|i| Ok::<_, BoxError>(Frame::data(Bytes::from(vec![(i % 251) as u8; CHUNK]))));
        let upload = BodyExt::boxed(StreamBody::new(futures_util::stream::iter(chunks)));
        let req = Request::post(format!("http://{}/echo", mesh.outbound))
            .body(upload)
            .expect("request");
        let rsp = client.request(req).await.expect("response");
        assert_eq!(rsp.status(), 200);
        let mut stream = rsp.into_body().into_data_stream();
        let mut received = Vec::with_capacity(CHUNK * CHUNKS);
        while let Some(chunk) = stream.next().await {
            received.extend_from_slice(&chunk.expect("chunk"));
        }
        assert_eq!(received.len(), CHUNK * CHUNKS);
        for (i, block) in received.chunks(CHUNK).enumerate() {
            assert!(
                block.iter().all(|b| *b == (i % 251) as u8),
                "chunk {i} corrupted"
            );
        }

        // Download: 12 MiB streamed by the app.
        let n = CHUNK * CHUNKS;
        let rsp = client
            .request(get(mesh.outbound, &format!("/bytes?n={n}")))
            .await
            .expect("response");
        assert_eq!(rsp.status(), 200);
        assert_eq!(read_body(rsp).await.expect("body").len(), n);
    }
}

#[tokio::test]
async fn http2_prior_knowledge_stays_http2_end_to_end() {
    let app = HttpUpstream::start("api").await;
    let mesh = Pair::start(app.addr, "http", "").await;
    let client = clients::http2();

    let rsp = client
        .request(get(mesh.outbound, "/headers"))
        .await
        .expect("response");
    assert_eq!(rsp.status(), 200);
    assert_eq!(rsp.version(), Version::HTTP_2);
    let seen = headers_seen(rsp).await;
    assert_eq!(seen["version"], "HTTP/2.0");
    // The :authority the client sent survives both hops.
    assert_eq!(seen["authority"], mesh.outbound.to_string());

    // Many concurrent streams on one connection.
    let mut tasks = Vec::new();
    for i in 0..20 {
        let client = client.clone();
        let addr = mesh.outbound;
        tasks.push(tokio::spawn(async move {
            let req = Request::post(format!("http://{addr}/echo"))
                .body(body(format!("stream {i}")))
                .expect("request");
            let rsp = client.request(req).await.expect("response");
            read_body(rsp).await.expect("body")
        }));
    }
    for (i, task) in tasks.into_iter().enumerate() {
        assert_eq!(task.await.expect("join"), format!("stream {i}"));
    }
}

#[tokio::test]
async fn upstream_connections_are_pooled_and_kept_alive() {
    let app = HttpUpstream::start("api").await;
    let mesh = Pair::start(app.addr, "http", "").await;
    let client = clients::http1();
    for _ in 0..25 {
        let rsp = client
            .request(get(mesh.outbound, "/status?code=204"))
            .await
            .expect("response");
        assert_eq!(rsp.status(), 204);
        read_body(rsp).await.expect("body");
    }
    assert_eq!(app.requests(), 25);
    // Sequential requests reuse one connection on every hop.
    assert_eq!(app.connections(), 1, "inbound sidecar → app pooled");
    let (_, metrics) = mesh.server.admin_get("/metrics").await;
    assert_eq!(
        metric_sum(
            &metrics,
            "outrigger_connections_total",
            &[("direction", "inbound")]
        ),
        1.0,
        "outbound → inbound pooled:\n{metrics}"
    );
}

#[tokio::test]
async fn metrics_move_with_traffic() {
    let app = HttpUpstream::start("api").await;
    let mesh = Pair::start(app.addr, "http", "").await;
    let client = clients::http1();
    for path in [
        "/status?code=200",
        "/status?code=200",
        "/status?code=404",
        "/status?code=503",
    ] {
        let rsp = client
            .request(get(mesh.outbound, path))
            .await
            .expect("response");
        read_body(rsp).await.expect("body");
    }
    let (status, metrics) = mesh.client.admin_get("/metrics").await;
    assert_eq!(status, 200);
    let out = |class| {
        metric_sum(
            &metrics,
            "outrigger_requests_total",
            &[
                ("direction", "outbound"),
                ("service", "shop/api"),
                ("status_class", class),
            ],
        )
    };
    assert_eq!(out("2xx"), 2.0, "{metrics}");
    assert_eq!(out("4xx"), 1.0);
    assert_eq!(out("5xx"), 1.0);
    let histogram_count = metric_sum(
        &metrics,
        "outrigger_request_duration_seconds_count",
        &[("direction", "outbound")],
    );
    assert_eq!(histogram_count, 4.0, "{metrics}");
    assert!(metrics.contains("le=\"0.0005\""), "sub-millisecond buckets");

    let (_, server_metrics) = mesh.server.admin_get("/metrics").await;
    let inbound_total = metric_sum(
        &server_metrics,
        "outrigger_requests_total",
        &[("direction", "inbound"), ("service", "shop/api")],
    );
    assert_eq!(inbound_total, 4.0, "{server_metrics}");
    assert!(server_metrics.contains("outrigger_open_connections"));
}

#[tokio::test]
async fn admin_shows_the_loaded_policy() {
    let app = HttpUpstream::start("api").await;
    let policy = r#"---
apiVersion: outrigger.io/v1alpha1
kind: TrafficPolicy
metadata: {name: api-timeouts, namespace: shop}
spec:
  service: api
  timeouts: {request: 3s, connect: 250ms}
"#;
    let mesh = Pair::start(app.addr, "http", policy).await;
    let (status, body) = mesh.client.admin_get("/config").await;
    assert_eq!(status, 200);
    let config: Value = serde_json::from_str(&body).expect("json");
    assert_eq!(config["workload"]["id"]["name"], "web");
    assert_eq!(config["workload"]["id"]["namespace"], "shop");
    assert_eq!(config["services"][0]["id"]["name"], "api");
    assert_eq!(config["trafficPolicies"][0]["timeouts"]["request"], "3s");
    assert_eq!(config["trafficPolicies"][0]["timeouts"]["connect"], "250ms");
    let version = config["version"].as_str().expect("version");
    assert_eq!(version.len(), 16);
    let listeners = config["listeners"].as_array().expect("listeners");
    assert!(listeners.iter().any(|l| l["name"] == "outbound/shop/api"));
    // The version is also a metric label.
    let (_, metrics) = mesh.client.admin_get("/metrics").await;
    assert!(metrics.contains(&format!("outrigger_config_info{{version=\"{version}\"}} 1")));

    assert_eq!(mesh.client.admin_get("/live").await.0, 200);
    assert_eq!(mesh.client.admin_get("/ready").await.0, 200);
    assert_eq!(mesh.client.admin_get("/nope").await.0, 404);
}

#[tokio::test]
async fn round_robin_over_static_endpoints_when_the_policy_asks() {
    let a = HttpUpstream::start("a").await;
    let b = HttpUpstream::start("b").await;
    // Two server sidecars, one per app; the client balances between them.
    let server_a = outrigger_e2e::ProxyBuilder::new(
        outrigger_e2e::mesh::server_config(a.addr.port(), "http"),
        "shop/api",
    )
    .start()
    .await;
    let server_b = outrigger_e2e::ProxyBuilder::new(
        outrigger_e2e::mesh::server_config(b.addr.port(), "http"),
        "shop/api",
    )
    .start()
    .await;
    let endpoints = [
        server_a.listener("inbound/main"),
        server_b.listener("inbound/main"),
    ];
    let client_proxy = outrigger_e2e::ProxyBuilder::new(
        outrigger_e2e::mesh::client_config(
            &endpoints,
            "http",
            "---\napiVersion: outrigger.io/v1alpha1\nkind: TrafficPolicy\nmetadata: {name: api, namespace: shop}\n\
             spec: {service: api, loadBalancer: round-robin}\n",
        ),
        "shop/web",
    )
    .start()
    .await;
    let outbound = client_proxy.listener("outbound/shop/api");
    let client = clients::http1();
    for _ in 0..10 {
        let rsp = client
            .request(get(outbound, "/status?code=200"))
            .await
            .expect("rsp");
        read_body(rsp).await.expect("body");
    }
    assert_eq!((a.requests(), b.requests()), (5, 5));
}

#[tokio::test]
async fn an_http10_upstream_is_answered_as_http11() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    // An app that only speaks HTTP/1.0 and closes after each response.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let app = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = vec![0u8; 4096];
                let _ = s.read(&mut buf).await;
                let _ = s
                    .write_all(b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\nold app")
                    .await;
            });
        }
    });
    let mesh = Pair::start(app, "http", "").await;
    let client = clients::http1();
    for _ in 0..3 {
        let rsp = client
            .request(get(mesh.outbound, "/"))
            .await
            .expect("response");
        assert_eq!(rsp.status(), 200);
        assert_eq!(rsp.version(), Version::HTTP_11);
        assert_eq!(read_body(rsp).await.expect("body"), "old app");
    }
}

#[tokio::test]
async fn websocket_style_upgrades_cross_both_sidecars_in_plaintext() {
    let app = outrigger_e2e::upstream::UpgradeEcho::start().await;
    let mesh = Pair::start(app.addr, "http", "").await;
    let (head, echoed) =
        outrigger_e2e::upstream::upgrade_roundtrip(mesh.outbound, "websocket", b"ping").await;
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    assert_eq!(echoed, b"ping");
    // A plain request right after still works on the same sidecars.
    let (status, _) = clients::http1_get(mesh.outbound, "/")
        .await
        .expect("plain GET");
    assert_eq!(
        status, 426,
        "the app answers Upgrade Required to a plain GET"
    );
}
