//! JSON Web Key sets: parse, filter unsafe keys, and find candidate keys for a token.
//! OWNER: identity helper. Skeleton: signatures are the contract.

use std::sync::Arc;

use jsonwebtoken::{Algorithm, DecodingKey};

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
    /// The JWK's `alg`, when it names one.
    pub alg: Option<Algorithm>,
    /// The JWK's `use`.
    pub usage: Option<String>,
    /// The JWK's `key_ops`.
    pub key_ops: Option<Vec<String>>,
    pub decoding: DecodingKey,
    /// RFC 7638 thumbprint (base64url SHA-256); identifies the key across refreshes.
    pub fingerprint: Arc<str>,
}

impl std::fmt::Debug for VerifyKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VerifyKey")
            .field("kid", &self.kid)
            .field("kty", &self.kty)
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
    #[error("key set has no usable keys")]
    NoUsableKeys,
}

impl KeySet {
    /// Parses a JWKS document, dropping keys that must not be used (RSA < 2048 bits, `oct`
    /// from a fetched set, unsupported types, `use` other than `sig`).
    pub fn from_jwks(_json: &[u8], _origin: KeyOrigin) -> Result<LoadedKeys, JwkError> {
        todo!("identity helper")
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
