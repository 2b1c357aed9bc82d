//! SIGHUP reload: the sidecar re-reads its configuration file and applies
//! it without a restart, or refuses it and keeps serving the old one.
//!
//! Each test runs one sidecar (workload `shop/web`) whose outbound listener
//! for `shop/api` goes straight to test apps.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use outrigger_e2e::ProxyBuilder;
use outrigger_e2e::clients::{self, upstream_of};
use outrigger_e2e::proxy::metric_sum;
use outrigger_e2e::upstream::{HttpUpstream, TcpEcho, closed_port};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const API: &str = "outbound/shop/api";
const DB: &str = "outbound/shop/db";

/// Workload `shop/web`: one inbound listener, the `outbound` YAML list
/// items, service `shop/api` (HTTP) at `api`, service `shop/db` (TCP) at
/// `db`, and `extra` appended as more documents.
fn config(outbound: &str, api: &[SocketAddr], db: SocketAddr, extra: &str) -> String {
    let api: Vec<String> = api
        .iter()
        .map(|a| format!("{{address: \"{a}\"}}"))
        .collect();
    format!(
        r#"apiVersion: outrigger.io/v1alpha1
kind: Workload
metadata: {{name: web, namespace: shop}}
spec:
  inbound:
    - {{name: main, port: 0, appPort: 9}}
  outbound: [{outbound}]
---
apiVersion: outrigger.io/v1alpha1
kind: Service
metadata: {{name: api, namespace: shop}}
spec:
  endpoints: [{api}]
---
apiVersion: outrigger.io/v1alpha1
kind: Service
metadata: {{name: db, namespace: shop}}
spec:
  protocol: tcp
  endpoints: [{{address: "{db}"}}]
{extra}"#,
        api = api.join(", ")
    )
}

fn request_timeout(timeout: &str) -> String {
    format!(
        r#"---
apiVersion: outrigger.io/v1alpha1
kind: TrafficPolicy
metadata: {{name: api, namespace: shop}}
spec:
  service: api
  timeouts: {{request: {timeout}}}
"#
    )
}

const API_ONLY: &str = "{port: 0, service: api}";

#[tokio::test]
async fn new_endpoints_take_over_without_a_restart() {
    let a = HttpUpstream::start("a").await;
    let b = HttpUpstream::start("b").await;
    let db = closed_port().await;
    let proxy = ProxyBuilder::new(config(API_ONLY, &[a.addr], db, ""), "shop/web")
        .start()
        .await;
    let api = proxy.listener(API);
    let client = clients::http1();
    assert_eq!(
        upstream_of(&client, api, "/status?code=200").await,
        (200, "a".into())
    );
    let before = proxy.config_version().await;
    let pid = proxy.pid();

    proxy.reload(&config(API_ONLY, &[b.addr], db, ""));
    let after = proxy.wait_version_change(&before).await;

    assert_eq!(
        upstream_of(&client, api, "/status?code=200").await,
        (200, "b".into())
    );
    assert_eq!(proxy.pid(), pid);
    assert_eq!(
        proxy.current_listener(API).await,
        Some(api),
        "a kept port-0 listener keeps its port"
    );
    let config = proxy.config().await;
    assert_eq!(
        config["services"][0]["endpoints"][0]["address"],
        b.addr.to_string()
    );
    let (_, metrics) = proxy.admin_get("/metrics").await;
    assert_eq!(
        metric_sum(&metrics, "outrigger_config_info", &[("version", &after)]),
        1.0,
        "{metrics}"
    );
    assert_eq!(
        metric_sum(&metrics, "outrigger_config_info", &[("version", &before)]),
        0.0,
        "{metrics}"
    );
    assert!(proxy.logs().contains("route updated"), "{}", proxy.logs());
}

#[tokio::test]
async fn a_port_already_taken_refuses_the_reload_and_the_old_config_serves_on() {
    let a = HttpUpstream::start("a").await;
    let b = HttpUpstream::start("b").await;
    let echo = TcpEcho::start().await;
    let proxy = ProxyBuilder::new(config(API_ONLY, &[a.addr], echo.addr, ""), "shop/web")
        .start()
        .await;
    let api = proxy.listener(API);
    let before = proxy.config_version().await;

    // An invalid file is refused too.
    proxy.reload("apiVersion: outrigger.io/v1alpha1\nkind: Workload\nspec: [\n");
    proxy
        .wait_for_log(&format!("reload refused, still serving version {before}: "))
        .await;
    assert_eq!(proxy.config_version().await, before);

    let taken = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let port = taken.local_addr().expect("addr").port();
    let outbound = format!("{API_ONLY}, {{port: {port}, service: db}}");
    // The refused configuration also changes api's endpoints: none of it
    // may take effect.
    proxy.reload(&config(&outbound, &[b.addr], echo.addr, ""));
    proxy
        .wait_for_log(&format!(
            "still serving version {before}: cannot listen on 127.0.0.1:{port} for {DB}: "
        ))
        .await;

    assert_eq!(proxy.config_version().await, before);
    assert_eq!(proxy.admin_get("/ready").await.0, 200);
    assert_eq!(proxy.current_listener(DB).await, None);
    let client = clients::http1();
    assert_eq!(
        upstream_of(&client, api, "/status?code=200").await,
        (200, "a".into())
    );
    assert_eq!(b.requests(), 0);

    // Once the port is free, the same file applies.
    drop(taken);
    proxy.signal("HUP");
    proxy.wait_version_change(&before).await;
    let db = proxy.current_listener(DB).await.expect("db listener");
    assert_eq!(db.port(), port);
    assert_eq!(
        upstream_of(&client, api, "/status?code=200").await,
        (200, "b".into())
    );
}

#[tokio::test]
async fn a_request_in_flight_finishes_on_the_route_it_started_with() {
    let a = HttpUpstream::start("a").await;
    let b = HttpUpstream::start("b").await;
    let db = closed_port().await;
    let proxy = ProxyBuilder::new(config(API_ONLY, &[a.addr], db, ""), "shop/web")
        .start()
        .await;
    let api = proxy.listener(API);
    let before = proxy.config_version().await;

    let in_flight =
        tokio::spawn(async move { upstream_of(&clients::http1(), api, "/slow?ms=1500").await });
    a.wait_for_requests(1).await;
    // New endpoints and a request timeout far shorter than the request
    // already running: neither applies to it.
    proxy.reload(&config(API_ONLY, &[b.addr], db, &request_timeout("300ms")));
    proxy.wait_version_change(&before).await;

    let client = clients::http1();
    assert_eq!(
        upstream_of(&client, api, "/slow?ms=1500").await,
        (504, String::new()),
        "a new request gets the new timeout"
    );
    assert_eq!(
        in_flight.await.expect("join"),
        (200, "a".into()),
        "the request in flight completed where it started"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keep_alive_clients_lose_no_request_across_reloads() {
    let app = HttpUpstream::start("a").await;
    let echo = TcpEcho::start().await;
    // Each reload changes something: the request timeout, and whether a
    // second (TCP) listener exists. The api endpoint and its client
    // settings stay, so the upstream pool should too.
    let configs: Vec<String> = (0..6)
        .map(|i| {
            let outbound = if i % 2 == 0 {
                API_ONLY.to_string()
            } else {
                format!("{API_ONLY}, {{port: 0, service: db}}")
            };
            let timeout = request_timeout(&format!("{}s", 10 + i));
            config(&outbound, &[app.addr], echo.addr, &timeout)
        })
        .collect();
    let proxy = ProxyBuilder::new(configs[0].clone(), "shop/web")
        .start()
        .await;
    let api = proxy.listener(API);

    // 300 requests from 4 keep-alive clients, in phases of 50: requests
    // of phase p wait for reload p, and reload p starts when phase p - 1
    // is half done, so its second half runs while the proxy reloads.
    const TASKS: usize = 4;
    const PER_PHASE: usize = 50;
    let total = PER_PHASE * configs.len();
    let next = Arc::new(AtomicUsize::new(0));
    let (phase_tx, phase_rx) = tokio::sync::watch::channel(0usize);
    let (done_tx, mut done_rx) = tokio::sync::watch::channel(0usize);
    let mut tasks = Vec::new();
    for _ in 0..TASKS {
        let next = next.clone();
        let mut phase = phase_rx.clone();
        let done = done_tx.clone();
        tasks.push(tokio::spawn(async move {
            // One client per task: its connection to the proxy is kept
            // alive across the reloads.
            let client = clients::http1();
            loop {
                let n = next.fetch_add(1, Ordering::SeqCst);
                if n >= total {
                    return;
                }
                tokio::time::timeout(
                    Duration::from_secs(20),
                    phase.wait_for(|p| *p >= n / PER_PHASE),
                )
                .await
                .expect("reload in time")
                .expect("phases");
                let (status, upstream) = upstream_of(&client, api, "/status?code=200").await;
                assert_eq!((status, upstream.as_str()), (200, "a"), "request {n}");
                done.send_modify(|d| *d += 1);
            }
        }));
    }
    let mut version = proxy.config_version().await;
    for (phase, config) in configs.iter().enumerate().skip(1) {
        let half_done = phase * PER_PHASE - PER_PHASE / 2;
        tokio::time::timeout(
            Duration::from_secs(20),
            done_rx.wait_for(|d| *d >= half_done),
        )
        .await
        .expect("requests in time")
        .expect("requests");
        proxy.reload(config);
        version = proxy.wait_version_change(&version).await;
        phase_tx.send_replace(phase);
    }
    for task in tasks {
        task.await.expect("a request failed");
    }
    assert_eq!(*done_rx.borrow(), total);
    assert_eq!(app.requests(), total, "every request reached the app once");
    // Connections survive: had each reload dropped the pool or the
    // listener, every task would have opened one per reload.
    let (_, metrics) = proxy.admin_get("/metrics").await;
    let downstream = metric_sum(
        &metrics,
        "outrigger_connections_total",
        &[("listener", API)],
    );
    assert!(
        downstream <= (2 * TASKS) as f64,
        "{downstream} downstream connections for {TASKS} clients"
    );
    assert!(
        app.connections() <= 2 * TASKS,
        "{} upstream connections for {TASKS} clients",
        app.connections()
    );
}

#[tokio::test]
async fn removing_a_listener_closes_its_port() {
    let a = HttpUpstream::start("a").await;
    let echo = TcpEcho::start().await;
    let both = format!("{API_ONLY}, {{port: 0, service: db}}");
    let proxy = ProxyBuilder::new(config(&both, &[a.addr], echo.addr, ""), "shop/web")
        .start()
        .await;
    let db = proxy.listener(DB);
    // A connection open before the reload finishes on its own.
    let mut open = TcpStream::connect(db).await.expect("connect");
    open.write_all(b"ping").await.expect("write");
    let mut buf = [0u8; 4];
    open.read_exact(&mut buf).await.expect("echo");
    let before = proxy.config_version().await;

    proxy.reload(&config(API_ONLY, &[a.addr], echo.addr, ""));
    proxy.wait_version_change(&before).await;

    assert!(
        TcpStream::connect(db).await.is_err(),
        "the removed listener's port is closed"
    );
    assert_eq!(proxy.current_listener(DB).await, None);
    open.write_all(b"pong").await.expect("write");
    open.read_exact(&mut buf).await.expect("still carried");
    assert_eq!(&buf, b"pong");
    let client = clients::http1();
    assert_eq!(
        upstream_of(&client, proxy.listener(API), "/status?code=200").await,
        (200, "a".into())
    );
}

#[tokio::test]
async fn a_listener_moves_when_its_port_changes() {
    let a = HttpUpstream::start("a").await;
    let db = closed_port().await;
    let proxy = ProxyBuilder::new(config(API_ONLY, &[a.addr], db, ""), "shop/web")
        .start()
        .await;
    let old = proxy.listener(API);
    let before = proxy.config_version().await;

    let port = closed_port().await.port();
    let moved = format!("{{port: {port}, service: api}}");
    proxy.reload(&config(&moved, &[a.addr], db, ""));
    proxy.wait_version_change(&before).await;

    let new = proxy.current_listener(API).await.expect("api listener");
    assert_eq!(new.port(), port);
    assert!(TcpStream::connect(old).await.is_err(), "old port closed");
    let client = clients::http1();
    assert_eq!(
        upstream_of(&client, new, "/status?code=200").await,
        (200, "a".into())
    );
}
