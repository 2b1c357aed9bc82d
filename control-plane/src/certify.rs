//! The gRPC identity service: a certificate for a CSR with a valid
//! bootstrap token, whose SPIFFE ID is the token's workload's. See
//! `config/proto/outrigger/identity/v1/identity.proto`.

use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

use outrigger_config::proto::identity::identity_server::{Identity, IdentityServer};
use outrigger_config::proto::identity::{CertifyRequest, CertifyResponse};
use tonic::{Request, Response, Status};

use crate::ca::{Ca, IssueError};
use crate::server::ControlPlane;
use crate::tokens::Tokens;

/// Who may have which certificate: the CA, the tokens, and how long
/// certificates live.
#[derive(Debug)]
pub struct Authority {
    pub ca: Ca,
    pub tokens: Tokens,
    pub cert_ttl: Duration,
}

pub struct Certify {
    cp: Arc<ControlPlane>,
}

pub fn service(cp: Arc<ControlPlane>) -> IdentityServer<Certify> {
    IdentityServer::new(Certify { cp }).max_decoding_message_size(64 * 1024)
}

fn refused(reason: &'static str, peer: Option<std::net::SocketAddr>, status: Status) -> Status {
    metrics::counter!(crate::metrics::CERTIFICATES_REFUSED, "reason" => reason).increment(1);
    tracing::warn!(?peer, reason, error = %status.message(), "certificate refused");
    status
}

#[tonic::async_trait]
impl Identity for Certify {
    async fn certify(
        &self,
        request: Request<CertifyRequest>,
    ) -> Result<Response<CertifyResponse>, Status> {
        let peer = request.remote_addr();
        let request = request.into_inner();
        let authority = &self.cp.authority;
        let workload = authority
            .tokens
            .verify(&request.token)
            .map_err(|e| refused("bad_token", peer, Status::unauthenticated(e.to_string())))?;
        let state = self.cp.state();
        let config = &state.config;
        let Some(spec) = config.workloads.iter().find(|w| w.id == workload) else {
            return Err(refused(
                "unknown_workload",
                peer,
                Status::failed_precondition(format!(
                    "workload {workload} is not in the policy; apply it first"
                )),
            ));
        };
        let spiffe_id = spec.spiffe_id(&config.mesh.trust_domain);
        // Signing is CPU work; keep it off the async threads.
        let cp = self.cp.clone();
        let id = spiffe_id.clone();
        let issued = tokio::task::spawn_blocking(move || {
            let authority = &cp.authority;
            authority
                .ca
                .issue(&request.csr_pem, &id, authority.cert_ttl)
        })
        .await
        .map_err(|e| Status::internal(e.to_string()))?
        .map_err(|e| match e {
            IssueError::WrongIdentity { .. } => refused(
                "wrong_identity",
                peer,
                Status::permission_denied(e.to_string()),
            ),
            IssueError::BadCsr(_) => {
                refused("bad_csr", peer, Status::invalid_argument(e.to_string()))
            }
            IssueError::Sign(_) => refused("sign", peer, Status::internal(e.to_string())),
        })?;
        let not_after_unix = issued
            .not_after
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        metrics::counter!(crate::metrics::CERTIFICATES_ISSUED).increment(1);
        tracing::info!(%workload, %spiffe_id, not_after_unix, ?peer, "certificate issued");
        Ok(Response::new(CertifyResponse {
            certificate_chain_pem: issued.chain_pem,
            trust_bundle_pem: authority.ca.bundle_pem().to_string(),
            not_after_unix,
        }))
    }
}
