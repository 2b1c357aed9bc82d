//! `outrigger inject` / `uninject` as a user runs them: a file or stdin in,
//! YAML on stdout, what changed on stderr, clear errors.

use std::io::Write;
use std::process::{Command, Stdio};

use outrigger_e2e::proxy::bin_path;

const MANIFEST: &str = "apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop}
spec:
  ports: [{port: 80, targetPort: 8080}]
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: web, namespace: shop}
spec:
  selector: {matchLabels: {app: web}}
  template:
    metadata: {labels: {app: web}}
    spec:
      containers:
        - {name: web, image: 'web:1', ports: [{containerPort: 8080}]}
";

fn outrigger(args: &[&str], stdin: &str) -> (bool, String, String) {
    let mut child = Command::new(bin_path("outrigger"))
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run outrigger");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(stdin.as_bytes())
        .expect("write stdin");
    let out = child.wait_with_output().expect("wait");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn inject_and_uninject_round_trip_through_files_and_stdin() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("app.yaml");
    std::fs::write(&file, MANIFEST).expect("write");
    let path = file.to_str().expect("path");

    let (ok, injected, stderr) = outrigger(&["inject", "-f", path], "");
    assert!(ok, "{stderr}");
    assert!(stderr.contains("Deployment web: changed"), "{stderr}");
    assert!(
        injected.starts_with(MANIFEST.split("---").next().unwrap_or("")),
        "the Service is as written"
    );
    assert!(injected.contains("name: outrigger-proxy"), "{injected}");
    assert!(injected.contains("path: /ready"), "{injected}");

    // Again, through stdin: nothing changes.
    let (ok, twice, stderr) = outrigger(&["inject", "-f", "-"], &injected);
    assert!(ok, "{stderr}");
    assert_eq!(twice, injected);
    assert!(
        stderr.contains("Deployment web: already injected: left as is"),
        "{stderr}"
    );

    let (ok, removed, stderr) = outrigger(&["uninject", "-f", "-"], &injected);
    assert!(ok, "{stderr}");
    assert!(!removed.contains("outrigger"), "{removed}");
}

#[test]
fn bad_input_is_an_error_naming_the_document() {
    let (ok, stdout, stderr) = outrigger(
        &["inject", "-f", "-"],
        &format!("{MANIFEST}---\nkind: Pod\nmetadata: {{name: [oops\n"),
    );
    assert!(!ok);
    assert!(stdout.is_empty(), "nothing half written: {stdout}");
    assert!(
        stderr.starts_with("error: stdin: document 3: invalid YAML"),
        "{stderr}"
    );

    let (ok, _, stderr) = outrigger(&["inject", "-f", "/nonexistent/app.yaml"], "");
    assert!(!ok);
    assert!(
        stderr.contains("cannot read /nonexistent/app.yaml"),
        "{stderr}"
    );
}

/// POSTs `body` to the webhook over TLS (HTTP/1.1); the raw answer.
async fn post(addr: std::net::SocketAddr, path: &str, body: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let config = outrigger_e2e::certs::outsider_client(None, &[b"http/1.1"]);
    let name =
        rustls::pki_types::ServerName::try_from("outrigger.outrigger-system.svc").expect("name");
    let mut tls = tokio_rustls::TlsConnector::from(config)
        .connect(name.to_owned(), tcp)
        .await
        .expect("TLS handshake");
    let request = format!(
        "POST {path} HTTP/1.1\r\nHost: outrigger\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    tls.write_all(request.as_bytes()).await.expect("write");
    let mut out = Vec::new();
    tokio::time::timeout(
        std::time::Duration::from_secs(10),
        tls.read_to_end(&mut out),
    )
    .await
    .expect("answered in time")
    .expect("read");
    String::from_utf8_lossy(&out).into_owned()
}

#[tokio::test]
async fn the_control_plane_serves_the_webhook_over_https() {
    let data = tempfile::tempdir().expect("tempdir");
    let ca = outrigger_e2e::certs::TestCa::new("webhook root");
    let files = ca.write(
        data.path(),
        "webhook",
        outrigger_e2e::certs::Leaf::NoSpiffeId,
    );
    let (cert, key) = (
        files.cert.to_str().expect("path"),
        files.key.to_str().expect("path"),
    );
    let cp = outrigger_e2e::control_plane::ControlPlane::start_with(
        &data.path().join("cp"),
        &[
            "--webhook-addr",
            "127.0.0.1:0",
            "--webhook-cert",
            cert,
            "--webhook-key",
            key,
        ],
    )
    .await;
    let webhook = cp.webhook.expect("the webhook's address on the start line");
    let review = serde_json::json!({
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": "0b1c",
            "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "operation": "CREATE",
            "namespace": "shop",
            "object": {
                "metadata": {"generateName": "web-7d4-", "labels": {"app": "web"}},
                "spec": {"containers": [{"name": "web", "image": "web:1"}]}
            }
        }
    });
    let answer = post(webhook, "/mutate", &review.to_string()).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    let body = answer.split("\r\n\r\n").nth(1).expect("body");
    let review: serde_json::Value = serde_json::from_str(body).expect("JSON");
    assert_eq!(review["response"]["uid"], "0b1c");
    assert_eq!(review["response"]["allowed"], true);
    assert_eq!(review["response"]["patchType"], "JSONPatch");

    let wrong = post(webhook, "/other", "{}").await;
    assert!(wrong.starts_with("HTTP/1.1 404"), "{wrong}");
}
