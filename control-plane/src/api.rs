//! The operator REST API (bearer token) and the admin endpoints.
//!
//! Bodies are YAML (multi-document, as `outrigger validate` reads) or JSON
//! (one document, an array of documents, or a `List` with `items`).
//! Responses are JSON, or YAML where asked for (`?output=yaml`). Errors are
//! `{"error": "...", "details": [...]}` with the config crate's messages.
//!
//! ```text
//! POST   /api/v1/apply[?expectedRevision=N]      create or update, all or nothing
//! GET    /api/v1/resources[/KIND[/NAME]][?namespace=NS]
//! DELETE /api/v1/resources/KIND/NAME[?namespace=NS]
//! GET    /api/v1/revisions                       the log, newest first
//! GET    /api/v1/revisions/N                     one revision with its diff
//! POST   /api/v1/rollback  {"revision": N}       back to N, as a new revision
//! GET    /api/v1/proxies                         connected sidecars
//! GET    /api/v1/snapshots/NS/NAME               what a workload's sidecar is served
//! GET    /api/v1/backup                          a consistent copy of the store
//! ```

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::{DefaultBodyLimit, Path, Query, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use metrics_exporter_prometheus::PrometheusHandle;
use outrigger_config::{ConfigErrors, ResourceRef};
use serde::Deserialize;
use serde_json::{Value, json};

use crate::hub::{Hub, ProxyRecord};
use crate::resources::{Key, PlanError, kind_named, line_diff, unknown_kind};
use crate::server::{BACKUP_FORMAT, Backup, ControlPlane, Outcome, Secrets, WriteError};
use crate::store::{Change, Revision};
use crate::timefmt;
use crate::tokens::TokenRecord;

type Cp = Arc<ControlPlane>;

pub fn router(cp: Cp) -> Router {
    Router::new()
        .route("/api/v1/apply", post(apply))
        .route("/api/v1/resources", get(list_all))
        .route("/api/v1/resources/{kind}", get(list_kind))
        .route(
            "/api/v1/resources/{kind}/{name}",
            get(get_one).delete(delete_one),
        )
        .route("/api/v1/revisions", get(revisions))
        .route("/api/v1/revisions/{number}", get(revision))
        .route("/api/v1/rollback", post(rollback))
        .route("/api/v1/proxies", get(proxies))
        .route("/api/v1/snapshots/{namespace}/{name}", get(snapshot))
        .route("/api/v1/backup", get(backup))
        .route("/api/v1/tokens", post(create_token).get(list_tokens))
        .route("/api/v1/authz/check", get(authz_check))
        .route("/api/v1/tokens/{id}", delete(revoke_token))
        .fallback(|| async { ApiError::new(StatusCode::NOT_FOUND, "no such API endpoint") })
        .layer(middleware::from_fn_with_state(cp.clone(), require_token))
        .layer(middleware::map_response(json_errors))
        .layer(DefaultBodyLimit::max(16 * 1024 * 1024))
        .with_state(cp)
}

pub fn admin_router(prometheus: PrometheusHandle, hub: Arc<Hub>) -> Router {
    Router::new()
        .route("/live", get(|| async { "live\n" }))
        .route("/ready", get(|| async { "ready\n" }))
        .route(
            "/metrics",
            get(move || {
                count_proxies(&hub);
                let body = prometheus.render();
                async move { ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], body) }
            }),
        )
}

/// `outrigger_cp_proxies{status}`: sidecars by where they stand, counted
/// when Prometheus scrapes (the alert on sidecars not ACKing the latest
/// policy reads it).
fn count_proxies(hub: &Hub) {
    let view = hub.view();
    let mut counts = [0u32; PROXY_STATUSES.len()];
    for p in hub.proxies() {
        let expected = view.snapshot_for(&p.workload).map(|s| s.version.clone());
        let status = proxy_status(&p, expected.as_ref());
        if let Some(i) = PROXY_STATUSES.iter().position(|s| *s == status) {
            counts[i] += 1;
        }
    }
    for (status, count) in PROXY_STATUSES.iter().zip(counts) {
        metrics::gauge!(crate::metrics::PROXIES, "status" => *status).set(f64::from(count));
    }
}

/// An error as the API reports it.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    message: String,
    details: Vec<Value>,
}

impl ApiError {
    fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
            details: Vec::new(),
        }
    }

    fn invalid(errors: ConfigErrors) -> Self {
        let details = errors
            .iter()
            .map(|e| {
                json!({
                    "source": e.source,
                    "document": e.document,
                    "resource": e.resource,
                    "field": e.field,
                    "reason": e.reason,
                })
            })
            .collect();
        Self {
            status: StatusCode::UNPROCESSABLE_ENTITY,
            message: errors.to_string(),
            details,
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut body = json!({ "error": self.message });
        if !self.details.is_empty() {
            body["details"] = Value::Array(self.details);
        }
        let mut response = (self.status, axum::Json(body)).into_response();
        if self.status == StatusCode::UNAUTHORIZED {
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        response
    }
}

impl From<WriteError> for ApiError {
    fn from(e: WriteError) -> Self {
        match e {
            WriteError::Plan(PlanError::BadRequest(m)) => Self::new(StatusCode::BAD_REQUEST, m),
            // A stream that is not YAML at all cannot be read: 400, as
            // for JSON that does not parse.
            WriteError::Plan(PlanError::Invalid(errors))
                if errors.iter().all(|e| e.reason.starts_with("invalid YAML")) =>
            {
                let mut error = Self::invalid(errors);
                error.status = StatusCode::BAD_REQUEST;
                error
            }
            WriteError::Plan(PlanError::Invalid(errors)) => Self::invalid(errors),
            WriteError::Plan(PlanError::NotFound(m)) => Self::new(StatusCode::NOT_FOUND, m),
            WriteError::Plan(PlanError::Stale(m)) => Self::new(StatusCode::CONFLICT, m),
            WriteError::Store(e) => {
                tracing::error!(error = %e, "store write failed");
                Self::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string())
            }
        }
    }
}

/// Errors axum makes itself (a query that does not parse, a body over the
/// limit, a wrong method) come as plain text; answer them in the API's
/// JSON error shape like every other error.
async fn json_errors(response: Response) -> Response {
    let status = response.status();
    let is_json = response
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|ct| ct.starts_with("application/json"));
    if !(status.is_client_error() || status.is_server_error()) || is_json {
        return response;
    }
    let (parts, body) = response.into_parts();
    let text = match axum::body::to_bytes(body, 64 * 1024).await {
        Ok(bytes) if !bytes.is_empty() => String::from_utf8_lossy(&bytes).into_owned(),
        _ => status.canonical_reason().unwrap_or("error").to_string(),
    };
    let mut error = ApiError::new(status, text);
    if status == StatusCode::METHOD_NOT_ALLOWED {
        error.message = format!(
            "{}: see the API list in docs/CONTROL_PLANE.md",
            error.message
        );
    }
    let mut response = error.into_response();
    if let Some(allow) = parts.headers.get(header::ALLOW) {
        response.headers_mut().insert(header::ALLOW, allow.clone());
    }
    response
}

async fn require_token(State(cp): State<Cp>, request: Request, next: Next) -> Response {
    let presented = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split_once(' '))
        // The scheme is case-insensitive (RFC 9110 §11.1).
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, token)| token.trim());
    match presented {
        Some(token) if crate::auth::same(token, &cp.token) => next.run(request).await,
        Some(_) => ApiError::new(StatusCode::UNAUTHORIZED, "invalid token").into_response(),
        None => ApiError::new(
            StatusCode::UNAUTHORIZED,
            "missing token: send Authorization: Bearer <token> (the server wrote it to <data-dir>/admin-token)",
        )
        .into_response(),
    }
}

/// Who is asking, for the revision log: the name the CLI reports, or
/// "admin" (the token's owner).
fn author(headers: &HeaderMap) -> String {
    let user: String = headers
        .get("x-outrigger-user")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .chars()
        .filter(|c| c.is_ascii_graphic() || *c == ' ')
        .take(64)
        .collect();
    if user.trim().is_empty() {
        "admin".to_string()
    } else {
        user.trim().to_string()
    }
}

/// `?expectedRevision=N&dryRun=true` on apply and rollback.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct WriteQuery {
    expected_revision: Option<u64>,
    #[serde(default)]
    dry_run: bool,
}

async fn apply(
    State(cp): State<Cp>,
    Query(query): Query<WriteQuery>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Result<Response, ApiError> {
    let source = headers
        .get("x-outrigger-source")
        .and_then(|v| v.to_str().ok())
        .filter(|s| !s.is_empty())
        .unwrap_or("request")
        .to_string();
    let text = std::str::from_utf8(&body).map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            format!("{source}: the body is not UTF-8 text: {e}"),
        )
    })?;
    let is_json = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|ct| ct.starts_with("application/json"));
    let yaml = if is_json {
        json_to_yaml(&source, text)?
    } else {
        expand_yaml_lists(&source, text)?.unwrap_or_else(|| text.to_string())
    };
    let outcome = cp
        .write(
            &author(&headers),
            "apply".to_string(),
            query.expected_revision,
            query.dry_run,
            |state| state.plan_apply(&source, &yaml),
        )
        .await?;
    Ok(outcome_response(outcome))
}

/// JSON bodies become the YAML stream the config crate reads.
fn json_to_yaml(source: &str, text: &str) -> Result<String, ApiError> {
    let value: Value = serde_json::from_str(text).map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            format!("{source}: invalid JSON: {e}"),
        )
    })?;
    let documents = match value {
        Value::Array(items) => items,
        Value::Object(ref map) if map.get("kind").and_then(Value::as_str) == Some("List") => {
            match map.get("items") {
                Some(Value::Array(items)) => items.clone(),
                _ => {
                    return Err(ApiError::new(
                        StatusCode::BAD_REQUEST,
                        format!("{source}: a List needs an items array"),
                    ));
                }
            }
        }
        other => vec![other],
    };
    let mut out = Vec::new();
    for document in &documents {
        out.push(
            serde_norway::to_string(document)
                .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, format!("{source}: {e}")))?,
        );
    }
    Ok(out.join("---\n"))
}

/// A YAML stream with a `kind: List` document in it becomes the stream of
/// its items (what `outrigger get -o yaml` of a List would give); `None`
/// when there is no List, so document numbers in errors stay the user's.
fn expand_yaml_lists(source: &str, text: &str) -> Result<Option<String>, ApiError> {
    if !text.contains("List") {
        return Ok(None);
    }
    let mut documents = Vec::new();
    let mut expanded = false;
    for document in serde_norway::Deserializer::from_str(text) {
        // A stream that does not parse is left to the config crate, whose
        // message says where.
        let Ok(value) = serde_norway::Value::deserialize(document) else {
            return Ok(None);
        };
        match value.get("kind").and_then(serde_norway::Value::as_str) {
            Some("List") => {
                expanded = true;
                let Some(serde_norway::Value::Sequence(items)) = value.get("items") else {
                    return Err(ApiError::new(
                        StatusCode::BAD_REQUEST,
                        format!("{source}: a List needs an items sequence"),
                    ));
                };
                documents.extend(items.iter().cloned());
            }
            _ => documents.push(value),
        }
    }
    if !expanded {
        return Ok(None);
    }
    let mut out = Vec::new();
    for document in &documents {
        out.push(
            serde_norway::to_string(document)
                .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, format!("{source}: {e}")))?,
        );
    }
    Ok(Some(out.join("---\n")))
}

fn outcome_response(outcome: Outcome) -> Response {
    match outcome {
        Outcome::DryRun { revision, changes } => axum::Json(json!({
            "revision": revision,
            "dryRun": true,
            "unchanged": changes.is_empty(),
            "changes": changes.iter().map(|c| {
                let mut v = change_summary(c);
                v["diff"] = Value::String(line_diff(
                    c.before.as_deref().unwrap_or(""),
                    c.after.as_deref().unwrap_or(""),
                ));
                v
            }).collect::<Vec<_>>(),
        }))
        .into_response(),
        Outcome::Unchanged { revision } => {
            axum::Json(json!({ "revision": revision, "unchanged": true, "changes": [] }))
                .into_response()
        }
        Outcome::Committed(revision) => axum::Json(json!({
            "revision": revision.number,
            "unchanged": false,
            "changes": revision.changes.iter().map(change_summary).collect::<Vec<_>>(),
        }))
        .into_response(),
    }
}

fn change_summary(change: &Change) -> Value {
    json!({
        "op": change.op(),
        "kind": change.kind,
        "namespace": change.namespace,
        "name": change.name,
    })
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct GetQuery {
    namespace: Option<String>,
    output: Option<Format>,
}

/// `?output=`: JSON is the default.
#[derive(Deserialize, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
enum Format {
    Json,
    Yaml,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct DeleteQuery {
    namespace: Option<String>,
    expected_revision: Option<u64>,
    #[serde(default)]
    dry_run: bool,
}

async fn list_all(
    State(cp): State<Cp>,
    Query(query): Query<GetQuery>,
) -> Result<Response, ApiError> {
    list(&cp, None, None, &query)
}

async fn list_kind(
    State(cp): State<Cp>,
    Path(kind): Path<String>,
    Query(query): Query<GetQuery>,
) -> Result<Response, ApiError> {
    let kind = kind_named(&kind)
        .ok_or_else(|| ApiError::new(StatusCode::BAD_REQUEST, unknown_kind(&kind)))?;
    list(&cp, Some(kind), None, &query)
}

async fn get_one(
    State(cp): State<Cp>,
    Path((kind, name)): Path<(String, String)>,
    Query(query): Query<GetQuery>,
) -> Result<Response, ApiError> {
    let kind = kind_named(&kind)
        .ok_or_else(|| ApiError::new(StatusCode::BAD_REQUEST, unknown_kind(&kind)))?;
    list(&cp, Some(kind), Some(name), &query)
}

/// `NAME` with `?namespace=`, or `NAMESPACE/NAME` (URL-encoded slash).
fn resource_key(kind: &'static str, name: &str, namespace: Option<&str>) -> Result<Key, ApiError> {
    if kind == "Mesh" {
        return Ok(Key::new(kind, "", name));
    }
    match (name.split_once('/'), namespace) {
        (Some((ns, _)), Some(other)) if ns != other => Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            format!("{name:?} names namespace {ns:?}, but the namespace asked for is {other:?}"),
        )),
        (Some((ns, name)), _) => Ok(Key::new(kind, ns, name)),
        (None, namespace) => Ok(Key::new(
            kind,
            namespace.unwrap_or(outrigger_config::DEFAULT_NAMESPACE),
            name,
        )),
    }
}

fn list(
    cp: &ControlPlane,
    kind: Option<&'static str>,
    name: Option<String>,
    query: &GetQuery,
) -> Result<Response, ApiError> {
    let state = cp.state();
    let wanted = name
        .as_deref()
        .zip(kind)
        .map(|(name, kind)| resource_key(kind, name, query.namespace.as_deref()))
        .transpose()?;
    let mut items: Vec<(&Key, &String)> = state
        .resources
        .iter()
        .filter(|(k, _)| kind.is_none_or(|kind| k.kind == kind))
        .filter(|(k, _)| match (&wanted, &query.namespace) {
            (Some(w), _) => {
                w.kind == k.kind
                    && w.name == k.name
                    && (w.kind == "Mesh" || w.namespace == k.namespace)
            }
            (None, Some(ns)) => &k.namespace == ns || k.kind == "Mesh",
            (None, None) => true,
        })
        .collect();
    // Kinds in dependency order (as `to_yaml` writes them), then by name.
    items.sort_by_key(|(k, _)| {
        (
            outrigger_config::KINDS.iter().position(|x| *x == k.kind),
            *k,
        )
    });
    if let Some(w) = &wanted
        && items.is_empty()
    {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            format!("{w} not found"),
        ));
    }
    if query.output == Some(Format::Yaml) {
        let yaml = items
            .iter()
            .map(|(_, y)| y.as_str())
            .collect::<Vec<_>>()
            .join("---\n");
        return Ok(([(header::CONTENT_TYPE, "application/yaml")], yaml).into_response());
    }
    let mut documents = Vec::new();
    for (key, yaml) in items {
        let value: Value = serde_norway::from_str(yaml).map_err(|e| {
            ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("stored {key} does not read back: {e}"),
            )
        })?;
        documents.push(value);
    }
    // One named resource comes back as itself, as kubectl does.
    if wanted.is_some()
        && let [one] = documents.as_slice()
    {
        return Ok(axum::Json(one.clone()).into_response());
    }
    Ok(axum::Json(json!({
        "apiVersion": outrigger_config::API_VERSION,
        "kind": "List",
        "metadata": { "revision": state.revision },
        "items": documents,
    }))
    .into_response())
}

async fn delete_one(
    State(cp): State<Cp>,
    Path((kind, name)): Path<(String, String)>,
    Query(query): Query<DeleteQuery>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let kind = kind_named(&kind)
        .ok_or_else(|| ApiError::new(StatusCode::BAD_REQUEST, unknown_kind(&kind)))?;
    let key = resource_key(kind, &name, query.namespace.as_deref())?;
    let action = format!("delete {key}");
    let outcome = cp
        .write(
            &author(&headers),
            action,
            query.expected_revision,
            query.dry_run,
            |state| state.plan_delete(&key),
        )
        .await?;
    Ok(outcome_response(outcome))
}

fn revision_json(revision: &Revision, with_diff: bool) -> Value {
    let changes: Vec<Value> = revision
        .changes
        .iter()
        .map(|c| {
            let mut v = change_summary(c);
            if with_diff {
                v["diff"] = Value::String(line_diff(
                    c.before.as_deref().unwrap_or(""),
                    c.after.as_deref().unwrap_or(""),
                ));
            }
            v
        })
        .collect();
    json!({
        "revision": revision.number,
        "at": timefmt::from_unix_ms(revision.at_unix_ms),
        "author": revision.author,
        "action": revision.action,
        "changes": changes,
    })
}

async fn revisions(State(cp): State<Cp>) -> Result<Response, ApiError> {
    let log = cp.revisions().await.map_err(store_error)?;
    let items: Vec<Value> = log.iter().rev().map(|r| revision_json(r, false)).collect();
    Ok(axum::Json(json!({ "revisions": items })).into_response())
}

async fn revision(State(cp): State<Cp>, Path(number): Path<u64>) -> Result<Response, ApiError> {
    let log = cp.revisions().await.map_err(store_error)?;
    let revision = log
        .iter()
        .find(|r| r.number == number)
        .ok_or_else(|| ApiError::new(StatusCode::NOT_FOUND, format!("no revision {number}")))?;
    Ok(axum::Json(revision_json(revision, true)).into_response())
}

fn store_error(e: crate::store::StoreError) -> ApiError {
    tracing::error!(error = %e, "store read failed");
    ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RollbackBody {
    revision: u64,
    expected_revision: Option<u64>,
    #[serde(default)]
    dry_run: bool,
}

async fn rollback(
    State(cp): State<Cp>,
    Query(query): Query<WriteQuery>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Result<Response, ApiError> {
    let body: RollbackBody = serde_json::from_slice(&body).map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            format!("expected {{\"revision\": N}}: {e}"),
        )
    })?;
    // The options may come in the body or the query; both must agree.
    let expected = match (body.expected_revision, query.expected_revision) {
        (Some(a), Some(b)) if a != b => {
            return Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                format!("expectedRevision is {a} in the body but {b} in the query"),
            ));
        }
        (a, b) => a.or(b),
    };
    let target = body.revision;
    let outcome = cp
        .write_with_log(
            &author(&headers),
            format!("rollback to {target}"),
            expected,
            body.dry_run || query.dry_run,
            |state, log| state.plan_rollback(log, target),
        )
        .await?;
    Ok(outcome_response(outcome))
}

async fn proxies(State(cp): State<Cp>) -> Response {
    let view = cp.hub.view();
    let mut records = cp.hub.proxies();
    records.sort_by(|a, b| (&a.workload, &a.proxy_id).cmp(&(&b.workload, &b.proxy_id)));
    let items: Vec<Value> = records
        .iter()
        .map(|p| {
            let expected = view.snapshot_for(&p.workload).map(|s| s.version.clone());
            proxy_json(p, expected)
        })
        .collect();
    axum::Json(json!({ "revision": view.revision, "proxies": items })).into_response()
}

/// Where a sidecar stands against the snapshot it should run.
pub const PROXY_STATUSES: [&str; 5] = [
    "SYNCED",
    "STALE",
    "NACKED",
    "DISCONNECTED",
    "UNKNOWN_WORKLOAD",
];

pub fn proxy_status(p: &ProxyRecord, expected: Option<&String>) -> &'static str {
    let nacked_current = p
        .last_nack
        .as_ref()
        .is_some_and(|n| Some(&n.version) == p.sent_version.as_ref());
    match (expected, &p.acked_version) {
        _ if p.disconnected_at.is_some() => "DISCONNECTED",
        (None, _) => "UNKNOWN_WORKLOAD",
        _ if nacked_current && p.acked_version.as_ref() != expected => "NACKED",
        (Some(e), Some(a)) if e == a => "SYNCED",
        _ => "STALE",
    }
}

fn proxy_json(p: &ProxyRecord, expected: Option<String>) -> Value {
    let status = proxy_status(p, expected.as_ref());
    let mut endpoints: Vec<String> = p
        .inbound
        .iter()
        .map(|(name, port)| {
            format!(
                "{name}={}",
                std::net::SocketAddr::new(p.advertise_ip, *port)
            )
        })
        .collect();
    endpoints.sort();
    json!({
        "proxyId": p.proxy_id,
        "workload": p.workload.to_string(),
        "address": p.peer.to_string(),
        "inbound": endpoints,
        "proxyVersion": p.proxy_version,
        "authenticated": p.authenticated,
        "status": status,
        "connectedSince": timefmt::rfc3339(p.connected_since),
        "disconnectedAt": p.disconnected_at.map(timefmt::rfc3339),
        "expectedVersion": expected,
        "sentVersion": p.sent_version,
        "ackedVersion": p.acked_version,
        "ackedAt": p.acked_at.map(timefmt::rfc3339),
        "lastNack": p.last_nack,
    })
}

async fn snapshot(
    State(cp): State<Cp>,
    Path((namespace, name)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    let workload = ResourceRef::new(namespace, name);
    let view = cp.hub.view();
    let snapshot = view.snapshot_for(&workload).ok_or_else(|| {
        ApiError::new(
            StatusCode::NOT_FOUND,
            format!("no Workload {workload} in revision {}", view.revision),
        )
    })?;
    Ok(axum::Json(json!({
        "workload": workload.to_string(),
        "version": snapshot.version,
        "revision": snapshot.revision,
        "yaml": snapshot.yaml,
    }))
    .into_response())
}

async fn backup(State(cp): State<Cp>) -> Result<Response, ApiError> {
    // One read transaction: a consistent copy even while writes go on.
    let revisions = cp.revisions().await.map_err(store_error)?;
    let authority = &cp.authority;
    let backup = Backup {
        format: BACKUP_FORMAT.to_string(),
        created_at: timefmt::rfc3339(std::time::SystemTime::now()),
        revisions,
        secrets: Some(Secrets {
            ca: authority.ca.own_files(),
            tokens: authority.tokens.export(),
        }),
    };
    Ok(axum::Json(backup).into_response())
}

// === Bootstrap tokens ===

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TokenBody {
    /// `NAME` or `NAMESPACE/NAME`.
    workload: String,
    /// e.g. `720h`; default one year: the token authenticates every
    /// renewal, so it must outlive the workload's certificates.
    ttl: Option<String>,
}

const DEFAULT_TOKEN_TTL: Duration = Duration::from_secs(365 * 86_400);

fn token_json(record: &TokenRecord) -> Value {
    json!({
        "id": record.id,
        "workload": record.workload,
        "createdAt": timefmt::from_unix_ms(record.created_at_unix.saturating_mul(1000)),
        "expiresAt": timefmt::from_unix_ms(record.expires_at_unix.saturating_mul(1000)),
        "createdBy": record.created_by,
        "revoked": record.revoked,
        "expired": record.expires_at_unix.saturating_mul(1000) <= timefmt::now_unix_ms(),
    })
}

async fn create_token(
    State(cp): State<Cp>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Result<Response, ApiError> {
    let body: TokenBody = serde_json::from_slice(&body).map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            format!("expected {{\"workload\": \"NAMESPACE/NAME\", \"ttl\": \"720h\"}}: {e}"),
        )
    })?;
    let workload = outrigger_config::parse_workload_ref(&body.workload)
        .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, format!("workload: {e}")))?;
    let ttl = match &body.ttl {
        Some(ttl) => outrigger_config::parse_duration(ttl)
            .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, format!("ttl: {e}")))?,
        None => DEFAULT_TOKEN_TTL,
    };
    if ttl.is_zero() {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "ttl: must be more than zero",
        ));
    }
    let author = author(&headers);
    let tokens = cp.clone();
    let new = tokio::task::spawn_blocking(move || {
        tokens.authority.tokens.create(&workload, ttl, &author)
    })
    .await
    .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?
    .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, format!("{e:#}")))?;
    // The id only: the token itself is never logged.
    tracing::info!(id = %new.record.id, workload = %new.record.workload, by = %new.record.created_by, "bootstrap token created");
    let mut answer = token_json(&new.record);
    answer["token"] = Value::String(new.token);
    Ok((StatusCode::CREATED, axum::Json(answer)).into_response())
}

async fn list_tokens(State(cp): State<Cp>) -> Response {
    let tokens: Vec<Value> = cp.authority.tokens.list().iter().map(token_json).collect();
    axum::Json(json!({ "tokens": tokens })).into_response()
}

async fn revoke_token(State(cp): State<Cp>, Path(id): Path<String>) -> Result<Response, ApiError> {
    let tokens = cp.clone();
    let revoke_id = id.clone();
    let revoked = tokio::task::spawn_blocking(move || tokens.authority.tokens.revoke(&revoke_id))
        .await
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, format!("{e:#}")))?;
    if !revoked {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            format!("no token {id:?}"),
        ));
    }
    tracing::info!(%id, "bootstrap token revoked");
    Ok(axum::Json(json!({ "revoked": id })).into_response())
}

// === Authorization check ===

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AuthzQuery {
    /// `NAME` or `NAMESPACE/NAME`.
    workload: String,
    /// The caller's SPIFFE ID.
    from: Option<String>,
    method: String,
    path: String,
    /// The inbound port; without it, rules that name ports do not match.
    port: Option<u16>,
}

/// What the workload's sidecar would decide for such a request over mTLS,
/// and why: the same matcher the data path runs.
async fn authz_check(
    State(cp): State<Cp>,
    Query(query): Query<AuthzQuery>,
) -> Result<Response, ApiError> {
    let workload = outrigger_config::parse_workload_ref(&query.workload)
        .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, format!("workload: {e}")))?;
    if let Some(from) = &query.from {
        outrigger_config::check_spiffe_id(from)
            .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, format!("from: {e}")))?;
    }
    let state = cp.state();
    if !state.config.workloads.iter().any(|w| w.id == workload) {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            format!("Workload {workload} not found"),
        ));
    }
    let authorizer = outrigger_config::authz::Authorizer::for_workload(&state.config, &workload);
    let decision = authorizer.decide(&outrigger_config::authz::AuthzRequest {
        principal: query.from.as_deref(),
        method: &query.method,
        path: &query.path,
        port: query.port.unwrap_or(0),
    });
    Ok(axum::Json(json!({
        "revision": state.revision,
        "workload": workload.to_string(),
        "allowed": decision.allowed(),
        "decision": decision.to_string(),
    }))
    .into_response())
}
