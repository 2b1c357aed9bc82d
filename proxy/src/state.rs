//! What the proxy is running, shared with the admin server.
//!
//! The data path never reads this: each listener's stack holds its own
//! snapshot. It exists so `/config` and `/ready` can tell the truth.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::SystemTime;

use arc_swap::ArcSwap;
use outrigger_config::{MeshConfig, ResourceRef};
use serde::Serialize;

/// One bound listener, as reported on stdout at start and in `/config`.
#[derive(Clone, Debug, Serialize)]
pub struct BoundListener {
    /// `inbound/<name>` or `outbound/<port>`.
    pub name: String,
    pub direction: Direction,
    pub protocol: outrigger_config::Protocol,
    pub addr: SocketAddr,
    /// Where its traffic goes: the local app address, or a service name.
    pub target: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Direction {
    Inbound,
    Outbound,
}

/// A configuration as loaded, with where it came from.
#[derive(Debug)]
pub struct Loaded {
    /// A digest of the source text: equal text, equal version.
    pub version: String,
    pub source: String,
    pub loaded_at: SystemTime,
    pub workload: ResourceRef,
    pub config: MeshConfig,
    /// Settings the configuration asks for that this build validates but
    /// does not enforce yet; logged at start and shown in `/config`.
    pub not_enforced: Vec<String>,
}

#[derive(Debug)]
pub struct ProxyState {
    loaded: ArcSwap<Loaded>,
    listeners: ArcSwap<Vec<BoundListener>>,
    draining: AtomicBool,
}

impl ProxyState {
    pub fn new(loaded: Loaded) -> Arc<Self> {
        Arc::new(Self {
            loaded: ArcSwap::from_pointee(loaded),
            listeners: ArcSwap::from_pointee(Vec::new()),
            draining: AtomicBool::new(false),
        })
    }

    pub fn loaded(&self) -> Arc<Loaded> {
        self.loaded.load_full()
    }

    pub fn set_listeners(&self, listeners: Vec<BoundListener>) {
        self.listeners.store(Arc::new(listeners));
    }

    pub fn listeners(&self) -> Arc<Vec<BoundListener>> {
        self.listeners.load_full()
    }

    pub fn set_draining(&self) {
        self.draining.store(true, Ordering::Release);
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Acquire)
    }

    /// Ready when a policy is loaded, the listeners are bound, and we are
    /// not shutting down. (Once mTLS lands: and a certificate is in hand.)
    pub fn is_ready(&self) -> bool {
        !self.is_draining() && !self.listeners.load().is_empty()
    }
}

/// FNV-1a: a stable, dependency-free digest for config versions (not a
/// security boundary).
pub fn digest(bytes: &[u8]) -> String {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        hash ^= u64::from(*b);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    format!("{hash:016x}")
}
