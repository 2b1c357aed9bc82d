//! Test certificates, made fresh by each test (nothing is checked in): a
//! CA, and X.509 SVIDs it signs for SPIFFE IDs, plus the broken kinds a
//! sidecar must refuse (expired, no SPIFFE ID, self-signed, another CA).

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};

/// A certificate authority for one test.
pub struct TestCa {
    issuer: Issuer<'static, KeyPair>,
    pem: String,
}

/// What to put in a leaf certificate.
#[derive(Clone, Debug)]
pub enum Leaf<'a> {
    /// A valid SVID for this SPIFFE ID.
    Spiffe(&'a str),
    /// An SVID that expired in 2021.
    Expired(&'a str),
    /// A certificate with a DNS name and no URI SAN.
    NoSpiffeId,
}

/// Files a sidecar's `--tls-cert`, `--tls-key` and `--trust-bundle` read.
#[derive(Clone, Debug)]
pub struct IdentityFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub bundle: PathBuf,
}

impl IdentityFiles {
    /// The three flags, ready for a command line.
    pub fn args(&self) -> Vec<String> {
        vec![
            "--tls-cert".into(),
            self.cert.display().to_string(),
            "--tls-key".into(),
            self.key.display().to_string(),
            "--trust-bundle".into(),
            self.bundle.display().to_string(),
        ]
    }
}

impl TestCa {
    pub fn new(name: &str) -> Self {
        let key = KeyPair::generate().expect("CA key");
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let cert = params.self_signed(&key).expect("CA certificate");
        Self {
            pem: cert.pem(),
            issuer: Issuer::new(params, key),
        }
    }

    /// The CA certificate (a trust bundle of one).
    pub fn pem(&self) -> &str {
        &self.pem
    }

    /// A leaf certificate and its key, both PEM.
    pub fn issue(&self, leaf: Leaf<'_>) -> (String, String) {
        let key = KeyPair::generate().expect("leaf key");
        let params = leaf_params(&leaf);
        let cert = params
            .signed_by(&key, &self.issuer)
            .expect("leaf certificate");
        (cert.pem(), key.serialize_pem())
    }

    /// Writes `leaf`'s certificate, key and this CA as the bundle under
    /// `dir`, named after `name`.
    pub fn write(&self, dir: &Path, name: &str, leaf: Leaf<'_>) -> IdentityFiles {
        let (cert, key) = self.issue(leaf);
        write_files(dir, name, &cert, &key, &self.pem)
    }
}

/// A self-signed leaf (no CA at all) for `leaf`.
pub fn self_signed(leaf: Leaf<'_>) -> (String, String) {
    let key = KeyPair::generate().expect("key");
    let cert = leaf_params(&leaf).self_signed(&key).expect("certificate");
    (cert.pem(), key.serialize_pem())
}

/// Writes a certificate, key and bundle as files under `dir`.
pub fn write_files(dir: &Path, name: &str, cert: &str, key: &str, bundle: &str) -> IdentityFiles {
    let files = IdentityFiles {
        cert: dir.join(format!("{name}.crt")),
        key: dir.join(format!("{name}.key")),
        bundle: dir.join(format!("{name}-bundle.pem")),
    };
    std::fs::write(&files.cert, cert).expect("write cert");
    std::fs::write(&files.key, key).expect("write key");
    std::fs::write(&files.bundle, bundle).expect("write bundle");
    files
}

fn leaf_params(leaf: &Leaf<'_>) -> CertificateParams {
    let mut params = CertificateParams::new(Vec::<String>::new()).expect("params");
    params
        .distinguished_name
        .push(DnType::CommonName, "test workload");
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    params.use_authority_key_identifier_extension = true;
    match leaf {
        Leaf::Spiffe(id) => {
            params.subject_alt_names = vec![SanType::URI((*id).try_into().expect("URI SAN"))];
        }
        Leaf::Expired(id) => {
            params.subject_alt_names = vec![SanType::URI((*id).try_into().expect("URI SAN"))];
            params.not_before = rcgen::date_time_ymd(2020, 1, 1);
            params.not_after = rcgen::date_time_ymd(2021, 1, 1);
        }
        Leaf::NoSpiffeId => {
            params.subject_alt_names = vec![SanType::DnsName(
                "api.shop.svc".try_into().expect("DNS SAN"),
            )];
        }
    }
    params
}

/// A TLS client as an outsider would build it: presents `identity` (a
/// certificate and key, PEM) or nothing, offers `alpn`, and trusts any
/// server (these tests are about what the server accepts).
pub fn outsider_client(
    identity: Option<(&str, &str)>,
    alpn: &[&[u8]],
) -> std::sync::Arc<rustls::ClientConfig> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    #[allow(deprecated)]
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(rustls::ALL_VERSIONS)
        .expect("versions")
        .dangerous()
        .with_custom_certificate_verifier(std::sync::Arc::new(AnyServer(provider)));
    let mut config = match identity {
        Some((cert, key)) => {
            let chain = CertificateDer::pem_slice_iter(cert.as_bytes())
                .collect::<Result<Vec<_>, _>>()
                .expect("cert PEM");
            let key = PrivateKeyDer::from_pem_slice(key.as_bytes()).expect("key PEM");
            builder
                .with_client_auth_cert(chain, key)
                .expect("client cert")
        }
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    std::sync::Arc::new(config)
}

#[derive(Debug)]
struct AnyServer(std::sync::Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for AnyServer {
    fn verify_server_cert(
        &self,
        _: &rustls::pki_types::CertificateDer<'_>,
        _: &[rustls::pki_types::CertificateDer<'_>],
        _: &rustls::pki_types::ServerName<'_>,
        _: &[u8],
        _: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// Connects to `addr` with `config`, sends a plain HTTP/1.1 GET of `path`
/// and returns what came back, or the error that ended the exchange. A
/// server that refuses the client certificate under TLS 1.3 says so after
/// the client's side of the handshake is done, so the refusal can show on
/// the first read.
pub async fn tls_get(
    addr: std::net::SocketAddr,
    config: std::sync::Arc<rustls::ClientConfig>,
    path: &str,
) -> Result<String, String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let exchange = async {
        let tcp = tokio::net::TcpStream::connect(addr)
            .await
            .map_err(|e| format!("connect: {e}"))?;
        let name = rustls::pki_types::ServerName::IpAddress(addr.ip().into());
        let mut tls = tokio_rustls::TlsConnector::from(config)
            .connect(name, tcp)
            .await
            .map_err(|e| format!("handshake: {e}"))?;
        tls.write_all(
            format!("GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await
        .map_err(|e| format!("write: {e}"))?;
        let mut out = Vec::new();
        tls.read_to_end(&mut out)
            .await
            .map_err(|e| format!("read: {e}"))?;
        if out.is_empty() {
            return Err("closed without an answer".to_string());
        }
        Ok(String::from_utf8_lossy(&out).into_owned())
    };
    tokio::time::timeout(std::time::Duration::from_secs(10), exchange)
        .await
        .unwrap_or_else(|_| Err("timed out".to_string()))
}
