//! The sidecar's side of policy discovery: keep a stream open to the
//! control plane, apply each snapshot it pushes, answer ACK or NACK.
//!
//! Fail static: a snapshot that applied is saved to the state dir, so a
//! sidecar restarted while the control plane is down serves its last good
//! policy; a lost stream is retried with jittered exponential backoff while
//! the current policy keeps serving; on reconnect the sidecar reports the
//! version it runs, so the control plane pushes only if something changed.
//! See `config/proto/outrigger/discovery/v1/discovery.proto`.

use std::io::Write;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use outrigger_config::proto::discovery::policy_discovery_client::PolicyDiscoveryClient;
use outrigger_config::proto::discovery::{DiscoveryRequest, InboundPort, Node, Snapshot};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use crate::app::{self, Running};
use crate::identity::TrustBundle;
use crate::state::{Direction, Loaded};

/// The saved snapshot's file in the state dir.
const SAVED: &str = "snapshot.json";

#[derive(Clone, Debug)]
pub struct PolicyClientOptions {
    /// `http://host:port` of the control plane's gRPC listener.
    pub endpoint: String,
    /// `NAME` or `NAMESPACE/NAME`, as given on the command line.
    pub workload: String,
    /// Unique per sidecar process.
    pub proxy_id: String,
    /// Where peers reach our inbound listeners; `None`: the control plane
    /// uses the address our stream comes from.
    pub advertise_ip: Option<IpAddr>,
    /// Where the last good snapshot is saved; `None`: not saved.
    pub state_dir: Option<PathBuf>,
    /// The bootstrap token, shown on the stream too (the control plane
    /// may require it).
    pub token_file: Option<PathBuf>,
}

/// What is saved on disk: enough to apply it again without the control
/// plane.
#[derive(Debug, Serialize, Deserialize)]
struct Saved {
    workload: String,
    version: String,
    revision: u64,
    yaml: String,
}

fn source(revision: u64) -> String {
    format!("control plane revision {revision}")
}

/// The saved snapshot for `workload`, if there is a usable one. A missing
/// file is normal (first start); a damaged or foreign one is logged and
/// ignored (the control plane will send a fresh one).
pub fn load_saved(state_dir: &Path, workload: &str) -> Option<Loaded> {
    let path = state_dir.join(SAVED);
    let bytes = match std::fs::read(&path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return None,
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e, "cannot read the saved snapshot; ignoring it");
            return None;
        }
    };
    let saved: Saved = match serde_json::from_slice(&bytes) {
        Ok(saved) => saved,
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e, "the saved snapshot is damaged; ignoring it");
            return None;
        }
    };
    let source = format!(
        "saved snapshot of {} ({})",
        source(saved.revision),
        path.display()
    );
    let loaded = match app::load_str(&source, &saved.yaml, workload) {
        Ok(loaded) => loaded.with_version(saved.version),
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %format!("{e:#}"), "the saved snapshot does not load; ignoring it");
            return None;
        }
    };
    if loaded.workload.to_string() != saved.workload {
        tracing::warn!(path = %path.display(), saved = %saved.workload, "the saved snapshot is for another workload; ignoring it");
        return None;
    }
    Some(loaded)
}

/// Writes the snapshot next to its final name and renames it, so a crash
/// never leaves half a file behind.
fn save(state_dir: &Path, saved: &Saved) -> anyhow::Result<()> {
    std::fs::create_dir_all(state_dir)
        .with_context(|| format!("cannot create state dir {}", state_dir.display()))?;
    let path = state_dir.join(SAVED);
    let tmp = state_dir.join(format!("{SAVED}.tmp"));
    let bytes = serde_json::to_vec(saved)?;
    let mut file =
        std::fs::File::create(&tmp).with_context(|| format!("cannot write {}", tmp.display()))?;
    file.write_all(&bytes)?;
    file.sync_all()?;
    std::fs::rename(&tmp, &path).with_context(|| format!("cannot write {}", path.display()))?;
    Ok(())
}

/// Keeps the stream to the control plane open for as long as the proxy
/// runs. Never returns.
pub async fn run(options: PolicyClientOptions, running: Arc<Running>) {
    let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(30));
    loop {
        let result = session(&options, &running, &mut backoff).await;
        metrics::gauge!(crate::metrics::POLICY_STREAM_CONNECTED).set(0.0);
        let delay = backoff.next();
        let serving = if running.state.loaded().is_some() {
            "serving the last good policy"
        } else {
            "no policy yet: not ready"
        };
        match result {
            Ok(()) => {
                tracing::warn!(endpoint = %options.endpoint, retry_in = ?delay, "the control plane closed the policy stream; {serving}")
            }
            Err(e) => {
                tracing::warn!(endpoint = %options.endpoint, retry_in = ?delay, error = %format!("{e:#}"), "policy stream failed; {serving}")
            }
        }
        tokio::time::sleep(delay).await;
    }
}

async fn session(
    options: &PolicyClientOptions,
    running: &Running,
    backoff: &mut Backoff,
) -> anyhow::Result<()> {
    let channel = connect(&options.endpoint).await?;
    let mut client =
        PolicyDiscoveryClient::new(channel).max_decoding_message_size(64 * 1024 * 1024);

    let (tx, rx) = mpsc::channel(4);
    let running_version = running
        .state
        .loaded()
        .map(|l| l.version.clone())
        .unwrap_or_default();
    tx.send(DiscoveryRequest {
        node: Some(Node {
            workload: options.workload.clone(),
            proxy_id: options.proxy_id.clone(),
            advertise_ip: options
                .advertise_ip
                .map(|ip| ip.to_string())
                .unwrap_or_default(),
            proxy_version: env!("CARGO_PKG_VERSION").to_string(),
        }),
        version_info: running_version.clone(),
        inbound: inbound_ports(running),
        ..Default::default()
    })
    .await
    .context("policy stream closed")?;
    let mut request = tonic::Request::new(ReceiverStream::new(rx));
    if let Some(path) = &options.token_file {
        // Read at every connect, so a replaced token takes effect.
        let token = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read token file {}", path.display()))?;
        let value = format!("Bearer {}", token.trim())
            .parse()
            .context("the token file holds characters a header cannot carry")?;
        request.metadata_mut().insert("authorization", value);
    }
    let mut snapshots = client
        .stream_policy(request)
        .await
        .context("the control plane refused the policy stream")?
        .into_inner();
    tracing::info!(endpoint = %options.endpoint, version = %running_version, "policy stream open");
    metrics::gauge!(crate::metrics::POLICY_STREAM_CONNECTED).set(1.0);
    backoff.reset();

    // A refused snapshot is tried again with backoff until it applies or a
    // newer one arrives: most refusals on a valid snapshot are local and
    // pass (a port still held by another process), and the control plane
    // does not send the same version twice.
    let mut refused: Option<Refused> = None;
    let mut retry_backoff = Backoff::new(Duration::from_secs(1), Duration::from_secs(60));
    loop {
        let retry_at = refused.as_ref().map(|r| r.retry_at);
        let snapshot = tokio::select! {
            message = snapshots.message() => match message.context("policy stream")? {
                Some(snapshot) => {
                    metrics::counter!(crate::metrics::POLICY_PUSHES_TOTAL).increment(1);
                    retry_backoff.reset();
                    snapshot
                }
                None => return Ok(()),
            },
            () = sleep_until(retry_at) => match refused.take() {
                Some(r) => {
                    tracing::info!(version = %r.snapshot.version_info, revision = r.snapshot.revision, "trying the refused snapshot again");
                    r.snapshot
                }
                None => continue,
            },
        };
        let answer = match apply(options, running, &snapshot).await {
            Ok(()) => {
                metrics::counter!(crate::metrics::POLICY_ACKS_TOTAL).increment(1);
                DiscoveryRequest {
                    version_info: snapshot.version_info.clone(),
                    response_nonce: snapshot.nonce.clone(),
                    inbound: inbound_ports(running),
                    ..Default::default()
                }
            }
            Err(e) => {
                let reason = format!("{e:#}");
                let delay = retry_backoff.next();
                tracing::warn!(version = %snapshot.version_info, revision = snapshot.revision, %reason, retry_in = ?delay, "snapshot refused (NACK); the previous policy keeps serving");
                metrics::counter!(crate::metrics::POLICY_NACKS_TOTAL).increment(1);
                let answer = DiscoveryRequest {
                    version_info: running
                        .state
                        .loaded()
                        .map(|l| l.version.clone())
                        .unwrap_or_default(),
                    response_nonce: snapshot.nonce.clone(),
                    error_detail: reason,
                    inbound: inbound_ports(running),
                    ..Default::default()
                };
                refused = Some(Refused {
                    snapshot,
                    retry_at: tokio::time::Instant::now() + delay,
                });
                answer
            }
        };
        tx.send(answer).await.context("policy stream closed")?;
    }
}

/// A snapshot that did not apply, and when to try it again.
struct Refused {
    snapshot: Snapshot,
    retry_at: tokio::time::Instant,
}

/// Sleeps until `at`, or forever when there is nothing to wait for.
async fn sleep_until(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// A gRPC channel to the control plane: bounded connect, keep-alives so a
/// dead peer is noticed.
pub(crate) async fn connect(endpoint: &str) -> anyhow::Result<tonic::transport::Channel> {
    tonic::transport::Endpoint::from_shared(endpoint.to_string())
        .with_context(|| format!("bad control plane address {endpoint:?}"))?
        .connect_timeout(Duration::from_secs(5))
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(30))
        .keep_alive_timeout(Duration::from_secs(10))
        .connect()
        .await
        .with_context(|| format!("cannot connect to the control plane at {endpoint}"))
}

async fn apply(
    options: &PolicyClientOptions,
    running: &Running,
    snapshot: &Snapshot,
) -> anyhow::Result<()> {
    let loaded = app::load_str(
        &source(snapshot.revision),
        &snapshot.yaml,
        &options.workload,
    )?
    .with_version(snapshot.version_info.clone());
    if loaded.workload.to_string() != snapshot.workload {
        anyhow::bail!(
            "the snapshot is for workload {}, but this sidecar runs {}",
            snapshot.workload,
            loaded.workload
        );
    }
    let workload = loaded.workload.to_string();
    // The roots to trust come with the policy, so a root rotation reaches
    // every sidecar like any other change.
    if let Some(identity) = running.state.identity()
        && !snapshot.trust_bundle_pem.is_empty()
        && identity.bundle().map(|b| b.pem.clone()).as_deref()
            != Some(snapshot.trust_bundle_pem.as_str())
    {
        let bundle = TrustBundle::from_pem(
            "the snapshot's trust bundle",
            snapshot.trust_bundle_pem.as_bytes(),
        )?;
        identity.set_bundle(bundle);
    }
    running.apply(loaded).await?;
    if let Some(dir) = &options.state_dir {
        let saved = Saved {
            workload,
            version: snapshot.version_info.clone(),
            revision: snapshot.revision,
            yaml: snapshot.yaml.clone(),
        };
        // The policy is applied either way; without the saved copy only a
        // restart during a control-plane outage is affected.
        if let Err(e) = save(dir, &saved) {
            tracing::warn!(error = %format!("{e:#}"), "cannot save the snapshot");
        }
    }
    Ok(())
}

fn inbound_ports(running: &Running) -> Vec<InboundPort> {
    running
        .state
        .listeners()
        .iter()
        .filter(|l| l.direction == Direction::Inbound)
        .map(|l| InboundPort {
            listener: l
                .name
                .strip_prefix("inbound/")
                .unwrap_or(&l.name)
                .to_string(),
            port: u32::from(l.addr.port()),
        })
        .collect()
}

/// Exponential backoff with full jitter: a fleet of sidecars that lost the
/// control plane at once does not come back at once.
pub(crate) struct Backoff {
    base: Duration,
    max: Duration,
    attempt: u32,
    rng: u64,
}

impl Backoff {
    pub(crate) fn new(base: Duration, max: Duration) -> Self {
        // Seeded per process: enough to spread a fleet, not cryptography.
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0)
            ^ u64::from(std::process::id()).rotate_left(32);
        Self {
            base,
            max,
            attempt: 0,
            rng: seed | 1,
        }
    }

    pub(crate) fn reset(&mut self) {
        self.attempt = 0;
    }

    pub(crate) fn next(&mut self) -> Duration {
        let ceiling = self
            .base
            .saturating_mul(1u32 << self.attempt.min(16))
            .min(self.max);
        self.attempt = self.attempt.saturating_add(1);
        ceiling
            .mul_f64(self.fraction())
            .max(Duration::from_millis(10))
    }

    /// A pseudo-random number in [0, 1) (xorshift64): jitter.
    pub(crate) fn fraction(&mut self) -> f64 {
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        (self.rng >> 11) as f64 / (1u64 << 53) as f64
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn backoff_grows_to_the_cap_with_jitter_and_resets() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(2));
        let mut delays = Vec::new();
        for _ in 0..10 {
            delays.push(b.next());
        }
        assert!(delays.iter().all(|d| *d <= Duration::from_secs(2)));
        assert!(delays[0] <= Duration::from_millis(100));
        // Not all equal: jittered.
        assert!(delays.windows(2).any(|w| w[0] != w[1]));
        b.reset();
        assert!(b.next() <= Duration::from_millis(100));
    }

    #[test]
    fn saved_snapshots_round_trip_and_bad_ones_are_ignored() {
        let dir = tempfile::tempdir().unwrap();
        let yaml = "apiVersion: outrigger.io/v1alpha1\nkind: Workload\nmetadata: {name: web, namespace: shop}\nspec: {inbound: [{port: 0, appPort: 1}]}\n";
        assert!(load_saved(dir.path(), "shop/web").is_none());
        save(
            dir.path(),
            &Saved {
                workload: "shop/web".into(),
                version: "v1".into(),
                revision: 7,
                yaml: yaml.into(),
            },
        )
        .unwrap();
        let loaded = load_saved(dir.path(), "shop/web").unwrap();
        assert_eq!(loaded.version, "v1");
        assert!(
            loaded
                .source
                .starts_with("saved snapshot of control plane revision 7 ("),
            "{}",
            loaded.source
        );
        // Another workload's sidecar does not pick it up.
        assert!(load_saved(dir.path(), "shop/api").is_none());
        std::fs::write(dir.path().join(SAVED), b"{not json").unwrap();
        assert!(load_saved(dir.path(), "shop/web").is_none());
    }
}
