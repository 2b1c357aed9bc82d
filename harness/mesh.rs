//! Mesh configurations for tests, and a started sidecar pair:
//!
//! ```text
//! client → [web sidecar: outbound/shop/api] → [api sidecar: inbound/http] → app
//! ```

use std::net::SocketAddr;

use crate::proxy::{Proxy, ProxyBuilder};

/// Lets workload `shop/web` call `shop/api` (enforced over mTLS).
pub const ALLOW_WEB: &str = "---
apiVersion: outrigger.io/v1alpha1
kind: AuthorizationPolicy
metadata: {name: api-callers, namespace: shop}
spec:
  workload: api
  action: ALLOW
  rules: [{from: {principals: ['spiffe://cluster.local/ns/shop/sa/web']}}]
";

/// The server side: workload `shop/api` with one inbound listener on any
/// port, forwarding to `app_port`.
pub fn server_config(app_port: u16, protocol: &str) -> String {
    format!(
        r#"apiVersion: outrigger.io/v1alpha1
kind: Workload
metadata: {{name: api, namespace: shop}}
spec:
  inbound:
    - name: main
      port: 0
      appPort: {app_port}
      protocol: {protocol}
{ALLOW_WEB}"#
    )
}

/// The client side: workload `shop/web` whose outbound listener (any port)
/// reaches service `shop/api` at `endpoints`. `extra` is appended as more
/// YAML documents (a TrafficPolicy, say).
pub fn client_config(endpoints: &[SocketAddr], protocol: &str, extra: &str) -> String {
    let endpoints: String = if endpoints.is_empty() {
        "    []\n".to_string()
    } else {
        endpoints
            .iter()
            .map(|e| format!("    - address: \"{e}\"\n"))
            .collect()
    };
    format!(
        r#"apiVersion: outrigger.io/v1alpha1
kind: Workload
metadata: {{name: web, namespace: shop}}
spec:
  inbound:
    - name: main
      port: 0
      appPort: 9
  outbound:
    - port: 0
      service: api
---
apiVersion: outrigger.io/v1alpha1
kind: Service
metadata: {{name: api, namespace: shop}}
spec:
  protocol: {protocol}
  endpoints:
{endpoints}{extra}"#
    )
}

/// Two real sidecars in front of an app.
pub struct Pair {
    pub server: Proxy,
    pub client: Proxy,
    /// Where the app-side client connects: the web sidecar's outbound port.
    pub outbound: SocketAddr,
}

impl Pair {
    pub async fn start(app: SocketAddr, protocol: &str, extra: &str) -> Pair {
        Self::start_with(app, protocol, extra, &[]).await
    }

    /// Like [`Pair::start`], with extra flags for the client-side sidecar.
    pub async fn start_with(
        app: SocketAddr,
        protocol: &str,
        extra: &str,
        client_args: &[&str],
    ) -> Pair {
        let args: Vec<String> = client_args.iter().map(|s| s.to_string()).collect();
        Self::start_custom(
            app,
            protocol,
            extra,
            |b| b,
            move |b| args.iter().fold(b, |b, a| b.arg(a.clone())),
        )
        .await
    }

    /// Full control: `server` and `client` adjust each sidecar's builder.
    pub async fn start_custom(
        app: SocketAddr,
        protocol: &str,
        extra: &str,
        server: impl FnOnce(ProxyBuilder) -> ProxyBuilder,
        client: impl FnOnce(ProxyBuilder) -> ProxyBuilder,
    ) -> Pair {
        let server = server(ProxyBuilder::new(
            server_config(app.port(), protocol),
            "shop/api",
        ))
        .start()
        .await;
        let inbound = server.listener("inbound/main");
        let client = client(ProxyBuilder::new(
            client_config(&[inbound], protocol, extra),
            "shop/web",
        ))
        .start()
        .await;
        let outbound = client.listener("outbound/shop/api");
        Pair {
            server,
            client,
            outbound,
        }
    }
}

/// A policy for a control plane: Service `shop/api` with no static
/// endpoints (api's sidecar registers its inbound listener), Workload
/// `shop/api` in front of the app on `app_port`, and Workload `shop/web`
/// calling it.
pub fn registered_api(app_port: u16) -> String {
    format!(
        "\
apiVersion: outrigger.io/v1alpha1
kind: Service
metadata: {{name: api, namespace: shop}}
spec: {{protocol: http}}
---
apiVersion: outrigger.io/v1alpha1
kind: Workload
metadata: {{name: api, namespace: shop}}
spec:
  inbound: [{{name: http, port: 0, appPort: {app_port}, service: api}}]
---
apiVersion: outrigger.io/v1alpha1
kind: Workload
metadata: {{name: web, namespace: shop}}
spec:
  inbound: [{{name: http, port: 0, appPort: 1}}]
  outbound: [{{port: 0, service: api}}]
{ALLOW_WEB}"
    )
}
