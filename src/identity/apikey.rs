//! Scoped API keys: the key format, its SHA-256 hash, and verifying a presented key against
//! the compiled key table (hash lookup, constant-time comparison, expiry).
//!
//! Pure and synchronous: no I/O, no clock (the caller passes `now`), no randomness (the CLI
//! generates the key bytes and hands them to `encode_key`). Never stores, logs or returns
//! the key itself: only its hash and the key's id ever leave this module.

use std::collections::HashMap;
use std::sync::Arc;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde_json::{Map, Value};

use super::Identity;
use crate::authz::policy::{Template, is_tchar};

/// The issuer name of every API-key identity. Reserved: no token issuer may use it.
pub const API_KEY_ISSUER: &str = "api-key";
/// The claim of an API-key identity that holds the key id.
pub const KEY_ID_CLAIM: &str = "api_key_id";
/// The prefix of generated keys: recognisable in secret scanners and in a misplaced paste.
pub const KEY_PREFIX: &str = "pck_";
/// Presented values longer than this are refused before hashing.
pub const MAX_KEY_BYTES: usize = 256;

/// Why a key entry or a presented key is invalid. Never contains a key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ApiKeyError {
    #[error("the hash must be `sha256:` followed by 64 hex digits")]
    BadHash,
    #[error("`{0}` is not an RFC 3339 UTC timestamp like `2027-01-31T00:00:00Z`")]
    BadExpiry(String),
    #[error("`{0}` is not `METHOD /path/template`")]
    BadEndpoint(String),
    #[error("invalid path template in `{0}`: {1}")]
    BadTemplate(String, crate::authz::policy::TemplateError),
    #[error("the API key is not valid")]
    Unknown,
    #[error("the API key is too long")]
    TooLong,
    #[error("API key `{0}` has expired")]
    Expired(Arc<str>),
}

/// One endpoint a key works on.
#[derive(Debug, Clone)]
pub struct KeyEndpoint {
    pub method: Box<str>,
    pub path: Template,
}

impl KeyEndpoint {
    /// Parses `GET /orders/{id}`. The method is exact and case-sensitive, as in routes.
    pub fn parse(text: &str) -> Result<KeyEndpoint, ApiKeyError> {
        let bad = || ApiKeyError::BadEndpoint(text.to_string());
        let (method, path) = text
            .trim()
            .split_once(char::is_whitespace)
            .ok_or_else(bad)?;
        let path = path.trim();
        if method.is_empty() || method == "*" || !method.bytes().all(is_tchar) {
            return Err(bad());
        }
        let path = Template::parse(path).map_err(|e| ApiKeyError::BadTemplate(text.into(), e))?;
        Ok(KeyEndpoint {
            method: Box::from(method),
            path,
        })
    }
}

impl std::fmt::Display for KeyEndpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}", self.method, self.path)
    }
}

/// One compiled key.
#[derive(Debug, Clone)]
pub struct ApiKey {
    pub id: Arc<str>,
    pub owner: String,
    /// SHA-256 of the key.
    pub hash: [u8; 32],
    /// Seconds since the epoch from which the key is refused.
    pub expires_at: i64,
    pub endpoints: Vec<KeyEndpoint>,
    /// The identity every request with this key gets (built once).
    pub identity: Arc<Identity>,
}

impl ApiKey {
    pub fn new(
        id: &str,
        owner: &str,
        hash: [u8; 32],
        expires_at: i64,
        endpoints: Vec<KeyEndpoint>,
    ) -> ApiKey {
        let id: Arc<str> = Arc::from(id);
        ApiKey {
            identity: Arc::new(key_identity(&id, owner, expires_at)),
            id,
            owner: owner.to_string(),
            hash,
            expires_at,
            endpoints,
        }
    }

    /// The key as the server takes it at `now`: refused from its expiry on.
    pub fn valid_at(&self, now: i64) -> Result<&ApiKey, ApiKeyError> {
        if now >= self.expires_at {
            return Err(ApiKeyError::Expired(self.id.clone()));
        }
        Ok(self)
    }

    /// True when one of the key's endpoints covers this method and cleaned path.
    pub fn allows(&self, method: &str, segs: &[std::borrow::Cow<'_, str>]) -> bool {
        self.endpoints
            .iter()
            .any(|e| *e.method == *method && e.path.matches(segs))
    }
}

/// The compiled key table.
#[derive(Debug, Clone, Default)]
pub struct ApiKeys {
    /// Lower-case header carrying the key.
    pub header: String,
    /// The separate key file, resolved against the config's folder (hot reload watches it:
    /// deleting an entry there revokes the key).
    pub file: Option<std::path::PathBuf>,
    keys: Vec<ApiKey>,
    by_hash: HashMap<[u8; 32], usize>,
}

impl ApiKeys {
    /// Builds the table. Callers have checked that ids and hashes are unique.
    pub fn new(header: String, keys: Vec<ApiKey>) -> ApiKeys {
        let by_hash = keys.iter().enumerate().map(|(i, k)| (k.hash, i)).collect();
        ApiKeys {
            header,
            file: None,
            keys,
            by_hash,
        }
    }

    pub fn keys(&self) -> &[ApiKey] {
        &self.keys
    }

    /// A key by id.
    pub fn get(&self, id: &str) -> Option<&ApiKey> {
        self.keys.iter().find(|k| &*k.id == id)
    }

    /// The key a presented value belongs to, valid at `now`.
    pub fn verify(&self, presented: &str, now: i64) -> Result<&ApiKey, ApiKeyError> {
        if presented.len() > MAX_KEY_BYTES {
            return Err(ApiKeyError::TooLong);
        }
        let digest = hash_key(presented);
        // The map lookup only reveals timing about the caller's own hash; the comparison that
        // decides is constant-time over the stored hash.
        let key = self
            .by_hash
            .get(&digest)
            .and_then(|&i| self.keys.get(i))
            .filter(|k| aws_lc_rs::constant_time::verify_slices_are_equal(&k.hash, &digest).is_ok())
            .ok_or(ApiKeyError::Unknown)?;
        key.valid_at(now)
    }
}

/// SHA-256 of a key's bytes.
pub fn hash_key(key: &str) -> [u8; 32] {
    let d = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, key.as_bytes());
    let mut out = [0u8; 32];
    out.copy_from_slice(d.as_ref());
    out
}

/// The config form of a hash: `sha256:<hex>`.
pub fn format_hash(hash: &[u8; 32]) -> String {
    let hex: String = hash.iter().map(|b| format!("{b:02x}")).collect();
    format!("sha256:{hex}")
}

/// Parses `sha256:<64 hex digits>` (either case).
pub fn parse_hash(text: &str) -> Result<[u8; 32], ApiKeyError> {
    let hex = text
        .trim()
        .strip_prefix("sha256:")
        .ok_or(ApiKeyError::BadHash)?;
    if hex.len() != 64 || !hex.is_ascii() {
        return Err(ApiKeyError::BadHash);
    }
    let mut out = [0u8; 32];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).map_err(|_| ApiKeyError::BadHash)?;
    }
    Ok(out)
}

/// Parses the expiry: an RFC 3339 UTC timestamp, to seconds since the epoch.
pub fn parse_expiry(text: &str) -> Result<i64, ApiKeyError> {
    let t = humantime::parse_rfc3339(text.trim())
        .map_err(|_| ApiKeyError::BadExpiry(text.to_string()))?;
    t.duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .map_err(|_| ApiKeyError::BadExpiry(text.to_string()))
}

/// A key from 32 random bytes: `pck_` + base64url (43 characters, 256 bits).
pub fn encode_key(random: &[u8; 32]) -> String {
    format!("{KEY_PREFIX}{}", URL_SAFE_NO_PAD.encode(random))
}

/// True for a valid key id: 1-64 of letters, digits, `.`, `_`, `-`.
pub fn valid_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 64
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

fn key_identity(id: &Arc<str>, owner: &str, expires_at: i64) -> Identity {
    let mut claims = Map::new();
    claims.insert("iss".into(), Value::String(API_KEY_ISSUER.into()));
    claims.insert("sub".into(), Value::String(owner.to_string()));
    claims.insert(KEY_ID_CLAIM.into(), Value::String(id.to_string()));
    claims.insert("exp".into(), Value::from(expires_at));
    Identity {
        issuer_name: Arc::from(API_KEY_ISSUER),
        issuer: API_KEY_ISSUER.to_string(),
        subject: owner.to_string(),
        claims,
        scopes: Vec::new(),
        roles: Vec::new(),
        expires_at,
        not_before: None,
        issued_at: None,
        key_fingerprint: Arc::from(format!("api-key:{id}")),
        key_kid: None,
        key_alg: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str = "pck_test-key-0000000000000000000000000000000000";

    fn table(expires_at: i64) -> ApiKeys {
        let ep = KeyEndpoint::parse("GET /orders/{id}").unwrap();
        ApiKeys::new(
            "x-api-key".into(),
            vec![ApiKey::new(
                "k1",
                "team",
                hash_key(KEY),
                expires_at,
                vec![ep],
            )],
        )
    }

    #[test]
    fn hash_round_trips_through_its_config_form() {
        let h = hash_key(KEY);
        assert_eq!(parse_hash(&format_hash(&h)).unwrap(), h);
        assert_eq!(
            parse_hash(&format_hash(&h).to_uppercase().replace("SHA256", "sha256")).unwrap(),
            h
        );
        for bad in ["", "sha256:", "md5:00", "sha256:zz", &format_hash(&h)[..70]] {
            assert_eq!(parse_hash(bad), Err(ApiKeyError::BadHash), "{bad}");
        }
    }

    #[test]
    fn sha256_matches_a_known_vector() {
        assert_eq!(
            format_hash(&hash_key("abc")),
            "sha256:ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[test]
    fn a_known_key_verifies_and_an_unknown_one_does_not() {
        let t = table(2_000_000_000);
        assert_eq!(&*t.verify(KEY, 1_800_000_000).unwrap().id, "k1");
        assert_eq!(
            t.verify("pck_other", 1_800_000_000).unwrap_err(),
            ApiKeyError::Unknown
        );
        // The key must match exactly: no trimming, no case folding.
        assert!(t.verify(&KEY.to_uppercase(), 1_800_000_000).is_err());
        assert!(t.verify(&format!("{KEY} "), 1_800_000_000).is_err());
    }

    #[test]
    fn a_key_is_refused_from_its_expiry_on() {
        let t = table(1_800_000_000);
        assert!(t.verify(KEY, 1_799_999_999).is_ok());
        assert_eq!(
            t.verify(KEY, 1_800_000_000).unwrap_err(),
            ApiKeyError::Expired(Arc::from("k1"))
        );
    }

    #[test]
    fn over_long_values_are_refused_before_hashing() {
        let t = table(2_000_000_000);
        let long = "a".repeat(MAX_KEY_BYTES + 1);
        assert_eq!(t.verify(&long, 0).unwrap_err(), ApiKeyError::TooLong);
    }

    #[test]
    fn endpoints_parse_and_match_method_and_template() {
        let ep = KeyEndpoint::parse("  GET   /orders/{id} ").unwrap();
        assert_eq!(ep.to_string(), "GET /orders/{id}");
        let key = ApiKey::new("k", "o", [0; 32], 0, vec![ep]);
        let segs = crate::authz::path::clean("/orders/42").unwrap();
        assert!(key.allows("GET", &segs));
        assert!(!key.allows("POST", &segs));
        assert!(!key.allows("get", &segs));
        let other = crate::authz::path::clean("/orders/42/items").unwrap();
        assert!(!key.allows("GET", &other));
        for bad in [
            "/orders",
            "GET",
            "* /x",
            "GET orders",
            "GET /a/../b",
            "G(T /x",
        ] {
            assert!(KeyEndpoint::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn expiry_is_strict_rfc3339_utc() {
        assert_eq!(parse_expiry("2027-01-15T08:00:00Z").unwrap(), 1_800_000_000);
        for bad in ["2027-01-15", "tomorrow", "2027-01-15 08:00:00"] {
            assert!(parse_expiry(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn generated_keys_carry_the_prefix_and_256_bits() {
        let k = encode_key(&[7u8; 32]);
        assert!(k.starts_with(KEY_PREFIX));
        assert_eq!(k.len(), KEY_PREFIX.len() + 43);
        assert!(k.len() <= MAX_KEY_BYTES);
    }

    #[test]
    fn the_key_identity_names_owner_and_id_never_the_key() {
        let t = table(2_000_000_000);
        let k = t.verify(KEY, 0).unwrap();
        assert_eq!(k.identity.subject, "team");
        assert_eq!(k.identity.api_key_id(), Some("k1"));
        assert!(!format!("{:?}", k.identity).contains(KEY));
    }
}
