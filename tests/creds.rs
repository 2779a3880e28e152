//! In-process tests of API keys and rate limits: the real gRPC server on 127.0.0.1:0 and a
//! tonic ext_authz client. They prove what the corpus cannot: the allow response for an API
//! key (identity headers, the key header stripped) and the stateful 429 with `Retry-After`
//! and `RateLimit` headers.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::time::{Duration, Instant};

use envoy_types::ext_authz::v3::pb::CheckResponse;
use envoy_types::pb::envoy::service::auth::v3::authorization_client::AuthorizationClient;
use portcullis::identity::apikey::{format_hash, hash_key};
use portcullis::server::Server;
use support::inproc::{allowed, check_from, denied, start_server};

const KEY_A: &str = "pck_inprocess-key-a-000000000000000000000000001";
const KEY_B: &str = "pck_inprocess-key-b-000000000000000000000000002";

fn config_text() -> String {
    format!(
        r#"
server: {{listen: "127.0.0.1:0", admin_listen: "127.0.0.1:0"}}
audit: {{enabled: false}}
upstream:
  strip_authorization: true
api_keys:
  keys:
    - {{id: key-a, owner: team-a, hash: "{}", expires: 2099-01-01T00:00:00Z, routes: ["GET /orders/{{id}}"]}}
    - {{id: key-b, owner: team-b, hash: "{}", expires: 2099-01-01T00:00:00Z, routes: ["GET /orders/{{id}}"]}}
routes:
  - {{id: login, methods: [POST], path: /login, public: true}}
  - id: orders-read
    methods: [GET]
    path: /orders/{{id}}
    rules: [{{id: order-keys, api_keys: ["*"]}}]
  # Accepts any key, but no key lists it: a deny made after the key is verified.
  - id: orders-create
    methods: [POST]
    path: /orders
    rules: [{{id: create-keys, api_keys: ["*"]}}]
rate_limits:
  # Long windows: nothing refills while a test runs.
  - {{id: per-key, by: api_key, requests: 2, per: 1h}}
  - {{id: login-per-ip, by: client_ip, requests: 1, per: 1h, routes: [login]}}
"#,
        format_hash(&hash_key(KEY_A)),
        format_hash(&hash_key(KEY_B)),
    )
}

struct Harness {
    server: Server,
    _dir: tempfile::TempDir,
}

impl Harness {
    async fn start() -> Harness {
        let dir = tempfile::tempdir().unwrap();
        let server = start_server(dir.path(), "portcullis.yaml", &config_text()).await;
        let h = Harness { server, _dir: dir };
        // Poll until the gRPC listener answers (no sleeps to wait for readiness).
        let deadline = Instant::now() + Duration::from_secs(10);
        while AuthorizationClient::connect(format!("http://{}", h.server.grpc_addr))
            .await
            .is_err()
        {
            assert!(Instant::now() < deadline, "gRPC listener never answered");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        h
    }

    async fn check(
        &self,
        method: &str,
        path: &str,
        source: &str,
        headers: &[(&str, &str)],
    ) -> CheckResponse {
        check_from(self.server.grpc_addr, method, path, source, headers).await
    }

    async fn with_key(&self, key: &str) -> CheckResponse {
        self.check("GET", "/orders/1", "10.0.0.7", &[("x-api-key", key)])
            .await
    }
}

#[tokio::test]
async fn an_api_key_allow_names_the_owner_and_strips_the_key_header() {
    let h = Harness::start().await;
    let resp = h.with_key(KEY_A).await;
    let (set, removed) = allowed(&resp).unwrap_or_else(|| panic!("not allowed: {resp:?}"));
    assert_eq!(
        set.get("x-portcullis-subject").map(String::as_str),
        Some("team-a")
    );
    assert_eq!(
        set.get("x-portcullis-issuer").map(String::as_str),
        Some("api-key")
    );
    assert!(
        removed.iter().any(|r| r == "x-api-key"),
        "the key header must not reach the upstream: {removed:?}"
    );
    assert!(
        !format!("{resp:?}").contains(KEY_A),
        "the response echoes the key"
    );
}

#[tokio::test]
async fn over_the_limit_answers_429_with_retry_after_and_ratelimit_headers() {
    let h = Harness::start().await;
    for i in 0..2 {
        let resp = h.with_key(KEY_A).await;
        assert!(allowed(&resp).is_some(), "request {i}: {resp:?}");
    }
    let resp = h.with_key(KEY_A).await;
    assert_eq!(resp.status.as_ref().unwrap().code, 8, "RESOURCE_EXHAUSTED");
    let (status, headers, body) = denied(&resp);
    assert_eq!(status, 429);
    assert_eq!(body["error"], "rate_limited");
    assert_eq!(body["rate_limit"], "per-key");
    // 2 per hour: one more request fits 30 minutes after the burst was spent.
    let retry: u64 = headers["retry-after"].parse().unwrap();
    assert!((1790..=1800).contains(&retry), "retry-after {retry}");
    assert_eq!(headers["ratelimit-policy"], "\"per-key\";q=2;w=3600");
    assert_eq!(headers["ratelimit"], format!("\"per-key\";r=0;t={retry}"));
    assert!(!format!("{resp:?}").contains(KEY_A));

    // Buckets are per key: another key still has its whole budget.
    assert!(allowed(&h.with_key(KEY_B).await).is_some());
}

#[tokio::test]
async fn denied_requests_spend_no_budget() {
    let h = Harness::start().await;
    for _ in 0..5 {
        let resp = h
            .check("POST", "/orders", "10.0.0.7", &[("x-api-key", KEY_A)])
            .await;
        let (status, _, body) = denied(&resp);
        assert_eq!(
            (status, body["error"].as_str()),
            (403, Some("insufficient_scope"))
        );
    }
    for i in 0..2 {
        assert!(allowed(&h.with_key(KEY_A).await).is_some(), "request {i}");
    }
    assert_eq!(denied(&h.with_key(KEY_A).await).0, 429);
}

#[tokio::test]
async fn public_routes_are_limited_per_client_address() {
    let h = Harness::start().await;
    assert!(
        allowed(&h.check("POST", "/login", "192.0.2.1", &[]).await).is_some(),
        "first login attempt"
    );
    let (status, headers, _) = denied(&h.check("POST", "/login", "192.0.2.1", &[]).await);
    assert_eq!(status, 429);
    assert_eq!(headers["ratelimit-policy"], "\"login-per-ip\";q=1;w=3600");
    // Another client has its own bucket; X-Forwarded-For is not trusted (0 proxy hops).
    assert!(allowed(&h.check("POST", "/login", "192.0.2.2", &[]).await).is_some());
    let spoofed = h
        .check(
            "POST",
            "/login",
            "192.0.2.1",
            &[("x-forwarded-for", "203.0.113.9")],
        )
        .await;
    assert_eq!(denied(&spoofed).0, 429);
}

/// Operators see each key's traffic: `portcullis_api_key_decisions_total` counts decisions
/// by key id, result and reason, allowed, refused and rate-limited alike. A key nobody
/// configured never becomes a label value (clients cannot grow the metric).
#[tokio::test]
async fn each_keys_decisions_are_counted_under_its_id() {
    let h = Harness::start().await;
    for _ in 0..3 {
        h.with_key(KEY_A).await; // allowed, allowed, then 429
    }
    h.check("POST", "/orders", "10.0.0.7", &[("x-api-key", KEY_A)])
        .await; // 403: the key does not list the endpoint
    h.with_key(KEY_B).await;
    let stranger = "pck_inprocess-stranger-00000000000000000000000009";
    assert_eq!(denied(&h.with_key(stranger).await).0, 401);
    let metrics = reqwest::get(format!("http://{}/metrics", h.server.admin_addr))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for line in [
        r#"portcullis_api_key_decisions_total{key_id="key-a",result="allow",reason="allowed"} 2"#,
        r#"portcullis_api_key_decisions_total{key_id="key-a",result="deny",reason="rate_limited"} 1"#,
        r#"portcullis_api_key_decisions_total{key_id="key-a",result="deny",reason="insufficient_scope"} 1"#,
        r#"portcullis_api_key_decisions_total{key_id="key-b",result="allow",reason="allowed"} 1"#,
    ] {
        assert!(metrics.contains(line), "missing {line}:\n{metrics}");
    }
    let per_key: Vec<&str> = metrics
        .lines()
        .filter(|l| l.starts_with("portcullis_api_key_decisions_total{"))
        .collect();
    assert_eq!(per_key.len(), 4, "{per_key:#?}");
    assert!(
        !metrics.contains("stranger") && !metrics.contains("pck_"),
        "{metrics}"
    );
}
