//! The policy as the control plane holds it: one YAML document per
//! resource, derived from the revision log, plus the validated model of
//! the whole set.
//!
//! Every change is planned against the current state first: the new set of
//! documents is validated as a whole with the config crate (the same
//! checks and messages as `outrigger validate`), and only a valid plan
//! becomes a revision. Nothing is ever half applied.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;

use outrigger_config::{ConfigError, ConfigErrors, KINDS, MeshConfig};

use crate::store::{Change, Revision};

/// A resource's identity. The Mesh has an empty namespace.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Key {
    pub kind: String,
    pub namespace: String,
    pub name: String,
}

impl Key {
    pub fn new(kind: &str, namespace: &str, name: &str) -> Self {
        Self {
            kind: kind.to_string(),
            namespace: namespace.to_string(),
            name: name.to_string(),
        }
    }
}

impl fmt::Display for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.namespace.is_empty() {
            write!(f, "{} {}", self.kind, self.name)
        } else {
            write!(f, "{} {}/{}", self.kind, self.namespace, self.name)
        }
    }
}

/// The canonical kind for what users type: `svc`, `services`,
/// `trafficpolicy`, `AuthorizationPolicy`, ...
pub fn kind_named(name: &str) -> Option<&'static str> {
    let lower = name.to_ascii_lowercase();
    let kind = match lower.as_str() {
        "mesh" | "meshes" => "Mesh",
        "workload" | "workloads" | "wl" => "Workload",
        "service" | "services" | "svc" => "Service",
        "trafficpolicy" | "trafficpolicies" | "tp" => "TrafficPolicy",
        "authorizationpolicy" | "authorizationpolicies" | "authz" | "ap" => "AuthorizationPolicy",
        _ => return None,
    };
    Some(kind)
}

pub fn unknown_kind(name: &str) -> String {
    format!(
        "unknown kind {name:?}: expected one of {} (or svc, wl, tp, authz)",
        KINDS.join(", ")
    )
}

/// The current policy.
#[derive(Debug, Clone)]
pub struct PolicyState {
    /// The last revision applied; 0 for an empty store.
    pub revision: u64,
    pub resources: BTreeMap<Key, String>,
    /// The validated model of `resources`.
    pub config: Arc<MeshConfig>,
}

/// Why a change was refused.
#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    /// The body is not something we can read at all.
    #[error("{0}")]
    BadRequest(String),
    /// The documents, or the state they would lead to, are invalid.
    #[error("{0}")]
    Invalid(ConfigErrors),
    #[error("{0}")]
    NotFound(String),
    /// The client based its change on an older revision.
    #[error("{0}")]
    Stale(String),
}

/// A valid change, ready to be written as the next revision.
#[derive(Debug)]
pub struct Plan {
    pub changes: Vec<Change>,
    pub resources: BTreeMap<Key, String>,
    pub config: Arc<MeshConfig>,
}

/// Source label for errors found in stored documents rather than in the
/// request (a change can break a reference from a stored resource).
const STORED: &str = "stored policy";

impl PolicyState {
    pub fn empty() -> Self {
        Self {
            revision: 0,
            resources: BTreeMap::new(),
            config: Arc::new(empty_config()),
        }
    }

    /// Replays the log. Each revision was valid when written, so an error
    /// here means the log was damaged or written by an incompatible build.
    pub fn replay(revisions: &[Revision]) -> anyhow::Result<Self> {
        let Some(last) = revisions.last() else {
            return Ok(Self::empty());
        };
        let resources = resources_at(revisions, last.number);
        let config = validate(&resources, "", &[]).map_err(|e| {
            anyhow::anyhow!(
                "the stored policy at revision {} does not validate:\n{e}",
                last.number
            )
        })?;
        Ok(Self {
            revision: last.number,
            resources,
            config: Arc::new(config),
        })
    }

    /// Plans applying a multi-document YAML stream: each document creates
    /// or replaces its resource.
    pub fn plan_apply(&self, source: &str, yaml: &str) -> Result<Option<Plan>, PlanError> {
        let documents =
            outrigger_config::split_documents(source, yaml).map_err(PlanError::Invalid)?;
        if documents.is_empty() {
            return Err(PlanError::BadRequest(format!(
                "{source}: no documents to apply"
            )));
        }
        let mut resources = self.resources.clone();
        let mut incoming = Vec::new();
        for document in &documents {
            // There is one Mesh. Applying one under another name would
            // silently replace it (its trust domain, its default
            // authorization): refuse, as an apply never deletes.
            if document.kind == "Mesh"
                && let Some(existing) = self.resources.keys().find(|k| k.kind == "Mesh")
                && existing.name != document.id.name
            {
                return Err(PlanError::Invalid(ConfigErrors::from(ConfigError {
                    document: Some(document.index),
                    resource: Some(format!("Mesh {}", document.id.name)),
                    field: Some("metadata.name".to_string()),
                    ..ConfigError::new(
                        source,
                        format!(
                            "there is one Mesh and it is named {:?}: apply it under that name \
                             (or delete Mesh {} first)",
                            existing.name, existing.name
                        ),
                    )
                })));
            }
            let key = Key::new(document.kind, &document.id.namespace, &document.id.name);
            resources.insert(key.clone(), document.yaml.clone());
            incoming.push((document.index, key));
        }
        let config = validate(&resources, source, &incoming).map_err(PlanError::Invalid)?;
        Ok(self.plan_to(resources, config))
    }

    /// Plans deleting one resource.
    pub fn plan_delete(&self, key: &Key) -> Result<Option<Plan>, PlanError> {
        let mut resources = self.resources.clone();
        if resources.remove(key).is_none() {
            return Err(PlanError::NotFound(format!("{key} not found")));
        }
        let config = validate(&resources, "", &[]).map_err(|errors| {
            let mut list = errors.into_vec();
            list.insert(
                0,
                ConfigError::new(
                    "delete",
                    format!("cannot delete {key}: other resources refer to it"),
                ),
            );
            PlanError::Invalid(ConfigErrors::from_vec(list).unwrap_or_else(unreachable_errors))
        })?;
        Ok(self.plan_to(resources, config))
    }

    /// Plans going back to the resources as they were at `revision`.
    pub fn plan_rollback(
        &self,
        revisions: &[Revision],
        revision: u64,
    ) -> Result<Option<Plan>, PlanError> {
        if revision == 0 || revision > self.revision {
            return Err(PlanError::NotFound(format!(
                "no revision {revision}: revisions are 1 to {}",
                self.revision
            )));
        }
        let resources = resources_at(revisions, revision);
        let config = validate(&resources, "", &[]).map_err(PlanError::Invalid)?;
        Ok(self.plan_to(resources, config))
    }

    /// `None` when nothing would change.
    fn plan_to(&self, resources: BTreeMap<Key, String>, config: MeshConfig) -> Option<Plan> {
        let changes = diff(&self.resources, &resources);
        (!changes.is_empty()).then(|| Plan {
            changes,
            resources,
            config: Arc::new(config),
        })
    }

    /// The state after `plan` was written as `revision`.
    pub fn after(&self, revision: u64, plan: Plan) -> Self {
        Self {
            revision,
            resources: plan.resources,
            config: plan.config,
        }
    }
}

fn unreachable_errors() -> ConfigErrors {
    // from_vec only returns None for an empty list, and ours has one entry.
    ConfigErrors::from(ConfigError::new("delete", "invalid"))
}

fn empty_config() -> MeshConfig {
    // An empty stream always loads: it is the default Mesh and nothing else.
    outrigger_config::load_str("empty", "").unwrap_or_else(|_| MeshConfig {
        mesh: Default::default(),
        workloads: Vec::new(),
        services: Vec::new(),
        traffic_policies: Vec::new(),
        authorization_policies: Vec::new(),
    })
}

/// The resources as they were right after `revision`.
pub fn resources_at(revisions: &[Revision], revision: u64) -> BTreeMap<Key, String> {
    let mut resources = BTreeMap::new();
    for r in revisions.iter().take_while(|r| r.number <= revision) {
        for change in &r.changes {
            let key = Key::new(&change.kind, &change.namespace, &change.name);
            match &change.after {
                Some(yaml) => resources.insert(key, yaml.clone()),
                None => resources.remove(&key),
            };
        }
    }
    resources
}

/// The changes that turn `from` into `to`, in key order.
fn diff(from: &BTreeMap<Key, String>, to: &BTreeMap<Key, String>) -> Vec<Change> {
    let mut changes = Vec::new();
    let change = |key: &Key, before: Option<&String>, after: Option<&String>| Change {
        kind: key.kind.clone(),
        namespace: key.namespace.clone(),
        name: key.name.clone(),
        before: before.cloned(),
        after: after.cloned(),
    };
    for (key, before) in from {
        match to.get(key) {
            None => changes.push(change(key, Some(before), None)),
            Some(after) if after != before => changes.push(change(key, Some(before), Some(after))),
            Some(_) => {}
        }
    }
    for (key, after) in to {
        if !from.contains_key(key) {
            changes.push(change(key, None, Some(after)));
        }
    }
    changes.sort_by(|a, b| (&a.kind, &a.namespace, &a.name).cmp(&(&b.kind, &b.namespace, &b.name)));
    changes
}

/// Validates a whole set of documents. The `incoming` documents (with
/// their index in the request) go first, at the positions they had in the
/// request, so that errors in them name the request's document numbers;
/// errors in the other (stored) documents are labelled as such.
fn validate(
    resources: &BTreeMap<Key, String>,
    source: &str,
    incoming: &[(usize, Key)],
) -> Result<MeshConfig, ConfigErrors> {
    let last_index = incoming.iter().map(|(i, _)| *i).max().unwrap_or(0);
    // Placeholders keep document numbers aligned with the request (it may
    // have empty documents, which count).
    let mut documents: Vec<&str> = vec!["null\n"; last_index];
    for (index, key) in incoming {
        if let Some(yaml) = resources.get(key) {
            documents[index - 1] = yaml;
        }
    }
    let incoming_keys: std::collections::HashSet<&Key> = incoming.iter().map(|(_, k)| k).collect();
    documents.extend(
        resources
            .iter()
            .filter(|(k, _)| !incoming_keys.contains(k))
            .map(|(_, yaml)| yaml.as_str()),
    );
    let stream = documents.join("---\n");
    outrigger_config::load_str(source, &stream).map_err(|errors| {
        let list = errors
            .into_vec()
            .into_iter()
            .map(|mut e| {
                if e.document.is_none_or(|d| d > last_index) {
                    e.source = STORED.to_string();
                    e.document = None;
                }
                e
            })
            .collect();
        ConfigErrors::from_vec(list).unwrap_or_else(unreachable_errors)
    })
}

/// A line diff of two documents, `-` and `+` marking what changed, the
/// rest with two spaces: enough for policy-sized YAML.
pub fn line_diff(before: &str, after: &str) -> String {
    let a: Vec<&str> = before.lines().collect();
    let b: Vec<&str> = after.lines().collect();
    // Longest common subsequence table; documents are small, and a huge
    // one falls back to "all removed, all added".
    if a.len().saturating_mul(b.len()) > 4_000_000 {
        let mut out = String::new();
        a.iter().for_each(|l| out.push_str(&format!("- {l}\n")));
        b.iter().for_each(|l| out.push_str(&format!("+ {l}\n")));
        return out;
    }
    let mut lcs = vec![vec![0u32; b.len() + 1]; a.len() + 1];
    for i in (0..a.len()).rev() {
        for j in (0..b.len()).rev() {
            lcs[i][j] = if a[i] == b[j] {
                lcs[i + 1][j + 1] + 1
            } else {
                lcs[i + 1][j].max(lcs[i][j + 1])
            };
        }
    }
    let (mut i, mut j) = (0, 0);
    let mut out = String::new();
    while i < a.len() || j < b.len() {
        if i < a.len() && j < b.len() && a[i] == b[j] {
            out.push_str(&format!("  {}\n", a[i]));
            i += 1;
            j += 1;
        } else if i < a.len() && (j == b.len() || lcs[i + 1][j] >= lcs[i][j + 1]) {
            out.push_str(&format!("- {}\n", a[i]));
            i += 1;
        } else {
            out.push_str(&format!("+ {}\n", b[j]));
            j += 1;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    const API: &str = "apiVersion: outrigger.io/v1alpha1\nkind: Service\nmetadata: {name: api, namespace: shop}\nspec: {endpoints: [{address: '127.0.0.1:1'}]}\n";
    const WEB: &str = "apiVersion: outrigger.io/v1alpha1\nkind: Workload\nmetadata: {name: web, namespace: shop}\nspec: {inbound: [{port: 0, appPort: 1}], outbound: [{port: 0, service: api}]}\n";

    fn commit(state: &PolicyState, log: &mut Vec<Revision>, plan: Plan) -> PolicyState {
        let number = state.revision + 1;
        log.push(Revision {
            number,
            at_unix_ms: 0,
            author: "t".into(),
            action: "apply".into(),
            changes: plan.changes.clone(),
        });
        state.after(number, plan)
    }

    #[test]
    fn apply_update_delete_and_replay() {
        let mut log = Vec::new();
        let s0 = PolicyState::empty();
        let plan = s0
            .plan_apply("a.yaml", &format!("{API}---\n{WEB}"))
            .unwrap()
            .unwrap();
        assert_eq!(plan.changes.len(), 2);
        assert!(plan.changes.iter().all(|c| c.op() == "created"));
        let s1 = commit(&s0, &mut log, plan);

        // The same documents again: nothing to do.
        assert!(s1.plan_apply("a.yaml", API).unwrap().is_none());

        let plan = s1
            .plan_apply("b.yaml", &API.replace("127.0.0.1:1", "127.0.0.1:2"))
            .unwrap()
            .unwrap();
        assert_eq!(plan.changes.len(), 1);
        assert_eq!(plan.changes[0].op(), "updated");
        let s2 = commit(&s1, &mut log, plan);
        assert_eq!(s2.config.services[0].endpoints[0].address.port(), 2);

        // The Service is still referenced by the Workload.
        let err = s2
            .plan_delete(&Key::new("Service", "shop", "api"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("cannot delete Service shop/api"), "{err}");
        assert!(
            err.contains(
                "stored policy: Workload shop/web: spec.outbound[0].service: no Service shop/api"
            ),
            "{err}"
        );

        let plan = s2
            .plan_delete(&Key::new("Workload", "shop", "web"))
            .unwrap()
            .unwrap();
        let s3 = commit(&s2, &mut log, plan);
        assert_eq!(s3.resources.len(), 1);

        let replayed = PolicyState::replay(&log).unwrap();
        assert_eq!(replayed.revision, 3);
        assert_eq!(replayed.resources, s3.resources);

        // Back to revision 1: the endpoint port and the Workload return.
        let plan = s3.plan_rollback(&log, 1).unwrap().unwrap();
        let s4 = commit(&s3, &mut log, plan);
        assert_eq!(s4.resources, s1.resources);
        assert!(s4.plan_rollback(&log, 9).is_err());
    }

    #[test]
    fn errors_name_the_request_document_or_the_stored_resource() {
        let s0 = PolicyState::empty();
        // Document 2 (after an empty one) refers to a Service that is not there.
        let err = s0
            .plan_apply("x.yaml", &format!("---\n---\n{WEB}"))
            .unwrap_err();
        let PlanError::Invalid(errors) = err else {
            panic!("expected invalid")
        };
        let errors = errors.into_vec();
        assert_eq!(errors.len(), 1);
        assert_eq!(errors[0].source, "x.yaml");
        assert_eq!(errors[0].document, Some(2));
        assert_eq!(errors[0].field.as_deref(), Some("spec.outbound[0].service"));

        let err = s0.plan_apply("x.yaml", "").unwrap_err();
        assert!(matches!(err, PlanError::BadRequest(_)));
    }

    #[test]
    fn the_mesh_keeps_its_name() {
        let mut log = Vec::new();
        let s0 = PolicyState::empty();
        let mesh = |name: &str| {
            format!(
                "apiVersion: outrigger.io/v1alpha1\nkind: Mesh\nmetadata: {{name: {name}}}\nspec: {{}}\n"
            )
        };
        let plan = s0.plan_apply("m", &mesh("one")).unwrap().unwrap();
        let s1 = commit(&s0, &mut log, plan);
        let err = s1.plan_apply("m", &mesh("two")).unwrap_err().to_string();
        assert!(
            err.contains(
                "document 1 (Mesh two): metadata.name: there is one Mesh and it is named \"one\""
            ),
            "{err}"
        );
        let plan = s1
            .plan_apply("m", &mesh("one").replace("{}", "{trustDomain: x.example}"))
            .unwrap()
            .unwrap();
        let s2 = commit(&s1, &mut log, plan);
        assert_eq!(s2.resources.len(), 1);
        assert_eq!(s2.config.mesh.trust_domain, "x.example");
    }

    #[test]
    fn key_order_and_layout_are_not_changes() {
        let mut log = Vec::new();
        let s0 = PolicyState::empty();
        let plan = s0.plan_apply("a", API).unwrap().unwrap();
        let s1 = commit(&s0, &mut log, plan);
        let reordered = "spec:\n  endpoints:\n  - address: 127.0.0.1:1\nmetadata: {namespace: shop, name: api}\nkind: Service\napiVersion: outrigger.io/v1alpha1\n";
        assert!(s1.plan_apply("b", reordered).unwrap().is_none());
    }

    #[test]
    fn line_diff_marks_changed_lines() {
        let d = line_diff("a\nb\nc\n", "a\nx\nc\n");
        assert_eq!(d, "  a\n- b\n+ x\n  c\n");
        assert_eq!(line_diff("", "a\n"), "+ a\n");
    }

    #[test]
    fn kinds_have_short_names() {
        assert_eq!(kind_named("svc"), Some("Service"));
        assert_eq!(kind_named("TrafficPolicies"), Some("TrafficPolicy"));
        assert_eq!(kind_named("pods"), None);
    }
}
