//! Test tokens: the wall clock in seconds, RS256 signing with a PEM key, the development
//! issuer (`config/dev/`) and the two end-to-end keys (`tests/fixtures/e2e`).
//!
//! Each test file keeps its own default claims (they differ on purpose); this module only
//! merges and signs them, so the tokens are byte for byte what the files built before.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use serde_json::{Value, json};

use super::repo_root;

/// The development issuer of the shipped config (`config/portcullis.yaml`).
pub const DEV_ISSUER: &str = "https://dev.portcullis.invalid";
/// The audience the shipped config expects.
pub const DEV_AUDIENCE: &str = "portcullis-sample-api";
/// The `kid` of the development signing key.
pub const DEV_KID: &str = "portcullis-dev-1";

/// The issuer and audience of the end-to-end tests' own keys.
pub const E2E_ISSUER: &str = "https://issuer.e2e.invalid";
pub const E2E_AUDIENCE: &str = "e2e-api";

/// Seconds since the Unix epoch.
pub fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

/// A number unique within this test process (for `jti`s that never hit the token cache).
pub fn serial() -> usize {
    static SERIAL: AtomicUsize = AtomicUsize::new(0);
    SERIAL.fetch_add(1, Ordering::Relaxed)
}

/// `base` with every member of `extra` (an object) set over it.
pub fn merged(mut base: Value, extra: Value) -> Value {
    for (k, v) in extra.as_object().unwrap() {
        base[k] = v.clone();
    }
    base
}

/// Signs `claims` with RS256, the RSA key in the PEM file `pem` and the header `kid`.
pub fn sign(pem: &Path, kid: &str, claims: &Value) -> String {
    let key = jsonwebtoken::EncodingKey::from_rsa_pem(&std::fs::read(pem).unwrap()).unwrap();
    let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::RS256);
    header.kid = Some(kid.to_string());
    jsonwebtoken::encode(&header, claims, &key).unwrap()
}

/// The development signing key (`config/dev/signing-key.pem`).
pub fn dev_pem() -> PathBuf {
    repo_root().join("config/dev/signing-key.pem")
}

/// The development key set file (`config/dev/jwks.json`).
pub fn dev_jwks_path() -> PathBuf {
    repo_root().join("config/dev/jwks.json")
}

/// The development key set document.
pub fn dev_jwks() -> String {
    std::fs::read_to_string(dev_jwks_path()).unwrap()
}

/// Signs `claims` with the development key.
pub fn sign_dev(claims: &Value) -> String {
    sign(&dev_pem(), DEV_KID, claims)
}

/// Development-issuer claims: `iss`, `aud`, `iat` and `exp` (ten minutes) with `extra`
/// merged over them.
pub fn dev_claims(extra: Value) -> Value {
    merged(
        json!({
            "iss": DEV_ISSUER,
            "aud": DEV_AUDIENCE,
            "iat": now(),
            "exp": now() + 600,
        }),
        extra,
    )
}

/// A development-issuer token ([`dev_claims`]) signed with the development key.
pub fn mint_dev(extra: Value) -> String {
    sign_dev(&dev_claims(extra))
}

/// A file of `tests/fixtures/e2e`.
pub fn e2e_fixture(name: &str) -> PathBuf {
    repo_root().join("tests/fixtures/e2e").join(name)
}

/// The two end-to-end signing keys (tests/fixtures/e2e): `A` is served from the start, `B`
/// is the rotation target.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Key {
    A,
    B,
}

impl Key {
    pub fn name(self) -> &'static str {
        match self {
            Key::A => "a",
            Key::B => "b",
        }
    }

    pub fn kid(self) -> String {
        format!("e2e-{}", self.name())
    }

    pub fn jwk(self) -> Value {
        let path = e2e_fixture(&format!("key-{}.jwk.json", self.name()));
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
    }

    pub fn pem(self) -> PathBuf {
        e2e_fixture(&format!("key-{}.pem", self.name()))
    }

    /// Signs `claims` with this key.
    pub fn sign(self, claims: &Value) -> String {
        sign(&self.pem(), &self.kid(), claims)
    }
}

impl Key {
    /// A fresh token (its own `jti`, prefixed `tag`) from the end-to-end issuer for `alice`,
    /// valid for 10 minutes; `extra` merged over it.
    pub fn mint(self, tag: &str, extra: Value) -> String {
        self.sign(&merged(
            json!({
                "iss": E2E_ISSUER,
                "aud": E2E_AUDIENCE,
                "sub": "alice",
                "iat": now(),
                "exp": now() + 600,
                "jti": format!("{tag}-{}-{}", std::process::id(), serial()),
            }),
            extra,
        ))
    }
}

/// A JWKS document holding `keys`.
pub fn jwks(keys: &[Key]) -> String {
    json!({ "keys": keys.iter().map(|k| k.jwk()).collect::<Vec<_>>() }).to_string()
}

/// Writes a JWKS document holding `keys` to `dir/jwks.json` and returns its path.
pub fn write_jwks(dir: &Path, keys: &[Key]) -> PathBuf {
    let path = dir.join("jwks.json");
    std::fs::write(&path, jwks(keys)).unwrap();
    path
}

/// DPoP (RFC 9449) test material: the P-256 fixture key's public JWK and its RFC 7638
/// thumbprint.
pub fn dpop_proof_key() -> (Value, String) {
    let set: Value = serde_json::from_str(
        &std::fs::read_to_string(repo_root().join("tests/fixtures/keys/ec-p256.jwks.json"))
            .unwrap(),
    )
    .unwrap();
    let k = &set["keys"][0];
    let jwk = json!({"kty": "EC", "crv": "P-256", "x": k["x"], "y": k["y"]});
    let canonical = format!(
        r#"{{"crv":"P-256","kty":"EC","x":"{}","y":"{}"}}"#,
        k["x"].as_str().unwrap(),
        k["y"].as_str().unwrap()
    );
    let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, canonical.as_bytes());
    (
        jwk,
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(digest.as_ref()),
    )
}

/// A token from the end-to-end issuer (key A) for `alice` with `orders:read`, bound to the
/// DPoP key whose thumbprint is `jkt`.
pub fn dpop_token(jkt: &str) -> String {
    let claims = json!({
        "iss": E2E_ISSUER, "aud": E2E_AUDIENCE, "sub": "alice", "scope": "orders:read",
        "iat": now(), "exp": now() + 600,
        "jti": format!("dpop-token-{}-{}", std::process::id(), serial()),
        "cnf": { "jkt": jkt },
    });
    Key::A.sign(&claims)
}

/// A fresh DPoP proof (its own `jti`) for `GET htu` and `token`, signed with the fixture key.
pub fn dpop_proof(jwk: &Value, token: &str, htu: &str) -> String {
    dpop_proof_with_nonce(jwk, token, htu, None)
}

/// [`dpop_proof`] carrying the server-provided `nonce`, when given.
pub fn dpop_proof_with_nonce(jwk: &Value, token: &str, htu: &str, nonce: Option<&str>) -> String {
    let header = json!({"typ": "dpop+jwt", "alg": "ES256", "jwk": jwk});
    let ath = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .encode(aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, token.as_bytes()).as_ref());
    let mut claims = json!({
        "jti": format!("proof-{}-{}", std::process::id(), serial()),
        "htm": "GET", "htu": htu, "iat": now(), "ath": ath,
    });
    if let Some(nonce) = nonce {
        claims["nonce"] = nonce.into();
    }
    let message = format!(
        "{}.{}",
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(header.to_string()),
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(claims.to_string())
    );
    let pem = std::fs::read(repo_root().join("tests/fixtures/keys/ec-p256.pem")).unwrap();
    let key = jsonwebtoken::EncodingKey::from_ec_pem(&pem).unwrap();
    let sig = jsonwebtoken::crypto::sign(message.as_bytes(), &key, jsonwebtoken::Algorithm::ES256)
        .unwrap();
    format!("{message}.{sig}")
}
