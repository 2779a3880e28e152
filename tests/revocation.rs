//! Revocation through the running server, in-process: runtime entries through the admin API
//! and the file list reloaded on change and on SIGHUP, both refusing tokens that are already in
//! the verified-token cache.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use envoy_types::ext_authz::v3::pb::HttpResponse;
use portcullis::admin::metrics::ResultLabels;
use portcullis::server::Server;
use serde_json::{Value, json};
use support::inproc::{bearer_headers, check_request, send_check, start_server};
use support::jwt::{DEV_ISSUER, dev_jwks_path, merged, mint_dev, now};

fn mint(claims: Value) -> String {
    mint_dev(merged(json!({ "scope": "orders:read" }), claims))
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
        let jwks = dev_jwks_path();
        let jwks = jwks.display();
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
        let server = start_server(dir.path(), "portcullis.yaml", &text).await;
        Harness {
            server,
            revoked,
            _dir: dir,
        }
    }

    /// The HTTP status Envoy would answer with (200 for an allow).
    async fn check(&self, token: &str) -> u16 {
        let req = check_request(
            "GET",
            "/orders/1",
            "api.example.com",
            Some(("10.0.0.7", None)),
            bearer_headers(token),
            "",
        );
        let resp = send_check(self.server.grpc_addr, req).await;
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

    /// `POST /revocations` with `body` and no credential.
    async fn post_revocation(&self, http: &reqwest::Client, body: &Value) -> reqwest::Response {
        http.post(self.admin("/revocations"))
            .json(body)
            .send()
            .await
            .unwrap()
    }

    /// `DELETE /revocations?<query>` (no credential): the status.
    async fn delete_revocation(&self, http: &reqwest::Client, query: &str) -> u16 {
        self.delete_revocation_answer(http, query).await.0
    }

    /// `DELETE /revocations?<query>` (no credential): the status and the body.
    async fn delete_revocation_answer(&self, http: &reqwest::Client, query: &str) -> (u16, String) {
        let resp = http
            .delete(self.admin(&format!("/revocations?{query}")))
            .send()
            .await
            .unwrap();
        (resp.status().as_u16(), resp.text().await.unwrap())
    }

    /// Waits (up to 10 s) until `GET /revocations` answers from shared state (no
    /// `runtime_from` fallback) with a listing `done` accepts; `what` names the change.
    async fn wait_listing(
        &self,
        http: &reqwest::Client,
        what: &str,
        done: impl Fn(&Value) -> bool,
    ) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let list = self.revocations(http).await;
            if list["runtime_from"].is_null() && done(&list) {
                return;
            }
            assert!(Instant::now() < deadline, "{what} never landed: {list}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// `GET /revocations` (no credential) as JSON.
    async fn revocations(&self, http: &reqwest::Client) -> Value {
        http.get(self.admin("/revocations"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
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
    let resp = h
        .post_revocation(&http, &json!({"jti": "tok-1", "expires_at": now() + 600}))
        .await;
    assert_eq!(resp.status(), 201);
    // In memory the entry is this process's alone: the answer says a restart forgets it.
    let body: Value = resp.json().await.unwrap();
    assert!(
        body["note"]
            .as_str()
            .unwrap()
            .contains("a restart forgets it"),
        "{body}"
    );
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

    let list = h.revocations(&http).await;
    assert_eq!(list["runtime"][0]["kind"], "jti");
    assert_eq!(list["runtime"][0]["value"], "tok-1");

    assert_eq!(h.delete_revocation(&http, "jti=tok-1").await, 204);
    assert_eq!(h.check(&token).await, 200);
    assert_eq!(h.delete_revocation(&http, "jti=tok-1").await, 404);

    // Revoking a subject refuses all of its tokens; RFC 3339 expiry is accepted.
    let until = jiff::Timestamp::from_second(now() + 600)
        .unwrap()
        .to_string();
    let resp = h
        .post_revocation(&http, &json!({"sub": "alice", "expires_at": until}))
        .await;
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
        let resp = h.post_revocation(&http, &body).await;
        assert_eq!(resp.status(), 400, "{body}");
    }
    // A member given twice is refused, not resolved to whichever one the parser keeps.
    let resp = http
        .post(h.admin("/revocations"))
        .header("content-type", "application/json")
        .body(r#"{"sub": "alice", "sub": "bob"}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 400);
    let body: Value = resp.json().await.unwrap();
    assert!(
        body["error"].as_str().unwrap().contains("`sub` twice"),
        "{body}"
    );
    let list = h.revocations(&http).await;
    assert_eq!(list["runtime"], json!([]));
}

/// `curl -d '{"sub": "alice"}'` sends `application/x-www-form-urlencoded`: the answer says
/// the content type is missing, not that a JSON object is not one.
#[tokio::test]
async fn a_json_body_without_the_json_content_type_is_told_what_is_missing() {
    let h = Harness::start("1h", "", "revoked: []").await;
    let http = reqwest::Client::new();
    let resp = http
        .post(h.admin("/revocations"))
        .header("content-type", "application/x-www-form-urlencoded")
        .body(r#"{"sub": "alice"}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 415);
    let body: Value = resp.json().await.unwrap();
    assert!(
        body["error"]
            .as_str()
            .unwrap()
            .contains("content-type: application/json"),
        "{body}"
    );
}

/// A value is refused only past what a token can carry: no claim is longer than the longest
/// token taken (`tokens.max_bytes`, 8192 here). A 1500-byte `sub` was refused (the cap was
/// 1024 bytes), so only the file, one replica at a time, could revoke such a token.
#[tokio::test]
async fn a_revoked_value_may_be_as_long_as_a_token_allows() {
    let h = Harness::start("1h", "", "revoked: []").await;
    let http = reqwest::Client::new();
    let long = json!({"jti": "a".repeat(8193)});
    let resp = h.post_revocation(&http, &long).await;
    assert_eq!(resp.status(), 400);
    let body: Value = resp.json().await.unwrap();
    assert!(
        body["error"]
            .as_str()
            .unwrap()
            .contains("at most 8192 bytes (`tokens.max_bytes`)"),
        "{body}"
    );
    assert_eq!(h.revocations(&http).await["runtime"], json!([]));
    let sub = "L".repeat(1500);
    let resp = h.post_revocation(&http, &json!({"sub": sub})).await;
    assert_eq!(resp.status(), 201);
    let listed = h.revocations(&http).await;
    assert_eq!(listed["runtime"][0]["value"], sub.as_str(), "{listed}");
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
    let none = h.post_revocation(&http, &body).await;
    assert_eq!(none.status(), 401);
    // The challenge a 401 must carry (RFC 9110 11.6.1).
    assert_eq!(
        none.headers()["www-authenticate"],
        "Bearer realm=\"portcullis-admin\""
    );
    let wrong = http
        .post(h.admin("/revocations"))
        .bearer_auth("guess")
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(wrong.status(), 401);
    assert!(wrong.headers().contains_key("www-authenticate"));
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

    // A caller without the secret is refused before its body is read: one that sends a body
    // slowly (or never) cannot hold the admin listener's connections, which `/healthz`
    // shares. The refusal came only once the whole body was in.
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut conn = tokio::net::TcpStream::connect(h.server.admin_addr)
        .await
        .unwrap();
    conn.write_all(
        b"POST /revocations HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: 100000\r\n\r\n{\"sub\":",
    )
    .await
    .unwrap();
    let mut answer = [0u8; 12];
    tokio::time::timeout(Duration::from_secs(2), conn.read_exact(&mut answer))
        .await
        .expect("refused without waiting for the body")
        .unwrap();
    assert_eq!(&answer, b"HTTP/1.1 401");
}

/// `issuer` narrows an entry to one issuer's tokens: `sub` values are only unique within
/// an issuer. In the file and through the admin API; a name the config lacks is refused.
#[tokio::test]
async fn an_entry_scoped_to_an_issuer_names_only_that_issuers_tokens() {
    let h = Harness::start(
        "100ms",
        "",
        "revoked:\n  - {sub: bob, issuer: api-key}\n  - {sub: carol, issuer: dev}\n",
    )
    .await;
    let (alice, bob, carol) = (
        mint(json!({"sub": "alice"})),
        mint(json!({"sub": "bob"})),
        mint(json!({"sub": "carol"})),
    );
    assert_eq!(h.check(&bob).await, 200, "scoped to another issuer");
    assert_eq!(h.check(&carol).await, 401, "scoped to this token's issuer");

    let http = reqwest::Client::new();
    let resp = h
        .post_revocation(&http, &json!({"sub": "alice", "issuer": "api-key"}))
        .await;
    assert_eq!(resp.status(), 201);
    assert_eq!(h.check(&alice).await, 200);
    let resp = h
        .post_revocation(&http, &json!({"sub": "alice", "issuer": "dev"}))
        .await;
    assert_eq!(resp.status(), 201);
    assert_eq!(h.check(&alice).await, 401);
    let list = h.revocations(&http).await;
    let runtime = list["runtime"].as_array().unwrap();
    assert!(
        runtime
            .iter()
            .any(|e| e["issuer"] == "dev" && e["value"] == "alice" && e["kind"] == "sub"),
        "{list}"
    );
    assert!(
        list["file"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["issuer"] == "dev" && e["value"] == "carol"),
        "{list}"
    );

    // An issuer the config does not have: refused, naming the ones it has.
    let resp = h
        .post_revocation(&http, &json!({"sub": "alice", "issuer": "nope"}))
        .await;
    assert_eq!(resp.status(), 400);
    let text = resp.text().await.unwrap();
    assert!(text.contains("`dev`"), "{text}");

    // Removing the scoped entry needs its issuer; the unscoped one was never there. The
    // refusal says which scope the value is revoked under.
    let (status, missed) = h.delete_revocation_answer(&http, "sub=alice").await;
    assert_eq!(status, 404);
    assert!(
        missed.contains("for every issuer") && missed.contains("`issuer=dev`"),
        "{missed}"
    );
    // Any issuer name is accepted for removal (an entry may outlive its issuer's name).
    assert_eq!(
        h.delete_revocation(&http, "sub=alice&issuer=renamed").await,
        404
    );
    assert_eq!(
        h.delete_revocation(&http, "sub=alice&issuer=dev").await,
        204
    );
    assert_eq!(h.check(&alice).await, 200);

    // A file entry naming an unknown issuer fails the reload; the last good list stays.
    std::fs::write(&h.revoked, "revoked:\n  - {sub: alice, issuer: nope}\n").unwrap();
    h.wait_reloads("error", 1).await;
    assert_eq!(h.check(&carol).await, 401);
    assert_eq!(h.check(&alice).await, 200);
}

#[tokio::test]
async fn file_revocation_reloads_and_a_broken_or_deleted_file_keeps_it() {
    let h = Harness::start("100ms", "", "revoked: []").await;
    let token = mint(json!({"sub": "mallory", "sid": "sess-7"}));
    assert_eq!(h.check(&token).await, 200);

    std::fs::write(&h.revoked, "revoked:\n  - {sid: sess-7}\n").unwrap();
    h.wait_status(&token, 401).await;

    // `revoked:` alone is what every entry commented out, or a write caught after its
    // first line, reads as: not an empty list.
    for (n, broken) in [
        "",
        "revoked: [",
        "revoked: [{sid: a, sub: b}]",
        "revoked:\n",
    ]
    .into_iter()
    .enumerate()
    {
        std::fs::write(&h.revoked, broken).unwrap();
        h.wait_reloads("error", n as u64 + 1).await;
        assert_eq!(h.check(&token).await, 401, "after {broken:?}");
    }
    std::fs::remove_file(&h.revoked).unwrap();
    h.wait_reloads("error", 5).await;
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
    // A poll can also catch a file half-written, so count at least the five broken states.
    let errors: u64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("portcullis_revocation_reloads_total{result=\"error\"} "))
        .expect("the error counter is exported")
        .trim()
        .parse()
        .unwrap();
    assert!(errors >= 5, "{metrics}");
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

/// A generation marker of the revocation index made long ago (see `revocation.rs`).
const OLD_MARKER: &str = "epoch:1000000000:test";

/// The `state:` section for a Redis test server, keys under `p:`.
fn redis_state(redis: &support::redis::RedisServer) -> String {
    format!(
        "state: {{backend: redis, redis_url: '{}', key_prefix: 'p:', timeout: 200ms}}",
        redis.url()
    )
}

/// Pauses every client of the Redis behind `conn` for 1.5 s (`CLIENT PAUSE ... ALL`):
/// commands sent meanwhile are queued and run when it resumes.
async fn pause(conn: &mut redis::aio::MultiplexedConnection) {
    let paused: String = redis::cmd("CLIENT")
        .arg("PAUSE")
        .arg(1500)
        .arg("ALL")
        .query_async(conn)
        .await
        .unwrap();
    assert_eq!(paused, "OK");
}

/// Puts `entries` (member, expiry) in the runtime revocation index under a generation
/// marker made long ago: the set did not just appear, so a replica need not wait for
/// others to write back what a store lost.
async fn seed(store: &portcullis::state::RedisStore, entries: &[(&str, i64)]) {
    use portcullis::state::StateStore as _;
    for (member, expires_at) in entries {
        store
            .index_add("revoked:index", member, *expires_at)
            .await
            .unwrap();
    }
    store
        .index_add("revoked:index", OLD_MARKER, 253_402_300_799)
        .await
        .unwrap();
}

/// A replica that starts while a runtime revocation is in Redis refuses the token from its
/// first request (it reads the entries before serving). One that starts while Redis is
/// down refuses every credential (503) and reports not ready, until it has read them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_never_serves_before_it_has_read_the_runtime_revocations() {
    let mut redis = support::redis::RedisServer::start();
    let store =
        portcullis::state::RedisStore::new(&redis.url(), "p:", Duration::from_secs(1)).unwrap();
    seed(&store, &[("sub:alice", 9_999_999_999)]).await;
    let state = redis_state(&redis);
    let (alice, bob) = (mint(json!({"sub": "alice"})), mint(json!({"sub": "bob"})));

    // No sync for an hour but the one before serving: the first answer already knows.
    let h = Harness::start("1h", &state, "revoked: []\n").await;
    assert_eq!(h.check(&alice).await, 401);
    assert_eq!(h.check(&bob).await, 200);
    // Redis gone: the listing says so, and still shows what is in force here.
    redis.stop();
    let listed = reqwest::Client::new()
        .get(h.admin("/revocations"))
        .send()
        .await
        .unwrap();
    assert_eq!(listed.status(), 503);
    let body: Value = listed.json().await.unwrap();
    assert_eq!(body["runtime"][0]["value"], "alice", "{body}");
    assert!(
        body["runtime_from"].as_str().unwrap().contains("mirror"),
        "{body}"
    );
    assert_eq!(body["file"], json!([]), "{body}");
    h.server.shutdown().await;

    // Redis down at start: refused and not ready, then served once Redis is back.
    let h = Harness::start("200ms", &state, "revoked: []\n").await;
    let http = reqwest::Client::new();
    let ready = http.get(h.admin("/readyz")).send().await.unwrap();
    assert_eq!(ready.status(), 503);
    let body: Value = ready.json().await.unwrap();
    assert_eq!(body["runtime_revocations_loaded"], false, "{body}");
    assert_eq!(h.check(&bob).await, 503);
    let syncs = |result: &'static str| {
        h.server
            .metrics
            .revocation_syncs
            .get_or_create(&ResultLabels { result })
            .get()
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while syncs("error") == 0 {
        assert!(Instant::now() < deadline, "no failed sync counted");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(syncs("ok"), 0);
    redis.restart();
    h.wait_status(&bob, 200).await;
    assert!(syncs("ok") >= 1);
    let body: Value = http
        .get(h.admin("/readyz"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(body["runtime_revocations_loaded"], true, "{body}");
    h.server.shutdown().await;
}

/// A sync reads the revocations and nothing else: two million unrelated keys in the same
/// Redis (rate-limit buckets, DPoP records, other deployments) leave it one short read. It
/// used to walk the whole keyspace three times, which failed past about two million keys.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sync_reads_only_the_revocations_however_many_other_keys_share_redis() {
    use portcullis::state::StateStore as _;
    let redis = support::redis::RedisServer::start();
    let client = redis::Client::open(redis.url()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let filled: i64 = redis::cmd("EVAL")
        .arg("for i = 1, tonumber(ARGV[1]) do redis.call('SET', 'p:rate:' .. i, '1') end return redis.call('DBSIZE')")
        .arg(0)
        .arg(2_000_000)
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(filled, 2_000_000);
    // The shipped per-operation timeout: a listing gets ten of them.
    let store =
        portcullis::state::RedisStore::new(&redis.url(), "p:", Duration::from_millis(200)).unwrap();
    for who in ["sub:alice", "jti:j-1", "sid:s-1", OLD_MARKER] {
        store
            .index_add("revoked:index", who, now() + 600)
            .await
            .unwrap();
    }
    let mirror = portcullis::revocation::RuntimeRevocations::unsynced();
    assert_eq!(mirror.sync(&store, now()).await, Ok(3));
    assert!(mirror.synced());
    // And a replica starting on that Redis reads them before its first answer.
    let state = redis_state(&redis);
    let h = Harness::start("1h", &state, "revoked: []\n").await;
    assert_eq!(h.check(&mint(json!({"sub": "alice"}))).await, 401);
    assert_eq!(h.check(&mint(json!({"sub": "bob"}))).await, 200);
    h.server.shutdown().await;
}

/// Runtime revocations outlive a Redis that loses its data (restarted without persistence,
/// flushed): the replica that held them writes them back, so the revoked token stays
/// refused. Without that, the next sync read the empty set and the token was accepted again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revocation_survives_a_redis_that_restarts_empty() {
    let mut redis = support::redis::RedisServer::start();
    let state = redis_state(&redis);
    let h = Harness::start("100ms", &state, "revoked: []\n").await;
    let http = reqwest::Client::new();
    let alice = mint(json!({"sub": "alice", "scope": "orders:read"}));
    // A first replica on a new Redis waits for other replicas' write-back (none here).
    assert_eq!(h.check(&alice).await, 503);
    h.wait_status(&alice, 200).await;
    let expires_at = now() + 600;
    let resp = h
        .post_revocation(&http, &json!({"sub": "alice", "expires_at": expires_at}))
        .await;
    assert_eq!(resp.status(), 201);
    let body: Value = resp.json().await.unwrap();
    assert!(
        body["note"].is_null(),
        "shared and lasting on Redis: {body}"
    );
    assert_eq!(h.check(&alice).await, 401);
    // The mirror's size is a metric (the file's entries have their own).
    let deadline = Instant::now() + Duration::from_secs(5);
    while h.server.metrics.runtime_revocation_entries.get() != 1 {
        assert!(
            Instant::now() < deadline,
            "runtime_revocation_entries never 1"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(h.server.metrics.revocation_entries.get(), 0);

    redis.restart();
    // Written back within a few syncs, with its expiry, and refused all along.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        assert_eq!(
            h.check(&alice).await,
            401,
            "accepted again after the restart"
        );
        let list = h.revocations(&http).await;
        // Read from Redis (not this replica's mirror, which a 503 shows while Redis is down).
        if list["runtime_from"].is_null()
            && list["runtime"]
                .as_array()
                .is_some_and(|r| r.len() == 1 && r[0]["value"] == "alice")
        {
            assert_eq!(list["runtime"][0]["expires_at"], expires_at, "{list}");
            break;
        }
        assert!(Instant::now() < deadline, "never written back: {list}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // And a deletion after that is one: nothing writes it back.
    assert_eq!(h.delete_revocation(&http, "sub=alice").await, 204);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(h.check(&alice).await, 200);
    assert_eq!(h.revocations(&http).await["runtime"], json!([]));
    h.server.shutdown().await;
}

/// A second revocation of the same subject never cuts the first one short: the later
/// expiry is kept, and the answer says so.
#[tokio::test]
async fn revoking_again_keeps_the_later_expiry() {
    let h = Harness::start("1h", "", "revoked: []").await;
    let http = reqwest::Client::new();
    let long = now() + 30 * 86_400;
    let resp = h
        .post_revocation(&http, &json!({"sub": "carol", "expires_at": long}))
        .await;
    assert_eq!(resp.status(), 201);
    let resp = h
        .post_revocation(&http, &json!({"sub": "carol", "expires_at": now() + 2}))
        .await;
    assert_eq!(resp.status(), 201);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["expires_at"], long, "{body}");
    assert!(
        body["note"].as_str().unwrap().contains("never shortened"),
        "{body}"
    );
    let list = h.revocations(&http).await;
    assert_eq!(list["runtime"][0]["expires_at"], long, "{list}");
    tokio::time::sleep(Duration::from_secs(3)).await;
    let carol = mint(json!({"sub": "carol", "scope": "orders:read"}));
    assert_eq!(h.check(&carol).await, 401);
}

/// A runtime entry scoped to an issuer by a name the config no longer has (a restart with the
/// issuer renamed, same Redis, same `iss`) names every issuer's tokens: the revoked token
/// stays refused. It used to name none, and the token was accepted again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revocation_scoped_to_an_issuer_renamed_since_still_refuses_its_tokens() {
    use portcullis::revocation::RevokedKind;
    let redis = support::redis::RedisServer::start();
    let store =
        portcullis::state::RedisStore::new(&redis.url(), "p:", Duration::from_secs(1)).unwrap();
    // Revoked with `{"sub": "hank", "issuer": "dev-old"}` while the issuer had that name;
    // the config this replica starts on calls it `dev`.
    let member = RevokedKind::Sub.member(Some("dev-old"), "hank");
    seed(&store, &[(&member, now() + 600)]).await;
    let state = redis_state(&redis);
    let h = Harness::start("100ms", &state, "revoked: []\n").await;
    let (hank, ivy) = (mint(json!({"sub": "hank"})), mint(json!({"sub": "ivy"})));
    assert_eq!(h.check(&hank).await, 401, "accepted again after the rename");
    assert_eq!(h.check(&ivy).await, 200);
    // Deleting the entry under the old name lifts it.
    let http = reqwest::Client::new();
    assert_eq!(
        h.delete_revocation(&http, "sub=hank&issuer=dev-old").await,
        204
    );
    assert_eq!(h.check(&hank).await, 200);
    h.server.shutdown().await;
}

/// A DELETE (or POST) that Redis takes but answers too late (here paused by `CLIENT PAUSE`,
/// which runs the queued command when it resumes) is answered 503 saying the outcome is
/// unknown and how to find it out, not a plain "unavailable": the removal does land.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_redis_answers_too_late_is_reported_as_unknown() {
    let redis = support::redis::RedisServer::start();
    let state = redis_state(&redis);
    let h = Harness::start("100ms", &state, "revoked: []\n").await;
    let http = reqwest::Client::new();
    let resp = h.post_revocation(&http, &json!({"sub": "pete"})).await;
    assert_eq!(resp.status(), 201);
    // Redis now holds the removal script (a first call sends only its digest, and would be
    // answered "no such script" once Redis resumes).
    assert_eq!(h.delete_revocation(&http, "sub=nobody").await, 404);
    let client = redis::Client::open(redis.url()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    pause(&mut conn).await;
    let (status, body) = h.delete_revocation_answer(&http, "sub=pete").await;
    assert_eq!(status, 503, "{body}");
    assert!(
        body.contains("outcome is unknown") && body.contains("GET /revocations"),
        "{body}"
    );
    // Redis runs the queued removal when it resumes.
    h.wait_listing(&http, "the removal", |list| list["runtime"] == json!([]))
        .await;
    // The same for an add.
    pause(&mut conn).await;
    let resp = h.post_revocation(&http, &json!({"sub": "quinn"})).await;
    assert_eq!(resp.status(), 503);
    let body = resp.text().await.unwrap();
    assert!(
        body.contains("outcome is unknown") && body.contains("POST again"),
        "{body}"
    );
    h.wait_listing(&http, "the add", |list| {
        list["runtime"][0]["value"] == "quinn"
    })
    .await;
    h.server.shutdown().await;
}
