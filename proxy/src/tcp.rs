//! Opaque TCP: carry bytes both ways between a downstream connection and an
//! upstream one.
//!
//! Each direction is copied on its own, so one side stalling never blocks
//! the other. When a side finishes sending (EOF), the other side's write
//! half is shut down and the opposite direction keeps flowing (half-close,
//! as databases and `nc -N` rely on). A connection with no bytes in either
//! direction for `idle_timeout` is closed.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use arc_swap::ArcSwap;
use metrics::Counter;
use tokio::time::Instant;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::balance::RoundRobin;
use crate::tls::Alpn;
use crate::transport::ClientTransport;

const BUFFER: usize = 16 * 1024;

/// How a forwarded connection ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Ended {
    /// Both sides finished sending.
    Closed { sent: u64, received: u64 },
    /// Nothing moved for the idle timeout.
    Idle,
}

/// Byte counters for one TCP listener.
#[derive(Clone, Debug)]
pub struct ByteCounters {
    /// downstream → upstream
    pub sent: Counter,
    /// upstream → downstream
    pub received: Counter,
}

impl ByteCounters {
    pub fn new(direction: &'static str, listener: &str) -> Self {
        let listener = listener.to_string();
        Self {
            sent: metrics::counter!(crate::metrics::TCP_BYTES_TOTAL, "direction" => direction, "listener" => listener.clone(), "flow" => "sent"),
            received: metrics::counter!(crate::metrics::TCP_BYTES_TOTAL, "direction" => direction, "listener" => listener, "flow" => "received"),
        }
    }

    pub fn noop() -> Self {
        Self {
            sent: Counter::noop(),
            received: Counter::noop(),
        }
    }
}

/// Where a TCP listener sends its connections: the endpoints of a service
/// (outbound), or the one local app address (inbound).
#[derive(Debug)]
pub struct TcpTarget<T> {
    /// A service or workload name, for logs.
    pub name: Arc<str>,
    /// Each endpoint with the transport that reaches it.
    pub endpoints: RoundRobin<(SocketAddr, T)>,
    pub connect_timeout: Duration,
    pub idle_timeout: Duration,
    pub counters: ByteCounters,
}

/// A TCP listener's target, swappable by a configuration change; each
/// connection loads the current one as it is accepted and keeps it.
pub type SharedTcpTarget<T> = Arc<ArcSwap<TcpTarget<T>>>;

/// Carries one accepted connection to the next endpoint of `target`. A
/// failure to connect closes the downstream connection (TCP has no way to
/// say why; the log does).
pub async fn proxy_connection<T, D>(downstream: D, peer: SocketAddr, target: Arc<TcpTarget<T>>)
where
    T: ClientTransport,
    D: AsyncRead + AsyncWrite + Unpin,
{
    let Some((endpoint, transport)) = target.endpoints.pick() else {
        tracing::warn!(target = %target.name, %peer, "no endpoints for TCP connection; closing it");
        return;
    };
    let endpoint = *endpoint;
    let upstream = match transport
        .connect(endpoint, target.connect_timeout, Alpn::Opaque)
        .await
    {
        Ok(io) => io,
        Err(error) => {
            tracing::warn!(target = %target.name, %endpoint, %peer, %error, "cannot connect upstream; closing TCP connection");
            return;
        }
    };
    match forward(downstream, upstream, target.idle_timeout, &target.counters).await {
        Ok(ended) => {
            tracing::debug!(target = %target.name, %endpoint, ?ended, "TCP connection done")
        }
        Err(error) => {
            tracing::debug!(target = %target.name, %endpoint, %error, "TCP connection failed")
        }
    }
}

/// Copies bytes both ways until both directions are done, either side
/// fails, or the connection has been idle for `idle_timeout`.
pub async fn forward<D, U>(
    downstream: D,
    upstream: U,
    idle_timeout: Duration,
    counters: &ByteCounters,
) -> io::Result<Ended>
where
    D: AsyncRead + AsyncWrite + Unpin,
    U: AsyncRead + AsyncWrite + Unpin,
{
    let start = Instant::now();
    // Both directions and the idle watch run in this one future, so a
    // plain atomic on the stack is enough to share the last activity.
    let last_activity = AtomicU64::new(0);
    let (mut down_read, mut down_write) = tokio::io::split(downstream);
    let (mut up_read, mut up_write) = tokio::io::split(upstream);

    let to_upstream = copy_half(
        &mut down_read,
        &mut up_write,
        start,
        &last_activity,
        &counters.sent,
    );
    let to_downstream = copy_half(
        &mut up_read,
        &mut down_write,
        start,
        &last_activity,
        &counters.received,
    );
    let both = async { tokio::try_join!(to_upstream, to_downstream) };

    tokio::select! {
        result = both => {
            let (sent, received) = result?;
            Ok(Ended::Closed { sent, received })
        }
        () = idle(idle_timeout, start, &last_activity) => Ok(Ended::Idle),
    }
}

/// One direction: read until EOF, write everything, then shut the writer
/// down so the peer sees our EOF.
async fn copy_half<R, W>(
    reader: &mut R,
    writer: &mut W,
    start: Instant,
    last_activity: &AtomicU64,
    counter: &Counter,
) -> io::Result<u64>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut buf = vec![0u8; BUFFER];
    let mut total = 0u64;
    loop {
        let n = reader.read(&mut buf).await?;
        if n == 0 {
            writer.shutdown().await?;
            return Ok(total);
        }
        writer.write_all(&buf[..n]).await?;
        total += n as u64;
        counter.increment(n as u64);
        last_activity.store(elapsed_ms(start), Ordering::Relaxed);
    }
}

/// Resolves once nothing has moved for `timeout`.
async fn idle(timeout: Duration, start: Instant, last_activity: &AtomicU64) {
    loop {
        let last = Duration::from_millis(last_activity.load(Ordering::Relaxed));
        let deadline = start + last + timeout;
        if Instant::now() >= deadline {
            return;
        }
        tokio::time::sleep_until(deadline).await;
    }
}

fn elapsed_ms(start: Instant) -> u64 {
    u64::try_from(start.elapsed().as_millis()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn carries_bytes_and_half_close() {
        let (mut client, proxy_down) = tokio::io::duplex(1024);
        let (proxy_up, mut server) = tokio::io::duplex(1024);
        let task = tokio::spawn(async move {
            forward(
                proxy_down,
                proxy_up,
                Duration::from_secs(5),
                &ByteCounters::noop(),
            )
            .await
        });
        client.write_all(b"ping").await.expect("write");
        client.shutdown().await.expect("half-close");
        let mut got = Vec::new();
        server
            .read_to_end(&mut got)
            .await
            .expect("server reads to EOF");
        assert_eq!(got, b"ping");
        // The other direction still works after the client's half-close.
        server.write_all(b"pong").await.expect("write back");
        server.shutdown().await.expect("close");
        let mut back = Vec::new();
        client.read_to_end(&mut back).await.expect("client reads");
        assert_eq!(back, b"pong");
        let ended = task.await.expect("join").expect("forward");
        assert_eq!(
            ended,
            Ended::Closed {
                sent: 4,
                received: 4
            }
        );
    }

    #[tokio::test(start_paused = true)]
    async fn idle_connections_are_closed() {
        let (_client, proxy_down) = tokio::io::duplex(1024);
        let (proxy_up, _server) = tokio::io::duplex(1024);
        let ended = forward(
            proxy_down,
            proxy_up,
            Duration::from_secs(30),
            &ByteCounters::noop(),
        )
        .await
        .expect("forward");
        assert_eq!(ended, Ended::Idle);
    }
}
