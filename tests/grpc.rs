//! gRPC through the sidecar pair: unary (with error status in trailers) and
//! bidirectional streaming, where each reply must arrive before the next
//! request is sent (so nothing is buffered along the way).

use std::time::Duration;

use futures_util::StreamExt;
use outrigger_e2e::Pair;
use outrigger_e2e::grpc::{EchoClient, pb::EchoRequest, start_server};
use tokio::sync::mpsc;

async fn client(addr: std::net::SocketAddr) -> EchoClient<tonic::transport::Channel> {
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .expect("endpoint")
        .connect_timeout(Duration::from_secs(5))
        .connect()
        .await
        .expect("connect");
    EchoClient::new(channel)
}

fn request(message: &str) -> EchoRequest {
    EchoRequest {
        message: message.to_string(),
        trailers: Default::default(),
    }
}

#[tokio::test]
async fn unary_calls_and_error_statuses() {
    let (app, _server) = start_server().await;
    let mesh = Pair::start(app, "http", "").await;
    let mut client = client(mesh.outbound).await;

    let reply = client.unary(request("hello")).await.expect("unary ok");
    assert_eq!(reply.into_inner().message, "hello");

    // The status travels in trailers (a trailers-only response); it must
    // come through both hops unchanged.
    let status = client.unary(request("fail")).await.expect_err("must fail");
    assert_eq!(status.code(), tonic::Code::FailedPrecondition);
    assert_eq!(status.message(), "asked to fail");
}

/// Retries on `unavailable` for shop/api.
const RETRY_UNAVAILABLE: &str = "---\napiVersion: outrigger.io/v1alpha1\nkind: TrafficPolicy\n\
    metadata: {name: api, namespace: shop}\nspec:\n  service: api\n  retries:\n    attempts: 2\n    \
    retryOn: []\n    retriableGrpcCodes: [unavailable]\n";

#[tokio::test]
async fn a_grpc_status_named_in_the_policy_is_retried() {
    let (app, _server) = start_server().await;
    // Without a policy the first call's UNAVAILABLE reaches the client.
    let plain = Pair::start(app, "http", "").await;
    let mut client_plain = client(plain.outbound).await;
    let status = client_plain
        .unary(request("flaky"))
        .await
        .expect_err("no retry");
    assert_eq!(status.code(), tonic::Code::Unavailable);

    let (app, _server) = start_server().await;
    let mesh = Pair::start(app, "http", RETRY_UNAVAILABLE).await;
    let mut client = client(mesh.outbound).await;
    for _ in 0..3 {
        let reply = client
            .unary(request("flaky"))
            .await
            .expect("saved by a retry");
        assert_eq!(reply.into_inner().message, "flaky");
    }
    // Other codes are final.
    let status = client
        .unary(request("fail"))
        .await
        .expect_err("not retried");
    assert_eq!(status.code(), tonic::Code::FailedPrecondition);
}

#[tokio::test]
async fn bidirectional_streaming() {
    for extra in ["", RETRY_UNAVAILABLE] {
        bidirectional_streaming_with(extra).await;
    }
}

/// A stream stays a stream with or without a retry policy (whose body
/// replay must not hold messages back).
async fn bidirectional_streaming_with(extra: &str) {
    let (app, _server) = start_server().await;
    let mesh = Pair::start(app, "http", extra).await;
    let mut client = client(mesh.outbound).await;

    let (tx, rx) = mpsc::channel::<EchoRequest>(1);
    let outbound = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|item| (item, rx))
    });
    let mut replies = client.chat(outbound).await.expect("chat").into_inner();
    for i in 0..5u64 {
        tx.send(request(&format!("message {i}")))
            .await
            .expect("send");
        let reply = tokio::time::timeout(Duration::from_secs(10), replies.next())
            .await
            .expect("reply arrives while the stream is open")
            .expect("stream open")
            .expect("reply ok");
        assert_eq!(reply.message, format!("message {i}"));
        assert_eq!(reply.sequence, i);
    }
    drop(tx);
    let end = tokio::time::timeout(Duration::from_secs(10), replies.next())
        .await
        .expect("stream ends");
    assert!(
        end.is_none(),
        "clean end of stream (status OK in trailers): {end:?}"
    );
}
