//! Errors users see: each one says where (file, document, resource, field)
//! and why.

use std::fmt;
use std::ops::Deref;

/// One problem in a configuration source.
///
/// Displays as
/// `mesh.yaml: document 3 (Service shop/api): spec.endpoints[1].address: <reason>`,
/// leaving out the parts that are `None`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// The file path or source name.
    pub source: String,
    /// 1-based index of the YAML document in the source.
    pub document: Option<usize>,
    /// The resource the document defines, like `Service shop/api`.
    pub resource: Option<String>,
    /// The path of the offending field, like `spec.endpoints[1].address`.
    pub field: Option<String>,
    pub reason: String,
}

impl ConfigError {
    /// An error about the source as a whole (it cannot be read, say).
    pub fn new(source: impl Into<String>, reason: impl Into<String>) -> Self {
        Self {
            source: source.into(),
            document: None,
            resource: None,
            field: None,
            reason: reason.into(),
        }
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:", self.source)?;
        match (self.document, &self.resource) {
            (Some(doc), Some(res)) => write!(f, " document {doc} ({res}):")?,
            (Some(doc), None) => write!(f, " document {doc}:")?,
            (None, Some(res)) => write!(f, " {res}:")?,
            (None, None) => {}
        }
        if let Some(field) = &self.field {
            write!(f, " {field}:")?;
        }
        write!(f, " {}", self.reason)
    }
}

// Written by hand rather than derived with thiserror: thiserror treats a
// field named `source` as the underlying cause, and ours is a file name.
impl std::error::Error for ConfigError {}

/// Every problem found in a configuration source; never empty.
///
/// Displays one error per line.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}", lines(.0))]
pub struct ConfigErrors(pub(crate) Vec<ConfigError>);

fn lines(errors: &[ConfigError]) -> String {
    errors
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("\n")
}

impl ConfigErrors {
    /// `None` when there are no errors, so a `ConfigErrors` is never empty.
    pub fn from_vec(errors: Vec<ConfigError>) -> Option<Self> {
        (!errors.is_empty()).then_some(Self(errors))
    }

    pub fn into_vec(self) -> Vec<ConfigError> {
        self.0
    }
}

impl From<ConfigError> for ConfigErrors {
    fn from(error: ConfigError) -> Self {
        Self(vec![error])
    }
}

impl Deref for ConfigErrors {
    type Target = [ConfigError];

    fn deref(&self) -> &[ConfigError] {
        &self.0
    }
}

impl IntoIterator for ConfigErrors {
    type Item = ConfigError;
    type IntoIter = std::vec::IntoIter<ConfigError>;

    fn into_iter(self) -> Self::IntoIter {
        self.0.into_iter()
    }
}

impl<'a> IntoIterator for &'a ConfigErrors {
    type Item = &'a ConfigError;
    type IntoIter = std::slice::Iter<'a, ConfigError>;

    fn into_iter(self) -> Self::IntoIter {
        self.0.iter()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn display_omits_missing_parts() {
        let full = ConfigError {
            source: "mesh.yaml".into(),
            document: Some(3),
            resource: Some("Service shop/api".into()),
            field: Some("spec.endpoints[1].address".into()),
            reason: r#"not a socket address "10.0.0.7": expected IP:PORT like 10.0.0.7:4143"#
                .into(),
        };
        assert_eq!(
            full.to_string(),
            r#"mesh.yaml: document 3 (Service shop/api): spec.endpoints[1].address: not a socket address "10.0.0.7": expected IP:PORT like 10.0.0.7:4143"#
        );
        let bare = ConfigError::new("mesh.yaml", "cannot read file");
        assert_eq!(bare.to_string(), "mesh.yaml: cannot read file");
        let doc_only = ConfigError {
            document: Some(2),
            field: Some("kind".into()),
            ..bare.clone()
        };
        assert_eq!(
            doc_only.to_string(),
            "mesh.yaml: document 2: kind: cannot read file"
        );
    }

    #[test]
    fn errors_display_one_per_line() {
        let a = ConfigError::new("a.yaml", "one");
        let b = ConfigError::new("a.yaml", "two");
        let errors = ConfigErrors::from_vec(vec![a, b]).unwrap();
        assert_eq!(errors.to_string(), "a.yaml: one\na.yaml: two");
        assert_eq!(errors.len(), 2);
        assert!(ConfigErrors::from_vec(Vec::new()).is_none());
    }
}
