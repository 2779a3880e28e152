//! End to end through a real Envoy (the SHIPPED `envoy/envoy.yaml`, only its ports
//! rewritten) and the real `portcullis` binary: scoped API keys allowed on their route and
//! refused elsewhere, and a rate limit's 429 reaching the client with its `Retry-After` and
//! `RateLimit` headers.
//!
//! Each test starts its own stack; processes die with the test, pass or fail.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::net::SocketAddr;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use portcullis::identity::apikey::{format_hash, hash_key};
use support::{ChildGuard, free_port, wait_for_status};

const ORDERS_KEY: &str = "pck_e2e-orders-key-0000000000000000000000000001";
const OTHER_KEY: &str = "pck_e2e-other-key-00000000000000000000000000002";
const UPSTREAM_MARKER: &str = "x-e2e-upstream";

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

/// What the upstream received: the headers of each request, lower-case names.
type Seen = Arc<Mutex<Vec<Vec<(String, String)>>>>;

struct Stack {
    envoy_addr: SocketAddr,
    seen: Seen,
    client: reqwest::Client,
    h2c: reqwest::Client,
    _portcullis: ChildGuard,
    _envoy: ChildGuard,
    _dir: tempfile::TempDir,
}

impl Stack {
    async fn start() -> Stack {
        let dir = tempfile::tempdir().unwrap();

        let seen: Seen = Arc::new(Mutex::new(Vec::new()));
        let s = seen.clone();
        let app = axum::Router::new().fallback(move |request: axum::extract::Request| {
            let s = s.clone();
            async move {
                let headers = request
                    .headers()
                    .iter()
                    .map(|(n, v)| {
                        (
                            n.as_str().to_string(),
                            String::from_utf8_lossy(v.as_bytes()).to_string(),
                        )
                    })
                    .collect();
                s.lock().unwrap().push(headers);
                ([(UPSTREAM_MARKER, "1")], "upstream")
            }
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let upstream_port = listener.local_addr().unwrap().port();
        tokio::spawn(async move { axum::serve(listener, app).await });

        let (grpc, admin) = (free_port(), free_port());
        let config = dir.path().join("portcullis.yaml");
        std::fs::write(&config, portcullis_config(grpc, admin)).unwrap();
        let mut command = Command::new(env!("CARGO_BIN_EXE_portcullis"));
        command.arg("serve").arg("--config").arg(&config);
        let mut portcullis = ChildGuard::spawn("portcullis", command);
        wait_for_status(
            &mut portcullis,
            SocketAddr::from(([127, 0, 0, 1], admin)),
            "/readyz",
            200,
            Duration::from_secs(30),
        );

        let (listen, envoy_admin) = (free_port(), free_port());
        let shipped =
            std::fs::read_to_string(support::repo_root().join("envoy/envoy.yaml")).unwrap();
        let envoy_config = support::rewrite_envoy_config(
            &shipped,
            &[
                (9901, envoy_admin),
                (10000, listen),
                (9191, grpc),
                (8080, upstream_port),
            ],
        );
        let envoy_path = dir.path().join("envoy.yaml");
        std::fs::write(&envoy_path, envoy_config).unwrap();
        let envoy =
            support::start_envoy(&envoy_path, SocketAddr::from(([127, 0, 0, 1], envoy_admin)));

        Stack {
            envoy_addr: SocketAddr::from(([127, 0, 0, 1], listen)),
            seen,
            client: reqwest::Client::builder()
                .no_proxy()
                .timeout(Duration::from_secs(10))
                .build()
                .unwrap(),
            h2c: reqwest::Client::builder()
                .http2_prior_knowledge()
                .no_proxy()
                .timeout(Duration::from_secs(10))
                .build()
                .unwrap(),
            _portcullis: portcullis,
            _envoy: envoy,
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
        let response = request.send().await.unwrap();
        let status = response.status().as_u16();
        let headers = response
            .headers()
            .iter()
            .map(|(n, v)| {
                (
                    n.as_str().to_string(),
                    String::from_utf8_lossy(v.as_bytes()).to_string(),
                )
            })
            .collect();
        let body = response.text().await.unwrap();
        Answer {
            status,
            headers,
            body,
        }
    }
}

#[derive(Debug)]
struct Answer {
    status: u16,
    headers: Vec<(String, String)>,
    body: String,
}

impl Answer {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    fn answered_by_upstream(&self) -> bool {
        self.header(UPSTREAM_MARKER).is_some()
    }

    /// The `error` of Portcullis' JSON deny body.
    fn error(&self) -> String {
        let body: serde_json::Value = serde_json::from_str(&self.body)
            .unwrap_or_else(|e| panic!("body is not JSON ({e}): {self:?}"));
        body["error"].as_str().unwrap_or_default().to_string()
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
    let seen = stack.seen.lock().unwrap().last().cloned().unwrap();
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
    for i in 0..2 {
        let answer = stack.send("POST", "/orders", Some(OTHER_KEY)).await;
        assert_eq!(answer.status, 200, "request {i}: {answer:?}");
        assert!(answer.answered_by_upstream(), "request {i}: {answer:?}");
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
