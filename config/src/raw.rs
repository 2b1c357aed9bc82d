//! The YAML documents exactly as written, before any checking.
//!
//! Almost everything is optional here, even fields the model requires:
//! that way a missing field gets our own error naming its full path, and
//! defaults are applied in one place (`validate.rs`). Numbers are `i64` so that an
//! out-of-range port says "must be between 1 and 65535" instead of serde's
//! "expected u16". Only closed sets of words are enums, where serde's
//! "unknown variant `htp`, expected `http` or `tcp`" is already clear.
//!
//! The same types are serialized by [`crate::to_yaml`], so what we emit
//! has exactly the shape we parse.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Deserializer, Serialize};

use crate::model::*;

/// One YAML document. Parsed with `S = serde_norway::Value` first, so the
/// header can be checked before the spec is parsed by kind.
#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", expecting = "a mapping")]
pub struct RawDocument<S> {
    pub api_version: Option<String>,
    pub kind: Option<String>,
    pub metadata: Option<RawMetadata>,
    pub spec: Option<S>,
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", expecting = "a mapping")]
pub struct RawMetadata {
    pub name: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    /// Accepted so that Kubernetes-style tooling can annotate documents; ignored.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub labels: Option<BTreeMap<String, String>>,
    /// Accepted and ignored, like `labels`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub annotations: Option<BTreeMap<String, String>>,
}

/// A duration as written. Numbers are taken too (and refused later by
/// `parse_duration`), so that `timeout: 15` explains the expected format
/// rather than saying "expected a string".
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(transparent)]
pub struct RawDuration(pub String);

impl<'de> Deserialize<'de> for RawDuration {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor;

        impl serde::de::Visitor<'_> for Visitor {
            type Value = RawDuration;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a duration like 250ms, 15s, 2m or 1h")
            }

            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<RawDuration, E> {
                Ok(RawDuration(v.to_string()))
            }

            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<RawDuration, E> {
                Ok(RawDuration(v.to_string()))
            }

            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<RawDuration, E> {
                Ok(RawDuration(v.to_string()))
            }

            fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<RawDuration, E> {
                Ok(RawDuration(v.to_string()))
            }
        }

        deserializer.deserialize_any(Visitor)
    }
}

// === Mesh ===

#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", expecting = "a mapping")]
pub struct RawMeshSpec {
    pub trust_domain: Option<String>,
    pub authorization: Option<RawMeshAuthorization>,
    pub tracing: Option<RawTracing>,
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", expecting = "a mapping")]
pub struct RawMeshAuthorization {
    pub default_action: Option<RawDefaultAction>,
}

#[derive(Debug, Clone, Copy, Deserialize, Serialize)]
#[serde(rename_all = "lowercase", expecting = "deny or allow")]
pub enum RawDefaultAction {
    Deny,
    Allow,
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", expecting = "a mapping")]
pub struct RawTracing {
    pub sampling_percent: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub otlp_endpoint: Option<String>,
}

// === Workload ===

#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", expecting = "a mapping")]
pub struct RawWorkloadSpec {
    pub service_account: Option<String>,
    pub inbound: Option<Vec<RawInbound>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub outbound: Option<Vec<RawOutbound>>,
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", expecting = "a mapping")]
pub struct RawInbound {
    pub name: Option<String>,
    pub port: Option<i64>,
    pub app_port: Option<i64>,
    pub protocol: Option<RawProtocol>,
    pub idle_timeout: Option<RawDuration>,
    /// The Service (in the workload's namespace) this listener serves; with
    /// a control plane, the sidecar's address becomes one of its endpoints.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub service: Option<String>,
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", expecting = "a mapping")]
pub struct RawOutbound {
    pub port: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub service: Option<String>,
    /// Several Services on one port, chosen by the Host header: each
    /// `NAME` (in `namespace`) or `NAMESPACE/NAME`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub services: Option<Vec<String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
}

#[derive(Debug, Clone, Copy, Deserialize, Serialize)]
#[serde(rename_all = "lowercase", expecting = "http or tcp")]
pub enum RawProtocol {
    Http,
    Tcp,
}

// === Service ===

#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", expecting = "a mapping")]
pub struct RawServiceSpec {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub identity: Option<String>,
    pub protocol: Option<RawProtocol>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub endpoints: Option<Vec<RawEndpoint>>,
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", expecting = "a mapping")]
pub struct RawEndpoint {
    pub address: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub identity: Option<String>,
}

// === TrafficPolicy ===

#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", expecting = "a mapping")]
pub struct RawTrafficPolicySpec {
    pub service: Option<String>,
    pub timeouts: Option<RawTimeouts>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub retries: Option<RawRetries>,
    pub circuit_breaker: Option<RawCircuitBreaker>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub outlier_detection: Option<RawOutlierDetection>,
    pub load_balancer: Option<RawLoadBalancer>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub routes: Option<Vec<RawRoute>>,
}

/// Timeouts for the requests whose path starts with `pathPrefix`.
#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", expecting = "a mapping")]
pub struct RawRoute {
    pub path_prefix: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub request_timeout: Option<RawDuration>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub per_try_timeout: Option<RawDuration>,
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", expecting = "a mapping")]
pub struct RawTimeouts {
    pub request: Option<RawDuration>,
    pub connect: Option<RawDuration>,
    pub idle: Option<RawDuration>,
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", expecting = "a mapping")]
pub struct RawRetries {
    pub attempts: Option<i64>,
    pub retry_on: Option<Vec<RawRetryOn>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub retriable_status_codes: Option<Vec<i64>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub retriable_grpc_codes: Option<Vec<String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub per_try_timeout: Option<RawDuration>,
    pub backoff: Option<RawBackoff>,
    pub retry_non_idempotent: Option<bool>,
    pub budget: Option<RawBudget>,
}

#[derive(Debug, Clone, Copy, Deserialize, Serialize)]
#[serde(
    rename_all = "kebab-case",
    expecting = "one of 5xx, gateway-error, connect-failure, reset"
)]
pub enum RawRetryOn {
    #[serde(rename = "5xx")]
    ServerError,
    GatewayError,
    ConnectFailure,
    Reset,
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", expecting = "a mapping")]
pub struct RawBackoff {
    pub base_interval: Option<RawDuration>,
    pub max_interval: Option<RawDuration>,
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", expecting = "a mapping")]
pub struct RawBudget {
    pub ratio: Option<f64>,
    pub min_retries_per_second: Option<i64>,
    pub window: Option<RawDuration>,
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", expecting = "a mapping")]
pub struct RawCircuitBreaker {
    pub max_connections: Option<i64>,
    pub max_pending_requests: Option<i64>,
    pub max_requests: Option<i64>,
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", expecting = "a mapping")]
pub struct RawOutlierDetection {
    pub consecutive_failures: Option<i64>,
    pub base_ejection_time: Option<RawDuration>,
    pub max_ejection_time: Option<RawDuration>,
    pub max_ejection_percent: Option<i64>,
}

#[derive(Debug, Clone, Copy, Deserialize, Serialize)]
#[serde(
    rename_all = "kebab-case",
    expecting = "p2c-ewma, round-robin or least-request"
)]
pub enum RawLoadBalancer {
    P2cEwma,
    RoundRobin,
    LeastRequest,
}

// === AuthorizationPolicy ===

#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", expecting = "a mapping")]
pub struct RawAuthorizationPolicySpec {
    pub workload: Option<String>,
    pub action: Option<RawAuthzAction>,
    pub rules: Option<Vec<RawRule>>,
}

#[derive(Debug, Clone, Copy, Deserialize, Serialize)]
#[serde(rename_all = "UPPERCASE", expecting = "ALLOW or DENY")]
pub enum RawAuthzAction {
    Allow,
    Deny,
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", expecting = "a mapping")]
pub struct RawRule {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub from: Option<RawFrom>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub to: Option<RawTo>,
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", expecting = "a mapping")]
pub struct RawFrom {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub principals: Option<Vec<String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub namespaces: Option<Vec<String>>,
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", expecting = "a mapping")]
pub struct RawTo {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub methods: Option<Vec<String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub paths: Option<Vec<String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ports: Option<Vec<i64>>,
}

// === From the model, for `to_yaml`: every default written out ===

fn duration(d: Duration) -> RawDuration {
    RawDuration(format_duration(d))
}

fn raw_protocol(protocol: Protocol) -> RawProtocol {
    match protocol {
        Protocol::Http => RawProtocol::Http,
        Protocol::Tcp => RawProtocol::Tcp,
    }
}

/// Empty lists are left out: absent and empty mean the same here.
fn non_empty<T>(items: Vec<T>) -> Option<Vec<T>> {
    (!items.is_empty()).then_some(items)
}

impl From<&MeshSettings> for RawMeshSpec {
    fn from(mesh: &MeshSettings) -> Self {
        Self {
            trust_domain: Some(mesh.trust_domain.clone()),
            authorization: Some(RawMeshAuthorization {
                default_action: Some(match mesh.default_authorization {
                    DefaultAction::Deny => RawDefaultAction::Deny,
                    DefaultAction::Allow => RawDefaultAction::Allow,
                }),
            }),
            tracing: Some(RawTracing {
                sampling_percent: Some(mesh.tracing.sampling_percent),
                otlp_endpoint: mesh.tracing.otlp_endpoint.clone(),
            }),
        }
    }
}

impl From<&Workload> for RawWorkloadSpec {
    fn from(workload: &Workload) -> Self {
        let inbound = workload.inbound.iter().map(|listener| RawInbound {
            name: Some(listener.name.clone()),
            port: Some(listener.port.into()),
            app_port: Some(listener.app_port.into()),
            protocol: Some(raw_protocol(listener.protocol)),
            idle_timeout: Some(duration(listener.idle_timeout)),
            service: listener.service.as_ref().map(|s| s.name.clone()),
        });
        let outbound = workload
            .outbound
            .iter()
            .map(|listener| match &listener.target {
                OutboundTarget::Service(service) => RawOutbound {
                    port: Some(listener.port.into()),
                    service: Some(service.name.clone()),
                    services: None,
                    namespace: Some(service.namespace.clone()),
                },
                OutboundTarget::ByHost(services) => RawOutbound {
                    port: Some(listener.port.into()),
                    service: None,
                    services: Some(services.iter().map(ToString::to_string).collect()),
                    namespace: None,
                },
            });
        Self {
            service_account: Some(workload.service_account.clone()),
            inbound: Some(inbound.collect()),
            outbound: non_empty(outbound.collect()),
        }
    }
}

impl From<&Service> for RawServiceSpec {
    fn from(service: &Service) -> Self {
        let endpoints = service.endpoints.iter().map(|e| RawEndpoint {
            address: Some(e.address.to_string()),
            identity: e.identity.clone(),
        });
        Self {
            identity: service.identity.clone(),
            protocol: Some(raw_protocol(service.protocol)),
            endpoints: non_empty(endpoints.collect()),
        }
    }
}

impl From<&TrafficPolicy> for RawTrafficPolicySpec {
    fn from(policy: &TrafficPolicy) -> Self {
        let timeouts = &policy.timeouts;
        let breaker = &policy.circuit_breaker;
        Self {
            service: Some(policy.service.name.clone()),
            timeouts: Some(RawTimeouts {
                request: Some(match timeouts.request {
                    Some(d) => duration(d),
                    None => RawDuration("none".to_string()),
                }),
                connect: Some(duration(timeouts.connect)),
                idle: Some(duration(timeouts.idle)),
            }),
            retries: policy.retries.as_ref().map(RawRetries::from),
            circuit_breaker: Some(RawCircuitBreaker {
                max_connections: Some(breaker.max_connections.into()),
                max_pending_requests: Some(breaker.max_pending_requests.into()),
                max_requests: Some(breaker.max_requests.into()),
            }),
            outlier_detection: policy
                .outlier_detection
                .as_ref()
                .map(|o| RawOutlierDetection {
                    consecutive_failures: Some(o.consecutive_failures.into()),
                    base_ejection_time: Some(duration(o.base_ejection_time)),
                    max_ejection_time: Some(duration(o.max_ejection_time)),
                    max_ejection_percent: Some(o.max_ejection_percent.into()),
                }),
            load_balancer: Some(match policy.load_balancer {
                LoadBalancer::P2cEwma => RawLoadBalancer::P2cEwma,
                LoadBalancer::RoundRobin => RawLoadBalancer::RoundRobin,
                LoadBalancer::LeastRequest => RawLoadBalancer::LeastRequest,
            }),
            routes: non_empty(
                policy
                    .routes
                    .iter()
                    .map(|route| RawRoute {
                        path_prefix: Some(route.path_prefix.clone()),
                        request_timeout: Some(match route.request {
                            Some(d) => duration(d),
                            None => RawDuration("none".to_string()),
                        }),
                        per_try_timeout: route.per_try.map(duration),
                    })
                    .collect(),
            ),
        }
    }
}

impl From<&RetryPolicy> for RawRetries {
    fn from(retries: &RetryPolicy) -> Self {
        // The model keeps all conditions in one list; the YAML splits them
        // by type.
        let mut retry_on = Vec::new();
        let mut status_codes = Vec::new();
        let mut grpc_codes = Vec::new();
        for condition in &retries.retry_on {
            match condition {
                RetryOn::ServerError => retry_on.push(RawRetryOn::ServerError),
                RetryOn::GatewayError => retry_on.push(RawRetryOn::GatewayError),
                RetryOn::ConnectFailure => retry_on.push(RawRetryOn::ConnectFailure),
                RetryOn::Reset => retry_on.push(RawRetryOn::Reset),
                RetryOn::StatusCode(code) => status_codes.push(i64::from(*code)),
                RetryOn::GrpcStatus(name) => grpc_codes.push(name.clone()),
            }
        }
        let budget = &retries.budget;
        Self {
            attempts: Some(retries.attempts.into()),
            // Always written, even when empty: absent would mean the default.
            retry_on: Some(retry_on),
            retriable_status_codes: non_empty(status_codes),
            retriable_grpc_codes: non_empty(grpc_codes),
            per_try_timeout: retries.per_try_timeout.map(duration),
            backoff: Some(RawBackoff {
                base_interval: Some(duration(retries.backoff_base)),
                max_interval: Some(duration(retries.backoff_max)),
            }),
            retry_non_idempotent: Some(retries.retry_non_idempotent),
            budget: Some(RawBudget {
                ratio: Some(budget.ratio),
                min_retries_per_second: Some(budget.min_retries_per_second.into()),
                window: Some(duration(budget.window)),
            }),
        }
    }
}

impl From<&AuthorizationPolicy> for RawAuthorizationPolicySpec {
    fn from(policy: &AuthorizationPolicy) -> Self {
        Self {
            workload: Some(policy.workload.name.clone()),
            action: Some(match policy.action {
                AuthzAction::Allow => RawAuthzAction::Allow,
                AuthzAction::Deny => RawAuthzAction::Deny,
            }),
            rules: Some(policy.rules.iter().map(RawRule::from).collect()),
        }
    }
}

impl From<&AuthzRule> for RawRule {
    fn from(rule: &AuthzRule) -> Self {
        let principals = rule.principals.iter().map(|p| match p {
            StringMatch::Prefix(prefix) if prefix.is_empty() => "*".to_string(),
            StringMatch::Prefix(prefix) => format!("{prefix}*"),
            StringMatch::Exact(id) => id.clone(),
        });
        let paths = rule.paths.iter().map(|p| match p {
            StringMatch::Prefix(prefix) => format!("{prefix}*"),
            StringMatch::Exact(path) => path.clone(),
        });
        let from = RawFrom {
            principals: non_empty(principals.collect()),
            namespaces: non_empty(rule.namespaces.clone()),
        };
        let to = RawTo {
            methods: non_empty(rule.methods.clone()),
            paths: non_empty(paths.collect()),
            ports: non_empty(rule.ports.iter().map(|&p| i64::from(p)).collect()),
        };
        Self {
            from: (from.principals.is_some() || from.namespaces.is_some()).then_some(from),
            to: (to.methods.is_some() || to.paths.is_some() || to.ports.is_some()).then_some(to),
        }
    }
}
