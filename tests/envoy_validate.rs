//! Every shipped Envoy config (`envoy/*.yaml`) passes `envoy --mode validate` with the pinned
//! Envoy, so a typo or a field removed in a new Envoy release fails the build, not a deploy.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::path::Path;
use std::process::Command;

#[test]
fn every_shipped_envoy_config_passes_envoy_validate() {
    let dir = support::repo_root().join("envoy");
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml" || e == "yml"))
        .collect();
    files.sort();
    assert!(
        !files.is_empty(),
        "no Envoy configs found in {}",
        dir.display()
    );
    // envoy-module.yaml finds the module by name in the search path, and its Portcullis
    // config relative to the working directory (the repository root, as the README runs it).
    for file in files {
        envoy_validate(&file);
    }
}

/// Runs `envoy --mode validate` on `file` from the repository root, with the test build of
/// the module in `ENVOY_DYNAMIC_MODULES_SEARCH_PATH`, and fails on an error or a deprecated
/// field (they validate today and break on the next Envoy upgrade).
fn envoy_validate(file: &Path) {
    let module = support::module::module_library();
    let output = Command::new(support::envoy_binary())
        .args(["--mode", "validate", "--disable-hot-restart", "-c"])
        .arg(file)
        .env(
            "ENVOY_DYNAMIC_MODULES_SEARCH_PATH",
            module.parent().unwrap(),
        )
        .current_dir(support::repo_root())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success() && stdout.contains("OK"),
        "envoy --mode validate failed for {}:\n{stdout}\n{stderr}",
        file.display()
    );
    assert!(
        !stderr.to_ascii_lowercase().contains("deprecated"),
        "{} uses deprecated Envoy fields:\n{stderr}",
        file.display()
    );
}

/// Headers some frameworks honour in place of the request's method, path or host, or to
/// build the URL they hand the application; and Portcullis's own client-address header,
/// which an upstream reading it must not get from the client.
const OVERRIDE_HEADERS: [&str; 27] = [
    "x-http-method-override",
    "x-http-method",
    "x-method-override",
    "x-override-method",
    "x-original-url",
    "x-rewrite-url",
    "x-original-method",
    "x-forwarded-method",
    "x-forwarded-uri",
    "x-original-uri",
    "x-forwarded-path",
    "x-forwarded-scheme",
    "x-forwarded-ssl",
    "x-original-host",
    "x-host",
    "x-forwarded-server",
    "x-forwarded-host",
    "forwarded",
    "x-forwarded-prefix",
    "x-forwarded-port",
    "x-real-ip",
    "true-client-ip",
    "x-client-ip",
    "cf-connecting-ip",
    "fastly-client-ip",
    "x-cluster-client-ip",
    "x-portcullis-source-address",
];

/// The listener settings every shipped wiring (gRPC and HTTP API, and the module) must keep:
/// path hygiene, the authorizer (`first`) first and the router last, no per-route override.
/// Returns the parsed file and the authorizer filter's `typed_config`.
fn hygienic_listener(file: &str, first: &str) -> (serde_yaml::Value, serde_yaml::Value) {
    let text = std::fs::read_to_string(support::repo_root().join(file)).unwrap();
    hygienic_listener_in(file, &text, first)
}

/// Portcullis matches `hosts` with the port ignored, so Envoy must choose virtual hosts the
/// same way (`tests/e2e_envoy.rs` shows the request that otherwise reaches another one).
fn assert_port_blind_virtual_hosts(file: &str, hcm: &serde_yaml::Value) {
    assert_eq!(
        hcm["route_config"]["ignore_port_in_host_matching"].as_bool(),
        Some(true),
        "{file}"
    );
}

/// `hygienic_listener` on the Envoy config `text`, found in `file`.
fn hygienic_listener_in(
    file: &str,
    text: &str,
    first: &str,
) -> (serde_yaml::Value, serde_yaml::Value) {
    let doc: serde_yaml::Value = serde_yaml::from_str(text).unwrap();
    let listener = &doc["static_resources"]["listeners"][0];
    let hcm = &listener["filter_chains"][0]["filters"][0]["typed_config"];
    assert_eq!(hcm["codec_type"].as_str(), Some("AUTO"), "{file}");
    assert_eq!(hcm["normalize_path"].as_bool(), Some(true), "{file}");
    assert_eq!(hcm["merge_slashes"].as_bool(), Some(true), "{file}");
    assert_eq!(
        hcm["path_with_escaped_slashes_action"].as_str(),
        Some("REJECT_REQUEST"),
        "{file}"
    );
    assert_eq!(
        hcm["common_http_protocol_options"]["headers_with_underscores_action"].as_str(),
        Some("REJECT_REQUEST"),
        "{file}"
    );
    assert_eq!(hcm["use_remote_address"].as_bool(), Some(true), "{file}");
    assert_port_blind_virtual_hosts(file, hcm);
    // Method, path and host overrides never reach ext_authz or the upstream (the decision is
    // on the real method, path and host); removed before any filter runs.
    let removed: Vec<&str> =
        hcm["early_header_mutation_extensions"][0]["typed_config"]["mutations"]
            .as_sequence()
            .map(|m| m.iter().filter_map(|m| m["remove"].as_str()).collect())
            .unwrap_or_default();
    for name in OVERRIDE_HEADERS {
        assert!(
            removed.contains(&name),
            "{file}: {name} is not removed early"
        );
    }
    let filters = hcm["http_filters"].as_sequence().unwrap();
    assert_eq!(
        filters[0]["name"].as_str(),
        Some(first),
        "{file}: {first} must be the first HTTP filter"
    );
    assert_eq!(
        filters.last().unwrap()["name"].as_str(),
        Some("envoy.filters.http.router"),
        "{file}"
    );
    // No route may switch ext_authz off: a per-route `typed_per_filter_config` disabling it
    // would make that route unauthenticated.
    assert!(
        !text.contains("typed_per_filter_config"),
        "{file}: the shipped config must not override {first} per route"
    );
    (doc.clone(), filters[0]["typed_config"].clone())
}

/// `hygienic_listener` with ext_authz first, failing closed and sent no body.
fn ext_authz_listener(file: &str) -> (serde_yaml::Value, serde_yaml::Value) {
    let (doc, authz) = hygienic_listener(file, "envoy.filters.http.ext_authz");
    assert_eq!(authz["failure_mode_allow"].as_bool(), Some(false), "{file}");
    assert_eq!(
        authz["status_on_error"]["code"].as_str(),
        Some("Forbidden"),
        "{file}"
    );
    assert!(
        authz.get("with_request_body").is_none(),
        "{file}: request bodies must not be sent to Portcullis"
    );
    (doc, authz)
}

/// The cluster `name` of a parsed Envoy config, checked to speak HTTP/2.
fn h2_cluster<'a>(doc: &'a serde_yaml::Value, name: &str) -> &'a serde_yaml::Value {
    let clusters = doc["static_resources"]["clusters"].as_sequence().unwrap();
    let cluster = clusters
        .iter()
        .find(|c| c["name"].as_str() == Some(name))
        .unwrap();
    assert!(
        !cluster["typed_extension_protocol_options"]
            ["envoy.extensions.upstreams.http.v3.HttpProtocolOptions"]["explicit_http_config"]
            ["http2_protocol_options"]
            .is_null(),
        "the {name} cluster must speak HTTP/2"
    );
    cluster
}

/// The safety knobs the README tells operators never to change are actually in the file.
#[test]
fn shipped_envoy_config_keeps_fail_closed_and_path_hygiene() {
    let (doc, authz) = ext_authz_listener("envoy/envoy.yaml");
    assert_eq!(authz["transport_api_version"].as_str(), Some("V3"));
    assert_eq!(authz["include_peer_certificate"].as_bool(), Some(true));
    assert_eq!(
        authz["grpc_service"]["envoy_grpc"]["cluster_name"].as_str(),
        Some("portcullis")
    );
    h2_cluster(&doc, "portcullis");
}

/// The HTTP API wiring keeps the same knobs, adds the client address Portcullis reads,
/// copies every identity header of the shipped config to the upstream, and points at the
/// shipped config's `http_listen`.
#[test]
fn shipped_http_api_envoy_config_carries_what_portcullis_needs() {
    let (doc, authz) = ext_authz_listener("envoy/envoy-http.yaml");
    let service = &authz["http_service"];
    assert_eq!(
        service["server_uri"]["cluster"].as_str(),
        Some("portcullis_http")
    );
    let added = service["authorization_request"]["headers_to_add"]
        .as_sequence()
        .unwrap();
    assert!(
        added
            .iter()
            .any(|h| h["key"] == "x-portcullis-source-address"
                && h["value"] == "%DOWNSTREAM_DIRECT_REMOTE_ADDRESS_WITHOUT_PORT%"),
        "{added:?}"
    );
    let allowed_from_client: Vec<&str> = authz["allowed_headers"]["patterns"]
        .as_sequence()
        .unwrap()
        .iter()
        .filter_map(|p| p["exact"].as_str())
        .collect();
    assert!(
        !allowed_from_client.contains(&"x-portcullis-source-address"),
        "a client copy of the source address must never be forwarded"
    );
    let upstream: Vec<&str> =
        service["authorization_response"]["allowed_upstream_headers"]["patterns"]
            .as_sequence()
            .unwrap()
            .iter()
            .filter_map(|p| p["exact"].as_str())
            .collect();
    let shipped: serde_yaml::Value = serde_yaml::from_str(
        &std::fs::read_to_string(support::repo_root().join("config/portcullis.yaml")).unwrap(),
    )
    .unwrap();
    let identity = shipped["upstream"]["identity_headers"]
        .as_mapping()
        .unwrap();
    assert!(!identity.is_empty());
    for name in identity.keys() {
        let name = name.as_str().unwrap();
        assert!(upstream.contains(&name), "{name} is not copied upstream");
    }
    let cluster = h2_cluster(&doc, "portcullis_http");
    let port = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]
        ["socket_address"]["port_value"]
        .as_u64()
        .unwrap();
    let listen = shipped["server"]["http_listen"].as_str().unwrap();
    assert!(listen.ends_with(&format!(":{port}")), "{listen} vs {port}");
}

/// The mTLS example keeps the same fail-closed knobs and really uses TLS on both sides:
/// client certificates required downstream, Envoy's own certificate and a pinned SAN towards
/// Portcullis, and the peer certificate forwarded for principals and bound tokens.
#[test]
fn mtls_envoy_example_requires_client_certificates_and_talks_tls_to_portcullis() {
    let text = std::fs::read_to_string(support::repo_root().join("envoy/envoy-mtls.yaml")).unwrap();
    let doc: serde_yaml::Value = serde_yaml::from_str(&text).unwrap();
    let chain = &doc["static_resources"]["listeners"][0]["filter_chains"][0];
    let downstream = &chain["transport_socket"]["typed_config"];
    assert_eq!(
        downstream["require_client_certificate"].as_bool(),
        Some(true)
    );
    assert!(
        !downstream["common_tls_context"]["validation_context"]["trusted_ca"].is_null(),
        "client certificates must be verified against a CA"
    );
    let hcm = &chain["filters"][0]["typed_config"];
    assert_eq!(hcm["normalize_path"].as_bool(), Some(true));
    assert_port_blind_virtual_hosts("envoy/envoy-mtls.yaml", hcm);
    assert_eq!(
        hcm["forward_client_cert_details"].as_str(),
        Some("SANITIZE")
    );
    let filters = hcm["http_filters"].as_sequence().unwrap();
    assert_eq!(
        filters[0]["name"].as_str(),
        Some("envoy.filters.http.ext_authz")
    );
    let authz = &filters[0]["typed_config"];
    assert_eq!(authz["failure_mode_allow"].as_bool(), Some(false));
    assert_eq!(authz["include_peer_certificate"].as_bool(), Some(true));
    assert!(!text.contains("typed_per_filter_config"));
    let clusters = doc["static_resources"]["clusters"].as_sequence().unwrap();
    let portcullis = clusters
        .iter()
        .find(|c| c["name"].as_str() == Some("portcullis"))
        .unwrap();
    let upstream = &portcullis["transport_socket"]["typed_config"];
    assert!(
        upstream["@type"]
            .as_str()
            .is_some_and(|t| t.ends_with("UpstreamTlsContext")),
        "Envoy must talk TLS to Portcullis"
    );
    let ctx = &upstream["common_tls_context"];
    assert!(!ctx["tls_certificates"][0]["certificate_chain"].is_null());
    assert!(!ctx["validation_context"]["match_typed_subject_alt_names"].is_null());

    // Everything not about TLS is as in envoy/envoy.yaml: the same headers go to Portcullis,
    // and the same trusted headers are removed from clients first.
    let (_, plain) = ext_authz_listener("envoy/envoy.yaml");
    assert!(!plain["allowed_headers"].is_null());
    assert_eq!(authz["allowed_headers"], plain["allowed_headers"]);
    assert_eq!(
        authz["grpc_service"]["envoy_grpc"]["skip_envoy_headers"],
        plain["grpc_service"]["envoy_grpc"]["skip_envoy_headers"]
    );
    let plain_doc: serde_yaml::Value = serde_yaml::from_str(
        &std::fs::read_to_string(support::repo_root().join("envoy/envoy.yaml")).unwrap(),
    )
    .unwrap();
    let plain_hcm = &plain_doc["static_resources"]["listeners"][0]["filter_chains"][0]["filters"]
        [0]["typed_config"];
    assert!(!plain_hcm["early_header_mutation_extensions"].is_null());
    assert_eq!(
        hcm["early_header_mutation_extensions"],
        plain_hcm["early_header_mutation_extensions"]
    );
}

/// `envoy/envoy-module.yaml` is the shipped listener of `envoy/envoy.yaml` with Portcullis's
/// module in place of ext_authz and no authorizer cluster: the same path hygiene and early
/// header removals, loading the module by the name cargo gives it and the shipped config.
#[test]
fn the_module_wiring_is_the_shipped_listener_with_portcullis_in_place_of_ext_authz() {
    let (mut module_doc, module) = hygienic_listener("envoy/envoy-module.yaml", "portcullis");
    assert_eq!(module["@type"].as_str(), Some(support::module::FILTER_TYPE));
    let loaded = &module["dynamic_module_config"];
    assert_eq!(loaded["name"].as_str(), Some("portcullis_envoy_module"));
    assert_eq!(loaded["do_not_close"].as_bool(), Some(true));
    assert_eq!(
        module["filter_config"]["value"].as_str(),
        Some("config/portcullis.yaml")
    );
    let (mut plain_doc, _) = ext_authz_listener("envoy/envoy.yaml");
    for doc in [&mut module_doc, &mut plain_doc] {
        support::module::http_filters(doc)[0] = serde_yaml::Value::Null;
    }
    assert_eq!(
        module_doc["static_resources"]["listeners"], plain_doc["static_resources"]["listeners"],
        "envoy-module.yaml's listener differs from envoy.yaml's beyond the authorizer filter"
    );
    let names = |doc: &serde_yaml::Value| -> Vec<String> {
        doc["static_resources"]["clusters"]
            .as_sequence()
            .unwrap()
            .iter()
            .filter_map(|c| c["name"].as_str().map(str::to_string))
            .collect()
    };
    assert_eq!(names(&module_doc), ["sample_upstream"]);
    assert_eq!(names(&plain_doc), ["portcullis", "sample_upstream"]);
}

/// The Envoy config of the Kubernetes gateway (`deploy/kubernetes/module/`, the image of
/// `module/Dockerfile`).
fn gateway_envoy_config() -> String {
    let configmap =
        std::fs::read_to_string(support::repo_root().join(support::module::GATEWAY)).unwrap();
    support::module::gateway_file(&configmap, "envoy.yaml")
}

/// The Kubernetes gateway runs `envoy/envoy-module.yaml`'s listener. Only what a pod needs
/// differs: it binds all of the pod's interfaces, reads Portcullis's config where the
/// Deployment mounts it, and routes to the app's Service; Envoy's admin stays on loopback.
#[test]
fn the_kubernetes_gateway_runs_the_shipped_module_listener() {
    let text = gateway_envoy_config();
    let (mut gateway, filter) = hygienic_listener_in(support::module::GATEWAY, &text, "portcullis");
    assert_eq!(
        filter["filter_config"]["value"].as_str(),
        Some("/etc/portcullis/portcullis.yaml")
    );
    let bound = &gateway["static_resources"]["listeners"][0]["address"]["socket_address"];
    assert_eq!(bound["address"].as_str(), Some("0.0.0.0"));
    assert_eq!(
        gateway["admin"]["address"]["socket_address"]["address"].as_str(),
        Some("127.0.0.1"),
        "Envoy's admin interface must not be reachable from outside the pod"
    );
    let (mut shipped, _) = hygienic_listener("envoy/envoy-module.yaml", "portcullis");
    for doc in [&mut gateway, &mut shipped] {
        let listener = &mut doc["static_resources"]["listeners"][0];
        listener["address"] = serde_yaml::Value::Null;
        listener["filter_chains"][0]["filters"][0]["typed_config"]["route_config"] =
            serde_yaml::Value::Null;
        support::module::http_filters(doc)[0]["typed_config"]["filter_config"]["value"] =
            serde_yaml::Value::Null;
    }
    assert_eq!(
        gateway["static_resources"]["listeners"], shipped["static_resources"]["listeners"],
        "the gateway's listener differs from envoy-module.yaml's beyond address, config path and routes"
    );
}

/// The gateway's Envoy config passes `envoy --mode validate` with the module loaded by name
/// from the search path, as in the image (Portcullis's config pointed at the shipped sample:
/// the ConfigMap's own policy is compiled by `tests/deploy.rs`).
#[test]
fn the_kubernetes_gateway_config_passes_envoy_validate() {
    let dir = tempfile::tempdir().unwrap();
    let mut doc: serde_yaml::Value = serde_yaml::from_str(&gateway_envoy_config()).unwrap();
    support::module::http_filters(&mut doc)[0]["typed_config"]["filter_config"]["value"] =
        support::repo_root()
            .join("config/portcullis.yaml")
            .display()
            .to_string()
            .into();
    let path = dir.path().join("envoy.yaml");
    std::fs::write(&path, serde_yaml::to_string(&doc).unwrap()).unwrap();
    envoy_validate(&path);
}
