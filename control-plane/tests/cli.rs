//! The `outrigger` CLI. (Being an integration test of this package also
//! makes `cargo test` build the `outrigger` binary that the demo test in the
//! workspace root runs.)

use std::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_outrigger");

#[test]
fn validate_accepts_the_example() {
    let example = concat!(env!("CARGO_MANIFEST_DIR"), "/../config/examples/mesh.yaml");
    let out = Command::new(BIN)
        .args(["validate", "-f", example])
        .output()
        .expect("run");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("valid (2 workloads"));
}

#[test]
fn validate_reports_every_problem_and_fails() {
    let dir = std::env::temp_dir().join(format!("outrigger-cli-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let file = dir.join("bad.yaml");
    std::fs::write(
        &file,
        "apiVersion: outrigger.io/v1alpha1\nkind: Service\nmetadata: {name: api}\nspec:\n  endpoints: [{address: nowhere}]\n---\napiVersion: outrigger.io/v1alpha1\nkind: Service\nmetadata: {name: db}\nspec:\n  protocol: udp\n",
    )
    .expect("write");
    let out = Command::new(BIN)
        .args(["validate", "-f"])
        .arg(&file)
        .output()
        .expect("run");
    let _ = std::fs::remove_dir_all(&dir);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("bad.yaml: document 1 (Service default/api)"),
        "{stderr}"
    );
    assert!(stderr.contains("spec.endpoints[0].address"), "{stderr}");
    assert!(
        stderr.contains("document 2 (Service default/db): spec.protocol"),
        "{stderr}"
    );
}
