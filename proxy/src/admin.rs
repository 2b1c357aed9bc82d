//! The admin listener: `/live`, `/ready`, `/metrics`, `/config`.
//!
//! It runs on its own listener and tasks, never in the data path, so a
//! metrics scrape cannot delay a request and a flood of requests cannot hide
//! the proxy's health. It binds loopback by default.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use metrics_exporter_prometheus::PrometheusHandle;
use serde_json::json;

use crate::state::{Applied, ProxyState};

/// Binds the admin listener and serves it until the process exits. The
/// admin server keeps answering during a drain (`/ready` says 503 then).
pub async fn start(
    addr: SocketAddr,
    state: Arc<ProxyState>,
    prometheus: PrometheusHandle,
) -> anyhow::Result<SocketAddr> {
    let listener = crate::listener::bind(addr, "admin").await?;
    let local = listener.local_addr()?;
    let upkeep = prometheus.clone();
    tokio::spawn(async move {
        // Histograms buffer samples until rendered; drain them regularly so
        // an unscraped proxy does not grow.
        let mut tick = tokio::time::interval(Duration::from_secs(5));
        loop {
            tick.tick().await;
            upkeep.run_upkeep();
        }
    });
    tokio::spawn(async move {
        loop {
            let (stream, _) = match listener.accept().await {
                Ok(conn) => conn,
                Err(e) => {
                    tracing::warn!(error = %e, "admin accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let state = state.clone();
            let prometheus = prometheus.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |req| {
                    let rsp = route(&req, &state, &prometheus);
                    std::future::ready(Ok::<_, Infallible>(rsp))
                });
                let mut builder = hyper::server::conn::http1::Builder::new();
                builder
                    .timer(TokioTimer::new())
                    .header_read_timeout(Duration::from_secs(10));
                if let Err(e) = builder
                    .serve_connection(TokioIo::new(stream), service)
                    .await
                {
                    tracing::debug!(error = %e, "admin connection error");
                }
            });
        }
    });
    tracing::info!(addr = %local, "admin listening");
    Ok(local)
}

fn route(
    req: &Request<Incoming>,
    state: &ProxyState,
    prometheus: &PrometheusHandle,
) -> Response<Full<Bytes>> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return text(StatusCode::METHOD_NOT_ALLOWED, "only GET and HEAD\n");
    }
    match req.uri().path() {
        "/live" => text(StatusCode::OK, "live\n"),
        "/ready" => {
            if state.is_ready() {
                text(StatusCode::OK, "ready\n")
            } else if state.is_draining() {
                text(StatusCode::SERVICE_UNAVAILABLE, "not ready: draining\n")
            } else if state.lacks_certificate() {
                text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "not ready: no certificate yet\n",
                )
            } else if state.loaded().is_none() {
                text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "not ready: no configuration yet\n",
                )
            } else {
                text(StatusCode::SERVICE_UNAVAILABLE, "not ready: starting\n")
            }
        }
        "/metrics" => {
            let mut rsp = Response::new(Full::new(Bytes::from(prometheus.render())));
            rsp.headers_mut().insert(
                header::CONTENT_TYPE,
                http::HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
            );
            rsp
        }
        "/config" => {
            let body = config_json(state);
            let mut rsp = Response::new(Full::new(Bytes::from(body)));
            rsp.headers_mut().insert(
                header::CONTENT_TYPE,
                http::HeaderValue::from_static("application/json"),
            );
            rsp
        }
        _ => text(
            StatusCode::NOT_FOUND,
            "not found; try /live, /ready, /metrics or /config\n",
        ),
    }
}

/// The policy this proxy runs: its workload, and the services, traffic
/// policies and authorization policies that concern it.
pub fn config_json(state: &ProxyState) -> String {
    let doc = match state.applied() {
        Some(applied) => applied_json(&applied, state.is_draining()),
        None => json!({
            "version": null,
            "status": "no configuration yet",
            "listeners": [],
            "notEnforced": [],
            "draining": state.is_draining(),
        }),
    };
    let mut doc = doc;
    // Who we are on the wire: the certificate's SPIFFE ID, serial and
    // validity (never the key), or null without mTLS.
    doc["mtls"] = json!(state.identity().is_some());
    doc["identity"] = match state.identity().and_then(|i| i.credentials()) {
        Some(credentials) => json!(credentials.summary()),
        None => serde_json::Value::Null,
    };
    let mut out =
        serde_json::to_string_pretty(&doc).unwrap_or_else(|e| format!("{{\"error\": \"{e}\"}}"));
    out.push('\n');
    out
}

fn applied_json(applied: &Applied, draining: bool) -> serde_json::Value {
    let loaded = &applied.loaded;
    let config = &loaded.config;
    let workload = config.workloads.iter().find(|w| w.id == loaded.workload);
    let services: Vec<_> = workload
        .map(|w| {
            w.destinations()
                .into_iter()
                .filter_map(|s| config.service(s))
                .collect()
        })
        .unwrap_or_default();
    let traffic: Vec<_> = services
        .iter()
        .filter_map(|s| config.traffic_policy_for(&s.id))
        .collect();
    let authz: Vec<_> = config
        .authorization_policies_for(&loaded.workload)
        .collect();
    let loaded_at = loaded
        .loaded_at
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    json!({
        "version": loaded.version,
        "source": loaded.source,
        "loadedAtUnix": loaded_at,
        "workload": workload,
        "mesh": config.mesh,
        "services": services,
        "trafficPolicies": traffic,
        "authorizationPolicies": authz,
        "listeners": applied.listeners,
        "endpoints": live_endpoints(applied),
        "notEnforced": loaded.not_enforced,
        "draining": draining,
    })
}

/// Each outbound service's endpoints as the balancer scores them now.
fn live_endpoints(applied: &Applied) -> serde_json::Value {
    let now = tokio::time::Instant::now();
    let mut services = serde_json::Map::new();
    for (name, destination) in &applied.destinations {
        let destination = destination.load();
        let endpoints: Vec<serde_json::Value> = destination
            .endpoints()
            .iter()
            .map(|e| {
                let score = &e.score;
                let ejected_for = score.health.ejected_for(now);
                json!({
                    "address": score.addr,
                    "pending": score.pending(),
                    "rttEwmaMs": score.rtt_ewma(now).as_secs_f64() * 1000.0,
                    "consecutiveFailures": score.health.consecutive_failures(),
                    "ejected": ejected_for.is_some(),
                    "ejectedForMs": ejected_for.map(|d| d.as_millis()),
                })
            })
            .collect();
        let (requests, connections) = destination.in_flight();
        services.insert(
            name.to_string(),
            json!({
                "loadBalancer": destination.policy.load_balancer,
                "requestsInFlight": requests,
                "connectionsOpen": connections,
                "endpoints": endpoints,
            }),
        );
    }
    serde_json::Value::Object(services)
}

fn text(status: StatusCode, body: &'static str) -> Response<Full<Bytes>> {
    let mut rsp = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    *rsp.status_mut() = status;
    rsp.headers_mut().insert(
        header::CONTENT_TYPE,
        http::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    rsp
}
