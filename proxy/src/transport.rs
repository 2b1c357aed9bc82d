//! The transport seam: how bytes get on and off the wire.
//!
//! Listeners hand every accepted TCP stream to a [`ServerTransport`], and the
//! upstream clients open connections through a [`ClientTransport`]. The HTTP
//! and TCP code above sees only a byte stream, the HTTP version ALPN agreed
//! and, over mTLS, the peer's verified SPIFFE ID.
//!
//! [`ServerSide`] and [`ClientSide`] are the two the proxy runs: plaintext,
//! or mutual TLS ([`crate::tls`]) when the sidecar has an identity.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::{TlsAcceptor, TlsConnector};

use crate::identity::CertFacts;
use crate::tls::{self, Alpn, ClientConfigs};

/// What the server side of a handshake learned about a connection.
#[derive(Debug)]
pub struct Accepted<IO> {
    pub io: IO,
    pub peer: SocketAddr,
    /// The HTTP version agreed by ALPN, if the transport negotiates one.
    /// `None` means "sniff the first bytes" (plaintext h2c prior knowledge).
    pub alpn: Option<http::Version>,
    /// The client's SPIFFE ID, verified by the TLS handshake.
    pub peer_id: Option<Arc<str>>,
    /// Over mTLS: when the connection must be closed (gracefully) so the
    /// peer handshakes again.
    pub recheck: Option<Recheck>,
}

/// An mTLS connection is only as good as the certificates and bundle it
/// was verified with: it is due for closing when either certificate
/// expires or the trust bundle changes.
#[derive(Debug)]
pub struct Recheck {
    pub until: std::time::SystemTime,
    pub bundle: tokio::sync::watch::Receiver<u64>,
}

impl Recheck {
    /// Resolves when the connection is due; never without a recheck.
    pub async fn due(recheck: Option<Recheck>) {
        let Some(mut recheck) = recheck else {
            return std::future::pending().await;
        };
        let left = recheck
            .until
            .duration_since(std::time::SystemTime::now())
            .unwrap_or_default();
        tokio::select! {
            () = tokio::time::sleep(left) => {}
            // A dropped sender (identity gone) is no reason to close.
            Ok(()) = recheck.bundle.changed() => {}
        }
    }
}

pub trait ServerTransport: Clone + Send + Sync + 'static {
    type Io: AsyncRead + AsyncWrite + Unpin + Send + 'static;

    fn accept(
        &self,
        tcp: TcpStream,
        peer: SocketAddr,
    ) -> impl Future<Output = io::Result<Accepted<Self::Io>>> + Send;
}

pub trait ClientTransport: Clone + Send + Sync + 'static {
    type Io: AsyncRead + AsyncWrite + Unpin + Send + 'static;

    /// Whether the far end is a sidecar that takes HTTP/1.1 requests
    /// carried over HTTP/2 (see `orig_proto`).
    fn multiplexes_http1(&self) -> bool {
        false
    }

    /// `alpn` says what the connection will carry, for transports that
    /// negotiate it.
    fn connect(
        &self,
        addr: SocketAddr,
        timeout: Duration,
        alpn: Alpn,
    ) -> impl Future<Output = io::Result<Self::Io>> + Send;
}

/// Plain TCP both ways.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Plaintext;

impl ServerTransport for Plaintext {
    type Io = TcpStream;

    async fn accept(&self, tcp: TcpStream, peer: SocketAddr) -> io::Result<Accepted<TcpStream>> {
        Ok(Accepted {
            io: tcp,
            peer,
            alpn: None,
            peer_id: None,
            recheck: None,
        })
    }
}

impl ClientTransport for Plaintext {
    type Io = TcpStream;

    async fn connect(&self, addr: SocketAddr, timeout: Duration, _: Alpn) -> io::Result<TcpStream> {
        connect_tcp(addr, timeout).await
    }
}

// === The proxy's transports ===

/// How inbound listeners accept: chosen once at start (a sidecar with an
/// identity requires mTLS from every peer).
#[derive(Clone)]
pub enum ServerSide {
    Plaintext,
    Tls {
        acceptor: TlsAcceptor,
        /// A client that does not finish its handshake in time is dropped.
        handshake_timeout: Duration,
        identity: Arc<crate::identity::Identity>,
    },
}

impl std::fmt::Debug for ServerSide {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ServerSide::Plaintext => "Plaintext",
            ServerSide::Tls { .. } => "Tls",
        })
    }
}

impl ServerTransport for ServerSide {
    type Io = MeshIo;

    async fn accept(&self, tcp: TcpStream, peer: SocketAddr) -> io::Result<Accepted<MeshIo>> {
        let (acceptor, handshake_timeout, identity) = match self {
            ServerSide::Plaintext => {
                return Ok(Accepted {
                    io: MeshIo::Plain(tcp),
                    peer,
                    alpn: None,
                    peer_id: None,
                    recheck: None,
                });
            }
            ServerSide::Tls {
                acceptor,
                handshake_timeout,
                identity,
            } => (acceptor, *handshake_timeout, identity),
        };
        let handshake = tokio::time::timeout(handshake_timeout, acceptor.accept(tcp))
            .await
            .unwrap_or_else(|_| {
                Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "TLS handshake timed out",
                ))
            });
        let stream = match handshake {
            Ok(stream) => stream,
            Err(e) => {
                handshake_failed("inbound", &peer, &e);
                return Err(e);
            }
        };
        let (_, session) = stream.get_ref();
        let alpn = match session.alpn_protocol() {
            Some(tls::ALPN_H2) => Some(http::Version::HTTP_2),
            Some(tls::ALPN_HTTP11) => Some(http::Version::HTTP_11),
            _ => None,
        };
        // The verifier already refused certificates without a SPIFFE ID.
        let facts = session
            .peer_certificates()
            .and_then(|chain| chain.first())
            .and_then(|leaf| CertFacts::parse(leaf).ok());
        let peer_id = facts
            .as_ref()
            .and_then(|f| f.spiffe_id.clone().ok())
            .map(Arc::from);
        let ours = identity.credentials().map(|c| c.not_after);
        let until = [facts.map(|f| f.not_after), ours]
            .into_iter()
            .flatten()
            .min()
            .unwrap_or_else(std::time::SystemTime::now);
        let recheck = Some(Recheck {
            until,
            bundle: identity.bundle_changes(),
        });
        metrics::counter!(crate::metrics::TLS_HANDSHAKES_TOTAL, "direction" => "inbound", "result" => "ok", "reason" => "").increment(1);
        Ok(Accepted {
            io: MeshIo::ServerTls(Box::new(stream)),
            peer,
            alpn,
            peer_id,
            recheck,
        })
    }
}

/// How connections to one endpoint are made: plaintext (a destination
/// outside the mesh, or a sidecar without an identity), or mTLS expecting
/// the endpoint's SPIFFE ID.
#[derive(Clone, Debug, PartialEq)]
pub enum ClientSide {
    Plaintext,
    Tls(Arc<ClientConfigs>),
    /// No safe way to connect (the reason): fail rather than fall back to
    /// plaintext.
    Refuse(Arc<str>),
}

impl ClientTransport for ClientSide {
    type Io = MeshIo;

    /// Over mTLS the far end is a sidecar: one HTTP/2 connection carries
    /// every HTTP/1.1 request, instead of a TLS connection per request in
    /// flight.
    fn multiplexes_http1(&self) -> bool {
        matches!(self, ClientSide::Tls(_))
    }

    async fn connect(&self, addr: SocketAddr, timeout: Duration, alpn: Alpn) -> io::Result<MeshIo> {
        let configs = match self {
            ClientSide::Plaintext => return Ok(MeshIo::Plain(connect_tcp(addr, timeout).await?)),
            ClientSide::Refuse(reason) => return Err(io::Error::other(reason.to_string())),
            ClientSide::Tls(configs) => configs,
        };
        let deadline = tokio::time::Instant::now() + timeout;
        let tcp = connect_tcp(addr, timeout).await?;
        let connector = TlsConnector::from(configs.for_alpn(alpn));
        // SVIDs name workloads, not hosts: the server name only fills the
        // ClientHello (no SNI is sent for an IP address).
        let name = ServerName::IpAddress(addr.ip().into());
        let handshake = tokio::time::timeout_at(deadline, connector.connect(name, tcp))
            .await
            .unwrap_or_else(|_| {
                Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("TLS handshake with {addr} timed out"),
                ))
            });
        match handshake {
            Ok(stream) => {
                metrics::counter!(crate::metrics::TLS_HANDSHAKES_TOTAL, "direction" => "outbound", "result" => "ok", "reason" => "").increment(1);
                Ok(MeshIo::ClientTls(Box::new(stream)))
            }
            Err(e) => {
                handshake_failed("outbound", &addr, &e);
                Err(io::Error::new(
                    e.kind(),
                    format!("mTLS handshake with {addr} failed: {}", tls::describe(&e)),
                ))
            }
        }
    }
}

fn handshake_failed(direction: &'static str, peer: &SocketAddr, e: &io::Error) {
    let reason = tls::failure_reason(e);
    metrics::counter!(crate::metrics::TLS_HANDSHAKES_TOTAL, "direction" => direction, "result" => "failed", "reason" => reason).increment(1);
    match reason {
        // Scanners, health checks and impatient clients: not news.
        "not_tls" | "eof" | "io" | "timeout" => {
            tracing::debug!(direction, %peer, reason, error = %e, "TLS handshake failed")
        }
        _ => {
            tracing::warn!(direction, %peer, reason, error = %tls::describe(e), "TLS handshake refused")
        }
    }
}

/// A connection of either kind.
#[derive(Debug)]
pub enum MeshIo {
    Plain(TcpStream),
    ServerTls(Box<tokio_rustls::server::TlsStream<TcpStream>>),
    ClientTls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

impl AsyncRead for MeshIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            MeshIo::Plain(s) => Pin::new(s).poll_read(cx, buf),
            MeshIo::ServerTls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
            MeshIo::ClientTls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for MeshIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            MeshIo::Plain(s) => Pin::new(s).poll_write(cx, buf),
            MeshIo::ServerTls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
            MeshIo::ClientTls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            MeshIo::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            MeshIo::ServerTls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
            MeshIo::ClientTls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            MeshIo::Plain(s) => s.is_write_vectored(),
            MeshIo::ServerTls(s) => s.is_write_vectored(),
            MeshIo::ClientTls(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            MeshIo::Plain(s) => Pin::new(s).poll_flush(cx),
            MeshIo::ServerTls(s) => Pin::new(s.as_mut()).poll_flush(cx),
            MeshIo::ClientTls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            MeshIo::Plain(s) => Pin::new(s).poll_shutdown(cx),
            MeshIo::ServerTls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
            MeshIo::ClientTls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

/// Opens a TCP connection with a deadline and Nagle off (we write whole
/// messages; delaying small writes only adds latency).
pub async fn connect_tcp(addr: SocketAddr, timeout: Duration) -> io::Result<TcpStream> {
    let stream = match tokio::time::timeout(timeout, TcpStream::connect(addr)).await {
        Ok(result) => result?,
        Err(_) => {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("connect timed out after {timeout:?}"),
            ));
        }
    };
    stream.set_nodelay(true)?;
    Ok(stream)
}
