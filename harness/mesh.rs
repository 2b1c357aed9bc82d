//! Mesh configurations for tests, and a started sidecar pair:
//!
//! ```text
//! client → [web sidecar: outbound/shop/api] → [api sidecar: inbound/http] → app
//! ```

use std::net::SocketAddr;

use crate::proxy::{Proxy, ProxyBuilder};

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
"#
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

    pub async fn start_with(
        app: SocketAddr,
        protocol: &str,
        extra: &str,
        client_args: &[&str],
    ) -> Pair {
        let server = ProxyBuilder::new(server_config(app.port(), protocol), "shop/api")
            .start()
            .await;
        let inbound = server.listener("inbound/main");
        let mut builder = ProxyBuilder::new(client_config(&[inbound], protocol, extra), "shop/web");
        for arg in client_args {
            builder = builder.arg(*arg);
        }
        let client = builder.start().await;
        let outbound = client.listener("outbound/shop/api");
        Pair {
            server,
            client,
            outbound,
        }
    }
}
