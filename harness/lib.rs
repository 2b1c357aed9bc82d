//! The end-to-end test harness: starts the real `outrigger-proxy` binary
//! against real upstream servers on loopback, and gives tests real clients.
//!
//! Everything binds `127.0.0.1:0`; processes are killed when their handle
//! drops, temp files go with their `TempDir`.

pub mod bench;
pub mod certs;
pub mod clients;
pub mod control_plane;
pub mod grpc;
pub mod mesh;
pub mod otlp;
pub mod proxy;
pub mod upstream;

pub use mesh::Pair;

/// Polls `check` every 20 ms until it holds; fails the test after 20 s.
pub async fn eventually<F, Fut>(what: &str, check: F)
where
    F: Fn() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while !check().await {
        assert!(
            std::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}
pub use proxy::{Proxy, ProxyBuilder};
