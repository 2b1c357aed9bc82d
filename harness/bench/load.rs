//! Load generators: wrk (HTTP/1.1 closed loop), h2load (HTTP/2 closed
//! loop), oha (open loop at a fixed rate, with latency correction against
//! coordinated omission), and a built-in hyper client used for smoke runs
//! and whenever a tool is missing.

use std::net::SocketAddr;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde::Serialize;
use tokio::net::TcpStream;

/// HTTP version on the wire from the load tool.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum Proto {
    #[serde(rename = "http/1.1")]
    H1,
    #[serde(rename = "h2c")]
    H2,
}

/// What each request asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum Request {
    /// GET of a ~100-byte response.
    #[serde(rename = "GET 100B")]
    Small,
    /// GET of a 16 KiB response.
    #[serde(rename = "GET 16KiB")]
    Large,
    /// POST of a 1 KiB body, echoed back.
    #[serde(rename = "POST 1KiB")]
    Post,
}

impl Request {
    pub fn path(self) -> &'static str {
        match self {
            Request::Small => "/bytes?n=100",
            Request::Large => "/bytes?n=16384",
            Request::Post => "/echo",
        }
    }
}

pub const POST_BODY_LEN: usize = 1024;

/// How the load is applied.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub enum Mode {
    /// As fast as the connections allow (throughput, CPU per request).
    Closed,
    /// A fixed total rate in requests per second (latency).
    Fixed(u64),
    /// Closed loop with one request per new TCP connection from the client
    /// (`Connection: close`), so the path's hops make new connections too
    /// (see `peers`): requests per second are new connections per second.
    /// Built-in client only, HTTP/1.1 only.
    NewConnections,
}

#[derive(Clone, Copy, Debug, Serialize)]
pub struct Load {
    pub proto: Proto,
    pub request: Request,
    pub mode: Mode,
    pub connections: usize,
    /// HTTP/2 streams in flight per connection (h2load `-m`).
    pub streams: usize,
    #[serde(skip)]
    pub duration: Duration,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct Latency {
    pub p50_us: f64,
    pub p90_us: f64,
    pub p99_us: f64,
    /// Not every tool reports it.
    pub p999_us: Option<f64>,
}

#[derive(Clone, Debug, Serialize)]
pub struct Outcome {
    pub tool: &'static str,
    pub requests: u64,
    pub errors: u64,
    pub seconds: f64,
    /// h2load reports only a mean.
    pub latency: Option<Latency>,
    pub mean_us: Option<f64>,
    /// The load tool's own process, to leave out of "other" CPU.
    #[serde(skip)]
    pub tool_cpu: Duration,
}

impl Outcome {
    pub fn rps(&self) -> f64 {
        self.requests as f64 / self.seconds.max(1e-9)
    }
}

/// Picks the tool for a load: the external one when present (and not a
/// smoke run), else the built-in client.
pub fn tool_for(load: &Load, builtin_only: bool) -> &'static str {
    let wanted = match (load.mode, load.proto) {
        (Mode::NewConnections, _) => return "builtin",
        (Mode::Fixed(_), _) => "oha",
        (Mode::Closed, Proto::H1) => "wrk",
        (Mode::Closed, Proto::H2) => "h2load",
    };
    if !builtin_only && super::sys::have(wanted) {
        wanted
    } else {
        "builtin"
    }
}

/// Runs one load against `addr`, on CPU 0 when `pin` is set. `host`, when
/// given, is sent as the `Host` (HTTP/1.1) or `:authority` (HTTP/2)
/// instead of `addr`; the connections still go to `addr`.
pub async fn run(
    tool: &'static str,
    addr: SocketAddr,
    host: Option<&str>,
    load: &Load,
    pin: bool,
    scratch: &std::path::Path,
) -> anyhow::Result<Outcome> {
    match tool {
        "wrk" => {
            external(
                tool,
                wrk_command(addr, host, load, scratch)?,
                pin,
                parse_wrk,
            )
            .await
        }
        "h2load" => {
            external(
                tool,
                h2load_command(addr, host, load, scratch)?,
                pin,
                parse_h2load,
            )
            .await
        }
        "oha" => {
            external(
                tool,
                oha_command(addr, host, load, scratch)?,
                pin,
                parse_oha,
            )
            .await
        }
        _ => builtin(addr, host, load).await,
    }
}

fn url(addr: SocketAddr, load: &Load) -> String {
    format!("http://{addr}{}", load.request.path())
}

fn post_body_file(scratch: &std::path::Path) -> anyhow::Result<std::path::PathBuf> {
    let path = scratch.join("post-1k.bin");
    if !path.exists() {
        std::fs::write(&path, vec![b'p'; POST_BODY_LEN])?;
    }
    Ok(path)
}

fn wrk_command(
    addr: SocketAddr,
    host: Option<&str>,
    load: &Load,
    scratch: &std::path::Path,
) -> anyhow::Result<Vec<String>> {
    let mut cmd = vec![
        "wrk".to_string(),
        "-t1".into(),
        format!("-c{}", load.connections),
        format!("-d{}s", load.duration.as_secs().max(1)),
        "--latency".into(),
    ];
    if load.request == Request::Post {
        let script = scratch.join("post.lua");
        std::fs::write(
            &script,
            format!(
                "wrk.method = \"POST\"\nwrk.body = string.rep(\"p\", {POST_BODY_LEN})\nwrk.headers[\"Content-Type\"] = \"application/octet-stream\"\n"
            ),
        )?;
        cmd.push("-s".into());
        cmd.push(script.display().to_string());
    }
    if let Some(host) = host {
        // wrk sends the URL's host:port unless a Host header is given.
        cmd.push("-H".into());
        cmd.push(format!("Host: {host}"));
    }
    cmd.push(url(addr, load));
    Ok(cmd)
}

fn h2load_command(
    addr: SocketAddr,
    host: Option<&str>,
    load: &Load,
    scratch: &std::path::Path,
) -> anyhow::Result<Vec<String>> {
    let mut cmd = vec![
        "h2load".to_string(),
        format!("-c{}", load.connections),
        format!("-m{}", load.streams.max(1)),
        "-D".into(),
        load.duration.as_secs().max(1).to_string(),
    ];
    if load.request == Request::Post {
        cmd.push("-d".into());
        cmd.push(post_body_file(scratch)?.display().to_string());
    }
    if let Some(host) = host {
        // h2load overrides its :authority (Host over HTTP/1.1) this way.
        cmd.push("-H".into());
        cmd.push(format!(":authority: {host}"));
    }
    cmd.push(url(addr, load));
    Ok(cmd)
}

fn oha_command(
    addr: SocketAddr,
    host: Option<&str>,
    load: &Load,
    scratch: &std::path::Path,
) -> anyhow::Result<Vec<String>> {
    let Mode::Fixed(rps) = load.mode else {
        bail!("oha is used for fixed-rate loads only");
    };
    let mut cmd = vec![
        "oha".to_string(),
        "--no-tui".into(),
        "--output-format".into(),
        "json".into(),
        "-z".into(),
        format!("{}s", load.duration.as_secs().max(1)),
        "-q".into(),
        rps.to_string(),
        "--latency-correction".into(),
        "-c".into(),
        load.connections.to_string(),
    ];
    if load.proto == Proto::H2 {
        cmd.push("--http2".into());
    }
    if load.request == Request::Post {
        cmd.push("-m".into());
        cmd.push("POST".into());
        cmd.push("-D".into());
        cmd.push(post_body_file(scratch)?.display().to_string());
    }
    if let Some(host) = host {
        cmd.push("--host".into());
        cmd.push(host.to_string());
    }
    cmd.push(url(addr, load));
    Ok(cmd)
}

async fn external(
    tool: &'static str,
    argv: Vec<String>,
    pin: bool,
    parse: fn(&str) -> anyhow::Result<Outcome>,
) -> anyhow::Result<Outcome> {
    let mut cmd = if pin {
        let mut c = Command::new("taskset");
        c.args(["-c", "0"]).args(&argv);
        c
    } else {
        let mut c = Command::new(&argv[0]);
        c.args(&argv[1..]);
        c
    };
    let child = cmd
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .with_context(|| format!("cannot run {}", argv.join(" ")))?;
    let pid = child.id();
    // Sample the tool's CPU while it runs (it is gone once it exits).
    let sampler = tokio::spawn(async move {
        let mut last = Duration::ZERO;
        loop {
            let now = super::sys::cpu_time(pid);
            if now.is_zero() && !last.is_zero() {
                return last;
            }
            last = last.max(now);
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
    let output = tokio::task::spawn_blocking(move || child.wait_with_output())
        .await
        .context("join")??;
    sampler.abort();
    let text = String::from_utf8_lossy(&output.stdout).into_owned();
    if !output.status.success() {
        bail!(
            "{tool} failed ({}): {}{}",
            output.status,
            text,
            String::from_utf8_lossy(&output.stderr)
        );
    }
    let mut outcome =
        parse(&text).with_context(|| format!("cannot read {tool} output:\n{text}"))?;
    outcome.tool = tool;
    Ok(outcome)
}

/// "4.19ms" / "812.00us" / "1.2s" → microseconds.
fn duration_us(s: &str) -> Option<f64> {
    let s = s.trim();
    let (num, mult) = if let Some(n) = s.strip_suffix("us") {
        (n, 1.0)
    } else if let Some(n) = s.strip_suffix("ms") {
        (n, 1e3)
    } else if let Some(n) = s.strip_suffix('s') {
        (n, 1e6)
    } else {
        return None;
    };
    num.trim().parse::<f64>().ok().map(|v| v * mult)
}

fn parse_wrk(text: &str) -> anyhow::Result<Outcome> {
    let mut requests = None;
    let mut seconds = None;
    let mut errors = 0u64;
    let mut pct = std::collections::HashMap::new();
    for line in text.lines().map(str::trim) {
        if let Some((n, rest)) = line.split_once(" requests in ") {
            requests = n.trim().parse::<u64>().ok();
            seconds = rest
                .split(',')
                .next()
                .and_then(duration_us)
                .map(|us| us / 1e6);
        } else if let Some(rest) = line.strip_prefix("Non-2xx or 3xx responses:") {
            errors += rest.trim().parse::<u64>().unwrap_or(0);
        } else if let Some(rest) = line.strip_prefix("Socket errors:") {
            errors += rest
                .split(',')
                .filter_map(|kv| kv.split_whitespace().last()?.parse::<u64>().ok())
                .sum::<u64>();
        } else if let Some((p, v)) = line.split_once('%')
            && let (Ok(p), Some(v)) = (p.trim().parse::<u32>(), duration_us(v))
        {
            pct.insert(p, v);
        }
    }
    let (Some(requests), Some(seconds)) = (requests, seconds) else {
        bail!("no request count");
    };
    Ok(Outcome {
        tool: "wrk",
        requests,
        errors,
        seconds,
        latency: Some(Latency {
            p50_us: pct.get(&50).copied().unwrap_or_default(),
            p90_us: pct.get(&90).copied().unwrap_or_default(),
            p99_us: pct.get(&99).copied().unwrap_or_default(),
            p999_us: None,
        }),
        mean_us: None,
        tool_cpu: Duration::ZERO,
    })
}

fn parse_h2load(text: &str) -> anyhow::Result<Outcome> {
    let mut seconds = None;
    let mut succeeded = None;
    let mut errors = 0u64;
    let mut mean_us = None;
    for line in text.lines().map(str::trim) {
        if let Some(rest) = line.strip_prefix("finished in ") {
            seconds = rest
                .split(',')
                .next()
                .and_then(duration_us)
                .map(|us| us / 1e6);
        } else if let Some(rest) = line.strip_prefix("requests:") {
            for part in rest.split(',') {
                let mut words = part.split_whitespace();
                let (Some(n), Some(what)) = (words.next(), words.next()) else {
                    continue;
                };
                let n = n.parse::<u64>().unwrap_or(0);
                match what {
                    "succeeded" => succeeded = Some(n),
                    "failed" | "errored" | "timeout" => errors += n,
                    _ => {}
                }
            }
        } else if let Some(rest) = line.strip_prefix("status codes:") {
            // 4xx and 5xx count as errors too.
            for part in rest.split(',') {
                let mut words = part.split_whitespace();
                if let (Some(n), Some(class)) = (words.next(), words.next())
                    && (class == "4xx" || class == "5xx")
                {
                    errors += n.parse::<u64>().unwrap_or(0);
                }
            }
        } else if let Some(rest) = line.strip_prefix("time for request:") {
            mean_us = rest.split_whitespace().nth(2).and_then(duration_us);
        }
    }
    let (Some(requests), Some(seconds)) = (succeeded, seconds) else {
        bail!("no request count");
    };
    Ok(Outcome {
        tool: "h2load",
        requests,
        errors,
        seconds,
        latency: None,
        mean_us,
        tool_cpu: Duration::ZERO,
    })
}

fn parse_oha(text: &str) -> anyhow::Result<Outcome> {
    let v: serde_json::Value = serde_json::from_str(text)?;
    let summary = &v["summary"];
    let seconds = summary["total"].as_f64().context("summary.total")?;
    let codes = v["statusCodeDistribution"].as_object();
    let ok: u64 = codes
        .map(|m| {
            m.iter()
                .filter(|(code, _)| code.starts_with('2'))
                .filter_map(|(_, n)| n.as_u64())
                .sum()
        })
        .unwrap_or(0);
    let all: u64 = codes
        .map(|m| m.values().filter_map(|n| n.as_u64()).sum())
        .unwrap_or(0);
    // Requests still in flight when the run's time is up are aborted by oha
    // itself ("aborted due to deadline"): not the server's fault.
    let transport_errors: u64 = v["errorDistribution"]
        .as_object()
        .map(|m| {
            m.iter()
                .filter(|(what, _)| !what.contains("deadline"))
                .filter_map(|(_, n)| n.as_u64())
                .sum()
        })
        .unwrap_or(0);
    let pct = |key: &str| v["latencyPercentiles"][key].as_f64().map(|s| s * 1e6);
    Ok(Outcome {
        tool: "oha",
        requests: ok,
        errors: all - ok + transport_errors,
        seconds,
        latency: Some(Latency {
            p50_us: pct("p50").unwrap_or_default(),
            p90_us: pct("p90").unwrap_or_default(),
            p99_us: pct("p99").unwrap_or_default(),
            p999_us: pct("p99.9"),
        }),
        mean_us: summary["average"].as_f64().map(|s| s * 1e6),
        tool_cpu: Duration::ZERO,
    })
}

/// The built-in client: hyper over `connections` connections, closed loop
/// or paced; every request checked for a 2xx and a full body. For
/// [`Mode::NewConnections`], `connections` loops that each connect, send
/// one request and read the answer to the end. Requests name `host`, or
/// else `addr`.
async fn builtin(addr: SocketAddr, host: Option<&str>, load: &Load) -> anyhow::Result<Outcome> {
    let authority = host.map_or_else(|| addr.to_string(), str::to_string);
    let start = Instant::now();
    let deadline = start + load.duration;
    let interval = match load.mode {
        Mode::Fixed(rps) => Some(Duration::from_secs_f64(
            load.connections as f64 / rps.max(1) as f64,
        )),
        Mode::Closed | Mode::NewConnections => None,
    };
    let mut tasks = Vec::new();
    for _ in 0..load.connections {
        let load = *load;
        let authority = authority.clone();
        tasks.push(tokio::spawn(async move {
            if load.mode == Mode::NewConnections {
                builtin_new_connections(addr, &authority, load, deadline).await
            } else {
                builtin_connection(addr, &authority, load, deadline, interval).await
            }
        }));
    }
    let mut latencies = Vec::new();
    let mut errors = 0u64;
    for task in tasks {
        let (lat, errs) = task.await.context("join")??;
        latencies.extend(lat);
        errors += errs;
    }
    let seconds = start.elapsed().as_secs_f64();
    latencies.sort_unstable();
    let pct = |q: f64| {
        let i = ((latencies.len() as f64 * q) as usize).min(latencies.len().saturating_sub(1));
        latencies
            .get(i)
            .map(|d| d.as_secs_f64() * 1e6)
            .unwrap_or_default()
    };
    Ok(Outcome {
        tool: "builtin",
        requests: latencies.len() as u64,
        errors,
        seconds,
        latency: Some(Latency {
            p50_us: pct(0.5),
            p90_us: pct(0.9),
            p99_us: pct(0.99),
            p999_us: Some(pct(0.999)),
        }),
        mean_us: None,
        tool_cpu: Duration::ZERO,
    })
}

/// One loop of [`Mode::NewConnections`]: connect, one GET with
/// `Connection: close`, read until the path closes, check for a 200;
/// bounded by the deadline and a count. The latency recorded is from the
/// connect to the end of the answer.
async fn builtin_new_connections(
    addr: SocketAddr,
    authority: &str,
    load: Load,
    deadline: Instant,
) -> anyhow::Result<(Vec<Duration>, u64)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let request = format!(
        "GET {} HTTP/1.1\r\nHost: {authority}\r\nConnection: close\r\n\r\n",
        load.request.path()
    );
    let mut latencies = Vec::new();
    let mut errors = 0u64;
    let mut buf = Vec::with_capacity(4096);
    for _ in 0..1_000_000u64 {
        if Instant::now() >= deadline {
            break;
        }
        let start = Instant::now();
        buf.clear();
        let exchange = async {
            let mut stream = TcpStream::connect(addr).await?;
            stream.set_nodelay(true)?;
            stream.write_all(request.as_bytes()).await?;
            stream.read_to_end(&mut buf).await?;
            anyhow::Ok(())
        };
        let ok = match tokio::time::timeout(Duration::from_secs(5), exchange).await {
            Ok(Ok(())) if buf.starts_with(b"HTTP/1.1 200") => true,
            Ok(Ok(())) => {
                let head = String::from_utf8_lossy(&buf[..buf.len().min(80)]).into_owned();
                eprintln!("builtin client: {addr}: new connection answered {head:?}");
                false
            }
            Ok(Err(e)) => {
                eprintln!("builtin client: {addr}: new connection: {e:#}");
                false
            }
            Err(_) => {
                eprintln!("builtin client: {addr}: new connection timed out");
                false
            }
        };
        if ok {
            latencies.push(start.elapsed());
        } else {
            errors += 1;
            // One failed connection does not end the loop, many do.
            if errors >= 10 {
                break;
            }
        }
    }
    Ok((latencies, errors))
}

async fn builtin_connection(
    addr: SocketAddr,
    authority: &str,
    load: Load,
    deadline: Instant,
    interval: Option<Duration>,
) -> anyhow::Result<(Vec<Duration>, u64)> {
    let stream = TcpStream::connect(addr).await?;
    stream.set_nodelay(true)?;
    let io = TokioIo::new(stream);
    let mut latencies = Vec::new();
    let mut errors = 0u64;
    let mut ticker = interval.map(|i| {
        let mut t = tokio::time::interval(i);
        t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        t
    });
    let body = match load.request {
        Request::Post => Bytes::from(vec![b'p'; POST_BODY_LEN]),
        _ => Bytes::new(),
    };
    let method = if load.request == Request::Post {
        "POST"
    } else {
        "GET"
    };
    macro_rules! run_loop {
        ($send:expr) => {
            // Bounded by the deadline and by a count, whichever comes first.
            for _ in 0..10_000_000u64 {
                if Instant::now() >= deadline {
                    break;
                }
                if let Some(t) = ticker.as_mut() {
                    t.tick().await;
                }
                // HTTP/1.1: origin-form plus Host; HTTP/2: the authority
                // travels in the URI (a Host header beside it is refused by
                // some servers).
                let req = match load.proto {
                    Proto::H1 => http::Request::builder()
                        .uri(load.request.path())
                        .header("host", authority),
                    Proto::H2 => http::Request::builder()
                        .uri(format!("http://{authority}{}", load.request.path())),
                }
                .method(method)
                .body(Full::new(body.clone()))?;
                let start = Instant::now();
                let ok = match $send.send_request(req).await {
                    Ok(rsp) => {
                        let status = rsp.status();
                        let body = rsp.into_body().collect().await;
                        if !status.is_success() || body.is_err() {
                            eprintln!(
                                "builtin client: {addr}: status {status}, body {:?}",
                                body.err()
                            );
                        }
                        status.is_success()
                    }
                    Err(e) => {
                        eprintln!("builtin client: {addr}: {e:?}");
                        false
                    }
                };
                if ok {
                    latencies.push(start.elapsed());
                } else {
                    errors += 1;
                    break;
                }
            }
        };
    }
    match load.proto {
        Proto::H1 => {
            let (mut send, conn) = hyper::client::conn::http1::handshake(io).await?;
            tokio::spawn(conn);
            run_loop!(send);
        }
        Proto::H2 => {
            let (mut send, conn) =
                hyper::client::conn::http2::handshake(TokioExecutor::new(), io).await?;
            tokio::spawn(conn);
            run_loop!(send);
        }
    }
    Ok((latencies, errors))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_wrk() {
        let out = "Running 1s test @ http://x/\n  1 threads and 2 connections\n  Latency Distribution\n     50%    4.19ms\n     75%    7.60ms\n     90%    9.70ms\n     99%   19.03ms\n  430 requests in 1.00s, 82.91KB read\n  Non-2xx or 3xx responses: 3\nRequests/sec:    428.76\n";
        let o = parse_wrk(out).expect("parse");
        assert_eq!(o.requests, 430);
        assert_eq!(o.errors, 3);
        assert!((o.seconds - 1.0).abs() < 1e-9);
        let l = o.latency.expect("latency");
        assert!((l.p50_us - 4190.0).abs() < 1e-6 && (l.p99_us - 19030.0).abs() < 1e-6);
    }

    fn load(proto: Proto, mode: Mode) -> Load {
        Load {
            proto,
            request: Request::Small,
            mode,
            connections: 32,
            streams: 1,
            duration: Duration::from_secs(10),
        }
    }

    #[test]
    fn a_host_override_reaches_every_tool_and_only_when_given() {
        let addr = SocketAddr::from(([127, 0, 0, 1], 8080));
        let scratch = std::env::temp_dir();
        let h1 = load(Proto::H1, Mode::Closed);
        let h2 = load(Proto::H2, Mode::Closed);
        let fixed = load(Proto::H1, Mode::Fixed(1000));
        let url = "http://127.0.0.1:8080/bytes?n=100".to_string();
        let wrk = |host| wrk_command(addr, host, &h1, &scratch).expect("wrk argv");
        let h2load = |host| h2load_command(addr, host, &h2, &scratch).expect("h2load argv");
        let oha = |host| oha_command(addr, host, &fixed, &scratch).expect("oha argv");
        // Without one, the argv is what it always was: the URL last, no
        // header.
        assert_eq!(
            wrk(None),
            ["wrk", "-t1", "-c32", "-d10s", "--latency", &url]
        );
        assert_eq!(h2load(None), ["h2load", "-c32", "-m1", "-D", "10", &url]);
        assert!(!oha(None).iter().any(|a| a == "--host"));
        let with = |argv: Vec<String>, flag: &str, value: &str| {
            let n = argv.len();
            assert_eq!(argv[n - 3..], [flag, value, url.as_str()], "{argv:?}");
        };
        with(wrk(Some("api.shop")), "-H", "Host: api.shop");
        with(h2load(Some("api.shop")), "-H", ":authority: api.shop");
        with(oha(Some("api.shop")), "--host", "api.shop");
    }

    #[test]
    fn reads_h2load() {
        let out = "finished in 10.00s, 51234.50 req/s, 8.1MB/s\nrequests: 512345 total, 512377 started, 512345 done, 512340 succeeded, 5 failed, 0 errored, 0 timeout\nstatus codes: 512340 2xx, 0 3xx, 0 4xx, 2 5xx\ntime for request:      112us     20.11ms       602us       201us    93.11%\n";
        let o = parse_h2load(out).expect("parse");
        assert_eq!(o.requests, 512340);
        assert_eq!(o.errors, 7);
        assert_eq!(o.mean_us, Some(602.0));
    }
}
