//! Mutual TLS between sidecars, with rustls (ring; no OpenSSL).
//!
//! Both sides present this sidecar's current certificate (read from
//! [`Identity`] at each handshake, so a renewal needs no new config) and
//! check the peer's chain against the current trust bundle. On top of the
//! chain, the peer must carry exactly one SPIFFE ID:
//!
//! - inbound, any SPIFFE ID is accepted at the handshake and handed to the
//!   layers above (authorization decides who may call);
//! - outbound, the server's SPIFFE ID must be one of those the destination
//!   expects; any other is a refused connection, never a silent success.
//!
//! TLS 1.3 only, unless TLS 1.2 is explicitly allowed.

use std::fmt;
use std::sync::{Arc, OnceLock};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::{ResolvesClientCert, verify_server_cert_signed_by_trust_anchor};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ClientHello, ParsedCertificate, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, DistinguishedName, Error, OtherError,
    ServerConfig, SignatureScheme,
};

use crate::identity::{CertFacts, Identity};

pub const ALPN_H2: &[u8] = b"h2";
pub const ALPN_HTTP11: &[u8] = b"http/1.1";

/// The one crypto provider: ring.
pub fn provider() -> Arc<CryptoProvider> {
    static PROVIDER: OnceLock<Arc<CryptoProvider>> = OnceLock::new();
    PROVIDER
        .get_or_init(|| {
            // ring is the provider the design chose (pure Rust build, no
            // OpenSSL); rustls marks this deprecated because ring has no
            // post-quantum key exchange. A known, accepted gap for now.
            #[allow(deprecated)]
            let mut provider = rustls::crypto::ring::default_provider();
            // X25519 first (ring's default list starts with P-384, which
            // made a handshake cost about 1.7× nginx's in the benchmarks).
            use rustls::crypto::ring::kx_group;
            provider.kx_groups = vec![kx_group::X25519, kx_group::SECP256R1, kx_group::SECP384R1];
            Arc::new(provider)
        })
        .clone()
}

static TLS13_ONLY: [&rustls::SupportedProtocolVersion; 1] = [&rustls::version::TLS13];

fn versions(allow_tls12: bool) -> &'static [&'static rustls::SupportedProtocolVersion] {
    if allow_tls12 {
        rustls::ALL_VERSIONS
    } else {
        &TLS13_ONLY
    }
}

/// The server side of inbound mTLS: one config for the process's life.
pub fn server_config(identity: Arc<Identity>, allow_tls12: bool) -> Result<ServerConfig, Error> {
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(versions(allow_tls12))?
        .with_client_cert_verifier(Arc::new(SpiffeClientVerifier {
            identity: identity.clone(),
        }))
        .with_cert_resolver(Arc::new(CurrentCertificate { identity }));
    config.alpn_protocols = vec![ALPN_H2.to_vec(), ALPN_HTTP11.to_vec()];
    // No resumption: a resumed session skips the certificate checks, so
    // an expired certificate, a revoked root or a changed bundle would go
    // unnoticed. Connections are few and long-lived (HTTP/2), so a full
    // handshake each time costs little.
    config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    config.send_tls13_tickets = 0;
    Ok(config)
}

/// Which protocol an outbound TLS connection will carry, so ALPN offers
/// just that.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Alpn {
    Http1,
    Http2,
    /// Opaque TCP: no ALPN.
    Opaque,
}

/// Client configs for connections to servers that must prove one of
/// `expected` SPIFFE IDs: one config per ALPN choice.
#[derive(Debug)]
pub struct ClientConfigs {
    pub expected: Arc<[String]>,
    http1: Arc<ClientConfig>,
    http2: Arc<ClientConfig>,
    opaque: Arc<ClientConfig>,
}

impl PartialEq for ClientConfigs {
    /// The configs follow from the identity and the expectation; two sets
    /// for the same expectation are interchangeable.
    fn eq(&self, other: &Self) -> bool {
        self.expected == other.expected
    }
}

impl ClientConfigs {
    pub fn new(
        identity: Arc<Identity>,
        expected: Arc<[String]>,
        allow_tls12: bool,
    ) -> Result<Self, Error> {
        let config = ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(versions(allow_tls12))?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(SpiffeServerVerifier {
                identity: identity.clone(),
                expected: expected.clone(),
            }))
            .with_client_cert_resolver(Arc::new(CurrentCertificate { identity }));
        let with_alpn = |alpn: &[&[u8]]| {
            let mut config = config.clone();
            config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
            // Full handshakes only (see `server_config`).
            config.resumption = rustls::client::Resumption::disabled();
            Arc::new(config)
        };
        Ok(Self {
            expected,
            http1: with_alpn(&[ALPN_HTTP11]),
            http2: with_alpn(&[ALPN_H2]),
            opaque: with_alpn(&[]),
        })
    }

    pub fn for_alpn(&self, alpn: Alpn) -> Arc<ClientConfig> {
        match alpn {
            Alpn::Http1 => self.http1.clone(),
            Alpn::Http2 => self.http2.clone(),
            Alpn::Opaque => self.opaque.clone(),
        }
    }
}

// === Certificates we present ===

/// Presents whatever certificate [`Identity`] holds at handshake time.
#[derive(Debug)]
struct CurrentCertificate {
    identity: Arc<Identity>,
}

impl ResolvesServerCert for CurrentCertificate {
    fn resolve(&self, _: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.identity.credentials().map(|c| c.certified.clone())
    }
}

impl ResolvesClientCert for CurrentCertificate {
    fn resolve(&self, _: &[&[u8]], _: &[SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        self.identity.credentials().map(|c| c.certified.clone())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

// === Checking the peer ===

/// Why a peer's certificate was refused beyond what webpki says.
#[derive(Debug)]
pub enum PeerRefused {
    /// No SPIFFE ID, or a malformed one.
    NoSpiffeId(String),
    /// A valid SPIFFE ID, not one we expect.
    WrongIdentity {
        presented: String,
        expected: Arc<[String]>,
    },
    /// A client from outside this mesh's trust domain.
    ForeignTrustDomain { presented: String, ours: String },
    /// No trust bundle yet.
    NoBundle,
}

impl fmt::Display for PeerRefused {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PeerRefused::NoSpiffeId(why) => write!(f, "peer certificate refused: {why}"),
            PeerRefused::WrongIdentity {
                presented,
                expected,
            } => write!(
                f,
                "the server presented identity {presented}, expected {}",
                expected.join(" or ")
            ),
            PeerRefused::ForeignTrustDomain { presented, ours } => write!(
                f,
                "the client's identity {presented} is outside trust domain {ours}"
            ),
            PeerRefused::NoBundle => f.write_str("no trust bundle yet"),
        }
    }
}

impl std::error::Error for PeerRefused {}

fn refused(reason: PeerRefused) -> Error {
    Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(reason))))
}

/// The peer's SPIFFE ID from its (chain-verified) leaf certificate.
fn peer_spiffe_id(end_entity: &CertificateDer<'_>) -> Result<String, Error> {
    let facts = CertFacts::parse(end_entity)
        .map_err(|_| Error::InvalidCertificate(CertificateError::BadEncoding))?;
    facts
        .spiffe_id
        .map_err(|why| refused(PeerRefused::NoSpiffeId(why)))
}

/// Inbound: the client's chain must reach the current bundle, and its
/// certificate must carry a SPIFFE ID.
#[derive(Debug)]
struct SpiffeClientVerifier {
    identity: Arc<Identity>,
}

impl ClientCertVerifier for SpiffeClientVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        // Our clients present their one certificate whatever we hint.
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, Error> {
        let bundle = self
            .identity
            .bundle()
            .ok_or_else(|| refused(PeerRefused::NoBundle))?;
        bundle
            .client_verifier
            .verify_client_cert(end_entity, intermediates, now)?;
        let presented = peer_spiffe_id(end_entity)?;
        // A root shared with other meshes (a company CA, say) does not let
        // their workloads in.
        if let Some(ours) = self.identity.trust_domain()
            && presented
                .strip_prefix("spiffe://")
                .and_then(|rest| rest.split_once('/'))
                .is_none_or(|(domain, _)| domain != ours.as_str())
        {
            return Err(refused(PeerRefused::ForeignTrustDomain {
                presented,
                ours: ours.to_string(),
            }));
        }
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        signatures::tls12(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        signatures::tls13(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        signatures::schemes()
    }
}

/// Outbound: the server's chain must reach the current bundle, and its
/// SPIFFE ID must be one the destination expects. The TLS server name is
/// not used: SVIDs name workloads, not hosts.
#[derive(Debug)]
struct SpiffeServerVerifier {
    identity: Arc<Identity>,
    expected: Arc<[String]>,
}

impl ServerCertVerifier for SpiffeServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, Error> {
        let bundle = self
            .identity
            .bundle()
            .ok_or_else(|| refused(PeerRefused::NoBundle))?;
        let parsed = ParsedCertificate::try_from(end_entity)?;
        verify_server_cert_signed_by_trust_anchor(
            &parsed,
            &bundle.roots,
            intermediates,
            now,
            provider().signature_verification_algorithms.all,
        )?;
        let presented = peer_spiffe_id(end_entity)?;
        if !self.expected.contains(&presented) {
            return Err(refused(PeerRefused::WrongIdentity {
                presented,
                expected: self.expected.clone(),
            }));
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        signatures::tls12(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        signatures::tls13(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        signatures::schemes()
    }
}

/// Handshake signatures, checked the same way both ways with ring's
/// algorithms.
mod signatures {
    use super::*;

    pub fn tls12(
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &provider().signature_verification_algorithms,
        )
    }

    pub fn tls13(
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &provider().signature_verification_algorithms,
        )
    }

    pub fn schemes() -> Vec<SignatureScheme> {
        provider()
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// A handshake error as a person should read it: our own refusals (a
/// wrong identity, say) by their message, not rustls's debug form.
pub fn describe(e: &std::io::Error) -> String {
    let refusal = e
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<Error>())
        .and_then(|tls| match tls {
            Error::InvalidCertificate(CertificateError::Other(OtherError(other))) => {
                other.downcast_ref::<PeerRefused>()
            }
            _ => None,
        });
    match refusal {
        Some(refusal) => refusal.to_string(),
        None => e.to_string(),
    }
}

/// A bounded label for why a handshake failed (metrics).
pub fn failure_reason(e: &std::io::Error) -> &'static str {
    let Some(tls) = e.get_ref().and_then(|inner| inner.downcast_ref::<Error>()) else {
        return match e.kind() {
            std::io::ErrorKind::TimedOut => "timeout",
            std::io::ErrorKind::UnexpectedEof => "eof",
            _ => "io",
        };
    };
    match tls {
        Error::NoCertificatesPresented => "no_certificate",
        Error::InvalidCertificate(CertificateError::Other(OtherError(other))) => {
            match other.downcast_ref::<PeerRefused>() {
                Some(PeerRefused::NoSpiffeId(_)) => "no_spiffe_id",
                Some(PeerRefused::WrongIdentity { .. }) => "wrong_identity",
                Some(PeerRefused::ForeignTrustDomain { .. }) => "foreign_trust_domain",
                Some(PeerRefused::NoBundle) => "no_bundle",
                None => "bad_certificate",
            }
        }
        Error::InvalidCertificate(
            CertificateError::Expired | CertificateError::ExpiredContext { .. },
        ) => "expired",
        Error::InvalidCertificate(
            CertificateError::UnknownIssuer | CertificateError::BadSignature,
        ) => "unknown_ca",
        Error::InvalidCertificate(_) => "bad_certificate",
        Error::AlertReceived(_) => "alert_received",
        Error::InvalidMessage(_) => "not_tls",
        Error::PeerIncompatible(_) | Error::NoApplicationProtocol => "incompatible",
        _ => "other",
    }
}

/// This sidecar's mTLS, once it has an identity: the inbound side (one
/// config for the process) and, per set of expected peer identities, the
/// outbound side.
#[derive(Debug)]
pub struct MeshTls {
    pub identity: Arc<Identity>,
    server: Arc<ServerConfig>,
    handshake_timeout: std::time::Duration,
    allow_tls12: bool,
    /// Shared by every endpoint that expects the same identities; entries
    /// no endpoint uses any more are dropped on the next insert.
    clients: std::sync::Mutex<std::collections::HashMap<Arc<[String]>, Arc<ClientConfigs>>>,
}

impl MeshTls {
    pub fn new(
        identity: Arc<Identity>,
        allow_tls12: bool,
        handshake_timeout: std::time::Duration,
    ) -> Result<Self, Error> {
        Ok(Self {
            server: Arc::new(server_config(identity.clone(), allow_tls12)?),
            identity,
            handshake_timeout,
            allow_tls12,
            clients: Default::default(),
        })
    }

    /// How inbound listeners accept: mTLS, required.
    pub fn server_side(&self) -> crate::transport::ServerSide {
        crate::transport::ServerSide::Tls {
            acceptor: tokio_rustls::TlsAcceptor::from(self.server.clone()),
            handshake_timeout: self.handshake_timeout,
            identity: self.identity.clone(),
        }
    }

    /// How to reach an endpoint whose server must present one of
    /// `expected`; plaintext when nothing is expected (outside the mesh).
    pub fn client_side(&self, expected: &Arc<[String]>) -> crate::transport::ClientSide {
        if expected.is_empty() {
            return crate::transport::ClientSide::Plaintext;
        }
        let mut clients = self
            .clients
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(configs) = clients.get(expected) {
            return crate::transport::ClientSide::Tls(configs.clone());
        }
        clients.retain(|_, configs| Arc::strong_count(configs) > 1);
        match ClientConfigs::new(self.identity.clone(), expected.clone(), self.allow_tls12) {
            Ok(configs) => {
                let configs = Arc::new(configs);
                clients.insert(expected.clone(), configs.clone());
                crate::transport::ClientSide::Tls(configs)
            }
            // Only a protocol-version list rustls refuses fails here, and
            // `new` already built one with the same list.
            Err(e) => {
                tracing::error!(error = %e, "cannot build a TLS client config; refusing connections to this endpoint");
                crate::transport::ClientSide::Refuse(Arc::from(e.to_string()))
            }
        }
    }
}
