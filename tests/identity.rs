//! Workload identity from the control plane: bootstrap tokens, CSRs over
//! gRPC, certificates the sidecars renew by themselves, and mTLS between
//! sidecars with them. Real processes on loopback.

#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use outrigger_e2e::clients;
use outrigger_e2e::control_plane::ControlPlane;
use outrigger_e2e::proxy::metric_sum;
use outrigger_e2e::upstream::HttpUpstream;
use outrigger_e2e::{Proxy, ProxyBuilder};
use serde_json::Value;

const WEB_ID: &str = "spiffe://cluster.local/ns/shop/sa/web";
const API_ID: &str = "spiffe://cluster.local/ns/shop/sa/api";

fn mesh(app_port: u16) -> String {
    format!(
        "\
apiVersion: outrigger.io/v1alpha1
kind: Service
metadata: {{name: api, namespace: shop}}
spec: {{protocol: http}}
---
apiVersion: outrigger.io/v1alpha1
kind: Workload
metadata: {{name: api, namespace: shop}}
spec:
  inbound: [{{name: http, port: 0, appPort: {app_port}, service: api}}]
---
apiVersion: outrigger.io/v1alpha1
kind: Workload
metadata: {{name: web, namespace: shop}}
spec:
  inbound: [{{name: http, port: 0, appPort: 1}}]
  outbound: [{{port: 0, service: api}}]
"
    )
}

/// `outrigger token create`, written to a file as an operator would.
fn token_file(cp: &ControlPlane, workload: &str, dir: &Path) -> std::path::PathBuf {
    let out = cp
        .cli()
        .args(["token", "create", "--workload", workload])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let token = String::from_utf8(out.stdout).unwrap();
    assert!(token.starts_with("ort1."), "{token}");
    let path = dir.join(format!("{}.token", workload.replace('/', "-")));
    std::fs::write(&path, token).unwrap();
    path
}

fn sidecar(cp: &ControlPlane, workload: &str, token: &Path) -> ProxyBuilder {
    ProxyBuilder::with_control_plane(&cp.grpc_url(), workload)
        .arg("--token-file")
        .arg(token.to_str().unwrap())
        .arg("--proxy-id")
        .arg(workload.replace('/', "-"))
}

/// Polls until `check` holds (bounded).
async fn eventually<F, Fut>(what: &str, check: F)
where
    F: Fn() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + Duration::from_secs(20);
    while !check().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn headers(addr: SocketAddr) -> (u16, Value) {
    match clients::http1_get(addr, "/headers").await {
        Ok((status, body)) => (status, serde_json::from_slice(&body).unwrap_or(Value::Null)),
        Err(_) => (0, Value::Null),
    }
}

struct Mesh {
    _dir: tempfile::TempDir,
    cp: ControlPlane,
    _app: HttpUpstream,
    api: Proxy,
    web: Proxy,
    outbound: SocketAddr,
}

async fn start(cp_flags: &[&str]) -> Mesh {
    let dir = tempfile::tempdir().unwrap();
    let cp = ControlPlane::start_with(&dir.path().join("cp"), cp_flags).await;
    let app = HttpUpstream::start("app").await;
    cp.apply(&mesh(app.addr.port())).await;
    let api = sidecar(&cp, "shop/api", &token_file(&cp, "shop/api", dir.path()))
        .start()
        .await;
    let web = sidecar(&cp, "shop/web", &token_file(&cp, "shop/web", dir.path()))
        .start()
        .await;
    let outbound = web.current_listener("outbound/shop/api").await.unwrap();
    eventually("web to reach api over mTLS", || async {
        headers(outbound).await.0 == 200
    })
    .await;
    Mesh {
        _dir: dir,
        cp,
        _app: app,
        api,
        web,
        outbound,
    }
}

#[tokio::test]
async fn sidecars_get_certificates_with_their_tokens_and_talk_mtls() {
    let m = start(&[]).await;
    let (status, body) = headers(m.outbound).await;
    assert_eq!(status, 200);
    assert_eq!(
        body["headers"]["x-outrigger-client-id"],
        serde_json::json!([WEB_ID]),
        "{body}"
    );
    for (proxy, id) in [(&m.web, WEB_ID), (&m.api, API_ID)] {
        let config = proxy.config().await;
        assert_eq!(config["identity"]["spiffeId"], id, "{config}");
        // The default lifetime: 24 h.
        let life = config["identity"]["notAfter"].as_u64().unwrap()
            - config["identity"]["notBefore"].as_u64().unwrap();
        assert!((86_000..=86_460).contains(&life), "{life}");
    }
    let (_, metrics) = m.cp.admin_get("/metrics").await;
    assert!(metric_sum(&metrics, "outrigger_cp_certificates_issued_total", &[]) >= 2.0);
    // The key never left the sidecars, and the tokens are not in the log.
    let logs = m.cp.logs();
    assert!(!logs.contains("PRIVATE KEY"));
    assert!(!logs.contains("ort1."), "a token was logged");
}

#[tokio::test]
async fn bad_revoked_and_foreign_tokens_get_no_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let cp = ControlPlane::start(&dir.path().join("cp")).await;
    cp.apply(&mesh(9)).await;

    // Garbage.
    let garbage = dir.path().join("garbage.token");
    std::fs::write(&garbage, "ort1.nope.shop/web.99999999999.00").unwrap();
    // Revoked.
    let revoked = token_file(&cp, "shop/web", dir.path());
    let listed = cp.cli().args(["token", "list"]).output().unwrap();
    let listed = String::from_utf8_lossy(&listed.stdout).into_owned();
    let id = listed
        .lines()
        .nth(1)
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap();
    let out = cp.cli().args(["token", "revoke", id]).output().unwrap();
    assert!(out.status.success());
    // Another workload's token.
    let foreign = token_file(&cp, "shop/api", dir.path());

    for (case, token, reason) in [
        ("garbage", &garbage, "bad_token"),
        ("revoked", &revoked, "bad_token"),
        ("another workload's", &foreign, "wrong_identity"),
    ] {
        let refusals = || async {
            let (_, metrics) = cp.admin_get("/metrics").await;
            metric_sum(
                &metrics,
                "outrigger_cp_certificates_refused_total",
                &[("reason", reason)],
            )
        };
        let before = refusals().await;
        let web = sidecar(&cp, "shop/web", token)
            .no_wait_ready()
            .start()
            .await;
        eventually(&format!("a {case} token to be refused"), || async {
            refusals().await > before
        })
        .await;
        let (status, body) = web.admin_get("/ready").await;
        assert_eq!(status, 503, "{case}: {body}");
        assert!(body.contains("no certificate"), "{case}: {body}");
        assert!(web.config().await["identity"].is_null());
    }
    assert!(cp.logs().contains("was revoked"));
}

#[tokio::test]
async fn certificates_rotate_under_load_without_a_failed_request() {
    // Four-second certificates: renewed about every two seconds.
    let m = start(&["--cert-ttl", "4s"]).await;
    let first = m.web.config().await["identity"]["serial"].clone();
    let deadline = Instant::now() + Duration::from_secs(7);
    let client = clients::http1();
    let mut sent = 0;
    while Instant::now() < deadline && sent < 20_000 {
        // A fresh connection now and then, so new handshakes use the new
        // certificates too.
        let (status, _) = if sent % 50 == 0 {
            headers(m.outbound).await
        } else {
            let rsp = client
                .request(clients::get(m.outbound, "/headers"))
                .await
                .unwrap();
            let status = rsp.status().as_u16();
            clients::read_body(rsp).await.unwrap();
            (status, Value::Null)
        };
        assert_eq!(status, 200, "request {sent} failed during rotation");
        sent += 1;
    }
    let renewed = m.web.config().await["identity"]["serial"].clone();
    assert_ne!(first, renewed, "the certificate was not renewed");
    let (_, metrics) = m.web.admin_get("/metrics").await;
    assert!(
        metric_sum(
            &metrics,
            "outrigger_identity_renewals_total",
            &[("result", "ok")]
        ) >= 3.0
    );
}

#[tokio::test]
async fn a_control_plane_outage_leaves_the_current_certificate_serving() {
    // Eight-second certificates: the first renewal is due after about four.
    let mut m = start(&["--cert-ttl", "8s"]).await;
    let before = m.web.config().await["identity"].clone();
    m.cp.kill();
    eventually("web's renewal to fail", || async {
        let (_, metrics) = m.web.admin_get("/metrics").await;
        metric_sum(
            &metrics,
            "outrigger_identity_renewals_total",
            &[("result", "failed")],
        ) >= 1.0
    })
    .await;
    // The old certificate, still valid, keeps serving new connections.
    for _ in 0..20 {
        assert_eq!(headers(m.outbound).await.0, 200);
    }
    assert_eq!(m.web.config().await["identity"], before);
    assert_eq!(m.web.admin_get("/ready").await.0, 200);
    assert!(m.web.logs().contains("cannot get a certificate"));
}
