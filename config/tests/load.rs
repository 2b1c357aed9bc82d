//! Loading as a whole: the document stream, headers, duplicates, defaults,
//! error reporting, files, and the YAML round trip.

#![allow(clippy::unwrap_used)]

mod common;

use std::path::Path;
use std::time::Duration;

use common::*;
use outrigger_config::*;

const MESH: &str = "apiVersion: outrigger.io/v1alpha1\nkind: Mesh\nmetadata: {name: mesh}\n";

fn example_path() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/mesh.yaml")
}

// === The example and the round trip ===

#[test]
fn example_loads() {
    let config = load_file(&example_path()).unwrap();
    let names = |ids: Vec<&ResourceRef>| ids.iter().map(ToString::to_string).collect::<Vec<_>>();
    assert_eq!(
        names(config.workloads.iter().map(|w| &w.id).collect()),
        ["shop/api", "shop/web"]
    );
    assert_eq!(
        names(config.services.iter().map(|s| &s.id).collect()),
        ["shop/api", "shop/db", "shop/web"]
    );
    let db = config.service(&ResourceRef::new("shop", "db")).unwrap();
    assert_eq!(db.protocol, Protocol::Tcp);
    assert_eq!(db.endpoints[0].address, "127.0.0.1:5432".parse().unwrap());
    let db_policy = config.traffic_policy_for(&db.id).unwrap();
    assert_eq!(db_policy.timeouts.request, None);
    assert_eq!(db_policy.load_balancer, LoadBalancer::LeastRequest);
    let web = config.workload(Some("shop"), "web").unwrap();
    assert_eq!(
        web.spiffe_id(&config.mesh.trust_domain),
        "spiffe://cluster.local/ns/shop/sa/web"
    );
    assert_eq!(
        web.outbound[0].services(),
        [ResourceRef::new("shop", "api")]
    );
    assert_eq!(config.authorization_policies.len(), 3);
}

#[test]
fn to_yaml_round_trips_the_example_and_is_stable() {
    let config = load_file(&example_path()).unwrap();
    let yaml = to_yaml(&config);
    let again = load_str("round-trip.yaml", &yaml).unwrap();
    assert_eq!(again, config);
    assert_eq!(to_yaml(&again), yaml);
}

#[test]
fn to_yaml_round_trips_defaults_and_edge_values() {
    let config = ok(&with_base(&[
        doc(
            "Workload",
            "zero",
            "{inbound: [{port: 0, appPort: 1}], outbound: [{port: 0, service: api}]}",
        ),
        doc(
            "TrafficPolicy",
            "api",
            "{service: api, retries: {attempts: 1, retryOn: [], retriableStatusCodes: [503]}}",
        ),
        doc(
            "AuthorizationPolicy",
            "ports-only",
            "{workload: api, action: DENY, rules: [{to: {ports: [1]}}]}",
        ),
    ]));
    let yaml = to_yaml(&config);
    assert_eq!(load_str("round-trip.yaml", &yaml).unwrap(), config);
    // An empty retryOn must stay empty, not fall back to the default.
    let retries = config.traffic_policies[0].retries.as_ref().unwrap();
    assert_eq!(retries.retry_on, [RetryOn::StatusCode(503)]);
}

#[test]
fn json_shows_durations_as_strings() {
    let config = ok(&with_base(&[doc(
        "TrafficPolicy",
        "api",
        "{service: api, timeouts: {request: off}, retries: {attempts: 2}}",
    )]));
    let json = serde_json::to_value(&config).unwrap();
    let policy = &json["traffic_policies"][0];
    assert_eq!(policy["timeouts"]["request"], serde_json::Value::Null);
    assert_eq!(policy["timeouts"]["connect"], "1s");
    assert_eq!(policy["retries"]["backoff_base"], "25ms");
    assert_eq!(
        policy["retries"]["per_try_timeout"],
        serde_json::Value::Null
    );
    assert_eq!(json["workloads"][0]["inbound"][0]["idle_timeout"], "1h");

    let config = ok(&with_base(&[doc("TrafficPolicy", "api", "{service: api}")]));
    let json = serde_json::to_value(&config).unwrap();
    assert_eq!(json["traffic_policies"][0]["timeouts"]["request"], "15s");
}

// === Files ===

#[test]
fn missing_file_names_the_path() {
    let path = Path::new("/nonexistent/outrigger/mesh.yaml");
    let errors = load_file(path).unwrap_err();
    assert_eq!(errors.len(), 1);
    assert_eq!(errors[0].source, "/nonexistent/outrigger/mesh.yaml");
    assert_eq!(errors[0].document, None);
    assert!(
        errors[0].reason.contains("cannot read file"),
        "{}",
        errors[0]
    );
    assert!(
        errors
            .to_string()
            .starts_with("/nonexistent/outrigger/mesh.yaml: cannot read file")
    );
}

#[test]
fn file_errors_carry_the_path() {
    let path =
        std::env::temp_dir().join(format!("outrigger-config-test-{}.yaml", std::process::id()));
    std::fs::write(&path, "kind: Nope\n").unwrap();
    let errors = load_file(&path).unwrap_err();
    std::fs::remove_file(&path).unwrap();
    assert!(
        errors
            .iter()
            .all(|e| e.source == path.display().to_string())
    );
}

// === The document stream ===

#[test]
fn empty_documents_are_skipped() {
    let yaml = format!(
        "---\n# just a comment\n---\n{MESH}---\n---\n{}---\n",
        doc("Service", "api", "{}")
    );
    let config = ok(&yaml);
    assert_eq!(config.services.len(), 1);
    assert_eq!(ok("").services.len(), 0);
    assert_eq!(ok("# nothing here\n").services.len(), 0);
    assert_eq!(ok("---\n---\n").services.len(), 0);
}

#[test]
fn document_indexes_count_empty_documents() {
    let yaml = format!("---\n---\n{}", doc("Service", "api", "{protocol: udp}"));
    let errors = errors(&yaml);
    assert_eq!(errors[0].document, Some(2), "{}", errors[0]);
}

#[test]
fn yaml_syntax_error_gives_document_line_and_column() {
    let yaml = format!("{}---\nkind: [Service\n", doc("Service", "api", "{}"));
    let errors = errors(&yaml);
    assert_eq!(errors.len(), 1, "{}", lines(&errors));
    assert_eq!(errors[0].document, Some(2));
    assert!(
        errors[0].reason.starts_with("invalid YAML"),
        "{}",
        errors[0]
    );
    assert!(
        errors[0].reason.contains("line 7 column 1"),
        "{}",
        errors[0]
    );
}

#[test]
fn yaml_errors_that_stop_the_stream_do_not_hang_or_panic() {
    for yaml in [
        "a: b\n\tc: d\n",
        "a: *nowhere\n",
        "a: 1\na: 2\n",
        "a:\n  b: 1\n  c: [\n",
        "{",
        "- [\n---\nb: 1\n",
    ] {
        let errors = errors(yaml);
        assert_eq!(errors.len(), 1, "{yaml:?}: {}", lines(&errors));
        assert!(
            errors[0].reason.starts_with("invalid YAML"),
            "{}",
            errors[0]
        );
    }
}

#[test]
fn syntax_error_keeps_errors_from_earlier_documents() {
    let yaml = format!("{}---\nkind: [\n", doc("Service", "api", "{protocol: udp}"));
    let errors = errors(&yaml);
    assert_eq!(errors.len(), 2, "{}", lines(&errors));
    assert_eq!(errors[0].field.as_deref(), Some("spec.protocol"));
    assert!(errors[1].reason.starts_with("invalid YAML"));
}

#[test]
fn a_document_must_be_a_mapping() {
    let found = errors("- a\n- b\n");
    assert_eq!(found.len(), 1);
    assert_eq!(
        (found[0].document, found[0].field.as_deref()),
        (Some(1), None)
    );
    assert!(
        found[0].reason.contains("must be a mapping"),
        "{}",
        found[0]
    );
    assert!(found[0].reason.contains("not a sequence"), "{}", found[0]);
    let found = errors("just a string\n");
    assert!(found[0].reason.contains("not a string"), "{}", found[0]);
}

// === Headers ===

#[test]
fn api_version_must_match() {
    let yaml = doc("Service", "api", "{}").replace("outrigger.io/v1alpha1", "v1");
    let error = assert_error(&yaml, "apiVersion", r#"unsupported apiVersion "v1""#);
    assert!(
        error.reason.contains(r#"expected "outrigger.io/v1alpha1""#),
        "{error}"
    );
    assert_eq!(error.resource.as_deref(), Some("Service shop/api"));
}

#[test]
fn api_version_is_required() {
    let yaml = "kind: Service\nmetadata: {name: api}\n";
    assert_error(
        yaml,
        "apiVersion",
        "required: expected \"outrigger.io/v1alpha1\"",
    );
}

#[test]
fn unknown_kind_lists_the_kinds() {
    let error = assert_error(
        &doc("Servce", "api", "{}"),
        "kind",
        r#"unknown kind "Servce""#,
    );
    assert!(
        error
            .reason
            .contains("Mesh, Workload, Service, TrafficPolicy, AuthorizationPolicy"),
        "{error}"
    );
    // Still labelled, from what was written, so the user can find it.
    assert_eq!(error.resource.as_deref(), Some("Servce shop/api"));
}

#[test]
fn kind_is_required() {
    let yaml = "apiVersion: outrigger.io/v1alpha1\nmetadata: {name: api}\n";
    assert_error(yaml, "kind", "required: one of Mesh, Workload");
}

#[test]
fn name_is_required() {
    let yaml = "apiVersion: outrigger.io/v1alpha1\nkind: Service\nmetadata: {namespace: shop}\n";
    assert_error(yaml, "metadata.name", "required");
    let yaml = "apiVersion: outrigger.io/v1alpha1\nkind: Service\n";
    assert_error(yaml, "metadata.name", "required");
}

#[test]
fn names_must_be_dns_labels() {
    let cases = [
        ("Api", "must be lowercase: \"api\""),
        ("my_api", "found '_'"),
        ("-api", "must start and end with a letter or digit"),
        ("api-", "must start and end with a letter or digit"),
        ("''", "must not be empty"),
        ("a.b", "found '.'"),
    ];
    for (name, phrase) in cases {
        let error = assert_error(&doc("Service", name, "{}"), "metadata.name", phrase);
        assert!(error.reason.starts_with("not a DNS-1123 label"), "{error}");
    }
    let long = "a".repeat(64);
    assert_error(
        &doc("Service", &long, "{}"),
        "metadata.name",
        "at most 63 characters, has 64",
    );
    ok(&doc("Service", &"a".repeat(63), "{}"));
    ok(&doc("Service", "a1-b2", "{}"));
}

#[test]
fn namespaces_must_be_dns_labels() {
    let yaml = doc("Service", "api", "{}").replace("namespace: shop", "namespace: Shop");
    assert_error(&yaml, "metadata.namespace", "must be lowercase");
}

#[test]
fn namespace_defaults_to_default() {
    let yaml = "apiVersion: outrigger.io/v1alpha1\nkind: Service\nmetadata: {name: api}\n";
    assert_eq!(ok(yaml).services[0].id, ResourceRef::new("default", "api"));
}

#[test]
fn mesh_has_no_namespace() {
    let yaml =
        "apiVersion: outrigger.io/v1alpha1\nkind: Mesh\nmetadata: {name: mesh, namespace: shop}\n";
    let error = assert_error(yaml, "metadata.namespace", "has no namespace");
    assert_eq!(error.resource.as_deref(), Some("Mesh mesh"));
}

#[test]
fn labels_and_annotations_are_accepted() {
    let yaml = "apiVersion: outrigger.io/v1alpha1\nkind: Service\nmetadata:\n  name: api\n  labels: {app: api, tier: backend}\n  annotations: {note: hello}\n";
    ok(yaml);
}

// === Unknown fields ===

#[test]
fn unknown_top_level_field() {
    let yaml = format!("{}status: {{}}\n", doc("Service", "api", "{}"));
    let error = assert_error(&yaml, "status", "unknown field `status`");
    assert!(
        error
            .reason
            .contains("expected one of `apiVersion`, `kind`, `metadata`, `spec`"),
        "{error}"
    );
    assert_eq!(error.resource.as_deref(), Some("Service shop/api"));
}

#[test]
fn unknown_metadata_field() {
    let yaml = doc("Service", "api", "{}").replace("namespace: shop", "namespace: shop, uid: x");
    let error = assert_error(&yaml, "metadata.uid", "unknown field `uid`");
    assert!(error.reason.contains("`labels`, `annotations`"), "{error}");
}

#[test]
fn unknown_spec_field() {
    let error = assert_doc_error(
        "Service",
        "{endpoint: []}",
        "spec.endpoint",
        "unknown field `endpoint`",
    );
    assert!(
        error
            .reason
            .contains("expected one of `identity`, `protocol`, `endpoints`"),
        "{error}"
    );
}

#[test]
fn unknown_nested_fields() {
    assert_doc_error(
        "Workload",
        "{inbound: [{port: 1, appPort: 2}, {port: 3, appport: 4}]}",
        "spec.inbound[1].appport",
        "unknown field `appport`, expected one of `name`, `port`, `appPort`, `protocol`, `idleTimeout`",
    );
    assert_doc_error(
        "TrafficPolicy",
        "{service: api, retries: {attempts: 2, backoff: {base: 1s}}}",
        "spec.retries.backoff.base",
        "unknown field `base`, expected `baseInterval` or `maxInterval`",
    );
    assert_doc_error(
        "AuthorizationPolicy",
        "{workload: api, action: ALLOW, rules: [{from: {principal: ['*']}}]}",
        "spec.rules[0].from.principal",
        "unknown field `principal`",
    );
}

#[test]
fn wrong_types_name_the_field() {
    assert_doc_error(
        "Workload",
        "{inbound: [{port: '4143', appPort: 1}]}",
        "spec.inbound[0].port",
        "invalid type: string \"4143\", expected an integer",
    );
    assert_doc_error(
        "Workload",
        "{inbound: {port: 1}}",
        "spec.inbound",
        "expected a sequence",
    );
    assert_doc_error(
        "TrafficPolicy",
        "{service: api, retries: {attempts: 2, budget: {ratio: high}}}",
        "spec.retries.budget.ratio",
        "invalid type: string \"high\", expected a number",
    );
    assert_doc_error(
        "Service",
        "[]",
        "spec",
        "invalid type: sequence, expected a mapping",
    );
    assert_doc_error(
        "TrafficPolicy",
        "{service: api, timeouts: 15s}",
        "spec.timeouts",
        "expected a mapping",
    );
}

// === Duplicates ===

#[test]
fn duplicate_resources_name_both_documents() {
    let yaml = with_base(&[doc("Service", "db", "{}"), doc("Service", "api", "{}")]);
    let errors = errors(&yaml);
    assert_eq!(errors.len(), 1, "{}", lines(&errors));
    assert_eq!(errors[0].document, Some(4));
    assert_eq!(errors[0].resource.as_deref(), Some("Service shop/api"));
    assert!(
        errors[0]
            .reason
            .contains("duplicate Service shop/api: already defined in document 1"),
        "{}",
        errors[0]
    );
}

#[test]
fn same_name_in_another_kind_or_namespace_is_fine() {
    let other_namespace = doc("Service", "api", "{}").replace("namespace: shop", "namespace: ops");
    let config = ok(&with_base(&[other_namespace]));
    assert_eq!(config.services.len(), 2);
    assert_eq!(config.workloads.len(), 1);
}

#[test]
fn at_most_one_mesh() {
    let yaml = format!("{MESH}---\n{}", MESH.replace("name: mesh", "name: other"));
    let errors = errors(&yaml);
    assert_eq!(errors.len(), 1, "{}", lines(&errors));
    assert_eq!(errors[0].document, Some(2));
    assert!(
        errors[0]
            .reason
            .contains("only one Mesh document is allowed; the first is document 1"),
        "{}",
        errors[0]
    );
}

// === Defaults ===

#[test]
fn mesh_defaults_without_a_mesh_document() {
    let mesh = ok("").mesh;
    assert_eq!(mesh.name, "mesh");
    assert_eq!(mesh.trust_domain, "cluster.local");
    assert_eq!(mesh.default_authorization, DefaultAction::Deny);
    assert_eq!(mesh.tracing.sampling_percent, 1.0);
    assert_eq!(mesh.tracing.otlp_endpoint, None);
    assert_eq!(mesh, MeshSettings::default());
}

#[test]
fn mesh_defaults_with_an_empty_spec() {
    let mesh = ok("apiVersion: outrigger.io/v1alpha1\nkind: Mesh\nmetadata: {name: prod}\n").mesh;
    assert_eq!(
        mesh,
        MeshSettings {
            name: "prod".into(),
            ..MeshSettings::default()
        }
    );
}

#[test]
fn resource_defaults() {
    let config = ok(&with_base(&[
        doc(
            "Workload",
            "web",
            "{inbound: [{port: 4144, appPort: 8080}], outbound: [{port: 9001, service: api}]}",
        ),
        doc(
            "TrafficPolicy",
            "api",
            "{service: api, retries: {attempts: 3}, outlierDetection: {}}",
        ),
    ]));
    let web = config.workload(Some("shop"), "web").unwrap();
    assert_eq!(web.service_account, "web");
    assert_eq!(web.inbound[0].name, "port-4144");
    assert_eq!(web.inbound[0].protocol, Protocol::Http);
    assert_eq!(web.inbound[0].idle_timeout, Duration::from_secs(3600));
    assert_eq!(
        web.outbound[0].services(),
        [ResourceRef::new("shop", "api")]
    );

    let service = config.service(&ResourceRef::new("shop", "api")).unwrap();
    assert_eq!(service.identity, None);
    assert_eq!(service.protocol, Protocol::Http);

    let policy = &config.traffic_policies[0];
    assert_eq!(policy.timeouts, Timeouts::default());
    assert_eq!(policy.timeouts.request, Some(Duration::from_secs(15)));
    assert_eq!(policy.circuit_breaker, CircuitBreaker::default());
    assert_eq!(policy.load_balancer, LoadBalancer::P2cEwma);
    let retries = policy.retries.as_ref().unwrap();
    assert_eq!(
        retries.retry_on,
        [RetryOn::GatewayError, RetryOn::ConnectFailure]
    );
    assert_eq!(retries.per_try_timeout, None);
    assert_eq!(retries.backoff_base, Duration::from_millis(25));
    assert_eq!(retries.backoff_max, Duration::from_millis(250));
    assert!(!retries.retry_non_idempotent);
    assert_eq!(retries.budget, RetryBudget::default());
    let outlier = policy.outlier_detection.as_ref().unwrap();
    assert_eq!(outlier.consecutive_failures, 5);
    assert_eq!(outlier.base_ejection_time, Duration::from_secs(30));
    assert_eq!(outlier.max_ejection_time, Duration::from_secs(300));
    assert_eq!(outlier.max_ejection_percent, 50);

    let bare = ok(&with_base(&[doc("TrafficPolicy", "api", "{service: api}")]));
    assert_eq!(bare.traffic_policies[0].retries, None);
    assert_eq!(bare.traffic_policies[0].outlier_detection, None);
}

#[test]
fn resources_are_sorted_by_namespace_then_name() {
    let in_ns = |ns: &str, name: &str| {
        doc("Service", name, "{}").replace("namespace: shop", &format!("namespace: {ns}"))
    };
    let yaml = [in_ns("b", "a"), in_ns("a", "z"), in_ns("a", "b")].join("---\n");
    let ids: Vec<String> = ok(&yaml)
        .services
        .iter()
        .map(|s| s.id.to_string())
        .collect();
    assert_eq!(ids, ["a/b", "a/z", "b/a"]);
}

// === Error collection ===

#[test]
fn all_errors_are_collected_across_and_within_documents_in_file_order() {
    let yaml = with_base(&[
        doc(
            "Workload",
            "web",
            "{inbound: [{port: 70000, appPort: 0}], outbound: [{port: 1, service: nope}]}",
        ),
        doc("Service", "db", "{endpoints: [{address: nope}]}"),
        doc("Bogus", "x", "{}"),
    ]);
    let errors = errors(&yaml);
    let summary: Vec<(Option<usize>, Option<&str>)> = errors
        .iter()
        .map(|e| (e.document, e.field.as_deref()))
        .collect();
    assert_eq!(
        summary,
        [
            (Some(3), Some("spec.inbound[0].port")),
            (Some(3), Some("spec.inbound[0].appPort")),
            (Some(3), Some("spec.outbound[0].service")),
            (Some(4), Some("spec.endpoints[0].address")),
            (Some(5), Some("kind")),
        ],
        "{}",
        lines(&errors)
    );
}

#[test]
fn errors_display_in_full() {
    let yaml = with_base(&[doc(
        "Service",
        "db",
        "{endpoints: [{address: '127.0.0.1:1'}, {address: 10.0.0.7}]}",
    )]);
    let errors = load_str("mesh.yaml", &yaml).unwrap_err();
    assert_eq!(
        errors.to_string(),
        r#"mesh.yaml: document 3 (Service shop/db): spec.endpoints[1].address: not a socket address "10.0.0.7": expected IP:PORT like 10.0.0.7:4143"#
    );
}

#[test]
fn a_broken_spec_still_defines_its_resource() {
    // The Service's spec is wrong; the workload's reference to it must not
    // add a second, misleading error.
    let yaml = [
        doc("Service", "db", "{protocol: udp}"),
        doc(
            "Workload",
            "web",
            "{inbound: [{port: 1, appPort: 2}], outbound: [{port: 3, service: db}]}",
        ),
    ]
    .join("---\n");
    assert_error(
        &yaml,
        "spec.protocol",
        "unknown variant `udp`, expected `http` or `tcp`",
    );
}

#[test]
fn a_broken_mesh_does_not_cascade_into_identity_errors() {
    let yaml = [
        MESH.replace("kind: Mesh", "kind: Mesh\nspec: {trustDomain: Example.COM}"),
        doc(
            "Service",
            "api",
            "{identity: 'spiffe://example.com/ns/shop/sa/api'}",
        ),
    ]
    .join("---\n");
    assert_error(&yaml, "spec.trustDomain", "not a trust domain");
}

#[test]
fn split_documents_checks_each_document_but_not_references() {
    let yaml = "# a comment\n\
        apiVersion: outrigger.io/v1alpha1\nkind: Workload\nmetadata: {name: web, namespace: shop}\n\
        spec: {inbound: [{port: 1, appPort: 2, service: not-here}]}\n\
        ---\n\
        apiVersion: outrigger.io/v1alpha1\nkind: Mesh\nmetadata: {name: mesh}\nspec: {}\n";
    let docs = split_documents("in.yaml", yaml).unwrap();
    assert_eq!(docs.len(), 2);
    assert_eq!(docs[0].kind, "Workload");
    assert_eq!(docs[0].id, ResourceRef::new("shop", "web"));
    assert_eq!(docs[1].id, ResourceRef::new("", "mesh"));
    assert!(!docs[0].yaml.contains("comment"));
    assert!(docs[0].yaml.contains("not-here"));

    let bad =
        "apiVersion: outrigger.io/v1alpha1\nkind: Service\nmetadata: {name: a}\nspec: {bogus: 1}\n";
    let errors = split_documents("in.yaml", bad).unwrap_err().into_vec();
    assert_eq!(errors.len(), 1);
    assert_eq!(errors[0].field.as_deref(), Some("spec.bogus"));
    assert!(errors[0].reason.contains("bogus"), "{}", errors[0].reason);
}
