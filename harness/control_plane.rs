//! Running the real control plane (`outrigger serve`) and talking to its
//! REST API.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde_json::Value;

use crate::proxy::bin_path;

/// A running `outrigger serve` process; killed when dropped.
pub struct ControlPlane {
    child: Option<Child>,
    pub grpc: SocketAddr,
    pub api: SocketAddr,
    pub admin: SocketAddr,
    /// The admission webhook's address, when started with one.
    pub webhook: Option<SocketAddr>,
    pub token: String,
    pub data_dir: PathBuf,
    log: PathBuf,
    _log_dir: tempfile::TempDir,
    client: Client<HttpConnector, Full<Bytes>>,
}

impl ControlPlane {
    pub async fn start(data_dir: &Path) -> Self {
        Self::start_with(data_dir, &[]).await
    }

    /// Starts it on `data_dir` with extra `serve` arguments, and waits
    /// until it reports its listeners.
    pub async fn start_with(data_dir: &Path, args: &[&str]) -> Self {
        let log_dir = tempfile::tempdir().expect("tempdir");
        let log = log_dir.path().join("control-plane.log");
        let mut cmd = Command::new(bin_path("outrigger"));
        cmd.arg("serve").arg("--data-dir").arg(data_dir);
        // Defaults the caller may override (a restart on the same gRPC
        // port, say).
        for (flag, value) in [
            ("--grpc-addr", "127.0.0.1:0"),
            ("--api-addr", "127.0.0.1:0"),
            ("--admin-addr", "127.0.0.1:0"),
            ("--endpoint-grace", "2s"),
        ] {
            if !args.contains(&flag) {
                cmd.args([flag, value]);
            }
        }
        let mut child = cmd
            .args(args)
            .env("OUTRIGGER_LOG", "info,outrigger=debug")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(std::fs::File::create(&log).expect("log file")))
            .spawn()
            .expect("spawn outrigger serve");
        let Some(line) = crate::proxy::start_line(&mut child).await else {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "outrigger serve did not report its listeners; log:\n{}",
                std::fs::read_to_string(&log).unwrap_or_default()
            )
        };
        let v: Value = serde_json::from_str(&line).expect("startup line is JSON");
        let addr = |key: &str| -> SocketAddr {
            v[key].as_str().expect("address").parse().expect("address")
        };
        let token = std::fs::read_to_string(data_dir.join("admin-token"))
            .expect("admin token")
            .trim()
            .to_string();
        Self {
            child: Some(child),
            grpc: addr("grpc"),
            api: addr("api"),
            admin: addr("admin"),
            webhook: v["webhook"].as_str().and_then(|a| a.parse().ok()),
            token,
            data_dir: data_dir.to_path_buf(),
            log,
            _log_dir: log_dir,
            client: Client::builder(TokioExecutor::new()).build_http(),
        }
    }

    /// `http://127.0.0.1:<grpc port>`, for sidecars.
    pub fn grpc_url(&self) -> String {
        format!("http://{}", self.grpc)
    }

    /// One REST call with the admin token (or `token`, or none with
    /// `Some("")`); returns the status and the body.
    pub async fn call(
        &self,
        method: &str,
        path: &str,
        body: Option<(&str, &str)>,
        token: Option<&str>,
    ) -> (u16, String) {
        let token = token.unwrap_or(&self.token);
        let mut builder = Request::builder()
            .method(method)
            .uri(format!("http://{}{path}", self.api));
        if !token.is_empty() {
            builder = builder.header("authorization", format!("Bearer {token}"));
        }
        let body = match body {
            Some((content_type, text)) => {
                builder = builder.header("content-type", content_type);
                Bytes::from(text.to_string())
            }
            None => Bytes::new(),
        };
        let request = builder.body(Full::new(body)).expect("request");
        let response = tokio::time::timeout(Duration::from_secs(30), self.client.request(request))
            .await
            .expect("API answers in time")
            .expect("API reachable");
        let status = response.status().as_u16();
        let bytes = response
            .into_body()
            .collect()
            .await
            .expect("API body")
            .to_bytes();
        (status, String::from_utf8_lossy(&bytes).into_owned())
    }

    /// GET on the admin listener (`/metrics`, `/ready`): status and body.
    pub async fn admin_get(&self, path: &str) -> (u16, String) {
        let request = Request::get(format!("http://{}{path}", self.admin))
            .body(Full::new(Bytes::new()))
            .expect("request");
        let response = tokio::time::timeout(Duration::from_secs(10), self.client.request(request))
            .await
            .expect("admin answers in time")
            .expect("admin reachable");
        let status = response.status().as_u16();
        let body = response
            .into_body()
            .collect()
            .await
            .expect("admin body")
            .to_bytes();
        (status, String::from_utf8_lossy(&body).into_owned())
    }

    pub async fn get_json(&self, path: &str) -> Value {
        let (status, body) = self.call("GET", path, None, None).await;
        assert_eq!(status, 200, "GET {path}: {body}");
        serde_json::from_str(&body).expect("JSON")
    }

    /// Applies YAML; panics unless it is accepted. Returns the answer.
    pub async fn apply(&self, yaml: &str) -> Value {
        let (status, body) = self
            .call(
                "POST",
                "/api/v1/apply",
                Some(("application/yaml", yaml)),
                None,
            )
            .await;
        assert_eq!(status, 200, "apply refused: {body}");
        serde_json::from_str(&body).expect("JSON")
    }

    pub async fn revision(&self) -> u64 {
        self.get_json("/api/v1/resources")
            .await
            .pointer("/metadata/revision")
            .and_then(Value::as_u64)
            .expect("revision")
    }

    pub async fn proxies(&self) -> Vec<Value> {
        self.get_json("/api/v1/proxies").await["proxies"]
            .as_array()
            .cloned()
            .unwrap_or_default()
    }

    /// Polls proxy status until `done` holds (bounded: 20 s).
    pub async fn wait_for_proxies(
        &self,
        what: &str,
        done: impl Fn(&[Value]) -> bool,
    ) -> Vec<Value> {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let proxies = self.proxies().await;
            if done(&proxies) {
                return proxies;
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}; proxy status: {proxies:#?}\nlog:\n{}",
                self.logs()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits until exactly `n` sidecars are connected and all run the
    /// latest policy.
    pub async fn wait_synced(&self, n: usize) -> Vec<Value> {
        self.wait_for_proxies(&format!("{n} synced sidecars"), |ps| {
            ps.len() == n && ps.iter().all(|p| p["status"] == "SYNCED")
        })
        .await
    }

    /// The served snapshot for `namespace/name`: (version, yaml).
    pub async fn snapshot(&self, workload: &str) -> (String, String) {
        let v = self
            .get_json(&format!("/api/v1/snapshots/{workload}"))
            .await;
        (
            v["version"].as_str().expect("version").to_string(),
            v["yaml"].as_str().expect("yaml").to_string(),
        )
    }

    /// The `outrigger` CLI, pointed at this server.
    pub fn cli(&self) -> Command {
        let mut cmd = Command::new(bin_path("outrigger"));
        cmd.env("OUTRIGGER_SERVER", format!("http://{}", self.api))
            .env("OUTRIGGER_TOKEN", &self.token)
            .env_remove("OUTRIGGER_TOKEN_FILE")
            .env("OUTRIGGER_CLI_CONFIG", "/dev/null")
            .stdin(Stdio::null());
        cmd
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// SIGKILL: no chance to clean up, as in a crash.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    pub fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        self.kill();
    }
}
