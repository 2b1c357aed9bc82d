//! The control plane's operator side, end to end: the real `outrigger
//! serve` process, its REST API and the `outrigger` CLI.

#![allow(clippy::unwrap_used)]

use outrigger_e2e::control_plane::ControlPlane;
use serde_json::Value;
use std::time::{Duration, Instant};

const POLICY: &str = "\
apiVersion: outrigger.io/v1alpha1
kind: Service
metadata: {name: api, namespace: shop}
spec:
  endpoints: [{address: '127.0.0.1:9001'}]
---
apiVersion: outrigger.io/v1alpha1
kind: Workload
metadata: {name: web, namespace: shop}
spec:
  inbound: [{name: http, port: 0, appPort: 8080}]
  outbound: [{port: 0, service: api}]
";

fn run(cmd: &mut std::process::Command) -> (bool, String, String) {
    let out = cmd.output().expect("run outrigger");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Runs `cmd` with `input` on its stdin.
fn run_with_stdin(cmd: &mut std::process::Command, input: &str) -> (bool, String, String) {
    use std::io::Write;
    use std::process::Stdio;
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run outrigger");
    let mut stdin = child.stdin.take().expect("stdin");
    stdin.write_all(input.as_bytes()).expect("write stdin");
    drop(stdin);
    let out = child.wait_with_output().expect("wait");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Waits for a process that should exit on its own, killing it (and
/// failing) if it does not.
fn exits_within(mut child: std::process::Child, limit: Duration) -> std::process::Output {
    let deadline = Instant::now() + limit;
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("the process did not exit within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().unwrap()
}

#[tokio::test]
async fn requests_without_a_valid_token_get_401_and_change_nothing() {
    let data = tempfile::tempdir().unwrap();
    let cp = ControlPlane::start(data.path()).await;
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(data.path().join("admin-token"))
            .unwrap()
            .permissions(),
    );
    assert_eq!(mode & 0o777, 0o600, "the token file is private");
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(data.path()).unwrap().permissions(),
    );
    assert_eq!(mode & 0o777, 0o700, "the data dir is private");

    for token in ["", "wrong", &format!("{}x", cp.token)] {
        let (status, body) = cp
            .call(
                "POST",
                "/api/v1/apply",
                Some(("application/yaml", POLICY)),
                Some(token),
            )
            .await;
        assert_eq!(status, 401, "{body}");
        assert!(body.contains("token"), "{body}");
        let (status, _) = cp.call("GET", "/api/v1/resources", None, Some(token)).await;
        assert_eq!(status, 401);
    }
    assert_eq!(cp.revision().await, 0);
    let (status, _) = cp.call("GET", "/api/v1/revisions", None, None).await;
    assert_eq!(status, 200);
}

#[tokio::test]
async fn apply_get_conflict_and_precise_validation_errors() {
    let data = tempfile::tempdir().unwrap();
    let cp = ControlPlane::start(data.path()).await;
    let answer = cp.apply(POLICY).await;
    assert_eq!(answer["revision"], 1);
    assert_eq!(answer["changes"].as_array().unwrap().len(), 2);
    // The same again: unchanged, no new revision.
    let answer = cp.apply(POLICY).await;
    assert_eq!(answer["unchanged"], true);
    assert_eq!(cp.revision().await, 1);

    // A reference to a Service that does not exist: 422 naming the
    // document, resource, field and reason; nothing changes.
    let bad = POLICY.replace("service: api}", "service: apx}");
    let (status, body) = cp
        .call(
            "POST",
            "/api/v1/apply",
            Some(("application/yaml", &bad)),
            None,
        )
        .await;
    assert_eq!(status, 422, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        v["error"],
        "request: document 2 (Workload shop/web): spec.outbound[0].service: no Service shop/apx; Services in namespace \"shop\": api"
    );
    assert_eq!(v["details"][0]["field"], "spec.outbound[0].service");
    // Every problem at once, in one all-or-nothing refusal.
    let two_bad = POLICY
        .replace("9001", "99999")
        .replace("appPort: 8080", "appPort: 0");
    let (status, body) = cp
        .call(
            "POST",
            "/api/v1/apply",
            Some(("application/yaml", &two_bad)),
            None,
        )
        .await;
    assert_eq!(status, 422, "{body}");
    assert!(body.contains("spec.endpoints[0].address"), "{body}");
    assert!(body.contains("spec.inbound[0].appPort"), "{body}");
    // Unparseable: 400.
    let (status, body) = cp
        .call(
            "POST",
            "/api/v1/apply",
            Some(("application/json", "{nope")),
            None,
        )
        .await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(cp.revision().await, 1);

    // JSON bodies: a List of documents.
    let list = serde_json::json!({"kind": "List", "items": [{
        "apiVersion": "outrigger.io/v1alpha1", "kind": "Service",
        "metadata": {"name": "db", "namespace": "shop"}, "spec": {"protocol": "tcp"}
    }]});
    let (status, body) = cp
        .call(
            "POST",
            "/api/v1/apply",
            Some(("application/json", &list.to_string())),
            None,
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(cp.revision().await, 2);

    // Based on a stale revision: 409, nothing changes.
    let (status, body) = cp
        .call(
            "POST",
            "/api/v1/apply?expectedRevision=1",
            Some(("application/yaml", &POLICY.replace("9001", "9002"))),
            None,
        )
        .await;
    assert_eq!(status, 409, "{body}");
    assert!(body.contains("current revision is 2"), "{body}");
    assert_eq!(cp.revision().await, 2);

    // Get: by kind (short names too), by name, as YAML.
    let services = cp.get_json("/api/v1/resources/svc").await;
    assert_eq!(services["items"].as_array().unwrap().len(), 2);
    let one = cp
        .get_json("/api/v1/resources/workload/web?namespace=shop")
        .await;
    assert_eq!(one["kind"], "Workload");
    assert_eq!(one["spec"]["outbound"][0]["service"], "api");
    let (status, yaml) = cp
        .call(
            "GET",
            "/api/v1/resources/service/shop%2Fapi?output=yaml",
            None,
            None,
        )
        .await;
    assert_eq!(status, 200);
    assert!(yaml.contains("127.0.0.1:9001"), "{yaml}");
    let (status, body) = cp
        .call("GET", "/api/v1/resources/service/nope", None, None)
        .await;
    assert_eq!(status, 404, "{body}");

    // Delete: refused while referenced, allowed otherwise.
    let (status, body) = cp
        .call(
            "DELETE",
            "/api/v1/resources/service/api?namespace=shop",
            None,
            None,
        )
        .await;
    assert_eq!(status, 422, "{body}");
    assert!(body.contains("Workload shop/web"), "{body}");
    let (status, body) = cp
        .call("DELETE", "/api/v1/resources/service/shop%2Fdb", None, None)
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(cp.revision().await, 3);
}

#[tokio::test]
async fn history_diff_and_rollback() {
    let data = tempfile::tempdir().unwrap();
    let cp = ControlPlane::start(data.path()).await;
    cp.apply(POLICY).await;
    cp.apply(&POLICY.replace("9001", "9002")).await;
    let r2 = cp.get_json("/api/v1/revisions/2").await;
    assert_eq!(r2["changes"][0]["op"], "updated");
    let diff = r2["changes"][0]["diff"].as_str().unwrap();
    assert!(
        diff.contains("- ") && diff.contains("127.0.0.1:9001"),
        "{diff}"
    );
    assert!(
        diff.contains("+ ") && diff.contains("127.0.0.1:9002"),
        "{diff}"
    );

    let (status, body) = cp
        .call(
            "POST",
            "/api/v1/rollback",
            Some(("application/json", r#"{"revision": 1}"#)),
            None,
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(cp.revision().await, 3);
    let yaml = cp
        .call(
            "GET",
            "/api/v1/resources/svc/shop%2Fapi?output=yaml",
            None,
            None,
        )
        .await
        .1;
    assert!(yaml.contains("9001"), "{yaml}");
    let log = cp.get_json("/api/v1/revisions").await;
    assert_eq!(log["revisions"][0]["action"], "rollback to 1");
    let (status, _) = cp
        .call(
            "POST",
            "/api/v1/rollback",
            Some(("application/json", r#"{"revision": 9}"#)),
            None,
        )
        .await;
    assert_eq!(status, 404);
}

#[tokio::test]
async fn state_survives_sigkill_and_backup_restores_a_fresh_data_dir() {
    let data = tempfile::tempdir().unwrap();
    let mut cp = ControlPlane::start(data.path()).await;
    cp.apply(POLICY).await;
    cp.apply(&POLICY.replace("9001", "9002")).await;
    let before = cp.get_json("/api/v1/revisions").await;
    let snapshot = cp.snapshot("shop/web").await;

    // A crash: the acknowledged revisions are all there afterwards.
    cp.kill();
    let cp = ControlPlane::start(data.path()).await;
    assert_eq!(cp.get_json("/api/v1/revisions").await, before);
    assert_eq!(cp.snapshot("shop/web").await, snapshot);

    // Disaster recovery: back up while serving, lose the data dir,
    // restore into a fresh one.
    let backup_dir = tempfile::tempdir().unwrap();
    let backup = backup_dir.path().join("backup.json");
    let (status, body) = cp
        .call(
            "POST",
            "/api/v1/tokens",
            Some(("application/json", r#"{"workload": "shop/web"}"#)),
            None,
        )
        .await;
    assert_eq!(status, 201, "{body}");
    let tokens = cp.get_json("/api/v1/tokens").await;
    let root = std::fs::read_to_string(data.path().join("ca.crt")).unwrap();
    let (ok, stdout, stderr) = run(cp.cli().arg("backup").arg(&backup));
    assert!(ok, "{stderr}");
    assert!(stdout.contains("backed up 2 revisions"), "{stdout}");
    drop(cp);
    drop(data);

    let fresh = tempfile::tempdir().unwrap();
    let restored =
        ControlPlane::start_with(fresh.path(), &["--restore", backup.to_str().unwrap()]).await;
    assert_eq!(restored.get_json("/api/v1/revisions").await, before);
    assert_eq!(restored.snapshot("shop/web").await, snapshot);
    // The same CA and tokens: sidecars keep trusting and renewing.
    assert_eq!(
        std::fs::read_to_string(fresh.path().join("ca.crt")).unwrap(),
        root
    );
    assert_eq!(restored.get_json("/api/v1/tokens").await, tokens);
    drop(restored);

    // Restarting with `--restore` still set is harmless: the store already
    // holds exactly that backup.
    let restored =
        ControlPlane::start_with(fresh.path(), &["--restore", backup.to_str().unwrap()]).await;
    assert_eq!(restored.get_json("/api/v1/revisions").await, before);
    restored.apply(&POLICY.replace("9001", "9005")).await;
    drop(restored);

    // A restore never overwrites a store that has other history.
    let out = std::process::Command::new(outrigger_e2e::proxy::bin_path("outrigger"))
        .args([
            "serve",
            "--grpc-addr",
            "127.0.0.1:0",
            "--api-addr",
            "127.0.0.1:0",
            "--admin-addr",
            "127.0.0.1:0",
            "--data-dir",
        ])
        .arg(fresh.path())
        .arg("--restore")
        .arg(&backup)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let out = exits_within(out, Duration::from_secs(30));
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("fresh data dir"), "{stderr}");
}

#[tokio::test]
async fn the_cli_is_a_thin_client_with_terminal_habits() {
    let data = tempfile::tempdir().unwrap();
    let cp = ControlPlane::start(data.path()).await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("mesh.yaml");
    std::fs::write(&file, POLICY).unwrap();

    let (ok, stdout, stderr) = run(cp.cli().arg("apply").arg("-f").arg(&file));
    assert!(ok, "{stderr}");
    assert!(stdout.contains("Service/shop/api created"), "{stdout}");
    assert!(stdout.contains("revision 1"), "{stdout}");

    // From stdin.
    let (ok, stdout, stderr) = run_with_stdin(
        cp.cli().args(["apply", "-f", "-"]),
        &POLICY.replace("9001", "9003"),
    );
    assert!(ok, "{stderr}");
    assert!(stdout.contains("Service/shop/api updated"), "{stdout}");

    // A table, and YAML that applies back unchanged.
    let (ok, stdout, _) = run(cp.cli().args(["get", "all"]));
    assert!(ok);
    assert!(stdout.starts_with("KIND"), "{stdout}");
    assert!(stdout.contains("Workload   shop        web"), "{stdout}");
    let (ok, yaml, _) = run(cp
        .cli()
        .args(["get", "svc", "api", "-n", "shop", "-o", "yaml"]));
    assert!(ok);
    std::fs::write(&file, &yaml).unwrap();
    let (ok, stdout, _) = run(cp.cli().arg("apply").arg("-f").arg(&file));
    assert!(ok);
    assert!(stdout.contains("unchanged"), "{stdout}");

    // One named resource is a one-row table; `get all NAME` says what
    // it needs.
    let (ok, stdout, stderr) = run(cp.cli().args(["get", "svc", "api", "-n", "shop"]));
    assert!(ok, "{stderr}");
    let rows: Vec<Vec<&str>> = stdout
        .lines()
        .map(|l| l.split_whitespace().collect())
        .collect();
    assert_eq!(rows.len(), 2, "{stdout}");
    assert_eq!(rows[1][..3], ["Service", "shop", "api"], "{stdout}");
    let (ok, _, stderr) = run(cp.cli().args(["get", "all", "api"]));
    assert!(!ok);
    assert!(stderr.contains("name its kind"), "{stderr}");

    // History as a table, one revision as a diff, a rollback.
    let (ok, stdout, _) = run(cp.cli().arg("history"));
    assert!(ok);
    assert!(stdout.starts_with("REVISION"), "{stdout}");
    let (ok, stdout, _) = run(cp.cli().args(["history", "2"]));
    assert!(ok);
    assert!(
        stdout.contains("-   - address: 127.0.0.1:9001\n+   - address: 127.0.0.1:9003"),
        "{stdout}"
    );
    let (ok, stdout, _) = run(cp.cli().args(["rollback", "1"]));
    assert!(ok, "{stdout}");
    assert!(stdout.contains("revision 3"), "{stdout}");

    // Failures: non-zero exit, the server's message as is.
    std::fs::write(&file, POLICY.replace("appPort: 8080", "appPort: 0")).unwrap();
    let (ok, _, stderr) = run(cp.cli().arg("apply").arg("-f").arg(&file));
    assert!(!ok);
    assert!(
        stderr.contains(&format!(
            "{}: document 2 (Workload shop/web): spec.inbound[0].appPort:",
            file.display()
        )),
        "{stderr}"
    );
    let (ok, _, stderr) = run(cp.cli().args(["delete", "svc", "nope"]));
    assert!(!ok);
    assert!(
        stderr.contains("Service default/nope not found"),
        "{stderr}"
    );
    let (ok, _, stderr) = run(cp.cli().args(["get", "pods"]));
    assert!(!ok);
    assert!(stderr.contains("unknown kind \"pods\""), "{stderr}");
    let (ok, _, stderr) = run(cp.cli().env("OUTRIGGER_TOKEN", "bad").args(["get", "all"]));
    assert!(!ok);
    assert!(stderr.contains("invalid token"), "{stderr}");
    let (ok, _, stderr) = run(cp.cli().env_remove("OUTRIGGER_TOKEN").args(["get", "all"]));
    assert!(!ok);
    assert!(stderr.contains("no API token"), "{stderr}");

    // The token from a file, the server from a CLI config file.
    let config = dir.path().join("cli.yaml");
    std::fs::write(
        &config,
        format!(
            "server: http://{}\ntokenFile: {}\n",
            cp.api,
            data.path().join("admin-token").display()
        ),
    )
    .unwrap();
    let (ok, stdout, stderr) = run(cp
        .cli()
        .env_remove("OUTRIGGER_TOKEN")
        .env_remove("OUTRIGGER_SERVER")
        .env("OUTRIGGER_CLI_CONFIG", &config)
        .args(["get", "workloads"]));
    assert!(ok, "{stderr}");
    assert!(stdout.contains("web"), "{stdout}");
}

#[tokio::test]
async fn dry_runs_lists_and_bad_requests_change_nothing() {
    let data = tempfile::tempdir().unwrap();
    let cp = ControlPlane::start(data.path()).await;
    cp.apply(POLICY).await;

    // A dry run answers with the diff and writes nothing.
    let (status, body) = cp
        .call(
            "POST",
            "/api/v1/apply?dryRun=true",
            Some(("application/yaml", &POLICY.replace("9001", "9002"))),
            None,
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let answer: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(answer["dryRun"], true);
    assert_eq!(answer["changes"][0]["op"], "updated");
    assert!(
        answer["changes"][0]["diff"]
            .as_str()
            .unwrap()
            .contains("127.0.0.1:9002"),
        "{body}"
    );
    let (status, body) = cp
        .call(
            "DELETE",
            "/api/v1/resources/workload/shop%2Fweb?dryRun=true",
            None,
            None,
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(cp.revision().await, 1);
    let (ok, stdout, stderr) =
        run(cp
            .cli()
            .args(["delete", "workload", "web", "-n", "shop", "--dry-run"]));
    assert!(ok, "{stderr}");
    assert!(stdout.contains("dry run: nothing changed"), "{stdout}");
    assert_eq!(cp.revision().await, 1);

    // Bad requests are 400 with a JSON message, and change nothing.
    for (method, path, body) in [
        (
            "POST",
            "/api/v1/apply?dryrun=true",
            Some(("application/yaml", POLICY)),
        ),
        (
            "POST",
            "/api/v1/apply",
            Some(("application/yaml", "kind: [unclosed")),
        ),
        ("GET", "/api/v1/resources/svc?output=xml", None),
        ("GET", "/api/v1/resources/svc/a%2Fb?namespace=c", None),
        (
            "POST",
            "/api/v1/rollback?bogus=1",
            Some(("application/json", r#"{"revision": 0}"#)),
        ),
    ] {
        let (status, text) = cp.call(method, path, body, None).await;
        assert_eq!(status, 400, "{method} {path}: {text}");
        let error: Value = serde_json::from_str(&text).unwrap_or_else(|_| panic!("JSON: {text}"));
        assert!(error["error"].is_string(), "{text}");
    }
    assert_eq!(cp.revision().await, 1);

    // The mesh keeps its one name.
    let mesh = "apiVersion: outrigger.io/v1alpha1\nkind: Mesh\nmetadata: {name: mesh}\nspec: {}\n";
    cp.apply(mesh).await;
    let (status, body) = cp
        .call(
            "POST",
            "/api/v1/apply",
            Some((
                "application/yaml",
                &mesh.replace("name: mesh", "name: other"),
            )),
            None,
        )
        .await;
    assert_eq!(status, 422, "{body}");
    assert!(body.contains("metadata.name"), "{body}");
    assert_eq!(cp.revision().await, 2);

    // A YAML List applies like its items.
    let list = "apiVersion: v1\nkind: List\nitems:\n- apiVersion: outrigger.io/v1alpha1\n  kind: Service\n  metadata: {name: db, namespace: shop}\n  spec: {protocol: tcp}\n";
    let (status, body) = cp
        .call(
            "POST",
            "/api/v1/apply",
            Some(("application/yaml", list)),
            None,
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(cp.revision().await, 3);

    // What `get -o json` prints applies back as no change.
    let (ok, json, _) = run(cp.cli().args(["get", "all", "-o", "json"]));
    assert!(ok);
    let (ok, stdout, stderr) = run_with_stdin(cp.cli().args(["apply", "-f", "-"]), &json);
    assert!(ok, "{stderr}");
    assert!(stdout.contains("unchanged"), "{stdout}");
    assert_eq!(cp.revision().await, 3);

    // A rollback takes the same options in its query as in its body.
    for query in ["?dryRun=true", ""] {
        let body = if query.is_empty() {
            r#"{"revision": 1, "dryRun": true}"#
        } else {
            r#"{"revision": 1}"#
        };
        let (status, text) = cp
            .call(
                "POST",
                &format!("/api/v1/rollback{query}"),
                Some(("application/json", body)),
                None,
            )
            .await;
        assert_eq!(status, 200, "{text}");
        assert!(text.contains("\"dryRun\":true"), "{text}");
    }
    let (status, text) = cp
        .call(
            "POST",
            "/api/v1/rollback?expectedRevision=7",
            Some(("application/json", r#"{"revision": 1}"#)),
            None,
        )
        .await;
    assert_eq!(status, 409, "{text}");
    assert_eq!(cp.revision().await, 3);
}
