//! Opaque TCP through the sidecar pair: bytes both ways, half-close, and
//! the idle timeout.

use std::time::{Duration, Instant};

use outrigger_e2e::Pair;
use outrigger_e2e::upstream::TcpEcho;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

#[tokio::test]
async fn bytes_flow_both_ways_and_half_close_works() {
    let echo = TcpEcho::start().await;
    let mesh = Pair::start(echo.addr, "tcp", "").await;
    let mut conn = TcpStream::connect(mesh.outbound).await.expect("connect");

    let payload: Vec<u8> = (0..200_000u32).map(|i| (i % 256) as u8).collect();
    let (mut read, mut write) = conn.split();
    let writer = async {
        write.write_all(&payload).await.expect("write");
        // Half-close: we are done sending, but still want the reply.
        write.shutdown().await.expect("shutdown");
    };
    let mut received = Vec::new();
    let reader = async {
        tokio::time::timeout(Duration::from_secs(20), read.read_to_end(&mut received))
            .await
            .expect("bounded")
            .expect("read");
    };
    tokio::join!(writer, reader);
    // The echo server saw our EOF through both sidecars, then said bye and
    // closed, which we saw as EOF through both sidecars.
    assert_eq!(received.len(), payload.len() + 3);
    assert_eq!(&received[..payload.len()], &payload[..]);
    assert_eq!(&received[payload.len()..], b"bye");

    let (_, metrics) = mesh.client.admin_get("/metrics").await;
    assert!(
        metrics.contains("outrigger_tcp_bytes_total"),
        "TCP byte counters exported:\n{metrics}"
    );
}

#[tokio::test]
async fn idle_connections_are_closed() {
    let echo = TcpEcho::start().await;
    let policy = r#"---
apiVersion: outrigger.io/v1alpha1
kind: TrafficPolicy
metadata: {name: api, namespace: shop}
spec:
  service: api
  timeouts: {idle: 300ms}
"#;
    let mesh = Pair::start(echo.addr, "tcp", policy).await;
    let mut conn = TcpStream::connect(mesh.outbound).await.expect("connect");
    conn.write_all(b"ping").await.expect("write");
    let mut buf = [0u8; 4];
    conn.read_exact(&mut buf).await.expect("echo");
    assert_eq!(&buf, b"ping");

    // Now say nothing: the outbound sidecar closes us after 300 ms idle.
    let start = Instant::now();
    let mut rest = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), conn.read_to_end(&mut rest))
        .await
        .expect("closed by the proxy before our bound")
        .ok();
    assert!(start.elapsed() < Duration::from_secs(5));
}

#[tokio::test]
async fn shutdown_waits_for_open_tcp_streams() {
    let echo = TcpEcho::start().await;
    let mut mesh = Pair::start(echo.addr, "tcp", "").await;
    let mut conn = TcpStream::connect(mesh.outbound).await.expect("connect");
    conn.write_all(b"one").await.expect("write");
    let mut buf = [0u8; 3];
    conn.read_exact(&mut buf).await.expect("echo");

    mesh.client.signal("TERM");
    // New connections are refused once the listener closes...
    let deadline = Instant::now() + Duration::from_secs(5);
    while TcpStream::connect(mesh.outbound).await.is_ok() {
        assert!(
            Instant::now() < deadline,
            "listener still open after SIGTERM"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // ...but the open stream keeps working until the client ends it.
    conn.write_all(b"two").await.expect("write after SIGTERM");
    conn.read_exact(&mut buf).await.expect("echo after SIGTERM");
    assert_eq!(&buf, b"two");
    conn.shutdown().await.expect("shutdown");
    let mut rest = Vec::new();
    conn.read_to_end(&mut rest).await.expect("read to end");
    assert_eq!(rest, b"bye");
    let status = mesh.client.wait_exit(Duration::from_secs(10)).await;
    assert!(status.success(), "{status:?}");
}
