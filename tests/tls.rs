//! The gRPC listener with TLS and client-certificate verification, in-process on
//! 127.0.0.1:0: who may connect, that real gRPC calls work over it (health and ext_authz with
//! a forwarded peer certificate), and that replaced certificate files are picked up by new
//! connections while a broken file keeps the old certificate.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use envoy_types::ext_authz::v3::pb::{CheckRequest, CheckResponse, HttpResponse};
use envoy_types::pb::envoy::service::auth::v3::AttributeContext;
use envoy_types::pb::envoy::service::auth::v3::attribute_context::{HttpRequest, Peer, Request};
use portcullis::server::Server;
use prost::Message;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/mtls")
        .join(name)
}

fn read(name: &str) -> Vec<u8> {
    std::fs::read(fixture(name)).unwrap()
}

/// A config in `dir` serving TLS with copies of the fixture files (so tests can replace them).
fn write_config(dir: &Path, tls_extra: &str) -> PathBuf {
    write_config_with(dir, tls_extra, "")
}

/// `write_config` with `server_extra` (indented lines) added to the `server` section.
fn write_config_with(dir: &Path, tls_extra: &str, server_extra: &str) -> PathBuf {
    for f in ["server.crt", "server.key", "ca.crt"] {
        std::fs::copy(fixture(f), dir.join(f)).unwrap();
    }
    let jwks = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("config/dev/jwks.json");
    let text = format!(
        "server:
  listen: 127.0.0.1:0
  admin_listen: 127.0.0.1:0
  tls: {{cert: server.crt, key: server.key, client_ca: ca.crt{tls_extra}}}
{server_extra}audit: {{enabled: false}}
issuers:
  - name: dev
    issuer: https://dev.portcullis.invalid
    audiences: [portcullis-sample-api]
    keys: {{file: '{}'}}
routes:
  - id: stock
    methods: [GET]
    path: /internal/stock
    rules:
      - id: checkout-service
        principals: [spiffe://example.org/ns/shop/sa/checkout]
",
        jwks.display()
    );
    let path = dir.join("portcullis.yaml");
    std::fs::write(&path, text).unwrap();
    path
}

async fn start(dir: &Path, tls_extra: &str) -> Server {
    let config = portcullis::config::load(&write_config(dir, tls_extra)).unwrap();
    Server::start(config).await.unwrap()
}

/// A gRPC-over-HTTP/2 client (reqwest) trusting the test CA, with `identity` as its client
/// certificate when given.
fn grpc_client(identity: Option<&str>) -> reqwest::Client {
    let mut b = reqwest::Client::builder()
        .http2_prior_knowledge()
        .no_proxy()
        .timeout(Duration::from_secs(5))
        .tls_certs_only([reqwest::Certificate::from_pem(&read("ca.crt")).unwrap()]);
    if let Some(name) = identity {
        let mut pem = read(&format!("{name}.crt"));
        pem.extend(read(&format!("{name}.key")));
        b = b.identity(reqwest::Identity::from_pem(&pem).unwrap());
    }
    b.build().unwrap()
}

/// One unary gRPC call; the response message bytes.
async fn grpc_call(
    client: &reqwest::Client,
    server: &Server,
    method: &str,
    message: Vec<u8>,
) -> Result<Vec<u8>, String> {
    grpc_call_at(client, server.grpc_addr.port(), method, message).await
}

/// `grpc_call` to the listener on `port`; a reply that is not a message names its
/// `grpc-status`.
async fn grpc_call_at(
    client: &reqwest::Client,
    port: u16,
    method: &str,
    message: Vec<u8>,
) -> Result<Vec<u8>, String> {
    let mut body = vec![0u8];
    body.extend((message.len() as u32).to_be_bytes());
    body.extend(message);
    let url = format!("https://localhost:{port}{method}");
    let response = client
        .post(url)
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(body)
        .send()
        .await
        .map_err(|e| format!("{e:?}"))?;
    if response.status() != 200 {
        return Err(format!("HTTP {}", response.status()));
    }
    // A trailers-only answer (an error) carries its status in the headers.
    if let Some(status) = response.headers().get("grpc-status")
        && status != "0"
    {
        return Err(format!("grpc-status {}", status.to_str().unwrap_or("?")));
    }
    let bytes = response.bytes().await.map_err(|e| format!("{e:?}"))?;
    if bytes.len() < 5 {
        return Err(format!("short gRPC response ({} bytes)", bytes.len()));
    }
    Ok(bytes[5..].to_vec())
}

/// gRPC health `Check("")`; true when SERVING.
async fn health(client: &reqwest::Client, server: &Server) -> Result<bool, String> {
    let reply = grpc_call(client, server, "/grpc.health.v1.Health/Check", Vec::new()).await?;
    let status = tonic_health::pb::HealthCheckResponse::decode(&reply[..]).unwrap();
    Ok(status.status == 1)
}

/// ext_authz Check for `GET /internal/stock` with `certificate` forwarded as Envoy does.
async fn check_stock(
    client: &reqwest::Client,
    server: &Server,
    certificate: Option<&str>,
) -> CheckResponse {
    let cert = certificate
        .map(|name| {
            let pem = String::from_utf8(read(&format!("{name}.crt"))).unwrap();
            percent_encoding::utf8_percent_encode(&pem, percent_encoding::NON_ALPHANUMERIC)
                .to_string()
        })
        .unwrap_or_default();
    let req = CheckRequest {
        attributes: Some(AttributeContext {
            source: Some(Peer {
                certificate: cert,
                ..Default::default()
            }),
            request: Some(Request {
                http: Some(HttpRequest {
                    method: "GET".into(),
                    path: "/internal/stock".into(),
                    host: "api.example.com".into(),
                    scheme: "https".into(),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        }),
    };
    let reply = grpc_call(
        client,
        server,
        "/envoy.service.auth.v3.Authorization/Check",
        req.encode_to_vec(),
    )
    .await
    .unwrap();
    CheckResponse::decode(&reply[..]).unwrap()
}

fn http_status(r: &CheckResponse) -> u16 {
    match &r.http_response {
        Some(HttpResponse::DeniedResponse(d)) => d.status.as_ref().unwrap().code as u16,
        Some(HttpResponse::OkResponse(_)) => 200,
        other => panic!("unexpected response {other:?}"),
    }
}

#[tokio::test]
async fn a_client_with_a_certificate_from_the_client_ca_gets_answers() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path(), "").await;
    let client = grpc_client(Some("envoy"));
    let deadline = Instant::now() + Duration::from_secs(10);
    // Readiness (keys loaded) is reported by the health service itself: poll it.
    while !health(&client, &server).await.unwrap() {
        assert!(Instant::now() < deadline, "never SERVING");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    server.shutdown().await;
}

#[tokio::test]
async fn clients_without_a_certificate_or_from_another_ca_are_refused_at_the_handshake() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path(), "").await;
    let refused = health(&grpc_client(None), &server).await;
    assert!(refused.is_err(), "no client certificate: {refused:?}");
    let refused = health(&grpc_client(Some("stranger")), &server).await;
    assert!(refused.is_err(), "other CA: {refused:?}");
    // Plain HTTP/2 to a TLS port is refused too.
    let plain = reqwest::Client::builder()
        .http2_prior_knowledge()
        .no_proxy()
        .timeout(Duration::from_secs(5))
        .build()
        .unwrap();
    let url = format!(
        "http://127.0.0.1:{}/grpc.health.v1.Health/Check",
        server.grpc_addr.port()
    );
    assert!(plain.post(url).body(vec![0u8; 5]).send().await.is_err());
    // And the right client still works afterwards.
    assert!(health(&grpc_client(Some("envoy")), &server).await.is_ok());
    server.shutdown().await;
}

#[tokio::test]
async fn allowed_client_principals_admit_only_envoy() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(
        dir.path(),
        ", allowed_client_principals: [spiffe://example.org/ns/edge/sa/envoy]",
    )
    .await;
    assert!(health(&grpc_client(Some("envoy")), &server).await.is_ok());
    // Same CA, wrong workload.
    let refused = health(&grpc_client(Some("checkout")), &server).await;
    assert!(refused.is_err(), "{refused:?}");
    server.shutdown().await;
}

#[tokio::test]
async fn a_forwarded_spiffe_certificate_is_granted_by_principal_and_others_are_not() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path(), "").await;
    let client = grpc_client(Some("envoy"));
    let granted = check_stock(&client, &server, Some("checkout")).await;
    assert_eq!(http_status(&granted), 200, "{granted:?}");
    let other = check_stock(&client, &server, Some("intruder")).await;
    assert_eq!(http_status(&other), 403, "{other:?}");
    let none = check_stock(&client, &server, None).await;
    assert_eq!(http_status(&none), 403, "{none:?}");
    server.shutdown().await;
}

/// The server certificate a fresh TLS connection is served (as Envoy would see it).
async fn served_certificate(server: &Server) -> Result<Vec<u8>, String> {
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_slice(&read("ca.crt")).unwrap())
        .unwrap();
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_client_auth_cert(
            vec![CertificateDer::from_pem_slice(&read("envoy.crt")).unwrap()],
            PrivateKeyDer::from_pem_slice(&read("envoy.key")).unwrap(),
        )
        .unwrap();
    config.alpn_protocols = vec![b"h2".to_vec()];
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = tokio::net::TcpStream::connect(server.grpc_addr)
        .await
        .map_err(|e| e.to_string())?;
    let tls = connector
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .map_err(|e| e.to_string())?;
    Ok(tls.get_ref().1.peer_certificates().unwrap()[0].to_vec())
}

fn der(name: &str) -> Vec<u8> {
    CertificateDer::from_pem_slice(&read(name))
        .unwrap()
        .to_vec()
}

/// Replaces a file atomically (write + rename), as certificate managers do.
fn replace(path: &Path, bytes: &[u8]) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, bytes).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replaced_certificate_files_are_served_to_new_connections_and_broken_ones_ignored() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path(), "").await;
    assert_eq!(
        served_certificate(&server).await.unwrap(),
        der("server.crt")
    );

    // A broken certificate file is refused: the old certificate stays in service. The
    // reloader reads the files every second; wait past two of its rounds, checking each time.
    replace(&dir.path().join("server.crt"), b"not a certificate");
    let until = Instant::now() + Duration::from_millis(2500);
    while Instant::now() < until {
        assert_eq!(
            served_certificate(&server).await.unwrap(),
            der("server.crt"),
            "a broken file must never replace the working certificate"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // The new pair (key first, then certificate, as a rotation would write them).
    replace(&dir.path().join("server.key"), &read("server2.key"));
    replace(&dir.path().join("server.crt"), &read("server2.crt"));
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match served_certificate(&server).await {
            Ok(cert) if cert == der("server2.crt") => break,
            other => {
                assert!(
                    Instant::now() < deadline,
                    "the new certificate was not served within 10s (last: {:?})",
                    other.map(|c| c.len())
                );
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // gRPC calls work on the new certificate.
    assert!(health(&grpc_client(Some("envoy")), &server).await.is_ok());
    server.shutdown().await;
}

/// `portcullis approvals list` against `server` with `args`; (success, stdout + stderr).
async fn approvals_cli(server: &Server, args: &[String]) -> (bool, String) {
    approvals_cli_at(server.grpc_addr.port(), args).await
}

/// `portcullis approvals list` against the listener on `port`.
async fn approvals_cli_at(port: u16, args: &[String]) -> (bool, String) {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let bin = env!("CARGO_BIN_EXE_portcullis");
    let token = std::process::Command::new(bin)
        .current_dir(&root)
        .args(["token", "--sub", "bob", "--role", "dba-lead"])
        .output()
        .unwrap();
    assert!(token.status.success(), "{token:?}");
    let token = String::from_utf8(token.stdout).unwrap().trim().to_string();
    let mut command = std::process::Command::new(bin);
    command
        .current_dir(&root)
        .args(["approvals", "list", "--server"])
        .arg(format!("127.0.0.1:{port}"))
        .args(args)
        .env("PORTCULLIS_TOKEN", &token);
    let out = tokio::task::spawn_blocking(move || command.output().unwrap())
        .await
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!text.contains(&token), "the token was printed: {text}");
    (out.status.success(), text)
}

/// The approvals CLI reaches a listener with `server.tls`: it trusts `--ca-cert` and shows
/// `--cert`/`--key` when the listener verifies clients; without them it is refused, and says
/// why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_approvals_cli_speaks_tls_with_a_client_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path(), "").await;
    let file = |name: &str| fixture(name).display().to_string();
    let ca = ["--ca-cert".to_string(), file("ca.crt")];
    let identity = [
        "--cert".to_string(),
        file("envoy.crt"),
        "--key".to_string(),
        file("envoy.key"),
    ];

    let (ok, text) = approvals_cli(&server, &[ca.to_vec(), identity.to_vec()].concat()).await;
    assert!(ok, "{text}");
    assert!(text.contains("no approval requests"), "{text}");

    // Plain HTTP/2 to the TLS listener.
    let (ok, text) = approvals_cli(&server, &[]).await;
    assert!(!ok && text.contains("cannot reach portcullis"), "{text}");
    assert!(text.contains("needs --ca-cert"), "{text}");
    // TLS, but no client certificate: the listener refuses the handshake.
    let (ok, text) = approvals_cli(&server, &ca).await;
    assert!(!ok && text.contains("cannot reach portcullis"), "{text}");
    assert!(text.contains("needs --cert and --key"), "{text}");
    // A certificate the CA did not sign is not trusted.
    let other = ["--ca-cert".to_string(), file("other-ca.crt")];
    let (ok, text) = approvals_cli(&server, &[other.to_vec(), identity.to_vec()].concat()).await;
    assert!(!ok && text.contains("cannot reach portcullis"), "{text}");
    assert!(text.contains("UnknownIssuer"), "{text}");
    // The name checked is the one asked for.
    let wrong_name = [
        "--tls-server-name".to_string(),
        "elsewhere.example".to_string(),
    ];
    let args = [ca.to_vec(), identity.to_vec(), wrong_name.to_vec()].concat();
    let (ok, text) = approvals_cli(&server, &args).await;
    assert!(!ok && text.contains("cannot reach portcullis"), "{text}");
    assert!(
        text.contains("not valid for name \"elsewhere.example\""),
        "{text}"
    );
    // A key file that is missing is named, its contents never shown.
    let missing = [
        "--cert".to_string(),
        file("envoy.crt"),
        "--key".to_string(),
        "/nonexistent/approver.key".to_string(),
    ];
    let (ok, text) = approvals_cli(&server, &[ca.to_vec(), missing.to_vec()].concat()).await;
    assert!(
        !ok && text.contains("--key `/nonexistent/approver.key`"),
        "{text}"
    );
    // A private key given where a certificate belongs is refused without echoing it.
    let key = String::from_utf8(read("envoy.key")).unwrap();
    let swapped = ["--ca-cert".to_string(), file("envoy.key")];
    let (ok, text) = approvals_cli(&server, &[swapped.to_vec(), identity.to_vec()].concat()).await;
    assert!(!ok, "{text}");
    assert!(
        !text.contains(key.lines().nth(1).unwrap()),
        "key material printed: {text}"
    );
    server.shutdown().await;
}

/// With `approvals_listen`, the approvals API has a listener of its own with its own
/// client-certificate allow-list: an approver's certificate reaches the approvals API and
/// not ext_authz, Envoy's reaches ext_authz and not the approvals API, and neither
/// listener answers the other's calls.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_approvals_api_can_have_a_listener_and_an_allow_list_of_its_own() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_config_with(
        dir.path(),
        ", allowed_client_principals: ['spiffe://example.org/ns/edge/sa/envoy']",
        "  approvals_listen: 127.0.0.1:0
  approvals_tls: {cert: server.crt, key: server.key, client_ca: ca.crt, allowed_client_principals: ['spiffe://example.org/ns/shop/sa/checkout']}
",
    );
    let server = Server::start(portcullis::config::load(&path).unwrap())
        .await
        .unwrap();
    let approvals_port = server.approvals_addr.expect("approvals listener").port();
    assert_ne!(approvals_port, server.grpc_addr.port());
    let file = |name: &str| fixture(name).display().to_string();
    let as_client = |name: &str| {
        vec![
            "--ca-cert".to_string(),
            file("ca.crt"),
            "--cert".to_string(),
            file(&format!("{name}.crt")),
            "--key".to_string(),
            file(&format!("{name}.key")),
        ]
    };

    // The approver (here the `checkout` certificate) on the approvals listener: answered.
    let (ok, text) = approvals_cli_at(approvals_port, &as_client("checkout")).await;
    assert!(ok, "{text}");
    assert!(text.contains("no approval requests"), "{text}");
    // Envoy's certificate is not on the approvals listener's allow-list; the CLI says
    // what the listener may have refused.
    let (ok, text) = approvals_cli_at(approvals_port, &as_client("envoy")).await;
    assert!(!ok && text.contains("cannot reach portcullis"), "{text}");
    assert!(
        text.contains("the listener refused this client certificate")
            && text.contains("`allowed_client_principals`"),
        "{text}"
    );
    // The approver's certificate is not on the Check listener's.
    let (ok, text) = approvals_cli(&server, &as_client("checkout")).await;
    assert!(!ok && text.contains("cannot reach portcullis"), "{text}");
    assert!(
        text.contains("the listener refused this client certificate"),
        "{text}"
    );
    // Envoy reaches the Check listener, which no longer serves the approvals API.
    let (ok, text) = approvals_cli(&server, &as_client("envoy")).await;
    assert!(!ok && text.contains("Unimplemented"), "{text}");
    assert!(text.contains("server.approvals_listen"), "{text}");
    // Said plainly: no parentheses around an empty server message.
    assert!(
        text.contains("Unimplemented: this listener does not serve"),
        "{text}"
    );

    // Envoy gets decisions and health on its listener.
    let envoy = grpc_client(Some("envoy"));
    assert_eq!(
        http_status(&check_stock(&envoy, &server, Some("checkout")).await),
        200
    );
    assert!(health(&envoy, &server).await.unwrap());
    // The approvals listener answers health, and no Check.
    let approver = grpc_client(Some("checkout"));
    let reply = grpc_call_at(
        &approver,
        approvals_port,
        "/grpc.health.v1.Health/Check",
        Vec::new(),
    )
    .await
    .unwrap();
    let status = tonic_health::pb::HealthCheckResponse::decode(&reply[..]).unwrap();
    assert_eq!(status.status, 1);
    let check = grpc_call_at(
        &approver,
        approvals_port,
        "/envoy.service.auth.v3.Authorization/Check",
        CheckRequest::default().encode_to_vec(),
    )
    .await;
    // 12 = UNIMPLEMENTED.
    assert_eq!(check, Err("grpc-status 12".to_string()));
    server.shutdown().await;
}

/// A connection still in its TLS handshake holds its place under `server.max_connections`:
/// a flood of connections that never finish the handshake is capped like any other.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_in_their_handshake_count_against_the_cap() {
    use tokio::io::AsyncReadExt;
    let dir = tempfile::tempdir().unwrap();
    let path = write_config_with(dir.path(), "", "  max_connections: 1\n");
    let server = Server::start(portcullis::config::load(&path).unwrap())
        .await
        .unwrap();
    // Connected, no ClientHello: the only place is taken.
    let _silent = tokio::net::TcpStream::connect(server.grpc_addr)
        .await
        .unwrap();
    let mut refused = false;
    for _ in 0..50 {
        let mut next = tokio::net::TcpStream::connect(server.grpc_addr)
            .await
            .unwrap();
        let mut buf = [0u8; 16];
        // Closed on arrival: EOF (or a reset) at once, before any handshake.
        if let Ok(Ok(0) | Err(_)) =
            tokio::time::timeout(Duration::from_millis(500), next.read(&mut buf)).await
        {
            refused = true;
            break;
        }
    }
    assert!(
        refused,
        "a second connection was kept while the first held the only place"
    );
    let client = grpc_client(Some("envoy"));
    assert!(
        health(&client, &server).await.is_err(),
        "a TLS client was served past the cap"
    );
    let metrics = reqwest::get(format!("http://{}/metrics", server.admin_addr))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("portcullis_connections_refused_total{listener=\"grpc\"} "),
        "{metrics}"
    );
    assert!(
        metrics.contains("portcullis_connections_open{listener=\"grpc\"} 1\n"),
        "{metrics}"
    );
    server.shutdown().await;
}
