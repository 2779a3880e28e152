//! Issuers' key sets: loading from files, fetching JWKS URLs (directly or through OIDC
//! discovery), caching, background refresh, unknown-`kid` refetch with rate limiting, and
//! stale-while-failing up to `max_stale`. The only outbound network I/O in Portcullis.
//! OWNER: keys helper. Skeleton: signatures are the contract.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use crate::admin::metrics::Metrics;
use crate::config::schema::KeySourceConfig;
use crate::identity::KeySet;

/// What the store needs to know about one issuer.
#[derive(Debug, Clone)]
pub struct IssuerKeySource {
    /// Configured issuer name (the key for lookups and metrics).
    pub name: Arc<str>,
    /// The issuer URL (`iss`), used for OIDC discovery.
    pub issuer: String,
    /// Key source settings; `file` is already resolved against the config file's folder.
    pub source: KeySourceConfig,
}

/// Why an issuer's keys cannot be used right now.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    #[error("issuer `{0}` is not configured")]
    UnknownIssuer(String),
    #[error("keys for issuer `{issuer}` are not loaded yet: {reason}")]
    NotLoaded { issuer: String, reason: String },
    #[error("keys for issuer `{issuer}` are stale (last good fetch {age_secs}s ago): {reason}")]
    Stale {
        issuer: String,
        age_secs: u64,
        reason: String,
    },
}

/// Per-issuer status for readiness and metrics.
#[derive(Debug, Clone)]
pub struct IssuerKeyStatus {
    pub name: Arc<str>,
    pub usable: bool,
    pub key_count: usize,
    pub last_good: Option<SystemTime>,
    pub last_error: Option<String>,
}

/// All issuers' keys. Cheap to share behind an `Arc`.
pub struct KeyStore {
    _sources: Vec<IssuerKeySource>,
    _metrics: Arc<Metrics>,
}

impl KeyStore {
    pub fn new(sources: Vec<IssuerKeySource>, metrics: Arc<Metrics>) -> Self {
        Self {
            _sources: sources,
            _metrics: metrics,
        }
    }

    /// Loads every issuer once (files now, URLs fetched) and spawns the background refresh
    /// tasks on the current tokio runtime. Returns when the first attempt for every issuer has
    /// finished (successfully or not); readiness tells which.
    pub async fn start(self: &Arc<Self>) {
        todo!("keys helper")
    }

    /// The current usable key set for an issuer, or why there is none.
    pub fn get(&self, _issuer: &str) -> Result<Arc<KeySet>, KeyError> {
        todo!("keys helper")
    }

    /// Called when a token names a `kid` the current set lacks. Triggers at most one refetch
    /// per issuer per `unknown_kid_interval` (single-flight), and waits at most `wait` for it.
    /// Returns the new set when a refetch completed within `wait` and changed the set.
    pub async fn refresh_for_unknown_kid(
        &self,
        _issuer: &str,
        _wait: Duration,
    ) -> Option<Arc<KeySet>> {
        todo!("keys helper")
    }

    /// True when every issuer has a usable key set.
    pub fn ready(&self) -> bool {
        todo!("keys helper")
    }

    pub fn status(&self) -> Vec<IssuerKeyStatus> {
        todo!("keys helper")
    }
}

/// Resolves a key file path relative to the config file's folder.
pub fn resolve_path(config_dir: &std::path::Path, file: &std::path::Path) -> PathBuf {
    if file.is_absolute() {
        file.to_path_buf()
    } else {
        config_dir.join(file)
    }
}
