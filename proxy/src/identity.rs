//! This sidecar's workload identity: its certificate (an X.509 SVID whose
//! one URI SAN is a SPIFFE ID), its private key, and the trust bundle that
//! peers' certificates must chain to.
//!
//! Both live in arc-swaps: a renewed certificate or a new bundle reaches the
//! next handshake without a lock or a restart, and connections already
//! established keep the certificate they were made with. `tls` reads them.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwapOption;
use rustls::RootCertStore;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::server::danger::ClientCertVerifier;
use rustls::sign::CertifiedKey;
use serde::Serialize;
use x509_parser::extensions::GeneralName;

/// Why credentials or a bundle could not be used.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{what}: {reason}")]
    Invalid { what: String, reason: String },
}

fn invalid(what: impl Into<String>, reason: impl ToString) -> IdentityError {
    IdentityError::Invalid {
        what: what.into(),
        reason: reason.to_string(),
    }
}

fn read(path: &Path) -> Result<Vec<u8>, IdentityError> {
    std::fs::read(path).map_err(|source| IdentityError::Read {
        path: path.display().to_string(),
        source,
    })
}

/// A certificate chain with its key, as rustls presents it, and what it
/// says about us.
#[derive(Debug)]
pub struct Credentials {
    pub certified: Arc<CertifiedKey>,
    pub spiffe_id: String,
    /// Hex, as `openssl x509 -serial` prints it.
    pub serial: String,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
}

impl Credentials {
    /// `chain_pem`: the leaf first, then any intermediates. `key_pem`: its
    /// PKCS#8, SEC1 or PKCS#1 private key. `what` names the source in errors.
    pub fn from_pem(what: &str, chain_pem: &[u8], key_pem: &[u8]) -> Result<Self, IdentityError> {
        let chain = CertificateDer::pem_slice_iter(chain_pem)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| invalid(what, format!("bad certificate PEM: {e}")))?;
        let Some(leaf) = chain.first() else {
            return Err(invalid(what, "no certificate in the PEM"));
        };
        let facts = CertFacts::parse(leaf).map_err(|e| invalid(what, e))?;
        let spiffe_id = facts.spiffe_id.map_err(|e| invalid(what, e))?;
        let key = PrivateKeyDer::from_pem_slice(key_pem)
            .map_err(|e| invalid(what, format!("bad private key PEM: {e}")))?;
        let signer = rustls::crypto::ring::sign::any_supported_type(&key)
            .map_err(|e| invalid(what, format!("unsupported private key: {e}")))?;
        let certified = CertifiedKey::new(chain, signer);
        certified.keys_match().map_err(|e| {
            invalid(
                what,
                format!("the key does not belong to the certificate: {e}"),
            )
        })?;
        Ok(Self {
            certified: Arc::new(certified),
            spiffe_id,
            serial: facts.serial,
            not_before: facts.not_before,
            not_after: facts.not_after,
        })
    }

    pub fn from_files(cert: &Path, key: &Path) -> Result<Self, IdentityError> {
        let what = format!("{} with {}", cert.display(), key.display());
        Self::from_pem(&what, &read(cert)?, &read(key)?)
    }

    /// What `/config` shows: never the key.
    pub fn summary(&self) -> CredentialsSummary {
        CredentialsSummary {
            spiffe_id: self.spiffe_id.clone(),
            serial: self.serial.clone(),
            not_before: unix_seconds(self.not_before),
            not_after: unix_seconds(self.not_after),
        }
    }
}

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct CredentialsSummary {
    pub spiffe_id: String,
    pub serial: String,
    /// Unix seconds.
    pub not_before: u64,
    pub not_after: u64,
}

fn unix_seconds(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// The roots peers' certificates must chain to. More than one root is
/// normal during a root rotation.
#[derive(Debug)]
pub struct TrustBundle {
    pub roots: Arc<RootCertStore>,
    /// Chain checks for client certificates (inbound), built once per
    /// bundle.
    pub client_verifier: Arc<dyn ClientCertVerifier>,
    pub pem: String,
}

impl TrustBundle {
    /// Whether `credentials` chain to this bundle, as peers will check:
    /// a missing intermediate or a certificate from another CA would
    /// otherwise only show as every handshake failing.
    pub fn check(&self, credentials: &Credentials) -> Result<(), IdentityError> {
        let chain = &credentials.certified.cert;
        let Some((leaf, intermediates)) = chain.split_first() else {
            return Err(invalid("the certificate", "empty chain"));
        };
        self.client_verifier
            .verify_client_cert(leaf, intermediates, rustls::pki_types::UnixTime::now())
            .map(|_| ())
            .map_err(|e| {
                invalid(
                    "the certificate",
                    format!("is not valid against the trust bundle: {e}"),
                )
            })
    }

    pub fn from_pem(what: &str, pem: &[u8]) -> Result<Self, IdentityError> {
        let certs = CertificateDer::pem_slice_iter(pem)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| invalid(what, format!("bad certificate PEM: {e}")))?;
        if certs.is_empty() {
            return Err(invalid(what, "no certificate in the trust bundle"));
        }
        let mut roots = RootCertStore::empty();
        for (i, cert) in certs.into_iter().enumerate() {
            roots
                .add(cert)
                .map_err(|e| invalid(what, format!("certificate {}: {e}", i + 1)))?;
        }
        let roots = Arc::new(roots);
        let client_verifier =
            WebPkiClientVerifier::builder_with_provider(roots.clone(), crate::tls::provider())
                .build()
                .map_err(|e| invalid(what, e))?;
        Ok(Self {
            roots,
            client_verifier,
            pem: String::from_utf8_lossy(pem).into_owned(),
        })
    }

    pub fn from_file(path: &Path) -> Result<Self, IdentityError> {
        Self::from_pem(&path.display().to_string(), &read(path)?)
    }
}

/// The live identity of this sidecar. Empty until the first certificate
/// arrives: handshakes fail (and `/ready` is false) until then.
#[derive(Debug)]
pub struct Identity {
    credentials: ArcSwapOption<Credentials>,
    bundle: ArcSwapOption<TrustBundle>,
    /// The mesh's trust domain, from the policy: clients outside it are
    /// refused.
    trust_domain: ArcSwapOption<String>,
    /// Bumped whenever the bundle changes: connections verified against
    /// the old one are closed (gracefully) so their peers handshake again.
    bundle_version: tokio::sync::watch::Sender<u64>,
}

impl Default for Identity {
    fn default() -> Self {
        Self {
            credentials: ArcSwapOption::empty(),
            bundle: ArcSwapOption::empty(),
            trust_domain: ArcSwapOption::empty(),
            bundle_version: tokio::sync::watch::channel(0).0,
        }
    }
}

impl Identity {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn trust_domain(&self) -> Option<Arc<String>> {
        self.trust_domain.load_full()
    }

    /// Set from each policy applied.
    pub fn set_trust_domain(&self, domain: &str) {
        if self.trust_domain.load().as_deref().map(String::as_str) != Some(domain) {
            self.trust_domain.store(Some(Arc::new(domain.to_string())));
        }
    }

    /// Changes when the trust bundle does.
    pub fn bundle_changes(&self) -> tokio::sync::watch::Receiver<u64> {
        self.bundle_version.subscribe()
    }

    pub fn credentials(&self) -> Option<Arc<Credentials>> {
        self.credentials.load_full()
    }

    pub fn bundle(&self) -> Option<Arc<TrustBundle>> {
        self.bundle.load_full()
    }

    /// Takes effect for the next handshake.
    pub fn set_credentials(&self, credentials: Credentials) {
        let not_after = unix_seconds(credentials.not_after);
        tracing::info!(spiffe_id = %credentials.spiffe_id, serial = %credentials.serial, not_after, "certificate in use");
        self.credentials.store(Some(Arc::new(credentials)));
        self.record_expiry();
    }

    /// Sets the expiry gauge (again: certificates read before the metrics
    /// recorder was installed are recorded once it is).
    pub fn record_expiry(&self) {
        if let Some(credentials) = self.credentials.load().as_ref() {
            metrics::gauge!(crate::metrics::CERT_EXPIRY)
                .set(unix_seconds(credentials.not_after) as f64);
        }
    }

    pub fn set_bundle(&self, bundle: TrustBundle) {
        let changed = self
            .bundle
            .load()
            .as_ref()
            .is_none_or(|current| current.pem != bundle.pem);
        self.bundle.store(Some(Arc::new(bundle)));
        if changed {
            self.bundle_version.send_modify(|v| *v += 1);
        }
    }

    /// A certificate that is valid now, and a bundle.
    pub fn is_ready(&self) -> bool {
        let now = SystemTime::now();
        let valid = self
            .credentials
            .load()
            .as_ref()
            .is_some_and(|c| c.not_before <= now && now < c.not_after);
        valid && self.bundle.load().is_some()
    }

    /// How long the current certificate has left; `None` without one.
    pub fn remaining(&self) -> Option<Duration> {
        let credentials = self.credentials.load();
        let not_after = credentials.as_ref()?.not_after;
        Some(
            not_after
                .duration_since(SystemTime::now())
                .unwrap_or_default(),
        )
    }
}

/// What a certificate says, as far as we care.
pub struct CertFacts {
    /// The SPIFFE ID, or why there is not exactly one.
    pub spiffe_id: Result<String, String>,
    pub serial: String,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
}

impl CertFacts {
    pub fn parse(der: &CertificateDer<'_>) -> Result<Self, String> {
        let (_, cert) = x509_parser::parse_x509_certificate(der.as_ref())
            .map_err(|e| format!("not an X.509 certificate: {e}"))?;
        let spiffe_id = match cert.subject_alternative_name() {
            Err(e) => Err(format!("unreadable subjectAltName: {e}")),
            Ok(None) => Err("the certificate has no URI SAN (no SPIFFE ID)".to_string()),
            Ok(Some(san)) => {
                let uris: Vec<&str> = san
                    .value
                    .general_names
                    .iter()
                    .filter_map(|name| match name {
                        GeneralName::URI(uri) => Some(*uri),
                        _ => None,
                    })
                    .collect();
                match uris.as_slice() {
                    [uri] => outrigger_config::check_spiffe_id(uri).map(|()| (*uri).to_string()),
                    [] => Err("the certificate has no URI SAN (no SPIFFE ID)".to_string()),
                    more => Err(format!(
                        "the certificate has {} URI SANs; an SVID has exactly one",
                        more.len()
                    )),
                }
            }
        };
        let validity = cert.validity();
        let time = |t: &x509_parser::time::ASN1Time| {
            let secs = t.timestamp();
            UNIX_EPOCH + Duration::from_secs(u64::try_from(secs).unwrap_or(0))
        };
        Ok(Self {
            spiffe_id,
            serial: cert.raw_serial_as_string().replace(':', ""),
            not_before: time(&validity.not_before),
            not_after: time(&validity.not_after),
        })
    }
}
