//! Accept loops: one task per listener, one task per connection.
//!
//! A listener stops accepting (and closes its port) as soon as the drain
//! starts, or when its [`ListenerHandle`] is closed or dropped (a
//! configuration change removed it); connections already accepted carry on
//! and finish on their own.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use crate::drain;
use crate::http::server::{self, HttpService, ServerSettings};
use crate::metrics::ConnectionMetrics;
use crate::tcp::{self, SharedTcpTarget};
use crate::transport::{ClientTransport, ServerTransport};

/// A port that could not be bound. It names the address and the listener,
/// since "address in use" alone does not say which of several ports clashed.
#[derive(Debug, thiserror::Error)]
#[error("cannot listen on {addr} for {what}: {error}")]
pub struct BindError {
    pub addr: SocketAddr,
    pub what: String,
    pub error: io::Error,
}

pub async fn bind(addr: SocketAddr, what: &str) -> Result<TcpListener, BindError> {
    TcpListener::bind(addr).await.map_err(|error| BindError {
        addr,
        what: what.to_string(),
        error,
    })
}

/// A running accept loop. Dropping it stops the loop too, but only
/// [`ListenerHandle::close`] says when the port is actually released.
#[derive(Debug)]
pub struct ListenerHandle {
    stop: oneshot::Sender<()>,
    task: JoinHandle<()>,
}

impl ListenerHandle {
    /// Stops accepting and waits until the port is closed. Connections
    /// already accepted are not touched.
    pub async fn close(self) {
        // An error means the loop already ended (drain): nothing to stop.
        let _ = self.stop.send(());
        if let Err(e) = self.task.await {
            tracing::warn!(error = %e, "accept loop ended abnormally");
        }
    }
}

/// Accepts connections until the drain starts or the handle is closed,
/// running `handle` for each on its own task.
fn spawn_accept_loop<H, F>(
    listener: TcpListener,
    name: String,
    metrics: ConnectionMetrics,
    mut drain: drain::Watch,
    handle: H,
) -> ListenerHandle
where
    H: Fn(TcpStream, SocketAddr, drain::Watch) -> F + Send + 'static,
    F: Future<Output = ()> + Send + 'static,
{
    let (stop, mut stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        loop {
            let accepted = tokio::select! {
                accepted = listener.accept() => accepted,
                _ = drain.signaled() => break,
                _ = &mut stopped => break,
            };
            match accepted {
                Ok((stream, peer)) => {
                    if let Err(e) = stream.set_nodelay(true) {
                        tracing::debug!(listener = %name, %peer, error = %e, "cannot set TCP_NODELAY");
                    }
                    metrics.total.increment(1);
                    let open = metrics.open.clone();
                    open.increment(1.0);
                    let conn = handle(stream, peer, drain.clone());
                    tokio::spawn(async move {
                        conn.await;
                        open.decrement(1.0);
                    });
                }
                Err(e) => {
                    // Out of file descriptors and the like: the listener is
                    // fine, the process is momentarily short. Back off a
                    // little instead of spinning.
                    tracing::warn!(listener = %name, error = %e, "accept failed");
                    if is_fatal(&e) {
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
        drop(listener);
        tracing::debug!(listener = %name, "stopped accepting");
    });
    ListenerHandle { stop, task }
}

/// Serves HTTP on every connection the listener accepts.
pub fn serve_http<T: ServerTransport>(
    listener: TcpListener,
    name: String,
    metrics: ConnectionMetrics,
    drain: drain::Watch,
    transport: T,
    stack: HttpService,
    settings: ServerSettings,
) -> ListenerHandle {
    spawn_accept_loop(
        listener,
        name,
        metrics,
        drain,
        move |stream, peer, drain| {
            let transport = transport.clone();
            let stack = stack.clone();
            let settings = settings.clone();
            async move {
                match transport.accept(stream, peer).await {
                    Ok(accepted) => server::serve(accepted, stack, settings, drain).await,
                    Err(e) => tracing::debug!(%peer, error = %e, "handshake failed"),
                }
            }
        },
    )
}

/// Carries every connection the listener accepts to the current `target`
/// as opaque TCP.
/// `authz`: inbound listeners check each caller at connection time.
pub fn serve_tcp<S: ServerTransport, C: ClientTransport>(
    listener: TcpListener,
    name: String,
    metrics: ConnectionMetrics,
    drain: drain::Watch,
    transport: S,
    target: SharedTcpTarget<C>,
    authz: Option<crate::authz::AuthzLayer>,
) -> ListenerHandle {
    spawn_accept_loop(
        listener,
        name,
        metrics,
        drain,
        move |stream, peer, drain| {
            let transport = transport.clone();
            let target = target.load_full();
            let authz = authz.clone();
            async move {
                // Holding the watch makes shutdown wait (up to the drain
                // deadline) for the stream to end on its own: a byte stream
                // cannot be cut at a clean boundary the way HTTP can.
                let _drain = drain;
                match transport.accept(stream, peer).await {
                    Ok(accepted) => {
                        let allowed = authz
                            .as_ref()
                            .is_none_or(|a| a.allows_connection(accepted.peer_id.as_deref()));
                        if allowed {
                            tcp::proxy_connection(accepted.io, peer, target).await;
                        }
                    }
                    Err(e) => tracing::debug!(%peer, error = %e, "handshake failed"),
                }
            }
        },
    )
}

fn is_fatal(e: &io::Error) -> bool {
    matches!(e.kind(), io::ErrorKind::InvalidInput)
}
