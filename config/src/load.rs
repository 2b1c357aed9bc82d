//! From YAML text to raw documents: splitting the stream, checking each
//! document's header, parsing its spec by kind. Then [`crate::validate`]
//! turns the raw documents into the model. [`to_yaml`] goes the other way.

use std::collections::HashMap;
use std::fmt;
use std::path::Path;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_norway::Value;

use crate::error::{ConfigError, ConfigErrors};
use crate::model::{API_VERSION, DEFAULT_NAMESPACE, MeshConfig, ResourceRef};
use crate::raw::*;
use crate::validate::{self, Ctx};

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) enum Kind {
    Mesh,
    Workload,
    Service,
    TrafficPolicy,
    AuthorizationPolicy,
}

impl Kind {
    const ALL: [Kind; 5] = [
        Kind::Mesh,
        Kind::Workload,
        Kind::Service,
        Kind::TrafficPolicy,
        Kind::AuthorizationPolicy,
    ];

    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Kind::Mesh => "Mesh",
            Kind::Workload => "Workload",
            Kind::Service => "Service",
            Kind::TrafficPolicy => "TrafficPolicy",
            Kind::AuthorizationPolicy => "AuthorizationPolicy",
        }
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

pub(crate) enum Spec {
    Mesh(RawMeshSpec),
    Workload(RawWorkloadSpec),
    Service(RawServiceSpec),
    // Boxed: by far the largest spec.
    TrafficPolicy(Box<RawTrafficPolicySpec>),
    AuthorizationPolicy(RawAuthorizationPolicySpec),
}

/// A document whose header is valid.
pub(crate) struct Document {
    /// 1-based position in the stream.
    pub index: usize,
    pub kind: Kind,
    /// For the Mesh, the namespace is empty.
    pub id: ResourceRef,
    /// `None` when the spec did not parse (the error is already reported);
    /// the document still counts as defining its resource, so references
    /// to it do not pile up errors on top of the real one.
    pub spec: Option<Spec>,
}

impl Document {
    pub(crate) fn resource(&self) -> String {
        resource_label(self.kind.as_str(), &self.id)
    }
}

fn resource_label(kind: &str, id: &ResourceRef) -> String {
    if id.namespace.is_empty() {
        format!("{kind} {}", id.name)
    } else {
        format!("{kind} {id}")
    }
}

/// Reads and loads a YAML file; see [`load_str`].
pub fn load_file(path: &Path) -> Result<MeshConfig, ConfigErrors> {
    let source = path.display().to_string();
    let yaml = std::fs::read_to_string(path)
        .map_err(|e| ConfigError::new(source.as_str(), format!("cannot read file: {e}")))?;
    load_str(&source, &yaml)
}

/// Loads a multi-document YAML stream. `source_name` (a file path, say)
/// only serves to label errors.
///
/// Either every document is valid and consistent with the others, or the
/// result lists every error found; never a partial configuration.
pub fn load_str(source_name: &str, yaml: &str) -> Result<MeshConfig, ConfigErrors> {
    let mut errors = Vec::new();
    let config = match parse_documents(source_name, yaml, &mut errors) {
        Ok(documents) => Some(validate::validate(source_name, &documents, &mut errors)),
        // The rest of the stream is unknown, so validating what came
        // before could only produce noise about missing references.
        Err(syntax_error) => {
            errors.push(syntax_error);
            None
        }
    };
    match config {
        Some(config) if errors.is_empty() => Ok(config),
        _ => {
            // Parsing and validation report in two passes; users read
            // errors in file order. The sort is stable, so fields keep
            // their order within a document.
            errors.sort_by_key(|e| e.document);
            Err(ConfigErrors(errors))
        }
    }
}

/// One document of a YAML stream, checked (header, spec shape, no
/// duplicates in the stream) and written back as YAML: what the control
/// plane stores per resource.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceDocument {
    /// 1-based position in the stream.
    pub index: usize,
    /// `Mesh`, `Workload`, `Service`, `TrafficPolicy` or `AuthorizationPolicy`.
    pub kind: &'static str,
    /// For the Mesh, the namespace is empty.
    pub id: ResourceRef,
    /// The document as YAML, with every mapping's keys sorted and comments
    /// dropped, so that layout and key order do not count as changes.
    pub yaml: String,
}

/// The resource kinds, in the order [`to_yaml`] writes them.
pub const KINDS: [&str; 5] = [
    "Mesh",
    "Service",
    "Workload",
    "TrafficPolicy",
    "AuthorizationPolicy",
];

/// Splits a multi-document stream into checked documents without checking
/// references between them (they may point at resources stored elsewhere;
/// [`load_str`] over the whole set checks those).
pub fn split_documents(source_name: &str, yaml: &str) -> Result<Vec<SourceDocument>, ConfigErrors> {
    let mut errors = Vec::new();
    let documents = parse_documents(source_name, yaml, &mut errors)
        .map_err(|syntax_error| ConfigErrors(vec![syntax_error]))?;
    if !errors.is_empty() {
        errors.sort_by_key(|e| e.document);
        return Err(ConfigErrors(errors));
    }
    // The stream parsed once already, so it parses again; written back
    // from the parsed value so that comments and layout do not count as
    // changes.
    let values: Vec<Value> = serde_norway::Deserializer::from_str(yaml)
        .map(Value::deserialize)
        .collect::<Result<_, _>>()
        .map_err(|e| ConfigError::new(source_name, format!("invalid YAML: {e}")))?;
    let mut out = Vec::with_capacity(documents.len());
    for document in documents {
        let value = sorted(values.get(document.index - 1).unwrap_or(&Value::Null));
        let yaml = serde_norway::to_string(&value).map_err(|e| ConfigError {
            document: Some(document.index),
            resource: Some(document.resource()),
            ..ConfigError::new(source_name, format!("cannot write the document back: {e}"))
        })?;
        out.push(SourceDocument {
            index: document.index,
            kind: document.kind.as_str(),
            id: document.id,
            yaml,
        });
    }
    Ok(out)
}

/// `value` with the keys of every mapping in it sorted.
fn sorted(value: &Value) -> Value {
    match value {
        Value::Mapping(map) => {
            let mut entries: Vec<(&Value, &Value)> = map.iter().collect();
            entries.sort_by_cached_key(|(k, _)| match k {
                Value::String(s) => s.clone(),
                other => serde_norway::to_string(other).unwrap_or_default(),
            });
            Value::Mapping(
                entries
                    .into_iter()
                    .map(|(k, v)| (k.clone(), sorted(v)))
                    .collect(),
            )
        }
        Value::Sequence(items) => Value::Sequence(items.iter().map(sorted).collect()),
        Value::Tagged(tagged) => Value::Tagged(Box::new(serde_norway::value::TaggedValue {
            tag: tagged.tag.clone(),
            value: sorted(&tagged.value),
        })),
        other => other.clone(),
    }
}

/// Splits the stream and parses each document, pushing per-document errors
/// to `errors`. A YAML syntax error ends the stream and is returned.
fn parse_documents(
    source: &str,
    yaml: &str,
    errors: &mut Vec<ConfigError>,
) -> Result<Vec<Document>, ConfigError> {
    let mut documents = Vec::new();
    let mut seen: HashMap<(Kind, ResourceRef), usize> = HashMap::new();

    for (i, yaml_document) in serde_norway::Deserializer::from_str(yaml).enumerate() {
        let index = i + 1;
        let value = match Value::deserialize(yaml_document) {
            Ok(value) => value,
            // serde_norway's message already ends in "at line L column C".
            // It cannot resume after an error (it repeats it forever), so stop.
            Err(e) => {
                return Err(ConfigError {
                    document: Some(index),
                    ..ConfigError::new(source, format!("invalid YAML: {e}"))
                });
            }
        };
        let mut ctx = Ctx {
            source,
            document: index,
            resource: best_effort_label(&value),
            errors,
        };
        let Some(document) = parse_document(&mut ctx, index, value) else {
            continue;
        };

        // Any two Mesh documents clash, whatever their names.
        let key = match document.kind {
            Kind::Mesh => (Kind::Mesh, ResourceRef::new("", "")),
            kind => (kind, document.id.clone()),
        };
        match seen.get(&key) {
            None => {
                seen.insert(key, index);
                documents.push(document);
            }
            Some(first) if document.kind == Kind::Mesh => ctx.error(
                None,
                format!("only one Mesh document is allowed; the first is document {first}"),
            ),
            Some(first) => ctx.error(
                None,
                format!(
                    "duplicate {}: already defined in document {first}",
                    document.resource()
                ),
            ),
        }
    }
    Ok(documents)
}

/// `Kind namespace/name` read straight from the value, so that errors in
/// a document whose header does not parse still say which one it is.
fn best_effort_label(value: &Value) -> Option<String> {
    let kind = value.get("kind")?.as_str()?;
    let metadata = value.get("metadata")?;
    let name = metadata.get("name")?.as_str()?;
    let namespace = match metadata.get("namespace").and_then(Value::as_str) {
        _ if kind == Kind::Mesh.as_str() => "",
        Some(namespace) => namespace,
        None => DEFAULT_NAMESPACE,
    };
    Some(resource_label(kind, &ResourceRef::new(namespace, name)))
}

/// Checks the header and parses the spec. `None` for empty documents and
/// for documents whose header is invalid (the errors are reported).
fn parse_document(ctx: &mut Ctx<'_>, index: usize, value: Value) -> Option<Document> {
    match &value {
        Value::Null => return None,
        Value::Mapping(_) => {}
        other => {
            ctx.error(
                None,
                format!(
                    "a document must be a mapping with apiVersion, kind, metadata and spec, not {}",
                    value_type(other)
                ),
            );
            return None;
        }
    }
    let header: RawDocument<Value> = parse_value(ctx, "", value)?;
    let mut ok = true;

    match header.api_version.as_deref() {
        Some(API_VERSION) => {}
        Some(other) => {
            ctx.err(
                "apiVersion",
                format!("unsupported apiVersion {other:?}: expected {API_VERSION:?}"),
            );
            ok = false;
        }
        None => {
            ctx.err("apiVersion", format!("required: expected {API_VERSION:?}"));
            ok = false;
        }
    }

    let kinds = || Kind::ALL.map(Kind::as_str).join(", ");
    let kind = match header.kind.as_deref() {
        Some(kind) => {
            let found = Kind::ALL.into_iter().find(|k| k.as_str() == kind);
            if found.is_none() {
                ctx.err(
                    "kind",
                    format!("unknown kind {kind:?}: expected one of {}", kinds()),
                );
            }
            found
        }
        None => {
            ctx.err("kind", format!("required: one of {}", kinds()));
            None
        }
    };

    let metadata = header.metadata;
    let name = match metadata.as_ref().and_then(|m| m.name.as_deref()) {
        Some(name) => match validate::dns_label(name) {
            Ok(()) => Some(name.to_string()),
            Err(e) => {
                ctx.err("metadata.name", e);
                None
            }
        },
        None => {
            ctx.err("metadata.name", "required");
            None
        }
    };
    let namespace = match (kind, metadata.as_ref().and_then(|m| m.namespace.as_deref())) {
        (Some(Kind::Mesh), Some(_)) => {
            ctx.err(
                "metadata.namespace",
                "the Mesh is cluster-wide and has no namespace; remove metadata.namespace",
            );
            None
        }
        (Some(Kind::Mesh), None) => Some(String::new()),
        (_, Some(namespace)) => match validate::dns_label(namespace) {
            Ok(()) => Some(namespace.to_string()),
            Err(e) => {
                ctx.err("metadata.namespace", e);
                None
            }
        },
        (_, None) => Some(DEFAULT_NAMESPACE.to_string()),
    };

    let (Some(kind), Some(name), Some(namespace)) = (kind, name, namespace) else {
        return None;
    };
    let id = ResourceRef::new(namespace, name);
    ctx.resource = Some(resource_label(kind.as_str(), &id));
    // A document with a wrong apiVersion may follow another schema
    // entirely: its spec errors would be noise. It still defines its
    // resource, for duplicate and reference checks.
    let spec = if ok {
        parse_spec(ctx, kind, header.spec.unwrap_or(Value::Null))
    } else {
        None
    };
    Some(Document {
        index,
        kind,
        id,
        spec,
    })
}

fn parse_spec(ctx: &mut Ctx<'_>, kind: Kind, value: Value) -> Option<Spec> {
    // An absent or empty spec is an empty mapping: required fields then
    // get their own "required" errors.
    let value = match value {
        Value::Null => Value::Mapping(Default::default()),
        value => value,
    };
    Some(match kind {
        Kind::Mesh => Spec::Mesh(parse_value(ctx, "spec", value)?),
        Kind::Workload => Spec::Workload(parse_value(ctx, "spec", value)?),
        Kind::Service => Spec::Service(parse_value(ctx, "spec", value)?),
        Kind::TrafficPolicy => Spec::TrafficPolicy(Box::new(parse_value(ctx, "spec", value)?)),
        Kind::AuthorizationPolicy => Spec::AuthorizationPolicy(parse_value(ctx, "spec", value)?),
    })
}

/// Deserializes `value`, reporting a failure with its path below `prefix`.
fn parse_value<T: DeserializeOwned>(ctx: &mut Ctx<'_>, prefix: &str, value: Value) -> Option<T> {
    match serde_path_to_error::deserialize(value) {
        Ok(parsed) => Some(parsed),
        Err(e) => {
            let path = e.path();
            let field = match (prefix, path.iter().next().is_some()) {
                ("", false) => None,
                (prefix, false) => Some(prefix.to_string()),
                ("", true) => Some(path.to_string()),
                (prefix, true) => Some(format!("{prefix}.{path}")),
            };
            // serde names the Rust type it expected; users write YAML.
            let reason = e
                .into_inner()
                .to_string()
                .replace("expected i64", "expected an integer")
                .replace("expected f64", "expected a number");
            ctx.error(field.as_deref(), reason);
            None
        }
    }
}

fn value_type(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Sequence(_) => "a sequence",
        Value::Mapping(_) => "a mapping",
        Value::Tagged(_) => "a tagged value",
    }
}

/// Writes `config` as multi-document YAML that [`load_str`] reads back
/// into an equal `MeshConfig` (for any config `load_str` produced; a
/// hand-built one may hold values, like a zero timeout, that loading
/// refuses). Every default is written out, so the output also shows what
/// the configuration means in full.
pub fn to_yaml(config: &MeshConfig) -> String {
    let mesh_id = ResourceRef::new("", config.mesh.name.as_str());
    let mut documents = vec![document(
        Kind::Mesh,
        &mesh_id,
        RawMeshSpec::from(&config.mesh),
    )];
    for service in &config.services {
        documents.push(document(
            Kind::Service,
            &service.id,
            RawServiceSpec::from(service),
        ));
    }
    for workload in &config.workloads {
        documents.push(document(
            Kind::Workload,
            &workload.id,
            RawWorkloadSpec::from(workload),
        ));
    }
    for policy in &config.traffic_policies {
        documents.push(document(
            Kind::TrafficPolicy,
            &policy.id,
            RawTrafficPolicySpec::from(policy),
        ));
    }
    for policy in &config.authorization_policies {
        let spec = RawAuthorizationPolicySpec::from(policy);
        documents.push(document(Kind::AuthorizationPolicy, &policy.id, spec));
    }
    documents.join("---\n")
}

fn document<S: Serialize>(kind: Kind, id: &ResourceRef, spec: S) -> String {
    let document = RawDocument {
        api_version: Some(API_VERSION.to_string()),
        kind: Some(kind.as_str().to_string()),
        metadata: Some(RawMetadata {
            name: Some(id.name.clone()),
            namespace: (!id.namespace.is_empty()).then(|| id.namespace.clone()),
            labels: None,
            annotations: None,
        }),
        spec: Some(spec),
    };
    // Plain structs of strings, numbers and lists always serialize. Should
    // that ever change, emit a document that loading refuses rather than
    // one it would silently skip.
    serde_norway::to_string(&document).unwrap_or_else(|e| {
        format!(
            "serializationError: {:?}\n",
            format!("cannot serialize {kind} {id}: {e}")
        )
    })
}
