//! Helpers shared by the integration tests: documents written in YAML flow
//! style so that each test shows the one thing it gets wrong.

#![allow(dead_code, clippy::unwrap_used)]

use outrigger_config::{ConfigError, MeshConfig, load_str};

/// A document in namespace `shop`; `spec` is YAML (flow style reads best).
pub fn doc(kind: &str, name: &str, spec: &str) -> String {
    format!(
        "apiVersion: outrigger.io/v1alpha1\nkind: {kind}\nmetadata: {{name: {name}, namespace: shop}}\nspec: {spec}\n"
    )
}

/// Documents 1 and 2: Service shop/api and Workload shop/api, for
/// references to point at; then `extra` from document 3 on.
pub fn with_base(extra: &[String]) -> String {
    let mut docs = vec![
        doc(
            "Service",
            "api",
            "{endpoints: [{address: '127.0.0.1:4143'}]}",
        ),
        doc(
            "Workload",
            "api",
            "{inbound: [{port: 4143, appPort: 8080}]}",
        ),
    ];
    docs.extend_from_slice(extra);
    docs.join("---\n")
}

pub fn load(yaml: &str) -> Result<MeshConfig, Vec<ConfigError>> {
    load_str("test.yaml", yaml).map_err(|e| e.into_vec())
}

pub fn ok(yaml: &str) -> MeshConfig {
    match load(yaml) {
        Ok(config) => config,
        Err(errors) => panic!("expected a valid config, got:\n{}", lines(&errors)),
    }
}

pub fn errors(yaml: &str) -> Vec<ConfigError> {
    match load(yaml) {
        Ok(config) => panic!("expected errors, got a config: {config:#?}"),
        Err(errors) => errors,
    }
}

/// Asserts there is exactly one error, at `field`, whose reason contains
/// `phrase`; returns it for further checks.
pub fn assert_error(yaml: &str, field: &str, phrase: &str) -> ConfigError {
    let errors = errors(yaml);
    assert_eq!(
        errors.len(),
        1,
        "expected one error, got:\n{}",
        lines(&errors)
    );
    let error = errors.into_iter().next().unwrap();
    assert_eq!(
        error.field.as_deref(),
        Some(field),
        "wrong field in: {error}"
    );
    assert!(
        error.reason.contains(phrase),
        "reason does not contain {phrase:?}: {error}"
    );
    error
}

/// `assert_error` for one extra document after the base ones.
pub fn assert_doc_error(kind: &str, spec: &str, field: &str, phrase: &str) -> ConfigError {
    let error = assert_error(&with_base(&[doc(kind, "subject", spec)]), field, phrase);
    assert_eq!(error.document, Some(3), "{error}");
    assert_eq!(
        error.resource.as_deref(),
        Some(format!("{kind} shop/subject").as_str())
    );
    error
}

pub fn lines(errors: &[ConfigError]) -> String {
    errors
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("\n")
}
