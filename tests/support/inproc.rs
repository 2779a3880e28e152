//! In-process harness pieces: the real server started from a config text on 127.0.0.1:0,
//! ext_authz `CheckRequest`s built as Envoy sends them, and the parts of a `CheckResponse`
//! (allow headers, deny status/headers/body) a test asserts on.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;

use envoy_types::ext_authz::v3::pb::{CheckRequest, CheckResponse, HttpResponse};
use envoy_types::pb::envoy::config::core::v3::{Address, SocketAddress, address, socket_address};
use envoy_types::pb::envoy::service::auth::v3::AttributeContext;
use envoy_types::pb::envoy::service::auth::v3::attribute_context::{HttpRequest, Peer, Request};
use envoy_types::pb::envoy::service::auth::v3::authorization_client::AuthorizationClient;
use portcullis::server::Server;
use serde_json::Value;

use super::repo_root;

/// The shipped sample config (`config/portcullis.yaml`) after `edit`.
pub fn shipped_config(edit: impl FnOnce(&mut serde_yaml::Value)) -> String {
    let shipped = std::fs::read_to_string(repo_root().join("config/portcullis.yaml")).unwrap();
    let mut doc: serde_yaml::Value = serde_yaml::from_str(&shipped).unwrap();
    // Files the shipped config names relative to itself stay where they are: the copy is
    // written elsewhere (a temp dir), so point at the originals.
    if doc["revocation"]["file"].is_string() {
        doc["revocation"]["file"] = repo_root()
            .join("config/revocations.yaml")
            .to_string_lossy()
            .into_owned()
            .into();
    }
    // Tests run in parallel: the HTTP ext_authz listener takes any free port unless the test
    // sets one (`server.http_addr` tells which).
    if doc["server"]["http_listen"].is_string() {
        doc["server"]["http_listen"] = "127.0.0.1:0".into();
    }
    edit(&mut doc);
    serde_yaml::to_string(&doc).unwrap()
}

/// The shipped sample policy (config/portcullis.yaml) with its gRPC and admin listeners on
/// the given ports, its issuer replaced by the end-to-end test issuer (keys from the JWKS
/// server at `jwks_url`, short refresh intervals), then `edit`.
pub fn e2e_config(
    grpc: u16,
    admin: u16,
    jwks_url: &str,
    edit: impl FnOnce(&mut serde_yaml::Value),
) -> String {
    use super::jwt::{E2E_AUDIENCE, E2E_ISSUER};
    shipped_config(|doc| {
        doc["server"]["listen"] = format!("127.0.0.1:{grpc}").into();
        doc["server"]["admin_listen"] = format!("127.0.0.1:{admin}").into();
        doc["server"]["shutdown_grace"] = "1s".into();
        doc["issuers"] = serde_yaml::from_str(&format!(
            "- name: e2e
  issuer: {E2E_ISSUER}
  audiences: [{E2E_AUDIENCE}]
  algorithms: [RS256]
  keys: {{url: '{jwks_url}', min_refresh: 1s, max_refresh: 2s, max_stale: 5s, unknown_kid_interval: 1s}}
  leeway: 5s"
        ))
        .unwrap();
        edit(doc);
    })
}

/// Writes `text` to `dir/name`, loads it as a config and starts the server on it.
pub async fn start_server(dir: &Path, name: &str, text: &str) -> Server {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    Server::start(portcullis::config::load(&path).unwrap())
        .await
        .unwrap()
}

/// The shipped config on free loopback ports, its issuer's keys read from the repository,
/// audit off, then `edit`; started. The directory holds the config while the server runs.
pub async fn start_shipped(
    edit: impl FnOnce(&mut serde_yaml::Value),
) -> (Server, tempfile::TempDir) {
    let text = shipped_config(|doc| {
        doc["server"]["listen"] = "127.0.0.1:0".into();
        doc["server"]["admin_listen"] = "127.0.0.1:0".into();
        doc["audit"]["enabled"] = false.into();
        doc["issuers"][0]["keys"]["file"] = super::jwt::dev_jwks_path()
            .to_string_lossy()
            .into_owned()
            .into();
        edit(doc);
    });
    let dir = tempfile::tempdir().unwrap();
    let server = start_server(dir.path(), "portcullis.yaml", &text).await;
    (server, dir)
}

/// A connected gRPC channel to `addr`.
pub async fn channel(addr: SocketAddr) -> tonic::transport::Channel {
    tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap()
}

/// `{"authorization": "Bearer TOKEN"}`.
pub fn bearer_headers(token: &str) -> HashMap<String, String> {
    HashMap::from([("authorization".to_string(), format!("Bearer {token}"))])
}

/// A `CheckRequest` as Envoy builds it; `source` is the peer's address and optional port
/// (`None`: no source peer at all).
pub fn check_request(
    method: &str,
    path: &str,
    host: &str,
    source: Option<(&str, Option<u32>)>,
    headers: HashMap<String, String>,
    body: &str,
) -> CheckRequest {
    CheckRequest {
        attributes: Some(AttributeContext {
            source: source.map(|(ip, port)| Peer {
                address: Some(Address {
                    address: Some(address::Address::SocketAddress(SocketAddress {
                        address: ip.into(),
                        port_specifier: port.map(socket_address::PortSpecifier::PortValue),
                        ..Default::default()
                    })),
                }),
                ..Default::default()
            }),
            request: Some(Request {
                http: Some(HttpRequest {
                    method: method.into(),
                    path: path.into(),
                    host: host.into(),
                    headers,
                    body: body.to_string(),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        }),
    }
}

/// The identity headers of the shipped config (`upstream.identity_headers`).
pub const IDENTITY_HEADERS: [&str; 3] = [
    "x-portcullis-subject",
    "x-portcullis-issuer",
    "x-portcullis-scopes",
];

/// Sends `method path` for host `api.example.com` from `source` (port 5555) with `headers`
/// and `x-request-id: req-1` as one Check to the server at `addr`.
pub async fn check_from(
    addr: SocketAddr,
    method: &str,
    path: &str,
    source: &str,
    headers: &[(&str, &str)],
) -> CheckResponse {
    let mut map: HashMap<String, String> = headers
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    map.insert("x-request-id".into(), "req-1".into());
    let req = check_request(
        method,
        path,
        "api.example.com",
        Some((source, Some(5555))),
        map,
        "",
    );
    send_check(addr, req).await
}

/// Sends one Check to the server at `addr` on a fresh connection.
pub async fn send_check(addr: SocketAddr, req: CheckRequest) -> CheckResponse {
    let mut client = AuthorizationClient::connect(format!("http://{addr}"))
        .await
        .unwrap();
    client.check(req).await.unwrap().into_inner()
}

fn header_map(
    headers: &[envoy_types::pb::envoy::config::core::v3::HeaderValueOption],
) -> HashMap<String, String> {
    headers
        .iter()
        .map(|h| {
            let h = h.header.as_ref().unwrap();
            (h.key.clone(), h.value.clone())
        })
        .collect()
}

/// The headers an allow sets and the ones it removes; `None` for anything but an allow.
pub fn allowed(resp: &CheckResponse) -> Option<(HashMap<String, String>, Vec<String>)> {
    match resp.http_response.as_ref() {
        Some(HttpResponse::OkResponse(ok)) => {
            Some((header_map(&ok.headers), ok.headers_to_remove.clone()))
        }
        _ => None,
    }
}

/// The headers an allow adds to the client's response, with whether each is appended to
/// the upstream's copy; panics on anything but an allow.
pub fn client_headers_on_allow(resp: &CheckResponse) -> Vec<(String, String, bool)> {
    use envoy_types::pb::envoy::config::core::v3::header_value_option::HeaderAppendAction;
    match resp.http_response.as_ref() {
        Some(HttpResponse::OkResponse(ok)) => ok
            .response_headers_to_add
            .iter()
            .map(|h| {
                let header = h.header.as_ref().unwrap();
                let append = h.append_action == HeaderAppendAction::AppendIfExistsOrAdd as i32;
                (header.key.clone(), header.value.clone(), append)
            })
            .collect(),
        other => panic!("expected an allow, got {other:?}"),
    }
}

/// (status, headers, JSON body) of a deny; panics on anything else.
pub fn denied(resp: &CheckResponse) -> (u16, HashMap<String, String>, Value) {
    match resp.http_response.as_ref() {
        Some(HttpResponse::DeniedResponse(d)) => {
            let code = d.status.as_ref().unwrap().code as u16;
            (
                code,
                header_map(&d.headers),
                serde_json::from_str(&d.body).unwrap(),
            )
        }
        other => panic!("expected a denied response, got {other:?}"),
    }
}

/// The text of `GET /metrics` on the admin listener at `addr`.
pub async fn scrape_metrics(addr: SocketAddr) -> String {
    reqwest::get(format!("http://{addr}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}
