//! Graceful shutdown: SIGTERM stops accepting but lets in-flight requests
//! finish, then the process exits 0.

use std::time::{Duration, Instant};

use outrigger_e2e::Pair;
use outrigger_e2e::clients::{self, get, read_body};
use outrigger_e2e::upstream::HttpUpstream;

#[tokio::test]
async fn sigterm_lets_an_in_flight_request_finish() {
    let app = HttpUpstream::start("api").await;
    let mut mesh = Pair::start(app.addr, "http", "").await;
    let client = clients::http1();

    // Start a slow request, and send SIGTERM to both sidecars once the app
    // has it in hand.
    let in_flight = tokio::spawn({
        let client = client.clone();
        let addr = mesh.outbound;
        async move {
            let rsp = client
                .request(get(addr, "/slow?ms=1500"))
                .await
                .expect("response");
            let status = rsp.status();
            (status, read_body(rsp).await.expect("body"))
        }
    });
    app.wait_for_requests(1).await;
    mesh.client.signal("TERM");
    mesh.server.signal("TERM");

    let (status, body) = in_flight.await.expect("join");
    assert_eq!(status, 200, "the in-flight request completed");
    assert_eq!(body, "slow done");

    let code = mesh.client.wait_exit(Duration::from_secs(10)).await;
    assert!(code.success(), "client sidecar exit: {code:?}");
    let code = mesh.server.wait_exit(Duration::from_secs(10)).await;
    assert!(code.success(), "server sidecar exit: {code:?}");
    // Nothing listens any more.
    assert!(tokio::net::TcpStream::connect(mesh.outbound).await.is_err());
}

#[tokio::test]
async fn drain_deadline_bounds_shutdown() {
    let app = HttpUpstream::start("api").await;
    let mut mesh = Pair::start_with(app.addr, "http", "", &["--drain-deadline", "300ms"]).await;
    let client = clients::http1();
    let stuck = tokio::spawn({
        let addr = mesh.outbound;
        async move {
            client
                .request(get(addr, "/slow?ms=30000"))
                .await
                .map(|r| r.status())
        }
    });
    app.wait_for_requests(1).await;
    let start = Instant::now();
    mesh.client.signal("INT");
    let code = mesh.client.wait_exit(Duration::from_secs(10)).await;
    assert!(code.success(), "exit 0 after the deadline: {code:?}");
    assert!(start.elapsed() < Duration::from_secs(5));
    // The stuck request was cut when the process exited.
    let result = tokio::time::timeout(Duration::from_secs(10), stuck)
        .await
        .expect("bounded")
        .expect("join");
    assert!(result.is_err(), "{result:?}");
}

#[tokio::test]
async fn ready_turns_false_while_draining() {
    let app = HttpUpstream::start("api").await;
    let mut mesh = Pair::start(app.addr, "http", "").await;
    let client = clients::http1();
    // Keep a request in flight so the drain lasts long enough to observe.
    let in_flight = tokio::spawn({
        let addr = mesh.outbound;
        async move {
            client
                .request(get(addr, "/slow?ms=2000"))
                .await
                .map(|r| r.status())
        }
    });
    app.wait_for_requests(1).await;
    mesh.client.signal("TERM");
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let (status, body) = mesh.client.admin_get("/ready").await;
        if status == 503 {
            assert!(body.contains("draining"), "{body}");
            break;
        }
        assert!(Instant::now() < deadline, "/ready never went 503");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(mesh.client.admin_get("/live").await.0, 200);
    assert_eq!(in_flight.await.expect("join").expect("completed"), 200);
    assert!(
        mesh.client
            .wait_exit(Duration::from_secs(10))
            .await
            .success()
    );
}
