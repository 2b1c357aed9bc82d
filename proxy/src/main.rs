//! `outrigger-proxy`: the sidecar binary.

use std::process::ExitCode;

use clap::Parser;
use outrigger_proxy::app;
use outrigger_proxy::cli::{Args, LogFormat};
use outrigger_proxy::drain::DrainOutcome;
use outrigger_proxy::identity::{Credentials, Identity, TrustBundle};
use outrigger_proxy::identity_client::{self, IdentityClientOptions};
use outrigger_proxy::policy_client::{self, PolicyClientOptions};
use outrigger_proxy::state::Loaded;
use std::path::{Path, PathBuf};

use anyhow::Context as _;
use std::sync::Arc;
use tracing_subscriber::EnvFilter;

fn main() -> ExitCode {
    let args = Args::parse();
    init_logging(&args);
    let runtime = if args.threads == 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(usize::from(args.threads))
            .enable_all()
            .build()
    };
    let runtime = match runtime {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("outrigger-proxy: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("outrigger-proxy: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> anyhow::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    // Installed before anything else: SIGHUP's default action would kill
    // the process.
    let mut hangup = signal(SignalKind::hangup())?;
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;

    let mut options = args.options();
    let tls_files = TlsFiles::from_args(&args);
    if let Some(files) = &tls_files {
        let identity = Arc::new(Identity::new());
        files.load_into(&identity)?;
        options.identity = Some(identity);
    }
    if args.token_file.is_some() {
        // Empty until the control plane signs our first certificate.
        options.identity = Some(Arc::new(Identity::new()));
    }
    let loaded = match (&args.config, &args.state_dir) {
        (Some(path), _) => Some(app::load(path, &options.workload)?),
        (None, Some(dir)) => policy_client::load_saved(dir, &options.workload),
        (None, None) => {
            tracing::warn!(
                "no --state-dir: snapshots are not saved, so a restart while the control plane is unreachable will have no policy to serve"
            );
            None
        }
    };
    if let (Some(loaded), Some(identity)) = (&loaded, &options.identity) {
        check_identity(loaded, identity)?;
    }
    match &loaded {
        Some(loaded) => {
            tracing::info!(workload = %loaded.workload, version = %loaded.version, source = %loaded.source, "configuration loaded")
        }
        None => tracing::info!(
            workload = %options.workload,
            "no policy yet: waiting for the control plane's first snapshot (not ready until then)"
        ),
    }
    let running = Arc::new(app::start(options, loaded).await?);
    if let Some(endpoint) = &args.control_plane {
        let client = PolicyClientOptions {
            endpoint: endpoint.clone(),
            workload: args.workload.clone(),
            proxy_id: args.proxy_id.clone().unwrap_or_else(default_proxy_id),
            advertise_ip: args.advertise_ip,
            state_dir: args.state_dir.clone(),
            token_file: args.token_file.clone(),
        };
        tokio::spawn(policy_client::run(client, running.clone()));
        if let (Some(token_file), Some(identity)) = (&args.token_file, running.state.identity()) {
            let options = IdentityClientOptions {
                endpoint: endpoint.clone(),
                token_file: token_file.clone(),
            };
            tokio::spawn(identity_client::run(
                options,
                running.clone(),
                identity.clone(),
            ));
        }
    }

    // One machine-readable line on stdout, so scripts and tests learn the
    // bound ports (listeners may be configured with port 0).
    let line = serde_json::json!({
        "event": "listening",
        "admin": running.admin_addr,
        "listeners": running.state.listeners(),
    });
    println!("{line}");

    let signal = loop {
        tokio::select! {
            _ = hangup.recv() => {
                if let (Some(files), Some(identity)) = (&tls_files, running.state.identity()) {
                    match files.load_into(identity) {
                        Ok(()) => tracing::info!("SIGHUP: certificate and trust bundle re-read"),
                        Err(e) => tracing::error!("SIGHUP: keeping the current certificate: {e:#}"),
                    }
                }
                match &args.config {
                    Some(path) => reload(&running, path, &args.workload).await,
                    None => tracing::info!("SIGHUP: the policy comes from the control plane"),
                }
            }
            _ = term.recv() => break "SIGTERM",
            _ = int.recv() => break "SIGINT",
        }
    };
    tracing::info!(%signal, deadline = ?args.drain_deadline, "draining");
    match running.shutdown(args.drain_deadline).await {
        DrainOutcome::Complete => tracing::info!("drained; exiting"),
        DrainOutcome::DeadlineExceeded { remaining } => tracing::warn!(
            remaining,
            "drain deadline passed with connections still open; exiting anyway"
        ),
    }
    Ok(())
}

/// SIGHUP: re-reads the configuration file and applies it. Any error
/// leaves the running configuration serving as it was.
async fn reload(running: &app::Running, path: &Path, workload: &str) {
    let current = running
        .state
        .loaded()
        .map(|l| l.version.clone())
        .unwrap_or_default();
    tracing::info!(config = %path.display(), "SIGHUP: reloading the configuration");
    let loaded = match app::load(path, workload) {
        Ok(loaded) => loaded,
        Err(e) => {
            tracing::error!("reload refused, still serving version {current}: {e:#}");
            return;
        }
    };
    let version = loaded.version.clone();
    if let Err(e) = running.apply(loaded).await {
        tracing::error!(
            "reload of version {version} refused, still serving version {current}: {e}"
        );
    }
}

/// Certificate, key and bundle files given on the command line.
struct TlsFiles {
    cert: PathBuf,
    key: PathBuf,
    bundle: PathBuf,
}

impl TlsFiles {
    fn from_args(args: &Args) -> Option<Self> {
        Some(Self {
            cert: args.tls_cert.clone()?,
            key: args.tls_key.clone()?,
            bundle: args.trust_bundle.clone()?,
        })
    }

    /// Reads all three and swaps them in together, or changes nothing. A
    /// certificate with another SPIFFE ID than the one in use is refused:
    /// a sidecar does not change who it is.
    fn load_into(&self, identity: &Identity) -> anyhow::Result<()> {
        let credentials = Credentials::from_files(&self.cert, &self.key)?;
        let bundle = TrustBundle::from_file(&self.bundle)?;
        if let Some(current) = identity.credentials()
            && current.spiffe_id != credentials.spiffe_id
        {
            anyhow::bail!(
                "{} is for {}, but this sidecar is {}",
                self.cert.display(),
                credentials.spiffe_id,
                current.spiffe_id
            );
        }
        bundle
            .check(&credentials)
            .with_context(|| format!("{}", self.cert.display()))?;
        identity.set_bundle(bundle);
        identity.set_credentials(credentials);
        Ok(())
    }
}

/// The certificate must name the workload this sidecar runs, or every
/// peer would refuse it (or worse, trust it as someone else).
fn check_identity(loaded: &Loaded, identity: &Identity) -> anyhow::Result<()> {
    let Some(credentials) = identity.credentials() else {
        return Ok(());
    };
    let Some(workload) = loaded
        .config
        .workloads
        .iter()
        .find(|w| w.id == loaded.workload)
    else {
        return Ok(());
    };
    let expected = workload.spiffe_id(&loaded.config.mesh.trust_domain);
    if credentials.spiffe_id != expected {
        anyhow::bail!(
            "the certificate is for {}, but workload {} is {expected} (trust domain {:?}, service account {:?})",
            credentials.spiffe_id,
            workload.id,
            loaded.config.mesh.trust_domain,
            workload.service_account
        );
    }
    Ok(())
}

/// `HOSTNAME.PID`: in Kubernetes the hostname is the pod name.
fn default_proxy_id() -> String {
    let host = std::env::var("HOSTNAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/proc/sys/kernel/hostname").ok())
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "sidecar".to_string());
    format!("{host}.{}", std::process::id())
}

fn init_logging(args: &Args) {
    let filter = EnvFilter::try_new(&args.log).unwrap_or_else(|e| {
        eprintln!(
            "outrigger-proxy: bad --log filter {:?} ({e}); using info",
            args.log
        );
        EnvFilter::new("info")
    });
    use std::io::IsTerminal;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    match args.log_format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}
