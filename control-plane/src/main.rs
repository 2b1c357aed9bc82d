//! `outrigger`: the control plane server (`serve`) and the operator CLI.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};

mod api;
mod auth;
mod ca;
mod certify;
mod client;
mod demo;
mod discovery;
mod hub;
mod inject;
mod metrics;
mod resources;
mod server;
mod store;
mod webhook;
pub use outrigger_config::timefmt;
mod tokens;

use client::{Api, Connection, Output};

#[derive(Debug, Parser)]
#[command(
    name = "outrigger",
    version,
    about = "Outrigger service mesh: the control plane and the operator CLI"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the control plane: policy store, REST API, gRPC policy push.
    Serve(ServeArgs),
    /// Create or update resources from a YAML (or JSON) file, all or nothing.
    Apply {
        /// The file, or - for stdin.
        #[arg(short = 'f', long = "file", value_name = "FILE")]
        file: PathBuf,
        #[command(flatten)]
        write: WriteArgs,
        #[command(flatten)]
        connection: Connection,
    },
    /// Show resources: KIND is mesh, workload, service (svc),
    /// trafficpolicy (tp), authorizationpolicy (authz), or all.
    Get {
        kind: String,
        /// NAME or NAMESPACE/NAME.
        name: Option<String>,
        #[arg(short = 'n', long)]
        namespace: Option<String>,
        #[arg(short = 'o', long, value_enum, default_value = "table")]
        output: Output,
        #[command(flatten)]
        connection: Connection,
    },
    /// Delete a resource (refused if others still refer to it).
    Delete {
        kind: String,
        /// NAME or NAMESPACE/NAME.
        name: String,
        #[arg(short = 'n', long)]
        namespace: Option<String>,
        #[command(flatten)]
        write: WriteArgs,
        #[command(flatten)]
        connection: Connection,
    },
    /// List revisions, or show one revision's changes as a diff.
    History {
        revision: Option<u64>,
        #[command(flatten)]
        connection: Connection,
    },
    /// Go back to the policy of an earlier revision (as a new revision).
    Rollback {
        revision: u64,
        #[command(flatten)]
        write: WriteArgs,
        #[command(flatten)]
        connection: Connection,
    },
    /// Show every connected sidecar and whether it runs the latest policy.
    ProxyStatus {
        #[arg(short = 'o', long, value_enum, default_value = "table")]
        output: Output,
        #[command(flatten)]
        connection: Connection,
    },
    /// Write a consistent copy of the store (while the server runs) to FILE.
    Backup {
        file: PathBuf,
        #[command(flatten)]
        connection: Connection,
    },
    /// Bootstrap tokens: what a sidecar proves its workload with to get a
    /// certificate.
    #[command(subcommand)]
    Token(TokenCommand),
    /// What the current policy decides for a request, and why.
    #[command(subcommand)]
    Authz(AuthzCommand),
    /// Check a policy file (multi-document YAML) and report every problem.
    Validate {
        /// The file to check.
        #[arg(short = 'f', long = "file", value_name = "FILE")]
        file: PathBuf,
    },
    /// Add the outrigger-proxy sidecar to the pod templates in Kubernetes
    /// YAML (Deployments, StatefulSets, DaemonSets, Jobs, CronJobs, Pods,
    /// Lists); prints the result. Other documents pass through unchanged.
    Inject {
        /// The file, or - for stdin.
        #[arg(short = 'f', long = "file", value_name = "FILE")]
        file: PathBuf,
    },
    /// Remove what `outrigger inject` added.
    Uninject {
        /// The file, or - for stdin.
        #[arg(short = 'f', long = "file", value_name = "FILE")]
        file: PathBuf,
    },
    /// Run a small mesh on loopback, show what it does, and exit.
    Demo {
        /// Directory for the demo's files (default: a fresh temp directory,
        /// removed afterwards).
        #[arg(long, value_name = "DIR")]
        dir: Option<PathBuf>,
    },
}

#[derive(Debug, Subcommand)]
enum AuthzCommand {
    /// Ask the control plane what WORKLOAD's sidecar would decide for a
    /// request (over mTLS) and which rule decides it. Exit code 0 when
    /// allowed, 1 when denied (like `kubectl auth can-i`).
    Check {
        /// NAME or NAMESPACE/NAME.
        #[arg(long)]
        workload: String,
        /// The caller's SPIFFE ID.
        #[arg(long, value_name = "SPIFFE_ID")]
        from: Option<String>,
        #[arg(long, default_value = "GET")]
        method: String,
        #[arg(long, default_value = "/")]
        path: String,
        /// The inbound port (rules that name ports need it).
        #[arg(long)]
        port: Option<u16>,
        #[command(flatten)]
        connection: Connection,
    },
}

#[derive(Debug, Subcommand)]
enum TokenCommand {
    /// Make a token for one workload and print it (only this once); give
    /// it to the sidecar with --token-file.
    Create {
        /// NAME or NAMESPACE/NAME.
        #[arg(long)]
        workload: String,
        #[arg(short = 'n', long)]
        namespace: Option<String>,
        /// How long it can be used, e.g. 720h (default: a year). Every
        /// renewal uses it, so it must outlive the certificates.
        #[arg(long)]
        ttl: Option<String>,
        #[command(flatten)]
        connection: Connection,
    },
    /// Revoke a token by its id: no more certificates for it.
    Revoke {
        id: String,
        #[command(flatten)]
        connection: Connection,
    },
    /// List tokens (ids, workloads, expiry; never the tokens).
    List {
        #[command(flatten)]
        connection: Connection,
    },
}

/// Options of the verbs that change the policy.
#[derive(Debug, clap::Args)]
struct WriteArgs {
    /// Refuse (409) unless the current revision is this one.
    #[arg(long, value_name = "N")]
    expected_revision: Option<u64>,
    /// Show what would change (with a diff); change nothing.
    #[arg(long)]
    dry_run: bool,
}

#[derive(Debug, clap::Args)]
struct ServeArgs {
    /// Where the store (store.redb) and the admin token live.
    #[arg(long, env = "OUTRIGGER_DATA_DIR", default_value = "outrigger-data")]
    data_dir: PathBuf,
    /// gRPC for sidecars (policy discovery).
    #[arg(long, env = "OUTRIGGER_GRPC_ADDR", default_value = "0.0.0.0:15010")]
    grpc_addr: SocketAddr,
    /// REST API for operators (bearer token).
    #[arg(long, env = "OUTRIGGER_API_ADDR", default_value = "127.0.0.1:15011")]
    api_addr: SocketAddr,
    /// /live, /ready and /metrics.
    #[arg(long, env = "OUTRIGGER_ADMIN_ADDR", default_value = "127.0.0.1:15014")]
    admin_addr: SocketAddr,
    /// Restore this backup into an empty data dir before serving.
    #[arg(long, env = "OUTRIGGER_RESTORE", value_name = "FILE")]
    restore: Option<PathBuf>,
    /// How long a disconnected sidecar's endpoints stay (it may be
    /// reconnecting), e.g. 10s.
    #[arg(long, env = "OUTRIGGER_ENDPOINT_GRACE", default_value = "10s", value_parser = duration)]
    endpoint_grace: Duration,
    /// The CA certificate to sign workload certificates with (PEM; an
    /// intermediate may be followed by its issuers). Default: a root the
    /// server makes in the data dir on first start.
    #[arg(
        long,
        env = "OUTRIGGER_CA_CERT",
        value_name = "FILE",
        requires = "ca_key"
    )]
    ca_cert: Option<PathBuf>,
    /// The private key of --ca-cert (PEM).
    #[arg(
        long,
        env = "OUTRIGGER_CA_KEY",
        value_name = "FILE",
        requires = "ca_cert"
    )]
    ca_key: Option<PathBuf>,
    /// Serve the sidecar injector as a mutating admission webhook (HTTPS,
    /// path /mutate) on this address, e.g. 0.0.0.0:15017.
    #[arg(
        long,
        env = "OUTRIGGER_WEBHOOK_ADDR",
        requires_all = ["webhook_cert", "webhook_key"]
    )]
    webhook_addr: Option<SocketAddr>,
    /// The webhook's serving certificate (PEM; leaf first), for the name
    /// the API server calls it by, e.g. outrigger.outrigger-system.svc.
    #[arg(
        long,
        env = "OUTRIGGER_WEBHOOK_CERT",
        value_name = "FILE",
        requires = "webhook_addr"
    )]
    webhook_cert: Option<PathBuf>,
    /// Its private key (PEM).
    #[arg(
        long,
        env = "OUTRIGGER_WEBHOOK_KEY",
        value_name = "FILE",
        requires = "webhook_addr"
    )]
    webhook_key: Option<PathBuf>,
    /// When a pod cannot be injected: admit it as it is (ignore) or
    /// refuse it (fail).
    #[arg(
        long,
        env = "OUTRIGGER_WEBHOOK_FAILURE_POLICY",
        value_enum,
        default_value = "ignore"
    )]
    webhook_failure_policy: webhook::FailurePolicy,
    /// The roots sidecars trust (PEM, several during a root rotation).
    /// Default: the CA certificate itself.
    #[arg(long, env = "OUTRIGGER_TRUST_BUNDLE", value_name = "FILE")]
    trust_bundle: Option<PathBuf>,
    /// How long workload certificates live, e.g. 24h; sidecars renew at
    /// about half of it.
    #[arg(long, env = "OUTRIGGER_CERT_TTL", default_value = "24h", value_parser = positive_duration)]
    cert_ttl: Duration,
    /// Refuse policy streams from sidecars without a valid bootstrap token
    /// for their workload (otherwise they are served, with a warning, so a
    /// mesh can move to tokens sidecar by sidecar).
    #[arg(long, env = "OUTRIGGER_REQUIRE_TOKENS")]
    require_tokens: bool,
    /// Log filter, e.g. info or outrigger=debug.
    #[arg(long, env = "OUTRIGGER_LOG", default_value = "info")]
    log: String,
}

fn duration(s: &str) -> Result<Duration, String> {
    outrigger_config::parse_duration(s)
}

/// A workload certificate's life: at least a second (tests rotate fast),
/// at most a year (short-lived is the point).
fn positive_duration(s: &str) -> Result<Duration, String> {
    let d = outrigger_config::parse_duration(s)?;
    if d < Duration::from_secs(1) {
        return Err("must be at least 1s".to_string());
    }
    if d > Duration::from_secs(365 * 86_400) {
        return Err("must be at most 8760h (a year)".to_string());
    }
    Ok(d)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Validate { file } => return validate(&file),
        Command::Inject { file } => return inject_command(&file, inject::inject),
        Command::Uninject { file } => return inject_command(&file, inject::uninject),
        Command::Serve(args) => {
            init_logging(&args.log);
            runtime(2).and_then(|rt| rt.block_on(serve(args)))
        }
        Command::Demo { dir } => runtime(2)
            .and_then(|rt| rt.block_on(demo::run(dir)))
            .map_err(|e| e.context("outrigger demo failed")),
        command => runtime(1).and_then(|rt| rt.block_on(client_command(command))),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn runtime(threads: usize) -> anyhow::Result<tokio::runtime::Runtime> {
    let mut builder = if threads == 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        let mut b = tokio::runtime::Builder::new_multi_thread();
        b.worker_threads(threads);
        b
    };
    builder
        .enable_all()
        .build()
        .map_err(|e| anyhow::anyhow!("cannot start the runtime: {e}"))
}

async fn client_command(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Apply {
            file,
            write,
            connection,
        } => {
            let api = Api::new(&connection)?;
            client::apply(&api, &file, write.expected_revision, write.dry_run).await
        }
        Command::Get {
            kind,
            name,
            namespace,
            output,
            connection,
        } => {
            let api = Api::new(&connection)?;
            client::get(&api, &kind, name.as_deref(), namespace.as_deref(), output).await
        }
        Command::Delete {
            kind,
            name,
            namespace,
            write,
            connection,
        } => {
            let api = Api::new(&connection)?;
            let ns = namespace.as_deref();
            client::delete(
                &api,
                &kind,
                &name,
                ns,
                write.expected_revision,
                write.dry_run,
            )
            .await
        }
        Command::History {
            revision,
            connection,
        } => client::history(&Api::new(&connection)?, revision).await,
        Command::Rollback {
            revision,
            write,
            connection,
        } => {
            let api = Api::new(&connection)?;
            client::rollback(&api, revision, write.expected_revision, write.dry_run).await
        }
        Command::ProxyStatus { output, connection } => {
            client::proxy_status(&Api::new(&connection)?, output).await
        }
        Command::Backup { file, connection } => {
            client::backup(&Api::new(&connection)?, &file).await
        }
        Command::Token(TokenCommand::Create {
            workload,
            namespace,
            ttl,
            connection,
        }) => {
            let workload = match namespace {
                Some(ns) if !workload.contains('/') => format!("{ns}/{workload}"),
                _ => workload,
            };
            client::token_create(&Api::new(&connection)?, &workload, ttl.as_deref()).await
        }
        Command::Token(TokenCommand::Revoke { id, connection }) => {
            client::token_revoke(&Api::new(&connection)?, &id).await
        }
        Command::Token(TokenCommand::List { connection }) => {
            client::token_list(&Api::new(&connection)?).await
        }
        Command::Authz(AuthzCommand::Check {
            workload,
            from,
            method,
            path,
            port,
            connection,
        }) => {
            let allowed = client::authz_check(
                &Api::new(&connection)?,
                &workload,
                from.as_deref(),
                &method,
                &path,
                port,
            )
            .await?;
            if !allowed {
                std::process::exit(1);
            }
            Ok(())
        }
        Command::Serve(_)
        | Command::Validate { .. }
        | Command::Inject { .. }
        | Command::Uninject { .. }
        | Command::Demo { .. } => {
            unreachable!("handled in main")
        }
    }
}

async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let running = server::start(server::ServeOptions {
        data_dir: args.data_dir,
        grpc_addr: args.grpc_addr,
        api_addr: args.api_addr,
        admin_addr: args.admin_addr,
        restore: args.restore,
        endpoint_grace: args.endpoint_grace,
        ca: ca::CaOptions {
            cert: args.ca_cert,
            key: args.ca_key,
            trust_bundle: args.trust_bundle,
        },
        cert_ttl: args.cert_ttl,
        require_tokens: args.require_tokens,
    })
    .await?;
    let webhook = match (&args.webhook_addr, &args.webhook_cert, &args.webhook_key) {
        (Some(addr), Some(cert), Some(key)) => {
            Some(webhook::serve(*addr, cert, key, args.webhook_failure_policy).await?)
        }
        _ => None,
    };
    // One machine-readable line on stdout: scripts and tests learn the
    // bound ports (any of them may be port 0).
    let line = serde_json::json!({
        "event": "listening",
        "grpc": running.grpc_addr,
        "api": running.api_addr,
        "admin": running.admin_addr,
        "webhook": webhook,
        "tokenFile": running.token_file,
        "revision": running.control_plane.state().revision,
    });
    println!("{line}");
    tracing::info!(grpc = %running.grpc_addr, api = %running.api_addr, admin = %running.admin_addr, "control plane serving");

    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let signal = tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = int.recv() => "SIGINT",
    };
    // Every write is durable before it is acknowledged, so there is
    // nothing to flush: stopping is just exiting.
    tracing::info!(%signal, "exiting");
    Ok(())
}

fn init_logging(filter: &str) {
    use std::io::IsTerminal;
    let filter = tracing_subscriber::EnvFilter::try_new(filter).unwrap_or_else(|e| {
        eprintln!("outrigger: bad --log filter {filter:?} ({e}); using info");
        tracing_subscriber::EnvFilter::new("info")
    });
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr)
        .init();
}

type Injector = fn(&str, &str) -> Result<(String, inject::Report), inject::InjectError>;

/// Reads `file` (or stdin for `-`), writes the result to stdout and what
/// was done to stderr.
fn inject_command(file: &std::path::Path, run: Injector) -> ExitCode {
    let (name, text) = if file.as_os_str() == "-" {
        let mut text = String::new();
        match std::io::Read::read_to_string(&mut std::io::stdin(), &mut text) {
            Ok(_) => ("stdin".to_string(), text),
            Err(e) => {
                eprintln!("error: cannot read stdin: {e}");
                return ExitCode::FAILURE;
            }
        }
    } else {
        match std::fs::read_to_string(file) {
            Ok(text) => (file.display().to_string(), text),
            Err(e) => {
                eprintln!("error: cannot read {}: {e}", file.display());
                return ExitCode::FAILURE;
            }
        }
    };
    match run(&name, &text) {
        Ok((out, report)) => {
            print!("{out}");
            for changed in &report.changed {
                eprintln!("{changed}: changed");
            }
            for skipped in &report.skipped {
                eprintln!("{skipped}: left as is");
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn validate(file: &std::path::Path) -> ExitCode {
    match outrigger_config::load_file(file) {
        Ok(config) => {
            println!(
                "{}: valid ({} workloads, {} services, {} traffic policies, {} authorization policies)",
                file.display(),
                config.workloads.len(),
                config.services.len(),
                config.traffic_policies.len(),
                config.authorization_policies.len()
            );
            ExitCode::SUCCESS
        }
        Err(errors) => {
            eprintln!("{errors}");
            ExitCode::FAILURE
        }
    }
}
