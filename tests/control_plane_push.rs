//! The whole loop with real processes: `outrigger serve`, sidecars that get
//! their policy from it over gRPC, and real HTTP traffic through them.
//!
//! The mesh: `web` calls `api` through its outbound listener; `api`'s
//! sidecar registers its inbound listener as the endpoint of Service
//! `api` (no static endpoints), in front of a test app.

use std::net::SocketAddr;
use std::time::Duration;

use outrigger_e2e::clients;
use outrigger_e2e::control_plane::ControlPlane;
use outrigger_e2e::eventually;
use outrigger_e2e::proxy::metric_sum;
use outrigger_e2e::upstream::HttpUpstream;
use outrigger_e2e::{Proxy, ProxyBuilder};
use serde_json::Value;

fn mesh(app_port: u16, request_timeout: &str) -> String {
    format!(
        "{}---
apiVersion: outrigger.io/v1alpha1
kind: TrafficPolicy
metadata: {{name: api, namespace: shop}}
spec:
  service: api
  timeouts: {{request: {request_timeout}}}
",
        outrigger_e2e::mesh::registered_api(app_port)
    )
}

/// A sidecar on the control plane, saving its snapshots to `state`.
async fn sidecar(cp: &ControlPlane, workload: &str, state: &std::path::Path) -> Proxy {
    ProxyBuilder::with_control_plane(&cp.grpc_url(), workload)
        .arg("--state-dir")
        .arg(state.to_str().expect("utf-8 path"))
        .arg("--proxy-id")
        .arg(workload.replace('/', "-"))
        .start()
        .await
}

async fn outbound(web: &Proxy) -> SocketAddr {
    web.current_listener("outbound/shop/api")
        .await
        .expect("web has its outbound listener")
}

/// GET through web's outbound listener: status and the `x-upstream` that
/// answered.
async fn call(web: SocketAddr, path: &str) -> (u16, String) {
    clients::upstream_of(&clients::http1(), web, path).await
}

async fn metric(proxy: &Proxy, name: &str) -> f64 {
    let (_, body) = proxy.admin_get("/metrics").await;
    metric_sum(&body, name, &[])
}

struct Mesh {
    data: tempfile::TempDir,
    state: tempfile::TempDir,
    cp: ControlPlane,
    app_a: HttpUpstream,
    app_b: HttpUpstream,
    api: Proxy,
    web: Proxy,
}

async fn start_mesh() -> Mesh {
    let data = tempfile::tempdir().expect("tempdir");
    let state = tempfile::tempdir().expect("tempdir");
    let cp = ControlPlane::start(data.path()).await;
    let app_a = HttpUpstream::start("app-a").await;
    let app_b = HttpUpstream::start("app-b").await;
    cp.apply(&mesh(app_a.addr.port(), "5s")).await;
    let api = sidecar(&cp, "shop/api", &state.path().join("api")).await;
    let web = sidecar(&cp, "shop/web", &state.path().join("web")).await;
    cp.wait_synced(2).await;
    // web learns api's endpoint once api has ACKed with its bound port.
    let addr = outbound(&web).await;
    eventually(
        "web to reach api through the registered endpoint",
        || async { call(addr, "/headers").await == (200, "app-a".to_string()) },
    )
    .await;
    Mesh {
        data,
        state,
        cp,
        app_a,
        app_b,
        api,
        web,
    }
}

#[tokio::test]
async fn applied_policy_reaches_the_sidecars_without_a_restart() {
    let m = start_mesh().await;
    let (web_pid, api_pid) = (m.web.pid(), m.api.pid());
    let addr = outbound(&m.web).await;

    // The api sidecar's address is the registered endpoint.
    let api_inbound = m
        .api
        .current_listener("inbound/http")
        .await
        .expect("inbound");
    let (_, snapshot) = m.cp.snapshot("shop/web").await;
    assert!(snapshot.contains(&api_inbound.to_string()), "{snapshot}");

    // A new app port for api, and a shorter timeout for web's calls.
    let version = m.web.config_version().await;
    m.cp.apply(&mesh(m.app_b.addr.port(), "300ms")).await;
    m.web.wait_version_change(&version).await;
    eventually("api to forward to the new app port", || async {
        call(addr, "/headers").await == (200, "app-b".to_string())
    })
    .await;
    assert_eq!(call(addr, "/slow?ms=1000").await.0, 504);
    assert_eq!((m.web.pid(), m.api.pid()), (web_pid, api_pid));
    m.cp.wait_synced(2).await;

    // /config says where the policy came from; metrics count the pushes.
    let config = m.web.config().await;
    assert!(
        config["source"]
            .as_str()
            .is_some_and(|s| s.starts_with("control plane revision 2")),
        "{config}"
    );
    assert_eq!(metric(&m.web, "outrigger_policy_acks_total").await, 2.0);
    assert_eq!(
        metric(&m.web, "outrigger_policy_stream_connected").await,
        1.0
    );
    let (_, cp_metrics) = clients::http1_get(m.cp.admin, "/metrics")
        .await
        .expect("metrics");
    let cp_metrics = String::from_utf8_lossy(&cp_metrics).into_owned();
    assert_eq!(
        metric_sum(&cp_metrics, "outrigger_cp_connected_proxies", &[]),
        2.0
    );
    assert!(metric_sum(&cp_metrics, "outrigger_cp_push_ack_seconds_count", &[]) >= 4.0);

    // proxy-status, as an operator sees it.
    let out = m.cp.cli().arg("proxy-status").output().expect("cli");
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success());
    assert!(table.starts_with("PROXY"), "{table}");
    assert!(
        table.contains("shop-web") && table.contains("SYNCED"),
        "{table}"
    );
}

#[tokio::test]
async fn a_policy_change_under_continuous_load_loses_no_request() {
    let m = start_mesh().await;
    let addr = outbound(&m.web).await;
    let total = 400;
    let load = tokio::spawn(async move {
        let client = clients::http1();
        let mut failures = Vec::new();
        for i in 0..total {
            let rsp = tokio::time::timeout(
                Duration::from_secs(10),
                client.request(clients::get(addr, "/headers")),
            )
            .await;
            match rsp {
                Ok(Ok(rsp)) if rsp.status() == 200 => {
                    let _ = clients::read_body(rsp).await;
                }
                other => failures.push(format!("request {i}: {other:?}")),
            }
            // Paced so the load spans every change below.
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        failures
    });
    for i in 0..6 {
        let port = if i % 2 == 0 {
            m.app_b.addr.port()
        } else {
            m.app_a.addr.port()
        };
        let timeout = format!("{}s", 6 + i);
        let (web_version, api_version) =
            (m.web.config_version().await, m.api.config_version().await);
        m.cp.apply(&mesh(port, &timeout)).await;
        m.web.wait_version_change(&web_version).await;
        m.api.wait_version_change(&api_version).await;
    }
    let failures = load.await.expect("load task");
    assert!(failures.is_empty(), "lost requests: {failures:#?}");
    assert!(m.app_a.requests() > 0 && m.app_b.requests() > 0);
}

#[tokio::test]
async fn invalid_changes_are_refused_and_an_unappliable_snapshot_is_nacked() {
    let m = start_mesh().await;
    let addr = outbound(&m.web).await;
    let version = m.web.config_version().await;
    let revision = m.cp.revision().await;

    // Refused at the API: nothing changes anywhere.
    let bad = mesh(m.app_a.addr.port(), "5s").replace("service: api}", "service: nope}");
    let (status, body) =
        m.cp.call(
            "POST",
            "/api/v1/apply",
            Some(("application/yaml", &bad)),
            None,
        )
        .await;
    assert_eq!(status, 422, "{body}");
    assert!(
        body.contains("spec.inbound[0].service: no Service shop/nope"),
        "{body}"
    );
    assert_eq!(m.cp.revision().await, revision);

    // Valid policy the web sidecar cannot apply: a port that is taken.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = taken.local_addr().expect("addr").port();
    let with_db = format!(
        "{}---\napiVersion: outrigger.io/v1alpha1\nkind: Service\nmetadata: {{name: db, namespace: shop}}\n\
         spec: {{protocol: tcp, endpoints: [{{address: '127.0.0.1:5432'}}]}}\n",
        mesh(m.app_a.addr.port(), "5s").replace(
            "outbound: [{port: 0, service: api}]",
            &format!("outbound: [{{port: 0, service: api}}, {{port: {port}, service: db}}]")
        )
    );
    m.cp.apply(&with_db).await;
    let proxies =
        m.cp.wait_for_proxies("web to NACK", |ps| {
            ps.iter()
                .any(|p| p["workload"] == "shop/web" && p["status"] == "NACKED")
        })
        .await;
    let web_status: &Value = proxies
        .iter()
        .find(|p| p["workload"] == "shop/web")
        .expect("web");
    let reason = web_status["lastNack"]["reason"].as_str().unwrap_or("");
    assert!(reason.contains(&format!("127.0.0.1:{port}")), "{reason}");
    assert!(reason.contains("outbound/shop/db"), "{reason}");
    // The old policy keeps serving, at the old version.
    assert_eq!(m.web.config_version().await, version);
    assert_eq!(call(addr, "/headers").await, (200, "app-a".to_string()));
    // At least one: the sidecar keeps trying while the port is taken.
    assert!(metric(&m.web, "outrigger_policy_nacks_total").await >= 1.0);
    let out = m.cp.cli().arg("proxy-status").output().expect("cli");
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(
        table.contains("NACKED") && table.contains("cannot listen"),
        "{table}"
    );

    // Once the port is free, the sidecar's next try applies it, with no
    // new change from the operator.
    drop(taken);
    m.cp.wait_synced(2).await;
    assert_eq!(m.cp.revision().await, revision + 1);
    assert_ne!(m.web.config_version().await, version);
    assert!(m.web.current_listener("outbound/shop/db").await.is_some());
}

#[tokio::test]
async fn sidecars_fail_static_through_a_control_plane_crash_and_resync() {
    let mut m = start_mesh().await;
    let addr = outbound(&m.web).await;
    let revision = m.cp.revision().await;
    let grpc = m.cp.grpc;
    let pushes = metric(&m.web, "outrigger_policy_pushes_total").await;
    // Registrations are saved within about half a second.
    let api_port = m
        .api
        .current_listener("inbound/http")
        .await
        .expect("inbound")
        .port();
    let saved = m.data.path().join("registrations.json");
    eventually("api's registration to be saved", || async {
        std::fs::read_to_string(&saved).is_ok_and(|s| s.contains(&format!(",{api_port}]")))
    })
    .await;

    m.cp.kill();
    // No control plane: traffic flows on the last good policy.
    for _ in 0..20 {
        assert_eq!(call(addr, "/headers").await, (200, "app-a".to_string()));
    }
    eventually("web to notice the stream is gone", || async {
        metric(&m.web, "outrigger_policy_stream_connected").await == 0.0
    })
    .await;

    // Restarted from the same data dir, on the same gRPC port, while the
    // api sidecar cannot reconnect yet (stopped): the control plane still
    // serves api's endpoint from the registrations it saved, so web is not
    // pushed a snapshot without it.
    let api_inbound = m
        .api
        .current_listener("inbound/http")
        .await
        .expect("inbound");
    m.api.signal("STOP");
    let grpc_arg = grpc.to_string();
    m.cp = ControlPlane::start_with(m.data.path(), &["--grpc-addr", &grpc_arg]).await;
    assert_eq!(m.cp.revision().await, revision);
    let (_, snapshot) = m.cp.snapshot("shop/web").await;
    assert!(snapshot.contains(&api_inbound.to_string()), "{snapshot}");
    m.cp.wait_for_proxies("web to resync", |ps| {
        ps.iter()
            .any(|p| p["workload"] == "shop/web" && p["status"] == "SYNCED")
    })
    .await;
    m.api.signal("CONT");
    m.cp.wait_synced(2).await;
    // Both reported the version they run: nothing needed pushing.
    assert_eq!(
        metric(&m.web, "outrigger_policy_pushes_total").await,
        pushes
    );
    // api re-registered its endpoint; the next change still flows.
    let version = m.api.config_version().await;
    m.cp.apply(&mesh(m.app_b.addr.port(), "5s")).await;
    m.api.wait_version_change(&version).await;
    eventually("the change after the restart to take effect", || async {
        call(addr, "/headers").await == (200, "app-b".to_string())
    })
    .await;
}

#[tokio::test]
async fn a_sidecar_restarted_without_its_control_plane_serves_its_saved_snapshot() {
    let mut m = start_mesh().await;
    let version = m.web.config_version().await;
    m.cp.kill();

    m.web.signal("TERM");
    m.web.wait_exit(Duration::from_secs(15)).await;
    let web = sidecar(&m.cp, "shop/web", &m.state.path().join("web")).await;
    assert_eq!(web.config_version().await, version);
    let config = web.config().await;
    assert!(
        config["source"]
            .as_str()
            .is_some_and(|s| s.starts_with("saved snapshot of control plane revision 1")),
        "{config}"
    );
    let addr = outbound(&web).await;
    assert_eq!(call(addr, "/headers").await, (200, "app-a".to_string()));

    // Without a state dir and without a control plane there is nothing to
    // serve: not ready, and it says why.
    let fresh = ProxyBuilder::with_control_plane(&m.cp.grpc_url(), "shop/web")
        .no_wait_ready()
        .start()
        .await;
    let (status, body) = fresh.admin_get("/ready").await;
    assert_eq!(status, 503, "{body}");
}

#[tokio::test]
async fn rollback_restores_the_earlier_behaviour() {
    let m = start_mesh().await;
    let addr = outbound(&m.web).await;
    assert_eq!(call(addr, "/slow?ms=600").await.0, 200);

    let version = m.web.config_version().await;
    m.cp.apply(&mesh(m.app_a.addr.port(), "200ms")).await;
    m.web.wait_version_change(&version).await;
    assert_eq!(call(addr, "/slow?ms=600").await.0, 504);

    let version = m.web.config_version().await;
    let out = m.cp.cli().args(["rollback", "1"]).output().expect("cli");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    m.web.wait_version_change(&version).await;
    assert_eq!(call(addr, "/slow?ms=600").await.0, 200);
}

#[tokio::test]
async fn a_sidecar_whose_workload_is_not_defined_waits_for_it() {
    let data = tempfile::tempdir().expect("tempdir");
    let cp = ControlPlane::start(data.path()).await;
    let app = HttpUpstream::start("app").await;
    let proxy = ProxyBuilder::with_control_plane(&cp.grpc_url(), "shop/api")
        .no_wait_ready()
        .start()
        .await;
    cp.wait_for_proxies("the sidecar to connect", |ps| {
        ps.len() == 1 && ps[0]["status"] == "UNKNOWN_WORKLOAD"
    })
    .await;
    assert_eq!(proxy.admin_get("/ready").await.0, 503);
    cp.apply(&mesh(app.addr.port(), "5s")).await;
    proxy.wait_ready().await;
    cp.wait_synced(1).await;
}

#[tokio::test]
async fn only_sidecars_a_change_concerns_get_a_push() {
    let m = start_mesh().await;
    let web_pushes = metric(&m.web, "outrigger_policy_pushes_total").await;
    let api_pushes = metric(&m.api, "outrigger_policy_pushes_total").await;

    // A Workload nobody runs: a new revision, no push to anyone.
    let other = "---\napiVersion: outrigger.io/v1alpha1\nkind: Workload\n\
                 metadata: {name: other, namespace: shop}\nspec: {inbound: [{port: 0, appPort: 1}]}\n";
    let base = mesh(m.app_a.addr.port(), "5s");
    m.cp.apply(&format!("{base}{other}")).await;
    // Then a change for web only: web gets exactly one push, api none.
    let version = m.web.config_version().await;
    m.cp.apply(&format!("{}{other}", mesh(m.app_a.addr.port(), "7s")))
        .await;
    m.web.wait_version_change(&version).await;
    m.cp.wait_synced(2).await;
    assert_eq!(
        metric(&m.web, "outrigger_policy_pushes_total").await,
        web_pushes + 1.0
    );
    assert_eq!(
        metric(&m.api, "outrigger_policy_pushes_total").await,
        api_pushes
    );
}

#[tokio::test]
async fn a_departed_sidecars_endpoint_is_removed_after_the_grace_period() {
    let mut m = start_mesh().await;
    let addr = outbound(&m.web).await;
    let api_inbound = m
        .api
        .current_listener("inbound/http")
        .await
        .expect("inbound");
    let version = m.web.config_version().await;

    m.api.signal("KILL");
    m.api.wait_exit(Duration::from_secs(10)).await;
    // The harness's control plane keeps endpoints for 2 s.
    m.web.wait_version_change(&version).await;
    let (_, snapshot) = m.cp.snapshot("shop/web").await;
    assert!(!snapshot.contains(&api_inbound.to_string()), "{snapshot}");
    let (status, _) = call(addr, "/headers").await;
    assert_eq!(status, 503, "no endpoints left");
    m.cp.wait_for_proxies("api to be forgotten", |ps| ps.len() == 1)
        .await;
}
