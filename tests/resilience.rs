//! Outbound resilience against apps that misbehave on demand: retries and
//! their budget, outlier ejection, the circuit breaker's limits, P2C-EWMA.
//! A real sidecar (workload shop/web) calls the apps directly as the
//! endpoints of Service shop/api:
//!
//! ```text
//! client → [web: outbound/shop/api] → app a, app b, app c
//! ```

use std::net::SocketAddr;
use std::time::Duration;

use http::{Method, Request};
use outrigger_e2e::ProxyBuilder;
use outrigger_e2e::clients::{self, read_body};
use outrigger_e2e::mesh::client_config;
use outrigger_e2e::proxy::{Proxy, metric_sum};
use outrigger_e2e::upstream::{HttpUpstream, Misbehaviour};

/// The sidecar's configuration: Service shop/api at `apps`, with a
/// TrafficPolicy whose spec (after `service: api`) is `policy`.
fn config(apps: &[&HttpUpstream], policy: &str) -> String {
    let endpoints: Vec<SocketAddr> = apps.iter().map(|a| a.addr).collect();
    client_config(
        &endpoints,
        "http",
        &format!(
            "---\napiVersion: outrigger.io/v1alpha1\nkind: TrafficPolicy\nmetadata: {{name: api, namespace: shop}}\n\
             spec:\n  service: api\n{policy}"
        ),
    )
}

async fn sidecar(apps: &[&HttpUpstream], policy: &str) -> (Proxy, SocketAddr) {
    let proxy = ProxyBuilder::new(config(apps, policy), "shop/web")
        .start()
        .await;
    let outbound = proxy.listener("outbound/shop/api");
    (proxy, outbound)
}

/// Sends `method path` and returns the status, the `x-outrigger-error`
/// header and the `x-upstream` header.
async fn send(outbound: SocketAddr, method: Method, path: &str) -> (u16, String, String) {
    let req = Request::builder()
        .method(method)
        .uri(format!("http://{outbound}{path}"))
        .body(clients::body("payload"))
        .expect("request");
    let answer = clients::exchange(req).await;
    (
        answer.status,
        answer.header("x-outrigger-error"),
        answer.header("x-upstream"),
    )
}

async fn get(outbound: SocketAddr, path: &str) -> (u16, String, String) {
    send(outbound, Method::GET, path).await
}

async fn metric(proxy: &Proxy, name: &str, labels: &[(&str, &str)]) -> f64 {
    let (_, body) = proxy.admin_get("/metrics").await;
    metric_sum(&body, name, labels)
}

/// `n` GETs of `path`, `concurrency` at a time: how many got 200.
async fn load(outbound: SocketAddr, path: &'static str, n: usize, concurrency: usize) -> usize {
    let client = clients::http1();
    let mut tasks = Vec::new();
    for worker in 0..concurrency {
        let client = client.clone();
        tasks.push(tokio::spawn(async move {
            let mut ok = 0;
            for _ in (worker..n).step_by(concurrency) {
                let rsp = tokio::time::timeout(
                    Duration::from_secs(10),
                    client.request(clients::get(outbound, path)),
                )
                .await
                .expect("answered in time")
                .expect("response");
                ok += usize::from(rsp.status() == 200);
                read_body(rsp).await.expect("body");
            }
            ok
        }));
    }
    let mut ok = 0;
    for task in tasks {
        ok += task.await.expect("worker");
    }
    ok
}

const RETRY_3: &str = "  retries:\n    attempts: 3\n    retryOn: [gateway-error]\n    backoff: {baseInterval: 1ms, maxInterval: 5ms}\n";

#[tokio::test]
async fn retries_turn_a_30_percent_failing_service_into_a_reliable_one() {
    let app = HttpUpstream::start("a").await;
    // The budget has to cover the failure rate: 30% of the requests need
    // a retry, and the default (20% plus 10/s) would leave some unsaved.
    let (proxy, outbound) =
        sidecar(&[&app], &format!("{RETRY_3}    budget: {{ratio: 0.5}}\n")).await;
    // One at a time, so the app's every-third-or-fourth failure never
    // meets a retry.
    let ok = load(outbound, "/flaky?percent=30", 1000, 1).await;
    assert!(ok >= 990, "{ok}/1000 succeeded");
    // Retries are requests too, 30% of which fail: the app sees about
    // 1000 / 0.7. Each retry is counted with its reason.
    let seen = app.requests();
    assert!((1400..=1450).contains(&seen), "the app saw {seen} requests");
    let retries = metric(
        &proxy,
        "outrigger_retries_total",
        &[("service", "shop/api"), ("reason", "status")],
    )
    .await;
    assert_eq!(retries as usize, seen - 1000);
}

#[tokio::test]
async fn a_request_survives_failures_up_to_its_attempts() {
    let app = HttpUpstream::start_with("a", Misbehaviour::FailFirst(2)).await;
    let (_proxy, outbound) = sidecar(&[&app], RETRY_3).await;
    assert_eq!(get(outbound, "/headers").await.0, 200, "third time lucky");
    assert_eq!(app.requests(), 3);

    let app = HttpUpstream::start_with("b", Misbehaviour::FailFirst(3)).await;
    let (_proxy, outbound) = sidecar(&[&app], RETRY_3).await;
    let (status, _, upstream) = get(outbound, "/headers").await;
    assert_eq!(
        (status, upstream.as_str()),
        (503, "b"),
        "the last answer, as the app gave it"
    );
    assert_eq!(app.requests(), 3);
}

#[tokio::test]
async fn each_attempt_is_numbered_and_post_needs_the_opt_in() {
    let app = HttpUpstream::start("a").await;
    let (proxy, outbound) = sidecar(&[&app], RETRY_3).await;

    // The app sees which attempt each one is.
    let (status, body) = clients::http1_get(outbound, "/headers").await.expect("get");
    assert_eq!(status, 200);
    let body = String::from_utf8_lossy(&body);
    assert!(
        body.contains(r#""x-outrigger-retry-attempt":["1"]"#),
        "{body}"
    );

    // POST is not retried: one attempt.
    let before = app.requests();
    assert_eq!(
        send(outbound, Method::POST, "/status?code=503").await.0,
        503
    );
    assert_eq!(app.requests() - before, 1);
    // GET and PUT are: three.
    let before = app.requests();
    assert_eq!(send(outbound, Method::PUT, "/status?code=503").await.0, 503);
    assert_eq!(app.requests() - before, 3);

    // With the opt-in, applied hot, POST is retried too.
    let version = proxy.config_version().await;
    proxy.reload(&config(
        &[&app],
        &format!("{RETRY_3}    retryNonIdempotent: true\n"),
    ));
    proxy.wait_version_change(&version).await;
    let before = app.requests();
    assert_eq!(
        send(outbound, Method::POST, "/status?code=503").await.0,
        503
    );
    assert_eq!(app.requests() - before, 3);
}

#[tokio::test]
async fn the_budget_keeps_a_dead_service_from_getting_multiplied_load() {
    let app = HttpUpstream::start_with("a", Misbehaviour::Status(503)).await;
    let (proxy, outbound) = sidecar(
        &[&app],
        "  retries:\n    attempts: 3\n    retryOn: [5xx]\n    backoff: {baseInterval: 1ms, maxInterval: 2ms}\n    \
         budget: {ratio: 0.2, minRetriesPerSecond: 10, window: 10s}\n",
    )
    .await;
    let requests = 500;
    let ok = load(outbound, "/headers", requests, 4).await;
    assert_eq!(ok, 0);
    // Without a budget: 1,500 attempts. With it: the requests, 20% more,
    // and the reserve of 10/s over the 10 s window.
    let attempts = app.requests();
    assert!(
        attempts <= requests + requests / 5 + 100,
        "{attempts} attempts for {requests} requests"
    );
    assert!(attempts > requests, "some retries happen");
    let exhausted = metric(
        &proxy,
        "outrigger_retry_budget_exhausted_total",
        &[("service", "shop/api")],
    )
    .await;
    assert!(exhausted > 0.0);
}

#[tokio::test]
async fn per_try_timeouts_and_resets_are_retried() {
    let app = HttpUpstream::start("a").await;
    let (_proxy, outbound) = sidecar(
        &[&app],
        "  retries:\n    attempts: 2\n    retryOn: [gateway-error]\n    perTryTimeout: 200ms\n    \
         backoff: {baseInterval: 1ms, maxInterval: 2ms}\n",
    )
    .await;
    let (status, error, _) = get(outbound, "/hang").await;
    assert_eq!((status, error.as_str()), (504, "timeout"));
    assert_eq!(app.requests(), 2, "two attempts, each cut at 200ms");

    let (status, error, _) = get(outbound, "/reset").await;
    assert_eq!((status, error.as_str()), (502, "upstream-reset"));
    assert_eq!(app.requests(), 4);
}

const EJECT_AFTER_5: &str = "  loadBalancer: round-robin\n  outlierDetection:\n    consecutiveFailures: 5\n    \
                             baseEjectionTime: 1s\n    maxEjectionTime: 10s\n    maxEjectionPercent: 50\n";

#[tokio::test]
async fn a_failing_endpoint_is_ejected_then_tried_again() {
    let a = HttpUpstream::start("a").await;
    let b = HttpUpstream::start("b").await;
    let bad = HttpUpstream::start_with("bad", Misbehaviour::Status(503)).await;
    let (proxy, outbound) = sidecar(&[&a, &b, &bad], EJECT_AFTER_5).await;

    // Round robin: every third request meets the bad endpoint until it
    // has failed 5 times in a row.
    let mut failures = 0;
    for _ in 0..15 {
        failures += usize::from(get(outbound, "/headers").await.0 == 503);
    }
    assert_eq!((failures, bad.requests()), (5, 5));
    let labels = [("service", "shop/api")];
    assert_eq!(
        metric(&proxy, "outrigger_outlier_ejections_total", &labels).await,
        1.0
    );
    assert_eq!(
        metric(&proxy, "outrigger_outlier_ejected_endpoints", &labels).await,
        1.0
    );
    let config = proxy.config().await;
    let endpoints = config["endpoints"]["shop/api"].to_string();
    assert!(endpoints.contains("\"ejected\":true"), "{endpoints}");

    // Ejected: no traffic at all while its time runs.
    for _ in 0..30 {
        assert_eq!(get(outbound, "/headers").await.0, 200);
    }
    assert_eq!(bad.requests(), 5);

    // After 1 s it gets a real request again (on probation). It still
    // fails, so it goes straight back out, for 2 s this time.
    let mut probes = 0;
    while bad.requests() == 5 {
        probes += 1;
        assert!(probes < 2000, "never tried again");
        get(outbound, "/headers").await;
    }
    assert_eq!(
        metric(&proxy, "outrigger_outlier_ejections_total", &labels).await,
        2.0
    );

    // Healed, it is back in rotation after its next probe.
    bad.set_misbehaviour(Misbehaviour::None);
    while bad.requests() == 6 {
        get(outbound, "/headers").await;
    }
    for _ in 0..30 {
        assert_eq!(get(outbound, "/headers").await.0, 200);
    }
    assert!(bad.requests() >= 6 + 9, "in rotation: {}", bad.requests());
    assert_eq!(
        metric(&proxy, "outrigger_outlier_ejected_endpoints", &labels).await,
        0.0
    );
}

#[tokio::test]
async fn when_every_endpoint_is_ejected_requests_fail_fast_without_touching_them() {
    let app = HttpUpstream::start_with("a", Misbehaviour::Status(500)).await;
    let (proxy, outbound) = sidecar(
        &[&app],
        "  outlierDetection: {consecutiveFailures: 3, baseEjectionTime: 30s}\n",
    )
    .await;
    for _ in 0..3 {
        assert_eq!(get(outbound, "/headers").await.0, 500);
    }
    for _ in 0..20 {
        let (status, error, _) = get(outbound, "/headers").await;
        assert_eq!((status, error.as_str()), (503, "circuit-open"));
    }
    assert_eq!(app.requests(), 3, "the app was left alone");
    let open = metric(&proxy, "outrigger_circuit_open", &[("service", "shop/api")]).await;
    assert_eq!(open, 1.0);
}

#[tokio::test]
async fn over_the_concurrency_limits_requests_fail_at_once() {
    let app = HttpUpstream::start("a").await;
    let (proxy, outbound) = sidecar(&[&app], "  circuitBreaker: {maxRequests: 2}\n").await;
    let slow: Vec<_> = (0..2)
        .map(|_| tokio::spawn(async move { get(outbound, "/slow?ms=1000").await.0 }))
        .collect();
    app.wait_for_requests(2).await;
    let (status, error, _) = get(outbound, "/headers").await;
    assert_eq!((status, error.as_str()), (503, "overflow"));
    assert!(
        slow.iter().all(|task| !task.is_finished()),
        "failed fast: answered while the two slow requests still run"
    );
    for task in slow {
        assert_eq!(task.await.expect("slow request"), 200);
    }
    assert_eq!(
        get(outbound, "/headers").await.0,
        200,
        "a slot is free again"
    );
    let overflows = metric(
        &proxy,
        "outrigger_circuit_overflow_total",
        &[("service", "shop/api"), ("limit", "maxRequests")],
    )
    .await;
    assert_eq!(overflows, 1.0);

    // One connection at most: a second HTTP/1.1 request while the first
    // holds it cannot get one.
    let app = HttpUpstream::start("b").await;
    let (_proxy, outbound) = sidecar(&[&app], "  circuitBreaker: {maxConnections: 1}\n").await;
    let held = tokio::spawn(async move { get(outbound, "/slow?ms=1000").await.0 });
    app.wait_for_requests(1).await;
    let (status, error, _) = get(outbound, "/headers").await;
    assert_eq!((status, error.as_str()), (503, "overflow"));
    assert_eq!(held.await.expect("held"), 200);
}

#[tokio::test]
async fn p2c_ewma_sends_little_to_a_slow_endpoint() {
    let a = HttpUpstream::start("a").await;
    let b = HttpUpstream::start("b").await;
    let slow =
        HttpUpstream::start_with("slow", Misbehaviour::Delay(Duration::from_millis(50))).await;
    // No TrafficPolicy: p2c-ewma is the default.
    let endpoints = [a.addr, b.addr, slow.addr];
    let proxy = ProxyBuilder::new(client_config(&endpoints, "http", ""), "shop/web")
        .start()
        .await;
    let outbound = proxy.listener("outbound/shop/api");
    let total = 400;
    assert_eq!(load(outbound, "/headers", total, 4).await, total);
    let share = slow.requests() as f64 / total as f64;
    eprintln!("the slow endpoint got {:.1}%", share * 100.0);
    assert!(share < 0.2, "the slow endpoint got {:.0}%", share * 100.0);
}

#[tokio::test]
async fn a_route_prefix_gets_its_own_timeout() {
    let app = HttpUpstream::start("a").await;
    let (_proxy, outbound) = sidecar(
        &[&app],
        "  timeouts: {request: 200ms}\n  routes: [{pathPrefix: /slow, requestTimeout: 5s}]\n",
    )
    .await;
    assert_eq!(get(outbound, "/slow?ms=400").await.0, 200);
    let (status, body) = clients::http1_get(outbound, "/hang").await.expect("get");
    assert_eq!(status, 504);
    let body = String::from_utf8_lossy(&body);
    assert!(body.contains("timed out after 200ms"), "{body}");
}
