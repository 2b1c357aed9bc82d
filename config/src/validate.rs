//! From raw documents to the model: defaults, field checks and
//! cross-references.
//!
//! Every check reports into a shared error list and carries on with a
//! placeholder value, so one run finds every problem. The model built
//! alongside is only returned when the list stays empty.

use std::collections::{BTreeSet, HashMap};
use std::net::SocketAddr;
use std::ops::RangeInclusive;
use std::time::Duration;

use crate::duration::parse_duration;
use crate::error::ConfigError;
use crate::load::{Document, Kind, Spec};
use crate::model::*;
use crate::raw::*;

/// Where errors go, and what they are about.
pub(crate) struct Ctx<'a> {
    pub source: &'a str,
    pub document: usize,
    pub resource: Option<String>,
    pub errors: &'a mut Vec<ConfigError>,
}

impl Ctx<'_> {
    pub(crate) fn error(&mut self, field: Option<&str>, reason: impl Into<String>) {
        self.errors.push(ConfigError {
            source: self.source.to_string(),
            document: Some(self.document),
            resource: self.resource.clone(),
            field: field.map(str::to_string),
            reason: reason.into(),
        });
    }

    pub(crate) fn err(&mut self, field: &str, reason: impl Into<String>) {
        self.error(Some(field), reason);
    }

    /// Reports `Err` at `field`; `T::default()` stands in for the value.
    fn check<T: Default>(&mut self, field: &str, result: Result<T, String>) -> T {
        result.unwrap_or_else(|e| {
            self.err(field, e);
            T::default()
        })
    }

    /// A DNS-1123 label; `None` when invalid (the error is reported).
    fn label(&mut self, field: &str, value: &str) -> Option<String> {
        dns_label(value).map_err(|e| self.err(field, e)).ok()?;
        Some(value.to_string())
    }

    /// Like `label`, for a field without a default.
    fn required_label(&mut self, field: &str, value: Option<&String>) -> Option<String> {
        match value {
            Some(value) => self.label(field, value),
            None => {
                self.err(field, "required");
                None
            }
        }
    }

    /// An integer in `range`, or `default` when absent (`None`: required).
    fn int<T: TryFrom<i64> + Default>(
        &mut self,
        field: &str,
        value: Option<i64>,
        default: Option<T>,
        range: RangeInclusive<i64>,
    ) -> T {
        let Some(value) = value else {
            return default.unwrap_or_else(|| {
                self.err(field, "required");
                T::default()
            });
        };
        if !range.contains(&value) {
            // Bounds that are just the type's limit are not worth stating.
            let reason = if *range.end() >= i64::from(u32::MAX) {
                format!("must be at least {}, got {value}", range.start())
            } else {
                format!(
                    "must be between {} and {}, got {value}",
                    range.start(),
                    range.end()
                )
            };
            self.err(field, reason);
        }
        // In range, the conversion cannot fail.
        T::try_from(value).unwrap_or_default()
    }

    /// A positive duration, or `default` when absent; `None` when invalid.
    fn duration(
        &mut self,
        field: &str,
        value: Option<&RawDuration>,
        default: Duration,
    ) -> Option<Duration> {
        match value {
            Some(raw) => positive_duration(&raw.0)
                .map_err(|e| self.err(field, e))
                .ok(),
            None => Some(default),
        }
    }
}

/// An optional list as a slice: absent and empty mean the same.
fn items<T>(list: &Option<Vec<T>>) -> &[T] {
    list.as_deref().unwrap_or_default()
}

fn positive_duration(s: &str) -> Result<Duration, String> {
    let duration = parse_duration(s)?;
    if duration.is_zero() {
        return Err(format!("must be greater than zero, got {s:?}"));
    }
    Ok(duration)
}

/// What each document defines, for reference checks. Includes documents
/// whose spec failed, so one mistake does not cascade.
struct Known(BTreeSet<(Kind, ResourceRef)>);

impl Known {
    /// Checks that `target` exists; the error lists what does exist in
    /// its namespace, which is usually enough to spot the typo.
    fn check(&self, ctx: &mut Ctx<'_>, field: &str, kind: Kind, target: &ResourceRef) {
        if self.0.contains(&(kind, target.clone())) {
            return;
        }
        let existing: Vec<&str> = self
            .0
            .iter()
            .filter(|(k, id)| *k == kind && id.namespace == target.namespace)
            .map(|(_, id)| id.name.as_str())
            .collect();
        let reason = if existing.is_empty() {
            format!(
                "no {kind} {target}; namespace {:?} has no {kind}s",
                target.namespace
            )
        } else {
            format!(
                "no {kind} {target}; {kind}s in namespace {:?}: {}",
                target.namespace,
                existing.join(", ")
            )
        };
        ctx.err(field, reason);
    }
}

pub(crate) fn validate(
    source: &str,
    documents: &[Document],
    errors: &mut Vec<ConfigError>,
) -> MeshConfig {
    let known = Known(documents.iter().map(|d| (d.kind, d.id.clone())).collect());

    // The Mesh first: other documents check SPIFFE IDs against its trust
    // domain. `None` when the Mesh is broken: comparing against a guess
    // would only add noise.
    let mut mesh = MeshSettings::default();
    let mut trust_domain = Some(mesh.trust_domain.clone());
    for document in documents.iter().filter(|d| d.kind == Kind::Mesh) {
        let mut ctx = Ctx {
            source,
            document: document.index,
            resource: Some(document.resource()),
            errors,
        };
        trust_domain = match &document.spec {
            Some(Spec::Mesh(spec)) => {
                mesh = validate_mesh(&mut ctx, &document.id.name, spec);
                let valid = spec
                    .trust_domain
                    .as_deref()
                    .is_none_or(|td| self::trust_domain(td).is_ok());
                valid.then(|| mesh.trust_domain.clone())
            }
            _ => None,
        };
    }
    let trust_domain = trust_domain.as_deref();

    let mut config = MeshConfig {
        mesh,
        workloads: Vec::new(),
        services: Vec::new(),
        traffic_policies: Vec::new(),
        authorization_policies: Vec::new(),
    };
    // Service -> (policy, document) of the first TrafficPolicy naming it.
    let mut policy_for_service: HashMap<ResourceRef, (ResourceRef, usize)> = HashMap::new();

    for document in documents {
        let mut ctx = Ctx {
            source,
            document: document.index,
            resource: Some(document.resource()),
            errors,
        };
        let id = &document.id;
        match &document.spec {
            None | Some(Spec::Mesh(_)) => {}
            Some(Spec::Workload(spec)) => {
                let workload = validate_workload(&mut ctx, id, spec, &known);
                config.workloads.push(workload);
            }
            Some(Spec::Service(spec)) => {
                let service = validate_service(&mut ctx, id, spec, trust_domain);
                config.services.push(service);
            }
            Some(Spec::TrafficPolicy(spec)) => {
                let policy =
                    validate_traffic_policy(&mut ctx, id, spec, &known, &mut policy_for_service);
                config.traffic_policies.push(policy);
            }
            Some(Spec::AuthorizationPolicy(spec)) => {
                let policy =
                    validate_authorization_policy(&mut ctx, id, spec, &known, trust_domain);
                config.authorization_policies.push(policy);
            }
        }
    }

    check_served_protocols(source, documents, &config, errors);
    config.workloads.sort_by(|a, b| a.id.cmp(&b.id));
    config.services.sort_by(|a, b| a.id.cmp(&b.id));
    config.traffic_policies.sort_by(|a, b| a.id.cmp(&b.id));
    config
        .authorization_policies
        .sort_by(|a, b| a.id.cmp(&b.id));
    config
}

/// An inbound listener serves its Service's clients, so it must speak the
/// Service's protocol; a Host-routed outbound listener reaches HTTP
/// Services only. Checked once every Service is known.
fn check_served_protocols(
    source: &str,
    documents: &[Document],
    config: &MeshConfig,
    errors: &mut Vec<ConfigError>,
) {
    let workload_documents: HashMap<&ResourceRef, &Document> = documents
        .iter()
        .filter(|d| d.kind == Kind::Workload)
        .map(|d| (&d.id, d))
        .collect();
    let services: HashMap<&ResourceRef, &Service> =
        config.services.iter().map(|s| (&s.id, s)).collect();
    for workload in &config.workloads {
        let Some(document) = workload_documents.get(&workload.id) else {
            continue;
        };
        let mut ctx = Ctx {
            source,
            document: document.index,
            resource: Some(document.resource()),
            errors,
        };
        for (i, listener) in workload.outbound.iter().enumerate() {
            let OutboundTarget::ByHost(targets) = &listener.target else {
                continue;
            };
            for (j, target) in targets.iter().enumerate() {
                if let Some(service) = services.get(target)
                    && service.protocol != Protocol::Http
                {
                    ctx.err(
                        &format!("spec.outbound[{i}].services[{j}]"),
                        format!(
                            "Service {target} speaks {}; a port shared by several Services routes on the Host header, so it carries HTTP only (give {target} a port of its own with service: {})",
                            service.protocol, target.name
                        ),
                    );
                }
            }
        }
        for (i, listener) in workload.inbound.iter().enumerate() {
            let Some(served) = &listener.service else {
                continue;
            };
            let Some(service) = services.get(served) else {
                continue;
            };
            if service.protocol != listener.protocol {
                ctx.err(
                    &format!("spec.inbound[{i}].service"),
                    format!(
                        "Service {served} speaks {}, but this listener's protocol is {}",
                        service.protocol, listener.protocol
                    ),
                );
            }
        }
    }
}

fn validate_mesh(ctx: &mut Ctx<'_>, name: &str, spec: &RawMeshSpec) -> MeshSettings {
    let defaults = MeshSettings::default();
    let trust_domain = match &spec.trust_domain {
        Some(td) => ctx.check("spec.trustDomain", trust_domain(td).map(|()| td.clone())),
        None => defaults.trust_domain,
    };
    let default_authorization = match spec.authorization.as_ref().and_then(|a| a.default_action) {
        Some(RawDefaultAction::Deny) => DefaultAction::Deny,
        Some(RawDefaultAction::Allow) => DefaultAction::Allow,
        None => defaults.default_authorization,
    };
    let tracing = spec.tracing.as_ref();
    let sampling_percent = match tracing.and_then(|t| t.sampling_percent) {
        Some(p) if (0.0..=100.0).contains(&p) => p,
        Some(p) => {
            ctx.err(
                "spec.tracing.samplingPercent",
                format!("must be between 0 and 100, got {p}"),
            );
            0.0
        }
        None => defaults.tracing.sampling_percent,
    };
    let otlp_endpoint = tracing.and_then(|t| t.otlp_endpoint.as_ref()).map(|e| {
        ctx.check(
            "spec.tracing.otlpEndpoint",
            otlp_endpoint(e).map(|()| e.clone()),
        )
    });
    MeshSettings {
        name: name.to_string(),
        trust_domain,
        default_authorization,
        tracing: TracingSettings {
            sampling_percent,
            otlp_endpoint,
        },
    }
}

fn protocol(raw: Option<RawProtocol>) -> Protocol {
    match raw {
        Some(RawProtocol::Http) | None => Protocol::Http,
        Some(RawProtocol::Tcp) => Protocol::Tcp,
    }
}

fn validate_workload(
    ctx: &mut Ctx<'_>,
    id: &ResourceRef,
    spec: &RawWorkloadSpec,
    known: &Known,
) -> Workload {
    let service_account = match &spec.service_account {
        Some(sa) => ctx.label("spec.serviceAccount", sa).unwrap_or_default(),
        None => id.name.clone(),
    };
    // Non-zero port -> the field that claimed it first. Returns false
    // (after reporting it) when the port is taken.
    let mut ports: HashMap<u16, String> = HashMap::new();
    let mut claim = |ctx: &mut Ctx<'_>, field: String, port: u16| {
        if port == 0 {
            return true;
        }
        if let Some(first) = ports.get(&port) {
            ctx.err(&field, format!("port {port} is already used by {first}"));
            return false;
        }
        ports.insert(port, field);
        true
    };

    let raw_inbound = items(&spec.inbound);
    if raw_inbound.is_empty() {
        ctx.err(
            "spec.inbound",
            "a Workload needs at least one inbound listener",
        );
    }
    let mut names: HashMap<String, usize> = HashMap::new();
    let mut inbound = Vec::new();
    for (i, raw) in raw_inbound.iter().enumerate() {
        let field = format!("spec.inbound[{i}]");
        let port: u16 = ctx.int(&format!("{field}.port"), raw.port, None, 0..=65535);
        let port_free = claim(ctx, format!("{field}.port"), port);
        // `None` when already reported: an invalid name, or a taken port
        // (whose default name would clash too).
        let name = match &raw.name {
            Some(name) => ctx.label(&format!("{field}.name"), name),
            None => port_free.then(|| format!("port-{port}")),
        };
        if let Some(name) = &name {
            if let Some(first) = names.get(name) {
                ctx.err(
                    &format!("{field}.name"),
                    format!("duplicate listener name {name:?}: also used by spec.inbound[{first}]"),
                );
            } else {
                names.insert(name.clone(), i);
            }
        }
        let service = raw.service.as_ref().and_then(|name| {
            let field = format!("{field}.service");
            let service = ResourceRef::new(id.namespace.clone(), ctx.label(&field, name)?);
            known.check(ctx, &field, Kind::Service, &service);
            Some(service)
        });
        inbound.push(InboundListener {
            service,
            name: name.unwrap_or_default(),
            port,
            app_port: ctx.int(&format!("{field}.appPort"), raw.app_port, None, 1..=65535),
            protocol: protocol(raw.protocol),
            idle_timeout: ctx
                .duration(
                    &format!("{field}.idleTimeout"),
                    raw.idle_timeout.as_ref(),
                    Duration::from_secs(3600),
                )
                .unwrap_or_default(),
        });
    }

    let mut outbound = Vec::new();
    for (i, raw) in items(&spec.outbound).iter().enumerate() {
        let field = format!("spec.outbound[{i}]");
        let port: u16 = ctx.int(&format!("{field}.port"), raw.port, None, 0..=65535);
        claim(ctx, format!("{field}.port"), port);
        let namespace = match &raw.namespace {
            Some(ns) => ctx.label(&format!("{field}.namespace"), ns),
            None => Some(id.namespace.clone()),
        };
        let target = match (&raw.service, &raw.services) {
            (Some(_), Some(_)) => {
                ctx.err(
                    &format!("{field}.services"),
                    "give either service (every request on this port goes there) or services (several Services on one port, chosen by the Host header), not both",
                );
                OutboundTarget::ByHost(Vec::new())
            }
            (None, None) => {
                ctx.err(
                    &format!("{field}.service"),
                    "required: service (every request on this port goes there) or services (several Services on one port, chosen by the Host header)",
                );
                OutboundTarget::ByHost(Vec::new())
            }
            (Some(name), None) => {
                let field = format!("{field}.service");
                let name = ctx.label(&field, name);
                let service = match (namespace, name) {
                    (Some(namespace), Some(name)) => {
                        let service = ResourceRef::new(namespace, name);
                        known.check(ctx, &field, Kind::Service, &service);
                        service
                    }
                    _ => ResourceRef::new("", ""),
                };
                OutboundTarget::Service(service)
            }
            (None, Some(names)) => OutboundTarget::ByHost(host_routed_services(
                ctx,
                &format!("{field}.services"),
                names,
                namespace.as_deref(),
                known,
            )),
        };
        outbound.push(OutboundListener { port, target });
    }

    Workload {
        id: id.clone(),
        service_account,
        inbound,
        outbound,
    }
}

/// The `services` of a Host-routed outbound listener: each `NAME` (in
/// `namespace`) or `NAMESPACE/NAME`, existing, listed once.
fn host_routed_services(
    ctx: &mut Ctx<'_>,
    field: &str,
    names: &[String],
    namespace: Option<&str>,
    known: &Known,
) -> Vec<ResourceRef> {
    if names.is_empty() {
        ctx.err(
            field,
            "an empty list lets the app reach nothing on this port: name at least one Service, or remove the listener",
        );
    }
    let mut seen: HashMap<ResourceRef, usize> = HashMap::new();
    let mut services = Vec::new();
    for (j, entry) in names.iter().enumerate() {
        let field = format!("{field}[{j}]");
        let parsed = match entry.split_once('/') {
            Some((ns, name)) => ctx
                .label(&field, ns)
                .zip(ctx.label(&field, name))
                .map(|(ns, name)| ResourceRef::new(ns, name)),
            None => ctx
                .label(&field, entry)
                .zip(namespace)
                .map(|(name, ns)| ResourceRef::new(ns, name)),
        };
        let Some(service) = parsed else {
            continue;
        };
        if let Some(first) = seen.get(&service) {
            ctx.err(
                &field,
                format!("Service {service} is already listed at [{first}]"),
            );
            continue;
        }
        known.check(ctx, &field, Kind::Service, &service);
        seen.insert(service.clone(), j);
        services.push(service);
    }
    services
}

fn validate_service(
    ctx: &mut Ctx<'_>,
    id: &ResourceRef,
    spec: &RawServiceSpec,
    trust_domain: Option<&str>,
) -> Service {
    let identity = spec.identity.as_ref().map(|identity| {
        let checked = spiffe_id(identity, trust_domain).map(|()| identity.clone());
        ctx.check("spec.identity", checked)
    });
    let mut endpoints: Vec<Endpoint> = Vec::new();
    // Address -> index of its first appearance; a map, since services
    // can list thousands of endpoints.
    let mut seen: HashMap<SocketAddr, usize> = HashMap::new();
    for (i, raw) in items(&spec.endpoints).iter().enumerate() {
        let field = format!("spec.endpoints[{i}].address");
        let Some(address) = &raw.address else {
            ctx.err(&field, "required");
            continue;
        };
        let Ok(address) = socket_address(address).map_err(|e| ctx.err(&field, e)) else {
            continue;
        };
        if let Some(first) = seen.get(&address) {
            ctx.err(
                &field,
                format!("duplicate endpoint {address}: also at spec.endpoints[{first}]"),
            );
        } else {
            seen.insert(address, i);
        }
        let identity = raw.identity.as_ref().map(|identity| {
            let checked = spiffe_id(identity, trust_domain).map(|()| identity.clone());
            ctx.check(&format!("spec.endpoints[{i}].identity"), checked)
        });
        endpoints.push(Endpoint { address, identity });
    }
    Service {
        id: id.clone(),
        identity,
        protocol: protocol(spec.protocol),
        endpoints,
    }
}

fn validate_traffic_policy(
    ctx: &mut Ctx<'_>,
    id: &ResourceRef,
    spec: &RawTrafficPolicySpec,
    known: &Known,
    policy_for_service: &mut HashMap<ResourceRef, (ResourceRef, usize)>,
) -> TrafficPolicy {
    let service = match ctx.required_label("spec.service", spec.service.as_ref()) {
        None => ResourceRef::new("", ""),
        Some(name) => {
            let service = ResourceRef::new(id.namespace.as_str(), name);
            known.check(ctx, "spec.service", Kind::Service, &service);
            if let Some((other, index)) = policy_for_service.get(&service) {
                ctx.err(
                    "spec.service",
                    format!(
                        "Service {service} already has TrafficPolicy {other} (document {index}); \
                         at most one TrafficPolicy per Service"
                    ),
                );
            } else {
                policy_for_service.insert(service.clone(), (id.clone(), ctx.document));
            }
            service
        }
    };

    let defaults = Timeouts::default();
    let timeouts = match &spec.timeouts {
        None => defaults,
        Some(raw) => Timeouts {
            request: match raw.request.as_ref().map(|r| r.0.as_str()) {
                None => defaults.request,
                Some("none" | "off") => None,
                Some(s) => {
                    // Any zero duration disables it too: "0s" reads as "no time limit".
                    let d = ctx.check("spec.timeouts.request", parse_duration(s));
                    (!d.is_zero()).then_some(d)
                }
            },
            connect: ctx
                .duration(
                    "spec.timeouts.connect",
                    raw.connect.as_ref(),
                    defaults.connect,
                )
                .unwrap_or_default(),
            idle: ctx
                .duration("spec.timeouts.idle", raw.idle.as_ref(), defaults.idle)
                .unwrap_or_default(),
        },
    };

    let retries = spec.retries.as_ref().map(|raw| validate_retries(ctx, raw));

    let defaults = CircuitBreaker::default();
    let circuit_breaker = match &spec.circuit_breaker {
        None => defaults,
        Some(raw) => {
            let mut limit = |name: &str, value: Option<i64>, default: u32| -> u32 {
                let field = format!("spec.circuitBreaker.{name}");
                ctx.int(&field, value, Some(default), 1..=i64::from(u32::MAX))
            };
            CircuitBreaker {
                max_connections: limit(
                    "maxConnections",
                    raw.max_connections,
                    defaults.max_connections,
                ),
                max_pending_requests: limit(
                    "maxPendingRequests",
                    raw.max_pending_requests,
                    defaults.max_pending_requests,
                ),
                max_requests: limit("maxRequests", raw.max_requests, defaults.max_requests),
            }
        }
    };

    let outlier_detection = spec.outlier_detection.as_ref().map(|raw| {
        let field = "spec.outlierDetection";
        let base_ejection_time = ctx.duration(
            &format!("{field}.baseEjectionTime"),
            raw.base_ejection_time.as_ref(),
            Duration::from_secs(30),
        );
        let max_ejection_time = ctx.duration(
            &format!("{field}.maxEjectionTime"),
            raw.max_ejection_time.as_ref(),
            Duration::from_secs(300),
        );
        ensure_at_least(
            ctx,
            &format!("{field}.maxEjectionTime"),
            "baseEjectionTime",
            base_ejection_time,
            max_ejection_time,
        );
        OutlierDetection {
            consecutive_failures: ctx.int(
                &format!("{field}.consecutiveFailures"),
                raw.consecutive_failures,
                Some(5),
                1..=i64::from(u32::MAX),
            ),
            base_ejection_time: base_ejection_time.unwrap_or_default(),
            max_ejection_time: max_ejection_time.unwrap_or_default(),
            max_ejection_percent: ctx.int(
                &format!("{field}.maxEjectionPercent"),
                raw.max_ejection_percent,
                Some(50),
                0..=100,
            ),
        }
    });

    let load_balancer = match spec.load_balancer {
        Some(RawLoadBalancer::P2cEwma) | None => LoadBalancer::P2cEwma,
        Some(RawLoadBalancer::RoundRobin) => LoadBalancer::RoundRobin,
        Some(RawLoadBalancer::LeastRequest) => LoadBalancer::LeastRequest,
    };

    let routes = validate_routes(ctx, spec, &timeouts, retries.as_ref());

    TrafficPolicy {
        id: id.clone(),
        service,
        timeouts,
        retries,
        circuit_breaker,
        outlier_detection,
        load_balancer,
        routes,
    }
}

/// `spec.routes`: per path prefix, a request timeout and/or a per-try
/// timeout; what a route leaves out comes from the policy. Sorted longest
/// prefix first, so the first match is the most specific.
fn validate_routes(
    ctx: &mut Ctx<'_>,
    spec: &RawTrafficPolicySpec,
    timeouts: &Timeouts,
    retries: Option<&RetryPolicy>,
) -> Vec<RouteTimeouts> {
    let mut routes: Vec<RouteTimeouts> = Vec::new();
    let mut seen: HashMap<String, usize> = HashMap::new();
    for (i, raw) in items(&spec.routes).iter().enumerate() {
        let field = format!("spec.routes[{i}]");
        let Some(prefix) = &raw.path_prefix else {
            ctx.err(&format!("{field}.pathPrefix"), "required");
            continue;
        };
        if !prefix.starts_with('/') {
            ctx.err(
                &format!("{field}.pathPrefix"),
                format!("must start with '/', got {prefix:?}"),
            );
            continue;
        }
        if let Some(first) = seen.get(prefix) {
            ctx.err(
                &format!("{field}.pathPrefix"),
                format!("duplicate prefix {prefix:?}: also at spec.routes[{first}]"),
            );
            continue;
        }
        seen.insert(prefix.clone(), i);
        if raw.request_timeout.is_none() && raw.per_try_timeout.is_none() {
            ctx.err(
                &field,
                "sets nothing: give requestTimeout, perTryTimeout or both",
            );
        }
        let request = match raw.request_timeout.as_ref().map(|r| r.0.as_str()) {
            None => timeouts.request,
            Some("none" | "off") => None,
            Some(s) => {
                let d = ctx.check(&format!("{field}.requestTimeout"), parse_duration(s));
                (!d.is_zero()).then_some(d)
            }
        };
        let per_try = match &raw.per_try_timeout {
            None => retries.and_then(|r| r.per_try_timeout),
            Some(_) if retries.is_none() => {
                ctx.err(
                    &format!("{field}.perTryTimeout"),
                    "a per-try timeout needs spec.retries (without retries there is one try, bounded by requestTimeout)",
                );
                None
            }
            Some(t) => Some(ctx.check(&format!("{field}.perTryTimeout"), positive_duration(&t.0))),
        };
        routes.push(RouteTimeouts {
            path_prefix: prefix.clone(),
            request,
            per_try,
        });
    }
    routes.sort_by_key(|r| std::cmp::Reverse(r.path_prefix.len()));
    routes
}

fn validate_retries(ctx: &mut Ctx<'_>, raw: &RawRetries) -> RetryPolicy {
    let field = "spec.retries";
    let attempts = ctx.int(&format!("{field}.attempts"), raw.attempts, None, 1..=10);

    let mut retry_on: Vec<RetryOn> = match &raw.retry_on {
        None => vec![RetryOn::GatewayError, RetryOn::ConnectFailure],
        Some(conditions) => conditions
            .iter()
            .map(|c| match c {
                RawRetryOn::ServerError => RetryOn::ServerError,
                RawRetryOn::GatewayError => RetryOn::GatewayError,
                RawRetryOn::ConnectFailure => RetryOn::ConnectFailure,
                RawRetryOn::Reset => RetryOn::Reset,
            })
            .collect(),
    };
    for (i, &code) in items(&raw.retriable_status_codes).iter().enumerate() {
        let code = ctx.int(
            &format!("{field}.retriableStatusCodes[{i}]"),
            Some(code),
            None,
            100..=599,
        );
        retry_on.push(RetryOn::StatusCode(code));
    }
    for (i, code) in items(&raw.retriable_grpc_codes).iter().enumerate() {
        if !GRPC_CODES.contains(&code.as_str()) {
            ctx.err(
                &format!("{field}.retriableGrpcCodes[{i}]"),
                format!(
                    "unknown gRPC status code {code:?}: expected one of {}",
                    GRPC_CODES.join(", ")
                ),
            );
        }
        retry_on.push(RetryOn::GrpcStatus(code.clone()));
    }

    let per_try_timeout = raw
        .per_try_timeout
        .as_ref()
        .map(|t| ctx.check(&format!("{field}.perTryTimeout"), positive_duration(&t.0)));

    let backoff = raw.backoff.as_ref();
    let backoff_base = ctx.duration(
        &format!("{field}.backoff.baseInterval"),
        backoff.and_then(|b| b.base_interval.as_ref()),
        Duration::from_millis(25),
    );
    let backoff_max = ctx.duration(
        &format!("{field}.backoff.maxInterval"),
        backoff.and_then(|b| b.max_interval.as_ref()),
        Duration::from_millis(250),
    );
    ensure_at_least(
        ctx,
        &format!("{field}.backoff.maxInterval"),
        "baseInterval",
        backoff_base,
        backoff_max,
    );

    let defaults = RetryBudget::default();
    let budget = match &raw.budget {
        None => defaults,
        Some(budget) => RetryBudget {
            ratio: match budget.ratio {
                Some(r) if (0.0..=1.0).contains(&r) => r,
                Some(r) => {
                    ctx.err(
                        &format!("{field}.budget.ratio"),
                        format!("must be between 0 and 1, got {r}"),
                    );
                    0.0
                }
                None => defaults.ratio,
            },
            min_retries_per_second: ctx.int(
                &format!("{field}.budget.minRetriesPerSecond"),
                budget.min_retries_per_second,
                Some(defaults.min_retries_per_second),
                0..=i64::from(u32::MAX),
            ),
            window: match &budget.window {
                None => defaults.window,
                Some(w) => {
                    let window = parse_duration(&w.0).and_then(|window| {
                        if (Duration::from_secs(1)..=Duration::from_secs(60)).contains(&window) {
                            Ok(window)
                        } else {
                            Err(format!("must be between 1s and 60s, got {:?}", w.0))
                        }
                    });
                    ctx.check(&format!("{field}.budget.window"), window)
                }
            },
        },
    };

    RetryPolicy {
        attempts,
        retry_on,
        per_try_timeout,
        backoff_base: backoff_base.unwrap_or_default(),
        backoff_max: backoff_max.unwrap_or_default(),
        retry_non_idempotent: raw.retry_non_idempotent.unwrap_or(false),
        budget,
    }
}

/// Reports `field` when its `value` is below the `lower` bound set by
/// another field. `None` (already reported as invalid) checks nothing.
fn ensure_at_least(
    ctx: &mut Ctx<'_>,
    field: &str,
    lower_name: &str,
    lower: Option<Duration>,
    value: Option<Duration>,
) {
    match (lower, value) {
        (Some(lower), Some(value)) if value < lower => ctx.err(
            field,
            format!(
                "must be at least {lower_name} ({}), got {}",
                format_duration(lower),
                format_duration(value)
            ),
        ),
        _ => {}
    }
}

fn validate_authorization_policy(
    ctx: &mut Ctx<'_>,
    id: &ResourceRef,
    spec: &RawAuthorizationPolicySpec,
    known: &Known,
    trust_domain: Option<&str>,
) -> AuthorizationPolicy {
    let workload = match ctx.required_label("spec.workload", spec.workload.as_ref()) {
        None => ResourceRef::new("", ""),
        Some(name) => {
            let workload = ResourceRef::new(id.namespace.as_str(), name);
            known.check(ctx, "spec.workload", Kind::Workload, &workload);
            workload
        }
    };

    let action = match spec.action {
        Some(RawAuthzAction::Allow) => AuthzAction::Allow,
        Some(RawAuthzAction::Deny) => AuthzAction::Deny,
        None => {
            ctx.err("spec.action", "required: ALLOW or DENY");
            AuthzAction::Deny
        }
    };

    let raw_rules = items(&spec.rules);
    if raw_rules.is_empty() {
        ctx.err(
            "spec.rules",
            "an AuthorizationPolicy needs at least one rule",
        );
    }
    let rules = raw_rules
        .iter()
        .enumerate()
        .map(|(i, raw)| validate_rule(ctx, &format!("spec.rules[{i}]"), raw, trust_domain))
        .collect();

    AuthorizationPolicy {
        id: id.clone(),
        workload,
        action,
        rules,
    }
}

fn validate_rule(
    ctx: &mut Ctx<'_>,
    field: &str,
    raw: &RawRule,
    trust_domain: Option<&str>,
) -> AuthzRule {
    let from = raw.from.as_ref();
    let to = raw.to.as_ref();
    let principals = from.and_then(|f| f.principals.as_ref());
    let namespaces = from.and_then(|f| f.namespaces.as_ref());
    let methods = to.and_then(|t| t.methods.as_ref());
    let paths = to.and_then(|t| t.paths.as_ref());
    let ports = to.and_then(|t| t.ports.as_ref());

    // An empty rule would match every request: too easy to write by
    // accident for something that opens (or closes) everything.
    let lengths = [
        principals.map(Vec::len),
        namespaces.map(Vec::len),
        methods.map(Vec::len),
    ];
    let lengths = lengths
        .into_iter()
        .chain([paths.map(Vec::len), ports.map(Vec::len)]);
    if lengths.flatten().all(|n| n == 0) {
        ctx.err(
            field,
            "a rule must match something; to allow everything, use principals: ['*']",
        );
    }

    AuthzRule {
        principals: each(ctx, &format!("{field}.from.principals"), principals, |p| {
            principal(p, trust_domain)
        }),
        namespaces: each(ctx, &format!("{field}.from.namespaces"), namespaces, |ns| {
            dns_label(ns).map(|()| ns.to_string())
        }),
        methods: each(ctx, &format!("{field}.to.methods"), methods, |m| {
            http_method(m).map(|()| m.to_string())
        }),
        paths: each(ctx, &format!("{field}.to.paths"), paths, path_match),
        ports: ports
            .map_or(&[][..], Vec::as_slice)
            .iter()
            .enumerate()
            .map(|(i, &port)| {
                ctx.int(
                    &format!("{field}.to.ports[{i}]"),
                    Some(port),
                    None,
                    1..=65535,
                )
            })
            .collect(),
    }
}

/// Checks each item of an optional list, reporting failures as `field[i]`.
fn each<T>(
    ctx: &mut Ctx<'_>,
    field: &str,
    list: Option<&Vec<String>>,
    check: impl Fn(&str) -> Result<T, String>,
) -> Vec<T> {
    list.map_or(&[][..], Vec::as_slice)
        .iter()
        .enumerate()
        .filter_map(|(i, item)| {
            check(item)
                .map_err(|e| ctx.err(&format!("{field}[{i}]"), e))
                .ok()
        })
        .collect()
}

// === Field checks, each returning the reason on failure ===

/// A workload as sidecars name it on their command line and to the control
/// plane: `NAME` (in the default namespace) or `NAMESPACE/NAME`, each a
/// DNS-1123 label.
pub fn parse_workload_ref(s: &str) -> Result<ResourceRef, String> {
    let (namespace, name) = match s.split_once('/') {
        Some((namespace, name)) => (namespace, name),
        None => (DEFAULT_NAMESPACE, s),
    };
    if name.contains('/') {
        return Err(format!("{s:?} is not NAME or NAMESPACE/NAME"));
    }
    dns_label(namespace).map_err(|e| format!("namespace: {e}"))?;
    dns_label(name).map_err(|e| format!("name: {e}"))?;
    Ok(ResourceRef::new(namespace, name))
}

/// A Kubernetes-style DNS-1123 label: names, namespaces, service accounts.
pub(crate) fn dns_label(s: &str) -> Result<(), String> {
    let problem = if s.is_empty() {
        "must not be empty".to_string()
    } else if s.len() > 63 {
        format!("must be at most 63 characters, has {}", s.len())
    } else if s.chars().any(|c| c.is_ascii_uppercase()) {
        format!("must be lowercase: {:?}", s.to_ascii_lowercase())
    } else if let Some(c) = s
        .chars()
        .find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '-'))
    {
        format!("may contain only lowercase letters, digits and '-', found {c:?}")
    } else if s.starts_with('-') || s.ends_with('-') {
        "must start and end with a letter or digit".to_string()
    } else {
        return Ok(());
    };
    Err(format!("not a DNS-1123 label {s:?}: {problem}"))
}

/// A trust domain as SPIFFE IDs carry it, like `cluster.local`.
pub(crate) fn trust_domain(s: &str) -> Result<(), String> {
    if s.contains("://") || s.contains('/') {
        return Err(format!(
            "not a trust domain {s:?}: give the bare domain, without scheme or path, like cluster.local"
        ));
    }
    let valid_chars = s
        .chars()
        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.');
    if s.is_empty() || !valid_chars || s.split('.').any(str::is_empty) {
        return Err(format!(
            "not a trust domain {s:?}: use lowercase letters, digits, '-' and '.', like cluster.local"
        ));
    }
    Ok(())
}

/// `spiffe://<trust-domain>/<path>`; the trust domain must be the mesh's
/// when it is known.
pub(crate) fn spiffe_id(s: &str, mesh_trust_domain: Option<&str>) -> Result<(), String> {
    let invalid = |why: String| Err(format!("not a SPIFFE ID {s:?}: {why}"));
    let Some(rest) = s.strip_prefix("spiffe://") else {
        return invalid(
            "expected spiffe://<trust-domain>/<path>, like spiffe://cluster.local/ns/shop/sa/api"
                .into(),
        );
    };
    if s.contains(['?', '#']) {
        return invalid("a query or fragment is not allowed".into());
    }
    let (domain, path) = rest.split_once('/').unwrap_or((rest, ""));
    if let Err(e) = trust_domain(domain) {
        return invalid(e);
    }
    if path.is_empty() {
        return invalid("the path after the trust domain must not be empty".into());
    }
    if path.ends_with('/') {
        return invalid("must not end with '/'".into());
    }
    for segment in path.split('/') {
        if segment.is_empty() {
            return invalid("empty path segment ('//')".into());
        }
        if segment == "." || segment == ".." {
            return invalid("path segments '.' and '..' are not allowed".into());
        }
        if segment.contains('*') {
            return invalid(
                "'*' is only allowed at the end of a principal, to match a prefix".into(),
            );
        }
        let valid = segment
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_'));
        if !valid {
            return invalid(format!(
                "path segment {segment:?} may contain only letters, digits, '.', '-' and '_'"
            ));
        }
    }
    match mesh_trust_domain {
        Some(mesh) if domain != mesh => Err(format!(
            "trust domain {domain:?} of {s:?} differs from the mesh trustDomain {mesh:?}"
        )),
        _ => Ok(()),
    }
}

/// An exact SPIFFE ID, a prefix ending in `*`, or `*` for anyone.
fn principal(s: &str, mesh_trust_domain: Option<&str>) -> Result<StringMatch, String> {
    if s == "*" {
        return Ok(StringMatch::Prefix(String::new()));
    }
    let Some(prefix) = s.strip_suffix('*') else {
        return spiffe_id(s, mesh_trust_domain).map(|()| StringMatch::Exact(s.to_string()));
    };
    if prefix.contains('*') {
        return Err(format!(
            "principal {s:?}: '*' is only allowed at the end, to match a prefix"
        ));
    }
    let expected = match mesh_trust_domain {
        Some(td) => format!("spiffe://{td}/"),
        None => "spiffe://".to_string(),
    };
    if !prefix.starts_with(&expected) {
        return Err(format!(
            "principal prefix {s:?} must start with {expected:?}, like \"{expected}ns/shop/*\""
        ));
    }
    Ok(StringMatch::Prefix(prefix.to_string()))
}

/// HTTP methods are case-sensitive tokens (RFC 9110, section 9.1).
fn http_method(s: &str) -> Result<(), String> {
    let is_tchar = |c: char| c.is_ascii_alphanumeric() || "!#$%&'*+-.^_`|~".contains(c);
    if s.is_empty() || !s.chars().all(is_tchar) {
        return Err(format!(
            "not an HTTP method {s:?}: expected a token like GET or POST"
        ));
    }
    if s.chars().any(|c| c.is_ascii_lowercase()) {
        return Err(format!(
            "HTTP methods are case-sensitive and uppercase: write {:?}, not {s:?}",
            s.to_ascii_uppercase()
        ));
    }
    Ok(())
}

/// An exact path, or a prefix written with a trailing `*`.
fn path_match(s: &str) -> Result<StringMatch, String> {
    if !s.starts_with('/') {
        return Err(format!("path {s:?} must start with '/'"));
    }
    let (path, is_prefix) = match s.strip_suffix('*') {
        Some(prefix) => (prefix, true),
        None => (s, false),
    };
    if path.contains('*') {
        return Err(format!(
            "path {s:?}: '*' is only allowed at the end, to match a prefix"
        ));
    }
    Ok(if is_prefix {
        StringMatch::Prefix(path.to_string())
    } else {
        StringMatch::Exact(path.to_string())
    })
}

fn socket_address(s: &str) -> Result<SocketAddr, String> {
    let Ok(address) = s.parse::<SocketAddr>() else {
        let ipv6_hint = if s.matches(':').count() > 1 {
            " (IPv6 as [::1]:4143)"
        } else {
            ""
        };
        return Err(format!(
            "not a socket address {s:?}: expected IP:PORT like 10.0.0.7:4143{ipv6_hint}"
        ));
    };
    if address.port() == 0 {
        return Err(format!("port must not be 0 in {s:?}"));
    }
    Ok(address)
}

/// An OTLP collector URL: `http(s)://host[:port][/...]`.
fn otlp_endpoint(s: &str) -> Result<(), String> {
    let rest = s
        .strip_prefix("http://")
        .or_else(|| s.strip_prefix("https://"));
    let Some(rest) = rest else {
        return Err(format!(
            "not an OTLP endpoint {s:?}: expected a URL starting with http:// or https://, like http://127.0.0.1:4317"
        ));
    };
    if s.contains(char::is_whitespace) {
        return Err(format!(
            "not an OTLP endpoint {s:?}: must not contain spaces"
        ));
    }
    let authority = rest.split('/').next().unwrap_or_default();
    if authority.is_empty() || authority.starts_with(':') {
        return Err(format!(
            "not an OTLP endpoint {s:?}: no host; expected something like http://127.0.0.1:4317"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod workload_ref_tests {
    use super::parse_workload_ref;

    #[test]
    fn workload_refs_are_name_or_namespace_slash_name() {
        let web = parse_workload_ref("web").map(|r| r.to_string());
        assert_eq!(web.as_deref(), Ok("default/web"));
        let web = parse_workload_ref("shop/web").map(|r| r.to_string());
        assert_eq!(web.as_deref(), Ok("shop/web"));
        for bad in ["", "/web", "shop/", "a/b/c", "Web", "shop/we_b"] {
            assert!(parse_workload_ref(bad).is_err(), "{bad:?}");
        }
    }
}
