//! HTTP plumbing shared by inbound and outbound: the server side of a
//! connection, the pooled client to upstreams, and the body type.

pub mod body;
pub mod client;
pub mod server;

/// The downstream peer of the connection a request arrived on, put into the
/// request's extensions by the server so layers can read it.
#[derive(Clone, Copy, Debug)]
pub struct ClientAddr(pub std::net::SocketAddr);

/// The caller's SPIFFE ID, verified by the mTLS handshake of the
/// connection a request arrived on.
#[derive(Clone, Debug)]
pub struct PeerId(pub std::sync::Arc<str>);
