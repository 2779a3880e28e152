//! End to end through a real Envoy: the SHIPPED `envoy/envoy.yaml` (only its ports rewritten),
//! the real `portcullis` binary, a loopback JWKS server and an upstream that records exactly
//! what it received. Every case is a real HTTP request to Envoy, over HTTP/1.1 and h2c where
//! the client allows it; path tricks use a raw TCP client so nothing normalizes them first.
//!
//! Each test starts its own stack (processes are killed when the test ends, pass or fail), so
//! tests run in parallel and never share mutable state.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde_json::{Value, json};
use support::inproc::{IDENTITY_HEADERS, e2e_config};
use support::jwks::JwksServer;
use support::jwt::{E2E_AUDIENCE as AUDIENCE, E2E_ISSUER as ISSUER, Key, merged, now, serial};
use support::stack::{
    Answer, Envoy, Portcullis, Upstream, eventually, h1_client, h2c_client, send_to,
};
use support::{free_port, raw_http};

// ---------------------------------------------------------------------------------------
// Keys and tokens
// ---------------------------------------------------------------------------------------

/// A fresh token (its own `jti`, so never a token-cache hit) signed by `key`; `extra`
/// claims are merged over the defaults.
fn mint(key: Key, extra: Value) -> String {
    key.sign(&merged(
        json!({
            "iss": ISSUER,
            "aud": AUDIENCE,
            "sub": "alice",
            "iat": now(),
            "nbf": now(),
            "exp": now() + 600,
            "jti": format!("e2e-{}-{}", std::process::id(), serial()),
        }),
        extra,
    ))
}

fn reader_token(key: Key) -> String {
    mint(key, json!({ "scope": "orders:read" }))
}

// ---------------------------------------------------------------------------------------
// In-test servers: JWKS and the recording upstream
// ---------------------------------------------------------------------------------------

// ---------------------------------------------------------------------------------------
// Portcullis and Envoy processes
// ---------------------------------------------------------------------------------------

/// The shipped sample policy with the test issuer (`e2e_config`).
fn portcullis_config(grpc: u16, admin: u16, jwks_url: &str) -> String {
    e2e_config(grpc, admin, jwks_url, |_| {})
}

/// One test's world: JWKS server, upstream, Portcullis (optional) and Envoy.
struct Stack {
    jwks: JwksServer,
    upstream: Upstream,
    portcullis: Option<Portcullis>,
    envoy: Envoy,
    h1: reqwest::Client,
    h2c: reqwest::Client,
    _dir: tempfile::TempDir,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Proto {
    Http1,
    H2c,
}

const PROTOCOLS: [Proto; 2] = [Proto::Http1, Proto::H2c];

impl Stack {
    async fn start(keys: &[Key]) -> Stack {
        let dir = tempfile::tempdir().unwrap();
        let jwks = JwksServer::start(keys).await;
        let upstream = Upstream::start().await;
        let portcullis = Portcullis::start(dir.path(), "portcullis", |grpc, admin| {
            portcullis_config(grpc, admin, &jwks.url())
        });
        let envoy = Envoy::start(dir.path(), portcullis.grpc, upstream.port);
        Stack::assemble(dir, jwks, upstream, Some(portcullis), envoy)
    }

    /// Envoy pointed at a port nobody listens on: Portcullis is unreachable.
    async fn start_without_portcullis() -> Stack {
        let dir = tempfile::tempdir().unwrap();
        let jwks = JwksServer::start(&[Key::A]).await;
        let upstream = Upstream::start().await;
        let envoy = Envoy::start(dir.path(), free_port(), upstream.port);
        Stack::assemble(dir, jwks, upstream, None, envoy)
    }

    fn assemble(
        dir: tempfile::TempDir,
        jwks: JwksServer,
        upstream: Upstream,
        portcullis: Option<Portcullis>,
        envoy: Envoy,
    ) -> Stack {
        let h1 = h1_client();
        let h2c = h2c_client();
        Stack {
            jwks,
            upstream,
            portcullis,
            envoy,
            h1,
            h2c,
            _dir: dir,
        }
    }

    fn portcullis(&mut self) -> &mut Portcullis {
        self.portcullis.as_mut().unwrap()
    }

    /// Sends `method path` through Envoy with `headers` (and a bearer token when given).
    async fn send(
        &self,
        proto: Proto,
        method: &str,
        path: &str,
        token: Option<&str>,
        headers: &[(&str, &str)],
    ) -> Answer {
        let client = match proto {
            Proto::Http1 => &self.h1,
            Proto::H2c => &self.h2c,
        };
        let bearer = token.map(|t| format!("Bearer {t}"));
        let mut all = headers.to_vec();
        if let Some(bearer) = &bearer {
            all.push(("authorization", bearer));
        }
        send_to(
            client,
            self.envoy.addr,
            proto == Proto::H2c,
            method,
            path,
            &all,
        )
        .await
        .unwrap_or_else(|e| panic!("{proto:?} {method} {path}: {e}\n{}", self.logs()))
    }

    async fn get(&self, proto: Proto, path: &str, token: Option<&str>) -> Answer {
        self.send(proto, "GET", path, token, &[]).await
    }

    /// Polls (see `eventually`) until `GET /orders/1` with a fresh reader token signed by
    /// `key` answers `status`: key refresh and staleness happen on Portcullis' schedule.
    async fn eventually_status(
        &self,
        timeout: Duration,
        what: &str,
        proto: Proto,
        key: Key,
        status: u16,
    ) -> Duration {
        eventually(timeout, what, || async move {
            self.get(proto, "/orders/1", Some(&reader_token(key)))
                .await
                .status
                == status
        })
        .await
    }

    fn logs(&self) -> String {
        let portcullis = self
            .portcullis
            .as_ref()
            .map(Portcullis::logs)
            .unwrap_or_default();
        format!("{}\n{portcullis}", self.envoy.process.logs())
    }

    async fn metrics(&self) -> String {
        let url = format!(
            "http://{}/metrics",
            self.portcullis.as_ref().unwrap().admin_addr()
        );
        self.h1.get(url).send().await.unwrap().text().await.unwrap()
    }
}

/// A denial Portcullis made (not Envoy, not the upstream): the status, a Bearer challenge with
/// the OAuth `error` (RFC 6750), and the JSON body whose `error` is Portcullis' reason code.
/// `error` is the challenge's RFC 6750 error code; `None` expects the bare challenge that a
/// request with no credential at all gets (RFC 6750 3.1).
fn assert_denied_by_portcullis(answer: &Answer, status: u16, error: Option<&str>, context: &str) {
    assert_eq!(answer.status, status, "{context}: {answer:?}");
    assert!(
        !answer.answered_by_upstream(),
        "{context}: answered by the upstream"
    );
    let challenge = answer
        .header("www-authenticate")
        .unwrap_or_else(|| panic!("{context}: no WWW-Authenticate: {answer:?}"));
    match error {
        Some(error) => assert!(
            challenge.starts_with("Bearer ") && challenge.contains(&format!("error=\"{error}\"")),
            "{context}: challenge {challenge:?}"
        ),
        None => assert_eq!(
            challenge, "Bearer realm=\"portcullis\", ApiKey realm=\"portcullis\"",
            "{context}: no credential, so no error code"
        ),
    }
    let body = answer.json();
    assert!(
        body["error"].as_str().is_some_and(|s| !s.is_empty()),
        "{context}: {body}"
    );
    assert!(
        body["reason"].as_str().is_some_and(|s| !s.is_empty()),
        "{context}: {body}"
    );
    assert!(
        body["request_id"].as_str().is_some_and(|s| !s.is_empty()),
        "{context}: {body}"
    );
}

// ---------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn allowed_request_reaches_upstream_with_identity_headers_over_http1_and_h2c() {
    let stack = Stack::start(&[Key::A]).await;
    for proto in PROTOCOLS {
        let before = stack.upstream.count();
        let token = reader_token(Key::A);
        let answer = stack.get(proto, "/orders/42", Some(&token)).await;
        assert_eq!(
            answer.status,
            200,
            "{proto:?}: {answer:?}\n{}",
            stack.logs()
        );
        assert!(answer.answered_by_upstream());
        let seen = stack.upstream.since(before);
        assert_eq!(seen.len(), 1, "{proto:?}: exactly one upstream request");
        let seen = &seen[0];
        assert_eq!(seen.method, "GET");
        assert_eq!(seen.path, "/orders/42");
        assert_eq!(seen.values("x-portcullis-subject"), ["alice"], "{proto:?}");
        assert_eq!(seen.values("x-portcullis-issuer"), [ISSUER], "{proto:?}");
        assert_eq!(
            seen.values("x-portcullis-scopes"),
            ["orders:read"],
            "{proto:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_sent_identity_headers_never_reach_the_upstream() {
    let stack = Stack::start(&[Key::A]).await;
    let spoofs: Vec<(&str, &str)> = IDENTITY_HEADERS
        .iter()
        .flat_map(|h| [(*h, "mallory"), (*h, "admin orders:write")])
        .collect();
    for proto in PROTOCOLS {
        // Allowed request: each header carries Portcullis' value, once.
        let before = stack.upstream.count();
        let token = reader_token(Key::A);
        let answer = stack
            .send(proto, "GET", "/orders/7", Some(&token), &spoofs)
            .await;
        assert_eq!(answer.status, 200, "{proto:?}: {answer:?}");
        let seen = stack.upstream.since(before);
        assert_eq!(
            seen[0].values("x-portcullis-subject"),
            ["alice"],
            "{proto:?}"
        );
        assert_eq!(seen[0].values("x-portcullis-issuer"), [ISSUER], "{proto:?}");
        assert_eq!(seen[0].values("x-portcullis-scopes"), ["orders:read"]);

        // Allowed request whose token has no `scope` claim: the header Portcullis cannot set
        // is removed, not passed through from the client.
        let before = stack.upstream.count();
        let token = mint(Key::A, json!({ "sub": "bob" }));
        let answer = stack
            .send(proto, "GET", "/users/bob/profile", Some(&token), &spoofs)
            .await;
        assert_eq!(answer.status, 200, "{proto:?}: {answer:?}");
        let seen = stack.upstream.since(before);
        assert_eq!(seen[0].values("x-portcullis-subject"), ["bob"]);
        assert!(
            seen[0].values("x-portcullis-scopes").is_empty(),
            "{proto:?}: spoofed scopes reached the upstream: {:?}",
            seen[0].headers
        );

        // A trusted posture header is stripped by Envoy before ext_authz and never reaches
        // the upstream either (envoy.yaml `early_header_mutation_extensions`).
        let before = stack.upstream.count();
        let posture = [("x-device-posture", "managed")];
        let answer = stack.send(proto, "GET", "/healthz", None, &posture).await;
        assert_eq!(answer.status, 200, "{proto:?}: {answer:?}");
        let seen = stack.upstream.since(before);
        assert!(
            seen[0].values("x-device-posture").is_empty(),
            "{proto:?}: a client-set posture header reached the upstream: {:?}",
            seen[0].headers
        );

        // Method, path and host overrides are stripped before ext_authz too: a GET of
        // /orders/7 granted as such must not become a DELETE, a request for /admin or one
        // for another host in an upstream framework that honours them.
        let before = stack.upstream.count();
        let overrides = [
            ("x-http-method-override", "DELETE"),
            ("x-http-method", "DELETE"),
            ("x-method-override", "DELETE"),
            ("x-original-url", "/admin/users"),
            ("x-rewrite-url", "/admin/users"),
            ("x-original-method", "DELETE"),
            ("x-forwarded-method", "DELETE"),
            ("x-forwarded-uri", "/admin/users"),
            ("x-real-ip", "10.0.0.1"),
            ("x-forwarded-host", "admin.internal"),
            ("forwarded", "host=admin.internal;proto=https"),
            ("x-forwarded-prefix", "/admin"),
            ("x-forwarded-port", "8443"),
            ("x-portcullis-source-address", "10.0.0.1"),
            ("x-override-method", "DELETE"),
            ("x-original-uri", "/admin/users"),
            ("x-forwarded-path", "/admin/users"),
            ("x-forwarded-scheme", "https"),
            ("x-forwarded-ssl", "on"),
            ("x-original-host", "admin.internal"),
            ("x-host", "admin.internal"),
            ("x-forwarded-server", "admin.internal"),
            ("true-client-ip", "10.0.0.1"),
            ("x-client-ip", "10.0.0.1"),
            ("cf-connecting-ip", "10.0.0.1"),
            ("fastly-client-ip", "10.0.0.1"),
            ("x-cluster-client-ip", "10.0.0.1"),
        ];
        let answer = stack
            .send(
                proto,
                "GET",
                "/orders/7",
                Some(&reader_token(Key::A)),
                &overrides,
            )
            .await;
        assert_eq!(answer.status, 200, "{proto:?}: {answer:?}");
        let seen = stack.upstream.since(before);
        assert_eq!(
            (seen[0].method.as_str(), seen[0].path.as_str()),
            ("GET", "/orders/7"),
            "{proto:?}"
        );
        for (name, _) in overrides {
            assert!(
                seen[0].values(name).is_empty(),
                "{proto:?}: {name} reached the upstream: {:?}",
                seen[0].headers
            );
        }

        // Public route, no identity at all: every identity header is removed.
        let before = stack.upstream.count();
        let answer = stack.send(proto, "GET", "/healthz", None, &spoofs).await;
        assert_eq!(answer.status, 200, "{proto:?}: {answer:?}");
        let seen = stack.upstream.since(before);
        for name in IDENTITY_HEADERS {
            assert!(
                seen[0].values(name).is_empty(),
                "{proto:?}: spoofed {name} reached the upstream on a public route"
            );
        }
    }

    // The underscore spelling (`x_portcullis_subject`), which some frameworks fold into the
    // dash one, is refused by Envoy before anything else happens.
    let before = stack.upstream.count();
    let response = raw_http(
        stack.envoy.addr,
        "GET /healthz HTTP/1.1\r\nHost: localhost\r\nx_portcullis_subject: mallory\r\n\r\n",
    )
    .unwrap();
    assert_eq!(response.status, 400, "{response:?}");
    assert_eq!(stack.upstream.count(), before);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_token_is_401_with_challenge_and_wrong_scope_is_403() {
    let stack = Stack::start(&[Key::A]).await;
    for proto in PROTOCOLS {
        let answer = stack.get(proto, "/orders/1", None).await;
        assert_denied_by_portcullis(&answer, 401, None, &format!("{proto:?} none"));
        assert_eq!(answer.json()["error"].as_str(), Some("credential_missing"));

        let garbage = stack.get(proto, "/orders/1", Some("not.a.jwt")).await;
        assert_denied_by_portcullis(
            &garbage,
            401,
            Some("invalid_token"),
            &format!("{proto:?} bad"),
        );
        assert!(!garbage.body.contains("not.a.jwt"), "token echoed back");

        // A valid token without `orders:write` may not POST /orders.
        let token = reader_token(Key::A);
        let answer = stack
            .send(proto, "POST", "/orders", Some(&token), &[])
            .await;
        assert_denied_by_portcullis(
            &answer,
            403,
            Some("insufficient_scope"),
            &format!("{proto:?} scope"),
        );
        assert!(!answer.body.contains(&token), "token echoed back");
        assert_eq!(answer.json()["error"].as_str(), Some("insufficient_scope"));

        // And the right scope may.
        let writer = mint(Key::A, json!({ "scope": "orders:write" }));
        let answer = stack
            .send(proto, "POST", "/orders", Some(&writer), &[])
            .await;
        assert_eq!(answer.status, 200, "{proto:?}: {answer:?}");
    }
    assert_eq!(
        stack.upstream.count(),
        2,
        "only the two allowed POSTs may reach the upstream"
    );
}

/// Requests whose path could mean `/admin/...` to someone along the way (Envoy, Portcullis, or
/// an upstream framework: Tomcat/Spring treat `..;` as `..`, some decode `%2F` or `\\`). Sent
/// without a token and with a token that has no admin role but may use `/tenants/acme/**`
/// and `/orders/{id}`, byte for byte over HTTP/1.1 (no client-side normalization).
const PATH_TRICKS: &[&str] = &[
    "//admin/users",
    "///admin/users",
    "/healthz/../admin/users",
    "/healthz/./../admin/users",
    "/./admin/users",
    "/healthz/%2e%2e/admin/users",
    "/healthz/%2E%2E/admin/users",
    "/admin%2Fusers",
    "/admin%2fusers",
    "/healthz%2F..%2Fadmin%2Fusers",
    "/healthz%2f..%2fadmin",
    "/healthz%5C..%5Cadmin",
    "/healthz%5c..%5cadmin",
    "/healthz\\..\\admin",
    "/healthz%252F..%252Fadmin",
    "/admin;/users",
    "/admin;x=y/users",
    "/healthz;/../admin/users",
    "/healthz/..;/admin/users",
    "/admin/users#x",
    "/healthz#/../admin/users",
    "/admin/users?x=/healthz",
    "/admin?/../healthz",
    "/healthz%3F/../admin/users",
    "/healthz%23/../admin/users",
    "/ADMIN/users",
    "/Admin/users",
    "/%61dmin/users",
    "/admin%00/users",
    "/admin/users%00",
    "/admin/ users",
    "http://localhost/admin/users",
    "*",
    // From inside a route the token may use (`/tenants/acme/**`): a tail that climbs out.
    "/tenants/acme/../../admin/users",
    "/tenants/acme/%2e%2e/%2e%2e/admin/users",
    "/tenants/acme/.%2e/.%2e/admin/users",
    "/tenants/acme//..//..//admin/users",
    "/tenants/acme/..%2F..%2Fadmin/users",
    "/tenants/acme/..%5C..%5Cadmin/users",
    "/tenants/acme/..\\..\\admin/users",
    "/tenants/acme/..;/..;/admin/users",
    "/tenants/acme/x;/../../../admin/users",
    "/tenants/acme/%2e%2e%3b/%2e%2e%3b/admin/users",
    "/tenants/acme/..%00/..%00/admin/users",
];

/// The most lenient reading an upstream framework might give a path: percent-decoding (twice,
/// for double encoding), `\\` as `/`, `;` parameters dropped from segments (Tomcat, Spring),
/// NULs dropped, dot segments resolved, slashes merged, lower-cased. If even this reading of
/// what the upstream received is not `/admin...`, no upstream serves the admin route for it.
fn lenient_resolve(path: &str) -> String {
    let path = path.split(['?', '#']).next().unwrap_or("");
    let once = percent_encoding::percent_decode_str(path).decode_utf8_lossy();
    let twice = percent_encoding::percent_decode_str(&once).decode_utf8_lossy();
    let cleaned = twice.replace('\\', "/").replace('\0', "");
    let mut segments: Vec<String> = Vec::new();
    for segment in cleaned.split('/') {
        let segment = segment.split(';').next().unwrap_or("").trim();
        match segment {
            "" | "." => {}
            ".." => {
                segments.pop();
            }
            s => segments.push(s.to_ascii_lowercase()),
        }
    }
    format!("/{}", segments.join("/"))
}

#[test]
fn lenient_resolve_reads_paths_like_the_most_forgiving_upstream() {
    for (raw, want) in [
        ("/tenants/acme/..;/..;/admin/users", "/admin/users"),
        ("/tenants/acme/%2e%2e%2f%2e%2e/ADMIN", "/admin"),
        ("/a/%252e%252e/admin", "/admin"),
        ("/a\\..\\admin?x=1", "/admin"),
        ("/tenants/acme/admin/users", "/tenants/acme/admin/users"),
        ("//healthz", "/healthz"),
    ] {
        assert_eq!(lenient_resolve(raw), want, "{raw}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn path_tricks_never_reach_a_protected_upstream_route() {
    let stack = Stack::start(&[Key::A]).await;

    // Control: an admin token does reach /admin/users, so the denials below are decisions,
    // not a missing route.
    let admin = mint(Key::A, json!({ "roles": ["admin"] }));
    let answer = stack.get(Proto::Http1, "/admin/users", Some(&admin)).await;
    assert_eq!(answer.status, 200, "{answer:?}\n{}", stack.logs());
    assert_eq!(stack.upstream.count(), 1);

    let reader = mint(
        Key::A,
        json!({ "scope": "orders:read", "tenants": ["acme"] }),
    );
    // Control: that token does reach its tenant, so a trick starting there starts allowed.
    let answer = stack
        .get(Proto::Http1, "/tenants/acme/invoices", Some(&reader))
        .await;
    assert_eq!(answer.status, 200, "{answer:?}");
    assert_eq!(stack.upstream.count(), 2);

    for path in PATH_TRICKS {
        for token in [None, Some(reader.as_str())] {
            let before = stack.upstream.count();
            let auth = token
                .map(|t| format!("Authorization: Bearer {t}\r\n"))
                .unwrap_or_default();
            let request = format!("GET {path} HTTP/1.1\r\nHost: localhost\r\n{auth}\r\n");
            let context = format!("GET {path} (token: {})", token.is_some());
            let response = match raw_http(stack.envoy.addr, &request) {
                Ok(r) => r,
                // Envoy may close the connection on a request line it refuses to parse.
                Err(e) => {
                    assert_eq!(stack.upstream.count(), before, "{context}: {e}");
                    continue;
                }
            };
            let seen = stack.upstream.since(before);
            for s in &seen {
                let resolved = lenient_resolve(&s.path);
                assert!(
                    !resolved.starts_with("/admin"),
                    "{context}: the upstream received {:?}, which a lenient framework serves as \
                     {resolved:?} (status {})",
                    s.path,
                    response.status
                );
            }
            if (200..300).contains(&response.status) {
                // A success must be the upstream answering a request it received.
                assert!(
                    seen.len() == 1,
                    "{context}: {} with upstream seeing {seen:?}",
                    response.status
                );
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envoy_rejects_encoded_slashes_fragments_and_underscore_headers_before_authorization() {
    // No Portcullis at all: a 400 here comes from Envoy's own path hygiene, not from a
    // decision (a request that got as far as ext_authz would be a 403).
    let stack = Stack::start_without_portcullis().await;
    for path in [
        "/admin%2Fusers",
        "/admin%2fusers",
        "/healthz%2F..%2Fadmin",
        "/healthz%5C..%5Cadmin",
        "/healthz%5c..%5cadmin",
        "/admin/users#x",
        "/healthz#/../admin/users",
    ] {
        let response = raw_http(
            stack.envoy.addr,
            &format!("GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n"),
        )
        .unwrap();
        assert_eq!(response.status, 400, "GET {path}: {response:?}");
    }
    let response = raw_http(
        stack.envoy.addr,
        "GET /orders/1 HTTP/1.1\r\nHost: localhost\r\nx_portcullis_subject: mallory\r\n\r\n",
    )
    .unwrap();
    assert_eq!(response.status, 400, "underscore header: {response:?}");
    assert_eq!(stack.upstream.count(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fails_closed_with_403_when_portcullis_is_unreachable() {
    let stack = Stack::start_without_portcullis().await;
    let token = reader_token(Key::A);
    for proto in PROTOCOLS {
        for (path, token) in [
            ("/healthz", None),
            ("/orders/1", Some(token.as_str())),
            ("/admin/users", None),
        ] {
            let answer = stack.get(proto, path, token).await;
            assert_eq!(answer.status, 403, "{proto:?} {path}: {answer:?}");
            assert!(!answer.answered_by_upstream());
        }
    }
    assert_eq!(stack.upstream.count(), 0, "the upstream must see nothing");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn portcullis_stopped_fails_closed_and_restart_recovers_without_restarting_envoy() {
    let mut stack = Stack::start(&[Key::A]).await;
    let token = reader_token(Key::A);
    for proto in PROTOCOLS {
        let answer = stack.get(proto, "/orders/1", Some(&token)).await;
        assert_eq!(answer.status, 200, "{proto:?} before: {answer:?}");
    }

    stack.portcullis().stop();
    let before = stack.upstream.count();
    for proto in PROTOCOLS {
        for (path, token) in [("/orders/1", Some(token.as_str())), ("/healthz", None)] {
            let answer = stack.get(proto, path, token).await;
            assert_eq!(
                answer.status, 403,
                "{proto:?} {path} while down: {answer:?}"
            );
            assert!(!answer.answered_by_upstream());
        }
    }
    assert_eq!(
        stack.upstream.count(),
        before,
        "nothing reaches the upstream while down"
    );

    stack.portcullis().restart();
    for proto in PROTOCOLS {
        // Envoy reconnects on its own; the first request may still race the old connection.
        let stack = &stack;
        let token = token.as_str();
        eventually(
            Duration::from_secs(10),
            "allowed again after restart",
            || async move { stack.get(proto, "/orders/1", Some(token)).await.status == 200 },
        )
        .await;
    }
    stack.envoy.process.assert_running();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotated_key_is_accepted_and_removed_key_refused_without_restart() {
    let stack = Stack::start(&[Key::A]).await;
    let old = reader_token(Key::A);
    assert_eq!(
        stack
            .get(Proto::Http1, "/orders/1", Some(&old))
            .await
            .status,
        200
    );

    // Key B is unknown: refused (401), not an error that lets anything through.
    let answer = stack
        .get(Proto::Http1, "/orders/1", Some(&reader_token(Key::B)))
        .await;
    assert_denied_by_portcullis(&answer, 401, Some("invalid_token"), "unknown kid");

    // The provider publishes B next to A: B is accepted without restarting anything.
    stack.jwks.serve(&[Key::A, Key::B]);
    stack
        .eventually_status(
            Duration::from_secs(10),
            "new kid accepted",
            Proto::H2c,
            Key::B,
            200,
        )
        .await;

    // The provider retires A: after a refresh, tokens signed by A are refused, including one
    // that was accepted (and possibly cached) before.
    stack.jwks.serve(&[Key::B]);
    stack
        .eventually_status(
            Duration::from_secs(10),
            "removed kid refused",
            Proto::Http1,
            Key::A,
            401,
        )
        .await;
    let answer = stack.get(Proto::Http1, "/orders/1", Some(&old)).await;
    assert_denied_by_portcullis(
        &answer,
        401,
        Some("invalid_token"),
        "cached token of removed key",
    );
    let answer = stack
        .get(Proto::H2c, "/orders/1", Some(&reader_token(Key::B)))
        .await;
    assert_eq!(answer.status, 200, "{answer:?}");

    let metrics = stack.metrics().await;
    assert!(metrics.contains("portcullis_decisions"), "{metrics}");
}

/// The number of failed JWKS fetches in Portcullis' metrics (every result but `ok`).
fn failed_jwks_fetches(metrics: &str) -> u64 {
    metrics
        .lines()
        .filter(|l| l.starts_with("portcullis_jwks_fetches_total{") && !l.contains("result=\"ok\""))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jwks_outage_keeps_cached_keys_until_max_stale_then_fails_closed() {
    let mut stack = Stack::start(&[Key::A]).await;
    let early = reader_token(Key::A);
    assert_eq!(
        stack
            .get(Proto::Http1, "/orders/1", Some(&early))
            .await
            .status,
        200
    );

    stack.jwks.stop().await;
    let down = Instant::now();

    // Cached keys keep working through a failed refresh (max_refresh is 2s): wait until
    // Portcullis reports a failed fetch, then verify a fresh token.
    let failed_before = failed_jwks_fetches(&stack.metrics().await);
    let s = &stack;
    eventually(
        Duration::from_secs(5),
        "a failed refresh during the outage",
        || async move { failed_jwks_fetches(&s.metrics().await) > failed_before },
    )
    .await;
    let answer = stack
        .get(Proto::H2c, "/orders/1", Some(&reader_token(Key::A)))
        .await;
    assert_eq!(
        answer.status,
        200,
        "cached keys must survive a failed fetch: {answer:?}\n{}",
        stack.logs()
    );
    // A key the set in force lacks: refused, and the answer says the set could not be
    // refreshed (it read as a forged `kid`), never why (that is for `/readyz`).
    let unknown = stack
        .get(Proto::H2c, "/orders/1", Some(&reader_token(Key::B)))
        .await;
    assert_eq!(unknown.status, 401, "{unknown:?}");
    assert!(
        unknown.body.contains("could not be refreshed just now"),
        "{unknown:?}"
    );

    // Past max_stale (5s after the last good fetch), every token is refused.
    stack
        .eventually_status(
            Duration::from_secs(20),
            "refused after max_stale",
            Proto::Http1,
            Key::A,
            401,
        )
        .await;
    let stale_after = down.elapsed();
    // The last good fetch was at most max_refresh (2s) before the outage began.
    assert!(
        stale_after >= Duration::from_secs(2),
        "keys dropped after {stale_after:?}, before max_stale"
    );
    let answer = stack.get(Proto::H2c, "/orders/1", Some(&early)).await;
    assert_denied_by_portcullis(
        &answer,
        401,
        Some("invalid_token"),
        "cached token after max_stale",
    );
    assert_eq!(answer.json()["error"].as_str(), Some("keys_unavailable"));

    // The provider comes back: tokens are accepted again without a restart.
    let hits_before = stack.jwks.hits.load(Ordering::SeqCst);
    stack.jwks.restart().await;
    stack
        .eventually_status(
            Duration::from_secs(10),
            "accepted after recovery",
            Proto::Http1,
            Key::A,
            200,
        )
        .await;
    assert!(stack.jwks.hits.load(Ordering::SeqCst) > hits_before);
}

/// A stand-in authorizer that allows everything and records the path it was asked about, so
/// the test can compare what the authorizer decided on with what the upstream received.
#[derive(Clone, Default)]
struct RecordingAuthorizer {
    paths: Arc<Mutex<Vec<String>>>,
}

#[tonic::async_trait]
impl envoy_types::ext_authz::v3::pb::Authorization for RecordingAuthorizer {
    async fn check(
        &self,
        request: tonic::Request<envoy_types::ext_authz::v3::pb::CheckRequest>,
    ) -> Result<tonic::Response<envoy_types::ext_authz::v3::pb::CheckResponse>, tonic::Status> {
        use envoy_types::ext_authz::v3::CheckResponseExt;
        let path = request
            .get_ref()
            .attributes
            .as_ref()
            .and_then(|a| a.request.as_ref())
            .and_then(|r| r.http.as_ref())
            .map(|h| h.path.clone())
            .unwrap_or_default();
        self.paths.lock().unwrap().push(path);
        Ok(tonic::Response::new(
            envoy_types::ext_authz::v3::pb::CheckResponse::with_status(tonic::Status::ok("")),
        ))
    }
}

/// Pins the shipped path hygiene itself (independent of Portcullis' own checks): the
/// authorizer is asked about the canonical path, and the upstream receives exactly that path.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envoy_authorizes_the_canonical_path_the_upstream_receives() {
    let authorizer = RecordingAuthorizer::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let authz_port = listener.local_addr().unwrap().port();
    let service = envoy_types::ext_authz::v3::pb::AuthorizationServer::new(authorizer.clone());
    tokio::spawn(async move {
        tonic::transport::Server::builder()
            .add_service(service)
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
            .await
    });
    let dir = tempfile::tempdir().unwrap();
    let upstream = Upstream::start().await;
    let envoy = Envoy::start(dir.path(), authz_port, upstream.port);

    for (raw, canonical) in [
        ("/admin/users", "/admin/users"),
        ("//admin//users", "/admin/users"),
        ("/healthz/../admin/users", "/admin/users"),
        ("/./admin/./users", "/admin/users"),
        ("/healthz/%2e%2e/admin/users", "/admin/users"),
        ("/tenants/acme/../../admin/users", "/admin/users"),
        (
            "/tenants/acme//..//..//admin/users",
            "/tenants/acme/admin/users",
        ),
        ("/orders/1?next=/../admin", "/orders/1?next=/../admin"),
    ] {
        let before = upstream.count();
        let asked_before = authorizer.paths.lock().unwrap().len();
        let response = raw_http(
            envoy.addr,
            &format!("GET {raw} HTTP/1.1\r\nHost: localhost\r\n\r\n"),
        )
        .unwrap();
        assert_eq!(
            response.status,
            200,
            "GET {raw}: {response:?}\n{}",
            envoy.process.logs()
        );
        let asked = authorizer.paths.lock().unwrap()[asked_before..].to_vec();
        let seen = upstream.since(before);
        assert_eq!(
            asked,
            [canonical],
            "GET {raw}: the authorizer was asked about"
        );
        assert_eq!(seen.len(), 1, "GET {raw}");
        assert_eq!(seen[0].path, canonical, "GET {raw}: the upstream received");
    }
}

/// Portcullis matches a route's `hosts` with the port ignored; the shipped Envoy must pick
/// its virtual host the same way. With a second virtual host added (as a deployment serving
/// several sites would), `Host: www.example.com:80` was allowed by the public route of
/// `www.example.com` and then served by the catch-all API virtual host, unauthenticated.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envoy_picks_the_virtual_host_portcullis_authorized_whatever_the_port() {
    let dir = tempfile::tempdir().unwrap();
    let jwks = JwksServer::start(&[Key::A]).await;
    let upstream = Upstream::start().await;
    let mut portcullis = Portcullis::start(dir.path(), "portcullis", |grpc, admin| {
        e2e_config(grpc, admin, &jwks.url(), |doc| {
            let site: serde_yaml::Value = serde_yaml::from_str(
                "{id: www-site, hosts: [www.example.com], methods: [GET], path: '/**', public: true}",
            )
            .unwrap();
            doc["routes"].as_sequence_mut().unwrap().insert(0, site);
        })
    });
    let api_vhost = "                  virtual_hosts:\n                    - name: sample_api\n";
    let envoy = Envoy::start_shipped(
        dir.path(),
        "envoy/envoy.yaml",
        10000,
        portcullis.grpc,
        upstream.port,
        |text| {
            assert!(text.contains(api_vhost), "the shipped virtual host moved");
            text.replace(
                api_vhost,
                "                  virtual_hosts:
                    - name: www_site
                      domains: [www.example.com]
                      request_headers_to_add: [{header: {key: x-vhost, value: www}}]
                      routes: [{match: {prefix: /}, route: {cluster: sample_upstream}}]
                    - name: sample_api
",
            )
        },
    );
    for host in [
        "www.example.com",
        "www.example.com:80",
        "WWW.example.com:8443",
    ] {
        let before = upstream.count();
        let response = raw_http(
            envoy.addr,
            &format!("GET /site/index.html HTTP/1.1\r\nHost: {host}\r\n\r\n"),
        )
        .unwrap();
        assert_eq!(
            response.status,
            200,
            "{host}: {response:?}\n{}",
            portcullis.logs()
        );
        let seen = upstream.since(before);
        assert_eq!(seen.len(), 1, "{host}");
        assert_eq!(
            seen[0].values("x-vhost"),
            ["www"],
            "{host}: served by another virtual host than the one authorized"
        );
    }
    // Any other host is the API's, where no route covers the site: denied, never served.
    let before = upstream.count();
    let response = raw_http(
        envoy.addr,
        "GET /site/index.html HTTP/1.1\r\nHost: api.example.com:80\r\n\r\n",
    )
    .unwrap();
    assert_eq!(response.status, 403, "{response:?}");
    assert_eq!(upstream.count(), before);
    portcullis.stop();
}

/// Issue 5, hot reload: the policy is edited while many requests are in flight through
/// Envoy. No request fails, none is wrongly allowed (a route denied by every version of the
/// policy is never allowed), every edit takes effect without a restart, and a broken edit is
/// rejected with the previous policy still enforced.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policy_edited_under_load_never_fails_or_wrongly_allows() {
    let stack = Arc::new(Stack::start(&[Key::A]).await);
    let reader = reader_token(Key::A);
    let config_path = stack.portcullis.as_ref().unwrap().config.clone();
    let policy_a = std::fs::read_to_string(&config_path).unwrap();
    // Policy B: reading an order needs a scope the reader lacks.
    let policy_b = policy_a.replace("    - orders:read\n", "    - orders:audit\n");
    assert_ne!(policy_a, policy_b, "the edit must change the policy");
    let write = |text: &str| {
        let tmp = config_path.with_extension("tmp");
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(&tmp, &config_path).unwrap();
    };

    let stop = Arc::new(AtomicBool::new(false));
    let mut load = Vec::new();
    for worker in 0..8 {
        let (stack, stop, reader) = (stack.clone(), stop.clone(), reader.clone());
        load.push(tokio::spawn(async move {
            let proto = PROTOCOLS[worker % 2];
            let (mut allowed, mut denied) = (0u32, 0u32);
            while !stop.load(Ordering::Relaxed) {
                // Allowed under A, denied under B: either answer is right, nothing else is.
                let read = stack.get(proto, "/orders/7", Some(&reader)).await;
                match read.status {
                    200 if read.answered_by_upstream() => allowed += 1,
                    403 if !read.answered_by_upstream() => denied += 1,
                    _ => panic!("request failed during a reload: {read:?}"),
                }
                // Denied under every version of the policy: must never be allowed.
                let write = stack
                    .send(proto, "POST", "/orders", Some(&reader), &[])
                    .await;
                assert_denied_by_portcullis(
                    &write,
                    403,
                    Some("insufficient_scope"),
                    "POST /orders",
                );
            }
            (allowed, denied)
        }));
    }

    for (round, (text, want)) in [(&policy_b, 403), (&policy_a, 200), (&policy_b, 403)]
        .into_iter()
        .enumerate()
    {
        write(text);
        eventually(
            Duration::from_secs(15),
            &format!("edit {round}"),
            || async {
                stack
                    .get(Proto::Http1, "/orders/7", Some(&reader))
                    .await
                    .status
                    == want
            },
        )
        .await;
    }
    // A broken edit (misspelt field) is refused; policy B stays in force.
    write(&policy_a.replacen("    scopes:\n", "    scpoes:\n", 1));
    eventually(Duration::from_secs(15), "broken edit reported", || async {
        stack
            .metrics()
            .await
            .contains("portcullis_config_reloads_total{result=\"error\"} 1")
    })
    .await;
    let after = stack.get(Proto::H2c, "/orders/7", Some(&reader)).await;
    assert_denied_by_portcullis(
        &after,
        403,
        Some("insufficient_scope"),
        "after the broken edit",
    );

    stop.store(true, Ordering::Relaxed);
    let (mut allowed, mut denied) = (0, 0);
    for task in load {
        let (a, d) = task.await.unwrap();
        allowed += a;
        denied += d;
    }
    assert!(
        allowed > 0 && denied > 0,
        "both policies answered under load: {allowed} allowed, {denied} denied"
    );
    let metrics = stack.metrics().await;
    assert!(
        metrics.contains("portcullis_config_reloads_total{result=\"ok\"} 3"),
        "{metrics}"
    );
}

/// On one CPU (here `taskset -c 0`) the binary runs tokio's single-threaded scheduler (a
/// bench/ lever, issue 4). It must still decide through Envoy, reload on SIGHUP and, on
/// SIGTERM, finish and flush its audit log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_one_cpu_the_single_threaded_scheduler_serves_reloads_and_drains() {
    let dir = tempfile::tempdir().unwrap();
    let jwks = JwksServer::start(&[Key::A]).await;
    let upstream = Upstream::start().await;
    let portcullis = Portcullis::start_on(dir.path(), "portcullis", true, |grpc, admin| {
        portcullis_config(grpc, admin, &jwks.url())
    });
    let envoy = Envoy::start(dir.path(), portcullis.grpc, upstream.port);
    let mut stack = Stack::assemble(dir, jwks, upstream, Some(portcullis), envoy);
    let logs = stack.portcullis().logs();
    assert!(
        logs.contains(r#""scheduler":"CurrentThread""#),
        "expected the single-threaded scheduler on one CPU:\n{logs}"
    );

    for proto in PROTOCOLS {
        let ok = stack
            .get(proto, "/orders/1", Some(&reader_token(Key::A)))
            .await;
        assert_eq!(ok.status, 200, "{proto:?}: {}", stack.logs());
        assert!(ok.answered_by_upstream());
        assert_eq!(stack.get(proto, "/orders/1", None).await.status, 401);
    }

    let pid = stack.portcullis().id().unwrap();
    let signal = |sig: &str| send_signal(sig, pid);
    signal("-HUP");
    eventually(Duration::from_secs(10), "SIGHUP reload", || async {
        stack
            .portcullis
            .as_ref()
            .unwrap()
            .logs()
            .contains("config reloaded")
    })
    .await;
    let ok = stack
        .get(Proto::Http1, "/orders/1", Some(&reader_token(Key::A)))
        .await;
    assert_eq!(ok.status, 200, "after SIGHUP: {}", stack.logs());

    signal("-TERM");
    let status = stack.portcullis().wait_exit(Duration::from_secs(15));
    assert!(
        status.is_some_and(|s| s.success()),
        "expected a clean exit on SIGTERM, got {status:?}:\n{}",
        stack.logs()
    );
    // Every decision above reached the audit log before the process exited.
    let audit = stack.portcullis().stdout();
    let decisions = audit.lines().filter(|l| l.contains("\"decision\"")).count();
    assert!(decisions >= 5, "{decisions} audit lines:\n{audit}");
}

/// Sends the signal `sig` (as `kill` spells it: `-TERM`) to the process `pid`.
fn send_signal(sig: &str, pid: u32) {
    let ok = std::process::Command::new("kill")
        .args([sig, &pid.to_string()])
        .status()
        .unwrap()
        .success();
    assert!(ok, "kill {sig} {pid}");
}

/// A Portcullis config for this test's JWKS server with `server.shutdown_delay: delay`.
fn delayed_config(grpc: u16, admin: u16, jwks_url: &str, delay: &str) -> String {
    e2e_config(grpc, admin, jwks_url, |doc| {
        doc["server"]["shutdown_delay"] = delay.into();
    })
}

/// `/readyz` of the admin port `admin`: status and body.
async fn readyz(client: &reqwest::Client, admin: u16) -> (u16, Value) {
    let answer = client
        .get(format!("http://127.0.0.1:{admin}/readyz"))
        .send()
        .await
        .unwrap();
    (answer.status().as_u16(), answer.json().await.unwrap())
}

/// A SIGTERMed Portcullis with `server.shutdown_delay` goes on deciding, on new connections
/// too, while `/readyz` and gRPC health report it not ready, and stops only when the delay
/// has passed. In a rolling update, Envoy reconnects after the GOAWAY of a stopping
/// instance, and until the endpoints catch up it may reach the same pod: with the listener
/// already closed, that Check fails and Envoy denies a request that should pass.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_terminating_portcullis_decides_out_its_shutdown_delay_while_not_ready() {
    const DELAY: Duration = Duration::from_secs(5);
    let dir = tempfile::tempdir().unwrap();
    let jwks = JwksServer::start(&[Key::A]).await;
    let upstream = Upstream::start().await;
    let portcullis = Portcullis::start(dir.path(), "portcullis", |grpc, admin| {
        delayed_config(grpc, admin, &jwks.url(), "5s")
    });
    let (grpc, admin) = (portcullis.grpc, portcullis.admin);
    let envoy = Envoy::start(dir.path(), grpc, upstream.port);
    let mut stack = Stack::assemble(dir, jwks, upstream, Some(portcullis), envoy);
    let token = reader_token(Key::A);
    let ok = stack.get(Proto::Http1, "/orders/1", Some(&token)).await;
    assert_eq!(ok.status, 200, "{}", stack.logs());
    assert_eq!(readyz(&stack.h1, admin).await.0, 200);

    let signalled = Instant::now();
    send_signal("-TERM", stack.portcullis().id().unwrap());
    // Out of rotation at once: /readyz says why, ...
    let client = stack.h1.clone();
    eventually(Duration::from_secs(3), "/readyz 503", || async {
        readyz(&client, admin).await.0 == 503
    })
    .await;
    let (_, body) = readyz(&stack.h1, admin).await;
    assert_eq!(body["ready"], false, "{body}");
    assert_eq!(body["shutting_down"], true, "{body}");
    // ... gRPC health answers NOT_SERVING, on a new connection: the port still accepts ...
    eventually(
        Duration::from_secs(3),
        "gRPC health NOT_SERVING",
        || async {
            let mut health = tonic_health::pb::health_client::HealthClient::new(
                support::inproc::channel(std::net::SocketAddr::from(([127, 0, 0, 1], grpc))).await,
            );
            let status = health
                .check(tonic_health::pb::HealthCheckRequest::default())
                .await
                .unwrap()
                .into_inner()
                .status;
            status == tonic_health::pb::health_check_response::ServingStatus::NotServing as i32
        },
    )
    .await;
    // ... and every decision is still made, allow and deny.
    for proto in PROTOCOLS {
        let ok = stack.get(proto, "/orders/1", Some(&token)).await;
        assert_eq!(
            ok.status,
            200,
            "{proto:?} during the delay: {}",
            stack.logs()
        );
        assert!(ok.answered_by_upstream());
        assert_eq!(stack.get(proto, "/orders/1", None).await.status, 401);
    }
    assert!(
        signalled.elapsed() < DELAY,
        "the checks above took longer than the delay: they prove nothing"
    );

    let status = stack.portcullis().wait_exit(Duration::from_secs(20));
    assert!(
        status.is_some_and(|s| s.success()),
        "expected a clean exit, got {status:?}:\n{}",
        stack.logs()
    );
    assert!(
        signalled.elapsed() >= DELAY,
        "stopped {:?} after SIGTERM, before its shutdown_delay",
        signalled.elapsed()
    );
}

/// A second SIGTERM (or Ctrl-C) during `server.shutdown_delay` stops without waiting out
/// the rest of it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_signal_cuts_the_shutdown_delay_short() {
    let dir = tempfile::tempdir().unwrap();
    let jwks = JwksServer::start(&[Key::A]).await;
    let mut portcullis = Portcullis::start(dir.path(), "portcullis", |grpc, admin| {
        delayed_config(grpc, admin, &jwks.url(), "5m")
    });
    let pid = portcullis.id().unwrap();
    let client = reqwest::Client::new();
    send_signal("-TERM", pid);
    eventually(Duration::from_secs(3), "/readyz 503", || async {
        readyz(&client, portcullis.admin).await.0 == 503
    })
    .await;
    send_signal("-INT", pid);
    let status = portcullis.wait_exit(Duration::from_secs(20));
    assert!(
        status.is_some_and(|s| s.success()),
        "expected a clean exit on the second signal, got {status:?}:\n{}",
        portcullis.logs()
    );
    assert!(
        portcullis.logs().contains("second signal"),
        "{}",
        portcullis.logs()
    );
}

/// `dry_run` routes through the shipped Envoy wiring: every answer is the live policy's,
/// and each decision's audit line and `portcullis_dry_run_decisions_total` say what the
/// candidate routes would have answered, including on routes the live policy answers
/// without looking at the credential (public, or no route at all).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dry_run_policy_is_reported_and_never_enforced() {
    let dir = tempfile::tempdir().unwrap();
    let jwks = JwksServer::start(&[Key::A]).await;
    let upstream = Upstream::start().await;
    let portcullis = Portcullis::start(dir.path(), "portcullis", |grpc, admin| {
        e2e_config(grpc, admin, &jwks.url(), |doc| {
            doc["dry_run"] = serde_yaml::from_str(
                "routes:
  - {id: orders-read, methods: [GET], path: '/orders/{id}', rules: [{id: auditors, scopes: ['orders:audit']}]}
  - {id: healthz, methods: [GET], path: /healthz, rules: [{id: ops, roles: [ops]}]}
  - {id: reports, methods: [GET], path: '/reports/**', rules: [{id: analysts, scopes: ['reports:read']}]}
remove: [admin]",
            )
            .unwrap();
        })
    });
    let envoy = Envoy::start(dir.path(), portcullis.grpc, upstream.port);
    let stack = Stack::assemble(dir, jwks, upstream, Some(portcullis), envoy);

    let reader = reader_token(Key::A);
    let ops = mint(Key::A, json!({ "roles": ["ops"], "scope": "reports:read" }));
    let admin = mint(Key::A, json!({ "roles": ["admin"], "auth_time": now() }));
    // (path, token, live status, dry-run decision, reason, route: "" for none)
    let (reader, ops, admin) = (reader.as_str(), ops.as_str(), admin.as_str());
    let cases = [
        (
            "/orders/1",
            Some(reader),
            200,
            "deny",
            "insufficient_scope",
            "orders-read",
        ),
        (
            "/orders/1",
            None,
            401,
            "deny",
            "credential_missing",
            "orders-read",
        ),
        (
            "/healthz",
            None,
            200,
            "deny",
            "credential_missing",
            "healthz",
        ),
        ("/healthz", Some(ops), 200, "allow", "allowed", "healthz"),
        (
            "/healthz",
            Some("not.a.jwt"),
            200,
            "deny",
            "invalid_token",
            "healthz",
        ),
        ("/reports/q3", Some(ops), 403, "allow", "allowed", "reports"),
        // `remove: [admin]`: the candidate has no route for it.
        (
            "/admin/users",
            Some(admin),
            200,
            "deny",
            "no_matching_route",
            "",
        ),
    ];
    for (path, token, status, ..) in &cases {
        let answer = stack.get(Proto::Http1, path, *token).await;
        assert_eq!(answer.status, *status, "GET {path}: {}", stack.logs());
    }

    // One audit line per request, in order, each with the candidate's answer.
    let p = stack.portcullis.as_ref().unwrap();
    let mut lines = Vec::new();
    eventually(Duration::from_secs(10), "an audit line per request", || {
        lines = p
            .stdout()
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .filter(|v| v["kind"] == "decision")
            .collect::<Vec<_>>();
        let n = lines.len();
        async move { n >= cases.len() }
    })
    .await;
    for (line, (path, token, status, would, reason, route)) in lines.iter().zip(&cases) {
        assert_eq!(line["path"], *path, "{line}");
        assert_eq!(line["status"], *status, "{line}");
        let dry = &line["dry_run"];
        assert_eq!(dry["decision"], *would, "GET {path}: {line}");
        assert_eq!(dry["reason"], *reason, "GET {path}: {line}");
        let route = Some(*route).filter(|r| !r.is_empty());
        assert_eq!(dry["route"].as_str(), route, "GET {path}: {line}");
        if let Some(token) = token {
            assert!(!line.to_string().contains(token), "token in the audit line");
        }
    }
    // Where the live route read no credential (public, or none), the line names nobody and
    // its dry run names the caller the candidate answered: the `sub` of the token sent.
    let claims = |token: &str| -> Value {
        let payload = token.split('.').nth(1).unwrap();
        serde_json::from_slice(&URL_SAFE_NO_PAD.decode(payload).unwrap()).unwrap()
    };
    let ops_claims = claims(ops);
    for line in [&lines[3], &lines[5]] {
        assert_eq!(line["subject"], Value::Null, "{line}");
        assert_eq!(line["dry_run"]["subject"], ops_claims["sub"], "{line}");
        assert_eq!(line["dry_run"]["issuer"], "e2e", "{line}");
        assert_eq!(line["dry_run"]["iss"], ops_claims["iss"], "{line}");
    }
    // Where the live line names the caller, the dry run does not repeat it.
    assert_eq!(lines[0]["subject"], claims(reader)["sub"], "{}", lines[0]);
    assert!(lines[0]["dry_run"].get("subject").is_none(), "{}", lines[0]);

    // The metric counts the candidate's answers beside the live result.
    let metrics = stack.metrics().await;
    for (_, _, status, would, reason, route) in &cases {
        let live = if *status == 200 { "allow" } else { "deny" };
        let series = format!(
            "portcullis_dry_run_decisions_total{{live=\"{live}\",result=\"{would}\",reason=\"{reason}\",route=\"{route}\"}}"
        );
        assert!(metrics.contains(&series), "no {series} in:\n{metrics}");
    }
}
