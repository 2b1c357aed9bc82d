//! Changing the running listeners to match a new configuration.
//!
//! A listener is the same listener across configurations as long as its
//! [`ListenerKey`] stays. It then keeps its socket (so its port, even one
//! the OS picked for a configured port 0) and only its route is swapped:
//! each HTTP request, or TCP connection, loads the current route once as it
//! starts and keeps it until done.
//!
//! Every new listener is bound before anything else changes, so a port that
//! cannot be bound leaves the old configuration serving, untouched. The one
//! exception is a port that a removed listener holds (a protocol change on
//! the same port, say): that listener has to close first. If the new one
//! then cannot bind, the old one is bound again.

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use outrigger_config::{MeshConfig, OutboundTarget, Protocol, ResourceRef, Timeouts};
use serde::Serialize;
use tokio::net::TcpListener;
use tower::util::BoxCloneSyncService;

use crate::app::ProxyOptions;
use crate::authz::{AuthzLayer, SharedAuthorizer};
use crate::balance::RoundRobin;
use crate::drain;
use crate::egress::{ByHost, HostRoute, HostTable, SharedHostTable};
use crate::forward::{Destination, DestinationPolicy, SharedDestination};
use crate::http::client::ClientSettings;
use crate::http::server::ServerSettings;
use crate::listener::{self, BindError, ListenerHandle};
use crate::metrics::ConnectionMetrics;
use crate::state::{BoundListener, Direction, LiveDestination, Loaded};
use crate::tcp::{ByteCounters, SharedTcpTarget, TcpTarget};
use crate::tls::MeshTls;
use crate::trace::Tracing;
use crate::transport::{ClientSide, ServerSide};
use crate::{inbound, outbound};
use outrigger_config::authz::Authorizer;

/// Why a configuration was not applied. Whatever the reason, the proxy
/// keeps serving the configuration it had.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    #[error(transparent)]
    Bind(#[from] BindError),
    /// The configuration contradicts itself (validation rules this out for
    /// anything built by `app::load`/`app::load_str`).
    #[error("inconsistent configuration: {0}")]
    Inconsistent(String),
    #[error("the proxy is shutting down; configuration not applied")]
    Draining,
}

/// What changed, listener by listener (names as in `/config`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct ApplySummary {
    /// The version now running.
    pub version: String,
    pub added: Vec<String>,
    pub removed: Vec<String>,
    /// Kept listeners whose route (endpoints, timeouts, app port) changed.
    pub updated: Vec<String>,
    pub unchanged: usize,
}

impl fmt::Display for ApplySummary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "version {}: {} added, {} removed, {} updated, {} unchanged",
            self.version,
            self.added.len(),
            self.removed.len(),
            self.updated.len(),
            self.unchanged
        )
    }
}

/// What makes a listener the same listener in two configurations.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ListenerKey {
    pub direction: Direction,
    /// As configured: 0 (any free port) stays 0 here, so such a listener
    /// keeps the port it was given.
    pub port: u16,
    /// Inbound: the listener's name; outbound: the service.
    pub name: String,
    pub protocol: Protocol,
    /// Tells apart listeners that are otherwise equal (two port-0 outbound
    /// listeners for one service).
    pub ordinal: usize,
}

impl ListenerKey {
    fn same_but_ordinal(&self, other: &ListenerKey) -> bool {
        self.direction == other.direction
            && self.port == other.port
            && self.name == other.name
            && self.protocol == other.protocol
    }
}

/// One listener as a configuration asks for it.
#[derive(Clone, Debug, PartialEq)]
pub struct ListenerSpec {
    pub key: ListenerKey,
    /// `inbound/<name>` or `outbound/<service>`: logs and metric labels.
    pub name: String,
    pub bind: SocketAddr,
    pub route: RouteSpec,
}

/// Where a listener sends its traffic, and how.
#[derive(Clone, Debug, PartialEq)]
pub enum RouteSpec {
    /// To the local app.
    Inbound {
        workload: String,
        app: SocketAddr,
        idle_timeout: Duration,
    },
    /// To the endpoints of a service.
    Outbound(Box<OutboundRoute>),
    /// To one of several services, chosen by each request's host; any
    /// other host is refused (the egress allow-list).
    ByHost {
        /// The workload this sidecar runs: short host names resolve in
        /// its namespace.
        workload: ResourceRef,
        routes: Vec<OutboundRoute>,
    },
}

impl RouteSpec {
    /// The services this route reaches.
    pub fn outbound_routes(&self) -> &[OutboundRoute] {
        match self {
            RouteSpec::Inbound { .. } => &[],
            RouteSpec::Outbound(route) => std::slice::from_ref(&**route),
            RouteSpec::ByHost { routes, .. } => routes,
        }
    }
}

/// One service, and how its requests are sent.
#[derive(Clone, Debug, PartialEq)]
pub struct OutboundRoute {
    pub service: ResourceRef,
    pub endpoints: Vec<EndpointSpec>,
    pub timeouts: Timeouts,
    /// Balancing, circuit breaking and retries.
    pub policy: DestinationPolicy,
}

impl OutboundRoute {
    /// Each endpoint with how to reach it: over mTLS when this sidecar has
    /// an identity and the endpoint is in the mesh.
    fn endpoints(&self, tls: Option<&MeshTls>) -> Vec<(SocketAddr, ClientSide)> {
        self.endpoints
            .iter()
            .map(|e| {
                let transport = match tls {
                    Some(tls) => tls.client_side(&e.identities),
                    None => ClientSide::Plaintext,
                };
                (e.addr, transport)
            })
            .collect()
    }

    fn client_settings(&self, server: &ServerSettings) -> ClientSettings {
        ClientSettings {
            connect_timeout: self.timeouts.connect,
            pool_idle_timeout: self.timeouts.idle.min(Duration::from_secs(90)),
            max_header_bytes: server.max_header_bytes,
        }
    }

    fn name(&self) -> Arc<str> {
        Arc::from(self.service.to_string())
    }
}

/// One endpoint of a service, and who must answer there.
#[derive(Clone, Debug, PartialEq)]
pub struct EndpointSpec {
    pub addr: SocketAddr,
    /// The SPIFFE IDs its server may present over mTLS. Empty: the
    /// endpoint is outside the mesh and is reached in plaintext.
    pub identities: Arc<[String]>,
}

/// For log lines: one short line however many endpoints a service has.
impl fmt::Display for RouteSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RouteSpec::Inbound {
                workload,
                app,
                idle_timeout,
            } => write!(f, "{workload} app {app} (idle {idle_timeout:?})"),
            RouteSpec::Outbound(route) => write!(f, "{route}"),
            RouteSpec::ByHost { routes, .. } => {
                f.write_str("by host: ")?;
                for (i, route) in routes.iter().enumerate() {
                    if i > 0 {
                        f.write_str("; ")?;
                    }
                    write!(f, "{route}")?;
                }
                Ok(())
            }
        }
    }
}

impl fmt::Display for OutboundRoute {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        /// Endpoints named in full before the rest is counted.
        const SHOWN: usize = 3;
        write!(f, "{} [", self.service)?;
        for (i, endpoint) in self.endpoints.iter().take(SHOWN).enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            write!(f, "{}", endpoint.addr)?;
        }
        if self.endpoints.len() > SHOWN {
            write!(f, ", … {} more", self.endpoints.len() - SHOWN)?;
        }
        let request = match self.timeouts.request {
            Some(d) => format!("{d:?}"),
            None => "none".to_string(),
        };
        write!(
            f,
            "] (request timeout {request}, connect {:?})",
            self.timeouts.connect
        )
    }
}

/// The listeners `loaded` asks this proxy to run, in configuration order.
pub fn listener_specs(
    options: &ProxyOptions,
    loaded: &Loaded,
) -> Result<Vec<ListenerSpec>, ApplyError> {
    let config = &loaded.config;
    let workload = config
        .workloads
        .iter()
        .find(|w| w.id == loaded.workload)
        .ok_or_else(|| {
            ApplyError::Inconsistent(format!(
                "workload {} is not in the configuration",
                loaded.workload
            ))
        })?;
    let mut specs = Vec::new();
    for spec in &workload.inbound {
        specs.push(ListenerSpec {
            key: ListenerKey {
                direction: Direction::Inbound,
                port: spec.port,
                name: spec.name.clone(),
                protocol: spec.protocol,
                ordinal: 0,
            },
            name: format!("inbound/{}", spec.name),
            bind: SocketAddr::new(options.inbound_ip, spec.port),
            route: RouteSpec::Inbound {
                workload: workload.id.to_string(),
                app: SocketAddr::new(options.app_ip, spec.app_port),
                idle_timeout: spec.idle_timeout,
            },
        });
    }
    for spec in &workload.outbound {
        let (name, protocol, route) = match &spec.target {
            OutboundTarget::Service(service) => {
                let (route, protocol) = outbound_route(config, service, spec.port)?;
                (
                    service.to_string(),
                    protocol,
                    RouteSpec::Outbound(Box::new(route)),
                )
            }
            OutboundTarget::ByHost(services) => {
                let routes = services
                    .iter()
                    .map(|s| outbound_route(config, s, spec.port).map(|(route, _)| route))
                    .collect::<Result<_, _>>()?;
                let route = RouteSpec::ByHost {
                    workload: workload.id.clone(),
                    routes,
                };
                (BY_HOST.to_string(), Protocol::Http, route)
            }
        };
        specs.push(ListenerSpec {
            key: ListenerKey {
                direction: Direction::Outbound,
                port: spec.port,
                name: name.clone(),
                protocol,
                ordinal: 0,
            },
            name: format!("outbound/{name}"),
            bind: SocketAddr::new(options.outbound_ip, spec.port),
            route,
        });
    }
    number_duplicates(&mut specs);
    Ok(specs)
}

/// The name of a shared, Host-routed outbound listener (`outbound/by-host`
/// in logs and `/config`); no Service is named like this (names have a
/// namespace).
const BY_HOST: &str = "by-host";

/// How requests to `id` are sent, and its protocol.
fn outbound_route(
    config: &MeshConfig,
    id: &ResourceRef,
    port: u16,
) -> Result<(OutboundRoute, Protocol), ApplyError> {
    let service = config.service(id).ok_or_else(|| {
        ApplyError::Inconsistent(format!(
            "service {id} of the outbound listener on port {port} is not in the configuration"
        ))
    })?;
    let traffic = config.traffic_policy_for(&service.id);
    let timeouts = traffic.map(|p| p.timeouts.clone()).unwrap_or_default();
    let policy = traffic
        .map(|p| DestinationPolicy {
            request_timeout: p.timeouts.request,
            routes: p.routes.clone(),
            load_balancer: p.load_balancer,
            outlier_detection: p.outlier_detection.clone(),
            circuit_breaker: p.circuit_breaker.clone(),
            retries: p.retries.clone().map(Arc::new),
            local_app: false,
        })
        .unwrap_or_else(|| DestinationPolicy {
            request_timeout: timeouts.request,
            ..DestinationPolicy::default()
        });
    let service_identities: Arc<[String]> = config.service_identities(service).into();
    let endpoints = service
        .endpoints
        .iter()
        .map(|e| EndpointSpec {
            addr: e.address,
            identities: match &e.identity {
                Some(id) => Arc::from([id.clone()]),
                None => service_identities.clone(),
            },
        })
        .collect();
    let route = OutboundRoute {
        service: service.id.clone(),
        endpoints,
        timeouts,
        policy,
    };
    Ok((route, service.protocol))
}

fn number_duplicates(specs: &mut [ListenerSpec]) {
    for i in 0..specs.len() {
        let (before, rest) = specs.split_at_mut(i);
        if let Some(spec) = rest.first_mut() {
            spec.key.ordinal = before
                .iter()
                .filter(|s| s.key.same_but_ordinal(&spec.key))
                .count();
        }
    }
}

// === Routes ===

/// The swappable parts of a listener's stack. The protocol is part of the
/// key, so a kept listener's route never changes kind.
#[derive(Clone, Debug)]
enum Route {
    Http(HttpRoute),
    /// A shared outbound port: one [`HttpRoute`] per service.
    ByHost(SharedHostTable<HttpRoute>),
    Tcp(SharedTcpTarget<ClientSide>),
}

/// What a configuration change swaps under an HTTP stack: the
/// destination, which carries its endpoints and its whole policy
/// (timeouts included), so a request sees one consistent version.
#[derive(Clone, Debug)]
struct HttpRoute {
    destination: SharedDestination<ClientSide>,
}

impl HttpRoute {
    fn new(
        name: Arc<str>,
        endpoints: &[(SocketAddr, ClientSide)],
        settings: &ClientSettings,
        policy: &DestinationPolicy,
    ) -> Self {
        Self {
            destination: Arc::new(ArcSwap::from_pointee(Destination::new(
                name, endpoints, settings, policy,
            ))),
        }
    }

    fn update(
        &self,
        name: Arc<str>,
        endpoints: &[(SocketAddr, ClientSide)],
        settings: &ClientSettings,
        policy: &DestinationPolicy,
    ) {
        let previous = self.destination.load_full();
        self.destination.store(Arc::new(Destination::reusing(
            Some(&previous),
            name,
            endpoints,
            settings,
            policy,
        )));
    }

    fn for_service(route: &OutboundRoute, server: &ServerSettings, tls: Option<&MeshTls>) -> Self {
        Self::new(
            route.name(),
            &route.endpoints(tls),
            &route.client_settings(server),
            &route.policy,
        )
    }

    fn update_service(
        &self,
        route: &OutboundRoute,
        server: &ServerSettings,
        tls: Option<&MeshTls>,
    ) {
        self.update(
            route.name(),
            &route.endpoints(tls),
            &route.client_settings(server),
            &route.policy,
        );
    }
}

impl Route {
    fn new(
        spec: &ListenerSpec,
        server: &ServerSettings,
        tls: Option<&MeshTls>,
        tracing: &Arc<Tracing>,
    ) -> Self {
        match (&spec.route, spec.key.protocol) {
            (RouteSpec::ByHost { workload, routes }, _) => Route::ByHost(Arc::new(
                ArcSwap::from_pointee(host_table(workload, routes, None, server, tls, tracing)),
            )),
            (RouteSpec::Inbound { workload, app, .. }, Protocol::Http) => {
                Route::Http(HttpRoute::new(
                    Arc::from(workload.as_str()),
                    &[(*app, ClientSide::Plaintext)],
                    &inbound_client_settings(server),
                    &DestinationPolicy::local_app(),
                ))
            }
            (RouteSpec::Outbound(route), Protocol::Http) => {
                Route::Http(HttpRoute::for_service(route, server, tls))
            }
            (_, Protocol::Tcp) => {
                Route::Tcp(Arc::new(ArcSwap::from_pointee(tcp_target(spec, tls))))
            }
        }
    }

    /// Swaps in what `spec` asks for. Requests and connections in flight
    /// keep the route they started with.
    fn update(
        &self,
        spec: &ListenerSpec,
        server: &ServerSettings,
        tls: Option<&MeshTls>,
        tracing: &Arc<Tracing>,
    ) {
        match (self, &spec.route) {
            (Route::Http(http), RouteSpec::Inbound { workload, app, .. }) => http.update(
                Arc::from(workload.as_str()),
                &[(*app, ClientSide::Plaintext)],
                &inbound_client_settings(server),
                &DestinationPolicy::local_app(),
            ),
            (Route::Http(http), RouteSpec::Outbound(route)) => {
                http.update_service(route, server, tls)
            }
            (Route::ByHost(table), RouteSpec::ByHost { workload, routes }) => {
                let previous = table.load_full();
                table.store(Arc::new(host_table(
                    workload,
                    routes,
                    Some(&previous),
                    server,
                    tls,
                    tracing,
                )));
            }
            (Route::Tcp(target), _) => target.store(Arc::new(tcp_target(spec, tls))),
            // The key (protocol and name) stays the same for a kept
            // listener, and with it the kind of route.
            (route, spec_route) => tracing::error!(
                "internal error: listener {} kept with a route of another kind ({route:?} vs {spec_route})",
                spec.name
            ),
        }
    }
}

/// The shared port's table. A service `previous` already routes keeps
/// its stack, its pooled connections and its requests in flight; only
/// its destination and timeout are updated.
fn host_table(
    workload: &ResourceRef,
    routes: &[OutboundRoute],
    previous: Option<&HostTable<HttpRoute>>,
    server: &ServerSettings,
    tls: Option<&MeshTls>,
    tracing: &Arc<Tracing>,
) -> HostTable<HttpRoute> {
    let routes = routes
        .iter()
        .map(|route| {
            let kept = previous
                .into_iter()
                .flat_map(|p| p.routes())
                .find(|r| r.service == route.service);
            match kept {
                Some(kept) => {
                    kept.state.update_service(route, server, tls);
                    kept.clone()
                }
                None => {
                    let state = HttpRoute::for_service(route, server, tls);
                    let stack = outbound::http_stack(
                        route.name(),
                        state.destination.clone(),
                        tracing.clone(),
                    );
                    HostRoute {
                        service: route.service.clone(),
                        state,
                        stack,
                    }
                }
            }
        })
        .collect();
    HostTable::new(workload, routes)
}

/// The service (outbound) or workload (inbound) name errors and request
/// metrics show.
fn target_name(route: &RouteSpec) -> Arc<str> {
    match route {
        RouteSpec::Inbound { workload, .. } => Arc::from(workload.as_str()),
        RouteSpec::Outbound(route) => route.name(),
        RouteSpec::ByHost { .. } => Arc::from(BY_HOST),
    }
}

fn inbound_client_settings(server: &ServerSettings) -> ClientSettings {
    ClientSettings {
        max_header_bytes: server.max_header_bytes,
        ..ClientSettings::default()
    }
}

fn tcp_target(spec: &ListenerSpec, tls: Option<&MeshTls>) -> TcpTarget<ClientSide> {
    let (endpoints, connect_timeout, idle_timeout) = match &spec.route {
        RouteSpec::Inbound {
            app, idle_timeout, ..
        } => (
            vec![(*app, ClientSide::Plaintext)],
            Timeouts::default().connect,
            *idle_timeout,
        ),
        RouteSpec::Outbound(route) => (
            route.endpoints(tls),
            route.timeouts.connect,
            route.timeouts.idle,
        ),
        // Validation keeps Host-routed listeners to HTTP.
        RouteSpec::ByHost { .. } => (
            Vec::new(),
            Timeouts::default().connect,
            Timeouts::default().idle,
        ),
    };
    TcpTarget {
        name: target_name(&spec.route),
        endpoints: RoundRobin::new(endpoints),
        connect_timeout,
        idle_timeout,
        counters: ByteCounters::new(direction_label(spec.key.direction), &spec.name),
    }
}

fn direction_label(direction: Direction) -> &'static str {
    match direction {
        Direction::Inbound => "inbound",
        Direction::Outbound => "outbound",
    }
}

// === Running listeners ===

/// A bound listener, serving.
#[derive(Debug)]
struct Active {
    spec: ListenerSpec,
    addr: SocketAddr,
    route: Route,
    handle: ListenerHandle,
}

impl Active {
    fn bound(&self) -> BoundListener {
        BoundListener {
            name: self.spec.name.clone(),
            direction: self.spec.key.direction,
            protocol: self.spec.key.protocol,
            addr: self.addr,
            target: match &self.spec.route {
                RouteSpec::Inbound { app, .. } => app.to_string(),
                RouteSpec::Outbound(route) => route.service.to_string(),
                RouteSpec::ByHost { routes, .. } => routes
                    .iter()
                    .map(|r| r.service.to_string())
                    .collect::<Vec<_>>()
                    .join(","),
            },
        }
    }
}

/// Whether `new` needs the port `old` holds.
fn needs_port_of(new: &ListenerSpec, old: &Active) -> bool {
    new.bind.port() != 0
        && new.bind.port() == old.addr.port()
        && ips_overlap(new.bind.ip(), old.addr.ip())
}

/// Whether sockets bound on the same port at `a` and `b` would clash. An
/// unspecified IP (`0.0.0.0`, `::`) overlaps every address of its family.
fn ips_overlap(a: IpAddr, b: IpAddr) -> bool {
    a == b || (a.is_unspecified() || b.is_unspecified()) && a.is_ipv4() == b.is_ipv4()
}

/// The listeners a proxy runs, in configuration order.
#[derive(Debug, Default)]
pub struct Listeners {
    active: Vec<Active>,
    /// This sidecar's mTLS; `None`: plaintext everywhere (no identity).
    tls: Option<Arc<MeshTls>>,
    /// The workload's compiled policies, shared by every inbound HTTP
    /// listener; `None`: not enforced.
    authorizer: SharedAuthorizer,
    /// Sampling and span export, shared by every HTTP stack.
    tracing: Arc<Tracing>,
}

impl Listeners {
    pub fn new(tls: Option<Arc<MeshTls>>, tracing: Arc<Tracing>) -> Self {
        Self {
            active: Vec::new(),
            tls,
            authorizer: SharedAuthorizer::default(),
            tracing,
        }
    }

    /// Puts in the policies the next requests are decided by; returns the
    /// ones they replace.
    pub fn swap_authorizer(&self, next: Option<Arc<Authorizer>>) -> Option<Arc<Authorizer>> {
        self.authorizer.swap(next)
    }

    /// Starts serving on a bound socket.
    fn serve(
        &self,
        spec: &ListenerSpec,
        tcp: TcpListener,
        route: Route,
        watch: &drain::Watch,
        server: &ServerSettings,
    ) -> Result<Active, BindError> {
        let (tls, authorizer, tracing) = (self.tls.as_deref(), &self.authorizer, &self.tracing);
        // Peers reach inbound listeners: mTLS whenever we have an identity.
        // Outbound listeners face the local app only.
        let transport = match (spec.key.direction, tls) {
            (Direction::Inbound, Some(tls)) => tls.server_side(),
            _ => ServerSide::Plaintext,
        };
        let addr = tcp.local_addr().map_err(|error| BindError {
            addr: spec.bind,
            what: spec.name.clone(),
            error,
        })?;
        let metrics = ConnectionMetrics::new(direction_label(spec.key.direction), &spec.name);
        // An HTTP stack to serve, or a TCP target to copy bytes to.
        let stack = match &route {
            Route::Tcp(target) => Err(target),
            Route::ByHost(table) => Ok(BoxCloneSyncService::new(ByHost::new(table.clone()))),
            Route::Http(http) => {
                let name = target_name(&spec.route);
                Ok(match spec.key.direction {
                    Direction::Inbound => inbound::http_stack(
                        name.clone(),
                        http.destination.clone(),
                        AuthzLayer::new(authorizer.clone(), name, addr.port()),
                        tracing.clone(),
                    ),
                    Direction::Outbound => {
                        outbound::http_stack(name, http.destination.clone(), tracing.clone())
                    }
                })
            }
        };
        let handle = match stack {
            Ok(stack) => listener::serve_http(
                tcp,
                spec.name.clone(),
                metrics,
                watch.clone(),
                transport,
                stack,
                server.clone(),
            ),
            Err(target) => listener::serve_tcp(
                tcp,
                spec.name.clone(),
                metrics,
                watch.clone(),
                transport,
                target.clone(),
                (spec.key.direction == Direction::Inbound).then(|| {
                    AuthzLayer::new(authorizer.clone(), target_name(&spec.route), addr.port())
                }),
            ),
        };
        Ok(Active {
            spec: spec.clone(),
            addr,
            route,
            handle,
        })
    }

    pub fn bound(&self) -> Vec<BoundListener> {
        self.active.iter().map(Active::bound).collect()
    }

    /// Each outbound HTTP service's live destination (the first listener
    /// reaching it, when several do), for `/config`.
    pub fn destinations(&self) -> Vec<LiveDestination> {
        let mut out: Vec<LiveDestination> = Vec::new();
        let mut add = |name: Arc<str>, destination: &SharedDestination<ClientSide>| {
            if !out.iter().any(|(n, _)| *n == name) {
                out.push((name, destination.clone()));
            }
        };
        for active in &self.active {
            match (&active.route, &active.spec.route) {
                (Route::Http(http), RouteSpec::Outbound(route)) => {
                    add(route.name(), &http.destination);
                }
                (Route::ByHost(table), _) => {
                    for route in table.load().routes() {
                        add(
                            Arc::from(route.service.to_string()),
                            &route.state.destination,
                        );
                    }
                }
                _ => {}
            }
        }
        out
    }

    /// Changes the running listeners to `specs`. On error the listeners
    /// are as they were (short of an old listener whose port could not be
    /// bound again, which is logged).
    pub async fn apply(
        &mut self,
        specs: &[ListenerSpec],
        server: &ServerSettings,
        watch: &drain::Watch,
    ) -> Result<ApplySummary, ApplyError> {
        let is_kept = |key: &ListenerKey| self.active.iter().any(|a| &a.spec.key == key);
        let added: Vec<&ListenerSpec> = specs.iter().filter(|s| !is_kept(&s.key)).collect();
        let removed: Vec<ListenerKey> = self
            .active
            .iter()
            .filter(|a| !specs.iter().any(|s| s.key == a.spec.key))
            .map(|a| a.spec.key.clone())
            .collect();
        let in_the_way: Vec<ListenerKey> = self
            .active
            .iter()
            .filter(|a| removed.contains(&a.spec.key))
            .filter(|a| added.iter().any(|s| needs_port_of(s, a)))
            .map(|a| a.spec.key.clone())
            .collect();
        let waits = |s: &ListenerSpec| {
            self.active
                .iter()
                .any(|a| in_the_way.contains(&a.spec.key) && needs_port_of(s, a))
        };

        // 1. Bind what can be bound now. Returning early drops the sockets
        //    bound so far, which closes them: nothing has changed.
        let (later, now): (Vec<&ListenerSpec>, Vec<&ListenerSpec>) =
            added.into_iter().partition(|s| waits(s));
        let mut sockets = Vec::new();
        for spec in now {
            sockets.push((spec, listener::bind(spec.bind, &spec.name).await?));
        }

        // 2. Free the ports removed listeners hold for new ones, then bind
        //    those. On failure, bring the old listeners back.
        let mut stopped = Vec::new();
        for old in self.take(&in_the_way) {
            old.handle.close().await;
            stopped.push((old.spec, old.addr, old.route));
        }
        for spec in later {
            match listener::bind(spec.bind, &spec.name).await {
                Ok(tcp) => sockets.push((spec, tcp)),
                Err(error) => {
                    drop(sockets);
                    self.restore(stopped, watch, server).await;
                    return Err(error.into());
                }
            }
        }
        let mut summary = ApplySummary::default();
        for (spec, addr, _) in &stopped {
            tracing::info!(listener = %spec.name, %addr, "stopped listening (port reused)");
            summary.removed.push(format!("{} {addr}", spec.name));
        }
        Ok(self.commit(specs, sockets, summary, server, watch).await)
    }

    /// Past the point of failure: serve the new sockets, swap the kept
    /// listeners' routes, close the removed ones.
    async fn commit(
        &mut self,
        specs: &[ListenerSpec],
        sockets: Vec<(&ListenerSpec, TcpListener)>,
        mut summary: ApplySummary,
        server: &ServerSettings,
        watch: &drain::Watch,
    ) -> ApplySummary {
        let gone: Vec<ListenerKey> = self
            .active
            .iter()
            .filter(|a| !specs.iter().any(|s| s.key == a.spec.key))
            .map(|a| a.spec.key.clone())
            .collect();
        for old in self.take(&gone) {
            old.handle.close().await;
            tracing::info!(listener = %old.spec.name, addr = %old.addr, "stopped listening");
            summary
                .removed
                .push(format!("{} {}", old.spec.name, old.addr));
        }
        for active in &mut self.active {
            let Some(spec) = specs.iter().find(|s| s.key == active.spec.key) else {
                continue;
            };
            if *spec == active.spec {
                summary.unchanged += 1;
                continue;
            }
            active
                .route
                .update(spec, server, self.tls.as_deref(), &self.tracing);
            tracing::info!(listener = %spec.name, addr = %active.addr, route = %spec.route, "route updated");
            summary
                .updated
                .push(format!("{} {}", spec.name, active.addr));
            active.spec = spec.clone();
        }
        for (spec, tcp) in sockets {
            let route = Route::new(spec, server, self.tls.as_deref(), &self.tracing);
            match self.serve(spec, tcp, route, watch, server) {
                Ok(active) => {
                    tracing::info!(listener = %spec.name, addr = %active.addr, protocol = %spec.key.protocol, route = %spec.route, "listening");
                    summary.added.push(format!("{} {}", spec.name, active.addr));
                    self.active.push(active);
                }
                // A socket that cannot say its own address is not usable;
                // report it rather than serve blind.
                Err(e) => tracing::error!("{e}"),
            }
        }
        // Configuration order, so `/config` lists listeners as written.
        let position = |a: &Active| specs.iter().position(|s| s.key == a.spec.key);
        self.active.sort_by_key(position);
        summary
    }

    /// Binds listeners again that were stopped to free their port, on
    /// their old address and route.
    async fn restore(
        &mut self,
        stopped: Vec<(ListenerSpec, SocketAddr, Route)>,
        watch: &drain::Watch,
        server: &ServerSettings,
    ) {
        for (spec, addr, route) in stopped {
            let restored = match listener::bind(addr, &spec.name).await {
                Ok(tcp) => self.serve(&spec, tcp, route, watch, server),
                Err(e) => Err(e),
            };
            match restored {
                Ok(active) => self.active.push(active),
                Err(e) => tracing::error!(
                    "listener {} is lost: it was stopped for a configuration that was then refused, and cannot listen again: {e}",
                    spec.name
                ),
            }
        }
    }

    /// Takes the listeners with these keys out of the running set.
    fn take(&mut self, keys: &[ListenerKey]) -> Vec<Active> {
        let (taken, kept) = std::mem::take(&mut self.active)
            .into_iter()
            .partition(|a| keys.contains(&a.spec.key));
        self.active = kept;
        taken
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    const LOCALHOST: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);

    /// Workload shop/web with one inbound listener, `outbound` as its
    /// outbound list, and services api and pay (http) and db (tcp).
    fn specs(inbound: &str, outbound: &str, api_endpoint: &str) -> Vec<ListenerSpec> {
        let yaml = format!(
            r#"apiVersion: outrigger.io/v1alpha1
kind: Workload
metadata: {{name: web, namespace: shop}}
spec:
  inbound: [{inbound}]
  outbound: [{outbound}]
---
apiVersion: outrigger.io/v1alpha1
kind: Service
metadata: {{name: api, namespace: shop}}
spec:
  endpoints: [{{address: "{api_endpoint}"}}]
---
apiVersion: outrigger.io/v1alpha1
kind: Service
metadata: {{name: db, namespace: shop}}
spec:
  protocol: tcp
  endpoints: [{{address: "127.0.0.1:5432"}}]
---
apiVersion: outrigger.io/v1alpha1
kind: Service
metadata: {{name: pay, namespace: shop}}
spec:
  endpoints: [{{address: "127.0.0.1:9002"}}]
"#
        );
        let loaded = crate::app::load_str("test", &yaml, "shop/web").expect("valid config");
        listener_specs(&ProxyOptions::loopback("shop/web"), &loaded).expect("specs")
    }

    const MAIN: &str = "{name: main, port: 0, appPort: 9}";

    #[test]
    fn routes_log_as_one_short_line() {
        let specs = specs(MAIN, "{port: 0, service: api}", "127.0.0.1:9001");
        assert_eq!(
            specs[0].route.to_string(),
            "shop/web app 127.0.0.1:9 (idle 3600s)"
        );
        let mut route = specs[1].route.clone();
        if let RouteSpec::Outbound(route) = &mut route {
            route.endpoints = (1..=5)
                .map(|p| EndpointSpec {
                    addr: SocketAddr::new(LOCALHOST, p),
                    identities: Arc::from([]),
                })
                .collect();
        }
        assert_eq!(
            route.to_string(),
            "shop/api [127.0.0.1:1, 127.0.0.1:2, 127.0.0.1:3, … 2 more] (request timeout 15s, connect 1s)"
        );
    }

    async fn apply(
        listeners: &mut Listeners,
        specs: &[ListenerSpec],
        watch: &drain::Watch,
    ) -> Result<ApplySummary, ApplyError> {
        listeners
            .apply(specs, &ServerSettings::default(), watch)
            .await
    }

    fn addr_of(listeners: &Listeners, name: &str) -> SocketAddr {
        listeners
            .bound()
            .iter()
            .find(|l| l.name == name)
            .map(|l| l.addr)
            .unwrap_or_else(|| panic!("no {name} in {:?}", listeners.bound()))
    }

    fn api_endpoints(listeners: &Listeners) -> Vec<SocketAddr> {
        let Some(Route::Http(HttpRoute { destination, .. })) = listeners
            .active
            .iter()
            .find(|a| a.spec.name == "outbound/shop/api")
            .map(|a| &a.route)
        else {
            panic!("no HTTP route for outbound/shop/api");
        };
        destination
            .load()
            .endpoints()
            .iter()
            .map(|c| c.score.addr)
            .collect()
    }

    #[test]
    fn keys_tell_apart_listeners_otherwise_equal() {
        let specs = specs(
            MAIN,
            "{port: 0, service: api}, {port: 0, service: api}, {port: 0, service: db}",
            "127.0.0.1:8080",
        );
        let ordinals: Vec<(&str, usize)> = specs
            .iter()
            .map(|s| (s.name.as_str(), s.key.ordinal))
            .collect();
        assert_eq!(
            ordinals,
            [
                ("inbound/main", 0),
                ("outbound/shop/api", 0),
                ("outbound/shop/api", 1),
                ("outbound/shop/db", 0)
            ]
        );
        assert_eq!(specs[3].key.protocol, Protocol::Tcp);
    }

    /// The shared port's route for `service`.
    fn by_host_route(listeners: &Listeners, service: &str) -> HttpRoute {
        let Some(Route::ByHost(table)) = listeners
            .active
            .iter()
            .find(|a| a.spec.name == "outbound/by-host")
            .map(|a| &a.route)
        else {
            panic!("no outbound/by-host listener");
        };
        let table = table.load();
        table
            .routes()
            .iter()
            .find(|r| r.service.to_string() == service)
            .map(|r| r.state.clone())
            .unwrap_or_else(|| panic!("{service} is not routed"))
    }

    #[tokio::test]
    async fn a_shared_port_keeps_its_socket_and_its_services_when_its_list_changes() {
        let (_drain, watch) = drain::channel();
        let mut listeners = Listeners::default();
        let first = specs(MAIN, "{port: 0, services: [api]}", "127.0.0.1:8080");
        assert_eq!(
            first[1].route.to_string(),
            "by host: shop/api [127.0.0.1:8080] (request timeout 15s, connect 1s)"
        );
        apply(&mut listeners, &first, &watch)
            .await
            .expect("applies");
        let addr = addr_of(&listeners, "outbound/by-host");
        let api = by_host_route(&listeners, "shop/api");

        let second = specs(MAIN, "{port: 0, services: [api, pay]}", "127.0.0.1:8081");
        let summary = apply(&mut listeners, &second, &watch)
            .await
            .expect("applies");
        assert_eq!(summary.updated, [format!("outbound/by-host {addr}")]);
        assert_eq!(addr_of(&listeners, "outbound/by-host"), addr);
        let kept = by_host_route(&listeners, "shop/api");
        assert!(
            Arc::ptr_eq(&api.destination, &kept.destination),
            "shop/api keeps its stack"
        );
        let endpoints: Vec<SocketAddr> = kept
            .destination
            .load()
            .endpoints()
            .iter()
            .map(|c| c.score.addr)
            .collect();
        assert_eq!(
            endpoints,
            ["127.0.0.1:8081".parse::<SocketAddr>().expect("addr")]
        );
        by_host_route(&listeners, "shop/pay");
        assert_eq!(listeners.bound()[1].target, "shop/api,shop/pay");
    }

    #[test]
    fn unspecified_ips_overlap_their_own_family_only() {
        let any4 = IpAddr::V4(Ipv4Addr::UNSPECIFIED);
        let any6: IpAddr = "::".parse().expect("ip");
        assert!(ips_overlap(LOCALHOST, LOCALHOST));
        assert!(ips_overlap(any4, LOCALHOST));
        assert!(ips_overlap(LOCALHOST, any4));
        assert!(!ips_overlap(any6, LOCALHOST));
        assert!(!ips_overlap(LOCALHOST, "10.0.0.1".parse().expect("ip")));
    }

    #[tokio::test]
    async fn kept_listeners_keep_their_port_and_swap_their_route() {
        let (_drain, watch) = drain::channel();
        let mut listeners = Listeners::default();
        let first = specs(MAIN, "{port: 0, service: api}", "127.0.0.1:8080");
        let summary = apply(&mut listeners, &first, &watch)
            .await
            .expect("applies");
        assert_eq!(summary.added.len(), 2, "{summary:?}");
        let api = addr_of(&listeners, "outbound/shop/api");
        assert_ne!(api.port(), 0);

        let same = apply(&mut listeners, &first, &watch)
            .await
            .expect("applies");
        assert_eq!((same.unchanged, same.updated.len()), (2, 0), "{same:?}");

        let second = specs(MAIN, "{port: 0, service: api}", "127.0.0.1:8081");
        let summary = apply(&mut listeners, &second, &watch)
            .await
            .expect("applies");
        assert!(
            summary.added.is_empty() && summary.removed.is_empty(),
            "{summary:?}"
        );
        assert_eq!(summary.updated, [format!("outbound/shop/api {api}")]);
        assert_eq!(addr_of(&listeners, "outbound/shop/api"), api);
        assert_eq!(
            api_endpoints(&listeners),
            ["127.0.0.1:8081".parse::<SocketAddr>().expect("addr")]
        );
    }

    #[tokio::test]
    async fn a_port_in_use_refuses_the_whole_configuration() {
        let (_drain, watch) = drain::channel();
        let mut listeners = Listeners::default();
        let first = specs(MAIN, "{port: 0, service: api}", "127.0.0.1:8080");
        apply(&mut listeners, &first, &watch)
            .await
            .expect("applies");
        let before = listeners.bound();

        let taken = TcpListener::bind((LOCALHOST, 0)).await.expect("bind");
        let port = taken.local_addr().expect("addr").port();
        let outbound = format!("{{port: 0, service: api}}, {{port: {port}, service: db}}");
        let refused = specs(MAIN, &outbound, "127.0.0.1:8081");
        let error = apply(&mut listeners, &refused, &watch)
            .await
            .expect_err("refused");
        assert!(
            error.to_string().starts_with(&format!(
                "cannot listen on 127.0.0.1:{port} for outbound/shop/db: "
            )),
            "{error}"
        );
        assert_eq!(listeners.bound(), before);
        assert_eq!(
            api_endpoints(&listeners),
            ["127.0.0.1:8080".parse::<SocketAddr>().expect("addr")],
            "the old route stays"
        );
    }

    #[tokio::test]
    async fn a_removed_listener_frees_its_port_for_a_new_one() {
        let (_drain, watch) = drain::channel();
        let mut listeners = Listeners::default();
        let first = specs(MAIN, "{port: 0, service: db}", "127.0.0.1:8080");
        apply(&mut listeners, &first, &watch)
            .await
            .expect("applies");
        let main = addr_of(&listeners, "inbound/main");
        let db = addr_of(&listeners, "outbound/shop/db");

        // Same port, other protocol: a new key that needs the old socket's
        // port. And outbound/shop/db goes away.
        let inbound = format!(
            "{{name: main, port: {}, appPort: 9, protocol: tcp}}",
            main.port()
        );
        let second = specs(&inbound, "", "127.0.0.1:8080");
        let summary = apply(&mut listeners, &second, &watch)
            .await
            .expect("applies");
        assert_eq!(summary.removed.len(), 2, "{summary:?}");
        assert_eq!(summary.added, [format!("inbound/main {main}")]);
        assert_eq!(listeners.bound()[0].protocol, Protocol::Tcp);
        assert!(
            tokio::net::TcpStream::connect(db).await.is_err(),
            "a removed listener's port is closed"
        );
        assert!(tokio::net::TcpStream::connect(main).await.is_ok());
    }
}
