//! The proxy binary's command line: bad configuration and bad flags fail
//! fast with a message that says what and where; env vars work like flags.

use outrigger_e2e::upstream::HttpUpstream;
use outrigger_e2e::{ProxyBuilder, mesh};

#[test]
fn invalid_config_fails_with_the_document_and_field() {
    let yaml = r#"apiVersion: outrigger.io/v1alpha1
kind: Workload
metadata: {name: web}
spec:
  inbound: [{port: 4143, appPort: 8080}]
---
apiVersion: outrigger.io/v1alpha1
kind: Service
metadata: {name: api}
spec:
  endpoints:
    - address: not-an-address
"#;
    let (status, stderr) = ProxyBuilder::new(yaml, "web").run_expecting_failure();
    assert!(!status.success());
    assert!(stderr.contains("mesh.yaml"), "{stderr}");
    assert!(stderr.contains("document 2"), "{stderr}");
    assert!(stderr.contains("spec.endpoints[0].address"), "{stderr}");
}

#[test]
fn unknown_workload_lists_the_known_ones() {
    let (status, stderr) =
        ProxyBuilder::new(mesh::server_config(8080, "http"), "nope").run_expecting_failure();
    assert!(!status.success());
    assert!(
        stderr.contains("nope") && stderr.contains("shop/api"),
        "{stderr}"
    );
}

#[test]
fn bad_flag_values_are_refused() {
    let (status, stderr) = ProxyBuilder::new(mesh::server_config(8080, "http"), "shop/api")
        .arg("--drain-deadline")
        .arg("ten seconds")
        .run_expecting_failure();
    assert!(!status.success());
    assert!(stderr.contains("--drain-deadline"), "{stderr}");

    // Control-plane mode: the address and the workload name are checked
    // up front, not retried forever.
    for (flags, expected) in [
        (
            [
                "--control-plane",
                "localhost:15010",
                "--workload",
                "shop/web",
            ],
            "expected http://HOST:PORT",
        ),
        (
            [
                "--control-plane",
                "ftp://cp:15010",
                "--workload",
                "shop/web",
            ],
            "scheme \"ftp\"",
        ),
        (
            [
                "--control-plane",
                "https://cp:15010",
                "--workload",
                "shop/web",
            ],
            "https:// is not supported yet",
        ),
        (
            [
                "--control-plane",
                "http://cp:15010/x",
                "--workload",
                "shop/web",
            ],
            "without a path",
        ),
        (
            [
                "--control-plane",
                "http://cp:15010",
                "--workload",
                "Shop/web",
            ],
            "must be lowercase",
        ),
        (
            ["--control-plane", "http://cp:15010", "--workload", "a/b/c"],
            "not NAME or NAMESPACE/NAME",
        ),
    ] {
        let out = std::process::Command::new(outrigger_e2e::proxy::bin_path("outrigger-proxy"))
            .args(flags)
            .args(["--admin-addr", "127.0.0.1:0"])
            .output()
            .expect("run outrigger-proxy");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{flags:?}: {stderr}");
        assert!(stderr.contains(expected), "{flags:?}: {stderr}");
    }
}

#[tokio::test]
async fn flags_can_come_from_the_environment() {
    let app = HttpUpstream::start("api").await;
    // OUTRIGGER_MAX_HEADER_BYTES takes effect like --max-header-bytes.
    let proxy = ProxyBuilder::new(mesh::server_config(app.addr.port(), "http"), "shop/api")
        .env("OUTRIGGER_MAX_HEADER_BYTES", "4096")
        .start()
        .await;
    let inbound = proxy.listener("inbound/main");
    let raw = format!(
        "GET / HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n",
        "b".repeat(5000)
    );
    let answer = outrigger_e2e::clients::raw_exchange(
        inbound,
        raw.as_bytes(),
        std::time::Duration::from_secs(5),
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 431"), "{answer}");
}
