//! The benchmark harness in smoke mode: every configuration present on this
//! machine (direct and the Outrigger pairs always; nginx, HAProxy, pingora when
//! installed) serves requests with no errors over HTTP/1.1, h2c and a fixed
//! rate. Nothing about timing is asserted.

use std::path::PathBuf;

use outrigger_e2e::bench::peers::PathKind;
use outrigger_e2e::bench::{self, Options};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_configuration_serves_requests_without_errors() {
    let upstream = PathBuf::from(env!("CARGO_BIN_EXE_outrigger-bench-upstream"));
    let options = Options::smoke(upstream);
    let results = bench::run(&options).await.expect("smoke run");
    let ran: Vec<PathKind> = results.runs.iter().map(|r| r.path).collect();
    for always in [
        PathKind::Direct,
        PathKind::Outrigger,
        PathKind::OutriggerByHost,
        PathKind::OutriggerResilience,
        PathKind::OutriggerTraced,
    ] {
        assert!(ran.contains(&always), "{always:?} never ran");
    }
    for run in &results.runs {
        assert!(
            run.outcome.requests > 0,
            "{} via {:?} served nothing",
            run.scenario,
            run.path
        );
        assert_eq!(
            run.outcome.errors, 0,
            "{} via {:?} had errors",
            run.scenario, run.path
        );
    }
    // The traced path's sidecars exported spans (how many were dropped
    // depends on the machine's load, so it is not asserted).
    for run in results
        .runs
        .iter()
        .filter(|r| r.path == PathKind::OutriggerTraced)
    {
        let spans = run.spans.expect("span counts");
        assert!(spans.exported > 0, "{}: no span exported", run.scenario);
    }
    // Every present path ran every scenario it supports.
    let expected: usize = options
        .scenarios
        .iter()
        .map(|s| {
            PathKind::ALL
                .iter()
                .filter(|k| k.available().is_ok() && k.supports(&s.load))
                .count()
        })
        .sum();
    assert_eq!(results.runs.len(), expected);
    let md = bench::report::markdown(&results);
    assert!(md.contains("## smoke h1 closed"));
}
