//! The full side-by-side suite:
//! `bash benches/install-peers.sh --with-oha --with-pingora && cargo build --release && cargo bench --bench suite`
//! Writes `benches/results/latest.md` and `latest.json`. See docs/BENCHMARKS.md.
//! `-- quick` for one repetition of 2-second runs; `reps=N`, `only=TEXT`,
//! `paths=a,b`.

use std::path::PathBuf;

use outrigger_e2e::bench::peers::PathKind;
use outrigger_e2e::bench::{self, Options};

fn main() {
    bench::pin_self_to_cpu0();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    let out = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("benches/results");
    let upstream = PathBuf::from(env!("CARGO_BIN_EXE_outrigger-bench-upstream"));
    let mut options = Options::full(upstream, out);
    // `cargo bench --bench suite -- quick`: one repetition, short runs.
    // `reps=N` sets the repetitions (after `quick` too); `only=TEXT` keeps
    // the scenarios whose name contains TEXT (and skips the memory pass);
    // `paths=direct,outrigger` runs only those paths, in that order.
    let args: Vec<String> = std::env::args().collect();
    if args.iter().any(|a| a == "quick") {
        options.repetitions = 1;
        for s in &mut options.scenarios {
            s.load.duration = std::time::Duration::from_secs(2);
        }
    }
    for arg in &args {
        if let Some(n) = arg.strip_prefix("reps=").and_then(|n| n.parse().ok()) {
            options.repetitions = n;
        }
        if let Some(text) = arg.strip_prefix("only=") {
            options.scenarios.retain(|s| s.name.contains(text));
            options.memory = false;
        }
        if let Some(names) = arg.strip_prefix("paths=") {
            match paths(names) {
                Ok(paths) => options.paths = paths,
                Err(e) => {
                    eprintln!("{e}");
                    std::process::exit(2);
                }
            }
        }
    }
    if let Err(e) = runtime.block_on(bench::run(&options)) {
        eprintln!("benchmark failed: {e:#}");
        std::process::exit(1);
    }
}

/// `direct,outrigger` → those paths; an unknown name is an error that
/// lists the known ones.
fn paths(names: &str) -> Result<Vec<PathKind>, String> {
    names
        .split(',')
        .map(|name| {
            PathKind::ALL
                .into_iter()
                .find(|k| k.name() == name.trim())
                .ok_or_else(|| {
                    let known: Vec<&str> = PathKind::ALL.iter().map(|k| k.name()).collect();
                    format!(
                        "paths=: no path {name:?}; the paths are {}",
                        known.join(", ")
                    )
                })
        })
        .collect()
}
