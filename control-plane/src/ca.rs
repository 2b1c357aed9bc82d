//! The mesh's certificate authority: signs short-lived X.509 SVIDs for the
//! CSRs sidecars send with their bootstrap token.
//!
//! By default it makes its own root (ECDSA P-256, ten years) in the data
//! dir on first start: `ca.crt`, and `ca.key` with mode 0600. An operator
//! can bring a root or an intermediate instead (`--ca-cert`, `--ca-key`),
//! and a trust bundle of several roots (`--trust-bundle`) for a root
//! rotation's overlap. Sidecars get the bundle with every snapshot and
//! every certificate.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DnType,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};

const CERT_FILE: &str = "ca.crt";
const KEY_FILE: &str = "ca.key";

/// Where the CA comes from.
#[derive(Clone, Debug, Default)]
pub struct CaOptions {
    /// The operator's CA certificate (PEM; an intermediate may be followed
    /// by its issuers) and its key. Both or neither.
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    /// The roots sidecars trust (PEM). Default: the CA certificate itself,
    /// which must then be a root.
    pub trust_bundle: Option<PathBuf>,
}

/// Why a CSR got no certificate.
#[derive(Debug, thiserror::Error)]
pub enum IssueError {
    #[error("the CSR cannot be read: {0}")]
    BadCsr(String),
    #[error("the CSR asks for {asked}, but the token is for {expected}")]
    WrongIdentity { asked: String, expected: String },
    #[error("cannot sign the certificate: {0}")]
    Sign(String),
}

/// A signed certificate.
#[derive(Debug)]
pub struct Issued {
    /// The certificate, then the CA's chain (PEM).
    pub chain_pem: String,
    pub not_after: SystemTime,
}

/// The CA the server made for itself, as files (backup and restore).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CaFiles {
    pub cert_pem: String,
    pub key_pem: String,
}

impl CaFiles {
    /// Writes them into a data dir that has no CA yet; one that has the
    /// same CA is left alone, one with another CA is an error.
    pub fn restore_into(&self, data_dir: &Path) -> anyhow::Result<()> {
        let cert = data_dir.join(CERT_FILE);
        match std::fs::read_to_string(&cert) {
            Ok(existing) if existing == self.cert_pem => Ok(()),
            Ok(_) => anyhow::bail!(
                "{} holds another CA than the backup's; restore into a fresh data dir",
                cert.display()
            ),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                crate::auth::write_private(&data_dir.join(KEY_FILE), self.key_pem.as_bytes())?;
                std::fs::write(&cert, &self.cert_pem)
                    .with_context(|| format!("cannot write {}", cert.display()))?;
                tracing::info!(cert = %cert.display(), "restored the mesh CA from the backup");
                Ok(())
            }
            Err(e) => Err(e).with_context(|| format!("cannot read {}", cert.display())),
        }
    }
}

pub struct Ca {
    issuer: Issuer<'static, KeyPair>,
    /// The files of a CA the server made for itself; `None` for an
    /// operator's.
    own: Option<CaFiles>,
    /// The CA certificate and whatever chain came with it.
    chain_pem: String,
    /// What goes after each workload certificate: the chain without its
    /// root (peers have the root in their bundle).
    intermediates_pem: String,
    bundle_pem: String,
}

impl std::fmt::Debug for Ca {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the key.
        f.debug_struct("Ca").finish_non_exhaustive()
    }
}

impl Ca {
    /// The operator's CA if given, else the one in `data_dir`, made on
    /// first start.
    pub fn load_or_create(data_dir: &Path, options: &CaOptions) -> anyhow::Result<Self> {
        let (cert_path, key_path, own) = match (&options.cert, &options.key) {
            (Some(cert), Some(key)) => (cert.clone(), key.clone(), false),
            (None, None) => {
                let cert = data_dir.join(CERT_FILE);
                let key = data_dir.join(KEY_FILE);
                if !cert.exists() && !key.exists() {
                    create_root(&cert, &key)?;
                }
                (cert, key, true)
            }
            _ => anyhow::bail!("--ca-cert and --ca-key go together"),
        };
        let chain_pem = std::fs::read_to_string(&cert_path)
            .with_context(|| format!("cannot read CA certificate {}", cert_path.display()))?;
        let key_pem = std::fs::read_to_string(&key_path)
            .with_context(|| format!("cannot read CA key {}", key_path.display()))?;
        let key = KeyPair::from_pem(&key_pem).with_context(|| {
            format!(
                "{}: not a usable private key (a PKCS#8 PEM is expected; `openssl pkcs8 -topk8 -nocrypt` converts others)",
                key_path.display()
            )
        })?;
        check_key_matches(&chain_pem, &key).with_context(|| {
            format!(
                "{} is not the key of {}",
                key_path.display(),
                cert_path.display()
            )
        })?;
        let issuer = Issuer::from_ca_cert_pem(&chain_pem, key)
            .with_context(|| format!("{}: not a usable CA certificate", cert_path.display()))?;
        let bundle_pem = match &options.trust_bundle {
            Some(path) => std::fs::read_to_string(path)
                .with_context(|| format!("cannot read trust bundle {}", path.display()))?,
            None => {
                let first = first_pem_block(&chain_pem)
                    .with_context(|| format!("{}: no certificate", cert_path.display()))?;
                anyhow::ensure!(
                    without_roots(&first).is_empty(),
                    "{} is not a root (self-signed) certificate: give the roots sidecars should trust with --trust-bundle",
                    cert_path.display()
                );
                first
            }
        };
        let ca = Self {
            issuer,
            own: own.then(|| CaFiles {
                cert_pem: chain_pem.clone(),
                key_pem,
            }),
            intermediates_pem: without_roots(&chain_pem),
            chain_pem,
            bundle_pem,
        };
        ca.check_chains_to_bundle().with_context(|| {
            format!("{} does not chain to the trust bundle", cert_path.display())
        })?;
        Ok(ca)
    }

    /// The CA's files if the server made it (for backups).
    pub fn own_files(&self) -> Option<CaFiles> {
        self.own.clone()
    }

    /// The roots sidecars trust.
    pub fn bundle_pem(&self) -> &str {
        &self.bundle_pem
    }

    /// Signs a certificate for `spiffe_id`, valid for `ttl`, for the key
    /// in `csr_pem`. The CSR must ask for exactly that SPIFFE ID; all else
    /// in it (subject, extensions) is ignored: the CA decides.
    pub fn issue(
        &self,
        csr_pem: &str,
        spiffe_id: &str,
        ttl: Duration,
    ) -> Result<Issued, IssueError> {
        let mut csr = CertificateSigningRequestParams::from_pem(csr_pem)
            .map_err(|e| IssueError::BadCsr(e.to_string()))?;
        let uris: Vec<String> = csr
            .params
            .subject_alt_names
            .iter()
            .filter_map(|san| match san {
                SanType::URI(uri) => Some(uri.as_str().to_string()),
                _ => None,
            })
            .collect();
        match uris.as_slice() {
            [one] if one == spiffe_id => {}
            [one] => {
                return Err(IssueError::WrongIdentity {
                    asked: one.clone(),
                    expected: spiffe_id.to_string(),
                });
            }
            _ => {
                return Err(IssueError::BadCsr(format!(
                    "it must carry exactly one URI SAN (the SPIFFE ID), it has {}",
                    uris.len()
                )));
            }
        }
        let now = time::OffsetDateTime::now_utc();
        let ttl = time::Duration::try_from(ttl).map_err(|e| IssueError::Sign(e.to_string()))?;
        let until = now
            .checked_add(ttl)
            .ok_or_else(|| IssueError::Sign(format!("a lifetime of {ttl} is out of range")))?;
        let mut params = CertificateParams::default();
        params.subject_alt_names =
            vec![SanType::URI(spiffe_id.try_into().map_err(
                |e: rcgen::Error| IssueError::Sign(e.to_string()),
            )?)];
        params.distinguished_name = rcgen::DistinguishedName::new();
        params.serial_number = Some(SerialNumber::from(random_serial()));
        // A minute of slack for clocks a little behind ours.
        params.not_before = now - time::Duration::minutes(1);
        params.not_after = until;
        // An end-entity certificate, never a CA.
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.use_authority_key_identifier_extension = true;
        csr.params = params;
        let cert = csr
            .signed_by(&self.issuer)
            .map_err(|e| IssueError::Sign(e.to_string()))?;
        let not_after =
            UNIX_EPOCH + Duration::from_secs(u64::try_from(until.unix_timestamp()).unwrap_or(0));
        Ok(Issued {
            chain_pem: format!("{}{}", cert.pem(), self.intermediates_pem),
            not_after,
        })
    }

    /// Signs a throwaway certificate and checks it against the bundle the
    /// way a sidecar will, so a mismatched CA and bundle fail at start, not
    /// at every handshake.
    fn check_chains_to_bundle(&self) -> anyhow::Result<()> {
        use rustls::pki_types::pem::PemObject;
        use rustls::pki_types::{CertificateDer, UnixTime};
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.subject_alt_names = vec![SanType::URI("spiffe://check/self".try_into()?)];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        let leaf = params.signed_by(&key, &self.issuer)?;
        let mut roots = rustls::RootCertStore::empty();
        for cert in CertificateDer::pem_slice_iter(self.bundle_pem.as_bytes()) {
            roots.add(cert?)?;
        }
        anyhow::ensure!(!roots.is_empty(), "the trust bundle holds no certificate");
        let intermediates: Vec<CertificateDer<'static>> =
            CertificateDer::pem_slice_iter(self.chain_pem.as_bytes()).collect::<Result<_, _>>()?;
        #[allow(deprecated)]
        let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
        let verifier =
            rustls::server::WebPkiClientVerifier::builder_with_provider(roots.into(), provider)
                .build()?;
        verifier.verify_client_cert(leaf.der(), &intermediates, UnixTime::now())?;
        Ok(())
    }
}

/// A new root: P-256, ten years, key file 0600.
fn create_root(cert_path: &Path, key_path: &Path) -> anyhow::Result<()> {
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params
        .distinguished_name
        .push(DnType::CommonName, "Outrigger mesh root CA");
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now - time::Duration::minutes(1);
    params.not_after = now + time::Duration::days(3650);
    params.serial_number = Some(SerialNumber::from(random_serial()));
    let cert = params.self_signed(&key)?;
    crate::auth::write_private(key_path, key.serialize_pem().as_bytes())
        .with_context(|| format!("cannot write {}", key_path.display()))?;
    std::fs::write(cert_path, cert.pem())
        .with_context(|| format!("cannot write {}", cert_path.display()))?;
    tracing::info!(cert = %cert_path.display(), "created the mesh root CA");
    Ok(())
}

/// 16 random bytes, top bit clear (a positive DER integer).
fn random_serial() -> Vec<u8> {
    let mut bytes = [0u8; 16];
    // getrandom failing means no OS randomness at all; a time-based
    // serial is still unique enough for one CA.
    if getrandom::fill(&mut bytes).is_err() {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        bytes = nanos.to_be_bytes();
    }
    bytes[0] &= 0x7f;
    bytes.to_vec()
}

/// The PEM certificates in `pem` that are not self-signed.
fn without_roots(pem: &str) -> String {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    let mut out = String::new();
    for (der, block) in CertificateDer::pem_slice_iter(pem.as_bytes()).zip(pem_blocks(pem)) {
        let Ok(der) = der else { continue };
        let self_signed = x509_parser::parse_x509_certificate(der.as_ref())
            .is_ok_and(|(_, cert)| cert.subject() == cert.issuer());
        if !self_signed {
            out.push_str(&block);
        }
    }
    out
}

fn pem_blocks(pem: &str) -> Vec<String> {
    const END: &str = "-----END CERTIFICATE-----";
    let mut blocks = Vec::new();
    let mut rest = pem;
    while let Some(start) = rest.find("-----BEGIN CERTIFICATE-----") {
        let Some(end) = rest[start..].find(END) else {
            break;
        };
        let end = start + end + END.len();
        blocks.push(format!("{}\n", &rest[start..end]));
        rest = &rest[end..];
    }
    blocks
}

/// The first certificate's public key must be `key`'s.
fn check_key_matches(chain_pem: &str, key: &KeyPair) -> anyhow::Result<()> {
    use rcgen::PublicKeyData;
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    let der = CertificateDer::pem_slice_iter(chain_pem.as_bytes())
        .next()
        .context("no certificate")??;
    let (_, cert) = x509_parser::parse_x509_certificate(der.as_ref())
        .map_err(|e| anyhow::anyhow!("not an X.509 certificate: {e}"))?;
    anyhow::ensure!(
        cert.public_key().subject_public_key.data.as_ref() == key.der_bytes(),
        "the public keys differ"
    );
    Ok(())
}

fn first_pem_block(pem: &str) -> Option<String> {
    pem_blocks(pem).into_iter().next()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn csr_for(id: &str) -> String {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.subject_alt_names = vec![SanType::URI(id.try_into().unwrap())];
        params.serialize_request(&key).unwrap().pem().unwrap()
    }

    #[test]
    fn a_fresh_data_dir_gets_a_root_that_signs_matching_csrs_only() {
        let dir = tempfile::tempdir().unwrap();
        let ca = Ca::load_or_create(dir.path(), &CaOptions::default()).unwrap();
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.path().join(KEY_FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let id = "spiffe://cluster.local/ns/shop/sa/web";
        let issued = ca
            .issue(&csr_for(id), id, Duration::from_secs(3600))
            .unwrap();
        // The leaf alone: peers have the root.
        assert!(issued.chain_pem.matches("BEGIN CERTIFICATE").count() == 1);
        let left = issued.not_after.duration_since(SystemTime::now()).unwrap();
        assert!(left > Duration::from_secs(3500) && left <= Duration::from_secs(3600));
        let err = ca
            .issue(
                &csr_for("spiffe://cluster.local/ns/shop/sa/admin"),
                id,
                Duration::from_secs(60),
            )
            .unwrap_err();
        assert!(matches!(err, IssueError::WrongIdentity { .. }), "{err}");
        assert!(matches!(
            ca.issue("not a csr", id, Duration::from_secs(60)),
            Err(IssueError::BadCsr(_))
        ));

        // The same root on the next start.
        let again = Ca::load_or_create(dir.path(), &CaOptions::default()).unwrap();
        assert_eq!(again.bundle_pem(), ca.bundle_pem());
    }

    #[test]
    fn a_key_that_is_not_the_certificates_is_refused_at_start() {
        let a = tempfile::tempdir().unwrap();
        let b = tempfile::tempdir().unwrap();
        Ca::load_or_create(a.path(), &CaOptions::default()).unwrap();
        Ca::load_or_create(b.path(), &CaOptions::default()).unwrap();
        let err = Ca::load_or_create(
            a.path(),
            &CaOptions {
                cert: Some(a.path().join(CERT_FILE)),
                key: Some(b.path().join(KEY_FILE)),
                trust_bundle: None,
            },
        )
        .unwrap_err();
        assert!(format!("{err:#}").contains("is not the key of"), "{err:#}");
    }

    #[test]
    fn leaves_are_not_cas_and_do_not_carry_the_root() {
        let dir = tempfile::tempdir().unwrap();
        let ca = Ca::load_or_create(dir.path(), &CaOptions::default()).unwrap();
        let id = "spiffe://cluster.local/ns/shop/sa/web";
        let issued = ca.issue(&csr_for(id), id, Duration::from_secs(60)).unwrap();
        assert_eq!(issued.chain_pem.matches("BEGIN CERTIFICATE").count(), 1);
        use rustls::pki_types::CertificateDer;
        use rustls::pki_types::pem::PemObject;
        let der = CertificateDer::from_pem_slice(issued.chain_pem.as_bytes()).unwrap();
        let (_, cert) = x509_parser::parse_x509_certificate(der.as_ref()).unwrap();
        let constraints = cert.basic_constraints().unwrap().unwrap();
        assert!(!constraints.value.ca);
    }

    #[test]
    fn a_bundle_the_ca_does_not_chain_to_is_refused_at_start() {
        let dir = tempfile::tempdir().unwrap();
        let other = tempfile::tempdir().unwrap();
        let theirs = Ca::load_or_create(other.path(), &CaOptions::default()).unwrap();
        let bundle = dir.path().join("bundle.pem");
        std::fs::write(&bundle, theirs.bundle_pem()).unwrap();
        let err = Ca::load_or_create(
            dir.path(),
            &CaOptions {
                trust_bundle: Some(bundle),
                ..CaOptions::default()
            },
        )
        .unwrap_err();
        assert!(format!("{err:#}").contains("does not chain"), "{err:#}");
    }
}
