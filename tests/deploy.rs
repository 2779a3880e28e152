//! The deployment files agree with each other and with Portcullis: container ports, Service
//! ports, the policy's listen addresses, probe paths, the Istio provider, the Dockerfile, and
//! the hardening the README promises. A mismatch here is an outage (or an open door) later.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::collections::BTreeSet;
use std::path::Path;

use serde::Deserialize;
use serde_yaml::Value;

const GRPC_PORT: u64 = 9191;
const HTTP_PORT: u64 = 9193;
const ADMIN_PORT: u64 = 9192;
/// Paths served by the admin listener (src/admin): probes may only use these.
const ADMIN_PATHS: &[&str] = &["/healthz", "/readyz", "/metrics"];

/// All YAML documents in every `*.yaml` file of `dir` (relative to the repository root).
fn documents(dir: &str) -> Vec<(String, Value)> {
    let dir = support::repo_root().join(dir);
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    let mut docs = Vec::new();
    for file in files {
        let text = std::fs::read_to_string(&file).unwrap();
        for doc in serde_yaml::Deserializer::from_str(&text) {
            let value = Value::deserialize(doc)
                .unwrap_or_else(|e| panic!("{} is not valid YAML: {e}", file.display()));
            if !value.is_null() {
                docs.push((file.display().to_string(), value));
            }
        }
    }
    docs
}

fn kind<'a>(docs: &'a [(String, Value)], kind: &str) -> Vec<&'a Value> {
    docs.iter()
        .filter(|(_, d)| d["kind"].as_str() == Some(kind))
        .map(|(_, d)| d)
        .collect()
}

fn one<'a>(docs: &'a [(String, Value)], k: &str) -> &'a Value {
    let found = kind(docs, k);
    assert_eq!(
        found.len(),
        1,
        "expected exactly one {k} in deploy/kubernetes"
    );
    found[0]
}

fn k8s() -> Vec<(String, Value)> {
    documents("deploy/kubernetes")
}

/// The gateway: Envoy with Portcullis inside it (`module/Dockerfile`'s image).
fn gateway() -> Vec<(String, Value)> {
    documents("deploy/kubernetes/module")
}

fn container(deployment: &Value) -> &Value {
    let containers = deployment["spec"]["template"]["spec"]["containers"]
        .as_sequence()
        .unwrap();
    assert_eq!(containers.len(), 1, "one container expected");
    &containers[0]
}

/// Container port name -> number.
fn container_ports(deployment: &Value) -> Vec<(String, u64)> {
    container(deployment)["ports"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|p| {
            (
                p["name"].as_str().unwrap().to_string(),
                p["containerPort"].as_u64().unwrap(),
            )
        })
        .collect()
}

fn port_of(addr: &str) -> u64 {
    addr.rsplit_once(':').unwrap().1.parse().unwrap()
}

/// The ConfigMap's policy text.
fn configmap_policy(docs: &[(String, Value)]) -> String {
    configmap_text(docs, "portcullis.yaml").to_string()
}

/// The ConfigMap's text under `key`.
fn configmap_text<'a>(docs: &'a [(String, Value)], key: &str) -> &'a str {
    one(docs, "ConfigMap")["data"][key]
        .as_str()
        .unwrap_or_else(|| panic!("the ConfigMap has no {key}"))
}

#[test]
fn every_manifest_has_kind_metadata_and_namespace() {
    let docs = k8s();
    assert!(
        docs.len() >= 6,
        "expected the six manifests, got {}",
        docs.len()
    );
    for (file, doc) in &docs {
        let kind = doc["kind"]
            .as_str()
            .unwrap_or_else(|| panic!("{file}: no kind"));
        assert!(
            doc["apiVersion"].as_str().is_some(),
            "{file}: no apiVersion"
        );
        assert!(
            doc["metadata"]["name"].as_str().is_some(),
            "{file}: no name"
        );
        if kind != "Namespace" {
            assert_eq!(
                doc["metadata"]["namespace"].as_str(),
                Some("portcullis"),
                "{file}: {kind} must be in namespace portcullis"
            );
        }
    }
    for k in [
        "Namespace",
        "ConfigMap",
        "Deployment",
        "Service",
        "PodDisruptionBudget",
        "HorizontalPodAutoscaler",
    ] {
        one(&docs, k);
    }
    assert_eq!(
        one(&docs, "HorizontalPodAutoscaler")["apiVersion"].as_str(),
        Some("autoscaling/v2")
    );
}

#[test]
fn container_service_and_config_ports_line_up() {
    let docs = k8s();
    let deployment = one(&docs, "Deployment");
    let ports = container_ports(deployment);
    assert_eq!(
        ports,
        vec![
            ("grpc".to_string(), GRPC_PORT),
            ("http".to_string(), HTTP_PORT),
            ("admin".to_string(), ADMIN_PORT)
        ]
    );

    let service = one(&docs, "Service");
    let mut service_ports = Vec::new();
    for p in service["spec"]["ports"].as_sequence().unwrap() {
        let name = p["name"].as_str().unwrap().to_string();
        let port = p["port"].as_u64().unwrap();
        // targetPort may name the container port or repeat its number.
        let target = match &p["targetPort"] {
            Value::String(s) => ports.iter().find(|(n, _)| n == s).unwrap().1,
            Value::Number(n) => n.as_u64().unwrap(),
            _ => port,
        };
        assert_eq!(
            target, port,
            "Service port {name} must forward to the same port"
        );
        service_ports.push((name, port));
    }
    assert_eq!(
        service_ports, ports,
        "Service ports must equal container ports"
    );
    // The Service selects the Deployment's pods.
    let selector = service["spec"]["selector"].as_mapping().unwrap();
    let labels = deployment["spec"]["template"]["metadata"]["labels"]
        .as_mapping()
        .unwrap();
    for (k, v) in selector {
        assert_eq!(
            labels.get(k),
            Some(v),
            "Service selector {k:?} must match the pods"
        );
    }

    // The policy listens on exactly those ports, on all interfaces (a pod's loopback is
    // unreachable for the kubelet and for Envoy).
    let policy: Value = serde_yaml::from_str(&configmap_policy(&docs)).unwrap();
    let listen = policy["server"]["listen"].as_str().unwrap();
    let http = policy["server"]["http_listen"].as_str().unwrap();
    let admin = policy["server"]["admin_listen"].as_str().unwrap();
    assert_eq!(listen, format!("0.0.0.0:{GRPC_PORT}"));
    assert_eq!(http, format!("0.0.0.0:{HTTP_PORT}"));
    assert_eq!(admin, format!("0.0.0.0:{ADMIN_PORT}"));
    assert_eq!(port_of(listen), GRPC_PORT);
    assert_eq!(port_of(admin), ADMIN_PORT);
}

#[test]
fn probes_use_admin_paths_on_the_admin_port() {
    assert_probes_on_admin(one(&k8s(), "Deployment"));
}

/// Readiness is `/readyz` and liveness `/healthz`, both on the container port of Portcullis's
/// admin listener.
fn assert_probes_on_admin(deployment: &Value) {
    let c = container(deployment);
    let ports = container_ports(deployment);
    for (probe, want_path) in [("readinessProbe", "/readyz"), ("livenessProbe", "/healthz")] {
        let get = &c[probe]["httpGet"];
        let path = get["path"]
            .as_str()
            .unwrap_or_else(|| panic!("{probe} must be an httpGet probe"));
        assert_eq!(path, want_path, "{probe} path");
        assert!(
            ADMIN_PATHS.contains(&path),
            "{probe}: {path} is not served by admin"
        );
        let port = match &get["port"] {
            Value::String(name) => ports.iter().find(|(n, _)| n == name).unwrap().1,
            Value::Number(n) => n.as_u64().unwrap(),
            other => panic!("{probe}: bad port {other:?}"),
        };
        assert_eq!(port, ADMIN_PORT, "{probe} must hit the admin listener");
    }
}

#[test]
fn deployment_is_hardened() {
    let docs = k8s();
    let deployment = one(&docs, "Deployment");
    assert_hardened(deployment);
    let pod = &deployment["spec"]["template"]["spec"];
    let c = container(deployment);
    let args: Vec<&str> = c["args"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert_eq!(
        args,
        ["serve", "--config", "/etc/portcullis/portcullis.yaml"]
    );

    // The config comes from the ConfigMap, read-only, at the path the args name.
    let mount = c["volumeMounts"]
        .as_sequence()
        .unwrap()
        .iter()
        .find(|m| m["mountPath"].as_str() == Some("/etc/portcullis"))
        .expect("config mounted at /etc/portcullis");
    assert_eq!(mount["readOnly"].as_bool(), Some(true));
    let volume = pod["volumes"]
        .as_sequence()
        .unwrap()
        .iter()
        .find(|v| v["name"] == mount["name"])
        .unwrap();
    assert_eq!(
        volume["configMap"]["name"].as_str(),
        one(&docs, "ConfigMap")["metadata"]["name"].as_str()
    );
    assert!(
        configmap_policy(&docs).contains("server:"),
        "ConfigMap key portcullis.yaml must be the policy"
    );

    assert_availability(&docs, deployment);
}

/// The HorizontalPodAutoscaler scales `deployment` and never below the two replicas
/// `assert_hardened` asks for, and the PodDisruptionBudget keeps at least one of its pods
/// through a node drain.
fn assert_availability(docs: &[(String, Value)], deployment: &Value) {
    let hpa = one(docs, "HorizontalPodAutoscaler");
    assert_eq!(hpa["apiVersion"].as_str(), Some("autoscaling/v2"));
    assert!(hpa["spec"]["minReplicas"].as_u64().unwrap() >= 2);
    assert_eq!(
        hpa["spec"]["scaleTargetRef"]["name"],
        deployment["metadata"]["name"]
    );
    let pdb = one(docs, "PodDisruptionBudget");
    assert!(pdb["spec"]["minAvailable"].as_u64().unwrap() >= 1);
    assert_eq!(
        pdb["spec"]["selector"]["matchLabels"],
        deployment["spec"]["selector"]["matchLabels"]
    );
}

/// Non-root, no privilege escalation, read-only root, no capabilities, the runtime's seccomp
/// profile, no service account token, resources bounded, and at least two replicas (Envoy
/// fails closed, so one pod going away must not deny all traffic).
fn assert_hardened(deployment: &Value) {
    let pod = &deployment["spec"]["template"]["spec"];
    assert_eq!(pod["securityContext"]["runAsNonRoot"].as_bool(), Some(true));
    assert_eq!(
        pod["securityContext"]["seccompProfile"]["type"].as_str(),
        Some("RuntimeDefault")
    );
    assert_eq!(pod["automountServiceAccountToken"].as_bool(), Some(false));
    let c = container(deployment);
    let sc = &c["securityContext"];
    assert_eq!(sc["runAsNonRoot"].as_bool(), Some(true));
    assert_ne!(sc["runAsUser"].as_u64(), Some(0), "must not run as uid 0");
    assert_eq!(sc["allowPrivilegeEscalation"].as_bool(), Some(false));
    assert_eq!(sc["readOnlyRootFilesystem"].as_bool(), Some(true));
    assert_eq!(
        sc["seccompProfile"]["type"].as_str(),
        Some("RuntimeDefault")
    );
    let drop: Vec<&str> = sc["capabilities"]["drop"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert_eq!(drop, vec!["ALL"]);
    assert!(
        sc["capabilities"]["add"].is_null(),
        "no capability may be added"
    );
    for kind in ["requests", "limits"] {
        for res in ["cpu", "memory"] {
            assert!(
                !c["resources"][kind][res].is_null(),
                "resources.{kind}.{res} must be set"
            );
        }
    }
    assert!(deployment["spec"]["replicas"].as_u64().unwrap() >= 2);
}

#[test]
fn configmap_policies_do_not_trust_the_dev_issuer() {
    for docs in [k8s(), gateway()] {
        let policy = configmap_policy(&docs);
        assert!(
            !policy.contains("dev.portcullis.invalid"),
            "{}: the development issuer (public private key) must never be deployed",
            docs[0].0
        );
    }
}

#[test]
fn configmap_policies_compile() {
    let path = Path::new("/etc/portcullis/portcullis.yaml");
    for docs in [k8s(), gateway()] {
        if let Err(e) = portcullis::config::from_str(&configmap_policy(&docs), path) {
            panic!(
                "{}: the ConfigMap's policy does not compile: {e}",
                docs[0].0
            );
        }
    }
}

/// After SIGTERM the service serves out `server.shutdown_delay` (so Envoys reconnecting
/// while the endpoints catch up are still answered), then lets in-flight checks finish for
/// up to `shutdown_grace`: the pod's grace period must cover both, or Kubernetes kills it
/// mid-drain.
#[test]
fn the_service_stops_within_its_grace_period() {
    let docs = k8s();
    let config = portcullis::config::from_str(
        &configmap_policy(&docs),
        Path::new("/etc/portcullis/portcullis.yaml"),
    )
    .unwrap();
    let server = &config.file.server;
    let (delay, grace) = (server.shutdown_delay.get(), server.shutdown_grace.get());
    assert!(
        delay >= std::time::Duration::from_secs(2),
        "a pod must go on deciding while the endpoints drop it (shutdown_delay {delay:?})"
    );
    let pod_grace =
        one(&docs, "Deployment")["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
            .as_u64()
            .expect("the Deployment sets terminationGracePeriodSeconds");
    assert!(
        std::time::Duration::from_secs(pod_grace) > delay + grace,
        "terminationGracePeriodSeconds {pod_grace} does not cover shutdown_delay {delay:?} \
         plus shutdown_grace {grace:?}"
    );
}

/// The Service port named `name`.
fn service_port<'a>(service: &'a Value, name: &str) -> &'a Value {
    service["spec"]["ports"]
        .as_sequence()
        .unwrap()
        .iter()
        .find(|p| p["name"].as_str() == Some(name))
        .unwrap_or_else(|| panic!("the Service has no port {name}"))
}

/// A YAML list of strings.
fn strings(v: &Value) -> Vec<String> {
    v.as_sequence()
        .unwrap_or_else(|| panic!("expected a list, got {v:?}"))
        .iter()
        .map(|s| s.as_str().unwrap().to_string())
        .collect()
}

/// Envoy string matcher patterns as Istio writes them: `exact`, `prefix*`.
fn patterns(v: &Value) -> Vec<String> {
    v["patterns"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|p| match (p["exact"].as_str(), p["prefix"].as_str()) {
            (Some(e), None) => e.to_string(),
            (None, Some(prefix)) => format!("{prefix}*"),
            _ => panic!("unexpected matcher {p:?}"),
        })
        .collect()
}

/// The ext_authz filter config of a shipped Envoy file.
fn shipped_ext_authz(file: &str) -> Value {
    let text = std::fs::read_to_string(support::repo_root().join(file)).unwrap();
    let doc: Value = serde_yaml::from_str(&text).unwrap();
    let hcm = &doc["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0];
    hcm["typed_config"]["http_filters"]
        .as_sequence()
        .unwrap()
        .iter()
        .find(|f| f["name"].as_str() == Some("envoy.filters.http.ext_authz"))
        .expect("the shipped Envoy file has an ext_authz filter")["typed_config"]
        .clone()
}

#[test]
fn istio_providers_point_at_the_service() {
    let docs = k8s();
    let service = one(&docs, "Service");
    let name = service["metadata"]["name"].as_str().unwrap();
    let namespace = service["metadata"]["namespace"].as_str().unwrap();
    let host = format!("{name}.{namespace}.svc.cluster.local");

    let istio = documents("envoy/istio");
    let mesh_cm = istio
        .iter()
        .find(|(_, d)| d["kind"].as_str() == Some("ConfigMap"))
        .expect("envoy/istio holds the mesh ConfigMap")
        .1
        .clone();
    let mesh: Value = serde_yaml::from_str(mesh_cm["data"]["mesh"].as_str().unwrap()).unwrap();
    let providers = mesh["extensionProviders"].as_sequence().unwrap();
    let provider = |kind: &str| -> &Value {
        let found: Vec<&Value> = providers.iter().filter(|p| !p[kind].is_null()).collect();
        assert_eq!(found.len(), 1, "one {kind} provider expected");
        found[0]
    };
    // gRPC on the `grpc` port, HTTP on the `http` port (h2c: one connection for all checks).
    for (kind, port_name) in [("envoyExtAuthzGrpc", "grpc"), ("envoyExtAuthzHttp", "http")] {
        let p = &provider(kind)[kind];
        assert_eq!(p["service"].as_str(), Some(host.as_str()), "{kind}");
        assert_eq!(
            p["port"].as_u64(),
            service_port(service, port_name)["port"].as_u64(),
            "{kind} must use the Service's {port_name} port"
        );
        assert_eq!(
            p["failOpen"].as_bool(),
            Some(false),
            "{kind} must fail closed"
        );
        assert_eq!(p["statusOnError"].as_str(), Some("403"), "{kind}");
        assert!(p["timeout"].as_str().is_some(), "{kind} needs a timeout");
        assert!(
            p.get("includeRequestBodyInCheck").is_none(),
            "request bodies must not be sent to Portcullis ({kind})"
        );
    }
    assert_eq!(
        service_port(service, "http")["appProtocol"].as_str(),
        Some("http2")
    );

    // The HTTP provider sends and takes back what envoy/envoy-http.yaml (run end to end
    // against a real Envoy) does, and covers the ConfigMap's policy.
    let http = &provider("envoyExtAuthzHttp")["envoyExtAuthzHttp"];
    assert!(
        http.get("pathPrefix").is_none(),
        "a path prefix would become part of the path Portcullis authorizes"
    );
    let envoy = shipped_ext_authz("envoy/envoy-http.yaml");
    let service_cfg = &envoy["http_service"];
    assert_eq!(
        strings(&http["includeRequestHeadersInCheck"]),
        patterns(&envoy["allowed_headers"])
    );
    let upstream = strings(&http["headersToUpstreamOnAllow"]);
    assert_eq!(
        upstream,
        patterns(&service_cfg["authorization_response"]["allowed_upstream_headers"])
    );
    let client: Vec<String> =
        patterns(&service_cfg["authorization_response"]["allowed_client_headers"]);
    assert_eq!(strings(&http["headersToDownstreamOnDeny"]), client);
    assert_eq!(
        strings(&http["headersToDownstreamOnAllow"]),
        patterns(&service_cfg["authorization_response"]["allowed_client_headers_on_success"])
    );
    let added = &service_cfg["authorization_request"]["headers_to_add"][0];
    assert_eq!(
        http["includeAdditionalHeadersInCheck"][added["key"].as_str().unwrap()].as_str(),
        added["value"].as_str(),
        "the client address header, as Envoy derives it"
    );
    let policy: Value = serde_yaml::from_str(&configmap_policy(&docs)).unwrap();
    for (header, _) in policy["upstream"]["identity_headers"].as_mapping().unwrap() {
        let header = header.as_str().unwrap();
        assert!(
            upstream.iter().any(|h| h == header),
            "identity header {header} must be in headersToUpstreamOnAllow"
        );
    }
    let sent = strings(&http["includeRequestHeadersInCheck"]);
    for issuer in policy["issuers"].as_sequence().unwrap() {
        let header = issuer["token"]["header"]
            .as_str()
            .unwrap_or("authorization")
            .to_ascii_lowercase();
        assert!(
            sent.contains(&header),
            "the token header {header} must be sent"
        );
    }

    let policies: Vec<&Value> = istio
        .iter()
        .filter(|(_, d)| d["kind"].as_str() == Some("AuthorizationPolicy"))
        .map(|(_, d)| d)
        .collect();
    assert_eq!(policies.len(), 1);
    let policy = policies[0];
    assert_eq!(policy["spec"]["action"].as_str(), Some("CUSTOM"));
    assert!(
        providers
            .iter()
            .any(|p| p["name"] == policy["spec"]["provider"]["name"]),
        "the policy names a registered provider"
    );
    assert!(
        !policy["spec"]["selector"]["matchLabels"].is_null(),
        "the sample policy selects a workload"
    );
}

/// One build stage of a Dockerfile: its (instruction, arguments) lines, `FROM` first.
type Stage = Vec<(String, String)>;

/// The stages of `file` (relative to the repository root), continuation lines joined.
fn dockerfile_stages(file: &str) -> Vec<Stage> {
    let text = std::fs::read_to_string(support::repo_root().join(file)).unwrap();
    let mut stages: Vec<Stage> = Vec::new();
    let mut pending = String::new();
    for line in text.lines() {
        let line = line.trim();
        if line.starts_with('#') || (line.is_empty() && pending.is_empty()) {
            continue;
        }
        if let Some(start) = line.strip_suffix('\\') {
            pending.push_str(start);
            continue;
        }
        pending.push_str(line);
        let whole = std::mem::take(&mut pending);
        let (instr, args) = whole.split_once(' ').unwrap_or((&whole, ""));
        let instr = instr.to_ascii_uppercase();
        if instr == "FROM" {
            stages.push(Vec::new());
        }
        stages
            .last_mut()
            .unwrap_or_else(|| panic!("{file}: an instruction before FROM"))
            .push((instr, args.trim().to_string()));
    }
    stages
}

/// The final (runtime) stage of `file`.
fn final_stage(file: &str) -> Stage {
    dockerfile_stages(file).pop().unwrap()
}

/// The arguments of every `instr` line of `stage`.
fn lines<'a>(stage: &'a Stage, instr: &str) -> Vec<&'a str> {
    stage
        .iter()
        .filter(|(i, _)| i == instr)
        .map(|(_, a)| a.as_str())
        .collect()
}

/// The runtime stage is minimal and runs as a non-root user, the one the Deployment runs as,
/// and exposes exactly the Deployment's container ports.
fn assert_runtime_stage_matches(stage: &Stage, deployment: &Value) {
    let from = &stage[0].1;
    assert!(
        from.contains("distroless") || from.contains("scratch"),
        "runtime image should be minimal, got {from}"
    );
    let user = *lines(stage, "USER")
        .last()
        .expect("the runtime stage must set USER");
    let uid = user.split(':').next().unwrap();
    assert!(
        uid != "0" && uid != "root",
        "runtime USER must not be root: {user}"
    );
    assert_eq!(
        container(deployment)["securityContext"]["runAsUser"].as_u64(),
        uid.parse::<u64>().ok(),
        "the Deployment runs as the image's user"
    );
    let exposed: BTreeSet<u64> = lines(stage, "EXPOSE")
        .into_iter()
        .flat_map(|a| a.split_whitespace().map(|p| p.parse::<u64>().unwrap()))
        .collect();
    let container_set: BTreeSet<u64> = container_ports(deployment)
        .into_iter()
        .map(|(_, p)| p)
        .collect();
    assert_eq!(
        exposed, container_set,
        "EXPOSE must equal the container ports"
    );
}

#[test]
fn dockerfile_runs_non_root_and_exposes_the_service_ports() {
    let stage = final_stage("Dockerfile");
    assert_runtime_stage_matches(&stage, one(&k8s(), "Deployment"));
    assert!(
        lines(&stage, "COPY")
            .iter()
            .any(|a| a.starts_with("config/")),
        "the image ships config/"
    );
}

#[test]
fn dockerignore_keeps_build_output_and_tools_out() {
    let text = std::fs::read_to_string(support::repo_root().join(".dockerignore")).unwrap();
    let entries: BTreeSet<&str> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| l.trim_end_matches('/'))
        .collect();
    for needed in ["target", ".tools", ".git", "config/dev/signing-key.pem"] {
        assert!(entries.contains(needed), ".dockerignore must list {needed}");
    }
}

/// The gateway's Envoy listener port (`deploy/kubernetes/module/`).
const GATEWAY_PORT: u64 = 10000;

/// The ConfigMap's text under `key`, parsed.
fn configmap_file(docs: &[(String, Value)], key: &str) -> Value {
    serde_yaml::from_str(configmap_text(docs, key)).unwrap()
}

/// The ConfigMap key a file path inside the container reads: the read-only mount of the
/// path's folder, whose volume maps that key of `configmap` to the file's name.
fn mounted_key(deployment: &Value, configmap: &str, file: &str) -> String {
    let (dir, name) = file.rsplit_once('/').unwrap();
    let mount = container(deployment)["volumeMounts"]
        .as_sequence()
        .unwrap()
        .iter()
        .find(|m| m["mountPath"].as_str() == Some(dir))
        .unwrap_or_else(|| panic!("nothing is mounted at {dir} (for {file})"));
    assert_eq!(mount["readOnly"].as_bool(), Some(true), "{dir} read-only");
    let volume = deployment["spec"]["template"]["spec"]["volumes"]
        .as_sequence()
        .unwrap()
        .iter()
        .find(|v| v["name"] == mount["name"])
        .unwrap();
    assert_eq!(volume["configMap"]["name"].as_str(), Some(configmap));
    volume["configMap"]["items"]
        .as_sequence()
        .unwrap()
        .iter()
        .find(|item| item["path"].as_str() == Some(name))
        .and_then(|item| item["key"].as_str())
        .unwrap_or_else(|| panic!("the volume at {dir} holds no {name}"))
        .to_string()
}

#[test]
fn gateway_manifests_line_up_with_its_configs() {
    let docs = gateway();
    for (file, doc) in &docs {
        assert_eq!(
            doc["metadata"]["namespace"].as_str(),
            Some("portcullis"),
            "{file}: in namespace portcullis (deploy/kubernetes/namespace.yaml)"
        );
    }
    let deployment = one(&docs, "Deployment");
    assert_hardened(deployment);
    assert_probes_on_admin(deployment);
    assert_availability(&docs, deployment);
    let ports = container_ports(deployment);
    assert_eq!(
        ports,
        [
            ("http".to_string(), GATEWAY_PORT),
            ("admin".to_string(), ADMIN_PORT)
        ]
    );

    // Envoy listens on the http port and Portcullis's admin listener (the probes, /metrics)
    // on the admin port, both on the pod's interfaces; Portcullis's gRPC port stays on
    // loopback (only the approvals API is served there: Envoy decides in-process).
    let envoy = configmap_file(&docs, "envoy.yaml");
    let listener = &envoy["static_resources"]["listeners"][0]["address"]["socket_address"];
    assert_eq!(listener["address"].as_str(), Some("0.0.0.0"));
    assert_eq!(listener["port_value"].as_u64(), Some(GATEWAY_PORT));
    let policy = configmap_file(&docs, "portcullis.yaml");
    assert_eq!(
        policy["server"]["admin_listen"].as_str(),
        Some(format!("0.0.0.0:{ADMIN_PORT}").as_str())
    );
    assert!(
        policy["server"]["listen"]
            .as_str()
            .unwrap()
            .starts_with("127.0.0.1:")
    );

    // The Service forwards to the named container ports and selects the gateway's pods.
    let service = one(&docs, "Service");
    for name in ["http", "admin"] {
        assert_eq!(
            service_port(service, name)["targetPort"].as_str(),
            Some(name)
        );
    }
    assert_eq!(
        service["spec"]["selector"],
        deployment["spec"]["selector"]["matchLabels"]
    );

    // Envoy reads the ConfigMap's envoy.yaml, and hands the module the path where the
    // ConfigMap's portcullis.yaml is mounted.
    let configmap = one(&docs, "ConfigMap")["metadata"]["name"]
        .as_str()
        .unwrap();
    let args = strings(&container(deployment)["args"]);
    let config_at = args.iter().position(|a| a == "-c").expect("-c CONFIG");
    assert_eq!(
        mounted_key(deployment, configmap, &args[config_at + 1]),
        "envoy.yaml"
    );
    let module_config = envoy["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]
        ["typed_config"]["http_filters"][0]["typed_config"]["filter_config"]["value"]
        .as_str()
        .unwrap();
    assert_eq!(
        mounted_key(deployment, configmap, module_config),
        "portcullis.yaml"
    );
    // Envoy starts one worker per CPU of the node unless told: as many as the limit allows.
    let workers = &args[args.iter().position(|a| a == "--concurrency").unwrap() + 1];
    assert_eq!(
        container(deployment)["resources"]["limits"]["cpu"].as_str(),
        Some(workers.as_str())
    );
}

/// `module/Dockerfile` builds the image the gateway runs: Envoy as the entrypoint, the module
/// where Envoy's config looks for it by name, the same user and ports as the Deployment, and
/// by default the same Envoy config path.
#[test]
fn the_module_image_is_what_the_gateway_runs() {
    let docs = gateway();
    let deployment = one(&docs, "Deployment");
    let stage = final_stage("module/Dockerfile");
    assert_runtime_stage_matches(&stage, deployment);
    assert_eq!(lines(&stage, "ENTRYPOINT"), [r#"["/usr/local/bin/envoy"]"#]);
    let search_path = lines(&stage, "ENV")
        .iter()
        .find_map(|e| e.strip_prefix("ENVOY_DYNAMIC_MODULES_SEARCH_PATH="))
        .expect("the image sets ENVOY_DYNAMIC_MODULES_SEARCH_PATH")
        .to_string();
    let envoy = configmap_file(&docs, "envoy.yaml");
    let module = &envoy["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
        ["http_filters"][0]["typed_config"]["dynamic_module_config"];
    let library = format!("{search_path}/lib{}.so", module["name"].as_str().unwrap());
    assert!(
        lines(&stage, "COPY")
            .iter()
            .any(|a| a.starts_with("--from=") && a.ends_with(&library)),
        "the image must put the module at {library}"
    );
    let cmd: Vec<String> = serde_json::from_str(lines(&stage, "CMD")[0]).unwrap();
    assert_eq!(cmd, strings(&container(deployment)["args"])[..cmd.len()]);
}

/// Envoy exits on SIGTERM at once, resetting open connections, so the gateway drains it
/// first: a `preStop` hook runs the image's drain helper against the Envoy admin of the
/// ConfigMap, within the grace period, with Envoy closing connections at once when draining.
/// (`tests/e2e_module.rs` runs the helper against a real Envoy.)
#[test]
fn the_gateway_drains_envoy_before_it_is_stopped() {
    let docs = gateway();
    let deployment = one(&docs, "Deployment");
    let command = strings(&container(deployment)["lifecycle"]["preStop"]["exec"]["command"]);
    let (program, args) = command
        .split_first()
        .expect("the gateway's container has a preStop exec hook");
    let bin = program.rsplit('/').next().unwrap();
    assert!(
        support::repo_root()
            .join(format!("module/src/bin/{bin}.rs"))
            .exists(),
        "preStop runs {program}, which module/ does not build"
    );
    let stages = dockerfile_stages("module/Dockerfile");
    let runtime = stages.last().unwrap();
    assert!(
        lines(runtime, "COPY")
            .iter()
            .any(|a| a.starts_with("--from=") && a.ends_with(&format!(" {program}"))),
        "the image must put the drain helper at {program}"
    );
    assert!(
        stages
            .iter()
            .flat_map(|stage| lines(stage, "RUN"))
            .any(|r| r.contains(&format!("target/release/{bin} "))),
        "the image's build stage must install target/release/{bin}"
    );
    let flag = |name: &str| -> String {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .unwrap_or_else(|| panic!("preStop gives no {name}"))
            .clone()
    };
    let envoy = configmap_file(&docs, "envoy.yaml");
    let admin = &envoy["admin"]["address"]["socket_address"];
    assert_eq!(
        flag("--admin"),
        format!(
            "{}:{}",
            admin["address"].as_str().unwrap(),
            admin["port_value"].as_u64().unwrap()
        ),
        "preStop must drain the Envoy admin of the gateway's config"
    );
    let secs = |name: &str| flag(name).parse::<u64>().unwrap();
    let grace = deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
        .as_u64()
        .expect("the gateway sets terminationGracePeriodSeconds");
    assert!(
        grace >= secs("--wait") + secs("--timeout") + 5,
        "a grace period of {grace} s leaves Envoy no time to exit after the drain"
    );
    let envoy_args = strings(&container(deployment)["args"]);
    assert!(
        envoy_args
            .windows(2)
            .any(|w| w == ["--drain-strategy", "immediate"]),
        "Envoy must close every connection at once when draining: {envoy_args:?}"
    );
}

/// Copies what a Dockerfile's `COPY` names from the repository into `context` (relative
/// destinations are under the stage's `WORKDIR`, which `context` stands for), with
/// Docker's rules: a folder's contents go into the destination, files into a destination
/// ending in `/` keep their names.
fn copy_build_context(file: &str, stage: &Stage, context: &Path) {
    let root = support::repo_root();
    for args in lines(stage, "COPY") {
        assert!(!args.starts_with("--"), "{file}: unexpected COPY {args}");
        let words: Vec<&str> = args.split_whitespace().collect();
        let (dest, sources) = words.split_last().unwrap();
        let dest = context.join(dest.trim_start_matches("./"));
        for source in sources {
            let from = root.join(source);
            assert!(from.exists(), "{file}: COPY {source}: no such path");
            if from.is_dir() {
                copy_dir(&from, &dest);
            } else {
                let to = if args.ends_with('/') || sources.len() > 1 {
                    dest.join(from.file_name().unwrap())
                } else {
                    dest.clone()
                };
                std::fs::create_dir_all(to.parent().unwrap()).unwrap();
                std::fs::copy(&from, &to).unwrap();
            }
        }
    }
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).unwrap();
        }
    }
}

/// Every stage that runs cargo has in its context all that cargo reads to load the
/// workspace (every member, the lock file), each package's build script and the inputs the
/// script declares (`cargo:rerun-if-changed`). A member added to the workspace without its
/// COPY line broke `docker build` once, and `proto/` missing (read by `build.rs`) before.
#[test]
fn every_dockerfile_gives_cargo_the_whole_workspace() {
    for file in ["Dockerfile", "module/Dockerfile"] {
        let cargo_stages: Vec<Stage> = dockerfile_stages(file)
            .into_iter()
            .filter(|stage| {
                lines(stage, "RUN")
                    .iter()
                    .any(|r| r.contains("cargo build"))
            })
            .collect();
        assert!(
            !cargo_stages.is_empty(),
            "{file}: no stage runs cargo build"
        );
        for stage in cargo_stages {
            let context = tempfile::tempdir().unwrap();
            copy_build_context(file, &stage, context.path());
            let root = context.path().canonicalize().unwrap();
            assert!(
                root.join("Cargo.lock").exists(),
                "{file}: `cargo build --locked` needs Cargo.lock"
            );
            // --no-deps: the members' manifests, not the registry.
            let out = std::process::Command::new(env!("CARGO"))
                .args(["metadata", "--no-deps", "--format-version", "1"])
                .current_dir(&root)
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "{file}: cargo cannot load the workspace from the build context:\n{}",
                String::from_utf8_lossy(&out.stderr)
            );
            let metadata: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
            let members = metadata["packages"].as_array().unwrap();
            assert!(members.len() >= 2, "{file}: the service and the module");
            for member in members {
                let manifest = Path::new(member["manifest_path"].as_str().unwrap());
                let package = manifest.parent().unwrap().strip_prefix(&root).unwrap();
                let Ok(script) =
                    std::fs::read_to_string(support::repo_root().join(package).join("build.rs"))
                else {
                    continue;
                };
                let mut needed = vec!["build.rs".to_string()];
                needed.extend(
                    script
                        .split("cargo:rerun-if-changed=")
                        .skip(1)
                        .map(|rest| rest.split(['"', '\\']).next().unwrap().to_string()),
                );
                for path in needed {
                    assert!(
                        root.join(package).join(&path).exists(),
                        "{file}: {} is not in the build context",
                        package.join(&path).display()
                    );
                }
            }
        }
    }
}
