//! The engine's side of DPoP and service identities: single use of a proof's `jti` through
//! shared state (and failing closed when the state is unavailable), binding checks on token
//! cache hits and on the approvals API, `cnf` methods it cannot check, and the configuration
//! errors of the mTLS/DPoP settings.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use portcullis::admin::metrics::Metrics;
use portcullis::authz::{Decision, RequestView};
use portcullis::engine::Engine;
use portcullis::state::{MemoryStore, StateStore, UnavailableStore};
use serde_json::{Value, json};

const NOW: i64 = 1_800_000_000;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn config_text(dpop: &str) -> String {
    format!(
        "issuers:
  - name: fixtures
    issuer: https://fixtures.portcullis.invalid
    audiences: [corpus-api]
    keys: {{file: '{}'}}
    dpop: {dpop}
routes:
  - id: things
    methods: [GET]
    path: /things/{{id}}
    rules: [{{id: any, issuers: [fixtures]}}]
",
        root().join("tests/fixtures/keys/all.jwks.json").display()
    )
}

async fn engine_with_metrics(state: Arc<dyn StateStore>) -> (Engine, Arc<Metrics>) {
    engine_for("optional", state).await
}

/// An engine whose issuer has `dpop: {dpop}` (more issuer settings may follow on lines
/// indented by four spaces).
async fn engine_for(dpop: &str, state: Arc<dyn StateStore>) -> (Engine, Arc<Metrics>) {
    let config = portcullis::config::from_str(&config_text(dpop), Path::new("mem.yaml")).unwrap();
    let metrics = Arc::new(Metrics::new());
    let keys = Arc::new(portcullis::server::key_store(&config, metrics.clone()));
    keys.start().await;
    (
        Engine::new(Arc::new(config), keys, state, metrics.clone()),
        metrics,
    )
}

async fn engine(state: Arc<dyn StateStore>) -> Engine {
    engine_with_metrics(state).await.0
}

fn b64(v: &Value) -> String {
    URL_SAFE_NO_PAD.encode(v.to_string())
}

fn sha256_b64(bytes: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, bytes).as_ref())
}

fn ec_jwk() -> (Value, String) {
    let set: Value = serde_json::from_slice(
        &std::fs::read(root().join("tests/fixtures/keys/ec-p256.jwks.json")).unwrap(),
    )
    .unwrap();
    let k = &set["keys"][0];
    let canonical = format!(
        r#"{{"crv":"P-256","kty":"EC","x":"{}","y":"{}"}}"#,
        k["x"].as_str().unwrap(),
        k["y"].as_str().unwrap()
    );
    (
        json!({"kty": "EC", "crv": "P-256", "x": k["x"], "y": k["y"]}),
        sha256_b64(canonical.as_bytes()),
    )
}

fn sign(header: &Value, claims: &Value, pem: &str, ec: bool) -> String {
    let pem = std::fs::read(root().join(pem)).unwrap();
    let (key, alg) = if ec {
        (
            jsonwebtoken::EncodingKey::from_ec_pem(&pem).unwrap(),
            jsonwebtoken::Algorithm::ES256,
        )
    } else {
        (
            jsonwebtoken::EncodingKey::from_rsa_pem(&pem).unwrap(),
            jsonwebtoken::Algorithm::RS256,
        )
    };
    let message = format!("{}.{}", b64(header), b64(claims));
    let sig = jsonwebtoken::crypto::sign(message.as_bytes(), &key, alg).unwrap();
    format!("{message}.{sig}")
}

fn token(jkt: &str) -> String {
    token_with(json!({"cnf": {"jkt": jkt}}))
}

/// A token of the fixtures issuer for `sub: bob`, valid at NOW, with `extra` claims.
fn token_with(extra: Value) -> String {
    let mut claims = json!({
        "iss": "https://fixtures.portcullis.invalid", "aud": "corpus-api", "sub": "bob",
        "iat": NOW, "exp": NOW + 600,
    });
    claims
        .as_object_mut()
        .unwrap()
        .extend(extra.as_object().unwrap().clone());
    sign(
        &json!({"alg": "RS256", "kid": "rsa2048"}),
        &claims,
        "tests/fixtures/keys/rsa2048.pem",
        false,
    )
}

fn proof(jwk: &Value, token: &str, jti: &str) -> String {
    sign(
        &json!({"typ": "dpop+jwt", "alg": "ES256", "jwk": jwk}),
        &json!({
            "jti": jti, "htm": "GET", "htu": "https://api.example.com/things/1",
            "iat": NOW, "ath": sha256_b64(token.as_bytes()),
        }),
        "tests/fixtures/keys/ec-p256.pem",
        true,
    )
}

async fn check(engine: &Engine, authorization: &str, proof: Option<&str>) -> Decision {
    check_at(engine, authorization, proof, NOW).await
}

async fn check_at(engine: &Engine, authorization: &str, proof: Option<&str>, now: i64) -> Decision {
    let mut headers = HashMap::from([("authorization".to_string(), authorization.to_string())]);
    if let Some(p) = proof {
        headers.insert("dpop".into(), p.to_string());
    }
    engine.check_at(&things(&headers), now).await
}

/// `GET https://api.example.com/things/1` with `headers`.
fn things(headers: &HashMap<String, String>) -> RequestView<'_> {
    RequestView {
        method: "GET",
        host: "api.example.com",
        path: "/things/1",
        headers,
        source_ip: None,
        source_principal: "",
        scheme: "https",
        peer_certificate: None,
    }
}

#[tokio::test]
async fn a_proof_is_single_use_and_cache_hits_still_need_a_fresh_proof() {
    let (engine, metrics) = engine_with_metrics(Arc::new(MemoryStore::new())).await;
    let (jwk, jkt) = ec_jwk();
    let t = token(&jkt);
    let auth = format!("DPoP {t}");
    let p1 = proof(&jwk, &t, "one");

    let first = check(&engine, &auth, Some(&p1)).await;
    assert!(first.is_allow(), "{first:?}");
    let replay = check(&engine, &auth, Some(&p1)).await;
    assert_eq!(replay.code.as_str(), "invalid_dpop_proof", "{replay:?}");
    assert_eq!(replay.http_status(), 401);
    assert!(replay.detail.contains("already used"), "{replay:?}");
    let challenge = &replay
        .response_headers
        .iter()
        .find(|(n, _)| n == "www-authenticate")
        .unwrap()
        .1;
    assert!(
        challenge.starts_with("DPoP ") && challenge.contains("error=\"invalid_dpop_proof\""),
        "{challenge}"
    );

    // The token is now a cache hit: a new proof works, no proof or a bearer use does not.
    let hits = metrics.token_cache_hits.get();
    let second = check(&engine, &auth, Some(&proof(&jwk, &t, "two"))).await;
    assert!(second.is_allow(), "{second:?}");
    assert!(
        metrics.token_cache_hits.get() > hits,
        "the second use must be a cache hit"
    );
    let missing = check(&engine, &auth, None).await;
    assert_eq!(missing.code.as_str(), "invalid_dpop_proof", "{missing:?}");
    let bearer = check(
        &engine,
        &format!("Bearer {t}"),
        Some(&proof(&jwk, &t, "three")),
    )
    .await;
    assert_eq!(bearer.code.as_str(), "invalid_token", "{bearer:?}");
}

#[tokio::test]
async fn an_unavailable_replay_store_fails_closed() {
    let store = Arc::new(UnavailableStore::new("connection refused"));
    let engine = engine(store.clone()).await;
    let (jwk, jkt) = ec_jwk();
    let t = token(&jkt);
    let d = check(&engine, &format!("DPoP {t}"), Some(&proof(&jwk, &t, "x"))).await;
    assert_eq!(d.code.as_str(), "state_unavailable", "{d:?}");
    assert_eq!(d.http_status(), 503);
    assert_eq!(store.calls(), 1);
    // A request without DPoP never touches the store.
    let plain = sign(
        &json!({"alg": "RS256", "kid": "rsa2048"}),
        &json!({"iss": "https://fixtures.portcullis.invalid", "aud": "corpus-api", "iat": NOW, "exp": NOW + 600}),
        "tests/fixtures/keys/rsa2048.pem",
        false,
    );
    let d = check(&engine, &format!("Bearer {plain}"), None).await;
    assert!(d.is_allow(), "{d:?}");
    assert_eq!(store.calls(), 1);
}

fn config_error(text: &str) -> String {
    let dir = tempfile::tempdir().unwrap();
    for f in ["server.crt", "server.key", "ca.crt"] {
        std::fs::copy(
            root().join("tests/fixtures/mtls").join(f),
            dir.path().join(f),
        )
        .unwrap();
    }
    let path = dir.path().join("portcullis.yaml");
    portcullis::config::from_str(text, &path)
        .map(|_| String::new())
        .unwrap_or_else(|e| e.to_string())
}

#[test]
fn mtls_and_dpop_settings_are_validated() {
    let routes = "routes: [{id: r, methods: [GET], path: /x, public: true}]\n";
    let ok = config_error(&format!(
        "server: {{tls: {{cert: server.crt, key: server.key, client_ca: ca.crt}}}}\n{routes}"
    ));
    assert_eq!(ok, "");
    for (text, want) in [
        (
            "server: {tls: {cert: nope.crt, key: server.key, client_ca: ca.crt}}\n",
            "server.tls.cert: file",
        ),
        (
            "server: {tls: {cert: server.crt, key: server.key}}\n",
            "server.tls.client_ca: client certificates are required",
        ),
        // `require_client_cert: false` was told to set `require_client_cert: false`: the CA is
        // missing for the allow-list, which the message now says.
        (
            "server: {tls: {cert: server.crt, key: server.key, require_client_cert: false, allowed_client_principals: ['spiffe://a/b']}}\n",
            "server.tls.client_ca: `allowed_client_principals` is read from verified client certificates",
        ),
        (
            "server: {tls: {cert: server.crt, key: server.key, client_ca: ca.crt, allowed_client_principals: ['spiffe://*']}}\n",
            "allowed_client_principals[0]",
        ),
        (
            "server: {tls: {cert: server.crt, key: server.key, client_ca: ca.crt, verify: true}}\n",
            "unknown field `verify`",
        ),
    ] {
        let got = config_error(&format!("{text}{routes}"));
        assert!(got.contains(want), "{text}: {got}");
    }
    // Plain TLS without client certificates is allowed when asked for explicitly.
    let got = config_error(&format!(
        "server: {{tls: {{cert: server.crt, key: server.key, require_client_cert: false}}}}\n{routes}"
    ));
    assert_eq!(got, "");

    let issuer = |extra: &str| {
        format!(
            "issuers:
  - name: i
    issuer: https://i.invalid
    audiences: [a]
    keys: {{url: 'https://i.invalid/jwks'}}
    {extra}
routes:
  - id: r
    methods: [GET]
    path: /x
    rules: [{{id: s, principals: ['spiffe://example.org/ns/shop/**']}}]
"
        )
    };
    assert_eq!(config_error(&issuer("dpop: required")), "");
    for (extra, want) in [
        (
            "dpop: always",
            "issuers[0].dpop: unknown variant (value not shown), expected",
        ),
        (
            "dpop: optional\n    token: {header: x-token}",
            "issuers[0].dpop: DPoP needs",
        ),
        (
            "dpop_algorithms: [HS256]",
            "issuers[0].dpop_algorithms[0]: `HS256` is not an asymmetric algorithm",
        ),
        // Asymmetric, but not one Portcullis verifies (or misspelt): it was called symmetric.
        (
            "dpop_algorithms: [ES512]",
            "issuers[0].dpop_algorithms[0]: unknown algorithm `ES512`",
        ),
        (
            "dpop_algorithms: [es256]",
            "issuers[0].dpop_algorithms[0]: unknown algorithm `es256`",
        ),
        ("dpop_algorithms: []", "issuers[0].dpop_algorithms"),
        ("dpop_window: 0s", "issuers[0].dpop_window"),
        ("dpop_window: 1h", "issuers[0].dpop_window"),
    ] {
        let got = config_error(&issuer(extra));
        assert!(got.contains(want), "{extra}: {got}");
    }
    let bad_principal = issuer("").replace("spiffe://example.org/ns/shop/**", "spiffe://a/*/b");
    let got = config_error(&bad_principal);
    assert!(got.contains("routes[0].rules[0].principals[0]"), "{got}");
}

/// The approvals API has no client certificate and takes no DPoP proof: it holds a token to
/// its binding as a Check would, so a bound token (or any token of an issuer that requires a
/// binding) is refused there, never taken as a plain bearer token.
#[tokio::test]
async fn the_approvals_api_holds_a_bound_token_to_its_binding() {
    let (_, jkt) = ec_jwk();
    let (plain, _) = engine_for("optional", Arc::new(MemoryStore::new())).await;
    for cnf in [json!({"jkt": jkt}), json!({"x5t#S256": "AAAA"})] {
        let refused = plain
            .verify_bearer(&token_with(json!({"cnf": cnf})), NOW)
            .await;
        let refused = refused.expect_err("a bound token is refused");
        assert_eq!(refused.code.as_str(), "invalid_token", "{cnf}");
        says_the_api_checks_no_binding(&refused.detail);
    }
    let strict = "required\n    cert_bound: true";
    let (strict, _) = engine_for(strict, Arc::new(MemoryStore::new())).await;
    let bound = token_with(json!({"cnf": {"jkt": jkt, "x5t#S256": "AAAA"}}));
    assert!(strict.verify_bearer(&bound, NOW).await.is_err());
    let unbound_of_strict = strict.verify_bearer(&token_with(json!({})), NOW).await;
    says_the_api_checks_no_binding(&unbound_of_strict.expect_err("dpop: required").detail);
    // An unbound token of an issuer that requires nothing is an approver's credential.
    let unbound = token_with(json!({}));
    let who = plain.verify_bearer(&unbound, NOW).await.unwrap();
    assert_eq!(who.subject, "bob");
    assert!(strict.verify_bearer(&unbound, NOW).await.is_err());
}

/// The approvals API refuses a bound token saying that it checks no binding, not the Check's
/// reason: "the request has no client certificate" was false for an approver whose CLI
/// presented one, and "send it with the DPoP scheme" pointed at a proof this API never reads.
fn says_the_api_checks_no_binding(detail: &str) {
    assert!(
        detail.contains("the approvals API checks no binding"),
        "{detail}"
    );
    assert!(detail.contains("approve with an unbound token"), "{detail}");
    assert!(!detail.contains("no client certificate"), "{detail}");
    assert!(!detail.contains("DPoP scheme"), "{detail}");
}

/// RFC 7800: a `cnf` asks for a proof of possession. One this server cannot check refuses
/// the token, on a miss and on a cache hit, instead of letting it pass as a bearer token.
#[tokio::test]
async fn a_confirmation_method_this_server_cannot_check_refuses_the_token() {
    let e = engine(Arc::new(MemoryStore::new())).await;
    let (jwk, jkt) = ec_jwk();
    for cnf in [
        json!({"jwk": jwk}),
        json!({"kid": "k1"}),
        json!({"x5t": "AAAA"}),
        json!("not an object"),
    ] {
        let t = token_with(json!({"cnf": cnf}));
        for round in ["miss", "hit"] {
            let d = check(&e, &format!("Bearer {t}"), None).await;
            assert_eq!(d.code.as_str(), "invalid_token", "{cnf} ({round}): {d:?}");
        }
    }
    // A `cnf` with only the methods it checks is held to them, not refused outright.
    let d = check(&e, &format!("Bearer {}", token(&jkt)), None).await;
    assert!(d.detail.contains("DPoP scheme"), "{d:?}");
}

/// An issuer with DPoP disabled refuses a DPoP-bound token whichever scheme it comes with,
/// and says why once: told to "send it with the DPoP scheme" (and challenged to), a client
/// that did so was then refused because the issuer does not accept that scheme.
#[tokio::test]
async fn an_issuer_without_dpop_refuses_a_bound_token_without_pointing_at_dpop() {
    let (e, _) = engine_for("disabled", Arc::new(MemoryStore::new())).await;
    let (jwk, jkt) = ec_jwk();
    let t = token(&jkt);
    let bearer = check(&e, &format!("Bearer {t}"), None).await;
    assert_eq!(bearer.code.as_str(), "invalid_token", "{bearer:?}");
    assert!(
        bearer.detail.contains("this issuer does not accept DPoP"),
        "{bearer:?}"
    );
    assert!(!bearer.detail.contains("DPoP scheme"), "{bearer:?}");
    let challenges: Vec<_> = bearer
        .response_headers
        .iter()
        .filter(|(n, _)| n == "www-authenticate")
        .map(|(_, v)| v.as_str())
        .collect();
    assert!(
        challenges.iter().all(|c| !c.starts_with("DPoP")),
        "{challenges:?}"
    );
    let dpop = check(&e, &format!("DPoP {t}"), Some(&proof(&jwk, &t, "one"))).await;
    assert_eq!(dpop.code.as_str(), "invalid_token", "{dpop:?}");
    // The same issuer with DPoP optional still asks for the DPoP scheme.
    let (optional, _) = engine_for("optional", Arc::new(MemoryStore::new())).await;
    let d = check(&optional, &format!("Bearer {t}"), None).await;
    assert!(d.detail.contains("DPoP scheme"), "{d:?}");
}

/// A proof stamped a whole window ahead (a client clock running fast) is acceptable until
/// `iat + window`; its replay record must outlive that.
#[tokio::test]
async fn a_dpop_proof_cannot_be_replayed_at_the_edge_of_its_window() {
    let (e, _) = engine_for(
        "optional\n    dpop_window: 1s",
        Arc::new(MemoryStore::new()),
    )
    .await;
    let (jwk, jkt) = ec_jwk();
    let t = token(&jkt);
    let ahead = sign(
        &json!({"typ": "dpop+jwt", "alg": "ES256", "jwk": jwk}),
        &json!({"jti": "edge", "htm": "GET", "htu": "https://api.example.com/things/1",
                "iat": NOW + 1, "ath": sha256_b64(t.as_bytes())}),
        "tests/fixtures/keys/ec-p256.pem",
        true,
    );
    let auth = format!("DPoP {t}");
    let first = check_at(&e, &auth, Some(&ahead), NOW).await;
    assert!(first.is_allow(), "{first:?}");
    let again = check_at(&e, &auth, Some(&ahead), NOW + 1).await;
    assert_eq!(again.code.as_str(), "invalid_dpop_proof");
    // Two seconds on (2 x window), the proof is still acceptable at NOW + 2.
    tokio::time::sleep(std::time::Duration::from_millis(2100)).await;
    let replay = check_at(&e, &auth, Some(&ahead), NOW + 2).await;
    assert_eq!(replay.code.as_str(), "invalid_dpop_proof", "{replay:?}");
}

/// The `WWW-Authenticate` values a decision carries itself.
fn own_challenges(d: &Decision) -> Vec<String> {
    d.response_headers
        .iter()
        .filter(|(n, _)| n == "www-authenticate")
        .map(|(_, v)| v.clone())
        .collect()
}

/// A client that sent its token with the DPoP scheme is challenged in that scheme (RFC 9449
/// 7.1) when the token itself is refused (expired, unreadable) or grants too little: it was
/// told `Bearer ...`, a scheme it did not use, while proof errors already said `DPoP`.
#[tokio::test]
async fn a_dpop_client_is_challenged_in_the_dpop_scheme() {
    let (e, _) = engine_for("optional", Arc::new(MemoryStore::new())).await;
    let (jwk, jkt) = ec_jwk();
    let t = token(&jkt);
    let auth = format!("DPoP {t}");

    let expired = check_at(&e, &auth, Some(&proof(&jwk, &t, "late")), NOW + 3600).await;
    assert_eq!(
        (expired.code.as_str(), expired.http_status()),
        ("invalid_token", 401)
    );
    let found = own_challenges(&expired);
    assert_eq!(found.len(), 1, "{found:?}");
    assert!(
        found[0].starts_with("DPoP algs=\"") && found[0].contains("error=\"invalid_token\""),
        "{found:?}"
    );

    let garbage = check(&e, "DPoP not.a.token", None).await;
    assert_eq!(garbage.http_status(), 401, "{garbage:?}");
    let found = own_challenges(&garbage);
    assert!(
        found.len() == 1 && found[0].starts_with("DPoP ") && found[0].contains("invalid_token"),
        "{found:?}"
    );

    // A route whose rule needs a scope the token lacks: 403, `insufficient_scope`, in DPoP.
    let text = config_text("optional").replace(
        "rules: [{id: any, issuers: [fixtures]}]",
        "rules: [{id: readers, scopes: [things:read]}]",
    );
    let config = portcullis::config::from_str(&text, Path::new("mem.yaml")).unwrap();
    let metrics = Arc::new(Metrics::new());
    let keys = Arc::new(portcullis::server::key_store(&config, metrics.clone()));
    keys.start().await;
    let scoped = Engine::new(
        Arc::new(config),
        keys,
        Arc::new(MemoryStore::new()),
        metrics,
    );
    let narrow = check(&scoped, &auth, Some(&proof(&jwk, &t, "scope"))).await;
    assert_eq!(
        (narrow.code.as_str(), narrow.http_status()),
        ("insufficient_scope", 403)
    );
    let found = own_challenges(&narrow);
    assert!(
        found.len() == 1
            && found[0].starts_with("DPoP ")
            && found[0].contains("error=\"insufficient_scope\""),
        "{found:?}"
    );

    // A deny of a token sent as a Bearer one gets no DPoP challenge added (the server's
    // default `Bearer` one is its answer).
    let unbound = token_with(json!({}));
    let bearer = check_at(&e, &format!("Bearer {unbound}"), None, NOW + 3600).await;
    assert!(
        own_challenges(&bearer)
            .iter()
            .all(|c| !c.starts_with("DPoP")),
        "{bearer:?}"
    );
}

/// A request without a credential is offered the schemes its route takes (RFC 9449 7.1: a
/// DPoP challenge where DPoP is taken, and only that where it is required), no more: it was
/// told `Bearer` whatever the issuer took, and `ApiKey` wherever keys were configured.
#[tokio::test]
async fn a_request_without_a_credential_is_offered_the_schemes_its_route_takes() {
    let headers = HashMap::new();
    let view = things(&headers);
    for (mode, offered, wanted) in [
        (
            "optional",
            "Bearer realm=\"portcullis\", DPoP algs=\"ES256\"",
            "a bearer or DPoP-bound token",
        ),
        ("required", "DPoP algs=\"ES256\"", "a DPoP-bound token"),
        ("disabled", "Bearer realm=\"portcullis\"", "a bearer token"),
    ] {
        let settings = match mode {
            "disabled" => mode.to_string(),
            _ => format!("{mode}\n    dpop_algorithms: [ES256]"),
        };
        let (e, _) = engine_for(&settings, Arc::new(MemoryStore::new())).await;
        let d = e.check_at(&view, NOW).await;
        assert_eq!(
            (d.code.as_str(), d.http_status()),
            ("credential_missing", 401),
            "{mode}"
        );
        assert_eq!(own_challenges(&d), vec![offered.to_string()], "{mode}");
        assert_eq!(d.detail, format!("this route requires {wanted}"), "{mode}");
    }
}
