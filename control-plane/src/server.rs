//! `outrigger serve`: the control plane process.
//!
//! Three listeners: gRPC for sidecars (policy discovery), REST for
//! operators (bearer token), and admin (`/live`, `/ready`, `/metrics`).
//! Writes go through [`ControlPlane`], one at a time: plan against the
//! current state, append the revision durably, then publish it to the
//! sidecars.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use arc_swap::ArcSwap;
use tokio::net::TcpListener;

use crate::ca::{Ca, CaOptions};
use crate::certify::{self, Authority};
use crate::hub::Hub;
use crate::resources::{Plan, PlanError, PolicyState};
use crate::store::{Change, RedbStore, Revision, Store, StoreError};
use crate::tokens::Tokens;
use crate::{api, auth, discovery, timefmt};

/// The store's file inside the data dir.
pub const STORE_FILE: &str = "store.redb";
/// Endpoints registered by sidecars, kept across restarts (live state, not
/// policy: not in the store, not in backups).
pub const REGISTRATIONS_FILE: &str = "registrations.json";

#[derive(Debug, Clone)]
pub struct ServeOptions {
    pub data_dir: PathBuf,
    pub grpc_addr: SocketAddr,
    pub api_addr: SocketAddr,
    pub admin_addr: SocketAddr,
    /// A backup to restore into an empty data dir before serving.
    pub restore: Option<PathBuf>,
    /// How long a disconnected sidecar's endpoints stay registered.
    pub endpoint_grace: Duration,
    /// Where the CA comes from.
    pub ca: CaOptions,
    /// How long the workload certificates it signs live.
    pub cert_ttl: Duration,
    /// Refuse policy streams without a valid bootstrap token.
    pub require_tokens: bool,
}

/// The policy store and its current state; all writes go through here.
pub struct ControlPlane {
    store: Arc<dyn Store>,
    state: ArcSwap<PolicyState>,
    /// One writer at a time: plan, append, publish.
    writer: tokio::sync::Mutex<()>,
    pub hub: Arc<Hub>,
    pub token: String,
    /// The CA and the bootstrap tokens.
    pub authority: Arc<Authority>,
}

/// What a write did.
pub enum Outcome {
    Unchanged {
        revision: u64,
    },
    Committed(Revision),
    /// What the change would do, not done.
    DryRun {
        revision: u64,
        changes: Vec<Change>,
    },
}

/// Why a write failed.
#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    #[error(transparent)]
    Plan(#[from] PlanError),
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl ControlPlane {
    /// `registrations`: where registered endpoints are saved across
    /// restarts (see `Hub::with_registrations_file`).
    pub fn open(
        store: Arc<dyn Store>,
        token: String,
        grace: Duration,
        registrations: Option<PathBuf>,
        authority: Arc<Authority>,
    ) -> anyhow::Result<Arc<Self>> {
        let trust_bundle = Arc::from(authority.ca.bundle_pem());
        let revisions = store.all()?;
        let state = PolicyState::replay(&revisions)?;
        let hub = Hub::with_registrations_file(
            state.revision,
            state.config.clone(),
            grace,
            registrations,
            trust_bundle,
        );
        metrics::gauge!("outrigger_cp_revision").set(state.revision as f64);
        Ok(Arc::new(Self {
            store,
            state: ArcSwap::from_pointee(state),
            writer: tokio::sync::Mutex::new(()),
            hub,
            token,
            authority,
        }))
    }

    pub fn state(&self) -> Arc<PolicyState> {
        self.state.load_full()
    }

    /// Every revision, read from the store in one consistent view.
    pub async fn revisions(&self) -> Result<Vec<Revision>, StoreError> {
        let store = self.store.clone();
        tokio::task::spawn_blocking(move || store.all())
            .await
            .map_err(|e| StoreError::Backend(e.to_string()))?
    }

    /// Plans a change with `plan` and, if it changes anything, writes it
    /// as the next revision. With `expected`, refuses (stale) unless the
    /// current revision is that one. With `dry_run`, answers what would
    /// change and writes nothing.
    pub async fn write(
        &self,
        author: &str,
        action: String,
        expected: Option<u64>,
        dry_run: bool,
        plan: impl FnOnce(&PolicyState) -> Result<Option<Plan>, PlanError>,
    ) -> Result<Outcome, WriteError> {
        self.write_inner(author, action, expected, dry_run, false, |state, _| {
            plan(state)
        })
        .await
    }

    /// Like [`ControlPlane::write`], for a plan that needs the revision
    /// log (a rollback). Only these read it: its cost grows with history.
    pub async fn write_with_log(
        &self,
        author: &str,
        action: String,
        expected: Option<u64>,
        dry_run: bool,
        plan: impl FnOnce(&PolicyState, &[Revision]) -> Result<Option<Plan>, PlanError>,
    ) -> Result<Outcome, WriteError> {
        self.write_inner(author, action, expected, dry_run, true, plan)
            .await
    }

    async fn write_inner(
        &self,
        author: &str,
        action: String,
        expected: Option<u64>,
        dry_run: bool,
        needs_log: bool,
        plan: impl FnOnce(&PolicyState, &[Revision]) -> Result<Option<Plan>, PlanError>,
    ) -> Result<Outcome, WriteError> {
        let _writer = self.writer.lock().await;
        let current = self.state.load_full();
        if let Some(expected) = expected
            && expected != current.revision
        {
            return Err(PlanError::Stale(format!(
                "the change was based on revision {expected}, but the current revision is {}; \
                 fetch the current policy and apply again",
                current.revision
            ))
            .into());
        }
        let log = if needs_log {
            self.revisions().await?
        } else {
            Vec::new()
        };
        let Some(plan) = plan(&current, &log)? else {
            return Ok(Outcome::Unchanged {
                revision: current.revision,
            });
        };
        if dry_run {
            return Ok(Outcome::DryRun {
                revision: current.revision,
                changes: plan.changes,
            });
        }
        let revision = Revision {
            number: current.revision + 1,
            at_unix_ms: timefmt::now_unix_ms(),
            author: author.to_string(),
            action,
            changes: plan.changes.clone(),
        };
        let store = self.store.clone();
        let to_append = revision.clone();
        tokio::task::spawn_blocking(move || store.append(&to_append))
            .await
            .map_err(|e| StoreError::Backend(e.to_string()))??;
        // Durable now: only then does anyone see it.
        let next = current.after(revision.number, plan);
        self.hub.set_policy(next.revision, next.config.clone());
        self.state.store(Arc::new(next));
        metrics::gauge!("outrigger_cp_revision").set(revision.number as f64);
        tracing::info!(
            revision = revision.number,
            author = %revision.author,
            action = %revision.action,
            changes = %summary(&revision.changes),
            "policy revision committed"
        );
        Ok(Outcome::Committed(revision))
    }
}

fn summary(changes: &[Change]) -> String {
    changes
        .iter()
        .map(|c| {
            let ns = if c.namespace.is_empty() {
                String::new()
            } else {
                format!("{}/", c.namespace)
            };
            format!("{} {} {}{}", c.op(), c.kind, ns, c.name)
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// A started control plane.
pub struct Running {
    pub control_plane: Arc<ControlPlane>,
    pub grpc_addr: SocketAddr,
    pub api_addr: SocketAddr,
    pub admin_addr: SocketAddr,
    pub token_file: PathBuf,
}

pub async fn start(options: ServeOptions) -> anyhow::Result<Running> {
    let prometheus = crate::metrics::install();
    std::fs::create_dir_all(&options.data_dir)
        .with_context(|| format!("cannot create data dir {}", options.data_dir.display()))?;
    restrict_to_owner(&options.data_dir)?;
    let store_path = options.data_dir.join(STORE_FILE);
    // Read and check the backup before the store file is even created, so
    // a bad backup leaves the data dir as it was.
    let backup = match &options.restore {
        Some(path) => Some((path, read_backup(path)?)),
        None => None,
    };
    let store = RedbStore::open(&store_path)?;
    if let Some((path, backup)) = backup {
        let secrets = backup
            .secrets
            .as_ref()
            .map(|s| (s.ca.clone(), s.tokens.clone()));
        restore(&store, path, backup)?;
        if let Some((ca, tokens)) = secrets {
            if let Some(ca) = ca {
                ca.restore_into(&options.data_dir)?;
            }
            tokens.restore_into(&options.data_dir)?;
        }
    }
    if !options.api_addr.ip().is_loopback() {
        tracing::warn!(api = %options.api_addr, "the REST API listens beyond loopback over plain HTTP: the admin token crosses the network in clear text");
    }
    let token = auth::load_or_create(&options.data_dir)?;
    let authority = Arc::new(Authority {
        ca: Ca::load_or_create(&options.data_dir, &options.ca)?,
        tokens: Tokens::open(&options.data_dir)?,
        cert_ttl: options.cert_ttl,
    });
    let control_plane = ControlPlane::open(
        Arc::new(store),
        token,
        options.endpoint_grace,
        Some(options.data_dir.join(REGISTRATIONS_FILE)),
        authority,
    )?;
    tracing::info!(
        revision = control_plane.state().revision,
        store = %store_path.display(),
        "policy loaded"
    );

    let grpc = bind(options.grpc_addr, "gRPC (sidecars)").await?;
    let api = bind(options.api_addr, "REST API (operators)").await?;
    let admin = bind(options.admin_addr, "admin").await?;
    let (grpc_addr, api_addr, admin_addr) =
        (grpc.local_addr()?, api.local_addr()?, admin.local_addr()?);

    let discovery = discovery::service(
        control_plane.hub.clone(),
        control_plane.authority.clone(),
        options.require_tokens,
    );
    if !options.require_tokens {
        tracing::warn!(
            "sidecars without a bootstrap token may stream policy and register endpoints; set --require-tokens once every sidecar has one"
        );
    }
    let certify = certify::service(control_plane.clone());
    tokio::spawn(async move {
        let incoming = tokio_stream::wrappers::TcpListenerStream::new(grpc);
        let result = tonic::transport::Server::builder()
            .http2_keepalive_interval(Some(Duration::from_secs(30)))
            .http2_keepalive_timeout(Some(Duration::from_secs(10)))
            .add_service(discovery)
            .add_service(certify)
            .serve_with_incoming(incoming)
            .await;
        if let Err(e) = result {
            tracing::error!(error = %e, "gRPC server stopped");
        }
    });
    let router = api::router(control_plane.clone());
    tokio::spawn(async move {
        if let Err(e) = axum::serve(api, router).await {
            tracing::error!(error = %e, "REST API server stopped");
        }
    });
    let admin_router = api::admin_router(prometheus, control_plane.hub.clone());
    tokio::spawn(async move {
        if let Err(e) = axum::serve(admin, admin_router).await {
            tracing::error!(error = %e, "admin server stopped");
        }
    });
    Ok(Running {
        control_plane,
        grpc_addr,
        api_addr,
        admin_addr,
        token_file: options.data_dir.join(auth::TOKEN_FILE),
    })
}

async fn bind(addr: SocketAddr, what: &str) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen on {addr} for {what}"))
}

/// What `outrigger backup` writes: the whole log, and the identity
/// secrets without which restored sidecars could not be trusted.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Backup {
    pub format: String,
    pub created_at: String,
    pub revisions: Vec<Revision>,
    /// Absent in backups made before the CA existed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secrets: Option<Secrets>,
}

/// The CA the server made for itself (an operator's own CA is the
/// operator's to keep), the token key and the token records. A backup
/// holding these is as sensitive as the data dir: it is written 0600.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Secrets {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca: Option<crate::ca::CaFiles>,
    pub tokens: crate::tokens::TokensExport,
}

pub const BACKUP_FORMAT: &str = "outrigger-backup/v1";

/// The data dir holds the admin token and the whole policy: like etcd's,
/// it is for the server's user alone (0700).
fn restrict_to_owner(dir: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(dir)
        .with_context(|| format!("cannot read data dir {}", dir.display()))?
        .permissions()
        .mode();
    if mode & 0o077 != 0 {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
            .with_context(|| format!("cannot make data dir {} private (0700)", dir.display()))?;
        tracing::info!(data_dir = %dir.display(), from = format!("{:o}", mode & 0o777), "data dir made private (0700)");
    }
    Ok(())
}

fn read_backup(path: &Path) -> anyhow::Result<Backup> {
    let text =
        std::fs::read(path).with_context(|| format!("cannot read backup {}", path.display()))?;
    let backup: Backup = serde_json::from_slice(&text)
        .with_context(|| format!("{} is not an Outrigger backup", path.display()))?;
    anyhow::ensure!(
        backup.format == BACKUP_FORMAT,
        "{}: unsupported backup format {:?} (expected {BACKUP_FORMAT:?})",
        path.display(),
        backup.format
    );
    // Refuse a backup whose policy would not load before writing anything.
    PolicyState::replay(&backup.revisions)
        .with_context(|| format!("{}: the backup's policy does not load", path.display()))?;
    Ok(backup)
}

/// Imports `backup` into an empty store. A store that already holds
/// exactly the backup (a restart with `--restore` still set) is left as it
/// is; one with any other history is never overwritten.
fn restore(store: &RedbStore, path: &Path, backup: Backup) -> anyhow::Result<()> {
    let existing = store.all()?;
    if !existing.is_empty() && existing == backup.revisions {
        tracing::info!(backup = %path.display(), "the store already holds this backup; not restoring again");
        return Ok(());
    }
    store
        .import(&backup.revisions)
        .with_context(|| format!("cannot restore {}", path.display()))?;
    tracing::info!(backup = %path.display(), revisions = backup.revisions.len(), created = %backup.created_at, "restored");
    Ok(())
}
