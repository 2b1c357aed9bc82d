//! The binary's own command line. (Being an integration test of this
//! package also makes `cargo test` build the `outrigger-proxy` binary that
//! the end-to-end tests in the workspace root drive.)

use std::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_outrigger-proxy");

#[test]
fn help_lists_every_flag_with_its_env_var() {
    let out = Command::new(BIN).arg("--help").output().expect("run");
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    for (flag, env) in [
        ("--config", "OUTRIGGER_CONFIG"),
        ("--workload", "OUTRIGGER_WORKLOAD"),
        ("--admin-addr", "OUTRIGGER_ADMIN_ADDR"),
        ("--inbound-ip", "OUTRIGGER_INBOUND_IP"),
        ("--outbound-ip", "OUTRIGGER_OUTBOUND_IP"),
        ("--app-ip", "OUTRIGGER_APP_IP"),
        ("--max-header-bytes", "OUTRIGGER_MAX_HEADER_BYTES"),
        ("--header-read-timeout", "OUTRIGGER_HEADER_READ_TIMEOUT"),
        ("--drain-deadline", "OUTRIGGER_DRAIN_DEADLINE"),
        ("--threads", "OUTRIGGER_THREADS"),
        ("--log", "OUTRIGGER_LOG"),
        ("--log-format", "OUTRIGGER_LOG_FORMAT"),
    ] {
        assert!(help.contains(flag), "{flag} missing from --help");
        assert!(help.contains(env), "{env} missing from --help");
    }
}

#[test]
fn missing_config_file_is_a_clear_error() {
    let out = Command::new(BIN)
        .args(["--config", "/nonexistent/mesh.yaml", "--workload", "web"])
        .output()
        .expect("run");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("/nonexistent/mesh.yaml"), "{stderr}");
}

#[test]
fn required_flags_are_named() {
    let out = Command::new(BIN).output().expect("run");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("--config") && stderr.contains("--workload"),
        "{stderr}"
    );
}
