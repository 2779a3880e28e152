//! End to end through a real Envoy on the SHIPPED `envoy/envoy-http.yaml` (Envoy's HTTP
//! ext_authz API; only its ports rewritten), the real `portcullis` binary serving
//! `server.http_listen`, a loopback JWKS server and an upstream that records what it got.
//! Every case is a real HTTP request to Envoy, over HTTP/1.1 and h2c.
//!
//! The gRPC wiring (envoy/envoy.yaml) has the same cases and more in tests/e2e_envoy.rs;
//! this file covers what differs on the HTTP API: identity headers through
//! `allowed_upstream_headers` and `x-envoy-auth-headers-to-remove`, the client address from
//! Envoy's `headers_to_add`, deny answers through `allowed_client_headers`, the quota left
//! on an allow through `allowed_client_headers_on_success`, and fail-closed.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::time::Duration;

use serde_json::{Value, json};
use support::inproc::{IDENTITY_HEADERS, e2e_config};
use support::jwks::JwksServer;
use support::jwt::{
    E2E_ISSUER as ISSUER, Key, dpop_proof, dpop_proof_key, dpop_proof_with_nonce, dpop_token,
};
use support::stack::{
    Answer, Envoy, Portcullis, Upstream, eventually, h1_client, h2c_client, send_to,
};
use support::{free_port, raw_http};

const SOURCE: &str = "x-portcullis-source-address";

/// A fresh token (its own `jti`) for `alice` signed by key A; `extra` merged over it.
fn mint(extra: Value) -> String {
    Key::A.mint("e2e-http", extra)
}

fn reader() -> String {
    mint(json!({ "scope": "orders:read" }))
}

struct Stack {
    _jwks: JwksServer,
    upstream: Upstream,
    portcullis: Option<Portcullis>,
    envoy: Envoy,
    h1: reqwest::Client,
    h2c: reqwest::Client,
    _dir: tempfile::TempDir,
}

impl Stack {
    /// The stack on the shipped configs; `edit` changes the Portcullis config.
    async fn start(edit: impl FnOnce(&mut serde_yaml::Value)) -> Stack {
        let dir = tempfile::tempdir().unwrap();
        let jwks = JwksServer::start(&[Key::A]).await;
        let upstream = Upstream::start().await;
        let http_port = free_port();
        let url = jwks.url();
        let portcullis = Portcullis::start(dir.path(), "portcullis", |grpc, admin| {
            e2e_config(grpc, admin, &url, |doc| {
                doc["server"]["http_listen"] = format!("127.0.0.1:{http_port}").into();
                edit(doc);
            })
        });
        let envoy = shipped_envoy(dir.path(), http_port, upstream.port);
        Stack {
            _jwks: jwks,
            upstream,
            portcullis: Some(portcullis),
            envoy,
            h1: h1_client(),
            h2c: h2c_client(),
            _dir: dir,
        }
    }

    /// Sends `method path` through Envoy (h2c when `h2`) with `headers`.
    async fn send(&self, h2: bool, method: &str, path: &str, headers: &[(&str, &str)]) -> Answer {
        let client = if h2 { &self.h2c } else { &self.h1 };
        send_to(client, self.envoy.addr, h2, method, path, headers)
            .await
            .unwrap_or_else(|e| panic!("{method} {path}: {e}\n{}", self.logs()))
    }

    fn logs(&self) -> String {
        let p = self.portcullis.as_ref().map(Portcullis::logs);
        format!("{}\n{}", self.envoy.process.logs(), p.unwrap_or_default())
    }

    /// The audit lines Portcullis wrote so far (batched: polled until `n` are there).
    async fn audit(&self, n: usize) -> Vec<Value> {
        let p = self.portcullis.as_ref().unwrap();
        let mut lines = Vec::new();
        for _ in 0..100 {
            lines = p
                .stdout()
                .lines()
                .filter_map(|l| serde_json::from_str::<Value>(l).ok())
                .filter(|v| v["kind"] == "decision")
                .collect();
            if lines.len() >= n {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        lines
    }
}

/// envoy/envoy-http.yaml with its authorizer port (9193) pointed at `authz_port`.
fn shipped_envoy(dir: &std::path::Path, authz_port: u16, upstream: u16) -> Envoy {
    Envoy::start_shipped(
        dir,
        "envoy/envoy-http.yaml",
        10000,
        authz_port,
        upstream,
        |text| {
            assert!(text.contains("port_value: 9193"), "authorizer port moved");
            text.replace("port_value: 9193", "port_value: 9191")
        },
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identity_headers_reach_the_upstream_and_spoofed_copies_never_do() {
    let stack = Stack::start(|_| {}).await;
    let spoofs: Vec<(&str, &str)> = IDENTITY_HEADERS
        .iter()
        .map(|h| (*h, "mallory"))
        .chain([(SOURCE, "10.9.9.9")])
        .collect();
    for h2 in [false, true] {
        let ctx = format!("h2: {h2}");
        // Allowed: each identity header carries Portcullis's value, once.
        let before = stack.upstream.count();
        let auth = format!("Bearer {}", reader());
        let mut headers = spoofs.clone();
        headers.push(("authorization", &auth));
        let answer = stack.send(h2, "GET", "/orders/42", &headers).await;
        assert_eq!(answer.status, 200, "{ctx}: {answer:?}\n{}", stack.logs());
        assert!(answer.answered_by_upstream());
        let seen = &stack.upstream.since(before)[0];
        assert_eq!(seen.path, "/orders/42");
        assert_eq!(seen.values("x-portcullis-subject"), ["alice"], "{ctx}");
        assert_eq!(seen.values("x-portcullis-issuer"), [ISSUER], "{ctx}");
        assert_eq!(seen.values("x-portcullis-scopes"), ["orders:read"], "{ctx}");
        // Envoy's source header goes to Portcullis only; the client's copy is removed.
        assert!(seen.values(SOURCE).is_empty(), "{ctx}: {:?}", seen.headers);
        assert!(seen.values("x-envoy-auth-headers-to-remove").is_empty());

        // Allowed, token without `scope`: the header Portcullis cannot set is removed.
        let before = stack.upstream.count();
        let auth = format!("Bearer {}", mint(json!({ "sub": "bob" })));
        let mut headers = spoofs.clone();
        headers.push(("authorization", &auth));
        let answer = stack.send(h2, "GET", "/users/bob/profile", &headers).await;
        assert_eq!(answer.status, 200, "{ctx}: {answer:?}");
        let seen = &stack.upstream.since(before)[0];
        assert_eq!(seen.values("x-portcullis-subject"), ["bob"], "{ctx}");
        assert!(seen.values("x-portcullis-scopes").is_empty(), "{ctx}");

        // Public route, no identity: every identity header is removed.
        let before = stack.upstream.count();
        let answer = stack.send(h2, "GET", "/healthz", &spoofs).await;
        assert_eq!(answer.status, 200, "{ctx}: {answer:?}");
        let seen = &stack.upstream.since(before)[0];
        for name in IDENTITY_HEADERS.iter().chain(&[SOURCE]) {
            assert!(seen.values(name).is_empty(), "{ctx}: spoofed {name} passed");
        }
    }

    // Portcullis saw the TCP peer Envoy reported, never the client's header.
    let lines = stack.audit(6).await;
    assert_eq!(lines.len(), 6, "{lines:?}");
    for line in &lines {
        assert_eq!(line["client_ip"], "127.0.0.1", "{line}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_reach_the_client_as_portcullis_wrote_them() {
    // One POST /orders a minute per subject, so the second is over the limit.
    let stack = Stack::start(|doc| {
        doc["rate_limits"][1]["requests"] = 1.into();
        doc["rate_limits"][1]["burst"] = 1.into();
    })
    .await;
    let reader = reader();
    for h2 in [false, true] {
        let ctx = format!("h2: {h2}");
        let answer = stack.send(h2, "GET", "/orders/1", &[]).await;
        assert_eq!(answer.status, 401, "{ctx}: {answer:?}");
        assert!(!answer.answered_by_upstream());
        assert_eq!(
            answer.header("www-authenticate"),
            Some("Bearer realm=\"portcullis\", ApiKey realm=\"portcullis\""),
            "{ctx}: no credential, so no error code (RFC 6750 3.1)"
        );
        assert_eq!(answer.error(), "credential_missing");
        assert_eq!(answer.header("content-type"), Some("application/json"));
        assert!(
            answer.json()["request_id"]
                .as_str()
                .is_some_and(|s| !s.is_empty())
        );

        let auth = format!("Bearer {reader}");
        let answer = stack
            .send(h2, "POST", "/orders", &[("authorization", &auth)])
            .await;
        assert_eq!(answer.status, 403, "{ctx}: {answer:?}");
        assert_eq!(answer.error(), "insufficient_scope");
        assert!(!answer.body.contains(&reader), "token echoed");
        let challenge = answer.header("www-authenticate").unwrap();
        assert!(challenge.contains("insufficient_scope"), "{challenge}");
    }

    // Rate limit: the 429 carries its Retry-After and RateLimit headers to the client.
    let writer = format!("Bearer {}", mint(json!({ "scope": "orders:write" })));
    let headers = [("authorization", writer.as_str())];
    let first = stack.send(true, "POST", "/orders", &headers).await;
    assert_eq!(first.status, 200, "{first:?}");
    // The allow tells the client what is left (`allowed_client_headers_on_success`).
    assert_eq!(
        first.header("ratelimit-policy"),
        Some("\"per-subject\";q=1;w=60"),
        "{first:?}"
    );
    assert!(
        first
            .header("ratelimit")
            .is_some_and(|v| v.starts_with("\"per-subject\";r=0;t=")),
        "{first:?}"
    );
    let second = stack.send(false, "POST", "/orders", &headers).await;
    assert_eq!(second.status, 429, "{second:?}");
    assert_eq!(second.error(), "rate_limited");
    assert!(second.header("retry-after").is_some(), "{second:?}");
    assert!(second.header("ratelimit").is_some(), "{second:?}");
    assert!(second.header("ratelimit-policy").is_some(), "{second:?}");
    assert!(!second.answered_by_upstream());

    // A path that could mean `/admin` to someone is refused or routed as Envoy normalized
    // it; it never reaches the upstream.
    let before = stack.upstream.count();
    for path in [
        "/healthz/../admin/users",
        "/admin;/users",
        "//admin/users",
        "/%61dmin/users",
    ] {
        let response = raw_http(
            stack.envoy.addr,
            &format!("GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n"),
        )
        .unwrap();
        assert!(
            [400, 401, 403, 404].contains(&response.status),
            "{path}: {response:?}"
        );
    }
    assert_eq!(
        stack.upstream.count(),
        before,
        "a path trick reached the upstream"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn network_conditions_use_the_address_envoy_saw() {
    // The reader grant holds only from 10.0.0.0/8: the test client is 127.0.0.1.
    let stack = Stack::start(|doc| {
        doc["routes"][1]["rules"][0]["source"] =
            serde_yaml::from_str("{cidrs: [10.0.0.0/8]}").unwrap();
        doc["routes"][2]["rules"][0]["source"] =
            serde_yaml::from_str("{cidrs: [127.0.0.0/8]}").unwrap();
    })
    .await;
    let auth = format!("Bearer {}", reader());
    let writer = format!("Bearer {}", mint(json!({ "scope": "orders:write" })));
    for h2 in [false, true] {
        let spoofed = [
            ("authorization", auth.as_str()),
            (SOURCE, "10.1.1.1"),
            ("x-forwarded-for", "10.1.1.1"),
        ];
        let answer = stack.send(h2, "GET", "/orders/1", &spoofed).await;
        assert_eq!(answer.status, 403, "h2: {h2}: {answer:?}");
        assert_eq!(answer.error(), "context_denied");
        let answer = stack
            .send(h2, "POST", "/orders", &[("authorization", &writer)])
            .await;
        assert_eq!(answer.status, 200, "h2: {h2}: {answer:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fails_closed_when_portcullis_is_down_and_recovers_after_restart() {
    let mut stack = Stack::start(|_| {}).await;
    let auth = format!("Bearer {}", reader());
    let headers = [("authorization", auth.as_str())];
    assert_eq!(
        stack.send(true, "GET", "/orders/1", &headers).await.status,
        200
    );

    stack.portcullis.as_mut().unwrap().stop();
    let before = stack.upstream.count();
    for h2 in [false, true] {
        for (path, headers) in [("/orders/1", &headers[..]), ("/healthz", &[][..])] {
            let answer = stack.send(h2, "GET", path, headers).await;
            assert_eq!(answer.status, 403, "{path} while down: {answer:?}");
            assert!(!answer.answered_by_upstream());
        }
    }
    assert_eq!(
        stack.upstream.count(),
        before,
        "nothing reached the upstream"
    );

    stack.portcullis.as_mut().unwrap().restart();
    {
        let stack = &stack;
        let headers = &headers;
        eventually(
            Duration::from_secs(10),
            "allowed after restart",
            || async move { stack.send(true, "GET", "/orders/1", headers).await.status == 200 },
        )
        .await;
    }
    stack.envoy.process.assert_running();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dpop_proofs_bind_to_the_url_envoy_received() {
    // DPoP's `htu` needs the request's scheme: on this API it is Envoy's x-forwarded-proto.
    let stack = Stack::start(|doc| {
        doc["issuers"][0]["dpop"] = "optional".into();
    })
    .await;
    let (jwk, jkt) = dpop_proof_key();
    let token = dpop_token(&jkt);
    let auth = format!("DPoP {token}");
    let htu = format!("http://{}/orders/42", stack.envoy.addr);
    for h2 in [false, true] {
        let proof = dpop_proof(&jwk, &token, &htu);
        let headers = [("authorization", auth.as_str()), ("dpop", proof.as_str())];
        let first = stack.send(h2, "GET", "/orders/42", &headers).await;
        assert_eq!(first.status, 200, "h2: {h2}: {first:?}\n{}", stack.logs());
        assert!(first.answered_by_upstream());
        // The same proof again is a replay.
        let replay = stack.send(h2, "GET", "/orders/42", &headers).await;
        assert_eq!(replay.status, 401, "{replay:?}");
        assert_eq!(replay.error(), "invalid_dpop_proof");
        // A proof for another scheme does not match the request.
        let https = dpop_proof(&jwk, &token, &htu.replacen("http:", "https:", 1));
        let headers = [("authorization", auth.as_str()), ("dpop", https.as_str())];
        let other = stack.send(h2, "GET", "/orders/42", &headers).await;
        assert_eq!(other.status, 401, "{other:?}");
        assert_eq!(other.error(), "invalid_dpop_proof");
    }
}

/// Server-provided DPoP nonces on this API: Envoy passes `DPoP-Nonce` to the client on the
/// `use_dpop_nonce` deny (`allowed_client_headers`) and on an allow that renews it
/// (`allowed_client_headers_on_success`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dpop_nonces_reach_the_client_on_denies_and_allows() {
    const LIFETIME: i64 = 5;
    let stack = Stack::start(|doc| {
        doc["issuers"][0]["dpop"] = "required".into();
        doc["issuers"][0]["dpop_nonce"] = serde_yaml::from_str("{ lifetime: 5s }").unwrap();
    })
    .await;
    let (jwk, jkt) = dpop_proof_key();
    let token = dpop_token(&jkt);
    let auth = format!("DPoP {token}");
    let htu = format!("http://{}/orders/42", stack.envoy.addr);
    let send = |nonce: Option<String>| {
        let proof = dpop_proof_with_nonce(&jwk, &token, &htu, nonce.as_deref());
        let (stack, auth) = (&stack, &auth);
        async move {
            let headers = [("authorization", auth.as_str()), ("dpop", proof.as_str())];
            stack.send(false, "GET", "/orders/42", &headers).await
        }
    };
    let period = |t: i64| t / LIFETIME;
    // Start early in a period, so the nonce is issued in the period read below: issued at
    // the end of one and read as the next, it was two periods old after the wait (a 401
    // that failed CI on a loaded machine).
    while support::jwt::now() % LIFETIME > LIFETIME - 3 {
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let issued = period(support::jwt::now());
    let first = send(None).await;
    assert_eq!(first.status, 401, "{first:?}\n{}", stack.logs());
    assert_eq!(first.error(), "use_dpop_nonce");
    let nonce = first
        .header("dpop-nonce")
        .expect("Envoy passes DPoP-Nonce on the deny")
        .to_string();
    let retry = send(Some(nonce.clone())).await;
    assert_eq!(retry.status, 200, "{retry:?}\n{}", stack.logs());
    assert!(retry.answered_by_upstream());

    assert_eq!(
        period(support::jwt::now()),
        issued,
        "the exchange outlasted the margin; the test cannot tell the nonce's period"
    );
    while period(support::jwt::now()) == issued {
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    let late = send(Some(nonce.clone())).await;
    assert_eq!(late.status, 200, "{late:?}");
    let next = late
        .header("dpop-nonce")
        .expect("Envoy passes DPoP-Nonce on the allow");
    assert_ne!(next, nonce);
}
