//! Workload identity from the control plane: bootstrap tokens, CSRs over
//! gRPC, certificates the sidecars renew by themselves, and mTLS between
//! sidecars with them. Real processes on loopback.

#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use outrigger_e2e::clients;
use outrigger_e2e::control_plane::ControlPlane;
use outrigger_e2e::eventually;
use outrigger_e2e::proxy::metric_sum;
use outrigger_e2e::upstream::HttpUpstream;
use outrigger_e2e::{Proxy, ProxyBuilder};
use serde_json::Value;

const WEB_ID: &str = "spiffe://cluster.local/ns/shop/sa/web";
const API_ID: &str = "spiffe://cluster.local/ns/shop/sa/api";

fn mesh(app_port: u16) -> String {
    outrigger_e2e::mesh::registered_api(app_port)
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

async fn headers(addr: SocketAddr) -> (u16, Value) {
    match clients::http1_get(addr, "/headers").await {
        Ok((status, body)) => (status, serde_json::from_slice(&body).unwrap_or(Value::Null)),
        Err(_) => (0, Value::Null),
    }
}

struct Mesh {
    _dir: tempfile::TempDir,
    cp: ControlPlane,
    app: HttpUpstream,
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
        app,
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

/// A CSR for `id` (the key is thrown away: these requests are refused).
fn csr_for(id: &str) -> String {
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    params.subject_alt_names = vec![rcgen::SanType::URI(id.try_into().unwrap())];
    params.serialize_request(&key).unwrap().pem().unwrap()
}

#[tokio::test]
async fn bad_revoked_and_foreign_tokens_get_no_certificate() {
    use outrigger_config::proto::identity::CertifyRequest;
    use outrigger_config::proto::identity::identity_client::IdentityClient;

    let dir = tempfile::tempdir().unwrap();
    let cp = ControlPlane::start(&dir.path().join("cp")).await;
    cp.apply(&mesh(9)).await;
    let read = |path: &Path| std::fs::read_to_string(path).unwrap();

    let good = read(&token_file(&cp, "shop/web", dir.path()));
    let revoked = read(&token_file(&cp, "shop/web", dir.path()));
    let listed = cp.cli().args(["token", "list"]).output().unwrap();
    let listed = String::from_utf8_lossy(&listed.stdout).into_owned();
    let revoked_id = revoked.split('.').nth(1).unwrap();
    assert!(listed.contains(revoked_id), "{listed}");
    let out = cp
        .cli()
        .args(["token", "revoke", revoked_id])
        .output()
        .unwrap();
    assert!(out.status.success());
    let listed = cp.cli().args(["token", "list"]).output().unwrap();
    assert!(String::from_utf8_lossy(&listed.stdout).contains("revoked"));
    let foreign = read(&token_file(&cp, "shop/api", dir.path()));

    // The Certify RPC, as a sidecar (or an attacker) calls it.
    let mut client = IdentityClient::connect(cp.grpc_url()).await.unwrap();
    let mut certify = async |token: &str, id: &str| {
        client
            .certify(CertifyRequest {
                token: token.to_string(),
                csr_pem: csr_for(id),
            })
            .await
    };
    for (case, token, id, code) in [
        (
            "garbage",
            "ort1.nope.shop/web.99999999999.00",
            WEB_ID,
            tonic::Code::Unauthenticated,
        ),
        (
            "revoked",
            revoked.as_str(),
            WEB_ID,
            tonic::Code::Unauthenticated,
        ),
        (
            "another workload's",
            foreign.as_str(),
            WEB_ID,
            tonic::Code::PermissionDenied,
        ),
        (
            "a CSR for someone else",
            good.as_str(),
            API_ID,
            tonic::Code::PermissionDenied,
        ),
    ] {
        let status = certify(token, id).await.unwrap_err();
        assert_eq!(status.code(), code, "{case}: {status:?}");
    }
    let issued = certify(&good, WEB_ID).await.unwrap().into_inner();
    assert!(issued.certificate_chain_pem.contains("BEGIN CERTIFICATE"));
    let (_, metrics) = cp.admin_get("/metrics").await;
    for reason in ["bad_token", "wrong_identity"] {
        let refused = metric_sum(
            &metrics,
            "outrigger_cp_certificates_refused_total",
            &[("reason", reason)],
        );
        assert!(refused >= 1.0, "{reason}");
    }
    assert!(cp.logs().contains("was revoked"));

    // A sidecar with a bad token gets neither policy nor certificate.
    let garbage = dir.path().join("garbage.token");
    std::fs::write(&garbage, "ort1.nope.shop/web.99999999999.00").unwrap();
    let web = sidecar(&cp, "shop/web", &garbage)
        .no_wait_ready()
        .start()
        .await;
    web.wait_for_log("the control plane refused the policy stream")
        .await;
    let (status, _) = web.admin_get("/ready").await;
    assert_eq!(status, 503);
    assert!(web.config().await["identity"].is_null());
}

#[tokio::test]
async fn a_control_plane_that_requires_tokens_serves_only_sidecars_with_their_own() {
    let m = start(&["--require-tokens"]).await;
    for p in m.cp.proxies().await {
        assert_eq!(p["authenticated"], true, "{p}");
    }
    let dir = tempfile::tempdir().unwrap();
    // No token: refused. Another workload's token: refused.
    let anonymous = ProxyBuilder::with_control_plane(&m.cp.grpc_url(), "shop/web")
        .arg("--proxy-id")
        .arg("anonymous")
        .no_wait_ready()
        .start()
        .await;
    let foreign = token_file(&m.cp, "shop/api", dir.path());
    let impostor = ProxyBuilder::with_control_plane(&m.cp.grpc_url(), "shop/web")
        .arg("--proxy-id")
        .arg("impostor")
        .arg("--token-file")
        .arg(foreign.to_str().unwrap())
        .no_wait_ready()
        .start()
        .await;
    anonymous.wait_for_log("requires a bootstrap token").await;
    impostor
        .wait_for_log("the token is for workload shop/api, not shop/web")
        .await;
    for refused in [&anonymous, &impostor] {
        assert_eq!(refused.admin_get("/ready").await.0, 503);
    }
    let (_, metrics) = m.cp.admin_get("/metrics").await;
    for reason in ["no_token", "wrong_workload"] {
        let refused = metric_sum(
            &metrics,
            "outrigger_cp_policy_streams_refused_total",
            &[("reason", reason)],
        );
        assert!(refused >= 1.0, "{reason}");
    }
    let ids: Vec<String> =
        m.cp.proxies()
            .await
            .iter()
            .map(|p| p["proxyId"].as_str().unwrap_or("").to_string())
            .collect();
    assert_eq!(ids.len(), 2, "{ids:?}");
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

#[tokio::test]
async fn expired_certificates_end_readiness_and_their_connections() {
    // Four-second certificates, and no control plane to renew them.
    let mut m = start(&["--cert-ttl", "4s"]).await;
    m.cp.kill();
    eventually("web to notice its certificate expired", || async {
        m.web.admin_get("/ready").await.0 == 503
    })
    .await;
    let (_, body) = m.web.admin_get("/ready").await;
    assert!(body.contains("no certificate"), "{body}");
    // The connection verified with the expired certificates was closed:
    // a request now needs a new handshake, which the peer refuses.
    eventually("requests to stop riding the expired connection", || async {
        headers(m.outbound).await.0 == 502
    })
    .await;
}

#[tokio::test]
async fn authz_check_agrees_with_the_data_path() {
    let m = start(&[]).await;
    let deny = format!(
        "{}---\napiVersion: outrigger.io/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {{name: no-admin, namespace: shop}}\n\
         spec: {{workload: api, action: DENY, rules: [{{to: {{paths: ['/admin/*']}}}}, {{to: {{methods: [DELETE]}}}}]}}\n",
        mesh(m.app.addr.port())
    );
    m.cp.apply(&deny).await;
    m.cp.wait_synced(2).await;
    for (method, path, allowed) in [
        ("GET", "/headers", true),
        ("POST", "/headers", true),
        ("GET", "/admin/users", false),
        ("DELETE", "/headers", false),
    ] {
        let out =
            m.cp.cli()
                .args(["authz", "check", "--workload", "shop/api", "--from", WEB_ID])
                .args(["--method", method, "--path", path])
                .output()
                .unwrap();
        let said = String::from_utf8_lossy(&out.stdout).into_owned();
        assert_eq!(out.status.success(), allowed, "{method} {path}: {said}");
        let request = http::Request::builder()
            .method(method)
            .uri(format!("http://{}{path}", m.outbound))
            .body(clients::empty())
            .unwrap();
        let rsp = clients::http1().request(request).await.unwrap();
        let status = rsp.status().as_u16();
        clients::read_body(rsp).await.unwrap();
        assert_eq!(
            status != 403,
            allowed,
            "{method} {path}: data path said {status}, check said {said}"
        );
        if !allowed {
            assert!(
                said.starts_with("DENY: denied by AuthorizationPolicy shop/no-admin"),
                "{said}"
            );
        }
    }
}

#[tokio::test]
async fn a_policy_change_applies_to_the_next_request_not_the_one_in_flight() {
    let m = start(&[]).await;
    let outbound = m.outbound;
    let seen = m.app.requests() + 1;
    let in_flight = tokio::spawn(async move {
        clients::http1_get(outbound, "/slow?ms=1000")
            .await
            .unwrap()
            .0
    });
    m.app.wait_for_requests(seen).await;
    let deny = format!(
        "{}---\napiVersion: outrigger.io/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {{name: no-slow, namespace: shop}}\n\
         spec: {{workload: api, action: DENY, rules: [{{to: {{paths: ['/slow']}}}}]}}\n",
        mesh(m.app.addr.port())
    );
    m.cp.apply(&deny).await;
    m.cp.wait_synced(2).await;
    let (status, _) = clients::http1_get(outbound, "/slow?ms=1").await.unwrap();
    assert_eq!(status, 403, "the next request is decided by the new policy");
    assert_eq!(in_flight.await.unwrap(), 200, "the one in flight finished");
    assert_eq!(
        m.app.requests(),
        seen,
        "the denied one never reached the app"
    );
}
