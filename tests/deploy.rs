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
    let cm = one(docs, "ConfigMap");
    cm["data"]["portcullis.yaml"]
        .as_str()
        .expect("ConfigMap must hold portcullis.yaml")
        .to_string()
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
    let docs = k8s();
    let deployment = one(&docs, "Deployment");
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

    // Availability: Envoy fails closed, so one pod going away must not deny all traffic.
    assert!(deployment["spec"]["replicas"].as_u64().unwrap() >= 2);
    let hpa = one(&docs, "HorizontalPodAutoscaler");
    assert!(hpa["spec"]["minReplicas"].as_u64().unwrap() >= 2);
    assert_eq!(
        hpa["spec"]["scaleTargetRef"]["name"],
        deployment["metadata"]["name"]
    );
    let pdb = one(&docs, "PodDisruptionBudget");
    assert_eq!(
        pdb["spec"]["selector"]["matchLabels"],
        deployment["spec"]["selector"]["matchLabels"]
    );
}

#[test]
fn configmap_policy_does_not_trust_the_dev_issuer() {
    let policy = configmap_policy(&k8s());
    assert!(
        !policy.contains("dev.portcullis.invalid"),
        "the development issuer (public private key) must never be deployed"
    );
}

#[test]
fn configmap_policy_compiles() {
    let policy = configmap_policy(&k8s());
    let path = Path::new("/etc/portcullis/portcullis.yaml");
    if let Err(e) = portcullis::config::from_str(&policy, path) {
        panic!("the ConfigMap's policy does not compile: {e}");
    }
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

/// The Dockerfile's final stage, parsed as (instruction, arguments) lines.
fn dockerfile_final_stage() -> Vec<(String, String)> {
    let text = std::fs::read_to_string(support::repo_root().join("Dockerfile")).unwrap();
    let mut stage = Vec::new();
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (instr, args) = line.split_once(' ').unwrap_or((line, ""));
        let instr = instr.to_ascii_uppercase();
        if instr == "FROM" {
            stage.clear();
        }
        stage.push((instr, args.trim().to_string()));
    }
    stage
}

#[test]
fn dockerfile_runs_non_root_and_exposes_the_service_ports() {
    let stage = dockerfile_final_stage();
    let from = &stage[0].1;
    assert!(
        from.contains("distroless") || from.contains("scratch"),
        "runtime image should be minimal, got {from}"
    );
    let user = stage
        .iter()
        .rev()
        .find(|(i, _)| i == "USER")
        .map(|(_, a)| a.clone())
        .expect("the runtime stage must set USER");
    let uid = user.split(':').next().unwrap();
    assert!(
        uid != "0" && uid != "root",
        "runtime USER must not be root: {user}"
    );
    let exposed: BTreeSet<u64> = stage
        .iter()
        .filter(|(i, _)| i == "EXPOSE")
        .flat_map(|(_, a)| a.split_whitespace().map(|p| p.parse::<u64>().unwrap()))
        .collect();
    let docs = k8s();
    let container_set: BTreeSet<u64> = container_ports(one(&docs, "Deployment"))
        .into_iter()
        .map(|(_, p)| p)
        .collect();
    assert_eq!(
        exposed, container_set,
        "EXPOSE must equal the container ports"
    );
    assert!(
        stage
            .iter()
            .any(|(i, a)| i == "COPY" && a.starts_with("config/")),
        "the image ships config/"
    );
    // The Deployment runs as the image's user.
    let deployment = one(&docs, "Deployment");
    assert_eq!(
        container(deployment)["securityContext"]["runAsUser"].as_u64(),
        uid.parse::<u64>().ok()
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
    for needed in ["target", ".tools", ".git"] {
        assert!(entries.contains(needed), ".dockerignore must list {needed}");
    }
}
