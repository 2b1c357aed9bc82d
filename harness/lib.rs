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
pub mod proxy;
pub mod upstream;

pub use mesh::Pair;
pub use proxy::{Proxy, ProxyBuilder};
