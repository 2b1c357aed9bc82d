//! The paths under test, each started fresh per repetition:
//!
//! ```text
//! direct:    load → upstream
//! outrigger: load → outbound sidecar → inbound sidecar → upstream
//! nginx:     load → nginx → nginx → upstream     (keep-alive upstream pools)
//! haproxy:   load → haproxy → haproxy → upstream (http-reuse always)
//! pingora:   load → pingora-peer → pingora-peer → upstream
//! ```
//!
//! Every proxy runs one worker thread, pinned to CPU 1 beside the upstream
//! when pinning is on (a sidecar shares its pod's core).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde::Serialize;

use super::load::Proto;
use super::sys;
use crate::{Pair, ProxyBuilder};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum PathKind {
    Direct,
    Outrigger,
    Nginx,
    Haproxy,
    Pingora,
}

impl PathKind {
    pub const ALL: [PathKind; 5] = [
        PathKind::Direct,
        PathKind::Outrigger,
        PathKind::Nginx,
        PathKind::Haproxy,
        PathKind::Pingora,
    ];

    pub fn name(self) -> &'static str {
        match self {
            PathKind::Direct => "direct",
            PathKind::Outrigger => "outrigger",
            PathKind::Nginx => "nginx",
            PathKind::Haproxy => "haproxy",
            PathKind::Pingora => "pingora",
        }
    }

    /// `Err(how to get it)` when the peer is not on this machine.
    pub fn available(self) -> Result<(), String> {
        match self {
            PathKind::Direct | PathKind::Outrigger => Ok(()),
            PathKind::Nginx if sys::have("nginx") => Ok(()),
            PathKind::Haproxy if sys::have("haproxy") => Ok(()),
            PathKind::Nginx | PathKind::Haproxy => Err(
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

    /// Whether the path accepts this protocol from the load tool.
    pub fn supports(self, proto: Proto) -> bool {
        !(self == PathKind::Pingora && proto == Proto::H2)
    }
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
    pub proxy_pids: Vec<u32>,
    /// Our sidecars, when the path is Outrigger (killed on drop).
    _pair: Option<Pair>,
    /// Peer processes (killed on drop).
    children: Vec<Child>,
    _dir: tempfile::TempDir,
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

pub async fn start(
    kind: PathKind,
    upstream: SocketAddr,
    proto: Proto,
    pin: bool,
) -> anyhow::Result<RunningPath> {
    let dir = tempfile::tempdir()?;
    let mut path = RunningPath {
        kind,
        entry: upstream,
        proxy_pids: Vec::new(),
        _pair: None,
        children: Vec::new(),
        _dir: tempfile::tempdir()?,
    };
    match kind {
        PathKind::Direct => {}
        PathKind::Outrigger => {
            let adjust = |b: ProxyBuilder| {
                let b = b.arg("--log").arg("warn");
                if pin {
                    b.wrap(&["taskset", "-c", "1"])
                } else {
                    b
                }
            };
            let pair = Pair::start_custom(upstream, "http", "", adjust, adjust).await;
            path.entry = pair.outbound;
            path.proxy_pids = vec![pair.client.pid(), pair.server.pid()];
            path._pair = Some(pair);
        }
        PathKind::Nginx => {
            let inbound = free_addr();
            let outbound = free_addr();
            let h2 = if proto == Proto::H2 { "http2" } else { "" };
            for (name, listen, next, options) in [
                ("in", inbound, upstream, ""),
                ("out", outbound, inbound, h2),
            ] {
                let hop_dir = dir.path().join(format!("nginx-{name}"));
                std::fs::create_dir_all(&hop_dir)?;
                let conf = fill(
                    "nginx.conf.template",
                    &[
                        ("LISTEN", listen.to_string()),
                        ("UPSTREAM", next.to_string()),
                        ("LISTEN_OPTIONS", options.to_string()),
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
        PathKind::Haproxy => {
            let inbound = free_addr();
            let outbound = free_addr();
            let (bind, server) = if proto == Proto::H2 {
                ("proto h2", "proto h2")
            } else {
                ("", "")
            };
            for (name, listen, next) in [("in", inbound, upstream), ("out", outbound, inbound)] {
                let hop_dir = dir.path().join(format!("haproxy-{name}"));
                std::fs::create_dir_all(&hop_dir)?;
                let conf = fill(
                    "haproxy.cfg.template",
                    &[
                        ("LISTEN", listen.to_string()),
                        ("UPSTREAM", next.to_string()),
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
