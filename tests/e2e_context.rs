//! End-to-end through the real Envoy (shipped envoy/envoy.yaml) and the real `portcullis`
//! binary: revoked tokens are refused while they sit in the verified-token cache (admin API,
//! and the revocation file reloaded on SIGHUP), and source-address conditions see the address
//! Envoy reports, never a client-sent X-Forwarded-For.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::net::SocketAddr;
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use support::ChildGuard;
use support::jwt::{
    DEV_AUDIENCE as AUDIENCE, DEV_ISSUER as ISSUER, dev_jwks_path, merged, mint_dev, now,
};
use support::stack::{Envoy, Portcullis, Upstream, http_client};

fn mint(extra: Value) -> String {
    mint_dev(merged(json!({ "scope": "orders:read admin" }), extra))
}

struct Stack {
    portcullis: Portcullis,
    admin: SocketAddr,
    _envoy: ChildGuard,
    envoy: SocketAddr,
    revoked: std::path::PathBuf,
    http: reqwest::Client,
    _dir: tempfile::TempDir,
}

impl Stack {
    async fn start() -> Stack {
        Self::start_behind(0).await
    }

    /// The stack with `network.trusted_proxy_hops: hops` (proxies in front of Envoy).
    async fn start_behind(hops: u32) -> Stack {
        let dir = tempfile::tempdir().unwrap();
        // The upstream: any answer with a marker, so an upstream 200 is told from a deny.
        let upstream = Upstream::start().await;

        let revoked = dir.path().join("revoked.yaml");
        std::fs::write(&revoked, "revoked: []\n").unwrap();
        let jwks = dev_jwks_path();
        let portcullis = Portcullis::start(dir.path(), "portcullis", |grpc, admin| {
            format!(
                r#"
server: {{listen: "127.0.0.1:{grpc}", admin_listen: "127.0.0.1:{admin}", shutdown_grace: 1s}}
network: {{trusted_proxy_hops: {hops}}}
issuers:
  - name: dev
    issuer: {ISSUER}
    audiences: [{AUDIENCE}]
    keys: {{file: "{jwks}"}}
revocation:
  file: revoked.yaml
  reload: 1h            # only SIGHUP (or the admin API) brings changes in during the test
routes:
  - id: orders
    methods: [GET]
    path: "/orders/{{id}}"
    rules: [{{id: reader, scopes: ["orders:read"]}}]
  - id: loopback-admin
    methods: [GET]
    path: /admin/**
    rules:
      - {{id: local-fresh-admin, scopes: [admin], max_session_age: 10m, source: {{cidrs: [127.0.0.0/8, "::1/128"]}}}}
  - id: office
    methods: [GET]
    path: /office/**
    rules:
      - {{id: office-network, scopes: [admin], source: {{cidrs: [10.0.0.0/8]}}}}
"#,
                jwks = jwks.display()
            )
        });
        let admin = portcullis.admin_addr();

        let envoy = Envoy::start(dir.path(), portcullis.grpc, upstream.port);
        Stack {
            portcullis,
            admin,
            _envoy: envoy.process,
            envoy: envoy.addr,
            revoked,
            http: http_client(),
            _dir: dir,
        }
    }

    /// Status and JSON `error` (empty for an upstream answer) of `GET path` through Envoy.
    async fn get(&self, path: &str, token: &str, headers: &[(&str, &str)]) -> (u16, String) {
        let mut req = self
            .http
            .get(format!("http://{}{path}", self.envoy))
            .bearer_auth(token);
        for (n, v) in headers {
            req = req.header(*n, *v);
        }
        let resp = req.send().await.unwrap();
        let status = resp.status().as_u16();
        let upstream = resp.headers().contains_key("x-e2e-upstream");
        let body = resp.text().await.unwrap();
        if upstream {
            assert_eq!(status, 200);
            return (status, String::new());
        }
        let error = serde_json::from_str::<Value>(&body)
            .ok()
            .and_then(|v| v["error"].as_str().map(str::to_string))
            .unwrap_or_else(|| panic!("not a Portcullis deny: {status} {body}"));
        (status, error)
    }

    /// The text of Portcullis' `/metrics`.
    async fn metrics(&self) -> String {
        self.http
            .get(format!("http://{}/metrics", self.admin))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }

    async fn cache_hits(&self) -> u64 {
        let text = self.metrics().await;
        text.lines()
            .find_map(|l| l.strip_prefix("portcullis_token_cache_hits_total "))
            .map(|v| v.trim().parse().unwrap())
            .unwrap_or(0)
    }

    async fn eventually(&self, path: &str, token: &str, want: (u16, &str)) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let got = self.get(path, token, &[]).await;
            if (got.0, got.1.as_str()) == want {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "never got {want:?} (last {got:?})\n{}",
                self.portcullis.logs()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

fn sighup(pid: u32) {
    let ok = Command::new("kill")
        .args(["-HUP", &pid.to_string()])
        .status()
        .unwrap()
        .success();
    assert!(ok, "kill -HUP {pid}");
}

#[tokio::test]
async fn revoked_tokens_are_refused_while_cached_through_envoy() {
    let s = Stack::start().await;
    let token = mint(json!({"sub": "alice", "jti": "e2e-jti-1", "sid": "sess-1"}));
    assert_eq!(s.get("/orders/1", &token, &[]).await, (200, String::new()));
    let before = s.cache_hits().await;
    assert_eq!(s.get("/orders/1", &token, &[]).await, (200, String::new()));
    assert!(
        s.cache_hits().await > before,
        "the second request is a cache hit"
    );

    // Runtime revocation through the admin API: refused on the very next request.
    let resp = s
        .http
        .post(format!("http://{}/revocations", s.admin))
        .json(&json!({"jti": "e2e-jti-1", "expires_at": now() + 600}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 201);
    let hits = s.cache_hits().await;
    assert_eq!(
        s.get("/orders/1", &token, &[]).await,
        (401, "revoked".to_string())
    );
    assert!(
        s.cache_hits().await > hits,
        "refused on the cache fast path"
    );

    // File revocation by session, brought in by SIGHUP (polling is set to 1h).
    let other = mint(json!({"sub": "bob", "sid": "sess-2"}));
    assert_eq!(s.get("/orders/1", &other, &[]).await, (200, String::new()));
    std::fs::write(&s.revoked, "revoked:\n  - {sid: sess-2}\n").unwrap();
    sighup(s.portcullis.id().unwrap());
    s.eventually("/orders/1", &other, (401, "revoked")).await;

    // A broken file on SIGHUP keeps the list: still refused, and the process keeps serving.
    std::fs::write(&s.revoked, "revoked: [").unwrap();
    sighup(s.portcullis.id().unwrap());
    let metrics_deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let text = s.metrics().await;
        if text.contains("portcullis_revocation_reloads_total{result=\"error\"} 1") {
            break;
        }
        assert!(
            Instant::now() < metrics_deadline,
            "no failed reload counted\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        s.get("/orders/1", &other, &[]).await,
        (401, "revoked".to_string())
    );
    let fresh = mint(json!({"sub": "carol"}));
    assert_eq!(s.get("/orders/1", &fresh, &[]).await, (200, String::new()));
}

#[tokio::test]
async fn source_conditions_use_the_address_envoy_reports_not_xff() {
    let s = Stack::start().await;
    let token = mint(json!({"sub": "root"}));
    assert_eq!(s.get("/admin/x", &token, &[]).await, (200, String::new()));
    // The client is on loopback, not in 10.0.0.0/8, whatever X-Forwarded-For it sends.
    assert_eq!(
        s.get("/office/x", &token, &[("x-forwarded-for", "10.1.2.3")])
            .await,
        (403, "context_denied".to_string())
    );
    // A token minted 20 minutes ago is too old for the admin route, fine for orders.
    let old = mint(json!({"sub": "root", "iat": now() - 1200}));
    assert_eq!(
        s.get("/admin/x", &old, &[]).await,
        (403, "context_denied".to_string())
    );
    assert_eq!(s.get("/orders/1", &old, &[]).await, (200, String::new()));
}

/// A trusted proxy on the same host (`trusted_proxy_hops: 1`) reaches Envoy over loopback. The
/// shipped Envoy (`use_remote_address: true`) then appends its own address to X-Forwarded-For,
/// not 127.0.0.1: that entry is Envoy's, and the client is the one the proxy appended.
#[tokio::test]
async fn behind_a_trusted_proxy_on_loopback_the_client_is_the_entry_the_proxy_appended() {
    let s = Stack::start_behind(1).await;
    let token = mint(json!({"sub": "root"}));
    // The proxy saw the client at 10.1.2.3 and appended it.
    assert_eq!(
        s.get("/office/x", &token, &[("x-forwarded-for", "10.1.2.3")])
            .await,
        (200, String::new())
    );
    // The client wrote 10.1.2.3 itself; the proxy appended where it really came from.
    assert_eq!(
        s.get(
            "/office/x",
            &token,
            &[("x-forwarded-for", "10.1.2.3, 203.0.113.9")]
        )
        .await,
        (403, "context_denied".to_string())
    );
    // No entry from the proxy: no client address, so the condition cannot hold.
    assert_eq!(
        s.get("/office/x", &token, &[]).await,
        (403, "context_denied".to_string())
    );
}
