//! Getting and renewing this sidecar's certificate from the control plane.
//!
//! The key is generated here and never leaves the process. Once the policy
//! says who this workload is (its SPIFFE ID comes from the Mesh's trust
//! domain and the Workload's service account), the sidecar sends a CSR with
//! its bootstrap token (`--token-file`, read at every attempt so it can be
//! replaced) and installs what comes back: new handshakes use the new
//! certificate at once, open connections keep theirs. It renews at about
//! half of the certificate's life, with jitter so a fleet does not renew at
//! once; a failed renewal is retried with backoff while the current
//! certificate, still valid, keeps serving. See
//! `config/proto/outrigger/identity/v1/identity.proto`.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use anyhow::Context;
use outrigger_config::proto::identity::CertifyRequest;
use outrigger_config::proto::identity::identity_client::IdentityClient;
use rcgen::{CertificateParams, KeyPair, SanType};

use crate::app::Running;
use crate::identity::{Credentials, Identity, TrustBundle};
use crate::policy_client::Backoff;

#[derive(Clone, Debug)]
pub struct IdentityClientOptions {
    /// `http://host:port` of the control plane's gRPC listener.
    pub endpoint: String,
    pub token_file: PathBuf,
}

/// Keeps a valid certificate in `identity` for as long as the proxy runs.
pub async fn run(options: IdentityClientOptions, running: Arc<Running>, identity: Arc<Identity>) {
    let mut backoff = Backoff::new(Duration::from_secs(1), Duration::from_secs(30));
    loop {
        // Who we are, once the policy says so.
        let changed = running.state.applied_changed();
        let Some(spiffe_id) = expected_id(&running) else {
            changed.await;
            continue;
        };
        let wait = match certify(&options, &spiffe_id).await {
            Ok((credentials, bundle)) => {
                metrics::counter!(crate::metrics::CERT_RENEWALS_TOTAL, "result" => "ok")
                    .increment(1);
                let remaining = credentials
                    .not_after
                    .duration_since(SystemTime::now())
                    .unwrap_or_default();
                identity.set_bundle(bundle);
                identity.set_credentials(credentials);
                backoff.reset();
                // About half its life, give or take a tenth.
                remaining.mul_f64(0.45 + 0.1 * backoff.fraction())
            }
            Err(e) => {
                metrics::counter!(crate::metrics::CERT_RENEWALS_TOTAL, "result" => "failed")
                    .increment(1);
                let delay = backoff.next();
                let serving = match identity.remaining() {
                    Some(left) if !left.is_zero() => {
                        format!("the current certificate serves for {left:?} more")
                    }
                    _ => "no valid certificate: not ready".to_string(),
                };
                tracing::warn!(error = %format!("{e:#}"), retry_in = ?delay, "cannot get a certificate; {serving}");
                delay
            }
        };
        // Renew when due, or at once if the policy gives us another
        // identity (a new service account or trust domain).
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let changed = running.state.applied_changed();
            let current = identity.credentials().map(|c| c.spiffe_id.clone());
            if current.is_some() && current != expected_id(&running) {
                break;
            }
            tokio::select! {
                () = tokio::time::sleep_until(deadline) => break,
                () = changed => {}
            }
        }
    }
}

/// This workload's SPIFFE ID under the policy it runs.
fn expected_id(running: &Running) -> Option<String> {
    let loaded = running.state.loaded()?;
    let workload = loaded
        .config
        .workloads
        .iter()
        .find(|w| w.id == loaded.workload)?;
    Some(workload.spiffe_id(&loaded.config.mesh.trust_domain))
}

async fn certify(
    options: &IdentityClientOptions,
    spiffe_id: &str,
) -> anyhow::Result<(Credentials, TrustBundle)> {
    let token = std::fs::read_to_string(&options.token_file)
        .with_context(|| format!("cannot read token file {}", options.token_file.display()))?;
    let token = token.trim().to_string();
    anyhow::ensure!(
        !token.is_empty(),
        "token file {} is empty",
        options.token_file.display()
    );
    let key =
        KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).context("cannot generate a key")?;
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params.subject_alt_names = vec![SanType::URI(spiffe_id.try_into()?)];
    let csr_pem = params.serialize_request(&key)?.pem()?;

    let channel = crate::policy_client::connect(&options.endpoint).await?;
    let mut request = tonic::Request::new(CertifyRequest { token, csr_pem });
    request.set_timeout(Duration::from_secs(15));
    let answer = IdentityClient::new(channel)
        .certify(request)
        .await
        .map_err(|status| anyhow::anyhow!("the control plane refused: {}", status.message()))?
        .into_inner();
    let credentials = Credentials::from_pem(
        "the certificate from the control plane",
        answer.certificate_chain_pem.as_bytes(),
        key.serialize_pem().as_bytes(),
    )?;
    anyhow::ensure!(
        credentials.spiffe_id == spiffe_id,
        "the control plane sent a certificate for {}, not {spiffe_id}",
        credentials.spiffe_id
    );
    let bundle = TrustBundle::from_pem(
        "the trust bundle from the control plane",
        answer.trust_bundle_pem.as_bytes(),
    )?;
    bundle.check(&credentials)?;
    Ok((credentials, bundle))
}
