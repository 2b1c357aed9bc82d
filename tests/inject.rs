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
