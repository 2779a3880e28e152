//! Envoy's HTTP ext_authz API (`server.http_listen`), in process: the real server with the
//! shipped config, a loopback JWKS server, and each request asked both ways, as a gRPC
//! CheckRequest and as the HTTP request Envoy's `http_service` sends, over HTTP/1.1 and h2c.
//! Both APIs must give the same decision; only the carrier differs (and a 503 is a 403 on
//! the HTTP API, where Envoy would read a 5xx as the authorizer failing).
//!
//! tests/e2e_envoy_http.rs runs the shipped envoy/envoy-http.yaml against this listener.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::net::SocketAddr;

use portcullis::server::Server;
use serde_json::{Value, json};
use support::free_port;
use support::inproc::{
    IDENTITY_HEADERS, allowed, check_from, client_headers_on_allow, denied, shipped_config,
    start_server,
};
use support::jwks::JwksServer;
use support::jwt::{dev_jwks, merged, mint_dev as mint};

const SOURCE: &str = "x-portcullis-source-address";
const TO_REMOVE: &str = "x-envoy-auth-headers-to-remove";

struct Harness {
    server: Server,
    _jwks: JwksServer,
    _dir: tempfile::TempDir,
    h1: reqwest::Client,
    h2: reqwest::Client,
}

/// One answer of the HTTP API.
#[derive(Debug)]
struct HttpAnswer {
    status: u16,
    headers: reqwest::header::HeaderMap,
    body: String,
}

impl HttpAnswer {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).map(|v| v.to_str().unwrap())
    }

    /// The names listed in `x-envoy-auth-headers-to-remove`.
    fn removed(&self) -> Vec<String> {
        self.header(TO_REMOVE)
            .map(|v| v.split(',').map(|s| s.trim().to_string()).collect())
            .unwrap_or_default()
    }

    fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("{e}: {self:?}"))
    }
}

impl Harness {
    async fn start(edit: impl FnOnce(&mut serde_yaml::Value)) -> Harness {
        let jwks =
            JwksServer::start_with(dev_jwks(), &[("content-type", "application/json")]).await;
        let dir = tempfile::tempdir().unwrap();
        let url = jwks.url();
        let text = shipped_config(|doc| {
            doc["server"]["listen"] = "127.0.0.1:0".into();
            doc["server"]["admin_listen"] = "127.0.0.1:0".into();
            doc["server"]["http_listen"] = "127.0.0.1:0".into();
            doc["audit"]["enabled"] = false.into();
            doc["issuers"][0]["keys"] = serde_yaml::from_str(&format!(
                "{{url: '{url}', min_refresh: 1s, max_refresh: 1s, max_stale: 1h}}"
            ))
            .unwrap();
            edit(doc);
        });
        let server = start_server(dir.path(), "portcullis.yaml", &text).await;
        let h = Harness {
            server,
            _jwks: jwks,
            _dir: dir,
            h1: reqwest::Client::builder().http1_only().build().unwrap(),
            h2: reqwest::Client::builder()
                .http2_prior_knowledge()
                .build()
                .unwrap(),
        };
        // Keys load in the background: wait until they are usable. (Not by a request that
        // must be allowed: with shared state unreachable from the start, none is.)
        for _ in 0..200 {
            if h.server.engine.load().keys.ready() {
                return h;
            }
            tokio::time::sleep(std::time::Duration::from_millis(25)).await;
        }
        panic!("keys never loaded");
    }

    fn http_addr(&self) -> SocketAddr {
        self.server.http_addr.expect("http_listen is set")
    }

    /// The request Envoy's `http_service` sends: the original method and path, the host as
    /// `:authority`/`Host`, the allowed headers and Envoy's source-address header.
    async fn http(
        &self,
        h2: bool,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &str,
    ) -> HttpAnswer {
        let client = if h2 { &self.h2 } else { &self.h1 };
        let url = format!("http://{}{path}", self.http_addr());
        let mut req = client
            .request(method.parse().unwrap(), url)
            .header("host", "api.example.com")
            .header("x-request-id", "req-1")
            .body(body.to_string());
        for (n, v) in headers {
            req = req.header(*n, *v);
        }
        let resp = req.send().await.unwrap();
        if h2 {
            assert_eq!(resp.version(), reqwest::Version::HTTP_2);
        }
        HttpAnswer {
            status: resp.status().as_u16(),
            headers: resp.headers().clone(),
            body: resp.text().await.unwrap(),
        }
    }

    /// The same request as a gRPC CheckRequest from source address `source`.
    async fn grpc(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        source: &str,
    ) -> envoy_types::ext_authz::v3::pb::CheckResponse {
        check_from(self.server.grpc_addr, method, path, source, headers).await
    }
}

fn bearer(token: &str) -> String {
    format!("Bearer {token}")
}

/// A development-issuer token for `alice` with `claims` merged over the defaults.
fn token(claims: Value) -> String {
    mint(merged(json!({ "sub": "alice" }), claims))
}

fn reader() -> String {
    token(json!({ "scope": "orders:read" }))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn both_apis_give_the_same_decision_over_http1_and_h2() {
    let h = Harness::start(|_| {}).await;
    let reader = bearer(&reader());
    let scopeless = bearer(&token(json!({ "sub": "bob" })));
    let garbage = bearer("not.a.jwt");
    // (method, path, authorization, expected status)
    let cases: &[(&str, &str, Option<&str>, u16)] = &[
        ("GET", "/orders/42", Some(&reader), 200),
        ("GET", "/users/bob/profile", Some(&scopeless), 200),
        ("GET", "/healthz", None, 200),
        ("GET", "/orders/1", None, 401),
        ("GET", "/orders/1", Some(&garbage), 401),
        ("POST", "/orders", Some(&reader), 403),
        ("GET", "/users/carol/profile", Some(&scopeless), 403),
        ("GET", "/nowhere", Some(&reader), 403),
        ("GET", "/admin;x=y/users", None, 403),
        ("HEAD", "/orders/42", Some(&reader), 403),
    ];
    for &(method, path, auth, want) in cases {
        // Spoofed identity headers, as a client would send them through Envoy.
        let mut headers = vec![("x-portcullis-subject", "mallory")];
        if let Some(auth) = auth {
            headers.push(("authorization", auth));
        }
        let grpc = h.grpc(method, path, &headers, "10.0.0.7").await;
        headers.push((SOURCE, "10.0.0.7"));
        for h2 in [false, true] {
            let ctx = format!("{method} {path} (h2: {h2})");
            let http = h.http(h2, method, path, &headers, "").await;
            assert_eq!(http.status, want, "{ctx}: {http:?}");
            match allowed(&grpc) {
                Some((set, removed)) => {
                    assert_eq!(http.status, 200, "{ctx}");
                    assert!(http.body.is_empty(), "{ctx}: an allow has no body");
                    for name in IDENTITY_HEADERS {
                        // Set by both, to the same value; or removed by both.
                        assert_eq!(
                            http.header(name),
                            set.get(name).map(String::as_str),
                            "{ctx}"
                        );
                        assert_eq!(
                            http.removed().iter().any(|n| n == name),
                            removed.iter().any(|n| n == name),
                            "{ctx}: {name}"
                        );
                        assert!(
                            http.header(name).is_some() != http.removed().iter().any(|n| n == name),
                            "{ctx}: {name} must be either set or removed"
                        );
                    }
                    // The client's copy of Envoy's header never reaches the upstream.
                    assert!(http.removed().iter().any(|n| n == SOURCE), "{ctx}");
                }
                None => {
                    let (status, grpc_headers, grpc_body) = denied(&grpc);
                    assert_eq!(http.status, status, "{ctx}");
                    if method == "HEAD" {
                        // HTTP: an answer to HEAD has no body (nor does Envoy's to the client).
                        assert!(http.body.is_empty(), "{ctx}");
                    } else {
                        assert_eq!(http.json(), grpc_body, "{ctx}");
                        assert_eq!(http.json()["request_id"], "req-1", "{ctx}");
                    }
                    for name in ["content-type", "cache-control", "www-authenticate"] {
                        assert_eq!(
                            http.header(name),
                            grpc_headers.get(name).map(String::as_str),
                            "{ctx}: {name}"
                        );
                    }
                    assert!(http.header(TO_REMOVE).is_none(), "{ctx}");
                    for name in IDENTITY_HEADERS {
                        assert!(http.header(name).is_none(), "{ctx}: {name} on a deny");
                    }
                    if let Some(auth) = auth {
                        let secret = auth.trim_start_matches("Bearer ");
                        assert!(!http.body.contains(secret), "{ctx}: token echoed");
                    }
                }
            }
        }
    }
}

/// An allow that a rate limit counted tells the client what is left, on both APIs: over gRPC
/// in `response_headers_to_add` (appended to the upstream's response), over HTTP as headers
/// of the 200 (Envoy passes them on with `allowed_client_headers_on_success`). Both APIs
/// spend from the same bucket.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_allow_under_a_rate_limit_tells_the_client_the_quota_left() {
    // per-subject (POST /orders): 5 at once, then one an hour, so nothing refills meanwhile.
    let h = Harness::start(|doc| {
        doc["rate_limits"][1]["requests"] = 1.into();
        doc["rate_limits"][1]["per"] = "1h".into();
        doc["rate_limits"][1]["burst"] = 5.into();
    })
    .await;
    let writer = bearer(&token(json!({ "scope": "orders:write" })));
    let mut headers = vec![("authorization", writer.as_str())];
    let policy = "\"per-subject\";q=5;w=18000";
    // The bucket is full again an hour after each request spent.
    let quota = |left: u32, hours: u32| format!("\"per-subject\";r={left};t={}", hours * 3600);

    let grpc = client_headers_on_allow(&h.grpc("POST", "/orders", &headers, "10.0.0.7").await);
    assert_eq!(
        grpc,
        vec![
            ("ratelimit-policy".to_string(), policy.to_string(), true),
            ("ratelimit".to_string(), quota(4, 1), true),
        ]
    );
    headers.push((SOURCE, "10.0.0.7"));
    for (h2, left) in [(false, 3), (true, 2)] {
        let http = h.http(h2, "POST", "/orders", &headers, "").await;
        assert_eq!(http.status, 200, "{http:?}");
        assert_eq!(http.header("ratelimit-policy"), Some(policy), "{http:?}");
        assert_eq!(
            http.header("ratelimit"),
            Some(quota(left, 5 - left).as_str()),
            "{http:?}"
        );
    }

    // A route no limit covers: nothing to tell, on either API.
    let reader = bearer(&reader());
    let read = [("authorization", reader.as_str()), (SOURCE, "10.0.0.7")];
    let grpc = h.grpc("GET", "/orders/42", &read[..1], "10.0.0.7").await;
    assert_eq!(client_headers_on_allow(&grpc), vec![]);
    let http = h.http(true, "GET", "/orders/42", &read, "").await;
    assert_eq!(http.status, 200, "{http:?}");
    assert!(http.header("ratelimit").is_none(), "{http:?}");
    assert!(http.header("ratelimit-policy").is_none(), "{http:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_client_address_is_only_the_one_envoy_adds() {
    // The reader grant holds only from 10.0.0.0/8.
    let h = Harness::start(|doc| {
        doc["routes"][1]["rules"][0]["source"] =
            serde_yaml::from_str("{cidrs: [10.0.0.0/8]}").unwrap();
    })
    .await;
    let auth = bearer(&reader());
    let cases: &[(&[&str], u16)] = &[
        (&["10.1.2.3"], 200),
        (&["[::ffff:10.1.2.3]"], 200),
        (&["192.0.2.1"], 403),
        // No address (Envoy not configured to add it): the condition cannot hold.
        (&[], 403),
        (&["not-an-address"], 403),
        // Two copies (an allow-listed client copy plus Envoy's): refused, not guessed.
        (&["10.1.2.3", "10.1.2.3"], 403),
    ];
    for &(sources, want) in cases {
        let mut headers = vec![("authorization", auth.as_str())];
        headers.extend(sources.iter().map(|s| (SOURCE, *s)));
        for h2 in [false, true] {
            let answer = h.http(h2, "GET", "/orders/1", &headers, "").await;
            assert_eq!(answer.status, want, "{sources:?} (h2: {h2}): {answer:?}");
            if want == 403 {
                assert_eq!(answer.json()["error"], "context_denied", "{sources:?}");
            }
        }
    }
    // X-Forwarded-For is not an address source with `trusted_proxy_hops: 0`.
    let headers = [
        ("authorization", auth.as_str()),
        ("x-forwarded-for", "10.1.2.3"),
        (SOURCE, "192.0.2.1"),
    ];
    assert_eq!(
        h.http(true, "GET", "/orders/1", &headers, "").await.status,
        403
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deny_is_never_a_5xx_and_an_unreadable_request_is_a_403() {
    // Shared state on a port nobody listens on from the start: the runtime revocations were
    // never read, so no request with a credential can be decided (the rate-limited route
    // could not be either).
    let dead = free_port();
    let h = Harness::start(|doc| {
        doc["state"] = serde_yaml::from_str(&format!(
            "{{backend: redis, redis_url: 'redis://127.0.0.1:{dead}/0', timeout: 100ms}}"
        ))
        .unwrap();
    })
    .await;
    let writer = bearer(&token(json!({ "scope": "orders:write" })));
    let headers = [("authorization", writer.as_str())];
    let grpc = h.grpc("POST", "/orders", &headers, "10.0.0.7").await;
    let (status, _, grpc_body) = denied(&grpc);
    assert_eq!(status, 503, "{grpc_body}");
    assert_eq!(grpc_body["error"], "state_unavailable");
    for h2 in [false, true] {
        let http = h.http(h2, "POST", "/orders", &headers, "").await;
        // Envoy reads a 5xx as the authorizer failing (an allow under failure_mode_allow).
        assert_eq!(http.status, 403, "{http:?}");
        assert_eq!(http.json(), grpc_body);
    }

    // A body over the 4 MiB limit cannot be read: an explicit deny, not a reset.
    let big = "x".repeat(4 * 1024 * 1024 + 1);
    for h2 in [false, true] {
        let http = h.http(h2, "POST", "/orders", &headers, &big).await;
        assert_eq!(http.status, 403, "{http:?}");
        assert_eq!(http.json()["error"], "internal_error", "{http:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn strip_authorization_names_the_credential_headers_to_remove() {
    let h = Harness::start(|doc| {
        doc["upstream"]["strip_authorization"] = true.into();
    })
    .await;
    let auth = bearer(&reader());
    let headers = [("authorization", auth.as_str()), (SOURCE, "10.0.0.7")];
    let http = h.http(true, "GET", "/orders/42", &headers, "").await;
    assert_eq!(http.status, 200, "{http:?}");
    let removed = http.removed();
    assert!(removed.iter().any(|n| n == "authorization"), "{removed:?}");
    assert!(removed.iter().any(|n| n == "x-api-key"), "{removed:?}");
    assert_eq!(http.header("x-portcullis-subject"), Some("alice"));
}

#[tokio::test]
async fn without_http_listen_the_http_api_is_not_served() {
    let dir = tempfile::tempdir().unwrap();
    let text = shipped_config(|doc| {
        doc["server"]["listen"] = "127.0.0.1:0".into();
        doc["server"]["admin_listen"] = "127.0.0.1:0".into();
        doc["server"]
            .as_mapping_mut()
            .unwrap()
            .remove("http_listen");
        doc["audit"]["enabled"] = false.into();
        doc["issuers"][0]["keys"]["file"] = support::jwt::dev_jwks_path()
            .to_string_lossy()
            .into_owned()
            .into();
    });
    let server = start_server(dir.path(), "portcullis.yaml", &text).await;
    assert!(server.http_addr.is_none());
    server.shutdown().await;
}

/// Envoy forwards up to 60 KiB of request headers: a request that large is decided like any
/// other (a JSON deny, counted and audited), not refused by the HTTP/2 layer before a decision.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_with_large_headers_are_decided_not_refused() {
    let h = Harness::start(|_| {}).await;
    let big = "x".repeat(40 * 1024);
    let path = format!("/orders/1?q={}", "y".repeat(8 * 1024));
    let headers = [("x-large", big.as_str()), (SOURCE, "10.0.0.7")];
    for h2 in [false, true] {
        let answer = h.http(h2, "GET", &path, &headers, "").await;
        assert_eq!(answer.status, 401, "h2: {h2}: {answer:?}");
        assert_eq!(answer.json()["error"], "credential_missing", "h2: {h2}");
    }
}

/// A request with more headers than Portcullis reads (`MAX_REQUEST_HEADERS`) is refused,
/// with the same 431 and reason on both APIs, before its headers are read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_with_too_many_headers_is_refused_the_same_on_both_apis() {
    let h = Harness::start(|_| {}).await;
    let names: Vec<String> = (0..=portcullis::grpc::wire::MAX_REQUEST_HEADERS)
        .map(|i| format!("h{i:04}"))
        .collect();
    let headers: Vec<(&str, &str)> = names.iter().map(|n| (n.as_str(), "v")).collect();
    let grpc = h.grpc("GET", "/healthz", &headers, "10.0.0.7").await;
    let (status, _, grpc_body) = denied(&grpc);
    assert_eq!(status, 431, "{grpc_body}");
    assert_eq!(grpc_body["error"], "request_header_fields_too_large");
    assert_eq!(grpc_body["request_id"], "req-1");
    // HTTP/2 and HTTP/1.1 alike (hyper's own HTTP/1 limit, 100, answered a bare 431).
    for h2 in [true, false] {
        let http = h.http(h2, "GET", "/healthz", &headers, "").await;
        assert_eq!(http.status, 431, "h2: {h2}: {http:?}");
        let body = http.json();
        assert_eq!(body["error"], "request_header_fields_too_large", "h2: {h2}");
        assert_eq!(body["request_id"], "req-1", "h2: {h2}");
    }
    // Counted, but not timed: nothing was decided (a 0 s would pull the quantiles down).
    let metrics = support::inproc::scrape_metrics(h.server.admin_addr).await;
    let reason = "reason=\"request_header_fields_too_large\"";
    let refused: f64 = metrics
        .lines()
        .filter(|l| l.starts_with("portcullis_decisions_total") && l.contains(reason))
        .filter_map(|l| l.split_whitespace().last()?.parse::<f64>().ok())
        .sum();
    assert_eq!(refused, 3.0, "{metrics}");
    assert!(
        metrics
            .lines()
            .any(|l| l == "portcullis_decision_duration_seconds_count 0"),
        "{metrics}"
    );
    // A request under the cap is decided as usual, past hyper's HTTP/1 default too.
    let fewer = &headers[..150];
    assert!(allowed(&h.grpc("GET", "/healthz", fewer, "10.0.0.7").await).is_some());
    for h2 in [true, false] {
        assert_eq!(
            h.http(h2, "GET", "/healthz", fewer, "").await.status,
            200,
            "h2: {h2}"
        );
    }
}
