//! Trace propagation and span export through two sidecars over mTLS, to a
//! real OTLP/gRPC receiver; and a collector that is down or never answers.
//!
//! ```text
//! client → [web: outbound/shop/api] ==mTLS==> [api: inbound/main] → app
//!              │ CLIENT span                     │ SERVER span
//!              └───────────── OTLP/gRPC ─────────┴──→ collector
//! ```

#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::time::Duration;

use http::Request;
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use opentelemetry_proto::tonic::trace::v1::{Span, span::SpanKind};
use outrigger_e2e::ProxyBuilder;
use outrigger_e2e::certs::{Leaf, TestCa};
use outrigger_e2e::clients;
use outrigger_e2e::otlp::{Collector, Silent};
use outrigger_e2e::proxy::{Proxy, metric_sum};
use outrigger_e2e::upstream::{HttpUpstream, closed_port};
use serde_json::Value as Json;

const WEB_ID: &str = "spiffe://cluster.local/ns/shop/sa/web";
const API_ID: &str = "spiffe://cluster.local/ns/shop/sa/api";

fn mesh(otlp: &str, percent: u32) -> String {
    format!(
        "apiVersion: outrigger.io/v1alpha1\nkind: Mesh\nmetadata: {{name: mesh}}\n\
         spec: {{tracing: {{samplingPercent: {percent}, otlpEndpoint: '{otlp}'}}}}\n---\n"
    )
}

struct Mesh {
    _dir: tempfile::TempDir,
    app: HttpUpstream,
    web: Proxy,
    api: Proxy,
    outbound: SocketAddr,
}

/// Workload shop/web calling shop/api (at `api`, over mTLS).
fn web_config(otlp: &str, percent: u32, api: SocketAddr) -> String {
    format!(
        "{}apiVersion: outrigger.io/v1alpha1\nkind: Workload\nmetadata: {{name: web, namespace: shop}}\n\
         spec:\n  inbound: [{{name: main, port: 0, appPort: 9}}]\n  outbound: [{{port: 0, service: api}}]\n---\n\
         apiVersion: outrigger.io/v1alpha1\nkind: Service\nmetadata: {{name: api, namespace: shop}}\n\
         spec:\n  identity: {API_ID}\n  endpoints: [{{address: '{api}'}}]\n",
        mesh(otlp, percent),
    )
}

async fn start(otlp: &str, percent: u32) -> Mesh {
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new("mesh root");
    let app = HttpUpstream::start("app").await;
    let api = ProxyBuilder::new(
        format!(
            "{}apiVersion: outrigger.io/v1alpha1\nkind: Workload\nmetadata: {{name: api, namespace: shop}}\n\
             spec:\n  inbound: [{{name: main, port: 0, appPort: {}}}]\n{}",
            mesh(otlp, percent),
            app.addr.port(),
            outrigger_e2e::mesh::ALLOW_WEB
        ),
        "shop/api",
    )
    .tls(&ca.write(dir.path(), "api", Leaf::Spiffe(API_ID)))
    .start()
    .await;
    let web = ProxyBuilder::new(
        web_config(otlp, percent, api.listener("inbound/main")),
        "shop/web",
    )
    .tls(&ca.write(dir.path(), "web", Leaf::Spiffe(WEB_ID)))
    .start()
    .await;
    let outbound = web.listener("outbound/shop/api");
    Mesh {
        _dir: dir,
        app,
        web,
        api,
        outbound,
    }
}

/// GET /headers with `headers`: the status and what the app saw.
async fn get(outbound: SocketAddr, headers: &[(&str, &str)]) -> (u16, Json) {
    let mut req = Request::get(format!("http://{outbound}/headers"));
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let rsp = tokio::time::timeout(
        Duration::from_secs(10),
        clients::http1().request(req.body(clients::empty()).unwrap()),
    )
    .await
    .unwrap()
    .unwrap();
    let status = rsp.status().as_u16();
    let body = clients::read_body(rsp).await.unwrap();
    (status, serde_json::from_slice(&body).unwrap_or_default())
}

fn seen(app_view: &Json, header: &str) -> String {
    app_view["headers"][header][0]
        .as_str()
        .unwrap_or("")
        .to_string()
}

fn attr(span: &Span, key: &str) -> Option<String> {
    span.attributes
        .iter()
        .find(|kv| kv.key == key)
        .and_then(|kv| kv.value.as_ref()?.value.as_ref())
        .map(|v| match v {
            Value::StringValue(s) => s.clone(),
            Value::IntValue(i) => i.to_string(),
            other => format!("{other:?}"),
        })
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn find(spans: &[Span], kind: SpanKind) -> Span {
    spans
        .iter()
        .find(|s| s.kind == kind as i32)
        .cloned()
        .unwrap_or_else(|| panic!("no {kind:?} span in {spans:?}"))
}

#[tokio::test]
async fn a_request_is_one_trace_across_both_sidecars() {
    let collector = Collector::start().await;
    let m = start(&collector.url(), 100).await;

    let (status, app_view) = get(m.outbound, &[("x-request-id", "req-42")]).await;
    assert_eq!(status, 200);
    let spans = collector.wait_for_spans(2).await;
    let client = find(&spans, SpanKind::Client);
    let server = find(&spans, SpanKind::Server);

    // One trace; the outbound span starts it, the inbound span is its child.
    assert_eq!(client.trace_id, server.trace_id);
    assert!(
        client.parent_span_id.is_empty(),
        "a new trace starts at the first hop"
    );
    assert_eq!(server.parent_span_id, client.span_id);
    // The app sees the trace, with the inbound span as its parent.
    let traceparent = seen(&app_view, "traceparent");
    assert_eq!(
        traceparent,
        format!("00-{}-{}-01", hex(&client.trace_id), hex(&server.span_id))
    );
    assert_eq!(seen(&app_view, "x-request-id"), "req-42");

    // The attributes.
    assert_eq!(attr(&client, "http.request.method").as_deref(), Some("GET"));
    assert_eq!(attr(&client, "url.path").as_deref(), Some("/headers"));
    assert_eq!(
        attr(&client, "http.response.status_code").as_deref(),
        Some("200")
    );
    assert_eq!(
        attr(&client, "outrigger.service").as_deref(),
        Some("shop/api")
    );
    assert!(
        attr(&client, "server.port").is_some(),
        "the upstream endpoint"
    );
    assert_eq!(
        attr(&server, "outrigger.peer.identity").as_deref(),
        Some(WEB_ID)
    );
    assert_eq!(
        attr(&server, "outrigger.request_id").as_deref(),
        Some("req-42")
    );
    assert_eq!(m.app.requests(), 1);

    // Golden metrics: the inbound side counts callers by identity, and
    // both sides the sizes.
    let (_, metrics) = m.api.admin_get("/metrics").await;
    let by_caller = metric_sum(
        &metrics,
        "outrigger_inbound_requests_by_identity_total",
        &[("identity", WEB_ID), ("status_class", "2xx")],
    );
    assert_eq!(by_caller, 1.0, "{metrics}");
    let (_, metrics) = m.web.admin_get("/metrics").await;
    assert!(metric_sum(&metrics, "outrigger_response_size_bytes_count", &[]) >= 1.0);
}

#[tokio::test]
async fn an_incoming_context_keeps_its_trace_and_sampling() {
    let collector = Collector::start().await;
    // 0%: only the caller's sampled flag gets a request traced.
    let m = start(&collector.url(), 0).await;
    let trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let parent = "00f067aa0ba902b7";
    let (_, app_view) = get(
        m.outbound,
        &[
            ("traceparent", &format!("00-{trace}-{parent}-01")),
            ("tracestate", "vendor=x"),
        ],
    )
    .await;
    let spans = collector.wait_for_spans(2).await;
    let client = find(&spans, SpanKind::Client);
    assert_eq!(hex(&client.trace_id), trace);
    assert_eq!(hex(&client.parent_span_id), parent);
    assert!(seen(&app_view, "traceparent").starts_with(&format!("00-{trace}-")));
    assert_eq!(seen(&app_view, "tracestate"), "vendor=x");

    // Not sampled by the caller: propagated, not exported.
    let (_, app_view) = get(
        m.outbound,
        &[("traceparent", &format!("00-{trace}-{parent}-00"))],
    )
    .await;
    assert!(seen(&app_view, "traceparent").ends_with("-00"));
    // B3 in, B3 out.
    let (_, app_view) = get(m.outbound, &[("b3", &format!("{trace}-{parent}-1"))]).await;
    assert!(seen(&app_view, "b3").starts_with(&format!("{trace}-")));
    assert_eq!(seen(&app_view, "traceparent"), "");
    let spans = collector.wait_for_spans(4).await;
    assert_eq!(spans.len(), 4, "the unsampled request sent no span");
}

#[tokio::test]
async fn the_sampling_rate_and_the_collector_change_hot() {
    let collector = Collector::start().await;
    let down = format!("http://{}", closed_port().await);
    let m = start(&down, 0).await;
    let api = m.api.listener("inbound/main");
    get(m.outbound, &[]).await;

    // 100%, and the collector that is up: the next request is exported.
    let version = m.web.config_version().await;
    m.web.reload(&web_config(&collector.url(), 100, api));
    m.web.wait_version_change(&version).await;
    assert_eq!(get(m.outbound, &[]).await.0, 200);
    let spans = collector.wait_for_spans(1).await;
    assert_eq!(spans[0].kind, SpanKind::Client as i32);
    // Back to 0%: nothing more.
    let version = m.web.config_version().await;
    m.web.reload(&web_config(&collector.url(), 0, api));
    m.web.wait_version_change(&version).await;
    for _ in 0..20 {
        get(m.outbound, &[]).await;
    }
    // The api sidecar exports to the dead collector; web sent one span.
    let exported = || async {
        let (_, metrics) = m.web.admin_get("/metrics").await;
        metric_sum(&metrics, "outrigger_spans_exported_total", &[])
    };
    outrigger_e2e::eventually("the one span counted", || async { exported().await >= 1.0 }).await;
    assert_eq!(exported().await, 1.0);
    assert_eq!(collector.spans().len(), 1);
}

async fn dropped(proxy: &Proxy) -> f64 {
    let (_, body) = proxy.admin_get("/metrics").await;
    metric_sum(&body, "outrigger_spans_dropped_total", &[])
}

#[tokio::test]
async fn a_dead_or_silent_collector_never_fails_a_request() {
    let down = format!("http://{}", closed_port().await);
    let silent = Silent::start().await;
    for url in [down, format!("http://{}", silent.addr)] {
        let m = start(&url, 100).await;
        for _ in 0..50 {
            assert_eq!(get(m.outbound, &[]).await.0, 200, "{url}");
        }
        // The spans are dropped and counted once the export gives up.
        outrigger_e2e::eventually("spans counted as dropped", || async {
            dropped(&m.web).await > 0.0
        })
        .await;
        assert_eq!(m.app.requests(), 50);
    }
}

#[tokio::test]
async fn access_logs_are_one_json_line_per_request_when_asked_for() {
    let app = HttpUpstream::start("app").await;
    let pair =
        outrigger_e2e::Pair::start_with(app.addr, "http", "", &["--access-log", "json"]).await;
    for path in ["/headers", "/status?code=503"] {
        clients::http1_get(pair.outbound, path).await.unwrap();
    }
    outrigger_e2e::eventually("two access log lines", || async {
        pair.client.stdout_lines().len() >= 2
    })
    .await;
    let lines = pair.client.stdout_lines();
    let first: Json = serde_json::from_str(&lines[0]).unwrap();
    assert_eq!(first["direction"], "outbound");
    assert_eq!(first["target"], "shop/api");
    assert_eq!(first["method"], "GET");
    assert_eq!(first["path"], "/headers");
    assert_eq!(first["status"], 200);
    assert_eq!(first["requestId"].as_str().map(str::len), Some(36));
    assert_eq!(first["traceId"].as_str().map(str::len), Some(32));
    let second: Json = serde_json::from_str(&lines[1]).unwrap();
    assert_eq!(second["status"], 503);
    // Off by default: the server side printed nothing.
    assert!(pair.server.stdout_lines().is_empty());
}
