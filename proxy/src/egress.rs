//! A shared outbound port: the app sends requests for several Services to
//! one local port, and each request's `Host` (or HTTP/2 `:authority`)
//! picks the Service. The Workload lists the Services this port may
//! reach; that list is the egress allow-list, so a request for any other
//! host is answered here with 403 and never leaves the sidecar.
//!
//! A Service `ns/name` answers to `name.ns`, `name.ns.svc` and
//! `name.ns.svc.<cluster domain>`, and to plain `name` from a workload in
//! the same namespace; case, a trailing dot and a port are ignored. The
//! names are worked out once per configuration into a [`HostTable`], so a
//! request costs one hash lookup.

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use arc_swap::ArcSwap;
use http::{Request, Response, StatusCode, header};
use hyper::body::Incoming;
use outrigger_config::ResourceRef;
use tower::{Service, ServiceExt};

use crate::errors::error_response;
use crate::http::body::ProxyBody;
use crate::http::server::HttpService;

pub const DENIED_TOTAL: &str = "outrigger_egress_denied_total";

/// One Service reachable through the shared port, with the stack that
/// carries its requests.
#[derive(Clone, Debug)]
pub struct HostRoute<S> {
    pub service: ResourceRef,
    /// What a configuration change updates in place (the destination and
    /// timeout behind `stack`).
    pub state: S,
    pub stack: HttpService,
}

/// The Services one shared port reaches, by every host name they answer to.
#[derive(Debug)]
pub struct HostTable<S> {
    /// Shown in refusals and metrics.
    workload: Arc<str>,
    routes: Vec<HostRoute<S>>,
    /// Lowercase host name → index into `routes`.
    hosts: HashMap<Box<str>, usize>,
    /// What a refusal tells the app this port does reach.
    reachable: String,
}

impl<S> HostTable<S> {
    /// `workload`: the workload this sidecar runs (its namespace is where
    /// short host names resolve).
    pub fn new(workload: &ResourceRef, routes: Vec<HostRoute<S>>) -> Self {
        let mut hosts = HashMap::new();
        for (i, route) in routes.iter().enumerate() {
            for name in host_names(&route.service, &workload.namespace) {
                hosts.insert(name.into_boxed_str(), i);
            }
        }
        let reachable = routes
            .iter()
            .map(|r| r.service.to_string())
            .collect::<Vec<_>>()
            .join(", ");
        Self {
            workload: Arc::from(workload.to_string()),
            routes,
            hosts,
            reachable,
        }
    }

    pub fn routes(&self) -> &[HostRoute<S>] {
        &self.routes
    }

    /// The route for a request's host (as sent: any case, maybe a port or
    /// a trailing dot).
    pub fn route(&self, host: &str) -> Option<&HostRoute<S>> {
        let host = strip_port(host);
        let host = host.strip_suffix('.').unwrap_or(host);
        let lowered;
        let host = if host.bytes().any(|b| b.is_ascii_uppercase()) {
            lowered = host.to_ascii_lowercase();
            lowered.as_str()
        } else {
            host
        };
        let found = self.hosts.get(host).or_else(|| {
            // `name.ns.svc.<any cluster domain>`: the cluster domain is not
            // ours to know, so any suffix after `.svc.` will do.
            let (service, _domain) = host.split_once(".svc.")?;
            self.hosts.get(format!("{service}.svc").as_str())
        });
        found.and_then(|&i| self.routes.get(i))
    }
}

/// The names `service` answers to, for a caller in `namespace`.
fn host_names(service: &ResourceRef, namespace: &str) -> Vec<String> {
    let ResourceRef {
        namespace: ns,
        name,
    } = service;
    let mut names = vec![
        format!("{name}.{ns}"),
        format!("{name}.{ns}.svc"),
        format!("{name}.{ns}.svc.cluster.local"),
    ];
    if ns == namespace {
        names.push(name.clone());
    }
    names
}

/// `host:port` → `host`. An IPv6 literal (`[::1]:80`) keeps its brackets;
/// it names no Service either way.
fn strip_port(host: &str) -> &str {
    match host.rsplit_once(':') {
        Some((name, port)) if !name.ends_with(':') && port.bytes().all(|b| b.is_ascii_digit()) => {
            name
        }
        _ => host,
    }
}

/// The host a request is for: the URI's authority (HTTP/2, or an HTTP/1
/// request in absolute form as an HTTP proxy client sends it), else the
/// `Host` header.
fn request_host<B>(req: &Request<B>) -> Option<&str> {
    if let Some(authority) = req.uri().authority() {
        return Some(authority.as_str());
    }
    req.headers().get(header::HOST)?.to_str().ok()
}

pub type SharedHostTable<S> = Arc<ArcSwap<HostTable<S>>>;

/// The shared port's HTTP service: routes each request by host, or
/// refuses it.
#[derive(Debug)]
pub struct ByHost<S> {
    table: SharedHostTable<S>,
}

impl<S> Clone for ByHost<S> {
    fn clone(&self) -> Self {
        Self {
            table: self.table.clone(),
        }
    }
}

impl<S> ByHost<S> {
    pub fn new(table: SharedHostTable<S>) -> Self {
        Self { table }
    }
}

type ResponseFuture = Pin<Box<dyn Future<Output = Result<Response<ProxyBody>, Infallible>> + Send>>;

impl<S> Service<Request<Incoming>> for ByHost<S> {
    type Response = Response<ProxyBody>;
    type Error = Infallible;
    type Future = ResponseFuture;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<Incoming>) -> ResponseFuture {
        // The table a request starts with decides it, even if a new
        // configuration lands while it runs.
        let table = self.table.load();
        let Some(host) = request_host(&req) else {
            let rsp = error_response(
                StatusCode::BAD_REQUEST,
                "no-host",
                "this port serves several Services and picks one by the Host header, but the request has none".to_string(),
            );
            return Box::pin(std::future::ready(Ok(rsp)));
        };
        match table.route(host) {
            Some(route) => Box::pin(route.stack.clone().oneshot(req)),
            None => {
                tracing::info!(workload = %table.workload, host, method = %req.method(), path = %req.uri().path(), "egress refused: the host is not a destination this workload declares");
                metrics::counter!(DENIED_TOTAL, "workload" => table.workload.to_string())
                    .increment(1);
                let rsp = error_response(
                    StatusCode::FORBIDDEN,
                    "egress-denied",
                    format!(
                        "egress to {host:?} refused: {} declares no such destination on this port; it reaches {} (as NAME.NAMESPACE, NAME.NAMESPACE.svc.cluster.local, or NAME in its own namespace)",
                        table.workload, table.reachable
                    ),
                );
                Box::pin(std::future::ready(Ok(rsp)))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tower::util::BoxCloneSyncService;

    fn route(service: ResourceRef) -> HostRoute<()> {
        HostRoute {
            service,
            state: (),
            stack: BoxCloneSyncService::new(tower::service_fn(|_| async {
                Ok::<_, Infallible>(Response::new(crate::http::body::empty()))
            })),
        }
    }

    fn table() -> HostTable<()> {
        HostTable::new(
            &ResourceRef::new("shop", "web"),
            vec![
                route(ResourceRef::new("shop", "api")),
                route(ResourceRef::new("ops", "db")),
            ],
        )
    }

    fn routed(table: &HostTable<()>, host: &str) -> Option<String> {
        table.route(host).map(|r| r.service.to_string())
    }

    #[test]
    fn services_answer_to_their_dns_names() {
        let table = table();
        for host in [
            "api",
            "api.shop",
            "api.shop.svc",
            "api.shop.svc.cluster.local",
            "api.shop.svc.cluster.local.",
            "api.shop.svc.corp.example",
            "API.Shop",
            "api:8080",
            "api.shop.svc.cluster.local:80",
        ] {
            assert_eq!(routed(&table, host).as_deref(), Some("shop/api"), "{host}");
        }
        assert_eq!(routed(&table, "db.ops").as_deref(), Some("ops/db"));
        // Whatever follows `.svc.` is taken for the cluster domain: the
        // request still goes to shop/api, never to a host of that name.
        assert_eq!(
            routed(&table, "api.shop.svc.example.org").as_deref(),
            Some("shop/api")
        );
    }

    #[test]
    fn other_hosts_route_nowhere() {
        let table = table();
        for host in [
            "db", // another namespace needs NAME.NAMESPACE
            "payments.shop",
            "localhost",
            "127.0.0.1:4140",
            "[::1]:4140",
            "shop",
            "",
            ".svc.",
        ] {
            assert_eq!(routed(&table, host), None, "{host}");
        }
    }

    #[test]
    fn ports_are_stripped_but_not_ipv6_literals() {
        assert_eq!(strip_port("api:80"), "api");
        assert_eq!(strip_port("api"), "api");
        assert_eq!(strip_port("[::1]:80"), "[::1]");
        assert_eq!(strip_port("::1"), "::1");
    }
}
