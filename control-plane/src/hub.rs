//! What sidecars see: the current policy plus the endpoints that connected
//! sidecars registered, published as one immutable [`View`] on a watch
//! channel; and the record of every connected sidecar (proxy status).
//!
//! A new View is published on every policy revision and every change in
//! registered endpoints. Each sidecar's stream task wakes up, asks the
//! View for its workload's snapshot (built once per workload per View and
//! shared), and pushes it only if its version differs from what that
//! sidecar runs.

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

use outrigger_config::{Endpoint, MeshConfig, ResourceRef};
use serde::Serialize;
use tokio::sync::watch;

/// One workload's snapshot.
#[derive(Debug, PartialEq, Eq)]
pub struct Snapshot {
    /// A digest of `yaml` and the trust bundle.
    pub version: String,
    pub revision: u64,
    pub yaml: String,
    /// The roots sidecars trust (PEM); empty without a CA.
    pub trust_bundle: Arc<str>,
}

/// An immutable picture of everything sidecars are served.
#[derive(Debug)]
pub struct View {
    pub revision: u64,
    pub config: Arc<MeshConfig>,
    /// Service → endpoints registered by sidecars serving it.
    pub registered: Registered,
    /// Built on first use; `None` for a workload the policy does not define.
    snapshots: Mutex<HashMap<ResourceRef, Option<Arc<Snapshot>>>>,
    trust_bundle: Arc<str>,
}

impl View {
    fn new(
        revision: u64,
        config: Arc<MeshConfig>,
        registered: Registered,
        trust_bundle: Arc<str>,
    ) -> Self {
        Self {
            revision,
            config,
            registered,
            snapshots: Mutex::new(HashMap::new()),
            trust_bundle,
        }
    }

    /// The snapshot for `workload`; `None` when the policy does not
    /// define it (yet).
    pub fn snapshot_for(&self, workload: &ResourceRef) -> Option<Arc<Snapshot>> {
        let mut cache = lock(&self.snapshots);
        cache
            .entry(workload.clone())
            .or_insert_with(|| {
                build_snapshot(&self.config, &self.registered, workload).map(|yaml| {
                    // A new bundle (a root rotation) is a new version too.
                    let mut versioned = yaml.clone().into_bytes();
                    versioned.extend_from_slice(self.trust_bundle.as_bytes());
                    Arc::new(Snapshot {
                        version: outrigger_config::digest(&versioned),
                        revision: self.revision,
                        yaml,
                        trust_bundle: self.trust_bundle.clone(),
                    })
                })
            })
            .clone()
    }
}

/// Service → endpoint registered by a sidecar serving it → the SPIFFE ID
/// of that sidecar's workload.
pub type Registered = BTreeMap<ResourceRef, BTreeMap<SocketAddr, String>>;

/// Everything that concerns one workload, as a validated config of its
/// own: the Mesh, the Workload, the Services it calls (static plus
/// registered endpoints) and serves (without endpoints: a sidecar never
/// calls itself through them, and leaving them out spares every replica a
/// push whenever a sibling comes or goes), their TrafficPolicies, and the
/// AuthorizationPolicies that select it.
fn build_snapshot(
    config: &MeshConfig,
    registered: &Registered,
    id: &ResourceRef,
) -> Option<String> {
    let workload = config.workloads.iter().find(|w| &w.id == id)?;
    let mut services = BTreeMap::new();
    let destinations = workload.destinations();
    for destination in &destinations {
        let Some(service) = config.service(destination) else {
            continue;
        };
        let mut service = service.clone();
        // Static endpoints first: one also registered keeps what the
        // operator wrote.
        let mut endpoints: BTreeMap<SocketAddr, Endpoint> = service
            .endpoints
            .iter()
            .map(|e| (e.address, e.clone()))
            .collect();
        for (address, identity) in registered.get(&service.id).into_iter().flatten() {
            endpoints.entry(*address).or_insert_with(|| Endpoint {
                address: *address,
                identity: Some(identity.clone()),
            });
        }
        service.endpoints = endpoints.into_values().collect();
        services.insert(service.id.clone(), service);
    }
    for served in workload.inbound.iter().filter_map(|l| l.service.as_ref()) {
        if services.contains_key(served) {
            continue;
        }
        if let Some(service) = config.service(served) {
            let mut service = service.clone();
            service.endpoints.clear();
            services.insert(service.id.clone(), service);
        }
    }
    let traffic_policies = config
        .traffic_policies
        .iter()
        .filter(|p| destinations.contains(&&p.service))
        .cloned()
        .collect();
    let subset = MeshConfig {
        mesh: config.mesh.clone(),
        workloads: vec![workload.clone()],
        services: services.into_values().collect(),
        traffic_policies,
        authorization_policies: config.authorization_policies_for(id).cloned().collect(),
    };
    Some(outrigger_config::to_yaml(&subset))
}

/// A connected (or recently disconnected) sidecar.
#[derive(Debug, Clone)]
pub struct ProxyRecord {
    pub proxy_id: String,
    pub workload: ResourceRef,
    /// Where the stream comes from.
    pub peer: SocketAddr,
    /// Where its inbound listeners are reached.
    pub advertise_ip: IpAddr,
    /// It showed a valid bootstrap token for its workload.
    pub authenticated: bool,
    pub proxy_version: String,
    pub connected_since: SystemTime,
    /// Set when the stream ended; its endpoints stay for the grace period.
    pub disconnected_at: Option<SystemTime>,
    /// Inbound listener name → bound port, as last reported.
    pub inbound: Vec<(String, u16)>,
    pub sent_version: Option<String>,
    pub sent_nonce: Option<String>,
    pub sent_at: Option<Instant>,
    pub acked_version: Option<String>,
    pub acked_at: Option<SystemTime>,
    pub last_nack: Option<Nack>,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Nack {
    pub version: String,
    pub reason: String,
    #[serde(serialize_with = "crate::timefmt::serialize")]
    pub at: SystemTime,
}

impl ProxyRecord {
    /// A sidecar that just connected: nothing sent or acknowledged yet.
    pub fn new(
        proxy_id: String,
        workload: ResourceRef,
        peer: SocketAddr,
        advertise_ip: IpAddr,
        proxy_version: String,
    ) -> Self {
        Self {
            proxy_id,
            workload,
            peer,
            advertise_ip,
            authenticated: false,
            proxy_version,
            connected_since: SystemTime::now(),
            disconnected_at: None,
            inbound: Vec::new(),
            sent_version: None,
            sent_nonce: None,
            sent_at: None,
            acked_version: None,
            acked_at: None,
            last_nack: None,
        }
    }
}

/// A sidecar's stream, from the registry's point of view.
pub type ConnId = u64;

struct Registry {
    next: ConnId,
    proxies: BTreeMap<ConnId, ProxyRecord>,
}

/// The shared state of the discovery service.
pub struct Hub {
    policy: Mutex<(u64, Arc<MeshConfig>)>,
    registry: Mutex<Registry>,
    views: watch::Sender<Arc<View>>,
    /// How long a disconnected sidecar's endpoints stay (it may be
    /// reconnecting).
    pub grace: Duration,
    /// Where registrations are saved (see
    /// [`Hub::with_registrations_file`]); a write is due when notified.
    registrations_file: Option<std::path::PathBuf>,
    save_due: tokio::sync::Notify,
    /// Sent with every snapshot.
    trust_bundle: Arc<str>,
}

/// After a restart, how long the registrations saved by the previous run
/// stay without their sidecar reconnecting: longer than a sidecar's
/// longest reconnect backoff (30 s), so a healthy endpoint is not dropped
/// just because its sidecar has not come back yet.
pub const RESTORED_GRACE: Duration = Duration::from_secs(45);

/// A registration as saved to disk.
#[derive(Debug, Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
struct SavedRegistration {
    proxy_id: String,
    workload: String,
    advertise_ip: IpAddr,
    inbound: Vec<(String, u16)>,
    #[serde(default)]
    authenticated: bool,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding one of these locks leaves plain data behind,
    // still consistent enough to serve; do not take the server down too.
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Hub {
    #[cfg(test)]
    pub fn new(revision: u64, config: Arc<MeshConfig>, grace: Duration) -> Arc<Self> {
        Self::with_registrations_file(revision, config, grace, None, Arc::from(""))
    }

    /// A hub that saves registered endpoints to `file` (at most about
    /// twice a second) and starts from the ones saved there, so that a
    /// restarted control plane serves the same endpoints while the
    /// sidecars reconnect, instead of pushing snapshots without them.
    /// Must be called within a tokio runtime when `file` is set.
    pub fn with_registrations_file(
        revision: u64,
        config: Arc<MeshConfig>,
        grace: Duration,
        file: Option<std::path::PathBuf>,
        trust_bundle: Arc<str>,
    ) -> Arc<Self> {
        let view = View::new(
            revision,
            config.clone(),
            BTreeMap::new(),
            trust_bundle.clone(),
        );
        let (views, _) = watch::channel(Arc::new(view));
        let hub = Arc::new(Self {
            policy: Mutex::new((revision, config)),
            registry: Mutex::new(Registry {
                next: 1,
                proxies: BTreeMap::new(),
            }),
            views,
            grace,
            registrations_file: file,
            save_due: tokio::sync::Notify::new(),
            trust_bundle,
        });
        if hub.registrations_file.is_some() {
            hub.restore_registrations();
            let saver = hub.clone();
            tokio::spawn(async move {
                loop {
                    saver.save_due.notified().await;
                    // Coalesce a burst of (re)connections into one write.
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    saver.save_registrations();
                }
            });
        }
        hub
    }

    /// Loads the registrations the previous run saved, as disconnected
    /// sidecars that get [`RESTORED_GRACE`] to come back.
    fn restore_registrations(self: &Arc<Self>) {
        let Some(path) = &self.registrations_file else {
            return;
        };
        let saved: Vec<SavedRegistration> = match std::fs::read(path) {
            Ok(bytes) => match serde_json::from_slice(&bytes) {
                Ok(saved) => saved,
                Err(e) => {
                    tracing::warn!(path = %path.display(), error = %e, "ignoring damaged saved registrations");
                    return;
                }
            },
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return,
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "cannot read saved registrations");
                return;
            }
        };
        let mut ids = Vec::new();
        {
            let mut registry = lock(&self.registry);
            for s in saved {
                let Some((ns, name)) = s.workload.split_once('/') else {
                    continue;
                };
                let mut record = ProxyRecord::new(
                    s.proxy_id,
                    ResourceRef::new(ns, name),
                    SocketAddr::new(s.advertise_ip, 0),
                    s.advertise_ip,
                    String::new(),
                );
                record.inbound = s.inbound;
                record.authenticated = s.authenticated;
                record.disconnected_at = Some(SystemTime::now());
                let id = registry.next;
                registry.next += 1;
                registry.proxies.insert(id, record);
                ids.push(id);
            }
        }
        tracing::info!(count = ids.len(), grace = ?RESTORED_GRACE, "restored the endpoint registrations of the previous run");
        for id in ids {
            self.expire_after(id, RESTORED_GRACE);
        }
        self.publish(true);
    }

    fn save_registrations(&self) {
        let Some(path) = &self.registrations_file else {
            return;
        };
        let saved: Vec<SavedRegistration> = lock(&self.registry)
            .proxies
            .values()
            .filter(|p| !p.inbound.is_empty())
            .map(|p| SavedRegistration {
                proxy_id: p.proxy_id.clone(),
                workload: p.workload.to_string(),
                advertise_ip: p.advertise_ip,
                inbound: p.inbound.clone(),
                authenticated: p.authenticated,
            })
            .collect();
        // Written to a temporary name and renamed: a crash leaves the old
        // file or the new one. Not fsynced: it only has to outlive the
        // process, not the machine.
        let tmp = path.with_extension("tmp");
        let result = serde_json::to_vec(&saved)
            .map_err(std::io::Error::other)
            .and_then(|bytes| std::fs::write(&tmp, bytes))
            .and_then(|()| std::fs::rename(&tmp, path));
        if let Err(e) = result {
            tracing::warn!(path = %path.display(), error = %e, "cannot save endpoint registrations");
        }
    }

    /// Removes a disconnected record after `after`, unless it reconnected.
    fn expire_after(self: &Arc<Self>, id: ConnId, after: Duration) {
        let hub = self.clone();
        tokio::spawn(async move {
            tokio::time::sleep(after).await;
            let removed = {
                let mut registry = lock(&hub.registry);
                match registry.proxies.get(&id) {
                    Some(p) if p.disconnected_at.is_some() => {
                        registry.proxies.remove(&id).is_some()
                    }
                    _ => false,
                }
            };
            if removed {
                hub.publish(false);
                hub.save_due.notify_one();
            }
        });
    }

    pub fn subscribe(&self) -> watch::Receiver<Arc<View>> {
        self.views.subscribe()
    }

    pub fn view(&self) -> Arc<View> {
        self.views.borrow().clone()
    }

    /// A new policy revision: every sidecar it concerns gets a push.
    pub fn set_policy(&self, revision: u64, config: Arc<MeshConfig>) {
        *lock(&self.policy) = (revision, config);
        self.publish(true);
    }

    /// Builds and publishes a new View; with `force` false only when the
    /// registered endpoints changed.
    fn publish(&self, force: bool) {
        let (revision, config) = lock(&self.policy).clone();
        let registered = {
            let registry = lock(&self.registry);
            registered_endpoints(&config, registry.proxies.values())
        };
        if !force && self.views.borrow().registered == registered {
            return;
        }
        self.views.send_replace(Arc::new(View::new(
            revision,
            config,
            registered,
            self.trust_bundle.clone(),
        )));
    }

    /// A new stream from a sidecar. A previous, disconnected record of the
    /// same sidecar is replaced.
    pub fn connect(&self, mut record: ProxyRecord) -> ConnId {
        let id = {
            let mut registry = lock(&self.registry);
            if registry
                .proxies
                .values()
                .any(|p| p.proxy_id == record.proxy_id && p.disconnected_at.is_none())
            {
                tracing::warn!(proxy = %record.proxy_id, "two connected sidecars share this proxy id; give each its own --proxy-id");
            }
            registry
                .proxies
                .retain(|_, p| !(p.proxy_id == record.proxy_id && p.disconnected_at.is_some()));
            let id = registry.next;
            registry.next += 1;
            record.disconnected_at = None;
            registry.proxies.insert(id, record);
            id
        };
        metrics::gauge!("outrigger_cp_connected_proxies").increment(1.0);
        id
    }

    /// Updates a record (what was sent, acked, ...).
    pub fn update<R>(&self, id: ConnId, f: impl FnOnce(&mut ProxyRecord) -> R) -> Option<R> {
        lock(&self.registry).proxies.get_mut(&id).map(f)
    }

    /// The sidecar reported its bound inbound listeners.
    pub fn set_inbound(&self, id: ConnId, inbound: Vec<(String, u16)>) {
        let changed = self
            .update(id, |p| {
                let changed = p.inbound != inbound;
                p.inbound = inbound;
                changed
            })
            .unwrap_or(false);
        if changed {
            self.publish(false);
            self.save_due.notify_one();
        }
    }

    /// The stream ended: the sidecar's endpoints stay for the grace period
    /// (unless it reconnects), then go.
    pub fn disconnect(self: &Arc<Self>, id: ConnId) {
        let had = self
            .update(id, |p| p.disconnected_at = Some(SystemTime::now()))
            .is_some();
        if !had {
            return;
        }
        metrics::gauge!("outrigger_cp_connected_proxies").decrement(1.0);
        self.expire_after(id, self.grace);
    }

    pub fn proxies(&self) -> Vec<ProxyRecord> {
        lock(&self.registry).proxies.values().cloned().collect()
    }
}

fn registered_endpoints<'a>(
    config: &MeshConfig,
    proxies: impl Iterator<Item = &'a ProxyRecord>,
) -> Registered {
    let mut out: Registered = BTreeMap::new();
    let trust_domain = &config.mesh.trust_domain;
    for proxy in proxies {
        let Some(workload) = config.workloads.iter().find(|w| w.id == proxy.workload) else {
            continue;
        };
        for (name, port) in &proxy.inbound {
            let served = workload
                .inbound
                .iter()
                .find(|l| &l.name == name)
                .and_then(|l| l.service.clone());
            if let Some(service) = served {
                out.entry(service).or_default().insert(
                    SocketAddr::new(proxy.advertise_ip, *port),
                    workload.spiffe_id(trust_domain),
                );
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    const MESH: &str = "\
apiVersion: outrigger.io/v1alpha1
kind: Service
metadata: {name: api, namespace: shop}
spec: {endpoints: [{address: '10.0.0.1:80'}]}
---
apiVersion: outrigger.io/v1alpha1
kind: Service
metadata: {name: web, namespace: shop}
spec: {}
---
apiVersion: outrigger.io/v1alpha1
kind: Workload
metadata: {name: web, namespace: shop}
spec: {inbound: [{name: http, port: 0, appPort: 1, service: web}], outbound: [{port: 0, service: api}]}
---
apiVersion: outrigger.io/v1alpha1
kind: Workload
metadata: {name: api, namespace: shop}
spec: {inbound: [{name: http, port: 0, appPort: 1, service: api}]}
---
apiVersion: outrigger.io/v1alpha1
kind: TrafficPolicy
metadata: {name: api, namespace: shop}
spec: {service: api}
";

    fn record(workload: &str, proxy_id: &str) -> ProxyRecord {
        ProxyRecord::new(
            proxy_id.into(),
            ResourceRef::new("shop", workload),
            "127.0.0.1:5000".parse().unwrap(),
            "127.0.0.2".parse().unwrap(),
            "t".into(),
        )
    }

    #[tokio::test]
    async fn snapshots_carry_what_concerns_the_workload_and_registered_endpoints() {
        let config = Arc::new(outrigger_config::load_str("t", MESH).unwrap());
        let hub = Hub::new(1, config, Duration::from_secs(60));
        let web = ResourceRef::new("shop", "web");
        let first = hub.view().snapshot_for(&web).unwrap();
        let loaded = outrigger_config::load_str("snapshot", &first.yaml).unwrap();
        assert_eq!(loaded.workloads.len(), 1);
        assert_eq!(loaded.traffic_policies.len(), 1);
        assert_eq!(loaded.services.len(), 2);
        assert!(
            hub.view()
                .snapshot_for(&ResourceRef::new("shop", "nope"))
                .is_none()
        );

        // An api sidecar registers: web's snapshot gains the endpoint.
        let api = hub.connect(record("api", "api-1"));
        hub.set_inbound(api, vec![("http".into(), 4143)]);
        let second = hub.view().snapshot_for(&web).unwrap();
        assert_ne!(first.version, second.version);
        assert!(second.yaml.contains("127.0.0.2:4143"), "{}", second.yaml);
        // With the identity its sidecar's certificate carries, so web's
        // sidecar can check it over mTLS without knowing workload api.
        let loaded = outrigger_config::load_str("snapshot", &second.yaml).unwrap();
        let endpoint = loaded.services[0]
            .endpoints
            .iter()
            .find(|e| e.address.port() == 4143)
            .unwrap();
        assert_eq!(
            endpoint.identity.as_deref(),
            Some("spiffe://cluster.local/ns/shop/sa/api"),
            "{}",
            second.yaml
        );

        // A web sidecar registering changes nothing for web itself (its
        // own Service is carried without endpoints).
        let before = hub.view().snapshot_for(&web).unwrap();
        let w = hub.connect(record("web", "web-1"));
        hub.set_inbound(w, vec![("http".into(), 4200)]);
        assert_eq!(
            hub.view().snapshot_for(&web).unwrap().version,
            before.version
        );
    }
}
