//! The side-by-side benchmark suite: the same load through a direct
//! connection, the Outrigger sidecar pair (plaintext and mutual TLS between
//! the sidecars, plaintext through a shared outbound port routed on
//! Host, with every resilience feature on, and with every request traced),
//! and nginx, HAProxy (each also with mutual TLS between its
//! hops) and pingora pairs, measured in one run and reported as ratios.
//!
//! `benches/suite.rs` runs it in full; `tests/bench_smoke.rs` runs a smoke
//! version (a second per configuration, built-in client, whatever peers are
//! present) so the harness cannot rot. Timings are reported, never asserted.

pub mod load;
pub mod peers;
pub mod report;
pub mod sys;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context;
use serde::Serialize;

use load::{Load, Mode, Outcome, Proto, Request};
use peers::PathKind;

/// What to run.
#[derive(Clone, Debug)]
pub struct Options {
    /// The `outrigger-bench-upstream` binary.
    pub upstream_bin: PathBuf,
    pub paths: Vec<PathKind>,
    pub repetitions: usize,
    pub warmup: Duration,
    /// Pin the load to CPU 0, upstream and proxies to CPU 1.
    pub pin: bool,
    /// Use the built-in client even when wrk/h2load/oha are installed.
    pub builtin_only: bool,
    pub scenarios: Vec<Scenario>,
    /// Where `latest.md` and `latest.json` go (`None`: no files).
    pub out_dir: Option<PathBuf>,
    pub memory: bool,
}

/// One row of the matrix.
#[derive(Clone, Debug, Serialize)]
pub struct Scenario {
    pub name: String,
    pub load: Load,
    /// For fixed-rate scenarios defined relative to our throughput: the
    /// fraction of the Outrigger pair's measured closed-loop maximum.
    #[serde(skip)]
    pub rate_of_max: Option<f64>,
}

impl Options {
    /// The full suite (about 20 minutes with every peer present).
    pub fn full(upstream_bin: PathBuf, out_dir: PathBuf) -> Self {
        let closed = |name: &str, proto, request, connections, streams, secs| Scenario {
            name: name.to_string(),
            load: Load {
                proto,
                request,
                mode: Mode::Closed,
                connections,
                streams,
                duration: Duration::from_secs(secs),
            },
            rate_of_max: None,
        };
        let fixed = |name: &str, rps, fraction: Option<f64>| Scenario {
            name: name.to_string(),
            load: Load {
                proto: Proto::H1,
                request: Request::Small,
                mode: Mode::Fixed(rps),
                connections: 32,
                streams: 1,
                duration: Duration::from_secs(10),
            },
            rate_of_max: fraction,
        };
        let new_connections = |name: &str, secs| Scenario {
            name: name.to_string(),
            load: Load {
                proto: Proto::H1,
                request: Request::Small,
                mode: Mode::NewConnections,
                connections: 8,
                streams: 1,
                duration: Duration::from_secs(secs),
            },
            rate_of_max: None,
        };
        Self {
            upstream_bin,
            paths: PathKind::ALL.to_vec(),
            repetitions: 3,
            warmup: Duration::from_secs(1),
            pin: true,
            builtin_only: false,
            scenarios: vec![
                closed("h1 c32 GET 100B", Proto::H1, Request::Small, 32, 1, 10),
                closed("h1 c1 GET 100B", Proto::H1, Request::Small, 1, 1, 5),
                closed("h1 c256 GET 100B", Proto::H1, Request::Small, 256, 1, 5),
                closed("h1 c32 GET 16KiB", Proto::H1, Request::Large, 32, 1, 5),
                closed("h1 c32 POST 1KiB", Proto::H1, Request::Post, 32, 1, 5),
                closed("h2c c32 m1 GET 100B", Proto::H2, Request::Small, 32, 1, 10),
                closed("h2c c4 m8 GET 100B", Proto::H2, Request::Small, 4, 8, 10),
                fixed("h1 1000 rps GET 100B", 1000, None),
                fixed("h1 50% of max GET 100B", 1000, Some(0.5)),
                new_connections("new conn per req c8 GET 100B", 5),
            ],
            out_dir: Some(out_dir),
            memory: true,
        }
    }

    /// A quick run that only proves every configuration serves requests.
    pub fn smoke(upstream_bin: PathBuf) -> Self {
        let scenario = |name: &str, proto, mode| Scenario {
            name: name.to_string(),
            load: Load {
                proto,
                request: Request::Small,
                mode,
                connections: 4,
                streams: 1,
                duration: Duration::from_secs(1),
            },
            rate_of_max: None,
        };
        Self {
            upstream_bin,
            paths: PathKind::ALL.to_vec(),
            repetitions: 1,
            warmup: Duration::from_millis(100),
            pin: false,
            builtin_only: true,
            scenarios: vec![
                scenario("smoke h1 closed", Proto::H1, Mode::Closed),
                scenario("smoke h2c closed", Proto::H2, Mode::Closed),
                scenario("smoke h1 200 rps", Proto::H1, Mode::Fixed(200)),
                scenario("smoke h1 new conn per req", Proto::H1, Mode::NewConnections),
            ],
            out_dir: None,
            memory: false,
        }
    }
}

/// One measured run of one path.
#[derive(Clone, Debug, Serialize)]
pub struct Run {
    pub scenario: String,
    pub path: PathKind,
    pub repetition: usize,
    pub outcome: Outcome,
    /// Proxy CPU per 1,000 requests, summed over the proxies of the path.
    pub proxy_cpu_ms_per_1k: f64,
    /// Cores used by processes outside the test during the run.
    pub other_cores: f64,
    pub noisy: bool,
    /// The rate actually asked for (fixed-rate scenarios).
    pub rate: Option<u64>,
    /// One request per new connection ([`Mode::NewConnections`]).
    pub new_connections: bool,
    /// Spans exported and dropped by the path's sidecars by the end of
    /// the run, warm-up included (the traced path only).
    pub spans: Option<peers::SpanCounts>,
}

#[derive(Clone, Debug, Serialize)]
pub struct Memory {
    pub path: PathKind,
    /// Summed over the path's proxy processes, KiB.
    pub idle_rss_kib: u64,
    pub rss_after_load_kib: u64,
    pub hwm_after_load_kib: u64,
    pub rss_with_1000_idle_conns_kib: u64,
    pub processes: usize,
}

#[derive(Debug, Serialize)]
pub struct Results {
    pub started_unix: u64,
    pub machine: String,
    pub transport: &'static str,
    /// The new-connection scenario: what opens a new connection per request.
    pub new_connections: &'static str,
    pub skipped: Vec<(PathKind, String)>,
    pub runs: Vec<Run>,
    pub memory: Vec<Memory>,
    pub notes: Vec<String>,
}

/// An upstream process (the test app on one thread).
struct Upstream {
    child: Child,
    addr: SocketAddr,
}

impl Drop for Upstream {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_upstream(bin: &PathBuf, pin: bool) -> anyhow::Result<Upstream> {
    use std::io::BufRead;
    let mut cmd = if pin {
        let mut c = Command::new("taskset");
        c.args(["-c", "1"]).arg(bin);
        c
    } else {
        Command::new(bin)
    };
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .with_context(|| format!("start {}", bin.display()))?;
    let stdout = child.stdout.take().context("upstream stdout")?;
    let mut line = String::new();
    std::io::BufReader::new(stdout).read_line(&mut line)?;
    let addr = line
        .trim()
        .parse()
        .with_context(|| format!("upstream said {line:?}"))?;
    Ok(Upstream { child, addr })
}

/// Moves every thread of this process to CPU 0, so the built-in client and
/// the runner stay off the proxies' core.
pub fn pin_self_to_cpu0() {
    let pid = std::process::id().to_string();
    let _ = Command::new("taskset")
        .args(["-a", "-p", "-c", "0", &pid])
        .stdout(Stdio::null())
        .status();
}

/// Runs the suite; prints progress as it goes.
pub async fn run(options: &Options) -> anyhow::Result<Results> {
    let scratch = tempfile::tempdir()?;
    // Fresh for every run, in the temp dir, gone with it.
    let certs = peers::Certs::generate(scratch.path())?;
    let upstream = start_upstream(&options.upstream_bin, options.pin)?;
    let mut results = Results {
        started_unix: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
        machine: machine_description(),
        transport: TRANSPORT,
        new_connections: NEW_CONNECTIONS,
        skipped: Vec::new(),
        runs: Vec::new(),
        memory: Vec::new(),
        notes: Vec::new(),
    };
    let mut paths = Vec::new();
    for kind in &options.paths {
        match kind.available() {
            Ok(()) => paths.push(*kind),
            Err(why) => {
                println!("skipping {}: {why}", kind.name());
                results.skipped.push((*kind, why));
            }
        }
    }

    if !options.builtin_only {
        for (tool, install) in [
            ("wrk", "bash benches/install-peers.sh (apt-get install wrk)"),
            (
                "h2load",
                "bash benches/install-peers.sh (apt-get install nghttp2-client)",
            ),
            (
                "oha",
                "bash benches/install-peers.sh --with-oha (cargo install oha)",
            ),
        ] {
            if !sys::have(tool) {
                let line = format!(
                    "{tool} missing: the built-in client stands in for it; install with: {install}"
                );
                println!("{line}");
                results.notes.push(line);
            }
        }
    }
    let mut outrigger_max_rps: Option<f64> = None;
    for scenario in &options.scenarios {
        let mut load = scenario.load;
        if let (Some(fraction), Mode::Fixed(_)) = (scenario.rate_of_max, load.mode) {
            match outrigger_max_rps {
                Some(max) => load.mode = Mode::Fixed(((max * fraction) as u64).max(1)),
                None => {
                    println!(
                        "skipping {}: no closed-loop Outrigger result to take a fraction of",
                        scenario.name
                    );
                    continue;
                }
            }
        }
        let tool = load::tool_for(&load, options.builtin_only);
        println!("== {} ({tool})", scenario.name);
        for rep in 0..options.repetitions {
            // Interleaved: A B C A B C, each proxy started fresh.
            for &kind in paths.iter().filter(|k| k.supports(&load)) {
                let run = measure(
                    kind,
                    scenario,
                    &load,
                    tool,
                    rep,
                    &upstream,
                    options,
                    scratch.path(),
                    &certs,
                )
                .await
                .with_context(|| format!("{} through {}", scenario.name, kind.name()))?;
                println!("  {}", report::run_line(&run));
                results.runs.push(run);
            }
        }
        if load.mode == Mode::Closed
            && load.proto == Proto::H1
            && load.request == Request::Small
            && load.connections == 32
        {
            outrigger_max_rps = report::median(
                results
                    .runs
                    .iter()
                    .filter(|r| r.scenario == scenario.name && r.path == PathKind::Outrigger)
                    .map(|r| r.outcome.rps()),
            );
        }
    }
    for kind in paths.iter().filter_map(|k| k.h2_note().map(|n| (k, n))) {
        results.notes.push(format!("{}: {}", kind.0.name(), kind.1));
    }
    if options.memory {
        for &kind in paths.iter().filter(|k| **k != PathKind::Direct) {
            let memory =
                measure_memory(kind, upstream.addr, options, scratch.path(), &certs).await?;
            println!("  memory {}: {}", kind.name(), report::memory_line(&memory));
            results.memory.push(memory);
        }
    }
    if let Some(dir) = &options.out_dir {
        report::write(&results, dir)?;
        println!("wrote {}", dir.join("latest.md").display());
    }
    Ok(results)
}

/// What the report says about the hops' transport.
pub const TRANSPORT: &str = "plaintext for direct, outrigger, nginx, haproxy and pingora; mutual TLS (TLS 1.3, P-256 certificates from a test CA made at the start of the run, both sides verifying the chain) between the two hops of outrigger-mtls, nginx-mtls and haproxy-mtls. The load → first hop and last hop → upstream legs are plaintext everywhere";

/// What the report says about the new-connection scenario.
pub const NEW_CONNECTIONS: &str = "the built-in client opens a new TCP connection for every request (`Connection: close`, read to the end); req/s there is new connections per second, proxy CPU is per 1,000 connections, latency is connect to last byte. Every hop makes a new connection (and, in the -mtls paths, a new TLS handshake between the hops) per client connection: the Outrigger pairs run as opaque TCP (`protocol: tcp`) and HAProxy in `mode tcp` for it, nginx as an HTTP proxy without its keep-alive upstream pool (nginx-light has no stream module). pingora-peer keeps its upstream pool, so only its client leg is new. TLS session resumption is left at each proxy's default";

#[allow(clippy::too_many_arguments)]
async fn measure(
    kind: PathKind,
    scenario: &Scenario,
    load: &Load,
    tool: &'static str,
    repetition: usize,
    upstream: &Upstream,
    options: &Options,
    scratch: &std::path::Path,
    certs: &peers::Certs,
) -> anyhow::Result<Run> {
    let setup = peers::Setup {
        proto: load.proto,
        mode: load.mode,
        pin: options.pin,
        certs,
    };
    let path = peers::start(kind, upstream.addr, setup).await?;
    let upstream_pid = [upstream.child.id()];
    // Warm up: connections made, pools filled, caches hot.
    let warm = Load {
        duration: options.warmup,
        ..*load
    };
    if !options.warmup.is_zero() {
        load::run(
            "builtin",
            path.entry,
            path.host,
            &warm,
            options.pin,
            scratch,
        )
        .await?;
    }
    // Noise: when pinned, whatever ran on CPU 1 besides the path's proxies
    // and the upstream; unpinned, whatever ran anywhere besides everything
    // we know about.
    let noise_cpu = if options.pin { Some(1) } else { None };
    let proxies_before = sys::cpu_time_of(&path.proxy_pids);
    let ours_before = sys::cpu_time(std::process::id());
    let busy_before = sys::busy(noise_cpu);
    let upstream_before = sys::cpu_time_of(&upstream_pid);
    let start = Instant::now();
    let outcome = load::run(tool, path.entry, path.host, load, options.pin, scratch).await?;
    let elapsed = start.elapsed();
    let proxies = sys::cpu_time_of(&path.proxy_pids).saturating_sub(proxies_before);
    let ours = sys::cpu_time(std::process::id()).saturating_sub(ours_before);
    let upstream_cpu = sys::cpu_time_of(&upstream_pid).saturating_sub(upstream_before);
    let busy = sys::busy(noise_cpu).saturating_sub(busy_before);
    let known = if options.pin {
        proxies + upstream_cpu
    } else {
        proxies + ours + upstream_cpu + outcome.tool_cpu
    };
    let other_cores = busy.saturating_sub(known).as_secs_f64() / elapsed.as_secs_f64();
    let spans = path.span_counts().await;
    let requests = outcome.requests.max(1) as f64;
    Ok(Run {
        scenario: scenario.name.clone(),
        path: kind,
        repetition,
        proxy_cpu_ms_per_1k: proxies.as_secs_f64() * 1000.0 / (requests / 1000.0),
        other_cores,
        noisy: other_cores > 0.2,
        rate: match load.mode {
            Mode::Fixed(r) => Some(r),
            Mode::Closed | Mode::NewConnections => None,
        },
        new_connections: load.mode == Mode::NewConnections,
        spans,
        outcome,
    })
}

/// RSS idle, after a short load, and with 1,000 idle client connections.
async fn measure_memory(
    kind: PathKind,
    upstream: SocketAddr,
    options: &Options,
    scratch: &std::path::Path,
    certs: &peers::Certs,
) -> anyhow::Result<Memory> {
    let setup = peers::Setup {
        proto: Proto::H1,
        mode: Mode::Closed,
        pin: options.pin,
        certs,
    };
    let path = peers::start(kind, upstream, setup).await?;
    let rss = |pids: &[u32]| -> (u64, u64) {
        pids.iter()
            .map(|p| sys::memory_kib(*p))
            .fold((0, 0), |a, b| (a.0 + b.0, a.1 + b.1))
    };
    let (idle, _) = rss(&path.proxy_pids);
    let load = Load {
        proto: Proto::H1,
        request: Request::Large,
        mode: Mode::Closed,
        connections: 32,
        streams: 1,
        duration: Duration::from_secs(2),
    };
    load::run(
        "builtin",
        path.entry,
        path.host,
        &load,
        options.pin,
        scratch,
    )
    .await?;
    let (after, hwm) = rss(&path.proxy_pids);
    // 1,000 client connections, each having made one request, then idle.
    let request = format!(
        "GET /bytes?n=100 HTTP/1.1\r\nHost: {}\r\n\r\n",
        path.host.unwrap_or("bench")
    );
    let mut conns = Vec::with_capacity(1000);
    for _ in 0..1000 {
        let mut s = tokio::net::TcpStream::connect(path.entry).await?;
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        s.write_all(request.as_bytes()).await?;
        let mut buf = [0u8; 512];
        let _ = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf)).await;
        conns.push(s);
    }
    let (with_conns, _) = rss(&path.proxy_pids);
    drop(conns);
    Ok(Memory {
        path: kind,
        idle_rss_kib: idle,
        rss_after_load_kib: after,
        hwm_after_load_kib: hwm,
        rss_with_1000_idle_conns_kib: with_conns,
        processes: path.proxy_pids.len(),
    })
}

fn machine_description() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".to_string());
    // Not available_parallelism(): the runner has pinned itself to one CPU.
    let cores = std::fs::read_to_string("/proc/cpuinfo")
        .map(|c| c.lines().filter(|l| l.starts_with("processor")).count())
        .unwrap_or(0);
    format!("{cores} × {cpu}")
}
