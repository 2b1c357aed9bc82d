//! The sidecar injector as a Kubernetes mutating admission webhook: an
//! `AdmissionReview` (v1) for a Pod in, the same review out with a JSON
//! patch that makes the Pod what `outrigger inject` would make it.
//!
//! Which pods are sent here is the `MutatingWebhookConfiguration`'s
//! business: its namespace and object selectors (opt-in labels) and its
//! `failurePolicy`. Here a pod's own `outrigger.io/inject: disabled`
//! annotation still wins. If the mutation fails, `--webhook-failure-policy`
//! decides: `ignore` admits the pod as it is, with a warning; `fail`
//! refuses it, with the reason.
//!
//! A Pod made by a controller has no name yet, so its workload name comes
//! from the `outrigger.io/workload` annotation, else the
//! `app.kubernetes.io/name` or `app` label, else the pod's name.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::{Bytes, Incoming};
use hyper::{Method, Request, Response, StatusCode, header};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use serde_json::{Value as Json, json};
use serde_norway::{Mapping, Value};

use crate::inject::{self, Report};

/// The path the MutatingWebhookConfiguration calls.
pub const PATH: &str = "/mutate";
/// AdmissionReviews are small; a Pod is a few KiB.
const BODY_LIMIT: usize = 4 * 1024 * 1024;

/// Serves the webhook over HTTPS on `addr` with the certificate (chain)
/// and key in `cert` and `key`; returns the bound address.
pub async fn serve(
    addr: SocketAddr,
    cert: &Path,
    key: &Path,
    failure: FailurePolicy,
) -> anyhow::Result<SocketAddr> {
    let chain = CertificateDer::pem_file_iter(cert)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .with_context(|| format!("cannot read the webhook certificate {}", cert.display()))?;
    anyhow::ensure!(!chain.is_empty(), "no certificate in {}", cert.display());
    let key = PrivateKeyDer::from_pem_file(key)
        .with_context(|| format!("cannot read the webhook key {}", key.display()))?;
    #[allow(deprecated)]
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .context("TLS versions")?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .context("the webhook certificate and key do not go together")?;
    // The API server speaks HTTP/1.1 or HTTP/2 to webhooks.
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen on {addr} for the webhook"))?;
    let bound = listener.local_addr()?;
    tokio::spawn(async move {
        loop {
            let Ok((stream, peer)) = listener.accept().await else {
                continue;
            };
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let tls =
                    match tokio::time::timeout(Duration::from_secs(10), acceptor.accept(stream))
                        .await
                    {
                        Ok(Ok(tls)) => tls,
                        Ok(Err(e)) => {
                            tracing::debug!(%peer, "webhook TLS handshake failed: {e}");
                            return;
                        }
                        Err(_) => return,
                    };
                let service = hyper::service::service_fn(move |req| handle(req, failure));
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(tls), service)
                    .await;
            });
        }
    });
    Ok(bound)
}

async fn handle(
    req: Request<Incoming>,
    failure: FailurePolicy,
) -> Result<Response<Full<Bytes>>, std::convert::Infallible> {
    let reply = |status: StatusCode, body: String| {
        let mut rsp = Response::new(Full::new(Bytes::from(body)));
        *rsp.status_mut() = status;
        rsp.headers_mut().insert(
            header::CONTENT_TYPE,
            http::HeaderValue::from_static("application/json"),
        );
        Ok(rsp)
    };
    if req.uri().path() != PATH {
        return reply(
            StatusCode::NOT_FOUND,
            json!({"error": format!("no such path; the webhook is at {PATH}")}).to_string(),
        );
    }
    if req.method() != Method::POST {
        return reply(
            StatusCode::METHOD_NOT_ALLOWED,
            json!({"error": "POST an AdmissionReview"}).to_string(),
        );
    }
    let body = match Limited::new(req.into_body(), BODY_LIMIT).collect().await {
        Ok(body) => body.to_bytes(),
        Err(e) => {
            return reply(
                StatusCode::BAD_REQUEST,
                json!({"error": format!("cannot read the body: {e}")}).to_string(),
            );
        }
    };
    let answer = review(&body, failure);
    if let Some(warning) = answer["response"]["warnings"][0].as_str() {
        tracing::warn!("{warning}");
    }
    reply(StatusCode::OK, answer.to_string())
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum FailurePolicy {
    /// Admit the pod unchanged (and warn).
    Ignore,
    /// Refuse the pod.
    Fail,
}

/// Answers one AdmissionReview request body.
pub fn review(body: &[u8], failure: FailurePolicy) -> Json {
    let request: Json = match serde_json::from_slice(body) {
        Ok(v) => v,
        Err(e) => return answer("", Err(format!("not an AdmissionReview: {e}")), failure),
    };
    let uid = request["request"]["uid"].as_str().unwrap_or("").to_string();
    answer(&uid, patch_for(&request["request"]), failure)
}

/// The JSON patch for the request's object; `Ok(None)`: nothing to do.
fn patch_for(request: &Json) -> Result<Option<Json>, String> {
    if request.is_null() {
        return Err("not an AdmissionReview: no request".to_string());
    }
    let kind = request["kind"]["kind"].as_str().unwrap_or("");
    if kind != "Pod"
        || request["operation"]
            .as_str()
            .is_some_and(|op| op != "CREATE")
    {
        return Ok(None);
    }
    let object = &request["object"];
    let mut pod: Value =
        serde_norway::to_value(object).map_err(|e| format!("unreadable Pod: {e}"))?;
    let name = workload_name(object).ok_or(
        "the Pod has no name, outrigger.io/workload annotation, or app label to name its workload",
    )?;
    let mut owner = Mapping::new();
    owner.insert(Value::from("name"), Value::from(name.clone()));
    let pod_map = pod.as_mapping_mut().ok_or("the Pod is not an object")?;
    let mut report = Report::default();
    let changed = inject::inject_pod(
        pod_map,
        &Value::Mapping(owner),
        &format!("Pod {name}"),
        &mut report,
    )?;
    if !changed {
        return Ok(None);
    }
    let after: Json =
        serde_json::to_value(&pod).map_err(|e| format!("cannot write the Pod back: {e}"))?;
    // "add" replaces a member that exists (RFC 6902), so whole values are
    // the simplest correct patch.
    let ops: Vec<Json> = [
        ("/spec/containers", &after["spec"]["containers"]),
        ("/spec/volumes", &after["spec"]["volumes"]),
        ("/metadata/annotations", &after["metadata"]["annotations"]),
    ]
    .into_iter()
    .filter(|(_, value)| !value.is_null())
    .map(|(path, value)| json!({"op": "add", "path": path, "value": value}))
    .collect();
    Ok(Some(Json::Array(ops)))
}

fn workload_name(pod: &Json) -> Option<String> {
    let meta = &pod["metadata"];
    let candidates = [
        &meta["annotations"]["outrigger.io/workload"],
        &meta["labels"]["app.kubernetes.io/name"],
        &meta["labels"]["app"],
        &meta["name"],
    ];
    candidates
        .into_iter()
        .filter_map(Json::as_str)
        .find(|s| !s.is_empty())
        .map(str::to_string)
}

fn answer(uid: &str, patch: Result<Option<Json>, String>, failure: FailurePolicy) -> Json {
    let response = match (patch, failure) {
        (Ok(None), _) => json!({"uid": uid, "allowed": true}),
        (Ok(Some(patch)), _) => json!({
            "uid": uid,
            "allowed": true,
            "patchType": "JSONPatch",
            "patch": base64(patch.to_string().as_bytes()),
        }),
        (Err(reason), FailurePolicy::Ignore) => json!({
            "uid": uid,
            "allowed": true,
            "warnings": [format!("outrigger: sidecar not injected: {reason}")],
        }),
        (Err(reason), FailurePolicy::Fail) => json!({
            "uid": uid,
            "allowed": false,
            "status": {"code": 400, "message": format!("outrigger: cannot inject the sidecar: {reason}")},
        }),
    };
    json!({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "response": response})
}

/// Standard base64 with padding (what `patch` must be).
fn base64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(char::from(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode_base64(s: &str) -> Vec<u8> {
        let value = |c: u8| -> u32 {
            match c {
                b'A'..=b'Z' => u32::from(c - b'A'),
                b'a'..=b'z' => u32::from(c - b'a' + 26),
                b'0'..=b'9' => u32::from(c - b'0' + 52),
                b'+' => 62,
                _ => 63,
            }
        };
        let mut out = Vec::new();
        for chunk in s.as_bytes().chunks(4) {
            let n = chunk.iter().enumerate().fold(0u32, |n, (i, &c)| {
                if c == b'=' {
                    n
                } else {
                    n | value(c) << (18 - 6 * i)
                }
            });
            let pads = chunk.iter().filter(|&&c| c == b'=').count();
            let bytes = [(n >> 16) as u8, (n >> 8) as u8, n as u8];
            out.extend_from_slice(&bytes[..3 - pads]);
        }
        out
    }

    /// Applies our patches (whole-value "add" at an object path).
    fn apply(object: &mut Json, patch: &Json) {
        for op in patch.as_array().expect("ops") {
            assert_eq!(op["op"], "add");
            let path = op["path"].as_str().expect("path");
            let mut target = &mut *object;
            let parts: Vec<&str> = path.trim_start_matches('/').split('/').collect();
            for part in &parts[..parts.len() - 1] {
                target = target
                    .as_object_mut()
                    .expect("object")
                    .entry(part.to_string())
                    .or_insert_with(|| json!({}));
            }
            target
                .as_object_mut()
                .expect("object")
                .insert(parts[parts.len() - 1].to_string(), op["value"].clone());
        }
    }

    const TEMPLATE: &str = "apiVersion: apps/v1
kind: Deployment
metadata: {name: web, namespace: shop}
spec:
  selector: {matchLabels: {app: web}}
  template:
    metadata:
      labels: {app: web}
    spec:
      containers:
        - {name: web, image: 'web:1'}
      volumes:
        - {name: data, emptyDir: {}}
";

    /// The pod a ReplicaSet of TEMPLATE would create, in a review.
    fn review_of(pod: &Json) -> Vec<u8> {
        json!({
            "apiVersion": "admission.k8s.io/v1",
            "kind": "AdmissionReview",
            "request": {
                "uid": "705ab4f5-6393-11e8-b7cc-42010a800002",
                "kind": {"group": "", "version": "v1", "kind": "Pod"},
                "operation": "CREATE",
                "namespace": "shop",
                "object": pod,
            }
        })
        .to_string()
        .into_bytes()
    }

    fn template_pod() -> Json {
        let deployment: Json = serde_norway::from_str(TEMPLATE).expect("yaml");
        let mut pod = deployment["spec"]["template"].clone();
        pod["metadata"]["generateName"] = json!("web-5c8d7f9b4-");
        pod
    }

    #[test]
    fn the_patch_makes_the_pod_what_the_cli_makes_the_template() {
        let pod = template_pod();
        let answer = review(&review_of(&pod), FailurePolicy::Fail);
        let response = &answer["response"];
        assert_eq!(response["uid"], "705ab4f5-6393-11e8-b7cc-42010a800002");
        assert_eq!(response["allowed"], true);
        assert_eq!(response["patchType"], "JSONPatch");
        let patch: Json =
            serde_json::from_slice(&decode_base64(response["patch"].as_str().expect("patch")))
                .expect("patch JSON");
        let mut patched = pod.clone();
        apply(&mut patched, &patch);

        let (cli, _) = inject::inject("t.yaml", TEMPLATE).expect("cli");
        let cli: Json = serde_norway::from_str(&cli).expect("yaml");
        let mut expected = cli["spec"]["template"].clone();
        expected["metadata"]["generateName"] = json!("web-5c8d7f9b4-");
        assert_eq!(patched, expected);
    }

    #[test]
    fn opted_out_already_injected_and_other_objects_are_admitted_unchanged() {
        let mut pod = template_pod();
        pod["metadata"]["annotations"] = json!({"outrigger.io/inject": "disabled"});
        let answer = review(&review_of(&pod), FailurePolicy::Fail);
        assert_eq!(answer["response"]["allowed"], true);
        assert!(answer["response"]["patch"].is_null());

        let mut service = review_of(&json!({"kind": "Service"}));
        service = String::from_utf8(service)
            .expect("utf8")
            .replace("\"kind\":\"Pod\"", "\"kind\":\"Service\"")
            .into_bytes();
        assert!(review(&service, FailurePolicy::Fail)["response"]["patch"].is_null());
    }

    #[test]
    fn failures_admit_or_refuse_as_configured() {
        let broken = json!({"metadata": {"labels": {"app": "web"}}, "spec": {}});
        let open = review(&review_of(&broken), FailurePolicy::Ignore);
        assert_eq!(open["response"]["allowed"], true);
        assert!(
            open["response"]["warnings"][0]
                .as_str()
                .is_some_and(|w| w.contains("the pod has no containers"))
        );
        let closed = review(&review_of(&broken), FailurePolicy::Fail);
        assert_eq!(closed["response"]["allowed"], false);
        assert!(
            closed["response"]["status"]["message"]
                .as_str()
                .is_some_and(|m| m.contains("cannot inject the sidecar"))
        );
        let garbage = review(b"{not json", FailurePolicy::Fail);
        assert_eq!(garbage["response"]["allowed"], false);
    }

    #[test]
    fn base64_is_standard() {
        assert_eq!(base64(b""), "");
        assert_eq!(base64(b"f"), "Zg==");
        assert_eq!(base64(b"fo"), "Zm8=");
        assert_eq!(base64(b"foo"), "Zm9v");
        assert_eq!(base64(b"foobar"), "Zm9vYmFy");
        assert_eq!(decode_base64("Zm9vYg=="), b"foob");
    }
}
