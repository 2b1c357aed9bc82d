//! The README's demo command works: `outrigger demo` starts a real control
//! plane and real sidecars, every narrated step passes (a live policy
//! change among them), and it exits 0.

use std::process::Command;

#[test]
fn demo_runs_every_step_and_exits_cleanly() {
    let out = Command::new(outrigger_e2e::proxy::bin_path("outrigger"))
        .arg("demo")
        .output()
        .expect("run outrigger demo");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "demo failed:\n{stdout}\n{stderr}");
    assert!(stdout.contains("All 13 steps passed."), "{stdout}");
    assert!(
        stdout.contains("[ok] over mTLS the app sees the verified caller")
            && stdout.contains("web = spiffe://cluster.local/ns/shop/sa/web"),
        "{stdout}"
    );
    assert!(
        stdout.contains("[ok] live policy change (timeout 500ms → 2s) without a restart"),
        "{stdout}"
    );
    assert!(
        stdout.contains("[ok] egress allow-list: the shared port reaches declared services only"),
        "{stdout}"
    );
    assert!(
        stdout.contains("[ok] a retry saves a request to a flaky endpoint")
            && stdout.contains("[ok] a failing endpoint is ejected and the circuit opens"),
        "{stdout}"
    );
    assert!(!stdout.contains("[FAIL]"), "{stdout}");
}
