//! JSON Web Key sets: parse, filter unsafe keys, and find candidate keys for a token.
//! OWNER: identity helper.
//!
//! A key set is parsed strictly (duplicate JSON members anywhere reject the whole document)
//! and then filtered key by key: a key we must not or cannot use is dropped with a reason,
//! never failing the set, so one odd key published by an identity provider does not take
//! the issuer down. Every kept key is validated with aws-lc at load time, so a malformed key
//! is a load-time drop rather than a per-request failure. Pure: no I/O, no clock.

use std::sync::{Arc, OnceLock};

use aws_lc_rs::signature::{
    ECDSA_P256_SHA256_FIXED, ECDSA_P384_SHA384_FIXED, ED25519, ParsedPublicKey,
    RSA_PKCS1_2048_8192_SHA256, RSA_PKCS1_2048_8192_SHA384, RSA_PKCS1_2048_8192_SHA512,
    RSA_PSS_2048_8192_SHA256, RSA_PSS_2048_8192_SHA384, RSA_PSS_2048_8192_SHA512, RsaParameters,
    RsaPublicKeyComponents,
};
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::{Algorithm, DecodingKey};
use serde_json::{Map, Value};

use super::strict_json;

/// Smallest RSA modulus we accept (NIST SP 800-131A; aws-lc refuses smaller for verification).
const MIN_RSA_BITS: usize = 2048;
/// Largest RSA modulus aws-lc verifies; a larger key could never verify anything.
const MAX_RSA_BITS: usize = 8192;
/// Smallest HMAC secret we keep (RFC 7518 section 3.2: at least the hash size of HS256).
const MIN_OCT_BYTES: usize = 32;
/// Kids longer than this are shortened in drop reasons (they end up in logs).
const MAX_KID_IN_MESSAGE: usize = 64;

/// Where a key set came from: fetched sets never contribute symmetric keys.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyOrigin {
    LocalFile,
    Fetched,
}

/// One usable verification key.
pub struct VerifyKey {
    pub kid: Option<String>,
    /// `RSA`, `EC`, `OKP` or `oct`.
    pub kty: String,
    /// The curve for `EC` (`P-256`, `P-384`) and `OKP` (`Ed25519`) keys; `None` otherwise.
    pub crv: Option<String>,
    /// The JWK's `alg`, when it names one.
    pub alg: Option<Algorithm>,
    /// The JWK's `use`.
    pub usage: Option<String>,
    /// The JWK's `key_ops`.
    pub key_ops: Option<Vec<String>>,
    /// How signatures are checked: aws-lc keys parsed once and kept (so each verification
    /// skips re-reading the key), or the HMAC secret.
    verifier: Verifier,
    /// RFC 7638 thumbprint (base64url SHA-256); identifies the key across refreshes.
    /// For `oct` keys it is instead a keyed hash under a per-process random key (prefixed
    /// `oct-`), because a plain hash of a weak secret could be brute-forced from logs.
    pub fingerprint: Arc<str>,
}

impl VerifyKey {
    /// True when this key may verify a token signed with `alg`: the key type (and curve)
    /// fits the algorithm family, its `alg` (if any) is `alg`, its `use` (if any) is `sig`
    /// and its `key_ops` (if any) include `verify`.
    // INVARIANT: an RSA/EC/OKP key never fits an HS* algorithm and an `oct` key never fits an
    // asymmetric one, which is what makes algorithm confusion (a public key used as an HMAC
    // secret) impossible.
    pub fn fits(&self, alg: Algorithm) -> bool {
        let type_fits = match alg {
            Algorithm::RS256
            | Algorithm::RS384
            | Algorithm::RS512
            | Algorithm::PS256
            | Algorithm::PS384
            | Algorithm::PS512 => self.kty == "RSA",
            Algorithm::ES256 => self.kty == "EC" && self.crv.as_deref() == Some("P-256"),
            Algorithm::ES384 => self.kty == "EC" && self.crv.as_deref() == Some("P-384"),
            Algorithm::EdDSA => self.kty == "OKP" && self.crv.as_deref() == Some("Ed25519"),
            Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512 => {
                self.kty == "oct"
                    && matches!(&self.verifier, Verifier::Secret { len, .. } if *len >= hmac_min_len(alg))
            }
            // `Algorithm` is non-exhaustive: an algorithm added later fits no key until we
            // decide which keys it may use.
            _ => false,
        };
        type_fits
            && self.alg.is_none_or(|a| a == alg)
            && self.usage.as_deref().is_none_or(|u| u == "sig")
            && self
                .key_ops
                .as_ref()
                .is_none_or(|ops| ops.iter().any(|o| o == "verify"))
    }
}

impl VerifyKey {
    /// True when `signature` (base64url, as in a compact JWS) is this key's signature over
    /// `message` with `alg`. The caller has checked `fits(alg)`; a key that does not fit, or
    /// a signature that does not decode, never verifies.
    pub fn verify(&self, alg: Algorithm, message: &[u8], signature: &str) -> bool {
        if !self.fits(alg) {
            return false;
        }
        let mut buf = [0u8; super::jwt::MAX_SIGNATURE_BYTES];
        let parsed = match &self.verifier {
            Verifier::Secret { key, .. } => {
                return jsonwebtoken::crypto::verify(signature, message, key, alg).unwrap_or(false);
            }
            Verifier::Fixed(parsed) => parsed,
            Verifier::Rsa { components, parsed } => {
                let Some((slot, params)) = rsa_slot(alg) else {
                    return false;
                };
                // Parsed on first use per algorithm, then kept with the key (aws-lc keeps
                // the key's Montgomery context with it).
                match parsed[slot].get_or_init(|| components.to_parsed_public_key(params).ok()) {
                    Some(p) => p,
                    None => return false,
                }
            }
        };
        let Ok(len) = URL_SAFE_NO_PAD.decode_slice(signature, &mut buf) else {
            return false;
        };
        parsed.verify_sig(message, &buf[..len]).is_ok()
    }
}

/// A key's verification material.
enum Verifier {
    /// An RSA public key, with a parsed aws-lc key per RS*/PS* algorithm built on first use.
    Rsa {
        components: RsaPublicKeyComponents<Vec<u8>>,
        parsed: Box<[OnceLock<Option<ParsedPublicKey>>; RSA_ALGS.len()]>,
    },
    /// An EC or OKP key: its curve allows exactly one algorithm, parsed at load time.
    Fixed(ParsedPublicKey),
    /// An HMAC secret (local key files only); `len` is its size in bytes.
    Secret { key: DecodingKey, len: usize },
}

/// The RSA algorithms and the aws-lc parameters each verifies with.
const RSA_ALGS: [(Algorithm, &RsaParameters); 6] = [
    (Algorithm::RS256, &RSA_PKCS1_2048_8192_SHA256),
    (Algorithm::RS384, &RSA_PKCS1_2048_8192_SHA384),
    (Algorithm::RS512, &RSA_PKCS1_2048_8192_SHA512),
    (Algorithm::PS256, &RSA_PSS_2048_8192_SHA256),
    (Algorithm::PS384, &RSA_PSS_2048_8192_SHA384),
    (Algorithm::PS512, &RSA_PSS_2048_8192_SHA512),
];

fn rsa_slot(alg: Algorithm) -> Option<(usize, &'static RsaParameters)> {
    RSA_ALGS
        .iter()
        .position(|(a, _)| *a == alg)
        .map(|i| (i, RSA_ALGS[i].1))
}

/// The shortest secret usable with an HMAC algorithm: its hash output size (RFC 7518 3.2).
fn hmac_min_len(alg: Algorithm) -> usize {
    match alg {
        Algorithm::HS384 => 48,
        Algorithm::HS512 => 64,
        _ => 32,
    }
}

impl std::fmt::Debug for VerifyKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VerifyKey")
            .field("kid", &self.kid)
            .field("kty", &self.kty)
            .field("crv", &self.crv)
            .field("alg", &self.alg)
            .field("fingerprint", &self.fingerprint)
            .finish_non_exhaustive()
    }
}

/// A parsed, filtered key set.
#[derive(Debug, Default)]
pub struct KeySet {
    pub keys: Vec<Arc<VerifyKey>>,
}

/// A key set plus what was dropped while loading it and why (for logs).
#[derive(Debug)]
pub struct LoadedKeys {
    pub set: KeySet,
    pub dropped: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JwkError {
    #[error("key set is not valid JSON: {0}")]
    NotJson(String),
    #[error("key set is not a JWKS document: {0}")]
    NotAKeySet(&'static str),
    #[error("key set has no usable keys")]
    NoUsableKeys,
}

impl KeySet {
    /// Parses a JWKS document (`{"keys":[...]}`, strict JSON), dropping with a reason each
    /// key that must not or cannot be used: RSA under 2048 (or over 8192) bits, `oct` from a
    /// fetched set (or under 256 bits), `use` other than `sig`, `key_ops` without `verify`,
    /// unsupported `kty`/`crv`/`alg`, an `alg` that does not fit the key type, private
    /// members, malformed members, points not on the curve. Duplicate kids are kept.
    /// `NotJson`/`NotAKeySet` when the document itself is wrong; `NoUsableKeys` when every
    /// key was dropped (use `parse_jwks` to see why).
    pub fn from_jwks(json: &[u8], origin: KeyOrigin) -> Result<LoadedKeys, JwkError> {
        let loaded = Self::parse_jwks(json, origin)?;
        if loaded.set.is_empty() {
            return Err(JwkError::NoUsableKeys);
        }
        Ok(loaded)
    }

    /// Like `from_jwks`, but an empty result is not an error, so a caller can log the reasons
    /// every key was dropped before it reports `NoUsableKeys`.
    pub fn parse_jwks(json: &[u8], origin: KeyOrigin) -> Result<LoadedKeys, JwkError> {
        let doc = strict_json::parse_value(json).map_err(|e| JwkError::NotJson(e.to_string()))?;
        let Value::Object(doc) = doc else {
            return Err(JwkError::NotAKeySet("the top level is not a JSON object"));
        };
        let keys = match doc.get("keys") {
            Some(Value::Array(keys)) => keys,
            Some(_) => return Err(JwkError::NotAKeySet("`keys` is not an array")),
            None => return Err(JwkError::NotAKeySet("there is no `keys` member")),
        };
        let mut set = KeySet {
            keys: Vec::with_capacity(keys.len()),
        };
        let mut dropped = Vec::new();
        for (index, jwk) in keys.iter().enumerate() {
            match parse_key(jwk, origin) {
                Ok(key) => set.keys.push(Arc::new(key)),
                Err(reason) => dropped.push(format!("key #{index}{}: {reason}", kid_label(jwk))),
            }
        }
        Ok(LoadedKeys { set, dropped })
    }

    /// The keys that may verify a token signed with `alg`: with a `kid`, only keys carrying
    /// exactly that kid; without one, every key. Either way only keys that `fits(alg)`.
    pub fn candidates<'s, 'a>(
        &'s self,
        kid: Option<&'a str>,
        alg: Algorithm,
    ) -> impl Iterator<Item = &'s Arc<VerifyKey>> + use<'s, 'a> {
        self.keys
            .iter()
            .filter(move |k| kid.is_none_or(|kid| k.kid.as_deref() == Some(kid)) && k.fits(alg))
    }

    /// True when some key carries this `kid` (whether or not it fits a given algorithm).
    pub fn has_kid(&self, kid: &str) -> bool {
        self.keys.iter().any(|k| k.kid.as_deref() == Some(kid))
    }

    /// True when a key with this fingerprint is in the set.
    pub fn contains(&self, fingerprint: &str) -> bool {
        self.keys.iter().any(|k| &*k.fingerprint == fingerprint)
    }

    pub fn len(&self) -> usize {
        self.keys.len()
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }
}

/// ` (kid `x`)` for drop messages, shortened, or nothing when the key has no string kid.
fn kid_label(jwk: &Value) -> String {
    match jwk.get("kid").and_then(Value::as_str) {
        Some(kid) => format!(" (kid `{}`)", shorten(kid)),
        None => String::new(),
    }
}

/// A value from a key set, shortened for a log line (at a char boundary).
fn shorten(s: &str) -> String {
    if s.len() <= MAX_KID_IN_MESSAGE {
        return s.to_string();
    }
    let mut end = MAX_KID_IN_MESSAGE;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...", &s[..end])
}

/// A public key embedded in a message (a DPoP proof's `jwk` header): asymmetric only, no
/// private members, validated like a fetched key set's keys.
pub(crate) fn public_key_from_jwk(jwk: &Value) -> Result<VerifyKey, String> {
    parse_key(jwk, KeyOrigin::Fetched)
}

/// Builds a usable key from one JWK, or says why it must be dropped.
fn parse_key(jwk: &Value, origin: KeyOrigin) -> Result<VerifyKey, String> {
    let obj = jwk.as_object().ok_or("not a JSON object")?;
    let kid = opt_str(obj, "kid")?.map(str::to_string);
    let kty = opt_str(obj, "kty")?.ok_or("`kty` is missing")?;
    let usage = opt_str(obj, "use")?.map(str::to_string);
    if let Some(u) = &usage
        && u != "sig"
    {
        return Err(format!("`use` is `{}`, not `sig`", shorten(u)));
    }
    let key_ops = match obj.get("key_ops") {
        None => None,
        Some(Value::Array(ops)) => {
            let ops = ops
                .iter()
                .map(|o| o.as_str().map(str::to_string))
                .collect::<Option<Vec<_>>>()
                .ok_or("`key_ops` holds a non-string")?;
            if !ops.iter().any(|o| o == "verify") {
                return Err("`key_ops` does not include `verify`".to_string());
            }
            Some(ops)
        }
        Some(_) => return Err("`key_ops` is not a list".to_string()),
    };
    let alg = match opt_str(obj, "alg")? {
        None => None,
        // RFC 9864's fully-specified name for EdDSA over Ed25519.
        Some("Ed25519") => Some(Algorithm::EdDSA),
        Some(name) => Some(
            name.parse::<Algorithm>()
                .map_err(|_| format!("unsupported `alg` `{}`", shorten(name)))?,
        ),
    };

    let (crv, verifier, fingerprint) = match kty {
        "RSA" => rsa_key(obj)?,
        "EC" => ec_key(obj)?,
        "OKP" => okp_key(obj)?,
        "oct" => oct_key(obj, origin)?,
        other => return Err(format!("unsupported key type `{}`", shorten(other))),
    };
    let key = VerifyKey {
        kid,
        kty: kty.to_string(),
        crv,
        alg,
        usage,
        key_ops,
        verifier,
        fingerprint,
    };
    // A key whose own `alg` does not fit its type (an RSA key marked ES256) can never verify
    // anything: drop it now so the mistake shows up in the load log.
    if let Some(alg) = key.alg
        && !key.fits(alg)
    {
        return Err(format!("`alg` {alg:?} does not fit a `{kty}` key"));
    }
    Ok(key)
}

type Built = (Option<String>, Verifier, Arc<str>);

fn rsa_key(obj: &Map<String, Value>) -> Result<Built, String> {
    refuse_private(obj, &["d", "p", "q", "dp", "dq", "qi", "oth"])?;
    let n = b64_member(obj, "n")?;
    let e = b64_member(obj, "e")?;
    let n = strip_leading_zeros(&n);
    let e = strip_leading_zeros(&e);
    let bits = n.first().map_or(0, |top| {
        (n.len() - 1) * 8 + (8 - top.leading_zeros() as usize)
    });
    if bits < MIN_RSA_BITS {
        return Err(format!(
            "RSA key has {bits} bits; at least {MIN_RSA_BITS} are required"
        ));
    }
    if bits > MAX_RSA_BITS {
        return Err(format!(
            "RSA key has {bits} bits; at most {MAX_RSA_BITS} are supported"
        ));
    }
    let components = RsaPublicKeyComponents {
        n: n.to_vec(),
        e: e.to_vec(),
    };
    let rs256 = components
        .to_parsed_public_key(&RSA_PKCS1_2048_8192_SHA256)
        .map_err(|_| "malformed RSA public key".to_string())?;
    let canonical = format!(
        r#"{{"e":"{}","kty":"RSA","n":"{}"}}"#,
        URL_SAFE_NO_PAD.encode(e),
        URL_SAFE_NO_PAD.encode(n)
    );
    let parsed: Box<[OnceLock<Option<ParsedPublicKey>>; RSA_ALGS.len()]> = Box::default();
    // RS256 is by far the most common: keep the key parsed for the check above.
    let _ = parsed[0].set(Some(rs256));
    Ok((
        None,
        Verifier::Rsa { components, parsed },
        thumbprint(&canonical),
    ))
}

fn ec_key(obj: &Map<String, Value>) -> Result<Built, String> {
    refuse_private(obj, &["d"])?;
    let crv = opt_str(obj, "crv")?.ok_or("`crv` is missing")?;
    let (size, alg): (
        usize,
        &'static dyn aws_lc_rs::signature::VerificationAlgorithm,
    ) = match crv {
        "P-256" => (32, &ECDSA_P256_SHA256_FIXED),
        "P-384" => (48, &ECDSA_P384_SHA384_FIXED),
        other => return Err(format!("unsupported EC curve `{}`", shorten(other))),
    };
    let x = b64_member(obj, "x")?;
    let y = b64_member(obj, "y")?;
    if x.len() != size || y.len() != size {
        return Err(format!("`x`/`y` must be {size} bytes for `{crv}`"));
    }
    let mut point = Vec::with_capacity(1 + 2 * size);
    point.push(0x04);
    point.extend_from_slice(&x);
    point.extend_from_slice(&y);
    let parsed = ParsedPublicKey::new(alg, &point)
        .map_err(|_| "the EC point is not on the curve".to_string())?;
    let canonical = format!(
        r#"{{"crv":"{crv}","kty":"EC","x":"{}","y":"{}"}}"#,
        URL_SAFE_NO_PAD.encode(&x),
        URL_SAFE_NO_PAD.encode(&y)
    );
    Ok((
        Some(crv.to_string()),
        Verifier::Fixed(parsed),
        thumbprint(&canonical),
    ))
}

fn okp_key(obj: &Map<String, Value>) -> Result<Built, String> {
    refuse_private(obj, &["d"])?;
    let crv = opt_str(obj, "crv")?.ok_or("`crv` is missing")?;
    if crv != "Ed25519" {
        return Err(format!("unsupported OKP curve `{}`", shorten(crv)));
    }
    let x = b64_member(obj, "x")?;
    if x.len() != 32 {
        return Err("`x` must be 32 bytes for `Ed25519`".to_string());
    }
    let parsed = ParsedPublicKey::new(&ED25519, &x)
        .map_err(|_| "malformed Ed25519 public key".to_string())?;
    let canonical = format!(
        r#"{{"crv":"Ed25519","kty":"OKP","x":"{}"}}"#,
        URL_SAFE_NO_PAD.encode(&x)
    );
    Ok((
        Some(crv.to_string()),
        Verifier::Fixed(parsed),
        thumbprint(&canonical),
    ))
}

fn oct_key(obj: &Map<String, Value>, origin: KeyOrigin) -> Result<Built, String> {
    // A symmetric key in a published key set is either a leak or an attack: anyone who can
    // read the set could sign tokens. Only a local file, configured on purpose, may hold one.
    if origin == KeyOrigin::Fetched {
        return Err("symmetric (`oct`) keys are never taken from a fetched key set".to_string());
    }
    let k = b64_member(obj, "k")?;
    if k.len() < MIN_OCT_BYTES {
        return Err(format!(
            "symmetric key is shorter than {} bits",
            MIN_OCT_BYTES * 8
        ));
    }
    let fingerprint = oct_fingerprint(&k).ok_or("could not fingerprint the symmetric key")?;
    Ok((
        None,
        Verifier::Secret {
            key: DecodingKey::from_secret(&k),
            len: k.len(),
        },
        fingerprint,
    ))
}

/// Rejects keys that carry private members: whoever published them has leaked the signing
/// key, so tokens "signed" by it prove nothing.
fn refuse_private(obj: &Map<String, Value>, members: &[&str]) -> Result<(), String> {
    match members.iter().find(|m| obj.contains_key(**m)) {
        Some(m) => Err(format!(
            "the key carries the private member `{m}`; only public keys may be published"
        )),
        None => Ok(()),
    }
}

fn opt_str<'a>(obj: &'a Map<String, Value>, name: &'static str) -> Result<Option<&'a str>, String> {
    match obj.get(name) {
        None => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(_) => Err(format!("`{name}` is not a string")),
    }
}

/// A required base64url member. Trailing `=` padding is tolerated here (unlike in tokens):
/// the key set is the issuer's own trusted document, and some providers pad.
fn b64_member(obj: &Map<String, Value>, name: &'static str) -> Result<Vec<u8>, String> {
    let s = opt_str(obj, name)?.ok_or_else(|| format!("`{name}` is missing"))?;
    let decoded = URL_SAFE_NO_PAD
        .decode(s.trim_end_matches('='))
        .map_err(|_| format!("`{name}` is not valid base64url"))?;
    if decoded.is_empty() {
        return Err(format!("`{name}` is empty"));
    }
    Ok(decoded)
}

fn strip_leading_zeros(bytes: &[u8]) -> &[u8] {
    let first = bytes.iter().position(|b| *b != 0).unwrap_or(bytes.len());
    &bytes[first..]
}

/// RFC 7638: base64url(SHA-256(canonical JSON of the required members)).
fn thumbprint(canonical: &str) -> Arc<str> {
    let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, canonical.as_bytes());
    URL_SAFE_NO_PAD.encode(digest.as_ref()).into()
}

/// A stable-within-the-process identifier for a symmetric key that reveals nothing about it.
fn oct_fingerprint(secret: &[u8]) -> Option<Arc<str>> {
    static PROCESS_KEY: OnceLock<Option<aws_lc_rs::hmac::Key>> = OnceLock::new();
    let key = PROCESS_KEY.get_or_init(|| {
        let mut seed = [0u8; 32];
        aws_lc_rs::rand::fill(&mut seed).ok()?;
        Some(aws_lc_rs::hmac::Key::new(
            aws_lc_rs::hmac::HMAC_SHA256,
            &seed,
        ))
    });
    let tag = aws_lc_rs::hmac::sign(key.as_ref()?, secret);
    Some(format!("oct-{}", URL_SAFE_NO_PAD.encode(tag.as_ref())).into())
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn fixture(name: &str) -> Vec<u8> {
        let path = format!(
            "{}/tests/fixtures/keys/{name}.jwks.json",
            env!("CARGO_MANIFEST_DIR")
        );
        std::fs::read(path).unwrap()
    }

    /// The first JWK of a fixture, as a JSON object to modify.
    fn fixture_jwk(name: &str) -> Map<String, Value> {
        let doc: Value = serde_json::from_slice(&fixture(name)).unwrap();
        doc["keys"][0].as_object().unwrap().clone()
    }

    fn set_of(keys: Vec<Value>) -> Vec<u8> {
        serde_json::to_vec(&json!({ "keys": keys })).unwrap()
    }

    /// Loads one modified key and returns what happened to it.
    fn load_one(jwk: Map<String, Value>, origin: KeyOrigin) -> LoadedKeys {
        KeySet::parse_jwks(&set_of(vec![Value::Object(jwk)]), origin).unwrap()
    }

    fn dropped_reason(jwk: Map<String, Value>, origin: KeyOrigin) -> String {
        let loaded = load_one(jwk, origin);
        assert!(loaded.set.is_empty(), "key should have been dropped");
        assert_eq!(loaded.dropped.len(), 1);
        loaded.dropped[0].clone()
    }

    fn with(mut jwk: Map<String, Value>, name: &str, value: Value) -> Map<String, Value> {
        jwk.insert(name.to_string(), value);
        jwk
    }

    fn without(mut jwk: Map<String, Value>, name: &str) -> Map<String, Value> {
        jwk.remove(name);
        jwk
    }

    #[test]
    fn loads_the_dev_key_set() {
        let path = format!("{}/config/dev/jwks.json", env!("CARGO_MANIFEST_DIR"));
        let loaded =
            KeySet::from_jwks(&std::fs::read(path).unwrap(), KeyOrigin::LocalFile).unwrap();
        assert_eq!(loaded.set.len(), 1);
        let key = &loaded.set.keys[0];
        assert_eq!(key.kid.as_deref(), Some("portcullis-dev-1"));
        assert_eq!(key.alg, Some(Algorithm::RS256));
        assert!(loaded.dropped.is_empty());
    }

    #[test]
    fn fingerprints_are_rfc7638_thumbprints() {
        for name in ["rsa2048", "ec-p256", "ec-p384", "ed25519"] {
            let bytes = fixture(name);
            let loaded = KeySet::from_jwks(&bytes, KeyOrigin::Fetched).unwrap();
            let set: jsonwebtoken::jwk::JwkSet = serde_json::from_slice(&bytes).unwrap();
            let expected = set.keys[0]
                .thumbprint(jsonwebtoken::jwk::ThumbprintHash::SHA256)
                .unwrap();
            assert_eq!(&*loaded.set.keys[0].fingerprint, expected, "{name}");
            assert!(loaded.set.contains(&expected));
        }
    }

    #[test]
    fn every_fixture_key_type_loads_with_its_curve() {
        let loaded = KeySet::from_jwks(&fixture("all"), KeyOrigin::Fetched).unwrap();
        let summary: Vec<(Option<&str>, &str, Option<&str>)> = loaded
            .set
            .keys
            .iter()
            .map(|k| (k.kid.as_deref(), k.kty.as_str(), k.crv.as_deref()))
            .collect();
        assert_eq!(
            summary,
            vec![
                (Some("rsa2048"), "RSA", None),
                (Some("ec-p256"), "EC", Some("P-256")),
                (Some("ec-p384"), "EC", Some("P-384")),
                (Some("ed25519"), "OKP", Some("Ed25519")),
            ]
        );
        assert_eq!(loaded.dropped.len(), 1);
        assert!(
            loaded.dropped[0].contains("rsa1024"),
            "{:?}",
            loaded.dropped
        );
    }

    #[test]
    fn drops_rsa_keys_under_2048_bits() {
        assert_eq!(
            KeySet::from_jwks(&fixture("rsa1024"), KeyOrigin::LocalFile).unwrap_err(),
            JwkError::NoUsableKeys
        );
        let loaded = KeySet::parse_jwks(&fixture("rsa1024"), KeyOrigin::LocalFile).unwrap();
        assert!(
            loaded.dropped[0].contains("1024 bits"),
            "{:?}",
            loaded.dropped
        );
    }

    #[test]
    fn rsa_modulus_leading_zeros_do_not_count_as_bits() {
        // A 1024-bit modulus padded with zero bytes to look like 2048 bits is still 1024.
        let jwk = fixture_jwk("rsa1024");
        let n = URL_SAFE_NO_PAD.decode(jwk["n"].as_str().unwrap()).unwrap();
        let mut padded = vec![0u8; 128];
        padded.extend_from_slice(&n);
        let jwk = with(jwk, "n", json!(URL_SAFE_NO_PAD.encode(padded)));
        assert!(dropped_reason(jwk, KeyOrigin::LocalFile).contains("1024 bits"));
    }

    fn oct_jwk(len: usize) -> Map<String, Value> {
        json!({"kty": "oct", "kid": "hmac", "k": URL_SAFE_NO_PAD.encode(vec![7u8; len])})
            .as_object()
            .unwrap()
            .clone()
    }

    #[test]
    fn oct_keys_are_never_taken_from_fetched_sets() {
        let reason = dropped_reason(oct_jwk(64), KeyOrigin::Fetched);
        assert!(reason.contains("fetched"), "{reason}");
    }

    #[test]
    fn oct_keys_from_local_files_are_kept_with_a_keyed_fingerprint() {
        let loaded = load_one(oct_jwk(64), KeyOrigin::LocalFile);
        assert_eq!(loaded.set.len(), 1);
        let key = &loaded.set.keys[0];
        assert!(key.fingerprint.starts_with("oct-"));
        // Not the plain RFC 7638 thumbprint, which would be a bare hash of the secret.
        let plain = thumbprint(&format!(
            r#"{{"k":"{}","kty":"oct"}}"#,
            URL_SAFE_NO_PAD.encode(vec![7u8; 64])
        ));
        assert_ne!(key.fingerprint, plain);
        // Stable within the process.
        let again = load_one(oct_jwk(64), KeyOrigin::LocalFile);
        assert_eq!(again.set.keys[0].fingerprint, key.fingerprint);
        assert!(key.fits(Algorithm::HS256));
        assert!(key.fits(Algorithm::HS512));
        assert!(!key.fits(Algorithm::RS256));
    }

    #[test]
    fn short_oct_keys_are_dropped_and_fit_only_short_hashes() {
        assert!(dropped_reason(oct_jwk(16), KeyOrigin::LocalFile).contains("shorter"));
        let loaded = load_one(oct_jwk(32), KeyOrigin::LocalFile);
        let key = &loaded.set.keys[0];
        assert!(key.fits(Algorithm::HS256));
        assert!(!key.fits(Algorithm::HS384));
        assert!(!key.fits(Algorithm::HS512));
    }

    #[test]
    fn asymmetric_keys_never_fit_hmac() {
        let loaded = KeySet::from_jwks(&fixture("all"), KeyOrigin::LocalFile).unwrap();
        for key in &loaded.set.keys {
            for alg in [Algorithm::HS256, Algorithm::HS384, Algorithm::HS512] {
                assert!(!key.fits(alg), "{key:?} fits {alg:?}");
            }
        }
    }

    #[test]
    fn keys_fit_only_their_own_family_and_curve() {
        let loaded = KeySet::from_jwks(&fixture("all"), KeyOrigin::LocalFile).unwrap();
        let fitting = |alg| -> Vec<&str> {
            loaded
                .set
                .candidates(None, alg)
                .map(|k| k.kid.as_deref().unwrap())
                .collect()
        };
        assert_eq!(fitting(Algorithm::RS256), vec!["rsa2048"]);
        assert_eq!(fitting(Algorithm::PS512), vec!["rsa2048"]);
        assert_eq!(fitting(Algorithm::ES256), vec!["ec-p256"]);
        assert_eq!(fitting(Algorithm::ES384), vec!["ec-p384"]);
        assert_eq!(fitting(Algorithm::EdDSA), vec!["ed25519"]);
    }

    #[test]
    fn key_alg_restricts_the_token_alg() {
        let jwk = with(fixture_jwk("rsa2048"), "alg", json!("PS256"));
        let loaded = load_one(jwk, KeyOrigin::Fetched);
        let key = &loaded.set.keys[0];
        assert!(key.fits(Algorithm::PS256));
        assert!(!key.fits(Algorithm::RS256));
    }

    #[test]
    fn drops_keys_not_for_signatures() {
        let jwk = with(fixture_jwk("rsa2048"), "use", json!("enc"));
        assert!(dropped_reason(jwk, KeyOrigin::Fetched).contains("`use` is `enc`"));
        let jwk = with(fixture_jwk("rsa2048"), "use", json!(1));
        assert!(dropped_reason(jwk, KeyOrigin::Fetched).contains("`use` is not a string"));
    }

    #[test]
    fn key_ops_must_include_verify() {
        let jwk = with(fixture_jwk("ec-p256"), "key_ops", json!(["encrypt"]));
        assert!(dropped_reason(jwk, KeyOrigin::Fetched).contains("verify"));
        let jwk = with(fixture_jwk("ec-p256"), "key_ops", json!("verify"));
        assert!(dropped_reason(jwk, KeyOrigin::Fetched).contains("not a list"));
        let jwk = with(fixture_jwk("ec-p256"), "key_ops", json!(["sign", "verify"]));
        assert_eq!(load_one(jwk, KeyOrigin::Fetched).set.len(), 1);
    }

    #[test]
    fn drops_unsupported_types_curves_and_algs() {
        let jwk = with(fixture_jwk("ec-p256"), "kty", json!("DSA"));
        assert!(dropped_reason(jwk, KeyOrigin::Fetched).contains("unsupported key type"));
        let jwk = with(fixture_jwk("ec-p256"), "crv", json!("P-521"));
        assert!(dropped_reason(jwk, KeyOrigin::Fetched).contains("unsupported EC curve"));
        let jwk = with(fixture_jwk("ed25519"), "crv", json!("X25519"));
        assert!(dropped_reason(jwk, KeyOrigin::Fetched).contains("unsupported OKP curve"));
        let jwk = with(fixture_jwk("rsa2048"), "alg", json!("RSA-OAEP"));
        assert!(dropped_reason(jwk, KeyOrigin::Fetched).contains("unsupported `alg`"));
        let jwk = without(fixture_jwk("rsa2048"), "kty");
        assert!(dropped_reason(jwk, KeyOrigin::Fetched).contains("`kty` is missing"));
    }

    #[test]
    fn drops_keys_whose_alg_does_not_fit_their_type() {
        let jwk = with(fixture_jwk("rsa2048"), "alg", json!("ES256"));
        assert!(dropped_reason(jwk, KeyOrigin::Fetched).contains("does not fit"));
        let jwk = with(fixture_jwk("ec-p256"), "alg", json!("ES384"));
        assert!(dropped_reason(jwk, KeyOrigin::Fetched).contains("does not fit"));
        let jwk = with(fixture_jwk("rsa2048"), "alg", json!("HS256"));
        assert!(dropped_reason(jwk, KeyOrigin::LocalFile).contains("does not fit"));
    }

    #[test]
    fn drops_malformed_members() {
        let jwk = without(fixture_jwk("rsa2048"), "n");
        assert!(dropped_reason(jwk, KeyOrigin::Fetched).contains("`n` is missing"));
        let jwk = with(fixture_jwk("rsa2048"), "e", json!("A*B"));
        assert!(dropped_reason(jwk, KeyOrigin::Fetched).contains("`e` is not valid base64url"));
        let jwk = with(
            fixture_jwk("ec-p256"),
            "x",
            json!(URL_SAFE_NO_PAD.encode([1u8; 31])),
        );
        assert!(dropped_reason(jwk, KeyOrigin::Fetched).contains("32 bytes"));
        let jwk = with(
            fixture_jwk("ec-p256"),
            "y",
            json!(URL_SAFE_NO_PAD.encode([1u8; 32])),
        );
        assert!(dropped_reason(jwk, KeyOrigin::Fetched).contains("not on the curve"));
        let jwk = with(
            fixture_jwk("ed25519"),
            "x",
            json!(URL_SAFE_NO_PAD.encode([1u8; 33])),
        );
        assert!(dropped_reason(jwk, KeyOrigin::Fetched).contains("32 bytes"));
        let jwk = with(fixture_jwk("ed25519"), "kid", json!(7));
        assert!(dropped_reason(jwk, KeyOrigin::Fetched).contains("`kid` is not a string"));
        let reason = KeySet::parse_jwks(br#"{"keys":["RSA"]}"#, KeyOrigin::Fetched)
            .unwrap()
            .dropped;
        assert!(reason[0].contains("not a JSON object"), "{reason:?}");
    }

    #[test]
    fn drops_keys_that_publish_private_members() {
        let jwk = with(fixture_jwk("ec-p256"), "d", json!("AAAA"));
        assert!(dropped_reason(jwk, KeyOrigin::LocalFile).contains("private member `d`"));
        let jwk = with(fixture_jwk("rsa2048"), "p", json!("AAAA"));
        assert!(dropped_reason(jwk, KeyOrigin::LocalFile).contains("private member `p`"));
    }

    #[test]
    fn one_bad_key_does_not_fail_the_set() {
        let keys = vec![
            Value::Object(with(fixture_jwk("rsa2048"), "use", json!("enc"))),
            Value::Object(fixture_jwk("ec-p256")),
        ];
        let loaded = KeySet::from_jwks(&set_of(keys), KeyOrigin::Fetched).unwrap();
        assert_eq!(loaded.set.len(), 1);
        assert_eq!(loaded.dropped.len(), 1);
        assert!(loaded.dropped[0].starts_with("key #0 (kid `rsa2048`)"));
    }

    #[test]
    fn duplicate_kids_are_kept() {
        let a = fixture_jwk("rsa2048");
        let b = with(fixture_jwk("ec-p256"), "kid", json!("rsa2048"));
        let loaded = KeySet::from_jwks(
            &set_of(vec![
                Value::Object(a.clone()),
                Value::Object(b),
                Value::Object(a),
            ]),
            KeyOrigin::Fetched,
        )
        .unwrap();
        assert_eq!(loaded.set.len(), 3);
        assert!(loaded.set.has_kid("rsa2048"));
        assert_eq!(
            loaded
                .set
                .candidates(Some("rsa2048"), Algorithm::RS256)
                .count(),
            2
        );
        assert_eq!(
            loaded
                .set
                .candidates(Some("rsa2048"), Algorithm::ES256)
                .count(),
            1
        );
    }

    #[test]
    fn rejects_documents_that_are_not_key_sets() {
        for doc in [&b"garbage"[..], b"", b"{\"keys\":[]} trailing"] {
            assert!(
                matches!(
                    KeySet::from_jwks(doc, KeyOrigin::Fetched),
                    Err(JwkError::NotJson(_))
                ),
                "{doc:?}"
            );
        }
        let deep = format!("{{\"keys\":{}", "[".repeat(10_000));
        assert!(matches!(
            KeySet::from_jwks(deep.as_bytes(), KeyOrigin::Fetched),
            Err(JwkError::NotJson(_))
        ));
        assert!(matches!(
            KeySet::from_jwks(br#"{"keys":[],"keys":[]}"#, KeyOrigin::Fetched),
            Err(JwkError::NotJson(m)) if m.contains("duplicate")
        ));
        assert!(matches!(
            KeySet::from_jwks(b"[]", KeyOrigin::Fetched),
            Err(JwkError::NotAKeySet(_))
        ));
        assert!(matches!(
            KeySet::from_jwks(b"{}", KeyOrigin::Fetched),
            Err(JwkError::NotAKeySet(_))
        ));
        assert!(matches!(
            KeySet::from_jwks(br#"{"keys":{}}"#, KeyOrigin::Fetched),
            Err(JwkError::NotAKeySet(_))
        ));
        assert_eq!(
            KeySet::from_jwks(br#"{"keys":[]}"#, KeyOrigin::Fetched).unwrap_err(),
            JwkError::NoUsableKeys
        );
    }

    #[test]
    fn drop_reasons_never_contain_key_material() {
        let jwk = oct_jwk(64);
        let secret = jwk["k"].as_str().unwrap().to_string();
        let reason = dropped_reason(jwk, KeyOrigin::Fetched);
        assert!(!reason.contains(&secret));
    }
}
