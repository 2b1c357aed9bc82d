//! The Outrigger sidecar proxy.
//!
//! Data flows one way through small modules, each one concern:
//!
//! ```text
//! listener → transport (plaintext, or mTLS with an identity) → http::server
//!   inbound:  error responses → metrics → headers → forward to the local app
//!   outbound: error responses → metrics → headers → timeout → balance → http::client
//!   tcp:      listener → transport → tcp::forward (bytes both ways, idle timeout)
//! ```
//!
//! `app` assembles the pieces from a validated [`outrigger_config::MeshConfig`];
//! `apply` changes the running listeners to match the next one (SIGHUP, or
//! a control plane push) without a restart; `admin` serves `/live`, `/ready`, `/metrics` and `/config` on its own listener.

#![forbid(unsafe_code)]

pub mod access_log;
pub mod admin;
pub mod app;
pub mod apply;
pub mod authz;
pub mod balance;
pub mod circuit;
pub mod cli;
pub mod drain;
pub mod egress;
pub mod errors;
pub mod forward;
pub mod headers;
pub mod http;
pub mod identity;
pub mod identity_client;
pub mod inbound;
pub mod listener;
pub mod metrics;
pub mod orig_proto;
pub mod otlp;
pub mod outbound;
pub mod outlier;
pub mod policy_client;
pub mod random;
pub mod retry;
pub mod state;
pub mod tcp;
pub mod timeout;
pub mod tls;
pub mod trace;
pub mod trace_context;
pub mod transport;
pub mod upgrade;

/// The error type that crosses tower service boundaries.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;
