//! Revocation through the running server, in-process: runtime entries through the admin API
//! and the file list reloaded on change and on SIGHUP, both refusing tokens that are already in
//! the verified-token cache.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use envoy_types::ext_authz::v3::pb::{CheckRequest, HttpResponse};
use envoy_types::pb::envoy::config::core::v3::{Address, SocketAddress, address};
use envoy_types::pb::envoy::service::auth::v3::AttributeContext;
use envoy_types::pb::envoy::service::auth::v3::attribute_context::{HttpRequest, Peer, Request};
use envoy_types::pb::envoy::service::auth::v3::authorization_client::AuthorizationClient;
use portcullis::admin::metrics::ResultLabels;
use portcullis::server::Server;
use serde_json::{Value, json};

const DEV_ISSUER: &str = "https://dev.portcullis.invalid";

fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

fn mint(claims: Value) -> String {
    let pem = std::fs::read(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/config/dev/signing-key.pem"
    ))
    .unwrap();
    let key = jsonwebtoken::EncodingKey::from_rsa_pem(&pem).unwrap();
    let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::RS256);
    header.kid = Some("portcullis-dev-1".to_string());
    let mut full = json!({
        "iss": DEV_ISSUER,
        "aud": "portcullis-sample-api",
        "iat": now(),
        "exp": now() + 600,
        "scope": "orders:read",
    });
    for (k, v) in claims.as_object().unwrap() {
        full[k] = v.clone();
    }
    jsonwebtoken::encode(&header, &full, &key).unwrap()
}

struct Harness {
    server: Server,
    revoked: PathBuf,
    _dir: tempfile::TempDir,
}

impl Harness {
    async fn start(reload: &str, extra: &str, initial: &str) -> Harness {
        let dir = tempfile::tempdir().unwrap();
        let revoked = dir.path().join("revoked.yaml");
        std::fs::write(&revoked, initial).unwrap();
        let jwks = concat!(env!("CARGO_MANIFEST_DIR"), "/config/dev/jwks.json");
        let text = format!(
            r#"
server: {{listen: "127.0.0.1:0", admin_listen: "127.0.0.1:0"}}
audit: {{enabled: false}}
issuers:
  - name: dev
    issuer: {DEV_ISSUER}
    audiences: [portcullis-sample-api]
    keys: {{file: "{jwks}"}}
revocation:
  file: revoked.yaml
  reload: {reload}
{extra}
routes:
  - id: orders
    methods: [GET]
    path: "/orders/{{id}}"
    rules: [{{id: reader, scopes: ["orders:read"]}}]
"#
        );
        let path = dir.path().join("portcullis.yaml");
        std::fs::write(&path, text).unwrap();
        let config = portcullis::config::load(&path).unwrap();
        let server = Server::start(config).await.unwrap();
        Harness {
            server,
            revoked,
            _dir: dir,
        }
    }

    /// The HTTP status Envoy would answer with (200 for an allow).
    async fn check(&self, token: &str) -> u16 {
        let req = CheckRequest {
            attributes: Some(AttributeContext {
                source: Some(Peer {
                    address: Some(Address {
                        address: Some(address::Address::SocketAddress(SocketAddress {
                            address: "10.0.0.7".into(),
                            ..Default::default()
                        })),
                    }),
                    ..Default::default()
                }),
                request: Some(Request {
                    http: Some(HttpRequest {
                        method: "GET".into(),
                        path: "/orders/1".into(),
                        host: "api.example.com".into(),
                        headers: HashMap::from([(
                            "authorization".to_string(),
                            format!("Bearer {token}"),
                        )]),
                        ..Default::default()
                    }),
                    ..Default::default()
                }),
                ..Default::default()
            }),
        };
        let mut client = AuthorizationClient::connect(format!("http://{}", self.server.grpc_addr))
            .await
            .unwrap();
        let resp = client.check(req).await.unwrap().into_inner();
        match resp.http_response {
            Some(HttpResponse::OkResponse(_)) => 200,
            Some(HttpResponse::DeniedResponse(d)) => {
                let body: Value = serde_json::from_str(&d.body).unwrap();
                let code = d.status.unwrap().code as u16;
                if code == 401 {
                    assert_eq!(body["error"], "revoked", "{body}");
                }
                code
            }
            other => panic!("no http response: {other:?}"),
        }
    }

    fn admin(&self, path: &str) -> String {
        format!("http://{}{path}", self.server.admin_addr)
    }

    fn reloads(&self, result: &'static str) -> u64 {
        self.server
            .metrics
            .revocation_reloads
            .get_or_create(&ResultLabels { result })
            .get()
    }

    /// Polls until the token's status is `want` (the reload interval is short).
    async fn wait_status(&self, token: &str, want: u16) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if self.check(token).await == want {
                return;
            }
            assert!(Instant::now() < deadline, "status never became {want}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn wait_reloads(&self, result: &'static str, at_least: u64) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.reloads(result) < at_least {
            assert!(Instant::now() < deadline, "no `{result}` reload happened");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

#[tokio::test]
async fn admin_revocation_refuses_a_cached_token_and_can_be_lifted() {
    let h = Harness::start("1h", "", "revoked: []").await;
    let token = mint(json!({"sub": "alice", "jti": "tok-1"}));
    assert_eq!(h.check(&token).await, 200);
    assert_eq!(h.check(&token).await, 200);
    assert!(
        h.server.metrics.token_cache_hits.get() >= 1,
        "the token is cached"
    );

    let http = reqwest::Client::new();
    let resp = http
        .post(h.admin("/revocations"))
        .json(&json!({"jti": "tok-1", "expires_at": now() + 600}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 201);
    let hits = h.server.metrics.token_cache_hits.get();
    assert_eq!(h.check(&token).await, 401);
    assert!(
        h.server.metrics.token_cache_hits.get() > hits,
        "refused on a cache hit"
    );
    // Another token of the same subject is not affected.
    assert_eq!(
        h.check(&mint(json!({"sub": "alice", "jti": "tok-2"})))
            .await,
        200
    );

    let list: Value = http
        .get(h.admin("/revocations"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(list["runtime"][0]["kind"], "jti");
    assert_eq!(list["runtime"][0]["value"], "tok-1");

    let del = http
        .delete(h.admin("/revocations?jti=tok-1"))
        .send()
        .await
        .unwrap();
    assert_eq!(del.status(), 204);
    assert_eq!(h.check(&token).await, 200);
    let again = http
        .delete(h.admin("/revocations?jti=tok-1"))
        .send()
        .await
        .unwrap();
    assert_eq!(again.status(), 404);

    // Revoking a subject refuses all of its tokens; RFC 3339 expiry is accepted.
    let until = jiff::Timestamp::from_second(now() + 600)
        .unwrap()
        .to_string();
    let resp = http
        .post(h.admin("/revocations"))
        .json(&json!({"sub": "alice", "expires_at": until}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 201);
    assert_eq!(h.check(&token).await, 401);
    assert_eq!(h.check(&mint(json!({"sub": "bob"}))).await, 200);
}

#[tokio::test]
async fn admin_api_rejects_bad_requests() {
    let h = Harness::start("1h", "", "revoked: []").await;
    let http = reqwest::Client::new();
    for body in [
        json!({"jti": "a", "expires_at": now() - 1}),
        json!({"jti": "a", "sub": "b"}),
        json!({"jti": ""}),
        json!({"token": "a"}),
        json!({"jti": "a", "expires_at": "tomorrow"}),
        json!({"jti": "a", "expires_at": now() + 1000 * 24 * 3600}),
    ] {
        let resp = http
            .post(h.admin("/revocations"))
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 400, "{body}");
    }
    let list: Value = http
        .get(h.admin("/revocations"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(list["runtime"], json!([]));
}

#[tokio::test]
async fn admin_api_requires_the_configured_bearer_secret() {
    let real = {
        let d = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, b"s3cret");
        d.as_ref()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<String>()
    };
    let extra = format!("  admin_token_sha256: \"{real}\"");
    let h = Harness::start("1h", &extra, "revoked: []").await;
    let http = reqwest::Client::new();
    let body = json!({"jti": "x"});
    let none = http
        .post(h.admin("/revocations"))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(none.status(), 401);
    let wrong = http
        .post(h.admin("/revocations"))
        .bearer_auth("guess")
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(wrong.status(), 401);
    let list = http.get(h.admin("/revocations")).send().await.unwrap();
    assert_eq!(list.status(), 401, "listing needs the secret too");
    let ok = http
        .post(h.admin("/revocations"))
        .bearer_auth("s3cret")
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(ok.status(), 201);
    assert_eq!(h.check(&mint(json!({"jti": "x"}))).await, 401);
}

#[tokio::test]
async fn file_revocation_reloads_and_a_broken_or_deleted_file_keeps_it() {
    let h = Harness::start("100ms", "", "revoked: []").await;
    let token = mint(json!({"sub": "mallory", "sid": "sess-7"}));
    assert_eq!(h.check(&token).await, 200);

    std::fs::write(&h.revoked, "revoked:\n  - {sid: sess-7}\n").unwrap();
    h.wait_status(&token, 401).await;

    for (n, broken) in ["", "revoked: [", "revoked: [{sid: a, sub: b}]"]
        .into_iter()
        .enumerate()
    {
        std::fs::write(&h.revoked, broken).unwrap();
        h.wait_reloads("error", n as u64 + 1).await;
        assert_eq!(h.check(&token).await, 401, "after {broken:?}");
    }
    std::fs::remove_file(&h.revoked).unwrap();
    h.wait_reloads("error", 4).await;
    assert_eq!(
        h.check(&token).await,
        401,
        "a deleted file never clears the list"
    );

    std::fs::write(&h.revoked, "revoked: []\n").unwrap();
    h.wait_status(&token, 200).await;
    let metrics = reqwest::get(h.admin("/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    // A poll can also catch a file half-written, so count at least the four broken states.
    let errors: u64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("portcullis_revocation_reloads_total{result=\"error\"} "))
        .expect("the error counter is exported")
        .trim()
        .parse()
        .unwrap();
    assert!(errors >= 4, "{metrics}");
}

#[tokio::test]
async fn sighup_reloads_the_revocation_file() {
    // Polling is effectively off: only the signal can bring the change in.
    let h = Harness::start("1h", "", "revoked: []").await;
    let token = mint(json!({"jti": "hup-1"}));
    assert_eq!(h.check(&token).await, 200);
    std::fs::write(&h.revoked, "revoked: [{jti: hup-1}]\n").unwrap();
    let status = std::process::Command::new("kill")
        .args(["-HUP", &std::process::id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    h.wait_status(&token, 401).await;
}

#[tokio::test]
async fn a_broken_revocation_file_stops_the_start() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("revoked.yaml"), "").unwrap();
    let jwks = concat!(env!("CARGO_MANIFEST_DIR"), "/config/dev/jwks.json");
    let text = format!(
        "server: {{listen: '127.0.0.1:0', admin_listen: '127.0.0.1:0'}}\naudit: {{enabled: false}}\nissuers: [{{name: dev, issuer: {DEV_ISSUER}, audiences: [a], keys: {{file: '{jwks}'}}}}]\nrevocation: {{file: revoked.yaml}}\nroutes: [{{id: r, methods: [GET], path: /r, rules: [{{id: x, scopes: [s]}}]}}]\n"
    );
    let path = dir.path().join("portcullis.yaml");
    std::fs::write(&path, text).unwrap();
    let config = portcullis::config::load(&path).unwrap();
    let err = Server::start(config)
        .await
        .err()
        .expect("the start must fail");
    assert!(err.to_string().contains("is empty"), "{err}");
}
