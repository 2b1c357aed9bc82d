//! The paths under test, each started fresh per repetition:
//!
//! ```text
//! direct:    load → upstream
//! outrigger: load → outbound sidecar → inbound sidecar → upstream
//! outrigger-by-host: the same, through a shared outbound port routed on Host
//! outrigger-resilience: outrigger with retries, outlier detection, circuit
//!                       breaker and P2C-EWMA in a TrafficPolicy for shop/api
//! outrigger-traced: outrigger with every request sampled, spans exported
//!                   over OTLP/gRPC to a collector in the bench process
//! nginx:     load → nginx → nginx → upstream     (keep-alive upstream pools)
//! haproxy:   load → haproxy → haproxy → upstream (http-reuse always)
//! pingora:   load → pingora-peer → pingora-peer → upstream
//! ```
//!
//! The `-mtls` variants of the outrigger, nginx and haproxy paths run
//! mutual TLS between their two hops (the load → first hop and last hop →
//! upstream legs stay plaintext, as an app and its sidecar talk), with
//! certificates from one test CA made at the start of the run ([`Certs`]).
//!
//! For the new-connection-per-request scenario ([`Mode::NewConnections`])
//! every client connection must become a new connection on every hop:
//! the Outrigger pairs run as opaque TCP (`protocol: tcp`), HAProxy in
//! `mode tcp`, and nginx (no stream module in nginx-light) as an HTTP
//! proxy without its keep-alive upstream pool.
//!
//! Every proxy runs one worker thread, pinned to CPU 1 beside the upstream
//! when pinning is on (a sidecar shares its pod's core).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde::Serialize;

use super::load::{Load, Mode, Proto};
use super::sys;
use crate::certs::{IdentityFiles, Leaf, TestCa};
use crate::otlp::Collector;
use crate::proxy::metric_sum;
use crate::{Pair, ProxyBuilder};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum PathKind {
    Direct,
    Outrigger,
    #[serde(rename = "outrigger-mtls")]
    OutriggerMtls,
    /// `outrigger` with the client sidecar's outbound a shared port
    /// (`services: [api]`, listener `outbound/by-host`): the load sends
    /// `Host: api.shop` and the sidecar picks the Service by it.
    #[serde(rename = "outrigger-by-host")]
    OutriggerByHost,
    /// `outrigger` with [`RESILIENCE_POLICY`] on the client sidecar: every
    /// resilience feature on, though the happy path never retries.
    #[serde(rename = "outrigger-resilience")]
    OutriggerResilience,
    /// `outrigger` with both sidecars sampling every request and exporting
    /// its span to a [`Collector`] in the bench process ([`tracing_mesh`]).
    #[serde(rename = "outrigger-traced")]
    OutriggerTraced,
    Nginx,
    #[serde(rename = "nginx-mtls")]
    NginxMtls,
    Haproxy,
    #[serde(rename = "haproxy-mtls")]
    HaproxyMtls,
    Pingora,
}

impl PathKind {
    pub const ALL: [PathKind; 11] = [
        PathKind::Direct,
        PathKind::Outrigger,
        PathKind::OutriggerByHost,
        PathKind::OutriggerResilience,
        PathKind::OutriggerTraced,
        PathKind::OutriggerMtls,
        PathKind::Nginx,
        PathKind::NginxMtls,
        PathKind::Haproxy,
        PathKind::HaproxyMtls,
        PathKind::Pingora,
    ];

    pub fn name(self) -> &'static str {
        match self {
            PathKind::Direct => "direct",
            PathKind::Outrigger => "outrigger",
            PathKind::OutriggerMtls => "outrigger-mtls",
            PathKind::OutriggerByHost => "outrigger-by-host",
            PathKind::OutriggerResilience => "outrigger-resilience",
            PathKind::OutriggerTraced => "outrigger-traced",
            PathKind::Nginx => "nginx",
            PathKind::NginxMtls => "nginx-mtls",
            PathKind::Haproxy => "haproxy",
            PathKind::HaproxyMtls => "haproxy-mtls",
            PathKind::Pingora => "pingora",
        }
    }

    /// Whether the two hops talk mutual TLS.
    pub fn mtls(self) -> bool {
        matches!(
            self,
            PathKind::OutriggerMtls | PathKind::NginxMtls | PathKind::HaproxyMtls
        )
    }

    /// The same path with plaintext between the hops (itself if it is).
    pub fn plaintext(self) -> PathKind {
        match self {
            PathKind::OutriggerMtls => PathKind::Outrigger,
            PathKind::NginxMtls => PathKind::Nginx,
            PathKind::HaproxyMtls => PathKind::Haproxy,
            other => other,
        }
    }

    /// `Err(how to get it)` when the peer is not on this machine.
    pub fn available(self) -> Result<(), String> {
        match self {
            PathKind::Direct
            | PathKind::Outrigger
            | PathKind::OutriggerMtls
            | PathKind::OutriggerByHost
            | PathKind::OutriggerResilience
            | PathKind::OutriggerTraced => Ok(()),
            PathKind::Nginx | PathKind::NginxMtls if sys::have("nginx") => Ok(()),
            PathKind::Haproxy | PathKind::HaproxyMtls if sys::have("haproxy") => Ok(()),
            PathKind::Nginx | PathKind::NginxMtls | PathKind::Haproxy | PathKind::HaproxyMtls => Err(
                "missing; install with: bash benches/install-peers.sh (apt-get install nginx-light haproxy wrk nghttp2-client)"
                    .to_string(),
            ),
            PathKind::Pingora if pingora_binary().exists() => Ok(()),
            PathKind::Pingora => Err(format!(
                "not built; build with: cargo build --release --manifest-path benches/pingora-peer/Cargo.toml (expects {})",
                pingora_binary().display()
            )),
        }
    }

    /// Whether the path can carry HTTP/2 from the client all the way.
    pub fn h2_note(self) -> Option<&'static str> {
        if self.mtls() {
            // Said once, for the plaintext path.
            return None;
        }
        match self {
            PathKind::Nginx => Some(
                "nginx proxies to upstreams over HTTP/1.1 only: h2c in, HTTP/1.1 between the hops",
            ),
            PathKind::Pingora => {
                Some("pingora-peer accepts HTTP/1.1 only (no h2c): it sits out the h2c scenarios")
            }
            _ => None,
        }
    }

    /// Whether the path can carry this load: pingora-peer takes no h2c.
    /// A shared port routes HTTP only, and retries, outlier detection and
    /// spans are for HTTP, so the by-host, resilience and traced paths sit
    /// out the new-connection scenario (opaque TCP there).
    pub fn supports(self, load: &Load) -> bool {
        match self {
            PathKind::Pingora => load.proto != Proto::H2,
            PathKind::OutriggerByHost
            | PathKind::OutriggerResilience
            | PathKind::OutriggerTraced => load.mode != Mode::NewConnections,
            _ => true,
        }
    }
}

/// The Host (HTTP/1.1) or `:authority` (HTTP/2) the load sends to the
/// by-host path: the Service shop/api as `NAME.NAMESPACE`.
pub const BY_HOST_HOST: &str = "api.shop";

/// The outrigger-resilience path's TrafficPolicy for shop/api, on the
/// client sidecar: up to 3 attempts, outlier detection and the circuit
/// breaker's limits at their defaults, and P2C over peak-EWMA (also the
/// default). The upstream always answers 200, so no request is retried
/// and no endpoint ejected.
pub const RESILIENCE_POLICY: &str = "---
apiVersion: outrigger.io/v1alpha1
kind: TrafficPolicy
metadata: {name: api, namespace: shop}
spec:
  service: api
  retries: {attempts: 3, retryOn: [gateway-error, connect-failure]}
  outlierDetection: {}
  circuitBreaker: {}
  loadBalancer: p2c-ewma
";

/// The outrigger-traced path's Mesh, on both sidecars: every new trace
/// sampled, spans to the collector at `url`.
pub fn tracing_mesh(url: &str) -> String {
    format!(
        "---\napiVersion: outrigger.io/v1alpha1\nkind: Mesh\nmetadata: {{name: mesh}}\n\
         spec: {{tracing: {{samplingPercent: 100, otlpEndpoint: '{url}'}}}}\n"
    )
}

/// The SPIFFE IDs of the two sides of the Outrigger pair (workloads
/// shop/api and shop/web, service accounts defaulting to their names).
pub const API_ID: &str = "spiffe://cluster.local/ns/shop/sa/api";
pub const WEB_ID: &str = "spiffe://cluster.local/ns/shop/sa/web";

/// Certificates for the `-mtls` paths, made at the start of a run into a
/// temp dir (never committed): one test CA (P-256), an SVID for the
/// inbound side (`API_ID`) and one for the outbound side (`WEB_ID`). The
/// nginx and HAProxy pairs use the same files: the in hop serves the api
/// certificate and requires a client certificate from the CA, the out
/// hop presents the web certificate and verifies the in hop's chain.
pub struct Certs {
    pub api: IdentityFiles,
    pub web: IdentityFiles,
    /// Certificate then key, one file, for HAProxy's `crt`.
    pub api_pem: PathBuf,
    pub web_pem: PathBuf,
    /// The CA certificate.
    pub ca: PathBuf,
}

impl Certs {
    pub fn generate(dir: &Path) -> anyhow::Result<Self> {
        let ca = TestCa::new("outrigger bench root");
        let api = ca.write(dir, "api", Leaf::Spiffe(API_ID));
        let web = ca.write(dir, "web", Leaf::Spiffe(WEB_ID));
        let combined = |files: &IdentityFiles, name: &str| -> anyhow::Result<PathBuf> {
            let path = dir.join(name);
            let mut pem = std::fs::read_to_string(&files.cert)?;
            pem.push_str(&std::fs::read_to_string(&files.key)?);
            std::fs::write(&path, pem)?;
            Ok(path)
        };
        Ok(Self {
            api_pem: combined(&api, "api.pem")?,
            web_pem: combined(&web, "web.pem")?,
            ca: api.bundle.clone(),
            api,
            web,
        })
    }
}

/// The Outrigger client side: workload shop/web calling shop/api at
/// `inbound`; with `identity`, over mTLS to a server that must be it;
/// with `by_host`, through a shared outbound port that routes on Host.
fn outrigger_client_config(
    inbound: SocketAddr,
    protocol: &str,
    identity: Option<&str>,
    by_host: bool,
) -> String {
    let identity = identity
        .map(|id| format!("  identity: {id}\n"))
        .unwrap_or_default();
    let outbound = if by_host {
        "{port: 0, services: [api]}"
    } else {
        "{port: 0, service: api}"
    };
    format!(
        "apiVersion: outrigger.io/v1alpha1\nkind: Workload\nmetadata: {{name: web, namespace: shop}}\n\
         spec:\n  inbound: [{{name: main, port: 0, appPort: 9}}]\n  outbound: [{outbound}]\n---\n\
         apiVersion: outrigger.io/v1alpha1\nkind: Service\nmetadata: {{name: api, namespace: shop}}\n\
         spec:\n  protocol: {protocol}\n{identity}  endpoints: [{{address: '{inbound}'}}]\n"
    )
}

fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

pub fn pingora_binary() -> PathBuf {
    repo_root().join("benches/pingora-peer/target/release/pingora-peer")
}

/// A started path: where the load goes, and which processes are the
/// proxies (their CPU and memory are what we measure).
pub struct RunningPath {
    pub kind: PathKind,
    pub entry: SocketAddr,
    /// The Host / `:authority` the load must send; `None`: the entry
    /// address, as every path but outrigger-by-host takes.
    pub host: Option<&'static str>,
    pub proxy_pids: Vec<u32>,
    /// Our sidecars, when the path is Outrigger (killed on drop).
    pair: Option<Pair>,
    /// The OTLP receiver of the traced path (stopped on drop).
    collector: Option<Collector>,
    /// Peer processes (killed on drop).
    children: Vec<Child>,
    _dir: tempfile::TempDir,
}

/// Spans the two sidecars of a path exported and dropped so far (warm-up
/// included), from their `/metrics`.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct SpanCounts {
    pub exported: u64,
    pub dropped: u64,
}

impl RunningPath {
    /// `None` unless the path exports spans.
    pub async fn span_counts(&self) -> Option<SpanCounts> {
        self.collector.as_ref()?;
        let pair = self.pair.as_ref()?;
        let mut counts = SpanCounts {
            exported: 0,
            dropped: 0,
        };
        for sidecar in [&pair.client, &pair.server] {
            let (_, body) = sidecar.admin_get("/metrics").await;
            counts.exported += metric_sum(&body, "outrigger_spans_exported_total", &[]) as u64;
            counts.dropped += metric_sum(&body, "outrigger_spans_dropped_total", &[]) as u64;
        }
        Some(counts)
    }
}

impl Drop for RunningPath {
    fn drop(&mut self) {
        // Processes we did not spawn ourselves (nginx's workers) outlive a
        // killed master. Note them first, kill the masters (a live master
        // would respawn a killed worker), then the rest, by pid.
        let spawned: Vec<u32> = self.children.iter().map(|c| c.id()).collect();
        let mut others: Vec<u32> = spawned.iter().flat_map(|p| sys::children(*p)).collect();
        others.extend(self.proxy_pids.iter().filter(|p| !spawned.contains(p)));
        others.sort_unstable();
        others.dedup();
        for child in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
        if !others.is_empty() {
            let _ = Command::new("kill")
                .arg("-KILL")
                .args(others.iter().map(|p| p.to_string()))
                .stderr(Stdio::null())
                .status();
        }
    }
}

fn pinned(pin: bool, program: &str) -> Command {
    if pin {
        let mut c = Command::new("taskset");
        c.args(["-c", "1", program]);
        c
    } else {
        Command::new(program)
    }
}

/// How a path is started for one scenario.
#[derive(Clone, Copy)]
pub struct Setup<'a> {
    pub proto: Proto,
    pub mode: Mode,
    pub pin: bool,
    pub certs: &'a Certs,
}

pub async fn start(
    kind: PathKind,
    upstream: SocketAddr,
    setup: Setup<'_>,
) -> anyhow::Result<RunningPath> {
    let Setup {
        proto,
        mode,
        pin,
        certs,
    } = setup;
    // Every client connection a new connection on every hop.
    let per_connection = mode == Mode::NewConnections;
    let dir = tempfile::tempdir()?;
    let mut path = RunningPath {
        kind,
        entry: upstream,
        host: None,
        proxy_pids: Vec::new(),
        pair: None,
        collector: None,
        children: Vec::new(),
        _dir: tempfile::tempdir()?,
    };
    match kind {
        PathKind::Direct => {}
        PathKind::Outrigger
        | PathKind::OutriggerMtls
        | PathKind::OutriggerByHost
        | PathKind::OutriggerResilience
        | PathKind::OutriggerTraced => {
            let adjust = |b: ProxyBuilder| {
                let b = b.arg("--log").arg("warn");
                if pin {
                    b.wrap(&["taskset", "-c", "1"])
                } else {
                    b
                }
            };
            let protocol = if per_connection { "tcp" } else { "http" };
            let mtls = kind.mtls();
            let by_host = kind == PathKind::OutriggerByHost;
            // Documents added to both sidecars' configs, and to the client's.
            let mut both = String::new();
            let mut client_only = "";
            if kind == PathKind::OutriggerTraced {
                let collector = Collector::start().await;
                both = tracing_mesh(&collector.url());
                path.collector = Some(collector);
            }
            if kind == PathKind::OutriggerResilience {
                client_only = RESILIENCE_POLICY;
            }
            let mut server = adjust(ProxyBuilder::new(
                crate::mesh::server_config(upstream.port(), protocol) + &both,
                "shop/api",
            ));
            if mtls {
                server = server.tls(&certs.api);
            }
            let server = server.start().await;
            let inbound = server.listener("inbound/main");
            let mut client = adjust(ProxyBuilder::new(
                outrigger_client_config(inbound, protocol, mtls.then_some(API_ID), by_host)
                    + client_only
                    + &both,
                "shop/web",
            ));
            if mtls {
                client = client.tls(&certs.web);
            }
            let client = client.start().await;
            let outbound = if by_host {
                path.host = Some(BY_HOST_HOST);
                client.listener("outbound/by-host")
            } else {
                client.listener("outbound/shop/api")
            };
            path.entry = outbound;
            path.proxy_pids = vec![client.pid(), server.pid()];
            path.pair = Some(Pair {
                server,
                client,
                outbound,
            });
        }
        PathKind::Nginx | PathKind::NginxMtls => {
            let inbound = free_addr();
            let outbound = free_addr();
            let h2 = if proto == Proto::H2 { "http2" } else { "" };
            let keepalive = if per_connection {
                "        # no keep-alive pool: a new upstream connection per request"
            } else {
                "        keepalive 256;\n        keepalive_requests 1000000;"
            };
            let mtls = kind.mtls();
            let (in_listen, in_tls) = if mtls {
                (
                    "ssl",
                    format!(
                        "        ssl_protocols TLSv1.3;\n        ssl_certificate {};\n        ssl_certificate_key {};\n        ssl_client_certificate {};\n        ssl_verify_client on;",
                        certs.api.cert.display(),
                        certs.api.key.display(),
                        certs.ca.display()
                    ),
                )
            } else {
                ("", String::new())
            };
            // The leaf has a URI SAN only, so OpenSSL checks the name
            // against the subject CN.
            let out_tls = if mtls {
                format!(
                    "            proxy_ssl_protocols TLSv1.3;\n            proxy_ssl_certificate {};\n            proxy_ssl_certificate_key {};\n            proxy_ssl_trusted_certificate {};\n            proxy_ssl_verify on;\n            proxy_ssl_name \"test workload\";",
                    certs.web.cert.display(),
                    certs.web.key.display(),
                    certs.ca.display()
                )
            } else {
                String::new()
            };
            let out_scheme = if mtls { "https" } else { "http" };
            for (name, listen, next, options, server_tls, scheme, proxy_tls) in [
                (
                    "in",
                    inbound,
                    upstream,
                    in_listen,
                    in_tls.as_str(),
                    "http",
                    "",
                ),
                (
                    "out",
                    outbound,
                    inbound,
                    h2,
                    "",
                    out_scheme,
                    out_tls.as_str(),
                ),
            ] {
                let hop_dir = dir.path().join(format!("nginx-{name}"));
                std::fs::create_dir_all(&hop_dir)?;
                let conf = fill(
                    "nginx.conf.template",
                    &[
                        ("LISTEN", listen.to_string()),
                        ("UPSTREAM", next.to_string()),
                        ("LISTEN_OPTIONS", options.to_string()),
                        ("KEEPALIVE", keepalive.to_string()),
                        ("SERVER_TLS", server_tls.to_string()),
                        ("SCHEME", scheme.to_string()),
                        ("PROXY_TLS", proxy_tls.to_string()),
                        ("DIR", hop_dir.display().to_string()),
                    ],
                )?;
                let conf_path = hop_dir.join("nginx.conf");
                std::fs::write(&conf_path, conf)?;
                let mut cmd = pinned(pin, "nginx");
                cmd.arg("-c")
                    .arg(&conf_path)
                    .arg("-p")
                    .arg(&hop_dir)
                    .arg("-e")
                    .arg(hop_dir.join("error.log"));
                start_hop(&mut path, cmd, &hop_dir.join("stderr.log"), listen).await?;
            }
            path.entry = outbound;
            // The masters plus their workers (a master may still be forking
            // its worker when the port already accepts connections).
            let masters: Vec<u32> = path.children.iter().map(|c| c.id()).collect();
            for m in masters {
                path.proxy_pids.push(m);
                let deadline = Instant::now() + Duration::from_secs(5);
                let mut workers = sys::children(m);
                while workers.is_empty() && Instant::now() < deadline {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    workers = sys::children(m);
                }
                path.proxy_pids.extend(workers);
            }
        }
        PathKind::Haproxy | PathKind::HaproxyMtls => {
            let inbound = free_addr();
            let outbound = free_addr();
            let (mode_name, reuse) = if per_connection {
                ("tcp", "")
            } else {
                ("http", "    http-reuse always")
            };
            let h2 = proto == Proto::H2 && !per_connection;
            let plain = if h2 { "proto h2" } else { "" };
            let mtls = kind.mtls();
            let (in_bind, out_server) = if mtls {
                (
                    format!(
                        "ssl crt {} ca-file {} verify required ssl-min-ver TLSv1.3 {plain}",
                        certs.api_pem.display(),
                        certs.ca.display()
                    ),
                    format!(
                        "ssl crt {} ca-file {} verify required ssl-min-ver TLSv1.3 {plain}",
                        certs.web_pem.display(),
                        certs.ca.display()
                    ),
                )
            } else {
                (plain.to_string(), plain.to_string())
            };
            for (name, listen, next, bind, server) in [
                ("in", inbound, upstream, in_bind.as_str(), plain),
                ("out", outbound, inbound, plain, out_server.as_str()),
            ] {
                let hop_dir = dir.path().join(format!("haproxy-{name}"));
                std::fs::create_dir_all(&hop_dir)?;
                let conf = fill(
                    "haproxy.cfg.template",
                    &[
                        ("LISTEN", listen.to_string()),
                        ("UPSTREAM", next.to_string()),
                        ("MODE", mode_name.to_string()),
                        ("REUSE", reuse.to_string()),
                        ("BIND_OPTIONS", bind.to_string()),
                        ("SERVER_OPTIONS", server.to_string()),
                        ("DIR", hop_dir.display().to_string()),
                    ],
                )?;
                let conf_path = hop_dir.join("haproxy.cfg");
                std::fs::write(&conf_path, conf)?;
                let mut cmd = pinned(pin, "haproxy");
                cmd.arg("-db").arg("-f").arg(&conf_path);
                let pid = start_hop(&mut path, cmd, &hop_dir.join("haproxy.log"), listen).await?;
                path.proxy_pids.push(pid);
            }
            path.entry = outbound;
        }
        PathKind::Pingora => {
            let inbound = free_addr();
            let outbound = free_addr();
            for (listen, next) in [(inbound, upstream), (outbound, inbound)] {
                let log_path = dir.path().join(format!("pingora-{}.log", listen.port()));
                let mut cmd = pinned(pin, &pingora_binary().display().to_string());
                cmd.args([
                    "--listen",
                    &listen.to_string(),
                    "--upstream",
                    &next.to_string(),
                    "--threads",
                    "1",
                ]);
                let pid = start_hop(&mut path, cmd, &log_path, listen).await?;
                path.proxy_pids.push(pid);
            }
            path.entry = outbound;
        }
    }
    path._dir = dir;
    Ok(path)
}

fn free_addr() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], sys::free_port()))
}

/// Reads a template from `benches/peers/` and fills `{{KEY}}` placeholders.
fn fill(template: &str, values: &[(&str, String)]) -> anyhow::Result<String> {
    let path = repo_root().join("benches/peers").join(template);
    let mut text =
        std::fs::read_to_string(&path).with_context(|| format!("read {}", path.display()))?;
    for (key, value) in values {
        text = text.replace(&format!("{{{{{key}}}}}"), value);
    }
    Ok(text)
}

/// Starts one hop of a peer pair with its stderr in `log`, keeps it for
/// cleanup, and waits until it listens. Returns its pid.
async fn start_hop(
    path: &mut RunningPath,
    mut cmd: Command,
    log: &Path,
    listen: SocketAddr,
) -> anyhow::Result<u32> {
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::from(std::fs::File::create(log)?))
        .spawn()
        .with_context(|| format!("start {:?}", cmd.get_program()))?;
    let pid = child.id();
    path.children.push(child);
    wait_listening(listen, log).await?;
    Ok(pid)
}

/// Waits (bounded) until a peer accepts connections on `addr`.
async fn wait_listening(addr: SocketAddr, log: &Path) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if tokio::net::TcpStream::connect(addr).await.is_ok() {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!(
                "peer never listened on {addr}; its log:\n{}",
                std::fs::read_to_string(log).unwrap_or_default()
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
