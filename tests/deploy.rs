//! What `deploy/` ships works with the real tools: the Prometheus alert
//! rules pass `promtool check rules` and their unit tests (`promtool test
//! rules`, synthetic series); every runbook they link exists; the Grafana
//! dashboard is valid JSON that queries only metrics the sidecars and
//! control plane export; the systemd unit passes `systemd-analyze verify`.

use std::path::{Path, PathBuf};
use std::process::Command;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// promtool, installed by the project's script when missing.
fn promtool() -> PathBuf {
    let found = |cmd: &str| {
        Command::new("sh")
            .args(["-c", &format!("command -v {cmd}")])
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| PathBuf::from(String::from_utf8_lossy(&o.stdout).trim()))
    };
    if let Some(path) = found("promtool") {
        return path;
    }
    install("deploy/prometheus/install-promtool.sh", "promtool");
    found("promtool").expect("promtool on PATH after installing it")
}

/// Runs one of the project's install scripts; `what` is what it installs.
fn install(script: &str, what: &str) {
    let script = repo().join(script);
    let status = Command::new("bash")
        .arg(&script)
        .status()
        .expect("run the installer");
    assert!(
        status.success(),
        "{} failed: {what} is needed for these tests",
        script.display()
    );
}

fn run(promtool: &Path, args: &[&str]) {
    let out = Command::new(promtool)
        .args(args)
        .current_dir(repo().join("deploy/prometheus"))
        .output()
        .expect("run promtool");
    assert!(
        out.status.success(),
        "promtool {}:\n{}{}",
        args.join(" "),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn alert_rules_pass_promtool_and_their_unit_tests() {
    let promtool = promtool();
    run(&promtool, &["check", "rules", "outrigger-rules.yaml"]);
    run(&promtool, &["test", "rules", "outrigger-rules.test.yaml"]);
}

#[test]
fn every_alert_has_its_runbook() {
    let rules = std::fs::read_to_string(repo().join("deploy/prometheus/outrigger-rules.yaml"))
        .unwrap_or_default();
    let runbooks: Vec<&str> = rules
        .lines()
        .filter_map(|l| l.trim().strip_prefix("runbook: "))
        .collect();
    assert_eq!(runbooks.len(), 5, "{runbooks:?}");
    for runbook in runbooks {
        assert!(repo().join(runbook).is_file(), "missing {runbook}");
    }
}

/// Every metric the dashboard or the rules query, as exported.
const EXPORTED: &[&str] = &[
    "outrigger_requests_total",
    "outrigger_request_duration_seconds_bucket",
    "outrigger_retries_total",
    "outrigger_retry_budget_exhausted_total",
    "outrigger_outlier_ejected_endpoints",
    "outrigger_circuit_open",
    "outrigger_circuit_overflow_total",
    "outrigger_open_connections",
    "outrigger_identity_cert_expiry_timestamp_seconds",
    "outrigger_spans_exported_total",
    "outrigger_spans_dropped_total",
    "outrigger_cp_proxies",
];

/// The sources of the two binaries, to check the list above against.
fn sources() -> String {
    let mut text = String::new();
    for dir in ["proxy/src", "control-plane/src"] {
        let mut stack = vec![repo().join(dir)];
        while let Some(dir) = stack.pop() {
            for entry in std::fs::read_dir(&dir).expect("read_dir").flatten() {
                let path = entry.path();
                if path.is_dir() {
                    stack.push(path);
                } else if path.extension().is_some_and(|e| e == "rs") {
                    text.push_str(&std::fs::read_to_string(&path).unwrap_or_default());
                }
            }
        }
    }
    text
}

#[test]
fn the_metrics_the_rules_and_dashboard_use_are_in_the_code() {
    let sources = sources();
    for metric in EXPORTED {
        // Histograms are declared by name; Prometheus adds `_bucket`.
        let name = metric.trim_end_matches("_bucket");
        assert!(
            sources.contains(&format!("\"{name}\"")),
            "{name} is not a metric name in proxy/ or control-plane/"
        );
    }
}

#[test]
fn the_dashboard_queries_only_exported_metrics() {
    let text = std::fs::read_to_string(repo().join("deploy/grafana/outrigger-dashboard.json"))
        .expect("dashboard");
    let dashboard: serde_json::Value = serde_json::from_str(&text).expect("valid JSON");
    let panels = dashboard["panels"].as_array().expect("panels");
    assert!(panels.len() >= 8);
    for panel in panels {
        for target in panel["targets"].as_array().expect("targets") {
            let expr = target["expr"].as_str().expect("expr");
            let metrics: Vec<&str> = expr
                .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .filter(|w| w.starts_with("outrigger_"))
                .collect();
            assert!(!metrics.is_empty(), "{expr}");
            for metric in metrics {
                assert!(
                    EXPORTED.contains(&metric),
                    "{metric} is not exported ({expr})"
                );
            }
        }
    }
}

#[test]
fn the_systemd_unit_verifies() {
    let dir = tempfile::tempdir().expect("tempdir");
    // An instance of the template, as `systemctl enable outrigger-proxy@web` makes.
    let unit = dir.path().join("outrigger-proxy@web.service");
    std::fs::copy(
        repo().join("deploy/systemd/outrigger-proxy@.service"),
        &unit,
    )
    .expect("copy");
    let out = Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .arg(&unit)
        .output()
        .expect("systemd-analyze (from systemd) must be installed");
    let stderr = String::from_utf8_lossy(&out.stderr);
    // The binary is not installed here; anything else is a real problem.
    let problems: Vec<&str> = stderr
        .lines()
        .filter(|l| !l.contains("/usr/local/bin/outrigger-proxy is not executable"))
        .filter(|l| !l.trim().is_empty())
        .collect();
    assert!(problems.is_empty(), "{stderr}");
}

// === Kubernetes ===

/// kubernetes-validate (PyPI, schemas bundled), installed by the
/// project's script into target/ when missing.
fn kubernetes_validate() -> PathBuf {
    let bin = repo().join("target/kubernetes-validate/bin/kubernetes-validate");
    if !bin.exists() {
        install(
            "deploy/kubernetes/install-validator.sh",
            "kubernetes-validate",
        );
    }
    bin
}

/// Validates `files` against the Kubernetes OpenAPI schemas, strictly
/// (unknown fields are errors).
fn validate(files: &[PathBuf]) {
    let out = Command::new(kubernetes_validate())
        .arg("--strict")
        .args(files)
        .output()
        .expect("run kubernetes-validate");
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn the_kubernetes_manifests_validate() {
    let dir = repo().join("deploy/kubernetes");
    let kustomization =
        std::fs::read_to_string(dir.join("kustomization.yaml")).expect("kustomization");
    let files: Vec<PathBuf> = kustomization
        .lines()
        .filter_map(|l| l.trim().strip_prefix("- "))
        .map(|f| dir.join(f))
        .collect();
    assert_eq!(files.len(), 5, "every manifest is in the kustomization");
    validate(&files);
}

fn outrigger(args: &[&str], input: &Path) -> String {
    let out = Command::new(outrigger_e2e::proxy::bin_path("outrigger"))
        .args(args)
        .arg(input)
        .output()
        .expect("run outrigger");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("UTF-8")
}

/// Each manifest in tests/fixtures/inject/ injects to its golden
/// `.injected` file (set OUTRIGGER_UPDATE_GOLDEN=1 to rewrite them), the
/// result validates, injecting again changes nothing, and uninjecting
/// gives back the same objects.
#[test]
fn inject_golden_files_validate_and_round_trip() {
    let fixtures = repo().join("tests/fixtures/inject");
    let work = tempfile::tempdir().expect("tempdir");
    let mut outputs = Vec::new();
    let mut inputs: Vec<PathBuf> = std::fs::read_dir(&fixtures)
        .expect("fixtures")
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.to_string_lossy().ends_with(".yaml")
                && !p.to_string_lossy().ends_with(".injected.yaml")
        })
        .collect();
    inputs.sort();
    assert!(inputs.len() >= 6);
    for input in &inputs {
        let injected = outrigger(&["inject", "-f"], input);
        let golden = input.with_extension("injected.yaml");
        if std::env::var_os("OUTRIGGER_UPDATE_GOLDEN").is_some() {
            std::fs::write(&golden, &injected).expect("write golden");
        }
        let expected = std::fs::read_to_string(&golden).unwrap_or_else(|_| {
            panic!(
                "no {}; run with OUTRIGGER_UPDATE_GOLDEN=1",
                golden.display()
            )
        });
        assert_eq!(
            injected,
            expected,
            "{} differs from its golden file",
            input.display()
        );

        let out = work.path().join(golden.file_name().expect("name"));
        std::fs::write(&out, &injected).expect("write");
        assert_eq!(outrigger(&["inject", "-f"], &out), injected, "idempotent");
        let back = outrigger(&["uninject", "-f"], &out);
        let original = std::fs::read_to_string(input).expect("input");
        assert_eq!(
            docs(&back),
            docs(&original),
            "{}: uninject undoes inject",
            input.display()
        );
        outputs.push(out);
    }
    validate(&inputs);
    validate(&outputs);
}

fn docs(text: &str) -> Vec<serde_json::Value> {
    text.split("\n---")
        .filter_map(|d| serde_norway::from_str::<serde_json::Value>(d).ok())
        .filter(|v| !v.is_null())
        .collect()
}
