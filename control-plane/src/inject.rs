//! `outrigger inject` and `uninject`: Kubernetes YAML in, the same YAML
//! out with the `outrigger-proxy` sidecar added to (or removed from) every
//! pod template, like `linkerd inject`.
//!
//! - Handles Pods, Deployments, StatefulSets, DaemonSets, ReplicaSets,
//!   Jobs, CronJobs, and `List`s of them. Every other document passes
//!   through as written, byte for byte, and so does a document that needs
//!   no change.
//! - Idempotent: a pod that already has the sidecar is left alone.
//! - Opt out with the annotation `outrigger.io/inject: disabled` on the
//!   workload or its pod template. Pods on the host network are not
//!   injected: the sidecar's ports would be the node's.
//! - Annotations set the proxy's image (`outrigger.io/proxy-image`), its
//!   control plane (`outrigger.io/control-plane`), admin port
//!   (`outrigger.io/admin-port`), workload name (`outrigger.io/workload`),
//!   token secret (`outrigger.io/token-secret`) and resources
//!   (`outrigger.io/proxy-cpu-request`, `-cpu-limit`, `-memory-request`,
//!   `-memory-limit`).

use serde_norway::{Mapping, Value};

pub const CONTAINER: &str = "outrigger-proxy";
const TOKEN_VOLUME: &str = "outrigger-token";
const STATE_VOLUME: &str = "outrigger-state";
const VERSION_ANNOTATION: &str = "outrigger.io/proxy-version";
const DEFAULT_CONTROL_PLANE: &str = "http://outrigger.outrigger-system.svc:15010";
const DEFAULT_IMAGE: &str = "ghcr.io/outrigger-mesh/outrigger-proxy";
/// A fixed, non-root user for the proxy's container.
const PROXY_UID: u64 = 2102;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{source_name}: document {document}: {reason}")]
pub struct InjectError {
    pub source_name: String,
    /// 1-based, in the order of the stream.
    pub document: usize,
    pub reason: String,
}

/// What a run did, for the summary on stderr.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Report {
    pub changed: Vec<String>,
    /// Workloads left alone, and why.
    pub skipped: Vec<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    Inject,
    Uninject,
}

pub fn inject(source_name: &str, yaml: &str) -> Result<(String, Report), InjectError> {
    run(source_name, yaml, Mode::Inject)
}

pub fn uninject(source_name: &str, yaml: &str) -> Result<(String, Report), InjectError> {
    run(source_name, yaml, Mode::Uninject)
}

fn run(source_name: &str, yaml: &str, mode: Mode) -> Result<(String, Report), InjectError> {
    let mut report = Report::default();
    let mut out = String::with_capacity(yaml.len() + 2048);
    // Documents are counted as a reader sees them: an empty part (before
    // a leading `---`, say) is not one.
    let mut number = 0;
    for (separator, text) in split(yaml) {
        out.push_str(separator);
        if text
            .lines()
            .any(|l| !l.trim().is_empty() && !l.trim_start().starts_with('#'))
        {
            number += 1;
        }
        let document = number.max(1);
        let error = |reason: String| InjectError {
            source_name: source_name.to_string(),
            document,
            reason,
        };
        let mut value: Value =
            serde_norway::from_str(text).map_err(|e| error(format!("invalid YAML: {e}")))?;
        if mutate_document(&mut value, mode, &mut report).map_err(error)? {
            let written = serde_norway::to_string(&value)
                .map_err(|e| error(format!("cannot write the document back: {e}")))?;
            out.push_str(&written);
        } else {
            out.push_str(text);
        }
    }
    Ok((out, report))
}

/// The stream's documents, each with the `---` line before it (empty for
/// the first), so untouched parts are written back exactly.
fn split(yaml: &str) -> Vec<(&str, &str)> {
    let mut parts = Vec::new();
    let mut separator = "";
    let mut start = 0;
    let mut offset = 0;
    for line in yaml.split_inclusive('\n') {
        let is_separator = line.starts_with("---")
            && line[3..]
                .trim_start()
                .chars()
                .next()
                .is_none_or(|c| c == '#');
        if is_separator {
            parts.push((separator, &yaml[start..offset]));
            separator = &yaml[offset..offset + line.len()];
            start = offset + line.len();
        }
        offset += line.len();
    }
    parts.push((separator, &yaml[start..]));
    // A leading `---` makes an empty first part: keep its separator only.
    parts
}

/// Changes one document; `Ok(false)` when it needs no change.
fn mutate_document(value: &mut Value, mode: Mode, report: &mut Report) -> Result<bool, String> {
    let Some(doc) = value.as_mapping_mut() else {
        return Ok(false);
    };
    let kind = doc
        .get("kind")
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_string();
    if kind == "List" {
        let mut changed = false;
        if let Some(items) = doc.get_mut("items").and_then(Value::as_sequence_mut) {
            for (j, item) in items.iter_mut().enumerate() {
                changed |=
                    mutate_document(item, mode, report).map_err(|e| format!("items[{j}]: {e}"))?;
            }
        }
        return Ok(changed);
    }
    let owner_meta = doc.get("metadata").cloned().unwrap_or(Value::Null);
    let name = owner_meta
        .get("name")
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_string();
    let label = format!("{kind} {name}");
    let template_path: &[&str] = match kind.as_str() {
        "Pod" => &[],
        "Deployment" | "StatefulSet" | "DaemonSet" | "ReplicaSet" | "Job" => &["spec", "template"],
        "CronJob" => &["spec", "jobTemplate", "spec", "template"],
        _ => return Ok(false),
    };
    let mut template: &mut Value = value;
    for key in template_path {
        template = template
            .get_mut(*key)
            .ok_or_else(|| format!("{label}: no {}", template_path.join(".")))?;
    }
    let pod = template
        .as_mapping_mut()
        .ok_or_else(|| format!("{label}: the pod template is not a mapping"))?;
    match mode {
        Mode::Inject => inject_pod(pod, &owner_meta, &label, report),
        Mode::Uninject => Ok(uninject_pod(pod, &label, report)),
    }
}

fn annotation<'a>(meta: &'a Value, key: &str) -> Option<&'a str> {
    meta.get("annotations")?.get(key)?.as_str()
}

pub(crate) fn inject_pod(
    pod: &mut Mapping,
    owner: &Value,
    label: &str,
    report: &mut Report,
) -> Result<bool, String> {
    let pod_meta = pod.get("metadata").cloned().unwrap_or(Value::Null);
    // The pod template's annotations win over the workload's.
    let setting = |key: &str| annotation(&pod_meta, key).or_else(|| annotation(owner, key));
    if setting("outrigger.io/inject").is_some_and(|v| v.eq_ignore_ascii_case("disabled")) {
        report
            .skipped
            .push(format!("{label}: outrigger.io/inject is disabled"));
        return Ok(false);
    }
    let spec = pod
        .get_mut("spec")
        .and_then(Value::as_mapping_mut)
        .ok_or_else(|| format!("{label}: the pod has no spec"))?;
    if spec.get("hostNetwork").and_then(Value::as_bool) == Some(true) {
        report.skipped.push(format!(
            "{label}: pods on the host network are not injected (the sidecar's ports would be the node's)"
        ));
        return Ok(false);
    }
    let containers = spec
        .get("containers")
        .and_then(Value::as_sequence)
        .ok_or_else(|| format!("{label}: the pod has no containers"))?;
    if containers
        .iter()
        .any(|c| c.get("name").and_then(Value::as_str) == Some(CONTAINER))
    {
        report.skipped.push(format!("{label}: already injected"));
        return Ok(false);
    }

    let workload = match setting("outrigger.io/workload") {
        Some(w) => w.to_string(),
        None => owner
            .get("name")
            .and_then(Value::as_str)
            .filter(|n| !n.is_empty())
            .ok_or_else(|| format!("{label}: no metadata.name to name the workload after (or set outrigger.io/workload)"))?
            .to_string(),
    };
    let admin_port: u16 = match setting("outrigger.io/admin-port") {
        Some(p) => p
            .parse()
            .ok()
            .filter(|p| *p != 0)
            .ok_or_else(|| format!("{label}: outrigger.io/admin-port {p:?} is not a port"))?,
        None => 15000,
    };
    let image = setting("outrigger.io/proxy-image")
        .map(str::to_string)
        .unwrap_or_else(|| format!("{DEFAULT_IMAGE}:{}", env!("CARGO_PKG_VERSION")));
    let control_plane = setting("outrigger.io/control-plane").unwrap_or(DEFAULT_CONTROL_PLANE);
    let token_secret = setting("outrigger.io/token-secret")
        .map(str::to_string)
        .unwrap_or_else(|| format!("{workload}-outrigger-token"));
    let resource = |key: &str, default: &str| {
        setting(&format!("outrigger.io/proxy-{key}"))
            .unwrap_or(default)
            .to_string()
    };

    let container = yaml(&format!(
        r#"
name: {CONTAINER}
image: {image:?}
imagePullPolicy: IfNotPresent
env:
  - name: OUTRIGGER_POD_NAMESPACE
    valueFrom: {{fieldRef: {{fieldPath: metadata.namespace}}}}
  - name: OUTRIGGER_WORKLOAD
    value: "$(OUTRIGGER_POD_NAMESPACE)/{workload}"
  - name: OUTRIGGER_CONTROL_PLANE
    value: {control_plane:?}
  - name: OUTRIGGER_ADVERTISE_IP
    valueFrom: {{fieldRef: {{fieldPath: status.podIP}}}}
  - name: OUTRIGGER_PROXY_ID
    valueFrom: {{fieldRef: {{fieldPath: metadata.name}}}}
  - name: OUTRIGGER_ADMIN_ADDR
    value: "0.0.0.0:{admin_port}"
  - name: OUTRIGGER_STATE_DIR
    value: /var/run/outrigger/state
  - name: OUTRIGGER_BOOTSTRAP_TOKEN_FILE
    value: /var/run/outrigger/token/token
ports:
  - name: outrigger-admin
    containerPort: {admin_port}
    protocol: TCP
resources:
  requests: {{cpu: {:?}, memory: {:?}}}
  limits: {{cpu: {:?}, memory: {:?}}}
livenessProbe:
  httpGet: {{path: /live, port: {admin_port}}}
  periodSeconds: 10
readinessProbe:
  httpGet: {{path: /ready, port: {admin_port}}}
  periodSeconds: 5
securityContext:
  runAsNonRoot: true
  runAsUser: {PROXY_UID}
  readOnlyRootFilesystem: true
  allowPrivilegeEscalation: false
  capabilities: {{drop: [ALL]}}
volumeMounts:
  - {{name: {TOKEN_VOLUME}, mountPath: /var/run/outrigger/token, readOnly: true}}
  - {{name: {STATE_VOLUME}, mountPath: /var/run/outrigger/state}}
"#,
        resource("cpu-request", "10m"),
        resource("memory-request", "32Mi"),
        resource("cpu-limit", "1"),
        resource("memory-limit", "128Mi"),
    ))?;
    let volumes = [
        yaml(&format!(
            "{{name: {TOKEN_VOLUME}, secret: {{secretName: {token_secret:?}}}}}"
        ))?,
        yaml(&format!("{{name: {STATE_VOLUME}, emptyDir: {{}}}}"))?,
    ];

    if let Some(Value::Sequence(containers)) = spec.get_mut("containers") {
        containers.push(container);
    }
    let existing = spec
        .entry(Value::from("volumes"))
        .or_insert_with(|| Value::Sequence(Vec::new()));
    let Value::Sequence(list) = existing else {
        return Err(format!("{label}: spec.volumes is not a list"));
    };
    for volume in volumes {
        let name = volume.get("name").cloned();
        if !list.iter().any(|v| v.get("name") == name.as_ref()) {
            list.push(volume);
        }
    }
    let meta = pod
        .entry(Value::from("metadata"))
        .or_insert_with(|| Value::Mapping(Mapping::new()));
    let Value::Mapping(meta) = meta else {
        return Err(format!("{label}: metadata is not a mapping"));
    };
    let annotations = meta
        .entry(Value::from("annotations"))
        .or_insert_with(|| Value::Mapping(Mapping::new()));
    if let Value::Mapping(annotations) = annotations {
        annotations.insert(
            Value::from(VERSION_ANNOTATION),
            Value::from(env!("CARGO_PKG_VERSION")),
        );
    }
    report.changed.push(label.to_string());
    Ok(true)
}

fn uninject_pod(pod: &mut Mapping, label: &str, report: &mut Report) -> bool {
    let mut changed = false;
    if let Some(spec) = pod.get_mut("spec").and_then(Value::as_mapping_mut) {
        if let Some(Value::Sequence(containers)) = spec.get_mut("containers") {
            let before = containers.len();
            containers.retain(|c| c.get("name").and_then(Value::as_str) != Some(CONTAINER));
            changed |= containers.len() != before;
        }
        if changed {
            let mut empty = false;
            if let Some(Value::Sequence(volumes)) = spec.get_mut("volumes") {
                volumes.retain(|v| {
                    let name = v.get("name").and_then(Value::as_str);
                    name != Some(TOKEN_VOLUME) && name != Some(STATE_VOLUME)
                });
                empty = volumes.is_empty();
            }
            if empty {
                spec.remove("volumes");
            }
        }
    }
    if changed && let Some(meta) = pod.get_mut("metadata").and_then(Value::as_mapping_mut) {
        let mut empty = false;
        if let Some(Value::Mapping(annotations)) = meta.get_mut("annotations") {
            annotations.remove(VERSION_ANNOTATION);
            empty = annotations.is_empty();
        }
        if empty {
            meta.remove("annotations");
        }
        // Inject made the pod template's metadata if it had none.
        if meta.is_empty() {
            pod.remove("metadata");
        }
    }
    if changed {
        report.changed.push(label.to_string());
    }
    changed
}

fn yaml(text: &str) -> Result<Value, String> {
    serde_norway::from_str(text).map_err(|e| format!("internal error building the sidecar: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    const DEPLOYMENT: &str = "apiVersion: apps/v1
kind: Deployment
metadata:
  name: web
  namespace: shop
spec:
  replicas: 2
  selector:
    matchLabels: {app: web}
  template:
    metadata:
      labels: {app: web}
    spec:
      initContainers:
        - name: migrate
          image: web:1
      containers:
        - name: web
          image: web:1
          env:
            - {name: MODE, value: prod}
        - name: metrics
          image: exporter:2
      volumes:
        - name: data
          emptyDir: {}
";

    fn parse(text: &str) -> Vec<Value> {
        use serde::Deserialize;
        serde_norway::Deserializer::from_str(text)
            .map(Value::deserialize)
            .collect::<Result<_, _>>()
            .expect("YAML")
    }

    fn pod_spec(doc: &Value) -> &Value {
        &doc["spec"]["template"]["spec"]
    }

    fn container<'a>(doc: &'a Value, name: &str) -> Option<&'a Value> {
        pod_spec(doc)["containers"]
            .as_sequence()?
            .iter()
            .find(|c| c["name"].as_str() == Some(name))
    }

    #[test]
    fn a_deployment_gets_the_sidecar_and_keeps_everything_else() {
        let (out, report) = inject("in.yaml", DEPLOYMENT).expect("inject");
        assert_eq!(report.changed, ["Deployment web"]);
        let doc = &parse(&out)[0];
        let sidecar = container(doc, CONTAINER).expect("sidecar");
        let env: Vec<(&str, Option<&str>)> = sidecar["env"]
            .as_sequence()
            .expect("env")
            .iter()
            .map(|e| (e["name"].as_str().unwrap_or(""), e["value"].as_str()))
            .collect();
        assert!(env.contains(&("OUTRIGGER_WORKLOAD", Some("$(OUTRIGGER_POD_NAMESPACE)/web"))));
        assert!(env.contains(&("OUTRIGGER_CONTROL_PLANE", Some(DEFAULT_CONTROL_PLANE))));
        assert_eq!(sidecar["readinessProbe"]["httpGet"]["path"], "/ready");
        assert_eq!(sidecar["livenessProbe"]["httpGet"]["port"], 15000);
        assert_eq!(sidecar["securityContext"]["runAsNonRoot"], true);
        assert_eq!(sidecar["securityContext"]["readOnlyRootFilesystem"], true);
        assert_eq!(sidecar["securityContext"]["capabilities"]["drop"][0], "ALL");
        assert_eq!(sidecar["resources"]["limits"]["memory"], "128Mi");
        // The app's containers, init containers, env and volumes stay.
        assert!(container(doc, "web").is_some() && container(doc, "metrics").is_some());
        assert_eq!(pod_spec(doc)["initContainers"][0]["name"], "migrate");
        assert_eq!(
            container(doc, "web").expect("web")["env"][0]["value"],
            "prod"
        );
        let volumes: Vec<&str> = pod_spec(doc)["volumes"]
            .as_sequence()
            .expect("volumes")
            .iter()
            .filter_map(|v| v["name"].as_str())
            .collect();
        assert_eq!(volumes, ["data", TOKEN_VOLUME, STATE_VOLUME]);
        assert_eq!(
            pod_spec(doc)["volumes"][1]["secret"]["secretName"],
            "web-outrigger-token"
        );
        assert_eq!(doc["spec"]["replicas"], 2);
    }

    #[test]
    fn injecting_twice_changes_nothing_and_uninject_undoes_it() {
        let (once, _) = inject("in.yaml", DEPLOYMENT).expect("inject");
        let (twice, report) = inject("in.yaml", &once).expect("again");
        assert_eq!(twice, once, "byte for byte");
        assert_eq!(report.skipped, ["Deployment web: already injected"]);
        let (back, report) = uninject("in.yaml", &once).expect("uninject");
        assert_eq!(report.changed, ["Deployment web"]);
        assert_eq!(parse(&back), parse(DEPLOYMENT));
        let (again, _) = uninject("in.yaml", &back).expect("uninject again");
        assert_eq!(again, back);
    }

    #[test]
    fn other_documents_pass_through_exactly() {
        let service = "# the web service\napiVersion: v1\nkind: Service\nmetadata: {name: web}   # keep this comment\nspec:\n  ports: [{port: 80}]\n";
        let input = format!(
            "{service}---\n{DEPLOYMENT}--- # a comment\nkind: ConfigMap\ndata: {{a: '1'}}\n"
        );
        let (out, _) = inject("in.yaml", &input).expect("inject");
        assert!(out.starts_with(service), "{out}");
        assert!(
            out.ends_with("--- # a comment\nkind: ConfigMap\ndata: {a: '1'}\n"),
            "{out}"
        );
        assert_eq!(parse(&out).len(), 3);
    }

    #[test]
    fn opt_out_and_host_network_are_left_alone() {
        let disabled = DEPLOYMENT.replace(
            "      labels: {app: web}",
            "      labels: {app: web}\n      annotations: {outrigger.io/inject: disabled}",
        );
        let (out, report) = inject("in.yaml", &disabled).expect("inject");
        assert_eq!(out, disabled);
        assert_eq!(
            report.skipped,
            ["Deployment web: outrigger.io/inject is disabled"]
        );

        let host = DEPLOYMENT.replace(
            "      initContainers:",
            "      hostNetwork: true\n      initContainers:",
        );
        let (out, report) = inject("in.yaml", &host).expect("inject");
        assert_eq!(out, host);
        assert!(report.skipped[0].contains("host network"));
    }

    #[test]
    fn annotations_set_image_ports_and_resources() {
        let custom = DEPLOYMENT.replace(
            "  namespace: shop\n",
            "  namespace: shop\n  annotations:\n    outrigger.io/proxy-image: registry.local/proxy:dev\n    outrigger.io/admin-port: \"16000\"\n    outrigger.io/proxy-memory-limit: 256Mi\n    outrigger.io/workload: storefront\n",
        );
        let (out, _) = inject("in.yaml", &custom).expect("inject");
        let doc = &parse(&out)[0];
        let sidecar = container(doc, CONTAINER).expect("sidecar");
        assert_eq!(sidecar["image"], "registry.local/proxy:dev");
        assert_eq!(sidecar["ports"][0]["containerPort"], 16000);
        assert_eq!(sidecar["readinessProbe"]["httpGet"]["port"], 16000);
        assert_eq!(sidecar["resources"]["limits"]["memory"], "256Mi");
        assert_eq!(
            pod_spec(doc)["volumes"][1]["secret"]["secretName"],
            "storefront-outrigger-token"
        );

        let bad = DEPLOYMENT.replace(
            "  namespace: shop\n",
            "  namespace: shop\n  annotations: {outrigger.io/admin-port: http}\n",
        );
        let error = inject("in.yaml", &bad).expect_err("bad port");
        assert_eq!(error.document, 1);
        assert!(
            error
                .to_string()
                .contains("outrigger.io/admin-port \"http\" is not a port"),
            "{error}"
        );
    }

    #[test]
    fn pods_lists_and_cronjobs() {
        let pod = "apiVersion: v1\nkind: Pod\nmetadata: {name: debug}\nspec:\n  containers: [{name: sh, image: busybox}]\n";
        let (out, _) = inject("in.yaml", pod).expect("pod");
        assert!(parse(&out)[0]["spec"]["containers"][1]["name"] == CONTAINER);

        let list = "apiVersion: v1\nkind: List\nitems:\n  - apiVersion: v1\n    kind: Pod\n    metadata: {name: a}\n    spec: {containers: [{name: a, image: a}]}\n  - apiVersion: v1\n    kind: Service\n    metadata: {name: s}\n";
        let (out, report) = inject("in.yaml", list).expect("list");
        assert_eq!(report.changed, ["Pod a"]);
        assert_eq!(parse(&out)[0]["items"][1]["kind"], "Service");

        let cron = "apiVersion: batch/v1\nkind: CronJob\nmetadata: {name: nightly}\nspec:\n  schedule: '0 3 * * *'\n  jobTemplate:\n    spec:\n      template:\n        spec:\n          restartPolicy: OnFailure\n          containers: [{name: job, image: job}]\n";
        let (out, _) = inject("in.yaml", cron).expect("cron");
        let containers =
            &parse(&out)[0]["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"];
        assert_eq!(containers[1]["name"], CONTAINER);
    }

    #[test]
    fn malformed_yaml_names_its_document() {
        let input = format!("{DEPLOYMENT}---\nkind: Pod\nmetadata: [unclosed\n");
        let error = inject("in.yaml", &input).expect_err("malformed");
        assert_eq!(error.document, 2);
        assert!(
            error
                .to_string()
                .starts_with("in.yaml: document 2: invalid YAML"),
            "{error}"
        );
        let leading = format!("---\n{DEPLOYMENT}---\nkind: Pod\nmetadata: [unclosed\n");
        assert_eq!(inject("in.yaml", &leading).expect_err("bad").document, 2);
        let no_containers = "kind: Pod\nmetadata: {name: p}\nspec: {}\n";
        let error = inject("in.yaml", no_containers).expect_err("no containers");
        assert!(
            error.reason.contains("Pod p: the pod has no containers"),
            "{error}"
        );
    }
}
