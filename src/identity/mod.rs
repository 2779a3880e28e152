//! Who is calling: JWT verification against a key set, and the verified identity it yields.
//!
//! Pure and synchronous: no I/O, no clock (the caller passes `now`), no tokio, no tracing.
//! Key *fetching* lives in `keys`; this module only parses key sets it is handed.

pub mod apikey;
pub mod dpop;
pub mod dpop_nonce;
pub mod jwk;
pub mod jwt;
pub mod peer;
pub mod strict_json;

use std::sync::Arc;

use serde_json::{Map, Value};

pub use jwk::{KeyOrigin, KeySet, LoadedKeys, VerifyKey};
pub use jwt::{JwtError, JwtRules, VerifiedJwt};

/// Where scopes and roles live in an issuer's claims (dotted paths).
#[derive(Debug, Clone)]
pub struct ClaimPaths {
    pub scopes: String,
    pub roles: String,
}

/// A verified caller.
#[derive(Debug, Clone)]
pub struct Identity {
    /// The configured issuer name that verified this identity.
    pub issuer_name: Arc<str>,
    /// The `iss` claim.
    pub issuer: String,
    /// The `sub` claim (empty when absent).
    pub subject: String,
    /// All claims, as verified.
    pub claims: Map<String, Value>,
    /// Scopes, from the issuer's scope claim (space-separated string or list).
    pub scopes: Vec<String>,
    /// Roles, from the issuer's role claim (list or single string).
    pub roles: Vec<String>,
    /// `exp`, seconds since the epoch.
    pub expires_at: i64,
    pub not_before: Option<i64>,
    pub issued_at: Option<i64>,
    /// Fingerprint of the key that verified the token (see `VerifyKey::fingerprint`).
    pub key_fingerprint: Arc<str>,
    /// The token's `kid` and `alg`, which picked that key: a cache hit is honoured only
    /// while the issuer's key set would still pick it for them. `None` for an API key.
    pub key_kid: Option<String>,
    pub key_alg: Option<jsonwebtoken::Algorithm>,
}

impl Identity {
    /// Builds an identity from verified claims.
    pub fn from_verified(issuer_name: Arc<str>, jwt: VerifiedJwt, paths: &ClaimPaths) -> Self {
        let scopes = string_list(claim_path(&jwt.claims, &paths.scopes), true);
        let roles = string_list(claim_path(&jwt.claims, &paths.roles), false);
        let issuer = jwt
            .claims
            .get("iss")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string();
        let subject = jwt
            .claims
            .get("sub")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string();
        Identity {
            issuer_name,
            issuer,
            subject,
            scopes,
            roles,
            expires_at: jwt.exp,
            not_before: jwt.nbf,
            issued_at: jwt.iat,
            key_fingerprint: jwt.key_fingerprint,
            key_kid: jwt.kid,
            key_alg: Some(jwt.alg),
            claims: jwt.claims,
        }
    }

    /// The key id when this identity comes from an API key (see `apikey`), else `None`.
    /// INVARIANT: config refuses a token issuer named `api-key`, so only an API key can
    /// produce an identity with that issuer name.
    pub fn api_key_id(&self) -> Option<&str> {
        if &*self.issuer_name != apikey::API_KEY_ISSUER {
            return None;
        }
        self.claims
            .get(apikey::KEY_ID_CLAIM)
            .and_then(Value::as_str)
    }

    /// The token's `iss` claim, for a caller a token issuer verified; `None` for an API key
    /// (its identity carries the issuer name `api-key` in place of a claim).
    pub fn token_iss(&self) -> Option<&str> {
        (&*self.issuer_name != apikey::API_KEY_ISSUER).then_some(self.issuer.as_str())
    }

    /// Approximate heap bytes this identity holds, for the token cache's byte budget: every
    /// string and JSON node it owns, plus allocator and map bookkeeping.
    pub fn approx_bytes(&self) -> usize {
        std::mem::size_of::<Identity>()
            + self.issuer.capacity()
            + self.subject.capacity()
            + self.key_fingerprint.len()
            + self.key_kid.as_ref().map_or(0, String::capacity)
            + strings_bytes(&self.scopes)
            + strings_bytes(&self.roles)
            + map_bytes(&self.claims)
    }

    /// A claim by dotted path (`realm_access.roles`).
    pub fn claim(&self, path: &str) -> Option<&Value> {
        claim_path(&self.claims, path)
    }
}

/// Per-allocation bookkeeping assumed by `approx_bytes` (size-class rounding, headers).
const ALLOC_OVERHEAD: usize = 16;
/// Per-entry overhead of a JSON object (B-tree node share), assumed by `approx_bytes`.
const MAP_ENTRY_OVERHEAD: usize = 32;

fn strings_bytes(list: &[String]) -> usize {
    list.iter()
        .map(|s| std::mem::size_of::<String>() + s.capacity() + ALLOC_OVERHEAD)
        .sum()
}

fn map_bytes(map: &Map<String, Value>) -> usize {
    map.iter()
        .map(|(k, v)| k.capacity() + ALLOC_OVERHEAD + MAP_ENTRY_OVERHEAD + value_bytes(v))
        .sum()
}

fn value_bytes(value: &Value) -> usize {
    std::mem::size_of::<Value>()
        + match value {
            Value::String(s) => s.capacity() + ALLOC_OVERHEAD,
            Value::Array(items) => items.iter().map(value_bytes).sum::<usize>() + ALLOC_OVERHEAD,
            Value::Object(map) => map_bytes(map),
            _ => 0,
        }
}

/// Looks up a dotted claim path. A key that itself contains dots is found when it exists
/// literally at the top level (e.g. `https://example.com/roles`).
pub fn claim_path<'a>(claims: &'a Map<String, Value>, path: &str) -> Option<&'a Value> {
    if let Some(v) = claims.get(path) {
        return Some(v);
    }
    let mut parts = path.split('.');
    let mut cur = claims.get(parts.next()?)?;
    for part in parts {
        cur = cur.as_object()?.get(part)?;
    }
    Some(cur)
}

/// A claim as a list of strings: a JSON list of strings, or one string (split on spaces when
/// `split_spaces`, as OAuth's `scope` claim is).
pub fn string_list(value: Option<&Value>, split_spaces: bool) -> Vec<String> {
    match value {
        Some(Value::String(s)) if split_spaces => s
            .split(' ')
            .filter(|p| !p.is_empty())
            .map(str::to_string)
            .collect(),
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(items)) => items
            .iter()
            .filter_map(Value::as_str)
            .map(str::to_string)
            .collect(),
        _ => Vec::new(),
    }
}

#[cfg(test)]
mod tests;
