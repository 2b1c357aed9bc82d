//! The gRPC policy-discovery service: one stream per sidecar.
//!
//! Per stream: read the first request (the node), register the sidecar,
//! then loop over two events: a request from the sidecar (ACK or NACK of
//! the last snapshot, with its bound inbound ports) and a new View (push
//! the workload's snapshot if its version differs from the one last sent).
//! See `config/proto/outrigger/discovery/v1/discovery.proto` for the
//! protocol.

use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use futures_util::Stream;
use outrigger_config::proto::discovery::policy_discovery_server::{
    PolicyDiscovery, PolicyDiscoveryServer,
};
use outrigger_config::proto::discovery::{DiscoveryRequest, Snapshot as SnapshotMsg};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use crate::certify::Authority;
use crate::hub::{ConnId, Hub, Nack, ProxyRecord};

/// The token in `authorization: Bearer <token>`, if any.
fn bearer(metadata: &tonic::metadata::MetadataMap) -> Option<String> {
    let value = metadata.get("authorization")?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim().to_string())
}

pub struct Discovery {
    hub: Arc<Hub>,
    authority: Arc<Authority>,
    /// Refuse streams without a valid bootstrap token.
    require_tokens: bool,
}

pub fn service(
    hub: Arc<Hub>,
    authority: Arc<Authority>,
    require_tokens: bool,
) -> PolicyDiscoveryServer<Discovery> {
    PolicyDiscoveryServer::new(Discovery {
        hub,
        authority,
        require_tokens,
    })
    // Snapshots of big meshes can be large; the default 4 MiB is low.
    .max_encoding_message_size(64 * 1024 * 1024)
    .max_decoding_message_size(4 * 1024 * 1024)
}

type SnapshotStream = Pin<Box<dyn Stream<Item = Result<SnapshotMsg, Status>> + Send>>;

#[tonic::async_trait]
impl PolicyDiscovery for Discovery {
    type StreamPolicyStream = SnapshotStream;

    async fn stream_policy(
        &self,
        request: Request<Streaming<DiscoveryRequest>>,
    ) -> Result<Response<SnapshotStream>, Status> {
        let peer = request
            .remote_addr()
            .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 0)));
        let token = bearer(request.metadata());
        let mut requests = request.into_inner();
        let first = requests
            .message()
            .await?
            .ok_or_else(|| Status::invalid_argument("the stream ended before its first request"))?;
        let mut record = record_from(&first, peer)?;
        // A token must be this workload's; without one, the stream is
        // served only when the server allows unauthenticated sidecars.
        match token {
            Some(token) => {
                let workload = self.authority.tokens.verify(&token).map_err(|e| {
                    tracing::warn!(%peer, proxy = %record.proxy_id, error = %e, "policy stream refused");
                    metrics::counter!(crate::metrics::STREAMS_REFUSED, "reason" => "bad_token").increment(1);
                    Status::unauthenticated(e.to_string())
                })?;
                if workload != record.workload {
                    tracing::warn!(%peer, proxy = %record.proxy_id, claimed = %record.workload, token_for = %workload, "policy stream refused: token for another workload");
                    metrics::counter!(crate::metrics::STREAMS_REFUSED, "reason" => "wrong_workload").increment(1);
                    return Err(Status::permission_denied(format!(
                        "the token is for workload {workload}, not {}",
                        record.workload
                    )));
                }
                record.authenticated = true;
            }
            None if self.require_tokens => {
                tracing::warn!(%peer, proxy = %record.proxy_id, "policy stream refused: no token");
                metrics::counter!(crate::metrics::STREAMS_REFUSED, "reason" => "no_token")
                    .increment(1);
                return Err(Status::unauthenticated(
                    "this control plane requires a bootstrap token (--token-file)",
                ));
            }
            None => {}
        }
        let running = first.version_info.clone();
        tracing::info!(proxy = %record.proxy_id, workload = %record.workload, %peer, version = %running, "sidecar connected");

        let (tx, rx) = mpsc::channel(4);
        let hub = self.hub.clone();
        let id = hub.connect(record);
        hub.update(id, |p| {
            if !running.is_empty() {
                // It runs a saved snapshot; if that is still current, no
                // push will be needed.
                p.sent_version = Some(running.clone());
                p.acked_version = Some(running.clone());
                p.acked_at = Some(SystemTime::now());
            }
        });
        hub.set_inbound(id, inbound_ports(&first));
        tokio::spawn(async move {
            let outcome = session(&hub, id, requests, &tx).await;
            let proxy = hub.update(id, |p| p.proxy_id.clone()).unwrap_or_default();
            match outcome {
                Ok(()) => tracing::info!(%proxy, "sidecar disconnected"),
                Err(e) => tracing::info!(%proxy, error = %e, "sidecar stream ended"),
            }
            hub.disconnect(id);
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

fn record_from(first: &DiscoveryRequest, peer: SocketAddr) -> Result<ProxyRecord, Status> {
    let node = first
        .node
        .as_ref()
        .ok_or_else(|| Status::invalid_argument("the first request must carry the node"))?;
    let workload = outrigger_config::parse_workload_ref(&node.workload)
        .map_err(|e| Status::invalid_argument(format!("node.workload: {e}")))?;
    if node.proxy_id.is_empty() {
        return Err(Status::invalid_argument("node.proxy_id is required"));
    }
    let advertise_ip = if node.advertise_ip.is_empty() {
        peer.ip()
    } else {
        node.advertise_ip.parse::<IpAddr>().map_err(|e| {
            Status::invalid_argument(format!(
                "node.advertise_ip {:?} is not an IP address: {e}",
                node.advertise_ip
            ))
        })?
    };
    Ok(ProxyRecord::new(
        node.proxy_id.clone(),
        workload,
        peer,
        advertise_ip,
        node.proxy_version.clone(),
    ))
}

fn inbound_ports(request: &DiscoveryRequest) -> Vec<(String, u16)> {
    let mut ports: Vec<(String, u16)> = request
        .inbound
        .iter()
        .filter_map(|p| Some((p.listener.clone(), u16::try_from(p.port).ok()?)))
        .collect();
    ports.sort();
    ports
}

async fn session(
    hub: &Hub,
    id: ConnId,
    mut requests: Streaming<DiscoveryRequest>,
    tx: &mpsc::Sender<Result<SnapshotMsg, Status>>,
) -> Result<(), Status> {
    let mut views = hub.subscribe();
    let mut nonce_counter: u64 = 0;
    // Push whatever the current View holds for this sidecar.
    views.mark_changed();
    loop {
        tokio::select! {
            changed = views.changed() => {
                if changed.is_err() {
                    return Ok(()); // the server is shutting down
                }
                let view = views.borrow_and_update().clone();
                let Some((workload, sent)) = hub.update(id, |p| (p.workload.clone(), p.sent_version.clone())) else {
                    return Ok(());
                };
                let Some(snapshot) = view.snapshot_for(&workload) else {
                    continue; // not defined (yet): wait for a revision that defines it
                };
                if sent.as_deref() == Some(snapshot.version.as_str()) {
                    continue;
                }
                nonce_counter += 1;
                let nonce = format!("{id}-{nonce_counter}");
                hub.update(id, |p| {
                    p.sent_version = Some(snapshot.version.clone());
                    p.sent_nonce = Some(nonce.clone());
                    p.sent_at = Some(Instant::now());
                });
                let message = SnapshotMsg {
                    version_info: snapshot.version.clone(),
                    nonce,
                    revision: snapshot.revision,
                    workload: workload.to_string(),
                    yaml: snapshot.yaml.clone(),
                    trust_bundle_pem: snapshot.trust_bundle.to_string(),
                };
                metrics::counter!("outrigger_cp_pushes_total").increment(1);
                if tx.send(Ok(message)).await.is_err() {
                    return Ok(()); // the sidecar went away
                }
            }
            request = requests.message() => {
                let Some(request) = request? else {
                    return Ok(());
                };
                handle_response(hub, id, &request);
            }
        }
    }
}

/// An ACK or NACK. One answering an older snapshot than the last sent is
/// stale and ignored, as in xDS: a newer snapshot is already on its way.
fn handle_response(hub: &Hub, id: ConnId, request: &DiscoveryRequest) {
    let latest = hub.update(id, |p| p.sent_nonce.clone()).flatten();
    if latest.as_deref() != Some(request.response_nonce.as_str()) {
        tracing::debug!(nonce = %request.response_nonce, "stale response ignored");
        return;
    }
    if request.error_detail.is_empty() {
        hub.update(id, |p| {
            if let Some(sent_at) = p.sent_at.take() {
                metrics::histogram!(crate::metrics::PUSH_ACK_SECONDS)
                    .record(sent_at.elapsed().as_secs_f64());
            }
            p.acked_version = Some(request.version_info.clone());
            p.acked_at = Some(SystemTime::now());
        });
        metrics::counter!("outrigger_cp_acks_total").increment(1);
        hub.set_inbound(id, inbound_ports(request));
    } else {
        let version = hub.update(id, |p| {
            p.sent_at = None;
            let version = p.sent_version.clone().unwrap_or_default();
            p.last_nack = Some(Nack {
                version: version.clone(),
                reason: request.error_detail.clone(),
                at: SystemTime::now(),
            });
            (p.proxy_id.clone(), p.workload.clone(), version)
        });
        if let Some((proxy, workload, version)) = version {
            tracing::warn!(%proxy, %workload, %version, reason = %request.error_detail, "sidecar NACKed its snapshot");
        }
        metrics::counter!("outrigger_cp_nacks_total").increment(1);
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::time::Duration;

    use super::*;

    fn hub_with_one_proxy() -> (Arc<Hub>, ConnId) {
        let config = Arc::new(outrigger_config::load_str("t", "").unwrap());
        let hub = Hub::new(1, config, Duration::from_secs(60));
        let first = DiscoveryRequest {
            node: Some(outrigger_config::proto::discovery::Node {
                workload: "shop/web".into(),
                proxy_id: "p".into(),
                ..Default::default()
            }),
            ..Default::default()
        };
        let record = record_from(&first, "127.0.0.1:1".parse().unwrap()).unwrap();
        let id = hub.connect(record);
        hub.update(id, |p| {
            p.sent_version = Some("v2".into());
            p.sent_nonce = Some("1-2".into());
        });
        (hub, id)
    }

    fn answer(nonce: &str, version: &str, error: &str) -> DiscoveryRequest {
        DiscoveryRequest {
            version_info: version.into(),
            response_nonce: nonce.into(),
            error_detail: error.into(),
            ..Default::default()
        }
    }

    #[tokio::test]
    async fn answers_to_an_older_snapshot_are_ignored() {
        let (hub, id) = hub_with_one_proxy();
        handle_response(&hub, id, &answer("1-1", "v1", "port taken"));
        handle_response(&hub, id, &answer("1-1", "v1", ""));
        let p = hub.update(id, |p| p.clone()).unwrap();
        assert!(p.last_nack.is_none());
        assert!(p.acked_version.is_none());

        handle_response(&hub, id, &answer("1-2", "v2", ""));
        let p = hub.update(id, |p| p.clone()).unwrap();
        assert_eq!(p.acked_version.as_deref(), Some("v2"));
    }

    #[tokio::test]
    async fn a_nack_records_the_reason_for_the_sent_version() {
        let (hub, id) = hub_with_one_proxy();
        handle_response(
            &hub,
            id,
            &answer("1-2", "v1", "cannot listen on 127.0.0.1:9"),
        );
        let p = hub.update(id, |p| p.clone()).unwrap();
        let nack = p.last_nack.unwrap();
        assert_eq!(nack.version, "v2");
        assert_eq!(nack.reason, "cannot listen on 127.0.0.1:9");
        assert!(p.acked_version.is_none());
    }

    #[test]
    fn the_node_is_checked() {
        let peer = "10.0.0.9:5000".parse().unwrap();
        let node = |workload: &str, proxy_id: &str, ip: &str| DiscoveryRequest {
            node: Some(outrigger_config::proto::discovery::Node {
                workload: workload.into(),
                proxy_id: proxy_id.into(),
                advertise_ip: ip.into(),
                proxy_version: String::new(),
            }),
            ..Default::default()
        };
        let r = record_from(&node("web", "p", ""), peer).unwrap();
        assert_eq!(r.workload.to_string(), "default/web");
        assert_eq!(r.advertise_ip.to_string(), "10.0.0.9");
        let r = record_from(&node("shop/web", "p", "10.1.1.1"), peer).unwrap();
        assert_eq!(r.advertise_ip.to_string(), "10.1.1.1");
        assert!(record_from(&node("", "p", ""), peer).is_err());
        assert!(record_from(&node("a/b/c", "p", ""), peer).is_err());
        assert!(record_from(&node("shop/web", "", ""), peer).is_err());
        assert!(record_from(&node("shop/web", "p", "not-an-ip"), peer).is_err());
        assert!(record_from(&DiscoveryRequest::default(), peer).is_err());
    }
}
