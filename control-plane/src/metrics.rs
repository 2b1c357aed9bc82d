//! The control plane's Prometheus metrics.

use std::sync::OnceLock;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

pub const PUSH_ACK_SECONDS: &str = "outrigger_cp_push_ack_seconds";
pub const CERTIFICATES_ISSUED: &str = "outrigger_cp_certificates_issued_total";
pub const CERTIFICATES_REFUSED: &str = "outrigger_cp_certificates_refused_total";
pub const STREAMS_REFUSED: &str = "outrigger_cp_policy_streams_refused_total";
pub const PROXIES: &str = "outrigger_cp_proxies";

/// From 1 ms (a sidecar next door) to 30 s.
const PUSH_ACK_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// Installs the process-wide recorder (once).
pub fn install() -> PrometheusHandle {
    HANDLE
        .get_or_init(|| {
            let recorder = PrometheusBuilder::new()
                .set_buckets_for_metric(
                    Matcher::Full(PUSH_ACK_SECONDS.to_string()),
                    PUSH_ACK_BUCKETS,
                )
                .map(|b| b.build_recorder())
                .unwrap_or_else(|_| PrometheusBuilder::new().build_recorder());
            let handle = recorder.handle();
            if metrics::set_global_recorder(recorder).is_err() {
                tracing::warn!("a metrics recorder was already installed; /metrics may be empty");
            }
            describe();
            handle
        })
        .clone()
}

fn describe() {
    metrics::describe_gauge!(
        "outrigger_cp_connected_proxies",
        "Sidecars with an open policy stream"
    );
    metrics::describe_gauge!("outrigger_cp_revision", "The current policy revision");
    metrics::describe_gauge!(
        PROXIES,
        "Sidecars by status against the latest policy (SYNCED, STALE, NACKED, DISCONNECTED, UNKNOWN_WORKLOAD)"
    );
    metrics::describe_counter!("outrigger_cp_pushes_total", "Snapshots sent to sidecars");
    metrics::describe_counter!(
        "outrigger_cp_acks_total",
        "Snapshots sidecars applied (ACK)"
    );
    metrics::describe_counter!(
        "outrigger_cp_nacks_total",
        "Snapshots sidecars refused (NACK)"
    );
    metrics::describe_histogram!(
        PUSH_ACK_SECONDS,
        metrics::Unit::Seconds,
        "Time from sending a snapshot to its ACK"
    );
    metrics::describe_counter!(CERTIFICATES_ISSUED, "Workload certificates signed");
    metrics::describe_counter!(
        CERTIFICATES_REFUSED,
        "Certificate requests refused, by reason (bad_token, unknown_workload, wrong_identity, bad_csr)"
    );
    metrics::describe_counter!(
        STREAMS_REFUSED,
        "Policy streams refused, by reason (no_token, bad_token, wrong_workload)"
    );
    metrics::counter!(CERTIFICATES_ISSUED).absolute(0);
    // Present from the start, so dashboards and alerts see zeros, not gaps.
    metrics::gauge!("outrigger_cp_connected_proxies").set(0.0);
    metrics::counter!("outrigger_cp_pushes_total").absolute(0);
    metrics::counter!("outrigger_cp_acks_total").absolute(0);
    metrics::counter!("outrigger_cp_nacks_total").absolute(0);
}
