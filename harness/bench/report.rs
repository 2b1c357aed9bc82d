//! The report: a Markdown page (`latest.md`) and the raw runs as JSON
//! (`latest.json`). Medians over repetitions, every run listed, ratios
//! against nginx and HAProxy from the same batch, latency added over the
//! direct path.

use std::fmt::Write as _;
use std::path::Path;

use super::peers::PathKind;
use super::{Memory, Results, Run};

pub fn median(values: impl Iterator<Item = f64>) -> Option<f64> {
    let mut v: Vec<f64> = values.filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    Some(v[v.len() / 2])
}

pub fn run_line(run: &Run) -> String {
    let o = &run.outcome;
    let lat = o
        .latency
        .as_ref()
        .map(|l| format!("p50 {:.0} µs p99 {:.0} µs", l.p50_us, l.p99_us))
        .or_else(|| o.mean_us.map(|m| format!("mean {m:.0} µs")))
        .unwrap_or_default();
    let spans = run
        .spans
        .map(|s| format!("  spans exported {} dropped {}", s.exported, s.dropped))
        .unwrap_or_default();
    format!(
        "{:<9} rep {} {:>9.0} req/s  {lat:<26} proxy CPU {:6.1} ms/1k req  errors {}  other {:.2} cores{}{spans}",
        run.path.name(),
        run.repetition,
        o.rps(),
        run.proxy_cpu_ms_per_1k,
        o.errors,
        run.other_cores,
        if run.noisy { "  NOISY" } else { "" }
    )
}

pub fn memory_line(m: &Memory) -> String {
    format!(
        "idle {} KiB, after load {} KiB (peak {}), with 1,000 idle connections {} KiB, {} process(es)",
        m.idle_rss_kib,
        m.rss_after_load_kib,
        m.hwm_after_load_kib,
        m.rss_with_1000_idle_conns_kib,
        m.processes
    )
}

/// Hops a path's proxies make (CPU per hop = total / hops).
fn hops(path: PathKind) -> f64 {
    if path == PathKind::Direct { 1.0 } else { 2.0 }
}

struct Summary {
    rps: f64,
    cpu: f64,
    p50: Option<f64>,
    p90: Option<f64>,
    p99: Option<f64>,
    p999: Option<f64>,
    mean: Option<f64>,
    errors: u64,
    noisy: usize,
    runs: usize,
}

fn summarize(runs: &[&Run]) -> Summary {
    let lat = |f: fn(&super::load::Latency) -> f64| {
        median(
            runs.iter()
                .filter_map(|r| r.outcome.latency.as_ref().map(f)),
        )
    };
    Summary {
        rps: median(runs.iter().map(|r| r.outcome.rps())).unwrap_or(0.0),
        cpu: median(runs.iter().map(|r| r.proxy_cpu_ms_per_1k)).unwrap_or(0.0),
        p50: lat(|l| l.p50_us),
        p90: lat(|l| l.p90_us),
        p99: lat(|l| l.p99_us),
        p999: median(
            runs.iter()
                .filter_map(|r| r.outcome.latency.as_ref()?.p999_us),
        ),
        mean: median(runs.iter().filter_map(|r| r.outcome.mean_us)),
        errors: runs.iter().map(|r| r.outcome.errors).sum(),
        noisy: runs.iter().filter(|r| r.noisy).count(),
        runs: runs.len(),
    }
}

fn us(v: Option<f64>) -> String {
    v.map(|x| format!("{x:.0}"))
        .unwrap_or_else(|| "–".to_string())
}

fn plus_us(v: Option<f64>, base: Option<f64>) -> String {
    match (v, base) {
        (Some(v), Some(b)) => format!("{:+.0}", v - b),
        _ => "–".to_string(),
    }
}

fn added(kind: PathKind, v: Option<f64>, base: Option<f64>) -> String {
    if kind == PathKind::Direct {
        "–".to_string()
    } else {
        plus_us(v, base)
    }
}

fn ratio(a: f64, b: Option<f64>) -> String {
    match b {
        Some(b) if b > 0.0 => format!("{:.2}×", a / b),
        _ => "–".to_string(),
    }
}

/// `YYYY-MM-DD HH:MM UTC` from Unix seconds (civil-from-days).
fn utc(secs: u64) -> String {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02} UTC",
        rem / 3600,
        rem % 3600 / 60
    )
}

pub fn markdown(results: &Results) -> String {
    let mut md = String::new();
    let _ = writeln!(md, "# Benchmark results\n");
    let _ = writeln!(
        md,
        "Run {} on {}. Transport between the hops: {}. Reproduce with `bash benches/install-peers.sh --with-oha --with-pingora && cargo build --release && cargo bench --bench suite` (method: docs/BENCHMARKS.md).\n",
        utc(results.started_unix),
        results.machine,
        results.transport
    );
    let _ = writeln!(
        md,
        "Medians over repetitions. **Proxy CPU** is the CPU time of every proxy process in the path (both hops) per 1,000 requests, from the scheduler's accounting; the *vs nginx* and *vs HAProxy* columns divide it by the nginx and HAProxy pairs' figure from the same batch, with the same transport between the hops (an -mtls path against nginx-mtls and haproxy-mtls; below 1× is better). The *vs plaintext* columns divide an -mtls path's req/s and proxy CPU by those of the same proxy with plaintext hops, same batch: the cost of mutual TLS. **Added** latency is over the direct path in the same batch. Runs where other processes used more than 0.2 core are counted as noisy.\n"
    );
    let _ = writeln!(
        md,
        "New-connection scenarios: {}.\n",
        results.new_connections
    );
    for (kind, why) in &results.skipped {
        let _ = writeln!(md, "- skipped **{}**: {why}", kind.name());
    }
    for note in &results.notes {
        let _ = writeln!(md, "- note: {note}");
    }
    let mut scenarios: Vec<&str> = Vec::new();
    for run in &results.runs {
        if !scenarios.contains(&run.scenario.as_str()) {
            scenarios.push(&run.scenario);
        }
    }
    mtls_cost(&mut md, results, &scenarios);
    over_outrigger(&mut md, results, &scenarios);
    for scenario in scenarios {
        let runs: Vec<&Run> = results
            .runs
            .iter()
            .filter(|r| r.scenario == scenario)
            .collect();
        let tool = runs.first().map(|r| r.outcome.tool).unwrap_or("");
        let rate = runs
            .first()
            .and_then(|r| r.rate)
            .map(|r| format!(", {r} req/s asked"))
            .unwrap_or_default();
        let fresh = runs.first().is_some_and(|r| r.new_connections);
        let what = if fresh {
            ", one request per new connection: req/s = new connections/s, CPU per 1,000 connections"
        } else {
            ""
        };
        let _ = writeln!(md, "\n## {scenario} ({tool}{rate}{what})\n");
        let _ = writeln!(
            md,
            "| path | req/s | proxy CPU ms/1k req (per hop) | vs nginx | vs HAProxy | req/s vs plaintext | CPU vs plaintext | p50 µs | p90 µs | p99 µs | p99.9 µs | mean µs | added p50 | added p90 | added p99 | added p99.9 | errors | noisy |"
        );
        let _ = writeln!(
            md,
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
        );
        let by_path = |kind: PathKind| {
            let rs: Vec<&Run> = runs.iter().copied().filter(|r| r.path == kind).collect();
            (!rs.is_empty()).then(|| summarize(&rs))
        };
        let direct = by_path(PathKind::Direct);
        for kind in PathKind::ALL {
            let Some(s) = by_path(kind) else { continue };
            let (nginx, haproxy) = if kind.mtls() {
                (PathKind::NginxMtls, PathKind::HaproxyMtls)
            } else {
                (PathKind::Nginx, PathKind::Haproxy)
            };
            let (cpu, vs_nginx, vs_haproxy) = if kind == PathKind::Direct {
                ("–".to_string(), "–".to_string(), "–".to_string())
            } else {
                (
                    format!("{:.1} ({:.1})", s.cpu, s.cpu / hops(kind)),
                    ratio(s.cpu, by_path(nginx).map(|s| s.cpu)),
                    ratio(s.cpu, by_path(haproxy).map(|s| s.cpu)),
                )
            };
            let plain = kind.mtls().then(|| by_path(kind.plaintext())).flatten();
            let (rps_vs_plain, cpu_vs_plain) = match &plain {
                Some(p) => (ratio(s.rps, Some(p.rps)), ratio(s.cpu, Some(p.cpu))),
                None => ("–".to_string(), "–".to_string()),
            };
            let base = direct.as_ref();
            let _ = writeln!(
                md,
                "| {} | {:.0} | {cpu} | {vs_nginx} | {vs_haproxy} | {rps_vs_plain} | {cpu_vs_plain} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {}/{} |",
                kind.name(),
                s.rps,
                us(s.p50),
                us(s.p90),
                us(s.p99),
                us(s.p999),
                us(s.mean),
                added(kind, s.p50, base.and_then(|d| d.p50)),
                added(kind, s.p90, base.and_then(|d| d.p90)),
                added(kind, s.p99, base.and_then(|d| d.p99)),
                added(kind, s.p999, base.and_then(|d| d.p999)),
                s.errors,
                s.noisy,
                s.runs,
            );
        }
    }
    if !results.memory.is_empty() {
        let _ = writeln!(
            md,
            "\n## Memory (KiB, summed over the path's proxy processes)\n"
        );
        let _ = writeln!(
            md,
            "| path | processes | idle RSS | RSS after load | peak (HWM) | RSS with 1,000 idle connections |"
        );
        let _ = writeln!(md, "|---|---:|---:|---:|---:|---:|");
        for m in &results.memory {
            let _ = writeln!(
                md,
                "| {} | {} | {} | {} | {} | {} |",
                m.path.name(),
                m.processes,
                m.idle_rss_kib,
                m.rss_after_load_kib,
                m.hwm_after_load_kib,
                m.rss_with_1000_idle_conns_kib
            );
        }
    }
    let _ = writeln!(md, "\n## Every run\n\n```");
    for run in &results.runs {
        let _ = writeln!(md, "{:<24} {}", run.scenario, run_line(run));
    }
    let _ = writeln!(md, "```");
    md
}

/// One table: each -mtls path's req/s and proxy CPU over its plaintext
/// path's, per scenario, same batch.
fn mtls_cost(md: &mut String, results: &Results, scenarios: &[&str]) {
    let pairs: Vec<PathKind> = PathKind::ALL
        .into_iter()
        .filter(|k| k.mtls() && results.runs.iter().any(|r| r.path == *k))
        .collect();
    if pairs.is_empty() {
        return;
    }
    let _ = writeln!(
        md,
        "\n## The cost of mutual TLS\n\nEach -mtls path over the same proxy with plaintext hops, same batch: req/s (above 1× is faster) / proxy CPU per request (above 1× costs more).\n"
    );
    let mut head = "| scenario |".to_string();
    let mut rule = "|---|".to_string();
    for k in &pairs {
        let _ = write!(
            head,
            " {} req/s | {} CPU |",
            k.plaintext().name(),
            k.plaintext().name()
        );
        rule.push_str("---:|---:|");
    }
    let _ = writeln!(md, "{head}\n{rule}");
    for scenario in scenarios {
        let median_of = |kind: PathKind, f: fn(&Run) -> f64| {
            median(
                results
                    .runs
                    .iter()
                    .filter(|r| r.scenario == *scenario && r.path == kind)
                    .map(f),
            )
        };
        let mut line = format!("| {scenario} |");
        for k in &pairs {
            let rps = |kind| median_of(kind, |r| r.outcome.rps());
            let cpu = |kind| median_of(kind, |r| r.proxy_cpu_ms_per_1k);
            let cell = |a: Option<f64>, b: Option<f64>| match a {
                Some(a) => ratio(a, b),
                None => "–".to_string(),
            };
            let _ = write!(
                line,
                " {} | {} |",
                cell(rps(*k), rps(k.plaintext())),
                cell(cpu(*k), cpu(k.plaintext()))
            );
        }
        let _ = writeln!(md, "{line}");
    }
}

/// One table: the by-host, resilience and traced paths over the plain
/// outrigger path, per scenario, same batch (ratios of medians).
fn over_outrigger(md: &mut String, results: &Results, scenarios: &[&str]) {
    let kinds: Vec<PathKind> = [
        PathKind::OutriggerByHost,
        PathKind::OutriggerResilience,
        PathKind::OutriggerTraced,
    ]
    .into_iter()
    .filter(|k| results.runs.iter().any(|r| r.path == *k))
    .collect();
    if kinds.is_empty() || !results.runs.iter().any(|r| r.path == PathKind::Outrigger) {
        return;
    }
    let _ = writeln!(
        md,
        "\n## Over the plain outrigger path\n\nEach path's median over outrigger's, same batch: req/s (above 1× is faster), proxy CPU per request, p50 and p99 (above 1× costs more; h2load gives a mean instead).\n"
    );
    let _ = writeln!(
        md,
        "| scenario | path | req/s | proxy CPU | p50 (mean) | p99 |"
    );
    let _ = writeln!(md, "|---|---|---:|---:|---:|---:|");
    for scenario in scenarios {
        let median_of = |kind: PathKind, f: &dyn Fn(&Run) -> Option<f64>| {
            median(
                results
                    .runs
                    .iter()
                    .filter(|r| r.scenario == *scenario && r.path == kind)
                    .filter_map(f),
            )
        };
        let rps = |r: &Run| Some(r.outcome.rps());
        let cpu = |r: &Run| Some(r.proxy_cpu_ms_per_1k);
        let p50 = |r: &Run| {
            r.outcome
                .latency
                .as_ref()
                .map(|l| l.p50_us)
                .or(r.outcome.mean_us)
        };
        let p99 = |r: &Run| r.outcome.latency.as_ref().map(|l| l.p99_us);
        for kind in &kinds {
            let cell = |f: &dyn Fn(&Run) -> Option<f64>| match median_of(*kind, f) {
                Some(a) => ratio(a, median_of(PathKind::Outrigger, f)),
                None => "–".to_string(),
            };
            if median_of(*kind, &rps).is_none() {
                continue;
            }
            let _ = writeln!(
                md,
                "| {scenario} | {} | {} | {} | {} | {} |",
                kind.name(),
                cell(&rps),
                cell(&cpu),
                cell(&p50),
                cell(&p99)
            );
        }
    }
}

pub fn write(results: &Results, dir: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir)?;
    std::fs::write(dir.join("latest.md"), markdown(results))?;
    std::fs::write(
        dir.join("latest.json"),
        serde_json::to_string_pretty(results)?,
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates() {
        assert_eq!(utc(0), "1970-01-01 00:00 UTC");
        assert_eq!(utc(1_796_400_000), "2026-12-04 16:00 UTC");
    }

    #[test]
    fn medians() {
        assert_eq!(median([3.0, 1.0, 2.0].into_iter()), Some(2.0));
        assert_eq!(median(std::iter::empty()), None);
    }
}
