//! Shared state over TLS (`rediss://`) on a real `redis-server` with TLS on: a private CA
//! (`state.tls.ca_file`), mutual TLS (`cert_file`/`key_file`), and a server the client must
//! not trust. A TLS failure is a Redis outage: decisions needing state are 503
//! `state_unavailable`, never an allow, and the error names neither the URL nor its password.
//!
//! Certificates: the checked-in test PKI of tests/fixtures/mtls (`server.crt` is for
//! 127.0.0.1 and signed by `ca.crt`; `envoy.crt` is a client certificate from the same CA;
//! `other-ca.crt` and `stranger.crt` come from an unrelated CA).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::path::{Path, PathBuf};
use std::time::Duration;

use portcullis::config::schema::StateConfig;
use portcullis::state::{StateError, StateStore};
use support::inproc::{allowed, bearer_headers, check_from, denied, start_shipped};
use support::jwt::mint_dev;
use support::redis::{RedisServer, RedisTls};

fn pki(name: &str) -> PathBuf {
    support::repo_root().join("tests/fixtures/mtls").join(name)
}

/// A Redis with TLS on, its certificate from the test CA; clients need a certificate from
/// that CA when `require_client_cert`.
fn tls_redis(require_client_cert: bool) -> RedisServer {
    RedisServer::start_tls(RedisTls {
        cert: &pki("server.crt"),
        key: &pki("server.key"),
        client_ca: &pki("ca.crt"),
        require_client_cert,
    })
}

/// `state:` for `url` with `tls` (a YAML flow mapping, or empty for none).
fn state_yaml(url: &str, tls: &str) -> String {
    let tls = if tls.is_empty() {
        String::new()
    } else {
        format!(", tls: {tls}")
    };
    format!("{{backend: redis, redis_url: '{url}', key_prefix: 'tls:', timeout: 1s{tls}}}")
}

/// The store `serve` builds for this `state:` (the TLS files read by `load_tls`).
fn store(url: &str, tls: &str) -> std::sync::Arc<dyn StateStore> {
    let state: StateConfig = serde_yaml::from_str(&state_yaml(url, tls)).unwrap();
    let files = portcullis::state::redis::load_tls(Path::new("/nowhere/p.yaml"), &state).unwrap();
    portcullis::state::from_config(&state, files.as_ref()).unwrap()
}

fn ca(file: &str) -> String {
    format!("{{ca_file: '{}'}}", pki(file).display())
}

fn mutual(cert: &str, key: &str) -> String {
    format!(
        "{{ca_file: '{}', cert_file: '{}', key_file: '{}'}}",
        pki("ca.crt").display(),
        pki(cert).display(),
        pki(key).display()
    )
}

/// The keys under `tls:` in `redis`, read over its plaintext port.
fn keys(redis: &RedisServer) -> Vec<String> {
    let client = redis::Client::open(redis.url()).unwrap();
    let mut conn = client.get_connection().unwrap();
    let mut keys: Vec<String> = redis::cmd("KEYS").arg("tls:*").query(&mut conn).unwrap();
    keys.sort();
    keys
}

/// The message of a failed operation (every store operation fails the same way).
async fn failure(s: &std::sync::Arc<dyn StateStore>) -> String {
    match s.set("k", "v", Duration::from_secs(10)).await {
        Err(StateError::Unavailable(m)) => m,
        other => panic!("expected the store to be unavailable, got {other:?}"),
    }
}

/// The shipped config with shared state in `state` (a YAML flow mapping), the runtime
/// revocations polled every 200ms (a replica that finds the revocation set new in Redis
/// waits two polls before it serves credentials).
async fn serve(state: &str) -> (portcullis::server::Server, tempfile::TempDir) {
    start_shipped(|doc| {
        doc["state"] = serde_yaml::from_str(state).unwrap();
        doc["revocation"]["reload"] = "200ms".into();
    })
    .await
}

/// `method path` with a token holding the order scopes, asked of `server`.
async fn ask(
    server: &portcullis::server::Server,
    method: &str,
    path: &str,
) -> envoy_types::ext_authz::v3::pb::CheckResponse {
    let token = mint_dev(serde_json::json!({"scope": "orders:write orders:read"}));
    let headers = bearer_headers(&token);
    let headers: Vec<(&str, &str)> = headers
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    check_from(server.grpc_addr, method, path, "10.0.0.7", &headers).await
}

/// The shipped config with shared state in the TLS Redis: a token for `POST /orders` (the
/// rate-limited route) is allowed once the runtime revocations are read from that Redis,
/// and its bucket is written there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rate_limited_decision_works_over_rediss_with_a_private_ca() {
    let redis = tls_redis(false);
    let (server, _dir) = serve(&state_yaml(&redis.rediss_url(), &ca("ca.crt"))).await;
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let resp = ask(&server, "POST", "/orders").await;
        if allowed(&resp).is_some() {
            break;
        }
        let (status, _, body) = denied(&resp);
        assert_eq!(status, 503, "{body}");
        assert!(
            std::time::Instant::now() < deadline,
            "never allowed over rediss: {body}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let written = keys(&redis);
    assert!(
        written.iter().any(|k| k.starts_with("tls:rate")),
        "no rate-limit bucket in the TLS Redis: {written:?}"
    );
    server.shutdown().await;
}

/// The Redis server's certificate is from a CA other than `ca_file`: every decision that
/// needs state is a 503 `state_unavailable` (never an allow), nothing is written, and the
/// store's error says what failed without the URL or its password.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_certificate_from_another_ca_is_refused_as_an_outage() {
    let redis = tls_redis(false);
    let (server, _dir) = serve(&state_yaml(&redis.rediss_url(), &ca("other-ca.crt"))).await;
    // Past the wait the test above is allowed within (two 200ms polls and a second).
    let until = std::time::Instant::now() + Duration::from_secs(3);
    while std::time::Instant::now() < until {
        for (method, path) in [("POST", "/orders"), ("GET", "/orders/1")] {
            let resp = ask(&server, method, path).await;
            assert!(allowed(&resp).is_none(), "{method} {path} was allowed");
            let (status, _, body) = denied(&resp);
            assert_eq!(status, 503, "{method} {path}: {body}");
            assert_eq!(
                body["error"], "state_unavailable",
                "{method} {path}: {body}"
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let ready = reqwest::get(format!("http://{}/readyz", server.admin_addr))
        .await
        .unwrap();
    assert_eq!(ready.status(), 503, "ready without its shared state");
    assert_eq!(keys(&redis), Vec::<String>::new());
    server.shutdown().await;

    let url = format!("rediss://:s3cretPW@127.0.0.1:{}/0", redis.tls_port);
    let message = failure(&store(&url, &ca("other-ca.crt"))).await;
    assert!(
        message.contains("not signed by a trusted CA"),
        "the failure is not named: {message}"
    );
    assert!(
        !message.contains("s3cretPW") && !message.contains("127.0.0.1"),
        "{message}"
    );
}

/// Without `ca_file` the server is verified against the system's roots, which do not hold
/// the test CA: refused, not accepted for lack of a CA.
#[tokio::test]
async fn without_a_ca_file_the_system_roots_decide_and_refuse_a_private_ca() {
    let redis = tls_redis(false);
    let message = failure(&store(&redis.rediss_url(), "")).await;
    assert!(message.contains("not signed by a trusted CA"), "{message}");
    // The same server with its CA given: the store works.
    let s = store(&redis.rediss_url(), &ca("ca.crt"));
    s.set("k", "v", Duration::from_secs(10)).await.unwrap();
    assert_eq!(s.get("k").await.unwrap().as_deref(), Some("v"));
}

/// A Redis that requires client certificates (`--tls-auth-clients yes`): the store works with
/// a certificate from the CA it trusts, and fails closed without one or with one from
/// another CA.
#[tokio::test]
async fn mutual_tls_works_with_a_client_certificate_and_fails_without() {
    let redis = tls_redis(true);
    let url = redis.rediss_url();

    let s = store(&url, &mutual("envoy.crt", "envoy.key"));
    s.set("k", "v", Duration::from_secs(10)).await.unwrap();
    assert_eq!(s.get("k").await.unwrap().as_deref(), Some("v"));
    assert_eq!(keys(&redis), vec!["tls:k".to_string()]);

    let message = failure(&store(&url, &ca("ca.crt"))).await;
    assert!(
        message.contains("requires a client certificate"),
        "{message}"
    );
    let message = failure(&store(&url, &mutual("stranger.crt", "stranger.key"))).await;
    assert!(
        message.contains("refused the client certificate"),
        "{message}"
    );
    // Nothing was written by either.
    assert_eq!(keys(&redis), vec!["tls:k".to_string()]);
}
