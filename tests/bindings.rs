//! Token bindings held everywhere a token is accepted: certificate- and DPoP-bound tokens on
//! the approvals API (no certificate, no proof there), `cnf` confirmation methods this server
//! cannot check, and DPoP replay records that outlive the proof's acceptance window.
#![allow(clippy::unwrap_used, clippy::expect_used)]
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use portcullis::admin::metrics::Metrics;
use portcullis::authz::{Decision, RequestView};
use portcullis::engine::{Engine, unix_now};
use portcullis::state::MemoryStore;
use serde_json::{Value, json};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn config_text(extra: &str) -> String {
    format!(
        "issuers:
  - name: fixtures
    issuer: https://fixtures.portcullis.invalid
    audiences: [corpus-api]
    keys: {{file: '{}'}}
{extra}
routes:
  - id: things
    methods: [GET]
    path: /things/{{id}}
    rules: [{{id: any, issuers: [fixtures]}}]
",
        root().join("tests/fixtures/keys/all.jwks.json").display()
    )
}

async fn engine(extra: &str) -> Engine {
    let config = portcullis::config::from_str(&config_text(extra), Path::new("mem.yaml")).unwrap();
    let metrics = Arc::new(Metrics::new());
    let keys = Arc::new(portcullis::server::key_store(&config, metrics.clone()));
    keys.start().await;
    Engine::new(
        Arc::new(config),
        keys,
        Arc::new(MemoryStore::new()),
        metrics,
    )
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

fn token(now: i64, cnf: Value) -> String {
    sign(
        &json!({"alg": "RS256", "kid": "rsa2048"}),
        &json!({"iss": "https://fixtures.portcullis.invalid", "aud": "corpus-api", "sub": "bob",
                "iat": now, "exp": now + 600, "cnf": cnf}),
        "tests/fixtures/keys/rsa2048.pem",
        false,
    )
}

async fn check(engine: &Engine, auth: &str, proof: Option<&str>, now: i64) -> Decision {
    let mut headers = HashMap::from([("authorization".to_string(), auth.to_string())]);
    if let Some(p) = proof {
        headers.insert("dpop".into(), p.to_string());
    }
    let view = RequestView {
        method: "GET",
        host: "api.example.com",
        path: "/things/1",
        headers: &headers,
        source_ip: None,
        source_principal: "",
        scheme: "https",
        peer_certificate: None,
    };
    engine.check_at(&view, now).await
}

#[tokio::test]
async fn the_approvals_api_holds_a_bound_token_to_its_binding() {
    let now = unix_now();
    let (_, jkt) = ec_jwk();
    // Bound tokens (either binding), and any token of an issuer that requires one.
    let plain = engine("").await;
    for cnf in [json!({"jkt": jkt}), json!({"x5t#S256": "AAAA"})] {
        let t = token(now, cnf.clone());
        let refused = plain.verify_bearer(&t, now).await.err();
        assert_eq!(
            refused.map(|d| d.code.as_str()),
            Some("invalid_token"),
            "{cnf}"
        );
    }
    let strict = engine("    dpop: required\n    cert_bound: true").await;
    let t = token(now, json!({"jkt": jkt, "x5t#S256": "AAAA"}));
    assert!(strict.verify_bearer(&t, now).await.is_err());
    // An unbound token of an issuer that requires nothing is an approver's credential.
    let unbound = sign(
        &json!({"alg": "RS256", "kid": "rsa2048"}),
        &json!({"iss": "https://fixtures.portcullis.invalid", "aud": "corpus-api", "sub": "bob",
                "iat": now, "exp": now + 600}),
        "tests/fixtures/keys/rsa2048.pem",
        false,
    );
    let who = plain.verify_bearer(&unbound, now).await.unwrap();
    assert_eq!(who.subject, "bob");
    assert!(strict.verify_bearer(&unbound, now).await.is_err());
}

#[tokio::test]
async fn a_confirmation_method_this_server_cannot_check_refuses_the_token() {
    let e = engine("").await;
    let now = unix_now();
    let (jwk, _) = ec_jwk();
    for cnf in [
        json!({"jwk": jwk}),
        json!({"kid": "k1"}),
        json!({"x5t": "AAAA"}),
        json!("not an object"),
    ] {
        let t = token(now, cnf.clone());
        // A miss, then a cache hit: both refuse.
        for round in ["miss", "hit"] {
            let d = check(&e, &format!("Bearer {t}"), None, now).await;
            assert_eq!(d.code.as_str(), "invalid_token", "{cnf} ({round}): {d:?}");
        }
    }
    // `cnf` with only the methods it checks is held to them, not refused outright.
    let (_, jkt) = ec_jwk();
    let t = token(now, json!({"jkt": jkt}));
    let d = check(&e, &format!("Bearer {t}"), None, now).await;
    assert!(d.detail.contains("DPoP scheme"), "{d:?}");
}

#[tokio::test]
async fn a_dpop_proof_cannot_be_replayed_at_the_edge_of_its_window() {
    let e = engine("    dpop: optional\n    dpop_window: 1s").await;
    const N: i64 = 1_800_000_000;
    let (jwk, jkt) = ec_jwk();
    let t = token(N, json!({"jkt": jkt}));
    // A client clock a whole window ahead: the proof is accepted until N + 2.
    let proof = sign(
        &json!({"typ": "dpop+jwt", "alg": "ES256", "jwk": jwk}),
        &json!({"jti": "edge", "htm": "GET", "htu": "https://api.example.com/things/1",
                "iat": N + 1, "ath": sha256_b64(t.as_bytes())}),
        "tests/fixtures/keys/ec-p256.pem",
        true,
    );
    let auth = format!("DPoP {t}");
    let first = check(&e, &auth, Some(&proof), N).await;
    assert!(first.is_allow(), "{first:?}");
    assert_eq!(
        check(&e, &auth, Some(&proof), N + 1).await.code.as_str(),
        "invalid_dpop_proof"
    );
    // Two seconds later (2 x window) the proof is still acceptable at N + 2; its replay
    // record must still be there.
    tokio::time::sleep(std::time::Duration::from_millis(2100)).await;
    let replay = check(&e, &auth, Some(&proof), N + 2).await;
    assert_eq!(replay.code.as_str(), "invalid_dpop_proof", "{replay:?}");
}
