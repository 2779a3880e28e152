//! Just-in-time approvals end to end: TWO `portcullis` replicas (the real binary, the same
//! config with the Redis state backend) sharing ONE real `redis-server`, behind ONE real
//! Envoy. The Envoy has two listeners, `via A` and `via B`, whose ext_authz filters call
//! replica A and replica B respectively, so each request provably goes through the replica
//! the test chooses (everything else is the shipped envoy/envoy.yaml). Approvers use the
//! real `portcullis approvals` CLI against a replica's gRPC listener.
//!
//! Each test starts its own stack (processes die with the test), so tests run in parallel.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use support::jwt::{E2E_AUDIENCE as AUDIENCE, E2E_ISSUER as ISSUER, Key, now, serial, write_jwks};
use support::redis::RedisServer;
use support::stack::{Portcullis, UPSTREAM_MARKER, Upstream, h1_client, loopback};
use support::{ChildGuard, free_port};

/// A fresh token for `sub` with `roles` and `scope`, signed by the e2e key A.
fn mint(sub: &str, roles: &[&str], scope: &str) -> String {
    Key::A.sign(&json!({
        "iss": ISSUER,
        "aud": AUDIENCE,
        "sub": sub,
        "roles": roles,
        "scope": scope,
        "iat": now(),
        "nbf": now(),
        "exp": now() + 600,
        "jti": format!("appr-{}-{}", std::process::id(), serial()),
    }))
}

fn portcullis_config(grpc: u16, admin: u16, redis_url: &str) -> String {
    format!(
        r#"
server:
  listen: 127.0.0.1:{grpc}
  admin_listen: 127.0.0.1:{admin}
  shutdown_grace: 1s
issuers:
  - name: e2e
    issuer: {ISSUER}
    audiences: [{AUDIENCE}]
    algorithms: [RS256]
    keys: {{ file: jwks.json }}
state:
  backend: redis
  redis_url: {redis_url}
  key_prefix: "e2e:"
  timeout: 200ms
routes:
  - id: health
    methods: [GET]
    path: /healthz
    public: true
  - id: orders
    methods: [GET]
    path: /orders/**
    rules:
      - id: reader
        scopes: [orders:read]
  - id: drop-database
    methods: [DELETE]
    path: /databases/{{db}}
    rules:
      - id: dba
        roles: [dba]
        approval:
          approvers: {{ roles: [dba-lead] }}
          ttl: 15m
          uses: 1
  - id: export
    methods: [POST]
    path: /exports/{{what}}
    rules:
      - id: exporter
        roles: [dba]
        approval:
          approvers: {{ roles: [dba-lead] }}
          ttl: 10m
          uses: 1000
"#
    )
}

struct Replica {
    grpc: u16,
    process: Portcullis,
}

impl Replica {
    fn start(dir: &Path, name: &str, redis_url: &str) -> Replica {
        let process = Portcullis::start(dir, &format!("portcullis-{name}"), |grpc, admin| {
            portcullis_config(grpc, admin, redis_url)
        });
        Replica {
            grpc: process.grpc,
            process,
        }
    }

    fn server(&self) -> String {
        format!("127.0.0.1:{}", self.grpc)
    }
}

/// The shipped Envoy config with its one listener and its `portcullis` cluster doubled: the
/// listener `ingress_a` asks cluster `portcullis_a` (replica A), `ingress_b` asks
/// `portcullis_b` (replica B). `with_body`, when given, is the ext_authz filter's
/// `with_request_body` on both listeners.
fn envoy_config(
    admin: u16,
    listen: [u16; 2],
    replicas: [u16; 2],
    upstream: u16,
    with_body: Option<&str>,
) -> String {
    let shipped = std::fs::read_to_string(support::repo_root().join("envoy/envoy.yaml")).unwrap();
    let shipped = support::rewrite_envoy_config(
        &shipped,
        &[
            (9901, admin),
            (10000, listen[0]),
            (9191, replicas[0]),
            (8080, upstream),
        ],
    );
    let mut doc: serde_yaml::Value = serde_yaml::from_str(&shipped).unwrap();
    let statics = &mut doc["static_resources"];
    let listener = statics["listeners"][0].clone();
    let cluster = statics["clusters"]
        .as_sequence()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "portcullis")
        .unwrap()
        .clone();
    let mut listeners = Vec::new();
    let mut clusters: Vec<serde_yaml::Value> = statics["clusters"]
        .as_sequence()
        .unwrap()
        .iter()
        .filter(|c| c["name"] != "portcullis")
        .cloned()
        .collect();
    for (i, side) in ["a", "b"].iter().enumerate() {
        let name = format!("portcullis_{side}");
        let mut l = listener.clone();
        l["name"] = format!("ingress_{side}").into();
        l["address"]["socket_address"]["port_value"] = u64::from(listen[i]).into();
        let filters = &mut l["filter_chains"][0]["filters"][0]["typed_config"]["http_filters"];
        let authz = filters
            .as_sequence_mut()
            .unwrap()
            .iter_mut()
            .find(|f| f["name"] == "envoy.filters.http.ext_authz")
            .unwrap();
        authz["typed_config"]["grpc_service"]["envoy_grpc"]["cluster_name"] = name.clone().into();
        if let Some(body) = with_body {
            authz["typed_config"]["with_request_body"] = serde_yaml::from_str(body).unwrap();
        }
        listeners.push(l);
        let mut c = cluster.clone();
        c["name"] = name.clone().into();
        c["load_assignment"]["cluster_name"] = name.into();
        c["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]["socket_address"]
            ["port_value"] = u64::from(replicas[i]).into();
        clusters.push(c);
    }
    statics["listeners"] = listeners.into();
    statics["clusters"] = clusters.into();
    serde_yaml::to_string(&doc).unwrap()
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Via {
    A,
    B,
}

struct Stack {
    redis: RedisServer,
    a: Replica,
    b: Replica,
    envoy: ChildGuard,
    listen: [SocketAddr; 2],
    http: reqwest::Client,
    _dir: tempfile::TempDir,
}

#[derive(Debug)]
struct Answer {
    status: u16,
    headers: reqwest::header::HeaderMap,
    body: String,
}

impl Answer {
    fn upstream(&self) -> bool {
        self.headers.contains_key(UPSTREAM_MARKER)
    }
    fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {self:?}"))
    }
    fn approval_id(&self) -> String {
        let body = self.json();
        let id = body["approval_id"].as_str().unwrap_or_default().to_string();
        let header = self
            .headers
            .get("x-portcullis-approval-id")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default();
        assert!(id.starts_with("apr_"), "no approval id: {self:?}");
        assert_eq!(header, id, "header and body carry the same id");
        id
    }
}

impl Stack {
    async fn start() -> Stack {
        Stack::start_with_body(None).await
    }

    /// A stack whose Envoy sends request bodies (`with_request_body`) to the replicas.
    async fn start_with_body(with_body: Option<&str>) -> Stack {
        let dir = tempfile::tempdir().unwrap();
        write_jwks(dir.path(), &[Key::A]);
        let redis = RedisServer::start();
        let upstream = Upstream::start().await;
        let a = Replica::start(dir.path(), "a", &redis.url());
        let b = Replica::start(dir.path(), "b", &redis.url());
        let admin = free_port();
        let listen = [free_port(), free_port()];
        let path = dir.path().join("envoy.yaml");
        std::fs::write(
            &path,
            envoy_config(admin, listen, [a.grpc, b.grpc], upstream.port, with_body),
        )
        .unwrap();
        let envoy = support::start_envoy(&path, loopback(admin));
        let http = h1_client();
        Stack {
            redis,
            a,
            b,
            envoy,
            listen: listen.map(loopback),
            http,
            _dir: dir,
        }
    }

    fn logs(&self) -> String {
        format!(
            "{}\n{}\n{}",
            self.envoy.logs(),
            self.a.process.logs(),
            self.b.process.logs()
        )
    }

    async fn send(&self, via: Via, method: &str, path: &str, token: &str) -> Answer {
        self.send_body(via, method, path, token, "").await
    }

    async fn send_body(
        &self,
        via: Via,
        method: &str,
        path: &str,
        token: &str,
        body: &str,
    ) -> Answer {
        let addr = match via {
            Via::A => self.listen[0],
            Via::B => self.listen[1],
        };
        let response = self
            .http
            .request(method.parse().unwrap(), format!("http://{addr}{path}"))
            .bearer_auth(token)
            .header("x-portcullis-justification", "INC-1234 cleanup")
            .body(body.to_string())
            .send()
            .await
            .unwrap_or_else(|e| panic!("{method} {path} via {via:?}: {e}\n{}", self.logs()));
        let status = response.status().as_u16();
        let headers = response.headers().clone();
        let body = response.text().await.unwrap();
        Answer {
            status,
            headers,
            body,
        }
    }

    /// Runs `portcullis approvals ARGS --server <replica> --token TOKEN`.
    fn cli(&self, replica: Via, token: &str, args: &[&str]) -> (bool, String, String) {
        let server = match replica {
            Via::A => self.a.server(),
            Via::B => self.b.server(),
        };
        let out = Command::new(env!("CARGO_BIN_EXE_portcullis"))
            .arg("approvals")
            .args(args)
            .args(["--server", &server, "--token", token])
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).to_string(),
            String::from_utf8_lossy(&out.stderr).to_string(),
        )
    }

    fn approve(&self, replica: Via, token: &str, id: &str, extra: &[&str]) {
        let mut args = vec!["approve", id];
        args.extend_from_slice(extra);
        let (ok, out, err) = self.cli(replica, token, &args);
        assert!(ok, "approve {id} failed: {out}{err}\n{}", self.logs());
        assert!(out.contains("approved"), "{out}");
    }

    /// Audit lines of both replicas.
    fn audit(&self) -> Vec<Value> {
        [&self.a, &self.b]
            .iter()
            .flat_map(|r| {
                r.process
                    .stdout()
                    .lines()
                    .filter_map(|l| serde_json::from_str::<Value>(l).ok())
                    .collect::<Vec<_>>()
            })
            .collect()
    }

    fn approval_events(&self, id: &str) -> Vec<String> {
        self.audit()
            .into_iter()
            .filter(|e| e["kind"] == "approval" && e["approval_id"] == id)
            .map(|e| e["event"].as_str().unwrap_or_default().to_string())
            .collect()
    }

    /// The approval's events once every one of `want` is among them. The audit writer
    /// batches its output (lines reach stdout up to 50ms late), so this waits up to 5s.
    async fn approval_events_with(&self, id: &str, want: &[&str]) -> Vec<String> {
        let started = Instant::now();
        loop {
            let events = self.approval_events(id);
            if want.iter().all(|w| events.iter().any(|e| e == w))
                || started.elapsed() > Duration::from_secs(5)
            {
                return events;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// Lower-case hex SHA-256, as approvals list body and query digests.
fn sha256_hex(bytes: &[u8]) -> String {
    let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, bytes);
    digest.as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

fn assert_approval_required(answer: &Answer, context: &str) {
    assert_eq!(answer.status, 403, "{context}: {answer:?}");
    assert!(!answer.upstream(), "{context}: reached the upstream");
    assert_eq!(answer.json()["error"], "approval_required", "{context}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn approval_through_one_replica_allows_one_retry_through_the_other() {
    let stack = Stack::start().await;
    let alice = mint("alice", &["dba"], "");
    let bob = mint("bob", &["dba-lead"], "");
    let path = "/databases/orders";

    // Refused, with an approval id in the body and a header.
    let first = stack.send(Via::A, "DELETE", path, &alice).await;
    assert_approval_required(&first, "first request");
    let id = first.approval_id();
    assert!(
        first.json()["reason"]
            .as_str()
            .unwrap()
            .contains("dba-lead"),
        "{first:?}"
    );
    // Repeating while pending, through either replica, reuses the same request.
    let again = stack.send(Via::B, "DELETE", path, &alice).await;
    assert_approval_required(&again, "repeat while pending");
    assert_eq!(again.approval_id(), id);

    // The approver sees it through the other replica, with the justification.
    let (ok, listed, err) = stack.cli(Via::B, &bob, &["list"]);
    assert!(ok, "{listed}{err}");
    assert_eq!(listed.matches("apr_").count(), 1, "{listed}");
    assert!(
        listed.contains(&id) && listed.contains("INC-1234"),
        "{listed}"
    );
    // TLS options against this plain listener: refused, saying so.
    let ca = support::repo_root().join("tests/fixtures/mtls/ca.crt");
    let (ok, out, err) = stack.cli(Via::B, &bob, &["list", "--ca-cert", ca.to_str().unwrap()]);
    assert!(!ok, "{out}");
    assert!(err.contains("does not speak TLS"), "{err}");
    // The requester is no approver.
    let (ok, out, err) = stack.cli(Via::A, &alice, &["approve", &id]);
    assert!(!ok, "alice approved her own request: {out}");
    assert!(err.contains("PermissionDenied"), "{err}");

    stack.approve(Via::A, &bob, &id, &[]);

    // Allowed once through the OTHER replica, then refused again with a new request.
    let retry = stack.send(Via::B, "DELETE", path, &alice).await;
    assert_eq!(retry.status, 200, "{retry:?}\n{}", stack.logs());
    assert!(retry.upstream());
    let second = stack.send(Via::B, "DELETE", path, &alice).await;
    assert_approval_required(&second, "second retry");
    assert_ne!(second.approval_id(), id, "a spent approval asks anew");
    let third = stack.send(Via::A, "DELETE", path, &alice).await;
    assert_approval_required(&third, "third retry via A");

    // Every step is in the audit log (the use on replica B).
    let events = stack
        .approval_events_with(&id, &["requested", "approved", "used"])
        .await;
    for want in ["requested", "approved", "used"] {
        assert!(
            events.iter().any(|e| e == want),
            "{want} missing: {events:?}"
        );
    }
    assert!(
        stack
            .b
            .process
            .stdout()
            .lines()
            .any(|l| l.contains("\"event\":\"used\"") && l.contains(&id)),
        "the use was not decided by replica B"
    );
    let stdout = format!("{}{}", stack.a.process.stdout(), stack.b.process.stdout());
    assert!(
        !stdout.contains(&alice) && !stdout.contains(&bob),
        "a token in the audit log"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_retries_through_both_replicas_never_both_succeed_and_self_approval_is_refused()
{
    let stack = Stack::start().await;
    // A lead who is also a dba asks; they may approve others' requests, never their own.
    let lead = mint("lead", &["dba", "dba-lead"], "");
    let bob = mint("bob", &["dba-lead"], "");
    let path = "/databases/payments";
    let id = stack
        .send(Via::A, "DELETE", path, &lead)
        .await
        .approval_id();
    let (ok, out, err) = stack.cli(Via::B, &lead, &["approve", &id]);
    assert!(!ok, "self-approval succeeded: {out}");
    assert!(err.contains("nobody approves their own request"), "{err}");
    let (_, listed, _) = stack.cli(Via::A, &lead, &["list"]);
    assert!(
        !listed.contains(&id),
        "their own request is not listed to them: {listed}"
    );
    assert_approval_required(
        &stack.send(Via::B, "DELETE", path, &lead).await,
        "after the refused self-approval",
    );

    // INVARIANT under test: at most one of the concurrent retries passes. A use can also be
    // lost to fail-closed behaviour (a Check that exceeds Envoy's 250ms ext_authz timeout on
    // a loaded machine is denied by Envoy even when it spent the use), so across the rounds
    // the approval must still have been usable at least twice out of three.
    let mut total = 0;
    for round in 0..3 {
        let id = if round == 0 {
            id.clone()
        } else {
            stack
                .send(Via::A, "DELETE", path, &lead)
                .await
                .approval_id()
        };
        stack.approve(Via::B, &bob, &id, &[]);
        let mut tasks = Vec::new();
        for i in 0..8 {
            let via = if i % 2 == 0 { Via::A } else { Via::B };
            tasks.push(stack.send(via, "DELETE", path, &lead));
        }
        let answers = futures_util::future::join_all(tasks).await;
        let allowed = answers.iter().filter(|a| a.status == 200).count();
        assert!(
            allowed <= 1,
            "round {round}: {allowed} of 8 concurrent retries passed: {answers:?}"
        );
        total += allowed;
        for a in answers.iter().filter(|a| a.status != 200) {
            // Every loser is a deny: approval_required, or a fail-closed deny under load.
            assert!(!a.upstream(), "a loser reached the upstream: {a:?}");
            assert!(
                [403, 503].contains(&a.status),
                "round {round}: unexpected answer {a:?}"
            );
        }
    }
    assert!(
        total >= 2,
        "only {total} of 3 approvals were usable\n{}",
        stack.logs()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_approval_expires_on_time() {
    let stack = Stack::start().await;
    let alice = mint("alice", &["dba"], "");
    let bob = mint("bob", &["dba-lead"], "");
    let path = "/exports/customers";
    let id = stack.send(Via::A, "POST", path, &alice).await.approval_id();
    // Longer than the rule allows is refused.
    let (ok, _, err) = stack.cli(Via::A, &bob, &["approve", &id, "--ttl", "1h"]);
    assert!(!ok && err.contains("longer than the rule"), "{err}");
    let approved_at = Instant::now();
    stack.approve(Via::A, &bob, &id, &["--ttl", "3s"]);

    // Allowed (many uses) until the ttl ends, then refused.
    let mut allowed = 0;
    let refused_after = loop {
        let via = if allowed % 2 == 0 { Via::A } else { Via::B };
        let answer = stack.send(via, "POST", path, &alice).await;
        if answer.status != 200 {
            assert_approval_required(&answer, "after expiry");
            break approved_at.elapsed();
        }
        allowed += 1;
        assert!(
            approved_at.elapsed() < Duration::from_secs(6),
            "still allowed after 6s (ttl 3s)"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(allowed >= 3, "only {allowed} uses before expiry");
    assert!(
        refused_after >= Duration::from_millis(2500),
        "refused too early: {refused_after:?}"
    );
    // The expiry reaches the audit log (the sweep runs every 2s on each replica, once in all).
    let started = Instant::now();
    loop {
        let expired = stack
            .approval_events(&id)
            .iter()
            .filter(|e| *e == "expired")
            .count();
        if expired == 1 {
            break;
        }
        assert!(expired == 0, "expired logged {expired} times");
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "no expired event"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redis_down_refuses_the_gated_route_with_a_clear_reason_and_ordinary_routes_work() {
    let mut stack = Stack::start().await;
    let alice = mint("alice", &["dba"], "orders:read");
    assert_approval_required(
        &stack
            .send(Via::A, "DELETE", "/databases/orders", &alice)
            .await,
        "with redis up",
    );

    stack.redis.stop();
    for via in [Via::A, Via::B] {
        let gated = stack.send(via, "DELETE", "/databases/orders", &alice).await;
        assert_eq!(gated.status, 503, "{via:?}: {gated:?}\n{}", stack.logs());
        assert!(!gated.upstream());
        let body = gated.json();
        assert_eq!(body["error"], "state_unavailable", "{body}");
        assert!(
            body["reason"].as_str().unwrap().contains("unreachable")
                || body["reason"].as_str().unwrap().contains("in time"),
            "{body}"
        );
        let ordinary = stack.send(via, "GET", "/orders/42", &alice).await;
        assert_eq!(ordinary.status, 200, "{via:?}: {ordinary:?}");
        assert!(ordinary.upstream());
        let public = stack.send(via, "GET", "/healthz", &alice).await;
        assert_eq!(public.status, 200, "{via:?}: {public:?}");
    }

    // Recovery is automatic.
    stack.redis.restart();
    let started = Instant::now();
    loop {
        let answer = stack
            .send(Via::B, "DELETE", "/databases/orders", &alice)
            .await;
        if answer.status == 403 && !answer.body.is_empty() {
            assert_approval_required(&answer, "after redis is back");
            break;
        }
        // Until Redis answers again: Portcullis's 503, or, while its client reconnects, a
        // Check that outlives Envoy's ext_authz timeout (Envoy's own bodiless 403). Both deny.
        assert!(
            answer.status == 503 || (answer.status == 403 && answer.body.is_empty()),
            "{answer:?}"
        );
        assert!(!answer.upstream());
        assert!(started.elapsed() < Duration::from_secs(10), "no recovery");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_approval_covers_exactly_its_body_and_a_body_cut_short_is_refused() {
    // Envoy sends at most 64 bytes of a body and, past that, the first 64 marked partial.
    let stack = Stack::start_with_body(Some(
        "{ max_request_bytes: 64, allow_partial_message: true, pack_as_bytes: true }",
    ))
    .await;
    let alice = mint("alice", &["dba"], "");
    let bob = mint("bob", &["dba-lead"], "");
    let path = "/exports/customers?region=eu-west&limit=10";
    let body = r#"{"format":"csv","rows":10}"#;

    let first = stack.send_body(Via::A, "POST", path, &alice, body).await;
    assert_approval_required(&first, "first request");
    let id = first.approval_id();
    let (ok, listed, err) = stack.cli(Via::B, &bob, &["list"]);
    assert!(ok, "{listed}{err}");
    let body_sha256 = sha256_hex(body.as_bytes());
    assert!(
        listed.contains(&format!("body sha256: {body_sha256}")),
        "the listing names the body's digest: {listed}"
    );
    // And the query's parameter names and digest, never its values.
    let query_sha256 = sha256_hex(b"region=eu-west&limit=10");
    assert!(
        listed.contains("query: ?region=…&limit=…") && listed.contains(&query_sha256),
        "{listed}"
    );
    assert!(
        !listed.contains("eu-west"),
        "a query value was shown: {listed}"
    );
    stack.approve(Via::B, &bob, &id, &[]);

    let allowed = stack.send_body(Via::B, "POST", path, &alice, body).await;
    assert_eq!(allowed.status, 200, "{allowed:?}\n{}", stack.logs());
    // Another body is another action.
    let other = r#"{"format":"csv","rows":99}"#;
    let refused = stack.send_body(Via::A, "POST", path, &alice, other).await;
    assert_approval_required(&refused, "another body");
    assert_ne!(refused.approval_id(), id);

    // A body longer than Envoy forwards, starting with the approved one: only its first 64
    // bytes reach the replica, so no approval may cover it, and none is asked for.
    let long = format!("{body}{}", " ".repeat(100));
    for via in [Via::A, Via::B] {
        let cut = stack.send_body(via, "POST", path, &alice, &long).await;
        assert_approval_required(&cut, "a body cut short");
        assert!(
            cut.json()["reason"]
                .as_str()
                .unwrap()
                .contains("only part of it"),
            "{cut:?}"
        );
        assert!(cut.json().get("approval_id").is_none(), "{cut:?}");
        assert!(
            cut.headers.get("x-portcullis-approval-id").is_none(),
            "{cut:?}"
        );
    }
    let (ok, listed, err) = stack.cli(Via::A, &bob, &["list"]);
    assert!(ok, "{listed}{err}");
    assert_eq!(
        listed.matches("apr_").count(),
        1,
        "only the other body's request: {listed}"
    );
}
