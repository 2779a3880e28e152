//! JWT (JWS compact) verification. OWNER: identity helper. Skeleton: signatures are the contract.
//!
//! Parses the token itself, strictly (segments, base64url without padding, JSON without
//! duplicate keys, `crit`, `b64`), checks time claims against the caller's `now`, and uses
//! `jsonwebtoken::crypto::verify` only for the signature.

use std::sync::Arc;

use jsonwebtoken::Algorithm;
use serde_json::{Map, Value};

use super::jwk::KeySet;

/// What a token from one issuer must satisfy. Built by `config` from an issuer entry.
#[derive(Debug, Clone)]
pub struct JwtRules {
    /// Exact `iss`.
    pub issuer: String,
    /// `aud` (string or list) must contain one of these.
    pub audiences: Vec<String>,
    /// Allowed algorithms (never `none`).
    pub algorithms: Vec<Algorithm>,
    pub leeway_secs: u64,
    pub max_lifetime_secs: Option<u64>,
    pub required_typ: Option<String>,
    pub max_token_bytes: usize,
}

/// The result of a successful verification.
#[derive(Debug, Clone)]
pub struct VerifiedJwt {
    pub claims: Map<String, Value>,
    pub kid: Option<String>,
    pub alg: Algorithm,
    /// Fingerprint of the key that verified the signature.
    pub key_fingerprint: Arc<str>,
    pub exp: i64,
    pub nbf: Option<i64>,
    pub iat: Option<i64>,
}

/// Why a token was rejected. Messages are lower-case, name the problem, never the token.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JwtError {
    #[error("token is malformed: {0}")]
    Malformed(&'static str),
    #[error("token is larger than {max} bytes")]
    TooLarge { max: usize },
    #[error("no key with kid `{0}` in the issuer's key set")]
    UnknownKid(String),
}

impl JwtError {
    /// True when a key-set refetch could change the outcome.
    pub fn is_unknown_kid(&self) -> bool {
        matches!(self, JwtError::UnknownKid(_))
    }
}

/// Reads `iss` from an unverified token, after the structural checks, to pick the issuer.
pub fn peek_issuer(_token: &str, _max_bytes: usize) -> Result<String, JwtError> {
    todo!("identity helper")
}

/// Verifies a token fully against one issuer's rules and key set at time `now` (unix seconds).
pub fn verify(
    _token: &str,
    _rules: &JwtRules,
    _keys: &KeySet,
    _now: i64,
) -> Result<VerifiedJwt, JwtError> {
    todo!("identity helper")
}

/// The time checks alone (`exp`, `nbf`, `iat`, lifetime), re-applied on token-cache hits.
pub fn check_times(
    _exp: i64,
    _nbf: Option<i64>,
    _iat: Option<i64>,
    _rules: &JwtRules,
    _now: i64,
) -> Result<(), JwtError> {
    todo!("identity helper")
}
