//! JWT verification tests: every rejection, every supported algorithm, key selection.
//!
//! Tokens are minted here from the fixture keys in `tests/fixtures/keys/` (test-only keys)
//! and the dev key, at a fixed `NOW`.

use std::sync::OnceLock;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::{Algorithm, EncodingKey};
use serde_json::{Value, json};

use super::jwk::{KeyOrigin, KeySet};
use super::jwt::{self, JwtError, JwtRules, Part};

const NOW: i64 = 1_800_000_000;
const ISS: &str = "https://issuer.test";
const AUD: &str = "api";

fn root() -> &'static str {
    env!("CARGO_MANIFEST_DIR")
}

fn read(rel: &str) -> Vec<u8> {
    std::fs::read(format!("{}/{rel}", root())).unwrap()
}

fn rules() -> JwtRules {
    JwtRules {
        issuer: ISS.into(),
        audiences: vec![AUD.into(), "other-api".into()],
        // The issuer defaults, so these tests follow the product's own algorithm list.
        algorithms: crate::config::DEFAULT_ALGORITHMS.to_vec(),
        leeway_secs: 30,
        max_lifetime_secs: None,
        required_typ: None,
        max_token_bytes: 8192,
    }
}

/// All fixture keys plus the dev key (the 1024-bit fixture is dropped on load).
fn keys() -> &'static KeySet {
    static KEYS: OnceLock<KeySet> = OnceLock::new();
    KEYS.get_or_init(|| {
        let mut set = KeySet::from_jwks(
            &read("tests/fixtures/keys/all.jwks.json"),
            KeyOrigin::LocalFile,
        )
        .unwrap()
        .set;
        let dev = KeySet::from_jwks(&read("config/dev/jwks.json"), KeyOrigin::LocalFile).unwrap();
        set.keys.extend(dev.set.keys);
        set
    })
}

fn encoding_key(name: &str) -> EncodingKey {
    let pem = if name == "dev" {
        read("config/dev/signing-key.pem")
    } else {
        read(&format!("tests/fixtures/keys/{name}.pem"))
    };
    match name {
        "dev" | "rsa2048" | "rsa1024" => EncodingKey::from_rsa_pem(&pem).unwrap(),
        "ec-p256" | "ec-p384" => EncodingKey::from_ec_pem(&pem).unwrap(),
        "ed25519" => EncodingKey::from_ed_pem(&pem).unwrap(),
        other => panic!("no fixture key {other}"),
    }
}

fn b64(bytes: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(bytes)
}

/// Signs raw header and claims JSON text with a named key.
fn mint_raw(header: &str, claims: &str, key: &EncodingKey, alg: Algorithm) -> String {
    let message = format!("{}.{}", b64(header.as_bytes()), b64(claims.as_bytes()));
    let sig = jsonwebtoken::crypto::sign(message.as_bytes(), key, alg).unwrap();
    format!("{message}.{sig}")
}

fn mint_with(header: Value, claims: Value, key: &str, alg: Algorithm) -> String {
    mint_raw(
        &header.to_string(),
        &claims.to_string(),
        &encoding_key(key),
        alg,
    )
}

fn default_claims() -> Value {
    json!({"iss": ISS, "aud": AUD, "sub": "alice", "scope": "orders:read", "iat": NOW, "exp": NOW + 600})
}

fn header(alg: &str, kid: &str) -> Value {
    json!({"alg": alg, "typ": "JWT", "kid": kid})
}

/// A good RS256 token from `rsa2048` with these claims.
fn with_claims(claims: Value) -> String {
    mint_with(
        header("RS256", "rsa2048"),
        claims,
        "rsa2048",
        Algorithm::RS256,
    )
}

/// A good RS256 token from `rsa2048` with these header members added.
fn with_header(extra: Value) -> String {
    let mut h = header("RS256", "rsa2048");
    for (k, v) in extra.as_object().unwrap() {
        h[k] = v.clone();
    }
    mint_with(h, default_claims(), "rsa2048", Algorithm::RS256)
}

/// `default_claims` with one member replaced (or removed when `value` is null).
fn claims_with(name: &str, value: Value) -> Value {
    let mut c = default_claims();
    if value.is_null() {
        c.as_object_mut().unwrap().remove(name);
    } else {
        c[name] = value;
    }
    c
}

fn good() -> String {
    with_claims(default_claims())
}

fn verify(token: &str) -> Result<jwt::VerifiedJwt, JwtError> {
    jwt::verify(token, &rules(), keys(), NOW)
}

fn verify_with(token: &str, rules: &JwtRules) -> Result<jwt::VerifiedJwt, JwtError> {
    jwt::verify(token, rules, keys(), NOW)
}

fn err(token: &str) -> JwtError {
    let e = verify(token).unwrap_err();
    assert_no_token_in(&e, token);
    e
}

/// No error message may contain any part of the token.
fn assert_no_token_in(e: &JwtError, token: &str) {
    let msg = e.to_string();
    for segment in token.split('.').filter(|s| s.len() >= 8) {
        assert!(
            !msg.contains(segment),
            "error `{msg}` contains a token segment"
        );
    }
    assert!(
        msg.starts_with(|c: char| c.is_ascii_lowercase()),
        "lower-case: {msg}"
    );
    assert!(!msg.ends_with('.'), "no trailing period: {msg}");
}

fn fingerprint_of(kid: &str) -> std::sync::Arc<str> {
    keys()
        .keys
        .iter()
        .find(|k| k.kid.as_deref() == Some(kid))
        .unwrap()
        .fingerprint
        .clone()
}

// ---------------------------------------------------------------- happy paths

#[test]
fn every_supported_algorithm_verifies() {
    let cases = [
        ("RS256", Algorithm::RS256, "rsa2048"),
        ("RS384", Algorithm::RS384, "rsa2048"),
        ("RS512", Algorithm::RS512, "rsa2048"),
        ("PS256", Algorithm::PS256, "rsa2048"),
        ("PS384", Algorithm::PS384, "rsa2048"),
        ("PS512", Algorithm::PS512, "rsa2048"),
        ("ES256", Algorithm::ES256, "ec-p256"),
        ("ES384", Algorithm::ES384, "ec-p384"),
        ("EdDSA", Algorithm::EdDSA, "ed25519"),
        ("RS256", Algorithm::RS256, "portcullis-dev-1"),
    ];
    for (name, alg, kid) in cases {
        let key = if kid == "portcullis-dev-1" {
            "dev"
        } else {
            kid
        };
        let token = mint_with(header(name, kid), default_claims(), key, alg);
        let v = verify(&token).unwrap_or_else(|e| panic!("{name} with {kid}: {e}"));
        assert_eq!(v.alg, alg);
        assert_eq!(v.kid.as_deref(), Some(kid));
        assert_eq!(v.key_fingerprint, fingerprint_of(kid));
        assert_eq!(v.exp, NOW + 600);
        assert_eq!(v.iat, Some(NOW));
        assert_eq!(v.nbf, None);
        assert_eq!(v.claims["sub"], "alice");
    }
}

#[test]
fn without_kid_every_fitting_key_is_tried() {
    for (name, alg, key, kid) in [
        ("ES384", Algorithm::ES384, "ec-p384", "ec-p384"),
        ("EdDSA", Algorithm::EdDSA, "ed25519", "ed25519"),
        // Two RSA keys fit RS256: the dev key and rsa2048; whichever signed must be found.
        ("RS256", Algorithm::RS256, "rsa2048", "rsa2048"),
        ("RS256", Algorithm::RS256, "dev", "portcullis-dev-1"),
    ] {
        let token = mint_with(json!({"alg": name}), default_claims(), key, alg);
        let v = verify(&token).unwrap_or_else(|e| panic!("{name}/{key}: {e}"));
        assert_eq!(v.kid, None);
        assert_eq!(v.key_fingerprint, fingerprint_of(kid));
    }
}

#[test]
fn duplicate_kids_try_each_key_with_that_kid() {
    let mut a: Value = serde_json::from_slice(&read("config/dev/jwks.json")).unwrap();
    let mut b: Value =
        serde_json::from_slice(&read("tests/fixtures/keys/rsa2048.jwks.json")).unwrap();
    a["keys"][0]["kid"] = json!("same");
    b["keys"][0]["kid"] = json!("same");
    let doc = json!({"keys": [a["keys"][0].clone(), b["keys"][0].clone()]});
    let set = KeySet::from_jwks(doc.to_string().as_bytes(), KeyOrigin::Fetched)
        .unwrap()
        .set;
    assert_eq!(set.len(), 2);
    for (key, index) in [("dev", 0), ("rsa2048", 1)] {
        let token = mint_with(
            json!({"alg": "RS256", "kid": "same"}),
            default_claims(),
            key,
            Algorithm::RS256,
        );
        let v = jwt::verify(&token, &rules(), &set, NOW).unwrap();
        assert_eq!(v.key_fingerprint, set.keys[index].fingerprint);
    }
}

#[test]
fn x5c_and_x5t_headers_are_ignored() {
    assert!(verify(&with_header(json!({"x5c": ["MIIB"], "x5t": "abc"}))).is_ok());
}

#[test]
fn whole_number_floats_are_accepted_as_times() {
    let token = with_claims(claims_with("exp", json!(1_800_000_600.0)));
    assert_eq!(verify(&token).unwrap().exp, NOW + 600);
    let token = mint_raw(
        r#"{"alg":"RS256","kid":"rsa2048"}"#,
        &format!(r#"{{"iss":"{ISS}","aud":"{AUD}","exp":1.8000006e9}}"#),
        &encoding_key("rsa2048"),
        Algorithm::RS256,
    );
    assert_eq!(verify(&token).unwrap().exp, NOW + 600);
}

#[test]
fn audience_may_be_a_list() {
    let token = with_claims(claims_with("aud", json!(["someone-else", "other-api"])));
    assert!(verify(&token).is_ok());
}

// ---------------------------------------------------------------- size and structure

#[test]
fn rejects_oversized_tokens_before_parsing() {
    let mut r = rules();
    let token = good();
    r.max_token_bytes = token.len() - 1;
    assert_eq!(
        verify_with(&token, &r).unwrap_err(),
        JwtError::TooLarge {
            max: token.len() - 1
        }
    );
    r.max_token_bytes = token.len();
    assert!(verify_with(&token, &r).is_ok());
    // Garbage that would fail parsing is still reported as too large: size comes first.
    let garbage = "!".repeat(9000);
    assert_eq!(err(&garbage), JwtError::TooLarge { max: 8192 });
    assert_eq!(
        jwt::peek_issuer(&garbage, 8192).unwrap_err(),
        JwtError::TooLarge { max: 8192 }
    );
}

#[test]
fn rejects_wrong_segment_counts() {
    let t = good();
    let parts: Vec<&str> = t.split('.').collect();
    assert_eq!(
        err(&format!("{}.{}", parts[0], parts[1])),
        JwtError::SegmentCount { found: 2 }
    );
    assert_eq!(err("abc"), JwtError::SegmentCount { found: 1 });
    assert_eq!(
        err(&format!("{t}.{}", parts[2])),
        JwtError::SegmentCount { found: 4 }
    );
    // A JWE (compact, 5 segments) is refused, and the message says why.
    let jwe = format!(
        "{}.{}.{}.{}.{}",
        parts[0], parts[1], parts[2], parts[1], parts[2]
    );
    let e = err(&jwe);
    assert_eq!(e, JwtError::SegmentCount { found: 5 });
    assert!(e.to_string().contains("encrypted"));
}

#[test]
fn rejects_empty_segments() {
    let t = good();
    let p: Vec<&str> = t.split('.').collect();
    assert_eq!(
        err(&format!(".{}.{}", p[1], p[2])),
        JwtError::EmptySegment(Part::Header)
    );
    assert_eq!(
        err(&format!("{}..{}", p[0], p[2])),
        JwtError::EmptySegment(Part::Claims)
    );
    assert_eq!(
        err(&format!("{}.{}.", p[0], p[1])),
        JwtError::EmptySegment(Part::Signature)
    );
}

#[test]
fn rejects_base64_padding() {
    let t = good();
    let p: Vec<&str> = t.split('.').collect();
    assert_eq!(
        err(&format!("{}=.{}.{}", p[0], p[1], p[2])),
        JwtError::Padding(Part::Header)
    );
    assert_eq!(
        err(&format!("{}.{}==.{}", p[0], p[1], p[2])),
        JwtError::Padding(Part::Claims)
    );
    assert_eq!(
        err(&format!("{}.{}.{}=", p[0], p[1], p[2])),
        JwtError::Padding(Part::Signature)
    );
}

#[test]
fn rejects_characters_outside_base64url() {
    let t = good();
    let p: Vec<&str> = t.split('.').collect();
    // Standard base64's `+` and `/` are not base64url.
    let std_header = base64::engine::general_purpose::STANDARD_NO_PAD.encode([0xfb, 0xff, 0xfe]);
    assert_eq!(std_header, "+//+");
    assert_eq!(
        err(&format!("{std_header}.{}.{}", p[0], p[2])),
        JwtError::InvalidCharacter(Part::Header)
    );
    assert_eq!(
        err(&format!("{}.{} .{}", p[0], p[1], p[2])),
        JwtError::InvalidCharacter(Part::Claims)
    );
    assert_eq!(
        err(&format!("{}.{}.{}+", p[0], p[1], p[2])),
        JwtError::InvalidCharacter(Part::Signature)
    );
}

#[test]
fn rejects_invalid_base64url() {
    let t = good();
    let p: Vec<&str> = t.split('.').collect();
    // One character can never be a whole base64 quantum.
    assert_eq!(
        err(&format!("A.{}.{}", p[1], p[2])),
        JwtError::BadBase64(Part::Header)
    );
    // `e30` is `{}`; `e31` has non-zero trailing bits, a second encoding of the same bytes.
    assert_eq!(
        err(&format!("{}.e31.{}", p[0], p[2])),
        JwtError::BadBase64(Part::Claims)
    );
    assert_eq!(
        err(&format!("{}.{}.A", p[0], p[1])),
        JwtError::BadBase64(Part::Signature)
    );
    // `B` leaves non-zero trailing bits after one byte.
    assert_eq!(
        err(&format!("{}.{}.AB", p[0], p[1])),
        JwtError::BadBase64(Part::Signature)
    );
    let huge_sig = "A".repeat(2000);
    assert_eq!(
        err(&format!("{}.{}.{huge_sig}", p[0], p[1])),
        JwtError::Malformed("the signature is longer than any supported algorithm's")
    );
}

#[test]
fn rejects_header_and_claims_that_are_not_json_objects() {
    let key = encoding_key("rsa2048");
    let claims = default_claims().to_string();
    let t = mint_raw("not json", &claims, &key, Algorithm::RS256);
    assert_eq!(err(&t), JwtError::InvalidJson(Part::Header));
    let t = mint_raw(r#"["RS256"]"#, &claims, &key, Algorithm::RS256);
    assert_eq!(err(&t), JwtError::NotObject(Part::Header));
    let t = mint_raw(r#"{"alg":"RS256"}"#, "\"alice\"", &key, Algorithm::RS256);
    assert_eq!(err(&t), JwtError::NotObject(Part::Claims));
    let t = mint_raw(r#"{"alg":"RS256"}"#, "{\"sub\":", &key, Algorithm::RS256);
    assert_eq!(err(&t), JwtError::InvalidJson(Part::Claims));
}

#[test]
fn rejects_duplicate_json_members() {
    let key = encoding_key("rsa2048");
    let claims = default_claims().to_string();
    let t = mint_raw(
        r#"{"alg":"RS256","alg":"none"}"#,
        &claims,
        &key,
        Algorithm::RS256,
    );
    assert_eq!(err(&t), JwtError::DuplicateMember(Part::Header));
    let dup_claims = format!(
        r#"{{"iss":"{ISS}","aud":"{AUD}","exp":{},"sub":"alice","sub":"admin"}}"#,
        NOW + 600
    );
    let t = mint_raw(r#"{"alg":"RS256"}"#, &dup_claims, &key, Algorithm::RS256);
    assert_eq!(err(&t), JwtError::DuplicateMember(Part::Claims));
    let nested = format!(
        r#"{{"iss":"{ISS}","aud":"{AUD}","exp":{},"realm":{{"roles":["a"],"roles":["admin"]}}}}"#,
        NOW + 600
    );
    let t = mint_raw(r#"{"alg":"RS256"}"#, &nested, &key, Algorithm::RS256);
    assert_eq!(err(&t), JwtError::DuplicateMember(Part::Claims));
}

// ---------------------------------------------------------------- header rules

#[test]
fn rejects_missing_or_none_alg() {
    let claims = default_claims();
    let t = mint_with(
        json!({"kid": "rsa2048"}),
        claims.clone(),
        "rsa2048",
        Algorithm::RS256,
    );
    assert_eq!(err(&t), JwtError::MissingAlg);
    for none in ["none", "None", "NONE", "nOnE"] {
        let unsigned = format!(
            "{}.{}.AAAA",
            b64(json!({"alg": none}).to_string().as_bytes()),
            b64(claims.to_string().as_bytes())
        );
        assert_eq!(err(&unsigned), JwtError::AlgNone, "{none}");
    }
    let t = mint_with(json!({"alg": 256}), claims, "rsa2048", Algorithm::RS256);
    assert_eq!(err(&t), JwtError::InvalidHeaderMember("alg"));
}

#[test]
fn rejects_unknown_and_disallowed_algs() {
    for alg in ["RS1", "rs256", "ES512", "HS1"] {
        let t = mint_with(
            json!({"alg": alg}),
            default_claims(),
            "rsa2048",
            Algorithm::RS256,
        );
        assert_eq!(err(&t), JwtError::UnsupportedAlg, "{alg}");
    }
    let mut only_rs256 = rules();
    only_rs256.algorithms = vec![Algorithm::RS256];
    let t = mint_with(
        header("PS256", "rsa2048"),
        default_claims(),
        "rsa2048",
        Algorithm::PS256,
    );
    assert_eq!(
        verify_with(&t, &only_rs256).unwrap_err(),
        JwtError::AlgNotAllowed(Algorithm::PS256)
    );
    assert!(verify(&t).is_ok());
}

#[test]
fn required_typ_is_enforced() {
    let mut r = rules();
    r.required_typ = Some("at+jwt".into());
    for (typ, ok) in [
        (Some("at+jwt"), true),
        (Some("AT+JWT"), true),
        (Some("application/at+jwt"), true),
        (Some("Application/AT+jwt"), true),
        (Some("JWT"), false),
        (Some("at+jwt2"), false),
        (Some("application/x/at+jwt"), false),
        (None, false),
    ] {
        let mut h = json!({"alg": "RS256", "kid": "rsa2048"});
        if let Some(typ) = typ {
            h["typ"] = json!(typ);
        }
        let t = mint_with(h, default_claims(), "rsa2048", Algorithm::RS256);
        let got = verify_with(&t, &r);
        if ok {
            assert!(got.is_ok(), "{typ:?}: {got:?}");
        } else {
            assert_eq!(
                got.unwrap_err(),
                JwtError::WrongTyp {
                    expected: "at+jwt".into()
                },
                "{typ:?}"
            );
        }
    }
    // A required typ written with the prefix matches one written without it.
    r.required_typ = Some("application/at+jwt".into());
    assert!(verify_with(&with_header(json!({"typ": "at+jwt"})), &r).is_ok());
    // Without a requirement, typ is not checked, but it must still be a string.
    assert!(verify(&with_header(json!({"typ": "whatever"}))).is_ok());
    assert_eq!(
        err(&with_header(json!({"typ": 1}))),
        JwtError::InvalidHeaderMember("typ")
    );
}

#[test]
fn rejects_crit() {
    assert_eq!(
        err(&with_header(json!({"crit": ["exp"], "exp": 1}))),
        JwtError::CritPresent
    );
    assert_eq!(
        err(&with_header(json!({"crit": []}))),
        JwtError::CritPresent
    );
}

#[test]
fn rejects_b64() {
    assert_eq!(
        err(&with_header(json!({"b64": false, "crit": ["b64"]}))),
        JwtError::CritPresent
    );
    assert_eq!(
        err(&with_header(json!({"b64": false}))),
        JwtError::B64Present
    );
    assert_eq!(
        err(&with_header(json!({"b64": true}))),
        JwtError::B64Present
    );
}

#[test]
fn rejects_embedded_and_remote_key_headers() {
    let jwk: Value =
        serde_json::from_slice(&read("tests/fixtures/keys/rsa2048.jwks.json")).unwrap();
    assert_eq!(
        err(&with_header(json!({"jwk": jwk["keys"][0]}))),
        JwtError::EmbeddedKey("jwk")
    );
    assert_eq!(
        err(&with_header(json!({"jku": "https://evil.example/jwks"}))),
        JwtError::EmbeddedKey("jku")
    );
    assert_eq!(
        err(&with_header(json!({"x5u": "https://evil.example/cert"}))),
        JwtError::EmbeddedKey("x5u")
    );
}

#[test]
fn a_token_carrying_its_own_key_never_verifies_with_it() {
    // An attacker's key, embedded in the header, with a kid the issuer does not have.
    let mut h = json!({"alg": "ES256", "kid": "attacker"});
    let jwk: Value =
        serde_json::from_slice(&read("tests/fixtures/keys/ec-p256.jwks.json")).unwrap();
    h["jwk"] = jwk["keys"][0].clone();
    let t = mint_with(h, default_claims(), "ec-p256", Algorithm::ES256);
    assert!(verify(&t).is_err());
}

// ---------------------------------------------------------------- key selection

#[test]
fn unknown_kid_is_reported_for_refetch() {
    let t = mint_with(
        header("RS256", "rotated-2"),
        default_claims(),
        "rsa2048",
        Algorithm::RS256,
    );
    let e = err(&t);
    assert_eq!(e, JwtError::UnknownKid("rotated-2".into()));
    assert!(e.is_unknown_kid());
    assert!(!JwtError::BadSignature.is_unknown_kid());
}

#[test]
fn unknown_kid_message_is_sanitised_and_short() {
    let kid = format!("a`b\nc{}", "x".repeat(500));
    let e = JwtError::UnknownKid(kid);
    let msg = e.to_string();
    assert!(!msg.contains('\n'));
    assert!(msg.len() < 150, "{msg}");
    assert!(msg.contains("a?b?c"));
}

#[test]
fn kid_must_be_a_string() {
    assert_eq!(
        err(&with_header(json!({"kid": 7}))),
        JwtError::InvalidHeaderMember("kid")
    );
}

#[test]
fn rejects_when_no_key_fits() {
    // The kid exists, but it is a P-256 key and the token says ES384.
    let t = mint_with(
        header("ES384", "ec-p256"),
        default_claims(),
        "ec-p384",
        Algorithm::ES384,
    );
    assert_eq!(err(&t), JwtError::NoFittingKey(Algorithm::ES384));
    // An RSA kid with an EC algorithm.
    let t = mint_with(
        header("ES256", "rsa2048"),
        default_claims(),
        "ec-p256",
        Algorithm::ES256,
    );
    assert_eq!(err(&t), JwtError::NoFittingKey(Algorithm::ES256));
}

#[test]
fn rejects_bad_signatures() {
    let t = good();
    let (msg, sig) = t.rsplit_once('.').unwrap();
    let mut bytes = URL_SAFE_NO_PAD.decode(sig).unwrap();
    bytes[10] ^= 1;
    assert_eq!(
        err(&format!("{msg}.{}", b64(&bytes))),
        JwtError::BadSignature
    );
    // Signed by another key that claims rsa2048's kid.
    let t = mint_with(
        header("RS256", "rsa2048"),
        default_claims(),
        "dev",
        Algorithm::RS256,
    );
    assert_eq!(err(&t), JwtError::BadSignature);
    // Claims swapped after signing.
    let other = with_claims(claims_with("sub", json!("admin")));
    let p: Vec<&str> = t.split('.').collect();
    let q: Vec<&str> = other.split('.').collect();
    assert_eq!(
        err(&format!("{}.{}.{}", p[0], q[1], p[2])),
        JwtError::BadSignature
    );
    // No kid, and no key in the set verifies.
    let only_rsa2048 = KeySet::from_jwks(
        &read("tests/fixtures/keys/rsa2048.jwks.json"),
        KeyOrigin::Fetched,
    )
    .unwrap()
    .set;
    let t = mint_with(
        json!({"alg": "RS256"}),
        default_claims(),
        "dev",
        Algorithm::RS256,
    );
    assert_eq!(
        jwt::verify(&t, &rules(), &only_rsa2048, NOW).unwrap_err(),
        JwtError::BadSignature
    );
}

#[test]
fn rsa_public_key_used_as_hmac_secret_fails() {
    // Classic algorithm confusion: sign HS256 with the issuer's *public* key as the secret,
    // against an issuer that (wrongly) also allows HS256.
    let mut r = rules();
    r.algorithms.push(Algorithm::HS256);
    let jwk: Value =
        serde_json::from_slice(&read("tests/fixtures/keys/rsa2048.jwks.json")).unwrap();
    let n = URL_SAFE_NO_PAD
        .decode(jwk["keys"][0]["n"].as_str().unwrap())
        .unwrap();
    for secret in [n.as_slice(), &read("tests/fixtures/keys/rsa2048.jwks.json")] {
        let key = EncodingKey::from_secret(secret);
        for h in [header("HS256", "rsa2048"), json!({"alg": "HS256"})] {
            let t = mint_raw(
                &h.to_string(),
                &default_claims().to_string(),
                &key,
                Algorithm::HS256,
            );
            assert_eq!(
                verify_with(&t, &r).unwrap_err(),
                JwtError::NoFittingKey(Algorithm::HS256)
            );
        }
    }
    // And with HS256 not allowed (the default), it is refused even earlier.
    let key = EncodingKey::from_secret(&n);
    let t = mint_raw(
        &header("HS256", "rsa2048").to_string(),
        &default_claims().to_string(),
        &key,
        Algorithm::HS256,
    );
    assert_eq!(err(&t), JwtError::AlgNotAllowed(Algorithm::HS256));
}

#[test]
fn local_hmac_keys_work_only_when_allowed() {
    let secret = [9u8; 32];
    let doc = json!({"keys": [{"kty": "oct", "kid": "shared", "k": b64(&secret)}]});
    let set = KeySet::from_jwks(doc.to_string().as_bytes(), KeyOrigin::LocalFile)
        .unwrap()
        .set;
    let t = mint_raw(
        &json!({"alg": "HS256", "kid": "shared"}).to_string(),
        &default_claims().to_string(),
        &EncodingKey::from_secret(&secret),
        Algorithm::HS256,
    );
    assert_eq!(
        jwt::verify(&t, &rules(), &set, NOW).unwrap_err(),
        JwtError::AlgNotAllowed(Algorithm::HS256)
    );
    let mut r = rules();
    r.algorithms.push(Algorithm::HS256);
    assert!(jwt::verify(&t, &r, &set, NOW).is_ok());
    // A wrong secret still fails.
    let t = mint_raw(
        &json!({"alg": "HS256", "kid": "shared"}).to_string(),
        &default_claims().to_string(),
        &EncodingKey::from_secret(&[8u8; 32]),
        Algorithm::HS256,
    );
    assert_eq!(
        jwt::verify(&t, &r, &set, NOW).unwrap_err(),
        JwtError::BadSignature
    );
}

// ---------------------------------------------------------------- claims

#[test]
fn issuer_is_required_and_exact() {
    assert_eq!(
        err(&with_claims(claims_with("iss", Value::Null))),
        JwtError::MissingClaim("iss")
    );
    assert_eq!(
        err(&with_claims(claims_with(
            "iss",
            json!("https://issuer.test/")
        ))),
        JwtError::WrongIssuer
    );
    assert_eq!(
        err(&with_claims(claims_with(
            "iss",
            json!("https://ISSUER.test")
        ))),
        JwtError::WrongIssuer
    );
    assert_eq!(
        err(&with_claims(claims_with("iss", json!([ISS])))),
        JwtError::IssuerNotString
    );
}

#[test]
fn audience_is_required_and_must_match() {
    assert_eq!(
        err(&with_claims(claims_with("aud", Value::Null))),
        JwtError::MissingClaim("aud")
    );
    assert_eq!(
        err(&with_claims(claims_with("aud", json!("API")))),
        JwtError::WrongAudience
    );
    assert_eq!(
        err(&with_claims(claims_with("aud", json!([])))),
        JwtError::WrongAudience
    );
    assert_eq!(
        err(&with_claims(claims_with("aud", json!(["x", "y"])))),
        JwtError::WrongAudience
    );
    assert_eq!(
        err(&with_claims(claims_with("aud", json!([AUD, 1])))),
        JwtError::AudienceNotStrings
    );
    assert_eq!(
        err(&with_claims(claims_with("aud", json!(1)))),
        JwtError::AudienceNotStrings
    );
    assert_eq!(
        err(&with_claims(claims_with("aud", json!({"a": AUD})))),
        JwtError::AudienceNotStrings
    );
}

/// `sub`, `jti` and `sid` are strings: a numeric `jti` or `sid` could never match a
/// revocation entry (always a string), so such a token could not be revoked.
#[test]
fn subject_jti_and_sid_must_be_strings_when_present() {
    for claim in ["sub", "jti", "sid"] {
        for bad in [
            json!(["alice"]),
            json!(1),
            json!(12345),
            json!({"id": "alice"}),
            json!(true),
        ] {
            assert_eq!(
                err(&with_claims(claims_with(claim, bad.clone()))),
                JwtError::ClaimNotString(claim),
                "{claim}: {bad}"
            );
        }
        // Absent, or a string: fine.
        assert!(verify(&with_claims(claims_with(claim, Value::Null))).is_ok());
        assert!(verify(&with_claims(claims_with(claim, json!("12345")))).is_ok());
    }
}

#[test]
fn exp_is_required() {
    assert_eq!(
        err(&with_claims(claims_with("exp", Value::Null))),
        JwtError::MissingClaim("exp")
    );
}

#[test]
fn time_claims_must_be_whole_seconds_in_range() {
    for name in ["exp", "nbf", "iat"] {
        for bad in [
            json!(1_800_000_600.5),
            json!("1800000600"),
            json!(-1),
            json!(253_402_300_800_i64),
            json!(u64::MAX),
            json!(1e300),
            json!(true),
            json!([NOW]),
        ] {
            let t = with_claims(claims_with(name, bad.clone()));
            assert_eq!(err(&t), JwtError::InvalidTimeClaim(name), "{name} = {bad}");
        }
    }
}

#[test]
fn expired_tokens_are_rejected_with_leeway() {
    // Leeway is 30s: exp + 30 <= now is expired.
    assert_eq!(
        err(&with_claims(claims_with("exp", json!(NOW - 30)))),
        JwtError::Expired
    );
    assert_eq!(
        err(&with_claims(claims_with("exp", json!(NOW - 3600)))),
        JwtError::Expired
    );
    assert!(verify(&with_claims(claims_with("exp", json!(NOW - 29)))).is_ok());
    let mut r = rules();
    r.leeway_secs = 0;
    assert_eq!(
        verify_with(&with_claims(claims_with("exp", json!(NOW))), &r).unwrap_err(),
        JwtError::Expired
    );
    assert!(verify_with(&with_claims(claims_with("exp", json!(NOW + 1))), &r).is_ok());
}

#[test]
fn not_yet_valid_tokens_are_rejected_with_leeway() {
    assert_eq!(
        err(&with_claims(claims_with("nbf", json!(NOW + 31)))),
        JwtError::NotYetValid
    );
    assert!(verify(&with_claims(claims_with("nbf", json!(NOW + 30)))).is_ok());
    assert_eq!(
        verify(&with_claims(claims_with("nbf", json!(NOW - 5))))
            .unwrap()
            .nbf,
        Some(NOW - 5)
    );
}

#[test]
fn tokens_issued_in_the_future_are_rejected_with_leeway() {
    assert_eq!(
        err(&with_claims(claims_with("iat", json!(NOW + 31)))),
        JwtError::IssuedInFuture
    );
    assert!(verify(&with_claims(claims_with("iat", json!(NOW + 30)))).is_ok());
}

/// A login in the future is refused like an `iat` in the future: `max_session_age` would
/// otherwise count it as a session of age zero, forever fresh.
#[test]
fn auth_time_in_the_future_is_rejected_with_leeway() {
    assert_eq!(
        err(&with_claims(claims_with("auth_time", json!(NOW + 31)))),
        JwtError::AuthTimeInFuture
    );
    assert_eq!(
        err(&with_claims(claims_with(
            "auth_time",
            json!(4_102_444_800_i64)
        ))),
        JwtError::AuthTimeInFuture
    );
    assert!(verify(&with_claims(claims_with("auth_time", json!(NOW + 30)))).is_ok());
    assert!(verify(&with_claims(claims_with("auth_time", json!(NOW - 3600)))).is_ok());
    // Another type is left to `max_session_age`, the only reader of the claim.
    assert!(
        verify(&with_claims(claims_with(
            "auth_time",
            json!(1_796_299_000.5)
        )))
        .is_ok()
    );
}

#[test]
fn max_lifetime_needs_iat_and_bounds_the_lifetime() {
    let mut r = rules();
    r.max_lifetime_secs = Some(3600);
    assert_eq!(
        verify_with(&with_claims(claims_with("iat", Value::Null)), &r).unwrap_err(),
        JwtError::LifetimeNeedsIat
    );
    let long = with_claims(json!({"iss": ISS, "aud": AUD, "iat": NOW, "exp": NOW + 3601}));
    assert_eq!(
        verify_with(&long, &r).unwrap_err(),
        JwtError::LifetimeTooLong { max: 3600 }
    );
    let ok = with_claims(json!({"iss": ISS, "aud": AUD, "iat": NOW, "exp": NOW + 3600}));
    assert!(verify_with(&ok, &r).is_ok());
    // Without max_lifetime, long lifetimes and missing iat are fine.
    assert!(verify(&long).is_ok());
    assert!(verify(&with_claims(claims_with("iat", Value::Null))).is_ok());
}

#[test]
fn check_times_alone() {
    let mut r = rules();
    r.max_lifetime_secs = Some(600);
    assert_eq!(
        jwt::check_times(NOW + 600, None, Some(NOW), &r, NOW),
        Ok(())
    );
    assert_eq!(
        jwt::check_times(NOW + 600, None, Some(NOW), &r, NOW + 630),
        Err(JwtError::Expired)
    );
    assert_eq!(
        jwt::check_times(NOW + 600, None, Some(NOW), &r, NOW + 629),
        Ok(())
    );
    assert_eq!(
        jwt::check_times(NOW + 600, Some(NOW + 100), Some(NOW), &r, NOW),
        Err(JwtError::NotYetValid)
    );
    assert_eq!(
        jwt::check_times(NOW + 600, None, Some(NOW + 100), &r, NOW),
        Err(JwtError::IssuedInFuture)
    );
    assert_eq!(
        jwt::check_times(NOW + 600, None, None, &r, NOW),
        Err(JwtError::LifetimeNeedsIat)
    );
    assert_eq!(
        jwt::check_times(NOW + 601, None, Some(NOW), &r, NOW),
        Err(JwtError::LifetimeTooLong { max: 600 })
    );
    // Extreme values never overflow.
    r.leeway_secs = u64::MAX;
    r.max_lifetime_secs = Some(u64::MAX);
    assert_eq!(
        jwt::check_times(i64::MAX, Some(i64::MIN), Some(i64::MIN), &r, i64::MIN),
        Ok(())
    );
}

// ---------------------------------------------------------------- peek_issuer

#[test]
fn peek_issuer_reads_iss_after_structural_checks() {
    assert_eq!(jwt::peek_issuer(&good(), 8192).unwrap(), ISS);
    // It does not verify: a bad signature still yields the (untrusted) issuer.
    let t = mint_with(
        header("RS256", "rsa2048"),
        default_claims(),
        "dev",
        Algorithm::RS256,
    );
    assert_eq!(jwt::peek_issuer(&t, 8192).unwrap(), ISS);
    assert_eq!(
        jwt::peek_issuer(&with_claims(claims_with("iss", Value::Null)), 8192).unwrap_err(),
        JwtError::MissingClaim("iss")
    );
    assert_eq!(
        jwt::peek_issuer(&with_claims(claims_with("iss", json!(1))), 8192).unwrap_err(),
        JwtError::IssuerNotString
    );
    assert_eq!(
        jwt::peek_issuer("a.b", 8192).unwrap_err(),
        JwtError::SegmentCount { found: 2 }
    );
    assert_eq!(
        jwt::peek_issuer(&good(), 10).unwrap_err(),
        JwtError::TooLarge { max: 10 }
    );
    let key = encoding_key("rsa2048");
    let dup = format!(r#"{{"iss":"{ISS}","iss":"https://other"}}"#);
    let t = mint_raw(r#"{"alg":"RS256"}"#, &dup, &key, Algorithm::RS256);
    assert_eq!(
        jwt::peek_issuer(&t, 8192).unwrap_err(),
        JwtError::DuplicateMember(Part::Claims)
    );
}

#[test]
fn a_token_is_checked_against_a_bounded_number_of_keys() {
    let jwk: Value =
        serde_json::from_slice(&read("tests/fixtures/keys/rsa2048.jwks.json")).unwrap();
    let mut key = jwk["keys"][0].clone();
    key.as_object_mut().unwrap().remove("kid");
    let set_of = |n: usize| {
        let doc = json!({ "keys": vec![key.clone(); n] });
        KeySet::from_jwks(doc.to_string().as_bytes(), KeyOrigin::Fetched)
            .unwrap()
            .set
    };
    let t = mint_with(
        json!({"alg": "RS256"}),
        default_claims(),
        "rsa2048",
        Algorithm::RS256,
    );
    // As many keys as are tried: the token verifies.
    assert!(jwt::verify(&t, &rules(), &set_of(jwt::MAX_CANDIDATE_KEYS), NOW).is_ok());
    // One more, and it is refused before any signature check, saying what to do.
    let e = jwt::verify(&t, &rules(), &set_of(jwt::MAX_CANDIDATE_KEYS + 1), NOW).unwrap_err();
    assert_eq!(
        e,
        JwtError::TooManyCandidateKeys(jwt::MAX_CANDIDATE_KEYS + 1)
    );
    assert!(e.to_string().contains("needs a `kid`"), "{e}");
}
