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
    assert!(stdout.contains("All 14 steps passed."), "{stdout}");
    assert!(
        stdout.contains("[ok] over mTLS the app sees the verified caller")
            && stdout.contains("web = spiffe://cluster.local/ns/shop/sa/web")
            && stdout.contains("billing = spiffe://cluster.local/ns/shop/sa/billing"),
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
            && stdout.contains("[ok] a failing endpoint is ejected and the circuit opens")
            && stdout.contains("[ok] api's allow-list refuses")
            && stdout.contains("[ok] one trace id through two hops"),
        "{stdout}"
    );
    assert!(!stdout.contains("[FAIL]"), "{stdout}");
}

#[test]
fn ctrl_c_stops_every_process_and_removes_the_temp_dir() {
    use std::io::{BufRead, BufReader};
    let mut child = Command::new(outrigger_e2e::proxy::bin_path("outrigger"))
        .arg("demo")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("run outrigger demo");
    let dir = std::env::temp_dir().join(format!("outrigger-demo-{}", child.id()));
    // Wait until both sidecars run, and note their admin ports. Stdout is
    // read to the end on its own thread, so the demo never writes into a
    // closed pipe.
    let stdout = child.stdout.take().expect("stdout");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if let Some(admin) = line.split("(admin ").nth(1) {
                let _ = tx.send(admin.trim_end_matches(')').to_string());
            }
        }
    });
    let admins: Vec<String> = (0..2)
        .filter_map(|_| rx.recv_timeout(std::time::Duration::from_secs(60)).ok())
        .collect();
    assert_eq!(
        admins.len(),
        2,
        "the demo never said where its sidecars are"
    );
    assert!(dir.exists());
    let status = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .expect("kill");
    assert!(status.success());
    let exited = child.wait().expect("wait");
    assert!(
        !exited.success(),
        "an interrupted demo does not claim success"
    );
    for admin in admins {
        assert!(
            std::net::TcpStream::connect(&admin).is_err(),
            "a sidecar outlived the demo ({admin})"
        );
    }
    assert!(!dir.exists(), "{} is left behind", dir.display());
}
