//! Shared state: the few atomic operations that replicas must agree on (single-use records,
//! use counters, rate-limit buckets, small keyed values), behind one trait.
//!
//! `MemoryStore` (one replica, the default) lives here; a Redis backend implements the same
//! trait so several replicas behind one Envoy agree. Callers that need shared state fail
//! closed when the store errors: a `StateError` is a deny with a reason, never an allow.
//!
//! Keys are namespaced by the caller (`dpop:jti:...`, `rate:...`, `approval:...`). Values are
//! small strings (JSON where structured). Listings never walk the keys: what must be listed
//! (runtime revocations, approval records) is also put in an index, a set with expiring
//! members (`index_add`/`index_list`), so a listing costs what it lists.

pub mod redis;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub use self::redis::RedisStore;

/// The store a config asks for: in memory (one replica) or Redis (shared by replicas).
pub fn from_config(
    config: &crate::config::schema::StateConfig,
) -> Result<Arc<dyn StateStore>, StateError> {
    use crate::config::schema::StateBackend;
    Ok(match config.backend {
        StateBackend::Memory => Arc::new(MemoryStore::new()),
        StateBackend::Redis => Arc::new(RedisStore::new(
            &config.redis_url,
            &config.key_prefix,
            config.timeout.get(),
        )?),
    })
}

/// Why the store could not answer. Callers deny with this as the reason.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StateError {
    #[error("shared state is unavailable: {0}")]
    Unavailable(String),
    #[error("shared state holds an unexpected value at `{0}`")]
    Corrupt(String),
}

/// A token-bucket limit: `burst` requests at once, refilled at `requests` per `per`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateLimit {
    pub requests: u32,
    pub per: Duration,
    pub burst: u32,
}

impl RateLimit {
    /// Time to earn one request back.
    pub fn emission_interval(&self) -> Duration {
        self.per / self.requests.max(1)
    }
}

/// The outcome of one rate check (enough to build `Retry-After` and `RateLimit` headers).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateOutcome {
    pub allowed: bool,
    /// The bucket size.
    pub limit: u32,
    /// Requests left right now after this one.
    pub remaining: u32,
    /// Until the bucket is full again.
    pub reset: Duration,
    /// When denied: until one request is allowed again.
    pub retry_after: Option<Duration>,
}

/// The operations shared state offers. Every method is atomic on its key.
#[tonic::async_trait]
pub trait StateStore: Send + Sync {
    /// Stores `value` under `key` for `ttl` only when `key` is absent. True when this call
    /// stored it (first use of a DPoP `jti`, first request for an approval).
    async fn insert_if_absent(
        &self,
        key: &str,
        value: &str,
        ttl: Duration,
    ) -> Result<bool, StateError>;

    async fn get(&self, key: &str) -> Result<Option<String>, StateError>;

    /// Stores `value` under `key` for `ttl`, replacing any value.
    async fn set(&self, key: &str, value: &str, ttl: Duration) -> Result<(), StateError>;

    /// Removes `key`; true when it existed.
    async fn delete(&self, key: &str) -> Result<bool, StateError>;

    /// The values of `keys`, in order (`None` for a missing or expired key). For listings.
    async fn get_many(&self, keys: &[String]) -> Result<Vec<Option<String>>, StateError>;

    /// Puts `member` in the set `index` until `expires_at` (Unix seconds), replacing its
    /// previous expiry. Indexes are how listings find their entries: reading one costs what
    /// the set holds, never what the rest of the store holds.
    async fn index_add(&self, index: &str, member: &str, expires_at: i64)
    -> Result<(), StateError>;

    /// Takes `member` out of `index`; true when it was there and expires after `now`.
    async fn index_remove(&self, index: &str, member: &str, now: i64) -> Result<bool, StateError>;

    /// The members of `index` that expire after `now` (Unix seconds), with their expiry,
    /// sorted by member; expired members are dropped from the store on the way. For
    /// listings and background syncs, never per request.
    async fn index_list(&self, index: &str, now: i64) -> Result<Vec<(String, i64)>, StateError>;

    /// Atomically decrements the integer stored at `key` when it is above zero and returns
    /// the value after the decrement; `None` when the key is missing, expired or zero. Two
    /// concurrent callers can never both take the last use.
    async fn take_one(&self, key: &str) -> Result<Option<i64>, StateError>;

    /// Spends one request from the token bucket at `key` (GCRA).
    async fn rate_check(&self, key: &str, limit: RateLimit) -> Result<RateOutcome, StateError>;
}

struct Entry {
    value: String,
    expires: Instant,
}

/// In-process state: the default for a single replica.
#[derive(Default)]
pub struct MemoryStore {
    // INVARIANT: every read treats an entry past `expires` as absent; `sweep` only reclaims
    // memory and never changes an answer.
    entries: Mutex<HashMap<String, Entry>>,
    /// GCRA theoretical arrival times per bucket.
    buckets: Mutex<HashMap<String, Instant>>,
    /// Sets for listings: member -> expiry (Unix seconds), per index.
    indexes: Mutex<HashMap<String, std::collections::BTreeMap<String, i64>>>,
    ops: std::sync::atomic::AtomicU64,
}

impl MemoryStore {
    pub fn new() -> Self {
        Self::default()
    }

    fn entries(&self) -> std::sync::MutexGuard<'_, HashMap<String, Entry>> {
        // A poisoned lock only means another thread panicked mid-update of a plain map;
        // the data is still a valid map, so keep serving rather than failing every request.
        self.entries
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn indexes(
        &self,
    ) -> std::sync::MutexGuard<'_, HashMap<String, std::collections::BTreeMap<String, i64>>> {
        // As `entries`: a poisoned plain map is still a valid map.
        self.indexes
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Every 4096 operations, drop expired entries so memory stays bounded by live data.
    fn maybe_sweep(&self, map: &mut HashMap<String, Entry>, now: Instant) {
        let n = self.ops.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        if n.is_multiple_of(4096) {
            map.retain(|_, e| e.expires > now);
        }
    }
}

fn live(map: &HashMap<String, Entry>, key: &str, now: Instant) -> bool {
    map.get(key).is_some_and(|e| e.expires > now)
}

#[tonic::async_trait]
impl StateStore for MemoryStore {
    async fn insert_if_absent(
        &self,
        key: &str,
        value: &str,
        ttl: Duration,
    ) -> Result<bool, StateError> {
        let now = Instant::now();
        let mut map = self.entries();
        self.maybe_sweep(&mut map, now);
        if live(&map, key, now) {
            return Ok(false);
        }
        map.insert(
            key.to_string(),
            Entry {
                value: value.to_string(),
                expires: now + ttl,
            },
        );
        Ok(true)
    }

    async fn get(&self, key: &str) -> Result<Option<String>, StateError> {
        let now = Instant::now();
        let map = self.entries();
        Ok(map
            .get(key)
            .filter(|e| e.expires > now)
            .map(|e| e.value.clone()))
    }

    async fn set(&self, key: &str, value: &str, ttl: Duration) -> Result<(), StateError> {
        let now = Instant::now();
        let mut map = self.entries();
        self.maybe_sweep(&mut map, now);
        map.insert(
            key.to_string(),
            Entry {
                value: value.to_string(),
                expires: now + ttl,
            },
        );
        Ok(())
    }

    async fn delete(&self, key: &str) -> Result<bool, StateError> {
        let now = Instant::now();
        let mut map = self.entries();
        Ok(map.remove(key).is_some_and(|e| e.expires > now))
    }

    async fn get_many(&self, keys: &[String]) -> Result<Vec<Option<String>>, StateError> {
        let now = Instant::now();
        let map = self.entries();
        Ok(keys
            .iter()
            .map(|k| {
                map.get(k)
                    .filter(|e| e.expires > now)
                    .map(|e| e.value.clone())
            })
            .collect())
    }

    async fn index_add(
        &self,
        index: &str,
        member: &str,
        expires_at: i64,
    ) -> Result<(), StateError> {
        self.indexes()
            .entry(index.to_string())
            .or_default()
            .insert(member.to_string(), expires_at);
        Ok(())
    }

    async fn index_remove(&self, index: &str, member: &str, now: i64) -> Result<bool, StateError> {
        let mut indexes = self.indexes();
        let removed = indexes.get_mut(index).and_then(|set| set.remove(member));
        Ok(removed.is_some_and(|expires_at| expires_at > now))
    }

    async fn index_list(&self, index: &str, now: i64) -> Result<Vec<(String, i64)>, StateError> {
        let mut indexes = self.indexes();
        let Some(set) = indexes.get_mut(index) else {
            return Ok(Vec::new());
        };
        set.retain(|_, expires_at| *expires_at > now);
        Ok(set.iter().map(|(m, e)| (m.clone(), *e)).collect())
    }

    async fn take_one(&self, key: &str) -> Result<Option<i64>, StateError> {
        let now = Instant::now();
        let mut map = self.entries();
        let Some(entry) = map.get_mut(key).filter(|e| e.expires > now) else {
            return Ok(None);
        };
        let n: i64 = entry
            .value
            .parse()
            .map_err(|_| StateError::Corrupt(key.to_string()))?;
        if n <= 0 {
            return Ok(None);
        }
        entry.value = (n - 1).to_string();
        Ok(Some(n - 1))
    }

    async fn rate_check(&self, key: &str, limit: RateLimit) -> Result<RateOutcome, StateError> {
        let now = Instant::now();
        let mut buckets = self
            .buckets
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let outcome = gcra(buckets.get(key).copied(), now, limit);
        if outcome.1.allowed {
            buckets.insert(key.to_string(), outcome.0);
        }
        if buckets.len() > 100_000 {
            // Buckets whose arrival time is in the past are full again: forgetting them
            // changes no answer.
            buckets.retain(|_, tat| *tat > now);
        }
        Ok(outcome.1)
    }
}

/// A store that is down: every operation fails with `StateError::Unavailable`, as an
/// unreachable Redis does. For proving that callers fail closed; counts the calls it saw.
#[derive(Debug)]
pub struct UnavailableStore {
    reason: String,
    calls: std::sync::atomic::AtomicUsize,
}

impl UnavailableStore {
    pub fn new(reason: impl Into<String>) -> Self {
        Self {
            reason: reason.into(),
            calls: std::sync::atomic::AtomicUsize::new(0),
        }
    }

    /// How many operations were attempted.
    pub fn calls(&self) -> usize {
        self.calls.load(std::sync::atomic::Ordering::SeqCst)
    }

    fn fail<T>(&self) -> Result<T, StateError> {
        self.calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        Err(StateError::Unavailable(self.reason.clone()))
    }
}

#[tonic::async_trait]
impl StateStore for UnavailableStore {
    async fn insert_if_absent(&self, _: &str, _: &str, _: Duration) -> Result<bool, StateError> {
        self.fail()
    }
    async fn get(&self, _: &str) -> Result<Option<String>, StateError> {
        self.fail()
    }
    async fn set(&self, _: &str, _: &str, _: Duration) -> Result<(), StateError> {
        self.fail()
    }
    async fn delete(&self, _: &str) -> Result<bool, StateError> {
        self.fail()
    }
    async fn get_many(&self, _: &[String]) -> Result<Vec<Option<String>>, StateError> {
        self.fail()
    }
    async fn index_add(&self, _: &str, _: &str, _: i64) -> Result<(), StateError> {
        self.fail()
    }
    async fn index_remove(&self, _: &str, _: &str, _: i64) -> Result<bool, StateError> {
        self.fail()
    }
    async fn index_list(&self, _: &str, _: i64) -> Result<Vec<(String, i64)>, StateError> {
        self.fail()
    }
    async fn take_one(&self, _: &str) -> Result<Option<i64>, StateError> {
        self.fail()
    }
    async fn rate_check(&self, _: &str, _: RateLimit) -> Result<RateOutcome, StateError> {
        self.fail()
    }
}

/// Generic cell rate algorithm: returns the new theoretical arrival time and the outcome.
pub fn gcra(tat: Option<Instant>, now: Instant, limit: RateLimit) -> (Instant, RateOutcome) {
    let interval = limit.emission_interval();
    let burst = limit.burst.max(1);
    let tolerance = interval * (burst - 1);
    let tat = tat.filter(|t| *t > now).unwrap_or(now);
    let new_tat = tat + interval;
    let allow_at = new_tat.checked_sub(interval + tolerance).unwrap_or(now);
    if allow_at > now {
        let retry = allow_at - now;
        return (
            tat,
            RateOutcome {
                allowed: false,
                limit: burst,
                remaining: 0,
                reset: tat.saturating_duration_since(now),
                retry_after: Some(retry),
            },
        );
    }
    let used = new_tat.saturating_duration_since(now);
    let used_units = used.as_nanos().div_ceil(interval.as_nanos().max(1)) as u32;
    (
        new_tat,
        RateOutcome {
            allowed: true,
            limit: burst,
            remaining: burst.saturating_sub(used_units),
            reset: used,
            retry_after: None,
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn insert_if_absent_is_single_use() {
        let s = MemoryStore::new();
        assert!(
            s.insert_if_absent("k", "v", Duration::from_secs(60))
                .await
                .unwrap()
        );
        assert!(
            !s.insert_if_absent("k", "w", Duration::from_secs(60))
                .await
                .unwrap()
        );
        assert_eq!(s.get("k").await.unwrap().as_deref(), Some("v"));
    }

    #[tokio::test]
    async fn expired_entries_are_absent() {
        let s = MemoryStore::new();
        s.set("k", "v", Duration::from_millis(1)).await.unwrap();
        std::thread::sleep(Duration::from_millis(5));
        assert_eq!(s.get("k").await.unwrap(), None);
        assert!(
            s.insert_if_absent("k", "again", Duration::from_secs(1))
                .await
                .unwrap()
        );
    }

    #[tokio::test]
    async fn take_one_never_goes_below_zero() {
        let s = std::sync::Arc::new(MemoryStore::new());
        s.set("uses", "1", Duration::from_secs(60)).await.unwrap();
        let mut tasks = Vec::new();
        for _ in 0..16 {
            let s = s.clone();
            tasks.push(tokio::spawn(
                async move { s.take_one("uses").await.unwrap() },
            ));
        }
        let mut taken = 0;
        for t in tasks {
            if t.await.unwrap().is_some() {
                taken += 1;
            }
        }
        assert_eq!(taken, 1, "a single use was spent more than once");
        assert_eq!(s.take_one("missing").await.unwrap(), None);
    }

    #[tokio::test]
    async fn an_index_lists_its_live_members_only() {
        let s = MemoryStore::new();
        s.index_add("i", "b", 200).await.unwrap();
        s.index_add("i", "a", 150).await.unwrap();
        s.index_add("i", "old", 90).await.unwrap();
        s.index_add("other", "x", 500).await.unwrap();
        assert_eq!(
            s.index_list("i", 100).await.unwrap(),
            vec![("a".to_string(), 150), ("b".to_string(), 200)]
        );
        // A later add replaces the expiry; an expired member is gone for good.
        s.index_add("i", "a", 300).await.unwrap();
        assert_eq!(
            s.index_list("i", 160).await.unwrap(),
            vec![("a".to_string(), 300), ("b".to_string(), 200)]
        );
        assert!(s.index_remove("i", "b", 160).await.unwrap());
        assert!(!s.index_remove("i", "b", 160).await.unwrap());
        assert!(!s.index_remove("i", "a", 300).await.unwrap(), "expired");
        assert_eq!(s.index_list("missing", 0).await.unwrap(), vec![]);
    }

    #[tokio::test]
    async fn get_many_answers_each_key_in_order() {
        let s = MemoryStore::new();
        s.set("a", "1", Duration::from_secs(60)).await.unwrap();
        s.set("gone", "2", Duration::from_millis(1)).await.unwrap();
        std::thread::sleep(Duration::from_millis(5));
        let keys = ["gone", "a", "missing"].map(String::from);
        assert_eq!(
            s.get_many(&keys).await.unwrap(),
            vec![None, Some("1".to_string()), None]
        );
    }

    #[test]
    fn gcra_allows_the_burst_then_denies_with_retry_after() {
        let limit = RateLimit {
            requests: 10,
            per: Duration::from_secs(10),
            burst: 3,
        };
        let now = Instant::now();
        let mut tat = None;
        let mut remaining = Vec::new();
        for _ in 0..3 {
            let (t, o) = gcra(tat, now, limit);
            assert!(o.allowed);
            remaining.push(o.remaining);
            tat = Some(t);
        }
        assert_eq!(remaining, vec![2, 1, 0]);
        let (_, denied) = gcra(tat, now, limit);
        assert!(!denied.allowed);
        let retry = denied.retry_after.unwrap();
        assert!(
            retry > Duration::ZERO && retry <= Duration::from_secs(1),
            "{retry:?}"
        );
        // One emission interval later one more request fits.
        let (_, later) = gcra(tat, now + Duration::from_secs(1), limit);
        assert!(later.allowed);
    }
}
