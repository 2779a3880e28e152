//! End to end through a real Envoy (the SHIPPED `envoy/envoy.yaml`, only its ports
//! rewritten) and the real `portcullis` binary: scoped API keys allowed on their route and
//! refused elsewhere, and a rate limit's 429 reaching the client with its `Retry-After` and
//! `RateLimit` headers.
//!
//! Each test starts its own stack; processes die with the test, pass or fail.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use portcullis::identity::apikey::{format_hash, hash_key};
use support::ChildGuard;
use support::stack::{Answer, Envoy, Portcullis, Seen, Upstream, h2c_client, http_client};

const ORDERS_KEY: &str = "pck_e2e-orders-key-0000000000000000000000000001";
const OTHER_KEY: &str = "pck_e2e-other-key-00000000000000000000000000002";

/// The policy: a key for reading orders, one for creating them, rules that accept keys, an
/// admin route that accepts none, and a per-key limit of 2 requests an hour.
fn portcullis_config(grpc: u16, admin: u16) -> String {
    format!(
        r#"
server: {{listen: "127.0.0.1:{grpc}", admin_listen: "127.0.0.1:{admin}", shutdown_grace: 1s}}
api_keys:
  header: x-api-key
  keys:
    - id: orders-reader
      owner: team-orders
      hash: "{}"
      expires: 2099-01-01T00:00:00Z
      routes: ["GET /orders/{{id}}"]
    - id: order-creator
      owner: team-shop
      hash: "{}"
      expires: 2099-01-01T00:00:00Z
      routes: ["POST /orders", "GET /admin/**"]
routes:
  - id: orders-read
    methods: [GET]
    path: /orders/{{id}}
    rules: [{{id: order-keys, api_keys: ["*"]}}]
  - id: orders-create
    methods: [POST]
    path: /orders
    rules: [{{id: creator-key, api_keys: [order-creator]}}]
  - id: admin
    methods: [GET]
    path: /admin/**
    rules: [{{id: admins, roles: [admin]}}]
rate_limits:
  - {{id: per-key, by: api_key, requests: 2, per: 1h, routes: [orders-create]}}
"#,
        format_hash(&hash_key(ORDERS_KEY)),
        format_hash(&hash_key(OTHER_KEY)),
    )
}

struct Stack {
    envoy_addr: SocketAddr,
    /// What the upstream received, request by request.
    seen: Arc<Mutex<Vec<Seen>>>,
    client: reqwest::Client,
    h2c: reqwest::Client,
    _portcullis: Portcullis,
    _envoy: ChildGuard,
    _dir: tempfile::TempDir,
}

impl Stack {
    async fn start() -> Stack {
        let dir = tempfile::tempdir().unwrap();
        let upstream = Upstream::start().await;

        let portcullis = Portcullis::start(dir.path(), "portcullis", portcullis_config);
        let envoy = Envoy::start(dir.path(), portcullis.grpc, upstream.port);

        Stack {
            envoy_addr: envoy.addr,
            seen: upstream.seen,
            client: http_client(),
            h2c: h2c_client(),
            _portcullis: portcullis,
            _envoy: envoy.process,
            _dir: dir,
        }
    }

    async fn send(&self, method: &str, path: &str, key: Option<&str>) -> Answer {
        self.send_with(&self.client, method, path, key).await
    }

    async fn send_with(
        &self,
        client: &reqwest::Client,
        method: &str,
        path: &str,
        key: Option<&str>,
    ) -> Answer {
        let url = format!("http://{}{}", self.envoy_addr, path);
        let mut request = client.request(method.parse().unwrap(), &url);
        if let Some(key) = key {
            request = request.header("x-api-key", key);
        }
        Answer::read(request.send().await.unwrap()).await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_api_key_is_allowed_on_its_route_and_refused_elsewhere_over_http1_and_h2c() {
    let stack = Stack::start().await;
    for (proto, client) in [("http/1.1", &stack.client), ("h2c", &stack.h2c)] {
        check_key_routes(&stack, client, proto).await;
    }
}

async fn check_key_routes(stack: &Stack, client: &reqwest::Client, proto: &str) {
    let ok = stack
        .send_with(client, "GET", "/orders/42", Some(ORDERS_KEY))
        .await;
    assert_eq!(ok.status, 200, "{proto}: {ok:?}");
    assert!(ok.answered_by_upstream(), "{ok:?}");
    let seen = stack.seen.lock().unwrap().last().cloned().unwrap().headers;
    let subject = seen
        .iter()
        .find(|(n, _)| n == "x-portcullis-subject")
        .map(|(_, v)| v.as_str());
    assert_eq!(subject, Some("team-orders"), "upstream saw {seen:?}");

    // Each refusal is made by Portcullis and never reaches the upstream.
    let before = stack.seen.lock().unwrap().len();
    let cases: [(&str, &str, Option<&str>, u16, &str); 6] = [
        // A route the key does not list, though a rule there accepts keys.
        (
            "POST",
            "/orders",
            Some(ORDERS_KEY),
            403,
            "insufficient_scope",
        ),
        // A route the key lists, but whose rules accept no API key.
        (
            "GET",
            "/admin/users",
            Some(OTHER_KEY),
            403,
            "insufficient_scope",
        ),
        // A key the route's rule accepts, on an endpoint the key does not list.
        (
            "GET",
            "/orders/42",
            Some(OTHER_KEY),
            403,
            "insufficient_scope",
        ),
        // Unknown key, no key, and a key in the URL query.
        (
            "GET",
            "/orders/42",
            Some("pck_unknown"),
            401,
            "invalid_token",
        ),
        ("GET", "/orders/42", None, 401, "credential_missing"),
        (
            "GET",
            "/orders/42?api_key=pck_e2e-orders-key-0000000000000000000000000001",
            None,
            401,
            "invalid_token",
        ),
    ];
    for (method, path, key, status, error) in cases {
        let answer = stack.send_with(client, method, path, key).await;
        assert_eq!(answer.status, status, "{proto} {method} {path}: {answer:?}");
        assert!(
            !answer.answered_by_upstream(),
            "{method} {path}: {answer:?}"
        );
        assert_eq!(answer.error(), error, "{method} {path}: {answer:?}");
        assert!(
            !answer.body.contains(ORDERS_KEY) && !answer.body.contains(OTHER_KEY),
            "{method} {path}: the deny echoes a key: {answer:?}"
        );
    }
    assert_eq!(stack.seen.lock().unwrap().len(), before);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_the_limit_the_client_gets_429_with_retry_after_and_ratelimit_headers() {
    let stack = Stack::start().await;
    for i in 0..2u64 {
        let answer = stack.send("POST", "/orders", Some(OTHER_KEY)).await;
        assert_eq!(answer.status, 200, "request {i}: {answer:?}");
        assert!(answer.answered_by_upstream(), "request {i}: {answer:?}");
        // Each allow tells the client what is left: one request, then none; the bucket is
        // full again 30 minutes after each request spent.
        assert_eq!(
            answer.header("ratelimit-policy"),
            Some("\"per-key\";q=2;w=3600"),
            "request {i}: {answer:?}"
        );
        let quota = answer.header("ratelimit").unwrap_or_default();
        let (left, t) = quota
            .strip_prefix("\"per-key\";r=")
            .and_then(|rest| rest.split_once(";t="))
            .unwrap_or_else(|| panic!("request {i}: RateLimit {quota:?}"));
        assert_eq!(left, (1 - i).to_string(), "request {i}: {quota}");
        let t: u64 = t.parse().unwrap();
        assert!(
            (1790 * (i + 1)..=1800 * (i + 1)).contains(&t),
            "request {i}: {quota}"
        );
    }
    let limited = stack.send("POST", "/orders", Some(OTHER_KEY)).await;
    assert_eq!(limited.status, 429, "{limited:?}");
    assert!(!limited.answered_by_upstream(), "{limited:?}");
    assert_eq!(limited.error(), "rate_limited");
    // Envoy sent it: the deny is its local reply, built from Portcullis' answer.
    assert_eq!(limited.header("server"), Some("envoy"), "{limited:?}");
    let retry: u64 = limited
        .header("retry-after")
        .unwrap_or_else(|| panic!("no Retry-After: {limited:?}"))
        .parse()
        .unwrap();
    // 2 per hour: the next request fits 30 minutes after the burst.
    assert!((1790..=1800).contains(&retry), "retry-after {retry}");
    assert_eq!(
        limited.header("ratelimit-policy"),
        Some("\"per-key\";q=2;w=3600"),
        "{limited:?}"
    );
    assert_eq!(
        limited.header("ratelimit"),
        Some(format!("\"per-key\";r=0;t={retry}").as_str()),
        "{limited:?}"
    );
    // Another key on another route is not limited by it.
    let other = stack.send("GET", "/orders/1", Some(ORDERS_KEY)).await;
    assert_eq!(other.status, 200, "{other:?}");
}
