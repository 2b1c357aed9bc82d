//! Header hygiene for a proxy hop (RFC 9110 §7.6).
//!
//! On the way in: drop hop-by-hop headers (and any header the `Connection`
//! header names), drop any `x-outrigger-client-id` (only the inbound sidecar
//! may set it, from a verified certificate), and record the hop in
//! `x-forwarded-for` and `forwarded`. On the way out: drop hop-by-hop
//! headers from the response.

use std::net::IpAddr;
use std::task::{Context, Poll};

use futures_util::TryFutureExt;
use futures_util::future::MapOk;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Request, Response};
use tower::{Layer, Service};

use crate::http::{ClientAddr, PeerId};

/// Set by the inbound sidecar to the caller's verified SPIFFE ID; never
/// trusted from the network.
pub const CLIENT_ID_HEADER: HeaderName = HeaderName::from_static("x-outrigger-client-id");

const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");
const KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");

/// Removes hop-by-hop headers in place. `te: trailers` survives (gRPC needs
/// it end to end, and HTTP/2 allows exactly that value).
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // Headers named as connection options are hop-by-hop too.
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .collect();
    for name in named {
        headers.remove(name);
    }
    let wants_trailers = headers.get_all(header::TE).iter().any(|v| {
        v.to_str()
            .map(|s| {
                s.split(',')
                    .any(|t| t.trim().eq_ignore_ascii_case("trailers"))
            })
            .unwrap_or(false)
    });
    for name in [
        header::CONNECTION,
        PROXY_CONNECTION,
        KEEP_ALIVE,
        header::TE,
        header::TRANSFER_ENCODING,
        header::UPGRADE,
    ] {
        headers.remove(name);
    }
    if wants_trailers {
        headers.insert(header::TE, HeaderValue::from_static("trailers"));
    }
}

/// Appends this hop's client to `x-forwarded-for` and `forwarded`.
pub fn append_forwarded(headers: &mut HeaderMap, client: IpAddr) {
    let ip = client.to_string();
    let xff = match joined(headers, &X_FORWARDED_FOR) {
        Some(prev) => format!("{prev}, {ip}"),
        None => ip.clone(),
    };
    // RFC 7239: IPv6 addresses are bracketed and quoted.
    let node = match client {
        IpAddr::V4(_) => ip,
        IpAddr::V6(_) => format!("\"[{ip}]\""),
    };
    let fwd = match joined(headers, &header::FORWARDED) {
        Some(prev) => format!("{prev}, for={node};proto=http"),
        None => format!("for={node};proto=http"),
    };
    for (name, value) in [(X_FORWARDED_FOR, xff), (header::FORWARDED, fwd)] {
        if let Ok(v) = HeaderValue::try_from(value) {
            headers.insert(name, v);
        }
    }
}

/// All values of a header joined with ", " (how lists combine per RFC 9110).
fn joined(headers: &HeaderMap, name: &HeaderName) -> Option<String> {
    let mut values = headers.get_all(name).iter().filter_map(|v| v.to_str().ok());
    let first = values.next()?;
    Some(values.fold(first.to_string(), |mut acc, v| {
        acc.push_str(", ");
        acc.push_str(v);
        acc
    }))
}

// === HeadersLayer ===

#[derive(Clone, Copy, Debug, Default)]
pub struct HeadersLayer;

#[derive(Clone, Debug)]
pub struct Headers<S> {
    inner: S,
}

impl<S> Layer<S> for HeadersLayer {
    type Service = Headers<S>;
    fn layer(&self, inner: S) -> Headers<S> {
        Headers { inner }
    }
}

type RspFn<B> = fn(Response<B>) -> Response<B>;

impl<S, ReqB, RspB> Service<Request<ReqB>> for Headers<S>
where
    S: Service<Request<ReqB>, Response = Response<RspB>>,
{
    type Response = Response<RspB>;
    type Error = S::Error;
    type Future = MapOk<S::Future, RspFn<RspB>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<ReqB>) -> Self::Future {
        let client = req.extensions().get::<ClientAddr>().map(|c| c.0.ip());
        let upgrade = crate::upgrade::requested(req.headers());
        let headers = req.headers_mut();
        strip_hop_by_hop(headers);
        if let Some(protocol) = upgrade {
            crate::upgrade::restore(headers, protocol);
        }
        headers.remove(CLIENT_ID_HEADER);
        // Only a sidecar may mark a request as carried over HTTP/2; on the
        // inbound side the mark is consumed before this layer.
        headers.remove(crate::orig_proto::ORIG_PROTO);
        if let Some(ip) = client {
            append_forwarded(headers, ip);
        }
        if let Some(PeerId(id)) = req.extensions().get::<PeerId>()
            && let Ok(value) = HeaderValue::from_str(id)
        {
            req.headers_mut().insert(CLIENT_ID_HEADER, value);
        }
        self.inner.call(req).map_ok(strip_response as RspFn<RspB>)
    }
}

fn strip_response<B>(mut rsp: Response<B>) -> Response<B> {
    let switching = rsp.status() == http::StatusCode::SWITCHING_PROTOCOLS;
    let protocol = rsp.headers().get(header::UPGRADE).cloned();
    strip_hop_by_hop(rsp.headers_mut());
    if let (true, Some(protocol)) = (switching, protocol) {
        crate::upgrade::restore(rsp.headers_mut(), protocol);
    }
    rsp
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                HeaderName::from_bytes(k.as_bytes()).expect("name"),
                HeaderValue::from_str(v).expect("value"),
            );
        }
        h
    }

    #[test]
    fn removes_hop_by_hop_and_connection_options() {
        let mut h = map(&[
            ("connection", "keep-alive, x-secret"),
            ("x-secret", "1"),
            ("keep-alive", "timeout=5"),
            ("proxy-connection", "keep-alive"),
            ("transfer-encoding", "chunked"),
            ("upgrade", "websocket"),
            ("te", "gzip"),
            ("x-kept", "yes"),
        ]);
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1, "{h:?}");
        assert_eq!(h["x-kept"], "yes");
    }

    #[test]
    fn te_trailers_survives() {
        let mut h = map(&[("te", "gzip, trailers")]);
        strip_hop_by_hop(&mut h);
        assert_eq!(h["te"], "trailers");
    }

    #[test]
    fn forwarded_headers_append() {
        let mut h = map(&[
            ("x-forwarded-for", "10.0.0.1"),
            ("x-forwarded-for", "10.0.0.2"),
        ]);
        append_forwarded(&mut h, "127.0.0.1".parse().expect("ip"));
        assert_eq!(h["x-forwarded-for"], "10.0.0.1, 10.0.0.2, 127.0.0.1");
        assert_eq!(h["forwarded"], "for=127.0.0.1;proto=http");
        append_forwarded(&mut h, "::1".parse().expect("ip"));
        assert_eq!(
            h["forwarded"],
            "for=127.0.0.1;proto=http, for=\"[::1]\";proto=http"
        );
    }
}
