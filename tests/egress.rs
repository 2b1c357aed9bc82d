//! The egress allow-list on a shared outbound port: real sidecars over
//! mTLS, certificates made fresh by the test.
//!
//! ```text
//! client ─Host: api─→ [web: outbound/by-host] ==mTLS==> [api: inbound/main] → api app
//!        ─Host: pay─→ refused by web, unless web declares pay        (pay app, outside the mesh)
//! ```

#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::time::Duration;

use http::Request;
use hyper_util::rt::{TokioExecutor, TokioIo};
use outrigger_e2e::ProxyBuilder;
use outrigger_e2e::certs::{Leaf, TestCa};
use outrigger_e2e::clients;
use outrigger_e2e::proxy::{Proxy, metric_sum};
use outrigger_e2e::upstream::HttpUpstream;

const WEB_ID: &str = "spiffe://cluster.local/ns/shop/sa/web";
const API_ID: &str = "spiffe://cluster.local/ns/shop/sa/api";

fn api_config(app: SocketAddr) -> String {
    format!(
        "apiVersion: outrigger.io/v1alpha1\nkind: Workload\nmetadata: {{name: api, namespace: shop}}\n\
         spec:\n  inbound: [{{name: main, port: 0, appPort: {}}}]\n\
         ---\napiVersion: outrigger.io/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {{name: api-callers, namespace: shop}}\n\
         spec: {{workload: api, action: ALLOW, rules: [{{from: {{principals: ['{WEB_ID}']}}}}]}}\n",
        app.port()
    )
}

/// Workload shop/web with one shared outbound port reaching `services`;
/// the configuration also knows Service shop/pay (outside the mesh, at
/// `pay`), whether web declares it or not.
fn web_config(api: SocketAddr, pay: SocketAddr, services: &str) -> String {
    format!(
        "apiVersion: outrigger.io/v1alpha1\nkind: Workload\nmetadata: {{name: web, namespace: shop}}\n\
         spec:\n  inbound: [{{name: main, port: 0, appPort: 9}}]\n  outbound: [{{port: 0, services: [{services}]}}]\n---\n\
         apiVersion: outrigger.io/v1alpha1\nkind: Service\nmetadata: {{name: api, namespace: shop}}\n\
         spec:\n  identity: {API_ID}\n  endpoints: [{{address: '{api}'}}]\n---\n\
         apiVersion: outrigger.io/v1alpha1\nkind: Service\nmetadata: {{name: pay, namespace: shop}}\n\
         spec:\n  endpoints: [{{address: '{pay}'}}]\n"
    )
}

/// GET `path` from `addr` with `Host: host` over HTTP/1.1: status, the
/// `x-outrigger-error` header, and the body.
async fn get_host(addr: SocketAddr, host: &str, path: &str) -> (u16, String, String) {
    let req = Request::get(format!("http://{addr}{path}"))
        .header("host", host)
        .body(clients::empty())
        .unwrap();
    let answer = clients::exchange(req).await;
    (
        answer.status,
        answer.header("x-outrigger-error"),
        answer.text(),
    )
}

/// GET over HTTP/2 with `:authority` set to `authority` (not the address
/// connected to): status and the `x-upstream` header.
async fn h2_get(addr: SocketAddr, authority: &str) -> (u16, String) {
    let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (mut send, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .unwrap();
    let conn = tokio::spawn(conn);
    let req = Request::get(format!("http://{authority}/headers"))
        .body(clients::empty())
        .unwrap();
    let rsp = tokio::time::timeout(Duration::from_secs(10), send.send_request(req))
        .await
        .expect("answered in time")
        .unwrap();
    let status = rsp.status().as_u16();
    let upstream = rsp
        .headers()
        .get("x-upstream")
        .map(|v| v.to_str().unwrap().to_string())
        .unwrap_or_default();
    clients::read_body(rsp).await.unwrap();
    conn.abort();
    (status, upstream)
}

async fn denied_total(web: &Proxy) -> f64 {
    let (_, body) = web.admin_get("/metrics").await;
    metric_sum(
        &body,
        "outrigger_egress_denied_total",
        &[("workload", "shop/web")],
    )
}

struct Mesh {
    _dir: tempfile::TempDir,
    api_app: HttpUpstream,
    pay_app: HttpUpstream,
    _api: Proxy,
    api_inbound: SocketAddr,
    web: Proxy,
}

async fn mesh(services: &str) -> Mesh {
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new("mesh root");
    let api_app = HttpUpstream::start("api").await;
    let pay_app = HttpUpstream::start("pay").await;
    let api = ProxyBuilder::new(api_config(api_app.addr), "shop/api")
        .tls(&ca.write(dir.path(), "api", Leaf::Spiffe(API_ID)))
        .start()
        .await;
    let api_inbound = api.listener("inbound/main");
    let web = ProxyBuilder::new(web_config(api_inbound, pay_app.addr, services), "shop/web")
        .tls(&ca.write(dir.path(), "web", Leaf::Spiffe(WEB_ID)))
        .start()
        .await;
    Mesh {
        _dir: dir,
        api_app,
        pay_app,
        _api: api,
        api_inbound,
        web,
    }
}

#[tokio::test]
async fn a_shared_port_routes_by_host_to_declared_services_only() {
    let m = mesh("api").await;
    let shared = m.web.listener("outbound/by-host");

    // Every spelling of shop/api's name reaches it over mTLS.
    for host in [
        "api",
        "api.shop",
        "API.shop.svc.cluster.local:8080",
        "api.shop.svc.cluster.local.",
    ] {
        let (status, _, body) = get_host(shared, host, "/headers").await;
        assert_eq!(status, 200, "{host}: {body}");
        assert!(body.contains(WEB_ID), "the app sees the caller: {body}");
    }
    assert_eq!(h2_get(shared, "api.shop").await, (200, "api".to_string()));

    // shop/pay is known to the configuration but not declared: refused
    // here, before any connection to it.
    let seen = m.api_app.requests();
    for (n, host) in ["pay.shop", "localhost", "example.com:443"]
        .into_iter()
        .enumerate()
    {
        let (status, error, body) = get_host(shared, host, "/charge").await;
        assert_eq!(status, 403, "{host}: {body}");
        assert_eq!(error, "egress-denied");
        assert!(
            body.contains(&format!("egress to {host:?} refused: shop/web declares no such destination on this port; it reaches shop/api")),
            "{body}"
        );
        assert_eq!(denied_total(&m.web).await, (n + 1) as f64);
    }
    assert_eq!(h2_get(shared, "pay.shop").await.0, 403);
    assert_eq!(m.pay_app.requests(), 0, "nothing reached shop/pay");
    assert_eq!(m.pay_app.connections(), 0);
    assert_eq!(m.api_app.requests(), seen, "nor anything else");

    // An HTTP proxy client (absolute-form request line) is routed by the
    // URI's authority, whatever its Host header says.
    let reply = clients::raw_exchange(
        shared,
        b"GET http://pay.shop/x HTTP/1.1\r\nHost: api\r\nConnection: close\r\n\r\n",
        Duration::from_secs(10),
    )
    .await;
    assert!(reply.starts_with("HTTP/1.1 403"), "{reply}");
    let reply = clients::raw_exchange(
        shared,
        b"GET http://api.shop/headers HTTP/1.1\r\nHost: pay\r\nConnection: close\r\n\r\n",
        Duration::from_secs(10),
    )
    .await;
    assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");

    // Without any host there is nothing to route on.
    let reply = clients::raw_exchange(
        shared,
        b"GET /headers HTTP/1.0\r\n\r\n",
        Duration::from_secs(10),
    )
    .await;
    assert!(reply.starts_with("HTTP/1.0 400"), "{reply}");
    assert!(reply.contains("x-outrigger-error: no-host"), "{reply}");
    assert_eq!(m.pay_app.requests(), 0);
}

#[tokio::test]
async fn the_allow_list_changes_hot_on_the_same_port() {
    let m = mesh("api").await;
    let shared = m.web.listener("outbound/by-host");
    assert_eq!(get_host(shared, "pay.shop", "/").await.0, 403);

    // Declare pay too (SIGHUP): the next request reaches it, on the same port.
    let version = m.web.config_version().await;
    m.web
        .reload(&web_config(m.api_inbound, m.pay_app.addr, "api, pay"));
    m.web.wait_version_change(&version).await;
    assert_eq!(m.web.listener("outbound/by-host"), shared);
    let (status, _, body) = get_host(shared, "pay.shop", "/headers").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(m.pay_app.requests(), 1);
    let config = m.web.config().await;
    let listeners = config["listeners"].to_string();
    assert!(listeners.contains("shop/api,shop/pay"), "{listeners}");

    // Drop api from the list: refused from the next request on.
    let version = m.web.config_version().await;
    m.web
        .reload(&web_config(m.api_inbound, m.pay_app.addr, "shop/pay"));
    m.web.wait_version_change(&version).await;
    let (status, error, body) = get_host(shared, "api", "/headers").await;
    assert_eq!((status, error.as_str()), (403, "egress-denied"), "{body}");
    assert!(body.contains("it reaches shop/pay"), "{body}");
    assert_eq!(get_host(shared, "pay", "/headers").await.0, 200);
}

#[tokio::test]
async fn a_host_routed_port_for_a_tcp_service_is_refused_with_the_field() {
    let (status, logs) = ProxyBuilder::new(
        "apiVersion: outrigger.io/v1alpha1\nkind: Workload\nmetadata: {name: web, namespace: shop}\n\
         spec:\n  inbound: [{port: 0, appPort: 9}]\n  outbound: [{port: 0, services: [db]}]\n---\n\
         apiVersion: outrigger.io/v1alpha1\nkind: Service\nmetadata: {name: db, namespace: shop}\n\
         spec: {protocol: tcp, endpoints: [{address: '127.0.0.1:5432'}]}\n",
        "shop/web",
    )
    .run_expecting_failure();
    assert!(!status.success());
    assert!(
        logs.contains("spec.outbound[0].services[0]: Service shop/db speaks tcp"),
        "{logs}"
    );
}
