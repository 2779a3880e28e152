#![allow(clippy::unwrap_used, clippy::expect_used)]

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::{Algorithm, EncodingKey};
use serde_json::{Value, json};

use super::*;

const NOW: i64 = 1_800_000_000;
const TOKEN: &str = "header.claims.signature";

fn read(rel: &str) -> Vec<u8> {
    std::fs::read(format!("{}/{rel}", env!("CARGO_MANIFEST_DIR"))).unwrap()
}

/// The public JWK of a fixture key (only the members a proof would carry).
fn public_jwk(name: &str) -> Value {
    let set: Value =
        serde_json::from_slice(&read(&format!("tests/fixtures/keys/{name}.jwks.json"))).unwrap();
    let mut jwk = set["keys"][0].clone();
    for m in ["kid", "use", "alg"] {
        jwk.as_object_mut().unwrap().remove(m);
    }
    jwk
}

fn signing_key(name: &str) -> EncodingKey {
    let pem = read(&format!("tests/fixtures/keys/{name}.pem"));
    match name {
        "ec-p256" | "ec-p384" => EncodingKey::from_ec_pem(&pem).unwrap(),
        "ed25519" => EncodingKey::from_ed_pem(&pem).unwrap(),
        _ => EncodingKey::from_rsa_pem(&pem).unwrap(),
    }
}

fn thumbprint(name: &str) -> String {
    jwk::public_key_from_jwk(&public_jwk(name))
        .unwrap()
        .fingerprint
        .to_string()
}

fn sign(header: &Value, claims: &Value, key: &str, alg: Algorithm) -> String {
    let message = format!(
        "{}.{}",
        URL_SAFE_NO_PAD.encode(header.to_string()),
        URL_SAFE_NO_PAD.encode(claims.to_string())
    );
    let sig = jsonwebtoken::crypto::sign(message.as_bytes(), &signing_key(key), alg).unwrap();
    format!("{message}.{sig}")
}

fn good_header() -> Value {
    json!({"typ": "dpop+jwt", "alg": "ES256", "jwk": public_jwk("ec-p256")})
}

fn good_claims() -> Value {
    json!({
        "jti": "proof-1",
        "htm": "GET",
        "htu": "https://api.example.com/orders/42",
        "iat": NOW,
        "ath": access_token_hash(TOKEN),
    })
}

/// A proof with `header` and `claims` members overridden (`null` removes one).
fn proof_with(header_extra: Value, claims_extra: Value) -> String {
    let mut header = good_header();
    let mut claims = good_claims();
    for (target, extra) in [(&mut header, header_extra), (&mut claims, claims_extra)] {
        for (k, v) in extra.as_object().unwrap() {
            if v.is_null() {
                target.as_object_mut().unwrap().remove(k);
            } else {
                target[k] = v.clone();
            }
        }
    }
    sign(&header, &claims, "ec-p256", Algorithm::ES256)
}

fn rules() -> DpopRules {
    DpopRules {
        mode: DpopMode::Required,
        algorithms: DEFAULT_DPOP_ALGORITHMS.to_vec(),
        window_secs: 60,
        max_proof_bytes: 8192,
        nonce: None,
    }
}

fn request() -> ProofRequest<'static> {
    ProofRequest {
        method: "GET",
        scheme: "https",
        host: "api.example.com",
        path: "/orders/42?x=1",
    }
}

fn check(proof: &str) -> Result<VerifiedProof, DpopError> {
    verify_proof(
        proof,
        TOKEN,
        &thumbprint("ec-p256"),
        &rules(),
        &request(),
        NOW,
    )
}

#[test]
fn a_good_proof_verifies_and_reports_jti_and_thumbprint() {
    let v = check(&proof_with(json!({}), json!({}))).unwrap();
    assert_eq!(v.jti, "proof-1");
    assert_eq!(v.iat, NOW);
    assert_eq!(&*v.jkt, thumbprint("ec-p256"));
}

#[test]
fn every_asymmetric_default_algorithm_verifies() {
    for (key, alg, name) in [
        ("ec-p384", Algorithm::ES384, "ES384"),
        ("ed25519", Algorithm::EdDSA, "EdDSA"),
        ("rsa2048", Algorithm::RS256, "RS256"),
        ("rsa2048", Algorithm::PS256, "PS256"),
    ] {
        let header = json!({"typ": "dpop+jwt", "alg": name, "jwk": public_jwk(key)});
        let proof = sign(&header, &good_claims(), key, alg);
        let got = verify_proof(&proof, TOKEN, &thumbprint(key), &rules(), &request(), NOW);
        assert!(got.is_ok(), "{name}: {got:?}");
    }
}

#[test]
fn typ_must_be_dpop_jwt() {
    assert_eq!(
        check(&proof_with(json!({"typ": null}), json!({}))),
        Err(DpopError::WrongTyp)
    );
    assert_eq!(
        check(&proof_with(json!({"typ": "JWT"}), json!({}))),
        Err(DpopError::WrongTyp)
    );
    assert_eq!(
        check(&proof_with(json!({"typ": 1}), json!({}))),
        Err(DpopError::WrongTyp)
    );
    assert!(check(&proof_with(json!({"typ": "DPoP+JWT"}), json!({}))).is_ok());
}

#[test]
fn alg_must_be_allowed_and_asymmetric() {
    let mut only_es384 = rules();
    only_es384.algorithms = vec![Algorithm::ES384];
    let proof = proof_with(json!({}), json!({}));
    assert_eq!(
        verify_proof(
            &proof,
            TOKEN,
            &thumbprint("ec-p256"),
            &only_es384,
            &request(),
            NOW
        ),
        Err(DpopError::AlgNotAllowed)
    );
    // HS256 is refused even when configured: the "key" would be in the proof itself.
    let mut hs = rules();
    hs.algorithms.push(Algorithm::HS256);
    let header = json!({"typ": "dpop+jwt", "alg": "HS256", "jwk": {"kty": "oct", "k": URL_SAFE_NO_PAD.encode([7u8; 32])}});
    let message = format!(
        "{}.{}",
        URL_SAFE_NO_PAD.encode(header.to_string()),
        URL_SAFE_NO_PAD.encode(good_claims().to_string())
    );
    let sig = jsonwebtoken::crypto::sign(
        message.as_bytes(),
        &EncodingKey::from_secret(&[7u8; 32]),
        Algorithm::HS256,
    )
    .unwrap();
    assert_eq!(
        verify_proof(
            &format!("{message}.{sig}"),
            TOKEN,
            "x",
            &hs,
            &request(),
            NOW
        ),
        Err(DpopError::AlgNotAllowed)
    );
    for alg in [json!("none"), json!(null), json!("ES999")] {
        assert_eq!(
            check(&proof_with(json!({ "alg": alg }), json!({}))),
            Err(DpopError::AlgNotAllowed)
        );
    }
}

#[test]
fn the_embedded_key_must_be_public_fit_the_alg_and_be_present() {
    assert!(matches!(
        check(&proof_with(json!({"jwk": null}), json!({}))),
        Err(DpopError::BadKey(_))
    ));
    let mut private = public_jwk("ec-p256");
    private["d"] = json!(URL_SAFE_NO_PAD.encode([1u8; 32]));
    let e = check(&proof_with(json!({ "jwk": private }), json!({}))).unwrap_err();
    assert!(
        matches!(&e, DpopError::BadKey(m) if m.contains("private")),
        "{e}"
    );
    let e = check(&proof_with(
        json!({"jwk": public_jwk("ec-p384")}),
        json!({}),
    ))
    .unwrap_err();
    assert!(
        matches!(&e, DpopError::BadKey(m) if m.contains("fit")),
        "{e}"
    );
    let oct = json!({"kty": "oct", "k": URL_SAFE_NO_PAD.encode([7u8; 32])});
    assert!(matches!(
        check(&proof_with(json!({ "jwk": oct }), json!({}))),
        Err(DpopError::BadKey(_))
    ));
}

#[test]
fn a_proof_signed_by_another_key_than_its_jwk_fails() {
    // The header names the P-256 key, the signature comes from a different P-256 key.
    let other = {
        let pem = read("tests/fixtures/e2e/key-a.pem");
        EncodingKey::from_rsa_pem(&pem).unwrap()
    };
    let header = json!({"typ": "dpop+jwt", "alg": "RS256", "jwk": public_jwk("rsa2048")});
    let message = format!(
        "{}.{}",
        URL_SAFE_NO_PAD.encode(header.to_string()),
        URL_SAFE_NO_PAD.encode(good_claims().to_string())
    );
    let sig = jsonwebtoken::crypto::sign(message.as_bytes(), &other, Algorithm::RS256).unwrap();
    assert_eq!(
        verify_proof(
            &format!("{message}.{sig}"),
            TOKEN,
            &thumbprint("rsa2048"),
            &rules(),
            &request(),
            NOW
        ),
        Err(DpopError::BadSignature)
    );
    // A flipped bit in an otherwise good proof.
    let good = proof_with(json!({}), json!({}));
    let (msg, sig) = good.rsplit_once('.').unwrap();
    let mut bytes = URL_SAFE_NO_PAD.decode(sig).unwrap();
    bytes[3] ^= 1;
    let tampered = format!("{msg}.{}", URL_SAFE_NO_PAD.encode(bytes));
    assert_eq!(check(&tampered), Err(DpopError::BadSignature));
}

#[test]
fn structure_is_strict() {
    assert!(matches!(check("a.b"), Err(DpopError::Malformed(_))));
    assert!(matches!(check(""), Err(DpopError::Malformed(_))));
    let huge = "a".repeat(9000);
    assert!(matches!(check(&huge), Err(DpopError::Malformed(m)) if m.contains("larger")));
    for name in ["crit", "b64", "jku", "x5u"] {
        assert_eq!(
            check(&proof_with(json!({ name: "x" }), json!({}))),
            Err(DpopError::ForbiddenHeader(static_name(name)))
        );
    }
}

#[test]
fn htm_must_be_the_request_method() {
    assert_eq!(
        check(&proof_with(json!({}), json!({"htm": "POST"}))),
        Err(DpopError::WrongMethod)
    );
    assert_eq!(
        check(&proof_with(json!({}), json!({"htm": "get"}))),
        Err(DpopError::WrongMethod)
    );
    assert_eq!(
        check(&proof_with(json!({}), json!({"htm": null}))),
        Err(DpopError::MissingClaim("htm"))
    );
}

#[test]
fn htu_must_name_the_request_url_after_normalization() {
    for ok in [
        "https://api.example.com/orders/42",
        "HTTPS://API.example.COM/orders/42",
        "https://api.example.com:443/orders/42",
        "https://api.example.com/orders/42?other=query",
        "https://api.example.com/orders/42#frag",
        "https://api.example.com/%6Frders/42",
        // The URL as the client sent it, before Envoy removed its dot segments.
        "https://api.example.com/x/../orders/42",
        "https://api.example.com/orders/./42",
    ] {
        assert!(
            check(&proof_with(json!({}), json!({ "htu": ok }))).is_ok(),
            "{ok}"
        );
    }
    for bad in [
        "http://api.example.com/orders/42",
        "https://api.example.com/orders/43",
        "https://api.example.com/orders/42/",
        "https://api.example.com/orders/42/..",
        "https://api.example.com/orders/42/x/..",
        "https://evil.example.com/orders/42",
        "https://api.example.com:8443/orders/42",
        "https://user@api.example.com/orders/42",
        "/orders/42",
        "",
    ] {
        assert_eq!(
            check(&proof_with(json!({}), json!({ "htu": bad }))),
            Err(DpopError::WrongUri),
            "{bad}"
        );
    }
}

#[test]
fn normalize_uri_examples() {
    assert_eq!(
        normalize_uri("HTTP://Example.COM:80").as_deref(),
        Some("http://example.com/")
    );
    assert_eq!(
        normalize_uri("https://[::1]:443/a").as_deref(),
        Some("https://[::1]/a")
    );
    assert_eq!(
        normalize_uri("https://[::1]:8443/a").as_deref(),
        Some("https://[::1]:8443/a")
    );
    assert_eq!(
        normalize_uri("https://h/a%2fb").as_deref(),
        Some("https://h/a%2Fb")
    );
    // Dot segments (RFC 3986 5.2.4), after `%2E` is decoded to a dot.
    for (uri, want) in [
        ("https://h/a/b/../c/./d", "https://h/a/c/d"),
        ("https://h/a/b/..", "https://h/a/"),
        ("https://h/a/.", "https://h/a/"),
        ("https://h/..", "https://h/"),
        ("https://h/../../a", "https://h/a"),
        ("https://h/a/%2E%2E/b", "https://h/b"),
        ("https://h/a//b/", "https://h/a//b/"),
        ("https://h/a..b/.c/", "https://h/a..b/.c/"),
    ] {
        assert_eq!(normalize_uri(uri).as_deref(), Some(want), "{uri}");
    }
    assert_eq!(normalize_uri("ftp://h/"), None);
    assert_eq!(normalize_uri("https://h:x/"), None);
    assert_eq!(normalize_uri("https://h/%zz"), None);
}

#[test]
fn iat_must_be_within_the_window() {
    assert!(check(&proof_with(json!({}), json!({"iat": NOW - 60}))).is_ok());
    assert!(check(&proof_with(json!({}), json!({"iat": NOW + 60}))).is_ok());
    assert_eq!(
        check(&proof_with(json!({}), json!({"iat": NOW - 61}))),
        Err(DpopError::Stale)
    );
    assert_eq!(
        check(&proof_with(json!({}), json!({"iat": NOW + 61}))),
        Err(DpopError::Stale)
    );
    assert_eq!(
        check(&proof_with(json!({}), json!({"iat": "1800000000"}))),
        Err(DpopError::BadIat)
    );
    assert_eq!(
        check(&proof_with(json!({}), json!({"iat": null}))),
        Err(DpopError::BadIat)
    );
    assert_eq!(
        check(&proof_with(json!({}), json!({"iat": NOW as f64 + 0.5}))),
        Err(DpopError::BadIat)
    );
    assert!(
        DpopError::BadIat.to_string().contains("whole number"),
        "{}",
        DpopError::BadIat
    );
}

#[test]
fn ath_must_hash_the_presented_token() {
    assert_eq!(
        check(&proof_with(
            json!({}),
            json!({"ath": access_token_hash("another.token.x")})
        )),
        Err(DpopError::WrongAth)
    );
    assert_eq!(
        check(&proof_with(json!({}), json!({"ath": null}))),
        Err(DpopError::MissingClaim("ath"))
    );
}

#[test]
fn the_proof_key_must_be_the_bound_key() {
    let proof = proof_with(json!({}), json!({}));
    assert_eq!(
        verify_proof(
            &proof,
            TOKEN,
            &thumbprint("ec-p384"),
            &rules(),
            &request(),
            NOW
        ),
        Err(DpopError::WrongKey)
    );
    assert_eq!(
        verify_proof(&proof, TOKEN, "", &rules(), &request(), NOW),
        Err(DpopError::WrongKey)
    );
}

#[test]
fn jti_is_required_and_bounded() {
    assert_eq!(
        check(&proof_with(json!({}), json!({"jti": null}))),
        Err(DpopError::MissingClaim("jti"))
    );
    assert!(matches!(
        check(&proof_with(json!({}), json!({"jti": ""}))),
        Err(DpopError::Malformed(_))
    ));
    assert!(matches!(
        check(&proof_with(json!({}), json!({"jti": "x".repeat(257)}))),
        Err(DpopError::Malformed(_))
    ));
}

#[test]
fn errors_never_contain_the_proof_or_token() {
    let proof = proof_with(json!({}), json!({"htm": "POST"}));
    let e = check(&proof).unwrap_err().to_string();
    for part in proof.split('.') {
        assert!(!e.contains(part), "{e}");
    }
    assert!(!e.contains(TOKEN));
}

/// `rules()` with server-provided nonces, current for five minutes.
fn nonce_rules() -> DpopRules {
    DpopRules {
        nonce: Some(Arc::new(NonceRules::new(
            b"0123456789abcdef0123456789abcdef",
            "corp",
            300,
            None,
        ))),
        ..rules()
    }
}

fn check_nonce(proof: &str, now: i64) -> Result<VerifiedProof, DpopError> {
    verify_proof(
        proof,
        TOKEN,
        &thumbprint("ec-p256"),
        &nonce_rules(),
        &request(),
        now,
    )
}

#[test]
fn with_nonces_on_a_proof_needs_a_current_nonce_and_is_handed_the_next_one_in_time() {
    let nonces = nonce_rules().nonce.unwrap();
    // Without one, or with one not made here: the answer tells the client to use ours.
    let missing = check_nonce(&proof_with(json!({}), json!({})), NOW).unwrap_err();
    assert_eq!(missing, DpopError::NonceMissing);
    assert!(missing.wants_nonce());
    for bad in [json!("made-up"), json!(7), json!(nonces.issue(NOW - 600))] {
        let got = check_nonce(&proof_with(json!({}), json!({"nonce": bad})), NOW);
        assert_eq!(got.unwrap_err(), DpopError::NonceRejected, "{bad}");
    }
    // The current nonce: accepted, nothing newer to hand out.
    let current = nonces.issue(NOW);
    let v = check_nonce(&proof_with(json!({}), json!({"nonce": current})), NOW).unwrap();
    assert_eq!(v.next_nonce, None);
    // The previous period's: still accepted, and the client is handed the current one.
    let later = NOW + 300;
    let v = check_nonce(
        &proof_with(json!({}), json!({"iat": later, "nonce": current})),
        later,
    )
    .unwrap();
    assert_eq!(v.next_nonce, Some(nonces.issue(later)));
    // Without nonces configured, a `nonce` claim is simply not read.
    assert!(check(&proof_with(json!({}), json!({"nonce": "anything"}))).is_ok());
}

#[test]
fn a_proof_wrong_in_another_way_is_not_answered_with_a_nonce() {
    let got = check_nonce(&proof_with(json!({}), json!({"htm": "POST"})), NOW).unwrap_err();
    assert_eq!(got, DpopError::WrongMethod);
    assert!(!got.wants_nonce());
}
