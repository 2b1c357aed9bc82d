//! Running the real proxy binary.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};

use serde_json::Value;

/// Where Cargo put the workspace's binaries: the test executable lives in
/// `target/<profile>/deps/`, the binaries one level up.
pub fn bin_path(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    let mut dir = exe.parent().expect("exe dir").to_path_buf();
    if dir.ends_with("deps") {
        dir.pop();
    }
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} not found: build the workspace binaries first (`cargo test --workspace` does)",
        path.display()
    );
    path
}

/// The one JSON line our binaries print on stdout once they listen;
/// `None` if it does not come within 30 s (the process failed to start).
pub(crate) async fn start_line(child: &mut Child) -> Option<String> {
    start_line_then(child, Arc::default()).await
}

/// Like [`start_line`]; the lines after it go to `rest` as they come.
async fn start_line_then(child: &mut Child, rest: Arc<Mutex<Vec<String>>>) -> Option<String> {
    let stdout = child.stdout.take()?;
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut reader = BufReader::new(stdout);
        let mut line = String::new();
        let _ = reader.read_line(&mut line);
        let _ = tx.send(line);
        for line in reader.lines() {
            let Ok(line) = line else { break };
            rest.lock().unwrap_or_else(|e| e.into_inner()).push(line);
        }
    });
    tokio::task::spawn_blocking(move || rx.recv_timeout(Duration::from_secs(30)))
        .await
        .ok()?
        .ok()
        .filter(|line| !line.trim().is_empty())
}

pub struct ProxyBuilder {
    /// `None`: the policy comes from a control plane (`--control-plane`).
    config: Option<String>,
    /// Wait for `/ready` after start (a sidecar waiting for its first
    /// snapshot is not ready).
    wait_ready: bool,
    workload: String,
    /// A command the binary runs under, e.g. `taskset -c 1` (benches).
    wrapper: Vec<String>,
    args: Vec<String>,
    envs: Vec<(String, String)>,
}

/// A running `outrigger-proxy` process.
pub struct Proxy {
    child: Option<Child>,
    pub admin: SocketAddr,
    /// The `listeners` array from the startup line.
    pub listeners: Vec<Value>,
    dir: tempfile::TempDir,
    /// What it printed on stdout after its start line (access logs).
    stdout: Arc<Mutex<Vec<String>>>,
}

impl ProxyBuilder {
    pub fn new(config_yaml: impl Into<String>, workload: impl Into<String>) -> Self {
        Self {
            config: Some(config_yaml.into()),
            wait_ready: true,
            workload: workload.into(),
            wrapper: Vec::new(),
            args: Vec::new(),
            envs: Vec::new(),
        }
    }

    /// A sidecar whose policy comes from the control plane at `grpc_url`.
    /// Add `--state-dir` with [`ProxyBuilder::arg`] to have it saved.
    pub fn with_control_plane(grpc_url: &str, workload: impl Into<String>) -> Self {
        Self {
            config: None,
            wait_ready: true,
            workload: workload.into(),
            wrapper: Vec::new(),
            args: vec!["--control-plane".to_string(), grpc_url.to_string()],
            envs: Vec::new(),
        }
    }

    /// Do not wait for `/ready` in [`ProxyBuilder::start`].
    pub fn no_wait_ready(mut self) -> Self {
        self.wait_ready = false;
        self
    }

    pub fn arg(mut self, arg: impl Into<String>) -> Self {
        self.args.push(arg.into());
        self
    }

    /// Runs mTLS with these certificate, key and bundle files.
    pub fn tls(mut self, files: &crate::certs::IdentityFiles) -> Self {
        self.args.extend(files.args());
        self
    }

    /// Runs the binary under another command that execs it (so the pid is
    /// the proxy's), e.g. `["taskset", "-c", "1"]`.
    pub fn wrap(mut self, wrapper: &[&str]) -> Self {
        self.wrapper = wrapper.iter().map(|s| s.to_string()).collect();
        self
    }

    pub fn env(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.envs.push((key.into(), value.into()));
        self
    }

    /// Starts the proxy and waits until it reports its listeners and says
    /// it is ready.
    pub async fn start(self) -> Proxy {
        let dir = tempfile::tempdir().expect("tempdir");
        let log = std::fs::File::create(dir.path().join("proxy.log")).expect("log file");
        let mut cmd = match self.wrapper.split_first() {
            Some((program, args)) => {
                let mut cmd = Command::new(program);
                cmd.args(args).arg(bin_path("outrigger-proxy"));
                cmd
            }
            None => Command::new(bin_path("outrigger-proxy")),
        };
        if let Some(config) = &self.config {
            let config_path = dir.path().join("mesh.yaml");
            std::fs::write(&config_path, config).expect("write config");
            cmd.arg("--config").arg(&config_path);
        }
        cmd.arg("--workload")
            .arg(&self.workload)
            .args(["--admin-addr", "127.0.0.1:0", "--inbound-ip", "127.0.0.1"])
            .args(&self.args)
            .env("OUTRIGGER_LOG", "info,outrigger_proxy=debug")
            .envs(self.envs.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(log));
        let mut child = cmd.spawn().expect("spawn outrigger-proxy");
        let stdout = Arc::new(Mutex::new(Vec::new()));
        let line = start_line_then(&mut child, stdout.clone()).await;
        let mut proxy = Proxy {
            child: Some(child),
            admin: "127.0.0.1:0".parse().expect("addr"),
            listeners: Vec::new(),
            dir,
            stdout,
        };
        let line = match line {
            Some(line) => line,
            None => panic!(
                "outrigger-proxy did not report its listeners; log:\n{}",
                proxy.logs()
            ),
        };
        let v: Value = serde_json::from_str(&line).expect("startup line is JSON");
        proxy.admin = v["admin"]
            .as_str()
            .expect("admin")
            .parse()
            .expect("admin addr");
        proxy.listeners = v["listeners"].as_array().expect("listeners").clone();
        if self.wait_ready {
            proxy.wait_ready().await;
        }
        proxy
    }

    /// Runs the binary expecting it to fail at start-up; returns its exit
    /// status and stderr.
    pub fn run_expecting_failure(self) -> (ExitStatus, String) {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut cmd = Command::new(bin_path("outrigger-proxy"));
        if let Some(config) = &self.config {
            let config_path = dir.path().join("mesh.yaml");
            std::fs::write(&config_path, config).expect("write config");
            cmd.arg("--config").arg(&config_path);
        }
        let out = cmd
            .arg("--workload")
            .arg(&self.workload)
            .args(["--admin-addr", "127.0.0.1:0"])
            .args(&self.args)
            .stdin(Stdio::null())
            .output()
            .expect("run outrigger-proxy");
        (
            out.status,
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }
}

impl Proxy {
    /// The bound address of the listener with this name (`inbound/http`,
    /// `outbound/shop/api`, ...).
    pub fn listener(&self, name: &str) -> SocketAddr {
        self.listeners
            .iter()
            .find(|l| l["name"] == name)
            .and_then(|l| l["addr"].as_str())
            .unwrap_or_else(|| panic!("no listener {name} in {:?}", self.listeners))
            .parse()
            .expect("listener addr")
    }

    /// Lines printed on stdout after the start line, so far.
    pub fn stdout_lines(&self) -> Vec<String> {
        self.stdout
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub fn logs(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("proxy.log")).unwrap_or_default()
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    /// GET an admin path; returns status and body.
    pub async fn admin_get(&self, path: &str) -> (u16, String) {
        let rsp = crate::clients::http1_get(self.admin, path)
            .await
            .expect("admin request");
        (rsp.0, String::from_utf8_lossy(&rsp.1).into_owned())
    }

    /// Polls `/ready` until it answers 200 (bounded).
    pub async fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok((200, _)) = crate::clients::http1_get(self.admin, "/ready").await {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "proxy never became ready; log:\n{}",
                self.logs()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Sends a signal by name (`TERM`, `INT`, `HUP`).
    pub fn signal(&self, sig: &str) {
        let status = Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(self.pid().to_string())
            .status()
            .expect("kill");
        assert!(status.success(), "kill -{sig} failed");
    }

    /// Replaces the configuration file the proxy was started with and sends
    /// SIGHUP, which makes it reload. Wait for the effect with
    /// [`Proxy::wait_version_change`] (or [`Proxy::wait_for_log`] when the
    /// new configuration is expected to be refused).
    pub fn reload(&self, config_yaml: &str) {
        std::fs::write(self.dir.path().join("mesh.yaml"), config_yaml).expect("write config");
        self.signal("HUP");
    }

    /// `/config` as JSON.
    pub async fn config(&self) -> Value {
        let (status, body) = self.admin_get("/config").await;
        assert_eq!(status, 200, "/config: {body}");
        serde_json::from_str(&body).expect("/config is JSON")
    }

    /// The configuration version `/config` reports.
    pub async fn config_version(&self) -> String {
        let config = self.config().await;
        config["version"].as_str().unwrap_or_default().to_string()
    }

    /// Polls `/config` until its version is no longer `from` (bounded);
    /// returns the new version.
    pub async fn wait_version_change(&self, from: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let version = self.config_version().await;
            if version != from {
                return version;
            }
            assert!(
                Instant::now() < deadline,
                "configuration version stayed {from}; log:\n{}",
                self.logs()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Polls the proxy's log until it contains `needle` (bounded).
    pub async fn wait_for_log(&self, needle: &str) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !self.logs().contains(needle) {
            assert!(
                Instant::now() < deadline,
                "no {needle:?} in the log:\n{}",
                self.logs()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// The bound address of listener `name` as `/config` reports it now
    /// (after reloads, unlike [`Proxy::listener`]); `None` if there is none.
    pub async fn current_listener(&self, name: &str) -> Option<SocketAddr> {
        let config = self.config().await;
        config["listeners"]
            .as_array()?
            .iter()
            .find(|l| l["name"] == name)
            .and_then(|l| l["addr"].as_str())
            .and_then(|a| a.parse().ok())
    }

    /// Waits (bounded) for the process to exit and returns its status.
    pub async fn wait_exit(&mut self, within: Duration) -> ExitStatus {
        let deadline = Instant::now() + within;
        loop {
            let child = self.child.as_mut().expect("running");
            if let Some(status) = child.try_wait().expect("try_wait") {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "proxy did not exit within {within:?}; log:\n{}",
                self.logs()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// Sums the samples whose series name starts with `name` and carries every
/// `key="value"` label in `labels`.
pub fn metric_sum(body: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    body.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| {
            l.split(['{', ' '])
                .next()
                .is_some_and(|series| series == name)
        })
        .filter(|l| {
            labels
                .iter()
                .all(|(k, v)| l.contains(&format!("{k}=\"{v}\"")))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

impl Drop for Proxy {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            if std::thread::panicking() {
                eprintln!("--- outrigger-proxy log ---\n{}", self.logs());
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
