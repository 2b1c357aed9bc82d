//! The validated policy model.
//!
//! These types are only ever built by [`crate::load_str`] /
//! [`crate::load_file`] from raw YAML documents, after every field and
//! cross-reference has been checked. Code that holds a [`MeshConfig`] can
//! rely on it: every outbound listener names a service that exists, ports
//! do not clash, durations are positive, and so on.

use std::fmt;
use std::net::SocketAddr;
use std::time::Duration;

use serde::{Serialize, Serializer};

/// The API version every document must carry.
pub const API_VERSION: &str = "outrigger.io/v1alpha1";

/// The namespace used when `metadata.namespace` is absent.
pub const DEFAULT_NAMESPACE: &str = "default";

/// A namespaced resource name, shown as `namespace/name`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct ResourceRef {
    pub namespace: String,
    pub name: String,
}

impl ResourceRef {
    pub fn new(namespace: impl Into<String>, name: impl Into<String>) -> Self {
        Self {
            namespace: namespace.into(),
            name: name.into(),
        }
    }
}

impl fmt::Display for ResourceRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// The whole validated configuration: what one YAML file (or, later, one
/// control-plane snapshot) describes.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct MeshConfig {
    pub mesh: MeshSettings,
    /// Sorted by `(namespace, name)`.
    pub workloads: Vec<Workload>,
    /// Sorted by `(namespace, name)`.
    pub services: Vec<Service>,
    /// Sorted by `(namespace, name)`; at most one per service.
    pub traffic_policies: Vec<TrafficPolicy>,
    /// Sorted by `(namespace, name)`.
    pub authorization_policies: Vec<AuthorizationPolicy>,
}

/// Mesh-wide settings (the `Mesh` document; all fields have defaults, so the
/// document itself is optional).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct MeshSettings {
    pub name: String,
    /// e.g. `cluster.local`; SPIFFE IDs are `spiffe://<trust_domain>/ns/<ns>/sa/<sa>`.
    pub trust_domain: String,
    /// What inbound does for a workload that no AuthorizationPolicy selects.
    pub default_authorization: DefaultAction,
    pub tracing: TracingSettings,
}

impl Default for MeshSettings {
    /// What applies when there is no Mesh document.
    fn default() -> Self {
        Self {
            name: "mesh".to_string(),
            trust_domain: "cluster.local".to_string(),
            default_authorization: DefaultAction::Deny,
            tracing: TracingSettings::default(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum DefaultAction {
    Deny,
    Allow,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TracingSettings {
    /// 0.0 ..= 100.0
    pub sampling_percent: f64,
    /// `http://host:port` of an OTLP/gRPC collector, if any.
    pub otlp_endpoint: Option<String>,
}

impl Default for TracingSettings {
    fn default() -> Self {
        Self {
            sampling_percent: 1.0,
            otlp_endpoint: None,
        }
    }
}

/// One sidecar: its identity and its listeners.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Workload {
    pub id: ResourceRef,
    pub service_account: String,
    /// At least one.
    pub inbound: Vec<InboundListener>,
    pub outbound: Vec<OutboundListener>,
}

impl Workload {
    /// Every Service this workload may call (its egress allow-list), each
    /// once, in the order its outbound listeners first name them.
    pub fn destinations(&self) -> Vec<&ResourceRef> {
        let mut out: Vec<&ResourceRef> = Vec::new();
        for service in self.outbound.iter().flat_map(OutboundListener::services) {
            if !out.contains(&service) {
                out.push(service);
            }
        }
        out
    }

    /// The SPIFFE ID this workload's certificate carries.
    pub fn spiffe_id(&self, trust_domain: &str) -> String {
        format!(
            "spiffe://{}/ns/{}/sa/{}",
            trust_domain, self.id.namespace, self.service_account
        )
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    /// HTTP/1.1 or HTTP/2 (h2c prior knowledge); the version is preserved hop by hop.
    Http,
    /// Opaque bytes.
    Tcp,
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Protocol::Http => "http",
            Protocol::Tcp => "tcp",
        })
    }
}

/// A port peers connect to; traffic is forwarded to `127.0.0.1:<app_port>`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct InboundListener {
    /// Unique within the workload; defaults to `port-<port>`.
    pub name: String,
    /// 0 means "any free port" (useful in tests).
    pub port: u16,
    /// 1..=65535
    pub app_port: u16,
    pub protocol: Protocol,
    /// Idle timeout for opaque TCP connections (default 1h).
    #[serde(serialize_with = "serialize_duration")]
    pub idle_timeout: Duration,
    /// The Service this listener serves (same namespace, same protocol).
    /// A control plane adds the sidecar's address for this listener to
    /// that Service's endpoints while the sidecar is connected.
    pub service: Option<ResourceRef>,
}

/// A local port the app connects to in order to reach the mesh.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct OutboundListener {
    /// 0 means "any free port" (useful in tests). Unique within the
    /// workload and distinct from its inbound ports.
    pub port: u16,
    #[serde(flatten)]
    pub target: OutboundTarget,
}

/// Where an outbound listener sends what the app gives it. Together, a
/// Workload's targets are its egress allow-list: the sidecar carries
/// nothing to any other destination.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum OutboundTarget {
    /// Every request (or connection) goes to this existing Service.
    Service(ResourceRef),
    /// HTTP only: each request's `Host` (or `:authority`) names one of
    /// these Services (`name`, `name.namespace`, `name.namespace.svc`,
    /// `name.namespace.svc.cluster.local`); a request for any other host is
    /// refused by the sidecar. At least one, no repeats, all HTTP.
    #[serde(rename = "services")]
    ByHost(Vec<ResourceRef>),
}

impl OutboundListener {
    /// The Services this listener may reach.
    pub fn services(&self) -> &[ResourceRef] {
        match &self.target {
            OutboundTarget::Service(service) => std::slice::from_ref(service),
            OutboundTarget::ByHost(services) => services,
        }
    }
}

/// A destination.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Service {
    pub id: ResourceRef,
    /// The SPIFFE ID its servers must present over mTLS (endpoints may
    /// override it).
    pub identity: Option<String>,
    pub protocol: Protocol,
    /// Static endpoints; may be empty (registered later by sidecars).
    pub endpoints: Vec<Endpoint>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Endpoint {
    pub address: SocketAddr,
    /// The SPIFFE ID this endpoint's server must present, when it differs
    /// from the Service's (a control plane sets it for the endpoints
    /// sidecars register).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub identity: Option<String>,
}

/// Per-destination client behaviour.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TrafficPolicy {
    pub id: ResourceRef,
    /// The Service this policy applies to (same namespace).
    pub service: ResourceRef,
    pub timeouts: Timeouts,
    pub retries: Option<RetryPolicy>,
    pub circuit_breaker: CircuitBreaker,
    pub outlier_detection: Option<OutlierDetection>,
    pub load_balancer: LoadBalancer,
    /// Timeouts by path prefix, longest prefix first.
    pub routes: Vec<RouteTimeouts>,
}

/// Timeouts for the requests whose path starts with `path_prefix` (the
/// longest matching prefix wins). Both are resolved at validation: a
/// route that leaves one out has the policy's.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RouteTimeouts {
    pub path_prefix: String,
    /// The whole-request timeout (`None`: no limit).
    #[serde(serialize_with = "serialize_optional_duration")]
    pub request: Option<Duration>,
    /// Each attempt's timeout, with retries (`None`: no limit).
    #[serde(serialize_with = "serialize_optional_duration")]
    pub per_try: Option<Duration>,
}

impl TrafficPolicy {
    /// The route timeouts for `path`, if a route prefix matches.
    pub fn route_for(&self, path: &str) -> Option<&RouteTimeouts> {
        self.routes
            .iter()
            .find(|r| path.starts_with(r.path_prefix.as_str()))
    }
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Timeouts {
    /// Time from the start of a request to its response headers.
    /// `None` disables it. Default 15s.
    #[serde(serialize_with = "serialize_optional_duration")]
    pub request: Option<Duration>,
    /// TCP connect timeout to an endpoint. Default 1s.
    #[serde(serialize_with = "serialize_duration")]
    pub connect: Duration,
    /// Idle timeout for pooled HTTP connections and opaque TCP streams.
    /// Default 1h for TCP streams; pooled HTTP connections use min(idle, 90s).
    #[serde(serialize_with = "serialize_duration")]
    pub idle: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Self {
            request: Some(Duration::from_secs(15)),
            connect: Duration::from_secs(1),
            idle: Duration::from_secs(3600),
        }
    }
}

/// The 16 non-OK gRPC status codes, as `retriableGrpcCodes` spells them;
/// code N is `GRPC_CODES[N - 1]`.
pub const GRPC_CODES: [&str; 16] = [
    "cancelled",
    "unknown",
    "invalid_argument",
    "deadline_exceeded",
    "not_found",
    "already_exists",
    "permission_denied",
    "resource_exhausted",
    "failed_precondition",
    "aborted",
    "out_of_range",
    "unimplemented",
    "internal",
    "unavailable",
    "data_loss",
    "unauthenticated",
];

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RetryPolicy {
    /// Total attempts including the first, 1..=10.
    pub attempts: u32,
    pub retry_on: Vec<RetryOn>,
    #[serde(serialize_with = "serialize_optional_duration")]
    pub per_try_timeout: Option<Duration>,
    #[serde(serialize_with = "serialize_duration")]
    pub backoff_base: Duration,
    #[serde(serialize_with = "serialize_duration")]
    pub backoff_max: Duration,
    /// Retry POST/PATCH too (off by default: retried payments hurt).
    pub retry_non_idempotent: bool,
    pub budget: RetryBudget,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum RetryOn {
    /// any 5xx
    ServerError,
    /// 502, 503, 504
    GatewayError,
    ConnectFailure,
    Reset,
    /// One exact HTTP status code (100..=599).
    StatusCode(u16),
    /// A gRPC status code name such as `unavailable`.
    GrpcStatus(String),
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RetryBudget {
    /// 0.0 ..= 1.0; default 0.2
    pub ratio: f64,
    /// default 10
    pub min_retries_per_second: u32,
    /// default 10s
    #[serde(serialize_with = "serialize_duration")]
    pub window: Duration,
}

impl Default for RetryBudget {
    fn default() -> Self {
        Self {
            ratio: 0.2,
            min_retries_per_second: 10,
            window: Duration::from_secs(10),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CircuitBreaker {
    pub max_connections: u32,
    pub max_pending_requests: u32,
    pub max_requests: u32,
}

impl Default for CircuitBreaker {
    fn default() -> Self {
        Self {
            max_connections: 1024,
            max_pending_requests: 1024,
            max_requests: 1024,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct OutlierDetection {
    /// default 5
    pub consecutive_failures: u32,
    /// default 30s
    #[serde(serialize_with = "serialize_duration")]
    pub base_ejection_time: Duration,
    /// default 300s; >= base_ejection_time
    #[serde(serialize_with = "serialize_duration")]
    pub max_ejection_time: Duration,
    /// 0..=100, default 50
    pub max_ejection_percent: u8,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum LoadBalancer {
    #[default]
    P2cEwma,
    RoundRobin,
    LeastRequest,
}

/// Who may call a workload.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct AuthorizationPolicy {
    pub id: ResourceRef,
    /// The Workload this policy selects (same namespace).
    pub workload: ResourceRef,
    pub action: AuthzAction,
    /// At least one.
    pub rules: Vec<AuthzRule>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum AuthzAction {
    Allow,
    Deny,
}

/// A rule matches when every non-empty list in it matches (an empty list
/// matches anything).
#[derive(Debug, Clone, PartialEq, Default, Serialize)]
pub struct AuthzRule {
    pub principals: Vec<StringMatch>,
    pub namespaces: Vec<String>,
    pub methods: Vec<String>,
    pub paths: Vec<StringMatch>,
    pub ports: Vec<u16>,
}

/// An exact string, or a prefix (written with a trailing `*`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum StringMatch {
    Exact(String),
    Prefix(String),
}

impl StringMatch {
    pub fn matches(&self, value: &str) -> bool {
        match self {
            StringMatch::Exact(s) => value == s,
            StringMatch::Prefix(p) => value.starts_with(p.as_str()),
        }
    }
}

// === impl MeshConfig ===

impl MeshConfig {
    /// Looks a workload up by name, in `namespace` when given, else in any
    /// namespace (an error string if the name is ambiguous or unknown).
    pub fn workload(&self, namespace: Option<&str>, name: &str) -> Result<&Workload, String> {
        let mut found = self
            .workloads
            .iter()
            .filter(|w| w.id.name == name && namespace.is_none_or(|ns| w.id.namespace == ns));
        match (found.next(), found.next()) {
            (Some(w), None) => Ok(w),
            (Some(a), Some(b)) => Err(format!(
                "workload name {name:?} is ambiguous ({} and {}): give the namespace as NAMESPACE/NAME",
                a.id, b.id
            )),
            (None, _) => {
                let known: Vec<String> = self.workloads.iter().map(|w| w.id.to_string()).collect();
                Err(format!(
                    "no Workload named {name:?}{}; the configuration defines: {}",
                    namespace
                        .map(|ns| format!(" in namespace {ns:?}"))
                        .unwrap_or_default(),
                    if known.is_empty() {
                        "none".to_string()
                    } else {
                        known.join(", ")
                    }
                ))
            }
        }
    }

    pub fn service(&self, id: &ResourceRef) -> Option<&Service> {
        self.services.iter().find(|s| &s.id == id)
    }

    pub fn traffic_policy_for(&self, service: &ResourceRef) -> Option<&TrafficPolicy> {
        self.traffic_policies.iter().find(|p| &p.service == service)
    }

    /// The SPIFFE IDs a server of `service` may present, for endpoints that
    /// do not name their own: the Service's declared identity, else those of
    /// the Workloads in this configuration whose inbound listeners serve it
    /// (sorted, no repeats). Empty: the service is outside the mesh.
    pub fn service_identities(&self, service: &Service) -> Vec<String> {
        if let Some(identity) = &service.identity {
            return vec![identity.clone()];
        }
        let mut ids: Vec<String> = self
            .workloads
            .iter()
            .filter(|w| {
                w.inbound
                    .iter()
                    .any(|l| l.service.as_ref() == Some(&service.id))
            })
            .map(|w| w.spiffe_id(&self.mesh.trust_domain))
            .collect();
        ids.sort();
        ids.dedup();
        ids
    }

    pub fn authorization_policies_for<'a>(
        &'a self,
        workload: &'a ResourceRef,
    ) -> impl Iterator<Item = &'a AuthorizationPolicy> + 'a {
        self.authorization_policies
            .iter()
            .filter(move |p| &p.workload == workload)
    }
}

/// Formats a duration the way the YAML accepts it (`250ms`, `15s`, `2m`, `1h`).
pub fn format_duration(d: Duration) -> String {
    let ms = d.as_millis();
    if ms == 0 {
        "0s".to_string()
    } else if ms.is_multiple_of(3_600_000) {
        format!("{}h", ms / 3_600_000)
    } else if ms.is_multiple_of(60_000) {
        format!("{}m", ms / 60_000)
    } else if ms.is_multiple_of(1000) {
        format!("{}s", ms / 1000)
    } else {
        format!("{ms}ms")
    }
}

/// Serializes a duration the way the YAML writes it, so JSON and YAML
/// views of the model agree (`"request": "15s"`).
pub fn serialize_duration<S: Serializer>(d: &Duration, serializer: S) -> Result<S::Ok, S::Error> {
    serializer.serialize_str(&format_duration(*d))
}

/// Like [`serialize_duration`]; `None` is `null`.
pub fn serialize_optional_duration<S: Serializer>(
    d: &Option<Duration>,
    serializer: S,
) -> Result<S::Ok, S::Error> {
    match d {
        Some(d) => serialize_duration(d, serializer),
        None => serializer.serialize_none(),
    }
}
