//! A gRPC echo service (tonic), generated from `harness/proto/echo.proto`.

use std::net::SocketAddr;
use std::pin::Pin;

use futures_util::{Stream, StreamExt};
use tonic::{Request, Response, Status, Streaming};

#[allow(clippy::all, unused_qualifications)]
pub mod pb {
    tonic::include_proto!("outrigger.test.echo");
}

pub use pb::echo_client::EchoClient;
use pb::echo_server::{Echo, EchoServer};
use pb::{EchoReply, EchoRequest};

/// Echoes. `fail` fails with FAILED_PRECONDITION; `flaky` fails with
/// UNAVAILABLE every other time (the first included).
#[derive(Default)]
struct EchoService {
    flaky: std::sync::atomic::AtomicUsize,
}

type ReplyStream = Pin<Box<dyn Stream<Item = Result<EchoReply, Status>> + Send>>;

#[tonic::async_trait]
impl Echo for EchoService {
    async fn unary(&self, req: Request<EchoRequest>) -> Result<Response<EchoReply>, Status> {
        let req = req.into_inner();
        if req.message == "fail" {
            return Err(Status::failed_precondition("asked to fail"));
        }
        if req.message == "flaky"
            && self
                .flaky
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
                .is_multiple_of(2)
        {
            return Err(Status::unavailable("flaky: try again"));
        }
        Ok(Response::new(EchoReply {
            message: req.message,
            sequence: 0,
        }))
    }

    type ChatStream = ReplyStream;

    async fn chat(
        &self,
        req: Request<Streaming<EchoRequest>>,
    ) -> Result<Response<Self::ChatStream>, Status> {
        let incoming = req.into_inner();
        let replies = incoming.enumerate().map(|(i, item)| {
            item.map(|r| EchoReply {
                message: r.message,
                sequence: i as u64,
            })
        });
        Ok(Response::new(Box::pin(replies)))
    }
}

/// Starts the echo gRPC server on 127.0.0.1:0.
pub async fn start_server() -> (SocketAddr, tokio::task::JoinHandle<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind grpc");
    let addr = listener.local_addr().expect("addr");
    let incoming = tonic::transport::server::TcpIncoming::from(listener);
    let task = tokio::spawn(async move {
        let _ = tonic::transport::Server::builder()
            .add_service(EchoServer::new(EchoService::default()))
            .serve_with_incoming(incoming)
            .await;
    });
    (addr, task)
}
