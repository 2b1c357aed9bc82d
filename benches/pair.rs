//! Quick check, sidecar pair (plaintext and mTLS between the sidecars) vs
//! direct, in one run:
//! `cargo build --release && cargo bench --bench pair`
//!
//! The same harness as the full suite (`harness/bench/`, pinned, interleaved,
//! CPU from the scheduler), cut down to two paths and the built-in client:
//! closed loop and a fixed rate over HTTP/1.1. `BENCH_CONNECTIONS` (default
//! 8) and `BENCH_RPS` (default 1000) override the load. Nothing is written
//! to `benches/results/`.

use std::path::PathBuf;
use std::time::Duration;

use outrigger_e2e::bench::load::{Load, Mode, Proto, Request};
use outrigger_e2e::bench::peers::PathKind;
use outrigger_e2e::bench::{self, Options, Scenario};

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn main() {
    bench::pin_self_to_cpu0();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    let connections = env_or("BENCH_CONNECTIONS", 8) as usize;
    let rps = env_or("BENCH_RPS", 1000);
    let scenario = |name: String, mode| Scenario {
        name,
        load: Load {
            proto: Proto::H1,
            request: Request::Small,
            mode,
            connections,
            streams: 1,
            duration: Duration::from_secs(3),
        },
        rate_of_max: None,
    };
    let options = Options {
        upstream_bin: PathBuf::from(env!("CARGO_BIN_EXE_outrigger-bench-upstream")),
        paths: vec![
            PathKind::Direct,
            PathKind::Outrigger,
            PathKind::OutriggerMtls,
        ],
        repetitions: 3,
        warmup: Duration::from_millis(500),
        pin: true,
        builtin_only: true,
        scenarios: vec![
            scenario(
                format!("closed loop, {connections} connections"),
                Mode::Closed,
            ),
            scenario(
                format!("{rps} req/s, {connections} connections"),
                Mode::Fixed(rps),
            ),
        ],
        out_dir: None,
        memory: false,
    };
    match runtime.block_on(bench::run(&options)) {
        Ok(results) => println!("\n{}", bench::report::markdown(&results)),
        Err(e) => {
            eprintln!("benchmark failed: {e:#}");
            std::process::exit(1);
        }
    }
}
