//! Policy push: the time from `apply` to an ACK from every sidecar, and the
//! control plane's memory per connected sidecar.
//!
//! `cargo build --release && cargo bench --bench control_plane [-- quick]`
//!
//! The control plane is the real `outrigger serve` process. The sidecars
//! are simulated, in this process: each is a real gRPC client with its own
//! connection, speaking the real protocol (node, snapshot, ACK with the
//! nonce), but it does not apply what it receives, so the figures are the
//! control plane's fan-out, not a sidecar's apply time (the e2e tests
//! cover that). Every sidecar's workload calls the one Service whose
//! TrafficPolicy each round changes, so every sidecar gets every push.
//!
//! The baseline in the same run is one sidecar: the table shows each size's
//! time against it. Memory is the control plane's RSS with N sidecars
//! connected minus its RSS with the policy loaded and none connected.

use std::time::{Duration, Instant};

use outrigger_config::proto::discovery::policy_discovery_client::PolicyDiscoveryClient;
use outrigger_config::proto::discovery::{DiscoveryRequest, Node};
use outrigger_e2e::bench::sys::memory_kib;
use outrigger_e2e::control_plane::ControlPlane;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

/// A sidecar saw `version` at `at` (after sending its ACK).
struct Seen {
    version: String,
    at: Instant,
}

fn policy(workloads: usize, timeout_secs: u64) -> String {
    let mut out = format!(
        "apiVersion: outrigger.io/v1alpha1\nkind: Service\nmetadata: {{name: backend, namespace: bench}}\n\
         spec: {{endpoints: [{{address: '127.0.0.1:9'}}]}}\n---\n\
         apiVersion: outrigger.io/v1alpha1\nkind: TrafficPolicy\nmetadata: {{name: backend, namespace: bench}}\n\
         spec: {{service: backend, timeouts: {{request: {timeout_secs}s}}}}\n"
    );
    for i in 0..workloads {
        out.push_str(&format!(
            "---\napiVersion: outrigger.io/v1alpha1\nkind: Workload\nmetadata: {{name: w{i}, namespace: bench}}\n\
             spec: {{inbound: [{{port: 0, appPort: 8080}}], outbound: [{{port: 0, service: backend}}]}}\n"
        ));
    }
    out
}

async fn simulated_sidecar(
    grpc: String,
    workload: String,
    id: usize,
    seen: mpsc::UnboundedSender<Seen>,
) {
    let channel = match tonic::transport::Endpoint::from_shared(grpc)
        .expect("endpoint")
        .tcp_nodelay(true)
        .connect()
        .await
    {
        Ok(channel) => channel,
        Err(e) => panic!("sidecar {id} cannot connect: {e}"),
    };
    let mut client = PolicyDiscoveryClient::new(channel).max_decoding_message_size(64 << 20);
    let (tx, rx) = mpsc::channel(4);
    tx.send(DiscoveryRequest {
        node: Some(Node {
            workload,
            proxy_id: format!("sim-{id}"),
            advertise_ip: String::new(),
            proxy_version: "bench".into(),
        }),
        ..Default::default()
    })
    .await
    .expect("first request");
    let mut snapshots = client
        .stream_policy(ReceiverStream::new(rx))
        .await
        .expect("stream")
        .into_inner();
    while let Ok(Some(snapshot)) = snapshots.message().await {
        let ack = DiscoveryRequest {
            version_info: snapshot.version_info.clone(),
            response_nonce: snapshot.nonce,
            ..Default::default()
        };
        if tx.send(ack).await.is_err() {
            return;
        }
        let _ = seen.send(Seen {
            version: snapshot.version_info,
            at: Instant::now(),
        });
    }
}

async fn acks_recorded(cp: &ControlPlane) -> u64 {
    let (_, body) = http_get(cp.admin, "/metrics").await;
    body.lines()
        .find(|l| l.starts_with("outrigger_cp_acks_total"))
        .and_then(|l| l.split_whitespace().last()?.parse::<f64>().ok())
        .unwrap_or(0.0) as u64
}

async fn http_get(addr: std::net::SocketAddr, path: &str) -> (u16, String) {
    let (status, body) = outrigger_e2e::clients::http1_get(addr, path)
        .await
        .expect("admin reachable");
    (status, String::from_utf8_lossy(&body).into_owned())
}

struct Row {
    sidecars: usize,
    /// Median over rounds: apply sent → last sidecar got the snapshot (and ACKed).
    last_snapshot: Duration,
    /// Median over rounds: apply sent → the control plane counted every ACK.
    all_acked: Duration,
    apply_call: Duration,
    kib_per_sidecar: f64,
}

async fn measure(sidecars: usize, rounds: usize) -> Row {
    let data = tempfile::tempdir().expect("tempdir");
    let cp = ControlPlane::start(data.path()).await;
    let workloads = sidecars.clamp(1, 100);
    cp.apply(&policy(workloads, 1)).await;
    let pid = cp.pid().expect("pid");
    let rss_before = memory_kib(pid).0;

    let (seen_tx, mut seen_rx) = mpsc::unbounded_channel();
    for id in 0..sidecars {
        tokio::spawn(simulated_sidecar(
            cp.grpc_url(),
            format!("bench/w{}", id % workloads),
            id,
            seen_tx.clone(),
        ));
    }
    // Everyone has the first snapshot.
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut initial = 0;
    while initial < sidecars {
        let remaining = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(remaining, seen_rx.recv()).await {
            Ok(Some(_)) => initial += 1,
            _ => panic!("only {initial} of {sidecars} sidecars got their first snapshot"),
        }
    }
    while acks_recorded(&cp).await < sidecars as u64 {
        assert!(Instant::now() < deadline, "first ACKs not recorded");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let rss_after = memory_kib(pid).0;

    let mut last_snapshot = Vec::new();
    let mut all_acked = Vec::new();
    let mut apply_call = Vec::new();
    for round in 0..rounds {
        let expected_acks = (sidecars * (round + 2)) as u64;
        let start = Instant::now();
        cp.apply(&policy(workloads, 2 + round as u64)).await;
        apply_call.push(start.elapsed());
        let mut versions = std::collections::HashSet::new();
        let mut got = 0;
        let mut last = start;
        let deadline = Instant::now() + Duration::from_secs(60);
        while got < sidecars {
            let remaining = deadline.saturating_duration_since(Instant::now());
            match tokio::time::timeout(remaining, seen_rx.recv()).await {
                Ok(Some(seen)) => {
                    versions.insert(seen.version);
                    last = last.max(seen.at);
                    got += 1;
                }
                _ => panic!("round {round}: only {got} of {sidecars} sidecars got the push"),
            }
        }
        last_snapshot.push(last - start);
        while acks_recorded(&cp).await < expected_acks {
            assert!(
                Instant::now() < deadline,
                "round {round}: ACKs not recorded"
            );
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        all_acked.push(start.elapsed());
        assert_eq!(
            versions.len(),
            workloads,
            "one version per workload (each workload's snapshot differs)"
        );
    }
    Row {
        sidecars,
        last_snapshot: median(last_snapshot),
        all_acked: median(all_acked),
        apply_call: median(apply_call),
        kib_per_sidecar: rss_after.saturating_sub(rss_before) as f64 / sidecars as f64,
    }
}

fn median(mut values: Vec<Duration>) -> Duration {
    values.sort();
    values[values.len() / 2]
}

fn ms(d: Duration) -> String {
    format!("{:.1}", d.as_secs_f64() * 1000.0)
}

fn main() {
    let quick = std::env::args().any(|a| a == "quick");
    let rounds = if quick { 3 } else { 7 };
    let sizes = [1usize, 10, 100, 1000];
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let rows: Vec<Row> = sizes
        .iter()
        .map(|n| {
            eprintln!("control_plane bench: {n} sidecars, {rounds} rounds");
            runtime.block_on(measure(*n, rounds))
        })
        .collect();
    let baseline = rows[0].all_acked.as_secs_f64();
    println!("\n## Policy push: apply → every sidecar ACKed ({rounds} rounds, medians)\n");
    println!(
        "| sidecars | apply call (ms) | last snapshot received (ms) | all ACKs recorded (ms) | vs 1 sidecar | control-plane RSS per sidecar (KiB) |"
    );
    println!("|---:|---:|---:|---:|---:|---:|");
    for row in &rows {
        println!(
            "| {} | {} | {} | {} | {:.1}x | {:.1} |",
            row.sidecars,
            ms(row.apply_call),
            ms(row.last_snapshot),
            ms(row.all_acked),
            row.all_acked.as_secs_f64() / baseline,
            row.kib_per_sidecar
        );
    }
}
