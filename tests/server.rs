//! In-process integration tests: the real gRPC server on 127.0.0.1:0, a real loopback JWKS
//! HTTP server, a tonic client speaking ext_authz and gRPC health, and the admin listener.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use envoy_types::ext_authz::v3::pb::{CheckRequest, CheckResponse, HttpResponse};
use envoy_types::pb::envoy::service::auth::v3::authorization_client::AuthorizationClient;
use portcullis::server::Server;
use serde_json::{Value, json};
use support::inproc::{
    bearer_headers, channel, check_request, denied, scrape_metrics, shipped_config, start_server,
};
use support::jwks::JwksServer;
use support::jwt::{DEV_ISSUER, dev_jwks, mint_dev as mint, now};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

/// The shipped sample config with the dev issuer's keys served over loopback HTTP.
fn config_text(jwks_url: &str) -> String {
    config_text_with(jwks_url, |_| {})
}

fn config_text_with(jwks_url: &str, edit: impl FnOnce(&mut serde_yaml::Value)) -> String {
    shipped_config(|doc| {
        doc["server"]["listen"] = "127.0.0.1:0".into();
        doc["server"]["admin_listen"] = "127.0.0.1:0".into();
        doc["audit"]["enabled"] = false.into();
        let keys: serde_yaml::Value = serde_yaml::from_str(&format!(
            "{{url: '{jwks_url}', min_refresh: 1s, max_refresh: 1s, max_stale: 1h, unknown_kid_interval: 1s}}"
        ))
        .unwrap();
        doc["issuers"][0]["keys"] = keys;
        edit(doc);
    })
}

/// `GET /orders/1` with `headers`, for deciding on the engine directly (no gRPC).
fn get_orders_1(headers: &HashMap<String, String>) -> portcullis::authz::RequestView<'_> {
    portcullis::authz::RequestView {
        method: "GET",
        host: "api.example.com",
        path: "/orders/1",
        headers,
        source_ip: None,
        source_principal: "",
        scheme: "http",
        peer_certificate: None,
    }
}

struct Harness {
    server: Server,
    jwks: JwksServer,
    _dir: tempfile::TempDir,
}

impl Harness {
    async fn start() -> Harness {
        Self::start_with(|_| {}).await
    }

    async fn start_with(edit: impl FnOnce(&mut serde_yaml::Value)) -> Harness {
        let jwks = JwksServer::start_with(
            dev_jwks(),
            &[
                ("content-type", "application/json"),
                ("cache-control", "max-age=1"),
            ],
        )
        .await;
        let dir = tempfile::tempdir().unwrap();
        let text = config_text_with(&jwks.url(), edit);
        let server = start_server(dir.path(), "portcullis.yaml", &text).await;
        let h = Harness {
            server,
            jwks,
            _dir: dir,
        };
        h.wait_serving().await;
        h
    }

    async fn client(&self) -> AuthorizationClient<tonic::transport::Channel> {
        AuthorizationClient::connect(format!("http://{}", self.server.grpc_addr))
            .await
            .unwrap()
    }

    async fn health(&self) -> i32 {
        let mut c = HealthClient::new(channel(self.server.grpc_addr).await);
        c.check(HealthCheckRequest {
            service: "envoy.service.auth.v3.Authorization".into(),
        })
        .await
        .map(|r| r.into_inner().status)
        .unwrap_or(-1)
    }

    async fn wait_serving(&self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.health().await != ServingStatus::Serving as i32 {
            assert!(Instant::now() < deadline, "health never reported SERVING");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn check(&self, method: &str, path: &str, headers: &[(&str, &str)]) -> CheckResponse {
        let mut map: HashMap<String, String> = headers
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        map.entry("x-request-id".into()).or_insert("req-1".into());
        let req = check_request(
            method,
            path,
            "api.example.com",
            Some(("10.0.0.7", Some(5555))),
            map,
            "",
        );
        self.client().await.check(req).await.unwrap().into_inner()
    }

    /// Serves `doc` as the issuer's JWKS and waits until the server's key set for `dev`
    /// passes `fetched`.
    async fn publish_keys(
        &self,
        doc: &Value,
        fetched: impl Fn(&portcullis::identity::jwk::KeySet) -> bool,
    ) {
        self.jwks.set(doc.to_string());
        let deadline = Instant::now() + Duration::from_secs(15);
        while !self
            .server
            .engine
            .load_full()
            .keys
            .get("dev")
            .is_ok_and(|set| fetched(&set))
        {
            assert!(
                Instant::now() < deadline,
                "the new key set was never fetched"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn metrics(&self) -> String {
        scrape_metrics(self.server.admin_addr).await
    }
}

fn bearer(token: &str) -> String {
    format!("Bearer {token}")
}

fn status(resp: &CheckResponse) -> i32 {
    resp.status
        .as_ref()
        .expect("every response carries a status")
        .code
}

#[tokio::test]
async fn allowed_request_gets_identity_headers_and_removes_unset_ones() {
    let h = Harness::start().await;
    let token = mint(json!({"sub": "alice", "scope": "orders:read"}));
    let resp = h
        .check("GET", "/orders/42", &[("authorization", &bearer(&token))])
        .await;
    assert_eq!(status(&resp), 0, "{resp:?}");
    let Some(HttpResponse::OkResponse(ok)) = resp.http_response else {
        panic!("expected an OK response: {resp:?}");
    };
    let set: HashMap<_, _> = ok
        .headers
        .iter()
        .map(|h| {
            let hv = h.header.as_ref().unwrap();
            (hv.key.as_str(), hv.value.as_str())
        })
        .collect();
    assert_eq!(set.get("x-portcullis-subject"), Some(&"alice"));
    assert_eq!(set.get("x-portcullis-issuer"), Some(&DEV_ISSUER));
    assert_eq!(set.get("x-portcullis-scopes"), Some(&"orders:read"));
    // Every identity header is either overwritten or removed.
    for name in [
        "x-portcullis-subject",
        "x-portcullis-issuer",
        "x-portcullis-scopes",
    ] {
        assert!(set.contains_key(name) || ok.headers_to_remove.iter().any(|r| r == name));
    }
}

/// A claim value the upstream's HTTP parser would change is removed, not sent: edge spaces
/// are trimmed there (`" alice "` would arrive as another user, `alice`), control characters
/// are refused.
#[tokio::test]
async fn identity_values_the_upstream_would_read_differently_are_removed() {
    let h = Harness::start().await;
    for sub in [" alice ", "alice ", " alice", "al\u{7}ice"] {
        let token = mint(json!({"sub": sub, "scope": "orders:read"}));
        let resp = h
            .check("GET", "/orders/42", &[("authorization", &bearer(&token))])
            .await;
        let Some(HttpResponse::OkResponse(ok)) = resp.http_response else {
            panic!("expected an OK response: {resp:?}");
        };
        let set: Vec<_> = ok
            .headers
            .iter()
            .map(|h| h.header.as_ref().unwrap().key.as_str())
            .collect();
        assert!(!set.contains(&"x-portcullis-subject"), "{sub:?}: {set:?}");
        assert!(
            ok.headers_to_remove
                .iter()
                .any(|r| r == "x-portcullis-subject"),
            "{sub:?}"
        );
        assert!(set.contains(&"x-portcullis-scopes"), "{sub:?}");
    }
    // Inner spaces are kept: the parser leaves them.
    let token = mint(json!({"sub": "alice smith", "scope": "orders:read"}));
    let resp = h
        .check("GET", "/orders/42", &[("authorization", &bearer(&token))])
        .await;
    let Some(HttpResponse::OkResponse(ok)) = resp.http_response else {
        panic!("expected an OK response: {resp:?}");
    };
    assert!(ok.headers.iter().any(|h| {
        let hv = h.header.as_ref().unwrap();
        hv.key == "x-portcullis-subject" && hv.value == "alice smith"
    }));
}

/// A list claim is sent joined with spaces only when that can be read back as the same list:
/// `["orders:read", "orders:write admin"]` is granted entry by entry (no `orders:write`), and
/// joined it would read as three scopes upstream, `orders:write` among them.
#[tokio::test]
async fn a_list_claim_that_spaces_cannot_join_faithfully_is_removed() {
    let h = Harness::start().await;
    let scopes_header = |resp: &CheckResponse| {
        let Some(HttpResponse::OkResponse(ok)) = &resp.http_response else {
            panic!("expected an OK response: {resp:?}");
        };
        let value = ok
            .headers
            .iter()
            .map(|h| h.header.as_ref().unwrap())
            .find(|h| h.key == "x-portcullis-scopes")
            .map(|h| h.value.clone());
        let removed = ok
            .headers_to_remove
            .iter()
            .any(|r| r == "x-portcullis-scopes");
        (value, removed)
    };
    for scope in [
        json!(["orders:read", "orders:write admin"]),
        json!(["orders:read", "orders:write\tadmin"]),
        json!(["orders:read", ""]),
        json!(["orders:read", 7]),
    ] {
        let token = mint(json!({"sub": "alice", "scope": scope}));
        let resp = h
            .check("GET", "/orders/42", &[("authorization", &bearer(&token))])
            .await;
        assert_eq!(scopes_header(&resp), (None, true), "{scope}");
    }
    let token = mint(json!({"sub": "alice", "scope": ["orders:read", "orders:write"]}));
    let resp = h
        .check("GET", "/orders/42", &[("authorization", &bearer(&token))])
        .await;
    assert_eq!(
        scopes_header(&resp),
        (Some("orders:read orders:write".to_string()), false)
    );
}

#[tokio::test]
async fn public_route_removes_all_identity_headers() {
    let h = Harness::start().await;
    let resp = h
        .check("GET", "/healthz", &[("x-portcullis-subject", "spoofed")])
        .await;
    assert_eq!(status(&resp), 0);
    let Some(HttpResponse::OkResponse(ok)) = resp.http_response else {
        panic!("expected OK");
    };
    assert!(ok.headers.is_empty());
    assert!(
        ok.headers_to_remove
            .contains(&"x-portcullis-subject".to_string())
    );
}

#[tokio::test]
async fn missing_token_is_an_explicit_401_with_challenge_and_json_body() {
    let h = Harness::start().await;
    let resp = h
        .check("GET", "/orders/42", &[("x-request-id", "abc-123")])
        .await;
    assert_eq!(status(&resp), 16, "UNAUTHENTICATED");
    let (code, headers, body) = denied(&resp);
    assert_eq!(code, 401);
    // RFC 6750 3.1: no credential at all, so no error code in the challenge; the shipped
    // config takes API keys too, so both schemes are offered.
    assert_eq!(
        headers["www-authenticate"],
        "Bearer realm=\"portcullis\", ApiKey realm=\"portcullis\""
    );
    assert_eq!(body["error"], "credential_missing");
    assert_eq!(body["request_id"], "abc-123");
    assert!(body["reason"].as_str().unwrap().contains("bearer token"));
}

#[tokio::test]
async fn wrong_scope_is_403_insufficient_scope() {
    let h = Harness::start().await;
    let token = mint(json!({"sub": "alice", "scope": "orders:read"}));
    let resp = h
        .check("POST", "/orders", &[("authorization", &bearer(&token))])
        .await;
    assert_eq!(status(&resp), 7, "PERMISSION_DENIED");
    let (code, headers, body) = denied(&resp);
    assert_eq!(code, 403);
    assert!(headers["www-authenticate"].contains("error=\"insufficient_scope\""));
    assert_eq!(body["error"], "insufficient_scope");
}

#[tokio::test]
async fn garbage_token_is_401_and_never_echoed() {
    let h = Harness::start().await;
    let secretish = "eyJhbGciOiJub25lIn0.eyJzdWIiOiJtYWxsb3J5In0.c2VjcmV0LXNpZ25hdHVyZQ";
    let resp = h
        .check("GET", "/orders/1", &[("authorization", &bearer(secretish))])
        .await;
    let (code, headers, body) = denied(&resp);
    assert_eq!(code, 401);
    let all = format!("{headers:?}{body}");
    assert!(!all.contains(secretish), "token leaked into the response");
    assert!(!all.contains("c2VjcmV0LXNpZ25hdHVyZQ"), "signature leaked");
}

#[tokio::test]
async fn token_cache_hit_decides_like_a_miss() {
    let h = Harness::start().await;
    let token = mint(json!({"sub": "alice", "scope": "orders:read"}));
    let auth = bearer(&token);
    let first = h
        .check("GET", "/orders/1", &[("authorization", &auth)])
        .await;
    let second = h
        .check("GET", "/orders/1", &[("authorization", &auth)])
        .await;
    assert_eq!(status(&first), 0);
    assert_eq!(status(&second), 0);
    // A hit still applies every grant.
    let third = h
        .check("POST", "/orders", &[("authorization", &auth)])
        .await;
    assert_eq!(denied(&third).0, 403);
    let metrics = h.metrics().await;
    let hits = metric_value(&metrics, "portcullis_token_cache_hits_total");
    assert!(hits >= 2.0, "expected cache hits, metrics:\n{metrics}");
}

/// A token still in use is verified again shortly before its cache entry expires, off the
/// Check path, so the Check after the old entry's expiry is a hit, not a verification.
#[tokio::test]
async fn a_cached_token_in_use_is_verified_again_before_its_entry_expires() {
    let h = Harness::start_with(|doc| {
        // Entries live 3.6-4 s (spread per token); refresh from their last second.
        doc["tokens"]["cache"] = serde_yaml::from_str("{max_ttl: 4s}").unwrap();
    })
    .await;
    let token = mint(json!({"sub": "alice", "scope": "orders:read"}));
    let auth = bearer(&token);
    let started = Instant::now();
    let headers = [("authorization", auth.as_str())];
    let check = || h.check("GET", "/orders/1", &headers);
    assert_eq!(status(&check().await), 0);
    let count = |metrics: &str, name: &str| metric_value(metrics, name);
    // Within the entry's last second (it lives at least 3.6 s): a hit that starts a refresh.
    tokio::time::sleep(Duration::from_millis(3100).saturating_sub(started.elapsed())).await;
    assert_eq!(status(&check().await), 0);
    // Past the first entry's life (at most 4 s): still a hit, on the refreshed entry.
    tokio::time::sleep(Duration::from_millis(4500).saturating_sub(started.elapsed())).await;
    assert_eq!(status(&check().await), 0);
    let metrics = h.metrics().await;
    assert_eq!(
        count(&metrics, "portcullis_token_cache_misses_total"),
        1.0,
        "{metrics}"
    );
    assert_eq!(
        count(&metrics, "portcullis_token_cache_refreshes_total"),
        1.0,
        "{metrics}"
    );
    assert_eq!(
        count(&metrics, "portcullis_token_cache_hits_total"),
        2.0,
        "{metrics}"
    );
}

#[tokio::test]
async fn token_cache_stays_within_its_byte_budget() {
    let h = Harness::start_with(|doc| {
        doc["tokens"]["cache"] =
            serde_yaml::from_str("{capacity: 100000, max_bytes: 1MiB}").unwrap();
    })
    .await;
    let engine = h.server.engine.load_full();
    // ~2 KiB claims each: 1000 tokens would need about 3 MiB if all were kept.
    let padding = "p".repeat(2048);
    for i in 0..1000 {
        let token =
            mint(json!({"sub": format!("user{i}"), "scope": "orders:read", "pad": padding}));
        let headers = HashMap::from([("authorization".to_string(), bearer(&token))]);
        let view = get_orders_1(&headers);
        assert!(engine.check(&view).await.is_allow());
    }
    engine.sync_cache();
    let (entries, bytes) = (engine.cached_tokens(), engine.cached_bytes());
    assert!(bytes <= 1 << 20, "{bytes} bytes cached over a 1 MiB budget");
    assert!(bytes >= 1 << 19, "budget barely used: {bytes} bytes");
    assert!((100..1000).contains(&entries), "{entries} entries");
    // The scrape shows the same figure.
    let metrics = h.metrics().await;
    let scraped = metric_value(&metrics, "portcullis_token_cache_bytes");
    assert!(scraped > 0.0 && scraped <= f64::from(1 << 20), "{scraped}");
}

#[test]
fn a_cache_budget_too_small_is_refused_by_name() {
    let text = config_text_with("http://127.0.0.1:1/jwks", |doc| {
        doc["tokens"]["cache"] = serde_yaml::from_str("{max_bytes: 1000}").unwrap();
    });
    let err = portcullis::config::from_str(&text, std::path::Path::new("portcullis.yaml"))
        .expect_err("a 1000-byte cache budget must be refused");
    let msg = err.to_string();
    assert!(msg.contains("tokens.cache.max_bytes"), "{msg}");
    assert!(msg.contains("capacity: 0"), "{msg}");
}

#[tokio::test]
async fn cached_token_is_refused_once_expired() {
    let h = Harness::start().await;
    let token = mint(json!({"sub": "alice", "scope": "orders:read", "exp": now() + 60}));
    let auth = bearer(&token);
    assert_eq!(
        status(
            &h.check("GET", "/orders/1", &[("authorization", &auth)])
                .await
        ),
        0
    );
    // Same engine, same cache, a clock past exp + leeway.
    let headers = HashMap::from([("authorization".to_string(), auth.clone())]);
    let view = get_orders_1(&headers);
    let engine = h.server.engine.load_full();
    let later = engine.check_at(&view, now() + 3600).await;
    assert_eq!(later.http_status(), 401, "{later:?}");
}

#[tokio::test]
async fn cached_token_is_refused_after_its_key_leaves_the_set() {
    let h = Harness::start().await;
    let token = mint(json!({"sub": "alice", "scope": "orders:read"}));
    let auth = bearer(&token);
    assert_eq!(
        status(
            &h.check("GET", "/orders/1", &[("authorization", &auth)])
                .await
        ),
        0
    );
    // Rotate to a set without the dev key: keep a valid, unrelated EC key so the set is usable.
    h.jwks.set(
        json!({"keys": [{
            "kty": "EC", "crv": "P-256", "kid": "other", "use": "sig", "alg": "ES256",
            "x": "f83OJ3D2xF1Bg8vub9tLe1gHMzV76e8Tus9uPHvRVEU",
            "y": "x_FEzRu9m36HLN_tue659LNpXW6pCyStikYjKIWI5a0"
        }]})
        .to_string(),
    );
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let resp = h
            .check("GET", "/orders/1", &[("authorization", &auth)])
            .await;
        if status(&resp) != 0 {
            assert_eq!(denied(&resp).0, 401);
            break;
        }
        assert!(Instant::now() < deadline, "removed key still accepted");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(h.jwks.hits.load(Ordering::SeqCst) >= 2);
}

#[tokio::test]
async fn metrics_count_decisions_by_result_status_reason_and_route() {
    let h = Harness::start().await;
    h.check("GET", "/orders/9", &[]).await;
    h.check("GET", "/healthz", &[]).await;
    let text = h.metrics().await;
    assert!(
        text.lines()
            .any(|l| l.starts_with("portcullis_decisions_total{")
                && l.contains("result=\"deny\"")
                && l.contains("status=\"401\"")
                && l.contains("reason=\"credential_missing\"")
                && l.contains("route=\"orders-read\"")),
        "{text}"
    );
    assert!(text.contains("portcullis_decision_duration_seconds_bucket"));
    assert!(text.contains("portcullis_jwks_fetches_total"));
    assert!(text.contains("portcullis_jwks_seconds_since_last_success"));
}

#[tokio::test]
async fn readyz_and_healthz_answer() {
    let h = Harness::start().await;
    let ready = reqwest::get(format!("http://{}/readyz", h.server.admin_addr))
        .await
        .unwrap();
    assert_eq!(ready.status(), 200);
    let body: Value = ready.json().await.unwrap();
    assert_eq!(body["ready"], true);
    let live = reqwest::get(format!("http://{}/healthz", h.server.admin_addr))
        .await
        .unwrap();
    assert_eq!(live.status(), 200);
}

#[tokio::test]
async fn health_is_not_serving_while_keys_are_unavailable() {
    // A JWKS URL that refuses connections: bind a port, then drop the listener.
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("portcullis.yaml");
    std::fs::write(&path, config_text(&format!("http://{dead}/jwks.json"))).unwrap();
    let server = Server::start(portcullis::config::load(&path).unwrap())
        .await
        .unwrap();
    let mut c = HealthClient::new(channel(server.grpc_addr).await);
    let deadline = Instant::now() + Duration::from_secs(5);
    let status = loop {
        if let Ok(r) = c
            .check(HealthCheckRequest {
                service: String::new(),
            })
            .await
        {
            break r.into_inner().status;
        }
        assert!(Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(status, ServingStatus::NotServing as i32);
    let ready = reqwest::get(format!("http://{}/readyz", server.admin_addr))
        .await
        .unwrap();
    assert_eq!(ready.status(), 503);
    // And a request that needs those keys is refused with a reason, never allowed.
    let token = mint(json!({"sub": "alice", "scope": "orders:read"}));
    let mut client = AuthorizationClient::connect(format!("http://{}", server.grpc_addr))
        .await
        .unwrap();
    let resp = client
        .check(check_request(
            "GET",
            "/orders/1",
            "api.example.com",
            None,
            bearer_headers(&token),
            "",
        ))
        .await
        .unwrap()
        .into_inner();
    let (code, _, body) = denied(&resp);
    assert_eq!(code, 401);
    assert_eq!(body["error"], "keys_unavailable");
    server.shutdown().await;
}

#[tokio::test]
async fn empty_check_request_is_denied_not_allowed() {
    let h = Harness::start().await;
    let resp = h
        .client()
        .await
        .check(CheckRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_ne!(status(&resp), 0);
    assert!(denied(&resp).0 >= 400);
}

#[tokio::test]
async fn shutdown_stops_listening() {
    let h = Harness::start().await;
    let addr = h.server.grpc_addr;
    h.server.shutdown().await;
    assert!(tokio::net::TcpStream::connect(addr).await.is_err());
}

fn metric_value(text: &str, name: &str) -> f64 {
    text.lines()
        .find(|l| l.starts_with(name) && !l.starts_with('#'))
        .and_then(|l| l.split_whitespace().last())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

/// A raw gRPC POST over h2c: the response headers and the decoded CheckResponse, if any.
async fn raw_check(
    addr: std::net::SocketAddr,
    path: &str,
    extra: &[(&str, &str)],
    body: Vec<u8>,
) -> (reqwest::header::HeaderMap, Option<CheckResponse>) {
    use prost::Message;
    let client = reqwest::Client::builder()
        .http2_prior_knowledge()
        .build()
        .unwrap();
    let mut req = client
        .post(format!("http://{addr}{path}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(body);
    for (name, value) in extra {
        req = req.header(*name, *value);
    }
    let resp = req.send().await.unwrap();
    assert_eq!(resp.status(), 200, "gRPC answers are HTTP 200");
    let headers = resp.headers().clone();
    let bytes = resp.bytes().await.unwrap();
    let message = (bytes.len() >= 5).then(|| {
        let len = u32::from_be_bytes([bytes[1], bytes[2], bytes[3], bytes[4]]) as usize;
        assert_eq!(bytes.len(), 5 + len, "one whole gRPC message");
        CheckResponse::decode(&bytes[5..]).unwrap()
    });
    (headers, message)
}

#[tokio::test]
async fn an_unreadable_check_request_is_an_explicit_deny_never_a_grpc_error() {
    const CHECK: &str = "/envoy.service.auth.v3.Authorization/Check";
    let h = Harness::start().await;
    let addr = h.server.grpc_addr;
    const GZIP: &[(&str, &str)] = &[("grpc-encoding", "gzip")];
    type Case = (
        &'static str,
        &'static [(&'static str, &'static str)],
        &'static [u8],
    );
    // CheckRequest.attributes(1).request(4).http(2) with path(4) = "/\xff", then with one
    // header (3) whose value is "\xff": protobuf `string`s that are not UTF-8.
    #[rustfmt::skip]
    const BAD_PATH: &[u8] = &[0, 0, 0, 0, 10, 0x0a, 8, 0x22, 6, 0x12, 4, 0x22, 2, b'/', 0xff];
    #[rustfmt::skip]
    const BAD_HEADER: &[u8] = &[
        0, 0, 0, 0, 14, 0x0a, 12, 0x22, 10, 0x12, 8, 0x1a, 6, 0x0a, 1, b'a', 0x12, 1, 0xff,
    ];
    let cases: [Case; 8] = [
        ("not protobuf", &[], &[0, 0, 0, 0, 3, 0xff, 0xff, 0xff]),
        ("path not UTF-8", &[], BAD_PATH),
        ("header value not UTF-8", &[], BAD_HEADER),
        ("compressed flag", &[], &[1, 0, 0, 0, 0]),
        ("shorter than its length", &[], &[0, 0, 0, 0, 10, 1, 2]),
        ("two messages", &[], &[0, 0, 0, 0, 0, 0, 0, 0, 0, 0]),
        ("no frame", &[], &[0, 0]),
        ("gzip", GZIP, &[0, 0, 0, 0, 0]),
    ];
    for (what, extra, body) in cases {
        let (headers, resp) = raw_check(addr, CHECK, extra, body.to_vec()).await;
        let resp = resp.unwrap_or_else(|| panic!("{what}: no CheckResponse ({headers:?})"));
        assert_eq!(status(&resp), 7, "{what}: PERMISSION_DENIED, not OK");
        let (code, _, body) = denied(&resp);
        assert_eq!(code, 403, "{what}");
        assert_eq!(body["error"], "internal_error", "{what}");
        if what.ends_with("not UTF-8") {
            let reason = body["reason"].as_str().unwrap_or_default();
            assert!(reason.contains("is not UTF-8"), "{what}: {reason}");
        }
    }
    // Each one counted like any other decision.
    let metrics = h.metrics().await;
    let internal = metrics
        .lines()
        .find(|l| {
            l.starts_with("portcullis_decisions_total") && l.contains("reason=\"internal_error\"")
        })
        .unwrap_or_else(|| panic!("no internal decisions in:\n{metrics}"));
    assert!(internal.ends_with(" 8"), "{internal}");

    // The same bytes framed properly are an ordinary (empty) request: denied by routing.
    let (_, resp) = raw_check(addr, CHECK, &[], vec![0, 0, 0, 0, 0]).await;
    assert_ne!(status(&resp.unwrap()), 0);

    // Other methods and services on the port: gRPC UNIMPLEMENTED, as generated servers say.
    for path in [
        "/envoy.service.auth.v3.Authorization/Nope",
        "/no.such.Service/Check",
    ] {
        let (headers, resp) = raw_check(addr, path, &[], vec![0, 0, 0, 0, 0]).await;
        assert_eq!(headers["grpc-status"], "12", "{path}");
        assert!(resp.is_none(), "{path}");
    }
}

/// The issuer republishes its key (same material) under another `kid` and for another
/// `alg`. A token signed under the old `kid` then fails a fresh verification (401), and a
/// cached one must too: a hit is honoured only while the key set would still pick the
/// verifying key for the token's `kid` and `alg`, as `decide::decide` (no cache) would.
#[tokio::test]
async fn a_cached_token_is_refused_once_its_kid_is_gone_even_if_the_key_stayed() {
    let h = Harness::start().await;
    let cached = mint(json!({"sub": "alice", "scope": "orders:read", "jti": "cached"}));
    let fresh = mint(json!({"sub": "alice", "scope": "orders:read", "jti": "fresh"}));
    let ask = |token: &str| {
        let auth = bearer(token);
        let h = &h;
        async move {
            h.check("GET", "/orders/1", &[("authorization", &auth)])
                .await
        }
    };
    assert_eq!(status(&ask(&cached).await), 0, "allowed, and now cached");
    let mut doc: Value = serde_json::from_str(&dev_jwks()).unwrap();
    doc["keys"][0]["kid"] = "portcullis-dev-renamed".into();
    doc["keys"][0]["alg"] = "RS512".into();
    h.publish_keys(&doc, |set| set.has_kid("portcullis-dev-renamed"))
        .await;
    assert_eq!(denied(&ask(&fresh).await).0, 401, "a fresh verification");
    let engine = h.server.engine.load_full();
    let headers = HashMap::from([("authorization".to_string(), bearer(&cached))]);
    let reference = portcullis::decide::decide(
        &engine.config,
        &get_orders_1(&headers),
        &|name| engine.keys.get(name),
        now(),
    );
    assert_eq!(reference.http_status(), 401, "{reference:?}");
    let (code, _, body) = denied(&ask(&cached).await);
    assert_eq!(
        code, 401,
        "the cached token must be refused like a fresh one: {body}"
    );
}

/// The issuer's set grows past the keys one token is checked against (here: nine copies
/// under the token's own `kid`). A fresh verification refuses the token; a cached one must
/// be refused too.
#[tokio::test]
async fn a_cached_token_is_refused_once_its_issuer_has_too_many_candidate_keys() {
    let h = Harness::start().await;
    let cached = mint(json!({"sub": "alice", "scope": "orders:read", "jti": "cached-9"}));
    let auth = bearer(&cached);
    let headers = [("authorization", auth.as_str())];
    let ask = || h.check("GET", "/orders/1", &headers);
    assert_eq!(status(&ask().await), 0, "allowed, and now cached");
    let mut doc: Value = serde_json::from_str(&dev_jwks()).unwrap();
    let key = doc["keys"][0].clone();
    doc["keys"] = Value::Array(vec![key; 9]);
    h.publish_keys(&doc, |set| set.len() == 9).await;
    let (code, _, body) = denied(&ask().await);
    assert_eq!(code, 401, "{body}");
    let reason = body["reason"].as_str().unwrap_or_default();
    assert!(reason.contains("needs a `kid`"), "{body}");
}

/// A dry run never touches the live path's machinery: on routes the live policy answers
/// without reading the credential (public, or none), the candidate's caller is verified
/// against the keys at hand, with no token-cache entry or count and no wait for a key
/// refetch, and only when the candidate's route needs it.
#[tokio::test]
async fn a_dry_run_reads_credentials_the_live_policy_skipped_without_the_token_cache() {
    let h = Harness::start_with(|doc| {
        doc["dry_run"] = serde_yaml::from_str(
            "routes: [{id: reports, methods: [GET], path: '/reports/**', rules: [{id: analysts, scopes: ['reports:read']}]}]",
        )
        .unwrap();
    })
    .await;
    let claims = json!({ "sub": "alice", "scope": "reports:read" });
    let analyst = mint(claims.clone());
    let unknown_kid = support::jwt::sign(
        &support::jwt::dev_pem(),
        "no-such-kid",
        &support::jwt::dev_claims(claims),
    );
    let cases = [
        ("/healthz", &analyst, "allow", "public_route", "healthz"),
        ("/healthz", &unknown_kid, "allow", "public_route", "healthz"),
        ("/reports/q3", &analyst, "allow", "allowed", "reports"),
        (
            "/reports/q3",
            &unknown_kid,
            "deny",
            "invalid_token",
            "reports",
        ),
    ];
    for (path, token, ..) in &cases {
        let resp = h
            .check("GET", path, &[("authorization", &bearer(token))])
            .await;
        let live = if *path == "/healthz" { 0 } else { 7 }; // OK, PERMISSION_DENIED
        assert_eq!(status(&resp), live, "GET {path}");
    }
    let text = h.metrics().await;
    for (path, _, result, reason, route) in &cases {
        let live = if *path == "/healthz" { "allow" } else { "deny" };
        let series = format!(
            "portcullis_dry_run_decisions_total{{live=\"{live}\",result=\"{result}\",reason=\"{reason}\",route=\"{route}\"}}"
        );
        assert!(text.contains(&series), "no {series} in:\n{text}");
    }
    // Through the engine's cache, each token would have been counted, and an unknown `kid`
    // would have held the Check for a refetch (`key_fetch_wait`).
    assert_eq!(
        metric_value(&text, "portcullis_token_cache_misses_total"),
        0.0,
        "{text}"
    );
    assert_eq!(
        metric_value(&text, "portcullis_token_cache_hits_total"),
        0.0,
        "{text}"
    );
}

/// A dry run runs no rate limit (that would spend the caller's budget), yet where the live
/// route rate-limited a request, the candidate's answer on the same route is rate-limited
/// too, instead of an allow that reads as "the change would let it through".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dry_run_answer_is_rate_limited_where_the_live_one_was() {
    let h = Harness::start_with(|doc| {
        doc["dry_run"] = serde_yaml::from_str(
            "routes: [{id: orders-read, methods: [GET], path: '/orders/{id}', rules: [{id: keys, api_keys: ['*']}]}]",
        )
        .unwrap();
    })
    .await;
    let key = "pck_5AEWWjqRmg8M1focDlwcCo0V_eMw631tr23y0JSA0bM";
    let mut allowed = 0;
    for _ in 0..16 {
        let resp = h.check("GET", "/orders/1", &[("x-api-key", key)]).await;
        allowed += usize::from(status(&resp) == 0);
    }
    // The shipped `per-key` limit: a burst of 10, then 1 a second.
    assert!((10..16).contains(&allowed), "{allowed} of 16 allowed");
    let text = h.metrics().await;
    let series = |live: &str, result: &str, reason: &str| {
        metric_value(
            &text,
            &format!(
                "portcullis_dry_run_decisions_total{{live=\"{live}\",result=\"{result}\",reason=\"{reason}\",route=\"orders-read\"}}"
            ),
        )
    };
    assert_eq!(
        series("allow", "allow", "allowed"),
        allowed as f64,
        "{text}"
    );
    assert_eq!(
        series("deny", "deny", "rate_limited"),
        (16 - allowed) as f64,
        "{text}"
    );
    assert!(
        !text.contains("portcullis_dry_run_decisions_total{live=\"deny\",result=\"allow\""),
        "{text}"
    );
}

/// The engine's dry run (live caller reused, token cache, unread credentials checked on the
/// side) answers like the pure reference `decide::decide`, request by request, on a miss and
/// on a cache hit, for tokens, API keys, missing and broken credentials.
#[tokio::test]
async fn the_engines_dry_run_agrees_with_the_reference() {
    let h = Harness::start_with(|doc| {
        doc["dry_run"] = serde_yaml::from_str(
            "routes:
  - {id: orders-read, methods: [GET], path: '/orders/{id}', rules: [{id: auditors, scopes: ['orders:audit']}, {id: keys, api_keys: ['*']}]}
  - {id: healthz, methods: [GET], path: /healthz, rules: [{id: ops, roles: [ops]}]}
  - {id: reports, methods: [GET], path: '/reports/**', rules: [{id: analysts, scopes: ['reports:read']}]}
remove: [admin, orders-create]",
        )
        .unwrap();
    })
    .await;
    let tokens = [
        Some(bearer(&mint(
            json!({"sub": "alice", "scope": "orders:read"}),
        ))),
        Some(bearer(&mint(
            json!({"sub": "carol", "scope": "orders:audit reports:read"}),
        ))),
        Some(bearer(&mint(
            json!({"sub": "root", "roles": ["admin", "ops"], "auth_time": now()}),
        ))),
        Some(bearer("not.a.jwt")),
        Some(bearer(&support::jwt::sign(
            &support::jwt::dev_pem(),
            "no-such-kid",
            &support::jwt::dev_claims(json!({"sub": "x", "scope": "reports:read"})),
        ))),
        None,
    ];
    let api_key = "pck_5AEWWjqRmg8M1focDlwcCo0V_eMw631tr23y0JSA0bM";
    let engine = h.server.engine.load_full();
    let mut compared = 0;
    let mut seen = std::collections::BTreeSet::new();
    for (method, path) in [
        ("GET", "/orders/1"),
        ("POST", "/orders"),
        ("GET", "/healthz"),
        ("GET", "/reports/q3"),
        ("GET", "/admin/users"),
        ("GET", "/nowhere"),
    ] {
        let mut credentials: Vec<HashMap<String, String>> = tokens
            .iter()
            .map(|t| {
                t.iter()
                    .map(|t| ("authorization".to_string(), t.clone()))
                    .collect()
            })
            .collect();
        credentials.push(HashMap::from([(
            "x-api-key".to_string(),
            api_key.to_string(),
        )]));
        for headers in &credentials {
            let view = portcullis::authz::RequestView {
                method,
                path,
                ..get_orders_1(headers)
            };
            let at = now();
            let reference =
                portcullis::decide::decide(&engine.config, &view, &|n| engine.keys.get(n), at);
            // Twice: a token-cache miss, then a hit.
            for round in ["miss", "hit"] {
                let got = engine.check_at(&view, at).await;
                assert_eq!(
                    (got.code, &got.dry_run),
                    (reference.code, &reference.dry_run),
                    "{method} {path} {headers:?} ({round})"
                );
                let would = got.dry_run.as_deref().unwrap();
                seen.insert((got.is_allow(), would.is_allow(), would.code.as_str()));
                compared += 1;
            }
        }
    }
    assert_eq!(compared, 6 * 7 * 2);
    // The cases disagree both ways and reach the candidate's every kind of answer.
    for expected in [
        (true, false, "insufficient_scope"),
        (false, true, "allowed"),
        (true, false, "credential_missing"),
        (true, false, "no_matching_route"),
        (false, false, "invalid_token"),
        (true, true, "allowed"),
    ] {
        assert!(seen.contains(&expected), "{expected:?} not among {seen:?}");
    }
}

/// After an issuer withdrew every key, keys it publishes again are in force at the first
/// token that needs them (a load as for an unknown `kid`, within `unknown_kid_interval`),
/// not at the next scheduled refresh (here an hour away).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_published_again_after_a_withdrawal_are_used_at_the_first_token() {
    use base64::Engine as _;
    let h = Harness::start_with(|doc| {
        let keys = &mut doc["issuers"][0]["keys"];
        keys["min_refresh"] = "1h".into();
        keys["max_refresh"] = "1h".into();
        keys["max_stale"] = "24h".into();
    })
    .await;
    let token = mint(json!({"sub": "alice", "scope": "orders:read"}));
    let auth = bearer(&token);
    let headers = [("authorization", auth.as_str())];
    let get = || h.check("GET", "/orders/1", &headers);
    assert_eq!(status(&get().await), 0);

    // The issuer withdraws its keys; a token naming a `kid` the set lacks loads that now.
    h.jwks.set(json!({"keys": []}).to_string());
    let header = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .encode(br#"{"alg":"RS256","kid":"gone","typ":"JWT"}"#);
    let (_, rest) = token.split_once('.').unwrap();
    let unknown_kid = bearer(&format!("{header}.{rest}"));
    let deadline = Instant::now() + Duration::from_secs(10);
    while h.server.engine.load_full().keys.get("dev").is_ok() {
        let _ = h
            .check("GET", "/orders/1", &[("authorization", &unknown_kid)])
            .await;
        assert!(Instant::now() < deadline, "the withdrawal was never loaded");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let refused = get().await;
    assert_eq!(denied(&refused).0, 401);
    assert_eq!(denied(&refused).2["error"], "keys_unavailable");

    // The store retries an issuer without keys on a backoff (1 s, 2 s, 4 s, 8 s, ... up to
    // `min_refresh`): after the fourth empty answer the next retry is 8 s away.
    let deadline = Instant::now() + Duration::from_secs(20);
    while metric_value(
        &h.metrics().await,
        "portcullis_jwks_fetches_total{issuer=\"dev\",result=\"no_keys\"}",
    ) < 4.0
    {
        assert!(Instant::now() < deadline, "no retries of the empty key set");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Published again: once `unknown_kid_interval` (1 s) has passed since the last load, the
    // first token loads the keys and is allowed, seconds before the scheduled retry.
    h.jwks.set(dev_jwks());
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let first = get().await;
    assert_eq!(status(&first), 0, "{:?}", denied(&first));
}

/// The first key load waits on every issuer's provider (up to `fetch_timeout`) before the
/// decision listeners serve; the admin listener must not wait with them: a liveness probe
/// failing for that long restarts the pod, again and again while the provider is slow.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_answers_while_the_first_key_load_waits_on_a_slow_provider() {
    // A JWKS server that accepts and never answers.
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let jwks = format!("http://{}/jwks", silent.local_addr().unwrap());
    let held = tokio::spawn(async move {
        let mut open = Vec::new();
        while let Ok((conn, _)) = silent.accept().await {
            open.push(conn);
        }
    });
    let admin = support::free_port();
    let text = format!(
        r#"
server: {{listen: "127.0.0.1:0", admin_listen: "127.0.0.1:{admin}"}}
audit: {{enabled: false}}
issuers:
  - name: slow
    issuer: https://slow.example
    audiences: [api]
    keys: {{url: "{jwks}", fetch_timeout: 3s}}
routes:
  - {{id: things, methods: [GET], path: /things, rules: [{{id: any, issuers: [slow]}}]}}
"#
    );
    let config = portcullis::config::from_str(&text, std::path::Path::new("mem.yaml")).unwrap();
    let started = Instant::now();
    let starting = tokio::spawn(Server::start(config));
    let client = reqwest::Client::builder()
        .timeout(Duration::from_millis(500))
        .build()
        .unwrap();
    let get = |path: &'static str| {
        let client = client.clone();
        async move {
            let url = format!("http://127.0.0.1:{admin}{path}");
            for _ in 0..20 {
                if let Ok(resp) = client.get(&url).send().await {
                    return Some(resp.status().as_u16());
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            None
        }
    };
    assert_eq!(get("/healthz").await, Some(200));
    assert_eq!(get("/readyz").await, Some(503), "no keys yet: not ready");
    assert!(
        !starting.is_finished() && started.elapsed() < Duration::from_secs(3),
        "answered only after the key load gave up ({:?})",
        started.elapsed()
    );
    let server = starting.await.unwrap().unwrap();
    assert!(
        started.elapsed() >= Duration::from_secs(2),
        "the load waited"
    );
    server.shutdown().await;
    held.abort();
}
