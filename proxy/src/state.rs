//! What the proxy is running, shared with the admin server.
//!
//! The data path never reads this: each listener's stack holds its own
//! swappable route. It exists so `/config` and `/ready` can tell the truth.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::SystemTime;

use arc_swap::ArcSwapOption;
use outrigger_config::{MeshConfig, ResourceRef};
use serde::Serialize;

use crate::forward::SharedDestination;
use crate::identity::Identity;
use crate::transport::ClientSide;

/// One bound listener, as reported on stdout at start and in `/config`.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct BoundListener {
    /// `inbound/<name>` or `outbound/<service>`.
    pub name: String,
    pub direction: Direction,
    pub protocol: outrigger_config::Protocol,
    pub addr: SocketAddr,
    /// Where its traffic goes: the local app address, or a service name.
    pub target: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Direction {
    Inbound,
    Outbound,
}

/// A configuration as loaded, with where it came from.
#[derive(Debug)]
pub struct Loaded {
    /// A digest of the source text by default (equal text, equal version);
    /// a control plane sets its own.
    pub version: String,
    pub source: String,
    pub loaded_at: SystemTime,
    pub workload: ResourceRef,
    pub config: MeshConfig,
    /// Settings the configuration asks for that this build validates but
    /// does not enforce yet; logged when applied and shown in `/config`.
    pub not_enforced: Vec<String>,
}

impl Loaded {
    /// Replaces the version, e.g. with the one a control plane assigned.
    pub fn with_version(mut self, version: impl Into<String>) -> Self {
        self.version = version.into();
        self
    }
}

/// The configuration being served and the listeners bound for it. They
/// are swapped together so `/config` never shows one without the other.
#[derive(Debug)]
pub struct Applied {
    pub loaded: Arc<Loaded>,
    pub listeners: Vec<BoundListener>,
    /// The live outbound destinations by service, so `/config` can show
    /// each endpoint's score (read at request time, never written).
    pub destinations: Vec<LiveDestination>,
}

/// A service's destination as the data path has it now.
pub type LiveDestination = (Arc<str>, SharedDestination<ClientSide>);

#[derive(Debug, Default)]
pub struct ProxyState {
    /// `None` until a first configuration has been applied (a control
    /// plane may deliver it after start).
    applied: ArcSwapOption<Applied>,
    draining: AtomicBool,
    /// Set once at start when the sidecar runs mTLS.
    identity: OnceLock<Arc<Identity>>,
    /// Woken whenever a configuration is applied.
    applied_changed: tokio::sync::Notify,
}

impl ProxyState {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    pub fn set_applied(
        &self,
        loaded: Arc<Loaded>,
        listeners: Vec<BoundListener>,
        destinations: Vec<LiveDestination>,
    ) {
        self.applied.store(Some(Arc::new(Applied {
            loaded,
            listeners,
            destinations,
        })));
        self.applied_changed.notify_waiters();
    }

    /// Resolves at the next [`ProxyState::set_applied`]. Create it before
    /// reading the state it guards, or a change in between is missed.
    pub fn applied_changed(&self) -> tokio::sync::futures::Notified<'_> {
        self.applied_changed.notified()
    }

    pub fn applied(&self) -> Option<Arc<Applied>> {
        self.applied.load_full()
    }

    pub fn loaded(&self) -> Option<Arc<Loaded>> {
        self.applied.load().as_ref().map(|a| a.loaded.clone())
    }

    pub fn listeners(&self) -> Vec<BoundListener> {
        self.applied
            .load()
            .as_ref()
            .map(|a| a.listeners.clone())
            .unwrap_or_default()
    }

    /// Makes readiness wait for a certificate. Once per process.
    pub fn set_identity(&self, identity: Arc<Identity>) {
        let _ = self.identity.set(identity);
    }

    pub fn identity(&self) -> Option<&Arc<Identity>> {
        self.identity.get()
    }

    /// Whether a certificate is needed and missing.
    pub fn lacks_certificate(&self) -> bool {
        self.identity.get().is_some_and(|i| !i.is_ready())
    }

    pub fn set_draining(&self) {
        self.draining.store(true, Ordering::Release);
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Acquire)
    }

    /// Ready when a configuration is applied, its listeners are bound, a
    /// certificate is in hand (with mTLS), and we are not shutting down.
    pub fn is_ready(&self) -> bool {
        !self.is_draining()
            && !self.lacks_certificate()
            && self
                .applied
                .load()
                .as_ref()
                .is_some_and(|a| !a.listeners.is_empty())
    }
}
