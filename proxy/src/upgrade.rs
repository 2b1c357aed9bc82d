//! HTTP/1.1 connection upgrades (WebSocket and friends) through the proxy.
//!
//! An upgrade request keeps its `Upgrade` header through each hop (it is
//! otherwise hop-by-hop), and rides its own HTTP/1.1 connection, never
//! the multiplexed pool. When the upstream answers `101 Switching
//! Protocols`, both connections are handed over by hyper and the bytes
//! are copied both ways until either side closes.

use http::header::{self, HeaderMap, HeaderValue};
use http::{Request, Response, StatusCode};
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;

/// The protocol an HTTP/1.1 request asks to switch to, if it asks
/// properly: an `Upgrade` header and `upgrade` among the `Connection`
/// options.
pub fn requested(headers: &HeaderMap) -> Option<HeaderValue> {
    let asks = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|option| option.trim().eq_ignore_ascii_case("upgrade"));
    asks.then(|| headers.get(header::UPGRADE).cloned())
        .flatten()
}

/// Puts back what hop-by-hop stripping removed from an upgrade request or
/// a `101` answer.
pub fn restore(headers: &mut HeaderMap, protocol: HeaderValue) {
    headers.insert(header::UPGRADE, protocol);
    headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
}

/// Takes the downstream side's upgrade out of `req`, if it asks for one.
pub fn take_downstream<B>(req: &mut Request<B>) -> Option<OnUpgrade> {
    requested(req.headers())?;
    Some(hyper::upgrade::on(req))
}

/// After a `101` from the upstream, joins the two upgraded connections in
/// a task of their own. Any other answer: nothing to do.
pub fn splice<B>(downstream: Option<OnUpgrade>, rsp: &mut Response<B>) {
    let Some(downstream) = downstream else {
        return;
    };
    if rsp.status() != StatusCode::SWITCHING_PROTOCOLS {
        return;
    }
    let upstream = hyper::upgrade::on(rsp);
    tokio::spawn(async move {
        let (down, up) = match tokio::join!(downstream, upstream) {
            (Ok(down), Ok(up)) => (down, up),
            (Err(e), _) | (_, Err(e)) => {
                tracing::debug!(error = %e, "upgrade failed");
                return;
            }
        };
        let (mut down, mut up) = (TokioIo::new(down), TokioIo::new(up));
        match tokio::io::copy_bidirectional(&mut down, &mut up).await {
            Ok((sent, received)) => {
                tracing::debug!(sent, received, "upgraded connection closed")
            }
            Err(e) => tracing::debug!(error = %e, "upgraded connection failed"),
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                header::HeaderName::from_bytes(k.as_bytes()).expect("name"),
                HeaderValue::from_str(v).expect("value"),
            );
        }
        h
    }

    #[test]
    fn an_upgrade_needs_both_headers() {
        let ws = headers(&[
            ("connection", "keep-alive, Upgrade"),
            ("upgrade", "websocket"),
        ]);
        assert_eq!(requested(&ws), Some(HeaderValue::from_static("websocket")));
        assert_eq!(requested(&headers(&[("upgrade", "websocket")])), None);
        assert_eq!(requested(&headers(&[("connection", "upgrade")])), None);
    }
}
