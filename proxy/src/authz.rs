//! Inbound authorization, a layer after mTLS: the caller's verified
//! SPIFFE ID, the method, path and port against the workload's policies
//! (see `outrigger_config::authz` for the rules, shared with the control
//! plane's `authz check`).
//!
//! The policies are compiled once per configuration into an
//! [`Authorizer`] behind an arc-swap: each request loads the current one
//! and is decided by it, so a change applies to the next request and a
//! request in flight keeps the decision it got. Without mTLS there is no
//! verified caller, so nothing is enforced (the sidecar says so in its
//! log and in `/config`).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use arc_swap::ArcSwapOption;
use http::Request;
use outrigger_config::authz::{Authorizer, AuthzRequest};
use tower::{Layer, Service};

use crate::BoxError;
use crate::errors::ProxyError;
use crate::http::PeerId;

pub const DENIED_TOTAL: &str = "outrigger_authz_denied_total";

/// `None`: not enforced.
pub type SharedAuthorizer = Arc<ArcSwapOption<Authorizer>>;

#[derive(Clone, Debug)]
pub struct AuthzLayer {
    authorizer: SharedAuthorizer,
    workload: Arc<str>,
    /// The inbound port this listener serves (rules may name ports).
    port: u16,
}

impl AuthzLayer {
    pub fn new(authorizer: SharedAuthorizer, workload: Arc<str>, port: u16) -> Self {
        Self {
            authorizer,
            workload,
            port,
        }
    }
}

impl AuthzLayer {
    /// Opaque TCP: decided once, at connection time, on the caller's
    /// identity and the port (rules naming methods or paths never match).
    /// Logs and counts a refusal.
    pub fn allows_connection(&self, principal: Option<&str>) -> bool {
        let authorizer = self.authorizer.load();
        let Some(authorizer) = authorizer.as_ref() else {
            return true;
        };
        let decision = authorizer.decide(&AuthzRequest {
            principal,
            method: "",
            path: "",
            port: self.port,
        });
        if !decision.allowed() {
            let caller = principal.unwrap_or("(no identity)");
            tracing::info!(workload = %self.workload, %caller, port = self.port, "TCP connection {decision}");
            metrics::counter!(DENIED_TOTAL, "workload" => self.workload.to_string(), "identity" => caller.to_string())
                .increment(1);
        }
        decision.allowed()
    }
}

impl<S> Layer<S> for AuthzLayer {
    type Service = Authz<S>;
    fn layer(&self, inner: S) -> Authz<S> {
        Authz {
            inner,
            layer: self.clone(),
        }
    }
}

#[derive(Clone, Debug)]
pub struct Authz<S> {
    inner: S,
    layer: AuthzLayer,
}

impl<S, B> Service<Request<B>> for Authz<S>
where
    S: Service<Request<B>, Error = BoxError>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<S::Response, BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        let authorizer = self.layer.authorizer.load();
        if let Some(authorizer) = authorizer.as_ref() {
            let principal = req.extensions().get::<PeerId>().map(|p| &*p.0);
            let decision = authorizer.decide(&AuthzRequest {
                principal,
                method: req.method().as_str(),
                path: req.uri().path(),
                port: self.layer.port,
            });
            if !decision.allowed() {
                let caller = principal.unwrap_or("(no identity)");
                tracing::info!(workload = %self.layer.workload, %caller, method = %req.method(), path = %req.uri().path(), "{decision}");
                metrics::counter!(DENIED_TOTAL, "workload" => self.layer.workload.to_string(), "identity" => caller.to_string())
                    .increment(1);
                let error = ProxyError::Forbidden {
                    method: req.method().to_string(),
                    path: req.uri().path().to_string(),
                };
                return Box::pin(async move { Err(error.into()) });
            }
        }
        Box::pin(self.inner.call(req))
    }
}
