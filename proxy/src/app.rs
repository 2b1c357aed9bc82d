//! Assembling a running proxy: start the admin server, apply a validated
//! configuration (now, or later when one is delivered), apply the next ones
//! as they come, and drain it all on shutdown.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use anyhow::Context as _;
use outrigger_config::{LoadBalancer, MeshConfig, ResourceRef};

use crate::access_log::{AccessLog, AccessLogFormat};
use crate::admin;
use crate::apply::{self, ApplyError, ApplySummary, Listeners};
use crate::drain::{self, DrainOutcome};
use crate::http::server::ServerSettings;
use crate::identity::Identity;
use crate::state::{Loaded, ProxyState};
use crate::tls::MeshTls;
use crate::trace::Tracing;
use outrigger_config::authz::Authorizer;

/// Everything needed to start a proxy (the CLI fills this in).
#[derive(Clone, Debug)]
pub struct ProxyOptions {
    /// The configuration file, when there is one (a control plane may
    /// deliver the configuration instead).
    pub config_path: Option<PathBuf>,
    /// `NAME` or `NAMESPACE/NAME`.
    pub workload: String,
    pub admin_addr: SocketAddr,
    /// Address inbound listeners bind (peers must reach it).
    pub inbound_ip: IpAddr,
    /// Address outbound listeners bind (only the local app uses them).
    pub outbound_ip: IpAddr,
    /// Where the local app listens.
    pub app_ip: IpAddr,
    pub server: ServerSettings,
    /// With an identity, every inbound listener requires mTLS and every
    /// endpoint in the mesh is reached over mTLS.
    pub identity: Option<Arc<Identity>>,
    /// Accept TLS 1.2 as well as 1.3 between sidecars.
    pub allow_tls12: bool,
    pub access_log: AccessLogFormat,
    /// Percent of requests logged (0..=100).
    pub access_log_sample: f64,
}

#[cfg(test)]
impl ProxyOptions {
    /// Everything on 127.0.0.1, ports chosen by the OS: unit tests.
    pub(crate) fn loopback(workload: &str) -> Self {
        let localhost = IpAddr::V4(std::net::Ipv4Addr::LOCALHOST);
        Self {
            config_path: None,
            workload: workload.to_string(),
            admin_addr: SocketAddr::new(localhost, 0),
            inbound_ip: localhost,
            outbound_ip: localhost,
            app_ip: localhost,
            server: ServerSettings::default(),
            identity: None,
            allow_tls12: false,
            access_log: AccessLogFormat::Off,
            access_log_sample: 100.0,
        }
    }
}

/// A started proxy. Share it (`Arc<Running>`) between whatever delivers
/// configurations and whatever shuts it down: every method takes `&self`.
#[derive(Debug)]
pub struct Running {
    pub state: Arc<ProxyState>,
    pub admin_addr: SocketAddr,
    options: ProxyOptions,
    /// Also serializes applies: two at once would race on the ports.
    listeners: tokio::sync::Mutex<Listeners>,
    /// Taken by the shutdown.
    drain: Mutex<Option<drain::Drain>>,
    /// Sampling and span export; each apply passes on the Mesh's settings.
    tracing: Arc<Tracing>,
}

/// Loads a configuration file and picks out this proxy's workload. The
/// version is a digest of the file's text.
pub fn load(config_path: &Path, workload: &str) -> anyhow::Result<Loaded> {
    let text = std::fs::read(config_path)
        .with_context(|| format!("cannot read configuration {}", config_path.display()))?;
    let source = config_path.display().to_string();
    let yaml =
        String::from_utf8(text).map_err(|e| anyhow::anyhow!("{source}: not UTF-8 text: {e}"))?;
    load_str(&source, &yaml, workload)
}

/// Validates a configuration held in memory (e.g. a snapshot a control
/// plane pushed) and picks out `workload` (`NAME` or `NAMESPACE/NAME`).
/// `source` names it in errors and `/config`. The version is a digest of
/// `yaml`; [`Loaded::with_version`] replaces it.
pub fn load_str(source: &str, yaml: &str, workload: &str) -> anyhow::Result<Loaded> {
    let config = outrigger_config::load_str(source, yaml).map_err(|e| anyhow::anyhow!("{e}"))?;
    let (namespace, name) = match workload.split_once('/') {
        Some((ns, name)) => (Some(ns), name),
        None => (None, workload),
    };
    let id = config
        .workload(namespace, name)
        .map_err(|e| anyhow::anyhow!("{source}: {e}"))?
        .id
        .clone();
    let not_enforced = not_enforced(&config, &id);
    Ok(Loaded {
        version: outrigger_config::digest(yaml.as_bytes()),
        source: source.to_string(),
        loaded_at: SystemTime::now(),
        workload: id,
        config,
        not_enforced,
    })
}

/// Starts the admin server, then applies `loaded` if there is one. With
/// `None` the proxy has no listeners and `/ready` says 503 until a first
/// [`Running::apply`].
pub async fn start(options: ProxyOptions, loaded: Option<Loaded>) -> anyhow::Result<Running> {
    let prometheus = crate::metrics::install();
    let state = ProxyState::new();
    // Each listener subscribes its own watch when it starts.
    let (drain, _) = drain::channel();
    let tls = match &options.identity {
        Some(identity) => {
            state.set_identity(identity.clone());
            identity.record_expiry();
            let tls = MeshTls::new(
                identity.clone(),
                options.allow_tls12,
                options.server.header_read_timeout,
            )
            .context("cannot set up mTLS")?;
            Some(Arc::new(tls))
        }
        None => None,
    };
    let admin_addr = admin::start(options.admin_addr, state.clone(), prometheus).await?;
    let tracing = Tracing::new(AccessLog::start(
        options.access_log,
        options.access_log_sample,
    ));
    let running = Running {
        state,
        admin_addr,
        options,
        listeners: tokio::sync::Mutex::new(Listeners::new(tls, tracing.clone())),
        drain: Mutex::new(Some(drain)),
        tracing,
    };
    if let Some(loaded) = loaded {
        running.apply(loaded).await?;
    }
    Ok(running)
}

impl Running {
    /// Makes the running listeners match `loaded`: binds new listeners,
    /// swaps the routes of kept ones, closes removed ones (their open
    /// connections finish on their own). All or nothing: on error the
    /// previous configuration keeps serving as it was, so the caller can
    /// report the error (NACK) and carry on.
    pub async fn apply(&self, mut loaded: Loaded) -> Result<ApplySummary, ApplyError> {
        let mut listeners = self.listeners.lock().await;
        // The policies decide from the next request on; with mTLS only
        // (without it no caller is verified).
        let authorizer = match &self.options.identity {
            Some(_) => Some(Arc::new(Authorizer::for_workload(
                &loaded.config,
                &loaded.workload,
            ))),
            None => {
                let warnings = authz_without_mtls(&loaded.config, &loaded.workload);
                loaded.not_enforced.extend(warnings);
                None
            }
        };
        let previous_authorizer = listeners.swap_authorizer(authorizer);
        let watch = self
            .drain
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .as_ref()
            .map(drain::Drain::watch);
        let Some(watch) = watch.filter(|_| !self.state.is_draining()) else {
            return Err(ApplyError::Draining);
        };
        let specs = apply::listener_specs(&self.options, &loaded)?;
        let previous = self.state.loaded();
        let mut summary = match listeners.apply(&specs, &self.options.server, &watch).await {
            Ok(summary) => summary,
            Err(e) => {
                listeners.swap_authorizer(previous_authorizer);
                // Normally a no-op; it matters when an old listener could
                // not be restored, so /config does not list it.
                if let Some(previous) = previous {
                    self.state
                        .set_applied(previous, listeners.bound(), listeners.destinations());
                }
                return Err(e);
            }
        };
        summary.version = loaded.version.clone();
        for warning in &loaded.not_enforced {
            tracing::warn!("{warning}");
        }
        if self.options.identity.is_none() {
            warn_plaintext_to_mesh(&specs);
        }
        if let Some(previous) = previous.filter(|p| p.version != loaded.version) {
            metrics::gauge!(crate::metrics::CONFIG_INFO, "version" => previous.version.clone())
                .set(0.0);
        }
        metrics::gauge!(crate::metrics::CONFIG_INFO, "version" => loaded.version.clone()).set(1.0);
        if let Some(identity) = &self.options.identity {
            identity.set_trust_domain(&loaded.config.mesh.trust_domain);
        }
        self.tracing
            .configure(&loaded.config.mesh.tracing, &loaded.workload);
        tracing::info!(workload = %loaded.workload, source = %loaded.source, "configuration applied: {summary}");
        self.state.set_applied(
            Arc::new(loaded),
            listeners.bound(),
            listeners.destinations(),
        );
        Ok(summary)
    }

    /// Stops accepting, lets in-flight work finish for up to `deadline`.
    /// Later applies are refused.
    pub async fn shutdown(&self, deadline: Duration) -> DrainOutcome {
        self.state.set_draining();
        let drain = self
            .drain
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        match drain {
            Some(drain) => drain.drain(deadline).await,
            None => DrainOutcome::Complete,
        }
    }
}

/// What this workload's configuration asks for that this build does not
/// enforce yet. Saying so beats silently ignoring a security setting.
/// Without a certificate this sidecar speaks plaintext to every endpoint,
/// including those that expect mTLS (and will refuse it): say so.
fn warn_plaintext_to_mesh(specs: &[apply::ListenerSpec]) {
    for spec in specs {
        for route in spec.route.outbound_routes() {
            let service = &route.service;
            let Some(expected) = route.endpoints.iter().find(|e| !e.identities.is_empty()) else {
                continue;
            };
            tracing::warn!(
                %service,
                identity = %expected.identities.join(" or "),
                "this sidecar has no certificate (--tls-cert), so it calls {service} in plaintext; sidecars running mTLS will refuse it"
            );
        }
    }
}

/// Without mTLS there is no verified caller to authorize: say what that
/// leaves unenforced.
fn authz_without_mtls(config: &MeshConfig, workload: &ResourceRef) -> Vec<String> {
    let mut out = Vec::new();
    let policies: Vec<String> = config
        .authorization_policies_for(workload)
        .map(|p| p.id.to_string())
        .collect();
    if !policies.is_empty() {
        out.push(format!(
            "AuthorizationPolicy {} NOT enforced: this sidecar has no mTLS identity, so callers are not verified",
            policies.join(", ")
        ));
    } else if config.mesh.default_authorization == outrigger_config::DefaultAction::Deny {
        out.push(
            "Mesh authorization.defaultAction: deny is NOT enforced: this sidecar has no mTLS identity, so callers are not verified".to_string(),
        );
    }
    out
}

fn not_enforced(config: &MeshConfig, workload: &ResourceRef) -> Vec<String> {
    let mut out = Vec::new();
    if config.mesh.default_authorization == outrigger_config::DefaultAction::Allow
        && config.authorization_policies_for(workload).next().is_none()
    {
        out.push(
            "Mesh authorization.defaultAction is allow (for migration): workloads without an AuthorizationPolicy accept every verified caller".to_string(),
        );
    }
    let Some(w) = config.workloads.iter().find(|w| &w.id == workload) else {
        return out;
    };
    // Opaque TCP has no requests to retry or score: its connections go
    // round robin, with the connect and idle timeouts.
    for service in w.destinations() {
        let is_tcp = config
            .service(service)
            .is_some_and(|s| s.protocol == outrigger_config::Protocol::Tcp);
        let Some(p) = config.traffic_policy_for(service).filter(|_| is_tcp) else {
            continue;
        };
        let mut parts = Vec::new();
        if p.retries.is_some() {
            parts.push("retries");
        }
        if p.outlier_detection.is_some() {
            parts.push("outlierDetection");
        }
        if p.circuit_breaker != outrigger_config::CircuitBreaker::default() {
            parts.push("circuitBreaker");
        }
        if p.load_balancer != LoadBalancer::default() && p.load_balancer != LoadBalancer::RoundRobin
        {
            parts.push("loadBalancer");
        }
        if !parts.is_empty() {
            out.push(format!(
                "TrafficPolicy {}: {} not enforced for opaque TCP (connections go round robin; the timeouts apply)",
                p.id,
                parts.join(", ")
            ));
        }
    }
    if let Some(endpoint) = config
        .mesh
        .tracing
        .otlp_endpoint
        .as_ref()
        .filter(|e| e.starts_with("https://"))
    {
        out.push(format!(
            "Mesh tracing.otlpEndpoint {endpoint}: https:// collectors are not supported yet, spans are not exported"
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const YAML: &str = r#"apiVersion: outrigger.io/v1alpha1
kind: Workload
metadata: {name: web, namespace: shop}
spec:
  inbound: [{name: main, port: 0, appPort: 9}]
"#;

    #[tokio::test]
    async fn starts_without_a_configuration_and_takes_one_later() {
        let running = start(ProxyOptions::loopback("shop/web"), None)
            .await
            .expect("starts");
        assert!(!running.state.is_ready());
        assert!(running.state.listeners().is_empty());
        let config: serde_json::Value =
            serde_json::from_str(&admin::config_json(&running.state)).expect("JSON");
        assert!(config["version"].is_null(), "{config}");

        let loaded = load_str("pushed", YAML, "shop/web")
            .expect("valid")
            .with_version("cp-7");
        let summary = running.apply(loaded).await.expect("applies");
        assert_eq!(summary.version, "cp-7");
        assert_eq!(summary.added.len(), 1, "{summary:?}");
        assert!(running.state.is_ready());
        let config: serde_json::Value =
            serde_json::from_str(&admin::config_json(&running.state)).expect("JSON");
        assert_eq!(config["version"], "cp-7");
        assert_eq!(config["source"], "pushed");
        assert_eq!(config["listeners"][0]["name"], "inbound/main");

        assert_eq!(
            running.shutdown(Duration::from_secs(5)).await,
            DrainOutcome::Complete
        );
        assert!(!running.state.is_ready());
        let again = load_str("pushed", YAML, "shop/web").expect("valid");
        assert!(matches!(
            running.apply(again).await,
            Err(ApplyError::Draining)
        ));
    }

    #[test]
    fn load_str_names_its_source_in_errors() {
        let error = load_str("snapshot 12", YAML, "shop/nope").expect_err("no such workload");
        assert!(error.to_string().starts_with("snapshot 12: "), "{error}");
    }
}
