//! `outrigger`: the operator CLI.
//!
//! Today it validates policy files and runs a local demo mesh. The control
//! plane server (`outrigger serve`) and the REST-backed verbs (apply, get,
//! ...) arrive with the control-plane work.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod demo;

#[derive(Debug, Parser)]
#[command(
    name = "outrigger",
    version,
    about = "Outrigger service mesh: operator CLI"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Check a policy file (multi-document YAML) and report every problem.
    Validate {
        /// The file to check.
        #[arg(short = 'f', long = "file", value_name = "FILE")]
        file: PathBuf,
    },
    /// Run a small mesh on loopback (two sidecars, two sample apps), show
    /// what it does, and exit.
    Demo {
        /// Directory for the demo's files (default: a fresh temp directory,
        /// removed afterwards).
        #[arg(long, value_name = "DIR")]
        dir: Option<PathBuf>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Validate { file } => validate(&file),
        Command::Demo { dir } => {
            let runtime = match tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    eprintln!("outrigger: cannot start the runtime: {e}");
                    return ExitCode::FAILURE;
                }
            };
            match runtime.block_on(demo::run(dir)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("outrigger demo failed: {e:#}");
                    ExitCode::FAILURE
                }
            }
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
