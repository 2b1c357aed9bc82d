//! Mutual TLS between sidecars, standalone (certificates from files): real
//! processes on loopback, certificates made fresh by each test.
//!
//! ```text
//! client → [web: outbound/shop/api] ==mTLS==> [api: inbound/main] → app
//! ```

#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;

use outrigger_e2e::ProxyBuilder;
use outrigger_e2e::certs::{self, IdentityFiles, Leaf, TestCa};
use outrigger_e2e::clients;
use outrigger_e2e::proxy::{Proxy, metric_sum};
use outrigger_e2e::upstream::{HttpUpstream, TcpEcho};
use serde_json::Value;

const WEB_ID: &str = "spiffe://cluster.local/ns/shop/sa/web";
const API_ID: &str = "spiffe://cluster.local/ns/shop/sa/api";

/// The api side: workload shop/api (service account `sa`) serving `app`.
fn api_config(app_port: u16, protocol: &str, sa: &str) -> String {
    format!(
        "apiVersion: outrigger.io/v1alpha1\nkind: Workload\nmetadata: {{name: api, namespace: shop}}\n\
         spec:\n  serviceAccount: {sa}\n  inbound: [{{name: main, port: 0, appPort: {app_port}, protocol: {protocol}}}]\n\
         ---\napiVersion: outrigger.io/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {{name: api-callers, namespace: shop}}\n\
         spec: {{workload: api, action: ALLOW, rules: [{{from: {{principals: ['{WEB_ID}']}}}}]}}\n"
    )
}

/// The web side: workload shop/web calling service shop/api at `api`,
/// whose servers must be `identity`.
fn web_config(api: SocketAddr, protocol: &str, identity: &str) -> String {
    format!(
        "apiVersion: outrigger.io/v1alpha1\nkind: Workload\nmetadata: {{name: web, namespace: shop}}\n\
         spec:\n  inbound: [{{name: main, port: 0, appPort: 9}}]\n  outbound: [{{port: 0, service: api}}]\n---\n\
         apiVersion: outrigger.io/v1alpha1\nkind: Service\nmetadata: {{name: api, namespace: shop}}\n\
         spec:\n  protocol: {protocol}\n  identity: {identity}\n  endpoints: [{{address: '{api}'}}]\n"
    )
}

async fn api_sidecar(app_port: u16, protocol: &str, sa: &str, files: &IdentityFiles) -> Proxy {
    ProxyBuilder::new(api_config(app_port, protocol, sa), "shop/api")
        .tls(files)
        .start()
        .await
}

async fn web_sidecar(api: &Proxy, protocol: &str, identity: &str, files: &IdentityFiles) -> Proxy {
    ProxyBuilder::new(
        web_config(api.listener("inbound/main"), protocol, identity),
        "shop/web",
    )
    .tls(files)
    .start()
    .await
}

/// Both sidecars with certificates from one CA: api's for `api_sa`, and
/// web expecting `API_ID` from it.
struct Mesh {
    _dir: tempfile::TempDir,
    api: Proxy,
    web: Proxy,
    /// Signed both sidecars' certificates.
    ca: TestCa,
}

async fn mesh(app_port: u16, protocol: &str, api_sa: &str) -> Mesh {
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new("mesh root");
    let api_id = format!("spiffe://cluster.local/ns/shop/sa/{api_sa}");
    let api = api_sidecar(
        app_port,
        protocol,
        api_sa,
        &ca.write(dir.path(), "api", Leaf::Spiffe(&api_id)),
    )
    .await;
    let web = web_sidecar(
        &api,
        protocol,
        API_ID,
        &ca.write(dir.path(), "web", Leaf::Spiffe(WEB_ID)),
    )
    .await;
    Mesh {
        _dir: dir,
        api,
        web,
        ca,
    }
}

async fn metric(proxy: &Proxy, name: &str, labels: &[(&str, &str)]) -> f64 {
    let (_, body) = proxy.admin_get("/metrics").await;
    metric_sum(&body, name, labels)
}

#[tokio::test]
async fn requests_between_sidecars_ride_mtls_and_the_app_sees_the_caller() {
    let app = HttpUpstream::start("app").await;
    let Mesh { _dir, api, web, .. } = mesh(app.addr.port(), "http", "api").await;
    let outbound = web.listener("outbound/shop/api");

    // HTTP/1.1 from the app; a forged caller header does not survive.
    let request = http::Request::get(format!("http://{outbound}/headers"))
        .header("x-outrigger-client-id", "spiffe://evil/ns/x/sa/y")
        .body(clients::empty())
        .unwrap();
    let rsp = clients::http1().request(request).await.unwrap();
    assert_eq!(rsp.status(), 200);
    let body: Value = serde_json::from_slice(&clients::read_body(rsp).await.unwrap()).unwrap();
    assert_eq!(
        body["headers"]["x-outrigger-client-id"],
        serde_json::json!([WEB_ID]),
        "{body}"
    );

    // HTTP/2 (gRPC's transport) negotiates h2 by ALPN between the sidecars.
    let rsp = clients::http2()
        .request(clients::get(outbound, "/headers"))
        .await
        .unwrap();
    assert_eq!(rsp.status(), 200);
    let body: Value = serde_json::from_slice(&clients::read_body(rsp).await.unwrap()).unwrap();
    assert_eq!(body["version"], "HTTP/2.0", "{body}");
    assert_eq!(
        body["headers"]["x-outrigger-client-id"],
        serde_json::json!([WEB_ID]),
        "{body}"
    );

    // Both sides count the handshakes; /config says who each one is.
    let ok = [("result", "ok")];
    assert!(metric(&web, "outrigger_tls_handshakes_total", &ok).await >= 1.0);
    assert!(metric(&api, "outrigger_tls_handshakes_total", &ok).await >= 1.0);
    let config = web.config().await;
    assert_eq!(config["mtls"], true);
    assert_eq!(config["identity"]["spiffeId"], WEB_ID, "{config}");
    assert!(config["identity"]["notAfter"].as_u64().unwrap() > 0);
    assert!(!config.to_string().contains("PRIVATE KEY"));
    let (_, metrics) = web.admin_get("/metrics").await;
    assert!(
        metric_sum(
            &metrics,
            "outrigger_identity_cert_expiry_timestamp_seconds",
            &[]
        ) > 0.0
    );
}

#[tokio::test]
async fn the_inbound_side_refuses_bad_clients_at_the_handshake() {
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new("mesh root");
    let other_ca = TestCa::new("someone else's root");
    let app = HttpUpstream::start("app").await;
    let api = api_sidecar(
        app.addr.port(),
        "http",
        "api",
        &ca.write(dir.path(), "api", Leaf::Spiffe(API_ID)),
    )
    .await;
    let inbound = api.listener("inbound/main");

    let (good_cert, good_key) = ca.issue(Leaf::Spiffe(WEB_ID));
    let (expired_cert, expired_key) = ca.issue(Leaf::Expired(WEB_ID));
    let (no_id_cert, no_id_key) = ca.issue(Leaf::NoSpiffeId);
    let (self_cert, self_key) = certs::self_signed(Leaf::Spiffe(WEB_ID));
    let (other_cert, other_key) = other_ca.issue(Leaf::Spiffe(WEB_ID));
    let (foreign_cert, foreign_key) =
        ca.issue(Leaf::Spiffe("spiffe://other.example/ns/shop/sa/web"));
    let alpn: &[&[u8]] = &[b"http/1.1"];
    for (case, identity, reason) in [
        ("no client certificate", None, "no_certificate"),
        (
            "a self-signed certificate",
            Some((self_cert.as_str(), self_key.as_str())),
            "unknown_ca",
        ),
        (
            "a certificate from another CA",
            Some((other_cert.as_str(), other_key.as_str())),
            "unknown_ca",
        ),
        (
            "an expired certificate",
            Some((expired_cert.as_str(), expired_key.as_str())),
            "expired",
        ),
        (
            "a certificate without a SPIFFE ID",
            Some((no_id_cert.as_str(), no_id_key.as_str())),
            "no_spiffe_id",
        ),
        (
            "our CA's certificate for another trust domain",
            Some((foreign_cert.as_str(), foreign_key.as_str())),
            "foreign_trust_domain",
        ),
    ] {
        let answer = certs::tls_get(inbound, certs::outsider_client(identity, alpn), "/").await;
        assert!(answer.is_err(), "{case}: {answer:?}");
        let refused = metric(
            &api,
            "outrigger_tls_handshakes_total",
            &[("result", "failed"), ("reason", reason)],
        )
        .await;
        assert!(refused >= 1.0, "{case}: no {reason} failure counted");
    }

    // Plaintext HTTP to the mTLS port gets nothing from the app.
    let plain = clients::http1_get(inbound, "/").await;
    assert!(plain.is_err(), "{plain:?}");
    assert_eq!(app.requests(), 0, "a refused caller reached the app");

    // The proxy stays healthy, and a good client gets through.
    assert_eq!(api.admin_get("/ready").await.0, 200);
    let answer = certs::tls_get(
        inbound,
        certs::outsider_client(Some((&good_cert, &good_key)), alpn),
        "/headers",
    )
    .await
    .unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.contains(WEB_ID), "{answer}");
}

#[tokio::test]
async fn the_outbound_side_refuses_a_server_with_the_wrong_identity() {
    let app = HttpUpstream::start("app").await;
    // A server that is in the mesh, but is not who the Service says.
    let impostor_id = "spiffe://cluster.local/ns/shop/sa/impostor";
    let Mesh {
        _dir,
        api: _api,
        web,
        ..
    } = mesh(app.addr.port(), "http", "impostor").await;

    let (status, body) = clients::http1_get(web.listener("outbound/shop/api"), "/")
        .await
        .unwrap();
    assert_eq!(status, 502);
    let body = String::from_utf8_lossy(&body);
    assert!(
        body.contains(&format!(
            "the server presented identity {impostor_id}, expected {API_ID}"
        )),
        "{body}"
    );
    assert_eq!(app.requests(), 0);
    let refused = metric(
        &web,
        "outrigger_tls_handshakes_total",
        &[("direction", "outbound"), ("reason", "wrong_identity")],
    )
    .await;
    assert!(refused >= 1.0);
    assert!(
        web.logs().contains(impostor_id),
        "the log names both identities"
    );
}

#[tokio::test]
async fn opaque_tcp_rides_mtls_too() {
    let echo = TcpEcho::start().await;
    let Mesh {
        _dir, api, web, ca, ..
    } = mesh(echo.addr.port(), "tcp", "api").await;

    // A caller the policy does not name: the connection is closed at once,
    // nothing reaches the echo server.
    let (cert, key) = ca.issue(Leaf::Spiffe("spiffe://cluster.local/ns/shop/sa/other"));
    let refused = certs::tls_get(
        api.listener("inbound/main"),
        certs::outsider_client(Some((&cert, &key)), &[]),
        "/",
    )
    .await;
    assert!(refused.is_err(), "{refused:?}");

    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut conn = tokio::net::TcpStream::connect(web.listener("outbound/shop/api"))
        .await
        .unwrap();
    conn.write_all(b"over mTLS").await.unwrap();
    conn.shutdown().await.unwrap();
    let mut back = Vec::new();
    tokio::time::timeout(
        std::time::Duration::from_secs(10),
        conn.read_to_end(&mut back),
    )
    .await
    .unwrap()
    .unwrap();
    // The echo server answers "bye" after our EOF: half-close crossed both sidecars.
    assert_eq!(back, b"over mTLSbye");
    assert!(
        metric(
            &api,
            "outrigger_tls_handshakes_total",
            &[("direction", "inbound"), ("result", "ok")]
        )
        .await
            >= 1.0
    );
}

#[tokio::test]
async fn a_certificate_for_another_workload_is_refused_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new("mesh root");
    let files = ca.write(dir.path(), "web", Leaf::Spiffe(WEB_ID));
    let (status, stderr) = ProxyBuilder::new(api_config(8080, "http", "api"), "shop/api")
        .tls(&files)
        .run_expecting_failure();
    assert!(!status.success());
    assert!(
        stderr.contains(WEB_ID) && stderr.contains(API_ID),
        "{stderr}"
    );
}

#[tokio::test]
async fn http11_requests_share_one_multiplexed_connection_between_sidecars() {
    let app = HttpUpstream::start("app").await;
    let Mesh { _dir, api, web, .. } = mesh(app.addr.port(), "http", "api").await;
    let outbound = web.listener("outbound/shop/api");

    // Twenty HTTP/1.1 requests at once, each on its own app connection,
    // each held open by the app for a moment.
    let calls = (0..20).map(|_| async move {
        let request = http::Request::get(format!("http://{outbound}/slow?ms=300"))
            .header("host", "api.shop")
            .body(clients::empty())
            .unwrap();
        let rsp = clients::http1().request(request).await.unwrap();
        let version = rsp.version();
        (
            rsp.status(),
            version,
            clients::read_body(rsp).await.unwrap(),
        )
    });
    for (status, version, _) in futures_util::future::join_all(calls).await {
        assert_eq!(status, 200);
        assert_eq!(version, http::Version::HTTP_11);
    }
    // One mTLS connection between the sidecars carried them all.
    let accepted = metric(
        &api,
        "outrigger_tls_handshakes_total",
        &[("direction", "inbound"), ("result", "ok")],
    )
    .await;
    assert_eq!(
        accepted, 1.0,
        "one multiplexed connection, not one per request"
    );

    // The app still sees HTTP/1.1, with the Host the client sent and no
    // trace of the trip.
    let request = http::Request::get(format!("http://{outbound}/headers"))
        .header("host", "api.shop")
        .header("x-outrigger-orig-proto", "forged")
        .body(clients::empty())
        .unwrap();
    let rsp = clients::http1().request(request).await.unwrap();
    let body: Value = serde_json::from_slice(&clients::read_body(rsp).await.unwrap()).unwrap();
    assert_eq!(body["version"], "HTTP/1.1", "{body}");
    assert_eq!(
        body["headers"]["host"],
        serde_json::json!(["api.shop"]),
        "{body}"
    );
    assert!(
        body["headers"]["x-outrigger-orig-proto"].is_null(),
        "{body}"
    );
}

#[tokio::test]
async fn websocket_style_upgrades_cross_both_sidecars() {
    let app = outrigger_e2e::upstream::UpgradeEcho::start().await;
    let Mesh {
        _dir,
        api: _api,
        web,
        ..
    } = mesh(app.addr.port(), "http", "api").await;
    let (head, echoed) = outrigger_e2e::upstream::upgrade_roundtrip(
        web.listener("outbound/shop/api"),
        "websocket",
        b"hello over an upgraded mTLS hop",
    )
    .await;
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    assert!(
        head.to_ascii_lowercase().contains("upgrade: websocket"),
        "{head}"
    );
    assert_eq!(echoed, b"hello over an upgraded mTLS hop");
}

#[tokio::test]
async fn a_bundle_change_closes_connections_verified_with_the_old_one() {
    let app = HttpUpstream::start("app").await;
    let Mesh { _dir, api, web, .. } = mesh(app.addr.port(), "http", "api").await;
    let outbound = web.listener("outbound/shop/api");
    let client = clients::http1();
    let get = || async {
        let rsp = client
            .request(clients::get(outbound, "/headers"))
            .await
            .unwrap();
        let status = rsp.status().as_u16();
        clients::read_body(rsp).await.unwrap();
        status
    };
    assert_eq!(get().await, 200);

    // api moves to a new CA that web does not trust. Its pooled connection
    // from web was verified against the old bundle: api closes it, and
    // web's next handshake fails instead of riding the old connection.
    let dir = tempfile::tempdir().unwrap();
    let new_ca = TestCa::new("another root");
    let files = new_ca.write(dir.path(), "api", Leaf::Spiffe(API_ID));
    // The files api was started with (see `mesh`).
    for (from, to) in [
        (&files.cert, "api.crt"),
        (&files.key, "api.key"),
        (&files.bundle, "api-bundle.pem"),
    ] {
        std::fs::copy(from, _dir.path().join(to)).unwrap();
    }
    api.signal("HUP");
    api.wait_for_log("certificate and trust bundle re-read")
        .await;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let status = get().await;
        if status == 502 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the old connection kept serving"
        );
    }
}

#[tokio::test]
async fn only_callers_a_policy_allows_get_in_and_deny_wins_hot() {
    let app = HttpUpstream::start("app").await;
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new("mesh root");
    let api = api_sidecar(
        app.addr.port(),
        "http",
        "api",
        &ca.write(dir.path(), "api", Leaf::Spiffe(API_ID)),
    )
    .await;
    let web = web_sidecar(
        &api,
        "http",
        API_ID,
        &ca.write(dir.path(), "web", Leaf::Spiffe(WEB_ID)),
    )
    .await;
    let outbound = web.listener("outbound/shop/api");
    let inbound = api.listener("inbound/main");

    // web is allowed.
    assert_eq!(
        clients::http1_get(outbound, "/headers").await.unwrap().0,
        200
    );
    let seen = app.requests();

    // Another workload of the same mesh, verified by mTLS, is not.
    let (cert, key) = ca.issue(Leaf::Spiffe("spiffe://cluster.local/ns/shop/sa/other"));
    let answer = certs::tls_get(
        inbound,
        certs::outsider_client(Some((&cert, &key)), &[b"http/1.1"]),
        "/headers",
    )
    .await
    .unwrap();
    assert!(answer.starts_with("HTTP/1.1 403"), "{answer}");
    assert!(
        answer.contains("not authorized for GET /headers"),
        "{answer}"
    );
    assert!(
        !answer.contains("api-callers"),
        "no policy detail leaks: {answer}"
    );
    assert_eq!(app.requests(), seen, "the app never saw the denied request");
    let denied = metric(
        &api,
        "outrigger_authz_denied_total",
        &[("identity", "spiffe://cluster.local/ns/shop/sa/other")],
    )
    .await;
    assert_eq!(denied, 1.0);

    // A DENY rule, applied hot (SIGHUP), beats the ALLOW on the next request.
    let deny = format!(
        "{}---\napiVersion: outrigger.io/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {{name: no-admin, namespace: shop}}\n\
         spec: {{workload: api, action: DENY, rules: [{{from: {{principals: ['{WEB_ID}']}}, to: {{paths: ['/admin/*']}}}}]}}\n",
        api_config(app.addr.port(), "http", "api")
    );
    let version = api.config_version().await;
    api.reload(&deny);
    api.wait_version_change(&version).await;
    let (status, body) = clients::http1_get(outbound, "/admin/users").await.unwrap();
    assert_eq!(status, 403, "{}", String::from_utf8_lossy(&body));
    assert_eq!(
        clients::http1_get(outbound, "/headers").await.unwrap().0,
        200
    );
}
