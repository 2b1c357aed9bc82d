//! `outrigger demo`: a small mesh on loopback, narrated.
//!
//! Two sample apps (`web` is only a client here, `api` a server), each with
//! a real `outrigger-proxy` sidecar process, configured from a standalone
//! mesh file. The demo sends a few requests through the sidecars, shows
//! what each one proves, prints a summary, shuts the sidecars down with
//! SIGTERM, and exits 0 only if every step did what it should.

use std::convert::Infallible;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use bytes::Bytes;
use http::{Request, Response, StatusCode, Version};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;

/// A sidecar process and what it reported at start.
struct Sidecar {
    name: &'static str,
    child: Child,
    admin: SocketAddr,
    listeners: serde_json::Value,
}

impl Sidecar {
    fn listener(&self, name: &str) -> anyhow::Result<SocketAddr> {
        self.listeners
            .as_array()
            .and_then(|ls| ls.iter().find(|l| l["name"] == name))
            .and_then(|l| l["addr"].as_str())
            .with_context(|| format!("{} sidecar has no listener {name}", self.name))?
            .parse()
            .context("listener address")
    }
}

impl Drop for Sidecar {
    fn drop(&mut self) {
        // Only reached on an error path: the happy path waits for exit.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

struct Step {
    what: &'static str,
    ok: bool,
    detail: String,
}

pub async fn run(dir: Option<PathBuf>) -> anyhow::Result<()> {
    let (dir, remove_after) = match dir {
        Some(d) => (d, false),
        None => (
            std::env::temp_dir().join(format!("outrigger-demo-{}", std::process::id())),
            true,
        ),
    };
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let result = run_in(&dir).await;
    if remove_after {
        let _ = std::fs::remove_dir_all(&dir);
    }
    result
}

async fn run_in(dir: &Path) -> anyhow::Result<()> {
    let proxy_bin = proxy_binary()?;
    println!(
        "Outrigger demo: a two-sidecar mesh on loopback (standalone file config, plaintext between sidecars)\n"
    );

    let api_app = start_api_app().await?;
    println!("  api app        listening on {api_app}");

    // The api sidecar first: its inbound port (any free one) becomes the
    // endpoint of service shop/api in the web sidecar's configuration.
    let api_yaml = dir.join("api-sidecar.yaml");
    std::fs::write(&api_yaml, api_config(api_app.port()))?;
    let api = start_sidecar(&proxy_bin, "api", &api_yaml, "shop/api", dir)?;
    let api_inbound = api.listener("inbound/http")?;
    println!(
        "  api sidecar    inbound {api_inbound} → app {api_app}   (admin {})",
        api.admin
    );

    let unreachable = {
        let l = TcpListener::bind("127.0.0.1:0").await?;
        l.local_addr()?
    };
    let web_yaml = dir.join("web-sidecar.yaml");
    std::fs::write(&web_yaml, web_config(api_inbound, unreachable))?;
    let web = start_sidecar(&proxy_bin, "web", &web_yaml, "shop/web", dir)?;
    let to_api = web.listener("outbound/shop/api")?;
    let to_billing = web.listener("outbound/shop/billing")?;
    println!(
        "  web sidecar    outbound {to_api} → service shop/api, {to_billing} → service shop/billing (admin {})",
        web.admin
    );
    println!(
        "\n  configuration and sidecar logs: {} (kept only with --dir)\n",
        dir.display()
    );

    let h1: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let h2: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build_http();
    let mut steps = Vec::new();

    // 1. HTTP/1.1 through both sidecars, with a spoofed identity header.
    let req = Request::get(format!("http://{to_api}/hello"))
        .header("x-outrigger-client-id", "spiffe://attacker/ns/x/sa/spoofed")
        .body(Full::new(Bytes::new()))?;
    let (status, body) = send(&h1, req).await?;
    let seen: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
    steps.push(Step {
        what: "HTTP/1.1 web → api through two sidecars",
        ok: status == StatusCode::OK && seen["version"] == "HTTP/1.1",
        detail: format!(
            "{status}, app saw x-forwarded-for: {}",
            seen["xForwardedFor"]
        ),
    });
    steps.push(Step {
        what: "spoofed x-outrigger-client-id stripped",
        ok: status == StatusCode::OK && seen["clientId"].is_null(),
        detail: format!("app saw x-outrigger-client-id: {}", seen["clientId"]),
    });

    // 2. HTTP/2 (h2c prior knowledge) stays HTTP/2 end to end.
    let req = Request::get(format!("http://{to_api}/hello")).body(Full::new(Bytes::new()))?;
    let (status, body) = send(&h2, req).await?;
    let seen: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
    steps.push(Step {
        what: "HTTP/2 web → api, still HTTP/2 at the app",
        ok: status == StatusCode::OK && seen["version"] == "HTTP/2.0",
        detail: format!("{status}, app saw {}", seen["version"]),
    });

    // 3. A slow answer hits the 500ms request timeout in the TrafficPolicy.
    let start = Instant::now();
    let req = Request::get(format!("http://{to_api}/slow")).body(Full::new(Bytes::new()))?;
    let (status, body) = send(&h1, req).await?;
    steps.push(Step {
        what: "slow upstream → 504 from the request timeout",
        ok: status == StatusCode::GATEWAY_TIMEOUT,
        detail: format!(
            "{status} after {:?}: {}",
            start.elapsed(),
            first_line(&body)
        ),
    });

    // 4. A service whose endpoint is down.
    let req = Request::get(format!("http://{to_billing}/")).body(Full::new(Bytes::new()))?;
    let (status, body) = send(&h1, req).await?;
    steps.push(Step {
        what: "unreachable service → 502 naming it",
        ok: status == StatusCode::BAD_GATEWAY,
        detail: format!("{status}: {}", first_line(&body)),
    });

    // 5. The sidecar counted all of it.
    let req =
        Request::get(format!("http://{}/metrics", web.admin)).body(Full::new(Bytes::new()))?;
    let (_, metrics) = send(&h1, req).await?;
    let metrics = String::from_utf8_lossy(&metrics);
    let mut counted: Vec<String> = metrics
        .lines()
        .filter(|l| l.starts_with("outrigger_requests_total{direction=\"outbound\""))
        .filter(|l| !l.ends_with(" 0"))
        .map(|l| l.replace("outrigger_requests_total", "      "))
        .collect();
    counted.sort();
    steps.push(Step {
        what: "web sidecar /metrics counted the requests",
        ok: counted.len() >= 3,
        detail: format!("\n{}", counted.join("\n")),
    });

    // 6. Graceful shutdown.
    let mut exits = Vec::new();
    for sidecar in [web, api] {
        exits.push((sidecar.name, stop(sidecar).await?));
    }
    steps.push(Step {
        what: "SIGTERM → both sidecars drained and exited 0",
        ok: exits.iter().all(|(_, ok)| *ok),
        detail: exits
            .iter()
            .map(|(n, ok)| format!("{n}: {}", if *ok { "exit 0" } else { "FAILED" }))
            .collect::<Vec<_>>()
            .join(", "),
    });

    println!("Summary");
    let mut failed = 0;
    for step in &steps {
        println!(
            "  [{}] {}: {}",
            if step.ok { "ok" } else { "FAIL" },
            step.what,
            step.detail
        );
        failed += usize::from(!step.ok);
    }
    if failed > 0 {
        bail!("{failed} of {} demo steps failed", steps.len());
    }
    println!("\nAll {} steps passed.", steps.len());
    Ok(())
}

fn first_line(body: &[u8]) -> String {
    String::from_utf8_lossy(body)
        .lines()
        .next()
        .unwrap_or("")
        .to_string()
}

async fn send(
    client: &Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>>,
    req: Request<Full<Bytes>>,
) -> anyhow::Result<(StatusCode, Bytes)> {
    let rsp = tokio::time::timeout(Duration::from_secs(10), client.request(req))
        .await
        .context("request timed out")??;
    let status = rsp.status();
    let body = tokio::time::timeout(Duration::from_secs(10), rsp.into_body().collect())
        .await
        .context("response body timed out")??
        .to_bytes();
    Ok((status, body))
}

/// `outrigger-proxy` is built next to this binary.
fn proxy_binary() -> anyhow::Result<PathBuf> {
    let me = std::env::current_exe().context("cannot find this executable")?;
    let path = me.with_file_name("outrigger-proxy");
    if !path.exists() {
        bail!(
            "{} not found: build the whole workspace first (cargo build --release)",
            path.display()
        );
    }
    Ok(path)
}

fn start_sidecar(
    bin: &Path,
    name: &'static str,
    config: &Path,
    workload: &str,
    dir: &Path,
) -> anyhow::Result<Sidecar> {
    let log_path = dir.join(format!("{name}-sidecar.log"));
    let log = std::fs::File::create(&log_path)?;
    let mut child = Command::new(bin)
        .arg("--config")
        .arg(config)
        .args(["--workload", workload])
        .args(["--admin-addr", "127.0.0.1:0", "--inbound-ip", "127.0.0.1"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::from(log))
        .spawn()
        .with_context(|| format!("cannot start {}", bin.display()))?;
    let stdout = child.stdout.take().context("sidecar stdout")?;
    let mut line = String::new();
    BufReader::new(stdout).read_line(&mut line)?;
    if line.trim().is_empty() {
        let _ = child.kill();
        let log = std::fs::read_to_string(&log_path).unwrap_or_default();
        bail!("{name} sidecar did not start:\n{log}");
    }
    let started: serde_json::Value = serde_json::from_str(&line).context("sidecar start line")?;
    let admin = started["admin"]
        .as_str()
        .context("admin address")?
        .parse()
        .context("admin address")?;
    Ok(Sidecar {
        name,
        child,
        admin,
        listeners: started["listeners"].clone(),
    })
}

/// SIGTERM, then wait (bounded) for a clean exit.
async fn stop(mut sidecar: Sidecar) -> anyhow::Result<bool> {
    let pid = sidecar.child.id().to_string();
    let status = Command::new("kill").args(["-TERM", &pid]).status()?;
    if !status.success() {
        bail!("kill -TERM {pid} failed");
    }
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        if let Some(status) = sidecar.child.try_wait()? {
            return Ok(status.success());
        }
        if Instant::now() > deadline {
            return Ok(false);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn api_config(app_port: u16) -> String {
    format!(
        r#"# The api workload: peers reach its inbound port, the sidecar forwards
# to the api app on 127.0.0.1:{app_port}.
apiVersion: outrigger.io/v1alpha1
kind: Workload
metadata: {{name: api, namespace: shop}}
spec:
  inbound:
    - name: http
      port: 0          # any free port; the sidecar reports it at start
      appPort: {app_port}
"#
    )
}

fn web_config(api_inbound: SocketAddr, unreachable: SocketAddr) -> String {
    format!(
        r#"# The web workload calls two services through local ports.
apiVersion: outrigger.io/v1alpha1
kind: Workload
metadata: {{name: web, namespace: shop}}
spec:
  inbound:
    - name: http
      port: 0
      appPort: 8080
  outbound:
    - port: 0
      service: api
    - port: 0
      service: billing
---
apiVersion: outrigger.io/v1alpha1
kind: Service
metadata: {{name: api, namespace: shop}}
spec:
  endpoints:
    - address: "{api_inbound}"   # the api sidecar's inbound port
---
apiVersion: outrigger.io/v1alpha1
kind: Service
metadata: {{name: billing, namespace: shop}}
spec:
  endpoints:
    - address: "{unreachable}"   # nothing listens here
---
apiVersion: outrigger.io/v1alpha1
kind: TrafficPolicy
metadata: {{name: api, namespace: shop}}
spec:
  service: api
  timeouts:
    request: 500ms
    connect: 1s
"#
    )
}

/// The sample api app: `/slow` takes 3 s, anything else answers with what
/// the app saw of the request.
async fn start_api_app() -> anyhow::Result<SocketAddr> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            tokio::spawn(async move {
                let service = hyper::service::service_fn(api_app);
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    Ok(addr)
}

async fn api_app(req: Request<Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
    if req.uri().path() == "/slow" {
        tokio::time::sleep(Duration::from_secs(3)).await;
    }
    let header = |name: &str| {
        req.headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    };
    let version = match req.version() {
        Version::HTTP_2 => "HTTP/2.0",
        Version::HTTP_11 => "HTTP/1.1",
        _ => "other",
    };
    let body = serde_json::json!({
        "service": "api",
        "version": version,
        "xForwardedFor": header("x-forwarded-for"),
        "clientId": header("x-outrigger-client-id"),
    });
    Ok(Response::new(Full::new(Bytes::from(body.to_string()))))
}
