//! The transport seam: how bytes get on and off the wire.
//!
//! Listeners hand every accepted TCP stream to a [`ServerTransport`], and the
//! upstream client opens connections through a [`ClientTransport`]. Today the
//! only implementation is [`Plaintext`]; mutual TLS plugs in here as a second
//! implementation (server: handshake, ALPN, peer identity; client: present
//! our certificate, check the server's SPIFFE ID) without touching the HTTP
//! or TCP code above it.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;

/// What the server side of a handshake learned about a connection.
#[derive(Debug)]
pub struct Accepted<IO> {
    pub io: IO,
    pub peer: SocketAddr,
    /// The HTTP version agreed by ALPN, if the transport negotiates one.
    /// `None` means "sniff the first bytes" (plaintext h2c prior knowledge).
    pub alpn: Option<http::Version>,
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

    fn connect(
        &self,
        addr: SocketAddr,
        timeout: Duration,
    ) -> impl Future<Output = io::Result<Self::Io>> + Send;
}

/// Plain TCP both ways.
#[derive(Clone, Copy, Debug, Default)]
pub struct Plaintext;

impl ServerTransport for Plaintext {
    type Io = TcpStream;

    async fn accept(&self, tcp: TcpStream, peer: SocketAddr) -> io::Result<Accepted<TcpStream>> {
        Ok(Accepted {
            io: tcp,
            peer,
            alpn: None,
        })
    }
}

impl ClientTransport for Plaintext {
    type Io = TcpStream;

    async fn connect(&self, addr: SocketAddr, timeout: Duration) -> io::Result<TcpStream> {
        connect_tcp(addr, timeout).await
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
