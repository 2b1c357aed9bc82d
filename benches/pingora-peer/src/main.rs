//! pingora-peer: a minimal HTTP/1.1 reverse proxy on Cloudflare's pingora,
//! used as a comparison peer by Outrigger's benchmarks. Every request goes
//! to one upstream over pooled keep-alive connections; plaintext both ways.

use std::net::{SocketAddr, TcpListener};
use std::os::fd::{IntoRawFd, RawFd};
use std::process::exit;

use async_trait::async_trait;
use pingora_core::Result;
use pingora_core::server::configuration::ServerConf;
use pingora_core::server::{ListenFds, Server, ShutdownWatch};
use pingora_core::services::Service;
use pingora_core::upstreams::peer::HttpPeer;
use pingora_proxy::{ProxyHttp, Session, http_proxy_service};

const USAGE: &str = "usage: pingora-peer --listen ADDR:PORT --upstream ADDR:PORT [--threads N]";

/// Forwards every request, unchanged, to one upstream.
struct Forward {
    upstream: SocketAddr,
}

#[async_trait]
impl ProxyHttp for Forward {
    type CTX = ();
    fn new_ctx(&self) {}

    async fn upstream_peer(&self, _: &mut Session, _: &mut ()) -> Result<Box<HttpPeer>> {
        // Plaintext (tls = false), so no SNI. Pingora pools the connection
        // for reuse by peer, so requests after the first reuse keep-alives.
        Ok(Box::new(HttpPeer::new(self.upstream, false, String::new())))
    }
    // The default `logging` hook does nothing: no access log.
}

/// Wraps pingora's listening service so that it accepts on a socket we
/// bound ourselves. Pingora binds inside a runtime task and, on failure,
/// panics there while the process lives on, and it cannot tell us what a
/// port-0 bind chose. Binding in `main` gives a clean error exit, port 0,
/// and a "listening" line that is true when printed. Pingora takes a
/// pre-bound socket from its fd table (the table it fills during a graceful
/// upgrade) when the key matches the listening address string.
struct PreBound<S> {
    inner: S,
    addr: String,
    fd: RawFd,
}

#[async_trait]
impl<S: Service> Service for PreBound<S> {
    async fn start_service(
        &mut self,
        fds: Option<ListenFds>,
        shutdown: ShutdownWatch,
        listeners_per_fd: usize,
    ) {
        if let Some(fds) = &fds {
            fds.lock().add(self.addr.clone(), self.fd);
        }
        self.inner
            .start_service(fds, shutdown, listeners_per_fd)
            .await
    }
    fn name(&self) -> &str {
        self.inner.name()
    }
    fn threads(&self) -> Option<usize> {
        self.inner.threads()
    }
    fn listen_addresses(&self) -> Option<Vec<String>> {
        self.inner.listen_addresses()
    }
}

struct Args {
    listen: SocketAddr,
    upstream: SocketAddr,
    threads: usize,
}

fn parse_args() -> std::result::Result<Args, String> {
    let (mut listen, mut upstream, mut threads) = (None, None, 1);
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let value = it.next().ok_or_else(|| format!("{flag} needs a value"))?;
        let bad = |e: &dyn std::fmt::Display| format!("{flag} {value}: {e}");
        match flag.as_str() {
            "--listen" => listen = Some(value.parse().map_err(|e| bad(&e))?),
            "--upstream" => upstream = Some(value.parse().map_err(|e| bad(&e))?),
            "--threads" => threads = value.parse().map_err(|e| bad(&e))?,
            _ => return Err(format!("unknown argument {flag}")),
        }
    }
    Ok(Args {
        listen: listen.ok_or("--listen is required")?,
        upstream: upstream.ok_or("--upstream is required")?,
        threads,
    })
}

/// Pingora logs through the `log` crate; show warnings and errors only.
struct StderrLog;
impl log::Log for StderrLog {
    fn enabled(&self, m: &log::Metadata<'_>) -> bool {
        m.level() <= log::Level::Warn
    }
    fn log(&self, r: &log::Record<'_>) {
        if self.enabled(r.metadata()) {
            eprintln!("pingora-peer: {} {}: {}", r.level(), r.target(), r.args());
        }
    }
    fn flush(&self) {}
}

fn main() {
    let args = parse_args().unwrap_or_else(|e| {
        eprintln!("pingora-peer: {e}\n{USAGE}");
        exit(2)
    });
    log::set_logger(&StderrLog).expect("the only logger");
    log::set_max_level(log::LevelFilter::Warn);

    let listener = TcpListener::bind(args.listen).unwrap_or_else(|e| {
        eprintln!("pingora-peer: bind {}: {e}", args.listen);
        exit(1)
    });
    let addr = listener.local_addr().expect("bound socket has an address");
    // Tokio (under pingora) needs a non-blocking socket.
    listener.set_nonblocking(true).expect("set_nonblocking");

    let conf = ServerConf {
        threads: args.threads,
        // SIGTERM: stop accepting, then exit within about a second instead
        // of pingora's default 5-minute grace period.
        grace_period_seconds: Some(0),
        graceful_shutdown_timeout_seconds: Some(1),
        ..ServerConf::default()
    };
    let mut server = Server::new_with_opt_and_conf(None, conf);
    server.bootstrap();

    let mut proxy = http_proxy_service(
        &server.configuration,
        Forward {
            upstream: args.upstream,
        },
    );
    proxy.add_tcp(&addr.to_string());
    server.add_service(PreBound {
        inner: proxy,
        addr: addr.to_string(),
        fd: listener.into_raw_fd(), // pingora owns and closes it from here
    });

    // The kernel queues connections from here on, so this is already true.
    println!(r#"{{"event":"listening","addr":"{addr}"}}"#);
    server.run_forever();
}
