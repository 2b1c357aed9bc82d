//! Assembling a running proxy from a validated configuration: bind every
//! listener, build each one's stack, start the admin server, and drain it
//! all on shutdown.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use anyhow::Context as _;
use outrigger_config::{
    LoadBalancer, MeshConfig, Protocol, ResourceRef, Service, Timeouts, Workload,
};

use crate::balance::RoundRobin;
use crate::drain::{self, DrainOutcome};
use crate::forward::Destination;
use crate::http::client::ClientSettings;
use crate::http::server::ServerSettings;
use crate::metrics::ConnectionMetrics;
use crate::state::{BoundListener, Direction, Loaded, ProxyState};
use crate::tcp::{ByteCounters, TcpTarget};
use crate::transport::Plaintext;
use crate::{admin, inbound, listener, outbound};

/// Everything needed to start a proxy (the CLI fills this in).
#[derive(Clone, Debug)]
pub struct ProxyOptions {
    pub config_path: PathBuf,
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
}

/// A started proxy.
#[derive(Debug)]
pub struct Running {
    pub state: Arc<ProxyState>,
    pub admin_addr: SocketAddr,
    drain: drain::Drain,
}

/// Loads the configuration and picks out this proxy's workload.
pub fn load(config_path: &std::path::Path, workload: &str) -> anyhow::Result<Loaded> {
    let text = std::fs::read(config_path)
        .with_context(|| format!("cannot read configuration {}", config_path.display()))?;
    let source = config_path.display().to_string();
    let yaml =
        String::from_utf8(text).map_err(|e| anyhow::anyhow!("{source}: not UTF-8 text: {e}"))?;
    let config = outrigger_config::load_str(&source, &yaml).map_err(|e| anyhow::anyhow!("{e}"))?;
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
        version: crate::state::digest(yaml.as_bytes()),
        source,
        loaded_at: SystemTime::now(),
        workload: id,
        config,
        not_enforced,
    })
}

/// Binds every listener and starts serving.
pub async fn start(options: ProxyOptions, loaded: Loaded) -> anyhow::Result<Running> {
    let prometheus = crate::metrics::install();
    for warning in &loaded.not_enforced {
        tracing::warn!("{warning}");
    }
    let config = loaded.config.clone();
    let workload = config
        .workloads
        .iter()
        .find(|w| w.id == loaded.workload)
        .cloned()
        .context("workload vanished from its own configuration")?;
    metrics::gauge!(crate::metrics::CONFIG_INFO, "version" => loaded.version.clone()).set(1.0);

    let state = ProxyState::new(loaded);
    let (drain, watch) = drain::channel();
    let mut bound = Vec::new();

    for listener in &workload.inbound {
        bound.push(start_inbound(&options, &workload, listener, watch.clone()).await?);
    }
    for listener in &workload.outbound {
        let service = config
            .service(&listener.service)
            .context("outbound service vanished from its own configuration")?;
        let timeouts = config
            .traffic_policy_for(&service.id)
            .map(|p| p.timeouts.clone())
            .unwrap_or_default();
        bound.push(
            start_outbound(&options, listener.port, service, &timeouts, watch.clone()).await?,
        );
    }
    state.set_listeners(bound);

    let admin_addr = admin::start(options.admin_addr, state.clone(), prometheus).await?;
    drop(watch);
    Ok(Running {
        state,
        admin_addr,
        drain,
    })
}

async fn start_inbound(
    options: &ProxyOptions,
    workload: &Workload,
    spec: &outrigger_config::InboundListener,
    watch: drain::Watch,
) -> anyhow::Result<BoundListener> {
    let name = format!("inbound/{}", spec.name);
    let app_addr = SocketAddr::new(options.app_ip, spec.app_port);
    let tcp = listener::bind(SocketAddr::new(options.inbound_ip, spec.port), &name).await?;
    let addr = tcp.local_addr()?;
    let metrics = ConnectionMetrics::new("inbound", &name);
    let workload_name: Arc<str> = Arc::from(workload.id.to_string());
    match spec.protocol {
        Protocol::Http => {
            let settings = ClientSettings {
                max_header_bytes: options.server.max_header_bytes,
                ..ClientSettings::default()
            };
            let app = Arc::new(Destination::new(
                workload_name,
                Plaintext,
                &[app_addr],
                &settings,
            ));
            let stack = inbound::http_stack(app);
            listener::serve_http(
                tcp,
                name.clone(),
                metrics,
                watch,
                Plaintext,
                stack,
                options.server.clone(),
            );
        }
        Protocol::Tcp => {
            let app = Arc::new(TcpTarget {
                name: workload_name,
                transport: Plaintext,
                endpoints: RoundRobin::new(vec![app_addr]),
                connect_timeout: Timeouts::default().connect,
                idle_timeout: spec.idle_timeout,
                counters: ByteCounters::new("inbound", &name),
            });
            listener::serve_tcp(tcp, name.clone(), metrics, watch, Plaintext, app);
        }
    }
    tracing::info!(listener = %name, %addr, app = %app_addr, protocol = %spec.protocol, "listening");
    Ok(BoundListener {
        name,
        direction: Direction::Inbound,
        protocol: spec.protocol,
        addr,
        target: app_addr.to_string(),
    })
}

async fn start_outbound(
    options: &ProxyOptions,
    port: u16,
    service: &Service,
    timeouts: &Timeouts,
    watch: drain::Watch,
) -> anyhow::Result<BoundListener> {
    let service_name: Arc<str> = Arc::from(service.id.to_string());
    let name = format!("outbound/{}", service.id);
    let tcp = listener::bind(SocketAddr::new(options.outbound_ip, port), &name).await?;
    let addr = tcp.local_addr()?;
    let metrics = ConnectionMetrics::new("outbound", &name);
    let endpoints: Vec<SocketAddr> = service.endpoints.iter().map(|e| e.address).collect();
    match service.protocol {
        Protocol::Http => {
            let settings = ClientSettings {
                connect_timeout: timeouts.connect,
                pool_idle_timeout: timeouts.idle.min(Duration::from_secs(90)),
                max_header_bytes: options.server.max_header_bytes,
            };
            let destination = Arc::new(Destination::new(
                service_name,
                Plaintext,
                &endpoints,
                &settings,
            ));
            let stack = outbound::http_stack(destination, timeouts.request);
            listener::serve_http(
                tcp,
                name.clone(),
                metrics,
                watch,
                Plaintext,
                stack,
                options.server.clone(),
            );
        }
        Protocol::Tcp => {
            let destination = Arc::new(TcpTarget {
                name: service_name,
                transport: Plaintext,
                endpoints: RoundRobin::new(endpoints),
                connect_timeout: timeouts.connect,
                idle_timeout: timeouts.idle,
                counters: ByteCounters::new("outbound", &name),
            });
            listener::serve_tcp(tcp, name.clone(), metrics, watch, Plaintext, destination);
        }
    }
    tracing::info!(listener = %name, %addr, service = %service.id, protocol = %service.protocol, "listening");
    Ok(BoundListener {
        name,
        direction: Direction::Outbound,
        protocol: service.protocol,
        addr,
        target: service.id.to_string(),
    })
}

impl Running {
    /// Stops accepting, lets in-flight work finish for up to `deadline`.
    pub async fn shutdown(self, deadline: Duration) -> DrainOutcome {
        self.state.set_draining();
        self.drain.drain(deadline).await
    }
}

/// What this workload's configuration asks for that this build does not
/// enforce yet. Saying so beats silently ignoring a security setting.
fn not_enforced(config: &MeshConfig, workload: &ResourceRef) -> Vec<String> {
    let mut out = Vec::new();
    for policy in config.authorization_policies_for(workload) {
        out.push(format!(
            "AuthorizationPolicy {} is validated but NOT enforced yet: inbound requests are not authorized (needs mTLS identities)",
            policy.id
        ));
    }
    let Some(w) = config.workloads.iter().find(|w| &w.id == workload) else {
        return out;
    };
    for listener in &w.outbound {
        if let Some(p) = config.traffic_policy_for(&listener.service) {
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
            if p.load_balancer != LoadBalancer::default()
                && p.load_balancer != LoadBalancer::RoundRobin
            {
                parts.push("loadBalancer");
            }
            if !parts.is_empty() {
                out.push(format!(
                    "TrafficPolicy {}: {} validated but not enforced yet (timeouts are; load balancing is round robin)",
                    p.id,
                    parts.join(", ")
                ));
            }
        }
    }
    if config.mesh.tracing.otlp_endpoint.is_some() {
        out.push("Mesh tracing settings are validated but spans are not exported yet".to_string());
    }
    out
}
