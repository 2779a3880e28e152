//! Hot reload: policy and key-file edits take effect, bad edits are refused while the last
//! good config stays in force, edits under load never fail a request, and SIGHUP reloads
//! the real binary.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use envoy_types::ext_authz::v3::pb::CheckRequest;
use envoy_types::pb::envoy::service::auth::v3::authorization_client::AuthorizationClient;
use portcullis::authz::RequestView;
use portcullis::reload::{ReloadOutcome, Reloader};
use portcullis::server::Server;
use serde_json::{Value, json};
use support::inproc::bearer_headers;
use support::jwt::{dev_claims, mint_dev, sign, sign_dev};

fn root() -> PathBuf {
    support::repo_root()
}

/// Signs claims (over dev-issuer defaults) with a PEM key and kid.
fn mint(pem: &Path, kid: &str, claims: Value) -> String {
    sign(pem, kid, &dev_claims(claims))
}

/// The shipped config in a temp dir (with a copy of the dev JWKS), on free ports.
struct Setup {
    dir: tempfile::TempDir,
    shipped: String,
}

impl Setup {
    fn new() -> Setup {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("dev")).unwrap();
        std::fs::copy(
            root().join("config/dev/jwks.json"),
            dir.path().join("dev/jwks.json"),
        )
        .unwrap();
        std::fs::copy(
            root().join("config/revocations.yaml"),
            dir.path().join("revocations.yaml"),
        )
        .unwrap();
        let shipped = std::fs::read_to_string(root().join("config/portcullis.yaml"))
            .unwrap()
            .replace("listen: 127.0.0.1:9191", "listen: 127.0.0.1:0")
            .replace("admin_listen: 127.0.0.1:9192", "admin_listen: 127.0.0.1:0")
            .replace("http_listen: 127.0.0.1:9193", "http_listen: 127.0.0.1:0")
            .replace("  enabled: true ", "  enabled: false ");
        let s = Setup { dir, shipped };
        s.write(&s.shipped.clone());
        s
    }

    fn path(&self) -> PathBuf {
        self.dir.path().join("portcullis.yaml")
    }

    fn write(&self, text: &str) {
        // Write-then-rename, as editors and ConfigMap updates do: never a half-written file.
        let tmp = self.dir.path().join(".portcullis.yaml.tmp");
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(&tmp, self.path()).unwrap();
    }

    /// The server started on the current file, and a reloader watching it.
    async fn serve(&self) -> (Server, Reloader) {
        let server = Server::start(portcullis::config::load(&self.path()).unwrap())
            .await
            .unwrap();
        let reloader = Reloader::new(self.path(), server.engine.clone(), server.metrics.clone());
        (server, reloader)
    }

    /// The shipped policy with `orders:read` replaced by another scope.
    fn orders_read_needs(&self, scope: &str) -> String {
        self.shipped
            .replace("scopes: [orders:read]", &format!("scopes: [{scope}]"))
    }
}

async fn decide(server: &Server, method: &str, path: &str, token: &str) -> u16 {
    decision(server, method, path, token).await.http_status()
}

async fn decision(
    server: &Server,
    method: &str,
    path: &str,
    token: &str,
) -> portcullis::authz::Decision {
    let headers = bearer_headers(token);
    let view = RequestView {
        method,
        host: "api.example.com",
        path,
        headers: &headers,
        source_ip: None,
        source_principal: "",
        scheme: "http",
        peer_certificate: None,
    };
    server.engine.load_full().check(&view).await
}

/// Revokes `sub` of `issuer` for an hour as the admin API does: in shared state, then in
/// this replica's copy. Returns the entry's index member.
async fn revoke_at_runtime(server: &Server, issuer: &str, sub: &str) -> String {
    let (member, expires) = revoke_in_shared_state(server, issuer, sub).await;
    let engine = server.engine.load_full();
    engine.runtime_revoked.apply(&member, Some(expires));
    member
}

/// The shared-state half of `revoke_at_runtime` (another replica's admin call, before this
/// replica syncs): the entry's index member and expiry.
async fn revoke_in_shared_state(server: &Server, issuer: &str, sub: &str) -> (String, i64) {
    use portcullis::revocation::{RUNTIME_INDEX, RevokedKind};
    let member = RevokedKind::Sub.member(Some(issuer), sub);
    let expires = support::jwt::now() + 3600;
    let engine = server.engine.load_full();
    engine
        .state
        .index_add(RUNTIME_INDEX, &member, expires)
        .await
        .unwrap();
    (member, expires)
}

/// The reason of a refused reload (any other outcome fails the test).
fn rejected(outcome: ReloadOutcome) -> String {
    match outcome {
        ReloadOutcome::Rejected(reason) => reason,
        other => panic!("expected a rejection, got {other:?}"),
    }
}

fn reloads(server: &Server, result: &'static str) -> u64 {
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &server.metrics.registry()).unwrap();
    text.lines()
        .find(|l| l.starts_with("portcullis_config_reloads_total{") && l.contains(result))
        .and_then(|l| l.split_whitespace().last())
        .and_then(|v| v.parse::<f64>().ok())
        .unwrap_or(0.0) as u64
}

/// The periodic check loads a change only once two reads a tick apart agree: a config being
/// written (valid YAML halfway through, a rule cut short before its `approval:`) is never
/// put in force in between.
#[tokio::test]
async fn the_periodic_check_loads_only_contents_read_twice() {
    let s = Setup::new();
    let (server, mut reloader) = s.serve().await;
    let alice = mint_dev(json!({"sub": "alice", "scope": "orders:read"}));
    assert_eq!(reloader.tick().await, ReloadOutcome::Unchanged);

    // A first version, read once, then another: neither is loaded yet.
    std::fs::write(s.path(), s.orders_read_needs("orders:audit")).unwrap();
    assert_eq!(reloader.tick().await, ReloadOutcome::Settling);
    assert_eq!(decide(&server, "GET", "/orders/1", &alice).await, 200);
    std::fs::write(s.path(), s.orders_read_needs("orders:write")).unwrap();
    assert_eq!(reloader.tick().await, ReloadOutcome::Settling);
    assert_eq!(decide(&server, "GET", "/orders/1", &alice).await, 200);
    assert_eq!(reloads(&server, "ok") + reloads(&server, "error"), 0);

    // Read the same a tick later: in force.
    assert_eq!(reloader.tick().await, ReloadOutcome::Applied);
    assert_eq!(decide(&server, "GET", "/orders/1", &alice).await, 403);
    assert_eq!(reloader.tick().await, ReloadOutcome::Unchanged);
    assert_eq!(reloads(&server, "ok"), 1);

    // SIGHUP's forced reload does not wait.
    s.write(&s.shipped);
    assert_eq!(reloader.poll(true).await, ReloadOutcome::Applied);
    assert_eq!(decide(&server, "GET", "/orders/1", &alice).await, 200);
    server.shutdown().await;
}

#[tokio::test]
async fn a_policy_edit_takes_effect_and_is_counted() {
    let s = Setup::new();
    let (server, mut reloader) = s.serve().await;
    let alice = mint_dev(json!({"sub": "alice", "scope": "orders:read"}));
    assert_eq!(decide(&server, "GET", "/orders/1", &alice).await, 200);
    assert_eq!(reloader.poll(false).await, ReloadOutcome::Unchanged);

    s.write(&s.orders_read_needs("orders:audit"));
    assert_eq!(reloader.poll(false).await, ReloadOutcome::Applied);
    assert_eq!(decide(&server, "GET", "/orders/1", &alice).await, 403);
    assert_eq!(reloads(&server, "ok"), 1);
    server.shutdown().await;
}

#[tokio::test]
async fn invalid_empty_and_deleted_configs_are_refused_and_the_last_good_one_stays() {
    let s = Setup::new();
    let (server, mut reloader) = s.serve().await;
    let alice = mint_dev(json!({"sub": "alice", "scope": "orders:read"}));
    let nobody = mint_dev(json!({"sub": "mallory"}));

    // A misspelt field: refused, naming the field.
    s.write(
        &s.shipped
            .replace("scopes: [orders:read]", "scpoes: [orders:read]"),
    );
    match reloader.poll(false).await {
        ReloadOutcome::Rejected(reason) => assert!(reason.contains("scpoes"), "{reason}"),
        other => panic!("expected a rejection, got {other:?}"),
    }
    // An empty file: refused, never allow-all.
    s.write("");
    assert!(matches!(
        reloader.poll(false).await,
        ReloadOutcome::Rejected(_)
    ));
    // A deleted file: refused.
    std::fs::remove_file(s.path()).unwrap();
    assert!(matches!(
        reloader.poll(false).await,
        ReloadOutcome::Rejected(_)
    ));

    // The original policy is still in force: alice allowed, mallory and no-route denied.
    assert_eq!(decide(&server, "GET", "/orders/1", &alice).await, 200);
    assert_eq!(decide(&server, "GET", "/orders/1", &nobody).await, 403);
    assert_eq!(decide(&server, "GET", "/anything-else", &alice).await, 403);
    assert_eq!(reloads(&server, "error"), 3);
    assert_eq!(reloads(&server, "ok"), 0);

    // A fixed file is picked up again.
    s.write(&s.orders_read_needs("orders:audit"));
    assert_eq!(reloader.poll(false).await, ReloadOutcome::Applied);
    assert_eq!(decide(&server, "GET", "/orders/1", &alice).await, 403);
    server.shutdown().await;
}

/// A config refused for a file it names that is not there yet (a new key file, written
/// after the config) is applied once the file comes: only the config in force's files were
/// watched, so the refused one waited for a SIGHUP while the grant it removed stayed in
/// force. It is tried again every `retry_refused_every`, and a refusal for the same reason
/// is told once.
#[tokio::test]
async fn a_config_refused_for_a_missing_file_is_applied_once_the_file_comes() {
    let s = Setup::new();
    let (server, reloader) = s.serve().await;
    let mut reloader = reloader.retry_refused_every(Duration::ZERO);
    let alice = mint_dev(json!({"sub": "alice", "scope": "orders:read"}));
    assert_eq!(decide(&server, "GET", "/orders/1", &alice).await, 200);
    let edited = s
        .orders_read_needs("orders:audit")
        .replace("file: dev/jwks.json", "file: dev/jwks-2026.json");
    assert!(edited.contains("dev/jwks-2026.json"));
    s.write(&edited);
    let reason = rejected(reloader.poll(false).await);
    assert!(reason.contains("jwks-2026.json"), "{reason}");
    assert_eq!(decide(&server, "GET", "/orders/1", &alice).await, 200);
    assert_eq!(reloader.poll(false).await, ReloadOutcome::Unchanged);
    assert_eq!(
        reloads(&server, "error"),
        1,
        "the same refusal is told once"
    );
    std::fs::copy(
        s.dir.path().join("dev/jwks.json"),
        s.dir.path().join("dev/jwks-2026.json"),
    )
    .unwrap();
    assert_eq!(reloader.poll(false).await, ReloadOutcome::Applied);
    assert_eq!(decide(&server, "GET", "/orders/1", &alice).await, 403);
    server.shutdown().await;
}

/// The shared-state store is built at start: a reload that changes `state` is refused
/// (a restart applies it), and the policy in force stays, instead of a reload reported as
/// done while the replica keeps the store it was told to leave.
#[tokio::test]
async fn a_changed_state_store_is_refused_until_a_restart() {
    let s = Setup::new();
    let (server, mut reloader) = s.serve().await;
    let alice = mint_dev(json!({"sub": "alice", "scope": "orders:read"}));
    let moved = s.orders_read_needs("orders:audit")
        + "\nstate: {backend: redis, redis_url: 'redis://:hunter2@127.0.0.1:1/0'}\n";
    s.write(&moved);
    match reloader.poll(false).await {
        ReloadOutcome::Rejected(reason) => {
            assert!(
                reason.contains("state:") && reason.contains("restart"),
                "{reason}"
            );
            assert!(
                !reason.contains("hunter2"),
                "the Redis password leaked: {reason}"
            );
        }
        other => panic!("expected a rejection, got {other:?}"),
    }
    // The policy in force is the one before the edit.
    assert_eq!(decide(&server, "GET", "/orders/1", &alice).await, 200);
    assert_eq!(reloads(&server, "error"), 1);
    server.shutdown().await;
}

/// `state.tls` is part of the shared-state settings: with the same URL, a reload that only
/// points `ca_file` at another CA is refused until a restart (the store keeps the CA it
/// started with), while a policy edit beside an unchanged `state` applies.
#[tokio::test]
async fn a_changed_redis_tls_file_is_refused_until_a_restart() {
    let s = Setup::new();
    let pki = root().join("tests/fixtures/mtls");
    // Nothing listens on port 1: the store is lazy, and the start does not need it.
    let state = |ca: &str| {
        format!(
            "\nstate: {{backend: redis, redis_url: 'rediss://:hunter2@127.0.0.1:1/0', timeout: 50ms, tls: {{ca_file: '{}'}}}}\n",
            pki.join(ca).display()
        )
    };
    s.write(&(s.shipped.clone() + &state("ca.crt")));
    let (server, mut reloader) = s.serve().await;
    s.write(&(s.orders_read_needs("orders:audit") + &state("ca.crt")));
    assert_eq!(reloader.poll(false).await, ReloadOutcome::Applied);
    s.write(&(s.shipped.clone() + &state("other-ca.crt")));
    match reloader.poll(false).await {
        ReloadOutcome::Rejected(reason) => {
            assert!(
                reason.contains("state:") && reason.contains("tls") && reason.contains("restart"),
                "{reason}"
            );
            assert!(
                !reason.contains("hunter2"),
                "the Redis password leaked: {reason}"
            );
        }
        other => panic!("expected a rejection, got {other:?}"),
    }
    assert_eq!(reloads(&server, "ok"), 1);
    assert_eq!(reloads(&server, "error"), 1);
    server.shutdown().await;
}

/// The gRPC listener's TLS settings are read at start: a reload that changes them (here it
/// adds TLS to the plaintext listener; removing a principal from the allow-list is the same
/// comparison) is refused until a restart, instead of reported as applied while the listener
/// keeps the settings it started with.
#[tokio::test]
async fn changed_tls_settings_are_refused_until_a_restart() {
    let s = Setup::new();
    let (server, mut reloader) = s.serve().await;
    let alice = mint_dev(json!({"sub": "alice", "scope": "orders:read"}));
    let pki = root().join("tests/fixtures/mtls");
    let tls = format!(
        "  tls: {{cert: {}, key: {}, client_ca: {}, allowed_client_principals: ['spiffe://example.org/envoy']}}\n",
        pki.join("server.crt").display(),
        pki.join("server.key").display(),
        pki.join("ca.crt").display(),
    );
    let moved = s.orders_read_needs("orders:audit").replace(
        "  listen: 127.0.0.1:0",
        &format!("{tls}  listen: 127.0.0.1:0"),
    );
    assert_ne!(moved, s.orders_read_needs("orders:audit"));
    s.write(&moved);
    match reloader.poll(false).await {
        ReloadOutcome::Rejected(reason) => {
            assert!(
                reason.contains("server.tls:") && reason.contains("restart"),
                "{reason}"
            );
        }
        other => panic!("expected a rejection, got {other:?}"),
    }
    // The policy in force is the one before the edit.
    assert_eq!(decide(&server, "GET", "/orders/1", &alice).await, 200);
    assert_eq!(reloads(&server, "error"), 1);

    // The same for the approvals listener's TLS (`approvals_listen` itself, an address,
    // only warns).
    let approvals = format!(
        "  approvals_listen: 127.0.0.1:0\n{}",
        tls.replace("  tls:", "  approvals_tls:")
    );
    let moved = s.orders_read_needs("orders:audit").replace(
        "  listen: 127.0.0.1:0",
        &format!("{approvals}  listen: 127.0.0.1:0"),
    );
    s.write(&moved);
    match reloader.poll(false).await {
        ReloadOutcome::Rejected(reason) => {
            assert!(
                reason.contains("server.approvals_tls:") && reason.contains("restart"),
                "{reason}"
            );
        }
        other => panic!("expected a rejection, got {other:?}"),
    }
    assert_eq!(decide(&server, "GET", "/orders/1", &alice).await, 200);
    assert_eq!(reloads(&server, "error"), 2);
    server.shutdown().await;
}

/// An issuer renamed while the revocation file scopes an entry to it: reloading the same
/// file against the new names fails, so the reload is refused (the entry would otherwise go
/// quietly unmatched). Fixing the file alone retries the config.
#[tokio::test]
async fn a_reload_that_orphans_a_scoped_revocation_is_refused() {
    let s = Setup::new();
    let revocations = s.dir.path().join("revocations.yaml");
    std::fs::write(&revocations, "revoked:\n  - {sub: mallory, issuer: dev}\n").unwrap();
    let (server, mut reloader) = s.serve().await;
    let mallory = mint_dev(json!({"sub": "mallory", "scope": "orders:read"}));
    assert_eq!(decide(&server, "GET", "/orders/1", &mallory).await, 401);
    s.write(&s.shipped.replace("  - name: dev\n", "  - name: dev2\n"));
    let reason = rejected(reloader.poll(false).await);
    assert!(
        reason.contains("revocation.file") && reason.contains("`dev`"),
        "{reason}"
    );
    assert_eq!(decide(&server, "GET", "/orders/1", &mallory).await, 401);
    assert_eq!(reloader.poll(false).await, ReloadOutcome::Unchanged);

    // The operator renames the entry too: that edit alone retries the config.
    std::fs::write(&revocations, "revoked:\n  - {sub: mallory, issuer: dev2}\n").unwrap();
    assert_eq!(reloader.poll(false).await, ReloadOutcome::Applied);
    assert_eq!(decide(&server, "GET", "/orders/1", &mallory).await, 401);
    server.shutdown().await;
}

/// The same for a runtime (admin-API) entry scoped to the issuer: it would stop matching, so
/// the reload is refused until the entry is deleted.
#[tokio::test]
async fn a_reload_that_orphans_a_runtime_revocation_is_refused() {
    let s = Setup::new();
    let (server, mut reloader) = s.serve().await;
    let mallory = mint_dev(json!({"sub": "mallory", "scope": "orders:read"}));
    let member = revoke_at_runtime(&server, "dev", "mallory").await;
    let engine = server.engine.load_full();
    assert_eq!(decide(&server, "GET", "/orders/1", &mallory).await, 401);
    s.write(&s.shipped.replace("  - name: dev\n", "  - name: dev2\n"));
    let reason = rejected(reloader.poll(false).await);
    assert!(
        reason.contains("runtime revocations") && reason.contains("`dev`"),
        "{reason}"
    );
    assert_eq!(decide(&server, "GET", "/orders/1", &mallory).await, 401);
    engine
        .state
        .index_remove(
            portcullis::revocation::RUNTIME_INDEX,
            &member,
            support::jwt::now(),
        )
        .await
        .unwrap();
    engine.runtime_revoked.apply(&member, None);
    assert_eq!(reloader.poll(true).await, ReloadOutcome::Applied);
    server.shutdown().await;
}

/// An entry another replica just wrote to shared state, not yet in this replica's copy: a
/// reload that renames its issuer reads the shared entries first, and is refused.
#[tokio::test]
async fn a_reload_that_orphans_another_replicas_fresh_revocation_is_refused() {
    let s = Setup::new();
    let (server, mut reloader) = s.serve().await;
    // Written as another replica's admin API does, before this replica's next sync.
    revoke_in_shared_state(&server, "dev", "mallory").await;
    let engine = server.engine.load_full();
    assert!(engine.runtime_revoked.scoped_issuers().is_empty());
    s.write(&s.shipped.replace("  - name: dev\n", "  - name: dev2\n"));
    let reason = rejected(reloader.poll(false).await);
    assert!(
        reason.contains("runtime revocations") && reason.contains("`dev`"),
        "{reason}"
    );
    server.shutdown().await;
}

#[tokio::test]
async fn a_rotated_key_file_is_reloaded() {
    let s = Setup::new();
    let (server, mut reloader) = s.serve().await;
    let fixtures = root().join("tests/fixtures/keys");
    let old = mint_dev(json!({"sub": "alice", "scope": "orders:read"}));
    let new = mint(
        &fixtures.join("rsa2048.pem"),
        "rsa2048",
        json!({"sub": "alice", "scope": "orders:read"}),
    );
    assert_eq!(decide(&server, "GET", "/orders/1", &old).await, 200);
    assert_eq!(decide(&server, "GET", "/orders/1", &new).await, 401);

    std::fs::copy(
        fixtures.join("rsa2048.jwks.json"),
        s.dir.path().join("dev/jwks.json"),
    )
    .unwrap();
    assert_eq!(reloader.poll(false).await, ReloadOutcome::Applied);
    assert_eq!(decide(&server, "GET", "/orders/1", &new).await, 200);
    assert_eq!(decide(&server, "GET", "/orders/1", &old).await, 401);

    // A key file that stops parsing (saved half-written) is refused; the rotated key keeps
    // working.
    std::fs::write(s.dir.path().join("dev/jwks.json"), "{\"keys\": [").unwrap();
    let reason = rejected(reloader.poll(false).await);
    assert!(
        reason.contains("keys unavailable for issuer(s) `dev`"),
        "{reason}"
    );
    assert_eq!(decide(&server, "GET", "/orders/1", &new).await, 200);

    // A key file emptied on purpose (`{"keys": []}`) withdraws its keys at once: a
    // compromised key stops working at the reload, not at the next re-read of the file.
    std::fs::write(s.dir.path().join("dev/jwks.json"), "{\"keys\": []}").unwrap();
    assert_eq!(reloader.poll(false).await, ReloadOutcome::Applied);
    let refused = decision(&server, "GET", "/orders/1", &new).await;
    assert_eq!(refused.http_status(), 401);
    // The reason says what happened, not "not loaded yet" (the reload's key store is new).
    assert_eq!(
        refused.detail, "issuer `dev` publishes no usable key",
        "{refused:?}"
    );
    let status = &server.engine.load_full().keys.status()[0];
    assert!(status.withdrawn && !status.usable, "{status:?}");
    server.shutdown().await;
}

/// An API key file truncated on disk (an editor saving in place) is refused like an empty
/// config: the keys in force stay, instead of every API key being refused until the file is
/// written again. A key whose entry is deleted (its revocation) is gone at that reload,
/// though the shipped rule still names it: that reload used to be refused, and the key kept
/// working.
#[tokio::test]
async fn a_truncated_api_key_file_keeps_the_keys_in_force_and_a_deleted_key_is_revoked() {
    let s = Setup::new();
    let start = s.shipped.find("    - id: reporting-e0dd28\n").unwrap();
    let end = s.shipped[start..]
        .find("      routes: [\"GET /orders/{id}\"]\n")
        .map(|i| start + i + "      routes: [\"GET /orders/{id}\"]\n".len())
        .unwrap();
    let entry = &s.shipped[start..end];
    let file = s.dir.path().join("keys.yaml");
    std::fs::write(&file, format!("keys:\n{entry}")).unwrap();
    let inline = s.shipped.replace(entry, "").replace(
        "  keys:\n    # DEVELOPMENT ONLY",
        "  file: keys.yaml\n    # DEVELOPMENT ONLY",
    );
    assert!(inline.contains("file: keys.yaml") && !inline.contains("- id: reporting-e0dd28"));
    s.write(&inline);
    let (server, mut reloader) = s.serve().await;
    let key = async |server: &Server| {
        let headers = std::collections::HashMap::from([(
            "x-api-key".to_string(),
            "pck_5AEWWjqRmg8M1focDlwcCo0V_eMw631tr23y0JSA0bM".to_string(),
        )]);
        let view = RequestView {
            method: "GET",
            host: "api.example.com",
            path: "/orders/1",
            headers: &headers,
            source_ip: None,
            source_principal: "",
            scheme: "http",
            peer_certificate: None,
        };
        server.engine.load_full().check(&view).await.http_status()
    };
    assert_eq!(key(&server).await, 200);

    std::fs::write(&file, "").unwrap();
    let reason = rejected(reloader.poll(false).await);
    assert!(
        reason.contains("api_keys.file") && reason.contains("is empty"),
        "{reason}"
    );
    assert_eq!(key(&server).await, 200);

    std::fs::write(&file, "keys: []\n").unwrap();
    assert_eq!(reloader.poll(false).await, ReloadOutcome::Applied);
    assert_eq!(key(&server).await, 401);
    server.shutdown().await;
}

/// Removing an identity provider from `issuers` stops trusting it at that reload, though a
/// rule still names it (the rule then grants its name nothing, with a warning) and a
/// runtime revocation is scoped to it (it revokes nothing once the issuer's tokens are
/// refused; only a rename, which would void it, is refused). That reload used to be
/// refused, and the removed issuer stayed trusted.
#[tokio::test]
async fn removing_an_issuer_a_rule_names_stops_trusting_it() {
    let s = Setup::new();
    let dev = "  - name: dev\n    issuer: https://dev.portcullis.invalid\n";
    let partner = format!(
        "  - name: partner\n    issuer: https://partner.example\n    audiences: [portcullis-sample-api]\n    keys: {{ file: dev/jwks.json }}\n    claims: {{ scopes: scope }}\n{dev}"
    );
    let both = s.shipped.replace(dev, &partner).replace(
        "        scopes: [orders:read]",
        "        issuers: [dev, partner]\n        scopes: [orders:read]",
    );
    assert!(both.contains("issuers: [dev, partner]") && both.contains("name: partner"));
    s.write(&both);
    let (server, mut reloader) = s.serve().await;
    let claims = json!({"sub": "eve", "scope": "orders:read", "iss": "https://partner.example"});
    let from_partner = sign_dev(&dev_claims(claims));
    let alice = mint_dev(json!({"sub": "alice", "scope": "orders:read"}));
    assert_eq!(
        decide(&server, "GET", "/orders/1", &from_partner).await,
        200
    );
    assert_eq!(decide(&server, "GET", "/orders/1", &alice).await, 200);
    revoke_at_runtime(&server, "partner", "mallory").await;

    s.write(&both.replace(&partner, dev));
    assert_eq!(reloader.poll(false).await, ReloadOutcome::Applied);
    assert_eq!(
        decide(&server, "GET", "/orders/1", &from_partner).await,
        401
    );
    assert_eq!(decide(&server, "GET", "/orders/1", &alice).await, 200);
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policy_edits_under_load_never_fail_a_request() {
    let s = Setup::new();
    let server = Server::start_watching(portcullis::config::load(&s.path()).unwrap(), s.path())
        .await
        .unwrap();
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", server.grpc_addr))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let token = mint_dev(json!({"sub": "alice", "scope": "orders:read"}));
    let stop = Arc::new(AtomicBool::new(false));
    let (allowed, denied, broken) = (
        Arc::new(AtomicU64::new(0)),
        Arc::new(AtomicU64::new(0)),
        Arc::new(AtomicU64::new(0)),
    );
    let mut tasks = Vec::new();
    for _ in 0..16 {
        let mut client = AuthorizationClient::new(channel.clone());
        let (stop, allowed, denied, broken) = (
            stop.clone(),
            allowed.clone(),
            denied.clone(),
            broken.clone(),
        );
        let token = token.clone();
        tasks.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let req = check_request("GET", "/orders/7", &token);
                match client.check(req).await {
                    Ok(resp) => match resp.into_inner().status.map(|s| s.code) {
                        Some(0) => allowed.fetch_add(1, Ordering::Relaxed),
                        Some(7) => denied.fetch_add(1, Ordering::Relaxed),
                        _ => broken.fetch_add(1, Ordering::Relaxed),
                    },
                    Err(_) => broken.fetch_add(1, Ordering::Relaxed),
                };
            }
        }));
    }
    // Flip the policy back and forth while requests are in flight; wait for each flip to
    // be seen (the watcher polls every second).
    for round in 0..4 {
        let scope = if round % 2 == 0 {
            "orders:audit"
        } else {
            "orders:read"
        };
        s.write(&s.orders_read_needs(scope));
        let expect = if round % 2 == 0 { 403 } else { 200 };
        let deadline = Instant::now() + Duration::from_secs(10);
        while decide(&server, "GET", "/orders/7", &token).await != expect {
            assert!(Instant::now() < deadline, "edit {round} never took effect");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await.unwrap();
    }
    let (a, d, b) = (
        allowed.load(Ordering::Relaxed),
        denied.load(Ordering::Relaxed),
        broken.load(Ordering::Relaxed),
    );
    assert_eq!(
        b, 0,
        "requests failed during reloads ({a} allowed, {d} denied)"
    );
    assert!(
        a > 0 && d > 0,
        "both policies should have answered: {a} allowed, {d} denied"
    );
    assert_eq!(reloads(&server, "ok"), 4);
    server.shutdown().await;
}

fn check_request(method: &str, path: &str, token: &str) -> CheckRequest {
    support::inproc::check_request(
        method,
        path,
        "api.example.com",
        None,
        bearer_headers(token),
        "",
    )
}

/// A replica whose audit log refuses records (stdout a closed pipe: `serve | head -n 3`
/// after `head` exited) answers every request 503 `audit_unavailable`, for good; it said
/// ready all the same, so it stayed in rotation denying everything. `/readyz` is now 503
/// while the audit log refuses records, and says why.
#[test]
fn a_replica_whose_audit_log_refuses_records_is_not_ready() {
    let s = Setup::new();
    let (http, admin) = (support::free_port(), support::free_port());
    s.write(
        &s.shipped
            .replace("  enabled: false ", "  enabled: true ")
            .replace(
                "admin_listen: 127.0.0.1:0",
                &format!("admin_listen: 127.0.0.1:{admin}"),
            )
            .replace(
                "http_listen: 127.0.0.1:0",
                &format!("http_listen: 127.0.0.1:{http}"),
            ),
    );
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_portcullis"));
    cmd.args(["serve", "--config"]).arg(s.path());
    let mut child = support::ChildGuard::spawn_with_closed_stdout("portcullis", cmd);
    let (http, admin) = (
        format!("127.0.0.1:{http}").parse().unwrap(),
        format!("127.0.0.1:{admin}").parse().unwrap(),
    );
    support::wait_for_status(&mut child, admin, "/readyz", 200, Duration::from_secs(20));
    // A decision to audit (Envoy's HTTP ext_authz API: the public /healthz).
    let deadline = Instant::now() + Duration::from_secs(20);
    let readyz = loop {
        let _ = support::raw_http(
            http,
            "GET /healthz HTTP/1.1\r\nHost: api.example.com\r\nConnection: close\r\n\r\n",
        );
        let readyz = support::raw_http(
            admin,
            "GET /readyz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n",
        )
        .unwrap();
        if readyz.status != 200 || Instant::now() > deadline {
            break readyz;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(readyz.status, 503, "{readyz:?}\n{}", child.logs());
    let body: Value = serde_json::from_str(&readyz.body).unwrap();
    assert_eq!(body["audit_writing"], false, "{body}");
    assert_eq!(body["ready"], false, "{body}");
}

#[test]
fn sighup_reloads_the_running_binary() {
    let s = Setup::new();
    let grpc = support::free_port();
    let admin = support::free_port();
    s.write(
        &s.shipped
            .replace(
                "admin_listen: 127.0.0.1:0",
                &format!("admin_listen: 127.0.0.1:{admin}"),
            )
            .replace(
                "  listen: 127.0.0.1:0",
                &format!("  listen: 127.0.0.1:{grpc}"),
            ),
    );
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_portcullis"));
    cmd.args(["serve", "--config"]).arg(s.path());
    let mut child = support::ChildGuard::spawn("portcullis", cmd);
    let admin_addr = format!("127.0.0.1:{admin}").parse().unwrap();
    support::wait_for_status(
        &mut child,
        admin_addr,
        "/readyz",
        200,
        Duration::from_secs(20),
    );

    let pid = child.pid();
    let status = std::process::Command::new("kill")
        .args(["-HUP", &pid.to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    // The file did not change: only SIGHUP can have caused this reload.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let metrics = support::raw_http(
            admin_addr,
            "GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        )
        .unwrap();
        if metrics
            .body
            .lines()
            .any(|l| l.starts_with("portcullis_config_reloads_total{result=\"ok\"} 1"))
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no reload after SIGHUP:\n{}",
            metrics.body
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    child.assert_running();
}

/// A JWKS server on loopback that answers every request `delay` late with `body`.
async fn slow_jwks(body: String, delay: Duration) -> std::net::SocketAddr {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut conn, _)) = listener.accept().await {
            let body = body.clone();
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                let _ = conn.read(&mut buf).await;
                tokio::time::sleep(delay).await;
                let answer = format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = conn.write_all(answer.as_bytes()).await;
            });
        }
    });
    addr
}

/// An edit saved while a reload runs (here it waits on a slow key fetch) is loaded at the
/// next poll. Before, the files were read again after the load and the edit was taken as
/// seen without ever being loaded: a tightened policy never came into force.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_edit_saved_while_a_reload_runs_is_loaded_next() {
    let s = Setup::new();
    let addr = slow_jwks(support::jwt::dev_jwks(), Duration::from_millis(1500)).await;
    let with_idp = s.shipped.replace(
        "upstream:\n",
        &format!(
            "  - name: idp\n    issuer: https://idp.example\n    audiences: [api]\n    keys:\n      url: http://{addr}/jwks\n\nupstream:\n"
        ),
    );
    assert_ne!(with_idp, s.shipped);
    s.write(&with_idp);
    let (server, mut reloader) = s.serve().await;
    let alice = mint_dev(json!({"sub": "alice", "scope": "orders:read"}));
    assert_eq!(decide(&server, "GET", "/orders/1", &alice).await, 200);

    let tightened = with_idp.replace("scopes: [orders:read]", "scopes: [orders:audit]");
    assert_ne!(tightened, with_idp);
    // A forced reload (SIGHUP) fetches the keys again, slowly; the edit lands meanwhile.
    let (outcome, ()) = tokio::join!(reloader.poll(true), async {
        tokio::time::sleep(Duration::from_millis(300)).await;
        s.write(&tightened);
    });
    assert_eq!(outcome, ReloadOutcome::Applied);
    assert_eq!(reloader.poll(false).await, ReloadOutcome::Applied);
    assert_eq!(decide(&server, "GET", "/orders/1", &alice).await, 403);
    assert_eq!(reloader.poll(false).await, ReloadOutcome::Unchanged);
    server.shutdown().await;
}

/// The audit sink is chosen at start: a reload that turns auditing on (or off) is refused
/// until a restart, instead of reported as applied while nothing is logged.
#[tokio::test]
async fn a_changed_audit_setting_is_refused_until_a_restart() {
    let s = Setup::new();
    let (server, mut reloader) = s.serve().await;
    let on = s.shipped.replace("  enabled: false ", "  enabled: true ");
    assert_ne!(on, s.shipped);
    s.write(&on);
    match reloader.poll(false).await {
        ReloadOutcome::Rejected(reason) => {
            assert!(
                reason.contains("audit:") && reason.contains("restart"),
                "{reason}"
            );
        }
        other => panic!("expected a rejection, got {other:?}"),
    }
    assert_eq!(reloads(&server, "error"), 1);
    server.shutdown().await;
}

/// A reload that adds an issuer with a key file of its own is followed by quiet polls: the
/// new file is recorded as read, not as unread (which made the next poll reload and refetch
/// every issuer's keys for nothing).
#[tokio::test]
async fn a_newly_watched_key_file_is_not_reloaded_again_unchanged() {
    let s = Setup::new();
    let (server, mut reloader) = s.serve().await;
    std::fs::copy(
        root().join("tests/fixtures/keys/rsa2048.jwks.json"),
        s.dir.path().join("idp.jwks.json"),
    )
    .unwrap();
    let with_idp = s.shipped.replace(
        "upstream:\n",
        "  - name: idp\n    issuer: https://idp.example\n    audiences: [api]\n    keys:\n      file: idp.jwks.json\n\nupstream:\n",
    );
    assert_ne!(with_idp, s.shipped);
    s.write(&with_idp);
    assert_eq!(reloader.poll(false).await, ReloadOutcome::Applied);
    assert_eq!(reloader.poll(false).await, ReloadOutcome::Unchanged);
    assert_eq!(reloads(&server, "ok"), 1);
    server.shutdown().await;
}
