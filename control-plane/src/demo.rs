//! `outrigger demo`: a small mesh on loopback, narrated.
//!
//! A real control plane (`outrigger serve`) and two sample apps (`web` is
//! only a client here, `api` a server), each with a real `outrigger-proxy`
//! sidecar process that gets its policy from the control plane. The demo
//! applies the policy through the REST API, sends a few requests through
//! the sidecars, changes the policy live, shows what each step proves,
//! prints a summary, shuts everything down with SIGTERM, and exits 0 only
//! if every step did what it should.

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
    /// Waits (bounded) until the sidecar has its first snapshot, then
    /// reads its listeners from /config.
    async fn wait_configured(&mut self, client: &HttpClient) -> anyhow::Result<()> {
        let what = format!(
            "the {} sidecar got no policy from the control plane",
            self.name
        );
        let config = self
            .wait_for_config(client, &what, |c| !c["version"].is_null())
            .await?;
        self.listeners = config["listeners"].clone();
        Ok(())
    }

    /// Polls /config (for 20 s at most) until `ready` holds; returns it.
    async fn wait_for_config(
        &self,
        client: &HttpClient,
        failure: &str,
        ready: impl Fn(&serde_json::Value) -> bool,
    ) -> anyhow::Result<serde_json::Value> {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let config = get_json(client, &format!("http://{}/config", self.admin)).await?;
            if ready(&config) {
                return Ok(config);
            }
            if Instant::now() > deadline {
                bail!("{failure}");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn version(&self, client: &HttpClient) -> anyhow::Result<String> {
        let config = get_json(client, &format!("http://{}/config", self.admin)).await?;
        Ok(config["version"].as_str().unwrap_or("").to_string())
    }

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
    // On Ctrl-C or SIGTERM the demo's future is dropped, and with it every
    // process it started (their handles kill them on drop).
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let result = tokio::select! {
        result = run_in(&dir) => result,
        _ = tokio::signal::ctrl_c() => Err(anyhow::anyhow!("interrupted: the demo's processes are stopped")),
        _ = term.recv() => Err(anyhow::anyhow!("terminated: the demo's processes are stopped")),
    };
    if remove_after {
        let _ = std::fs::remove_dir_all(&dir);
    }
    result
}

async fn run_in(dir: &Path) -> anyhow::Result<()> {
    let proxy_bin = sibling_binary("outrigger-proxy")?;
    println!(
        "Outrigger demo: a control plane and three services with sidecars on loopback (mutual TLS between sidecars)\n"
    );
    let h1: HttpClient = Client::builder(TokioExecutor::new()).build_http();
    let h2: HttpClient = Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build_http();

    let mut cp = start_control_plane(dir)?;
    println!(
        "  control plane  gRPC {} (sidecars), REST {} (operators), admin {}",
        cp.grpc, cp.api, cp.admin
    );

    let api_app = start_app(api_app).await?;
    println!("  api app        listening on {api_app} (its /flaky fails every other time)");
    let billing_app = start_app(billing_app).await?;
    println!("  billing app    listening on {billing_app} (failing: every answer is a 503)");

    // The policy goes in through the REST API, as `outrigger apply` does.
    let policy = mesh_policy(api_app.port(), billing_app.port(), "500ms");
    std::fs::write(dir.join("mesh.yaml"), &policy)?;
    let applied = cp.apply(&h1, &policy).await?;
    println!(
        "  applied mesh.yaml through the REST API: revision {}",
        applied["revision"]
    );

    // Each sidecar proves its workload with a bootstrap token and gets its
    // certificate from the control plane's CA.
    for workload in ["shop/api", "shop/billing", "shop/web"] {
        let file = dir.join(format!("{}.token", workload.replace('/', "-")));
        cp.token_file(&h1, workload, &file).await?;
    }
    let grpc = format!("http://{}", cp.grpc);
    let mut api = start_sidecar(&proxy_bin, "api", &grpc, "shop/api", dir)?;
    let mut billing = start_sidecar(&proxy_bin, "billing", &grpc, "shop/billing", dir)?;
    let mut web = start_sidecar(&proxy_bin, "web", &grpc, "shop/web", dir)?;
    api.wait_configured(&h1).await?;
    billing.wait_configured(&h1).await?;
    web.wait_configured(&h1).await?;
    let api_inbound = api.listener("inbound/http")?;
    println!(
        "  api sidecar    inbound {api_inbound} → app {api_app}, registered as an endpoint of shop/api (admin {})",
        api.admin
    );
    println!(
        "  billing sidecar inbound {} → app {billing_app}, registered as an endpoint of shop/billing (admin {})",
        billing.listener("inbound/http")?,
        billing.admin
    );
    let to_api = web.listener("outbound/shop/api")?;
    let to_billing = web.listener("outbound/shop/billing")?;
    let by_host = web.listener("outbound/by-host")?;
    println!(
        "  web sidecar    outbound {to_api} → service shop/api, {to_billing} → service shop/billing, {by_host} → by Host header: shop/api only (admin {})",
        web.admin
    );
    println!(
        "\n  policy, data and logs: {} (kept only with --dir)\n",
        dir.display()
    );
    // web hears of api's endpoint once api has ACKed its first snapshot,
    // and both need their certificates.
    wait_until_ok(&h1, &format!("http://{to_api}/hello")).await?;
    wait_until_registered(&h1, &web, "shop/billing").await?;
    for sidecar in [&web, &api, &billing] {
        let failure = format!("the {} sidecar got no certificate", sidecar.name);
        sidecar
            .wait_for_config(&h1, &failure, |c| c["identity"]["spiffeId"].is_string())
            .await?;
    }

    let mut steps = Vec::new();

    // 0. Who is who: certificates from the control plane's CA.
    let mut ids = Vec::new();
    for sidecar in [&web, &api, &billing] {
        let config = get_json(&h1, &format!("http://{}/config", sidecar.admin)).await?;
        ids.push((
            sidecar.name,
            config["identity"]["spiffeId"]
                .as_str()
                .unwrap_or("none")
                .to_string(),
            config["identity"]["notAfter"].as_u64().unwrap_or(0),
        ));
    }
    let web_id = ids[0].1.clone();
    steps.push(Step {
        what: "each sidecar has a SPIFFE identity from the control plane's CA",
        ok: ids.iter().all(|(_, id, _)| id.starts_with("spiffe://")),
        detail: ids
            .iter()
            .map(|(name, id, not_after)| {
                format!(
                    "{name} = {id} (until {})",
                    crate::timefmt::from_unix_ms(not_after.saturating_mul(1000))
                )
            })
            .collect::<Vec<_>>()
            .join(", "),
    });

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
        what: "over mTLS the app sees the verified caller, not a spoofed header",
        ok: status == StatusCode::OK && seen["clientId"] == web_id.as_str(),
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

    // 2b. The shared port routes on Host, and only to what web declares.
    let host_get = |host: &str| {
        Request::get(format!("http://{by_host}/hello"))
            .header("host", host)
            .body(Full::new(Bytes::new()))
    };
    let (to_declared, _) = send(&h1, host_get("api.shop")?).await?;
    let (to_undeclared, body) = send(&h1, host_get("payments.shop")?).await?;
    steps.push(Step {
        what: "egress allow-list: the shared port reaches declared services only",
        ok: to_declared == StatusCode::OK && to_undeclared == StatusCode::FORBIDDEN,
        detail: format!(
            "Host: api.shop → {to_declared}; Host: payments.shop → {to_undeclared}: {}",
            first_line(&body)
        ),
    });

    // 3. A slow answer (1 s) hits the 500ms request timeout in the TrafficPolicy.
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

    // 4a. The allow-list: web may read api, not delete.
    let req = Request::delete(format!("http://{to_api}/orders/7")).body(Full::new(Bytes::new()))?;
    let (status, body) = send(&h1, req).await?;
    steps.push(Step {
        what: "api's allow-list refuses what its policy does not allow (403)",
        ok: status == StatusCode::FORBIDDEN,
        detail: format!(
            "DELETE /orders/7 from web → {status}: {}",
            first_line(&body)
        ),
    });

    // 4a'. One trace through two hops: the caller's trace id reaches the
    // app, each sidecar a span (a new parent id) of it.
    let trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let caller_span = "00f067aa0ba902b7";
    let req = Request::get(format!("http://{to_api}/hello"))
        .header("traceparent", format!("00-{trace}-{caller_span}-01"))
        .body(Full::new(Bytes::new()))?;
    let (status, body) = send(&h1, req).await?;
    let seen: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
    let at_app = seen["traceparent"].as_str().unwrap_or("").to_string();
    steps.push(Step {
        what: "one trace id through two hops, a span per sidecar",
        ok: status == StatusCode::OK
            && at_app.starts_with(&format!("00-{trace}-"))
            && !at_app.contains(caller_span),
        detail: format!("sent traceparent 00-{trace}-{caller_span}-01; the app saw {at_app}"),
    });

    // 4b. billing keeps failing: outlier detection ejects its endpoint
    // (3 failures in a row), and with no endpoint left the circuit is
    // open: web's sidecar answers 503 at once and leaves billing alone.
    let mut answers = Vec::new();
    let mut open = None;
    for _ in 0..6 {
        let req = Request::get(format!("http://{to_billing}/")).body(Full::new(Bytes::new()))?;
        let (status, body) = send(&h1, req).await?;
        let line = first_line(&body);
        if line.contains("ejected") {
            open = Some(line);
            break;
        }
        answers.push(format!("{} from billing", status.as_u16()));
    }
    steps.push(Step {
        what: "a failing endpoint is ejected and the circuit opens (fail fast)",
        ok: open.is_some(),
        detail: format!(
            "{}, then web's sidecar itself: {}",
            answers.join(", "),
            open.unwrap_or_default()
        ),
    });

    // 4c. api's /flaky fails every other time; the TrafficPolicy's retry
    // saves the request, and the app says which attempt it saw.
    let req = Request::get(format!("http://{to_api}/flaky")).body(Full::new(Bytes::new()))?;
    let (status, body) = send(&h1, req).await?;
    let seen: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
    steps.push(Step {
        what: "a retry saves a request to a flaky endpoint",
        ok: status == StatusCode::OK && seen["retryAttempt"] == "2",
        detail: format!(
            "{status} after api's 503; the app saw x-outrigger-retry-attempt: {}",
            seen["retryAttempt"]
        ),
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

    // 6. A live policy change: a longer timeout, applied through the API,
    // pushed to the web sidecar, and the slow call now succeeds.
    let (web_pid, before) = (web.child.id(), web.version(&h1).await?);
    let applied = cp
        .apply(&h1, &mesh_policy(api_app.port(), billing_app.port(), "2s"))
        .await?;
    let pushed = Instant::now();
    let after = loop {
        let version = web.version(&h1).await?;
        if version != before {
            break version;
        }
        if pushed.elapsed() > Duration::from_secs(10) {
            bail!("the web sidecar did not get the new policy");
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    let applied_in = pushed.elapsed();
    let start = Instant::now();
    let req = Request::get(format!("http://{to_api}/slow")).body(Full::new(Bytes::new()))?;
    let (status, _) = send(&h1, req).await?;
    steps.push(Step {
        what: "live policy change (timeout 500ms → 2s) without a restart",
        ok: status == StatusCode::OK && web.child.id() == web_pid,
        detail: format!(
            "revision {} applied by the web sidecar within {applied_in:?} (version {before} → {after}, same pid {web_pid}); /slow now {status} after {:?}",
            applied["revision"],
            start.elapsed()
        ),
    });

    // 7. The control plane knows who runs what.
    let status =
        get_json_auth(&h1, &format!("http://{}/api/v1/proxies", cp.api), &cp.token).await?;
    let proxies: Vec<String> = status["proxies"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|p| {
            format!(
                "{} {}",
                p["workload"].as_str().unwrap_or(""),
                p["status"].as_str().unwrap_or("")
            )
        })
        .collect();
    steps.push(Step {
        what: "proxy-status: every sidecar runs the latest policy",
        ok: proxies.len() == 3 && proxies.iter().all(|p| p.ends_with("SYNCED")),
        detail: proxies.join(", "),
    });

    // 8. Graceful shutdown.
    let mut exits = Vec::new();
    for mut sidecar in [web, api, billing] {
        exits.push((sidecar.name, stop(&mut sidecar.child).await?));
    }
    exits.push(("control plane", stop(&mut cp.child).await?));
    steps.push(Step {
        what: "SIGTERM → sidecars drained, everything exited 0",
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

type HttpClient = Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>>;

async fn get_json(client: &HttpClient, url: &str) -> anyhow::Result<serde_json::Value> {
    let req = Request::get(url).body(Full::new(Bytes::new()))?;
    let (_, body) = send(client, req).await?;
    serde_json::from_slice(&body).with_context(|| format!("{url}: not JSON"))
}

async fn get_json_auth(
    client: &HttpClient,
    url: &str,
    token: &str,
) -> anyhow::Result<serde_json::Value> {
    let req = Request::get(url)
        .header("authorization", format!("Bearer {token}"))
        .body(Full::new(Bytes::new()))?;
    let (_, body) = send(client, req).await?;
    serde_json::from_slice(&body).with_context(|| format!("{url}: not JSON"))
}

/// Polls `url` until it answers 200 (bounded).
async fn wait_until_ok(client: &HttpClient, url: &str) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let req = Request::get(url).body(Full::new(Bytes::new()))?;
        if let Ok((StatusCode::OK, _)) = send(client, req).await {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("{url} never answered 200");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits until `sidecar` has an endpoint for `service` (its `/config`),
/// without sending the service a request.
async fn wait_until_registered(
    client: &HttpClient,
    sidecar: &Sidecar,
    service: &str,
) -> anyhow::Result<()> {
    let failure = format!(
        "{} sidecar never learned an endpoint of {service}",
        sidecar.name
    );
    sidecar
        .wait_for_config(client, &failure, |c| {
            c["endpoints"][service]["endpoints"]
                .as_array()
                .is_some_and(|e| !e.is_empty())
        })
        .await
        .map(|_| ())
}

/// The control plane process and what it reported at start.
struct ControlPlane {
    child: Child,
    grpc: SocketAddr,
    api: SocketAddr,
    admin: SocketAddr,
    token: String,
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        // Only reached on an error path: the happy path waits for exit.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl ControlPlane {
    async fn apply(&self, client: &HttpClient, yaml: &str) -> anyhow::Result<serde_json::Value> {
        let req = Request::post(format!("http://{}/api/v1/apply", self.api))
            .header("authorization", format!("Bearer {}", self.token))
            .header("content-type", "application/yaml")
            .header("x-outrigger-source", "mesh.yaml")
            .body(Full::new(Bytes::from(yaml.to_string())))?;
        let (status, body) = send(client, req).await?;
        if status != StatusCode::OK {
            bail!(
                "apply refused ({status}): {}",
                String::from_utf8_lossy(&body)
            );
        }
        serde_json::from_slice(&body).context("apply answer")
    }

    /// A bootstrap token for `workload`, written to `path` for the
    /// sidecar's --token-file (as `outrigger token create` would).
    async fn token_file(
        &self,
        client: &HttpClient,
        workload: &str,
        path: &Path,
    ) -> anyhow::Result<()> {
        let req = Request::post(format!("http://{}/api/v1/tokens", self.api))
            .header("authorization", format!("Bearer {}", self.token))
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(
                serde_json::json!({ "workload": workload }).to_string(),
            )))?;
        let (status, body) = send(client, req).await?;
        if status != StatusCode::CREATED {
            bail!(
                "token refused ({status}): {}",
                String::from_utf8_lossy(&body)
            );
        }
        let answer: serde_json::Value = serde_json::from_slice(&body).context("token answer")?;
        let token = answer["token"].as_str().context("no token in the answer")?;
        std::fs::write(path, token).with_context(|| format!("cannot write {}", path.display()))
    }
}

fn start_control_plane(dir: &Path) -> anyhow::Result<ControlPlane> {
    let me = std::env::current_exe().context("cannot find this executable")?;
    let data = dir.join("control-plane-data");
    let log_path = dir.join("control-plane.log");
    let mut child = Command::new(me)
        .arg("serve")
        .arg("--data-dir")
        .arg(&data)
        .args([
            "--grpc-addr",
            "127.0.0.1:0",
            "--api-addr",
            "127.0.0.1:0",
            "--admin-addr",
            "127.0.0.1:0",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::from(std::fs::File::create(&log_path)?))
        .spawn()
        .context("cannot start the control plane")?;
    let stdout = child.stdout.take().context("control plane stdout")?;
    let mut line = String::new();
    BufReader::new(stdout).read_line(&mut line)?;
    let started: serde_json::Value = match serde_json::from_str(&line) {
        Ok(v) => v,
        Err(_) => {
            let _ = child.kill();
            let _ = child.wait();
            let log = std::fs::read_to_string(&log_path).unwrap_or_default();
            bail!("the control plane did not start:\n{log}");
        }
    };
    let addr = |key: &str| -> anyhow::Result<SocketAddr> {
        started[key]
            .as_str()
            .with_context(|| format!("control plane {key} address"))?
            .parse()
            .with_context(|| format!("control plane {key} address"))
    };
    let (grpc, api, admin) = match (addr("grpc"), addr("api"), addr("admin")) {
        (Ok(g), Ok(a), Ok(m)) => (g, a, m),
        _ => {
            let _ = child.kill();
            let _ = child.wait();
            bail!("the control plane's start line is incomplete: {line}");
        }
    };
    let token = match std::fs::read_to_string(data.join("admin-token")) {
        Ok(t) => t.trim().to_string(),
        Err(e) => {
            let _ = child.kill();
            let _ = child.wait();
            bail!("cannot read the admin token: {e}");
        }
    };
    Ok(ControlPlane {
        child,
        grpc,
        api,
        admin,
        token,
    })
}

/// The other binaries are built next to this one.
fn sibling_binary(name: &str) -> anyhow::Result<PathBuf> {
    let me = std::env::current_exe().context("cannot find this executable")?;
    let path = me.with_file_name(name);
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
    control_plane: &str,
    workload: &str,
    dir: &Path,
) -> anyhow::Result<Sidecar> {
    let log_path = dir.join(format!("{name}-sidecar.log"));
    let log = std::fs::File::create(&log_path)?;
    let mut child = Command::new(bin)
        .args(["--control-plane", control_plane])
        .arg("--state-dir")
        .arg(dir.join(format!("{name}-state")))
        .args(["--proxy-id", name])
        .args(["--workload", workload])
        .arg("--token-file")
        .arg(dir.join(format!("{}.token", workload.replace('/', "-"))))
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
async fn stop(child: &mut Child) -> anyhow::Result<bool> {
    let pid = child.id().to_string();
    let status = Command::new("kill").args(["-TERM", &pid]).status()?;
    if !status.success() {
        bail!("kill -TERM {pid} failed");
    }
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        if let Some(status) = child.try_wait()? {
            return Ok(status.success());
        }
        if Instant::now() > deadline {
            return Ok(false);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The whole mesh, as an operator would apply it.
fn mesh_policy(api_app_port: u16, billing_app_port: u16, request_timeout: &str) -> String {
    format!(
        r#"# api: peers reach its sidecar's inbound port (any free one), which
# forwards to the api app on 127.0.0.1:{api_app_port}. The sidecar registers
# that port as an endpoint of Service shop/api.
apiVersion: outrigger.io/v1alpha1
kind: Workload
metadata: {{name: api, namespace: shop}}
spec:
  inbound:
    - name: http
      port: 0
      appPort: {api_app_port}
      service: api
---
# Zero trust: api accepts the web workload's sidecar, nobody else, and
# only to read.
apiVersion: outrigger.io/v1alpha1
kind: AuthorizationPolicy
metadata: {{name: api-callers, namespace: shop}}
spec:
  workload: api
  action: ALLOW
  rules:
    - from: {{principals: ['spiffe://cluster.local/ns/shop/sa/web']}}
      to: {{methods: [GET, HEAD]}}
---
# web calls two services through ports of their own, and api through a
# port shared by Host header too. These are all it may reach: its egress
# allow-list.
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
    - port: 0
      services: [api]    # any other Host is refused by the sidecar
---
apiVersion: outrigger.io/v1alpha1
kind: Service
metadata: {{name: api, namespace: shop}}
spec:
  protocol: http       # endpoints: registered by the api sidecar
---
# billing: a second backend, with its own sidecar; web may call it.
apiVersion: outrigger.io/v1alpha1
kind: Workload
metadata: {{name: billing, namespace: shop}}
spec:
  inbound:
    - name: http
      port: 0
      appPort: {billing_app_port}
      service: billing
---
apiVersion: outrigger.io/v1alpha1
kind: AuthorizationPolicy
metadata: {{name: billing-callers, namespace: shop}}
spec:
  workload: billing
  action: ALLOW
  rules: [{{from: {{principals: ['spiffe://cluster.local/ns/shop/sa/web']}}}}]
---
apiVersion: outrigger.io/v1alpha1
kind: Service
metadata: {{name: billing, namespace: shop}}
spec:
  protocol: http       # endpoints: registered by the billing sidecar
---
apiVersion: outrigger.io/v1alpha1
kind: TrafficPolicy
metadata: {{name: api, namespace: shop}}
spec:
  service: api
  timeouts:
    request: {request_timeout}
    connect: 1s
  retries:                # a 502/503/504 or a refused connection is tried again
    attempts: 3
    retryOn: [gateway-error, connect-failure]
---
# billing is failing: after 3 failures in a row its endpoint is ejected,
# and with no endpoint left requests fail fast (503) instead of adding to
# its load.
apiVersion: outrigger.io/v1alpha1
kind: TrafficPolicy
metadata: {{name: billing, namespace: shop}}
spec:
  service: billing
  outlierDetection:
    consecutiveFailures: 3
    baseEjectionTime: 30s
"#
    )
}

/// The sample billing app: down for maintenance, every answer a 503.
async fn billing_app(_req: Request<Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
    let mut rsp = Response::new(Full::new(Bytes::from("billing: down for maintenance\n")));
    *rsp.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
    Ok(rsp)
}

/// Serves a sample app (`handler`) on a free loopback port, HTTP/1.1 and
/// h2c; returns the address.
async fn start_app<F, Fut>(handler: F) -> anyhow::Result<SocketAddr>
where
    F: Fn(Request<Incoming>) -> Fut + Copy + Send + 'static,
    Fut: Future<Output = Result<Response<Full<Bytes>>, Infallible>> + Send + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            tokio::spawn(async move {
                let service = hyper::service::service_fn(handler);
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    Ok(addr)
}

/// The sample api app: `/slow` takes 1 s, `/flaky` fails every other
/// time, anything else answers with what the app saw of the request.
async fn api_app(req: Request<Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
    /// `/flaky` fails every other time, starting with the first.
    static FLAKY: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    if req.uri().path() == "/slow" {
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    if req.uri().path() == "/flaky"
        && FLAKY
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            .is_multiple_of(2)
    {
        let mut rsp = Response::new(Full::new(Bytes::from("api: flaky, try again\n")));
        *rsp.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
        return Ok(rsp);
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
        "retryAttempt": header("x-outrigger-retry-attempt"),
        "traceparent": header("traceparent"),
    });
    Ok(Response::new(Full::new(Bytes::from(body.to_string()))))
}
