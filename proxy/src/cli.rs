//! Command-line flags. Every flag can also be set with an `OUTRIGGER_*`
//! environment variable (handy in a Kubernetes pod spec).

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;

use crate::access_log::AccessLogFormat;
use crate::app::ProxyOptions;
use crate::http::server::ServerSettings;

#[derive(Debug, Parser)]
#[command(
    name = "outrigger-proxy",
    version,
    about = "The Outrigger sidecar proxy",
    long_about = "The Outrigger sidecar proxy.\n\nRuns one workload's inbound and outbound listeners from a mesh \
configuration file (--config) or from the policy a control plane pushes (--control-plane; the sidecar ACKs \
what it applies, NACKs what it cannot, keeps serving its last good policy when the control plane is away, \
and saves it to --state-dir for restarts). On start it prints one JSON line to stdout with the bound addresses; logs go to stderr.\n\n\
On SIGHUP it reads the file again and applies it without a restart: new listeners are bound, removed ones \
stop accepting (their open connections finish), kept ones switch to the new endpoints and timeouts for the \
next request while requests in flight finish where they started. If the file is invalid or a port cannot be \
bound, the error is logged and the previous configuration keeps serving; /config shows the version running."
)]
pub struct Args {
    /// Mesh configuration file (multi-document YAML). Either this or
    /// --control-plane.
    #[arg(
        long,
        env = "OUTRIGGER_CONFIG",
        value_name = "FILE",
        required_unless_present = "control_plane",
        conflicts_with = "control_plane"
    )]
    pub config: Option<PathBuf>,

    /// The control plane's gRPC address, e.g. http://outrigger:15010: the
    /// policy comes from it, pushed hot.
    #[arg(long, env = "OUTRIGGER_CONTROL_PLANE", value_name = "URL", value_parser = control_plane_url)]
    pub control_plane: Option<String>,

    /// With --control-plane: where the last good snapshot is saved, so a
    /// restart serves it while the control plane is unreachable.
    #[arg(
        long,
        env = "OUTRIGGER_STATE_DIR",
        value_name = "DIR",
        requires = "control_plane"
    )]
    pub state_dir: Option<PathBuf>,

    /// With --control-plane: this sidecar's id in proxy-status (default:
    /// HOSTNAME.PID).
    #[arg(long, env = "OUTRIGGER_PROXY_ID", requires = "control_plane")]
    pub proxy_id: Option<String>,

    /// With --control-plane: the IP peers reach our inbound listeners at
    /// (registered as endpoints; in Kubernetes, the pod IP). Default: the
    /// address the control plane sees our connection come from.
    #[arg(long, env = "OUTRIGGER_ADVERTISE_IP", requires = "control_plane")]
    pub advertise_ip: Option<IpAddr>,

    /// The Workload this sidecar runs, as NAME or NAMESPACE/NAME.
    #[arg(long, env = "OUTRIGGER_WORKLOAD", value_name = "NAME", value_parser = workload_name)]
    pub workload: String,

    /// Admin listener (/live, /ready, /metrics, /config).
    #[arg(long, env = "OUTRIGGER_ADMIN_ADDR", default_value = "127.0.0.1:15000")]
    pub admin_addr: SocketAddr,

    /// This sidecar's certificate chain (PEM, leaf first; its URI SAN is
    /// the workload's SPIFFE ID). With --tls-key and --trust-bundle it
    /// turns on mTLS: inbound requires a client certificate from the
    /// bundle, outbound verifies each server's SPIFFE ID. SIGHUP re-reads
    /// all three files.
    #[arg(long, env = "OUTRIGGER_TLS_CERT", value_name = "FILE", requires_all = ["tls_key", "trust_bundle"])]
    pub tls_cert: Option<PathBuf>,

    /// The private key of --tls-cert (PEM).
    #[arg(long, env = "OUTRIGGER_TLS_KEY", value_name = "FILE", requires_all = ["tls_cert", "trust_bundle"])]
    pub tls_key: Option<PathBuf>,

    /// The roots peers' certificates must chain to (PEM; several during a
    /// root rotation).
    #[arg(long, env = "OUTRIGGER_TRUST_BUNDLE", value_name = "FILE", requires_all = ["tls_cert", "tls_key"])]
    pub trust_bundle: Option<PathBuf>,

    /// With --control-plane: the bootstrap token (`outrigger token
    /// create`) this sidecar gets its certificates with. Turns on mTLS;
    /// read again at every renewal.
    #[arg(
        long,
        env = "OUTRIGGER_BOOTSTRAP_TOKEN_FILE",
        value_name = "FILE",
        requires = "control_plane",
        conflicts_with = "tls_cert"
    )]
    pub token_file: Option<PathBuf>,

    /// Accept TLS 1.2 between sidecars as well as TLS 1.3.
    #[arg(long, env = "OUTRIGGER_TLS12")]
    pub tls12: bool,

    /// IP the inbound listeners bind; peers must be able to reach it.
    #[arg(long, env = "OUTRIGGER_INBOUND_IP", default_value_t = IpAddr::V4(Ipv4Addr::UNSPECIFIED))]
    pub inbound_ip: IpAddr,

    /// IP the outbound listeners bind; only the local app should reach it.
    #[arg(long, env = "OUTRIGGER_OUTBOUND_IP", default_value_t = IpAddr::V4(Ipv4Addr::LOCALHOST))]
    pub outbound_ip: IpAddr,

    /// IP the local app listens on.
    #[arg(long, env = "OUTRIGGER_APP_IP", default_value_t = IpAddr::V4(Ipv4Addr::LOCALHOST))]
    pub app_ip: IpAddr,

    /// Largest request header section accepted (bytes); larger gets 431.
    #[arg(long, env = "OUTRIGGER_MAX_HEADER_BYTES", default_value_t = 64 * 1024,
          value_parser = clap::value_parser!(u32).range(1024..=16 * 1024 * 1024))]
    pub max_header_bytes: u32,

    /// Time a client has to send a request's headers (and the longest an
    /// idle HTTP/1 keep-alive connection is kept), e.g. 10s.
    #[arg(long, env = "OUTRIGGER_HEADER_READ_TIMEOUT", default_value = "10s", value_parser = duration)]
    pub header_read_timeout: Duration,

    /// On SIGTERM/SIGINT, how long in-flight requests get to finish, e.g. 10s.
    #[arg(long, env = "OUTRIGGER_DRAIN_DEADLINE", default_value = "10s", value_parser = duration)]
    pub drain_deadline: Duration,

    /// Worker threads; 1 runs everything on one thread (the usual sidecar
    /// budget, and the cheapest per request).
    #[arg(long, env = "OUTRIGGER_THREADS", default_value_t = 1,
          value_parser = clap::value_parser!(u16).range(1..=256))]
    pub threads: u16,

    /// Log filter, e.g. info or outrigger_proxy=debug.
    #[arg(long, env = "OUTRIGGER_LOG", default_value = "info")]
    pub log: String,

    /// Log format.
    #[arg(long, env = "OUTRIGGER_LOG_FORMAT", value_enum, default_value = "text")]
    pub log_format: LogFormat,

    /// Access log: one line per request on stdout, as text or JSON.
    #[arg(long, env = "OUTRIGGER_ACCESS_LOG", value_enum, default_value = "off")]
    pub access_log: AccessLogFormat,

    /// Percent of requests the access log records, 0 to 100.
    #[arg(long, env = "OUTRIGGER_ACCESS_LOG_SAMPLE", default_value_t = 100.0, value_parser = percent)]
    pub access_log_sample: f64,
}

fn percent(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(p) if (0.0..=100.0).contains(&p) => Ok(p),
        _ => Err(format!("expected a percent from 0 to 100, got {s:?}")),
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// `http://host:port`, nothing else: a typo here
/// would otherwise only show as a sidecar retrying forever.
fn control_plane_url(s: &str) -> Result<String, String> {
    let uri: http::Uri = s
        .parse()
        .map_err(|e| format!("not a URL ({e}); expected http://HOST:PORT"))?;
    match uri.scheme_str() {
        Some("http") => {}
        // The stream is plain HTTP/2 until the control plane has a CA
        // (issue 5); refusing here beats a handshake error on every retry.
        Some("https") => return Err("https:// is not supported yet: use http://".to_string()),
        Some(other) => return Err(format!("scheme {other:?}: expected http://")),
        None => return Err("expected http://HOST:PORT".to_string()),
    }
    if uri.host().is_none_or(str::is_empty) {
        return Err("the URL has no host".to_string());
    }
    if !matches!(uri.path(), "" | "/") || uri.query().is_some() {
        return Err("expected http://HOST:PORT, without a path".to_string());
    }
    Ok(s.trim_end_matches('/').to_string())
}

fn workload_name(s: &str) -> Result<String, String> {
    outrigger_config::parse_workload_ref(s).map(|_| s.to_string())
}

fn duration(s: &str) -> Result<Duration, String> {
    let d = outrigger_config::parse_duration(s)?;
    if d.is_zero() {
        return Err("must be more than zero".to_string());
    }
    Ok(d)
}

impl Args {
    pub fn options(&self) -> ProxyOptions {
        ProxyOptions {
            config_path: self.config.clone(),
            workload: self.workload.clone(),
            admin_addr: self.admin_addr,
            inbound_ip: self.inbound_ip,
            outbound_ip: self.outbound_ip,
            app_ip: self.app_ip,
            server: ServerSettings {
                max_header_bytes: self.max_header_bytes as usize,
                header_read_timeout: self.header_read_timeout,
            },
            // Loaded by the binary, which can fail and say why.
            identity: None,
            allow_tls12: self.tls12,
            access_log: self.access_log,
            access_log_sample: self.access_log_sample,
        }
    }
}
