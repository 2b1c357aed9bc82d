//! Outrigger's policy vocabulary: the resource types, and loading them
//! from Kubernetes-shaped YAML.
//!
//! Loading goes in two steps, with two sets of types:
//!
//! - **raw** (`raw.rs`): serde types that mirror the YAML exactly, field for
//!   field, refusing unknown keys. Nearly everything is optional there, so
//!   that parsing only fails on shape (a typo in a key, a list where a
//!   number belongs) and everything else is left to validation.
//! - **validated** ([`model`]): what the rest of Outrigger uses. Defaults
//!   are filled in, every field is checked, and references between
//!   documents resolve, so holders of a [`MeshConfig`] need not re-check.
//!
//! Keeping them apart keeps each simple: the raw types say what users may
//! write (and are what [`to_yaml`] writes), the model says what the proxy
//! and control plane can rely on, and `validate.rs` is the one place that
//! turns one into the other, reporting every problem it finds with the
//! document, resource and field path it concerns ([`ConfigError`]).
//!
//! ```
//! let yaml = r#"
//! apiVersion: outrigger.io/v1alpha1
//! kind: Service
//! metadata: {name: api, namespace: shop}
//! spec:
//!   endpoints: [{address: "127.0.0.1:4143"}]
//! "#;
//! let config = outrigger_config::load_str("inline", yaml).unwrap();
//! assert_eq!(config.services[0].id.to_string(), "shop/api");
//! assert_eq!(config.mesh.trust_domain, "cluster.local");
//! ```

pub mod authz;
mod duration;
mod error;
mod load;
pub mod model;
mod raw;
mod validate;

pub mod timefmt;

pub use duration::parse_duration;
pub use error::{ConfigError, ConfigErrors};
pub use load::{KINDS, SourceDocument, load_file, load_str, split_documents, to_yaml};

/// A configuration version: FNV-1a of the text, in hex. Stable across
/// builds and processes, so the sidecar and the control plane agree on it;
/// not a security boundary.
pub fn digest(bytes: &[u8]) -> String {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        hash ^= u64::from(*b);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    format!("{hash:016x}")
}

/// The gRPC API between sidecars and the control plane (`proto/`).
pub mod proto {
    /// Policy discovery: the snapshot stream with ACK/NACK.
    // Generated code: its style is tonic's, not ours.
    #[allow(clippy::all, unused_qualifications)]
    pub mod discovery {
        tonic::include_proto!("outrigger.discovery.v1");
    }
    #[allow(clippy::all, unused_qualifications)]
    pub mod identity {
        tonic::include_proto!("outrigger.identity.v1");
    }
}
pub use model::*;
pub use validate::parse_workload_ref;

/// Whether `id` is a well-formed SPIFFE ID (`spiffe://<trust-domain>/<path>`),
/// and why not.
pub fn check_spiffe_id(id: &str) -> Result<(), String> {
    validate::spiffe_id(id, None)
}
