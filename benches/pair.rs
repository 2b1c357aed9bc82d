//! Sidecar pair vs direct, in one run (`cargo build --release && cargo bench --bench pair`).
//!
//! HTTP/1.1 load with a fixed number of keep-alive connections, bounded in
//! time, in two modes: closed loop (saturation) and a fixed request rate.
//! Pinning, as a sidecar sees it on a 2-core machine: the load generator on
//! CPU 0; the upstream (a separate process) and both sidecars (one thread
//! each) on CPU 1. Configurations are interleaved (direct, pair, direct,
//! pair, ...) and each sidecar pair is started fresh per repetition. We
//! report the median of the repetitions and every run, and the ratios that
//! matter: added latency and sidecar CPU per 1,000 requests. Absolute
//! numbers on a shared 2-core machine are noise; compare within a run.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use outrigger_e2e::upstream::HttpUpstream;
use outrigger_e2e::{Pair, ProxyBuilder};
use tokio::net::TcpStream;

/// Connections per run; `BENCH_CONNECTIONS` overrides.
fn connections() -> usize {
    std::env::var("BENCH_CONNECTIONS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(8)
}
const RUN: Duration = Duration::from_secs(3);
const WARMUP: Duration = Duration::from_millis(500);
const REPETITIONS: usize = 3;
const MAX_REQUESTS_PER_CONN: usize = 2_000_000;
/// The fixed-rate mode's total request rate (spread over the connections).
/// `BENCH_RPS` overrides.
fn fixed_rps() -> u64 {
    std::env::var("BENCH_RPS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000)
}

struct RunResult {
    requests: usize,
    elapsed: Duration,
    p50_us: f64,
    p99_us: f64,
    /// Sidecar CPU seconds (both processes), if any.
    proxy_cpu: f64,
}

impl RunResult {
    fn rps(&self) -> f64 {
        self.requests as f64 / self.elapsed.as_secs_f64()
    }
    fn cpu_ms_per_1000(&self) -> f64 {
        self.proxy_cpu * 1000.0 / (self.requests as f64 / 1000.0)
    }
}

fn main() {
    if std::env::args().any(|a| a == "--upstream") {
        return serve_upstream();
    }
    pin_self_to_cpu0();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(bench());
}

async fn bench() {
    let (_upstream, app_addr) = spawn_upstream();
    let app = Upstream { addr: app_addr };
    for (mode, rate) in [
        ("saturation (closed loop)", None),
        ("fixed rate", Some(fixed_rps())),
    ] {
        println!(
            "== {mode}{}",
            rate.map(|r| format!(" {r} req/s")).unwrap_or_default()
        );
        let mut direct = Vec::new();
        let mut pair = Vec::new();
        for rep in 0..REPETITIONS {
            let d = load(app.addr, &[], rate).await;
            println!("rep {rep} direct: {}", line(&d));
            direct.push(d);

            let pin = |b: ProxyBuilder| b.wrap(&["taskset", "-c", "1"]).arg("--log").arg("warn");
            let mesh = Pair::start_custom(app.addr, "http", "", pin, pin).await;
            let pids = [mesh.client.pid(), mesh.server.pid()];
            let p = load(mesh.outbound, &pids, rate).await;
            println!("rep {rep} pair:   {}", line(&p));
            pair.push(p);
        }
        report(&direct, &pair);
    }
}

fn report(direct: &[RunResult], pair: &[RunResult]) {
    let med = |v: &[RunResult], f: fn(&RunResult) -> f64| {
        let mut xs: Vec<f64> = v.iter().map(f).collect();
        xs.sort_by(f64::total_cmp);
        xs[xs.len() / 2]
    };
    let (d50, d99, drps) = (
        med(direct, |r| r.p50_us),
        med(direct, |r| r.p99_us),
        med(direct, RunResult::rps),
    );
    let (p50, p99, prps) = (
        med(pair, |r| r.p50_us),
        med(pair, |r| r.p99_us),
        med(pair, RunResult::rps),
    );
    let cpu = med(pair, RunResult::cpu_ms_per_1000);
    println!(
        "median of {REPETITIONS}, {} connections, {RUN:?} per run:",
        connections()
    );
    println!("  direct       p50 {d50:8.1} µs  p99 {d99:8.1} µs  {drps:9.0} req/s");
    println!("  sidecar pair p50 {p50:8.1} µs  p99 {p99:8.1} µs  {prps:9.0} req/s");
    println!(
        "  added latency (pair - direct): p50 +{:.1} µs, p99 +{:.1} µs",
        p50 - d50,
        p99 - d99
    );
    println!("  throughput ratio pair/direct: {:.2}", prps / drps);
    println!(
        "  sidecar CPU per 1,000 requests (two hops): {cpu:.1} ms, {:.1} ms per hop\n",
        cpu / 2.0
    );
}

fn line(r: &RunResult) -> String {
    format!(
        "{:7} req in {:.2}s = {:8.0} req/s, p50 {:7.1} µs, p99 {:7.1} µs, sidecar CPU {:.1} ms/1k req",
        r.requests,
        r.elapsed.as_secs_f64(),
        r.rps(),
        r.p50_us,
        r.p99_us,
        r.cpu_ms_per_1000()
    )
}

/// Runs the closed loop against `addr`; `pids` are processes whose CPU
/// time is charged to the run.
async fn load(addr: SocketAddr, pids: &[u32], rate: Option<u64>) -> RunResult {
    // Warm up: connections made, pools filled.
    drive(addr, WARMUP, rate).await;
    let cpu_before: f64 = pids.iter().map(|p| cpu_seconds(*p)).sum();
    let start = Instant::now();
    let mut latencies = drive(addr, RUN, rate).await;
    let elapsed = start.elapsed();
    let cpu_after: f64 = pids.iter().map(|p| cpu_seconds(*p)).sum();
    latencies.sort_unstable();
    let pct = |q: f64| {
        let i = ((latencies.len() as f64 * q) as usize).min(latencies.len().saturating_sub(1));
        latencies.get(i).copied().unwrap_or_default().as_secs_f64() * 1e6
    };
    RunResult {
        requests: latencies.len(),
        elapsed,
        p50_us: pct(0.50),
        p99_us: pct(0.99),
        proxy_cpu: cpu_after - cpu_before,
    }
}

/// Closed loop when `rate` is `None`; otherwise each connection sends on a
/// fixed schedule (rate / CONNECTIONS per second).
async fn drive(addr: SocketAddr, run: Duration, rate: Option<u64>) -> Vec<Duration> {
    let deadline = Instant::now() + run;
    let interval = rate.map(|r| Duration::from_secs_f64(connections() as f64 / r as f64));
    let mut tasks = Vec::new();
    for _ in 0..connections() {
        tasks.push(tokio::spawn(async move {
            let stream = TcpStream::connect(addr).await.expect("connect");
            stream.set_nodelay(true).expect("nodelay");
            let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
                .await
                .expect("handshake");
            tokio::spawn(conn);
            let mut latencies = Vec::with_capacity(100_000);
            let mut ticker = interval.map(|i| {
                let mut t = tokio::time::interval(i);
                t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                t
            });
            for _ in 0..MAX_REQUESTS_PER_CONN {
                if let Some(t) = ticker.as_mut() {
                    t.tick().await;
                }
                if Instant::now() >= deadline {
                    break;
                }
                let req = http::Request::get("/status?code=200")
                    .header("host", "bench")
                    .body(Empty::<Bytes>::new())
                    .expect("request");
                let start = Instant::now();
                let rsp = send.send_request(req).await.expect("response");
                assert_eq!(rsp.status(), 200);
                rsp.into_body().collect().await.expect("body");
                latencies.push(start.elapsed());
            }
            latencies
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.expect("join"));
    }
    all
}

/// CPU time a process has used, in seconds, from `/proc/<pid>/schedstat`
/// (the scheduler's nanosecond run time; the tick-sampled utime/stime in
/// `/proc/<pid>/stat` is biased when work is driven by timers, as it is at
/// a fixed request rate).
fn cpu_seconds(pid: u32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/schedstat"))
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse::<f64>().ok())
        .map(|ns| ns / 1e9)
        .unwrap_or(0.0)
}

struct Upstream {
    addr: SocketAddr,
}

/// The upstream runs as its own process (this binary with `--upstream`),
/// pinned to CPU 1 beside the sidecars, so the direct baseline pays for
/// crossing processes just like the sidecar path does.
fn spawn_upstream() -> (KillOnDrop, SocketAddr) {
    use std::io::BufRead;
    let exe = std::env::current_exe().expect("current exe");
    let mut child = std::process::Command::new("taskset")
        .args(["-c", "1"])
        .arg(exe)
        .arg("--upstream")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("spawn upstream");
    let stdout = child.stdout.take().expect("stdout");
    let mut line = String::new();
    std::io::BufReader::new(stdout)
        .read_line(&mut line)
        .expect("upstream address");
    let addr = line.trim().parse().expect("upstream address");
    (KillOnDrop(child), addr)
}

struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `--upstream`: serve the test app on one thread until stdin closes.
fn serve_upstream() {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    // Exit when the parent goes away (stdin closes).
    std::thread::spawn(|| {
        let mut buf = [0u8; 1];
        let _ = std::io::Read::read(&mut std::io::stdin(), &mut buf);
        std::process::exit(0);
    });
    runtime.block_on(async {
        let app = HttpUpstream::start("bench").await;
        println!("{}", app.addr);
        std::future::pending::<()>().await;
    });
}

/// Moves every thread of this process to CPU 0 (before the runtime starts
/// its threads, so they inherit it).
fn pin_self_to_cpu0() {
    let pid = std::process::id().to_string();
    let ok = std::process::Command::new("taskset")
        .args(["-a", "-p", "-c", "0", &pid])
        .stdout(std::process::Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if !ok {
        eprintln!("warning: could not pin the load generator to CPU 0 (taskset missing?)");
    }
}
