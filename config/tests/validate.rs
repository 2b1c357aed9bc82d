//! One test per field check: the exact field path and the gist of the
//! reason. Each document goes after the base documents (Service shop/api,
//! Workload shop/api), so it is document 3, resource `<Kind> shop/subject`.

#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::*;
use outrigger_config::*;

fn mesh(spec: &str) -> String {
    format!(
        "apiVersion: outrigger.io/v1alpha1\nkind: Mesh\nmetadata: {{name: mesh}}\nspec: {spec}\n"
    )
}

fn mesh_error(spec: &str, field: &str, phrase: &str) {
    let error = assert_error(&mesh(spec), field, phrase);
    assert_eq!(error.resource.as_deref(), Some("Mesh mesh"));
}

// === Mesh ===

#[test]
fn mesh_fields() {
    let config = ok(&mesh(
        "{trustDomain: prod.example.com, authorization: {defaultAction: allow}, \
         tracing: {samplingPercent: 100, otlpEndpoint: 'https://otel.example.com:4317'}}",
    ));
    assert_eq!(config.mesh.trust_domain, "prod.example.com");
    assert_eq!(config.mesh.default_authorization, DefaultAction::Allow);
    assert_eq!(config.mesh.tracing.sampling_percent, 100.0);
    assert_eq!(
        config.mesh.tracing.otlp_endpoint.as_deref(),
        Some("https://otel.example.com:4317")
    );
    assert_eq!(
        ok(&mesh("{tracing: {samplingPercent: 0}}"))
            .mesh
            .tracing
            .sampling_percent,
        0.0
    );
}

#[test]
fn mesh_trust_domain() {
    mesh_error(
        "{trustDomain: Cluster.Local}",
        "spec.trustDomain",
        "use lowercase letters, digits, '-' and '.'",
    );
    mesh_error(
        "{trustDomain: 'spiffe://cluster.local'}",
        "spec.trustDomain",
        "without scheme or path",
    );
    mesh_error(
        "{trustDomain: cluster.local/x}",
        "spec.trustDomain",
        "without scheme or path",
    );
    mesh_error(
        "{trustDomain: 'cluster..local'}",
        "spec.trustDomain",
        "not a trust domain",
    );
    mesh_error(
        "{trustDomain: ''}",
        "spec.trustDomain",
        "not a trust domain",
    );
}

#[test]
fn mesh_default_action() {
    mesh_error(
        "{authorization: {defaultAction: permit}}",
        "spec.authorization.defaultAction",
        "unknown variant `permit`, expected `deny` or `allow`",
    );
}

#[test]
fn mesh_sampling_percent() {
    mesh_error(
        "{tracing: {samplingPercent: 100.5}}",
        "spec.tracing.samplingPercent",
        "must be between 0 and 100, got 100.5",
    );
    mesh_error(
        "{tracing: {samplingPercent: -1}}",
        "spec.tracing.samplingPercent",
        "must be between 0 and 100",
    );
    mesh_error(
        "{tracing: {samplingPercent: .nan}}",
        "spec.tracing.samplingPercent",
        "must be between 0 and 100",
    );
}

#[test]
fn mesh_otlp_endpoint() {
    mesh_error(
        "{tracing: {otlpEndpoint: '127.0.0.1:4317'}}",
        "spec.tracing.otlpEndpoint",
        "starting with http:// or https://",
    );
    mesh_error(
        "{tracing: {otlpEndpoint: 'grpc://collector:4317'}}",
        "spec.tracing.otlpEndpoint",
        "starting with http://",
    );
    mesh_error(
        "{tracing: {otlpEndpoint: 'http://'}}",
        "spec.tracing.otlpEndpoint",
        "no host",
    );
    mesh_error(
        "{tracing: {otlpEndpoint: 'http://:4317'}}",
        "spec.tracing.otlpEndpoint",
        "no host",
    );
    mesh_error(
        "{tracing: {otlpEndpoint: 'http://otel collector:4317'}}",
        "spec.tracing.otlpEndpoint",
        "must not contain spaces",
    );
}

// === Workload ===

const INBOUND: &str = "inbound: [{port: 4144, appPort: 8080}]";

fn workload_error(spec: &str, field: &str, phrase: &str) -> ConfigError {
    assert_doc_error("Workload", spec, field, phrase)
}

#[test]
fn workload_fields() {
    let config = ok(&with_base(&[
        doc(
            "Workload",
            "subject",
            "{serviceAccount: web-sa, inbound: [{name: h2, port: 4144, appPort: 8080, protocol: tcp, idleTimeout: 90s}, \
          {port: 0, appPort: 1}, {port: 0, appPort: 2, name: second-any}], \
          outbound: [{port: 0, service: api}, {port: 0, service: api}, {port: 9002, service: db, namespace: ops}]}",
        ),
        doc("Service", "db", "{protocol: tcp}").replace("namespace: shop", "namespace: ops"),
    ]));
    let w = config.workload(None, "subject").unwrap();
    assert_eq!(w.service_account, "web-sa");
    assert_eq!(
        w.spiffe_id("cluster.local"),
        "spiffe://cluster.local/ns/shop/sa/web-sa"
    );
    assert_eq!(w.inbound[0].protocol, Protocol::Tcp);
    assert_eq!(w.inbound[0].idle_timeout, Duration::from_secs(90));
    assert_eq!(w.inbound[1].name, "port-0");
    assert_eq!(w.outbound[2].services(), [ResourceRef::new("ops", "db")]);
}

#[test]
fn workload_service_account() {
    workload_error(
        &format!("{{serviceAccount: Web, {INBOUND}}}"),
        "spec.serviceAccount",
        "must be lowercase",
    );
}

#[test]
fn workload_needs_inbound() {
    workload_error("{}", "spec.inbound", "at least one inbound listener");
    workload_error(
        "{inbound: []}",
        "spec.inbound",
        "at least one inbound listener",
    );
}

#[test]
fn inbound_name() {
    workload_error(
        "{inbound: [{name: HTTP, port: 1, appPort: 2}]}",
        "spec.inbound[0].name",
        "not a DNS-1123 label \"HTTP\"",
    );
    let error = workload_error(
        "{inbound: [{name: http, port: 1, appPort: 2}, {name: http, port: 3, appPort: 4}]}",
        "spec.inbound[1].name",
        "duplicate listener name \"http\"",
    );
    assert!(error.reason.contains("spec.inbound[0]"), "{error}");
    // Two listeners on port 0 would both default to "port-0".
    workload_error(
        "{inbound: [{port: 0, appPort: 2}, {port: 0, appPort: 4}]}",
        "spec.inbound[1].name",
        "\"port-0\"",
    );
}

#[test]
fn inbound_port() {
    workload_error(
        "{inbound: [{port: 70000, appPort: 1}]}",
        "spec.inbound[0].port",
        "must be between 0 and 65535, got 70000",
    );
    workload_error(
        "{inbound: [{port: -1, appPort: 1}]}",
        "spec.inbound[0].port",
        "must be between 0 and 65535, got -1",
    );
    workload_error(
        "{inbound: [{appPort: 1}]}",
        "spec.inbound[0].port",
        "required",
    );
}

#[test]
fn inbound_app_port() {
    workload_error(
        "{inbound: [{port: 1, appPort: 0}]}",
        "spec.inbound[0].appPort",
        "must be between 1 and 65535, got 0",
    );
    workload_error(
        "{inbound: [{port: 1, appPort: 65536}]}",
        "spec.inbound[0].appPort",
        "must be between 1 and 65535",
    );
    workload_error(
        "{inbound: [{port: 1}]}",
        "spec.inbound[0].appPort",
        "required",
    );
}

#[test]
fn inbound_protocol() {
    workload_error(
        "{inbound: [{port: 1, appPort: 2, protocol: grpc}]}",
        "spec.inbound[0].protocol",
        "unknown variant `grpc`, expected `http` or `tcp`",
    );
}

#[test]
fn inbound_idle_timeout() {
    workload_error(
        "{inbound: [{port: 1, appPort: 2, idleTimeout: 0s}]}",
        "spec.inbound[0].idleTimeout",
        "must be greater than zero",
    );
    workload_error(
        "{inbound: [{port: 1, appPort: 2, idleTimeout: 15}]}",
        "spec.inbound[0].idleTimeout",
        r#"not a duration "15": expected a whole number and a unit (ms, s, m, h), like 250ms or 15s"#,
    );
    workload_error(
        "{inbound: [{port: 1, appPort: 2, idleTimeout: 1.5h}]}",
        "spec.inbound[0].idleTimeout",
        "not a duration \"1.5h\"",
    );
}

#[test]
fn ports_are_unique_across_inbound_and_outbound() {
    let error = workload_error(
        "{inbound: [{port: 4144, appPort: 1}], outbound: [{port: 4144, service: api}]}",
        "spec.outbound[0].port",
        "port 4144 is already used by spec.inbound[0].port",
    );
    assert!(
        error
            .to_string()
            .starts_with("test.yaml: document 3 (Workload shop/subject): spec.outbound[0].port:")
    );
    workload_error(
        &format!(
            "{{{INBOUND}, outbound: [{{port: 9001, service: api}}, {{port: 9001, service: api}}]}}"
        ),
        "spec.outbound[1].port",
        "already used by spec.outbound[0].port",
    );
    workload_error(
        "{inbound: [{port: 1, appPort: 2}, {port: 1, appPort: 3}]}",
        "spec.inbound[1].port",
        "already used by spec.inbound[0].port",
    );
}

#[test]
fn outbound_port() {
    workload_error(
        &format!("{{{INBOUND}, outbound: [{{port: 65536, service: api}}]}}"),
        "spec.outbound[0].port",
        "between 0 and 65535",
    );
    workload_error(
        &format!("{{{INBOUND}, outbound: [{{service: api}}]}}"),
        "spec.outbound[0].port",
        "required",
    );
}

#[test]
fn outbound_service() {
    workload_error(
        &format!("{{{INBOUND}, outbound: [{{port: 1}}]}}"),
        "spec.outbound[0].service",
        "required",
    );
    workload_error(
        &format!("{{{INBOUND}, outbound: [{{port: 1, service: API}}]}}"),
        "spec.outbound[0].service",
        "must be lowercase",
    );
    workload_error(
        &format!("{{{INBOUND}, outbound: [{{port: 1, service: apii}}]}}"),
        "spec.outbound[0].service",
        "no Service shop/apii; Services in namespace \"shop\": api",
    );
    workload_error(
        &format!("{{{INBOUND}, outbound: [{{port: 1, service: api, namespace: ops}}]}}"),
        "spec.outbound[0].service",
        "no Service ops/api; namespace \"ops\" has no Services",
    );
}

#[test]
fn host_routed_outbound_services() {
    let config = ok(&with_base(&[
        doc(
            "Workload",
            "subject",
            &format!(
                "{{{INBOUND}, outbound: [{{port: 4140, services: [api, ops/db]}}, {{port: 0, service: api}}]}}"
            ),
        ),
        doc("Service", "db", "{}").replace("namespace: shop", "namespace: ops"),
    ]));
    let w = config.workload(None, "subject").unwrap();
    let api = ResourceRef::new("shop", "api");
    let db = ResourceRef::new("ops", "db");
    assert_eq!(
        w.outbound[0].target,
        OutboundTarget::ByHost(vec![api.clone(), db.clone()])
    );
    assert_eq!(w.destinations(), [&api, &db], "each once, in order");
    // The stored form reads back the same.
    let again = ok(&to_yaml(&config));
    assert_eq!(again.workload(None, "subject").unwrap(), w);
}

#[test]
fn host_routed_outbound_errors() {
    workload_error(
        &format!("{{{INBOUND}, outbound: [{{port: 1, service: api, services: [api]}}]}}"),
        "spec.outbound[0].services",
        "give either service",
    );
    workload_error(
        &format!("{{{INBOUND}, outbound: [{{port: 1, services: []}}]}}"),
        "spec.outbound[0].services",
        "an empty list lets the app reach nothing",
    );
    workload_error(
        &format!("{{{INBOUND}, outbound: [{{port: 1, services: [api, shop/api]}}]}}"),
        "spec.outbound[0].services[1]",
        "Service shop/api is already listed at [0]",
    );
    workload_error(
        &format!("{{{INBOUND}, outbound: [{{port: 1, services: [api, apii]}}]}}"),
        "spec.outbound[0].services[1]",
        "no Service shop/apii; Services in namespace \"shop\": api",
    );
    workload_error(
        &format!("{{{INBOUND}, outbound: [{{port: 1, services: [a/b/c]}}]}}"),
        "spec.outbound[0].services[0]",
        "may contain only lowercase letters",
    );
    workload_error(
        &format!("{{{INBOUND}, outbound: [{{port: 1, services: api}}]}}"),
        "spec.outbound[0].services",
        "a sequence",
    );
}

#[test]
fn host_routed_outbound_carries_http_only() {
    let error = assert_error(
        &with_base(&[
            doc(
                "Workload",
                "subject",
                &format!("{{{INBOUND}, outbound: [{{port: 1, services: [api, db]}}]}}"),
            ),
            doc("Service", "db", "{protocol: tcp}"),
        ]),
        "spec.outbound[0].services[1]",
        "Service shop/db speaks tcp; a port shared by several Services routes on the Host header",
    );
    assert_eq!(error.resource.as_deref(), Some("Workload shop/subject"));
}

#[test]
fn outbound_namespace() {
    workload_error(
        &format!("{{{INBOUND}, outbound: [{{port: 1, service: api, namespace: 'o p s'}}]}}"),
        "spec.outbound[0].namespace",
        "not a DNS-1123 label",
    );
}

#[test]
fn outbound_to_a_tcp_service_is_fine() {
    ok(&with_base(&[
        doc("Service", "db", "{protocol: tcp}"),
        doc(
            "Workload",
            "web",
            &format!("{{{INBOUND}, outbound: [{{port: 15432, service: db}}]}}"),
        ),
    ]));
}

// === Service ===

fn service_error(spec: &str, field: &str, phrase: &str) -> ConfigError {
    assert_doc_error("Service", spec, field, phrase)
}

#[test]
fn service_fields() {
    let config = ok(&with_base(&[doc(
        "Service",
        "subject",
        "{identity: 'spiffe://cluster.local/ns/shop/sa/subject', protocol: tcp, \
          endpoints: [{address: '10.0.0.7:4143'}, {address: '[::1]:4143'}]}",
    )]));
    let service = config
        .service(&ResourceRef::new("shop", "subject"))
        .unwrap();
    assert_eq!(
        service.identity.as_deref(),
        Some("spiffe://cluster.local/ns/shop/sa/subject")
    );
    assert_eq!(service.protocol, Protocol::Tcp);
    assert_eq!(service.endpoints[1].address, "[::1]:4143".parse().unwrap());
}

#[test]
fn service_identity() {
    let field = "spec.identity";
    service_error(
        "{identity: 'cluster.local/ns/shop/sa/api'}",
        field,
        "expected spiffe://<trust-domain>/<path>",
    );
    service_error(
        "{identity: 'spiffe://cluster.local'}",
        field,
        "path after the trust domain must not be empty",
    );
    service_error(
        "{identity: 'spiffe://cluster.local/'}",
        field,
        "path after the trust domain must not be empty",
    );
    service_error(
        "{identity: 'spiffe://cluster.local/ns/shop/'}",
        field,
        "must not end with '/'",
    );
    service_error(
        "{identity: 'spiffe://cluster.local/ns//sa'}",
        field,
        "empty path segment",
    );
    service_error(
        "{identity: 'spiffe://cluster.local/ns/shop?x=1'}",
        field,
        "query or fragment",
    );
    service_error(
        "{identity: 'spiffe://cluster.local/ns/shop#x'}",
        field,
        "query or fragment",
    );
    service_error(
        "{identity: 'spiffe://cluster.local/ns/../sa'}",
        field,
        "'.' and '..'",
    );
    service_error(
        "{identity: 'spiffe://cluster.local/ns/a b'}",
        field,
        "may contain only letters, digits",
    );
    service_error(
        "{identity: 'spiffe://Cluster.Local/ns/shop'}",
        field,
        "not a trust domain",
    );
}

#[test]
fn service_identity_must_use_the_mesh_trust_domain() {
    let error = service_error(
        "{identity: 'spiffe://other.local/ns/shop/sa/api'}",
        "spec.identity",
        "trust domain \"other.local\" of \"spiffe://other.local/ns/shop/sa/api\" differs from the mesh trustDomain \"cluster.local\"",
    );
    assert_eq!(error.document, Some(3));
    // With a Mesh document, its trust domain counts.
    ok(&format!(
        "{}---\n{}",
        mesh("{trustDomain: other.local}"),
        doc(
            "Service",
            "api",
            "{identity: 'spiffe://other.local/ns/shop/sa/api'}"
        )
    ));
}

#[test]
fn service_protocol() {
    service_error(
        "{protocol: HTTP}",
        "spec.protocol",
        "unknown variant `HTTP`",
    );
}

#[test]
fn service_endpoints() {
    service_error(
        "{endpoints: [{address: '10.0.0.7:1'}, {address: 10.0.0.7}]}",
        "spec.endpoints[1].address",
        r#"not a socket address "10.0.0.7": expected IP:PORT like 10.0.0.7:4143"#,
    );
    service_error(
        "{endpoints: [{address: 'localhost:80'}]}",
        "spec.endpoints[0].address",
        "not a socket address",
    );
    service_error(
        "{endpoints: [{address: '::1:4143'}]}",
        "spec.endpoints[0].address",
        "(IPv6 as [::1]:4143)",
    );
    service_error(
        "{endpoints: [{address: '10.0.0.7:0'}]}",
        "spec.endpoints[0].address",
        "port must not be 0",
    );
    service_error("{endpoints: [{}]}", "spec.endpoints[0].address", "required");
    service_error(
        "{endpoints: [{address: '10.0.0.7:1'}, {address: '10.0.0.7:1'}]}",
        "spec.endpoints[1].address",
        "duplicate endpoint 10.0.0.7:1: also at spec.endpoints[0]",
    );
}

// === TrafficPolicy ===

fn policy_error(spec: &str, field: &str, phrase: &str) -> ConfigError {
    assert_doc_error(
        "TrafficPolicy",
        &format!("{{service: api, {spec}}}"),
        field,
        phrase,
    )
}

fn policy(spec: &str) -> TrafficPolicy {
    let config = ok(&with_base(&[doc(
        "TrafficPolicy",
        "subject",
        &format!("{{service: api, {spec}}}"),
    )]));
    config.traffic_policies[0].clone()
}

#[test]
fn traffic_policy_routes() {
    let p = policy(
        "timeouts: {request: 5s}, retries: {attempts: 2, perTryTimeout: 1s}, routes: [\
         {pathPrefix: /reports, requestTimeout: 60s}, \
         {pathPrefix: /reports/big/, requestTimeout: none, perTryTimeout: 30s}, \
         {pathPrefix: /quick, perTryTimeout: 100ms}]",
    );
    let route = |path: &str| p.route_for(path).map(|r| (r.request, r.per_try));
    let s = Duration::from_secs;
    assert_eq!(
        route("/reports/big/x"),
        Some((None, Some(s(30)))),
        "longest prefix"
    );
    assert_eq!(
        route("/reports/small"),
        Some((Some(s(60)), Some(s(1)))),
        "per-try inherited"
    );
    assert_eq!(
        route("/quick"),
        Some((Some(s(5)), Some(Duration::from_millis(100)))),
        "request timeout inherited"
    );
    assert_eq!(route("/other"), None);
    // The stored form reads back the same.
    let config = ok(&with_base(&[doc(
        "TrafficPolicy",
        "subject",
        "{service: api, routes: [{pathPrefix: /a, requestTimeout: 1s}]}",
    )]));
    assert_eq!(
        ok(&to_yaml(&config)).traffic_policies,
        config.traffic_policies
    );
}

#[test]
fn traffic_policy_route_errors() {
    policy_error(
        "routes: [{requestTimeout: 1s}]",
        "spec.routes[0].pathPrefix",
        "required",
    );
    policy_error(
        "routes: [{pathPrefix: reports, requestTimeout: 1s}]",
        "spec.routes[0].pathPrefix",
        "must start with '/'",
    );
    policy_error(
        "routes: [{pathPrefix: /a, requestTimeout: 1s}, {pathPrefix: /a, requestTimeout: 2s}]",
        "spec.routes[1].pathPrefix",
        "duplicate prefix \"/a\": also at spec.routes[0]",
    );
    policy_error(
        "routes: [{pathPrefix: /a}]",
        "spec.routes[0]",
        "sets nothing",
    );
    policy_error(
        "routes: [{pathPrefix: /a, perTryTimeout: 1s}]",
        "spec.routes[0].perTryTimeout",
        "needs spec.retries",
    );
    policy_error(
        "routes: [{pathPrefix: /a, requestTimeout: soon}]",
        "spec.routes[0].requestTimeout",
        "not a duration",
    );
    policy_error(
        "routes: [{pathPrefix: /a, timeout: 1s}]",
        "spec.routes[0].timeout",
        "unknown field `timeout`, expected one of `pathPrefix`, `requestTimeout`, `perTryTimeout`",
    );
}

#[test]
fn traffic_policy_fields() {
    let p = policy(
        "timeouts: {request: 2m, connect: 250ms, idle: 30m}, \
         retries: {attempts: 10, retryOn: [5xx, gateway-error, connect-failure, reset], \
           retriableStatusCodes: [409, 100, 599], retriableGrpcCodes: [unavailable, deadline_exceeded], \
           perTryTimeout: 2s, backoff: {baseInterval: 10ms, maxInterval: 10ms}, retryNonIdempotent: true, \
           budget: {ratio: 1, minRetriesPerSecond: 0, window: 60s}}, \
         circuitBreaker: {maxConnections: 1, maxPendingRequests: 2, maxRequests: 3}, \
         outlierDetection: {consecutiveFailures: 1, baseEjectionTime: 1s, maxEjectionTime: 1s, maxEjectionPercent: 0}, \
         loadBalancer: round-robin",
    );
    assert_eq!(p.service, ResourceRef::new("shop", "api"));
    assert_eq!(
        p.timeouts,
        Timeouts {
            request: Some(Duration::from_secs(120)),
            connect: Duration::from_millis(250),
            idle: Duration::from_secs(1800),
        }
    );
    let r = p.retries.unwrap();
    assert_eq!(r.attempts, 10);
    assert_eq!(
        r.retry_on,
        [
            RetryOn::ServerError,
            RetryOn::GatewayError,
            RetryOn::ConnectFailure,
            RetryOn::Reset,
            RetryOn::StatusCode(409),
            RetryOn::StatusCode(100),
            RetryOn::StatusCode(599),
            RetryOn::GrpcStatus("unavailable".into()),
            RetryOn::GrpcStatus("deadline_exceeded".into()),
        ]
    );
    assert_eq!(r.per_try_timeout, Some(Duration::from_secs(2)));
    assert_eq!(
        (r.backoff_base, r.backoff_max),
        (Duration::from_millis(10), Duration::from_millis(10))
    );
    assert!(r.retry_non_idempotent);
    assert_eq!(
        r.budget,
        RetryBudget {
            ratio: 1.0,
            min_retries_per_second: 0,
            window: Duration::from_secs(60)
        }
    );
    assert_eq!(
        p.circuit_breaker,
        CircuitBreaker {
            max_connections: 1,
            max_pending_requests: 2,
            max_requests: 3
        }
    );
    let o = p.outlier_detection.unwrap();
    assert_eq!((o.consecutive_failures, o.max_ejection_percent), (1, 0));
    assert_eq!(p.load_balancer, LoadBalancer::RoundRobin);
    assert_eq!(
        policy("loadBalancer: least-request").load_balancer,
        LoadBalancer::LeastRequest
    );
}

#[test]
fn traffic_policy_service() {
    assert_doc_error("TrafficPolicy", "{}", "spec.service", "required");
    assert_doc_error(
        "TrafficPolicy",
        "{service: db}",
        "spec.service",
        "no Service shop/db; Services in namespace \"shop\": api",
    );
    assert_doc_error(
        "TrafficPolicy",
        "{service: 'shop/api'}",
        "spec.service",
        "not a DNS-1123 label",
    );
}

#[test]
fn at_most_one_traffic_policy_per_service() {
    let yaml = with_base(&[
        doc("TrafficPolicy", "first", "{service: api}"),
        doc("TrafficPolicy", "second", "{service: api}"),
    ]);
    let error = assert_error(
        &yaml,
        "spec.service",
        "Service shop/api already has TrafficPolicy shop/first (document 3)",
    );
    assert_eq!(error.document, Some(4));
    assert_eq!(error.resource.as_deref(), Some("TrafficPolicy shop/second"));
    assert!(
        error
            .reason
            .contains("at most one TrafficPolicy per Service"),
        "{error}"
    );
}

#[test]
fn request_timeout_can_be_disabled() {
    for off in ["none", "off", "0s", "0ms"] {
        assert_eq!(
            policy(&format!("timeouts: {{request: {off}}}"))
                .timeouts
                .request,
            None,
            "{off}"
        );
    }
    policy_error(
        "timeouts: {request: never}",
        "spec.timeouts.request",
        "not a duration \"never\"",
    );
}

#[test]
fn connect_and_idle_timeouts() {
    policy_error(
        "timeouts: {connect: 0s}",
        "spec.timeouts.connect",
        "must be greater than zero, got \"0s\"",
    );
    policy_error(
        "timeouts: {idle: 1 h}",
        "spec.timeouts.idle",
        "not a duration \"1 h\"",
    );
    policy_error(
        "timeouts: {idle: 99999999999999999999h}",
        "spec.timeouts.idle",
        "too large",
    );
}

#[test]
fn retry_attempts() {
    policy_error("retries: {}", "spec.retries.attempts", "required");
    policy_error(
        "retries: {attempts: 0}",
        "spec.retries.attempts",
        "must be between 1 and 10, got 0",
    );
    policy_error(
        "retries: {attempts: 11}",
        "spec.retries.attempts",
        "must be between 1 and 10, got 11",
    );
}

#[test]
fn retry_on() {
    policy_error(
        "retries: {attempts: 2, retryOn: [retriable-status-codes]}",
        "spec.retries.retryOn[0]",
        "unknown variant `retriable-status-codes`, expected one of `5xx`, `gateway-error`, `connect-failure`, `reset`",
    );
    policy_error(
        "retries: {attempts: 2, retriableStatusCodes: [409, 600]}",
        "spec.retries.retriableStatusCodes[1]",
        "must be between 100 and 599, got 600",
    );
    policy_error(
        "retries: {attempts: 2, retriableStatusCodes: [99]}",
        "spec.retries.retriableStatusCodes[0]",
        "between 100 and 599",
    );
    let error = policy_error(
        "retries: {attempts: 2, retriableGrpcCodes: [UNAVAILABLE]}",
        "spec.retries.retriableGrpcCodes[0]",
        "unknown gRPC status code \"UNAVAILABLE\"",
    );
    assert!(
        error
            .reason
            .contains("cancelled, unknown, invalid_argument, deadline_exceeded"),
        "{error}"
    );
    policy_error(
        "retries: {attempts: 2, retriableGrpcCodes: [ok]}",
        "spec.retries.retriableGrpcCodes[0]",
        "unknown gRPC status code \"ok\"",
    );
}

#[test]
fn per_try_timeout() {
    policy_error(
        "retries: {attempts: 2, perTryTimeout: 0ms}",
        "spec.retries.perTryTimeout",
        "must be greater than zero",
    );
}

#[test]
fn retry_backoff() {
    policy_error(
        "retries: {attempts: 2, backoff: {baseInterval: 0ms}}",
        "spec.retries.backoff.baseInterval",
        "greater than zero",
    );
    policy_error(
        "retries: {attempts: 2, backoff: {baseInterval: 1s, maxInterval: 500ms}}",
        "spec.retries.backoff.maxInterval",
        "must be at least baseInterval (1s), got 500ms",
    );
    // The default maxInterval (250ms) is below this base too.
    policy_error(
        "retries: {attempts: 2, backoff: {baseInterval: 1s}}",
        "spec.retries.backoff.maxInterval",
        "got 250ms",
    );
}

#[test]
fn retry_budget() {
    policy_error(
        "retries: {attempts: 2, budget: {ratio: 1.5}}",
        "spec.retries.budget.ratio",
        "must be between 0 and 1, got 1.5",
    );
    policy_error(
        "retries: {attempts: 2, budget: {ratio: -0.1}}",
        "spec.retries.budget.ratio",
        "between 0 and 1",
    );
    policy_error(
        "retries: {attempts: 2, budget: {minRetriesPerSecond: -1}}",
        "spec.retries.budget.minRetriesPerSecond",
        "must be at least 0, got -1",
    );
    policy_error(
        "retries: {attempts: 2, budget: {window: 500ms}}",
        "spec.retries.budget.window",
        "must be between 1s and 60s, got \"500ms\"",
    );
    policy_error(
        "retries: {attempts: 2, budget: {window: 61s}}",
        "spec.retries.budget.window",
        "between 1s and 60s",
    );
    policy_error(
        "retries: {attempts: 2, budget: {window: 10}}",
        "spec.retries.budget.window",
        "not a duration \"10\"",
    );
}

#[test]
fn circuit_breaker() {
    policy_error(
        "circuitBreaker: {maxConnections: 0}",
        "spec.circuitBreaker.maxConnections",
        "must be at least 1, got 0",
    );
    policy_error(
        "circuitBreaker: {maxPendingRequests: 0}",
        "spec.circuitBreaker.maxPendingRequests",
        "must be at least 1",
    );
    policy_error(
        "circuitBreaker: {maxRequests: 4294967296}",
        "spec.circuitBreaker.maxRequests",
        "must be at least 1, got 4294967296",
    );
    let p = policy("circuitBreaker: {maxRequests: 5}");
    assert_eq!(
        p.circuit_breaker,
        CircuitBreaker {
            max_requests: 5,
            ..CircuitBreaker::default()
        }
    );
}

#[test]
fn outlier_detection() {
    policy_error(
        "outlierDetection: {consecutiveFailures: 0}",
        "spec.outlierDetection.consecutiveFailures",
        "must be at least 1",
    );
    policy_error(
        "outlierDetection: {baseEjectionTime: 0s}",
        "spec.outlierDetection.baseEjectionTime",
        "greater than zero",
    );
    policy_error(
        "outlierDetection: {baseEjectionTime: 10m, maxEjectionTime: 5m}",
        "spec.outlierDetection.maxEjectionTime",
        "must be at least baseEjectionTime (10m), got 5m",
    );
    policy_error(
        "outlierDetection: {maxEjectionPercent: 101}",
        "spec.outlierDetection.maxEjectionPercent",
        "must be between 0 and 100, got 101",
    );
}

#[test]
fn load_balancer() {
    policy_error(
        "loadBalancer: random",
        "spec.loadBalancer",
        "unknown variant `random`, expected one of `p2c-ewma`, `round-robin`, `least-request`",
    );
}

// === AuthorizationPolicy ===

fn authz_error(rules: &str, field: &str, phrase: &str) -> ConfigError {
    let spec = format!("{{workload: api, action: ALLOW, rules: {rules}}}");
    assert_doc_error("AuthorizationPolicy", &spec, field, phrase)
}

fn rule(rule: &str) -> AuthzRule {
    let spec = format!("{{workload: api, action: DENY, rules: [{rule}]}}");
    let config = ok(&with_base(&[doc("AuthorizationPolicy", "subject", &spec)]));
    config.authorization_policies[0].rules[0].clone()
}

#[test]
fn authorization_policy_fields() {
    let r = rule(
        "{from: {principals: ['spiffe://cluster.local/ns/shop/sa/web', 'spiffe://cluster.local/ns/ops/*', '*'], \
           namespaces: [shop, ops]}, \
          to: {methods: [GET, POST, M-SEARCH], paths: ['/api/*', '/healthz', '/*'], ports: [1, 65535]}}",
    );
    assert_eq!(
        r.principals,
        [
            StringMatch::Exact("spiffe://cluster.local/ns/shop/sa/web".into()),
            StringMatch::Prefix("spiffe://cluster.local/ns/ops/".into()),
            StringMatch::Prefix(String::new()),
        ]
    );
    assert!(r.principals[2].matches("spiffe://anything/at/all"));
    assert_eq!(r.namespaces, ["shop", "ops"]);
    assert_eq!(r.methods, ["GET", "POST", "M-SEARCH"]);
    assert_eq!(
        r.paths,
        [
            StringMatch::Prefix("/api/".into()),
            StringMatch::Exact("/healthz".into()),
            StringMatch::Prefix("/".into()),
        ]
    );
    assert_eq!(r.ports, [1, 65535]);

    let config = ok(&with_base(&[doc(
        "AuthorizationPolicy",
        "subject",
        "{workload: api, action: DENY, rules: [{to: {ports: [1]}}]}",
    )]));
    let p = &config.authorization_policies[0];
    assert_eq!(
        (p.action, &p.workload),
        (AuthzAction::Deny, &ResourceRef::new("shop", "api"))
    );
}

#[test]
fn authorization_policy_workload() {
    assert_doc_error(
        "AuthorizationPolicy",
        "{action: ALLOW, rules: [{from: {principals: ['*']}}]}",
        "spec.workload",
        "required",
    );
    assert_doc_error(
        "AuthorizationPolicy",
        "{workload: web, action: ALLOW, rules: [{from: {principals: ['*']}}]}",
        "spec.workload",
        "no Workload shop/web; Workloads in namespace \"shop\": api",
    );
}

#[test]
fn authorization_policy_action() {
    assert_doc_error(
        "AuthorizationPolicy",
        "{workload: api, rules: [{from: {principals: ['*']}}]}",
        "spec.action",
        "required: ALLOW or DENY",
    );
    assert_doc_error(
        "AuthorizationPolicy",
        "{workload: api, action: allow, rules: [{from: {principals: ['*']}}]}",
        "spec.action",
        "unknown variant `allow`, expected `ALLOW` or `DENY`",
    );
}

#[test]
fn authorization_policy_rules() {
    assert_doc_error(
        "AuthorizationPolicy",
        "{workload: api, action: ALLOW}",
        "spec.rules",
        "at least one rule",
    );
    authz_error("[]", "spec.rules", "at least one rule");
    let phrase = "a rule must match something; to allow everything, use principals: ['*']";
    authz_error("[{}]", "spec.rules[0]", phrase);
    authz_error(
        "[{from: {principals: ['*']}}, {from: {}, to: {}}]",
        "spec.rules[1]",
        phrase,
    );
    authz_error(
        "[{from: {principals: [], namespaces: []}, to: {methods: [], paths: [], ports: []}}]",
        "spec.rules[0]",
        phrase,
    );
}

#[test]
fn rule_principals() {
    let field = "spec.rules[0].from.principals[1]";
    let rules = |p: &str| format!("[{{from: {{principals: ['*', '{p}']}}}}]");
    authz_error(&rules("web"), field, "not a SPIFFE ID \"web\"");
    authz_error(
        &rules("spiffe://cluster.local/ns/shop/sa/"),
        field,
        "must not end with '/'",
    );
    authz_error(
        &rules("spiffe://other.local/ns/shop/sa/web"),
        field,
        "differs from the mesh trustDomain \"cluster.local\"",
    );
    authz_error(
        &rules("spiffe://other.local/ns/*"),
        field,
        "must start with \"spiffe://cluster.local/\"",
    );
    authz_error(
        &rules("spiffe://cluster.local*"),
        field,
        "must start with \"spiffe://cluster.local/\"",
    );
    authz_error(
        &rules("spiffe://cluster.local/ns/*/sa/web"),
        field,
        "'*' is only allowed at the end",
    );
    authz_error(
        &rules("spiffe://cluster.local/ns/*/*"),
        field,
        "'*' is only allowed at the end",
    );
    authz_error(&rules("**"), field, "'*' is only allowed at the end");
}

#[test]
fn rule_namespaces() {
    authz_error(
        "[{from: {namespaces: [shop, Ops]}}]",
        "spec.rules[0].from.namespaces[1]",
        "must be lowercase: \"ops\"",
    );
}

#[test]
fn rule_methods() {
    authz_error(
        "[{to: {methods: [get]}}]",
        "spec.rules[0].to.methods[0]",
        "uppercase: write \"GET\", not \"get\"",
    );
    authz_error(
        "[{to: {methods: [GET, 'GE T']}}]",
        "spec.rules[0].to.methods[1]",
        "not an HTTP method \"GE T\"",
    );
    authz_error(
        "[{to: {methods: ['']}}]",
        "spec.rules[0].to.methods[0]",
        "not an HTTP method",
    );
}

#[test]
fn rule_paths() {
    authz_error(
        "[{to: {paths: [api]}}]",
        "spec.rules[0].to.paths[0]",
        "path \"api\" must start with '/'",
    );
    authz_error(
        "[{to: {paths: ['/api/*/items']}}]",
        "spec.rules[0].to.paths[0]",
        "'*' is only allowed at the end",
    );
    authz_error(
        "[{to: {paths: ['/api/**']}}]",
        "spec.rules[0].to.paths[0]",
        "'*' is only allowed at the end",
    );
}

#[test]
fn rule_ports() {
    authz_error(
        "[{to: {ports: [0]}}]",
        "spec.rules[0].to.ports[0]",
        "must be between 1 and 65535, got 0",
    );
    authz_error(
        "[{to: {ports: [80, 65536]}}]",
        "spec.rules[0].to.ports[1]",
        "must be between 1 and 65535",
    );
}

#[test]
fn all_errors_in_one_rule_are_reported() {
    let spec = "{workload: api, action: ALLOW, rules: [{from: {principals: [web], namespaces: [A]}, \
                to: {methods: [get], paths: [x], ports: [0]}}]}";
    let errors = errors(&with_base(&[doc("AuthorizationPolicy", "subject", spec)]));
    let fields: Vec<&str> = errors.iter().filter_map(|e| e.field.as_deref()).collect();
    assert_eq!(
        fields,
        [
            "spec.rules[0].from.principals[0]",
            "spec.rules[0].from.namespaces[0]",
            "spec.rules[0].to.methods[0]",
            "spec.rules[0].to.paths[0]",
            "spec.rules[0].to.ports[0]",
        ],
        "{}",
        lines(&errors)
    );
}

#[test]
fn inbound_listener_serves_a_service() {
    let config = ok(&with_base(&[doc(
        "Workload",
        "subject",
        "{inbound: [{port: 0, appPort: 8080, service: api}]}",
    )]));
    let w = config.workload(None, "subject").unwrap();
    assert_eq!(w.inbound[0].service, Some(ResourceRef::new("shop", "api")));

    workload_error(
        "{inbound: [{port: 0, appPort: 8080, service: nope}]}",
        "spec.inbound[0].service",
        "no Service shop/nope",
    );
    workload_error(
        "{inbound: [{port: 0, appPort: 8080, protocol: tcp, service: api}]}",
        "spec.inbound[0].service",
        "Service shop/api speaks http, but this listener's protocol is tcp",
    );
}
