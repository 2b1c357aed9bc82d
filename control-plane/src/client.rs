//! The CLI verbs that talk to a running control plane: a thin client of
//! the REST API. Lists print as tables, `-o yaml|json` prints the API's
//! documents, and any error the server reports is shown as it is.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail};
use bytes::Bytes;
use http::{Method, Request, StatusCode, header};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde::Deserialize;
use serde_json::{Value, json};

pub const DEFAULT_SERVER: &str = "http://127.0.0.1:15011";

/// Where the server is and how to prove who we are.
#[derive(Debug, Clone, clap::Args)]
pub struct Connection {
    /// The control plane's REST API, e.g. http://127.0.0.1:15011 (default:
    /// from the CLI config file, else http://127.0.0.1:15011).
    #[arg(long, env = "OUTRIGGER_SERVER")]
    pub server: Option<String>,
    /// The API token.
    #[arg(long, env = "OUTRIGGER_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// A file holding the API token (e.g. <data-dir>/admin-token).
    #[arg(long, env = "OUTRIGGER_TOKEN_FILE")]
    pub token_file: Option<PathBuf>,
    /// The CLI config file (YAML with `server`, `token` or `tokenFile`);
    /// default ~/.config/outrigger/config.yaml if it exists.
    #[arg(long, env = "OUTRIGGER_CLI_CONFIG")]
    pub cli_config: Option<PathBuf>,
    /// Give up on a request after this long, e.g. 30s.
    #[arg(long, env = "OUTRIGGER_REQUEST_TIMEOUT", default_value = "30s",
          value_parser = |s: &str| outrigger_config::parse_duration(s))]
    pub request_timeout: Duration,
}

/// Writes to stdout. A closed pipe (`outrigger history | head -1`) ends
/// the program quietly, as command-line tools do, instead of a panic.
fn out(text: &str) {
    use std::io::Write;
    let mut stdout = std::io::stdout().lock();
    if let Err(e) = stdout
        .write_all(text.as_bytes())
        .and_then(|()| stdout.flush())
        && e.kind() == std::io::ErrorKind::BrokenPipe
    {
        std::process::exit(0);
    }
}

macro_rules! say {
    ($($arg:tt)*) => { out(&format!("{}\n", format_args!($($arg)*))) };
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct CliConfig {
    server: Option<String>,
    token: Option<String>,
    token_file: Option<PathBuf>,
}

/// The REST client.
pub struct Api {
    base: String,
    token: String,
    timeout: Duration,
    client: Client<HttpConnector, Full<Bytes>>,
}

impl Api {
    pub fn new(connection: &Connection) -> anyhow::Result<Self> {
        let file = load_cli_config(connection.cli_config.as_deref())?;
        let base = connection
            .server
            .clone()
            .or(file.server)
            .unwrap_or_else(|| DEFAULT_SERVER.to_string());
        let base = base.trim_end_matches('/').to_string();
        if !base.starts_with("http://") {
            bail!("--server {base:?}: expected http://HOST:PORT");
        }
        let token = match (
            &connection.token,
            &connection.token_file,
            file.token,
            file.token_file,
        ) {
            (Some(token), _, _, _) => token.clone(),
            (None, Some(path), _, _) => read_token(path)?,
            (None, None, Some(token), _) => token,
            (None, None, None, Some(path)) => read_token(&path)?,
            (None, None, None, None) => bail!(
                "no API token: pass --token or --token-file (the server wrote one to <data-dir>/admin-token), \
                 set OUTRIGGER_TOKEN, or put `token:` in the CLI config file"
            ),
        };
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(Duration::from_secs(5)));
        let client = Client::builder(TokioExecutor::new()).build(connector);
        Ok(Self {
            base,
            token,
            timeout: connection.request_timeout,
            client,
        })
    }

    /// Sends a request; a non-2xx answer becomes an error carrying the
    /// server's message as is.
    pub async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<(&str, Bytes)>,
        headers: &[(&str, String)],
    ) -> anyhow::Result<Bytes> {
        let url = format!("{}{path}", self.base);
        let mut builder = Request::builder()
            .method(method)
            .uri(&url)
            .header(header::AUTHORIZATION, format!("Bearer {}", self.token));
        if let Ok(user) = std::env::var("USER") {
            builder = builder.header("x-outrigger-user", user);
        }
        for (name, value) in headers {
            builder = builder.header(*name, value);
        }
        let body = match body {
            Some((content_type, bytes)) => {
                builder = builder.header(header::CONTENT_TYPE, content_type);
                bytes
            }
            None => Bytes::new(),
        };
        let request = builder
            .body(Full::new(body))
            .context("building the request")?;
        let exchange = async {
            let response = self
                .client
                .request(request)
                .await
                .with_context(|| format!("cannot reach the control plane at {}", self.base))?;
            let status = response.status();
            let bytes = response
                .into_body()
                .collect()
                .await
                .with_context(|| format!("{url}: reading the answer"))?
                .to_bytes();
            anyhow::Ok((status, bytes))
        };
        let (status, bytes) = tokio::time::timeout(self.timeout, exchange)
            .await
            .with_context(|| {
                format!(
                    "{url}: no answer within {:?} (--request-timeout)",
                    self.timeout
                )
            })??;
        if status.is_success() {
            return Ok(bytes);
        }
        let message = serde_json::from_slice::<Value>(&bytes)
            .ok()
            .and_then(|v| v["error"].as_str().map(str::to_string))
            .unwrap_or_else(|| match String::from_utf8_lossy(&bytes).trim() {
                "" => {
                    "the server answered with an empty body (is this an Outrigger control plane?)"
                        .to_string()
                }
                text => text.to_string(),
            });
        bail!("{message}\n(HTTP {} from {url})", status_text(status))
    }

    pub async fn get_json(&self, path: &str) -> anyhow::Result<Value> {
        let bytes = self.call(Method::GET, path, None, &[]).await?;
        serde_json::from_slice(&bytes).with_context(|| format!("{path}: the answer is not JSON"))
    }
}

fn status_text(status: StatusCode) -> String {
    format!(
        "{} {}",
        status.as_u16(),
        status.canonical_reason().unwrap_or("")
    )
}

fn read_token(path: &Path) -> anyhow::Result<String> {
    let token = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read the token file {}", path.display()))?;
    Ok(token.trim().to_string())
}

fn load_cli_config(path: Option<&Path>) -> anyhow::Result<CliConfig> {
    let (path, required) = match path {
        Some(path) => (path.to_path_buf(), true),
        None => match std::env::var_os("HOME") {
            Some(home) => (
                PathBuf::from(home).join(".config/outrigger/config.yaml"),
                false,
            ),
            None => return Ok(CliConfig::default()),
        },
    };
    match std::fs::read_to_string(&path) {
        Ok(text) if text.trim().is_empty() => Ok(CliConfig::default()),
        Ok(text) => serde_norway::from_str(&text)
            .with_context(|| format!("{}: invalid CLI config", path.display())),
        Err(e) if !required && e.kind() == std::io::ErrorKind::NotFound => Ok(CliConfig::default()),
        Err(e) => Err(e).with_context(|| format!("cannot read {}", path.display())),
    }
}

/// `-o` for get and proxy-status.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Output {
    Table,
    Yaml,
    Json,
}

/// `?expectedRevision=N&dryRun=true` as asked.
fn write_query(expected_revision: Option<u64>, dry_run: bool) -> String {
    let mut query = Vec::new();
    if let Some(n) = expected_revision {
        query.push(format!("expectedRevision={n}"));
    }
    if dry_run {
        query.push("dryRun=true".to_string());
    }
    if query.is_empty() {
        String::new()
    } else {
        format!("?{}", query.join("&"))
    }
}

pub async fn apply(
    api: &Api,
    file: &Path,
    expected_revision: Option<u64>,
    dry_run: bool,
) -> anyhow::Result<()> {
    let (source, text) = if file == Path::new("-") {
        let mut text = String::new();
        std::io::stdin()
            .read_to_string(&mut text)
            .context("cannot read stdin")?;
        ("stdin".to_string(), text)
    } else {
        let text = std::fs::read_to_string(file)
            .with_context(|| format!("cannot read {}", file.display()))?;
        (file.display().to_string(), text)
    };
    // JSON by name or by content (`outrigger get -o json | outrigger apply -f -`).
    let looks_like_json = text.trim_start().starts_with(['{', '[']);
    let content_type = if looks_like_json || file.extension().is_some_and(|e| e == "json") {
        "application/json"
    } else {
        "application/yaml"
    };
    let path = format!("/api/v1/apply{}", write_query(expected_revision, dry_run));
    let answer = api
        .call(
            Method::POST,
            &path,
            Some((content_type, Bytes::from(text))),
            &[("x-outrigger-source", source)],
        )
        .await?;
    let answer: Value = serde_json::from_slice(&answer).context("the answer is not JSON")?;
    print_outcome(&answer);
    Ok(())
}

fn print_outcome(answer: &Value) {
    let revision = &answer["revision"];
    if answer["unchanged"].as_bool() == Some(true) {
        say!("unchanged (revision {revision})");
        return;
    }
    if answer["dryRun"].as_bool() == Some(true) {
        for change in answer["changes"].as_array().into_iter().flatten() {
            say!(
                "\n{} {} (dry run):",
                resource_label(
                    change["kind"].as_str().unwrap_or(""),
                    change["namespace"].as_str().unwrap_or(""),
                    change["name"].as_str().unwrap_or("")
                ),
                change["op"].as_str().unwrap_or("")
            );
            out(change["diff"].as_str().unwrap_or(""));
        }
        say!("\ndry run: nothing changed (still revision {revision})");
        return;
    }
    for change in answer["changes"].as_array().into_iter().flatten() {
        say!(
            "{} {}",
            resource_label(
                change["kind"].as_str().unwrap_or(""),
                change["namespace"].as_str().unwrap_or(""),
                change["name"].as_str().unwrap_or("")
            ),
            change["op"].as_str().unwrap_or("")
        );
    }
    say!("revision {revision}");
}

fn resource_label(kind: &str, namespace: &str, name: &str) -> String {
    if namespace.is_empty() {
        format!("{kind}/{name}")
    } else {
        format!("{kind}/{namespace}/{name}")
    }
}

fn encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'-' | b'.' | b'_' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

pub async fn get(
    api: &Api,
    kind: &str,
    name: Option<&str>,
    namespace: Option<&str>,
    output: Output,
) -> anyhow::Result<()> {
    let mut path = if kind == "all" {
        if let Some(name) = name {
            anyhow::bail!(
                "`get all` lists everything; to show {name:?}, name its kind: outrigger get KIND {name}"
            );
        }
        "/api/v1/resources".to_string()
    } else {
        format!("/api/v1/resources/{}", encode(kind))
    };
    if let Some(name) = name {
        path.push('/');
        path.push_str(&encode(name));
    }
    let mut query = Vec::new();
    if let Some(ns) = namespace {
        query.push(format!("namespace={}", encode(ns)));
    }
    if output == Output::Yaml {
        query.push("output=yaml".to_string());
    }
    if !query.is_empty() {
        path = format!("{path}?{}", query.join("&"));
    }
    let bytes = api.call(Method::GET, &path, None, &[]).await?;
    match output {
        Output::Yaml => out(&String::from_utf8_lossy(&bytes)),
        Output::Json => {
            let value: Value = serde_json::from_slice(&bytes)?;
            say!("{}", serde_json::to_string_pretty(&value)?);
        }
        Output::Table => {
            let value: Value = serde_json::from_slice(&bytes)?;
            // A named read answers the resource itself, a list `items`.
            let items = match value["items"].as_array() {
                Some(items) => items.clone(),
                None if value["kind"].is_string() => vec![value],
                None => Vec::new(),
            };
            if items.is_empty() {
                eprintln!("No resources found.");
                return Ok(());
            }
            let rows: Vec<Vec<String>> = items
                .iter()
                .map(|item| {
                    vec![
                        item["kind"].as_str().unwrap_or("").to_string(),
                        item["metadata"]["namespace"]
                            .as_str()
                            .unwrap_or("")
                            .to_string(),
                        item["metadata"]["name"].as_str().unwrap_or("").to_string(),
                        describe(item),
                    ]
                })
                .collect();
            print_table(&["KIND", "NAMESPACE", "NAME", "DETAILS"], &rows);
        }
    }
    Ok(())
}

/// One line about a resource for the table.
fn describe(item: &Value) -> String {
    let spec = &item["spec"];
    let count = |v: &Value| v.as_array().map_or(0, Vec::len);
    match item["kind"].as_str().unwrap_or("") {
        "Workload" => format!(
            "{} inbound, {} outbound",
            count(&spec["inbound"]),
            count(&spec["outbound"])
        ),
        "Service" => format!(
            "{}, static endpoints: {}",
            spec["protocol"].as_str().unwrap_or("http"),
            count(&spec["endpoints"])
        ),
        "TrafficPolicy" => format!("service {}", spec["service"].as_str().unwrap_or("")),
        "AuthorizationPolicy" => format!(
            "workload {}, {}",
            spec["workload"].as_str().unwrap_or(""),
            plural(count(&spec["rules"]), "rule", "rules")
        ),
        "Mesh" => format!(
            "trust domain {}",
            spec["trustDomain"].as_str().unwrap_or("cluster.local")
        ),
        _ => String::new(),
    }
}

pub async fn delete(
    api: &Api,
    kind: &str,
    name: &str,
    namespace: Option<&str>,
    expected_revision: Option<u64>,
    dry_run: bool,
) -> anyhow::Result<()> {
    let mut path = format!(
        "/api/v1/resources/{}/{}{}",
        encode(kind),
        encode(name),
        write_query(expected_revision, dry_run)
    );
    if let Some(ns) = namespace {
        path.push(if path.contains('?') { '&' } else { '?' });
        path.push_str(&format!("namespace={}", encode(ns)));
    }
    let answer = api.call(Method::DELETE, &path, None, &[]).await?;
    print_outcome(&serde_json::from_slice(&answer)?);
    Ok(())
}

pub async fn history(api: &Api, revision: Option<u64>) -> anyhow::Result<()> {
    if let Some(n) = revision {
        let r = api.get_json(&format!("/api/v1/revisions/{n}")).await?;
        say!(
            "revision {}  {}  by {}  ({})",
            r["revision"],
            r["at"].as_str().unwrap_or(""),
            r["author"].as_str().unwrap_or(""),
            r["action"].as_str().unwrap_or("")
        );
        for change in r["changes"].as_array().into_iter().flatten() {
            say!(
                "\n{} {}:",
                change["op"].as_str().unwrap_or(""),
                resource_label(
                    change["kind"].as_str().unwrap_or(""),
                    change["namespace"].as_str().unwrap_or(""),
                    change["name"].as_str().unwrap_or("")
                )
            );
            out(change["diff"].as_str().unwrap_or(""));
        }
        return Ok(());
    }
    let value = api.get_json("/api/v1/revisions").await?;
    let rows: Vec<Vec<String>> = value["revisions"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|r| {
            let changes: Vec<String> = r["changes"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|c| {
                    format!(
                        "{} {}",
                        c["op"].as_str().unwrap_or(""),
                        resource_label(
                            c["kind"].as_str().unwrap_or(""),
                            c["namespace"].as_str().unwrap_or(""),
                            c["name"].as_str().unwrap_or("")
                        )
                    )
                })
                .collect();
            vec![
                r["revision"].to_string(),
                r["at"].as_str().unwrap_or("").to_string(),
                r["author"].as_str().unwrap_or("").to_string(),
                r["action"].as_str().unwrap_or("").to_string(),
                summarize(&changes),
            ]
        })
        .collect();
    if rows.is_empty() {
        eprintln!("No revisions yet.");
        return Ok(());
    }
    print_table(&["REVISION", "TIME", "AUTHOR", "ACTION", "CHANGES"], &rows);
    Ok(())
}

pub async fn rollback(
    api: &Api,
    revision: u64,
    expected_revision: Option<u64>,
    dry_run: bool,
) -> anyhow::Result<()> {
    let body = json!({
        "revision": revision,
        "expectedRevision": expected_revision,
        "dryRun": dry_run,
    })
    .to_string();
    let answer = api
        .call(
            Method::POST,
            "/api/v1/rollback",
            Some(("application/json", Bytes::from(body))),
            &[],
        )
        .await?;
    print_outcome(&serde_json::from_slice(&answer)?);
    Ok(())
}

pub async fn proxy_status(api: &Api, output: Output) -> anyhow::Result<()> {
    let value = api.get_json("/api/v1/proxies").await?;
    match output {
        Output::Json => {
            say!("{}", serde_json::to_string_pretty(&value)?);
            return Ok(());
        }
        Output::Yaml => {
            out(&serde_norway::to_string(&value)?);
            return Ok(());
        }
        Output::Table => {}
    }
    let rows: Vec<Vec<String>> = value["proxies"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|p| {
            // An old NACK is history once the sidecar has caught up; the
            // JSON output keeps it, with its time.
            let nack = match p["status"].as_str() {
                Some("NACKED") => p["lastNack"]["reason"]
                    .as_str()
                    .map(|r| r.lines().next().unwrap_or("").to_string())
                    .unwrap_or_default(),
                _ => String::new(),
            };
            vec![
                p["proxyId"].as_str().unwrap_or("").to_string(),
                p["workload"].as_str().unwrap_or("").to_string(),
                p["address"].as_str().unwrap_or("").to_string(),
                p["status"].as_str().unwrap_or("").to_string(),
                p["ackedVersion"].as_str().unwrap_or("-").to_string(),
                p["connectedSince"].as_str().unwrap_or("").to_string(),
                nack,
            ]
        })
        .collect();
    if rows.is_empty() {
        eprintln!("No sidecars connected (revision {}).", value["revision"]);
        return Ok(());
    }
    print_table(
        &[
            "PROXY",
            "WORKLOAD",
            "ADDRESS",
            "STATUS",
            "ACKED VERSION",
            "CONNECTED SINCE",
            "LAST NACK",
        ],
        &rows,
    );
    Ok(())
}

pub async fn backup(api: &Api, file: &Path) -> anyhow::Result<()> {
    let bytes = api.call(Method::GET, "/api/v1/backup", None, &[]).await?;
    let value: Value = serde_json::from_slice(&bytes).context("the backup is not JSON")?;
    let revisions = value["revisions"].as_array().map_or(0, Vec::len);
    // Write next to the target and rename, so a crash never leaves half a
    // backup under the real name.
    let tmp = file.with_extension("partial");
    {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let mut copy = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)
            .with_context(|| format!("cannot write {}", file.display()))?;
        copy.write_all(&bytes)?;
        copy.sync_all()?;
    }
    std::fs::rename(&tmp, file).with_context(|| format!("cannot write {}", file.display()))?;
    say!("backed up {revisions} revisions to {}", file.display());
    Ok(())
}

/// Prints the token alone on stdout (so `> web.token` captures it) and what
/// it is on stderr.
pub async fn token_create(api: &Api, workload: &str, ttl: Option<&str>) -> anyhow::Result<()> {
    let body = json!({ "workload": workload, "ttl": ttl }).to_string();
    let answer = api
        .call(
            Method::POST,
            "/api/v1/tokens",
            Some(("application/json", Bytes::from(body))),
            &[],
        )
        .await?;
    let answer: Value = serde_json::from_slice(&answer).context("the answer is not JSON")?;
    let token = answer["token"]
        .as_str()
        .context("the server sent no token")?;
    say!("{token}");
    eprintln!(
        "token {} for {}, expires {}",
        answer["id"].as_str().unwrap_or(""),
        answer["workload"].as_str().unwrap_or(""),
        answer["expiresAt"].as_str().unwrap_or("")
    );
    Ok(())
}

pub async fn token_revoke(api: &Api, id: &str) -> anyhow::Result<()> {
    api.call(
        Method::DELETE,
        &format!("/api/v1/tokens/{}", encode(id)),
        None,
        &[],
    )
    .await?;
    say!("token {id} revoked");
    Ok(())
}

pub async fn token_list(api: &Api) -> anyhow::Result<()> {
    let value = api.get_json("/api/v1/tokens").await?;
    let rows: Vec<Vec<String>> = value["tokens"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|t| {
            let text = |k: &str| t[k].as_str().unwrap_or("").to_string();
            let status = if t["revoked"].as_bool() == Some(true) {
                "revoked"
            } else if t["expired"].as_bool() == Some(true) {
                "expired"
            } else {
                "valid"
            };
            vec![
                text("id"),
                text("workload"),
                text("createdAt"),
                text("expiresAt"),
                status.to_string(),
            ]
        })
        .collect();
    if rows.is_empty() {
        eprintln!("No tokens.");
        return Ok(());
    }
    print_table(&["ID", "WORKLOAD", "CREATED", "EXPIRES", "STATUS"], &rows);
    Ok(())
}

/// Prints the decision and its reason; returns whether it allows.
pub async fn authz_check(
    api: &Api,
    workload: &str,
    from: Option<&str>,
    method: &str,
    path: &str,
    port: Option<u16>,
) -> anyhow::Result<bool> {
    let mut query = vec![
        format!("workload={}", encode(workload)),
        format!("method={}", encode(method)),
        format!("path={}", encode(path)),
    ];
    if let Some(from) = from {
        query.push(format!("from={}", encode(from)));
    }
    if let Some(port) = port {
        query.push(format!("port={port}"));
    }
    let answer = api
        .get_json(&format!("/api/v1/authz/check?{}", query.join("&")))
        .await?;
    let allowed = answer["allowed"].as_bool() == Some(true);
    say!(
        "{}: {} (revision {})",
        if allowed { "ALLOW" } else { "DENY" },
        answer["decision"].as_str().unwrap_or(""),
        answer["revision"]
    );
    Ok(allowed)
}

/// The first few changes of a revision, then how many more.
fn summarize(changes: &[String]) -> String {
    const SHOWN: usize = 3;
    let mut text = changes
        .iter()
        .take(SHOWN)
        .cloned()
        .collect::<Vec<_>>()
        .join(", ");
    if changes.len() > SHOWN {
        text.push_str(&format!(", … ({} more)", changes.len() - SHOWN));
    }
    text
}

fn plural(n: usize, one: &str, many: &str) -> String {
    format!("{n} {}", if n == 1 { one } else { many })
}

fn print_table(headers: &[&str], rows: &[Vec<String>]) {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for row in rows {
        for (i, cell) in row.iter().enumerate() {
            widths[i] = widths[i].max(cell.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let mut out = String::new();
        for (i, cell) in cells.iter().enumerate() {
            if i + 1 == cells.len() {
                out.push_str(cell);
            } else {
                out.push_str(&format!("{cell:<w$}   ", w = widths[i]));
            }
        }
        say!("{}", out.trim_end());
    };
    line(headers.to_vec());
    for row in rows {
        line(row.iter().map(String::as_str).collect());
    }
}
